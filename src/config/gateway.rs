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
    /// Where the self-signed certificate is kept [default: `data`, in the working directory].
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
            if let Err(e) = crate::gateway::web_config::load(path) {
                errs.push(f("web.config_file"), e);
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
            shutdown_grace: self.shutdown_grace_period.0,
            geo: crate::telemetry::geo::SharedGeo::disabled(),
        })
    }

    fn validate_tls(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<GatewayTls> {
        let t = &self.tunnel;
        let field = |name: &str| format!("{prefix}.tunnel.{name}");
        match (&t.tls_cert_file, &t.tls_key_file, t.insecure_plaintext) {
            (None, None, true) => Some(GatewayTls::InsecurePlaintext),
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
                self.check_self_signed(prefix, errs);
                Some(GatewayTls::SelfSigned {
                    data_dir: self.data_dir(),
                    names: t.tls_self_signed_names.clone(),
                })
            }
        }
    }

    /// The directory of the self-signed certificate, `data` in the working directory unless set.
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
        let result = if cert.exists() && key.exists() {
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

/// The `gateway.tunnel` field a TLS identity error is about.
fn identity_error_field(e: &TlsError, client_ca: Option<&Path>) -> &'static str {
    match e {
        TlsError::Cert { path, .. } if Some(path.as_path()) == client_ca => "tls_client_ca_file",
        TlsError::Key { .. } => "tls_key_file",
        _ => "tls_cert_file",
    }
}
