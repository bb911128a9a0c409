//! The real Prometheus and node_exporter (Debian packages `prometheus` and
//! `prometheus-node-exporter`) as child processes on loopback. A missing binary fails the test:
//! these are the real peers of the pull path and `.ci/run` installs them.
//!
//! Each process gets its own temp dir (working dir, stderr log, Prometheus config and data) and is
//! killed and reaped on drop, before its dir is removed.
#![allow(dead_code)]

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::http as client;

pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
pub const NODE_EXPORTER_BIN: &str = "/usr/bin/prometheus-node-exporter";

/// How long a child may take to answer its readiness endpoint.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often `Prometheus::wait_for` asks again.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Attempts when another process grabbed the port between `free_port` and the child's bind.
const PORT_ATTEMPTS: usize = 3;

/// A port that was free on 127.0.0.1 a moment ago (bind :0, read, drop). For children that must be
/// told a port; in-process servers should bind :0 themselves.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// A running node_exporter on `127.0.0.1:<free port>`, serving `/metrics`.
pub struct NodeExporter {
    pub addr: SocketAddr,
    process: Process,
    dir: TempDir,
}

impl NodeExporter {
    /// Starts node_exporter with a small set of fast collectors and waits until `/metrics` answers.
    pub async fn start() -> NodeExporter {
        let collectors = [
            "--collector.disable-defaults",
            "--collector.cpu",
            "--collector.loadavg",
            "--collector.meminfo",
            "--collector.netdev",
            "--collector.stat",
            "--collector.time",
            "--collector.uname",
            "--collector.vmstat",
        ];
        Self::start_with_args(&collectors).await
    }

    /// Starts node_exporter with these flags (besides listen address and log level).
    pub async fn start_with_args(extra: &[&str]) -> NodeExporter {
        let dir = temp_dir("node-exporter");
        let (addr, process) = spawn_ready(
            NODE_EXPORTER_BIN,
            "prometheus-node-exporter",
            dir.path(),
            "/metrics",
            |addr| {
                let mut args = vec![
                    format!("--web.listen-address={addr}"),
                    "--log.level=warn".to_owned(),
                ];
                args.extend(extra.iter().map(|a| (*a).to_owned()));
                args
            },
        )
        .await;
        NodeExporter { addr, process, dir }
    }

    /// `http://<addr>/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    /// Kills the exporter now (to test a target going away); the port stays unused.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// What the exporter wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }
}

/// A running Prometheus on `127.0.0.1:<free port>` with its config and TSDB in a temp dir.
pub struct Prometheus {
    pub addr: SocketAddr,
    process: Process,
    dir: TempDir,
}

impl Prometheus {
    /// Writes `config_yaml` to `<dir>/prometheus.yml`, starts Prometheus (lifecycle API on, so
    /// `reload` works) and waits until `/-/ready` answers. Relative paths in the config (file_sd
    /// files, credentials) resolve against `dir()`.
    pub async fn start(config_yaml: &str) -> Prometheus {
        Self::start_with_args(config_yaml, &[]).await
    }

    /// [`Prometheus::start`] with more command-line flags (`--web.enable-remote-write-receiver`).
    pub async fn start_with_args(config_yaml: &str, extra: &[&str]) -> Prometheus {
        let dir = temp_dir("prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_yaml).expect("write prometheus.yml");
        let data = dir.path().join("data");
        let (addr, process) = spawn_ready(
            PROMETHEUS_BIN,
            "prometheus",
            dir.path(),
            "/-/ready",
            |addr| {
                vec![
                    format!("--config.file={}", config.display()),
                    format!("--storage.tsdb.path={}", data.display()),
                    format!("--web.listen-address={addr}"),
                    "--web.enable-lifecycle".to_owned(),
                    "--log.level=warn".to_owned(),
                ]
                .into_iter()
                .chain(extra.iter().map(|a| a.to_string()))
                .collect()
            },
        )
        .await;
        Prometheus { addr, process, dir }
    }

    /// The temp dir holding `prometheus.yml`; write file_sd or token files here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Replaces `prometheus.yml` and asks Prometheus to reload it; panics if it refuses.
    pub async fn reload(&self, config_yaml: &str) {
        std::fs::write(self.dir().join("prometheus.yml"), config_yaml).expect("write config");
        let req = http::Request::post("/-/reload")
            .header(http::header::HOST, self.addr.to_string())
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("valid reload request");
        let resp = client::send(self.addr, req).await;
        assert_eq!(
            resp.status,
            200,
            "Prometheus reload failed: {}",
            resp.text()
        );
    }

    /// `GET /api/v1/query?query=<promql>` — the whole JSON answer (`status`, `data.result`, ...).
    pub async fn query(&self, promql: &str) -> Value {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        self.get_json(&path).await
    }

    /// `GET /api/v1/targets` — scrape targets with health, last error and labels.
    pub async fn targets(&self) -> Value {
        self.get_json("/api/v1/targets").await
    }

    /// Runs `promql` every 500 ms until `pred` accepts the answer; panics with the last answer
    /// after `timeout`.
    pub async fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.query(promql).await;
            if pred(&answer) {
                return answer;
            }
            if Instant::now() >= deadline {
                panic!(
                    "Prometheus query {promql:?} did not match within {timeout:?}; last answer: \
                     {answer}\ntargets: {}",
                    self.targets().await
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// What Prometheus wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    async fn get_json(&self, path: &str) -> Value {
        let resp = client::get(&self.url(path)).await;
        assert_eq!(
            resp.status,
            200,
            "Prometheus GET {path}: {} {}",
            resp.status,
            resp.text()
        );
        serde_json::from_slice(&resp.body)
            .unwrap_or_else(|e| panic!("Prometheus GET {path}: not JSON ({e}): {}", resp.text()))
    }
}

/// The sample values of an instant-vector query answer (`data.result[*].value[1]`), in order.
/// Handy in `wait_for` predicates: `|v| values(v) == [1.0]`.
pub fn values(answer: &Value) -> Vec<f64> {
    answer["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|series| series["value"][1].as_str()?.parse().ok())
        .collect()
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for a query string value).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A child process with stderr going to a file; killed and reaped on drop.
struct Process {
    child: Child,
    command: String,
    stderr_path: PathBuf,
}

impl Process {
    fn spawn(bin: &str, args: &[String], dir: &Path, stderr_path: PathBuf) -> Process {
        let stderr = File::create(&stderr_path).expect("create child stderr log");
        let child = Command::new(bin)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        Process {
            child,
            command: format!("{bin} {}", args.join(" ")),
            stderr_path,
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

enum Startup {
    Ready,
    Exited(ExitStatus),
    TimedOut,
}

/// Starts `bin` on a free loopback port (retrying if the port was taken meanwhile) and waits until
/// `ready_path` answers 200. Panics with the command and its stderr otherwise.
async fn spawn_ready(
    bin: &str,
    package: &str,
    dir: &Path,
    ready_path: &str,
    args: impl Fn(SocketAddr) -> Vec<String>,
) -> (SocketAddr, Process) {
    assert!(
        Path::new(bin).exists(),
        "{bin} not found: install the Debian package `{package}` (apt-get install {package}); \
         ferry's integration tests need the real one"
    );
    for attempt in 1..=PORT_ATTEMPTS {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let stderr_path = dir.join(format!("stderr-{attempt}.log"));
        let mut process = Process::spawn(bin, &args(addr), dir, stderr_path);
        match wait_ready(&mut process, addr, ready_path).await {
            Startup::Ready => return (addr, process),
            Startup::Exited(_) if is_port_clash(&process.stderr()) && attempt < PORT_ATTEMPTS => {
                continue
            }
            Startup::Exited(status) => panic!(
                "{} exited with {status} before answering {ready_path}; stderr:\n{}",
                process.command,
                process.stderr()
            ),
            Startup::TimedOut => panic!(
                "{} did not answer {ready_path} within {READY_TIMEOUT:?}; stderr:\n{}",
                process.command,
                process.stderr()
            ),
        }
    }
    unreachable!("the last attempt returns or panics")
}

async fn wait_ready(process: &mut Process, addr: SocketAddr, ready_path: &str) -> Startup {
    let url = format!("http://{addr}{ready_path}");
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = process.exited() {
            return Startup::Exited(status);
        }
        let probe = tokio::time::timeout(Duration::from_secs(2), client::try_get(&url, &[])).await;
        if let Ok(Ok(resp)) = probe {
            if resp.status == 200 {
                return Startup::Ready;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Startup::TimedOut
}

fn is_port_clash(stderr: &str) -> bool {
    stderr.contains("address already in use")
}

fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("ferry-test-{prefix}-"))
        .tempdir()
        .expect("create temp dir")
}
