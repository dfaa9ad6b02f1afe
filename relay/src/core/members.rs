//! The directory (usernames, lookups) and the members of direct chats and groups: changes, and
//! the new key epochs they call for (see docs/crypto.md, "Members"). Part of [`RelayCore`];
//! split out of `core.rs` for size.
//!
//! What member changes may cost: each starts a key epoch whose keys every member's devices take,
//! so adding and removing members is rate limited per chat
//! ([`Limits::member_change_interval_ms`]), and adding stops once a chat's newest epoch has
//! reached [`Limits::max_chat_epochs`]. Leaving is never limited. A new epoch writes only its
//! own keys (one record per member) and the small chat record, never the earlier epochs'.

use stratus_engine::proto::directory::{
    check_username, DirectoryEntry, MemberChange, Membership, MAX_ADDED_AT_ONCE, MAX_LOOKUP_ACCOUNTS, MAX_SHARED_EPOCHS,
};
use stratus_engine::proto::wire::{NewEpoch, MAX_FRAME_BYTES};

use super::*;

type Refusal = (ErrorCode, String);

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    (code, message.into())
}

impl RelayCore {
    /// The directory's and the members' requests of a logged-in device.
    pub(super) fn members_frame(
        &mut self,
        conn: ConnId,
        account: AccountId,
        frame: ClientFrame,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), Refusal> {
        match frame {
            ClientFrame::SetUsername { req, name } => self.set_username(conn, req, account, name, out),
            ClientFrame::Lookup { req, username } => {
                let Some(found) = self.usernames.get(&username).copied() else {
                    return Err(refuse(ErrorCode::NotFound, format!("nobody has the username {username}")));
                };
                let accounts = vec![self.entry_of(found, account)];
                out.push(Effect::Send { conn, frame: RelayFrame::Accounts { req, accounts } });
                Ok(())
            }
            ClientFrame::LookupAccounts { req, accounts } => {
                if accounts.len() > MAX_LOOKUP_ACCOUNTS {
                    return Err(refuse(
                        ErrorCode::TooLarge,
                        format!("at most {MAX_LOOKUP_ACCOUNTS} accounts a lookup"),
                    ));
                }
                // As many as fit half a frame (chains grow with rotations); the device asks
                // again for the rest.
                let mut found = Vec::new();
                let mut bytes = 0;
                for a in accounts.iter().filter(|a| self.accounts.contains_key(a)) {
                    let entry = self.entry_of(*a, account);
                    bytes += postcard::to_allocvec(&entry).map_or(MAX_FRAME_BYTES, |b| b.len());
                    if !found.is_empty() && bytes > MAX_FRAME_BYTES / 2 {
                        break;
                    }
                    found.push(entry);
                }
                out.push(Effect::Send { conn, frame: RelayFrame::Accounts { req, accounts: found } });
                Ok(())
            }
            frame @ (ClientFrame::AccountDevices { .. }
            | ClientFrame::Accept { .. }
            | ClientFrame::Invite { .. }
            | ClientFrame::ListInvitations { .. }) => self.consent_frame(conn, account, frame, now_ms, out),
            ClientFrame::ChangeMembers { req, change } => self.change_members(conn, req, account, change, now_ms, out),
            ClientFrame::Rekey { req, epoch, history } => self.rekey(conn, req, account, epoch, history, out),
            _ => unreachable!("the caller passes only the frames above"),
        }
    }

    fn entry_of(&self, account: AccountId, asker: AccountId) -> DirectoryEntry {
        DirectoryEntry {
            username: self.accounts[&account].username.clone(),
            chain: self.chain_of(account),
            accepts_you: self.accepts(account, asker),
        }
    }

    fn set_username(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        name: Option<String>,
        out: &mut Vec<Effect>,
    ) -> Result<(), Refusal> {
        if let Some(n) = &name {
            check_username(n).map_err(|e| refuse(ErrorCode::NotAllowed, e.to_string()))?;
            if self.usernames.get(n).is_some_and(|owner| *owner != account) {
                return Err(refuse(ErrorCode::AlreadyExists, format!("the username {n} is taken")));
            }
        }
        let a = self.accounts.get_mut(&account).expect("an attached connection's account exists");
        if let Some(old) = a.username.take() {
            self.usernames.remove(&old);
        }
        a.username = name.clone();
        if let Some(n) = &name {
            self.usernames.insert(n.clone(), account);
        }
        self.commit_and_answer(conn, req, account, vec![StoreOp::PutUsername(account, name)], Vec::new(), out);
        Ok(())
    }

    /// Checks keys handed out on `terms` by `signer`: one per recipient, each wrapped to the
    /// recipient's current generation and signed by `signer`'s current one (an older one is
    /// `StaleEpoch`: the device looks the keys up, or takes its own rotation, and asks again).
    /// The keys of a new epoch are whole epoch keys (`content`).
    pub(super) fn check_keys(&self, signer: AccountId, terms: &KeyTerms, keys: &[WrappedKey]) -> Result<(), Refusal> {
        if keys.iter().any(|k| !k.content) {
            return Err(refuse(ErrorCode::BadCertificate, "a new epoch's key is handed out whole"));
        }
        self.check_grants(signer, terms, keys)
    }

    fn check_grants(&self, signer: AccountId, terms: &KeyTerms, keys: &[WrappedKey]) -> Result<(), Refusal> {
        let recipients: BTreeSet<AccountId> = keys.iter().map(|k| k.account).collect();
        if recipients.len() != keys.len() {
            return Err(refuse(ErrorCode::BadCertificate, "a chat key wrapped twice to one account"));
        }
        for k in keys {
            let Some(a) = self.accounts.get(&k.account) else {
                return Err(refuse(ErrorCode::NotFound, format!("no account {}", k.account)));
            };
            let current = a.gens.last().expect("an account keeps its genesis").generation;
            if k.generation != current {
                return Err(refuse(
                    ErrorCode::StaleEpoch,
                    format!("account {} rotated its keys; look them up again", k.account),
                ));
            }
            self.check_signed(signer, "a wrapped chat key", |g| g.verify_chat_key(terms, k))?;
        }
        Ok(())
    }

    /// Changes a chat's members as a member signed it, for the chat's newest epoch: logged to
    /// every member before and after, and the chat is due its next epoch (nothing more is
    /// stored under the current one, which the departed may hold). Adding and removing take
    /// from the chat's budget of member changes (`RateLimited` when it is spent); adding is
    /// refused once the chat has had [`Limits::max_chat_epochs`] epochs, or the adding account
    /// is over its quota.
    fn change_members(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        change: MemberChange,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), Refusal> {
        let b = &change.body;
        if b.by != account {
            return Err(refuse(ErrorCode::BadCertificate, "a member change signed for another account"));
        }
        let chat =
            self.chats.get(&b.chat).ok_or_else(|| refuse(ErrorCode::UnknownChat, format!("no chat {}", b.chat)))?;
        let record = &chat.record;
        if !record.members.contains(&account) {
            return Err(refuse(ErrorCode::NotMember, format!("this account is not a member of chat {}", b.chat)));
        }
        let newest = record.newest;
        if b.base_epoch != newest || b.seq != record.changes {
            return Err(refuse(
                ErrorCode::StaleEpoch,
                format!("chat {} is at epoch {}; sync and ask again", b.chat, newest.0),
            ));
        }
        match (record.kind, &b.change) {
            (ChatKind::Notes, _) => return Err(refuse(ErrorCode::NotAllowed, "a notes chat has no other members")),
            (ChatKind::Direct, Membership::Add { .. } | Membership::Remove { .. }) => {
                return Err(refuse(ErrorCode::NotAllowed, "a direct chat's members do not change; make a group"))
            }
            (_, Membership::Add { accounts, .. }) => {
                // The next `Rekey` hands every account added since the last epoch the earlier
                // keys, in one frame.
                if accounts.is_empty() || record.joining.len() + accounts.len() > MAX_ADDED_AT_ONCE {
                    return Err(refuse(
                        ErrorCode::TooLarge,
                        format!("at most {MAX_ADDED_AT_ONCE} accounts join between two key epochs"),
                    ));
                }
                if record.members.len() + accounts.len() > MAX_CHAT_MEMBERS {
                    return Err(refuse(ErrorCode::TooLarge, format!("a chat has at most {MAX_CHAT_MEMBERS} members")));
                }
                let max_epochs = self.limits.max_chat_epochs;
                if newest.0 >= max_epochs {
                    return Err(refuse(
                        ErrorCode::TooLarge,
                        format!("this chat has had {max_epochs} key epochs, as many as adding members may start; make a new group"),
                    ));
                }
                self.check_quota(account, 1)?;
                for a in accounts {
                    match self.accounts.get(a).filter(|acct| !acct.admin.deleted) {
                        None => return Err(refuse(ErrorCode::NotFound, format!("no account {a}"))),
                        Some(_) if record.members.contains(a) => {
                            return Err(refuse(ErrorCode::AlreadyExists, format!("{a} is a member already")))
                        }
                        Some(acct) if acct.chats.len() >= MAX_ACCOUNT_CHATS => {
                            return Err(refuse(ErrorCode::TooLarge, format!("{a} is in too many chats")))
                        }
                        Some(_) => {}
                    }
                }
                // Nobody is added without having accepted chats from the member adding it.
                self.check_consent(account, accounts.iter())?;
            }
            (_, Membership::Remove { account: target }) => {
                if record.creator != account {
                    return Err(refuse(ErrorCode::NotAllowed, "only the group's creator removes members"));
                }
                if !record.members.contains(target) || *target == account {
                    return Err(refuse(ErrorCode::NotMember, format!("{target} is not another member")));
                }
            }
            (_, Membership::Leave) => {}
        }
        self.check_signed(account, "the member change", |g| g.verify_member_change(&change))?;
        if !matches!(b.change, Membership::Leave) {
            let (interval, burst) = (self.limits.member_change_interval_ms, self.limits.member_change_burst);
            let chat = self.chats.get_mut(&b.chat).expect("checked above");
            if let Err(retry_after_ms) = chat.member_changes.take(now_ms, interval, burst) {
                out.push(Effect::Send { conn, frame: RelayFrame::RateLimited { req, retry_after_ms } });
                return Ok(());
            }
        }

        let record = &self.chats[&b.chat].record;
        let before = record.members.clone();
        let after = b.apply(&before);
        let chat_id = b.chat;
        let chat = self.chats.get_mut(&chat_id).expect("checked above");
        chat.record.members = after.clone();
        chat.record.rekey_due = !after.is_empty();
        chat.record.changes += 1;
        if let Membership::Add { accounts, share_history } = &b.change {
            chat.record.joining.extend(accounts.iter().copied());
            if *share_history {
                chat.record.share_with.extend(accounts.iter().copied());
            }
        }
        if let Some(gone) = b.departed() {
            chat.record.joining.remove(&gone);
            chat.record.share_with.remove(&gone);
            self.accounts.get_mut(&gone).expect("members exist").chats.remove(&chat_id);
        }
        for a in after.difference(&before) {
            self.accounts.get_mut(a).expect("checked above").chats.insert(chat_id);
        }
        let mut ops = vec![StoreOp::PutChat(chat_id, self.chats[&chat_id].record.clone())];
        let chain = self.chain_of(account);
        let mut entries = Vec::new();
        for m in before.union(&after) {
            let by_chain = (*m != account).then(|| chain.clone());
            let event = AccountEvent::MembersChanged { change: change.clone(), by_chain };
            entries.push((*m, self.log_entry(*m, event, &mut ops)));
        }
        self.commit_and_answer(conn, req, account, ops, entries, out);
        Ok(())
    }

    /// Takes a chat's next epoch after its members changed (or a member's keys were rotated):
    /// the key wrapped to exactly the members, and earlier epochs' keys for members added with
    /// their history. `Done` without a change when none is due any more.
    fn rekey(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        new: NewEpoch,
        history: Vec<NewEpoch>,
        out: &mut Vec<Effect>,
    ) -> Result<(), Refusal> {
        let chat =
            self.chats.get(&new.chat).ok_or_else(|| refuse(ErrorCode::UnknownChat, format!("no chat {}", new.chat)))?;
        let record = &chat.record;
        if !record.members.contains(&account) {
            return Err(refuse(ErrorCode::NotMember, format!("this account is not a member of chat {}", new.chat)));
        }
        if record.joining.contains(&account) {
            // It has no earlier keys to give the others who join with it.
            return Err(refuse(ErrorCode::NotAllowed, "an account that is joining does not start the epoch"));
        }
        if !record.rekey_due {
            // Another device made it first; the account log brings it.
            self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
            return Ok(());
        }
        let newest = record.newest;
        if newest.0.checked_add(1) != Some(new.epoch.0) {
            return Err(refuse(
                ErrorCode::StaleEpoch,
                format!("chat {} is at epoch {}; sync and ask again", new.chat, newest.0),
            ));
        }
        let recipients: BTreeSet<AccountId> = new.keys.iter().map(|k| k.account).collect();
        if recipients != record.members {
            return Err(refuse(
                ErrorCode::StaleEpoch,
                "the new epoch is not wrapped to exactly the members; sync and ask again",
            ));
        }
        let terms = KeyTerms { chat: new.chat, kind: record.kind, epoch: new.epoch, members: record.members.clone() };
        self.check_keys(account, &terms, &new.keys)?;
        if history.len() > MAX_SHARED_EPOCHS {
            return Err(refuse(ErrorCode::TooLarge, format!("at most {MAX_SHARED_EPOCHS} earlier epochs are shared")));
        }
        for h in &history {
            if h.chat != new.chat || h.epoch > newest {
                return Err(refuse(ErrorCode::UnknownEpoch, "history for an epoch the chat does not have"));
            }
            if h.keys.iter().any(|k| !record.joining.contains(&k.account)) {
                return Err(refuse(ErrorCode::NotAllowed, "earlier keys for an account that is not joining"));
            }
            if h.keys.iter().any(|k| k.content && !record.share_with.contains(&k.account)) {
                return Err(refuse(ErrorCode::NotAllowed, "the history for an account not added with it"));
            }
            self.check_grants(account, &KeyTerms { epoch: h.epoch, ..terms.clone() }, &h.keys)?;
        }

        let chat = self.chats.get_mut(&new.chat).expect("checked above");
        chat.record.newest = new.epoch;
        chat.record.rekey_due = false;
        chat.record.joining.clear();
        chat.record.share_with.clear();
        chat.record.changes = 0;
        // Each epoch's keys are records of their own: the earlier epochs' keys handed to new
        // members are added beside the ones there, nothing is rewritten.
        let mut ops = vec![StoreOp::PutChat(new.chat, chat.record.clone())];
        let mut grants = Vec::new();
        for h in history {
            ops.push(StoreOp::PutChatKeys(new.chat, h.epoch, h.keys.clone()));
            grants.push((KeyTerms { epoch: h.epoch, ..terms.clone() }, h.keys));
        }
        ops.push(StoreOp::PutChatKeys(new.chat, new.epoch, new.keys.clone()));
        // Earlier epochs first: a new member's device has them before deltas of the new one.
        let mut entries = Vec::new();
        for (terms, keys) in grants {
            entries.extend(self.log_chat_keys(&terms, keys, account, &mut ops));
        }
        entries.extend(self.log_chat_keys(&terms, new.keys, account, &mut ops));
        self.commit_and_answer(conn, req, account, ops, entries, out);
        Ok(())
    }
}
