//! `relay_abuse`: what hostile clients cost a real `stratus-relay` process (issue 15). See
//! docs/benchmarks.md for results.
//!
//! A set of well-behaved devices (each its own account and notes chat) append a sealed delta at
//! a steady rate through the whole run and time each append's `Acked`. After a quiet baseline,
//! each flood case runs in turn against the relay's default limits (only the account quota is
//! set lower, `--quota-mib`, so that the storage flood reaches it in seconds):
//!
//! - (a) key-epoch churn: two accounts loop, over several groups of the two, leave → new epoch
//!   → add → new epoch;
//! - (b) storage: one account appends 64 KiB deltas at full rate until its quota refuses them
//!   or the flood's time is up (run last, so that the others start from a small store); the
//!   relay's per-account byte rate paces it (`--append-bytes-per-second 0` shows it without);
//! - (c) strangers: accounts create groups naming victim accounts (the well-behaved ones and
//!   more) that accepted none of them, and invite them;
//! - (d) typing: an account in a group with every well-behaved account floods `Typing`;
//! - (e) unregistered peers flood malformed frames, recovery lookups and link waits, with fresh
//!   identities whenever the relay closes them.
//!
//! For each case: the relay's RSS (VmRSS, sampled every 100 ms: before, peak, at the flood's
//! middle and end, and 2 s after), what it wrote to the disk (/proc/PID/io `write_bytes`) and
//! the size of its store directory, and the well-behaved devices' append p99 during the flood
//! against the baseline's.
//!
//! ```sh
//! cargo build --release -p stratus-tests -p stratus-relay --bins
//! target/release/relay_abuse [--quick] [--seed N] [--runs N] [--flood-secs N] [--dir PATH]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use stratus_engine::libp2p::identity::Keypair;
use stratus_engine::net::Net;
use stratus_engine::proto::cert::{AccountKeys, AccountPublic};
use stratus_engine::proto::crypto::{wrap_chat_key, ChatKey};
use stratus_engine::proto::directory::{KeyTerms, MemberChangeBody, Membership};
use stratus_engine::proto::wire::{
    ChatKind, ClientFrame, ErrorCode, NewEpoch, RelayFrame, ReqId, WrappedKey, MAX_DELTA_BYTES, PROTOCOL_VERSION,
};
use stratus_engine::{AccountId, ChatId, ClientSeq, Epoch};
use stratus_tests::bench_relay::*;
use stratus_tests::bench_sys::{filesystem_of, loadavg, machine, read};

mod floods;
mod good;
mod peers;
mod report;

use floods::*;
use good::*;
use report::*;

#[derive(Parser)]
#[command(about = "What hostile clients cost a real stratus-relay process (issue 15)")]
struct Config {
    /// Replays a run (account keys, chat ids, payloads); libp2p identities are always fresh.
    #[arg(long)]
    seed: Option<u64>,
    /// Relay processes, one after another, each running every case.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Well-behaved devices.
    #[arg(long, default_value_t = 8)]
    good: usize,
    /// Appends per second of each well-behaved device.
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// The quiet baseline's length.
    #[arg(long, default_value_t = 10)]
    quiet_secs: u64,
    /// Each flood's length (the storage flood stops earlier, 2 s after its quota refuses it).
    #[arg(long, default_value_t = 20)]
    flood_secs: u64,
    /// The relay's per-account quota, MiB (`--max-account-bytes`; its default is 1 GiB).
    #[arg(long, default_value_t = 256)]
    quota_mib: u64,
    /// Where the relay's data directory is made (not tmpfs).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// One short run: 3 s quiet, 6 s floods, a 32 MiB quota.
    #[arg(long)]
    quick: bool,
    /// The cases to run, by letter (e.g. `--cases be`); all by default.
    #[arg(long, default_value = "abcde")]
    cases: String,
    /// Keeps the data directories.
    #[arg(long)]
    keep: bool,
    /// The relay's `--append-bytes-per-second` (its default when not given; 0 turns the
    /// per-account byte rate off, as it was before it existed).
    #[arg(long)]
    append_bytes_per_second: Option<u64>,
}

/// What one case cost, in one run.
struct CaseResult {
    name: &'static str,
    what: String,
    secs: f64,
    /// RSS, KiB: before, peak during, at the flood's middle, at its end, 2 s after.
    rss: [u64; 5],
    /// Bytes written to the disk from the case's start to 2 s after its flood, and over how
    /// many seconds (its setup, the flood and the 2 s).
    written: u64,
    written_secs: f64,
    store_before: u64,
    store_after: u64,
    /// The well-behaved devices' append latencies during the flood, sorted.
    good: Vec<Duration>,
    typing: u64,
}

/// The quiet phase: the well-behaved devices alone.
struct Baseline {
    /// Their append latencies, sorted.
    good: Vec<Duration>,
    /// The relay's disk writes, bytes/s.
    write_rate: f64,
    /// The relay's RSS at its end, KiB.
    rss: u64,
}

struct RunResult {
    seed: u64,
    baseline: Baseline,
    cases: Vec<CaseResult>,
    refused: u64,
    cut_off: u64,
    alive: bool,
}

fn main() {
    let mut cfg = Config::parse();
    if cfg.quick {
        (cfg.runs, cfg.quiet_secs, cfg.flood_secs, cfg.quota_mib) = (1, 3, 6, 32);
    }
    let seed = cfg.seed.unwrap_or_else(rand::random);
    println!("# relay_abuse{}", if cfg.quick { " --quick" } else { "" });
    println!("seed: {seed} (replay with --seed {seed})");
    println!("machine: {}", machine());
    println!("load average at start: {}", loadavg());
    let exe = std::env::current_exe().expect("own path");
    let relay_exe = exe.parent().expect("a directory").join("stratus-relay");
    assert!(relay_exe.exists(), "{} not found; build it with `cargo build -p stratus-relay`", relay_exe.display());
    let dir = cfg.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&dir).expect("--dir exists or can be made");
    println!(
        "{} well-behaved devices × {} appends/s; {} s quiet baseline, {} s per flood; quota {} MiB per account; \
         append byte rate {}",
        cfg.good,
        cfg.rate,
        cfg.quiet_secs,
        cfg.flood_secs,
        cfg.quota_mib,
        cfg.append_bytes_per_second.map_or("the relay's default".into(), |r| format!("{r} bytes/s"))
    );
    let mut seeds = StdRng::seed_from_u64(seed);
    let mut runs = Vec::new();
    for r in 0..cfg.runs {
        let run_seed = seeds.next_u64();
        let tmp = tempfile::Builder::new().prefix("relay-abuse-").tempdir_in(&dir).expect("temporary directory");
        let (_, fstype, source, _) = filesystem_of(tmp.path());
        assert!(!matches!(fstype.as_str(), "tmpfs" | "ramfs"), "the data dir must be on a disk; pass --dir");
        println!();
        println!("## run {} of {} (run seed {run_seed}), data on {fstype} {source}", r + 1, cfg.runs);
        let result = run(&cfg, &relay_exe, tmp.path(), run_seed);
        print_run(&result);
        runs.push(result);
        if cfg.keep {
            println!("kept {}", tmp.keep().display());
        }
    }
    print_summary(&runs);
    println!();
    println!("load average at end: {}", loadavg());
}

/// One relay process through the baseline and every case.
fn run(cfg: &Config, relay_exe: &Path, work: &Path, seed: u64) -> RunResult {
    let data = work.join("relay");
    let quota = (cfg.quota_mib * 1024 * 1024).to_string();
    let rate = cfg.append_bytes_per_second.map(|r| r.to_string());
    let mut args = vec!["--max-account-bytes", &quota];
    if let Some(r) = &rate {
        args.extend(["--append-bytes-per-second", r]);
    }
    let mut relay = RelayProc::start(relay_exe, &data, &work.join("relay.log"), &args);
    let pid = relay.pid;
    let sampler = RssSampler::start(pid);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut rng = StdRng::seed_from_u64(seed);
    let flood = Duration::from_secs(cfg.flood_secs);
    let addr = relay.addr.clone();
    let (baseline, cases, log) = rt.block_on(async {
        // The well-behaved accounts, which all accept the typing flooder (a member of a group
        // with them, as a contact would be), and 32 more victims for the strangers.
        let mut goods = Vec::new();
        for i in 0..cfg.good {
            goods.push(Writer::create(addr.clone(), rng.next_u64(), format!("good-{i}")).await);
        }
        let mut typist = Writer::create(addr.clone(), rng.next_u64(), "typist".into()).await;
        let mut victims: Vec<AccountPublic> = goods.iter().map(|g| g.keys.public()).collect();
        for g in goods.iter_mut() {
            accept(g, typist.account()).await;
        }
        let typing_chat = create_group(&mut typist, &victims).await;
        for i in 0..32 {
            victims.push(Writer::create(addr.clone(), rng.next_u64(), format!("victim-{i}")).await.keys.public());
        }

        let log = Arc::new(GoodLog::default());
        let stop = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_secs_f64(1.0 / cfg.rate as f64);
        let tasks: Vec<_> =
            goods.into_iter().map(|g| tokio::spawn(steady(g, interval, log.clone(), stop.clone()))).collect();
        let (q0, written0) = (Instant::now(), write_bytes(pid));
        tokio::time::sleep(Duration::from_secs(cfg.quiet_secs)).await;
        let baseline = Baseline {
            good: log.between(q0, Instant::now()),
            write_rate: write_bytes(pid).saturating_sub(written0) as f64 / q0.elapsed().as_secs_f64(),
            rss: rss_kib(pid),
        };
        eprintln!("  baseline: {} appends, p99 {:.2} ms", baseline.good.len(), ms(pct(&baseline.good, 99.0)));

        let mut cases = Vec::new();
        for name in CASES.into_iter().filter(|c| cfg.cases.contains(&c[..1])) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (rss0, written0, store0) = (rss_kib(pid), write_bytes(pid), dir_bytes(&data));
            let w0 = Instant::now();
            let typing0 = log.typing.load(Ordering::Relaxed);
            let f = match name {
                "a churn" => churn(&addr, rng.next_u64(), 8, flood).await,
                "b storage" => storage(&addr, rng.next_u64(), flood * 6).await,
                "c strangers" => strangers(&addr, rng.next_u64(), 4, victims.clone(), flood).await,
                "d typing" => typing(&mut typist, typing_chat, flood).await,
                "e unregistered" => peers::unregistered(&addr, rng.next_u64(), 8, flood).await,
                _ => unreachable!("the cases are listed in CASES"),
            };
            let mid = f.start + (f.end - f.start) / 2;
            let (rss_mid, rss_end) = (sampler.peak(mid, mid + Duration::from_millis(150)), rss_kib(pid));
            tokio::time::sleep(Duration::from_secs(2)).await;
            let result = CaseResult {
                name,
                what: f.what,
                secs: (f.end - f.start).as_secs_f64(),
                rss: [rss0, sampler.peak(f.start, Instant::now()), rss_mid, rss_end, rss_kib(pid)],
                written: write_bytes(pid).saturating_sub(written0),
                written_secs: w0.elapsed().as_secs_f64(),
                store_before: store0,
                store_after: dir_bytes(&data),
                good: log.between(f.start, f.end),
                typing: log.typing.load(Ordering::Relaxed) - typing0,
            };
            eprintln!(
                "  {name}: {:.0} s, good p99 {:.2} ms, peak RSS {:.1} MiB",
                result.secs,
                ms(pct(&result.good, 99.0)),
                mib(result.rss[1] * 1024)
            );
            cases.push(result);
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(STALL, t).await;
        }
        (baseline, cases, log)
    });
    drop(rt);
    drop(sampler);
    let alive = relay.alive();
    relay.stop();
    let warnings: Vec<String> = std::fs::read_to_string(&relay.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(str::to_string)
        .collect();
    if !warnings.is_empty() {
        println!("relay log: {} warnings/errors; the first 3:", warnings.len());
        for w in warnings.iter().take(3) {
            println!("  {}", w.chars().take(300).collect::<String>());
        }
    }
    RunResult {
        seed,
        baseline,
        cases,
        refused: log.refused.load(Ordering::Relaxed),
        cut_off: log.cut_off.load(Ordering::Relaxed),
        alive,
    }
}

/// The cases in the order they run: the storage flood last, so that the others start from a
/// small store and the page cache it fills does not count for them.
const CASES: [&str; 5] = ["a churn", "c strangers", "d typing", "e unregistered", "b storage"];
