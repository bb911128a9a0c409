//! In-process ferry for tests: a real gateway (TLS with a self-signed certificate pinned by the
//! agent, a hashed tokens file) and real agents, all on 127.0.0.1 port 0.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry::agent::Agent;
use ferry::config::{AgentSection, ConfigErrors, GatewaySection, TargetSection};
use ferry::gateway::auth::hash_token;
use ferry::gateway::Gateway;
use ferry::tunnel::handshake::{request_upgrade, switching_protocols, HandshakeError};
use ferry::tunnel::tls::parse_fingerprint;
use ferry::tunnel::tls_client::{client_config, ClientTls, Purpose, ServerVerify};
use http::Request;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A gateway running in this process.
pub struct TestGateway {
    pub gateway: Gateway,
    pub web: SocketAddr,
    pub tunnel: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
    /// Holds the data dir (self-signed cert) and tokens file.
    pub dir: PathBuf,
}

impl TestGateway {
    /// `sha256:<hex>` of the tunnel certificate.
    pub fn fingerprint(&self) -> String {
        self.gateway.fingerprint().unwrap_or_default()
    }

    /// Stops the gateway and waits for it to finish draining.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }

    /// Ids of connected agents.
    pub fn agent_ids(&self) -> Vec<String> {
        self.gateway.agents().into_iter().map(|a| a.id).collect()
    }

    /// Waits until `id` is connected (panics after `timeout`).
    pub async fn wait_agent(&self, id: &str, timeout: Duration) {
        let start = std::time::Instant::now();
        while !self.agent_ids().iter().any(|a| a == id) {
            assert!(
                start.elapsed() < timeout,
                "agent {id:?} did not connect within {timeout:?}; connected: {:?}",
                self.agent_ids()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `id` is not connected (panics after `timeout`).
    pub async fn wait_agent_gone(&self, id: &str, timeout: Duration) {
        let start = std::time::Instant::now();
        while self.agent_ids().iter().any(|a| a == id) {
            assert!(
                start.elapsed() < timeout,
                "agent {id:?} still connected after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://127.0.0.1:<web port>` — the proxy_url.
    pub fn web_url(&self) -> String {
        format!("http://{}", self.web)
    }
}

/// Credentials: `(glob, token)` pairs written as a hashed tokens file.
pub fn tokens_file(dir: &std::path::Path, creds: &[(&str, &str)]) -> PathBuf {
    let path = dir.join("tokens");
    let text: String = creds
        .iter()
        .map(|(glob, token)| format!("{glob} {}\n", hash_token(token)))
        .collect();
    std::fs::write(&path, format!("# test tokens\n{text}")).unwrap();
    path
}

/// Starts a gateway accepting `creds`, on fresh loopback ports; `tweak` adjusts the section.
pub async fn start_gateway(
    dir: &TempDir,
    creds: &[(&str, &str)],
    tweak: impl FnOnce(&mut GatewaySection),
) -> TestGateway {
    let web = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tunnel = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_gateway_on(dir, creds, web, tunnel, tweak).await
}

/// Starts a gateway on already-bound listeners (to restart one on the same ports).
pub async fn start_gateway_on(
    dir: &TempDir,
    creds: &[(&str, &str)],
    web: TcpListener,
    tunnel: TcpListener,
    tweak: impl FnOnce(&mut GatewaySection),
) -> TestGateway {
    let geo = ferry::telemetry::geo::SharedGeo::disabled();
    start_gateway_with(dir, creds, web, tunnel, tweak, geo, Default::default()).await
}

/// Like [`start_gateway_on`], labelling connections with countries from `geo`.
pub async fn start_gateway_on_with_geo(
    dir: &TempDir,
    creds: &[(&str, &str)],
    web: TcpListener,
    tunnel: TcpListener,
    geo: ferry::telemetry::geo::SharedGeo,
) -> TestGateway {
    start_gateway_with(dir, creds, web, tunnel, |_| {}, geo, Default::default()).await
}

/// Like [`start_gateway`], the gateway's metrics registered in `registry` (an embedding
/// application's).
pub async fn start_gateway_with_registry(
    dir: &TempDir,
    creds: &[(&str, &str)],
    registry: prometheus_client::registry::Registry,
) -> TestGateway {
    let web = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tunnel = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let geo = ferry::telemetry::geo::SharedGeo::disabled();
    start_gateway_with(dir, creds, web, tunnel, |_| {}, geo, registry).await
}

async fn start_gateway_with(
    dir: &TempDir,
    creds: &[(&str, &str)],
    web: TcpListener,
    tunnel: TcpListener,
    tweak: impl FnOnce(&mut GatewaySection),
    geo: ferry::telemetry::geo::SharedGeo,
    registry: prometheus_client::registry::Registry,
) -> TestGateway {
    let (web_addr, tunnel_addr) = (web.local_addr().unwrap(), tunnel.local_addr().unwrap());
    let gateway = gateway_config(dir, creds, web_addr, tunnel_addr, tweak, geo, registry);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gateway.clone().run(web, tunnel, shutdown.clone()));
    TestGateway {
        gateway,
        web: web_addr,
        tunnel: tunnel_addr,
        shutdown,
        task,
        dir: dir.path().to_owned(),
    }
}

/// Like [`start_gateway_on`], on a runtime of its own, dropped with every task still on it as
/// soon as `run` returns: what the gateway gets done before `run` returns is what a `ferry
/// gateway` process gets done before it exits. Its `task` ends once the runtime is gone.
pub async fn start_gateway_process_on(
    dir: &TempDir,
    creds: &[(&str, &str)],
    web: TcpListener,
    tunnel: TcpListener,
    tweak: impl FnOnce(&mut GatewaySection),
) -> TestGateway {
    let (web_addr, tunnel_addr) = (web.local_addr().unwrap(), tunnel.local_addr().unwrap());
    let geo = ferry::telemetry::geo::SharedGeo::disabled();
    let gateway = gateway_config(
        dir,
        creds,
        web_addr,
        tunnel_addr,
        tweak,
        geo,
        Default::default(),
    );
    let shutdown = CancellationToken::new();
    let (web, tunnel) = (web.into_std().unwrap(), tunnel.into_std().unwrap());
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (gw, token) = (gateway.clone(), shutdown.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let web = TcpListener::from_std(web).unwrap();
            let tunnel = TcpListener::from_std(tunnel).unwrap();
            gw.run(web, tunnel, token).await;
        });
        drop(rt);
        let _ = done_tx.send(());
    });
    let task = tokio::spawn(async move {
        let _ = done_rx.await;
    });
    TestGateway {
        gateway,
        web: web_addr,
        tunnel: tunnel_addr,
        shutdown,
        task,
        dir: dir.path().to_owned(),
    }
}

/// The gateway of [`start_gateway_on`], not started.
fn gateway_config(
    dir: &TempDir,
    creds: &[(&str, &str)],
    web_addr: SocketAddr,
    tunnel_addr: SocketAddr,
    tweak: impl FnOnce(&mut GatewaySection),
    geo: ferry::telemetry::geo::SharedGeo,
    registry: prometheus_client::registry::Registry,
) -> Gateway {
    let mut section = GatewaySection {
        data_dir: Some(dir.path().join("data")),
        ..GatewaySection::default()
    };
    section.web.listen_address = web_addr.to_string();
    section.tunnel.listen_address = tunnel_addr.to_string();
    section.tunnel.tls_self_signed_names = vec!["localhost".into()];
    section.auth.tokens_file = Some(tokens_file(dir.path(), creds));
    section.shutdown_grace_period = ferry::config::Dur(Duration::from_secs(5));
    tweak(&mut section);
    let mut errs = ConfigErrors::new("test");
    let cfg = section.validate("gateway", &mut errs);
    assert!(errs.errors.is_empty(), "{errs}");
    let mut cfg = cfg.expect("valid gateway config");
    cfg.geo = geo;
    Gateway::with_registry(cfg, registry).expect("gateway starts")
}

/// An agent running in this process.
pub struct TestAgent {
    pub agent: Agent,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), ferry::agent::AgentError>>,
}

impl TestAgent {
    /// Stops the agent and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }
}

/// The agent section for an agent `id` with `token`, pinned to `gw`'s certificate, serving `targets` (name, url).
pub fn agent_section(gw: &TestGateway, id: &str, targets: &[(&str, String)]) -> AgentSection {
    let mut s = agent_section_to(
        &format!("https://localhost:{}", gw.tunnel.port()),
        id,
        targets,
    );
    s.tunnel.fingerprint = vec![gw.fingerprint()];
    s
}

/// The agent section for an agent `id` dialling `gateway` (a URL), serving `targets`.
pub fn agent_section_to(gateway: &str, id: &str, targets: &[(&str, String)]) -> AgentSection {
    let mut s = AgentSection {
        gateway: Some(gateway.to_owned()),
        agent_id: Some(id.into()),
        targets: targets
            .iter()
            .map(|(name, url)| TargetSection {
                name: (*name).into(),
                url: url.clone(),
                ..TargetSection::default()
            })
            .collect(),
        ..AgentSection::default()
    };
    // Tests restart peers: reconnect as fast as the configuration allows.
    s.reconnect.min_backoff = ferry::config::Dur(Duration::from_millis(100));
    s.reconnect.max_backoff = ferry::config::Dur(Duration::from_millis(300));
    s.reconnect.auth_failure_backoff = ferry::config::Dur(Duration::from_secs(1));
    s.shutdown_grace_period = ferry::config::Dur(Duration::from_secs(5));
    s
}

/// Validates `section` with `token` as FERRY_TOKEN and starts the agent.
pub fn start_agent(section: AgentSection, token: &str) -> TestAgent {
    start_agent_in_env(section, token, &[])
}

/// Like [`start_agent`], in an environment that also holds `vars` (`HTTPS_PROXY`, `NO_PROXY`).
pub fn start_agent_in_env(section: AgentSection, token: &str, vars: &[(&str, &str)]) -> TestAgent {
    let token = token.to_owned();
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let env = move |name: &str| match name {
        "FERRY_TOKEN" => Some(token.clone()),
        _ => vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
    };
    let mut errs = ConfigErrors::new("test");
    let cfg = section.validate("agent", &env, &mut errs);
    assert!(errs.errors.is_empty(), "{errs}");
    let agent = Agent::new(cfg.unwrap()).expect("agent starts");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(agent.clone().run(shutdown.clone()));
    TestAgent {
        agent,
        shutdown,
        task,
    }
}

/// An agent `id` serving `targets`, connected to a gateway of the test's own (plaintext): the
/// returned HTTP/2 client is the gateway's end of the tunnel, to send the agent what a real
/// gateway never would.
pub async fn agent_on_bare_tunnel<B>(
    id: &str,
    targets: &[(&str, String)],
) -> (TestAgent, SendRequest<B>)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    agent_on_bare_tunnel_with(id, targets, |_| {}).await
}

/// Like [`agent_on_bare_tunnel`], with the agent's section changed by `tweak` first.
pub async fn agent_on_bare_tunnel_with<B>(
    id: &str,
    targets: &[(&str, String)],
    tweak: impl FnOnce(&mut AgentSection),
) -> (TestAgent, SendRequest<B>)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut section = agent_section_to(&url, id, targets);
    section.tunnel.insecure_plaintext = true;
    tweak(&mut section);
    let agent = start_agent(section, "test-token");
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the agent dials within 10 s")
        .unwrap();
    let (upgrade_tx, upgrade_rx) = tokio::sync::oneshot::channel();
    let upgrade_tx = std::sync::Mutex::new(Some(upgrade_tx));
    let service = service_fn(move |req: Request<Incoming>| {
        if let Some(tx) = upgrade_tx.lock().unwrap().take() {
            let _ = tx.send(hyper::upgrade::on(req));
        }
        async { Ok::<_, Infallible>(switching_protocols::<Full<Bytes>>()) }
    });
    tokio::spawn(
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades(),
    );
    let upgraded = upgrade_rx.await.unwrap().await.expect("tunnel upgraded");
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), upgraded)
        .await
        .expect("HTTP/2 over the tunnel");
    tokio::spawn(conn);
    (agent, sender)
}

/// A TLS connection to `gw`'s tunnel listener, pinned to its certificate, nothing sent yet.
pub async fn tunnel_tls(
    gw: &TestGateway,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tls = ClientTls {
        verify: ServerVerify::Fingerprints(vec![parse_fingerprint(&gw.fingerprint()).unwrap()]),
        client_cert: None,
    };
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config(&tls, Purpose::Tunnel).unwrap()));
    let tcp = tokio::net::TcpStream::connect(gw.tunnel).await.unwrap();
    connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS to the gateway")
}

/// Opens a tunnel to `gw` as agent `id` would (TLS pinned to its certificate, the upgrade with
/// `token`), without an agent behind it: the stream is the test's, to speak for a hostile agent.
pub async fn upgrade_as_agent(
    gw: &TestGateway,
    token: &str,
    id: &str,
) -> Result<hyper::upgrade::Upgraded, HandshakeError> {
    let io = tunnel_tls(gw).await;
    let host = format!("localhost:{}", gw.tunnel.port());
    let upgrade = tokio::time::timeout(
        Duration::from_secs(10),
        request_upgrade(io, &host, token, id),
    );
    upgrade
        .await
        .expect("gateway answers the upgrade within 10 s")
}

/// A hostile agent `id` connected to `gw` that publishes `targets` (the JSON of a target list,
/// unchecked) and serves nothing else. Disconnects when the task is aborted.
pub async fn agent_publishing(gw: &TestGateway, id: &str, targets: String) -> JoinHandle<()> {
    let upgraded = upgrade_as_agent(gw, "test-token", id)
        .await
        .expect("tunnel upgraded");
    agent_publishing_on(upgraded, targets, std::future::ready(()))
}

/// Like [`agent_publishing`], on a tunnel the test opened: its first target list is answered
/// once `gate` completes (an agent slow to register).
pub fn agent_publishing_on(
    upgraded: hyper::upgrade::Upgraded,
    targets: String,
    gate: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    let gate = futures_util::FutureExt::shared(Box::pin(gate));
    let service = service_fn(move |req: Request<Incoming>| {
        let targets = targets.clone();
        let gate = gate.clone();
        async move {
            if req.uri().query().is_some_and(|q| q.contains("after=")) {
                // Its list never changes: the long poll is held.
                std::future::pending::<()>().await;
            }
            gate.await;
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(targets))))
        }
    });
    tokio::spawn(async move {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(upgraded, service)
            .await;
    })
}

/// Gateway + one connected agent `id` serving `targets`: the common starting point.
pub async fn gateway_and_agent(
    dir: &TempDir,
    id: &str,
    targets: &[(&str, String)],
) -> (TestGateway, TestAgent) {
    let gw = start_gateway(dir, &[("*", "test-token")], |_| {}).await;
    let agent = start_agent(agent_section(&gw, id, targets), "test-token");
    gw.wait_agent(id, Duration::from_secs(10)).await;
    (gw, agent)
}

/// `ferry exporter` with the connection collector, in-process on 127.0.0.1:0 until `shutdown`.
pub async fn start_exporter(shutdown: &CancellationToken) -> SocketAddr {
    start_exporter_with_geo(shutdown, ferry::telemetry::geo::SharedGeo::disabled()).await
}

/// [`start_exporter`] labelling countries with `geo`.
pub async fn start_exporter_with_geo(
    shutdown: &CancellationToken,
    geo: ferry::telemetry::geo::SharedGeo,
) -> SocketAddr {
    let mut section = ferry::config::ExporterSection::default();
    section.collector.connections = true;
    let mut errs = ConfigErrors::new("test");
    let cfg = section.validate("exporter", &mut errs);
    assert!(errs.errors.is_empty(), "{errs}");
    let mut cfg = cfg.expect("exporter config");
    cfg.geo = geo;
    let exporter = ferry::exporter::Exporter::new(&cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move { exporter.serve(listener, shutdown).await }
    });
    addr
}

/// Reads a metric's value from a Prometheus text exposition: the first sample whose line starts
/// with `name{` or `name ` and contains every `label="value"` pair given.
pub fn metric_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            if !labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
            {
                return None;
            }
            line.rsplit(' ').next()?.parse().ok()
        })
}
