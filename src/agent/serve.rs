//! What the agent serves over the tunnel (it is the HTTP/2 server there): its target list, held
//! open until it changes, and scrapes of its listed targets. Everything else is 404, never fetched.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, Uri};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::targets::{Handler, Route};
use super::Shared;
use crate::endpoints::OwnEndpoints as _;
use crate::http_util::{
    body_on_get, boxed, full, read_ahead, strip_hop_by_hop, Body, BodyEnd, BoundedBody,
    ReadAheadError,
};
use crate::scrape_error::{one_line, ScrapeError, BROKE_EARLY, ERROR_SOURCE_HEADER};
use crate::telemetry::{metrics_response_blocking, TargetNameLabels, TargetResultLabels};
use crate::tunnel::{
    header_list_size, ClosingKind, CLOSING_NOTICE_TIMEOUT, MAX_CLOSING_NOTICE, MAX_HEADER_BYTES,
    MAX_REQUEST_BODY, SCRAPE_TIMEOUT_HEADER, TARGETS_LONG_POLL, TARGETS_PATH,
};

/// Answers one request arriving over the tunnel.
///
/// `closing` ends a held target-list request at once, so a graceful shutdown need not wait for it.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    closing: CancellationToken,
) -> Response<Body> {
    let port = req.uri().port_u16();
    let notice =
        ClosingKind::of_path(req.uri().path()).filter(|_| req.method() == http::Method::POST);
    match (port, notice) {
        (None, _) if req.uri().path() == TARGETS_PATH => {
            targets(&shared, req.uri(), &closing).await
        }
        (None, Some(kind)) => closing_notice(&shared, kind, req).await,
        (None, None) => ScrapeError::BadRequest("scrape requests must carry <agent>:<port>".into())
            .into_response("agent"),
        (Some(port), _) => scrape(&shared, port, req).await,
    }
}

/// The target list; with `?after=<version>`, held until the version changes (or the long-poll ends).
async fn targets(shared: &Shared, uri: &Uri, closing: &CancellationToken) -> Response<Body> {
    let after = uri
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("after=")))
        .and_then(|v| v.parse::<u64>().ok());
    let mut rx = shared.targets.subscribe();
    if after == Some(rx.borrow_and_update().list.version) {
        super::session::serving_long_poll();
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(TARGETS_LONG_POLL) => {}
            _ = closing.cancelled() => {}
        }
    }
    let body = serde_json::to_string(&rx.borrow().list).unwrap_or_default();
    let mut resp = Response::new(full(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Why the gateway closes the tunnel, as it said before closing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClosingNotice {
    /// What kind of closing it is.
    pub(crate) kind: ClosingKind,
    /// The gateway's one-line reason.
    pub(crate) reason: String,
}

/// The gateway's one-line reason for closing this tunnel, kept for the reconnect loop: it logs
/// it and waits as its kind asks (another agent with our id: the slow backoff).
async fn closing_notice(
    shared: &Shared,
    kind: ClosingKind,
    req: Request<Incoming>,
) -> Response<Body> {
    use http_body_util::BodyExt;
    let body = http_body_util::Limited::new(req.into_body(), MAX_CLOSING_NOTICE);
    let bytes = match tokio::time::timeout(CLOSING_NOTICE_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => Default::default(),
    };
    let text = String::from_utf8_lossy(&bytes);
    let reason = match text.lines().next().map(str::trim) {
        Some(line) if !line.is_empty() => line.to_owned(),
        _ => "the gateway gave no reason".to_owned(),
    };
    *shared
        .closing_notice
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(ClosingNotice { kind, reason });
    crate::http_util::text_response(http::StatusCode::OK, "ok")
}

async fn scrape(shared: &Arc<Shared>, port: u16, req: Request<Incoming>) -> Response<Body> {
    let set = shared.targets.borrow().clone();
    let Some(route) = set.route(port, req.uri().path()) else {
        count(shared, "unknown", "not_found");
        let err = ScrapeError::NoSuchTarget {
            agent: shared.config.agent_id.clone(),
            port,
            path: req.uri().path().to_owned(),
        };
        return err.into_response("agent");
    };
    // Checked here too, not only at the gateway: the agent trusts its gateway no more than the
    // gateway trusts Prometheus. A PUT or DELETE never reaches a target, and whatever sent it,
    // a body on GET never does either, where it could be read as a second request.
    if !matches!(*req.method(), Method::GET | Method::HEAD | Method::POST) {
        count(shared, &route.name, "bad_request");
        return ScrapeError::Method(req.method().clone()).into_response("agent");
    }
    if body_on_get(&req) {
        count(shared, &route.name, "bad_request");
        return ScrapeError::BodyOnGet(req.method().clone()).into_response("agent");
    }
    let timeout = scrape_timeout(
        req.headers().get(SCRAPE_TIMEOUT_HEADER),
        shared.config.scrape_timeout_max,
    );
    match &route.handler {
        Handler::SelfMetrics => {
            count(shared, &route.name, "ok");
            let request = req.headers().clone();
            let gate = shared.scrape_gate.as_ref();
            metrics_response_blocking(shared.clone(), Shared::registry, request, gate).await
        }
        Handler::Fetch { url, client } => fetch(shared, route, url, client, req, timeout).await,
    }
}

/// The timeout the gateway passed on, bounded by our own maximum.
fn scrape_timeout(header: Option<&HeaderValue>, max: Duration) -> Duration {
    header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(max, |s| Duration::from_secs_f64(s.min(max.as_secs_f64())))
}

async fn fetch(
    shared: &Arc<Shared>,
    route: &Route,
    url: &Uri,
    client: &super::targets::HttpClient,
    req: Request<Incoming>,
    timeout: Duration,
) -> Response<Body> {
    let start = Instant::now();
    // Dropped before the answer (the gateway reset the stream: its client went away), it
    // counts the scrape as cancelled.
    let unanswered = Unanswered {
        shared: shared.clone(),
        target: Some(route.name.clone()),
    };
    let resp = fetch_answer(shared, route, url, client, req, timeout, start).await;
    unanswered.answered();
    resp
}

/// Counts a scrape dropped before its answer as `cancelled`.
struct Unanswered {
    shared: Arc<Shared>,
    target: Option<String>,
}

impl Unanswered {
    fn answered(mut self) {
        self.target = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(target) = self.target.take() {
            debug!(scrape_target = %target, "the gateway cancelled the scrape before its answer");
            count(&self.shared, &target, "cancelled");
        }
    }
}

/// Why fetching `route` failed, in one line, logged: a failed TLS handshake at warn (rate
/// limited), since only the agent's operator can fix it (a renewed certificate, a CA file);
/// anything else at debug (the 502 tells Prometheus).
fn fetch_failure(route: &Route, e: &hyper_util::client::legacy::Error) -> String {
    let Some(tls) = crate::tunnel::tls::rustls_error_in(e) else {
        let reason = one_line(e);
        debug!(scrape_target = %route.name, error = %reason, "target fetch failed");
        return reason;
    };
    let reason = target_tls_reason(tls, route.ca_file.as_deref());
    match route.tls_warnings.admit() {
        Some(quiet) => {
            warn!(scrape_target = %route.name, error = %reason, failures_not_warned = quiet, "TLS handshake with the target failed (warned once a minute at most)")
        }
        None => {
            debug!(scrape_target = %route.name, error = %reason, "TLS handshake with the target failed")
        }
    }
    reason
}

/// rustls's reason in words, with dates rather than Unix times, naming the CA file the
/// target's certificate was checked against.
fn target_tls_reason(e: &rustls::Error, ca_file: Option<&std::path::Path>) -> String {
    use rustls::CertificateError as C;
    if crate::tunnel::tls_client::sent_no_chain(e) {
        let trusted = ca_file.map_or_else(
            || "a CA this host trusts".to_owned(),
            |ca| format!("a CA in {} (tls.ca_file)", ca.display()),
        );
        return format!("TLS handshake failed: the target's certificate is not signed by {trusted}, and the target sent no intermediate certificate: its certificate file may lack the chain");
    }
    let words = crate::tunnel::tls::rustls_reason(e);
    match (e, ca_file) {
        (rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature), Some(ca)) => {
            format!(
                "TLS handshake failed: the target's certificate is not signed by a CA in {} (tls.ca_file)",
                ca.display()
            )
        }
        (rustls::Error::InvalidCertificate(_), Some(ca)) => format!(
            "TLS handshake failed: {words} (checked against tls.ca_file {})",
            ca.display()
        ),
        _ => format!("TLS handshake failed: {words}"),
    }
}

/// The target's answer to a scrape, its body streamed to the gateway.
async fn fetch_answer(
    shared: &Arc<Shared>,
    route: &Route,
    url: &Uri,
    client: &super::targets::HttpClient,
    req: Request<Incoming>,
    timeout: Duration,
    start: Instant,
) -> Response<Body> {
    let deadline = crate::http_util::deadline(start, timeout);
    let (parts, body) = req.into_parts();
    // Read whole before the target is contacted: one too large is refused, never sent in part.
    let body = match tokio::time::timeout_at(deadline, whole_body(&parts.headers, body)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            count(shared, &route.name, "bad_request");
            return e.into_response("agent");
        }
        Err(_) => {
            count(shared, &route.name, "timeout");
            let what = format!(
                "target {:?} (its request body was still arriving)",
                route.name
            );
            return ScrapeError::Timeout { what, timeout }.into_response("agent");
        }
    };
    let target_req = match target_request(url, parts, body) {
        Ok(r) => r,
        Err(e) => {
            count(shared, &route.name, "bad_request");
            return e.into_response("agent");
        }
    };
    let sent = tokio::time::timeout_at(deadline, client.request(target_req)).await;
    shared
        .metrics
        .scrape_duration
        .get_or_create(&TargetNameLabels {
            target: route.name.clone(),
        })
        .observe(start.elapsed().as_secs_f64());
    let resp = match sent {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            count(shared, &route.name, "error");
            let reason = fetch_failure(route, &e);
            return ScrapeError::Target {
                target: route.name.clone(),
                reason,
            }
            .into_response("agent");
        }
        Err(_) => {
            count(shared, &route.name, "timeout");
            let what = format!("target {:?}", route.name);
            return ScrapeError::Timeout { what, timeout }.into_response("agent");
        }
    };
    if let Some(location) = elsewhere(&resp) {
        count(shared, &route.name, "error");
        warn!(scrape_target = %route.name, status = resp.status().as_u16(), %location, "target redirected to another URL: answered 502 (ferry does not follow redirects; set the target URL to the final location)");
        return ScrapeError::Target {
            target: route.name.clone(),
            reason: REDIRECTED.into(),
        }
        .into_response("agent");
    }
    let result = if resp.status().is_success() {
        "ok"
    } else {
        "http_error"
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // Only ferry says which side of it failed; a target cannot pass for the agent or gateway.
    parts.headers.remove(ERROR_SOURCE_HEADER);
    parts.version = http::Version::HTTP_2;
    let size = header_list_size(&parts.headers, &[parts.status.as_str()]);
    if size > MAX_HEADER_BYTES {
        // Sent on, they would make the gateway close the tunnel, failing every other scrape.
        count(shared, &route.name, "error");
        return ScrapeError::Target {
            target: route.name.clone(),
            reason: format!(
                "response headers of {size} bytes are more than the tunnel carries ({MAX_HEADER_BYTES})"
            ),
        }
        .into_response("agent");
    }
    // The agent sets no size limit of its own: the gateway's (web.max_scrape_bytes) applies.
    let body = match read_ahead(boxed(body), deadline, u64::MAX).await {
        Ok(body) => body,
        Err(ReadAheadError::Deadline) => {
            count(shared, &route.name, "timeout");
            let what = format!("target {:?}", route.name);
            return ScrapeError::Timeout { what, timeout }.into_response("agent");
        }
        Err(e @ (ReadAheadError::Broke(_) | ReadAheadError::TooLarge(_))) => {
            let reason = e.to_string();
            count(shared, &route.name, "error");
            warn!(scrape_target = %route.name, error = %reason, "target body broke before any of it was sent");
            return ScrapeError::Target {
                target: route.name.clone(),
                reason: format!("{BROKE_EARLY}: {reason}"),
            }
            .into_response("agent");
        }
    };
    // The result is known only when the body has passed: a target can fail halfway through.
    let (done, name) = (shared.clone(), route.name.clone());
    let on_finish = Box::new(move |bytes: u64, end: BodyEnd| {
        let result = match end {
            BodyEnd::Complete => result,
            BodyEnd::Dropped => {
                debug!(scrape_target = %name, bytes, "the gateway cancelled the scrape before the end of the body");
                "cancelled"
            }
            BodyEnd::Deadline => {
                warn!(scrape_target = %name, bytes, ?timeout, "scrape timeout passed while the target body was still streaming: body cut short");
                "timeout"
            }
            BodyEnd::Failed(_) | BodyEnd::TooLarge(_) => {
                warn!(scrape_target = %name, bytes, error = %end, "target body broke mid-scrape");
                "error"
            }
        };
        count(&done, &name, result);
    });
    let body = BoundedBody::new(body, deadline, u64::MAX, on_finish);
    Response::from_parts(parts, boxed(body))
}

/// Why a redirect to another URL is refused: the scraper would follow it through the gateway
/// with the target's host for an agent id (an internal address shown, a 503 at best), and it
/// must not see where it points.
const REDIRECTED: &str = "redirected to another URL; ferry does not follow redirects: set the target URL to the final location";

/// The `Location` of a redirect that leaves the target's own host: absolute (`http://…`) or
/// scheme-relative (`//host/…`). A relative one (`/metrics/`) stays with the target, and
/// through the gateway.
fn elsewhere<B>(resp: &Response<B>) -> Option<&str> {
    if !resp.status().is_redirection() {
        return None;
    }
    let location = resp.headers().get(header::LOCATION)?;
    let text = std::str::from_utf8(location.as_bytes()).unwrap_or("(not text)");
    let trimmed = text.trim_start();
    // RFC 3986 §3.1: a scheme is a letter, then letters, digits, `+`, `-` or `.`, then `:`.
    let scheme = trimmed.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    (scheme || trimmed.starts_with("//")).then_some(text)
}

/// The scrape's request body, whole: up to [`MAX_REQUEST_BODY`], the gateway's own limit. A
/// larger one is refused as the gateway refuses it (400), announced or not.
async fn whole_body(headers: &http::HeaderMap, body: Incoming) -> Result<Bytes, ScrapeError> {
    use http_body_util::BodyExt;
    let too_large = || {
        ScrapeError::BadRequest(format!(
            "request body larger than {MAX_REQUEST_BODY} bytes, the most the agent forwards (a scrape has no body)"
        ))
    };
    let announced = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .filter_map(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .max();
    if announced.is_some_and(|n| n > MAX_REQUEST_BODY as u64) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(body, MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ScrapeError::BadRequest(format!(
            "request body: {}",
            one_line(&*e)
        ))),
    }
}

/// The request sent to the target: its own URL (scheme, host, port, path), the scrape's query
/// appended to the URL's, the scrape's end-to-end headers, its body as read whole.
fn target_request(
    url: &Uri,
    mut parts: http::request::Parts,
    body: Bytes,
) -> Result<Request<Body>, ScrapeError> {
    if url.query().is_some() && parts.uri.query().is_some_and(|q| q.contains(';')) {
        // Some parsers (Python's before 3.10, Go's before 1.17) split on ';' as on '&', which
        // would let `?x=1;target=evil` past the check of fixed parameters below.
        return Err(ScrapeError::BadRequest(
            "';' in the query is refused for a target whose URL fixes parameters".into(),
        ));
    }
    let extra = parts
        .uri
        .query()
        .and_then(|q| unfixed_params(url.query(), q));
    let query = match (url.query(), extra) {
        (Some(a), Some(b)) => Some(format!("{a}&{b}")),
        (Some(a), None) => Some(a.to_owned()),
        (None, Some(b)) => Some(b),
        (None, None) => None,
    };
    let base = format!(
        "{}://{}{}",
        url.scheme_str().unwrap_or("http"),
        url.authority().map_or("", |a| a.as_str()),
        url.path()
    );
    let full_uri = match query {
        Some(q) => format!("{base}?{q}"),
        None => base,
    };
    parts.uri = full_uri
        .parse()
        .map_err(|e| ScrapeError::BadRequest(format!("cannot build target URI: {e}")))?;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::EXPECT);
    // The body's length is known now: hyper states it from the body itself.
    parts.headers.remove(http::header::CONTENT_LENGTH);
    // A body that a target does not read (a GET-only exporter answering a POST) would be taken
    // for the next request on a kept-alive connection, and its answer for the next scrape's: such
    // a connection is not reused.
    if parts.method != Method::GET && parts.method != Method::HEAD {
        parts
            .headers
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(Request::from_parts(parts, full(body)))
}

/// The scrape's query parameters that the target's URL does not set itself (`None` if none is
/// left). A parameter fixed in the URL (`probe?target=db1&module=tcp`) cannot be given again by
/// the scrape: an exporter reading the last value would otherwise fetch what the scrape names.
/// Names compare percent-decoded, as the exporter reads them.
fn unfixed_params(fixed: Option<&str>, scrape: &str) -> Option<String> {
    let name = |pair: &str| {
        let raw = pair.split('=').next().unwrap_or("").replace('+', " ");
        percent_encoding::percent_decode_str(&raw)
            .decode_utf8_lossy()
            .into_owned()
    };
    let fixed: Vec<String> = fixed
        .map(|q| q.split('&').filter(|p| !p.is_empty()).map(name).collect())
        .unwrap_or_default();
    let kept: Vec<&str> = scrape
        .split('&')
        .filter(|p| !p.is_empty() && !fixed.contains(&name(p)))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Every `result` label [`count`] sets.
const SCRAPE_RESULTS: [&str; 7] = [
    "ok",
    "http_error",
    "timeout",
    "error",
    "not_found",
    "bad_request",
    "cancelled",
];

/// Drops the series of a target no longer listed.
pub(super) fn forget_target(shared: &Shared, target: &str) {
    let m = &shared.metrics;
    for result in SCRAPE_RESULTS {
        m.scrapes.remove(&TargetResultLabels {
            target: target.to_owned(),
            result: result.to_owned(),
        });
    }
    m.scrape_duration.remove(&TargetNameLabels {
        target: target.to_owned(),
    });
}

fn count(shared: &Shared, target: &str, result: &str) {
    debug_assert!(
        SCRAPE_RESULTS.contains(&result),
        "{result} missing from SCRAPE_RESULTS"
    );
    shared
        .metrics
        .scrapes
        .get_or_create(&TargetResultLabels {
            target: target.to_owned(),
            result: result.to_owned(),
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_redirect_that_leaves_the_target_is_refused() {
        let redirect = |status: u16, location: &str| {
            Response::builder()
                .status(status)
                .header(header::LOCATION, location)
                .body(())
                .unwrap()
        };
        for away in [
            "http://127.0.0.1:9100/metrics",
            "HTTPS://node.example/",
            "//127.0.0.1:9100/metrics",
            " //evil/",
        ] {
            assert_eq!(elsewhere(&redirect(302, away)), Some(away), "{away}");
        }
        for stays in ["/metrics/", "metrics?x=1", "./m", "/a:b", "?x=http://y"] {
            assert_eq!(elsewhere(&redirect(301, stays)), None, "{stays}");
        }
        assert_eq!(elsewhere(&redirect(200, "http://x/")), None);
    }

    #[test]
    fn timeout_is_bounded_by_the_agents_maximum() {
        let max = Duration::from_secs(30);
        assert_eq!(
            scrape_timeout(Some(&HeaderValue::from_static("9.5")), max),
            Duration::from_millis(9500)
        );
        assert_eq!(
            scrape_timeout(Some(&HeaderValue::from_static("300")), max),
            max
        );
        assert_eq!(scrape_timeout(None, max), max);
    }
}
