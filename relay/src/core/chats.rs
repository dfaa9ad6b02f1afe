//! Chats: creating one and appending to it. Part of [`RelayCore`]; split out of `core.rs` for
//! size.

use stratus_engine::proto::wire::TYPING_SHOWN_MS;

use super::*;

/// Shortest time between two typing indicators of one device in one chat that the relay
/// forwards; the ones in between are dropped. Half of how long devices show one
/// ([`TYPING_SHOWN_MS`]), so a user who keeps typing is shown typing without a gap.
pub const TYPING_FORWARD_MS: u64 = TYPING_SHOWN_MS / 2;
/// Most chats one device is shown typing in at once (within [`TYPING_FORWARD_MS`]); indicators
/// for more are dropped. A person types in one chat at a time.
pub const TYPING_CHATS: usize = 4;

impl RelayCore {
    /// Pushes a typing indicator to the other connected devices of the chat's members, at most
    /// one per [`TYPING_FORWARD_MS`] per chat and device and in at most [`TYPING_CHATS`] chats
    /// at once: one indicator is pushed to every stream of every member, so the relay passes
    /// on only what a user can be shown. Never stored and never answered: from a device that
    /// is not a member, over its rate limit, or coalesced, it is dropped. (Pushes of it are
    /// dropped first when a stream falls behind, see `core/backlog.rs`.)
    pub(super) fn typing(
        &mut self,
        from: ConnId,
        device: &DeviceId,
        account: Option<AccountId>,
        chat: ChatId,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) {
        let Some(account) = account else { return };
        let Some(c) = self.chats.get(&chat).filter(|c| c.record.members.contains(&account)) else { return };
        let members = c.record.members.clone();
        if self.over_rate(device, &ClientFrame::Typing { chat }, now_ms).is_some() {
            return;
        }
        let Some(d) = self.devices.get_mut(device) else { return };
        d.typing.retain(|_, at| now_ms.saturating_sub(*at) < TYPING_FORWARD_MS && *at <= now_ms);
        if d.typing.contains_key(&chat) || d.typing.len() >= TYPING_CHATS {
            return;
        }
        d.typing.insert(chat, now_ms);
        for member in &members {
            for conn in self.conns_by_account.get(member).into_iter().flatten() {
                if *conn != from {
                    let frame = RelayFrame::Typing { chat, account, device: device.clone() };
                    out.push(Effect::Send { conn: *conn, frame });
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_chat(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        device: &DeviceId,
        client_seq: ClientSeq,
        chat: ChatId,
        kind: ChatKind,
        epoch: Epoch,
        keys: Vec<WrappedKey>,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if let Some(existing) = self.chats.get(&chat) {
            // A retry whose reply was lost (devices keep the creation in their outbox until it is
            // acknowledged): the same kind and first-epoch keys, from a member.
            if existing.record.kind == kind
                && existing.record.members.contains(&account)
                && epoch == Epoch(0)
                && existing.record.genesis_keys == keys_digest(&keys)
            {
                self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
                return Ok(());
            }
            return Err((ErrorCode::AlreadyExists, format!("chat {chat} exists")));
        }
        if keys.len() > MAX_CHAT_MEMBERS {
            return Err((ErrorCode::TooLarge, format!("a chat has at most {MAX_CHAT_MEMBERS} members")));
        }
        if epoch != Epoch(0) {
            return Err((ErrorCode::UnknownEpoch, "a chat starts at key epoch 0".into()));
        }
        let members: BTreeSet<AccountId> = keys.iter().map(|k| k.account).collect();
        let fits = match kind {
            ChatKind::Notes => members.len() == 1,
            ChatKind::Direct => members.len() == 2,
            ChatKind::Group => true,
        };
        if !fits || !members.contains(&account) {
            return Err((
                ErrorCode::BadCertificate,
                "a notes chat has its creator alone as member, a direct chat the creator and one other".into(),
            ));
        }
        if let Some(m) = members.iter().find(|m| !self.is_live(m)) {
            return Err((ErrorCode::NotFound, format!("no account {m}")));
        }
        // Nobody is put into a chat without having accepted chats from its creator.
        self.check_consent(account, members.iter())?;
        self.check_quota(account, 1)?;
        if members.iter().any(|m| self.accounts[m].chats.len() >= MAX_ACCOUNT_CHATS) {
            return Err((
                ErrorCode::TooLarge,
                format!("an account is in at most {MAX_ACCOUNT_CHATS} chats (a key rotation must fit one frame)"),
            ));
        }
        // Defence in depth: every wrapped key must be signed by the creating account's current
        // keys and wrapped to each member's current keys (the devices check the signature
        // themselves). Keys a rotation ended are refused as stale, and the device's later
        // outbox items wait behind this one.
        let terms = KeyTerms { chat, kind, epoch, members: members.clone() };
        if let Err((code, message)) = self.check_keys(account, &terms, &keys) {
            if code == ErrorCode::StaleEpoch {
                hold(self.devices.get_mut(device).expect("an attached connection's device is known"), client_seq);
            }
            return Err((code, message));
        }
        let record = ChatRecord {
            kind,
            creator: account,
            members: members.clone(),
            newest: epoch,
            genesis_keys: keys_digest(&keys),
            rekey_due: false,
            joining: BTreeSet::new(),
            share_with: BTreeSet::new(),
            changes: 0,
        };
        let mut ops = vec![StoreOp::PutChat(chat, record.clone()), StoreOp::PutChatKeys(chat, epoch, keys.clone())];
        self.chats.insert(chat, Chat::new(record, Seq(0)));
        for m in &members {
            self.accounts.get_mut(m).expect("checked").chats.insert(chat);
        }
        let entries = self.log_chat_keys(&terms, keys, account, &mut ops);
        self.commit_and_answer(conn, req, account, ops, entries, out);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn append(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        device: &DeviceId,
        chat_id: ChatId,
        epoch: Epoch,
        client_seq: ClientSeq,
        sealed: Vec<u8>,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        let bytes = sealed.len() as u64 + DELTA_OVERHEAD_BYTES;
        let quota = self.check_quota(account, bytes);
        let chat = self.chats.get_mut(&chat_id).ok_or((ErrorCode::UnknownChat, format!("no chat {chat_id}")))?;
        if !chat.record.members.contains(&account) {
            return Err((ErrorCode::NotMember, format!("this account is not a member of chat {chat_id}")));
        }
        if sealed.len() > MAX_DELTA_BYTES {
            return Err((ErrorCode::TooLarge, format!("a delta is at most {MAX_DELTA_BYTES} bytes")));
        }
        let newest = chat.record.newest;
        if epoch > newest {
            return Err((ErrorCode::UnknownEpoch, format!("chat {chat_id} has no epoch {}", epoch.0)));
        }
        let dev = self.devices.get_mut(device).expect("an attached connection's device is known");
        if dev.appends_in_flight >= self.limits.max_appends_in_flight_per_device {
            hold(dev, client_seq);
            out.push(Effect::Send { conn, frame: RelayFrame::RateLimited { req, retry_after_ms: IN_FLIGHT_RETRY_MS } });
            return Ok(());
        }
        if client_seq > dev.highest_client_seq && (epoch < newest || chat.record.rekey_due) {
            // Sealed under keys a rotation or member change ended (a revoked device or removed
            // member may hold them), or the chat's next epoch is due. Not stored; later client
            // seqs wait until it comes again under the new epoch.
            hold(dev, client_seq);
            return Err((
                ErrorCode::StaleEpoch,
                format!("chat {chat_id} moved past key epoch {}; seal the delta again under the next", epoch.0),
            ));
        }
        if client_seq > dev.highest_client_seq {
            // Refused for good (not held): the device drops it and goes on with its next ones,
            // which meet the same refusal while the account is over its quota.
            quota?;
            // The account's byte rate (repeats of stored ones cost nothing): refused like a
            // request over the device's rate, held until it comes again.
            let (rate, burst) = (self.limits.append_bytes_per_second, self.limits.append_bytes_burst);
            let acct = self.accounts.get_mut(&account).expect("an attached connection's account is known");
            if let Err(retry_after_ms) = acct.append_bytes.take_n(now_ms, rate, burst, bytes) {
                hold(dev, client_seq);
                out.push(Effect::Send { conn, frame: RelayFrame::RateLimited { req, retry_after_ms } });
                return Ok(());
            }
        }
        dev.appends_in_flight += 1;
        if client_seq <= dev.highest_client_seq {
            let frame = match dev.recent.get(&client_seq) {
                // (Not for a chat deleted since with the account that alone was left in it.)
                Some((c, seq)) if self.chats.contains_key(c) => {
                    RelayFrame::Acked { req, chat: *c, client_seq, seq: *seq }
                }
                _ => RelayFrame::Duplicate { req, chat: chat_id, client_seq },
            };
            self.after_durable(Deferred::AppendDone(conn, device.clone(), frame), out);
            return Ok(());
        }
        chat.head = chat.head.next();
        let seq = chat.head;
        dev.highest_client_seq = client_seq;
        dev.recent.insert(client_seq, (chat_id, seq));
        if dev.recent.len() > DEDUP_WINDOW {
            dev.recent.pop_first();
        }
        let delta = Delta { chat: chat_id, seq, epoch, device: device.clone(), account, client_seq, sealed };
        self.write_for(account, vec![StoreOp::PutDelta(delta.clone())], out);
        self.after_durable(
            Deferred::AppendDone(conn, device.clone(), RelayFrame::Acked { req, chat: chat_id, client_seq, seq }),
            out,
        );
        self.after_durable(Deferred::ChatDurable { delta, from: conn }, out);
        Ok(())
    }
}
