//! The `ferry` binary as a user runs it: what it prints, its exit codes, and that configuration
//! mistakes come back as one line each (file, field, problem) with exit code 2 and never a panic.
//! Ends with `ferry quickstart`, followed exactly as its printed instructions say.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry::gateway::auth::{hash_token, TokensFile};
use tempfile::TempDir;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// Exit code for configuration errors.
const EXIT_CONFIG: i32 = 2;

/// `ferry <args>` in `dir` with no ferry-related environment; killed if it runs for 20 s.
fn ferry(dir: &Path, args: &[&str]) -> Output {
    let mut child = command(dir, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait for ferry").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ferry {args:?} still running after 20s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("collect ferry's output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "ferry {args:?} panicked:\n{stderr}"
    );
    out
}

fn command(dir: &Path, args: &[&str]) -> Command {
    with_ferry_args(Command::new(FERRY), dir, args)
}

/// `cmd` (ferry, or a program that runs it) given `args`, in `dir`, with no ferry-related
/// environment.
fn with_ferry_args(mut cmd: Command, dir: &Path, args: &[&str]) -> Command {
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .env_remove("FERRY_TOKEN")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("RUST_LOG");
    cmd
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one line a configuration error prints, after checking that it is the only one and that
/// the exit code is 2.
fn one_config_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let mut lines = stderr_lines(out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    lines.remove(0)
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A valid tokens file accepting `token` for any agent id.
fn tokens_file(dir: &Path, token: &str) -> PathBuf {
    write(dir, "tokens", &format!("# test\n* {}\n", hash_token(token)))
}

/// `ferry agent` with a gateway, the id `node-1` and the token file `agent-token`, then `more`.
fn agent_flags<'a>(more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "agent",
        "--gateway",
        "https://gw.example.com:7443",
        "--agent-id",
        "node-1",
        "--token-file",
        "agent-token",
    ];
    args.extend_from_slice(more);
    args
}

/// `(token, tokens-file line)` from `ferry token new` output.
fn parse_token_new(out: &str) -> (String, String) {
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .map(|t| t.trim().to_owned())
        .unwrap_or_else(|| panic!("no `token:` line in:\n{out}"));
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("tokens-file line:"))
        .map(|t| t.trim().to_owned())
        .unwrap_or_else(|| panic!("no `tokens-file line:` in:\n{out}"));
    (token, line)
}

#[test]
fn token_new_prints_a_token_and_the_line_that_accepts_it() {
    let dir = TempDir::new().unwrap();
    let out = ferry(dir.path(), &["token", "new"]);
    // Without --agent-id the line accepts every id: said, so that it is not made by accident.
    let warned = stderr_lines(&out).join("\n");
    assert!(
        warned.contains("may claim any agent id") && warned.contains("--agent-id"),
        "{out:?}"
    );
    assert!(out.status.success(), "{out:?}");
    let (token, line) = parse_token_new(&stdout(&out));
    assert!(
        is_hex64(&token),
        "token {token:?} is not 64 lowercase hex digits"
    );
    let hash = line
        .strip_prefix("* sha256:")
        .unwrap_or_else(|| panic!("line {line:?} is not `* sha256:<hex>`"));
    assert!(is_hex64(hash), "{line:?}");
    assert_eq!(
        line,
        format!("* {}", hash_token(&token)),
        "the line is the token's hash"
    );

    // The printed line, pasted into a tokens file, lets that token claim any id.
    let path = write(dir.path(), "tokens", &format!("{line}\n"));
    let file = TokensFile::load(&path).unwrap();
    assert!(file.authorize(&token, "node-1").is_ok());
    assert!(file.authorize("another-token", "node-1").is_err());
}

#[test]
fn token_new_restricts_the_line_to_an_agent_id_glob() {
    let dir = TempDir::new().unwrap();
    let out = ferry(dir.path(), &["token", "new", "--agent-id", "node-*"]);
    assert!(out.status.success(), "{out:?}");
    let (token, line) = parse_token_new(&stdout(&out));
    assert_eq!(line, format!("node-* {}", hash_token(&token)));
    assert!(
        !stderr_lines(&out)
            .join(" ")
            .contains("may claim any agent id"),
        "{out:?}"
    );
    let again = parse_token_new(&stdout(&ferry(dir.path(), &["token", "new"]))).0;
    assert_ne!(token, again, "every token is new");
}

/// The egress proxy checks `Proxy-Authorization: Bearer` as the name `bearer`: the advice offers
/// Bearer only for a line whose glob matches that name, as the line it printed then behaves.
#[test]
fn token_new_offers_egress_bearer_only_when_the_glob_matches_bearer() {
    let dir = TempDir::new().unwrap();
    for (glob, bearer) in [
        ("*", true),
        ("bear*", true),
        ("alice", false),
        ("node-*", false),
    ] {
        let out = ferry(dir.path(), &["token", "new", "--agent-id", glob]);
        assert!(out.status.success(), "{out:?}");
        let (token, line) = parse_token_new(&stdout(&out));
        let file = TokensFile::parse(&line).unwrap();
        assert_eq!(file.authorize(&token, "bearer").is_ok(), bearer, "{glob}");
        let lines = stderr_lines(&out);
        let advice = lines
            .iter()
            .find(|l| l.starts_with("For an egress client"))
            .unwrap_or_else(|| panic!("{glob}: no egress advice in {lines:?}"));
        assert_eq!(
            advice.contains("as Proxy-Authorization: Bearer"),
            bearer,
            "{glob}: {advice}"
        );
        assert!(advice.contains("Basic"), "{glob}: {advice}");
    }
}

#[test]
fn token_new_refuses_a_glob_the_tokens_file_would_refuse() {
    let dir = TempDir::new().unwrap();
    for (glob, says) in [
        ("node 1", "holds whitespace"),
        ("", "an agent id glob is required"),
        ("node-[", "invalid glob"),
        // The tokens file would read the line as a comment, or cut it at the '#'.
        (
            "#node",
            "starts with '#': the tokens file reads that line as a comment",
        ),
        ("node#1", "holds '#'"),
    ] {
        let out = ferry(dir.path(), &["token", "new", "--agent-id", glob]);
        assert_eq!(out.status.code(), Some(2), "{glob:?}: {out:?}");
        assert!(
            stdout(&out).is_empty(),
            "{glob:?}: no token printed: {out:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{glob:?}: one line: {err}");
        assert!(
            err.starts_with("ferry token new: --agent-id: ") && err.contains(says),
            "{glob:?}: {err}"
        );
    }
    // The advice is on stderr: stdout is the two lines a script keeps.
    let out = ferry(dir.path(), &["token", "new"]);
    assert_eq!(stdout(&out).lines().count(), 2, "{out:?}");
}

/// A complete gateway + agent file whose referenced files exist in `dir`.
fn good_config(dir: &Path) -> PathBuf {
    tokens_file(dir, "s3cret");
    write(dir, "agent-token", "s3cret\n");
    // As openssl prints it (uppercase, colon-separated): the README says it can be pasted.
    let fingerprint = format!("sha256:{}AB", "AB:".repeat(31));
    let text = format!(
        "gateway:
  web:
    listen_address: 127.0.0.1:0
  tunnel:
    listen_address: 127.0.0.1:0
  data_dir: data
  auth:
    tokens_file: tokens
agent:
  gateway: https://127.0.0.1:7443
  agent_id: node-1
  token_file: agent-token
  tunnel:
    fingerprint: {fingerprint}
  targets:
    - name: node
      url: http://127.0.0.1:9100/metrics
"
    );
    write(dir, "ferry.yaml", &text)
}

#[test]
fn check_config_accepts_a_good_file() {
    let dir = TempDir::new().unwrap();
    good_config(dir.path());
    let out = ferry(dir.path(), &["check-config", "ferry.yaml"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("ferry.yaml: OK"), "{}", stdout(&out));
    assert!(stdout(&out).contains("gateway, agent"), "{}", stdout(&out));
    assert!(
        !dir.path().join("data").exists(),
        "check-config writes nothing (no certificate)"
    );
}

/// As Prometheus reads its own file: a unit started in `/` finds `tokens` beside its config.
#[test]
fn relative_paths_in_the_file_are_read_from_the_files_directory() {
    let dir = TempDir::new().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    good_config(&etc);
    let out = ferry(dir.path(), &["check-config", "etc/ferry.yaml"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("etc/ferry.yaml: OK"), "{out:?}");

    // A missing file is named as it was looked for, below the file's directory.
    std::fs::remove_file(etc.join("tokens")).unwrap();
    let out = ferry(dir.path(), &["check-config", "etc/ferry.yaml"]);
    let line = one_config_error(&out);
    assert!(
        line.starts_with("etc/ferry.yaml: gateway.auth.tokens_file: ")
            && line.contains("etc/tokens"),
        "{line}"
    );
}

#[test]
fn check_config_reports_every_error_at_once_one_line_each() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "agent-token", "s3cret\n");
    let text = "gateway:
  auth:
    tokens_file: missing-tokens
  tunnel:
    max_pending_handshakes_per_ip: 0
agent:
  gateway: https://gateway.example.com:7443
  agent_id: node-1
  token_file: agent-token
  tunnel:
    fingerprint: sha256:not-hex
  targets:
    - name: ok
      url: http://127.0.0.1:9100/metrics
    - name: nohost
      url: http://:9100/metrics
";
    write(dir.path(), "bad.yaml", text);
    let out = ferry(dir.path(), &["check-config", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    assert!(!stdout(&out).contains("OK"));
    let lines = stderr_lines(&out);
    let expected = [
        ("gateway.auth.tokens_file", "missing-tokens"),
        (
            "gateway.tunnel.max_pending_handshakes_per_ip",
            "must be greater than 0",
        ),
        ("agent.tunnel.fingerprint", "sha256:not-hex"),
        ("agent.targets[1].url", "has no host"),
    ];
    assert_eq!(
        lines.len(),
        expected.len(),
        "one line per error, all of them:\n{}",
        lines.join("\n")
    );
    for (field, detail) in expected {
        let prefix = format!("bad.yaml: {field}: ");
        let line = lines
            .iter()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| {
                panic!("no line starting with {prefix:?} in:\n{}", lines.join("\n"))
            });
        assert!(line.contains(detail), "{line}");
    }
}

#[test]
fn check_config_names_an_unknown_field_with_its_path_and_line() {
    let dir = TempDir::new().unwrap();
    tokens_file(dir.path(), "s3cret");
    write(
        dir.path(),
        "typo.yaml",
        "gateway:\n  auth:\n    tokens_file: tokens\n  web:\n    listen_adress: \":8080\"\n",
    );
    let out = ferry(dir.path(), &["check-config", "typo.yaml"]);
    let line = one_config_error(&out);
    for needle in [
        "typo.yaml",
        "gateway.web",
        "unknown field `listen_adress`",
        "listen_address",
        "line 5",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
    }
}

#[test]
fn check_config_and_run_name_a_missing_file() {
    let dir = TempDir::new().unwrap();
    for args in [
        &["check-config", "nope.yaml"][..],
        &["run", "--config.file", "nope.yaml"],
    ] {
        let out = ferry(dir.path(), args);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{args:?}: {out:?}");
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("nope.yaml: cannot read"), "{lines:?}");
    }
}

#[test]
fn a_file_without_any_role_is_an_error() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "empty.yaml", "log:\n  level: info\n");
    let out = ferry(dir.path(), &["check-config", "empty.yaml"]);
    let line = one_config_error(&out);
    assert!(
        line.starts_with("empty.yaml: no role configured: add a gateway:"),
        "{line}"
    );
}

/// Two listeners on one address would pass check-config and then fail the second bind at
/// every start (a service manager restarting ferry forever): both are named, exit 2, by
/// check-config and run alike, before anything listens.
#[test]
fn listeners_sharing_an_address_are_a_configuration_error() {
    let dir = TempDir::new().unwrap();
    tokens_file(dir.path(), "s3cret");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    drop(held);
    write(
        dir.path(),
        "dup.yaml",
        &format!(
            "gateway:
  auth: {{ tokens_file: tokens }}
  web: {{ listen_address: '127.0.0.1:{port}' }}
  tunnel: {{ listen_address: '127.0.0.1:{port}' }}
exporter:
  web: {{ listen_address: '127.0.0.1:{port}' }}
  collector: {{ connections: true }}
"
        ),
    );
    let want = [
        format!("dup.yaml: gateway.tunnel.listen_address: 127.0.0.1:{port} is already taken by web.listen_address: each listener needs an address of its own"),
        format!("dup.yaml: exporter.web.listen_address: 127.0.0.1:{port} is already taken by gateway.web.listen_address and gateway.tunnel.listen_address: each listener needs an address of its own"),
    ];
    for args in [
        &["check-config", "dup.yaml"][..],
        &["run", "--config.file", "dup.yaml"],
    ] {
        let out = ferry(dir.path(), args);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{args:?}: {out:?}");
        assert_eq!(stderr_lines(&out), want, "{args:?}");
    }
    assert!(!dir.path().join("data").exists(), "nothing was started");
}

/// An address another process holds fails at start: the line names the file and the field (or
/// the flag) that set it, as a configuration error would.
#[test]
fn a_listen_address_in_use_is_named_by_its_file_and_field() {
    let dir = TempDir::new().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    write(
        dir.path(),
        "busy.yaml",
        &format!("exporter:\n  web: {{ listen_address: '{addr}' }}\n  collector: {{ connections: true }}\n"),
    );
    let out = ferry(dir.path(), &["run", "--config.file", "busy.yaml"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = stderr_lines(&out);
    let want = format!("busy.yaml: exporter.web.listen_address: cannot listen on {addr}: ");
    assert!(
        lines.last().is_some_and(|l| l.starts_with(&want)),
        "{lines:#?}"
    );
    let out = ferry(
        dir.path(),
        &[
            "exporter",
            "--collector.connections",
            "--web.listen-address",
            &addr.to_string(),
        ],
    );
    let lines = stderr_lines(&out);
    let want = format!("--web.listen-address: cannot listen on {addr}: ");
    assert!(
        lines.last().is_some_and(|l| l.starts_with(&want)),
        "{lines:#?}"
    );
    // In a JSON log the last line is a JSON record as well: a pipeline parsing every line
    // gets the reason too.
    let out = ferry(
        dir.path(),
        &[
            "exporter",
            "--collector.connections",
            "--log.format",
            "json",
            "--web.listen-address",
            &addr.to_string(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = stderr_lines(&out);
    for line in &lines {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR", "{last}");
    assert_eq!(last["fields"]["message"], "cannot start", "{last}");
    assert!(
        last["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with(&want)),
        "{last}"
    );
}

/// Plaintext tunnels have no TLS to ask agents for a client certificate in: a client CA with
/// them would leave mTLS silently unenforced, so it is refused, in a file and by flags.
#[test]
fn a_client_ca_with_plaintext_tunnels_is_refused() {
    let dir = TempDir::new().unwrap();
    tokens_file(dir.path(), "s3cret");
    write(dir.path(), "ca.pem", "");
    write(
        dir.path(),
        "ip.yaml",
        "gateway:\n  auth: { tokens_file: tokens }\n  tunnel: { insecure_plaintext: true, tls_client_ca_file: ca.pem }\n",
    );
    let out = ferry(dir.path(), &["check-config", "ip.yaml"]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    assert_eq!(
        stderr_lines(&out),
        ["ip.yaml: gateway.tunnel.tls_client_ca_file: set, but tunnel.insecure_plaintext turns TLS off: remove one of them"]
    );
    let out = gateway(
        dir.path(),
        &[
            "--auth.tokens-file",
            "tokens",
            "--tunnel.insecure-plaintext",
            "--tunnel.tls-client-ca-file",
            "ca.pem",
        ],
    );
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    assert_eq!(
        stderr_lines(&out),
        ["invalid flag --tunnel.tls-client-ca-file: set, but --tunnel.insecure-plaintext turns TLS off: remove one of them"]
    );
}

/// The database's file watch cannot tick every 0 s: check-config says so instead of the started
/// process panicking in it.
#[test]
fn a_geoip_reload_interval_under_a_second_is_refused() {
    let dir = TempDir::new().unwrap();
    for interval in ["0s", "500ms"] {
        let text = format!(
            "exporter:\n  collector:\n    connections: true\ngeoip:\n  reload_interval: {interval}\n"
        );
        write(dir.path(), "geo.yaml", &text);
        let out = ferry(dir.path(), &["check-config", "geo.yaml"]);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{interval}: {out:?}");
        assert_eq!(
            stderr_lines(&out),
            [format!(
                "geo.yaml: geoip.reload_interval: must be from 1s to 1y, not {interval}"
            )],
            "{interval}"
        );
    }
}

/// A zero backoff would redial in a busy loop after a refused token, and a duration of centuries
/// made every tunnel handshake panic adding it to the clock: both are refused up front, one line
/// each naming the field (or flag) and the range, as are a repeated --label and a tracing filter
/// that does not parse.
#[test]
fn durations_out_of_range_are_refused_naming_the_range() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "agent-token", "s3cret\n");
    let text = "agent:
  gateway: https://gw.example.com:7443
  agent_id: node-1
  token_file: agent-token
  tunnel: { handshake_timeout: 2562047788015215h }
  reconnect: { min_backoff: 0s, auth_failure_backoff: 0, max_backoff: 1ms }
  scrape_timeout_max: 2y
";
    write(dir.path(), "a.yaml", text);
    let out = ferry(dir.path(), &["check-config", "a.yaml"]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    assert_eq!(
        stderr_lines(&out),
        [
            "a.yaml: agent.tunnel.handshake_timeout: \"2562047788015215h\" is too long: at most 1y at line 5 column 32",
            "a.yaml: agent.scrape_timeout_max: must be from 100ms to 1y, not 2y",
            "a.yaml: agent.reconnect.min_backoff: must be from 100ms to 1y, not 0s",
            "a.yaml: agent.reconnect.auth_failure_backoff: must be from 1s to 1y, not 0s",
            "a.yaml: agent.reconnect.max_backoff: must be from 100ms to 1y, not 1ms",
        ]
    );

    let out = ferry(dir.path(), &["egress", "--upstream-timeout", "0s"]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    assert_eq!(
        stderr_lines(&out),
        ["invalid flag --upstream-timeout: must be from 100ms to 1y, not 0s"]
    );

    let out = ferry(
        dir.path(),
        &agent_flags(&["--label", "x=1", "--label", "x=2", "--log.level", "a=b=c"]),
    );
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        lines[0],
        "invalid flag --label: \"x\" is given twice (x=1, then x=2)"
    );
    assert!(
        lines[1].starts_with("invalid flag --log.level: \"a=b=c\" is not a level"),
        "{lines:?}"
    );
}

/// `ferry gateway` on loopback port 0 with `extra` flags: it must exit before serving.
fn gateway(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "gateway",
        "--web.listen-address",
        "127.0.0.1:0",
        "--tunnel.listen-address",
        "127.0.0.1:0",
        "--data-dir",
        "data",
    ];
    args.extend_from_slice(extra);
    ferry(dir, &args)
}

#[test]
fn gateway_with_an_unreadable_certificate_exits_2_naming_the_file() {
    let dir = TempDir::new().unwrap();
    tokens_file(dir.path(), "s3cret");
    write(
        dir.path(),
        "tunnel.key",
        "not read: the certificate fails first\n",
    );
    let out = gateway(
        dir.path(),
        &[
            "--auth.tokens-file",
            "tokens",
            "--tunnel.tls-cert-file",
            "missing.crt",
            "--tunnel.tls-key-file",
            "tunnel.key",
        ],
    );
    let line = one_config_error(&out);
    assert!(line.contains("--tunnel.tls-cert-file"), "{line}");
    assert!(line.contains("missing.crt"), "{line}");
}

#[test]
fn gateway_with_a_malformed_tokens_file_names_the_line() {
    let dir = TempDir::new().unwrap();
    let good = format!("* {}", hash_token("s3cret"));
    write(
        dir.path(),
        "tokens",
        &format!("# agents\n{good}\nnode-1 deadbeef\n"),
    );
    let out = gateway(dir.path(), &["--auth.tokens-file", "tokens"]);
    let line = one_config_error(&out);
    for needle in [
        "--auth.tokens-file",
        "tokens file tokens",
        "line 3",
        "sha256:",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }
}

#[test]
fn gateway_without_a_tokens_file_says_how_to_make_one() {
    let dir = TempDir::new().unwrap();
    let out = gateway(dir.path(), &[]);
    let line = one_config_error(&out);
    assert!(
        line.contains("--auth.tokens-file") && line.contains("ferry token new"),
        "{line}"
    );
}

#[test]
fn agent_target_without_a_name_is_a_usage_error() {
    let dir = TempDir::new().unwrap();
    let out = ferry(dir.path(), &["agent", "--target", "foo"]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--target") && err.contains("NAME=URL"),
        "{err}"
    );
}

#[test]
fn agent_refuses_a_plaintext_gateway_without_the_insecure_flag() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "agent-token", "s3cret\n");
    let out = ferry(
        dir.path(),
        &[
            "agent",
            "--gateway",
            "http://x:1",
            "--agent-id",
            "node-1",
            "--token-file",
            "agent-token",
            "--target",
            "node=http://127.0.0.1:9100/metrics",
        ],
    );
    let line = one_config_error(&out);
    assert!(line.contains("--gateway"), "{line}");
    assert!(line.contains("--tunnel.insecure-plaintext"), "{line}");
}

#[test]
fn agent_reports_every_flag_problem_at_once() {
    let dir = TempDir::new().unwrap();
    let out = ferry(
        dir.path(),
        &[
            "agent",
            "--gateway",
            "https://gw.example.com:7443",
            "--agent-id",
            "node-1",
            "--tunnel.fingerprint",
            "sha256:12",
            "--target",
            "a=ftp://x/metrics",
        ],
    );
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(
        lines.len(),
        3,
        "token, fingerprint, target:\n{}",
        lines.join("\n")
    );
    for flag in [
        "invalid flag --token-file:",
        "invalid flag --tunnel.fingerprint:",
        "invalid flag --target:",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(flag)),
            "{flag:?} not in:\n{}",
            lines.join("\n")
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("FERRY_TOKEN")),
        "the token error names the alternative"
    );
}

/// Prometheus asks for a target's path decoded and encoded again: a path it could not ask for,
/// or could not tell from another target's, stops the agent with one line naming the target.
#[test]
fn agent_refuses_target_paths_prometheus_cannot_tell_apart() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "agent-token", "s3cret\n");
    let out = ferry(
        dir.path(),
        &agent_flags(&[
            "--target",
            "slash=http://127.0.0.1:9100/a%2Fb/metrics",
            "--target",
            "bang=http://127.0.0.1:9100/x!y/metrics",
            "--target",
            "bang2=http://127.0.0.1:9100/x%21y/metrics",
        ]),
    );
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 2, "{}", lines.join("\n"));
    assert!(
        lines[0].starts_with(
            "invalid flag --target: target \"slash\": path \"/a%2Fb/metrics\" has an encoded \"/\""
        ),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("path \"/x%21y/metrics\" is already taken by target \"bang\""),
        "{}",
        lines[1]
    );
}

/// `job` and `instance` say which scrape a series came from, like `ferry_agent` and
/// `ferry_target`: an agent may not set them, on the command line or per target.
#[test]
fn agent_labels_cannot_set_job_instance_or_ferrys_own() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "agent-token", "s3cret\n");
    let out = ferry(
        dir.path(),
        &agent_flags(&[
            "--target",
            "node=http://127.0.0.1:9100/metrics",
            "--label",
            "job=node-exporter",
            "--label",
            "instance=node-1:30440",
            "--label",
            "site=berlin",
        ]),
    );
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 2, "{}", lines.join("\n"));
    for name in ["instance", "job"] {
        assert!(
            lines.iter().any(|l| l.starts_with("invalid flag --label:")
                && l.contains(&format!("\"{name}\" is reserved"))),
            "{name} not refused in:\n{}",
            lines.join("\n")
        );
    }

    let text = "agent:
  gateway: https://gw.example.com:7443
  agent_id: node-1
  token_file: agent-token
  targets:
    - name: node
      url: http://127.0.0.1:9100/metrics
      labels: { ferry_target: other, instance: elsewhere, team: db }
";
    write(dir.path(), "labels.yaml", text);
    let out = ferry(dir.path(), &["check-config", "labels.yaml"]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 2, "{}", lines.join("\n"));
    for name in ["ferry_target", "instance"] {
        let prefix = format!("labels.yaml: agent.targets[0].labels.{name}: ");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&prefix) && l.contains("reserved")),
            "{prefix:?} not in:\n{}",
            lines.join("\n")
        );
    }
}

/// The gateway repeats the agent's labels in every target's group of `/targets`: a list well
/// within what the gateway reads can still be more than it publishes for one agent. The agent's
/// configuration check says so, one line naming the field, and passes the same labels on fewer
/// targets.
#[test]
fn check_config_refuses_targets_and_labels_too_large_for_service_discovery() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "agent-token", "s3cret\n");
    let config = |targets: u16| {
        let mut text = format!(
            "agent:
  gateway: https://gw.example.com:7443
  agent_id: node-1
  token_file: agent-token
  labels: {{ note: {} }}
  targets:
",
            "x".repeat(10_000)
        );
        for port in 1..=targets {
            text.push_str(&format!(
                "    - {{ name: t{port}, url: \"http://127.0.0.1:{port}/metrics\" }}\n"
            ));
        }
        text
    };
    write(dir.path(), "fits.yaml", &config(150));
    let out = ferry(dir.path(), &["check-config", "fits.yaml"]);
    assert!(out.status.success(), "{out:?}");

    write(dir.path(), "big.yaml", &config(250));
    let out = ferry(dir.path(), &["check-config", "big.yaml"]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{}", lines.join("\n"));
    assert!(
        lines[0].starts_with("big.yaml: agent.targets: the targets and labels take ")
            && lines[0].contains("service discovery")
            && lines[0].contains("(2048 KiB)"),
        "{}",
        lines[0]
    );
}

/// Kills the child when dropped, so a failing test leaves no process behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Collects lines of `reader` on a thread and forwards them.
fn forward_lines(
    reader: impl Read + Send + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `(proxy address, url)` from the printed `curl -x http://A URL` line.
fn parse_curl_proxy_line(line: &str) -> Option<(SocketAddr, String)> {
    let rest = line.trim().strip_prefix("curl -x http://")?;
    let (proxy, url) = rest.split_once(' ')?;
    Some((proxy.parse().ok()?, url.trim().to_owned()))
}

/// A running `ferry quickstart` and what it printed, up to the last line of its instructions.
struct Quickstart {
    child: KillOnDrop,
    printed: Vec<String>,
    /// Kept open like a terminal: quickstart prints more after the lines the tests wait for.
    _out: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
    err: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Quickstart {
    /// `ferry quickstart <args>` in `dir`, once it has printed its instructions (20 s at most).
    async fn start(mut cmd: Command) -> Quickstart {
        let mut child = KillOnDrop(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn quickstart"),
        );
        let mut out = forward_lines(child.0.stdout.take().unwrap());
        let err = forward_lines(child.0.stderr.take().unwrap());
        let mut printed = Vec::new();
        let wait = async {
            while let Some(line) = out.recv().await {
                printed.push(line.clone());
                if line.trim_start().starts_with("curl http://")
                    && line.trim_end().ends_with("/targets")
                {
                    return true;
                }
            }
            false
        };
        let started = tokio::time::timeout(Duration::from_secs(20), wait).await;
        let mut qs = Quickstart {
            child,
            printed,
            _out: Some(out),
            err,
        };
        if started != Ok(true) {
            // Lets the stderr of an exited quickstart reach the channel.
            tokio::time::sleep(Duration::from_millis(100)).await;
            panic!(
                "quickstart printed no instructions (within 20s); stdout:\n{}\nstderr:\n{}",
                qs.printed.join("\n"),
                qs.stderr_so_far()
            );
        }
        qs
    }

    fn stderr_so_far(&mut self) -> String {
        let mut s = String::new();
        while let Ok(l) = self.err.try_recv() {
            s.push_str(&l);
            s.push('\n');
        }
        s
    }

    /// The data directory it printed.
    fn data_dir(&self) -> PathBuf {
        self.printed
            .iter()
            .find_map(|l| l.trim().strip_prefix("data dir"))
            .map(|d| PathBuf::from(d.trim()))
            .unwrap_or_else(|| panic!("no data dir in:\n{}", self.printed.join("\n")))
    }

    /// Does the printed `curl -x` scrape twice, exactly as printed: an absolute-form GET through
    /// the gateway as a proxy, answered by the demo target through the tunnel. Returns the URL.
    async fn scrape_demo_as_printed(&self) -> String {
        let text = self.printed.join("\n");
        let (proxy, scrape_url) = self
            .printed
            .iter()
            .find_map(|l| parse_curl_proxy_line(l))
            .unwrap_or_else(|| panic!("no `curl -x http://A URL` line in:\n{text}"));
        assert!(
            scrape_url.starts_with("http://quickstart:") && scrape_url.ends_with("/metrics"),
            "{scrape_url}"
        );
        for expected_count in [1.0, 2.0] {
            let resp = common::http::get_via_proxy(proxy, &scrape_url, &[]).await;
            assert_eq!(
                resp.status,
                200,
                "{scrape_url} via {proxy}: {}",
                resp.text()
            );
            let body = resp.text();
            let value = common::ferry::metric_value(&body, "demo_scrapes_total", &[]);
            assert_eq!(
                value,
                Some(expected_count),
                "each scrape reaches the demo target once:\n{body}"
            );
        }
        scrape_url
    }

    /// Sends `signal` and waits for the exit: how long it took, and the exit status.
    async fn stop(&mut self, signal: &str) -> (Duration, std::process::ExitStatus) {
        let pid = self.child.0.id().to_string();
        let killed = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(killed.success());
        let sent = Instant::now();
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return (sent.elapsed(), status);
            }
            assert!(
                sent.elapsed() < Duration::from_secs(15),
                "quickstart ignored kill {signal}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `ferry quickstart` on these addresses in `dir`, with `dir/tmp` as its TMPDIR.
fn quickstart_command(dir: &Path, web: &str, tunnel: &str, extra: &[&str]) -> Command {
    let mut args = vec![
        "quickstart",
        "--web.listen-address",
        web,
        "--tunnel.listen-address",
        tunnel,
    ];
    args.extend_from_slice(extra);
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut cmd = command(dir, &args);
    cmd.env("TMPDIR", tmp);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_does_what_it_prints() {
    let dir = TempDir::new().unwrap();
    let data_dir = dir.path().join("qs");
    let data_arg = ["--data-dir", data_dir.to_str().unwrap()];
    let cmd = quickstart_command(dir.path(), "127.0.0.1:0", "127.0.0.1:0", &data_arg);
    let mut qs = Quickstart::start(cmd).await;
    let printed = qs.printed.clone();
    let text = printed.join("\n");
    let scrape_url = qs.scrape_demo_as_printed().await;

    // Service discovery, at the URL it printed.
    let targets_url = printed
        .iter()
        .map(|l| l.trim())
        .find_map(|l| l.strip_prefix("curl ").filter(|u| u.ends_with("/targets")))
        .unwrap()
        .to_owned();
    let resp = common::http::get(&targets_url).await;
    assert_eq!(resp.status, 200, "{targets_url}");
    let groups: serde_json::Value = serde_json::from_slice(&resp.body).expect("http_sd JSON");
    let demo_port = scrape_url
        .trim_start_matches("http://quickstart:")
        .trim_end_matches("/metrics");
    let demo = groups
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["labels"]["ferry_target"] == "demo")
        .unwrap_or_else(|| panic!("no demo target in {groups}"));
    assert_eq!(
        demo["targets"],
        serde_json::json!([format!("quickstart:{demo_port}")])
    );
    assert_eq!(demo["labels"]["ferry_agent"], "quickstart");
    assert_eq!(demo["labels"]["__metrics_path__"], "/metrics");
    assert!(
        groups
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["labels"]["ferry_target"] == "ferry"),
        "the agent's own metrics are listed: {groups}"
    );

    // The certificate and tokens file went to --data-dir.
    assert!(data_dir.join("tokens").exists(), "{}", data_dir.display());
    assert!(
        text.contains(&format!("data dir        {}", data_dir.display())),
        "{text}"
    );

    assert!(
        qs.child.0.try_wait().unwrap().is_none(),
        "quickstart keeps running until Ctrl-C"
    );
    let stderr = qs.stderr_so_far();
    drop(qs);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // A first-time user's first run warns about nothing (its fresh certificate included).
    assert!(
        !stderr.contains("level=warn") && !stderr.contains("level=error"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_removes_its_temporary_directory_on_ctrl_c() {
    quickstart_removes_its_temporary_directory_on("-INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_removes_its_temporary_directory_on_sigterm() {
    quickstart_removes_its_temporary_directory_on("-TERM").await;
}

async fn quickstart_removes_its_temporary_directory_on(signal: &str) {
    let dir = TempDir::new().unwrap();
    let cmd = quickstart_command(dir.path(), "127.0.0.1:0", "127.0.0.1:0", &[]);
    let mut qs = Quickstart::start(cmd).await;
    let tmp = dir.path().join("tmp");
    let entries = || std::fs::read_dir(&tmp).unwrap().count();
    assert_eq!(
        entries(),
        1,
        "its data directory is in TMPDIR while it runs"
    );
    let data_dir = std::fs::read_dir(&tmp).unwrap().next().unwrap().unwrap();
    assert_eq!(data_dir.path(), qs.data_dir());
    let mode = data_dir.metadata().unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "it holds a private key and a token");
    let (_, status) = qs.stop(signal).await;
    assert!(status.success(), "{status}");
    assert_eq!(
        entries(),
        0,
        "kill {signal}: the temporary data directory is left behind"
    );
}

/// Another local user may create, before quickstart starts, the directory a predictable name
/// would pick (here the pid's, as `sh -c '… exec ferry quickstart'` shows it) and plant a link
/// in it: no file of theirs is overwritten, and quickstart keeps its key and token elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_keeps_out_of_a_temporary_directory_someone_prepared() {
    let dir = TempDir::new().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let victim = write(dir.path(), "victim.txt", "not yours to write\n");
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"d="$TMPDIR/ferry-quickstart-$$"; mkdir -m 777 "$d" && ln -s "$VICTIM" "$d/tokens" &&
           exec "$FERRY" quickstart --web.listen-address 127.0.0.1:0 --tunnel.listen-address 127.0.0.1:0"#,
    ])
    .current_dir(dir.path())
    .stdin(Stdio::null())
    .env("TMPDIR", &tmp)
    .env("VICTIM", &victim)
    .env("FERRY", FERRY);
    let mut qs = Quickstart::start(cmd).await;
    let planted = tmp.join(format!("ferry-quickstart-{}", qs.child.0.id()));
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "not yours to write\n"
    );
    let data_dir = qs.data_dir();
    assert_ne!(data_dir, planted, "it used the directory someone else made");
    assert_eq!(data_dir.parent(), Some(tmp.as_path()));
    let mode = std::fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    qs.scrape_demo_as_printed().await;

    let (_, status) = qs.stop("-TERM").await;
    assert!(status.success(), "{status}");
    assert!(!data_dir.exists(), "its own directory is removed");
    assert!(
        planted.join("tokens").symlink_metadata().is_ok(),
        "the other user's directory is not its to remove"
    );
}

/// Stopped while it waits for its agent, quickstart exits at once (and cleans up), not when the
/// wait gives up. The agent here can never connect: quickstart runs in a network namespace of
/// its own (`unshare -rn`, util-linux), whose loopback interface is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_stops_at_once_while_it_waits_for_its_agent() {
    let dir = TempDir::new().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "-rn",
        FERRY,
        "quickstart",
        "--web.listen-address",
        "127.0.0.1:0",
    ])
    .args(["--tunnel.listen-address", "127.0.0.1:0"])
    .current_dir(dir.path())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .env("TMPDIR", &tmp);
    let mut child = KillOnDrop(cmd.spawn().expect("spawn unshare"));
    let mut err = forward_lines(child.0.stderr.take().unwrap());
    let mut seen = Vec::new();
    let waiting = tokio::time::timeout(Duration::from_secs(8), async {
        while let Some(line) = err.recv().await {
            seen.push(line.clone());
            if line.contains("cannot open tunnel") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        waiting,
        Ok(true),
        "the agent never failed to connect: {seen:?}"
    );
    let mut qs = Quickstart {
        child,
        printed: Vec::new(),
        _out: None,
        err,
    };
    let (took, status) = qs.stop("-TERM").await;
    assert!(took < Duration::from_secs(2), "it took {took:?} to stop");
    assert!(status.success(), "{status}");
    let left = std::fs::read_dir(&tmp).unwrap().count();
    assert_eq!(left, 0, "the temporary data directory is left behind");
}

/// `:port` (every interface, as the README spells listen addresses) and `[v6]:port` serve as
/// either address: the agent dials the address the tunnel listens on, not `localhost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_listens_on_the_addresses_every_command_accepts() {
    for (web, tunnel) in [
        (":0", "127.0.0.1:0"),
        ("127.0.0.1:0", "[::1]:0"),
        ("[::1]:0", ":0"),
    ] {
        let dir = TempDir::new().unwrap();
        let mut qs = Quickstart::start(quickstart_command(dir.path(), web, tunnel, &[])).await;
        qs.scrape_demo_as_printed().await;
        let (_, status) = qs.stop("-TERM").await;
        assert!(
            status.success(),
            "web {web}, tunnel {tunnel}: {status}\n{}",
            qs.stderr_so_far()
        );
    }
}

/// A test certificate rustls refuses: X.509 version 1 (see tests/fixtures/README.md).
fn v1_identity() -> (PathBuf, PathBuf) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    (
        fixtures.join("x509v1-cert.pem"),
        fixtures.join("x509v1-key.pem"),
    )
}

#[test]
fn check_config_refuses_the_client_certificate_the_agent_would_refuse_once_in_plain_words() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "agent-token", "s3cret\n");
    let (cert, key) = v1_identity();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let fingerprint = format!("sha256:{}", "ab".repeat(32));
    let v1 = "unsupported certificate version (X.509 v1; v3 required)";
    write(
        dir.path(),
        "v1.yaml",
        &format!(
            "agent:\n  gateway: https://127.0.0.1:7443\n  agent_id: node-1\n  token_file: agent-token\n  tunnel: {{ fingerprint: '{fingerprint}', cert_file: {cert}, key_file: {key} }}\n"
        ),
    );
    let out = ferry(dir.path(), &["check-config", "v1.yaml"]);
    let line = one_config_error(&out);
    assert!(
        line.starts_with("v1.yaml: agent.tunnel.cert_file: ") && line.ends_with(v1),
        "{line}"
    );

    let args = [
        "agent",
        "--gateway",
        "https://127.0.0.1:7443",
        "--agent-id",
        "node-1",
        "--token-file",
        "agent-token",
        "--tunnel.fingerprint",
        &fingerprint,
        "--tunnel.cert-file",
        cert,
        "--tunnel.key-file",
        key,
    ];
    let out = ferry(dir.path(), &args);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "printed once: {lines:?}");
    assert!(
        lines[0].starts_with("invalid flag --tunnel.cert-file: ") && lines[0].ends_with(v1),
        "{lines:?}"
    );
}

#[test]
fn check_config_warns_that_an_empty_tokens_file_lets_no_agent_in() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "tokens", "# nobody yet\n");
    write(
        dir.path(),
        "gw.yaml",
        "gateway:\n  auth:\n    tokens_file: tokens\n",
    );
    let out = ferry(dir.path(), &["check-config", "gw.yaml"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("gw.yaml: OK"), "{out:?}");
    assert_eq!(
        stderr_lines(&out),
        ["gw.yaml: warning: tokens file tokens holds no credentials: no agent can connect (add lines made with `ferry token new`)"]
    );
}

#[test]
fn check_config_warns_that_a_world_writable_tokens_file_lets_anyone_add_a_credential() {
    let dir = TempDir::new().unwrap();
    let tokens = tokens_file(dir.path(), "s3cret");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o666)).unwrap();
    write(
        dir.path(),
        "gw.yaml",
        "gateway:\n  auth:\n    tokens_file: tokens\n",
    );
    let out = ferry(dir.path(), &["check-config", "gw.yaml"]);
    assert!(out.status.success(), "a warning, not an error: {out:?}");
    assert_eq!(
        stderr_lines(&out),
        ["gw.yaml: warning: tokens file tokens is writable by every user: anyone on this host can add a credential (chmod o-w)"]
    );
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = ferry(dir.path(), &["check-config", "gw.yaml"]);
    assert!(stderr_lines(&out).is_empty(), "{out:?}");
}

/// What belongs in the gateway's tokens file, pasted into the agent's token file, is refused
/// with what goes where (the gateway would only answer 401); a token file other users may read
/// is warned about, by check-config and at start.
#[test]
fn the_agents_token_file_must_hold_the_token_and_only_its_owner_may_read_it() {
    let dir = TempDir::new().unwrap();
    good_config(dir.path());
    let token = dir.path().join("agent-token");
    let hash = hash_token("s3cret");
    for (text, problem) in [
        (
            format!("node-* {hash}\n"),
            "holds a line of the gateway's tokens file (glob and hash); the agent's token file holds the token itself (the \"token:\" value ferry token new printed)",
        ),
        (
            format!("{hash}\n"),
            "holds the token's hash (for the gateway's tokens file), not the token",
        ),
    ] {
        write(dir.path(), "agent-token", &text);
        let out = ferry(dir.path(), &["check-config", "ferry.yaml"]);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
        assert_eq!(
            stderr_lines(&out),
            [format!("ferry.yaml: agent.token_file: agent-token {problem}")]
        );
    }

    write(dir.path(), "agent-token", "s3cret\n");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let readable = "token file agent-token is readable by users other than its owner (mode 0644): whoever reads it can connect as this agent (chmod 600)";
    let out = ferry(dir.path(), &["check-config", "ferry.yaml"]);
    assert!(out.status.success(), "a warning, not an error: {out:?}");
    assert_eq!(
        stderr_lines(&out),
        [format!("ferry.yaml: warning: {readable}")]
    );
    let mut agent = Running::start(
        dir.path(),
        &[
            "agent",
            "--gateway",
            "http://127.0.0.1:1",
            "--tunnel.insecure-plaintext",
            "--agent-id",
            "node-1",
            "--token-file",
            "agent-token",
        ],
    );
    let line = agent.wait_for(readable);
    assert!(line.contains("level=warn"), "{line}");
    drop(agent);

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = ferry(dir.path(), &["check-config", "ferry.yaml"]);
    assert!(stderr_lines(&out).is_empty(), "{out:?}");
}

/// A token in FERRY_TOKEN is checked as one in a file, and its errors name the variable, not a
/// flag the user did not set; the `token:` line of `ferry token new` pasted whole is refused
/// with the fix. With a token file as well, the variable is ignored, and a warning says so.
#[test]
fn ferry_token_errors_name_the_variable_and_a_token_file_beside_it_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    good_config(dir.path());
    let token = dir.path().join("agent-token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = [
        "agent",
        "--gateway",
        "http://127.0.0.1:1",
        "--tunnel.insecure-plaintext",
        "--agent-id",
        "node-1",
    ];
    let hex = "b2".repeat(32);
    for (value, problem) in [
        (
            hash_token("s3cret"),
            "environment variable FERRY_TOKEN: its value holds the token's hash (for the gateway's tokens file), not the token".to_owned(),
        ),
        (
            format!("token:            {hex}"),
            "environment variable FERRY_TOKEN: its value holds the line \"token: ...\" that ferry token new printed; it must hold only the token after \"token:\"".to_owned(),
        ),
    ] {
        let out = command(dir.path(), &agent)
            .env("FERRY_TOKEN", &value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
        assert_eq!(stderr_lines(&out), [problem]);
    }

    let out = command(dir.path(), &["check-config", "ferry.yaml"])
        .env("FERRY_TOKEN", "other")
        .output()
        .unwrap();
    assert!(out.status.success(), "a warning, not an error: {out:?}");
    assert_eq!(
        stderr_lines(&out),
        ["ferry.yaml: warning: FERRY_TOKEN is ignored: the agent's token comes from the token file agent-token (unset one of them)"]
    );
}

#[test]
fn the_log_format_flag_names_its_values() {
    let dir = TempDir::new().unwrap();
    for sub in [
        "gateway",
        "agent",
        "egress",
        "exporter",
        "run",
        "quickstart",
    ] {
        let help = stdout(&ferry(dir.path(), &[sub, "--help"]));
        assert!(
            help.contains("Log line format: logfmt or json"),
            "ferry {sub} --help:\n{help}"
        );
    }
}

/// A ferry process whose stderr lines are collected as they come.
struct Running {
    child: KillOnDrop,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(dir: &Path, args: &[&str]) -> Running {
        Self::spawn(command(dir, args))
    }

    /// `ferry gateway` on free loopback ports with the tokens file `tokens` and its data in
    /// `dir/data`, plus `extra` flags.
    fn gateway(dir: &Path, tokens: &Path, extra: &[&str]) -> Running {
        Self::spawn(Self::gateway_command(dir, tokens, extra))
    }

    /// The command [`Running::gateway`] runs.
    fn gateway_command(dir: &Path, tokens: &Path, extra: &[&str]) -> Command {
        let data = dir.join("data");
        let mut args = vec![
            "gateway",
            "--web.listen-address",
            "127.0.0.1:0",
            "--tunnel.listen-address",
            "127.0.0.1:0",
            "--auth.tokens-file",
            tokens.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        command(dir, &args)
    }

    /// `ferry <args>` started by `prlimit --nofile=<nofile>` (util-linux): with that open-file
    /// limit, `soft:hard`.
    fn start_with_nofile(dir: &Path, nofile: &str, args: &[&str]) -> Running {
        let mut prlimit = Command::new("prlimit");
        prlimit.arg(format!("--nofile={nofile}")).arg(FERRY);
        Self::spawn(with_ferry_args(prlimit, dir, args))
    }

    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child: KillOnDrop(child),
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (20 s at most) for a line containing `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
        panic!("no line with {needle:?} in:\n{}", self.seen.join("\n"));
    }

    /// Waits until a line with each of `needles` has been seen, in any order.
    fn wait_for_all(&mut self, needles: &[&str]) {
        for needle in needles {
            if !self.seen.iter().any(|l| l.contains(needle)) {
                self.wait_for(needle);
            }
        }
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(&self.child.0);
        rustix::process::kill_process(pid, signal).expect("signal ferry");
    }

    /// SIGTERM, then every line up to the exit.
    fn stop(mut self) -> Vec<String> {
        self.signal(rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "ferry did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.seen.extend(self.lines.iter());
        self.seen
    }
}

#[test]
fn egress_says_what_it_reloads_and_drains() {
    let dir = TempDir::new().unwrap();
    let mut egress = Running::start(
        dir.path(),
        &[
            "egress",
            "--web.listen-address",
            "127.0.0.1:0",
            "--allow-upstream",
            "example.com:443",
        ],
    );
    egress.wait_for("egress proxy listening");
    egress.signal(rustix::process::Signal::HUP);
    egress.wait_for("SIGHUP: reloading");
    let lines = egress.stop().join("\n");
    assert!(
        !lines.contains("credentials"),
        "no credentials file:\n{lines}"
    );
    assert!(
        lines.contains(
            "message=\"shutting down: draining in-flight proxied requests\" signal=SIGTERM"
        ),
        "{lines}"
    );
    assert!(!lines.contains("scrapes"), "{lines}");
}

/// A tokens-file line whose glob no agent id can match (ids are host names) is valid but lets
/// nobody in: check-config and the start warn about it, naming the file and the line, and so
/// does a reload that brings one; the gateway still starts.
#[test]
fn a_glob_no_agent_id_can_match_is_warned_about_with_its_line() {
    let dir = TempDir::new().unwrap();
    let hash = hash_token("s3cret");
    let good = format!("# agents\nnode-* {hash}\n");
    let tokens = write(
        dir.path(),
        "tokens",
        &format!("{good}<script>alert(1)</script>* {hash}\n"),
    );
    write(
        dir.path(),
        "gw.yaml",
        "gateway:\n  auth:\n    tokens_file: tokens\n",
    );
    let never = |line: usize, glob: &str| {
        format!("tokens file tokens line {line}: the glob {glob:?} can never match an agent id (ids are host names: letters, digits, '-', '_' and '.', not first '-' or '.'): this line lets no agent in")
    };
    let out = ferry(dir.path(), &["check-config", "gw.yaml"]);
    assert!(out.status.success(), "a warning, not an error: {out:?}");
    assert_eq!(
        stderr_lines(&out),
        [format!(
            "gw.yaml: warning: {}",
            never(3, "<script>alert(1)</script>*")
        )]
    );

    let mut gw = Running::gateway(dir.path(), &tokens, &[]);
    let line = gw.wait_for("line 3: the glob");
    assert!(
        line.contains("level=warn") && line.contains("can never match an agent id"),
        "{line}"
    );
    gw.wait_for("gateway web listener up");
    write(dir.path(), "tokens", &format!("{good}-node-1 {hash}\n"));
    gw.signal(rustix::process::Signal::HUP);
    gw.wait_for("tokens file reloaded");
    let lines = gw.stop().join("\n");
    assert!(
        lines.contains(r#"line 3: the glob \"-node-1\" can never match"#),
        "{lines}"
    );

    // Globs some id can match are not warned about.
    write(
        dir.path(),
        "tokens",
        &format!("{good}[a-z]*.example.com {hash}\nNODE-? {hash}\n"),
    );
    let out = ferry(dir.path(), &["check-config", "gw.yaml"]);
    assert!(stderr_lines(&out).is_empty(), "{out:?}");
}

#[test]
fn a_reload_warns_about_a_tokens_file_made_writable_by_all() {
    let dir = TempDir::new().unwrap();
    let tokens = tokens_file(dir.path(), "s3cret");
    let mut gw = Running::gateway(dir.path(), &tokens, &[]);
    gw.wait_for("gateway web listener up");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o666)).unwrap();
    gw.signal(rustix::process::Signal::HUP);
    gw.wait_for("is writable by every user");
    let lines = gw.stop().join("\n");
    assert_eq!(
        lines.matches("is writable by every user").count(),
        1,
        "once, at the reload, not at start:\n{lines}"
    );
}

#[test]
fn the_exporter_drains_no_scrapes() {
    let dir = TempDir::new().unwrap();
    let mut exporter = Running::start(
        dir.path(),
        &[
            "exporter",
            "--web.listen-address",
            "127.0.0.1:0",
            "--collector.connections",
        ],
    );
    exporter.wait_for("exporter listening");
    let lines = exporter.stop().join("\n");
    assert!(lines.contains("message=\"shutting down\""), "{lines}");
    assert!(!lines.contains("scrapes"), "{lines}");
}

/// A SIGHUP that comes while the process is still starting (reading its configuration) is a
/// reload once the roles run, not the end of the process (SIGHUP's default action).
#[test]
fn a_sighup_during_start_up_is_a_reload_not_an_exit() {
    let dir = TempDir::new().unwrap();
    // Long enough to read and check (some 0.3 s) that the signal lands while ferry reads it.
    let hash = hash_token("s3cret");
    let lines: String = (0..20_000)
        .map(|i| format!("client-{i} {hash}\n"))
        .collect();
    write(dir.path(), "credentials", &lines);
    let mut egress = Running::start(
        dir.path(),
        &[
            "egress",
            "--web.listen-address",
            "127.0.0.1:0",
            "--allow-upstream",
            "example.com:443",
            "--auth.credentials-file",
            "credentials",
        ],
    );
    // Sent as soon as ferry catches SIGHUP, which it does before reading any file (a named pipe
    // cannot hold it there: it is refused, not waited on).
    let pid = egress.child.0.id();
    wait_until_caught(pid, rustix::process::Signal::HUP);
    egress.signal(rustix::process::Signal::HUP);
    // The reload may be logged before or after the listening line: it waits for the roles to
    // run, not for the log.
    egress.wait_for_all(&[
        "egress proxy listening",
        "SIGHUP: reloading",
        "egress credentials reloaded",
    ]);
    assert!(
        egress.child.0.try_wait().unwrap().is_none(),
        "ferry exited:\n{}",
        egress.seen.join("\n")
    );
}

/// Waits (20 s at most) until process `pid` has a handler for `signal` (its `SigCgt` in
/// /proc/PID/status).
fn wait_until_caught(pid: u32, signal: rustix::process::Signal) {
    let bit = 1u64 << (signal.as_raw() - 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .unwrap_or(0);
        if caught & bit != 0 {
            return;
        }
        assert!(Instant::now() < deadline, "ferry never caught {signal:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An egress credentials file that lost every line is not applied on reload (it would refuse
/// every client at once). A malformed line says how an egress line is written (a name, not an
/// agent id).
#[test]
fn the_egress_credentials_file_is_checked_as_at_start_on_reload() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "credentials",
        &format!("client-* {}\n", hash_token("s3cret")),
    );
    let mut egress = Running::start(
        dir.path(),
        &[
            "egress",
            "--web.listen-address",
            "127.0.0.1:0",
            "--allow-upstream",
            "example.com:443",
            "--auth.credentials-file",
            "credentials",
        ],
    );
    egress.wait_for("egress proxy listening");
    write(dir.path(), "credentials", "# nobody\n");
    egress.signal(rustix::process::Signal::HUP);
    let line = egress.wait_for("egress credentials reload failed");
    assert!(
        line.contains("level=error")
            && line
                .contains("credentials file credentials holds no credentials any more (it had 1)"),
        "{line}"
    );

    write(dir.path(), "credentials", "client-1\n");
    egress.signal(rustix::process::Signal::HUP);
    let line = egress.wait_for("egress credentials reload failed");
    assert!(
        line.contains(
            "credentials file credentials line 1: expected `<name glob> sha256:<hex of secret>`"
        ),
        "{line}"
    );
    let out = ferry(
        dir.path(),
        &[
            "egress",
            "--allow-upstream",
            "example.com:443",
            "--auth.credentials-file",
            "credentials",
        ],
    );
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let lines = stderr_lines(&out);
    assert!(
        lines[0].contains("expected `<name glob> sha256:"),
        "{lines:?}"
    );
}

/// A reload applies what it can; a changed setting it does not apply is named, not ignored.
#[test]
fn settings_a_reload_does_not_apply_are_named() {
    let dir = TempDir::new().unwrap();
    let config = |upstream: &str| {
        format!("egress:\n  web: {{ listen_address: '127.0.0.1:0' }}\n  allow_upstreams: ['{upstream}']\n")
    };
    write(
        dir.path(),
        "egress.yaml",
        &config("collector.example.com:443"),
    );
    let mut egress = Running::start(dir.path(), &["run", "--config.file", "egress.yaml"]);
    egress.wait_for("egress proxy listening");
    write(dir.path(), "egress.yaml", &config("other.example.com:443"));
    egress.signal(rustix::process::Signal::HUP);
    let line = egress.wait_for("take effect only after a restart");
    assert!(
        line.contains("level=warn") && line.contains("fields=egress.allow_upstreams"),
        "{line}"
    );
    // The last line of the reload does not contradict it.
    let line = egress.wait_for("reload done");
    assert!(
        line.contains("level=warn")
            && line.contains(
                "reload done: applied, except settings that take effect only after a restart"
            )
            && line.contains("need_restart=egress.allow_upstreams"),
        "{line}"
    );
    write(
        dir.path(),
        "egress.yaml",
        &format!("{}  bogus: 1\n", config("other.example.com:443")),
    );
    egress.signal(rustix::process::Signal::HUP);
    let line = egress.wait_for("the config file is invalid");
    assert!(
        line.contains("level=error") && line.contains("bogus"),
        "{line}"
    );
    write(dir.path(), "egress.yaml", "egress: [not, a, mapping");
    egress.signal(rustix::process::Signal::HUP);
    let line = egress.wait_for("cannot be read");
    assert!(line.contains("level=error"), "{line}");
    assert!(
        egress.child.0.try_wait().unwrap().is_none(),
        "still running"
    );
}

#[test]
fn an_agent_id_changed_on_reload_is_said_to_need_a_restart() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "agent-token", "s3cret\n");
    let config = |id: &str| {
        format!(
            "agent:\n  gateway: http://127.0.0.1:1\n  agent_id: {id}\n  token_file: agent-token\n  tunnel: {{ insecure_plaintext: true }}\n  targets:\n    - {{ name: node, url: 'http://127.0.0.1:9100/metrics' }}\n"
        )
    };
    write(dir.path(), "agent.yaml", &config("node-1"));
    let mut agent = Running::start(dir.path(), &["run", "--config.file", "agent.yaml"]);
    agent.wait_for("cannot open tunnel");
    write(dir.path(), "agent.yaml", &config("node-2"));
    agent.signal(rustix::process::Signal::HUP);
    let line = agent.wait_for("agent_id changed");
    assert!(
        line.contains("level=warn") && line.contains("restart"),
        "{line}"
    );
    assert!(
        line.contains("running=node-1") && line.contains("file=node-2"),
        "{line}"
    );
    agent.wait_for("agent targets reloaded");
}

/// A CA in `dir` (`NAME.pem`), and a gateway certificate for `localhost` it signed (`gw.pem`,
/// `gw-key.pem`) if `sign_gateway`.
fn tunnel_ca(dir: &Path, name: &str, sign_gateway: bool) -> String {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    write(dir, &format!("{name}.pem"), &ca.pem());
    if sign_gateway {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        write(dir, "gw.pem", &params.signed_by(&key, &ca).unwrap().pem());
        write(dir, "gw-key.pem", &key.serialize_pem());
    }
    ca.pem()
}

/// A gateway on loopback with the certificate `gw.pem` of `dir`; its tunnel address.
fn tls_gateway(dir: &Path) -> (Running, SocketAddr) {
    let tokens = tokens_file(dir, "s3cret");
    let mut gw = Running::gateway(
        dir,
        &tokens,
        &[
            "--tunnel.tls-cert-file",
            "gw.pem",
            "--tunnel.tls-key-file",
            "gw-key.pem",
        ],
    );
    let tunnel = logged_address(&gw.wait_for("gateway tunnel listener up"));
    (gw, tunnel)
}

/// The usual CA rotation: the new CA goes into the agent's CA file, the agent is reloaded, then
/// the gateway gets a certificate from the new CA. A reload reads the CA file again for the next
/// connection (here the gateway has the new CA's certificate already: the agent connects once
/// reloaded), from a config file as from flags; a CA file that no longer parses keeps the one
/// in use, and the reload says it was not all applied, naming the file.
#[test]
fn a_reload_reads_the_tunnel_ca_file_again() {
    for from_flags in [false, true] {
        let dir = TempDir::new().unwrap();
        let old_ca = tunnel_ca(dir.path(), "old-ca", false);
        let new_ca = tunnel_ca(dir.path(), "new-ca", true);
        let (gw, tunnel) = tls_gateway(dir.path());
        write(dir.path(), "gwca.pem", &old_ca);
        write(dir.path(), "agent-token", "s3cret\n");
        let gateway = format!("https://127.0.0.1:{}", tunnel.port());
        let mut agent = if from_flags {
            Running::start(
                dir.path(),
                &[
                    "agent",
                    "--gateway",
                    &gateway,
                    "--agent-id",
                    "node-1",
                    "--token-file",
                    "agent-token",
                    "--tunnel.ca-file",
                    "gwca.pem",
                    "--tunnel.server-name",
                    "localhost",
                    "--target",
                    "node=http://127.0.0.1:9100/metrics",
                ],
            )
        } else {
            write(
                dir.path(),
                "agent.yaml",
                &format!(
                    "agent:\n  gateway: {gateway}\n  agent_id: node-1\n  token_file: agent-token\n  tunnel: {{ ca_file: gwca.pem, server_name: localhost }}\n  reconnect: {{ min_backoff: 100ms, max_backoff: 500ms }}\n  targets:\n    - {{ name: node, url: 'http://127.0.0.1:9100/metrics' }}\n"
                ),
            );
            Running::start(dir.path(), &["run", "--config.file", "agent.yaml"])
        };
        let refused = agent.wait_for("cannot open tunnel");
        assert!(
            refused.contains("not signed by a CA in") && refused.contains("gwca.pem"),
            "{refused}"
        );

        write(dir.path(), "gwca.pem", &format!("{old_ca}{new_ca}"));
        agent.signal(rustix::process::Signal::HUP);
        let read = agent.wait_for("tunnel TLS files read again");
        assert!(read.contains("gwca.pem"), "{read}");
        agent.wait_for_all(&["reload done: everything applied", "tunnel up"]);

        write(
            dir.path(),
            "gwca.pem",
            "-----BEGIN CERTIFICATE-----\nnot base64\n",
        );
        agent.signal(rustix::process::Signal::HUP);
        let line = agent.wait_for("gwca.pem");
        assert!(
            line.contains("level=error") && line.contains("not valid PEM"),
            "{line}"
        );
        agent.wait_for("reload done, not all of it applied");
        let lines = agent.stop().join("\n");
        assert!(
            !lines.contains("tunnel closed"),
            "the tunnel up stays up: {lines}"
        );
        drop(gw);
    }
}

/// An agent config file (`agent.yaml`) dialling nothing, serving `target` on `path`, with `extra`
/// appended; the token file it names is written too.
fn agent_config(dir: &Path, target: &str, extra: &str) {
    write(dir, "agent-token", "s3cret\n");
    let text = format!(
        "agent:\n  gateway: http://127.0.0.1:1\n  agent_id: node-1\n  token_file: agent-token\n  tunnel: {{ insecure_plaintext: true }}\n  targets:\n    - {{ name: {target}, url: 'http://127.0.0.1:9100/metrics' }}\n{extra}"
    );
    // Write then rename, so a reload never reads a half-written file.
    write(dir, "agent.yaml.new", &text);
    std::fs::rename(dir.join("agent.yaml.new"), dir.join("agent.yaml")).unwrap();
}

/// A geo database replaced by a wrong one (an ASN database) keeps the old database, and the
/// reload of the rest of the file goes on: the new targets are applied.
#[test]
fn a_bad_geo_database_does_not_keep_a_reload_from_applying_the_targets() {
    let dir = TempDir::new().unwrap();
    let geo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/geo"));
    std::fs::copy(
        geo.join("GeoLite2-Country-Test.mmdb"),
        dir.path().join("geo.mmdb"),
    )
    .unwrap();
    let geoip = "geoip:\n  database: geo.mmdb\n";
    agent_config(dir.path(), "node", geoip);
    let mut agent = Running::start(dir.path(), &["run", "--config.file", "agent.yaml"]);
    agent.wait_for("cannot open tunnel");
    std::fs::copy(
        geo.join("GeoLite2-ASN-Test.mmdb"),
        dir.path().join("asn.mmdb"),
    )
    .unwrap();
    std::fs::rename(dir.path().join("asn.mmdb"), dir.path().join("geo.mmdb")).unwrap();
    agent_config(dir.path(), "node2", geoip);
    agent.signal(rustix::process::Signal::HUP);
    let line = agent.wait_for("geoip database reload failed");
    assert!(
        line.contains("level=warn") && line.contains("keeping the previous one"),
        "{line}"
    );
    let line = agent.wait_for("agent targets reloaded");
    assert!(line.contains("targets=2"), "{line}");
    let lines = agent.stop().join("\n");
    assert!(!lines.contains("the config file is invalid"), "{lines}");
}

/// A file named by another section that is broken when the agent is reloaded (egress
/// credentials caught half-written) is refused by its own reload; the agent's new targets in
/// the same file are applied all the same, and the log says which part was applied.
#[test]
fn a_broken_file_of_another_section_does_not_keep_a_reload_from_applying_the_targets() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "credentials",
        &format!("client-* {}\n", hash_token("s3cret")),
    );
    let egress = "egress:\n  web: { listen_address: '127.0.0.1:0' }\n  allow_upstreams: ['example.com:443']\n  auth: { credentials_file: credentials }\n";
    agent_config(dir.path(), "node", egress);
    let mut both = Running::start(dir.path(), &["run", "--config.file", "agent.yaml"]);
    both.wait_for("egress proxy listening");
    write(dir.path(), "credentials", "client-1\n");
    agent_config(dir.path(), "node2", egress);
    both.signal(rustix::process::Signal::HUP);
    let line = both.wait_for("egress credentials reload failed");
    assert!(line.contains("credentials line 1"), "{line}");
    let line = both.wait_for("problems outside the agent section");
    assert!(
        line.contains("level=error")
            && line.contains("egress.auth.credentials_file")
            && line.contains("the agent section is applied"),
        "{line}"
    );
    let line = both.wait_for("agent targets reloaded");
    assert!(line.contains("targets=2"), "{line}");
    let line = both.wait_for("reload done");
    assert!(line.contains("not all of it applied"), "{line}");
    let lines = both.stop().join("\n");
    assert!(!lines.contains("the config file is invalid"), "{lines}");
}

/// A broken agent section keeps the running targets, whatever else the file holds.
#[test]
fn a_broken_agent_section_keeps_the_running_targets() {
    let dir = TempDir::new().unwrap();
    agent_config(dir.path(), "node", "");
    let mut agent = Running::start(dir.path(), &["run", "--config.file", "agent.yaml"]);
    agent.wait_for("cannot open tunnel");
    agent_config(dir.path(), "node2", "  labels: { 'bad label': x }\n");
    agent.signal(rustix::process::Signal::HUP);
    let line = agent.wait_for("the config file is invalid");
    assert!(line.contains("agent.labels"), "{line}");
    let lines = agent.stop().join("\n");
    assert!(!lines.contains("agent targets reloaded"), "{lines}");
}

/// A named pipe at the geo database path is refused like a broken file, naming it: at start with
/// exit code 2, and on SIGHUP with a warning while the loaded database stays and /metrics goes on
/// answering. Opening it used to wait for a writer forever, with SIGTERM ignored at start and
/// /metrics unanswered after a SIGHUP.
#[test]
fn a_named_pipe_as_the_geo_database_is_refused_at_start_and_on_reload() {
    let dir = TempDir::new().unwrap();
    common::make_fifo(&dir.path().join("pipe.mmdb"));
    let exporter = |db: &'static str| {
        [
            "exporter",
            "--web.listen-address",
            "127.0.0.1:0",
            "--collector.connections",
            "--geoip.database",
            db,
        ]
    };
    let out = ferry(dir.path(), &exporter("pipe.mmdb"));
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    assert_eq!(
        stderr_lines(&out),
        ["invalid flag --geoip.database: geoip database pipe.mmdb: cannot open: not a regular file (a named pipe)"]
    );

    let geo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/geo"));
    std::fs::copy(
        geo.join("GeoLite2-Country-Test.mmdb"),
        dir.path().join("geo.mmdb"),
    )
    .unwrap();
    let mut running = Running::start(dir.path(), &exporter("geo.mmdb"));
    let addr = logged_address(&running.wait_for("exporter listening"));
    std::fs::rename(dir.path().join("pipe.mmdb"), dir.path().join("geo.mmdb")).unwrap();
    running.signal(rustix::process::Signal::HUP);
    let line = running.wait_for("geoip database reload failed");
    assert!(
        line.contains("level=warn")
            && line.contains(
                "geoip database geo.mmdb: cannot open: not a regular file (a named pipe)"
            ),
        "{line}"
    );
    running.wait_for("reload done");
    let metrics = http_get(&addr.to_string(), "/metrics").unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert_eq!(
        common::ferry::metric_value(&metrics, "ferry_geoip_database_last_reload_successful", &[]),
        Some(0.0),
        "{metrics}"
    );
    running.stop();
}

/// An invalid file changes nothing: it is reported as invalid, and its fields are not listed
/// as settings that would need a restart.
#[test]
fn an_invalid_file_on_reload_is_not_said_to_change_settings() {
    let dir = TempDir::new().unwrap();
    agent_config(dir.path(), "node", "");
    let mut agent = Running::start(dir.path(), &["run", "--config.file", "agent.yaml"]);
    agent.wait_for("cannot open tunnel");
    agent_config(dir.path(), "node", "  lables: { env: prod }\n");
    agent.signal(rustix::process::Signal::HUP);
    let line = agent.wait_for("the config file is invalid");
    assert!(
        line.contains("level=error") && line.contains("lables"),
        "{line}"
    );
    write(dir.path(), "agent.yaml", "");
    agent.signal(rustix::process::Signal::HUP);
    agent.wait_for("the config file is invalid");
    let lines = agent.stop().join("\n");
    assert!(
        !lines.contains("take effect only after a restart"),
        "{lines}"
    );
    assert!(!lines.contains("agent targets reloaded"), "{lines}");
}

/// The `address=` of a "listening" log line.
fn logged_address(line: &str) -> SocketAddr {
    line.rsplit_once("address=")
        .and_then(|(_, a)| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line}"))
}

/// The whole response to `GET path` at `addr`, over a plain socket.
fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    http_get_with(addr, path, "")
}

/// [`http_get`] with `headers` (`Name: value\r\n` lines).
fn http_get_with(addr: &str, path: &str, headers: &str) -> std::io::Result<String> {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    Ok(text)
}

/// A status line for `GET /-/healthy` at `addr`.
fn healthy_status(addr: &str) -> std::io::Result<String> {
    let text = http_get(addr, "/-/healthy")?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// `ferry_config_last_reload_successful` and `…_success_timestamp_seconds` at `addr`.
fn reload_metrics(addr: SocketAddr) -> (f64, f64) {
    let text = http_get(&addr.to_string(), "/metrics").unwrap();
    let value = |name| {
        common::ferry::metric_value(&text, name, &[])
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    (
        value("ferry_config_last_reload_successful"),
        value("ferry_config_last_reload_success_timestamp_seconds"),
    )
}

/// A failed reload shows on `/metrics`, as Prometheus shows its own; the next good one clears it.
#[test]
fn the_last_reload_outcome_is_a_metric() {
    let dir = TempDir::new().unwrap();
    let tokens = tokens_file(dir.path(), "s3cret");
    let mut gw = Running::gateway(dir.path(), &tokens, &[]);
    let web = logged_address(&gw.wait_for("gateway web listener up"));
    let (ok, started) = reload_metrics(web);
    assert_eq!(ok, 1.0, "the start is a successful load");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - started).abs() < 60.0, "{started} is not about {now}");

    write(dir.path(), "tokens", "not a tokens line\n");
    gw.signal(rustix::process::Signal::HUP);
    gw.wait_for("tokens file reload failed");
    gw.wait_for("reload done, not all of it applied");
    assert_eq!(reload_metrics(web), (0.0, started));

    tokens_file(dir.path(), "s3cret");
    std::thread::sleep(Duration::from_millis(10));
    gw.signal(rustix::process::Signal::HUP);
    gw.wait_for("tokens file reloaded");
    gw.wait_for("reload done: everything applied");
    let (ok, reloaded) = reload_metrics(web);
    assert_eq!(ok, 1.0);
    assert!(reloaded > started, "{reloaded} is not after {started}");
}

/// `(successful, success timestamp)` of the config reload and of the geoip database at `addr`.
fn config_and_geoip_reload_metrics(addr: SocketAddr) -> [(f64, f64); 2] {
    let text = http_get(&addr.to_string(), "/metrics").unwrap();
    let value = |name: &str| {
        common::ferry::metric_value(&text, name, &[])
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    ["ferry_config", "ferry_geoip_database"].map(|prefix| {
        (
            value(&format!("{prefix}_last_reload_successful")),
            value(&format!("{prefix}_last_reload_success_timestamp_seconds")),
        )
    })
}

/// A broken geo database from an updater is refused by the periodic check, without a SIGHUP: its
/// own gauge says so while `ferry_config_last_reload_successful` stays about what SIGHUP reloads;
/// the next good file clears it.
#[test]
fn a_geo_database_refused_by_the_periodic_check_shows_on_its_own_gauge() {
    let dir = TempDir::new().unwrap();
    let geo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/geo"));
    let install = |name: &str| {
        std::fs::copy(geo.join(name), dir.path().join("geo.mmdb.new")).unwrap();
        std::fs::rename(dir.path().join("geo.mmdb.new"), dir.path().join("geo.mmdb")).unwrap();
    };
    install("GeoLite2-Country-Test.mmdb");
    write(
        dir.path(),
        "ferry.yaml",
        "exporter:\n  web: { listen_address: '127.0.0.1:0' }\n  collector: { connections: true }\ngeoip:\n  database: geo.mmdb\n  reload_interval: 1s\n",
    );
    let mut exporter = Running::start(dir.path(), &["run", "--config.file", "ferry.yaml"]);
    let addr = logged_address(&exporter.wait_for("exporter listening"));
    let [config, (ok, loaded)] = config_and_geoip_reload_metrics(addr);
    assert_eq!((config.0, ok), (1.0, 1.0), "the start is a successful load");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - loaded).abs() < 60.0, "{loaded} is not about {now}");

    install("GeoLite2-ASN-Test.mmdb");
    exporter.wait_for("geoip database reload failed");
    assert_eq!(
        config_and_geoip_reload_metrics(addr),
        [config, (0.0, loaded)]
    );

    // SIGHUP tries the file again; everything else it reloads applied.
    exporter.signal(rustix::process::Signal::HUP);
    exporter.wait_for("geoip database reload failed");
    exporter.wait_for("reload done, not all of it applied");
    let [after_hup, geoip] = config_and_geoip_reload_metrics(addr);
    assert_eq!((after_hup.0, geoip), (1.0, (0.0, loaded)));

    install("GeoIP2-Country-Test.mmdb");
    exporter.wait_for("geoip database loaded");
    let [_, (ok, reloaded)] = config_and_geoip_reload_metrics(addr);
    assert_eq!(ok, 1.0);
    assert!(reloaded > loaded, "{reloaded} is not after {loaded}");
    exporter.stop();
}

/// SIGHUP re-reads `--web.config.file`: a basic-auth password taken out of it stops working at
/// once; a broken file keeps the one in force.
#[test]
fn a_reload_revokes_a_password_taken_out_of_the_web_config_file() {
    use base64::Engine as _;
    let dir = TempDir::new().unwrap();
    let tokens = tokens_file(dir.path(), "s3cret");
    let users = |password: &str| {
        let hash = bcrypt::hash(password, 4).unwrap();
        write(
            dir.path(),
            "web.yml",
            &format!("basic_auth_users:\n  prometheus: {hash}\n"),
        );
    };
    users("leaked");
    let mut gw = Running::gateway(dir.path(), &tokens, &["--web.config.file", "web.yml"]);
    let web = logged_address(&gw.wait_for("gateway web listener up")).to_string();
    let status = |password: &str| {
        let creds =
            base64::engine::general_purpose::STANDARD.encode(format!("prometheus:{password}"));
        let headers = format!("Authorization: Basic {creds}\r\n");
        let text = http_get_with(&web, "/-/healthy", &headers).unwrap();
        text.lines().next().unwrap_or_default().to_owned()
    };
    assert_eq!(status("leaked"), "HTTP/1.1 200 OK");

    users("rotated");
    gw.signal(rustix::process::Signal::HUP);
    gw.wait_for("web config file reloaded");
    assert_eq!(status("leaked"), "HTTP/1.1 401 Unauthorized");
    assert_eq!(status("rotated"), "HTTP/1.1 200 OK");

    write(dir.path(), "web.yml", "basic_auth_users: [");
    gw.signal(rustix::process::Signal::HUP);
    let line = gw.wait_for("web config file reload failed");
    assert!(
        line.contains("level=error") && line.contains("web.yml"),
        "{line}"
    );
    assert_eq!(status("rotated"), "HTTP/1.1 200 OK");
}

/// SIGHUP never turns basic auth off: a web config file emptied, cut short or without users
/// (caught half-written by an editor or a deployment) is refused with an error naming it, the
/// reload counts as failed, and requests without credentials are still refused.
#[test]
fn a_reload_does_not_turn_basic_auth_off() {
    use base64::Engine as _;
    let dir = TempDir::new().unwrap();
    let tokens = tokens_file(dir.path(), "s3cret");
    let hash = bcrypt::hash("pass", 4).unwrap();
    write(
        dir.path(),
        "web.yml",
        &format!("basic_auth_users:\n  prometheus: {hash}\n"),
    );
    let mut gw = Running::gateway(dir.path(), &tokens, &["--web.config.file", "web.yml"]);
    let web = logged_address(&gw.wait_for("gateway web listener up")).to_string();
    let creds = format!(
        "Authorization: Basic {}\r\n",
        base64::engine::general_purpose::STANDARD.encode("prometheus:pass")
    );
    let status = |path: &str, headers: &str| {
        let text = http_get_with(&web, path, headers).unwrap();
        text.lines().next().unwrap_or_default().to_owned()
    };
    for broken in ["", "tls_server_config:\n ", "basic_auth_users: {}\n"] {
        write(dir.path(), "web.yml", broken);
        gw.signal(rustix::process::Signal::HUP);
        let line = gw.wait_for("web config file reload failed");
        assert!(
            line.contains("level=error")
                && line.contains("web.yml")
                && line.contains("turning basic auth off takes a restart"),
            "{line}"
        );
        gw.wait_for("reload done, not all of it applied");
        assert_eq!(status("/targets", ""), "HTTP/1.1 401 Unauthorized");
        let scrape = status("http://node-1:9100/metrics", "");
        assert!(scrape.starts_with("HTTP/1.1 407"), "{scrape}");
        let metrics = http_get_with(&web, "/metrics", &creds).unwrap();
        assert_eq!(
            common::ferry::metric_value(&metrics, "ferry_config_last_reload_successful", &[]),
            Some(0.0),
            "{broken:?}"
        );
    }
}

/// `:port` listens on IPv4 and IPv6, as Prometheus reads it; an IPv4 client on that dual-stack
/// socket is still its IPv4 address to the client allowlist.
#[test]
fn a_port_alone_listens_on_ipv4_and_ipv6() {
    let dir = TempDir::new().unwrap();
    let mut egress = Running::start(
        dir.path(),
        &[
            "egress",
            "--web.listen-address",
            ":0",
            "--allow-client",
            "127.0.0.0/8",
        ],
    );
    let line = egress.wait_for("egress proxy listening");
    let port = logged_address(&line).port();
    assert!(line.contains("address=[::]:"), "{line}");
    let v4 = healthy_status(&format!("127.0.0.1:{port}")).unwrap();
    assert_eq!(v4, "HTTP/1.1 200 OK", "IPv4 client in 127.0.0.0/8");
    // ::1 answers (the socket is dual-stack) and is refused: it is not in the allowlist.
    let v6 = healthy_status(&format!("[::1]:{port}")).unwrap();
    assert!(v6.starts_with("HTTP/1.1 403"), "{v6}");
}

/// An egress proxy (with `grace`) holding one request to an upstream that never answers: the
/// proxy and the client's connection.
fn egress_with_a_request_in_flight(dir: &Path, grace: &str) -> (Running, std::net::TcpStream) {
    use std::io::Write as _;
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for sock in upstream.incoming().flatten() {
            held.push(sock);
        }
    });
    let rule = format!("127.0.0.1/32:{}", up.port());
    let mut egress = Running::start(
        dir,
        &[
            "egress",
            "--web.listen-address",
            "127.0.0.1:0",
            "--allow-upstream",
            &rule,
            "--shutdown.grace-period",
            grace,
        ],
    );
    let proxy = logged_address(&egress.wait_for("egress proxy listening"));
    let mut client = std::net::TcpStream::connect(proxy).unwrap();
    write!(
        client,
        "GET http://{up}/slow HTTP/1.1\r\nHost: {up}\r\n\r\n"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    (egress, client)
}

/// The drain's end says how many requests it cut off.
#[test]
fn a_drain_cut_short_by_the_grace_period_says_how_many_requests_it_cut_off() {
    let dir = TempDir::new().unwrap();
    let (mut egress, client) = egress_with_a_request_in_flight(dir.path(), "500ms");
    egress.signal(rustix::process::Signal::INT);
    let line = egress.wait_for("shutting down");
    assert!(line.contains("signal=SIGINT"), "{line}");
    let line = egress.wait_for("still running when the grace period ended");
    assert!(
        line.contains("level=warn") && line.contains("connections=1") && line.contains("tunnels=0"),
        "{line}"
    );
    drop(client);
}

/// A second SIGINT/SIGTERM while draining exits at once (Ctrl-C twice), with status 1.
#[test]
fn a_second_stop_signal_does_not_wait_for_the_drain() {
    let dir = TempDir::new().unwrap();
    // An upstream that never answers keeps one request in flight.
    let (mut egress, client) = egress_with_a_request_in_flight(dir.path(), "60s");
    egress.signal(rustix::process::Signal::TERM);
    egress.wait_for("shutting down");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        egress.child.0.try_wait().unwrap().is_none(),
        "still draining the request in flight"
    );
    let started = Instant::now();
    egress.signal(rustix::process::Signal::INT);
    let status = loop {
        if let Some(status) = egress.child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a second signal did not end the drain"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(1));
    drop(client);
}

#[test]
fn a_config_file_given_to_a_role_points_at_ferry_run() {
    let dir = TempDir::new().unwrap();
    for role in ["gateway", "agent", "egress", "exporter"] {
        let out = ferry(dir.path(), &[role, "--config.file", "ferry.yaml"]);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{role}: {out:?}");
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{role}: {lines:?}");
        assert!(
            lines[0].contains("ferry run --config.file FILE"),
            "{role}: {lines:?}"
        );
    }
}

/// `ferry check-config` takes the file as its argument and `ferry run` with `--config.file`: each
/// given the other's way says how it takes it.
#[test]
fn a_config_file_given_the_other_commands_way_says_how_to_give_it() {
    let dir = TempDir::new().unwrap();
    for (args, says) in [
        (
            &["check-config", "--config.file", "x.yaml"][..],
            "ferry check-config FILE",
        ),
        (&["run", "x.yaml"][..], "ferry run --config.file x.yaml"),
    ] {
        let out = ferry(dir.path(), args);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{args:?}: {out:?}");
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "{args:?}: {lines:?}");
        assert!(lines[0].contains(says), "{args:?}: {lines:?}");
    }
}

/// A data directory the certificate cannot be stored in is named as the setting, with its whole
/// path: the relative default `data` is in whatever directory ferry was started from.
#[test]
fn an_unusable_data_dir_is_named_with_its_whole_path() {
    let dir = TempDir::new().unwrap();
    let tokens = tokens_file(dir.path(), "s3cret");
    write(dir.path(), "data", "a file, not a directory");
    let out = ferry(
        dir.path(),
        &[
            "gateway",
            "--auth.tokens-file",
            tokens.to_str().unwrap(),
            "--web.listen-address",
            "127.0.0.1:0",
            "--tunnel.listen-address",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let whole = dir.path().join("data");
    assert_eq!(
        stderr.trim(),
        format!(
            "invalid flag --data-dir: {} exists and is not a directory",
            whole.display()
        )
    );
}

/// `ferry gateway` in `dir` on loopback ports, its open-file limit `nofile` (`soft:hard`);
/// returns it once its web listener is up, with the listener's address.
fn gateway_with_nofile(dir: &Path, nofile: &str) -> (Running, SocketAddr) {
    tokens_file(dir, "tok");
    let mut gw = Running::start_with_nofile(
        dir,
        nofile,
        &[
            "gateway",
            "--web.listen-address",
            "127.0.0.1:0",
            "--tunnel.listen-address",
            "127.0.0.1:0",
            "--auth.tokens-file",
            "tokens",
            "--data-dir",
            "data",
        ],
    );
    let web = logged_address(&gw.wait_for("gateway web listener up"));
    (gw, web)
}

/// A soft open-file limit below the hard one (1024 is common, 64 here) would bound the
/// gateway's connections far below `web.max_connections`: it is raised to the hard limit, and
/// a hard limit below what the caps need is warned about.
#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let dir = TempDir::new().unwrap();
    let (gw, _) = gateway_with_nofile(dir.path(), "64:4096");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.child.0.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-file limit in:\n{limits}"));
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, ["4096", "4096"], "{open_files}");
    let lines = gw.stop();
    let warned: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("level=warn") && l.contains("open-file limit"))
        .collect();
    assert_eq!(warned.len(), 1, "{lines:#?}");
    assert!(warned[0].contains("limit=4096"), "{}", warned[0]);
}

/// Out of file descriptors, `accept` fails twice a second for as long as it lasts: one
/// warning, not a flood, and every failure counted in `ferry_gateway_accept_errors_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_failures_are_warned_about_once_and_counted() {
    let dir = TempDir::new().unwrap();
    // About a dozen descriptors are open at rest: a few connections exhaust the rest.
    let (gw, web) = gateway_with_nofile(dir.path(), "24:24");
    let mut held = Vec::new();
    for _ in 0..24 {
        held.push(tokio::net::TcpStream::connect(web).await.unwrap());
    }
    // Three or more failed accepts, 500 ms apart.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let resp = common::http::try_get(&format!("http://{web}/metrics"), &[]).await;
        if let Ok(resp) = resp {
            break resp.text();
        }
        assert!(Instant::now() < deadline, "the gateway did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let failures = common::ferry::metric_value(&metrics, "ferry_gateway_accept_errors_total", &[])
        .unwrap_or_else(|| panic!("no accept errors in:\n{metrics}"));
    assert!(failures >= 3.0, "{failures}");
    let lines = gw.stop();
    let warned: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("accept failed"))
        .collect();
    assert_eq!(warned.len(), 1, "{lines:#?}");
    assert!(warned[0].contains("Too many open files"), "{}", warned[0]);
}

/// A named pipe where a file is expected is refused at once, one line per file, instead of
/// `check-config` (or a start) waiting forever for something to write into it.
#[test]
fn check_config_refuses_named_pipes_at_once_naming_each_file() {
    let dir = TempDir::new().unwrap();
    let text = "gateway:
  web:
    listen_address: 127.0.0.1:0
  tunnel:
    listen_address: 127.0.0.1:0
    tls_cert_file: tunnel.crt
    tls_key_file: tunnel.key
  data_dir: data
  auth:
    tokens_file: tokens
";
    write(dir.path(), "ferry.yaml", text);
    for name in ["tokens", "tunnel.crt", "tunnel.key"] {
        common::make_fifo(&dir.path().join(name));
    }
    let started = Instant::now();
    let out = ferry(dir.path(), &["check-config", "ferry.yaml"]);
    assert!(started.elapsed() < Duration::from_secs(5), "{out:?}");
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{out:?}");
    let lines = stderr_lines(&out);
    let pipe = "not a regular file (a named pipe)";
    assert_eq!(
        lines,
        [
            format!("ferry.yaml: gateway.tunnel.tls_cert_file: cannot read tunnel.crt: {pipe}"),
            format!("ferry.yaml: gateway.tunnel.tls_key_file: cannot read tunnel.key: {pipe}"),
            format!("ferry.yaml: gateway.auth.tokens_file: cannot read tokens file tokens: {pipe}"),
        ]
    );

    // The configuration file itself, for check-config and run alike.
    common::make_fifo(&dir.path().join("ferry.yaml"));
    for args in [
        &["check-config", "ferry.yaml"][..],
        &["run", "--config.file", "ferry.yaml"],
    ] {
        let started = Instant::now();
        let out = ferry(dir.path(), args);
        assert!(started.elapsed() < Duration::from_secs(5), "{out:?}");
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{args:?}: {out:?}");
        assert_eq!(
            stderr_lines(&out),
            [format!("ferry.yaml: cannot read: {pipe}")],
            "{args:?}"
        );
    }
}

/// The agent's token file as a named pipe: refused at start, naming the flag and the file.
#[test]
fn agent_refuses_a_token_file_that_is_a_named_pipe() {
    let dir = TempDir::new().unwrap();
    common::make_fifo(&dir.path().join("agent-token"));
    let started = Instant::now();
    let out = ferry(
        dir.path(),
        &agent_flags(&["--target", "node=http://127.0.0.1:9100/metrics"]),
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{out:?}");
    let line = one_config_error(&out);
    assert!(
        line.contains("--token-file")
            && line.contains("cannot read agent-token: not a regular file (a named pipe)"),
        "{line}"
    );
}

/// `rm tokens; mkfifo tokens; kill -HUP`: the reload fails at once naming the file, the
/// previous credentials stay, the gateway goes on answering and still stops on SIGTERM.
#[test]
fn a_tokens_file_replaced_by_a_named_pipe_fails_the_reload_not_the_gateway() {
    let dir = TempDir::new().unwrap();
    let tokens = tokens_file(dir.path(), "s3cret");
    let mut gw = Running::gateway(dir.path(), &tokens, &[]);
    let web = logged_address(&gw.wait_for("gateway web listener up"));
    common::make_fifo(&tokens);
    gw.signal(rustix::process::Signal::HUP);
    let line = gw.wait_for("tokens file reload failed");
    assert!(
        line.contains(&format!(
            "cannot read tokens file {}: not a regular file (a named pipe)",
            tokens.display()
        )),
        "{line}"
    );
    gw.wait_for("reload done, not all of it applied");
    assert_eq!(healthy_status(&web.to_string()).unwrap(), "HTTP/1.1 200 OK");
    gw.stop();
}

/// glibc arenas besides the main one that process `pid` has: each is a heap mapped at a
/// multiple of 64 MiB (`HEAP_MAX_SIZE` on 64-bit), anonymous.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn extra_malloc_arenas(pid: u32) -> usize {
    const HEAP_ALIGN: u64 = 64 << 20;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let start = fields[0].split('-').next().unwrap();
            fields.len() == 5 && u64::from_str_radix(start, 16).unwrap() % HEAP_ALIGN == 0
        })
        .count()
}

/// A gateway's worker threads share one malloc arena (less memory per idle tunnel,
/// `src/cli/malloc_arenas.rs`) once they have all served requests; `MALLOC_ARENA_MAX` set by
/// the operator wins, and then glibc gives them arenas of their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn a_gateway_shares_one_malloc_arena_unless_the_operator_says_otherwise() {
    let dir = TempDir::new().unwrap();
    let tokens = tokens_file(dir.path(), "s3cret");
    let arenas_after_requests = |env: Option<&str>| {
        let mut cmd = Running::gateway_command(dir.path(), &tokens, &[]);
        if let Some(max) = env {
            cmd.env("MALLOC_ARENA_MAX", max);
        }
        let mut gw = Running::spawn(cmd);
        let web = logged_address(&gw.wait_for("gateway web listener up")).to_string();
        // Enough concurrent requests that both workers and the blocking pool allocate.
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let web = web.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        assert!(http_get(&web, "/metrics")
                            .unwrap()
                            .starts_with("HTTP/1.1 200"));
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
        let arenas = extra_malloc_arenas(gw.child.0.id());
        gw.stop();
        arenas
    };
    // One arena per four cores: on this project's 2-core machines, glibc's main one alone.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let allowed_beside_main = cores.div_ceil(4) - 1;
    let limited = arenas_after_requests(None);
    assert!(limited <= allowed_beside_main, "{limited} on {cores} cores");
    let own = arenas_after_requests(Some("8"));
    assert!(own > allowed_beside_main, "glibc's own choice: {own}");
}

/// An egress rule's client certificate without its key (or a key that is not there) is one
/// line naming the field, as the agent's are.
#[test]
fn an_egress_client_certificate_needs_its_key() {
    let dir = TempDir::new().unwrap();
    write(dir.path(), "client.pem", "not read: the key is missing\n");
    let error_with = |tls_upgrade: &str| {
        let yaml = format!(
            "egress:\n  rules:\n    - name: collector\n      upstream: collector.example.com:443\n      tls_upgrade: {tls_upgrade}\n"
        );
        let config = write(dir.path(), "egress.yaml", &yaml);
        one_config_error(&ferry(
            dir.path(),
            &["check-config", config.to_str().unwrap()],
        ))
    };
    let line = error_with("{cert_file: client.pem}");
    assert!(
        line.contains("egress.rules[0].tls_upgrade.key_file")
            && line.contains("required when rules[0].tls_upgrade.cert_file is set"),
        "{line}"
    );
    let line = error_with("{cert_file: client.pem, key_file: client.key}");
    assert!(
        line.contains("egress.rules[0].tls_upgrade.key_file") && line.contains("client.key"),
        "{line}"
    );
}

/// An egress rule's client certificate that has expired is warned about by check-config and at
/// start, naming the rule (the field) and the file; SIGHUP re-reads the renewed one, and says so.
#[test]
fn egress_warns_about_an_expired_client_certificate_and_reloads_the_renewed_one() {
    let dir = TempDir::new().unwrap();
    let (expired, expired_key) = common::egress::expired_client_cert();
    let cert = write(dir.path(), "client.pem", &expired);
    write(dir.path(), "client.key", &expired_key);
    let config = write(
        dir.path(),
        "egress.yaml",
        "egress:
  web:
    listen_address: 127.0.0.1:0
  rules:
    - name: collector
      upstream: collector.example.com:443
      tls_upgrade: {cert_file: client.pem, key_file: client.key}
",
    );
    let checked = ferry(dir.path(), &["check-config", config.to_str().unwrap()]);
    assert_eq!(checked.status.code(), Some(0), "{checked:?}");
    let lines = stderr_lines(&checked);
    assert!(
        lines.len() == 1
            && lines[0].contains(&format!(
                "warning: egress.rules[0].tls_upgrade.cert_file: certificate {} expired on 2021-01-01",
                cert.display()
            )),
        "{lines:?}"
    );

    let mut egress = Running::start(
        dir.path(),
        &["run", "--config.file", config.to_str().unwrap()],
    );
    let warning = egress.wait_for("egress client certificate (tls_upgrade.cert_file)");
    assert!(
        warning.contains("rule=collector")
            && warning.contains(&format!(
                "certificate {} expired on 2021-01-01",
                cert.display()
            )),
        "{warning}"
    );
    egress.wait_for("egress proxy listening");

    let (_, renewed, renewed_key) = common::egress::ca_and_client_cert("the collector's CA");
    write(dir.path(), "client.pem", &renewed);
    write(dir.path(), "client.key", &renewed_key);
    egress.signal(rustix::process::Signal::HUP);
    egress.wait_for_all(&[
        "egress TLS upgrade files reloaded: new upstream connections of these rules use the new ones",
        "reload done: everything applied",
    ]);
    egress.stop();
}
