//! The pull path over a real slow link: an agent in a network namespace whose uplink a token
//! bucket holds to a few Mbit/s, as at a remote site. Needs root and iproute2 (`ip`, `tc`):
//! a machine that cannot create namespaces fails the test, it does not skip.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::ferry::start_gateway_on;
use common::http::get_via_proxy;
use common::netns::TestHost;
use common::servers::{Behaviour, TargetServer};
use tempfile::TempDir;
use tokio::net::TcpListener;

const TOKEN: &str = "netns-token";
const WAIT: Duration = Duration::from_secs(15);

/// A `ferry agent` process, killed when dropped.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// While a large response crosses a slow uplink, a small scrape of the same agent must not
/// wait behind all of it: the kernel's send buffer would hold seconds of the large one in front
/// of anything else the agent sends (other scrapes' answers, keepalive PONGs), where HTTP/2
/// cannot interleave them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_scrape_is_not_stuck_behind_a_large_one_on_a_slow_uplink() {
    const UPLINK: u64 = 512 * 1024; // bytes per second, 4 Mbit/s
    const BIG: u64 = 3 << 20; // six seconds of uplink
    let site = TestHost::create("s", "198.19.77.1", "198.19.77.2");
    site.limit_uplink(UPLINK);

    let dir = TempDir::new().unwrap();
    let web = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tunnel = TcpListener::bind("198.19.77.1:0").await.unwrap();
    let tunnel_port = tunnel.local_addr().unwrap().port();
    let gw = start_gateway_on(&dir, &[("*", TOKEN)], web, tunnel, |_| {}).await;
    // The targets answer the agent over the link's fast direction.
    let big = TargetServer::start_on("198.19.77.1", Behaviour::Large { bytes: BIG }).await;
    let small = TargetServer::start_on("198.19.77.1", Behaviour::Metrics("up 1\n".into())).await;

    let _agent = AgentProcess(
        site.command(env!("CARGO_BIN_EXE_ferry"))
            .arg("agent")
            .args(["--gateway", &format!("https://198.19.77.1:{tunnel_port}")])
            .args(["--agent-id", "remote-site", "--tunnel.fingerprint"])
            .arg(gw.fingerprint())
            .args(["--target", &format!("big={}", big.url("/big"))])
            .args(["--target", &format!("small={}", small.url("/metrics"))])
            .env("FERRY_TOKEN", TOKEN)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run ferry agent in the namespace"),
    );
    gw.wait_agent("remote-site", WAIT).await;

    let web = gw.web;
    let big_url = format!("http://remote-site:{}/big", big.addr.port());
    let large = tokio::spawn(async move {
        get_via_proxy(
            web,
            &big_url,
            &[("X-Prometheus-Scrape-Timeout-Seconds", "60")],
        )
        .await
    });
    // Let the large response fill whatever buffers it may.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let small_url = format!("http://remote-site:{}/metrics", small.addr.port());
    let mut took = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let resp = get_via_proxy(web, &small_url, &[]).await;
        took.push(started.elapsed());
        assert_eq!((resp.status, resp.text().as_str()), (200, "up 1\n"));
    }
    let overlapped = !large.is_finished();
    took.sort();
    // The link's own queue (100 ms), what the kernel may hold unsent and an HTTP/2 frame or two
    // of the large response are in front of a small answer: 0.25-0.35 s here. Not the seconds
    // a full send buffer holds (1.2 s median when the agent left it at the kernel's default).
    assert!(
        took[2] < Duration::from_millis(750),
        "small scrapes behind a large one took {took:?}"
    );
    assert!(
        overlapped,
        "the large scrape ended too soon to show anything"
    );
    let large = large.await.unwrap();
    assert_eq!(large.status, 200);
    assert_eq!(large.body.len() as u64, BIG);
    gw.stop().await;
}
