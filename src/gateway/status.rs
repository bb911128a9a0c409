//! The status page at `/`: connected agents, and the disconnected ones still in service
//! discovery, as server-rendered HTML — no scripts, no external
//! assets, refreshing itself every few seconds. `/api/v1/agents` has the same data as JSON.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{header, HeaderValue, Response};

use super::AgentInfo;
use crate::http_util::{full, Body};

/// Seconds between automatic reloads of the page.
const REFRESH_SECONDS: u32 = 5;

/// Renders the page for `agents`.
pub(crate) fn page(agents: &[AgentInfo]) -> Response<Body> {
    let mut resp = Response::new(full(render(agents, now())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn render(agents: &[AgentInfo], now: u64) -> String {
    let (connected, gone): (Vec<&AgentInfo>, Vec<&AgentInfo>) =
        agents.iter().partition(|a| a.disconnected_since.is_none());
    let mut html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>ferry gateway</title><style>{STYLE}</style></head><body>\
         <h1>ferry gateway</h1><p>{n} agent{s} connected{gone} · refreshes every {REFRESH_SECONDS} s · \
         <a href=\"/targets\">/targets</a> · <a href=\"/metrics\">/metrics</a> · \
         <a href=\"/api/v1/agents\">/api/v1/agents</a></p>",
        n = connected.len(),
        s = if connected.len() == 1 { "" } else { "s" },
        gone = if gone.is_empty() {
            String::new()
        } else {
            format!(", <span class=\"bad\">{} disconnected</span>", gone.len())
        },
    );
    if connected.is_empty() {
        html.push_str("<p class=\"empty\">No agent is connected.</p>");
    } else {
        table(&mut html, &connected, "Connected", now);
    }
    if !gone.is_empty() {
        // Listed so that an operator sees what Prometheus reports as down, and since when.
        html.push_str(
            "<h2>Disconnected</h2><p>Still listed in <a href=\"/targets\">/targets</a> \
             (so Prometheus shows them as down) until web.sd_keep_disconnected has passed.</p>",
        );
        table(&mut html, &gone, "Disconnected", now);
    }
    html.push_str("</body></html>\n");
    html
}

/// A table of agents; `since` heads the column of when they connected or disconnected.
fn table(html: &mut String, agents: &[&AgentInfo], since: &str, now: u64) {
    let _ = write!(
        html,
        "<table><thead><tr><th>Agent</th><th>Remote address</th><th>Country</th><th>{since}</th>\
         <th>Targets</th><th>Last scrape</th><th>Latency</th><th>Scrapes</th><th>Bytes</th></tr></thead><tbody>",
    );
    for a in agents {
        row(html, a, now);
    }
    html.push_str("</tbody></table>");
}

fn row(html: &mut String, a: &AgentInfo, now: u64) {
    let last = match (a.stats.last_status, a.stats.last_scrape) {
        (Some(status), Some(at)) => {
            let class = if status < 400 { "ok" } else { "bad" };
            format!(
                "<span class=\"{class}\">{status}</span> {} ago",
                ago(now.saturating_sub(at))
            )
        }
        _ => "never".into(),
    };
    let latency = a
        .stats
        .last_duration_seconds
        .map_or_else(|| "–".into(), |d| format!("{:.1} ms", d * 1000.0));
    let since = a.disconnected_since.unwrap_or(a.connected_since);
    let _ = write!(
        html,
        "<tr><td class=\"id\">{id}</td><td>{remote}</td><td>{country}</td><td>{since} ago</td><td>{targets}</td>\
         <td>{last}</td><td>{latency}</td><td>{scrapes}</td><td>{bytes}</td></tr>",
        id = escape(&a.id),
        remote = escape(&a.remote.to_string()),
        country = escape(&a.country),
        since = ago(now.saturating_sub(since)),
        targets = escape(&a.targets.join(", ")),
        scrapes = a.stats.scrapes,
        bytes = human_bytes(a.stats.bytes),
    );
}

fn ago(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=86_399 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.4em .8em;border-bottom:1px solid #ddd}\
th{background:#f4f4f4}.ok{color:#177245;font-weight:600}.bad{color:#b00020;font-weight:600}\
.id{font-family:ui-monospace,monospace}.empty{color:#777}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::registry::ScrapeStats;

    #[test]
    fn renders_agents_escaped_with_their_last_scrape() {
        let agents = [AgentInfo {
            id: "node-1".into(),
            remote: "192.0.2.7:51000".parse().unwrap(),
            country: "GB".into(),
            connected_since: 1_000,
            disconnected_since: None,
            targets: vec!["node".into(), "<ferry>".into()],
            stats: ScrapeStats {
                scrapes: 3,
                bytes: 2048,
                last_scrape: Some(1_090),
                last_status: Some(200),
                last_duration_seconds: Some(0.0042),
            },
        }];
        let html = render(&agents, 1_100);
        assert!(html.contains("<td class=\"id\">node-1</td>"), "{html}");
        assert!(html.contains("<td>GB</td>"), "{html}");
        assert!(html.contains("node, &lt;ferry&gt;") && !html.contains("<ferry>"));
        assert!(html.contains("<span class=\"ok\">200</span> 10 s ago"));
        assert!(html.contains("4.2 ms") && html.contains("2.0 KiB") && html.contains("1 min ago"));
        assert!(html.contains("http-equiv=\"refresh\"") && !html.contains("<script"));
        assert!(render(&[], 0).contains("No agent is connected"));
        assert!(!html.contains("Disconnected"), "{html}");
    }

    #[test]
    fn disconnected_agents_have_their_own_table_with_when_they_left() {
        let gone = AgentInfo {
            id: "node-2".into(),
            remote: "198.51.100.9:40000".parse().unwrap(),
            country: "FR".into(),
            connected_since: 100,
            disconnected_since: Some(3_700),
            targets: vec!["node".into()],
            stats: ScrapeStats {
                scrapes: 7,
                bytes: 10,
                last_scrape: Some(3_690),
                last_status: Some(200),
                last_duration_seconds: Some(0.001),
            },
        };
        let html = render(std::slice::from_ref(&gone), 7_300);
        assert!(
            html.contains("0 agents connected, <span class=\"bad\">1 disconnected</span>"),
            "{html}"
        );
        assert!(html.contains("No agent is connected"), "{html}");
        let table = &html[html.find("<h2>Disconnected</h2>").expect(&html)..];
        assert!(table.contains("<th>Disconnected</th>"), "{table}");
        assert!(table.contains("<td class=\"id\">node-2</td>"), "{table}");
        // Gone for an hour, not connected for two.
        assert!(table.contains("<td>1 h ago</td>"), "{table}");
    }
}
