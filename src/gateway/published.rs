//! The target list an agent publishes, as the gateway accepts it: only targets it can route and
//! Prometheus can scrape reach the registry, `/targets` and the status page. An agent's own
//! configuration checks its list; this is for one that does not (a modified or hostile agent).

use tracing::warn;

use crate::tunnel::metrics_path;
use crate::tunnel::sd_size::sd_size_problem;
use crate::tunnel::{reserved_target_name, valid_target_name, TargetInfo, TargetList};

/// How many dropped targets one warning names; the rest are counted.
const NAMED: usize = 3;

/// `list` as the gateway publishes it ([`routable`]), or why it refuses the whole list: its
/// service discovery groups would take more than [`crate::tunnel::MAX_SD_BYTES_PER_AGENT`]. One
/// agent must not make `/targets` gigabytes, repeated to every Prometheus that asks.
pub(crate) fn accepted(list: TargetList, agent: &str) -> Result<TargetList, String> {
    let mut list = routable(list, agent);
    // Kept for the tunnel's life: not the room the JSON parser grew the vector to.
    list.targets.shrink_to_fit();
    match sd_size_problem(agent, &list) {
        Some(problem) => Err(problem),
        None => Ok(list),
    }
}

/// `list` without the targets the gateway cannot route. One warning per list says how many were
/// dropped and what is wrong with the first few: a list of thousands of bad targets, sent again
/// and again, must not write a line per target.
fn routable(mut list: TargetList, agent: &str) -> TargetList {
    let mut dropped = 0usize;
    let mut named = Vec::new();
    list.targets.retain(|t| match problem(t) {
        None => true,
        Some(problem) => {
            dropped += 1;
            if named.len() < NAMED {
                named.push(format!("{:?}: {problem}", t.name));
            }
            false
        }
    });
    if dropped > 0 {
        let problems = named.join("; ");
        warn!(agent, dropped, %problems, "dropped targets the agent published that the gateway cannot route");
    }
    list
}

/// What is wrong with `t`, if anything: the name, port and path rules the agent's own
/// configuration enforces.
fn problem(t: &TargetInfo) -> Option<String> {
    if !valid_target_name(&t.name) {
        return Some(format!(
            "name {:?} is not non-empty letters, digits, '-', '_' or '.'",
            t.name
        ));
    }
    if let Some(reason) = reserved_target_name(&t.name) {
        return Some(reason);
    }
    if t.port == 0 {
        return Some("port 0 is not a port (1-65535)".into());
    }
    // The agent publishes its URL's path decoded, as `__metrics_path__` holds it (a `?` in it
    // is part of the path, which Prometheus encodes); fixed query parameters stay in the agent.
    if !t.path.starts_with('/') {
        return Some(format!("path {:?} does not start with /", t.path));
    }
    if let Err(problem) = metrics_path::check_decoded(&t.path) {
        return Some(format!("path {:?} {problem}", t.path));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn target(name: &str, port: u16, path: &str) -> TargetInfo {
        TargetInfo {
            name: name.into(),
            port,
            path: path.into(),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn unroutable_targets_are_dropped_and_the_rest_kept() {
        let list = TargetList {
            version: 2,
            labels: BTreeMap::new(),
            targets: vec![
                target("node", 9100, "/metrics"),
                target("evil", 0, "/metrics"),
                target("", 9101, "/metrics"),
                target("a b", 9102, "/metrics"),
                target("nopath", 9103, ""),
                target("relative", 9104, "nopath?x=1#y"),
                target("newline", 9105, "/metrics\nx"),
                target("nul", 9106, "/metrics\0"),
                target("space", 9107, "/me trics"),
                target("q", 9109, "/what?/café!"),
                target("app.v2_x-1", 8080, "/app/metrics"),
                target("ferry", 9369, "/metrics"),
                target("unknown", 9108, "/metrics"),
            ],
        };
        let kept: Vec<String> = routable(list, "node-1")
            .targets
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(kept, ["node", "space", "q", "app.v2_x-1", "ferry"]);
    }

    /// A list within the size the gateway reads, whose agent labels repeated in every target's
    /// group would make megabytes of `/targets`, is refused whole, with a reason naming the
    /// limit; the same labels on fewer targets pass.
    #[test]
    fn a_list_expanding_past_the_service_discovery_limit_is_refused() {
        let list = |targets: u16| TargetList {
            version: 1,
            labels: BTreeMap::from([("note".into(), "x".repeat(10_000))]),
            targets: (1..=targets)
                .map(|port| target(&format!("t{port}"), port, "/metrics"))
                .collect(),
        };
        assert!(serde_json::to_vec(&list(300)).unwrap().len() < 64 << 10);
        let reason = accepted(list(300), "node-1").unwrap_err();
        assert!(
            reason.contains("2048 KiB") && reason.contains("service discovery"),
            "{reason}"
        );
        assert!(!reason.contains('\n'), "{reason}");
        assert_eq!(accepted(list(100), "node-1").unwrap().targets.len(), 100);
    }

    #[test]
    fn each_problem_says_what_is_wrong() {
        assert!(problem(&target("", 1, "/m")).unwrap().contains("name \"\""));
        assert!(problem(&target("x", 0, "/m")).unwrap().contains("port 0"));
        assert!(problem(&target("x", 1, "m?q"))
            .unwrap()
            .contains("path \"m?q\" does not start with /"));
        assert!(problem(&target("x", 1, "/a\tb"))
            .unwrap()
            .contains("path \"/a\\tb\" has a control character once decoded"));
        assert_eq!(problem(&target("x", 65535, "/m")), None);
    }
}
