//! The web listener's routing: absolute-form requests are scrapes; origin-form requests reach
//! ferry's own endpoints.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use prometheus_client::registry::Registry;

use super::web_config::Verdict;
use super::web_refusals::WebRefusal;
use super::{proxy, sd, State};
use crate::endpoints::OwnEndpoints;
use crate::http_util::{full, text_response, Body};
use crate::scrape_error::{ScrapeError, ERROR_SOURCE_HEADER};

/// Answers one request from `peer` (unknown when the gateway is mounted in another server).
pub(super) async fn handle(
    state: &Arc<State>,
    peer: Option<SocketAddr>,
    req: Request<Body>,
) -> Response<Body> {
    if req.method() == Method::CONNECT {
        let target = req.uri().to_string();
        refused(
            state,
            WebRefusal::Connect,
            peer,
            &format!("CONNECT {target}"),
        );
        return ScrapeError::Method(Method::CONNECT).into_response("gateway");
    }
    let proxied = is_proxy_request(&req);
    if let Some((refusal, detail, resp)) =
        unauthenticated(state, proxied, peer, req.headers()).await
    {
        refused(state, refusal, peer, detail);
        let mut resp = resp;
        if !proxied {
            // A refusal at the gateway's own endpoints is one of its own answers.
            crate::endpoints::harden(resp.headers_mut());
        }
        return resp;
    }
    if proxied {
        return proxy::scrape(state, req).await;
    }
    crate::endpoints::answer(state, &req).await
}

/// Whether `req` is for the gateway's proxy side: an HTTP/1 request in absolute form
/// (`GET http://node-1:9100/metrics`) or a CONNECT. Prometheus talks HTTP/1.1 to a proxy; in
/// HTTP/2 every request carries an authority (`:authority`, which hyper puts in the URI), so
/// there only the path tells, and the request is one for ferry's own endpoints.
pub fn is_proxy_request<B>(req: &Request<B>) -> bool {
    req.version() <= Version::HTTP_11 && req.uri().authority().is_some()
}

impl OwnEndpoints for State {
    const NAME: &'static str = "the gateway";
    const PATHS: &'static [&'static str] = &[
        "/",
        "/targets",
        "/clients",
        "/metrics",
        "/api/v1/agents",
        "/-/healthy",
        "/-/ready",
    ];
    const NOT_FOUND: &'static str =
        "not found: scrapes must be absolute-form (set the gateway as proxy_url)";

    fn registry(&self) -> &Registry {
        &self.metrics_registry
    }

    /// Service discovery is written a target group at a time, in chunks: the whole grows with
    /// the agents (each bounded by [`crate::tunnel::MAX_SD_BYTES_PER_AGENT`]), and must neither
    /// be held in memory per request nor keep a worker from other requests.
    fn streamed(self: &Arc<Self>, path: &str, gzip: bool) -> Option<Response<Body>> {
        if !matches!(path, "/targets" | "/clients") {
            return None;
        }
        let mut resp = Response::new(sd::body(self.registry.discoverable(), gzip));
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        if gzip {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        Some(resp)
    }

    fn other(self: &Arc<Self>, path: &str) -> Response<Body> {
        match path {
            "/api/v1/agents" => {
                json(serde_json::to_string(&agents(self)).unwrap_or_else(|_| "[]".into()))
            }
            "/" => super::status::page(&agents(self)),
            _ => crate::endpoints::not_found::<Self>(),
        }
    }
}

fn refused(state: &State, refusal: WebRefusal, peer: Option<SocketAddr>, detail: &str) {
    state
        .web_refusals
        .record(&state.metrics, refusal, peer, detail);
}

/// With `basic_auth_users` configured, every request must authenticate: scrapes (absolute-form)
/// with `Proxy-Authorization` — from Prometheus's `proxy_url` user info — so that
/// `Authorization` stays the target's; ferry's own endpoints with `Authorization`. A refusal
/// comes with its kind and, for the log, what was presented.
async fn unauthenticated(
    state: &State,
    proxied: bool,
    peer: Option<SocketAddr>,
    headers: &http::HeaderMap,
) -> Option<(WebRefusal, &'static str, Response<Body>)> {
    let auth = state.web_auth()?;
    let mounted = peer.is_none();
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
    match auth.check(presented, peer.map(|p| p.ip())).await {
        Verdict::Allowed => return None,
        Verdict::Busy => {
            let mut resp = refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many new passwords being checked at once: try again shortly",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Some((WebRefusal::Busy, "a password not checked yet", resp));
        }
        Verdict::Denied => {}
    }
    let kind = if proxied {
        WebRefusal::ProxyAuth
    } else {
        WebRefusal::Auth
    };
    let detail = if presented.is_some() {
        "wrong user or password"
    } else {
        "no credentials"
    };
    let reason = if proxied && mounted {
        // Another server's listener: its scheme and port are the application's.
        "authentication required: put the user and password in Prometheus's proxy_url (http[s]://user:password@host:port)".to_owned()
    } else if proxied {
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
    let mut resp = refusal(status, &reason);
    resp.headers_mut().insert(
        challenge_header,
        HeaderValue::from_static("Basic realm=\"ferry gateway\""),
    );
    Some((kind, detail, resp))
}

/// A refusal of the gateway's, marked as such like a failed scrape's.
fn refusal(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = text_response(status, reason);
    resp.headers_mut()
        .insert(ERROR_SOURCE_HEADER, HeaderValue::from_static("gateway"));
    resp
}

fn json(body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The connected agents, then the disconnected ones still in service discovery.
fn agents(state: &Arc<State>) -> Vec<super::AgentInfo> {
    let gateway = super::Gateway {
        state: state.clone(),
    };
    let mut agents = gateway.agents();
    agents.extend(gateway.disconnected_agents());
    agents
}
