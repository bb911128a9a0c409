//! ferry's own metrics, named `ferry_<role>_<what>_<unit>`, with bounded label sets (agent ids,
//! target names, status classes, results — never URLs, IPs or ports), and their exposition.

use http::{header, HeaderValue, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

use crate::http_util::{full, Body};

#[cfg(feature = "geo")]
pub mod connections;
#[cfg(feature = "geo")]
pub mod geo;
mod metrics;
pub use metrics::*;

/// Content type of the OpenMetrics text exposition prometheus-client writes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Encodes every metric of `registry` in the OpenMetrics text format.
pub fn encode_registry(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a metric type.
    if let Err(e) = encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

/// A `/metrics` response for `registry`.
pub fn metrics_response(registry: &Registry) -> Response<Body> {
    let mut resp = Response::new(full(encode_registry(registry)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
    );
    resp
}

/// A `/metrics` response for a registry whose collectors may block (the host connection
/// collector reads every socket of the host): encoded on the blocking pool, not on a runtime worker.
pub async fn metrics_response_blocking<R>(
    owner: std::sync::Arc<R>,
    registry: fn(&R) -> &Registry,
) -> Response<Body>
where
    R: Send + Sync + 'static,
{
    tokio::task::spawn_blocking(move || metrics_response(registry(&owner)))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "encoding metrics failed");
            crate::http_util::text_response(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed",
            )
        })
}

/// The status class label of an HTTP status: `2xx` … `5xx`.
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
