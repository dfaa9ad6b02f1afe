//! The relay's limits: what one peer, connection or device may hold or ask for at once.
//!
//! Each limit is a field of [`Limits`] with its default and what a device sees when it hits
//! it; docs/self-hosting.md lists the same in a table with the command-line flags. Where a limit
//! is enforced:
//!
//! * connections in total and per peer, and sync streams per connection: the connection gate
//!   (`core/gate.rs`, sans-IO), carried out by the driver (`server/gate.rs`) right after a
//!   connection's handshake and as a stream opens;
//! * frame size: the driver (`server.rs`);
//! * request rate, appends and fetches in flight: the sans-IO core (`core.rs`), which is given
//!   the time with each frame;
//! * what waits to be written to a device (pushes dropped past a budget, a reader that stopped
//!   cut off): the core too (`core/backlog.rs`), from the driver's reports of what it wrote and
//!   its once-a-second tick;
//! * what a peer without a session may ask (`core/peers.rs`), what an account may store
//!   (`core/quota.rs`) and how fast it appends (`core/chats.rs`), and how fast a chat's
//!   members and key epochs may change (`core/members.rs`): the core.

/// The relay's limits. `Default` gives the documented values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most established connections in total. A connection over the limit is closed right
    /// after its handshake; the device retries with backoff. Default 10,000: at the target of
    /// ≤ 64 KiB per idle device this is well under a GiB, and it keeps file descriptors below
    /// common `ulimit -n` settings once raised.
    pub max_connections: u32,
    /// Most established connections from one peer (device). A device needs one; a few more
    /// cover reconnects racing the close of the old connection. Default 8.
    pub max_connections_per_peer: u32,
    /// Most sync streams per connection. A device opens one per connection; the slack covers a
    /// new stream that arrives before the relay has seen the old one close. A stream over the
    /// limit is reset at once. Default 4.
    pub max_streams_per_connection: u32,
    /// Longest frame a device may send. A longer length prefix gets `FrameTooLarge` and the
    /// stream closes. At most [`MAX_FRAME_BYTES`]; at least [`MIN_FRAME_BYTES`] so that the
    /// largest append still fits. Frames the relay sends are not affected (pages stay up to
    /// [`stratus_engine::proto::wire::MAX_PAGE_BYTES`]). Default [`MAX_FRAME_BYTES`] (1 MiB).
    pub max_frame_bytes: usize,
    /// Most catch-up pages (`FetchChat`, `FetchAccount`) one device has asked for and not yet
    /// been sent in full; more get `RateLimited`. This bounds what a device that asks and does
    /// not read can make the relay hold: about this many pages of 256 KiB. Devices keep 4.
    /// Default 8.
    pub max_fetches_in_flight_per_device: u32,
    /// Most appends one device has had accepted and not yet acknowledged (waiting for their
    /// fsync barrier); more get `RateLimited`. Devices keep 16. Default 64.
    pub max_appends_in_flight_per_device: u32,
    /// Sustained requests per second per device (all its connections together; every request
    /// but `Hello` costs one). Over it a request gets `RateLimited` with the time until the
    /// next one is allowed. 0 turns the limit off. Default 1,000/s: no person types that fast,
    /// a device draining a full outbox window or catching up (pages of 512 deltas) stays under
    /// it, and one device can take at most about 3% of the ~31,000 appends/s the relay was
    /// measured to sustain (docs/benchmarks.md).
    pub requests_per_second: u32,
    /// Requests a device may send at once above the sustained rate (the token bucket's size).
    /// Default 2,000: an outbox of a few thousand messages written offline goes out without
    /// a pause.
    pub request_burst: u32,
    /// How old a device's session must be before it may end other sessions of its account.
    /// Default 24 hours: someone who links a new device to a stolen unlocked phone cannot then
    /// lock the owner's other devices out (the same rule as Telegram's).
    pub min_session_age_ms: u64,
    /// Most circuit reservations (devices reachable through the relay for secret chats) in
    /// total. A device over the limit is not reachable that way (its secret chats wait until it
    /// can be reached directly or a reservation frees). Default 4,096.
    pub max_reservations: u32,
    /// Most relayed connections (circuits) at once in total. Default 256.
    pub max_circuits: u32,
    /// Most circuits one device takes part in at once. Default 8.
    pub max_circuits_per_peer: u32,
    /// How long one circuit may last; the connection is then closed and the devices connect
    /// again (a new Noise session). Default 1 hour.
    pub max_circuit_secs: u32,
    /// Bytes one circuit may carry, both ways together (ciphertext and framing); then it is
    /// closed like one that lasted too long. Default 64 MiB.
    pub max_circuit_bytes: u64,
    /// How much may wait to be written to one device stream before pushes to it (`Push`,
    /// `PushAccount`, `Typing`) are dropped, counted as the frames' cost (encoded length plus
    /// [`crate::core::FRAME_OVERHEAD_BYTES`]; pages are not counted, the fetch limit bounds
    /// them). Once the backlog falls to half of this the device gets one `Behind` with the
    /// durable heads of what it missed, and fetches it. Answers to requests are never dropped.
    /// A device that applies more slowly than the relay pushes (bursts of thousands of messages
    /// a second) thereby stays connected and catches up by pages. At most half of
    /// [`MAX_QUEUED_BYTES`]. Default 1 MiB: about a second of pushes of 100-byte messages at
    /// 2,000/s (each counts about 500 bytes). A device that keeps up has far less waiting (the
    /// driver reports what it wrote every 16 KiB or 100 ms), but one fsync barrier releases the
    /// pushes of every append it covers at once: 16 appends in flight of 16 KiB deltas are
    /// already 256 KiB for each device of the chat.
    pub max_push_backlog_bytes: u64,
    /// How long a device stream may have frames waiting without any of them being written
    /// before the relay cuts it off (at once, dropping what waits): the device has stopped
    /// reading. Checked on the driver's one-second tick, so a cut comes up to a second later.
    /// A device that reads at all, however slowly, is never cut for this, provided it takes at
    /// least one frame (at most 1 MiB) per period. Default 30 s.
    pub stalled_reader_ms: u64,
    /// Bytes one account may have the relay store: the sealed deltas its devices append (each
    /// with [`crate::core::DELTA_OVERHEAD_BYTES`] for its index), and the records and account
    /// log entries its requests write (chats, keys, member changes, rotations, links). Past it,
    /// appends, new chats and added members get `QuotaExceeded` and change nothing; what keeps
    /// the account safe and its chats going (revocations, rotations, new key epochs, leaving,
    /// removing, linking a device, recovery keys) is still taken and counted. 0: no quota.
    /// Default 1 GiB: about two million text messages. The relay deletes nothing yet, so an
    /// account that reaches it stays there until the operator raises it.
    pub max_account_bytes: u64,
    /// Most key epochs a chat reaches by adding members: once its newest epoch is this far,
    /// adding members gets `TooLarge` (make a new group). Leaving, removing and the new epochs
    /// of rotations still go on (each is bounded: by the members, and by the 256 generations an
    /// account has). Each epoch is stored as records of its own, so this bounds a chat's key
    /// records on disk, not what a member change rewrites. Default 4,096.
    pub max_chat_epochs: u32,
    /// Member changes per chat (adding and removing; leaving is never limited): one per this
    /// many ms sustained, after a burst of [`Limits::member_change_burst`]; more get
    /// `RateLimited` with the wait. Every change starts a key epoch that every member's devices
    /// take, so this is what two accounts looping add → leave can cost. Kept in memory (a
    /// restart refills it). 0 turns it off. Default 10 s.
    pub member_change_interval_ms: u64,
    /// Member changes a chat may have at once above the sustained rate. Default 32 (a group
    /// made with a few hundred members, eight at a time, goes through without a pause).
    pub member_change_burst: u32,
    /// Requests per second from a peer with no session on this relay (every frame after
    /// `Hello`, malformed ones too, over all its streams): creating an account, waiting to be
    /// linked, recovering. Over it a request gets `RateLimited` and a malformed frame closes
    /// the stream. Kept per peer while it is connected and until its budget is full again, so
    /// reconnecting does not refill it. 0 turns it off. Default 10/s.
    pub unregistered_requests_per_second: u32,
    /// Requests such a peer may send at once above the sustained rate. Default 20.
    pub unregistered_request_burst: u32,
    /// Bytes per second one account's devices may append, all together, sustained (each
    /// delta counted like [`Limits::max_account_bytes`] counts it: its sealed bytes plus
    /// [`crate::core::DELTA_OVERHEAD_BYTES`]); after a burst of [`Limits::append_bytes_burst`],
    /// an append over it gets `RateLimited` with the time until it fits, and the device's later
    /// appends wait for it. The byte quota bounds how much one account stores; this bounds how
    /// hard it writes meanwhile, so that one account appending large deltas as fast as its
    /// requests go (about 60 MiB/s) cannot take the disk from everyone else (`relay_abuse`,
    /// docs/benchmarks.md). 0 turns it off. Default 4 MiB/s (about 34 Mbit/s): more than a
    /// phone's uplink (the median mobile upload is around 10 Mbit/s) and than most homes',
    /// so a person sending photos or video cut into deltas is paced by their own link, not by
    /// this; a text message is a few hundred bytes.
    pub append_bytes_per_second: u64,
    /// Bytes one account may append at once above the sustained rate (the bucket's size). At
    /// least [`MIN_APPEND_BYTES_BURST`] (the largest delta) while the rate is on. Default 64
    /// MiB: an outbox of about twenty full-size photos written offline goes out at the link's
    /// speed when the device reconnects.
    pub append_bytes_burst: u64,
}

/// Most bytes that may wait to be written to one device stream (counted like
/// [`Limits::max_push_backlog_bytes`], pages excluded): a stream whose answers would pass it
/// is cut off at once. A safety net: pushes stop at the push backlog, and a device that reads
/// never has more than a few answers waiting (the largest is half a frame), so only one that
/// asks and does not read reaches it before [`Limits::stalled_reader_ms`] runs out.
pub const MAX_QUEUED_BYTES: u64 = 8 * 1024 * 1024;

/// Longest frame the protocol allows (see the wire module).
pub use stratus_engine::proto::wire::MAX_FRAME_BYTES;

/// Smallest allowed [`Limits::max_frame_bytes`]: an `Append` carrying the largest delta
/// ([`stratus_engine::proto::wire::MAX_DELTA_BYTES`]) plus its header fits.
pub const MIN_FRAME_BYTES: usize = stratus_engine::proto::wire::MAX_DELTA_BYTES + 4096;

/// How long a device refused for too much in flight is told to wait. Its earlier requests are
/// answered within a barrier or two (a few ms); this leaves room for those answers.
pub const IN_FLIGHT_RETRY_MS: u32 = 100;

/// Smallest allowed [`Limits::append_bytes_burst`]: the largest delta with its overhead fits.
pub const MIN_APPEND_BYTES_BURST: u64 =
    stratus_engine::proto::wire::MAX_DELTA_BYTES as u64 + crate::core::DELTA_OVERHEAD_BYTES;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_connections_per_peer: 8,
            max_streams_per_connection: 4,
            max_frame_bytes: MAX_FRAME_BYTES,
            max_fetches_in_flight_per_device: 8,
            max_appends_in_flight_per_device: 64,
            requests_per_second: 1_000,
            request_burst: 2_000,
            min_session_age_ms: 24 * 3600 * 1000,
            max_reservations: 4096,
            max_circuits: 256,
            max_circuits_per_peer: 8,
            max_circuit_secs: 3600,
            max_circuit_bytes: 64 * 1024 * 1024,
            max_push_backlog_bytes: 1024 * 1024,
            stalled_reader_ms: 30_000,
            max_account_bytes: 1 << 30,
            max_chat_epochs: 4096,
            member_change_interval_ms: 10_000,
            member_change_burst: 32,
            unregistered_requests_per_second: 10,
            unregistered_request_burst: 20,
            append_bytes_per_second: 4 * 1024 * 1024,
            append_bytes_burst: 64 * 1024 * 1024,
        }
    }
}

/// Why a [`Limits`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitsError {
    /// A limit that must be at least 1 is 0.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// The frame limit is outside what the protocol allows.
    #[error("max_frame_bytes must be between {MIN_FRAME_BYTES} and {MAX_FRAME_BYTES}, not {0}")]
    FrameBytes(usize),
    /// The push backlog is 0 or more than half of [`MAX_QUEUED_BYTES`].
    #[error("max_push_backlog_bytes must be between 1 and {max}, not {0}", max = MAX_QUEUED_BYTES / 2)]
    PushBacklog(u64),
    /// The append byte burst cannot hold the largest delta.
    #[error("append_bytes_burst must be at least {MIN_APPEND_BYTES_BURST} (the largest delta), not {0}")]
    AppendBurst(u64),
}

impl Limits {
    /// Checks that every limit can be enforced as documented.
    pub fn validate(&self) -> Result<(), LimitsError> {
        for (name, v) in [
            ("max_connections", self.max_connections),
            ("max_connections_per_peer", self.max_connections_per_peer),
            ("max_streams_per_connection", self.max_streams_per_connection),
            ("max_fetches_in_flight_per_device", self.max_fetches_in_flight_per_device),
            ("max_appends_in_flight_per_device", self.max_appends_in_flight_per_device),
            ("request_burst", self.request_burst),
            ("max_circuit_secs", self.max_circuit_secs),
            ("max_chat_epochs", self.max_chat_epochs),
            ("member_change_burst", self.member_change_burst),
            ("unregistered_request_burst", self.unregistered_request_burst),
        ] {
            if v == 0 {
                return Err(LimitsError::Zero(name));
            }
        }
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return Err(LimitsError::FrameBytes(self.max_frame_bytes));
        }
        if !(1..=MAX_QUEUED_BYTES / 2).contains(&self.max_push_backlog_bytes) {
            return Err(LimitsError::PushBacklog(self.max_push_backlog_bytes));
        }
        if self.stalled_reader_ms == 0 {
            return Err(LimitsError::Zero("stalled_reader_ms"));
        }
        if self.append_bytes_per_second != 0 && self.append_bytes_burst < MIN_APPEND_BYTES_BURST {
            return Err(LimitsError::AppendBurst(self.append_bytes_burst));
        }
        Ok(())
    }
}

/// A token bucket in thousandths of a token, fed by the caller's clock.
///
/// A rate of `r` tokens per second adds exactly `r` thousandths per millisecond, so integer
/// arithmetic is exact and the bucket is deterministic for a given sequence of `now_ms`.
#[derive(Debug, Clone, Default)]
pub struct TokenBucket {
    milli_tokens: u64,
    last_ms: Option<u64>,
}

impl TokenBucket {
    /// Takes one token at `now_ms`, or returns how many ms until one is there. The bucket
    /// starts full. A clock that goes backwards adds nothing. `rate_per_s == 0` means no limit.
    pub fn take(&mut self, now_ms: u64, rate_per_s: u32, burst: u32) -> Result<(), u32> {
        self.take_n(now_ms, u64::from(rate_per_s), u64::from(burst), 1)
    }

    /// Takes `n` tokens at once (bytes, say), or returns how many ms until `n` are there and
    /// takes none. As [`TokenBucket::take`] otherwise; `n` above `burst` is never there (the
    /// caller keeps `burst` at least the largest `n`).
    pub fn take_n(&mut self, now_ms: u64, rate_per_s: u64, burst: u64, n: u64) -> Result<(), u32> {
        if rate_per_s == 0 {
            return Ok(());
        }
        let cap = burst.max(1).saturating_mul(1000);
        let cost = n.saturating_mul(1000);
        self.milli_tokens = match self.last_ms {
            None => cap,
            Some(last) => {
                self.milli_tokens.saturating_add(now_ms.saturating_sub(last).saturating_mul(rate_per_s)).min(cap)
            }
        };
        self.last_ms = Some(self.last_ms.map_or(now_ms, |l| l.max(now_ms)));
        if self.milli_tokens >= cost {
            self.milli_tokens -= cost;
            Ok(())
        } else {
            let wait = (cost - self.milli_tokens).div_ceil(rate_per_s);
            Err(u32::try_from(wait).unwrap_or(u32::MAX).max(1))
        }
    }
}

/// A token bucket for slow rates: one token every `interval_ms`, fed by the caller's clock.
/// Credit is kept in milliseconds, so it is exact for any interval.
#[derive(Debug, Clone, Default)]
pub struct IntervalBucket {
    credit_ms: u64,
    last_ms: Option<u64>,
}

impl IntervalBucket {
    /// Takes one token at `now_ms`, or returns how many ms until one is there. The bucket
    /// starts full (`burst` tokens). A clock that goes backwards adds nothing. `interval_ms == 0`
    /// means no limit.
    pub fn take(&mut self, now_ms: u64, interval_ms: u64, burst: u32) -> Result<(), u32> {
        if interval_ms == 0 {
            return Ok(());
        }
        let cap = interval_ms.saturating_mul(u64::from(burst.max(1)));
        self.credit_ms = match self.last_ms {
            None => cap,
            Some(last) => self.credit_ms.saturating_add(now_ms.saturating_sub(last)).min(cap),
        };
        self.last_ms = Some(self.last_ms.map_or(now_ms, |l| l.max(now_ms)));
        if self.credit_ms >= interval_ms {
            self.credit_ms -= interval_ms;
            Ok(())
        } else {
            Err(u32::try_from(interval_ms - self.credit_ms).unwrap_or(u32::MAX).max(1))
        }
    }
}

impl TokenBucket {
    /// True when the bucket would be full at `now_ms`: it is then the same as a new one, and
    /// may be dropped.
    pub fn is_full(&self, now_ms: u64, rate_per_s: u32, burst: u32) -> bool {
        let Some(last) = self.last_ms else { return true };
        let cap = u64::from(burst.max(1)) * 1000;
        rate_per_s == 0
            || self.milli_tokens.saturating_add(now_ms.saturating_sub(last).saturating_mul(u64::from(rate_per_s)))
                >= cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate_and_says_how_long_to_wait() {
        let mut b = TokenBucket::default();
        for _ in 0..5 {
            assert_eq!(b.take(1000, 10, 5), Ok(()));
        }
        // Empty: 10/s means one every 100 ms.
        assert_eq!(b.take(1000, 10, 5), Err(100));
        assert_eq!(b.take(1040, 10, 5), Err(60));
        assert_eq!(b.take(1100, 10, 5), Ok(()));
        // A long pause refills to the burst, no more.
        for _ in 0..5 {
            assert_eq!(b.take(100_000, 10, 5), Ok(()));
        }
        assert!(b.take(100_000, 10, 5).is_err());
        // A clock that goes backwards adds nothing and does not panic.
        assert!(b.take(0, 10, 5).is_err());
        // Off.
        assert_eq!(TokenBucket::default().take(0, 0, 1), Ok(()));
    }

    #[test]
    fn the_bucket_takes_many_tokens_at_once_or_none() {
        // 1,000 bytes/s, 5,000 at once.
        let mut b = TokenBucket::default();
        assert_eq!(b.take_n(0, 1000, 5000, 4000), Ok(()));
        // 1,000 left: 3,000 more are 2 s away, and a refusal takes nothing.
        assert_eq!(b.take_n(0, 1000, 5000, 3000), Err(2000));
        assert_eq!(b.take_n(0, 1000, 5000, 1000), Ok(()));
        assert_eq!(b.take_n(1500, 1000, 5000, 1500), Ok(()));
        assert_eq!(b.take_n(1500, 1000, 5000, 1), Err(1));
        // Huge values saturate rather than overflow.
        let mut b = TokenBucket::default();
        assert_eq!(b.take_n(u64::MAX, u64::MAX, u64::MAX, u64::MAX / 1000), Ok(()));
        assert_eq!(TokenBucket::default().take_n(0, 0, 0, u64::MAX), Ok(()), "off");
    }

    #[test]
    fn the_interval_bucket_allows_a_burst_then_one_per_interval() {
        let mut b = IntervalBucket::default();
        for _ in 0..3 {
            assert_eq!(b.take(0, 10_000, 3), Ok(()));
        }
        assert_eq!(b.take(0, 10_000, 3), Err(10_000));
        assert_eq!(b.take(4_000, 10_000, 3), Err(6_000));
        assert_eq!(b.take(10_000, 10_000, 3), Ok(()));
        assert!(b.take(5, 10_000, 3).is_err(), "a clock that goes backwards adds nothing");
        assert_eq!(IntervalBucket::default().take(0, 0, 1), Ok(()));
        let mut t = TokenBucket::default();
        assert!(t.is_full(0, 10, 2));
        t.take(0, 10, 2).unwrap();
        assert!(!t.is_full(50, 10, 2));
        assert!(t.is_full(100, 10, 2));
    }

    #[test]
    fn defaults_are_valid_and_bad_values_are_typed_errors() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let l = Limits { max_frame_bytes: 10, ..Limits::default() };
        assert_eq!(l.validate(), Err(LimitsError::FrameBytes(10)));
        let l = Limits { max_appends_in_flight_per_device: 0, ..Limits::default() };
        assert!(matches!(l.validate(), Err(LimitsError::Zero(_))));
        let l = Limits { max_push_backlog_bytes: MAX_QUEUED_BYTES, ..Limits::default() };
        assert_eq!(l.validate(), Err(LimitsError::PushBacklog(MAX_QUEUED_BYTES)));
        let l = Limits { stalled_reader_ms: 0, ..Limits::default() };
        assert_eq!(l.validate(), Err(LimitsError::Zero("stalled_reader_ms")));
        let l = Limits { append_bytes_burst: MIN_APPEND_BYTES_BURST - 1, ..Limits::default() };
        assert_eq!(l.validate(), Err(LimitsError::AppendBurst(MIN_APPEND_BYTES_BURST - 1)));
        let l = Limits { append_bytes_per_second: 0, append_bytes_burst: 0, ..Limits::default() };
        assert_eq!(l.validate(), Ok(()), "a burst is not needed while the rate is off");
    }
}
