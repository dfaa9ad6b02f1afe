//! What the relay tells its operator: Prometheus metrics and readiness, served by the admin
//! HTTP listener (`server/http.rs`).
//!
//! Everything is counted by the driver where it carries out what the core decided (an error
//! frame sent, a write applied, a barrier done) or read from the core's index on the driver's
//! once-a-second tick ([`crate::core::RelayCore::stats`]); nothing here decides anything. No
//! series is kept per chat, account or device: their number is bounded by the error codes and
//! fixed buckets, whatever the relay stores.
//!
//! Updating a metric is an atomic add (a lock for a labelled family's lookup); a scrape encodes
//! them all without stopping the core.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use stratus_engine::proto::wire::{ErrorCode, RelayFrame};

use crate::core::{CoreStats, StoreOp, LOG_LENGTH_BUCKETS};

/// The label of what was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

/// The upper bound of a bucket of chats by log length (`+Inf` for the last).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeLabel {
    le: String,
}

/// The relay's metrics. Names are prefixed `stratus_relay_`; docs/self-hosting.md lists them.
pub struct Metrics {
    registry: Registry,
    appends: Counter,
    refused: Family<CodeLabel, Counter>,
    rate_limited: Counter,
    behind: Counter,
    stalled: Counter,
    barrier_seconds: Histogram,
    barrier_appends: Histogram,
    write_batch_ops: Histogram,
    streams: Gauge,
    connections: Gauge,
    gate_peers: Gauge,
    devices: Gauge,
    accounts: Gauge,
    chats: Gauge,
    chat_log_deltas: Gauge,
    chat_log_max: Gauge,
    chats_by_log_length: Family<LeLabel, Gauge>,
    store_bytes: Gauge,
    purge_chunks: Counter,
    purge_pending: Gauge,
    /// Appends applied when the last barrier began (for [`Metrics::barrier_appends`]).
    appends_at_barrier: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("stratus_relay");
        let m = Metrics {
            appends: Counter::default(),
            refused: Family::default(),
            rate_limited: Counter::default(),
            behind: Counter::default(),
            stalled: Counter::default(),
            // 0.25 ms to about 8 s.
            barrier_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            barrier_appends: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            write_batch_ops: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            streams: Gauge::default(),
            connections: Gauge::default(),
            gate_peers: Gauge::default(),
            devices: Gauge::default(),
            accounts: Gauge::default(),
            chats: Gauge::default(),
            chat_log_deltas: Gauge::default(),
            chat_log_max: Gauge::default(),
            chats_by_log_length: Family::default(),
            store_bytes: Gauge::default(),
            purge_chunks: Counter::default(),
            purge_pending: Gauge::default(),
            appends_at_barrier: AtomicU64::new(0),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("appends", "Deltas stored (appends accepted and written)", m.appends.clone());
        r.register("refused", "Requests refused with an error, by error code", m.refused.clone());
        r.register("rate_limited", "Requests answered RateLimited", m.rate_limited.clone());
        r.register("behind", "Devices told Behind: pushes to them were dropped while they caught up", m.behind.clone());
        r.register("stalled_disconnects", "Device streams cut off for not reading", m.stalled.clone());
        r.register_with_unit("barrier", "Fsync barrier latency", Unit::Seconds, m.barrier_seconds.clone());
        r.register("barrier_appends", "Appends made durable by one fsync barrier", m.barrier_appends.clone());
        r.register("write_batch_ops", "Store operations applied in one transaction", m.write_batch_ops.clone());
        r.register("streams", "Open device sync streams", m.streams.clone());
        r.register("connections", "Established libp2p connections", m.connections.clone());
        r.register(
            "gate_peers",
            "Peers the connection gate counts (with a connection or sync stream open)",
            m.gate_peers.clone(),
        );
        r.register("connected_devices", "Devices with a sync stream open", m.devices.clone());
        r.register("accounts", "Accounts stored", m.accounts.clone());
        r.register("chats", "Chats stored", m.chats.clone());
        r.register("chat_log_deltas", "Deltas in all chats' logs together", m.chat_log_deltas.clone());
        r.register("chat_log_max", "Deltas in the longest chat log", m.chat_log_max.clone());
        r.register(
            "chats_by_log_length",
            "Chats whose log holds at most `le` deltas (cumulative)",
            m.chats_by_log_length.clone(),
        );
        r.register_with_unit("store", "Size of the store on disk", Unit::Bytes, m.store_bytes.clone());
        r.register("purge_chunks", "Chunks of deleted data emptied from the store", m.purge_chunks.clone());
        r.register(
            "purge_pending",
            "1 while the last chunk emptied left more deleted data to empty, else 0",
            m.purge_pending.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a frame the driver sends: refusals by code, rate limits, `Behind`.
    pub fn frame_sent(&self, frame: &RelayFrame) {
        match frame {
            RelayFrame::Error { code, .. } => {
                self.refused.get_or_create(&CodeLabel { code: code_name(*code) }).inc();
            }
            RelayFrame::RateLimited { .. } => {
                self.rate_limited.inc();
            }
            RelayFrame::Behind { .. } => {
                self.behind.inc();
            }
            _ => {}
        }
    }

    /// Counts a stream cut off for not reading.
    pub fn stalled_disconnect(&self) {
        self.stalled.inc();
    }

    /// Counts a batch of writes applied as one transaction.
    pub fn applied(&self, ops: &[StoreOp]) {
        self.write_batch_ops.observe(ops.len() as f64);
        let deltas = ops.iter().filter(|op| matches!(op, StoreOp::PutDelta(_))).count();
        self.appends.inc_by(deltas as u64);
    }

    /// Notes that a barrier begins; pass what it returns to [`Metrics::barrier_done`].
    pub fn barrier_started(&self) -> u64 {
        self.appends.get()
    }

    /// Counts a barrier that took `took` and began when [`Metrics::barrier_started`] said
    /// `started` (every append applied by then is covered by it).
    pub fn barrier_done(&self, started: u64, took: Duration) {
        self.barrier_seconds.observe(took.as_secs_f64());
        let before = self.appends_at_barrier.swap(started, Ordering::Relaxed);
        self.barrier_appends.observe(started.saturating_sub(before) as f64);
    }

    /// Sets the gauges read from the core's index.
    pub fn core_stats(&self, s: &CoreStats) {
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.streams, s.streams);
        set(&self.devices, s.connected_devices);
        set(&self.accounts, s.accounts);
        set(&self.chats, s.chats);
        set(&self.chat_log_deltas, s.chat_log_deltas);
        set(&self.chat_log_max, s.chat_log_max);
        for (i, count) in s.chats_by_log_length.iter().enumerate() {
            let le = LOG_LENGTH_BUCKETS.get(i).map_or_else(|| "+Inf".to_string(), u64::to_string);
            set(&self.chats_by_log_length.get_or_create(&LeLabel { le }), *count);
        }
    }

    /// Counts a chunk of deleted data emptied; `more` when some is left.
    pub fn purged(&self, more: bool) {
        self.purge_chunks.inc();
        self.purge_pending.set(i64::from(more));
    }

    /// Sets the connection gate's sizes (`core/gate.rs`).
    pub fn gate(&self, connections: usize, peers: usize) {
        self.connections.set(i64::try_from(connections).unwrap_or(i64::MAX));
        self.gate_peers.set(i64::try_from(peers).unwrap_or(i64::MAX));
    }

    /// Sets the store's size on disk.
    pub fn store_bytes(&self, bytes: u64) {
        self.store_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The metrics in the OpenMetrics text format (which Prometheus scrapes).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// An error code as a label value: its name in the protocol (`QuotaExceeded`).
fn code_name(code: ErrorCode) -> String {
    format!("{code:?}")
}

/// Whether the relay serves (`/readyz`): its store is open, the first fsync barrier is done, it
/// listens, and it is not shutting down.
#[derive(Default)]
pub struct Health {
    store_open: AtomicBool,
    first_barrier: AtomicBool,
    listening: AtomicBool,
    shutting_down: AtomicBool,
    /// Why it stopped serving, when a failure stopped it.
    failed: Mutex<Option<String>>,
}

impl Health {
    /// The store is open.
    pub fn store_opened(&self) {
        self.store_open.store(true, Ordering::Release);
    }
    /// The barrier at start (over what a crash may have left unflushed) is done.
    pub fn first_barrier_done(&self) {
        self.first_barrier.store(true, Ordering::Release);
    }
    /// The relay listens for devices.
    pub fn listening(&self) {
        self.listening.store(true, Ordering::Release);
    }
    /// The relay is stopping (asked to, or `why` failed).
    pub fn shutting_down(&self, why: Option<String>) {
        self.shutting_down.store(true, Ordering::Release);
        if let Some(why) = why {
            *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
    }

    /// `Ok` when ready, else what it waits for.
    pub fn ready(&self) -> Result<(), String> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(match &*self.failed.lock().unwrap_or_else(|e| e.into_inner()) {
                Some(why) => format!("stopping: {why}"),
                None => "shutting down".into(),
            });
        }
        if !self.store_open.load(Ordering::Acquire) {
            return Err("opening the store".into());
        }
        if !self.first_barrier.load(Ordering::Acquire) {
            return Err("waiting for the first fsync barrier".into());
        }
        if !self.listening.load(Ordering::Acquire) {
            return Err("not listening yet".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_text_format() {
        let m = Metrics::new();
        m.frame_sent(&RelayFrame::Error { req: Some(1), code: ErrorCode::QuotaExceeded, message: String::new() });
        m.frame_sent(&RelayFrame::RateLimited { req: 2, retry_after_ms: 5 });
        m.barrier_done(m.barrier_started(), Duration::from_millis(2));
        let text = m.encode();
        for line in [
            "stratus_relay_refused_total{code=\"QuotaExceeded\"} 1",
            "stratus_relay_rate_limited_total 1",
            "stratus_relay_appends_total 0",
            "stratus_relay_barrier_seconds_count 1",
            "stratus_relay_store_bytes 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn ready_only_when_every_step_is_done_and_not_stopping() {
        let h = Health::default();
        assert!(h.ready().is_err());
        h.store_opened();
        h.first_barrier_done();
        assert_eq!(h.ready(), Err("not listening yet".into()));
        h.listening();
        assert_eq!(h.ready(), Ok(()));
        h.shutting_down(None);
        assert_eq!(h.ready(), Err("shutting down".into()));
    }
}
