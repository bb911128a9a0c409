//! The public side of the pull path: [`Gateway`] accepts agent tunnels and proxies Prometheus's
//! scrapes through them. Run it whole ([`Gateway::run`]) or mount it in your own HTTP server
//! ([`Gateway::handle`] and [`Gateway::serve_tunnels`]; see the crate documentation for an
//! example). [`auth`] is the tokens file agents authenticate with.

// Inside:
// - `registry`: connected agents (the seam for several gateways).
// - `departed`: agents gone, still listed in service discovery for `web.sd_keep_disconnected`.
// - `agents_file`: those and the connected agents saved in the data directory, restored at start.
// - `tunnel`: accepting tunnels — TLS, upgrade, the session, the target-list watch.
// - `h2conn`: the gateway's HTTP/2 client end of a tunnel (h2 driven directly), keepalive PINGs.
// - `published`: the checks of an agent's published target list (routable targets only, and
//   not more `/targets` than one agent may take).
// - `proxy`: Prometheus's absolute-form scrapes, forwarded through a tunnel.
// - `sd`: http_sd JSON at `/targets` and `/clients`, streamed a target group at a time.
// - `web`: routing of the web listener; `web_config`: its TLS and basic auth file;
//   `web_refusals`: what it refuses before routing, counted and warned about.
// - `tunnel_tls`: the tunnel listener's TLS identity, reloaded on SIGHUP; both listeners'
//   certificate checks.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use http::{Request, Response};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::config::GatewayConfig;
use crate::http_util::{Body, BoxError};
use crate::server::ReloadableTls;
use crate::telemetry::{ConnectionMetrics, GatewayMetrics};
use crate::tunnel::tls::TlsError;
use crate::tunnel::tls_cert::LeafInfo;

mod agents_file;
mod departed;
mod h2conn;
mod pending;
mod proxy;
mod published;
mod registry;
mod sd;
mod status;
mod tunnel;
mod tunnel_tls;
mod web;
mod web_refusals;
// Public for tests/examples.rs, which checks the README's web-config snippets with the loader
// the gateway uses; not part of the API (the file is named in `GatewayConfig`).
#[doc(hidden)]
pub mod web_config;

pub use crate::auth;
use auth::{TokensFile, TokensFileError};
use registry::Registry;
pub use registry::ScrapeStats;
use tunnel_tls::TunnelTls;
pub use tunnel_tls::TunnelTlsReload;
pub use web::is_proxy_request;

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The TLS identity could not be loaded or generated.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The tokens file is unusable.
    #[error(transparent)]
    Tokens(#[from] TokensFileError),
    /// The web configuration file is unusable.
    #[error("{0}")]
    WebConfig(String),
}

/// Shared state of one gateway: configuration, connected agents, credentials, metrics.
pub(crate) struct State {
    pub(crate) config: GatewayConfig,
    pub(crate) registry: Registry,
    pub(crate) tokens: RwLock<Arc<TokensFile>>,
    pub(crate) metrics: GatewayMetrics,
    pub(crate) connections: ConnectionMetrics,
    pub(crate) metrics_registry: MetricsRegistry,
    pub(crate) tunnel_tls: Option<TunnelTls>,
    pub(crate) web_tls: Option<ReloadableTls>,
    /// What the web listener's certificate in use says about itself, for the checks of a reload.
    web_tls_leaf: std::sync::Mutex<Option<LeafInfo>>,
    pub(crate) web_auth: RwLock<Option<Arc<web_config::BasicAuth>>>,
    pub(crate) handshake_warnings: crate::warn_limit::WarnLimit,
    pub(crate) pending: Arc<pending::PendingHandshakes>,
    /// Connections closed at accept because too many handshakes were pending: warned about
    /// apart from failed handshakes, since what to do about them differs.
    pub(crate) busy_warnings: crate::warn_limit::WarnLimit,
    /// Rate limit of warnings about refused agent credentials.
    pub(crate) credential_warnings: crate::warn_limit::WarnLimit,
    /// What the web listener refuses before routing: counted and warned about.
    pub(crate) web_refusals: web_refusals::WebRefusals,
    /// Said once: a web config file's TLS does not reach a server that mounts the gateway.
    mounted_without_tls: std::sync::Once,
    /// `<data_dir>/agents.json`, unless disconnected agents are not kept at all.
    pub(crate) agents_file: Option<std::path::PathBuf>,
    /// Rate limit of warnings about failed writes of the agents file.
    pub(crate) agents_file_warnings: crate::warn_limit::WarnLimit,
    /// Set by the first [`Gateway::serve_tunnels`], whose task writes the agents file.
    agents_file_writer: std::sync::atomic::AtomicBool,
}

impl State {
    pub(crate) fn tokens(&self) -> Arc<TokensFile> {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The basic-auth users in force, if any.
    pub(crate) fn web_auth(&self) -> Option<Arc<web_config::BasicAuth>> {
        self.web_auth
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What a reload of the web configuration file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WebConfigReload {
    /// The gateway has no web configuration file.
    NoFile,
    /// Every setting of the file is in force.
    Applied,
    /// Applied, except that the file turns TLS on or off: the listener speaks what it started
    /// with until a restart.
    TlsNeedsRestart,
}

/// A summary of one agent, for scripts and status pages: a connected one, or one that
/// disconnected and is still listed in service discovery (`web.sd_keep_disconnected`).
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct AgentInfo {
    /// The agent id.
    pub id: String,
    /// Where its tunnel comes (or came) from.
    pub remote: SocketAddr,
    /// Country of the remote address (ISO code, a kind such as `private`, or `unknown`).
    pub country: String,
    /// Seconds since the Unix epoch when the tunnel came up.
    pub connected_since: u64,
    /// Seconds since the Unix epoch when the tunnel went down; `None` while it is up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnected_since: Option<u64>,
    /// Names of its targets.
    pub targets: Vec<String>,
    /// Its scrapes through its (last) tunnel.
    #[serde(flatten)]
    pub stats: ScrapeStats,
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn target_names(list: &crate::tunnel::TargetList) -> Vec<String> {
    list.targets.iter().map(|t| t.name.clone()).collect()
}

/// The gateway: accepts agent tunnels and proxies Prometheus scrapes through them.
///
/// Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Gateway {
    state: Arc<State>,
}

impl Gateway {
    /// Loads the TLS identity (generating the self-signed one on first start) and the tokens file.
    pub fn new(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        Self::with_registry(config, MetricsRegistry::default())
    }

    /// Like [`Gateway::new`], with the gateway's metrics registered in `registry`: an application
    /// mounting the gateway serves its own metrics and the gateway's on the gateway's `/metrics`.
    pub fn with_registry(
        config: GatewayConfig,
        mut metrics_registry: MetricsRegistry,
    ) -> Result<Gateway, GatewayError> {
        let metrics = GatewayMetrics::register(&mut metrics_registry);
        let tunnel_tls = TunnelTls::load(&config, &metrics)?;
        let tokens = TokensFile::load(&config.tokens_file)?;
        let web = match &config.web_config_file {
            Some(path) => Some(web_config::load(path).map_err(GatewayError::WebConfig)?),
            None => None,
        };
        let web_files = web.as_ref().and_then(|w| w.tls_files.as_ref());
        if let Some(files) = web_files {
            tunnel_tls::check("web", files, &metrics);
        }
        let web_tls_leaf = std::sync::Mutex::new(web_files.and_then(|f| f.leaf));
        let (web_tls, web_auth) = match web {
            Some(w) => (w.tls.map(ReloadableTls::new), w.users.map(Arc::new)),
            None => (None, None),
        };
        web_refusals::WebRefusals::register(&metrics);
        let connections = ConnectionMetrics::register(&mut metrics_registry, "gateway");
        config.geo.register_metrics(&mut metrics_registry);
        let mut departed =
            departed::Departed::new(config.sd_keep_disconnected, config.sd_keep_disconnected_max);
        let keep = config.sd_keep_disconnected;
        let agents_file = (!keep.is_zero()).then(|| config.data_dir.join(agents_file::FILE_NAME));
        if agents_file.is_some() {
            agents_file::restore(&config.data_dir, &mut departed, keep, &tokens);
        }
        let departed = Arc::new(std::sync::Mutex::new(departed));
        metrics_registry
            .register_collector(Box::new(departed::DisconnectedGauge(departed.clone())));
        Ok(Gateway {
            state: Arc::new(State {
                registry: Registry::new(metrics.clone(), departed),
                tokens: RwLock::new(Arc::new(tokens)),
                metrics,
                connections,
                metrics_registry,
                tunnel_tls,
                web_tls,
                web_tls_leaf,
                web_auth: RwLock::new(web_auth),
                handshake_warnings: Default::default(),
                pending: pending::PendingHandshakes::new(
                    config.max_pending_handshakes.0,
                    config.max_pending_handshakes.1,
                ),
                busy_warnings: Default::default(),
                credential_warnings: crate::warn_limit::WarnLimit::per_minute(
                    tunnel::CREDENTIAL_WARNINGS_PER_MINUTE,
                ),
                web_refusals: Default::default(),
                mounted_without_tls: std::sync::Once::new(),
                agents_file,
                agents_file_warnings: Default::default(),
                agents_file_writer: Default::default(),
                config,
            }),
        })
    }

    /// `sha256:<hex>` of the tunnel certificate in use, for agents' `--tunnel.fingerprint`;
    /// `None` without TLS.
    pub fn fingerprint(&self) -> Option<String> {
        self.state.tunnel_tls.as_ref().map(TunnelTls::fingerprint)
    }

    /// Re-reads the tunnel's certificate, key and client CA files (SIGHUP): tunnels accepted
    /// from now on use them, established ones keep theirs. On error (the error names the file)
    /// the certificate in use stays: also when the new certificate is not valid now and the one
    /// in use is. A self-signed certificate is not reloaded (only with a client CA file, which
    /// is).
    pub fn reload_tunnel_tls(&self) -> Result<TunnelTlsReload, TlsError> {
        match &self.state.tunnel_tls {
            Some(tls) => tls.reload(&self.state.config, &self.state.metrics),
            None => Ok(TunnelTlsReload::Nothing),
        }
    }

    /// Re-reads the tokens file (SIGHUP). On error the old credentials stay in force. Tunnels whose
    /// token the new file no longer accepts for their id are closed: removing a leaked token's
    /// line cuts off the agents using it, not only their next connection. Disconnected agents
    /// whose token it no longer accepts leave service discovery: removing an agent's line is
    /// how it is decommissioned.
    ///
    /// A file that holds no credential where the previous one held some is refused (a file
    /// caught while being rewritten would lock every agent out for their slow retry).
    pub fn reload_tokens(&self) -> Result<usize, TokensFileError> {
        let current = self.state.tokens();
        let tokens = Arc::new(TokensFile::reload_as(
            &self.state.config.tokens_file,
            crate::auth::TOKENS_FILE,
            &current,
        )?);
        let n = tokens.len();
        // In force before the connected tunnels are checked: a tunnel that registers meanwhile
        // checks its token against the new file itself (`tunnel::run_session`), so none slips
        // between the two.
        *self.state.tokens.write().unwrap_or_else(|p| p.into_inner()) = tokens.clone();
        for agent in self.state.registry.snapshot() {
            if !agent.still_authorized(&tokens) {
                tracing::warn!(agent = %agent.id, remote = %agent.remote, "closing the tunnel: the reloaded tokens file no longer accepts its token for this id");
                agent.revoke();
            }
        }
        // After the tunnels: one that ended meanwhile was moved here before this runs, or was
        // revoked above and is not kept.
        for id in self.state.registry.forget_unauthorized(&tokens) {
            info!(agent = %id, "disconnected agent removed from service discovery: the reloaded tokens file no longer accepts its token for this id");
        }
        Ok(n)
    }

    /// Re-reads the web configuration file (SIGHUP); on error the previous one stays. New
    /// basic-auth users apply at once: a password verified under the previous file is checked
    /// again unless its user's hash is unchanged. New TLS settings (a renewed certificate) apply
    /// to the connections accepted from now on.
    ///
    /// Refused, the previous file staying in force: a file without users where the previous
    /// one had some (an emptied or half-written file would open the listener to anyone; turning
    /// basic auth off takes a restart), and a certificate not valid now in place of one that is.
    pub fn reload_web_config(&self) -> Result<WebConfigReload, String> {
        let Some(path) = &self.state.config.web_config_file else {
            return Ok(WebConfigReload::NoFile);
        };
        let new = web_config::load(path)?;
        // Held to the end: reloads run one at a time, so what is checked is what is replaced.
        let mut users = self
            .state
            .web_auth
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if new.users.is_none() && users.is_some() {
            return Err(format!(
                "{}: no basic_auth_users (emptied, or caught half-written?): turning basic auth off takes a restart",
                path.display()
            ));
        }
        let mut leaf_in_use = self
            .state
            .web_tls_leaf
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let (Some(files), Some(_)) = (&new.tls_files, &self.state.web_tls) {
            tunnel_tls::refuse_invalid_dates(files, *leaf_in_use, SystemTime::now()).map_err(
                |reason| {
                    format!(
                        "{}: tls_server_config: certificate file {}: {reason}",
                        path.display(),
                        files.cert.display()
                    )
                },
            )?;
        }
        if let Some(files) = &new.tls_files {
            tunnel_tls::check("web", files, &self.state.metrics);
        }
        let outcome = match (&self.state.web_tls, new.tls) {
            (Some(current), Some(tls)) => {
                current.replace(tls);
                *leaf_in_use = new.tls_files.and_then(|f| f.leaf);
                WebConfigReload::Applied
            }
            (None, None) => WebConfigReload::Applied,
            _ => WebConfigReload::TlsNeedsRestart,
        };
        let new_users = new.users.map(|new| match users.as_deref() {
            Some(old) => new.keeping_verified(old),
            None => new,
        });
        *users = new_users.map(Arc::new);
        Ok(outcome)
    }

    /// The connected agents, sorted by id.
    pub fn agents(&self) -> Vec<AgentInfo> {
        self.state
            .registry
            .snapshot()
            .iter()
            .map(|a| AgentInfo {
                id: a.id.clone(),
                remote: a.remote,
                country: self.country(a.remote),
                connected_since: unix_seconds(a.connected_at),
                disconnected_since: None,
                targets: target_names(&a.targets()),
                stats: a.stats(),
            })
            .collect()
    }

    /// The agents whose tunnel is down and that service discovery still lists
    /// (`web.sd_keep_disconnected`), sorted by id, with what their last tunnel did.
    pub fn disconnected_agents(&self) -> Vec<AgentInfo> {
        let mut gone: Vec<AgentInfo> = self
            .state
            .registry
            .departed()
            .into_iter()
            .map(|(id, targets, last)| AgentInfo {
                id,
                remote: last.remote,
                country: self.country(last.remote),
                connected_since: unix_seconds(last.connected_at),
                disconnected_since: Some(unix_seconds(last.gone_at)),
                targets: target_names(&targets),
                stats: last.stats,
            })
            .collect();
        gone.sort_by(|a, b| a.id.cmp(&b.id));
        gone
    }

    fn country(&self, remote: SocketAddr) -> String {
        self.state.config.geo.lookup(remote.ip()).to_string()
    }

    /// Answers one request of the web listener: a scrape (absolute-form) or one of ferry's own
    /// endpoints. Mount this in your own HTTP server to embed the gateway, with
    /// [`Gateway::serve_tunnels`] for the agents.
    ///
    /// A scrape arrives in absolute form, `GET http://node-1:9100/metrics`, and its path is
    /// `/metrics`: hand every request for which [`is_proxy_request`] holds to this before a path
    /// router (axum and the like) could send it to the application's own `/metrics`. Prometheus
    /// sends scrapes to a proxy in HTTP/1.1: the listener Prometheus's `proxy_url` names must
    /// speak it (it may speak HTTP/2 as well, for other clients).
    ///
    /// The web config file's `basic_auth_users` apply here; its `tls_server_config` does not:
    /// TLS is the mounting server's (a warning says so once, on the first request).
    ///
    /// On shutdown, drain the server that calls this before cancelling the token of
    /// [`Gateway::serve_tunnels`]: a scrape in flight needs its tunnel, and one cut by closing
    /// tunnels first is answered a misleading "broken pipe" 502.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if self.state.web_tls.is_some() {
            self.state.mounted_without_tls.call_once(|| {
                warn!("the web config file's tls_server_config applies to the gateway's own web listener only: requests handed to Gateway::handle come over the mounting server's connection, with its TLS or none");
            });
        }
        web::handle(&self.state, None, req.map(crate::http_util::boxed)).await
    }

    /// Serves the web listener (Prometheus, service discovery, metrics) until `shutdown`,
    /// then drains in-flight scrapes within the grace period.
    pub async fn serve_web(&self, listener: TcpListener, shutdown: CancellationToken) {
        let grace = self.state.config.shutdown_grace;
        // Whether Prometheus must use https:// and credentials is the first thing to check
        // when its scrapes are refused.
        let (tls, basic_auth) = (
            self.state.web_tls.is_some(),
            self.state.web_auth().is_some(),
        );
        info!(address = %local(&listener), tls, basic_auth, "gateway web listener up");
        let (state, accepted, refused) =
            (self.state.clone(), self.state.clone(), self.state.clone());
        let max = self.state.config.web_max_connections;
        let cap = crate::server::ConnectionCap::new(max);
        crate::server::serve_http_tracked(
            listener,
            move |peer, req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move { web::handle(&state, Some(peer), req.map(crate::http_util::boxed)).await }
            },
            move |peer| {
                let Some(slot) = cap.admit() else {
                    accepted.web_refusals.record(
                        &accepted.metrics,
                        web_refusals::WebRefusal::ConnectionLimit,
                        Some(peer),
                        &format!("{max} connections open, closed at accept"),
                    );
                    return None;
                };
                let country = accepted.config.geo.lookup(peer.ip());
                Some((slot, accepted.connections.track("web", country)))
            },
            self.state.web_tls.clone().map(|tls| {
                let on_failure = move |peer, error: String| {
                    refused.web_refusals.record(
                        &refused.metrics,
                        web_refusals::WebRefusal::TlsHandshake,
                        Some(peer),
                        &error,
                    );
                };
                (tls, on_failure)
            }),
            shutdown,
            crate::server::Drain {
                grace,
                cut_off: SCRAPE_CUT_OFF,
            },
            // Past the longest scrape timeout no scrape is still wanted: a client taking none of
            // its response for that long holds one of the agent's scrape slots for nothing.
            self.state.config.scrape.max_timeout,
        )
        .await;
    }

    /// Accepts agent tunnels on `listener` until `shutdown`; then closes every tunnel, telling
    /// its agent that the gateway shuts down, and returns once they are closed (or after two
    /// seconds at most).
    ///
    /// Meanwhile it saves the agents listed in service discovery in the data directory, a few
    /// seconds after each change and once more before it returns, so that a restarted gateway
    /// still lists the disconnected ones (`web.sd_keep_disconnected`).
    ///
    /// Cancel `shutdown` last: after the web side (your server calling [`Gateway::handle`], or
    /// [`Gateway::serve_web`]) has drained its scrapes in flight. Closing the tunnels first cuts
    /// those scrapes, which Prometheus sees as a misleading "broken pipe" 502. [`Gateway::run`]
    /// does it in this order.
    pub async fn serve_tunnels(&self, listener: TcpListener, shutdown: CancellationToken) {
        match self.fingerprint() {
            Some(fp) => {
                info!(address = %local(&listener), fingerprint = %fp, "gateway tunnel listener up (TLS)")
            }
            None => {
                tracing::warn!(address = %local(&listener), "gateway tunnel listener up WITHOUT TLS (insecure plaintext)")
            }
        }
        // One writer however many listeners serve tunnels.
        let writes = !self
            .state
            .agents_file_writer
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        let stop_writing = CancellationToken::new();
        let writer = writes.then(|| {
            let (state, stop) = (self.state.clone(), stop_writing.clone());
            tokio::spawn(agents_file::keep_written(state, stop).in_current_span())
        });
        tunnel::accept_loop(self.state.clone(), listener, shutdown).await;
        if let Some(writer) = writer {
            stop_writing.cancel();
            let _ = writer.await;
            // Every tunnel is closed (or given up on): each agent is saved as gone now.
            agents_file::write_last(&self.state).await;
        }
    }

    /// Runs both listeners. On `shutdown` the web listener stops accepting and drains in-flight
    /// scrapes first; tunnels close after that.
    pub async fn run(self, web: TcpListener, tunnels: TcpListener, shutdown: CancellationToken) {
        let tunnel_shutdown = CancellationToken::new();
        let tunnel_task = {
            let gateway = self.clone();
            let token = tunnel_shutdown.clone();
            tokio::spawn(
                async move { gateway.serve_tunnels(tunnels, token).await }.in_current_span(),
            )
        };
        self.serve_web(web, shutdown).await;
        tunnel_shutdown.cancel();
        let _ = tunnel_task.await;
        info!("gateway stopped");
    }
}

/// What a scrape still running when the shutdown grace period ends is answered (503).
const SCRAPE_CUT_OFF: &str =
    "the gateway is shutting down: the scrape was still running when its shutdown grace period ended";

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string())
}
