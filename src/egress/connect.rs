//! CONNECT tunnels: the same client, destination and address checks as absolute-form requests;
//! then bytes are relayed both ways, counted, and the tunnel is closed when idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::access::AccessRecord;
use super::connector::connect_any;
use super::forward::{checked, select_rule, Target};
use super::refusal::Refusal;
use super::{refused, State};
use crate::http_util::{empty, Body};

pub(crate) async fn handle(
    state: &Arc<State>,
    req: Request<Incoming>,
    mut record: AccessRecord,
) -> Response<Body> {
    match open(state, &req, &mut record).await {
        Ok(upstream) => {
            let state = state.clone();
            tokio::spawn(async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        let _open = state.tracker.track(&upstream);
                        relay(&state, TokioIo::new(upgraded), upstream, record).await
                    }
                    Err(e) => debug!(error = %e, "CONNECT upgrade failed"),
                }
            });
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::OK;
            resp
        }
        Err(refusal) => {
            let resp = refused(&mut record, &refusal);
            record.emit(&state.metrics);
            resp
        }
    }
}

async fn open(
    state: &Arc<State>,
    req: &Request<Incoming>,
    record: &mut AccessRecord,
) -> Result<TcpStream, Refusal> {
    let target = Target::from_uri(req.uri(), 443)?;
    if req.uri().port_u16().is_none() {
        return Err(Refusal::bad_request("CONNECT needs host:port"));
    }
    let (_, rule) = select_rule(state, &target, &Method::CONNECT, "/").await?;
    record.rule = rule.name.clone();
    if rule.validates() {
        return Err(Refusal::destination(&format!(
            "CONNECT {}:{} (rule {:?} validates payloads, which a tunnel would hide; send plain HTTP through the proxy)",
            target.host, target.port, rule.name
        )));
    }
    if rule.tls_upgrade.is_some() {
        return Err(Refusal::bad_request(format!(
            "rule {:?} upgrades plain HTTP to HTTPS; CONNECT is not used with it",
            rule.name
        )));
    }
    let addrs = checked(state, rule, &target).await?;
    connect_any(&target.host, &addrs, state.config.connect_timeout)
        .await
        .map_err(|e| Refusal::upstream(e.to_string()))
}

async fn relay(
    state: &State,
    client: TokioIo<hyper::upgrade::Upgraded>,
    upstream: TcpStream,
    mut record: AccessRecord,
) {
    state.metrics.open_tunnels.inc();
    let activity = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut client = Active {
        inner: client,
        activity: activity.clone(),
        started,
    };
    let mut upstream = upstream;
    let idle = state.config.tunnel_idle_timeout;
    let copy = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        TUNNEL_BUFFER,
        TUNNEL_BUFFER,
    );
    tokio::pin!(copy);
    let result = loop {
        tokio::select! {
            res = &mut copy => break res.ok(),
            _ = tokio::time::sleep(idle_check(idle)) => {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                if started.elapsed().saturating_sub(last) >= idle {
                    debug!(?idle, "closing idle CONNECT tunnel");
                    break None;
                }
            }
        }
    };
    if let Some((to_upstream, to_client)) = result {
        record.bytes_in = to_upstream;
        record.bytes_out = to_client;
    }
    state.metrics.open_tunnels.dec();
    record.emit(&state.metrics);
}

/// Relay buffer per direction. tokio's default (8 KiB) costs a read and a write system call per
/// 8 KiB; a 170 KB payload then takes ~22 of each way, and each small write is its own TCP send.
/// 64 KiB (one loopback segment) cut the proxy's CPU per request in `benches/egress.rs`, for
/// 128 KiB per open tunnel.
const TUNNEL_BUFFER: usize = 64 << 10;

fn idle_check(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

/// Records the time of the last byte moved, for the idle check.
struct Active<T> {
    inner: T,
    activity: Arc<AtomicU64>,
    started: Instant,
}

impl<T> Active<T> {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.activity.store(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(res, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        res
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
