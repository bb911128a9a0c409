//! HTTP/1.1 client calls for tests, one fresh connection each: origin-form to a server,
//! absolute-form through a proxy (what Prometheus sends to a `proxy_url`), and a streaming variant
//! that never buffers the body.
//!
//! Every call is bounded by `TIMEOUT` and panics with the URL when it runs out. The timeout uses
//! tokio's clock, so don't call these from a test with paused time.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Upper bound on any one call, including reading the whole body.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A connection or protocol failure (a timeout panics instead).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A complete response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Status and headers of a response whose body went to a closure.
#[derive(Debug, Clone)]
pub struct StreamedResp {
    pub status: u16,
    pub headers: HeaderMap,
    /// Body bytes delivered to the closure.
    pub body_bytes: u64,
}

/// `GET url` in origin form, straight to the URL's host and port.
pub async fn get(url: &str) -> Resp {
    get_with_headers(url, &[]).await
}

/// `GET url` in origin form with extra request headers.
pub async fn get_with_headers(url: &str, headers: &[(&str, &str)]) -> Resp {
    let what = format!("GET {url}");
    expect_ok(&what, try_get(url, headers).await)
}

/// Like `get_with_headers`, but a refused connection or broken response is an `Err`.
pub async fn try_get(url: &str, headers: &[(&str, &str)]) -> Result<Resp, Error> {
    let (connect_to, req) = origin_form(url, headers);
    let what = format!("GET {url}");
    bounded(&what, exchange_buffered(&connect_to, req)).await
}

/// `GET url` in absolute form (`GET http://host:port/path HTTP/1.1`, `Host: host:port`) sent to
/// the proxy at `proxy`.
pub async fn get_via_proxy(proxy: SocketAddr, url: &str, headers: &[(&str, &str)]) -> Resp {
    let what = format!("GET {url} via proxy {proxy}");
    expect_ok(&what, try_get_via_proxy(proxy, url, headers).await)
}

/// Like `get_via_proxy`, but a refused connection or broken response is an `Err`.
pub async fn try_get_via_proxy(
    proxy: SocketAddr,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Resp, Error> {
    let req = absolute_form(url, headers);
    let what = format!("GET {url} via proxy {proxy}");
    bounded(&what, exchange_buffered(&proxy.to_string(), req)).await
}

/// `get_via_proxy`, feeding each body chunk to `on_chunk` as it arrives instead of buffering.
pub async fn get_via_proxy_streaming(
    proxy: SocketAddr,
    url: &str,
    headers: &[(&str, &str)],
    on_chunk: impl FnMut(&[u8]),
) -> StreamedResp {
    let req = absolute_form(url, headers);
    let what = format!("GET {url} via proxy {proxy}");
    let result = bounded(&what, exchange_streaming(&proxy.to_string(), req, on_chunk)).await;
    expect_ok(&what, result)
}

/// `get_with_headers`, feeding each body chunk to `on_chunk` as it arrives instead of buffering.
pub async fn get_streaming(
    url: &str,
    headers: &[(&str, &str)],
    on_chunk: impl FnMut(&[u8]),
) -> StreamedResp {
    let (connect_to, req) = origin_form(url, headers);
    let what = format!("GET {url}");
    let result = bounded(&what, exchange_streaming(&connect_to, req, on_chunk)).await;
    expect_ok(&what, result)
}

/// Sends any request (method, URI form, headers and body as given) to `addr`.
/// Set the `Host` header yourself.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Resp {
    let what = format!("{} {} to {addr}", req.method(), req.uri());
    let result = bounded(&what, exchange_buffered(&addr.to_string(), req)).await;
    expect_ok(&what, result)
}

/// Sends `reqs` one after the other over one connection to `addr` (keep-alive), for answers that
/// must differ only in what the requests asked for: per-connection metrics stay the same.
pub async fn send_all(addr: SocketAddr, reqs: Vec<Request<Full<Bytes>>>) -> Vec<Resp> {
    let what = format!("{} requests on one connection to {addr}", reqs.len());
    let result = bounded(&what, async {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut resps = Vec::new();
        for req in reqs {
            sender.ready().await?;
            let (parts, body) = sender.send_request(req).await?.into_parts();
            resps.push(Resp {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: body.collect().await?.to_bytes(),
            });
        }
        Ok::<_, Error>(resps)
    })
    .await;
    expect_ok(&what, result)
}

/// Sends any request over an already-open connection (e.g. one from `proxy::open_tunnel`).
pub async fn send_on(stream: TcpStream, req: Request<Full<Bytes>>) -> Result<Resp, Error> {
    let what = format!("{} {}", req.method(), req.uri());
    bounded(&what, async {
        let (parts, body) = exchange_on(stream, req).await?;
        let body = body.collect().await?.to_bytes();
        Ok(Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    })
    .await
}

/// Splits an `http://` URL into the address to dial and an origin-form request.
fn origin_form(url: &str, headers: &[(&str, &str)]) -> (String, Request<Full<Bytes>>) {
    let uri = parse_http_url(url);
    let authority = authority_with_port(&uri);
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let req = build_get(path, uri.authority().map(|a| a.as_str()), headers, url);
    (authority, req)
}

/// An absolute-form request: the URI is the full URL, `Host` is its authority.
fn absolute_form(url: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let uri = parse_http_url(url);
    build_get(url, uri.authority().map(|a| a.as_str()), headers, url)
}

fn parse_http_url(url: &str) -> Uri {
    let uri: Uri = url
        .parse()
        .unwrap_or_else(|e| panic!("bad test URL {url:?}: {e}"));
    assert_eq!(
        uri.scheme_str(),
        Some("http"),
        "test URL {url:?} must be http://"
    );
    assert!(uri.authority().is_some(), "test URL {url:?} has no host");
    uri
}

fn authority_with_port(uri: &Uri) -> String {
    let host = uri.host().expect("URL host checked");
    format!("{host}:{}", uri.port_u16().unwrap_or(80))
}

fn build_get(
    target: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    url: &str,
) -> Request<Full<Bytes>> {
    let mut req = Request::get(target);
    if let Some(host) = host {
        req = req.header(header::HOST, host);
    }
    for (name, value) in headers {
        req = req.header(
            *name,
            HeaderValue::from_str(value).expect("valid header value"),
        );
    }
    req.body(Full::new(Bytes::new()))
        .unwrap_or_else(|e| panic!("build GET {url}: {e}"))
}

async fn exchange_buffered(connect_to: &str, req: Request<Full<Bytes>>) -> Result<Resp, Error> {
    let mut body = BytesMut::new();
    let streamed =
        exchange_streaming(connect_to, req, |chunk| body.extend_from_slice(chunk)).await?;
    Ok(Resp {
        status: streamed.status,
        headers: streamed.headers,
        body: body.freeze(),
    })
}

async fn exchange_streaming(
    connect_to: &str,
    req: Request<Full<Bytes>>,
    mut on_chunk: impl FnMut(&[u8]),
) -> Result<StreamedResp, Error> {
    let stream = TcpStream::connect(connect_to).await?;
    let (parts, mut body) = exchange_on(stream, req).await?;
    let mut body_bytes = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            body_bytes += data.len() as u64;
            on_chunk(&data);
        }
    }
    Ok(StreamedResp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body_bytes,
    })
}

async fn exchange_on(
    stream: TcpStream,
    req: Request<Full<Bytes>>,
) -> Result<(http::response::Parts, Incoming), Error> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // Ends by itself once the response is read and `sender` is dropped; errors surface through
    // the response or its body.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?.into_parts())
}

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no complete response within {TIMEOUT:?}"))
}

fn expect_ok<T>(what: &str, result: Result<T, Error>) -> T {
    result.unwrap_or_else(|e| panic!("{what} failed: {}", error_chain(&*e)))
}

/// `outer: cause: root cause` — hyper's own messages alone are terse.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
