//! What the sync core asks of the relay next, once connected: the account log, the chats
//! past their cursors (at most [`MAX_FETCHES_IN_FLIGHT`] pages at once), the outbox in
//! client-seq order (at most [`MAX_APPENDS_IN_FLIGHT`] appends unanswered, and none until the
//! account log is applied as far as the relay has it and no rotation is due), a rotation that is
//! due, and more of the outbox from the store. Part of [`SyncCore`]; split out of `core.rs` for
//! size.

use super::*;

impl SyncCore {
    pub(super) fn schedule(&mut self, out: &mut Vec<SyncOutput>) {
        if self.phase != Phase::Ready || self.paused {
            return;
        }
        if self.account_cursor < self.account_head
            && !self.account_fetching
            && self.fetches_in_flight < MAX_FETCHES_IN_FLIGHT
        {
            let req = self.next_req();
            self.pending.insert(req, Pending::FetchAccount);
            self.account_fetching = true;
            self.fetches_in_flight += 1;
            out.push(SyncOutput::Send(ClientFrame::FetchAccount {
                req,
                after: self.account_cursor,
                max: MAX_PAGE_DELTAS,
            }));
        }
        for (chat, c) in self.chats.iter_mut() {
            if self.fetches_in_flight >= MAX_FETCHES_IN_FLIGHT {
                break;
            }
            if c.ready && c.fetching.is_none() && c.cursor < c.known_head {
                let req = self.next_req;
                self.next_req += 1;
                self.pending.insert(req, Pending::FetchChat(*chat));
                c.fetching = Some(req);
                self.fetches_in_flight += 1;
                out.push(SyncOutput::Send(ClientFrame::FetchChat {
                    req,
                    chat: *chat,
                    after: c.cursor,
                    max: MAX_PAGE_DELTAS,
                }));
            }
        }
        if self.resending && self.appends_in_flight == 0 {
            self.resending = false;
        }
        // Nothing goes out under keys the device may not know have ended: not before the
        // account log is read and applied as far as the relay has it, nor while a rotation
        // (new epochs for every chat) is due or under way, nor until the heads asked for after
        // one are known (issue 15, item 6).
        let keys_current = self.account_cursor >= self.account_head
            && self.account_applied >= self.account_cursor
            && !self.rotation_due
            && !self.rotating
            && self.refreshing.is_none();
        for slot in self.outbox.iter_mut() {
            if !keys_current || self.resending || self.appends_in_flight >= MAX_APPENDS_IN_FLIGHT {
                break;
            }
            let item = &slot.item;
            if self.stale.contains(&item.client_seq) {
                // Nothing after it goes before it does.
                break;
            }
            if !slot.sent {
                slot.sent = true;
                slot.resealed = false;
                let req = self.next_req;
                self.next_req += 1;
                self.pending.insert(req, Pending::Append(item.client_seq));
                self.appends_in_flight += 1;
                out.push(SyncOutput::Send(match &item.body {
                    OutboxBody::Delta { sealed, .. } => ClientFrame::Append {
                        req,
                        chat: item.chat,
                        epoch: item.epoch,
                        client_seq: item.client_seq,
                        sealed: sealed.clone(),
                    },
                    OutboxBody::CreateChat { kind, keys } => ClientFrame::CreateChat {
                        req,
                        chat: item.chat,
                        kind: *kind,
                        epoch: item.epoch,
                        client_seq: item.client_seq,
                        keys: keys.clone(),
                    },
                }));
            }
        }
        if self.rotation_due && !self.rotating && self.rotate_attempts < MAX_ROTATE_ATTEMPTS && self.is_caught_up() {
            let req = self.next_req();
            self.pending.insert(req, Pending::Rotate);
            self.rotating = true;
            self.rotate_attempts += 1;
            out.push(SyncOutput::Rotate { req });
        }
        if self.outbox_more && !self.outbox_loading && self.outbox.len() < OUTBOX_WINDOW / 2 {
            self.outbox_loading = true;
            let after = self.outbox.back().map(|s| s.item.client_seq).unwrap_or_default();
            out.push(SyncOutput::LoadOutbox { after, max: OUTBOX_WINDOW - self.outbox.len() });
        }
    }
}
