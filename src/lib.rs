//! ferry carries monitoring traffic across network boundaries.
//!
//! Prometheus keeps pulling: it uses the **gateway** as its `proxy_url`, and an **agent** inside the
//! private network dials out to the gateway over one TLS tunnel and performs the scrapes it is sent.
//! The **egress** proxy is the push path's one audited exit. The `ferry` binary runs these roles;
//! this library lets a Rust application embed the agent or mount the gateway in its own server.
//!
//! # Features
//!
//! | feature | what is compiled in |
//! |---|---|
//! | `agent` | [`agent`]: dial out, serve listed targets (and the application's own metrics) through the tunnel |
//! | `gateway` | [`gateway`]: accept tunnels, proxy Prometheus's scrapes, service discovery |
//! | `egress` | [`egress`]: the forward proxy with client and destination allowlists, payload validation |
//! | `geo` | country lookup in a MaxMind-format database, the host connection collector, [`exporter`] |
//! | `cli` (default) | all of the above, plus the `ferry` command line |
//!
//! An application embedding only the agent depends on
//! `ferry = { version = "0.1", default-features = false, features = ["agent"] }`.
//!
//! # Embedding the agent
//!
//! The agent serves `registry` (the application's metrics, plus its own) as its built-in target
//! `ferry`: the application needs no HTTP listener of its own. Call it from a tokio runtime.
//!
//! ```
//! # #[cfg(feature = "agent")]
//! # mod example {
//! use ferry::agent::Agent;
//! use ferry::config::{AgentSection, ConfigErrors};
//! use prometheus_client::registry::Registry;
//! use tokio_util::sync::CancellationToken;
//!
//! /// Starts an agent inside this application; `registry` is served as the target `ferry`.
//! /// Cancelling `stop` closes the tunnel cleanly (the gateway drains the scrapes in flight).
//! fn start_agent(
//!     registry: Registry,
//!     gateway: &str,
//!     fingerprint: &str,
//!     token: &str,
//!     stop: CancellationToken,
//! ) -> Result<Agent, Box<dyn std::error::Error>> {
//!     let mut section = AgentSection {
//!         gateway: Some(gateway.to_owned()),
//!         agent_id: Some("billing-7".to_owned()),
//!         ..AgentSection::default()
//!     };
//!     section.tunnel.fingerprint = vec![fingerprint.to_owned()];
//!     // Environment lookups (FERRY_TOKEN, HTTPS_PROXY) go through this closure.
//!     let token = token.to_owned();
//!     let env = move |name: &str| (name == "FERRY_TOKEN").then(|| token.clone());
//!     let mut errs = ConfigErrors::new("billing");
//!     let config = section.validate("agent", &env, &mut errs);
//!     let config = errs.finish(config)?.ok_or("invalid agent configuration")?;
//!     let agent = Agent::with_registry(config, registry)?;
//!     tokio::spawn(agent.clone().run(stop));
//!     Ok(agent)
//! }
//! # }
//! ```
//!
//! Prometheus then scrapes `billing-7:9369` (path `/metrics`) through the gateway.
//! [`Agent::set_targets`](agent::Agent::set_targets) replaces the targets at run time. ferry
//! reports through `tracing` only (a refused token, an unreachable gateway): install a subscriber
//! to see why [`Agent::is_connected`](agent::Agent::is_connected) stays false.
//!
//! # Mounting the gateway in your own server
//!
//! [`Gateway::handle`](gateway::Gateway::handle) answers the web side (Prometheus's scrapes,
//! `/targets`, the gateway's `/metrics` and status page);
//! [`Gateway::serve_tunnels`](gateway::Gateway::serve_tunnels) accepts the agents' tunnels on a
//! listener of their own. Two things to get right:
//!
//! - Prometheus sends absolute-form requests (`GET http://node-1:9100/metrics`) whose *path* is
//!   `/metrics`: hand every request [`is_proxy_request`](gateway::is_proxy_request) says is a
//!   scrape to the gateway before a path router could route it to the application's own
//!   `/metrics`. (Prometheus speaks HTTP/1.1 to a proxy; in HTTP/2 every request has an
//!   authority, so do not test `req.uri().authority()` yourself.)
//! - On shutdown, drain your HTTP server first and cancel the tunnels' token after: a scrape in
//!   flight travels through a tunnel, and closing the tunnels first cuts it with a misleading
//!   "broken pipe" 502. ([`Gateway::run`](gateway::Gateway::run) does it in this order.)
//!
//! ```no_run
//! # #[cfg(feature = "gateway")]
//! # mod example {
//! use std::convert::Infallible;
//! use std::time::Duration;
//!
//! use ferry::config::{ConfigErrors, GatewaySection};
//! use ferry::gateway::Gateway;
//! use hyper::body::Incoming;
//! use hyper::service::service_fn;
//! use hyper_util::rt::TokioIo;
//! use hyper_util::server::graceful::GracefulShutdown;
//! use tokio::net::TcpListener;
//! use tokio_util::sync::CancellationToken;
//!
//! /// Serves the application's `/hello` and the gateway on :8080, agents' tunnels on :7443,
//! /// until `stop`.
//! async fn serve(stop: CancellationToken) -> Result<(), Box<dyn std::error::Error>> {
//!     let mut section = GatewaySection::default();
//!     section.auth.tokens_file = Some("/etc/portal/ferry-tokens".into());
//!     section.data_dir = Some("/var/lib/portal/ferry".into());
//!     let mut errs = ConfigErrors::new("portal");
//!     let config = section.validate("gateway", &mut errs);
//!     let gateway = Gateway::new(errs.finish(config)?.ok_or("invalid gateway configuration")?)?;
//!
//!     // The tunnels get their own token: they close last.
//!     let tunnels_stop = CancellationToken::new();
//!     let tunnels = TcpListener::bind("[::]:7443").await?;
//!     let tunnels = tokio::spawn({
//!         let (gateway, token) = (gateway.clone(), tunnels_stop.clone());
//!         async move { gateway.serve_tunnels(tunnels, token).await }
//!     });
//!
//!     let web = TcpListener::bind("[::]:8080").await?;
//!     let graceful = GracefulShutdown::new();
//!     loop {
//!         let (stream, _peer) = tokio::select! {
//!             accepted = web.accept() => accepted?,
//!             _ = stop.cancelled() => break,
//!         };
//!         let gateway = gateway.clone();
//!         let service = service_fn(move |req: http::Request<Incoming>| {
//!             let gateway = gateway.clone();
//!             async move {
//!                 // A scrape of http://node-1:9100/hello is the gateway's, not ours.
//!                 if !ferry::gateway::is_proxy_request(&req) && req.uri().path() == "/hello" {
//!                     let hello = ferry::http_util::full("hello\n");
//!                     return Ok::<_, Infallible>(http::Response::new(hello));
//!                 }
//!                 Ok(gateway.handle(req).await)
//!             }
//!         });
//!         let conn = hyper::server::conn::http1::Builder::new()
//!             .serve_connection(TokioIo::new(stream), service);
//!         let conn = graceful.watch(conn);
//!         tokio::spawn(conn);
//!     }
//!     drop(web);
//!     // First the scrapes in flight finish (they need the tunnels)...
//!     let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
//!     // ...then the tunnels close.
//!     tunnels_stop.cancel();
//!     tunnels.await?;
//!     Ok(())
//! }
//! # }
//! ```
//!
//! # Component map
//!
//! - [`tunnel`]: the wire protocol v1 shared by both sides: TCP dialling (directly or through an
//!   HTTP CONNECT proxy, which `NO_PROXY` may exempt the gateway from), TLS identities and
//!   verification, HTTP/2 keepalive settings and the JSON target list the agent publishes (its
//!   paths percent-decoded, as `__metrics_path__`; both sides match scrapes by decoded path).
//! - [`gateway`] (feature `gateway`): the public side: accepts and authenticates tunnels, keeps
//!   the connected agents, proxies Prometheus's absolute-form scrapes, serves http_sd and its own
//!   endpoints.
//! - [`agent`] (feature `agent`): the private side: the reconnect loop, the allowlist of targets
//!   and the scrapes it serves over the tunnel.
//! - [`egress`] (feature `egress`): the push path's one door, an HTTP forward proxy (absolute-form
//!   and CONNECT) with client and destination allowlists, payload validation, an access log and
//!   metrics.
//! - [`exporter`] (feature `geo`): `ferry exporter`, the host connection collector on its own
//!   listener, no gateway needed.
//! - [`auth`] (features `gateway`, `egress`): credentials files (`<id glob> sha256:<hex>`),
//!   hashed at rest and compared in constant time. `auth_header` reads `Authorization` and
//!   `Proxy-Authorization` values for every listener that takes them (the scheme in any case).
//! - [`config`]: serde structs for the YAML file and flags, validated once into runtime types with
//!   every error reported at once.
//! - [`telemetry`]: ferry's own Prometheus metrics and their encoding; the country lookup and the
//!   host TCP connection collector (feature `geo`) and the gate that lets one of its socket dumps
//!   run at a time.
//! - `endpoints`: the endpoints each role serves for itself (`/metrics`, `/-/healthy`,
//!   `/-/ready`, the gateway's service discovery and status page), with one set of rules for
//!   methods, 404s, the exposition format and gzip.
//! - [`scrape_error`]: the one place where a failed scrape becomes a status code and a reason.
//! - `fs_util`: opens and reads every file named in the configuration, refusing a named pipe, a
//!   directory or a device at once instead of waiting on it (used by `config`, `auth`, the TLS
//!   readers, the web config, the geoip database and the gateway's agents file).
//! - [`http_util`]: body types, hop-by-hop header stripping and bounded streaming bodies shared by
//!   both sides.
//! - `cli` (feature `cli`): the `ferry` command line; `main.rs` only calls it. It also raises the
//!   process's soft open-file limit before a role starts (`cli::fd_limit`).

#[cfg(any(feature = "gateway", feature = "egress"))]
pub mod auth;
#[cfg(any(feature = "gateway", feature = "egress"))]
mod auth_header;
pub mod config;
#[cfg(any(
    feature = "agent",
    feature = "gateway",
    feature = "egress",
    feature = "geo"
))]
mod endpoints;
mod fs_util;
pub mod http_util;
pub mod scrape_error;
// Public for the benches, which serve their stand-in targets with ferry's own HTTP server; not
// part of the API.
#[doc(hidden)]
pub mod server;
pub mod telemetry;
pub mod tunnel;
mod warn_limit;

#[cfg(feature = "agent")]
pub mod agent;
#[cfg(feature = "egress")]
pub mod egress;
#[cfg(feature = "geo")]
pub mod exporter;
#[cfg(feature = "gateway")]
pub mod gateway;

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cli")]
pub mod quickstart;
