//! Geo lookup: MaxMind's test databases (shared/data/geo, see its README), databases written here
//! with mmdb-writer in both schemas, special ranges, refusal of broken and wrong-type files, and
//! the hot swap of `SharedGeo` (file watch and reload) that keeps the old database on a bad file.
#![cfg(feature = "geo")]

mod common;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::telemetry::geo::{Country, GeoDb, GeoError, SharedGeo};
use mmdb_writer::{IpVersion, Ipv4Aliasing, Writer};
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

const GEO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/geo");

fn shared(file: &str) -> PathBuf {
    Path::new(GEO_DIR).join(file)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A database of `entries` (network, record) as bytes.
fn db_bytes(db_type: &str, version: IpVersion, entries: &[(&str, Value)]) -> Vec<u8> {
    let mut writer = Writer::builder(db_type)
        .description(&[("en", "ferry test database")])
        .ip_version(version)
        .build();
    for (net, record) in entries {
        writer
            .insert(net.parse::<ipnet::IpNet>().unwrap(), record)
            .unwrap();
    }
    writer.to_bytes().unwrap()
}

/// MaxMind's schema: `country.iso_code`.
fn maxmind(code: &str) -> Value {
    json!({ "country": { "iso_code": code, "names": { "en": "Somewhere" } }, "continent": { "code": "EU" } })
}

/// DB-IP lite / ip-location-db schema: a top-level `country_code`.
fn dbip(code: &str) -> Value {
    json!({ "country_code": code })
}

/// Replaces `path` the way database updaters do: a new file renamed over the old one.
fn install(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write_db(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    install(&path, bytes);
    path
}

fn open_err(path: &Path) -> GeoError {
    match GeoDb::open(path) {
        Ok(db) => panic!("{} opened: {db:?}", path.display()),
        Err(e) => e,
    }
}

/// The error a person sees: one line naming the file.
fn assert_clear_error(err: &GeoError, path: &Path) {
    let text = err.to_string();
    assert!(
        text.contains(&path.display().to_string()),
        "error does not name the file: {text}"
    );
    assert!(!text.contains('\n'), "error is not one line: {text:?}");
}

#[test]
fn maxmind_country_test_database_known_entries() {
    let db = GeoDb::open(shared("GeoLite2-Country-Test.mmdb")).unwrap();
    for (addr, want) in [
        ("81.2.69.160", "GB"),
        ("89.160.20.112", "SE"),
        ("216.160.83.56", "US"),
        ("2001:218::1", "JP"),
        ("::ffff:81.2.69.160", "GB"),
        ("8.8.8.8", "unknown"),
    ] {
        assert_eq!(db.country(ip(addr)), want, "{addr}");
    }
    assert_eq!(db.database_type(), "GeoLite2-Country");
}

#[test]
fn geoip2_country_and_city_test_databases() {
    for file in ["GeoIP2-Country-Test.mmdb", "GeoLite2-City-Test.mmdb"] {
        let db = GeoDb::open(shared(file)).unwrap();
        assert_eq!(db.country(ip("81.2.69.160")), "GB", "{file}");
        assert_eq!(db.country(ip("::ffff:81.2.69.160")), "GB", "{file}");
        assert_eq!(db.country(ip("89.160.20.112")), "SE", "{file}");
        assert_eq!(db.country(ip("8.8.8.8")), "unknown", "{file}");
        assert!(db.country(ip("81.2.69.160")).is_iso());
    }
}

#[test]
fn broken_test_databases_give_a_clear_error() {
    for file in [
        "GeoIP2-City-Test-Broken-Double-Format.mmdb",
        "MaxMind-DB-test-broken-search-tree-24.mmdb",
    ] {
        let path = shared(file);
        let err = open_err(&path);
        assert_clear_error(&err, &path);
        assert!(
            matches!(err, GeoError::Open { .. } | GeoError::Broken { .. }),
            "{file}: {err}"
        );
    }
}

#[test]
fn asn_database_is_rejected_as_wrong_type() {
    let path = shared("GeoLite2-ASN-Test.mmdb");
    let err = open_err(&path);
    assert_clear_error(&err, &path);
    match &err {
        GeoError::WrongType { database_type, .. } => assert_eq!(database_type, "GeoLite2-ASN"),
        other => panic!("not a wrong-type error: {other}"),
    }
    assert!(err.to_string().contains("wrong type"), "{err}");
}

#[test]
fn missing_garbage_and_directory_give_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("nope.mmdb");
    let err = open_err(&missing);
    assert_clear_error(&err, &missing);
    assert!(matches!(err, GeoError::Open { .. }), "{err}");

    let garbage = write_db(&dir, "garbage.mmdb", b"this is not a MaxMind database\n");
    assert_clear_error(&open_err(&garbage), &garbage);

    let empty = write_db(&dir, "empty.mmdb", b"");
    assert_clear_error(&open_err(&empty), &empty);

    // A valid database whose tail (data section and metadata) is cut off.
    let whole = db_bytes(
        "Test-Country",
        IpVersion::V6,
        &[("198.51.100.0/24", maxmind("DE"))],
    );
    let cut = write_db(&dir, "cut.mmdb", &whole[..whole.len() / 2]);
    assert_clear_error(&open_err(&cut), &cut);

    assert_clear_error(&open_err(dir.path()), dir.path());
}

/// `GeoDb::open(path)` on another thread: a file that blocks the open fails the test instead of
/// hanging it.
fn open_err_within(path: &Path, within: Duration) -> GeoError {
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = path.to_owned();
    std::thread::spawn(move || tx.send(GeoDb::open(&owned).map(|_| ())));
    match rx.recv_timeout(within) {
        Ok(Ok(())) => panic!("{} opened", path.display()),
        Ok(Err(e)) => e,
        Err(_) => panic!("opening {} still blocked after {within:?}", path.display()),
    }
}

/// A named pipe at the database path (itself or behind a symlink) or a device is refused at
/// once, naming the file: opening a pipe for reading would wait for a writer forever.
#[test]
fn a_named_pipe_or_a_device_is_refused_without_blocking() {
    let dir = TempDir::new().unwrap();
    let fifo = dir.path().join("fifo.mmdb");
    common::make_fifo(&fifo);
    let link = dir.path().join("link.mmdb");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    for (path, kind) in [
        (fifo.as_path(), "a named pipe"),
        (link.as_path(), "a named pipe"),
        (Path::new("/dev/null"), "a device"),
    ] {
        let err = open_err_within(path, Duration::from_secs(5));
        assert_clear_error(&err, path);
        assert!(
            err.to_string()
                .ends_with(&format!("cannot open: not a regular file ({kind})")),
            "{err}"
        );
    }
}

/// Codes that stand for no country — DB-IP's `ZZ`, MaxMind's legacy `EU` and `AP` — are
/// `unknown`, as a miss is, not a country of their own; a real registered country still counts.
#[test]
fn placeholder_country_codes_are_unknown() {
    let dir = TempDir::new().unwrap();
    let entries = [
        ("198.51.100.0/24", dbip("ZZ")),
        ("203.0.113.0/24", maxmind("EU")),
        ("2001:db8:1::/48", maxmind("ap")),
        (
            "192.0.2.0/24",
            json!({ "country": { "iso_code": "EU" }, "registered_country": { "iso_code": "NL" } }),
        ),
        ("2001:db8:2::/48", dbip("DE")),
    ];
    let path = write_db(
        &dir,
        "placeholders.mmdb",
        &db_bytes("Test-Country", IpVersion::V6, &entries),
    );
    let geo = SharedGeo::open(&path).unwrap();
    for (addr, want) in [
        ("198.51.100.1", "unknown"),
        ("203.0.113.1", "unknown"),
        ("2001:db8:1::1", "unknown"),
        ("192.0.2.1", "NL"),
        ("2001:db8:2::1", "DE"),
    ] {
        assert_eq!(geo.lookup(ip(addr)), want, "{addr}");
    }
    // Still a country database, if its first records are all placeholders.
    let only = write_db(
        &dir,
        "zz.mmdb",
        &db_bytes(
            "DBIP-Country-Lite",
            IpVersion::V6,
            &[("198.51.100.0/24", dbip("ZZ"))],
        ),
    );
    assert_eq!(
        GeoDb::open(&only).unwrap().country(ip("198.51.100.1")),
        "unknown"
    );
}

#[test]
fn written_databases_in_both_schemas() {
    let dir = TempDir::new().unwrap();
    let entries = [
        ("198.51.100.0/24", maxmind("DE")),
        ("203.0.113.0/24", dbip("FR")),
        ("2001:db8:1::/48", maxmind("JP")),
        ("2001:db8:2::/48", dbip("br")), // lower case is normalised
        ("192.0.2.0/25", dbip("XYZ")),   // not an ISO alpha-2 code: no unbounded label
        (
            "192.0.2.128/25",
            json!({ "registered_country": { "iso_code": "NL" } }),
        ),
    ];
    let path = write_db(
        &dir,
        "mixed.mmdb",
        &db_bytes("Test-Country", IpVersion::V6, &entries),
    );
    let db = GeoDb::open(&path).unwrap();
    // Twice: the second round is answered from the decoded-record cache.
    for (addr, want) in [
        ("198.51.100.7", "DE"),
        ("::ffff:198.51.100.7", "DE"),
        ("203.0.113.250", "FR"),
        ("::ffff:203.0.113.250", "FR"),
        ("2001:db8:1::99", "JP"),
        ("2001:db8:2:abcd::1", "BR"),
        ("192.0.2.1", "unknown"),
        ("192.0.2.200", "NL"),
        ("198.51.101.1", "unknown"),
        ("2001:db8:3::1", "unknown"),
    ]
    .iter()
    .cycle()
    .take(20)
    {
        assert_eq!(db.country(ip(addr)), *want, "{addr}");
    }
}

#[test]
fn country_code_only_database_ipv4_tree_and_no_aliases() {
    let dir = TempDir::new().unwrap();
    // An IPv4-only tree: v4-mapped addresses must be converted before the lookup.
    let v4 = write_db(
        &dir,
        "v4.mmdb",
        &db_bytes(
            "DBIP-Country-Lite",
            IpVersion::V4,
            &[("203.0.113.0/24", dbip("FR"))],
        ),
    );
    let db = GeoDb::open(&v4).unwrap();
    assert_eq!(db.country(ip("203.0.113.9")), "FR");
    assert_eq!(db.country(ip("::ffff:203.0.113.9")), "FR");
    assert_eq!(db.country(ip("2001:db8::1")), "unknown"); // IPv6 in an IPv4 tree: a miss, no error

    // An IPv6 tree without the ::ffff:0:0/96 alias, as some ip-location-db builds.
    let mut writer = Writer::builder("ip-location-db")
        .description(&[("en", "no aliases")])
        .ipv4_aliasing(Ipv4Aliasing::Disabled)
        .build();
    writer
        .insert(
            "203.0.113.0/24".parse::<ipnet::IpNet>().unwrap(),
            &dbip("FR"),
        )
        .unwrap();
    let no_alias = write_db(&dir, "noalias.mmdb", &writer.to_bytes().unwrap());
    let db = GeoDb::open(&no_alias).unwrap();
    assert_eq!(db.country(ip("::ffff:203.0.113.9")), "FR");
}

#[test]
fn written_database_without_country_is_wrong_type() {
    let dir = TempDir::new().unwrap();
    let asn = json!({ "autonomous_system_organization": "Example Networks" });
    let path = write_db(
        &dir,
        "asn.mmdb",
        &db_bytes("Test-ASN", IpVersion::V6, &[("198.51.100.0/24", asn)]),
    );
    let err = open_err(&path);
    assert_clear_error(&err, &path);
    assert!(matches!(err, GeoError::WrongType { .. }), "{err}");

    let nothing = write_db(
        &dir,
        "nothing.mmdb",
        &db_bytes("Test-Country", IpVersion::V6, &[]),
    );
    assert!(matches!(open_err(&nothing), GeoError::WrongType { .. }));
}

const SPECIAL: &[(&str, &str)] = &[
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.254", "cgnat"),
    ("169.254.1.1", "link_local"),
    ("fe80::1", "link_local"),
    ("febf::1", "link_local"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.1.2.3", "multicast"),
    ("ff02::1", "multicast"),
];

/// Addresses next to the special ranges that are ordinary public addresses.
const NOT_SPECIAL: &[&str] = &[
    "172.15.255.255",
    "172.32.0.1",
    "100.63.255.255",
    "100.128.0.1",
    "11.0.0.1",
    "192.169.0.1",
    "169.255.0.1",
    "fec0::1",
    "fb00::1",
    "2001:4860::8888",
];

#[test]
fn special_ranges_are_labelled_before_the_database() {
    let dir = TempDir::new().unwrap();
    // A database claiming every address is in the US: special ranges must not reach it.
    let everything = [("0.0.0.0/0", maxmind("US")), ("::/0", maxmind("US"))];
    let path = write_db(
        &dir,
        "all.mmdb",
        &db_bytes("Test-Country", IpVersion::V6, &everything),
    );
    let db = GeoDb::open(&path).unwrap();
    let geo = SharedGeo::open(&path).unwrap();
    let disabled = SharedGeo::disabled();
    for (addr, want) in SPECIAL {
        let mut forms = vec![addr.to_string()];
        if !addr.contains(':') {
            forms.push(format!("::ffff:{addr}"));
        }
        for form in forms {
            assert_eq!(db.country(ip(&form)), *want, "GeoDb {form}");
            assert_eq!(geo.lookup(ip(&form)), *want, "SharedGeo {form}");
            assert_eq!(disabled.lookup(ip(&form)), *want, "disabled {form}");
            assert_eq!(Country::special(ip(&form)).unwrap().as_str(), *want);
        }
    }
    for addr in NOT_SPECIAL {
        assert_eq!(Country::special(ip(addr)), None, "{addr}");
        assert_eq!(db.country(ip(addr)), "US", "{addr}");
        assert_eq!(disabled.lookup(ip(addr)), "unknown", "{addr}");
    }
}

#[test]
fn country_label_values() {
    assert_eq!(Country::iso("gb").unwrap().as_str(), "GB");
    assert_eq!(Country::iso("GBR"), None);
    assert_eq!(Country::iso("G1"), None);
    assert_eq!(Country::iso("ÄB"), None);
    assert_eq!(Country::UNKNOWN.to_string(), "unknown");
    assert_eq!(Country::LINK_LOCAL.to_string(), "link_local");
    assert!(!Country::PRIVATE.is_iso());
}

#[test]
fn reload_swaps_and_a_broken_file_keeps_the_old_database() {
    let dir = TempDir::new().unwrap();
    let a = db_bytes(
        "Test-Country",
        IpVersion::V6,
        &[("198.51.100.0/24", maxmind("DE"))],
    );
    let b = db_bytes(
        "Test-Country",
        IpVersion::V6,
        &[("198.51.100.0/24", dbip("FR"))],
    );
    let path = write_db(&dir, "geo.mmdb", &a);
    let geo = SharedGeo::open(&path).unwrap();
    let reader = geo.clone();
    assert_eq!(reader.lookup(ip("198.51.100.1")), "DE");

    install(&path, &b);
    geo.reload().unwrap();
    assert_eq!(reader.lookup(ip("198.51.100.1")), "FR");

    install(&path, b"truncated garbage");
    let err = geo.reload().unwrap_err();
    assert_clear_error(&err, &path);
    assert_eq!(reader.lookup(ip("198.51.100.1")), "FR");
    assert!(geo.is_enabled());

    std::fs::remove_file(&path).unwrap();
    assert!(geo.reload().is_err());
    assert_eq!(reader.lookup(ip("198.51.100.1")), "FR");

    // Without a file, reload has nothing to do.
    SharedGeo::disabled().reload().unwrap();
}

/// Polls `read` until `done` holds for what it read (panics with the last value after `within`).
async fn eventually<T: std::fmt::Debug>(
    within: Duration,
    read: impl Fn() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let got = read();
        if done(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "still {got:?} after {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for(geo: &SharedGeo, addr: &str, want: &str, within: Duration) {
    eventually(within, || geo.lookup(ip(addr)), |got| *got == want).await;
}

/// A database placing 198.51.100.0/24 in `code`.
fn db(code: &str) -> Vec<u8> {
    db_bytes(
        "Test-Country",
        IpVersion::V6,
        &[("198.51.100.0/24", maxmind(code))],
    )
}

/// A database file (198.51.100.0/24 in DE) opened to be watched every 50 ms.
fn watched_db(dir: &TempDir) -> (PathBuf, SharedGeo, Duration) {
    let path = write_db(dir, "geo.mmdb", &db("DE"));
    let poll = Duration::from_millis(50);
    let geo = SharedGeo::open(&path).unwrap().with_poll_interval(poll);
    (path, geo, poll)
}

#[tokio::test]
async fn watch_hot_swaps_on_file_change_and_survives_a_broken_file() {
    let dir = TempDir::new().unwrap();
    let (path, geo, poll) = watched_db(&dir);
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(geo.clone().watch(shutdown.clone()));
    assert_eq!(geo.lookup(ip("198.51.100.1")), "DE");

    install(&path, &db("FR"));
    wait_for(&geo, "198.51.100.1", "FR", Duration::from_secs(5)).await;

    // A broken replacement: give the watcher many polls, the old database must stay.
    install(&path, b"not a database at all");
    tokio::time::sleep(poll * 10).await;
    assert_eq!(geo.lookup(ip("198.51.100.1")), "FR");
    assert!(geo.is_enabled());

    // The watcher is still alive and picks up the next good file.
    install(&path, &db("JP"));
    wait_for(&geo, "198.51.100.1", "JP", Duration::from_secs(5)).await;

    // Deleted for a while: nothing changes, and a file coming back is loaded.
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(poll * 4).await;
    assert_eq!(geo.lookup(ip("198.51.100.1")), "JP");
    // (Another size too: the new file may get the deleted file's inode number back.)
    let se = [
        ("198.51.100.0/24", maxmind("SE")),
        ("203.0.113.0/24", dbip("SE")),
    ];
    install(&path, &db_bytes("Test-Country", IpVersion::V6, &se));
    wait_for(&geo, "198.51.100.1", "SE", Duration::from_secs(5)).await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), watcher)
        .await
        .expect("watch did not stop on shutdown")
        .unwrap();
}

/// `(successful, success timestamp)` of the database's loads, as `registry` exposes them.
fn load_metrics(registry: &Registry) -> (f64, f64) {
    let text = ferry::telemetry::encode_registry(registry);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    (
        value("ferry_geoip_database_last_reload_successful"),
        value("ferry_geoip_database_last_reload_success_timestamp_seconds"),
    )
}

/// Waits until the database's gauge says `successful`.
async fn wait_for_load(registry: &Registry, successful: f64) -> (f64, f64) {
    let read = || load_metrics(registry);
    eventually(Duration::from_secs(5), read, |m| m.0 == successful).await
}

/// Whatever loads the file — the periodic check or `reload` (SIGHUP) — records the outcome in the
/// database's own gauges: a broken file from an updater shows without a SIGHUP.
#[tokio::test]
async fn every_load_of_the_file_is_recorded_in_its_gauges() {
    let dir = TempDir::new().unwrap();
    let (path, geo, _) = watched_db(&dir);
    let mut registry = Registry::default();
    geo.register_metrics(&mut registry);
    let (ok, opened) = load_metrics(&registry);
    assert_eq!(ok, 1.0, "opening the file is a successful load");
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(geo.clone().watch(shutdown.clone()));

    install(&path, b"not a database at all");
    assert_eq!(wait_for_load(&registry, 0.0).await, (0.0, opened));
    assert_eq!(geo.lookup(ip("198.51.100.1")), "DE");

    install(&path, &db("FR"));
    let (_, loaded) = wait_for_load(&registry, 1.0).await;
    assert!(loaded > opened, "{loaded} is not after {opened}");
    assert_eq!(geo.lookup(ip("198.51.100.1")), "FR");

    shutdown.cancel();
    watcher.await.unwrap();
    install(&path, b"still not a database");
    assert!(geo.reload().is_err());
    assert_eq!(load_metrics(&registry), (0.0, loaded));
    install(&path, &db("JP"));
    geo.reload().unwrap();
    assert_eq!(load_metrics(&registry).0, 1.0);
}

/// A database file deleted under a running process: the loaded database keeps labelling, but the
/// next start would fail, so the gauge says 0 and the log says why, once, not at every check. A
/// good file back (the same database, even) is loaded and the gauge is 1 again.
#[tokio::test]
async fn a_deleted_file_is_reported_once_while_the_loaded_database_stays() {
    let logs = common::logs::capture();
    let dir = TempDir::new().unwrap();
    let (path, geo, poll) = watched_db(&dir);
    let mut registry = Registry::default();
    geo.register_metrics(&mut registry);
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(geo.clone().watch(shutdown.clone()));

    std::fs::remove_file(&path).unwrap();
    wait_for_load(&registry, 0.0).await;
    tokio::time::sleep(poll * 10).await;
    let gone = logs.lines_with(&["geoip database file is gone", &path.display().to_string()]);
    assert_eq!(gone.len(), 1, "{gone:#?}");
    assert!(
        gone[0].contains("WARN") && gone[0].contains("No such file or directory"),
        "{}",
        gone[0]
    );
    assert_eq!(load_metrics(&registry).0, 0.0);
    assert_eq!(geo.lookup(ip("198.51.100.1")), "DE");

    install(&path, &db("DE"));
    wait_for_load(&registry, 1.0).await;
    assert_eq!(geo.lookup(ip("198.51.100.1")), "DE");

    shutdown.cancel();
    watcher.await.unwrap();
}

/// Without a database file there is no load to report.
#[test]
fn no_database_file_no_geoip_gauges() {
    let mut registry = Registry::default();
    SharedGeo::disabled().register_metrics(&mut registry);
    let text = ferry::telemetry::encode_registry(&registry);
    assert!(!text.contains("ferry_geoip"), "{text}");
}

#[test]
fn swaps_are_atomic_for_concurrent_readers() {
    let dir = TempDir::new().unwrap();
    let a = db_bytes(
        "Test-Country",
        IpVersion::V6,
        &[("198.51.100.0/24", maxmind("DE"))],
    );
    let b = db_bytes(
        "Test-Country",
        IpVersion::V6,
        &[("198.51.100.0/24", dbip("FR"))],
    );
    let path = write_db(&dir, "geo.mmdb", &a);
    let geo = SharedGeo::open(&path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let geo = geo.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen = [0u64; 2];
                while !stop.load(Ordering::Relaxed) {
                    match geo.lookup(ip("198.51.100.77")).as_str() {
                        "DE" => seen[0] += 1,
                        "FR" => seen[1] += 1,
                        other => panic!("a reader saw {other} during a swap"),
                    }
                }
                seen
            })
        })
        .collect();
    for i in 0..40 {
        install(&path, if i % 2 == 0 { &b } else { &a });
        geo.reload().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let seen = reader.join().expect("reader panicked");
        assert!(seen[0] + seen[1] > 0);
    }
}
