//! `ferry exporter`: the host connection collector on its own `/metrics` listener, for hosts
//! that run no agent (the job of the published geo exporters, done locally and offline).

use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ExporterConfig;
use crate::http_util::text_response;
use crate::telemetry::connections::ConnectionCollector;
use crate::telemetry::metrics_response_blocking;

/// The standalone exporter.
#[derive(Clone)]
pub struct Exporter {
    registry: Arc<Registry>,
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
        Exporter {
            registry: Arc::new(registry),
        }
    }

    /// Serves `/metrics`, `/-/healthy` and `/-/ready` until `shutdown`.
    pub async fn serve(&self, listener: TcpListener, shutdown: CancellationToken) {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(address = %addr, "exporter listening");
        }
        let registry = self.registry.clone();
        crate::server::serve_http(
            listener,
            move |_peer, req| {
                let registry = registry.clone();
                async move {
                    match req.uri().path() {
                        "/metrics" => {
                            let accept = req.headers().get(http::header::ACCEPT).cloned();
                            metrics_response_blocking(registry, |r: &Registry| r, accept).await
                        }
                        "/-/healthy" => text_response(http::StatusCode::OK, "Healthy"),
                        "/-/ready" => text_response(http::StatusCode::OK, "Ready"),
                        _ => text_response(
                            http::StatusCode::NOT_FOUND,
                            "not found: endpoints are /metrics, /-/healthy, /-/ready",
                        ),
                    }
                }
            },
            shutdown,
            std::time::Duration::from_secs(5),
        )
        .await;
    }
}
