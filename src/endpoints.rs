//! The endpoints every role serves for itself — `/metrics`, `/-/healthy`, `/-/ready`, and the
//! gateway's service discovery and status page — answered by one piece of code, so that the
//! gateway's web listener, the agent's `--web.listen-address`, the egress proxy and the exporter
//! follow the same rules: GET and HEAD only (405 with `Allow` otherwise), a 404 naming the
//! endpoints, the exposition format picked by `Accept`, gzip when `Accept-Encoding` takes it,
//! and the same security headers ([`harden`]). Never applied to what ferry proxies: a target's
//! answer keeps the target's headers.

use std::future::Future;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use prometheus_client::registry::Registry;

use crate::http_util::{accepts_gzip, encoded_response, text_response, Body};
use crate::telemetry::metrics_response_blocking;
use crate::telemetry::scrape_gate::ScrapeGate;

/// A role's own endpoints, as [`answer`] serves them.
pub(crate) trait OwnEndpoints: Send + Sync + 'static {
    /// Who answers, in messages: `the gateway`.
    const NAME: &'static str;
    /// Every path served, `/metrics`, `/-/healthy` and `/-/ready` included, in the order a 404
    /// lists them.
    const PATHS: &'static [&'static str];
    /// What a 404 says before it lists [`Self::PATHS`].
    const NOT_FOUND: &'static str;

    /// The metrics `/metrics` exposes.
    fn registry(&self) -> &Registry;

    /// The gate `/metrics` encodings pass, for a registry that is expensive to encode (with the
    /// host connection collector); `None`: each request encodes on its own.
    fn scrape_gate(&self) -> Option<&ScrapeGate> {
        None
    }

    /// Whether `/-/ready` answers 200, or 503 with the reason.
    fn ready(&self) -> Result<(), &'static str> {
        Ok(())
    }

    /// The answer at one of [`Self::PATHS`] that is written as the client takes it (and
    /// compressed as it goes when `gzip`), or `None` for one held in full ([`Self::other`]).
    fn streamed(self: &Arc<Self>, _path: &str, _gzip: bool) -> Option<Response<Body>> {
        None
    }

    /// The answer at one of [`Self::PATHS`] other than the three every role has, its body held
    /// in full. Compressed like `/metrics` when it is a 200.
    fn other(self: &Arc<Self>, _path: &str) -> Response<Body> {
        not_found::<Self>()
    }
}

/// The answer to an origin-form request for one of `owner`'s own endpoints. What it needs of
/// `req` is taken before the future starts: a request body need not be `Sync`.
pub(crate) fn answer<E: OwnEndpoints, B>(
    owner: &Arc<E>,
    req: &Request<B>,
) -> impl Future<Output = Response<Body>> + Send + 'static {
    let owner = owner.clone();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    async move {
        let mut resp = respond(&owner, &method, &path, &headers).await;
        harden(resp.headers_mut());
        resp
    }
}

/// What a browser's status page may do: show itself with its inline `<style>`, nothing else —
/// no scripts, images, fonts or frames of any origin, no `<base>` or forms, never framed.
const STATUS_PAGE_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; \
    frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Marks `headers`, those of an answer of ferry's own (an endpoint, or a refusal to reach one),
/// so that a browser never reads it as another type than it says; an HTML page (the gateway's
/// status page) also runs nothing but its own style, is never framed (clickjacking) and sends no
/// `Referer` with the links followed from it.
pub(crate) fn harden(headers: &mut HeaderMap) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let html = headers
        .get(header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .is_some_and(|t| t.trim_start().to_ascii_lowercase().starts_with("text/html"));
    if html {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(STATUS_PAGE_CSP),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
}

async fn respond<E: OwnEndpoints>(
    owner: &Arc<E>,
    method: &Method,
    path: &str,
    request: &HeaderMap,
) -> Response<Body> {
    if !E::PATHS.contains(&path) {
        return not_found::<E>();
    }
    if !matches!(*method, Method::GET | Method::HEAD) {
        return method_not_allowed::<E>(method, path);
    }
    match path {
        "/metrics" => {
            let gate = owner.scrape_gate();
            metrics_response_blocking(owner.clone(), E::registry, request.clone(), gate).await
        }
        "/-/healthy" => text_response(StatusCode::OK, "Healthy"),
        "/-/ready" => match owner.ready() {
            Ok(()) => text_response(StatusCode::OK, "Ready"),
            Err(why) => text_response(StatusCode::SERVICE_UNAVAILABLE, why),
        },
        _ => {
            if let Some(resp) = owner.streamed(path, accepts_gzip(request)) {
                return resp;
            }
            let resp = owner.other(path);
            if resp.status() == StatusCode::OK {
                compress(resp, accepts_gzip(request)).await
            } else {
                resp
            }
        }
    }
}

/// `resp`, whose body is held in full, gzip-compressed on the blocking pool when `gzip`.
async fn compress(resp: Response<Body>, gzip: bool) -> Response<Body> {
    let (head, body) = resp.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::error!(error = %e, "reading an endpoint's own answer failed");
            return text_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
        }
    };
    tokio::task::spawn_blocking(move || encoded_response(head, body, gzip))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "compressing an answer failed");
            text_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        })
}

/// The 404 of `E`'s listener: the request reached none of its endpoints.
pub(crate) fn not_found<E: OwnEndpoints + ?Sized>() -> Response<Body> {
    let reason = format!(
        "{}; {}'s own endpoints are {}",
        E::NOT_FOUND,
        E::NAME,
        E::PATHS.join(", ")
    );
    text_response(StatusCode::NOT_FOUND, &reason)
}

/// A method other than GET or HEAD: answering it as a GET would let a client believe its POST or
/// DELETE did something.
fn method_not_allowed<E: OwnEndpoints>(method: &Method, path: &str) -> Response<Body> {
    let mut resp = text_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!(
            "method {method} is not allowed on {path}: {}'s own endpoints answer GET and HEAD",
            E::NAME
        ),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    resp
}
