//! End to end with the real Prometheus and the real node_exporter (Debian packages), and the real
//! `ferry` binary as gateway and agent, as a user would run them: Prometheus uses the gateway as
//! `proxy_url`, discovers targets from `/targets`, and scrapes node_exporter (and a target whose
//! path Prometheus escapes) through the tunnel; a crashed agent's targets stay discovered and are recorded down (`up == 0`).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::external::{free_port, values, NodeExporter, Prometheus};
use common::ferry::tokens_file;
use common::servers::{Behaviour, TargetServer};

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
    // Paths Go escapes: Prometheus requests `__metrics_path__` encoded its own way.
    let escaped = TargetServer::start(Behaviour::Metrics("escaped_up 1\n".into())).await;
    let escaped_path = "/x!y/a%20b/metrics";
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
            "--web.sd-keep-disconnected=1h".into(),
        ],
        None,
        &gw_log,
    );
    let fp = fingerprint(&data_dir, &gw_log).await;
    let agent_log = dir.path().join("agent.log");
    let mut agent = ferry(
        &[
            "agent".into(),
            format!("--gateway=https://localhost:{tunnel}"),
            format!("--tunnel.fingerprint={fp}"),
            "--agent-id=node-1".into(),
            format!("--target=node={}", node.metrics_url()),
            format!("--target=escaped={}", escaped.url(escaped_path)),
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

    prometheus
        .wait_for(
            r#"up{job="ferry",ferry_agent="node-1",ferry_target="escaped"}"#,
            timeout,
            |v| values(v) == [1.0],
        )
        .await;
    assert!(
        escaped.paths().iter().all(|p| p == escaped_path),
        "{:?}",
        escaped.paths()
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

    // The agent crashes: the gateway keeps it in /targets, so Prometheus records its targets
    // down under the same series instead of forgetting them.
    agent.0.kill().expect("kill the agent");
    let _ = agent.0.wait();
    let down = prometheus
        .wait_for(
            r#"up{job="ferry",ferry_agent="node-1",ferry_target="node"}"#,
            Duration::from_secs(20),
            |v| values(v) == [0.0],
        )
        .await;
    assert_eq!(
        down["data"]["result"][0]["metric"]["instance"],
        instance,
        "{down}\n{}",
        logs()
    );
    // Still there later: Prometheus applies discovery changes every 5 s, then drops a target
    // that left discovery from its targets page and marks its series stale (no sample at all).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let targets = prometheus.targets().await;
    let node = targets["data"]["activeTargets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["labels"]["instance"] == instance)
        .unwrap_or_else(|| panic!("{instance} is no longer a target: {targets}"));
    assert_eq!(node["health"], "down", "{node}");
    let error = node["lastError"].as_str().unwrap_or_default();
    assert!(error.contains("503"), "{node}");
    let still = prometheus
        .query(r#"up{job="ferry",ferry_agent="node-1",ferry_target="node"}"#)
        .await;
    assert_eq!(values(&still), [0.0], "{still}\n{}", logs());
}

/// The push direction with the real thing: Prometheus `remote_write`s node_exporter's series
/// through `ferry egress` (its `proxy_url`) to a second Prometheus receiving remote writes. A
/// rule reads the snappy-compressed protobuf decoded: one queue's batches pass, the other
/// queue's, whose series carry a label value the rule's deny pattern matches, are refused and
/// never reach the receiver. The value repeats itself, so snappy sends most of it as a
/// back-reference: the pattern matches only the decoded body, not the bytes on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_remote_writes_through_egress_and_a_denied_label_stays_inside() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeExporter::start().await;
    let receiver = Prometheus::start_with_args(
        "global:\n  scrape_interval: 1m\n",
        &["--web.enable-remote-write-receiver"],
    )
    .await;
    let egress_port = free_port();
    let config = dir.path().join("ferry.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
egress:
  web:
    listen_address: 127.0.0.1:{egress_port}
  rules:
    - name: remote-write
      upstream: "127.0.0.1/32:{receiver_port}"
      methods: [POST]
      path_prefix: /api/v1/write
      validate:
        content_types: [application/x-protobuf]
        required_headers: [X-Prometheus-Remote-Write-Version]
        deny_patterns: ['(leak-){{4}}']
"#,
            receiver_port = receiver.addr.port()
        ),
    )
    .unwrap();
    let egress_log = dir.path().join("egress.log");
    let _egress = ferry(
        &["run".into(), format!("--config.file={}", config.display())],
        None,
        &egress_log,
    );

    let write_url = receiver.url("/api/v1/write");
    let sender = Prometheus::start(&format!(
        r#"
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: node
    static_configs:
      - targets: ['{node}']
remote_write:
  - name: clean
    url: {write_url}
    proxy_url: http://127.0.0.1:{egress_port}
    queue_config: {{ batch_send_deadline: 1s }}
  - name: leaky
    url: {write_url}
    proxy_url: http://127.0.0.1:{egress_port}
    queue_config: {{ batch_send_deadline: 1s }}
    write_relabel_configs:
      - source_labels: [__name__]
        regex: up
        action: keep
      - target_label: customer_email
        replacement: leak-leak-leak-leak-
"#,
        node = node.addr
    ))
    .await;

    let timeout = Duration::from_secs(60);
    let log = || std::fs::read_to_string(&egress_log).unwrap_or_default();
    // The clean queue's samples arrive, sent through the proxy.
    receiver
        .wait_for(r#"node_load1{job="node"}"#, timeout, |v| {
            values(v).len() == 1
        })
        .await;
    // The leaky queue's batches are refused for the label, in the decoded body.
    let metrics_url = format!("http://127.0.0.1:{egress_port}/metrics");
    let deadline = Instant::now() + timeout;
    loop {
        let text = common::http::get(&metrics_url).await.text();
        let refused = common::ferry::metric_value(
            &text,
            "ferry_egress_rejections_total",
            &[("reason", "deny_pattern")],
        );
        let allowed = common::ferry::metric_value(
            &text,
            "ferry_egress_requests_total",
            &[
                ("rule", "remote-write"),
                ("decision", "allowed"),
                ("status_class", "2xx"),
            ],
        );
        if refused.is_some_and(|n| n >= 1.0) && allowed.is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refused and allowed remote writes in the egress metrics:\n{text}\nlog:\n{}\nsender:\n{}",
            log(),
            sender.stderr()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let leaked = receiver.query(r#"{customer_email!=""}"#).await;
    assert_eq!(values(&leaked), Vec::<f64>::new(), "{leaked}");
    assert!(
        log().contains("deny pattern"),
        "the access log names the refusal:\n{}",
        log()
    );
}
