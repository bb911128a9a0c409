//! `NO_PROXY`: which gateway addresses the agent dials directly although `HTTPS_PROXY` is set,
//! read the way curl and Go's `net/http/httpproxy` read it.

use std::net::IpAddr;

/// Whether the `NO_PROXY` value `no_proxy` exempts `host`:`port` from the proxy.
///
/// Entries are comma-separated: `*` exempts everything; a host name exempts itself and its
/// subdomains (a leading `.` or `*.` changes nothing); an IP address, or a CIDR block, exempts a
/// host written as an IP address in it (names are not resolved). A host name or IP address may
/// carry a `:port`, `[...]` around an IPv6 address; the entry then applies to that port only.
pub fn exempts(no_proxy: &str, host: &str, port: u16) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let ip = host.parse::<IpAddr>().ok();
    no_proxy
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .any(|entry| entry_exempts(entry, &host, ip, port))
}

fn entry_exempts(entry: &str, host: &str, ip: Option<IpAddr>, port: u16) -> bool {
    if entry == "*" {
        return true;
    }
    if let Ok(net) = entry.parse::<ipnet::IpNet>() {
        return ip.is_some_and(|ip| net.contains(&ip));
    }
    let Some((name, entry_port)) = split_port(entry) else {
        return false;
    };
    if entry_port.is_some_and(|p| p != port) {
        return false;
    }
    if let Ok(entry_ip) = name.parse::<IpAddr>() {
        return ip == Some(entry_ip);
    }
    let name = name
        .trim_start_matches('*')
        .trim_start_matches('.')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    !name.is_empty()
        && ip.is_none()
        && (host == name
            || host
                .strip_suffix(name.as_str())
                .is_some_and(|sub| sub.ends_with('.')))
}

/// `host[:port]` or `[v6][:port]` → the host and the port if written; `None` if the port is not
/// a port.
fn split_port(entry: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = entry.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?.parse().ok()?))),
        };
    }
    // A bare IPv6 address has colons but no port.
    if entry.parse::<IpAddr>().is_ok() {
        return Some((entry, None));
    }
    match entry.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((entry, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_themselves_and_their_subdomains() {
        for no_proxy in [
            "example.com",
            ".example.com",
            "*.example.com",
            "EXAMPLE.com.",
        ] {
            assert!(exempts(no_proxy, "example.com", 7443), "{no_proxy}");
            assert!(exempts(no_proxy, "gw.Example.com", 7443), "{no_proxy}");
            assert!(!exempts(no_proxy, "notexample.com", 7443), "{no_proxy}");
            assert!(!exempts(no_proxy, "example.com.evil", 7443), "{no_proxy}");
        }
        assert!(exempts("other.org, gw.example.com", "gw.example.com", 7443));
        assert!(!exempts("gw.example.com", "example.com", 7443));
        assert!(exempts("*", "anything", 1));
        assert!(!exempts("", "gw.example.com", 7443));
        assert!(!exempts(" , ", "gw.example.com", 7443));
    }

    #[test]
    fn a_port_limits_the_entry_to_it() {
        assert!(exempts("gw.example.com:7443", "gw.example.com", 7443));
        assert!(!exempts("gw.example.com:443", "gw.example.com", 7443));
        assert!(exempts("10.1.2.3:7443", "10.1.2.3", 7443));
        assert!(!exempts("10.1.2.3:443", "10.1.2.3", 7443));
        assert!(exempts("[::1]:7443", "[::1]", 7443));
        assert!(!exempts("[::1]:443", "::1", 7443));
        assert!(!exempts("gw.example.com:port", "gw.example.com", 7443));
    }

    #[test]
    fn addresses_and_blocks_match_an_address_only() {
        assert!(exempts("10.1.2.3", "10.1.2.3", 7443));
        assert!(exempts("10.0.0.0/8", "10.1.2.3", 7443));
        assert!(!exempts("10.0.0.0/8", "11.1.2.3", 7443));
        assert!(exempts("::1", "[::1]", 7443));
        assert!(exempts("fd00::/8", "fd12::5", 7443));
        // Names are not resolved.
        assert!(!exempts("10.0.0.0/8", "gw.internal", 7443));
        assert!(!exempts("10.1.2.3", "gw.internal", 7443));
        assert!(!exempts("gw.internal", "10.1.2.3", 7443));
    }
}
