//! The web listener's routing: absolute-form requests are scrapes; origin-form requests reach
//! ferry's own endpoints.

use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use super::web_config::Verdict;
use super::{proxy, sd, State};
use crate::http_util::{full, text_response, Body};
use crate::telemetry::metrics_response;

pub(super) async fn handle(state: &Arc<State>, req: Request<Body>) -> Response<Body> {
    if req.method() == Method::CONNECT {
        return crate::scrape_error::ScrapeError::Method(Method::CONNECT).into_response("gateway");
    }
    if let Some(refusal) = unauthenticated(state, req.uri(), req.headers()).await {
        return refusal;
    }
    if req.uri().authority().is_some() {
        return proxy::scrape(state, req).await;
    }
    let path = req.uri().path();
    if OWN_ENDPOINTS.contains(&path) && !matches!(*req.method(), Method::GET | Method::HEAD) {
        return method_not_allowed(req.method(), path);
    }
    match path {
        "/targets" | "/clients" => json(sd::document(&state.registry.discoverable())),
        "/metrics" => metrics_response(
            &state.metrics_registry,
            req.headers().get(http::header::ACCEPT),
        ),
        "/-/healthy" => text_response(StatusCode::OK, "Healthy"),
        "/-/ready" => text_response(StatusCode::OK, "Ready"),
        "/api/v1/agents" => json(serde_json::to_string(&agents(state)).unwrap_or_else(|_| "[]".into())),
        "/" => super::status::page(&agents(state)),
        _ => text_response(StatusCode::NOT_FOUND, "not found: scrapes must be absolute-form (set the gateway as proxy_url); endpoints are /, /targets, /clients, /metrics, /api/v1/agents, /-/healthy, /-/ready"),
    }
}

/// The gateway's own endpoints (origin-form requests), all read-only.
const OWN_ENDPOINTS: [&str; 7] = [
    "/",
    "/targets",
    "/clients",
    "/metrics",
    "/api/v1/agents",
    "/-/healthy",
    "/-/ready",
];

/// The answer to a method other than GET or HEAD on one of [`OWN_ENDPOINTS`]: answering it as a
/// GET would let a client believe its POST or DELETE did something.
fn method_not_allowed(method: &Method, path: &str) -> Response<Body> {
    let mut resp = text_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method {method} is not allowed on {path}: the gateway's own endpoints answer GET and HEAD"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    resp
}

/// With `basic_auth_users` configured, every request must authenticate: scrapes (absolute-form)
/// with `Proxy-Authorization` — from Prometheus's `proxy_url` user info — so that
/// `Authorization` stays the target's; ferry's own endpoints with `Authorization`.
async fn unauthenticated(
    state: &State,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Option<Response<Body>> {
    let auth = state.web_auth()?;
    let proxied = uri.authority().is_some();
    let (name, status, challenge_header) = if proxied {
        (
            header::PROXY_AUTHORIZATION,
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            header::PROXY_AUTHENTICATE,
        )
    } else {
        (
            header::AUTHORIZATION,
            StatusCode::UNAUTHORIZED,
            header::WWW_AUTHENTICATE,
        )
    };
    let presented = headers.get(&name).and_then(|v| v.to_str().ok());
    match auth.check(presented).await {
        Verdict::Allowed => return None,
        Verdict::Busy => {
            let mut resp = text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many new passwords being checked at once: try again shortly",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Some(resp);
        }
        Verdict::Denied => {}
    }
    let reason = if proxied {
        // The proxy_url as this listener takes it: https:// once it speaks TLS, its own port.
        let scheme = if state.web_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let port = state.config.web_listen.port();
        format!("authentication required: put the user and password in Prometheus's proxy_url ({scheme}://user:password@gateway:{port})")
    } else {
        "authentication required".to_owned()
    };
    let mut resp = text_response(status, &reason);
    resp.headers_mut().insert(
        challenge_header,
        HeaderValue::from_static("Basic realm=\"ferry gateway\""),
    );
    Some(resp)
}

fn json(body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn agents(state: &Arc<State>) -> Vec<super::AgentInfo> {
    super::Gateway {
        state: state.clone(),
    }
    .agents()
}
