//! Real peer countries: test hosts in network namespaces this test creates (veth pairs with
//! addresses a test database maps to countries) connect to a running gateway; its `/metrics`
//! must label their connections with those countries. Needs root and `ip` (iproute2): if the
//! machine cannot create namespaces the test fails, it does not skip.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::ferry::metric_value;
use common::http::get;
use common::netns::TestHost;
use mmdb_writer::{IpVersion, Writer};
use serde_json::json;

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
