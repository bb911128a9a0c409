//! Who may use the egress proxy and where it may go.
//!
//! Destinations are default-deny rules `HOST[:PORTS]` or `CIDR[:PORTS]`. The proxy resolves names
//! itself and connects only to addresses it checked. Special-purpose addresses (loopback, private,
//! CGNAT, link-local, ULA, multicast, unspecified, reserved — and IPv6 forms embedding any of
//! them) are refused unless a rule names them by CIDR.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Ports a rule allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    /// Only these.
    List(BTreeSet<u16>),
    /// The default when a rule names none: 80 and 443.
    Web,
}

impl Ports {
    /// Whether `port` is allowed.
    pub fn allows(&self, port: u16) -> bool {
        match self {
            Ports::List(ports) => ports.contains(&port),
            Ports::Web => port == 80 || port == 443,
        }
    }
}

/// Where a rule lets traffic go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Exactly this host name (lower case, no trailing dot).
    Host(String),
    /// Any name below this suffix (`*.example.com` → `.example.com`); not the suffix itself.
    Wildcard(String),
    /// Any address in this network; the only way to reach special-purpose addresses.
    Net(IpNet),
}

/// A destination and its ports, as written `HOST[:PORTS]` or `CIDR[:PORTS]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Where.
    pub destination: Destination,
    /// Which ports.
    pub ports: Ports,
}

impl Upstream {
    /// Parses `collector.example.com:443`, `*.example.com`, `203.0.113.0/24:80,443`,
    /// `127.0.0.1/32:8080`, `[2001:db8::/32]:443` (or `[2001:db8::]/32:443`), `203.0.113.5:443`.
    pub fn parse(rule: &str) -> Result<Upstream, String> {
        let rule = rule.trim();
        if rule.is_empty() {
            return Err("empty rule: expected HOST[:PORTS] or CIDR[:PORTS]".into());
        }
        // A URL is the likeliest mistake; its `/` would otherwise be read as a CIDR's.
        if let Some((scheme, rest)) = rule.split_once("://") {
            let bare = rest.split('/').next().unwrap_or(rest);
            return Err(format!(
                "{rule:?}: a rule is HOST[:PORTS] or CIDR[:PORTS], without {scheme}:// or a path, e.g. {bare:?}"
            ));
        }
        let (dest, ports) = split_ports(rule)?;
        let destination = parse_destination(&dest).map_err(|e| format!("{rule:?}: {e}"))?;
        let ports = match ports {
            None => Ports::Web,
            Some(list) => Ports::List(parse_ports(list).map_err(|e| format!("{rule:?}: {e}"))?),
        };
        Ok(Upstream { destination, ports })
    }

    /// Whether this rule names `host` (a name; IP literals only match `Net` rules) and `port`.
    pub fn matches_name(&self, host: &str, port: u16) -> bool {
        self.ports.allows(port)
            && match &self.destination {
                Destination::Host(h) => h == host,
                Destination::Wildcard(suffix) => {
                    host.len() > suffix.len() && host.ends_with(suffix.as_str())
                }
                Destination::Net(_) => false,
            }
    }

    /// Whether this rule lets a connection go to `addr` on `port`, having matched the host.
    pub fn allows_addr(&self, addr: IpAddr, port: u16) -> bool {
        self.ports.allows(port)
            && match &self.destination {
                // Only the v4-mapped form is the IPv4 address itself (a connection to it reaches
                // that address). 6to4, NAT64 and v4-compatible addresses are IPv6 destinations
                // routed elsewhere: an IPv4 rule does not allow them.
                Destination::Net(net) => net.contains(&addr) || net.contains(&addr.to_canonical()),
                _ => special_purpose(addr).is_none(),
            }
    }
}

fn split_ports(rule: &str) -> Result<(Cow<'_, str>, Option<&str>), String> {
    if let Some(rest) = rule.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{rule:?}: missing ']'"))?;
        // `[ADDR]/LEN:PORTS` is the same rule as `[ADDR/LEN]:PORTS`.
        if let Some(rest) = after.strip_prefix('/').filter(|_| !inside.contains('/')) {
            return Ok(match rest.split_once(':') {
                Some((len, ports)) => (Cow::Owned(format!("{inside}/{len}")), Some(ports)),
                None => (Cow::Owned(format!("{inside}/{rest}")), None),
            });
        }
        return match after {
            "" => Ok((Cow::Borrowed(inside), None)),
            p => p
                .strip_prefix(':')
                .map(|p| (Cow::Borrowed(inside), Some(p)))
                .ok_or_else(|| format!("{rule:?}: expected ':PORTS' after ']'")),
        };
    }
    // An unbracketed IPv6 CIDR has colons of its own: then there are no ports.
    if rule.matches(':').count() > 1 {
        return Ok((Cow::Borrowed(rule), None));
    }
    Ok(match rule.split_once(':') {
        Some((d, p)) => (Cow::Borrowed(d), Some(p)),
        None => (Cow::Borrowed(rule), None),
    })
}

fn parse_ports(list: &str) -> Result<BTreeSet<u16>, String> {
    list.split(',')
        .map(|p| match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
            Ok(n) => Ok(n),
        })
        .collect()
}

fn parse_destination(dest: &str) -> Result<Destination, String> {
    if dest.contains('/') {
        let net: IpNet = dest
            .parse()
            .map_err(|_| format!("{dest:?} is not a CIDR"))?;
        return Ok(Destination::Net(crate::config::network(net, dest)?));
    }
    if let Some(ip) = parse_ip_literal(dest) {
        return Ok(Destination::Net(IpNet::from(ip)));
    }
    let host = dest.trim_end_matches('.').to_ascii_lowercase();
    if let Some(suffix) = host.strip_prefix("*.") {
        check_hostname(suffix)?;
        return Ok(Destination::Wildcard(format!(".{suffix}")));
    }
    check_hostname(&host)?;
    Ok(Destination::Host(host))
}

fn check_hostname(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{host:?} is not a host name or CIDR"))
    }
}

/// Reads an IP address in any spelling a resolver would accept: dotted quad, IPv6, and the
/// `inet_aton` forms (`2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1`) that tools happily
/// resolve to loopback.
pub fn parse_ip_literal(host: &str) -> Option<IpAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip);
    }
    parse_inet_aton(host).map(IpAddr::V4)
}

fn parse_inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<u64> = s.split('.').map(parse_c_number).collect::<Option<_>>()?;
    let value = match parts.as_slice() {
        [a] => *a,
        [a, b] if *a < 256 && *b < (1 << 24) => (a << 24) | b,
        [a, b, c] if *a < 256 && *b < 256 && *c < (1 << 16) => (a << 24) | (b << 16) | c,
        [a, b, c, d] if [a, b, c, d].iter().all(|x| **x < 256) => {
            (a << 24) | (b << 16) | (c << 8) | d
        }
        _ => return None,
    };
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

fn parse_c_number(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    if s.len() > 1 && s.starts_with('0') {
        return u64::from_str_radix(&s[1..], 8).ok();
    }
    s.parse().ok()
}

/// The IPv4 address an IPv6 address stands for (v4-mapped, v4-compatible, NAT64, 6to4), or the
/// address itself: what decides whether it is special-purpose.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // ::ffff:a.b.c.d (v4-mapped) and ::a.b.c.d (v4-compatible, deprecated), but not :: or ::1.
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low),
        [0, 0, 0, 0, 0, 0, hi, _] if hi != 0 => Some(low),
        // 64:ff9b::/96, the NAT64 well-known prefix.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        // 2002:AABB:CCDD::/48, 6to4.
        [0x2002, a, b, ..] => Some(Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        )),
        _ => None,
    }
}

/// Why an address is special-purpose, if it is.
pub fn special_purpose(addr: IpAddr) -> Option<&'static str> {
    match canonical(addr) {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let nets: [(&str, &str); 12] = [
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("255.255.255.255/32", "broadcast"),
    ];
    nets.iter().find_map(|(net, why)| {
        let net: Ipv4Net = net.parse().ok()?;
        net.contains(&ip).then_some(*why)
    })
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let nets: [(&str, &str); 6] = [
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
        ("fec0::/10", "site-local"),
    ];
    nets.iter().find_map(|(net, why)| {
        let net: Ipv6Net = net.parse().ok()?;
        net.contains(&ip).then_some(*why)
    })
}

/// Client allowlist: CIDRs the proxy accepts connections from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clients {
    nets: Vec<IpNet>,
}

impl Clients {
    /// Allows `nets`.
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self { nets }
    }

    /// Loopback only: the default.
    pub fn loopback() -> Self {
        Self::new(vec![
            IpNet::from(IpAddr::V4(Ipv4Addr::LOCALHOST)).supernet_or_self(8),
            IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ])
    }

    /// Whether `peer` may use the proxy (v4-mapped peers are checked as IPv4).
    pub fn allows(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
            v4 => v4,
        };
        self.nets.iter().any(|n| n.contains(&peer))
    }
}

trait SupernetOrSelf {
    fn supernet_or_self(self, prefix: u8) -> IpNet;
}

impl SupernetOrSelf for IpNet {
    fn supernet_or_self(self, prefix: u8) -> IpNet {
        IpNet::new(self.addr(), prefix)
            .map(|n| n.trunc())
            .unwrap_or(self)
    }
}

/// Boxed future of a name resolution.
pub type ResolveFuture = Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>;

/// Resolves host names. The proxy's own resolver is the system's; tests supply their own.
pub trait Resolve: Send + Sync + 'static {
    /// All addresses of `host`.
    fn resolve(&self, host: &str) -> ResolveFuture;
}

/// The system resolver (getaddrinfo through tokio).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str) -> ResolveFuture {
        let host = host.to_owned();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a: SocketAddr| a.ip()).collect())
        })
    }
}

/// A shared resolver.
pub type SharedResolver = Arc<dyn Resolve>;

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse_in_every_documented_form() {
        let r = Upstream::parse("collector.example.com:443").unwrap();
        assert_eq!(
            r.destination,
            Destination::Host("collector.example.com".into())
        );
        assert!(
            r.matches_name("collector.example.com", 443)
                && !r.matches_name("collector.example.com", 80)
        );
        let r = Upstream::parse("*.example.com").unwrap();
        assert!(r.matches_name("a.example.com", 443) && r.matches_name("a.b.example.com", 80));
        assert!(!r.matches_name("example.com", 443) && !r.matches_name("badexample.com", 443));
        assert!(
            !r.matches_name("a.example.com", 8080),
            "default ports are 80 and 443"
        );
        let r = Upstream::parse("203.0.113.0/24:80,443").unwrap();
        assert!(r.allows_addr(ip("203.0.113.9"), 80) && !r.allows_addr(ip("203.0.114.9"), 80));
        let r = Upstream::parse("127.0.0.1/32:8080").unwrap();
        assert!(
            r.allows_addr(ip("127.0.0.1"), 8080),
            "a CIDR rule may name loopback"
        );
        assert!(
            r.allows_addr(ip("::ffff:127.0.0.1"), 8080),
            "whatever the spelling"
        );
        for embedding in ["2002:7f00:1:abcd::99", "64:ff9b::7f00:1", "::7f00:1"] {
            assert!(
                !r.allows_addr(ip(embedding), 8080),
                "{embedding} is an IPv6 destination, not 127.0.0.1"
            );
        }
        let r = Upstream::parse("[2002::/16]:443").unwrap();
        assert!(r.allows_addr(ip("2002:7f00:1::"), 443), "named by CIDR");
        let r = Upstream::parse("[2001:db8::/32]:443").unwrap();
        assert!(r.allows_addr(ip("2001:db8::5"), 443));
        // The length may also follow the brackets: the same rules.
        for (outside, inside) in [
            ("[::1]/128:8080", "[::1/128]:8080"),
            ("[2001:db8::]/32:443,8443", "[2001:db8::/32]:443,8443"),
            ("[2001:db8::]/32", "[2001:db8::/32]"),
        ] {
            assert_eq!(
                Upstream::parse(outside),
                Upstream::parse(inside),
                "{outside}"
            );
        }
        let r = Upstream::parse("203.0.113.5:443").unwrap();
        assert_eq!(
            r.destination,
            Destination::Net("203.0.113.5/32".parse().unwrap())
        );
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (rule, needle) in [
            ("", "empty"),
            ("host:0", "not a port"),
            ("host:http", "not a port"),
            ("10.0.0.0/33", "not a CIDR"),
            ("bad host", "not a host name"),
            ("[2001:db8::/32", "missing ']'"),
            ("[::1]/129:443", "not a CIDR"),
            ("[::1/128]/64:443", "expected ':PORTS' after ']'"),
            ("[::1]/128:", "not a port"),
            (
                "10.0.0.1/8:443",
                "\"10.0.0.1/8\" has host bits set: write the network 10.0.0.0/8 or the one address 10.0.0.1/32",
            ),
            ("[2001:db8::1/32]:443", "the network 2001:db8::/32 or the one address 2001:db8::1/128"),
            (
                "http://collector.example.com:443/x",
                "without http:// or a path, e.g. \"collector.example.com:443\"",
            ),
        ] {
            let err = Upstream::parse(rule).unwrap_err();
            assert!(err.contains(needle), "{rule:?}: {err}");
        }
    }

    #[test]
    fn special_purpose_addresses_in_every_spelling() {
        for addr in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(special_purpose(ip(addr)).is_some(), "{addr}");
        }
        for spelling in [
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
            "127.1",
            "0x7f.1",
            "017700000001",
        ] {
            let parsed = parse_ip_literal(spelling).unwrap_or_else(|| panic!("{spelling}"));
            assert_eq!(parsed, ip("127.0.0.1"), "{spelling}");
        }
        assert_eq!(parse_ip_literal("2852039166"), Some(ip("169.254.169.254")));
        for public in ["8.8.8.8", "203.0.113.5", "2001:db8::1", "2606:4700::1111"] {
            assert!(special_purpose(ip(public)).is_none(), "{public}");
        }
        assert!(parse_ip_literal("example.com").is_none());
        assert!(parse_ip_literal("1.2.3.4.5").is_none());
    }

    #[test]
    fn clients_default_to_loopback_and_match_v4_mapped_peers() {
        let c = Clients::loopback();
        assert!(c.allows(ip("127.0.0.1")) && c.allows(ip("127.5.5.5")) && c.allows(ip("::1")));
        assert!(c.allows(ip("::ffff:127.0.0.1")));
        assert!(!c.allows(ip("10.0.0.1")));
        let c = Clients::new(vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(c.allows(ip("::ffff:10.1.1.1")) && !c.allows(ip("127.0.0.1")));
    }
}
