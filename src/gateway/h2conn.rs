//! The gateway's end of a tunnel's HTTP/2 connection, driven with the `h2` crate (hyper's own
//! HTTP/2 implementation) directly rather than through hyper's client.
//!
//! hyper's client adds, per tunnel, a request channel (an 8 KiB block allocated up front), a
//! connection task, and a task per request in flight — the targets long poll is always in flight.
//! With tens of thousands of mostly idle tunnels that was a quarter of the gateway's memory per
//! agent (`benches/pull.rs`, idle memory). Here the connection is polled by the session's own
//! task, and requests go straight into h2's stream state.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http_util::Body;
use crate::tunnel::Keepalive;

/// Sends requests through one tunnel; cheap to clone.
pub type Sender = SendRequest<Bytes>;

/// HTTP/2 settings of the gateway's side, as hyper's client had them: a 2 MiB window per
/// stream and 5 MiB per tunnel bound what a slow Prometheus makes the gateway buffer.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;
const MAX_SEND_BUFFER: usize = 1 << 20;
const MAX_HEADER_LIST: u32 = 16 << 10;

/// Largest request body forwarded to an agent (scrapes have none; this is for the odd POST).
pub const MAX_REQUEST_BODY: usize = 1 << 20;

/// Opens HTTP/2 over `io` as the client. Returns the sender and the connection: a future that
/// must be polled for anything to move and that ends, with a reason, when the tunnel does —
/// closed by the agent, an error, or PINGs unanswered for `keepalive.timeout`.
pub async fn handshake<T>(
    io: T,
    keepalive: Keepalive,
) -> Result<(Sender, impl Future<Output = String> + Send), h2::Error>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let pings = conn.ping_pong();
    let drive = async move {
        let keepalive = async {
            match pings {
                Some(pings) => keep_alive(pings, keepalive).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = conn => match res {
                Ok(()) => "closed by the agent".to_owned(),
                Err(e) => crate::scrape_error::one_line(&e),
            },
            reason = keepalive => reason,
        }
    };
    Ok((sender, drive))
}

/// Sends a PING every `interval` and gives up on the tunnel when one goes unanswered for
/// `timeout`: an idle-cutting middlebox then sees traffic, and a dead agent is noticed.
async fn keep_alive(mut pings: h2::PingPong, keepalive: Keepalive) -> String {
    loop {
        tokio::time::sleep(keepalive.interval).await;
        match tokio::time::timeout(keepalive.timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("keepalive PING failed: {e}"),
            Err(_) => {
                return format!(
                    "keepalive PING unanswered for {:?}: agent gone",
                    keepalive.timeout
                )
            }
        }
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
                    "larger than {MAX_REQUEST_BODY} bytes"
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
