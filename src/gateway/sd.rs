//! Service discovery for Prometheus: http_sd / file_sd JSON, one group per target of each
//! connected agent (and each disconnected one still kept: [`super::departed`]), addressed
//! `<agent-id>:<port>` with the target's metrics path.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use futures_util::StreamExt as _;
use http_body::Frame;
use http_body_util::StreamBody;
use serde::Serialize;

use crate::http_util::{boxed, Body};
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

/// `/targets`: the JSON array of the groups of all `agents` (id, targets), written an agent at a
/// time as the client takes it, gzip-compressed when `gzip`. Only one agent's groups are in
/// memory at once (at most [`crate::tunnel::MAX_SD_BYTES_PER_AGENT`]), whatever the number of
/// agents or of clients asking, and no poll of the body builds more than that.
pub(crate) fn body(agents: Vec<(String, Arc<TargetList>)>, gzip: bool) -> Body {
    let mut out = match gzip {
        true => Out::Gzip(GzEncoder::new(Vec::new(), Compression::fast())),
        false => Out::Plain(Vec::new()),
    };
    out.put(b"[");
    let document = Document {
        agents: agents.into_iter(),
        out,
        any: false,
        finished: false,
    };
    let frames = futures_util::stream::iter(document)
        .map(|chunk| Ok::<_, std::convert::Infallible>(Frame::data(chunk)));
    boxed(StreamBody::new(frames))
}

/// The document as it is written: each item is what the next agents' groups added.
struct Document {
    agents: std::vec::IntoIter<(String, Arc<TargetList>)>,
    out: Out,
    /// Whether a group was written: the next one is preceded by a comma.
    any: bool,
    finished: bool,
}

impl Iterator for Document {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        // gzip may hold back what a small agent adds: the next agents follow in the same chunk.
        while !self.finished {
            match self.agents.next() {
                Some((id, list)) => self.write_agent(&id, &list),
                None => {
                    self.out.put(b"]");
                    self.out.finish();
                    self.finished = true;
                }
            }
            let chunk = self.out.take();
            if !chunk.is_empty() {
                return Some(Bytes::from(chunk));
            }
        }
        None
    }
}

impl Document {
    fn write_agent(&mut self, id: &str, list: &TargetList) {
        for group in agent_groups(id, list) {
            if self.any {
                self.out.put(b",");
            }
            self.any = true;
            // Strings into memory: serializing cannot fail.
            let _ = serde_json::to_writer(&mut self.out, &group);
        }
    }
}

/// Where the document is written: as it is, or through gzip.
enum Out {
    Plain(Vec<u8>),
    Gzip(GzEncoder<Vec<u8>>),
}

impl Out {
    fn put(&mut self, bytes: &[u8]) {
        // Into memory: writing cannot fail.
        let _ = self.write_all(bytes);
    }

    /// Ends the gzip stream (its trailer); nothing to do for plain JSON.
    fn finish(&mut self) {
        if let Out::Gzip(gz) = self {
            let _ = gz.try_finish();
        }
    }

    /// What was written (compressed) since the last call.
    fn take(&mut self) -> Vec<u8> {
        match self {
            Out::Plain(v) => std::mem::take(v),
            Out::Gzip(gz) => std::mem::take(gz.get_mut()),
        }
    }
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Out::Plain(v) => v.write(buf),
            Out::Gzip(gz) => gz.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::Plain(v) => v.flush(),
            Out::Gzip(gz) => gz.flush(),
        }
    }
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

    fn collect(body: Body) -> Vec<u8> {
        use http_body_util::BodyExt as _;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(body.collect()).unwrap().to_bytes().to_vec()
    }

    /// Lists with overridden and unpublishable labels, characters JSON escapes, no targets.
    fn lists() -> Vec<(String, Arc<TargetList>)> {
        let target = |name: &str, port, labels: &[(&str, &str)]| TargetInfo {
            name: name.into(),
            port,
            path: "/m\u{1}\"é\u{7f}".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        vec![
            ("a-1".into(), Arc::new(TargetList::default())),
            (
                "b_2.example".into(),
                Arc::new(TargetList {
                    version: 1,
                    labels: labels(&[("dc", "fra\n1\t\u{8}\u{c}\r\\"), ("__x", "y"), ("job", "j")]),
                    targets: vec![
                        target(
                            "node",
                            9100,
                            &[("dc", "short"), ("role", "db"), ("a-b", "c")],
                        ),
                        target("ferry", 9369, &[]),
                        target("x", 1, &[("ferry_agent", "evil"), ("zone", "\u{1f}")]),
                    ],
                }),
            ),
            ("c".into(), Arc::new(TargetList::default())),
            (
                "d".into(),
                Arc::new(TargetList {
                    version: 2,
                    labels: BTreeMap::new(),
                    targets: vec![target("only", 65535, &[])],
                }),
            ),
        ]
    }

    /// What both ends count before accepting a list is what the gateway then writes, byte for
    /// byte: the cap bounds the real document.
    #[test]
    fn the_counted_size_is_the_published_size() {
        for (id, list) in lists() {
            let json = serde_json::to_string(&agent_groups(&id, &list)).unwrap();
            assert_eq!(
                crate::tunnel::sd_size::sd_size(&id, &list),
                json.len(),
                "{id}: {json}"
            );
        }
    }

    /// The streamed document, plain or gzip, is the JSON array of every agent's groups in order,
    /// agents without targets adding nothing.
    #[test]
    fn the_document_streams_every_agents_groups() {
        let all = lists();
        let groups: Vec<Group> = all
            .iter()
            .flat_map(|(id, list)| agent_groups(id, list))
            .collect();
        let want = serde_json::to_string(&groups).unwrap();
        let plain = collect(body(all.clone(), false));
        assert_eq!(String::from_utf8(plain).unwrap(), want);
        let gzipped = collect(body(all, true));
        let mut unzipped = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(&gzipped[..]),
            &mut unzipped,
        )
        .unwrap();
        assert_eq!(unzipped, want);
        assert_eq!(collect(body(Vec::new(), false)), b"[]");
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
