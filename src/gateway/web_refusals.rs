//! What the web listener refuses before a request is routed (wrong credentials, CONNECT, a
//! failed TLS handshake, a connection past the cap): none of it reaches the scrape metrics, so each kind is counted in
//! `ferry_gateway_web_refusals_total{reason}` and warned about at most once a minute, with the
//! remote address and what to fix.

use std::net::SocketAddr;

use tracing::{debug, warn};

use crate::telemetry::GatewayMetrics;
use crate::warn_limit::WarnLimit;

/// A kind of refusal of the web listener; its label is the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WebRefusal {
    /// 407: a scrape without the right `Proxy-Authorization`.
    ProxyAuth,
    /// 401: a request to ferry's own endpoints without the right `Authorization`.
    Auth,
    /// 405: a `CONNECT` (a scrape job with `scheme: https`).
    Connect,
    /// A connection that did not complete its TLS handshake.
    TlsHandshake,
    /// 503: too many new passwords were being checked at once.
    Busy,
    /// A connection closed at accept: `web.max_connections` were open.
    ConnectionLimit,
}

impl WebRefusal {
    /// Every kind, each a series from the start (at 0).
    pub(crate) const ALL: [WebRefusal; 6] = [
        WebRefusal::ProxyAuth,
        WebRefusal::Auth,
        WebRefusal::Connect,
        WebRefusal::TlsHandshake,
        WebRefusal::Busy,
        WebRefusal::ConnectionLimit,
    ];

    /// The metric's `reason` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            WebRefusal::ProxyAuth => "proxy_auth",
            WebRefusal::Auth => "auth",
            WebRefusal::Connect => "connect",
            WebRefusal::TlsHandshake => "tls_handshake",
            WebRefusal::Busy => "busy",
            WebRefusal::ConnectionLimit => "connection_limit",
        }
    }

    /// What the operator of the client (or of the gateway) should do about it.
    fn fix(self) -> &'static str {
        match self {
            WebRefusal::ProxyAuth => "put a user and password of the web config file's basic_auth_users in Prometheus's proxy_url (http://user:password@gateway:port)",
            WebRefusal::Auth => "give the client (http_sd_configs, the scraper of /metrics, curl -u) basic_auth with a user of the web config file's basic_auth_users",
            WebRefusal::Connect => "a scrape job with scheme: https sends CONNECT through proxy_url: set scheme: http in the job (the agent fetches https targets itself)",
            WebRefusal::TlsHandshake => "the web listener speaks TLS (tls_server_config of the web config file): use https:// in proxy_url and the http_sd URL, and trust its certificate (tls_config.ca_file)",
            WebRefusal::Busy => "many clients presented passwords not seen before at once (a client trying passwords?); Prometheus retries at its next scrape",
            WebRefusal::ConnectionLimit => "clients hold gateway.web.max_connections connections open: Prometheus holds one per scrape in flight and keeps idle ones for reuse, so with many targets raise it (and LimitNOFILE); otherwise a client opens connections and keeps them",
        }
    }
}

/// One warning rate limit per kind, so that one kind of noise does not hide another.
#[derive(Default)]
pub(crate) struct WebRefusals {
    limits: [WarnLimit; WebRefusal::ALL.len()],
}

impl WebRefusals {
    /// Creates the series of every kind at 0, so that a rate over them works from the start.
    pub(crate) fn register(metrics: &GatewayMetrics) {
        for refusal in WebRefusal::ALL {
            let _ = metrics.web_refusal(refusal.label());
        }
    }

    /// Counts one refusal from `remote` (unknown when the gateway is mounted in another server)
    /// and warns about it unless one of its kind was warned about less than a minute ago.
    pub(crate) fn record(
        &self,
        metrics: &GatewayMetrics,
        refusal: WebRefusal,
        remote: Option<SocketAddr>,
        detail: &str,
    ) {
        metrics.web_refusal(refusal.label()).inc();
        let remote = remote.map_or_else(|| "unknown".to_owned(), |r| r.to_string());
        let reason = refusal.label();
        let index = WebRefusal::ALL
            .iter()
            .position(|r| *r == refusal)
            .unwrap_or_default();
        match self.limits[index].admit() {
            Some(quiet) => warn!(
                %remote,
                %reason,
                %detail,
                fix = %refusal.fix(),
                refused_not_logged_since_last_warning = quiet,
                "web listener refused a request before routing it (at most one such warning a minute per reason; the rest at debug level)"
            ),
            None => debug!(%remote, %reason, %detail, "web listener refused a request"),
        }
    }
}
