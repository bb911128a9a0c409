//! Every file shipped in `examples/` works as shipped: each ferry config parses (field names are
//! checked by `deny_unknown_fields`) and validates once the files it names exist; prometheus.yml
//! passes the real `promtool`; the systemd units agree with the configs; the README's snippets
//! and flag reference match the examples and the binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry::config::{example_paths, FileConfig, RunConfig};
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
        g.data_dir = below(root, &g.data_dir);
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

/// Creates each file with content of its kind: a tokens file accepting `TOKEN` for any id, the
/// token, and one real certificate and key pair (the gateway's own check loads the pair).
fn create(files: &[(PathBuf, Kind)], scratch: &Path) {
    let identity_dir = scratch.join("identity");
    self_signed_identity(&identity_dir, &["gateway.example.com".into()], None)
        .expect("generate a certificate");
    for (path, kind) in files {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        match kind {
            Kind::Tokens => std::fs::write(path, format!("* {}\n", hash_token(TOKEN))).unwrap(),
            Kind::Token => std::fs::write(path, format!("{TOKEN}\n")).unwrap(),
            Kind::JsonSchema => std::fs::write(path, r#"{"type": "object"}"#).unwrap(),
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
    }
    let gateway = directives("ferry-gateway.service");
    assert_eq!(
        directive(&gateway, "StateDirectory"),
        ["ferry"],
        "data_dir /var/lib/ferry"
    );
    let data_dir = load("ferry-gateway.yaml").gateway.unwrap().data_dir;
    assert_eq!(
        data_dir,
        Path::new("/var/lib/ferry"),
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
    for sub in ["gateway", "agent"] {
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
fn start_agent(
    registry: Registry,
    gateway: &str,
    fingerprint: &str,
    token: &str,
) -> Result<Agent, Box<dyn std::error::Error>> {
    let mut section = AgentSection {
        gateway: Some(gateway.to_owned()),
        agent_id: Some("billing-7".to_owned()),
        ..AgentSection::default()
    };
    section.tunnel.fingerprint = Some(fingerprint.to_owned());
    // Environment lookups (FERRY_TOKEN, HTTPS_PROXY) go through this closure.
    let token = token.to_owned();
    let env = move |name: &str| (name == "FERRY_TOKEN").then(|| token.clone());
    let mut errs = ConfigErrors::new("billing");
    let config = section.validate("agent", &env, &mut errs);
    let config = errs.finish(config)?.ok_or("invalid agent configuration")?;
    let agent = Agent::with_registry(config, registry)?;
    tokio::spawn(agent.clone().run(CancellationToken::new()));
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
    let agent =
        start_agent(registry, &gateway, &gw.fingerprint(), "app-token").expect("the agent starts");
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
    for (role, resp) in [("gateway", from_gateway), ("agent", from_agent)] {
        assert_eq!(resp.status, 200);
        let exposition = resp.text();
        let listed = readme_metrics(role);
        assert!(
            listed.len() >= 5,
            "README lists the {role} metrics: {listed:?}"
        );
        for name in listed {
            // OpenMetrics names a counter's family without `_total`.
            let family = name.strip_suffix("_total").unwrap_or(&name);
            assert!(
                exposition.contains(&format!("# TYPE {family} ")),
                "README lists {name}, the {role} does not export it:\n{exposition}"
            );
        }
    }
    agent.stop().await;
    gw.stop().await;
}
