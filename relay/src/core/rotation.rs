//! Revocation with key rotation, rotation after an expiry, and checking what an account signed
//! against the generation of its keys in force (see docs/crypto.md, "Rotation"). Part of
//! [`RelayCore`]; split out of `core.rs` for size.

use stratus_engine::proto::cert::{Revocation, Rotation, MAX_ROTATION_DEVICES};
use stratus_engine::proto::directory::SignedGen;
use stratus_engine::proto::wire::NewEpoch;

use super::*;

/// A rotation's parts, as `Revoke` and `Rotate` carry them.
pub(crate) struct Rotate {
    pub rotation: Rotation,
    pub chats: Vec<NewEpoch>,
    pub recovery: Option<Vec<u8>>,
}

fn stale(message: impl Into<String>) -> (ErrorCode, String) {
    (ErrorCode::StaleEpoch, message.into())
}

fn bad(message: impl Into<String>) -> (ErrorCode, String) {
    (ErrorCode::BadCertificate, message.into())
}

/// Most chats an account may be a member of: every rotation carries a new epoch for each, in
/// one frame with a bundle per device. At the caps ([`MAX_ROTATION_DEVICES`] bundles of the
/// last generation, about 16 KiB each, and 2,048 chats) a `Revoke` is 979,425 bytes of the
/// 1 MiB frame (measured by `a_rotation_at_the_caps_fits_one_frame`).
pub const MAX_ACCOUNT_CHATS: usize = 2048;

impl RelayCore {
    /// Refuses a new device once the account has as many live sessions as one rotation can
    /// hand the keys to: an account must always be able to end a session.
    pub(super) fn check_room_for_device(&self, account: AccountId) -> Result<(), (ErrorCode, String)> {
        let live =
            self.accounts[&account].devices.iter().filter(|d| self.devices.get(*d).is_some_and(|d| !d.state.revoked));
        if live.count() >= MAX_ROTATION_DEVICES {
            return Err((
                ErrorCode::TooLarge,
                format!("an account has at most {MAX_ROTATION_DEVICES} sessions; end one first"),
            ));
        }
        Ok(())
    }

    /// Checks something `account` signed against its keys in force: signed by an older
    /// generation is `StaleEpoch` (the device has not taken the rotation yet; it makes the
    /// request again once it has), by none `BadCertificate`.
    pub(super) fn check_signed(
        &self,
        account: AccountId,
        what: &str,
        verify: impl Fn(&AccountGen) -> Result<(), CertError>,
    ) -> Result<(), (ErrorCode, String)> {
        let gens = &self.accounts[&account].gens;
        match verify(gens.last().expect("an account keeps its genesis")) {
            Ok(()) => Ok(()),
            Err(_) if gens.iter().rev().skip(1).any(|g| verify(g).is_ok()) => Err(stale(format!(
                "{what} is signed with keys of the account that a rotation ended; take the rotation from the \
                 account log and make it again"
            ))),
            Err(e) => Err(bad(format!("{what}: {e}"))),
        }
    }

    /// Ends another device's session and rotates the account's keys, all or nothing: the
    /// revocation and the rotation are checked against the keys in force, the rotation must
    /// hand the new bundle to exactly the devices that stay, start the next epoch of exactly
    /// the account's chats, and re-seal the recovery bundle if one stays. Then the device is
    /// cut off at once (its streams closed, everything queued for them dropped, every later
    /// frame or connection refused with `SessionRevoked`), and from then on only the new
    /// generation's signatures and the new epochs are accepted.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn revoke(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        by: &DeviceId,
        revocation: Revocation,
        r: Rotate,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        let target = revocation.body.device.clone();
        if &revocation.body.by != by {
            return Err(bad("the revocation names another revoking device"));
        }
        if &target == by {
            return Err(bad("a device cannot end its own session this way"));
        }
        match self.devices.get(&target) {
            Some(d) if d.account == account && d.state.revoked => {
                // A retry whose reply was lost (or another device got there first; its rotation
                // stands, and this device takes it from the account log).
                self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
                return Ok(());
            }
            Some(d) if d.account == account => {}
            _ => return Err((ErrorCode::UnknownDevice, format!("no device {} in this account", target.0))),
        }
        self.check_signed(account, "the revocation", |g| revocation.verify(g))?;
        self.check_session_age(by, now_ms)?;
        let next = self.check_rotation(account, Some(&target), &r)?;

        let dev = self.devices.get_mut(&target).expect("checked above");
        dev.state.revoked = true;
        dev.held = None;
        let mut ops = vec![StoreOp::PutDeviceState(target.clone(), dev.state)];
        self.withdraw_recovery(account, &target, &mut ops);
        let ended = self.log_entry(account, AccountEvent::DeviceRevoked { revocation }, &mut ops);
        self.record_session_end(&target, &ended, &mut ops);
        let mut entries = vec![(account, ended)];
        self.apply_rotation(account, next, r, &mut ops, &mut entries);
        self.commit_and_answer(conn, req, account, ops, entries, out);
        self.cut_off(&target, out);
        Ok(())
    }

    /// Rotates the account's keys after a session ended without a rotation (it expired). When
    /// none is due (another device made it, or no session ended) it changes nothing and
    /// answers `Done`: the keys are as fresh as the sessions require.
    pub(super) fn rotate(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        r: Rotate,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if !self.accounts[&account].settings.rotation_due {
            self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
            return Ok(());
        }
        let next = self.check_rotation(account, None, &r)?;
        let mut ops = Vec::new();
        let mut entries = Vec::new();
        self.apply_rotation(account, next, r, &mut ops, &mut entries);
        self.commit_and_answer(conn, req, account, ops, entries, out);
        Ok(())
    }

    /// Moves the account to the checked generation `next`: its chats' new epochs, the recovery
    /// bundle sealed again, and the account log entries (`Rotated`, then `ChatAdded` per new
    /// epoch and member), into `ops` and `entries`.
    fn apply_rotation(
        &mut self,
        account: AccountId,
        next: AccountGen,
        r: Rotate,
        ops: &mut Vec<StoreOp>,
        entries: &mut Vec<(AccountId, AccountEntry)>,
    ) {
        ops.push(StoreOp::PutAccountGen(SignedGen::of(&r.rotation)));
        let a = self.accounts.get_mut(&account).expect("an attached connection's account exists");
        a.gens.push(next);
        a.rotations.push(SignedGen::of(&r.rotation));
        a.settings.rotation_due = false;
        ops.push(StoreOp::PutAccountSettings(account, a.settings));
        if let (Some(id), Some(sealed)) = (a.recovery, r.recovery) {
            let record = self.recoveries.get_mut(&id).expect("an account's recovery id is filed");
            record.sealed = sealed;
            ops.push(StoreOp::PutRecovery(id, record.clone()));
        }
        entries.push((account, self.log_entry(account, AccountEvent::Rotated { rotation: r.rotation }, ops)));
        for new in r.chats {
            let chat = self.chats.get_mut(&new.chat).expect("checked in check_rotation");
            chat.record.newest = new.epoch;
            ops.push(StoreOp::PutChatKeys(new.chat, new.epoch, new.keys.clone()));
            // A new epoch: whatever was due of one is done (the account is alone in the chat).
            chat.record.rekey_due = false;
            chat.record.joining.clear();
            chat.record.share_with.clear();
            chat.record.changes = 0;
            let terms = KeyTerms {
                chat: new.chat,
                kind: chat.record.kind,
                epoch: new.epoch,
                members: chat.record.members.clone(),
            };
            ops.push(StoreOp::PutChat(new.chat, chat.record.clone()));
            entries.extend(self.log_chat_keys(&terms, new.keys, account, ops));
        }
        // The chats with other members get their next epoch from the account's devices, which
        // look the members' keys up for it; until then nothing more is stored in them.
        for id in self.accounts[&account].chats.clone() {
            let chat = self.chats.get_mut(&id).expect("an account's chats exist");
            if chat.record.members.len() > 1 && !chat.record.rekey_due {
                chat.record.rekey_due = true;
                ops.push(StoreOp::PutChat(id, chat.record.clone()));
            }
        }
    }

    /// Checks that `r`'s rotation covers the account as it stands once `leaving` is gone, and
    /// returns the generation it starts.
    fn check_rotation(
        &self,
        account: AccountId,
        leaving: Option<&DeviceId>,
        r: &Rotate,
    ) -> Result<AccountGen, (ErrorCode, String)> {
        let a = &self.accounts[&account];
        let current = a.gens.last().expect("an account keeps its genesis");
        let next = match current.verify_rotation(&r.rotation) {
            Ok(next) => next,
            Err(_) if r.rotation.body.generation <= current.generation => {
                return Err(stale("the account's keys were rotated since; sync and revoke again"))
            }
            Err(e) => return Err(bad(format!("the rotation: {e}"))),
        };
        let remaining: BTreeSet<&DeviceId> = a
            .devices
            .iter()
            .filter(|d| Some(*d) != leaving && self.devices.get(*d).is_some_and(|d| !d.state.revoked))
            .collect();
        let covered: BTreeSet<&DeviceId> = r.rotation.bundles.iter().map(|(d, _)| d).collect();
        if covered.len() != r.rotation.bundles.len() {
            return Err(bad("the rotation seals the bundle to a device twice"));
        }
        if covered != remaining {
            return Err(stale(
                "the rotation does not hand the new keys to exactly the account's remaining devices; sync and \
                 revoke again",
            ));
        }
        let given: BTreeSet<ChatId> = r.chats.iter().map(|c| c.chat).collect();
        if given.len() != r.chats.len() {
            return Err(bad("the rotation gives a chat two new epochs"));
        }
        let alone: BTreeSet<ChatId> =
            a.chats.iter().filter(|c| self.chats[*c].record.members.len() == 1).copied().collect();
        if given != alone {
            return Err(stale(
                "the rotation does not cover exactly the account's chats without other members; sync and revoke \
                 again",
            ));
        }
        for new in &r.chats {
            let chat = &self.chats[&new.chat];
            let newest = chat.record.newest;
            if new.epoch <= newest {
                return Err(stale(format!("chat {} is past epoch {}; sync and revoke again", new.chat, newest.0)));
            }
            if newest.0.checked_add(1) != Some(new.epoch.0) {
                return Err(bad(format!("chat {} gets epoch {} after {}", new.chat, new.epoch.0, newest.0)));
            }
            let members: BTreeSet<AccountId> = new.keys.iter().map(|k| k.account).collect();
            if members.len() != new.keys.len() || members != chat.record.members {
                return Err(bad(format!("the new epoch of chat {} is not wrapped once to each member", new.chat)));
            }
            let terms = KeyTerms { chat: new.chat, kind: chat.record.kind, epoch: new.epoch, members: members.clone() };
            if new
                .keys
                .iter()
                .any(|k| !k.content || k.generation != next.generation || next.verify_chat_key(&terms, k).is_err())
            {
                return Err(bad(format!(
                    "a key of chat {} is not signed by and wrapped to the new generation",
                    new.chat
                )));
            }
        }
        let keeps_recovery =
            a.recovery.is_some_and(|id| self.recoveries.get(&id).is_some_and(|rec| Some(&rec.by) != leaving));
        match &r.recovery {
            None if keeps_recovery => {
                return Err(stale("the account has a recovery key: seal the new bundle to it; sync and revoke again"))
            }
            Some(sealed) if sealed.len() > MAX_RECOVERY_BYTES => {
                return Err((ErrorCode::TooLarge, format!("a recovery bundle is at most {MAX_RECOVERY_BYTES} bytes")))
            }
            _ => {}
        }
        Ok(next)
    }
}
