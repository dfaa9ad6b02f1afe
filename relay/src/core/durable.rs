//! Answering only what is durable: each write gets a token, and what waits for it (an
//! acknowledgement, a push, an answer) runs once a barrier covers the token; the account log's
//! entries and the chat keys they hand out, written with the request that makes them. Part of
//! [`RelayCore`]; split out of `core.rs` for size.

use super::*;

impl RelayCore {
    pub(super) fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Runs `d` once everything written so far is durable (and refuses it at once if that can
    /// no longer happen: the disk is full).
    pub(super) fn after_durable(&mut self, d: Deferred, out: &mut Vec<Effect>) {
        let last = self.next_token - 1;
        if last <= self.durable_token {
            self.run_deferred(d, out);
        } else if self.storage_failed {
            self.refuse_deferred(d, out);
        } else {
            self.deferred.push_back((last, d));
        }
    }

    pub(super) fn durable(&mut self, token: u64, out: &mut Vec<Effect>) {
        self.durable_token = self.durable_token.max(token);
        while let Some((t, _)) = self.deferred.front() {
            if *t > self.durable_token {
                break;
            }
            let (_, d) = self.deferred.pop_front().expect("front exists");
            self.run_deferred(d, out);
        }
    }

    pub(super) fn run_deferred(&mut self, d: Deferred, out: &mut Vec<Effect>) {
        match d {
            // A stream whose session ended since gets only the end (see `end_stream`).
            Deferred::Send(conn, frame) => {
                if self.conns.get(&conn).is_some_and(|c| !c.ending && !c.refused) {
                    out.push(Effect::Send { conn, frame });
                }
            }
            Deferred::AppendDone(conn, device, frame) => {
                if let Some(d) = self.devices.get_mut(&device) {
                    d.appends_in_flight = d.appends_in_flight.saturating_sub(1);
                }
                if self.conns.get(&conn).is_some_and(|c| !c.ending && !c.refused) {
                    out.push(Effect::Send { conn, frame });
                }
            }
            Deferred::ChatDurable { delta, from } => {
                let Some(chat) = self.chats.get_mut(&delta.chat) else { return };
                chat.durable = chat.durable.max(delta.seq);
                for member in &chat.record.members {
                    for conn in self.conns_by_account.get(member).into_iter().flatten() {
                        if *conn != from {
                            out.push(Effect::Send { conn: *conn, frame: RelayFrame::Push { delta: delta.clone() } });
                        }
                    }
                }
            }
            Deferred::EndSession(conn) => self.send_session_end(conn, true, out),
            Deferred::Admin(id, answer) => out.push(Effect::Admin { id, answer: Ok(answer) }),
            Deferred::AccountDurable { account, entry } => {
                let Some(a) = self.accounts.get_mut(&account) else { return };
                a.log_durable = a.log_durable.max(entry.seq);
                for conn in self.conns_by_account.get(&account).into_iter().flatten() {
                    out.push(Effect::Send { conn: *conn, frame: RelayFrame::PushAccount { entry: entry.clone() } });
                }
            }
        }
    }

    /// Logs each key handed out on `terms` as `ChatAdded` in its recipient's log, signed by
    /// `signer` (with `signer`'s keys for the other accounts), into `ops`; returns the entries
    /// to push once durable.
    pub(super) fn log_chat_keys(
        &mut self,
        terms: &KeyTerms,
        keys: Vec<WrappedKey>,
        signer: AccountId,
        ops: &mut Vec<StoreOp>,
    ) -> Vec<(AccountId, AccountEntry)> {
        let chain = self.chain_of(signer);
        let mut entries = Vec::new();
        for key in keys {
            let account = key.account;
            let signer_chain = (account != signer).then(|| chain.clone());
            let event = AccountEvent::ChatAdded { terms: terms.clone(), key, signer, signer_chain };
            entries.push((account, self.log_entry(account, event, ops)));
        }
        entries
    }

    /// An account's keys through all their generations, as the directory serves them.
    pub(super) fn chain_of(&self, account: AccountId) -> AccountChain {
        let a = &self.accounts[&account];
        AccountChain { public: a.public.clone(), rotations: a.rotations.clone() }
    }

    /// Writes `ops` in one batch, counted against `account`'s quota, and, once it is durable,
    /// pushes `entries` to their accounts and answers `Done` to `req`.
    pub(super) fn commit_and_answer(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        ops: Vec<StoreOp>,
        entries: Vec<(AccountId, AccountEntry)>,
        out: &mut Vec<Effect>,
    ) {
        self.write_for(account, ops, out);
        for (account, entry) in entries {
            self.after_durable(Deferred::AccountDurable { account, entry }, out);
        }
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
    }

    pub(super) fn log_entry(
        &mut self,
        account: AccountId,
        event: AccountEvent,
        ops: &mut Vec<StoreOp>,
    ) -> AccountEntry {
        let a = self.accounts.get_mut(&account).expect("caller checked the account exists");
        a.log_head = a.log_head.next();
        let entry = AccountEntry { seq: a.log_head, event };
        // A deleted account stays a member of the chats it shared (see `core/admin.rs`): what
        // their members hand it out is not kept, as nobody can fetch it.
        if !a.admin.deleted {
            ops.push(StoreOp::PutAccountEntry(account, entry.clone()));
        }
        entry
    }
}
