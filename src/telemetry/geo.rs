//! Country of an IP address from a local MaxMind-format database (`.mmdb`), for the `country`
//! label of connection metrics: no web API, no rate limit, works offline.
//!
//! - [`Country`] is the label value: an ISO 3166-1 alpha-2 code such as `GB` for a database hit,
//!   a kind for special ranges (`loopback`, `private`, `link_local`, `cgnat`, `unspecified`,
//!   `multicast`, decided before the database is asked), `unknown` for a miss, a lookup error or
//!   a placeholder code (`ZZ`, `EU`, `AP`).
//!   The set of values is bounded (at most 26² codes plus seven words).
//! - [`GeoDb`] is one opened database, memory-mapped. It reads both common schemas: MaxMind's
//!   `country.iso_code` (GeoLite2/GeoIP2 Country and City, falling back to
//!   `registered_country.iso_code`) and a top-level `country_code` string (DB-IP lite,
//!   ip-location-db). A broken file or one without country data (an ASN database) is refused at
//!   open with a one-line error naming the file: open maps the file and decodes its first
//!   records; a damaged record deeper in the file makes only the lookups that reach it `unknown`.
//!   Decoded countries are cached by record offset, so a Country database (a few hundred distinct
//!   records) is decoded once per record.
//! - [`SharedGeo`] is the handle the roles share: lookups through an atomically swapped database,
//!   [`SharedGeo::reload`] (SIGHUP) and [`SharedGeo::watch`] (polls the file's mtime, size and
//!   inode) keep the previous database when the new file is broken or the file is gone; the
//!   outcome of the last load is a pair of gauges ([`SharedGeo::register_metrics`]), and a file
//!   gone counts as a failed load: the next start would fail.
//!
//! Replace the database file by renaming a new file over it (as `geoipupdate`, `mv` and `install`
//! do), not by rewriting it in place: the old file stays mapped until the swap, and truncating a
//! mapped file under a reader is undefined behaviour.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use maxminddb::{MaxMindDbError, Mmap, Reader, WithinOptions};
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::telemetry::ReloadOutcome;

/// How often [`SharedGeo::watch`] looks at the database file unless told otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// Records decoded at open to decide whether a database carries country data.
const PROBE_RECORDS: usize = 512;

/// The `country` label value of an address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Country(Repr);

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Repr {
    /// Two ASCII uppercase letters.
    Iso([u8; 2]),
    Loopback,
    Private,
    LinkLocal,
    Cgnat,
    Unspecified,
    Multicast,
    Unknown,
}

impl Country {
    /// A miss in the database, a lookup error, or no database at all.
    pub const UNKNOWN: Country = Country(Repr::Unknown);
    /// 127.0.0.0/8 and ::1.
    pub const LOOPBACK: Country = Country(Repr::Loopback);
    /// RFC 1918 (10/8, 172.16/12, 192.168/16) and unique local fc00::/7.
    pub const PRIVATE: Country = Country(Repr::Private);
    /// 169.254/16 and fe80::/10.
    pub const LINK_LOCAL: Country = Country(Repr::LinkLocal);
    /// Carrier-grade NAT, 100.64/10.
    pub const CGNAT: Country = Country(Repr::Cgnat);
    /// 0.0.0.0 and ::.
    pub const UNSPECIFIED: Country = Country(Repr::Unspecified);
    /// 224/4 and ff00::/8.
    pub const MULTICAST: Country = Country(Repr::Multicast);

    /// The country of an ISO 3166-1 alpha-2 code (any case); `None` unless two ASCII letters.
    pub fn iso(code: &str) -> Option<Country> {
        match code.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                Some(Country(Repr::Iso([
                    a.to_ascii_uppercase(),
                    b.to_ascii_uppercase(),
                ])))
            }
            _ => None,
        }
    }

    /// The kind of a special-range address (v4-mapped IPv6 classified as IPv4), `None` for an
    /// address the database should be asked about.
    pub fn special(ip: IpAddr) -> Option<Country> {
        match canonical(ip) {
            IpAddr::V4(v4) => special_v4(v4),
            IpAddr::V6(v6) => special_v6(v6),
        }
    }

    /// Whether this is an ISO country code rather than a kind or `unknown`.
    pub fn is_iso(&self) -> bool {
        matches!(self.0, Repr::Iso(_))
    }

    /// The label value: `GB`, `private`, `unknown`, …
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Always two ASCII letters (see `Country::iso`), so never the fallback.
            Repr::Iso(code) => std::str::from_utf8(code).unwrap_or("unknown"),
            Repr::Loopback => "loopback",
            Repr::Private => "private",
            Repr::LinkLocal => "link_local",
            Repr::Cgnat => "cgnat",
            Repr::Unspecified => "unspecified",
            Repr::Multicast => "multicast",
            Repr::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Country({})", self.as_str())
    }
}

impl PartialEq<str> for Country {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Country {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl EncodeLabelValue for Country {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl Country {
    /// A compact number of the database outcomes (`unknown` 1, ISO codes 16..=691) for
    /// [`RecordCache`]; 0 for the kinds, which never come from the database.
    fn code(self) -> u16 {
        match self.0 {
            Repr::Iso([a, b]) => 16 + u16::from(a - b'A') * 26 + u16::from(b - b'A'),
            Repr::Unknown => 1,
            _ => 0,
        }
    }

    fn from_code(code: u16) -> Option<Country> {
        match code {
            1 => Some(Country::UNKNOWN),
            16..=691 => {
                let n = code - 16;
                Some(Country(Repr::Iso([
                    b'A' + (n / 26) as u8,
                    b'A' + (n % 26) as u8,
                ])))
            }
            _ => None,
        }
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; every other address unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<Country> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() {
        Some(Country::UNSPECIFIED)
    } else if ip.is_loopback() {
        Some(Country::LOOPBACK)
    } else if ip.is_private() {
        Some(Country::PRIVATE)
    } else if ip.is_link_local() {
        Some(Country::LINK_LOCAL)
    } else if a == 100 && b & 0xc0 == 64 {
        Some(Country::CGNAT)
    } else if ip.is_multicast() {
        Some(Country::MULTICAST)
    } else {
        None
    }
}

fn special_v6(ip: Ipv6Addr) -> Option<Country> {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        Some(Country::UNSPECIFIED)
    } else if ip.is_loopback() {
        Some(Country::LOOPBACK)
    } else if first & 0xfe00 == 0xfc00 {
        Some(Country::PRIVATE)
    } else if first & 0xffc0 == 0xfe80 {
        Some(Country::LINK_LOCAL)
    } else if ip.is_multicast() {
        Some(Country::MULTICAST)
    } else {
        None
    }
}

/// Why a database file cannot be used. Each message is one line naming the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeoError {
    /// The file cannot be read or is not a MaxMind DB file.
    #[error("geoip database {}: cannot open: {message}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// What went wrong, on one line.
        message: String,
    },
    /// The file opened, but reading its records failed.
    #[error("geoip database {}: broken: {message}", path.display())]
    Broken {
        /// The database file.
        path: PathBuf,
        /// What went wrong, on one line.
        message: String,
    },
    /// A valid database without country data, e.g. an ASN or ISP database.
    #[error(
        "geoip database {}: wrong type {database_type:?}: its records have no country.iso_code or country_code",
        path.display()
    )]
    WrongType {
        /// The database file.
        path: PathBuf,
        /// `database_type` from the file's metadata.
        database_type: String,
    },
}

impl GeoError {
    fn open(path: &Path, err: impl fmt::Display) -> GeoError {
        GeoError::Open {
            path: path.to_owned(),
            message: one_line(err),
        }
    }

    fn broken(path: &Path, err: impl fmt::Display) -> GeoError {
        GeoError::Broken {
            path: path.to_owned(),
            message: one_line(err),
        }
    }
}

fn one_line(err: impl fmt::Display) -> String {
    err.to_string().replace(['\n', '\r'], " ")
}

/// The fields of a record that name its country, in either schema; everything else is skipped.
#[derive(Deserialize)]
struct CountryRecord<'a> {
    #[serde(default, borrow)]
    country: Option<IsoCode<'a>>,
    #[serde(default, borrow)]
    registered_country: Option<IsoCode<'a>>,
    #[serde(default, borrow)]
    country_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(default, borrow)]
    iso_code: Option<&'a str>,
}

/// Codes databases give where they know no country: DB-IP's `ZZ`, and the `EU` (Europe) and `AP`
/// (Asia/Pacific) of MaxMind's legacy data. Read as no code at all, so they are `unknown`.
const PLACEHOLDER_CODES: [&str; 3] = ["ZZ", "EU", "AP"];

impl<'a> CountryRecord<'a> {
    /// The codes of the record, most specific first.
    fn codes(&self) -> [Option<&'a str>; 3] {
        fn nested<'a>(c: &Option<IsoCode<'a>>) -> Option<&'a str> {
            c.as_ref().and_then(|c| c.iso_code)
        }
        [
            nested(&self.country),
            self.country_code,
            nested(&self.registered_country),
        ]
    }

    /// The first code that names a country.
    fn country(&self) -> Option<Country> {
        let real = |code: &&str| {
            !PLACEHOLDER_CODES
                .iter()
                .any(|p| p.eq_ignore_ascii_case(code))
        };
        self.codes()
            .into_iter()
            .flatten()
            .find(real)
            .and_then(Country::iso)
    }

    /// Whether the record carries a country code at all, a placeholder included: what tells a
    /// country database from another type at open.
    fn has_code(&self) -> bool {
        self.codes()
            .into_iter()
            .flatten()
            .any(|c| Country::iso(c).is_some())
    }
}

/// What identifies one version of the database file: replaced files differ in at least one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Fingerprint {
    fn of(path: &Path) -> std::io::Result<Fingerprint> {
        Ok(Fingerprint::from_meta(&std::fs::metadata(path)?))
    }

    fn from_meta(meta: &std::fs::Metadata) -> Fingerprint {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Fingerprint {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode,
        }
    }
}

/// One opened, memory-mapped country database.
pub struct GeoDb {
    reader: Reader<Mmap>,
    path: PathBuf,
    fingerprint: Option<Fingerprint>,
    cache: RecordCache,
}

impl fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeoDb")
            .field("path", &self.path)
            .field("database_type", &self.database_type())
            .finish_non_exhaustive()
    }
}

impl GeoDb {
    /// Maps `path` and checks that it is a readable database with country data.
    pub fn open(path: impl AsRef<Path>) -> Result<GeoDb, GeoError> {
        let path = path.as_ref();
        let file = open_regular(path)?;
        let fingerprint = file.metadata().ok().map(|m| Fingerprint::from_meta(&m));
        // SAFETY: the map is read-only and the file is only ever replaced by renaming a new file
        // over it (documented at the top of this module), so the mapped pages never change or
        // shrink while this reader exists. Mapping shares the page cache between processes and
        // loads only the pages lookups touch, which is why the database is not read into memory.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| GeoError::open(path, format_args!("memory map error: {e}")))?;
        let reader = Reader::from_source(map).map_err(|e| GeoError::open(path, e))?;
        let db = GeoDb {
            reader,
            path: path.to_owned(),
            fingerprint,
            cache: RecordCache::new(),
        };
        db.probe()?;
        Ok(db)
    }

    /// Decodes the first records: any read error means a broken file, no country in any of them
    /// a database of another type.
    fn probe(&self) -> Result<(), GeoError> {
        let broken = |e: MaxMindDbError| GeoError::broken(&self.path, e);
        let networks = self
            .reader
            .networks(WithinOptions::default())
            .map_err(broken)?;
        for item in networks.take(PROBE_RECORDS) {
            let record = item
                .map_err(broken)?
                .decode::<CountryRecord>()
                .map_err(broken)?;
            if record.is_some_and(|r| r.has_code()) {
                return Ok(());
            }
        }
        Err(GeoError::WrongType {
            path: self.path.clone(),
            database_type: self.database_type().to_owned(),
        })
    }

    /// The file this database was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `database_type` from the metadata, e.g. `GeoLite2-Country`.
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// The country label of `ip`: special ranges first, then the database, `unknown` on a miss.
    pub fn country(&self, ip: IpAddr) -> Country {
        let ip = canonical(ip);
        Country::special(ip).unwrap_or_else(|| self.lookup_public(ip))
    }

    /// Database lookup of an address already canonical and not in a special range.
    fn lookup_public(&self, ip: IpAddr) -> Country {
        let found = match self.reader.lookup(ip) {
            Ok(found) => found,
            Err(e) => return lookup_failed(ip, e),
        };
        let Some(offset) = found.offset() else {
            return Country::UNKNOWN;
        };
        if let Some(country) = self.cache.get(offset) {
            return country;
        }
        match found.decode::<CountryRecord>() {
            Ok(record) => {
                let country = record.and_then(|r| r.country()).unwrap_or(Country::UNKNOWN);
                self.cache.put(offset, country);
                country
            }
            Err(e) => lookup_failed(ip, e),
        }
    }
}

/// Opens `path` for reading, refusing anything but a regular file: opening a FIFO would wait
/// for a writer forever, holding the start or a reload (and SIGTERM with it).
fn open_regular(path: &Path) -> Result<std::fs::File, GeoError> {
    crate::fs_util::open_regular(path).map_err(|e| GeoError::open(path, e))
}

fn lookup_failed(ip: IpAddr, error: MaxMindDbError) -> Country {
    tracing::debug!(%ip, %error, "geoip lookup failed");
    Country::UNKNOWN
}

/// Slots of [`RecordCache`]: 128 KiB per database.
const CACHE_SLOTS: usize = 1 << 14;

/// Decoded countries by data-record offset. Many networks share one record (a country database
/// has a few hundred distinct records), so most lookups skip decoding. Direct-mapped and
/// lock-free: a slot holds `(offset + 1) << 16 | country code`, 0 when empty; a collision just
/// overwrites. Records never change while their database is open.
struct RecordCache {
    slots: Box<[AtomicU64]>,
}

impl RecordCache {
    fn new() -> RecordCache {
        RecordCache {
            slots: (0..CACHE_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn slot(&self, offset: usize) -> &AtomicU64 {
        let hash = (offset as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        &self.slots[(hash >> (64 - CACHE_SLOTS.trailing_zeros())) as usize]
    }

    fn get(&self, offset: usize) -> Option<Country> {
        let value = self.slot(offset).load(Ordering::Relaxed);
        (value >> 16 == offset as u64 + 1)
            .then(|| Country::from_code(value as u16))
            .flatten()
    }

    fn put(&self, offset: usize, country: Country) {
        // Offsets are within the file, far below 2^48.
        let value = ((offset as u64 + 1) << 16) | u64::from(country.code());
        self.slot(offset).store(value, Ordering::Relaxed);
    }
}

/// The database every role shares: cheap to clone, lookups never block on a reload.
#[derive(Clone, Debug)]
pub struct SharedGeo {
    inner: Arc<Shared>,
    poll_interval: Duration,
}

#[derive(Debug)]
struct Shared {
    db: ArcSwapOption<GeoDb>,
    path: Option<PathBuf>,
    /// The file version last tried by `reload`, loaded or not, so a broken file is reported once.
    seen: Mutex<Option<Fingerprint>>,
    /// The outcome of the last load of the file, whatever started it: the start, the periodic
    /// check, SIGHUP.
    loads: ReloadOutcome,
}

impl SharedGeo {
    /// No database: special ranges are still labelled, everything else is `unknown`.
    pub fn disabled() -> SharedGeo {
        SharedGeo::from_parts(None, None)
    }

    /// Opens `path` (see [`GeoDb::open`]); the error is for a clear failure at start.
    pub fn open(path: impl AsRef<Path>) -> Result<SharedGeo, GeoError> {
        Ok(SharedGeo::from_db(GeoDb::open(path)?))
    }

    /// Shares an opened database; reloads read the file it was opened from.
    pub fn from_db(db: GeoDb) -> SharedGeo {
        let path = db.path.clone();
        SharedGeo::from_parts(Some(db), Some(path))
    }

    fn from_parts(db: Option<GeoDb>, path: Option<PathBuf>) -> SharedGeo {
        let seen = db.as_ref().and_then(|db| db.fingerprint);
        SharedGeo {
            inner: Arc::new(Shared {
                db: ArcSwapOption::new(db.map(Arc::new)),
                path,
                seen: Mutex::new(seen),
                loads: ReloadOutcome::successful_now(),
            }),
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }

    /// How often [`SharedGeo::watch`] looks at the file (default 10 s).
    pub fn with_poll_interval(mut self, interval: Duration) -> SharedGeo {
        self.poll_interval = interval;
        self
    }

    /// Registers `ferry_geoip_database_last_reload_successful` and
    /// `…_success_timestamp_seconds` in `registry` when a database file is configured. They follow
    /// every load of the file — the periodic check's as well as SIGHUP's — so a broken file
    /// from an updater shows without waiting for a reload.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        if self.inner.path.is_none() {
            return;
        }
        self.inner.loads.register(
            registry,
            "ferry_geoip_database",
            "Whether the last load of the geoip database file (at start, when the file changed, on SIGHUP) succeeded; 0: a new file was refused, or the file is gone, and the previous database stays in use",
            "Time the geoip database in use was loaded, in seconds since the Unix epoch",
        );
    }

    /// The database file, if one is configured.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// Whether a database is loaded.
    pub fn is_enabled(&self) -> bool {
        self.inner.db.load().is_some()
    }

    /// The database currently in use.
    pub fn current(&self) -> Option<Arc<GeoDb>> {
        self.inner.db.load_full()
    }

    /// The country label of `ip`; `unknown` for anything outside the special ranges when no
    /// database is loaded.
    pub fn lookup(&self, ip: IpAddr) -> Country {
        let ip = canonical(ip);
        if let Some(kind) = Country::special(ip) {
            return kind;
        }
        match &*self.inner.db.load() {
            Some(db) => db.lookup_public(ip),
            None => Country::UNKNOWN,
        }
    }

    /// Opens the file again and swaps it in; a broken file is logged and the database in use
    /// stays. Without a configured file this does nothing. Blocking: it maps and probes the file.
    pub fn reload(&self) -> Result<(), GeoError> {
        let Some(path) = &self.inner.path else {
            return Ok(());
        };
        let fingerprint = Fingerprint::of(path).ok();
        *self.lock_seen() = fingerprint;
        match GeoDb::open(path) {
            // Logged once in force: a reader of the log finds the metrics saying the same.
            Ok(db) => {
                let database_type = db.database_type().to_owned();
                self.inner.db.store(Some(Arc::new(db)));
                self.inner.loads.record(true);
                tracing::info!(path = %path.display(), database_type, "geoip database loaded");
                Ok(())
            }
            Err(e) => {
                // The previous database keeps labelling: degraded, not down.
                self.inner.loads.record(false);
                tracing::warn!(error = %e, "geoip database reload failed; keeping the previous one");
                Err(e)
            }
        }
    }

    fn lock_seen(&self) -> std::sync::MutexGuard<'_, Option<Fingerprint>> {
        // The guarded value is a plain fingerprint: a panic elsewhere cannot leave it half-written.
        self.inner.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the file differs from the version last loaded or tried.
    fn changed(&self) -> bool {
        let Some(path) = &self.inner.path else {
            return false;
        };
        match Fingerprint::of(path) {
            Ok(now) => *self.lock_seen() != Some(now),
            Err(e) => {
                self.gone(path, e);
                false
            }
        }
    }

    /// The file cannot be looked at (deleted, or its directory unreadable): the loaded database
    /// keeps labelling, but the next start would fail, so the gauge says 0 and the log says why,
    /// once. Forgetting the version seen makes whatever file appears next a change to load.
    fn gone(&self, path: &Path, error: std::io::Error) {
        if self.lock_seen().take().is_none() {
            return;
        }
        self.inner.loads.record(false);
        tracing::warn!(
            error = %GeoError::open(path, error),
            "geoip database file is gone; keeping the loaded database until a new file appears"
        );
    }

    /// Polls the file every poll interval and reloads it when its mtime, size or inode changed,
    /// until `shutdown`. Returns at once when no file is configured.
    pub async fn watch(self, shutdown: CancellationToken) {
        if self.inner.path.is_none() {
            return;
        }
        let mut ticks = tokio::time::interval(self.poll_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if self.changed() {
                let geo = self.clone();
                // The error is logged by `reload`; a panic while probing a hostile file is not
                // expected from the reader, but it would end only this one reload.
                let _ = tokio::task::spawn_blocking(move || geo.reload()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_codes_round_trip() {
        for a in b'A'..=b'Z' {
            for b in b'A'..=b'Z' {
                let country = Country(Repr::Iso([a, b]));
                assert_eq!(Country::from_code(country.code()), Some(country));
            }
        }
        assert_eq!(
            Country::from_code(Country::UNKNOWN.code()),
            Some(Country::UNKNOWN)
        );
        assert_eq!(Country::from_code(Country::PRIVATE.code()), None);
    }

    #[test]
    fn cache_hits_only_its_own_offset() {
        let cache = RecordCache::new();
        let gb = Country::iso("GB").unwrap();
        assert_eq!(cache.get(1234), None);
        cache.put(1234, gb);
        cache.put(0, Country::UNKNOWN);
        assert_eq!(cache.get(1234), Some(gb));
        assert_eq!(cache.get(0), Some(Country::UNKNOWN));
        assert_eq!(cache.get(1234 + CACHE_SLOTS), None);
    }
}
