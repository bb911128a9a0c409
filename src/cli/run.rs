//! Running the configured roles in one process: bind listeners, wire signals (SIGINT/SIGTERM →
//! one shutdown token; SIGHUP → reload), wait for every role to drain.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{env, EXIT_CONFIG};
use crate::agent::Agent;
use crate::config::{AgentConfig, ConfigErrors, FileConfig, RunConfig};
use crate::egress::{Egress, TlsReload};
use crate::exporter::Exporter;
use crate::gateway::{Gateway, TunnelTlsReload, WebConfigReload};
use crate::telemetry::geo::SharedGeo;
use crate::telemetry::ConfigReload;
use crate::tunnel::tls_client::ClientTls;

/// Why the process ends with a failure.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("{0}")]
    Config(String),
    /// `at`: the file and field, or the flag, that set the address.
    #[error("{at}: cannot listen on {addr}: {source}")]
    Bind {
        at: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Logged when it happened, with the role and the reason.
    #[error("{role} stopped unexpectedly: {reason}")]
    RoleStopped { role: &'static str, reason: String },
}

/// Runs every role of the configuration `load` returns until SIGINT/SIGTERM; `reload_from` is
/// the file SIGHUP reads again.
pub fn run(
    load: impl FnOnce() -> Result<RunConfig, ConfigErrors>,
    reload_from: Option<PathBuf>,
) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => {
            let result = rt.block_on(async {
                // Before anything slow (reading the files, opening the geo database): SIGHUP's
                // default action ends the process, and a reload sent by a deploy tool just after the
                // start must be a reload, applied once the roles run.
                let signals = Signals::install();
                let config = load().map_err(|errs| StartError::Config(errs.to_string()))?;
                super::logging::init(&config.log);
                super::fd_limit::raise(super::fd_limit::needed(&config));
                run_roles(config, signals, reload_from).await
            });
            // The roles have stopped; a reload still blocked reading a file (a hung network
            // mount) must not keep the process from exiting.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            result
        }
        Err(e) => Err(StartError::Runtime(e)),
    };
    exit_code(result)
}

/// Non-zero for any failure, so that a service manager restarts the process
/// (`Restart=on-failure`).
fn exit_code(result: Result<(), StartError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Already in the log, where it happened.
        Err(StartError::RoleStopped { .. }) => ExitCode::FAILURE,
        // Past the start of logging, in a JSON log: one more record, not a plain line.
        Err(e) if super::logging::is_json() => {
            error!(error = %e, "cannot start");
            match e {
                StartError::Config(_) => ExitCode::from(EXIT_CONFIG),
                _ => ExitCode::FAILURE,
            }
        }
        // One plain line, like the configuration errors before it: not a log line as well.
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

async fn run_roles(
    config: RunConfig,
    signals: std::io::Result<Signals>,
    reload_from: Option<PathBuf>,
) -> Result<(), StartError> {
    let shutdown = CancellationToken::new();
    let mut tasks = RoleTasks::default();
    let signals = signals
        .inspect_err(
            |e| error!(error = %e, "cannot install signal handlers; stop ferry with SIGKILL"),
        )
        .ok();
    // The file as the roles were started from it: a reload compares against this.
    let started_from = reload_from
        .as_deref()
        .and_then(|path| file_value(path).ok())
        .map(|value| (reload_from.clone().unwrap_or_default(), value));
    // The configuration just loaded is the first one applied.
    ConfigReload::get().record(true);
    let listeners = Listeners {
        file: reload_from.as_deref(),
    };
    let roles = start_roles(config, listeners, &shutdown, &mut tasks).await?;
    tokio::spawn(handle_signals(
        signals,
        roles,
        started_from,
        shutdown.clone(),
    ));
    tasks.wait(&shutdown).await
}

/// The tasks of the running roles, each with its name for the log.
#[derive(Default)]
struct RoleTasks {
    set: JoinSet<()>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl RoleTasks {
    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let id = self.set.spawn(task).id();
        self.names.insert(id, name);
    }

    /// Waits for every role to end. Roles end only on `shutdown`: one that panics, or ends
    /// while nothing asked it to, is logged and stops the others (they drain as on SIGTERM), and
    /// the first such is the process's failure.
    async fn wait(mut self, shutdown: &CancellationToken) -> Result<(), StartError> {
        let mut failure = None;
        while let Some(res) = self.set.join_next_with_id().await {
            let (id, reason) = match res {
                Ok(_) if shutdown.is_cancelled() => continue,
                Ok((id, ())) => (id, "it ended before shutdown".to_owned()),
                Err(e) => (e.id(), join_error_reason(e)),
            };
            let role = self.names.get(&id).copied().unwrap_or("a role");
            error!(role, %reason, "a role stopped unexpectedly; stopping the others");
            shutdown.cancel();
            failure.get_or_insert(StartError::RoleStopped { role, reason });
        }
        failure.map_or(Ok(()), Err)
    }
}

/// A panic's message, or why else the task ended.
fn join_error_reason(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let panic = e.into_panic();
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned());
    format!("panicked: {message}")
}

async fn start_roles(
    config: RunConfig,
    listeners: Listeners<'_>,
    shutdown: &CancellationToken,
    tasks: &mut RoleTasks,
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
        tasks.spawn("geoip watch", roles.geo.clone().watch(shutdown.clone()));
    }
    if let Some(cfg) = config.gateway {
        let (web_addr, tunnel_addr) = (cfg.web_listen, cfg.tunnel_listen);
        let gateway = Gateway::new(cfg).map_err(|e| StartError::Config(format!("{e:#}")))?;
        let web = listeners
            .bind(web_addr, "gateway.web.listen_address")
            .await?;
        let tunnel = listeners
            .bind(tunnel_addr, "gateway.tunnel.listen_address")
            .await?;
        let g = gateway.clone();
        let token = shutdown.clone();
        tasks.spawn("gateway", async move { g.run(web, tunnel, token).await });
        roles.gateway = Some(gateway);
    }
    if let Some(cfg) = config.agent {
        let web = match cfg.web_listen {
            Some(addr) => Some(listeners.bind(addr, "agent.web.listen_address").await?),
            None => None,
        };
        let agent = Agent::new(cfg).map_err(|e| StartError::Config(format!("{e:#}")))?;
        if let Some(listener) = web {
            let a = agent.clone();
            let token = shutdown.clone();
            tasks.spawn(
                "agent web",
                async move { a.serve_web(listener, token).await },
            );
        }
        let a = agent.clone();
        let token = shutdown.clone();
        // A fresh agent: it cannot be running already, so its result says nothing more.
        tasks.spawn("agent", async move {
            let _ = a.run(token).await;
        });
        roles.agent = Some(agent);
    }
    if let Some(cfg) = config.egress {
        let addr = cfg.listen;
        roles.egress_credentials = cfg.credentials_file.is_some();
        let egress = Egress::new(cfg).map_err(|e| StartError::Config(format!("{e:#}")))?;
        let listener = listeners.bind(addr, "egress.web.listen_address").await?;
        let e = egress.clone();
        let token = shutdown.clone();
        tasks.spawn("egress", async move { e.serve(listener, token).await });
        roles.egress = Some(egress);
    }
    if let Some(cfg) = config.exporter {
        let exporter = Exporter::new(&cfg);
        let listener = listeners
            .bind(cfg.listen, "exporter.web.listen_address")
            .await?;
        let token = shutdown.clone();
        tasks.spawn(
            "exporter",
            async move { exporter.serve(listener, token).await },
        );
    }
    Ok(roles)
}

/// Binds the roles' listeners; a failure names the file and field (or the flag) that set the
/// address, as a configuration error does.
struct Listeners<'a> {
    /// The config file, `None` when the role was configured by flags.
    file: Option<&'a std::path::Path>,
}

impl Listeners<'_> {
    async fn bind(&self, addr: SocketAddr, field: &str) -> Result<TcpListener, StartError> {
        listen(addr)
            .await
            .map_err(|(addr, source)| StartError::Bind {
                at: match self.file {
                    Some(file) => format!("{}: {field}", file.display()),
                    None => crate::config::flag_name(field),
                },
                addr,
                source,
            })
    }
}

/// Listens on `addr` as [`crate::config::parse_listen_address`] returned it; on failure, the
/// address last tried and why.
pub(crate) async fn listen(addr: SocketAddr) -> Result<TcpListener, (SocketAddr, std::io::Error)> {
    match TcpListener::bind(addr).await {
        // `:port` on a host without IPv6: every IPv4 address, then.
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && no_ipv6(&e) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            TcpListener::bind(v4).await.map_err(|e| (v4, e))
        }
        res => res.map_err(|e| (addr, e)),
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
    /// Installs the handlers; a signal that arrives from now on is kept for the first `recv`.
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
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
    let roles = Arc::new(roles);
    let started_from = Arc::new(started_from);
    let signal = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                // A reload stuck on a file (a hung network mount) must not hold up a stop.
                let reload = on_sighup(roles.clone(), started_from.clone());
                tokio::select! {
                    _ = reload => {}
                    _ = term.recv() => break "SIGTERM",
                    _ = int.recv() => break "SIGINT",
                }
            }
        }
    };
    info!(signal, "{}", roles.shutdown_message());
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
const RELOADED_FIELDS: &[&str] = &[
    "agent.targets",
    "agent.labels",
    "agent.agent_id",
    "agent.tunnel.ca_file",
    "agent.tunnel.fingerprint",
    "agent.tunnel.cert_file",
    "agent.tunnel.key_file",
];

fn file_value(path: &std::path::Path) -> Result<serde_yaml_ng::Value, String> {
    let text = crate::fs_util::read_regular_to_string(path).map_err(|e| e.to_string())?;
    serde_yaml_ng::from_str(&text).map_err(|e| e.to_string())
}

/// Field paths where `old` and `new` differ, as deep as mappings go (`gateway.tunnel.tls_cert_file`),
/// but not below a field a reload applies whole (`agent.labels`): a list (`egress.rules`) is
/// one field.
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
        (Value::Mapping(a), Value::Mapping(b)) if !RELOADED_FIELDS.contains(&path) => {
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

/// SIGHUP: reloads the geo database and what [`reload`] re-reads, records the outcome and says
/// what was applied and what waits for a restart.
async fn on_sighup(roles: Arc<Roles>, file: Arc<Option<(PathBuf, serde_yaml_ng::Value)>>) {
    info!("SIGHUP: reloading");
    let agent = roles.agent.clone();
    // Reading files (and mapping and probing the geo database) runs on the blocking pool, as
    // the periodic geo check does: not on a thread answering /metrics and scrapes.
    let done = tokio::task::spawn_blocking(move || {
        // A broken file keeps the old database. `SharedGeo::reload` logs it and records it in
        // the database's own gauges, as when the periodic check loads a changed file: the
        // `ferry_config_…` gauges cover what only SIGHUP reloads.
        let geo_applied = roles.geo.reload().is_ok();
        (geo_applied, reload(&roles, file.as_ref().as_ref()))
    })
    .await;
    let Ok((geo_applied, reloaded)) = done else {
        error!(
            "reload failed unexpectedly; the running configuration stays where it was not applied"
        );
        ConfigReload::get().record(false);
        return;
    };
    // Settings waiting for a restart were not refused: the file was valid and applied where it
    // can be, which is what the gauge says.
    ConfigReload::get().record(reloaded.applied);
    // The end of the reload's lines: what was applied is in force from here on.
    if !(reloaded.applied && geo_applied) {
        warn!("reload done, not all of it applied: see the errors above");
    } else if !reloaded.need_restart.is_empty() {
        warn!(
            need_restart = %reloaded.need_restart.join(", "),
            "reload done: applied, except settings that take effect only after a restart"
        );
    } else {
        info!("reload done: everything applied");
    }
    // What was refused may be fixed now (a renewed client certificate, a new token, a target
    // list the gateway accepts): not worth the rest of a slow retry's wait to find out. After
    // the reload's last line, so that the log reads in the order things happen.
    if let Some(agent) = agent {
        agent.reconnect_now();
    }
}

/// What a reload did.
struct Reloaded {
    /// Nothing read was refused (what was, is logged, and its previous state kept).
    applied: bool,
    /// Settings that changed but take effect only after a restart.
    need_restart: Vec<String>,
}

/// SIGHUP, after the geo database: re-reads the tokens and credentials files and the config file
/// (`file`, with its contents at start). Whatever cannot be read keeps its previous state.
fn reload(roles: &Roles, file: Option<&(PathBuf, serde_yaml_ng::Value)>) -> Reloaded {
    for warning in super::writable_by_all(&roles.credential_files) {
        warn!("{warning}");
    }
    let mut need_restart = Vec::new();
    let mut ok = reload_tokens(roles);
    ok &= reload_tunnel_tls(roles);
    ok &= reload_web_config(roles, &mut need_restart);
    ok &= reload_egress_credentials(roles);
    ok &= reload_egress_tls(roles);
    match file {
        Some((path, started)) => ok &= reload_file(roles, path, started, &mut need_restart),
        // Not a warning: the rest (the geoip database, credential files) was reloaded, and the
        // closing line says so; this says what a reload cannot change here.
        None => {
            if let Some(agent) = &roles.agent {
                ok &= reload_agent_tunnel_tls(agent, None);
                info!("agent targets and settings come from flags: unchanged by a reload, except the files the tunnel's TLS reads (to reload the rest, run the agent with ferry run --config.file)");
            }
        }
    }
    Reloaded {
        applied: ok,
        need_restart,
    }
}

fn reload_tokens(roles: &Roles) -> bool {
    let Some(gateway) = &roles.gateway else {
        return true;
    };
    match gateway.reload_tokens() {
        Ok(0) => warn!(
            credentials = 0,
            "tokens file reloaded, but it holds no credentials: no agent can connect"
        ),
        Ok(n) => info!(credentials = n, "tokens file reloaded"),
        Err(e) => {
            error!(error = %e, "tokens file reload failed; keeping the previous credentials");
            return false;
        }
    }
    true
}

fn reload_tunnel_tls(roles: &Roles) -> bool {
    let Some(gateway) = &roles.gateway else {
        return true;
    };
    match gateway.reload_tunnel_tls() {
        Ok(TunnelTlsReload::Nothing) => {}
        // Info, not a warning: a CA-issued certificate is renewed this way every few weeks.
        Ok(TunnelTlsReload::Applied {
            fingerprint,
            changed: true,
        }) => {
            info!(%fingerprint, "tunnel TLS certificate reloaded: tunnels from now on get the new certificate (agents pinning a fingerprint need this one)")
        }
        Ok(TunnelTlsReload::Applied { fingerprint, .. }) => {
            info!(%fingerprint, "tunnel TLS files reloaded, same certificate")
        }
        Err(e) => {
            error!(error = %e, "tunnel TLS reload failed; keeping the previous certificate");
            return false;
        }
    }
    true
}

fn reload_web_config(roles: &Roles, need_restart: &mut Vec<String>) -> bool {
    let Some(gateway) = &roles.gateway else {
        return true;
    };
    match gateway.reload_web_config() {
        Ok(WebConfigReload::NoFile) => {}
        Ok(WebConfigReload::Applied) => info!("web config file reloaded"),
        Ok(WebConfigReload::TlsNeedsRestart) => {
            warn!("web config file reloaded, but it turns TLS on or off: the web listener keeps speaking what it started with until a restart");
            need_restart.push("web config file TLS".to_owned());
        }
        Err(e) => {
            error!(error = %e, "web config file reload failed; keeping the previous one");
            return false;
        }
    }
    true
}

fn reload_egress_credentials(roles: &Roles) -> bool {
    let Some(egress) = roles.egress.as_ref().filter(|_| roles.egress_credentials) else {
        return true;
    };
    match egress.reload_credentials() {
        Ok(0) => warn!(
            credentials = 0,
            "egress credentials file reloaded, but it holds no credentials: every proxied request is refused (407)"
        ),
        Ok(n) => info!(credentials = n, "egress credentials reloaded"),
        Err(e) => {
            error!(error = %e, "egress credentials reload failed; keeping the previous ones");
            return false;
        }
    }
    true
}

fn reload_egress_tls(roles: &Roles) -> bool {
    let Some(egress) = &roles.egress else {
        return true;
    };
    match egress.reload_tls() {
        Ok(TlsReload::NoRules) => {}
        Ok(TlsReload::Unchanged) => info!("egress TLS upgrade files reloaded, unchanged"),
        Ok(TlsReload::Applied { rules }) => info!(
            rules = %rules.join(","),
            "egress TLS upgrade files reloaded: new upstream connections of these rules use the new ones"
        ),
        Err(e) => {
            error!(error = %e, "egress TLS upgrade files reload failed; keeping the previous ones");
            return false;
        }
    }
    true
}

/// Applies the agent's targets and labels from the config file, and names the settings that
/// changed since `started` but need a restart: a changed listener or egress rule silently
/// ignored would look applied. A file that cannot be read or is invalid changes nothing.
fn reload_file(
    roles: &Roles,
    path: &std::path::Path,
    started: &serde_yaml_ng::Value,
    need_restart: &mut Vec<String>,
) -> bool {
    let now = match file_value(path) {
        Ok(now) => now,
        Err(e) => {
            error!(file = %path.display(), error = %e, "reload: the config file cannot be read; the running configuration stays");
            return false;
        }
    };
    // The database is not opened again here: `SharedGeo::reload` did, and a bad database file
    // keeps the old one there; it must not keep the rest of the file from being applied.
    let without_geo = |f: &mut FileConfig| f.geoip = Default::default();
    let mut applied = true;
    let new = match FileConfig::load_validated(path, &env, without_geo) {
        Ok(new) => new,
        Err(errs) => match agent_section_alone(path, &errs) {
            // What is wrong is elsewhere: a file that another section names (its own reload
            // refused it and said so) or a setting that waits for a restart. The agent's
            // targets and labels need not wait for it.
            Some(new) => {
                error!(file = %path.display(), errors = %errs.to_string().replace('\n', "; "), "reload: the config file has problems outside the agent section (a restart would fail on them); the agent section is applied");
                applied = false;
                new
            }
            None => {
                error!(file = %path.display(), errors = %errs.to_string().replace('\n', "; "), "reload: the config file is invalid; the running configuration stays");
                return false;
            }
        },
    };
    let mut changed = Vec::new();
    changed_fields("", started, &now, &mut changed);
    changed.retain(|f| !RELOADED_FIELDS.contains(&f.as_str()));
    if !changed.is_empty() {
        warn!(file = %path.display(), fields = %changed.join(", "), "reload: these settings changed in the file and take effect only after a restart");
    }
    need_restart.extend(changed);
    match &roles.agent {
        Some(agent) => reload_agent(agent, new.agent, path, need_restart) && applied,
        None => applied,
    }
}

/// The file validated for its agent section alone, when `errs` (the whole file's) are all about
/// other sections; none when one is about the agent section or the whole file (a file that
/// does not parse, half-written), or when there is no agent section.
fn agent_section_alone(path: &std::path::Path, errs: &ConfigErrors) -> Option<RunConfig> {
    let elsewhere = |field: &str| {
        ["gateway", "egress", "exporter", "geoip", "log"]
            .iter()
            .any(|section| field == *section || field.starts_with(&format!("{section}.")))
    };
    if errs.errors.is_empty() || !errs.errors.iter().all(|e| elsewhere(&e.field)) {
        return None;
    }
    let agent_only = |f: &mut FileConfig| {
        f.log = Default::default();
        f.geoip = Default::default();
        f.gateway = None;
        f.egress = None;
        f.exporter = None;
    };
    FileConfig::load_validated(path, &env, agent_only)
        .ok()
        .filter(|c| c.agent.is_some())
}

fn reload_agent(
    agent: &Agent,
    new: Option<AgentConfig>,
    path: &std::path::Path,
    need_restart: &mut Vec<String>,
) -> bool {
    let Some(new) = new else {
        error!(file = %path.display(), "reload: the file has no agent section any more; keeping the previous targets");
        return false;
    };
    if new.agent_id != agent.id() {
        warn!(
            running = agent.id(),
            file = %new.agent_id,
            "reload: agent_id changed in the file; the new id takes effect only after a restart"
        );
        need_restart.push("agent.agent_id".to_owned());
    }
    let tls_ok = reload_agent_tunnel_tls(agent, new.gateway.tls.clone());
    match agent.set_targets(&new.targets, &new.labels) {
        // Counted with the built-in `ferry` target, as the gateway counts them.
        Ok(()) => info!(targets = new.targets.len() + 1, "agent targets reloaded"),
        Err(e) => {
            error!(error = %e, "reload failed; keeping the previous targets");
            return false;
        }
    }
    tls_ok
}

/// Reads the agent's tunnel CA file and client certificate again, with `settings` from the
/// config file if it has them: the next tunnel uses them, so that a CA added to the CA file is
/// trusted before the gateway switches to a certificate it issued.
fn reload_agent_tunnel_tls(agent: &Agent, settings: Option<ClientTls>) -> bool {
    match agent.reload_tunnel_tls(settings) {
        Ok(files) if files.is_empty() => {}
        Ok(files) => {
            info!(files = %files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(","), "tunnel TLS files read again: the next connection to the gateway uses them")
        }
        Err(e) => {
            error!(error = %e, "tunnel TLS reload failed; keeping the previous CA and client certificate");
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A role that panics (the geo watch did, on a zero interval) stops the others and makes
    /// the process fail, so that systemd's `Restart=on-failure` starts it again.
    #[tokio::test]
    async fn a_role_that_panics_stops_the_others_and_fails_the_process() {
        let shutdown = CancellationToken::new();
        let mut tasks = RoleTasks::default();
        let token = shutdown.clone();
        tasks.spawn("egress", async move { token.cancelled().await });
        tasks.spawn("geoip watch", async { panic!("period must be non-zero") });
        let result = tasks.wait(&shutdown).await;
        assert!(shutdown.is_cancelled(), "the other roles are told to stop");
        let err = result.unwrap_err();
        assert_eq!(
            err.to_string(),
            "geoip watch stopped unexpectedly: panicked: period must be non-zero"
        );
        assert_eq!(exit_code(Err(err)), ExitCode::FAILURE);
    }

    #[tokio::test]
    async fn a_role_that_ends_before_shutdown_fails_the_process() {
        let shutdown = CancellationToken::new();
        let mut tasks = RoleTasks::default();
        tasks.spawn("exporter", async {});
        let err = tasks.wait(&shutdown).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "exporter stopped unexpectedly: it ended before shutdown"
        );
    }

    /// A reload applies a changed tunnel CA file or pin: only the tunnel settings it does not
    /// apply are named as waiting for a restart.
    #[test]
    fn tunnel_tls_files_are_not_named_as_needing_a_restart() {
        let yaml = |s: &str| serde_yaml_ng::from_str::<serde_yaml_ng::Value>(s).unwrap();
        let old = yaml("agent:\n  tunnel: { ca_file: a.pem, keepalive_interval: 30s }\n");
        let new = yaml(
            "agent:\n  tunnel: { ca_file: b.pem, keepalive_interval: 10s, fingerprint: [] }\n",
        );
        let mut changed = Vec::new();
        changed_fields("", &old, &new, &mut changed);
        changed.retain(|f| !RELOADED_FIELDS.contains(&f.as_str()));
        assert_eq!(changed, ["agent.tunnel.keepalive_interval"]);
    }

    /// A restart-only change is named down to its field, so that the operator knows which
    /// one; a reloaded mapping is one field (a changed label is not a restart-only setting).
    #[test]
    fn changed_settings_are_named_down_to_the_field() {
        let yaml = |s: &str| serde_yaml_ng::from_str::<serde_yaml_ng::Value>(s).unwrap();
        let old = yaml(
            "gateway:\n  tunnel: { tls_cert_file: a.pem }\n  web: { listen_address: ':8080' }\nagent:\n  labels: { ver: a }\negress:\n  rules: [{ name: a }]\n",
        );
        let new = yaml(
            "gateway:\n  tunnel: { tls_cert_file: b.pem }\n  web: { listen_address: ':8081' }\nagent:\n  labels: { ver: b }\negress:\n  rules: [{ name: b }]\nlog: { level: debug }\n",
        );
        let mut changed = Vec::new();
        changed_fields("", &old, &new, &mut changed);
        changed.retain(|f| !RELOADED_FIELDS.contains(&f.as_str()));
        assert_eq!(
            changed,
            [
                "gateway.tunnel.tls_cert_file",
                "gateway.web.listen_address",
                "egress.rules",
                "log"
            ]
        );
    }

    #[tokio::test]
    async fn roles_that_end_on_shutdown_are_a_success() {
        let shutdown = CancellationToken::new();
        let mut tasks = RoleTasks::default();
        for name in ["gateway", "agent"] {
            let token = shutdown.clone();
            tasks.spawn(name, async move { token.cancelled().await });
        }
        shutdown.cancel();
        assert!(tasks.wait(&shutdown).await.is_ok());
    }
}
