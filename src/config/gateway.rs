//! The `gateway:` section and its validated form.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{anchor, check_durations, parse_listen_address, validate_keepalive, ConfigErrors, Dur};
use crate::tunnel::tls::TlsError;
use crate::tunnel::{tls_server, Keepalive};

/// `gateway:` as written in the YAML file (and filled from flags).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the gateway section: a mapping of settings such as auth: and tunnel:"
)]
pub struct GatewaySection {
    /// Prometheus-facing listener.
    pub web: GatewayWebSection,
    /// Agent-facing listener.
    pub tunnel: GatewayTunnelSection,
    /// Where the self-signed certificate and the agents listed in service discovery are kept
    /// [default: `data`, in the working directory].
    pub data_dir: Option<PathBuf>,
    /// Agent credentials.
    pub auth: AuthSection,
    /// How long in-flight scrapes may finish after SIGTERM.
    pub shutdown_grace_period: Dur,
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self {
            web: GatewayWebSection::default(),
            tunnel: GatewayTunnelSection::default(),
            data_dir: None,
            auth: AuthSection::default(),
            shutdown_grace_period: Dur(Duration::from_secs(15)),
        }
    }
}

/// `gateway.web:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the gateway's web settings: a mapping such as {listen_address: ...}"
)]
pub struct GatewayWebSection {
    /// Address for Prometheus, service discovery and ferry's own endpoints.
    pub listen_address: String,
    /// Scrape timeout when Prometheus sends none.
    pub scrape_timeout_default: Dur,
    /// Upper bound of any scrape timeout.
    pub scrape_timeout_max: Dur,
    /// How much earlier than Prometheus the agent gives up, so Prometheus sees a 504, not its own timeout.
    pub scrape_timeout_margin: Dur,
    /// Largest scrape body passed through.
    #[serde(deserialize_with = "super::lenient")]
    pub max_scrape_bytes: u64,
    /// exporter-toolkit web configuration: TLS and basic-auth users for this listener.
    pub config_file: Option<PathBuf>,
    /// How long a disconnected agent stays in service discovery, so that Prometheus records
    /// `up == 0` for its targets instead of dropping them; 0 removes it at once.
    pub sd_keep_disconnected: Dur,
    /// At most this many disconnected agents are kept; over it the longest gone goes first.
    #[serde(deserialize_with = "super::lenient")]
    pub sd_keep_disconnected_max: usize,
    /// Connections the web listener holds open at once; more are closed at accept.
    #[serde(deserialize_with = "super::lenient")]
    pub max_connections: usize,
}

impl Default for GatewayWebSection {
    fn default() -> Self {
        Self {
            listen_address: ":8080".into(),
            scrape_timeout_default: Dur(Duration::from_secs(10)),
            scrape_timeout_max: Dur(Duration::from_secs(60)),
            scrape_timeout_margin: Dur(Duration::from_millis(500)),
            max_scrape_bytes: 256 << 20,
            config_file: None,
            sd_keep_disconnected: Dur(Duration::from_secs(24 * 3600)),
            sd_keep_disconnected_max: 10_000,
            max_connections: 16_384,
        }
    }
}

/// `gateway.tunnel:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the tunnel settings: a mapping such as {listen_address: ...}"
)]
pub struct GatewayTunnelSection {
    /// Address agents dial.
    pub listen_address: String,
    /// PEM certificate chain; with the key, replaces the self-signed certificate.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key.
    pub tls_key_file: Option<PathBuf>,
    /// Names in the self-signed certificate.
    pub tls_self_signed_names: Vec<String>,
    /// Require agents to present a client certificate signed by a CA in this PEM file (mTLS).
    pub tls_client_ca_file: Option<PathBuf>,
    /// Accept tunnels without TLS. Only for tests and TLS-terminating front ends.
    #[serde(deserialize_with = "super::lenient")]
    pub insecure_plaintext: bool,
    /// HTTP/2 PING interval.
    pub keepalive_interval: Dur,
    /// HTTP/2 PING acknowledgement timeout.
    pub keepalive_timeout: Dur,
    /// Bound on TLS + upgrade handshake.
    pub handshake_timeout: Dur,
    /// Concurrent scrapes per agent.
    #[serde(deserialize_with = "super::lenient")]
    pub max_concurrent_scrapes: u32,
    /// Connections in their TLS and upgrade handshake at once; more are closed at accept.
    #[serde(deserialize_with = "super::lenient")]
    pub max_pending_handshakes: u32,
    /// The same, per client address (per /64 for IPv6).
    #[serde(deserialize_with = "super::lenient")]
    pub max_pending_handshakes_per_ip: u32,
}

impl Default for GatewayTunnelSection {
    fn default() -> Self {
        let keepalive = Keepalive::default();
        Self {
            listen_address: ":7443".into(),
            tls_cert_file: None,
            tls_key_file: None,
            tls_self_signed_names: Vec::new(),
            tls_client_ca_file: None,
            insecure_plaintext: false,
            keepalive_interval: Dur(keepalive.interval),
            keepalive_timeout: Dur(keepalive.timeout),
            handshake_timeout: Dur(Duration::from_secs(10)),
            max_concurrent_scrapes: 128,
            max_pending_handshakes: 1024,
            max_pending_handshakes_per_ip: 128,
        }
    }
}

/// `gateway.auth:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the auth settings: a mapping such as {tokens_file: ...}"
)]
pub struct AuthSection {
    /// Lines `<agent-id glob> sha256:<hex of token>`.
    pub tokens_file: Option<PathBuf>,
}

/// How the gateway presents itself to agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayTls {
    /// Certificate and key from files.
    Files {
        /// PEM chain.
        cert: PathBuf,
        /// PEM key.
        key: PathBuf,
    },
    /// Generated on first start and kept in `data_dir`.
    SelfSigned {
        /// Where it is kept.
        data_dir: PathBuf,
        /// Subject alternative names.
        names: Vec<String>,
    },
    /// No TLS at all (`insecure_plaintext`).
    InsecurePlaintext,
}

/// Bounds on scrapes passing through the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrapeLimits {
    /// Timeout when Prometheus sends none.
    pub default_timeout: Duration,
    /// Largest timeout honoured.
    pub max_timeout: Duration,
    /// How much earlier than Prometheus ferry gives up.
    pub margin: Duration,
    /// Largest body passed through.
    pub max_body_bytes: u64,
}

impl Default for ScrapeLimits {
    fn default() -> Self {
        let web = GatewayWebSection::default();
        Self {
            default_timeout: web.scrape_timeout_default.0,
            max_timeout: web.scrape_timeout_max.0,
            margin: web.scrape_timeout_margin.0,
            max_body_bytes: web.max_scrape_bytes,
        }
    }
}

/// The validated gateway configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Prometheus-facing listener address.
    pub web_listen: SocketAddr,
    /// TLS and basic auth of the web listener (`--web.config.file`).
    pub web_config_file: Option<PathBuf>,
    /// Agent-facing listener address.
    pub tunnel_listen: SocketAddr,
    /// TLS identity source.
    pub tls: GatewayTls,
    /// CA file for agents' client certificates, if mTLS is required.
    pub client_ca_file: Option<PathBuf>,
    /// Agent credentials file.
    pub tokens_file: PathBuf,
    /// HTTP/2 keepalive.
    pub keepalive: Keepalive,
    /// Bound on TLS + upgrade.
    pub handshake_timeout: Duration,
    /// Concurrent scrapes per agent.
    pub max_concurrent_scrapes: u32,
    /// Connections in their handshake at once, in all and per client address (IPv6: per /64).
    pub max_pending_handshakes: (u32, u32),
    /// Scrape bounds.
    pub scrape: ScrapeLimits,
    /// How long a disconnected agent stays in service discovery (zero: not at all).
    pub sd_keep_disconnected: Duration,
    /// How many disconnected agents are kept at most.
    pub sd_keep_disconnected_max: usize,
    /// Where the agents listed in service discovery are saved across restarts (and the
    /// self-signed certificate kept, with [`GatewayTls::SelfSigned`]).
    pub data_dir: PathBuf,
    /// Connections the web listener holds open at once.
    pub web_max_connections: usize,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// Country lookup for connection metrics (the process-wide `geoip:` database).
    pub geo: crate::telemetry::geo::SharedGeo,
}

impl GatewaySection {
    /// Validates into a [`GatewayConfig`], recording every problem under `prefix`.
    pub fn validate(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<GatewayConfig> {
        let f = |name: &str| format!("{prefix}.{name}");
        let web_listen = errs.check(
            &f("web.listen_address"),
            parse_listen_address(&self.web.listen_address),
        );
        let tunnel_listen = errs.check(
            &f("tunnel.listen_address"),
            parse_listen_address(&self.tunnel.listen_address),
        );
        let tls = self.validate_tls(prefix, errs);
        let tokens_file = match &self.auth.tokens_file {
            None => {
                errs.push(f("auth.tokens_file"), "required: agents cannot authenticate without it (create lines with `ferry token new`)");
                None
            }
            Some(path) => {
                if let Err(e) = crate::auth::TokensFile::load(path) {
                    errs.push(f("auth.tokens_file"), e.to_string());
                }
                Some(path.clone())
            }
        };
        let web = &self.web;
        // Zero means "not at all" for the grace period, the margin and keeping disconnected
        // agents; a zero timeout would fail every scrape or handshake at once.
        let bounds = [
            (
                "shutdown_grace_period",
                self.shutdown_grace_period,
                Dur::ZERO,
            ),
            (
                "web.scrape_timeout_default",
                web.scrape_timeout_default,
                Dur::MIN_TIMEOUT,
            ),
            (
                "web.scrape_timeout_max",
                web.scrape_timeout_max,
                Dur::MIN_TIMEOUT,
            ),
            (
                "web.scrape_timeout_margin",
                web.scrape_timeout_margin,
                Dur::ZERO,
            ),
            (
                "web.sd_keep_disconnected",
                web.sd_keep_disconnected,
                Dur::ZERO,
            ),
            (
                "tunnel.handshake_timeout",
                self.tunnel.handshake_timeout,
                Dur::MIN_TIMEOUT,
            ),
        ];
        check_durations(prefix, &bounds, errs);
        if web.scrape_timeout_default.0 > web.scrape_timeout_max.0 {
            let message = format!(
                "must not exceed {} ({})",
                errs.setting(&f("web.scrape_timeout_max")),
                web.scrape_timeout_max
            );
            errs.push(f("web.scrape_timeout_default"), message);
        }
        if web.max_scrape_bytes == 0 {
            errs.push(f("web.max_scrape_bytes"), "must be greater than 0");
        }
        if web.sd_keep_disconnected_max == 0 {
            let message = format!(
                "must be greater than 0 (to keep no disconnected agent, set {} to 0s)",
                errs.setting(&f("web.sd_keep_disconnected"))
            );
            errs.push(f("web.sd_keep_disconnected_max"), message);
        }
        if web.max_connections == 0 {
            errs.push(f("web.max_connections"), "must be greater than 0");
        }
        if self.tunnel.max_concurrent_scrapes == 0 {
            errs.push(f("tunnel.max_concurrent_scrapes"), "must be greater than 0");
        }
        let pending = (
            self.tunnel.max_pending_handshakes,
            self.tunnel.max_pending_handshakes_per_ip,
        );
        if pending.0 == 0 {
            errs.push(f("tunnel.max_pending_handshakes"), "must be greater than 0");
        }
        if pending.1 == 0 {
            errs.push(
                f("tunnel.max_pending_handshakes_per_ip"),
                "must be greater than 0",
            );
        }
        let keepalive = validate_keepalive(
            &self.tunnel.keepalive_interval,
            &self.tunnel.keepalive_timeout,
            &f("tunnel"),
            errs,
        );
        if let Some(path) = &self.web.config_file {
            for problem in crate::gateway::web_config::load_all(path)
                .err()
                .unwrap_or_default()
            {
                errs.push(f("web.config_file"), problem);
            }
        }
        Some(GatewayConfig {
            web_listen: web_listen?,
            web_config_file: self.web.config_file.clone(),
            tunnel_listen: tunnel_listen?,
            tls: tls?,
            client_ca_file: self.tunnel.tls_client_ca_file.clone(),
            tokens_file: tokens_file?,
            keepalive,
            handshake_timeout: self.tunnel.handshake_timeout.0,
            max_concurrent_scrapes: self.tunnel.max_concurrent_scrapes,
            max_pending_handshakes: pending,
            scrape: ScrapeLimits {
                default_timeout: web.scrape_timeout_default.0,
                max_timeout: web.scrape_timeout_max.0,
                margin: web.scrape_timeout_margin.0,
                max_body_bytes: web.max_scrape_bytes,
            },
            sd_keep_disconnected: web.sd_keep_disconnected.0,
            sd_keep_disconnected_max: web.sd_keep_disconnected_max,
            data_dir: self.data_dir(),
            web_max_connections: web.max_connections,
            shutdown_grace: self.shutdown_grace_period.0,
            geo: crate::telemetry::geo::SharedGeo::disabled(),
        })
    }

    fn validate_tls(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<GatewayTls> {
        let t = &self.tunnel;
        let field = |name: &str| format!("{prefix}.tunnel.{name}");
        match (&t.tls_cert_file, &t.tls_key_file, t.insecure_plaintext) {
            (None, None, true) => {
                self.reject_tls_options(prefix, errs);
                Some(GatewayTls::InsecurePlaintext)
            }
            (cert, _, true) => {
                let message = format!(
                    "cannot be combined with {}: remove one of them",
                    errs.setting(&field(match cert {
                        Some(_) => "tls_cert_file",
                        None => "tls_key_file",
                    }))
                );
                errs.push(field("insecure_plaintext"), message);
                None
            }
            (Some(cert), Some(key), false) => {
                if !t.tls_self_signed_names.is_empty() {
                    let message = format!(
                        "set, but {} replaces the self-signed certificate these names are for: remove one of them",
                        errs.setting(&field("tls_cert_file"))
                    );
                    errs.push(field("tls_self_signed_names"), message);
                }
                let before = errs.errors.len();
                super::check_readable(cert, &field("tls_cert_file"), errs);
                super::check_readable(key, &field("tls_key_file"), errs);
                if errs.errors.len() == before {
                    let client_ca = t.tls_client_ca_file.as_deref();
                    if let Err(e) = tls_server::load_identity(cert, key, client_ca) {
                        errs.push(field(identity_error_field(&e, client_ca)), e.to_string());
                    }
                }
                Some(GatewayTls::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                })
            }
            (Some(_), None, _) => {
                let message = format!(
                    "required when {} is set",
                    errs.setting(&field("tls_cert_file"))
                );
                errs.push(field("tls_key_file"), message);
                None
            }
            (None, Some(_), _) => {
                let message = format!(
                    "required when {} is set",
                    errs.setting(&field("tls_key_file"))
                );
                errs.push(field("tls_cert_file"), message);
                None
            }
            (None, None, false) => {
                let names = self_signed_names(
                    &t.tls_self_signed_names,
                    &field("tls_self_signed_names"),
                    errs,
                );
                self.check_self_signed(prefix, errs);
                Some(GatewayTls::SelfSigned {
                    data_dir: self.data_dir(),
                    names,
                })
            }
        }
    }

    /// With `tunnel.insecure_plaintext` there is no TLS: a client CA would leave mTLS silently
    /// unenforced, and certificate names would go nowhere. Each set one is an error, as for
    /// the agent.
    fn reject_tls_options(&self, prefix: &str, errs: &mut ConfigErrors) {
        let t = &self.tunnel;
        let plaintext = errs.setting(&format!("{prefix}.tunnel.insecure_plaintext"));
        for (name, set) in [
            ("tls_client_ca_file", t.tls_client_ca_file.is_some()),
            ("tls_self_signed_names", !t.tls_self_signed_names.is_empty()),
        ] {
            if set {
                errs.push(
                    format!("{prefix}.tunnel.{name}"),
                    format!("set, but {plaintext} turns TLS off: remove one of them"),
                );
            }
        }
    }

    /// The gateway's data directory (self-signed certificate, agents file), `data` in the
    /// working directory unless set.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("data"))
    }

    /// Reads the section's relative paths from `dir`, the directory of the file they were
    /// written in.
    pub(super) fn anchor_paths(&mut self, dir: &Path) {
        anchor(&mut self.data_dir, dir);
        anchor(&mut self.web.config_file, dir);
        anchor(&mut self.tunnel.tls_cert_file, dir);
        anchor(&mut self.tunnel.tls_key_file, dir);
        anchor(&mut self.tunnel.tls_client_ca_file, dir);
        anchor(&mut self.auth.tokens_file, dir);
    }

    /// What `run` will load for the self-signed identity, without generating it (check-config
    /// writes nothing): the client CA, and the certificate already kept in `data_dir`, if any.
    fn check_self_signed(&self, prefix: &str, errs: &mut ConfigErrors) {
        let t = &self.tunnel;
        let client_ca = t.tls_client_ca_file.as_deref();
        let data_dir = self.data_dir();
        let cert = data_dir.join(tls_server::SELF_SIGNED_CERT);
        let key = data_dir.join(tls_server::SELF_SIGNED_KEY);
        if let Some(reason) = tls_server::lone_half(&data_dir) {
            return errs.push(format!("{prefix}.data_dir"), reason);
        }
        let kept = cert.exists() && key.exists();
        if let Some(reason) = (!kept).then(|| unwritable_dir(&data_dir)).flatten() {
            errs.push(format!("{prefix}.data_dir"), reason);
        }
        let result = if kept {
            tls_server::load_identity(&cert, &key, client_ca).map(drop)
        } else if let Some(ca) = client_ca {
            tls_server::client_verifier(ca).map(drop)
        } else {
            Ok(())
        };
        if let Err(e) = result {
            let name = match identity_error_field(&e, client_ca) {
                "tls_client_ca_file" => "tunnel.tls_client_ca_file",
                _ => "data_dir",
            };
            errs.push(format!("{prefix}.{name}"), e.to_string());
        }
    }
}

/// Why the self-signed certificate could not be written into `dir`, created if missing, if it
/// could not: `run` would fail there on first start after check-config said OK. Whether the
/// nearest existing directory takes a new entry is tried, with a directory removed at once:
/// permission bits do not tell (root passes them; /proc takes nothing).
fn unwritable_dir(dir: &Path) -> Option<String> {
    // The whole path: the relative default `data` is in whatever directory ferry started in.
    let whole = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    let shown = whole.display();
    if dir.exists() && !dir.is_dir() {
        return Some(format!("{shown} exists and is not a directory"));
    }
    let existing = dir
        .ancestors()
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .find(|a| a.exists())?;
    if !existing.is_dir() {
        return Some(format!(
            "cannot create {shown}: {} is not a directory",
            existing.display()
        ));
    }
    let probe = existing.join(format!(".ferry-check-config-{}", std::process::id()));
    match std::fs::create_dir(&probe) {
        Ok(()) => {
            let _ = std::fs::remove_dir(&probe);
            None
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
        Err(e) if existing == dir => Some(format!(
            "cannot write the self-signed certificate into {shown}: {e}"
        )),
        Err(e) => Some(format!(
            "cannot create {shown}: {} does not take a new directory: {e}",
            existing.display()
        )),
    }
}

/// The names for the self-signed certificate, each checked and written as the certificate and
/// the agents' checks compare them (lowercase, without a trailing dot); a bad one is recorded
/// under `field[i]` and left out.
fn self_signed_names(raw: &[String], field: &str, errs: &mut ConfigErrors) -> Vec<String> {
    let mut names = Vec::new();
    for (i, name) in raw.iter().enumerate() {
        match self_signed_name(name) {
            Ok(name) if !names.contains(&name) => names.push(name),
            Ok(_) => {}
            Err(problem) => errs.push(format!("{field}[{i}]"), problem),
        }
    }
    names
}

/// `name` as a certificate name: an IP address, or a DNS name of RFC 1123 labels with an optional
/// leading `*.` wildcard; lowercase, without a trailing dot.
fn self_signed_name(name: &str) -> Result<String, String> {
    let bad =
        |why: &str| format!("{name:?} is not a DNS name or IP address for the certificate: {why}");
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(ip.to_string());
    }
    let lower = name.to_ascii_lowercase();
    let dns = lower.strip_suffix('.').unwrap_or(&lower);
    let (wildcard, rest) = match dns.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, dns),
    };
    if rest.is_empty() {
        return Err(bad("it is empty"));
    }
    if dns.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    let labels: Vec<&str> = rest.split('.').collect();
    for label in &labels {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Err(bad(
                "each label must be 1 to 63 letters, digits or inner hyphens (a wildcard only as a leading `*.`)",
            ));
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(bad(
            "an all-digit last label (not a valid IP address either)",
        ));
    }
    if wildcard && labels.len() < 2 {
        return Err(bad("a wildcard needs at least two labels after `*.`"));
    }
    Ok(dns.to_owned())
}

/// The `gateway.tunnel` field a TLS identity error is about.
fn identity_error_field(e: &TlsError, client_ca: Option<&Path>) -> &'static str {
    match e {
        TlsError::Cert { path, .. } if Some(path.as_path()) == client_ca => "tls_client_ca_file",
        TlsError::Key { .. } => "tls_key_file",
        _ => "tls_cert_file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid gateway section on loopback with an empty tokens file and data directory in `dir`.
    fn section(dir: &Path) -> GatewaySection {
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, "").unwrap();
        let mut s = GatewaySection::default();
        s.web.listen_address = "127.0.0.1:0".into();
        s.tunnel.listen_address = "127.0.0.1:0".into();
        s.auth.tokens_file = Some(tokens);
        s.data_dir = Some(dir.join("data"));
        s
    }

    fn validate(s: &GatewaySection, origin: &str) -> (Option<GatewayConfig>, Vec<String>) {
        let mut errs = ConfigErrors::new(origin);
        let config = s.validate("gateway", &mut errs);
        let lines = errs.to_string().lines().map(str::to_owned).collect();
        (config, lines)
    }

    /// What `run` would fail on when it generates the certificate, check-config says first.
    #[test]
    fn a_data_dir_that_cannot_hold_the_certificate_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = section(dir.path());
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        s.data_dir = Some(file.clone());
        let shown = file.display();
        assert_eq!(
            validate(&s, "g.yaml").1,
            [format!(
                "g.yaml: gateway.data_dir: {shown} exists and is not a directory"
            )]
        );
        s.data_dir = Some(file.join("data"));
        assert_eq!(
            validate(&s, "g.yaml").1,
            [format!(
                "g.yaml: gateway.data_dir: cannot create {shown}/data: {shown} is not a directory"
            )]
        );
        s.data_dir = Some("/proc/ferry/data".into());
        assert_eq!(
            validate(&s, "g.yaml").1,
            ["g.yaml: gateway.data_dir: cannot create /proc/ferry/data: /proc does not take a new directory: No such file or directory (os error 2)"]
        );
        // A directory still to be created, below one that takes it: nothing is left behind.
        s.data_dir = Some(dir.path().join("new/data"));
        assert!(validate(&s, "g.yaml").1.is_empty());
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["file", "tokens"]);
    }

    #[test]
    fn every_problem_of_the_web_config_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = section(dir.path());
        let web = dir.path().join("web.yml");
        std::fs::write(
            &web,
            "tls_server_config: { cert_file: nope.pem, key_file: nope.key }\nbasic_auth_users: { u: plain, v: text }\n",
        )
        .unwrap();
        s.web.config_file = Some(web.clone());
        let lines = validate(&s, "g.yaml").1;
        let at = format!("g.yaml: gateway.web.config_file: {}: ", web.display());
        let short: Vec<&str> = lines
            .iter()
            .map(|l| l.strip_prefix(&at).unwrap_or(l))
            .collect();
        assert_eq!(short.len(), 3, "{lines:#?}");
        assert!(short[0].starts_with("tls_server_config: "), "{lines:#?}");
        assert!(
            short[1].starts_with("basic_auth_users.u: not a bcrypt hash"),
            "{lines:#?}"
        );
        assert!(
            short[2].starts_with("basic_auth_users.v: not a bcrypt hash"),
            "{lines:#?}"
        );
    }

    #[test]
    fn plaintext_tunnels_refuse_a_client_ca_and_certificate_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = section(dir.path());
        s.tunnel.insecure_plaintext = true;
        s.tunnel.tls_client_ca_file = Some(dir.path().join("ca.pem"));
        s.tunnel.tls_self_signed_names = vec!["gw.example.com".into()];
        assert_eq!(
            validate(&s, "g.yaml").1,
            [
                "g.yaml: gateway.tunnel.tls_client_ca_file: set, but tunnel.insecure_plaintext turns TLS off: remove one of them",
                "g.yaml: gateway.tunnel.tls_self_signed_names: set, but tunnel.insecure_plaintext turns TLS off: remove one of them",
            ]
        );
        s.tunnel.tls_self_signed_names.clear();
        assert_eq!(
            validate(&s, "flags").1,
            ["invalid flag --tunnel.tls-client-ca-file: set, but --tunnel.insecure-plaintext turns TLS off: remove one of them"]
        );
    }

    #[test]
    fn certificate_files_refuse_names_for_the_self_signed_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = section(dir.path());
        s.tunnel.tls_cert_file = Some(dir.path().join("c.pem"));
        s.tunnel.tls_key_file = Some(dir.path().join("k.pem"));
        s.tunnel.tls_self_signed_names = vec!["gw.example.com".into()];
        let lines = validate(&s, "g.yaml").1;
        assert_eq!(
            lines[0],
            "g.yaml: gateway.tunnel.tls_self_signed_names: set, but tunnel.tls_cert_file replaces the self-signed certificate these names are for: remove one of them"
        );
    }

    #[test]
    fn self_signed_names_are_checked_and_written_as_compared() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = section(dir.path());
        s.tunnel.tls_self_signed_names = [
            "bad name!",
            "",
            "*.*",
            "999.1.1.1",
            "-a.example.com",
            "*.com",
        ]
        .map(String::from)
        .into();
        let (_, lines) = validate(&s, "g.yaml");
        let fields: Vec<&str> = lines
            .iter()
            .map(|l| l.split(": ").nth(1).unwrap())
            .collect();
        assert_eq!(
            fields,
            (0..6)
                .map(|i| format!("gateway.tunnel.tls_self_signed_names[{i}]"))
                .collect::<Vec<_>>()
        );
        assert!(
            lines[0].ends_with("\"bad name!\" is not a DNS name or IP address for the certificate: each label must be 1 to 63 letters, digits or inner hyphens (a wildcard only as a leading `*.`)"),
            "{lines:#?}"
        );

        s.tunnel.tls_self_signed_names = [
            "GW2.Example.com.",
            "gw2.example.com",
            "*.Example.org",
            "127.0.0.1",
            "::0001",
        ]
        .map(String::from)
        .into();
        let (config, lines) = validate(&s, "g.yaml");
        assert!(lines.is_empty(), "{lines:#?}");
        let Some(GatewayTls::SelfSigned { names, .. }) = config.map(|c| c.tls) else {
            panic!("not self-signed");
        };
        assert_eq!(
            names,
            ["gw2.example.com", "*.example.org", "127.0.0.1", "::1"]
        );
    }
}
