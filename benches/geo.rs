//! Geo lookup and host connection collector benchmark (`cargo bench --bench geo`).
//!
//! 1. Country lookups per second on one core, random public IPv4 addresses, against MaxMind's
//!    GeoLite2-City-Test.mmdb (shared/data/geo) and a City-like database of 100,000 networks
//!    written here with mmdb-writer. Target: ≥ 2 million lookups/s.
//! 2. Collector wall time per scrape (netlink and /proc, plus the whole prometheus-client
//!    exposition) with 1,000 and 10,000 extra sockets opened on loopback by the benchmark
//!    (connection pairs, both ends held). Target: ≤ 30 ms per scrape at 10,000 sockets.
//!
//! Every figure is the median of several runs.

use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry::telemetry::connections::{ConnectionCollector, Source};
use ferry::telemetry::encode_registry;
use ferry::telemetry::geo::{Country, GeoDb, SharedGeo};
use mmdb_writer::Writer;
use prometheus_client::registry::Registry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const GEO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/geo");
const LOOKUPS: usize = 1_000_000;
const LOOKUP_RUNS: usize = 7;
const SCRAPE_RUNS: usize = 9;
const BIG_NETWORKS: u32 = 100_000;
const CODES: &[&str] = &[
    "US", "DE", "GB", "FR", "JP", "CN", "BR", "IN", "RU", "CA", "AU", "NL", "SE", "IT", "ES", "PL",
    "KR", "MX", "ZA", "NG", "AR", "CH", "AT", "BE", "NO", "FI", "DK", "IE", "PT", "CZ", "UA", "TR",
];

fn main() {
    println!("# ferry geo benchmark\n");
    lookups();
    scrapes();
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Random IPv4 addresses outside the special ranges (those never reach the database).
fn public_addresses(rng: &mut StdRng, count: usize) -> Vec<IpAddr> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let ip = IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()));
        if Country::special(ip).is_none() {
            out.push(ip);
        }
    }
    out
}

/// A City-like database: `networks` random /16–/24 networks with full MaxMind records, either
/// shared by all networks of a country (as in a Country database) or one per network (`distinct`,
/// as cities: the decoded-record cache then rarely helps).
fn big_database(rng: &mut StdRng, networks: u32, distinct: bool) -> (Vec<u8>, Vec<Ipv4Addr>) {
    let mut writer = Writer::new("Bench-City");
    let mut inserted = Vec::new();
    for _ in 0..networks {
        let prefix = rng.random_range(16..=24u8);
        let addr = Ipv4Addr::from(rng.random::<u32>() & (u32::MAX << (32 - prefix)));
        if Country::special(IpAddr::V4(addr)).is_some() {
            continue;
        }
        let code = CODES[rng.random_range(0..CODES.len())];
        let geoname_id = if distinct { inserted.len() as u64 } else { 0 };
        let record = json!({
            "city": { "geoname_id": geoname_id, "names": { "en": "Benchtown", "de": "Benchstadt" } },
            "continent": { "code": "EU", "names": { "en": "Europe" } },
            "country": { "iso_code": code, "names": { "en": code } },
            "location": { "time_zone": "Europe/Berlin" },
            "registered_country": { "iso_code": code, "names": { "en": code } },
        });
        let net = ipnet::Ipv4Net::new(addr, prefix).expect("prefix ≤ 32");
        writer.insert(net, &record).expect("insert");
        inserted.push(addr);
    }
    (writer.to_bytes().expect("write database"), inserted)
}

/// Lookups per second (median of runs) and the share of ISO-code hits.
fn measure(addrs: &[IpAddr], lookup: impl Fn(IpAddr) -> Country) -> (f64, f64) {
    let mut rates = Vec::new();
    let mut hits = 0;
    for _ in 0..LOOKUP_RUNS {
        hits = 0;
        let start = Instant::now();
        for &ip in addrs {
            if std::hint::black_box(lookup(ip)).is_iso() {
                hits += 1;
            }
        }
        rates.push(addrs.len() as f64 / start.elapsed().as_secs_f64());
    }
    (median(rates), hits as f64 / addrs.len() as f64)
}

fn report(name: &str, (rate, hits): (f64, f64)) {
    let verdict = if rate >= 2e6 { "ok" } else { "BELOW TARGET" };
    println!(
        "| {name} | {:.2} M/s | {:.0} % | {verdict} |",
        rate / 1e6,
        hits * 100.0
    );
}

fn lookups() {
    let mut rng = StdRng::seed_from_u64(0x9e0);
    let random = public_addresses(&mut rng, LOOKUPS);

    println!("## Lookups on one core ({LOOKUPS} random public IPv4 addresses, median of {LOOKUP_RUNS} runs; target ≥ 2 M/s)\n");
    println!("| database, API | lookups/s | hits | verdict |");
    println!("|---|---|---|---|");

    let city = Path::new(GEO_DIR).join("GeoLite2-City-Test.mmdb");
    let db = GeoDb::open(&city).expect("open GeoLite2-City-Test.mmdb");
    report(
        "GeoLite2-City-Test, GeoDb::country",
        measure(&random, |ip| db.country(ip)),
    );
    let shared = SharedGeo::from_db(db);
    report(
        "GeoLite2-City-Test, SharedGeo::lookup",
        measure(&random, |ip| shared.lookup(ip)),
    );

    let dir = tempfile::TempDir::new().expect("temp dir");
    for distinct in [false, true] {
        let (bytes, inserted) = big_database(&mut rng, BIG_NETWORKS, distinct);
        let path = dir.path().join(format!("bench-{distinct}.mmdb"));
        std::fs::write(&path, &bytes).expect("write database");
        let big = SharedGeo::open(&path).expect("open generated database");
        let name = format!(
            "generated, {} networks, {}, {:.1} MB",
            inserted.len(),
            if distinct {
                "one record each"
            } else {
                "records shared per country"
            },
            bytes.len() as f64 / 1e6
        );
        report(
            &format!("{name}, random"),
            measure(&random, |ip| big.lookup(ip)),
        );
        // Addresses inside inserted networks: every lookup finds a record.
        let hits: Vec<IpAddr> = (0..LOOKUPS)
            .map(|_| {
                let base = u32::from(inserted[rng.random_range(0..inserted.len())]);
                IpAddr::V4(Ipv4Addr::from(base | rng.random_range(0..256u32)))
            })
            .collect();
        report(
            &format!("{name}, all hits"),
            measure(&hits, |ip| big.lookup(ip)),
        );
    }
    println!();
}

/// Raises the open-file limit to what `sockets` loopback sockets need.
fn raise_nofile(sockets: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let want = (sockets as u64 + 512).min(limit.maximum.unwrap_or(u64::MAX));
    if limit.current.is_some_and(|c| c < want) {
        let new = Rlimit {
            current: Some(want),
            maximum: limit.maximum,
        };
        setrlimit(Resource::Nofile, new).expect("raise RLIMIT_NOFILE");
    }
}

/// Loopback connection pairs (both ends held: two sockets each) accepted by one listener.
struct Load {
    listener: TcpListener,
    streams: Vec<TcpStream>,
}

impl Load {
    fn grow_to(&mut self, sockets: usize) {
        let addr = self.listener.local_addr().expect("listener address");
        while self.streams.len() < sockets {
            let client = TcpStream::connect(addr).expect("connect (RLIMIT_NOFILE or ports?)");
            let (server, _) = self.listener.accept().expect("accept");
            self.streams.push(client);
            self.streams.push(server);
        }
    }
}

/// Median wall time of `f` in milliseconds.
fn scrape_ms(f: impl Fn() -> usize) -> f64 {
    let times = (0..SCRAPE_RUNS)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(times)
}

fn scrapes() {
    raise_nofile(10_000);
    let geo = SharedGeo::open(Path::new(GEO_DIR).join("GeoLite2-City-Test.mmdb")).expect("geo");
    let netlink = ConnectionCollector::new(geo.clone(), vec![]).with_source(Source::Netlink);
    let procfs = ConnectionCollector::new(geo.clone(), vec![]).with_source(Source::Procfs);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ConnectionCollector::new(geo, vec![])));

    println!("## Collector wall time per scrape (median of {SCRAPE_RUNS}; target ≤ 30 ms at 10,000 sockets)\n");
    println!("| extra loopback sockets | sockets read | netlink collect | /proc collect | full exposition (netlink) | verdict |");
    println!("|---|---|---|---|---|---|");
    let mut load = Load {
        listener: TcpListener::bind("127.0.0.1:0").expect("bind"),
        streams: Vec::new(),
    };
    for sockets in [0, 1_000, 10_000] {
        load.grow_to(sockets);
        std::thread::sleep(Duration::from_millis(100));
        let seen = netlink.sockets().map(|s| s.len()).unwrap_or(0);
        let nl = scrape_ms(|| netlink.collect().expect("netlink").connections.len());
        let proc = scrape_ms(|| procfs.collect().expect("/proc").connections.len());
        let expo = scrape_ms(|| encode_registry(&registry).len());
        let verdict = if sockets < 10_000 || expo <= 30.0 {
            "ok"
        } else {
            "ABOVE TARGET"
        };
        println!("| {sockets} | {seen} | {nl:.2} ms | {proc:.2} ms | {expo:.2} ms | {verdict} |");
    }
    println!();
}
