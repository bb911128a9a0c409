//! The `egress:` section and its validated form.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use serde::Deserialize;

use super::{
    anchor, check_client_tls, check_durations, check_readable, client_cert_pair,
    parse_listen_address, ConfigErrors, Dur,
};
use crate::auth::{TokensFile, CREDENTIALS_FILE};
use crate::egress::policy::{Clients, Upstream};
use crate::egress::validate::Validation;
use crate::tunnel::tls_client::{ClientTls, Purpose, ServerVerify};

/// The methods a rule may allow: RFC 9110's, and PATCH (RFC 5789).
const METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::CONNECT,
    Method::OPTIONS,
    Method::TRACE,
    Method::PATCH,
];

/// The default of `egress.max_buffered_body_bytes`: 32 bodies at the default `max_body_bytes`
/// (16 MiB) at once, and some 3000 of the ~170 KB pushes of a monitoring agent, while
/// `max_connections_per_client` × 16 MiB from a single client (4 GiB) no longer fits.
pub const DEFAULT_MAX_BUFFERED_BODY_BYTES: u64 = 512 << 20;

/// `egress:` as written in the YAML file (and filled from flags).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the egress section: a mapping of settings such as rules:"
)]
pub struct EgressSection {
    /// Where clients connect.
    pub web: EgressWebSection,
    /// CIDRs allowed to use the proxy (default: loopback only).
    pub allow_clients: Vec<String>,
    /// Destination rules in short form `HOST[:PORTS]` / `CIDR[:PORTS]`, any method, no validation.
    pub allow_upstreams: Vec<String>,
    /// Destination rules with methods, path prefix, validation and TLS upgrade.
    pub rules: Vec<RuleSection>,
    /// Client credentials: lines `<client-name glob> sha256:<hex of secret>` (Basic: name and password; Bearer: token).
    pub auth: EgressAuthSection,
    /// Connections at once from one client address.
    #[serde(deserialize_with = "super::lenient")]
    pub max_connections_per_client: usize,
    /// Time a client may take to send a request head once it has begun (slowloris bound), and a
    /// new connection to send its first byte.
    pub header_read_timeout: Dur,
    /// A kept-alive client connection with no request for this long is closed. Longer than the
    /// idle timeouts of common clients (Go: 90 s), so that they close first: a proxy closing an
    /// idle connection just as a client reuses it fails that request.
    pub idle_timeout: Dur,
    /// Largest request head (request line + headers), in bytes.
    #[serde(deserialize_with = "super::lenient")]
    pub max_header_bytes: usize,
    /// Time a client may take to send a request body (it is read whole before forwarding).
    pub body_read_timeout: Dur,
    /// Bytes of request bodies held at once, all clients together; past it requests get 503.
    #[serde(deserialize_with = "super::lenient")]
    pub max_buffered_body_bytes: u64,
    /// Time to connect to an upstream (and, with `tls_upgrade`, for the TLS handshake).
    pub connect_timeout: Dur,
    /// Time for the upstream's response (headers and body); also how long the client may take
    /// none of a response before it is disconnected.
    pub upstream_timeout: Dur,
    /// A pooled upstream connection unused this long is closed. Shorter than the keep-alive of
    /// common servers (Node.js, Apache: 5 s), so that the proxy closes it first: a server
    /// closing one just as the proxy reuses it fails that request with a 502.
    pub upstream_idle_timeout: Dur,
    /// CONNECT tunnels idle this long are closed.
    pub tunnel_idle_timeout: Dur,
    /// How long in-flight requests may finish after SIGTERM.
    pub shutdown_grace_period: Dur,
}

impl Default for EgressSection {
    fn default() -> Self {
        Self {
            web: EgressWebSection::default(),
            allow_clients: Vec::new(),
            allow_upstreams: Vec::new(),
            rules: Vec::new(),
            auth: EgressAuthSection::default(),
            max_connections_per_client: 256,
            header_read_timeout: Dur(Duration::from_secs(10)),
            idle_timeout: Dur(Duration::from_secs(120)),
            max_header_bytes: 16 << 10,
            body_read_timeout: Dur(Duration::from_secs(30)),
            max_buffered_body_bytes: DEFAULT_MAX_BUFFERED_BODY_BYTES,
            connect_timeout: Dur(Duration::from_secs(5)),
            upstream_timeout: Dur(Duration::from_secs(30)),
            upstream_idle_timeout: Dur(Duration::from_secs(4)),
            tunnel_idle_timeout: Dur(Duration::from_secs(300)),
            shutdown_grace_period: Dur(Duration::from_secs(15)),
        }
    }
}

/// `egress.web:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the egress web settings: a mapping such as {listen_address: ...}"
)]
pub struct EgressWebSection {
    /// Listen address.
    pub listen_address: String,
}

impl Default for EgressWebSection {
    fn default() -> Self {
        Self {
            listen_address: "127.0.0.1:9530".into(),
        }
    }
}

/// `egress.auth:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the auth settings: a mapping such as {credentials_file: ...}"
)]
pub struct EgressAuthSection {
    /// Credentials file; when set, every proxied request needs `Proxy-Authorization`.
    pub credentials_file: Option<PathBuf>,
}

/// One entry of `egress.rules:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, expecting = "a rule: {name: ..., upstream: ...}")]
pub struct RuleSection {
    /// Name in logs and metrics.
    pub name: String,
    /// `HOST[:PORTS]` or `CIDR[:PORTS]`.
    pub upstream: String,
    /// Allowed methods (`CONNECT` included if tunnels are wanted); empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Only paths starting with this.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Payload checks.
    #[serde(default)]
    pub validate: ValidateSection,
    /// Speak verified HTTPS to the upstream while the client speaks plain HTTP to the proxy.
    #[serde(default)]
    pub tls_upgrade: Option<TlsUpgradeSection>,
}

/// `egress.rules[].validate:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "a rule's payload checks: a mapping such as {json: true}"
)]
pub struct ValidateSection {
    /// Largest body as sent.
    #[serde(deserialize_with = "super::lenient_opt")]
    pub max_body_bytes: Option<u64>,
    /// Largest body after gzip/deflate/snappy decoding.
    #[serde(deserialize_with = "super::lenient_opt")]
    pub max_decoded_bytes: Option<u64>,
    /// Most memory the parsed tree of a body may take for the `json_schema_file` check.
    #[serde(deserialize_with = "super::lenient_opt")]
    pub max_json_tree_bytes: Option<u64>,
    /// Accepted media types.
    pub content_types: Vec<String>,
    /// Headers that must be present.
    pub required_headers: Vec<String>,
    /// Body must be well-formed JSON.
    #[serde(deserialize_with = "super::lenient")]
    pub json: bool,
    /// JSON Schema file the body must validate against.
    pub json_schema_file: Option<PathBuf>,
    /// `Content-MD5` must be present (always verified when present).
    #[serde(deserialize_with = "super::lenient")]
    pub require_content_md5: bool,
    /// Regular expressions; a body matching any is refused.
    pub deny_patterns: Vec<String>,
}

/// `egress.rules[].tls_upgrade:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(
    deny_unknown_fields,
    default,
    expecting = "the TLS upgrade settings: {} or {ca_file: ..., cert_file: ..., key_file: ...}"
)]
pub struct TlsUpgradeSection {
    /// Trust only CAs in this file (default: system roots).
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM, with its chain) presented to an upstream that asks for one.
    pub cert_file: Option<PathBuf>,
    /// Private key of `cert_file` (PEM).
    pub key_file: Option<PathBuf>,
}

/// A validated destination rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Name in logs and metrics.
    pub name: String,
    /// Where it allows traffic.
    pub upstream: Arc<Upstream>,
    /// Allowed methods; `None` means any.
    pub methods: Option<Vec<Method>>,
    /// Path prefix.
    pub path_prefix: Option<String>,
    /// Payload checks.
    pub validation: Validation,
    /// Upgrade to HTTPS toward the upstream.
    pub tls_upgrade: Option<ClientTls>,
}

impl Rule {
    /// Whether this rule inspects payloads (then CONNECT, which hides them, is refused).
    pub fn validates(&self) -> bool {
        let v = &self.validation;
        v.inspects_body() || !v.content_types.is_empty() || !v.required_headers.is_empty()
    }
}

/// The validated egress configuration.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Client allowlist.
    pub clients: Clients,
    /// Destination rules, first match wins.
    pub rules: Vec<Rule>,
    /// Credentials file, if clients must authenticate.
    pub credentials_file: Option<PathBuf>,
    /// Connection cap per client address.
    pub max_connections_per_client: usize,
    /// Header read bound, from a head's first byte.
    pub header_read_timeout: Duration,
    /// Keep-alive idle bound.
    pub idle_timeout: Duration,
    /// Request head size bound.
    pub max_header_bytes: usize,
    /// Request body read bound.
    pub body_read_timeout: Duration,
    /// Request body bytes held at once, all requests together.
    pub max_buffered_body_bytes: u64,
    /// Upstream connect bound.
    pub connect_timeout: Duration,
    /// Upstream response bound (and client write stall bound).
    pub upstream_timeout: Duration,
    /// Idle bound of pooled upstream connections.
    pub upstream_idle_timeout: Duration,
    /// Tunnel idle bound.
    pub tunnel_idle_timeout: Duration,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// Country lookup for connection metrics (the process-wide `geoip:` database).
    pub geo: crate::telemetry::geo::SharedGeo,
}

impl EgressSection {
    /// Reads the section's relative paths from `dir`, the directory of the file they were
    /// written in.
    pub(super) fn anchor_paths(&mut self, dir: &Path) {
        anchor(&mut self.auth.credentials_file, dir);
        for r in &mut self.rules {
            anchor(&mut r.validate.json_schema_file, dir);
            if let Some(tls) = &mut r.tls_upgrade {
                anchor(&mut tls.ca_file, dir);
                anchor(&mut tls.cert_file, dir);
                anchor(&mut tls.key_file, dir);
            }
        }
    }

    /// Validates into an [`EgressConfig`], recording every problem under `prefix`.
    pub fn validate(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<EgressConfig> {
        let f = |name: &str| format!("{prefix}.{name}");
        let listen = errs.check(
            &f("web.listen_address"),
            parse_listen_address(&self.web.listen_address),
        );
        let clients = self.validate_clients(&f("allow_clients"), listen, errs);
        let mut rules = Vec::new();
        for (i, raw) in self.allow_upstreams.iter().enumerate() {
            if let Some(upstream) = errs.check(
                &format!("{}[{i}]", f("allow_upstreams")),
                Upstream::parse(raw),
            ) {
                rules.push(Rule {
                    name: raw.clone(),
                    upstream: Arc::new(upstream),
                    methods: None,
                    path_prefix: None,
                    validation: Validation::default(),
                    tls_upgrade: None,
                });
            }
        }
        let mut names = std::collections::HashMap::new();
        for (i, section) in self.rules.iter().enumerate() {
            let field = format!("{}[{i}]", f("rules"));
            if let Some(first) = names.get(&section.name) {
                errs.push(
                    format!("{field}.name"),
                    format!(
                        "{:?} is used twice (also by {}[{first}]): logs and metrics could not tell them apart",
                        section.name,
                        f("rules")
                    ),
                );
            } else if !section.name.is_empty() {
                names.insert(section.name.clone(), i);
            }
            if let Some(rule) = section.validate(&field, errs) {
                rules.push(rule);
            }
            // Decoded bytes are taken from the same budget as received ones.
            if let Some(decoded) = section
                .validate
                .max_decoded_bytes
                .filter(|n| *n > self.max_buffered_body_bytes)
            {
                errs.push(
                    format!("{field}.validate.max_decoded_bytes"),
                    format!(
                        "{decoded} is more than egress.max_buffered_body_bytes ({}), which holds decoded bodies too: a body decoded past it could never be held",
                        self.max_buffered_body_bytes
                    ),
                );
            }
        }
        if let Some(path) = &self.auth.credentials_file {
            if let Err(e) = TokensFile::load_as(path, CREDENTIALS_FILE) {
                errs.push(f("auth.credentials_file"), e.to_string());
            }
        }
        if self.max_connections_per_client == 0 {
            errs.push(f("max_connections_per_client"), "must be greater than 0");
        }
        // Zero is "not at all" only for the grace period; a zero timeout would refuse every
        // request or tunnel at once.
        let bounds = [
            (
                "header_read_timeout",
                self.header_read_timeout,
                Dur::MIN_TIMEOUT,
            ),
            ("idle_timeout", self.idle_timeout, Dur::MIN_TIMEOUT),
            (
                "body_read_timeout",
                self.body_read_timeout,
                Dur::MIN_TIMEOUT,
            ),
            ("connect_timeout", self.connect_timeout, Dur::MIN_TIMEOUT),
            ("upstream_timeout", self.upstream_timeout, Dur::MIN_TIMEOUT),
            (
                "upstream_idle_timeout",
                self.upstream_idle_timeout,
                Dur::MIN_TIMEOUT,
            ),
            (
                "tunnel_idle_timeout",
                self.tunnel_idle_timeout,
                Dur::MIN_TIMEOUT,
            ),
            (
                "shutdown_grace_period",
                self.shutdown_grace_period,
                Dur::ZERO,
            ),
        ];
        check_durations(prefix, &bounds, errs);
        if self.max_header_bytes < 1024 {
            errs.push(f("max_header_bytes"), "must be at least 1024");
        }
        // A body larger than the whole budget could never be held: every such request would
        // get a 503.
        if let Some(rule) = rules
            .iter()
            .max_by_key(|r| r.validation.max_body_bytes)
            .filter(|r| r.validation.max_body_bytes > self.max_buffered_body_bytes)
        {
            errs.push(
                f("max_buffered_body_bytes"),
                format!(
                    "must be at least the largest max_body_bytes of a rule: rule {:?} takes bodies of up to {} bytes (16 MiB unless its validate says otherwise), which could never be held",
                    rule.name, rule.validation.max_body_bytes
                ),
            );
        }
        Some(EgressConfig {
            listen: listen?,
            clients: clients?,
            rules,
            credentials_file: self.auth.credentials_file.clone(),
            max_connections_per_client: self.max_connections_per_client,
            header_read_timeout: self.header_read_timeout.0,
            idle_timeout: self.idle_timeout.0,
            max_header_bytes: self.max_header_bytes,
            body_read_timeout: self.body_read_timeout.0,
            max_buffered_body_bytes: self.max_buffered_body_bytes,
            connect_timeout: self.connect_timeout.0,
            upstream_timeout: self.upstream_timeout.0,
            upstream_idle_timeout: self.upstream_idle_timeout.0,
            tunnel_idle_timeout: self.tunnel_idle_timeout.0,
            shutdown_grace: self.shutdown_grace_period.0,
            geo: crate::telemetry::geo::SharedGeo::disabled(),
        })
    }

    fn validate_clients(
        &self,
        field: &str,
        listen: Option<SocketAddr>,
        errs: &mut ConfigErrors,
    ) -> Option<Clients> {
        if self.allow_clients.is_empty() {
            if listen.is_some_and(|l| !l.ip().is_loopback()) {
                errs.push(field, "required when listening on a non-loopback address: name the client networks (e.g. --allow-client 10.0.0.0/8); the default allows loopback only");
                return None;
            }
            return Some(Clients::loopback());
        }
        let nets = super::parse_cidrs(&self.allow_clients, field, errs);
        Some(Clients::new(nets))
    }
}

impl RuleSection {
    fn validate(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<Rule> {
        let before = errs.errors.len();
        if self.name.is_empty() {
            errs.push(format!("{prefix}.name"), "required");
        }
        let upstream = if self.upstream.trim().is_empty() {
            errs.push(
                format!("{prefix}.upstream"),
                "required: HOST[:PORTS] or CIDR[:PORTS]",
            );
            None
        } else {
            errs.check(
                &format!("{prefix}.upstream"),
                Upstream::parse(&self.upstream),
            )
        };
        let methods = if self.methods.is_empty() {
            None
        } else {
            let mut out = Vec::new();
            for (i, m) in self.methods.iter().enumerate() {
                let upper = m.trim().to_ascii_uppercase();
                match METHODS.iter().find(|known| known.as_str() == upper) {
                    Some(method) => out.push(method.clone()),
                    None => errs.push(
                        format!("{prefix}.methods[{i}]"),
                        format!(
                            "{m:?} is not an HTTP method: use {}",
                            METHODS
                                .iter()
                                .map(Method::as_str)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                }
            }
            Some(out)
        };
        if let Some(p) = &self.path_prefix {
            if !p.starts_with('/') {
                errs.push(
                    format!("{prefix}.path_prefix"),
                    format!("{p:?} must start with /"),
                );
            }
        }
        let validation = self.validate.validate(&format!("{prefix}.validate"), errs);
        let tls_upgrade = self.tls_upgrade.as_ref().and_then(|t| {
            let field = format!("{prefix}.tls_upgrade");
            let before = errs.errors.len();
            if let Some(ca) = &t.ca_file {
                check_readable(ca, &format!("{field}.ca_file"), errs);
            }
            let tls = ClientTls {
                verify: match &t.ca_file {
                    Some(ca) => ServerVerify::CaFile(ca.clone()),
                    None => ServerVerify::SystemRoots,
                },
                client_cert: client_cert_pair(&t.cert_file, &t.key_file, &field, errs)?,
            };
            if errs.errors.len() == before {
                check_client_tls(&tls, Purpose::Target, &field, errs);
            }
            Some(tls)
        });
        if errs.errors.len() > before {
            return None;
        }
        Some(Rule {
            name: self.name.clone(),
            upstream: Arc::new(upstream?),
            methods,
            path_prefix: self.path_prefix.clone(),
            validation: validation?,
            tls_upgrade,
        })
    }
}

impl ValidateSection {
    fn validate(&self, prefix: &str, errs: &mut ConfigErrors) -> Option<Validation> {
        let defaults = Validation::default();
        let mut v = Validation {
            max_body_bytes: self.max_body_bytes.unwrap_or(defaults.max_body_bytes),
            max_decoded_bytes: self.max_decoded_bytes.unwrap_or(defaults.max_decoded_bytes),
            max_json_tree_bytes: self
                .max_json_tree_bytes
                .unwrap_or(defaults.max_json_tree_bytes),
            content_types: self
                .content_types
                .iter()
                .map(|t| t.trim().to_ascii_lowercase())
                .collect(),
            json: self.json,
            require_content_md5: self.require_content_md5,
            ..defaults
        };
        for h in &self.required_headers {
            match HeaderName::from_bytes(h.trim().as_bytes()) {
                Ok(name) => v.required_headers.push(name),
                Err(_) => errs.push(
                    format!("{prefix}.required_headers"),
                    format!("{h:?} is not a header name"),
                ),
            }
        }
        for (i, p) in self.deny_patterns.iter().enumerate() {
            match regex::bytes::Regex::new(p) {
                Ok(re) => v.deny_patterns.push(re),
                Err(e) => errs.push(
                    format!("{prefix}.deny_patterns[{i}]"),
                    format!(
                        "not a valid regular expression: {}",
                        e.to_string().replace('\n', " ")
                    ),
                ),
            }
        }
        if self.max_json_tree_bytes.is_some() && self.json_schema_file.is_none() {
            errs.push(
                format!("{prefix}.max_json_tree_bytes"),
                "applies only with json_schema_file (no tree is built without a schema)",
            );
        }
        if let Some(path) = &self.json_schema_file {
            match load_schema(path) {
                Ok(schema) => v.schema = Some(Arc::new(schema)),
                Err(e) => errs.push(format!("{prefix}.json_schema_file"), e),
            }
        }
        Some(v)
    }
}

fn load_schema(path: &std::path::Path) -> Result<jsonschema::Validator, String> {
    let text = crate::fs_util::read_regular_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    jsonschema::validator_for(&value)
        .map_err(|e| format!("{} is not a valid JSON Schema: {e}", path.display()))
}
