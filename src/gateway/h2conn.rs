//! The gateway's end of a tunnel's HTTP/2 connection, driven with the `h2` crate (hyper's own
//! HTTP/2 implementation) directly rather than through hyper's client.
//!
//! hyper's client adds, per tunnel, a request channel (an 8 KiB block allocated up front), a
//! connection task, and a task per request in flight — the targets long poll is always in flight.
//! With tens of thousands of mostly idle tunnels that was a sixth of the gateway's memory per
//! agent (41 → 35 KiB, `benches/pull.rs`, idle memory). Here the connection is polled by the session's own
//! task, and requests go straight into h2's stream state.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http_util::Body;
use crate::tunnel::{Keepalive, MAX_HEADER_LIST, MAX_REQUEST_BODY};

/// Sends requests through one tunnel; cheap to clone.
pub type Sender = SendRequest<Bytes>;

/// HTTP/2 receive windows of the gateway's side. A scrape whose client reads slower than the
/// agent sends (a stalled Prometheus, anyone on the web listener) holds its stream's window
/// until its deadline: at most 1 MiB buffered here per scrape. The tunnel's window is shared
/// by all its scrapes and must be far larger, or a few such scrapes take all of it and every
/// other scrape of the agent gets its head and then nothing (it was 5 MiB: two or three stalled
/// clients did that). 64 MiB: a tunnel buffers at most that, and it takes 64 stalled scrapes
/// to slow the agent's others, half of the 128 concurrent scrapes an agent allows by default.
/// 1 MiB per stream still carries ~20 MB/s per scrape over a 50 ms round trip.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
const MAX_SEND_BUFFER: usize = 1 << 20;

/// Opens HTTP/2 over `io` as the client. Returns the sender and the connection, which must be
/// polled for anything to move.
pub async fn handshake<T>(io: T, keepalive: Keepalive) -> Result<(Sender, Connection<T>), h2::Error>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let heard = Arc::new(AtomicBool::new(false));
    let io = Heard {
        io,
        heard: heard.clone(),
    };
    let (sender, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false)
        .header_table_size(0)
        .handshake::<_, Bytes>(io)
        .await?;
    let keepalive = conn.ping_pong().map(|pings| KeepAlive {
        pings,
        timer: Box::pin(tokio::time::sleep(keepalive.interval)),
        awaiting_pong: false,
        heard,
        config: keepalive,
    });
    Ok((sender, Connection { conn, keepalive }))
}

/// A tunnel's HTTP/2 connection with its keepalive. As a future it ends, with a reason, when the
/// tunnel does: closed by the agent, an error, or a PING unanswered.
///
/// Hand-written rather than an `async` block: it lives as long as the tunnel, once per agent,
/// and an `async` block holding the h2 connection and a `select!` over it takes twice its size.
pub struct Connection<T> {
    conn: h2::client::Connection<Heard<T>, Bytes>,
    keepalive: Option<KeepAlive>,
}

/// What a [`Connection`] resolves to when the agent closed it cleanly (after GOAWAY).
pub const CLOSED_BY_AGENT: &str = "closed by the agent";

/// How a [`Connection`]'s end begins when the connection was closed under a write (broken pipe,
/// reset): what an agent stopping cleanly leaves too when the gateway was writing (a PING) as it
/// closed, so not proof of a lost tunnel.
pub const CLOSED_UNDER_A_WRITE: &str = "the connection was closed while the gateway was writing";

/// Whether the end of a [`Connection`] says the tunnel was lost (an unanswered keepalive, the
/// agent gone without closing) rather than closed by the agent.
pub fn lost(end: &str) -> bool {
    end != CLOSED_BY_AGENT && !end.starts_with(CLOSED_UNDER_A_WRITE)
}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Future for Connection<T> {
    type Output = String;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<String> {
        if let Poll::Ready(res) = Pin::new(&mut self.conn).poll(cx) {
            return Poll::Ready(match res {
                Ok(()) => CLOSED_BY_AGENT.to_owned(),
                Err(e)
                    if e.get_io().is_some_and(|io| {
                        matches!(
                            io.kind(),
                            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                        )
                    }) =>
                {
                    format!(
                        "{CLOSED_UNDER_A_WRITE} ({})",
                        crate::scrape_error::one_line(&e)
                    )
                }
                Err(e) => crate::scrape_error::one_line(&e),
            });
        }
        match self.keepalive.as_mut() {
            Some(keepalive) => keepalive.poll(cx),
            None => Poll::Pending,
        }
    }
}

/// Sends a PING every `interval` and gives up on the tunnel when one goes unanswered for
/// `timeout` while nothing else arrived either: an idle-cutting middlebox then sees traffic,
/// and a dead agent is noticed. On a slow link a large response fills the agent's send buffer
/// and its PONG waits behind it for longer than `timeout`; the bytes that keep arriving
/// meanwhile show the agent is alive, so they buy another `timeout`.
struct KeepAlive {
    pings: h2::PingPong,
    /// Next PING while none is outstanding; the deadline of the outstanding one otherwise.
    timer: Pin<Box<tokio::time::Sleep>>,
    awaiting_pong: bool,
    /// Whether the tunnel delivered bytes since the PING went out (or since the last deadline).
    heard: Arc<AtomicBool>,
    config: Keepalive,
}

impl KeepAlive {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        loop {
            if self.awaiting_pong {
                match self.pings.poll_pong(cx) {
                    Poll::Ready(Ok(_pong)) => {
                        self.awaiting_pong = false;
                        let next = crate::http_util::deadline(
                            tokio::time::Instant::now(),
                            self.config.interval,
                        );
                        self.timer.as_mut().reset(next);
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(format!("keepalive PING failed: {e}"))
                    }
                    Poll::Pending => {}
                }
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.awaiting_pong {
                if !self.heard.swap(false, Ordering::Relaxed) {
                    return Poll::Ready(format!(
                        "keepalive PING unanswered for {:?} and nothing else received: agent gone",
                        self.config.timeout
                    ));
                }
                let deadline =
                    crate::http_util::deadline(tokio::time::Instant::now(), self.config.timeout);
                self.timer.as_mut().reset(deadline);
                continue;
            }
            if let Err(e) = self.pings.send_ping(h2::Ping::opaque()) {
                return Poll::Ready(format!("keepalive PING failed: {e}"));
            }
            self.heard.store(false, Ordering::Relaxed);
            self.awaiting_pong = true;
            let deadline =
                crate::http_util::deadline(tokio::time::Instant::now(), self.config.timeout);
            self.timer.as_mut().reset(deadline);
        }
    }
}

/// The tunnel's transport, noting when bytes arrive, for [`KeepAlive`].
pub struct Heard<T> {
    io: T,
    heard: Arc<AtomicBool>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The tunnel or the stream failed.
    #[error(transparent)]
    H2(#[from] h2::Error),
    /// Reading the request body failed, or it exceeded [`MAX_REQUEST_BODY`].
    #[error("request body: {0}")]
    Body(String),
}

/// Sends `req` and waits for the response head; the body streams as the caller reads it.
pub async fn send(sender: &Sender, req: Request<Body>) -> Result<Response<RecvBody>, SendError> {
    let (parts, body) = req.into_parts();
    let body = read_request_body(body).await?;
    let mut sender = sender.clone().ready().await?;
    let (response, mut stream) =
        sender.send_request(Request::from_parts(parts, ()), body.is_none())?;
    if let Some(bytes) = body {
        // At most MAX_REQUEST_BODY, queued within h2's send buffer and sent as the window allows.
        stream.send_data(bytes, true)?;
    }
    let resp = response.await?;
    Ok(resp.map(|recv| RecvBody {
        recv,
        data_done: false,
    }))
}

/// Whether the tunnel's connection has failed (the agent gone, a protocol error). h2 marks the
/// connection failed before it tells its streams, so a scrape that failed with its tunnel
/// finds it so, even before the session has noticed and removed the agent.
pub fn is_broken(sender: &Sender) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(sender.clone().poll_ready(&mut cx), Poll::Ready(Err(_)))
}

/// Starts a GET without a body and returns the future of its response head. Unlike [`send`],
/// what waits holds only h2's handle on the stream: the targets long poll waits for minutes in
/// every idle tunnel, so its size is per-agent memory.
pub fn start_get(sender: &Sender, uri: &str) -> Result<h2::client::ResponseFuture, String> {
    let req = Request::get(uri).body(()).map_err(|e| e.to_string())?;
    // A fresh clone has no stream pending, so it may send without waiting to be ready; past the
    // agent's stream limit, h2 queues the stream until one closes.
    let (response, _) = sender
        .clone()
        .send_request(req, true)
        .map_err(|e| crate::scrape_error::one_line(&e))?;
    Ok(response)
}

/// The response to [`start_get`], its body readable as a [`RecvBody`].
pub async fn response(
    response: h2::client::ResponseFuture,
) -> Result<Response<RecvBody>, h2::Error> {
    let resp = response.await?;
    Ok(resp.map(|recv| RecvBody {
        recv,
        data_done: false,
    }))
}

/// The whole request body, if it has one, up to [`MAX_REQUEST_BODY`].
async fn read_request_body(mut body: Body) -> Result<Option<Bytes>, SendError> {
    if body.is_end_stream() {
        return Ok(None);
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| SendError::Body(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_REQUEST_BODY {
                return Err(SendError::Body(format!(
                    "larger than {MAX_REQUEST_BODY} bytes, the most the gateway forwards (a scrape has no body)"
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((!buf.is_empty()).then(|| buf.freeze()))
}

/// A response body read from an HTTP/2 stream; each chunk read gives its window back to the
/// agent, so flow control paces the agent to the reader.
pub struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl HttpBody for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match std::task::ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent stopping cleanly can leave a write of the gateway's broken: that is not a tunnel
    /// lost, which warns; an unanswered keepalive or an agent gone without TLS close_notify is.
    #[test]
    fn only_ends_that_no_clean_close_leaves_are_lost() {
        assert!(!lost(CLOSED_BY_AGENT));
        assert!(!lost(&format!("{CLOSED_UNDER_A_WRITE} (broken pipe)")));
        assert!(lost(
            "keepalive PING unanswered for 20s and nothing else received: agent gone"
        ));
        assert!(lost(
            "peer closed connection without sending TLS close_notify"
        ));
    }
}
