//! The library as an application embeds it: the gateway mounted in the application's own HTTP
//! server (HTTP/1.1 for Prometheus, HTTP/2 for other clients), and what an embedded agent tells
//! the application about its tunnel.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::ferry::{agent_section, start_agent, start_gateway, TestGateway};
use common::http::{self as client, get_via_proxy};
use common::servers::{Behaviour, TargetServer};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "sdk-token";
const WAIT: Duration = Duration::from_secs(10);

/// Serves the application's `/hello` and hands everything else to the gateway, as the crate
/// documentation shows, on `listener`, in HTTP/2 (prior knowledge) when `h2`.
fn mount(gw: &TestGateway, listener: TcpListener, h2: bool) {
    let gateway = gw.gateway.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let gateway = gateway.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let gateway = gateway.clone();
                async move {
                    if !ferry::gateway::is_proxy_request(&req) && req.uri().path() == "/hello" {
                        return Ok::<_, Infallible>(Response::new(ferry::http_util::full(
                            "hello from the application\n",
                        )));
                    }
                    Ok(gateway.handle(req).await)
                }
            });
            let io = TokioIo::new(stream);
            tokio::spawn(async move {
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
            });
        }
    });
}

/// `GET path` over HTTP/2 (prior knowledge) to `addr`: status and body.
async fn get_h2(addr: SocketAddr, path: &str) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://{addr}{path}"))
        .version(Version::HTTP_2)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("an answer in time")
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Every HTTP/2 request carries an authority (`:authority`), which hyper puts in the URI: the
/// gateway must not take those for scrapes, or a mounting server that speaks HTTP/2 had its own
/// routes and the gateway's endpoints answered "agent not connected".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_gateway_routes_http2_requests_by_path_and_http1_scrapes_by_authority() {
    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Metrics("up 1\n".into())).await;
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let agent = start_agent(
        agent_section(&gw, "node-1", &[("node", target.url("/metrics"))]),
        TOKEN,
    );
    gw.wait_agent("node-1", WAIT).await;

    let (h1, h2) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let (h1_addr, h2_addr) = (h1.local_addr().unwrap(), h2.local_addr().unwrap());
    mount(&gw, h1, false);
    mount(&gw, h2, true);

    // HTTP/2: the application's route, then the gateway's own endpoints.
    assert_eq!(
        get_h2(h2_addr, "/hello").await,
        (200, "hello from the application\n".to_owned())
    );
    let (status, sd) = get_h2(h2_addr, "/targets").await;
    assert_eq!(status, 200, "{sd}");
    assert!(sd.contains("\"ferry_agent\":\"node-1\""), "{sd}");
    let (status, health) = get_h2(h2_addr, "/-/healthy").await;
    assert_eq!(status, 200, "{health}");

    // HTTP/1.1: what Prometheus sends, a scrape in absolute form, even of a path the
    // application serves itself, and the application's own route in origin form.
    let port = target.addr.port();
    let scraped = get_via_proxy(h1_addr, &format!("http://node-1:{port}/metrics"), &[]).await;
    assert_eq!((scraped.status, scraped.text().as_str()), (200, "up 1\n"));
    let hello = get_via_proxy(h1_addr, &format!("http://node-1:{port}/hello"), &[]).await;
    assert_eq!(
        hello.status,
        404,
        "the target lists /metrics only: {}",
        hello.text()
    );
    let own = client::get(&format!("http://{h1_addr}/hello")).await;
    assert_eq!(own.text(), "hello from the application\n");

    agent.stop().await;
    gw.stop().await;
}

/// An application embedding the agent reads why its tunnel is down from the agent itself, and a
/// run cancelled by dropping its future (an aborted task) leaves the agent marked down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_agent_says_why_it_is_down_and_is_down_once_its_run_is_dropped() {
    let dir = TempDir::new().unwrap();
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;

    let refused = start_agent(agent_section(&gw, "wrong", &[]), "not-the-token");
    let error = wait_last_error(&refused.agent).await;
    assert!(
        error.contains("401") && error.contains("invalid token"),
        "{error}"
    );
    assert!(!refused.agent.is_connected());
    refused.stop().await;

    let agent = start_agent(agent_section(&gw, "aborted", &[]), TOKEN);
    gw.wait_agent("aborted", WAIT).await;
    assert!(agent.agent.is_connected());
    assert_eq!(agent.agent.last_error(), None);
    agent.task.abort();
    let _ = agent.task.await;
    assert!(
        !agent.agent.is_connected(),
        "the tunnel went with the aborted run"
    );
    let web = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web_addr = web.local_addr().unwrap();
    tokio::spawn({
        let (agent, stop) = (agent.agent.clone(), agent.shutdown.clone());
        async move { agent.serve_web(web, stop).await }
    });
    let ready = client::get(&format!("http://{web_addr}/-/ready")).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    let metrics = client::get(&format!("http://{web_addr}/metrics")).await;
    assert!(
        metrics.text().contains("ferry_agent_tunnel_up 0"),
        "{}",
        metrics.text()
    );
    agent.shutdown.cancel();
    gw.stop().await;
}

async fn wait_last_error(agent: &ferry::agent::Agent) -> String {
    let start = std::time::Instant::now();
    loop {
        if let Some(error) = agent.last_error() {
            return error;
        }
        assert!(start.elapsed() < WAIT, "no last_error within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
