//! Restores: on a connection's first `SyncState`, whether the relay's logs are still the ones
//! this device followed, and if not, the rewind (see the module docs of `core.rs`,
//! "Restores"). Part of [`SyncCore`]; split out of `core.rs` for size.

use super::*;

impl SyncCore {
    /// On the first `SyncState` of a connection: whether the relay's logs are still the ones
    /// this device followed, and if not, the rewind (see the module docs, "Restores").
    pub(super) fn check_incarnation(
        &mut self,
        incarnation: Incarnation,
        account_head: Seq,
        heads: &[(ChatId, Seq)],
        restored: Option<Restored>,
        out: &mut Vec<SyncOutput>,
    ) {
        let (account_floor, floors, resend_after) = match self.incarnation {
            // Never synced (or synced before incarnations were kept): a fresh device has
            // nothing to rewind; the heads check below covers the rest.
            None => (account_head, BTreeMap::new(), None),
            Some(known) if known == incarnation => (account_head, BTreeMap::new(), None),
            // Restored: the relay says how far its logs match every earlier incarnation. A relay
            // that names another store and was never restored shares nothing with the old one.
            Some(_) => match restored {
                Some(r) => (r.account_floor, r.chats.into_iter().collect(), Some(r.client_seq)),
                None => (Seq(0), BTreeMap::new(), Some(ClientSeq(0))),
            },
        };
        let restored = resend_after.is_some();
        let mut lowered = Vec::new();
        for (chat, head) in heads {
            // Under the same incarnation, only a head below the cursor says the relay lost
            // something; after a restore, everything above the floor may be new.
            let floor = if restored { floors.get(chat).copied().unwrap_or_default().min(*head) } else { *head };
            let c = self.chats.entry(*chat).or_default();
            if c.cursor > floor || (restored && !c.ready) {
                c.cursor = c.cursor.min(floor);
                c.known_head = *head;
                lowered.push((*chat, floor));
            }
        }
        let account = account_floor.min(account_head);
        let account_lowered = self.account_cursor > account;
        if account_lowered {
            self.account_cursor = account;
            self.account_applied = self.account_applied.min(account);
            self.account_head = account_head;
        }
        if !restored && lowered.is_empty() && !account_lowered && self.incarnation == Some(incarnation) {
            return;
        }
        if resend_after.is_some() {
            // Loaded again from the start: the driver puts the items the relay lost back in.
            // Nothing was sent on this connection yet (no request goes out before `SyncState`).
            self.outbox.clear();
            self.stale.clear();
            self.outbox_more = true;
            self.outbox_loading = false;
        }
        self.incarnation = Some(incarnation);
        out.push(SyncOutput::Rewind { incarnation, account: self.account_cursor, chats: lowered, resend_after });
    }
}
