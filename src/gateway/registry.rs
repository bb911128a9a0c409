//! The agent registry: who is connected, their targets, and how to reach them.
//!
//! This is the seam for running several gateways as one: today an in-memory map; later the same
//! interface backed by a shared store, with lookups of agents held by another gateway returning a
//! forwarding handle. Nothing outside this module knows how agents are stored.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::agents_file::Record;
use super::departed::{self, Departed};
use super::h2conn::Sender;
use crate::telemetry::{GatewayMetrics, ScrapeLabels};
use crate::tunnel::TargetList;

/// One connected agent: its identity, its targets, and the HTTP/2 sender over its tunnel.
pub struct AgentHandle {
    /// The agent id.
    pub id: String,
    /// Distinguishes this tunnel from an earlier or later one of the same id.
    pub session: u64,
    /// Where the tunnel comes from.
    pub remote: SocketAddr,
    /// When the tunnel came up.
    pub connected_at: SystemTime,
    sender: Sender,
    /// Replaced whole when the agent's list changes; read by every scrape. Not a watch
    /// channel: nothing waits for a change, and a channel's shared state is about 350 bytes
    /// more per idle agent.
    targets: ArcSwap<TargetList>,
    closed: CancellationToken,
    stats: std::sync::Mutex<ScrapeStats>,
    /// SHA-256 of the token the tunnel was opened with, to check it again on reload and to tell
    /// a restarted agent (same token) from another one claiming its id.
    credential: TokenClaim,
    closing: OnceLock<CloseReason>,
    /// Scrapes holding a [`ScrapeSlot`]: from the request to the end of the response body.
    in_flight: AtomicU32,
}

/// One of an agent's `tunnel.max_concurrent_scrapes` places, held until the scrape's response
/// has ended (or been dropped).
pub struct ScrapeSlot(Arc<AgentHandle>);

impl ScrapeSlot {
    /// The agent this place is of.
    pub fn agent(&self) -> &AgentHandle {
        &self.0
    }
}

impl Drop for ScrapeSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why the gateway closes a tunnel that is still up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The reloaded tokens file no longer lets its token claim its id.
    Revoked,
    /// A newer tunnel with the same id and token, from `by`, took its place.
    Replaced {
        /// Where the newer tunnel comes from.
        by: SocketAddr,
    },
    /// A tunnel from `by` whose token names the id exactly took the place of this one, whose
    /// token matches the id only by a glob.
    Outranked {
        /// Where the newer tunnel comes from.
        by: SocketAddr,
    },
}

/// The token a tunnel was opened with, as the duplicate-id rule needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenClaim {
    /// SHA-256 of the token, to check it again on reload and to recognise the agent again.
    pub digest: [u8; 32],
    /// Whether a line of the tokens file names the id itself for that token, not by a glob.
    pub named_exactly: bool,
}

/// What [`Registry::insert`] did.
pub enum Inserted {
    /// The id was free.
    New,
    /// The handle replaced this older one of the same id and token (the caller closes it).
    Replaced(Arc<AgentHandle>),
    /// The id is held by this tunnel, opened with another token: nothing was inserted.
    Conflict(Arc<AgentHandle>),
}

/// What the status page shows of an agent's scrapes.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct ScrapeStats {
    /// Scrapes through this tunnel.
    pub scrapes: u64,
    /// Body bytes passed to Prometheus.
    pub bytes: u64,
    /// When the last scrape ended, seconds since the Unix epoch.
    pub last_scrape: Option<u64>,
    /// Status of the last scrape.
    pub last_status: Option<u16>,
    /// Duration of the last scrape, seconds.
    pub last_duration_seconds: Option<f64>,
}

impl AgentHandle {
    /// Creates a handle; `closed` is cancelled to close the tunnel (when a newer one replaces it).
    pub fn new(
        id: String,
        session: u64,
        remote: SocketAddr,
        sender: Sender,
        targets: Arc<TargetList>,
        closed: CancellationToken,
        credential: TokenClaim,
    ) -> Self {
        Self {
            id,
            session,
            remote,
            connected_at: SystemTime::now(),
            sender,
            targets: ArcSwap::new(targets),
            closed,
            stats: std::sync::Mutex::new(ScrapeStats::default()),
            credential,
            closing: OnceLock::new(),
            in_flight: AtomicU32::new(0),
        }
    }

    /// A place for one more scrape, unless `limit` are in flight already. Past the agent's own
    /// limit HTTP/2 would queue requests without bound, each holding its request (and body) and
    /// a client connection for up to its timeout.
    pub fn scrape_slot(self: &Arc<Self>, limit: u32) -> Option<ScrapeSlot> {
        self.in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| ScrapeSlot(self.clone()))
    }

    /// Whether `tokens` still lets this tunnel's token claim its id.
    pub fn still_authorized(&self, tokens: &crate::auth::TokensFile) -> bool {
        tokens
            .authorize_digest(&self.credential.digest, &self.id)
            .is_ok()
    }

    /// Whether this tunnel was opened with the token whose SHA-256 is `credential`.
    pub fn has_credential(&self, credential: &[u8; 32]) -> bool {
        self.credential.digest == *credential
    }

    /// Whether a claim of this tunnel's id with `claim` may take its place: the same token (the
    /// agent again), a token naming the id exactly against this one's glob, or this tunnel is
    /// being closed anyway.
    pub fn yields_to(&self, claim: &TokenClaim) -> bool {
        self.close_reason().is_some()
            || self.has_credential(&claim.digest)
            || (claim.named_exactly && !self.credential.named_exactly)
    }

    /// Closes the tunnel because its token no longer lets it claim its id.
    pub fn revoke(&self) {
        self.close_for(CloseReason::Revoked);
    }

    /// Closes the tunnel for `reason`; false if it was already being closed (the first reason stays).
    pub fn close_for(&self, reason: CloseReason) -> bool {
        let first = self.closing.set(reason).is_ok();
        self.closed.cancel();
        first
    }

    /// Why the gateway is closing this tunnel, if it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.closing.get().copied()
    }

    /// Records one finished scrape.
    pub fn record_scrape(&self, status: u16, duration: std::time::Duration, bytes: u64) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.scrapes += 1;
        s.bytes += bytes;
        s.last_scrape = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        s.last_status = Some(status);
        s.last_duration_seconds = Some(duration.as_secs_f64());
    }

    /// The scrape statistics so far.
    pub fn stats(&self) -> ScrapeStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether its tunnel has failed: the agent is going, its series with it.
    pub fn tunnel_broken(&self) -> bool {
        super::h2conn::is_broken(&self.sender)
    }

    /// A sender for one request over the tunnel.
    pub fn sender(&self) -> Sender {
        self.sender.clone()
    }

    /// The agent's current target list.
    pub fn targets(&self) -> Arc<TargetList> {
        self.targets.load_full()
    }

    /// Replaces the agent's target list (its tunnel's long poll got a new one).
    pub(super) fn set_targets(&self, list: Arc<TargetList>) {
        self.targets.store(list);
    }
}

/// The connected agents, by id, the gateway's series labelled with them, and the agents gone
/// but still listed in service discovery.
pub struct Registry {
    agents: RwLock<HashMap<String, Arc<AgentHandle>>>,
    sessions: AtomicU64,
    /// Its per-agent series and `agents_connected` are written under the lock of `agents`, so
    /// that they follow the agents connected (see [`Registry::remove`]).
    metrics: GatewayMetrics,
    /// Changed under the lock of `agents` too (taken first), so that an id is never both
    /// connected and departed, nor neither while it reconnects.
    departed: Arc<Mutex<Departed>>,
    /// Notified when an agent connects, disconnects or changes its targets (and by `departed`
    /// of its own changes): what the agents file must catch up with.
    changes: Arc<Notify>,
}

impl Registry {
    /// An empty registry keeping `metrics`' per-agent series to the agents connected, and the
    /// agents that disconnect in `departed`.
    pub(super) fn new(metrics: GatewayMetrics, departed: Arc<Mutex<Departed>>) -> Self {
        let changes = departed::lock(&departed).changes();
        Self {
            agents: RwLock::default(),
            sessions: AtomicU64::new(0),
            metrics,
            departed,
            changes,
        }
    }

    /// Notified whenever what [`Registry::records`] returns may have changed.
    pub(super) fn changes(&self) -> Arc<Notify> {
        self.changes.clone()
    }

    /// What the agents file holds: every connected agent, as if gone at `now`, and every
    /// disconnected one still kept, sorted by id. A tunnel being closed for a revoked token is
    /// left out (it is not kept when it goes).
    pub(super) fn records(&self, now: SystemTime) -> Vec<Record> {
        let agents = self.read();
        let mut all: Vec<Record> = agents
            .values()
            .filter(|a| a.close_reason() != Some(CloseReason::Revoked))
            .map(|a| Record {
                id: a.id.clone(),
                targets: a.targets(),
                credential: a.credential.digest,
                remote: a.remote,
                connected_at: a.connected_at,
                gone_at: now,
            })
            .collect();
        let departed = departed::lock(&self.departed).records();
        drop(agents);
        all.extend(departed);
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// A fresh session number for a new tunnel.
    pub fn next_session(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds `agent` unless its id is held by a tunnel opened with another token. A tunnel the
    /// gateway is already closing (revoked) holds nothing.
    pub fn insert(&self, agent: Arc<AgentHandle>) -> Inserted {
        let mut agents = self.write();
        if let Some(held) = agents.get(&agent.id) {
            if !held.yields_to(&agent.credential) {
                return Inserted::Conflict(held.clone());
            }
        }
        departed::lock(&self.departed).remove(&agent.id);
        let old = agents.insert(agent.id.clone(), agent);
        self.metrics.agents_connected.set(agents.len() as i64);
        self.changes.notify_one();
        match old {
            Some(old) => Inserted::Replaced(old),
            None => Inserted::New,
        }
    }

    /// The tunnel holding `id` if a claim with `credential` may not take its place (see
    /// [`AgentHandle::yields_to`]): such a claim is refused while it is up.
    pub fn held_by_another(&self, id: &str, claim: &TokenClaim) -> Option<Arc<AgentHandle>> {
        self.read()
            .get(id)
            .filter(|held| !held.yields_to(claim))
            .cloned()
    }

    /// Removes `id` if its current tunnel is `session` (a replaced tunnel must not remove its
    /// successor), and with it the series labelled with `id`: ids come and go (glob tokens,
    /// hosts named by an autoscaler), and series kept for every id ever seen would grow for the
    /// life of the gateway. They go at once, not after a grace period: an agent back after a
    /// network glitch starts its counters from zero, which `rate()` and `increase()` take as a
    /// counter reset. Under the same lock as [`Registry::insert`], so a new tunnel of the id
    /// never loses the series it starts.
    ///
    /// The agent stays in service discovery with the targets it had (see [`super::departed`]),
    /// unless the gateway closed it for a revoked token.
    pub fn remove(&self, id: &str, session: u64) -> bool {
        let mut agents = self.write();
        if agents.get(id).is_none_or(|a| a.session != session) {
            return false;
        }
        if let Some(gone) = agents.remove(id) {
            if gone.close_reason() != Some(CloseReason::Revoked) {
                let (targets, credential) = (gone.targets(), gone.credential.digest);
                let last = departed::LastTunnel {
                    remote: gone.remote,
                    connected_at: gone.connected_at,
                    gone_at: SystemTime::now(),
                    stats: gone.stats(),
                };
                departed::lock(&self.departed).add(id, targets, credential, last, Instant::now());
            }
        }
        self.metrics.remove_agent(id);
        self.metrics.agents_connected.set(agents.len() as i64);
        self.changes.notify_one();
        true
    }

    /// Forgets the disconnected agents whose token `tokens` no longer accepts for their id;
    /// returns their ids.
    pub fn forget_unauthorized(&self, tokens: &crate::auth::TokensFile) -> Vec<String> {
        departed::lock(&self.departed)
            .retain_authorized(|id, digest| tokens.authorize_digest(digest, id).is_ok())
    }

    /// What service discovery lists, sorted by id: every connected agent and every disconnected
    /// one still kept, each with its targets.
    pub fn discoverable(&self) -> Vec<(String, Arc<TargetList>)> {
        let agents = self.read();
        let mut departed = departed::lock(&self.departed);
        departed.prune(Instant::now());
        let mut all: Vec<_> = agents
            .values()
            .map(|a| (a.id.clone(), a.targets()))
            .chain(departed.iter().map(|(id, t)| (id.to_owned(), t.clone())))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The disconnected agents still kept in service discovery, with their targets and last
    /// tunnel (unordered).
    pub(super) fn departed(&self) -> Vec<(String, Arc<TargetList>, departed::LastTunnel)> {
        let mut departed = departed::lock(&self.departed);
        departed.prune(Instant::now());
        departed
            .entries()
            .map(|(id, targets, last)| (id.to_owned(), targets.clone(), last.clone()))
            .collect()
    }

    /// Drops the scrape series of the targets the tunnel `session` of agent `id` no longer
    /// lists: an agent whose targets change on reload would otherwise keep the series of every
    /// target it ever had until it disconnects. The caller has published `list` to the handle
    /// already: a scrape of a dropped target still in flight counts under `target="unknown"`
    /// (the write lock orders it before or after this).
    pub fn targets_changed(&self, id: &str, session: u64, list: &TargetList) {
        let agents = self.write();
        if agents.get(id).is_some_and(|a| a.session == session) {
            self.changes.notify_one();
            // `unknown` counts the agent's scrapes that matched no target: it stays.
            self.metrics.remove_unlisted_targets(id, |name| {
                name == super::proxy::UNKNOWN || list.targets.iter().any(|t| t.name == name)
            });
        }
    }

    /// Counts a finished scrape in the series of `labels.agent` if a tunnel of that id is
    /// connected and not failing, under `target="unknown"` if it no longer lists the target; false if none is.
    /// One that ends after its agent went (in flight while it drained) is not counted here: the
    /// agent's series went with it and must not come back before the agent does. Nor may a
    /// removed target's (see [`Registry::targets_changed`]).
    pub fn count_scrape(&self, labels: &ScrapeLabels, elapsed: Duration, bytes: u64) -> bool {
        // Held while counting, so that `remove` and `targets_changed` cannot drop the series in
        // between.
        let agents = self.read();
        let Some(agent) = agents.get(&labels.agent).filter(|a| !a.tunnel_broken()) else {
            return false;
        };
        let unknown = super::proxy::UNKNOWN;
        let listed = |name: &str| agent.targets().targets.iter().any(|t| t.name == name);
        if labels.target == unknown || listed(&labels.target) {
            self.metrics.record_scrape(labels, elapsed, bytes);
        } else {
            let labels = ScrapeLabels {
                target: unknown.to_owned(),
                ..labels.clone()
            };
            self.metrics.record_scrape(&labels, elapsed, bytes);
        }
        true
    }

    /// The agent with `id`, if connected.
    pub fn get(&self, id: &str) -> Option<Arc<AgentHandle>> {
        self.read().get(id).cloned()
    }

    /// Every connected agent, sorted by id.
    pub fn snapshot(&self) -> Vec<Arc<AgentHandle>> {
        let mut all: Vec<_> = self.read().values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    // A poisoned lock means a panic while holding it; the map itself is still consistent
    // (every mutation is a single insert or remove), so keep serving.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<AgentHandle>>> {
        self.agents.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<AgentHandle>>> {
        self.agents.write().unwrap_or_else(|p| p.into_inner())
    }
}
