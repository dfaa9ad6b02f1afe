//! Figures 2 and 3: two writers sending at a paced rate, a third device receiving.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stratus_engine::{ChatId, Device, Event, Session};
use tokio::sync::broadcast::{error::RecvError, Receiver};
use tokio::sync::Semaphore;

use crate::report::pct;
use crate::setup::ready;
use crate::system::RelayProc;
use crate::{Config, Live, RunResult, LIVE_IN_FLIGHT, SETTLE};
use stratus_tests::bench_sys::{clk_tck, cpu_secs};

/// Writers in the live part.
const WRITERS: usize = 2;

/// What the writers, C's receiver and the writers' ack recorders note down during the live
/// part. Message i of writer w is at index w × `per_writer` + i; instants are nanoseconds since
/// `base` plus one (0: not yet).
struct Stamps {
    per_writer: usize,
    base: Instant,
    /// When the writer called `Session::send`.
    sent_at: Vec<AtomicU64>,
    /// The client seq of the message's delta, plus one.
    client_seqs: Vec<AtomicU64>,
    /// When C's `Event::MessageAdded` for it reached the bench.
    arrived: Vec<AtomicU64>,
    /// Per writer, (client seq, instant) of each `Event::Acked`.
    acks: Mutex<[Vec<(u64, u64)>; WRITERS]>,
    /// Distinct messages C reported, and repeats.
    received: AtomicU64,
    duplicates: AtomicU64,
    /// Events C's receiver missed, and the writers' ack receivers missed.
    lagged: AtomicU64,
    acks_lagged: AtomicU64,
    /// Events of note, "<device> <kind>" → (how many, the first one's text).
    notes: Mutex<BTreeMap<String, (u64, String)>>,
}

impl Stamps {
    fn new(per_writer: usize) -> Stamps {
        let table = || (0..WRITERS * per_writer).map(|_| AtomicU64::new(0)).collect();
        Stamps {
            per_writer,
            base: Instant::now(),
            sent_at: table(),
            client_seqs: table(),
            arrived: table(),
            acks: Mutex::new([Vec::new(), Vec::new()]),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
            acks_lagged: AtomicU64::new(0),
            notes: Mutex::new(BTreeMap::new()),
        }
    }

    /// Notes `event` of device `who` if it tells of trouble (a disconnection, an error, a delta
    /// the relay refused).
    fn note(&self, who: &str, event: &Event) {
        let (kind, text) = match event {
            Event::Disconnected { reason } => ("Disconnected", reason.clone()),
            Event::Error { message } => ("Error", message.clone()),
            Event::Rejected { message, .. } => ("Rejected", message.clone()),
            _ => return,
        };
        let mut notes = self.notes.lock().expect("not poisoned");
        notes.entry(format!("{who} {kind}")).or_insert((0, text)).0 += 1;
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    /// Send call → C's event of message `k`, if both happened.
    fn latency(&self, k: usize) -> Option<Duration> {
        let (s, r) = (self.sent_at[k].load(Ordering::Relaxed), self.arrived[k].load(Ordering::Relaxed));
        (s != 0 && r != 0).then(|| Duration::from_nanos(r.saturating_sub(s)))
    }

    /// Latency p50 of messages `range` of every writer.
    fn p50_of(&self, range: std::ops::Range<usize>) -> Duration {
        let mut v: Vec<Duration> = (0..WRITERS)
            .flat_map(|w| range.clone().map(move |i| w * self.per_writer + i))
            .filter_map(|k| self.latency(k))
            .collect();
        v.sort();
        pct(&v, 50.0)
    }

    /// Send call → the writer's `Event::Acked`, for every message acknowledged.
    fn acked(&self) -> Vec<Duration> {
        let acks = self.acks.lock().expect("not poisoned");
        let mut out = Vec::new();
        for (w, acks) in acks.iter().enumerate() {
            let at: BTreeMap<u64, u64> = acks.iter().copied().collect();
            for k in w * self.per_writer..(w + 1) * self.per_writer {
                let (s, seq) = (self.sent_at[k].load(Ordering::Relaxed), self.client_seqs[k].load(Ordering::Relaxed));
                if let (true, Some(a)) = (s != 0 && seq != 0, at.get(&seq.wrapping_sub(1))) {
                    out.push(Duration::from_nanos(a.saturating_sub(s)));
                }
            }
        }
        out.sort();
        out
    }
}

/// Starts A and B as writers next to C's running session, waits until all three are ready,
/// runs the live part and records it in `result`.
pub(crate) async fn live(
    cfg: &Config,
    relay: &RelayProc,
    writers: [Device; WRITERS],
    mut sc: Session,
    chats: &[ChatId],
    pads: &[String],
    result: &mut RunResult,
) {
    let fail = |result: &mut RunResult, e: String| result.live_failures.push(e);
    let [a, b] = writers;
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

    let per_writer = (cfg.rate * cfg.seconds) as usize / WRITERS;
    let period = Duration::from_secs_f64(WRITERS as f64 / cfg.rate as f64);
    let stamps = Arc::new(Stamps::new(per_writer));
    let receiver = tokio::spawn(receive(sc.events(), stamps.clone()));
    let ack_tasks: Vec<_> = [sa.events(), sb.events()]
        .into_iter()
        .enumerate()
        .map(|(w, events)| tokio::spawn(record_acks(events, w, stamps.clone())))
        .collect();
    // Held until the run has settled: a session stops when its last handle is dropped, and the
    // writers' outboxes still hold deltas when their last send returns.
    let writers = [Arc::new(sa), Arc::new(sb)];

    let tck = clk_tck();
    let cpu_before = (cpu_secs(&relay.pid.to_string(), tck), cpu_secs("self", tck), Instant::now());
    let start = Instant::now() + Duration::from_millis(100);
    let (chats_shared, pads) = (Arc::new(chats.to_vec()), Arc::new(pads.to_vec()));
    let tasks: Vec<_> = writers
        .iter()
        .cloned()
        .enumerate()
        .map(|(w, s)| {
            // Each writer starts a share of a period after the previous: together evenly paced.
            let first = start + period * w as u32 / WRITERS as u32;
            let (chats, pads, stamps) = (chats_shared.clone(), pads.clone(), stamps.clone());
            tokio::spawn(write_live(s, w, first, period, chats, pads, stamps))
        })
        .collect();
    let (mut send, mut errors, mut last_return) = (Vec::new(), 0, start);
    for task in tasks {
        match task.await {
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
    while (stamps.received.load(Ordering::Relaxed) as usize) < sent && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = cpu_before.2.elapsed().as_secs_f64();
    let relay_cpu = (cpu_secs(&relay.pid.to_string(), tck) - cpu_before.0) / elapsed;
    let bench_cpu = (cpu_secs("self", tck) - cpu_before.1) / elapsed;
    receiver.abort();
    for t in ack_tasks {
        t.abort();
    }
    let mut status_at_end = Vec::new();
    for (s, who) in [(&*writers[0], "a"), (&*writers[1], "b"), (&sc, "c")] {
        let status = s.status().await.map_or_else(|e| e.to_string(), |s| format!("{s:?}"));
        status_at_end.push(format!("{who} {status}"));
    }
    let events = stamps
        .notes
        .lock()
        .expect("not poisoned")
        .iter()
        .map(|(what, (n, first))| format!("{what} ×{n} (first: {first})"))
        .collect();

    let mut latency = Vec::new();
    let mut no_event = 0;
    for k in 0..WRITERS * per_writer {
        match (stamps.sent_at[k].load(Ordering::Relaxed), stamps.latency(k)) {
            (0, _) => {}
            (_, None) => no_event += 1,
            (_, Some(l)) => latency.push(l),
        }
    }
    latency.sort();
    send.sort();
    let second = (per_writer / cfg.seconds.max(1) as usize).max(1);
    // Nothing lost: C's store holds every live message that was sent.
    let mut stored = 0;
    for c in chats {
        stored += sc.messages(*c).await.map_or(0, |m| m.iter().filter(|m| m.text.starts_with('L')).count());
    }
    let live = Live {
        planned: WRITERS * per_writer,
        sent,
        achieved_rate,
        latency,
        send,
        acked: stamps.acked(),
        acked_lagged: stamps.acks_lagged.load(Ordering::Relaxed),
        first_second_p50: stamps.p50_of(0..second),
        last_second_p50: stamps.p50_of(per_writer.saturating_sub(second)..per_writer),
        no_event,
        not_stored: sent.saturating_sub(stored),
        duplicates: stamps.duplicates.load(Ordering::Relaxed) as usize,
        lagged: stamps.lagged.load(Ordering::Relaxed),
        relay_cpu,
        bench_cpu,
        events,
        status_at_end: status_at_end.join(", "),
    };
    if errors > 0 {
        fail(result, format!("{errors} sends failed"));
    }
    if live.lagged > 0 {
        fail(result, format!("c's event receiver lagged ({} events missed)", live.lagged));
    }
    if live.no_event > 0 {
        fail(result, format!("{} messages not reported by c within {SETTLE:?} of the last send", live.no_event));
    }
    if live.not_stored > 0 || stored > sent {
        fail(result, format!("c's store has {stored} of {sent} live messages then"));
    }
    if live.duplicates > 0 {
        fail(result, format!("{} messages reported twice", live.duplicates));
    }
    result.live = Some(live);
}

struct WriterStats {
    /// How long each send took (errors included).
    send: Vec<Duration>,
    errors: usize,
    last_return: Instant,
}

/// Writer `w` sends its messages, message i due at `first` + i × `period`, round robin over
/// the chats, noting when each send was called and its delta's client seq in `stamps`.
async fn write_live(
    s: Arc<Session>,
    w: usize,
    first: Instant,
    period: Duration,
    chats: Arc<Vec<ChatId>>,
    pads: Arc<Vec<String>>,
    stamps: Arc<Stamps>,
) -> WriterStats {
    let n = stamps.per_writer;
    let in_flight = Arc::new(Semaphore::new(LIVE_IN_FLIGHT));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(tokio::time::Instant::from_std(first + period * i as u32)).await;
        let permit = in_flight.clone().acquire_owned().await.expect("never closed");
        let chat = chats[(i + w) % chats.len()];
        let text = format!("L{w} {i} {}", pads[(i * 7 + w) % pads.len()]);
        let (s, stamps) = (s.clone(), stamps.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            stamps.sent_at[w * n + i].store(stamps.now(), Ordering::Relaxed);
            let sent = s.send(chat, &text).await;
            let took = t.elapsed();
            drop(permit);
            if let Ok((_, seq)) = &sent {
                stamps.client_seqs[w * n + i].store(seq.0 + 1, Ordering::Relaxed);
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

/// Writer `w`'s side: notes when each of its deltas was acknowledged.
async fn record_acks(mut events: Receiver<Event>, w: usize, stamps: Arc<Stamps>) {
    loop {
        match events.recv().await {
            Ok(Event::Acked { client_seq, .. }) => {
                let now = stamps.now();
                stamps.acks.lock().expect("not poisoned")[w].push((client_seq.0, now));
            }
            Ok(e) => stamps.note(["a", "b"][w], &e),
            Err(RecvError::Lagged(n)) => {
                stamps.acks_lagged.fetch_add(n, Ordering::Relaxed);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// C's side: notes each live message's arrival (its text starts `L<writer> <index> `).
async fn receive(mut events: Receiver<Event>, stamps: Arc<Stamps>) {
    loop {
        match events.recv().await {
            Ok(Event::MessageAdded { message, local: false, .. }) => {
                let now = stamps.now();
                let mut words = message.text.split(' ');
                let w = words.next().and_then(|w| w.strip_prefix('L')).and_then(|w| w.parse::<usize>().ok());
                let i = words.next().and_then(|i| i.parse::<usize>().ok());
                let (Some(w), Some(i)) = (w, i) else { continue };
                if w >= WRITERS || i >= stamps.per_writer {
                    continue;
                }
                let first = stamps.arrived[w * stamps.per_writer + i].compare_exchange(
                    0,
                    now,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                if first.is_ok() {
                    stamps.received.fetch_add(1, Ordering::Relaxed);
                } else {
                    stamps.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(e) => stamps.note("c", &e),
            Err(RecvError::Lagged(n)) => {
                stamps.lagged.fetch_add(n, Ordering::Relaxed);
            }
            Err(RecvError::Closed) => return,
        }
    }
}
