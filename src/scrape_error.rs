//! The one place where a failed scrape becomes the status code and one-line reason that
//! Prometheus (or a person with curl) sees. Both the gateway and the agent answer through it.

use http::{Response, StatusCode};
use std::time::Duration;

use crate::http_util::{text_response, Body};

/// Header carrying which side produced an error response, so the gateway can count it right.
pub const ERROR_SOURCE_HEADER: &str = "ferry-error";

/// How a 502 says that a response body broke before any of it was sent: the head was in hand,
/// but a status that promised a body nobody got would be a lie.
pub const BROKE_EARLY: &str = "the response body broke before any of it was sent";

/// The methods a scrape may use, as the `Allow` header says them.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST";

/// Why a scrape could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// No tunnel from this agent id is up on this gateway.
    #[error("agent {0:?} is not connected")]
    AgentNotConnected(String),
    /// The agent has as many scrapes in flight as the gateway lets one agent have.
    #[error("agent {agent:?} has {limit} scrapes in flight already (the gateway's tunnel.max_concurrent_scrapes): try again later")]
    AgentBusy {
        /// The agent asked for.
        agent: String,
        /// `tunnel.max_concurrent_scrapes`.
        limit: u32,
    },
    /// The agent has no target on this port and path; nothing was fetched.
    #[error("agent {agent:?} has no target at port {port} path {path:?}")]
    NoSuchTarget {
        /// The agent asked for.
        agent: String,
        /// The port from the request URI.
        port: u16,
        /// The path from the request URI.
        path: String,
    },
    /// The scrape did not complete within its (clamped) timeout.
    #[error("scrape of {what} timed out after {timeout:?}")]
    Timeout {
        /// What timed out: the agent or a named target.
        what: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The tunnel to the agent failed while carrying the request.
    #[error("tunnel to agent {agent:?} failed: {reason}")]
    Tunnel {
        /// The agent whose tunnel failed.
        agent: String,
        /// The underlying error, one line.
        reason: String,
    },
    /// The agent reached the target, but the target failed.
    #[error("target {target:?} failed: {reason}")]
    Target {
        /// The target's name.
        target: String,
        /// The underlying error, one line.
        reason: String,
    },
    /// The target's answer is larger than the gateway passes on; refused before its head.
    #[error("{}", too_large(.target, .agent, *.length, *.limit))]
    TooLarge {
        /// The target's name.
        target: String,
        /// Its agent.
        agent: String,
        /// The body's length, when its `Content-Length` said it.
        length: Option<u64>,
        /// The gateway's limit (`web.max_scrape_bytes`).
        limit: u64,
    },
    /// The request itself is malformed (no host, a bad URI).
    #[error("bad scrape request: {0}")]
    BadRequest(String),
    /// A GET or HEAD with a request body: a scrape has none, and a target that does not read it
    /// would take it for a second request.
    #[error("a {0} scrape has no body: a request body on {0} is refused")]
    BodyOnGet(http::Method),
    /// A method other than GET, HEAD or POST.
    #[error("{}", method_refusal(.0))]
    Method(http::Method),
    /// The request's headers are more than the tunnel carries.
    #[error("request headers of {size} bytes are more than the tunnel carries ({limit})")]
    HeadersTooLarge {
        /// Their size as HTTP/2 counts it.
        size: usize,
        /// [`crate::tunnel::MAX_HEADER_BYTES`].
        limit: usize,
    },
}

impl ScrapeError {
    /// The status code this error maps to: 503, 404, 504, 502, 400, 405 or 431.
    pub fn status(&self) -> StatusCode {
        match self {
            ScrapeError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            ScrapeError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ScrapeError::AgentNotConnected(_) | ScrapeError::AgentBusy { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ScrapeError::NoSuchTarget { .. } => StatusCode::NOT_FOUND,
            ScrapeError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ScrapeError::Tunnel { .. }
            | ScrapeError::Target { .. }
            | ScrapeError::TooLarge { .. } => StatusCode::BAD_GATEWAY,
            ScrapeError::BadRequest(_) | ScrapeError::BodyOnGet(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// A short label naming the error's kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ScrapeError::AgentNotConnected(_) => "agent_not_connected",
            ScrapeError::AgentBusy { .. } => "agent_busy",
            ScrapeError::NoSuchTarget { .. } => "no_such_target",
            ScrapeError::Timeout { .. } => "timeout",
            ScrapeError::Tunnel { .. } => "tunnel",
            ScrapeError::Target { .. } => "target",
            ScrapeError::TooLarge { .. } => "too_large",
            ScrapeError::BadRequest(_) => "bad_request",
            ScrapeError::BodyOnGet(_) => "body_on_get",
            ScrapeError::Method(_) => "method",
            ScrapeError::HeadersTooLarge { .. } => "headers_too_large",
        }
    }

    /// The response sent for this error: its status and its one-line reason as plain text.
    pub fn into_response(self, source: &'static str) -> Response<Body> {
        let reason = self.to_string().replace('\n', " ");
        let allow = matches!(self, ScrapeError::Method(_));
        let mut resp = text_response(self.status(), &reason);
        resp.headers_mut()
            .insert(ERROR_SOURCE_HEADER, http::HeaderValue::from_static(source));
        if allow {
            resp.headers_mut().insert(
                http::header::ALLOW,
                http::HeaderValue::from_static(ALLOWED_METHODS),
            );
        }
        resp
    }
}

/// Where the gateway's limit on a scrape's body is set, as a refusal names it.
pub const MAX_SCRAPE_BYTES_SETTING: &str = "--web.max-scrape-bytes / web.max_scrape_bytes";

fn too_large(target: &str, agent: &str, length: Option<u64>, limit: u64) -> String {
    let size = length.map_or_else(String::new, |n| format!("{n} bytes, "));
    format!("target {target:?} of agent {agent:?} answered {size}more than the gateway passes on ({limit} bytes): raise {MAX_SCRAPE_BYTES_SETTING}")
}

fn method_refusal(method: &http::Method) -> String {
    if method == http::Method::CONNECT {
        "CONNECT is not supported by the gateway: it proxies plain http:// scrapes (absolute-form), the agent picks http or https".into()
    } else {
        format!("method {method} is not forwarded: scrapes are GET (HEAD and POST also pass)")
    }
}

/// Renders an error and its sources on one line, as `{:#}` would with anyhow.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    // hyper-util's client says only "client error (Connect)" itself: its cause says what failed.
    if let (Some(_), Some(cause)) = (
        err.downcast_ref::<hyper_util::client::legacy::Error>(),
        err.source(),
    ) {
        return one_line(cause);
    }
    let mut out = in_plain_words(err.to_string());
    let mut cur = err.source();
    while let Some(source) = cur {
        let text = in_plain_words(source.to_string());
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = source.source();
    }
    out.replace('\n', " ")
}

/// rustls's words for a TCP connection that ended without TLS's own closing message, which
/// it follows with a link to its manual: a log line or a 502 reason needs the cause instead.
const RUSTLS_UNEXPECTED_EOF: &str = "peer closed connection without sending TLS close_notify";

/// `text`, one error's message, with what a library says for its own readers put as ferry's
/// user needs it.
fn in_plain_words(text: String) -> String {
    if text.starts_with(RUSTLS_UNEXPECTED_EOF) {
        return "the connection closed without TLS close_notify (the peer's process died or the network cut it)".to_owned();
    }
    // h2 shows a GOAWAY's debug data as Rust's byte-string literal: ` (b"too_many_resets")`.
    if let Some((head, data)) = text.split_once(" (b\"") {
        if let Some(data) = data.strip_suffix("\")") {
            return format!("{head}, saying \"{data}\"");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GOAWAY's debug data reads as what the peer said, not as a Rust byte string.
    #[test]
    fn goaway_debug_data_is_quoted_as_text() {
        assert_eq!(
            in_plain_words(
                "connection error received: detected excessive load generating behavior (b\"too_many_resets\")".into()
            ),
            "connection error received: detected excessive load generating behavior, saying \"too_many_resets\""
        );
    }

    #[test]
    fn each_error_maps_to_its_documented_status() {
        let cases = [
            (ScrapeError::AgentNotConnected("a".into()), 503),
            (ScrapeError::BodyOnGet(http::Method::GET), 400),
            (
                ScrapeError::NoSuchTarget {
                    agent: "a".into(),
                    port: 1,
                    path: "/x".into(),
                },
                404,
            ),
            (
                ScrapeError::Timeout {
                    what: "a".into(),
                    timeout: Duration::from_secs(1),
                },
                504,
            ),
            (
                ScrapeError::Tunnel {
                    agent: "a".into(),
                    reason: "r".into(),
                },
                502,
            ),
            (
                ScrapeError::Target {
                    target: "t".into(),
                    reason: "r".into(),
                },
                502,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.status().as_u16(), code, "{err}");
        }
    }

    /// An error chain as a tunnel cut by a killed agent gives it: hyper's error over rustls's.
    #[derive(Debug, thiserror::Error)]
    #[error("error reading a body from connection")]
    struct Reading(#[source] std::io::Error);

    #[test]
    fn a_tls_connection_cut_short_is_explained_without_a_link() {
        let eof = std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "peer closed connection without sending TLS close_notify: https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof",
        );
        assert_eq!(
            one_line(&Reading(eof)),
            "error reading a body from connection: the connection closed without TLS close_notify (the peer's process died or the network cut it)"
        );
    }
}
