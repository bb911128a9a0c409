//! Real peer countries: test hosts in network namespaces this test creates (veth pairs with
//! addresses a test database maps to countries) connect to a running gateway; its `/metrics`
//! must label their connections with those countries. Needs root and `ip` (iproute2): if the
//! machine cannot create namespaces the test fails, it does not skip.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::ferry::metric_value;
use common::http::get;
use mmdb_writer::{IpVersion, Writer};
use serde_json::json;

/// A test host: a network namespace joined to the root namespace by a veth pair.
struct TestHost {
    ns: String,
}

impl TestHost {
    /// `host_ip` on the root side, `peer_ip` inside the namespace, both in a /24.
    fn create(tag: &str, host_ip: &str, peer_ip: &str) -> TestHost {
        let ns = format!("fy{}{tag}", std::process::id() % 100_000);
        let (outer, inner) = (format!("{ns}o"), format!("{ns}i"));
        let _ = ip(&["netns", "del", &ns]);
        let _ = ip(&["link", "del", &outer]);
        let host = TestHost { ns: ns.clone() };
        for args in [
            vec!["netns", "add", &ns],
            vec![
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ],
            vec!["link", "set", &inner, "netns", &ns],
            vec!["addr", "add", &format!("{host_ip}/24"), "dev", &outer],
            vec!["link", "set", &outer, "up"],
            vec![
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{peer_ip}/24"),
                "dev",
                &inner,
            ],
            vec!["-n", &ns, "link", "set", &inner, "up"],
            vec!["-n", &ns, "link", "set", "lo", "up"],
        ] {
            let out = ip(&args).unwrap_or_else(|e| {
                panic!("ip {args:?}: {e} (iproute2 installed? running as root?)")
            });
            assert!(
                out.status.success(),
                "ip {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        host
    }

    /// Holds a TCP connection from inside the namespace to `addr` for `secs` seconds.
    fn connect_and_hold(&self, addr: SocketAddr, secs: u32) -> Child {
        let script = format!(
            "exec 3<>/dev/tcp/{}/{} && printf 'GET /-/healthy HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3 && sleep {secs}",
            addr.ip(),
            addr.port()
        );
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "bash", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run bash in the namespace")
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, which deletes the pair.
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

fn ip(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip").args(args).output()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_test_hosts_are_labelled_with_their_country() {
    let dir = tempfile::tempdir().unwrap();
    // Documentation ranges, mapped by a database this test writes, in both schemas.
    let mut writer = Writer::builder("Test-Country")
        .ip_version(IpVersion::V6)
        .build();
    writer
        .insert(
            "198.51.100.0/24".parse::<ipnet::IpNet>().unwrap(),
            &json!({"country": {"iso_code": "DE"}}),
        )
        .unwrap();
    writer
        .insert(
            "203.0.113.0/24".parse::<ipnet::IpNet>().unwrap(),
            &json!({"country_code": "JP"}),
        )
        .unwrap();
    let db = dir.path().join("countries.mmdb");
    std::fs::write(&db, writer.to_bytes().unwrap()).unwrap();

    let de = TestHost::create("d", "198.51.100.1", "198.51.100.2");
    let jp = TestHost::create("j", "203.0.113.1", "203.0.113.2");

    let geo = ferry::telemetry::geo::SharedGeo::open(&db).expect("test database opens");
    // The web listener on every interface, so the test hosts reach it over their veth.
    let web = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let tunnel = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = web.local_addr().unwrap().port();
    let gw = common::ferry::start_gateway_on_with_geo(&dir, &[("*", "t")], web, tunnel, geo).await;

    let mut clients = vec![
        de.connect_and_hold(SocketAddr::from(([198, 51, 100, 1], port)), 5),
        jp.connect_and_hold(SocketAddr::from(([203, 0, 113, 1], port)), 5),
    ];
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = get(&metrics_url).await.text();
        let seen = |country| {
            metric_value(
                &text,
                "ferry_gateway_connections_open",
                &[("listener", "web"), ("country", country)],
            )
        };
        if seen("DE") == Some(1.0) && seen("JP") == Some(1.0) {
            break text;
        }
        if Instant::now() > deadline {
            for c in &mut clients {
                let _ = c.kill();
            }
            panic!("no DE and JP web connections in the gateway's metrics:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        metric_value(
            &text,
            "ferry_gateway_connections_total",
            &[("listener", "web"), ("country", "DE")]
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );
    // Our own scrape of /metrics comes over loopback, labelled as such, never as a country.
    assert!(
        metric_value(
            &text,
            "ferry_gateway_connections_open",
            &[("listener", "web"), ("country", "loopback")]
        )
        .is_some(),
        "{text}"
    );
    for mut c in clients {
        let _ = c.kill();
        let _ = c.wait();
    }
    gw.stop().await;
}
