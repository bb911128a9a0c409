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
    /// The files holding credentials, checked again for their permissions on reload.
    credential_files: Vec<(&'static str, PathBuf)>,
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
    // The file as the roles were started from it: a reload compares against this.
    let started_from = reload_from
        .as_deref()
        .and_then(|path| file_value(path).ok())
        .map(|value| (reload_from.clone().unwrap_or_default(), value));
    let roles = start_roles(config, &shutdown, &mut tasks).await?;
    tokio::spawn(handle_signals(
        signals,
        roles,
        started_from,
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
        credential_files: super::credential_files(&config),
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
        // A fresh agent: it cannot be running already.
        tasks.spawn(async move {
            let _ = a.run(token).await;
        });
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
    match TcpListener::bind(addr).await {
        // `:port` on a host without IPv6: every IPv4 address, then.
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && no_ipv6(&e) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            TcpListener::bind(v4)
                .await
                .map_err(|source| StartError::Bind {
                    addr: v4,
                    field,
                    source,
                })
        }
        res => res.map_err(|source| StartError::Bind {
            addr,
            field,
            source,
        }),
    }
}

/// EAFNOSUPPORT or EADDRNOTAVAIL: the host has no IPv6 to listen on.
fn no_ipv6(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(97) | Some(99))
        || e.kind() == std::io::ErrorKind::AddrNotAvailable
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
    started_from: Option<(PathBuf, serde_yaml_ng::Value)>,
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
            _ = hup.recv() => {
                if let Some((path, started)) = &started_from {
                    warn_unapplied(path, started, roles.agent.is_none());
                }
                reload(&roles, started_from.as_ref().map(|(path, _)| path.as_path()))
            }
        }
    }
    info!("{}", roles.shutdown_message());
    shutdown.cancel();
    // A second SIGINT/SIGTERM while draining: the operator does not want to wait (Ctrl-C twice).
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    warn!("second stop signal: exiting now, without waiting for the drain");
    std::process::exit(1);
}

/// What SIGHUP applies from the config file itself (files it names, such as the tokens file, are
/// re-read too). `agent.agent_id` is warned about on its own.
const RELOADED_FIELDS: &[&str] = &["agent.targets", "agent.labels", "agent.agent_id"];

fn file_value(path: &std::path::Path) -> Result<serde_yaml_ng::Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    serde_yaml_ng::from_str(&text).map_err(|e| e.to_string())
}

/// Says which settings changed in the file since start that a reload does not apply: a changed
/// listener or egress rule silently ignored would look applied.
fn warn_unapplied(path: &std::path::Path, started: &serde_yaml_ng::Value, validate: bool) {
    let now = match file_value(path) {
        Ok(now) => now,
        Err(e) => {
            return error!(file = %path.display(), error = %e, "reload: the config file cannot be read; the running configuration stays")
        }
    };
    // An agent's reload validates the file itself (and says so); for the other roles a file that
    // parses may still be one `check-config` refuses.
    if validate {
        if let Err(errs) = FileConfig::load_validated(path, &env, |_| {}) {
            return error!(file = %path.display(), errors = %errs.to_string().replace('\n', "; "), "reload: the config file is invalid; the running configuration stays");
        }
    }
    let mut changed = Vec::new();
    changed_fields("", started, &now, &mut changed);
    changed.retain(|f| !RELOADED_FIELDS.contains(&f.as_str()));
    if !changed.is_empty() {
        warn!(file = %path.display(), fields = %changed.join(", "), "reload: these settings changed in the file and take effect only after a restart");
    }
}

/// Field paths (two levels deep: `egress.rules`) where `old` and `new` differ.
fn changed_fields(
    path: &str,
    old: &serde_yaml_ng::Value,
    new: &serde_yaml_ng::Value,
    out: &mut Vec<String>,
) {
    use serde_yaml_ng::Value;
    if old == new {
        return;
    }
    match (old, new) {
        (Value::Mapping(a), Value::Mapping(b)) if path.matches('.').count() < 1 => {
            let mut keys: Vec<&Value> = a.keys().chain(b.keys()).collect();
            keys.dedup();
            let mut seen = Vec::new();
            for key in keys {
                let name = key
                    .as_str()
                    .map_or_else(|| format!("{key:?}"), str::to_owned);
                if seen.contains(&name) {
                    continue;
                }
                let field = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                let null = Value::Null;
                changed_fields(
                    &field,
                    a.get(key).unwrap_or(&null),
                    b.get(key).unwrap_or(&null),
                    out,
                );
                seen.push(name);
            }
        }
        _ => out.push(if path.is_empty() {
            "(the whole file)".to_owned()
        } else {
            path.to_owned()
        }),
    }
}

/// SIGHUP: re-read the tokens file, and the config file's agent targets. Errors keep the old state.
fn reload(roles: &Roles, file: Option<&std::path::Path>) {
    info!("SIGHUP: reloading");
    for warning in super::writable_by_all(&roles.credential_files) {
        warn!("{warning}");
    }
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
