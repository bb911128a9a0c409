//! How many glibc malloc arenas a process without the egress role may use: one per four cores
//! instead of glibc's eight per core.
//!
//! glibc gives each thread that allocates while the others hold their arenas an arena of its
//! own, up to eight per core. A gateway's tunnels are allocated for and freed on whichever
//! worker thread polls them, and with an arena per worker each arena keeps its own partly used
//! pages: with 1,000 idle agents on two cores the gateway held about 1.4 KiB more per agent
//! than with its workers sharing one arena, and its CPU per scrape was the same either way
//! (docs/benchmarks.md, session 14). Allocations of up to about 1 KiB come from the thread's
//! own cache without the arena's lock, so a few threads share an arena at little cost; four
//! per arena bounds the contention on machines with many cores.
//!
//! Egress keeps glibc's default: its workers allocate and free whole request bodies (hundreds
//! of KiB) side by side, and sharing one arena cost about 10 % more CPU per JSON-validated
//! request in the same measurement.
//!
//! The operator's own setting wins: `MALLOC_ARENA_MAX` or `glibc.malloc.arena_max` in
//! `GLIBC_TUNABLES` leave glibc as configured. Only the binary does this: an application
//! embedding the library keeps its allocator as it set it up.

/// Cores that share one arena.
const CORES_PER_ARENA: usize = 4;

/// The arena limit for a machine with `cores` cores.
fn arenas_for(cores: usize) -> usize {
    cores.div_ceil(CORES_PER_ARENA).max(1)
}

/// Whether the environment sets glibc's arena limit already.
fn set_by_operator(malloc_arena_max: Option<&str>, glibc_tunables: Option<&str>) -> bool {
    malloc_arena_max.is_some()
        || glibc_tunables.is_some_and(|t| {
            t.split(':')
                .any(|setting| setting.trim_start().starts_with("glibc.malloc.arena_max="))
        })
}

/// Whether the configuration file at `path` has an `egress` section: read ahead of the real
/// load, for this choice only, because the runtime's threads start before the load. A file
/// that cannot be read or parsed counts as one: glibc's default stays, and the load reports
/// the problem.
pub(super) fn file_runs_egress(path: &std::path::Path) -> bool {
    let Ok(text) = crate::fs_util::read_regular_to_string(path) else {
        return true;
    };
    serde_yaml_ng::from_str::<serde_yaml_ng::Mapping>(&text)
        .map_or(true, |top| top.contains_key("egress"))
}

/// Sets the arena limit, unless the environment does. Call before any other thread starts:
/// a thread's arena is chosen at its first allocation.
pub(super) fn limit() {
    let var = |name| std::env::var(name).ok();
    if set_by_operator(
        var("MALLOC_ARENA_MAX").as_deref(),
        var("GLIBC_TUNABLES").as_deref(),
    ) {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = i32::try_from(arenas_for(cores)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets a parameter of the allocator, under glibc's own lock. A refusal
    // (0) leaves glibc's default, which is correct too.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_arena_serves_up_to_four_cores() {
        assert_eq!(arenas_for(0), 1);
        assert_eq!(arenas_for(1), 1);
        assert_eq!(arenas_for(2), 1);
        assert_eq!(arenas_for(4), 1);
        assert_eq!(arenas_for(5), 2);
        assert_eq!(arenas_for(64), 16);
    }

    #[test]
    fn only_a_file_that_surely_runs_no_egress_gets_fewer_arenas() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let gateway = file("gw.yaml", "gateway:\n  web:\n    listen_address: ':8080'\n");
        let egress = file("eg.yaml", "log:\n  level: info\negress:\n  rules: []\n");
        let broken = file("broken.yaml", "gateway: [\n");
        assert!(!file_runs_egress(&gateway));
        assert!(file_runs_egress(&egress));
        assert!(file_runs_egress(&broken));
        assert!(file_runs_egress(&dir.path().join("missing.yaml")));
        assert!(file_runs_egress(dir.path()));
    }

    #[test]
    fn the_operators_setting_wins() {
        assert!(!set_by_operator(None, None));
        assert!(set_by_operator(Some("4"), None));
        assert!(set_by_operator(None, Some("glibc.malloc.arena_max=8")));
        assert!(set_by_operator(
            None,
            Some("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=2")
        ));
        assert!(!set_by_operator(
            None,
            Some("glibc.malloc.mmap_threshold=16384")
        ));
    }
}
