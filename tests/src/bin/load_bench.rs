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
//!    text carries its writer and index). Every sent message must reach C (as an event, and in
//!    C's store once the run settles).
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
//! under `--dir` (default: the system temp directory); its filesystem is printed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use stratus_engine::{ChatId, Device, Event, Session};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Semaphore;

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
}

fn usage() -> ! {
    eprintln!(
        "usage: load_bench [--chats N] [--messages N (per chat)] [--rate MSGS_PER_S (both writers)] [--seconds N] \
         [--runs N] [--seed N] [--dir PATH]"
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
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
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
    let (mount, fstype, source) = filesystem_of(&cfg.dir);
    println!("data dirs under {} on {fstype} {source} (mounted at {mount})", cfg.dir.display());
    println!(
        "relay: {} {}",
        relay_exe.display(),
        std::env::var("BENCH_RELAY_ARGS").unwrap_or_else(|_| "(default limits)".into())
    );

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
    println!("load average at end: {}", loadavg());
    print_medians(&cfg, &results);
}

/// One run: a fresh relay, fresh devices, the history, the catch-up, the live part.
async fn run(cfg: &Config, relay_exe: &Path, seed: u64) -> RunResult {
    let mut result = RunResult::default();
    let tmp = tempfile::Builder::new().prefix("load-bench-").tempdir_in(&cfg.dir).expect("temporary directory");
    let dir = tmp.path();
    let relay = RelayProc::start(relay_exe, &dir.join("relay"), &dir.join("relay.log"));
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
    live(cfg, &relay, a, b, sc, &chats, &pads, &mut result).await;
    result.load = loadavg();
    drop(relay);
    result
}

// ---------------------------------------------------------------------------------------------
// Setup

/// 20–160 characters, as in the apply benchmark's history.
fn padding(rng: &mut StdRng) -> String {
    let n = rng.gen_range(20..=160);
    (0..n).map(|_| char::from(b'a' + rng.gen_range(0..26u8))).collect()
}

/// Links a new device at `home` to `approver`'s account (approver not in a session).
async fn link(relay: &str, approver: &mut Device, home: &Path, name: &str, seed: u64) -> Result<Device, String> {
    let mut new = Device::open_seeded(home, seed).map_err(|e| format!("open {name}: {e}"))?;
    let code = new.link_code().map_err(|e| format!("link code: {e}"))?;
    let (relay, code2, name2) = (relay.to_string(), code.clone(), name.to_string());
    let waiting = tokio::spawn(async move { new.link(&relay, &name2, &code2).await.map(|_| new) });
    // The new device registers its wait; approving before it is there is retried.
    let mut tries = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match approver.approve(&code).await {
            Ok(_) => break,
            Err(_) if tries < 20 => tries += 1,
            Err(e) => {
                waiting.abort();
                return Err(format!("approve {name}: {e}"));
            }
        }
    }
    match tokio::time::timeout(STALL, waiting).await {
        Ok(Ok(Ok(device))) => Ok(device),
        Ok(Ok(Err(e))) => Err(format!("link {name}: {e}")),
        Ok(Err(e)) => Err(format!("link {name}: {e}")),
        Err(_) => Err(format!("link {name}: no approval within {STALL:?}")),
    }
}

/// A writes `per_chat` messages into each of `chats` new chats and waits until the relay has
/// acknowledged all of them. Returns A (stopped), the chats and the messages/s achieved.
async fn write_history(
    a: Device,
    chats: usize,
    per_chat: usize,
    pads: &[String],
) -> Result<(Device, Vec<ChatId>, f64), String> {
    let mut sa = Session::start(a).map_err(|e| format!("start a: {e}"))?;
    let _ = sa.events();
    let mut ids = Vec::new();
    for i in 0..chats {
        ids.push(sa.create_chat(&format!("chat {i}")).await.map_err(|e| format!("create chat: {e}"))?);
    }
    let started = Instant::now();
    let sa = Arc::new(sa);
    let jobs: Vec<(ChatId, usize)> = (0..per_chat).flat_map(|i| ids.iter().map(move |c| (*c, i))).collect();
    let failed = futures::stream::iter(jobs)
        .map(|(chat, i)| {
            let (s, text) = (sa.clone(), format!("h {i} {}", pads[i % pads.len()]));
            async move { s.send(chat, &text).await.is_err() }
        })
        .buffer_unordered(HISTORY_IN_FLIGHT)
        .filter(|failed| futures::future::ready(*failed))
        .count()
        .await;
    if failed > 0 {
        return Err(format!("{failed} history sends failed"));
    }
    let deadline = Instant::now() + STALL;
    loop {
        let status = sa.status().await.map_err(|e| format!("status: {e}"))?;
        if status.outbox == 0 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("history not acknowledged within {STALL:?}: {status:?}"));
        }
        tokio::time::sleep(POLL).await;
    }
    let rate = (chats * per_chat) as f64 / started.elapsed().as_secs_f64();
    let sa = Arc::try_unwrap(sa).ok().expect("one handle");
    let a = sa.stop().await.map_err(|e| format!("stop a: {e}"))?;
    Ok((a, ids, rate))
}

/// Per-chat message counts on `session`, in `chats` order (0 for a chat it does not have yet).
async fn counts(session: &Session, chats: &[ChatId]) -> Vec<usize> {
    let mut n = Vec::new();
    for c in chats {
        n.push(session.messages(*c).await.map_or(0, |m| m.len()));
    }
    n
}

// ---------------------------------------------------------------------------------------------
// 1. Catch-up

/// Starts C's session and times it until it has reported every message of the history. Returns
/// the session for the live part, or None when the catch-up did not complete.
async fn catch_up(c: Device, chats: &[ChatId], per_chat: usize, result: &mut RunResult) -> Option<Session> {
    let index: BTreeMap<ChatId, usize> = chats.iter().enumerate().map(|(i, c)| (*c, i)).collect();
    let want = chats.len() * per_chat;
    let started = Instant::now();
    let mut sc = match Session::start(c) {
        Ok(s) => s,
        Err(e) => {
            result.catch_up_failures.push(format!("start c: {e}"));
            return None;
        }
    };
    let mut events = sc.events();
    let deadline = tokio::time::Instant::from_std(started + STALL);
    let (mut seen, mut total, mut lagged) = (vec![0usize; chats.len()], 0, 0u64);
    while total < want && lagged == 0 {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(Event::MessageAdded { chat, .. })) => {
                if let Some(i) = index.get(&chat) {
                    if seen[*i] < per_chat {
                        total += 1;
                    }
                    seen[*i] += 1;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(RecvError::Lagged(n))) => lagged = n,
            Ok(Err(RecvError::Closed)) => {
                result.catch_up_failures.push("c's session ended".into());
                return None;
            }
            Err(_) => {
                result.catch_up_failures.push(format!("catch-up stalled: {seen:?} of {per_chat} per chat"));
                return None;
            }
        }
    }
    if lagged > 0 {
        // The events no longer tell; finish the timing by polling the store (coarser).
        result.catch_up_failures.push(format!("c's event receiver lagged ({lagged} events missed)"));
        while counts(&sc, chats).await.iter().any(|n| *n < per_chat) {
            if Instant::now() >= started + STALL {
                result.catch_up_failures.push("catch-up stalled".into());
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }
    let took = started.elapsed();
    drop(events);
    let stored = counts(&sc, chats).await;
    if stored.iter().any(|n| *n != per_chat) {
        result.catch_up_failures.push(format!("c's store shows {stored:?} of {per_chat} per chat"));
    }
    if seen.iter().any(|n| *n > per_chat) {
        result.catch_up_failures.push(format!("c reported {seen:?} messages of {per_chat} per chat"));
    }
    result.catch_up = Some(CatchUp { messages: want, took });
    Some(sc)
}

// ---------------------------------------------------------------------------------------------
// 2 and 3. Live latency and sending

/// Per writer, (client seq, stamp) of each `Event::Acked` it reported.
type Acks = Arc<Mutex<Vec<Vec<(u64, u64)>>>>;

/// Nanoseconds since `base` plus one (0 = not yet).
fn stamp(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64 + 1
}

fn table(n: usize) -> Arc<Vec<AtomicU64>> {
    Arc::new((0..n).map(|_| AtomicU64::new(0)).collect())
}

#[allow(clippy::too_many_arguments)]
async fn live(
    cfg: &Config,
    relay: &RelayProc,
    a: Device,
    b: Device,
    mut sc: Session,
    chats: &[ChatId],
    pads: &[String],
    result: &mut RunResult,
) {
    let fail = |result: &mut RunResult, e: String| result.live_failures.push(e);
    let (mut sa, mut sb) = match (Session::start(a), Session::start(b)) {
        (Ok(sa), Ok(sb)) => (sa, sb),
        (Err(e), _) | (_, Err(e)) => return fail(result, format!("start writers: {e}")),
    };
    let _ = (sa.events(), sb.events());
    for (s, who) in [(&sa, "a"), (&sb, "b"), (&sc, "c")] {
        if let Err(e) = ready(s, chats, cfg.messages).await {
            return fail(result, format!("{who} not ready: {e}"));
        }
    }
    // The writers' own events, from now on: their acks.
    let writer_events = [sa.events(), sb.events()];

    let per_writer = (cfg.rate * cfg.seconds / 2) as usize;
    let period = Duration::from_secs_f64(2.0 / cfg.rate as f64);
    let sent_at = table(2 * per_writer);
    let arrived = table(2 * per_writer);
    let client_seqs = table(2 * per_writer);
    let acks: Acks = Arc::new(Mutex::new(vec![Vec::new(), Vec::new()]));
    let acked_lagged = Arc::new(AtomicU64::new(0));
    let duplicates = Arc::new(AtomicU64::new(0));
    let lagged = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let base = Instant::now();
    let receiver = tokio::spawn(receive(
        sc.events(),
        per_writer,
        base,
        arrived.clone(),
        received.clone(),
        duplicates.clone(),
        lagged.clone(),
    ));

    let ack_tasks: Vec<_> = writer_events
        .into_iter()
        .enumerate()
        .map(|(w, events)| tokio::spawn(record_acks(events, w, base, acks.clone(), acked_lagged.clone())))
        .collect();
    let tck = clk_tck();
    let cpu0 = (cpu_secs(&relay.pid.to_string(), tck), cpu_secs("self", tck), Instant::now());
    let start = Instant::now() + Duration::from_millis(100);
    let chats = Arc::new(chats.to_vec());
    let pads = Arc::new(pads.to_vec());
    let (sa, sb) = (Arc::new(sa), Arc::new(sb));
    let writers: Vec<_> = [sa.clone(), sb.clone()]
        .into_iter()
        .enumerate()
        .map(|(w, s)| {
            // The second writer runs half a period after the first: together they are evenly paced.
            let first = start + period * w as u32 / 2;
            let tables = (sent_at.clone(), client_seqs.clone());
            tokio::spawn(write_live(s, w, per_writer, first, period, chats.clone(), pads.clone(), base, tables))
        })
        .collect();
    let (mut send, mut errors, mut last_return) = (Vec::new(), 0, start);
    for w in writers {
        match w.await {
            Ok(stats) => {
                send.extend(stats.send);
                errors += stats.errors;
                last_return = last_return.max(stats.last_return);
            }
            Err(e) => return fail(result, format!("writer task: {e}")),
        }
    }
    let sent = send.len() - errors;
    let achieved_rate = sent as f64 / last_return.saturating_duration_since(start).as_secs_f64();

    let settle = Instant::now() + SETTLE;
    while (received.load(Ordering::Relaxed) as usize) < sent && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = cpu0.2.elapsed().as_secs_f64();
    let relay_cpu = (cpu_secs(&relay.pid.to_string(), tck) - cpu0.0) / elapsed;
    let bench_cpu = (cpu_secs("self", tck) - cpu0.1) / elapsed;
    receiver.abort();
    for t in ack_tasks {
        t.abort();
    }

    let mut latency = Vec::new();
    let mut no_event = 0;
    for k in 0..2 * per_writer {
        let (s, r) = (sent_at[k].load(Ordering::Relaxed), arrived[k].load(Ordering::Relaxed));
        match (s, r) {
            (0, _) => {}
            (_, 0) => no_event += 1,
            (s, r) => latency.push(Duration::from_nanos(r.saturating_sub(s))),
        }
    }
    let second = (per_writer / cfg.seconds.max(1) as usize).max(1);
    let p50_of = |range: std::ops::Range<usize>| {
        let mut v: Vec<Duration> = (0..2)
            .flat_map(|w| range.clone().map(move |i| w * per_writer + i))
            .filter_map(|k| {
                let (s, r) = (sent_at[k].load(Ordering::Relaxed), arrived[k].load(Ordering::Relaxed));
                (s != 0 && r != 0).then(|| Duration::from_nanos(r.saturating_sub(s)))
            })
            .collect();
        v.sort();
        pct(&v, 50.0)
    };
    let (first_second_p50, last_second_p50) =
        (p50_of(0..second), p50_of(per_writer.saturating_sub(second)..per_writer));
    let mut acked = Vec::new();
    {
        let acks = acks.lock().expect("not poisoned");
        for (w, acks) in acks.iter().enumerate() {
            let at: BTreeMap<u64, u64> = acks.iter().copied().collect();
            for i in 0..per_writer {
                let k = w * per_writer + i;
                let (s, seq) = (sent_at[k].load(Ordering::Relaxed), client_seqs[k].load(Ordering::Relaxed));
                if let (true, Some(a)) = (s != 0 && seq != 0, at.get(&seq.wrapping_sub(1))) {
                    acked.push(Duration::from_nanos(a.saturating_sub(s)));
                }
            }
        }
    }
    latency.sort();
    send.sort();
    acked.sort();
    // Nothing lost: C's store holds every live message that was sent.
    let stored: usize = {
        let mut n = 0;
        for c in chats.iter() {
            n += sc.messages(*c).await.map_or(0, |m| m.iter().filter(|m| m.text.starts_with('L')).count());
        }
        n
    };
    let live = Live {
        planned: 2 * per_writer,
        sent,
        achieved_rate,
        latency,
        send,
        acked,
        acked_lagged: acked_lagged.load(Ordering::Relaxed),
        first_second_p50,
        last_second_p50,
        no_event,
        not_stored: sent.saturating_sub(stored),
        duplicates: duplicates.load(Ordering::Relaxed) as usize,
        lagged: lagged.load(Ordering::Relaxed),
        relay_cpu,
        bench_cpu,
    };
    if errors > 0 {
        fail(result, format!("{errors} sends failed"));
    }
    if live.lagged > 0 {
        fail(result, format!("c's event receiver lagged ({} events missed)", live.lagged));
    }
    if live.no_event > 0 {
        fail(result, format!("{} messages never reported by c", live.no_event));
    }
    if live.not_stored > 0 || stored > sent {
        fail(result, format!("c's store has {stored} of {sent} live messages"));
    }
    if live.duplicates > 0 {
        fail(result, format!("{} messages reported twice", live.duplicates));
    }
    result.live = Some(live);
}

/// Waits until `s` is connected, caught up, has an empty outbox and shows `per_chat` messages
/// in every chat.
async fn ready(s: &Session, chats: &[ChatId], per_chat: usize) -> Result<(), String> {
    let deadline = Instant::now() + STALL;
    loop {
        let status = s.status().await.map_err(|e| e.to_string())?;
        let n = counts(s, chats).await;
        if status.connected && status.caught_up && status.outbox == 0 && n.iter().all(|n| *n == per_chat) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{status:?}, {n:?} of {per_chat} per chat"));
        }
        tokio::time::sleep(POLL).await;
    }
}

struct WriterStats {
    /// How long each send took (errors included).
    send: Vec<Duration>,
    errors: usize,
    last_return: Instant,
}

/// Writer `w` sends `n` messages, message i due at `first` + i × `period`, round robin over the
/// chats, recording when each send was called in `sent_at[w × n + i]` and the client seq of its
/// delta (plus one) in `client_seqs[w × n + i]`.
#[allow(clippy::too_many_arguments)]
async fn write_live(
    s: Arc<Session>,
    w: usize,
    n: usize,
    first: Instant,
    period: Duration,
    chats: Arc<Vec<ChatId>>,
    pads: Arc<Vec<String>>,
    base: Instant,
    (sent_at, client_seqs): (Arc<Vec<AtomicU64>>, Arc<Vec<AtomicU64>>),
) -> WriterStats {
    let in_flight = Arc::new(Semaphore::new(LIVE_IN_FLIGHT));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(tokio::time::Instant::from_std(first + period * i as u32)).await;
        let permit = in_flight.clone().acquire_owned().await.expect("never closed");
        let chat = chats[(i + w) % chats.len()];
        let text = format!("L{w} {i} {}", pads[(i * 7 + w) % pads.len()]);
        let (s, sent_at, client_seqs) = (s.clone(), sent_at.clone(), client_seqs.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            sent_at[w * n + i].store(stamp(base), Ordering::Relaxed);
            let sent = s.send(chat, &text).await;
            let took = t.elapsed();
            drop(permit);
            if let Ok((_, seq)) = &sent {
                client_seqs[w * n + i].store(seq.0 + 1, Ordering::Relaxed);
            }
            (took, sent.is_ok(), Instant::now())
        }));
    }
    let mut stats = WriterStats { send: Vec::with_capacity(n), errors: 0, last_return: first };
    for t in tasks {
        if let Ok((took, ok, at)) = t.await {
            stats.send.push(took);
            stats.errors += usize::from(!ok);
            stats.last_return = stats.last_return.max(at);
        }
    }
    stats
}

/// A writer's side: records when each of its deltas was acknowledged, as (client seq, stamp).
async fn record_acks(
    mut events: tokio::sync::broadcast::Receiver<Event>,
    w: usize,
    base: Instant,
    acks: Acks,
    lagged: Arc<AtomicU64>,
) {
    loop {
        match events.recv().await {
            Ok(Event::Acked { client_seq, .. }) => {
                let now = stamp(base);
                acks.lock().expect("not poisoned")[w].push((client_seq.0, now));
            }
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => {
                lagged.fetch_add(n, Ordering::Relaxed);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// C's side: stamps each live message's arrival in `arrived[writer × per_writer + index]`.
async fn receive(
    mut events: tokio::sync::broadcast::Receiver<Event>,
    per_writer: usize,
    base: Instant,
    arrived: Arc<Vec<AtomicU64>>,
    received: Arc<AtomicU64>,
    duplicates: Arc<AtomicU64>,
    lagged: Arc<AtomicU64>,
) {
    loop {
        match events.recv().await {
            Ok(Event::MessageAdded { message, local: false, .. }) => {
                let now = stamp(base);
                let mut words = message.text.split(' ');
                let w = words.next().and_then(|w| w.strip_prefix('L')).and_then(|w| w.parse::<usize>().ok());
                let i = words.next().and_then(|i| i.parse::<usize>().ok());
                let (Some(w), Some(i)) = (w, i) else { continue };
                if w >= 2 || i >= per_writer {
                    continue;
                }
                if arrived[w * per_writer + i].swap(now, Ordering::Relaxed) == 0 {
                    received.fetch_add(1, Ordering::Relaxed);
                } else {
                    duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(n)) => {
                lagged.fetch_add(n, Ordering::Relaxed);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Percentile (nearest rank) of a sorted slice.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary_line(r: usize, runs: usize, x: &RunResult) -> String {
    let history = x.history_rate.map_or("history n/a".into(), |h| format!("history written at {h:.0}/s"));
    let catch_up = match &x.catch_up {
        Some(c) => {
            format!("catch-up {} msgs in {:.3} s = {:.0} deltas/s", c.messages, c.took.as_secs_f64(), c.per_sec())
        }
        None => "catch-up n/a".into(),
    };
    let live = match &x.live {
        Some(l) => format!(
            "live: sent {}/{} at {:.0}/s, c got {} events ({} lagged, {} missing from c's store), latency p50 {:.2} \
             p99 {:.2} max {:.2} ms (p50 first second {:.2}, last second {:.2}) | send p50 {:.2} p99 {:.2} ms | \
             send → acked p50 {:.2} p99 {:.2} ms ({} acks missed) | CPU relay {:.0}% bench {:.0}%",
            l.sent,
            l.planned,
            l.achieved_rate,
            l.latency.len(),
            l.lagged,
            l.not_stored,
            ms(pct(&l.latency, 50.0)),
            ms(pct(&l.latency, 99.0)),
            ms(l.latency.last().copied().unwrap_or_default()),
            ms(l.first_second_p50),
            ms(l.last_second_p50),
            ms(pct(&l.send, 50.0)),
            ms(pct(&l.send, 99.0)),
            ms(pct(&l.acked, 50.0)),
            ms(pct(&l.acked, 99.0)),
            l.acked_lagged,
            100.0 * l.relay_cpu,
            100.0 * l.bench_cpu,
        ),
        None => "live n/a".into(),
    };
    let verdict = |f: &[String]| if f.is_empty() { "ok".to_string() } else { format!("FAILED: {}", f.join("; ")) };
    format!(
        "run {r}/{runs}: {history} | {catch_up} [{}] | {live} [{}] | load {}",
        verdict(&x.catch_up_failures),
        verdict(&x.live_failures),
        x.load
    )
}

/// (median, min, max); NaN when empty.
fn median_range(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    match n {
        0 => (f64::NAN, f64::NAN, f64::NAN),
        _ if n % 2 == 1 => (s[n / 2], s[0], s[n - 1]),
        _ => ((s[n / 2 - 1] + s[n / 2]) / 2.0, s[0], s[n - 1]),
    }
}

fn print_medians(cfg: &Config, results: &[RunResult]) {
    let ok_catch_up: Vec<&CatchUp> =
        results.iter().filter(|r| r.catch_up_failures.is_empty()).filter_map(|r| r.catch_up.as_ref()).collect();
    let ok_live: Vec<&Live> =
        results.iter().filter(|r| r.live_failures.is_empty()).filter_map(|r| r.live.as_ref()).collect();
    println!();
    println!(
        "## load_bench: median and range over the runs that did not fail ({} chats × {} messages; live {}/s for {} s)",
        cfg.chats, cfg.messages, cfg.rate, cfg.seconds
    );
    println!();
    println!("| figure | median | range | runs | target |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, v: Vec<f64>, of: usize, prec: usize, target: &str| {
        let (m, lo, hi) = median_range(&v);
        println!("| {name} | {m:.prec$} | {lo:.prec$}–{hi:.prec$} | {}/{of} | {target} |", v.len());
    };
    let n = results.len();
    row("new device catch-up, deltas/s", ok_catch_up.iter().map(|c| c.per_sec()).collect(), n, 0, "≥ 15,000");
    row("new device catch-up, s", ok_catch_up.iter().map(|c| c.took.as_secs_f64()).collect(), n, 3, "");
    let live = |f: &dyn Fn(&Live) -> f64| ok_live.iter().map(|l| f(l)).collect::<Vec<_>>();
    row("live send → event latency p50, ms", live(&|l| ms(pct(&l.latency, 50.0))), n, 2, "");
    row("live send → event latency p99, ms", live(&|l| ms(pct(&l.latency, 99.0))), n, 2, "≤ 50");
    row("live send → event latency max, ms", live(&|l| ms(l.latency.last().copied().unwrap_or_default())), n, 2, "");
    row("writers' achieved send rate, msgs/s", live(&|l| l.achieved_rate), n, 0, &format!("{}", cfg.rate));
    row("Session::send p50, ms", live(&|l| ms(pct(&l.send, 50.0))), n, 2, "");
    row("Session::send p99, ms", live(&|l| ms(pct(&l.send, 99.0))), n, 2, "");
    row("send → writer's Acked p50, ms", live(&|l| ms(pct(&l.acked, 50.0))), n, 2, "");
    row("send → writer's Acked p99, ms", live(&|l| ms(pct(&l.acked, 99.0))), n, 2, "");
    row("latency p50 of the first second's messages, ms", live(&|l| ms(l.first_second_p50)), n, 2, "");
    row("latency p50 of the last second's messages, ms", live(&|l| ms(l.last_second_p50)), n, 2, "");
    row("relay CPU during the live part, % of a core", live(&|l| 100.0 * l.relay_cpu), n, 0, "");
    row("bench CPU during the live part, % of a core", live(&|l| 100.0 * l.bench_cpu), n, 0, "");
    let history: Vec<f64> = results.iter().filter_map(|r| r.history_rate).collect();
    row("history written and acknowledged (setup), msgs/s", history, n, 0, "");
    let lost: usize = results.iter().filter_map(|r| r.live.as_ref()).map(|l| l.not_stored).sum();
    let lagged =
        results.iter().filter(|r| r.catch_up_failures.iter().chain(&r.live_failures).any(|f| f.contains("lagged")));
    println!();
    println!(
        "failed: catch-up {} of {n} runs, live {} of {n} runs; live messages missing from c's store, all runs: {lost}; \
         runs with a lagged event receiver: {}",
        n - ok_catch_up.len(),
        n - ok_live.len(),
        lagged.count()
    );
}

// ---------------------------------------------------------------------------------------------
// Machine and the relay process

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn machine() -> String {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| "?".into());
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cpus} CPUs ({cpu}), Linux {}", read("/proc/sys/kernel/osrelease").trim())
}

fn loadavg() -> String {
    read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The mount holding `path`: (mount point, filesystem type, source).
fn filesystem_of(path: &Path) -> (String, String, String) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut best: Option<(String, String, String)> = None;
    for line in read("/proc/self/mountinfo").lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let (l, r): (Vec<&str>, Vec<&str>) = (left.split(' ').collect(), right.split(' ').collect());
        if l.len() < 5 || r.len() < 2 {
            continue;
        }
        let mount = l[4].replace("\\040", " ");
        if path.starts_with(&mount) && best.as_ref().is_none_or(|b| mount.len() >= b.0.len()) {
            best = Some((mount, r[0].to_string(), r[1].to_string()));
        }
    }
    best.unwrap_or_else(|| ("?".into(), "?".into(), "?".into()))
}

/// Clock ticks per second of /proc/<pid>/stat times.
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system, all threads) a process has used.
fn cpu_secs(pid: &str, tck: f64) -> f64 {
    let stat = read(&format!("/proc/{pid}/stat"));
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / tck
}

/// A `stratus-relay` process, SIGKILLed when dropped.
struct RelayProc {
    child: Child,
    /// Kept open: the relay's stdout must not close under it.
    _stdout: BufReader<ChildStdout>,
    addr: String,
    pid: u32,
}

impl RelayProc {
    fn start(exe: &Path, data: &Path, log: &Path) -> RelayProc {
        let stderr = File::create(log).expect("relay log file");
        let extra = std::env::var("BENCH_RELAY_ARGS").unwrap_or_default();
        let mut child = Command::new(exe)
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(extra.split_whitespace())
            .env("STRATUS_LOG", "stratus_relay=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("relay did not start; see {}", log.display());
        };
        let pid = child.id();
        RelayProc { addr: addr.to_string(), child, _stdout: out, pid }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
