//! The test process's own log, captured, for tests that assert what an operator reads in it.
//! nextest runs every test in a process of its own, so the capture holds one test's log (under
//! `cargo test` the tests of one binary share it: match lines by what is unique to the test).
#![allow(dead_code)]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Log lines written so far, as `ferry`'s plain log format shows them (`message field=value`).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

static LOGS: OnceLock<Logs> = OnceLock::new();

/// Starts capturing this process's log at info level and above; later calls share the capture.
pub fn capture() -> Logs {
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
    .clone()
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// The lines containing every one of `parts`.
    pub fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until `n` lines contain every one of `parts` and returns them (panics after `timeout`).
    pub async fn wait_lines(&self, parts: &[&str], n: usize, timeout: Duration) -> Vec<String> {
        let start = Instant::now();
        loop {
            let lines = self.lines_with(parts);
            if lines.len() >= n {
                return lines;
            }
            assert!(
                start.elapsed() < timeout,
                "not {n} log lines with {parts:?} within {timeout:?}; found {lines:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `retry_in=` delay of an agent's log line (a `Duration`'s debug form: `1.25s`, `800ms`).
pub fn retry_in(line: &str) -> Duration {
    let value = line
        .split("retry_in=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no retry_in= in {line:?}"));
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("retry_in={value} in {line:?}"));
    let seconds = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" => number / 1e6,
        "ns" => number / 1e9,
        _ => panic!("retry_in={value}: unit {unit:?} in {line:?}"),
    };
    Duration::from_secs_f64(seconds)
}

/// Asserts that a slow retry (after a refusal) waits between half of `backoff` and all of it.
pub fn assert_slow_retry(line: &str, backoff: Duration) {
    let delay = retry_in(line);
    assert!(
        delay >= backoff / 2 && delay <= backoff,
        "retry_in {delay:?} is not within {:?}..={backoff:?}: {line}",
        backoff / 2
    );
}
