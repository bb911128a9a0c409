//! The egress role: an HTTP forward proxy (absolute-form and CONNECT) that lets through only
//! allowed clients, allowed destinations and valid payloads, and logs and counts what passed.
//!
//! - [`policy`]: client allowlist, destination rules, special-purpose addresses, name resolution.
//! - [`validate`]: payload checks per rule.
//! - [`refusal`]: the one mapping of refusals to status codes and reasons.

// Inside:
// - `connector`: resolve, check, connect to the checked address.
// - `forward`: absolute-form requests. `connect`: CONNECT tunnels, relayed with `splice(2)` on
//   Linux (`splice`).
// - `access`: the access log line and metrics of each request.
// - `credentials`: `Proxy-Authorization` against the credentials file; a reload closes the
//   tunnels whose credential it no longer accepts.
// - `budget`: the process-wide bound on request body bytes held in memory.
// - `json_scan`: the fast JSON well-formedness pass; `json_strings`: a JSON body's strings
//   unescaped, for the deny patterns; `json_tree`: the tree a JSON Schema checks, built within
//   a memory limit (all used by `validate`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, Method, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::TokensFileError;
use crate::config::EgressConfig;
use crate::endpoints::OwnEndpoints;
use crate::http_util::Body;
use crate::telemetry::{ConnectionMetrics, EgressMetrics};

mod access;
mod budget;
mod connect;
mod connector;
mod credentials;
mod forward;
mod framing;
mod json_scan;
mod json_strings;
mod json_tree;
pub mod policy;
pub mod refusal;
#[cfg(target_os = "linux")]
mod splice;
pub mod validate;

use access::AccessRecord;
use connector::UpstreamTracker;
use credentials::Credentials;
use forward::Upstreams;
use policy::{SharedResolver, SystemResolver};
use refusal::Refusal;

/// Why the egress proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EgressError {
    /// The credentials file is unusable.
    #[error(transparent)]
    Credentials(#[from] TokensFileError),
    /// A rule's TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tunnel::tls::TlsError),
    /// A reload would put a client certificate not valid now in place of one that is.
    #[error("{0}")]
    ClientCertDates(String),
}

pub(crate) struct State {
    pub(crate) config: EgressConfig,
    pub(crate) resolver: SharedResolver,
    /// Replaced whole when a reload re-reads the rules' TLS files.
    pub(crate) upstreams: arc_swap::ArcSwap<Upstreams>,
    pub(crate) credentials: Credentials,
    pub(crate) metrics: EgressMetrics,
    pub(crate) tracker: UpstreamTracker,
    /// Request body bytes held, all requests together.
    pub(crate) body_budget: Arc<budget::BodyBudget>,
    /// Body checks that may run at once on the blocking pool: one per CPU core.
    pub(crate) check_slots: Arc<tokio::sync::Semaphore>,
    metrics_registry: MetricsRegistry,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// CONNECT tunnels: they outlive the HTTP connection that opened them.
    pub(crate) tunnels: TaskTracker,
    /// Cancelled when the proxy starts shutting down: tunnels close once quiet.
    pub(crate) draining: CancellationToken,
    /// Cancelled when the grace period is over: tunnels close now.
    pub(crate) hard_stop: CancellationToken,
}

/// What a client connection holds while it is open — its connection slot and its place in the
/// connection gauges — shared with the CONNECT tunnel it may turn into, which keeps them.
pub(crate) struct ClientHold {
    _open: crate::telemetry::ConnectionGuard,
    _slot: Option<Arc<Slot>>,
}

/// What [`Egress::reload_tls`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsReload {
    /// No rule has a `tls_upgrade`.
    NoRules,
    /// The files read the same as those in use, which stay with their connections.
    Unchanged,
    /// The files of these rules changed: new upstream connections use them.
    Applied {
        /// The rules, by name.
        rules: Vec<String>,
    },
}

/// The egress forward proxy. Cheap to clone.
#[derive(Clone)]
pub struct Egress {
    state: Arc<State>,
}

impl Egress {
    /// Builds the proxy with the system resolver.
    pub fn new(config: EgressConfig) -> Result<Egress, EgressError> {
        Self::with_resolver(config, Arc::new(SystemResolver))
    }

    /// Builds the proxy resolving names with `resolver` (tests use one they control).
    pub fn with_resolver(
        config: EgressConfig,
        resolver: SharedResolver,
    ) -> Result<Egress, EgressError> {
        let credentials = Credentials::load(config.credentials_file.as_deref())?;
        let mut metrics_registry = MetricsRegistry::default();
        let metrics = EgressMetrics::register(&mut metrics_registry);
        config.geo.register_metrics(&mut metrics_registry);
        let tracker = UpstreamTracker {
            metrics: ConnectionMetrics::register(&mut metrics_registry, "egress"),
            geo: config.geo.clone(),
        };
        let upstreams = Upstreams::build(&config, &resolver, &tracker)?;
        Upstreams::warn_about_dates(&config);
        let body_budget = budget::BodyBudget::new(
            config.max_buffered_body_bytes,
            metrics.buffered_body_bytes.clone(),
        );
        Ok(Egress {
            state: Arc::new(State {
                config,
                resolver,
                upstreams: arc_swap::ArcSwap::from_pointee(upstreams),
                credentials,
                metrics,
                tracker,
                body_budget,
                check_slots: Arc::new(tokio::sync::Semaphore::new(
                    std::thread::available_parallelism().map_or(1, usize::from),
                )),
                metrics_registry,
                per_client: Mutex::new(HashMap::new()),
                tunnels: TaskTracker::new(),
                draining: CancellationToken::new(),
                hard_stop: CancellationToken::new(),
            }),
        })
    }

    /// Re-reads the credentials file (SIGHUP) and says how many credentials it holds (0 without
    /// a file); on error the old credentials stay. Open CONNECT tunnels whose credential the new
    /// file no longer accepts are closed, each with its access-log line.
    pub fn reload_credentials(&self) -> Result<usize, TokensFileError> {
        match &self.state.config.credentials_file {
            Some(path) => self.state.credentials.reload(path),
            None => Ok(0),
        }
    }

    /// Re-reads the files of the rules' `tls_upgrade` (CA, client certificate and key) on
    /// SIGHUP. Changed ones are used by new upstream connections: requests in flight finish on
    /// theirs, and the idle ones are closed; unchanged ones keep their connections. On error,
    /// or when a client certificate valid now would be replaced by one that is not, the files
    /// in use stay.
    pub fn reload_tls(&self) -> Result<TlsReload, EgressError> {
        let state = &self.state;
        if !state.config.rules.iter().any(|r| r.tls_upgrade.is_some()) {
            return Ok(TlsReload::NoRules);
        }
        let new = Upstreams::build(&state.config, &state.resolver, &state.tracker)?;
        Upstreams::warn_about_dates(&state.config);
        let current = state.upstreams.load();
        if let Some(refusal) = current.refuses_dates_of(&new, &state.config) {
            return Err(EgressError::ClientCertDates(refusal));
        }
        let changed: Vec<String> = current
            .changed_in(&new, &state.config)
            .into_iter()
            .map(str::to_owned)
            .collect();
        drop(current);
        if changed.is_empty() {
            return Ok(TlsReload::Unchanged);
        }
        state.upstreams.store(Arc::new(new));
        Ok(TlsReload::Applied { rules: changed })
    }

    /// Serves clients on `listener` until `shutdown`, then drains within the grace period.
    pub async fn serve(&self, listener: TcpListener, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        if let Ok(addr) = listener.local_addr() {
            info!(address = %addr, rules = self.state.config.rules.len(), "egress proxy listening");
        }
        while let Some((stream, peer)) = crate::server::accept(&listener, &shutdown).await {
            connections.spawn(self.clone().connection(stream, peer, shutdown.clone()));
        }
        drop(listener);
        connections.close();
        let state = &self.state;
        state.draining.cancel();
        state.tunnels.close();
        let grace = state.config.shutdown_grace;
        let drained = async {
            connections.wait().await;
            state.tunnels.wait().await;
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            warn!(
                ?grace,
                connections = connections.len(),
                tunnels = state.tunnels.len(),
                "egress requests or tunnels still running when the grace period ended; cutting them off"
            );
            // Tunnels still carrying data are closed now, each with its access-log line.
            state.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), state.tunnels.wait()).await;
        }
        info!("egress proxy stopped");
    }

    /// Serves one client connection; on `shutdown` it finishes the request in flight, then closes.
    async fn connection(self, stream: TcpStream, peer: SocketAddr, shutdown: CancellationToken) {
        let country = self.state.config.geo.lookup(peer.ip());
        let state = self.state.clone();
        let admission = admit(&state, peer.ip());
        let keep_alive = admission.is_ok();
        let hold = Arc::new(ClientHold {
            _open: self.state.tracker.metrics.track("clients", country),
            _slot: admission.as_ref().ok().cloned(),
        });
        let cfg = &self.state.config;
        let max_buf_size = cfg.max_header_bytes.max(8192);
        let (stream, heads) = framing::Sniff::new(
            stream,
            max_buf_size,
            cfg.header_read_timeout,
            cfg.upstream_timeout,
        );
        let sniffed = heads.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            let admission = admission.clone();
            let hold = hold.clone();
            let claim = heads.claim(&req);
            let heads = heads.clone();
            async move {
                let mut resp = match admission {
                    Ok(_) => handle(&state, peer.ip(), req, &claim, hold).await,
                    Err(refusal) => refuse_connection(&state, peer.ip(), &req, refusal).await,
                };
                // Where the next request starts is no longer known: there is none. Nor after a
                // body whose framing other parsers read differently from hyper.
                if heads.lost() || claim.body_problem().is_some() {
                    close_after(&mut resp);
                }
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            // hyper's header timeout also runs while a kept-alive connection waits for its next
            // request: it is the idle limit here; `Sniff` bounds a head once it has begun. A
            // connection that will only be refused holds no slot, so nothing else bounds it: its
            // one request must arrive within the header read timeout.
            .header_read_timeout(if keep_alive {
                cfg.idle_timeout.max(cfg.header_read_timeout)
            } else {
                cfg.header_read_timeout
            })
            .max_buf_size(max_buf_size)
            .max_headers(refusal::MAX_HEADER_FIELDS)
            .keep_alive(keep_alive);
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            res = conn.as_mut() => res,
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            let timed_out = header_timed_out(&e);
            let refusal = match timed_out {
                Some(after) => Some(Refusal::header_timeout(after)),
                None if e.is_parse() && sniffed.spoke_tls() => Some(Refusal::bad_request(
                    "the client spoke TLS to a plain-HTTP proxy (use http:// in the proxy URL)",
                )),
                None => Refusal::unparsable(&e, cfg.max_header_bytes),
            };
            match refusal {
                // hyper has answered the malformed request itself (an empty 400 or 431), or
                // `Sniff` the trickled one (408); each still gets its access-log line and its
                // count, like every other refusal.
                Some(refusal) => {
                    let mut record = AccessRecord::unparsed(peer.ip());
                    // Its duration is the time the head took, not the moment since it failed.
                    if let Some(began) = timed_out.and_then(|t| record.start.checked_sub(t)) {
                        record.start = began;
                    }
                    drop(refused(&mut record, &refusal));
                    record.emit(&self.state.metrics);
                }
                None => debug!(%peer, error = %e, "egress client connection ended with an error"),
            }
        }
    }
}

/// The header read timeout, if that is what ended a connection with `e`.
fn header_timed_out(e: &hyper::Error) -> Option<Duration> {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(timed_out) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<framing::HeaderTimedOut>())
        {
            return Some(timed_out.0);
        }
        source = err.source();
    }
    None
}

/// Holds one connection slot of a client address; released on drop.
pub(crate) struct Slot {
    state: Arc<State>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self
            .state
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
        self.state.metrics.client_connections.dec();
    }
}

/// Admits a new connection from `ip`: allowlisted and under its connection cap.
fn admit(state: &Arc<State>, ip: IpAddr) -> Result<Arc<Slot>, Refusal> {
    if !state.config.clients.allows(ip) {
        return Err(Refusal::client(ip));
    }
    let limit = state.config.max_connections_per_client;
    let mut map = state.per_client.lock().unwrap_or_else(|p| p.into_inner());
    let n = map.entry(ip).or_insert(0);
    if *n >= limit {
        return Err(Refusal::too_many_connections(limit));
    }
    *n += 1;
    state.metrics.client_connections.inc();
    Ok(Arc::new(Slot {
        state: state.clone(),
        ip,
    }))
}

async fn refuse_connection(
    state: &Arc<State>,
    client: IpAddr,
    req: &Request<Incoming>,
    refusal: Refusal,
) -> Response<Body> {
    // An allowed client over its connection cap may still read the proxy's own endpoints: a
    // local Prometheus or health check must not go blind while a client on the same address
    // (loopback, say) holds every connection. They cost no upstream, and the connection
    // closes after the answer.
    let own = req.method() != Method::CONNECT && req.uri().authority().is_none();
    if own && refusal.kind == "connection_limit" {
        let mut resp = crate::endpoints::answer(state, req).await;
        close_after(&mut resp);
        return resp;
    }
    let mut record = AccessRecord::new(client, target_of(req), req.method());
    let mut resp = refused(&mut record, &refusal);
    close_after(&mut resp);
    record.emit(&state.metrics);
    resp
}

/// Marks `record` refused with `refusal` (or failed: the upstream's fault, not the policy's)
/// and builds the response.
pub(crate) fn refused(record: &mut AccessRecord, refusal: &Refusal) -> Response<Body> {
    record.status = refusal.status;
    record.decision = if refusal.is_upstream_failure() {
        "error"
    } else {
        "refused"
    };
    record.reason_kind = refusal.kind;
    record.reason = refusal.reason.clone();
    refusal.into_response()
}

/// `host[:port]` of the request, for the access log: without userinfo, which may hold a password.
fn target_of<B>(req: &Request<B>) -> String {
    req.uri().authority().map_or_else(
        || "-".to_owned(),
        |a| {
            let s = a.as_str();
            s.rsplit_once('@').map_or(s, |(_, host)| host).to_owned()
        },
    )
}

/// Answers one request; a refused CONNECT also ends the connection (see [`close_after`]).
async fn handle(
    state: &Arc<State>,
    client: IpAddr,
    req: Request<Incoming>,
    claim: &framing::Claim,
    hold: Arc<ClientHold>,
) -> Response<Body> {
    let connect = req.method() == Method::CONNECT;
    let mut resp = route(state, client, req, claim, hold).await;
    if connect && !resp.status().is_success() {
        close_after(&mut resp);
    }
    resp
}

async fn route(
    state: &Arc<State>,
    client: IpAddr,
    req: Request<Incoming>,
    claim: &framing::Claim,
    hold: Arc<ClientHold>,
) -> Response<Body> {
    let is_proxy = req.method() == Method::CONNECT || req.uri().authority().is_some();
    let mut record =
        AccessRecord::new(client, target_of(&req), req.method()).counted_in(&state.metrics);
    // hyper's buffer cannot be smaller than 8 KiB: smaller limits are enforced here.
    if head_size(&req) > state.config.max_header_bytes {
        let resp = refused(
            &mut record,
            &Refusal::head_too_large(state.config.max_header_bytes),
        );
        record.emit(&state.metrics);
        return resp;
    }
    if !is_proxy {
        record.disarm();
        return crate::endpoints::answer(state, &req).await;
    }
    let checks = check_framing(claim.problem).and_then(|_| state.credentials.check(&req));
    let admitted = match checks {
        Ok(admitted) => admitted,
        Err(refusal) => {
            let resp = refused(&mut record, &refusal);
            record.emit(&state.metrics);
            return resp;
        }
    };
    if let Some(admitted) = &admitted {
        record.user = admitted.name.clone();
    }
    if req.method() == Method::CONNECT {
        connect::handle(state, req, record, hold, admitted).await
    } else {
        forward::handle(state, req, record, claim).await
    }
}

/// Ends the connection after this response. A client whose CONNECT was refused may already have
/// sent the bytes meant for the tunnel; they must not be read as the next request.
fn close_after(resp: &mut Response<Body>) {
    resp.headers_mut()
        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
}

impl OwnEndpoints for State {
    const NAME: &'static str = "the egress proxy";
    const PATHS: &'static [&'static str] = &["/metrics", "/-/healthy", "/-/ready"];
    const NOT_FOUND: &'static str =
        "not proxied: send absolute-form requests (http://host/path) or CONNECT";

    fn registry(&self) -> &MetricsRegistry {
        &self.metrics_registry
    }
}

/// The size of the request head as received (request line and header lines), near enough.
fn head_size<B>(req: &Request<B>) -> usize {
    let request_line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    req.headers()
        .iter()
        .fold(request_line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
        + 2
}

/// Request smuggling defences: Content-Length with Transfer-Encoding, or two Content-Lengths.
/// hyper normalises both away before the request reaches us (it drops the length, folds equal
/// duplicates), so the verdict comes from [`framing`], which saw the raw request head.
fn check_framing(framing_problem: Option<&'static str>) -> Result<(), Refusal> {
    match framing_problem {
        Some(problem) => Err(Refusal::bad_request(problem)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_logged_destination_never_carries_userinfo() {
        let req = Request::get("http://alice:hunter2@collector.example:8080/x")
            .body(())
            .unwrap();
        assert_eq!(target_of(&req), "collector.example:8080");
        let req = Request::get("http://collector.example/x").body(()).unwrap();
        assert_eq!(target_of(&req), "collector.example");
    }
}
