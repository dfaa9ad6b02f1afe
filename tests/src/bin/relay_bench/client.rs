//! The throughput runs of raw-protocol writer devices (`bench_relay::Writer`).

use super::*;

// ---------------------------------------------------------------------------------------------
// 1. Durable append throughput

/// Shared progress of one run: completions, and when 10% and 90% of them were reached.
pub(super) struct Progress {
    pub(super) done: AtomicU64,
    pub(super) total: u64,
    pub(super) at10: OnceLock<Instant>,
    pub(super) at90: OnceLock<Instant>,
}

impl Progress {
    pub(super) fn one(&self) {
        let d = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if d == self.total / 10 {
            let _ = self.at10.set(Instant::now());
        }
        if d == self.total * 9 / 10 {
            let _ = self.at90.set(Instant::now());
        }
    }
}

/// `n` appends with at most `window` in flight; returns the writer, each append's send → ack
/// latency, and when the last ack arrived.
pub(super) async fn pump(
    mut w: Writer,
    n: usize,
    window: usize,
    progress: Arc<Progress>,
) -> (Writer, Vec<Duration>, Instant) {
    let mut inflight: VecDeque<(ReqId, Instant)> = VecDeque::with_capacity(window);
    let mut lat = Vec::with_capacity(n);
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < n {
        while sent < n && inflight.len() < window {
            let (req, _, frame) = w.append();
            inflight.push_back((req, Instant::now()));
            w.raw.stream.send(&frame).await.expect("send append");
            sent += 1;
        }
        match recv(&mut w.raw, "an ack").await {
            RelayFrame::Acked { req, .. } => {
                let now = Instant::now();
                let i = inflight.iter().position(|(r, _)| *r == req).expect("an ack for an append in flight");
                let (_, t) = inflight.remove(i).expect("position is valid");
                lat.push(now - t);
                acked += 1;
                progress.one();
            }
            RelayFrame::Push { .. } | RelayFrame::PushAccount { .. } => {}
            other => panic!("unexpected frame during appends: {other:?}"),
        }
    }
    (w, lat, Instant::now())
}

pub(super) struct RunStats {
    pub(super) window: usize,
    pub(super) appends: u64,
    pub(super) elapsed: Duration,
    pub(super) steady_per_sec: Option<f64>,
    pub(super) lat: Vec<Duration>, // sorted
    pub(super) perf: PerfResult,
    pub(super) relay_cpu: f64,
    pub(super) bench_cpu: f64,
}

impl RunStats {
    pub(super) fn per_sec(&self) -> f64 {
        self.appends as f64 / self.elapsed.as_secs_f64()
    }
    pub(super) fn batch(&self) -> Option<f64> {
        self.perf.fdatasync.filter(|b| *b > 0).map(|b| self.appends as f64 / b as f64)
    }
}

#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) relay_pid: u32,
    pub(super) fsync_times: bool,
    pub(super) perf: bool,
    pub(super) perf_dir: PathBuf,
    pub(super) tck: f64,
}

pub(super) async fn throughput_run(
    ctx: &Ctx,
    writers: Vec<Writer>,
    per_device: usize,
    window: usize,
    tag: &str,
) -> (Vec<Writer>, RunStats) {
    let total = (writers.len() * per_device) as u64;
    let progress = Arc::new(Progress { done: AtomicU64::new(0), total, at10: OnceLock::new(), at90: OnceLock::new() });
    let perf = ctx.perf.then(|| Perf::start(ctx.relay_pid, &ctx.perf_dir, tag, ctx.fsync_times));
    let pid = ctx.relay_pid.to_string();
    let (relay0, self0) = (cpu_secs(&pid, ctx.tck), cpu_secs("self", ctx.tck));
    let start = Instant::now();
    let tasks: Vec<_> =
        writers.into_iter().map(|w| tokio::spawn(pump(w, per_device, window, progress.clone()))).collect();
    let mut writers = Vec::with_capacity(tasks.len());
    let mut lat = Vec::with_capacity(total as usize);
    let mut last = start;
    for t in tasks {
        let (w, l, end) = t.await.expect("writer task");
        writers.push(w);
        lat.extend(l);
        last = last.max(end);
    }
    let elapsed = last - start;
    let (relay1, self1) = (cpu_secs(&pid, ctx.tck), cpu_secs("self", ctx.tck));
    let perf = perf.map(Perf::stop).unwrap_or_default();
    lat.sort();
    let steady_per_sec = match (progress.at10.get(), progress.at90.get()) {
        (Some(a), Some(b)) if b > a => Some((total * 9 / 10 - total / 10) as f64 / (*b - *a).as_secs_f64()),
        _ => None,
    };
    let secs = elapsed.as_secs_f64();
    let stats = RunStats {
        window,
        appends: total,
        elapsed,
        steady_per_sec,
        lat,
        perf,
        relay_cpu: (relay1 - relay0) / secs,
        bench_cpu: (self1 - self0) / secs,
    };
    (writers, stats)
}

// ---------------------------------------------------------------------------------------------
// 3. Append → push latency between two devices of one account
