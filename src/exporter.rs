//! `ferry exporter`: the host connection collector on its own `/metrics` listener, for hosts
//! that run no agent (the job of the published geo exporters, done locally and offline).

use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ExporterConfig;
use crate::endpoints::OwnEndpoints;
use crate::telemetry::connections::ConnectionCollector;
use crate::telemetry::scrape_gate::ScrapeGate;

/// The standalone exporter.
#[derive(Clone)]
pub struct Exporter {
    endpoints: Arc<Endpoints>,
}

/// What the exporter's listener serves.
struct Endpoints {
    registry: Registry,
    gate: ScrapeGate,
}

impl OwnEndpoints for Endpoints {
    const NAME: &'static str = "the exporter";
    const PATHS: &'static [&'static str] = &["/metrics", "/-/healthy", "/-/ready"];
    const NOT_FOUND: &'static str = "not found";

    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn scrape_gate(&self) -> Option<&ScrapeGate> {
        Some(&self.gate)
    }
}

impl Exporter {
    /// An exporter of the host's TCP connections by state, direction and country.
    pub fn new(config: &ExporterConfig) -> Exporter {
        let mut registry = Registry::default();
        crate::telemetry::register_process_metrics(&mut registry, "exporter");
        config.geo.register_metrics(&mut registry);
        let collector =
            ConnectionCollector::new(config.geo.clone(), config.connections_exclude.clone());
        registry.register_collector(Box::new(collector));
        let gate = ScrapeGate::new();
        gate.register_metrics(&mut registry);
        Exporter {
            endpoints: Arc::new(Endpoints { registry, gate }),
        }
    }

    /// Serves `/metrics`, `/-/healthy` and `/-/ready` until `shutdown`.
    pub async fn serve(&self, listener: TcpListener, shutdown: CancellationToken) {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(address = %addr, "exporter listening");
        }
        let endpoints = self.endpoints.clone();
        crate::server::serve_http(
            listener,
            move |_peer, req| {
                let endpoints = endpoints.clone();
                async move { crate::endpoints::answer(&endpoints, &req).await }
            },
            shutdown,
            std::time::Duration::from_secs(5),
        )
        .await;
    }
}
