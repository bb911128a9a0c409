//! The scrape path on loopback: Prometheus's absolute-form request → gateway web listener →
//! TLS tunnel → agent → a real target server, and every refusal along the way.
//!
//! Each test starts its own gateway, agent and targets in-process on 127.0.0.1 port 0, and asserts
//! what a user sees: status codes, one-line reasons, bodies, the gateway's `/metrics`, and what
//! the target server itself received.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::egress::{raw_exchange, read_response, RawResp};
use common::ferry::{
    agent_on_bare_tunnel, agent_publishing, agent_section, gateway_and_agent, metric_value,
    start_agent, start_gateway, tunnel_tls, upgrade_as_agent, TestAgent, TestGateway,
};
use common::http::{self as client, get_via_proxy, get_via_proxy_streaming, Resp};
use common::servers::{
    gunzip, large_body_digest, Behaviour, BodyDigest, RawTarget, TargetServer, METRICS_CONTENT_TYPE,
};
use ferry::config::{Dur, TargetSection};
use ferry::tunnel::handshake::HandshakeError;
use http::{header, Request};
use http_body_util::Full;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

const AGENT: &str = "node-1";
const BODY: &str =
    "# HELP up Whether the target is up.\n# TYPE up gauge\nup 1\nnode_load1{cpu=\"all\"} 0.25\n";
const TIMEOUT_HEADER: &str = "X-Prometheus-Scrape-Timeout-Seconds";
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// A gateway, agent `node-1` and one target server `node` behind it.
struct Setup {
    _dir: TempDir,
    gw: TestGateway,
    agent: TestAgent,
    target: TargetServer,
}

impl Setup {
    async fn start(behaviour: Behaviour) -> Setup {
        let dir = TempDir::new().unwrap();
        let target = TargetServer::start(behaviour).await;
        let (gw, agent) = gateway_and_agent(&dir, AGENT, &[("node", target.url("/metrics"))]).await;
        Setup {
            _dir: dir,
            gw,
            agent,
            target,
        }
    }

    /// `http://node-1:<target port><path_and_query>`: how Prometheus addresses the target.
    fn url(&self, path_and_query: &str) -> String {
        format!("http://{AGENT}:{}{path_and_query}", self.target.addr.port())
    }

    async fn scrape(&self, path_and_query: &str, headers: &[(&str, &str)]) -> Resp {
        get_via_proxy(self.gw.web, &self.url(path_and_query), headers).await
    }

    async fn stop(self) {
        self.agent.stop().await;
        self.gw.stop().await;
    }
}

async fn gateway_metrics(gw: &TestGateway) -> String {
    client::get(&format!("{}/metrics", gw.web_url()))
        .await
        .text()
}

/// Polls `url` (a `/metrics` endpoint) until `name{labels}` satisfies `ok`; returns the value.
/// Panics with the last exposition after 10 s.
async fn wait_metric(
    url: &str,
    name: &str,
    labels: &[(&str, &str)],
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let start = Instant::now();
    loop {
        let text = client::get(url).await.text();
        if let Some(v) = metric_value(&text, name, labels).filter(|v| ok(*v)) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{name}{labels:?} never as expected; last exposition:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A refusal body: exactly one line of text, ending in a newline.
fn assert_one_line(resp: &Resp) -> String {
    let text = resp.text();
    assert!(
        text.ends_with('\n') && text.lines().count() == 1,
        "not a one-line reason: {text:?}"
    );
    assert!(
        resp.header("content-type")
            .is_some_and(|ct| ct.starts_with("text/plain")),
        "{:?}",
        resp.headers
    );
    text.trim_end().to_owned()
}

/// Serves the agent's own `/metrics` on a fresh loopback listener; returns its URL.
async fn agent_metrics_url(agent: &TestAgent) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let (a, shutdown) = (agent.agent.clone(), agent.shutdown.clone());
    tokio::spawn(async move { a.serve_web(listener, shutdown).await });
    url
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_returns_the_target_body_and_sd_lists_every_target_with_labels() {
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Metrics(BODY.into())).await;
    let gw = start_gateway(&dir, &[("*", "tok")], |_| {}).await;
    let mut section = agent_section(&gw, AGENT, &[]);
    section.labels = labels(&[("dc", "fra1"), ("env", "prod")]);
    section.targets = vec![TargetSection {
        name: "node".into(),
        url: target.url("/metrics"),
        labels: labels(&[("env", "staging"), ("team", "db")]),
        ..TargetSection::default()
    }];
    let agent = start_agent(section, "tok");
    gw.wait_agent(AGENT, CONNECT_WAIT).await;
    let port = target.addr.port();

    let resp = get_via_proxy(gw.web, &format!("http://{AGENT}:{port}/metrics"), &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.body,
        Bytes::from(BODY),
        "body must arrive byte-identical"
    );
    assert_eq!(resp.header("content-type"), Some(METRICS_CONTENT_TYPE));
    assert_eq!(target.paths(), vec!["/metrics".to_owned()]);

    // The built-in target serves the agent's own metrics through the same tunnel.
    let own = get_via_proxy(gw.web, &format!("http://{AGENT}:9369/metrics"), &[]).await;
    assert_eq!(own.status, 200, "{}", own.text());
    assert_eq!(
        metric_value(&own.text(), "ferry_agent_tunnel_up", &[]),
        Some(1.0),
        "{}",
        own.text()
    );

    // Sorted by target name.
    let expected = json!([
        {"targets": [format!("{AGENT}:9369")],
         "labels": {"__metrics_path__": "/metrics", "ferry_agent": AGENT, "ferry_target": "ferry",
                    "dc": "fra1", "env": "prod"}},
        {"targets": [format!("{AGENT}:{port}")],
         "labels": {"__metrics_path__": "/metrics", "ferry_agent": AGENT, "ferry_target": "node",
                    "dc": "fra1", "env": "staging", "team": "db"}},
    ]);
    for endpoint in ["/targets", "/clients"] {
        let sd = client::get(&format!("{}{endpoint}", gw.web_url())).await;
        assert_eq!(sd.status, 200, "{endpoint}");
        assert_eq!(
            sd.header("content-type"),
            Some("application/json"),
            "{endpoint}"
        );
        let mut groups: Value = serde_json::from_slice(&sd.body)
            .unwrap_or_else(|e| panic!("{endpoint}: {e}: {}", sd.text()));
        groups
            .as_array_mut()
            .expect("an array of groups")
            .sort_by_key(|g| g["labels"]["ferry_target"].to_string());
        assert_eq!(groups, expected, "{endpoint}");
    }

    agent.stop().await;
    gw.stop().await;
}

/// Past `tunnel.max_concurrent_scrapes` scrapes of one agent the gateway answers 503 at once
/// (HTTP/2 would otherwise queue them without bound); a place is free again once a scrape's
/// body has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_past_the_per_agent_limit_are_refused_at_once() {
    let dir = TempDir::new().unwrap();
    let slow = TargetServer::start(Behaviour::Slow {
        delay: Duration::from_millis(800),
        body: BODY.into(),
    })
    .await;
    let gw = start_gateway(&dir, &[("*", "test-token")], |s| {
        s.tunnel.max_concurrent_scrapes = 2;
    })
    .await;
    let agent = start_agent(
        agent_section(&gw, AGENT, &[("slow", slow.url("/metrics"))]),
        "test-token",
    );
    gw.wait_agent(AGENT, CONNECT_WAIT).await;
    let url = format!("http://{AGENT}:{}/metrics", slow.addr.port());
    let web = gw.web;
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get_via_proxy(web, &url, &[]).await })
        })
        .collect();
    // Both are at the target before the third comes.
    let started = Instant::now();
    while slow.requests() < 2 {
        assert!(
            started.elapsed() < CONNECT_WAIT,
            "the two scrapes never reached the target"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = get_via_proxy(web, &url, &[]).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(
        refused.text(),
        format!("agent \"{AGENT}\" has 2 scrapes in flight already (the gateway's tunnel.max_concurrent_scrapes): try again later\n")
    );
    assert_eq!(slow.requests(), 2, "the refused scrape reached the target");
    for scrape in in_flight {
        assert_eq!(scrape.await.unwrap().status, 200);
    }
    assert_eq!(get_via_proxy(web, &url, &[]).await.status, 200);
    agent.stop().await;
    gw.stop().await;
}

/// A fleet refused at once (a tokens file broken by a deploy) must not come back at once: each
/// agent's slow retry is drawn from half to all of `auth_failure_backoff`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_refused_together_retry_at_different_times() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", "right-token")], |_| {}).await;
    let slow = Duration::from_secs(60);
    let agents: Vec<_> = (0..3)
        .map(|i| {
            let mut section = agent_section(&gw, &format!("refused-{i}"), &[]);
            section.reconnect.auth_failure_backoff = Dur(slow);
            start_agent(section, "wrong-token")
        })
        .collect();
    let lines = logs
        .wait_lines(&["GATEWAY REFUSED OUR CREDENTIALS"], 3, CONNECT_WAIT)
        .await;
    let mut delays: Vec<Duration> = lines.iter().map(|l| common::logs::retry_in(l)).collect();
    for line in &lines {
        common::logs::assert_slow_retry(line, slow);
    }
    delays.sort();
    delays.dedup();
    assert_eq!(delays.len(), 3, "the same delay twice: {lines:#?}");

    for agent in agents {
        agent.stop().await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_never_registers_the_agent() {
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Metrics(BODY.into())).await;
    let gw = start_gateway(&dir, &[("*", "right-token")], |_| {}).await;
    let agent = start_agent(
        agent_section(&gw, AGENT, &[("node", target.url("/metrics"))]),
        "wrong-token",
    );
    let agent_url = agent_metrics_url(&agent).await;

    let gw_url = format!("{}/metrics", gw.web_url());
    wait_metric(
        &gw_url,
        "ferry_gateway_tunnel_handshakes_total",
        &[("result", "unauthorized")],
        |v| v >= 1.0,
    )
    .await;
    wait_metric(
        &agent_url,
        "ferry_agent_tunnel_connects_total",
        &[("result", "auth_refused")],
        |v| v >= 1.0,
    )
    .await;

    let text = gateway_metrics(&gw).await;
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_tunnel_handshakes_total",
            &[("result", "ok")]
        ),
        None,
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "ferry_gateway_agents_connected", &[]),
        Some(0.0),
        "{text}"
    );
    assert!(gw.agent_ids().is_empty(), "{:?}", gw.agent_ids());
    assert!(!agent.agent.is_connected());
    let sd = client::get(&format!("{}/targets", gw.web_url())).await;
    assert_eq!(sd.text(), "[]");
    let resp = get_via_proxy(
        gw.web,
        &format!("http://{AGENT}:{}/metrics", target.addr.port()),
        &[],
    )
    .await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(target.requests(), 0);

    agent.stop().await;
    gw.stop().await;
}

/// A client trying tokens in a loop does not flood the gateway's log: the first refusals of a
/// minute are warned about, the rest only counted; every one is still a 401 and a handshake
/// counted `unauthorized`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trying_tokens_in_a_loop_is_warned_about_a_few_times_a_minute() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", "right-token")], |_| {}).await;
    for i in 0..25 {
        match raw_upgrade(&gw, &format!("guess-{i}"), "guesser-1").await {
            Err(HandshakeError::Refused { status, .. }) if status == 401 => {}
            other => panic!("guess {i}: expected 401, got {other:?}"),
        }
    }
    let text = gateway_metrics(&gw).await;
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_tunnel_handshakes_total",
            &[("result", "unauthorized")]
        ),
        Some(25.0),
        "{text}"
    );
    let warned = logs.lines_with(&["WARN", "tunnel refused", "guesser-1"]);
    assert_eq!(warned.len(), 10, "{warned:#?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_outside_the_tokens_glob_is_forbidden_while_a_matching_id_connects() {
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Metrics(BODY.into())).await;
    let gw = start_gateway(&dir, &[("web-*", "web-token")], |_| {}).await;
    let intruder = start_agent(
        agent_section(&gw, "db-1", &[("node", target.url("/metrics"))]),
        "web-token",
    );
    let intruder_url = agent_metrics_url(&intruder).await;
    let allowed = start_agent(
        agent_section(&gw, "web-1", &[("node", target.url("/metrics"))]),
        "web-token",
    );

    gw.wait_agent("web-1", CONNECT_WAIT).await;
    let gw_url = format!("{}/metrics", gw.web_url());
    wait_metric(
        &gw_url,
        "ferry_gateway_tunnel_handshakes_total",
        &[("result", "forbidden")],
        |v| v >= 1.0,
    )
    .await;
    wait_metric(
        &intruder_url,
        "ferry_agent_tunnel_connects_total",
        &[("result", "auth_refused")],
        |v| v >= 1.0,
    )
    .await;

    assert_eq!(gw.agent_ids(), vec!["web-1".to_owned()]);
    assert!(!intruder.agent.is_connected());
    let resp = get_via_proxy(
        gw.web,
        &format!("http://db-1:{}/metrics", target.addr.port()),
        &[],
    )
    .await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(target.requests(), 0);

    intruder.stop().await;
    allowed.stop().await;
    gw.stop().await;
}

/// A gateway letting `own-token` claim only the id `AGENT` and `group-token` any `node-*`, and two
/// targets told apart by their body, which either agent serves at the same address: only the
/// tunnel decides who answers `url`.
struct Claimants {
    _dir: TempDir,
    gw: TestGateway,
    own: TargetServer,
    other: TargetServer,
    url: String,
}

impl Claimants {
    async fn start() -> Claimants {
        let dir = TempDir::new().unwrap();
        let gw = start_gateway(
            &dir,
            &[(AGENT, "own-token"), ("node-*", "group-token")],
            |_| {},
        )
        .await;
        Claimants {
            _dir: dir,
            gw,
            own: TargetServer::start(Behaviour::Metrics("which 1\n".into())).await,
            other: TargetServer::start(Behaviour::Metrics("which 2\n".into())).await,
            url: format!("http://{AGENT}:9100/metrics"),
        }
    }

    /// An agent claiming `AGENT` with `token`, serving `server` at port 9100.
    fn agent(&self, server: &TargetServer, token: &str) -> TestAgent {
        let mut s = agent_section(&self.gw, AGENT, &[("node", server.url("/metrics"))]);
        s.targets[0].port = Some(9100);
        start_agent(s, token)
    }
}

/// A second token whose glob covers a connected agent's id (a group token on another host) is
/// refused with 409 and cannot take the tunnel over; the agent holding it never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_connected_with_another_token_is_409_and_the_first_agent_keeps_it() {
    let logs = common::logs::capture();
    let c = Claimants::start().await;
    let (gw, url, other) = (&c.gw, &c.url, &c.other);
    let first = c.agent(&c.own, "own-token");
    gw.wait_agent(AGENT, CONNECT_WAIT).await;
    let first_url = agent_metrics_url(&first).await;

    let intruder = c.agent(other, "group-token");
    let intruder_url = agent_metrics_url(&intruder).await;
    let gw_url = format!("{}/metrics", gw.web_url());
    wait_metric(
        &gw_url,
        "ferry_gateway_tunnel_handshakes_total",
        &[("result", "conflict")],
        |v| v >= 1.0,
    )
    .await;
    wait_metric(
        &intruder_url,
        "ferry_agent_tunnel_connects_total",
        &[("result", "conflict")],
        |v| v >= 1.0,
    )
    .await;
    let refused = logs
        .wait_lines(&["GATEWAY REFUSED OUR AGENT ID"], 1, CONNECT_WAIT)
        .await;
    assert!(
        refused[0].contains(&format!(
            "gateway refused the tunnel with 409 Conflict: agent id \"{AGENT}\" is connected from 127.0.0.1:"
        )) && refused[0].contains("with another token"),
        "{refused:?}"
    );
    assert!(!intruder.agent.is_connected());

    // The reason, as any client claiming the id with that token reads it.
    match raw_upgrade(gw, "group-token", AGENT).await {
        Err(HandshakeError::Refused { status, reason, .. }) => {
            assert_eq!(status.as_u16(), 409, "{reason}");
            assert!(
                reason.starts_with(&format!(
                    "agent id \"{AGENT}\" is connected from 127.0.0.1:"
                )) && reason.ends_with(" with another token"),
                "{reason:?}"
            );
        }
        other => panic!("expected 409, got {other:?}"),
    }
    // The holder's own token still gets through: an agent restarting replaces its old tunnel.
    raw_upgrade(gw, "own-token", AGENT)
        .await
        .expect("the same token is upgraded");

    for _ in 0..3 {
        let resp = get_via_proxy(gw.web, url, &[]).await;
        assert_eq!((resp.status, resp.text().as_str()), (200, "which 1\n"));
    }
    assert_eq!(other.requests(), 0, "the intruder was scraped");
    assert_eq!(gw.agent_ids(), vec![AGENT.to_owned()]);
    let text = client::get(&first_url).await.text();
    assert_eq!(
        metric_value(
            &text,
            "ferry_agent_tunnel_connects_total",
            &[("result", "ok")]
        ),
        Some(1.0),
        "the first agent lost its tunnel: {text}"
    );
    let text = gateway_metrics(gw).await;
    assert_eq!(
        metric_value(&text, "ferry_gateway_tunnels_replaced_total", &[]),
        Some(0.0),
        "{text}"
    );

    intruder.stop().await;
    first.stop().await;
    c.gw.stop().await;
}

/// A group token that took an id while its agent was away gives it back: the agent whose token
/// names the id exactly replaces the squatter, which is told why (and backs off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_naming_the_id_exactly_takes_it_back_from_a_glob_token() {
    let logs = common::logs::capture();
    let c = Claimants::start().await;
    let (gw, url) = (&c.gw, &c.url);
    let squatter = c.agent(&c.other, "group-token");
    gw.wait_agent(AGENT, CONNECT_WAIT).await;
    let resp = get_via_proxy(gw.web, url, &[]).await;
    assert_eq!(resp.text(), "which 2\n", "the squatter holds the id");

    let owner = c.agent(&c.own, "own-token");
    let told = logs
        .wait_lines(&["GATEWAY CLOSED OUR TUNNEL"], 1, CONNECT_WAIT)
        .await;
    assert!(
        told[0].contains("whose token names agent id")
            && told[0].contains("exactly (this tunnel's token matches it only by a glob)"),
        "{told:?}"
    );
    for _ in 0..3 {
        let resp = get_via_proxy(gw.web, url, &[]).await;
        assert_eq!((resp.status, resp.text().as_str()), (200, "which 1\n"));
    }
    let text = gateway_metrics(gw).await;
    assert_eq!(
        metric_value(&text, "ferry_gateway_tunnels_replaced_total", &[]),
        Some(1.0),
        "{text}"
    );
    // Back after its backoff, the squatter cannot take the id again.
    wait_metric(
        &format!("{}/metrics", gw.web_url()),
        "ferry_gateway_tunnel_handshakes_total",
        &[("result", "conflict")],
        |v| v >= 1.0,
    )
    .await;
    let resp = get_via_proxy(gw.web, url, &[]).await;
    assert_eq!(resp.text(), "which 1\n");
    squatter.stop().await;
    owner.stop().await;
    c.gw.stop().await;
}

/// Agent ids are host names: `Node-1.` (capitals, the root's dot) connects as `node-1`, a glob
/// written in capitals still matches it, and Prometheus may address it in any of its spellings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_ids_are_host_names_whatever_their_case_or_final_dot() {
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Metrics(BODY.into())).await;
    let gw = start_gateway(&dir, &[("NODE-*", "tok")], |_| {}).await;
    let agent = start_agent(
        agent_section(&gw, "Node-1.", &[("node", target.url("/metrics"))]),
        "tok",
    );
    gw.wait_agent(AGENT, CONNECT_WAIT).await;
    assert_eq!(gw.agent_ids(), vec![AGENT.to_owned()]);
    let port = target.addr.port();

    for host in ["node-1", "NODE-1", "node-1.", "Node-1."] {
        let resp = get_via_proxy(gw.web, &format!("http://{host}:{port}/metrics"), &[]).await;
        assert_eq!(resp.status, 200, "{host}: {}", resp.text());
        assert_eq!(resp.body, Bytes::from(BODY), "{host}");
    }
    let sd: Value =
        serde_json::from_slice(&client::get(&format!("{}/targets", gw.web_url())).await.body)
            .unwrap();
    assert!(
        sd.as_array()
            .unwrap()
            .iter()
            .any(|g| g["targets"] == json!([format!("{AGENT}:{port}")])
                && g["labels"]["ferry_agent"] == AGENT),
        "{sd}"
    );

    agent.stop().await;
    gw.stop().await;
}

/// Spelling an id differently is no way around the duplicate-id rule: a group token claiming
/// `NODE-1.` while `node-1` is connected with the token naming it is refused with 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_spelling_of_a_connected_id_is_the_same_id() {
    let c = Claimants::start().await;
    let owner = c.agent(&c.own, "own-token");
    c.gw.wait_agent(AGENT, CONNECT_WAIT).await;

    for spelling in ["NODE-1", "node-1.", "Node-1."] {
        match raw_upgrade(&c.gw, "group-token", spelling).await {
            Err(HandshakeError::Refused { status, reason, .. }) => {
                assert_eq!(status.as_u16(), 409, "{spelling}: {reason}");
                assert!(reason.starts_with("agent id \"node-1\""), "{reason:?}");
            }
            other => panic!("{spelling}: expected 409, got {other:?}"),
        }
    }
    assert_eq!(c.gw.agent_ids(), vec![AGENT.to_owned()]);
    let resp = get_via_proxy(c.gw.web, &c.url, &[]).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "which 1\n"));
    assert_eq!(c.other.requests(), 0);

    owner.stop().await;
    c.gw.stop().await;
}

/// Opens TLS to the gateway's tunnel listener, pinned to its certificate, and sends the upgrade.
async fn raw_upgrade(gw: &TestGateway, token: &str, agent_id: &str) -> Result<(), HandshakeError> {
    upgrade_as_agent(gw, token, agent_id).await.map(drop)
}

/// The gateway checks the list an agent publishes: a target it could not route (port 0, no
/// name, a path that is no path) never reaches `/targets`; the agent's valid targets do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_published_targets_never_reach_service_discovery() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", "test-token")], |_| {}).await;
    let published = [
        ("evil", 0, "/metrics"),
        ("", 9101, "/metrics"),
        ("nopath", 9102, ""),
        ("query", 9103, "nopath?x=1#y"),
        ("node", 9100, "/metrics"),
    ];
    let targets: Vec<Value> = published
        .iter()
        .map(|(name, port, path)| json!({"name": name, "port": port, "path": path, "labels": {}}))
        .collect();
    let list = json!({"version": 1, "labels": {}, "targets": targets});
    let agent = agent_publishing(&gw, "evil-1", list.to_string()).await;
    gw.wait_agent("evil-1", CONNECT_WAIT).await;
    let sd: Value = serde_json::from_str(
        &client::get(&format!("{}/targets", gw.web_url()))
            .await
            .text(),
    )
    .unwrap();
    assert_eq!(
        sd,
        json!([{"targets": ["evil-1:9100"], "labels": {
            "__metrics_path__": "/metrics", "ferry_agent": "evil-1", "ferry_target": "node"
        }}])
    );
    // One line for the list, naming the first few: a list of thousands of bad targets must not
    // write thousands of lines.
    let dropped = logs.lines_with(&["WARN", "dropped targets the agent published"]);
    assert_eq!(dropped.len(), 1, "{dropped:#?}");
    assert!(
        dropped[0].contains("agent=\"evil-1\"") || dropped[0].contains("agent=evil-1"),
        "{dropped:?}"
    );
    assert!(
        dropped[0].contains("dropped=4")
            && dropped[0].contains("\"evil\": port 0")
            && dropped[0].contains("\"nopath\": path")
            && !dropped[0].contains("\"query\""),
        "{dropped:?}"
    );
    agent.abort();
    gw.stop().await;
}

/// A target list of `targets` targets under one 10 KB agent label: some 13 KB as the agent sends
/// it, the label repeated in each target's group of `/targets`.
fn expanding_list(version: u64, targets: u16) -> String {
    let targets: Vec<Value> = (1..=targets)
        .map(|port| json!({"name": format!("t{port}"), "port": port, "path": "/metrics", "labels": {}}))
        .collect();
    json!({"version": version, "labels": {"note": "x".repeat(10_000)}, "targets": targets})
        .to_string()
}

/// A hostile agent on `upgraded`: its first target list is `first`, its next (the long poll's
/// answer) `then`, if any; the closing notices the gateway sends it come out of the receiver as
/// (path, reason).
fn agent_changing_to(
    upgraded: hyper::upgrade::Upgraded,
    first: String,
    then: Option<String>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    use http_body_util::BodyExt as _;
    let (notices, received) = tokio::sync::mpsc::unbounded_channel();
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let (first, then, notices) = (first.clone(), then.clone(), notices.clone());
        async move {
            let path = req.uri().path().to_owned();
            if path.starts_with("/ferry/v1/closing") {
                let reason = req.into_body().collect().await.map(|b| b.to_bytes());
                let reason = String::from_utf8_lossy(&reason.unwrap_or_default()).into_owned();
                let _ = notices.send((path, reason));
                return Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    Bytes::new(),
                )));
            }
            let list = match (
                req.uri().query().is_some_and(|q| q.contains("after=")),
                then,
            ) {
                (false, _) => first,
                (true, Some(then)) => then,
                (true, None) => std::future::pending().await,
            };
            Ok(http::Response::new(Full::new(Bytes::from(list))))
        }
    });
    let task = tokio::spawn(async move {
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(upgraded, service)
            .await;
    });
    (task, received)
}

/// One agent may not make `/targets` megabytes (each target's group repeats its labels): a list
/// the gateway reads (13 KB) that would publish 3 MB is refused, at connect and as a later
/// change, and the agent is told why in one line; `/targets` stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_too_large_for_service_discovery_is_refused_with_the_reason() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", "test-token")], |_| {}).await;
    let refused_with = |notice: Option<Option<(String, String)>>| {
        let (path, reason) = notice
            .expect("a closing notice within 10 s")
            .expect("a closing notice");
        assert_eq!(path, "/ferry/v1/closing/targets");
        assert!(
            reason.contains("service discovery")
                && reason.contains("more than it publishes for one agent (2048 KiB)")
                && !reason.trim_end().contains('\n'),
            "{reason}"
        );
        reason
    };

    // At connect: never registered, nothing listed.
    let upgraded = upgrade_as_agent(&gw, "test-token", "big-1").await.unwrap();
    let (big, mut notices) = agent_changing_to(upgraded, expanding_list(1, 300), None);
    let reason = refused_with(
        tokio::time::timeout(CONNECT_WAIT, notices.recv())
            .await
            .ok(),
    );
    let warned = logs.lines_with(&["WARN", "tunnel refused: the agent's target list"]);
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(
        warned[0].contains("big-1") && warned[0].contains("2048 KiB"),
        "{warned:?}"
    );
    assert!(reason.len() < 1024, "{reason}");
    assert!(gw.agent_ids().is_empty());
    let sd = client::get(&format!("{}/targets", gw.web_url())).await;
    assert_eq!(sd.text(), "[]");

    // As a change: the tunnel closes; what was published before stays, as a disconnected
    // agent's, and is all `/targets` holds.
    let upgraded = upgrade_as_agent(&gw, "test-token", "grow-1").await.unwrap();
    let (grow, mut notices) =
        agent_changing_to(upgraded, expanding_list(1, 2), Some(expanding_list(2, 300)));
    refused_with(
        tokio::time::timeout(CONNECT_WAIT, notices.recv())
            .await
            .ok(),
    );
    let deadline = Instant::now() + CONNECT_WAIT;
    while !gw.agent_ids().is_empty() {
        assert!(
            Instant::now() < deadline,
            "still connected: {:?}",
            gw.agent_ids()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sd = client::get(&format!("{}/targets", gw.web_url()))
        .await
        .text();
    assert!(sd.len() < 64 << 10, "{} bytes of /targets", sd.len());
    let sd: Value = serde_json::from_str(&sd).unwrap();
    let listed: Vec<&str> = sd
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["targets"][0].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["grow-1:1", "grow-1:2"]);
    big.abort();
    grow.abort();
    gw.stop().await;
}

/// An agent that answers every target-list request at once with a new version (a hostile or
/// broken one) is asked again only once a second, not as fast as round trips allow: each
/// change takes the registry's write lock and a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_churning_its_target_list_is_asked_once_a_second() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", "test-token")], |_| {}).await;
    let upgraded = upgrade_as_agent(&gw, "test-token", "churn-1")
        .await
        .expect("tunnel upgraded");
    let asked = Arc::new(AtomicU64::new(0));
    let counter = asked.clone();
    let service = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
        let version = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let list = json!({"version": version, "labels": {}, "targets": [
            {"name": "node", "port": 9100, "path": "/metrics", "labels": {}}
        ]});
        async move {
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                list.to_string(),
            ))))
        }
    });
    let agent = tokio::spawn(async move {
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(upgraded, service)
            .await;
    });
    gw.wait_agent("churn-1", CONNECT_WAIT).await;
    // The first answers come back to back (a change after none is not churn yet); counted from
    // when the pace has set in, a 3 s window holds at most 4 requests a second apart (an
    // unthrottled gateway asks hundreds of times).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let start = asked.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = asked.load(Ordering::SeqCst) - start;
    assert!(during <= 4, "{during} target-list requests in 3 s");
    assert_eq!(gw.agent_ids(), ["churn-1"], "the agent stays connected");
    agent.abort();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_handshake_refusals_carry_status_and_reason() {
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("web-*", "web-token")], |_| {}).await;

    match raw_upgrade(&gw, "not-a-token", "web-1").await {
        Err(HandshakeError::Refused { status, reason, .. }) => {
            assert_eq!(status.as_u16(), 401, "{reason}");
            assert_eq!(reason, "invalid token");
        }
        other => panic!("expected 401, got {other:?}"),
    }
    match raw_upgrade(&gw, "web-token", "db-1").await {
        Err(HandshakeError::Refused { status, reason, .. }) => {
            assert_eq!(status.as_u16(), 403, "{reason}");
            assert!(
                reason.contains("db-1"),
                "reason must name the agent id: {reason:?}"
            );
        }
        other => panic!("expected 403, got {other:?}"),
    }
    // The same connection path with a good claim is accepted: the refusals above are about credentials.
    raw_upgrade(&gw, "web-token", "web-1")
        .await
        .expect("a valid claim is upgraded");

    let text = gateway_metrics(&gw).await;
    for (result, n) in [("unauthorized", 1.0), ("forbidden", 1.0), ("ok", 1.0)] {
        assert_eq!(
            metric_value(
                &text,
                "ferry_gateway_tunnel_handshakes_total",
                &[("result", result)]
            ),
            Some(n),
            "{result}: {text}"
        );
    }
    gw.stop().await;
}

/// Sends `request` (an HTTP/1 head, the agent's side of the upgrade) over TLS to the tunnel
/// listener and reads the answer.
async fn raw_tunnel_exchange(gw: &TestGateway, request: impl AsRef<[u8]>) -> RawResp {
    use tokio::io::AsyncWriteExt;
    let request = request.as_ref();
    let mut tls = tunnel_tls(gw).await;
    tls.write_all(request).await.unwrap();
    tokio::time::timeout(CONNECT_WAIT, read_response(&mut tls))
        .await
        .expect("the gateway answers within 10 s")
        .unwrap_or_else(|| panic!("no answer to {:?}", String::from_utf8_lossy(request)))
}

/// The upgrade request an agent sends, with `lines` (header lines, `\r\n` each) in the middle.
fn upgrade_head(version: &str, lines: &str) -> String {
    format!(
        "GET /ferry/v1/tunnel {version}\r\nHost: localhost\r\nConnection: upgrade\r\n{lines}\r\n"
    )
}

/// The upgrade is read as RFC 9110 has it (a list of protocols, a case-insensitive scheme), and
/// what it cannot be sure of (two ids, two tokens, HTTP/1.0 that cannot switch) is refused
/// before the 101, with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_requests_are_read_as_the_rfc_says_and_doubts_are_refused() {
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("node-*", "test-token")], |_| {}).await;
    let ok =
        "Upgrade: h2c, ferry/1\r\nAuthorization: bearer test-token\r\nFerry-Agent-Id: node-1\r\n";
    let resp = raw_tunnel_exchange(&gw, &upgrade_head("HTTP/1.1", ok)).await;
    assert_eq!(resp.status, 101, "{}", resp.head);
    assert_eq!(resp.header("upgrade").as_deref(), Some("ferry/1"));

    let refused = [
        (
            upgrade_head("HTTP/1.0", ok),
            400,
            "the tunnel upgrade needs HTTP/1.1",
        ),
        (
            upgrade_head(
                "HTTP/1.1",
                "Upgrade: ferry/1\r\nAuthorization: Bearer test-token\r\nFerry-Agent-Id: node-1\r\nFerry-Agent-Id: node-2\r\n",
            ),
            400,
            "more than one Ferry-Agent-Id header",
        ),
        (
            upgrade_head(
                "HTTP/1.1",
                "Upgrade: ferry/1\r\nAuthorization: Bearer nope\r\nAuthorization: Bearer test-token\r\nFerry-Agent-Id: node-1\r\n",
            ),
            400,
            "more than one Authorization header",
        ),
    ];
    for (request, status, reason) in &refused {
        let resp = raw_tunnel_exchange(&gw, request).await;
        assert_eq!(resp.status, *status, "{request:?}: {}", resp.head);
        assert_eq!(String::from_utf8_lossy(&resp.body), format!("{reason}\n"));
    }
    // A 401 says what is wrong with the credential, and which scheme it wants.
    let unauthorized: [(&[u8], &str); 6] = [
        (b"Authorization: Bearer nope\r\n", "invalid token"),
        (b"", "missing bearer token"),
        (
            b"Authorization: Bearer bad\" x=\xff\r\n",
            "malformed Authorization header: not visible ASCII",
        ),
        (
            b"Authorization: Bearer bad\" x=\r\n",
            "malformed Authorization header: the bearer token is more than one word",
        ),
        (
            b"Authorization: Bearer\r\n",
            "malformed Authorization header: Bearer without a token",
        ),
        (
            b"Authorization: Basic dGVzdDp0ZXN0\r\n",
            "the Authorization header is not Bearer <token>",
        ),
    ];
    for (auth, reason) in unauthorized {
        let mut request = b"GET /ferry/v1/tunnel HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\nUpgrade: ferry/1\r\n".to_vec();
        request.extend_from_slice(auth);
        request.extend_from_slice(b"Ferry-Agent-Id: node-1\r\n\r\n");
        let resp = raw_tunnel_exchange(&gw, &request).await;
        assert_eq!(resp.status, 401, "{}", resp.head);
        assert_eq!(resp.header("www-authenticate").as_deref(), Some("Bearer"));
        assert_eq!(String::from_utf8_lossy(&resp.body), format!("{reason}\n"));
    }
    let text = gateway_metrics(&gw).await;
    let counted = |result| {
        metric_value(
            &text,
            "ferry_gateway_tunnel_handshakes_total",
            &[("result", result)],
        )
    };
    assert_eq!(counted("ok"), Some(1.0), "{text}");
    assert_eq!(counted("bad_request"), Some(3.0), "{text}");
    gw.stop().await;
}

/// A path that lets the TCP connection through and then drops everything (a firewall, a
/// middlebox) makes the agent's handshake time out: the log says at which step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_handshake_that_stalls_says_where() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", "test-token")], |_| {}).await;
    // Accepts connections and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let mut section = agent_section(&gw, "stalled", &[]);
    section.gateway = Some(format!("https://localhost:{port}"));
    section.tunnel.handshake_timeout = Dur(Duration::from_millis(300));
    let agent = start_agent(section, "test-token");
    let lines = logs
        .wait_lines(&["cannot open tunnel"], 1, CONNECT_WAIT)
        .await;
    assert!(
        lines[0].contains(
            "tunnel handshake timed out after 300ms in the TLS handshake (connected, then no answer)"
        ),
        "{lines:?}"
    );
    agent.stop().await;
    held.abort();
    gw.stop().await;
}

/// A connection that says nothing, or leaves before asking, is counted for what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_vanishing_tunnel_connections_are_counted_as_such() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", "test-token")], |s| {
        s.tunnel.handshake_timeout = Dur(Duration::from_millis(300));
    })
    .await;
    let metrics = format!("{}/metrics", gw.web_url());
    let name = "ferry_gateway_tunnel_handshakes_total";

    let mut silent = tunnel_tls(&gw).await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(CONNECT_WAIT, silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the gateway closes a silent connection: {read:?}"
    );
    wait_metric(&metrics, name, &[("result", "timeout")], |v| v == 1.0).await;

    // Closed with TLS's close_notify, then without it.
    let mut polite = tunnel_tls(&gw).await;
    polite.shutdown().await.unwrap();
    drop(polite);
    drop(tunnel_tls(&gw).await);
    wait_metric(&metrics, name, &[("result", "closed")], |v| v == 2.0).await;
    let text = gateway_metrics(&gw).await;
    assert_eq!(
        metric_value(&text, name, &[("result", "http_error")]),
        None,
        "{text}"
    );
    gw.stop().await;
}

/// Connections that never finish their handshake take a bounded number of slots: past the limit
/// the gateway closes new ones at once (not after the handshake timeout), counts them, and
/// agents get in again as soon as the slots are free. A finished handshake frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_tunnel_connections_are_bounded_per_address() {
    use tokio::io::AsyncReadExt;
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Metrics(BODY.into())).await;
    let gw = start_gateway(&dir, &[("*", "test-token")], |s| {
        s.tunnel.handshake_timeout = Dur(Duration::from_secs(30));
        s.tunnel.max_pending_handshakes_per_ip = 2;
    })
    .await;
    let metrics = format!("{}/metrics", gw.web_url());
    let name = "ferry_gateway_tunnel_handshakes_total";

    // One after the other, so that the gateway has admitted each before the next arrives.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(gw.tunnel).await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let mut third = tokio::net::TcpStream::connect(gw.tunnel).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(CONNECT_WAIT, third.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the third half-open connection is closed: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed at once, not after the handshake timeout"
    );
    wait_metric(&metrics, name, &[("result", "busy")], |v| v >= 1.0).await;

    // An agent turned away meanwhile is told what may be going on.
    let section = |id: &str| agent_section(&gw, id, &[("node", target.url("/metrics"))]);
    let mut agents = vec![start_agent(section("node-1"), "test-token")];
    logs.wait_lines(
        &["cannot open tunnel", "tunnel.max_pending_handshakes"],
        1,
        CONNECT_WAIT,
    )
    .await;
    drop(silent);
    gw.wait_agent("node-1", CONNECT_WAIT).await;
    // More agents from the same address one after the other: each finished handshake gives
    // its slot back.
    for id in ["node-2", "node-3"] {
        agents.push(start_agent(section(id), "test-token"));
        gw.wait_agent(id, CONNECT_WAIT).await;
    }
    let resp = get_via_proxy(
        gw.web,
        &format!("http://node-3:{}/metrics", target.addr.port()),
        &[],
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    for agent in agents {
        agent.stop().await;
    }
    gw.stop().await;
}

/// The web listener holds at most `web.max_connections` connections: past it new ones are closed
/// at accept, counted and warned about, while those open keep being served; once they go, scrapes
/// get in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_connections_past_the_cap_are_closed_at_accept() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Metrics(BODY.into())).await;
    let gw = start_gateway(&dir, &[("*", "test-token")], |s| {
        s.web.max_connections = 2;
    })
    .await;
    let agent = start_agent(
        agent_section(&gw, AGENT, &[("node", target.url("/metrics"))]),
        "test-token",
    );
    gw.wait_agent(AGENT, CONNECT_WAIT).await;
    let url = format!("http://{AGENT}:{}/metrics", target.addr.port());

    // One after the other, so that the gateway has admitted each before the next arrives.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(gw.web).await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut third = tokio::net::TcpStream::connect(gw.web).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(CONNECT_WAIT, third.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the third connection is closed: {read:?}"
    );
    let warned = logs
        .wait_lines(
            &[
                "refused a request before routing",
                "reason=connection_limit",
            ],
            1,
            CONNECT_WAIT,
        )
        .await;
    assert!(
        warned[0].contains("gateway.web.max_connections"),
        "{warned:?}"
    );

    // A connection in place is still served, and stays open for the next scrape.
    let scrape = format!(
        "GET {url} HTTP/1.1\r\nHost: {AGENT}:{}\r\n\r\n",
        target.addr.port()
    );
    for _ in 0..2 {
        held[0].write_all(scrape.as_bytes()).await.unwrap();
        let resp = tokio::time::timeout(CONNECT_WAIT, read_response(&mut held[0]))
            .await
            .expect("an answer on the connection in place")
            .expect("a response");
        assert_eq!(resp.status, 200, "{}", resp.head);
    }
    let own = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\n\r\n", gw.web);
    held[0].write_all(own.as_bytes()).await.unwrap();
    let resp = tokio::time::timeout(CONNECT_WAIT, read_response(&mut held[0]))
        .await
        .expect("an answer on the connection in place")
        .expect("a response");
    let metrics = String::from_utf8_lossy(&resp.body);
    assert_eq!(
        metric_value(
            &metrics,
            "ferry_gateway_web_refusals_total",
            &[("reason", "connection_limit")]
        ),
        Some(1.0),
        "{metrics}"
    );

    // Scrapes get in again once the connections in place close (retried: the gateway may not
    // have seen them close yet).
    drop(held);
    let start = Instant::now();
    let resp = loop {
        match client::try_get_via_proxy(gw.web, &url, &[]).await {
            Ok(resp) => break resp,
            Err(_) if start.elapsed() < CONNECT_WAIT => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no scrape got in after the connections closed: {e}"),
        }
    };
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), BODY);
    agent.stop().await;
    gw.stop().await;
}

/// A request head over the listener's buffer (128 KiB) is refused by the HTTP parser, so that a
/// client trickling a head holds that much memory at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_buffer_is_431_from_the_parser() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    let port = s.target.addr.port();
    let big = "a".repeat(200_000);
    let resp = raw_exchange(
        s.gw.web,
        format!("GET http://{AGENT}:{port}/metrics HTTP/1.1\r\nHost: {AGENT}:{port}\r\nx-big: {big}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 431, "{}", resp.head);
    assert_eq!(resp.header("ferry-error"), None, "{}", resp.head);
    assert_eq!(s.target.requests(), 0);
    s.stop().await;
}

/// `http://:9100/metrics` names no agent: the request is wrong, not the agent away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_url_without_a_host_is_400() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    let port = s.target.addr.port();
    let resp = raw_exchange(
        s.gw.web,
        format!("GET http://:{port}/metrics HTTP/1.1\r\nHost: :{port}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 400, "{}", resp.head);
    let body = String::from_utf8_lossy(&resp.body);
    assert_eq!(
        body,
        "bad scrape request: no agent id in the URL: its host must be the agent id (http://node-1:9100/metrics)\n"
    );
    assert_eq!(resp.header("ferry-error").as_deref(), Some("gateway"));
    assert_eq!(s.target.requests(), 0);
    s.stop().await;
}

/// The gateway's own endpoints are read-only: another method is not answered as if it were a GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_endpoints_answer_get_and_head_only() {
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", "test-token")], |_| {}).await;
    let host = gw.web.to_string();
    let request = |method: &str, path: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &host)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    for path in [
        "/",
        "/targets",
        "/clients",
        "/metrics",
        "/api/v1/agents",
        "/-/healthy",
        "/-/ready",
    ] {
        for method in ["POST", "DELETE", "PUT"] {
            let resp = client::send(gw.web, request(method, path)).await;
            assert_eq!(resp.status, 405, "{method} {path}: {}", resp.text());
            assert_eq!(resp.header("allow"), Some("GET, HEAD"), "{method} {path}");
            assert_eq!(
                assert_one_line(&resp),
                format!("method {method} is not allowed on {path}: the gateway's own endpoints answer GET and HEAD")
            );
        }
        for method in ["GET", "HEAD"] {
            let resp = client::send(gw.web, request(method, path)).await;
            assert_eq!(resp.status, 200, "{method} {path}: {}", resp.text());
        }
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_agent_is_503_at_once() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    let started = Instant::now();
    let resp = get_via_proxy(
        s.gw.web,
        "http://nobody:9100/metrics",
        &[(TIMEOUT_HEADER, "10")],
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(
        elapsed < Duration::from_secs(1),
        "503 must not wait for the scrape timeout: took {elapsed:?}"
    );
    let reason = assert_one_line(&resp);
    assert!(
        reason.contains("\"nobody\""),
        "reason must name the agent: {reason:?}"
    );
    assert_eq!(resp.header("ferry-error"), Some("gateway"));
    assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(s.target.requests(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_ports_and_paths_are_404_and_never_fetched() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    let port = s.target.addr.port();
    let other_port = if port == 65535 { 65534 } else { port + 1 };
    let urls = [
        format!("http://{AGENT}:{other_port}/metrics"),
        format!("http://{AGENT}:{port}/admin"),
        format!("http://{AGENT}:{port}/metrics/../admin"),
        format!("http://{AGENT}:{port}/metrics/"),
        format!("http://{AGENT}:{port}/%2e%2e/admin"),
        format!("http://{AGENT}:{port}/%2e%2e/metrics"),
        format!("http://{AGENT}:{port}/admin/%2e%2e/metrics"),
        format!("http://{AGENT}:{port}/metrics%2F"),
        format!("http://{AGENT}:{port}/"),
        format!("http://{AGENT}:9369/admin"),
    ];
    for url in &urls {
        let resp = get_via_proxy(s.gw.web, url, &[]).await;
        assert_eq!(resp.status, 404, "{url}: {}", resp.text());
        let reason = assert_one_line(&resp);
        assert!(
            reason.contains(AGENT),
            "{url}: reason must name the agent: {reason:?}"
        );
        assert!(
            resp.header("ferry-error").is_some(),
            "{url}: {:?}",
            resp.headers
        );
    }
    assert_eq!(
        s.target.requests(),
        0,
        "the target saw {:?}",
        s.target.paths()
    );

    // The listed target on the same port still works: the 404s were about the path, not the setup.
    let ok = s.scrape("/metrics", &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(s.target.paths(), vec!["/metrics".to_owned()]);
    s.stop().await;
}

/// Prometheus takes `__metrics_path__` as a decoded path and encodes it the way Go escapes a URL
/// path: a target configured as `/a%20b/metrics` or `/x!y/metrics` is published decoded and
/// scraped at `/a%20b/metrics` and `/x%21y/metrics`, and the target is fetched at its own URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_with_encoded_paths_are_published_decoded_and_scraped_as_prometheus_asks() {
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Metrics(BODY.into())).await;
    let targets = [
        ("enc", target.url("/a%20b/metrics")),
        ("bang", target.url("/x!y/metrics")),
        ("cafe", target.url("/caf%C3%A9/metrics")),
    ];
    let (gw, agent) = gateway_and_agent(&dir, AGENT, &targets).await;
    let port = target.addr.port();

    let sd: Value = serde_json::from_str(
        &client::get(&format!("{}/targets", gw.web_url()))
            .await
            .text(),
    )
    .unwrap();
    let mut published: Vec<(String, String)> = sd
        .as_array()
        .expect("an array of groups")
        .iter()
        .map(|g| {
            let labels = &g["labels"];
            let name = labels["ferry_target"].as_str().unwrap_or_default();
            let path = labels["__metrics_path__"].as_str().unwrap_or_default();
            (name.to_owned(), path.to_owned())
        })
        .collect();
    published.sort();
    let expected = [
        ("bang", "/x!y/metrics"),
        ("cafe", "/café/metrics"),
        ("enc", "/a b/metrics"),
        ("ferry", "/metrics"),
    ]
    .map(|(n, p)| (n.to_owned(), p.to_owned()));
    assert_eq!(published, expected, "{sd}");

    // Prometheus's requests (Go's escaping), then another client's spelling of the same path.
    for (requested, fetched) in [
        ("/a%20b/metrics", "/a%20b/metrics"),
        ("/x%21y/metrics", "/x!y/metrics"),
        ("/caf%C3%A9/metrics", "/caf%C3%A9/metrics"),
        ("/x!y/metrics", "/x!y/metrics"),
    ] {
        let url = format!("http://{AGENT}:{port}{requested}");
        let resp = get_via_proxy(gw.web, &url, &[]).await;
        assert_eq!(resp.status, 200, "{requested}: {}", resp.text());
        assert_eq!(resp.body, Bytes::from(BODY), "{requested}");
        assert_eq!(
            target.paths().last().map(String::as_str),
            Some(fetched),
            "{requested}"
        );
    }

    // Encoded twice (what Prometheus asked for when ferry published the raw path) is another
    // path; so is one with an encoded "/". Answered with the path as received, nothing fetched.
    let fetched = target.requests();
    for requested in ["/a%2520b/metrics", "/x!y%2Fmetrics"] {
        let url = format!("http://{AGENT}:{port}{requested}");
        let resp = get_via_proxy(gw.web, &url, &[]).await;
        assert_eq!(resp.status, 404, "{requested}: {}", resp.text());
        assert_eq!(
            assert_one_line(&resp),
            format!("agent \"{AGENT}\" has no target at port {port} path \"{requested}\"")
        );
    }
    assert_eq!(target.requests(), fetched, "{:?}", target.paths());
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_target_is_504_before_the_scrape_timeout() {
    let s = Setup::start(Behaviour::Slow {
        delay: Duration::from_secs(5),
        body: BODY.into(),
    })
    .await;
    let started = Instant::now();
    let resp = s.scrape("/metrics", &[(TIMEOUT_HEADER, "1")]).await;
    let elapsed = started.elapsed();
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert!(
        elapsed < Duration::from_secs(1),
        "504 must come before Prometheus gives up at 1 s: took {elapsed:?}"
    );
    let reason = assert_one_line(&resp);
    assert!(reason.contains("timed out"), "{reason:?}");
    assert_eq!(s.target.requests(), 1, "the target was asked once");
    s.stop().await;
}

/// Concurrent scrapes leave the agent with one kept-alive connection each to the target; a
/// target that never closes idle connections (most exporters) must not hold them for ever: the
/// agent closes those unused for `target_idle_timeout`, and reuses them before that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_target_connections_are_closed_after_the_idle_timeout() {
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Slow {
        delay: Duration::from_millis(300),
        body: BODY.into(),
    })
    .await;
    let gw = start_gateway(&dir, &[("*", "test-token")], |_| {}).await;
    let mut section = agent_section(&gw, AGENT, &[("node", target.url("/metrics"))]);
    section.target_idle_timeout = Dur(Duration::from_secs(2));
    let agent = start_agent(section, "test-token");
    gw.wait_agent(AGENT, CONNECT_WAIT).await;
    let url = format!("http://{AGENT}:{}/metrics", target.addr.port());
    let mut scrapes = JoinSet::new();
    for _ in 0..8 {
        let (web, url) = (gw.web, url.clone());
        scrapes.spawn(async move { get_via_proxy(web, &url, &[]).await.status });
    }
    while let Some(status) = scrapes.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let open = target.open_connections();
    assert!(
        open >= 2,
        "the scrapes ran one after another: {open} connection(s)"
    );
    // Within the idle timeout a scrape reuses a kept connection.
    assert_eq!(get_via_proxy(gw.web, &url, &[]).await.status, 200);
    assert_eq!(
        target.open_connections(),
        open,
        "a scrape opened a new connection"
    );
    let deadline = Instant::now() + Duration::from_secs(6);
    while target.open_connections() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} idle connection(s) to the target still open 4 s past the idle timeout",
            target.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_body_streams_through_intact() {
    const SIZE: u64 = 50 * 1024 * 1024;
    let s = Setup::start(Behaviour::Large { bytes: SIZE }).await;
    let mut digest = BodyDigest::new();
    let resp = get_via_proxy_streaming(
        s.gw.web,
        &s.url("/metrics"),
        &[(TIMEOUT_HEADER, "60")],
        |chunk| digest.update(chunk),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_bytes, SIZE);
    assert_eq!(digest.bytes_seen(), SIZE);
    assert_eq!(
        digest.finish(),
        large_body_digest(SIZE),
        "body corrupted on the way"
    );
    assert_eq!(s.target.requests(), 1);
    s.stop().await;
}

/// Clients that stop reading a large scrape (a stalled or very slow Prometheus, or anyone on
/// the web listener) hold only their own streams: another scrape of the same agent still gets
/// its whole body at once. With one window for the whole tunnel they used to take all of it,
/// and every other scrape of the agent got a 200 head and then nothing until its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_do_not_stall_the_agents_other_scrapes() {
    use tokio::io::AsyncWriteExt;
    let dir = TempDir::new().unwrap();
    let big = TargetServer::start(Behaviour::Large {
        bytes: 200 * 1024 * 1024,
    })
    .await;
    let small = TargetServer::start(Behaviour::Metrics(BODY.into())).await;
    let (gw, agent) = gateway_and_agent(
        &dir,
        AGENT,
        &[
            ("big", big.url("/metrics")),
            ("small", small.url("/metrics")),
        ],
    )
    .await;
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut conn = socket.connect(gw.web).await.unwrap();
        let req = format!(
            "GET http://{AGENT}:{0}/metrics HTTP/1.1\r\nHost: {AGENT}:{0}\r\n{TIMEOUT_HEADER}: 60\r\n\r\n",
            big.addr.port()
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        stalled.push(conn);
    }
    wait_for_requests(&big, 8).await;
    // Long enough for the stalled streams to fill the sockets and every window they can.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let started = Instant::now();
    let resp = get_via_proxy(
        gw.web,
        &format!("http://{AGENT}:{}/metrics", small.addr.port()),
        &[(TIMEOUT_HEADER, "5")],
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.body,
        Bytes::from(BODY),
        "after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    drop(stalled);
    agent.stop().await;
    gw.stop().await;
}

async fn wait_for_requests(server: &TargetServer, n: usize) {
    let deadline = Instant::now() + CONNECT_WAIT;
    while server.requests() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} requests",
            server.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_passes_through_untouched() {
    let s = Setup::start(Behaviour::Gzip(BODY.into())).await;

    let zipped = s.scrape("/metrics", &[("Accept-Encoding", "gzip")]).await;
    assert_eq!(zipped.status, 200, "{}", zipped.text());
    assert_eq!(zipped.header("content-encoding"), Some("gzip"));
    assert_ne!(
        zipped.body,
        Bytes::from(BODY),
        "the body must still be compressed"
    );
    assert_eq!(gunzip(&zipped.body), BODY.as_bytes());
    assert_eq!(
        s.target
            .last_headers()
            .unwrap()
            .get(header::ACCEPT_ENCODING)
            .unwrap(),
        "gzip"
    );

    let plain = s.scrape("/metrics", &[]).await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.body, Bytes::from(BODY));
    assert!(
        s.target
            .last_headers()
            .unwrap()
            .get(header::ACCEPT_ENCODING)
            .is_none(),
        "nobody added an Accept-Encoding"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_scrapes_of_one_agent_all_succeed() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    let (web, url) = (s.gw.web, s.url("/metrics"));
    let mut scrapes = JoinSet::new();
    for _ in 0..50 {
        let url = url.clone();
        scrapes.spawn(async move { get_via_proxy(web, &url, &[]).await });
    }
    let mut ok = 0;
    while let Some(resp) = scrapes.join_next().await {
        let resp = resp.expect("scrape task");
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.body, Bytes::from(BODY));
        ok += 1;
    }
    assert_eq!(ok, 50);
    assert_eq!(s.target.requests(), 50);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheme_parameter_is_dropped_and_other_parameters_kept() {
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Metrics(BODY.into())).await;
    // A target URL with its own query (like a blackbox exporter module): the scrape's is appended.
    let (gw, agent) = gateway_and_agent(
        &dir,
        AGENT,
        &[("probe", target.url("/probe?module=http_2xx"))],
    )
    .await;
    let base = format!("http://{AGENT}:{}/probe", target.addr.port());

    for (query, seen) in [
        (
            "?_scheme=https&target=example.com&collect%5B%5D=cpu",
            "/probe?module=http_2xx&target=example.com&collect%5B%5D=cpu",
        ),
        ("?target=a&_scheme=http", "/probe?module=http_2xx&target=a"),
        ("?_scheme=https", "/probe?module=http_2xx"),
        ("", "/probe?module=http_2xx"),
    ] {
        let resp = get_via_proxy(gw.web, &format!("{base}{query}"), &[]).await;
        assert_eq!(resp.status, 200, "{query}: {}", resp.text());
        assert_eq!(
            target.paths().last().map(String::as_str),
            Some(seen),
            "{query}"
        );
    }
    assert_eq!(target.requests(), 4);

    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_and_proxy_credentials_stay_behind() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    let sent = [
        (
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        ),
        ("User-Agent", "Prometheus/2.42.0"),
        (TIMEOUT_HEADER, "10"),
        ("X-End-To-End", "yes"),
        ("Proxy-Authorization", "Basic cHJvbTpzZWNyZXQ="),
        ("Connection", "keep-alive, X-Hop-Secret"),
        ("X-Hop-Secret", "per-hop"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
    ];
    let resp = s.scrape("/metrics", &sent).await;
    assert_eq!(resp.status, 200, "{}", resp.text());

    let seen = s.target.last_headers().expect("the target got the scrape");
    let value = |name: &str| seen.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(value("accept").as_deref(), Some(sent[0].1));
    assert_eq!(value("user-agent").as_deref(), Some("Prometheus/2.42.0"));
    assert_eq!(value("x-end-to-end").as_deref(), Some("yes"));
    for gone in [
        "proxy-authorization",
        "x-hop-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(
            !seen.contains_key(gone),
            "{gone} reached the target: {seen:?}"
        );
    }
    if let Some(conn) = value("connection") {
        assert!(
            !conn.to_ascii_lowercase().contains("x-hop-secret"),
            "{conn}"
        );
    }
    // The target sees its own address as Host, not the agent id Prometheus used.
    assert_eq!(value("host"), Some(s.target.addr.to_string()));
    let timeout: f64 = value("x-prometheus-scrape-timeout-seconds")
        .expect("timeout header forwarded")
        .parse()
        .unwrap();
    assert!(
        (9.0..10.0).contains(&timeout),
        "timeout must be rewritten below the 10 s Prometheus sent: {timeout}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_metrics_count_scrapes_by_status_class() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    let url = format!("{}/metrics", s.gw.web_url());

    let ok = s.scrape("/metrics", &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let two_xx = [
        ("agent", AGENT),
        ("target", "node"),
        ("status_class", "2xx"),
    ];
    // Counted when the body has been passed on, which may be a moment after the client has it.
    wait_metric(&url, "ferry_gateway_scrapes_total", &two_xx, |v| v >= 1.0).await;
    let text = gateway_metrics(&s.gw).await;
    assert_eq!(
        metric_value(&text, "ferry_gateway_scrapes_total", &two_xx),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "ferry_gateway_agents_connected", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_proxied_bytes_total",
            &[("agent", AGENT)]
        ),
        Some(BODY.len() as f64),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_scrapes_total",
            &[("status_class", "4xx")]
        ),
        None,
        "{text}"
    );

    let missing = s.scrape("/admin", &[]).await;
    assert_eq!(missing.status, 404, "{}", missing.text());
    let text = gateway_metrics(&s.gw).await;
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_scrapes_total",
            &[("agent", AGENT), ("status_class", "4xx")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "ferry_gateway_scrapes_total", &two_xx),
        Some(1.0),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_with_405() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    let authority = format!("{AGENT}:{}", s.target.addr.port());
    let req = Request::connect(authority.as_str())
        .header(header::HOST, authority.as_str())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client::send(s.gw.web, req).await;
    assert_eq!(resp.status, 405, "{}", resp.text());
    let reason = assert_one_line(&resp);
    assert!(reason.contains("CONNECT"), "{reason:?}");
    assert_eq!(resp.header("ferry-error"), Some("gateway"));
    assert!(
        resp.header("allow").is_some_and(|a| a.contains("GET")),
        "{:?}",
        resp.headers
    );
    assert_eq!(s.target.requests(), 0);
    let text = gateway_metrics(&s.gw).await;
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_web_refusals_total",
            &[("reason", "connect")]
        ),
        Some(1.0),
        "a CONNECT (a scheme: https job) shows in the gateway's metrics: {text}"
    );
    s.stop().await;
}

/// Gateway with `web.max_scrape_bytes` of 50,000 and agent `big` serving `target` as `big`.
async fn gateway_limited_to_50_kb(dir: &TempDir, target: String) -> (TestGateway, TestAgent) {
    let gw = start_gateway(dir, &[("*", "test-token")], |s| {
        s.web.max_scrape_bytes = 50_000
    })
    .await;
    let agent = start_agent(agent_section(&gw, "big", &[("big", target)]), "test-token");
    gw.wait_agent("big", CONNECT_WAIT).await;
    (gw, agent)
}

/// A body whose Content-Length is over `--web.max-scrape-bytes` is refused with a 502 that
/// names the setting, before any head: cut after a 200 head, Prometheus saw a bare EOF (and Go's
/// client fetched again when nothing at all had come back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_announced_over_the_size_limit_is_a_502_naming_the_setting() {
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Large { bytes: 477_780 }).await;
    let (gw, agent) = gateway_limited_to_50_kb(&dir, target.url("/big")).await;
    let url = format!("http://big:{}/big", target.addr.port());
    let resp = get_via_proxy(gw.web, &url, &[]).await;
    assert_eq!(resp.status, 502, "{:?}", resp.headers);
    let reason = assert_one_line(&resp);
    assert!(
        reason.contains("477780 bytes")
            && reason.contains("50000 bytes")
            && reason.contains("--web.max-scrape-bytes / web.max_scrape_bytes"),
        "{reason}"
    );
    assert_eq!(resp.header("ferry-error"), Some("gateway"));
    assert_eq!(target.requests(), 1, "fetched once");
    let text = gateway_metrics(&gw).await;
    let big = [("agent", "big"), ("target", "big")];
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_scrapes_total",
            &[big[0], big[1], ("status_class", "5xx")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "ferry_gateway_proxied_bytes_total", &big[..1]),
        Some(0.0),
        "{text}"
    );
    agent.stop().await;
    gw.stop().await;
}

/// A target that sends a first chunk, then (once the head has surely left) 100,000 bytes more,
/// chunked: no length to refuse it by up front.
async fn chunked_target_of_100_kb() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if common::servers::read_request_head(&mut s).await.is_none() {
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nup 1\n\r\n";
                let _ = s.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut rest = format!("{:x}\r\n", 100_000).into_bytes();
                rest.extend(std::iter::repeat_n(b'#', 100_000));
                rest.extend_from_slice(b"\r\n0\r\n\r\n");
                let _ = s.write_all(&rest).await;
            });
        }
    });
    addr
}

/// A chunked body found over the limit after its head was sent can only be cut: it is counted
/// and logged once, and only the bytes that went to Prometheus count as proxied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_size_limit_is_cut_once_and_counted_as_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let target = chunked_target_of_100_kb().await;
    let (gw, agent) = gateway_limited_to_50_kb(&dir, format!("http://{target}/big")).await;
    let mut conn = tokio::net::TcpStream::connect(gw.web).await.unwrap();
    let req = format!(
        "GET http://big:{0}/big HTTP/1.1\r\nHost: big:{0}\r\nConnection: close\r\n\r\n",
        target.port()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got)).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(got.len() < 60_000, "{} bytes arrived", got.len());

    let gw_url = format!("{}/metrics", gw.web_url());
    wait_metric(
        &gw_url,
        "ferry_gateway_scrapes_total",
        &[("agent", "big"), ("status_class", "aborted")],
        |v| v == 1.0,
    )
    .await;
    let text = gateway_metrics(&gw).await;
    let proxied = metric_value(
        &text,
        "ferry_gateway_proxied_bytes_total",
        &[("agent", "big")],
    )
    .expect("proxied bytes of agent big");
    assert!(
        (5.0..=50_000.0).contains(&proxied),
        "only what was passed on counts, never the frame that crossed the limit: {proxied}"
    );
    let cut = logs
        .wait_lines(&["cut at the size limit", "agent=big"], 1, CONNECT_WAIT)
        .await;
    assert!(
        cut[0].contains(&format!("bytes={proxied}"))
            && cut[0].contains("--web.max-scrape-bytes / web.max_scrape_bytes"),
        "{cut:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        logs.lines_with(&["agent=big", "scrape body"]).len(),
        1,
        "one line per scrape"
    );
    agent.stop().await;
    gw.stop().await;
}

/// A target's redirect to an absolute URL would send Prometheus through the gateway to the
/// target's internal address, as an agent id: the agent answers 502 instead, without the
/// Location; a relative redirect stays with the target and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_redirect_is_a_502_that_does_not_show_where_it_points() {
    let logs = common::logs::capture();
    let away = common::servers::canned_server(
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:28200/metrics\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let near = common::servers::canned_server(
        b"HTTP/1.1 301 Moved Permanently\r\nLocation: /metrics/\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let dir = TempDir::new().unwrap();
    let (gw, agent) = gateway_and_agent(
        &dir,
        "moved",
        &[
            ("away", format!("http://{away}/metrics")),
            ("near", format!("http://{near}/metrics")),
        ],
    )
    .await;
    let url = |port: u16| format!("http://moved:{port}/metrics");
    let resp = get_via_proxy(gw.web, &url(away.port()), &[]).await;
    assert_eq!(resp.status, 502, "{:?}", resp.headers);
    assert_eq!(
        assert_one_line(&resp),
        "target \"away\" failed: redirected to another URL; ferry does not follow redirects: set the target URL to the final location"
    );
    assert_eq!(resp.header("location"), None);
    assert_eq!(resp.header("ferry-error"), Some("agent"));
    logs.wait_lines(
        &[
            "target redirected to another URL",
            "scrape_target=away",
            "location=http://127.0.0.1:28200/metrics",
        ],
        1,
        CONNECT_WAIT,
    )
    .await;

    let relative = get_via_proxy(gw.web, &url(near.port()), &[]).await;
    assert_eq!(relative.status, 301);
    assert_eq!(relative.header("location"), Some("/metrics/"));
    agent.stop().await;
    gw.stop().await;
}

/// Scrapes have no body, but a request that has one (a POST through the proxy) is forwarded whole
/// up to 1 MiB; a larger one is refused with 400 and a reason, and never reaches the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_is_forwarded_up_to_one_mib() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    let post = |len: usize| {
        Request::post(s.url("/metrics"))
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Full::new(Bytes::from(vec![b'x'; len])))
            .unwrap()
    };
    let resp = client::send(s.gw.web, post(1000)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = s.target.last_headers().expect("the target got the POST");
    assert_eq!(
        seen.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()),
        Some("1000"),
        "the body reached the target whole: {seen:?}"
    );
    let before = s.target.requests();
    let resp = client::send(s.gw.web, post(2 << 20)).await;
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(
        resp.text().contains("request body") && resp.text().contains("1048576"),
        "{}",
        resp.text()
    );
    assert_eq!(
        s.target.requests(),
        before,
        "the oversized POST reached the target"
    );
    s.stop().await;
}

/// What a target that does not read bodies on GET (Python's http.server) would take for a second
/// request, past the agent's allowlist.
const SMUGGLED: &str = "GET /admin/secret HTTP/1.1\r\nHost: x\r\n\r\n";

/// A scrape has no body: a GET or HEAD carrying one is refused by the gateway with 400, counted
/// under the agent, and nothing of it reaches the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_on_get_is_refused_and_never_reaches_the_target() {
    let dir = TempDir::new().unwrap();
    let target = RawTarget::start(BODY).await;
    let (gw, agent) = gateway_and_agent(&dir, AGENT, &[("node", target.url("/metrics"))]).await;
    let authority = format!("{AGENT}:{}", target.addr.port());
    let get = format!(
        "GET http://{authority}/metrics HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
        SMUGGLED.len()
    );
    let resp = raw_exchange(gw.web, get.as_bytes()).await;
    assert_eq!(resp.status, 400, "{resp:?}");
    let reason = String::from_utf8_lossy(&resp.body).into_owned();
    assert!(
        reason.ends_with('\n') && reason.lines().count() == 1 && reason.contains("no body"),
        "{reason:?}"
    );
    assert_eq!(resp.header("ferry-error").as_deref(), Some("gateway"));
    let head = Request::head(format!("http://{authority}/metrics"))
        .header(header::HOST, authority.as_str())
        .body(Full::new(Bytes::from(SMUGGLED)))
        .unwrap();
    assert_eq!(client::send(gw.web, head).await.status, 400);

    let ok = get_via_proxy(gw.web, &format!("http://{authority}/metrics"), &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(
        target.request_lines(),
        vec!["GET /metrics HTTP/1.1".to_owned()],
        "the target received: {:?}",
        target.received()
    );
    let text = gateway_metrics(&gw).await;
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_scrapes_total",
            &[("agent", AGENT), ("status_class", "4xx")]
        ),
        Some(2.0),
        "{text}"
    );
    agent.stop().await;
    gw.stop().await;
}

/// A POST's body goes to the target, which may not read it (a GET-only exporter): the agent
/// asks for the connection to be closed after the answer, so what the target takes for a
/// second request is never answered into a later scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_sent_on_a_connection_that_is_not_reused() {
    let dir = TempDir::new().unwrap();
    let target = RawTarget::start(BODY).await;
    let (gw, agent) = gateway_and_agent(&dir, AGENT, &[("node", target.url("/metrics"))]).await;
    let url = format!("http://{AGENT}:{}/metrics", target.addr.port());
    let post = Request::post(&url)
        .header(header::HOST, format!("{AGENT}:{}", target.addr.port()))
        .body(Full::new(Bytes::from(SMUGGLED)))
        .unwrap();
    assert_eq!(client::send(gw.web, post).await.status, 200);
    let received = target.received();
    let post_head = received
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        post_head.starts_with("post /metrics") && post_head.contains("\r\nconnection: close"),
        "{received:?}"
    );
    for _ in 0..3 {
        let ok = get_via_proxy(gw.web, &url, &[]).await;
        assert_eq!((ok.status, ok.text().as_str()), (200, BODY));
    }
    let gets = target.received().matches("GET /metrics HTTP/1.1").count();
    assert_eq!(
        gets,
        3,
        "each scrape reached the target: {:?}",
        target.received()
    );
    agent.stop().await;
    gw.stop().await;
}

/// The agent refuses a body on GET too, whatever sent it (defence in depth): nothing of it
/// reaches the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_never_forwards_a_body_on_get() {
    use http_body_util::BodyExt;
    let target = RawTarget::start(BODY).await;
    let (agent, mut tunnel) =
        agent_on_bare_tunnel(AGENT, &[("node", target.url("/metrics"))]).await;
    let uri = format!("http://{AGENT}:{}/metrics", target.addr.port());
    tunnel.ready().await.expect("tunnel ready");
    let smuggling = Request::get(uri.as_str())
        .header(header::CONTENT_LENGTH, SMUGGLED.len())
        .body(Full::new(Bytes::from(SMUGGLED)))
        .unwrap();
    let resp = tunnel.send_request(smuggling).await.expect("agent answers");
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["ferry-error"], "agent");
    let reason = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&reason).contains("no body"),
        "{reason:?}"
    );

    let plain = Request::get(uri.as_str()).body(Full::default()).unwrap();
    let ok = tunnel.send_request(plain).await.expect("agent answers");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.into_body().collect().await.unwrap().to_bytes(), BODY);
    assert_eq!(
        target.request_lines(),
        vec!["GET /metrics HTTP/1.1".to_owned()],
        "the target received: {:?}",
        target.received()
    );
    agent.stop().await;
}

/// A request body through the bare tunnel: a whole one or one that never ends.
type TunnelBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;

fn whole(bytes: impl Into<Bytes>) -> TunnelBody {
    use http_body_util::BodyExt;
    Full::new(bytes.into()).boxed_unsync()
}

/// A request body that never ends and announces no length: 64 KiB chunks, as fast as they are
/// taken.
struct Endless;

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        const CHUNK: &[u8] = &[b'x'; 64 << 10];
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(CHUNK)))))
    }
}

/// The agent's answer through the bare tunnel: status, `ferry-error`, `Allow` and reason.
async fn tunnel_answer(
    tunnel: &mut hyper::client::conn::http2::SendRequest<TunnelBody>,
    req: Request<TunnelBody>,
) -> (u16, String, String, String) {
    use http_body_util::BodyExt;
    tunnel.ready().await.expect("tunnel ready");
    let send = tunnel.send_request(req);
    let resp = tokio::time::timeout(Duration::from_secs(5), send)
        .await
        .expect("the agent answers within 5 s (its scrape timeout is longer)")
        .expect("agent answers");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map_or(String::new(), |v| v.to_str().unwrap().to_owned())
    };
    let (status, source, allow) = (
        resp.status().as_u16(),
        header("ferry-error"),
        header("allow"),
    );
    let reason = resp.into_body().collect().await.unwrap().to_bytes();
    let reason = String::from_utf8_lossy(&reason).into_owned();
    (status, source, allow, reason)
}

/// Whatever the gateway sends (it refuses these itself), the agent forwards no method to a
/// target but GET, HEAD and POST: the same 405 as the gateway's, nothing fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_forwards_no_method_the_gateway_refuses() {
    let target = RawTarget::start(BODY).await;
    let (agent, mut tunnel) =
        agent_on_bare_tunnel::<TunnelBody>(AGENT, &[("node", target.url("/metrics"))]).await;
    let uri = format!("http://{AGENT}:{}/metrics", target.addr.port());
    for method in ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"] {
        let req = Request::builder()
            .method(method)
            .uri(uri.as_str())
            .body(whole(SMUGGLED))
            .unwrap();
        let (status, source, allow, reason) = tunnel_answer(&mut tunnel, req).await;
        assert_eq!(
            (status, source.as_str(), allow.as_str()),
            (405, "agent", "GET, HEAD, POST"),
            "{method}: {reason}"
        );
        assert_eq!(
            reason,
            format!(
                "method {method} is not forwarded: scrapes are GET (HEAD and POST also pass)\n"
            )
        );
    }
    assert_eq!(target.received(), "", "the target was contacted");

    let get = Request::get(uri.as_str()).body(whole("")).unwrap();
    let (status, _, _, body) = tunnel_answer(&mut tunnel, get).await;
    assert_eq!((status, body.as_str()), (200, BODY));
    assert_eq!(
        target.request_lines(),
        vec!["GET /metrics HTTP/1.1".to_owned()]
    );
    let text = client::get(&agent_metrics_url(&agent).await).await.text();
    assert_eq!(
        metric_value(
            &text,
            "ferry_agent_scrapes_total",
            &[("target", "node"), ("result", "bad_request")]
        ),
        Some(6.0),
        "{text}"
    );
    agent.stop().await;
}

/// A POST body over the gateway's limit is refused by the agent too, as the gateway refuses it
/// (400), whether its length is announced or it never ends: read before the target is
/// contacted, never forwarded in part. One at the limit goes whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_post_body_over_the_gateways_limit() {
    let target = RawTarget::start(BODY).await;
    let (agent, mut tunnel) =
        agent_on_bare_tunnel::<TunnelBody>(AGENT, &[("node", target.url("/metrics"))]).await;
    let uri = format!("http://{AGENT}:{}/metrics", target.addr.port());
    let limit = ferry::tunnel::MAX_REQUEST_BODY;
    let refusal = format!(
        "bad scrape request: request body larger than {limit} bytes, the most the agent forwards (a scrape has no body)\n"
    );
    let announced = Request::post(uri.as_str())
        .header(header::CONTENT_LENGTH, limit + 1)
        .body(whole(vec![b'x'; limit + 1]))
        .unwrap();
    let endless = Request::post(uri.as_str())
        .header(TIMEOUT_HEADER, "30")
        .body(http_body_util::BodyExt::boxed_unsync(Endless))
        .unwrap();
    for (what, req) in [("announced", announced), ("endless", endless)] {
        let (status, source, _, reason) = tunnel_answer(&mut tunnel, req).await;
        assert_eq!(
            (status, source.as_str()),
            (400, "agent"),
            "{what}: {reason}"
        );
        assert_eq!(reason, refusal, "{what}");
    }
    assert_eq!(target.received(), "", "the target was contacted");

    let at_limit = Request::post(uri.as_str())
        .body(whole(vec![b'y'; limit]))
        .unwrap();
    let (status, _, _, body) = tunnel_answer(&mut tunnel, at_limit).await;
    assert_eq!((status, body.as_str()), (200, BODY));
    // The target answers once it has the head, which says how much follows.
    let received = target.received();
    let head = received
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase()
        + "\r\n";
    assert!(
        head.starts_with("post /metrics http/1.1\r\n")
            && head.contains(&format!("\r\ncontent-length: {limit}\r\n")),
        "{head:?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_mid_scrape_is_counted_as_failed_on_both_sides() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A target that promises 100,000 bytes, sends a few, and closes.
    let target = common::servers::canned_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial_metric 1\n",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, agent) = gateway_and_agent(
        &dir,
        "breaks",
        &[("half", format!("http://{target}/metrics"))],
    )
    .await;
    // Prometheus's view: the connection closes before the body is whole, after a 200 head; or,
    // when the break is seen before any byte was passed on, a 502 that says so (or that the
    // agent abandoned the scrape, when its reset overtakes its head). Never an empty reply.
    let mut conn = tokio::net::TcpStream::connect(gw.web).await.unwrap();
    let req = format!(
        "GET http://breaks:{}/metrics HTTP/1.1\r\nHost: breaks:{}\r\nConnection: close\r\n\r\n",
        target.port(),
        target.port()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    let abandoned = got.starts_with("HTTP/1.1 502")
        && (got.contains("the agent abandoned the scrape")
            || got.contains("the response body broke before any of it was sent"))
        && !got.contains("unexpected internal error");
    assert!(got.starts_with("HTTP/1.1 200") || abandoned, "{got}");
    assert!(got.len() < 100_000, "the whole body arrived?");
    let class = if abandoned { "5xx" } else { "aborted" };

    let gw_url = format!("{}/metrics", gw.web_url());
    wait_metric(
        &gw_url,
        "ferry_gateway_scrapes_total",
        &[("agent", "breaks"), ("status_class", class)],
        |v| v == 1.0,
    )
    .await;
    let text = gateway_metrics(&gw).await;
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_scrapes_total",
            &[("status_class", "2xx")]
        ),
        None,
        "{text}"
    );
    let agent_url = agent_metrics_url(&agent).await;
    wait_metric(
        &agent_url,
        "ferry_agent_scrapes_total",
        &[("target", "half"), ("result", "error")],
        |v| v == 1.0,
    )
    .await;
    let text = client::get(&agent_url).await.text();
    assert_eq!(
        metric_value(
            &text,
            "ferry_agent_scrapes_total",
            &[("target", "half"), ("result", "ok")]
        ),
        None,
        "{text}"
    );
    agent.stop().await;
}

/// A target that sends its head and then stalls past the scrape timeout: the agent ends the body
/// and says so in its log, and the gateway's log says plainly that the agent ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_by_the_scrape_timeout_is_explained_in_both_logs() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let logs = common::logs::capture();
    let target = common::servers::stalling_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nslow_metric 1\n",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, agent) = gateway_and_agent(
        &dir,
        "dripping",
        &[("drip", format!("http://{target}/metrics"))],
    )
    .await;
    // Prometheus with a 2 s timeout: the agent is told 1.5 s, the gateway gives up at 1.75 s.
    let mut conn = tokio::net::TcpStream::connect(gw.web).await.unwrap();
    let req = format!(
        "GET http://dripping:{0}/metrics HTTP/1.1\r\nHost: dripping:{0}\r\n{TIMEOUT_HEADER}: 2\r\n\r\n",
        target.port()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    let agent_says = logs
        .wait_lines(&["body cut short", "scrape_target=drip"], 1, CONNECT_WAIT)
        .await;
    assert!(
        agent_says[0].contains("bytes=14") && agent_says[0].contains("timeout=1.5s"),
        "{agent_says:?}"
    );
    let gateway_says = logs
        .wait_lines(&["scrape body broke", "agent=dripping"], 1, CONNECT_WAIT)
        .await;
    // The agent's cut (at 1.5 s) usually reaches the gateway before its own deadline (1.75 s);
    // on a loaded machine the deadline may come first, which the line then says instead.
    assert!(
        (gateway_says[0].contains("the agent ended the body")
            && gateway_says[0].contains("see the agent's log")
            || gateway_says[0].contains("still streaming at the deadline"))
            && !gateway_says[0].contains("unexpected internal error"),
        "{gateway_says:?}"
    );
    let agent_url = agent_metrics_url(&agent).await;
    wait_metric(
        &agent_url,
        "ferry_agent_scrapes_total",
        &[("target", "drip"), ("result", "timeout")],
        |v| v == 1.0,
    )
    .await;
    agent.stop().await;
}

/// Total tunnel handshakes the gateway has counted: a tunnel that dropped and came back adds one.
async fn handshakes(gw: &TestGateway) -> f64 {
    let text = gateway_metrics(gw).await;
    text.lines()
        .filter(|l| l.starts_with("ferry_gateway_tunnel_handshakes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_without_cutting_the_tunnel() {
    let dir = TempDir::new().unwrap();
    let small = TargetServer::start(Behaviour::Metrics(BODY.into())).await;
    let loud = TargetServer::start(Behaviour::WithHeaders {
        body: BODY.into(),
        headers: (0..30)
            .map(|i| (format!("x-big-{i}"), "v".repeat(2000)))
            .collect(),
    })
    .await;
    let (gw, agent) = gateway_and_agent(
        &dir,
        AGENT,
        &[
            ("node", small.url("/metrics")),
            ("loud", loud.url("/metrics")),
        ],
    )
    .await;
    let before = handshakes(&gw).await;
    assert!(before >= 1.0, "the agent's handshake is counted");
    let url = format!("http://{AGENT}:{}/metrics", small.addr.port());

    // Prometheus's side: one huge header, or many large ones.
    let huge = "A".repeat(100_000);
    let many: Vec<(String, String)> = (0..40)
        .map(|i| (format!("x-h{i}"), "b".repeat(1000)))
        .collect();
    let mut many_refs: Vec<(&str, &str)> =
        many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for headers in [
        vec![("x-big", huge.as_str())],
        std::mem::take(&mut many_refs),
    ] {
        let resp = get_via_proxy(gw.web, &url, &headers).await;
        assert_eq!(resp.status, 431, "{}", resp.text());
        assert_eq!(resp.header("ferry-error"), Some("gateway"));
        assert!(
            resp.text().contains("more than the tunnel carries"),
            "{}",
            resp.text()
        );
    }
    assert_eq!(small.requests(), 0, "refused scrapes reached the target");

    // The target's side: response headers the tunnel cannot carry.
    let loud_url = format!("http://{AGENT}:{}/metrics", loud.addr.port());
    let resp = get_via_proxy(gw.web, &loud_url, &[]).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(resp.header("ferry-error"), Some("agent"));
    assert!(
        resp.text().contains("response headers of"),
        "{}",
        resp.text()
    );

    // The tunnel stayed up: the next scrape works, and no new handshake happened.
    let ok = get_via_proxy(gw.web, &url, &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.text(), BODY);
    assert_eq!(
        handshakes(&gw).await,
        before,
        "the tunnel was re-established"
    );
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_get_head_and_post_reach_a_target() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    for method in ["DELETE", "PUT", "PATCH", "TRACE"] {
        let req = Request::builder()
            .method(method)
            .uri(s.url("/metrics"))
            .header(header::HOST, format!("{AGENT}:{}", s.target.addr.port()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client::send(s.gw.web, req).await;
        assert_eq!(resp.status, 405, "{method}: {}", resp.text());
        assert_eq!(resp.header("allow"), Some("GET, HEAD, POST"), "{method}");
        assert_eq!(resp.header("ferry-error"), Some("gateway"), "{method}");
    }
    assert_eq!(s.target.requests(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_is_no_port_is_400_and_a_hopeless_timeout_fetches_nothing() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    for port in ["0", "65536", "99999999999", "abc"] {
        let url = format!("http://{AGENT}:{port}/metrics");
        let resp = get_via_proxy(s.gw.web, &url, &[]).await;
        assert_eq!(resp.status, 400, "{url}: {}", resp.text());
        assert!(resp.text().contains("is not a port"), "{}", resp.text());
    }
    let resp = s.scrape("/metrics", &[(TIMEOUT_HEADER, "0.0001")]).await;
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert_eq!(s.target.requests(), 0, "fetched although no time was left");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_fixed_in_a_target_url_cannot_be_given_again() {
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Metrics(BODY.into())).await;
    let url = target.url("/probe?target=db1&module=tcp");
    let (gw, agent) = gateway_and_agent(&dir, AGENT, &[("probe", url)]).await;
    let scrape = format!(
        "http://{AGENT}:{}/probe?target=evil.example&targ%65t=evil2&module=http&debug=true",
        target.addr.port()
    );
    let resp = get_via_proxy(gw.web, &scrape, &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        target.uris(),
        vec!["/probe?target=db1&module=tcp&debug=true".to_owned()]
    );
    // Some exporters split the query on ';' as on '&'.
    for query in ["x=1;target=evil.example", "x=1&module=http;target=evil"] {
        let scrape = format!("http://{AGENT}:{}/probe?{query}", target.addr.port());
        let resp = get_via_proxy(gw.web, &scrape, &[]).await;
        assert_eq!(resp.status, 400, "{query}: {}", resp.text());
        let reason = assert_one_line(&resp);
        assert!(reason.contains("';'"), "{reason:?}");
        assert_eq!(resp.header("ferry-error"), Some("agent"));
    }
    assert_eq!(target.requests(), 1, "{:?}", target.uris());
    agent.stop().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_cannot_pass_for_ferry() {
    let s = Setup::start(Behaviour::WithHeaders {
        body: BODY.into(),
        headers: vec![("ferry-error".into(), "agent".into())],
    })
    .await;
    let resp = s.scrape("/metrics", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("ferry-error"), None, "{:?}", resp.headers);
    s.stop().await;
}

/// `promtool check metrics` (Debian `prometheus`) accepts what the gateway and the agent expose
/// to a client that does not ask for OpenMetrics (curl, promtool, older scrapers); Prometheus,
/// which asks for it, gets OpenMetrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_text_format_unless_openmetrics_is_asked_for() {
    let s = Setup::start(Behaviour::Metrics(BODY.into())).await;
    // One scrape, so that the per-agent series exist.
    assert_eq!(s.scrape("/metrics", &[]).await.status, 200);
    let agent_metrics = format!("http://{AGENT}:9369/metrics");
    for (what, resp) in [
        (
            "gateway",
            client::get(&format!("http://{}/metrics", s.gw.web)).await,
        ),
        ("agent", get_via_proxy(s.gw.web, &agent_metrics, &[]).await),
    ] {
        assert_eq!(resp.status, 200, "{what}");
        assert_eq!(
            resp.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "{what}"
        );
        let text = resp.text();
        assert!(!text.contains("# EOF"), "{what}: {text}");
        let mut promtool = std::process::Command::new("/usr/bin/promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus) is installed");
        use std::io::Write as _;
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{what}: promtool: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let om = get_via_proxy(
        s.gw.web,
        &agent_metrics,
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )],
    )
    .await;
    assert!(
        om.header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        om.header("content-type")
    );
    assert!(om.text().ends_with("# EOF\n"));
    s.stop().await;
}

/// Scrapes `url` through `gw` on a raw connection and returns every byte it got back (an empty
/// reply is no bytes at all).
async fn raw_scrape(gw: &TestGateway, agent: &str, port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(gw.web).await.unwrap();
    let req = format!(
        "GET http://{agent}:{port}/metrics HTTP/1.1\r\nHost: {agent}:{port}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// A target whose body breaks before any of it could be passed on (it sends its head and closes,
/// or cuts its first chunk short) is a 502 with a reason, from whichever side saw it first; never
/// an empty reply, which hyper sends when the break reaches it in the same go as the head. One
/// that breaks after some bytes is a 502 as well, or a 200 head with the body cut (`aborted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_before_its_first_byte_is_a_502_with_a_reason() {
    use common::servers::canned_server;
    let head_only = canned_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n",
    )
    .await;
    let half = canned_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\npartial_metric 1\n",
    )
    .await;
    let cut_chunk = canned_server(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\ncut_metric 1\n",
    )
    .await;
    let dir = TempDir::new().unwrap();
    let (gw, agent) = gateway_and_agent(
        &dir,
        "early",
        &[
            ("head-only", format!("http://{head_only}/metrics")),
            ("half", format!("http://{half}/metrics")),
            ("cut-chunk", format!("http://{cut_chunk}/metrics")),
        ],
    )
    .await;
    let mut broke_early = 0;
    for round in 0..20 {
        let got = raw_scrape(&gw, "early", head_only.port()).await;
        assert!(got.starts_with("HTTP/1.1 502"), "round {round}: {got:?}");
        let lower = got.to_ascii_lowercase();
        assert!(lower.contains("\r\nferry-error: "), "{got}");
        let reason = got.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert!(
            reason.ends_with('\n')
                && reason.lines().count() == 1
                && reason.contains("the response body broke before any of it was sent"),
            "{reason:?}"
        );
        for port in [half.port(), cut_chunk.port()] {
            let got = raw_scrape(&gw, "early", port).await;
            assert!(
                got.starts_with("HTTP/1.1 502") || got.starts_with("HTTP/1.1 200"),
                "round {round}, an empty or odd reply: {got:?}"
            );
            // A 502 says why: the body broke, or the agent's reset of the stream overtook its
            // head on the way.
            if got.starts_with("HTTP/1.1 502") {
                assert!(
                    got.contains("body broke") || got.contains("the agent abandoned the scrape"),
                    "{got}"
                );
                broke_early += 1;
            }
        }
    }
    let text = gateway_metrics(&gw).await;
    let counted = |class: &str| {
        metric_value(
            &text,
            "ferry_gateway_scrapes_total",
            &[
                ("agent", "early"),
                ("target", "head-only"),
                ("status_class", class),
            ],
        )
    };
    assert_eq!(counted("5xx"), Some(20.0), "{text}");
    assert_eq!(counted("2xx"), None, "{text}");
    eprintln!("{broke_early} of 40 broken bodies answered 502, the rest cut after a 200 head");
    agent.stop().await;
    gw.stop().await;
}

/// A scrape whose client gives up (a Prometheus timeout, `curl -m 1`) is counted `cancelled` on
/// the gateway and on the agent, before the answer (the target still fetching) and during its
/// body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_its_client_gives_up_on_is_counted_cancelled_on_both_sides() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new().unwrap();
    let slow = TargetServer::start(Behaviour::Slow {
        delay: Duration::from_secs(30),
        body: BODY.into(),
    })
    .await;
    let big = TargetServer::start(Behaviour::Large {
        bytes: 200 * 1024 * 1024,
    })
    .await;
    let (gw, agent) = gateway_and_agent(
        &dir,
        AGENT,
        &[("slow", slow.url("/metrics")), ("big", big.url("/metrics"))],
    )
    .await;
    let agent_url = agent_metrics_url(&agent).await;
    let gw_url = format!("{}/metrics", gw.web_url());
    let request = |port: u16| {
        format!(
            "GET http://{AGENT}:{port}/metrics HTTP/1.1\r\nHost: {AGENT}:{port}\r\n{TIMEOUT_HEADER}: 60\r\n\r\n"
        )
    };

    // Given up while the target is still working on it.
    let mut conn = tokio::net::TcpStream::connect(gw.web).await.unwrap();
    conn.write_all(request(slow.addr.port()).as_bytes())
        .await
        .unwrap();
    wait_for_requests(&slow, 1).await;
    drop(conn);
    for (url, name, labels) in [
        (
            &gw_url,
            "ferry_gateway_scrapes_total",
            [("target", "slow"), ("status_class", "cancelled")],
        ),
        (
            &agent_url,
            "ferry_agent_scrapes_total",
            [("target", "slow"), ("result", "cancelled")],
        ),
    ] {
        wait_metric(url, name, &labels, |v| v == 1.0).await;
    }

    // Given up halfway through the body.
    let mut conn = tokio::net::TcpStream::connect(gw.web).await.unwrap();
    conn.write_all(request(big.addr.port()).as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 1024 * 1024 {
        got += conn.read(&mut buf).await.unwrap();
    }
    drop(conn);
    wait_metric(
        &gw_url,
        "ferry_gateway_scrapes_total",
        &[("target", "big"), ("status_class", "cancelled")],
        |v| v == 1.0,
    )
    .await;
    wait_metric(
        &agent_url,
        "ferry_agent_scrapes_total",
        &[("target", "big"), ("result", "cancelled")],
        |v| v == 1.0,
    )
    .await;
    let text = gateway_metrics(&gw).await;
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_scrapes_total",
            &[("target", "big"), ("status_class", "2xx")]
        ),
        None,
        "{text}"
    );
    agent.stop().await;
    gw.stop().await;
}
