//! The `agent:` section and its validated form.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use super::{
    anchor, check_client_tls, check_durations, check_label_name, check_readable, check_server_name,
    client_cert_pair, parse_listen_address, validate_keepalive, CollectorSection, ConfigErrors,
    Dur, Secret,
};
use crate::tunnel::dial::Proxy;
use crate::tunnel::handshake::{canonical_agent_id, reserved_agent_id, valid_agent_id};
use crate::tunnel::metrics_path;
use crate::tunnel::tls::parse_fingerprint;
use crate::tunnel::tls_client::{ClientTls, Purpose, ServerVerify};
use crate::tunnel::Keepalive;

/// Environment variable holding the agent's token when no token file is given.
pub const TOKEN_ENV: &str = "FERRY_TOKEN";
/// The shortest wait after the gateway refused the agent's credentials: a refusal does not go
/// away by asking again soon.
const MIN_AUTH_FAILURE_BACKOFF: Dur = Dur(Duration::from_secs(1));
/// Name of the built-in target serving the agent's own metrics.
pub const SELF_TARGET: &str = "ferry";

/// `agent:` as written in the YAML file (and filled from flags).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the agent section: a mapping of settings such as gateway: and targets:"
)]
pub struct AgentSection {
    /// `https://host:port` of the gateway's tunnel listener.
    pub gateway: Option<String>,
    /// The id this agent claims; defaults to the host's FQDN.
    pub agent_id: Option<String>,
    /// File holding the token (else `FERRY_TOKEN`).
    pub token_file: Option<PathBuf>,
    /// HTTP CONNECT proxy to reach the gateway through (else `HTTPS_PROXY`).
    pub proxy_url: Option<String>,
    /// How the tunnel is secured and kept alive.
    pub tunnel: AgentTunnelSection,
    /// The only things this agent will fetch.
    pub targets: Vec<TargetSection>,
    /// Labels attached to every target in service discovery.
    pub labels: BTreeMap<String, String>,
    /// Reconnect backoff.
    pub reconnect: ReconnectSection,
    /// Upper bound of any scrape timeout, whatever the gateway asks.
    pub scrape_timeout_max: Dur,
    /// A kept-alive connection to a target unused this long is closed: longer than the usual
    /// scrape intervals (15 s to 1 min), so that scrapes reuse it, yet bounded, so that targets
    /// that never close idle connections are not left with one per concurrent scrape for ever.
    pub target_idle_timeout: Dur,
    /// Port of the built-in `ferry` target (the agent's own metrics).
    #[serde(deserialize_with = "super::lenient")]
    pub self_port: u16,
    /// Optional local listener for the agent's own `/metrics` and health endpoints.
    pub web: AgentWebSection,
    /// How long in-flight scrapes may finish after SIGTERM.
    pub shutdown_grace_period: Dur,
    /// Collectors exported with the built-in `ferry` target.
    pub collector: CollectorSection,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            gateway: None,
            agent_id: None,
            token_file: None,
            proxy_url: None,
            tunnel: AgentTunnelSection::default(),
            targets: Vec::new(),
            labels: BTreeMap::new(),
            reconnect: ReconnectSection::default(),
            scrape_timeout_max: Dur(Duration::from_secs(60)),
            target_idle_timeout: Dur(Duration::from_secs(90)),
            self_port: 9369,
            web: AgentWebSection::default(),
            shutdown_grace_period: Dur(Duration::from_secs(15)),
            collector: CollectorSection::default(),
        }
    }
}

/// `agent.web:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the agent's web settings: a mapping such as {listen_address: ...}"
)]
pub struct AgentWebSection {
    /// Where to serve `/metrics`, `/-/healthy`, `/-/ready` locally; off when unset.
    pub listen_address: Option<String>,
}

/// `agent.tunnel:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the tunnel settings: a mapping such as {fingerprint: ...}"
)]
pub struct AgentTunnelSection {
    /// Trust only CAs from this PEM file.
    pub ca_file: Option<PathBuf>,
    /// Trust exactly the certificates with these `sha256:<hex>` fingerprints, any of them
    /// (one, or several while the gateway's certificate is replaced). The file takes a string
    /// or a list.
    #[serde(deserialize_with = "one_or_more")]
    pub fingerprint: Vec<String>,
    /// Client certificate to present (mTLS).
    pub cert_file: Option<PathBuf>,
    /// Client key.
    pub key_file: Option<PathBuf>,
    /// Name to verify the gateway's certificate against, if not the host of `gateway`.
    pub server_name: Option<String>,
    /// Dial without TLS (`http://` gateway). Only for tests and TLS-terminating front ends.
    #[serde(deserialize_with = "super::lenient")]
    pub insecure_plaintext: bool,
    /// HTTP/2 PING interval.
    pub keepalive_interval: Dur,
    /// HTTP/2 PING acknowledgement timeout.
    pub keepalive_timeout: Dur,
    /// Bound on TCP + TLS + upgrade.
    pub handshake_timeout: Dur,
    /// Concurrent scrapes served at once.
    #[serde(deserialize_with = "super::lenient")]
    pub max_concurrent_scrapes: u32,
}

impl Default for AgentTunnelSection {
    fn default() -> Self {
        let keepalive = Keepalive::default();
        Self {
            ca_file: None,
            fingerprint: Vec::new(),
            cert_file: None,
            key_file: None,
            server_name: None,
            insecure_plaintext: false,
            keepalive_interval: Dur(keepalive.interval),
            keepalive_timeout: Dur(keepalive.timeout),
            handshake_timeout: Dur(Duration::from_secs(10)),
            max_concurrent_scrapes: 128,
        }
    }
}

/// `agent.reconnect:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the reconnect settings: a mapping such as {max_backoff: 30s}"
)]
pub struct ReconnectSection {
    /// First backoff ceiling.
    pub min_backoff: Dur,
    /// Largest backoff ceiling.
    pub max_backoff: Dur,
    /// Wait after the gateway refused our credentials.
    pub auth_failure_backoff: Dur,
    /// A session that lasted this long resets the backoff.
    pub stable_after: Dur,
}

impl Default for ReconnectSection {
    fn default() -> Self {
        Self {
            min_backoff: Dur(Duration::from_millis(500)),
            max_backoff: Dur(Duration::from_secs(30)),
            auth_failure_backoff: Dur(Duration::from_secs(60)),
            stable_after: Dur(Duration::from_secs(30)),
        }
    }
}

/// One entry of `agent.targets:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, expecting = "a target: {name: ..., url: ...}")]
pub struct TargetSection {
    /// Name (`ferry_target` label).
    pub name: String,
    /// Where the agent fetches it: `http://` or `https://`, with host, port and path.
    pub url: String,
    /// Port Prometheus addresses it by, if not the URL's (keeps two targets apart).
    #[serde(default, deserialize_with = "super::lenient_opt")]
    pub port: Option<u16>,
    /// The target's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// TLS options for https targets.
    #[serde(default)]
    pub tls: TargetTlsSection,
}

/// `agent.targets[].tls:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a target's TLS settings: a mapping such as {ca_file: ...}"
)]
pub struct TargetTlsSection {
    /// Trust only CAs from this file.
    pub ca_file: Option<PathBuf>,
    /// Client certificate.
    pub cert_file: Option<PathBuf>,
    /// Client key.
    pub key_file: Option<PathBuf>,
    /// Name to verify the target's certificate against.
    pub server_name: Option<String>,
    /// Do not verify the target's certificate.
    #[serde(deserialize_with = "super::lenient")]
    pub insecure_skip_verify: bool,
}

/// Where the gateway is and how to trust it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEndpoint {
    /// `host:port` to dial.
    pub addr: String,
    /// Name for SNI, certificate verification and the `Host` header.
    pub server_name: String,
    /// TLS settings, `None` for an insecure plaintext tunnel.
    pub tls: Option<ClientTls>,
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// First ceiling.
    pub min: Duration,
    /// Largest ceiling.
    pub max: Duration,
    /// Wait after an auth refusal.
    pub auth_failure: Duration,
    /// Session length that resets the backoff.
    pub stable_after: Duration,
}

/// A validated target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Name.
    pub name: String,
    /// Where it is fetched.
    pub url: Uri,
    /// Port Prometheus addresses it by.
    pub port: u16,
    /// Path Prometheus asks for: the URL's, percent-decoded (`__metrics_path__`, which
    /// Prometheus encodes again when it scrapes).
    pub path: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// TLS settings for https targets.
    pub tls: Option<ClientTls>,
    /// SNI / verification name override.
    pub server_name: Option<String>,
}

/// Which variables left the environment's proxy out of the way to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyExemption {
    /// The variable naming the proxy: `HTTPS_PROXY` or `https_proxy`.
    pub proxy_var: &'static str,
    /// The variable exempting the gateway: `NO_PROXY` or `no_proxy`.
    pub no_proxy_var: &'static str,
}

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The gateway.
    pub gateway: GatewayEndpoint,
    /// Our id.
    pub agent_id: String,
    /// Our token, as read at start-up.
    pub token: Secret,
    /// Where the token came from, read again before each connection; `None`: `FERRY_TOKEN`, fixed.
    pub token_file: Option<PathBuf>,
    /// Proxy to reach the gateway through.
    pub proxy: Option<Proxy>,
    /// Set when `HTTPS_PROXY` names a proxy that `NO_PROXY` exempts the gateway from: the
    /// start-up log says why the tunnel goes direct.
    pub proxy_exempted: Option<ProxyExemption>,
    /// Targets (without the built-in one).
    pub targets: Vec<Target>,
    /// Agent labels.
    pub labels: BTreeMap<String, String>,
    /// HTTP/2 keepalive.
    pub keepalive: Keepalive,
    /// Bound on TCP + TLS + upgrade.
    pub handshake_timeout: Duration,
    /// Concurrent scrapes.
    pub max_concurrent_scrapes: u32,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// Largest scrape timeout.
    pub scrape_timeout_max: Duration,
    /// How long a kept-alive target connection may sit unused before it is closed.
    pub target_idle_timeout: Duration,
    /// Port of the built-in `ferry` target.
    pub self_port: u16,
    /// Local listener, if any.
    pub web_listen: Option<SocketAddr>,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// Excluded networks of the host connection collector; `None` when it is off.
    pub connections_collector: Option<Vec<ipnet::IpNet>>,
    /// Country lookup for connection metrics (the process-wide `geoip:` database).
    pub geo: crate::telemetry::geo::SharedGeo,
}

impl AgentSection {
    /// Reads the section's relative paths from `dir`, the directory of the file they were
    /// written in.
    pub(super) fn anchor_paths(&mut self, dir: &Path) {
        anchor(&mut self.token_file, dir);
        anchor(&mut self.tunnel.ca_file, dir);
        anchor(&mut self.tunnel.cert_file, dir);
        anchor(&mut self.tunnel.key_file, dir);
        for t in &mut self.targets {
            anchor(&mut t.tls.ca_file, dir);
            anchor(&mut t.tls.cert_file, dir);
            anchor(&mut t.tls.key_file, dir);
        }
    }

    /// Validates into an [`AgentConfig`], recording every problem under `prefix`.
    pub fn validate(
        &self,
        prefix: &str,
        env: &dyn Fn(&str) -> Option<String>,
        errs: &mut ConfigErrors,
    ) -> Option<AgentConfig> {
        let f = |name: &str| format!("{prefix}.{name}");
        let gateway = self.validate_gateway(prefix, errs);
        let agent_id = self.validate_agent_id(&f("agent_id"), errs);
        let token = self.read_token(&f("token_file"), env, errs);
        let (proxy, proxy_exempted) =
            self.validate_proxy(&f("proxy_url"), gateway.as_ref(), env, errs);
        let targets = self.validate_targets(&f("targets"), errs);
        for k in self.labels.keys() {
            check_label_name(k, &format!("{}.{k}", f("labels")), errs);
        }
        if let Some(targets) = &targets {
            // An invalid id is reported above; its length still counts here.
            let id = agent_id
                .as_deref()
                .or(self.agent_id.as_deref())
                .unwrap_or("");
            let size = crate::agent::targets::published_size_problem(
                id,
                targets,
                &self.labels,
                self.self_port,
            );
            if let Some(problem) = size {
                errs.push(f("targets"), problem);
            }
        }
        let web_listen = self
            .web
            .listen_address
            .as_ref()
            .and_then(|a| errs.check(&f("web.listen_address"), parse_listen_address(a)));
        let keepalive = validate_keepalive(
            &self.tunnel.keepalive_interval,
            &self.tunnel.keepalive_timeout,
            &f("tunnel"),
            errs,
        );
        let r = &self.reconnect;
        // A zero backoff redials in a busy loop, also after the gateway refused the token;
        // a refusal is retried slowly, at least a second apart.
        let bounds = [
            (
                "scrape_timeout_max",
                self.scrape_timeout_max,
                Dur::MIN_TIMEOUT,
            ),
            (
                "target_idle_timeout",
                self.target_idle_timeout,
                Dur::MIN_TIMEOUT,
            ),
            (
                "tunnel.handshake_timeout",
                self.tunnel.handshake_timeout,
                Dur::MIN_TIMEOUT,
            ),
            ("reconnect.min_backoff", r.min_backoff, Dur::MIN_TIMEOUT),
            (
                "reconnect.auth_failure_backoff",
                r.auth_failure_backoff,
                MIN_AUTH_FAILURE_BACKOFF,
            ),
            (
                "reconnect.stable_after",
                r.stable_after,
                Dur(Duration::from_secs(1)),
            ),
            (
                "shutdown_grace_period",
                self.shutdown_grace_period,
                Dur::ZERO,
            ),
        ];
        check_durations(prefix, &bounds, errs);
        let max_backoff = f("reconnect.max_backoff");
        r.max_backoff
            .check_range(Dur::MIN_TIMEOUT, Dur::MAX, &max_backoff, errs);
        if r.max_backoff >= Dur::MIN_TIMEOUT && r.max_backoff < r.min_backoff {
            let message = format!(
                "must be at least {} ({}), not {}",
                errs.setting(&f("reconnect.min_backoff")),
                r.min_backoff,
                r.max_backoff
            );
            errs.push(max_backoff, message);
        }
        if self.tunnel.max_concurrent_scrapes == 0 {
            errs.push(f("tunnel.max_concurrent_scrapes"), "must be greater than 0");
        }
        if self.self_port == 0 {
            errs.push(f("self_port"), "must not be 0");
        }
        let connections_collector = self.collector.validate(&f("collector"), errs);
        Some(AgentConfig {
            gateway: gateway?,
            agent_id: agent_id?,
            token: token?,
            token_file: self.token_file.clone(),
            proxy,
            proxy_exempted,
            targets: targets?,
            labels: self.labels.clone(),
            keepalive,
            handshake_timeout: self.tunnel.handshake_timeout.0,
            max_concurrent_scrapes: self.tunnel.max_concurrent_scrapes,
            backoff: BackoffConfig {
                min: r.min_backoff.0,
                max: r.max_backoff.0,
                auth_failure: r.auth_failure_backoff.0,
                stable_after: r.stable_after.0,
            },
            scrape_timeout_max: self.scrape_timeout_max.0,
            target_idle_timeout: self.target_idle_timeout.0,
            self_port: self.self_port,
            web_listen,
            shutdown_grace: self.shutdown_grace_period.0,
            connections_collector,
            geo: crate::telemetry::geo::SharedGeo::disabled(),
        })
    }

    fn validate_gateway(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<GatewayEndpoint> {
        let endpoint = self.gateway_endpoint(prefix, errs);
        if endpoint.is_none() && !self.tunnel.insecure_plaintext {
            // A bad gateway URL must not hide a bad fingerprint or CA file: every error at once.
            self.validate_tunnel_tls(prefix, errs);
        }
        endpoint
    }

    /// The gateway URL with its TLS settings; `None` (and errors) when the URL is unusable,
    /// before its TLS settings are looked at.
    fn gateway_endpoint(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<GatewayEndpoint> {
        let field = format!("{prefix}.gateway");
        let Some(url) = &self.gateway else {
            errs.push(
                field,
                "required: the gateway's tunnel address, e.g. https://gateway.example.com:7443",
            );
            return None;
        };
        if !url.contains("://") {
            errs.push(
                field,
                format!("{url:?} must start with https://, e.g. \"https://{url}\""),
            );
            return None;
        }
        let uri: Uri = errs.check(
            &field,
            url.parse::<Uri>()
                .map_err(|e| format!("{url:?} is not a URL: {e}")),
        )?;
        let t = &self.tunnel;
        let plaintext = match (uri.scheme_str(), t.insecure_plaintext) {
            (Some("https"), false) => false,
            (Some("http"), true) => true,
            (Some("http"), false) => {
                let plaintext = errs.setting(&format!("{prefix}.tunnel.insecure_plaintext"));
                errs.push(field, format!("{url:?} is plaintext: use https://, or set {plaintext} if you really mean it"));
                return None;
            }
            (Some("https"), true) => {
                errs.push(
                    format!("{prefix}.tunnel.insecure_plaintext"),
                    "set, but the gateway URL is https://",
                );
                return None;
            }
            _ => {
                errs.push(field, format!("{url:?} must start with https://"));
                return None;
            }
        };
        let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
            errs.push(field, format!("{url:?} has no host"));
            return None;
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            errs.push(
                field,
                format!("{url:?} must be https://HOST:PORT, without a path or query: the tunnel's path is fixed"),
            );
            return None;
        }
        if plaintext {
            self.reject_tls_options(prefix, errs);
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if plaintext { 80 } else { 443 });
        let addr = crate::http_util::authority(&host, port);
        let tls = if plaintext {
            None
        } else {
            if let Some(name) = &t.server_name {
                check_server_name(name, &format!("{prefix}.tunnel.server_name"), errs);
            }
            self.validate_tunnel_tls(prefix, errs)
        };
        Some(GatewayEndpoint {
            addr,
            server_name: t.server_name.clone().unwrap_or(host),
            tls,
        })
    }

    /// With `tunnel.insecure_plaintext`, TLS settings would be ignored: each set one is an error.
    fn reject_tls_options(&self, prefix: &str, errs: &mut ConfigErrors) {
        let t = &self.tunnel;
        let plaintext = errs.setting(&format!("{prefix}.tunnel.insecure_plaintext"));
        for (name, set) in [
            ("ca_file", t.ca_file.is_some()),
            ("fingerprint", !t.fingerprint.is_empty()),
            ("cert_file", t.cert_file.is_some()),
            ("key_file", t.key_file.is_some()),
            ("server_name", t.server_name.is_some()),
        ] {
            if set {
                errs.push(
                    format!("{prefix}.tunnel.{name}"),
                    format!("set, but {plaintext} turns TLS off: remove one of them"),
                );
            }
        }
    }

    fn validate_tunnel_tls(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<ClientTls> {
        let t = &self.tunnel;
        let field = |name: &str| format!("{prefix}.tunnel.{name}");
        let before = errs.errors.len();
        let verify = match (&t.ca_file, t.fingerprint.as_slice()) {
            (Some(_), [_, ..]) => {
                let message = format!(
                    "give either {} or {}, not both",
                    errs.setting(&field("ca_file")),
                    errs.setting(&field("fingerprint"))
                );
                errs.push(field("fingerprint"), message);
                return None;
            }
            (Some(ca), []) => {
                check_readable(ca, &field("ca_file"), errs);
                ServerVerify::CaFile(ca.clone())
            }
            (None, []) => ServerVerify::SystemRoots,
            (None, pins) => {
                let parsed: Vec<_> = pins
                    .iter()
                    .filter_map(|fp| errs.check(&field("fingerprint"), parse_fingerprint(fp)))
                    .collect();
                if parsed.len() < pins.len() {
                    return None;
                }
                ServerVerify::Fingerprints(parsed)
            }
        };
        let client_cert =
            client_cert_pair(&t.cert_file, &t.key_file, &format!("{prefix}.tunnel"), errs)?;
        let tls = ClientTls {
            verify,
            client_cert,
        };
        if errs.errors.len() == before {
            check_client_tls(&tls, Purpose::Tunnel, &format!("{prefix}.tunnel"), errs);
        }
        Some(tls)
    }

    /// The proxy of `proxy_url`, which must be `http://HOST:PORT`, else of `HTTPS_PROXY`, which
    /// may leave out the scheme as curl allows, unless `NO_PROXY` exempts the gateway (then said
    /// in the second half).
    fn validate_proxy(
        &self,
        field: &str,
        gateway: Option<&GatewayEndpoint>,
        env: &dyn Fn(&str) -> Option<String>,
        errs: &mut ConfigErrors,
    ) -> (Option<Proxy>, Option<ProxyExemption>) {
        match &self.proxy_url {
            Some(url) => (proxy_from_url(url, field, errs), None),
            None => proxy_from_env(gateway, env, errs),
        }
    }

    fn validate_agent_id(&self, field: &str, errs: &mut ConfigErrors) -> Option<String> {
        let id = match &self.agent_id {
            Some(id) => id.clone(),
            None => host_fqdn(),
        };
        if let Some(reason) = reserved_agent_id(&id) {
            errs.push(field, reason);
            None
        } else if valid_agent_id(&id) {
            // As the gateway will know it, so that both logs name the agent alike.
            Some(canonical_agent_id(&id).into_owned())
        } else {
            errs.push(
                field,
                format!("{id:?} is not a valid host name (letters, digits, '-', '.', '_')"),
            );
            None
        }
    }

    fn read_token(
        &self,
        field: &str,
        env: &dyn Fn(&str) -> Option<String>,
        errs: &mut ConfigErrors,
    ) -> Option<Secret> {
        match (&self.token_file, env(TOKEN_ENV)) {
            (Some(path), _) => read_token_file(path).map_err(|e| errs.push(field, e)).ok(),
            // The user set the variable, not the flag or field: its errors name the variable.
            (None, Some(t)) => check_token(&t, "its value", "it must hold")
                .map_err(|e| errs.push_env(TOKEN_ENV, e))
                .ok(),
            (None, None) => {
                errs.push(field, format!("required: a file holding the agent's token, or the {TOKEN_ENV} environment variable"));
                None
            }
        }
    }

    /// Validates every target, each one's problems in file order: its own fields, then whether
    /// its name or its port and path are already taken by an earlier one.
    fn validate_targets(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<Vec<Target>> {
        let mut out = Vec::new();
        let mut ok = true;
        let mut seen_names = std::collections::HashMap::new();
        let mut seen_addrs = std::collections::HashMap::from([(
            (self.self_port, "/metrics".to_owned()),
            (SELF_TARGET.to_owned(), "/metrics".to_owned()),
        )]);
        for (i, section) in self.targets.iter().enumerate() {
            let field = format!("{prefix}[{i}]");
            if section.name == SELF_TARGET {
                errs.push(
                    format!("{field}.name"),
                    format!("\"{SELF_TARGET}\" is the built-in target (the agent's own metrics): choose another name"),
                );
                ok = false;
            } else if let Some(reason) = crate::tunnel::reserved_target_name(&section.name) {
                errs.push(format!("{field}.name"), reason);
                ok = false;
            } else if let Some(first) = seen_names.get(&section.name) {
                let other = if errs.origin == "flags" {
                    format!("an earlier {}", errs.setting(prefix))
                } else {
                    format!("{prefix}[{first}]")
                };
                errs.push(
                    format!("{field}.name"),
                    format!("{:?} is used twice (also by {other})", section.name),
                );
                ok = false;
            } else {
                seen_names.insert(section.name.clone(), i);
            }
            let Some(t) = section.validate(&field, errs) else {
                ok = false;
                continue;
            };
            if let Some((other, other_path)) = seen_addrs.get(&(t.port, t.path.clone())) {
                let whose = if other == SELF_TARGET {
                    format!("the built-in target \"{SELF_TARGET}\" (the agent's own metrics, self_port)")
                } else {
                    format!("target {other:?}")
                };
                let path = t.url.path();
                // `/x!y` and `/x%21y` are one path to Prometheus, which decodes and re-encodes it.
                let same = match path == other_path {
                    true => String::new(),
                    false => format!(" as {other_path:?} (both are {:?} to Prometheus)", t.path),
                };
                errs.push(
                    format!("{field}.port"),
                    format!(
                        "port {} path {path:?} is already taken by {whose}{same}: give one of them a distinct `port` (config file)",
                        t.port
                    ),
                );
                ok = false;
            } else {
                seen_addrs.insert(
                    (t.port, t.path.clone()),
                    (t.name.clone(), t.url.path().to_owned()),
                );
            }
            out.push(t);
        }
        ok.then_some(out)
    }
}

impl TargetSection {
    /// Parses `NAME=URL`, as given to `--target`.
    pub fn parse_flag(s: &str) -> Result<TargetSection, String> {
        let (name, url) = s.split_once('=').ok_or_else(|| {
            format!("{s:?} must be NAME=URL, e.g. node=http://127.0.0.1:9100/metrics")
        })?;
        Ok(TargetSection {
            name: name.trim().to_owned(),
            url: url.trim().to_owned(),
            ..TargetSection::default()
        })
    }

    /// Checks this target as the config file's would be checked (name, URL, port, labels, TLS
    /// files), for [`crate::agent::Agent::set_targets`]; errors are named after `field`.
    pub fn to_target(&self, field: &str) -> Result<Target, ConfigErrors> {
        let mut errs = ConfigErrors::new("target");
        let target = self.validate(field, &mut errs);
        errs.finish(target)?
            .ok_or_else(|| ConfigErrors::new("target"))
    }

    fn validate(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<Target> {
        let before = errs.errors.len();
        if !crate::tunnel::valid_target_name(&self.name) {
            errs.push(
                format!("{prefix}.name"),
                format!(
                    "{:?} must be non-empty letters, digits, '-', '_' or '.'",
                    self.name
                ),
            );
        }
        let url = self.parse_url(&format!("{prefix}.url"), errs);
        // The gateway drops a target published with port 0.
        if self.port == Some(0) {
            errs.push(format!("{prefix}.port"), "must not be 0");
        }
        for k in self.labels.keys() {
            check_label_name(k, &format!("{prefix}.labels.{k}"), errs);
        }
        let tls = self.validate_tls(prefix, url.as_ref(), errs);
        let url = url?;
        let path = self.metrics_path(&url, &format!("{prefix}.url"), errs);
        if errs.errors.len() > before {
            return None;
        }
        let https = url.scheme_str() == Some("https");
        let port = self
            .port
            .or(url.port_u16())
            .unwrap_or(if https { 443 } else { 80 });
        Some(Target {
            name: self.name.clone(),
            path: path?,
            port,
            labels: self.labels.clone(),
            tls,
            server_name: self.tls.server_name.clone(),
            url,
        })
    }

    /// The path Prometheus is told to scrape: the URL's, decoded (see [`metrics_path`]), if it
    /// can be told apart from every other path.
    fn metrics_path(&self, url: &Uri, field: &str, errs: &mut ConfigErrors) -> Option<String> {
        let decoded = metrics_path::decode(url.path())
            .map_err(|problem| format!("target {:?}: path {:?} {problem}", self.name, url.path()));
        errs.check(field, decoded)
    }

    fn parse_url(&self, field: &str, errs: &mut ConfigErrors) -> Option<Uri> {
        let url = &self.url;
        if url.trim().is_empty() {
            errs.push(
                field,
                "the URL is empty: give where the agent fetches the target, e.g. \"http://127.0.0.1:9100/metrics\"",
            );
            return None;
        }
        // `127.0.0.1:9100/metrics` fails to parse as a URI with "invalid format": say what is missing.
        if !url.contains("://") {
            errs.push(
                field,
                format!("{url:?} must start with http:// or https://, e.g. \"http://{url}\""),
            );
            return None;
        }
        let uri: Uri = errs.check(
            field,
            url.parse::<Uri>()
                .map_err(|e| format!("{url:?} is not a URL: {e}")),
        )?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
            errs.push(
                field,
                format!("{url:?} must start with http:// or https://"),
            );
            return None;
        }
        if uri.host().is_none_or(str::is_empty) {
            errs.push(field, format!("{url:?} has no host"));
            return None;
        }
        if uri.port_u16() == Some(0) {
            errs.push(field, format!("{url:?} has port 0"));
            return None;
        }
        Some(uri)
    }

    fn validate_tls(
        &self,
        prefix: &str,
        url: Option<&Uri>,
        errs: &mut ConfigErrors,
    ) -> Option<ClientTls> {
        let t = &self.tls;
        let before = errs.errors.len();
        let https = url.is_some_and(|u| u.scheme_str() == Some("https"));
        let any_set = t.ca_file.is_some()
            || t.cert_file.is_some()
            || t.key_file.is_some()
            || t.server_name.is_some()
            || t.insecure_skip_verify;
        if !https {
            if any_set && url.is_some() {
                errs.push(format!("{prefix}.tls"), "TLS options need an https:// url");
            }
            return None;
        }
        let verify = match (&t.ca_file, t.insecure_skip_verify) {
            (Some(_), true) => {
                errs.push(
                    format!("{prefix}.tls.insecure_skip_verify"),
                    "cannot be combined with tls.ca_file",
                );
                return None;
            }
            (Some(ca), false) => {
                check_readable(ca, &format!("{prefix}.tls.ca_file"), errs);
                ServerVerify::CaFile(ca.clone())
            }
            (None, true) => ServerVerify::InsecureSkipVerify,
            (None, false) => ServerVerify::SystemRoots,
        };
        let client_cert =
            client_cert_pair(&t.cert_file, &t.key_file, &format!("{prefix}.tls"), errs)?;
        if let Some(name) = &t.server_name {
            check_server_name(name, &format!("{prefix}.tls.server_name"), errs);
        }
        let tls = ClientTls {
            verify,
            client_cert,
        };
        if errs.errors.len() == before {
            check_client_tls(&tls, Purpose::Target, &format!("{prefix}.tls"), errs);
        }
        Some(tls)
    }
}

/// Parses `KEY=VALUE`, as given to `--label`.
pub fn parse_label_flag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} must be KEY=VALUE"))
}

/// How long the default agent id may wait for the resolver's canonical host name.
const FQDN_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The host's fully qualified name, the agent id when none is given, found as `hostname --fqdn`
/// finds it: the kernel host name when it already has a dot, else the canonical name the
/// resolver gives for it. A resolver that does not answer within [`FQDN_LOOKUP_TIMEOUT`], or
/// answers with no dotted name, leaves the kernel host name.
pub(crate) fn host_fqdn() -> String {
    let short = gethostname::gethostname().to_string_lossy().into_owned();
    if short.contains('.') {
        return short;
    }
    #[cfg(target_os = "linux")]
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let name = short.clone();
        // getaddrinfo cannot be cancelled; a stuck lookup ends with its thread, unwaited.
        let spawned = std::thread::Builder::new()
            .name("fqdn-lookup".into())
            .spawn(move || {
                let _ = tx.send(canonical_name(&name));
            });
        if spawned.is_ok() {
            if let Ok(Some(fqdn)) = rx.recv_timeout(FQDN_LOOKUP_TIMEOUT) {
                if fqdn.contains('.') && valid_agent_id(&fqdn) {
                    return fqdn;
                }
            }
        }
    }
    short
}

/// The resolver's canonical name for `host` (getaddrinfo with `AI_CANONNAME`).
#[cfg(target_os = "linux")]
fn canonical_name(host: &str) -> Option<String> {
    let c_host = std::ffi::CString::new(host).ok()?;
    // SAFETY: an all-zero addrinfo is the documented "no hints" value; we set two fields.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_flags = libc::AI_CANONNAME;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid C strings and pointers; `res` is freed below when the call succeeded.
    let rc = unsafe { libc::getaddrinfo(c_host.as_ptr(), std::ptr::null(), &hints, &mut res) };
    if rc != 0 || res.is_null() {
        return None;
    }
    // SAFETY: `res` points to the list getaddrinfo returned; with AI_CANONNAME the first entry's
    // ai_canonname is null or a NUL-terminated string owned by that list.
    let name = unsafe {
        let canon = (*res).ai_canonname;
        (!canon.is_null()).then(|| {
            std::ffi::CStr::from_ptr(canon)
                .to_string_lossy()
                .into_owned()
        })
    };
    // SAFETY: freed once, after the last use of the list.
    unsafe { libc::freeaddrinfo(res) };
    name
}

/// Reads the agent's token from `path`: at start-up, and again before every connection, so a
/// token written into the file (rotation) is used without a restart.
pub fn read_token_file(path: &Path) -> Result<Secret, String> {
    let text = crate::fs_util::read_regular_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    check_token(
        &text,
        &path.display().to_string(),
        "the agent's token file holds",
    )
}

/// The proxy of `proxy_url` (`field`), which must be `http://HOST:PORT`.
fn proxy_from_url(url: &str, field: &str, errs: &mut ConfigErrors) -> Option<Proxy> {
    let uri = url.parse::<Uri>().ok();
    if uri.as_ref().and_then(Uri::scheme_str).is_none() {
        errs.push(
            field,
            format!("{url:?} must start with http://, e.g. http://proxy.example.com:3128"),
        );
        return None;
    }
    if uri.is_some_and(|u| !matches!(u.path(), "" | "/") || u.query().is_some()) {
        errs.push(
            field,
            format!("{url:?} must be http://HOST:PORT, without a path or query"),
        );
        return None;
    }
    let origin = errs.setting(field);
    errs.check(field, Proxy::parse(url, &origin))
}

/// The proxy of `HTTPS_PROXY` (or `https_proxy`), unless `NO_PROXY` (or `no_proxy`) exempts
/// the gateway, as curl and Go's clients decide. Its errors name the variable: the user set no
/// field or flag.
fn proxy_from_env(
    gateway: Option<&GatewayEndpoint>,
    env: &dyn Fn(&str) -> Option<String>,
    errs: &mut ConfigErrors,
) -> (Option<Proxy>, Option<ProxyExemption>) {
    let first_set = |names: [&'static str; 2]| {
        names
            .into_iter()
            .find_map(|name| env(name).filter(|v| !v.is_empty()).map(|v| (name, v)))
    };
    let Some((var, url)) = first_set(["HTTPS_PROXY", "https_proxy"]) else {
        return (None, None);
    };
    if let (Some((no_proxy_var, no_proxy)), Some((host, port))) = (
        first_set(["NO_PROXY", "no_proxy"]),
        gateway.and_then(|g| g.addr.rsplit_once(':')),
    ) {
        if port
            .parse()
            .is_ok_and(|port| crate::tunnel::no_proxy::exempts(&no_proxy, host, port))
        {
            let exemption = ProxyExemption {
                proxy_var: var,
                no_proxy_var,
            };
            return (None, Some(exemption));
        }
    }
    let proxy = Proxy::parse(&url, var).map_err(|e| errs.push_env(var, e));
    (proxy.ok(), None)
}

/// The token in `text` (read from `source`), surrounding whitespace removed. What the gateway's
/// tokens file holds instead (a line, a hash) is refused here, with what belongs where, rather
/// than by the gateway with a 401 retried slowly: `holds` says where the token itself goes
/// ("the agent's token file holds").
fn check_token(text: &str, source: &str, holds: &str) -> Result<Secret, String> {
    // As in the tokens file: an editor's byte-order mark is not part of the token.
    let token = text.trim_start_matches('\u{feff}').trim();
    if token.is_empty() {
        return Err(format!("{source} holds no token (it is empty)"));
    }
    if is_token_hash(token) {
        return Err(format!(
            "{source} holds the token's hash (for the gateway's tokens file), not the token"
        ));
    }
    if token.split_whitespace().any(is_token_hash) {
        return Err(format!(
            "{source} holds a line of the gateway's tokens file (glob and hash); {holds} the token itself (the \"token:\" value ferry token new printed)"
        ));
    }
    // `ferry token new` prints the token as "token: <hex>": the whole line pasted.
    if let Some(rest) = token.strip_prefix("token:") {
        if !rest.trim().is_empty() && !rest.trim().contains(char::is_whitespace) {
            return Err(format!(
                "{source} holds the line \"token: ...\" that ferry token new printed; {holds} only the token after \"token:\""
            ));
        }
    }
    if token.contains(char::is_whitespace) || !token.is_ascii() {
        return Err(format!(
            "the token in {source} must be one word of printable ASCII"
        ));
    }
    Ok(Secret::new(token))
}

/// Whether `word` is a token's hash as the tokens file holds it: `sha256:` and 64 hex digits.
fn is_token_hash(word: &str) -> bool {
    word.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `fingerprint:` as one string or a list of them.
fn one_or_more<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a sha256:<hex> fingerprint or a list of them")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_owned()])
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(fp) = seq.next_element::<String>()? {
                out.push(fp);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Visitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxy of an agent dialling `gateway` with `proxy_url`, in an environment of `vars`,
    /// or the errors as the flags' origin prints them.
    fn proxy_for(
        gateway: &str,
        proxy_url: Option<&str>,
        vars: &[(&str, &str)],
    ) -> Result<Option<Proxy>, String> {
        let section = AgentSection {
            gateway: Some(gateway.to_owned()),
            agent_id: Some("a".into()),
            proxy_url: proxy_url.map(str::to_owned),
            ..AgentSection::default()
        };
        let env = |name: &str| {
            (name == TOKEN_ENV).then(|| "t".to_owned()).or_else(|| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            })
        };
        let mut errs = ConfigErrors::new("flags");
        let cfg = section.validate("agent", &env, &mut errs);
        match errs.errors.is_empty() {
            true => Ok(cfg.and_then(|c| c.proxy)),
            false => Err(errs.to_string()),
        }
    }

    /// `tunnel: {fingerprint: ...}` as written in the file, validated: the digests pinned, or
    /// the errors.
    fn pins(tunnel_yaml: &str) -> Result<ServerVerify, String> {
        let yaml = format!("gateway: https://gw:7443\nagent_id: a\ntunnel: {tunnel_yaml}\n");
        let section: AgentSection = serde_yaml_ng::from_str(&yaml).map_err(|e| e.to_string())?;
        let env = |name: &str| (name == TOKEN_ENV).then(|| "t".to_owned());
        let mut errs = ConfigErrors::new("a.yaml");
        let cfg = section.validate("agent", &env, &mut errs);
        match cfg {
            Some(cfg) if errs.errors.is_empty() => Ok(cfg.gateway.tls.unwrap().verify),
            _ => Err(errs.to_string()),
        }
    }

    #[test]
    fn fingerprint_takes_one_string_or_a_list() {
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        let digest = |hex: &str| parse_fingerprint(&format!("sha256:{hex}")).unwrap();
        assert_eq!(
            pins(&format!("{{ fingerprint: 'sha256:{a}' }}")),
            Ok(ServerVerify::Fingerprints(vec![digest(&a)]))
        );
        assert_eq!(
            pins(&format!("{{ fingerprint: ['sha256:{a}', 'sha256:{b}'] }}")),
            Ok(ServerVerify::Fingerprints(vec![digest(&a), digest(&b)]))
        );
        assert_eq!(pins("{ fingerprint: [] }"), Ok(ServerVerify::SystemRoots));
        let err = pins(&format!("{{ fingerprint: ['sha256:{a}', 'sha256:zz'] }}")).unwrap_err();
        assert_eq!(
            err,
            "a.yaml: agent.tunnel.fingerprint: \"sha256:zz\" must be sha256: followed by 64 hex digits"
        );
        let err = pins("{ fingerprint: { sha256: x } }").unwrap_err();
        assert!(
            err.contains("a sha256:<hex> fingerprint or a list of them"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_gateway_url_does_not_hide_a_bad_fingerprint() {
        let section = AgentSection {
            gateway: Some("ftp://gw:7443".into()),
            agent_id: Some("a".into()),
            tunnel: AgentTunnelSection {
                fingerprint: vec!["nothex".into()],
                ..AgentTunnelSection::default()
            },
            ..AgentSection::default()
        };
        let env = |name: &str| (name == TOKEN_ENV).then(|| "t".to_owned());
        let mut errs = ConfigErrors::new("a.yaml");
        assert!(section.validate("agent", &env, &mut errs).is_none());
        assert_eq!(
            errs.to_string(),
            "a.yaml: agent.gateway: \"ftp://gw:7443\" must start with https://\n\
             a.yaml: agent.tunnel.fingerprint: \"nothex\" must start with sha256:"
        );
    }

    /// The agent id `id` validates to, or the errors.
    fn agent_id(id: &str) -> Result<String, String> {
        let section = AgentSection {
            gateway: Some("https://gw:7443".into()),
            agent_id: Some(id.into()),
            ..AgentSection::default()
        };
        let env = |name: &str| (name == TOKEN_ENV).then(|| "t".to_owned());
        let mut errs = ConfigErrors::new("flags");
        let cfg = section.validate("agent", &env, &mut errs);
        cfg.map(|c| c.agent_id).ok_or_else(|| errs.to_string())
    }

    #[test]
    fn agent_ids_are_canonical_host_names_and_unknown_is_reserved() {
        assert_eq!(
            agent_id("Node-1.Example.COM.").unwrap(),
            "node-1.example.com"
        );
        for reserved in ["unknown", "UNKNOWN", "unknown."] {
            let err = agent_id(reserved).unwrap_err();
            assert!(
                err.contains("--agent-id") && err.contains("is reserved"),
                "{err}"
            );
        }
    }

    fn proxy_addr(proxy: Result<Option<Proxy>, String>) -> Option<String> {
        proxy.unwrap().map(|p| p.addr)
    }

    #[test]
    fn no_proxy_exempts_the_gateway_from_the_environments_proxy_only() {
        let gw = "https://gw.example.com:7443";
        let proxy = ("HTTPS_PROXY", "http://proxy:3128");
        assert_eq!(
            proxy_addr(proxy_for(gw, None, &[proxy])),
            Some("proxy:3128".into())
        );
        for no_proxy in [
            "example.com",
            ".example.com",
            "*",
            "other, gw.example.com:7443",
        ] {
            assert_eq!(
                proxy_addr(proxy_for(gw, None, &[proxy, ("NO_PROXY", no_proxy)])),
                None,
                "NO_PROXY={no_proxy}"
            );
            assert_eq!(
                proxy_addr(proxy_for(gw, None, &[proxy, ("no_proxy", no_proxy)])),
                None,
                "no_proxy={no_proxy}"
            );
        }
        for no_proxy in ["gw.example.com:443", "other.example.org", "10.0.0.0/8"] {
            assert_eq!(
                proxy_addr(proxy_for(gw, None, &[proxy, ("NO_PROXY", no_proxy)])),
                Some("proxy:3128".into()),
                "NO_PROXY={no_proxy}"
            );
        }
        let by_address = [("https_proxy", "proxy:3128"), ("NO_PROXY", "10.0.0.0/8")];
        assert_eq!(
            proxy_addr(proxy_for("https://10.1.2.3:7443", None, &by_address)),
            None
        );
        assert_eq!(
            proxy_addr(proxy_for(
                "https://[fd00::1]:7443",
                None,
                &[proxy, ("NO_PROXY", "fd00::/8")]
            )),
            None
        );
        // An explicit proxy_url is used as given.
        assert_eq!(
            proxy_addr(proxy_for(
                gw,
                Some("http://explicit:3128"),
                &[proxy, ("NO_PROXY", "*")]
            )),
            Some("explicit:3128".into())
        );
    }

    #[test]
    fn a_bad_proxy_from_the_environment_names_the_variable() {
        let gw = "https://gw.example.com:7443";
        let err = proxy_for(gw, None, &[("https_proxy", "https://proxy:3128")]).unwrap_err();
        assert_eq!(
            err,
            "environment variable https_proxy: \"https://proxy:3128\": proxy scheme \"https\" is not supported, use http://"
        );
        let err = proxy_for(gw, Some("https://proxy:3128"), &[]).unwrap_err();
        assert!(err.starts_with("invalid flag --proxy-url: "), "{err}");
    }

    #[test]
    fn a_token_file_may_start_with_a_byte_order_mark() {
        let token = check_token("\u{feff}s3cret\n", "f", "f holds").unwrap();
        assert_eq!(token.expose(), "s3cret");
        assert!(check_token("\u{feff}\n", "f", "f holds")
            .unwrap_err()
            .contains("holds no token"));
    }

    #[test]
    fn a_proxy_knows_where_it_was_configured() {
        let gw = "https://gw.example.com:7443";
        let proxy = proxy_for(gw, None, &[("https_proxy", "http://proxy:3128")]);
        assert_eq!(proxy.unwrap().unwrap().origin, "https_proxy");
        let proxy = proxy_for(gw, Some("http://proxy:3128"), &[]);
        assert_eq!(proxy.unwrap().unwrap().origin, "--proxy-url");
    }

    /// Same answer as `hostname --fqdn` (which resolves the name the same way), or the kernel
    /// host name where that cannot resolve it.
    #[test]
    fn the_default_agent_id_is_the_hosts_fqdn() {
        let short = gethostname::gethostname().to_string_lossy().into_owned();
        let out = std::process::Command::new("hostname")
            .arg("--fqdn")
            .output()
            .expect("run hostname --fqdn (Debian's essential hostname package)");
        let told = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let expected = if out.status.success() && told.contains('.') {
            told
        } else {
            short
        };
        assert_eq!(host_fqdn(), expected);
        assert!(valid_agent_id(&host_fqdn()));
    }

    /// What belongs in the gateway's tokens file, pasted where the agent's token goes, is
    /// refused at start with what goes where: the gateway would refuse it with a 401 only.
    #[test]
    fn a_tokens_file_line_or_hash_is_not_taken_for_the_token() {
        let hash = format!("sha256:{}", "a1".repeat(32));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent-token");
        let shown = file.display().to_string();
        let from_file = |text: &str| {
            std::fs::write(&file, text).unwrap();
            read_token_file(&file).map(|t| t.expose().to_owned())
        };
        assert_eq!(
            from_file(&format!("node-* {hash}\n")).unwrap_err(),
            format!("{shown} holds a line of the gateway's tokens file (glob and hash); the agent's token file holds the token itself (the \"token:\" value ferry token new printed)")
        );
        assert_eq!(
            from_file(&format!("{hash}\n")).unwrap_err(),
            format!(
                "{shown} holds the token's hash (for the gateway's tokens file), not the token"
            )
        );
        assert_eq!(
            from_file("b2".repeat(32).as_str()).unwrap(),
            "b2".repeat(32)
        );

        let from_env = |value: String| {
            let section = AgentSection {
                gateway: Some("https://gw:7443".into()),
                agent_id: Some("a".into()),
                ..AgentSection::default()
            };
            let env = |name: &str| (name == TOKEN_ENV).then(|| value.clone());
            let mut errs = ConfigErrors::new("flags");
            section.validate("agent", &env, &mut errs);
            errs.to_string()
        };
        assert_eq!(
            from_env(format!("* {hash}")),
            "environment variable FERRY_TOKEN: its value holds a line of the gateway's tokens file (glob and hash); it must hold the token itself (the \"token:\" value ferry token new printed)"
        );
        assert_eq!(
            from_env(hash),
            "environment variable FERRY_TOKEN: its value holds the token's hash (for the gateway's tokens file), not the token"
        );
        let token = "b2".repeat(32);
        assert_eq!(
            from_env(format!("token:            {token}\n")),
            "environment variable FERRY_TOKEN: its value holds the line \"token: ...\" that ferry token new printed; it must hold only the token after \"token:\""
        );
        assert_eq!(
            from_file(&format!("token:  {token}\n")).unwrap_err(),
            format!("{shown} holds the line \"token: ...\" that ferry token new printed; the agent's token file holds only the token after \"token:\"")
        );
    }

    #[test]
    fn an_empty_target_url_is_called_empty() {
        let section = TargetSection {
            name: "node".into(),
            url: String::new(),
            ..TargetSection::default()
        };
        let err = section.to_target("targets[0]").unwrap_err().to_string();
        assert_eq!(
            err.trim_end(),
            "target: targets[0].url: the URL is empty: give where the agent fetches the target, e.g. \"http://127.0.0.1:9100/metrics\""
        );
    }

    /// The gateway drops a target published with port 0: the agent must not publish one.
    #[test]
    fn a_target_port_of_0_is_refused() {
        let section = TargetSection {
            name: "node".into(),
            url: "http://127.0.0.1:9100/metrics".into(),
            port: Some(0),
            ..TargetSection::default()
        };
        let err = section.to_target("targets[0]").unwrap_err().to_string();
        assert_eq!(err.trim_end(), "target: targets[0].port: must not be 0");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_resolvers_canonical_name_is_read() {
        assert_eq!(canonical_name("localhost").as_deref(), Some("localhost"));
        assert_eq!(canonical_name("no-such-host.invalid"), None);
    }
}
