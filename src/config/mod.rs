//! Configuration: serde structs for the YAML file (and the flags, which fill the same structs),
//! validated once into runtime types. Validation reports every error at once, each with the
//! field path it concerns; nothing downstream unwraps an `Option` of the file format.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[cfg(feature = "agent")]
mod agent;
mod parse;
pub(crate) use parse::lenient;
#[cfg(any(feature = "agent", feature = "egress"))]
pub(crate) use parse::lenient_opt;
#[cfg(feature = "egress")]
mod egress;
#[cfg(feature = "gateway")]
mod gateway;

#[cfg(feature = "agent")]
pub use agent::{
    parse_label_flag, read_token_file, AgentConfig, AgentSection, AgentTunnelSection,
    AgentWebSection, BackoffConfig, GatewayEndpoint, ProxyExemption, ReconnectSection, Target,
    TargetSection, TargetTlsSection, SELF_TARGET, TOKEN_ENV,
};
#[cfg(feature = "egress")]
pub use egress::{
    EgressAuthSection, EgressConfig, EgressSection, EgressWebSection, Rule, RuleSection,
    TlsUpgradeSection, ValidateSection,
};
#[cfg(feature = "gateway")]
pub use gateway::{
    AuthSection, GatewayConfig, GatewaySection, GatewayTls, GatewayTunnelSection,
    GatewayWebSection, ScrapeLimits,
};

/// One problem in the configuration: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field, as written in the YAML file (`agent.targets[0].url`).
    pub field: String,
    /// What is wrong, one line.
    pub message: String,
}

/// How [`ConfigErrors::push_env`] marks a [`ConfigError::field`] as an environment variable.
pub const ENV_FIELD_PREFIX: &str = "$";

/// Every problem found in one configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigErrors {
    /// Where the configuration came from: a file name, or "flags".
    pub origin: String,
    /// The problems, in the order found.
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    /// An empty collection for configuration read from `origin`.
    pub fn new(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            errors: Vec::new(),
        }
    }

    /// Records a problem with `field`.
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Records a problem with the value of the environment variable `var`: it is reported under
    /// the variable's name, not under a field or flag the user never set.
    pub fn push_env(&mut self, var: &str, message: impl Into<String>) {
        self.push(format!("{ENV_FIELD_PREFIX}{var}"), message);
    }

    /// `Ok(value)` when nothing was recorded, else all the errors.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }

    /// How a message names another setting, `field` (`agent.tunnel.ca_file`), to the user: the
    /// flag (`--tunnel.ca-file`) when the configuration came from flags, else the field as
    /// written in its section of the file (`tunnel.ca_file`).
    pub fn setting(&self, field: &str) -> String {
        if self.origin == "flags" {
            flag_name(field)
        } else {
            below_role(field).to_owned()
        }
    }

    /// Records the error of `result` under `field` and returns its value, if any.
    pub fn check<T, E: fmt::Display>(&mut self, field: &str, result: Result<T, E>) -> Option<T> {
        result.map_err(|e| self.push(field, e.to_string())).ok()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if let Some(var) = e.field.strip_prefix(ENV_FIELD_PREFIX) {
                write!(f, "environment variable {var}: {}", e.message)?;
            } else if self.origin == "flags" {
                write!(f, "invalid flag {}: {}", flag_name(&e.field), e.message)?;
            } else if e.field.is_empty() {
                write!(f, "{}: {}", self.origin, e.message)?;
            } else {
                write!(f, "{}: {}: {}", self.origin, e.field, e.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The flag that sets a field: flags mirror the YAML paths below the role section
/// (`gateway.tunnel.tls_cert_file` ↔ `--tunnel.tls-cert-file`).
pub fn flag_name(field: &str) -> String {
    let below_role = below_role(field);
    let below_role = below_role.split('[').next().unwrap_or(below_role);
    // A label's field is `labels.<name>`; its flag is `--label`.
    let below_role = match below_role.split_once('.') {
        Some(("labels", _)) => "labels",
        _ => below_role,
    };
    let flag = match below_role {
        "targets" => "target",
        "labels" => "label",
        "allow_clients" => "allow-client",
        "web.config_file" => "web.config.file",
        "collector.connections_exclude" => "collector.connections-exclude",
        "allow_upstreams" => "allow-upstream",
        "shutdown_grace_period" => "shutdown.grace-period",
        other => other,
    };
    format!("--{}", flag.replace('_', "-"))
}

/// `field` without its role section (`agent.tunnel.ca_file` → `tunnel.ca_file`). Process-wide
/// sections (`geoip.database`, `log.level`) keep their name: so do their flags.
fn below_role(field: &str) -> &str {
    if field.starts_with("geoip.") || field.starts_with("log.") {
        field
    } else {
        field.split_once('.').map_or(field, |(_, rest)| rest)
    }
}

/// Where logs go and how they look; the `log:` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the log section: a mapping such as {level: info}"
)]
pub struct LogSection {
    /// `error`, `warn`, `info`, `debug` or `trace` (or a tracing filter directive).
    pub level: String,
    /// Line format: `logfmt` or `json`.
    #[serde(deserialize_with = "lenient")]
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Logfmt,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `key=value` pairs, like Prometheus.
    #[default]
    Logfmt,
    /// One JSON object per line.
    Json,
}

/// The whole YAML file: any combination of role sections.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of sections such as gateway:, agent:, egress:"
)]
pub struct FileConfig {
    /// Logging for the whole process.
    #[serde(default)]
    pub log: LogSection,
    /// The gateway role, if this process runs one.
    #[cfg(feature = "gateway")]
    #[serde(default, deserialize_with = "present")]
    pub gateway: Option<GatewaySection>,
    /// The agent role, if this process runs one.
    #[cfg(feature = "agent")]
    #[serde(default, deserialize_with = "present")]
    pub agent: Option<AgentSection>,
    /// The egress role, if this process runs one.
    #[cfg(feature = "egress")]
    #[serde(default, deserialize_with = "present")]
    pub egress: Option<EgressSection>,
    /// The standalone host exporter, if this process runs one.
    #[cfg(feature = "geo")]
    #[serde(default, deserialize_with = "present")]
    pub exporter: Option<ExporterSection>,
    /// The country database every role uses.
    #[cfg(feature = "geo")]
    #[serde(default)]
    pub geoip: GeoipSection,
}

/// A role section that is written is there, even empty (`egress:` alone, or everything under it
/// commented out): it runs with its defaults, and validation says what it lacks, rather than
/// "no role configured" about a section the user can see.
#[cfg_attr(
    not(any(
        feature = "gateway",
        feature = "agent",
        feature = "egress",
        feature = "geo"
    )),
    allow(dead_code)
)]
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(d).map(|section| Some(section.unwrap_or_default()))
}

/// `collector:` of the agent and the exporter.
#[cfg(feature = "geo")]
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the collector settings: a mapping such as {connections: true}"
)]
pub struct CollectorSection {
    /// Export the host's TCP connections by state, direction and remote country.
    #[serde(deserialize_with = "lenient")]
    pub connections: bool,
    /// Remote networks (CIDR) left out of the connection counts.
    pub connections_exclude: Vec<String>,
}

#[cfg(feature = "geo")]
impl CollectorSection {
    /// The excluded networks when the connection collector is on, `None` when it is off.
    pub fn validate(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<Vec<ipnet::IpNet>> {
        if !self.connections {
            if !self.connections_exclude.is_empty() {
                let message = format!(
                    "set, but the connection collector is off ({})",
                    errs.setting(&format!("{prefix}.connections"))
                );
                errs.push(format!("{prefix}.connections_exclude"), message);
            }
            return None;
        }
        Some(parse_cidrs(
            &self.connections_exclude,
            &format!("{prefix}.connections_exclude"),
            errs,
        ))
    }
}

/// `geoip:` — the MaxMind-format country database shared by every role of the process.
#[cfg(feature = "geo")]
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the geoip section: a mapping such as {database: ...}"
)]
pub struct GeoipSection {
    /// `.mmdb` file (GeoLite2/GeoIP2 Country or City, DB-IP / ip-location-db country).
    pub database: Option<PathBuf>,
    /// How often the file is checked for changes [default: 10s].
    pub reload_interval: Option<Dur>,
}

/// `exporter:` — the host connection exporter without gateway or agent.
#[cfg(feature = "geo")]
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the exporter section: a mapping of settings such as collector:"
)]
pub struct ExporterSection {
    /// Listener for `/metrics`.
    pub web: ExporterWebSection,
    /// Collectors.
    pub collector: CollectorSection,
}

#[cfg(feature = "geo")]
impl Default for ExporterSection {
    fn default() -> Self {
        Self {
            web: ExporterWebSection {
                listen_address: ":9300".into(),
            },
            collector: Default::default(),
        }
    }
}

/// `exporter.web:`.
#[cfg(feature = "geo")]
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the exporter's web settings: a mapping such as {listen_address: ...}"
)]
pub struct ExporterWebSection {
    /// Listen address [default: :9300].
    pub listen_address: String,
}

/// The validated exporter configuration.
#[cfg(feature = "geo")]
#[derive(Debug, Clone)]
pub struct ExporterConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Excluded networks of the connection collector.
    pub connections_exclude: Vec<ipnet::IpNet>,
    /// Country lookup.
    pub geo: crate::telemetry::geo::SharedGeo,
}

#[cfg(feature = "geo")]
impl ExporterSection {
    /// Validates into an [`ExporterConfig`], recording every problem under `prefix`.
    pub fn validate(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<ExporterConfig> {
        let listen = errs.check(
            &format!("{prefix}.web.listen_address"),
            parse_listen_address(&self.web.listen_address),
        );
        let collector = self
            .collector
            .validate(&format!("{prefix}.collector"), errs);
        if collector.is_none() && !self.collector.connections {
            let field = format!("{prefix}.collector.connections");
            let message = format!(
                "no collector enabled: the exporter needs {}",
                errs.setting(&field)
            );
            errs.push(field, message);
        }
        Some(ExporterConfig {
            listen: listen?,
            connections_exclude: collector?,
            geo: crate::telemetry::geo::SharedGeo::disabled(),
        })
    }
}

#[cfg(feature = "geo")]
impl GeoipSection {
    /// Opens the database, if one is configured.
    pub fn validate(&self, errs: &mut ConfigErrors) -> crate::telemetry::geo::SharedGeo {
        use crate::telemetry::geo::SharedGeo;
        // A zero interval would make the file watch spin (tokio refuses it outright); checking a
        // file's mtime more than once a second buys nothing.
        if let Some(interval) = self.reload_interval {
            let min = Dur(Duration::from_secs(1));
            interval.check_range(min, Dur::MAX, "geoip.reload_interval", errs);
        }
        let Some(path) = &self.database else {
            // As `connections_exclude` with the collector off: a setting that does nothing is
            // a mistake to point out, not to ignore.
            let refused = errs
                .errors
                .iter()
                .any(|e| e.field == "geoip.reload_interval");
            if self.reload_interval.is_some() && !refused {
                errs.push(
                    "geoip.reload_interval",
                    "set, but there is no geoip.database to check for changes: set geoip.database or remove this",
                );
            }
            return SharedGeo::disabled();
        };
        match SharedGeo::open(path) {
            Ok(geo) => match self.reload_interval {
                Some(Dur(d)) => geo.with_poll_interval(d),
                None => geo,
            },
            Err(e) => {
                errs.push("geoip.database", e.to_string());
                SharedGeo::disabled()
            }
        }
    }
}

/// Validated configuration of every role the file asks for.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Logging.
    pub log: LogSection,
    /// The gateway, if configured.
    #[cfg(feature = "gateway")]
    pub gateway: Option<GatewayConfig>,
    /// The agent, if configured.
    #[cfg(feature = "agent")]
    pub agent: Option<AgentConfig>,
    /// The egress proxy, if configured.
    #[cfg(feature = "egress")]
    pub egress: Option<EgressConfig>,
    /// The standalone exporter, if configured.
    #[cfg(feature = "geo")]
    pub exporter: Option<ExporterConfig>,
    /// The country database (disabled when none is configured).
    #[cfg(feature = "geo")]
    pub geo: crate::telemetry::geo::SharedGeo,
}

impl FileConfig {
    /// Reads and parses `path`; a syntax or shape error is reported with its line and field.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigErrors> {
        let origin = path.display().to_string();
        let text = crate::fs_util::read_regular_to_string(path).map_err(|e| {
            let mut errs = ConfigErrors::new(origin.clone());
            errs.push("", format!("cannot read: {e}"));
            errs
        })?;
        let mut file = Self::parse(&text, &origin)?;
        file.anchor_paths(path);
        Ok(file)
    }

    /// Makes the file's relative paths relative to the directory of `path`, the file itself, as
    /// Prometheus reads its own: a service started in `/` must not look for `tokens` there.
    /// Flags are not affected: theirs stay relative to the working directory.
    fn anchor_paths(&mut self, path: &Path) {
        let dir = path.parent().unwrap_or(Path::new(""));
        #[cfg(feature = "gateway")]
        if let Some(g) = &mut self.gateway {
            g.anchor_paths(dir);
        }
        #[cfg(feature = "agent")]
        if let Some(a) = &mut self.agent {
            a.anchor_paths(dir);
        }
        #[cfg(feature = "egress")]
        if let Some(e) = &mut self.egress {
            e.anchor_paths(dir);
        }
        #[cfg(feature = "geo")]
        anchor(&mut self.geoip.database, dir);
        let _ = dir;
    }

    /// Parses YAML text; `origin` names it in errors. Every value of the wrong type or format is
    /// reported, each with its field path and line.
    pub fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigErrors> {
        parse::parse(text, origin)
    }

    /// Reads, parses and validates `path`, with `adjust` (flags on top of the file) applied
    /// before validation: every problem of the file at once, wrong types and bad values alike.
    pub fn load_validated(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        adjust: impl FnOnce(&mut FileConfig),
    ) -> Result<RunConfig, ConfigErrors> {
        let origin = path.display().to_string();
        let text = crate::fs_util::read_regular_to_string(path).map_err(|e| {
            let mut errs = ConfigErrors::new(origin.clone());
            errs.push("", format!("cannot read: {e}"));
            errs
        })?;
        let (file, errs) = parse::parse_recovering(&text, &origin);
        let Some(mut file) = file else {
            return Err(errs);
        };
        file.anchor_paths(path);
        adjust(&mut file);
        file.validate_after(errs, env)
    }

    /// Validates every section, collecting all errors; `env` looks up environment variables.
    pub fn validate(
        &self,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<RunConfig, ConfigErrors> {
        self.validate_after(ConfigErrors::new(origin), env)
    }

    /// [`FileConfig::validate`], reporting after the problems already in `errs` (whose origin
    /// it takes).
    pub fn validate_after(
        &self,
        mut errs: ConfigErrors,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<RunConfig, ConfigErrors> {
        // A value that could not be read holds its default here: what validation says about
        // that field is about the default, not about what the file says (`connections: "true"`
        // is not also "no collector enabled").
        let failed: Vec<String> = errs.errors.iter().map(|e| e.field.clone()).collect();
        let read = errs.errors.len();
        validate_log(&self.log, &mut errs);
        #[cfg(feature = "gateway")]
        let gateway = self
            .gateway
            .as_ref()
            .map(|g| g.validate("gateway", &mut errs));
        #[cfg(feature = "agent")]
        let agent = self
            .agent
            .as_ref()
            .map(|a| a.validate("agent", env, &mut errs));
        #[cfg(feature = "egress")]
        let egress = self
            .egress
            .as_ref()
            .map(|e| e.validate("egress", &mut errs));
        #[cfg(feature = "geo")]
        let exporter = self
            .exporter
            .as_ref()
            .map(|e| e.validate("exporter", &mut errs));
        #[cfg(feature = "geo")]
        let geo = self.geoip.validate(&mut errs);
        check_shared_listeners(&self.listen_addresses(), &mut errs);
        let _ = env;
        #[allow(unused_mut)] // stays false in a build without roles
        let mut any_role = false;
        #[cfg(feature = "gateway")]
        {
            any_role |= self.gateway.is_some();
        }
        #[cfg(feature = "agent")]
        {
            any_role |= self.agent.is_some();
        }
        #[cfg(feature = "egress")]
        {
            any_role |= self.egress.is_some();
        }
        #[cfg(feature = "geo")]
        {
            any_role |= self.exporter.is_some();
        }
        if !any_role {
            errs.push(
                "",
                "no role configured: add a gateway:, agent:, egress: or exporter: section",
            );
        }
        let mut index = 0;
        errs.errors.retain(|e| {
            index += 1;
            index <= read || !failed.contains(&e.field)
        });
        errs.finish(())?;
        #[allow(unused_mut)]
        let mut run = RunConfig {
            log: self.log.clone(),
            #[cfg(feature = "gateway")]
            gateway: gateway.flatten(),
            #[cfg(feature = "agent")]
            agent: agent.flatten(),
            #[cfg(feature = "egress")]
            egress: egress.flatten(),
            #[cfg(feature = "geo")]
            exporter: exporter.flatten(),
            #[cfg(feature = "geo")]
            geo: geo.clone(),
        };
        #[cfg(feature = "gateway")]
        if let Some(g) = &mut run.gateway {
            g.geo = geo.clone();
        }
        #[cfg(feature = "agent")]
        if let Some(a) = &mut run.agent {
            a.geo = geo.clone();
        }
        #[cfg(feature = "egress")]
        if let Some(e) = &mut run.egress {
            e.geo = geo.clone();
        }
        #[cfg(feature = "geo")]
        if let Some(e) = &mut run.exporter {
            e.geo = geo.clone();
        }
        Ok(run)
    }
}

impl FileConfig {
    /// Every listener of every role, as `(field, address as written)`.
    fn listen_addresses(&self) -> Vec<(&'static str, &str)> {
        #[allow(unused_mut)] // stays empty in a build without roles
        let mut out = Vec::new();
        #[cfg(feature = "gateway")]
        if let Some(g) = &self.gateway {
            out.push(("gateway.web.listen_address", g.web.listen_address.as_str()));
            out.push((
                "gateway.tunnel.listen_address",
                g.tunnel.listen_address.as_str(),
            ));
        }
        #[cfg(feature = "agent")]
        if let Some(addr) = self
            .agent
            .as_ref()
            .and_then(|a| a.web.listen_address.as_deref())
        {
            out.push(("agent.web.listen_address", addr));
        }
        #[cfg(feature = "egress")]
        if let Some(e) = &self.egress {
            out.push(("egress.web.listen_address", e.web.listen_address.as_str()));
        }
        #[cfg(feature = "geo")]
        if let Some(e) = &self.exporter {
            out.push(("exporter.web.listen_address", e.web.listen_address.as_str()));
        }
        out
    }
}

/// Records an error for each listener whose address another listener of the same process
/// already takes: the second bind would fail at start, after check-config said OK, and a
/// service manager would restart the process forever. Addresses that do not parse are
/// reported by their role; port 0 (any free port) never collides.
fn check_shared_listeners(listeners: &[(&'static str, &str)], errs: &mut ConfigErrors) {
    let parsed: Vec<(&str, SocketAddr)> = listeners
        .iter()
        .filter_map(|(field, raw)| Some((*field, parse_listen_address(raw).ok()?)))
        .filter(|(_, addr)| addr.port() != 0)
        .collect();
    for (i, (field, addr)) in parsed.iter().enumerate() {
        let taken: Vec<String> = parsed[..i]
            .iter()
            .filter(|(_, other)| listeners_collide(*addr, *other))
            .map(|(other, _)| other_setting(errs, field, other))
            .collect();
        if !taken.is_empty() {
            let message = format!(
                "{addr} is already taken by {}: each listener needs an address of its own",
                taken.join(" and ")
            );
            errs.push(*field, message);
        }
    }
}

/// Whether binding both `a` and `b` fails: the same address and port, or a wildcard address
/// and one it covers on the same port (`[::]`, which `:port` means, covers IPv4 as well).
fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wild: std::net::IpAddr, ip: std::net::IpAddr| {
        wild.is_unspecified() && (wild.is_ipv6() || ip.is_ipv4())
    };
    a.port() == b.port() && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

/// How a message about `field` names `other`: as [`ConfigErrors::setting`] within one role,
/// with its whole path across roles (`web.listen_address` alone would not say whose).
fn other_setting(errs: &ConfigErrors, field: &str, other: &str) -> String {
    let role = |f: &str| f.split('.').next().unwrap_or("").to_owned();
    if role(field) == role(other) {
        errs.setting(other)
    } else {
        other.to_owned()
    }
}

fn validate_log(log: &LogSection, errs: &mut ConfigErrors) {
    const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
    if LEVELS.contains(&log.level.as_str()) {
        return;
    }
    if !log.level.contains('=') {
        errs.push(
            "log.level",
            format!("{:?} is not one of {}", log.level, LEVELS.join(", ")),
        );
        return;
    }
    // Filter directives (`info,ferry::agent=debug`) are read by tracing-subscriber, which only
    // the binary has.
    #[cfg(feature = "cli")]
    if let Err(e) = crate::cli::log_filter(&log.level) {
        errs.push("log.level", e);
    }
}

/// `dir` joined with `path` when `path` is relative (and not empty: that stays an error of its
/// own, not a directory).
#[cfg_attr(
    not(any(
        feature = "gateway",
        feature = "agent",
        feature = "egress",
        feature = "geo"
    )),
    allow(dead_code)
)]
pub(crate) fn anchor(path: &mut Option<PathBuf>, dir: &Path) {
    if let Some(p) = path {
        if p.is_relative() && !p.as_os_str().is_empty() {
            *p = dir.join(&*p);
        }
    }
}

/// A duration written as Prometheus writes them: whole numbers with a unit each (`ms`, `s`, `m`,
/// `h`, `d`, `w`, `y` = 365d), several units largest first (`1h30m`), or `0`. Flags and the file
/// are read by the same [`Dur::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

/// The units of [`Dur`], largest first, with their length in milliseconds.
const DUR_UNITS: [(&str, u64); 7] = [
    ("y", 365 * 24 * 3600 * 1000),
    ("w", 7 * 24 * 3600 * 1000),
    ("d", 24 * 3600 * 1000),
    ("h", 3600 * 1000),
    ("m", 60 * 1000),
    ("s", 1000),
    ("ms", 1),
];

impl Dur {
    /// The longest duration any setting takes: one year (365 days). Every `Instant + setting`
    /// stays far from overflowing.
    pub const MAX: Dur = Dur(Duration::from_secs(365 * 24 * 3600));
    /// Zero: for the settings where it means "not at all" (no grace period, no margin).
    pub const ZERO: Dur = Dur(Duration::ZERO);
    /// The shortest timeout, interval or backoff a setting takes where zero would make every
    /// attempt fail at once or repeat in a busy loop.
    pub const MIN_TIMEOUT: Dur = Dur(Duration::from_millis(100));

    /// Parses `10s`, `500ms`, `1h30m`, `2d`, `0`, as Prometheus does.
    pub fn parse(s: &str) -> Result<Dur, String> {
        let not = || {
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                format!("{s:?} is not a duration: give it a unit, e.g. {s}s")
            } else {
                format!("{s:?} is not a duration (e.g. 10s, 500ms, 1h30m: whole numbers, units ms, s, m, h, d, w, y, largest first)")
            }
        };
        if s == "0" {
            return Ok(Dur(Duration::ZERO));
        }
        let mut rest = s;
        let mut total: u128 = 0;
        // Index into DUR_UNITS of the next unit allowed: each at most once, largest first.
        let mut next_unit = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let letters = rest[digits..]
                .bytes()
                .take_while(u8::is_ascii_alphabetic)
                .count();
            let (number, unit) = (&rest[..digits], &rest[digits..digits + letters]);
            let Some(i) = DUR_UNITS.iter().position(|(u, _)| *u == unit) else {
                return Err(not());
            };
            if digits == 0 || i < next_unit {
                return Err(not());
            }
            // Digits beyond u128 are out of range anyway.
            let n: u128 = number.parse().unwrap_or(u128::MAX);
            total = total.saturating_add(n.saturating_mul(u128::from(DUR_UNITS[i].1)));
            next_unit = i + 1;
            rest = &rest[digits + letters..];
        }
        if next_unit == 0 {
            return Err(not());
        }
        match u64::try_from(total) {
            Ok(ms) => Ok(Dur(Duration::from_millis(ms))),
            Err(_) => Err(format!("{s:?} is too long: at most {}", Dur::MAX)),
        }
    }

    /// Records an error under `field` unless `min <= self <= max`; the message gives the range.
    pub(crate) fn check_range(self, min: Dur, max: Dur, field: &str, errs: &mut ConfigErrors) {
        if self.0 < min.0 || self.0 > max.0 {
            errs.push(field, format!("must be from {min} to {max}, not {self}"));
        }
    }
}

/// Checks each `(field below prefix, value, least value)` against its range, up to [`Dur::MAX`].
pub(crate) fn check_durations(prefix: &str, bounds: &[(&str, Dur, Dur)], errs: &mut ConfigErrors) {
    for (name, value, min) in bounds {
        value.check_range(*min, Dur::MAX, &format!("{prefix}.{name}"), errs);
    }
}

impl fmt::Display for Dur {
    /// As Prometheus prints durations: `1h30m`, `500ms`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, len) in DUR_UNITS {
            if ms >= len {
                write!(f, "{}{unit}", ms / len)?;
                ms %= len;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Dur::parse(s)
    }
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Parses a listen address: `host:port`, `[v6]:port`, or `:port` for every interface, IPv4 and
/// IPv6 (`[::]:port`, which Linux binds to both unless `net.ipv6.bindv6only` is set; where IPv6
/// is missing the listener falls back to IPv4), as Prometheus and node_exporter read `:port`.
pub fn parse_listen_address(s: &str) -> Result<SocketAddr, String> {
    let spelled = if let Some(port) = s.strip_prefix(':') {
        format!("[::]:{port}")
    } else {
        s.to_owned()
    };
    if let Ok(addr) = spelled.parse() {
        return Ok(addr);
    }
    spelled
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| format!("{s:?} is not a listen address (host:port or :port)"))
}

/// Parses a list of networks (`10.0.0.0/8`, `2001:db8::/32`, or a bare address as a host
/// network), recording each bad entry under `field[i]`.
#[cfg(feature = "geo")]
pub(crate) fn parse_cidrs(
    raw: &[String],
    field: &str,
    errs: &mut ConfigErrors,
) -> Vec<ipnet::IpNet> {
    let mut nets = Vec::new();
    for (i, entry) in raw.iter().enumerate() {
        let entry = entry.trim();
        let parsed = match entry.parse::<ipnet::IpNet>() {
            Ok(net) => network(net, entry),
            Err(_) => entry
                .parse::<std::net::IpAddr>()
                .map(ipnet::IpNet::from)
                .map_err(|_| format!("{entry:?} is not a CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32)")),
        };
        if let Some(net) = errs.check(&format!("{field}[{i}]"), parsed) {
            nets.push(net);
        }
    }
    nets
}

/// `net` as written, if its address is the network's own: `10.0.0.1/8` is refused rather than
/// read as `10.0.0.0/8`, since whoever wrote it may have meant `/32` or `/24`, and in an
/// allowlist the difference is a whole network let in.
#[cfg(feature = "geo")]
pub(crate) fn network(net: ipnet::IpNet, spelled: &str) -> Result<ipnet::IpNet, String> {
    if net.addr() == net.network() {
        return Ok(net);
    }
    let host = match net {
        ipnet::IpNet::V4(_) => 32,
        ipnet::IpNet::V6(_) => 128,
    };
    Err(format!(
        "{spelled:?} has host bits set: write the network {} or the one address {}/{host}",
        net.trunc(),
        net.addr()
    ))
}

/// Records an error unless `path` names a readable regular file.
pub fn check_readable(path: &Path, field: &str, errs: &mut ConfigErrors) {
    if let Err(e) = crate::fs_util::open_regular(path) {
        errs.push(field, format!("cannot read {}: {e}", path.display()));
    }
}

#[cfg(any(feature = "agent", feature = "egress"))]
/// Validates an optional certificate + key pair: both or neither, both readable.
/// `None` means invalid; `Some(None)` means not configured.
pub(crate) fn client_cert_pair(
    cert: &Option<std::path::PathBuf>,
    key: &Option<std::path::PathBuf>,
    prefix: &str,
    errs: &mut ConfigErrors,
) -> Option<Option<(std::path::PathBuf, std::path::PathBuf)>> {
    match (cert, key) {
        (None, None) => Some(None),
        (Some(c), Some(k)) => {
            check_readable(c, &format!("{prefix}.cert_file"), errs);
            check_readable(k, &format!("{prefix}.key_file"), errs);
            Some(Some((c.clone(), k.clone())))
        }
        (Some(_), None) => {
            let message = format!(
                "required when {} is set",
                errs.setting(&format!("{prefix}.cert_file"))
            );
            errs.push(format!("{prefix}.key_file"), message);
            None
        }
        (None, Some(_)) => {
            let message = format!(
                "required when {} is set",
                errs.setting(&format!("{prefix}.key_file"))
            );
            errs.push(format!("{prefix}.cert_file"), message);
            None
        }
    }
}

/// Builds the client TLS configuration `ferry run` will build from `tls` and records its error,
/// if any, under the field of the file at fault below `prefix` (`ca_file`, `cert_file`,
/// `key_file`): what `check-config` accepts, `run` can use.
#[cfg(any(feature = "agent", feature = "egress"))]
pub(crate) fn check_client_tls(
    tls: &crate::tunnel::tls_client::ClientTls,
    purpose: crate::tunnel::tls_client::Purpose,
    prefix: &str,
    errs: &mut ConfigErrors,
) {
    use crate::tunnel::tls::TlsError;
    use crate::tunnel::tls_client::ServerVerify;
    let Err(e) = crate::tunnel::tls_client::client_config(tls, purpose) else {
        return;
    };
    let ca = match &tls.verify {
        ServerVerify::CaFile(ca) => Some(ca),
        _ => None,
    };
    let field = match &e {
        TlsError::Key { .. } => "key_file",
        TlsError::Cert { path, .. } if Some(path) == ca => "ca_file",
        TlsError::Config(_) if ca.is_some() => "ca_file",
        TlsError::Cert { .. } | TlsError::Mismatch { .. } | TlsError::KeyMismatch { .. } => {
            "cert_file"
        }
        TlsError::Config(_) | TlsError::SelfSigned { .. } => {
            return errs.push(prefix, e.to_string())
        }
    };
    errs.push(format!("{prefix}.{field}"), e.to_string());
}

/// Records an error unless `name` can be sent as a TLS server name (SNI) and verified.
#[cfg(feature = "agent")]
pub(crate) fn check_server_name(name: &str, field: &str, errs: &mut ConfigErrors) {
    if rustls::pki_types::ServerName::try_from(name).is_err() {
        errs.push(
            field,
            format!("{name:?} is not a valid TLS server name (a DNS name or an IP address)"),
        );
    }
}

/// Records an error unless an agent may set a label called `name`
/// ([`crate::tunnel::label_name_problem`]).
pub fn check_label_name(name: &str, field: &str, errs: &mut ConfigErrors) {
    if let Some(problem) = crate::tunnel::label_name_problem(name) {
        errs.push(field, problem);
    }
}

/// Validates a keepalive pair under `prefix` (`gateway.tunnel`).
#[cfg(any(feature = "agent", feature = "gateway"))]
pub(crate) fn validate_keepalive(
    interval: &Dur,
    timeout: &Dur,
    prefix: &str,
    errs: &mut ConfigErrors,
) -> crate::tunnel::Keepalive {
    let bounds = [
        ("keepalive_interval", *interval, Dur::MIN_TIMEOUT),
        ("keepalive_timeout", *timeout, Dur::MIN_TIMEOUT),
    ];
    check_durations(prefix, &bounds, errs);
    crate::tunnel::Keepalive {
        interval: interval.0,
        timeout: timeout.0,
    }
}

/// The paths of the example configurations shipped in `examples/`, for tests.
pub fn example_paths() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.retain(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ferry"))
            && p.extension().is_some_and(|e| e == "yaml" || e == "yml")
    });
    paths.sort();
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_mirror_yaml_paths() {
        assert_eq!(
            flag_name("gateway.tunnel.tls_cert_file"),
            "--tunnel.tls-cert-file"
        );
        assert_eq!(flag_name("agent.targets[2].url"), "--target");
        assert_eq!(flag_name("agent.labels.bad-name"), "--label");
        assert_eq!(flag_name("agent.token_file"), "--token-file");
        assert_eq!(
            flag_name("agent.shutdown_grace_period"),
            "--shutdown.grace-period"
        );
    }

    #[test]
    fn listen_addresses_accept_prometheus_spelling() {
        assert_eq!(
            parse_listen_address(":8080").unwrap(),
            "[::]:8080".parse().unwrap()
        );
        assert_eq!(
            parse_listen_address("[::1]:0").unwrap(),
            "[::1]:0".parse().unwrap()
        );
        assert!(parse_listen_address("8080").is_err());
    }

    #[test]
    fn durations_parse_like_prometheus() {
        let day = 24 * 3600;
        for (text, secs, ms) in [
            ("0", 0, 0),
            ("0s", 0, 0),
            ("500ms", 0, 500),
            ("1m30s", 90, 0),
            ("1h30m", 5400, 0),
            ("2d", 2 * day, 0),
            ("1w", 7 * day, 0),
            // Prometheus's year is 365 days.
            ("1y", 365 * day, 0),
            ("1y1w1d1h1m1s1ms", 373 * day + 3661, 1),
        ] {
            let want = Duration::from_secs(secs) + Duration::from_millis(ms);
            assert_eq!(Dur::parse(text), Ok(Dur(want)), "{text}");
        }
        for text in [
            "", "soon", "1.5s", "1h1h", "1s1m", "1 day", "1M", "1day", "-1s", " 1s", "1s ", "s",
            "1e3s",
        ] {
            let err = Dur::parse(text).unwrap_err();
            assert_eq!(
                err,
                format!("{text:?} is not a duration (e.g. 10s, 500ms, 1h30m: whole numbers, units ms, s, m, h, d, w, y, largest first)")
            );
        }
        assert_eq!(
            Dur::parse("15").unwrap_err(),
            "\"15\" is not a duration: give it a unit, e.g. 15s"
        );
        for huge in [
            "2562047788015215h",
            "99999999999999999999999999999999999999999y",
        ] {
            assert_eq!(
                Dur::parse(huge).unwrap_err(),
                format!("{huge:?} is too long: at most 1y")
            );
        }
    }

    #[test]
    fn durations_print_as_prometheus_writes_them() {
        for text in ["0s", "500ms", "1h30m", "1y", "1y1w1d1h1m1s1ms", "2w"] {
            assert_eq!(Dur::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn a_duration_out_of_its_range_names_the_range() {
        let mut errs = ConfigErrors::new("f.yaml");
        let min = Dur::MIN_TIMEOUT;
        Dur(Duration::ZERO).check_range(min, Dur::MAX, "egress.idle_timeout", &mut errs);
        Dur(Duration::from_millis(100)).check_range(
            min,
            Dur::MAX,
            "egress.connect_timeout",
            &mut errs,
        );
        Dur::MAX.check_range(min, Dur::MAX, "egress.upstream_timeout", &mut errs);
        let too_long = Dur(Dur::MAX.0 + Duration::from_millis(1));
        too_long.check_range(
            Dur::ZERO,
            Dur::MAX,
            "egress.shutdown_grace_period",
            &mut errs,
        );
        assert_eq!(
            errs.to_string().lines().collect::<Vec<_>>(),
            [
                "f.yaml: egress.idle_timeout: must be from 100ms to 1y, not 0s",
                "f.yaml: egress.shutdown_grace_period: must be from 0s to 1y, not 1y1ms",
            ]
        );
    }

    #[cfg(feature = "cli")]
    #[test]
    fn a_log_filter_that_does_not_parse_is_refused() {
        let problem = |level: &str| {
            let mut errs = ConfigErrors::new("flags");
            let log = LogSection {
                level: level.into(),
                ..LogSection::default()
            };
            validate_log(&log, &mut errs);
            errs.errors.first().map(|e| e.message.clone())
        };
        assert_eq!(problem("debug"), None);
        assert_eq!(problem("info,ferry::agent=debug"), None);
        assert_eq!(problem("ferry=trace"), None);
        for bad in ["a=b=c", "=", "info,x=loud"] {
            let message = problem(bad).unwrap_or_default();
            assert!(
                message.starts_with(&format!(
                    "{bad:?} is not a level (error, warn, info, debug, trace) or a tracing filter"
                )),
                "{bad}: {message}"
            );
        }
        assert_eq!(
            problem("loud").as_deref(),
            Some("\"loud\" is not one of error, warn, info, debug, trace")
        );
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "***");
    }
}

#[cfg(all(test, feature = "agent", feature = "gateway"))]
mod file_tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn every_error_is_reported_at_once_with_its_field_path() {
        let yaml = r#"
log: { level: loud }
gateway:
  web: { listen_address: "nope" }
  auth: { tokens_file: /nonexistent/tokens }
  tunnel: { tls_cert_file: /nonexistent/cert.pem }
agent:
  gateway: http://gw:7443
  agent_id: "bad id"
  tunnel: { fingerprint: "sha256:zz" }
  targets:
    - { name: node, url: "http:///metrics" }
    - { name: node, url: "ftp://x/metrics" }
  labels: { "0bad": x }
"#;
        let file = FileConfig::parse(yaml, "ferry.yaml").unwrap();
        let errs = file.validate("ferry.yaml", &no_env).unwrap_err();
        let fields: Vec<&str> = errs.errors.iter().map(|e| e.field.as_str()).collect();
        for expected in [
            "log.level",
            "gateway.web.listen_address",
            "gateway.auth.tokens_file",
            "gateway.tunnel.tls_key_file",
            "agent.gateway",
            "agent.agent_id",
            "agent.token_file",
            "agent.targets[0].url",
            "agent.targets[1].url",
            "agent.labels.0bad",
        ] {
            assert!(
                fields.contains(&expected),
                "missing {expected} in {fields:?}"
            );
        }
        let text = errs.to_string();
        assert_eq!(
            text.lines().count(),
            errs.errors.len(),
            "one line per error:\n{text}"
        );
        assert!(
            text.lines().all(|l| l.starts_with("ferry.yaml: ")),
            "{text}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_location() {
        let err =
            FileConfig::parse("gateway:\n  web:\n    listen_adress: ':1'\n", "f.yaml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("listen_adress") && text.contains("line 3"),
            "{text}"
        );
    }

    #[test]
    fn a_minimal_agent_resolves_defaults_and_env() {
        let dir = tempfile::tempdir().unwrap();
        crate::tunnel::tls_server::self_signed_identity(dir.path(), &["gw".into()], None).unwrap();
        let ca = dir.path().join(crate::tunnel::tls_server::SELF_SIGNED_CERT);
        let yaml = format!(
            "agent:\n  gateway: https://gw.example.com:7443\n  agent_id: node-1\n  tunnel: {{ ca_file: {} }}\n  targets:\n    - {{ name: node, url: 'http://127.0.0.1:9100/metrics' }}\n    - {{ name: app, url: 'https://127.0.0.1:8443/m?x=1', port: 9200, tls: {{ server_name: app.internal }} }}\n",
            ca.display()
        );
        let env = |name: &str| match name {
            "FERRY_TOKEN" => Some("tok".to_owned()),
            "HTTPS_PROXY" => Some("http://user:pw@proxy:3128".to_owned()),
            _ => None,
        };
        let cfg = FileConfig::parse(&yaml, "a.yaml")
            .unwrap()
            .validate("a.yaml", &env)
            .unwrap();
        let agent = cfg.agent.unwrap();
        assert_eq!(agent.gateway.addr, "gw.example.com:7443");
        assert_eq!(agent.gateway.server_name, "gw.example.com");
        assert_eq!(agent.token.expose(), "tok");
        let proxy = agent.proxy.unwrap();
        assert_eq!(proxy.addr, "proxy:3128");
        assert_eq!(
            proxy.authorization.as_ref().map(Secret::expose),
            Some("Basic dXNlcjpwdw==")
        );
        assert_eq!(
            (agent.targets[0].port, agent.targets[0].path.as_str()),
            (9100, "/metrics")
        );
        assert_eq!(
            (agent.targets[1].port, agent.targets[1].path.as_str()),
            (9200, "/m")
        );
        assert_eq!(
            agent.targets[1].server_name.as_deref(),
            Some("app.internal")
        );
        assert!(agent.targets[1].tls.is_some() && agent.targets[0].tls.is_none());
    }

    #[test]
    fn targets_must_not_collide() {
        let yaml = "agent:\n  gateway: https://gw:7443\n  agent_id: a\n  targets:\n    - { name: x, url: 'http://h:1/metrics' }\n    - { name: y, url: 'http://h2:1/metrics' }\n    - { name: ferry, url: 'http://h:2/metrics' }\n    - { name: z, url: 'http://h:9369/metrics' }\n";
        let env = |n: &str| (n == "FERRY_TOKEN").then(|| "t".to_owned());
        let errs = FileConfig::parse(yaml, "c")
            .unwrap()
            .validate("c", &env)
            .unwrap_err()
            .to_string();
        assert!(
            errs.contains(
                "agent.targets[1].port: port 1 path \"/metrics\" is already taken by target \"x\""
            ),
            "{errs}"
        );
        assert!(
            errs.contains("agent.targets[3].port: port 9369 path \"/metrics\" is already taken by the built-in target \"ferry\""),
            "{errs}"
        );
        assert!(
            errs.contains("agent.targets[2].name") && errs.contains("built-in"),
            "{errs}"
        );
    }

    /// Prometheus decodes `__metrics_path__` and encodes it again: a path is kept decoded, and
    /// refused when Prometheus could not ask for it or could not tell it from another target's.
    #[test]
    fn target_paths_are_decoded_and_ambiguous_ones_refused() {
        let env = |n: &str| (n == "FERRY_TOKEN").then(|| "t".to_owned());
        let config = |targets: &str| {
            let yaml =
                format!("agent:\n  gateway: https://gw:7443\n  agent_id: a\n  targets:\n{targets}");
            FileConfig::parse(&yaml, "c").unwrap().validate("c", &env)
        };
        let ok = config(
            "    - { name: enc, url: 'http://h:1/a%20b/metrics' }\n    - { name: bang, url: 'http://h:1/x!y/metrics' }\n    - { name: cafe, url: 'http://h:1/caf%C3%A9/m%2a' }\n",
        )
        .unwrap()
        .agent
        .unwrap();
        let paths: Vec<(&str, &str)> = ok
            .targets
            .iter()
            .map(|t| (t.path.as_str(), t.url.path()))
            .collect();
        assert_eq!(
            paths,
            [
                ("/a b/metrics", "/a%20b/metrics"),
                ("/x!y/metrics", "/x!y/metrics"),
                ("/café/m*", "/caf%C3%A9/m%2a"),
            ]
        );

        let errs = config(
            "    - { name: slash, url: 'http://h:1/a%2Fb/metrics' }\n    - { name: latin1, url: 'http://h:1/caf%E9' }\n    - { name: pct, url: 'http://h:1/100%' }\n    - { name: bang, url: 'http://h:2/x!y/metrics' }\n    - { name: bang2, url: 'http://h:2/x%21y/metrics' }\n",
        )
        .unwrap_err()
        .to_string();
        let lines: Vec<&str> = errs.lines().collect();
        assert_eq!(
            lines,
            [
                r#"c: agent.targets[0].url: target "slash": path "/a%2Fb/metrics" has an encoded "/" (%2F), which Prometheus cannot request: it would ask for a plain "/""#,
                r#"c: agent.targets[1].url: target "latin1": path "/caf%E9" does not decode to UTF-8 text (Prometheus's metrics path is text)"#,
                r#"c: agent.targets[2].url: target "pct": path "/100%" has a "%" not followed by two hex digits (write a literal "%" as %25)"#,
                r#"c: agent.targets[4].port: port 2 path "/x%21y/metrics" is already taken by target "bang" as "/x!y/metrics" (both are "/x!y/metrics" to Prometheus): give one of them a distinct `port` (config file)"#,
            ],
            "{errs}"
        );
    }

    #[test]
    fn flags_errors_name_the_flag() {
        let file = FileConfig {
            gateway: Some(GatewaySection::default()),
            ..FileConfig::default()
        };
        let errs = file.validate("flags", &no_env).unwrap_err().to_string();
        assert!(
            errs.contains("invalid flag --auth.tokens-file: required"),
            "{errs}"
        );
    }

    /// Among flags, a message names the other flag, not the file's field.
    #[test]
    fn gateway_flag_errors_name_the_other_flag() {
        let mut gateway = GatewaySection::default();
        gateway.tunnel.insecure_plaintext = true;
        gateway.tunnel.tls_cert_file = Some("c.pem".into());
        gateway.web.scrape_timeout_default = Dur(Duration::from_secs(90));
        let file = FileConfig {
            gateway: Some(gateway),
            ..FileConfig::default()
        };
        let errs = file.validate("flags", &no_env).unwrap_err().to_string();
        let lines: Vec<&str> = errs.lines().collect();
        assert!(
            lines.contains(&"invalid flag --tunnel.insecure-plaintext: cannot be combined with --tunnel.tls-cert-file: remove one of them"),
            "{errs}"
        );
        assert!(
            lines.contains(&"invalid flag --web.scrape-timeout-default: must not exceed --web.scrape-timeout-max (1m)"),
            "{errs}"
        );
        let errs = file.validate("g.yaml", &no_env).unwrap_err().to_string();
        assert!(
            errs.contains("g.yaml: gateway.web.scrape_timeout_default: must not exceed web.scrape_timeout_max (1m)"),
            "{errs}"
        );
    }

    #[test]
    fn a_target_name_given_twice_by_flags_names_the_flag() {
        let agent = AgentSection {
            gateway: Some("https://gw:7443".into()),
            agent_id: Some("a".into()),
            targets: ["a=http://h:1/m", "a=http://h:2/m"]
                .into_iter()
                .map(|t| TargetSection::parse_flag(t).unwrap())
                .collect(),
            ..AgentSection::default()
        };
        let file = FileConfig {
            agent: Some(agent),
            ..FileConfig::default()
        };
        let env = |n: &str| (n == "FERRY_TOKEN").then(|| "t".to_owned());
        let errs = file.validate("flags", &env).unwrap_err().to_string();
        assert_eq!(
            errs,
            "invalid flag --target: \"a\" is used twice (also by an earlier --target)"
        );
    }

    #[test]
    fn an_empty_file_says_what_is_missing() {
        let errs = FileConfig::parse("{}", "e.yaml")
            .unwrap()
            .validate("e.yaml", &no_env)
            .unwrap_err();
        assert!(errs.to_string().contains("no role configured"), "{errs}");
    }
}

#[cfg(all(test, feature = "agent", feature = "gateway"))]
mod shape_tests {
    use super::*;

    fn token_env(name: &str) -> Option<String> {
        (name == "FERRY_TOKEN").then(|| "t".to_owned())
    }

    fn check(yaml: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let origin = path.display().to_string();
        match FileConfig::load_validated(&path, &token_env, |_| {}) {
            Ok(_) => Vec::new(),
            Err(errs) => errs
                .to_string()
                .lines()
                .map(|l| l.trim_start_matches(&origin).to_owned())
                .collect(),
        }
    }

    #[test]
    fn a_wrongly_typed_value_names_its_field_and_line() {
        let errs = FileConfig::parse("gateway: {shutdown_grace_period: 15}\n", "dur.yaml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            errs,
            "dur.yaml: gateway.shutdown_grace_period: \"15\" is not a duration: give it a unit, e.g. 15s at line 1 column 34"
        );
    }

    #[test]
    fn wrongly_typed_values_are_reported_together_with_the_other_problems() {
        let lines = check(
            "gateway:
  shutdown_grace_period: 15
  web:
    scrape_timeout_default: 10
    max_scrape_bytes: lots
  tunnel: { insecure_plaintext: yes }
agent:
  gateway: https://gw:7443
  agent_id: a
  self_port: 70000
  targets:
    - { name: n, url: 'ftp://x/m', port: -1 }
",
        );
        assert_eq!(
            lines,
            [
                ": gateway.shutdown_grace_period: \"15\" is not a duration: give it a unit, e.g. 15s at line 2 column 26",
                ": gateway.web.scrape_timeout_default: \"10\" is not a duration: give it a unit, e.g. 10s at line 4 column 29",
                ": gateway.web.max_scrape_bytes: \"lots\" is not a whole number (0 or more) at line 5 column 23",
                ": gateway.tunnel.insecure_plaintext: \"yes\" is not true or false at line 6 column 33",
                ": agent.self_port: \"70000\" is too large: at most 65535 at line 10 column 14",
                ": agent.targets[0].port: \"-1\" is negative: must be a whole number from 0 to 65535 at line 12 column 42",
                // The validation pass still runs, on the defaults of the fields above.
                ": gateway.auth.tokens_file: required: agents cannot authenticate without it (create lines with `ferry token new`)",
                ": agent.targets[0].url: \"ftp://x/m\" must start with http:// or https://",
            ]
        );
    }

    #[test]
    fn every_unknown_field_is_reported_with_its_line() {
        let lines = check(
            "gateway:
  web:
    listen_adress: ':8080'
  tunnel: { tls_self_signed_name: [a] }
agent:
  targets:
    - { name: n, url: 'http://h:1/m' }
    - name: m
      url: 'http://h:2/m'
      prot: 9
  token_fil: x
",
        );
        // The rest of the file is still checked: its own problems follow.
        let (lines, rest): (Vec<String>, Vec<String>) =
            lines.into_iter().partition(|l| l.contains("unknown field"));
        assert!(
            rest.iter()
                .any(|l| l.starts_with(": gateway.auth.tokens_file: required")),
            "{rest:#?}"
        );
        let short: Vec<&str> = lines
            .iter()
            .map(|l| l.split_once(", expected one of").unwrap().0)
            .collect();
        assert_eq!(
            short,
            [
                ": gateway.web: unknown field `listen_adress`",
                ": gateway.tunnel: unknown field `tls_self_signed_name`",
                ": agent.targets[1]: unknown field `prot`",
                ": agent: unknown field `token_fil`",
            ],
            "{lines:#?}"
        );
        let at: Vec<&str> = lines
            .iter()
            .map(|l| &l[l.rfind(" at line").unwrap()..])
            .collect();
        assert_eq!(
            at,
            [
                " at line 3 column 5",
                " at line 4",
                " at line 10",
                " at line 11"
            ]
        );
    }

    /// A zero timeout or backoff fails every attempt at once or redials in a busy loop; zero
    /// stays allowed where it means "not at all".
    #[test]
    fn durations_have_a_floor_where_zero_means_nothing_and_a_ceiling_of_a_year() {
        let lines = check(
            "gateway:
  auth: { tokens_file: /nonexistent }
  web: { scrape_timeout_default: 0s, scrape_timeout_max: 2y, scrape_timeout_margin: 0s, sd_keep_disconnected: 0 }
  tunnel: { handshake_timeout: 0s, keepalive_interval: 10ms }
  shutdown_grace_period: 0s
agent:
  gateway: https://gw:7443
  agent_id: a
  scrape_timeout_max: 0s
  tunnel: { handshake_timeout: 99ms }
  reconnect: { min_backoff: 1s, max_backoff: 500ms, auth_failure_backoff: 999ms, stable_after: 0s }
  shutdown_grace_period: 0s
",
        );
        assert_eq!(
            lines,
            [
                ": gateway.auth.tokens_file: cannot read tokens file /nonexistent: No such file or directory (os error 2)",
                ": gateway.web.scrape_timeout_default: must be from 100ms to 1y, not 0s",
                ": gateway.web.scrape_timeout_max: must be from 100ms to 1y, not 2y",
                ": gateway.tunnel.handshake_timeout: must be from 100ms to 1y, not 0s",
                ": gateway.tunnel.keepalive_interval: must be from 100ms to 1y, not 10ms",
                ": agent.scrape_timeout_max: must be from 100ms to 1y, not 0s",
                ": agent.tunnel.handshake_timeout: must be from 100ms to 1y, not 99ms",
                ": agent.reconnect.auth_failure_backoff: must be from 1s to 1y, not 999ms",
                ": agent.reconnect.stable_after: must be from 1s to 1y, not 0s",
                ": agent.reconnect.max_backoff: must be at least reconnect.min_backoff (1s), not 500ms",
            ]
        );
    }

    /// One misspelt key must not hide the rest of the file's problems until it is fixed.
    #[test]
    fn an_unknown_field_is_reported_with_every_other_problem() {
        let lines = check(
            "gateway:
  auth: { tokens_file: /nonexistent }
  web: { listen_adress: ':1', listen_address: nope }
  tunnel: { max_concurrent_scrapes: many }
exporter:
  collector: { connections: true, connections_exclude: [bogus] }
",
        );
        let short: Vec<&str> = lines
            .iter()
            .map(|l| l.split(", expected").next().unwrap())
            .collect();
        assert_eq!(
            short,
            [
                ": gateway.web: unknown field `listen_adress`",
                ": gateway.tunnel.max_concurrent_scrapes: \"many\" is not a whole number from 0 to 4294967295 at line 4",
                ": gateway.web.listen_address: \"nope\" is not a listen address (host:port or :port)",
                ": gateway.auth.tokens_file: cannot read tokens file /nonexistent: No such file or directory (os error 2)",
                ": exporter.collector.connections_exclude[0]: \"bogus\" is not a CIDR (e.g. 10.0.0.0/8 or 2001:db8::/32)",
            ],
            "{lines:#?}"
        );
    }

    /// `10.0.0.1/8` in an allowlist is a typo for `/32` or `/24` as often as for `10.0.0.0/8`:
    /// refused, not silently widened to the whole network.
    #[test]
    fn a_cidr_with_host_bits_is_refused_naming_both_readings() {
        let mut errs = ConfigErrors::new("f.yaml");
        let raw = ["10.0.0.0/8", "10.0.0.1/8", "192.0.2.7", "fd00::1/64"].map(String::from);
        let nets = parse_cidrs(&raw, "egress.allow_clients", &mut errs);
        assert_eq!(
            nets,
            [
                "10.0.0.0/8".parse().unwrap(),
                "192.0.2.7/32".parse().unwrap()
            ]
        );
        assert_eq!(
            errs.to_string(),
            "f.yaml: egress.allow_clients[1]: \"10.0.0.1/8\" has host bits set: write the network 10.0.0.0/8 or the one address 10.0.0.1/32\n\
             f.yaml: egress.allow_clients[3]: \"fd00::1/64\" has host bits set: write the network fd00::/64 or the one address fd00::1/128"
        );
    }

    /// A value that could not be read is reported once: validation does not go on to find
    /// fault with the default it was replaced by.
    #[test]
    fn a_bad_value_is_not_reported_again_as_its_default() {
        let lines = check("exporter:\n  collector: { connections: \"true\" }\n");
        assert_eq!(
            lines,
            [": exporter.collector.connections: \"true\" is in quotes: write true without them at line 2 column 29"]
        );
    }

    #[test]
    fn an_empty_role_section_is_that_role_with_its_defaults() {
        for yaml in [
            "exporter:\n",
            "exporter:\n  # collector: { connections: true }\n",
            "exporter: ~\n",
        ] {
            assert_eq!(
                check(yaml),
                [": exporter.collector.connections: no collector enabled: the exporter needs collector.connections"],
                "{yaml}"
            );
        }
        let lines = check("agent:\n");
        assert!(
            lines.iter().any(|l| l.starts_with(": agent.gateway: ")),
            "{lines:#?}"
        );
        assert!(!lines.iter().any(|l| l.contains("no role")), "{lines:#?}");
    }

    #[test]
    fn listeners_of_one_file_need_addresses_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokens"), "").unwrap();
        let lines = check(&format!(
            "gateway:
  auth: {{ tokens_file: {} }}
  data_dir: {}
  web: {{ listen_address: '127.0.0.1:18081' }}
  tunnel: {{ listen_address: '127.0.0.1:18081' }}
exporter:
  web: {{ listen_address: ':18081' }}
  collector: {{ connections: true }}
agent:
  gateway: https://gw:7443
  agent_id: a
  web: {{ listen_address: '127.0.0.1:0' }}
egress:
  web: {{ listen_address: '127.0.0.1:0' }}
  allow_upstreams: [a.example.com]
",
            dir.path().join("tokens").display(),
            dir.path().join("data").display(),
        ));
        assert_eq!(
            lines,
            [
                ": gateway.tunnel.listen_address: 127.0.0.1:18081 is already taken by web.listen_address: each listener needs an address of its own",
                ": exporter.web.listen_address: [::]:18081 is already taken by gateway.web.listen_address and gateway.tunnel.listen_address: each listener needs an address of its own",
            ]
        );
    }

    /// Whole numbers and switches written the way YAML reads as something else are told apart
    /// from values that are plain wrong.
    #[test]
    fn a_number_in_quotes_or_out_of_range_is_called_so() {
        let lines = check(
            "gateway:
  auth: { tokens_file: /nonexistent }
  web: { max_scrape_bytes: '1000', sd_keep_disconnected_max: 1e6 }
  tunnel: { insecure_plaintext: \"true\", max_concurrent_scrapes: 4294967296, max_pending_handshakes: 18446744073709551616 }
",
        );
        let lines: Vec<&str> = lines
            .iter()
            .map(|l| l.split(" at line").next().unwrap_or(l))
            .collect();
        assert_eq!(
            lines,
            [
                ": gateway.web.max_scrape_bytes: \"1000\" is in quotes: write 1000 without them",
                ": gateway.web.sd_keep_disconnected_max: \"1000000\" is written as a decimal number (like 1e6 or 1.0): write it as 1000000",
                ": gateway.tunnel.insecure_plaintext: \"true\" is in quotes: write true without them",
                ": gateway.tunnel.max_concurrent_scrapes: \"4294967296\" is too large: at most 4294967295",
                ": gateway.tunnel.max_pending_handshakes: \"18446744073709551616\" is too large: at most 4294967295",
            ]
        );
    }

    #[test]
    fn listeners_collide_on_one_port_of_one_address_or_a_wildcard_over_it() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        for (x, y, collide) in [
            ("127.0.0.1:80", "127.0.0.1:80", true),
            ("127.0.0.1:80", "127.0.0.1:81", false),
            ("127.0.0.1:80", "127.0.0.2:80", false),
            ("0.0.0.0:80", "127.0.0.1:80", true),
            ("0.0.0.0:80", "[::1]:80", false),
            ("[::]:80", "127.0.0.1:80", true),
            ("[::]:80", "[::1]:80", true),
            ("[::1]:80", "127.0.0.1:80", false),
        ] {
            assert_eq!(listeners_collide(a(x), a(y)), collide, "{x} {y}");
            assert_eq!(listeners_collide(a(y), a(x)), collide, "{y} {x}");
        }
    }

    #[test]
    fn a_geoip_reload_interval_without_a_database_is_an_error() {
        let lines = check(
            "geoip: { reload_interval: 5s }\nexporter: { collector: { connections: true } }\n",
        );
        assert_eq!(
            lines,
            [": geoip.reload_interval: set, but there is no geoip.database to check for changes: set geoip.database or remove this"]
        );
    }

    #[test]
    fn keeping_disconnected_agents_needs_room_for_one() {
        let lines = check("gateway:\n  web:\n    sd_keep_disconnected_max: 0\n");
        let want = ": gateway.web.sd_keep_disconnected_max: must be greater than 0 (to keep no disconnected agent, set web.sd_keep_disconnected to 0s)";
        assert!(lines.iter().any(|l| l == want), "{lines:#?}");
        let lines = check("gateway:\n  web:\n    sd_keep_disconnected: 0s\n");
        assert!(!lines.iter().any(|l| l.contains("sd_keep")), "{lines:#?}");
    }

    #[test]
    fn the_web_listener_needs_room_for_a_connection() {
        let lines = check("gateway:\n  web:\n    max_connections: 0\n");
        let want = ": gateway.web.max_connections: must be greater than 0";
        assert!(lines.iter().any(|l| l == want), "{lines:#?}");
    }

    #[test]
    fn a_mapping_where_a_value_belongs_stops_the_parse_naming_the_field() {
        let lines = check("gateway:\n  web:\n    scrape_timeout_max: { a: 1 }\n");
        assert_eq!(
            lines,
            [": gateway.web.scrape_timeout_max: a mapping is not a duration (e.g. 10s, 500ms, 1h30m) at line 3 column 25"]
        );
    }

    #[test]
    fn target_problems_come_in_file_order_and_only_ferry_is_called_built_in() {
        let lines = check(
            "agent:
  gateway: https://gw:7443
  agent_id: a
  targets:
    - { name: a, url: 'http://h:1/m' }
    - { name: a, url: 'http://h:2/m' }
    - { name: ferry, url: 'http://h:3/m' }
    - { name: b, url: 'ftp://h/m' }
    - { name: c, url: '127.0.0.1:9100/metrics' }
    - { name: unknown, url: 'http://h:5/m' }
",
        );
        assert_eq!(
            lines,
            [
                ": agent.targets[1].name: \"a\" is used twice (also by agent.targets[0])",
                ": agent.targets[2].name: \"ferry\" is the built-in target (the agent's own metrics): choose another name",
                ": agent.targets[3].url: \"ftp://h/m\" must start with http:// or https://",
                ": agent.targets[4].url: \"127.0.0.1:9100/metrics\" must start with http:// or https://, e.g. \"http://127.0.0.1:9100/metrics\"",
                ": agent.targets[5].name: target name \"unknown\" is reserved (the gateway counts scrapes of targets no agent lists under it): choose another",
            ]
        );
    }

    #[test]
    fn a_target_list_too_large_for_the_gateway_is_refused() {
        let long = "x".repeat(600 * 1024);
        let lines = check(&format!(
            "agent:
  gateway: https://gw:7443
  agent_id: a
  labels: {{ site: {long} }}
  targets:
    - {{ name: a, url: 'http://h:1/m', labels: {{ rack: {long} }} }}
"
        ));
        assert_eq!(
            lines,
            [": agent.targets: the labels and targets make a target list of 1201 KiB, more than the gateway reads (1024 KiB): shorten the label values or spread the targets over more agents"]
        );
    }

    #[test]
    fn values_that_would_be_ignored_are_errors() {
        let lines = check(
            "agent:
  gateway: https://gw:7443/path?q
  agent_id: a
  proxy_url: 127.0.0.1:38730
",
        );
        assert_eq!(
            lines,
            [
                ": agent.gateway: \"https://gw:7443/path?q\" must be https://HOST:PORT, without a path or query: the tunnel's path is fixed",
                ": agent.proxy_url: \"127.0.0.1:38730\" must start with http://, e.g. http://proxy.example.com:3128",
            ]
        );
        let lines = check(
            "agent:
  gateway: http://gw:7443
  agent_id: a
  tunnel: { insecure_plaintext: true, fingerprint: 'sha256:00' }
",
        );
        assert_eq!(
            lines,
            [": agent.tunnel.fingerprint: set, but tunnel.insecure_plaintext turns TLS off: remove one of them"]
        );
    }

    /// A message that names a second setting names it as the user set the first: a flag among
    /// flags, a field of the file in the file.
    #[test]
    fn other_settings_are_named_as_flags_or_fields_by_origin() {
        let mut agent = AgentSection {
            gateway: Some("https://gw:7443".into()),
            agent_id: Some("a".into()),
            ..AgentSection::default()
        };
        agent.tunnel.ca_file = Some("ca.pem".into());
        agent.tunnel.fingerprint = vec![format!("sha256:{}", "0".repeat(64))];
        let both = FileConfig {
            agent: Some(agent),
            ..FileConfig::default()
        };
        let mut plaintext = AgentSection {
            gateway: Some("http://gw:7443".into()),
            agent_id: Some("a".into()),
            ..AgentSection::default()
        };
        plaintext.tunnel.cert_file = Some("c.pem".into());
        let plaintext = FileConfig {
            agent: Some(plaintext),
            ..FileConfig::default()
        };
        let errors = |file: &FileConfig, origin: &str| {
            file.clone()
                .validate(origin, &token_env)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            errors(&both, "flags"),
            "invalid flag --tunnel.fingerprint: give either --tunnel.ca-file or --tunnel.fingerprint, not both"
        );
        assert_eq!(
            errors(&both, "a.yaml"),
            "a.yaml: agent.tunnel.fingerprint: give either tunnel.ca_file or tunnel.fingerprint, not both"
        );
        assert_eq!(
            errors(&plaintext, "flags"),
            "invalid flag --gateway: \"http://gw:7443\" is plaintext: use https://, or set --tunnel.insecure-plaintext if you really mean it\n\
             invalid flag --tunnel.key-file: required when --tunnel.cert-file is set"
        );
        let mut plaintext = plaintext;
        if let Some(a) = &mut plaintext.agent {
            a.tunnel.insecure_plaintext = true;
        }
        assert_eq!(
            errors(&plaintext, "flags"),
            "invalid flag --tunnel.cert-file: set, but --tunnel.insecure-plaintext turns TLS off: remove one of them"
        );
        if let Some(a) = &mut plaintext.agent {
            a.gateway = Some("https://gw:7443".into());
            a.tunnel.insecure_plaintext = false;
        }
        assert_eq!(
            errors(&plaintext, "flags"),
            "invalid flag --tunnel.key-file: required when --tunnel.cert-file is set"
        );
        assert_eq!(
            errors(&plaintext, "a.yaml"),
            "a.yaml: agent.tunnel.key_file: required when tunnel.cert_file is set"
        );
    }

    /// serde's own words for a value of the wrong shape name the Rust type (`expected struct
    /// TargetSection`): every section says what it expects instead.
    #[test]
    fn a_section_of_the_wrong_shape_says_what_belongs_there() {
        let lines = check(
            "agent:\n  gateway: https://gw:7443\n  targets: ['http://127.0.0.1:9100/metrics']\n",
        );
        assert_eq!(
            lines,
            [": agent.targets[0]: invalid type: string \"http://127.0.0.1:9100/metrics\", expected a target: {name: ..., url: ...} at line 3 column 13"]
        );
        for yaml in [
            "x",
            "log: x",
            "geoip: x",
            "exporter: x",
            "exporter: {web: x}",
            "exporter: {collector: x}",
            "agent: x",
            "agent: {web: x}",
            "agent: {tunnel: x}",
            "agent: {reconnect: x}",
            "agent: {collector: x}",
            "agent: {targets: [{name: n, url: 'http://h/m', tls: x}]}",
            "gateway: x",
            "gateway: {web: x}",
            "gateway: {tunnel: x}",
            "gateway: {auth: x}",
            "egress: x",
            "egress: {web: x}",
            "egress: {auth: x}",
            "egress: {rules: [x]}",
            "egress: {rules: [{name: n, upstream: h, validate: x}]}",
            "egress: {rules: [{name: n, upstream: h, tls_upgrade: x}]}",
        ]
        .into_iter()
        .filter(|yaml| cfg!(feature = "egress") || !yaml.starts_with("egress"))
        {
            let lines = check(yaml);
            assert_eq!(lines.len(), 1, "{yaml}: {lines:?}");
            assert!(
                lines[0].contains("expected ") && !lines[0].contains("struct"),
                "{yaml}: {lines:?}"
            );
        }
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn an_x509_v1_client_certificate_is_refused_in_plain_words() {
        let (cert, key) = (fixture("x509v1-cert.pem"), fixture("x509v1-key.pem"));
        let lines = check(&format!(
            "agent:
  gateway: https://gw:7443
  agent_id: a
  tunnel: {{ fingerprint: 'sha256:{zeros}', cert_file: {cert}, key_file: {key} }}
  targets:
    - {{ name: n, url: 'https://h:1/m', tls: {{ cert_file: {cert}, key_file: {key} }} }}
",
            zeros = "0".repeat(64),
            cert = cert.display(),
            key = key.display(),
        ));
        let v1 = format!(
            "certificate {} and key {} do not form a usable identity: unsupported certificate version (X.509 v1; v3 required)",
            cert.display(),
            key.display()
        );
        assert_eq!(
            lines,
            [
                format!(": agent.tunnel.cert_file: {v1}"),
                format!(": agent.targets[0].tls.cert_file: {v1}"),
            ]
        );
    }

    #[test]
    fn the_gateway_reports_a_missing_certificate_and_key_together() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokens"), "").unwrap();
        let lines = check(&format!(
            "gateway:
  auth: {{ tokens_file: {tokens} }}
  tunnel: {{ tls_cert_file: /nonexistent/tunnel.crt, tls_key_file: /nonexistent/tunnel.key }}
",
            tokens = dir.path().join("tokens").display()
        ));
        assert_eq!(
            lines,
            [
                ": gateway.tunnel.tls_cert_file: cannot read /nonexistent/tunnel.crt: No such file or directory (os error 2)",
                ": gateway.tunnel.tls_key_file: cannot read /nonexistent/tunnel.key: No such file or directory (os error 2)",
            ]
        );
    }

    #[test]
    fn the_gateway_checks_a_self_signed_certificate_it_already_has() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokens"), "").unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::copy(fixture("x509v1-cert.pem"), data.join("tunnel-cert.pem")).unwrap();
        std::fs::copy(fixture("x509v1-key.pem"), data.join("tunnel-key.pem")).unwrap();
        let lines = check(&format!(
            "gateway:\n  auth: {{ tokens_file: {} }}\n  data_dir: {}\n",
            dir.path().join("tokens").display(),
            data.display()
        ));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with(": gateway.data_dir: certificate ")
                && lines[0].ends_with("unsupported certificate version (X.509 v1; v3 required)"),
            "{lines:?}"
        );
    }

    #[test]
    fn check_config_refuses_a_data_dir_with_only_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokens"), "").unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::copy(fixture("x509v1-cert.pem"), data.join("tunnel-cert.pem")).unwrap();
        let lines = check(&format!(
            "gateway:\n  auth: {{ tokens_file: {} }}\n  data_dir: {}\n",
            dir.path().join("tokens").display(),
            data.display()
        ));
        assert_eq!(
            lines,
            [": gateway.data_dir: tunnel-cert.pem is there but tunnel-key.pem is missing; restore it, or remove tunnel-cert.pem too to generate a new certificate (agents pinned to the old fingerprint will refuse it)"],
        );
    }
}

#[cfg(all(test, feature = "egress"))]
mod egress_tests {
    use super::*;

    fn errors(yaml: &str) -> Vec<String> {
        FileConfig::parse(yaml, "e.yaml")
            .unwrap()
            .validate("e.yaml", &|_| None)
            .map(|_| Vec::new())
            .unwrap_or_else(|errs| errs.to_string().lines().map(str::to_owned).collect())
    }

    #[test]
    fn the_credentials_file_is_called_a_credentials_file() {
        let lines = errors("egress:\n  auth: { credentials_file: /nope }\n");
        assert_eq!(
            lines,
            ["e.yaml: egress.auth.credentials_file: cannot read credentials file /nope: No such file or directory (os error 2)"]
        );
    }

    #[test]
    fn rule_names_are_unique_and_methods_are_http_methods() {
        let lines = errors(
            "egress:
  rules:
    - { name: r, upstream: 'a.example.com:443', methods: [get, CONNECT, FETCH] }
    - { name: r, upstream: 'b.example.com:443', methods: [PATCH] }
",
        );
        assert_eq!(
            lines,
            [
                "e.yaml: egress.rules[0].methods[2]: \"FETCH\" is not an HTTP method: use GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH",
                "e.yaml: egress.rules[1].name: \"r\" is used twice (also by egress.rules[0]): logs and metrics could not tell them apart",
            ]
        );
    }

    #[test]
    fn the_body_buffer_holds_at_least_the_largest_body_a_rule_takes() {
        let lines = errors(
            "egress:
  max_buffered_body_bytes: 2000000
  rules:
    - { name: small, upstream: 'a.example.com:443', validate: { max_body_bytes: 1000000 } }
    - { name: large, upstream: 'b.example.com:443', validate: { max_body_bytes: 3000000 } }
",
        );
        assert_eq!(
            lines,
            ["e.yaml: egress.max_buffered_body_bytes: must be at least the largest max_body_bytes of a rule: rule \"large\" takes bodies of up to 3000000 bytes (16 MiB unless its validate says otherwise), which could never be held"]
        );
        let ok = "egress:\n  max_buffered_body_bytes: 3000000\n  rules:\n    - { name: r, upstream: 'a.example.com:443', validate: { max_body_bytes: 3000000 } }\n";
        assert_eq!(errors(ok), Vec::<String>::new());
    }

    #[test]
    fn a_decoded_body_limit_fits_in_the_body_buffer() {
        let lines = errors(
            "egress:\n  rules:\n    - { name: r, upstream: 'a.example.com:443', validate: { json: true, max_decoded_bytes: 18446744073709551615 } }\n",
        );
        assert_eq!(
            lines,
            ["e.yaml: egress.rules[0].validate.max_decoded_bytes: 18446744073709551615 is more than egress.max_buffered_body_bytes (536870912), which holds decoded bodies too: a body decoded past it could never be held"]
        );
        let ok = "egress:\n  max_buffered_body_bytes: 18446744073709551615\n  rules:\n    - { name: r, upstream: 'a.example.com:443', validate: { json: true, max_decoded_bytes: 18446744073709551615 } }\n";
        assert_eq!(errors(ok), Vec::<String>::new());
    }

    #[test]
    fn a_json_tree_limit_needs_a_schema() {
        let lines = errors(
            "egress:\n  rules:\n    - { name: r, upstream: 'a.example.com:443', validate: { json: true, max_json_tree_bytes: 1048576 } }\n",
        );
        assert_eq!(
            lines,
            ["e.yaml: egress.rules[0].validate.max_json_tree_bytes: applies only with json_schema_file (no tree is built without a schema)"]
        );
    }
}
