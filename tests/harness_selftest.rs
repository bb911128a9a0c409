//! Proves the shared test helpers in `tests/common/` do what ferry's tests rely on.

mod common;

use std::time::{Duration, Instant};

use common::external::{values, NodeExporter, Prometheus};
use common::http::{get, get_streaming, get_via_proxy, get_with_headers, send_on};
use common::proxy::{open_tunnel, ConnectProxy};
use common::servers::{gunzip, large_body_digest, Behaviour, BodyDigest, TargetServer};
use tokio::io::AsyncReadExt;

const METRICS: &str = "# TYPE up gauge\nselftest_value 42\n";

fn get_request(host: &str, path: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::get(path)
        .header(http::header::HOST, host)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("valid request")
}

/// Waits (bounded) until the peer closes `stream`; returns how long that took.
async fn time_until_closed(stream: &mut tokio::net::TcpStream, bound: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(bound, stream.read(&mut buf))
        .await
        .expect("tunnel was not closed in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected EOF or reset, got {read:?}"
    );
    started.elapsed()
}

#[tokio::test]
async fn metrics_behaviour_serves_every_path_and_records_requests() {
    let server = TargetServer::start(Behaviour::Metrics(METRICS.into())).await;
    assert_eq!(server.requests(), 0);
    assert!(server.last_headers().is_none());

    let resp = get_with_headers(&server.url("/metrics?x=1"), &[("x-test", "yes")]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), METRICS);
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let other = get(&server.url("/anything/else")).await;
    assert_eq!(other.text(), METRICS);

    assert_eq!(server.requests(), 2);
    assert_eq!(server.paths(), ["/metrics?x=1", "/anything/else"]);
    let headers = server.last_headers().expect("headers recorded");
    assert_eq!(headers["host"], server.addr.to_string().as_str());
    assert!(
        headers.get("x-test").is_none(),
        "last request had no x-test"
    );
}

#[tokio::test]
async fn absolute_form_request_keeps_url_and_host() {
    // The target server answers absolute-form too, which shows what get_via_proxy sends.
    let server = TargetServer::start(Behaviour::Metrics(METRICS.into())).await;
    let resp = get_via_proxy(
        server.addr,
        "http://node-1:9100/metrics?a=b",
        &[("accept", "text/plain")],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(server.uris(), ["http://node-1:9100/metrics?a=b"]);
    assert_eq!(server.paths(), ["/metrics?a=b"]);
    let headers = server.last_headers().expect("headers recorded");
    assert_eq!(headers["host"], "node-1:9100");
    assert_eq!(headers["accept"], "text/plain");
}

#[tokio::test]
async fn gzip_behaviour_compresses_only_when_accepted() {
    let server = TargetServer::start(Behaviour::Gzip(METRICS.into())).await;

    let zipped = get_with_headers(&server.url("/metrics"), &[("accept-encoding", "gzip")]).await;
    assert_eq!(zipped.header("content-encoding"), Some("gzip"));
    assert_ne!(zipped.body.as_ref(), METRICS.as_bytes());
    assert_eq!(gunzip(&zipped.body), METRICS.as_bytes());

    let plain = get(&server.url("/metrics")).await;
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.text(), METRICS);
}

#[tokio::test]
async fn slow_behaviour_waits_before_answering() {
    let delay = Duration::from_millis(300);
    let server = TargetServer::start(Behaviour::Slow {
        delay,
        body: METRICS.into(),
    })
    .await;
    let started = Instant::now();
    let resp = get(&server.url("/metrics")).await;
    assert!(
        started.elapsed() >= delay,
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(resp.text(), METRICS);
}

#[tokio::test]
async fn large_behaviour_streams_exact_deterministic_body() {
    let bytes = 5 * 1024 * 1024 + 13; // not a multiple of the chunk or word size
    let server = TargetServer::start(Behaviour::Large { bytes }).await;

    let mut digest = BodyDigest::new();
    let resp = get_streaming(&server.url("/big"), &[], |chunk| digest.update(chunk)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.headers["content-length"], bytes.to_string().as_str());
    assert_eq!(resp.body_bytes, bytes);
    assert_eq!(digest.bytes_seen(), bytes);
    assert_eq!(digest.finish(), large_body_digest(bytes));
    assert_ne!(large_body_digest(bytes), large_body_digest(bytes - 1));
}

#[test]
fn body_digest_ignores_chunking_but_not_content() {
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut whole = BodyDigest::new();
    whole.update(&data);
    let mut pieces = BodyDigest::new();
    for piece in data.chunks(3) {
        pieces.update(piece);
    }
    assert_eq!(whole.finish(), pieces.finish());

    let mut changed = data.clone();
    changed[500] ^= 1;
    let mut other = BodyDigest::new();
    other.update(&changed);
    assert_ne!(whole.finish(), other.finish());
}

#[tokio::test]
async fn connect_proxy_relays_to_target() {
    let server = TargetServer::start(Behaviour::Metrics(METRICS.into())).await;
    let proxy = ConnectProxy::start(None).await;

    let authority = server.addr.to_string();
    let tunnel = open_tunnel(proxy.addr, &authority).await;
    let resp = send_on(tunnel, get_request(&authority, "/metrics"))
        .await
        .expect("request through tunnel");
    assert_eq!(resp.text(), METRICS);
    assert_eq!(server.paths(), ["/metrics"]);
    assert_eq!(proxy.tunnels_opened(), 1);
    assert_eq!(proxy.tunnels_cut(), 0);
    assert_eq!(proxy.connect_targets(), [authority]);
}

#[tokio::test]
async fn connect_proxy_refuses_non_connect_requests() {
    let proxy = ConnectProxy::start(None).await;
    let resp = get_via_proxy(proxy.addr, "http://example.invalid/metrics", &[]).await;
    assert_eq!(resp.status, 405);
    assert_eq!(proxy.tunnels_opened(), 0);
}

#[tokio::test]
async fn connect_proxy_keeps_active_tunnel_and_cuts_idle_one() {
    let idle_cut = Duration::from_millis(300);
    let server = TargetServer::start(Behaviour::Metrics(METRICS.into())).await;
    let proxy = ConnectProxy::start(Some(idle_cut)).await;
    let authority = server.addr.to_string();

    // Keep-alive HTTP/1.1 on one tunnel: a request every 100 ms for ~1 s keeps it open.
    let tunnel = open_tunnel(proxy.addr, &authority).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tunnel))
            .await
            .expect("handshake through tunnel");
    let conn = tokio::spawn(conn);
    for _ in 0..10 {
        let resp = sender
            .send_request(get_request(&authority, "/metrics"))
            .await
            .expect("active tunnel must stay open");
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.requests(), 10);
    assert_eq!(proxy.tunnels_cut(), 0);

    // Then silence: the proxy closes the tunnel, which ends the client connection.
    // A clean EOF or a reset: either way the connection ended.
    let _ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("idle tunnel was not cut")
        .expect("connection task");
    assert_eq!(proxy.tunnels_opened(), 1);
    assert_eq!(proxy.tunnels_cut(), 1);
}

#[tokio::test]
async fn idle_cut_closes_silent_tunnel_after_the_limit() {
    let idle_cut = Duration::from_millis(300);
    let server = TargetServer::start(Behaviour::Metrics(METRICS.into())).await;
    let proxy = ConnectProxy::start(Some(idle_cut)).await;

    let mut tunnel = open_tunnel(proxy.addr, &server.addr.to_string()).await;
    let took = time_until_closed(&mut tunnel, Duration::from_secs(5)).await;
    assert!(
        took >= idle_cut - Duration::from_millis(50),
        "cut after {took:?}"
    );
    assert_eq!(proxy.tunnels_cut(), 1);
}

#[tokio::test]
async fn cut_all_closes_open_tunnels() {
    let server = TargetServer::start(Behaviour::Metrics(METRICS.into())).await;
    let proxy = ConnectProxy::start(None).await;
    let mut tunnel = open_tunnel(proxy.addr, &server.addr.to_string()).await;
    proxy.cut_all();
    time_until_closed(&mut tunnel, Duration::from_secs(5)).await;
    assert_eq!(proxy.tunnels_cut(), 1);
}

#[tokio::test]
async fn tcp_relay_forwards_and_cuts_idle_connections() {
    let server = TargetServer::start(Behaviour::Metrics(METRICS.into())).await;
    let relay = ConnectProxy::start_tcp_relay(server.addr, Some(Duration::from_millis(300))).await;

    let resp = get(&format!("http://{}/metrics", relay.addr)).await;
    assert_eq!(resp.text(), METRICS);
    assert_eq!(server.requests(), 1);

    let mut idle = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("connect relay");
    time_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert_eq!(relay.tunnels_opened(), 2);
    assert!(relay.tunnels_cut() >= 1);
}

#[tokio::test]
async fn node_exporter_serves_node_metrics() {
    let exporter = NodeExporter::start().await;
    let resp = get(&exporter.metrics_url()).await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.text().lines().any(|l| l.starts_with("node_")),
        "no node_ metrics in: {}",
        resp.text()
    );
}

#[tokio::test]
async fn prometheus_scrapes_a_target_and_answers_queries() {
    let server = TargetServer::start(Behaviour::Metrics(METRICS.into())).await;
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
         scrape_configs:\n  - job_name: selftest\n    static_configs:\n      - targets: ['{}']\n",
        server.addr
    );
    let prometheus = Prometheus::start(&config).await;
    let answer = prometheus
        .wait_for(
            "selftest_value{job=\"selftest\"}",
            Duration::from_secs(20),
            |v| values(v) == [42.0],
        )
        .await;
    assert_eq!(answer["status"], "success");
    assert!(server.paths().iter().all(|p| p == "/metrics"));
}
