//! Running the configured roles in one process: bind listeners, wire signals (SIGINT/SIGTERM →
//! one shutdown token; SIGHUP → reload), wait for every role to drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{env, EXIT_CONFIG};
use crate::agent::Agent;
use crate::config::{FileConfig, RunConfig};
use crate::egress::Egress;
use crate::exporter::Exporter;
use crate::gateway::Gateway;
use crate::telemetry::geo::SharedGeo;

/// Why the process could not start its roles.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr} ({field}): {source}")]
    Bind {
        addr: SocketAddr,
        field: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Runs every role of `config` until SIGINT/SIGTERM.
pub fn run(config: RunConfig, reload_from: Option<PathBuf>) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run_roles(config, reload_from)),
        Err(e) => Err(StartError::Runtime(e)),
    };
    // One plain line, like the configuration errors before it: not a log line as well.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ StartError::Config(_)) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

struct Roles {
    gateway: Option<Gateway>,
    agent: Option<Agent>,
    egress: Option<Egress>,
    /// Whether the egress proxy has a credentials file to re-read.
    egress_credentials: bool,
    geo: SharedGeo,
}

impl Roles {
    /// What the roles do on SIGINT/SIGTERM, for the log.
    fn shutdown_message(&self) -> &'static str {
        let scrapes = self.gateway.is_some() || self.agent.is_some();
        match (scrapes, self.egress.is_some()) {
            (true, true) => "shutting down: draining in-flight scrapes and proxied requests",
            (true, false) => "shutting down: draining in-flight scrapes",
            (false, true) => "shutting down: draining in-flight proxied requests",
            (false, false) => "shutting down",
        }
    }
}

async fn run_roles(config: RunConfig, reload_from: Option<PathBuf>) -> Result<(), StartError> {
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    // Before any role starts: a SIGHUP or SIGTERM that comes once a listener is up is handled,
    // not left to its default action (exit without draining).
    let signals = Signals::install();
    let roles = start_roles(config, &shutdown, &mut tasks).await?;
    tokio::spawn(handle_signals(
        signals,
        roles,
        reload_from,
        shutdown.clone(),
    ));
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            error!(error = %e, "a role stopped unexpectedly");
            shutdown.cancel();
        }
    }
    Ok(())
}

async fn start_roles(
    config: RunConfig,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<Roles, StartError> {
    for warning in super::warnings(&config) {
        warn!("{warning}");
    }
    let mut roles = Roles {
        gateway: None,
        agent: None,
        egress: None,
        egress_credentials: false,
        geo: config.geo.clone(),
    };
    if roles.geo.is_enabled() {
        tasks.spawn(roles.geo.clone().watch(shutdown.clone()));
    }
    if let Some(cfg) = config.gateway {
        let (web_addr, tunnel_addr) = (cfg.web_listen, cfg.tunnel_listen);
        let gateway = Gateway::new(cfg).map_err(|e| StartError::Config(format!("{e:#}")))?;
        let web = bind(web_addr, "web.listen_address").await?;
        let tunnel = bind(tunnel_addr, "tunnel.listen_address").await?;
        let g = gateway.clone();
        let token = shutdown.clone();
        tasks.spawn(async move { g.run(web, tunnel, token).await });
        roles.gateway = Some(gateway);
    }
    if let Some(cfg) = config.agent {
        let web = match cfg.web_listen {
            Some(addr) => Some(bind(addr, "agent web.listen_address").await?),
            None => None,
        };
        let agent = Agent::new(cfg).map_err(|e| StartError::Config(format!("{e:#}")))?;
        if let Some(listener) = web {
            let a = agent.clone();
            let token = shutdown.clone();
            tasks.spawn(async move { a.serve_web(listener, token).await });
        }
        let a = agent.clone();
        let token = shutdown.clone();
        tasks.spawn(async move { a.run(token).await });
        roles.agent = Some(agent);
    }
    if let Some(cfg) = config.egress {
        let addr = cfg.listen;
        roles.egress_credentials = cfg.credentials_file.is_some();
        let egress = Egress::new(cfg).map_err(|e| StartError::Config(format!("{e:#}")))?;
        let listener = bind(addr, "egress web.listen_address").await?;
        let e = egress.clone();
        let token = shutdown.clone();
        tasks.spawn(async move { e.serve(listener, token).await });
        roles.egress = Some(egress);
    }
    if let Some(cfg) = config.exporter {
        let exporter = Exporter::new(&cfg);
        let listener = bind(cfg.listen, "exporter web.listen_address").await?;
        let token = shutdown.clone();
        tasks.spawn(async move { exporter.serve(listener, token).await });
    }
    Ok(roles)
}

async fn bind(addr: SocketAddr, field: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            addr,
            field,
            source,
        })
}

/// SIGTERM, SIGINT and SIGHUP, caught from the moment they are installed.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// `None` (and an error logged) when the handlers cannot be installed.
    fn install() -> Option<Signals> {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Some(Signals { term, int, hup }),
            _ => {
                error!("cannot install signal handlers; stop ferry with SIGKILL");
                None
            }
        }
    }
}

async fn handle_signals(
    signals: Option<Signals>,
    roles: Roles,
    reload_from: Option<PathBuf>,
    shutdown: CancellationToken,
) {
    let Some(Signals {
        mut term,
        mut int,
        mut hup,
    }) = signals
    else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&roles, reload_from.as_deref()),
        }
    }
    info!("{}", roles.shutdown_message());
    shutdown.cancel();
}

/// SIGHUP: re-read the tokens file, and the config file's agent targets. Errors keep the old state.
fn reload(roles: &Roles, file: Option<&std::path::Path>) {
    info!("SIGHUP: reloading");
    // The error (a broken file keeps the old database) is logged by reload itself.
    let _ = roles.geo.reload();
    if let Some(gateway) = &roles.gateway {
        match gateway.reload_tokens() {
            Ok(0) => warn!(
                credentials = 0,
                "tokens file reloaded, but it holds no credentials: no agent can connect"
            ),
            Ok(n) => info!(credentials = n, "tokens file reloaded"),
            Err(e) => {
                error!(error = %e, "tokens file reload failed; keeping the previous credentials")
            }
        }
    }
    if let Some(egress) = roles.egress.as_ref().filter(|_| roles.egress_credentials) {
        match egress.reload_credentials() {
            Ok(()) => info!("egress credentials reloaded"),
            Err(e) => {
                error!(error = %e, "egress credentials reload failed; keeping the previous ones")
            }
        }
    }
    let (Some(agent), Some(path)) = (&roles.agent, file) else {
        if roles.agent.is_some() {
            warn!("agent targets come from flags: nothing to reload (use ferry run --config.file to reload targets)");
        }
        return;
    };
    let origin = path.display().to_string();
    let validated = FileConfig::load_validated(path, &env, |_| {});
    let new = match validated {
        Ok(RunConfig { agent: Some(a), .. }) => a,
        Ok(_) => {
            return error!(file = %origin, "reload: the file has no agent section any more; keeping the previous targets")
        }
        Err(errs) => {
            return error!(errors = %errs.to_string().replace('\n', "; "), "reload failed; keeping the previous targets")
        }
    };
    if new.agent_id != agent.id() {
        warn!(
            running = agent.id(),
            file = %new.agent_id,
            "reload: agent_id changed in the file; the new id takes effect only after a restart"
        );
    }
    match agent.set_targets(&new.targets, &new.labels) {
        // Counted with the built-in `ferry` target, as the gateway counts them.
        Ok(()) => info!(targets = new.targets.len() + 1, "agent targets reloaded"),
        Err(e) => error!(error = %e, "reload failed; keeping the previous targets"),
    }
}
