//! End to end with the real Prometheus and the real node_exporter (Debian packages), and the real
//! `ferry` binary as gateway and agent, as a user would run them: Prometheus uses the gateway as
//! `proxy_url`, discovers targets from `/targets`, and scrapes node_exporter through the tunnel.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::external::{free_port, values, NodeExporter, Prometheus};
use common::ferry::tokens_file;

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ferry(args: &[String], token: Option<&str>, log: &Path) -> Killed {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    if let Some(token) = token {
        cmd.env("FERRY_TOKEN", token);
    }
    Killed(cmd.spawn().expect("spawn ferry"))
}

/// Waits for the gateway's self-signed certificate and returns its fingerprint.
async fn fingerprint(data_dir: &Path, log: &Path) -> String {
    let cert = data_dir.join("tunnel-cert.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(certs) = ferry::tunnel::tls::read_certs(&cert) {
            return ferry::tunnel::tls::fingerprint(&certs[0]);
        }
        assert!(
            Instant::now() < deadline,
            "gateway wrote no certificate; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_node_exporter_through_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeExporter::start().await;
    let (web, tunnel) = (free_port(), free_port());
    let data_dir = dir.path().join("data");
    let tokens = tokens_file(dir.path(), &[("node-*", "e2e-secret")]);
    let gw_log = dir.path().join("gateway.log");
    let _gateway = ferry(
        &[
            "gateway".into(),
            format!("--web.listen-address=127.0.0.1:{web}"),
            format!("--tunnel.listen-address=127.0.0.1:{tunnel}"),
            format!("--data-dir={}", data_dir.display()),
            format!("--auth.tokens-file={}", tokens.display()),
        ],
        None,
        &gw_log,
    );
    let fp = fingerprint(&data_dir, &gw_log).await;
    let agent_log = dir.path().join("agent.log");
    let _agent = ferry(
        &[
            "agent".into(),
            format!("--gateway=https://localhost:{tunnel}"),
            format!("--tunnel.fingerprint={fp}"),
            "--agent-id=node-1".into(),
            format!("--target=node={}", node.metrics_url()),
            "--label=dc=lab".into(),
        ],
        Some("e2e-secret"),
        &agent_log,
    );

    let prometheus = Prometheus::start(&format!(
        r#"
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: ferry
    proxy_url: http://127.0.0.1:{web}
    http_sd_configs:
      - url: http://127.0.0.1:{web}/targets
        refresh_interval: 1s
"#
    ))
    .await;

    let logs = || {
        format!(
            "gateway log:\n{}\nagent log:\n{}",
            std::fs::read_to_string(&gw_log).unwrap_or_default(),
            std::fs::read_to_string(&agent_log).unwrap_or_default()
        )
    };
    let timeout = Duration::from_secs(60);
    let up = prometheus
        .wait_for(
            r#"up{job="ferry",ferry_agent="node-1",ferry_target="node"}"#,
            timeout,
            |v| values(v) == [1.0],
        )
        .await;
    let instance = up["data"]["result"][0]["metric"]["instance"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        instance,
        format!("node-1:{}", node.addr.port()),
        "{up}\n{}",
        logs()
    );

    // A node_exporter series, scraped through the tunnel, carries the agent's labels.
    let series = prometheus
        .wait_for(
            r#"node_load1{ferry_agent="node-1",ferry_target="node",dc="lab"}"#,
            timeout,
            |v| values(v).len() == 1,
        )
        .await;
    assert_eq!(
        series["data"]["result"][0]["metric"]["job"], "ferry",
        "{series}"
    );

    // The agent's own metrics are the built-in target `ferry`, scraped the same way.
    prometheus
        .wait_for(
            r#"ferry_agent_tunnel_up{ferry_agent="node-1",ferry_target="ferry"}"#,
            timeout,
            |v| values(v) == [1.0],
        )
        .await;
    // The node scrapes the agent served are counted in its own metrics (the first `ferry`
    // scrape may come before the first node scrape: wait for a later one).
    prometheus
        .wait_for(
            r#"ferry_agent_scrapes_total{ferry_agent="node-1",target="node",result="ok"}"#,
            timeout,
            |v| values(v).first().is_some_and(|n| *n >= 1.0),
        )
        .await;
}
