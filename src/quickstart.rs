//! `ferry quickstart`: a gateway, an agent and a demo target in one process on loopback, wired
//! exactly as in production (TLS with a pinned self-signed certificate, a hashed token), plus the
//! commands to try it.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::auth::new_token;
use crate::config::{AgentSection, ConfigErrors, GatewaySection, LogSection, TargetSection};
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
    let Some(data_dir) = args.data_dir.clone() else {
        // A directory of our own: it holds a throw-away certificate and token, gone on exit.
        let dir = std::env::temp_dir().join(format!("ferry-quickstart-{}", std::process::id()));
        let result = run_in(&args, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        return result;
    };
    run_in(&args, &data_dir).await
}

async fn run_in(args: &QuickstartArgs, data_dir: &std::path::Path) -> Result<(), String> {
    let data_dir = data_dir.to_owned();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let shutdown = CancellationToken::new();

    let demo = bind("127.0.0.1:0").await?;
    let demo_addr = local(&demo)?;
    tokio::spawn(serve_demo(demo, shutdown.clone()));

    let (token, hash) = new_token();
    let tokens_file = data_dir.join("tokens");
    std::fs::write(
        &tokens_file,
        format!("# written by ferry quickstart\n{AGENT_ID} {hash}\n"),
    )
    .map_err(|e| format!("cannot write {}: {e}", tokens_file.display()))?;

    let web = bind(&args.web_listen_address).await?;
    let tunnel = bind(&args.tunnel_listen_address).await?;
    let (web_addr, tunnel_addr) = (local(&web)?, local(&tunnel)?);
    let mut gw = GatewaySection {
        data_dir: Some(data_dir.clone()),
        ..GatewaySection::default()
    };
    gw.web.listen_address = web_addr.to_string();
    gw.tunnel.listen_address = tunnel_addr.to_string();
    gw.tunnel.tls_self_signed_names = vec!["localhost".into()];
    gw.auth.tokens_file = Some(tokens_file);
    let mut errs = ConfigErrors::new("quickstart");
    let gw_cfg = gw.validate("gateway", &mut errs);
    let gateway = Gateway::new(errs_or(errs, gw_cfg)?).map_err(|e| e.to_string())?;
    let fingerprint = gateway.fingerprint().unwrap_or_default();
    let g = gateway.clone();
    let token_g = shutdown.clone();
    tokio::spawn(async move { g.run(web, tunnel, token_g).await });

    let mut agent = AgentSection {
        gateway: Some(format!("https://localhost:{}", tunnel_addr.port())),
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
    let mut errs = ConfigErrors::new("quickstart");
    let token_env = |name: &str| (name == crate::config::TOKEN_ENV).then(|| token.clone());
    let agent_cfg = agent.validate("agent", &token_env, &mut errs);
    let agent = Agent::new(errs_or(errs, agent_cfg)?).map_err(|e| e.to_string())?;
    tokio::spawn(agent.clone().run(shutdown.clone()));

    // Watched before anything is printed: a script that stops us as soon as it reads the
    // instructions must not meet the default action, which would leave the key behind.
    let stop = stop_signal()?;
    wait_connected(&gateway).await?;
    print_instructions(web_addr, tunnel_addr, demo_addr, &fingerprint, &data_dir);
    stop.await;
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

async fn bind(addr: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e} (pick another with --web.listen-address / --tunnel.listen-address)"))
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
    println!(
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
