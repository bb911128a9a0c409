//! HTTP pieces shared by the gateway and the agent: the boxed body type, hop-by-hop header
//! stripping, and a streaming body that enforces a deadline and a size limit.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

/// Error type carried by every streamed body in ferry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response ferry builds or forwards.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body holding `bytes` in full.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A plain-text response with a one-line reason, the way ferry answers every refusal.
pub fn text_response(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{reason}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Ferry's own words, often quoting the request (a path, a host): a browser must not read
    // them as anything but text, also when a proxy refusal stands in for another site's page.
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The items of a list header such as `Accept` or `Accept-Encoding`, over all its lines: each
/// item's value (a media range, a content coding) lowercased, with its weight `q` (RFC 9110
/// §12.4.2; 1 when not given or unreadable, clamped to 0..=1). Other parameters are dropped.
pub fn weighted_items(headers: &HeaderMap, name: HeaderName) -> Vec<(String, f32)> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|item| {
            let mut params = item.split(';').map(str::trim);
            let value = params.next().filter(|v| !v.is_empty())?;
            let weight = params
                .filter_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
                .find_map(|q| q.trim().parse::<f32>().ok().filter(|q| q.is_finite()))
                .map_or(1.0, |q| q.clamp(0.0, 1.0));
            Some((value.to_ascii_lowercase(), weight))
        })
        .collect()
}

/// The highest weight among `items` named `value`, if any is.
pub fn weight_of(items: &[(String, f32)], value: &str) -> Option<f32> {
    items
        .iter()
        .filter(|(v, _)| v == value)
        .map(|(_, q)| *q)
        .reduce(f32::max)
}

/// Whether the request's `Accept-Encoding` takes gzip at least as willingly as the uncompressed
/// body (RFC 9110 §12.5.3): `gzip` (or `x-gzip`, or `*` when neither is named) with a weight above
/// zero and not below that of `identity` (or `*`). Without the header nothing is compressed.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let codings = weighted_items(headers, header::ACCEPT_ENCODING);
    let any = weight_of(&codings, "*");
    let gzip = weight_of(&codings, "gzip")
        .or_else(|| weight_of(&codings, "x-gzip"))
        .or(any)
        .unwrap_or(0.0);
    let identity = weight_of(&codings, "identity").or(any).unwrap_or(0.0);
    gzip > 0.0 && gzip >= identity
}

/// A response of `head` carrying `body`, gzip-compressed when `gzip` (see [`accepts_gzip`]), with
/// `Vary: Accept-Encoding` either way so that a cache keeps the two apart. Blocking for a large
/// body: call it from the blocking pool.
pub fn encoded_response(
    mut head: http::response::Parts,
    body: Bytes,
    gzip: bool,
) -> Response<Body> {
    head.headers
        .append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    let body = match gzip.then(|| gzip_bytes(&body)) {
        Some(Ok(compressed)) => {
            head.headers
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            Bytes::from(compressed)
        }
        Some(Err(e)) => {
            // Writing into memory cannot fail; if it ever did, the body still goes, uncompressed.
            tracing::error!(error = %e, "gzip compression failed; answering uncompressed");
            body
        }
        None => body,
    };
    head.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(head, full(body))
}

/// `data` gzip-compressed at the fastest level: a large exposition shrinks some ninefold at it, in
/// half the time the default level takes.
fn gzip_bytes(data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 8),
        flate2::Compression::fast(),
    );
    encoder.write_all(data)?;
    encoder.finish()
}

/// Whether `req` is a GET or HEAD that carries a body: frames still to come, or headers announcing
/// some. A scrape has no body, and a target that does not read one on GET (Python's http.server)
/// takes it for the next request on the connection: a request smuggled past the allowlist.
pub fn body_on_get<B: HttpBody>(req: &Request<B>) -> bool {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return false;
    }
    let headers = req.headers();
    let announced = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(0));
    announced || !req.body().is_end_stream()
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the proxy's credentials.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The port as written after the host of `authority`, if any (`host:` has none). The `http`
/// crate reads a port out of range (`:65536`) or not a number as no port at all, which would
/// mean the scheme's default: both proxies check the text themselves.
pub fn written_port(authority: &str) -> Option<&str> {
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let after_host = host_port.rfind(']').map_or(host_port, |i| &host_port[i..]);
    after_host
        .rsplit_once(':')
        .map(|(_, port)| port)
        .filter(|port| !port.is_empty())
}

/// `host:port`, with an IPv6 address in brackets (`[::1]:9100`): without them the port reads
/// as part of the address.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Removes hop-by-hop headers, those named in `Connection`, `Upgrade` and `Proxy-Authorization`.
///
/// `Host` is removed too: the next hop derives it from the request URI.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
    headers.remove(header::HOST);
}

/// Why a [`BoundedBody`] stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BodyLimitError {
    /// The deadline passed while the body was still streaming.
    #[error("body still streaming when the scrape timeout of {0:?} expired")]
    Deadline(Duration),
    /// The body exceeded the configured maximum.
    #[error("body exceeds the maximum of {0} bytes")]
    TooLarge(u64),
}

/// How a [`BoundedBody`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyEnd {
    /// All of it passed.
    Complete,
    /// The deadline passed while it was still streaming.
    Deadline,
    /// It broke: the peer's stream failed. One line.
    Failed(String),
    /// Its next frame would have passed the size limit (this many bytes): it was cut there.
    TooLarge(u64),
    /// The reader let go of it before its end (e.g. the client went away).
    Dropped,
}

impl std::fmt::Display for BodyEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyEnd::Complete => f.write_str("complete"),
            BodyEnd::Deadline => f.write_str("still streaming at the deadline"),
            BodyEnd::Failed(why) => f.write_str(why),
            BodyEnd::TooLarge(max) => write!(f, "{}", BodyLimitError::TooLarge(*max)),
            BodyEnd::Dropped => f.write_str("the reader went away"),
        }
    }
}

/// Called once when a [`BoundedBody`] ends, with the bytes it passed on and how it ended.
pub type OnFinish = Box<dyn FnOnce(u64, BodyEnd) + Send>;

/// `start + after`, or a time decades away where that sum would overflow (a duration handed to the
/// library unvalidated; the configuration caps every duration at a year): never a panic.
pub fn deadline(start: Instant, after: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    start
        .checked_add(after)
        .or_else(|| start.checked_add(FAR))
        .unwrap_or(start)
}

/// A streaming body with a deadline and a size limit that reports its byte count when it ends.
///
/// Nothing is buffered: frames pass through as they arrive. The deadline bounds how long a slow
/// peer can hold a stream open; the limit bounds how much a peer can push.
pub struct BoundedBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    max_bytes: u64,
    seen: u64,
    on_finish: Option<OnFinish>,
}

impl BoundedBody {
    /// Wraps `inner`, failing it at `deadline` or once it passes `max_bytes`.
    pub fn new(inner: Body, deadline: Instant, max_bytes: u64, on_finish: OnFinish) -> Self {
        Self {
            inner,
            timeout: deadline.saturating_duration_since(Instant::now()),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            max_bytes,
            seen: 0,
            on_finish: Some(on_finish),
        }
    }

    fn finish(&mut self, end: BodyEnd) {
        if let Some(f) = self.on_finish.take() {
            f(self.seen, end);
        }
    }
}

impl Drop for BoundedBody {
    fn drop(&mut self) {
        // hyper lets go of a body without polling its end once its last frame has passed (the
        // inner body then says it is at its end), and once it has written the length the body's
        // size hint promised (a body read ahead to its end, trailers and all: hyper sends it
        // with a Content-Length, which has no room for trailers, so they are left unpolled):
        // either is a complete body, not an abandoned one.
        let end = if self.inner.is_end_stream() || self.inner.size_hint().upper() == Some(0) {
            BodyEnd::Complete
        } else {
            BodyEnd::Dropped
        };
        self.finish(end);
    }
}

impl HttpBody for BoundedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.on_finish.is_none() {
            return Poll::Ready(None);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.finish(BodyEnd::Deadline);
            return Poll::Ready(Some(Err(BodyLimitError::Deadline(this.timeout).into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    // Counted once passed on: the frame that crosses the limit never is.
                    let len = data.len() as u64;
                    if this.seen.saturating_add(len) > this.max_bytes {
                        this.finish(BodyEnd::TooLarge(this.max_bytes));
                        let err = BodyLimitError::TooLarge(this.max_bytes);
                        return Poll::Ready(Some(Err(err.into())));
                    }
                    this.seen += len;
                } else if frame.is_trailers() {
                    // Trailers end a body: hyper's HTTP/1 encoder writes them and polls no more,
                    // so the end of stream after them is never seen.
                    this.finish(BodyEnd::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish(BodyEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(BodyEnd::Failed(crate::scrape_error::one_line(&*e)));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.on_finish.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How much of a body [`read_ahead`] holds back, at most, besides its first frame.
const READ_AHEAD_BYTES: u64 = 64 * 1024;

/// Why [`read_ahead`] found no body to send.
#[derive(Debug, thiserror::Error)]
pub enum ReadAheadError {
    /// The deadline passed before the body's first frame.
    #[error("no body byte before the deadline")]
    Deadline,
    /// The body broke before (or right behind) its first bytes.
    #[error("{0}")]
    Broke(String),
    /// What arrived with the first frame is more than the limit (this many bytes) already.
    #[error("{}", BodyLimitError::TooLarge(*.0))]
    TooLarge(u64),
}

/// `body` with its first frame read, and whatever frames arrived with it (up to 64 KiB),
/// before the response head is sent.
///
/// hyper's HTTP/1 server writes a response head together with the body's first frames and
/// closes the connection at once, that write unsent, when the body fails in the same go: a
/// body that breaks before its first bytes reach the client would be an empty reply, no status,
/// no reason. Read ahead, such a break is an error the caller answers with a status instead.
/// Nothing waits longer than the first frame: what streams on streams as it arrives.
///
/// For the same reason, more than `max_bytes` read ahead is an error rather than a body that
/// would break at once.
pub async fn read_ahead(
    mut body: Body,
    deadline: Instant,
    max_bytes: u64,
) -> Result<Body, ReadAheadError> {
    let broke = |e: BoxError| ReadAheadError::Broke(crate::scrape_error::one_line(&*e));
    if body.is_end_stream() {
        return Ok(body);
    }
    let first = loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ReadAheadError::Deadline),
            Ok(None) => return Ok(empty()),
            Ok(Some(frame)) => {
                let frame = frame.map_err(broke)?;
                if frame.data_ref().is_none_or(|d| !d.is_empty()) {
                    break frame;
                }
            }
        }
    };
    let mut held = first.data_ref().map_or(0, |d| d.len() as u64);
    let mut frames = std::collections::VecDeque::from([first]);
    let mut ended = false;
    while held < READ_AHEAD_BYTES {
        let next = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)));
        match next.await {
            Poll::Pending => break,
            Poll::Ready(None) => {
                ended = true;
                break;
            }
            Poll::Ready(Some(frame)) => {
                let frame = frame.map_err(broke)?;
                let len = frame.data_ref().map(|d| d.len() as u64);
                // An empty frame (h2's end of stream on its own) held back would keep the
                // body from its end once hyper has written the length it announced.
                if len != Some(0) {
                    held += len.unwrap_or(0);
                    frames.push_back(frame);
                }
            }
        }
    }
    if held > max_bytes {
        return Err(ReadAheadError::TooLarge(max_bytes));
    }
    Ok(ReadAhead {
        frames,
        rest: (!ended).then_some(body),
        yielded: false,
    }
    .boxed_unsync())
}

/// A body whose first frames were read already ([`read_ahead`]), then the rest of it.
struct ReadAhead {
    frames: std::collections::VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
    /// Whether the first poll of the rest said "not yet" (see `poll_frame`).
    yielded: bool,
}

impl HttpBody for ReadAhead {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if !self.yielded && self.rest.is_some() {
            // Once, between the frames read ahead and the rest: hyper flushes what it holds
            // when the body is not ready, so the head and first bytes leave before an error
            // that follows them could close the connection with them unsent.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held: u64 = self
            .frames
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let rest = self
            .rest
            .as_ref()
            .map_or(SizeHint::with_exact(0), |r| r.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + held);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// A host name as compared: host names are case-insensitive and may end with the root's dot
/// (RFC 4343, RFC 1034), so `NODE-1` and `node-1.` are `node-1`.
pub fn canonical_host_name(name: &str) -> std::borrow::Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_host_is_bracketed_in_an_authority() {
        assert_eq!(authority("::1", 9100), "[::1]:9100");
        assert_eq!(authority("[::1]", 9100), "[::1]:9100");
        assert_eq!(authority("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(authority("node.example", 443), "node.example:443");
    }

    fn accept_encoding(values: &[&str]) -> bool {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        accepts_gzip(&h)
    }

    #[test]
    fn gzip_only_when_accept_encoding_weighs_it_above_zero_and_not_below_identity() {
        for yes in [
            &["gzip"][..],
            &["gzip, deflate, br"],
            &["GZIP;Q=0.5"],
            &["x-gzip"],
            &["*"],
            &["*;q=0.5"],
            &["identity;q=0.5, gzip"],
            &["deflate", "gzip;q=0.1"],
            &["gzip;q=0.5, identity;q=0.5"],
        ] {
            assert!(accept_encoding(yes), "{yes:?}");
        }
        for no in [
            &[][..],
            &[""],
            &["identity"],
            &["deflate, br"],
            &["gzip;q=0"],
            &["gzip;q=0.000"],
            &["*;q=0"],
            &["gzip;q=0.5, identity"],
            &["*, gzip;q=0"],
            &["gzip;q=0.1, *"],
        ] {
            assert!(!accept_encoding(no), "{no:?}");
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key(header::ACCEPT_ENCODING));
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[tokio::test]
    async fn more_than_the_limit_read_ahead_is_refused_before_the_head() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = read_ahead(full(vec![0u8; 100]), deadline, 10)
            .await
            .expect_err("over the limit");
        assert!(matches!(err, ReadAheadError::TooLarge(10)), "{err}");
        assert!(read_ahead(full(vec![0u8; 100]), deadline, 100)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn bounded_body_fails_past_the_limit_and_reports_bytes() {
        let (tx, rx) = std::sync::mpsc::channel();
        let body = BoundedBody::new(
            full(vec![0u8; 100]),
            Instant::now() + Duration::from_secs(5),
            10,
            Box::new(move |n, end| tx.send((n, end)).unwrap()),
        );
        let err = body.collect().await.unwrap_err();
        assert!(err.to_string().contains("maximum of 10 bytes"), "{err}");
        assert_eq!(
            rx.recv().unwrap(),
            (0, BodyEnd::TooLarge(10)),
            "the frame that crossed the limit was never passed on"
        );
    }

    /// A body read ahead to its end, trailers included, has an exact length: hyper sends it
    /// with a Content-Length and drops it once that much is written, its trailers unpolled.
    /// That is a complete body (it was once logged "cut off", depending on whether the
    /// trailers arrived in time to be read ahead).
    #[tokio::test]
    async fn a_body_dropped_once_its_announced_length_passed_is_complete() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-trailer", HeaderValue::from_static("t"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"0123456789"))),
            Ok(Frame::trailers(trailers)),
        ];
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let deadline = Instant::now() + Duration::from_secs(5);
        let read = read_ahead(boxed(inner), deadline, u64::MAX).await.unwrap();
        assert_eq!(read.size_hint().exact(), Some(10));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut body = BoundedBody::new(
            read,
            deadline,
            u64::MAX,
            Box::new(move |n, end| tx.send((n, end)).unwrap()),
        );
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().map(|d| d.len()), Some(10));
        drop(body);
        assert_eq!(rx.recv().unwrap(), (10, BodyEnd::Complete));
    }
}
