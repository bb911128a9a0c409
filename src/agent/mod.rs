//! The private side of the pull path: an [`Agent`] dials out to the gateway, keeps the tunnel up
//! (reconnecting with [`backoff`]) and serves its allowlist of targets through it. See the crate
//! documentation for an example of embedding it.

// Inside:
// - `session`: one tunnel's life (dial, TLS, upgrade, serve HTTP/2) and the reconnect loop.
// - `serve`: what the agent answers over the tunnel: its target list and scrapes.
// - `targets`: the allowlist of targets and their HTTP clients.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, Target};
use crate::endpoints::OwnEndpoints;
use crate::telemetry::connections::ConnectionCollector;
use crate::telemetry::scrape_gate::ScrapeGate;
use crate::telemetry::AgentMetrics;
use crate::tunnel::tls::TlsError;
use crate::tunnel::tls_cert::{DateProblem, LeafInfo};
use crate::tunnel::tls_client::{client_config, ClientTls, Purpose};

pub mod backoff;
mod serve;
mod session;
pub(crate) mod targets;

use targets::{plain_client, HttpClient, TargetSet};

/// Why an agent could not be built or reconfigured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A TLS file (tunnel or target) is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A target list [`Agent::set_targets`] cannot serve.
    #[error("{0}")]
    Targets(String),
    /// [`Agent::run`] was called while a run of this agent (or a clone) is under way: two
    /// tunnels with one agent id would take the id from each other at the gateway.
    #[error(
        "agent {0:?} is already running: one agent (and its clones) runs one tunnel at a time"
    )]
    AlreadyRunning(String),
}

/// State shared by the reconnect loop, the tunnel service and reloads.
pub(crate) struct Shared {
    pub(crate) config: AgentConfig,
    /// How the next tunnel talks TLS (none: plaintext); replaced on reload, the tunnel up keeps
    /// the one it was opened with.
    pub(crate) tunnel_tls: std::sync::RwLock<Option<Arc<TunnelTls>>>,
    pub(crate) targets: watch::Sender<Arc<TargetSet>>,
    pub(crate) metrics: AgentMetrics,
    pub(crate) metrics_registry: MetricsRegistry,
    /// With the host connection collector: what its encodings go through.
    pub(crate) scrape_gate: Option<ScrapeGate>,
    plain_client: HttpClient,
    version: AtomicU64,
    /// Whether a [`Agent::run`] is under way.
    running: AtomicBool,
    /// Why the gateway closed the current tunnel, when it said so before closing it.
    pub(crate) closing_notice: std::sync::Mutex<Option<serve::ClosingNotice>>,
    /// Why the last attempt failed or the last tunnel ended; none while a tunnel is up.
    pub(crate) last_error: std::sync::Mutex<Option<String>>,
    /// Cuts short the wait before the next connection attempt ([`Agent::reconnect_now`]).
    pub(crate) reconnect_now: tokio::sync::Notify,
}

/// The tunnel's TLS settings and the client configuration built from their files.
pub(crate) struct TunnelTls {
    pub(crate) settings: ClientTls,
    pub(crate) config: Arc<rustls::ClientConfig>,
    /// What is wrong with the client certificate's dates (if any) as it was read.
    cert_dates: Option<DateProblem>,
}

impl TunnelTls {
    /// Reads the files of `settings`, warning about a client certificate the gateway would
    /// refuse for its dates: loaded without complaint, it fails only in every handshake.
    fn load(settings: ClientTls) -> Result<TunnelTls, TlsError> {
        let tls = TunnelTls::read(settings)?;
        tls.warn_about_dates();
        Ok(tls)
    }

    fn read(settings: ClientTls) -> Result<TunnelTls, TlsError> {
        let config = Arc::new(client_config(&settings, Purpose::Tunnel)?);
        let cert_dates = settings
            .client_cert
            .as_ref()
            .and_then(|(cert, _)| LeafInfo::file_date_problem(cert, SystemTime::now()));
        Ok(TunnelTls {
            settings,
            config,
            cert_dates,
        })
    }

    fn warn_about_dates(&self) {
        if let Some((cert, _)) = &self.settings.client_cert {
            let problem = LeafInfo::client_problem(cert, SystemTime::now(), "the gateway refuses");
            if let Some(problem) = problem {
                tracing::warn!("tunnel client certificate (tunnel.cert_file): {problem}");
            }
        }
    }
}

/// Marks an agent as running for as long as it lives, also when the run's future is dropped
/// (an aborted task, a `select!` or `timeout` around it) rather than returning: the tunnel
/// went with the future, so it is down then too (`is_connected`, `/-/ready`, the metric).
struct Running(Arc<Shared>);

impl Running {
    fn claim(shared: &Arc<Shared>) -> Option<Running> {
        shared
            .running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Running(shared.clone()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.metrics.tunnel_up.set(0);
        self.0.running.store(false, Ordering::SeqCst);
    }
}

/// An agent: dials out to the gateway, keeps the tunnel up, serves its listed targets.
///
/// Cheap to clone; clones share one state.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    /// Builds an agent from a validated configuration. TLS files are loaded now, so a bad file
    /// is reported before anything is dialled ([`AgentError::Tls`]); it needs no runtime.
    pub fn new(config: AgentConfig) -> Result<Agent, AgentError> {
        Self::with_registry(config, MetricsRegistry::default())
    }

    /// Like [`Agent::new`], serving `registry` (your application's metrics, plus the agent's own)
    /// as the built-in target `ferry`: an embedding application needs no HTTP listener of its own.
    pub fn with_registry(
        config: AgentConfig,
        mut registry: MetricsRegistry,
    ) -> Result<Agent, AgentError> {
        let metrics = AgentMetrics::register(&mut registry);
        config.geo.register_metrics(&mut registry);
        let scrape_gate = config.connections_collector.as_ref().map(|exclude| {
            let collector = ConnectionCollector::new(config.geo.clone(), exclude.clone());
            registry.register_collector(Box::new(collector));
            let gate = ScrapeGate::new();
            gate.register_metrics(&mut registry);
            gate
        });
        let tunnel_tls = match &config.gateway.tls {
            Some(tls) => Some(Arc::new(TunnelTls::load(tls.clone())?)),
            None => None,
        };
        let plain_client = plain_client(config.target_idle_timeout);
        let set = TargetSet::build(
            &config.agent_id,
            1,
            &config.targets,
            &config.labels,
            config.self_port,
            &plain_client,
            config.target_idle_timeout,
        )?;
        metrics.targets.set(set.list.targets.len() as i64);
        let (targets, _) = watch::channel(Arc::new(set));
        Ok(Agent {
            shared: Arc::new(Shared {
                config,
                tunnel_tls: std::sync::RwLock::new(tunnel_tls),
                targets,
                metrics,
                metrics_registry: registry,
                scrape_gate,
                plain_client,
                version: AtomicU64::new(1),
                running: AtomicBool::new(false),
                closing_notice: std::sync::Mutex::new(None),
                last_error: std::sync::Mutex::new(None),
                reconnect_now: tokio::sync::Notify::new(),
            }),
        })
    }

    /// The id this agent claims.
    pub fn id(&self) -> &str {
        &self.shared.config.agent_id
    }

    /// Replaces the targets and labels (config reload on SIGHUP). The gateway learns of the
    /// change over the open tunnel; nothing reconnects. On error the old targets stay.
    pub fn set_targets(
        &self,
        targets: &[Target],
        labels: &BTreeMap<String, String>,
    ) -> Result<(), AgentError> {
        let s = &self.shared;
        let version = s.version.fetch_add(1, Ordering::SeqCst) + 1;
        let mut set = TargetSet::build(
            &s.config.agent_id,
            version,
            targets,
            labels,
            s.config.self_port,
            &s.plain_client,
            s.config.target_idle_timeout,
        )?;
        // Still replaced (its TLS clients read their files again), but a list the gateway
        // already has keeps its version: the gateway sees no change, nor logs one, on every
        // reload that only re-read files.
        {
            let old = s.targets.borrow();
            if old.list.labels == set.list.labels && old.list.targets == set.list.targets {
                set.list.version = old.list.version;
            }
        }
        s.metrics.targets.set(set.list.targets.len() as i64);
        let old = s.targets.send_replace(Arc::new(set));
        // A removed target's series would otherwise stay in the agent's metrics for ever.
        let kept = s
            .targets
            .borrow()
            .list
            .targets
            .iter()
            .map(|t| t.name.clone())
            .collect::<Vec<_>>();
        for gone in old.list.targets.iter().filter(|t| !kept.contains(&t.name)) {
            serve::forget_target(s, &gone.name);
        }
        Ok(())
    }

    /// Reads the tunnel's CA file and client certificate and key again (SIGHUP), with `settings`
    /// in place of the running ones if given (a config file whose fingerprints or file names
    /// changed). The next connection to the gateway uses them; the tunnel up stays as it is. On
    /// error (a file that no longer parses) the previous ones stay. Returns the files read: none
    /// for a tunnel pinned by fingerprint without a client certificate, or a plaintext tunnel
    /// (which stays plaintext).
    ///
    /// The usual CA rotation: add the new CA to the CA file, reload every agent, then give the
    /// gateway its certificate from the new CA.
    pub fn reload_tunnel_tls(
        &self,
        settings: Option<ClientTls>,
    ) -> Result<Vec<std::path::PathBuf>, AgentError> {
        let mut current = self
            .shared
            .tunnel_tls
            .write()
            .unwrap_or_else(|p| p.into_inner());
        // Turning TLS on or off changes the gateway URL's scheme: that waits for a restart.
        let Some(running) = current.as_ref() else {
            return Ok(Vec::new());
        };
        let settings = settings.unwrap_or_else(|| running.settings.clone());
        let mut files = Vec::new();
        if let crate::tunnel::tls_client::ServerVerify::CaFile(ca) = &settings.verify {
            files.push(ca.clone());
        }
        if let Some((cert, key)) = &settings.client_cert {
            files.extend([cert.clone(), key.clone()]);
        }
        let new = TunnelTls::read(settings)?;
        // As the gateway does with its own: a certificate the other side refuses for its dates
        // is not put in place of one it accepts (a renewal copied in too early, or an old file).
        if let (Some(problem), None, Some((cert, _))) = (
            new.cert_dates,
            running.cert_dates,
            &new.settings.client_cert,
        ) {
            return Err(TlsError::Cert {
                path: cert.clone(),
                reason: format!(
                    "{problem}, while the certificate in use is valid: the gateway would refuse it, so it is not loaded (tunnel.cert_file)"
                ),
            }
            .into());
        }
        new.warn_about_dates();
        *current = Some(Arc::new(new));
        Ok(files)
    }

    /// If the agent is waiting to reconnect, it tries now instead: after a reload that fixes
    /// what the gateway refused (a renewed client certificate, a new token), the operator need
    /// not wait out the slow retry of a refusal. Does nothing while the tunnel is up or being
    /// opened; it is not remembered for a later wait.
    pub fn reconnect_now(&self) {
        self.shared.reconnect_now.notify_waiters();
    }

    /// Whether the tunnel is up right now.
    pub fn is_connected(&self) -> bool {
        self.shared.metrics.tunnel_up.get() == 1
    }

    /// Why the tunnel is not up, in one line: the last connection attempt's error (`401
    /// Unauthorized: invalid token`, an unreachable gateway, a refused certificate) or why the
    /// last tunnel ended. `None` while a tunnel is up and before the first attempt. The same
    /// reason is logged through `tracing`; this is for an application that shows it elsewhere.
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps a tunnel to the gateway up until `shutdown`, reconnecting with backoff. On shutdown
    /// in-flight scrapes get the grace period to finish.
    ///
    /// One run at a time: while this agent or a clone of it runs, another `run` returns
    /// [`AgentError::AlreadyRunning`] at once. Once a run has returned, the agent can run again.
    ///
    /// A refused token, an unreachable gateway or a certificate that does not verify is retried
    /// (slowly after a refusal), never returned: [`Agent::last_error`] says why the tunnel is
    /// down, [`Agent::is_connected`] whether it is up. Dropping the future instead of cancelling
    /// `shutdown` closes the tunnel without draining the scrapes in flight.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let Some(_running) = Running::claim(&self.shared) else {
            let e = AgentError::AlreadyRunning(self.shared.config.agent_id.clone());
            // Usually spawned with its result unread: say it where the tunnel's errors go too.
            tracing::error!(error = %e, "refused to start a second tunnel");
            return Err(e);
        };
        session::reconnect_loop(self.shared.clone(), shutdown).await;
        Ok(())
    }

    /// Serves the agent's own `/metrics`, `/-/healthy` and `/-/ready` on a local listener.
    pub async fn serve_web(&self, listener: TcpListener, shutdown: CancellationToken) {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(address = %addr, "agent web listener up (/metrics, /-/healthy, /-/ready)");
        }
        let shared = self.shared.clone();
        let grace = shared.config.shutdown_grace;
        crate::server::serve_http(
            listener,
            move |_peer, req| {
                let shared = shared.clone();
                async move { crate::endpoints::answer(&shared, &req).await }
            },
            shutdown,
            grace,
        )
        .await;
    }
}

impl OwnEndpoints for Shared {
    const NAME: &'static str = "the agent";
    const PATHS: &'static [&'static str] = &["/metrics", "/-/healthy", "/-/ready"];
    const NOT_FOUND: &'static str = "not found";

    fn registry(&self) -> &MetricsRegistry {
        &self.metrics_registry
    }

    fn scrape_gate(&self) -> Option<&ScrapeGate> {
        self.scrape_gate.as_ref()
    }

    fn ready(&self) -> Result<(), &'static str> {
        match self.metrics.tunnel_up.get() {
            1 => Ok(()),
            _ => Err("tunnel to the gateway is down"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AgentSection, ConfigErrors, TargetSection};

    fn agent() -> Agent {
        let mut section = AgentSection {
            gateway: Some("https://gateway.example:7443".into()),
            agent_id: Some("node-1".into()),
            ..AgentSection::default()
        };
        section.tunnel.fingerprint = vec![format!("sha256:{}", "ab".repeat(32))];
        let env = |name: &str| (name == "FERRY_TOKEN").then(|| "t".to_owned());
        let mut errs = ConfigErrors::new("test");
        let config = section.validate("agent", &env, &mut errs);
        Agent::new(errs.finish(config).unwrap().unwrap()).unwrap()
    }

    fn target(name: &str) -> Target {
        TargetSection {
            name: name.into(),
            url: "http://127.0.0.1:9100/metrics".into(),
            ..TargetSection::default()
        }
        .to_target("targets[0]")
        .unwrap()
    }

    fn refusal(targets: &[Target], labels: &[(&str, &str)]) -> String {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        agent()
            .set_targets(targets, &labels)
            .unwrap_err()
            .to_string()
    }

    /// A hand-built list gets the config file's checks: the gateway would drop what fails them.
    #[test]
    fn set_targets_refuses_names_and_labels_the_config_file_refuses() {
        let mut bad_name = target("node");
        bad_name.name = "bad name\"".into();
        assert_eq!(
            refusal(&[bad_name], &[]),
            r#"target "bad name\"": the name must be non-empty letters, digits, '-', '_' or '.'"#
        );
        for (label, problem) in [
            ("__scheme__", "is not a valid label name"),
            ("bad-name", "is not a valid label name"),
            ("job", "is reserved"),
            ("instance", "is reserved"),
        ] {
            let mut t = target("node");
            t.labels.insert(label.into(), "x".into());
            let err = refusal(&[t], &[]);
            assert!(
                err.starts_with(&format!("target \"node\": label {label:?} {problem}")),
                "{err}"
            );
            let err = refusal(&[target("node")], &[(label, "x")]);
            assert!(
                err.starts_with(&format!("agent label {label:?} {problem}")),
                "{err}"
            );
        }
        let mut port_0 = target("node");
        port_0.port = 0;
        assert_eq!(
            refusal(&[port_0], &[]),
            "target \"node\": port 0 is not a port (1-65535)"
        );
    }

    /// A reload that changes nothing the gateway sees (only files re-read) keeps the list's
    /// version: the gateway is not told of a change, nor logs one; a real change is a new version.
    #[test]
    fn an_unchanged_list_keeps_its_version() {
        let agent = agent();
        let version = || agent.shared.targets.borrow().list.version;
        agent.set_targets(&[target("a")], &BTreeMap::new()).unwrap();
        let first = version();
        agent.set_targets(&[target("a")], &BTreeMap::new()).unwrap();
        assert_eq!(version(), first);
        let labels = BTreeMap::from([("site".to_owned(), "x".to_owned())]);
        agent.set_targets(&[target("a")], &labels).unwrap();
        assert!(version() > first);
    }

    /// Prometheus asks for a decoded `__metrics_path__`, encoded its own way: a target is
    /// published decoded and reached by any encoding of that path, and by nothing else.
    #[test]
    fn targets_are_published_and_routed_by_decoded_path() {
        let at = |name: &str, url: &str| {
            let mut t = target(name);
            t.url = url.parse().unwrap();
            t.path = crate::tunnel::metrics_path::decode(t.url.path()).unwrap();
            t
        };
        let agent = agent();
        let targets = [
            at("enc", "http://127.0.0.1:9100/a%20b/metrics"),
            at("bang", "http://127.0.0.1:9100/x!y/metrics"),
        ];
        agent.set_targets(&targets, &BTreeMap::new()).unwrap();
        let set = agent.shared.targets.borrow().clone();
        let published: Vec<(&str, &str)> = set
            .list
            .targets
            .iter()
            .map(|t| (t.name.as_str(), t.path.as_str()))
            .collect();
        assert_eq!(
            published,
            [
                ("enc", "/a b/metrics"),
                ("bang", "/x!y/metrics"),
                ("ferry", "/metrics")
            ]
        );
        for (port, path, name) in [
            (9100, "/a%20b/metrics", Some("enc")),
            (9100, "/x%21y/metrics", Some("bang")),
            (9100, "/x!y/metrics", Some("bang")),
            (9100, "/%78%21y/metrics", Some("bang")),
            (9369, "/%6Detrics", Some("ferry")),
            (9100, "/a%2520b/metrics", None),
            (9100, "/x!y%2Fmetrics", None),
            (9100, "/x!y/metrics/", None),
            (9100, "/x!y/%2e%2e/x!y/metrics", None),
            (9101, "/x%21y/metrics", None),
        ] {
            let routed = set.route(port, path).map(|r| r.name.as_str());
            assert_eq!(routed, name, "{port} {path}");
        }

        let twice = [
            targets[1].clone(),
            at("bang2", "http://127.0.0.1:9100/x%21y/metrics"),
        ];
        assert_eq!(
            refusal(&twice, &[]),
            r#"target "bang2": port 9100 path "/x!y/metrics" is already taken"#
        );
        let mut control = target("ctl");
        control.path = "/a\nb".into();
        assert_eq!(
            refusal(&[control], &[]),
            r#"target "ctl": path "/a\nb" has a control character once decoded"#
        );
    }

    #[test]
    fn refused_targets_leave_the_old_ones_in_place() {
        let agent = agent();
        agent
            .set_targets(&[target("node")], &BTreeMap::new())
            .unwrap();
        let labels = BTreeMap::from([("job".to_owned(), "x".to_owned())]);
        assert!(agent.set_targets(&[target("other")], &labels).is_err());
        let set = agent.shared.targets.borrow().clone();
        let names: Vec<&str> = set.list.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["node", "ferry"]);
        assert!(set.list.labels.is_empty());
    }
}
