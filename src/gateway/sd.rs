//! Service discovery for Prometheus: http_sd / file_sd JSON, one group per target of each
//! connected agent (and each disconnected one still kept: [`super::departed`]), addressed
//! `<agent-id>:<port>` with the target's metrics path.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::tunnel::TargetList;

/// One http_sd target group.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub(crate) struct Group {
    pub(crate) targets: Vec<String>,
    pub(crate) labels: BTreeMap<String, String>,
}

/// The groups of one agent's targets. Agent labels come first; target labels override them;
/// ferry's own labels override both.
pub(crate) fn agent_groups(agent_id: &str, list: &TargetList) -> Vec<Group> {
    list.targets
        .iter()
        .map(|t| {
            let mut labels: BTreeMap<String, String> = list
                .labels
                .iter()
                .chain(&t.labels)
                .filter(|(name, _)| publishable(name))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.insert("__metrics_path__".into(), t.path.clone());
            labels.insert("ferry_agent".into(), agent_id.to_owned());
            labels.insert("ferry_target".into(), t.name.clone());
            Group {
                targets: vec![format!("{agent_id}:{}", t.port)],
                labels,
            }
        })
        .collect()
}

/// Whether an agent's label may go into service discovery: a hostile agent's list is not checked
/// by its own configuration ([`crate::tunnel::label_name_problem`]).
fn publishable(name: &str) -> bool {
    crate::tunnel::label_name_problem(name).is_none()
}

/// The JSON document for all `agents` (id, targets).
pub(crate) fn document(agents: &[(String, Arc<TargetList>)]) -> String {
    let groups: Vec<Group> = agents
        .iter()
        .flat_map(|(id, targets)| agent_groups(id, targets))
        .collect();
    serde_json::to_string(&groups).unwrap_or_else(|_| "[]".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::TargetInfo;

    #[test]
    fn labels_that_steer_the_scrape_or_name_the_series_source_are_not_published() {
        let list = TargetList {
            version: 1,
            labels: BTreeMap::from([
                ("__scheme__".into(), "https".into()),
                ("__param_target".into(), "evil.example".into()),
                ("bad-name".into(), "x".into()),
                ("dc".into(), "fra1".into()),
                ("job".into(), "node-exporter".into()),
            ]),
            targets: vec![TargetInfo {
                name: "node".into(),
                port: 9100,
                path: "/metrics".into(),
                labels: BTreeMap::from([
                    ("__address__".into(), "10.0.0.1:80".into()),
                    ("ferry_agent".into(), "someone-else".into()),
                    ("ferry_target".into(), "other".into()),
                    ("job".into(), "node-exporter".into()),
                    ("instance".into(), "node-1:30440".into()),
                ]),
            }],
        };
        let json = serde_json::to_value(agent_groups("node-1", &list)).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"targets": ["node-1:9100"], "labels": {"__metrics_path__": "/metrics", "dc": "fra1", "ferry_agent": "node-1", "ferry_target": "node"}}
            ])
        );
    }

    #[test]
    fn one_group_per_target_with_ferry_labels() {
        let list = TargetList {
            version: 3,
            labels: BTreeMap::from([("dc".into(), "fra1".into()), ("env".into(), "prod".into())]),
            targets: vec![
                TargetInfo {
                    name: "node".into(),
                    port: 9100,
                    path: "/metrics".into(),
                    labels: BTreeMap::from([("env".into(), "staging".into())]),
                },
                TargetInfo {
                    name: "ferry".into(),
                    port: 9369,
                    path: "/metrics".into(),
                    labels: BTreeMap::new(),
                },
            ],
        };
        let json = serde_json::to_value(agent_groups("node-1", &list)).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"targets": ["node-1:9100"], "labels": {"__metrics_path__": "/metrics", "dc": "fra1", "env": "staging", "ferry_agent": "node-1", "ferry_target": "node"}},
                {"targets": ["node-1:9369"], "labels": {"__metrics_path__": "/metrics", "dc": "fra1", "env": "prod", "ferry_agent": "node-1", "ferry_target": "ferry"}}
            ])
        );
    }
}
