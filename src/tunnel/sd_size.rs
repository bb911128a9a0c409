//! How many bytes an agent's target list takes in the gateway's service discovery, counted
//! without building it: `/targets` repeats the agent's labels in every target's group, so a list
//! within [`super::MAX_TARGET_LIST_BYTES`] can still expand a thousandfold. Both ends count it,
//! the agent to refuse such a list in its configuration, the gateway to refuse it from an agent
//! that does not.

use std::collections::BTreeMap;

use super::{label_name_problem, TargetList, MAX_SD_BYTES_PER_AGENT};

/// The length of the http_sd JSON array of `list`'s groups as the gateway publishes them for
/// agent `agent_id`: exactly what `serde_json` writes, agent labels overridden by target labels,
/// labels that may not be published left out, ferry's own three labels added.
pub(crate) fn sd_size(agent_id: &str, list: &TargetList) -> usize {
    let agent_labels: BTreeMap<&str, usize> = list
        .labels
        .iter()
        .filter(|(k, _)| publishable(k))
        .map(|(k, v)| (k.as_str(), entry_len(k, v)))
        .collect();
    let agent_total: usize = agent_labels.values().sum();
    // Inside the quotes of `"<id>:<port>"`.
    let id = json_str_len(agent_id) - 2;
    let ferry_agent = entry_len("ferry_agent", agent_id);
    let groups = list.targets.iter().map(|t| {
        let mut labels = agent_total;
        for (k, v) in t.labels.iter().filter(|(k, _)| publishable(k)) {
            labels = labels - agent_labels.get(k.as_str()).copied().unwrap_or(0) + entry_len(k, v);
        }
        let fixed = entry_len("__metrics_path__", &t.path)
            + entry_len("ferry_target", &t.name)
            + ferry_agent;
        // `{"targets":["` id `:` port `"],"labels":{` labels `}}`, the last label without its comma.
        GROUP_FRAME + id + 1 + decimal_digits(t.port) + labels + fixed - 1
    });
    // `[` groups, one comma apart `]`.
    let with_commas = groups.fold(0usize, |sum, g| sum.saturating_add(g + 1));
    with_commas.saturating_add(2) - usize::from(!list.targets.is_empty())
}

/// Why the gateway would not publish `list` for agent `agent_id`, if it would not: its service
/// discovery groups take more than [`MAX_SD_BYTES_PER_AGENT`].
pub(crate) fn sd_size_problem(agent_id: &str, list: &TargetList) -> Option<String> {
    let size = sd_size(agent_id, list);
    (size > MAX_SD_BYTES_PER_AGENT).then(|| {
        format!(
            "the targets and labels take {} KiB in the gateway's service discovery (every target's group repeats the agent's labels), more than it publishes for one agent ({} KiB): shorten the label values, or spread the targets over more agents",
            size.div_ceil(1024),
            MAX_SD_BYTES_PER_AGENT / 1024
        )
    })
}

/// `{"targets":["` and `"],"labels":{` and `}}`.
const GROUP_FRAME: usize = 13 + 13 + 2;

/// Whether the gateway publishes a label called `name` (it leaves out the others).
fn publishable(name: &str) -> bool {
    label_name_problem(name).is_none()
}

/// `"k":"v",` as JSON.
fn entry_len(k: &str, v: &str) -> usize {
    json_str_len(k) + 1 + json_str_len(v) + 1
}

/// The length of `s` as a JSON string, quotes included, escaped as `serde_json` escapes it:
/// `"` and `\` and the control characters with a short escape take two bytes, the other control
/// characters six (`\u001f`), everything else (non-ASCII and DEL too) as it is.
fn json_str_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x0c | b'\n' | b'\r' | b'\t' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

fn decimal_digits(port: u16) -> usize {
    port.checked_ilog10().map_or(1, |d| d as usize + 1)
}
