//! Every file shipped in `examples/` works as shipped: each ferry config parses (field names are
//! checked by `deny_unknown_fields`) and validates once the files it names exist; prometheus.yml
//! passes the real `promtool`; the systemd units agree with the configs; the egress cookbook's
//! rules do what the README says against a local collector; the README's snippets, tables and
//! flag reference match the examples, the code and the binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::egress::{
    absolute, connect_raw, exchange, raw_exchange, RecordingUpstream, TestEgress, TestResolver,
    UPSTREAM_BODY,
};
use common::ferry::metric_value;
use common::proxy::open_tunnel;
use ferry::config::{example_paths, EgressSection, FileConfig, RunConfig, TlsUpgradeSection};
use ferry::gateway::auth::hash_token;
use ferry::tunnel::tls_server::{self_signed_identity, SELF_SIGNED_CERT, SELF_SIGNED_KEY};
use tempfile::TempDir;

const TOKEN: &str = "example-token";

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn example_names() -> Vec<String> {
    example_paths()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn load(name: &str) -> FileConfig {
    let path = examples_dir().join(name);
    FileConfig::load(&path).unwrap_or_else(|e| panic!("{name} does not parse:\n{e}"))
}

#[test]
fn the_documented_examples_are_shipped() {
    let names = example_names();
    for expected in [
        "ferry-agent.yaml",
        "ferry-all-in-one.yaml",
        "ferry-egress.yaml",
        "ferry-exporter.yaml",
        "ferry-gateway.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from examples/: {names:?}"
        );
    }
}

#[test]
fn every_example_config_parses() {
    let paths = example_paths();
    assert!(!paths.is_empty(), "no examples/ferry*.yaml found");
    for path in paths {
        if let Err(e) = FileConfig::load(&path) {
            panic!("{} does not parse:\n{e}", path.display());
        }
    }
}

/// What a file referenced by a config must contain for validation to accept it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The gateway's tokens file (also the egress credentials file).
    Tokens,
    /// A JSON Schema (egress payload validation).
    JsonSchema,
    /// An agent's token.
    Token,
    /// A PEM certificate (gateway certificate, CA file, client certificate).
    Cert,
    /// The PEM private key matching `Cert`.
    Key,
    /// A MaxMind-format country database.
    GeoDb,
}

/// Moves every file path of `cfg` below `root` (keeping its absolute path as a suffix) and
/// returns the files with what they must hold. Directories (`data_dir`) move too, uncreated.
fn reroot(cfg: &mut FileConfig, root: &Path) -> Vec<(PathBuf, Kind)> {
    let mut files = Vec::new();
    let mut file = |p: &mut Option<PathBuf>, kind: Kind| {
        if let Some(path) = p {
            *path = below(root, path);
            files.push((path.clone(), kind));
        }
    };
    if let Some(g) = &mut cfg.gateway {
        file(&mut g.auth.tokens_file, Kind::Tokens);
        file(&mut g.tunnel.tls_cert_file, Kind::Cert);
        file(&mut g.tunnel.tls_key_file, Kind::Key);
        file(&mut g.tunnel.tls_client_ca_file, Kind::Cert);
        g.data_dir = Some(below(root, &g.data_dir()));
    }
    if let Some(e) = &mut cfg.egress {
        file(&mut e.auth.credentials_file, Kind::Tokens);
        for r in &mut e.rules {
            file(&mut r.validate.json_schema_file, Kind::JsonSchema);
            if let Some(t) = &mut r.tls_upgrade {
                file(&mut t.ca_file, Kind::Cert);
            }
        }
    }
    file(&mut cfg.geoip.database, Kind::GeoDb);
    if let Some(a) = &mut cfg.agent {
        file(&mut a.token_file, Kind::Token);
        file(&mut a.tunnel.ca_file, Kind::Cert);
        file(&mut a.tunnel.cert_file, Kind::Cert);
        file(&mut a.tunnel.key_file, Kind::Key);
        for t in &mut a.targets {
            file(&mut t.tls.ca_file, Kind::Cert);
            file(&mut t.tls.cert_file, Kind::Cert);
            file(&mut t.tls.key_file, Kind::Key);
        }
    }
    files
}

fn below(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// MaxMind's public test database (`../shared/data/geo`): 81.2.69.160 is GB.
const TEST_GEO_DB: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/geo/GeoLite2-Country-Test.mmdb"
);

/// The schema shipped in `examples/schemas/` under the file name a config refers to.
fn shipped_schema(referenced: &Path) -> PathBuf {
    let name = referenced.file_name().expect("a schema file name");
    let shipped = examples_dir().join("schemas").join(name);
    assert!(
        shipped.exists(),
        "{} is referenced by an example but not shipped as {}",
        referenced.display(),
        shipped.display()
    );
    shipped
}

/// Creates each file with content of its kind: a tokens file accepting `TOKEN` for any id, the
/// token, one real certificate and key pair (the gateway's own check loads the pair), the JSON
/// Schemas shipped in `examples/schemas/`, and MaxMind's test country database.
fn create(files: &[(PathBuf, Kind)], scratch: &Path) {
    let identity_dir = scratch.join("identity");
    self_signed_identity(&identity_dir, &["gateway.example.com".into()], None)
        .expect("generate a certificate");
    for (path, kind) in files {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        match kind {
            Kind::Tokens => std::fs::write(path, format!("* {}\n", hash_token(TOKEN))).unwrap(),
            Kind::Token => std::fs::write(path, format!("{TOKEN}\n")).unwrap(),
            Kind::JsonSchema => drop(std::fs::copy(shipped_schema(path), path).unwrap()),
            Kind::GeoDb => drop(std::fs::copy(TEST_GEO_DB, path).unwrap()),
            Kind::Cert => drop(std::fs::copy(identity_dir.join(SELF_SIGNED_CERT), path).unwrap()),
            Kind::Key => drop(std::fs::copy(identity_dir.join(SELF_SIGNED_KEY), path).unwrap()),
        }
    }
}

/// Validates example `name` with its referenced files created below a temporary root and no
/// environment (so a developer's HTTPS_PROXY or FERRY_TOKEN changes nothing).
fn validate_example(name: &str) -> (RunConfig, TempDir) {
    let mut cfg = load(name);
    let dir = TempDir::new().unwrap();
    let root = dir.path().join("root");
    let files = reroot(&mut cfg, &root);
    create(&files, dir.path());
    let no_env = |_: &str| None;
    match cfg.validate(name, &no_env) {
        Ok(run) => (run, dir),
        Err(e) => panic!("{name} does not validate with its files present:\n{e}"),
    }
}

#[test]
fn every_example_config_validates_once_its_files_exist() {
    for name in example_names() {
        let cfg = load(&name);
        let (run, _dir) = validate_example(&name);
        assert_eq!(
            run.gateway.is_some(),
            cfg.gateway.is_some(),
            "{name}: gateway role"
        );
        assert_eq!(
            run.agent.is_some(),
            cfg.agent.is_some(),
            "{name}: agent role"
        );
        assert_eq!(
            run.egress.is_some(),
            cfg.egress.is_some(),
            "{name}: egress role"
        );
        assert_eq!(
            run.exporter.is_some(),
            cfg.exporter.is_some(),
            "{name}: exporter role"
        );
        assert_eq!(
            run.geo.is_enabled(),
            cfg.geoip.database.is_some(),
            "{name}: geoip database"
        );
    }
}

#[test]
fn without_its_files_an_example_reports_each_missing_one() {
    let cfg = load("ferry-agent.yaml");
    let no_env = |_: &str| None;
    let errs = cfg
        .validate("ferry-agent.yaml", &no_env)
        .expect_err("the token and CA files do not exist here");
    let fields: Vec<&str> = errs.errors.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"agent.token_file"), "{errs}");
    assert!(fields.contains(&"agent.targets[3].tls.ca_file"), "{errs}");
}

#[test]
fn without_its_files_the_all_in_one_example_reports_certificate_and_key() {
    let cfg = load("ferry-all-in-one.yaml");
    let no_env = |_: &str| None;
    let errs = cfg
        .validate("ferry-all-in-one.yaml", &no_env)
        .expect_err("the certificate and key do not exist here");
    let fields: Vec<&str> = errs.errors.iter().map(|e| e.field.as_str()).collect();
    for field in [
        "gateway.tunnel.tls_cert_file",
        "gateway.tunnel.tls_key_file",
    ] {
        assert!(fields.contains(&field), "{field} missing from:\n{errs}");
    }
}

#[test]
fn the_gateway_example_is_what_the_docs_describe() {
    let (run, _dir) = validate_example("ferry-gateway.yaml");
    let g = run.gateway.expect("gateway role");
    assert_eq!(g.web_listen.port(), 8080);
    assert_eq!(g.tunnel_listen.port(), 7443);
    match &g.tls {
        ferry::config::GatewayTls::SelfSigned { data_dir, names } => {
            assert!(data_dir.ends_with("var/lib/ferry"), "{data_dir:?}");
            assert_eq!(names, &["gateway.example.com".to_owned()]);
        }
        other => {
            panic!("the gateway example should use the self-signed certificate, got {other:?}")
        }
    }
}

#[test]
fn the_agent_example_addresses_its_targets_as_documented() {
    let (run, _dir) = validate_example("ferry-agent.yaml");
    let a = run.agent.expect("agent role");
    assert_eq!(a.agent_id, "node-1");
    assert_eq!(a.gateway.addr, "gateway.example.com:7443");
    assert!(
        a.proxy.is_none(),
        "proxy_url is commented out and the environment is empty"
    );
    let addressed: Vec<(&str, u16, &str)> = a
        .targets
        .iter()
        .map(|t| (t.name.as_str(), t.port, t.path.as_str()))
        .collect();
    assert_eq!(
        addressed,
        [
            ("node", 9100, "/metrics"),
            ("app", 8000, "/metrics"),
            ("app-replica", 8001, "/metrics"),
            ("etcd", 2379, "/metrics"),
        ]
    );
    let etcd = &a.targets[3];
    assert!(etcd.tls.is_some(), "the https target has TLS settings");
    assert_eq!(etcd.server_name.as_deref(), Some("etcd.internal"));
    assert_eq!(a.labels.get("site").map(String::as_str), Some("berlin"));
    assert_eq!(a.self_port, 9369);
}

#[test]
fn the_all_in_one_agent_dials_its_own_gateway() {
    let (run, _dir) = validate_example("ferry-all-in-one.yaml");
    let (g, a) = (
        run.gateway.expect("gateway role"),
        run.agent.expect("agent role"),
    );
    assert_eq!(
        a.gateway.addr,
        format!("127.0.0.1:{}", g.tunnel_listen.port())
    );
    assert_eq!(a.gateway.server_name, "gateway.example.com");
    assert!(
        matches!(g.tls, ferry::config::GatewayTls::Files { .. }),
        "{:?}",
        g.tls
    );
}

#[test]
fn the_prometheus_example_passes_promtool() {
    let promtool = Path::new("/usr/bin/promtool");
    assert!(
        promtool.exists(),
        "/usr/bin/promtool is missing: install the Debian package `prometheus` (.ci/run does)"
    );
    let file = examples_dir().join("prometheus.yml");
    let out = Command::new(promtool)
        .arg("check")
        .arg("config")
        .arg(&file)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check config {} failed:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_prometheus_example_points_at_the_gateway_example() {
    let text = read(&examples_dir().join("prometheus.yml"));
    let port = load("ferry-gateway.yaml")
        .gateway
        .unwrap()
        .web
        .listen_address;
    assert_eq!(port, ":8080");
    assert!(
        text.contains("proxy_url: http://gateway.example.com:8080\n"),
        "{text}"
    );
    assert!(
        text.contains("- url: http://gateway.example.com:8080/targets\n"),
        "{text}"
    );
}

/// The dashboard shows every role: the Prometheus example scrapes each of them, the egress proxy
/// and the exporter on the ports their examples listen on, under the job names the alerts expect.
#[test]
fn the_prometheus_example_scrapes_every_role_the_dashboard_shows() {
    let text = read(&examples_dir().join("prometheus.yml"));
    let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let jobs = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    let target_of = |name: &str| {
        let job = jobs
            .iter()
            .find(|j| j["job_name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no job {name} in prometheus.yml"));
        job["static_configs"][0]["targets"][0]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(target_of("ferry"), None, "discovered through the gateway");
    assert!(target_of("ferry-gateway").is_some());
    let egress = load("ferry-egress.yaml").egress.unwrap().web.listen_address;
    let exporter = load("ferry-exporter.yaml")
        .exporter
        .unwrap()
        .web
        .listen_address;
    for (job, listen) in [("ferry-egress", egress), ("ferry-exporter", exporter)] {
        let target = target_of(job).unwrap_or_else(|| panic!("{job}: no static target"));
        assert!(target.ends_with(&listen), "{job}: {target} vs {listen}");
    }
}

/// The `[Service]` directives of a unit file, in order.
fn directives(unit: &str) -> Vec<(String, String)> {
    read(&examples_dir().join(unit))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn directive<'a>(d: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    d.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn the_systemd_units_are_hardened_and_reloadable() {
    for unit in ["ferry-gateway.service", "ferry-agent.service"] {
        let d = directives(unit);
        for (key, value) in [
            ("DynamicUser", "yes"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ExecReload", "/bin/kill -HUP $MAINPID"),
            ("RestartPreventExitStatus", "2"),
        ] {
            assert_eq!(directive(&d, key), [value], "{unit}: {key}");
        }
        let exec = directive(&d, "ExecStart");
        let config = format!("/etc/ferry/{}", unit.replace(".service", ".yaml"));
        assert_eq!(
            exec,
            [format!("/usr/local/bin/ferry run --config.file {config}")],
            "{unit}"
        );
        // RestartPreventExitStatus applies to the main process only: a check-config in
        // ExecStartPre failing with 2 would be restarted for ever. `ferry run` checks the file.
        assert!(
            directive(&d, "ExecStartPre").is_empty(),
            "{unit}: a failing ExecStartPre is restarted for ever"
        );
    }
    let gateway = directives("ferry-gateway.service");
    assert_eq!(
        directive(&gateway, "StateDirectory"),
        ["ferry"],
        "data_dir /var/lib/ferry"
    );
    let data_dir = load("ferry-gateway.yaml").gateway.unwrap().data_dir;
    assert_eq!(
        data_dir.as_deref(),
        Some(Path::new("/var/lib/ferry")),
        "StateDirectory=ferry is /var/lib/ferry"
    );
}

#[test]
fn the_agent_unit_hands_the_token_to_the_file_the_agent_example_reads() {
    let d = directives("ferry-agent.service");
    let creds = directive(&d, "LoadCredential");
    assert_eq!(creds, ["token:/etc/ferry/agent-token"]);
    let token_file = load("ferry-agent.yaml").agent.unwrap().token_file.unwrap();
    // systemd sets $CREDENTIALS_DIRECTORY to /run/credentials/<unit name>.
    assert_eq!(
        token_file,
        Path::new("/run/credentials/ferry-agent.service/token")
    );
}

fn readme() -> String {
    read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
}

#[test]
fn the_readme_shows_the_prometheus_example_verbatim() {
    let example = read(&examples_dir().join("prometheus.yml"));
    let start = example
        .find("scrape_configs:")
        .expect("scrape_configs in prometheus.yml");
    let snippet: String = example[start..]
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        readme().contains(&snippet),
        "README.md must contain, verbatim:\n{snippet}"
    );
}

#[test]
fn the_readme_flag_reference_is_the_binarys_help() {
    let readme = readme();
    for sub in ["gateway", "agent", "egress", "exporter"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(
            readme.contains(&format!("$ ferry {sub} --help\n{help}")),
            "README.md's flag reference for `ferry {sub}` is out of date; it should read:\n$ ferry {sub} --help\n{help}"
        );
    }
}

#[test]
fn the_readme_test_command_is_the_one_ci_runs() {
    let ci = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/run"));
    assert!(
        readme().contains("\ncargo nextest run\n"),
        "README states the test command"
    );
    assert!(
        ci.lines()
            .any(|l| l.trim_start().starts_with("cargo nextest run")),
        ".ci/run runs it"
    );
}

// README embed begin
use ferry::agent::Agent;
use ferry::config::{AgentSection, ConfigErrors};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Starts an agent inside this application; `registry` is served as the target `ferry`.
/// Cancelling `stop` closes the tunnel cleanly (the gateway drains the scrapes in flight).
fn start_agent(
    registry: Registry,
    gateway: &str,
    fingerprint: &str,
    token: &str,
    stop: CancellationToken,
) -> Result<Agent, Box<dyn std::error::Error>> {
    let mut section = AgentSection {
        gateway: Some(gateway.to_owned()),
        agent_id: Some("billing-7".to_owned()),
        ..AgentSection::default()
    };
    section.tunnel.fingerprint = vec![fingerprint.to_owned()];
    // Environment lookups (FERRY_TOKEN, HTTPS_PROXY) go through this closure.
    let token = token.to_owned();
    let env = move |name: &str| (name == "FERRY_TOKEN").then(|| token.clone());
    let mut errs = ConfigErrors::new("billing");
    let config = section.validate("agent", &env, &mut errs);
    let config = errs.finish(config)?.ok_or("invalid agent configuration")?;
    let agent = Agent::with_registry(config, registry)?;
    tokio::spawn(agent.clone().run(stop));
    Ok(agent)
}
// README embed end

#[test]
fn the_readme_embedding_example_is_the_one_tested_here() {
    let this = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/examples.rs"));
    let begin = "// README embed begin\n";
    let start = this.find(begin).unwrap() + begin.len();
    let end = this.find("// README embed end").unwrap();
    let code = &this[start..end];
    assert!(
        readme().contains(&format!("```rust\n{code}```")),
        "README.md's library example differs from tests/examples.rs:\n{code}"
    );
    // The crate documentation shows it too, as a doctest inside a hidden `mod` (compiled with
    // the `agent` feature only).
    let lib = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"));
    let doc: String = code
        .lines()
        .map(|l| format!("{}\n", format!("//! {l}").trim_end()))
        .collect();
    assert!(
        lib.contains(&doc),
        "src/lib.rs's agent example differs from tests/examples.rs:\n{doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_embedding_example_serves_the_applications_metrics() {
    use prometheus_client::metrics::counter::Counter;

    let dir = TempDir::new().unwrap();
    let gw = common::ferry::start_gateway(&dir, &[("billing-*", "app-token")], |_| {}).await;
    let mut registry = Registry::default();
    let invoices = Counter::<u64>::default();
    registry.register("billing_invoices", "Invoices sent", invoices.clone());
    invoices.inc_by(3);

    let gateway = format!("https://localhost:{}", gw.tunnel.port());
    let stop = CancellationToken::new();
    let agent = start_agent(
        registry,
        &gateway,
        &gw.fingerprint(),
        "app-token",
        stop.clone(),
    )
    .expect("the agent starts");
    gw.wait_agent("billing-7", Duration::from_secs(10)).await;
    assert_eq!(agent.id(), "billing-7");

    let resp = common::http::get_via_proxy(gw.web, "http://billing-7:9369/metrics", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.text();
    assert_eq!(
        common::ferry::metric_value(&body, "billing_invoices_total", &[]),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        common::ferry::metric_value(&body, "ferry_agent_tunnel_up", &[]),
        Some(1.0),
        "{body}"
    );
    // Stopping the application's agent takes it off the gateway.
    stop.cancel();
    gw.wait_agent_gone("billing-7", Duration::from_secs(5))
        .await;
    gw.stop().await;
}

/// An application mounting the gateway can have its own metrics on the gateway's `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_gateway_serves_the_applications_metrics_too() {
    use prometheus_client::metrics::counter::Counter;

    let dir = TempDir::new().unwrap();
    let mut registry = Registry::default();
    let logins = Counter::<u64>::default();
    registry.register("portal_logins", "Logins", logins.clone());
    logins.inc_by(5);
    let gw = common::ferry::start_gateway_with_registry(&dir, &[("*", "t")], registry).await;
    let body = common::http::get(&format!("{}/metrics", gw.web_url()))
        .await
        .text();
    assert_eq!(
        common::ferry::metric_value(&body, "portal_logins_total", &[]),
        Some(5.0),
        "{body}"
    );
    assert!(
        common::ferry::metric_value(&body, "ferry_gateway_agents_connected", &[]).is_some(),
        "{body}"
    );
    gw.stop().await;
}

/// Metric names listed in the README's tables, `ferry_<role>_…`.
fn readme_metrics(role: &str) -> Vec<String> {
    let prefix = format!("| `ferry_{role}_");
    readme()
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| format!("| `{name}").starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Sends an allowed request, a refused one and a CONNECT tunnel through `proxy` to `up`, so that
/// every egress metric family has samples.
async fn egress_traffic(proxy: &TestEgress, up: &RecordingUpstream) {
    let ok = exchange(
        proxy.addr,
        absolute("GET", &up.url("/ok"), &[], Bytes::new()),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let refused = exchange(
        proxy.addr,
        absolute("GET", "http://192.0.2.1/refused", &[], Bytes::new()),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    drop(open_tunnel(proxy.addr, &up.addr.to_string()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_lists_the_metrics_ferry_exports() {
    use common::servers::{Behaviour, TargetServer};

    let dir = TempDir::new().unwrap();
    let target = TargetServer::start(Behaviour::Metrics("up 1\n".into())).await;
    let (gw, agent) =
        common::ferry::gateway_and_agent(&dir, "node-1", &[("node", target.url("/metrics"))]).await;
    // Families without samples are not exported: scrape once so every one has some.
    let port = target.addr.port();
    let scrape = format!("http://node-1:{port}/metrics");
    let resp = common::http::get_via_proxy(gw.web, &scrape, &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let own = "http://node-1:9369/metrics";
    common::http::get_via_proxy(gw.web, own, &[]).await;
    let from_agent = common::http::get_via_proxy(gw.web, own, &[]).await;
    let from_gateway = common::http::get(&format!("{}/metrics", gw.web_url())).await;

    let up = RecordingUpstream::start().await;
    let proxy = TestEgress::start(
        EgressSection {
            allow_upstreams: vec![format!("127.0.0.1/32:{}", up.port())],
            ..EgressSection::default()
        },
        TestResolver::new(&[]),
    )
    .await;
    egress_traffic(&proxy, &up).await;
    let from_egress = common::http::get(&format!("http://{}/metrics", proxy.addr)).await;

    let shutdown = CancellationToken::new();
    let exporter = common::ferry::start_exporter(&shutdown).await;
    let from_exporter = common::http::get(&format!("http://{exporter}/metrics")).await;

    for (role, resp, at_least) in [
        ("gateway", from_gateway, 8),
        ("agent", from_agent, 5),
        ("egress", from_egress, 8),
        ("host", from_exporter, 3),
    ] {
        assert_eq!(resp.status, 200, "{role}");
        let exposition = resp.text();
        let role_label = if role == "host" { "exporter" } else { role };
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            exposition.contains(&format!(
                "ferry_build_info{{role=\"{role_label}\",version=\"{version}\"}} 1"
            )),
            "{role}: no build info:\n{exposition}"
        );
        let listed = readme_metrics(role);
        assert!(
            listed.len() >= at_least,
            "README lists the {role} metrics: {listed:?}"
        );
        // The process's own, on every role's `/metrics`.
        let process = readme_metrics("config");
        assert_eq!(
            process.len(),
            2,
            "README lists the reload metrics: {process:?}"
        );
        for name in listed.into_iter().chain(process) {
            // The text format (no OpenMetrics asked for) names a counter with its `_total`.
            assert!(
                exposition.contains(&format!("# TYPE {name} ")),
                "README lists {name}, the {role} does not export it:\n{exposition}"
            );
        }
    }
    shutdown.cancel();
    agent.stop().await;
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Egress and the exporter: the examples, the README's cookbook, tables and snippets

#[test]
fn the_egress_example_is_what_the_readme_describes() {
    let (run, _dir) = validate_example("ferry-egress.yaml");
    let e = run.egress.expect("egress role");
    assert_eq!(e.listen.port(), 9530);
    assert!(e.listen.ip().is_unspecified(), "{}", e.listen);
    assert!(e.clients.allows("10.1.2.3".parse().unwrap()));
    assert!(e.clients.allows("fd00:10::7".parse().unwrap()));
    assert!(
        !e.clients.allows("127.0.0.1".parse().unwrap()),
        "a list replaces the loopback default"
    );
    let names: Vec<&str> = e.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "gateway.example.com:7443",
            "postback",
            "line-protocol",
            "remote-write",
            "saas-api"
        ],
        "allow_upstreams first, then rules, in order"
    );
    let upgraded: Vec<&str> = e
        .rules
        .iter()
        .filter(|r| r.tls_upgrade.is_some())
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(upgraded, ["postback", "line-protocol", "remote-write"]);
    let checking: Vec<&str> = e
        .rules
        .iter()
        .filter(|r| r.validates())
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        checking,
        ["postback", "line-protocol", "remote-write"],
        "these refuse CONNECT; the tunnel rules do not check payloads"
    );
    assert!(
        e.credentials_file.is_none(),
        "credentials are commented out"
    );
}

#[test]
fn the_exporter_example_labels_countries_from_its_database() {
    let (run, _dir) = validate_example("ferry-exporter.yaml");
    let x = run.exporter.expect("exporter role");
    assert_eq!(x.listen.port(), 9300);
    let excluded: Vec<String> = x
        .connections_exclude
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(excluded, ["127.0.0.0/8", "::1/128", "10.20.0.0/16"]);
    assert_eq!(run.geo.lookup("81.2.69.160".parse().unwrap()), "GB");
    assert_eq!(run.geo.lookup("::ffff:81.2.69.160".parse().unwrap()), "GB");
    assert_eq!(run.geo.lookup("10.0.0.1".parse().unwrap()), "private");
    assert_eq!(run.geo.lookup("8.8.8.8".parse().unwrap()), "unknown");
}

/// A test CA and a certificate for `localhost` it signed (chain, key), the CA written to `dir`.
fn localhost_pki(
    dir: &Path,
) -> (
    PathBuf,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let (ca, chain, key) = common::egress::ca_and_server_cert(&["localhost"]);
    let ca_file = dir.join("collector-ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    (ca_file, chain, key)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn content_md5(body: &[u8]) -> String {
    use base64::Engine as _;
    use md5::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body))
}

/// Asserts a refusal as the README describes it: the status, the same one-line reason in the
/// `Ferry-Refusal` header and the body, mentioning `needle`.
fn assert_refused(resp: &common::http::Resp, status: u16, needle: &str, what: &str) {
    assert_eq!(resp.status, status, "{what}: {:?}", resp.text());
    let reason = resp
        .header("ferry-refusal")
        .unwrap_or_else(|| panic!("{what}: no Ferry-Refusal header"));
    assert!(
        reason.contains(needle),
        "{what}: {reason:?} lacks {needle:?}"
    );
    assert_eq!(resp.text().trim_end(), reason, "{what}");
}

async fn post(
    proxy: &TestEgress,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> common::http::Resp {
    exchange(
        proxy.addr,
        absolute("POST", url, headers, Bytes::copy_from_slice(body)),
    )
    .await
}

const POSTBACK: &str = r#"{"agentKey":"0123456789abcdef0123456789abcdef","internalHostname":"web-1","collection_timestamp":1767225600,"os":"linux","metrics":{"loadAvrg":0.42,"memPhysUsed":1832,"diskUsed":null}}"#;

/// The cookbook in examples/ferry-egress.yaml (and the README) against local collectors: each
/// rule's own upstream is moved to a loopback port (by CIDR, as loopback needs) and its
/// `tls_upgrade` trusts a test CA; everything else — methods, path prefixes, the shipped JSON
/// Schema, content types, headers, deny patterns, limits — is the example's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_cookbook_rules_do_what_the_readme_says() {
    let dir = TempDir::new().unwrap();
    let (ca_file, chain, key) = localhost_pki(dir.path());
    let mut section = load("ferry-egress.yaml").egress.expect("egress section");
    section.web = Default::default();
    section.allow_clients.clear();
    let mut upstreams = std::collections::HashMap::new();
    for rule in &mut section.rules {
        let up = if rule.tls_upgrade.is_some() {
            rule.tls_upgrade = Some(TlsUpgradeSection {
                ca_file: Some(ca_file.clone()),
                ..TlsUpgradeSection::default()
            });
            RecordingUpstream::start_tls(chain.clone(), key.clone_key()).await
        } else {
            RecordingUpstream::start().await
        };
        rule.upstream = format!("127.0.0.1/32:{}", up.port());
        if let Some(schema) = &mut rule.validate.json_schema_file {
            *schema = shipped_schema(schema);
        }
        upstreams.insert(rule.name.clone(), up);
    }
    let proxy =
        TestEgress::start(section, TestResolver::new(&[("localhost", &["127.0.0.1"])])).await;
    let url = |rule: &str, path: &str| format!("http://localhost:{}{path}", upstreams[rule].port());

    // postback: a valid postback arrives byte-identical, over verified HTTPS.
    let postback = upstreams.get("postback").unwrap();
    let md5 = content_md5(POSTBACK.as_bytes());
    let json = ("content-type", "application/json");
    let intake = url("postback", "/intake/?agent_key=k");
    let ok = post(
        &proxy,
        &intake,
        &[json, ("content-md5", &md5)],
        POSTBACK.as_bytes(),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.text(), UPSTREAM_BODY);
    assert_eq!(postback.last().body.as_ref(), POSTBACK.as_bytes());
    assert_eq!(postback.last().uri, "/intake/?agent_key=k");
    let marker = "PAYLOAD-MARKER";
    let wrong_key = POSTBACK.replace("0123456789abcdef0123456789abcdef", marker);
    let mut refusals = vec![
        (
            "no Content-MD5",
            post(&proxy, &intake, &[json], POSTBACK.as_bytes()).await,
            422,
            "content-md5",
        ),
        (
            "wrong Content-MD5",
            post(
                &proxy,
                &intake,
                &[json, ("content-md5", &content_md5(b"other"))],
                POSTBACK.as_bytes(),
            )
            .await,
            422,
            "content-md5 does not match",
        ),
        (
            "schema mismatch",
            post(
                &proxy,
                &intake,
                &[json, ("content-md5", &content_md5(wrong_key.as_bytes()))],
                wrong_key.as_bytes(),
            )
            .await,
            422,
            "fails /properties/agentKey/pattern",
        ),
        (
            "not JSON",
            post(
                &proxy,
                &intake,
                &[json, ("content-md5", &content_md5(b"{nope"))],
                b"{nope",
            )
            .await,
            422,
            "not valid JSON",
        ),
        (
            "text/plain",
            post(
                &proxy,
                &intake,
                &[("content-type", "text/plain"), ("content-md5", &md5)],
                POSTBACK.as_bytes(),
            )
            .await,
            415,
            "application/json",
        ),
        (
            // By address: the test's rules are CIDR rules, and for them the proxy does not look a
            // name up when no rule takes the method (the shipped rule names the host: also 405).
            "GET",
            exchange(
                proxy.addr,
                absolute(
                    "GET",
                    &format!("http://127.0.0.1:{}/intake/", postback.port()),
                    &[],
                    Bytes::new(),
                ),
            )
            .await,
            405,
            "method GET",
        ),
        (
            "outside /intake/",
            post(
                &proxy,
                &url("postback", "/admin"),
                &[json, ("content-md5", &md5)],
                POSTBACK.as_bytes(),
            )
            .await,
            403,
            "not allowed",
        ),
    ];
    let key_leak = POSTBACK.replace(
        "\"os\":\"linux\"",
        "\"os\":\"-----BEGIN RSA PRIVATE KEY-----\"",
    );
    refusals.push((
        "a private key",
        post(
            &proxy,
            &intake,
            &[json, ("content-md5", &content_md5(key_leak.as_bytes()))],
            key_leak.as_bytes(),
        )
        .await,
        403,
        "deny pattern",
    ));
    let (connect, _) =
        connect_raw(proxy.addr, &format!("localhost:{}", postback.port()), &[]).await;
    assert_eq!(
        connect.status, 403,
        "CONNECT to the postback collector: {connect:?}"
    );
    for (what, resp, status, needle) in &refusals {
        assert_refused(resp, *status, needle, &format!("postback, {what}"));
        // The reason is also the access log's: it names the check, never the payload.
        let reason = resp.header("ferry-refusal").unwrap_or_default();
        assert!(!reason.contains(marker), "postback, {what}: {reason:?}");
    }
    assert_eq!(
        postback.request_count(),
        1,
        "refused postbacks never reached the collector"
    );

    // line-protocol: gzip bodies are checked decoded and forwarded as sent.
    let influx = upstreams.get("line-protocol").unwrap();
    let write = url("line-protocol", "/api/v2/write?bucket=b");
    let lines = "cpu,host=web-1 usage_idle=97.5 1767225600000000000\nmem,host=web-1 used=1832i 1767225600000000000\n";
    let gz = gzip(lines.as_bytes());
    let text = ("content-type", "text/plain; charset=utf-8");
    let auth = ("authorization", "Token t0k3n");
    let gzipped = ("content-encoding", "gzip");
    let ok = post(&proxy, &write, &[text, auth, gzipped], &gz).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(
        influx.last().body.as_ref(),
        gz.as_slice(),
        "forwarded compressed, as sent"
    );
    let leak = gzip(format!("{lines}login,host=web-1 password=\"hunter2\"\n").as_bytes());
    let aws = "AKIAIOSFODNN7EXAMPLE is at byte 0\n";
    for (what, resp, status, needle) in [
        (
            "password= inside gzip",
            post(&proxy, &write, &[text, auth, gzipped], &leak).await,
            403,
            "password=",
        ),
        (
            "AWS key at byte 0",
            post(&proxy, &write, &[text, auth], aws.as_bytes()).await,
            403,
            "AKIA",
        ),
        (
            "no Authorization",
            post(&proxy, &write, &[text, gzipped], &gz).await,
            422,
            "authorization",
        ),
        (
            "JSON",
            post(&proxy, &write, &[json, auth], POSTBACK.as_bytes()).await,
            415,
            "text/plain",
        ),
        (
            "zstd",
            post(
                &proxy,
                &write,
                &[text, auth, ("content-encoding", "zstd")],
                b"x",
            )
            .await,
            415,
            "zstd",
        ),
        (
            "corrupt snappy",
            post(
                &proxy,
                &write,
                &[text, auth, ("content-encoding", "snappy")],
                b"x",
            )
            .await,
            422,
            "not valid snappy",
        ),
    ] {
        assert_refused(&resp, status, needle, &format!("line protocol, {what}"));
    }
    assert_eq!(influx.request_count(), 1);

    // remote-write: snappy protobuf, bounded, typed and read decoded by the deny pattern.
    let receiver = upstreams.get("remote-write").unwrap();
    let rw = url("remote-write", "/api/v1/write");
    let protobuf = ("content-type", "application/x-protobuf");
    let snappy = ("content-encoding", "snappy");
    let version = ("x-prometheus-remote-write-version", "0.1.0");
    let series = |label: &str| -> Vec<u8> {
        let mut raw: Vec<u8> = (0..=255u8).cycle().take(50_000).collect();
        // An earlier near-miss makes snappy encode the label as a back-reference, so the
        // pattern can only match the decoded body.
        raw.extend_from_slice(format!("\x0a\x0ecustomer_emaiX\x0a\x0e{label}\x12").as_bytes());
        snap::raw::Encoder::new().compress_vec(&raw).unwrap()
    };
    let payload = series("instance_email");
    let ok = post(&proxy, &rw, &[protobuf, snappy, version], &payload).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(receiver.last().body.as_ref(), payload.as_slice());
    let leak = series("customer_email");
    assert!(!leak.windows(14).any(|w| w == b"customer_email"));
    for (what, resp, status, needle) in [
        (
            "a denied label",
            post(&proxy, &rw, &[protobuf, snappy, version], &leak).await,
            403,
            "deny pattern",
        ),
        (
            "no version header",
            post(&proxy, &rw, &[protobuf, snappy], &payload).await,
            422,
            "x-prometheus-remote-write-version",
        ),
        (
            "JSON",
            post(&proxy, &rw, &[json, version], POSTBACK.as_bytes()).await,
            415,
            "application/x-protobuf",
        ),
    ] {
        assert_refused(&resp, status, needle, &format!("remote_write, {what}"));
    }
    // Over 10 MiB: refused from the Content-Length alone, before a byte of the body is read.
    let head = format!(
        "POST {rw} HTTP/1.1\r\nHost: localhost:{}\r\nContent-Type: application/x-protobuf\r\n\
         Content-Encoding: snappy\r\nX-Prometheus-Remote-Write-Version: 0.1.0\r\n\
         Content-Length: {}\r\n\r\n",
        receiver.port(),
        10 * 1024 * 1024 + 1
    );
    let too_big = raw_exchange(proxy.addr, head.as_bytes()).await;
    assert_eq!(too_big.status, 413, "{too_big:?}");
    let reason = too_big.header("ferry-refusal").unwrap_or_default();
    assert!(reason.contains("limit of 10485760 bytes"), "{reason:?}");
    assert_eq!(receiver.request_count(), 1);

    // saas-api: CONNECT only.
    let saas = upstreams.get("saas-api").unwrap();
    let authority = format!("localhost:{}", saas.port());
    let tunnel = open_tunnel(proxy.addr, &authority).await;
    let req = http::Request::get("/v1/items")
        .header("host", authority.as_str())
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let through = common::http::send_on(tunnel, req)
        .await
        .expect("request through the tunnel");
    assert_eq!(through.status, 200);
    assert_eq!(saas.last().uri, "/v1/items");
    // By address, as the GET to postback above.
    let by_address = format!("http://127.0.0.1:{}/v1/items", saas.port());
    let plain = post(&proxy, &by_address, &[json], b"{}").await;
    assert_refused(&plain, 405, "method POST", "saas-api, absolute-form POST");
    assert_eq!(saas.request_count(), 1);

    let metrics = proxy.metrics().await;
    for (reason, at_least) in [
        ("invalid_payload", 6.0),
        ("deny_pattern", 3.0),
        ("content_type", 3.0),
        ("content_encoding", 1.0),
        ("method_not_allowed", 2.0),
        ("too_large", 1.0),
        ("destination_not_allowed", 2.0),
    ] {
        let n = metric_value(
            &metrics,
            "ferry_egress_rejections_total",
            &[("reason", reason)],
        );
        assert!(
            n.is_some_and(|n| n >= at_least),
            "{reason}: {n:?}\n{metrics}"
        );
    }
}

/// The README's claim that ferry agent's tunnel can go through ferry egress: a CONNECT to the
/// gateway's tunnel address, allowed by one rule; without it the agent never connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ferry_agent_tunnels_through_ferry_egress() {
    use common::servers::{Behaviour, TargetServer};

    let dir = TempDir::new().unwrap();
    let gw = common::ferry::start_gateway(&dir, &[("*", "t")], |_| {}).await;
    let target = TargetServer::start(Behaviour::Metrics("up 1\n".into())).await;
    let resolver = || TestResolver::new(&[("localhost", &["127.0.0.1"])]);

    // No rule for the gateway: the CONNECT is refused and the agent stays out.
    let closed = TestEgress::start(EgressSection::default(), resolver()).await;
    let mut section =
        common::ferry::agent_section(&gw, "behind-egress", &[("node", target.url("/metrics"))]);
    section.proxy_url = Some(format!("http://{}", closed.addr));
    let refused = common::ferry::start_agent(section.clone(), "t");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = closed.metrics().await;
        let n = metric_value(
            &m,
            "ferry_egress_rejections_total",
            &[("reason", "destination_not_allowed")],
        );
        if n.is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never tried the proxy:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.agent_ids().is_empty(), "{:?}", gw.agent_ids());
    refused.stop().await;

    // With `--allow-upstream` for the gateway's tunnel address, it connects and scrapes work.
    let open = TestEgress::start(
        EgressSection {
            allow_upstreams: vec![format!("127.0.0.1/32:{}", gw.tunnel.port())],
            ..EgressSection::default()
        },
        resolver(),
    )
    .await;
    section.proxy_url = Some(format!("http://{}", open.addr));
    let agent = common::ferry::start_agent(section, "t");
    gw.wait_agent("behind-egress", Duration::from_secs(10))
        .await;
    let scrape = format!("http://behind-egress:{}/metrics", target.addr.port());
    let resp = common::http::get_via_proxy(gw.web, &scrape, &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "up 1\n");
    let m = open.metrics().await;
    assert_eq!(
        metric_value(&m, "ferry_egress_open_tunnels", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "ferry_egress_connections_open",
            &[("listener", "upstreams"), ("country", "loopback")]
        ),
        Some(1.0),
        "{m}"
    );
    agent.stop().await;
    gw.stop().await;
}

/// The fenced blocks of the README in language `lang`.
fn readme_blocks(lang: &str) -> Vec<String> {
    let text = readme();
    let fence = format!("```{lang}\n");
    let mut blocks = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("```").expect("closed fence");
        blocks.push(body[..end].to_owned());
        rest = &body[end..];
    }
    blocks
}

fn promtool_check(config: &str, dir: &Path) {
    let file = dir.join("prometheus.yml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new("/usr/bin/promtool")
        .args(["check", "config"])
        .arg(&file)
        .output()
        .expect("run promtool (Debian package prometheus)");
    assert!(
        out.status.success(),
        "promtool rejects the README's snippet:\n{config}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The README's `--web.config.file` example loads, once its placeholders are real: a bcrypt hash
/// and certificate files beside it.
fn web_config_check(block: &str, dir: &Path) {
    let web = dir.join("web");
    std::fs::create_dir_all(&web).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(web.join("web.pem"), cert.pem()).unwrap();
    std::fs::write(web.join("web-key.pem"), key.serialize_pem()).unwrap();
    let hash = bcrypt::hash("secret", 4).unwrap();
    assert!(
        block.contains("$2y$10$..."),
        "the placeholder the README uses: {block}"
    );
    let path = web.join("web.yml");
    std::fs::write(&path, block.replace("$2y$10$...", &hash)).unwrap();
    if let Err(e) = ferry::gateway::web_config::load(&path) {
        panic!("README web config does not load:\n{block}\n{e}");
    }
}

#[test]
fn the_readmes_yaml_snippets_are_valid_configs() {
    let dir = TempDir::new().unwrap();
    let blocks = readme_blocks("yaml");
    assert!(blocks.len() >= 5, "{blocks:?}");
    let mut cookbook = None;
    for block in &blocks {
        if block.starts_with("scrape_configs:") || block.starts_with("remote_write:") {
            promtool_check(block, dir.path());
        } else if block.starts_with("  - job_name:") {
            promtool_check(&format!("scrape_configs:\n{block}"), dir.path());
        } else if block.starts_with("# web.yml") {
            web_config_check(block, dir.path());
        } else {
            let mut cfg = FileConfig::parse(block, "README.md")
                .unwrap_or_else(|e| panic!("README snippet does not parse:\n{block}\n{e}"));
            if cfg.egress.is_some() {
                cookbook = cfg.egress.clone();
                let root = dir.path().join("root");
                let files = reroot(&mut cfg, &root);
                create(&files, dir.path());
                if let Err(e) = cfg.validate("README.md", &|_| None) {
                    panic!("README snippet does not validate:\n{block}\n{e}");
                }
            }
        }
    }
    let cookbook = cookbook.expect("the README has the egress cookbook");
    let example = load("ferry-egress.yaml").egress.unwrap();
    assert_eq!(
        cookbook.rules, example.rules,
        "the README's cookbook is examples/ferry-egress.yaml's rules"
    );
}

/// Rows of the README table whose header line is `header`: the cells of each row.
fn readme_table(header: &str) -> Vec<Vec<String>> {
    let text = readme();
    let start = text
        .find(header)
        .unwrap_or_else(|| panic!("README has no table {header:?}"));
    text[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

fn unquote(cell: &str) -> &str {
    cell.trim_matches('`')
}

#[test]
fn the_readmes_rule_syntax_is_what_the_parser_does() {
    use ferry::egress::policy::Upstream;
    let rows = readme_table("| rule | allows |");
    assert!(rows.len() >= 8, "{rows:?}");
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    for row in rows {
        let rule = unquote(&row[0]);
        let up = Upstream::parse(rule).unwrap_or_else(|e| panic!("README rule {rule}: {e}"));
        let ok = match rule {
            "collector.example.com:443" => {
                up.matches_name("collector.example.com", 443)
                    && !up.matches_name("collector.example.com", 80)
            }
            "collector.example.com" => {
                up.matches_name("collector.example.com", 80)
                    && up.matches_name("collector.example.com", 443)
                    && !up.matches_name("collector.example.com", 8080)
            }
            "collector.example.com:443,8443" => {
                up.matches_name("collector.example.com", 8443)
                    && !up.matches_name("collector.example.com", 80)
            }
            "*.example.com:443" => {
                up.matches_name("a.example.com", 443)
                    && up.matches_name("a.b.example.com", 443)
                    && !up.matches_name("example.com", 443)
            }
            "203.0.113.0/24:80,443" => {
                up.allows_addr(ip("203.0.113.9"), 80) && !up.allows_addr(ip("203.0.114.1"), 80)
            }
            "203.0.113.5:443" => {
                up.allows_addr(ip("203.0.113.5"), 443) && !up.allows_addr(ip("203.0.113.6"), 443)
            }
            "127.0.0.1/32:8080" => up.allows_addr(ip("127.0.0.1"), 8080),
            "[2001:db8::/32]:443" | "[2001:db8::]/32:443" => {
                up.allows_addr(ip("2001:db8::1"), 443) && !up.allows_addr(ip("2001:db8::1"), 80)
            }
            "2001:db8::/32" => {
                up.allows_addr(ip("2001:db8::1"), 80) && up.allows_addr(ip("2001:db8::1"), 443)
            }
            other => panic!("README rule {other}: add what it allows to this test"),
        };
        assert!(
            ok,
            "README rule {rule} does not allow what the README says: {up:?}"
        );
    }
    // And a name rule never reaches a special-purpose address, whatever the name resolves to.
    let by_name = Upstream::parse("collector.example.com:443").unwrap();
    assert!(!by_name.allows_addr(ip("169.254.169.254"), 443));
    assert!(!by_name.allows_addr(ip("::ffff:10.0.0.1"), 443));
}

/// `(status, kind)` of every refusal the egress proxy's code can make, from src/egress/refusal.rs
/// (`Self::new(StatusCode::X, "kind", …)`).
fn refusal_kinds_in_code() -> std::collections::BTreeSet<(u16, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/egress/refusal.rs");
    let code = read(&path);
    code.split("Self::new(")
        .skip(1)
        .map(|call| {
            let mut args = call.splitn(3, ',').map(str::trim);
            let status = args
                .next()
                .unwrap()
                .strip_prefix("StatusCode::")
                .expect("a StatusCode");
            let kind = args.next().unwrap().trim_matches('"').to_owned();
            let code = (100..600)
                .filter_map(|n| http::StatusCode::from_u16(n).ok())
                .find(|s| {
                    s.canonical_reason()
                        .is_some_and(|r| r.to_uppercase().replace([' ', '-'], "_") == status)
                })
                .unwrap_or_else(|| panic!("unknown status {status}"));
            (code.as_u16(), kind)
        })
        .collect()
}

#[test]
fn the_readmes_refusal_table_is_the_codes() {
    let rows = readme_table("| status | `reason` | when |");
    let documented: std::collections::BTreeSet<(u16, String)> = rows
        .iter()
        .map(|row| {
            let status: u16 = row[0].split_whitespace().next().unwrap().parse().unwrap();
            let reason = http::StatusCode::from_u16(status)
                .unwrap()
                .canonical_reason()
                .unwrap();
            assert_eq!(
                row[0],
                format!("{status} {reason}"),
                "status as the client sees it"
            );
            (status, unquote(&row[1]).to_owned())
        })
        .collect();
    assert_eq!(documented, refusal_kinds_in_code());
}
