//! The one place where the egress proxy's refusals become a status, a one-line reason (in the
//! body and the `Ferry-Refusal` header) and a bounded `reason` label for metrics.

use http::{HeaderValue, Response, StatusCode};

use crate::http_util::{text_response, Body};

/// Response header carrying the refusal's one-line reason.
pub const REFUSAL_HEADER: &str = "ferry-refusal";

/// Most header fields hyper parses in one request head (its default); more is a 431.
pub const MAX_HEADER_FIELDS: usize = 100;

/// Why the proxy refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 403, 405, 407, 408, 413, 415, 422, 429, 431, 501, 502, 503 or 504.
    pub status: StatusCode,
    /// Bounded label for metrics (`client_not_allowed`, `destination_not_allowed`, …).
    pub kind: &'static str,
    /// One line for the client and the access log. Never contains payload bytes.
    pub reason: String,
    /// For a 405: the methods the rules allow there (the `Allow` header).
    pub allow: Vec<http::Method>,
}

impl Refusal {
    fn new(status: StatusCode, kind: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            reason: reason.into(),
            allow: Vec::new(),
        }
    }

    /// The client's address is not allowed (403).
    pub fn client(peer: std::net::IpAddr) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "client_not_allowed",
            format!("client {peer} is not allowed"),
        )
    }

    /// Credentials missing or wrong (407).
    pub fn credentials(reason: &str) -> Self {
        Self::new(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "credentials",
            reason,
        )
    }

    /// Too many connections from one client (429).
    pub fn too_many_connections(limit: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "connection_limit",
            format!("more than {limit} connections from this client"),
        )
    }

    /// No rule allows this destination (403).
    pub fn destination(what: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "destination_not_allowed",
            format!("destination {what} is not allowed"),
        )
    }

    /// No rule allows this destination as asked, and `why` says what would be allowed (403).
    pub fn destination_because(what: &str, why: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "destination_not_allowed",
            format!("destination {what} is not allowed: {why}"),
        )
    }

    /// The destination resolves only to addresses no rule allows (403).
    pub fn forbidden_address(host: &str, why: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden_address",
            format!("{host} resolves to a {why} address, which no rule names"),
        )
    }

    /// Malformed request framing or URI (400).
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }

    /// Request head larger than allowed (431).
    pub fn head_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "header_too_large",
            format!("request head exceeds the limit of {limit} bytes"),
        )
    }

    /// What hyper answered to a request it could not parse (it sends an empty 400 or 431 and
    /// closes): `None` for errors that are not about a malformed request (timeouts, resets).
    pub fn unparsable(e: &hyper::Error, max_header_bytes: usize) -> Option<Self> {
        if e.is_parse_too_large() {
            Some(Self::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
                format!(
                    "request head exceeds the limit of {max_header_bytes} bytes or {MAX_HEADER_FIELDS} header fields"
                ),
            ))
        } else if e.is_parse() {
            Some(Self::bad_request(format!("malformed request: {e}")))
        } else {
            None
        }
    }

    /// A transfer coding other than `chunked` (501): the proxy could not frame or check the body.
    pub fn transfer_coding(got: &str) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            "transfer_encoding",
            format!("transfer coding {got:?} is not supported (only chunked)"),
        )
    }

    /// Method not allowed by the rule (405).
    pub fn method(method: &http::Method, rule: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("method {method} is not allowed by rule {rule:?}"),
        )
    }

    /// Body larger than the rule allows (413).
    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body exceeds the limit of {limit} bytes"),
        )
    }

    /// Decoded body larger than allowed (413): a compression bomb, or just too much.
    pub fn decoded_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "decoded_too_large",
            format!("decoded body exceeds the limit of {limit} bytes"),
        )
    }

    /// The parsed tree of a JSON body, for its schema check, would take more than allowed (413).
    pub fn json_tree_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "json_tree_too_large",
            format!(
                "the body's JSON tree for the schema check would exceed the limit of {limit} bytes (max_json_tree_bytes)"
            ),
        )
    }

    /// Content type not accepted (415).
    pub fn unsupported_media(got: &str, allowed: &[String]) -> Self {
        let got = if got.is_empty() { "none" } else { got };
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_type",
            format!("content type {got} is not one of {}", allowed.join(", ")),
        )
    }

    /// A charset the body checks cannot read (415): not ASCII-compatible.
    pub fn unsupported_charset(got: &str) -> Self {
        let readable = !got.is_empty()
            && got.len() <= 40
            && got
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        let got = if readable { got } else { "(unreadable)" };
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_type",
            format!("charset {got} cannot be checked: the rule reads the body as ASCII-compatible text (send utf-8, us-ascii or iso-8859-*)"),
        )
    }

    /// Content encoding the proxy cannot validate (415).
    pub fn unsupported_encoding(got: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_encoding",
            format!(
                "content encoding {got} cannot be validated (gzip, deflate, snappy or identity)"
            ),
        )
    }

    /// Payload failed validation (422).
    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_payload", reason)
    }

    /// Payload matched a deny pattern (403).
    pub fn denied_pattern(pattern: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "deny_pattern",
            format!("body matches deny pattern {pattern:?}"),
        )
    }

    /// The client began a request head and did not finish it in time (408; slowloris).
    pub fn header_timeout(after: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "header_timeout",
            format!(
                "request head not received within {}",
                humantime::format_duration(after)
            ),
        )
    }

    /// The client did not send its whole body in time (408).
    pub fn body_timeout(after: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("request body not received within {after:?}"),
        )
    }

    /// The proxy already holds its limit of request body bytes (503): the request is refused
    /// rather than let one client's stalled uploads take the host's memory.
    pub fn body_buffer_full(limit: u64) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "body_buffer_full",
            format!(
                "the proxy already holds its limit of {limit} bytes of request bodies (max_buffered_body_bytes); try again later"
            ),
        )
    }

    /// No slot to check a body in came free in time (503): the checks of compressed and large
    /// bodies run a few at a time, one per CPU core.
    pub fn checks_busy(after: std::time::Duration) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "checks_busy",
            format!(
                "no slot to check the body in came free within {after:?} (one per CPU core); try again later"
            ),
        )
    }

    /// The upstream could not be reached or failed (502).
    pub fn upstream(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "upstream_error", reason)
    }

    /// The upstream (`host:port`) did not answer in time (504).
    pub fn upstream_timeout(upstream: &str, after: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!("upstream {upstream} did not answer within {after:?}"),
        )
    }

    /// Whether the request was allowed and the upstream failed it (502, 504): out of the
    /// policy's hands, so an alert on policy refusals does not fire for a collector's outage.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(self.kind, "upstream_error" | "upstream_timeout")
    }

    /// The response: status, reason as text, reason in the `Ferry-Refusal` header.
    pub fn into_response(&self) -> Response<Body> {
        let line = self.reason.replace(['\r', '\n'], " ");
        let mut resp = text_response(self.status, &line);
        let header: String = line
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&header) {
            resp.headers_mut().insert(REFUSAL_HEADER, v);
        }
        if !self.allow.is_empty() {
            let allow: Vec<&str> = self.allow.iter().map(|m| m.as_str()).collect();
            if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
                resp.headers_mut().insert(http::header::ALLOW, v);
            }
        }
        if self.status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            resp.headers_mut().insert(
                http::header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"ferry egress\", Bearer"),
            );
        }
        resp
    }
}
