//! Shared helpers for ferry's integration tests. Each test binary says `mod common;` and uses a
//! subset, so every module allows dead code.
//!
//! - `servers`  — a real HTTP/1.1 target server (an exporter as ferry sees it) with canned behaviours.
//! - `proxy`    — an HTTP CONNECT proxy and a plain TCP relay that can cut idle connections.
//! - `http`     — HTTP/1.1 client calls: origin-form, absolute-form through a proxy, streaming.
//! - `logs`     — the test process's own log, captured, to assert what an operator reads.
//! - `external` — the real Prometheus and node_exporter (Debian packages) as child processes.
//! - `netns`    — test hosts in network namespaces, on links the test can shape.

pub mod egress;
pub mod external;
pub mod ferry;
pub mod http;
pub mod logs;
pub mod netns;
pub mod proxy;
pub mod servers;

/// Replaces `path` with a named pipe nothing ever writes into: what `rm f; mkfifo f` or a
/// process substitution (`--auth.tokens-file <(...)`) leaves behind.
#[allow(dead_code)]
pub fn make_fifo(path: &std::path::Path) {
    let _ = std::fs::remove_file(path);
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}
