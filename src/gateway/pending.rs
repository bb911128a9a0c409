//! A bound on tunnel connections that have not authenticated yet.
//!
//! Anyone who can reach the tunnel port can open connections, and each one holds a socket, TLS
//! state and buffers (about 14 KB) until it authenticates or its handshake timeout ends it. The
//! timeout bounds how long; this bounds how many: a flood of half-open handshakes costs the
//! gateway a fixed amount of memory and descriptors, and one source (one IPv4 address, one IPv6
//! /64) cannot take every slot from the agents.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Slots for connections between accept and the end of their upgrade handshake.
pub(crate) struct PendingHandshakes {
    max_total: usize,
    max_per_ip: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_source: HashMap<Source, usize>,
}

/// What one source is: an IPv4 address, or the /64 of an IPv6 address (one host's usual share).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4.into()),
            IpAddr::V6(v6) => Source::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    /// `max_pending_handshakes` connections are in their handshake.
    Total(usize),
    /// This address (IPv6: this /64) has `max_pending_handshakes_per_ip` of them.
    PerIp(usize),
}

impl PendingHandshakes {
    pub(crate) fn new(max_total: u32, max_per_ip: u32) -> Arc<Self> {
        Arc::new(PendingHandshakes {
            max_total: max_total as usize,
            max_per_ip: max_per_ip as usize,
            held: Mutex::default(),
        })
    }

    /// A slot for a connection from `ip`, given back when the returned guard is dropped.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<PendingSlot, Busy> {
        let source = Source::from(ip);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.total >= self.max_total {
            return Err(Busy::Total(self.max_total));
        }
        let of_source = held.by_source.entry(source).or_insert(0);
        if *of_source >= self.max_per_ip {
            return Err(Busy::PerIp(self.max_per_ip));
        }
        *of_source += 1;
        held.total += 1;
        Ok(PendingSlot {
            pending: self.clone(),
            source,
        })
    }

    fn release(&self, source: Source) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                held.by_source.remove(&source);
            }
        }
    }
}

/// One connection's slot, held until its handshake ends either way.
pub(crate) struct PendingSlot {
    pending: Arc<PendingHandshakes>,
    source: Source,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.pending.release(self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_is_limited_before_the_total() {
        let pending = PendingHandshakes::new(3, 2);
        let a1 = pending.admit(ip("192.0.2.1")).unwrap();
        let _a2 = pending.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(pending.admit(ip("192.0.2.1")).err(), Some(Busy::PerIp(2)));
        let _b1 = pending.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(pending.admit(ip("192.0.2.3")).err(), Some(Busy::Total(3)));
        drop(a1);
        let _a3 = pending.admit(ip("192.0.2.1")).unwrap();
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64_and_mapped_ipv4_is_ipv4() {
        let pending = PendingHandshakes::new(10, 1);
        let _a = pending.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(pending.admit(ip("2001:db8:1:2:ffff::9")).is_err());
        let _b = pending.admit(ip("2001:db8:1:3::1")).unwrap();
        let _c = pending.admit(ip("192.0.2.7")).unwrap();
        assert!(pending.admit(ip("::ffff:192.0.2.7")).is_err());
    }

    #[test]
    fn released_slots_leave_no_entry_behind() {
        let pending = PendingHandshakes::new(10, 10);
        let slots: Vec<_> = (1..=5)
            .map(|i| pending.admit(ip(&format!("198.51.100.{i}"))).unwrap())
            .collect();
        drop(slots);
        let held = pending.held.lock().unwrap();
        assert_eq!(held.total, 0);
        assert!(held.by_source.is_empty());
    }
}
