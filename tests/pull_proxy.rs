//! The agent's way to the gateway through an HTTP CONNECT proxy (`--proxy-url`): credentials
//! from the URL, and what the agent logs and how soon it retries when the proxy refuses or does
//! not answer — judged by what the proxy received and what an operator reads in the log.

mod common;

use std::time::Duration;

use common::egress::{TestEgress, TestResolver};
use common::ferry::{
    agent_section, metric_value, start_agent, start_agent_in_env, start_gateway, tokens_file,
    TestGateway,
};
use common::servers::{Behaviour, TargetServer};
use ferry::config::{Dur, EgressSection};
use tempfile::TempDir;

const TOKEN: &str = "t";
const WAIT: Duration = Duration::from_secs(10);

/// ferry egress allowing CONNECT to `gw`'s tunnel port, for clients with the credentials
/// `(user, password)` given.
async fn egress_to(gw: &TestGateway, dir: &TempDir, users: &[(&str, &str)]) -> TestEgress {
    let mut section = EgressSection {
        allow_upstreams: vec![format!("127.0.0.1/32:{}", gw.tunnel.port())],
        ..EgressSection::default()
    };
    if !users.is_empty() {
        section.auth.credentials_file = Some(tokens_file(dir.path(), users));
    }
    TestEgress::start(section, TestResolver::new(&[("localhost", &["127.0.0.1"])])).await
}

/// How often ferry egress refused with `reason` (`credentials`, `destination_not_allowed`).
async fn rejections(egress: &TestEgress, reason: &str) -> f64 {
    let m = egress.metrics().await;
    metric_value(&m, "ferry_egress_rejections_total", &[("reason", reason)]).unwrap_or(0.0)
}

/// A user and password with `@` and `:` in them, percent-encoded in the URL as curl and
/// Prometheus expect, reach the proxy decoded: ferry egress lets the agent through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_proxy_credentials_are_sent_decoded() {
    let (dir, creds) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let egress = egress_to(&gw, &creds, &[("us@er", "p:ss")]).await;
    let target = TargetServer::start(Behaviour::Metrics("up 1\n".into())).await;

    let mut section = agent_section(&gw, "encoded", &[("node", target.url("/metrics"))]);
    section.proxy_url = Some(format!("http://us%40er:p%3Ass@{}", egress.addr));
    let agent = start_agent(section, TOKEN);
    gw.wait_agent("encoded", WAIT).await;
    assert_eq!(rejections(&egress, "credentials").await, 0.0);

    agent.stop().await;
    gw.stop().await;
}

/// A 407 is the gateway's 401 of the proxy: logged as an error naming the proxy's reason, and
/// retried at the slow pace, not every few hundred milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_proxy_credentials_are_logged_loudly_and_retried_slowly() {
    let logs = common::logs::capture();
    let (dir, creds) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let egress = egress_to(&gw, &creds, &[("agent", "right")]).await;

    let mut section = agent_section(&gw, "wrong-proxy-pw", &[]);
    section.proxy_url = Some(format!("http://agent:wrong@{}", egress.addr));
    section.reconnect.auth_failure_backoff = Dur(Duration::from_secs(30));
    let agent = start_agent(section, TOKEN);
    let lines = logs
        .wait_lines(&["PROXY REFUSED OUR CREDENTIALS"], 1, WAIT)
        .await;
    assert!(
        lines[0].contains("ERROR")
            && lines[0].contains(&format!("proxy {} refused CONNECT", egress.addr))
            && lines[0].contains("407 Proxy Authentication Required: invalid proxy credentials"),
        "{lines:?}"
    );
    common::logs::assert_slow_retry(&lines[0], Duration::from_secs(30));
    // The fast backoff (at most 300 ms here) would have tried again several times.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rejections(&egress, "credentials").await, 1.0);
    assert!(gw.agent_ids().is_empty());

    agent.stop().await;
    gw.stop().await;
}

/// A refusal carries the proxy's reason: ferry egress's `ferry-refusal` header, another proxy's
/// first body line — one bounded line, never the whole page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_logged_with_the_proxys_reason() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;

    // ferry egress without a rule for the gateway.
    let closed = TestEgress::start(EgressSection::default(), TestResolver::new(&[])).await;
    let mut section = agent_section(&gw, "no-rule", &[]);
    section.proxy_url = Some(format!("http://{}", closed.addr));
    let no_rule = start_agent(section, TOKEN);
    let refused = format!(
        "proxy {} refused CONNECT localhost:{}",
        closed.addr,
        gw.tunnel.port()
    );
    let lines = logs
        .wait_lines(&["cannot open tunnel", &refused], 1, WAIT)
        .await;
    assert!(
        lines[0].contains("403 Forbidden: destination") && lines[0].contains("is not allowed"),
        "{lines:?}"
    );
    no_rule.stop().await;

    // Another proxy explains in its body, on more lines than belong in a log line.
    let squid = common::servers::canned_server(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 47\r\nConnection: close\r\n\r\nAccess denied by policy 7\r\nContact the admins\r\n",
    )
    .await;
    let mut section = agent_section(&gw, "policy", &[]);
    section.proxy_url = Some(format!("http://{squid}"));
    let policy = start_agent(section, TOKEN);
    let lines = logs
        .wait_lines(
            &["cannot open tunnel", &format!("proxy {squid} refused")],
            1,
            WAIT,
        )
        .await;
    assert!(
        lines[0].contains("403 Forbidden: Access denied by policy 7")
            && !lines[0].contains("Contact the admins"),
        "{lines:?}"
    );
    policy.stop().await;
    gw.stop().await;
}

/// A proxy that takes the connection and never answers the CONNECT is named, with the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_never_answers_connect_is_named() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });

    let mut section = agent_section(&gw, "unanswered", &[]);
    section.proxy_url = Some(format!("http://{silent_addr}"));
    section.tunnel.handshake_timeout = Dur(Duration::from_secs(1));
    let agent = start_agent(section, TOKEN);
    let said = format!(
        "proxy {silent_addr} did not answer CONNECT to localhost:{} within 1s",
        gw.tunnel.port()
    );
    logs.wait_lines(&["cannot open tunnel", &said], 1, WAIT)
        .await;

    agent.stop().await;
    held.abort();
    gw.stop().await;
}

/// A proxy that cannot be reached is named as the proxy, with where it was configured: a stale
/// `HTTPS_PROXY` is not taken for the gateway being down. The start says which proxy the tunnel
/// goes through, or that `NO_PROXY` exempts the gateway from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_proxy_is_named_with_where_it_was_configured() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{closed}");

    let env = [("HTTPS_PROXY", url.as_str())];
    let stale = start_agent_in_env(agent_section(&gw, "stale", &[]), TOKEN, &env);
    let start = logs
        .wait_lines(&["the tunnel goes through an HTTP CONNECT proxy"], 1, WAIT)
        .await;
    assert!(
        start[0].contains("INFO")
            && start[0].contains(&format!("proxy={closed}"))
            && start[0].contains("from=HTTPS_PROXY"),
        "{start:?}"
    );
    let refused =
        format!("cannot connect to proxy {closed} (from HTTPS_PROXY): Connection refused");
    logs.wait_lines(&["cannot open tunnel", &refused], 1, WAIT)
        .await;
    stale.stop().await;

    let mut section = agent_section(&gw, "configured", &[]);
    section.proxy_url = Some(url.clone());
    let configured = start_agent(section, TOKEN);
    let refused = format!("cannot connect to proxy {closed} (from proxy_url): Connection refused");
    logs.wait_lines(&["cannot open tunnel", &refused], 1, WAIT)
        .await;
    configured.stop().await;

    let env = [("HTTPS_PROXY", url.as_str()), ("NO_PROXY", "localhost")];
    let exempted = start_agent_in_env(agent_section(&gw, "exempted", &[]), TOKEN, &env);
    gw.wait_agent("exempted", WAIT).await;
    let direct = logs
        .lines_with(&["the tunnel goes to the gateway directly: NO_PROXY exempts it from the proxy of HTTPS_PROXY"]);
    assert_eq!(direct.len(), 1, "{direct:?}");
    exempted.stop().await;
    gw.stop().await;
}
