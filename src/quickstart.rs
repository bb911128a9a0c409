//! `ferry quickstart`: a gateway, an agent and a demo target in one process on loopback, wired
//! exactly as in production (TLS with a pinned self-signed certificate, a hashed token), plus the
//! commands to try it.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::auth::new_token;
use crate::config::{
    parse_listen_address, AgentSection, ConfigErrors, GatewaySection, LogSection, TargetSection,
};
use crate::gateway::Gateway;
use crate::http_util::text_response;

/// Agent id of the quickstart's agent.
pub const AGENT_ID: &str = "quickstart";

/// Flags of `ferry quickstart`.
#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Gateway web address (Prometheus's proxy_url).
    #[arg(
        long = "web.listen-address",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    web_listen_address: String,
    /// Gateway tunnel address.
    #[arg(
        long = "tunnel.listen-address",
        value_name = "ADDR",
        default_value = "127.0.0.1:7443"
    )]
    tunnel_listen_address: String,
    /// Where the self-signed certificate and tokens file go [default: a new temporary directory, removed on exit].
    #[arg(long = "data-dir", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    log: crate::cli::LogArgs,
}

/// Runs the quickstart until Ctrl-C.
pub fn main(args: QuickstartArgs) -> ExitCode {
    crate::cli::init_logging(&args.log.apply(LogSection {
        level: "warn".into(),
        ..LogSection::default()
    }));
    crate::cli::fd_limit::raise(crate::cli::fd_limit::quickstart_needed());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            ExitCode::from(crate::cli::EXIT_CONFIG)
        }
    }
}

async fn run(args: QuickstartArgs) -> Result<(), String> {
    // Watched before anything is written: a script that stops us as soon as it reads the
    // instructions, or before, must not meet the default action, which would leave the key behind.
    let stop = stop_signal()?;
    if let Some(data_dir) = &args.data_dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
        return run_in(&args, data_dir, stop).await;
    }
    // A directory of our own: it holds a throw-away certificate and token, gone on exit.
    let dir = private_temp_dir()?;
    let result = run_in(&args, &dir, stop).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A new directory in TMPDIR that only this user may enter. Its name is random and it must not
/// exist yet: another local user could have created a predictable one first, to read the key
/// and token or to plant links that make us overwrite their targets.
fn private_temp_dir() -> Result<PathBuf, String> {
    let base = std::env::temp_dir();
    let mut tries = 0;
    loop {
        let dir = base.join(format!("ferry-quickstart-{:016x}", rand::random::<u64>()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
            Err(e) => {
                return Err(format!(
                    "cannot create a temporary directory in {}: {e}",
                    base.display()
                ))
            }
        }
    }
}

/// Writes `text` to a file of our own at `path`, readable by this user only. What is there is
/// removed first (a link, not its target), and the file is created anew, never opened through
/// whatever someone put in its place meanwhile.
fn write_new(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(err)
}

async fn run_in(
    args: &QuickstartArgs,
    data_dir: &Path,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let data_dir = data_dir.to_owned();
    let shutdown = CancellationToken::new();

    let demo = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen for the demo target: {e}"))?;
    let demo_addr = local(&demo)?;
    tokio::spawn(serve_demo(demo, shutdown.clone()));

    let (token, hash) = new_token();
    let tokens_file = data_dir.join("tokens");
    write_new(
        &tokens_file,
        &format!("# written by ferry quickstart\n{AGENT_ID} {hash}\n"),
    )?;

    let web = bind("--web.listen-address", &args.web_listen_address).await?;
    let tunnel = bind("--tunnel.listen-address", &args.tunnel_listen_address).await?;
    let (web_addr, tunnel_addr) = (local(&web)?, local(&tunnel)?);
    // The agent dials the address the tunnel listens on, not a name that may resolve elsewhere.
    let tunnel_dial = dialable(tunnel_addr);
    let mut gw = GatewaySection {
        data_dir: Some(data_dir.clone()),
        ..GatewaySection::default()
    };
    gw.web.listen_address = web_addr.to_string();
    gw.tunnel.listen_address = tunnel_addr.to_string();
    gw.tunnel.tls_self_signed_names = vec!["localhost".into(), tunnel_dial.ip().to_string()];
    // Made here so that the gateway does not greet a first-time user with its warning about a
    // new certificate (which, for a gateway, may mean a lost data directory).
    crate::tunnel::tls_server::ensure_self_signed(&data_dir, &gw.tunnel.tls_self_signed_names)
        .map_err(|e| {
            format!(
                "cannot create the tunnel certificate in {}: {e}",
                data_dir.display()
            )
        })?;
    gw.auth.tokens_file = Some(tokens_file);
    // Its settings come from its flags: errors name them (`invalid flag --data-dir: …`).
    let mut errs = ConfigErrors::new("flags");
    let gw_cfg = gw.validate("gateway", &mut errs);
    let gateway = Gateway::new(errs_or(errs, gw_cfg)?).map_err(|e| e.to_string())?;
    let fingerprint = gateway.fingerprint().unwrap_or_default();
    let g = gateway.clone();
    let token_g = shutdown.clone();
    tokio::spawn(async move { g.run(web, tunnel, token_g).await });

    let mut agent = AgentSection {
        gateway: Some(format!("https://{tunnel_dial}")),
        agent_id: Some(AGENT_ID.into()),
        targets: vec![TargetSection {
            name: "demo".into(),
            url: format!("http://{demo_addr}/metrics"),
            ..TargetSection::default()
        }],
        labels: [("env".to_owned(), "quickstart".to_owned())].into(),
        ..AgentSection::default()
    };
    agent.tunnel.fingerprint = vec![fingerprint.clone()];
    let mut errs = ConfigErrors::new("flags");
    let token_env = |name: &str| (name == crate::config::TOKEN_ENV).then(|| token.clone());
    let agent_cfg = agent.validate("agent", &token_env, &mut errs);
    let agent = Agent::new(errs_or(errs, agent_cfg)?).map_err(|e| e.to_string())?;
    tokio::spawn(agent.clone().run(shutdown.clone()));

    tokio::pin!(stop);
    // An agent that cannot connect keeps us here for a while: a stop ends the wait too.
    let stopped = tokio::select! {
        connected = wait_connected(&gateway) => { connected?; false }
        () = &mut stop => true,
    };
    if !stopped {
        let web = dialable(web_addr);
        print_instructions(web, tunnel_addr, demo_addr, &fingerprint, &data_dir);
        stop.await;
    }
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Ctrl-C or SIGTERM: either way the caller removes the temporary directory (key and token).
/// Both are watched from the call on, not from the first poll of the future.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot watch SIGINT: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

fn errs_or<T>(errs: ConfigErrors, value: Option<T>) -> Result<T, String> {
    match (errs.errors.is_empty(), value) {
        (true, Some(v)) => Ok(v),
        _ => Err(errs.to_string()),
    }
}

/// Listens on `addr` as the other commands read it (`host:port`, `[v6]:port`, `:port`).
async fn bind(flag: &str, addr: &str) -> Result<TcpListener, String> {
    let parsed = parse_listen_address(addr).map_err(|e| format!("{flag}: {e}"))?;
    crate::cli::listen(parsed).await.map_err(|(tried, e)| {
        format!("{flag}: cannot listen on {tried}: {e} (pick another address)")
    })
}

/// Where a client on this host reaches a listener bound to `bound`: on every interface, the
/// loopback address of the same family.
fn dialable(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, bound.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, bound.port()).into(),
        _ => bound,
    }
}

fn local(l: &TcpListener) -> Result<SocketAddr, String> {
    l.local_addr().map_err(|e| e.to_string())
}

async fn wait_connected(gateway: &Gateway) -> Result<(), String> {
    for _ in 0..100 {
        if !gateway.agents().is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("the agent did not connect within 10s; run with --log.level debug to see why".into())
}

fn print_instructions(
    web: SocketAddr,
    tunnel: SocketAddr,
    demo: SocketAddr,
    fingerprint: &str,
    data_dir: &std::path::Path,
) {
    let port = demo.port();
    // Written, not println!: a reader gone early (`| head`) must not panic the demo, which
    // keeps running for a curl or a Prometheus pointed at it.
    let _ = writeln!(
        std::io::stdout(),
        "ferry quickstart is running (Ctrl-C to stop)
  gateway web     http://{web}   (Prometheus proxy_url, /targets, /metrics)
  gateway tunnel  {tunnel}   certificate {fingerprint}
  agent           id \"{AGENT_ID}\", targets: demo (http://{demo}/metrics), ferry (its own metrics)
  data dir        {data}

Scrape the demo target through the tunnel:
  curl -x http://{web} http://{AGENT_ID}:{port}/metrics

Service discovery:
  curl http://{web}/targets

Prometheus scrape config to paste:
scrape_configs:
  - job_name: ferry
    proxy_url: http://{web}
    http_sd_configs:
      - url: http://{web}/targets
",
        data = data_dir.display()
    );
}

/// The demo target: a tiny exporter whose counter grows with every scrape.
async fn serve_demo(listener: TcpListener, shutdown: CancellationToken) {
    let scrapes = Arc::new(AtomicU64::new(0));
    crate::server::serve_http(
        listener,
        move |_peer, _req| {
            let n = scrapes.fetch_add(1, Ordering::Relaxed) + 1;
            async move {
                let body = format!(
                    "# HELP demo_scrapes_total Scrapes of the ferry quickstart demo target.\n# TYPE demo_scrapes_total counter\ndemo_scrapes_total {n}\n"
                );
                let mut resp = text_response(http::StatusCode::OK, body.trim_end());
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
        },
        shutdown,
        Duration::from_secs(1),
    )
    .await;
}
