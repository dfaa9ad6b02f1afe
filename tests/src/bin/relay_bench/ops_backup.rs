//! `relay_bench ops`, part 3: `stratus-relay backup --to DIR` of a large store while devices
//! append at a paced rate.
//!
//! The store is filled first: 8 devices append 60,000-byte deltas (the largest a delta may be
//! is 64 KiB sealed) until the relay's data directory holds `--store-mib` MiB. Then, in each
//! run, 50 devices append 200-byte sealed deltas paced at `--rate` appends/s in total (each
//! keeping at most 32 in flight); after 20 s `stratus-relay backup` runs, and 10 s after it
//! returns the appends stop. The throughput before the backup (from 5 s in) is compared with
//! the throughput while it ran. The backup directory is removed after each run. Then the same
//! with `stratus-relay admin delete` of one of the filling accounts (each holds an eighth of
//! the store) in place of the backup: how long the deletion holds the relay's core.

use super::ops::*;
use super::*;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

/// Plaintext bytes of the deltas that fill the store (sealed: 60,040 ≤ 64 KiB).
const FILL_PLAINTEXT: usize = 60_000;
const FILL_WRITERS: usize = 8;
const LOAD_WRITERS: usize = 50;
const BEFORE: Duration = Duration::from_secs(20);
const SKIP: Duration = Duration::from_secs(5);
const AFTER: Duration = Duration::from_secs(10);

/// Bytes of the files under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    stratus_tests::files_under(dir).iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum()
}

struct BackupRun {
    before_per_sec: f64,
    during_per_sec: f64,
    after_per_sec: f64,
    backup_secs: f64,
    backup_bytes: u64,
    max_gap: Duration,
}

impl BackupRun {
    fn loss(&self) -> f64 {
        1.0 - self.during_per_sec / self.before_per_sec
    }
}

/// Runs `cmd` ([`BEFORE`] after the paced appends start, which go on [`AFTER`] once it is
/// done) and measures the appends before, during and after it.
fn under_load(
    rt: &tokio::runtime::Runtime,
    load: Vec<Writer>,
    rate: u64,
    mut cmd: Command,
) -> (Vec<Writer>, BackupRun) {
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(Mutex::new(Vec::new()));
    let per_writer = rate as f64 / load.len() as f64;
    let (writers, t0, b0, b1, out) = rt.block_on(async {
        let t0 = Instant::now();
        let tasks: Vec<_> =
            load.into_iter().map(|w| tokio::spawn(paced(w, per_writer, stop.clone(), acks.clone()))).collect();
        tokio::time::sleep(BEFORE).await;
        let b0 = Instant::now();
        let out = tokio::task::spawn_blocking(move || cmd.output()).await.expect("command task");
        let b1 = Instant::now();
        tokio::time::sleep(AFTER).await;
        stop.store(true, Ordering::Relaxed);
        let mut writers = Vec::new();
        for t in tasks {
            writers.push(t.await.expect("load task"));
        }
        (writers, t0, b0, b1, out.expect("stratus-relay runs"))
    });
    assert!(out.status.success(), "the command failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut acks: Vec<Instant> =
        std::mem::take(&mut *acks.lock().unwrap_or_else(|e| e.into_inner())).into_iter().map(|(t, _)| t).collect();
    acks.sort();
    let rate =
        |a: Instant, b: Instant| acks.iter().filter(|t| **t >= a && **t < b).count() as f64 / (b - a).as_secs_f64();
    let run = BackupRun {
        before_per_sec: rate(t0 + SKIP, b0),
        during_per_sec: rate(b0, b1),
        after_per_sec: rate(b1, b1 + AFTER),
        backup_secs: (b1 - b0).as_secs_f64(),
        backup_bytes: 0,
        max_gap: acks.windows(2).map(|p| p[1] - p[0]).max().unwrap_or_default(),
    };
    (writers, run)
}

pub(super) fn backup_bench(relay_exe: &Path, work: &Path, cfg: &OpsConfig, seed: u64) {
    let (_admin, mut relay, rt) = ops_relay(relay_exe, work, "backup-relay");
    let data = work.join("backup-relay");
    let mut seeds = StdRng::seed_from_u64(seed);
    let target = cfg.store_mib * 1024 * 1024;

    // Fill the store.
    let t = Instant::now();
    let (mut fill_appends, mut fill_rounds) = (0u64, 0);
    let mut fillers = rt.block_on(writers(&relay.addr, &mut seeds, FILL_WRITERS, "fill"));
    for w in &mut fillers {
        w.plaintext = FILL_PLAINTEXT;
    }
    while bytes_under(&data) < target {
        // Rounds of 256 MiB of deltas, then the directory is measured again.
        let per = (256 * 1024 * 1024 / FILL_PLAINTEXT / FILL_WRITERS).max(1);
        let ctx =
            Ctx { relay_pid: relay.pid, fsync_times: false, perf: false, perf_dir: work.to_path_buf(), tck: clk_tck() };
        let (w, s) = rt.block_on(throughput_run(&ctx, fillers, per, 16, "fill"));
        fillers = w;
        fill_appends += s.appends;
        fill_rounds += 1;
        eprintln!("  fill round {fill_rounds}: {} MiB on disk", bytes_under(&data) >> 20);
    }
    let store_bytes = bytes_under(&data);
    println!();
    println!(
        "## 3. backup while appending: store filled with {fill_appends} deltas of {} sealed bytes in {:.0} s; \
         data dir {:.2} GiB",
        FILL_PLAINTEXT + 40,
        t.elapsed().as_secs_f64(),
        store_bytes as f64 / (1u64 << 30) as f64
    );
    let fill_accounts: Vec<_> = fillers.iter().map(|w| w.account()).collect();
    drop(fillers);

    let load = rt.block_on(writers(&relay.addr, &mut seeds, LOAD_WRITERS, "load"));
    let mut load = Some(load);
    let mut runs = Vec::new();
    for r in 0..cfg.runs {
        let to = work.join(format!("backup-{r}"));
        let mut cmd = Command::new(relay_exe);
        cmd.arg("--data-dir").arg(&data).arg("backup").arg("--to").arg(&to);
        let (w, run) = under_load(&rt, load.take().expect("the load's devices"), cfg.rate, cmd);
        load = Some(w);
        let run = BackupRun { backup_bytes: bytes_under(&to), ..run };
        eprintln!(
            "  backup run {}: {:.1} s, appends/s before {:.0}, during {:.0} ({:.0}% loss)",
            r + 1,
            run.backup_secs,
            run.before_per_sec,
            run.during_per_sec,
            100.0 * run.loss()
        );
        let _ = std::fs::remove_dir_all(&to);
        runs.push(run);
    }
    // Deleting one of the filling accounts (1/8 of the store each) under the same load.
    let mut deletes = Vec::new();
    for (r, account) in fill_accounts.iter().take(cfg.runs).enumerate() {
        let mut cmd = Command::new(relay_exe);
        cmd.arg("--data-dir").arg(&data).args(["admin", "delete", &account.to_string()]);
        let (w, run) = under_load(&rt, load.take().expect("the load's devices"), cfg.rate, cmd);
        load = Some(w);
        eprintln!(
            "  delete run {}: {:.1} s, appends/s before {:.0}, during {:.0} ({:.0}% loss)",
            r + 1,
            run.backup_secs,
            run.before_per_sec,
            run.during_per_sec,
            100.0 * run.loss()
        );
        deletes.push(run);
    }
    drop(load);
    drop(rt);
    assert!(relay.alive(), "the relay ran to the end; see {}", relay.log.display());
    relay.stop();

    println!();
    println!(
        "{} devices append 200-byte sealed deltas paced at {} appends/s in total; backup after {} s; rates in \
         appends/s (acks)",
        LOAD_WRITERS,
        cfg.rate,
        BEFORE.as_secs()
    );
    println!();
    println!("| run | backup s | backup GiB | before | during | after (10 s) | loss % | longest ack gap s |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, r) in runs.iter().enumerate() {
        println!(
            "| {} | {:.1} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} |",
            i + 1,
            r.backup_secs,
            r.backup_bytes as f64 / (1u64 << 30) as f64,
            r.before_per_sec,
            r.during_per_sec,
            r.after_per_sec,
            100.0 * r.loss(),
            r.max_gap.as_secs_f64()
        );
    }
    println!();
    println!(
        "`stratus-relay admin delete` of one filling account ({} of its deltas, {:.0} MiB) under the same load:",
        fill_appends / FILL_WRITERS as u64,
        (fill_appends / FILL_WRITERS as u64 * (FILL_PLAINTEXT as u64 + 40)) as f64 / (1u64 << 20) as f64
    );
    println!();
    println!("| run | delete s | before | during | after (10 s) | loss % | longest ack gap s |");
    println!("|---|---|---|---|---|---|---|");
    for (i, r) in deletes.iter().enumerate() {
        println!(
            "| {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} |",
            i + 1,
            r.backup_secs,
            r.before_per_sec,
            r.during_per_sec,
            r.after_per_sec,
            100.0 * r.loss(),
            r.max_gap.as_secs_f64()
        );
    }
    let gaps: Vec<f64> = deletes.iter().map(|r| r.max_gap.as_secs_f64()).collect();
    println!();
    println!("- delete: median longest ack gap {:.2} s", median(&gaps));
    let losses: Vec<f64> = runs.iter().map(|r| 100.0 * r.loss()).collect();
    let secs: Vec<f64> = runs.iter().map(|r| r.backup_secs).collect();
    let lo = losses.iter().copied().fold(f64::MAX, f64::min);
    let hi = losses.iter().copied().fold(f64::MIN, f64::max);
    println!();
    println!(
        "- backup of a {:.2} GiB store costs the appends ≤ 10%: median loss {:.1}% [{lo:.1} – {hi:.1}], backup \
         median {:.1} s → {}",
        store_bytes as f64 / (1u64 << 30) as f64,
        median(&losses),
        median(&secs),
        if median(&losses) <= 10.0 { "met" } else { "MISSED" }
    );
}
