//! Accepting tunnels: TLS, the upgrade handshake with its credential check, then HTTP/2 with the
//! gateway as client, the agent registered for as long as the connection lives.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use super::auth::AuthError;
use super::h2conn::{self, Sender};
use super::registry::AgentHandle;
use super::State;
use crate::http_util::{text_response, Body};
use crate::scrape_error::one_line;
use crate::telemetry::{ConnectionGuard, ResultLabels};
use crate::tunnel::handshake::{parse_upgrade_request, switching_protocols, Refusal};
use crate::tunnel::{TargetList, CONTROL_AUTHORITY, TARGETS_LONG_POLL, TARGETS_PATH};

/// Largest target list accepted from an agent.
const MAX_TARGET_LIST_BYTES: usize = 1 << 20;

pub(super) async fn accept_loop(
    state: Arc<State>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    let sessions = TaskTracker::new();
    while let Some((stream, remote)) = crate::server::accept(&listener, &shutdown).await {
        let span = info_span!("tunnel", %remote);
        sessions.spawn(
            handle_connection(state.clone(), stream, remote, shutdown.clone()).instrument(span),
        );
    }
    sessions.close();
    sessions.wait().await;
}

async fn handle_connection(
    state: Arc<State>,
    stream: TcpStream,
    remote: SocketAddr,
    shutdown: CancellationToken,
) {
    let timeout = state.config.handshake_timeout;
    let country = state.config.geo.lookup(remote.ip());
    // Counted open from accept to the end of the session; the session task takes it over.
    let held: HeldGuard = Arc::new(Mutex::new(Some(state.connections.track("tunnel", country))));
    match &state.identity {
        Some(identity) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(identity.config.clone());
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_upgrade(state, tls, remote, shutdown, held).await,
                Ok(Err(e)) => {
                    handshake_failed(&state, "tls_error", &format!("TLS handshake failed: {e}"))
                }
                Err(_) => handshake_failed(&state, "timeout", "TLS handshake timed out"),
            }
        }
        None => serve_upgrade(state, stream, remote, shutdown, held).await,
    }
}

/// The open-connection guard of a tunnel, handed from the accept to the session.
type HeldGuard = Arc<Mutex<Option<ConnectionGuard>>>;

fn handshake_failed(state: &State, result: &str, reason: &str) {
    debug!(reason, "tunnel handshake failed");
    count_handshake(state, result);
}

fn count_handshake(state: &State, result: &str) {
    state
        .metrics
        .handshakes
        .get_or_create(&ResultLabels {
            result: result.to_owned(),
        })
        .inc();
}

/// Serves the one HTTP/1.1 request that opens a tunnel, bounded by the handshake timeout.
async fn serve_upgrade<IO>(
    state: Arc<State>,
    io: IO,
    remote: SocketAddr,
    shutdown: CancellationToken,
    held: HeldGuard,
) where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let timeout = state.config.handshake_timeout;
    let svc_state = state.clone();
    let service = hyper::service::service_fn(move |req| {
        let state = svc_state.clone();
        let shutdown = shutdown.clone();
        let held = held.clone();
        async move { Ok::<_, Infallible>(upgrade(state, req, remote, shutdown, held)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    match tokio::time::timeout(timeout, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => handshake_failed(&state, "http_error", &e.to_string()),
        Err(_) => handshake_failed(&state, "timeout", "upgrade request timed out"),
    }
}

/// Checks the credentials of an upgrade request; on success answers 101 and starts the session.
fn upgrade(
    state: Arc<State>,
    req: Request<Incoming>,
    remote: SocketAddr,
    shutdown: CancellationToken,
    held: HeldGuard,
) -> Response<Body> {
    let claim = match parse_upgrade_request(&req) {
        Ok(claim) => claim,
        Err(refusal) => {
            let result = if refusal.status == StatusCode::UNAUTHORIZED {
                "unauthorized"
            } else {
                "bad_request"
            };
            return refuse(&state, refusal, result, None);
        }
    };
    if let Err(e) = state.tokens().authorize(&claim.token, &claim.agent_id) {
        let (status, result) = match e {
            AuthError::InvalidToken => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AuthError::IdNotAllowed(_) => (StatusCode::FORBIDDEN, "forbidden"),
        };
        return refuse(
            &state,
            Refusal::new(status, e.to_string()),
            result,
            Some(&claim.agent_id),
        );
    }
    count_handshake(&state, "ok");
    let agent_id = claim.agent_id;
    // A root span, carrying the remote address itself: as a child it would keep the accepting
    // connection's span (and its formatted fields) alive for the tunnel's whole life.
    let span = info_span!(parent: None, "agent", agent = %agent_id, %remote);
    let guard = held.lock().unwrap_or_else(|p| p.into_inner()).take();
    let credential = crate::auth::token_digest(&claim.token);
    tokio::spawn(
        run_session(state, req, agent_id, credential, remote, shutdown, guard).instrument(span),
    );
    switching_protocols()
}

fn refuse(state: &State, refusal: Refusal, result: &str, agent: Option<&str>) -> Response<Body> {
    warn!(agent = agent.unwrap_or("-"), status = refusal.status.as_u16(), reason = %refusal.reason, "tunnel refused");
    count_handshake(state, result);
    text_response(refusal.status, &refusal.reason)
}

/// One tunnel's life: the upgrade, HTTP/2 handshake, first target list, registration, then
/// until it ends. One such task per connected agent: what it holds across its awaits is
/// per-agent memory.
async fn run_session(
    state: Arc<State>,
    req: Request<Incoming>,
    agent_id: String,
    credential: [u8; 32],
    remote: SocketAddr,
    shutdown: CancellationToken,
    _open: Option<ConnectionGuard>,
) {
    let upgraded = match hyper::upgrade::on(req).await {
        Ok(upgraded) => upgraded,
        Err(e) => return warn!(error = %e, "tunnel upgrade failed after 101"),
    };
    // Bound once, never moved: a moved copy would take its room in this task a second time.
    let (sender, mut conn) =
        match h2conn::handshake(TokioIo::new(upgraded), state.config.keepalive).await {
            Ok(pair) => pair,
            Err(e) => return warn!(error = %e, "HTTP/2 handshake over the tunnel failed"),
        };
    let first = tokio::select! {
        list = fetch_targets(&sender, None, state.config.handshake_timeout) => list,
        reason = &mut conn => return warn!(%reason, "tunnel closed before the agent sent its targets"),
    };
    let first = match first {
        Ok(list) => list,
        Err(e) => return warn!(error = %e, "could not read the agent's targets"),
    };
    let n_targets = first.targets.len();
    let (targets_tx, targets_rx) = watch::channel(Arc::new(first));
    let closed = CancellationToken::new();
    let session = state.registry.next_session();
    let handle = Arc::new(AgentHandle::new(
        agent_id.clone(),
        session,
        remote,
        sender.clone(),
        targets_rx,
        closed.clone(),
        credential,
    ));
    if let Some(old) = state.registry.insert(handle.clone()) {
        warn!(old_remote = %old.remote, "agent id connected again: replacing the older tunnel");
        state.metrics.tunnels_replaced.inc();
        old.close();
    }
    state
        .metrics
        .agents_connected
        .set(state.registry.len() as i64);
    info!(targets = n_targets, "agent connected");
    let end = tokio::select! {
        reason = &mut conn => format!("connection ended: {reason}"),
        _ = closed.cancelled() => if handle.is_revoked() {
            "its token no longer allows this agent id (tokens file reloaded)".to_owned()
        } else {
            "replaced by a newer tunnel".to_owned()
        },
        _ = shutdown.cancelled() => "gateway shutting down".to_owned(),
        e = watch_targets(sender, targets_tx) => {
            // An agent shutting down sends GOAWAY, which ends the targets long poll first; its
            // scrapes in flight still finish. No new scrape is routed here, and the connection is
            // driven until the agent closes it (or the longest scrape would have timed out).
            state.registry.remove(&agent_id, session);
            state.metrics.agents_connected.set(state.registry.len() as i64);
            let drain = state.config.scrape.max_timeout + state.config.handshake_timeout;
            match tokio::time::timeout(drain, &mut conn).await {
                Ok(reason) if reason == h2conn::CLOSED_BY_AGENT => {
                    "the agent went away (GOAWAY)".to_owned()
                }
                Ok(reason) => format!("connection ended: {reason} (target list watch: {e})"),
                Err(_) => format!("target list watch failed: {e}"),
            }
        }
    };
    state.registry.remove(&agent_id, session);
    state
        .metrics
        .agents_connected
        .set(state.registry.len() as i64);
    info!(reason = %end, "agent disconnected");
}

/// Follows the agent's target list: each answer is the next version, held open by the agent until it changes.
async fn watch_targets(sender: Sender, tx: watch::Sender<Arc<TargetList>>) -> String {
    loop {
        let version = tx.borrow().version;
        match fetch_targets(
            &sender,
            Some(version),
            TARGETS_LONG_POLL + Duration::from_secs(30),
        )
        .await
        {
            Ok(list) if list.version != version => {
                info!(
                    targets = list.targets.len(),
                    version = list.version,
                    "agent targets changed"
                );
                tx.send_replace(Arc::new(list));
            }
            Ok(_) => {}
            Err(e) => return e,
        }
    }
}

async fn fetch_targets(
    sender: &Sender,
    after: Option<u64>,
    timeout: Duration,
) -> Result<TargetList, String> {
    let uri = match after {
        Some(v) => format!("http://{CONTROL_AUTHORITY}{TARGETS_PATH}?after={v}"),
        None => format!("http://{CONTROL_AUTHORITY}{TARGETS_PATH}"),
    };
    // Started before the first await, so the URI and request are gone while the answer is awaited.
    let response = h2conn::start_get(sender, &uri)?;
    drop(uri);
    tokio::time::timeout(timeout, read_target_list(response))
        .await
        .map_err(|_| "timed out waiting for the target list".to_owned())?
}

async fn read_target_list(response: h2::client::ResponseFuture) -> Result<TargetList, String> {
    let resp = h2conn::response(response).await.map_err(|e| one_line(&e))?;
    if resp.status() != StatusCode::OK {
        return Err(format!(
            "agent answered {} to the targets request",
            resp.status()
        ));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_TARGET_LIST_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading target list: {e}"))?
        .to_bytes();
    parse_target_list(&body)
}

fn parse_target_list(body: &Bytes) -> Result<TargetList, String> {
    serde_json::from_slice(body)
        .map(super::published::routable)
        .map_err(|e| format!("invalid target list: {e}"))
}
