//! Tunnel TLS as users configure it: a gateway certificate from files verified by the agent's CA
//! file, a pinned fingerprint that does not match, and mTLS with client certificates.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::ferry::{agent_section, metric_value, start_agent, start_gateway};
use common::http::get;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// An HTTPS target server with `cert`/`key` (PEM files), answering every request with `body`.
async fn https_target(cert: &Path, key: &Path, body: &'static str) -> std::net::SocketAddr {
    use hyper_util::rt::TokioIo;
    let (acceptor, listener) = tls_listener(cert, key).await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// A TLS acceptor with `cert`/`key` (PEM files) and a listener on 127.0.0.1:0 for it.
async fn tls_listener(
    cert: &Path,
    key: &Path,
) -> (tokio_rustls::TlsAcceptor, tokio::net::TcpListener) {
    let certs = ferry::tunnel::tls::read_certs(cert).unwrap();
    let key = ferry::tunnel::tls::read_key(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(ferry::tunnel::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    (acceptor, listener)
}

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A CA, a server certificate for `localhost` and a client certificate, all signed by the CA.
fn pki(dir: &Path) -> Pki {
    pki_with(dir, |_| {})
}

/// [`pki`], with `server` changing the server certificate's parameters (its dates).
fn pki_with(dir: &Path, server: impl FnOnce(&mut CertificateParams)) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let leaf = |params: CertificateParams| {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let mut server_params = CertificateParams::new(vec!["localhost".into()]).unwrap();
    server(&mut server_params);
    let (server_pem, server_key) = leaf(server_params);
    let (client_pem, client_key) = leaf(CertificateParams::new(vec!["agent.test".into()]).unwrap());
    Pki {
        ca: write("ca.pem", ca.pem()),
        server_cert: write("server.pem", server_pem),
        server_key: write("server-key.pem", server_key),
        client_cert: write("client.pem", client_pem),
        client_key: write("client-key.pem", client_key),
    }
}

async fn handshakes(web: std::net::SocketAddr, result: &str) -> f64 {
    let text = get(&format!("http://{web}/metrics")).await.text();
    metric_value(
        &text,
        "ferry_gateway_tunnel_handshakes_total",
        &[("result", result)],
    )
    .unwrap_or(0.0)
}

/// A gateway serving the certificate and key files `cert` and `key` on its tunnel listener.
async fn gateway_with_cert(
    dir: &tempfile::TempDir,
    cert: &Path,
    key: &Path,
) -> common::ferry::TestGateway {
    start_gateway(dir, &[("*", "t")], |s| {
        s.tunnel.tls_self_signed_names.clear();
        s.tunnel.tls_cert_file = Some(cert.to_path_buf());
        s.tunnel.tls_key_file = Some(key.to_path_buf());
    })
    .await
}

/// Agent `id`'s section for `gw`, verifying the gateway with the CA file `ca` (no pin).
fn agent_trusting(
    gw: &common::ferry::TestGateway,
    id: &str,
    ca: &Path,
) -> ferry::config::AgentSection {
    let mut section = agent_section(gw, id, &[]);
    section.tunnel.fingerprint = Vec::new();
    section.tunnel.ca_file = Some(ca.to_path_buf());
    section
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_verifies_gateway_certificate_with_its_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let gw = gateway_with_cert(&dir, &pki.server_cert, &pki.server_key).await;
    let section = agent_trusting(&gw, "node-ca", &pki.ca);
    let agent = start_agent(section, "t");
    gw.wait_agent("node-ca", Duration::from_secs(10)).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_fingerprint_never_connects() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(&dir, &[("*", "t")], |_| {}).await;
    let mut section = agent_section(&gw, "node-fp", &[]);
    section.tunnel.fingerprint = vec![format!("sha256:{}", "ab".repeat(32))];
    let agent = start_agent(section, "t");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        gw.agent_ids().is_empty(),
        "agent connected despite a wrong pin"
    );
    assert!(!agent.agent.is_connected());
    assert!(
        handshakes(gw.web, "tls_error").await >= 1.0,
        "the gateway saw the TLS handshake fail"
    );
    let expected = format!("expected sha256:{}", "ab".repeat(32));
    let lines = logs.lines_with(&[
        "cannot open tunnel",
        "server certificate fingerprint is sha256:",
        &expected,
    ]);
    assert!(!lines.is_empty(), "the agent says which fingerprint it got");
    assert!(!lines[0].contains("unexpected error"), "{lines:?}");
    // The gateway's side of it, at the default level: once, with what it probably means.
    let gateway_says = logs.lines_with(&["WARN", "tunnel handshake failed", "tunnel.fingerprint"]);
    assert_eq!(
        gateway_says.len(),
        1,
        "one warning a minute: {gateway_says:?}"
    );
    agent.stop().await;
}

/// Prometheus (or curl) pointed at the tunnel port instead of the web port gets a 400 that
/// names the right listener, not TLS bytes it cannot read; the gateway warns about it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_tunnel_port_is_told_where_the_web_listener_is() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(&dir, &[("*", "t")], |_| {}).await;
    let resp = common::http::get_via_proxy(gw.tunnel, "http://node-1:9100/metrics", &[]).await;
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(
        resp.text()
            .starts_with("this is ferry's tunnel listener, which speaks TLS")
            && resp.text().contains("web listener"),
        "{}",
        resp.text()
    );
    assert_eq!(resp.header("ferry-error"), Some("gateway"));
    assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
    // An HTTP answer as every other one, dated (RFC 9110 6.6.1).
    let date = resp.header("date").expect("a Date header");
    assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
    assert!(handshakes(gw.web, "tls_error").await >= 1.0);
    logs.wait_lines(
        &[
            "WARN",
            "tunnel handshake failed",
            "plain HTTP sent to the TLS tunnel listener",
        ],
        1,
        Duration::from_secs(5),
    )
    .await;
    // The listener still serves agents.
    let agent = start_agent(agent_section(&gw, "node-1", &[]), "t");
    gw.wait_agent("node-1", Duration::from_secs(10)).await;
    agent.stop().await;
}

/// The two usual set-up mistakes get the fix in the agent's log, not only rustls's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usual_tunnel_tls_mistakes_are_explained() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(&dir, &[("*", "t")], |_| {}).await;

    let mut no_pin = agent_section(&gw, "node-no-pin", &[]);
    no_pin.tunnel.fingerprint = Vec::new();
    let no_pin = start_agent(no_pin, "t");
    logs.wait_lines(
        &[
            "cannot open tunnel",
            "not signed by a CA this host trusts",
            "--tunnel.fingerprint",
        ],
        1,
        Duration::from_secs(10),
    )
    .await;

    let mut web_port = agent_section(&gw, "node-web-port", &[]);
    web_port.gateway = Some(format!("https://localhost:{}", gw.web.port()));
    let web_port = start_agent(web_port, "t");
    logs.wait_lines(
        &[
            "cannot open tunnel",
            "does not speak TLS",
            "is --gateway the tunnel port",
        ],
        1,
        Duration::from_secs(10),
    )
    .await;
    // A CA file that did not issue the (self-signed) certificate: named, with the likely fix.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let other_ca = pki(&other).ca;
    let mut wrong_ca = agent_section(&gw, "node-wrong-ca", &[]);
    wrong_ca.tunnel.fingerprint = Vec::new();
    wrong_ca.tunnel.ca_file = Some(other_ca.clone());
    let wrong_ca = start_agent(wrong_ca, "t");
    let named = format!(
        "not signed by a CA in {} (--tunnel.ca-file)",
        other_ca.display()
    );
    logs.wait_lines(
        &["cannot open tunnel", &named, "--tunnel.fingerprint instead"],
        1,
        Duration::from_secs(10),
    )
    .await;
    assert!(gw.agent_ids().is_empty());
    no_pin.stop().await;
    web_port.stop().await;
    wrong_ca.stop().await;
}

/// A gateway URL that reaches the wrong listener, or checks the wrong name, gets the fix in the
/// agent's log, not only the words of the layer that failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_url_for_the_wrong_listener_or_name_is_explained() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let gw = gateway_with_cert(&dir, &pki.server_cert, &pki.server_key).await;
    let wait = |parts: &'static [&'static str]| {
        let logs = logs.clone();
        async move { logs.wait_lines(parts, 1, Duration::from_secs(10)).await }
    };

    // Plaintext to the TLS tunnel port: the gateway sees plain HTTP and says it speaks TLS.
    // (Another TLS server would answer with TLS bytes: the agent's own hint covers that.)
    let mut plain_to_tls = agent_section(&gw, "node-plain-tls", &[]);
    plain_to_tls.gateway = Some(format!("http://localhost:{}", gw.tunnel.port()));
    plain_to_tls.tunnel.fingerprint = Vec::new();
    plain_to_tls.tunnel.insecure_plaintext = true;
    let plain_to_tls = start_agent(plain_to_tls, "t");
    wait(&[
        "cannot open tunnel",
        "gateway refused the tunnel with 400 Bad Request: this is ferry's tunnel listener, which speaks TLS to agents (https://)",
    ])
    .await;
    plain_to_tls.stop().await;

    // Plaintext to another TLS server (a TLS front end): its answer is no HTTP at all.
    let tls_front = https_target(&pki.server_cert, &pki.server_key, "x").await;
    let mut plain_to_front = agent_section(&gw, "node-plain-front", &[]);
    plain_to_front.gateway = Some(format!("http://localhost:{}", tls_front.port()));
    plain_to_front.tunnel.fingerprint = Vec::new();
    plain_to_front.tunnel.insecure_plaintext = true;
    let plain_to_front = start_agent(plain_to_front, "t");
    wait(&[
        "cannot open tunnel",
        "the answer was not HTTP: that port speaks TLS (use an https:// gateway URL and drop --tunnel.insecure-plaintext",
    ])
    .await;
    plain_to_front.stop().await;

    // Plaintext to the web port: its 404 is written for Prometheus.
    let mut web_port = agent_section(&gw, "node-plain-web", &[]);
    web_port.gateway = Some(format!("http://localhost:{}", gw.web.port()));
    web_port.tunnel.fingerprint = Vec::new();
    web_port.tunnel.insecure_plaintext = true;
    let web_port = start_agent(web_port, "t");
    wait(&[
        "cannot open tunnel",
        "gateway refused the tunnel with 404 Not Found",
        "this looks like the gateway's web listener (or another web server), not its tunnel listener (default port 7443)",
    ])
    .await;
    web_port.stop().await;

    // The certificate names localhost; the URL has the address.
    let mut by_address = agent_section(&gw, "node-by-address", &[]);
    by_address.gateway = Some(format!("https://127.0.0.1:{}", gw.tunnel.port()));
    by_address.tunnel.fingerprint = Vec::new();
    by_address.tunnel.ca_file = Some(pki.ca.clone());
    let by_address = start_agent(by_address, "t");
    wait(&[
        "cannot open tunnel",
        "the gateway's certificate is valid for localhost, not 127.0.0.1;",
        "with --tunnel.server-name (tunnel.server_name in the file)",
    ])
    .await;
    by_address.stop().await;
    assert!(gw.agent_ids().is_empty());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_gateway_accepts_only_agents_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.tunnel.tls_client_ca_file = Some(pki.ca.clone());
    })
    .await;
    let without = start_agent(agent_section(&gw, "no-cert", &[]), "t");
    let mut section = agent_section(&gw, "with-cert", &[]);
    section.tunnel.cert_file = Some(pki.client_cert.clone());
    section.tunnel.key_file = Some(pki.client_key.clone());
    let with = start_agent(section, "t");
    gw.wait_agent("with-cert", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        gw.agent_ids(),
        ["with-cert"],
        "only the agent with a client certificate is connected"
    );
    assert!(handshakes(gw.web, "tls_error").await >= 1.0);
    without.stop().await;
    with.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_targets_use_their_own_tls_options() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    // The server certificate names "localhost"; the target is dialled by IP with a server_name.
    let addr = https_target(&pki.server_cert, &pki.server_key, "secure_metric 1\n").await;
    let other_ca = pki_in(dir.path(), "other");
    let gw = start_gateway(&dir, &[("*", "t")], |_| {}).await;
    let url = format!("https://127.0.0.1:{}/metrics", addr.port());
    let mut section = agent_section(
        &gw,
        "tls-targets",
        &[
            ("good", url.clone()),
            ("insecure", url.clone()),
            ("wrongca", url),
        ],
    );
    section.targets[0].tls.ca_file = Some(pki.ca.clone());
    section.targets[0].tls.server_name = Some("localhost".into());
    section.targets[1].port = Some(9001);
    section.targets[1].tls.insecure_skip_verify = true;
    section.targets[2].port = Some(9002);
    section.targets[2].tls.ca_file = Some(other_ca);
    section.targets[2].tls.server_name = Some("localhost".into());
    let agent = start_agent(section, "t");
    gw.wait_agent("tls-targets", Duration::from_secs(10)).await;
    let web = gw.web;
    let scrape = |port: u16| async move {
        let url = format!("http://tls-targets:{port}/metrics");
        common::http::get_via_proxy(web, &url, &[]).await
    };
    let good = scrape(addr.port()).await;
    assert_eq!(good.status, 200, "{}", good.text());
    assert_eq!(good.text(), "secure_metric 1\n");
    let insecure = scrape(9001).await;
    assert_eq!(insecure.status, 200, "{}", insecure.text());
    let wrong = scrape(9002).await;
    assert_eq!(
        wrong.status,
        502,
        "a CA that did not sign the target's certificate: {}",
        wrong.text()
    );
    assert!(wrong.text().contains("wrongca"), "{}", wrong.text());
    assert!(
        !wrong.text().contains("client error"),
        "the cause, not the HTTP client's wrapper: {}",
        wrong.text()
    );
    agent.stop().await;
}

/// The CA file of another, unrelated PKI.
fn pki_in(dir: &Path, name: &str) -> PathBuf {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    pki(&sub).ca
}

/// An HTTPS target that answers as simple exporters do: HTTP/1.0, no `Content-Length`, the end
/// of the body marked by closing the connection, and no TLS `close_notify` before the close.
async fn abrupt_https_target(cert: &Path, key: &Path, body: &'static str) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let (acceptor, listener) = tls_listener(cert, key).await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if common::servers::read_request_head(&mut tls).await.is_none() {
                    return;
                }
                let resp = format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}");
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.flush().await;
                // Close TCP without shutting TLS down: no close_notify.
                let (tcp, _) = tls.into_inner();
                drop(tcp);
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_target_closing_without_close_notify_is_scraped_whole() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let body = "# TYPE abrupt_metric gauge\nabrupt_metric 1\n";
    let addr = abrupt_https_target(&pki.server_cert, &pki.server_key, body).await;
    let gw = start_gateway(&dir, &[("*", "t")], |_| {}).await;
    let url = format!("https://127.0.0.1:{}/metrics", addr.port());
    let mut section = agent_section(&gw, "abrupt", &[("abrupt", url)]);
    section.targets[0].tls.ca_file = Some(pki.ca.clone());
    section.targets[0].tls.server_name = Some("localhost".into());
    let agent = start_agent(section, "t");
    gw.wait_agent("abrupt", Duration::from_secs(10)).await;
    let url = format!("http://abrupt:{}/metrics", addr.port());
    for round in 0..2 {
        let resp = common::http::get_via_proxy(gw.web, &url, &[]).await;
        assert_eq!(resp.status, 200, "round {round}: {}", resp.text());
        assert_eq!(resp.text(), body, "round {round}");
    }
    let metrics = get(&format!("http://{}/metrics", gw.web)).await.text();
    assert_eq!(
        metric_value(
            &metrics,
            "ferry_gateway_scrapes_total",
            &[("agent", "abrupt"), ("status_class", "2xx")]
        ),
        Some(2.0),
        "{metrics}"
    );
    agent.stop().await;
}

/// The fingerprint of the certificate `tunnel` presents to a client connecting now.
async fn presented_fingerprint(tunnel: std::net::SocketAddr) -> String {
    use ferry::tunnel::tls_client::{client_config, ClientTls, Purpose, ServerVerify};
    let tls = ClientTls {
        verify: ServerVerify::InsecureSkipVerify,
        client_cert: None,
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        client_config(&tls, Purpose::Tunnel).unwrap(),
    ));
    let tcp = tokio::net::TcpStream::connect(tunnel).await.unwrap();
    let stream = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS to the gateway");
    let certs = stream.get_ref().1.peer_certificates().unwrap();
    ferry::tunnel::tls::fingerprint(&certs[0])
}

/// Copies `pki`'s server certificate and key over `cert` and `key`, as a renewal does.
fn install(pki: &Pki, cert: &Path, key: &Path) {
    std::fs::copy(&pki.server_cert, cert).unwrap();
    std::fs::copy(&pki.server_key, key).unwrap();
}

/// A renewed tunnel certificate is presented to tunnels accepted after the reload while the
/// established ones stay up; files that do not work keep the certificate in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_tunnel_certificate_applies_to_new_tunnels_and_bad_files_keep_the_old_one() {
    use ferry::gateway::TunnelTlsReload;
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    std::fs::create_dir_all(&old).unwrap();
    std::fs::create_dir_all(&new).unwrap();
    let (old, new) = (pki(&old), pki(&new));
    let (cert, key) = (dir.path().join("tun.crt"), dir.path().join("tun.key"));
    install(&old, &cert, &key);
    let gw = gateway_with_cert(&dir, &cert, &key).await;
    let old_fp = gw.fingerprint();
    assert_eq!(presented_fingerprint(gw.tunnel).await, old_fp);
    let established = start_agent(agent_section(&gw, "node-old", &[]), "t");
    gw.wait_agent("node-old", Duration::from_secs(10)).await;

    install(&new, &cert, &key);
    let reloaded = gw.gateway.reload_tunnel_tls().unwrap();
    let new_fp = presented_fingerprint(gw.tunnel).await;
    assert_ne!(new_fp, old_fp);
    assert_eq!(
        reloaded,
        TunnelTlsReload::Applied {
            fingerprint: new_fp.clone(),
            changed: true
        }
    );
    assert_eq!(gw.fingerprint(), new_fp);
    assert!(
        established.agent.is_connected() && gw.agent_ids() == ["node-old"],
        "the established tunnel keeps its certificate"
    );

    // A certificate copied without its key: refused, naming both files.
    std::fs::copy(&old.server_cert, &cert).unwrap();
    let err = gw.gateway.reload_tunnel_tls().unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "the key in {} does not belong to the certificate in {}",
            key.display(),
            cert.display()
        )
    );
    assert_eq!(presented_fingerprint(gw.tunnel).await, new_fp);
    std::fs::write(&cert, "half a file").unwrap();
    let err = gw.gateway.reload_tunnel_tls().unwrap_err().to_string();
    assert!(err.contains(&cert.display().to_string()), "{err}");
    assert_eq!(presented_fingerprint(gw.tunnel).await, new_fp);
    assert_eq!(gw.fingerprint(), new_fp);

    let text = get(&format!("http://{}/metrics", gw.web)).await.text();
    let not_after = metric_value(
        &text,
        "ferry_gateway_tls_certificate_not_after_seconds",
        &[("listener", "tunnel")],
    )
    .expect("the tunnel certificate's expiry is exported");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(not_after > now, "{not_after}");
    established.stop().await;
}

/// A reload does not put a certificate that is not valid now (expired, or not valid yet) in
/// place of one that is: every agent checking dates would be refused from then on. The error
/// names the file and the dates; the certificate in use stays, and agents still connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_a_valid_certificate_rather_than_one_outside_its_dates() {
    let dir = tempfile::tempdir().unwrap();
    let [valid, expired, early] = ["valid", "expired", "early"].map(|name| {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        sub
    });
    let valid = pki(&valid);
    let expired = pki_with(&expired, |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 6, 30);
    });
    let early = pki_with(&early, |p| {
        p.not_before = rcgen::date_time_ymd(2099, 1, 1);
        p.not_after = rcgen::date_time_ymd(2100, 1, 1);
    });
    let (cert, key) = (dir.path().join("tun.crt"), dir.path().join("tun.key"));
    install(&valid, &cert, &key);
    let gw = gateway_with_cert(&dir, &cert, &key).await;
    let in_use = gw.fingerprint();
    for (pki, dates) in [
        (&expired, "expired on 2021-06-30 00:00:00 UTC".to_owned()),
        (
            &early,
            "is not valid before 2099-01-01 00:00:00 UTC (now ".to_owned(),
        ),
    ] {
        install(pki, &cert, &key);
        let err = gw.gateway.reload_tunnel_tls().unwrap_err().to_string();
        let named = format!("certificate file {}: {dates}", cert.display());
        assert!(
            err.starts_with(&named) && err.contains("while the certificate in use is valid until"),
            "{err}"
        );
        assert_eq!(presented_fingerprint(gw.tunnel).await, in_use);
        assert_eq!(gw.fingerprint(), in_use);
    }
    let section = agent_trusting(&gw, "node-ca", &valid.ca);
    let agent = start_agent(section, "t");
    gw.wait_agent("node-ca", Duration::from_secs(10)).await;
    agent.stop().await;
}

/// An agent verifying the gateway with its CA file refuses an expired certificate: the
/// gateway's warning about the failed handshake says that is what the agent found, not that a
/// fingerprint or CA file does not match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refusing_an_expired_certificate_is_explained_on_the_gateway() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki_with(dir.path(), |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 6, 30);
    });
    let gw = gateway_with_cert(&dir, &pki.server_cert, &pki.server_key).await;
    let section = agent_trusting(&gw, "node-ca", &pki.ca);
    let agent = start_agent(section, "t");
    let said = logs
        .wait_lines(
            &["WARN", "tunnel handshake failed", "CertificateExpired"],
            1,
            Duration::from_secs(10),
        )
        .await;
    assert!(
        said[0].contains("certificate expired or not valid yet")
            && !said[0].contains("tunnel.fingerprint"),
        "{said:?}"
    );
    assert!(gw.agent_ids().is_empty());
    agent.stop().await;
}

/// An expired certificate in the data directory (generated ones never expire; this one was put
/// there) is not refused by agents pinning its fingerprint, and SIGHUP does not renew it: the
/// warning says both, and what does renew it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_self_signed_certificate_gets_advice_that_works() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 6, 30);
    let cert_file = data.join(ferry::tunnel::tls_server::SELF_SIGNED_CERT);
    std::fs::write(&cert_file, params.self_signed(&key).unwrap().pem()).unwrap();
    std::fs::write(
        data.join(ferry::tunnel::tls_server::SELF_SIGNED_KEY),
        key.serialize_pem(),
    )
    .unwrap();
    let gw = start_gateway(&dir, &[("*", "t")], |_| {}).await;
    let expired = format!(
        "certificate {} expired on 2021-06-30 00:00:00 UTC",
        cert_file.display()
    );
    let said = logs.lines_with(&["WARN", &expired]);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("agents pinning its fingerprint (tunnel.fingerprint) do not check dates")
            && said[0].contains("remove both files in the data directory and restart")
            && !said[0].contains("SIGHUP"),
        "{said:?}"
    );
    // As it says: an agent pinning the fingerprint connects.
    let agent = start_agent(agent_section(&gw, "node-pin", &[]), "t");
    gw.wait_agent("node-pin", Duration::from_secs(10)).await;
    agent.stop().await;
}

/// A gateway that generates its certificate says so, loudly: on any start but the first, the
/// agents' pins no longer match. While a certificate is replaced, an agent pins both: it
/// connects to either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pinning_two_fingerprints_connects_with_either() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(&dir, &[("*", "t")], |_| {}).await;
    let generated = logs.lines_with(&[
        "WARN",
        "generated a new self-signed tunnel certificate",
        &gw.fingerprint(),
    ]);
    assert_eq!(generated.len(), 1, "{generated:?}");
    for (id, pins) in [
        (
            "node-new-first",
            vec![gw.fingerprint(), format!("sha256:{}", "ab".repeat(32))],
        ),
        (
            "node-new-second",
            vec![format!("sha256:{}", "ab".repeat(32)), gw.fingerprint()],
        ),
    ] {
        let mut section = agent_section(&gw, id, &[]);
        section.tunnel.fingerprint = pins;
        let agent = start_agent(section, "t");
        gw.wait_agent(id, Duration::from_secs(10)).await;
        agent.stop().await;
    }
}

/// A certificate every client refuses, and a key every local user can read, are loaded without
/// complaint by rustls: the gateway says so at start, naming the file and the dates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_and_a_readable_key_are_warned_about_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 6, 30);
    let (cert_file, key_file) = (dir.path().join("tun.crt"), dir.path().join("tun.key"));
    std::fs::write(&cert_file, params.self_signed(&key).unwrap().pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let gw = gateway_with_cert(&dir, &cert_file, &key_file).await;
    let expired = format!(
        "certificate {} expired on 2021-06-30 00:00:00 UTC",
        cert_file.display()
    );
    assert_eq!(logs.lines_with(&["WARN", &expired]).len(), 1);
    let readable = format!(
        "key file {} is readable by every user (mode 0644)",
        key_file.display()
    );
    assert_eq!(logs.lines_with(&["WARN", &readable]).len(), 1);
    gw.stop().await;
}

/// A server that answers the upgrade with `101` to another protocol (a proxy, a server speaking
/// h2c) is not taken for a gateway: the tunnel is not up, and the log names what answered. A
/// refusal longer than the agent reads still shows its first bytes as the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_a_ferry_gateway_is_named_in_the_log() {
    use common::servers::canned_server;
    let logs = common::logs::capture();
    let wait = |parts: &'static [&'static str]| {
        let logs = logs.clone();
        async move { logs.wait_lines(parts, 1, Duration::from_secs(10)).await }
    };
    let dial = |addr: std::net::SocketAddr, id: &str| {
        let mut section = common::ferry::agent_section_to(&format!("http://{addr}"), id, &[]);
        section.tunnel.insecure_plaintext = true;
        start_agent(section, "t")
    };

    let h2c = canned_server(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    let agent = dial(h2c, "node-h2c");
    wait(&[
        "cannot open tunnel",
        "the server switched protocols to",
        "h2c",
        "not a ferry gateway (a proxy or another server in the way?); check the gateway URL",
    ])
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let (a, shutdown) = (agent.agent.clone(), agent.shutdown.clone());
    tokio::spawn(async move { a.serve_web(listener, shutdown).await });
    let text = get(&url).await.text();
    assert_eq!(metric_value(&text, "ferry_agent_tunnel_up", &[]), Some(0.0));
    assert!(
        metric_value(
            &text,
            "ferry_agent_tunnel_connects_total",
            &[("result", "error")]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "ferry_agent_tunnel_connects_total",
            &[("result", "ok")]
        ),
        None,
        "{text}"
    );
    agent.stop().await;

    let bare =
        canned_server(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n").await;
    let agent = dial(bare, "node-bare");
    wait(&[
        "cannot open tunnel",
        "the server switched protocols without an Upgrade header",
    ])
    .await;
    agent.stop().await;

    let reason = "this token may not claim that id; ".repeat(60);
    let answer = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{reason}",
        reason.len()
    );
    let long = canned_server(answer.into_bytes().leak()).await;
    let agent = dial(long, "node-long");
    let lines = wait(&["GATEWAY REFUSED OUR CREDENTIALS", "403 Forbidden"]).await;
    let shown = reason[..512].trim();
    assert!(
        lines[0].contains(&format!("403 Forbidden: {shown}")),
        "{lines:?}"
    );
    agent.stop().await;
}

/// A CA in `dir` (`NAME.pem`), to sign leaves with.
fn ca(dir: &Path, name: &str) -> (CertifiedIssuer<'static, KeyPair>, PathBuf) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // rcgen names every certificate alike: a CA of another name is another CA.
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, ca.pem()).unwrap();
    (ca, path)
}

/// A leaf for `localhost` signed by `ca`, valid until `not_after` if given, written to
/// `NAME.pem` and `NAME-key.pem` in `dir`.
fn leaf(
    dir: &Path,
    name: &str,
    ca: &CertifiedIssuer<'static, KeyPair>,
    not_after: Option<(i32, u8, u8)>,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    if let Some((y, m, d)) = not_after {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(y, m, d);
    }
    let cert = params.signed_by(&key, ca).unwrap();
    let (cert_file, key_file) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (cert_file, key_file)
}

/// A gateway that refuses the agent's client certificate answers with a TLS alert that rustls
/// words as if the gateway's own certificate were at fault (`received fatal alert:
/// CertificateExpired`): the agent says it is its own certificate, naming the file. An expired
/// one is warned about at start too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_certificate_is_said_to_be_ours() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (client_ca, client_ca_file) = ca(dir.path(), "client-ca");
    let (other_ca, _) = ca(dir.path(), "other-ca");
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.tunnel.tls_client_ca_file = Some(client_ca_file.clone());
    })
    .await;
    let wait = |parts: Vec<String>| {
        let logs = logs.clone();
        async move {
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            logs.wait_lines(&parts, 1, Duration::from_secs(10)).await
        }
    };
    let with_cert = |id: &str, cert: &(PathBuf, PathBuf)| {
        let mut section = agent_section(&gw, id, &[]);
        section.tunnel.cert_file = Some(cert.0.clone());
        section.tunnel.key_file = Some(cert.1.clone());
        start_agent(section, "t")
    };

    let none = start_agent(agent_section(&gw, "no-cert", &[]), "t");
    wait(vec![
        "GATEWAY REFUSED OUR CLIENT CERTIFICATE".into(),
        "the gateway requires a client certificate (tunnel.cert_file".into(),
    ])
    .await;
    none.stop().await;

    let expired = leaf(dir.path(), "expired", &client_ca, Some((2021, 6, 30)));
    let agent = with_cert("expired-cert", &expired);
    let warned = format!(
        "tunnel client certificate (tunnel.cert_file): certificate {} expired on 2021-06-30 00:00:00 UTC: the gateway refuses it",
        expired.0.display()
    );
    assert_eq!(logs.lines_with(&["WARN", &warned]).len(), 1, "at start");
    let refused = format!(
        "the gateway refused our client certificate (tunnel.cert_file {}): it says it has expired",
        expired.0.display()
    );
    let line = wait(vec![
        "GATEWAY REFUSED OUR CLIENT CERTIFICATE".into(),
        refused,
    ])
    .await;
    assert!(!line[0].contains("received fatal alert"), "{}", line[0]);
    agent.stop().await;

    let foreign = leaf(dir.path(), "foreign", &other_ca, None);
    let agent = with_cert("foreign-cert", &foreign);
    wait(vec![
        "GATEWAY REFUSED OUR CLIENT CERTIFICATE".into(),
        format!(
            "the gateway refused our client certificate (tunnel.cert_file {}): it says it is not signed by a CA it trusts",
            foreign.0.display()
        ),
    ])
    .await;
    agent.stop().await;
    assert!(gw.agent_ids().is_empty());
    gw.stop().await;
}

/// A refused client certificate would be refused again: it is retried at the slow pace of a
/// refused token, not hammered at the backoff of a network failure, and said loudly. Renewed
/// and reloaded, the agent connects at once instead of waiting out the slow retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_certificate_is_retried_slowly_and_at_once_after_a_reload() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (client_ca, client_ca_file) = ca(dir.path(), "client-ca");
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.tunnel.tls_client_ca_file = Some(client_ca_file.clone());
    })
    .await;
    let expired = leaf(dir.path(), "expired", &client_ca, Some((2021, 6, 30)));
    let valid = leaf(dir.path(), "valid", &client_ca, None);
    let (cert, key) = (
        dir.path().join("agent.pem"),
        dir.path().join("agent-key.pem"),
    );
    std::fs::copy(&expired.0, &cert).unwrap();
    std::fs::copy(&expired.1, &key).unwrap();
    let mut section = agent_section(&gw, "renewed", &[]);
    section.tunnel.cert_file = Some(cert.clone());
    section.tunnel.key_file = Some(key.clone());
    // A network failure would be retried within 300 ms; a refusal after 60-120 s.
    section.reconnect.auth_failure_backoff = ferry::config::Dur(Duration::from_secs(120));
    let agent = start_agent(section, "t");
    let refused = "GATEWAY REFUSED OUR CLIENT CERTIFICATE";
    let line = logs
        .wait_lines(&["ERROR", refused], 1, Duration::from_secs(10))
        .await
        .remove(0);
    assert!(
        line.contains("it says it has expired") && line.contains("retry_in="),
        "{line}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        logs.lines_with(&[refused]).len(),
        1,
        "tried again within 1.5 s: {:?}",
        logs.lines_with(&["renewed"])
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let (a, shutdown) = (agent.agent.clone(), agent.shutdown.clone());
    tokio::spawn(async move { a.serve_web(listener, shutdown).await });
    let m = get(&url).await.text();
    assert_eq!(
        metric_value(
            &m,
            "ferry_agent_tunnel_connects_total",
            &[("result", "auth_refused")]
        ),
        Some(1.0),
        "{m}"
    );

    // Renewed in place, then reloaded: connected long before the slow retry would have been.
    std::fs::copy(&valid.0, &cert).unwrap();
    std::fs::copy(&valid.1, &key).unwrap();
    agent.agent.reload_tunnel_tls(None).unwrap();
    let asked = std::time::Instant::now();
    agent.agent.reconnect_now();
    gw.wait_agent("renewed", Duration::from_secs(5)).await;
    assert!(asked.elapsed() < Duration::from_secs(5));
    agent.stop().await;
    gw.stop().await;
}

/// An agent's own certificate given as the gateway's client CA file loads (rustls takes any
/// certificate as a trust anchor) and then lets no agent in: the gateway warns about it, and
/// not about a real CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_file_without_a_ca_is_warned_about() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (client_ca, client_ca_file) = ca(dir.path(), "client-ca");
    let (agent_cert, _) = leaf(dir.path(), "agent", &client_ca, None);
    let warning = "holds no CA certificate (CA:TRUE)";
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.tunnel.tls_client_ca_file = Some(client_ca_file.clone());
    })
    .await;
    assert!(logs.lines_with(&[warning]).is_empty());
    gw.stop().await;
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.tunnel.tls_client_ca_file = Some(agent_cert.clone());
    })
    .await;
    let lines = logs.lines_with(&["WARN", warning]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("agent"), "{lines:?}");
    gw.stop().await;
}

/// A reload does not put an expired client certificate in place of the valid one the gateway
/// accepts (as the gateway keeps its own valid certificate): the error names the file and its
/// date, and the agent keeps connecting with the certificate in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_a_valid_client_certificate_rather_than_an_expired_one() {
    let dir = tempfile::tempdir().unwrap();
    let (client_ca, client_ca_file) = ca(dir.path(), "client-ca");
    let gw = start_gateway(&dir, &[("*", "t")], |s| {
        s.tunnel.tls_client_ca_file = Some(client_ca_file.clone());
    })
    .await;
    let valid = leaf(dir.path(), "valid", &client_ca, None);
    let expired = leaf(dir.path(), "expired", &client_ca, Some((2021, 6, 30)));
    let (cert, key) = (
        dir.path().join("agent.pem"),
        dir.path().join("agent-key.pem"),
    );
    let install = |(c, k): &(PathBuf, PathBuf)| {
        std::fs::copy(c, &cert).unwrap();
        std::fs::copy(k, &key).unwrap();
    };
    install(&valid);
    let mut section = agent_section(&gw, "renewing", &[]);
    section.tunnel.cert_file = Some(cert.clone());
    section.tunnel.key_file = Some(key.clone());
    let agent = start_agent(section, "t");
    gw.wait_agent("renewing", Duration::from_secs(10)).await;

    install(&expired);
    let err = agent.agent.reload_tunnel_tls(None).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "certificate file {}: expired on 2021-06-30 00:00:00 UTC, while the certificate in use is valid: the gateway would refuse it, so it is not loaded (tunnel.cert_file)",
            cert.display()
        )
    );
    // A renewed certificate is taken.
    install(&valid);
    assert_eq!(
        agent.agent.reload_tunnel_tls(None).unwrap(),
        vec![cert.clone(), key.clone()]
    );
    agent.stop().await;
    gw.stop().await;
}

/// A target's TLS failure names dates, not Unix times, and the CA file it was checked against;
/// the agent's operator, who can fix it, reads it in the agent's log (once a minute at most),
/// not only Prometheus in the 502. A target client certificate that has expired is warned
/// about at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_tls_failure_is_logged_with_dates_and_the_ca_file() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (target_ca, target_ca_file) = ca(dir.path(), "target-ca");
    let (cert, key) = leaf(dir.path(), "target", &target_ca, Some((2021, 6, 30)));
    let addr = https_target(&cert, &key, "m 1\n").await;
    let client = leaf(dir.path(), "client", &target_ca, Some((2021, 7, 1)));
    let gw = start_gateway(&dir, &[("*", "t")], |_| {}).await;
    let url = format!("https://127.0.0.1:{}/metrics", addr.port());
    let mut section = agent_section(&gw, "tls-dates", &[("old", url)]);
    section.targets[0].tls.server_name = Some("localhost".into());
    section.targets[0].tls.ca_file = Some(target_ca_file.clone());
    section.targets[0].tls.cert_file = Some(client.0.clone());
    section.targets[0].tls.key_file = Some(client.1.clone());
    let agent = start_agent(section, "t");
    let warned = format!(
        "target client certificate (tls.cert_file): certificate {} expired on 2021-07-01 00:00:00 UTC: target \"old\" refuses it",
        client.0.display()
    );
    assert_eq!(logs.lines_with(&["WARN", &warned]).len(), 1, "at start");
    gw.wait_agent("tls-dates", Duration::from_secs(10)).await;
    let url = format!("http://tls-dates:{}/metrics", addr.port());
    for _ in 0..2 {
        let answer = common::http::get_via_proxy(gw.web, &url, &[]).await;
        assert_eq!(answer.status, 502, "{}", answer.text());
        let expected = "target \"old\" failed: TLS handshake failed: the certificate expired on 2021-06-30 00:00:00 UTC (it is now 20";
        assert!(answer.text().starts_with(expected), "{}", answer.text());
        assert!(
            answer.text().contains(&format!(
                "(checked against tls.ca_file {})",
                target_ca_file.display()
            )),
            "{}",
            answer.text()
        );
        assert!(!answer.text().contains("UNIX"), "{}", answer.text());
    }
    let logged = logs.lines_with(&[
        "WARN",
        "TLS handshake with the target failed",
        "scrape_target=old",
        "expired on 2021-06-30 00:00:00 UTC",
    ]);
    assert_eq!(logged.len(), 1, "one warning for two failures: {logged:?}");
    agent.stop().await;
    gw.stop().await;
}

/// A gateway whose certificate file holds its own certificate but not the intermediate CA's
/// that signed it fails every agent that trusts only the root: the agent says the chain is
/// likely missing, not only that the issuer is unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_certificate_without_its_chain_is_said_to_lack_it() {
    let logs = common::logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (root, root_file) = ca(dir.path(), "root");
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "intermediate");
    let intermediate =
        CertifiedIssuer::signed_by(params, KeyPair::generate().unwrap(), &root).unwrap();
    let (cert, key) = leaf(dir.path(), "gw", &intermediate, None);
    let gw = gateway_with_cert(&dir, &cert, &key).await;
    let section = agent_trusting(&gw, "no-chain", &root_file);
    let agent = start_agent(section, "t");
    let named = format!(
        "the gateway's certificate is not signed by a CA in {} (--tunnel.ca-file), and the gateway sent no intermediate certificate",
        root_file.display()
    );
    logs.wait_lines(&["cannot open tunnel", &named], 1, Duration::from_secs(10))
        .await;
    agent.stop().await;

    // With the chain in the file, the same agent connects.
    let mut chain = std::fs::read_to_string(&cert).unwrap();
    chain.push_str(&intermediate.pem());
    std::fs::write(&cert, chain).unwrap();
    gw.gateway.reload_tunnel_tls().unwrap();
    let section = agent_trusting(&gw, "with-chain", &root_file);
    let agent = start_agent(section, "t");
    gw.wait_agent("with-chain", Duration::from_secs(10)).await;
    agent.stop().await;
    gw.stop().await;
}
