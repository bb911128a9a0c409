//! The accept loop every HTTP listener of ferry uses: bounded header reads, an accept loop that
//! survives one bad connection and backs off on EMFILE, and graceful draining on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::http_util::Body;
use crate::warn_limit::WarnLimit;

/// A client connection: plain TCP or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A listener's TLS configuration, replaceable while it serves: each connection uses the one in
/// place when it is accepted (a renewed certificate needs no restart).
#[derive(Clone)]
pub struct ReloadableTls(Arc<RwLock<Arc<rustls::ServerConfig>>>);

impl ReloadableTls {
    /// Starts with `config`.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        Self(Arc::new(RwLock::new(config)))
    }

    /// Makes `config` the one for the connections accepted from now on.
    pub fn replace(&self, config: Arc<rustls::ServerConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    /// An acceptor with the configuration in place now.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        tokio_rustls::TlsAcceptor::from(config)
    }
}

/// How long a client may take to send its request headers.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client of the agent's and exporter's listeners may take none of a response before
/// its connection is closed (the gateway's: its longest scrape timeout). A response
/// body's deadline is checked as it is read, which hyper stops doing while the client's window
/// is full: without this, a client that stops reading holds its request (for the gateway, one
/// of the agent's `max_concurrent_scrapes`) for as long as it keeps the connection open.
pub(crate) const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The bound on writes that find no room: `limit` after the first of a run of them, the next
/// one fails, unless one succeeds meanwhile.
pub(crate) struct StallTimer {
    limit: Duration,
    /// Set while a write waits for room.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl StallTimer {
    pub(crate) fn new(limit: Duration) -> Self {
        Self {
            limit,
            stalled: None,
        }
    }

    #[cfg(feature = "egress")]
    pub(crate) fn limit(&self) -> Duration {
        self.limit
    }

    /// `poll`, a write's outcome, or `TimedOut` once writes have waited for `limit`.
    pub(crate) fn bounded<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: std::task::Poll<std::io::Result<R>>,
    ) -> std::task::Poll<std::io::Result<R>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stalled.as_mut().poll(cx).is_pending() {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no room to write to the client for {limit:?}: it stopped reading"),
        )))
    }
}

/// A connection whose writes fail once the peer has taken nothing for a while
/// ([`WRITE_STALL_TIMEOUT`]).
pub(crate) struct WriteStall<T> {
    inner: T,
    timer: StallTimer,
}

impl<T> WriteStall<T> {
    pub(crate) fn new(inner: T, limit: Duration) -> Self {
        Self {
            inner,
            timer: StallTimer::new(limit),
        }
    }

    fn bounded<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: std::task::Poll<std::io::Result<R>>,
    ) -> std::task::Poll<std::io::Result<R>> {
        self.timer.bounded(cx, poll)
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteStall<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteStall<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        this.bounded(cx, poll)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.bounded(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = std::pin::Pin::new(&mut this.inner).poll_flush(cx);
        this.bounded(cx, poll)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// hyper's read (and write) buffer bound per connection; a request head that does not fit is
/// answered 431 by the parser. hyper's default, about 400 KiB, lets each client trickling a head
/// for [`HEADER_READ_TIMEOUT`] hold that much. The gateway forwards heads of 32 KiB at most and
/// answers larger ones 431 itself, saying why: this leaves room for that answer.
pub(crate) const MAX_REQUEST_HEAD: usize = 128 << 10;

/// Connections a listener of [`serve_http`] holds open at once (the agent's and the exporter's
/// own endpoints: a few scrapers and health checks); more are closed at accept.
pub(crate) const MAX_CONNECTIONS: usize = 1024;

/// A bound on the connections a listener holds open at once: each costs a descriptor and up to
/// [`MAX_REQUEST_HEAD`] of buffer for as long as its client keeps it.
#[derive(Clone)]
pub(crate) struct ConnectionCap(Arc<Semaphore>);

impl ConnectionCap {
    pub(crate) fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max)))
    }

    /// A slot for one more connection, held until the returned permit drops; `None` at the cap.
    pub(crate) fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown`, then lets in-flight requests finish for up to `grace`.
///
/// `handler` is called once per request with the peer's address. At most 1,024
/// connections are open at once.
pub async fn serve_http<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: CancellationToken,
    grace: Duration,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_http_capped(listener, handler, shutdown, grace, MAX_CONNECTIONS).await;
}

/// [`serve_http`] with at most `max_connections` open at once (the benches' stand-in target
/// serves thousands of simulated agents).
pub async fn serve_http_capped<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: CancellationToken,
    grace: Duration,
    max_connections: usize,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let drain = Drain {
        grace,
        cut_off: "the server is shutting down",
    };
    let no_tls = None;
    let address = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let cap = ConnectionCap::new(max_connections);
    let warnings = WarnLimit::default();
    let on_accept = move |peer: SocketAddr| {
        let slot = cap.admit();
        if slot.is_none() {
            match warnings.admit() {
                Some(quiet) => warn!(
                    %address,
                    remote = %peer,
                    max = max_connections,
                    refused_not_logged_since_last_warning = quiet,
                    "connection closed at accept: the listener has its maximum of open connections (clients holding connections open?); at most one such warning a minute, the rest at debug level"
                ),
                None => debug!(remote = %peer, "connection closed at accept: too many open"),
            }
        }
        slot
    };
    serve_http_tracked::<_, _, _, _, fn(SocketAddr, String)>(
        listener,
        handler,
        on_accept,
        no_tls,
        shutdown,
        drain,
        WRITE_STALL_TIMEOUT,
    )
    .await;
}

/// How a listener drains on shutdown: in-flight requests may finish for `grace`; those still
/// waiting for their handler then are answered 503 with the one-line reason `cut_off`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drain {
    pub(crate) grace: Duration,
    pub(crate) cut_off: &'static str,
}

/// How long the 503s of requests cut off at the end of the grace period may take to be written.
const CUT_OFF_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Like [`serve_http`]; `on_accept` is called for every connection and what it returns is kept
/// until the connection closes (a metrics guard and a [`ConnectionCap`] slot, typically); `None`
/// closes the connection at once (the cap is reached). With `tls`, connections speak TLS,
/// and its callback is told of each connection whose handshake failed (the peer, why).
/// A client that takes nothing written to it for `write_stall` is disconnected.
/// Returns once every connection is closed, or its requests were cut off and answered.
pub(crate) async fn serve_http_tracked<H, F, A, G, T>(
    listener: TcpListener,
    handler: H,
    on_accept: A,
    tls: Option<(ReloadableTls, T)>,
    shutdown: CancellationToken,
    drain: Drain,
    write_stall: Duration,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
    A: Fn(SocketAddr) -> Option<G>,
    G: Send + 'static,
    T: Fn(SocketAddr, String) + Clone + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    // The connections still open when the grace period ends, each cut off with its request.
    let open = TaskTracker::new();
    // Fired when the grace period ends: the requests still waiting for their handler are
    // answered instead of dropped with their connection when the process exits.
    let cut = CancellationToken::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD);
    while let Some((stream, peer)) = accept(&listener, &shutdown).await {
        let Some(guard) = on_accept(peer) else {
            continue;
        };
        let handler = handler.clone();
        let cut = cut.clone();
        let service = hyper::service::service_fn(move |req| {
            let fut = handler(peer, req);
            let cut = cut.clone();
            async move {
                let resp = tokio::select! {
                    resp = fut => resp,
                    _ = cut.cancelled() => cut_off(drain.cut_off),
                };
                Ok::<_, Infallible>(resp)
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls
            .as_ref()
            .map(|(tls, on_failure)| (tls.acceptor(), on_failure.clone()));
        let stream = WriteStall::new(stream, write_stall);
        open.spawn(async move {
            let io: Box<dyn Io> = match tls {
                None => Box::new(stream),
                Some((acceptor, on_failure)) => {
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => Box::new(tls),
                        Ok(Err(e)) => {
                            return on_failure(peer, format!("TLS handshake failed: {e}"))
                        }
                        Err(_) => {
                            return on_failure(peer, "TLS handshake timed out".to_owned());
                        }
                    }
                }
            };
            let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), service));
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            drop(guard);
        });
    }
    drop(listener);
    let grace = drain.grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        // Idle connections closed at the start of the drain: each one left has a request.
        warn!(
            ?grace,
            requests = open.len(),
            "in-flight requests still running when the shutdown grace period ended; cutting them off"
        );
        cut.cancel();
        open.close();
        let _ = tokio::time::timeout(CUT_OFF_WRITE_TIMEOUT, open.wait()).await;
    }
}

/// The answer to a request cut off at the end of the shutdown grace period.
fn cut_off(reason: &str) -> Response<Body> {
    let mut resp = crate::http_util::text_response(http::StatusCode::SERVICE_UNAVAILABLE, reason);
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

/// The next connection on `listener` (with `TCP_NODELAY` set), or `None` once `shutdown` fires.
/// A failed accept never ends the loop: it backs off and tries again.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Scrapes, PINGs and small payloads: don't let Nagle hold them back.
                    let _ = stream.set_nodelay(true);
                    // On a dual-stack listener (`:port`) an IPv4 client arrives as
                    // ::ffff:a.b.c.d: allowlists, logs and country lookups want a.b.c.d.
                    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                    return Some((stream, peer));
                }
                Err(e) => accept_backoff(&e).await,
            },
        }
    }
}

/// Warnings about failed accepts, for all listeners of the process: out of file descriptors,
/// every listener fails twice a second for as long as it lasts.
static ACCEPT_WARNINGS: WarnLimit = WarnLimit::per_minute(1);

/// Counts a failed `accept`, warns about it at most once a minute, and sleeps: long when out of
/// file descriptors, briefly otherwise.
pub(crate) async fn accept_backoff(e: &std::io::Error) {
    // ENFILE (23) / EMFILE (24): retrying at once would spin; give connections time to close.
    let emfile = matches!(e.raw_os_error(), Some(23 | 24));
    let pause = if emfile {
        Duration::from_millis(500)
    } else {
        Duration::from_millis(10)
    };
    crate::telemetry::accept_errors().inc();
    match ACCEPT_WARNINGS.admit() {
        Some(quiet) => warn!(
            error = %e,
            ?pause,
            failures_not_logged_since_last_warning = quiet,
            "accept failed; at most one such warning a minute, the rest at debug level"
        ),
        None => debug!(error = %e, ?pause, "accept failed"),
    }
    tokio::time::sleep(pause).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Writes to a peer that reads nothing fail once the limit passes without progress; a peer
    /// that reads, however slowly, keeps the connection.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_takes_nothing_is_given_up_on_after_the_limit() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut conn = WriteStall::new(ours, Duration::from_secs(5));
        let chunk = [7u8; 1024];
        conn.write_all(&chunk).await.unwrap();
        // Room again only as the peer reads: 4 s, then a read, then 4 s more is fine.
        let write = conn.write_all(&chunk);
        tokio::pin!(write);
        assert!(tokio::time::timeout(Duration::from_secs(4), &mut write)
            .await
            .is_err());
        let mut buf = [0u8; 512];
        theirs.read_exact(&mut buf).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(4), &mut write)
            .await
            .is_err());
        let started = tokio::time::Instant::now();
        let err = write.await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            err.to_string()
                .contains("no room to write to the client for 5s"),
            "{err}"
        );
        assert!(started.elapsed() <= Duration::from_secs(5));
    }
}
