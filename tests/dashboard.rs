//! The Grafana dashboard in `dashboards/ferry.json` and the alerting rules in
//! `examples/prometheus-alerts.yml`: the dashboard parses, uses Geomap panels with a country-code
//! lookup and one query each, its map and kinds-table queries give the rows their titles promise
//! (evaluated by `promtool`); the rules pass their `promtool` unit tests; and every metric the
//! dashboard and the rules use is exported by a running ferry (gateway, agent with the
//! connection collector, egress, exporter with a geo database), scraped here after some traffic.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::ferry::{agent_section, start_agent, start_exporter_with_geo, start_gateway};
use common::http::{get, get_via_proxy};
use common::proxy::open_tunnel;
use common::servers::{Behaviour, TargetServer};
use ferry::config::{ConfigErrors, EgressSection};
use ferry::egress::Egress;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn dashboard() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/ferry.json");
    let text = std::fs::read_to_string(path).expect("dashboards/ferry.json exists");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// Every `expr` of every panel.
fn queries(dash: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(expr.to_owned());
            }
        }
    }
    out
}

/// `(alert, expr)` of every alerting rule in `examples/prometheus-alerts.yml`.
fn alert_rules() -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/prometheus-alerts.yml"
    );
    let text = std::fs::read_to_string(path).expect("examples/prometheus-alerts.yml exists");
    let rules: serde_json::Value =
        serde_yaml_ng::from_str(&text).expect("the alerting rules are valid YAML");
    let mut out = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let field = |name: &str| rule[name].as_str().expect(name).to_owned();
            out.push((field("alert"), field("expr")));
        }
    }
    out
}

/// `/usr/bin/promtool` run with `args`; a missing promtool fails the test (it is a dependency
/// of the test suite, not an optional extra).
fn promtool(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new("/usr/bin/promtool")
        .args(args)
        .output()
        .expect("run /usr/bin/promtool (Debian package prometheus; .ci/run installs it)")
}

/// Metric names (`ferry_…`) used in `expr`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("ferry_") {
        let start = i + pos;
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        let preceded_by_ident =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !preceded_by_ident {
            names.push(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// Names of the samples in a text exposition.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_dashboard_has_a_geomap_with_country_lookup() {
    let dash = dashboard();
    let geomaps: Vec<_> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "geomap")
        .collect();
    assert!(
        !geomaps.is_empty(),
        "a Geomap panel (the Worldmap plugin is deprecated)"
    );
    for g in geomaps {
        let location = &g["options"]["layers"][0]["location"];
        assert_eq!(location["mode"], "lookup", "{g}");
        assert_eq!(location["lookup"], "country", "{g}");
        assert!(
            location["gazetteer"]
                .as_str()
                .unwrap()
                .contains("countries"),
            "{g}"
        );
    }
    assert!(dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["type"] != "grafana-worldmap-panel"));
}

/// The Grafana version the README asks for is the one the dashboard declares it needs.
#[test]
fn the_readme_names_the_grafana_version_the_dashboard_requires() {
    let dash = dashboard();
    let grafana = dash["__requires"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "grafana")
        .expect("__requires names grafana");
    let version = grafana["version"].as_str().unwrap();
    let wanted = version.strip_suffix(".0").unwrap_or(version);
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let said: Vec<&str> = readme
        .split("Grafana ")
        .skip(1)
        .filter_map(|rest| rest.split_once(" or newer"))
        .map(|(v, _)| v)
        .filter(|v| v.len() < 8)
        .collect();
    assert_eq!(said, [wanted], "__requires says Grafana {version}");
}

/// The panel whose title starts with `title`.
fn panel<'a>(dash: &'a serde_json::Value, title: &str) -> &'a serde_json::Value {
    dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"].as_str().is_some_and(|t| t.starts_with(title)))
        .unwrap_or_else(|| panic!("no panel titled {title:?}"))
}

/// The one query of `panel`.
fn only_expr(panel: &serde_json::Value) -> &str {
    let targets = panel["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 1, "{panel}");
    targets[0]["expr"].as_str().expect("expr")
}

/// Grafana's markers layer draws the first data frame only, and with two queries the value
/// columns are `Value #A`, `Value #B`: a map has one instant table query, whose `Value` column
/// sizes and colours the markers.
#[test]
fn each_map_has_one_query_whose_value_its_markers_use() {
    let dash = dashboard();
    for g in dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == "geomap")
    {
        let targets = g["targets"].as_array().expect("targets");
        assert_eq!(targets.len(), 1, "one query per map: {g}");
        assert_eq!(targets[0]["instant"], true, "{g}");
        assert_eq!(targets[0]["format"], "table", "{g}");
        for layer in g["options"]["layers"].as_array().unwrap() {
            for style in ["size", "color"] {
                assert_eq!(layer["config"]["style"][style]["field"], "Value", "{g}");
            }
        }
    }
}

/// A `promtool test rules` file: `series` (name{labels} value) as input, `exprs` evaluated at
/// time 0 against the samples each must give (`{labels}`, value).
fn promtool_expr_test(series: &[(String, f64)], exprs: &[(&str, Vec<(String, f64)>)]) -> String {
    let quote = |s: &str| serde_json::to_string(s).unwrap();
    let mut yaml = String::from("tests:\n  - interval: 1m\n    input_series:\n");
    for (name, value) in series {
        yaml += &format!(
            "      - series: {}\n        values: '{value}'\n",
            quote(name)
        );
    }
    yaml += "    promql_expr_test:\n";
    for (expr, samples) in exprs {
        yaml += &format!(
            "      - expr: {}\n        eval_time: 0m\n        exp_samples:\n",
            quote(expr)
        );
        for (labels, value) in samples {
            yaml += &format!(
                "          - labels: {}\n            value: {value}\n",
                quote(labels)
            );
        }
    }
    yaml
}

/// The map of ferry's own connections counts the gateway's and the egress proxy's together by
/// country; the kinds table has the peers a map cannot place (every kind and `unknown`), not
/// the countries. Evaluated by Prometheus's own engine (`promtool test rules`).
#[test]
fn the_map_and_the_kinds_table_show_what_their_titles_say() {
    use ferry::telemetry::geo::Country;
    let dash = dashboard();
    let map = only_expr(panel(&dash, "ferry's own connections by peer country"));
    let kinds_table = only_expr(panel(&dash, "Connections by kind"));
    let kinds: Vec<&str> = [
        Country::LOOPBACK,
        Country::PRIVATE,
        Country::LINK_LOCAL,
        Country::CGNAT,
        Country::UNSPECIFIED,
        Country::MULTICAST,
        Country::UNKNOWN,
    ]
    .iter()
    .map(Country::as_str)
    .collect();

    let own = |role: &str, listener: &str, country: &str, n: f64| {
        let name = format!(
            "ferry_{role}_connections_open{{listener=\"{listener}\",country=\"{country}\"}}"
        );
        (name, n)
    };
    let mut series = vec![
        own("gateway", "tunnel", "DE", 2.0),
        own("gateway", "web", "private", 1.0),
        own("egress", "clients", "DE", 3.0),
        own("egress", "upstreams", "JP", 4.0),
    ];
    let host = |country: &str| {
        format!("ferry_host_tcp_connections{{state=\"established\",direction=\"inbound\",country=\"{country}\"}}")
    };
    series.extend(["DE", "JP", "US"].map(|c| (host(c), 5.0)));
    series.extend(kinds.iter().map(|k| (host(k), 1.0)));
    let by_country = |pairs: &[(&str, f64)]| -> Vec<(String, f64)> {
        pairs
            .iter()
            .map(|(c, n)| (format!("{{country=\"{c}\"}}"), *n))
            .collect()
    };
    let kind_rows = kinds
        .iter()
        .map(|k| (format!("{{country=\"{k}\",direction=\"inbound\"}}"), 1.0))
        .collect();
    let test = promtool_expr_test(
        &series,
        &[
            (
                map,
                by_country(&[("DE", 5.0), ("JP", 4.0), ("private", 1.0)]),
            ),
            (kinds_table, kind_rows),
        ],
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard_test.yml");
    std::fs::write(&file, &test).unwrap();
    let out = promtool(&["test".as_ref(), "rules".as_ref(), file.as_os_str()]);
    assert!(
        out.status.success(),
        "the dashboard's queries give other rows than their panels promise:\n{}{}\n{test}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The agent-side `ferry_agent_tunnel_up` is scraped through the tunnel it reports on: it is
/// never seen at 0, and a panel counting tunnels with it always reads "all up". Disconnected
/// agents are counted by the gateway.
#[test]
fn tunnels_down_are_counted_by_the_gateway() {
    let dash = dashboard();
    let exprs = queries(&dash);
    assert!(
        exprs.iter().all(|e| !e.contains("ferry_agent_tunnel_up")),
        "{exprs:?}"
    );
    assert_eq!(
        only_expr(panel(&dash, "Agents disconnected")),
        "sum(ferry_gateway_agents_disconnected)"
    );
    assert_eq!(
        only_expr(panel(&dash, "Agents connected")),
        "sum(ferry_gateway_agents_connected)"
    );
}

/// The alerting rules fire when and only when their unit tests say, with the labels and
/// annotations they promise (`promtool test rules`, Prometheus's own rule engine).
#[test]
fn the_alerting_rules_pass_their_promtool_tests() {
    let tests = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/prometheus-alerts.test.yml"
    );
    let out = promtool(&["test".as_ref(), "rules".as_ref(), tests.as_ref()]);
    assert!(
        out.status.success(),
        "promtool test rules {tests}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let test = std::fs::read_to_string(tests).unwrap();
    for (name, _) in alert_rules() {
        assert!(
            test.contains(&format!(
                "alertname: {name}\n        exp_alerts:\n          - "
            )),
            "no test of {name} firing in {tests}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let target = TargetServer::start(Behaviour::Metrics("up 1\n".into())).await;
    let gw = start_gateway(&dir, &[("*", "t")], |_| {}).await;
    let mut section = agent_section(&gw, "dash-1", &[("node", target.url("/metrics"))]);
    section.collector.connections = true;
    let agent = start_agent(section, "t");
    gw.wait_agent("dash-1", Duration::from_secs(10)).await;

    // Pull-path traffic: a good scrape and a 404.
    let port = target.addr.port();
    assert_eq!(
        get_via_proxy(gw.web, &format!("http://dash-1:{port}/metrics"), &[])
            .await
            .status,
        200
    );
    assert_eq!(
        get_via_proxy(gw.web, &format!("http://dash-1:{port}/nope"), &[])
            .await
            .status,
        404
    );

    // Egress traffic: allowed, refused, and a CONNECT tunnel.
    let upstream = TargetServer::start(Behaviour::Metrics("ok\n".into())).await;
    let egress_section = EgressSection {
        allow_upstreams: vec![format!("127.0.0.1/32:{}", upstream.addr.port())],
        ..EgressSection::default()
    };
    let mut errs = ConfigErrors::new("test");
    let cfg = egress_section
        .validate("egress", &mut errs)
        .expect("valid egress config");
    assert!(errs.errors.is_empty(), "{errs}");
    let egress = Egress::new(cfg).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let egress_addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let egress = egress.clone();
        let shutdown = shutdown.clone();
        async move { egress.serve(listener, shutdown).await }
    });
    assert_eq!(
        get_via_proxy(egress_addr, &upstream.url("/ok"), &[])
            .await
            .status,
        200
    );
    assert_eq!(
        get_via_proxy(egress_addr, "http://127.0.0.1:1/refused", &[])
            .await
            .status,
        403
    );
    let tunnel = open_tunnel(egress_addr, &upstream.addr.to_string()).await;
    drop(tunnel);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut exported = BTreeSet::new();
    exported.extend(sample_names(
        &get(&format!("http://{}/metrics", gw.web)).await.text(),
    ));
    exported.extend(sample_names(
        &get(&format!("http://{egress_addr}/metrics")).await.text(),
    ));
    let agent_metrics = get_via_proxy(gw.web, "http://dash-1:9369/metrics", &[]).await;
    assert_eq!(agent_metrics.status, 200);
    exported.extend(sample_names(&agent_metrics.text()));
    let geo = ferry::telemetry::geo::SharedGeo::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/geo/GeoLite2-Country-Test.mmdb"
    ))
    .unwrap();
    let exporter = start_exporter_with_geo(&shutdown, geo).await;
    exported.extend(sample_names(
        &get(&format!("http://{exporter}/metrics")).await.text(),
    ));

    let dash = dashboard();
    let exprs = queries(&dash);
    assert!(
        exprs.len() >= 15,
        "the dashboard has panels for every role: {exprs:?}"
    );
    let mut missing = BTreeSet::new();
    let alerts = alert_rules().into_iter().map(|(_, expr)| expr);
    for expr in exprs.into_iter().chain(alerts) {
        for name in metric_names(&expr) {
            // The labels service discovery gives every target behind an agent, not metrics.
            let sd_label = name == "ferry_agent" || name == "ferry_target";
            if !sd_label && !exported.contains(&name) {
                missing.insert(name);
            }
        }
    }
    assert!(missing.is_empty(), "the dashboard or the alerts query metrics no running ferry exports: {missing:?}\nexported: {exported:?}");
    shutdown.cancel();
    agent.stop().await;
}
