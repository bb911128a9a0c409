//! A rate limit for warnings that a stranger could cause at will.

use std::sync::Mutex;
use std::time::Duration;

/// Rate limit of a kind of warning (failed tunnel handshakes, refusals of the web listener). A
/// listener on the internet meets scanners all day, but the first failure after a quiet spell is
/// what someone setting up an agent or Prometheus (wrong fingerprint, wrong port, wrong password)
/// needs to see: one warning per minute at most, saying how many failures went to the debug
/// level since the last one.
pub(crate) struct WarnLimit {
    /// How many warnings a minute may log.
    burst: u32,
    /// The current minute: when it began, warnings logged in it, failures not warned about.
    window: Mutex<Option<Window>>,
}

struct Window {
    start: tokio::time::Instant,
    warned: u32,
    quiet: u64,
}

impl Default for WarnLimit {
    fn default() -> Self {
        Self::per_minute(1)
    }
}

impl WarnLimit {
    const EVERY: Duration = Duration::from_secs(60);

    /// At most `burst` warnings a minute.
    pub(crate) const fn per_minute(burst: u32) -> Self {
        Self {
            burst: if burst == 0 { 1 } else { burst },
            window: Mutex::new(None),
        }
    }

    /// `Some(failures not warned about since the last warning)` if this failure is warned.
    pub(crate) fn admit(&self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *window {
            Some(w) if now.duration_since(w.start) < Self::EVERY => {
                if w.warned < self.burst {
                    w.warned += 1;
                    return Some(std::mem::take(&mut w.quiet));
                }
                w.quiet += 1;
                None
            }
            _ => {
                let quiet = window.as_ref().map_or(0, |w| w.quiet);
                *window = Some(Window {
                    start: now,
                    warned: 1,
                    quiet: 0,
                });
                Some(quiet)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn warns_a_burst_a_minute_and_counts_the_rest() {
        let limit = WarnLimit::per_minute(3);
        let admitted: Vec<_> = (0..5).map(|_| limit.admit()).collect();
        assert_eq!(admitted, [Some(0), Some(0), Some(0), None, None]);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(limit.admit(), Some(2), "the two not warned about");
        assert_eq!(limit.admit(), Some(0));
        let one = WarnLimit::default();
        assert_eq!((one.admit(), one.admit()), (Some(0), None));
    }
}
