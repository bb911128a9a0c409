//! The metric families of each role.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::SystemTime;

/// Registers `ferry_build_info{role, version}` (always 1), so that dashboards and alerts can see
/// which version each gateway, agent and proxy runs, e.g. during a rolling upgrade.
pub fn register_build_info(registry: &mut Registry, role: &str) {
    registry.register(
        "ferry_build",
        "ferry's version, per role",
        prometheus_client::metrics::info::Info::new(vec![
            ("role".to_owned(), role.to_owned()),
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ]),
    );
}

/// Registers what every role shows for the whole process: `ferry_build_info`, the outcome of
/// the last configuration reload ([`ConfigReload`]) and `ferry_<role>_accept_errors_total`.
pub fn register_process_metrics(registry: &mut Registry, role: &str) {
    register_build_info(registry, role);
    ConfigReload::get().register(registry);
    registry.register(
        format!("ferry_{role}_accept_errors"),
        "Failed accepts of the process's listeners (out of file descriptors, typically)",
        accept_errors().clone(),
    );
}

/// The process's count of failed accepts, all listeners together: what fails them (EMFILE,
/// ENFILE, out of memory) is the process's or the host's state, not one listener's.
pub(crate) fn accept_errors() -> &'static Counter {
    static ACCEPT_ERRORS: OnceLock<Counter> = OnceLock::new();
    ACCEPT_ERRORS.get_or_init(Counter::default)
}

/// The outcome of the last configuration reload (SIGHUP; the start counts as the first), for the
/// whole process, as Prometheus exports its own: an alert on
/// `ferry_config_last_reload_successful == 0` finds a reload that kept a previous state.
#[derive(Debug)]
pub struct ConfigReload {
    outcome: ReloadOutcome,
}

static CONFIG_RELOAD: OnceLock<ConfigReload> = OnceLock::new();

impl ConfigReload {
    /// The process's one record, successful as of its first use until told otherwise.
    pub fn get() -> &'static ConfigReload {
        CONFIG_RELOAD.get_or_init(|| ConfigReload {
            outcome: ReloadOutcome::successful_now(),
        })
    }

    /// Records a reload: whether everything it read was applied; the time, if so.
    pub fn record(&self, successful: bool) {
        self.outcome.record(successful);
    }

    fn register(&self, registry: &mut Registry) {
        self.outcome.register(
            registry,
            "ferry_config",
            "Whether the last configuration reload (SIGHUP) applied everything it read",
            "Time of the last successful configuration reload (or of the start), in seconds since the Unix epoch",
        );
    }
}

/// Whether the last reload of something succeeded, and when the last successful one was: the
/// pair of gauges `<prefix>_last_reload_successful` and
/// `<prefix>_last_reload_success_timestamp_seconds`. Clones share the gauges.
#[derive(Debug, Clone, Default)]
pub struct ReloadOutcome {
    successful: Gauge,
    success_timestamp: Gauge<f64, AtomicU64>,
}

impl ReloadOutcome {
    /// An outcome that starts as a success at this moment (a load at start).
    pub fn successful_now() -> ReloadOutcome {
        let outcome = ReloadOutcome::default();
        outcome.record(true);
        outcome
    }

    /// Records a reload: whether it succeeded; the time, if so.
    pub fn record(&self, successful: bool) {
        self.successful.set(i64::from(successful));
        if successful {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.success_timestamp.set(now);
        }
    }

    /// Registers the two gauges as `<prefix>_last_reload_…`, with their help texts.
    pub fn register(
        &self,
        registry: &mut Registry,
        prefix: &str,
        successful_help: &str,
        timestamp_help: &str,
    ) {
        registry.register(
            format!("{prefix}_last_reload_successful"),
            successful_help,
            self.successful.clone(),
        );
        registry.register(
            format!("{prefix}_last_reload_success_timestamp_seconds"),
            timestamp_help,
            self.success_timestamp.clone(),
        );
    }
}

/// Buckets from 1 ms to ~65 s, for scrape durations.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Labels: result of an operation (`ok`, `unauthorized`, …).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// The result.
    pub result: String,
}

/// Labels: one listener.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `tunnel` or `web`.
    pub listener: String,
}

/// Labels: one agent.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    /// The agent id.
    pub agent: String,
}

/// Labels of a scrape on the gateway.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrapeLabels {
    /// The agent id (or `unknown` if not connected).
    pub agent: String,
    /// The target name (or `unknown`).
    pub target: String,
    /// `2xx` … `5xx`; `aborted`: the body broke after the head was sent; `cancelled`: the
    /// client went away before the answer was whole.
    pub status_class: String,
}

/// Labels of a scrape on the agent.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetResultLabels {
    /// The target name.
    pub target: String,
    /// `ok`, `http_error`, `timeout`, `error`, `not_found`, `bad_request`.
    pub result: String,
}

/// The gateway's metrics.
///
/// The per-agent series (`scrapes`, `scrape_duration`, `bytes_proxied`) are written with
/// [`GatewayMetrics::record_scrape`] and dropped with [`GatewayMetrics::remove_agent`], so
/// that the agent ids among their labels are the connected ones, not every id ever seen.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    /// Agents with a tunnel up.
    pub agents_connected: Gauge,
    /// Tunnel handshakes by result.
    pub handshakes: Family<ResultLabels, Counter>,
    /// Tunnels closed because the same id connected again.
    pub tunnels_replaced: Counter,
    /// Scrapes by agent, target and status class.
    pub scrapes: Family<ScrapeLabels, Counter>,
    /// Scrape duration, request to last body byte.
    pub scrape_duration: Family<AgentLabels, Histogram, fn() -> Histogram>,
    /// Scrape body bytes proxied to Prometheus.
    pub bytes_proxied: Family<AgentLabels, Counter>,
    /// `notAfter` of each TLS listener's certificate, for expiry alerts.
    pub tls_not_after: Family<ListenerLabels, Gauge>,
    /// Requests and connections the web listener refused before routing them, by reason.
    pub web_refusals: Family<ReasonLabels, Counter>,
    /// Failed saves of the agents file (`<data_dir>/agents.json`).
    pub agents_file_save_failures: Counter,
    /// The label sets `scrapes` has per agent id: a `Family` cannot list its own, and each must
    /// be named to be removed.
    scraped: Arc<Mutex<HashMap<String, HashSet<ScrapeLabels>>>>,
}

impl GatewayMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        register_process_metrics(registry, "gateway");
        let m = Self {
            agents_connected: Gauge::default(),
            handshakes: Family::default(),
            tunnels_replaced: Counter::default(),
            scrapes: Family::default(),
            scrape_duration: Family::new_with_constructor(duration_histogram),
            bytes_proxied: Family::default(),
            tls_not_after: Family::default(),
            web_refusals: Family::default(),
            agents_file_save_failures: Counter::default(),
            scraped: Arc::default(),
        };
        registry.register(
            "ferry_gateway_agents_connected",
            "Agents with a tunnel up",
            m.agents_connected.clone(),
        );
        registry.register(
            "ferry_gateway_tunnel_handshakes",
            "Tunnel handshakes by result",
            m.handshakes.clone(),
        );
        registry.register(
            "ferry_gateway_tunnels_replaced",
            "Tunnels closed because the same agent id connected again",
            m.tunnels_replaced.clone(),
        );
        registry.register(
            "ferry_gateway_scrapes",
            "Scrapes proxied, by agent, target and status class",
            m.scrapes.clone(),
        );
        registry.register(
            "ferry_gateway_scrape_duration_seconds",
            "Scrape duration through the tunnel, to the last body byte",
            m.scrape_duration.clone(),
        );
        registry.register(
            "ferry_gateway_proxied_bytes",
            "Scrape body bytes passed to Prometheus",
            m.bytes_proxied.clone(),
        );
        registry.register(
            "ferry_gateway_tls_certificate_not_after_seconds",
            "When the certificate of a TLS listener (tunnel, web) expires, in seconds since the Unix epoch",
            m.tls_not_after.clone(),
        );
        registry.register(
            "ferry_gateway_web_refusals",
            "Requests and TLS connections the web listener refused before routing them, by reason",
            m.web_refusals.clone(),
        );
        registry.register(
            "ferry_gateway_agents_file_save_failures",
            "Failed saves of the agents listed in service discovery (data_dir/agents.json)",
            m.agents_file_save_failures.clone(),
        );
        m
    }

    /// The counter of the web listener's refusals for `reason`.
    pub fn web_refusal(&self, reason: &str) -> Counter {
        self.web_refusals
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .clone()
    }

    /// Counts one finished scrape under `labels`: its count, duration and body bytes.
    pub fn record_scrape(&self, labels: &ScrapeLabels, elapsed: Duration, bytes: u64) {
        // Held while the series are written, so that a removal of the agent comes wholly before
        // or after.
        let mut scraped = self.scraped.lock().unwrap_or_else(|p| p.into_inner());
        let sets = scraped.entry(labels.agent.clone()).or_default();
        if !sets.contains(labels) {
            sets.insert(labels.clone());
        }
        let agent = AgentLabels {
            agent: labels.agent.clone(),
        };
        self.scrapes.get_or_create(labels).inc();
        self.scrape_duration
            .get_or_create(&agent)
            .observe(elapsed.as_secs_f64());
        self.bytes_proxied.get_or_create(&agent).inc_by(bytes);
    }

    /// Removes the scrape series of agent `id` whose target `keep` refuses.
    pub fn remove_unlisted_targets(&self, id: &str, keep: impl Fn(&str) -> bool) {
        let mut scraped = self.scraped.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sets) = scraped.get_mut(id) else {
            return;
        };
        sets.retain(|labels| {
            let kept = keep(&labels.target);
            if !kept {
                self.scrapes.remove(labels);
            }
            kept
        });
    }

    /// Removes every series labelled with agent `id`.
    pub fn remove_agent(&self, id: &str) {
        let mut scraped = self.scraped.lock().unwrap_or_else(|p| p.into_inner());
        for labels in scraped.remove(id).iter().flatten() {
            self.scrapes.remove(labels);
        }
        let agent = AgentLabels {
            agent: id.to_owned(),
        };
        self.scrape_duration.remove(&agent);
        self.bytes_proxied.remove(&agent);
    }
}

/// The agent's metrics.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// 1 while the tunnel is up.
    pub tunnel_up: Gauge,
    /// Tunnel connection attempts by result.
    pub connects: Family<ResultLabels, Counter>,
    /// Scrapes by target and result.
    pub scrapes: Family<TargetResultLabels, Counter>,
    /// Target fetch duration, to the response headers.
    pub scrape_duration: Family<TargetNameLabels, Histogram, fn() -> Histogram>,
    /// Number of configured targets (with the built-in one).
    pub targets: Gauge,
}

/// Labels: one target.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetNameLabels {
    /// The target name.
    pub target: String,
}

impl AgentMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        register_process_metrics(registry, "agent");
        let m = Self {
            tunnel_up: Gauge::default(),
            connects: Family::default(),
            scrapes: Family::default(),
            scrape_duration: Family::new_with_constructor(duration_histogram),
            targets: Gauge::default(),
        };
        registry.register(
            "ferry_agent_tunnel_up",
            "1 while the tunnel to the gateway is up",
            m.tunnel_up.clone(),
        );
        registry.register(
            "ferry_agent_tunnel_connects",
            "Tunnel connection attempts by result",
            m.connects.clone(),
        );
        registry.register(
            "ferry_agent_scrapes",
            "Scrapes served, by target and result",
            m.scrapes.clone(),
        );
        registry.register(
            "ferry_agent_scrape_duration_seconds",
            "Time to the target's response headers",
            m.scrape_duration.clone(),
        );
        registry.register(
            "ferry_agent_targets",
            "Targets served, the built-in one included",
            m.targets.clone(),
        );
        m
    }
}

/// Labels of an egress request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressRequestLabels {
    /// The rule that matched, or `-`.
    pub rule: String,
    /// The method (well-known ones; others are `other`).
    pub method: String,
    /// `2xx` … `5xx`.
    pub status_class: String,
    /// `allowed` or `refused`.
    pub decision: String,
}

/// Labels: why a request was refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Bounded refusal kind.
    pub reason: String,
}

/// Labels: byte direction, `in` (client → upstream) or `out`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `in` or `out`.
    pub direction: String,
}

/// The egress proxy's metrics.
#[derive(Debug, Clone)]
pub struct EgressMetrics {
    /// Requests and tunnels by rule, method, status class and decision.
    pub requests: Family<EgressRequestLabels, Counter>,
    /// Refusals by reason.
    pub rejections: Family<ReasonLabels, Counter>,
    /// Request duration, to the last response byte (tunnels: their whole life).
    pub duration: Histogram,
    /// Body bytes by direction.
    pub bytes: Family<DirectionLabels, Counter>,
    /// CONNECT tunnels open now.
    pub open_tunnels: Gauge,
    /// Client connections open now.
    pub client_connections: Gauge,
    /// Bytes of request bodies held now (read, not yet forwarded or dropped).
    pub buffered_body_bytes: Gauge,
}

impl EgressMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        register_process_metrics(registry, "egress");
        let m = Self {
            requests: Family::default(),
            rejections: Family::default(),
            duration: duration_histogram(),
            bytes: Family::default(),
            open_tunnels: Gauge::default(),
            client_connections: Gauge::default(),
            buffered_body_bytes: Gauge::default(),
        };
        registry.register(
            "ferry_egress_requests",
            "Requests and CONNECT tunnels, by rule, method, status class and decision",
            m.requests.clone(),
        );
        registry.register(
            "ferry_egress_rejections",
            "Refused requests by reason",
            m.rejections.clone(),
        );
        registry.register(
            "ferry_egress_request_duration_seconds",
            "Request duration to the last response byte; for a CONNECT tunnel, the time to open it",
            m.duration.clone(),
        );
        registry.register(
            "ferry_egress_bytes",
            "Body bytes by direction (in: client to upstream)",
            m.bytes.clone(),
        );
        registry.register(
            "ferry_egress_open_tunnels",
            "CONNECT tunnels open now",
            m.open_tunnels.clone(),
        );
        registry.register(
            "ferry_egress_client_connections",
            "Client connections open now",
            m.client_connections.clone(),
        );
        registry.register(
            "ferry_egress_buffered_body_bytes",
            "Bytes of request bodies held now, read and not yet forwarded",
            m.buffered_body_bytes.clone(),
        );
        m
    }
}

/// Labels of ferry's own connections: which listener, and the peer's country.
#[cfg(feature = "geo")]
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `tunnel`, `web`, `clients` or `upstreams`.
    pub listener: String,
    /// ISO code, a kind (`loopback`, `private`, …) or `unknown`.
    pub country: crate::telemetry::geo::Country,
}

/// ferry's own connections by listener and peer country.
#[cfg(feature = "geo")]
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    open: Family<ConnectionLabels, Gauge>,
    total: Family<ConnectionLabels, Counter>,
}

#[cfg(feature = "geo")]
impl ConnectionMetrics {
    /// Registers `ferry_<role>_connections_open` and `ferry_<role>_connections_total`.
    pub fn register(registry: &mut Registry, role: &str) -> Self {
        let m = Self::default();
        // Only the egress proxy opens connections of its own (to upstreams).
        let total_help = if role == "egress" {
            "Connections accepted (or opened, for upstreams), by listener and peer country"
        } else {
            "Connections accepted, by listener and peer country"
        };
        registry.register(
            format!("ferry_{role}_connections_open"),
            "Connections open now, by listener and peer country",
            m.open.clone(),
        );
        registry.register(
            format!("ferry_{role}_connections"),
            total_help,
            m.total.clone(),
        );
        m
    }

    /// Counts a new connection of `listener` with a peer in `country`; it stays open until the guard drops.
    pub fn track(
        &self,
        listener: &str,
        country: crate::telemetry::geo::Country,
    ) -> ConnectionGuard {
        let labels = ConnectionLabels {
            listener: listener.to_owned(),
            country,
        };
        self.total.get_or_create(&labels).inc();
        let open = self.open.get_or_create(&labels).clone();
        open.inc();
        ConnectionGuard { open }
    }
}

/// Keeps a connection counted as open; dropping it closes it in the metrics.
#[cfg(feature = "geo")]
#[derive(Debug)]
pub struct ConnectionGuard {
    open: Gauge,
}

#[cfg(feature = "geo")]
impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open.dec();
    }
}

#[cfg(all(test, feature = "geo"))]
mod tests {
    use super::*;

    /// The gateway has no upstreams: its help text does not talk of them.
    #[test]
    fn only_the_egress_connection_counter_mentions_upstreams() {
        for (role, upstreams) in [("gateway", false), ("egress", true)] {
            let mut registry = Registry::default();
            let metrics = ConnectionMetrics::register(&mut registry, role);
            // A family without samples is not exported.
            let _open = metrics.track("web", crate::telemetry::geo::Country::UNKNOWN);
            let text = crate::telemetry::encode_registry(&registry);
            let help = text
                .lines()
                .find(|l| l.starts_with(&format!("# HELP ferry_{role}_connections ")))
                .unwrap_or_else(|| panic!("no help in:\n{text}"));
            assert_eq!(help.contains("upstreams"), upstreams, "{help}");
        }
    }
}
