//! Prometheus-facing proxy: an absolute-form scrape `GET http://<agent>:<port><path>` is routed to
//! the agent by host and forwarded through its tunnel; the agent picks the target by port and path.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, Uri};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::h2conn;
use super::registry::{AgentHandle, ScrapeSlot};
use super::State;
use crate::config::ScrapeLimits;
use crate::http_util::{
    body_on_get, boxed, read_ahead, strip_hop_by_hop, Body, BodyEnd, BoundedBody, ReadAheadError,
};
use crate::scrape_error::{one_line, ScrapeError, BROKE_EARLY, MAX_SCRAPE_BYTES_SETTING};
use crate::telemetry::{status_class, ScrapeLabels};
use crate::tunnel::handshake::canonical_agent_id;
use crate::tunnel::{header_list_size, MAX_HEADER_BYTES, SCRAPE_TIMEOUT_HEADER};

/// The agent and target label of a scrape not routed that far.
pub(super) const UNKNOWN: &str = crate::tunnel::handshake::RESERVED_AGENT_ID;

/// Query parameter PushProx clients add to pick the scheme; the target's own URL decides here.
const SCHEME_PARAM: &str = "_scheme";

/// The deadlines of one scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Timeouts {
    /// What Prometheus allows (clamped).
    pub(crate) scrape: Duration,
    /// When the gateway gives up, a little before Prometheus.
    pub(crate) gateway: Duration,
    /// What the agent is told, a little before the gateway.
    pub(crate) agent: Duration,
}

/// Clamps Prometheus's timeout header and derives the gateway's and the agent's deadlines from it.
pub(crate) fn timeouts(header: Option<&HeaderValue>, limits: &ScrapeLimits) -> Timeouts {
    let asked = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.min(limits.max_timeout.as_secs_f64())));
    let scrape = asked
        .unwrap_or(limits.default_timeout)
        .min(limits.max_timeout);
    let margin = limits.margin.min(scrape / 4);
    Timeouts {
        scrape,
        gateway: scrape - margin / 2,
        agent: scrape - margin,
    }
}

/// Shortest timeout worth giving the agent (the timeout header has millisecond precision).
const MIN_AGENT_TIMEOUT: Duration = Duration::from_millis(1);

/// The port text of `uri`'s authority when it is not a port of 1-65535 (`0`, `65536`, `abc`):
/// `http`'s `Uri` reads the last two as no port at all, which would mean port 80.
fn unparsable_port(uri: &Uri) -> Option<String> {
    let port = crate::http_util::written_port(uri.authority()?.as_str())?;
    matches!(uri.port_u16(), None | Some(0)).then(|| port.to_owned())
}

/// Removes `_scheme` from a query string; `None` if nothing is left.
pub(crate) fn clean_query(query: Option<&str>) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(SCHEME_PARAM))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Forwards one scrape and answers with the target's response or the mapped error.
pub(crate) async fn scrape(state: &Arc<State>, req: Request<Body>) -> Response<Body> {
    let start = Instant::now();
    // Unknown agent ids are not bounded until connected: they are counted under "unknown".
    // Dropped before the answer (the client went away), it counts the scrape as cancelled.
    let mut unanswered = Unanswered {
        state: state.clone(),
        start,
        labels: Some(unknown_labels()),
    };
    let result = forward(state, req, start, unanswered.labels_mut()).await;
    let labels = unanswered.answered();
    match result {
        Ok(resp) => resp,
        Err(err) => {
            if let ScrapeError::TooLarge { .. } = err {
                // The gateway's own setting: Prometheus shows only the status.
                warn!(agent = %labels.agent, scrape_target = %labels.target, reason = %err, "scrape refused at the gateway: body too large");
            } else {
                debug!(error = %err, kind = err.kind(), "scrape failed at the gateway");
            }
            let resp = err.into_response("gateway");
            if let Some(agent) = state.registry.get(&labels.agent) {
                agent.record_scrape(resp.status().as_u16(), start.elapsed(), 0);
            }
            record(
                state,
                labels,
                status_class(resp.status()),
                start.elapsed(),
                0,
            );
            resp
        }
    }
}

/// The labels of a scrape not routed (yet).
fn unknown_labels() -> ScrapeLabels {
    ScrapeLabels {
        agent: UNKNOWN.into(),
        target: UNKNOWN.into(),
        status_class: String::new(),
    }
}

/// The status class of a scrape its client gave up on (a Prometheus timeout, `curl -m`) before
/// its answer was whole: nothing more reached anyone.
const CANCELLED: &str = "cancelled";

/// A scrape not answered yet: dropped so (its client went away and hyper dropped the request),
/// it is counted as [`CANCELLED`].
struct Unanswered {
    state: Arc<State>,
    start: Instant,
    labels: Option<ScrapeLabels>,
}

impl Unanswered {
    fn labels_mut(&mut self) -> &mut ScrapeLabels {
        self.labels.get_or_insert_with(unknown_labels)
    }

    /// Answered after all: the labels, for whoever counts the answer.
    fn answered(mut self) -> ScrapeLabels {
        self.labels.take().unwrap_or_else(unknown_labels)
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(labels) = self.labels.take() {
            debug!(agent = %labels.agent, scrape_target = %labels.target, "the client went away before the scrape was answered");
            record(&self.state, labels, CANCELLED, self.start.elapsed(), 0);
        }
    }
}

/// Why a scrape URL without a host is refused.
const NO_AGENT_ID: &str =
    "no agent id in the URL: its host must be the agent id (http://node-1:9100/metrics)";

struct Route {
    agent: Arc<AgentHandle>,
    target: String,
    port: u16,
}

/// Picks the agent by host and checks its published target list for the port and path.
fn route(state: &State, uri: &Uri, labels: &mut ScrapeLabels) -> Result<Route, ScrapeError> {
    // `http://:9100/metrics` has a host, an empty one.
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| ScrapeError::BadRequest(NO_AGENT_ID.into()))?;
    if let Some(bad) = unparsable_port(uri) {
        return Err(ScrapeError::BadRequest(format!(
            "{bad:?} is not a port (1-65535)"
        )));
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let agent = state
        .registry
        .get(&canonical_agent_id(host))
        .ok_or_else(|| ScrapeError::AgentNotConnected(host.to_owned()))?;
    labels.agent = agent.id.clone();
    let targets = agent.targets();
    let target = targets
        .find(port, uri.path())
        .ok_or_else(|| ScrapeError::NoSuchTarget {
            agent: host.to_owned(),
            port,
            path: uri.path().to_owned(),
        })?;
    labels.target = target.name.clone();
    Ok(Route {
        target: target.name.clone(),
        agent,
        port,
    })
}

async fn forward(
    state: &Arc<State>,
    req: Request<Body>,
    start: Instant,
    labels: &mut ScrapeLabels,
) -> Result<Response<Body>, ScrapeError> {
    if !matches!(*req.method(), Method::GET | Method::HEAD | Method::POST) {
        return Err(ScrapeError::Method(req.method().clone()));
    }
    let route = route(state, req.uri(), labels)?;
    if body_on_get(&req) {
        return Err(ScrapeError::BodyOnGet(req.method().clone()));
    }
    let limit = state.config.max_concurrent_scrapes;
    let slot = route
        .agent
        .scrape_slot(limit)
        .ok_or_else(|| ScrapeError::AgentBusy {
            agent: route.agent.id.clone(),
            limit,
        })?;
    let limits = &state.config.scrape;
    let t = timeouts(req.headers().get(SCRAPE_TIMEOUT_HEADER), limits);
    if t.agent < MIN_AGENT_TIMEOUT {
        // Less than the agent could use: answered now rather than sent to fetch in vain.
        let what = format!("agent {:?} target {:?}", route.agent.id, route.target);
        return Err(ScrapeError::Timeout {
            what,
            timeout: t.scrape,
        });
    }
    let deadline = crate::http_util::deadline(start, t.gateway);
    let head_only = req.method() == Method::HEAD;
    let req = tunnel_request(req, &route, t.agent)?;
    let sender = route.agent.sender();
    let resp = match tokio::time::timeout_at(deadline, h2conn::send(&sender, req)).await {
        Err(_) => {
            let what = format!("agent {:?} target {:?}", route.agent.id, route.target);
            return Err(ScrapeError::Timeout {
                what,
                timeout: t.scrape,
            });
        }
        Ok(Err(e @ h2conn::SendError::Body(_))) => {
            return Err(ScrapeError::BadRequest(e.to_string()));
        }
        // The agent sent its head and reset the stream at once (the target broke right after
        // its head): h2 may report the reset before the head, in the words "unexpected
        // internal error".
        Ok(Err(h2conn::SendError::H2(e))) if e.is_reset() && e.is_remote() => {
            return Err(ScrapeError::Tunnel {
                agent: route.agent.id.clone(),
                reason: "the agent abandoned the scrape (stream reset by the agent: the target's answer broke or the agent's scrape timeout passed; see the agent's log)".into(),
            });
        }
        Ok(Err(e)) => {
            let reason = one_line(&e);
            return Err(ScrapeError::Tunnel {
                agent: route.agent.id.clone(),
                reason,
            });
        }
        Ok(Ok(resp)) => resp,
    };
    let (parts, body) = resp.into_parts();
    let limit = state.config.scrape.max_body_bytes;
    let too_large = |length| ScrapeError::TooLarge {
        target: route.target.clone(),
        agent: route.agent.id.clone(),
        length,
        limit,
    };
    // Cut after its head, a body too large would reach Prometheus as a bare EOF (or nothing at
    // all, which Go's client retries): a length known to be over the limit is refused first.
    match content_length(&parts.headers) {
        Some(length) if length > limit && !head_only && !http_body::Body::is_end_stream(&body) => {
            return Err(too_large(Some(length)));
        }
        _ => {}
    }
    let body = boxed(http_body_util::BodyExt::map_err(body, agent_body_error));
    let body = match read_ahead(body, deadline, limit).await {
        Ok(body) => body,
        Err(ReadAheadError::Deadline) => {
            let what = format!("agent {:?} target {:?}", route.agent.id, route.target);
            return Err(ScrapeError::Timeout {
                what,
                timeout: t.scrape,
            });
        }
        Err(ReadAheadError::TooLarge(_)) => return Err(too_large(None)),
        Err(ReadAheadError::Broke(reason)) => {
            return Err(ScrapeError::Tunnel {
                agent: route.agent.id.clone(),
                reason: format!("{BROKE_EARLY}: {reason}"),
            });
        }
    };
    Ok(stream_back(
        state,
        Response::from_parts(parts, body),
        slot,
        labels.clone(),
        start,
        deadline,
    ))
}

/// The scrape as sent through the tunnel: `:authority` is `<agent>:<port>`, hop-by-hop headers
/// and `_scheme` are gone, the timeout header is what the agent must respect.
fn tunnel_request(
    req: Request<Body>,
    route: &Route,
    agent_timeout: Duration,
) -> Result<Request<Body>, ScrapeError> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path();
    let uri = match clean_query(parts.uri.query()) {
        Some(q) => format!("http://{}:{}{path}?{q}", route.agent.id, route.port),
        None => format!("http://{}:{}{path}", route.agent.id, route.port),
    };
    parts.uri = uri
        .parse()
        .map_err(|e| ScrapeError::BadRequest(format!("cannot rebuild request URI: {e}")))?;
    parts.version = http::Version::HTTP_2;
    strip_hop_by_hop(&mut parts.headers);
    // A body is read whole before it goes through the tunnel: the client had its 100 Continue.
    parts.headers.remove(http::header::EXPECT);
    let timeout = HeaderValue::from_str(&format!("{:.3}", agent_timeout.as_secs_f64()))
        .map_err(|e| ScrapeError::BadRequest(e.to_string()))?;
    parts.headers.insert(SCRAPE_TIMEOUT_HEADER, timeout);
    let pseudo = [
        parts.method.as_str(),
        "http",
        parts.uri.authority().map_or("", |a| a.as_str()),
        parts.uri.path_and_query().map_or("/", |p| p.as_str()),
    ];
    let size = header_list_size(&parts.headers, &pseudo);
    if size > MAX_HEADER_BYTES {
        return Err(ScrapeError::HeadersTooLarge {
            size,
            limit: MAX_HEADER_BYTES,
        });
    }
    Ok(Request::from_parts(parts, body))
}

/// The agent's response, streamed to Prometheus within the deadline and the size limit.
fn stream_back(
    state: &Arc<State>,
    resp: Response<Body>,
    slot: ScrapeSlot,
    labels: ScrapeLabels,
    start: Instant,
    deadline: Instant,
) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = http::Version::HTTP_11;
    let status = parts.status;
    let length = content_length(&parts.headers);
    let done_state = state.clone();
    let on_finish = Box::new(move |bytes: u64, end: BodyEnd| {
        let elapsed = start.elapsed();
        let class = match &end {
            // hyper stops reading a body once its Content-Length has passed, which may be
            // before the agent's end of stream arrives.
            BodyEnd::Complete => status_class(status),
            BodyEnd::Dropped if length == Some(bytes) => status_class(status),
            BodyEnd::Dropped => {
                debug!(agent = %labels.agent, scrape_target = %labels.target, bytes, "the client went away before the end of the body");
                CANCELLED
            }
            BodyEnd::TooLarge(_) => {
                // A body without a length, found too large after its head was sent: cutting it
                // is all that is left.
                warn!(agent = %labels.agent, scrape_target = %labels.target, %end, bytes, fix = MAX_SCRAPE_BYTES_SETTING, "scrape body cut at the size limit after the response head was sent (it gave no Content-Length)");
                "aborted"
            }
            BodyEnd::Deadline | BodyEnd::Failed(_) => {
                // Prometheus got the head and part of the body: a failed scrape, which the
                // status class alone would count as a success.
                warn!(agent = %labels.agent, scrape_target = %labels.target, %end, bytes, "scrape body broke after the response head was sent");
                "aborted"
            }
        };
        let shown = if class == "aborted" {
            502
        } else {
            status.as_u16()
        };
        slot.agent().record_scrape(shown, elapsed, bytes);
        record(&done_state, labels, class, elapsed, bytes);
        // The agent's place is free once the body has ended.
        drop(slot);
    });
    let body = BoundedBody::new(
        body,
        deadline,
        state.config.scrape.max_body_bytes,
        on_finish,
    );
    Response::from_parts(parts, boxed(body))
}

/// The `Content-Length` of a response, if it has a readable one.
fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
}

/// Why the agent's response body broke, in words: a stream the agent reset is one it ended on
/// purpose, which h2 would call an "unexpected internal error".
fn agent_body_error(e: h2::Error) -> crate::http_util::BoxError {
    if e.is_reset() && e.is_remote() {
        "the agent ended the body (stream reset by the agent: its scrape timeout passed or the target failed; see the agent's log)".into()
    } else {
        e.into()
    }
}

/// Counts one finished scrape: by agent, target and status class; its duration and bytes. One
/// whose agent went while it was in flight (its series went with it) is counted under
/// `agent="unknown"`, like a scrape of an agent not connected.
fn record(state: &State, mut labels: ScrapeLabels, class: &str, elapsed: Duration, bytes: u64) {
    labels.status_class = class.to_owned();
    if labels.agent != UNKNOWN && state.registry.count_scrape(&labels, elapsed, bytes) {
        return;
    }
    labels.agent = UNKNOWN.into();
    labels.target = UNKNOWN.into();
    state.metrics.record_scrape(&labels, elapsed, bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ScrapeLimits {
        ScrapeLimits {
            default_timeout: Duration::from_secs(10),
            max_timeout: Duration::from_secs(60),
            margin: Duration::from_millis(500),
            max_body_bytes: 1 << 20,
        }
    }

    #[test]
    fn timeout_header_is_clamped_and_the_agent_gives_up_first() {
        let t = timeouts(Some(&HeaderValue::from_static("15")), &limits());
        assert_eq!(t.scrape, Duration::from_secs(15));
        assert_eq!(t.agent, Duration::from_millis(14_500));
        assert!(t.agent < t.gateway && t.gateway < t.scrape);
        assert_eq!(
            timeouts(Some(&HeaderValue::from_static("600")), &limits()).scrape,
            Duration::from_secs(60)
        );
        assert_eq!(timeouts(None, &limits()).scrape, Duration::from_secs(10));
        assert_eq!(
            timeouts(Some(&HeaderValue::from_static("nan")), &limits()).scrape,
            Duration::from_secs(10)
        );
        assert_eq!(
            timeouts(Some(&HeaderValue::from_static("-1")), &limits()).scrape,
            Duration::from_secs(10)
        );
        let short = timeouts(Some(&HeaderValue::from_static("1")), &limits());
        assert_eq!(
            short.agent,
            Duration::from_millis(750),
            "margin is at most a quarter of a short timeout"
        );
    }

    #[test]
    fn scheme_parameter_is_removed_and_the_rest_kept() {
        assert_eq!(clean_query(Some("_scheme=https")), None);
        assert_eq!(
            clean_query(Some("module=http_2xx&_scheme=http&target=x")).as_deref(),
            Some("module=http_2xx&target=x")
        );
        assert_eq!(clean_query(Some("a=1")).as_deref(), Some("a=1"));
        assert_eq!(clean_query(None), None);
    }
}
