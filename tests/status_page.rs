//! The gateway's status page in a real browser: headless Chromium (Debian `chromium`) loads `/`
//! from a running gateway with a connected agent. The test asserts what the browser rendered
//! shows the agent and saves a screenshot under `target/`. A missing browser fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::ferry::gateway_and_agent;
use common::http::get_via_proxy;
use common::servers::{Behaviour, TargetServer};

const CHROMIUM: &str = "/usr/bin/chromium";

fn chromium(profile: &Path, args: &[String]) -> std::process::Output {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install the Debian package `chromium` (.ci/run does)"
    );
    Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .output()
        .expect("run chromium")
}

fn target_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_the_connected_agent_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let target = TargetServer::start(Behaviour::Metrics("up 1\n".into())).await;
    let (gw, agent) =
        gateway_and_agent(&dir, "status-node-7", &[("node", target.url("/metrics"))]).await;
    // One scrape, so the page has a last result to show.
    let scrape = get_via_proxy(
        gw.web,
        &format!("http://status-node-7:{}/metrics", target.addr.port()),
        &[],
    )
    .await;
    assert_eq!(scrape.status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let url = format!("http://{}/", gw.web);
    let profile = tempfile::tempdir().unwrap();
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        let profile = profile.path().to_owned();
        // With the console logged, a part of the page its Content-Security-Policy blocks shows.
        move || {
            chromium(
                &profile,
                &[
                    "--enable-logging=stderr".into(),
                    "--v=0".into(),
                    "--dump-dom".into(),
                    url,
                ],
            )
        }
    })
    .await
    .unwrap();
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    assert!(
        html.contains("status-node-7"),
        "the rendered page does not show the agent:\n{html}"
    );
    assert!(
        html.contains("<span class=\"ok\">200</span>"),
        "the last scrape result is shown:\n{html}"
    );
    assert!(html.contains("1 agent connected"), "{html}");
    let console = String::from_utf8_lossy(&dom.stderr);
    assert!(
        !console.contains("Content Security Policy"),
        "the page's own Content-Security-Policy blocks part of it:\n{console}"
    );

    let shot = target_dir().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let profile2 = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let shot = shot.clone();
        let profile = profile2.path().to_owned();
        move || {
            chromium(
                &profile,
                &[
                    format!("--screenshot={}", shot.display()),
                    "--window-size=1280,480".into(),
                    url,
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "chromium screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "a real PNG of the page ({} bytes)",
        png.len()
    );
    agent.stop().await;
    gw.stop().await;
}
