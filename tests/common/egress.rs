//! Fixtures for the egress proxy's tests: an upstream that records every request it receives
//! (method, URI, headers, whole body, the TCP connection it came on), optionally over TLS; a name
//! resolver the test controls; the proxy itself in-process; and raw HTTP/1.1 over a TcpStream for
//! what real clients would never send.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry::config::{ConfigErrors, EgressSection};
use ferry::egress::policy::{Resolve, ResolveFuture};
use ferry::egress::Egress;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::http::{error_chain, Resp};

/// Upper bound on any one exchange in these helpers.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Body of the upstream's `Reply::Ok` answer.
pub const UPSTREAM_BODY: &str = "upstream ok\n";

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// The request target as received (origin-form path and query).
    pub uri: String,
    pub headers: HeaderMap,
    /// The whole body, exactly as it arrived (after HTTP framing, before any content decoding).
    pub body: Bytes,
    /// The proxy's end of the TCP connection it came on.
    pub peer: SocketAddr,
}

impl Recorded {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How the upstream answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 `UPSTREAM_BODY`, `x-upstream: yes`.
    Ok,
    /// 302 with this `Location`.
    Redirect(String),
    /// 200 with hop-by-hop headers of its own (`Connection: x-resp-hop`, `x-resp-hop`,
    /// `Keep-Alive`) next to an end-to-end `x-resp-e2e`.
    HopByHop,
    /// 200 carrying a `Ferry-Refusal` header of its own, as if the upstream were the proxy.
    FakeRefusal,
}

#[derive(Default)]
struct UpstreamState {
    requests: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
}

/// An HTTP/1.1 upstream (the collector) on 127.0.0.1 that records everything it is sent.
/// Stops (listener and open connections) when dropped.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    accept: JoinHandle<()>,
}

impl RecordingUpstream {
    /// Plain HTTP on 127.0.0.1:0, answering `Reply::Ok`.
    pub async fn start() -> RecordingUpstream {
        Self::start_with(Reply::Ok).await
    }

    /// Plain HTTP on 127.0.0.1:0 with the given reply.
    pub async fn start_with(reply: Reply) -> RecordingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream on 127.0.0.1:0");
        Self::serve(listener, reply, None)
    }

    /// HTTPS on 127.0.0.1:0 with this certificate chain and key (DER).
    pub async fn start_tls(
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> RecordingUpstream {
        Self::start_tls_verifying(chain, key, None).await
    }

    /// [`RecordingUpstream::start_tls`] that requires a client certificate signed by the CA
    /// in `client_ca` (PEM).
    pub async fn start_mtls(
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        client_ca: &str,
    ) -> RecordingUpstream {
        Self::start_tls_verifying(chain, key, Some(client_ca)).await
    }

    async fn start_tls_verifying(
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        client_ca: Option<&str>,
    ) -> RecordingUpstream {
        use rustls::pki_types::pem::PemObject;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .expect("upstream certificate and key");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind TLS upstream on 127.0.0.1:0");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::serve(listener, Reply::Ok, Some(acceptor))
    }

    /// Serves on an already-bound listener (e.g. a second address on the same port).
    pub fn serve(
        listener: TcpListener,
        reply: Reply,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> RecordingUpstream {
        let addr = listener.local_addr().expect("upstream local_addr");
        let state = Arc::new(UpstreamState::default());
        let accept = tokio::spawn(accept_loop(listener, reply, tls, state.clone()));
        RecordingUpstream {
            addr,
            state,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state
            .requests
            .lock()
            .expect("upstream state poisoned")
            .clone()
    }

    pub fn request_count(&self) -> usize {
        self.state
            .requests
            .lock()
            .expect("upstream state poisoned")
            .len()
    }

    /// The last request received; panics if there was none.
    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the upstream received no request")
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Panics unless the upstream received no request and not even a TCP connection.
    pub fn assert_untouched(&self, what: &str) {
        assert_eq!(
            self.request_count(),
            0,
            "{what}: the upstream received a request: {:?}",
            self.requests()
        );
        assert_eq!(
            self.connections(),
            0,
            "{what}: the proxy opened a connection to the upstream"
        );
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    reply: Reply,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<UpstreamState>,
) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let (reply, state, tls) = (reply.clone(), state.clone(), tls.clone());
        conns.spawn(async move {
            match tls {
                None => serve_conn(stream, peer, reply, state).await,
                Some(acceptor) => {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(TIMEOUT, acceptor.accept(stream)).await
                    {
                        serve_conn(tls, peer, reply, state).await;
                    }
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
}

async fn serve_conn<S>(stream: S, peer: SocketAddr, reply: Reply, state: Arc<UpstreamState>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let (reply, state) = (reply.clone(), state.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            state
                .requests
                .lock()
                .expect("upstream state poisoned")
                .push(Recorded {
                    method: parts.method,
                    uri: parts.uri.to_string(),
                    headers: parts.headers,
                    body,
                    peer,
                });
            Ok::<_, Infallible>(answer(&reply))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn answer(reply: &Reply) -> Response<Full<Bytes>> {
    let builder = Response::builder().header("x-upstream", "yes");
    let builder = match reply {
        Reply::Ok => builder
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain"),
        Reply::Redirect(location) => builder
            .status(StatusCode::FOUND)
            .header(header::LOCATION, location.as_str()),
        Reply::HopByHop => builder
            .status(StatusCode::OK)
            .header(header::CONNECTION, "x-resp-hop")
            .header("x-resp-hop", "must not reach the client")
            .header("keep-alive", "timeout=5")
            .header("x-resp-e2e", "kept"),
        Reply::FakeRefusal => builder
            .status(StatusCode::OK)
            .header("ferry-refusal", "forged by the upstream"),
    };
    builder
        .body(Full::new(Bytes::from_static(UPSTREAM_BODY.as_bytes())))
        .expect("upstream response")
}

/// A resolver with fixed answers. A name may have a sequence of answers (the last one repeats),
/// to play a DNS server that changes its mind between two lookups. Unknown names are NotFound.
#[derive(Default)]
pub struct TestResolver {
    answers: Mutex<HashMap<String, Vec<Vec<IpAddr>>>>,
    calls: Mutex<HashMap<String, usize>>,
    stalled: Mutex<Vec<String>>,
}

impl TestResolver {
    /// Each name answers with its addresses, always.
    pub fn new(entries: &[(&str, &[&str])]) -> Arc<TestResolver> {
        let resolver = TestResolver::default();
        for (name, addrs) in entries {
            resolver.set(name, addrs);
        }
        Arc::new(resolver)
    }

    /// `name` answers `addrs` from now on.
    pub fn set(&self, name: &str, addrs: &[&str]) {
        self.set_sequence(name, &[addrs]);
    }

    /// `name` answers `answers[0]` to the first lookup, `answers[1]` to the second, …, then the
    /// last one forever.
    pub fn set_sequence(&self, name: &str, answers: &[&[&str]]) {
        let parsed = answers
            .iter()
            .map(|a| {
                a.iter()
                    .map(|s| s.parse().unwrap_or_else(|_| panic!("bad test address {s}")))
                    .collect()
            })
            .collect();
        self.answers
            .lock()
            .expect("resolver poisoned")
            .insert(name.to_ascii_lowercase(), parsed);
    }

    /// Lookups of `name` never answer from now on (a DNS server that does not reply).
    pub fn stall(&self, name: &str) {
        self.stalled
            .lock()
            .expect("resolver poisoned")
            .push(name.to_ascii_lowercase());
    }

    /// Lookups of `name` so far.
    pub fn calls(&self, name: &str) -> usize {
        self.calls
            .lock()
            .expect("resolver poisoned")
            .get(&name.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }
}

impl Resolve for TestResolver {
    fn resolve(&self, host: &str) -> ResolveFuture {
        let host = host.to_ascii_lowercase();
        let n = {
            let mut calls = self.calls.lock().expect("resolver poisoned");
            let n = calls.entry(host.clone()).or_insert(0);
            *n += 1;
            *n - 1
        };
        if self
            .stalled
            .lock()
            .expect("resolver poisoned")
            .contains(&host)
        {
            return Box::pin(std::future::pending());
        }
        let answer = self
            .answers
            .lock()
            .expect("resolver poisoned")
            .get(&host)
            .map(|seq| seq[n.min(seq.len() - 1)].clone());
        Box::pin(async move {
            answer.ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{host}: no such name in the test resolver"),
                )
            })
        })
    }
}

/// Validates `section` as the YAML/flags path does; panics listing every problem.
pub fn egress_config(section: &EgressSection) -> ferry::config::EgressConfig {
    let mut errs = ConfigErrors::new("test");
    let cfg = section.validate("egress", &mut errs);
    assert!(
        errs.errors.is_empty(),
        "test egress config is invalid: {errs}"
    );
    cfg.expect("validated egress config")
}

/// The egress proxy running in-process; stops when dropped.
pub struct TestEgress {
    pub addr: SocketAddr,
    pub egress: Egress,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl TestEgress {
    /// On 127.0.0.1:0.
    pub async fn start(section: EgressSection, resolver: Arc<TestResolver>) -> TestEgress {
        Self::start_on("127.0.0.1:0", section, resolver).await
    }

    /// On `bind` (e.g. `[::1]:0`).
    pub async fn start_on(
        bind: &str,
        section: EgressSection,
        resolver: Arc<TestResolver>,
    ) -> TestEgress {
        let cfg = egress_config(&section);
        let egress = Egress::with_resolver(cfg, resolver).expect("build the egress proxy");
        let listener = TcpListener::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("bind egress proxy on {bind}: {e}"));
        let addr = listener.local_addr().expect("egress local_addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (egress, shutdown) = (egress.clone(), shutdown.clone());
            async move { egress.serve(listener, shutdown).await }
        });
        TestEgress {
            addr,
            egress,
            shutdown,
            task,
        }
    }

    /// The proxy's own `/metrics`, origin-form.
    pub async fn metrics(&self) -> String {
        let resp = super::http::get(&format!("http://{}/metrics", self.addr)).await;
        assert_eq!(resp.status, 200, "GET /metrics: {}", resp.text());
        resp.text()
    }

    /// Asserts that `ferry_egress_rejections_total{reason}` reads `n`.
    pub async fn assert_rejections(&self, reason: &str, n: f64) {
        let metrics = self.metrics().await;
        assert_eq!(
            super::ferry::metric_value(
                &metrics,
                "ferry_egress_rejections_total",
                &[("reason", reason)]
            ),
            Some(n),
            "{reason}: {metrics}"
        );
    }
}

impl Drop for TestEgress {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// Sends `req` (any body type: `Full`, a stream for chunked, …) on a new connection to `addr`
/// and reads the whole response. Set the `Host` header yourself.
pub async fn exchange<B>(addr: SocketAddr, req: Request<B>) -> Resp
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let what = format!("{} {} via {addr}", req.method(), req.uri());
    let result = tokio::time::timeout(TIMEOUT, async {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: no complete response within {TIMEOUT:?}"));
    result.unwrap_or_else(|e| panic!("{what} failed: {}", error_chain(&*e)))
}

/// An absolute-form request `method url` with `Host` from the URL, the headers and the body.
pub fn absolute(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let uri: http::Uri = url.parse().unwrap_or_else(|e| panic!("bad URL {url}: {e}"));
    let mut req = Request::builder().method(method).uri(url).header(
        header::HOST,
        uri.authority().expect("URL authority").as_str(),
    );
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(body.into())).expect("request")
}

/// One response read off a raw connection.
#[derive(Debug, Clone)]
pub struct RawResp {
    pub status: u16,
    /// The status line and headers, as text.
    pub head: String,
    pub body: Bytes,
}

impl RawResp {
    /// A header's value (case-insensitive name), first occurrence.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Reads one response: the head, then `Content-Length` bytes of body (none if absent), and not a
/// byte more (pipelined responses stay in the stream). `None` if the connection closed (or
/// failed) before a complete head.
pub async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Option<RawResp> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read_u8().await {
            Ok(byte) => head.push(byte),
            Err(_) => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut resp = RawResp {
        status,
        head,
        body: Bytes::new(),
    };
    let len: usize = resp
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let read = stream.read_exact(&mut body).await.map_or(0, |_| len);
    body.truncate(read);
    resp.body = Bytes::from(body);
    Some(resp)
}

/// Writes `bytes` on a new connection to `addr` and reads one response (panics if none).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> RawResp {
    let what = format!(
        "raw request to {addr}: {:?}",
        String::from_utf8_lossy(bytes)
    );
    tokio::time::timeout(TIMEOUT, async {
        let mut stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
        stream
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("{what}: write: {e}"));
        read_response(&mut stream)
            .await
            .unwrap_or_else(|| panic!("{what}: connection closed without a response"))
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: no response within {TIMEOUT:?}"))
}

/// Sends `CONNECT authority` (with extra header lines) and returns the answer and the stream.
pub async fn connect_raw(
    proxy: SocketAddr,
    authority: &str,
    headers: &[(&str, &str)],
) -> (RawResp, TcpStream) {
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let what = format!("CONNECT {authority} via {proxy}");
    tokio::time::timeout(TIMEOUT, async {
        let mut stream = TcpStream::connect(proxy)
            .await
            .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
        stream
            .write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{what}: write: {e}"));
        // A 200 to CONNECT has no body; a refusal has a Content-Length.
        let resp = read_response(&mut stream)
            .await
            .unwrap_or_else(|| panic!("{what}: connection closed without an answer"));
        (resp, stream)
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: no answer within {TIMEOUT:?}"))
}

/// A new self-signed CA, named `name` (rcgen's default name otherwise).
fn new_ca(name: Option<&str>) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    if let Some(name) = name {
        params.distinguished_name.push(DnType::CommonName, name);
    }
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A CA and a server certificate it signed for `names`, as (CA PEM, chain, key).
pub fn ca_and_server_cert(
    names: &[&str],
) -> (
    String,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let ca = new_ca(None);
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    (ca.pem(), vec![cert.der().clone()], key)
}

/// A new CA (PEM) named `ca_name` and a client certificate it signed, with its key, as PEM
/// files would hold them: `(ca, cert, key)`. CAs of different names are told apart by a
/// verifier before it checks a signature (one of the same name fails the signature instead).
pub fn ca_and_client_cert(ca_name: &str) -> (String, String, String) {
    let ca = new_ca(Some(ca_name));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["egress-client".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// A client certificate valid only during 2020 (its own CA, which nobody trusts), with its key:
/// `(cert, key)` as PEM files hold them.
pub fn expired_client_cert() -> (String, String) {
    let ca = new_ca(None);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["egress-client".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.signed_by(&key, &ca).unwrap();
    (cert.pem(), key.serialize_pem())
}
