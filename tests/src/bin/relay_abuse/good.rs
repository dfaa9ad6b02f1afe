//! The well-behaved devices, which append at a steady rate through every phase, and the sampler
//! of the relay process's memory, disk writes and store size.

use super::*;

/// One append of a well-behaved device: when it was sent and how long its `Acked` took.
#[derive(Clone, Copy)]
pub(super) struct Sample {
    pub(super) sent: Instant,
    pub(super) latency: Duration,
}

/// What the well-behaved devices saw, shared with their tasks.
#[derive(Default)]
pub(super) struct GoodLog {
    pub(super) samples: Mutex<Vec<Sample>>,
    /// Refusals or errors answering their appends.
    pub(super) refused: AtomicU64,
    /// Typing indicators they received.
    pub(super) typing: AtomicU64,
    /// Their streams the relay closed (a device cut off).
    pub(super) cut_off: AtomicU64,
}

impl GoodLog {
    /// The append latencies of appends sent in `[from, to)`, sorted.
    pub(super) fn between(&self, from: Instant, to: Instant) -> Vec<Duration> {
        let mut v: Vec<Duration> = self
            .samples
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|s| s.sent >= from && s.sent < to)
            .map(|s| s.latency)
            .collect();
        v.sort();
        v
    }
}

/// Keeps `w` appending one sealed delta every `interval` (one in flight; a late ack delays the
/// next) until `stop`; every other frame it receives is counted or ignored.
pub(super) async fn steady(mut w: Writer, interval: Duration, log: Arc<GoodLog>, stop: Arc<AtomicBool>) {
    let mut next = tokio::time::Instant::now() + interval.mul_f64(w.rng.next_u32() as f64 / u32::MAX as f64);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next).await;
        next += interval;
        let (req, _, frame) = w.append();
        let sent = Instant::now();
        if w.raw.stream.send(&frame).await.is_err() {
            log.cut_off.fetch_add(1, Ordering::Relaxed);
            return;
        }
        loop {
            match tokio::time::timeout(STALL, w.raw.stream.recv()).await {
                Ok(Ok(Some(RelayFrame::Acked { req: r, .. }))) if r == req => {
                    let latency = sent.elapsed();
                    log.samples.lock().expect("not poisoned").push(Sample { sent, latency });
                    break;
                }
                Ok(Ok(Some(RelayFrame::Typing { .. }))) => {
                    log.typing.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(Some(f))) if f.req() == Some(req) => {
                    eprintln!("  a well-behaved device's append was refused: {f:?}");
                    log.refused.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    eprintln!("  a well-behaved device was cut off or stalled");
                    log.cut_off.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The relay process from outside

/// `VmRSS` of `pid` in KiB (0 once it is gone).
pub(super) fn rss_kib(pid: u32) -> u64 {
    proc_field(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// `write_bytes` of `pid`'s /proc io: bytes it caused to be written to the disk.
pub(super) fn write_bytes(pid: u32) -> u64 {
    proc_field(&format!("/proc/{pid}/io"), "write_bytes:")
}

fn proc_field(path: &str, name: &str) -> u64 {
    read(path)
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Bytes of disk allocated to the files under `dir`.
pub(super) fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

/// Samples the relay's RSS every 100 ms on its own thread until dropped.
pub(super) struct RssSampler {
    pub(super) samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub(super) fn start(pid: u32) -> RssSampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                s.lock().expect("not poisoned").push((Instant::now(), rss_kib(pid)));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler { samples, stop, thread: Some(thread) }
    }

    /// The highest RSS sampled in `[from, to]`, KiB.
    pub(super) fn peak(&self, from: Instant, to: Instant) -> u64 {
        let s = self.samples.lock().expect("not poisoned");
        s.iter().filter(|(t, _)| *t >= from && *t <= to).map(|(_, v)| *v).max().unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
