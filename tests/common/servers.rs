//! A real HTTP/1.1 target server on 127.0.0.1:0 — what an exporter looks like to ferry.
//!
//! It serves every path with one `Behaviour` and records what it saw, so a test can assert that
//! ferry (not the target) refused a request: `server.requests() == 0`.
#![allow(dead_code)]

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// The Prometheus text exposition content type the target answers with.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Size of each chunk of a `Behaviour::Large` body.
pub const LARGE_CHUNK: usize = 64 * 1024;

type RespBody = BoxBody<Bytes, Infallible>;

/// How the target answers every request.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// 200 with this body as Prometheus text format.
    Metrics(String),
    /// Like `Metrics`, but gzip-compressed with `Content-Encoding: gzip` when the request's
    /// `Accept-Encoding` mentions gzip; plain otherwise.
    Gzip(String),
    /// Sleeps `delay` before answering like `Metrics(body)`.
    Slow { delay: Duration, body: String },
    /// Streams exactly `bytes` deterministic pseudo-random bytes (see `large_body_bytes`) in
    /// `LARGE_CHUNK` chunks with a `Content-Length`, never holding the body in memory.
    Large { bytes: u64 },
    /// Like `Metrics(body)`, with these extra response headers.
    WithHeaders {
        body: String,
        headers: Vec<(String, String)>,
    },
}

/// A running target server; shuts down (listener and open connections) when dropped.
pub struct TargetServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    accept: JoinHandle<()>,
}

/// What the server has been asked, in arrival order.
#[derive(Default)]
struct Seen {
    uris: Vec<String>,
    paths: Vec<String>,
    last_headers: Option<HeaderMap>,
    /// TCP connections open now (the server itself never closes an idle one).
    open: usize,
}

impl TargetServer {
    /// Binds 127.0.0.1:0 and serves `behaviour` on every path.
    pub async fn start(behaviour: Behaviour) -> TargetServer {
        Self::start_on("127.0.0.1", behaviour).await
    }

    /// Like [`TargetServer::start`], on a port of `ip` (a test host's link, say).
    pub async fn start_on(ip: &str, behaviour: Behaviour) -> TargetServer {
        let listener = TcpListener::bind((ip, 0))
            .await
            .unwrap_or_else(|e| panic!("bind target server on {ip}: {e}"));
        let addr = listener.local_addr().expect("target server local_addr");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let accept = tokio::spawn(accept_loop(listener, Arc::new(behaviour), seen.clone()));
        TargetServer { addr, seen, accept }
    }

    /// `http://<addr><path>`, e.g. `server.url("/metrics")`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// How many requests arrived, on any path.
    pub fn requests(&self) -> usize {
        self.seen().paths.len()
    }

    /// Path and query of each request, e.g. `/metrics?collect[]=cpu`.
    pub fn paths(&self) -> Vec<String> {
        self.seen().paths.clone()
    }

    /// Each request's URI exactly as received (absolute form shows up here as `http://host/...`).
    pub fn uris(&self) -> Vec<String> {
        self.seen().uris.clone()
    }

    /// TCP connections open now: the server closes none that its client keeps alive.
    pub fn open_connections(&self) -> usize {
        self.seen().open
    }

    /// Headers of the most recent request.
    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.seen().last_headers.clone()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().expect("target server state poisoned")
    }
}

impl Drop for TargetServer {
    fn drop(&mut self) {
        // The connection tasks live in a JoinSet owned by the accept task: aborting it ends them too.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, behaviour: Arc<Behaviour>, seen: Arc<Mutex<Seen>>) {
    let mut connections = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                seen.lock().expect("target server state poisoned").open += 1;
                connections.spawn(serve_connection(stream, behaviour.clone(), seen.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
        while connections.try_join_next().is_some() {}
    }
}

async fn serve_connection(stream: TcpStream, behaviour: Arc<Behaviour>, seen: Arc<Mutex<Seen>>) {
    let tally = seen.clone();
    let service = service_fn(move |req| {
        let behaviour = behaviour.clone();
        let seen = seen.clone();
        async move { Ok::<_, Infallible>(respond(&behaviour, &seen, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
    tally.lock().expect("target server state poisoned").open -= 1;
}

async fn respond(
    behaviour: &Behaviour,
    seen: &Mutex<Seen>,
    req: Request<Incoming>,
) -> Response<RespBody> {
    record(seen, &req);
    match behaviour {
        Behaviour::Metrics(body) => metrics_response(body),
        Behaviour::Gzip(body) if accepts_gzip(req.headers()) => gzip_response(body),
        Behaviour::Gzip(body) => metrics_response(body),
        Behaviour::Slow { delay, body } => {
            tokio::time::sleep(*delay).await;
            metrics_response(body)
        }
        Behaviour::Large { bytes } => large_response(*bytes),
        Behaviour::WithHeaders { body, headers } => {
            let mut resp = metrics_response(body);
            for (name, value) in headers {
                resp.headers_mut().append(
                    http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                    http::HeaderValue::from_str(value).expect("header value"),
                );
            }
            resp
        }
    }
}

fn record(seen: &Mutex<Seen>, req: &Request<Incoming>) {
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
    let mut seen = seen.lock().expect("target server state poisoned");
    seen.uris.push(req.uri().to_string());
    seen.paths.push(path);
    seen.last_headers = Some(req.headers().clone());
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("gzip"))
}

fn metrics_response(body: &str) -> Response<RespBody> {
    Response::builder()
        .header(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)
        .body(Full::new(Bytes::from(body.to_owned())).boxed())
        .expect("valid metrics response")
}

fn gzip_response(body: &str) -> Response<RespBody> {
    let mut response = metrics_response("");
    *response.body_mut() = Full::new(Bytes::from(gzip(body.as_bytes()))).boxed();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    response
}

/// Gzip-compresses `data` (what `Behaviour::Gzip` sends).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

/// Decompresses a gzip body (to check what a client received).
pub fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut decoder = flate2::write::GzDecoder::new(&mut out);
    decoder.write_all(data).expect("valid gzip data");
    decoder.finish().expect("valid gzip data");
    out
}

fn large_response(bytes: u64) -> Response<RespBody> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(
            LargeBody {
                offset: 0,
                total: bytes,
            }
            .boxed(),
        )
        .expect("valid large response")
}

/// A body that generates its chunks on demand, with an exact size hint (so a Content-Length).
struct LargeBody {
    offset: u64,
    total: u64,
}

impl Body for LargeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.offset >= this.total {
            return Poll::Ready(None);
        }
        let len = (this.total - this.offset).min(LARGE_CHUNK as u64) as usize;
        let chunk = large_body_bytes(this.offset, len);
        this.offset += len as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.total
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.total - self.offset)
    }
}

/// The bytes `offset..offset+len` of every `Behaviour::Large` body (the same for any size).
pub fn large_body_bytes(offset: u64, len: usize) -> Bytes {
    let end = offset + len as u64;
    let mut out = Vec::with_capacity(len);
    let mut pos = offset;
    while pos < end {
        let word = splitmix64(pos / 8).to_le_bytes();
        let from = (pos % 8) as usize;
        let take = (8 - from).min((end - pos) as usize);
        out.extend_from_slice(&word[from..from + take]);
        pos += take as u64;
    }
    Bytes::from(out)
}

/// The digest of a whole `Behaviour::Large { bytes }` body; compare with a `BodyDigest` fed the
/// received chunks.
pub fn large_body_digest(bytes: u64) -> u64 {
    let mut digest = BodyDigest::new();
    let mut offset = 0;
    while offset < bytes {
        let len = (bytes - offset).min(LARGE_CHUNK as u64) as usize;
        digest.update(&large_body_bytes(offset, len));
        offset += len as u64;
    }
    digest.finish()
}

/// An order-sensitive streaming checksum (not cryptographic) that gives the same result however
/// the data is split into chunks.
#[derive(Clone, Debug)]
pub struct BodyDigest {
    state: u64,
    pending: [u8; 8],
    pending_len: usize,
    total: u64,
}

impl Default for BodyDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl BodyDigest {
    pub fn new() -> Self {
        BodyDigest {
            state: 0x243F_6A88_85A3_08D3,
            pending: [0; 8],
            pending_len: 0,
            total: 0,
        }
    }

    /// Feeds the next chunk.
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.pending_len > 0 {
            let take = (8 - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.pending));
            self.pending_len = 0;
        }
        let mut words = data.chunks_exact(8);
        for word in &mut words {
            self.mix(u64::from_le_bytes(word.try_into().expect("8-byte chunk")));
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// How many bytes were fed so far.
    pub fn bytes_seen(&self) -> u64 {
        self.total
    }

    /// The digest of everything fed so far.
    pub fn finish(&self) -> u64 {
        let mut end = self.clone();
        if end.pending_len > 0 {
            end.pending[end.pending_len..].fill(0);
            end.mix(u64::from_le_bytes(end.pending));
        }
        end.mix(end.total);
        splitmix64(end.state)
    }

    fn mix(&mut self, word: u64) {
        self.state = (self.state ^ word)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(31);
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Reads a request head (through the blank line) off a raw connection, as the hand-rolled
/// servers of tests that need to misbehave do; `None` if the peer closed first.
pub async fn read_request_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// A server on 127.0.0.1:0 that answers every request with exactly `response` (raw bytes, so it
/// may be malformed or cut short), then closes the connection.
pub async fn canned_server(response: &'static [u8]) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind canned server");
    let addr = listener.local_addr().expect("canned server address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut s).await.is_some() {
                    let _ = s.write_all(response).await;
                }
            });
        }
    });
    addr
}

/// A server on 127.0.0.1:0 that answers every request with `start` (a response head and the
/// beginning of its body) and then sends nothing more, holding the connection open: a target
/// whose body outlasts any scrape timeout.
pub async fn stalling_server(start: &'static [u8]) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind stalling server");
    let addr = listener.local_addr().expect("stalling server address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut s).await.is_some() && s.write_all(start).await.is_ok() {
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    addr
}

/// A keep-alive target that, like Python's http.server, never reads a body on GET: it answers
/// every request head it finds in the byte stream with 200 and records every byte it received.
/// A body that reached it would be read as the next request: [`RawTarget::request_lines`] shows
/// exactly what it served.
pub struct RawTarget {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    accept: JoinHandle<()>,
}

impl RawTarget {
    /// Binds 127.0.0.1:0 and answers every request with `body`.
    pub async fn start(body: &'static str) -> RawTarget {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw target on 127.0.0.1:0");
        let addr = listener.local_addr().expect("raw target local_addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        let accept = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve_raw(stream, body, seen.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        RawTarget {
            addr,
            received,
            accept,
        }
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every byte received, on all connections, as text.
    pub fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().expect("raw target state")).into_owned()
    }

    /// The request lines it answered (`GET /metrics HTTP/1.1`), in order.
    pub fn request_lines(&self) -> Vec<String> {
        self.received()
            .lines()
            .filter(|l| l.ends_with(" HTTP/1.1") || l.ends_with(" HTTP/1.0"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for RawTarget {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn serve_raw(mut stream: TcpStream, body: &'static str, received: Arc<Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        received
            .lock()
            .expect("raw target state")
            .extend_from_slice(&buf[..n]);
        pending.extend_from_slice(&buf[..n]);
        // Each head is answered; whatever follows it is taken for the next head.
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {METRICS_CONTENT_TYPE}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}
