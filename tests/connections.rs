//! The host connection collector: real connections opened here on loopback (IPv4, IPv6 and
//! dual-stack) counted by state, direction and country through netlink and /proc, the two sources
//! agreeing on the same live sockets, the /proc parser against fixture text, the exclusion rules,
//! and the exposition a scrape sees.
#![cfg(all(feature = "geo", target_os = "linux"))]

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ferry::telemetry::connections::{
    aggregate, netlink, procfs, ConnectionCollector, Direction, Snapshot, Socket, Source, TcpState,
};
use ferry::telemetry::encode_registry;
use ferry::telemetry::geo::{Country, SharedGeo};
use ipnet::IpNet;
use prometheus_client::registry::Registry;

use Direction::{Inbound, Outbound};
use TcpState::*;

const N: usize = 5;

fn geo_test_db() -> SharedGeo {
    SharedGeo::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/geo/GeoLite2-Country-Test.mmdb"
    ))
    .unwrap()
}

fn country(code: &str) -> Country {
    Country::iso(code).unwrap()
}

fn nets(cidrs: &[&str]) -> Vec<IpNet> {
    cidrs.iter().map(|c| c.parse().unwrap()).collect()
}

/// A listener and N established connections to it, both ends held open.
struct Pairs {
    listener: TcpListener,
    clients: Vec<TcpStream>,
    servers: Vec<TcpStream>,
}

impl Pairs {
    /// Listens on `bind` and connects N clients to `connect_ip` at the listener's port.
    fn open(bind: &str, connect_ip: &str) -> Pairs {
        let listener = TcpListener::bind(bind).unwrap();
        let port = listener.local_addr().unwrap().port();
        let target: SocketAddr = format!("{connect_ip}:{port}").parse().unwrap();
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..N {
            clients.push(TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap());
            servers.push(listener.accept().unwrap().0);
        }
        Pairs {
            listener,
            clients,
            servers,
        }
    }

    fn listen_addr(&self) -> SocketAddr {
        let addr = self.listener.local_addr().unwrap();
        Socket::new(Listen, addr, addr).local
    }

    /// The sockets of `all` that belong to this test: the listener, its accepted sockets and the
    /// clients (which have the listener's address as their remote end).
    fn ours(&self, all: &[Socket]) -> Vec<Socket> {
        let port = self.listener.local_addr().unwrap().port();
        let ends: BTreeSet<SocketAddr> = self
            .clients
            .iter()
            .chain(&self.servers)
            .flat_map(|s| [s.local_addr().unwrap(), s.peer_addr().unwrap()])
            .map(|a| Socket::new(Listen, a, a).local)
            .collect();
        let mut ours: Vec<Socket> = all
            .iter()
            .filter(|s| {
                (s.state == Listen && s.local == self.listen_addr())
                    || (s.state != Listen
                        && (s.local.port() == port || s.remote.port() == port)
                        && ends.contains(&s.local)
                        && ends.contains(&s.remote))
            })
            .copied()
            .collect();
        ours.sort();
        ours
    }
}

fn assert_counts(
    snapshot: &Snapshot,
    state: TcpState,
    country: Country,
    inbound: u64,
    outbound: u64,
) {
    assert_eq!(
        snapshot.count(state, Inbound, country),
        inbound,
        "{state:?} inbound {country}: {snapshot:#?}"
    );
    assert_eq!(
        snapshot.count(state, Outbound, country),
        outbound,
        "{state:?} outbound {country}: {snapshot:#?}"
    );
}

/// Netlink, /proc and the automatic choice all see the pairs; the exact counts are checked on the
/// test's own sockets, the host-wide snapshot must contain at least them.
fn check_live(pairs: &Pairs) {
    let geo = SharedGeo::disabled();
    for source in [Source::Netlink, Source::Procfs, Source::Auto] {
        let collector = ConnectionCollector::new(geo.clone(), vec![]).with_source(source);
        // Neither /proc nor a netlink dump is a snapshot: sockets that tests running alongside
        // open and close meanwhile can make a read miss a line. A few reads, then the verdict.
        let mut all = collector.sockets().unwrap();
        for _ in 0..4 {
            if pairs.ours(&all).len() == 2 * N + 1 {
                break;
            }
            all = collector.sockets().unwrap();
        }
        let ours = pairs.ours(&all);
        assert_eq!(ours.len(), 2 * N + 1, "{source:?}: {ours:#?}");
        let exact = aggregate(&ours, &geo, &[]);
        assert_counts(&exact, Established, Country::LOOPBACK, N as u64, N as u64);
        assert_eq!(exact.listen_sockets, 1);
        assert_eq!(exact.connections.values().sum::<u64>(), 2 * N as u64);

        let host = collector.collect().unwrap();
        assert!(
            host.count(Established, Inbound, Country::LOOPBACK) >= N as u64,
            "{source:?}"
        );
        assert!(
            host.count(Established, Outbound, Country::LOOPBACK) >= N as u64,
            "{source:?}"
        );
        assert!(host.listen_sockets >= 1);
    }
}

#[test]
fn ipv4_loopback_connections_counted_inbound_and_outbound() {
    check_live(&Pairs::open("127.0.0.1:0", "127.0.0.1"));
}

#[test]
fn ipv6_loopback_connections_counted_inbound_and_outbound() {
    let pairs = Pairs::open("[::1]:0", "[::1]");
    check_live(&pairs);
    let all = netlink::dump().unwrap();
    assert!(pairs
        .ours(&all)
        .iter()
        .all(|s| s.local.is_ipv6() && s.remote.is_ipv6()));
}

#[test]
fn dual_stack_v4_mapped_sockets_count_as_ipv4() {
    // An IPv6 listener on ::ffff:127.0.0.1 accepting IPv4 clients: the accepted sockets are IPv6
    // sockets with v4-mapped addresses, the clients plain IPv4 sockets.
    let pairs = Pairs::open("[::ffff:127.0.0.1]:0", "127.0.0.1");
    check_live(&pairs);
    let ours = pairs.ours(&netlink::dump().unwrap());
    let connections = ours.iter().filter(|s| s.state != Listen);
    assert!(
        connections
            .clone()
            .all(|s| s.local.is_ipv4() && s.remote.is_ipv4()),
        "{ours:#?}"
    );
    assert_eq!(connections.count(), 2 * N);
}

#[test]
fn netlink_and_procfs_agree_on_the_same_live_sockets() {
    for (bind, connect) in [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "[::1]")] {
        let pairs = Pairs::open(bind, connect);
        let via_netlink = pairs.ours(&netlink::dump().unwrap());
        let via_procfs = pairs.ours(&procfs::read().unwrap());
        assert_eq!(via_netlink.len(), 2 * N + 1);
        assert_eq!(via_netlink, via_procfs, "{bind}");
    }
}

#[test]
fn closed_connections_show_their_closing_states() {
    let pairs = Pairs::open("127.0.0.1:0", "127.0.0.1");
    let Pairs {
        listener,
        clients,
        servers,
    } = pairs;
    let port = listener.local_addr().unwrap().port();
    // The clients close first: they end in TIME_WAIT once the servers close too.
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(5);
    let geo = SharedGeo::disabled();
    loop {
        let ours: Vec<Socket> = netlink::dump()
            .unwrap()
            .into_iter()
            .filter(|s| s.local.port() == port || s.remote.port() == port)
            .collect();
        let snapshot = aggregate(&ours, &geo, &[]);
        // The clients pass FIN_WAIT1 until the servers' ACK of their FIN arrives.
        if snapshot.count(CloseWait, Inbound, Country::LOOPBACK) == N as u64
            && snapshot.count(FinWait2, Outbound, Country::LOOPBACK) == N as u64
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no CLOSE_WAIT/FIN_WAIT2: {snapshot:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    drop(servers);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ours: Vec<Socket> = procfs::read()
            .unwrap()
            .into_iter()
            .filter(|s| s.local.port() == port || s.remote.port() == port)
            .collect();
        let snapshot = aggregate(&ours, &geo, &[]);
        if snapshot.count(TimeWait, Outbound, Country::LOOPBACK) == N as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "no TIME_WAIT: {snapshot:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(listener);
}

#[test]
fn excluded_cidrs_drop_connections_live() {
    let v4 = Pairs::open("127.0.0.1:0", "127.0.0.1");
    let v6 = Pairs::open("[::1]:0", "[::1]");
    let all = netlink::dump().unwrap();
    let mut ours = v4.ours(&all);
    ours.extend(v6.ours(&all));
    let geo = SharedGeo::disabled();

    let kept = aggregate(&ours, &geo, &nets(&["127.0.0.0/8"]));
    assert_counts(&kept, Established, Country::LOOPBACK, N as u64, N as u64);
    assert_eq!(kept.listen_sockets, 2);

    let none = aggregate(&ours, &geo, &nets(&["127.0.0.0/8", "::1/128"]));
    assert!(none.connections.is_empty(), "{none:#?}");

    let all_kept = aggregate(&ours, &geo, &nets(&["10.0.0.0/8", "2001:db8::/32"]));
    assert_counts(
        &all_kept,
        Established,
        Country::LOOPBACK,
        2 * N as u64,
        2 * N as u64,
    );
}

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap()
}

fn fixture_sockets() -> Vec<Socket> {
    let mut sockets = procfs::parse(&fixture("proc_net_tcp.txt")).unwrap();
    sockets.extend(procfs::parse(&fixture("proc_net_tcp6.txt")).unwrap());
    sockets
}

fn sock(state: TcpState, local: &str, remote: &str) -> Socket {
    Socket::new(state, local.parse().unwrap(), remote.parse().unwrap())
}

// The fixtures were written on a little-endian host (addresses in host byte order).
#[cfg(target_endian = "little")]
#[test]
fn procfs_parser_reads_fixture_text() {
    let v4 = procfs::parse(&fixture("proc_net_tcp.txt")).unwrap();
    // 12 lines, the last one in state 0x0D (unknown to ferry) skipped.
    assert_eq!(v4.len(), 11);
    assert_eq!(v4[0], sock(Listen, "0.0.0.0:22", "0.0.0.0:0"));
    assert_eq!(v4[1], sock(Listen, "127.0.0.1:8080", "0.0.0.0:0"));
    assert_eq!(
        v4[2],
        sock(Established, "192.0.2.2:22", "81.2.69.160:51000")
    );
    assert_eq!(
        v4[3],
        sock(Established, "192.0.2.2:40000", "89.160.20.112:443")
    );
    assert_eq!(v4[4], sock(TimeWait, "192.0.2.2:40002", "216.160.83.56:80"));
    assert_eq!(v4[5], sock(SynSent, "192.0.2.2:40004", "10.1.2.3:9100"));
    assert_eq!(v4[10], sock(CloseWait, "192.0.2.2:40008", "8.8.8.8:53"));

    let v6 = procfs::parse(&fixture("proc_net_tcp6.txt")).unwrap();
    assert_eq!(v6.len(), 7);
    assert_eq!(v6[0], sock(Listen, "[::]:443", "[::]:0"));
    assert_eq!(
        v6[1],
        sock(Established, "[2001:db8::2]:443", "[2001:218::1]:50100")
    );
    // v4-mapped addresses come out as IPv4.
    assert_eq!(
        v6[2],
        sock(Established, "192.0.2.2:443", "81.2.69.160:51002")
    );
    assert_eq!(v6[4], sock(Established, "[::1]:9369", "[::1]:50200"));
    assert_eq!(v6[6], sock(FinWait2, "[fe80::2]:50300", "[fe80::1]:179"));
}

#[test]
fn procfs_parser_rejects_malformed_lines() {
    let header = "  sl  local_address rem_address   st tx_queue\n";
    for (line, reason) in [
        (
            "   0: 0100007F:1F90 00000000:0000\n",
            "fewer than four fields",
        ),
        (
            "   0: 0100007G:1F90 00000000:0000 0A\n",
            "bad local address",
        ),
        ("   0: 0100007F:1F90 000000:0000 0A\n", "bad remote address"),
        ("   0: 0100007F:1F90 00000000:0000 ZZ\n", "bad state"),
        ("   0: 0100007F 00000000:0000 0A\n", "bad local address"),
    ] {
        let err = procfs::parse(&format!("{header}{line}")).unwrap_err();
        assert_eq!((err.line, err.reason), (2, reason), "{line}");
    }
    assert_eq!(procfs::parse("").unwrap(), vec![]);
    assert_eq!(procfs::parse(header).unwrap(), vec![]);
}

#[cfg(target_endian = "little")]
#[test]
fn fixture_counts_by_state_direction_and_country() {
    let snapshot = aggregate(&fixture_sockets(), &geo_test_db(), &[]);
    assert_eq!(snapshot.listen_sockets, 4);
    // 81.2.69.160 to 0.0.0.0:22 and, v4-mapped, to [::]:443.
    assert_counts(&snapshot, Established, country("GB"), 2, 0);
    assert_counts(&snapshot, Established, country("SE"), 0, 1);
    assert_counts(&snapshot, TimeWait, country("US"), 0, 1);
    assert_counts(&snapshot, SynSent, Country::PRIVATE, 0, 1);
    assert_counts(&snapshot, CloseWait, Country::UNKNOWN, 0, 1);
    assert_counts(&snapshot, Established, country("JP"), 1, 0);
    assert_counts(&snapshot, FinWait2, Country::LINK_LOCAL, 0, 1);
    // 127.0.0.1 ↔ 127.0.0.1:8080 and ::1 ↔ [::1]:9369: loopback is counted, both ends.
    assert_counts(&snapshot, Established, Country::LOOPBACK, 2, 2);
    // The host's connection to itself over 192.0.2.2 is excluded (both ends), so the total is:
    assert_eq!(snapshot.connections.values().sum::<u64>(), 12);
    assert_counts(&snapshot, Established, Country::UNKNOWN, 0, 0);
}

#[cfg(target_endian = "little")]
#[test]
fn fixture_exclusions() {
    let geo = geo_test_db();
    let sockets = fixture_sockets();
    // The blacklist matches v4-mapped remotes too.
    let snapshot = aggregate(&sockets, &geo, &nets(&["81.2.69.0/24", "2001:218::/32"]));
    assert_counts(&snapshot, Established, country("GB"), 0, 0);
    assert_counts(&snapshot, Established, country("JP"), 0, 0);
    assert_counts(&snapshot, Established, country("SE"), 0, 1);

    let snapshot = aggregate(&sockets, &geo, &nets(&["127.0.0.0/8"]));
    assert_counts(&snapshot, Established, Country::LOOPBACK, 1, 1);
    assert_eq!(
        snapshot.listen_sockets, 4,
        "listeners are not connections: never excluded"
    );
}

#[test]
fn host_addresses_rule() {
    let geo = SharedGeo::disabled();
    let sockets = [
        // The host (198.51.100.10) connects to itself over its own address: excluded.
        sock(Established, "198.51.100.10:40000", "198.51.100.10:22"),
        sock(Established, "198.51.100.10:22", "198.51.100.10:40000"),
        sock(Listen, "0.0.0.0:22", "0.0.0.0:0"),
        // A peer on another address of the same subnet is not the host: counted.
        sock(Established, "198.51.100.10:22", "198.51.100.11:50000"),
        // Loopback is never "the host's own address" for this rule.
        sock(Established, "127.0.0.1:40001", "127.0.0.1:22"),
        // An address only seen as a listener's local address still belongs to the host.
        sock(Listen, "[2001:db8::5]:443", "[::]:0"),
        sock(SynSent, "[2001:db8::6]:40002", "[2001:db8::5]:443"),
    ];
    let snapshot = aggregate(&sockets, &geo, &[]);
    assert_counts(&snapshot, Established, Country::UNKNOWN, 1, 0);
    assert_counts(&snapshot, Established, Country::LOOPBACK, 0, 1);
    assert_eq!(
        snapshot.connections.values().sum::<u64>(),
        2,
        "{snapshot:#?}"
    );
    assert_eq!(snapshot.listen_sockets, 2);
}

#[test]
fn direction_follows_listening_address_and_port() {
    let geo = SharedGeo::disabled();
    let sockets = [
        sock(Listen, "127.0.0.1:8080", "0.0.0.0:0"),
        sock(Listen, "0.0.0.0:9100", "0.0.0.0:0"),
        sock(Listen, "[::]:9200", "[::]:0"),
        // Local port 8080 on another address than the listener's: not accepted by it.
        sock(Established, "127.0.0.2:8080", "203.0.113.1:443"),
        sock(Established, "127.0.0.1:8080", "203.0.113.2:50000"),
        // 0.0.0.0 covers IPv4 only, :: (dual-stack) covers both families.
        sock(Established, "[2001:db8::1]:9100", "[2001:db8::9]:50000"),
        sock(Established, "192.0.2.1:9100", "203.0.113.3:50000"),
        sock(Established, "192.0.2.1:9200", "203.0.113.4:50000"),
    ];
    let snapshot = aggregate(&sockets, &geo, &[]);
    assert_eq!(
        snapshot.count(Established, Inbound, Country::UNKNOWN),
        3,
        "{snapshot:#?}"
    );
    assert_eq!(
        snapshot.count(Established, Outbound, Country::UNKNOWN),
        2,
        "{snapshot:#?}"
    );
}

/// The value of the series `name{labels}` in an exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn collector_exposition() {
    let pairs = Pairs::open("127.0.0.1:0", "127.0.0.1");
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ConnectionCollector::new(geo_test_db(), vec![])));
    let text = encode_registry(&registry);
    assert!(
        text.contains("# TYPE ferry_host_tcp_connections gauge"),
        "{text}"
    );
    for direction in ["inbound", "outbound"] {
        let series = format!(
            "ferry_host_tcp_connections{{state=\"established\",direction=\"{direction}\",country=\"loopback\"}}"
        );
        let value = sample(&text, &series).unwrap_or_else(|| panic!("no {series} in {text}"));
        assert!(value >= N as f64, "{series} {value}");
    }
    assert!(
        sample(&text, "ferry_host_tcp_listen_sockets").unwrap() >= 1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "ferry_host_tcp_collector_success"),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("state=\"listen\""), "{text}");
    drop(pairs);
}
