//! Capped exponential backoff with full jitter (AWS architecture blog's "full jitter"):
//! sleep a random time in `[0, min(max, base·2ⁿ)]`, reset after a stable session.

use std::time::Duration;

use rand::Rng;

/// Reconnect delays.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays start with ceilings at `base`, doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next delay: uniformly random up to the ceiling, which then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }

    /// Back to the first ceiling, after a session that lasted.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A slow retry after a refusal (`auth_failure_backoff`): between half of `after` and all of
/// it, so that agents refused together (a revoked group token, a tokens file broken by a
/// deploy, a proxy's password changed) do not all come back in the same instant, yet none
/// sooner than half the pace asked for.
pub fn slow_retry(after: Duration) -> Duration {
    rand::rng().random_range(after / 2..=after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1));
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(
            b.ceiling(),
            Duration::from_secs(1),
            "no overflow after many attempts"
        );
    }

    #[test]
    fn delays_are_jittered() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 10, "full jitter spreads delays: {delays:?}");
    }

    #[test]
    fn slow_retries_are_jittered_within_the_upper_half() {
        let after = Duration::from_secs(60);
        let delays: std::collections::HashSet<_> = (0..20).map(|_| slow_retry(after)).collect();
        assert!(delays.len() > 10, "{delays:?}");
        assert!(
            delays.iter().all(|d| (after / 2..=after).contains(d)),
            "{delays:?}"
        );
    }
}
