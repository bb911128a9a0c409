//! Accepting tunnels: TLS, the upgrade handshake with its credential check, then HTTP/2 with the
//! gateway as client, the agent registered for as long as the connection lives.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use super::auth::AuthError;
use super::h2conn::{self, Sender};
use super::pending::{Busy, PendingSlot};
use super::published::accepted;
use super::registry::{AgentHandle, CloseReason, Inserted, TokenClaim};
use super::State;
use crate::http_util::{full, text_response, Body};
use crate::scrape_error::one_line;
use crate::telemetry::{ConnectionGuard, ResultLabels};
use crate::tunnel::handshake::{parse_upgrade_request, switching_protocols, Refusal};
use crate::tunnel::{
    ClosingKind, TargetList, CLOSING_NOTICE_TIMEOUT, CONTROL_AUTHORITY, MAX_TARGET_LIST_BYTES,
    SHUTDOWN_NOTICE_TIMEOUT, TARGETS_LONG_POLL, TARGETS_PATH,
};

pub(super) async fn accept_loop(
    state: Arc<State>,
    listener: TcpListener,
    shutdown: CancellationToken,
) {
    let sessions = TaskTracker::new();
    while let Some((stream, remote)) = crate::server::accept(&listener, &shutdown).await {
        let slot = match state.pending.admit(remote.ip()) {
            Ok(slot) => slot,
            Err(busy) => {
                // Closed before TLS: what a flood of half-open handshakes costs stays bounded.
                drop(stream);
                too_busy(&state, remote, busy);
                continue;
            }
        };
        let span = info_span!("tunnel", %remote);
        let conn = Accepted {
            remote,
            shutdown: shutdown.clone(),
            sessions: sessions.clone(),
        };
        sessions.spawn(handle_connection(state.clone(), stream, conn, slot).instrument(span));
    }
    sessions.close();
    // Every session tells its agent that the gateway shuts down, each bounded by
    // SHUTDOWN_NOTICE_TIMEOUT; handshakes still in progress are given up at the same bound.
    if tokio::time::timeout(SESSIONS_CLOSE_TIMEOUT, sessions.wait())
        .await
        .is_err()
    {
        warn!(
            tunnels = sessions.len(),
            timeout = ?SESSIONS_CLOSE_TIMEOUT,
            "tunnels still open when the gateway stopped waiting for them; closing them"
        );
    }
}

/// How long a stopping gateway waits for its tunnels to close after telling their agents.
const SESSIONS_CLOSE_TIMEOUT: Duration = SHUTDOWN_NOTICE_TIMEOUT.saturating_mul(2);

/// What a tunnel connection needs from the accept loop: where it comes from, the gateway's
/// shutdown, and the tracker its session joins, so that a stopping gateway waits for the
/// session to tell its agent (the process would otherwise exit first).
#[derive(Clone)]
struct Accepted {
    remote: SocketAddr,
    shutdown: CancellationToken,
    sessions: TaskTracker,
}

async fn handle_connection(
    state: Arc<State>,
    stream: TcpStream,
    conn: Accepted,
    // Held until the upgrade ends: the session started (or refused) frees it.
    _slot: PendingSlot,
) {
    let timeout = state.config.handshake_timeout;
    let deadline = crate::http_util::deadline(tokio::time::Instant::now(), timeout);
    let country = state.config.geo.lookup(conn.remote.ip());
    // Counted open from accept to the end of the session; the session task takes it over.
    let held: HeldGuard = Arc::new(Mutex::new(Some(state.connections.track("tunnel", country))));
    match &state.tunnel_tls {
        Some(tls) => {
            if speaks_plain_http(&stream, deadline).await {
                return refuse_plain_http(&state, stream, deadline).await;
            }
            let acceptor = tls.acceptor();
            match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_upgrade(state, tls, conn, held).await,
                Ok(Err(e)) => {
                    handshake_failed(&state, "tls_error", &format!("TLS handshake failed: {e}"))
                }
                Err(_) => handshake_failed(&state, "timeout", "TLS handshake timed out"),
            }
        }
        None => serve_upgrade(state, stream, conn, held).await,
    }
}

/// The open-connection guard of a tunnel, handed from the accept to the session.
type HeldGuard = Arc<Mutex<Option<ConnectionGuard>>>;

/// What the tunnel listener answers plain HTTP with: Prometheus (or curl) pointed at the wrong
/// port of the gateway.
const NOT_THE_WEB_LISTENER: &str = "this is ferry's tunnel listener, which speaks TLS to agents \
    (https://); Prometheus's proxy_url and service discovery are on the gateway's web listener \
    (web.listen_address, default :8080)";

/// Whether the client's first byte says plain HTTP (a method's first letter) rather than TLS
/// (a handshake record, 0x16). Undecided (nothing sent before the deadline, an error) is no.
async fn speaks_plain_http(stream: &TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout_at(deadline, stream.peek(&mut first)).await,
        Ok(Ok(1)) if first[0].is_ascii_uppercase()
    )
}

/// Answers plain HTTP with a 400 that says which listener this is, then closes.
async fn refuse_plain_http(state: &State, mut stream: TcpStream, deadline: tokio::time::Instant) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    handshake_failed(state, "tls_error", "plain HTTP sent to the TLS tunnel listener: is a Prometheus proxy_url (or an agent with insecure_plaintext) pointed at the tunnel port instead of the web port?");
    let body = format!("{NOT_THE_WEB_LISTENER}\n");
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ndate: {}\r\ncontent-type: text/plain; charset=utf-8\r\nx-content-type-options: nosniff\r\n{}: gateway\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now()),
        crate::scrape_error::ERROR_SOURCE_HEADER,
        body.len()
    );
    let answer = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes: closing with unread bytes would reset
        // the connection, and the client could lose the answer.
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout_at(deadline, answer).await;
}

fn handshake_failed(state: &State, result: &str, reason: &str) {
    count_handshake(state, result);
    let hint = handshake_hint(reason);
    match state.handshake_warnings.admit() {
        Some(quiet) => warn!(
            reason,
            hint,
            failures_not_logged_since_last_warning = quiet,
            "tunnel handshake failed (at most one such warning a minute; the rest at debug level)"
        ),
        None => debug!(reason, hint, "tunnel handshake failed"),
    }
}

/// What a handshake failure usually means, for the log.
fn handshake_hint(reason: &str) -> &'static str {
    if let Some((_, alert)) = reason.split_once("received fatal alert: ") {
        alert_hint(alert.trim())
    } else if reason.contains("plain HTTP") {
        "answered 400 with the web listener's address"
    } else if reason.contains("timed out") {
        "the client opened a connection and sent nothing (or too little) in time"
    } else if reason.contains("without sending the upgrade request") {
        "a TLS health check or scanner, or a client that gave up before asking"
    } else {
        "-"
    }
}

/// What the alert (rustls's name for it) a client ended the handshake with usually means. The
/// names are those ferry's agent (rustls) sends: a fingerprint that does not match is a
/// handshake failure, a CA file that did not issue the certificate an unknown CA, a name the
/// certificate does not cover a bad certificate, dates outside its validity an expired one.
fn alert_hint(alert: &str) -> &'static str {
    match alert {
        "CertificateExpired" => "the client finds this gateway's certificate expired or not valid yet: renew it (see its not-after date in ferry_gateway_tls_certificate_not_after_seconds), or the client's clock is wrong",
        "UnknownCA" => "the client does not trust this gateway's certificate: an agent whose tunnel.ca_file did not issue it (or without tunnel.ca_file or tunnel.fingerprint, trusting the system's CAs only)?",
        "BadCertificate" | "CertificateUnknown" | "UnsupportedCertificate" => "the client refused this gateway's certificate: an agent whose tunnel.ca_file does not match it, or whose --gateway host name it does not cover?",
        "HandshakeFailure" => "the client refused the handshake: an agent whose tunnel.fingerprint does not match this gateway's certificate (or a client without TLS 1.3)?",
        "ProtocolVersion" => "the client does not speak TLS 1.3, the only version of the tunnel listener",
        _ => "the client refused the handshake: an agent whose tunnel.fingerprint or tunnel.ca_file does not match this gateway's certificate (or a client without TLS 1.3)?",
    }
}

/// Counts and warns about (at most once a minute) a connection closed at accept.
fn too_busy(state: &State, remote: SocketAddr, busy: Busy) {
    count_handshake(state, "busy");
    let (limit, setting) = match busy {
        Busy::Total(n) => (n, "tunnel.max_pending_handshakes"),
        Busy::PerIp(n) => (n, "tunnel.max_pending_handshakes_per_ip"),
    };
    let reason = match busy {
        Busy::Total(_) => format!("{limit} connections are in their handshake already"),
        Busy::PerIp(_) => {
            format!("{limit} connections from this address are in their handshake already")
        }
    };
    match state.busy_warnings.admit() {
        Some(quiet) => warn!(
            %remote,
            reason,
            setting,
            closed_not_logged_since_last_warning = quiet,
            "tunnel connection closed at accept: too many handshakes pending (a flood of connections that do not finish TLS, or many agents reconnecting at once; they retry); raise the setting if these are your agents (at most one such warning a minute)"
        ),
        None => debug!(%remote, reason, "tunnel connection closed at accept"),
    }
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
async fn serve_upgrade<IO>(state: Arc<State>, io: IO, conn: Accepted, held: HeldGuard)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let timeout = state.config.handshake_timeout;
    let svc_state = state.clone();
    // Whether a request arrived: the request counts its own handshake result.
    let asked = Arc::new(AtomicBool::new(false));
    let svc_asked = asked.clone();
    let service = hyper::service::service_fn(move |req| {
        svc_asked.store(true, Ordering::Relaxed);
        let state = svc_state.clone();
        let conn = conn.clone();
        let held = held.clone();
        async move { Ok::<_, Infallible>(upgrade(state, req, conn, held)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let ended = tokio::time::timeout(timeout, conn).await;
    count_upgrade_end(&state, ended, asked.load(Ordering::Relaxed));
}

/// Counts how the connection of an upgrade ended, unless its request arrived: the answer to it
/// counted the handshake already.
fn count_upgrade_end(
    state: &State,
    ended: Result<hyper::Result<()>, tokio::time::error::Elapsed>,
    asked: bool,
) {
    match ended {
        Ok(Err(e)) if asked => {
            debug!(error = %one_line(&e), "tunnel upgrade connection failed after the answer")
        }
        Err(_) if asked => debug!("tunnel upgrade connection timed out after the answer"),
        Ok(_) if asked => {}
        // hyper takes the client's close for the end of the connection, then may fail to close
        // its own side (a TLS close_notify to a peer already gone).
        Ok(Ok(())) => handshake_failed(state, "closed", CLOSED_UNASKED),
        Ok(Err(e)) if e.is_shutdown() => handshake_failed(state, "closed", CLOSED_UNASKED),
        // hyper's header read timeout and this one are the same: either may fire first.
        Ok(Err(e)) if e.is_timeout() => handshake_failed(state, "timeout", UPGRADE_TIMED_OUT),
        Err(_) => handshake_failed(state, "timeout", UPGRADE_TIMED_OUT),
        Ok(Err(e)) => handshake_failed(state, "http_error", &one_line(&e)),
    }
}

/// Why a connection closed by the client before it asked for anything is counted.
const CLOSED_UNASKED: &str = "the client closed the connection without sending the upgrade request";

/// Why a connection that sent no (complete) upgrade request in time is closed.
const UPGRADE_TIMED_OUT: &str = "upgrade request timed out";

/// Checks the credentials of an upgrade request; on success answers 101 and starts the session.
fn upgrade(
    state: Arc<State>,
    req: Request<Incoming>,
    conn: Accepted,
    held: HeldGuard,
) -> Response<Body> {
    let Accepted {
        remote,
        shutdown,
        sessions,
    } = conn;
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
    let digest = crate::auth::token_digest(&claim.token);
    let credential = TokenClaim {
        digest,
        named_exactly: state.tokens().names_exactly(&digest, &claim.agent_id),
    };
    // Only a tunnel with the same token may replace a connected one (an agent restarting, or its
    // half-dead old connection), or one whose token names the id exactly replacing one whose
    // token matches it by a glob. Another token whose glob covers the id (a group token on
    // another host) must not take the tunnel and its scrapes over; nor keep an id it took while
    // its agent was away.
    if let Some(held) = state.registry.held_by_another(&claim.agent_id, &credential) {
        let reason = id_taken(&claim.agent_id, held.remote);
        return refuse(
            &state,
            Refusal::new(StatusCode::CONFLICT, reason),
            "conflict",
            Some(&claim.agent_id),
        );
    }
    count_handshake(&state, "ok");
    let agent_id = claim.agent_id;
    let guard = held.lock().unwrap_or_else(|p| p.into_inner()).take();
    // Not instrumented with a span: its events name the agent and address themselves. A span
    // that lives as long as the tunnel costs about 1 KiB per idle agent (its registry slot and
    // formatted fields), a thirtieth of what the whole tunnel costs.
    // Only the upgrade's future goes into the session task: the request would keep its room
    // there for the tunnel's whole life.
    let upgrade = hyper::upgrade::on(req);
    sessions.spawn(run_session(
        state, upgrade, agent_id, credential, remote, shutdown, guard,
    ));
    switching_protocols()
}

/// The one-line reason a claim of `id` is refused while `holder` has it with another token.
fn id_taken(id: &str, holder: SocketAddr) -> String {
    format!("agent id {id:?} is connected from {holder} with another token")
}

/// How many refusals of an agent's credentials (401, 403, 409) are warned about a minute.
pub(crate) const CREDENTIAL_WARNINGS_PER_MINUTE: u32 = 10;

fn refuse(state: &State, refusal: Refusal, result: &str, agent: Option<&str>) -> Response<Body> {
    let (agent, status) = (agent.unwrap_or("-"), refusal.status.as_u16());
    let credentials = matches!(status, 401 | 403 | 409);
    // An agent's credentials refused is worth a line, up to a burst that a fleet after a bad
    // rotation fills but that a client trying tokens in a loop cannot turn into a log flood; a
    // request that is no tunnel upgrade at all (a scanner's GET /) is as rate-limited as a
    // failed TLS handshake.
    if credentials {
        match state.credential_warnings.admit() {
            Some(0) => warn!(agent, status, reason = %refusal.reason, "tunnel refused"),
            Some(quiet) => warn!(
                agent,
                status,
                reason = %refusal.reason,
                refusals_not_logged_since_last_warning = quiet,
                "tunnel refused (at most {CREDENTIAL_WARNINGS_PER_MINUTE} refused credentials are warned about a minute; the rest went to the debug level)"
            ),
            None => debug!(agent, status, reason = %refusal.reason, "tunnel refused"),
        }
    } else if let Some(quiet) = state.handshake_warnings.admit() {
        warn!(
            agent,
            status,
            reason = %refusal.reason,
            failures_not_logged_since_last_warning = quiet,
            "tunnel refused (at most one such warning a minute; the rest at debug level)"
        );
    } else {
        debug!(agent, status, reason = %refusal.reason, "tunnel refused");
    }
    count_handshake(state, result);
    let mut resp = text_response(refusal.status, &refusal.reason);
    if refusal.status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

/// One tunnel's life: the upgrade, HTTP/2 handshake, first target list, registration, then
/// until it ends. One such task per connected agent: what it holds across its awaits is
/// per-agent memory.
#[allow(clippy::manual_async_fn)] // see below
fn run_session(
    state: Arc<State>,
    upgrade: hyper::upgrade::OnUpgrade,
    agent_id: String,
    credential: TokenClaim,
    remote: SocketAddr,
    shutdown: CancellationToken,
    _open: Option<ConnectionGuard>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    // An async block, not an `async fn`: the latter keeps each argument twice in the task (as
    // passed and as moved into the body), for the tunnel's whole life.
    async move {
        let _open = _open;
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                return warn!(agent = %agent_id, %remote, error = %e, "tunnel upgrade failed after 101")
            }
        };
        // Bound once, never moved: a moved copy would take its room in this task a second time.
        // The handshake is boxed: it holds the connection it builds and more, and would make
        // this task that much larger for the tunnel's whole life.
        let handshake = h2conn::handshake(TokioIo::new(upgraded), state.config.keepalive);
        let (sender, mut conn) = match Box::pin(handshake).await {
            Ok(pair) => pair,
            Err(e) => {
                return warn!(agent = %agent_id, %remote, error = %e, "HTTP/2 handshake over the tunnel failed")
            }
        };
        let first = tokio::select! {
            list = fetch_targets(&sender, None, state.config.handshake_timeout) => list,
            reason = &mut conn => return warn!(agent = %agent_id, %remote, %reason, "tunnel closed before the agent sent its targets"),
        };
        let first = match first.map(|list| accepted(list, &agent_id)) {
            Ok(Ok(list)) => list,
            Ok(Err(reason)) => {
                warn!(agent = %agent_id, %remote, %reason, "tunnel refused: the agent's target list");
                return notify_closing(&sender, ClosingKind::TargetsRefused, &reason, &mut conn)
                    .await;
            }
            Err(e) => {
                return warn!(agent = %agent_id, %remote, error = %e, "could not read the agent's targets")
            }
        };
        let n_targets = first.targets.len();
        let closed = CancellationToken::new();
        let session = state.registry.next_session();
        let handle = Arc::new(AgentHandle::new(
            agent_id.clone(),
            session,
            remote,
            sender.clone(),
            Arc::new(first),
            closed.clone(),
            credential,
        ));
        match state.registry.insert(handle.clone()) {
            Inserted::New => {}
            Inserted::Replaced(old) => replace(&state, &old, &credential, &agent_id, remote),
            Inserted::Conflict(holder) => {
                // Another token registered the id between our handshake check and now.
                let reason = id_taken(&agent_id, holder.remote);
                warn!(agent = %agent_id, %remote, %reason, "tunnel refused after the handshake");
                return notify_closing(&sender, ClosingKind::IdTaken, &reason, &mut conn).await;
            }
        }
        // The token was checked before the 101; a tokens reload since then may have revoked it,
        // and the reload's own sweep ran before this tunnel was registered.
        if !handle.still_authorized(&state.tokens()) {
            // Revoked, so that it is not kept in service discovery as a disconnected agent.
            handle.revoke();
            state.registry.remove(&agent_id, session);
            warn!(agent = %agent_id, %remote, "tunnel closed as it registered: the tokens file was reloaded meanwhile and no longer accepts its token for this id");
            return notify_closing(
                &sender,
                ClosingKind::Revoked,
                &revoked(&agent_id),
                &mut conn,
            )
            .await;
        }
        info!(agent = %agent_id, %remote, targets = n_targets, "agent connected");
        // Whether the tunnel was lost (an unanswered keepalive, a broken connection) rather than
        // closed by either side on purpose: an operator watching warnings learns of a site gone.
        let mut lost = false;
        let end = tokio::select! {
            reason = &mut conn => {
                lost = h2conn::lost(&reason);
                format!("connection ended: {reason}")
            }
            _ = closed.cancelled() => closed_by_gateway(&handle, &mut conn).await,
            _ = shutdown.cancelled() => shutting_down(&handle, &mut conn).await,
            end = watch_targets(&state, session, sender, &handle, &agent_id, remote) => match end {
                WatchEnd::Refused(reason) => targets_refused(&state, &handle, reason, &mut conn).await,
                WatchEnd::Failed(e) => {
                // An agent shutting down sends GOAWAY, which ends the targets long poll first; its
                // scrapes in flight still finish. No new scrape is routed here, and the connection is
                // driven until the agent closes it (or the longest scrape would have timed out).
                state.registry.remove(&agent_id, session);
                let drain = state.config.scrape.max_timeout + state.config.handshake_timeout;
                // A stopping gateway waits for no agent's drain: its own scrapes were drained already.
                tokio::select! {
                    ended = tokio::time::timeout(drain, &mut conn) => match ended {
                        Ok(reason) if reason == h2conn::CLOSED_BY_AGENT => {
                            "the agent went away (GOAWAY)".to_owned()
                        }
                        Ok(reason) => {
                            lost = h2conn::lost(&reason);
                            format!("connection ended: {reason} (target list watch: {e})")
                        }
                        Err(_) => {
                            lost = true;
                            format!("target list watch failed: {e}")
                        }
                    },
                    _ = shutdown.cancelled() => "gateway shutting down while the agent went away".to_owned(),
                }
            }
            },
        };
        state.registry.remove(&agent_id, session);
        if lost {
            warn!(agent = %agent_id, %remote, reason = %end, "agent disconnected: tunnel lost");
        } else {
            info!(agent = %agent_id, %remote, reason = %end, "agent disconnected");
        }
    }
}

/// Closes `old`, the tunnel a newer one with the same id (from `by`, opened with `claim`)
/// replaces: the same token, or one naming the id exactly where `old`'s matches it by a glob.
fn replace(state: &State, old: &AgentHandle, claim: &TokenClaim, agent_id: &str, by: SocketAddr) {
    let (reason, words) = if old.has_credential(&claim.digest) {
        (
            CloseReason::Replaced { by },
            "agent id connected again with the same token: replacing the older tunnel",
        )
    } else {
        (
            CloseReason::Outranked { by },
            "agent id claimed by a token that names it exactly: replacing the tunnel of a glob token",
        )
    };
    // Already being closed (its token revoked): nothing is replaced.
    if old.close_for(reason) {
        warn!(agent = agent_id, remote = %by, old_remote = %old.remote, "{words}");
        state.metrics.tunnels_replaced.inc();
    }
}

/// Tells the agent why the gateway closes its tunnel, where it needs telling, and returns the
/// reason for the gateway's log.
async fn closed_by_gateway<T>(handle: &AgentHandle, conn: &mut h2conn::Connection<T>) -> String
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    match handle.close_reason() {
        Some(CloseReason::Replaced { by }) => {
            let reason = format!(
                "replaced by a newer tunnel: another agent with the same id {:?} connected from {by}",
                handle.id
            );
            notify_closing(&handle.sender(), ClosingKind::IdTaken, &reason, conn).await;
            reason
        }
        Some(CloseReason::Outranked { by }) => {
            let reason = format!(
                "replaced by the agent connecting from {by}, whose token names agent id {:?} exactly (this tunnel's token matches it only by a glob)",
                handle.id
            );
            notify_closing(&handle.sender(), ClosingKind::IdTaken, &reason, conn).await;
            reason
        }
        // Told, so that the agent says why at once; its next connection is refused 401/403.
        Some(CloseReason::Revoked) => {
            notify_closing(
                &handle.sender(),
                ClosingKind::Revoked,
                &revoked(&handle.id),
                conn,
            )
            .await;
            "its token no longer allows this agent id (tokens file reloaded)".to_owned()
        }
        None => "closed by the gateway".to_owned(),
    }
}

/// What the agent of a revoked tunnel is told.
fn revoked(id: &str) -> String {
    format!("the gateway's tokens file was reloaded and no longer accepts this tunnel's token for agent id {id:?}")
}

/// Tells the agent that the gateway shuts down, so that it reconnects soon without taking the
/// restart for trouble; returns the reason for the gateway's log. Bounded by
/// [`SHUTDOWN_NOTICE_TIMEOUT`]: every tunnel is told at once, a restart waits no longer.
async fn shutting_down<T>(handle: &AgentHandle, conn: &mut h2conn::Connection<T>) -> String
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let reason = "gateway shutting down";
    notify_closing(&handle.sender(), ClosingKind::Shutdown, reason, conn).await;
    reason.to_owned()
}

/// Sends `reason` to the agent before its tunnel is closed: another agent took its id (it then
/// waits its slow backoff instead of reconnecting at once, or two agents with one id would take
/// turns every second), its token was revoked, or the gateway shuts down. Waits a bounded time
/// for the answer, driving the connection meanwhile. The request is boxed: it happens once, at
/// a tunnel's end, and must not grow every idle session's task.
async fn notify_closing<T>(
    sender: &Sender,
    kind: ClosingKind,
    reason: &str,
    conn: &mut h2conn::Connection<T>,
) where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let req = Request::post(format!("http://{CONTROL_AUTHORITY}{}", kind.path()))
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(reason.to_owned()));
    let Ok(req) = req else { return };
    let timeout = match kind {
        ClosingKind::Shutdown => SHUTDOWN_NOTICE_TIMEOUT,
        _ => CLOSING_NOTICE_TIMEOUT,
    };
    let sent = Box::pin(tokio::time::timeout(timeout, h2conn::send(sender, req)));
    tokio::select! {
        answer = sent => match answer {
            Ok(Ok(resp)) => debug!(status = resp.status().as_u16(), "agent told why its tunnel closes"),
            Ok(Err(e)) => debug!(error = %e, "could not tell the agent why its tunnel closes"),
            Err(_) => debug!("the agent did not take the closing notice in time"),
        },
        end = conn => debug!(reason = %end, "tunnel ended before the closing notice was answered"),
    }
}

/// Closes the tunnel of `handle`, whose agent changed its target list to one the gateway
/// refuses (`reason`), telling the agent why; returns the reason for the gateway's log. Its last
/// accepted list stays in service discovery as a disconnected agent's: Prometheus sees its
/// targets down rather than forgetting them.
async fn targets_refused<T>(
    state: &State,
    handle: &AgentHandle,
    reason: String,
    conn: &mut h2conn::Connection<T>,
) -> String
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    state.registry.remove(&handle.id, handle.session);
    notify_closing(&handle.sender(), ClosingKind::TargetsRefused, &reason, conn).await;
    format!("target list refused: {reason}")
}

/// Why [`watch_targets`] stopped following the agent's list.
enum WatchEnd {
    /// The agent published a list the gateway refuses, for this reason.
    Refused(String),
    /// The request failed (the tunnel is going away, most often).
    Failed(String),
}

/// Follows the agent's target list: each answer is the next version, held open by the agent until it changes.
#[allow(clippy::manual_async_fn)] // see below
fn watch_targets<'a>(
    state: &'a State,
    session: u64,
    sender: Sender,
    handle: &'a AgentHandle,
    agent_id: &'a str,
    remote: SocketAddr,
) -> impl std::future::Future<Output = WatchEnd> + Send + 'a {
    // An async block, for what `run_session` says.
    async move {
        // A list changes when its agent's configuration does. An agent whose list changes again
        // within a second, or that answers the long poll at once many times in a row, is asked
        // again only a second after the last request: each change takes the registry's write lock
        // and a log line. A few quick answers are not held back: a stopping agent answers the poll
        // at once, and the next request is what meets its GOAWAY.
        let mut last_change: Option<tokio::time::Instant> = None;
        let mut quick_in_a_row = 0u32;
        loop {
            let version = handle.targets().version;
            let asked = tokio::time::Instant::now();
            match fetch_targets(
                &sender,
                Some(version),
                TARGETS_LONG_POLL + Duration::from_secs(30),
            )
            .await
            {
                Ok(list) if list.version != version => {
                    let list = match accepted(list, agent_id) {
                        Ok(list) => list,
                        Err(reason) => return WatchEnd::Refused(reason),
                    };
                    info!(
                        agent = agent_id,
                        %remote,
                        targets = list.targets.len(),
                        version = list.version,
                        "agent targets changed"
                    );
                    let list = Arc::new(list);
                    handle.set_targets(list.clone());
                    state.registry.targets_changed(agent_id, session, &list);
                    let churning =
                        last_change.is_some_and(|at| at.elapsed() < MIN_TARGETS_INTERVAL);
                    if churning {
                        tokio::time::sleep_until(asked + MIN_TARGETS_INTERVAL).await;
                    }
                    // Taken after the wait: taken before it, the next change, a second later, would
                    // not count as churn and be asked again at once (two requests a second).
                    last_change = Some(tokio::time::Instant::now());
                }
                Ok(_) => {}
                // Agents up to the session-11 release cut every stream, the long poll included, at
                // their longest scrape timeout plus 5 s: the connection is fine, so ask again (a
                // loop of resets is held back as quick answers are) rather than take the agent out.
                Err(FetchError::Reset(e)) => {
                    debug!(agent = agent_id, %remote, error = %e, "the agent reset the targets long poll; asking again")
                }
                Err(FetchError::Failed(e)) => return WatchEnd::Failed(e),
            }
            quick_in_a_row = match asked.elapsed() < MIN_TARGETS_INTERVAL {
                true => quick_in_a_row + 1,
                false => 0,
            };
            if quick_in_a_row >= QUICK_ANSWERS_TOLERATED {
                tokio::time::sleep_until(asked + MIN_TARGETS_INTERVAL).await;
            }
        }
    }
}

/// Long-poll answers in a row, each within [`MIN_TARGETS_INTERVAL`], before the next request
/// waits for the interval.
const QUICK_ANSWERS_TOLERATED: u32 = 16;

/// The shortest time between two target-list requests to one agent.
const MIN_TARGETS_INTERVAL: Duration = Duration::from_secs(1);

/// Why a target-list request got no list.
enum FetchError {
    /// The agent reset the request's stream, the connection still up.
    Reset(String),
    /// Anything else: the connection is going away, a timeout, an invalid answer.
    Failed(String),
}

impl From<String> for FetchError {
    fn from(reason: String) -> Self {
        FetchError::Failed(reason)
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Reset(e) | FetchError::Failed(e) => f.write_str(e),
        }
    }
}

async fn fetch_targets(
    sender: &Sender,
    after: Option<u64>,
    timeout: Duration,
) -> Result<TargetList, FetchError> {
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

async fn read_target_list(response: h2::client::ResponseFuture) -> Result<TargetList, FetchError> {
    // The long poll waits for the head for a tunnel's whole life, and an async fn's state is as
    // large as its largest await: the head is out of scope and the body's reading boxed before
    // their awaits, so that the wait is all the task holds room for.
    let body = {
        let resp = h2conn::response(response).await.map_err(|e| {
            if e.is_reset() && !e.is_go_away() {
                FetchError::Reset(one_line(&e))
            } else {
                FetchError::Failed(one_line(&e))
            }
        })?;
        if resp.status() != StatusCode::OK {
            return Err(FetchError::Failed(format!(
                "agent answered {} to the targets request",
                resp.status()
            )));
        }
        resp.into_body()
    };
    let body = Box::pin(http_body_util::Limited::new(body, MAX_TARGET_LIST_BYTES).collect())
        .await
        .map_err(|e| format!("reading target list: {e}"))?
        .to_bytes();
    Ok(parse_target_list(&body)?)
}

fn parse_target_list(body: &Bytes) -> Result<TargetList, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid target list: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hint follows the alert the client sent, as rustls words the failure.
    #[test]
    fn the_handshake_hint_follows_the_clients_alert() {
        use rustls::AlertDescription as A;
        let hint = |alert| {
            let e = std::io::Error::other(rustls::Error::AlertReceived(alert));
            handshake_hint(&format!("TLS handshake failed: {e}"))
        };
        assert!(hint(A::CertificateExpired).contains("certificate expired or not valid yet"));
        assert!(!hint(A::CertificateExpired).contains("tunnel.fingerprint"));
        assert!(hint(A::UnknownCA).contains("tunnel.ca_file did not issue it"));
        assert!(hint(A::BadCertificate).contains("tunnel.ca_file does not match it"));
        assert!(hint(A::HandshakeFailure).contains("tunnel.fingerprint does not match"));
        assert!(hint(A::ProtocolVersion).contains("TLS 1.3"));
        assert!(hint(A::InternalError).contains("tunnel.fingerprint or tunnel.ca_file"));
        for alert in [A::CertificateExpired, A::UnknownCA, A::BadCertificate] {
            assert!(!hint(alert).contains('\n'), "one line: {}", hint(alert));
        }
    }
}
