//! `relay_bench ops --only delete`: deleting an account of N messages while other devices
//! append (issue 19's chunked delete).
//!
//! In each run a fresh account appends `--delete-messages` small deltas (200 bytes sealed) to
//! its notes chat; then `LOAD_WRITERS` other devices append paced at `--rate` appends/s in
//! total, and after `BEFORE` `stratus-relay admin delete` removes the full account. The
//! deletion is done when the command has returned and the relay's `/metrics` say its data is
//! emptied (`stratus_relay_purge_pending` 0 after more `purge_chunks_total`); polled every
//! 20 ms. Reported: the command's time, the time until the data is emptied, and the other
//! devices' append → ack latency (p50, p99, max) before it and from the command to the end of
//! the purge.

use super::ops::*;
use super::*;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

const LOAD_WRITERS: usize = 10;
const BEFORE: Duration = Duration::from_secs(10);
const SKIP: Duration = Duration::from_secs(3);
const AFTER: Duration = Duration::from_secs(2);
/// Longest the bench waits for a deletion's data to be emptied (not a target: a run that
/// takes longer fails).
const PURGE_DEADLINE: Duration = Duration::from_secs(900);

struct DeleteRun {
    command_secs: f64,
    emptied_secs: f64,
    chunks: f64,
    before: Vec<Duration>, // sorted
    during: Vec<Duration>, // sorted
}

/// The relay's purge metrics now: (chunks so far, pending).
fn purge_state(admin: &str) -> (f64, f64) {
    let text = stratus_tests::http(admin, "GET", "/metrics").1;
    let v = |name| stratus_tests::metric(&text, name).unwrap_or_else(|| panic!("{name} in /metrics"));
    (v("stratus_relay_purge_chunks_total"), v("stratus_relay_purge_pending"))
}

pub(super) fn delete_bench(relay_exe: &Path, work: &Path, cfg: &OpsConfig, seed: u64) {
    let (admin, mut relay, rt) = ops_relay(relay_exe, work, "delete-relay");
    let data = work.join("delete-relay");
    let mut seeds = StdRng::seed_from_u64(seed);
    let mut load = rt.block_on(writers(&relay.addr, &mut seeds, LOAD_WRITERS, "load"));
    let ctx =
        Ctx { relay_pid: relay.pid, fsync_times: false, perf: false, perf_dir: work.to_path_buf(), tck: clk_tck() };
    let mut runs = Vec::new();
    for r in 0..cfg.runs {
        let t = Instant::now();
        let full = rt.block_on(async {
            let w = Writer::create(relay.addr.clone(), seeds.next_u64(), format!("full-{r}")).await;
            let (w, _) = throughput_run(&ctx, vec![w], cfg.delete_messages, 64, "fill").await;
            w.into_iter().next().expect("one writer")
        });
        let account = full.account().to_string();
        drop(full);
        eprintln!("  run {}: {} messages stored in {:.0} s", r + 1, cfg.delete_messages, t.elapsed().as_secs_f64());
        let stop = Arc::new(AtomicBool::new(false));
        let lat = Arc::new(Mutex::new(Vec::new()));
        let per_writer = cfg.rate as f64 / load.len() as f64;
        let (chunks0, _) = purge_state(&admin);
        let (writers, t0, d0, d1, d2, chunks1) = rt.block_on(async {
            let t0 = Instant::now();
            let tasks: Vec<_> =
                load.into_iter().map(|w| tokio::spawn(paced(w, per_writer, stop.clone(), lat.clone()))).collect();
            tokio::time::sleep(BEFORE).await;
            let d0 = Instant::now();
            let mut cmd = Command::new(relay_exe);
            cmd.arg("--data-dir").arg(&data).args(["admin", "delete", &account]);
            let out = tokio::task::spawn_blocking(move || cmd.output()).await.expect("command task");
            let out = out.expect("stratus-relay runs");
            assert!(out.status.success(), "delete failed: {}", String::from_utf8_lossy(&out.stderr));
            let d1 = Instant::now();
            let (a, c) = (admin.clone(), chunks0);
            let (d2, chunks1) = tokio::task::spawn_blocking(move || loop {
                let (chunks, pending) = purge_state(&a);
                if chunks > c && pending == 0.0 {
                    return (Instant::now(), chunks);
                }
                assert!(d0.elapsed() < PURGE_DEADLINE, "the deletion's data was not emptied in {PURGE_DEADLINE:?}");
                std::thread::sleep(Duration::from_millis(20));
            })
            .await
            .expect("poll task");
            tokio::time::sleep(AFTER).await;
            stop.store(true, Ordering::Relaxed);
            let mut writers = Vec::new();
            for t in tasks {
                writers.push(t.await.expect("load task"));
            }
            (writers, t0, d0, d1, d2, chunks1)
        });
        load = writers;
        let all = std::mem::take(&mut *lat.lock().unwrap_or_else(|e| e.into_inner()));
        let window = |a: Instant, b: Instant| {
            let mut v: Vec<Duration> = all.iter().filter(|(t, _)| *t >= a && *t < b).map(|(_, l)| *l).collect();
            v.sort();
            v
        };
        let run = DeleteRun {
            command_secs: (d1 - d0).as_secs_f64(),
            emptied_secs: (d2 - d0).as_secs_f64(),
            chunks: chunks1 - chunks0,
            before: window(t0 + SKIP, d0),
            during: window(d0, d2),
        };
        eprintln!(
            "  run {}: delete {:.2} s, emptied after {:.2} s ({} chunks); others' p99 {:.1} ms before, {:.1} ms during",
            r + 1,
            run.command_secs,
            run.emptied_secs,
            run.chunks,
            ms(pct(&run.before, 99.0)),
            ms(pct(&run.during, 99.0))
        );
        runs.push(run);
    }
    assert!(relay.alive(), "the relay ran to the end");
    relay.stop();
    print_deletes(&runs, cfg);
}

fn print_deletes(runs: &[DeleteRun], cfg: &OpsConfig) {
    println!();
    println!(
        "## 4. deleting an account of {} messages while {LOAD_WRITERS} devices append {} appends/s in total",
        cfg.delete_messages, cfg.rate
    );
    println!();
    println!(
        "| run | delete command s | data emptied after s | chunks | others' appends before: n | p50 ms | p99 ms \
         | max ms | during: n | p50 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, r) in runs.iter().enumerate() {
        let last = |v: &[Duration]| ms(v.last().copied().unwrap_or_default());
        println!(
            "| {} | {:.2} | {:.2} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.1} |",
            i + 1,
            r.command_secs,
            r.emptied_secs,
            r.chunks,
            r.before.len(),
            ms(pct(&r.before, 50.0)),
            ms(pct(&r.before, 99.0)),
            last(&r.before),
            r.during.len(),
            ms(pct(&r.during, 50.0)),
            ms(pct(&r.during, 99.0)),
            last(&r.during)
        );
    }
    let range = |v: Vec<f64>| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{:.2} [{lo:.2} – {hi:.2}]", median(&v))
    };
    println!();
    println!("- data emptied after (s): {}", range(runs.iter().map(|r| r.emptied_secs).collect()));
    println!("- others' p99 before (ms): {}", range(runs.iter().map(|r| ms(pct(&r.before, 99.0))).collect()));
    println!("- others' p99 during (ms): {}", range(runs.iter().map(|r| ms(pct(&r.during, 99.0))).collect()));
}
