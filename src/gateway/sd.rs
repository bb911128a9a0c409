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

/// The groups of one agent's targets, as [`body`] writes them.
#[cfg(test)]
fn agent_groups(agent_id: &str, list: &TargetList) -> Vec<Group> {
    list.targets
        .iter()
        .map(|t| target_group(agent_id, list, t))
        .collect()
}

/// The group of target `t` of `list`, agent `agent_id`'s. Agent labels come first; target
/// labels override them; ferry's own labels override both.
fn target_group(agent_id: &str, list: &TargetList, t: &crate::tunnel::TargetInfo) -> Group {
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
}

/// Whether an agent's label may go into service discovery: a hostile agent's list is not checked
/// by its own configuration ([`crate::tunnel::label_name_problem`]).
fn publishable(name: &str) -> bool {
    crate::tunnel::label_name_problem(name).is_none()
}

/// `/targets`: the JSON array of the groups of all `agents` (id, targets), written a group at a
/// time as the client takes it, gzip-compressed when `gzip`. A request holds one group and at
/// most about [`CHUNK`] bytes of output at once, whatever the number of agents and targets: a
/// client that stops reading (the listener's write-stall timer ends it) holds no more than that.
pub(crate) fn body(agents: Vec<(String, Arc<TargetList>)>, gzip: bool) -> Body {
    let mut out = match gzip {
        true => Out::Gzip(GzEncoder::new(Vec::new(), Compression::fast())),
        false => Out::Plain(Vec::new()),
    };
    out.put(b"[");
    let document = Document {
        agents: agents.into_iter(),
        current: None,
        out,
        any: false,
        finished: false,
    };
    let frames = futures_util::stream::iter(document)
        .map(|chunk| Ok::<_, std::convert::Infallible>(Frame::data(chunk)));
    boxed(StreamBody::new(frames))
}

/// Output gathered before it is handed to the client: a few socket writes' worth.
const CHUNK: usize = 32 * 1024;

/// The document as it is written: each item is about [`CHUNK`] bytes of it.
struct Document {
    agents: std::vec::IntoIter<(String, Arc<TargetList>)>,
    /// The agent being written, and the index of its next target.
    current: Option<(String, Arc<TargetList>, usize)>,
    out: Out,
    /// Whether a group was written: the next one is preceded by a comma.
    any: bool,
    finished: bool,
}

impl Iterator for Document {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        while !self.finished {
            match self.next_group() {
                Some(group) => {
                    if self.any {
                        self.out.put(b",");
                    }
                    self.any = true;
                    // Strings into memory: serializing cannot fail.
                    let _ = serde_json::to_writer(&mut self.out, &group);
                }
                None => {
                    self.out.put(b"]");
                    self.out.finish();
                    self.finished = true;
                }
            }
            // gzip holds back what it has not compressed yet: the chunk may still be empty.
            if self.finished || self.out.pending() >= CHUNK {
                let chunk = self.out.take();
                if !chunk.is_empty() {
                    return Some(Bytes::from(chunk));
                }
            }
        }
        None
    }
}

impl Document {
    /// The group of the next target, of this agent or the next ones that have targets.
    fn next_group(&mut self) -> Option<Group> {
        loop {
            if let Some((id, list, next)) = &mut self.current {
                if let Some(target) = list.targets.get(*next) {
                    *next += 1;
                    return Some(target_group(id, list, target));
                }
            }
            let (id, list) = self.agents.next()?;
            self.current = Some((id, list, 0));
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

    /// How many bytes [`Out::take`] would return.
    fn pending(&self) -> usize {
        match self {
            Out::Plain(v) => v.len(),
            Out::Gzip(gz) => gz.get_ref().len(),
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

    /// A large document leaves in chunks of about [`CHUNK`] bytes, never an agent's whole groups
    /// at once: what a client that stops reading holds is a chunk.
    #[test]
    fn a_large_document_is_written_a_chunk_at_a_time() {
        use http_body_util::BodyExt as _;
        let list = TargetList {
            version: 1,
            labels: [("site".to_owned(), "x".repeat(1000))].into(),
            targets: (0..1000)
                .map(|i| TargetInfo {
                    name: format!("t{i}"),
                    port: 9000,
                    path: format!("/m{i}"),
                    labels: BTreeMap::new(),
                })
                .collect(),
        };
        let mut body = body(vec![("big".into(), Arc::new(list))], false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (mut frames, mut total) = (0, 0);
        while let Some(frame) = rt.block_on(body.frame()) {
            let len = frame.unwrap().into_data().unwrap().len();
            assert!(len < CHUNK + 2048, "a frame of {len} bytes");
            frames += 1;
            total += len;
        }
        assert!(total > 1_000_000, "{total}");
        assert!(
            frames > total / (CHUNK + 2048),
            "{frames} frames for {total} bytes"
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
