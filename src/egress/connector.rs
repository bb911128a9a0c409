//! The upstream connector: resolves the name itself, keeps only addresses the rule allows, and
//! connects to one of those — the address it checked, so a DNS answer cannot be rebound between
//! check and connect.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::{Connected, Connection};
use rustls::pki_types::ServerName;

use crate::http_util::authority;
use crate::telemetry::geo::SharedGeo;
use crate::telemetry::{ConnectionGuard, ConnectionMetrics};

use super::policy::{parse_ip_literal, special_purpose, SharedResolver, Upstream};

/// Why no connection to the upstream was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Every address of the host is one the rule does not allow.
    #[error("{host} resolves to a {why} address, which no rule names")]
    Forbidden {
        /// The host asked for.
        host: String,
        /// Why its addresses are refused (`loopback`, `private`, …).
        why: &'static str,
    },
    /// The name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// The resolver did not answer in time.
    #[error("cannot resolve {host}: no answer within {}", humantime::format_duration(*after))]
    ResolveTimeout {
        /// The host.
        host: String,
        /// The connect timeout, which bounds the lookup too.
        after: Duration,
    },
    /// No allowed address accepted the connection.
    #[error("cannot connect to {}: {reason}", authority(host, *port))]
    Connect {
        /// The host.
        host: String,
        /// The port.
        port: u16,
        /// The last error.
        reason: String,
    },
    /// The TLS handshake of a `tls_upgrade` rule failed.
    #[error("TLS handshake with {authority} failed: {reason}")]
    Tls {
        /// `host:port` of the upstream.
        authority: String,
        /// What went wrong, in plain words.
        reason: String,
    },
    /// The upstream accepted the connection but did not finish the TLS handshake in time.
    #[error("TLS handshake with {authority} timed out after {}", humantime::format_duration(*after))]
    TlsTimeout {
        /// `host:port` of the upstream.
        authority: String,
        /// The connect timeout, which bounds the handshake too.
        after: Duration,
    },
    /// The URI has no host.
    #[error("request URI has no host")]
    NoHost,
}

/// All addresses of `host`, from a resolver given `timeout` to answer: a slow one must not
/// hold the request (and its connection slot) for as long as it likes.
pub async fn resolve(
    resolver: &SharedResolver,
    host: &str,
    timeout: Duration,
) -> Result<Vec<IpAddr>, ConnectError> {
    match tokio::time::timeout(timeout, resolver.resolve(host)).await {
        Ok(Ok(addrs)) => Ok(addrs),
        Ok(Err(source)) => Err(ConnectError::Resolve {
            host: host.to_owned(),
            source,
        }),
        Err(_) => Err(ConnectError::ResolveTimeout {
            host: host.to_owned(),
            after: timeout,
        }),
    }
}

/// Resolves `host` (within `timeout`) and keeps the addresses `rule` allows on `port`, in
/// resolver order.
pub async fn checked_addrs(
    resolver: &SharedResolver,
    rule: &Upstream,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, ConnectError> {
    let addrs: Vec<IpAddr> = match parse_ip_literal(host) {
        Some(ip) => vec![ip],
        None => resolve(resolver, host, timeout).await?,
    };
    let allowed: Vec<SocketAddr> = addrs
        .iter()
        .filter(|ip| rule.allows_addr(**ip, port))
        .map(|ip| SocketAddr::new(*ip, port))
        .collect();
    if allowed.is_empty() {
        let why = addrs
            .iter()
            .find_map(|ip| special_purpose(*ip))
            .unwrap_or("not allowed");
        return Err(ConnectError::Forbidden {
            host: host.to_owned(),
            why,
        });
    }
    Ok(allowed)
}

/// Connects to the first of `addrs` that answers, all within `timeout`: each address gets an
/// equal share of the time left. A timeout per address would let a name with many addresses
/// that do not answer (the client picks the name) hold the client's connection for that many
/// timeouts.
pub async fn connect_any(
    host: &str,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let mut last = String::from("no address");
    // A name's address is worth saying; an IP literal's is the host itself.
    let literal = host.parse::<std::net::IpAddr>().is_ok();
    let deadline = crate::http_util::deadline(tokio::time::Instant::now(), timeout);
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
        let why = match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "timed out after {:?}",
                Duration::from_millis(u64::try_from(share.as_millis()).unwrap_or(u64::MAX))
            ),
        };
        last = if literal {
            why
        } else {
            format!("{addr}: {why}")
        };
    }
    Err(ConnectError::Connect {
        host: host.to_owned(),
        port: addrs.first().map_or(0, |a| a.port()),
        reason: last,
    })
}

/// Counts upstream connections by the country of the address connected to.
#[derive(Clone, Debug)]
pub struct UpstreamTracker {
    /// The egress role's connection metrics.
    pub metrics: ConnectionMetrics,
    /// Country lookup.
    pub geo: SharedGeo,
}

impl UpstreamTracker {
    /// Counts `stream` as an open upstream connection until the guard drops.
    pub fn track(&self, stream: &TcpStream) -> Option<ConnectionGuard> {
        let peer = stream.peer_addr().ok()?;
        Some(self.metrics.track("upstreams", self.geo.lookup(peer.ip())))
    }
}

/// An upstream connection that stays counted as open while it lives (in the pool too).
pub struct TrackedStream {
    io: TokioIo<TcpStream>,
    _open: Option<ConnectionGuard>,
}

impl hyper::rt::Read for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl Connection for TrackedStream {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

/// A hyper-util connector bound to one rule.
#[derive(Clone)]
pub struct CheckedConnector {
    rule: Arc<Upstream>,
    resolver: SharedResolver,
    timeout: Duration,
    tracker: UpstreamTracker,
}

impl CheckedConnector {
    /// A connector allowing what `rule` allows.
    pub fn new(
        rule: Arc<Upstream>,
        resolver: SharedResolver,
        timeout: Duration,
        tracker: UpstreamTracker,
    ) -> Self {
        Self {
            rule,
            resolver,
            timeout,
            tracker,
        }
    }
}

impl tower_service::Service<Uri> for CheckedConnector {
    type Response = TrackedStream;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or(ConnectError::NoHost)?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let default = if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            };
            let port = uri.port_u16().unwrap_or(default);
            let addrs =
                checked_addrs(&this.resolver, &this.rule, &host, port, this.timeout).await?;
            let stream = connect_any(&host, &addrs, this.timeout).await?;
            let open = this.tracker.track(&stream);
            Ok(TrackedStream {
                io: TokioIo::new(stream),
                _open: open,
            })
        })
    }
}

/// A [`CheckedConnector`] whose connections speak verified TLS (`tls_upgrade`): the handshake is
/// bounded by the connect timeout, and its failures are said in plain words.
#[derive(Clone)]
pub struct TlsConnector {
    inner: CheckedConnector,
    tls: Arc<rustls::ClientConfig>,
    /// What the refusals of a handshake say about the rule's TLS settings.
    words: Arc<TlsWords>,
}

/// A `tls_upgrade` rule's TLS settings in words, for the refusals of its handshakes.
pub struct TlsWords {
    /// The rule's name.
    pub rule: String,
    /// The CAs it trusts (`/etc/ferry/ca.pem (tls_upgrade.ca_file of rule "x")`).
    pub trusted: String,
    /// The client certificate it presents, if any
    /// (`/etc/ferry/client.pem (tls_upgrade.cert_file of rule "x")`).
    pub client_cert: Option<String>,
}

impl TlsWords {
    /// What to say of `alert`, sent by the upstream, when it concerns the client certificate:
    /// one it asks for and the rule does not send, or the one the rule sent.
    pub fn client_cert_alert(&self, alert: rustls::AlertDescription) -> Option<String> {
        use rustls::AlertDescription as A;
        let rule = &self.rule;
        match (&self.client_cert, alert) {
            (None, A::CertificateRequired) => Some(format!(
                "the upstream asks for a client certificate: give rule {rule:?} a tls_upgrade.cert_file and key_file"
            )),
            // What many TLS 1.2 servers send a client without the certificate they require.
            (None, A::HandshakeFailure) => Some(format!(
                "the upstream refused the handshake (TLS alert HandshakeFailure; does it require a client certificate? rule {rule:?} sends none: tls_upgrade.cert_file and key_file)"
            )),
            (
                Some(cert),
                A::CertificateRequired
                | A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied,
            ) => Some(format!(
                "the upstream refused the client certificate in {cert} (TLS alert {alert:?}): is it signed by a CA the upstream trusts, and still valid?"
            )),
            // Also what a server sends that shares no cipher or version with us, and what
            // rustls sends for a certificate whose issuer has the name of a CA it trusts but
            // another key: the certificate is a suspect, not the culprit.
            (Some(cert), A::HandshakeFailure | A::DecryptError) => Some(format!(
                "the upstream refused the handshake (TLS alert {alert:?}): it may not accept the client certificate in {cert} (signed by a CA it trusts?), or share no TLS version or cipher with ferry"
            )),
            _ => None,
        }
    }
}

impl TlsConnector {
    /// Wraps `inner` with TLS from `tls`, whose settings `words` says.
    pub fn new(inner: CheckedConnector, tls: rustls::ClientConfig, words: TlsWords) -> Self {
        Self {
            inner,
            tls: Arc::new(tls),
            words: Arc::new(words),
        }
    }
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = MaybeHttpsStream<TrackedStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        let tls = self.tls.clone();
        let words = self.words.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or(ConnectError::NoHost)?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let authority = authority(&host, uri.port_u16().unwrap_or(443));
            let name = ServerName::try_from(host).map_err(|_| ConnectError::Tls {
                authority: authority.clone(),
                reason: "the host is not a valid TLS server name".into(),
            })?;
            let timeout = inner.timeout;
            let tcp = inner.call(uri).await?;
            let handshake = tokio_rustls::TlsConnector::from(tls).connect(name, TokioIo::new(tcp));
            match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(stream)) => Ok(MaybeHttpsStream::from(stream)),
                Ok(Err(e)) => Err(ConnectError::Tls {
                    authority,
                    reason: handshake_failure(&e, &words),
                }),
                Err(_) => Err(ConnectError::TlsTimeout {
                    authority,
                    after: timeout,
                }),
            }
        })
    }
}

/// Why a TLS handshake failed, in plain words (rustls's own often read like
/// `received corrupt message of type InvalidContentType`).
fn handshake_failure(e: &std::io::Error, words: &TlsWords) -> String {
    use rustls::{CertificateError as C, Error as E};
    let trusted = &words.trusted;
    let rustls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls {
        // What came back is not a TLS record: most likely a plain-HTTP server's answer.
        Some(E::InvalidMessage(_)) => {
            "the upstream does not speak TLS on that port (is it plain HTTP?)".into()
        }
        Some(E::AlertReceived(alert)) => words
            .client_cert_alert(*alert)
            .unwrap_or_else(|| format!("the upstream refused the handshake (TLS alert {alert:?})")),
        Some(E::InvalidCertificate(C::UnknownIssuer)) => {
            format!("the certificate's issuer is not trusted: no CA in {trusted} signed it")
        }
        // A CA of the issuer's name, but another key (a CA made again), fails the signature.
        Some(E::InvalidCertificate(C::BadSignature)) => format!(
            "the certificate's signature does not verify against the CAs in {trusted} (signed by another CA of the same name?)"
        ),
        Some(E::InvalidCertificate(C::NotValidForNameContext { expected, presented })) => {
            crate::tunnel::tls::name_mismatch(&expected.to_str(), presented)
        }
        Some(other) => crate::tunnel::tls::rustls_reason(other),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the upstream closed the connection during the handshake".into()
        }
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback port with nothing listening (bound, then released).
    fn closed_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
    }

    #[tokio::test]
    async fn a_refused_connection_is_said_once() {
        let addr = closed_port();
        let err = connect_any("127.0.0.1", &[addr], Duration::from_secs(2))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("cannot connect to {addr}: "))
                && err.matches(&addr.to_string()).count() == 1,
            "{err}"
        );
        let err = connect_any("collector.example", &[addr], Duration::from_secs(2))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "cannot connect to collector.example:{}: {addr}: ",
                addr.port()
            )),
            "a name's address is said: {err}"
        );
    }

    /// A name with many addresses that never answer holds the client for `timeout` in all,
    /// not for a timeout per address.
    #[tokio::test]
    async fn many_silent_addresses_share_one_timeout() {
        // A listener whose accept queue is full drops further SYNs: connects to it hang.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(closed_port()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
            {
                fillers.push(s);
            }
        }
        let started = std::time::Instant::now();
        let err = connect_any("collector.example", &[addr; 5], Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
            "{took:?}: {err}"
        );
        assert!(err.contains("timed out after"), "{err}");
    }

    #[tokio::test]
    async fn an_ipv6_upstream_is_bracketed() {
        let addr = std::net::TcpListener::bind("[::1]:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let err = connect_any("::1", &[addr], Duration::from_secs(2))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("cannot connect to [::1]:{}: ", addr.port())),
            "{err}"
        );
    }
}
