//! The `ferry` command line: Prometheus-style flags that fill the same structs as the YAML file,
//! so flags and file are validated by one code path.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::auth::{TokensFile, CREDENTIALS_FILE, TOKENS_FILE};
use crate::config::{
    parse_label_flag, AgentSection, ConfigErrors, Dur, EgressSection, FileConfig, GatewaySection,
    LogFormat, LogSection, RunConfig, TargetSection,
};

pub(crate) mod fd_limit;
mod logging;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod malloc_arenas;
pub use logging::filter as log_filter;
pub use logging::init as init_logging;
mod run;
pub(crate) use run::listen;

/// Exit code for configuration errors (bad flags, files, certificates).
pub const EXIT_CONFIG: u8 = 2;

/// ferry carries monitoring traffic across network boundaries.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Public side of the pull path: Prometheus's proxy_url, accepts agent tunnels.
    Gateway(GatewayArgs),
    /// Private side: dials out to the gateway and serves its listed targets.
    Agent(AgentArgs),
    /// Forward proxy for payloads leaving the private network: allowlists and validation.
    Egress(EgressArgs),
    /// The host's TCP connections by state, direction and country, on /metrics (no gateway needed).
    Exporter(ExporterArgs),
    /// Runs every role configured in a YAML file (gateway:, agent:, egress:, exporter:).
    Run(RunArgs),
    /// Validates a YAML configuration file and reports every error.
    CheckConfig(CheckArgs),
    /// Agent tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Gateway + agent + a demo target in one process on loopback; prints what to try.
    Quickstart(crate::quickstart::QuickstartArgs),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Prints a new random token and the tokens-file line that accepts it.
    New {
        /// Agent id glob the line allows.
        #[arg(long, default_value = "*")]
        agent_id: String,
    },
}

/// The country database flag shared by every role.
#[derive(Debug, Args, Clone)]
pub struct GeoArgs {
    /// MaxMind-format country database (.mmdb) to label connections by peer country.
    #[arg(long = "geoip.database", value_name = "FILE")]
    pub database: Option<PathBuf>,
}

impl GeoArgs {
    fn section(&self) -> crate::config::GeoipSection {
        crate::config::GeoipSection {
            database: self.database.clone(),
            ..Default::default()
        }
    }
}

/// The tunnel's HTTP/2 keepalive flags (gateway and agent).
#[derive(Debug, Args, Clone)]
pub struct KeepaliveArgs {
    /// HTTP/2 PING interval [default: 20s].
    #[arg(long = "tunnel.keepalive-interval", value_name = "DURATION")]
    pub interval: Option<Dur>,
    /// HTTP/2 PING acknowledgement timeout [default: 20s].
    #[arg(long = "tunnel.keepalive-timeout", value_name = "DURATION")]
    pub timeout: Option<Dur>,
}

/// The host connection collector's flags (agent and exporter).
#[derive(Debug, Args, Clone)]
pub struct CollectorArgs {
    /// Export the host's TCP connections by state, direction and remote country.
    #[arg(long = "collector.connections")]
    pub connections: bool,
    /// Remote network (CIDR) left out of the connection counts (repeatable).
    #[arg(long = "collector.connections-exclude", value_name = "CIDR")]
    pub connections_exclude: Vec<String>,
}

impl CollectorArgs {
    fn section(&self) -> crate::config::CollectorSection {
        crate::config::CollectorSection {
            connections: self.connections,
            connections_exclude: self.connections_exclude.clone(),
        }
    }
}

/// Logging flags shared by every role.
#[derive(Debug, Args, Clone)]
pub struct LogArgs {
    /// Log level: error, warn, info, debug, trace.
    #[arg(long = "log.level", value_name = "LEVEL")]
    pub level: Option<String>,
    /// Log line format: logfmt or json [default: logfmt].
    #[arg(long = "log.format", value_name = "FORMAT", value_parser = parse_log_format)]
    pub format: Option<LogFormat>,
}

impl LogArgs {
    /// The `log:` section these flags describe, on top of `base`.
    pub fn apply(&self, mut base: LogSection) -> LogSection {
        if let Some(level) = &self.level {
            base.level = level.clone();
        }
        if let Some(format) = self.format {
            base.format = format;
        }
        base
    }
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "logfmt" => Ok(LogFormat::Logfmt),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("{s:?} is not logfmt or json")),
    }
}

#[derive(Debug, Args)]
struct GatewayArgs {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    geo: GeoArgs,
    /// Address for Prometheus (proxy_url), /targets, /metrics [default: :8080].
    #[arg(long = "web.listen-address", value_name = "ADDR")]
    web_listen_address: Option<String>,
    /// Scrape timeout when Prometheus sends none [default: 10s].
    #[arg(long = "web.scrape-timeout-default", value_name = "DURATION")]
    scrape_timeout_default: Option<Dur>,
    /// Largest scrape timeout honoured [default: 60s].
    #[arg(long = "web.scrape-timeout-max", value_name = "DURATION")]
    scrape_timeout_max: Option<Dur>,
    /// How much earlier than Prometheus ferry gives up, at most a quarter of the timeout [default: 500ms].
    #[arg(long = "web.scrape-timeout-margin", value_name = "DURATION")]
    scrape_timeout_margin: Option<Dur>,
    /// Largest scrape body passed through, in bytes [default: 268435456].
    #[arg(long = "web.max-scrape-bytes", value_name = "BYTES")]
    max_scrape_bytes: Option<u64>,
    /// TLS and basic auth for the web listener (Prometheus exporter-toolkit format).
    #[arg(long = "web.config.file", value_name = "FILE")]
    web_config_file: Option<PathBuf>,
    /// How long a disconnected agent stays in /targets, so that Prometheus sees its targets down (up == 0); 0s: not at all [default: 24h].
    #[arg(long = "web.sd-keep-disconnected", value_name = "DURATION")]
    sd_keep_disconnected: Option<Dur>,
    /// Address agents dial [default: :7443].
    #[arg(long = "tunnel.listen-address", value_name = "ADDR")]
    tunnel_listen_address: Option<String>,
    /// PEM certificate chain for the tunnel (else a self-signed one in --data-dir).
    #[arg(long = "tunnel.tls-cert-file", value_name = "FILE")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key for the tunnel.
    #[arg(long = "tunnel.tls-key-file", value_name = "FILE")]
    tls_key_file: Option<PathBuf>,
    /// Require agents to present a client certificate signed by a CA in this PEM file (mTLS).
    #[arg(long = "tunnel.tls-client-ca-file", value_name = "FILE")]
    tls_client_ca_file: Option<PathBuf>,
    /// Accept tunnels without TLS. Only behind a TLS-terminating front end.
    #[arg(long = "tunnel.insecure-plaintext")]
    insecure_plaintext: bool,
    #[command(flatten)]
    keepalive: KeepaliveArgs,
    /// Where the self-signed certificate and the agents listed in service discovery are kept
    /// [default: data].
    #[arg(long = "data-dir", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Agent credentials: lines "<agent-id glob> sha256:<hex of token>".
    #[arg(long = "auth.tokens-file", value_name = "FILE")]
    tokens_file: Option<PathBuf>,
    /// Drain time for in-flight scrapes on SIGTERM [default: 15s].
    #[arg(long = "shutdown.grace-period", value_name = "DURATION")]
    grace: Option<Dur>,
}

impl GatewayArgs {
    fn section(&self) -> GatewaySection {
        let mut s = GatewaySection::default();
        set(&mut s.web.listen_address, &self.web_listen_address);
        set(
            &mut s.web.scrape_timeout_default,
            &self.scrape_timeout_default,
        );
        set(&mut s.web.scrape_timeout_max, &self.scrape_timeout_max);
        set(
            &mut s.web.scrape_timeout_margin,
            &self.scrape_timeout_margin,
        );
        set(&mut s.web.max_scrape_bytes, &self.max_scrape_bytes);
        s.web.config_file = self.web_config_file.clone();
        set(&mut s.web.sd_keep_disconnected, &self.sd_keep_disconnected);
        set(&mut s.tunnel.listen_address, &self.tunnel_listen_address);
        s.tunnel.tls_cert_file = self.tls_cert_file.clone();
        s.tunnel.tls_key_file = self.tls_key_file.clone();
        s.tunnel.tls_client_ca_file = self.tls_client_ca_file.clone();
        s.tunnel.insecure_plaintext = self.insecure_plaintext;
        set(&mut s.tunnel.keepalive_interval, &self.keepalive.interval);
        set(&mut s.tunnel.keepalive_timeout, &self.keepalive.timeout);
        s.data_dir = self.data_dir.clone();
        s.auth.tokens_file = self.tokens_file.clone();
        set(&mut s.shutdown_grace_period, &self.grace);
        s
    }
}

#[derive(Debug, Args)]
struct AgentArgs {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    geo: GeoArgs,
    /// The gateway's tunnel address, https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    gateway: Option<String>,
    /// The id to claim [default: this host's FQDN, as hostname --fqdn prints it].
    #[arg(long = "agent-id", value_name = "ID")]
    agent_id: Option<String>,
    /// File holding the token (else the FERRY_TOKEN environment variable).
    #[arg(long = "token-file", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// HTTP CONNECT proxy to reach the gateway through [default: $HTTPS_PROXY].
    #[arg(long = "proxy-url", value_name = "URL")]
    proxy_url: Option<String>,
    /// Trust only CAs in this PEM file for the gateway.
    #[arg(long = "tunnel.ca-file", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Trust exactly the gateway certificate with this fingerprint (sha256:HEX); repeat it to
    /// accept any of several while the gateway's certificate is replaced.
    #[arg(long = "tunnel.fingerprint", value_name = "sha256:HEX")]
    fingerprint: Vec<String>,
    /// Client certificate for the tunnel (mTLS).
    #[arg(long = "tunnel.cert-file", value_name = "FILE")]
    cert_file: Option<PathBuf>,
    /// Client key for the tunnel.
    #[arg(long = "tunnel.key-file", value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Name to verify the gateway certificate against [default: host of --gateway].
    #[arg(long = "tunnel.server-name", value_name = "NAME")]
    server_name: Option<String>,
    /// Dial an http:// gateway without TLS. Only for TLS-terminating front ends.
    #[arg(long = "tunnel.insecure-plaintext")]
    insecure_plaintext: bool,
    #[command(flatten)]
    keepalive: KeepaliveArgs,
    /// A target this agent serves, NAME=URL (repeatable).
    #[arg(long = "target", value_name = "NAME=URL", value_parser = TargetSection::parse_flag)]
    targets: Vec<TargetSection>,
    /// A label for every target of this agent, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label_flag)]
    labels: Vec<(String, String)>,
    /// Serve the agent's own /metrics and health endpoints locally on ADDR.
    #[arg(long = "web.listen-address", value_name = "ADDR")]
    web_listen_address: Option<String>,
    /// Drain time for in-flight scrapes on SIGTERM [default: 15s].
    #[arg(long = "shutdown.grace-period", value_name = "DURATION")]
    grace: Option<Dur>,
    #[command(flatten)]
    collector: CollectorArgs,
}

impl AgentArgs {
    /// The section these flags describe; a label given twice is recorded in `errs`, as a key
    /// given twice in the file is an error there.
    fn section(&self, errs: &mut ConfigErrors) -> AgentSection {
        let mut s = AgentSection {
            gateway: self.gateway.clone(),
            agent_id: self.agent_id.clone(),
            token_file: self.token_file.clone(),
            proxy_url: self.proxy_url.clone(),
            targets: self.targets.clone(),
            ..AgentSection::default()
        };
        for (key, value) in &self.labels {
            if let Some(first) = s.labels.insert(key.clone(), value.clone()) {
                errs.push(
                    format!("agent.labels.{key}"),
                    format!("{key:?} is given twice ({key}={first}, then {key}={value})"),
                );
            }
        }
        let t = &mut s.tunnel;
        t.ca_file = self.ca_file.clone();
        t.fingerprint = self.fingerprint.clone();
        t.cert_file = self.cert_file.clone();
        t.key_file = self.key_file.clone();
        t.server_name = self.server_name.clone();
        t.insecure_plaintext = self.insecure_plaintext;
        set(&mut t.keepalive_interval, &self.keepalive.interval);
        set(&mut t.keepalive_timeout, &self.keepalive.timeout);
        s.web.listen_address = self.web_listen_address.clone();
        set(&mut s.shutdown_grace_period, &self.grace);
        s.collector = self.collector.section();
        s
    }
}

#[derive(Debug, Args)]
struct ExporterArgs {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    geo: GeoArgs,
    /// Where to serve /metrics [default: :9300].
    #[arg(long = "web.listen-address", value_name = "ADDR")]
    web_listen_address: Option<String>,
    #[command(flatten)]
    collector: CollectorArgs,
}

impl ExporterArgs {
    fn section(&self) -> crate::config::ExporterSection {
        let mut s = crate::config::ExporterSection::default();
        set(&mut s.web.listen_address, &self.web_listen_address);
        s.collector = self.collector.section();
        s
    }
}

#[derive(Debug, Args)]
struct EgressArgs {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    geo: GeoArgs,
    /// Where clients connect [default: 127.0.0.1:9530].
    #[arg(long = "web.listen-address", value_name = "ADDR")]
    web_listen_address: Option<String>,
    /// A client network allowed to use the proxy, CIDR (repeatable) [default: loopback only].
    #[arg(long = "allow-client", value_name = "CIDR")]
    allow_clients: Vec<String>,
    /// An allowed destination, HOST[:PORTS] or CIDR[:PORTS] (repeatable); default deny.
    #[arg(long = "allow-upstream", value_name = "RULE")]
    allow_upstreams: Vec<String>,
    /// Client credentials: lines "<name glob> sha256:<hex of secret>" (Proxy-Authorization Basic or Bearer).
    #[arg(long = "auth.credentials-file", value_name = "FILE")]
    credentials_file: Option<PathBuf>,
    /// Connections at once from one client address [default: 256].
    #[arg(long = "max-connections-per-client", value_name = "N")]
    max_connections_per_client: Option<usize>,
    /// Time for a request head once begun, and for a new connection's first byte [default: 10s].
    #[arg(long = "header-read-timeout", value_name = "DURATION")]
    header_read_timeout: Option<Dur>,
    /// A kept-alive client connection idle this long is closed [default: 120s].
    #[arg(long = "idle-timeout", value_name = "DURATION")]
    idle_timeout: Option<Dur>,
    /// Time for the upstream's response [default: 30s].
    #[arg(long = "upstream-timeout", value_name = "DURATION")]
    upstream_timeout: Option<Dur>,
    /// Drain time for in-flight requests on SIGTERM [default: 15s].
    #[arg(long = "shutdown.grace-period", value_name = "DURATION")]
    grace: Option<Dur>,
}

impl EgressArgs {
    fn section(&self) -> EgressSection {
        let mut s = EgressSection {
            allow_clients: self.allow_clients.clone(),
            allow_upstreams: self.allow_upstreams.clone(),
            ..EgressSection::default()
        };
        set(&mut s.web.listen_address, &self.web_listen_address);
        s.auth.credentials_file = self.credentials_file.clone();
        set(
            &mut s.max_connections_per_client,
            &self.max_connections_per_client,
        );
        set(&mut s.header_read_timeout, &self.header_read_timeout);
        set(&mut s.idle_timeout, &self.idle_timeout);
        set(&mut s.upstream_timeout, &self.upstream_timeout);
        set(&mut s.shutdown_grace_period, &self.grace);
        s
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    log: LogArgs,
    /// The YAML configuration file.
    #[arg(long = "config.file", value_name = "FILE")]
    config_file: PathBuf,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The YAML configuration file.
    file: PathBuf,
}

fn set<T: Clone>(field: &mut T, flag: &Option<T>) {
    if let Some(v) = flag {
        *field = v.clone();
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Parses the process's arguments and runs the command; the whole of `main`.
pub fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => match config_file_hint(&e, args.get(1).and_then(|a| a.to_str())) {
            Some(hint) => {
                eprintln!("error: {hint}");
                return ExitCode::from(EXIT_CONFIG);
            }
            None => e.exit(),
        },
    };
    // Before the runtime's threads exist: each chooses its arena at its first allocation.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if match &cli.command {
        Command::Gateway(_) | Command::Agent(_) | Command::Exporter(_) => true,
        Command::Quickstart(_) => true,
        Command::Run(args) => !malloc_arenas::file_runs_egress(&args.config_file),
        Command::Egress(_) | Command::Token(_) | Command::CheckConfig(_) => false,
    } {
        malloc_arenas::limit();
    }
    match cli.command {
        Command::Token(TokenCommand::New { agent_id }) => token_new(&agent_id),
        Command::CheckConfig(args) => check_config(&args.file),
        Command::Gateway(args) => run_flags(&args.log, &args.geo, |f, _| {
            f.gateway = Some(args.section());
        }),
        Command::Agent(args) => run_flags(&args.log, &args.geo, |f, errs| {
            f.agent = Some(args.section(errs));
        }),
        Command::Egress(args) => run_flags(&args.log, &args.geo, |f, _| {
            f.egress = Some(args.section());
        }),
        Command::Exporter(args) => run_flags(&args.log, &args.geo, |f, _| {
            f.exporter = Some(args.section());
        }),
        Command::Run(args) => {
            let log = &args.log;
            let adjust = |f: &mut FileConfig| f.log = log.apply(f.log.clone());
            let load = || FileConfig::load_validated(&args.config_file, &env, adjust);
            run::run(load, Some(args.config_file.clone()))
        }
        Command::Quickstart(args) => crate::quickstart::main(args),
    }
}

/// Runs one role configured by flags: they fill the same structs as the file, one validation.
/// What the structs cannot hold (a flag repeated where the file has one key) `role` records in
/// the errors, reported with the validation's.
fn run_flags(
    log: &LogArgs,
    geo: &GeoArgs,
    role: impl FnOnce(&mut FileConfig, &mut ConfigErrors),
) -> ExitCode {
    let mut file = FileConfig {
        log: log.apply(LogSection::default()),
        geoip: geo.section(),
        ..FileConfig::default()
    };
    let mut errs = ConfigErrors::new("flags");
    role(&mut file, &mut errs);
    run::run(|| file.validate_after(errs, &env), None)
}

/// The config file given the way another command takes it: `ferry gateway --config.file F` (clap
/// would suggest `--web.config.file`, a different file format, when the user wants `ferry run`),
/// `ferry check-config --config.file F` (a positional there) and `ferry run F` (a flag there).
fn config_file_hint(e: &clap::Error, command: Option<&str>) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    match command {
        Some("check-config") if arg.starts_with("--config.file") => Some(
            "`ferry check-config` takes the file as its argument, without --config.file: ferry check-config FILE".into(),
        ),
        Some("run") if !arg.starts_with('-') => Some(format!(
            "`ferry run` takes the file with --config.file: ferry run --config.file {arg}"
        )),
        _ if arg.starts_with("--config.file") => Some(
            "--config.file is an option of `ferry run`: ferry run --config.file FILE runs every role the file configures".into(),
        ),
        _ => None,
    }
}

/// Prints the token and its line on stdout (what a script keeps) and the advice on stderr. The
/// line goes through the tokens-file parser first, so it is never one the gateway would refuse.
fn token_new(glob: &str) -> ExitCode {
    let (token, hash) = crate::auth::new_token();
    let line = format!("{glob} {hash}");
    // A line the parser accepts may still hold no credential (a `#` glob makes it a comment).
    let parsed = TokensFile::parse(&line).and_then(|file| match file.len() {
        1 => Ok(file),
        _ => Err((1, "the line would not be read as one credential".to_owned())),
    });
    let file = match parsed {
        Ok(file) => file,
        Err((_, reason)) => {
            let reason = if glob.trim().is_empty() {
                "an agent id glob is required (e.g. 'node-*', or '*' for any id)".to_owned()
            } else if glob.split_whitespace().nth(1).is_some() {
                format!("{glob:?} holds whitespace: a glob is one word (e.g. 'node-*')")
            } else if glob.trim_start().starts_with('#') {
                format!("{glob:?} starts with '#': the tokens file reads that line as a comment")
            } else if glob.contains('#') {
                format!(
                    "{glob:?} holds '#': the tokens file reads the rest of the line as a comment"
                )
            } else {
                reason
            };
            eprintln!("ferry token new: --agent-id: {reason}");
            return ExitCode::from(2);
        }
    };
    // A closed stdout (`| head -0`) is an error to report, not a panic.
    if writeln!(
        std::io::stdout(),
        "token:            {token}\ntokens-file line: {line}"
    )
    .is_err()
    {
        return ExitCode::FAILURE;
    }
    eprintln!();
    eprintln!("Give the token to the agent in a file (--token-file) or FERRY_TOKEN; add the line to the gateway's --auth.tokens-file.");
    if glob == "*" {
        eprintln!("This line's glob is '*': the token may claim any agent id. For one agent or a group, make it with --agent-id (e.g. --agent-id 'node-*').");
    }
    // The egress proxy checks a bearer token as the name `bearer`: say so when this line's glob
    // does not match it, rather than offer a scheme the proxy will answer with 407.
    if file.authorize(&token, "bearer").is_ok() {
        eprintln!("For an egress client: add the line to the proxy's --auth.credentials-file; the client sends the token as Proxy-Authorization: Bearer, or as the password of Basic with a name the glob matches.");
    } else {
        eprintln!("For an egress client: add the line to the proxy's --auth.credentials-file; the client sends the token as the password of Proxy-Authorization: Basic, with a name the glob matches (Bearer is checked as the name \"bearer\", which {glob:?} does not match).");
    }
    ExitCode::SUCCESS
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let origin = path.display().to_string();
    match FileConfig::load_validated(path, &env, |_| {}) {
        Ok(cfg) => {
            let mut roles = Vec::new();
            if cfg.gateway.is_some() {
                roles.push("gateway");
            }
            if cfg.agent.is_some() {
                roles.push("agent");
            }
            if cfg.egress.is_some() {
                roles.push("egress");
            }
            if cfg.exporter.is_some() {
                roles.push("exporter");
            }
            for warning in warnings(&cfg).into_iter().chain(client_cert_warnings(&cfg)) {
                eprintln!("{origin}: warning: {warning}");
            }
            match writeln!(std::io::stdout(), "{origin}: OK ({})", roles.join(", ")) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Err(errs) => config_failed(&errs),
    }
}

/// Client certificates a peer refuses for their dates: the roles warn about them when they
/// load them (at start and on reload), `check-config` with these lines.
fn client_cert_warnings(config: &RunConfig) -> Vec<String> {
    use crate::tunnel::tls_cert::LeafInfo;
    fn client_cert(tls: Option<&crate::tunnel::tls_client::ClientTls>) -> Option<&std::path::Path> {
        tls.and_then(|t| t.client_cert.as_ref())
            .map(|(cert, _)| cert.as_path())
    }
    let now = std::time::SystemTime::now();
    let mut certs: Vec<(String, &std::path::Path, String)> = Vec::new();
    if let Some(a) = &config.agent {
        if let Some(cert) = client_cert(a.gateway.tls.as_ref()) {
            certs.push((
                "agent.tunnel.cert_file".into(),
                cert,
                "the gateway refuses".into(),
            ));
        }
        for (i, t) in a.targets.iter().enumerate() {
            if let Some(cert) = client_cert(t.tls.as_ref()) {
                let refused_by = format!("target {:?} refuses", t.name);
                certs.push((
                    format!("agent.targets[{i}].tls.cert_file"),
                    cert,
                    refused_by,
                ));
            }
        }
    }
    if let Some(e) = &config.egress {
        for (i, r) in e.rules.iter().enumerate() {
            if let Some(cert) = client_cert(r.tls_upgrade.as_ref()) {
                let field = format!("egress.rules[{i}].tls_upgrade.cert_file");
                certs.push((field, cert, "upstreams refuse".into()));
            }
        }
    }
    certs
        .into_iter()
        .filter_map(|(field, cert, refused_by)| {
            LeafInfo::client_problem(cert, now, &refused_by).map(|p| format!("{field}: {p}"))
        })
        .collect()
}

/// What is valid but leaves a role useless: printed by `check-config`, logged at start.
fn warnings(config: &RunConfig) -> Vec<String> {
    let mut out = Vec::new();
    let empty =
        |path: &std::path::Path, kind| TokensFile::load_as(path, kind).is_ok_and(|f| f.is_empty());
    if let Some(g) = config
        .gateway
        .as_ref()
        .filter(|g| empty(&g.tokens_file, TOKENS_FILE))
    {
        out.push(format!(
            "tokens file {} holds no credentials: no agent can connect (add lines made with `ferry token new`)",
            g.tokens_file.display()
        ));
    }
    if let Some(path) = config
        .egress
        .as_ref()
        .and_then(|e| e.credentials_file.as_ref())
    {
        if empty(path, CREDENTIALS_FILE) {
            out.push(format!(
                "credentials file {} holds no credentials: every proxied request is refused (407)",
                path.display()
            ));
        }
    }
    if config.egress.as_ref().is_some_and(|e| e.rules.is_empty()) {
        out.push(
            "egress has no rules (rules: or allow_upstreams:): it refuses every request".to_owned(),
        );
    }
    out.extend(writable_by_all(&credential_files(config)));
    // Reloads warn about these themselves (`TokensFile::reload_as`).
    for (kind, path) in credential_files(config) {
        if let Ok(file) = TokensFile::load_as(&path, kind) {
            out.extend(file.unmatchable_lines(&path));
        }
    }
    if let Some(path) = config.agent.as_ref().and_then(|a| a.token_file.as_ref()) {
        out.extend(readable_by_others(path));
        // Both set, the file wins: a token put in the variable would be silently not used.
        if env(crate::config::TOKEN_ENV).is_some() {
            out.push(format!(
                "{} is ignored: the agent's token comes from the token file {} (unset one of them)",
                crate::config::TOKEN_ENV,
                path.display()
            ));
        }
    }
    out
}

/// The files of `config` that hold credentials (hashes), with what each is called in messages.
fn credential_files(config: &RunConfig) -> Vec<(&'static str, PathBuf)> {
    let gateway = config
        .gateway
        .as_ref()
        .map(|g| (TOKENS_FILE, g.tokens_file.clone()));
    let egress = config
        .egress
        .as_ref()
        .and_then(|e| e.credentials_file.clone())
        .map(|p| (CREDENTIALS_FILE, p));
    gateway.into_iter().chain(egress).collect()
}

/// A warning for each of `files` that every user may write. Hashes only, so readable by all is
/// fine; writable by all lets any local user add a credential.
fn writable_by_all(files: &[(&'static str, PathBuf)]) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    files
        .iter()
        .filter(|(_, path)| {
            std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o002 != 0)
        })
        .map(|(kind, path)| {
            format!(
                "{kind} {} is writable by every user: anyone on this host can add a credential (chmod o-w)",
                path.display()
            )
        })
        .collect()
}

/// A warning if the agent's token file `path` may be read by users other than its owner. Unlike
/// the gateway's hashes, the token itself is the secret: whoever reads it connects as the agent.
fn readable_by_others(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then(|| {
        format!(
            "token file {} is readable by users other than its owner (mode {mode:04o}): whoever reads it can connect as this agent (chmod 600)",
            path.display()
        )
    })
}

fn config_failed(errs: &ConfigErrors) -> ExitCode {
    eprintln!("{errs}");
    ExitCode::from(EXIT_CONFIG)
}
