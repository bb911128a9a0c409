//! A rate limit for warnings that a stranger could cause at will.

use std::sync::Mutex;
use std::time::Duration;

/// Rate limit of a kind of warning (failed tunnel handshakes, refusals of the web listener). A
/// listener on the internet meets scanners all day, but the first failure after a quiet spell is
/// what someone setting up an agent or Prometheus (wrong fingerprint, wrong port, wrong password)
/// needs to see: one warning per minute at most, saying how many failures went to the debug
/// level since the last one.
#[derive(Default)]
pub(crate) struct WarnLimit {
    /// When the last warning was logged, and the failures not warned about since.
    last: Mutex<Option<(tokio::time::Instant, u64)>>,
}

impl WarnLimit {
    const EVERY: Duration = Duration::from_secs(60);

    /// `Some(failures not warned about since the last warning)` if this failure is warned.
    pub(crate) fn admit(&self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *last {
            Some((at, quiet)) if now.duration_since(*at) < Self::EVERY => {
                *quiet += 1;
                None
            }
            _ => {
                let quiet = last.map_or(0, |(_, q)| q);
                *last = Some((now, 0));
                Some(quiet)
            }
        }
    }
}
