//! The deterministic simulator (tests/src/sim): many seeds, each a whole world of accounts,
//! devices and a relay under faults, checked against the invariants listed in the module docs.
//!
//! * `SEED=n` runs that one seed (a failure prints the line to replay it).
//! * `STRATUS_SIM_SEEDS=n` runs n seeds (default 200) from `STRATUS_SIM_BASE` (default random,
//!   printed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use stratus_tests::sim::{Config, Failure, Report, Sim};

fn run_seed(seed: u64) -> Result<Report, Failure> {
    Sim::new(Config::from_seed(seed))?.run()
}

/// Seeds that once failed, each with what it found; they run in every default run.
const REGRESSIONS: &[(u64, &str)] = &[
    (
        3_194_430_904_402_104_906,
        "a stream that died silently right after it opened left the session waiting for the \
         relay's hello for good",
    ),
    (
        15_754_995_062_316_867_484,
        "a power loss kept a rotation's new key generation but not the account cursor before it; \
         the rotation then failed its check when applied again",
    ),
    (
        8_285_807_922_849_056_994,
        "a power loss took back the account cursor past a member change the chat had taken; \
         applied again, the change was refused as made for another state of the chat",
    ),
];

#[test]
fn seeds_that_once_failed_pass() {
    for (seed, what) in REGRESSIONS {
        if let Err(f) = run_seed(*seed) {
            panic!("regression ({what}):\n{f}");
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name} must be a u64")))
}

#[test]
fn simulated_worlds_keep_every_invariant() {
    let seeds: Vec<u64> = match env_u64("SEED") {
        Some(seed) => vec![seed],
        None => {
            let n = env_u64("STRATUS_SIM_SEEDS").unwrap_or(200);
            let base = env_u64("STRATUS_SIM_BASE").unwrap_or_else(rand::random);
            eprintln!("simulating {n} seeds from {base} (replay the batch with STRATUS_SIM_BASE={base} STRATUS_SIM_SEEDS={n})");
            (0..n).map(|i| base.wrapping_add(i)).collect()
        }
    };
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let reports = Mutex::new(Vec::new());
    let failures = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(&seed) = seeds.get(i) else { return };
                match run_seed(seed) {
                    Ok(r) => reports.lock().unwrap().push(r),
                    Err(f) => {
                        eprintln!("{f}");
                        failures.lock().unwrap().push(f.seed);
                    }
                }
            });
        }
    });
    let reports = reports.into_inner().unwrap();
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    eprintln!(
        "{} seeds in {:.1} s: {} events, {} messages, {} acks, {} relay crashes, {} device restarts, \
         {} broken connections, {} lost frames, {} rate-limit waits, {} revocations with rotation, \
         {} member changes, {} stale-epoch refusals, {} key waits, {} silent stream deaths, {} watchdog \
         closes, {} burst messages, {} device crashes losing {} applied deltas, {} behind, {} streams cut off; \
         slowest convergence {:.1} s after faults",
        reports.len(),
        started.elapsed().as_secs_f64(),
        sum(|r| r.events),
        sum(|r| r.messages as u64),
        sum(|r| r.acked as u64),
        sum(|r| r.relay_crashes as u64),
        sum(|r| r.device_restarts as u64),
        sum(|r| r.broken_connections as u64),
        sum(|r| r.lost_frames as u64),
        sum(|r| r.rate_limited as u64),
        sum(|r| r.revocations as u64),
        sum(|r| r.member_changes as u64),
        sum(|r| r.stale_epochs as u64),
        sum(|r| r.key_waits as u64),
        sum(|r| r.silent_drops as u64),
        sum(|r| r.watchdog_closes as u64),
        sum(|r| r.burst_messages as u64),
        sum(|r| r.device_crashes as u64),
        sum(|r| r.lost_applies as u64),
        sum(|r| r.behind as u64),
        sum(|r| r.cut_off as u64),
        reports.iter().map(|r| r.converged_after).max().unwrap_or(0) as f64 / 1e6,
    );
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "seeds failed: {failures:?} (replay each with SEED=…)");
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    let seed = stratus_tests::seed();
    let a = run_seed(seed).unwrap_or_else(|f| panic!("{f}"));
    let b = run_seed(seed).unwrap_or_else(|f| panic!("{f}"));
    assert!(a.messages > 0, "a world does something: {a:?}");
    assert_eq!(a.trace_hash, b.trace_hash, "seed {seed} ran two different traces");
    assert_eq!(a.events, b.events);
}

/// The simulator's in-memory relay store must answer like the real sled store, or the
/// simulator would test a relay that does not exist.
#[test]
fn memstore_matches_sledstore() {
    let seed = stratus_tests::seed();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = Config::from_seed(seed);
    cfg.relay_crash_every = None;
    cfg.failing_barrier = 0.0;
    let report = Sim::with_sled_mirror(cfg, dir.path()).and_then(Sim::run).unwrap_or_else(|f| panic!("{f}"));
    assert!(report.acked > 0, "{report:?}");
}
