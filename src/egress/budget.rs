//! The process-wide budget of request body bytes held in memory. Every absolute-form body is
//! read whole before it is forwarded (never a partial forward), so without a bound clients
//! stalling just short of the end of large bodies could hold `max_connections_per_client ×
//! max_body_bytes` each. Bytes are taken from the budget as they arrive and given back when the
//! body is dropped: sent upstream, refused, or abandoned. A body's checks take what they build
//! from it from the same budget: the body decoded (gzip, deflate, snappy) and a schema's parsed
//! tree, which a small compressed body can make thousands of times larger than itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;

/// Bytes of request bodies the proxy may hold at once.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    limit: u64,
    held: AtomicU64,
    gauge: Gauge,
}

impl BodyBudget {
    /// A budget of `limit` bytes, whose use `gauge` shows.
    pub(crate) fn new(limit: u64, gauge: Gauge) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            limit,
            held: AtomicU64::new(0),
            gauge,
        })
    }

    /// An empty share of the budget, for one body.
    pub(crate) fn share(self: &Arc<Self>) -> Held {
        Held {
            budget: self.clone(),
            bytes: 0,
        }
    }

    fn take(&self, n: u64) -> bool {
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok();
        if taken {
            self.gauge.inc_by(n as i64);
        }
        taken
    }

    fn give_back(&self, n: u64) {
        self.held.fetch_sub(n, Ordering::AcqRel);
        self.gauge.dec_by(n as i64);
    }
}

/// One body's share of the budget; given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    budget: Arc<BodyBudget>,
    bytes: u64,
}

impl Held {
    /// The size of the whole budget.
    pub(crate) fn limit(&self) -> u64 {
        self.budget.limit
    }

    /// Takes `n` more bytes; false (and nothing taken) if the budget has not that much left.
    pub(crate) fn grow(&mut self, n: u64) -> bool {
        let taken = self.budget.take(n);
        if taken {
            self.bytes += n;
        }
        taken
    }

    /// Gives back `n` of the bytes taken (at most what is held).
    pub(crate) fn shrink(&mut self, n: u64) {
        let n = n.min(self.bytes);
        if n > 0 {
            self.budget.give_back(n);
            self.bytes -= n;
        }
    }

    /// An empty share of the same budget.
    pub(crate) fn sibling(&self) -> Held {
        self.budget.share()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give_back(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_refused_past_the_limit_and_given_back_on_drop() {
        let gauge = Gauge::default();
        let budget = BodyBudget::new(100, gauge.clone());
        let mut a = budget.share();
        let mut b = budget.share();
        assert!(a.grow(60));
        assert!(!b.grow(41), "60 + 41 is over 100");
        assert!(b.grow(40));
        assert_eq!(gauge.get(), 100);
        assert!(!b.grow(1));
        drop(a);
        assert_eq!(gauge.get(), 40);
        assert!(b.grow(60));
        drop(b);
        assert_eq!(gauge.get(), 0);
        assert!(budget.share().grow(100));
    }
}
