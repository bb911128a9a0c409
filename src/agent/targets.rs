//! The agent's allowlist: each configured target keyed by the port and path Prometheus uses, with
//! the HTTP client that fetches it. Anything not in here is never fetched.

use std::collections::{BTreeMap, HashMap};

use http::Uri;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::ServerName;

use crate::config::{Target, SELF_TARGET};
use crate::http_util::Body;
use crate::tunnel::tls::TlsError;
use crate::tunnel::tls_client::{client_config, Purpose};
use crate::tunnel::{TargetInfo, TargetList};

/// A pooled client for targets: one shared by every plain-http target, one per https target
/// (each has its own trust settings).
#[derive(Clone)]
pub(crate) enum HttpClient {
    /// http:// targets.
    Plain(Client<HttpConnector, Body>),
    /// https:// targets.
    Tls(Client<HttpsConnector<HttpConnector>, Body>),
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
}

/// The targets of one configuration version.
pub(crate) struct TargetSet {
    pub(crate) list: TargetList,
    routes: HashMap<(u16, String), Route>,
}

impl TargetSet {
    /// Builds the set: the built-in `ferry` target plus `targets`, each with its client.
    pub(crate) fn build(
        version: u64,
        targets: &[Target],
        labels: &BTreeMap<String, String>,
        self_port: u16,
        plain_client: &HttpClient,
    ) -> Result<TargetSet, TlsError> {
        let mut routes = HashMap::new();
        let mut infos = Vec::new();
        let self_info = TargetInfo {
            name: SELF_TARGET.into(),
            port: self_port,
            path: "/metrics".into(),
            labels: BTreeMap::new(),
        };
        routes.insert(
            (self_port, "/metrics".into()),
            Route {
                name: SELF_TARGET.into(),
                handler: Handler::SelfMetrics,
            },
        );
        for t in targets {
            let client = match &t.tls {
                Some(_) => https_client(t)?,
                None => plain_client.clone(),
            };
            let handler = Handler::Fetch {
                url: t.url.clone(),
                client,
            };
            routes.insert(
                (t.port, t.path.clone()),
                Route {
                    name: t.name.clone(),
                    handler,
                },
            );
            infos.push(TargetInfo {
                name: t.name.clone(),
                port: t.port,
                path: t.path.clone(),
                labels: t.labels.clone(),
            });
        }
        infos.push(self_info);
        Ok(TargetSet {
            list: TargetList {
                version,
                labels: labels.clone(),
                targets: infos,
            },
            routes,
        })
    }

    /// The target at `port` and `path`, if listed.
    pub(crate) fn route(&self, port: u16, path: &str) -> Option<&Route> {
        self.routes.get(&(port, path.to_owned()))
    }
}

/// The client for plain-http targets, pooled across all of them.
pub(crate) fn plain_client() -> HttpClient {
    HttpClient::Plain(pooled().build(connector()))
}

fn connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http
}

fn pooled() -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(32);
    builder
}

fn https_client(t: &Target) -> Result<HttpClient, TlsError> {
    let Some(tls) = &t.tls else {
        return Ok(plain_client());
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
    Ok(HttpClient::Tls(pooled().build(https)))
}
