//! The host connection exporter: the host's TCP connections by state, direction and remote
//! country, IPv4 and IPv6, read on every scrape.
//!
//! Sources: netlink `sock_diag` ([`netlink`]), falling back to `/proc/net/tcp{,6}` ([`procfs`])
//! when netlink fails. Both give [`Socket`]s, which [`aggregate`] counts into a [`Snapshot`].
//!
//! Exported by [`ConnectionCollector`] (a prometheus-client `Collector`; register it on the root
//! registry, its names already carry the `ferry_` prefix):
//! - `ferry_host_tcp_connections{state, direction, country}` — sockets that are not listening.
//!   `state` as node_exporter's tcpstat (`established`, `syn_sent`, `syn_recv`, `fin_wait1`,
//!   `fin_wait2`, `time_wait`, `close`, `close_wait`, `last_ack`, `closing`); `direction` is
//!   `inbound` when the socket's local port is listened on at its local address or a wildcard
//!   address, `outbound` otherwise; `country` is the remote address's [`Country`]. Only label
//!   combinations with at least one socket appear.
//! - `ferry_host_tcp_listen_sockets` — listening sockets, which are not connections.
//! - `ferry_host_tcp_collector_success` — 1 when a source could be read, 0 when both failed.
//!
//! Excluded connections are not counted anywhere:
//! - those whose remote address is in a configured CIDR (the original exporter's blacklist);
//! - the host's connections to itself over one of its non-loopback addresses: a remote address
//!   that is the local address of some socket on the host. Such a connection's country would be
//!   the host's own and mislabel local traffic as coming from abroad. Connections over loopback
//!   are counted (country `loopback`, a kind of its own); exclude `127.0.0.0/8` and `::1/128` by
//!   CIDR to drop them.
//!
//! v4-mapped IPv6 addresses (dual-stack sockets) are treated as the IPv4 addresses they carry.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use ipnet::IpNet;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::telemetry::geo::{canonical, Country, SharedGeo};

#[cfg(target_os = "linux")]
pub mod netlink;
pub mod procfs;

/// TCP state of a socket, numbered as in the kernel (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    /// An open connection.
    Established = 1,
    /// Connecting: SYN sent.
    SynSent = 2,
    /// Being accepted: SYN received (also the kernel's request sockets).
    SynRecv = 3,
    /// Closed locally, waiting for the FIN's ACK.
    FinWait1 = 4,
    /// Closed locally, waiting for the peer's FIN.
    FinWait2 = 5,
    /// Closed, lingering to absorb late segments.
    TimeWait = 6,
    /// No connection (created or bound, not connected).
    Close = 7,
    /// Closed by the peer, waiting for the local close.
    CloseWait = 8,
    /// Closed by both, waiting for the last ACK.
    LastAck = 9,
    /// Listening.
    Listen = 10,
    /// Both sides closed at once.
    Closing = 11,
}

impl TcpState {
    /// The state of a kernel state number; `TCP_NEW_SYN_RECV` (12) counts as `SynRecv`.
    pub fn from_kernel(state: u8) -> Option<TcpState> {
        use TcpState::*;
        Some(match state {
            1 => Established,
            2 => SynSent,
            3 | 12 => SynRecv,
            4 => FinWait1,
            5 => FinWait2,
            6 => TimeWait,
            7 => Close,
            8 => CloseWait,
            9 => LastAck,
            10 => Listen,
            11 => Closing,
            _ => return None,
        })
    }

    /// The `state` label value, as node_exporter's tcpstat collector names it.
    pub fn as_str(self) -> &'static str {
        use TcpState::*;
        match self {
            Established => "established",
            SynSent => "syn_sent",
            SynRecv => "syn_recv",
            FinWait1 => "fin_wait1",
            FinWait2 => "fin_wait2",
            TimeWait => "time_wait",
            Close => "close",
            CloseWait => "close_wait",
            LastAck => "last_ack",
            Listen => "listen",
            Closing => "closing",
        }
    }
}

/// Who opened a connection, as far as the host's listening sockets tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// The local end is a port the host listens on: a peer connected to this host.
    Inbound,
    /// Any other connection: this host connected out.
    Outbound,
}

impl Direction {
    /// The `direction` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// One TCP socket as a source reports it, with v4-mapped addresses made IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Socket {
    /// Its state.
    pub state: TcpState,
    /// The local address and port.
    pub local: SocketAddr,
    /// The remote address and port (unspecified for listening and unconnected sockets).
    pub remote: SocketAddr,
}

impl Socket {
    /// A socket, v4-mapped addresses turned into IPv4.
    pub fn new(state: TcpState, local: SocketAddr, remote: SocketAddr) -> Socket {
        let canon = |a: SocketAddr| SocketAddr::new(canonical(a.ip()), a.port());
        Socket {
            state,
            local: canon(local),
            remote: canon(remote),
        }
    }
}

/// One series of `ferry_host_tcp_connections`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// `state` label.
    pub state: TcpState,
    /// `direction` label.
    pub direction: Direction,
    /// `country` label.
    pub country: Country,
}

/// The counts of one scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Connections (not listening sockets) by series.
    pub connections: BTreeMap<ConnKey, u64>,
    /// Listening sockets.
    pub listen_sockets: u64,
}

impl Snapshot {
    /// The count of one series, 0 when absent.
    pub fn count(&self, state: TcpState, direction: Direction, country: Country) -> u64 {
        let key = ConnKey {
            state,
            direction,
            country,
        };
        self.connections.get(&key).copied().unwrap_or(0)
    }
}

/// Where the sockets are read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Netlink, falling back to `/proc` when netlink fails.
    Auto,
    /// Netlink only.
    Netlink,
    /// `/proc/net/tcp{,6}` only.
    Procfs,
}

/// Neither source could be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the host's TCP sockets failed: {0}")]
pub struct CollectError(String);

/// Counts the host's TCP connections on every scrape; see the module documentation.
pub struct ConnectionCollector {
    geo: SharedGeo,
    exclude: Vec<IpNet>,
    source: Source,
    /// Set once the netlink failure has been logged, so a scrape loop does not repeat it.
    fallback_logged: AtomicBool,
}

impl fmt::Debug for ConnectionCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionCollector")
            .field("exclude", &self.exclude)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl ConnectionCollector {
    /// A collector labelling remote countries with `geo` and dropping remotes in `exclude`.
    pub fn new(geo: SharedGeo, exclude: Vec<IpNet>) -> ConnectionCollector {
        ConnectionCollector {
            geo,
            exclude,
            source: Source::Auto,
            fallback_logged: AtomicBool::new(false),
        }
    }

    /// Reads only from `source` (default [`Source::Auto`]).
    pub fn with_source(mut self, source: Source) -> ConnectionCollector {
        self.source = source;
        self
    }

    /// The host's TCP sockets, IPv4 and IPv6, from the configured source.
    pub fn sockets(&self) -> Result<Vec<Socket>, CollectError> {
        match self.source {
            Source::Netlink => read_netlink().map_err(|e| CollectError(format!("netlink: {e}"))),
            Source::Procfs => procfs::read().map_err(|e| CollectError(format!("/proc: {e}"))),
            Source::Auto => self.sockets_auto(),
        }
    }

    fn sockets_auto(&self) -> Result<Vec<Socket>, CollectError> {
        let netlink_err = match read_netlink() {
            Ok(sockets) => return Ok(sockets),
            Err(e) => e,
        };
        if !self.fallback_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %netlink_err, "netlink sock_diag failed; reading /proc/net/tcp instead");
        }
        procfs::read().map_err(|e| CollectError(format!("netlink: {netlink_err}; /proc: {e}")))
    }

    /// Reads the sockets and counts them.
    pub fn collect(&self) -> Result<Snapshot, CollectError> {
        Ok(aggregate(&self.sockets()?, &self.geo, &self.exclude))
    }
}

#[cfg(target_os = "linux")]
fn read_netlink() -> std::io::Result<Vec<Socket>> {
    netlink::dump()
}

#[cfg(not(target_os = "linux"))]
fn read_netlink() -> std::io::Result<Vec<Socket>> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "netlink needs Linux",
    ))
}

/// Counts `sockets` by series, applying the exclusions of the module documentation.
pub fn aggregate(sockets: &[Socket], geo: &SharedGeo, exclude: &[IpNet]) -> Snapshot {
    let listeners = Listeners::of(sockets);
    let host_addrs = host_addresses(sockets);
    let mut countries: HashMap<IpAddr, Country> = HashMap::new();
    let mut snapshot = Snapshot {
        listen_sockets: listeners.count,
        ..Snapshot::default()
    };
    for s in sockets.iter().filter(|s| s.state != TcpState::Listen) {
        let remote = s.remote.ip();
        if host_addrs.contains(&remote) || exclude.iter().any(|net| net.contains(&remote)) {
            continue;
        }
        let key = ConnKey {
            state: s.state,
            direction: listeners.direction(s.local),
            country: *countries
                .entry(remote)
                .or_insert_with(|| geo.lookup(remote)),
        };
        *snapshot.connections.entry(key).or_insert(0) += 1;
    }
    snapshot
}

/// The non-loopback, specified local addresses of the host's sockets: the host's own addresses
/// in use. A connection from the host to itself has its remote among them (its other end is a
/// socket in the same dump).
fn host_addresses(sockets: &[Socket]) -> HashSet<IpAddr> {
    sockets
        .iter()
        .map(|s| s.local.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect()
}

/// Listening addresses by port.
struct Listeners {
    by_port: HashMap<u16, Vec<IpAddr>>,
    count: u64,
}

impl Listeners {
    fn of(sockets: &[Socket]) -> Listeners {
        let mut by_port: HashMap<u16, Vec<IpAddr>> = HashMap::new();
        let mut count = 0;
        for s in sockets.iter().filter(|s| s.state == TcpState::Listen) {
            by_port
                .entry(s.local.port())
                .or_default()
                .push(s.local.ip());
            count += 1;
        }
        Listeners { by_port, count }
    }

    /// Inbound when a listener on the local port covers the local address: the same address,
    /// `0.0.0.0` for IPv4, or `::` (dual-stack) for either family.
    fn direction(&self, local: SocketAddr) -> Direction {
        let covers = |listen: &IpAddr| {
            *listen == local.ip()
                || (listen.is_unspecified() && (listen.is_ipv6() || local.is_ipv4()))
        };
        match self.by_port.get(&local.port()) {
            Some(addrs) if addrs.iter().any(covers) => Direction::Inbound,
            _ => Direction::Outbound,
        }
    }
}

impl Collector for ConnectionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshot = match self.collect() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "host connection collector failed");
                None
            }
        };
        if let Some(snapshot) = &snapshot {
            encode_snapshot(snapshot, &mut encoder)?;
        }
        encode_gauge(
            &mut encoder,
            "ferry_host_tcp_collector_success",
            "Whether the host's TCP sockets could be read on this scrape (netlink or /proc).",
            i64::from(snapshot.is_some()),
        )
    }
}

fn encode_snapshot(snapshot: &Snapshot, encoder: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
    let mut family = encoder.encode_descriptor(
        "ferry_host_tcp_connections",
        "The host's TCP connections (listening sockets excluded) by state, direction (inbound: local port listened on) and remote country.",
        None,
        MetricType::Gauge,
    )?;
    for (key, count) in &snapshot.connections {
        let labels = [
            ("state", key.state.as_str()),
            ("direction", key.direction.as_str()),
            ("country", key.country.as_str()),
        ];
        ConstGauge::new(*count as i64).encode(family.encode_family(&labels)?)?;
    }
    encode_gauge(
        encoder,
        "ferry_host_tcp_listen_sockets",
        "The host's listening TCP sockets, IPv4 and IPv6.",
        snapshot.listen_sockets as i64,
    )
}

fn encode_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}
