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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::http_util::Body;

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

/// Serves HTTP/1.1 on `listener` until `shutdown`, then lets in-flight requests finish for up to `grace`.
///
/// `handler` is called once per request with the peer's address.
pub async fn serve_http<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: CancellationToken,
    grace: Duration,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let drain = Drain {
        grace,
        cut_off: "the server is shutting down",
    };
    let no_tls = None;
    serve_http_tracked::<_, _, _, _, fn(SocketAddr, String)>(
        listener,
        handler,
        |_| (),
        no_tls,
        shutdown,
        drain,
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
/// until the connection closes (a metrics guard, typically). With `tls`, connections speak TLS,
/// and its callback is told of each connection whose handshake failed (the peer, why).
/// Returns once every connection is closed, or its requests were cut off and answered.
pub(crate) async fn serve_http_tracked<H, F, A, G, T>(
    listener: TcpListener,
    handler: H,
    on_accept: A,
    tls: Option<(ReloadableTls, T)>,
    shutdown: CancellationToken,
    drain: Drain,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
    A: Fn(SocketAddr) -> G,
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
        .header_read_timeout(HEADER_READ_TIMEOUT);
    while let Some((stream, peer)) = accept(&listener, &shutdown).await {
        let guard = on_accept(peer);
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

/// Sleeps after a failed `accept`: long when out of file descriptors, briefly otherwise.
pub(crate) async fn accept_backoff(e: &std::io::Error) {
    // ENFILE (23) / EMFILE (24): retrying at once would spin; give connections time to close.
    let emfile = matches!(e.raw_os_error(), Some(23 | 24));
    let pause = if emfile {
        Duration::from_millis(500)
    } else {
        Duration::from_millis(10)
    };
    warn!(error = %e, ?pause, "accept failed");
    tokio::time::sleep(pause).await;
}
