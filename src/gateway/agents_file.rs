//! `<data_dir>/agents.json`: the agents service discovery lists, saved so that a restarted
//! gateway still lists the disconnected ones (see [`super::departed`]).
//!
//! Written by one task of the tunnel listener, at most every [`DEBOUNCE`], after a change (an
//! agent connects, disconnects, changes its targets, expires or is revoked), and once more when
//! the gateway stops: never on a request's path, and the registry's locks are held only to copy
//! the list (a few `Arc`s per agent). A crash loses at most the changes of the last
//! [`DEBOUNCE`]. Read once at start: availability first, so a file that cannot be used is one
//! warning and the gateway starts with nothing kept.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::departed::Departed;
use super::State;
use crate::auth::TokensFile;
use crate::tunnel::TargetList;

/// The file's name in the data directory.
pub(super) const FILE_NAME: &str = "agents.json";

/// The format written; a file of another one is not read (a downgrade keeps nothing).
const VERSION: u64 = 1;

/// The shortest time between two writes: an autoscaled fleet connecting at once costs one write
/// every few seconds, not one per agent.
pub(super) const DEBOUNCE: Duration = Duration::from_secs(2);

/// One agent as the file keeps it: what service discovery lists of it and what decides whether
/// it may still be listed after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Record {
    pub(super) id: String,
    /// Its last target list, with its labels.
    #[serde(with = "shared_list")]
    pub(super) targets: Arc<TargetList>,
    /// SHA-256 of the token its last tunnel used, to check against the tokens file at start.
    #[serde(with = "hex_digest")]
    pub(super) credential: [u8; 32],
    /// Where its last tunnel came from.
    pub(super) remote: SocketAddr,
    #[serde(with = "rfc3339")]
    pub(super) connected_at: SystemTime,
    /// When its tunnel went down; for an agent connected when the file was written, then.
    #[serde(with = "rfc3339")]
    pub(super) gone_at: SystemTime,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Contents {
    version: u64,
    agents: Vec<Record>,
}

/// Reads the records of `path`; `Ok(None)` if there is no such file. The error says what is
/// wrong, without the file's name.
fn read(path: &Path) -> Result<Option<Vec<Record>>, String> {
    use std::io::Read as _;
    // Not a FIFO (opening one would wait for a writer, holding the start and SIGTERM with it),
    // and not more than any real file holds.
    let file = match crate::fs_util::open_regular(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "larger than {} MiB, far more than the agents it can hold",
            MAX_FILE_BYTES >> 20
        ));
    }
    parse(&bytes).map(Some)
}

/// The largest agents file read: 10,000 agents (`web.sd_keep_disconnected_max`'s default)
/// take about 3 MB.
const MAX_FILE_BYTES: u64 = 64 << 20;

fn parse(bytes: &[u8]) -> Result<Vec<Record>, String> {
    // The version alone first, the rest skipped unparsed: a file of another version says so
    // rather than what its fields lack, and no document tree of the whole file is built.
    #[derive(Deserialize)]
    struct Versioned {
        version: Option<u64>,
    }
    let versioned: Versioned =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    match versioned.version {
        Some(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "format version {v}, this ferry reads version {VERSION}"
            ))
        }
        None => return Err("no format version".into()),
    }
    let contents: Contents =
        serde_json::from_slice(bytes).map_err(|e| format!("not an agents file: {e}"))?;
    Ok(contents.agents)
}

#[cfg(test)]
fn serialize(records: Vec<Record>) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_json(&mut bytes, records).unwrap();
    bytes
}

/// Writes `records` as the file's JSON to `w`, streamed: a buffer as large as the file (a few
/// megabytes for ten thousand agents) would stay resident in the allocator after each write,
/// a cost per agent of its own (about 2 KiB per idle agent measured with 1,000).
fn write_json(w: impl std::io::Write, records: Vec<Record>) -> std::io::Result<()> {
    let contents = Contents {
        version: VERSION,
        agents: records,
    };
    serde_json::to_writer(w, &contents).map_err(std::io::Error::other)
}

/// The records still to be listed at `now`: gone less than `keep` ago, with a token that
/// `authorized(id, credential)` accepts.
fn restorable(
    records: Vec<Record>,
    now: SystemTime,
    keep: Duration,
    authorized: impl Fn(&str, &[u8; 32]) -> bool,
) -> Vec<Record> {
    records
        .into_iter()
        .filter(|r| now.duration_since(r.gone_at).unwrap_or_default() < keep)
        .filter(|r| authorized(&r.id, &r.credential))
        // What a tunnel would have been refused is not listed from the file either: the file
        // is only as trustworthy as whoever could write the data directory.
        .filter(|r| {
            crate::tunnel::handshake::valid_agent_id(&r.id)
                && crate::tunnel::handshake::reserved_agent_id(&r.id).is_none()
        })
        .filter_map(|mut r| {
            // A departure in the future (a clock set back, or a file edited) counts as now, and
            // is saved so: it must not keep the agent listed across every restart.
            r.gone_at = r.gone_at.min(now);
            r.connected_at = r.connected_at.min(r.gone_at);
            match super::published::accepted(Arc::unwrap_or_clone(r.targets), &r.id) {
                Ok(list) => r.targets = Arc::new(list),
                Err(reason) => {
                    warn!(agent = %r.id, %reason, "agent not restored in service discovery: its target list is refused");
                    return None;
                }
            }
            Some(r)
        })
        .collect()
}

/// Fills `departed` from the file in `data_dir`, for what is left of each agent's retention,
/// leaving out the agents whose token `tokens` no longer accepts for their id. Anything wrong
/// with the file is one warning and nothing restored.
pub(super) fn restore(
    data_dir: &Path,
    departed: &mut Departed,
    keep: Duration,
    tokens: &TokensFile,
) {
    let path = data_dir.join(FILE_NAME);
    let records = match read(&path) {
        Ok(Some(records)) => records,
        Ok(None) => return,
        Err(e) => {
            warn!(file = %path.display(), error = %e, "the agents kept in service discovery before the restart cannot be read: starting without them (disconnected agents are not listed until they connect)");
            return;
        }
    };
    let (now_wall, now) = (SystemTime::now(), Instant::now());
    let in_file = records.len();
    let kept = restorable(records, now_wall, keep, |id, digest| {
        tokens.authorize_digest(digest, id).is_ok()
    });
    let restored = departed.restore(kept, now_wall, now);
    info!(file = %path.display(), restored, in_file, "agents restored in service discovery as disconnected until they connect");
}

/// Keeps the file of `state` up to date until `stop`, at most one write every [`DEBOUNCE`].
/// Does nothing if the gateway keeps no disconnected agents.
pub(super) async fn keep_written(state: Arc<State>, stop: CancellationToken) {
    if state.agents_file.is_none() {
        return;
    }
    let changes = state.registry.changes();
    let mut saved = true;
    loop {
        tokio::select! {
            () = changes.notified() => {}
            // A failed save (out of space, say) is tried again without waiting for a change:
            // the fleet may not change for hours, and a restart meanwhile would forget them.
            () = retry(saved) => {}
            () = stop.cancelled() => return,
        }
        let failed_before = !saved;
        saved = write(&state).await;
        if saved && failed_before {
            // The warning said it would be tried again: say that it worked.
            info!(file = ?state.agents_file, "agents listed in service discovery saved again after failed saves");
        }
        tokio::select! {
            () = tokio::time::sleep(DEBOUNCE) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// How long after a failed save it is tried again, if nothing changed meanwhile.
pub(super) const RETRY: Duration = Duration::from_secs(30);

/// Fires [`RETRY`] from now after a failed save, never after a successful one.
async fn retry(saved: bool) {
    if saved {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(RETRY).await;
}

/// Writes what the registry holds now (agents still connected count as gone now); a failure is
/// counted, and a warning at most once a minute. Whether it was saved.
pub(super) async fn write(state: &State) -> bool {
    write_now(state, false).await
}

/// The last write, when the gateway stops: a failure is always logged, since nothing will try
/// again.
pub(super) async fn write_last(state: &State) {
    write_now(state, true).await;
}

async fn write_now(state: &State, last: bool) -> bool {
    let Some(path) = state.agents_file.clone() else {
        return true;
    };
    let records = state.registry.records(SystemTime::now());
    // Serialized there too: ten thousand agents make a few megabytes.
    let written = tokio::task::spawn_blocking({
        let path = path.clone();
        move || write_durably(&path, |w| write_json(w, records))
    })
    .await
    .unwrap_or_else(|e| Err(format!("the write task failed: {e}")));
    let Err(error) = written else { return true };
    state.metrics.agents_file_save_failures.inc();
    if last {
        warn!(file = %path.display(), %error, "cannot save the agents listed in service discovery as the gateway stops: the restarted gateway will list only those in the last file saved, and those that connect");
    } else if let Some(quiet) = state.agents_file_warnings.admit() {
        warn!(file = %path.display(), %error, failures_not_logged = quiet, "cannot save the agents listed in service discovery: a restarted gateway would not list the disconnected ones (tried again in 30 s, or at the next change)");
    }
    false
}

/// Replaces `path` with what `fill` writes (mode 0600: it names agents and where they connect
/// from) so that a crash leaves the old file or the new one, whole.
fn write_durably(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    let partial = {
        let mut name = path.as_os_str().to_owned();
        name.push(".partial");
        PathBuf::from(name)
    };
    // Left by a write interrupted before its rename (or planted): removed, not followed.
    let _ = std::fs::remove_file(&partial);
    let written = write_partial(&partial, fill).and_then(|()| {
        std::fs::rename(&partial, path)
            .map_err(|e| format!("cannot rename {} into place: {e}", partial.display()))
    });
    if written.is_err() {
        // Out of space, say: an empty or partial file left behind would only mislead.
        let _ = std::fs::remove_file(&partial);
    }
    written?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync directory {}: {e}", dir.display()))
}

/// Creates `partial` (it must not exist), fills and syncs it.
fn write_partial(
    partial: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), String> {
    let error = |e: std::io::Error| format!("cannot write {}: {e}", partial.display());
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(partial)
            .map_err(error)?
    };
    let mut w = std::io::BufWriter::new(file);
    fill(&mut w).map_err(error)?;
    let file = w.into_inner().map_err(|e| error(e.into_error()))?;
    file.sync_all().map_err(error)
}

/// The target list shared with the registry, written as the list itself.
mod shared_list {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(
        list: &Arc<TargetList>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        list.as_ref().serialize(s)
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Arc<TargetList>, D::Error> {
        TargetList::deserialize(d).map(Arc::new)
    }
}

/// A SHA-256 as 64 hex digits.
mod hex_digest {
    use serde::de::Error;

    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(
        digest: &[u8; 32],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(digest))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut digest = [0; 32];
        hex::decode_to_slice(&text, &mut digest)
            .map_err(|e| D::Error::custom(format!("credential: not a SHA-256 in hex: {e}")))?;
        Ok(digest)
    }
}

/// A wall-clock time as RFC 3339 in UTC, to the millisecond.
mod rfc3339 {
    use serde::de::Error;

    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text)
            .map_err(|e| D::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::TargetInfo;

    const HOUR: Duration = Duration::from_secs(3600);

    fn record(id: &str, gone_at: SystemTime) -> Record {
        let list = TargetList {
            version: 3,
            labels: [("site".to_owned(), "berlin".to_owned())].into(),
            targets: vec![TargetInfo {
                name: "node".into(),
                port: 9100,
                path: "/metrics".into(),
                labels: [("role".to_owned(), "db".to_owned())].into(),
            }],
        };
        Record {
            id: id.into(),
            targets: Arc::new(list),
            credential: [7; 32],
            remote: "192.0.2.1:40000".parse().unwrap(),
            connected_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            gone_at,
        }
    }

    fn at(secs: u64) -> SystemTime {
        // Whole milliseconds: what the file keeps.
        SystemTime::UNIX_EPOCH + Duration::from_millis(secs * 1000 + 250)
    }

    #[test]
    fn records_survive_the_round_trip() {
        let records = vec![
            record("db-1", at(1_700_000_100)),
            record("db-2", at(1_700_000_200)),
        ];
        let bytes = serialize(records.clone());
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains(&hex::encode([7; 32])), "{text}");
        assert!(text.contains("2023-11-14T22:15:00.250Z"), "{text}");
        assert_eq!(parse(&bytes).unwrap(), records);
    }

    #[test]
    fn a_durable_write_replaces_the_file_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("data").join(FILE_NAME);
        write_durably(&path, |w| write_json(w, vec![record("a", at(1))])).unwrap();
        write_durably(&path, |w| write_json(w, vec![record("b", at(2))])).unwrap();
        let read = read(&path).unwrap().unwrap();
        assert_eq!(read, [record("b", at(2))]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no partial file left: {left:?}");
    }

    /// A write that fails (out of space: here, the filler's error) leaves the old file as it
    /// was and no partial file beside it.
    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_partial() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join(FILE_NAME);
        write_durably(&path, |w| write_json(w, vec![record("a", at(1))])).unwrap();
        let no_space = std::io::Error::from_raw_os_error(28);
        let error = write_durably(&path, |_| Err(no_space)).unwrap_err();
        assert!(error.contains("agents.json.partial"), "{error}");
        assert_eq!(read(&path).unwrap().unwrap(), [record("a", at(1))]);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [FILE_NAME], "no partial file left");
    }

    #[test]
    fn a_missing_file_is_nothing_and_a_bad_one_says_what_is_wrong() {
        let dir = tempfile::TempDir::new().unwrap();
        assert_eq!(read(&dir.path().join(FILE_NAME)), Ok(None));
        let cases: [(&[u8], &str); 4] = [
            (b"{\"version\": 1, \"agents\": [", "not JSON"),
            (b"{\"agents\": []}", "no format version"),
            (b"{\"version\": 9, \"agents\": []}", "format version 9"),
            (
                b"{\"version\": 1, \"agents\": [{\"id\": \"a\"}]}",
                "not an agents file",
            ),
        ];
        for (bytes, want) in cases {
            let error = parse(bytes).unwrap_err();
            assert!(error.contains(want), "{error}");
        }
    }

    #[test]
    fn an_agent_gone_longer_than_the_retention_or_revoked_is_not_restored() {
        let now = at(1_700_100_000);
        let records = vec![
            record("recent", now - HOUR),
            record("expired", now - 24 * HOUR),
            record("revoked", now - HOUR),
            // The clock was set back since it was written: kept.
            record("future", now + HOUR),
        ];
        let kept = restorable(records, now, 24 * HOUR, |id, _| id != "revoked");
        let ids: Vec<&str> = kept.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["recent", "future"]);
        assert_eq!(kept[1].gone_at, now, "saved as gone now, not in the future");
    }

    /// The file is only as trustworthy as whoever could write the data directory: what a tunnel
    /// would have been refused is not listed from it either.
    #[test]
    fn what_a_tunnel_would_be_refused_is_not_restored() {
        let now = at(1_700_100_000);
        let mut port_zero = record("port-zero", now - HOUR);
        Arc::make_mut(&mut port_zero.targets)
            .targets
            .push(TargetInfo {
                name: "evil".into(),
                port: 0,
                path: "/metrics".into(),
                labels: Default::default(),
            });
        // Its label repeated in 300 groups would make 3 MiB of `/targets`.
        let mut expanding = record("expanding", now - HOUR);
        let list = Arc::make_mut(&mut expanding.targets);
        list.labels.insert("note".into(), "x".repeat(10_000));
        list.targets = (1..=300)
            .map(|port| TargetInfo {
                name: format!("t{port}"),
                port,
                path: "/metrics".into(),
                labels: Default::default(),
            })
            .collect();
        let records = vec![
            record("node-a\nlevel=error", now - HOUR),
            record("node-\"q\"<b>", now - HOUR),
            port_zero,
            expanding,
        ];
        let kept = restorable(records, now, 24 * HOUR, |_, _| true);
        let ids: Vec<&str> = kept.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["port-zero"]);
        let names: Vec<&str> = kept[0]
            .targets
            .targets
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(names, ["node"], "the unroutable target is dropped");
    }

    /// A FIFO in the file's place is refused at once (opening it would wait for a writer, and
    /// hold the gateway's start), and a file larger than any real one is not read whole.
    #[test]
    fn a_fifo_or_an_oversized_file_is_refused_without_waiting() {
        let dir = tempfile::TempDir::new().unwrap();
        let fifo = dir.path().join("fifo.json");
        crate::fs_util::make_fifo(&fifo);
        let error = read(&fifo).unwrap_err();
        assert!(
            error.contains("not a regular file (a named pipe)"),
            "{error}"
        );
        let big = dir.path().join("big.json");
        let file = std::fs::File::create(&big).unwrap();
        file.set_len(MAX_FILE_BYTES + 1).unwrap();
        let error = read(&big).unwrap_err();
        assert!(error.contains("larger than 64 MiB"), "{error}");
    }

    #[test]
    fn restored_agents_keep_what_is_left_of_their_retention_within_the_cap() {
        let (now_wall, now) = (at(1_700_100_000), Instant::now());
        let mut departed = Departed::new(10 * HOUR, 2);
        let records = vec![
            record("newest", now_wall - HOUR),
            record("oldest", now_wall - 9 * HOUR),
            record("middle", now_wall - 5 * HOUR),
        ];
        assert_eq!(departed.restore(records, now_wall, now), 2);
        let kept: Vec<String> = departed.records().into_iter().map(|r| r.id).collect();
        assert_eq!(kept, ["middle", "newest"]);
        departed.prune(now + 5 * HOUR);
        let kept: Vec<String> = departed.records().into_iter().map(|r| r.id).collect();
        assert_eq!(kept, ["newest"], "middle had 5 of its 10 hours left");
        departed.prune(now + 9 * HOUR);
        assert_eq!(departed.len(), 0);
    }
}
