//! The target list an agent publishes, as the gateway accepts it: only targets it can route and
//! Prometheus can scrape reach the registry, `/targets` and the status page. An agent's own
//! configuration checks its list; this is for one that does not (a modified or hostile agent).

use tracing::warn;

use crate::tunnel::{reserved_target_name, valid_target_name, TargetInfo, TargetList};

/// `list` without the targets the gateway cannot route, each dropped one logged with what is
/// wrong with it.
pub(crate) fn routable(mut list: TargetList, agent: &str) -> TargetList {
    list.targets.retain(|t| match problem(t) {
        None => true,
        Some(problem) => {
            warn!(agent, scrape_target = ?t.name, %problem, "dropped a target the agent published");
            false
        }
    });
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
    if !is_metrics_path(&t.path) {
        // The agent publishes its URL's path; fixed query parameters stay in the agent.
        return Some(format!(
            "path {:?} is not an absolute path without query or fragment",
            t.path
        ));
    }
    None
}

/// Whether `path` is what a request URI's path can be: `/`-rooted, no query or fragment.
fn is_metrics_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains(['?', '#'])
        && http::uri::PathAndQuery::try_from(path).is_ok_and(|p| p.path() == path)
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
                target("query", 9104, "nopath?x=1#y"),
                target("query2", 9105, "/metrics?x=1"),
                target("fragment", 9106, "/metrics#y"),
                target("space", 9107, "/me trics"),
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
        assert_eq!(kept, ["node", "app.v2_x-1", "ferry"]);
    }

    #[test]
    fn each_problem_says_what_is_wrong() {
        assert!(problem(&target("", 1, "/m")).unwrap().contains("name \"\""));
        assert!(problem(&target("x", 0, "/m")).unwrap().contains("port 0"));
        assert!(problem(&target("x", 1, "m?q"))
            .unwrap()
            .contains("path \"m?q\""));
        assert_eq!(problem(&target("x", 65535, "/m")), None);
    }
}
