//! `relay_bench`: what a real `stratus-relay` process sustains, against the fsync barrier of
//! the same filesystem, measured in one invocation. See docs/benchmarks.md for results.
//!
//! 1. Durable appends/s: N writer devices (64), each its own libp2p identity, account and notes
//!    chat, each keeping up to W appends (16, then 1) in flight on its one sync stream. An append
//!    counts when its `Acked` arrives, and the relay acks only after an fsync barrier.
//! 2. The fsync barrier alone: a loop of (write 4 KiB, `fdatasync`) on the relay's filesystem,
//!    its latency percentiles and rate; and the fsync-bound ceiling = barriers/s × the mean
//!    group-commit batch the relay achieved (its `fdatasync` calls are counted from outside with
//!    `perf stat -p`; without perf the batch is estimated and reported as an estimate).
//! 3. Append → push latency: device A appends at a paced rate, device B of the same account
//!    (linked through the raw `LinkWait`/`LinkLookup`/`LinkApprove` flow) times each `Push`.
//!
//! `relay_bench ops` measures the operator's targets instead (idle devices' memory, `/metrics`,
//! backup under load): see `ops.rs`.
//!
//! Only the raw protocol: no Automerge, no device store, no device-side fsync. Payloads are real
//! sealed deltas (`seal_delta`, 160-byte plaintext → 200 sealed bytes). Only 127.0.0.1.
//!
//! ```sh
//! cargo build --release -p stratus-tests -p stratus-relay --bins
//! target/release/relay_bench [--quick] [--seed N] [--dir PATH] [--runs N] [--per-device N]
//!                            [--devices N] [--no-perf] [--fsync-times] [--keep]
//! ```
//!
//! `--fsync-times` also records the relay's own fdatasync calls (`perf record` of their entry
//! and exit) to time them. It is off by default: following the relay's short-lived sled IO
//! threads costs `perf record` more than a core here, which halves the relay's throughput.
//!
//! The relay binary is taken from next to this executable (`target/release/stratus-relay`).
//! Its data directory is a fresh temporary directory under `--dir` (default: the system temp
//! directory); the filesystem it lives on is printed, and tmpfs is refused. The relay logs at
//! `stratus_relay=info` (nothing per append) unless `BENCH_RELAY_LOG` gives another filter.
//!
//! A sync stream that the relay closes before answering `Hello` is opened again and counted:
//! libp2p-stream drops inbound streams while its accept channel is full, which a burst of 64
//! devices connecting at once triggers (see docs/benchmarks.md).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use stratus_engine::libp2p::identity::Keypair;
use stratus_engine::proto::cert::{AccountKeys, DeviceCertBody};
use stratus_engine::proto::crypto::{open_box, open_delta, seal_box, unwrap_chat_key, ChatKey};
use stratus_engine::proto::wire::{AccountEvent, ClientFrame, RelayFrame, ReqId};
use stratus_engine::{ChatId, DeviceId};
use stratus_tests::bench_relay::*;
use stratus_tests::bench_sys::{clk_tck, cpu_secs, filesystem_of, loadavg, machine};
use x25519_dalek::{PublicKey, StaticSecret};

/// Bytes written per iteration of the fsync loop.
const BARRIER_WRITE: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Configuration

struct Config {
    quick: bool,
    seed: u64,
    dir: PathBuf,
    runs: usize,
    devices: usize,
    window: usize,
    per_device: usize,
    warmup_per_device: usize,
    barrier_samples: usize,
    push_secs: u64,
    push_rate: u64,
    perf: bool,
    fsync_times: bool,
    keep: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: relay_bench [--quick] [--seed N] [--dir PATH] [--runs N] [--per-device N] [--devices N] \
         [--no-perf] [--fsync-times] [--keep]"
    );
    std::process::exit(2);
}

fn parse_args() -> Config {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut c = Config {
        quick,
        seed: rand::random(),
        dir: std::env::temp_dir(),
        runs: if quick { 3 } else { 5 },
        devices: 64,
        window: 16,
        per_device: if quick { 100 } else { 500 },
        warmup_per_device: if quick { 20 } else { 100 },
        barrier_samples: if quick { 500 } else { 3000 },
        push_secs: if quick { 2 } else { 10 },
        push_rate: 1000,
        perf: true,
        fsync_times: false,
        keep: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage()).clone();
        match a.as_str() {
            "--quick" => {}
            "--seed" => c.seed = value().parse().unwrap_or_else(|_| usage()),
            "--dir" => c.dir = PathBuf::from(value()),
            "--runs" => c.runs = value().parse().unwrap_or_else(|_| usage()),
            "--per-device" => c.per_device = value().parse().unwrap_or_else(|_| usage()),
            "--devices" => c.devices = value().parse().unwrap_or_else(|_| usage()),
            "--no-perf" => c.perf = false,
            "--fsync-times" => c.fsync_times = true,
            "--keep" => c.keep = true,
            _ => usage(),
        }
    }
    if c.runs == 0 || c.devices == 0 || c.per_device == 0 {
        usage();
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Small statistics helpers

mod client;
mod latency;
mod ops;
mod ops_backup;
mod ops_delete;
mod report;
mod system;

use client::*;
use latency::*;
use report::*;
use system::*;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("ops") {
        return ops::main();
    }
    let cfg = parse_args();
    let invocation = Instant::now();
    println!("# relay_bench{}", if cfg.quick { " --quick" } else { "" });
    println!("seed: {} (replay with --seed {})", cfg.seed, cfg.seed);
    println!(
        "  (the seed drives account keys, chat ids and keys, payloads and link secrets; libp2p identities \
         come from Keypair::generate_ed25519, i.e. OS entropy)"
    );
    println!("machine: {}", machine());
    println!("load average at start: {}", loadavg());

    let exe = std::env::current_exe().expect("own path");
    let relay_exe = exe.parent().expect("a directory").join("stratus-relay");
    assert!(
        relay_exe.exists(),
        "{} not found; build it with `cargo build --release -p stratus-relay -p stratus-tests --bins`",
        relay_exe.display()
    );
    std::fs::create_dir_all(&cfg.dir).expect("--dir exists or can be created");
    let tmp = tempfile::Builder::new().prefix("relay-bench-").tempdir_in(&cfg.dir).expect("temporary directory");
    let work = tmp.path().to_path_buf();
    let (mount, fstype, source, opts) = filesystem_of(&work);
    println!("data dir: {} on {fstype} {source} (mounted at {mount}, {opts})", work.display());
    assert!(
        !matches!(fstype.as_str(), "tmpfs" | "ramfs" | "?"),
        "the data dir must be on a real disk, not {fstype}; pass --dir"
    );
    let perf = cfg.perf && perf_works();
    println!(
        "barrier counting: {}",
        if perf {
            if cfg.fsync_times {
                "perf stat -p <relay> (fdatasync, sync_file_range, pwrite64 counts); perf record -p <relay> of fdatasync \
                 entry/exit (durations; costs CPU, throughput figures are perturbed)"
            } else {
                "perf stat -p <relay> (fdatasync, sync_file_range, pwrite64 counts)"
            }
        } else {
            "perf unavailable: mean batch will be ESTIMATED as appends/s ÷ loop barriers/s"
        }
    );

    let mut relay = RelayProc::start(
        &relay_exe,
        &work.join("relay"),
        &work.join("relay.log"),
        // The bench measures capacity, not policy: its latency run paces one device at 1,000
        // appends/s, which is the default per-device rate, and its clients do not handle
        // `RateLimited`. The in-flight caps (64 appends, 8 pages) stay above what its clients
        // keep (16 appends).
        &["--requests-per-second", "0"],
    );
    println!("relay: {} (pid {}, {}), log {}", relay_exe.display(), relay.pid, relay.addr, relay.log.display());
    let ctx = Ctx { relay_pid: relay.pid, fsync_times: cfg.fsync_times, perf, perf_dir: work.clone(), tck: clk_tck() };

    // 2a. The barrier alone, before any load (the relay is up and idle).
    let b_append_1 = fsync_loop(&work, cfg.barrier_samples, true, "append 4 KiB + fdatasync (before)");
    let b_over_1 = fsync_loop(&work, cfg.barrier_samples / 2, false, "overwrite 4 KiB + fdatasync (before)");

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut seeds = StdRng::seed_from_u64(cfg.seed);
    let (runs16, runs1, push) = rt.block_on(async {
        // Setup: every writer its own identity, account and chat.
        let t = Instant::now();
        let tasks: Vec<_> = (0..cfg.devices)
            .map(|i| tokio::spawn(Writer::create(relay.addr.clone(), seeds.next_u64(), format!("bench-{i}"))))
            .collect();
        let mut writers = Vec::new();
        for task in tasks {
            writers.push(tokio::time::timeout(STALL * 2, task).await.expect("setup in time").expect("setup task"));
        }
        println!(
            "setup: {} devices, accounts and chats in {:.2} s ({} sync streams closed by the relay at open, reopened)",
            writers.len(),
            t.elapsed().as_secs_f64(),
            REOPENED.load(Ordering::Relaxed)
        );

        // Warm-up (not reported).
        let (w, warm) =
            throughput_run(&Ctx { perf: false, ..ctx.clone() }, writers, cfg.warmup_per_device, cfg.window, "warm")
                .await;
        writers = w;
        println!("warm-up: {} appends at {:.0}/s", warm.appends, warm.per_sec());

        let (mut runs16, mut runs1) = (Vec::new(), Vec::new());
        for r in 0..cfg.runs {
            let (w, s) =
                throughput_run(&ctx, writers, cfg.per_device, cfg.window, &format!("w{}-{r}", cfg.window)).await;
            eprintln!("  run {} {}×{}: {:.0} appends/s", r + 1, cfg.devices, cfg.window, s.per_sec());
            runs16.push(s);
            let (w, s) = throughput_run(&ctx, w, cfg.per_device, 1, &format!("w1-{r}")).await;
            eprintln!("  run {} {}×1: {:.0} appends/s", r + 1, cfg.devices, s.per_sec());
            runs1.push(s);
            writers = w;
        }

        let push = push_latency(&ctx, &relay.addr, seeds.next_u64(), cfg.push_secs, cfg.push_rate).await;
        drop(writers);
        (runs16, runs1, push)
    });
    drop(rt);

    // 2b. The barrier alone again, after the load.
    let b_append_2 = fsync_loop(&work, cfg.barrier_samples, true, "append 4 KiB + fdatasync (after)");
    let b_over_2 = fsync_loop(&work, cfg.barrier_samples / 2, false, "overwrite 4 KiB + fdatasync (after)");
    let alive = relay.alive();
    let (relay_cpu_total, bench_cpu_total) = (cpu_secs(&relay.pid.to_string(), ctx.tck), cpu_secs("self", ctx.tck));
    let status = relay.stop();
    println!("load average at end: {}", loadavg());

    let pooled = {
        let mut s: Vec<Duration> = b_append_1.samples.iter().chain(&b_append_2.samples).copied().collect();
        s.sort();
        let total: Duration = s.iter().sum();
        BarrierStats {
            label: "append 4 KiB + fdatasync (pooled)".into(),
            per_sec: s.len() as f64 / total.as_secs_f64(),
            samples: s,
        }
    };

    println!();
    println!("## 2. fsync barrier alone, on {fstype} {source} (the relay's filesystem), same invocation");
    println!();
    print_barriers(&[&b_append_1, &b_append_2, &pooled, &b_over_1, &b_over_2]);
    let (bp50, bp99, brate) = (pct(&pooled.samples, 50.0), pct(&pooled.samples, 99.0), pooled.per_sec);

    println!();
    println!(
        "## 1. durable appends: {} devices × {} appends per run, {}-byte sealed deltas, 127.0.0.1",
        cfg.devices,
        cfg.per_device,
        PLAINTEXT_BYTES + 40
    );
    println!();
    println!(
        "ack = send → Acked of each append (ms); barriers = the relay's fdatasync calls (perf stat); batch = \
         appends ÷ barriers; cycle = run time ÷ barriers (ms); fdatasync p50/p99 = the relay's own fdatasync \
         calls (perf record, ms); sfr/app = sled sync_file_range calls per append; relay/bench = CPU of each \
         process (100% = one core)"
    );
    println!();
    print_runs(&runs16, cfg.devices);
    println!();
    print_runs(&runs1, cfg.devices);

    let med = |runs: &[RunStats], f: &dyn Fn(&RunStats) -> Option<f64>| {
        median(&runs.iter().filter_map(f).collect::<Vec<_>>())
    };
    let m16 = med(&runs16, &|r| Some(r.per_sec()));
    let m1 = med(&runs1, &|r| Some(r.per_sec()));
    let batch16 = med(&runs16, &|r| r.batch());
    let batch1 = med(&runs1, &|r| r.batch());
    let (est16, est1) = (batch16.is_nan(), batch1.is_nan());
    let batch16 = if est16 { m16 / brate } else { batch16 };
    let batch1 = if est1 { m1 / brate } else { batch1 };
    let star = |e: bool| if e { "*" } else { "" };

    println!();
    println!(
        "## summary: medians over {} runs; baseline = the fsync loop (append, pooled) of this invocation",
        cfg.runs
    );
    println!();
    let (h16, h1) = (format!("{}×{}", cfg.devices, cfg.window), format!("{}×1", cfg.devices));
    println!("| {:<60} | {:>15} | {:>15} |", "", h16, h1);
    println!("|{:-<62}|{:->17}|{:->17}|", "", "", "");
    let row = |name: &str, a: String, b: String| println!("| {name:<60} | {a:>15} | {b:>15} |");
    let both = |name: &str, f: &dyn Fn(&RunStats) -> Option<f64>, prec: usize| {
        let fmt = |v: f64| if v.is_nan() { "n/a".to_string() } else { format!("{v:.prec$}") };
        row(name, fmt(med(&runs16, f)), fmt(med(&runs1, f)))
    };
    both("durable appends/s", &|r| Some(r.per_sec()), 0);
    both("steady appends/s (10% → 90% of the acks)", &|r| r.steady_per_sec, 0);
    both("ack latency p50, ms", &|r| Some(ms(pct(&r.lat, 50.0))), 2);
    both("ack latency p99, ms", &|r| Some(ms(pct(&r.lat, 99.0))), 2);
    row(
        "mean batch, appends per relay barrier",
        format!("{batch16:.1}{}", star(est16)),
        format!("{batch1:.1}{}", star(est1)),
    );
    both("relay barriers/s", &|r| r.perf.fdatasync.map(|b| b as f64 / r.elapsed.as_secs_f64()), 0);
    both(
        "relay barrier cycle, ms (run time ÷ barriers)",
        &|r| r.perf.fdatasync.filter(|b| *b > 0).map(|b| ms(r.elapsed) / b as f64),
        2,
    );
    if cfg.fsync_times {
        both(
            "relay's own fdatasync p50, ms",
            &|r| (!r.perf.fdatasync_times.is_empty()).then(|| ms(pct(&r.perf.fdatasync_times, 50.0))),
            3,
        );
        both(
            "relay's own fdatasync p99, ms",
            &|r| (!r.perf.fdatasync_times.is_empty()).then(|| ms(pct(&r.perf.fdatasync_times, 99.0))),
            3,
        );
        both(
            "share of run time inside the relay's fdatasync, %",
            &|r| {
                (!r.perf.fdatasync_times.is_empty()).then(|| {
                    100.0 * r.perf.fdatasync_times.iter().sum::<Duration>().as_secs_f64() / r.elapsed.as_secs_f64()
                })
            },
            0,
        );
    }
    both("sled sync_file_range calls per append", &|r| per_append(r.perf.sync_file_range, r.appends), 2);
    both("sled pwrite calls per append", &|r| per_append(r.perf.pwrite, r.appends), 2);
    both("relay CPU, % of one core", &|r| Some(100.0 * r.relay_cpu), 0);
    both("bench CPU, % of one core", &|r| Some(100.0 * r.bench_cpu), 0);
    both("relay CPU per append, µs", &|r| Some(1e6 * r.relay_cpu * r.elapsed.as_secs_f64() / r.appends as f64), 1);
    row("baseline: fsync loop barriers/s", format!("{brate:.0}"), format!("{brate:.0}"));
    row(
        "fsync-bound ceiling = loop barriers/s × mean batch",
        format!("{:.0}{}", brate * batch16, star(est16)),
        format!("{:.0}{}", brate * batch1, star(est1)),
    );
    row("appends/s ÷ ceiling", format!("{:.3}", m16 / (brate * batch16)), format!("{:.3}", m1 / (brate * batch1)));
    row(
        "relay barriers/s ÷ loop barriers/s",
        format!("{:.3}", m16 / batch16 / brate),
        format!("{:.3}", m1 / batch1 / brate),
    );
    if est16 || est1 {
        println!("* ESTIMATE: perf could not count the relay's fdatasync calls; batch = appends/s ÷ loop barriers/s");
    }

    println!();
    println!(
        "## 3. append → push latency: A appends paced at {}/s for {} s, B (A's second device, linked) times each Push",
        cfg.push_rate, cfg.push_secs
    );
    println!();
    let p = &push;
    println!(
        "| {:<40} | {:>6} | {:>7} | {:>7} | {:>7} | {:>7} | {:>7} |",
        "", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"
    );
    println!("|{:-<42}|{:->8}|{:->9}|{:->9}|{:->9}|{:->9}|{:->9}|", "", "", "", "", "", "", "");
    for (name, s) in [
        ("append → Push at B", &p.pushes),
        ("append → Acked at A", &p.acks),
        ("fsync loop (append, pooled): baseline", &pooled.samples),
        ("the relay's own fdatasync during this run", &p.perf.fdatasync_times),
    ] {
        if s.is_empty() {
            continue;
        }
        println!(
            "| {name:<40} | {:>6} | {:>7.3} | {:>7.3} | {:>7.3} | {:>7.3} | {:>7.3} |",
            s.len(),
            ms(pct(s, 50.0)),
            ms(pct(s, 90.0)),
            ms(pct(s, 99.0)),
            ms(*s.last().unwrap_or(&Duration::ZERO)),
            ms(mean(s))
        );
    }
    println!();
    println!(
        "sent {} at {:.0}/s achieved; B received every one and opened {} with the chat key it unwrapped from its \
         account log; relay barriers {} (mean batch {})",
        p.sent,
        p.achieved_rate,
        p.verified,
        p.perf.fdatasync.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
        fmt_opt(p.perf.fdatasync.filter(|b| *b > 0).map(|b| p.sent as f64 / b as f64), 2),
    );

    println!();
    println!("## targets");
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "- ≥ 20000 durable appends/s with {}×{}: {:.0}/s → {} ({:+.0}%)",
        cfg.devices,
        cfg.window,
        m16,
        verdict(m16 >= 20000.0),
        100.0 * (m16 / 20000.0 - 1.0)
    );
    let (pp50, pp99) = (pct(&p.pushes, 50.0), pct(&p.pushes, 99.0));
    println!(
        "- push p50 ≤ barrier p50 + 1 ms: {:.3} vs {:.3} + 1 = {:.3} ms → {} ({:+.3} ms)",
        ms(pp50),
        ms(bp50),
        ms(bp50) + 1.0,
        verdict(ms(pp50) <= ms(bp50) + 1.0),
        ms(pp50) - ms(bp50) - 1.0
    );
    println!(
        "- push p99 ≤ barrier p99 + 3 ms: {:.3} vs {:.3} + 3 = {:.3} ms → {} ({:+.3} ms)",
        ms(pp99),
        ms(bp99),
        ms(bp99) + 3.0,
        verdict(ms(pp99) <= ms(bp99) + 3.0),
        ms(pp99) - ms(bp99) - 3.0
    );
    println!();
    println!("sync streams the relay closed at open and that were opened again: {}", REOPENED.load(Ordering::Relaxed));
    println!(
        "CPU over the whole invocation ({:.0} s): relay {relay_cpu_total:.1} s, bench {bench_cpu_total:.1} s",
        invocation.elapsed().as_secs_f64()
    );
    println!(
        "relay alive until the end: {alive}; exit after SIGTERM: {}",
        status.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
    );
    let warnings = std::fs::read_to_string(&relay.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(5)
        .map(str::to_string)
        .collect::<Vec<_>>();
    if !warnings.is_empty() {
        println!("relay log warnings/errors (first 5):");
        for w in warnings {
            println!("  {w}");
        }
    }
    if cfg.keep {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    }
    let _ = std::io::stdout().flush();
}
