//! One structured access-log line and one set of metric updates per request or tunnel.
//! Payload contents are never logged.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::telemetry::{
    status_class, DirectionLabels, EgressMetrics, EgressRequestLabels, ReasonLabels,
};

/// What happened to one request or CONNECT tunnel.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// The client's address.
    pub client: IpAddr,
    /// The name the client authenticated as (`bearer` for a bearer token), or `-`.
    pub user: String,
    /// The rule that matched, or `-`.
    pub rule: String,
    /// `host:port` asked for.
    pub upstream: String,
    /// The method.
    pub method: String,
    /// The status sent to the client.
    pub status: StatusCode,
    /// Request body bytes from the client (tunnel: client → upstream).
    pub bytes_in: u64,
    /// Response body bytes to the client (tunnel: upstream → client).
    pub bytes_out: u64,
    /// When the request arrived.
    pub start: Instant,
    /// `allowed`, `refused`, `error` (the upstream failed), or [`ABANDONED`] until the proxy
    /// has decided.
    pub decision: &'static str,
    /// Refusal kind (bounded), or empty.
    pub reason_kind: &'static str,
    /// One-line reason, or empty.
    pub reason: String,
    /// Whether dropping the record still owes its line (see the `Drop` impl).
    armed: bool,
    /// Where a record dropped unwritten is counted.
    metrics: Option<EgressMetrics>,
}

/// The decision of a request whose client went away (or the proxy stopped) before the proxy let
/// it through or refused it: while the rule was chosen, or the body read and checked.
const ABANDONED: &str = "abandoned";

/// A record dropped before its line was written — the client went away while the upstream was
/// still answering, or the proxy stopped at the end of its grace period — still gets one: an
/// access log must not lose a request that may have reached the upstream.
impl Drop for AccessRecord {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            self.status = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
            if self.reason.is_empty() {
                self.reason =
                    "unfinished: the client went away or the proxy stopped before the answer"
                        .into();
            }
            let duration = self.start.elapsed();
            self.log(duration);
            if let Some(metrics) = self.metrics.take() {
                self.count(&metrics, duration);
            }
        }
    }
}

impl AccessRecord {
    /// A record for a request from `client` to `upstream` with `method`, not yet decided: see
    /// [`AccessRecord::allow`].
    pub fn new(client: IpAddr, upstream: String, method: &http::Method) -> Self {
        Self {
            client,
            user: "-".into(),
            rule: "-".into(),
            upstream,
            method: method.as_str().to_owned(),
            status: StatusCode::OK,
            bytes_in: 0,
            bytes_out: 0,
            start: Instant::now(),
            decision: ABANDONED,
            reason_kind: "",
            reason: String::new(),
            armed: true,
            metrics: None,
        }
    }

    /// The proxy lets the request through: it goes upstream, or the tunnel opens.
    pub fn allow(&mut self) {
        self.decision = "allowed";
    }

    /// Counts the record in `metrics` also if it is dropped before its line is written.
    pub fn counted_in(mut self, metrics: &EgressMetrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// This record will not be logged (a request for the proxy's own endpoints, a copy that
    /// another record stands for).
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// A record for a request the HTTP parser refused: method and destination unknown.
    pub fn unparsed(client: IpAddr) -> Self {
        let mut record = Self::new(client, "-".into(), &http::Method::GET);
        record.method = "-".into();
        record
    }

    /// Writes the access-log line and updates the metrics.
    pub fn emit(mut self, metrics: &EgressMetrics) {
        self.armed = false;
        let duration = self.start.elapsed();
        self.log(duration);
        self.count(metrics, duration);
        if self.decision == "allowed" {
            // What went out (a refused body never did) and came back.
            let bytes = |direction: &str| {
                metrics.bytes.get_or_create(&DirectionLabels {
                    direction: direction.into(),
                })
            };
            bytes("in").inc_by(self.bytes_in);
            bytes("out").inc_by(self.bytes_out);
        }
    }

    /// Writes the access-log line: `duration` is the request's, or a tunnel's whole life.
    pub(crate) fn log(&self, duration: Duration) {
        // Whole microseconds: the line shows 1.331, not 1.3314780000000002.
        let duration_ms = (duration.as_secs_f64() * 1e6).round() / 1e3;
        tracing::info!(
            target: "ferry::egress::access",
            client = %self.client,
            user = %self.user,
            rule = %self.rule,
            upstream = %self.upstream,
            method = %self.method,
            status = self.status.as_u16(),
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            duration_ms,
            decision = self.decision,
            reason = %self.reason,
            "egress"
        );
    }

    /// Counts the request (a tunnel when it opens): by rule, method, status class and decision,
    /// the refusal's kind, and `duration` in the histogram.
    pub(crate) fn count(&self, metrics: &EgressMetrics, duration: Duration) {
        let method = match self.method.as_str() {
            "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS" | "CONNECT" => {
                self.method.clone()
            }
            _ => "other".into(),
        };
        metrics
            .requests
            .get_or_create(&EgressRequestLabels {
                rule: self.rule.clone(),
                method,
                status_class: status_class(self.status).into(),
                decision: self.decision.into(),
            })
            .inc();
        if !self.reason_kind.is_empty() {
            metrics
                .rejections
                .get_or_create(&ReasonLabels {
                    reason: self.reason_kind.into(),
                })
                .inc();
        }
        metrics.duration.observe(duration.as_secs_f64());
    }
}
