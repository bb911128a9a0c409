//! The host's TCP sockets from `/proc/net/tcp` and `/proc/net/tcp6`, the fallback when netlink
//! is not available.
//!
//! Each line after the header is `sl local_address rem_address st …`: addresses are hex, `ADDR:PORT`,
//! the port in big-endian digits, the address as 32-bit words each printed in the host's byte order
//! (one word for IPv4, four for IPv6), the state a hex kernel state number.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Socket, TcpState};

/// A line of the table that is not in the kernel's format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number in the text.
    pub line: usize,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Reads `/proc/net/tcp` and `/proc/net/tcp6` (the latter may be absent without IPv6).
pub fn read() -> io::Result<Vec<Socket>> {
    let mut sockets = read_table("/proc/net/tcp")?;
    match read_table("/proc/net/tcp6") {
        Ok(v6) => sockets.extend(v6),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(sockets)
}

fn read_table(path: &str) -> io::Result<Vec<Socket>> {
    let text = std::fs::read_to_string(path)?;
    parse(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))
}

/// Parses the text of `/proc/net/tcp` or `/proc/net/tcp6` as written by this machine's kernel
/// (addresses in this machine's byte order). Lines with a state ferry does not know are skipped.
pub fn parse(text: &str) -> Result<Vec<Socket>, ParseError> {
    let mut sockets = Vec::new();
    // The kernel writes the table a page at a time; a socket opened or closed meanwhile can shift
    // the rest, so a line may come twice. A socket is its inode (0 for TIME_WAIT, whose
    // addresses are unique instead).
    let mut seen = std::collections::HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let err = |reason| ParseError {
            line: index + 1,
            reason,
        };
        let mut fields = line.split_whitespace();
        let Some(slot) = fields.next() else {
            continue; // blank line
        };
        if slot == "sl" {
            continue; // header
        }
        let (Some(local), Some(remote), Some(state)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(err("fewer than four fields"));
        };
        let local = parse_endpoint(local).ok_or(err("bad local address"))?;
        let remote = parse_endpoint(remote).ok_or(err("bad remote address"))?;
        let state = u8::from_str_radix(state, 16).map_err(|_| err("bad state"))?;
        let inode = fields
            .nth(5)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
        let key = if inode != 0 {
            (inode, None)
        } else {
            (0, Some((local, remote)))
        };
        if !seen.insert(key) {
            continue;
        }
        if let Some(state) = TcpState::from_kernel(state) {
            sockets.push(Socket::new(state, local, remote));
        }
    }
    Ok(sockets)
}

/// `0100007F:1F90` → 127.0.0.1:8080 (on a little-endian host).
fn parse_endpoint(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The four address bytes of one hex word printed in host byte order.
fn word(hex: &str) -> Option<[u8; 4]> {
    Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_endian = "little")]
    #[test]
    fn a_socket_listed_twice_counts_once() {
        let line = |inode: &str| {
            format!("   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 {inode} 1 0000000000000000 20 4 30 10 -1\n")
        };
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let text = format!("{header}{}{}{}", line("4242"), line("4242"), line("4243"));
        assert_eq!(parse(&text).unwrap().len(), 2);
        // TIME_WAIT sockets have no inode: their addresses tell them apart.
        let tw = "   2: 0100007F:1F90 0100007F:D432 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000\n";
        let text = format!("{header}{tw}{tw}");
        assert_eq!(parse(&text).unwrap().len(), 1);
    }

    #[test]
    fn endpoint_v4_and_v6() {
        assert_eq!(
            parse_endpoint("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_endpoint("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(parse_endpoint("0100007F"), None);
        assert_eq!(parse_endpoint("0100007:0050"), None);
        assert_eq!(parse_endpoint("0100007G:0050"), None);
    }
}
