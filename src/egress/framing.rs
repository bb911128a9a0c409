//! Request-smuggling checks below hyper. hyper follows RFC 9112 when a request carries both
//! Content-Length and Transfer-Encoding (it drops the length and reads chunked) and when it
//! repeats one Content-Length value (it keeps one), so the request it hands over shows neither.
//! The proxy refuses both with 400, so [`Sniff`] watches the raw bytes of a client connection,
//! follows request framing (heads, Content-Length and chunked bodies) and notes each head's
//! framing problem; the service claims the note of each request it gets, in order.
//!
//! A chunked body's trailer section is read as hyper reads it: its lines end only at CRLF, so a
//! bare LF does not end one, and everything up to the next empty CRLF line, request heads
//! included, belongs to it. No other parser reads it that way, so a bare LF there is a problem of
//! the request's body, which the service asks about once it has read the body.
//!
//! If the scan ever loses track (a line longer than it follows, framing it cannot read), it stops
//! and the connection is served no further request: the request in progress is answered with
//! `Connection: close`, and any later one is refused. A CONNECT stops the scan too (the connection
//! may turn into a tunnel), and a refused CONNECT closes the connection.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Uri};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the scan found in one request head.
#[derive(Debug)]
struct Head {
    /// Heads are numbered in the order they were scanned, from 0.
    index: u64,
    method: Vec<u8>,
    target: Vec<u8>,
    problem: Option<&'static str>,
}

/// The verdict on a chunked body whose trailer section holds a bare LF.
pub(crate) const BARE_LF_IN_TRAILERS: &str =
    "a line of the chunked trailer section ends in a bare LF instead of CRLF";

/// The verdict on a request the scan did not see: it had lost track of the framing.
pub(crate) const UNTRACKED: &str =
    "the proxy lost track of the request framing on this connection; send the request on a new connection";

#[derive(Debug, Default)]
struct Scanned {
    heads: VecDeque<Head>,
    /// How many heads were scanned.
    scanned: u64,
    /// Problems of the bodies of heads not yet read through, by head index.
    body_problems: VecDeque<(u64, &'static str)>,
    lost: bool,
    /// The connection began with a TLS handshake record (0x16), not a request line.
    spoke_tls: bool,
    /// The connection was ended because the client took no byte written to it for this long.
    write_stalled: Option<Duration>,
}

/// Heads scanned and not yet claimed by a request; shared by the connection and its service.
#[derive(Debug, Clone, Default)]
pub(crate) struct Heads(Arc<Mutex<Scanned>>);

/// A request's share of the scan: what was wrong with its head, and a way to ask about its body.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    /// The framing problem of the request's head, if any.
    pub(crate) problem: Option<&'static str>,
    /// The index of its head; `None` if the scan had not seen it.
    index: Option<u64>,
    heads: Heads,
}

impl Claim {
    /// The scan of the connection the request came on.
    pub(crate) fn connection(&self) -> Heads {
        self.heads.clone()
    }

    /// The framing problem of the request's body, once the body has been read to its end (the
    /// scan sees every byte before hyper does).
    pub(crate) fn body_problem(&self) -> Option<&'static str> {
        let index = self.index?;
        let scanned = self.heads.lock();
        scanned
            .body_problems
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, problem)| *problem)
    }
}

impl Heads {
    /// The share of `req` in the scan: each request claims the next scanned head; a request
    /// without one (the scan lost track) gets [`UNTRACKED`] as its problem.
    pub(crate) fn claim<B>(&self, req: &Request<B>) -> Claim {
        let mut scanned = self.lock();
        let (problem, index) = match scanned.heads.pop_front() {
            Some(head)
                if head.method == req.method().as_str().as_bytes()
                    && Uri::try_from(head.target.as_slice()).is_ok_and(|u| &u == req.uri()) =>
            {
                (head.problem, Some(head.index))
            }
            _ => {
                scanned.heads.clear();
                scanned.lost = true;
                (Some(UNTRACKED), None)
            }
        };
        // Earlier requests are answered: their bodies are no longer asked about.
        if let Some(index) = index {
            scanned.body_problems.retain(|(i, _)| *i >= index);
        }
        Claim {
            problem,
            index,
            heads: self.clone(),
        }
    }

    /// Whether the scan lost track: the connection must not serve another request.
    pub(crate) fn lost(&self) -> bool {
        self.lock().lost
    }

    /// Whether the client began the connection with a TLS handshake: an `https://` proxy URL
    /// pointed at this plain-HTTP proxy.
    /// How long the client had taken no byte when the connection was ended for it, if it was.
    pub(crate) fn write_stalled(&self) -> Option<Duration> {
        self.lock().write_stalled
    }

    pub(crate) fn spoke_tls(&self) -> bool {
        self.lock().spoke_tls
    }

    fn push(&self, method: Vec<u8>, target: Vec<u8>, problem: Option<&'static str>) {
        let mut scanned = self.lock();
        let index = scanned.scanned;
        scanned.scanned += 1;
        scanned.heads.push_back(Head {
            index,
            method,
            target,
            problem,
        });
    }

    /// Notes `problem` in the body being scanned: that of the last head scanned.
    fn body_problem(&self, problem: &'static str) {
        let mut scanned = self.lock();
        let Some(index) = scanned.scanned.checked_sub(1) else {
            return;
        };
        if !scanned.body_problems.iter().any(|(i, _)| *i == index) {
            scanned.body_problems.push_back((index, problem));
        }
    }

    fn lose_track(&self) {
        self.lock().lost = true;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Scanned> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The head being scanned.
#[derive(Debug, Default)]
struct HeadScan {
    method: Vec<u8>,
    target: Vec<u8>,
    lengths: usize,
    length: Option<u64>,
    transfer_encoding: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers(Trailer),
    /// After a CONNECT: the connection is a tunnel, or closes after the refusal.
    Tunnel,
    /// Lost track of the framing (or the head timed out).
    Off,
}

/// Where the scan is in a trailer section, in hyper's terms (its chunked decoder's `EndCr`,
/// `EndLf`, `Trailer` and `TrailerLf` states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trailer {
    /// At the start of a line: a CR here begins the empty line that ends the section.
    LineStart,
    /// After that CR: an LF must follow.
    EndLf,
    /// Inside a trailer line, which only a CR ends.
    Line,
    /// After the CR of a trailer line: an LF must follow.
    LineLf,
}

/// A client connection whose reads are scanned for request framing; writes pass through.
pub(crate) struct Sniff<T> {
    inner: T,
    phase: Phase,
    line: Vec<u8>,
    head: Option<HeadScan>,
    head_bytes: usize,
    limit: usize,
    heads: Heads,
    /// How long a request head may take from its first byte, and the first one from accept.
    header_timeout: Duration,
    /// Set while a head is being received, and from accept until the first byte.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether any byte has arrived on the connection.
    started: bool,
    /// How long a write may wait for the client to take bytes: a client that stops reading a
    /// response must not hold it, and the upstream connection behind it, for ever.
    write_stall: crate::server::StallTimer,
}

/// The error a connection ends with when a client began a request head and did not finish it
/// within the header read timeout. hyper's own timeout cannot tell that from a kept-alive
/// connection waiting for its next request, so this bound is kept here and hyper's is the idle
/// limit.
#[derive(Debug, thiserror::Error)]
#[error("request head not received within {0:?}")]
pub(crate) struct HeaderTimedOut(pub(crate) Duration);

/// The error a connection ends with when it sent nothing at all within the header read timeout.
#[derive(Debug, thiserror::Error)]
#[error("no request within {0:?} of connecting")]
pub(crate) struct SilentTimedOut(pub(crate) Duration);

impl<T> Sniff<T> {
    /// Wraps `inner`; a line longer than `limit` bytes stops the scan (hyper refuses such a head
    /// anyway); a head still incomplete `header_timeout` after its first byte ends the connection.
    /// A write that the client does not take within `write_timeout` ends the connection too.
    pub(crate) fn new(
        inner: T,
        limit: usize,
        header_timeout: Duration,
        write_timeout: Duration,
    ) -> (Sniff<T>, Heads) {
        let heads = Heads::default();
        let sniff = Sniff {
            inner,
            phase: Phase::Head,
            line: Vec::new(),
            head: None,
            head_bytes: 0,
            limit,
            heads: heads.clone(),
            header_timeout,
            deadline: None,
            started: false,
            write_stall: crate::server::StallTimer::new(write_timeout),
        };
        (sniff, heads)
    }

    /// Whether part of a request head has arrived and the rest has not.
    fn in_head(&self) -> bool {
        self.phase == Phase::Head && (self.head.is_some() || !self.line.is_empty())
    }

    /// Whether the connection is still waiting for its first byte: a connection that never
    /// speaks holds a connection slot like a trickled head does, so the same bound applies.
    /// hyper's own header timeout is the kept-alive idle limit (minutes), not this one.
    fn silent(&self) -> bool {
        !self.started && self.phase == Phase::Head
    }

    /// The connection, for a CONNECT tunnel that relays it without hyper. Sniff buffers nothing.
    pub(crate) fn into_inner(self) -> T {
        self.inner
    }

    fn scan(&mut self, data: &[u8]) {
        if !self.started && !data.is_empty() {
            self.started = true;
            // A TLS record of type handshake: a ClientHello, never a request line.
            self.heads.lock().spoke_tls = data[0] == 0x16;
        }
        self.follow(data);
        if self.phase == Phase::Off {
            self.heads.lose_track();
        }
    }

    fn follow(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.phase {
                Phase::Off | Phase::Tunnel => return,
                Phase::Trailers(at) => {
                    self.head_bytes += 1;
                    if self.head_bytes > self.limit {
                        self.phase = Phase::Off;
                        return;
                    }
                    self.on_trailer_byte(at, data[0]);
                    data = &data[1..];
                }
                Phase::Body(n) | Phase::ChunkData(n) => {
                    let k = data.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    data = &data[k..];
                    let left = n - k as u64;
                    self.phase = match (self.phase, left) {
                        (Phase::Body(_), 0) => Phase::Head,
                        (Phase::Body(_), _) => Phase::Body(left),
                        (_, 0) => Phase::ChunkEnd,
                        _ => Phase::ChunkData(left),
                    };
                }
                _ => {
                    let (take, complete) = match data.iter().position(|b| *b == b'\n') {
                        Some(i) => (i + 1, true),
                        None => (data.len(), false),
                    };
                    if self.phase == Phase::Head {
                        self.head_bytes += take;
                    }
                    if self.line.len() + take > self.limit || self.head_bytes > self.limit {
                        self.phase = Phase::Off;
                        return;
                    }
                    self.line.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if complete {
                        let line = std::mem::take(&mut self.line);
                        self.on_line(&line[..line.len() - 1]);
                        self.line = line;
                        self.line.clear();
                    }
                }
            }
        }
    }

    fn on_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match self.phase {
            Phase::Head => self.on_head_line(line),
            Phase::ChunkSize => {
                let digits = line
                    .iter()
                    .position(|b| matches!(b, b';' | b' ' | b'\t'))
                    .map_or(line, |i| &line[..i]);
                let size = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| u64::from_str_radix(d, 16).ok());
                self.phase = match size {
                    None => Phase::Off,
                    Some(0) => {
                        self.head_bytes = 0;
                        Phase::Trailers(Trailer::LineStart)
                    }
                    Some(n) => Phase::ChunkData(n),
                };
            }
            Phase::ChunkEnd if line.is_empty() => self.phase = Phase::ChunkSize,
            _ => self.phase = Phase::Off,
        }
    }

    /// One byte of a trailer section, read as hyper reads it. What hyper refuses (a CR without
    /// its LF) ends its reading of the connection, and the scan's.
    fn on_trailer_byte(&mut self, at: Trailer, byte: u8) {
        self.phase = match (at, byte) {
            (Trailer::LineStart, b'\r') => Phase::Trailers(Trailer::EndLf),
            (Trailer::EndLf, b'\n') => {
                self.start_head();
                return;
            }
            (Trailer::Line, b'\r') => Phase::Trailers(Trailer::LineLf),
            (Trailer::LineLf, b'\n') => Phase::Trailers(Trailer::LineStart),
            (Trailer::EndLf | Trailer::LineLf, _) => Phase::Off,
            (Trailer::LineStart | Trailer::Line, b'\n') => {
                self.heads.body_problem(BARE_LF_IN_TRAILERS);
                Phase::Trailers(Trailer::Line)
            }
            (Trailer::LineStart | Trailer::Line, _) => Phase::Trailers(Trailer::Line),
        };
    }

    fn start_head(&mut self) {
        self.phase = Phase::Head;
        self.head_bytes = 0;
    }

    fn on_head_line(&mut self, line: &[u8]) {
        let Some(head) = &mut self.head else {
            // Empty lines before a request line are ignored, as hyper does.
            if !line.is_empty() {
                let mut parts = line.split(|b| *b == b' ');
                self.head = Some(HeadScan {
                    method: parts.next().unwrap_or_default().to_vec(),
                    target: parts.next().unwrap_or_default().to_vec(),
                    ..HeadScan::default()
                });
            } else {
                self.head_bytes = 0;
            }
            return;
        };
        if !line.is_empty() {
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                return;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if name.eq_ignore_ascii_case(b"content-length") {
                head.lengths += 1;
                let parsed = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                head.length = head.length.or(parsed);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                let last = value.rsplit(|b| *b == b',').next().unwrap_or_default();
                head.transfer_encoding = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
            return;
        }
        let Some(head) = self.head.take() else {
            return;
        };
        let problem = if head.lengths > 1 {
            Some("more than one Content-Length header")
        } else if head.lengths == 1 && head.transfer_encoding.is_some() {
            Some("both Content-Length and Transfer-Encoding")
        } else {
            None
        };
        let connect = head.method == b"CONNECT";
        self.heads.push(head.method, head.target, problem);
        self.head_bytes = 0;
        self.phase = match (head.transfer_encoding, head.length) {
            _ if connect => Phase::Tunnel,
            (Some(true), _) => Phase::ChunkSize,
            (Some(false), _) => Phase::Off,
            (None, Some(0)) => Phase::Head,
            (None, Some(n)) => Phase::Body(n),
            (None, None) if head.lengths > 0 => Phase::Off,
            (None, None) => Phase::Head,
        };
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Sniff<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(this.phase, Phase::Off | Phase::Tunnel) {
            this.deadline = None;
            return res;
        }
        let silent = this.silent();
        this.scan(&buf.filled()[before..]);
        if silent && this.started {
            // The first byte: the head's own bound starts now.
            this.deadline = None;
        }
        if !this.in_head() && !this.silent() {
            this.deadline = None;
        } else if this.deadline.is_none() {
            this.deadline = Some(Box::pin(tokio::time::sleep(this.header_timeout)));
        }
        if res.is_pending() {
            if let Some(deadline) = &mut this.deadline {
                if deadline.as_mut().poll(cx).is_ready() {
                    this.deadline = None;
                    if this.silent() {
                        // Nothing was asked, so nothing is answered: a client that opened a
                        // connection ahead of need gets a plain close, not a 408 it might
                        // read as the answer to a request it sends just then.
                        this.phase = Phase::Off;
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            SilentTimedOut(this.header_timeout),
                        )));
                    }
                    this.phase = Phase::Off;
                    // One try at telling the client why, like every other refusal; the socket
                    // has room for a short answer, and nothing else is being written mid-head.
                    let answer = timeout_answer(this.header_timeout);
                    let _ = Pin::new(&mut this.inner).poll_write(cx, answer.as_bytes());
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        HeaderTimedOut(this.header_timeout),
                    )));
                }
            }
        }
        res
    }
}

/// The 408 a client trickling its request head gets, as [`super::refusal::Refusal`] would
/// answer it (hyper is not involved: the connection ends here).
fn timeout_answer(after: Duration) -> String {
    let reason = super::refusal::Refusal::header_timeout(after).reason;
    format!(
        "HTTP/1.1 408 Request Timeout\r\ndate: {}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         x-content-type-options: nosniff\r\n\
         {}: {reason}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{reason}\n",
        httpdate::fmt_http_date(std::time::SystemTime::now()),
        super::refusal::REFUSAL_HEADER,
        reason.len() + 1
    )
}

impl<T> Sniff<T> {
    /// `poll`, a write's outcome, unless the client has taken nothing for the write timeout.
    fn bounded<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        let poll = self.write_stall.bounded(cx, poll);
        if matches!(&poll, Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut) {
            self.heads.lock().write_stalled = Some(self.write_stall.limit());
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniff<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, data);
        this.bounded(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.bounded(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.bounded(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `bytes` fed in pieces of `step` and returns each head's (method target, problem).
    fn scan(bytes: &[u8], step: usize) -> Vec<(String, Option<&'static str>)> {
        let (mut sniff, heads) = Sniff::new(
            (),
            16 << 10,
            Duration::from_secs(10),
            Duration::from_secs(30),
        );
        for piece in bytes.chunks(step) {
            sniff.scan(piece);
        }
        let scanned = heads.lock();
        scanned
            .heads
            .iter()
            .map(|h| {
                let line = format!(
                    "{} {}",
                    String::from_utf8_lossy(&h.method),
                    String::from_utf8_lossy(&h.target)
                );
                (line, h.problem)
            })
            .collect()
    }

    #[test]
    fn follows_bodies_and_flags_only_the_heads_with_conflicting_framing() {
        let stream = b"\r\nPOST http://a/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 28\r\n\r\n\
            GET /fake HTTP/1.1\r\nX: y\r\n\r\n\
            POST http://a/2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n17\r\nGET /fake2 HTTP/1.1\r\n\r\n\r\n0\r\nTrailer: x\r\n\r\n\
            POST http://a/3 HTTP/1.1\r\ncontent-length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
            POST http://a/4 HTTP/1.1\nContent-Length: 2\nContent-Length: 2\n\nhi\
            GET http://a/5 HTTP/1.1\r\n\r\n\
            CONNECT a:443 HTTP/1.1\r\n\r\nGET http://tunnelled/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        let expected = vec![
            ("POST http://a/1".to_owned(), None),
            ("POST http://a/2".to_owned(), None),
            (
                "POST http://a/3".to_owned(),
                Some("both Content-Length and Transfer-Encoding"),
            ),
            (
                "POST http://a/4".to_owned(),
                Some("more than one Content-Length header"),
            ),
            ("GET http://a/5".to_owned(), None),
            ("CONNECT a:443".to_owned(), None),
        ];
        for step in [1, 3, 7, stream.len()] {
            assert_eq!(scan(stream, step), expected, "fed {step} bytes at a time");
        }
    }

    #[test]
    fn claims_match_requests_in_order_and_an_unseen_request_is_untracked() {
        let (mut sniff, heads) = Sniff::new(
            (),
            16 << 10,
            Duration::from_secs(10),
            Duration::from_secs(30),
        );
        sniff.scan(
            b"POST http://a/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nz\
              GET http://a/y HTTP/1.1\r\n\r\n",
        );
        let req = |m: &str, u: &str| Request::builder().method(m).uri(u).body(()).unwrap();
        assert_eq!(
            heads.claim(&req("POST", "http://a/x")).problem,
            Some("more than one Content-Length header")
        );
        assert!(!heads.lost());
        assert_eq!(
            heads.claim(&req("GET", "http://a/other")).problem,
            Some(UNTRACKED)
        );
        assert!(heads.lost());
        assert_eq!(
            heads.claim(&req("GET", "http://a/y")).problem,
            Some(UNTRACKED),
            "cleared"
        );
    }

    /// hyper ends a trailer line only at CRLF: after a bare LF it goes on reading trailers up to
    /// the next empty CRLF line, swallowing the request head in between. The scan must agree on
    /// where the next request starts, and flag the body whose trailers did that.
    #[test]
    fn trailers_end_where_hyper_ends_them_and_a_bare_lf_in_them_is_flagged() {
        let stream = b"POST http://a/1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
            5\r\nhello\r\n0\r\nX: a\n\r\n\
            POST http://a/swallowed HTTP/1.1\r\nContent-Length: 60\r\n\r\n\
            POST http://a/2 HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc\
            POST http://a/3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nX: b\r\n\r\n\
            POST http://a/4 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: c\r\nY: d\r\n\r\n\
            GET http://a/5 HTTP/1.1\r\n\r\n";
        for step in [1, 2, 5, stream.len()] {
            let (mut sniff, heads) = Sniff::new(
                (),
                16 << 10,
                Duration::from_secs(10),
                Duration::from_secs(30),
            );
            for piece in stream.chunks(step) {
                sniff.scan(piece);
            }
            let req = |u: &str| Request::post(u).body(()).unwrap();
            let first = heads.claim(&req("http://a/1"));
            assert_eq!(first.problem, None);
            assert_eq!(first.body_problem(), Some(BARE_LF_IN_TRAILERS));
            let second = heads.claim(&req("http://a/2"));
            assert_eq!(second.problem, Some("more than one Content-Length header"));
            assert_eq!(second.body_problem(), None);
            let third = heads.claim(&req("http://a/3"));
            assert_eq!(third.body_problem(), Some(BARE_LF_IN_TRAILERS));
            let fourth = heads.claim(&req("http://a/4"));
            assert_eq!((fourth.problem, fourth.body_problem()), (None, None));
            let get = Request::get("http://a/5").body(()).unwrap();
            assert_eq!(
                heads.claim(&get).problem,
                None,
                "fed {step} bytes at a time"
            );
            assert!(!heads.lost());
        }
    }

    #[test]
    fn a_cr_without_lf_in_trailers_stops_the_scan() {
        let (mut sniff, heads) = Sniff::new(
            (),
            16 << 10,
            Duration::from_secs(10),
            Duration::from_secs(30),
        );
        sniff.scan(
            b"POST http://a/1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\rY\r\n\r\n",
        );
        assert_eq!(sniff.phase, Phase::Off);
        assert!(heads.lost());
    }

    #[test]
    fn an_endless_head_stops_the_scan() {
        let (mut sniff, heads) =
            Sniff::new((), 1024, Duration::from_secs(10), Duration::from_secs(30));
        sniff.scan(b"GET http://a/ HTTP/1.1\r\n");
        sniff.scan(&[b'x'; 2048]);
        assert_eq!(sniff.phase, Phase::Off);
        assert!(heads.lock().heads.is_empty());
        assert!(heads.lost());
    }

    /// hyper accepts chunk extensions up to 16 KiB, longer than the lines the scan follows: the
    /// scan may stop there, but never silently.
    #[test]
    fn a_chunk_line_longer_than_the_scan_follows_loses_track_visibly() {
        let (mut sniff, heads) =
            Sniff::new((), 8192, Duration::from_secs(10), Duration::from_secs(30));
        sniff.scan(b"POST http://a/1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;");
        sniff.scan(&[b'a'; 16383]);
        sniff.scan(b"\r\nhello\r\n0\r\n\r\nPOST http://a/2 HTTP/1.1\r\nContent-Length: 5\r\n\r\n");
        assert!(heads.lost());
        let req = |u: &str| Request::post(u).body(()).unwrap();
        assert_eq!(heads.claim(&req("http://a/1")).problem, None);
        assert_eq!(heads.claim(&req("http://a/2")).problem, Some(UNTRACKED));
    }

    #[test]
    fn a_connect_stops_the_scan_without_losing_track() {
        let (mut sniff, heads) =
            Sniff::new((), 8192, Duration::from_secs(10), Duration::from_secs(30));
        sniff.scan(b"CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03\x01 tunnel bytes\n\n");
        assert_eq!(sniff.phase, Phase::Tunnel);
        assert!(!heads.lost());
    }
}
