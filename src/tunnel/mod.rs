//! Wire protocol v1, shared by both ends of the tunnel.
//!
//! TCP (directly or through an HTTP CONNECT proxy) → TLS 1.3 → HTTP/1.1 `Upgrade: ferry/1` carrying
//! the bearer token and agent id → HTTP/2 with the roles reversed: the gateway is the HTTP/2 client,
//! the agent the HTTP/2 server. No framing or crypto of our own.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[cfg(feature = "agent")]
pub mod dial;
// Public for the tests, which speak the upgrade as a hostile agent or a bare gateway would; not
// part of the API (the agent and the gateway do the handshake themselves).
#[doc(hidden)]
pub mod handshake;
#[cfg(any(feature = "agent", feature = "gateway"))]
pub(crate) mod metrics_path;
#[cfg(feature = "agent")]
pub mod no_proxy;
#[cfg(any(feature = "agent", feature = "gateway"))]
pub(crate) mod sd_size;
pub mod tls;
#[cfg(any(feature = "agent", feature = "gateway", feature = "egress"))]
pub mod tls_cert;
#[cfg(any(feature = "agent", feature = "egress"))]
pub mod tls_client;
#[cfg(feature = "gateway")]
pub mod tls_server;

/// Path of the HTTP/1.1 request that opens a tunnel.
pub const TUNNEL_PATH: &str = "/ferry/v1/tunnel";
/// Value of the `Upgrade` header that switches the connection to the tunnel protocol.
pub const UPGRADE_PROTOCOL: &str = "ferry/1";
/// Header naming the agent id the tunnel claims.
pub const AGENT_ID_HEADER: &str = "ferry-agent-id";
/// Path the gateway asks (over HTTP/2) for the agent's target list.
pub const TARGETS_PATH: &str = "/ferry/v1/targets";
/// Path the gateway POSTs (over HTTP/2) a one-line plain-text reason to before it closes a tunnel
/// because another tunnel took its agent id: the agent then waits its slow backoff instead of
/// reconnecting at once. An agent without it answers an error; harmless.
pub const CLOSING_PATH: &str = "/ferry/v1/closing";
/// Where the closing notices of other kinds go: `/ferry/v1/closing/<kind>`. An agent that knows
/// only [`CLOSING_PATH`] (which it reads as "another agent claims our id") answers them 400 and
/// goes on as if none had come.
const CLOSING_KIND_PREFIX: &str = "/ferry/v1/closing/";
/// How long the gateway waits for the agent to take a closing notice before it closes anyway.
pub const CLOSING_NOTICE_TIMEOUT: Duration = Duration::from_secs(2);
/// The same when the gateway shuts down: a restart waits for no agent longer than this.
pub const SHUTDOWN_NOTICE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the gateway closes a tunnel, as its closing notice says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosingKind {
    /// Another tunnel took the agent id ([`CLOSING_PATH`]).
    IdTaken,
    /// The tokens file no longer lets the tunnel's token claim its id.
    Revoked,
    /// The gateway is shutting down (a restart, most often).
    Shutdown,
    /// The gateway refused the agent's target list (too large for its service discovery).
    TargetsRefused,
    /// A kind this build does not know (a newer gateway's): a tunnel closed, nothing more.
    Other,
}

impl ClosingKind {
    /// The path the notice of this kind is sent to.
    pub fn path(self) -> &'static str {
        match self {
            ClosingKind::IdTaken => CLOSING_PATH,
            ClosingKind::Revoked => "/ferry/v1/closing/revoked",
            ClosingKind::Shutdown => "/ferry/v1/closing/shutdown",
            ClosingKind::TargetsRefused => "/ferry/v1/closing/targets",
            ClosingKind::Other => "/ferry/v1/closing/other",
        }
    }

    /// The kind of a notice sent to `path`; `None` if `path` is no closing notice's.
    pub fn of_path(path: &str) -> Option<ClosingKind> {
        if path == CLOSING_PATH {
            return Some(ClosingKind::IdTaken);
        }
        let kind = path.strip_prefix(CLOSING_KIND_PREFIX)?;
        [
            ClosingKind::Revoked,
            ClosingKind::Shutdown,
            ClosingKind::TargetsRefused,
        ]
        .into_iter()
        .find(|k| k.path() == path)
        .or((!kind.is_empty()).then_some(ClosingKind::Other))
    }
}

/// Largest scrape request body that goes through the tunnel (scrapes have none; this is for the
/// odd POST): the gateway refuses a larger one before sending it, and the agent refuses one that
/// reaches it anyway before it contacts the target.
pub const MAX_REQUEST_BODY: usize = 1 << 20;

/// Longest closing notice the agent reads.
pub const MAX_CLOSING_NOTICE: usize = 1024;
/// Authority of control requests; scrapes always carry `<agent-id>:<port>`, control requests no port.
pub const CONTROL_AUTHORITY: &str = "ferry";
/// Header carrying the scrape timeout Prometheus asks for (seconds, float).
pub const SCRAPE_TIMEOUT_HEADER: &str = "x-prometheus-scrape-timeout-seconds";
/// How long the agent holds a `?after=<version>` targets request open when nothing changes.
pub const TARGETS_LONG_POLL: Duration = Duration::from_secs(300);

/// `SETTINGS_MAX_HEADER_LIST_SIZE` of both ends of the tunnel's HTTP/2.
pub const MAX_HEADER_LIST: u32 = 64 << 10;

/// The most header bytes either end sends in one request or response, counted as HTTP/2 counts
/// them ([`header_list_size`]). Checked before sending and well under [`MAX_HEADER_LIST`]: an
/// HTTP/2 peer answers a header list over its limit by closing the whole connection (it cannot
/// keep its HPACK state otherwise), so one oversized scrape would cut every scrape of the agent.
pub const MAX_HEADER_BYTES: usize = 32 << 10;

/// The size of `headers` as HTTP/2 counts a header list (RFC 9113 §6.5.2): name, value and 32
/// bytes per field, here with a field's worth of allowance for each pseudo-header.
pub fn header_list_size(headers: &http::HeaderMap, pseudo: &[&str]) -> usize {
    let fields: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    fields + pseudo.iter().map(|p| p.len() + 32 + 10).sum::<usize>()
}

/// HTTP/2 PING keepalive settings, used by both sides of the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between PINGs. Shorter than the idle cut of any middlebox on the way.
    pub interval: Duration,
    /// How long to wait for a PING's acknowledgement before declaring the peer dead.
    pub timeout: Duration,
}

impl Default for Keepalive {
    /// 20 s keeps a tunnel alive behind a load balancer that cuts connections idle for 60 s,
    /// and finds a dead peer within 40 s.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(20),
            timeout: Duration::from_secs(20),
        }
    }
}

/// Labels an agent may not set: `job` and `instance` are how Prometheus identifies a series'
/// source, `ferry_agent` and `ferry_target` are set by the gateway. An agent decides what its
/// targets are called, not how Prometheus identifies them.
pub const RESERVED_LABELS: [&str; 4] = ["job", "instance", "ferry_agent", "ferry_target"];

/// Why an agent may not publish a label called `name`, or `None` if it may: it must be a
/// Prometheus label name, not one of the `__`-prefixed names that steer the scrape itself
/// (`__scheme__`, `__param_*`, `__address__`), and not one of [`RESERVED_LABELS`].
pub fn label_name_problem(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__");
    if !valid {
        return Some(format!(
            "{name:?} is not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"
        ));
    }
    RESERVED_LABELS.contains(&name).then(|| {
        format!("{name:?} is reserved: job, instance, ferry_agent and ferry_target are set by Prometheus and the gateway")
    })
}

/// Whether `name` may name a target (`ferry_target` label): non-empty letters, digits, `-`, `_`, `.`.
pub fn valid_target_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The largest target list (its JSON) the gateway reads from an agent.
#[cfg(any(feature = "agent", feature = "gateway"))]
pub(crate) const MAX_TARGET_LIST_BYTES: usize = 1 << 20;

/// The most bytes one agent's targets may take in the gateway's service discovery (`/targets`,
/// counted by [`sd_size::sd_size`]). Every target's group repeats the agent's labels, so a list
/// within [`MAX_TARGET_LIST_BYTES`] could otherwise publish a gigabyte; an agent whose list goes
/// past this is refused. Twice the list's limit: ferry's own labels and the `<agent-id>:<port>`
/// address add a little to each target, an honest list stays well under it.
#[cfg(any(feature = "agent", feature = "gateway"))]
pub(crate) const MAX_SD_BYTES_PER_AGENT: usize = 2 << 20;

/// Why agent `agent_id` cannot publish `list`, if it cannot: too large for the gateway to read,
/// or to publish in its service discovery.
#[cfg(feature = "agent")]
pub(crate) fn target_list_size_problem(agent_id: &str, list: &TargetList) -> Option<String> {
    let size = serde_json::to_vec(list).map_or(usize::MAX, |json| json.len());
    if size > MAX_TARGET_LIST_BYTES {
        return Some(format!(
            "the labels and targets make a target list of {} KiB, more than the gateway reads ({} KiB): shorten the label values or spread the targets over more agents",
            size.div_ceil(1024),
            MAX_TARGET_LIST_BYTES / 1024
        ));
    }
    sd_size::sd_size_problem(agent_id, list)
}

/// Why `name`, a valid target name, still cannot be one: the gateway counts scrapes of targets
/// an agent does not list under `target="unknown"`, and a real target of that name would share
/// (and muddle) those series.
#[cfg(any(feature = "agent", feature = "gateway"))]
pub(crate) fn reserved_target_name(name: &str) -> Option<String> {
    (name == "unknown").then(|| {
        "target name \"unknown\" is reserved (the gateway counts scrapes of targets no agent lists under it): choose another".to_owned()
    })
}

/// The list of targets an agent serves, as it publishes it to the gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetList {
    /// Increases with every change, so the gateway can wait for the next one.
    pub version: u64,
    /// Labels of the agent, attached to every target in service discovery.
    pub labels: BTreeMap<String, String>,
    /// The targets, in configuration order.
    pub targets: Vec<TargetInfo>,
}

/// One target as the gateway sees it: how Prometheus addresses it, not where it really is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// The target's name (`ferry_target` label).
    pub name: String,
    /// The port Prometheus uses in `<agent-id>:<port>`.
    pub port: u16,
    /// The metrics path, percent-decoded: Prometheus's `__metrics_path__`, which it encodes when
    /// it requests it.
    pub path: String,
    /// The target's own labels.
    pub labels: BTreeMap<String, String>,
}

impl TargetList {
    /// The target served at `port` and `path`, a request's path as received (percent-encoded),
    /// if any: the one whose decoded path is `path` decoded.
    #[cfg(any(feature = "agent", feature = "gateway"))]
    pub fn find(&self, port: u16, path: &str) -> Option<&TargetInfo> {
        let requested = metrics_path::requested(path)?;
        self.targets
            .iter()
            .find(|t| t.port == port && t.path == requested)
    }
}

/// The first `max` bytes of `body` (a few more if its last frame crosses the limit), or what
/// arrived within `wait`: the words of a refusal, read without trusting its size or pace.
pub(crate) async fn body_prefix<B>(mut body: B, max: usize, wait: std::time::Duration) -> Vec<u8>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    use http_body_util::BodyExt as _;
    let mut bytes = Vec::new();
    let read = async {
        while bytes.len() < max {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        bytes.extend_from_slice(data);
                    }
                }
                _ => break,
            }
        }
    };
    // What arrived before the time ran out is still the reason.
    let _ = tokio::time::timeout(wait, read).await;
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_notices_are_told_apart_by_path() {
        for kind in [
            ClosingKind::IdTaken,
            ClosingKind::Revoked,
            ClosingKind::Shutdown,
            ClosingKind::TargetsRefused,
            ClosingKind::Other,
        ] {
            assert_eq!(ClosingKind::of_path(kind.path()), Some(kind));
        }
        assert_eq!(
            ClosingKind::of_path("/ferry/v1/closing/maintenance"),
            Some(ClosingKind::Other)
        );
        assert_eq!(ClosingKind::of_path("/ferry/v1/closing/"), None);
        assert_eq!(ClosingKind::of_path("/ferry/v1/closingx"), None);
        assert_eq!(ClosingKind::of_path(TARGETS_PATH), None);
    }

    #[test]
    fn targets_are_found_by_port_and_exact_path() {
        let t = |name: &str, port, path: &str| TargetInfo {
            name: name.into(),
            port,
            path: path.into(),
            labels: BTreeMap::new(),
        };
        let list = TargetList {
            version: 1,
            labels: BTreeMap::new(),
            targets: vec![t("node", 9100, "/metrics"), t("app", 9100, "/app/metrics")],
        };
        assert_eq!(
            list.find(9100, "/metrics").map(|t| t.name.as_str()),
            Some("node")
        );
        assert_eq!(
            list.find(9100, "/app/metrics").map(|t| t.name.as_str()),
            Some("app")
        );
        assert!(list.find(9101, "/metrics").is_none());
        assert!(list.find(9100, "/metrics/").is_none());
        assert!(list.find(9100, "/").is_none());
    }
}
