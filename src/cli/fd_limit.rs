//! The open-file limit of a long-running role: the soft limit (often 1024, or less in a
//! container) raised to the hard one at start, as Go programs do since Go 1.19, so that the
//! connection caps of the configuration, not the soft limit, bound the connections served.

use tracing::{debug, warn};

use crate::config::RunConfig;

/// Descriptors kept for what is not a client connection: listeners, log and data files, the
/// geo database, the runtime's own, connections to targets and upstreams.
const RESERVED: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, logs the result at debug level, and warns
/// once if even the hard limit is below `needed` (see [`needed`]).
pub(crate) fn raise(needed: u64) {
    let Some(limit) = raise_to_hard() else {
        return;
    };
    if limit < needed {
        warn!(
            limit,
            needed,
            "the open-file limit (RLIMIT_NOFILE, hard) is below what the configured connection caps can hold open: past it, new connections fail at accept (EMFILE) instead of being refused at the cap; raise it (systemd: LimitNOFILE=, docker: --ulimit nofile=) or lower the caps"
        );
    }
}

/// Descriptors the connection caps of `config` may hold at once, plus [`RESERVED`].
pub(crate) fn needed(config: &RunConfig) -> u64 {
    let mut needed = RESERVED;
    if let Some(gw) = &config.gateway {
        needed += gateway(gw.web_max_connections, gw.max_pending_handshakes.0);
    }
    let local_listener = config
        .agent
        .as_ref()
        .is_some_and(|a| a.web_listen.is_some());
    if local_listener || config.exporter.is_some() {
        needed += crate::server::MAX_CONNECTIONS as u64;
    }
    needed
}

/// What `ferry quickstart` may hold: a gateway with the default caps, and the demo target.
pub(crate) fn quickstart_needed() -> u64 {
    let d = crate::config::GatewaySection::default();
    RESERVED
        + gateway(d.web.max_connections, d.tunnel.max_pending_handshakes)
        + crate::server::MAX_CONNECTIONS as u64
}

/// What a gateway's caps may hold: its web connections and the tunnel handshakes pending (the
/// tunnels themselves have no cap: one per agent).
fn gateway(web_max_connections: usize, max_pending_handshakes: u32) -> u64 {
    web_max_connections as u64 + u64::from(max_pending_handshakes)
}

/// The soft limit after raising it to the hard one; `None` if it cannot be read or has no bound.
fn raise_to_hard() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    // No bound at all (not on Linux, whose hard limit is at most `fs.nr_open`): nothing to do.
    let (current, maximum) = (current?, maximum?);
    if current >= maximum {
        debug!(limit = current, "open-file limit already at the hard limit");
        return Some(current);
    }
    let raised = Rlimit {
        current: Some(maximum),
        maximum: Some(maximum),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            debug!(
                before = current,
                limit = maximum,
                "open-file limit raised to the hard limit"
            );
            Some(maximum)
        }
        Err(e) => {
            debug!(error = %e, limit = current, "cannot raise the open-file limit");
            Some(current)
        }
    }
}
