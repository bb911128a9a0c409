//! The agent's way to the gateway through an HTTP CONNECT proxy (`--proxy-url`): credentials
//! from the URL, and what the agent logs and how soon it retries when the proxy refuses or does
//! not answer — judged by what the proxy received and what an operator reads in the log.

mod common;

use std::time::Duration;

use common::egress::{TestEgress, TestResolver};
use common::ferry::{
    agent_section, metric_value, start_agent, start_gateway, tokens_file, TestGateway,
};
use common::servers::{Behaviour, TargetServer};
use ferry::config::EgressSection;
use tempfile::TempDir;

const TOKEN: &str = "t";
const WAIT: Duration = Duration::from_secs(10);

/// ferry egress allowing CONNECT to `gw`'s tunnel port, for clients with the credentials
/// `(user, password)` given.
async fn egress_to(gw: &TestGateway, dir: &TempDir, users: &[(&str, &str)]) -> TestEgress {
    let mut section = EgressSection {
        allow_upstreams: vec![format!("127.0.0.1/32:{}", gw.tunnel.port())],
        ..EgressSection::default()
    };
    if !users.is_empty() {
        section.auth.credentials_file = Some(tokens_file(dir.path(), users));
    }
    TestEgress::start(section, TestResolver::new(&[("localhost", &["127.0.0.1"])])).await
}

/// How often ferry egress refused with `reason` (`credentials`, `destination_not_allowed`).
async fn rejections(egress: &TestEgress, reason: &str) -> f64 {
    let m = egress.metrics().await;
    metric_value(&m, "ferry_egress_rejections_total", &[("reason", reason)]).unwrap_or(0.0)
}

/// A user and password with `@` and `:` in them, percent-encoded in the URL as curl and
/// Prometheus expect, reach the proxy decoded: ferry egress lets the agent through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_proxy_credentials_are_sent_decoded() {
    let (dir, creds) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let gw = start_gateway(&dir, &[("*", TOKEN)], |_| {}).await;
    let egress = egress_to(&gw, &creds, &[("us@er", "p:ss")]).await;
    let target = TargetServer::start(Behaviour::Metrics("up 1\n".into())).await;

    let mut section = agent_section(&gw, "encoded", &[("node", target.url("/metrics"))]);
    section.proxy_url = Some(format!("http://us%40er:p%3Ass@{}", egress.addr));
    let agent = start_agent(section, TOKEN);
    gw.wait_agent("encoded", WAIT).await;
    assert_eq!(rejections(&egress, "credentials").await, 0.0);

    agent.stop().await;
    gw.stop().await;
}
