//! Every role's own endpoints — the gateway's web listener, the agent's `--web.listen-address`, the
//! egress proxy's origin-form requests, `ferry exporter` — follow one set of rules, checked here
//! the same way on each over real sockets: GET and HEAD only (405 with `Allow` otherwise), a 404
//! naming the endpoints, the exposition format picked by `Accept` weights, and gzip when
//! `Accept-Encoding` takes it.

mod common;

use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::egress::{TestEgress, TestResolver};
use common::ferry::{
    agent_section, start_agent, start_exporter, start_gateway, TestAgent, TestGateway,
};
use common::http::{self as client, Resp};
use ferry::config::EgressSection;
use ferry::telemetry::metrics_response_blocking;
use ferry::telemetry::scrape_gate::ScrapeGate;
use http::{header, Request};
use http_body_util::Full;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What Prometheus 2.42 sends with every scrape.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One listener serving a role's own endpoints.
struct Listener {
    /// Who answers, as its messages name it.
    owner: &'static str,
    addr: SocketAddr,
}

/// A gateway, an agent connected to it with its web listener, an egress proxy and an exporter,
/// all in this process.
struct Roles {
    listeners: Vec<Listener>,
    gw: TestGateway,
    agent: TestAgent,
    _egress: TestEgress,
    shutdown: CancellationToken,
    _dir: TempDir,
}

impl Roles {
    async fn start() -> Roles {
        let dir = TempDir::new().unwrap();
        let gw = start_gateway(&dir, &[("*", "test-token")], |_| {}).await;
        let agent = start_agent(agent_section(&gw, "node-1", &[]), "test-token");
        gw.wait_agent("node-1", Duration::from_secs(10)).await;
        let shutdown = CancellationToken::new();
        let agent_web = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent_addr = agent_web.local_addr().unwrap();
        tokio::spawn({
            let (a, shutdown) = (agent.agent.clone(), shutdown.clone());
            async move { a.serve_web(agent_web, shutdown).await }
        });
        wait_ready(agent_addr).await;
        let egress = TestEgress::start(EgressSection::default(), TestResolver::new(&[])).await;
        let exporter = start_exporter(&shutdown).await;
        Roles {
            listeners: vec![
                Listener {
                    owner: "the gateway",
                    addr: gw.web,
                },
                Listener {
                    owner: "the agent",
                    addr: agent_addr,
                },
                Listener {
                    owner: "the egress proxy",
                    addr: egress.addr,
                },
                Listener {
                    owner: "the exporter",
                    addr: exporter,
                },
            ],
            gw,
            agent,
            _egress: egress,
            shutdown,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.agent.stop().await;
        self.gw.stop().await;
    }
}

/// Waits until the agent at `addr` says its tunnel is up (it says so a moment after the gateway
/// lists it).
async fn wait_ready(addr: SocketAddr) {
    let started = std::time::Instant::now();
    while client::get(&format!("http://{addr}/-/ready")).await.status != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "agent at {addr} never ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An origin-form request for `path` at `addr` with `headers`.
fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

fn gunzip(body: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(body)
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("not gzip ({e}): {body:?}"));
    text
}

/// Every value of the `Vary` header lines, lowercased.
fn vary(resp: &Resp) -> Vec<String> {
    resp.headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .collect()
}

/// The exposition without the samples of the host connection collector, which change with every
/// socket of the host (the test's own included).
fn stable_lines(exposition: &str) -> String {
    exposition
        .lines()
        .filter(|l| !l.starts_with("ferry_host_tcp_"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prometheus sends `Accept-Encoding: gzip` with every scrape: an exposition of tens of MB for a
/// large fleet goes compressed, and decodes to what an uncompressed answer carries. HEAD gets the
/// same head without a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_gzipped_for_a_client_that_accepts_it_on_every_role() {
    let roles = Roles::start().await;
    for Listener { owner, addr } in &roles.listeners {
        let (owner, addr) = (*owner, *addr);
        let gzip = [("Accept", PROMETHEUS_ACCEPT), ("Accept-Encoding", "gzip")];
        let plain = [("Accept", PROMETHEUS_ACCEPT)];
        let resps = client::send_all(
            addr,
            vec![
                request("GET", addr, "/metrics", &gzip),
                request("GET", addr, "/metrics", &plain),
                request("HEAD", addr, "/metrics", &gzip),
            ],
        )
        .await;
        let [compressed, uncompressed, head] = &resps[..] else {
            unreachable!()
        };
        for (what, resp) in [("GET", compressed), ("HEAD", head)] {
            assert_eq!(resp.status, 200, "{owner} {what}: {}", resp.text());
            assert_eq!(
                resp.header("content-encoding"),
                Some("gzip"),
                "{owner} {what}"
            );
            assert_eq!(
                resp.header("content-type"),
                Some(OPENMETRICS),
                "{owner} {what}"
            );
            assert!(
                vary(resp).contains(&"accept-encoding".to_owned()),
                "{owner} {what}: {:?}",
                resp.headers
            );
        }
        assert_eq!(uncompressed.status, 200, "{owner}");
        assert_eq!(uncompressed.header("content-encoding"), None, "{owner}");
        assert!(
            vary(uncompressed).contains(&"accept-encoding".to_owned()),
            "{owner}"
        );
        let text = gunzip(&compressed.body);
        assert!(text.ends_with("# EOF\n"), "{owner}: {text}");
        assert!(
            compressed.body.len() < uncompressed.body.len(),
            "{owner}: {} compressed bytes, {} uncompressed",
            compressed.body.len(),
            uncompressed.body.len()
        );
        assert_eq!(
            stable_lines(&text),
            stable_lines(&uncompressed.text()),
            "{owner}"
        );
        assert!(
            head.body.is_empty(),
            "{owner}: HEAD has a body: {:?}",
            head.body
        );
        let announced: usize = head
            .header("content-length")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{owner}: HEAD announces no length: {:?}", head.headers));
        // The exporter's exposition changes with the host's sockets: only about the same size.
        if owner == "the exporter" {
            assert!(
                announced.abs_diff(compressed.body.len()) < 64,
                "{owner}: {announced}"
            );
        } else {
            assert_eq!(
                announced,
                compressed.body.len(),
                "{owner}: HEAD announces a GET's length"
            );
        }
    }
    roles.stop().await;
}

/// `Accept-Encoding` weights are read as RFC 9110 says: `q=0` refuses gzip, a preferred
/// `identity` wins, `*` takes gzip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_encoding_weights_decide_the_compression() {
    let roles = Roles::start().await;
    for Listener { owner, addr } in &roles.listeners {
        for (accept_encoding, gzipped) in [
            ("gzip;q=0", false),
            ("gzip;q=0.5, identity", false),
            ("identity;q=0", false),
            ("br, deflate", false),
            ("*", true),
            ("deflate, gzip;q=0.8", true),
        ] {
            let url = format!("http://{addr}/metrics");
            let resp =
                client::get_with_headers(&url, &[("Accept-Encoding", accept_encoding)]).await;
            assert_eq!(resp.status, 200, "{owner} {accept_encoding}");
            let encoding = resp.header("content-encoding");
            assert_eq!(
                encoding,
                gzipped.then_some("gzip"),
                "{owner} {accept_encoding}"
            );
            let text = if gzipped {
                gunzip(&resp.body)
            } else {
                resp.text()
            };
            assert!(
                text.contains("# TYPE ferry_build_info gauge"),
                "{owner} {accept_encoding}: {text}"
            );
        }
    }
    roles.stop().await;
}

/// The gateway's service discovery and status page are compressed the same way: http_sd of a
/// large fleet is large too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_service_discovery_and_status_page_are_gzipped_when_accepted() {
    let roles = Roles::start().await;
    let addr = roles.gw.web;
    for path in ["/targets", "/clients", "/api/v1/agents", "/"] {
        let resps = client::send_all(
            addr,
            vec![
                request("GET", addr, path, &[("Accept-Encoding", "gzip")]),
                request("GET", addr, path, &[]),
            ],
        )
        .await;
        let [compressed, uncompressed] = &resps[..] else {
            unreachable!()
        };
        assert_eq!(compressed.status, 200, "{path}");
        assert_eq!(
            compressed.header("content-encoding"),
            Some("gzip"),
            "{path}"
        );
        assert_eq!(uncompressed.header("content-encoding"), None, "{path}");
        assert_eq!(
            compressed.header("content-type"),
            uncompressed.header("content-type"),
            "{path}"
        );
        let text = gunzip(&compressed.body);
        assert!(text.contains("node-1"), "{path}: {text}");
        if path != "/" {
            // The status page shows how long ago agents connected: it may tick between the two.
            assert_eq!(text, uncompressed.text(), "{path}");
        }
    }
    roles.stop().await;
}

/// The agent's own metrics reach Prometheus through the tunnel as its built-in target `ferry`:
/// compressed there too, and the gateway passes the encoding through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_built_in_target_is_gzipped_through_the_tunnel() {
    let roles = Roles::start().await;
    let url = "http://node-1:9369/metrics";
    let resp = client::get_via_proxy(
        roles.gw.web,
        url,
        &[("Accept", PROMETHEUS_ACCEPT), ("Accept-Encoding", "gzip")],
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("content-encoding"), Some("gzip"));
    assert_eq!(resp.header("content-type"), Some(OPENMETRICS));
    let text = gunzip(&resp.body);
    assert!(text.contains("ferry_agent_tunnel_up 1"), "{text}");
    roles.stop().await;
}

/// The format follows the weights in `Accept`: OpenMetrics only when it is named and weighed at
/// least as much as the text format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exposition_format_follows_accept_weights_on_every_role() {
    let roles = Roles::start().await;
    for Listener { owner, addr } in &roles.listeners {
        for (accept, content_type) in [
            (PROMETHEUS_ACCEPT, OPENMETRICS),
            (
                "application/openmetrics-text;q=0.1, text/plain;version=0.0.4;q=0.9",
                TEXT_FORMAT,
            ),
            (
                "text/plain;q=0.5, application/openmetrics-text;q=0.5",
                OPENMETRICS,
            ),
            ("application/openmetrics-text;q=0", TEXT_FORMAT),
            ("*/*", TEXT_FORMAT),
        ] {
            let url = format!("http://{addr}/metrics");
            let resp = client::get_with_headers(&url, &[("Accept", accept)]).await;
            assert_eq!(resp.status, 200, "{owner} {accept}");
            assert_eq!(
                resp.header("content-type"),
                Some(content_type),
                "{owner} {accept}"
            );
            assert_eq!(
                resp.text().ends_with("# EOF\n"),
                content_type == OPENMETRICS,
                "{owner} {accept}"
            );
            assert!(
                vary(&resp).contains(&"accept".to_owned()),
                "{owner}: {:?}",
                resp.headers
            );
        }
    }
    roles.stop().await;
}

/// Every role's endpoints are read-only: another method is refused, not answered as a GET; a
/// path that is none of them is a 404 naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_endpoints_answer_get_and_head_only_and_404_names_them_on_every_role() {
    let roles = Roles::start().await;
    for Listener { owner, addr } in &roles.listeners {
        let (owner, addr) = (*owner, *addr);
        for path in ["/metrics", "/-/healthy", "/-/ready"] {
            for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
                let resp = client::send(addr, request(method, addr, path, &[])).await;
                assert_eq!(resp.status, 405, "{owner} {method} {path}: {}", resp.text());
                assert_eq!(
                    resp.header("allow"),
                    Some("GET, HEAD"),
                    "{owner} {method} {path}"
                );
                assert_eq!(
                    resp.text(),
                    format!("method {method} is not allowed on {path}: {owner}'s own endpoints answer GET and HEAD\n")
                );
            }
            for method in ["GET", "HEAD"] {
                let resp = client::send(addr, request(method, addr, path, &[])).await;
                assert_eq!(resp.status, 200, "{owner} {method} {path}: {}", resp.text());
                assert_eq!(
                    resp.body.is_empty(),
                    method == "HEAD",
                    "{owner} {method} {path}"
                );
            }
        }
        for method in ["GET", "POST"] {
            let resp = client::send(addr, request(method, addr, "/nope", &[])).await;
            assert_eq!(resp.status, 404, "{owner} {method}: {}", resp.text());
            let text = resp.text();
            let (_, listed) = text
                .split_once(&format!("{owner}'s own endpoints are "))
                .unwrap_or_else(|| panic!("{owner}: the 404 names no endpoints: {text}"));
            let listed: Vec<&str> = listed.trim_end().split(", ").collect();
            for path in ["/metrics", "/-/healthy", "/-/ready"] {
                assert!(listed.contains(&path), "{owner}: {text}");
            }
            assert_eq!(text.lines().count(), 1, "{owner}: {text}");
        }
    }
    roles.stop().await;
}

/// Every own answer of every role — endpoints, 404, 405 — tells a browser not to sniff its type;
/// the gateway's status page, the one HTML page, also forbids anything but its inline style,
/// framing and referrers. What ferry proxies keeps the target's headers: none are added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_answers_carry_security_headers_and_proxied_ones_do_not() {
    let roles = Roles::start().await;
    let gateway_only = ["/", "/targets", "/clients", "/api/v1/agents"];
    for Listener { owner, addr } in &roles.listeners {
        let mut paths = vec!["/metrics", "/-/healthy", "/-/ready", "/nope"];
        if *owner == "the gateway" {
            paths.extend(gateway_only);
        }
        for path in paths {
            for method in ["GET", "HEAD", "POST"] {
                let resp = client::send(*addr, request(method, *addr, path, &[])).await;
                assert_eq!(
                    resp.header("x-content-type-options"),
                    Some("nosniff"),
                    "{owner} {method} {path} ({}): {:?}",
                    resp.status,
                    resp.headers
                );
                let html = path == "/" && method != "POST";
                if html {
                    assert!(
                        resp.header("content-type")
                            .is_some_and(|t| t.starts_with("text/html")),
                        "{:?}",
                        resp.headers
                    );
                }
                let csp = resp.header("content-security-policy");
                assert_eq!(csp.is_some(), html, "{owner} {method} {path}: {csp:?}");
                if let Some(csp) = csp {
                    for directive in [
                        "default-src 'none'",
                        "style-src 'unsafe-inline'",
                        "frame-ancestors 'none'",
                    ] {
                        assert!(csp.contains(directive), "{directive}: {csp}");
                    }
                    assert_eq!(resp.header("x-frame-options"), Some("DENY"));
                    assert_eq!(resp.header("referrer-policy"), Some("no-referrer"));
                }
            }
        }
    }

    // A scrape through the gateway (the agent's built-in target) is the target's answer.
    let scrape = client::get_via_proxy(roles.gw.web, "http://node-1:9369/metrics", &[]).await;
    assert_eq!(scrape.status, 200, "{}", scrape.text());
    for name in [
        "x-content-type-options",
        "content-security-policy",
        "x-frame-options",
        "referrer-policy",
    ] {
        assert_eq!(scrape.header(name), None, "{name}: {:?}", scrape.headers);
    }
    roles.stop().await;
}

/// Encodings of a [`SlowCollector`]: how many ran, and the most at once.
#[derive(Debug, Default)]
struct Encodings {
    running: AtomicUsize,
    most_at_once: AtomicUsize,
    done: AtomicUsize,
}

/// A collector as slow as the host connection collector on a busy host (a socket dump of 20k
/// sockets takes seconds); it exports `slow_encodings`, the encodings done so far.
#[derive(Debug)]
struct SlowCollector(Arc<Encodings>, Duration);

impl Collector for SlowCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = self.0.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.most_at_once.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(self.1);
        let done = self.0.done.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        let gauge = ConstGauge::new(done as i64);
        let family = encoder.encode_descriptor(
            "slow_encodings",
            "Encodings so far",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(family)
    }
}

struct Gated {
    registry: Registry,
}

fn gated_registry(gated: &Gated) -> &Registry {
    &gated.registry
}

/// `/metrics` of a registry with a [`SlowCollector`] taking `encode_time`, served through a
/// [`ScrapeGate`] as the exporter's is (and an agent's with the connection collector).
async fn serve_gated(
    encode_time: Duration,
    shutdown: &CancellationToken,
) -> (SocketAddr, Arc<Encodings>) {
    let encodings = Arc::new(Encodings::default());
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SlowCollector(encodings.clone(), encode_time)));
    let gate = ScrapeGate::new();
    gate.register_metrics(&mut registry);
    let owner = Arc::new(Gated { registry });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = move |_peer, req: Request<hyper::body::Incoming>| {
        let (owner, gate) = (owner.clone(), gate.clone());
        let headers = req.headers().clone();
        async move { metrics_response_blocking(owner, gated_registry, headers, Some(&gate)).await }
    };
    tokio::spawn(ferry::server::serve_http(
        listener,
        handler,
        shutdown.clone(),
        Duration::from_secs(5),
    ));
    (addr, encodings)
}

const BUSY: &str = "too many /metrics requests at once: 4 are waiting already for the host's TCP socket dump in progress; retry later\n";

/// Parallel scrapes of a registry with the host connection collector run one socket dump: the
/// requests that came while it ran wait for it and answer with its result, and past four
/// waiting the next are refused with 503 and a one-line reason, counted for the next scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_scrapes_share_one_socket_dump_and_the_excess_is_refused() {
    let shutdown = CancellationToken::new();
    let (addr, encodings) = serve_gated(Duration::from_secs(1), &shutdown).await;
    let url = format!("http://{addr}/metrics");
    let scrapes = (0..12).map(|_| client::get(&url));
    let resps = futures_util::future::join_all(scrapes).await;

    let (ok, refused): (Vec<&Resp>, Vec<&Resp>) = resps.iter().partition(|r| r.status == 200);
    assert_eq!((ok.len(), refused.len()), (5, 7), "{resps:#?}");
    for resp in &refused {
        assert_eq!((resp.status, resp.text().as_str()), (503, BUSY));
        assert_eq!(resp.header("retry-after"), Some("1"), "{:?}", resp.headers);
    }
    for resp in &ok {
        assert!(
            resp.text().contains("\nslow_encodings 1\n"),
            "{}",
            resp.text()
        );
    }
    assert_eq!(encodings.done.load(Ordering::SeqCst), 1);
    assert_eq!(encodings.most_at_once.load(Ordering::SeqCst), 1);

    let text = client::get(&url).await.text();
    assert!(text.contains("\nslow_encodings 2\n"), "{text}");
    assert!(
        text.contains("\nferry_host_tcp_collector_refusals_total 7\n"),
        "{text}"
    );
    shutdown.cancel();
}

/// A scrape whose client goes away while it waits for the dump in progress gives its place in
/// line back and starts no dump of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_whose_client_went_away_leaves_the_line_and_starts_no_dump() {
    use tokio::io::AsyncWriteExt as _;
    let shutdown = CancellationToken::new();
    let (addr, encodings) = serve_gated(Duration::from_secs(3), &shutdown).await;
    let url = format!("http://{addr}/metrics");
    let first = tokio::spawn({
        let url = url.clone();
        async move { client::get(&url).await }
    });
    while encodings.running.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut gone = Vec::new();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        gone.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let later = (0..4).map(|_| client::get(&url));
    let resps = futures_util::future::join_all(later).await;
    assert!(resps.iter().all(|r| r.status == 200), "{resps:#?}");
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(encodings.done.load(Ordering::SeqCst), 1);
    shutdown.cancel();
}

/// The exporter, and an agent with the connection collector, count their refused scrapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_with_the_connection_collector_count_refused_scrapes() {
    let shutdown = CancellationToken::new();
    let exporter = start_exporter(&shutdown).await;
    let text = client::get(&format!("http://{exporter}/metrics"))
        .await
        .text();
    assert!(
        text.contains("\nferry_host_tcp_collector_refusals_total 0\n"),
        "{text}"
    );

    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", "test-token")], |_| {}).await;
    let mut section = agent_section(&gw, "node-1", &[]);
    section.collector.connections = true;
    let agent = start_agent(section, "test-token");
    gw.wait_agent("node-1", Duration::from_secs(10)).await;
    let url = "http://node-1:9369/metrics";
    let text = client::get_via_proxy(gw.web, url, &[]).await.text();
    assert!(
        text.contains("\nferry_host_tcp_collector_refusals_total 0\n"),
        "{text}"
    );
    shutdown.cancel();
    agent.stop().await;
    gw.stop().await;
}
