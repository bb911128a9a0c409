//! The egress forward proxy on loopback, as a monitoring agent (the client) and a collector (the
//! upstream) see it: which clients get in, which destinations are reachable (special-purpose
//! addresses in every spelling, names resolving to them, CONNECT), payload validation (a valid
//! payload arrives byte-identical, an invalid one never reaches the upstream), TLS upgrade,
//! protocol hygiene, keep-alive, and what the access log and metrics say.

mod common;

use std::convert::Infallible;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::egress::{
    absolute, ca_and_client_cert, ca_and_server_cert, connect_raw, exchange, expired_client_cert,
    raw_exchange, read_response, RecordingUpstream, Reply, TestEgress, TestResolver, TIMEOUT,
    UPSTREAM_BODY,
};
use common::ferry::metric_value;
use common::http::{get, send_on, try_get, Resp};
use common::proxy::open_tunnel;
use common::servers::{Behaviour, TargetServer};
use ferry::config::EgressSection;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------
// Helpers

/// A section allowing these short-form rules (`--allow-upstream`), defaults otherwise.
fn section(upstreams: &[String]) -> EgressSection {
    EgressSection {
        allow_upstreams: upstreams.to_vec(),
        ..EgressSection::default()
    }
}

/// An `egress:` section as a user writes it in the YAML file.
fn yaml_section(yaml: &str) -> EgressSection {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("test YAML invalid: {e}\n{yaml}"))
}

/// `127.0.0.1/32:<port>`: the only way to let traffic reach a loopback upstream.
fn loopback_rule(up: &RecordingUpstream) -> String {
    format!("127.0.0.1/32:{}", up.port())
}

/// The proxy with one config-file rule `collector` for `up` whose `validate:` is `validate`
/// (a YAML flow mapping).
async fn validating_proxy(up: &RecordingUpstream, validate: &str) -> TestEgress {
    let yaml = format!(
        "rules:\n  - name: collector\n    upstream: \"{}\"\n    validate: {validate}\n",
        loopback_rule(up)
    );
    TestEgress::start(yaml_section(&yaml), TestResolver::new(&[])).await
}

/// Asserts a refusal: the status, and the same one-line reason in the `Ferry-Refusal` header and
/// the body, containing `needle`.
fn assert_refused(resp: &Resp, status: u16, needle: &str, what: &str) {
    assert_eq!(
        resp.status,
        status,
        "{what}: expected {status}, got {} {:?}",
        resp.status,
        resp.text()
    );
    let reason = resp
        .header("ferry-refusal")
        .unwrap_or_else(|| panic!("{what}: no Ferry-Refusal header on {}", resp.status));
    assert!(
        reason.contains(needle),
        "{what}: reason {reason:?} should mention {needle:?}"
    );
    assert_eq!(
        resp.text().trim_end(),
        reason,
        "{what}: body and header carry one line"
    );
    // It quotes the request: never to be read as HTML in the destination's name.
    assert_eq!(
        resp.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
}

/// GET `url` (absolute-form) through `proxy`.
async fn get_via(proxy: SocketAddr, url: &str) -> Resp {
    exchange(proxy, absolute("GET", url, &[], Bytes::new())).await
}

/// POST `body` to `url` (absolute-form) through `proxy`.
async fn post_via(proxy: SocketAddr, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    exchange(
        proxy,
        absolute("POST", url, headers, Bytes::copy_from_slice(body)),
    )
    .await
}

/// Asserts the upstream received exactly `body` with these framing headers.
fn assert_arrived_identical(up: &RecordingUpstream, body: &[u8], content_type: Option<&str>) {
    let got = up.last();
    assert_eq!(got.method, "POST");
    assert_eq!(
        got.body.as_ref(),
        body,
        "the payload must arrive byte-identical"
    );
    assert_eq!(
        got.header("content-length"),
        Some(body.len().to_string().as_str()),
        "Content-Length as sent"
    );
    assert_eq!(
        got.header("content-type"),
        content_type,
        "Content-Type as sent"
    );
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// gzip with `name` in the header's file name field (FNAME).
fn gzip_named(name: &str, data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new()
        .filename(name)
        .write(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn md5_b64(data: &[u8]) -> String {
    use base64::Engine as _;
    use md5::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data))
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A chunked body (no Content-Length) of these chunks.
fn chunked(
    chunks: Vec<Vec<u8>>,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
    StreamBody::new(futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c)))),
    ))
}

/// Binds `ip:port`, retrying with new upstream ports when the second address's port is taken:
/// returns (upstream on 127.0.0.1:P, decoy on `ip`:P) — same port, different loopback address.
async fn upstream_and_decoy(ip: &str) -> (RecordingUpstream, RecordingUpstream) {
    for _ in 0..20 {
        let up = RecordingUpstream::start().await;
        if let Ok(listener) = TcpListener::bind((ip, up.port())).await {
            let decoy = RecordingUpstream::serve(listener, Reply::Ok, None);
            return (up, decoy);
        }
    }
    panic!("no port free on both 127.0.0.1 and {ip}");
}

// ---------------------------------------------------------------------------------------------
// Clients

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_ipv4_client_reaches_the_upstream() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let resp = get_via(proxy.addr, &up.url("/v4?x=1")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), UPSTREAM_BODY);
    assert_eq!(resp.header("x-upstream"), Some("yes"));
    assert!(resp.header("ferry-refusal").is_none());
    // The proxy's own security headers are for its own endpoints, not the upstream's answer.
    assert_eq!(resp.header("x-content-type-options"), None);
    let got = up.last();
    assert_eq!((got.method.as_str(), got.uri.as_str()), ("GET", "/v4?x=1"));
    assert_eq!(
        got.header("host"),
        Some(up.addr.to_string().as_str()),
        "Host is the destination's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_ipv6_client_reaches_the_upstream() {
    let up = RecordingUpstream::start().await;
    // Default client allowlist: loopback, ::1 included.
    let proxy = TestEgress::start_on(
        "[::1]:0",
        section(&[loopback_rule(&up)]),
        TestResolver::new(&[]),
    )
    .await;
    assert!(proxy.addr.is_ipv6());
    let resp = get_via(proxy.addr, &up.url("/v6")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(up.last().uri, "/v6");
}

/// An IPv6 upstream rule is written with the prefix length inside or after the brackets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_upstream_rule_takes_the_length_inside_or_after_the_brackets() {
    let listener = TcpListener::bind("[::1]:0").await.unwrap();
    let up = RecordingUpstream::serve(listener, Reply::Ok, None);
    let port = up.port();
    for rule in [format!("[::1/128]:{port}"), format!("[::1]/128:{port}")] {
        let proxy =
            TestEgress::start(section(std::slice::from_ref(&rule)), TestResolver::new(&[])).await;
        let resp = get_via(proxy.addr, &format!("http://[::1]:{port}/v6")).await;
        assert_eq!(resp.status, 200, "{rule}: {}", resp.text());
        assert_eq!(up.last().uri, "/v6");
    }
    assert_eq!(up.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outside_the_allowlist_is_refused_ipv4() {
    let up = RecordingUpstream::start().await;
    let mut s = section(&[loopback_rule(&up)]);
    s.allow_clients = vec!["10.0.0.0/8".into()];
    let proxy = TestEgress::start(s, TestResolver::new(&[])).await;
    let resp = get_via(proxy.addr, &up.url("/")).await;
    assert_refused(
        &resp,
        403,
        "client 127.0.0.1 is not allowed",
        "client 127.0.0.1",
    );
    let resp = raw_exchange(
        proxy.addr,
        format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", up.addr).as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 403, "CONNECT from a refused client: {resp:?}");
    up.assert_untouched("refused client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_outside_the_allowlist_is_refused_ipv6() {
    let up = RecordingUpstream::start().await;
    let mut s = section(&[loopback_rule(&up)]);
    s.allow_clients = vec!["127.0.0.0/8".into(), "2001:db8::/32".into()];
    let proxy = TestEgress::start_on("[::1]:0", s, TestResolver::new(&[])).await;
    let resp = get_via(proxy.addr, &up.url("/")).await;
    assert_refused(&resp, 403, "client ::1 is not allowed", "client ::1");
    up.assert_untouched("refused ::1 client");
}

/// Waits until a request from this client gets through again (its connection cap had been
/// reached and `what` was closed).
async fn wait_slot_freed(proxy: &TestEgress, up: &RecordingUpstream, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = get_via(proxy.addr, &up.url("/after")).await;
        if resp.status == 200 {
            return;
        }
        assert_eq!(resp.status, 429);
        assert!(
            Instant::now() < deadline,
            "the slot of {what} was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_client_address_are_capped() {
    let up = RecordingUpstream::start().await;
    let mut s = section(&[loopback_rule(&up)]);
    s.max_connections_per_client = 2;
    let proxy = TestEgress::start(s, TestResolver::new(&[])).await;

    // Two kept-alive connections, each proven admitted by a completed request.
    let mut held = Vec::new();
    for i in 0..2 {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender
            .send_request(absolute(
                "GET",
                &up.url(&format!("/held{i}")),
                &[],
                Bytes::new(),
            ))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        held.push(sender);
    }

    let third = get_via(proxy.addr, &up.url("/third")).await;
    assert_refused(&third, 429, "more than 2 connections", "third connection");
    assert_eq!(
        third.header("connection"),
        Some("close"),
        "a refused connection is closed"
    );
    assert_eq!(up.request_count(), 2, "the third request was not forwarded");
    // The proxy's own endpoints still answer that address (a local Prometheus, a health
    // check), on a connection closed after the answer.
    let metrics = get(&format!("http://{}/metrics", proxy.addr)).await;
    assert_eq!(metrics.status, 200, "{}", metrics.text());
    assert!(metrics.text().contains("ferry_egress_client_connections 2"));
    assert_eq!(metrics.header("connection"), Some("close"));

    // Closing one frees its slot.
    drop(held.pop());
    wait_slot_freed(&proxy, &up, "a closed connection").await;
    assert_eq!(up.last().uri, "/after");
}

/// Connects to `proxy` `n` times, sends nothing, and asserts each connection is closed, without
/// an answer, within `within`.
async fn assert_silent_connections_closed(proxy: SocketAddr, n: usize, within: Duration) {
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..n {
        silent.push(TcpStream::connect(proxy).await.unwrap());
    }
    for mut stream in silent {
        let mut got = Vec::new();
        let closed = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut got)).await;
        assert!(closed.is_ok(), "a silent connection was kept open");
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    }
    let took = started.elapsed();
    assert!(took < within, "closed after {took:?}");
}

/// A connection that will only be refused (over the per-client cap, or from a client outside
/// the allowlist) holds a socket, not a slot: it has the header read timeout, not the idle
/// timeout, to send its request, which still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_will_be_refused_get_only_the_header_read_timeout() {
    let up = RecordingUpstream::start().await;
    let mut s = section(&[loopback_rule(&up)]);
    s.max_connections_per_client = 1;
    s.header_read_timeout = ferry::config::Dur(Duration::from_millis(500));
    s.idle_timeout = ferry::config::Dur(Duration::from_secs(60));
    let proxy = TestEgress::start(s.clone(), TestResolver::new(&[])).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut held, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = held
        .send_request(absolute("GET", &up.url("/held"), &[], Bytes::new()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();

    assert_silent_connections_closed(proxy.addr, 5, Duration::from_secs(3)).await;
    let mut late = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        up.url("/late"),
        up.addr
    );
    late.write_all(head.as_bytes()).await.unwrap();
    let resp = read_response(&mut late).await.expect("an answer");
    assert_eq!(resp.status, 429, "{resp:?}");
    assert_eq!(resp.header("connection").as_deref(), Some("close"));

    // Counted (and logged) once: the request, not the silent connections.
    let metrics = http::Request::get("/metrics")
        .header(http::header::HOST, proxy.addr.to_string())
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let resp = held.send_request(metrics).await.unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert_eq!(
        metric_value(
            &text,
            "ferry_egress_rejections_total",
            &[("reason", "connection_limit")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(up.request_count(), 1);

    s.allow_clients = vec!["10.0.0.0/8".into()];
    let outsider = TestEgress::start(s, TestResolver::new(&[])).await;
    assert_silent_connections_closed(outsider.addr, 5, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_credentials_basic_and_bearer_hashed_at_rest() {
    use ferry::gateway::auth::hash_token;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("egress-clients");
    std::fs::write(
        &creds,
        format!(
            "# egress clients\nalice {}\nbearer {}\n",
            hash_token("alice-s3cret"),
            hash_token("tok-0123456789")
        ),
    )
    .unwrap();
    let text = std::fs::read_to_string(&creds).unwrap();
    assert!(!text.contains("alice-s3cret") && !text.contains("tok-0123456789"));
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, hash) = line.split_once(' ').unwrap();
        let hex = hash.strip_prefix("sha256:").expect("only sha256 hashes");
        assert!(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    let up = RecordingUpstream::start().await;
    let mut s = section(&[loopback_rule(&up)]);
    s.auth.credentials_file = Some(creds);
    let proxy = TestEgress::start(s, TestResolver::new(&[])).await;
    let url = up.url("/push");

    let missing = get_via(proxy.addr, &url).await;
    assert_refused(
        &missing,
        407,
        "credentials required",
        "no Proxy-Authorization",
    );
    let challenge = missing.header("proxy-authenticate").unwrap_or_default();
    assert!(
        challenge.contains("Basic") && challenge.contains("Bearer"),
        "{challenge:?}"
    );
    for (what, value) in [
        ("wrong password", basic("alice", "guess")),
        (
            "right password, other user",
            basic("mallory", "alice-s3cret"),
        ),
        ("wrong token", "Bearer tok-wrong".to_owned()),
        ("unknown scheme", "Digest x".to_owned()),
    ] {
        let resp = exchange(
            proxy.addr,
            absolute(
                "GET",
                &url,
                &[("proxy-authorization", &value)],
                Bytes::new(),
            ),
        )
        .await;
        assert_eq!(resp.status, 407, "{what}: {}", resp.text());
        assert!(resp.header("proxy-authenticate").is_some(), "{what}");
    }
    let (resp, _) = connect_raw(proxy.addr, &up.addr.to_string(), &[]).await;
    assert_eq!(resp.status, 407, "CONNECT without credentials: {resp:?}");
    assert_eq!(up.request_count(), 0);

    // Auth schemes are case-insensitive.
    let alice = basic("alice", "alice-s3cret");
    for value in [
        alice.clone(),
        alice.replacen("Basic", "basic", 1),
        alice.replacen("Basic", "BASIC", 1),
        "Bearer tok-0123456789".into(),
        "bearer tok-0123456789".into(),
        "BEARER tok-0123456789".into(),
    ] {
        let resp = exchange(
            proxy.addr,
            absolute(
                "GET",
                &url,
                &[("proxy-authorization", &value)],
                Bytes::new(),
            ),
        )
        .await;
        assert_eq!(resp.status, 200, "{value}: {}", resp.text());
        assert!(
            up.last().header("proxy-authorization").is_none(),
            "the proxy's credentials are not forwarded"
        );
    }
    let (resp, _) = connect_raw(
        proxy.addr,
        &up.addr.to_string(),
        &[("Proxy-Authorization", &basic("alice", "alice-s3cret"))],
    )
    .await;
    assert_eq!(resp.status, 200, "CONNECT with credentials: {resp:?}");
    assert_eq!(up.request_count(), 6);
}

/// An echo server that sends a line on `closed` when a connection of its ends (the proxy closed
/// its side of a tunnel).
async fn echo_server_telling_closes(closed: tokio::sync::mpsc::UnboundedSender<()>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let closed = closed.clone();
            tokio::spawn(async move {
                let (mut rd, mut wr) = sock.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = closed.send(());
            });
        }
    });
    addr
}

/// Deleting a client's line from the credentials file and reloading closes the CONNECT tunnels
/// it opened (they would otherwise relay for as long as the client likes): both ends, within a
/// moment, with an access-log line and a count that say why. A tunnel of a credential the new
/// file still holds goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentials_reload_closes_the_tunnels_of_revoked_credentials() {
    use ferry::gateway::auth::hash_token;
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("egress-clients");
    let line = |name: &str| format!("{name} {}\n", hash_token(&format!("{name}-s3cret")));
    std::fs::write(&creds, line("client-a") + &line("client-b")).unwrap();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    let server = echo_server_telling_closes(closed_tx).await;
    let mut s = section(&[format!("127.0.0.1/32:{}", server.port())]);
    s.auth.credentials_file = Some(creds.clone());
    let proxy = TestEgress::start(s, TestResolver::new(&[])).await;

    let open = |name: &'static str| async move {
        let auth = basic(name, &format!("{name}-s3cret"));
        let (resp, tunnel) = connect_raw(
            proxy.addr,
            &server.to_string(),
            &[("Proxy-Authorization", &auth)],
        )
        .await;
        assert_eq!(resp.status, 200, "{name}: {resp:?}");
        tunnel
    };
    let mut kept = open("client-a").await;
    let mut revoked = open("client-b").await;
    echo(&mut kept, b"before").await;
    echo(&mut revoked, b"before").await;

    std::fs::write(&creds, line("client-a")).unwrap();
    assert_eq!(proxy.egress.reload_credentials().unwrap(), 1);
    let reloaded = Instant::now();

    // The client's side: end of stream (or a reset), not a hang until the idle timeout.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(2), revoked.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "client-b's tunnel still open 2 s after its credential was removed"
    );
    assert!(rest.is_empty(), "{rest:?}");
    // The upstream's side too.
    tokio::time::timeout(Duration::from_secs(2), closed.recv())
        .await
        .expect("the upstream connection of client-b's tunnel closed");
    assert!(reloaded.elapsed() < Duration::from_secs(2));

    echo(&mut kept, b"after the reload").await;
    assert!(
        closed.try_recv().is_err(),
        "client-a's upstream connection is still open"
    );
    let line = logs
        .wait_lines(&["decision=\"revoked\"", "user=client-b"], 1, TIMEOUT)
        .await
        .remove(0);
    assert!(
        line.contains("method=CONNECT")
            && line.contains("status=200")
            && line.contains("bytes_in=6")
            && line.contains("no longer accepts the credential"),
        "{line}"
    );
    assert!(
        logs.lines_with(&["decision=\"revoked\"", "user=client-a"])
            .is_empty(),
        "client-a's tunnel was not closed"
    );
    proxy.assert_rejections("credentials_revoked", 1.0).await;
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_value(&metrics, "ferry_egress_open_tunnels", &[]),
        Some(1.0),
        "{metrics}"
    );
    // And client-b cannot open a new one.
    let (resp, _) = connect_raw(
        proxy.addr,
        &server.to_string(),
        &[("Proxy-Authorization", &basic("client-b", "client-b-s3cret"))],
    )
    .await;
    assert_eq!(resp.status, 407, "{resp:?}");
}

// ---------------------------------------------------------------------------------------------
// Destinations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_are_denied_by_default() {
    let up = RecordingUpstream::start().await;
    let resolver = TestResolver::new(&[("collector.test.example", &["127.0.0.1"])]);
    let proxy = TestEgress::start(section(&[]), resolver.clone()).await;
    for url in [
        up.url("/"),
        format!("http://collector.test.example:{}/", up.port()),
    ] {
        let resp = post_via(proxy.addr, &url, &[], b"{}").await;
        assert_refused(&resp, 403, "is not allowed", &url);
    }
    let (resp, _) = connect_raw(proxy.addr, &up.addr.to_string(), &[]).await;
    assert_eq!(resp.status, 403, "CONNECT with no rule: {resp:?}");

    // A rule for another host does not open this one.
    let proxy = TestEgress::start(
        section(&[format!("other.test.example:{}", up.port())]),
        resolver,
    )
    .await;
    let resp = get_via(
        proxy.addr,
        &format!("http://collector.test.example:{}/", up.port()),
    )
    .await;
    assert_refused(&resp, 403, "destination", "unlisted host");
    up.assert_untouched("default deny");
}

/// Every special-purpose range, and its IPv4-mapped forms, with the reason the proxy gives.
const SPECIAL: [(&str, &str); 13] = [
    ("127.0.0.1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "cgnat"),
    ("169.254.169.254", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("::1", "loopback"),
    ("fd00::1", "unique-local"),
    ("fe80::1", "link-local"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "link-local"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_purpose_addresses_are_refused_unless_a_rule_names_them_by_cidr() {
    let up = RecordingUpstream::start().await;
    let port = up.port();
    let resolver = TestResolver::new(&[]);
    for (i, (addr, _)) in SPECIAL.iter().enumerate() {
        resolver.set(&format!("h{i}.test.example"), &[addr]);
    }

    // A name rule never reaches a special-purpose address, whatever the name.
    let mut s = section(&[format!("*.test.example:{port}")]);
    s.connect_timeout = ferry::config::Dur(Duration::from_millis(300));
    let proxy = TestEgress::start(s, resolver.clone()).await;
    for (i, (addr, why)) in SPECIAL.iter().enumerate() {
        let url = format!("http://h{i}.test.example:{port}/");
        let resp = get_via(proxy.addr, &url).await;
        assert_refused(
            &resp,
            403,
            &format!("resolves to a {why} address"),
            &format!("{url} -> {addr}"),
        );
    }
    up.assert_untouched("name rule, special-purpose answers");

    // Named by CIDR, each is let through: the loopback ones reach the upstream, the others get
    // as far as a connection attempt (502), not a policy refusal.
    let cidr_rules: Vec<String> = SPECIAL
        .iter()
        .map(|(addr, _)| {
            if addr.contains(':') {
                format!("[{addr}/128]:{port}")
            } else {
                format!("{addr}/32:{port}")
            }
        })
        .collect();
    let mut s = section(&cidr_rules);
    s.connect_timeout = ferry::config::Dur(Duration::from_millis(300));
    let proxy = TestEgress::start(s, resolver).await;
    let paddr = proxy.addr;
    let answers = futures_util::future::join_all(SPECIAL.iter().enumerate().map(|(i, _)| {
        let url = format!("http://h{i}.test.example:{port}/cidr{i}");
        async move { (url.clone(), get_via(paddr, &url).await) }
    }))
    .await;
    for ((url, resp), (addr, _)) in answers.iter().zip(SPECIAL) {
        let reason = resp.header("ferry-refusal").unwrap_or_default();
        assert!(
            resp.status != 403 && !reason.contains("resolves to"),
            "{url} -> {addr} is named by a CIDR rule, yet: {} {reason:?}",
            resp.status
        );
        if addr == "127.0.0.1" || addr == "::ffff:127.0.0.1" {
            assert_eq!(resp.status, 200, "{url} -> {addr}: {reason}");
        } else if addr != "0.0.0.0" {
            // 0.0.0.0 means "this host" to connect(2) and may reach the upstream: either is fine.
            assert!(
                resp.status == 502 || resp.status == 504,
                "{url} -> {addr}: {}",
                resp.status
            );
        }
    }
    let mut seen: Vec<String> = up.requests().into_iter().map(|r| r.uri).collect();
    seen.sort();
    seen.retain(|u| u != "/cidr6"); // 0.0.0.0, see above
    assert_eq!(seen, ["/cidr0", "/cidr11"]);
}

/// A name rule first and a CIDR rule naming the loopback address the name resolves to after it:
/// the CIDR rule takes the request, as it would if it came first (the name rule, which would
/// speak TLS, never reaches loopback). A request the CIDR rule does not take (outside its path)
/// is still refused for the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cidr_rule_after_a_name_rule_takes_the_special_address_the_name_resolves_to() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let up = RecordingUpstream::start().await;
    let port = up.port();
    let yaml = format!(
        "rules:\n  - name: name-rule\n    upstream: \"collector.test:{port}\"\n    tls_upgrade: {{ca_file: \"{}\"}}\n  - name: full-chain\n    upstream: \"127.0.0.0/8:{port}\"\n    path_prefix: /ok\n",
        pki.ca_file.display()
    );
    let resolver = TestResolver::new(&[("collector.test", &["127.0.0.1"])]);
    let proxy = TestEgress::start(yaml_section(&yaml), resolver).await;
    let resp = get_via(proxy.addr, &format!("http://collector.test:{port}/ok")).await;
    assert_eq!(resp.status, 200, "{:?}", resp.header("ferry-refusal"));
    assert_eq!(resp.text(), UPSTREAM_BODY);
    assert_eq!(up.last().uri, "/ok");
    let text = proxy.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "ferry_egress_requests_total",
            &[("rule", "full-chain"), ("decision", "allowed")]
        ),
        Some(1.0),
        "{text}"
    );

    let resp = get_via(
        proxy.addr,
        &format!("http://collector.test:{port}/elsewhere"),
    )
    .await;
    assert_refused(
        &resp,
        403,
        "collector.test resolves to a loopback address",
        "outside the CIDR rule's path",
    );
    assert_eq!(up.request_count(), 1);
}

/// Spellings of 127.0.0.1 that resolvers and tools accept.
const LOOPBACK_SPELLINGS: [&str; 7] = [
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "127.1",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "127.0.0.1",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_literal_spellings_match_only_cidr_rules() {
    let up = RecordingUpstream::start().await;
    let port = up.port();
    // Name rules only (and names that exist): no spelling of loopback may pass.
    let resolver = TestResolver::new(&[("localhost", &["127.0.0.1"])]);
    let proxy = TestEgress::start(
        section(&[
            format!("*.test.example:{port}"),
            format!("localhost:{port}"),
        ]),
        resolver.clone(),
    )
    .await;
    for host in LOOPBACK_SPELLINGS {
        let url = format!("http://{host}:{port}/spelled");
        let resp = get_via(proxy.addr, &url).await;
        assert_refused(&resp, 403, "not allowed", &url);
        let (resp, _) = connect_raw(proxy.addr, &format!("{host}:{port}"), &[]).await;
        assert_eq!(resp.status, 403, "CONNECT {host}:{port}: {resp:?}");
    }
    up.assert_untouched("loopback spellings against name rules");

    // A CIDR rule naming 127.0.0.1 matches every spelling, and the upstream gets each request.
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), resolver).await;
    for (i, host) in LOOPBACK_SPELLINGS.iter().enumerate() {
        let url = format!("http://{host}:{port}/spelled{i}");
        let resp = get_via(proxy.addr, &url).await;
        assert_eq!(resp.status, 200, "{url}: {}", resp.text());
        assert_eq!(up.last().uri, format!("/spelled{i}"));
        // The upstream is told the address in its usual spelling, the one that was checked.
        let host_header = up.last().headers.get("host").cloned();
        assert_eq!(
            host_header.as_ref().and_then(|h| h.to_str().ok()),
            Some(format!("127.0.0.1:{port}").as_str()),
            "{url}"
        );
    }
    assert_eq!(up.request_count(), LOOPBACK_SPELLINGS.len());

    // IPv6 addresses that merely embed 127.0.0.1 (6to4, NAT64, v4-compatible) are other
    // destinations: the IPv4 rule does not allow them.
    for host in ["[2002:7f00:1:abcd::99]", "[64:ff9b::7f00:1]", "[::7f00:1]"] {
        let url = format!("http://{host}:{port}/embedded");
        let resp = get_via(proxy.addr, &url).await;
        assert_refused(&resp, 403, "not allowed", &url);
        let (resp, _) = connect_raw(proxy.addr, &format!("{host}:{port}"), &[]).await;
        assert_eq!(resp.status, 403, "CONNECT {host}:{port}: {resp:?}");
    }
    assert_eq!(up.request_count(), LOOPBACK_SPELLINGS.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_a_forbidden_address_is_refused_before_any_connection() {
    let up = RecordingUpstream::start().await;
    let port = up.port();
    let resolver = TestResolver::new(&[
        ("evil.test.example", &["127.0.0.1"]),
        ("metadata.test.example", &["169.254.169.254"]),
        ("mixed.test.example", &["10.0.0.1", "127.0.0.1"]),
    ]);
    let proxy = TestEgress::start(section(&[format!("*.test.example:{port}")]), resolver).await;
    for (name, why) in [
        ("evil", "loopback"),
        ("metadata", "link-local"),
        ("mixed", "private"),
    ] {
        let url = format!("http://{name}.test.example:{port}/latest/meta-data");
        let resp = post_via(proxy.addr, &url, &[], b"x").await;
        assert_refused(&resp, 403, &format!("resolves to a {why} address"), &url);
        let (resp, _) = connect_raw(proxy.addr, &format!("{name}.test.example:{port}"), &[]).await;
        assert_eq!(resp.status, 403, "CONNECT {name}: {resp:?}");
    }
    let resp = get_via(proxy.addr, &format!("http://nxdomain.test.example:{port}/")).await;
    assert_eq!(
        resp.status,
        502,
        "a name that does not resolve: {}",
        resp.text()
    );
    up.assert_untouched("names resolving to special-purpose addresses");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_connects_only_to_an_address_it_checked() {
    // The upstream on 127.0.0.1:P, a decoy on 127.0.0.2:P; the rule allows only 127.0.0.1.
    let (up, decoy) = upstream_and_decoy("127.0.0.2").await;
    let port = up.port();
    let resolver = TestResolver::new(&[(
        "multi.test.example",
        &["10.0.0.1", "127.0.0.2", "127.0.0.1"],
    )]);
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), resolver.clone()).await;
    let started = Instant::now();
    let resp = get_via(
        proxy.addr,
        &format!("http://multi.test.example:{port}/checked"),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no attempt on an unchecked address"
    );
    assert_eq!(up.last().uri, "/checked");
    let mut tunnel = open_tunnel(proxy.addr, &format!("multi.test.example:{port}")).await;
    tunnel
        .write_all(b"GET /tunnelled HTTP/1.1\r\nHost: multi.test.example\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut tunnel).await.expect("answer via tunnel");
    assert_eq!(resp.status, 200);
    assert_eq!(up.last().uri, "/tunnelled");
    decoy.assert_untouched("an address the rule does not allow");

    // A DNS answer that changes between lookups cannot steer the connection elsewhere.
    resolver.set_sequence(
        "flip.test.example",
        &[&["127.0.0.1"], &["127.0.0.2"], &["127.0.0.2"]],
    );
    let before = up.request_count();
    let resp = get_via(proxy.addr, &format!("http://flip.test.example:{port}/flip")).await;
    match resp.status {
        200 => assert_eq!(up.last().uri, "/flip"),
        403 => assert_eq!(up.request_count(), before),
        other => panic!("rebinding answer: {other} {}", resp.text()),
    }
    resolver.set_sequence("flop.test.example", &[&["127.0.0.1"], &["127.0.0.2"]]);
    let (resp, _) = connect_raw(proxy.addr, &format!("flop.test.example:{port}"), &[]).await;
    assert!(resp.status == 200 || resp.status == 403, "{resp:?}");
    decoy.assert_untouched("a rebound DNS answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_follow_the_same_rules() {
    let up = RecordingUpstream::start().await;
    let port = up.port();
    let resolver = TestResolver::new(&[("collector.test.example", &["127.0.0.1"])]);
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), resolver).await;

    // Allowed: the tunnel relays bytes both ways, by address and by name.
    for authority in [
        format!("127.0.0.1:{port}"),
        format!("collector.test.example:{port}"),
    ] {
        let tunnel = open_tunnel(proxy.addr, &authority).await;
        let req = http::Request::get("/through-tunnel")
            .header("host", authority.as_str())
            .body(http_body_util::Full::new(Bytes::from_static(b"")))
            .unwrap();
        let resp = send_on(tunnel, req).await.expect("request through tunnel");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), UPSTREAM_BODY);
        assert_eq!(up.last().uri, "/through-tunnel");
    }
    assert_eq!(up.request_count(), 2);

    // Refused: port not in the rule, an address not in it, no port at all.
    for authority in [
        format!("127.0.0.1:{}", port.wrapping_add(1).max(1)),
        format!("127.0.0.2:{port}"),
        "127.0.0.1".to_owned(),
    ] {
        let (resp, _) = connect_raw(proxy.addr, &authority, &[]).await;
        assert!(
            resp.status == 403 || resp.status == 400,
            "CONNECT {authority}: {resp:?}"
        );
        assert!(
            resp.header("ferry-refusal").is_some(),
            "CONNECT {authority}: {resp:?}"
        );
    }
    assert_eq!(up.request_count(), 2);
    assert_eq!(up.connections(), 2, "refused tunnels never connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_methods_and_paths_outside_the_rule_are_refused() {
    let up = RecordingUpstream::start().await;
    let port = up.port();
    let other_port = if port == 65535 { port - 1 } else { port + 1 };
    let proxy = TestEgress::start(
        yaml_section(&format!(
            "rules:\n  - name: push\n    upstream: \"127.0.0.1/32:{port}\"\n    methods: [post, PUT]\n    path_prefix: /api/\n"
        )),
        TestResolver::new(&[]),
    )
    .await;
    let resp = get_via(proxy.addr, &up.url("/api/v1/push")).await;
    assert_refused(
        &resp,
        405,
        "method GET is not allowed by rule \"push\"",
        "GET",
    );
    assert_eq!(
        resp.header("allow"),
        Some("POST, PUT"),
        "405 says what is allowed"
    );
    let resp = post_via(
        proxy.addr,
        &format!("http://127.0.0.1:{other_port}/api/v1/push"),
        &[],
        b"x",
    )
    .await;
    assert_refused(&resp, 403, "is not allowed", "other port");
    let resp = post_via(proxy.addr, &up.url("/admin"), &[], b"x").await;
    assert_refused(
        &resp,
        403,
        &format!(
            "destination POST {}/admin is not allowed: rule \"push\" allows it only under /api/",
            up.addr
        ),
        "path outside the prefix",
    );
    up.assert_untouched("port, method, path");

    let resp = post_via(proxy.addr, &up.url("/api/v1/push"), &[], b"x").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = exchange(
        proxy.addr,
        absolute("PUT", &up.url("/api/v1/put"), &[], "y"),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(up.request_count(), 2);
}

/// A DNS query is traffic whose name the client picks (`secret-payload.exfil.example` carries
/// data to whoever serves that zone): the proxy looks a name up only when a CIDR rule takes the
/// request on port, method and path, and gives a resolver no longer than `connect_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_looked_up_only_when_a_cidr_rule_could_take_the_request() {
    let up = RecordingUpstream::start().await;
    let port = up.port();
    let checked_port = if port == 65535 { port - 1 } else { port + 1 };
    let exfil = "secret-payload.exfil.test.example";
    let resolver = TestResolver::new(&[
        (exfil, &["127.0.0.1"]),
        ("collector.test.example", &["127.0.0.1"]),
    ]);
    resolver.stall("slow.test.example");
    let mut s = yaml_section(&format!(
        "rules:\n  - name: push\n    upstream: \"127.0.0.1/32:{port}\"\n    methods: [POST]\n    path_prefix: /api/\n  - name: checked\n    upstream: \"127.0.0.1/32:{checked_port}\"\n    validate: {{json: true}}\n"
    ));
    s.connect_timeout = ferry::config::Dur(Duration::from_millis(300));
    let proxy = TestEgress::start(s, resolver.clone()).await;

    for (method, url) in [
        ("POST", format!("http://{exfil}:1/api/x")),
        ("GET", format!("http://{exfil}:{port}/api/x")),
        ("POST", format!("http://{exfil}:{port}/admin")),
    ] {
        let resp = exchange(proxy.addr, absolute(method, &url, &[], "x")).await;
        assert_refused(&resp, 403, "is not allowed", &format!("{method} {url}"));
    }
    // A CONNECT: to a port no rule names, and to a rule that reads payloads (no tunnel ever).
    for authority in [format!("{exfil}:1"), format!("{exfil}:{checked_port}")] {
        let (resp, _) = connect_raw(proxy.addr, &authority, &[]).await;
        assert_eq!(resp.status, 403, "CONNECT {authority}: {resp:?}");
    }
    assert_eq!(
        resolver.calls(exfil),
        0,
        "a request no rule allows made a DNS lookup"
    );
    up.assert_untouched("refused without a lookup");

    let resp = post_via(
        proxy.addr,
        &format!("http://collector.test.example:{port}/api/x"),
        &[],
        b"x",
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resolver.calls("collector.test.example") >= 1);

    let started = Instant::now();
    let resp = post_via(
        proxy.addr,
        &format!("http://slow.test.example:{port}/api/x"),
        &[],
        b"x",
    )
    .await;
    assert_refused(
        &resp,
        502,
        "cannot resolve slow.test.example: no answer within 300ms",
        "a resolver that does not answer",
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(up.request_count(), 1);
}

/// When no rule allows a request, the refusal names the closest miss: the path, when a rule
/// allows the method but not under that path (not the method of a CONNECT-only rule for the
/// same destination); the method, when only the method is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_names_the_closest_rules_real_mismatch() {
    let up = RecordingUpstream::start().await;
    let port = up.port();
    let proxy = TestEgress::start(
        yaml_section(&format!(
            "rules:\n  - name: connect-tls\n    upstream: \"127.0.0.1/32:{port}\"\n    methods: [CONNECT]\n  - name: remote-write\n    upstream: \"127.0.0.1/32:{port}\"\n    methods: [POST]\n    path_prefix: /api/v1/write\n"
        )),
        TestResolver::new(&[]),
    )
    .await;
    let resp = post_via(proxy.addr, &up.url("/api/v2/write"), &[], b"x").await;
    assert_refused(
        &resp,
        403,
        &format!("destination POST {}/api/v2/write is not allowed: rule \"remote-write\" allows it only under /api/v1/write; rule \"connect-tls\" allows only CONNECT", up.addr),
        "POST outside the path prefix",
    );
    let resp = get_via(proxy.addr, &up.url("/api/v1/write")).await;
    assert_refused(
        &resp,
        405,
        "method GET is not allowed by rule \"connect-tls\"",
        "GET under the prefix",
    );
    assert_eq!(resp.header("allow"), Some("CONNECT, POST"));
    up.assert_untouched("refused");
    let resp = post_via(proxy.addr, &up.url("/api/v1/write"), &[], b"x").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_passed_back_not_followed() {
    let target = RecordingUpstream::start().await;
    let up = RecordingUpstream::start_with(Reply::Redirect(target.url("/elsewhere"))).await;
    let proxy = TestEgress::start(
        section(&[loopback_rule(&up), loopback_rule(&target)]),
        TestResolver::new(&[]),
    )
    .await;
    let resp = post_via(proxy.addr, &up.url("/push"), &[], b"payload").await;
    assert_eq!(resp.status, 302);
    assert_eq!(
        resp.header("location"),
        Some(target.url("/elsewhere").as_str())
    );
    assert_eq!(up.request_count(), 1);
    target.assert_untouched("the redirect target");
}

// ---------------------------------------------------------------------------------------------
// Payload validation

const JSON_PAYLOAD: &[u8] =
    br#"{"agentKey":"abc","payload":{"os":"linux","loadAvrg":0.42,"memPhysUsed":1234}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_payload_arrives_byte_identical() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(
        &up,
        "{json: true, content_types: [application/json], max_body_bytes: 4096}",
    )
    .await;
    let ct = "application/json; charset=utf-8";
    let resp = post_via(
        proxy.addr,
        &up.url("/postback/"),
        &[("content-type", ct), ("x-agent", "sd")],
        JSON_PAYLOAD,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_arrived_identical(&up, JSON_PAYLOAD, Some(ct));
    assert_eq!(up.last().header("x-agent"), Some("sd"));
    assert_eq!(up.last().uri, "/postback/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_uploading_a_refused_body_reads_the_refusal() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, "{max_body_bytes: 1024}").await;
    let size = 16 << 20;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {size}\r\n\r\n",
        up.url("/"),
        up.addr
    );
    // The client sends its whole body before it reads anything, as many uploaders do.
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'z'; 64 << 10];
        for _ in 0..(size / chunk.len()) {
            wr.write_all(&chunk).await?;
        }
        wr.flush().await
    });
    let sent = tokio::time::timeout(Duration::from_secs(20), writer)
        .await
        .expect("upload finished")
        .unwrap();
    assert!(
        sent.is_ok(),
        "the proxy reset the upload instead of draining it: {sent:?}"
    );
    let mut got = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut got))
        .await
        .expect("a response")
        .unwrap();
    let text = String::from_utf8_lossy(&got[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
    up.assert_untouched("a 16 MiB upload over a 1 KiB limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_refused_whole_with_or_without_content_length() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, "{max_body_bytes: 1024}").await;
    let resp = post_via(proxy.addr, &up.url("/"), &[], &[b'a'; 4096]).await;
    assert_refused(
        &resp,
        413,
        "exceeds the limit of 1024 bytes",
        "Content-Length 4096",
    );
    let req = http::Request::post(up.url("/"))
        .header("host", up.addr.to_string())
        .body(chunked(vec![vec![b'b'; 1000]; 4]))
        .unwrap();
    let resp = exchange(proxy.addr, req).await;
    assert_refused(
        &resp,
        413,
        "exceeds the limit of 1024 bytes",
        "chunked 4000",
    );
    up.assert_untouched("too large");

    // Exactly at the limit passes, chunked too, and arrives intact.
    let resp = post_via(proxy.addr, &up.url("/"), &[], &[b'c'; 1024]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_arrived_identical(&up, &[b'c'; 1024], None);
    let req = http::Request::post(up.url("/"))
        .header("host", up.addr.to_string())
        .body(chunked(vec![vec![b'd'; 512]; 2]))
        .unwrap();
    let resp = exchange(proxy.addr, req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(up.last().body.as_ref(), &[b'd'; 1024]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_type_not_listed_is_415() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, "{content_types: [application/json]}").await;
    let resp = post_via(
        proxy.addr,
        &up.url("/"),
        &[("content-type", "text/plain")],
        b"{}",
    )
    .await;
    assert_refused(&resp, 415, "content type text/plain", "text/plain");
    let resp = post_via(proxy.addr, &up.url("/"), &[], b"{}").await;
    assert_refused(&resp, 415, "content type none", "no Content-Type");
    up.assert_untouched("wrong content type");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_422() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, "{json: true}").await;
    for body in [
        &b"{\"agentKey\": \"abc\", "[..],
        b"not json",
        b"",
        b"{} trailing",
    ] {
        let resp = post_via(
            proxy.addr,
            &up.url("/"),
            &[("content-type", "application/json")],
            body,
        )
        .await;
        assert_refused(
            &resp,
            422,
            "body is not valid JSON",
            &String::from_utf8_lossy(body),
        );
        assert!(
            !resp.text().contains("agentKey"),
            "no payload in the reason"
        );
    }
    up.assert_untouched("malformed JSON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_schema_violation_is_422() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("postback.schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "required": ["agentKey", "payload"],
            "properties": {"agentKey": {"type": "string"}, "payload": {"type": "object"}}}"#,
    )
    .unwrap();
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(
        &up,
        &format!("{{json_schema_file: \"{}\"}}", schema.display()),
    )
    .await;
    for body in [
        &br#"{"agentKey": 5, "payload": {}}"#[..],
        br#"{"payload": {}}"#,
        br#"[1, 2]"#,
    ] {
        let resp = post_via(proxy.addr, &up.url("/"), &[], body).await;
        assert_refused(
            &resp,
            422,
            "does not match the JSON schema",
            &String::from_utf8_lossy(body),
        );
    }
    up.assert_untouched("schema violations");
    let resp = post_via(proxy.addr, &up.url("/"), &[], JSON_PAYLOAD).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_arrived_identical(&up, JSON_PAYLOAD, None);
}

/// `serde_json` keeps the last of a repeated key, other parsers the first: a schema would check
/// one value while the upstream acts on the other. A key twice in one object is refused, and
/// named, by `json` and schema rules alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_twice_in_one_object_is_422() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("level.schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"level": {"enum": ["info", "warn"]}}}"#,
    )
    .unwrap();
    let schema_rule = format!("{{json_schema_file: \"{}\"}}", schema.display());
    for validate in ["{json: true}", schema_rule.as_str()] {
        let up = RecordingUpstream::start().await;
        let proxy = validating_proxy(&up, validate).await;
        for body in [
            &br#"{"level": "evil", "level": "info"}"#[..],
            br#"{"lev\u0065l": "evil", "level": "info"}"#,
            br#"{"n": 1, "items": [{"level": "info", "x": 1, "level": "evil"}]}"#,
        ] {
            let resp = post_via(proxy.addr, &up.url("/"), &[], body).await;
            assert_refused(
                &resp,
                422,
                "body has the key \"level\" twice in one object",
                &format!("{validate}: {}", String::from_utf8_lossy(body)),
            );
        }
        up.assert_untouched("repeated keys");
        let body = br#"{"level": "info", "items": [{"level": "warn"}]}"#;
        let resp = post_via(proxy.addr, &up.url("/"), &[], body).await;
        assert_eq!(resp.status, 200, "{validate}: {}", resp.text());
        assert_arrived_identical(&up, body, None);
    }
}

/// The process's peak resident memory so far (`VmHWM`), in bytes; `None` off Linux.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A schema is run against the body's parsed tree, which takes 16 to 32 times the text for
/// `[0,0,…]` — a text that gzip shrinks a thousandfold. The tree is built within
/// `max_json_tree_bytes`: past it the body is refused, before the tree is (nearly) complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_rule_refuses_a_json_bomb_within_its_tree_limit() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("object.schema.json");
    std::fs::write(&schema, r#"{"type": "object"}"#).unwrap();
    // 8 MB decoded, well under max_decoded_bytes (64 MiB): 4 million values, 128 MB of tree.
    let mut doc = b"[".to_vec();
    doc.extend(b"0,".repeat(4 << 20));
    doc.extend(b"0]");
    let bomb = gzip(&doc);
    assert!(bomb.len() < 64 << 10, "bomb is {} bytes", bomb.len());
    drop(doc);
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(
        &up,
        &format!(
            "{{json_schema_file: \"{}\", max_json_tree_bytes: 4194304}}",
            schema.display()
        ),
    )
    .await;
    let headers = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    // A small document passes (and warms up everything that is allocated once).
    let resp = post_via(
        proxy.addr,
        &up.url("/"),
        &headers,
        &gzip(b"{\"a\": [1, 2]}"),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let before = peak_rss();
    let resp = post_via(proxy.addr, &up.url("/"), &headers, &bomb).await;
    assert_refused(
        &resp,
        413,
        "JSON tree for the schema check would exceed the limit of 4194304 bytes (max_json_tree_bytes)",
        "JSON bomb",
    );
    assert_eq!(up.request_count(), 1, "the bomb never went upstream");
    if let (Some(before), Some(after)) = (before, peak_rss()) {
        // The decoded text (8 MB) and the tree up to its limit (4 MiB), not 128 MB of tree.
        let grew = after.saturating_sub(before);
        assert!(grew < 40 << 20, "peak memory grew by {} MB", grew >> 20);
    }
    proxy.assert_rejections("json_tree_too_large", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_md5_is_verified() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, "{require_content_md5: true}").await;
    let resp = post_via(proxy.addr, &up.url("/"), &[], JSON_PAYLOAD).await;
    assert_refused(&resp, 422, "content-md5 is missing", "no Content-MD5");
    let resp = post_via(
        proxy.addr,
        &up.url("/"),
        &[("content-md5", &md5_b64(b"something else"))],
        JSON_PAYLOAD,
    )
    .await;
    assert_refused(&resp, 422, "does not match", "Content-MD5 mismatch");
    let resp = post_via(
        proxy.addr,
        &up.url("/"),
        &[("content-md5", "***")],
        JSON_PAYLOAD,
    )
    .await;
    assert_refused(&resp, 422, "not base64", "Content-MD5 garbage");
    // The right digest, in hex (what md5sum prints): a common mistake, said as such.
    let hex_md5 = {
        use md5::Digest as _;
        hex::encode(md5::Md5::digest(JSON_PAYLOAD))
    };
    let resp = post_via(
        proxy.addr,
        &up.url("/"),
        &[("content-md5", &hex_md5)],
        JSON_PAYLOAD,
    )
    .await;
    assert_refused(
        &resp,
        422,
        "Content-MD5 must be the base64 of the MD5 digest (this looks like hex)",
        "Content-MD5 in hex",
    );
    up.assert_untouched("Content-MD5");

    let good = md5_b64(JSON_PAYLOAD);
    let resp = post_via(
        proxy.addr,
        &up.url("/"),
        &[("content-md5", &good)],
        JSON_PAYLOAD,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_arrived_identical(&up, JSON_PAYLOAD, None);
    assert_eq!(up.last().header("content-md5"), Some(good.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_required_header_is_422() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, "{required_headers: [X-Agent-Key]}").await;
    let resp = post_via(proxy.addr, &up.url("/"), &[], JSON_PAYLOAD).await;
    assert_refused(&resp, 422, "x-agent-key", "missing header");
    up.assert_untouched("missing required header");
    let resp = post_via(
        proxy.addr,
        &up.url("/"),
        &[("x-agent-key", "k1")],
        JSON_PAYLOAD,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(up.last().header("x-agent-key"), Some("k1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_patterns_see_the_body_from_its_first_byte() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, r#"{deny_patterns: ["^-----BEGIN", "(?i)password="]}"#).await;
    for body in [
        &b"-----BEGIN OPENSSH PRIVATE KEY-----\nhunter2"[..],
        b"password=hunter2&x=1",
        b"x=1&PASSWORD=hunter2",
    ] {
        let resp = post_via(proxy.addr, &up.url("/"), &[], body).await;
        assert_refused(
            &resp,
            403,
            "matches deny pattern",
            &String::from_utf8_lossy(body),
        );
        assert!(!resp.text().contains("hunter2"), "no payload in the reason");
    }
    up.assert_untouched("deny patterns");
    let body = b"x=1&user=alice -----BEGIN later is fine";
    let resp = post_via(proxy.addr, &up.url("/"), &[], body).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_arrived_identical(&up, body, None);
}

/// A JSON escape (`\u002d`, `\/`) spells the text a pattern refuses differently, and the
/// upstream's parser reads it decoded: in a JSON body (by the rule's `json` check or by the
/// client's Content-Type) the patterns read every string, key or value, decoded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_patterns_see_json_strings_decoded() {
    let up = RecordingUpstream::start().await;
    let patterns = r#"deny_patterns: ["-----BEGIN [A-Z ]*PRIVATE KEY-----", "/etc/shadow"]"#;
    let plain = validating_proxy(&up, &format!("{{{patterns}}}")).await;
    let json_rule = validating_proxy(&up, &format!("{{json: true, {patterns}}}")).await;
    let json = ("content-type", "application/json; charset=utf-8");
    let key = br#"{"k": "\u002d----BEGIN RSA PRIVATE KEY-----\nMIIE"}"#;
    let slash = br#"{"path": "\/etc\/shadow"}"#;
    let in_key = br#"{"\/etc\/shadow": 1}"#;
    for (proxy, headers, body) in [
        (&plain, &[json][..], &key[..]),
        (&plain, &[json], slash),
        (
            &plain,
            &[("content-type", "application/vnd.api+json")],
            in_key,
        ),
        (&json_rule, &[], key),
        (&json_rule, &[], in_key),
    ] {
        let what = String::from_utf8_lossy(body);
        let resp = post_via(proxy.addr, &up.url("/"), headers, body).await;
        assert_refused(&resp, 403, "matches deny pattern", &what);
    }
    up.assert_untouched("escaped JSON");
    // Escapes that decode to nothing refused pass as sent; a body that is not JSON is read as text.
    let harmless = br#"{"msg": "line\nbreak \u00e9 a\/b"}"#;
    let resp = post_via(plain.addr, &up.url("/"), &[json], harmless).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_arrived_identical(&up, harmless, Some(json.1));
    let text = br#"path=\/etc\/shadow"#;
    let resp = post_via(
        plain.addr,
        &up.url("/"),
        &[("content-type", "text/plain")],
        text,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_are_validated_decoded_and_forwarded_as_sent() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(
        &up,
        r#"{json: true, content_types: [application/json], deny_patterns: ["SECRET-TOKEN"]}"#,
    )
    .await;
    let gz_headers = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    for (what, body, status, needle) in [
        (
            "gzip of malformed JSON",
            gzip(b"{\"payload\": "),
            422,
            "not valid JSON",
        ),
        (
            "gzip hiding a deny pattern",
            gzip(b"{\"k\": \"SECRET-TOKEN\"}"),
            403,
            "deny pattern",
        ),
        (
            "truncated gzip",
            gzip(JSON_PAYLOAD)[..20].to_vec(),
            422,
            "not valid gzip",
        ),
        (
            "plain JSON labelled gzip",
            JSON_PAYLOAD.to_vec(),
            422,
            "not valid gzip",
        ),
        (
            "gzip with data after its end",
            [&gzip(JSON_PAYLOAD)[..], b"trailing"].concat(),
            422,
            "body is not valid gzip: data after the end of the gzip stream",
        ),
        (
            "gzip with the deny pattern in its file name",
            gzip_named("SECRET-TOKEN", JSON_PAYLOAD),
            403,
            "deny pattern",
        ),
    ] {
        let resp = post_via(proxy.addr, &up.url("/"), &gz_headers, &body).await;
        assert_refused(&resp, status, needle, what);
    }
    let deflate_headers = [
        ("content-type", "application/json"),
        ("content-encoding", "deflate"),
    ];
    let after_the_end = [&deflate(b"{\"a\":1}")[..], b"SECRET-TOKEN"].concat();
    let resp = post_via(proxy.addr, &up.url("/"), &deflate_headers, &after_the_end).await;
    assert_refused(
        &resp,
        422,
        "data after the end of the stream",
        "deflate with data after its end",
    );
    let resp = post_via(
        proxy.addr,
        &up.url("/"),
        &[
            ("content-type", "application/json"),
            ("content-encoding", "br"),
        ],
        JSON_PAYLOAD,
    )
    .await;
    assert_refused(&resp, 415, "content encoding br", "brotli");
    up.assert_untouched("invalid compressed payloads");

    let gz = gzip(JSON_PAYLOAD);
    let resp = post_via(proxy.addr, &up.url("/"), &gz_headers, &gz).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_arrived_identical(&up, &gz, Some("application/json"));
    assert_eq!(
        up.last().header("content-encoding"),
        Some("gzip"),
        "still gzip-encoded"
    );

    let deflated = deflate(JSON_PAYLOAD);
    let resp = post_via(proxy.addr, &up.url("/"), &deflate_headers, &deflated).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_arrived_identical(&up, &deflated, Some("application/json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_is_refused_at_the_decoded_limit_quickly() {
    let bomb = gzip(&vec![0u8; 10 << 20]);
    assert!(bomb.len() < 100 << 10, "bomb is {} bytes", bomb.len());
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, "{json: true, max_decoded_bytes: 1048576}").await;
    let started = Instant::now();
    let resp = post_via(
        proxy.addr,
        &up.url("/"),
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        &bomb,
    )
    .await;
    let took = started.elapsed();
    assert_refused(
        &resp,
        413,
        "decoded body exceeds the limit of 1048576 bytes",
        "gzip bomb",
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    up.assert_untouched("gzip bomb");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_validating_rule_is_refused() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, "{json: true}").await;
    let (resp, _) = connect_raw(proxy.addr, &up.addr.to_string(), &[]).await;
    assert_eq!(resp.status, 403, "{resp:?}");
    let reason = resp.header("ferry-refusal").unwrap_or_default();
    assert!(reason.contains("(it checks payloads)"), "{reason:?}");
    up.assert_untouched("CONNECT to a validating rule");
}

/// Prometheus given an `https://` remote_write URL sends CONNECT. A rule that takes that
/// destination only as plain-HTTP requests (payload checks, a path prefix, methods) says so, and
/// what to send instead; a destination no rule names at all is refused plainly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_a_plain_http_rule_says_what_to_send_instead() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let up = RecordingUpstream::start().await;
    let port = up.port();
    let yaml = format!(
        "rules:\n  - name: remote-write\n    upstream: \"127.0.0.1/32:{port}\"\n    methods: [POST]\n    path_prefix: /api/v1/write\n    validate: {{json: true}}\n    tls_upgrade: {{ca_file: \"{}\"}}\n  - name: push\n    upstream: \"push.test.example:{port}\"\n    methods: [POST, PUT]\n",
        pki.ca_file.display()
    );
    let resolver = TestResolver::new(&[
        ("push.test.example", &["203.0.113.5"]),
        ("other.test.example", &["127.0.0.1"]),
    ]);
    let proxy = TestEgress::start(yaml_section(&yaml), resolver.clone()).await;
    for (authority, expected) in [
        (
            format!("127.0.0.1:{port}"),
            format!("destination CONNECT 127.0.0.1:{port} is not allowed: rule \"remote-write\" allows this destination only as plain-HTTP requests (it checks payloads); send http://127.0.0.1:{port}/... to the proxy (its tls_upgrade makes it HTTPS)"),
        ),
        (
            format!("push.test.example:{port}"),
            format!("destination CONNECT push.test.example:{port} is not allowed: rule \"push\" allows this destination only as plain-HTTP requests (it allows only POST, PUT); send http://push.test.example:{port}/... to the proxy"),
        ),
        // Only a CIDR rule that reads the requests may cover it: the name is not looked up for a
        // tunnel that rule would refuse anyway, and the refusal says what to send if it does.
        (
            format!("other.test.example:{port}"),
            format!("destination CONNECT other.test.example:{port} is not allowed: no rule allows a tunnel there; if other.test.example is in rule \"remote-write\"'s network, that rule upgrades plain HTTP to HTTPS itself: send http://other.test.example:{port}/... to the proxy, not a tunnel"),
        ),
        (
            format!("other.test.example:{}", port ^ 1),
            format!("destination CONNECT other.test.example:{} is not allowed", port ^ 1),
        ),
    ] {
        let (resp, _) = connect_raw(proxy.addr, &authority, &[]).await;
        assert_eq!(resp.status, 403, "CONNECT {authority}: {resp:?}");
        assert_eq!(
            resp.header("ferry-refusal").as_deref(),
            Some(expected.as_str()),
            "CONNECT {authority}"
        );
    }
    up.assert_untouched("CONNECT to plain-HTTP rules");
    assert_eq!(resolver.calls("other.test.example"), 0);
}

// ---------------------------------------------------------------------------------------------
// TLS upgrade

struct Pki {
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

/// A test CA, a server certificate for `localhost` it signed, and an unrelated CA.
fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let new_ca = || {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let ca = new_ca();
    let other = new_ca();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let other_ca_file = dir.join("other-ca.pem");
    std::fs::write(&other_ca_file, other.pem()).unwrap();
    Pki {
        ca_file,
        other_ca_file,
        chain: vec![cert.der().clone()],
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

fn tls_rule_yaml(port: u16, ca: &Path) -> String {
    format!(
        "rules:\n  - name: collector-tls\n    upstream: \"127.0.0.1/32:{port}\"\n    tls_upgrade: {{ca_file: \"{}\"}}\n    validate: {{json: true}}\n",
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upgrade_speaks_verified_https_to_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let up = RecordingUpstream::start_tls(pki.chain, pki.key).await;
    let port = up.port();
    let resolver = TestResolver::new(&[("localhost", &["127.0.0.1"])]);
    let proxy = TestEgress::start(yaml_section(&tls_rule_yaml(port, &pki.ca_file)), resolver).await;
    // The client speaks plain HTTP; the name in the URL is what the certificate must match.
    let url = format!("http://localhost:{port}/api/v1/postback");
    for _ in 0..2 {
        let resp = post_via(
            proxy.addr,
            &url,
            &[("content-type", "application/json")],
            JSON_PAYLOAD,
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.text(), UPSTREAM_BODY);
        assert_arrived_identical(&up, JSON_PAYLOAD, Some("application/json"));
        assert_eq!(up.last().uri, "/api/v1/postback");
    }
    assert_eq!(up.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upgrade_to_a_certificate_the_ca_did_not_sign_is_502() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let up = RecordingUpstream::start_tls(pki.chain, pki.key).await;
    let port = up.port();
    let resolver = TestResolver::new(&[("localhost", &["127.0.0.1"])]);
    let proxy = TestEgress::start(
        yaml_section(&tls_rule_yaml(port, &pki.other_ca_file)),
        resolver,
    )
    .await;
    let resp = post_via(
        proxy.addr,
        &format!("http://localhost:{port}/api/v1/postback"),
        &[("content-type", "application/json")],
        JSON_PAYLOAD,
    )
    .await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    let reason = resp.header("ferry-refusal").unwrap_or_default();
    // Both test CAs have an empty name, so the CA found is the other one: a bad signature.
    assert!(
        reason.starts_with(&format!(
            "TLS handshake with localhost:{port} failed: the certificate's "
        )) && !reason.contains("client error"),
        "the cause in words, not the HTTP client's: {reason:?}"
    );
    assert!(
        reason.contains(&format!(
            "the CAs in {} (tls_upgrade.ca_file of rule \"collector-tls\")",
            pki.other_ca_file.display()
        )),
        "the CA file the rule trusts is named: {reason:?}"
    );
    assert_eq!(
        up.request_count(),
        0,
        "nothing is sent over an unverified connection"
    );
}

/// A `tls_upgrade` rule whose upstream fails the handshake gets a 502 that says so in plain
/// words: a plain-HTTP upstream, a CA certificate served as the server's own, and an upstream
/// that accepts the connection and never answers (bounded by `connect_timeout`, not by the much
/// longer `upstream_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upgrade_failures_are_said_in_plain_words() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_as_server = params.self_signed(&key).unwrap();
    let ca_file = dir.path().join("ca-as-server.pem");
    std::fs::write(&ca_file, ca_as_server.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let ca_up = RecordingUpstream::start_tls(vec![ca_as_server.der().clone()], key).await;
    let plain_up = RecordingUpstream::start().await;
    let silent = silent_upstream().await;
    let rule = |name: &str, port: u16| {
        format!(
            "  - name: {name}\n    upstream: \"127.0.0.1/32:{port}\"\n    tls_upgrade: {{ca_file: \"{}\"}}\n",
            ca_file.display()
        )
    };
    let yaml = format!(
        "connect_timeout: 500ms\nrules:\n{}{}{}",
        rule("ca-as-server", ca_up.port()),
        rule("plain", plain_up.port()),
        rule("silent", silent.port()),
    );
    let resolver = TestResolver::new(&[("localhost", &["127.0.0.1"])]);
    let proxy = TestEgress::start(yaml_section(&yaml), resolver).await;
    for (port, words) in [
        (
            ca_up.port(),
            "failed: a CA certificate cannot be used as the end-entity certificate",
        ),
        (
            plain_up.port(),
            "failed: the upstream does not speak TLS on that port (is it plain HTTP?)",
        ),
        (silent.port(), "timed out after 500ms"),
    ] {
        let started = Instant::now();
        let resp = get_via(proxy.addr, &format!("http://localhost:{port}/x")).await;
        assert_eq!(resp.status, 502, "{}", resp.text());
        assert_eq!(
            resp.header("ferry-refusal"),
            Some(format!("TLS handshake with localhost:{port} {words}").as_str()),
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{words}");
    }
    assert_eq!(ca_up.request_count() + plain_up.request_count(), 0);
}

/// A TLS server on 127.0.0.1 that requires a client certificate signed by a CA of its own,
/// speaking only `version`; it answers nothing (no client of the proxy gets that far).
async fn client_cert_upstream(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::server::WebPkiClientVerifier;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let (client_ca, _, _) = ca_and_server_cert(&["client"]);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(client_ca.as_bytes()).unwrap())
        .unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    // TLS 1.3: the client certificate is checked on the first read.
                    let mut buf = [0; 1024];
                    let _ = tls.read(&mut buf).await;
                }
            });
        }
    });
    addr
}

/// TLS-upgrade failures a user can act on are said so: an upstream asking for a client
/// certificate (TLS 1.3 and 1.2), a certificate for another name (the names, not Rust debug
/// output), and an upstream that does not answer in time (named).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upgrade_failures_name_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, chain, key) = ca_and_server_cert(&["collector.test"]);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let tls13 = client_cert_upstream(chain.clone(), key.clone_key(), &rustls::version::TLS13).await;
    let tls12 = client_cert_upstream(chain, key, &rustls::version::TLS12).await;
    let (other_ca, other_chain, other_key) = ca_and_server_cert(&["other.test"]);
    let other_ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, other_ca).unwrap();
    let other = RecordingUpstream::start_tls(other_chain, other_key).await;
    let silent = silent_upstream().await;
    let rule = |name: &str, port: u16, ca: &Path| {
        format!(
            "  - name: {name}\n    upstream: \"127.0.0.1/32:{port}\"\n    tls_upgrade: {{ca_file: \"{}\"}}\n",
            ca.display()
        )
    };
    let yaml = format!(
        "upstream_timeout: 500ms\nrules:\n{}{}{}  - name: silent\n    upstream: \"127.0.0.1/32:{}\"\n",
        rule("tls13", tls13.port(), &ca_file),
        rule("tls12", tls12.port(), &ca_file),
        rule("other-name", other.port(), &other_ca_file),
        silent.port(),
    );
    let resolver = TestResolver::new(&[("collector.test", &["127.0.0.1"])]);
    let proxy = TestEgress::start(yaml_section(&yaml), resolver).await;
    let client_cert = |rule: &str| {
        format!("the upstream asks for a client certificate: give rule {rule:?} a tls_upgrade.cert_file and key_file")
    };
    for (port, status, words) in [
        (tls13.port(), 502, client_cert("tls13")),
        (tls12.port(), 502, client_cert("tls12")),
        (
            other.port(),
            502,
            "the certificate is valid for other.test, not collector.test".to_owned(),
        ),
        (
            silent.port(),
            504,
            format!(
                "upstream collector.test:{} did not answer within 500ms",
                silent.port()
            ),
        ),
    ] {
        let resp = get_via(proxy.addr, &format!("http://collector.test:{port}/x")).await;
        assert_eq!(resp.status, status, "{port}: {}", resp.text());
        let reason = resp.header("ferry-refusal").unwrap_or_default();
        assert!(reason.contains(&words), "{words:?} in {reason:?}");
        assert!(!reason.contains("DnsName"), "{reason:?}");
    }
    assert_eq!(other.request_count(), 0);
}

/// A `tls_upgrade` rule with `cert_file` and `key_file` presents that client certificate to an
/// upstream that requires one (mTLS), and the request passes; a certificate of a CA the
/// upstream does not trust is refused in words that name the file, under TLS 1.3 (the refusal
/// comes after the handshake) and 1.2 alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upgrade_presents_the_rules_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (server_ca, chain, key) = ca_and_server_cert(&["collector.test"]);
    let (client_ca, cert, cert_key) = ca_and_client_cert("collector's client CA");
    let (_, stranger, stranger_key) = ca_and_client_cert("another CA");
    let ca_file = file("ca.pem", &server_ca);
    let (cert_file, key_file) = (file("client.pem", &cert), file("client.key", &cert_key));
    let (stranger_file, stranger_key_file) = (
        file("stranger.pem", &stranger),
        file("stranger.key", &stranger_key),
    );
    let up = RecordingUpstream::start_mtls(chain.clone(), key.clone_key(), &client_ca).await;
    let tls12 = client_cert_upstream(chain, key, &rustls::version::TLS12).await;
    let rule = |name: &str, port: u16, cert: &Path, key: &Path| {
        format!(
            "  - name: {name}\n    upstream: \"127.0.0.1/32:{port}\"\n    path_prefix: /{name}\n    tls_upgrade: {{ca_file: \"{}\", cert_file: \"{}\", key_file: \"{}\"}}\n",
            ca_file.display(),
            cert.display(),
            key.display()
        )
    };
    let yaml = format!(
        "rules:\n{}{}{}",
        rule("mtls", up.port(), &cert_file, &key_file),
        rule("stranger", up.port(), &stranger_file, &stranger_key_file),
        rule("tls12", tls12.port(), &stranger_file, &stranger_key_file),
    );
    let resolver = TestResolver::new(&[("collector.test", &["127.0.0.1"])]);
    let proxy = TestEgress::start(yaml_section(&yaml), resolver).await;

    let resp = get_via(
        proxy.addr,
        &format!("http://collector.test:{}/mtls/x", up.port()),
    )
    .await;
    assert_eq!(resp.status, 200, "{:?}", resp.header("ferry-refusal"));
    assert_eq!(resp.text(), UPSTREAM_BODY);
    assert_eq!(up.last().uri, "/mtls/x");

    for (port, rule) in [(up.port(), "stranger"), (tls12.port(), "tls12")] {
        let resp = get_via(
            proxy.addr,
            &format!("http://collector.test:{port}/{rule}/x"),
        )
        .await;
        let words = format!(
            "the upstream refused the client certificate in {} (tls_upgrade.cert_file of rule {rule:?})",
            stranger_file.display()
        );
        assert_refused(&resp, 502, &words, rule);
    }
    assert_eq!(up.request_count(), 1);
}

/// A reload (SIGHUP) re-reads a `tls_upgrade` rule's client certificate: a renewed one is used
/// by the next request; a broken one, or one not valid now in place of one that is, is
/// refused and the one in use stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_puts_a_renewed_client_certificate_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let (server_ca, chain, key) = ca_and_server_cert(&["collector.test"]);
    let (client_ca, cert, cert_key) = ca_and_client_cert("collector's client CA");
    let (_, old, old_key) = ca_and_client_cert("a CA the collector dropped");
    std::fs::write(path("ca.pem"), server_ca).unwrap();
    std::fs::write(path("client.pem"), &old).unwrap();
    std::fs::write(path("client.key"), &old_key).unwrap();
    let up = RecordingUpstream::start_mtls(chain, key, &client_ca).await;
    let yaml = format!(
        "rules:\n  - name: mtls\n    upstream: \"127.0.0.1/32:{}\"\n    tls_upgrade: {{ca_file: \"{}\", cert_file: \"{}\", key_file: \"{}\"}}\n",
        up.port(),
        path("ca.pem").display(),
        path("client.pem").display(),
        path("client.key").display()
    );
    let resolver = TestResolver::new(&[("collector.test", &["127.0.0.1"])]);
    let proxy = TestEgress::start(yaml_section(&yaml), resolver).await;
    let url = format!("http://collector.test:{}/x", up.port());
    let refused = get_via(proxy.addr, &url).await;
    assert_refused(
        &refused,
        502,
        "refused the client certificate",
        "the dropped CA's",
    );

    std::fs::write(path("client.pem"), &cert).unwrap();
    std::fs::write(path("client.key"), &cert_key).unwrap();
    assert_eq!(
        proxy.egress.reload_tls().unwrap(),
        ferry::egress::TlsReload::Applied {
            rules: vec!["mtls".to_owned()]
        }
    );
    let resp = get_via(proxy.addr, &url).await;
    assert_eq!(resp.status, 200, "{:?}", resp.header("ferry-refusal"));
    // Nothing changed: said so, and the pooled connection stays.
    assert_eq!(
        proxy.egress.reload_tls().unwrap(),
        ferry::egress::TlsReload::Unchanged
    );
    let resp = get_via(proxy.addr, &url).await;
    assert_eq!(resp.status, 200, "{:?}", resp.header("ferry-refusal"));
    assert_eq!(
        up.connections(),
        2,
        "the first refused, then one kept alive"
    );

    // Half-written: the key of another certificate.
    std::fs::write(path("client.key"), &old_key).unwrap();
    let e = proxy.egress.reload_tls().unwrap_err().to_string();
    assert!(e.contains("client.key") && e.contains("client.pem"), "{e}");
    let (expired, expired_key) = expired_client_cert();
    std::fs::write(path("client.pem"), &expired).unwrap();
    std::fs::write(path("client.key"), &expired_key).unwrap();
    let e = proxy.egress.reload_tls().unwrap_err().to_string();
    assert!(
        e.contains("rule \"mtls\"") && e.contains("expired on 2021-01-01") && e.contains("stays"),
        "{e}"
    );
    let resp = get_via(proxy.addr, &url).await;
    assert_eq!(
        resp.status,
        200,
        "the renewed certificate stays in use: {:?}",
        resp.header("ferry-refusal")
    );
    assert_eq!(up.request_count(), 3);
    assert_eq!(up.connections(), 2, "refused reloads leave the pool alone");
}

// ---------------------------------------------------------------------------------------------
// Protocol hygiene

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_400() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let a = up.addr;
    for (what, req) in [
        (
            "CL then TE",
            format!("POST http://{a}/smuggle HTTP/1.1\r\nHost: {a}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ),
        (
            "TE then CL",
            format!("POST http://{a}/smuggle HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"),
        ),
    ] {
        let resp = raw_exchange(proxy.addr, req.as_bytes()).await;
        assert_eq!(resp.status, 400, "{what}: {resp:?}");
        assert_eq!(
            resp.header("ferry-refusal").as_deref(),
            Some("both Content-Length and Transfer-Encoding"),
            "{what}"
        );
    }
    up.assert_untouched("CL + TE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_content_length_is_400() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let a = up.addr;
    for (what, lengths) in [("same value twice", ["5", "5"]), ("two values", ["5", "6"])] {
        let req = format!(
            "POST http://{a}/dup HTTP/1.1\r\nHost: {a}\r\nContent-Length: {}\r\nContent-Length: {}\r\n\r\nhello!",
            lengths[0], lengths[1]
        );
        let resp = raw_exchange(proxy.addr, req.as_bytes()).await;
        assert_eq!(resp.status, 400, "{what}: {resp:?}");
        if lengths[0] == lengths[1] {
            // Two different values hyper refuses itself, before the proxy sees the request.
            assert_eq!(
                resp.header("ferry-refusal").as_deref(),
                Some("more than one Content-Length header"),
                "{what}"
            );
        }
    }
    up.assert_untouched("duplicate Content-Length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_framed_pipelined_requests_pass_even_when_a_body_looks_like_smuggling() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let a = up.addr;
    // A body that spells a conflicting head is just a body.
    let inner = format!(
        "POST http://{a}/inner HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let chunk = "GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
    let pipelined = format!(
        "POST http://{a}/one HTTP/1.1\r\nHost: {a}\r\nContent-Length: {}\r\n\r\n{inner}\
         POST http://{a}/two HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x};ext=1\r\n{chunk}\r\n0\r\nX-Trailer: t\r\n\r\n\
         GET http://{a}/three HTTP/1.1\r\nHost: {a}\r\n\r\n\
         POST http://{a}/four HTTP/1.1\r\nHost: {a}\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
        inner.len(),
        chunk.len()
    );
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    for path in ["/one", "/two", "/three"] {
        let resp = tokio::time::timeout(Duration::from_secs(10), read_response(&mut stream))
            .await
            .expect("pipelined answer in time")
            .expect("pipelined answer");
        assert_eq!(resp.status, 200, "{path}: {resp:?}");
    }
    // Still in step after all that: the fourth request's duplicate Content-Length is seen.
    let resp = read_response(&mut stream).await.expect("fourth answer");
    assert_eq!(resp.status, 400, "{resp:?}");
    assert_eq!(
        resp.header("ferry-refusal").as_deref(),
        Some("more than one Content-Length header")
    );
    let seen = up.requests();
    let uris: Vec<&str> = seen.iter().map(|r| r.uri.as_str()).collect();
    assert_eq!(uris, ["/one", "/two", "/three"]);
    assert_eq!(seen[0].body.as_ref(), inner.as_bytes());
    assert_eq!(seen[1].body.as_ref(), chunk.as_bytes());
    assert_eq!(seen.len(), 3);
}

/// hyper accepts chunk extensions of up to 16 KiB, longer than the lines the proxy's framing
/// scan follows. Past one, the proxy cannot vouch for where the next request starts: it answers
/// the request in progress and closes the connection, so nothing behind it is served unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_line_too_long_to_follow_ends_the_connection() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let a = up.addr;
    let first = format!(
        "POST http://{a}/a HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n\
         5;{}\r\nhello\r\n0\r\n\r\n",
        "a".repeat(16383)
    );
    let smuggled = format!(
        "POST http://{a}/smug HTTP/1.1\r\nHost: {a}\r\nContent-Length: 50\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\nworld\r\n0\r\n\r\n"
    );
    for pipelined in [false, true] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let sent = if pipelined {
            format!("{first}{smuggled}")
        } else {
            first.clone()
        };
        stream.write_all(sent.as_bytes()).await.unwrap();
        let resp = tokio::time::timeout(TIMEOUT, read_response(&mut stream))
            .await
            .expect("an answer in time")
            .expect("an answer");
        assert_eq!(resp.status, 200, "pipelined {pipelined}: {resp:?}");
        assert_eq!(resp.header("connection").as_deref(), Some("close"));
        if !pipelined {
            // The proxy may have closed already.
            let _ = stream.write_all(smuggled.as_bytes()).await;
        }
        let mut rest = Vec::new();
        tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut rest))
            .await
            .expect("the proxy closes the connection")
            .ok();
        assert!(
            rest.is_empty(),
            "pipelined {pipelined}: a request after the lost framing was answered: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    let seen = up.requests();
    let uris: Vec<&str> = seen.iter().map(|r| r.uri.as_str()).collect();
    assert_eq!(uris, ["/a", "/a"]);
    assert_eq!(seen[0].body.as_ref(), b"hello");
}

/// hyper ends a chunked trailer line only at CRLF: after `X: a\n` it reads trailers on up to the
/// next empty line, swallowing the request head that follows, and takes what that head announced
/// as its body for the next request — which carried a smuggling head past the framing checks. A
/// bare LF in the trailers is refused, logged, and the connection closed: nothing behind it is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_lf_in_chunked_trailers_is_400_and_ends_the_connection() {
    let logs = common::logs::capture();
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let a = up.addr;
    let first = format!(
        "POST http://{a}/first HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n0\r\nX: a\n\r\n"
    );
    for smuggled in [
        format!("POST http://{a}/smuggled HTTP/1.1\r\nHost: {a}\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        format!("POST http://{a}/smuggled HTTP/1.1\r\nHost: {a}\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
    ] {
        let swallowed = format!(
            "POST http://{a}/swallowed HTTP/1.1\r\nHost: {a}\r\nContent-Length: {}\r\n\r\n",
            smuggled.len()
        );
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(format!("{first}{swallowed}{smuggled}").as_bytes())
            .await
            .unwrap();
        let resp = tokio::time::timeout(TIMEOUT, read_response(&mut stream))
            .await
            .expect("an answer in time")
            .expect("an answer");
        assert_eq!(resp.status, 400, "{resp:?}");
        assert_eq!(
            resp.header("ferry-refusal").as_deref(),
            Some("a line of the chunked trailer section ends in a bare LF instead of CRLF")
        );
        assert_eq!(resp.header("connection").as_deref(), Some("close"));
        let mut rest = Vec::new();
        tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut rest))
            .await
            .expect("the proxy closes the connection")
            .ok();
        assert!(
            rest.is_empty(),
            "a request after the bare LF was answered: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    up.assert_untouched("a bare LF in chunked trailers");
    let lines = logs
        .wait_lines(
            &[&format!("upstream={a}"), "status=400", "bare LF"],
            2,
            Duration::from_secs(5),
        )
        .await;
    assert!(lines[0].contains("decision=\"refused\""), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded_either_way() {
    let up = RecordingUpstream::start_with(Reply::HopByHop).await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let a = up.addr;
    let req = format!(
        "POST http://{a}/hop HTTP/1.1\r\nHost: {a}\r\n\
         Connection: close, X-Custom\r\nX-Custom: hop-only\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
         X-End-To-End: kept\r\nUser-Agent: egress-test/1\r\nContent-Type: text/plain\r\n\
         Content-Length: 5\r\n\r\nhello"
    );
    let resp = raw_exchange(proxy.addr, req.as_bytes()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let got = up.last();
    for hop in [
        "connection",
        "x-custom",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
    ] {
        assert!(
            got.headers.get(hop).is_none(),
            "hop-by-hop {hop} was forwarded: {:?}",
            got.headers
        );
    }
    assert_eq!(got.header("x-end-to-end"), Some("kept"));
    assert_eq!(got.header("user-agent"), Some("egress-test/1"));
    assert_eq!(got.header("content-type"), Some("text/plain"));
    assert_eq!(got.body.as_ref(), b"hello");
    // The upstream's own hop-by-hop headers stop at the proxy too.
    assert_eq!(resp.header("x-resp-e2e").as_deref(), Some("kept"));
    assert!(resp.header("x-resp-hop").is_none(), "{}", resp.head);
    assert!(resp.header("keep-alive").is_none(), "{}", resp.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_is_431() {
    let up = RecordingUpstream::start().await;
    let mut s = section(&[loopback_rule(&up)]);
    s.max_header_bytes = 4096;
    let proxy = TestEgress::start(s, TestResolver::new(&[])).await;
    let a = up.addr;
    let small = format!(
        "GET http://{a}/ok HTTP/1.1\r\nHost: {a}\r\nX-Fill: {}\r\nConnection: close\r\n\r\n",
        "f".repeat(2000)
    );
    assert_eq!(raw_exchange(proxy.addr, small.as_bytes()).await.status, 200);
    assert_eq!(up.request_count(), 1);
    for size in [6000, 40_000] {
        let req = format!(
            "GET http://{a}/big HTTP/1.1\r\nHost: {a}\r\nX-Fill: {}\r\n\r\n",
            "f".repeat(size)
        );
        let resp = raw_exchange(proxy.addr, req.as_bytes()).await;
        assert_eq!(resp.status, 431, "a {size}-byte header: {resp:?}");
    }
    assert_eq!(up.request_count(), 1, "the big requests were not forwarded");
}

/// Connects to `addr`, sends `head`, then one more byte every 100 ms for up to 10 s, as a
/// slowloris client does. Returns the read half, the writer task and when it started.
async fn trickle(
    addr: std::net::SocketAddr,
    head: String,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    tokio::task::JoinHandle<()>,
    Instant,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (rd, mut wr) = stream.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(b"a").await.is_err() {
                break;
            }
        }
    });
    (rd, writer, started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_headers_are_cut_by_the_header_read_timeout() {
    let logs = common::logs::capture();
    let up = RecordingUpstream::start().await;
    let mut s = section(&[loopback_rule(&up)]);
    s.header_read_timeout = ferry::config::Dur(Duration::from_millis(500));
    let proxy = TestEgress::start(s, TestResolver::new(&[])).await;
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nX-Slow: ",
        up.url("/"),
        up.addr
    );
    // Never a complete head.
    let (mut rd, writer, started) = trickle(proxy.addr, head).await;
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut got)).await;
    let took = started.elapsed();
    writer.abort();
    assert!(closed.is_ok(), "the proxy kept a trickling client for 5 s");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "closed after {took:?}, header_read_timeout is 500 ms"
    );
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408")
            && text.contains("\r\ndate: ")
            && text.contains("ferry-refusal: request head not received within 500ms")
            && text.contains("\r\nx-content-type-options: nosniff\r\n"),
        "a 408 with its reason before closing: {text:?}"
    );
    up.assert_untouched("slowloris");
    // Counted like every refusal.
    proxy.assert_rejections("header_timeout", 1.0).await;
    // Its access line says how long the head took, not the moment since it failed.
    let line = logs
        .wait_lines(&["request head not received within 500ms"], 1, TIMEOUT)
        .await
        .remove(0);
    let ms: f64 = line
        .split_once("duration_ms=")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {line}"));
    assert!(ms >= 400.0, "{line}");
}

/// A connection that never sends a byte holds a connection slot as a trickled head does: it is
/// closed after the header read timeout, not kept for the (much longer) idle timeout, and gets no
/// answer, since it asked nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
    let up = RecordingUpstream::start().await;
    let mut s = section(&[loopback_rule(&up)]);
    s.header_read_timeout = ferry::config::Dur(Duration::from_millis(500));
    s.idle_timeout = ferry::config::Dur(Duration::from_secs(60));
    s.max_connections_per_client = 2;
    let proxy = TestEgress::start(s, TestResolver::new(&[])).await;
    let started = Instant::now();
    let mut silent = [
        TcpStream::connect(proxy.addr).await.unwrap(),
        TcpStream::connect(proxy.addr).await.unwrap(),
    ];
    for stream in &mut silent {
        let mut got = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
        let took = started.elapsed();
        assert!(closed.is_ok(), "a silent connection was kept for 5 s");
        assert!(
            took >= Duration::from_millis(400),
            "closed after {took:?}, header_read_timeout is 500 ms"
        );
        assert!(got.is_empty(), "nothing asked, nothing answered: {got:?}");
    }
    // Their slots are free again: the two connections this client may hold were both silent, and
    // the next one is served (slots are released just after the close the client saw, hence a
    // few tries).
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        up.url("/after"),
        up.addr
    );
    let mut resp = raw_exchange(proxy.addr, request.as_bytes()).await;
    for _ in 0..20 {
        if resp.status != 429 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        resp = raw_exchange(proxy.addr, request.as_bytes()).await;
    }
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(up.request_count(), 1);
    // A first byte that comes in time starts the head's own bound; the request then completes.
    let mut late = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    late.write_all(b"G").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    late.write_all(
        format!(
            "ET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            up.url("/late"),
            up.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, late.read_to_end(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.request_count(), 2);
}

/// A kept-alive connection may wait for its next request much longer than a request head may
/// take to arrive (`header_read_timeout`): clients that send every 10 s or so must not race the
/// proxy closing their connection. Past `idle_timeout` it is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_waits_idle_timeout_not_header_read_timeout() {
    let up = RecordingUpstream::start().await;
    let mut s = section(&[loopback_rule(&up)]);
    s.header_read_timeout = ferry::config::Dur(Duration::from_millis(300));
    s.idle_timeout = ferry::config::Dur(Duration::from_millis(1500));
    let proxy = TestEgress::start(s, TestResolver::new(&[])).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for i in 0..2 {
        let resp = sender
            .send_request(absolute(
                "GET",
                &up.url(&format!("/r{i}")),
                &[],
                Bytes::new(),
            ))
            .await
            .expect("the kept-alive connection is still open");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        // Idle for more than twice the header read timeout.
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    // Past the idle timeout the proxy closes it.
    let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        closed.is_ok(),
        "an idle connection was kept past idle_timeout"
    );
    assert_eq!(up.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_by_the_body_read_timeout_and_never_forwarded() {
    let up = RecordingUpstream::start().await;
    let mut s = section(&[loopback_rule(&up)]);
    s.body_read_timeout = ferry::config::Dur(Duration::from_millis(500));
    let proxy = TestEgress::start(s, TestResolver::new(&[])).await;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: 1000\r\n\r\npartial",
        up.url("/"),
        up.addr
    );
    // Never the whole body.
    let (mut rd, writer, started) = trickle(proxy.addr, head).await;
    let mut got = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut got))
        .await
        .expect("the proxy answers a trickling body within 5 s")
        .unwrap();
    let took = started.elapsed();
    writer.abort();
    let text = String::from_utf8_lossy(&got[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(
        text.to_ascii_lowercase()
            .contains("ferry-refusal: request body not received"),
        "{text:?}"
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "answered after {took:?}"
    );
    up.assert_untouched("trickled body");
}

/// Waits until the proxy holds `bytes` of request bodies, by its own gauge.
async fn wait_buffered(proxy: &TestEgress, bytes: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let held = metric_value(
            &proxy.metrics().await,
            "ferry_egress_buffered_body_bytes",
            &[],
        );
        if held == Some(bytes) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy holds {held:?} bytes of bodies, not {bytes}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bodies are read whole before they are forwarded; all requests together hold at most
/// `max_buffered_body_bytes`. A request that would go over it gets 503 and the upstream nothing,
/// while the request holding the budget stalls; what it held is given back when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_held_at_once_are_bounded_process_wide() {
    let up = RecordingUpstream::start().await;
    let yaml = format!(
        "max_buffered_body_bytes: 100000\nrules:\n  - name: push\n    upstream: \"{}\"\n    validate: {{max_body_bytes: 80000}}\n",
        loopback_rule(&up)
    );
    let proxy = TestEgress::start(yaml_section(&yaml), TestResolver::new(&[])).await;
    let mut stalled = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: 80000\r\n\r\n",
        up.url("/stalled"),
        up.addr
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(&[b'a'; 70_000]).await.unwrap();
    wait_buffered(&proxy, 70_000.0).await;

    let resp = post_via(proxy.addr, &up.url("/over"), &[], &[b'b'; 40_000]).await;
    assert_refused(
        &resp,
        503,
        "the proxy already holds its limit of 100000 bytes of request bodies (max_buffered_body_bytes)",
        "a body over what is left of the budget",
    );
    up.assert_untouched("over the body budget");
    let resp = post_via(proxy.addr, &up.url("/fits"), &[], &[b'c'; 20_000]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    proxy.assert_rejections("body_buffer_full", 1.0).await;

    drop(stalled);
    wait_buffered(&proxy, 0.0).await;
    let resp = post_via(proxy.addr, &up.url("/after"), &[], &[b'd'; 40_000]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let paths: Vec<String> = up.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(paths, ["/fits", "/after"]);
}

/// What a body's checks build from it — the body decoded, a schema's tree — is taken from the
/// same process-wide budget as the bodies received: a few kilobytes of gzip that decode to
/// megabytes get the budget's 503 once it is full, and the upstream nothing. Bodies that fit
/// arrive as sent, also those checked on the blocking pool (compressed, or large).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_bodies_are_held_within_the_process_wide_budget() {
    let up = RecordingUpstream::start().await;
    let yaml = format!(
        "max_buffered_body_bytes: 4194304\nrules:\n  - name: push\n    upstream: \"{}\"\n    validate: {{max_body_bytes: 1048576, json: true, deny_patterns: [\"secret\"]}}\n",
        loopback_rule(&up)
    );
    let proxy = TestEgress::start(yaml_section(&yaml), TestResolver::new(&[])).await;
    let gzipped = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    // 16 MiB of zeros, well under max_decoded_bytes (64 MiB), over the whole budget (4 MiB).
    let bomb = gzip(&vec![b'0'; 16 << 20]);
    assert!(bomb.len() < 64 << 10, "bomb is {} bytes", bomb.len());
    let resp = post_via(proxy.addr, &up.url("/bomb"), &gzipped, &bomb).await;
    assert_refused(
        &resp,
        503,
        "the proxy already holds its limit of 4194304 bytes of request bodies (max_buffered_body_bytes)",
        "a gzip bomb decoded past the body budget",
    );
    up.assert_untouched("gzip bomb over the body budget");
    proxy.assert_rejections("body_buffer_full", 1.0).await;
    wait_buffered(&proxy, 0.0).await;

    let mut doc = b"[".to_vec();
    doc.extend(b"{\"v\": 1},".repeat(100_000));
    doc.extend(b"{}]");
    let small = gzip(b"{\"a\": [1, 2]}");
    let large = gzip(&doc);
    for (path, headers, body) in [
        ("/small", &gzipped[..], &small),
        ("/large", &gzipped[..], &large),
        ("/plain", &gzipped[..1], &doc),
    ] {
        let resp = post_via(proxy.addr, &up.url(path), headers, body).await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        let got = up.requests().pop().unwrap();
        assert_eq!(got.uri, path);
        assert!(got.body == body[..], "{path} arrived as sent");
    }
    wait_buffered(&proxy, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_reused_on_both_sides() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::combinators::BoxBody<Bytes, Infallible>,
    >(TokioIo::new(stream))
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    for i in 0..5 {
        sender
            .ready()
            .await
            .expect("the proxy kept the client connection open");
        // Content-Length and chunked bodies in turn.
        let body = format!("{{\"n\": {i}}}");
        let req = absolute("POST", &up.url(&format!("/ka{i}")), &[], body.clone());
        let req = if i % 2 == 0 {
            req.map(|b| b.boxed())
        } else {
            let (half, rest) = body.as_bytes().split_at(3);
            req.map(|_| chunked(vec![half.to_vec(), rest.to_vec()]).boxed())
        };
        let resp = sender
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("request {i} on the kept-alive connection: {e}"));
        assert_eq!(resp.status(), 200);
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got.as_ref(), UPSTREAM_BODY.as_bytes());
        assert_eq!(up.last().body.as_ref(), body.as_bytes());
    }
    assert!(!conn.is_finished(), "client connection still open");
    let seen = up.requests();
    assert_eq!(seen.len(), 5);
    assert!(
        seen.iter().all(|r| r.peer == seen[0].peer),
        "one upstream connection: {:?}",
        seen.iter().map(|r| r.peer).collect::<Vec<_>>()
    );
    assert_eq!(up.connections(), 1);
}

// ---------------------------------------------------------------------------------------------
// Own endpoints, metrics, access log, start-up

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_form_reaches_only_the_proxys_own_endpoints() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let base = format!("http://{}", proxy.addr);
    for path in ["/metrics", "/-/healthy", "/-/ready"] {
        assert_eq!(get(&format!("{base}{path}")).await.status, 200, "{path}");
    }
    let resp = get(&format!("{base}/api/v1/push")).await;
    assert_eq!(resp.status, 404);
    assert!(resp.text().contains("not proxied"), "{}", resp.text());
    // Origin-form naming the upstream in Host is still not proxied.
    for req in [
        format!("GET /steal HTTP/1.1\r\nHost: {}\r\n\r\n", up.addr),
        format!(
            "POST /steal HTTP/1.1\r\nHost: {}\r\nContent-Length: 2\r\n\r\n{{}}",
            up.addr
        ),
    ] {
        let resp = raw_exchange(proxy.addr, req.as_bytes()).await;
        assert_eq!(resp.status, 404, "{req:?}: {resp:?}");
    }
    up.assert_untouched("origin-form requests");
}

/// `ferry_egress_request_duration_seconds` says what it measures: to the last byte of the answer,
/// and for a CONNECT tunnel the time to open it (as the README says), not the tunnel's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_duration_help_says_a_tunnel_counts_the_time_to_open_it() {
    let proxy = TestEgress::start(EgressSection::default(), TestResolver::new(&[])).await;
    let text = get(&format!("http://{}/metrics", proxy.addr)).await.text();
    let help = text
        .lines()
        .find(|l| l.starts_with("# HELP ferry_egress_request_duration_seconds "))
        .unwrap_or_else(|| panic!("no help line in:\n{text}"));
    assert_eq!(
        help,
        "# HELP ferry_egress_request_duration_seconds Request duration to the last response byte; for a CONNECT tunnel, the time to open it."
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_allowed_and_refused_requests() {
    let up = RecordingUpstream::start().await;
    let rule = loopback_rule(&up);
    let proxy =
        TestEgress::start(section(std::slice::from_ref(&rule)), TestResolver::new(&[])).await;
    let resp = post_via(proxy.addr, &up.url("/ok"), &[], b"12345").await;
    assert_eq!(resp.status, 200);
    let refused = get_via(proxy.addr, &format!("http://127.0.0.2:{}/no", up.port())).await;
    assert_eq!(refused.status, 403);

    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = proxy.metrics().await;
        let allowed = metric_value(
            &text,
            "ferry_egress_requests_total",
            &[("decision", "allowed")],
        );
        if allowed == Some(1.0) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let value = |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels);
    assert_eq!(
        value(
            "ferry_egress_requests_total",
            &[
                ("rule", rule.as_str()),
                ("method", "POST"),
                ("status_class", "2xx"),
                ("decision", "allowed")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            "ferry_egress_requests_total",
            &[
                ("rule", "-"),
                ("method", "GET"),
                ("status_class", "4xx"),
                ("decision", "refused")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            "ferry_egress_rejections_total",
            &[("reason", "destination_not_allowed")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value("ferry_egress_bytes_total", &[("direction", "in")]),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        value("ferry_egress_bytes_total", &[("direction", "out")]),
        Some(UPSTREAM_BODY.len() as f64),
        "{text}"
    );
    assert_eq!(
        value("ferry_egress_request_duration_seconds_count", &[]),
        Some(2.0),
        "{text}"
    );
}

/// A `ferry` child process whose stderr lines arrive on a channel; killed when dropped.
struct FerryProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl FerryProcess {
    fn spawn(args: &[&str]) -> FerryProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        FerryProcess {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Collects stderr lines until `done(lines so far)` or `timeout`.
    fn collect_until(&mut self, timeout: Duration, done: impl Fn(&[String]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => return done(&self.seen),
            }
        }
        true
    }

    /// Kills the process and returns all of its stderr.
    fn finish(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        std::mem::take(&mut self.seen)
    }
}

impl Drop for FerryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn access_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "ferry::egress::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_line_per_request_and_no_payload() {
    let up = RecordingUpstream::start().await;
    let rule = loopback_rule(&up);
    let marker = format!("PAYLOAD-MARKER-{}", std::process::id());
    let body = format!("{{\"secret\": \"{marker}\"}}");

    // The port was free a moment ago; retry if another process took it first.
    let mut started = None;
    for _ in 0..3 {
        let listen = format!("127.0.0.1:{}", common::external::free_port());
        let mut ferry = FerryProcess::spawn(&[
            "egress",
            "--web.listen-address",
            &listen,
            "--allow-upstream",
            &rule,
            "--log.format",
            "json",
        ]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let ready = loop {
            if let Ok(resp) = try_get(&format!("http://{listen}/-/ready"), &[]).await {
                break resp.status == 200;
            }
            if Instant::now() > deadline || ferry.child.try_wait().unwrap().is_some() {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if ready {
            started = Some((ferry, listen.parse::<SocketAddr>().unwrap()));
            break;
        }
    }
    let (mut ferry, addr) = started.expect("ferry egress never became ready");

    let resp = post_via(
        addr,
        &up.url("/push"),
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = post_via(
        addr,
        &format!("http://127.0.0.2:{}/push", up.port()),
        &[],
        body.as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert!(ferry.collect_until(Duration::from_secs(10), |l| access_lines(l).len() >= 2));
    let lines = ferry.finish();
    let access = access_lines(&lines);
    assert_eq!(access.len(), 2, "one line per request: {lines:#?}");

    let fields: Vec<&serde_json::Value> = access.iter().map(|v| &v["fields"]).collect();
    for f in &fields {
        for key in [
            "client",
            "user",
            "rule",
            "upstream",
            "method",
            "status",
            "bytes_in",
            "bytes_out",
            "duration_ms",
            "decision",
            "reason",
        ] {
            assert!(f.get(key).is_some(), "access line lacks {key}: {f}");
        }
        assert_eq!(f["client"], "127.0.0.1");
        assert_eq!(f["user"], "-", "no credentials file: no user");
        assert_eq!(f["method"], "POST");
        assert!(f["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{f}");
    }
    let allowed = fields
        .iter()
        .find(|f| f["decision"] == "allowed")
        .expect("an allowed line");
    assert_eq!(allowed["status"], 200);
    assert_eq!(allowed["rule"], rule.as_str());
    assert_eq!(allowed["upstream"], up.addr.to_string());
    assert_eq!(allowed["bytes_in"], body.len());
    assert_eq!(allowed["bytes_out"], UPSTREAM_BODY.len());
    let refused = fields
        .iter()
        .find(|f| f["decision"] == "refused")
        .expect("a refused line");
    assert_eq!(refused["status"], 403);
    assert_eq!(refused["rule"], "-");
    assert_eq!(refused["upstream"], format!("127.0.0.2:{}", up.port()));
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not allowed")),
        "{refused}"
    );
    assert!(
        lines.iter().all(|l| !l.contains(&marker)),
        "payload contents reached the log"
    );
    assert_eq!(up.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listener_needs_an_explicit_client_allowlist() {
    let mut ferry = FerryProcess::spawn(&["egress", "--web.listen-address", "0.0.0.0:0"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = ferry.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "ferry egress on 0.0.0.0 without --allow-client kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = ferry.finish().join("\n");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--allow-client"), "{stderr}");
}

/// A CONNECT tunnel is a byte pipe: what the client sends right behind its CONNECT head (before
/// the 200), megabytes each way and a half-close all arrive unchanged, and the tunnel's bytes are
/// counted once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_relay_raw_bytes_both_ways_with_half_close() {
    let upload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let download: Vec<u8> = (0..2_000_000u32).map(|i| (i * 13 % 241) as u8).collect();
    // A raw TCP server: reads to end of stream, then answers and closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let reply = download.clone();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        sock.read_to_end(&mut got).await.unwrap();
        sock.write_all(&reply).await.unwrap();
        sock.shutdown().await.unwrap();
        got
    });
    let proxy = TestEgress::start(
        section(&[format!("127.0.0.1/32:{}", server_addr.port())]),
        TestResolver::new(&[]),
    )
    .await;

    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let mut first =
        format!("CONNECT {server_addr} HTTP/1.1\r\nHost: {server_addr}\r\n\r\n").into_bytes();
    first.extend_from_slice(&upload[..1000]);
    client.write_all(&first).await.unwrap();
    let resp = tokio::time::timeout(TIMEOUT, read_response(&mut client))
        .await
        .expect("CONNECT answered in time")
        .expect("CONNECT answered");
    assert_eq!(resp.status, 200, "{resp:?}");
    let (mut rd, mut wr) = client.into_split();
    let sender = tokio::spawn({
        let rest = upload[1000..].to_vec();
        async move {
            wr.write_all(&rest).await.unwrap();
            wr.shutdown().await.unwrap();
        }
    });
    let mut got = Vec::new();
    tokio::time::timeout(TIMEOUT, rd.read_to_end(&mut got))
        .await
        .expect("tunnel ended in time")
        .unwrap();
    sender.await.unwrap();
    let at_server = server.await.unwrap();
    assert!(
        at_server == upload,
        "upstream got {} bytes, not the upload",
        at_server.len()
    );
    assert!(
        got == download,
        "client got {} bytes, not the download",
        got.len()
    );

    let deadline = Instant::now() + TIMEOUT;
    loop {
        let metrics = proxy.metrics().await;
        let bytes_in = metric_value(&metrics, "ferry_egress_bytes_total", &[("direction", "in")]);
        let bytes_out = metric_value(
            &metrics,
            "ferry_egress_bytes_total",
            &[("direction", "out")],
        );
        if bytes_in == Some(upload.len() as f64) && bytes_out == Some(download.len() as f64) {
            assert_eq!(
                metric_value(&metrics, "ferry_egress_open_tunnels", &[]),
                Some(0.0)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tunnel bytes not counted: in {bytes_in:?}, out {bytes_out:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A tunnel that carries nothing for `tunnel_idle_timeout` is closed; one that keeps moving
/// bytes is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connect_tunnels_are_closed_active_ones_are_not() {
    let server_addr = echo_server().await;
    let mut section = section(&[format!("127.0.0.1/32:{}", server_addr.port())]);
    // Ten times the busy tunnel's pauses: a loaded machine stretching one pause must not make
    // the busy tunnel look idle.
    section.tunnel_idle_timeout = serde_yaml_ng::from_str("1s").unwrap();
    let proxy = TestEgress::start(section, TestResolver::new(&[])).await;

    let authority = server_addr.to_string();
    let (resp, mut busy) = connect_raw(proxy.addr, &authority, &[]).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let (resp, mut idle) = connect_raw(proxy.addr, &authority, &[]).await;
    assert_eq!(resp.status, 200, "{resp:?}");

    // The busy tunnel echoes a byte every 100 ms for 2.5 s, two and a half idle timeouts.
    let started = Instant::now();
    for i in 0..25u8 {
        busy.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(TIMEOUT, busy.read_exact(&mut b))
            .await
            .expect("echo in time")
            .expect("busy tunnel still open");
        assert_eq!(b[0], i);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The idle one was closed meanwhile: end of stream, not a hang.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(1), idle.read_to_end(&mut rest))
        .await
        .expect("idle tunnel closed by the proxy")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing was sent on the idle tunnel");
    assert!(started.elapsed() >= Duration::from_millis(2500));
}

// ---------------------------------------------------------------------------------------------
// Requests an upstream could read differently from the rule that let them through

/// Sends raw request `bytes` and asserts the refusal `status` with `needle` in `Ferry-Refusal`.
async fn assert_raw_refused(proxy: SocketAddr, bytes: &str, status: u16, needle: &str) {
    let resp = raw_exchange(proxy, bytes.as_bytes()).await;
    assert_eq!(resp.status, status, "{bytes:?}: {resp:?}");
    let reason = resp.header("ferry-refusal").unwrap_or_default();
    assert!(
        reason.contains(needle),
        "{bytes:?}: reason {reason:?} should mention {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_refused_and_path_prefixes_end_at_a_segment() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(
        yaml_section(&format!(
            "rules:\n  - name: open\n    upstream: \"{}\"\n    path_prefix: /open\n",
            loopback_rule(&up)
        )),
        TestResolver::new(&[]),
    )
    .await;
    let a = up.addr;
    // An upstream that resolves the dot-segments would serve /admin, outside the prefix.
    for path in [
        "/open/../admin",
        "/open/./../admin",
        "/open/..%2fadmin",
        "/open/%2e%2e/admin",
        "/open/.%2E/admin",
        "/open/..",
        "/open/..%5cadmin",
        // Tomcat, Jetty and Spring drop `;parameters` from a segment, then resolve it.
        "/open/..;/admin",
        "/open/%2e%2e;/admin",
        "/open/%2E%2e;jsessionid=1/admin",
        "/open/.;x/../admin",
        // Encoded twice: an upstream that decodes twice resolves it.
        "/open/%252e%252e/admin",
        "/open/%252E%252E%253b/admin",
    ] {
        let req =
            format!("POST http://{a}{path} HTTP/1.1\r\nHost: {a}\r\nContent-Length: 2\r\n\r\nhi");
        assert_raw_refused(proxy.addr, &req, 400, ". or .. segment").await;
    }
    let resp = post_via(proxy.addr, &up.url("/openadmin"), &[], b"x").await;
    assert_refused(
        &resp,
        403,
        "is not allowed",
        "/openadmin is not under /open",
    );
    up.assert_untouched("dot-segments and a prefix that is not a segment");

    for path in [
        "/open",
        "/open/x",
        "/open/a..b/.well-known",
        "/open/x;v=1/...;/y",
        "/open/%25/x",
    ] {
        let resp = post_via(proxy.addr, &up.url(path), &[], b"x").await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        assert_eq!(up.last().uri, path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_content_encoding_line_is_decoded_or_refused() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, "{ deny_patterns: [SECRET] }").await;
    let a = up.addr;
    let twice = gzip(&gzip(b"data SECRET data"));
    let once = gzip(b"data SECRET data");
    for (what, lines, body, status, needle) in [
        (
            "gzip on two lines",
            "Content-Encoding: gzip\r\nContent-Encoding: gzip\r\n",
            &twice,
            415,
            "content encoding gzip, gzip",
        ),
        (
            "identity, then gzip",
            "Content-Encoding: identity\r\nContent-Encoding: gzip\r\n",
            &once,
            403,
            "deny pattern",
        ),
    ] {
        let mut req = format!(
            "POST http://{a}/in HTTP/1.1\r\nHost: {a}\r\n{lines}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        let resp = raw_exchange(proxy.addr, &req).await;
        assert_eq!(resp.status, status, "{what}: {resp:?}");
        let reason = resp.header("ferry-refusal").unwrap_or_default();
        assert!(reason.contains(needle), "{what}: {reason:?}");
    }
    // A coding the rule cannot read is refused from the head, before the body is uploaded.
    let head = format!(
        "POST http://{a}/in HTTP/1.1\r\nHost: {a}\r\nContent-Encoding: br\r\n\
         Content-Length: 5000000\r\n\r\n"
    );
    let started = Instant::now();
    let resp = raw_exchange(proxy.addr, head.as_bytes()).await;
    assert_eq!(resp.status, 415, "{resp:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    up.assert_untouched("encoded twice or after identity");
}

/// Headers named in `Connection` are hop-by-hop and not forwarded: naming Content-Encoding and
/// Content-Type would send the upstream raw gzip bytes the rule checked as decoded JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_header_cannot_strip_what_the_rule_checks() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, "{json: true, required_headers: [X-Agent]}").await;
    let body = gzip(JSON_PAYLOAD);
    let sent = |connection: &'static str| {
        [
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
            ("x-agent", "a1"),
            ("x-hop", "for the proxy only"),
            ("connection", connection),
        ]
    };
    for (connection, named) in [
        ("Content-Encoding, Content-Type", "content-encoding"),
        ("keep-alive,content-type", "content-type"),
        ("Content-Length", "content-length"),
        ("Host", "host"),
        ("Content-MD5", "content-md5"),
        ("X-Agent", "x-agent"),
    ] {
        let resp = post_via(proxy.addr, &up.url("/"), &sent(connection), &body).await;
        assert_refused(
            &resp,
            400,
            &format!("the Connection header names {named},"),
            connection,
        );
    }
    let raw = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nX-Agent: a1\r\n\
         Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n",
        up.url("/"),
        up.addr
    );
    assert_raw_refused(
        proxy.addr,
        &raw,
        400,
        "the Connection header names transfer-encoding,",
    )
    .await;
    up.assert_untouched("Connection naming checked headers");

    // Naming any other header still makes it hop-by-hop.
    let resp = post_via(proxy.addr, &up.url("/"), &sent("x-hop"), &body).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_arrived_identical(&up, &body, Some("application/json"));
    let got = up.last();
    assert_eq!(got.header("content-encoding"), Some("gzip"));
    assert_eq!(got.header("x-agent"), Some("a1"));
    assert_eq!(got.header("x-hop"), None);
}

/// A body in UTF-16 spells `password=` with a NUL after every letter: ASCII deny patterns and the
/// JSON checks would not see it, the upstream would decode it. A rule that reads the body refuses
/// a charset that is not ASCII-compatible; a rule that does not read it lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charset_the_body_checks_cannot_read_is_415() {
    let up = RecordingUpstream::start().await;
    let proxy = validating_proxy(&up, "{deny_patterns: ['(?i)password=']}").await;
    let utf16: Vec<u8> = "m password=1 v=1"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    for (content_type, named) in [
        ("text/plain; charset=utf-16le", "utf-16le"),
        ("text/plain;charset=\"UTF-16\"", "utf-16"),
        ("text/plain; format=x; Charset=utf-32", "utf-32"),
        ("application/json; charset=UTF-7", "utf-7"),
        ("text/plain; charset=ucs-2", "ucs-2"),
        ("text/plain; charset=cp037", "cp037"),
    ] {
        let resp = post_via(
            proxy.addr,
            &up.url("/"),
            &[("content-type", content_type)],
            &utf16,
        )
        .await;
        assert_refused(
            &resp,
            415,
            &format!("charset {named} cannot be checked"),
            content_type,
        );
    }
    up.assert_untouched("charsets the checks cannot read");
    for content_type in [
        "text/plain",
        "text/plain; charset=utf-8",
        "text/plain; charset=\"US-ASCII\"",
        "text/plain; charset=iso-8859-15",
    ] {
        let resp = post_via(
            proxy.addr,
            &up.url("/"),
            &[("content-type", content_type)],
            b"m v=1",
        )
        .await;
        assert_eq!(resp.status, 200, "{content_type}: {}", resp.text());
    }
    let unchecked = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let resp = post_via(
        unchecked.addr,
        &up.url("/"),
        &[("content-type", "text/plain; charset=utf-16le")],
        &utf16,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(up.last().body.as_ref(), &utf16[..]);
}

/// A malformed chunked body is refused with what hyper found wrong, not only "error reading a
/// body".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chunked_body_is_400_with_its_cause() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let a = up.addr;
    let req = format!(
        "POST http://{a}/c HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n\
         zz\r\nhello\r\n0\r\n\r\n"
    );
    assert_raw_refused(
        proxy.addr,
        &req,
        400,
        "cannot read request body: error reading a body from connection: Invalid chunk size",
    )
    .await;
    up.assert_untouched("a broken chunked body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_transfer_codings_userinfo_and_repeated_content_headers_are_refused() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let a = up.addr;
    for (te, coding) in [("gzip, chunked", "gzip"), ("identity, chunked", "identity")] {
        let req = format!(
            "POST http://{a}/te HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        assert_raw_refused(
            proxy.addr,
            &req,
            501,
            &format!("transfer coding \"{coding}\""),
        )
        .await;
    }
    let req = format!(
        "POST http://{a}/ct HTTP/1.1\r\nHost: {a}\r\nContent-Type: text/plain\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    assert_raw_refused(proxy.addr, &req, 400, "more than one Content-Type").await;
    // The first one right: the upstream might check the second.
    let req = format!(
        "POST http://{a}/md5 HTTP/1.1\r\nHost: {a}\r\nContent-MD5: {}\r\nContent-MD5: {}\r\nContent-Length: 2\r\n\r\n{{}}",
        md5_b64(b"{}"),
        md5_b64(b"[]")
    );
    assert_raw_refused(proxy.addr, &req, 400, "more than one Content-MD5").await;
    let req = format!("GET http://alice:hunter2@{a}/u HTTP/1.1\r\nHost: {a}\r\n\r\n");
    assert_raw_refused(proxy.addr, &req, 400, "userinfo").await;
    up.assert_untouched("TE, two Content-Types or Content-MD5s, userinfo");

    // A single chunked coding, in any case, is fine.
    let req = format!(
        "POST http://{a}/te HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let resp = raw_exchange(proxy.addr, req.as_bytes()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(&up.last().body[..], b"hello");
}

/// A port out of range is an error, not the default port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_out_of_range_is_400() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(
        section(&[loopback_rule(&up), "127.0.0.1/32:80,443".into()]),
        TestResolver::new(&[]),
    )
    .await;
    for authority in ["127.0.0.1:65536", "127.0.0.1:99999999999"] {
        let req = format!("GET http://{authority}/x HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        assert_raw_refused(proxy.addr, &req, 400, "invalid port").await;
        let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        assert_raw_refused(proxy.addr, &req, 400, "invalid port").await;
    }
    up.assert_untouched("ports out of range");
}

/// A CONNECT target is `host:port`: not a URL, not userinfo in front of the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_target_other_than_host_and_port_is_400() {
    let up = RecordingUpstream::start().await;
    let rule = format!("127.0.0.0/8:{}", up.port());
    let proxy = TestEgress::start(section(&[rule]), TestResolver::new(&[])).await;
    let a = up.addr;
    for target in [
        format!("user@{a}"),
        format!("user:pw@{a}"),
        format!("http://{a}/"),
    ] {
        let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {a}\r\n\r\n");
        assert_raw_refused(proxy.addr, &connect, 400, "must be host:port").await;
    }
    up.assert_untouched("CONNECT targets other than host:port");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_parser_refuses_are_counted_as_refusals() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let a = up.addr;
    // A folded header line (obs-fold) and a space before the colon: hyper answers 400 itself.
    let folded = format!("GET http://{a}/f HTTP/1.1\r\nHost: {a}\r\nX-A: 1\r\n  folded\r\n\r\n");
    let spaced = format!("GET http://{a}/s HTTP/1.1\r\nHost: {a}\r\nX-A : 1\r\n\r\n");
    for req in [&folded, &spaced] {
        assert_eq!(
            raw_exchange(proxy.addr, req.as_bytes()).await.status,
            400,
            "{req:?}"
        );
    }
    // More header fields than the parser takes, in a head far below max_header_bytes.
    let many: String = (0..120).map(|i| format!("X-{i}: v\r\n")).collect();
    let req = format!("GET http://{a}/m HTTP/1.1\r\nHost: {a}\r\n{many}\r\n");
    assert_eq!(raw_exchange(proxy.addr, req.as_bytes()).await.status, 431);
    up.assert_untouched("malformed heads");

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = proxy.metrics().await;
        let count = |reason| {
            metric_value(
                &text,
                "ferry_egress_rejections_total",
                &[("reason", reason)],
            )
        };
        if count("bad_request") == Some(2.0) && count("header_too_large") == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "parser refusals not counted:\n{}",
            text.lines()
                .filter(|l| l.contains("rejections"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `curl -x https://…` against this plain-HTTP proxy: its TLS ClientHello is no request line.
/// The access line says what happened instead of the parser's "invalid HTTP method parsed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_speaking_tls_to_the_proxy_is_told_apart_in_the_log() {
    let logs = common::logs::capture();
    let proxy = TestEgress::start(section(&[]), TestResolver::new(&[])).await;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let handshake =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp);
    let result = tokio::time::timeout(TIMEOUT, handshake)
        .await
        .expect("the proxy answers");
    assert!(result.is_err(), "no TLS from a plain-HTTP proxy");
    let reason = "reason=the client spoke TLS to a plain-HTTP proxy (use http:// in the proxy URL)";
    let lines = logs
        .wait_lines(&["status=400", reason], 1, Duration::from_secs(5))
        .await;
    assert!(lines[0].contains("decision=\"refused\""), "{lines:?}");
    assert!(logs.lines_with(&["invalid HTTP method"]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_is_answered_by_the_proxy_and_not_forwarded() {
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let a = up.addr;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST http://{a}/e HTTP/1.1\r\nHost: {a}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let cont = tokio::time::timeout(TIMEOUT, read_response(&mut stream))
        .await
        .expect("an answer to Expect")
        .expect("100 Continue");
    assert_eq!(cont.status, 100, "{cont:?}");
    stream.write_all(b"hello").await.unwrap();
    let resp = tokio::time::timeout(TIMEOUT, read_response(&mut stream))
        .await
        .expect("a response")
        .expect("a response");
    assert_eq!(resp.status, 200, "{resp:?}");
    let got = up.last();
    assert_eq!(&got.body[..], b"hello");
    assert!(
        got.headers.get("expect").is_none(),
        "the upstream was sent {:?}",
        got.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_cannot_forge_a_refusal_or_switch_protocols() {
    let up = RecordingUpstream::start_with(Reply::FakeRefusal).await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let resp = get_via(proxy.addr, &up.url("/forge")).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("ferry-refusal"),
        None,
        "forged refusal passed on"
    );
    assert_eq!(resp.header("x-upstream"), Some("yes"));

    // An upstream that answers 101 to a request whose Upgrade the proxy removed.
    let port = common::servers::canned_server(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: weird\r\nConnection: upgrade\r\n\r\n",
    )
    .await
    .port();
    let proxy = TestEgress::start(
        section(&[format!("127.0.0.1/32:{port}")]),
        TestResolver::new(&[]),
    )
    .await;
    let resp = get_via(proxy.addr, &format!("http://127.0.0.1:{port}/switch")).await;
    assert_refused(&resp, 502, "101 Switching Protocols", "upstream 101");
}

/// Sends `connect` (a CONNECT head) followed by a request meant for the tunnel, and asserts the
/// proxy refuses the CONNECT with `status`, then closes without reading that request.
async fn assert_refused_connect_closes(proxy: SocketAddr, connect: &str, status: u16) {
    let req = format!("{connect}GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(req.as_bytes()).await.unwrap();
    let resp = tokio::time::timeout(TIMEOUT, read_response(&mut stream))
        .await
        .expect("an answer")
        .expect("a refusal");
    assert_eq!(resp.status, status, "{resp:?}");
    assert_eq!(resp.header("connection").as_deref(), Some("close"));
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut rest))
        .await
        .expect("the proxy closes the connection")
        .ok();
    assert!(
        rest.is_empty(),
        "the tunnel bytes were answered: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_closes_the_connection() {
    let up = RecordingUpstream::start().await;
    let mut s = section(&[loopback_rule(&up)]);
    s.max_header_bytes = 4096;
    let proxy = TestEgress::start(s, TestResolver::new(&[])).await;
    // The bytes after the CONNECT were meant for the tunnel: not a request to the proxy.
    let connect = "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n";
    assert_refused_connect_closes(proxy.addr, connect, 403).await;
    // A head over a max_header_bytes below hyper's 8 KiB buffer is refused by the proxy itself.
    let a = up.addr;
    let connect = format!(
        "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nX-Fill: {}\r\n\r\n",
        "f".repeat(6000)
    );
    assert_refused_connect_closes(proxy.addr, &connect, 431).await;
    up.assert_untouched("refused CONNECTs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_is_not_forwarded_or_counted_as_sent() {
    let logs = common::logs::capture();
    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(section(&[loopback_rule(&up)]), TestResolver::new(&[])).await;
    let a = up.addr;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head =
        format!("POST http://{a}/cut HTTP/1.1\r\nHost: {a}\r\nContent-Length: 100000\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b'x'; 50_000]).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut rest)).await;
    // The client went away: a 499 in the log with how far it got, not a refusal it never saw.
    let reason = "reason=client closed the connection after 50000 of 100000 body bytes";
    let lines = logs
        .wait_lines(
            &[&format!("upstream={a}"), reason],
            1,
            Duration::from_secs(5),
        )
        .await;
    assert!(
        lines[0].contains("status=499")
            && lines[0].contains("bytes_in=50000")
            && lines[0].contains("decision=\"abandoned\""),
        "{lines:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = proxy.metrics().await;
        let gone = metric_value(
            &text,
            "ferry_egress_requests_total",
            &[("method", "POST"), ("status_class", "4xx")],
        );
        if gone == Some(1.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "{gone:?}\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let refused = metric_value(
        &text,
        "ferry_egress_requests_total",
        &[("decision", "refused")],
    );
    assert_eq!(refused, None, "{text}");
    assert!(!text.contains("ferry_egress_rejections_total{"), "{text}");
    // `in` counts what went out to upstreams: nothing did (the access log has the 50000 read).
    let bytes_in = metric_value(&text, "ferry_egress_bytes_total", &[("direction", "in")]);
    assert!(matches!(bytes_in, None | Some(0.0)), "{text}");
    up.assert_untouched("a body cut short");
}

/// An upstream on loopback that reads requests and never answers.
async fn silent_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    addr
}

/// The `ferry egress` binary allowing `rule`, logging JSON, with `grace` to drain; once ready.
async fn ready_egress(rule: &str, grace: &str) -> (FerryProcess, SocketAddr) {
    let listen = format!("127.0.0.1:{}", common::external::free_port());
    let ferry = FerryProcess::spawn(&[
        "egress",
        "--web.listen-address",
        &listen,
        "--allow-upstream",
        rule,
        "--log.format",
        "json",
        "--shutdown.grace-period",
        grace,
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while try_get(&format!("http://{listen}/-/ready"), &[])
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "ferry egress never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (ferry, listen.parse().unwrap())
}

fn sigterm(ferry: &FerryProcess) {
    let kill = Command::new("kill")
        .args(["-TERM", &ferry.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

/// An echo server on loopback for tunnels; runs until the test ends.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut rd, mut wr) = sock.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    addr
}

async fn echo(tunnel: &mut TcpStream, data: &[u8]) {
    tunnel.write_all(data).await.unwrap();
    let mut back = vec![0; data.len()];
    tokio::time::timeout(TIMEOUT, tunnel.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("tunnel open");
    assert_eq!(back, data);
}

/// A CONNECT tunnel keeps its client connection's slot and place in the gauges for as long as
/// it is open, and is counted (request, bytes) while it is, not only when it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_hold_their_connection_slot_and_show_in_the_metrics() {
    let echo_addr = echo_server().await;
    let up = RecordingUpstream::start().await;
    let mut s = section(&[
        format!("127.0.0.1/32:{}", echo_addr.port()),
        loopback_rule(&up),
    ]);
    s.max_connections_per_client = 3;
    let proxy = TestEgress::start(s, TestResolver::new(&[])).await;
    let authority = echo_addr.to_string();
    let (resp, mut first) = connect_raw(proxy.addr, &authority, &[]).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let (resp, mut second) = connect_raw(proxy.addr, &authority, &[]).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    echo(&mut first, &[7; 1000]).await;
    echo(&mut second, &[8; 500]).await;

    let text = proxy.metrics().await;
    let value = |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels);
    assert_eq!(value("ferry_egress_open_tunnels", &[]), Some(2.0), "{text}");
    // The two tunnels and the connection asking for /metrics.
    assert_eq!(
        value("ferry_egress_client_connections", &[]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(
            "ferry_egress_requests_total",
            &[("method", "CONNECT"), ("decision", "allowed")]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value("ferry_egress_bytes_total", &[("direction", "in")]),
        Some(1500.0),
        "{text}"
    );
    assert_eq!(
        value("ferry_egress_bytes_total", &[("direction", "out")]),
        Some(1500.0),
        "{text}"
    );

    // The third slot frees once the proxy has seen the /metrics connection close.
    let deadline = Instant::now() + Duration::from_secs(5);
    let _third = loop {
        let (resp, third) = connect_raw(proxy.addr, &authority, &[]).await;
        if resp.status == 200 {
            break third;
        }
        assert_eq!(resp.status, 429, "{resp:?}");
        assert!(
            Instant::now() < deadline,
            "the /metrics connection's slot was never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let fourth = get_via(proxy.addr, &up.url("/fourth")).await;
    assert_refused(
        &fourth,
        429,
        "more than 3 connections",
        "a fourth connection",
    );
    up.assert_untouched("over the cap");

    // Closing a tunnel frees its slot.
    drop(first);
    wait_slot_freed(&proxy, &up, "a closed tunnel").await;
    echo(&mut second, b"still open").await;
}

/// A request still waiting for its upstream when the grace period ends is not lost from the
/// access log: the upstream may have its payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_off_by_the_end_of_the_grace_period_is_logged() {
    let upstream = silent_upstream().await;
    let rule = format!("127.0.0.1/32:{}", upstream.port());
    let (mut ferry, proxy) = ready_egress(&rule, "500ms").await;
    let pending = tokio::spawn(async move {
        post_via(proxy, &format!("http://{upstream}/slow"), &[], b"payload").await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&ferry);
    assert!(
        ferry.collect_until(Duration::from_secs(10), |l| !access_lines(l).is_empty()),
        "no access line"
    );
    let lines = ferry.finish();
    pending.abort();
    let access = access_lines(&lines);
    assert_eq!(access.len(), 1, "{lines:#?}");
    let f = &access[0]["fields"];
    assert_eq!(f["method"], "POST", "{f}");
    assert_eq!(f["status"], 499, "{f}");
    // The same record is counted: see the next test, where /metrics can be read afterwards.
    assert_eq!(f["bytes_in"], 7, "{f}");
    assert!(
        f["reason"]
            .as_str()
            .is_some_and(|r| r.contains("unfinished")),
        "{f}"
    );
}

/// A client that gives up while the upstream is still answering: its request is counted (as the
/// 499 of its access line), not lost from the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_went_away_is_counted() {
    let upstream = silent_upstream().await;
    let proxy = TestEgress::start(
        section(&[format!("127.0.0.1/32:{}", upstream.port())]),
        TestResolver::new(&[]),
    )
    .await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("GET http://{upstream}/slow HTTP/1.1\r\nHost: {upstream}\r\n\r\n");
    client.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = proxy.metrics().await;
        let unfinished = metric_value(
            &text,
            "ferry_egress_requests_total",
            &[("method", "GET"), ("status_class", "4xx")],
        );
        if unfinished == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "{unfinished:?}\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that leaves before the proxy decided — here while the rule's name lookup hangs — was
/// never let through: its line and its count say `abandoned`, not `allowed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_decision_is_abandoned_not_allowed() {
    let logs = common::logs::capture();
    let resolver = TestResolver::new(&[]);
    resolver.stall("stuck.example");
    let proxy = TestEgress::start(section(&["10.0.0.0/8:80".to_owned()]), resolver.clone()).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let head = "GET http://stuck.example/x HTTP/1.1\r\nHost: stuck.example\r\n\r\n";
    client.write_all(head.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while resolver.calls("stuck.example") == 0 {
        assert!(
            Instant::now() < deadline,
            "the proxy never looked the name up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    let lines = logs
        .wait_lines(
            &["upstream=stuck.example", "status=499"],
            1,
            Duration::from_secs(5),
        )
        .await;
    assert!(
        lines[0].contains("decision=\"abandoned\"") && lines[0].contains("rule=-"),
        "{lines:?}"
    );
    let text = proxy.metrics().await;
    let abandoned = metric_value(
        &text,
        "ferry_egress_requests_total",
        &[("method", "GET"), ("decision", "abandoned")],
    );
    assert_eq!(abandoned, Some(1.0), "{text}");
    let allowed = metric_value(
        &text,
        "ferry_egress_requests_total",
        &[("decision", "allowed")],
    );
    assert_eq!(allowed, None, "{text}");
}

/// A client that leaves in the middle of a response body: its access line keeps the upstream's
/// status and says where the body was cut off; one that read its whole answer has no reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_the_client_left_is_logged_with_a_reason() {
    let endless = TargetServer::start(Behaviour::Large { bytes: 1 << 40 }).await;
    let up = RecordingUpstream::start().await;
    let rule = format!("127.0.0.1/32:{},{}", endless.addr.port(), up.port());
    let (mut ferry, proxy) = ready_egress(&rule, "5s").await;
    assert_eq!(get_via(proxy, &up.url("/whole")).await.status, 200);
    let mut client = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "GET http://{0}/endless HTTP/1.1\r\nHost: {0}\r\n\r\n",
        endless.addr
    );
    client.write_all(head.as_bytes()).await.unwrap();
    let mut some = vec![0; 200_000];
    tokio::time::timeout(TIMEOUT, client.read_exact(&mut some))
        .await
        .expect("the body streams")
        .unwrap();
    drop(client);
    assert!(
        ferry.collect_until(Duration::from_secs(10), |l| access_lines(l).len() >= 2),
        "two access lines"
    );
    let lines = ferry.finish();
    let access = access_lines(&lines);
    let line = |upstream: SocketAddr| {
        access
            .iter()
            .map(|a| &a["fields"])
            .find(|f| f["upstream"] == upstream.to_string())
            .unwrap_or_else(|| panic!("no line for {upstream}: {lines:#?}"))
    };
    let whole = line(up.addr);
    assert_eq!(whole["reason"], "", "{whole}");
    let cut = line(endless.addr);
    assert_eq!(cut["status"], 200, "{cut}");
    let sent = cut["bytes_out"].as_u64().unwrap_or_default();
    assert!(sent >= 200_000, "{cut}");
    assert_eq!(
        cut["reason"].as_str(),
        Some(
            format!(
                "response body cut off after {sent} bytes: the client went away or the proxy stopped"
            )
            .as_str()
        ),
        "{cut}"
    );
}

/// An upstream that answers chunked and ends its body with trailers sent a complete body: the
/// access line has no cut-off reason and counts every body byte, and the client's connection
/// carries its next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_with_trailers_is_logged_complete() {
    let logs = common::logs::capture();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let body = "0123456789abcdefghij0123456789abcde";
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0; 4096];
        for _ in 0..2 {
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0, "the proxy closed the upstream connection");
                seen.extend_from_slice(&buf[..n]);
            }
            seen.clear();
            let reply = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Trailer\r\n\r\n{:x}\r\n{body}\r\n0\r\nX-Trailer: t\r\n\r\n",
                body.len()
            );
            conn.write_all(reply.as_bytes()).await.unwrap();
        }
    });
    let proxy = TestEgress::start(
        section(&[format!("127.0.0.1/32:{}", up.port())]),
        TestResolver::new(&[]),
    )
    .await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for path in ["/first", "/second"] {
        let req = absolute("GET", &format!("http://{up}{path}"), &[], Vec::new());
        let exchange = async {
            sender
                .ready()
                .await
                .expect("the connection is still usable");
            let resp = sender.send_request(req).await.expect("an answer");
            let status = resp.status();
            let collected = resp.into_body().collect().await.expect("the whole body");
            (status, collected.to_bytes())
        };
        let (status, got) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .expect("the answer arrives on the kept-alive connection");
        assert_eq!(status, 200, "{path}");
        assert_eq!(got, body.as_bytes(), "{path}");
    }
    let lines = logs
        .wait_lines(
            &[&format!("upstream={up}"), "status=200"],
            2,
            Duration::from_secs(5),
        )
        .await;
    for line in &lines {
        assert!(!line.contains("cut off"), "{line}");
        assert!(
            line.contains(&format!("bytes_out={}", body.len())),
            "{line}"
        );
    }
}

/// SIGTERM: an open tunnel is closed once quiet and gets its access-log line (bytes, reason),
/// and the process exits well within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_open_tunnels_are_closed_and_logged() {
    let echo_addr = echo_server().await;
    let rule = format!("127.0.0.1/32:{}", echo_addr.port());
    let (mut ferry, proxy) = ready_egress(&rule, "30s").await;
    let (resp, mut tunnel) = connect_raw(proxy, &echo_addr.to_string(), &[]).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    echo(&mut tunnel, &[1; 1234]).await;

    let stopping = Instant::now();
    sigterm(&ferry);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut rest))
        .await
        .expect("the tunnel is closed at shutdown")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let exited = loop {
        if let Some(status) = ferry.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM with a grace period of 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exited.success(), "{exited:?}");
    let lines = ferry.finish();
    let access = access_lines(&lines);
    assert_eq!(access.len(), 1, "{lines:#?}");
    let f = &access[0]["fields"];
    assert_eq!(f["method"], "CONNECT", "{f}");
    assert_eq!(f["bytes_in"], 1234, "{f}");
    assert_eq!(f["bytes_out"], 1234, "{f}");
    assert!(
        f["reason"].as_str().is_some_and(|r| r.contains("shutdown")),
        "{f}"
    );
}

/// A client that stops reading a response (a full receive window, nothing taken) is
/// disconnected after `upstream_timeout` without progress, and the upstream connection behind
/// it is closed with it: it cannot hold either for as long as it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_frees_the_upstream() {
    let logs = common::logs::capture();
    let endless = TargetServer::start(Behaviour::Large { bytes: 1 << 40 }).await;
    let mut cfg = section(&[format!("127.0.0.1/32:{}", endless.addr.port())]);
    cfg.upstream_timeout = serde_yaml_ng::from_str("1s").unwrap();
    let proxy = TestEgress::start(cfg, TestResolver::new(&[])).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let e = endless.addr;
    let head = format!("GET http://{e}/endless HTTP/1.1\r\nHost: {e}\r\n\r\n");
    client.write_all(head.as_bytes()).await.unwrap();
    let mut some = vec![0; 100_000];
    tokio::time::timeout(TIMEOUT, client.read_exact(&mut some))
        .await
        .expect("the body streams")
        .unwrap();
    // The client keeps its connection open and reads nothing more.
    let lines = logs
        .wait_lines(
            &[
                &format!("upstream={e}"),
                "the client's connection took no more of it for 1s (upstream_timeout;",
            ],
            1,
            Duration::from_secs(10),
        )
        .await;
    assert!(lines[0].contains("status=200"), "{lines:?}");
    let upstreams = [("listener", "upstreams")];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = proxy.metrics().await;
        let open = metric_value(&text, "ferry_egress_connections_open", &upstreams);
        if open.unwrap_or(0.0) == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "upstream still open:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What the proxy had written before it gave up is still the client's; then the end.
    let mut rest = Vec::new();
    let drained = tokio::time::timeout(TIMEOUT, client.read_to_end(&mut rest)).await;
    assert!(drained.is_ok(), "the connection is closed");
}

/// An upstream that answers with a head and a body broken before its first byte (a malformed
/// chunk size): the client gets a 502 that says so, not an empty reply logged as a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_broken_at_once_is_a_502_with_its_reason() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && sock.read_exact(&mut byte).await.is_ok() {
                    head.push(byte[0]);
                }
                let reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
                let _ = sock.write_all(reply).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        }
    });
    let proxy = TestEgress::start(
        section(&[format!("127.0.0.1/32:{}", up.port())]),
        TestResolver::new(&[]),
    )
    .await;
    let resp = get_via(proxy.addr, &format!("http://{up}/broken")).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    let reason = resp.header("ferry-refusal").unwrap_or_default().to_owned();
    assert!(
        reason.starts_with(
            "upstream 127.0.0.1 answered 200 OK and its body broke before any of it was sent: "
        ),
        "{reason}"
    );
    proxy.assert_rejections("upstream_error", 1.0).await;
}

/// A pooled upstream connection left unused for `upstream_idle_timeout` is closed even if its
/// destination is never used again (the pool's own timer), before a collector's keep-alive
/// runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_closed_after_the_idle_timeout() {
    let up = RecordingUpstream::start().await;
    let mut cfg = section(&[loopback_rule(&up)]);
    cfg.upstream_idle_timeout = serde_yaml_ng::from_str("300ms").unwrap();
    let proxy = TestEgress::start(cfg, TestResolver::new(&[])).await;
    assert_eq!(get_via(proxy.addr, &up.url("/a")).await.status, 200);
    let upstreams = [("listener", "upstreams")];
    let text = proxy.metrics().await;
    assert_eq!(
        metric_value(&text, "ferry_egress_connections_open", &upstreams),
        Some(1.0),
        "pooled after the request:\n{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = proxy.metrics().await;
        if metric_value(&text, "ferry_egress_connections_open", &upstreams) == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "still pooled:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A request after that opens a new connection and works.
    assert_eq!(get_via(proxy.addr, &up.url("/b")).await.status, 200);
    assert_eq!(up.connections(), 2);
}

/// An upstream that cannot be reached fails an allowed request: a 502, counted and logged as
/// `decision="error"`, not as the policy's `refused` (an alert on refusals is about the rules).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_an_error_not_a_refusal() {
    let logs = common::logs::capture();
    // A port nothing listens on any more: the connection is refused.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = TestEgress::start(
        section(&[format!("127.0.0.1/32:{}", closed.port())]),
        TestResolver::new(&[]),
    )
    .await;
    let resp = get_via(proxy.addr, &format!("http://{closed}/x")).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    let lines = logs
        .wait_lines(
            &[&format!("upstream={closed}"), "status=502"],
            1,
            Duration::from_secs(5),
        )
        .await;
    assert!(lines[0].contains("decision=\"error\""), "{lines:?}");
    let text = proxy.metrics().await;
    let count = |decision| {
        metric_value(
            &text,
            "ferry_egress_requests_total",
            &[("status_class", "5xx"), ("decision", decision)],
        )
    };
    assert_eq!(count("error"), Some(1.0), "{text}");
    assert_eq!(count("refused"), None, "{text}");
    proxy.assert_rejections("upstream_error", 1.0).await;
}
