//! Egress benchmark: Datakit's published proxy scenario — 16 concurrent clients × 100 POSTs of a
//! ~170 KB body — sent directly to the collector and through `ferry egress`.
//!
//! `cargo bench --bench egress` builds this program and the `ferry` binary in release mode and runs
//! it. It prints medians over several rounds, ratios against the direct baseline measured in the
//! same rounds, and PASS/FAIL against the targets; it exits 0 whatever the numbers (it is a
//! measurement), non-zero only when it could not measure (a request failed, a proxy did not start).
//! docs/benchmarks.md ("Egress") explains every number.
//!
//! Who runs where (all on the same cores):
//! - the proxy is the real `ferry run --config.file <yaml>` binary in its own process, one with
//!   `--log.level warn` and one with `--log.level info` (one access-log line per request, to a
//!   file), both with the same two rules towards the collector:
//!   `bench-json` (POST, path prefix `/json`, `validate: { json: true }`) and
//!   `bench-plain` (POST and CONNECT, no validation);
//! - this process holds the collector (a hyper HTTP/1.1 server that reads the whole body and
//!   answers 200 `ok`) and the 16 clients (hyper HTTP/1.1, one keep-alive connection each,
//!   requests one after the other on it).
//!
//! Scenarios, each 16 × 100 POSTs per round:
//! - `direct`: clients to the collector, origin-form;
//! - (a) `absolute-form`: clients to the proxy, `POST http://127.0.0.1:<port>/plain`;
//! - (b) `CONNECT`: each client opens one tunnel, then sends its 100 POSTs through it;
//! - `direct, JSON` and (c) `absolute-form + JSON validation`: the same with a JSON payload of the
//!   same size to `/json`, which the proxy parses completely before forwarding.
//!
//! Each proxied run comes right after a direct run with the same payload, and its ratio is taken
//! against that run, so that a change in what else the machine does hits both sides alike. CPU
//! per request of the proxy and of this process is read from `/proc/<pid>/stat`.
//!
//! Environment: `FERRY_BENCH_ROUNDS` (default 5); `FERRY_BENCH_ONLY`: run only the proxied scenarios
//! whose name contains one of these `|`-separated strings (e.g. `CONNECT, log warn`);
//! `FERRY_BENCH_PROXY_WRAPPER`: a program the proxy is started under (`benches/common/wrapper.rs`).

#[path = "common/wrapper.rs"]
mod wrapper;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Size of every request body (line protocol or JSON), as in Datakit's scenario (~170 KB).
const BODY_BYTES: usize = 170 * 1024;
/// Concurrent clients, one keep-alive connection each.
const CLIENTS: usize = 16;
/// Sequential POSTs per client per run.
const REQUESTS_PER_CLIENT: usize = 100;
/// POSTs per client in the warm-up run of each scenario.
const WARMUP_PER_CLIENT: usize = 5;

/// The targets from the issue: requests/s through the proxy over requests/s direct.
const TARGET_ABSOLUTE: f64 = 0.5;
const TARGET_CONNECT: f64 = 0.6;
const TARGET_JSON: f64 = 0.3;

fn main() -> ExitCode {
    let rounds = std::env::var("FERRY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v: &usize| *v > 0)
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(rounds)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark aborted: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(rounds: usize) -> Result<(), String> {
    println!(
        "ferry egress benchmark: {rounds} rounds, {CLIENTS} clients x {REQUESTS_PER_CLIENT} POSTs of {BODY_BYTES} bytes, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let collector = Collector::start().await?;
    let proxies = [
        ProxyProcess::start(collector.addr, "warn").await?,
        ProxyProcess::start(collector.addr, "info").await?,
    ];
    let plain = Bytes::from(line_protocol(BODY_BYTES));
    let json = Bytes::from(json_payload(BODY_BYTES));
    serde_json::from_slice::<serde_json::Value>(&json)
        .map_err(|e| format!("the JSON payload is not JSON: {e}"))?;
    let body = |p: Payload| match p {
        Payload::Plain => &plain,
        Payload::Json => &json,
    };

    let directs = [Payload::Plain, Payload::Json]
        .map(|p| Scenario::new(Mode::Direct, &collector, p, body(p)));
    let only: Vec<String> = std::env::var("FERRY_BENCH_ONLY")
        .map(|v| v.split('|').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut cases = Vec::new();
    for (proxy, log) in [(0, "warn"), (1, "info")] {
        let addr = proxies[proxy].addr;
        for (label, mode, payload, target) in [
            (
                "(a) absolute-form",
                Mode::Absolute(addr),
                Payload::Plain,
                TARGET_ABSOLUTE,
            ),
            (
                "(b) CONNECT",
                Mode::Connect(addr),
                Payload::Plain,
                TARGET_CONNECT,
            ),
            (
                "(c) absolute-form + JSON validation",
                Mode::Absolute(addr),
                Payload::Json,
                TARGET_JSON,
            ),
        ] {
            let name = format!("{label}, log {log}");
            if only.is_empty() || only.iter().any(|o| name.contains(o.as_str())) {
                let scenario = Scenario::new(mode, &collector, payload, body(payload));
                cases.push(Case {
                    name,
                    proxy,
                    scenario,
                    target,
                });
            }
        }
    }

    for s in directs.iter().chain(cases.iter().map(|c| &c.scenario)) {
        s.run(&collector, WARMUP_PER_CLIENT).await?;
    }
    let mut direct_runs: [Vec<RunStats>; 2] = [Vec::new(), Vec::new()];
    let mut case_runs: Vec<Vec<Paired>> = cases.iter().map(|_| Vec::new()).collect();
    let load_before = load_average();
    let started = Instant::now();
    for round in 0..rounds {
        let mut line = format!("round {}/{rounds}:", round + 1);
        // Each proxied run is compared with a direct run of the same payload just before it, so
        // that a change in what else the machine is doing affects both sides of the ratio alike.
        for (case, out) in cases.iter().zip(case_runs.iter_mut()) {
            let d = case.scenario.payload as usize;
            let direct = directs[d].run(&collector, REQUESTS_PER_CLIENT).await?;
            let proxy = &proxies[case.proxy];
            let cpu_before = proxy.cpu_secs();
            let mut stats = case.scenario.run(&collector, REQUESTS_PER_CLIENT).await?;
            stats.proxy_cpu = Some(proxy.cpu_secs() - cpu_before);
            let ratio = stats.rps() / direct.rps();
            let cpu_ratio = direct.bench_cpu_ms() / (stats.bench_cpu_ms() + stats.proxy_cpu_ms());
            let _ = write!(line, " {} {:.2}x;", case.name, ratio);
            out.push(Paired {
                run: stats,
                ratio,
                cpu_ratio,
            });
            direct_runs[d].push(direct);
        }
        println!("{line}");
    }
    let elapsed = started.elapsed();
    for p in &proxies {
        p.check_alive()?;
    }
    println!(
        "load average (1 min) before the rounds {load_before}, after {}",
        load_average()
    );
    report(
        &directs,
        &direct_runs,
        &cases,
        &case_runs,
        rounds,
        elapsed,
        &proxies[1],
    );
    Ok(())
}

/// One proxied run and how it compares with the direct run just before it.
struct Paired {
    run: RunStats,
    /// Requests/s through the proxy over requests/s direct.
    ratio: f64,
    /// Direct CPU per request (clients + collector) over proxied CPU per request (clients +
    /// collector + proxy): the ratio a machine running nothing else, CPU-bound, would show.
    cpu_ratio: f64,
}

/// A scenario through one of the proxies, with its target ratio.
struct Case {
    name: String,
    /// Index in the proxies: 0 logs at warn, 1 at info.
    proxy: usize,
    scenario: Scenario,
    target: f64,
}

// ---------------------------------------------------------------------------------------------
// Scenarios and the load client

#[derive(Clone, Copy)]
enum Mode {
    /// Origin-form requests to the collector.
    Direct,
    /// Absolute-form requests to the proxy at this address.
    Absolute(SocketAddr),
    /// A CONNECT tunnel through the proxy at this address, then origin-form requests in it.
    Connect(SocketAddr),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Payload {
    Plain,
    Json,
}

struct Scenario {
    /// For error messages.
    name: String,
    mode: Mode,
    payload: Payload,
    /// Where the client connects first.
    connect_to: SocketAddr,
    /// The collector, as `host:port` (Host header and CONNECT target).
    authority: String,
    uri: Uri,
    content_type: HeaderValue,
    body: Bytes,
}

impl Scenario {
    fn new(mode: Mode, collector: &Collector, payload: Payload, body: &Bytes) -> Scenario {
        let authority = collector.addr.to_string();
        let path = match payload {
            Payload::Plain => "/plain",
            Payload::Json => "/json",
        };
        let (connect_to, uri, name) = match mode {
            Mode::Direct => (collector.addr, path.to_owned(), "direct".to_owned()),
            Mode::Connect(proxy) => (proxy, path.to_owned(), format!("CONNECT via {proxy}")),
            Mode::Absolute(proxy) => (
                proxy,
                format!("http://{authority}{path}"),
                format!("absolute-form via {proxy}"),
            ),
        };
        let content_type = match payload {
            Payload::Plain => "text/plain; charset=utf-8",
            Payload::Json => "application/json",
        };
        Scenario {
            name: format!("{name} {path}"),
            mode,
            payload,
            connect_to,
            uri: uri.parse().expect("valid URI"),
            authority,
            content_type: HeaderValue::from_static(content_type),
            body: body.clone(),
        }
    }

    /// 16 clients, `per_client` POSTs each; fails if any request does not get 200 `ok`.
    async fn run(&self, collector: &Collector, per_client: usize) -> Result<RunStats, String> {
        let seen_before = collector.requests.load(Ordering::Relaxed);
        let scenario = Arc::new(self.clone_light());
        let cpu_before = cpu_secs("self");
        let start = Instant::now();
        let mut clients = JoinSet::new();
        for _ in 0..CLIENTS {
            let s = scenario.clone();
            clients.spawn(async move { s.client(per_client).await });
        }
        let mut latencies = Vec::with_capacity(CLIENTS * per_client);
        while let Some(res) = clients.join_next().await {
            let mut l = res.map_err(|e| format!("client task: {e}"))??;
            latencies.append(&mut l);
        }
        let wall = start.elapsed();
        let bench_cpu = cpu_secs("self") - cpu_before;
        let seen = collector.requests.load(Ordering::Relaxed) - seen_before;
        let sent = (CLIENTS * per_client) as u64;
        if seen != sent {
            return Err(format!(
                "{}: the collector received {seen} requests of {sent}",
                self.name
            ));
        }
        Ok(RunStats::new(latencies, wall, bench_cpu))
    }

    fn clone_light(&self) -> Scenario {
        Scenario {
            name: self.name.clone(),
            mode: self.mode,
            payload: self.payload,
            connect_to: self.connect_to,
            authority: self.authority.clone(),
            uri: self.uri.clone(),
            content_type: self.content_type.clone(),
            body: self.body.clone(),
        }
    }

    /// One client: one connection (one tunnel for CONNECT), `n` POSTs one after the other.
    async fn client(&self, n: usize) -> Result<Vec<Duration>, String> {
        let mut stream = TcpStream::connect(self.connect_to)
            .await
            .map_err(|e| format!("{}: connect {}: {e}", self.name, self.connect_to))?;
        let _ = stream.set_nodelay(true);
        if let Mode::Connect(_) = self.mode {
            open_tunnel(&mut stream, &self.authority)
                .await
                .map_err(|e| format!("{}: {e}", self.name))?;
        }
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| format!("{}: HTTP handshake: {e}", self.name))?;
        tokio::spawn(conn);
        let host = HeaderValue::from_str(&self.authority).map_err(|e| e.to_string())?;
        let mut latencies = Vec::with_capacity(n);
        for i in 0..n {
            sender
                .ready()
                .await
                .map_err(|e| format!("{}: connection closed after {i} requests: {e}", self.name))?;
            let mut req = Request::new(Full::new(self.body.clone()));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = self.uri.clone();
            let h = req.headers_mut();
            h.insert(header::HOST, host.clone());
            h.insert(header::CONTENT_TYPE, self.content_type.clone());
            h.insert(
                header::USER_AGENT,
                HeaderValue::from_static("datakit-bench/1.0"),
            );
            let t0 = Instant::now();
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("{}: request {i}: {e}", self.name))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{}: response body: {e}", self.name))?
                .to_bytes();
            latencies.push(t0.elapsed());
            if status != StatusCode::OK || &body[..] != b"ok" {
                return Err(format!(
                    "{}: request {i}: {status} {}",
                    self.name,
                    String::from_utf8_lossy(&body).trim()
                ));
            }
        }
        Ok(latencies)
    }
}

/// Sends `CONNECT authority` and reads the proxy's answer head; anything but 200 is an error.
async fn open_tunnel(stream: &mut TcpStream, authority: &str) -> Result<(), String> {
    let head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("CONNECT: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("CONNECT answer: {e}"))?;
        if n == 0 || buf.len() > 8192 {
            return Err(format!(
                "CONNECT answer cut short: {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "CONNECT refused: {}",
            text.lines().next().unwrap_or("")
        ));
    }
    if !text.ends_with("\r\n\r\n") {
        return Err("the proxy sent bytes after its CONNECT answer".into());
    }
    Ok(())
}

/// What one run of one scenario measured.
struct RunStats {
    /// Sorted request latencies (send to last response byte).
    latencies: Vec<Duration>,
    wall: Duration,
    /// CPU seconds this process (clients and collector) used during the run.
    bench_cpu: f64,
    /// CPU seconds the proxy process used during the run (user + system).
    proxy_cpu: Option<f64>,
}

impl RunStats {
    fn new(mut latencies: Vec<Duration>, wall: Duration, bench_cpu: f64) -> RunStats {
        latencies.sort();
        RunStats {
            latencies,
            wall,
            bench_cpu,
            proxy_cpu: None,
        }
    }

    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    /// Nearest-rank percentile, in seconds.
    fn percentile(&self, q: f64) -> f64 {
        let n = self.latencies.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.latencies[rank - 1].as_secs_f64()
    }

    /// Proxy CPU per request, in milliseconds.
    fn proxy_cpu_ms(&self) -> f64 {
        self.proxy_cpu
            .map_or(f64::NAN, |c| c * 1e3 / self.latencies.len() as f64)
    }

    /// Client and collector CPU per request, in milliseconds.
    fn bench_cpu_ms(&self) -> f64 {
        self.bench_cpu * 1e3 / self.latencies.len() as f64
    }
}

// ---------------------------------------------------------------------------------------------
// The collector

/// The collector: HTTP/1.1, reads the whole body, answers 200 `ok` (400 if the body is short).
struct Collector {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl Collector {
    async fn start() -> Result<Collector, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("bind collector: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        // The project's own accept loop and HTTP/1.1 server, never shut down: the bench exits.
        tokio::spawn(ferry::server::serve_http(
            listener,
            move |_peer, req: Request<Incoming>| {
                let counter = counter.clone();
                async move { collect(req, &counter).await }
            },
            tokio_util::sync::CancellationToken::new(),
            Duration::from_secs(1),
        ));
        Ok(Collector { addr, requests })
    }
}

/// Reads the whole body: 200 `ok` (counted) if it has the expected size, else 400 saying why.
async fn collect(req: Request<Incoming>, counter: &AtomicU64) -> Response<ferry::http_util::Body> {
    use ferry::http_util::{full, text_response};
    match req.into_body().collect().await.map(|b| b.to_bytes()) {
        Ok(b) if b.len() == BODY_BYTES => {
            counter.fetch_add(1, Ordering::Relaxed);
            Response::new(full(Bytes::from_static(b"ok")))
        }
        Ok(b) => text_response(
            StatusCode::BAD_REQUEST,
            &format!("body of {} bytes", b.len()),
        ),
        Err(e) => text_response(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    }
}

/// InfluxDB line protocol, as Datakit sends it, of exactly `bytes` bytes.
fn line_protocol(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 256);
    let mut i = 0u64;
    while out.len() < bytes {
        let _ = writeln!(
            out,
            "cpu,host=web-{:02},cpu=cpu{},region=eu-west-1 usage_user={}.{:02},usage_system={}.{:02},usage_idle={}.{:02} {}",
            i % 40,
            i % 8,
            i % 97,
            i % 100,
            i % 13,
            (i * 7) % 100,
            90 - i % 50,
            (i * 3) % 100,
            1_700_000_000_000_000_000u64 + i * 10_000_000_000
        );
        i += 1;
    }
    out.truncate(bytes - 1);
    out.push('\n');
    out
}

/// A JSON document (an array of metric points, Server Density postback style) of exactly `bytes` bytes.
fn json_payload(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 256);
    out.push_str("{\"agentKey\":\"3f1c9e2a\",\"collectedAt\":1700000000,\"points\":[");
    let mut i = 0u64;
    loop {
        let point = format!(
            "{{\"name\":\"cpu.usage_user\",\"tags\":{{\"host\":\"web-{:02}\",\"cpu\":\"cpu{}\",\"region\":\"eu-west-1\"}},\"value\":{}.{:02},\"ts\":{}}}",
            i % 40,
            i % 8,
            i % 97,
            i % 100,
            1_700_000_000 + i
        );
        // Room for the separator, this point and the closing "]}".
        if out.len() + 1 + point.len() + 2 > bytes {
            break;
        }
        if i > 0 {
            out.push(',');
        }
        out.push_str(&point);
        i += 1;
    }
    out.push_str("]}");
    // Pad to the exact size with insignificant whitespace (less than one point's worth).
    while out.len() < bytes {
        out.push(' ');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The proxy process

struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// `ferry run --config.file <yaml> --log.level <level>`, stderr (the log) to a file.
    async fn start(collector: SocketAddr, level: &str) -> Result<ProxyProcess, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let addr = free_port()?;
        let config = dir.path().join("ferry.yaml");
        let yaml = format!(
            "egress:
  web:
    listen_address: {addr}
  rules:
    - name: bench-json
      upstream: 127.0.0.1/32:{port}
      methods: [POST]
      path_prefix: /json
      validate:
        json: true
    - name: bench-plain
      upstream: 127.0.0.1/32:{port}
      methods: [POST, CONNECT]
",
            port = collector.port()
        );
        std::fs::write(&config, yaml).map_err(|e| format!("config file: {e}"))?;
        let log = dir.path().join("ferry.log");
        let log_file = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
        let bin = env!("CARGO_BIN_EXE_ferry");
        let child = wrapper::ferry_command("FERRY_BENCH_PROXY_WRAPPER", bin)
            .arg("run")
            .arg("--config.file")
            .arg(&config)
            .arg("--log.level")
            .arg(level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {bin}: {e}"))?;
        let mut p = ProxyProcess {
            child,
            addr,
            log,
            _dir: dir,
        };
        p.wait_healthy().await?;
        println!(
            "ferry egress (log level {level}) pid {} on {addr}",
            p.child.id()
        );
        Ok(p)
    }

    async fn wait_healthy(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("ferry exited ({status}):\n{}", self.log_tail()));
            }
            if let Ok(StatusCode::OK) = get_status(self.addr, "/-/healthy").await {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "ferry egress not healthy after 30 s:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn check_alive(&self) -> Result<(), String> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()));
        match stat {
            Ok(s) if !s.contains(") Z ") => Ok(()),
            _ => Err(format!(
                "ferry egress {} died:\n{}",
                self.addr,
                self.log_tail()
            )),
        }
    }

    /// User + system CPU seconds used so far.
    fn cpu_secs(&self) -> f64 {
        cpu_secs(&self.child.id().to_string())
    }

    fn log_lines(&self) -> (usize, u64) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        (
            text.lines().filter(|l| l.contains("decision=")).count(),
            text.len() as u64,
        )
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The 1-minute load average, for the record.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// User + system CPU seconds used so far by process `pid` (or `self`): Linux `/proc`, USER_HZ = 100.
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(14) + ticks(15)) / 100.0
}

/// A loopback port that was free a moment ago (the config file needs a concrete port).
fn free_port() -> Result<SocketAddr, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    listener.local_addr().map_err(|e| e.to_string())
}

/// GET of one of the proxy's own endpoints on a fresh connection.
async fn get_status(addr: SocketAddr, path: &str) -> Result<StatusCode, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = path.parse().map_err(|e| format!("{path}: {e}"))?;
    req.headers_mut().insert(
        header::HOST,
        HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?,
    );
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

// ---------------------------------------------------------------------------------------------
// Report

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "FAIL"
    }
}

/// Medians over rounds of one scenario.
struct Summary {
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    proxy_cpu_ms: f64,
    bench_cpu_ms: f64,
}

impl Summary {
    fn of<'a>(runs: impl Iterator<Item = &'a RunStats> + Clone) -> Summary {
        let pick = |f: &dyn Fn(&RunStats) -> f64| median(runs.clone().map(f).collect());
        Summary {
            rps: pick(&|r| r.rps()),
            p50: pick(&|r| r.percentile(0.50)),
            p90: pick(&|r| r.percentile(0.90)),
            p99: pick(&|r| r.percentile(0.99)),
            proxy_cpu_ms: pick(&|r| r.proxy_cpu_ms()),
            bench_cpu_ms: pick(&|r| r.bench_cpu_ms()),
        }
    }
}

fn report(
    directs: &[Scenario; 2],
    direct_runs: &[Vec<RunStats>; 2],
    cases: &[Case],
    case_runs: &[Vec<Paired>],
    rounds: usize,
    elapsed: Duration,
    logged: &ProxyProcess,
) {
    println!(
        "\n== results: medians of {rounds} rounds ({:.0} s), {CLIENTS} clients x {REQUESTS_PER_CLIENT} POSTs of {BODY_BYTES} bytes, loopback ==",
        elapsed.as_secs_f64()
    );
    println!(
        "  {:<46} {:>6} {:>5} {:>8} {:>8} {:>8} {:>7} {:>9} {:>9}",
        "scenario", "req/s", "MB/s", "p50", "p90", "p99", "ratio", "proxy CPU", "bench CPU"
    );
    let ms = |secs: f64| format!("{:.1} ms", secs * 1e3);
    let row = |name: &str, m: &Summary, ratio: String| {
        println!(
            "  {name:<46} {:>6.0} {:>5.0} {:>8} {:>8} {:>8} {ratio:>7} {:>9} {:>9}",
            m.rps,
            m.rps * BODY_BYTES as f64 / 1e6,
            ms(m.p50),
            ms(m.p90),
            ms(m.p99),
            if m.proxy_cpu_ms.is_nan() {
                "-".to_owned()
            } else {
                format!("{:.3} ms", m.proxy_cpu_ms)
            },
            format!("{:.3} ms", m.bench_cpu_ms),
        );
    };
    for (d, runs) in directs.iter().zip(direct_runs) {
        if !runs.is_empty() {
            let name = match d.payload {
                Payload::Plain => "direct (line protocol)",
                Payload::Json => "direct (JSON)",
            };
            row(name, &Summary::of(runs.iter()), "1.00x".into());
        }
    }
    let ratios: Vec<f64> = case_runs
        .iter()
        .map(|runs| median(runs.iter().map(|p| p.ratio).collect()))
        .collect();
    let cpu_ratios: Vec<f64> = case_runs
        .iter()
        .map(|runs| median(runs.iter().map(|p| p.cpu_ratio).collect()))
        .collect();
    for ((case, runs), ratio) in cases.iter().zip(case_runs).zip(&ratios) {
        row(
            &case.name,
            &Summary::of(runs.iter().map(|p| &p.run)),
            format!("{ratio:.2}x"),
        );
    }
    println!("  ratio: median over rounds of req/s through the proxy / req/s direct in the run just before;");
    println!(
        "  CPU: per request, proxy process / this process (clients + collector), user + system"
    );
    let (log_lines, log_bytes) = logged.log_lines();
    println!(
        "  the log-info proxy wrote {log_lines} access-log lines ({:.1} KiB) to a file",
        log_bytes as f64 / 1024.0,
    );

    println!("\ntargets (2-core machine shared by clients, proxy and collector)");
    println!(
        "  {:<6} {:<46} {:>8} {:>8}  CPU-bound estimate",
        "", "", "measured", "target"
    );
    for ((case, ratio), cpu_ratio) in cases.iter().zip(&ratios).zip(&cpu_ratios) {
        println!(
            "  [{}] {:<46} {:>7.2}x {:>8}  {cpu_ratio:.2}x",
            verdict(*ratio >= case.target),
            case.name,
            ratio,
            format!(">= {}x", case.target),
        );
    }
    println!("  CPU-bound estimate: direct CPU per request / (proxied clients + collector + proxy CPU per");
    println!("  request), median over rounds: the ratio on a machine running nothing else, if CPU-bound.");
}
