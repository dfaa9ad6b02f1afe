//! The per-device limits the core enforces: the request rate with held-back client seqs, and
//! catch-up pages in flight (see [`crate::limits::Limits`]). Part of [`RelayCore`]; split out of
//! `core.rs` for size.

use super::*;

impl RelayCore {
    /// The rate limit and the held-back client seqs, checked before anything else: `Some` with
    /// the retry-after when `frame` is refused. Only registered devices are limited here; a
    /// peer without a session has a budget of its own (`core/peers.rs`).
    pub(super) fn over_rate(&mut self, device: &DeviceId, frame: &ClientFrame, now_ms: u64) -> Option<u32> {
        let limits = &self.limits;
        let dev = self.devices.get_mut(device)?;
        // Outbox items: appends and chat creations, ordered by client seq.
        let append_seq = match frame {
            ClientFrame::Append { client_seq, .. } | ClientFrame::CreateChat { client_seq, .. } => Some(*client_seq),
            _ => None,
        };
        if let (Some(cs), Some(held)) = (append_seq, dev.held) {
            if cs > held {
                // Nothing is taken from the bucket: the device is told to wait, not charged.
                let wait = match dev.bucket.clone().take(now_ms, limits.requests_per_second, limits.request_burst) {
                    Ok(()) => IN_FLIGHT_RETRY_MS,
                    Err(ms) => ms.max(IN_FLIGHT_RETRY_MS),
                };
                return Some(wait);
            }
            if cs == held {
                dev.held = None;
            }
        }
        match dev.bucket.take(now_ms, limits.requests_per_second, limits.request_burst) {
            Ok(()) => None,
            Err(ms) => {
                if let Some(cs) = append_seq {
                    hold(dev, cs);
                }
                Some(ms)
            }
        }
    }

    pub(super) fn fetches_full(&self, device: &DeviceId) -> bool {
        self.devices.get(device).is_some_and(|d| d.fetches_in_flight >= self.limits.max_fetches_in_flight_per_device)
    }

    pub(super) fn fetch_started(&mut self, conn: ConnId, device: &DeviceId) {
        if let Some(d) = self.devices.get_mut(device) {
            d.fetches_in_flight += 1;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.fetches_in_flight += 1;
        }
    }
}

/// Marks `cs` refused for a limit: later client seqs wait until it comes again.
pub(super) fn hold(dev: &mut Device, cs: ClientSeq) {
    dev.held = Some(dev.held.map_or(cs, |h| h.min(cs)));
}
