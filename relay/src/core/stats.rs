//! Counts read from the core's index for the operator's metrics (see `crate::metrics`). Part of
//! [`RelayCore`]; reads only, decides nothing.

use super::*;

/// Upper bounds of the buckets [`CoreStats::chats_by_log_length`] counts chats in (the last
/// bucket, past these, is unbounded).
pub const LOG_LENGTH_BUCKETS: [u64; 6] = [10, 100, 1_000, 10_000, 100_000, 1_000_000];

/// What the relay holds now. Chat logs are summarised, never listed one by one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Open device streams.
    pub streams: u64,
    /// Devices (peers) with at least one stream open.
    pub connected_devices: u64,
    /// Accounts stored (deleted ones not counted).
    pub accounts: u64,
    /// Chats stored.
    pub chats: u64,
    /// Deltas in all chats' logs (their heads added up).
    pub chat_log_deltas: u64,
    /// Deltas in the longest chat log.
    pub chat_log_max: u64,
    /// Chats whose log holds at most each of [`LOG_LENGTH_BUCKETS`] deltas, cumulative, and
    /// then all chats.
    pub chats_by_log_length: [u64; LOG_LENGTH_BUCKETS.len() + 1],
}

impl RelayCore {
    /// The counts for the metrics. Walks every peer and chat: the driver asks once a second,
    /// not per input.
    pub fn stats(&self) -> CoreStats {
        let mut s = CoreStats {
            streams: self.conns.len() as u64,
            connected_devices: self.peers.values().filter(|p| p.has_streams()).count() as u64,
            accounts: self.accounts.values().filter(|a| !a.admin.deleted).count() as u64,
            chats: self.chats.len() as u64,
            ..CoreStats::default()
        };
        for chat in self.chats.values() {
            let len = chat.durable.0;
            s.chat_log_deltas = s.chat_log_deltas.saturating_add(len);
            s.chat_log_max = s.chat_log_max.max(len);
            let first = LOG_LENGTH_BUCKETS.iter().position(|le| len <= *le).unwrap_or(LOG_LENGTH_BUCKETS.len());
            for bucket in &mut s.chats_by_log_length[first..] {
                *bucket += 1;
            }
        }
        s
    }
}
