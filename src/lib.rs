//! ferry carries monitoring traffic across network boundaries.
//!
//! Prometheus keeps pulling: it uses the **gateway** as its `proxy_url`, and an **agent** inside the
//! private network dials out to the gateway over one TLS tunnel and performs the scrapes it is sent.
//!
//! # Component map
//!
//! - [`tunnel`] — the wire protocol v1 shared by both sides: TCP dialling (directly or through an
//!   HTTP CONNECT proxy), TLS identities and verification, the HTTP/1.1 Upgrade handshake, HTTP/2
//!   keepalive settings and the JSON target list the agent publishes. Called by `gateway` and `agent`.
//! - `gateway` (feature `gateway`) — the public side: accepts tunnels and authenticates agents
//!   (`auth`), keeps the agent registry (`registry`, the one seam to change for several gateways),
//!   proxies Prometheus's absolute-form scrapes (`proxy`), serves http_sd (`sd`) and its own endpoints
//!   (`web`). Mount it in your own server through `gateway::Gateway::handle`.
//! - `agent` (feature `agent`) — the private side: the reconnect loop, the allowlist of targets and
//!   the scrape executor that serves them over the tunnel. Embed it with `agent::Agent`.
//! - `egress` (feature `egress`) — the push path's one door: an HTTP forward proxy
//!   (absolute-form and CONNECT) with client and destination allowlists (`policy`), payload
//!   validation (`validate`), an access log and metrics. Embed it with `egress::Egress`.
//! - `exporter` (feature `geo`) — `ferry exporter`: the host connection collector on its own
//!   listener, no gateway needed.
//! - `auth` — credentials files (`<id glob> sha256:<hex>`): hashed at rest, compared in
//!   constant time; agents authenticate to the gateway with them, clients to the egress proxy.
//! - [`config`] — serde structs for the YAML file and flags, validated once into runtime types with
//!   every error reported at once.
//! - [`telemetry`] — ferry's own Prometheus metrics (prometheus-client) and their encoding; the
//!   country lookup in a local MaxMind-format database (`geo`) and the host TCP connection
//!   collector (`connections`).
//! - [`scrape_error`] — the one place where a failed scrape becomes a status code and a reason.
//! - [`http_util`] — body types, hop-by-hop header stripping and bounded streaming bodies shared by
//!   both sides.
//! - `cli` (feature `cli`) — the `ferry` command line; `main.rs` only calls it.

#[cfg(any(feature = "gateway", feature = "egress"))]
pub mod auth;
pub mod config;
pub mod http_util;
pub mod scrape_error;
// Public for the benches, which serve their stand-in targets with ferry's own HTTP server; not
// part of the API.
#[doc(hidden)]
pub mod server;
pub mod telemetry;
pub mod tunnel;

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
