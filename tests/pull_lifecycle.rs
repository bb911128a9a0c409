//! The tunnel's lifecycle on loopback: peers restart, ids collide, middleboxes cut idle
//! connections, targets change, and shutdown drains — each judged by what Prometheus (a scrape
//! through the gateway) and an operator (`/targets`, `/metrics`) see.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ferry::{
    agent_publishing_on, agent_section, gateway_and_agent, metric_value, start_agent,
    start_gateway, start_gateway_on, start_gateway_process_on, tokens_file, upgrade_as_agent,
    TestGateway,
};
use common::http::{self, Resp};
use common::proxy::ConnectProxy;
use common::servers::{Behaviour, TargetServer};
use ferry::agent::Agent;
use ferry::config::Dur;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-token";
/// Port of the agent's built-in `ferry` target (its own metrics).
const SELF_PORT: u16 = 9369;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A target server answering `body` as metrics.
async fn metrics_server(body: &str) -> TargetServer {
    TargetServer::start(Behaviour::Metrics(body.to_owned())).await
}

/// `http://<agent>:<port>/metrics`, the URL Prometheus sends to the gateway.
fn scrape_url(agent: &str, port: u16) -> String {
    format!("http://{agent}:{port}/metrics")
}

/// The scrape URL of `server`'s `/metrics` on `agent`.
fn target_url(agent: &str, server: &TargetServer) -> String {
    scrape_url(agent, server.addr.port())
}

/// A scrape through the gateway's web listener at `web`.
async fn scrape(web: SocketAddr, url: &str) -> Resp {
    http::get_via_proxy(web, url, &[]).await
}

/// Polls `check` every 50 ms until it returns `Ok`, panicking with its last complaint after `timeout`.
async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            start.elapsed() < timeout,
            "{what}: not within {timeout:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a scrape of `url` through `web` answers 200 with `body`.
async fn wait_scrape_body(web: SocketAddr, url: &str, body: &str, timeout: Duration) {
    wait_for(
        &format!("scrape {url} answers 200 {body:?}"),
        timeout,
        || async move {
            match http::try_get_via_proxy(web, url, &[]).await {
                Ok(r) if r.status == 200 && r.text() == body => Ok(()),
                Ok(r) => Err(format!("{} {:?}", r.status, r.text())),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
}

/// The gateway's own `/metrics` exposition.
async fn gateway_metrics(web: SocketAddr) -> String {
    let resp = http::get(&format!("http://{web}/metrics")).await;
    assert_eq!(resp.status, 200, "gateway /metrics: {}", resp.text());
    resp.text()
}

/// The agent's own metrics, scraped like Prometheus would: its built-in `ferry` target through the gateway.
async fn agent_metrics(web: SocketAddr, agent: &str) -> String {
    let resp = scrape(web, &scrape_url(agent, SELF_PORT)).await;
    assert_eq!(
        resp.status,
        200,
        "scrape of {agent}'s own metrics: {}",
        resp.text()
    );
    resp.text()
}

/// `ferry_agent_tunnel_connects_total{result="ok"}` of `agent`, read through the gateway.
async fn agent_ok_connects(web: SocketAddr, agent: &str) -> f64 {
    let text = agent_metrics(web, agent).await;
    metric_value(
        &text,
        "ferry_agent_tunnel_connects_total",
        &[("result", "ok")],
    )
    .unwrap_or_else(|| panic!("no ferry_agent_tunnel_connects_total{{result=\"ok\"}} in:\n{text}"))
}

/// Serves `agent`'s local `/metrics` on a fresh loopback port (until the test's runtime ends).
async fn serve_agent_web(agent: &Agent) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let agent = agent.clone();
    tokio::spawn(async move { agent.serve_web(listener, CancellationToken::new()).await });
    addr
}

/// `ferry_agent_tunnel_connects_total{result="ok"}` from an agent's local web listener.
async fn local_ok_connects(agent_web: SocketAddr) -> f64 {
    let text = http::get(&format!("http://{agent_web}/metrics"))
        .await
        .text();
    metric_value(
        &text,
        "ferry_agent_tunnel_connects_total",
        &[("result", "ok")],
    )
    .unwrap_or_else(|| panic!("no ferry_agent_tunnel_connects_total{{result=\"ok\"}} in:\n{text}"))
}

/// Waits until the agent whose web listener is `agent_web` has opened its second tunnel (it
/// came back after its first was closed); `what` says what the test waits for.
async fn wait_second_tunnel(agent_web: SocketAddr, what: &str, timeout: Duration) {
    wait_for(what, timeout, || async {
        match local_ok_connects(agent_web).await {
            n if n >= 2.0 => Ok(()),
            n => Err(format!("still on its first tunnel ({n} ok connects)")),
        }
    })
    .await;
}

/// Rotates the token of `glob` from `old` to `new` as the README says: the new line added and
/// the tokens file reloaded, `new` written into the agent's `token_file`, the old line removed
/// and the tokens file reloaded.
fn rotate_token(gw: &TestGateway, glob: &str, old: &str, new: &str, token_file: &Path) {
    tokens_file(&gw.dir, &[(glob, old), (glob, new)]);
    gw.gateway.reload_tokens().unwrap();
    std::fs::write(token_file, format!("{new}\n")).unwrap();
    tokens_file(&gw.dir, &[(glob, new)]);
    gw.gateway.reload_tokens().unwrap();
}

/// Starts an agent that reads `token` from a token file in `gw`'s directory, as `section` says
/// otherwise; returns it with the file, for [`rotate_token`].
fn start_agent_with_token_file(
    gw: &TestGateway,
    mut section: ferry::config::AgentSection,
    token: &str,
) -> (common::ferry::TestAgent, std::path::PathBuf) {
    let token_file = gw.dir.join("agent-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    section.token_file = Some(token_file.clone());
    (
        start_agent(section, "unused: the token file wins"),
        token_file,
    )
}

/// Service discovery as Prometheus reads it: `(target address, ferry_target label)` of every group.
async fn sd_targets(web: SocketAddr) -> Result<Vec<(String, String)>, String> {
    let resp = http::try_get(&format!("http://{web}/targets"), &[])
        .await
        .map_err(|e| e.to_string())?;
    if resp.status != 200 {
        return Err(format!(
            "/targets answered {}: {}",
            resp.status,
            resp.text()
        ));
    }
    let groups: serde_json::Value =
        serde_json::from_slice(&resp.body).map_err(|e| format!("/targets is not JSON: {e}"))?;
    let groups = groups.as_array().ok_or("/targets is not a JSON array")?;
    Ok(groups
        .iter()
        .flat_map(|g| {
            let name = g["labels"]["ferry_target"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let addrs = g["targets"].as_array().cloned().unwrap_or_default();
            addrs
                .into_iter()
                .map(move |a| (a.as_str().unwrap_or_default().to_owned(), name.clone()))
        })
        .collect())
}

/// Waits until `/targets` lists `present` (address, name) and none of `absent`.
async fn wait_sd(
    web: SocketAddr,
    present: &[(String, &str)],
    absent: &[(String, &str)],
    timeout: Duration,
) {
    wait_for(
        "/targets shows the expected targets",
        timeout,
        || async move {
            let listed = sd_targets(web).await?;
            let has =
                |(addr, name): &(String, &str)| listed.iter().any(|(a, n)| a == addr && n == name);
            if present.iter().all(has) && !absent.iter().any(has) {
                Ok(())
            } else {
                Err(format!(
                    "listed {listed:?}; want {present:?}, not {absent:?}"
                ))
            }
        },
    )
    .await;
}

/// The groups `/targets` lists for agent `id`, as Prometheus reads them.
async fn sd_groups_of(web: SocketAddr, id: &str) -> Vec<serde_json::Value> {
    let resp = http::get(&format!("http://{web}/targets")).await;
    assert_eq!(resp.status, 200, "/targets: {}", resp.text());
    let groups: serde_json::Value = serde_json::from_slice(&resp.body).expect("/targets is JSON");
    groups
        .as_array()
        .expect("/targets is an array")
        .iter()
        .filter(|g| g["labels"]["ferry_agent"] == id)
        .cloned()
        .collect()
}

/// The agent ids `/targets` lists, sorted.
async fn sd_agents(web: SocketAddr) -> Vec<String> {
    let resp = http::get(&format!("http://{web}/targets")).await;
    let groups: serde_json::Value = serde_json::from_slice(&resp.body).expect("/targets is JSON");
    let mut ids: Vec<String> = groups
        .as_array()
        .expect("/targets is an array")
        .iter()
        .filter_map(|g| g["labels"]["ferry_agent"].as_str().map(str::to_owned))
        .collect();
    ids.dedup();
    ids
}

/// `ferry_gateway_agents_connected` and `ferry_gateway_agents_disconnected`.
async fn agent_gauges(web: SocketAddr) -> (f64, f64) {
    let text = gateway_metrics(web).await;
    let value =
        |name| metric_value(&text, name, &[]).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    (
        value("ferry_gateway_agents_connected"),
        value("ferry_gateway_agents_disconnected"),
    )
}

/// Binds `addr` again, retrying while the old listener's port is still being released.
async fn rebind(addr: SocketAddr) -> TcpListener {
    let start = Instant::now();
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(5),
                "cannot bind {addr} again: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Gateway restart
// ---------------------------------------------------------------------------------------------

/// The gateway restarts on the same ports and data dir: the agent reconnects by itself (pinned to
/// the same self-signed certificate) and scrapes work again without anyone touching the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_gateway_restart() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let server = metrics_server("up_metric 1\n").await;
    let (gw, agent) = gateway_and_agent(&dir, "node-1", &[("node", server.url("/metrics"))]).await;
    let url = target_url("node-1", &server);
    assert_eq!(scrape(gw.web, &url).await.status, 200);

    let (web, tunnel, fingerprint) = (gw.web, gw.tunnel, gw.fingerprint());
    gw.stop().await;
    let down = http::try_get_via_proxy(web, &url, &[]).await;
    assert!(
        down.is_err(),
        "a scrape with the gateway stopped got an answer: {:?}",
        down.map(|r| r.status)
    );
    wait_for(
        "agent notices the gateway is gone",
        Duration::from_secs(5),
        || async {
            if agent.agent.is_connected() {
                Err("agent still reports its tunnel up".into())
            } else {
                Ok(())
            }
        },
    )
    .await;
    // The gateway said it was shutting down: the attempts while it restarts are expected, said
    // at info level, not warnings.
    logs.wait_lines(
        &[
            "INFO",
            "cannot open tunnel yet: the gateway said it was shutting down",
        ],
        2,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        logs.lines_with(&["WARN", "cannot open tunnel"]),
        Vec::<String>::new()
    );

    let (web_l, tunnel_l) = (rebind(web).await, rebind(tunnel).await);
    let gw2 = start_gateway_on(&dir, &[("*", TOKEN)], web_l, tunnel_l, |_| {}).await;
    assert_eq!(
        gw2.fingerprint(),
        fingerprint,
        "the restarted gateway must reuse its self-signed certificate"
    );

    wait_scrape_body(web, &url, "up_metric 1\n", Duration::from_secs(10)).await;
    assert!(agent.agent.is_connected());
    assert_eq!(gw2.agent_ids(), vec!["node-1".to_owned()]);
    assert_eq!(
        agent_ok_connects(web, "node-1").await,
        2.0,
        "one tunnel per gateway life"
    );

    agent.stop().await;
    gw2.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Agent restart
// ---------------------------------------------------------------------------------------------

/// The agent stops: its scrapes are answered 503 at once, and it stays in `/targets` with the
/// same groups, so that Prometheus records `up == 0` for each of its targets instead of
/// forgetting them; the gateway counts it as disconnected. Back with another target list, the
/// new list replaces the kept one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_stays_listed_as_down_until_it_reconnects() {
    let dir = TempDir::new().unwrap();
    let (old_server, new_server) = (
        metrics_server("before 1\n").await,
        metrics_server("restarted 1\n").await,
    );
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let with_label = |targets: &[(&str, String)]| {
        let mut section = agent_section(&gw, "node-2", targets);
        section.labels = [("site".to_owned(), "berlin".to_owned())].into();
        section
    };
    let agent = start_agent(with_label(&[("node", old_server.url("/metrics"))]), TOKEN);
    gw.wait_agent("node-2", Duration::from_secs(10)).await;
    let url = target_url("node-2", &old_server);
    assert_eq!(scrape(gw.web, &url).await.status, 200);
    let listed = sd_groups_of(gw.web, "node-2").await;
    assert_eq!(
        listed.len(),
        2,
        "its target and its own metrics: {listed:?}"
    );

    agent.stop().await;
    gw.wait_agent_gone("node-2", Duration::from_secs(5)).await;
    let asked = Instant::now();
    let resp = scrape(gw.web, &url).await;
    assert_eq!(
        resp.status,
        503,
        "scrape of a stopped agent: {}",
        resp.text()
    );
    assert!(resp.text().contains("not connected"), "{}", resp.text());
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "answered at once, not after a timeout: {:?}",
        asked.elapsed()
    );
    assert_eq!(resp.header("ferry-error"), Some("gateway"));
    assert_eq!(
        sd_groups_of(gw.web, "node-2").await,
        listed,
        "a stopped agent keeps its groups in /targets, labels and all"
    );
    assert_eq!(agent_gauges(gw.web).await, (0.0, 1.0));
    let requests_while_down = old_server.requests();

    let agent2 = start_agent(with_label(&[("app", new_server.url("/metrics"))]), TOKEN);
    gw.wait_agent("node-2", Duration::from_secs(10)).await;
    let (old_addr, new_addr) = (
        (format!("node-2:{}", old_server.addr.port()), "node"),
        (format!("node-2:{}", new_server.addr.port()), "app"),
    );
    wait_sd(gw.web, &[new_addr], &[old_addr], Duration::from_secs(5)).await;
    assert_eq!(sd_groups_of(gw.web, "node-2").await.len(), 2);
    assert_eq!(agent_gauges(gw.web).await, (1.0, 0.0));
    let resp = scrape(gw.web, &target_url("node-2", &new_server)).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "restarted 1\n"));
    assert_eq!(old_server.requests(), requests_while_down);

    agent2.stop().await;
    gw.stop().await;
}

/// A second `run` of a running agent (or a clone) is refused at once: two tunnels with one id
/// would take it from each other at the gateway. Once the first run has returned, the same agent
/// runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_refuses_a_second_run_and_runs_again_after_stopping() {
    let dir = TempDir::new().unwrap();
    let server = metrics_server("once 1\n").await;
    let targets = [("node", server.url("/metrics"))];
    let (gw, agent) = gateway_and_agent(&dir, "node-3", &targets).await;
    let url = target_url("node-3", &server);
    let embedded = agent.agent.clone();

    let second = tokio::time::timeout(
        Duration::from_secs(5),
        embedded.clone().run(CancellationToken::new()),
    )
    .await
    .expect("a second run returns at once");
    let err = second.expect_err("a second concurrent run is refused");
    assert_eq!(
        err.to_string(),
        "agent \"node-3\" is already running: one agent (and its clones) runs one tunnel at a time"
    );
    let resp = scrape(gw.web, &url).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "once 1\n"));
    assert_eq!(agent_ok_connects(gw.web, "node-3").await, 1.0);

    agent.stop().await;
    gw.wait_agent_gone("node-3", Duration::from_secs(5)).await;
    let stop = CancellationToken::new();
    let rerun = tokio::spawn(embedded.clone().run(stop.clone()));
    gw.wait_agent("node-3", Duration::from_secs(10)).await;
    let resp = scrape(gw.web, &url).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "once 1\n"));
    assert!(embedded.is_connected());

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), rerun)
        .await
        .expect("the second run stops")
        .unwrap()
        .expect("the second run ran");
    gw.stop().await;
}

/// The gateway's lines of `/metrics` labelled with agent `id`.
async fn series_of(web: SocketAddr, id: &str) -> Vec<String> {
    let label = format!("agent=\"{id}\"");
    gateway_metrics(web)
        .await
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .map(str::to_owned)
        .collect()
}

/// Waits until the gateway has counted `n` scrapes of `id`'s target `node` that answered 2xx.
async fn wait_ok_scrapes(web: SocketAddr, id: &str, n: f64) {
    let labels = [("agent", id), ("target", "node"), ("status_class", "2xx")];
    wait_for(
        &format!("{n} ok scrapes of {id} counted"),
        Duration::from_secs(5),
        || async move {
            let text = gateway_metrics(web).await;
            match metric_value(&text, "ferry_gateway_scrapes_total", &labels) {
                Some(v) if v == n => Ok(()),
                v => Err(format!("ferry_gateway_scrapes_total = {v:?}")),
            }
        },
    )
    .await;
}

/// An agent's series leave the gateway's `/metrics` when it disconnects, so that ids that come
/// and go (glob tokens, autoscaled hosts) do not pile up; back again, it counts from zero. A
/// tunnel replaced by a newer one of the same id is no disconnect: the series stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_agents_series_leave_the_gateway_metrics() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let server = metrics_server("up 1\n").await;
    let (gw, agent) = gateway_and_agent(&dir, "node-7", &[("node", server.url("/metrics"))]).await;
    let url = target_url("node-7", &server);
    assert_eq!(scrape(gw.web, &url).await.status, 200);
    let missing = scrape(gw.web, &scrape_url("node-7", 1)).await;
    assert_eq!(missing.status, 404, "{}", missing.text());
    wait_ok_scrapes(gw.web, "node-7", 1.0).await;
    let series = series_of(gw.web, "node-7").await;
    for name in [
        "ferry_gateway_scrapes_total",
        "ferry_gateway_scrape_duration_seconds_bucket",
        "ferry_gateway_proxied_bytes_total",
    ] {
        assert!(
            series.iter().any(|l| l.starts_with(name)),
            "no {name} of node-7: {series:#?}"
        );
    }

    agent.stop().await;
    gw.wait_agent_gone("node-7", Duration::from_secs(5)).await;
    assert_eq!(scrape(gw.web, &url).await.status, 503);
    assert_eq!(series_of(gw.web, "node-7").await, Vec::<String>::new());

    // Back again: its counts start fresh. Slow to come back once replaced, below.
    let mut section = agent_section(&gw, "node-7", &[("node", server.url("/metrics"))]);
    section.reconnect.auth_failure_backoff = Dur(Duration::from_secs(60));
    let again = start_agent(section, TOKEN);
    gw.wait_agent("node-7", Duration::from_secs(10)).await;
    assert_eq!(scrape(gw.web, &url).await.status, 200);
    wait_ok_scrapes(gw.web, "node-7", 1.0).await;

    let newer = start_agent(
        agent_section(&gw, "node-7", &[("node", server.url("/metrics"))]),
        TOKEN,
    );
    // The replaced tunnel's end, as the gateway logs it, is no disconnect of the id.
    logs.wait_lines(
        &["agent disconnected", "node-7", "replaced by a newer tunnel"],
        1,
        Duration::from_secs(10),
    )
    .await;
    wait_ok_scrapes(gw.web, "node-7", 1.0).await;
    assert_eq!(scrape(gw.web, &url).await.status, 200);
    wait_ok_scrapes(gw.web, "node-7", 2.0).await;

    again.stop().await;
    newer.stop().await;
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Duplicate id
// ---------------------------------------------------------------------------------------------

/// Removing a token's line and reloading the tokens file (SIGHUP) cuts off the agents already
/// connected with it, not only their next connection; the others stay. The gateway tells the
/// agent why, which logs it loudly at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_removed_on_reload_closes_the_tunnels_using_it() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("web-*", "leaked"), ("db-*", "kept")], |_| {}).await;
    let server = metrics_server("up 1\n").await;
    let targets = [("node", server.url("/metrics"))];
    let leaked = start_agent(agent_section(&gw, "web-1", &targets), "leaked");
    let kept = start_agent(agent_section(&gw, "db-1", &targets), "kept");
    gw.wait_agent("web-1", Duration::from_secs(10)).await;
    gw.wait_agent("db-1", Duration::from_secs(10)).await;

    tokens_file(dir.path(), &[("db-*", "kept")]);
    assert_eq!(gw.gateway.reload_tokens().unwrap(), 1);

    gw.wait_agent_gone("web-1", Duration::from_secs(5)).await;
    let told = logs
        .wait_lines(&["GATEWAY REVOKED OUR TOKEN"], 1, Duration::from_secs(5))
        .await;
    assert!(
        told[0].contains("ERROR")
            && told[0].contains("tokens file was reloaded")
            && told[0].contains("\"web-1\""),
        "{told:?}"
    );
    assert!(logs.lines_with(&["GATEWAY CLOSED OUR TUNNEL"]).is_empty());
    let resp = scrape(gw.web, &target_url("web-1", &server)).await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    let resp = scrape(gw.web, &target_url("db-1", &server)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    // Cut off, not gone: it is not kept in service discovery as a disconnected agent.
    assert_eq!(sd_agents(gw.web).await, ["db-1"]);
    assert_eq!(agent_gauges(gw.web).await, (1.0, 0.0));
    // It does not come back: its token is refused now.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(gw.agent_ids(), vec!["db-1".to_owned()]);
    leaked.stop().await;
    kept.stop().await;
    gw.stop().await;
}

/// A tunnel whose token is revoked while it is still registering (its target list not sent yet)
/// does not stay: the reload's sweep of connected agents cannot see it, so it checks itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_while_its_tunnel_registers_does_not_get_in() {
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("web-*", "leaked"), ("db-*", "kept")], |_| {}).await;
    let server = metrics_server("up 1\n").await;
    let upgraded = upgrade_as_agent(&gw, "leaked", "web-9")
        .await
        .expect("the token is still valid at the upgrade");
    let (release, gate) = tokio::sync::oneshot::channel::<()>();
    let targets = format!(
        r#"{{"version":1,"labels":{{}},"targets":[{{"name":"node","port":{},"path":"/metrics","labels":{{}}}}]}}"#,
        server.addr.port()
    );
    let hostile = agent_publishing_on(upgraded, targets, async move {
        let _ = gate.await;
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    tokens_file(dir.path(), &[("db-*", "kept")]);
    assert_eq!(gw.gateway.reload_tokens().unwrap(), 1);
    release.send(()).unwrap();

    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(gw.agent_ids().is_empty(), "{:?}", gw.agent_ids());
    let resp = scrape(gw.web, &target_url("web-9", &server)).await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    // Nor is it kept in service discovery as an agent gone away.
    let sd = http::get(&format!("{}/targets", gw.web_url())).await;
    assert!(!sd.text().contains("web-9"), "{}", sd.text());
    assert_eq!(server.requests(), 0);
    hostile.abort();
    gw.stop().await;
}

/// A gateway whose tokens file lets `db-*` in, and agent `db-1` connected to it, serving the
/// target `node` of the returned server: for tests of what a tokens file reload keeps.
async fn connected_db_agent(
    dir: &TempDir,
) -> (TestGateway, common::ferry::TestAgent, TargetServer) {
    let gw = start_gateway(dir, &[("db-*", "kept")], |_| {}).await;
    let server = metrics_server("up 1\n").await;
    let agent = start_agent(
        agent_section(&gw, "db-1", &[("node", server.url("/metrics"))]),
        "kept",
    );
    gw.wait_agent("db-1", Duration::from_secs(10)).await;
    (gw, agent, server)
}

/// A tokens file caught empty (an editor or a config tool rewriting it) is not applied: it would
/// lock out every agent at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_file_that_lost_every_line_is_not_applied() {
    let dir = TempDir::new().unwrap();
    let (gw, agent, server) = connected_db_agent(&dir).await;
    std::fs::write(dir.path().join("tokens"), "# being rewritten\n").unwrap();
    let err = gw.gateway.reload_tokens().unwrap_err().to_string();
    assert!(
        err.contains("holds no credentials any more (it had 1)")
            && err.contains("the previous credentials stay"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = scrape(gw.web, &target_url("db-1", &server)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    agent.stop().await;
    gw.stop().await;
}

/// A tokens file replaced by a named pipe (`rm tokens; mkfifo tokens`) fails the reload at once,
/// naming the file, instead of waiting for a writer: the previous credentials stay and the
/// connected agent's scrapes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_file_that_became_a_named_pipe_is_refused_at_once() {
    let dir = TempDir::new().unwrap();
    let (gw, agent, server) = connected_db_agent(&dir).await;
    let tokens = dir.path().join("tokens");
    common::make_fifo(&tokens);

    // On a thread of its own, not the runtime's blocking pool: a reload stuck in open(2) would
    // keep the runtime (and the test) from ever finishing.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let gateway = gw.gateway.clone();
    std::thread::spawn(move || {
        let _ = tx.send(gateway.reload_tokens().map_err(|e| e.to_string()));
    });
    let reloaded = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .expect("the reload returns at once, not waiting on the pipe")
        .unwrap();
    let err = reloaded.unwrap_err();
    assert!(
        err.contains(&format!(
            "cannot read tokens file {}: not a regular file (a named pipe)",
            tokens.display()
        )),
        "{err}"
    );
    let resp = scrape(gw.web, &target_url("db-1", &server)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    agent.stop().await;
    gw.stop().await;
}

/// `ferry_gateway_tunnels_replaced_total`, 0 while none was replaced.
async fn tunnels_replaced(web: SocketAddr) -> f64 {
    let text = gateway_metrics(web).await;
    metric_value(&text, "ferry_gateway_tunnels_replaced_total", &[]).unwrap_or(0.0)
}

/// A second agent claims an id already connected, with the same token: the newer tunnel replaces
/// the older one. The gateway tells the older agent why, and it logs that loudly and waits its
/// slow backoff before reconnecting, so two agents with one id (cloned hosts) take turns once
/// per backoff period instead of knocking each other off every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_tunnel_replaces_older_with_the_same_id() {
    const SLOW: Duration = Duration::from_secs(2);
    let logs = common::logs::capture();
    let told = "GATEWAY CLOSED OUR TUNNEL";
    let dir = TempDir::new().unwrap();
    let (old_server, new_server) = (
        metrics_server("which 1\n").await,
        metrics_server("which 2\n").await,
    );
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    // Both agents serve their target at the same address, so only the tunnel decides who answers.
    let section = |server: &TargetServer| {
        let mut s = agent_section(&gw, "dup", &[("node", server.url("/metrics"))]);
        s.targets[0].port = Some(9100);
        s.reconnect.auth_failure_backoff = Dur(SLOW);
        s
    };
    let url = scrape_url("dup", 9100);

    let old = start_agent(section(&old_server), TOKEN);
    gw.wait_agent("dup", Duration::from_secs(10)).await;
    assert_eq!(scrape(gw.web, &url).await.text(), "which 1\n");

    // The old agent's local /metrics shows when its tunnel was closed under it.
    let old_web = serve_agent_web(&old.agent).await;
    assert_eq!(local_ok_connects(old_web).await, 1.0);

    let new = start_agent(section(&new_server), TOKEN);
    wait_for(
        "gateway counts a replaced tunnel",
        Duration::from_secs(10),
        || async {
            match tunnels_replaced(gw.web).await {
                n if n >= 1.0 => Ok(()),
                n => Err(format!("ferry_gateway_tunnels_replaced_total = {n}")),
            }
        },
    )
    .await;
    // The old agent's backoff started a little earlier, when its tunnel was closed.
    let replaced_at = Instant::now();
    wait_scrape_body(gw.web, &url, "which 2\n", Duration::from_secs(5)).await;
    let lines = logs.wait_lines(&[told], 1, Duration::from_secs(5)).await;
    assert!(
        lines[0].contains(
            "reason=replaced by a newer tunnel: another agent with the same id \"dup\" connected from 127.0.0.1:"
        ),
        "{lines:?}"
    );
    common::logs::assert_slow_retry(&lines[0], SLOW);
    // Counted from a little before `replaced_at`: a margin for the scrapes below.
    let stays_away = common::logs::retry_in(&lines[0]).saturating_sub(Duration::from_millis(300));

    // The replaced agent stays away for its slow backoff: the newer one keeps the tunnel.
    let old_requests = old_server.requests();
    loop {
        let resp = scrape(gw.web, &url).await;
        assert_eq!((resp.status, resp.text().as_str()), (200, "which 2\n"));
        if replaced_at.elapsed() >= stays_away {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        old_server.requests(),
        old_requests,
        "the replaced agent was still scraped"
    );
    assert_eq!(tunnels_replaced(gw.web).await, 1.0);
    assert_eq!(local_ok_connects(old_web).await, 1.0, "reconnected at once");
    assert_eq!(logs.lines_with(&[told]).len(), 1);
    let text = gateway_metrics(gw.web).await;
    assert_eq!(
        metric_value(&text, "ferry_gateway_agents_connected", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(gw.agent_ids(), vec!["dup".to_owned()]);

    // After it, the old agent comes back and replaces the newer one, which is told in turn.
    wait_second_tunnel(
        old_web,
        "the old agent reconnects after its backoff",
        Duration::from_secs(10),
    )
    .await;
    logs.wait_lines(&[told], 2, Duration::from_secs(5)).await;
    assert_eq!(tunnels_replaced(gw.web).await, 2.0);

    // Without the old agent, the new one takes the id back after its own backoff.
    old.stop().await;
    wait_scrape_body(gw.web, &url, "which 2\n", Duration::from_secs(10)).await;
    let old_requests = old_server.requests();
    for _ in 0..3 {
        let resp = scrape(gw.web, &url).await;
        assert_eq!((resp.status, resp.text().as_str()), (200, "which 2\n"));
    }
    assert_eq!(old_server.requests(), old_requests);

    new.stop().await;
    gw.stop().await;
}

/// Token rotation without restarting the agent: the agent reads its token file again before
/// every connection. A file left empty is reported, and the old token is not sent in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_is_used_without_restarting_the_agent() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let server = metrics_server("up 1\n").await;
    let url = target_url("node-1", &server);
    let gw = start_gateway(&dir, &[("node-1", "old-token")], |_| {}).await;
    let section = agent_section(&gw, "node-1", &[("node", server.url("/metrics"))]);
    let (agent, token_file) = start_agent_with_token_file(&gw, section, "old-token");
    gw.wait_agent("node-1", Duration::from_secs(10)).await;
    let agent_web = serve_agent_web(&agent.agent).await;

    // The old token's line goes last: its tunnel is closed, the agent comes back with the new one.
    rotate_token(&gw, "node-1", "old-token", "new-token", &token_file);
    wait_second_tunnel(
        agent_web,
        "the agent reconnects with the new token",
        Duration::from_secs(10),
    )
    .await;
    wait_scrape_body(gw.web, &url, "up 1\n", Duration::from_secs(5)).await;
    logs.wait_lines(
        &["the gateway revoked our old token; connecting with the new one"],
        1,
        Duration::from_secs(5),
    )
    .await;

    // A token file left empty: said loudly, and nothing is sent until it holds a token again.
    std::fs::write(&token_file, "").unwrap();
    tokens_file(dir.path(), &[("node-1", "newer-token")]);
    gw.gateway.reload_tokens().unwrap();
    let lines = logs
        .wait_lines(&["CANNOT READ OUR TOKEN"], 1, Duration::from_secs(10))
        .await;
    assert!(
        lines[0].contains(&format!(
            "{} holds no token (it is empty)",
            token_file.display()
        )),
        "{lines:?}"
    );
    assert!(!agent.agent.is_connected());
    std::fs::write(&token_file, "newer-token").unwrap();
    gw.wait_agent("node-1", Duration::from_secs(10)).await;
    wait_scrape_body(gw.web, &url, "up 1\n", Duration::from_secs(5)).await;

    // The agent never sent a token the gateway no longer accepted.
    let text = gateway_metrics(gw.web).await;
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_tunnel_handshakes_total",
            &[("result", "unauthorized")]
        ),
        None,
        "{text}"
    );
    assert_eq!(local_ok_connects(agent_web).await, 3.0);
    agent.stop().await;
    gw.stop().await;
}

/// Rotating a group token as the README says: the new line added and reloaded, the new token
/// written into the agent's token file, the old line removed and reloaded. The gateway closes
/// the tunnel still using the old token, and the agent comes back with the new one at once,
/// not after its slow retry after a revoked token (`auth_failure_backoff`, 60 s here), and
/// without an error in the log: nothing went wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_as_the_readme_says_costs_no_outage() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let server = metrics_server("up 1\n").await;
    let url = target_url("node-1", &server);
    let gw = start_gateway(&dir, &[("node-*", "old-token")], |_| {}).await;
    let mut section = agent_section(&gw, "node-1", &[("node", server.url("/metrics"))]);
    section.reconnect.min_backoff = Dur(Duration::from_millis(500));
    section.reconnect.max_backoff = Dur(Duration::from_secs(30));
    section.reconnect.auth_failure_backoff = Dur(Duration::from_secs(60));
    let (agent, token_file) = start_agent_with_token_file(&gw, section, "old-token");
    gw.wait_agent("node-1", Duration::from_secs(10)).await;
    let agent_web = serve_agent_web(&agent.agent).await;

    rotate_token(&gw, "node-*", "old-token", "new-token", &token_file);
    wait_second_tunnel(
        agent_web,
        "the agent is back with the new token",
        Duration::from_secs(2),
    )
    .await;
    // The agent counts its tunnel up at the 101; the gateway lists it once it has its targets,
    // a moment later.
    wait_scrape_body(gw.web, &url, "up 1\n", Duration::from_secs(2)).await;

    let told =
        logs.lines_with(&["the gateway revoked our old token; connecting with the new one from"]);
    assert!(
        told.len() == 1
            && told[0].contains(" INFO ")
            && told[0].contains(&token_file.display().to_string()),
        "{told:?}"
    );
    let errors = logs.lines_with(&[" ERROR "]);
    assert!(errors.is_empty(), "{errors:#?}");
    let text = gateway_metrics(gw.web).await;
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_tunnel_handshakes_total",
            &[("result", "unauthorized")]
        ),
        None,
        "{text}"
    );
    agent.stop().await;
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Idle-cutting middlebox
// ---------------------------------------------------------------------------------------------

/// PINGs every `.0`, each to be acknowledged within `.1`.
type Keepalive = (Duration, Duration);

/// The agent's keepalive set to `k`, for [`through_proxy`].
fn agent_keepalive(k: Keepalive) -> impl FnOnce(&mut ferry::config::AgentSection) {
    move |s| {
        s.tunnel.keepalive_interval = Dur(k.0);
        s.tunnel.keepalive_timeout = Dur(k.1);
    }
}

/// The gateway (its keepalive `gw_keepalive`, defaults if `None`) and agent `id` serving
/// `targets`, whose tunnel goes through a CONNECT proxy cutting tunnels idle for `idle_cut`;
/// the agent's section is changed by `tweak` first. Returns once the gateway has the agent.
async fn through_proxy(
    dir: &TempDir,
    idle_cut: Option<Duration>,
    gw_keepalive: Option<Keepalive>,
    id: &str,
    targets: &[(&str, String)],
    tweak: impl FnOnce(&mut ferry::config::AgentSection),
) -> (TestGateway, common::ferry::TestAgent, ConnectProxy) {
    let proxy = ConnectProxy::start(idle_cut).await;
    let gw = start_gateway(dir, &[("*", TOKEN)], |g| {
        if let Some((interval, timeout)) = gw_keepalive {
            g.tunnel.keepalive_interval = Dur(interval);
            g.tunnel.keepalive_timeout = Dur(timeout);
        }
    })
    .await;
    let mut section = agent_section(&gw, id, targets);
    section.proxy_url = Some(proxy.url());
    tweak(&mut section);
    let agent = start_agent(section, TOKEN);
    gw.wait_agent(id, Duration::from_secs(10)).await;
    (gw, agent, proxy)
}

/// The gateway and an agent reaching it through a CONNECT proxy that cuts tunnels idle for
/// `IDLE_CUT`, both sides pinging every `interval` (acknowledgement timeout `timeout`).
async fn behind_idle_cutter(
    dir: &TempDir,
    id: &str,
    server: &TargetServer,
    interval: Duration,
    timeout: Duration,
) -> (TestGateway, common::ferry::TestAgent, ConnectProxy) {
    const IDLE_CUT: Duration = Duration::from_millis(1500);
    let keepalive = (interval, timeout);
    let targets = [("node", server.url("/metrics"))];
    let (gw, agent, proxy) = through_proxy(
        dir,
        Some(IDLE_CUT),
        Some(keepalive),
        id,
        &targets,
        agent_keepalive(keepalive),
    )
    .await;
    assert_eq!(
        proxy.connect_targets(),
        vec![format!("localhost:{}", gw.tunnel.port())]
    );
    (gw, agent, proxy)
}

/// Keepalive PINGs more frequent than a middlebox's idle cut keep one tunnel up through a long
/// idle period (scaled down: 6 s idle behind a 1.5 s cutter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_holds_the_tunnel_through_an_idle_cutting_proxy() {
    let dir = TempDir::new().unwrap();
    let server = metrics_server("idle 1\n").await;
    let (gw, agent, proxy) = behind_idle_cutter(
        &dir,
        "idle-1",
        &server,
        Duration::from_millis(300),
        Duration::from_secs(1),
    )
    .await;

    tokio::time::sleep(Duration::from_secs(6)).await;

    assert_eq!(
        proxy.tunnels_cut(),
        0,
        "the proxy cut an idle tunnel despite keepalive"
    );
    assert_eq!(
        proxy.tunnels_opened(),
        1,
        "the agent opened more than one tunnel"
    );
    assert_eq!(
        agent_ok_connects(gw.web, "idle-1").await,
        1.0,
        "the agent reconnected"
    );
    let resp = scrape(gw.web, &target_url("idle-1", &server)).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "idle 1\n"));
    assert_eq!(proxy.tunnels_opened(), 1);

    agent.stop().await;
    gw.stop().await;
}

/// On a slow uplink a large response fills the agent's send buffer, and the PONG to the
/// gateway's PING waits behind seconds of it: far longer than the keepalive timeout. The
/// bytes arriving meanwhile show the agent is alive; the tunnel (and the scrape) must live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pong_queued_behind_a_large_response_on_a_slow_link_does_not_end_the_tunnel() {
    const BODY: u64 = 768 * 1024;
    let dir = TempDir::new().unwrap();
    let server = TargetServer::start(Behaviour::Large { bytes: BODY }).await;
    let gw = start_gateway(&dir, &[("*", TOKEN)], |g| {
        g.tunnel.keepalive_interval = Dur(Duration::from_millis(200));
        g.tunnel.keepalive_timeout = Dur(Duration::from_millis(300));
    })
    .await;
    // 256 KiB/s: the body takes three seconds, ten times the keepalive timeout.
    let uplink = ConnectProxy::start_slow_uplink(gw.tunnel, 256 * 1024).await;
    let mut section = agent_section(&gw, "slow-1", &[("big", server.url("/big"))]);
    section.gateway = Some(format!("https://localhost:{}", uplink.addr.port()));
    let agent = start_agent(section, TOKEN);
    gw.wait_agent("slow-1", Duration::from_secs(10)).await;

    let url = format!("http://slow-1:{}/big", server.addr.port());
    let resp = http::get_via_proxy(
        gw.web,
        &url,
        &[("X-Prometheus-Scrape-Timeout-Seconds", "30")],
    )
    .await;
    assert_eq!(
        resp.status,
        200,
        "{}",
        String::from_utf8_lossy(&resp.body[..resp.body.len().min(300)])
    );
    assert_eq!(resp.body.len() as u64, BODY);
    assert_eq!(
        agent_ok_connects(gw.web, "slow-1").await,
        1.0,
        "the tunnel was reopened"
    );
    assert_eq!(uplink.tunnels_opened(), 1);

    agent.stop().await;
    gw.stop().await;
}

/// Control experiment: PINGs rarer than the idle cut do not keep the tunnel, so the test above
/// can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_cutting_proxy_cuts_a_tunnel_without_frequent_keepalive() {
    let dir = TempDir::new().unwrap();
    let server = metrics_server("idle 2\n").await;
    let (gw, agent, proxy) = behind_idle_cutter(
        &dir,
        "idle-2",
        &server,
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .await;

    wait_for(
        "the proxy cuts the idle tunnel",
        Duration::from_secs(6),
        || async {
            match proxy.tunnels_cut() {
                0 => Err("no tunnel cut yet".into()),
                _ => Ok(()),
            }
        },
    )
    .await;
    // The agent notices and dials again through the proxy.
    wait_for(
        "the agent opens a new tunnel",
        Duration::from_secs(10),
        || async {
            match proxy.tunnels_opened() {
                n if n >= 2 => Ok(()),
                n => Err(format!("{n} tunnel(s) opened")),
            }
        },
    )
    .await;

    agent.stop().await;
    gw.stop().await;
}

/// A tunnel that goes silent without closing (a middlebox dropped it, the agent's host hung) is
/// found by the gateway's own PINGs: the agent is unregistered and scrapes get 503 at once,
/// long before the agent's much slower keepalive would notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_keepalive_drops_a_tunnel_that_went_silent() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let server = metrics_server("silent 1\n").await;
    let (gw, agent, proxy) = through_proxy(
        &dir,
        None,
        Some((Duration::from_millis(300), Duration::from_millis(700))),
        "silent-1",
        &[("node", server.url("/metrics"))],
        agent_keepalive((Duration::from_secs(60), Duration::from_secs(60))),
    )
    .await;
    // Several PING rounds go through before the freeze.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let resp = scrape(gw.web, &target_url("silent-1", &server)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());

    proxy.freeze_all();
    let frozen_at = std::time::Instant::now();
    wait_for(
        "the gateway unregisters the silent agent",
        Duration::from_secs(5),
        || async {
            let resp = scrape(gw.web, &target_url("silent-1", &server)).await;
            match resp.status {
                503 => Ok(()),
                s => Err(format!("scrape answered {s}")),
            }
        },
    )
    .await;
    assert!(
        frozen_at.elapsed() >= Duration::from_millis(300),
        "unregistered before a PING could go unanswered"
    );
    assert_eq!(proxy.tunnels_opened(), 1, "the agent has not redialled yet");
    // A tunnel lost, not closed: a warning, which an operator watching warnings sees.
    let lines = logs
        .wait_lines(
            &["WARN", "agent disconnected: tunnel lost", "agent=silent-1"],
            1,
            Duration::from_secs(5),
        )
        .await;
    assert!(lines[0].contains("keepalive PING unanswered"), "{lines:?}");

    agent.stop().await;
    gw.stop().await;
}

/// A tunnel stalled for a moment (the agent's VM paused, a congested path) while Prometheus
/// gives up on scrapes: the gateway cancels each one, and on resume the agent receives the
/// requests and their cancellations together. That is not an attack on the agent's HTTP/2
/// server: the tunnel stays up (h2's default allows only 20 such streams, then closes the
/// connection as "excessive load"), and the next scrape works on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_cancelled_during_a_stall_do_not_close_the_tunnel() {
    let dir = TempDir::new().unwrap();
    let server = metrics_server("stalled 1\n").await;
    let targets = [("node", server.url("/metrics"))];
    let (gw, agent, proxy) = through_proxy(&dir, None, None, "stall-1", &targets, |_| {}).await;
    let url = target_url("stall-1", &server);
    assert_eq!(scrape(gw.web, &url).await.status, 200);

    proxy.stall_all(Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let web = gw.web;
    for _ in 0..40 {
        let url = url.clone();
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(500), scrape(web, &url)).await
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let resp = scrape(gw.web, &url).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "stalled 1\n"));
    let metrics = http::get(&format!("{}/metrics", gw.web_url())).await.text();
    assert_eq!(
        metric_value(
            &metrics,
            "ferry_gateway_tunnel_handshakes_total",
            &[("result", "ok")]
        ),
        Some(1.0),
        "the agent did not have to reconnect:\n{metrics}"
    );
    assert_eq!(proxy.tunnels_opened(), 1);
    agent.stop().await;
    gw.stop().await;
}

/// A "gateway" that answers the upgrade with 101 and then sends nothing (no HTTP/2 preface):
/// hyper's keepalive only starts after the HTTP/2 handshake, so the agent would call its tunnel
/// up for ever. It gives up after its handshake timeout, says why, and dials again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_silent_after_the_upgrade_is_given_up_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let logs = common::logs::capture();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (dials_tx, mut dials) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && sock.read_exact(&mut byte).await.is_ok() {
                head.push(byte[0]);
            }
            let answer = "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ferry/1\r\n\r\n";
            let _ = sock.write_all(answer.as_bytes()).await;
            let _ = dials_tx.send(());
            held.push(sock);
        }
    });
    let mut section = common::ferry::agent_section_to(&url, "mute-1", &[]);
    section.tunnel.insecure_plaintext = true;
    section.tunnel.handshake_timeout = Dur(Duration::from_millis(500));
    let agent = start_agent(section, TOKEN);
    for dial in ["first", "second"] {
        tokio::time::timeout(Duration::from_secs(10), dials.recv())
            .await
            .unwrap_or_else(|_| panic!("no {dial} dial within 10 s"));
    }
    let lines = logs.lines_with(&[
        "tunnel closed; reconnecting",
        "the gateway accepted the tunnel and then sent nothing within 500ms (no HTTP/2)",
    ]);
    assert!(!lines.is_empty(), "{:#?}", logs.lines_with(&[""]));
    agent.stop().await;
}

/// The path to the gateway goes dead in the middle of large scrapes: the agent's socket fills
/// and nothing leaves. hyper's keepalive would send GOAWAY and wait to flush it behind bytes
/// that never leave (for ever, with a long keepalive interval not even that); the agent gives
/// the tunnel up once its writes have found no room for the keepalive timeout, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_path_in_the_middle_of_large_scrapes_is_given_up_on() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let big = TargetServer::start(Behaviour::Large { bytes: 100 << 20 }).await;
    let (gw, agent, proxy) = through_proxy(
        &dir,
        None,
        Some((Duration::from_secs(60), Duration::from_secs(60))),
        "dead-path-1",
        &[("big", big.url("/big"))],
        agent_keepalive((Duration::from_secs(60), Duration::from_millis(700))),
    )
    .await;
    let (web, url) = (
        gw.web,
        format!("http://dead-path-1:{}/big", big.addr.port()),
    );
    let mut scrapes = Vec::new();
    // More in flight than the kernel's buffers hold (a loopback receive buffer grows to 32 MiB
    // here): up to 1 MiB per stream may be on its way when the path dies.
    for _ in 0..100 {
        let url = url.clone();
        scrapes.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(15), scrape(web, &url)).await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.freeze_all();
    let lines = logs
        .wait_lines(&["tunnel closed; reconnecting"], 1, Duration::from_secs(10))
        .await;
    assert!(
        lines[0].contains("the gateway has taken none of what the agent sends for 700ms"),
        "{lines:?}"
    );
    for s in scrapes {
        s.abort();
    }
    agent.stop().await;
    gw.stop().await;
}

/// A gateway that stops taking a scrape's body (it grants no more HTTP/2 window): the body's
/// deadline is only checked as it is read, so the agent bounds the whole stream at its longest
/// scrape timeout (plus a margin), which frees the target connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_whose_body_the_gateway_never_takes_is_cut_at_the_longest_timeout() {
    let logs = common::logs::capture();
    let big = TargetServer::start(Behaviour::Large { bytes: 50 << 20 }).await;
    let (agent, mut gateway) =
        common::ferry::agent_on_bare_tunnel_with("hold-1", &[("big", big.url("/big"))], |s| {
            s.scrape_timeout_max = Dur(Duration::from_secs(1))
        })
        .await;
    let req = ::http::Request::get(format!("http://hold-1:{}/big", big.addr.port()))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = gateway.send_request(req).await.expect("the scrape's head");
    assert_eq!(resp.status(), 200);
    // The body is never read: its window fills and stays full.
    let lines = logs
        .wait_lines(
            &["outlived the longest scrape timeout"],
            1,
            Duration::from_secs(15),
        )
        .await;
    assert!(lines[0].contains("limit=6s"), "{lines:?}");
    let mut body = resp.into_body();
    let mut got = 0usize;
    let ended = loop {
        match http_body_util::BodyExt::frame(&mut body).await {
            Some(Ok(frame)) => got += frame.data_ref().map_or(0, |d| d.len()),
            Some(Err(e)) => break e.to_string(),
            None => break "end".to_owned(),
        }
    };
    assert!(got < 50 << 20, "the whole body came: {ended}");
    agent.stop().await;
}

/// The targets long poll is a stream the gateway holds open for minutes by design: the bound on
/// a scrape's stream (longest scrape timeout plus a margin) must not cut it, or the gateway stops
/// watching the agent's targets and takes it out of service (a tunnel flapping every couple of
/// minutes with default settings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_targets_long_poll_outlives_the_longest_scrape() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let server = metrics_server("up_metric 1\n").await;
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let mut section = agent_section(&gw, "poll-1", &[("node", server.url("/metrics"))]);
    // A scrape's stream is cut after 1 s + 5 s.
    section.scrape_timeout_max = Dur(Duration::from_secs(1));
    let agent = start_agent(section, TOKEN);
    gw.wait_agent("poll-1", Duration::from_secs(10)).await;
    let url = target_url("poll-1", &server);
    assert_eq!(scrape(gw.web, &url).await.status, 200);

    tokio::time::sleep(Duration::from_secs(8)).await;
    let resp = scrape(gw.web, &url).await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    assert_eq!(gw.agent_ids(), vec!["poll-1".to_owned()]);
    assert_eq!(
        agent_ok_connects(gw.web, "poll-1").await,
        1.0,
        "the tunnel was not reopened"
    );
    let cut = logs.lines_with(&["outlived"]);
    assert!(cut.is_empty(), "{cut:?}");
    agent.stop().await;
    gw.stop().await;
}

/// An agent that resets the targets long poll on a live connection (releases up to session 11
/// cut every stream at their longest scrape timeout plus 5 s) stays in service: the gateway asks
/// again instead of taking it out (503) until the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_targets_long_poll_is_asked_again() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let upgraded = upgrade_as_agent(&gw, TOKEN, "reset-1")
        .await
        .expect("upgraded");
    let polls = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = polls.clone();
    let service = hyper::service::service_fn(move |req: ::http::Request<hyper::body::Incoming>| {
        let polls = counted.clone();
        async move {
            if req.uri().query().is_some_and(|q| q.contains("after=")) {
                polls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                // An error from the service: hyper resets the stream, the connection stays.
                return Err("cut off".to_owned());
            }
            Ok(::http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from(one_target()),
            )))
        }
    });
    let served = tokio::spawn(async move {
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(upgraded, service)
            .await;
    });
    gw.wait_agent("reset-1", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        polls.load(Ordering::SeqCst) >= 3,
        "the long poll was not asked again"
    );
    // Connected: a port it does not list is a 404 from the gateway, not a 503.
    let resp = scrape(gw.web, "http://reset-1:1/metrics").await;
    assert_eq!(resp.status, 404, "{:?}", resp.body);
    assert_eq!(gw.agent_ids(), vec!["reset-1".to_owned()]);
    served.abort();
    gw.stop().await;
}

/// The agent's own PINGs find a tunnel that went silent, and its log says why the tunnel ended:
/// the cause, not only hyper's "http2 error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_says_why_its_tunnel_ended() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let (gw, agent, proxy) = through_proxy(
        &dir,
        None,
        Some((Duration::from_secs(60), Duration::from_secs(60))),
        "silent-2",
        &[],
        agent_keepalive((Duration::from_millis(300), Duration::from_millis(700))),
    )
    .await;

    proxy.freeze_all();
    let lines = logs
        .wait_lines(&["tunnel closed; reconnecting"], 1, Duration::from_secs(5))
        .await;
    assert!(
        lines[0].contains(
            "our keepalive PING got no answer within 700ms: the gateway, or the path to it, is gone"
        ),
        "{lines:?}"
    );

    agent.stop().await;
    gw.stop().await;
}

/// An agent stopped while its gateway cannot be reached waits out its grace period for the
/// acknowledgement of its closing, then says that, not that scrapes were still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_over_a_dead_path_says_its_closing_went_unacknowledged() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let (gw, agent, proxy) = through_proxy(&dir, None, None, "silent-3", &[], |s| {
        s.shutdown_grace_period = Dur(Duration::from_millis(500));
    })
    .await;

    proxy.freeze_all();
    let stopping = Instant::now();
    agent.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
    let lines = logs.lines_with(&["WARN", "grace"]);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains(
            "the gateway did not acknowledge our closing within the shutdown grace period"
        ),
        "{lines:?}"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Target change without reconnecting
// ---------------------------------------------------------------------------------------------

/// New targets reach the gateway over the open tunnel: service discovery and routing change,
/// the tunnel stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_change_reaches_the_gateway_without_reconnecting() {
    let dir = TempDir::new().unwrap();
    let (old_server, new_server) = (
        metrics_server("old 1\n").await,
        metrics_server("new 1\n").await,
    );
    let (gw, agent) = gateway_and_agent(&dir, "t-1", &[("old", old_server.url("/metrics"))]).await;
    let (old_url, new_url) = (
        target_url("t-1", &old_server),
        target_url("t-1", &new_server),
    );
    let old_addr = (format!("t-1:{}", old_server.addr.port()), "old");
    let new_addr = (format!("t-1:{}", new_server.addr.port()), "new");
    let self_addr = (format!("t-1:{SELF_PORT}"), "ferry");
    wait_sd(
        gw.web,
        &[old_addr.clone(), self_addr.clone()],
        &[],
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(scrape(gw.web, &old_url).await.status, 200);

    // An embedder checks each target as the config file's are; set_targets refuses a list the
    // gateway could not route (the built-in target's name or address taken, a duplicate).
    let new_target = ferry::config::TargetSection {
        name: "new".into(),
        url: new_server.url("/metrics"),
        ..Default::default()
    }
    .to_target("targets[0]")
    .unwrap();
    let bad = ferry::config::TargetSection {
        name: "new".into(),
        url: "ftp://127.0.0.1/x".into(),
        ..Default::default()
    }
    .to_target("targets[0]")
    .unwrap_err();
    assert!(bad.to_string().contains("targets[0].url"), "{bad}");
    let mut shadow = new_target.clone();
    shadow.name = "ferry".into();
    let err = agent
        .agent
        .set_targets(&[shadow], &Default::default())
        .unwrap_err();
    assert!(err.to_string().contains("built-in"), "{err}");
    let mut placeholder = new_target.clone();
    placeholder.name = "unknown".into();
    let err = agent
        .agent
        .set_targets(&[placeholder], &Default::default())
        .unwrap_err();
    assert!(err.to_string().contains("is reserved"), "{err}");
    let err = agent
        .agent
        .set_targets(
            &[new_target.clone(), new_target.clone()],
            &Default::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("used twice"), "{err}");
    let new_targets = vec![new_target];
    agent
        .agent
        .set_targets(&new_targets, &Default::default())
        .unwrap();

    wait_sd(
        gw.web,
        &[new_addr, self_addr],
        &[old_addr],
        Duration::from_secs(5),
    )
    .await;
    let resp = scrape(gw.web, &new_url).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "new 1\n"));
    let old_requests = old_server.requests();
    let resp = scrape(gw.web, &old_url).await;
    assert_eq!(resp.status, 404, "removed target: {}", resp.text());
    assert_eq!(
        old_server.requests(),
        old_requests,
        "a removed target was fetched"
    );
    assert_eq!(
        agent_ok_connects(gw.web, "t-1").await,
        1.0,
        "the agent reconnected to change targets"
    );
    // The removed target's series went with it; the new one's came.
    let series = series_of(gw.web, "t-1").await;
    let scrapes = |target: &str| {
        series.iter().any(|l| {
            l.starts_with("ferry_gateway_scrapes_total")
                && l.contains(&format!("target=\"{target}\""))
        })
    };
    assert!(!scrapes("old") && scrapes("new"), "{series:#?}");
    // The agent's own metrics, too.
    let own = scrape(gw.web, &format!("http://t-1:{SELF_PORT}/metrics")).await;
    let own = own.text();
    let agent_scrapes = |target: &str| {
        own.lines().any(|l| {
            l.starts_with("ferry_agent_scrapes_total")
                && l.contains(&format!("target=\"{target}\""))
        })
    };
    assert!(!agent_scrapes("old") && agent_scrapes("new"), "{own}");

    agent.stop().await;
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Graceful shutdown
// ---------------------------------------------------------------------------------------------

/// Starts a scrape of `url` through the gateway at `web` (10 s timeout) and returns once `server`
/// has it: a scrape in flight.
async fn scrape_reaching_target(
    web: SocketAddr,
    url: &str,
    server: &TargetServer,
) -> tokio::task::JoinHandle<Result<Resp, http::Error>> {
    let mut in_flight = scrapes_reaching_target(web, url, server, 1).await;
    in_flight.pop().expect("one scrape")
}

/// Starts `n` scrapes of `url` through the gateway at `web` (10 s timeout each) and returns once
/// `server` has all of them (and had no other requests).
async fn scrapes_reaching_target(
    web: SocketAddr,
    url: &str,
    server: &TargetServer,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<Resp, http::Error>>> {
    let in_flight = (0..n)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move {
                http::try_get_via_proxy(web, &url, &[("X-Prometheus-Scrape-Timeout-Seconds", "10")])
                    .await
            })
        })
        .collect();
    wait_for(
        "the scrapes reach the target",
        Duration::from_secs(5),
        || async {
            match server.requests() {
                got if got == n => Ok(()),
                got => Err(format!("{got} of {n} requests at the target")),
            }
        },
    )
    .await;
    in_flight
}

/// On shutdown the gateway stops accepting connections at once but lets an in-flight scrape finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_shutdown_drains_in_flight_scrapes() {
    let dir = TempDir::new().unwrap();
    let delay = Duration::from_secs(2);
    let server = TargetServer::start(Behaviour::Slow {
        delay,
        body: "slow 1\n".into(),
    })
    .await;
    let (gw, agent) = gateway_and_agent(&dir, "slow-1", &[("slow", server.url("/metrics"))]).await;
    let web = gw.web;
    let url = target_url("slow-1", &server);

    let started = Instant::now();
    let in_flight = scrape_reaching_target(web, &url, &server).await;
    gw.shutdown.cancel();

    wait_for(
        "the web listener stops accepting",
        Duration::from_secs(1),
        || async {
            match http::try_get(&format!("http://{web}/-/healthy"), &[]).await {
                Err(_) => Ok(()),
                Ok(r) => Err(format!("a new request got {} after shutdown", r.status)),
            }
        },
    )
    .await;
    assert!(
        !in_flight.is_finished(),
        "the in-flight scrape ended before its target answered"
    );

    // `run` returning is what lets the process exit: it must wait for the scrape.
    tokio::time::timeout(Duration::from_secs(10), gw.task)
        .await
        .expect("the gateway finishes once drained")
        .unwrap();
    assert!(
        started.elapsed() >= delay,
        "the gateway stopped after {:?}, before the in-flight scrape's target answered",
        started.elapsed()
    );
    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight scrape completes");
    assert_eq!((resp.status, resp.text().as_str()), (200, "slow 1\n"));

    agent.stop().await;
}

/// A scrape still running when the gateway's grace period ends is cut off, and the log says how
/// many were. It is answered 503 with the reason before the gateway's process would exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_shutdown_says_how_many_scrapes_the_grace_period_cut_off() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let server = TargetServer::start(Behaviour::Slow {
        delay: Duration::from_secs(30),
        body: "slow 1\n".into(),
    })
    .await;
    let gw = start_gateway_process_on(
        &dir,
        &[("*", "test-token")],
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        |s| s.shutdown_grace_period = Dur(Duration::from_millis(300)),
    )
    .await;
    let agent = start_agent(
        agent_section(&gw, "slow-3", &[("slow", server.url("/metrics"))]),
        "test-token",
    );
    gw.wait_agent("slow-3", Duration::from_secs(10)).await;
    let in_flight = scrape_reaching_target(gw.web, &target_url("slow-3", &server), &server).await;
    gw.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), gw.task)
        .await
        .expect("the gateway stops once the grace period is over")
        .unwrap();
    let lines = logs.lines_with(&["grace period ended", "cutting them off"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("requests=1"),
        "{lines:?}"
    );
    // Answered before the process exits, in words: not a connection closed without a word.
    let resp = in_flight
        .await
        .unwrap()
        .expect("the cut scrape gets an answer");
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(
        resp.text().starts_with("the gateway is shutting down"),
        "{}",
        resp.text()
    );
    agent.stop().await;
}

/// The agent's side of the same: a scrape still running when its grace period ends is cut
/// off, and its log says how many were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_shutdown_says_how_many_scrapes_the_grace_period_cut_off() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let server = TargetServer::start(Behaviour::Slow {
        delay: Duration::from_secs(30),
        body: "slow 1\n".into(),
    })
    .await;
    let gw = start_gateway(&dir, &[("*", "test-token")], |_| {}).await;
    let mut section = agent_section(&gw, "slow-4", &[("slow", server.url("/metrics"))]);
    section.shutdown_grace_period = Dur(Duration::from_millis(300));
    let agent = start_agent(section, "test-token");
    gw.wait_agent("slow-4", Duration::from_secs(10)).await;
    let url = target_url("slow-4", &server);
    let in_flight = scrapes_reaching_target(gw.web, &url, &server, 2).await;
    agent.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), agent.task)
        .await
        .expect("the agent stops once the grace period is over")
        .unwrap()
        .expect("the agent ran");
    let lines = logs.lines_with(&["grace period ended", "cutting them off"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("scrapes=2"),
        "{lines:?}"
    );
    in_flight.iter().for_each(|t| t.abort());
    gw.stop().await;
}

/// An agent told to stop (SIGTERM) lets the scrape it is serving finish: the gateway keeps the
/// tunnel after the agent's GOAWAY until the stream is done, and routes nothing new to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_shutdown_drains_in_flight_scrapes() {
    let dir = TempDir::new().unwrap();
    let delay = Duration::from_secs(2);
    let server = TargetServer::start(Behaviour::Slow {
        delay,
        body: "slow 1\n".into(),
    })
    .await;
    let (gw, agent) = gateway_and_agent(&dir, "slow-2", &[("slow", server.url("/metrics"))]).await;
    let web = gw.web;
    let url = target_url("slow-2", &server);
    let in_flight = scrape_reaching_target(web, &url, &server).await;
    let started = Instant::now();
    agent.shutdown.cancel();

    // Once the agent has said it is going, a new scrape is not sent its way.
    wait_for(
        "a new scrape is answered 503 while the agent drains",
        Duration::from_secs(1),
        || async {
            let r = scrape(web, &url).await;
            match r.status {
                503 => Ok(()),
                s => Err(format!("a new scrape got {s}: {}", r.text())),
            }
        },
    )
    .await;
    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight scrape completes");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "slow 1\n"),
        "after {:?}",
        started.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(10), agent.task)
        .await
        .expect("the agent finishes once drained")
        .unwrap()
        .expect("the agent ran");
    assert_eq!(
        server.requests(),
        1,
        "the 503 scrape never reached the target"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 7. SIGHUP through the real binary
// ---------------------------------------------------------------------------------------------

/// A `ferry` child process, killed if the test ends before it exits.
struct FerryProcess {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl FerryProcess {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {} failed", self.pid());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("ferry exited early with {status}; log:\n{}", self.log());
        }
    }
}

impl Drop for FerryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two distinct free loopback ports (bound together, then released).
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// A config with a gateway and an agent serving `target` (name, url) in one process.
fn write_run_config(path: &Path, dir: &Path, web: u16, tunnel: u16, target: (&str, &str)) {
    let d = dir.display();
    let yaml = format!(
        "gateway:\n  web:\n    listen_address: 127.0.0.1:{web}\n  tunnel:\n    listen_address: 127.0.0.1:{tunnel}\n    tls_cert_file: '{d}/cert.pem'\n    tls_key_file: '{d}/key.pem'\n  data_dir: '{d}/data'\n  auth:\n    tokens_file: '{d}/tokens'\n  shutdown_grace_period: 5s\n\
         agent:\n  gateway: https://localhost:{tunnel}\n  agent_id: hup-1\n  tunnel:\n    ca_file: '{d}/cert.pem'\n  reconnect:\n    min_backoff: 100ms\n    max_backoff: 500ms\n  shutdown_grace_period: 5s\n  targets:\n    - name: {}\n      url: {}\n",
        target.0, target.1
    );
    // Write then rename, so a reload never reads a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes a config serving target a (`a`: its address and name) and starts `ferry run` on it,
/// returning once `/targets` lists a. Free ports are only free until someone else binds them:
/// when ferry cannot listen, it is tried again on other ports.
async fn start_ferry_run(
    config: &Path,
    dir: &Path,
    server_a: &TargetServer,
    a: &(String, &str),
) -> (FerryProcess, u16, u16) {
    for _attempt in 0..3 {
        let (web_port, tunnel_port) = free_ports();
        let web: SocketAddr = ([127, 0, 0, 1], web_port).into();
        write_run_config(
            config,
            dir,
            web_port,
            tunnel_port,
            ("a", &server_a.url("/metrics")),
        );
        let log = dir.join("ferry.log");
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("run")
            .arg("--config.file")
            .arg(config)
            .env("FERRY_TOKEN", TOKEN)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn ferry");
        let mut ferry = FerryProcess { child, log };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = ferry.child.try_wait() {
                let log = ferry.log();
                assert!(
                    log.contains("cannot listen on"),
                    "ferry exited early with {status}; log:\n{log}"
                );
                break;
            }
            if matches!(sd_targets(web).await, Ok(l) if l.iter().any(|(addr, n)| addr == &a.0 && n == a.1))
            {
                return (ferry, web_port, tunnel_port);
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "target a never listed; log:\n{}",
                ferry.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("ferry could not listen on free ports three times");
}

/// `ferry run --config.file F`: SIGHUP swaps the agent's targets in the running process, SIGTERM
/// ends it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_targets_in_the_running_binary() {
    let dir = TempDir::new().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    tokens_file(dir.path(), &[("*", TOKEN)]);
    let (server_a, server_b) = (metrics_server("a 1\n").await, metrics_server("b 1\n").await);
    let config = dir.path().join("ferry.yaml");
    let a = (format!("hup-1:{}", server_a.addr.port()), "a");
    let b = (format!("hup-1:{}", server_b.addr.port()), "b");
    let (mut ferry, web_port, tunnel_port) =
        start_ferry_run(&config, dir.path(), &server_a, &a).await;
    let web: SocketAddr = ([127, 0, 0, 1], web_port).into();
    assert_eq!(
        scrape(web, &target_url("hup-1", &server_a)).await.text(),
        "a 1\n"
    );

    write_run_config(
        &config,
        dir.path(),
        web_port,
        tunnel_port,
        ("b", &server_b.url("/metrics")),
    );
    ferry.signal("-HUP");
    wait_sd(web, &[b], &[a], Duration::from_secs(5)).await;
    ferry.assert_running();
    let resp = scrape(web, &target_url("hup-1", &server_b)).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "b 1\n"));
    assert_eq!(
        scrape(web, &target_url("hup-1", &server_a)).await.status,
        404
    );

    ferry.signal("-TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = ferry.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ferry still running 20 s after SIGTERM; log:\n{}",
            ferry.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.success(),
        "ferry exited with {status} after SIGTERM; log:\n{}",
        ferry.log()
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Disconnected agents in service discovery
// ---------------------------------------------------------------------------------------------

/// A target list of one target `node` on port 9100, as an agent publishes it.
fn one_target() -> String {
    serde_json::json!({"version": 1, "labels": {}, "targets": [
        {"name": "node", "port": 9100, "path": "/metrics", "labels": {}}
    ]})
    .to_string()
}

/// Connects agent `id` on a bare tunnel (no agent process behind it), and cuts the connection
/// as a crash or a network failure would, once it is listed; returns when it is disconnected.
async fn connect_and_crash(gw: &TestGateway, id: &str) {
    let tunnel = common::ferry::agent_publishing(gw, id, one_target()).await;
    gw.wait_agent(id, Duration::from_secs(10)).await;
    tunnel.abort();
    gw.wait_agent_gone(id, Duration::from_secs(5)).await;
}

/// Removing a disconnected agent's token line and reloading the tokens file is how it is
/// decommissioned: it leaves service discovery at once. Agents whose token still holds stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_without_its_token_removes_a_disconnected_agent() {
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("old-1", "old"), ("db-*", "kept")], |_| {}).await;
    let server = metrics_server("up 1\n").await;
    let targets = [("node", server.url("/metrics"))];
    for (id, token) in [("old-1", "old"), ("db-1", "kept")] {
        let agent = start_agent(agent_section(&gw, id, &targets), token);
        gw.wait_agent(id, Duration::from_secs(10)).await;
        agent.stop().await;
        gw.wait_agent_gone(id, Duration::from_secs(5)).await;
    }
    assert_eq!(sd_agents(gw.web).await, ["db-1", "old-1"]);

    // The same credentials in another order: nothing leaves.
    tokens_file(dir.path(), &[("db-*", "kept"), ("old-1", "old")]);
    assert_eq!(gw.gateway.reload_tokens().unwrap(), 2);
    assert_eq!(sd_agents(gw.web).await, ["db-1", "old-1"]);

    tokens_file(dir.path(), &[("db-*", "kept")]);
    assert_eq!(gw.gateway.reload_tokens().unwrap(), 1);
    assert_eq!(sd_agents(gw.web).await, ["db-1"]);
    assert_eq!(agent_gauges(gw.web).await, (0.0, 1.0));
    gw.stop().await;
}

/// An operator looking for what Prometheus reports as down finds it on the status page and in
/// `/api/v1/agents`: the agent gone, since when, and what its last tunnel did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_agent_is_on_the_status_page_until_it_leaves_service_discovery() {
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let server = metrics_server("up 1\n").await;
    let targets = [("node", server.url("/metrics"))];
    let agent = start_agent(agent_section(&gw, "db-1", &targets), TOKEN);
    gw.wait_agent("db-1", Duration::from_secs(10)).await;
    let port = server.addr.port();
    assert_eq!(scrape(gw.web, &scrape_url("db-1", port)).await.status, 200);
    let listed = |agents: &serde_json::Value| -> Vec<serde_json::Value> {
        agents.as_array().expect("an array").clone()
    };
    let agents: serde_json::Value = serde_json::from_slice(
        &http::get(&format!("http://{}/api/v1/agents", gw.web))
            .await
            .body,
    )
    .unwrap();
    let connected = &listed(&agents)[0];
    assert!(connected.get("disconnected_since").is_none(), "{agents}");

    agent.stop().await;
    gw.wait_agent_gone("db-1", Duration::from_secs(5)).await;
    let agents: serde_json::Value = serde_json::from_slice(
        &http::get(&format!("http://{}/api/v1/agents", gw.web))
            .await
            .body,
    )
    .unwrap();
    let [gone] = &listed(&agents)[..] else {
        panic!("one agent listed: {agents}");
    };
    assert_eq!(gone["id"], "db-1", "{agents}");
    assert_eq!(
        gone["targets"],
        serde_json::json!(["node", "ferry"]),
        "{agents}"
    );
    assert_eq!(gone["scrapes"], 1, "{agents}");
    assert_eq!(gone["last_status"], 200, "{agents}");
    let since = |field: &str| {
        gone[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field}: {agents}"))
    };
    assert!(
        since("disconnected_since") >= since("connected_since"),
        "{agents}"
    );

    let page = http::get(&format!("http://{}/", gw.web)).await.text();
    assert!(page.contains("0 agents connected"), "{page}");
    assert!(page.contains("1 disconnected"), "{page}");
    let table = &page[page.find("<h2>Disconnected</h2>").expect(&page)..];
    assert!(table.contains("db-1"), "{page}");

    tokens_file(dir.path(), &[("other-*", "other")]);
    gw.gateway.reload_tokens().unwrap();
    let agents = http::get(&format!("http://{}/api/v1/agents", gw.web))
        .await
        .text();
    assert_eq!(agents, "[]");
    gw.stop().await;
}

/// With `sd_keep_disconnected: 0s` a disconnected agent leaves service discovery at once, as
/// before the setting existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_retention_a_disconnected_agent_leaves_at_once() {
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", TOKEN)], |s| {
        s.web.sd_keep_disconnected = Dur(Duration::ZERO);
    })
    .await;
    connect_and_crash(&gw, "gone-1").await;
    assert_eq!(sd_agents(gw.web).await, Vec::<String>::new());
    assert_eq!(agent_gauges(gw.web).await, (0.0, 0.0));
    gw.stop().await;
    let file = agents_file(&dir);
    assert!(!file.exists(), "{} written", file.display());
}

/// A crashed agent (its connection cut, no goodbye) is listed until its retention ends; the
/// gauge falls then, read from `/metrics` alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_agent_leaves_when_its_retention_ends() {
    let dir = TempDir::new().unwrap();
    let keep = Duration::from_millis(1500);
    let gw = start_gateway(&dir, &[("*", TOKEN)], |s| {
        s.web.sd_keep_disconnected = Dur(keep);
    })
    .await;
    connect_and_crash(&gw, "gone-1").await;
    let gone = Instant::now();
    assert_eq!(sd_agents(gw.web).await, ["gone-1"]);
    let resp = scrape(gw.web, &scrape_url("gone-1", 9100)).await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    wait_for("the gauge falls", Duration::from_secs(10), || async {
        match agent_gauges(gw.web).await {
            (0.0, 0.0) => Ok(()),
            other => Err(format!("(connected, disconnected) = {other:?}")),
        }
    })
    .await;
    assert!(
        gone.elapsed() >= keep - Duration::from_millis(200),
        "left after {:?}, before the retention of {keep:?}",
        gone.elapsed()
    );
    assert_eq!(sd_agents(gw.web).await, Vec::<String>::new());
    gw.stop().await;
}

/// Autoscaled fleets with fresh ids must not grow the list for ever: past
/// `sd_keep_disconnected_max` the longest gone leaves first, with one warning, not one per agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_the_longest_gone_agent_leaves_first() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", TOKEN)], |s| {
        s.web.sd_keep_disconnected_max = 2;
    })
    .await;
    for id in ["scaled-1", "scaled-2", "scaled-3", "scaled-4"] {
        connect_and_crash(&gw, id).await;
    }
    assert_eq!(sd_agents(gw.web).await, ["scaled-3", "scaled-4"]);
    assert_eq!(agent_gauges(gw.web).await, (0.0, 2.0));
    let warned = logs.lines_with(&["too many disconnected agents", "sd_keep_disconnected_max"]);
    assert_eq!(warned.len(), 1, "{warned:#?}");
    gw.stop().await;
}

/// A target list of one target `node` on port 9100, with agent and target labels.
fn labelled_target() -> String {
    serde_json::json!({"version": 4, "labels": {"site": "berlin"}, "targets": [
        {"name": "node", "port": 9100, "path": "/metrics", "labels": {"role": "db"}}
    ]})
    .to_string()
}

/// `<data_dir>/agents.json` of the gateways the tests start in `dir`.
fn agents_file(dir: &TempDir) -> std::path::PathBuf {
    dir.path().join("data").join("agents.json")
}

/// Waits until the agents file `file` lists the agent `id`.
async fn wait_file_lists(file: &Path, id: &str, timeout: Duration) {
    let what = format!("the agents file lists {id}");
    wait_for(&what, timeout, || async move {
        match std::fs::read_to_string(file) {
            Ok(text) if text.contains(&format!("\"{id}\"")) => Ok(()),
            other => Err(format!("{}: {other:?}", file.display())),
        }
    })
    .await;
}

/// An agent whose host dies while the gateway is being upgraded must still be reported down:
/// the restarted gateway lists it as it was, answers its scrapes 503 and counts it as
/// disconnected. When it connects again it is listed once, connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_still_lists_an_agent_that_did_not_come_back() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let tunnel = common::ferry::agent_publishing(&gw, "db-1", labelled_target()).await;
    gw.wait_agent("db-1", Duration::from_secs(10)).await;
    let groups = sd_groups_of(gw.web, "db-1").await;
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["labels"]["site"], "berlin", "{groups:?}");
    assert_eq!(groups[0]["labels"]["role"], "db", "{groups:?}");
    // Saved while it runs (what a crash would leave), not only at shutdown.
    let file = agents_file(&dir);
    wait_file_lists(&file, "db-1", Duration::from_secs(10)).await;
    gw.stop().await;
    tunnel.abort();

    let gw2 = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    assert_eq!(sd_groups_of(gw2.web, "db-1").await, groups);
    let resp = scrape(gw2.web, &scrape_url("db-1", 9100)).await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert!(resp.text().contains("not connected"), "{}", resp.text());
    assert_eq!(agent_gauges(gw2.web).await, (0.0, 1.0));
    let restored = logs.lines_with(&["restored=1", &file.display().to_string()]);
    assert_eq!(restored.len(), 1, "{restored:#?}");

    let _tunnel = common::ferry::agent_publishing(&gw2, "db-1", labelled_target()).await;
    gw2.wait_agent("db-1", Duration::from_secs(10)).await;
    assert_eq!(sd_groups_of(gw2.web, "db-1").await, groups, "listed once");
    assert_eq!(agent_gauges(gw2.web).await, (1.0, 0.0));
    assert!(gw2.gateway.disconnected_agents().is_empty());
    gw2.stop().await;
}

/// A save of the agents file that fails (a full disk; here, a directory in the file's place) is
/// counted, leaves no partial file behind, and is tried again without waiting for the next
/// change: a fleet may not change for hours. Takes the retry's 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_agents_file_save_is_counted_and_tried_again() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let file = agents_file(&dir);
    std::fs::create_dir_all(file.join("in-the-way")).unwrap();
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let _tunnel = common::ferry::agent_publishing(&gw, "db-1", labelled_target()).await;
    gw.wait_agent("db-1", Duration::from_secs(10)).await;
    let web = gw.web;
    wait_for(
        "a failed save counted",
        Duration::from_secs(10),
        || async move {
            let text = gateway_metrics(web).await;
            match metric_value(&text, "ferry_gateway_agents_file_save_failures_total", &[]) {
                Some(n) if n >= 1.0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let partial = file.with_file_name("agents.json.partial");
    assert!(!partial.exists(), "{} left behind", partial.display());
    // The disk has room again; nothing changes in the fleet.
    std::fs::remove_dir_all(&file).unwrap();
    // Saved by the retry.
    wait_file_lists(&file, "db-1", Duration::from_secs(40)).await;
    // The warning said it would be tried again: the log says it worked.
    logs.wait_lines(
        &["saved again after failed saves"],
        1,
        Duration::from_secs(5),
    )
    .await;
    gw.stop().await;
}

/// An agent decommissioned while the gateway was down (its token line removed) is not listed
/// by the restarted gateway; one whose token still holds is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_does_not_list_an_agent_whose_token_was_removed() {
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("old-1", "old"), ("db-*", TOKEN)], |_| {}).await;
    let mut tunnels = Vec::new();
    for (id, token) in [("old-1", "old"), ("db-1", TOKEN)] {
        let upgraded = upgrade_as_agent(&gw, token, id).await.expect("upgraded");
        tunnels.push(agent_publishing_on(
            upgraded,
            one_target(),
            std::future::ready(()),
        ));
        gw.wait_agent(id, Duration::from_secs(10)).await;
    }
    gw.stop().await;
    tunnels.iter().for_each(|t| t.abort());

    let gw2 = start_gateway(&dir, &[("db-*", TOKEN)], |_| {}).await;
    assert_eq!(sd_agents(gw2.web).await, ["db-1"]);
    assert_eq!(agent_gauges(gw2.web).await, (0.0, 1.0));
    gw2.stop().await;
}

/// A damaged agents file does not keep the gateway from starting: one warning names it and
/// says what is wrong, and nothing is listed. The next write replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_agents_file_is_a_warning_and_nothing_is_listed() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let file = agents_file(&dir);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "{\"version\": 1, \"agents\": [{\"id\": \"db-1\"").unwrap();
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let warned = logs.lines_with(&["WARN", &file.display().to_string(), "not JSON"]);
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert_eq!(sd_agents(gw.web).await, Vec::<String>::new());
    assert_eq!(agent_gauges(gw.web).await, (0.0, 0.0));

    connect_and_crash(&gw, "db-2").await;
    gw.stop().await;
    let gw2 = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    assert_eq!(sd_agents(gw2.web).await, ["db-2"]);
    gw2.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Churn: agents that die, targets that go, gateways that restart
// ---------------------------------------------------------------------------------------------

/// The sum of every `ferry_gateway_scrapes_total` series.
fn all_scrapes(exposition: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with("ferry_gateway_scrapes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Scrapes in flight when their agent dies (kill -9: its task ends, its tunnel with it) fail,
/// and are counted: under `agent="unknown"`, the agent's own series having gone with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_cut_by_an_agent_that_died_are_counted_under_unknown() {
    let dir = TempDir::new().unwrap();
    let server = TargetServer::start(Behaviour::Slow {
        delay: Duration::from_secs(30),
        body: "slow 1\n".into(),
    })
    .await;
    let (gw, agent) = gateway_and_agent(&dir, "dies", &[("slow", server.url("/metrics"))]).await;
    let in_flight = scrapes_reaching_target(gw.web, &target_url("dies", &server), &server, 5).await;
    agent.task.abort();
    for scrape in in_flight {
        let resp = scrape.await.unwrap().expect("an answer");
        assert_eq!(resp.status, 502, "{}", resp.text());
    }
    gw.wait_agent_gone("dies", Duration::from_secs(5)).await;
    let text = gateway_metrics(gw.web).await;
    assert_eq!(all_scrapes(&text), 5.0, "{text}");
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_scrapes_total",
            &[
                ("agent", "unknown"),
                ("target", "unknown"),
                ("status_class", "5xx")
            ]
        ),
        Some(5.0),
        "{text}"
    );
    gw.stop().await;
}

/// A scrape in flight when its agent stops listing the target does not bring the target's
/// series back: it is counted under `target="unknown"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_of_a_target_removed_meanwhile_is_counted_under_unknown() {
    let dir = TempDir::new().unwrap();
    let slow = TargetServer::start(Behaviour::Slow {
        delay: Duration::from_secs(2),
        body: "slow 1\n".into(),
    })
    .await;
    let other = metrics_server("other 1\n").await;
    let (gw, agent) = gateway_and_agent(
        &dir,
        "moving",
        &[
            ("slow", slow.url("/metrics")),
            ("other", other.url("/metrics")),
        ],
    )
    .await;
    let in_flight = scrape_reaching_target(gw.web, &target_url("moving", &slow), &slow).await;
    let kept = ferry::config::TargetSection {
        name: "other".into(),
        url: other.url("/metrics"),
        ..Default::default()
    }
    .to_target("targets[0]")
    .unwrap();
    agent
        .agent
        .set_targets(&[kept], &Default::default())
        .unwrap();
    let gone = [(format!("moving:{}", slow.addr.port()), "slow")];
    wait_sd(gw.web, &[], &gone, Duration::from_secs(5)).await;
    let resp = in_flight.await.unwrap().expect("the scrape completes");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let text = gateway_metrics(gw.web).await;
    assert!(
        !text.contains("target=\"slow\""),
        "the removed target's series came back:\n{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "ferry_gateway_scrapes_total",
            &[
                ("agent", "moving"),
                ("target", "unknown"),
                ("status_class", "2xx")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    agent.stop().await;
    gw.stop().await;
}

/// Gateways restarted one after the other, closer together than `stable_after`: each says it is
/// shutting down before its process exits, and the agent takes that for a restart, not trouble.
/// It logs so at info level and comes back within its first backoff ceiling each time, rather
/// than waiting ever longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_gateway_restarts_keep_the_agents_backoff_short() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let server = metrics_server("up 1\n").await;
    let (web_l, tunnel_l) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let mut gw = start_gateway_process_on(&dir, &[("*", TOKEN)], web_l, tunnel_l, |_| {}).await;
    let mut section = agent_section(&gw, "rolling", &[("node", server.url("/metrics"))]);
    section.reconnect.min_backoff = Dur(Duration::from_millis(100));
    section.reconnect.max_backoff = Dur(Duration::from_secs(30));
    let agent = start_agent(section, TOKEN);
    gw.wait_agent("rolling", Duration::from_secs(10)).await;
    for round in 1..=5 {
        let (web, tunnel) = (gw.web, gw.tunnel);
        let stopping = Instant::now();
        gw.stop().await;
        assert!(
            stopping.elapsed() < Duration::from_secs(3),
            "the closing notice held the shutdown for {:?}",
            stopping.elapsed()
        );
        let told = logs
            .wait_lines(
                &[
                    "INFO",
                    "the gateway is shutting down",
                    "gateway shutting down",
                ],
                round,
                Duration::from_secs(5),
            )
            .await;
        let delay = common::logs::retry_in(&told[round - 1]);
        assert!(
            delay <= Duration::from_millis(100),
            "round {round}: a delay beyond the first ceiling (100ms): {delay:?}; {told:?}"
        );
        let gone = logs.lines_with(&["agent disconnected", "reason=gateway shutting down"]);
        assert_eq!(gone.len(), round, "the gateway's log: {gone:#?}");
        // Down a moment, long enough for a failed attempt or two.
        tokio::time::sleep(Duration::from_millis(300)).await;
        gw = start_gateway_process_on(
            &dir,
            &[("*", TOKEN)],
            rebind(web).await,
            rebind(tunnel).await,
            |_| {},
        )
        .await;
        // The attempts while it was down doubled the backoff's ceiling (full jitter): on a
        // loaded machine, where starting the gateway process takes a second, the next attempt
        // may come a few seconds later. That the restart itself was not taken for trouble is
        // the retry_in check above.
        gw.wait_agent("rolling", Duration::from_secs(6)).await;
    }
    assert!(
        logs.lines_with(&["GATEWAY CLOSED OUR TUNNEL"]).is_empty(),
        "a restart taken for another agent with our id"
    );
    agent.stop().await;
    gw.stop().await;
}

/// Sends the agent a closing notice of `kind` saying `reason`, as a gateway does before closing
/// the tunnel, then closes it.
async fn send_closing_notice(
    mut sender: hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    kind: &str,
    reason: &'static str,
) {
    use http_body_util::BodyExt;
    let notice = ::http::Request::post(format!("http://ferry/ferry/v1/closing/{kind}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(reason)))
        .unwrap();
    let resp = sender.send_request(notice).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
}

/// A closing notice of a kind the agent does not know (a newer gateway's) is neither taken for
/// another agent claiming its id nor answered as a scrape: the agent reconnects as after any
/// closed tunnel, and logs the gateway's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_notice_of_an_unknown_kind_is_a_plain_close() {
    let logs = common::logs::capture();
    let (agent, sender) = common::ferry::agent_on_bare_tunnel("future", &[]).await;
    send_closing_notice(sender, "maintenance", "moving to another host\n").await;
    let lines = logs
        .wait_lines(
            &["tunnel closed by the gateway; reconnecting"],
            1,
            Duration::from_secs(5),
        )
        .await;
    assert!(lines[0].contains("moving to another host"), "{lines:?}");
    assert!(logs.lines_with(&["GATEWAY CLOSED OUR TUNNEL"]).is_empty());
    agent.stop().await;
}

/// A gateway that refuses the agent's target list says why: the agent logs it as an error to
/// fix in its configuration (the same list would be refused again), not as a plain close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_target_list_is_an_error_the_agent_logs_with_the_reason() {
    let logs = common::logs::capture();
    let (agent, sender) = common::ferry::agent_on_bare_tunnel("listed", &[]).await;
    send_closing_notice(
        sender,
        "targets",
        "the targets and labels take 3000 KiB in the gateway's service discovery\n",
    )
    .await;
    let lines = logs
        .wait_lines(
            &["ERROR", "GATEWAY REFUSED OUR TARGET LIST"],
            1,
            Duration::from_secs(5),
        )
        .await;
    assert!(lines[0].contains("3000 KiB"), "{lines:?}");
    assert!(logs
        .lines_with(&["tunnel closed by the gateway; reconnecting"])
        .is_empty());
    agent.stop().await;
}

/// An agent whose grace period ends with scrapes still running closes its tunnel as TLS means
/// it: the gateway's log says the agent went away, not that its process died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cuts_its_scrapes_closes_its_tunnel_cleanly() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let server = TargetServer::start(Behaviour::Slow {
        delay: Duration::from_secs(30),
        body: "slow 1\n".into(),
    })
    .await;
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let mut section = agent_section(&gw, "slow-5", &[("slow", server.url("/metrics"))]);
    section.shutdown_grace_period = Dur(Duration::from_millis(300));
    let agent = start_agent(section, TOKEN);
    gw.wait_agent("slow-5", Duration::from_secs(10)).await;
    let in_flight = scrape_reaching_target(gw.web, &target_url("slow-5", &server), &server).await;
    agent.shutdown.cancel();
    let resp = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the scrape is answered once the agent gives up")
        .unwrap()
        .expect("an answer");
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert!(!resp.text().contains("close_notify"), "{}", resp.text());
    let lines = logs
        .wait_lines(
            &["agent disconnected", "agent=slow-5"],
            1,
            Duration::from_secs(10),
        )
        .await;
    assert!(
        !lines[0].contains("close_notify") && lines[0].contains("the agent went away"),
        "{lines:?}"
    );
    let _ = agent.task.await;
    gw.stop().await;
}
