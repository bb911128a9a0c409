//! Absolute-form requests: pick the rule, read and validate the whole body (bounded), then
//! forward it over a pooled upstream connection — plain, or upgraded to verified HTTPS. A refused
//! request never reaches the upstream, not even in part.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderName, Method, Request, Response, Uri};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::access::AccessRecord;
use super::budget::Held;
use super::connector::{
    checked_addrs, resolve, CheckedConnector, ConnectError, TlsConnector, TlsWords, UpstreamTracker,
};
use super::framing::Claim;
use super::policy::{parse_ip_literal, Destination, SharedResolver};
use super::refusal::Refusal;
use super::{refused, State};
use crate::config::{EgressConfig, Rule};
use crate::http_util::{boxed, strip_hop_by_hop, Body, BodyEnd, BoundedBody};
use crate::tunnel::tls::TlsError;
use crate::tunnel::tls_cert::{DateProblem, LeafInfo};
use crate::tunnel::tls_client::{client_config, Purpose, ServerVerify};

/// A pooled client toward one rule's upstreams.
#[derive(Clone)]
enum UpstreamClient {
    Plain(Client<CheckedConnector, Body>),
    Tls(Client<TlsConnector, Body>),
}

impl UpstreamClient {
    async fn request(
        &self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        match self {
            UpstreamClient::Plain(c) => c.request(req).await,
            UpstreamClient::Tls(c) => c.request(req).await,
        }
    }
}

/// One pooled client per rule, in rule order.
pub(crate) struct Upstreams {
    clients: Vec<UpstreamClient>,
    /// What was wrong with each rule's client certificate's dates when it was read.
    cert_dates: Vec<Option<DateProblem>>,
    /// SHA-256 of each `tls_upgrade` rule's files as they were read, to tell a reload that
    /// changed them from one that did not.
    tls_files: Vec<Option<[u8; 32]>>,
}

impl Upstreams {
    pub(crate) fn build(
        config: &EgressConfig,
        resolver: &SharedResolver,
        tracker: &UpstreamTracker,
    ) -> Result<Upstreams, TlsError> {
        let clients = config
            .rules
            .iter()
            .map(|rule| {
                let connector = CheckedConnector::new(
                    rule.upstream.clone(),
                    resolver.clone(),
                    config.connect_timeout,
                    tracker.clone(),
                );
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    // Without a timer the pool only notices an idle connection expired when
                    // its destination is used again: until then it holds a descriptor and the
                    // upstream's connection slot.
                    .pool_timer(hyper_util::rt::TokioTimer::new())
                    .pool_idle_timeout(config.upstream_idle_timeout)
                    .pool_max_idle_per_host(64);
                Ok(match &rule.tls_upgrade {
                    None => UpstreamClient::Plain(builder.build(connector)),
                    Some(tls) => {
                        let tls_config = client_config(tls, Purpose::Target)?;
                        let connector = TlsConnector::new(connector, tls_config, tls_words(rule));
                        UpstreamClient::Tls(builder.build(connector))
                    }
                })
            })
            .collect::<Result<_, TlsError>>()?;
        let cert_dates = config.rules.iter().map(client_cert_dates).collect();
        let tls_files = config.rules.iter().map(tls_files_digest).collect();
        Ok(Upstreams {
            clients,
            cert_dates,
            tls_files,
        })
    }

    /// The rules of `config` whose TLS files differ between these and `new`.
    pub(crate) fn changed_in<'a>(&self, new: &Upstreams, config: &'a EgressConfig) -> Vec<&'a str> {
        config
            .rules
            .iter()
            .zip(self.tls_files.iter().zip(&new.tls_files))
            .filter(|(_, (old, new))| old != new)
            .map(|(rule, _)| rule.name.as_str())
            .collect()
    }

    /// Logs a warning for each rule whose client certificate the upstream will refuse for its
    /// dates: it loads without complaint and fails every handshake.
    pub(crate) fn warn_about_dates(config: &EgressConfig) {
        let now = std::time::SystemTime::now();
        for rule in &config.rules {
            let Some((cert, _)) = rule
                .tls_upgrade
                .as_ref()
                .and_then(|t| t.client_cert.as_ref())
            else {
                continue;
            };
            if let Some(problem) = LeafInfo::client_problem(cert, now, "upstreams refuse") {
                tracing::warn!(rule = %rule.name, "egress client certificate (tls_upgrade.cert_file): {problem}");
            }
        }
    }

    /// Why `new`, read for `config` by a reload, must not replace these: a rule whose client
    /// certificate is valid now would get one that is not (the upstream refuses it in every
    /// handshake until it is renewed, instead of until the old one expires).
    pub(crate) fn refuses_dates_of(
        &self,
        new: &Upstreams,
        config: &EgressConfig,
    ) -> Option<String> {
        let now = std::time::SystemTime::now();
        config
            .rules
            .iter()
            .zip(self.cert_dates.iter().zip(&new.cert_dates))
            .find_map(|(rule, (old, new))| match (old, new) {
                (None, Some(_)) => {
                    let (cert, _) = rule.tls_upgrade.as_ref()?.client_cert.as_ref()?;
                    let problem = LeafInfo::client_problem(cert, now, "upstreams refuse")?;
                    Some(format!(
                        "rule {:?}: {problem}; the certificate in use, valid now, stays",
                        rule.name
                    ))
                }
                _ => None,
            })
    }
}

/// SHA-256 over the files of `rule`'s `tls_upgrade` (CA, client certificate, key), if it has
/// one; a file that cannot be read counts as empty (loading it has said so).
fn tls_files_digest(rule: &Rule) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let tls = rule.tls_upgrade.as_ref()?;
    let mut hash = Sha256::new();
    let ca = match &tls.verify {
        ServerVerify::CaFile(ca) => Some(ca),
        _ => None,
    };
    let (cert, key) = tls.client_cert.as_ref().map(|(c, k)| (c, k)).unzip();
    for file in [ca, cert, key] {
        let bytes = file.and_then(|f| crate::fs_util::read_regular(f).ok());
        // Each file's length first, so that bytes cannot move from one file to the next unseen.
        let bytes = bytes.unwrap_or_default();
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
    }
    Some(hash.finalize().into())
}

/// What is wrong with the dates of `rule`'s client certificate now, if it has one.
fn client_cert_dates(rule: &Rule) -> Option<DateProblem> {
    let (cert, _) = rule.tls_upgrade.as_ref()?.client_cert.as_ref()?;
    LeafInfo::file_date_problem(cert, std::time::SystemTime::now())
}

/// What the refusals of `rule`'s TLS handshakes say about its settings.
fn tls_words(rule: &Rule) -> TlsWords {
    let tls = rule.tls_upgrade.as_ref();
    TlsWords {
        rule: rule.name.clone(),
        trusted: match tls.map(|t| &t.verify) {
            Some(ServerVerify::CaFile(ca)) => format!(
                "{} (tls_upgrade.ca_file of rule {:?})",
                ca.display(),
                rule.name
            ),
            _ => "the system roots".to_owned(),
        },
        client_cert: tls.and_then(|t| t.client_cert.as_ref()).map(|(cert, _)| {
            format!(
                "{} (tls_upgrade.cert_file of rule {:?})",
                cert.display(),
                rule.name
            )
        }),
    }
}

/// The destination of a request, normalised.
pub(crate) struct Target {
    /// Lower-case host name or IP literal (brackets removed).
    pub(crate) host: String,
    /// Port asked for.
    pub(crate) port: u16,
}

impl Target {
    pub(crate) fn from_uri(uri: &Uri, default_port: u16) -> Result<Target, Refusal> {
        let host = uri
            .host()
            .ok_or_else(|| Refusal::bad_request("request URI has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let port = match uri
            .authority()
            .map(|a| crate::http_util::written_port(a.as_str()))
        {
            Some(Some(digits)) => digits.parse().map_err(|_| {
                Refusal::bad_request(format!("invalid port {digits:?} in the request URI"))
            })?,
            _ => default_port,
        };
        Ok(Target { host, port })
    }
}

/// The first rule that allows `method` to `target` at `path`. A name is looked up only when a
/// CIDR rule takes the request on everything else (port, method, path): a DNS query is traffic
/// too, and one the client chose the name of, so a request no rule allows must not send one.
/// When none does, the refusal names the closest miss among the rules for this destination.
/// A name rule that can reach none of the addresses looked up gives way to a later CIDR rule
/// naming them (README: special-purpose destinations need a CIDR rule).
pub(crate) async fn select_rule<'a>(
    state: &'a State,
    target: &Target,
    method: &Method,
    path: &str,
) -> Result<(usize, &'a Rule), Refusal> {
    let rules = &state.config.rules;
    let literal = parse_ip_literal(&target.host);
    let needs_lookup = literal.is_none()
        && rules.iter().any(|rule| {
            matches!(rule.upstream.destination, Destination::Net(_))
                && takes(rule, target.port, method, path)
        });
    let mut lookup_failed = None;
    let addrs = match literal {
        Some(ip) => vec![ip],
        None if needs_lookup => {
            match resolve(&state.resolver, &target.host, state.config.connect_timeout).await {
                Ok(addrs) => addrs,
                // A name that does not exist is simply not allowed; a resolver that did not
                // answer in time is said as such if no rule allows the request anyway.
                Err(e @ ConnectError::ResolveTimeout { .. }) => {
                    lookup_failed = Some(Refusal::upstream(e.to_string()));
                    Vec::new()
                }
                Err(_) => Vec::new(),
            }
        }
        None => Vec::new(),
    };
    let mut misses = Misses::default();
    let mut name_only = None;
    for (i, rule) in rules.iter().enumerate() {
        let port = effective_port(rule, target.port);
        let is_net = matches!(rule.upstream.destination, Destination::Net(_));
        let names_it = if is_net {
            addrs.iter().any(|ip| rule.upstream.allows_addr(*ip, port))
        } else {
            literal.is_none() && rule.upstream.matches_name(&target.host, port)
        };
        if !names_it {
            continue;
        }
        let path_ok = path_allowed(rule, path);
        let method_ok = method_allowed(rule, method);
        if !(path_ok && method_ok) {
            misses.record(rule, path_ok, method_ok);
            continue;
        }
        // A name rule can connect to none of the addresses looked up (special-purpose ones):
        // a later CIDR rule naming them takes the request, as it would if it came first. Its
        // connector checks the addresses again against itself, so it connects only to ones it
        // allows.
        let reaches_none = !is_net
            && !addrs.is_empty()
            && addrs.iter().all(|ip| !rule.upstream.allows_addr(*ip, port));
        if !reaches_none {
            return Ok((i, rule));
        }
        name_only.get_or_insert((i, rule));
    }
    // No later rule names the addresses: the name rule's connector refuses them in words.
    if let Some(first) = name_only {
        return Ok(first);
    }
    Err(lookup_failed.unwrap_or_else(|| misses.refusal(rules, target, method, path)))
}

/// Whether `rule` takes `method` to `port` at `path`, whatever the host: all a CIDR rule can
/// tell before the name is looked up. A CONNECT through a rule that must read the requests
/// (payload checks, TLS upgrade) is refused whatever the address.
fn takes(rule: &Rule, port: u16, method: &Method, path: &str) -> bool {
    rule.upstream.ports.allows(effective_port(rule, port))
        && path_allowed(rule, path)
        && method_allowed(rule, method)
        && !(*method == Method::CONNECT && (rule.validates() || rule.tls_upgrade.is_some()))
}

fn path_allowed(rule: &Rule, path: &str) -> bool {
    rule.path_prefix
        .as_deref()
        .is_none_or(|p| has_path_prefix(path, p))
}

fn method_allowed(rule: &Rule, method: &Method) -> bool {
    rule.methods.as_ref().is_none_or(|m| m.contains(method))
}

/// The rules that name a destination but not the whole request, for the refusal.
#[derive(Default)]
struct Misses<'a> {
    /// The first rule for the destination at all.
    first: Option<&'a Rule>,
    /// The first rule that allows the method, but not under this path.
    path: Option<&'a Rule>,
    /// The first rule that covers the path, but not the method.
    method: Option<&'a Rule>,
    /// The methods the rules covering the path allow.
    allowed: Vec<Method>,
}

impl<'a> Misses<'a> {
    fn record(&mut self, rule: &'a Rule, path_ok: bool, method_ok: bool) {
        self.first.get_or_insert(rule);
        if method_ok {
            self.path.get_or_insert(rule);
        } else if path_ok {
            self.method.get_or_insert(rule);
            self.allowed.extend(rule.methods.iter().flatten().cloned());
        }
    }

    fn refusal(mut self, rules: &[Rule], target: &Target, method: &Method, path: &str) -> Refusal {
        let authority = crate::http_util::authority(&target.host, target.port);
        if *method == Method::CONNECT {
            return match self.first {
                Some(rule) => super::connect::plain_http_only(rule, &authority),
                None => connect_to_a_name(rules, target, &authority),
            };
        }
        let what = format!("{method} {authority}{path}");
        // A rule that allows the method but not under this path is the closer miss: the path is
        // what the client got wrong, not the method another rule (CONNECT only, say) wants.
        if let Some(rule) = self.path {
            let prefix = rule.path_prefix.as_deref().unwrap_or("/");
            let mut why = format!("rule {:?} allows it only under {prefix}", rule.name);
            if let Some(other) = self.method {
                let methods: Vec<&str> =
                    other.methods.iter().flatten().map(Method::as_str).collect();
                why.push_str(&format!(
                    "; rule {:?} allows only {}",
                    other.name,
                    methods.join(", ")
                ));
            }
            return Refusal::destination_because(&what, &why);
        }
        if let Some(rule) = self.method {
            self.allowed.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            self.allowed.dedup();
            let mut refusal = Refusal::method(method, &rule.name);
            refusal.allow = self.allowed;
            return refusal;
        }
        Refusal::destination(&what)
    }
}

/// The refusal of a CONNECT to a name no rule takes. A CIDR rule that reads the requests
/// (TLS upgrade, payload checks) may cover the name's address, but the name is not looked up
/// for a tunnel such a rule refuses anyway: the refusal says what to send if it does.
fn connect_to_a_name(rules: &[Rule], target: &Target, authority: &str) -> Refusal {
    let what = format!("CONNECT {authority}");
    let reader = rules.iter().find(|rule| {
        matches!(rule.upstream.destination, Destination::Net(_))
            && (rule.tls_upgrade.is_some() || rule.validates())
            && rule
                .upstream
                .ports
                .allows(effective_port(rule, target.port))
    });
    match reader {
        Some(rule) if parse_ip_literal(&target.host).is_none() => {
            let does = if rule.tls_upgrade.is_some() {
                "upgrades plain HTTP to HTTPS itself"
            } else {
                "checks payloads"
            };
            Refusal::destination_because(
                &what,
                &format!(
                    "no rule allows a tunnel there; if {} is in rule {:?}'s network, that rule {does}: send http://{authority}/... to the proxy, not a tunnel",
                    target.host, rule.name
                ),
            )
        }
        _ => Refusal::destination(&what),
    }
}

/// Whether `path` is under `prefix`, at a segment boundary: `/api` covers `/api` and `/api/x`, not
/// `/apix` (a prefix ending in `/` is matched as written).
pub(crate) fn has_path_prefix(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'))
}

/// Refuses what an upstream could read differently from the rule that would let it through: a
/// path with dot-segments (`/ok/../admin`, also percent-encoded or with `\`), which the upstream
/// may resolve outside the rule's `path_prefix`; userinfo in the URI (RFC 9110 §4.2.4: a sign of
/// a disguised authority); more than one `Content-Type` or `Content-MD5`; a transfer coding other
/// than chunked, whose body the proxy would check and forward still encoded.
fn check_request(parts: &http::request::Parts) -> Result<(), Refusal> {
    if parts
        .uri
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Err(Refusal::bad_request(
            "the request URI carries userinfo (user@host), which is not allowed",
        ));
    }
    if has_dot_segment(parts.uri.path()) {
        return Err(Refusal::bad_request(
            "the request path has a . or .. segment; send it resolved",
        ));
    }
    // Only the first would be checked; the upstream might read another.
    for (name, spelled) in [
        (http::header::CONTENT_TYPE, "Content-Type"),
        (HeaderName::from_static("content-md5"), "Content-MD5"),
    ] {
        if parts.headers.get_all(name).iter().count() > 1 {
            return Err(Refusal::bad_request(format!(
                "more than one {spelled} header"
            )));
        }
    }
    for value in parts.headers.get_all(http::header::TRANSFER_ENCODING) {
        let value = String::from_utf8_lossy(value.as_bytes());
        for coding in value.split(',').map(str::trim) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(Refusal::transfer_coding(coding));
            }
        }
    }
    Ok(())
}

/// Headers the proxy reads to frame and check a request, which must reach the upstream as they
/// were checked.
const CHECKED_HEADERS: [&str; 6] = [
    "content-type",
    "content-encoding",
    "content-length",
    "transfer-encoding",
    "content-md5",
    "host",
];

/// Refuses a `Connection` header naming a header the proxy checks or the rule requires: the
/// headers it names are hop-by-hop and not forwarded, so the upstream would get a body without
/// the Content-Encoding or Content-Type it was checked under, or without a required header.
fn check_connection(headers: &http::HeaderMap, rule: &Rule) -> Result<(), Refusal> {
    let required = rule
        .validation
        .required_headers
        .iter()
        .map(HeaderName::as_str);
    let protected: Vec<&str> = CHECKED_HEADERS.into_iter().chain(required).collect();
    for value in headers.get_all(http::header::CONNECTION) {
        for name in value.as_bytes().split(|b| *b == b',') {
            let name = name.trim_ascii();
            if let Some(named) = protected
                .iter()
                .find(|p| p.as_bytes().eq_ignore_ascii_case(name))
            {
                return Err(Refusal::bad_request(format!(
                    "the Connection header names {named}, which would then not be forwarded; the proxy checks it and the upstream needs it"
                )));
            }
        }
    }
    Ok(())
}

/// Whether `path`, with `\` read as `/`, has a `.` or `..` segment, as written or after one to
/// three rounds of percent-decoding (an upstream behind another proxy may decode twice). A
/// segment's `;parameters` do not count: Tomcat, Jetty and Spring drop them before resolving, so
/// `/ok/..;/admin` is `/admin` to them.
fn has_dot_segment(path: &str) -> bool {
    let mut path = std::borrow::Cow::Borrowed(path);
    for _ in 0..=3 {
        let dot = path
            .split(['/', '\\'])
            .map(|seg| seg.split(';').next().unwrap_or(seg))
            .any(|name| name == "." || name == "..");
        if dot {
            return true;
        }
        let decoded = percent_encoding::percent_decode_str(&path).decode_utf8_lossy();
        if decoded == path {
            return false;
        }
        path = std::borrow::Cow::Owned(decoded.into_owned());
    }
    false
}

/// The port the upstream is reached on: an upgraded rule speaks HTTPS, so plain port 80 becomes 443.
pub(crate) fn effective_port(rule: &Rule, port: u16) -> u16 {
    if rule.tls_upgrade.is_some() && port == 80 {
        443
    } else {
        port
    }
}

pub(crate) async fn handle(
    state: &Arc<State>,
    req: Request<Incoming>,
    mut record: AccessRecord,
    claim: &Claim,
) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    match forward(state, parts, &mut body, &mut record, claim).await {
        Ok(resp) => {
            // The response body's copy of the record writes the line when the answer ends.
            record.disarm();
            resp
        }
        Err(Failure::Refused(refusal)) => {
            linger(body);
            let resp = refused(&mut record, &refusal);
            record.emit(&state.metrics);
            resp
        }
        Err(Failure::ClientGone(reason)) => {
            // Nobody is left to read an answer. Dropped unwritten, the record logs and counts
            // the request as 499, abandoned: the client went away, the proxy refused nothing.
            record.reason = reason;
            drop(record);
            let mut resp = Response::new(crate::http_util::empty());
            *resp.status_mut() = http::StatusCode::BAD_REQUEST;
            resp
        }
    }
}

/// Why a request was not forwarded.
enum Failure {
    /// The proxy refused it: the client gets the refusal.
    Refused(Refusal),
    /// The client closed its connection before its body was complete (the reason says after
    /// how many bytes).
    ClientGone(String),
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Self {
        Failure::Refused(refusal)
    }
}

/// Most a refused request's remaining body is read (and thrown away) for.
const LINGER_BYTES: u64 = 64 << 20;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and discards what is left of a refused request's body, for a bounded time and size, so
/// a client still uploading reads the refusal instead of a connection reset.
fn linger(mut body: Incoming) {
    if http_body::Body::is_end_stream(&body) {
        return;
    }
    tokio::spawn(async move {
        let drain = async {
            let mut seen = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > LINGER_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}

async fn forward(
    state: &Arc<State>,
    mut parts: http::request::Parts,
    body: &mut Incoming,
    record: &mut AccessRecord,
    claim: &Claim,
) -> Result<Response<Body>, Failure> {
    if parts.uri.scheme_str() != Some("http") {
        return Err(Refusal::bad_request("absolute-form requests must be http://: send the http:// URL and let a rule with tls_upgrade speak HTTPS upstream, or open a CONNECT tunnel for https:// (HTTPS_PROXY)").into());
    }
    check_request(&parts)?;
    let target = Target::from_uri(&parts.uri, 80)?;
    let (index, rule) = select_rule(state, &target, &parts.method, parts.uri.path()).await?;
    record.rule = rule.name.clone();
    check_connection(&parts.headers, rule)?;
    rule.validation.check_headers(&parts.headers)?;
    let read_timeout = state.config.body_read_timeout;
    let mut body = tokio::time::timeout(
        read_timeout,
        read_body(
            body,
            rule.validation.max_body_bytes,
            state.body_budget.share(),
            &mut record.bytes_in,
        ),
    )
    .await
    .map_err(|_| Refusal::body_timeout(read_timeout))??;
    // hyper read the body to its end: so did the framing scan, which saw every byte first.
    if let Some(problem) = claim.body_problem() {
        return Err(Refusal::bad_request(problem).into());
    }
    // Only a body that is checked needs to be one contiguous buffer; else it is forwarded as the
    // chunks it arrived in, saving a copy of every payload.
    if rule.validation.needs_body(&parts.headers) {
        let whole = body.contiguous();
        check_body(state, index, &parts.headers, whole).await?;
    }
    // It keeps its share of the body budget until it has gone upstream.
    let body = boxed(body);

    let port = effective_port(rule, target.port);
    let upstream = crate::http_util::authority(&target.host, port);
    let scheme = if rule.tls_upgrade.is_some() {
        "https"
    } else {
        "http"
    };
    // An IP literal goes upstream (URI and Host) in its usual spelling, not as the client wrote
    // it (`0x7f.1`, `2130706433`): that is the address the rule was checked against.
    let host = match parse_ip_literal(&target.host).map(|ip| ip.to_canonical()) {
        Some(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
        Some(ip) => ip.to_string(),
        None => target.host.clone(),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("{scheme}://{host}:{port}{path}")
        .parse()
        .map_err(|e| Refusal::bad_request(format!("cannot build upstream URI: {e}")))?;
    strip_hop_by_hop(&mut parts.headers);
    // The body is already here in full: the client got its 100 Continue from the proxy.
    parts.headers.remove(http::header::EXPECT);
    parts.version = http::Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body);

    record.allow();
    let timeout = state.config.upstream_timeout;
    let deadline = crate::http_util::deadline(Instant::now(), timeout);
    // Held for the request: a reload of the rules' TLS files may replace them meanwhile.
    let upstreams = state.upstreams.load_full();
    let client = &upstreams.clients[index];
    let resp = match tokio::time::timeout_at(deadline, client.request(upstream_req)).await {
        Err(_) => return Err(Refusal::upstream_timeout(&upstream, timeout).into()),
        Ok(Err(e)) => return Err(upstream_error(&e, &target.host, &upstream, rule).into()),
        Ok(Ok(resp)) => resp,
    };
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        // The request's Upgrade was stripped, so this upstream is confused; its protocol switch
        // is not relayed.
        return Err(Refusal::upstream(
            "the upstream answered 101 Switching Protocols, which the proxy does not relay",
        )
        .into());
    }
    // The body's first bytes are read before the head goes back: an upstream whose body breaks
    // at once (a malformed chunk) is a 502 with its reason, not an empty reply logged as a 200.
    let (resp_parts, resp_body) = resp.into_parts();
    let resp_body = match crate::http_util::read_ahead(boxed(resp_body), deadline, u64::MAX).await {
        Ok(body) => body,
        Err(crate::http_util::ReadAheadError::Deadline) => {
            return Err(Refusal::upstream_timeout(&upstream, timeout).into())
        }
        Err(e) => {
            return Err(Refusal::upstream(format!(
                "upstream {} answered {} and its body broke before any of it was sent: {e}",
                target.host, resp_parts.status
            ))
            .into())
        }
    };
    let resp = Response::from_parts(resp_parts, resp_body);
    Ok(stream_back(state, resp, record.clone(), deadline, claim))
}

/// Plain bodies up to this size are checked on the worker thread that read them: a few
/// milliseconds at most, less than the hop to the blocking pool costs a ~170 KB push (the egress
/// benchmark's JSON scenario). Larger and compressed ones go to the blocking pool.
const CHECK_INLINE_BYTES: usize = 256 << 10;

/// Runs rule `index`'s body checks. What they build (the body decoded, a schema's tree) is taken
/// from the process-wide body budget; a compressed or large body is checked on the blocking pool,
/// one per slot of `check_slots`, so that checks neither stall the async workers nor, all together,
/// take more than a core each. A request waits for a slot up to `body_read_timeout`.
async fn check_body(
    state: &Arc<State>,
    index: usize,
    headers: &http::HeaderMap,
    body: Bytes,
) -> Result<(), Refusal> {
    let mut held = state.body_budget.share();
    let validation = &state.config.rules[index].validation;
    let encoded = headers.contains_key(http::header::CONTENT_ENCODING);
    if !encoded && body.len() <= CHECK_INLINE_BYTES {
        return validation.check_body(headers, &body, &mut held);
    }
    let wait = state.config.body_read_timeout;
    let slot = tokio::time::timeout(wait, state.check_slots.clone().acquire_owned())
        .await
        .map_err(|_| Refusal::checks_busy(wait))?
        .map_err(|_| Refusal::checks_busy(wait))?;
    let owner = state.clone();
    let headers = headers.clone();
    // A client that goes away meanwhile does not stop the check: the slot stays taken until the
    // thread is done with it.
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        owner.config.rules[index]
            .validation
            .check_body(&headers, &body, &mut held)
    })
    .await
    .map_err(|e| {
        // A bug, not the client's doing: the body is still not forwarded unchecked.
        tracing::error!(error = %e, "a body check did not finish");
        Refusal::invalid("the body could not be checked")
    })?
}

/// Reads the whole body, refusing it past `limit` bytes or when `held` cannot grow to hold it.
/// `seen` counts what arrived, also when the body is refused or breaks (for the access log).
async fn read_body(
    body: &mut Incoming,
    limit: u64,
    held: Held,
    seen: &mut u64,
) -> Result<ReadBody, Failure> {
    let declared = http_body::Body::size_hint(body).exact();
    let mut read = ReadBody::new(held);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&e, *seen, declared))?;
        if let Ok(data) = frame.into_data() {
            *seen += data.len() as u64;
            if read.remaining + data.len() as u64 > limit {
                return Err(Refusal::too_large(limit).into());
            }
            if !read.held.grow(data.len() as u64) {
                return Err(Refusal::body_buffer_full(read.held.limit()).into());
            }
            read.push(data);
        }
    }
    read.flush();
    Ok(read)
}

/// A request body that broke after `seen` of `declared` bytes: the client closing its connection
/// (the connection ended before the body did), or a malformed body (bad chunked framing, 400).
fn body_error(e: &hyper::Error, seen: u64, declared: Option<u64>) -> Failure {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        let kind = err.downcast_ref::<std::io::Error>().map(|io| io.kind());
        if matches!(
            kind,
            Some(UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe)
        ) {
            let of = declared.map_or(String::new(), |n| format!(" of {n}"));
            return Failure::ClientGone(format!(
                "client closed the connection after {seen}{of} body bytes"
            ));
        }
        source = err.source();
    }
    Refusal::bad_request(format!(
        "cannot read request body: {}",
        crate::scrape_error::one_line(e)
    ))
    .into()
}

/// Frames from this size on are kept as hyper handed them over; smaller ones are copied together.
const SMALL_FRAME: usize = 4 << 10;
/// The largest buffer small frames are copied into.
const COALESCED: usize = 64 << 10;

/// A request body read in full: large frames as hyper handed them over (no copy), small ones
/// copied together. Each frame holds on to hyper's read buffer and costs a queue entry, so a body
/// sent as a million one-byte chunks would otherwise take tens of times its size. It holds its
/// share of the process-wide body budget until it is dropped.
struct ReadBody {
    chunks: VecDeque<Bytes>,
    /// Small frames not yet in `chunks`, in the unused end of the last buffer allocated for them.
    tail: BytesMut,
    /// The size of that buffer: they double up to `COALESCED`, so a small body gets a small one.
    tail_capacity: usize,
    /// Bytes not yet sent.
    remaining: u64,
    /// Its share of the body budget.
    held: Held,
}

impl ReadBody {
    fn new(held: Held) -> Self {
        Self {
            chunks: VecDeque::new(),
            tail: BytesMut::new(),
            tail_capacity: 0,
            remaining: 0,
            held,
        }
    }

    fn push(&mut self, data: Bytes) {
        self.remaining += data.len() as u64;
        if data.len() >= SMALL_FRAME {
            self.flush();
            self.chunks.push_back(data);
            return;
        }
        if self.tail.capacity() - self.tail.len() < data.len() {
            self.flush();
            self.tail_capacity = (self.tail_capacity * 2).clamp(SMALL_FRAME, COALESCED);
            self.tail = BytesMut::with_capacity(self.tail_capacity);
        }
        self.tail.extend_from_slice(&data);
    }

    /// Queues the small frames gathered so far; later ones go on filling the same buffer.
    fn flush(&mut self) {
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
    }

    /// The body as one buffer, which it then consists of (a copy unless it arrived in one chunk).
    fn contiguous(&mut self) -> Bytes {
        if self.chunks.len() > 1 {
            let mut whole = BytesMut::with_capacity(self.remaining as usize);
            for chunk in self.chunks.drain(..) {
                whole.extend_from_slice(&chunk);
            }
            self.chunks.push_back(whole.freeze());
        }
        self.chunks.front().cloned().unwrap_or_default()
    }
}

impl http_body::Body for ReadBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let chunk = self.chunks.pop_front();
        if let Some(c) = &chunk {
            self.remaining -= c.len() as u64;
        }
        Poll::Ready(chunk.map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Maps an upstream client error: a refused address is the policy speaking (403), the rest is 502.
/// `upstream` is `host` with the port.
fn upstream_error(
    e: &hyper_util::client::legacy::Error,
    host: &str,
    upstream: &str,
    rule: &Rule,
) -> Refusal {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(ConnectError::Forbidden { why, .. }) = err.downcast_ref::<ConnectError>() {
            return Refusal::forbidden_address(host, why);
        }
        source = err.source();
    }
    // Under TLS 1.3 the client's side of the handshake is over before the server checks the
    // client certificate: its refusal comes with the answer to the request.
    if let Some(rustls::Error::AlertReceived(alert)) = crate::tunnel::tls::rustls_error_in(e) {
        if let Some(words) = rule
            .tls_upgrade
            .is_some()
            .then(|| tls_words(rule).client_cert_alert(*alert))
            .flatten()
        {
            return Refusal::upstream(format!("upstream {upstream} failed: {words}"));
        }
    }
    let cause = crate::scrape_error::one_line(e);
    Refusal::upstream(if e.is_connect() {
        cause
    } else {
        format!("upstream {upstream} failed: {cause}")
    })
}

fn stream_back(
    state: &Arc<State>,
    resp: Response<Body>,
    mut record: AccessRecord,
    deadline: Instant,
    claim: &Claim,
) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // Only the proxy speaks with this header: an upstream must not be able to fake a refusal.
    parts.headers.remove(super::refusal::REFUSAL_HEADER);
    record.status = parts.status;
    let metrics_state = state.clone();
    let connection = claim.connection();
    let on_finish = Box::new(move |bytes: u64, end: BodyEnd| {
        record.bytes_out = bytes;
        match end {
            BodyEnd::Complete => {}
            BodyEnd::Dropped => {
                record.reason = match connection.write_stalled() {
                    Some(after) => format!(
                        "response body cut off after {bytes} bytes: the client's connection took no more of it for {after:?} (upstream_timeout; the client stopped reading, or read too little to make room) and was closed"
                    ),
                    None => format!(
                        "response body cut off after {bytes} bytes: the client went away or the proxy stopped"
                    ),
                }
            }
            BodyEnd::Deadline => {
                record.reason = "response body still streaming at the upstream timeout".into()
            }
            BodyEnd::Failed(_) | BodyEnd::TooLarge(_) => {
                record.reason = format!("response body broke: {end}")
            }
        }
        record.emit(&metrics_state.metrics);
    });
    Response::from_parts(
        parts,
        boxed(BoundedBody::new(body, deadline, u64::MAX, on_finish)),
    )
}

/// Resolves and checks the addresses a CONNECT to `target` under `rule` may use.
pub(crate) async fn checked(
    state: &State,
    rule: &Rule,
    target: &Target,
) -> Result<Vec<std::net::SocketAddr>, Refusal> {
    checked_addrs(
        &state.resolver,
        &rule.upstream,
        &target.host,
        target.port,
        state.config.connect_timeout,
    )
    .await
    .map_err(|e| match e {
        ConnectError::Forbidden { host, why } => Refusal::forbidden_address(&host, why),
        other => Refusal::upstream(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_read_as_written() {
        let port = |uri: &str| Target::from_uri(&uri.parse().unwrap(), 80).map(|t| t.port);
        assert_eq!(port("http://a/").ok(), Some(80));
        assert_eq!(port("http://a:/").ok(), Some(80));
        assert_eq!(port("http://a:8080/").ok(), Some(8080));
        assert_eq!(port("http://[::1]:8080/").ok(), Some(8080));
        assert_eq!(port("http://[::1]/").ok(), Some(80));
        for bad in ["http://a:65536/", "http://[::1]:99999999999/"] {
            let err = port(bad).unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{bad}");
            assert!(err.reason.contains("invalid port"), "{bad}: {}", err.reason);
        }
    }

    fn read(frames: impl IntoIterator<Item = Bytes>) -> ReadBody {
        let budget = super::super::budget::BodyBudget::new(u64::MAX, Default::default());
        let mut body = ReadBody::new(budget.share());
        for frame in frames {
            body.push(frame);
        }
        body.flush();
        body
    }

    #[test]
    fn small_frames_are_copied_together_in_order() {
        let frames = (0..200_000u32).map(|i| Bytes::copy_from_slice(&[i as u8]));
        let body = read(frames);
        let sizes: Vec<usize> = body.chunks.iter().map(Bytes::len).collect();
        assert!(sizes.len() <= 8, "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 200_000);
        assert!(sizes.iter().all(|n| *n <= COALESCED), "{sizes:?}");
        let mut body = body;
        let whole = body.contiguous();
        assert_eq!(body.chunks.len(), 1, "the body is now that one buffer");
        assert!(whole.iter().enumerate().all(|(i, b)| *b == i as u8));
    }

    #[test]
    fn large_frames_are_kept_as_they_arrived() {
        let large = Bytes::from(vec![7u8; 64 << 10]);
        let frames = [
            Bytes::from_static(b"a"),
            large.clone(),
            Bytes::from_static(b"b"),
            Bytes::from_static(b"c"),
            large.clone(),
        ];
        let body = read(frames);
        let sizes: Vec<usize> = body.chunks.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [1, 64 << 10, 2, 64 << 10]);
        assert_eq!(body.chunks[1].as_ptr(), large.as_ptr(), "not copied");
        assert_eq!(body.chunks[3].as_ptr(), large.as_ptr(), "not copied");
        assert_eq!(&body.chunks[2][..], b"bc");
    }
}
