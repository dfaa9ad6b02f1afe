//! `load_bench`: live sync and a new device's catch-up, the way an app embeds the engine (issue
//! 14): one process, the public API only (`Device`, `Session`), a real `stratus-relay` process on
//! 127.0.0.1, every device with its own sled store (fsync). See docs/benchmarks.md for results.
//!
//! Each run starts a fresh relay and fresh devices of one account, then measures:
//!
//! 1. New device catch-up. Device A writes the history (`--chats` × `--messages`) through a
//!    `Session`, many sends in flight, and waits until the relay has acknowledged all of it
//!    (`Status::outbox` is 0). A is stopped, approves a new device C (`Device::link` +
//!    `Device::approve`), and C's `Session` is started. Timed from just before `Session::start`
//!    until C has reported every message (`Event::MessageAdded`, counted per chat; checked
//!    against `Session::messages` afterwards, untimed) → deltas/s. Only message deltas are
//!    counted; each chat's creation and title (two more deltas) and the account log are not.
//! 2. Live push-to-event latency. A and a second device B of the account (linked before the
//!    history, so it catches up first, untimed) each send `--rate`/2 messages/s for `--seconds`,
//!    round robin over the chats, while C receives. Sending is open-loop: message i of a writer
//!    is due at start + i × period whether or not earlier sends have returned (at most
//!    [`LIVE_IN_FLIGHT`] in flight per writer; beyond that the writer falls behind and the
//!    achieved rate shows it). Latency = when C's `Event::MessageAdded` reaches the bench minus
//!    when the writer called `Session::send` (one process, one monotonic clock; the message's
//!    text carries its writer and index). Every sent message must reach C, as an event and in
//!    its store, within [`SETTLE`] of the writers' last send returning.
//! 3. The writers' achieved send rate, and how long `Session::send` took: it returns after the
//!    message is written durably on the device (the device's store barrier), queued behind
//!    whatever else the session's task is doing. To tell where live latency goes, also the time
//!    from the send call to the writer's `Event::Acked` (the relay has the delta durably), and
//!    the latency of the first and of the last second's messages (a backlog grows between them).
//!
//! A run fails, and is left out of the medians of the figure it concerns, when C's event
//! receiver lags (`RecvError::Lagged`: the broadcast channel holds
//! `stratus_engine::session::EVENT_QUEUE` events), a message is lost, a send fails, or a
//! phase stalls for [`STALL`]. The failure is printed; the bench goes on with the next run.
//!
//! ```sh
//! cargo build --release -p stratus-tests -p stratus-relay -p stratus-node --bins
//! target/release/load_bench [--chats 10] [--messages 1000] [--rate 2000] [--seconds 10]
//!                           [--runs 5] [--seed N] [--dir PATH]
//! ```
//!
//! The relay binary is taken from next to this executable and runs with its default limits
//! (1,000 requests/s per device, so writing the history is paced by the relay) and
//! `STRATUS_LOG=stratus_relay=info` (nothing logged per append). `BENCH_RELAY_ARGS` adds flags
//! (e.g. `--requests-per-second 0`). The data directories go to a fresh temporary directory
//! under `--dir` (default: the system temp directory); its filesystem is printed. `--keep` keeps
//! each run's directory (the relay's log, every store).
//!
//! Besides the figures each run line reports what a reader needs when a run goes wrong: the
//! devices' `Disconnected`, `Error` and `Rejected` events during the live part, each session's
//! `Status` at its end, and the relay log's warnings (a device the relay cut off for not reading
//! its pushes, `device is not reading; disconnecting it`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use stratus_engine::Device;

mod catch_up;
mod live;
mod report;
mod setup;
mod system;

use catch_up::catch_up;
use live::live;
use report::{print_medians, summary_line};
use setup::{link, padding, write_history};
use stratus_tests::bench_sys::{filesystem_of, loadavg, machine};
use system::{fsync_loop, relay_warnings, start_relay};

/// Sends in flight while A writes the history (as in tests/tests/load.rs).
const HISTORY_IN_FLIGHT: usize = 128;
/// Sends in flight per live writer; a writer due to send more waits, falling behind its pace.
const LIVE_IN_FLIGHT: usize = 256;
/// Longest any phase may wait (history acknowledged, a link, a catch-up, devices ready); the
/// run fails instead of hanging.
const STALL: Duration = Duration::from_secs(120);
/// How long C may take, after the writers' last send returned, to report every message.
const SETTLE: Duration = Duration::from_secs(30);
/// How often a state is polled (`Session::status`, `Session::messages`).
const POLL: Duration = Duration::from_millis(50);
/// Iterations of the fsync loop (the disk's own barrier) before and after the runs.
const BARRIER_SAMPLES: usize = 500;

// ---------------------------------------------------------------------------------------------
// Configuration

struct Config {
    chats: usize,
    messages: usize,
    rate: u64,
    seconds: u64,
    runs: usize,
    seed: u64,
    dir: PathBuf,
    keep: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: load_bench [--chats N] [--messages N (per chat)] [--rate MSGS_PER_S (both writers)] [--seconds N] \
         [--runs N] [--seed N] [--dir PATH] [--keep]"
    );
    std::process::exit(2);
}

fn parse_args() -> Config {
    let mut c = Config {
        chats: 10,
        messages: 1000,
        rate: 2000,
        seconds: 10,
        runs: 5,
        seed: rand::random(),
        dir: std::env::temp_dir(),
        keep: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--keep" {
            c.keep = true;
            continue;
        }
        let value = it.next().unwrap_or_else(|| usage());
        let num = || value.parse::<u64>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--chats" => c.chats = num() as usize,
            "--messages" => c.messages = num() as usize,
            "--rate" => c.rate = num(),
            "--seconds" => c.seconds = num(),
            "--runs" => c.runs = num() as usize,
            "--seed" => c.seed = num(),
            "--dir" => c.dir = PathBuf::from(value),
            _ => usage(),
        }
    }
    if c.chats == 0 || c.runs == 0 || c.rate < 2 {
        usage();
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Results of one run

/// Figure 1: the new device's catch-up.
struct CatchUp {
    messages: usize,
    took: Duration,
}

impl CatchUp {
    fn per_sec(&self) -> f64 {
        self.messages as f64 / self.took.as_secs_f64()
    }
}

/// Figures 2 and 3: the live part.
struct Live {
    planned: usize,
    sent: usize,
    /// Sent messages per second, from the first one due to the last send returned.
    achieved_rate: f64,
    /// Send call → C's event, sorted.
    latency: Vec<Duration>,
    /// How long each `Session::send` took, sorted.
    send: Vec<Duration>,
    /// Send call → the writer's `Event::Acked` (the relay has it durably), sorted: the first
    /// half of the way to C.
    acked: Vec<Duration>,
    /// Acked events the writers' receivers missed (`RecvError::Lagged`; diagnostics only).
    acked_lagged: u64,
    /// Latency p50 of the messages due in the first and in the last second of sending: a
    /// backlog shows as the second growing past the first.
    first_second_p50: Duration,
    last_second_p50: Duration,
    /// Sent messages C reported no event for after [`SETTLE`].
    no_event: usize,
    /// Sent messages missing from C's store after [`SETTLE`].
    not_stored: usize,
    /// Messages C reported more than once.
    duplicates: usize,
    /// Events C's receiver missed (`RecvError::Lagged`).
    lagged: u64,
    /// CPU of the relay and of this process over the live part, 1.0 = one core.
    relay_cpu: f64,
    bench_cpu: f64,
    /// Events of note from the three sessions during the live part ("b Disconnected ×2: …").
    events: Vec<String>,
    /// Each session's `Status` at the end of the live part.
    status_at_end: String,
}

#[derive(Default)]
struct RunResult {
    /// Messages/s at which A's history was written and acknowledged (setup, for context).
    history_rate: Option<f64>,
    catch_up: Option<CatchUp>,
    live: Option<Live>,
    /// What went wrong, one line each; a figure with a failure is left out of the medians.
    catch_up_failures: Vec<String>,
    live_failures: Vec<String>,
    load: String,
    /// The relay log's warnings and errors, counted.
    relay_log: String,
}

// ---------------------------------------------------------------------------------------------
// Main

fn main() {
    let cfg = parse_args();
    println!(
        "# load_bench --chats {} --messages {} --rate {} --seconds {} --runs {} --seed {}",
        cfg.chats, cfg.messages, cfg.rate, cfg.seconds, cfg.runs, cfg.seed
    );
    println!("seed: {} (replay with --seed {})", cfg.seed, cfg.seed);
    println!(
        "  (the seed drives the devices' identities, keys and ids (Device::open_seeded) and the texts; timing is \
         the machine's own)"
    );
    println!("machine: {}", machine());
    println!("load average at start: {}", loadavg());
    let relay_exe = std::env::current_exe().expect("own path").with_file_name("stratus-relay");
    assert!(
        relay_exe.exists(),
        "{} not found; build it with `cargo build --release -p stratus-relay -p stratus-tests --bins`",
        relay_exe.display()
    );
    std::fs::create_dir_all(&cfg.dir).expect("--dir exists or can be created");
    let (mount, fstype, source, _) = filesystem_of(&cfg.dir);
    println!("data dirs under {} on {fstype} {source} (mounted at {mount})", cfg.dir.display());
    println!(
        "relay: {} {}",
        relay_exe.display(),
        std::env::var("BENCH_RELAY_ARGS").unwrap_or_else(|_| "(default limits)".into())
    );

    println!("fsync barrier before the runs: {}", fsync_loop(&cfg.dir));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut seeds = StdRng::seed_from_u64(cfg.seed);
    let mut results = Vec::new();
    for r in 0..cfg.runs {
        let result = rt.block_on(run(&cfg, &relay_exe, seeds.next_u64()));
        println!("{}", summary_line(r + 1, cfg.runs, &result));
        let _ = std::io::stdout().flush();
        results.push(result);
    }
    drop(rt);
    println!("fsync barrier after the runs: {}", fsync_loop(&cfg.dir));
    println!("load average at end: {}", loadavg());
    print_medians(&cfg, &results);
}

/// One run: a fresh relay, fresh devices, the history, the catch-up, the live part.
async fn run(cfg: &Config, relay_exe: &Path, seed: u64) -> RunResult {
    let tmp = tempfile::Builder::new().prefix("load-bench-").tempdir_in(&cfg.dir).expect("temporary directory");
    let mut result = run_in(cfg, relay_exe, seed, tmp.path()).await;
    result.relay_log = relay_warnings(&tmp.path().join("relay.log"));
    if cfg.keep {
        println!("kept {}", tmp.keep().display());
    }
    result
}

async fn run_in(cfg: &Config, relay_exe: &Path, seed: u64, dir: &Path) -> RunResult {
    let mut result = RunResult::default();
    let relay = start_relay(relay_exe, &dir.join("relay"), &dir.join("relay.log"));
    let mut rng = StdRng::seed_from_u64(seed);
    let pads: Vec<String> = (0..256).map(|_| padding(&mut rng)).collect();

    let setup = async {
        let mut a = Device::open_seeded(&dir.join("a"), rng.next_u64()).map_err(|e| format!("open a: {e}"))?;
        a.create_account(&relay.addr, "a").await.map_err(|e| format!("create account: {e}"))?;
        let b = link(&relay.addr, &mut a, &dir.join("b"), "b", rng.next_u64()).await?;
        let (a, chats, rate) = write_history(a, cfg.chats, cfg.messages, &pads).await?;
        Ok::<_, String>((a, b, chats, rate))
    };
    let (mut a, b, chats, history_rate) = match setup.await {
        Ok(x) => x,
        Err(e) => {
            result.catch_up_failures.push(format!("setup: {e}"));
            result.live_failures.push("not run".into());
            result.load = loadavg();
            return result;
        }
    };
    result.history_rate = Some(history_rate);

    let c = match link(&relay.addr, &mut a, &dir.join("c"), "c", rng.next_u64()).await {
        Ok(c) => c,
        Err(e) => {
            result.catch_up_failures.push(e);
            result.live_failures.push("not run".into());
            result.load = loadavg();
            return result;
        }
    };
    let sc = match catch_up(c, &chats, cfg.messages, &mut result).await {
        Some(sc) => sc,
        None => {
            result.live_failures.push("not run (no catch-up)".into());
            result.load = loadavg();
            return result;
        }
    };
    live(cfg, &relay, [a, b], sc, &chats, &pads, &mut result).await;
    result.load = loadavg();
    drop(relay);
    result
}
