//! Pull-path benchmark: scrape latency and throughput on loopback through ferry versus directly to
//! the target, and the gateway's memory with 1,000 idle agents and during a 50 MB scrape.
//!
//! `cargo bench --bench pull` builds this program and the `ferry` binary in release mode and runs
//! it. It prints medians over several rounds, ratios against the direct baseline measured in the
//! same rounds, and PASS/FAIL against the targets; it exits 0 whatever the numbers (it is a
//! measurement), non-zero only when it could not measure (a scrape failed, the gateway did not start).
//! docs/benchmarks.md explains every number.
//!
//! Who runs where:
//! - the gateway is the real `ferry gateway` binary in its own process, so its RSS is its own;
//! - this process holds the target server (hyper; a 60 KiB body and a streamed 50 MiB body), the
//!   simulated agents (`ferry::agent::Agent`, one TLS tunnel each) and the load client (hyper
//!   HTTP/1.1 keep-alive connections, like Prometheus).
//!
//! Phase A, a gateway with one agent: the 50 MB scrape (gateway RSS sampled every 5 ms), then rounds
//! of latency and throughput, direct and through ferry alternating. Phase B, a fresh gateway: its RSS
//! before agents, with half and with all agents idle, then the same rounds with the load spread over
//! every agent.
//!
//! Environment: `FERRY_BENCH_ROUNDS` (default 5), `FERRY_BENCH_AGENTS` (default 1000),
//! `FERRY_BENCH_GATEWAY_WRAPPER` (a profiler to run the gateway under), `FERRY_BENCH_ONLY`
//! (`idle-memory`: only the idle-agents memory reading; `one-agent`: only phase A),
//! `FERRY_BENCH_IDLE_SECS` (how long agents stay idle before each memory reading, default 5).

#[path = "common/wrapper.rs"]
mod wrapper;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry::agent::Agent;
use ferry::config::{AgentSection, ConfigErrors, Dur, TargetSection};
use ferry::http_util::{boxed, full, text_response, Body};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Size of the scrape body of the latency and throughput runs.
const BODY_BYTES: usize = 60 * 1024;
/// Size of the large scrape.
const BIG_BYTES: u64 = 50 * 1024 * 1024;
/// Chunk size the target streams the large body in.
const BIG_CHUNK: usize = 64 * 1024;
/// Sequential scrapes per latency measurement, after the warm-up.
const LATENCY_REQUESTS: usize = 2000;
const LATENCY_WARMUP: usize = 200;
/// Concurrent keep-alive connections of the throughput measurement.
const CONCURRENCY: usize = 16;
/// Length of one throughput measurement.
const THROUGHPUT_TIME: Duration = Duration::from_secs(2);
/// Large scrapes through ferry (and as many direct).
const BIG_ROUNDS: usize = 3;
/// How long agents stay idle before the gateway's RSS is read, unless `FERRY_BENCH_IDLE_SECS`
/// says otherwise.
fn idle_settle() -> Duration {
    let secs = std::env::var("FERRY_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}
/// Agents started at once in phase B.
const CONNECT_BATCH: usize = 100;
/// File descriptors this process (and the gateway it spawns) needs for 1,000 agents: a tunnel,
/// a target connection and the target's side of it per agent, plus the load client.
const NOFILE_WANTED: u64 = 16_384;
/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;
const TOKEN: &str = "bench-token-6f1c2a";
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// The targets from the issue.
const TARGET_ADDED_P50_MS: f64 = 0.3;
const TARGET_THROUGHPUT_RATIO: f64 = 0.5;
const TARGET_IDLE_KIB_PER_AGENT: f64 = 32.0;
const TARGET_BIG_PEAK_MB: f64 = 20.0;

fn main() -> ExitCode {
    let settings = Settings::from_env();
    raise_nofile_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark aborted: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Knobs read from the environment, for quick runs.
#[derive(Debug, Clone, Copy)]
struct Settings {
    rounds: usize,
    agents: usize,
}

impl Settings {
    fn from_env() -> Settings {
        let get = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .unwrap_or(default)
        };
        Settings {
            rounds: get("FERRY_BENCH_ROUNDS", 5),
            agents: get("FERRY_BENCH_AGENTS", 1000),
        }
    }
}

/// Raises the soft RLIMIT_NOFILE towards [`NOFILE_WANTED`]; the gateway child inherits it.
fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= NOFILE_WANTED {
        return;
    }
    let wanted = limit
        .maximum
        .map_or(NOFILE_WANTED, |max| max.min(NOFILE_WANTED));
    let raised = Rlimit {
        current: Some(wanted),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => println!("raised the open-files limit from {current} to {wanted}"),
        Err(e) => println!("warning: open-files limit is {current} and could not be raised ({e}); 1,000 agents may not fit"),
    }
}

async fn run(settings: Settings) -> Result<(), String> {
    println!(
        "ferry pull-path benchmark: {} rounds, {} agents, body {} KiB, {} cores",
        settings.rounds,
        settings.agents,
        BODY_BYTES / 1024,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("load average before: {}", load_average());
    let target = start_target().await?;
    // Partial runs for quick iterations; they print what they measured and no verdicts.
    match std::env::var("FERRY_BENCH_ONLY")
        .unwrap_or_default()
        .as_str()
    {
        "" => {}
        "idle-memory" => {
            println!("\n== idle memory only: {} agents ==", settings.agents);
            let gw = GatewayProcess::start().await?;
            let shutdown = CancellationToken::new();
            let idle = idle_memory(&gw, target, settings.agents, &shutdown).await;
            shutdown.cancel();
            let idle = idle?;
            println!(
                "RSS per idle agent: {:.1} KiB ({:.1} KiB marginal)",
                idle.per_agent_kib(),
                idle.marginal_kib()
            );
            return Ok(());
        }
        "one-agent" => {
            let a = phase_one_agent(target, settings).await?;
            let one = Summary::of(&a.rounds);
            println!(
                "\nmedians of {} rounds: added p50 {}, throughput {:.2}x direct, CPU us/scrape direct {:.0} ferry {:.0} (gateway {:.0})",
                settings.rounds,
                ms(one.added_p50),
                one.ratio,
                one.direct_cpu_us,
                one.ferry_cpu_us,
                one.ferry_gateway_cpu_us
            );
            return Ok(());
        }
        other => {
            return Err(format!(
                "FERRY_BENCH_ONLY={other:?}: use idle-memory or one-agent"
            ))
        }
    }
    let a = phase_one_agent(target, settings).await?;
    let b = phase_many_agents(target, settings).await?;
    report(&a, &b, settings);
    println!(
        "\nload average after: {} (other processes on this machine skew every number)",
        load_average()
    );
    Ok(())
}

/// The 1, 5 and 15 minute load averages: how busy the machine was besides this benchmark.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Phases

/// What phase A measured.
struct PhaseA {
    big: BigScrapes,
    rounds: Vec<Round>,
}

/// What phase B measured.
struct PhaseB {
    idle: IdleMemory,
    rounds: Vec<Round>,
    rss_after_load_kib: u64,
}

async fn phase_one_agent(target: SocketAddr, settings: Settings) -> Result<PhaseA, String> {
    println!("\n== phase A: one agent ==");
    let gw = GatewayProcess::start().await?;
    let shutdown = CancellationToken::new();
    let result = one_agent(&gw, target, settings, &shutdown).await;
    shutdown.cancel();
    result
}

async fn one_agent(
    gw: &GatewayProcess,
    target: SocketAddr,
    settings: Settings,
    shutdown: &CancellationToken,
) -> Result<PhaseA, String> {
    let targets = [
        ("metrics", format!("http://{target}/metrics")),
        ("big", format!("http://{target}/big")),
    ];
    start_agent(gw, "agent-0", &targets, shutdown)?;
    gw.wait_agents(1, Duration::from_secs(30)).await?;
    let big = big_scrapes(gw, target).await?;
    let direct = Endpoint::direct(target);
    let ferry = Endpoint::ferry(gw.web, target.port(), 1);
    let rounds = rounds(&direct, &ferry, gw.pid(), settings.rounds).await?;
    Ok(PhaseA { big, rounds })
}

async fn phase_many_agents(target: SocketAddr, settings: Settings) -> Result<PhaseB, String> {
    println!("\n== phase B: {} agents ==", settings.agents);
    let gw = GatewayProcess::start().await?;
    let shutdown = CancellationToken::new();
    let result = many_agents(&gw, target, settings, &shutdown).await;
    shutdown.cancel();
    result
}

async fn many_agents(
    gw: &GatewayProcess,
    target: SocketAddr,
    settings: Settings,
    shutdown: &CancellationToken,
) -> Result<PhaseB, String> {
    let idle = idle_memory(gw, target, settings.agents, shutdown).await?;
    let direct = Endpoint::direct(target);
    let ferry = Endpoint::ferry(gw.web, target.port(), settings.agents);
    let started = Instant::now();
    warm_every_agent(&ferry, settings.agents).await?;
    println!(
        "first scrape of every agent: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let rounds = rounds(&direct, &ferry, gw.pid(), settings.rounds).await?;
    let rss_after_load_kib = gw.memory().rss_kib;
    Ok(PhaseB {
        idle,
        rounds,
        rss_after_load_kib,
    })
}

// ---------------------------------------------------------------------------------------------
// Latency and throughput rounds

/// One round: latency and throughput, direct and through ferry.
struct Round {
    direct_latency: Percentiles,
    ferry_latency: Percentiles,
    direct: Throughput,
    ferry: Throughput,
}

async fn rounds(
    direct: &Arc<Endpoint>,
    ferry: &Arc<Endpoint>,
    gateway_pid: u32,
    n: usize,
) -> Result<Vec<Round>, String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // Alternate who goes first so slow drift of the machine does not favour one side.
        let (first, second) = if i % 2 == 0 {
            (direct, ferry)
        } else {
            (ferry, direct)
        };
        let lat_first = latency(first).await?;
        let lat_second = latency(second).await?;
        let thr_first = throughput(first, gateway_pid).await?;
        let thr_second = throughput(second, gateway_pid).await?;
        let round = if i % 2 == 0 {
            Round {
                direct_latency: lat_first,
                ferry_latency: lat_second,
                direct: thr_first,
                ferry: thr_second,
            }
        } else {
            Round {
                direct_latency: lat_second,
                ferry_latency: lat_first,
                direct: thr_second,
                ferry: thr_first,
            }
        };
        println!(
            "round {}/{n}: p50 direct {} ferry {} (+{}) | req/s direct {:.0} ferry {:.0} ({:.2}x) | CPU us/scrape direct {:.0}, ferry {:.0} (gateway {:.0})",
            i + 1,
            ms(round.direct_latency.p50),
            ms(round.ferry_latency.p50),
            ms(round.ferry_latency.p50 - round.direct_latency.p50),
            round.direct.rps,
            round.ferry.rps,
            round.ferry.rps / round.direct.rps,
            round.direct.total_cpu_us(),
            round.ferry.total_cpu_us(),
            round.ferry.gateway_cpu_us
        );
        out.push(round);
    }
    Ok(out)
}

/// p50, p90 and p99 of one latency run, in seconds.
#[derive(Debug, Clone, Copy)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
}

impl Percentiles {
    fn of(mut samples: Vec<f64>) -> Percentiles {
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| {
            samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
        }
    }
}

/// Sequential scrapes on one keep-alive connection.
async fn latency(ep: &Endpoint) -> Result<Percentiles, String> {
    let mut conn = connect(ep.addr).await?;
    for _ in 0..LATENCY_WARMUP {
        scrape(&mut conn, ep.next()).await?;
    }
    let mut samples = Vec::with_capacity(LATENCY_REQUESTS);
    for _ in 0..LATENCY_REQUESTS {
        let s = ep.next();
        let start = Instant::now();
        scrape(&mut conn, s).await?;
        samples.push(start.elapsed().as_secs_f64());
    }
    Ok(Percentiles::of(samples))
}

/// Scrapes per second, and the CPU time each scrape cost in this process (client, agents, target)
/// and in the gateway.
#[derive(Debug, Clone, Copy)]
struct Throughput {
    rps: f64,
    bench_cpu_us: f64,
    gateway_cpu_us: f64,
}

impl Throughput {
    fn total_cpu_us(&self) -> f64 {
        self.bench_cpu_us + self.gateway_cpu_us
    }
}

/// CPU time (user + system, all threads) `pid` has used so far, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses: state is field 3, utime 14, stime 15.
    let rest = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / USER_HZ
}

/// Scrapes per second over [`CONCURRENCY`] keep-alive connections for [`THROUGHPUT_TIME`].
async fn throughput(ep: &Arc<Endpoint>, gateway_pid: u32) -> Result<Throughput, String> {
    let mut conns = Vec::with_capacity(CONCURRENCY);
    for _ in 0..CONCURRENCY {
        let mut conn = connect(ep.addr).await?;
        for _ in 0..5 {
            scrape(&mut conn, ep.next()).await?;
        }
        conns.push(conn);
    }
    let (bench_cpu, gateway_cpu) = (cpu_secs(std::process::id()), cpu_secs(gateway_pid));
    let start = Instant::now();
    let deadline = start + THROUGHPUT_TIME;
    let mut workers = JoinSet::new();
    for mut conn in conns {
        let ep = ep.clone();
        workers.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                scrape(&mut conn, ep.next()).await?;
                done += 1;
            }
            Ok::<u64, String>(done)
        });
    }
    let mut total = 0;
    while let Some(res) = workers.join_next().await {
        total += res.map_err(|e| format!("throughput worker: {e}"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    let per_scrape = |cpu: f64| cpu * 1e6 / total.max(1) as f64;
    Ok(Throughput {
        rps: total as f64 / secs,
        bench_cpu_us: per_scrape(cpu_secs(std::process::id()) - bench_cpu),
        gateway_cpu_us: per_scrape(cpu_secs(gateway_pid) - gateway_cpu),
    })
}

/// One scrape of every agent (opens each agent's connection to the target), [`CONCURRENCY`] at a time.
async fn warm_every_agent(ep: &Arc<Endpoint>, agents: usize) -> Result<(), String> {
    let remaining = Arc::new(AtomicUsize::new(agents));
    let mut workers = JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (ep, remaining) = (ep.clone(), remaining.clone());
        workers.spawn(async move {
            let mut conn = connect(ep.addr).await?;
            while remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                scrape(&mut conn, ep.next()).await?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(res) = workers.join_next().await {
        res.map_err(|e| format!("warm-up worker: {e}"))??;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The large scrape

/// Large scrapes: durations direct and through ferry, the gateway's RSS around them.
struct BigScrapes {
    direct_secs: Vec<f64>,
    ferry_secs: Vec<f64>,
    /// RSS sampled every 5 ms during each scrape through ferry: the highest sample, KiB.
    peak_rss_kib: Vec<u64>,
    /// RSS just before each scrape, KiB.
    base_rss_kib: Vec<u64>,
    /// VmHWM (the kernel's own peak) after all of them, KiB.
    hwm_after_kib: u64,
}

async fn big_scrapes(gw: &GatewayProcess, target: SocketAddr) -> Result<BigScrapes, String> {
    let direct = Endpoint::single(target, Scrape::new("/big", &target.to_string(), BIG_BYTES)?);
    let authority = format!("agent-0:{}", target.port());
    let via = Scrape::new(&format!("http://{authority}/big"), &authority, BIG_BYTES)?;
    let ferry = Endpoint::single(gw.web, via);
    let mut out = BigScrapes {
        direct_secs: vec![],
        ferry_secs: vec![],
        peak_rss_kib: vec![],
        base_rss_kib: vec![],
        hwm_after_kib: 0,
    };
    for i in 0..BIG_ROUNDS {
        out.direct_secs.push(timed_scrape(&direct).await?);
        out.base_rss_kib.push(gw.memory().rss_kib);
        let poller = RssPoller::start(gw.pid());
        let secs = timed_scrape(&ferry).await;
        let peak = poller.stop();
        out.ferry_secs.push(secs?);
        out.peak_rss_kib.push(peak);
        println!(
            "50 MiB scrape {}/{BIG_ROUNDS}: direct {:.2} s, ferry {:.2} s; gateway RSS {:.1} MiB before, peak {:.1} MiB",
            i + 1,
            out.direct_secs[i],
            out.ferry_secs[i],
            mib(out.base_rss_kib[i]),
            mib(peak)
        );
    }
    out.hwm_after_kib = gw.memory().hwm_kib;
    Ok(out)
}

async fn timed_scrape(ep: &Endpoint) -> Result<f64, String> {
    let mut conn = connect(ep.addr).await?;
    let start = Instant::now();
    scrape(&mut conn, ep.next()).await?;
    Ok(start.elapsed().as_secs_f64())
}

/// Samples a process's VmRSS every 5 ms on its own thread, keeping the highest value.
struct RssPoller {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssPoller {
    fn start(pid: u32) -> RssPoller {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            loop {
                peak = peak.max(proc_status_kib(pid, "VmRSS").unwrap_or(0));
                if flag.load(Ordering::SeqCst) {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssPoller { stop, thread }
    }

    /// Stops sampling; the highest VmRSS seen, KiB.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Idle agents

/// The gateway's RSS before agents, with half of them and with all of them connected and idle.
struct IdleMemory {
    agents: usize,
    before_kib: u64,
    half_kib: u64,
    all_kib: u64,
    connect_secs: f64,
}

impl IdleMemory {
    fn per_agent_kib(&self) -> f64 {
        (self.all_kib as f64 - self.before_kib as f64) / self.agents as f64
    }

    /// Cost of the second half alone: fixed start-up costs (code pages, first allocations) excluded.
    fn marginal_kib(&self) -> f64 {
        let second_half = self.agents - self.agents / 2;
        (self.all_kib as f64 - self.half_kib as f64) / second_half.max(1) as f64
    }
}

async fn idle_memory(
    gw: &GatewayProcess,
    target: SocketAddr,
    agents: usize,
    shutdown: &CancellationToken,
) -> Result<IdleMemory, String> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kib = settled_rss(gw).await;
    let started = Instant::now();
    let url = format!("http://{target}/metrics");
    let half = agents / 2;
    connect_agents(gw, 0..half, &url, shutdown).await?;
    tokio::time::sleep(idle_settle()).await;
    let half_kib = settled_rss(gw).await;
    connect_agents(gw, half..agents, &url, shutdown).await?;
    let connect_secs = started.elapsed().as_secs_f64() - idle_settle().as_secs_f64();
    tokio::time::sleep(idle_settle()).await;
    let all_kib = settled_rss(gw).await;
    let idle = IdleMemory {
        agents,
        before_kib,
        half_kib,
        all_kib,
        connect_secs,
    };
    println!(
        "gateway RSS: {:.1} MiB with no agent, {:.1} MiB with {half} idle, {:.1} MiB with {agents} idle ({:.1} KiB per agent; {agents} connected in {:.1} s)",
        mib(before_kib),
        mib(half_kib),
        mib(all_kib),
        idle.per_agent_kib(),
        connect_secs
    );
    Ok(idle)
}

/// Median of three VmRSS readings half a second apart.
async fn settled_rss(gw: &GatewayProcess) -> u64 {
    let mut samples = Vec::with_capacity(3);
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        samples.push(gw.memory().rss_kib);
    }
    samples.sort_unstable();
    samples[1]
}

/// Starts agents `agent-<i>` for `ids`, [`CONNECT_BATCH`] at a time, each waited for.
async fn connect_agents(
    gw: &GatewayProcess,
    ids: std::ops::Range<usize>,
    url: &str,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let mut next = ids.start;
    while next < ids.end {
        let end = (next + CONNECT_BATCH).min(ids.end);
        for i in next..end {
            start_agent(
                gw,
                &format!("agent-{i}"),
                &[("metrics", url.to_owned())],
                shutdown,
            )?;
        }
        gw.wait_agents(end, Duration::from_secs(60)).await?;
        next = end;
    }
    Ok(())
}

/// Starts one in-process agent pinned to `gw`'s certificate, serving `targets` (name, url).
fn start_agent(
    gw: &GatewayProcess,
    id: &str,
    targets: &[(&str, String)],
    shutdown: &CancellationToken,
) -> Result<Agent, String> {
    let mut section = AgentSection {
        gateway: Some(format!("https://127.0.0.1:{}", gw.tunnel.port())),
        agent_id: Some(id.to_owned()),
        targets: targets
            .iter()
            .map(|(name, url)| TargetSection {
                name: (*name).to_owned(),
                url: url.clone(),
                ..TargetSection::default()
            })
            .collect(),
        ..AgentSection::default()
    };
    section.tunnel.fingerprint = vec![gw.fingerprint.clone()];
    section.reconnect.min_backoff = Dur(Duration::from_millis(200));
    section.reconnect.max_backoff = Dur(Duration::from_secs(2));
    section.shutdown_grace_period = Dur(Duration::from_secs(1));
    let env = |name: &str| (name == ferry::config::TOKEN_ENV).then(|| TOKEN.to_owned());
    let mut errs = ConfigErrors::new("bench");
    let config = section
        .validate("agent", &env, &mut errs)
        .filter(|_| errs.errors.is_empty())
        .ok_or_else(|| errs.to_string())?;
    let agent = Agent::new(config).map_err(|e| format!("agent {id}: {e}"))?;
    tokio::spawn(agent.clone().run(shutdown.clone()));
    Ok(agent)
}

// ---------------------------------------------------------------------------------------------
// The gateway process

/// VmRSS and VmHWM of a process, KiB.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// `ferry gateway` running as a child process on free loopback ports; killed when dropped.
struct GatewayProcess {
    child: Child,
    web: SocketAddr,
    tunnel: SocketAddr,
    fingerprint: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    async fn start() -> Result<GatewayProcess, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let tokens = dir.path().join("tokens");
        let line = format!("* {}\n", ferry::gateway::auth::hash_token(TOKEN));
        std::fs::write(&tokens, line).map_err(|e| format!("tokens file: {e}"))?;
        let data = dir.path().join("data");
        let log = dir.path().join("gateway.log");
        let log_file = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
        let (web, tunnel) = (free_port()?, free_port()?);
        let child = gateway_command()
            .arg("gateway")
            .arg("--web.listen-address")
            .arg(web.to_string())
            .arg("--tunnel.listen-address")
            .arg(tunnel.to_string())
            .arg("--data-dir")
            .arg(&data)
            .arg("--auth.tokens-file")
            .arg(&tokens)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", env!("CARGO_BIN_EXE_ferry")))?;
        let mut gw = GatewayProcess {
            child,
            web,
            tunnel,
            fingerprint: String::new(),
            log,
            _dir: dir,
        };
        gw.wait_healthy().await?;
        let certs =
            ferry::tunnel::tls::read_certs(&data.join(ferry::tunnel::tls_server::SELF_SIGNED_CERT))
                .map_err(|e| e.to_string())?;
        gw.fingerprint = ferry::tunnel::tls::fingerprint(&certs[0]);
        println!("gateway pid {} web {web} tunnel {tunnel}", gw.pid());
        Ok(gw)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn memory(&self) -> Memory {
        Memory {
            rss_kib: proc_status_kib(self.pid(), "VmRSS").unwrap_or(0),
            hwm_kib: proc_status_kib(self.pid(), "VmHWM").unwrap_or(0),
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn wait_healthy(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("gateway exited ({status}):\n{}", self.log_tail()));
            }
            if let Ok((StatusCode::OK, _)) = get_text(self.web, "/-/healthy").await {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "gateway not healthy after 30 s:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the gateway's own `/metrics` says at least `n` agents are connected.
    async fn wait_agents(&self, n: usize, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let connected = self.agents_connected().await.unwrap_or(0);
            if connected >= n {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "only {connected} of {n} agents connected after {timeout:?}:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn agents_connected(&self) -> Option<usize> {
        let (_, text) = get_text(self.web, "/metrics").await.ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("ferry_gateway_agents_connected "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as usize)
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ferry`, or `$FERRY_BENCH_GATEWAY_WRAPPER ferry` (e.g. `heaptrack -o /tmp/gw` to see where
/// the gateway's memory goes).
fn gateway_command() -> Command {
    wrapper::ferry_command("FERRY_BENCH_GATEWAY_WRAPPER", env!("CARGO_BIN_EXE_ferry"))
}

/// A loopback port that was free a moment ago (the gateway's CLI needs concrete ports).
fn free_port() -> Result<SocketAddr, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    listener.local_addr().map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// The target server

/// Starts the target: `/metrics` answers a 60 KiB exposition, `/big` streams 50 MiB.
async fn start_target() -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind target: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let body = Bytes::from(metrics_text(BODY_BYTES));
    // The project's own accept loop and HTTP/1.1 server, never shut down: the bench exits.
    // Every simulated agent keeps a connection to it: no cap short of the descriptor limit.
    tokio::spawn(ferry::server::serve_http_capped(
        listener,
        move |_peer, req| {
            let resp = target_response(&req, body.clone());
            async move { resp }
        },
        tokio_util::sync::CancellationToken::new(),
        Duration::from_secs(1),
        1 << 20,
    ));
    Ok(addr)
}

fn target_response(req: &Request<Incoming>, metrics: Bytes) -> Response<Body> {
    let body = match req.uri().path() {
        "/metrics" => full(metrics),
        "/big" => boxed(Repeat {
            chunk: Bytes::from(metrics_text(BIG_CHUNK)),
            remaining: BIG_BYTES,
        }),
        _ => return text_response(StatusCode::NOT_FOUND, "not found"),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// A Prometheus text exposition of exactly `bytes` bytes.
fn metrics_text(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 128);
    out.push_str("# HELP bench_http_requests_total Requests served.\n# TYPE bench_http_requests_total counter\n");
    let mut i = 0u64;
    while out.len() < bytes {
        let _ = writeln!(
            out,
            "bench_http_requests_total{{handler=\"/api/v1/items/{}\",code=\"200\",method=\"GET\"}} {}",
            i % 97,
            i * 7919
        );
        i += 1;
    }
    out.truncate(bytes - 1);
    out.push('\n');
    out
}

/// A body that streams `chunk` until `remaining` bytes have been sent, never holding more.
struct Repeat {
    chunk: Bytes,
    remaining: u64,
}

impl http_body::Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = (self.chunk.len() as u64).min(self.remaining);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

// ---------------------------------------------------------------------------------------------
// The load client

/// One scrape as Prometheus would send it: request target, `Host` and the body size expected.
struct Scrape {
    uri: Uri,
    host: HeaderValue,
    want_bytes: u64,
}

impl Scrape {
    fn new(uri: &str, host: &str, want_bytes: u64) -> Result<Scrape, String> {
        Ok(Scrape {
            uri: uri.parse().map_err(|e| format!("{uri}: {e}"))?,
            host: HeaderValue::from_str(host).map_err(|e| format!("{host}: {e}"))?,
            want_bytes,
        })
    }
}

/// Where the client connects and the scrapes it sends there, round-robin.
struct Endpoint {
    addr: SocketAddr,
    scrapes: Vec<Scrape>,
    next: AtomicUsize,
}

impl Endpoint {
    fn single(addr: SocketAddr, scrape: Scrape) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            addr,
            scrapes: vec![scrape],
            next: AtomicUsize::new(0),
        })
    }

    /// The target itself, origin-form.
    fn direct(target: SocketAddr) -> Arc<Endpoint> {
        let scrape =
            Scrape::new("/metrics", &target.to_string(), BODY_BYTES as u64).expect("valid URI");
        Endpoint::single(target, scrape)
    }

    /// The gateway, absolute-form, spread over `agent-0` .. `agent-<agents-1>`.
    fn ferry(gateway: SocketAddr, port: u16, agents: usize) -> Arc<Endpoint> {
        let scrapes = (0..agents)
            .map(|i| {
                let authority = format!("agent-{i}:{port}");
                Scrape::new(
                    &format!("http://{authority}/metrics"),
                    &authority,
                    BODY_BYTES as u64,
                )
                .expect("valid URI")
            })
            .collect();
        Arc::new(Endpoint {
            addr: gateway,
            scrapes,
            next: AtomicUsize::new(0),
        })
    }

    fn next(&self) -> &Scrape {
        &self.scrapes[self.next.fetch_add(1, Ordering::Relaxed) % self.scrapes.len()]
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A keep-alive HTTP/1.1 connection.
async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one scrape and reads its whole body; fails on any status but 200 or a short body.
async fn scrape(conn: &mut Sender, s: &Scrape) -> Result<(), String> {
    conn.ready().await.map_err(|e| format!("connection: {e}"))?;
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = s.uri.clone();
    let headers = req.headers_mut();
    headers.insert(header::HOST, s.host.clone());
    headers.insert(header::ACCEPT, HeaderValue::from_static(PROMETHEUS_ACCEPT));
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static("Prometheus/2.42.0"),
    );
    headers.insert(
        "x-prometheus-scrape-timeout-seconds",
        HeaderValue::from_static("30"),
    );
    let resp = conn
        .send_request(req)
        .await
        .map_err(|e| format!("{}: {e}", s.uri))?;
    let status = resp.status();
    if status != StatusCode::OK {
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(format!(
            "{}: {status} {}",
            s.uri,
            String::from_utf8_lossy(&body).trim()
        ));
    }
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("{}: body after {got} bytes: {e}", s.uri))?;
        if let Some(data) = frame.data_ref() {
            got += data.len() as u64;
        }
    }
    if got != s.want_bytes {
        return Err(format!(
            "{}: body of {got} bytes, expected {}",
            s.uri, s.want_bytes
        ));
    }
    Ok(())
}

/// GET of one of the gateway's own endpoints on a fresh connection.
async fn get_text(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), String> {
    let mut conn = connect(addr).await?;
    conn.ready().await.map_err(|e| e.to_string())?;
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = path.parse().map_err(|e| format!("{path}: {e}"))?;
    let host = HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?;
    req.headers_mut().insert(header::HOST, host);
    let resp = conn.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
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

fn ms(secs: f64) -> String {
    format!("{:.3} ms", secs * 1e3)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "FAIL"
    }
}

/// Medians over rounds of one phase.
struct Summary {
    direct: Percentiles,
    ferry: Percentiles,
    added_p50: f64,
    direct_rps: f64,
    ferry_rps: f64,
    ratio: f64,
    direct_cpu_us: f64,
    ferry_cpu_us: f64,
    ferry_gateway_cpu_us: f64,
}

impl Summary {
    fn of(rounds: &[Round]) -> Summary {
        let pick = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        Summary {
            direct: Percentiles {
                p50: pick(&|r| r.direct_latency.p50),
                p90: pick(&|r| r.direct_latency.p90),
                p99: pick(&|r| r.direct_latency.p99),
            },
            ferry: Percentiles {
                p50: pick(&|r| r.ferry_latency.p50),
                p90: pick(&|r| r.ferry_latency.p90),
                p99: pick(&|r| r.ferry_latency.p99),
            },
            added_p50: pick(&|r| r.ferry_latency.p50 - r.direct_latency.p50),
            direct_rps: pick(&|r| r.direct.rps),
            ferry_rps: pick(&|r| r.ferry.rps),
            ratio: pick(&|r| r.ferry.rps / r.direct.rps),
            direct_cpu_us: pick(&|r| r.direct.total_cpu_us()),
            ferry_cpu_us: pick(&|r| r.ferry.total_cpu_us()),
            ferry_gateway_cpu_us: pick(&|r| r.ferry.gateway_cpu_us),
        }
    }
}

fn report(a: &PhaseA, b: &PhaseB, settings: Settings) {
    let one = Summary::of(&a.rounds);
    let many = Summary::of(&b.rounds);
    let n = settings.agents;
    let mb = |bytes_per_sec: f64| bytes_per_sec * BODY_BYTES as f64 / 1e6;
    println!(
        "\n== results: medians of {} rounds (loopback, body {} KiB) ==",
        settings.rounds,
        BODY_BYTES / 1024
    );
    println!("\nlatency, 1 connection, {LATENCY_REQUESTS} sequential scrapes per round");
    println!("  {:<26} {:>10} {:>10} {:>10}", "", "p50", "p90", "p99");
    let lat_row = |name: &str, p: &Percentiles| {
        println!(
            "  {name:<26} {:>10} {:>10} {:>10}",
            ms(p.p50),
            ms(p.p90),
            ms(p.p99)
        )
    };
    lat_row("direct (phase A)", &one.direct);
    lat_row("ferry, 1 agent", &one.ferry);
    lat_row("direct (phase B)", &many.direct);
    lat_row(&format!("ferry, {n} agents"), &many.ferry);
    println!(
        "\nthroughput, {CONCURRENCY} keep-alive connections, {} s per round",
        THROUGHPUT_TIME.as_secs()
    );
    println!(
        "  {:<26} {:>10} {:>10} {:>10} {:>16} {:>12}",
        "", "req/s", "MB/s", "vs direct", "CPU us/scrape", "in gateway"
    );
    let thr_row = |name: &str, rps: f64, ratio: f64, cpu: f64, gw: Option<f64>| {
        let gw = gw.map_or_else(|| "-".to_owned(), |us| format!("{us:.0}"));
        println!(
            "  {name:<26} {rps:>10.0} {:>10.0} {ratio:>9.2}x {cpu:>16.0} {gw:>12}",
            mb(rps)
        );
    };
    thr_row(
        "direct (phase A)",
        one.direct_rps,
        1.0,
        one.direct_cpu_us,
        None,
    );
    thr_row(
        "ferry, 1 agent",
        one.ferry_rps,
        one.ratio,
        one.ferry_cpu_us,
        Some(one.ferry_gateway_cpu_us),
    );
    thr_row(
        "direct (phase B)",
        many.direct_rps,
        1.0,
        many.direct_cpu_us,
        None,
    );
    thr_row(
        &format!("ferry, {n} agents"),
        many.ferry_rps,
        many.ratio,
        many.ferry_cpu_us,
        Some(many.ferry_gateway_cpu_us),
    );

    let big = &a.big;
    let peak_kib = median(big.peak_rss_kib.iter().map(|&k| k as f64).collect());
    let peak_mb = peak_kib * 1024.0 / 1e6;
    println!("\ngateway memory");
    println!(
        "  idle agents: {:.1} MiB with none, {:.1} MiB with {n}: {:.1} KiB per agent ({:.1} KiB marginal, second half only; all connected in {:.1} s)",
        mib(b.idle.before_kib),
        mib(b.idle.all_kib),
        b.idle.per_agent_kib(),
        b.idle.marginal_kib(),
        b.idle.connect_secs
    );
    println!(
        "  after the {n}-agent load: {:.1} MiB",
        mib(b.rss_after_load_kib)
    );
    println!(
        "  50 MiB scrape: peak RSS {:.1} MiB = {peak_mb:.1} MB (median of {BIG_ROUNDS}; {:.1} MiB before; VmHWM {:.1} MiB); took {:.2} s through ferry, {:.2} s direct",
        peak_kib / 1024.0,
        mib(median(big.base_rss_kib.iter().map(|&k| k as f64).collect()) as u64),
        mib(big.hwm_after_kib),
        median(big.ferry_secs.clone()),
        median(big.direct_secs.clone())
    );

    println!("\ntargets (2-core machine)");
    let line = |pass: bool, what: String, value: String, goal: &str| {
        println!(
            "  [{}] {what:<40} {value:>12}   target {goal}",
            verdict(pass)
        )
    };
    line(
        one.added_p50 <= TARGET_ADDED_P50_MS / 1e3,
        "added p50 latency, 1 agent".into(),
        ms(one.added_p50),
        "<= 0.3 ms",
    );
    line(
        many.added_p50 <= TARGET_ADDED_P50_MS / 1e3,
        format!("added p50 latency, {n} agents"),
        ms(many.added_p50),
        "<= 0.3 ms",
    );
    line(
        one.ratio >= TARGET_THROUGHPUT_RATIO,
        "throughput vs direct, 1 agent".into(),
        format!("{:.2}x", one.ratio),
        ">= 0.5x",
    );
    line(
        many.ratio >= TARGET_THROUGHPUT_RATIO,
        format!("throughput vs direct, {n} agents"),
        format!("{:.2}x", many.ratio),
        ">= 0.5x",
    );
    let per_agent = b.idle.per_agent_kib();
    line(
        per_agent <= TARGET_IDLE_KIB_PER_AGENT,
        "gateway RSS per idle agent".into(),
        // Two decimals: at one, 32.04 reads "32.0 KiB" beside a FAIL.
        format!("{per_agent:.2} KiB"),
        "<= 32 KiB",
    );
    line(
        peak_mb < TARGET_BIG_PEAK_MB,
        "gateway peak RSS, 50 MiB scrape".into(),
        format!("{peak_mb:.1} MB"),
        "< 20 MB",
    );
}
