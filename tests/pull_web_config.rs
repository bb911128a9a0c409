//! `--web.config.file` on the gateway (Prometheus exporter-toolkit format): basic auth for scrapes
//! (through `Proxy-Authorization`, from Prometheus's `proxy_url` user info) and for ferry's own
//! endpoints, TLS on the web listener — and the real Prometheus authenticating both ways.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::external::{values, Prometheus};
use common::ferry::{agent_section, metric_value, start_agent, start_gateway};
use common::http::{get, get_via_proxy, get_with_headers};
use common::servers::{Behaviour, TargetServer};
use ferry::gateway::WebConfigReload;

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn web_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let path = dir.join("web.yml");
    std::fs::write(
        &path,
        format!("basic_auth_users:\n  prometheus: {hash}\n{extra}"),
    )
    .unwrap();
    path
}

/// A gateway whose web listener asks for basic auth: the user `prometheus` with `s3cret`, plus
/// `extra` lines of users. Returns it with its web config file.
async fn gateway_with_basic_auth(
    dir: &tempfile::TempDir,
    extra: &str,
) -> (common::ferry::TestGateway, std::path::PathBuf) {
    let config = web_config(dir.path(), extra);
    let gw = start_gateway(dir, &[("*", "t")], |s| {
        s.web.config_file = Some(config.clone())
    })
    .await;
    (gw, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_guards_scrapes_and_endpoints_and_leaves_authorization_to_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let target = TargetServer::start(Behaviour::Metrics("up 1\n".into())).await;
    let (gw, _) = gateway_with_basic_auth(&dir, "").await;
    let agent = start_agent(
        agent_section(&gw, "auth-1", &[("node", target.url("/metrics"))]),
        "t",
    );
    gw.wait_agent("auth-1", Duration::from_secs(10)).await;
    let url = format!("http://auth-1:{}/metrics", target.addr.port());

    let denied = get_via_proxy(gw.web, &url, &[]).await;
    assert_eq!(denied.status, 407, "{}", denied.text());
    assert_eq!(denied.header("ferry-error"), Some("gateway"));
    assert!(denied
        .header("proxy-authenticate")
        .is_some_and(|h| h.starts_with("Basic")));
    let proxy_url = format!("http://user:password@gateway:{}", gw.web.port());
    assert!(
        denied
            .text()
            .contains(&format!("in Prometheus's proxy_url ({proxy_url})")),
        "{}",
        denied.text()
    );
    let wrong = get_via_proxy(
        gw.web,
        &url,
        &[("proxy-authorization", &basic("prometheus", "nope"))],
    )
    .await;
    assert_eq!(wrong.status, 407);
    assert_eq!(
        target.requests(),
        0,
        "nothing was fetched for unauthenticated scrapes"
    );

    let target_auth = basic("target-user", "target-pass");
    let ok = get_via_proxy(
        gw.web,
        &url,
        &[
            ("proxy-authorization", &basic("prometheus", "s3cret")),
            ("authorization", &target_auth),
        ],
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let seen = target.last_headers().unwrap();
    assert_eq!(
        seen.get("authorization").and_then(|v| v.to_str().ok()),
        Some(target_auth.as_str()),
        "Authorization is the target's"
    );
    assert!(
        !seen.contains_key("proxy-authorization"),
        "the gateway's credentials stay at the gateway"
    );

    let sd = format!("http://{}/targets", gw.web);
    let sd_denied = get(&sd).await;
    assert_eq!(sd_denied.status, 401);
    assert_eq!(sd_denied.header("ferry-error"), Some("gateway"));
    assert_eq!(
        sd_denied.header("x-content-type-options"),
        Some("nosniff"),
        "a refusal at the gateway's own endpoints is one of its own answers"
    );
    let sd_ok = get_with_headers(&sd, &[("authorization", &basic("prometheus", "s3cret"))]).await;
    assert_eq!(sd_ok.status, 200);
    assert!(sd_ok.text().contains("auth-1:"), "{}", sd_ok.text());

    let metrics = gateway_metrics(&gw).await;
    for (reason, n) in [("proxy_auth", 2.0), ("auth", 1.0), ("connect", 0.0)] {
        assert_eq!(
            metric_value(
                &metrics,
                "ferry_gateway_web_refusals_total",
                &[("reason", reason)]
            ),
            Some(n),
            "{reason}: {metrics}"
        );
    }
    agent.stop().await;
    gw.stop().await;
}

/// Auth schemes are case-insensitive (RFC 9110 §11.1): `basic` and `BASIC` are `Basic`, for
/// the gateway's own endpoints (`Authorization`) and for scrapes (`Proxy-Authorization`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_basic_scheme_is_accepted_in_any_case() {
    let dir = tempfile::tempdir().unwrap();
    let target = TargetServer::start(Behaviour::Metrics("up 1\n".into())).await;
    let (gw, _) = gateway_with_basic_auth(&dir, "").await;
    let agent = start_agent(
        agent_section(&gw, "case-1", &[("node", target.url("/metrics"))]),
        "t",
    );
    gw.wait_agent("case-1", Duration::from_secs(10)).await;
    let url = format!("http://case-1:{}/metrics", target.addr.port());
    let sd = format!("http://{}/targets", gw.web);
    for scheme in ["basic", "BASIC", "bAsIc"] {
        let creds = basic("prometheus", "s3cret").replacen("Basic", scheme, 1);
        let scrape = get_via_proxy(gw.web, &url, &[("proxy-authorization", &creds)]).await;
        assert_eq!(scrape.status, 200, "{scheme}: {}", scrape.text());
        let own = get_with_headers(&sd, &[("authorization", &creds)]).await;
        assert_eq!(own.status, 200, "{scheme}: {}", own.text());
    }
    let wrong = basic("prometheus", "nope").replacen("Basic", "basic", 1);
    assert_eq!(
        get_with_headers(&sd, &[("authorization", &wrong)])
            .await
            .status,
        401,
        "a lowercase scheme is still checked"
    );
    agent.stop().await;
    gw.stop().await;
}

/// The gateway's own `/metrics`, with the test's credentials.
async fn gateway_metrics(gw: &common::ferry::TestGateway) -> String {
    let url = format!("http://{}/metrics", gw.web);
    get_with_headers(&url, &[("authorization", &basic("prometheus", "s3cret"))])
        .await
        .text()
}

/// Refusals before routing leave a warning in the log that says from where and what to fix, at
/// most once a minute per reason; the start-up line says what the web listener asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_warned_about_once_a_minute_per_reason() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = gateway_with_basic_auth(&dir, "").await;
    let started = logs
        .wait_lines(
            &["gateway web listener up", &gw.web.to_string()],
            1,
            Duration::from_secs(5),
        )
        .await;
    assert!(
        started[0].contains("tls=false") && started[0].contains("basic_auth=true"),
        "{started:?}"
    );
    for _ in 0..3 {
        let resp = get_via_proxy(gw.web, "http://node-3:9100/metrics", &[]).await;
        assert_eq!(resp.status, 407);
    }
    let wrong = basic("prometheus", "nope");
    let resp = get_with_headers(
        &format!("http://{}/targets", gw.web),
        &[("authorization", &wrong)],
    )
    .await;
    assert_eq!(resp.status, 401);

    let proxy_auth = logs.lines_with(&["refused a request before routing", "reason=proxy_auth"]);
    assert_eq!(proxy_auth.len(), 1, "{proxy_auth:#?}");
    assert!(
        proxy_auth[0].contains("remote=127.0.0.1:")
            && proxy_auth[0].contains("no credentials")
            && proxy_auth[0].contains("proxy_url"),
        "{proxy_auth:?}"
    );
    let auth = logs.lines_with(&["refused a request before routing", "reason=auth"]);
    assert_eq!(auth.len(), 1, "{auth:#?}");
    assert!(
        auth[0].contains("wrong user or password") && auth[0].contains("basic_auth"),
        "{auth:?}"
    );
    let metrics = gateway_metrics(&gw).await;
    assert_eq!(
        metric_value(
            &metrics,
            "ferry_gateway_web_refusals_total",
            &[("reason", "proxy_auth")]
        ),
        Some(3.0),
        "{metrics}"
    );
    gw.stop().await;
}

/// An agent pointed at a web listener behind basic auth is told it has the wrong listener, not
/// that the gateway refused its token (it asks for a user and password, never for a token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_at_the_basic_auth_web_listener_is_told_it_has_the_wrong_port() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = gateway_with_basic_auth(&dir, "").await;
    let mut section = agent_section(&gw, "node-web", &[]);
    section.gateway = Some(format!("http://localhost:{}", gw.web.port()));
    section.tunnel.fingerprint = Vec::new();
    section.tunnel.insecure_plaintext = true;
    let agent = start_agent(section, "t");
    logs.wait_lines(
        &[
            "cannot open tunnel",
            "gateway refused the tunnel with 401 Unauthorized",
            "asks for a user and password (basic auth)",
            "not its tunnel listener (default port 7443)",
        ],
        1,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        logs.lines_with(&["GATEWAY REFUSED OUR CREDENTIALS"])
            .is_empty(),
        "a wrong port is not a wrong token"
    );
    agent.stop().await;
    gw.stop().await;
}

/// A client guessing passwords neither evicts the verified password of the real client (its
/// scrapes stay fast) nor queues without bound behind bcrypt: past the queue's bound a guess is
/// answered 503 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_passwords_does_not_lock_out_a_verified_client() {
    let dir = tempfile::tempdir().unwrap();
    // A second user with a costlier hash, whose guesses fill the bcrypt queue; the first user's
    // cheap hash keeps overflowing the memory of refusals quick.
    let admin = bcrypt::hash("other", 9).unwrap();
    let (gw, _) = gateway_with_basic_auth(&dir, &format!("  admin: {admin}\n")).await;
    let healthy = format!("http://{}/-/healthy", gw.web);
    let right = basic("prometheus", "s3cret");
    let ok = get_with_headers(&healthy, &[("authorization", &right)]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());

    // Four at a time: as many new passwords as one address may have checked at once.
    let mut guesses = tokio::task::JoinSet::new();
    for batch in 0..4 {
        let healthy = healthy.clone();
        guesses.spawn(async move {
            for i in 0..300 {
                let guess = basic("prometheus", &format!("guess-{batch}-{i}"));
                let resp = get_with_headers(&healthy, &[("authorization", &guess)]).await;
                assert_eq!(resp.status, 401, "{}", resp.text());
            }
        });
    }
    while let Some(done) = guesses.join_next().await {
        done.unwrap();
    }

    let mut slow_guesses = tokio::task::JoinSet::new();
    for i in 0..200 {
        let healthy = healthy.clone();
        slow_guesses.spawn(async move {
            let guess = basic("admin", &format!("guess-{i}"));
            let resp = get_with_headers(&healthy, &[("authorization", &guess)]).await;
            let header = |name| resp.header(name).map(str::to_owned);
            (resp.status, header("retry-after"), header("ferry-error"))
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let verified = tokio::time::timeout(
        Duration::from_secs(2),
        get_with_headers(&healthy, &[("authorization", &right)]),
    )
    .await
    .expect("the verified client is answered within 2 s");
    assert_eq!(verified.status, 200, "{}", verified.text());
    assert!(started.elapsed() < Duration::from_secs(2));

    let mut busy = 0;
    while let Some(answer) = slow_guesses.join_next().await {
        match answer.unwrap() {
            (401, _, _) => {}
            (503, Some(retry), Some(source)) if retry == "1" && source == "gateway" => busy += 1,
            other => panic!("a guess was answered {other:?}"),
        }
    }
    assert!(busy > 0, "no guess was answered busy");
    let metrics = gateway_metrics(&gw).await;
    assert_eq!(
        metric_value(
            &metrics,
            "ferry_gateway_web_refusals_total",
            &[("reason", "busy")]
        ),
        Some(f64::from(busy)),
        "{metrics}"
    );
    gw.stop().await;
}

/// A self-signed certificate for `localhost` and its key, written as `web.pem` and `web-key.pem`
/// in `dir` (replacing, by rename, the ones there); returns the certificate.
fn write_web_cert(dir: &std::path::Path) -> rustls::pki_types::CertificateDer<'static> {
    write_web_cert_with(dir, |_| {})
}

/// [`write_web_cert`], with `tweak` changing the certificate's parameters (its dates).
fn write_web_cert_with(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut rcgen::CertificateParams),
) -> rustls::pki_types::CertificateDer<'static> {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    tweak(&mut params);
    let cert = params.self_signed(&key).unwrap();
    for (name, pem) in [
        ("web.pem", cert.pem()),
        ("web-key.pem", key.serialize_pem()),
    ] {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    cert.der().clone()
}

/// The status of `GET /-/healthy` over TLS at `addr`, trusting only `cert`; the error of the
/// handshake if it fails.
async fn healthy_over_tls(
    addr: std::net::SocketAddr,
    cert: &rustls::pki_types::CertificateDer<'static>,
) -> Result<u16, std::io::Error> {
    get_over_tls(addr, cert, "/-/healthy")
        .await
        .map(|(status, _)| status)
}

/// The status and body of `GET uri` (origin-form, or absolute-form as Prometheus sends scrapes
/// to its proxy) over TLS at `addr`, trusting only `cert`; the error of the handshake if it fails.
async fn get_over_tls(
    addr: std::net::SocketAddr,
    cert: &rustls::pki_types::CertificateDer<'static>,
    uri: &str,
) -> Result<(u16, String), std::io::Error> {
    use http_body_util::BodyExt;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(ferry::tunnel::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(uri)
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A web config file with TLS from `web.pem` and `web-key.pem`.
fn tls_web_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("web.yml");
    // Relative paths resolve against the web config file's directory, as in exporter-toolkit.
    std::fs::write(
        &path,
        "tls_server_config:\n  cert_file: web.pem\n  key_file: web-key.pem\n",
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_listener_speaks_tls_when_configured() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let cert = write_web_cert(dir.path());
    let path = tls_web_config(dir.path());
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.web.config_file = Some(path.clone())
    })
    .await;

    let status = healthy_over_tls(gw.web, &cert).await;
    assert_eq!(status.expect("TLS handshake with the web listener"), 200);
    let plain = common::http::try_get(&format!("http://{}/-/healthy", gw.web), &[]).await;
    assert!(
        plain.is_err() || plain.is_ok_and(|r| r.status == 400),
        "plain HTTP is not served on a TLS listener"
    );
    let warned = logs
        .wait_lines(
            &["refused a request before routing", "reason=tls_handshake"],
            1,
            Duration::from_secs(5),
        )
        .await;
    assert!(
        warned[0].contains("remote=127.0.0.1:") && warned[0].contains("use https://"),
        "{warned:?}"
    );
    let (status, metrics) = get_over_tls(gw.web, &cert, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(
            &metrics,
            "ferry_gateway_web_refusals_total",
            &[("reason", "tls_handshake")]
        ),
        Some(1.0),
        "{metrics}"
    );
    let started = logs.lines_with(&["gateway web listener up", &gw.web.to_string()]);
    assert!(
        started[0].contains("tls=true") && started[0].contains("basic_auth=false"),
        "{started:?}"
    );
    gw.stop().await;
}

/// The 407 of a TLS web listener tells Prometheus to reach it with an https:// proxy_url.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_url_asked_for_follows_the_web_listeners_scheme() {
    let dir = tempfile::tempdir().unwrap();
    let cert = write_web_cert(dir.path());
    let path = tls_web_config(dir.path());
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{text}basic_auth_users:\n  prometheus: {hash}\n"),
    )
    .unwrap();
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.web.config_file = Some(path.clone())
    })
    .await;
    let (status, body) = get_over_tls(gw.web, &cert, "http://node-1:9100/metrics")
        .await
        .expect("TLS handshake with the web listener");
    assert_eq!(status, 407, "{body}");
    let proxy_url = format!("https://user:password@gateway:{}", gw.web.port());
    assert!(
        body.contains(&format!("in Prometheus's proxy_url ({proxy_url})")),
        "{body}"
    );
    gw.stop().await;
}

/// A renewed certificate is served to new connections after a reload, without a restart; a
/// broken file keeps the certificate in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_a_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let old = write_web_cert(dir.path());
    let path = tls_web_config(dir.path());
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.web.config_file = Some(path.clone())
    })
    .await;
    assert_eq!(healthy_over_tls(gw.web, &old).await.unwrap(), 200);

    let new = write_web_cert(dir.path());
    assert_eq!(gw.gateway.reload_web_config(), Ok(WebConfigReload::Applied));
    assert_eq!(healthy_over_tls(gw.web, &new).await.unwrap(), 200);
    assert!(
        healthy_over_tls(gw.web, &old).await.is_err(),
        "the old certificate is not served any more"
    );

    std::fs::remove_file(dir.path().join("web-key.pem")).unwrap();
    let err = gw.gateway.reload_web_config().unwrap_err();
    assert!(err.contains("web-key.pem"), "{err}");
    assert_eq!(healthy_over_tls(gw.web, &new).await.unwrap(), 200);

    // Plain HTTP instead: the listener cannot change what it speaks without a restart.
    std::fs::write(&path, "").unwrap();
    assert_eq!(
        gw.gateway.reload_web_config(),
        Ok(WebConfigReload::TlsNeedsRestart)
    );
    assert_eq!(healthy_over_tls(gw.web, &new).await.unwrap(), 200);
    gw.stop().await;
}

/// A reload does not put a certificate that is not valid now in place of one that is: the
/// error names the web config file, the certificate file and the dates, and the certificate in
/// use is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_a_valid_certificate_rather_than_an_expired_one() {
    let dir = tempfile::tempdir().unwrap();
    let valid = write_web_cert(dir.path());
    let path = tls_web_config(dir.path());
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.web.config_file = Some(path.clone())
    })
    .await;
    write_web_cert_with(dir.path(), |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 6, 30);
    });
    let err = gw.gateway.reload_web_config().unwrap_err();
    let cert = dir.path().join("web.pem");
    let named = format!(
        "{}: tls_server_config: certificate file {}: expired on 2021-06-30 00:00:00 UTC, while the certificate in use is valid until",
        path.display(),
        cert.display()
    );
    assert!(err.starts_with(&named), "{err}");
    assert_eq!(healthy_over_tls(gw.web, &valid).await.unwrap(), 200);
    gw.stop().await;
}

/// A reload does not turn basic auth off: a file emptied, cut short (to its first line, as
/// `head -c` leaves it) or without users is refused, naming the file, and the users in force
/// stay. Turning basic auth on by a reload is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_never_turns_basic_auth_off() {
    let dir = tempfile::tempdir().unwrap();
    let cert = write_web_cert(dir.path());
    let path = tls_web_config(dir.path());
    let tls_only = std::fs::read_to_string(&path).unwrap();
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let users = format!("basic_auth_users:\n  prometheus: {hash}\n");
    std::fs::write(&path, format!("{tls_only}{users}")).unwrap();
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.web.config_file = Some(path.clone())
    })
    .await;
    let refused = || async {
        let (targets, _) = get_over_tls(gw.web, &cert, "/targets").await.unwrap();
        let (scrape, _) = get_over_tls(gw.web, &cert, "http://node-1:9100/metrics")
            .await
            .unwrap();
        (targets, scrape)
    };
    assert_eq!(refused().await, (401, 407));
    for broken in [
        String::new(),
        "tls_server_config:\n ".to_owned(),
        format!("{tls_only}basic_auth_users: {{}}\n"),
    ] {
        std::fs::write(&path, &broken).unwrap();
        let err = gw.gateway.reload_web_config().unwrap_err();
        assert_eq!(
            err,
            format!(
                "{}: no basic_auth_users (emptied, or caught half-written?): turning basic auth off takes a restart",
                path.display()
            ),
            "{broken:?}"
        );
        assert_eq!(refused().await, (401, 407), "{broken:?}");
    }
    gw.stop().await;

    std::fs::write(&path, &tls_only).unwrap();
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.web.config_file = Some(path.clone())
    })
    .await;
    let (status, _) = get_over_tls(gw.web, &cert, "/targets").await.unwrap();
    assert_eq!(status, 200);
    std::fs::write(&path, format!("{tls_only}{users}")).unwrap();
    assert_eq!(gw.gateway.reload_web_config(), Ok(WebConfigReload::Applied));
    let (status, _) = get_over_tls(gw.web, &cert, "/targets").await.unwrap();
    assert_eq!(status, 401, "basic auth turned on by a reload");
    gw.stop().await;
}

/// After a reload a user's password verified under the old file is not taken on trust: a
/// changed password stops working at once, and so does a removed user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_revokes_changed_and_removed_passwords_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let admin = bcrypt::hash("admin-pass", 4).unwrap();
    let (gw, config) = gateway_with_basic_auth(&dir, &format!("  admin: {admin}\n")).await;
    let healthy = format!("http://{}/-/healthy", gw.web);
    let status = |user: &str, password: &str| {
        let auth = basic(user, password);
        let healthy = healthy.clone();
        async move {
            get_with_headers(&healthy, &[("authorization", &auth)])
                .await
                .status
        }
    };
    // Verified, hence remembered.
    assert_eq!(status("prometheus", "s3cret").await, 200);
    assert_eq!(status("admin", "admin-pass").await, 200);

    let rotated = bcrypt::hash("rotated", 4).unwrap();
    std::fs::write(
        &config,
        format!("basic_auth_users:\n  prometheus: {rotated}\n"),
    )
    .unwrap();
    assert_eq!(gw.gateway.reload_web_config(), Ok(WebConfigReload::Applied));
    assert_eq!(status("prometheus", "s3cret").await, 401);
    assert_eq!(status("admin", "admin-pass").await, 401);
    assert_eq!(status("prometheus", "rotated").await, 200);

    std::fs::write(&config, "basic_auth_users:\n  prometheus: plaintext\n").unwrap();
    assert!(gw.gateway.reload_web_config().is_err());
    assert_eq!(
        status("prometheus", "rotated").await,
        200,
        "the old file stays"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_authenticates_through_proxy_url_and_http_sd_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let target = TargetServer::start(Behaviour::Metrics("authed_metric 42\n".into())).await;
    let (gw, _) = gateway_with_basic_auth(&dir, "").await;
    let agent = start_agent(
        agent_section(&gw, "authed-node", &[("app", target.url("/metrics"))]),
        "t",
    );
    gw.wait_agent("authed-node", Duration::from_secs(10)).await;
    let web = gw.web;
    let prometheus = Prometheus::start(&format!(
        r#"
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: ferry
    proxy_url: http://prometheus:s3cret@{web}
    http_sd_configs:
      - url: http://{web}/targets
        refresh_interval: 1s
        basic_auth:
          username: prometheus
          password: s3cret
"#
    ))
    .await;
    prometheus
        .wait_for(
            r#"authed_metric{ferry_agent="authed-node"}"#,
            Duration::from_secs(60),
            |v| values(v) == [42.0],
        )
        .await;
    agent.stop().await;
    gw.stop().await;
}
