//! The agent's allowlist: each configured target keyed by the port and path Prometheus uses, with
//! the HTTP client that fetches it. Anything not in here is never fetched.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use http::Uri;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{
    FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream,
};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::ServerName;

use crate::config::{Target, SELF_TARGET};
use crate::http_util::{Body, BoxError};
use crate::tunnel::metrics_path;
use crate::tunnel::tls::TlsError;
use crate::tunnel::tls_cert::LeafInfo;
use crate::tunnel::tls_client::{client_config, Purpose, ServerVerify};
use crate::tunnel::{
    label_name_problem, reserved_target_name, target_list_size_problem, valid_target_name,
    TargetInfo, TargetList,
};
use crate::warn_limit::WarnLimit;

/// A pooled client for targets: one shared by every plain-http target, one per https target
/// (each has its own trust settings).
#[derive(Clone)]
pub(crate) enum HttpClient {
    /// http:// targets.
    Plain(Client<HttpConnector, Body>),
    /// https:// targets.
    Tls(Client<TargetTls, Body>),
}

impl HttpClient {
    /// Sends `req` to its target.
    pub(crate) async fn request(
        &self,
        req: http::Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        match self {
            HttpClient::Plain(c) => c.request(req).await,
            HttpClient::Tls(c) => c.request(req).await,
        }
    }
}

/// What serves a route.
// Few routes, always used by reference: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Handler {
    /// The agent's own metrics registry.
    SelfMetrics,
    /// A configured target, fetched over HTTP(S).
    Fetch {
        /// Where it is.
        url: Uri,
        /// The client that reaches it (shared by all plain-http targets).
        client: HttpClient,
    },
}

/// One routable target.
pub(crate) struct Route {
    pub(crate) name: String,
    pub(crate) handler: Handler,
    /// The CA file an https target's certificate is checked against, named in its TLS errors.
    pub(crate) ca_file: Option<PathBuf>,
    /// Failed TLS handshakes with the target are warned about at this pace (each scrape would
    /// repeat the last one's), the rest at debug.
    pub(crate) tls_warnings: WarnLimit,
}

/// The targets of one configuration version.
pub(crate) struct TargetSet {
    pub(crate) list: TargetList,
    routes: HashMap<(u16, String), Route>,
}

impl TargetSet {
    /// Builds the set of agent `agent_id`: the built-in `ferry` target plus `targets`, each with
    /// its client.
    pub(crate) fn build(
        agent_id: &str,
        version: u64,
        targets: &[Target],
        labels: &BTreeMap<String, String>,
        self_port: u16,
        plain_client: &HttpClient,
        idle_timeout: Duration,
    ) -> Result<TargetSet, super::AgentError> {
        // Checked here, where every target list is built (the config's, set_targets'), so that
        // no list the gateway could not route is ever served.
        check_targets(targets, labels, self_port).map_err(super::AgentError::Targets)?;
        let list = published_list(version, targets, labels, self_port);
        if let Some(problem) = target_list_size_problem(agent_id, &list) {
            return Err(super::AgentError::Targets(problem));
        }
        warn_about_client_certs(targets);
        let mut routes = HashMap::new();
        routes.insert(
            (self_port, "/metrics".into()),
            Route {
                name: SELF_TARGET.into(),
                handler: Handler::SelfMetrics,
                ca_file: None,
                tls_warnings: WarnLimit::default(),
            },
        );
        for t in targets {
            let client = match &t.tls {
                Some(_) => https_client(t, idle_timeout)?,
                None => plain_client.clone(),
            };
            let handler = Handler::Fetch {
                url: t.url.clone(),
                client,
            };
            let ca_file = match t.tls.as_ref().map(|tls| &tls.verify) {
                Some(ServerVerify::CaFile(ca)) => Some(ca.clone()),
                _ => None,
            };
            routes.insert(
                (t.port, t.path.clone()),
                Route {
                    name: t.name.clone(),
                    handler,
                    ca_file,
                    tls_warnings: WarnLimit::default(),
                },
            );
        }
        Ok(TargetSet { list, routes })
    }

    /// The target at `port` and `path` (a scrape's, as received), if listed: routes are keyed by
    /// decoded path, as published, whatever encoding the scrape's client chose.
    pub(crate) fn route(&self, port: u16, path: &str) -> Option<&Route> {
        let decoded = metrics_path::requested(path)?.into_owned();
        self.routes.get(&(port, decoded))
    }
}

/// Warns about targets' client certificates that have expired or are not valid yet: loaded
/// without complaint, they fail only in every scrape.
fn warn_about_client_certs(targets: &[Target]) {
    let now = std::time::SystemTime::now();
    for t in targets {
        let Some((cert, _)) = t.tls.as_ref().and_then(|tls| tls.client_cert.as_ref()) else {
            continue;
        };
        let refused_by = format!("target {:?} refuses", t.name);
        if let Some(problem) = LeafInfo::client_problem(cert, now, &refused_by) {
            tracing::warn!(target_name = %t.name, "target client certificate (tls.cert_file): {problem}");
        }
    }
}

/// The client for plain-http targets, pooled across all of them; a connection unused for
/// `idle_timeout` is closed.
pub(crate) fn plain_client(idle_timeout: Duration) -> HttpClient {
    HttpClient::Plain(pooled(idle_timeout).build(connector()))
}

fn connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http
}

fn pooled(idle_timeout: Duration) -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    // Without the pool's timer the idle timeout is only checked when the pool is used again for
    // that target: a burst of concurrent scrapes left its connections open for ever.
    builder
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(32);
    builder
}

fn https_client(t: &Target, idle_timeout: Duration) -> Result<HttpClient, TlsError> {
    let Some(tls) = &t.tls else {
        return Ok(plain_client(idle_timeout));
    };
    let config = client_config(tls, Purpose::Target)?;
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let builder = match &t.server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(|_| {
                TlsError::Config(format!(
                    "target {:?}: {name:?} is not a valid TLS server name",
                    t.name
                ))
            })?;
            builder.with_server_name_resolver(FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    let https = builder.enable_http1().wrap_connector(connector());
    Ok(HttpClient::Tls(
        pooled(idle_timeout).build(TargetTls(https)),
    ))
}

/// The connector for https:// targets: rustls over TCP, with the end of TCP read as the end of
/// the stream even when the target sent no TLS `close_notify` (see [`EofIsEnd`]).
#[derive(Clone)]
pub(crate) struct TargetTls(HttpsConnector<HttpConnector>);

type TargetStream = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

impl tower_service::Service<Uri> for TargetTls {
    type Response = EofIsEnd<TargetStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map(EofIsEnd) })
    }
}

/// A target connection on which a TCP close without TLS `close_notify` is an ordinary end of
/// stream, as Prometheus (Go) reads it, instead of an error. Exporters that end a response by
/// closing the connection (HTTP/1.0, no `Content-Length`) often skip `close_notify`; a response
/// with a length or chunked framing that is cut short is still caught by hyper.
pub(crate) struct EofIsEnd<S>(S);

impl<S: Read + Unpin> Read for EofIsEnd<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.0).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: Write + Unpin> Write for EofIsEnd<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

impl<S: Connection> Connection for EofIsEnd<S> {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}

/// The list the agent publishes for `targets` and `labels`: theirs, then the built-in target.
fn published_list(
    version: u64,
    targets: &[Target],
    labels: &BTreeMap<String, String>,
    self_port: u16,
) -> TargetList {
    let mut infos: Vec<TargetInfo> = targets
        .iter()
        .map(|t| TargetInfo {
            name: t.name.clone(),
            port: t.port,
            path: t.path.clone(),
            labels: t.labels.clone(),
        })
        .collect();
    infos.push(TargetInfo {
        name: SELF_TARGET.into(),
        port: self_port,
        path: "/metrics".into(),
        labels: BTreeMap::new(),
    });
    TargetList {
        version,
        labels: labels.clone(),
        targets: infos,
    }
}

/// Why agent `agent_id` cannot publish the list `targets` and `labels` make, if it is too large
/// for the gateway to read or to publish (it would close the tunnel each time it read it): for
/// the config file's check.
pub(crate) fn published_size_problem(
    agent_id: &str,
    targets: &[Target],
    labels: &BTreeMap<String, String>,
    self_port: u16,
) -> Option<String> {
    target_list_size_problem(
        agent_id,
        &published_list(u64::MAX, targets, labels, self_port),
    )
}

/// What the gateway must be able to route, checked as the config file checks it: names, labels
/// (the agent's and each target's), unique names (`ferry` is the built-in target), unique port and
/// path (the built-in target's too), http or https URLs with a host and a port, paths that are
/// paths. A list built by hand ([`crate::agent::Agent::set_targets`]) would otherwise be accepted
/// here and its bad entries dropped by the gateway, with a warning only in the gateway's log.
fn check_targets(
    targets: &[Target],
    labels: &BTreeMap<String, String>,
    self_port: u16,
) -> Result<(), String> {
    if let Some(problem) = labels.keys().find_map(|k| label_name_problem(k)) {
        return Err(format!("agent label {problem}"));
    }
    let mut names = std::collections::HashSet::from([crate::config::SELF_TARGET]);
    let mut addrs = std::collections::HashSet::from([(self_port, "/metrics")]);
    for t in targets {
        check_target(t)?;
        if !names.insert(t.name.as_str()) {
            return Err(format!(
                "target name {:?} is used twice (\"{}\" is the built-in target)",
                t.name,
                crate::config::SELF_TARGET
            ));
        }
        if !addrs.insert((t.port, t.path.as_str())) {
            return Err(format!(
                "target {:?}: port {} path {:?} is already taken",
                t.name, t.port, t.path
            ));
        }
    }
    Ok(())
}

/// The checks of one target that do not depend on the others.
fn check_target(t: &Target) -> Result<(), String> {
    if !valid_target_name(&t.name) {
        return Err(format!(
            "target {:?}: the name must be non-empty letters, digits, '-', '_' or '.'",
            t.name
        ));
    }
    if let Some(reason) = reserved_target_name(&t.name) {
        return Err(format!("target {:?}: {reason}", t.name));
    }
    if let Some(problem) = t.labels.keys().find_map(|k| label_name_problem(k)) {
        return Err(format!("target {:?}: label {problem}", t.name));
    }
    if !matches!(t.url.scheme_str(), Some("http" | "https"))
        || t.url.host().is_none_or(str::is_empty)
        || !t.path.starts_with('/')
    {
        return Err(format!(
            "target {:?}: needs an http(s) URL with a host and a path starting with /",
            t.name
        ));
    }
    if let Err(problem) = metrics_path::check_decoded(&t.path) {
        return Err(format!("target {:?}: path {:?} {problem}", t.name, t.path));
    }
    if t.port == 0 {
        return Err(format!(
            "target {:?}: port 0 is not a port (1-65535)",
            t.name
        ));
    }
    Ok(())
}
