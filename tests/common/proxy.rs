//! An HTTP CONNECT proxy and a plain TCP relay on 127.0.0.1:0 — the middleboxes between an agent
//! and its gateway. Either can cut a connection that stayed idle too long, like a load balancer.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// Largest CONNECT request head the proxy reads.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its CONNECT request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const RELAY_BUFFER: usize = 16 * 1024;

/// A running proxy or relay; stops accepting and closes every tunnel when dropped.
pub struct ConnectProxy {
    pub addr: SocketAddr,
    stats: Arc<Stats>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct Stats {
    opened: AtomicUsize,
    cut: AtomicUsize,
    connects: Mutex<Vec<String>>,
    cut_all: Notify,
    freeze_all: Notify,
    stall_all: Notify,
    /// How long a `stall_all` lasts, in milliseconds.
    stall_ms: AtomicU64,
    /// Bytes per second the client's direction is held to (0: as fast as it comes).
    upload_rate: AtomicU64,
}

/// Where an accepted connection goes.
#[derive(Clone, Copy)]
enum Mode {
    /// Read `CONNECT host:port`, dial that.
    Connect,
    /// Dial this fixed address.
    Relay(SocketAddr),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RelayEnd {
    Closed,
    Cut,
}

impl ConnectProxy {
    /// An HTTP CONNECT proxy. With `idle_cut: Some(d)` a tunnel with no byte in either direction
    /// for `d` is closed on both sides.
    pub async fn start(idle_cut: Option<Duration>) -> ConnectProxy {
        Self::spawn(Mode::Connect, idle_cut).await
    }

    /// A plain TCP relay to `target` (no CONNECT), with the same idle cut.
    pub async fn start_tcp_relay(target: SocketAddr, idle_cut: Option<Duration>) -> ConnectProxy {
        Self::spawn(Mode::Relay(target), idle_cut).await
    }

    /// A plain TCP relay to `target` that carries what its clients send at `bytes_per_second`
    /// only, the other way at full speed: an agent on a slow uplink, whose send buffer then
    /// holds seconds of data in front of anything it sends next.
    pub async fn start_slow_uplink(target: SocketAddr, bytes_per_second: u64) -> ConnectProxy {
        let relay = Self::spawn(Mode::Relay(target), None).await;
        relay
            .stats
            .upload_rate
            .store(bytes_per_second, Ordering::SeqCst);
        relay
    }

    async fn spawn(mode: Mode, idle_cut: Option<Duration>) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy local_addr");
        let stats = Arc::new(Stats::default());
        let accept = tokio::spawn(accept_loop(listener, mode, idle_cut, stats.clone()));
        ConnectProxy {
            addr,
            stats,
            accept,
        }
    }

    /// `http://<addr>`, for `--proxy-url` or `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Tunnels established (CONNECT answered 200, or relay connected to its target).
    pub fn tunnels_opened(&self) -> usize {
        self.stats.opened.load(Ordering::SeqCst)
    }

    /// Tunnels closed by the proxy: idle cuts and `cut_all`.
    pub fn tunnels_cut(&self) -> usize {
        self.stats.cut.load(Ordering::SeqCst)
    }

    /// The `host:port` of every CONNECT request received, answered or not.
    pub fn connect_targets(&self) -> Vec<String> {
        self.stats
            .connects
            .lock()
            .expect("proxy state poisoned")
            .clone()
    }

    /// Closes every open tunnel now, like a middlebox restart (counted in `tunnels_cut`).
    pub fn cut_all(&self) {
        self.stats.cut_all.notify_waiters();
    }

    /// Stops moving bytes on every open tunnel but keeps both connections open, like a middlebox
    /// that lost its state or a peer that hung: only keepalive can tell. New tunnels still work.
    pub fn freeze_all(&self) {
        self.stats.freeze_all.notify_waiters();
    }

    /// Stops moving bytes on every open tunnel for `how_long`, then moves what queued up
    /// meanwhile at once, like a peer paused (a VM migrated, a process stopped) and resumed.
    pub fn stall_all(&self, how_long: Duration) {
        let ms = u64::try_from(how_long.as_millis()).unwrap_or(u64::MAX);
        self.stats.stall_ms.store(ms, Ordering::SeqCst);
        self.stats.stall_all.notify_waiters();
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        // Tunnel tasks live in a JoinSet owned by the accept task: aborting it closes them too.
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    mode: Mode,
    idle_cut: Option<Duration>,
    stats: Arc<Stats>,
) {
    let mut tunnels = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tunnels.spawn(handle(client, mode, idle_cut, stats.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
        while tunnels.try_join_next().is_some() {}
    }
}

async fn handle(client: TcpStream, mode: Mode, idle_cut: Option<Duration>, stats: Arc<Stats>) {
    // Created before any await, so a `cut_all` during setup still reaches this tunnel.
    let cut_now = stats.cut_all.notified();
    let freeze_now = stats.freeze_all.notified();
    let opened = match mode {
        Mode::Connect => accept_connect(client, &stats).await,
        Mode::Relay(target) => TcpStream::connect(target)
            .await
            .ok()
            .map(|upstream| (client, upstream, Vec::new())),
    };
    let Some((client, upstream, early)) = opened else {
        return;
    };
    stats.opened.fetch_add(1, Ordering::SeqCst);
    let rate = stats.upload_rate.load(Ordering::SeqCst);
    let relaying = relay(client, upstream, early, idle_cut, rate);
    tokio::pin!(relaying, cut_now, freeze_now);
    let end = loop {
        let stall_now = stats.stall_all.notified();
        tokio::select! {
            end = &mut relaying => break end,
            _ = &mut cut_now => break RelayEnd::Cut,
            // The relay, and with it both sockets, stays alive but is never polled again.
            _ = &mut freeze_now => std::future::pending().await,
            // Not polled for a while: the bytes wait in the sockets' buffers.
            _ = stall_now => {
                let ms = stats.stall_ms.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
    };
    if end == RelayEnd::Cut {
        stats.cut.fetch_add(1, Ordering::SeqCst);
    }
}

/// Reads the CONNECT request, dials its target and answers 200. Returns the client, the upstream
/// and any bytes the client sent after the request head.
async fn accept_connect(
    mut client: TcpStream,
    stats: &Stats,
) -> Option<(TcpStream, TcpStream, Vec<u8>)> {
    let (head, early) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client))
        .await
        .ok()??;
    let Some(authority) = parse_connect(&head) else {
        reply(&mut client, "405 Method Not Allowed").await;
        return None;
    };
    stats
        .connects
        .lock()
        .expect("proxy state poisoned")
        .push(authority.clone());
    let Ok(upstream) = TcpStream::connect(authority.as_str()).await else {
        reply(&mut client, "502 Bad Gateway").await;
        return None;
    };
    client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .ok()?;
    Some((client, upstream, early))
}

/// Reads up to the blank line ending a request head; returns the head and the bytes after it.
async fn read_head(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_head_end(&buf) {
            let rest = buf.split_off(end);
            return Some((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// `CONNECT host:port HTTP/1.x` → `host:port`.
fn parse_connect(head: &str) -> Option<String> {
    let mut parts = head.lines().next()?.split_whitespace();
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    (method == "CONNECT" && version.starts_with("HTTP/1.")).then(|| target.to_owned())
}

async fn reply(client: &mut TcpStream, status: &str) {
    let response = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = client.write_all(response.as_bytes()).await;
}

/// Copies bytes both ways until both directions ended (`Closed`) or nothing moved for `idle_cut`
/// (`Cut`), the client's way at `upload_rate` bytes per second if not 0. Both sockets are
/// dropped — closed — on return.
async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    early: Vec<u8>,
    idle_cut: Option<Duration>,
    upload_rate: u64,
) -> RelayEnd {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    if !early.is_empty() && upstream_write.write_all(&early).await.is_err() {
        return RelayEnd::Closed;
    }
    let activity = Notify::new();
    let both_ways = async {
        tokio::join!(
            pump(
                &mut client_read,
                &mut upstream_write,
                &activity,
                upload_rate
            ),
            pump(&mut upstream_read, &mut client_write, &activity, 0),
        )
    };
    tokio::select! {
        _ = both_ways => RelayEnd::Closed,
        _ = idle_watch(idle_cut, &activity) => RelayEnd::Cut,
    }
}

/// One direction: read, signal activity, write, until EOF or an error; then half-close the
/// writer. With a `rate` (bytes per second, 0 for none) each chunk waits its turn.
async fn pump<R, W>(reader: &mut R, writer: &mut W, activity: &Notify, rate: u64)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; if rate > 0 { 4096 } else { RELAY_BUFFER }];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        activity.notify_one();
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
        if writer.write_all(&buf[..n]).await.is_err() {
            break;
        }
        activity.notify_one();
    }
    let _ = writer.shutdown().await;
}

/// Returns once `idle_cut` passes with no activity; never returns without an idle cut.
async fn idle_watch(idle_cut: Option<Duration>, activity: &Notify) {
    let Some(limit) = idle_cut else {
        return std::future::pending().await;
    };
    let idle = tokio::time::sleep(limit);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            _ = activity.notified() => idle.as_mut().reset(tokio::time::Instant::now() + limit),
            _ = &mut idle => return,
        }
    }
}

/// Client side: opens a TCP connection to `proxy`, sends `CONNECT authority`, and returns the
/// stream once the proxy answered 200. Panics on any other answer or after 10 s.
pub async fn open_tunnel(proxy: SocketAddr, authority: &str) -> TcpStream {
    let opened = async {
        let mut stream = TcpStream::connect(proxy)
            .await
            .unwrap_or_else(|e| panic!("connect to proxy {proxy}: {e}"));
        let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("send CONNECT to proxy {proxy}: {e}"));
        let head = read_response_head(&mut stream).await;
        let status_line = head.lines().next().unwrap_or_default();
        assert!(
            status_line.split_whitespace().nth(1) == Some("200"),
            "CONNECT {authority} via {proxy} refused: {head:?}"
        );
        stream
    };
    tokio::time::timeout(HEAD_TIMEOUT, opened)
        .await
        .unwrap_or_else(|_| panic!("CONNECT {authority} via proxy {proxy}: no answer within 10 s"))
}

/// Reads byte by byte so nothing after the head is consumed.
async fn read_response_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while find_head_end(&head).is_none() {
        assert!(head.len() <= MAX_HEAD, "proxy answer head too long");
        let byte = stream
            .read_u8()
            .await
            .unwrap_or_else(|e| panic!("proxy closed during CONNECT answer: {e}; got {head:?}"));
        head.push(byte);
    }
    String::from_utf8_lossy(&head).into_owned()
}
