//! Agents that disconnected, kept in service discovery for a while with the targets they had.
//!
//! Prometheus forgets a target as soon as service discovery stops listing it: no `up == 0`,
//! nothing to alert on (the best-known complaint about PushProx). So an agent whose tunnel ends
//! stays in `/targets`, with the same groups, for `web.sd_keep_disconnected`; its scrapes are
//! answered 503 (agent not connected) and Prometheus records `up == 0`.
//!
//! A gateway restarted meanwhile (an upgrade, a crash) must not forget them either: they would
//! vanish from service discovery exactly when their host died and nobody would be alerted. So
//! what is kept here, and the agents connected, is saved in the data directory
//! (`super::agents_file`) whenever it changes and at shutdown, and restored at start
//! ([`Departed::restore`]) for what is left of each one's retention.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::Notify;

use super::agents_file::Record;
use super::registry::ScrapeStats;
use crate::tunnel::TargetList;

/// The disconnected agents still listed, by id, oldest departure first when one must go.
#[derive(Debug)]
pub(super) struct Departed {
    keep: Duration,
    max: usize,
    by_id: HashMap<String, Entry>,
    /// Departure order (time, then a sequence number to tell equal times apart): what expires
    /// first is also what goes when the cap is reached.
    order: BTreeMap<(Instant, u64), String>,
    sequence: u64,
    /// Whether the cap has been reached once: warned about once, not per departure, since an
    /// autoscaled fleet at the cap reaches it on every one.
    warned_full: bool,
    /// Told of every change, for the writer of the agents file.
    changes: Arc<Notify>,
}

#[derive(Debug)]
struct Entry {
    targets: Arc<TargetList>,
    /// SHA-256 of the token its last tunnel used: a tokens-file reload that no longer accepts
    /// it for the id removes the entry (how an agent is decommissioned).
    credential: [u8; 32],
    key: (Instant, u64),
    last: LastTunnel,
}

/// What the status page shows of a disconnected agent: its last tunnel.
#[derive(Debug, Clone)]
pub(super) struct LastTunnel {
    pub(super) remote: SocketAddr,
    pub(super) connected_at: SystemTime,
    pub(super) gone_at: SystemTime,
    pub(super) stats: ScrapeStats,
}

impl Departed {
    /// Keeps agents for `keep` (none if zero), at most `max` of them.
    pub(super) fn new(keep: Duration, max: usize) -> Self {
        Self {
            keep,
            max,
            by_id: HashMap::new(),
            order: BTreeMap::new(),
            sequence: 0,
            warned_full: false,
            changes: Arc::new(Notify::new()),
        }
    }

    /// What is notified when an agent is kept or forgotten here (the registry notifies it of
    /// the connected agents' changes too): the writer of the agents file waits on it.
    pub(super) fn changes(&self) -> Arc<Notify> {
        self.changes.clone()
    }

    /// Keeps the agents of `records` (read from the agents file at start) for what is left of
    /// their retention at `now_wall`, which is `now` on the monotonic clock; returns how many
    /// are kept. Oldest departure first, so that the cap keeps the most recent ones.
    pub(super) fn restore(
        &mut self,
        mut records: Vec<Record>,
        now_wall: SystemTime,
        now: Instant,
    ) -> usize {
        records.sort_by_key(|r| r.gone_at);
        for r in records {
            // A departure in the future (the wall clock was set back) counts as now: kept for a
            // whole retention rather than dropped.
            let ago = now_wall.duration_since(r.gone_at).unwrap_or_default();
            let gone = now.checked_sub(ago).unwrap_or(now);
            let last = LastTunnel {
                remote: r.remote,
                connected_at: r.connected_at,
                gone_at: r.gone_at,
                stats: ScrapeStats::default(),
            };
            self.add(&r.id, r.targets, r.credential, last, gone);
        }
        self.prune(now);
        self.len()
    }

    /// What the agents file holds of the agents kept here, sorted by id.
    pub(super) fn records(&self) -> Vec<Record> {
        let mut all: Vec<Record> = self
            .by_id
            .iter()
            .map(|(id, e)| Record {
                id: id.clone(),
                targets: e.targets.clone(),
                credential: e.credential,
                remote: e.last.remote,
                connected_at: e.last.connected_at,
                gone_at: e.last.gone_at,
            })
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Keeps `id`, gone at `now`, with the `targets` it listed, the token it used and what its
    /// `last` tunnel did.
    pub(super) fn add(
        &mut self,
        id: &str,
        targets: Arc<TargetList>,
        credential: [u8; 32],
        last: LastTunnel,
        now: Instant,
    ) {
        if self.keep.is_zero() || self.max == 0 {
            return;
        }
        self.remove(id);
        self.prune(now);
        while self.by_id.len() >= self.max {
            self.drop_oldest();
        }
        self.sequence += 1;
        let key = (now, self.sequence);
        self.order.insert(key, id.to_owned());
        let entry = Entry {
            targets,
            credential,
            key,
            last,
        };
        self.by_id.insert(id.to_owned(), entry);
        self.changes.notify_one();
    }

    fn drop_oldest(&mut self) {
        let Some((_, id)) = self.order.pop_first() else {
            return;
        };
        self.by_id.remove(&id);
        if !std::mem::replace(&mut self.warned_full, true) {
            tracing::warn!(
                max = self.max,
                agent = %id,
                "too many disconnected agents kept in service discovery: dropping the longest gone first (raise gateway.web.sd_keep_disconnected_max, or shorten sd_keep_disconnected); not logged again"
            );
        }
    }

    /// Forgets `id` (it connected again, or its token was revoked); whether it was kept.
    pub(super) fn remove(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some(entry) => {
                self.order.remove(&entry.key);
                self.changes.notify_one();
                true
            }
            None => false,
        }
    }

    /// Forgets the agents gone for `keep` or longer at `now`.
    pub(super) fn prune(&mut self, now: Instant) {
        while let Some(entry) = self.order.first_entry() {
            if now.saturating_duration_since(entry.key().0) < self.keep {
                break;
            }
            let id = entry.remove();
            self.by_id.remove(&id);
            self.changes.notify_one();
        }
    }

    /// Forgets the agents whose token `authorized(id, credential)` refuses; returns their ids.
    pub(super) fn retain_authorized(
        &mut self,
        authorized: impl Fn(&str, &[u8; 32]) -> bool,
    ) -> Vec<String> {
        let gone: Vec<String> = self
            .by_id
            .iter()
            .filter(|(id, e)| !authorized(id, &e.credential))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.remove(id);
        }
        gone
    }

    /// The agents kept, with their targets (unordered).
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &Arc<TargetList>)> {
        self.by_id.iter().map(|(id, e)| (id.as_str(), &e.targets))
    }

    /// The agents kept, with their targets and last tunnel (unordered).
    pub(super) fn entries(&self) -> impl Iterator<Item = (&str, &Arc<TargetList>, &LastTunnel)> {
        self.by_id
            .iter()
            .map(|(id, e)| (id.as_str(), &e.targets, &e.last))
    }

    /// How many agents are kept.
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }
}

/// `ferry_gateway_agents_disconnected`, read when `/metrics` is scraped: expired agents are
/// pruned then, so the gauge falls when the retention ends even if nothing else happens.
/// One series, not one per agent: the ids of gone agents are what an autoscaled fleet churns.
#[derive(Debug)]
pub(super) struct DisconnectedGauge(pub(super) Arc<Mutex<Departed>>);

impl Collector for DisconnectedGauge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let n = {
            let mut departed = lock(&self.0);
            departed.prune(Instant::now());
            departed.len()
        };
        let gauge = ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
        gauge.encode(encoder.encode_descriptor(
            "ferry_gateway_agents_disconnected",
            "Agents whose tunnel is down, still listed in service discovery (web.sd_keep_disconnected)",
            None,
            gauge.metric_type(),
        )?)
    }
}

/// A poisoned lock means a panic while holding it; every mutation leaves the maps consistent
/// (each is a few inserts or removes of the same id), so keep serving.
pub(super) fn lock(departed: &Mutex<Departed>) -> MutexGuard<'_, Departed> {
    departed.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(version: u64) -> Arc<TargetList> {
        Arc::new(TargetList {
            version,
            labels: Default::default(),
            targets: Vec::new(),
        })
    }

    fn last() -> LastTunnel {
        LastTunnel {
            remote: "192.0.2.1:40000".parse().unwrap(),
            connected_at: SystemTime::UNIX_EPOCH,
            gone_at: SystemTime::UNIX_EPOCH,
            stats: ScrapeStats::default(),
        }
    }

    fn ids(d: &Departed) -> Vec<String> {
        let mut ids: Vec<String> = d.iter().map(|(id, _)| id.to_owned()).collect();
        ids.sort();
        ids
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn an_agent_is_kept_until_its_retention_ends() {
        let t0 = Instant::now();
        let mut d = Departed::new(10 * SECOND, 100);
        d.add("a", list(1), [1; 32], last(), t0);
        d.add("b", list(1), [1; 32], last(), t0 + 5 * SECOND);
        d.prune(t0 + 9 * SECOND);
        assert_eq!(ids(&d), ["a", "b"]);
        d.prune(t0 + 10 * SECOND);
        assert_eq!(ids(&d), ["b"]);
        d.prune(t0 + 15 * SECOND);
        assert_eq!(d.len(), 0);
        assert!(d.order.is_empty());
    }

    #[test]
    fn leaving_again_restarts_the_retention_with_the_latest_targets() {
        let t0 = Instant::now();
        let mut d = Departed::new(10 * SECOND, 100);
        d.add("a", list(1), [1; 32], last(), t0);
        assert!(d.remove("a"));
        d.add("a", list(2), [1; 32], last(), t0 + 8 * SECOND);
        d.prune(t0 + 12 * SECOND);
        let kept: Vec<u64> = d.iter().map(|(_, l)| l.version).collect();
        assert_eq!(kept, [2]);
        assert_eq!(d.order.len(), 1);
    }

    #[test]
    fn over_the_cap_the_longest_gone_goes_first() {
        let t0 = Instant::now();
        let mut d = Departed::new(3600 * SECOND, 2);
        d.add("a", list(1), [1; 32], last(), t0);
        d.add("b", list(1), [1; 32], last(), t0);
        d.add("c", list(1), [1; 32], last(), t0);
        assert_eq!(ids(&d), ["b", "c"]);
        assert!(d.warned_full);
        for i in 0..100 {
            d.add(&format!("x{i}"), list(1), [1; 32], last(), t0 + SECOND);
        }
        assert_eq!(ids(&d), ["x98", "x99"]);
        assert_eq!(d.order.len(), 2);
    }

    #[test]
    fn zero_retention_keeps_nothing() {
        let mut d = Departed::new(Duration::ZERO, 100);
        d.add("a", list(1), [1; 32], last(), Instant::now());
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_revoked_token_removes_its_agents() {
        let t0 = Instant::now();
        let mut d = Departed::new(3600 * SECOND, 100);
        d.add("a", list(1), [1; 32], last(), t0);
        d.add("b", list(1), [2; 32], last(), t0);
        let gone = d.retain_authorized(|_, credential| *credential == [2; 32]);
        assert_eq!(gone, ["a"]);
        assert_eq!(ids(&d), ["b"]);
        assert_eq!(d.order.len(), 1);
    }
}
