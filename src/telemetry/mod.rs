//! ferry's own metrics, named `ferry_<role>_<what>_<unit>`, with bounded label sets (agent ids,
//! target names, status classes, results — never URLs, IPs or ports), and their exposition.

use http::{header, HeaderMap, HeaderValue, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

use crate::http_util::{accepts_gzip, encoded_response, weight_of, weighted_items, Body};
use scrape_gate::ScrapeGate;

#[cfg(feature = "geo")]
pub mod connections;
#[cfg(feature = "geo")]
pub mod geo;
mod metrics;
pub mod scrape_gate;
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

/// Content type of the Prometheus text format (0.0.4), for clients that do not ask for OpenMetrics.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A `/metrics` response for `registry`: OpenMetrics when the request's `Accept` prefers it
/// (Prometheus does), else the Prometheus text format, which `promtool check metrics`, curl users
/// and older scrapers read; gzip-compressed when its `Accept-Encoding` takes gzip.
pub fn metrics_response(registry: &Registry, request: &HeaderMap) -> Response<Body> {
    exposition_response(encode_registry(registry), request)
}

/// [`metrics_response`] of an exposition already encoded (`openmetrics`).
fn exposition_response(openmetrics: String, request: &HeaderMap) -> Response<Body> {
    let (body, content_type) = if wants_openmetrics(request) {
        (openmetrics, OPENMETRICS_CONTENT_TYPE)
    } else {
        (openmetrics_to_text(&openmetrics), TEXT_CONTENT_TYPE)
    };
    let (mut head, ()) = Response::new(()).into_parts();
    head.headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    head.headers
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    encoded_response(head, body.into(), accepts_gzip(request))
}

/// Whether `Accept` prefers OpenMetrics: named with a weight above zero and not below the text
/// format's (`text/plain`, else `text/*`, else `*/*`). A wildcard alone does not pick OpenMetrics:
/// curl's `*/*` gets the text format.
fn wants_openmetrics(request: &HeaderMap) -> bool {
    let ranges = weighted_items(request, header::ACCEPT);
    let Some(openmetrics) = weight_of(&ranges, "application/openmetrics-text") else {
        return false;
    };
    let text = weight_of(&ranges, "text/plain")
        .or_else(|| weight_of(&ranges, "text/*"))
        .or_else(|| weight_of(&ranges, "*/*"))
        .unwrap_or(0.0);
    openmetrics > 0.0 && openmetrics >= text
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition as prometheus-client writes
/// it (`# HELP`, `# TYPE`, `# UNIT`, samples, `# EOF`): a counter family is named with its
/// `_total` suffix, an `info` family becomes a gauge named with `_info`, and `_created` samples,
/// `# UNIT` lines and `# EOF` go.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    let mut created = String::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (text_kind, suffix) = match kind {
                "counter" => ("counter", "_total"),
                "info" => ("gauge", "_info"),
                "gauge" | "histogram" | "summary" => (kind, ""),
                _ => ("untyped", ""),
            };
            if let Some((help_name, text)) = help.take() {
                let help_name = if help_name == name {
                    format!("{name}{suffix}")
                } else {
                    help_name.to_owned()
                };
                out.push_str(&format!("# HELP {help_name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {text_kind}\n"));
            created = format!("{name}_created");
            continue;
        }
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or("");
        if sample == created {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// [`metrics_response`] for `registry` of `owner`, encoded and compressed on the blocking pool, not
/// on a runtime worker: an exposition may be tens of MB, and the host connection collector reads
/// every socket of the host. With a `gate` (a registry with that collector), the encoding goes
/// through it: one at a time, shared by the requests that waited for it, 503 past the limit.
pub async fn metrics_response_blocking<R>(
    owner: std::sync::Arc<R>,
    registry: fn(&R) -> &Registry,
    request: HeaderMap,
    gate: Option<&ScrapeGate>,
) -> Response<Body>
where
    R: Send + Sync + 'static,
{
    let respond = match gate {
        None => tokio::task::spawn_blocking(move || metrics_response(registry(&owner), &request)),
        Some(gate) => match gate.exposition(owner, registry).await {
            Ok(text) => tokio::task::spawn_blocking(move || {
                exposition_response(String::clone(&text), &request)
            }),
            Err(e) => return e.into_response(),
        },
    };
    respond.await.unwrap_or_else(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_named_and_weighed_at_least_as_the_text_format() {
        let ask = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
            wants_openmetrics(&h)
        };
        // Prometheus 2.42's own Accept.
        assert!(ask("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"));
        assert!(ask("text/plain;q=0.5, application/openmetrics-text; q=0.9"));
        assert!(ask("application/openmetrics-text;q=0.5, text/plain;q=0.5"));
        assert!(ask("application/openmetrics-text;q=0.1"));
        assert!(ask("application/openmetrics-text;q=0.5, text/*;q=0.4, */*"));
        assert!(!ask(
            "application/openmetrics-text;q=0.1, text/plain;version=0.0.4;q=0.9"
        ));
        assert!(!ask("application/openmetrics-text;q=0.5, */*"));
        assert!(!ask("application/openmetrics-text;q=0"));
        assert!(!ask("*/*"));
        assert!(!ask("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics(&HeaderMap::new()));
    }

    #[test]
    fn text_format_names_counters_with_their_suffix_and_drops_openmetrics_only_lines() {
        let om = "# HELP requests Requests.\n# TYPE requests counter\nrequests_total{a=\"b\"} 3\nrequests_created{a=\"b\"} 1.7e9\n# HELP build Build.\n# TYPE build info\nbuild_info{v=\"1\"} 1\n# HELP size Size.\n# TYPE size gauge\n# UNIT size bytes\nsize 5\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP requests_total Requests.\n# TYPE requests_total counter\nrequests_total{a=\"b\"} 3\n# HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{v=\"1\"} 1\n# HELP size Size.\n# TYPE size gauge\nsize 5\n"
        );
    }
}
