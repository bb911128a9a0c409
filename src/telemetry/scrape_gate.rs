//! A bound on the `/metrics` encodings of a registry that is expensive to encode: with the host
//! connection collector, every encoding dumps every TCP socket of the host (20k sockets: seconds
//! and hundreds of MB). Parallel scrapes used to run a dump each.
//!
//! [`ScrapeGate`] lets one encoding run at a time. A request that comes while one runs waits for
//! it and answers with its result (the dump finished after the request came, so it is as fresh
//! as the request can ask for); past [`MAX_WAITING`] waiting requests the next are answered 503,
//! as node_exporter does past `--web.max-requests`, and counted in
//! `ferry_host_tcp_collector_refusals_total`. A request whose client goes away while it waits is
//! dropped by the HTTP server before it starts a dump.

use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderValue, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

use crate::http_util::{text_response, Body};

/// Requests that may wait for the encoding in progress; the next are refused.
pub const MAX_WAITING: usize = 4;

/// One registry's gate; clones share it.
#[derive(Clone, Debug)]
pub struct ScrapeGate {
    /// A permit per request admitted, the one encoding included.
    admitted: Arc<Semaphore>,
    /// The last encoding; locked while one runs.
    latest: Arc<Mutex<Option<Encoded>>>,
    refusals: Counter,
}

#[derive(Debug)]
struct Encoded {
    finished: Instant,
    text: Arc<String>,
}

/// Why a gated request gets no exposition.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// An encoding runs and [`MAX_WAITING`] requests wait for it already.
    #[error("too many /metrics requests at once: {MAX_WAITING} are waiting already for the host's TCP socket dump in progress; retry later")]
    Busy,
    /// The encoding panicked.
    #[error("metrics encoding failed")]
    Failed,
}

impl GateError {
    /// The answer the client gets: 503 with the reason when busy (Prometheus marks the scrape
    /// failed and retries at the next interval), 500 without internals on a failure.
    pub fn into_response(self) -> Response<Body> {
        let status = match self {
            GateError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            GateError::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut resp = text_response(status, &self.to_string());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // The dump in progress ends within seconds: a client that honours Retry-After (a
            // health checker, curl --retry) comes back after it rather than at once.
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl Default for ScrapeGate {
    fn default() -> Self {
        ScrapeGate::new()
    }
}

impl ScrapeGate {
    /// A gate with nothing encoded yet.
    pub fn new() -> ScrapeGate {
        ScrapeGate {
            admitted: Arc::new(Semaphore::new(1 + MAX_WAITING)),
            latest: Arc::new(Mutex::new(None)),
            refusals: Counter::default(),
        }
    }

    /// Registers `ferry_host_tcp_collector_refusals_total` in `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "ferry_host_tcp_collector_refusals",
            format!("/metrics requests answered 503 because a socket dump of the host connection collector was running and {MAX_WAITING} requests were waiting for it already"),
            self.refusals.clone(),
        );
    }

    /// The OpenMetrics text of `registry(owner)`: encoded now on the blocking pool, or the
    /// encoding that finished while this request waited for it.
    pub async fn exposition<R>(
        &self,
        owner: Arc<R>,
        registry: fn(&R) -> &Registry,
    ) -> Result<Arc<String>, GateError>
    where
        R: Send + Sync + 'static,
    {
        let Ok(ticket) = self.admitted.clone().try_acquire_owned() else {
            self.refusals.inc();
            tracing::debug!("/metrics refused: {}", GateError::Busy);
            return Err(GateError::Busy);
        };
        let arrived = Instant::now();
        let mut latest = self.latest.clone().lock_owned().await;
        if let Some(done) = latest.as_ref().filter(|done| done.finished >= arrived) {
            return Ok(done.text.clone());
        }
        // The lock and the ticket go with the encoding, not with this request: a client gone
        // mid-dump must not let the next request start a second dump beside it.
        tokio::task::spawn_blocking(move || {
            let _ticket: OwnedSemaphorePermit = ticket;
            let text = Arc::new(super::encode_registry(registry(&owner)));
            *latest = Some(Encoded {
                finished: Instant::now(),
                text: text.clone(),
            });
            text
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "encoding metrics failed");
            GateError::Failed
        })
    }
}
