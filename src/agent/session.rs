//! The reconnect loop and one tunnel session: TCP (maybe via a proxy) → TLS → upgrade → HTTP/2
//! server over the upgraded stream, until it drops or we shut down.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioTimer;
use rustls::pki_types::ServerName;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::backoff::{slow_retry, Backoff};
use super::serve::ClosingNotice;
use super::Shared;
use crate::config::{read_token_file, AgentConfig, Secret};
use crate::telemetry::ResultLabels;
use crate::tunnel::dial::{dial, BoxIo, DialError};
use crate::tunnel::handshake::{request_upgrade, HandshakeError};
use crate::tunnel::tls_client::{sent_no_chain, ClientTls, ServerVerify};
use crate::tunnel::{ClosingKind, TARGETS_LONG_POLL};

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("TLS handshake with the gateway failed: {0}")]
    Tls(String),
    /// The gateway refused our client certificate (or its absence): the same one would be
    /// refused again, like a refused token.
    #[error("TLS handshake with the gateway failed: {0}")]
    ClientCertRefused(String),
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// A handshake failure that shows the gateway URL points at the wrong thing, with the fix.
    #[error("{0}")]
    Misdirected(String),
    #[error("tunnel handshake timed out after {after:?}{phase}")]
    Timeout {
        after: Duration,
        /// Where it stalled (` in the TLS handshake`), when known: a path that drops packets
        /// after the TCP connection is made (a firewall, a TLS-inspecting middlebox) shows here.
        phase: &'static str,
    },
    #[error("no token to connect with: {0}")]
    Token(String),
}

/// How long after the gateway announced its shutdown failed attempts are taken for its restart.
const RESTART_EXPECTED_WITHIN: Duration = Duration::from_secs(60);

/// How a session that started ended.
enum SessionEnd {
    /// The connection dropped (gateway restart, network, keepalive timeout).
    Closed(String),
    /// The gateway closed it on purpose and said why first.
    ClosedByGateway(ClosingNotice),
    /// We were asked to stop.
    Shutdown,
}

pub(super) async fn reconnect_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let b = shared.config.backoff;
    let mut backoff = Backoff::new(b.min, b.max);
    let mut token = Token::new(&shared);
    let gateway = &shared.config.gateway.addr;
    let agent = &shared.config.agent_id;
    log_route(&shared.config);
    // When the gateway last said it was shutting down: failed attempts in the minute after are
    // the restart it announced, not trouble to warn about (a gateway gone for longer is).
    let mut restart_announced: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let outcome = run_session(&shared, &mut token, &shutdown).await;
        record_trouble(&shared, &outcome);
        match &outcome {
            Ok(SessionEnd::ClosedByGateway(notice)) if notice.kind == ClosingKind::Shutdown => {
                restart_announced = Some(Instant::now());
            }
            Ok(_) => restart_announced = None,
            Err(_) => {}
        }
        let delay = match outcome {
            Ok(SessionEnd::Shutdown) => break,
            Ok(SessionEnd::Closed(reason)) => {
                if started.elapsed() >= b.stable_after {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                warn!(%gateway, %reason, retry_in = ?delay, "tunnel closed; reconnecting");
                delay
            }
            Ok(SessionEnd::ClosedByGateway(notice)) => {
                closed_by_gateway(&shared, notice, &mut token, &mut backoff, started.elapsed())
            }
            Err(SessionError::Handshake(e)) if e.is_id_conflict() => {
                count(&shared, "conflict");
                let delay = slow_retry(b.auth_failure);
                error!(%gateway, %agent, error = %e, retry_in = ?delay, "GATEWAY REFUSED OUR AGENT ID: another agent holds it with another token; give each agent its own agent_id");
                delay
            }
            Err(SessionError::Handshake(e)) if e.is_auth_refusal() => {
                count(&shared, "auth_refused");
                let delay = slow_retry(b.auth_failure);
                error!(%gateway, %agent, error = %e, retry_in = ?delay, "GATEWAY REFUSED OUR CREDENTIALS: check the token and the tokens file's glob for this agent id");
                delay
            }
            // Like the gateway's 401: the same credentials would be refused again soon.
            Err(SessionError::Dial(e)) if e.is_proxy_auth_refusal() => {
                count(&shared, "auth_refused");
                let delay = slow_retry(b.auth_failure);
                error!(%gateway, error = %e, retry_in = ?delay, "PROXY REFUSED OUR CREDENTIALS: check the user and password in --proxy-url or HTTPS_PROXY (percent-encode '@', ':' and '%' in them)");
                delay
            }
            Err(SessionError::ClientCertRefused(e)) => {
                count(&shared, "auth_refused");
                let delay = slow_retry(b.auth_failure);
                error!(%gateway, %agent, error = %e, retry_in = ?delay, "GATEWAY REFUSED OUR CLIENT CERTIFICATE (or that we sent none): give the agent one the gateway accepts (tunnel.cert_file and tunnel.key_file, valid now, signed by a CA in the gateway's --tunnel.tls-client-ca-file), then reload the agent (SIGHUP) to connect at once");
                delay
            }
            Err(SessionError::Token(e)) => {
                count(&shared, "error");
                let delay = slow_retry(b.auth_failure);
                error!(%gateway, %agent, error = %e, retry_in = ?delay, "CANNOT READ OUR TOKEN: fix the token file");
                delay
            }
            Err(e) => {
                count(&shared, "error");
                let delay = backoff.next_delay();
                // The whole chain: the cause of a failed handshake (a TLS alert from the
                // gateway, a closed connection) is in the sources, not in the top error.
                let error = crate::scrape_error::one_line(&e);
                if restart_announced.is_some_and(|at| at.elapsed() < RESTART_EXPECTED_WITHIN) {
                    info!(%gateway, %error, retry_in = ?delay, "cannot open tunnel yet: the gateway said it was shutting down (restarting?)");
                } else {
                    warn!(%gateway, %error, retry_in = ?delay, "cannot open tunnel");
                }
                delay
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
            _ = shared.reconnect_now.notified() => {
                info!(%gateway, "reconnecting now, as asked (reload)");
            }
        }
    }
    info!("agent stopped");
}

/// Logs why the gateway closed the tunnel, as it said, and returns how long to wait before
/// reconnecting.
fn closed_by_gateway(
    shared: &Shared,
    notice: ClosingNotice,
    token: &mut Token,
    backoff: &mut Backoff,
    lasted: Duration,
) -> Duration {
    let b = &shared.config.backoff;
    let gateway = &shared.config.gateway.addr;
    let agent = &shared.config.agent_id;
    let reason = notice.reason;
    match notice.kind {
        // Reconnecting at once would knock the other agent off in turn, every second.
        ClosingKind::IdTaken => {
            let delay = slow_retry(b.auth_failure);
            error!(%gateway, %agent, %reason, retry_in = ?delay, "GATEWAY CLOSED OUR TUNNEL: another agent claims our agent id (a cloned host keeps the host name as id); give each agent its own agent_id and token");
            delay
        }
        ClosingKind::Revoked => revoked(shared, &reason, token, backoff),
        // The same list would be refused again: only a new configuration (or gateway) helps.
        ClosingKind::TargetsRefused => {
            let delay = slow_retry(b.auth_failure);
            error!(%gateway, %agent, %reason, retry_in = ?delay, "GATEWAY REFUSED OUR TARGET LIST: fix the targets or labels in the agent's configuration");
            delay
        }
        // A restart, not trouble: back soon, with a delay drawn from the first ceiling so that
        // rolling restarts closer together than `stable_after` do not add up to the longest
        // backoff, and the gateway's agents do not all come back at once.
        ClosingKind::Shutdown => {
            backoff.reset();
            let delay = backoff.next_delay();
            info!(%gateway, %reason, retry_in = ?delay, "the gateway is shutting down (restarting?): reconnecting");
            delay
        }
        ClosingKind::Other => {
            if lasted >= b.stable_after {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            warn!(%gateway, %reason, retry_in = ?delay, "tunnel closed by the gateway; reconnecting");
            delay
        }
    }
}

/// Keeps why the last attempt failed or the last tunnel ended, for [`super::Agent::last_error`]:
/// an application embedding the agent has no log to read it in unless it installed a
/// subscriber.
fn record_trouble(shared: &Shared, outcome: &Result<SessionEnd, SessionError>) {
    let trouble = match outcome {
        Ok(SessionEnd::Shutdown) => return,
        Ok(SessionEnd::Closed(reason)) => format!("tunnel closed: {reason}"),
        Ok(SessionEnd::ClosedByGateway(notice)) => {
            format!("the gateway closed the tunnel: {}", notice.reason)
        }
        Err(e) => crate::scrape_error::one_line(e),
    };
    *shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(trouble);
}

/// After the gateway revoked our token: the last step of a rotation (the new token is in our
/// token file already) reconnects at once; otherwise the same token would be refused again, as
/// after a 401, and is retried slowly.
fn revoked(shared: &Shared, reason: &str, token: &mut Token, backoff: &mut Backoff) -> Duration {
    let b = &shared.config.backoff;
    let gateway = &shared.config.gateway.addr;
    let agent = &shared.config.agent_id;
    if let Some(file) = token.rotated(shared) {
        backoff.reset();
        let delay = backoff.next_delay();
        info!(%gateway, %agent, %reason, retry_in = ?delay, "the gateway revoked our old token; connecting with the new one from {}", file.display());
        return delay;
    }
    let delay = slow_retry(b.auth_failure);
    error!(%gateway, %agent, %reason, retry_in = ?delay, "GATEWAY REVOKED OUR TOKEN: it was removed from the gateway's tokens file or no longer covers our agent id; give this agent a token the tokens file accepts");
    delay
}

/// Says once who the agent is, what it serves and how the tunnel reaches the gateway: a proxy
/// left in the environment would otherwise only show in the errors of every attempt.
fn log_route(cfg: &AgentConfig) {
    let gateway = &cfg.gateway.addr;
    let targets: Vec<&str> = cfg.targets.iter().map(|t| t.name.as_str()).collect();
    info!(agent = %cfg.agent_id, %gateway, targets = %targets.join(","), "agent starting");
    if let Some(proxy) = &cfg.proxy {
        info!(%gateway, proxy = %proxy.addr, from = %proxy.origin, "the tunnel goes through an HTTP CONNECT proxy");
    } else if let Some(e) = cfg.proxy_exempted {
        info!(%gateway, "the tunnel goes to the gateway directly: {} exempts it from the proxy of {}", e.no_proxy_var, e.proxy_var);
    }
}

/// The token the agent connects with. From a token file it is read again before every
/// connection: after a rotation the agent uses the new token without a restart. `FERRY_TOKEN`
/// stays as it was at start-up.
struct Token {
    current: Secret,
}

impl Token {
    fn new(shared: &Shared) -> Self {
        Self {
            current: shared.config.token.clone(),
        }
    }

    /// The token for the next connection. An unreadable or empty file is an error: the old
    /// token is not used in its place, the file is what the operator maintains.
    fn refresh(&mut self, shared: &Shared) -> Result<&str, SessionError> {
        if let Some(path) = &shared.config.token_file {
            let token = read_token_file(path).map_err(SessionError::Token)?;
            if token != self.current {
                info!(file = %path.display(), "the token file changed: connecting with the new token");
                self.current = token;
            }
        }
        Ok(self.current.expose())
    }

    /// The token file, if it now holds a token other than the one in use, which it becomes.
    /// Unreadable is no: the next connection's [`Token::refresh`] says why.
    fn rotated<'a>(&mut self, shared: &'a Shared) -> Option<&'a std::path::Path> {
        let path = shared.config.token_file.as_deref()?;
        let token = read_token_file(path).ok()?;
        if token == self.current {
            return None;
        }
        self.current = token;
        Some(path)
    }
}

fn count(shared: &Shared, result: &str) {
    shared
        .metrics
        .connects
        .get_or_create(&ResultLabels {
            result: result.to_owned(),
        })
        .inc();
}

async fn run_session(
    shared: &Arc<Shared>,
    token: &mut Token,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, SessionError> {
    let token = token.refresh(shared)?;
    // `open` bounds each of its steps by one deadline, `handshake_timeout` from now.
    let upgraded = tokio::select! {
        _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        res = open(shared, token) => res?,
    };
    count(shared, "ok");
    shared.metrics.tunnel_up.set(1);
    *shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    info!(gateway = %shared.config.gateway.addr, agent = %shared.config.agent_id, "tunnel up");
    take_closing_notice(shared);
    let end = serve(shared, upgraded, shutdown).await;
    shared.metrics.tunnel_up.set(0);
    match (end, take_closing_notice(shared)) {
        (SessionEnd::Closed(_), Some(reason)) => Ok(SessionEnd::ClosedByGateway(reason)),
        (end, _) => Ok(end),
    }
}

/// The reason the gateway sent before closing the tunnel, if it did (`serve::closing_notice`).
fn take_closing_notice(shared: &Shared) -> Option<ClosingNotice> {
    shared
        .closing_notice
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
}

/// Why the TLS handshake with the gateway failed: the gateway refusing our client certificate
/// (retried slowly), or anything else.
fn tls_failure(e: &std::io::Error, tls: Option<&ClientTls>) -> SessionError {
    if let Some(refusal) = tls_alert(e).and_then(|alert| client_cert_refusal(alert, tls)) {
        return SessionError::ClientCertRefused(refusal);
    }
    SessionError::Tls(tls_failure_reason(e, tls))
}

/// A TLS failure in words, with the likely fix for the usual mistakes: the web port instead of
/// the tunnel port, a self-signed gateway without a pinned fingerprint.
fn tls_failure_reason(e: &std::io::Error, tls: Option<&ClientTls>) -> String {
    let Some(rustls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        use std::io::ErrorKind::{ConnectionReset, UnexpectedEof};
        if matches!(e.kind(), UnexpectedEof | ConnectionReset) {
            return format!(
                "{e}: the connection was closed before TLS was set up (a gateway with too many handshakes pending closes new connections for a while, see its tunnel.max_pending_handshakes; or something in between does not pass TLS through)"
            );
        }
        return e.to_string();
    };
    if sent_no_chain(rustls) {
        let trusted = match tls.map(|t| &t.verify) {
            Some(ServerVerify::CaFile(ca)) => {
                format!("a CA in {} (--tunnel.ca-file)", ca.display())
            }
            _ => "a CA this host trusts".to_owned(),
        };
        return format!(
            "the gateway's certificate is not signed by {trusted}, and the gateway sent no intermediate certificate: its certificate file (--tunnel.tls-cert-file) may lack the chain (the intermediate CA certificates after its own)"
        );
    }
    match rustls {
        rustls::Error::InvalidMessage(_) => format!(
            "{e}: the other end does not speak TLS; is --gateway the tunnel port (default 7443, not the web port 8080), and does the gateway run with TLS?"
        ),
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForNameContext { expected, presented },
        ) => format!(
            "{}; the name checked can be set to one of the certificate's with --tunnel.server-name (tunnel.server_name in the file)",
            crate::tunnel::tls::name_mismatch(&expected.to_str(), presented).replacen(
                "the certificate",
                "the gateway's certificate",
                1
            )
        ),
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName) => format!(
            "{}; the name checked can be set to one of the certificate's with --tunnel.server-name (tunnel.server_name in the file)",
            crate::tunnel::tls::rustls_reason(rustls)
        ),
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            if tls.is_some_and(|t| matches!(t.verify, ServerVerify::SystemRoots)) =>
        {
            "the gateway's certificate is not signed by a CA this host trusts: pin a self-signed gateway with --tunnel.fingerprint (the gateway logs it at start), or give its CA with --tunnel.ca-file".to_owned()
        }
        // A CA of the same name as the issuer, but another key (a CA made again), fails the
        // signature instead: the same mistake.
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        ) => {
            match tls.map(|t| &t.verify) {
                Some(ServerVerify::CaFile(ca)) => format!(
                    "the gateway's certificate is not signed by a CA in {} (--tunnel.ca-file): is it the CA that issued the gateway's certificate? A self-signed gateway is pinned with --tunnel.fingerprint instead (the gateway logs it at start)",
                    ca.display()
                ),
                _ => crate::tunnel::tls::rustls_reason(rustls),
            }
        }
        // The fingerprint check's own words; rustls would prefix them with "unexpected error".
        rustls::Error::General(words) => words.clone(),
        other => crate::tunnel::tls::rustls_reason(other),
    }
}

/// The TLS alert the gateway sent, if that is what ended the connection (`e` or a source).
fn tls_alert(e: &(dyn std::error::Error + 'static)) -> Option<rustls::AlertDescription> {
    match crate::tunnel::tls::rustls_error_in(e)? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// The gateway's refusal of our client certificate (or of its absence) in words, when `alert`
/// is one: rustls's own words (`received fatal alert: CertificateExpired`) read as if the
/// gateway's certificate had expired.
fn client_cert_refusal(alert: rustls::AlertDescription, tls: Option<&ClientTls>) -> Option<String> {
    use rustls::AlertDescription as A;
    let Some((cert, _)) = tls.and_then(|t| t.client_cert.as_ref()) else {
        return (alert == A::CertificateRequired).then(|| {
            "the gateway requires a client certificate (tunnel.cert_file and tunnel.key_file, --tunnel.cert-file and --tunnel.key-file): it asks for mTLS".to_owned()
        });
    };
    let says = match alert {
        A::CertificateExpired => "it says it has expired",
        A::UnknownCA => "it says it is not signed by a CA it trusts",
        A::CertificateRequired => "it says it got none (is the file empty?)",
        A::UnsupportedCertificate => "it says it is not usable for client authentication (its extended key usage must allow clientAuth)",
        A::CertificateRevoked => "it says it has been revoked",
        A::BadCertificate => "it says the certificate is bad (malformed, or its signature does not verify)",
        A::AccessDenied => "it says access is denied",
        // What rustls says of a certificate whose signature does not verify: signed by a CA
        // of the name it trusts, but another key (a CA made again).
        A::DecryptError => "it says its signature does not verify (was it signed by a CA made again, of the same name as the one the gateway trusts?)",
        _ => return None,
    };
    Some(format!(
        "the gateway refused our client certificate (tunnel.cert_file {}): {says}",
        cert.display()
    ))
}

/// Dial, TLS and the upgrade handshake.
async fn open(shared: &Shared, token: &str) -> Result<hyper::upgrade::Upgraded, SessionError> {
    let cfg = &shared.config;
    let after = cfg.handshake_timeout;
    let deadline = crate::http_util::deadline(Instant::now(), after);
    let stalled = |phase| move |_| SessionError::Timeout { after, phase };
    // The dial says itself which of its steps (the proxy, its CONNECT) did not answer.
    let io = dial(&cfg.gateway.addr, cfg.proxy.as_ref(), after).await?;
    // As the last reload left them: this connection keeps them whatever comes next.
    let tls = shared
        .tunnel_tls
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let settings = tls.as_ref().map(|t| &t.settings);
    let io: BoxIo = match &tls {
        Some(tls) => {
            let name = ServerName::try_from(cfg.gateway.server_name.clone())
                .map_err(|_| SessionError::ServerName(cfg.gateway.server_name.clone()))?;
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            let tls = tokio::time::timeout_at(deadline, connector.connect(name, io))
                .await
                .map_err(stalled(" in the TLS handshake (connected, then no answer)"))?;
            Box::new(tls.map_err(|e| tls_failure(&e, settings))?)
        }
        None => io,
    };
    let upgrade = request_upgrade(io, &cfg.gateway.addr, token, &cfg.agent_id);
    tokio::time::timeout_at(deadline, upgrade)
        .await
        .map_err(stalled(
            " waiting for the answer to the tunnel upgrade request",
        ))?
        .map_err(|e| upgrade_failure(e, settings))
}

/// A failed upgrade, with the fix when it shows that the gateway URL points at the wrong
/// listener: a TLS port dialled in plaintext answers with bytes that are not HTTP (a TLS front
/// end; ferry's own tunnel listener says so in a 400); the web listener answers the upgrade's
/// path with a 404 (written for Prometheus).
fn upgrade_failure(e: HandshakeError, tls: Option<&ClientTls>) -> SessionError {
    let plaintext = tls.is_none();
    // TLS 1.3 sends the client certificate after the client's side of the handshake is done:
    // the gateway's refusal of it arrives as an alert when the upgrade's answer is read.
    if let Some(refusal) = tls_alert(&e).and_then(|alert| client_cert_refusal(alert, tls)) {
        return SessionError::ClientCertRefused(refusal);
    }
    let hint = match &e {
        HandshakeError::Http(http) if plaintext && http.is_parse() => {
            "the answer was not HTTP: that port speaks TLS (use an https:// gateway URL and drop --tunnel.insecure-plaintext, tunnel.insecure_plaintext in the file) or something else than HTTP: check the gateway URL's port"
        }
        HandshakeError::Refused { status, .. } if *status == http::StatusCode::NOT_FOUND => {
            "this looks like the gateway's web listener (or another web server), not its tunnel listener (default port 7443): point the gateway URL at the tunnel port"
        }
        // A tunnel listener asks for a token (Bearer); a user and password is what the web
        // listener asks for when web.config_file sets basic auth.
        e if e.asks_for_basic_auth() => {
            "the answer asks for a user and password (basic auth), which ferry's tunnel listener never does: this looks like the gateway's web listener behind web.config_file, not its tunnel listener (default port 7443): point the gateway URL at the tunnel port"
        }
        _ => return SessionError::Handshake(e),
    };
    SessionError::Misdirected(format!("{}: {hint}", crate::scrape_error::one_line(&e)))
}

/// Spawns hyper's stream tasks on the runtime, tracked in `streams`, each for `limit` at most,
/// except the gateway's targets long poll, held by design for up to [`TARGETS_LONG_POLL`].
#[derive(Clone)]
struct TrackedExecutor {
    streams: TaskTracker,
    /// How long a scrape's stream may live: the longest scrape, plus a margin. Its deadline is
    /// checked as its body is read, which hyper stops doing while the gateway grants no
    /// flow-control window: a gateway that never reads would hold the target connection for ever.
    limit: Duration,
}

tokio::task_local! {
    /// Set by a stream's handler when the stream is the targets long poll: the executor cannot
    /// tell one stream from another, and a long poll cut at a scrape's limit ends the gateway's
    /// watch of the agent's targets, which takes the agent out of its service discovery.
    static LONG_POLL: std::cell::Cell<bool>;
}

/// Marks the stream being served as the targets long poll (see [`TrackedExecutor`]).
pub(super) fn serving_long_poll() {
    let _ = LONG_POLL.try_with(|poll| poll.set(true));
}

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let limit = self.limit;
        let stream = async move {
            let started = Instant::now();
            let mut fut = std::pin::pin!(fut);
            if tokio::time::timeout_at(started + limit, fut.as_mut())
                .await
                .is_ok()
            {
                return;
            }
            if !LONG_POLL.with(std::cell::Cell::get) {
                // Dropped: hyper resets the stream, the target connection is closed.
                return warn!(?limit, "a scrape outlived the longest scrape timeout (the gateway stopped taking its body): cut off");
            }
            let limit = TARGETS_LONG_POLL + limit;
            if tokio::time::timeout_at(started + limit, fut).await.is_err() {
                warn!(?limit, "the gateway's targets long poll outlived its longest hold (the gateway stopped taking the answer): cut off");
            }
        };
        self.streams
            .spawn(LONG_POLL.scope(std::cell::Cell::new(false), stream));
    }
}

/// What the tunnel's connection has done, for [`watch_progress`].
#[derive(Default)]
struct Progress {
    /// Whether the gateway has sent anything since the upgrade.
    heard: std::sync::atomic::AtomicBool,
    /// Since when (milliseconds after `epoch`, plus one) writes have found no room, or 0.
    blocked_since: std::sync::atomic::AtomicU64,
    epoch: std::sync::OnceLock<tokio::time::Instant>,
}

impl Progress {
    fn now_ms(&self) -> u64 {
        let epoch = *self.epoch.get_or_init(tokio::time::Instant::now);
        u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn wrote<T>(&self, poll: &Poll<std::io::Result<T>>) {
        use std::sync::atomic::Ordering::Relaxed;
        if poll.is_ready() {
            self.blocked_since.store(0, Relaxed);
        } else if self.blocked_since.load(Relaxed) == 0 {
            self.blocked_since.store(self.now_ms(), Relaxed);
        }
    }
}

/// Ends when the tunnel is alive in name only: the gateway answered the upgrade and then sent
/// nothing (no HTTP/2 preface) within `handshake`, or it has taken none of what the agent sends
/// for `stalled` (its process hung, or the path went dead in the middle of a large scrape).
/// hyper's keepalive covers neither: it starts after the HTTP/2 handshake, and when its PING
/// goes unanswered it sends GOAWAY and waits to flush it, behind bytes that never leave.
async fn watch_progress(progress: &Progress, handshake: Duration, stalled: Duration) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if !progress.heard.load(Relaxed) && started.elapsed() >= handshake {
            return format!("the gateway accepted the tunnel and then sent nothing within {handshake:?} (no HTTP/2): is it a ferry gateway, and is it hung?");
        }
        let since = progress.blocked_since.load(Relaxed);
        if since != 0 && progress.now_ms().saturating_sub(since) >= stalled.as_millis() as u64 {
            return format!("the gateway has taken none of what the agent sends for {stalled:?} (it stopped reading: hung or overloaded)");
        }
    }
}

/// How many streams the gateway may have opened and cancelled before the agent took them up:
/// what a stall of a few scrape intervals queues for an agent with a few hundred targets.
const PENDING_ACCEPT_RESETS: usize = 1024;

/// Serves HTTP/2 over the tunnel until it ends or `shutdown`, then drains within the grace period.
async fn serve(
    shared: &Arc<Shared>,
    upgraded: hyper::upgrade::Upgraded,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let cfg = &shared.config;
    let svc_shared = shared.clone();
    let closing = shutdown.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = svc_shared.clone();
        let closing = closing.clone();
        async move {
            Ok::<_, std::convert::Infallible>(super::serve::handle(shared, req, closing).await)
        }
    });
    // hyper runs each stream (a scrape, to the last byte of its body) as a task of its own:
    // tracked, so that a drain cut short can say how many scrapes it cut.
    let streams = TaskTracker::new();
    let io = SharedIo::new(upgraded);
    let executor = TrackedExecutor {
        streams: streams.clone(),
        limit: cfg.scrape_timeout_max + STREAM_MARGIN,
    };
    let conn = hyper::server::conn::http2::Builder::new(executor)
        .timer(TokioTimer::new())
        .keep_alive_interval(cfg.keepalive.interval)
        .keep_alive_timeout(cfg.keepalive.timeout)
        .max_concurrent_streams(cfg.max_concurrent_scrapes)
        // Scrapes Prometheus gave up on while the tunnel was stalled (a paused VM, a congested
        // path) arrive on resume together with their cancellations: with h2's default of 20
        // such streams the agent closed a working tunnel as "excessive load". Still bounded,
        // against a gateway that resets streams in a loop.
        .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS)
        .max_header_list_size(crate::tunnel::MAX_HEADER_LIST)
        .header_table_size(0)
        .serve_connection(io.clone(), service);
    let mut conn = std::pin::pin!(conn);
    // As long as a PING may go unanswered: writes that find no room for that long mean the
    // gateway reads nothing, and hyper's own keepalive cannot end such a tunnel (its GOAWAY
    // waits behind the unsent bytes).
    let stalled = cfg.keepalive.timeout;
    tokio::select! {
        res = conn.as_mut() => SessionEnd::Closed(match res {
            Ok(()) => "closed by the gateway".into(),
            // hyper's words ("http2 error: keep-alive timed out: operation timed out") say
            // neither how long nor what it likely means.
            Err(e) if e.is_timeout() => format!(
                "our keepalive PING got no answer within {:?}: the gateway, or the path to it, is gone",
                cfg.keepalive.timeout
            ),
            // The chain: hyper's own words are only "http2 error", the cause is in its source.
            Err(e) => crate::scrape_error::one_line(&e),
        }),
        reason = watch_progress(&io.progress, cfg.handshake_timeout, stalled) => {
            io.close().await;
            SessionEnd::Closed(reason)
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            if tokio::time::timeout(cfg.shutdown_grace, conn).await.is_err() {
                match streams.len() {
                    // HTTP/2's graceful close waits for the gateway to acknowledge the GOAWAY
                    // (a PING round trip): a gateway that cannot be reached never does.
                    0 => warn!(grace = ?cfg.shutdown_grace, "the gateway did not acknowledge our closing within the shutdown grace period (unreachable?); closing the tunnel"),
                    scrapes => warn!(grace = ?cfg.shutdown_grace, scrapes, "scrapes still running when the shutdown grace period ended; cutting them off"),
                }
                io.close().await;
            }
            SessionEnd::Shutdown
        }
    }
}

/// The tunnel's stream, shared with the HTTP/2 server that reads and writes it. When the
/// shutdown grace period ends with scrapes still running, the server is given up, and the
/// stream is still at hand to close as TLS means it (close_notify): the gateway then sees an
/// agent that stopped, not one that died.
#[derive(Clone)]
struct SharedIo {
    io: Arc<std::sync::Mutex<hyper::upgrade::Upgraded>>,
    progress: Arc<Progress>,
}

/// What a stream may take beyond the longest scrape timeout: the body's last bytes on their way.
const STREAM_MARGIN: Duration = Duration::from_secs(5);

/// How long closing a tunnel given up may take (a gateway that reads nothing any more).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

impl SharedIo {
    fn new(io: hyper::upgrade::Upgraded) -> Self {
        Self {
            io: Arc::new(std::sync::Mutex::new(io)),
            progress: Arc::default(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(Pin<&mut hyper::upgrade::Upgraded>) -> R) -> R {
        // Locked only inside one poll, never across an await: a poisoned lock still holds the
        // stream, which is closed anyway.
        let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        f(Pin::new(&mut *io))
    }

    /// Sends TLS close_notify and closes our side of the connection.
    async fn close(&self) {
        let shut =
            std::future::poll_fn(|cx| self.with(|io| hyper::rt::Write::poll_shutdown(io, cx)));
        if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, shut).await {
            tracing::debug!(error = %e, "closing the tunnel failed");
        }
    }
}

impl hyper::rt::Read for SharedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let poll = self.with(|io| hyper::rt::Read::poll_read(io, cx, buf));
        if poll.is_ready() {
            self.progress
                .heard
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        poll
    }
}

impl hyper::rt::Write for SharedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = self.with(|io| hyper::rt::Write::poll_write(io, cx, buf));
        self.progress.wrote(&poll);
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = self.with(|io| hyper::rt::Write::poll_flush(io, cx));
        self.progress.wrote(&poll);
        poll
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.with(|io| hyper::rt::Write::poll_shutdown(io, cx))
    }

    fn is_write_vectored(&self) -> bool {
        self.with(|io| hyper::rt::Write::is_write_vectored(&*io))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = self.with(|io| hyper::rt::Write::poll_write_vectored(io, cx, bufs));
        self.progress.wrote(&poll);
        poll
    }
}
