//! Sessions: revocation, expiry of idle sessions, and recovery bundles (see docs/protocol.md,
//! "Sessions"). Part of [`RelayCore`]; split out of `core.rs` only for size.

use super::*;

impl RelayCore {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn put_recovery(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        by: &DeviceId,
        lookup_id: [u8; 32],
        (public, signature, sealed): ([u8; 32], Vec<u8>, Vec<u8>),
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if sealed.len() > MAX_RECOVERY_BYTES {
            return Err((ErrorCode::TooLarge, format!("a recovery bundle is at most {MAX_RECOVERY_BYTES} bytes")));
        }
        if self.recoveries.get(&lookup_id).is_some_and(|r| r.account != account) {
            return Err((ErrorCode::AlreadyExists, "that recovery id is taken".into()));
        }
        // A new account sets its first recovery key at once; replacing one needs a session as
        // old as revoking does, so that a device just linked to a stolen phone cannot take the
        // owner's way back in away. (A key it did set is withdrawn when its session ends.)
        if self.accounts[&account].recovery.is_some() {
            self.check_session_age(by, now_ms)?;
        }
        // Devices seal the bundle to this public key at each rotation: it must be the account's.
        self.check_signed(account, "the recovery key", |g| g.verify_recovery(&public, by, &signature))?;
        let mut ops = Vec::new();
        let a = self.accounts.get_mut(&account).expect("an attached connection's account exists");
        if let Some(old) = a.recovery.replace(lookup_id).filter(|old| *old != lookup_id) {
            self.recoveries.remove(&old);
            ops.push(StoreOp::DeleteRecovery(old));
        }
        let record = RecoveryRecord { account, by: by.clone(), sealed };
        self.recoveries.insert(lookup_id, record.clone());
        ops.push(StoreOp::PutRecovery(lookup_id, record));
        let entry = self.log_entry(account, AccountEvent::RecoverySet { public, by: by.clone(), signature }, &mut ops);
        self.write_for(account, ops, out);
        self.after_durable(Deferred::AccountDurable { account, entry }, out);
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }

    pub(super) fn fetch_recovery(
        &mut self,
        conn: ConnId,
        req: ReqId,
        device: &DeviceId,
        lookup_id: [u8; 32],
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) {
        if !self.recovery_attempt(conn, req, device, now_ms, out) {
            return;
        }
        let frame = match self.recoveries.get(&lookup_id) {
            Some(r) => RelayFrame::Recovery {
                req,
                account: self.accounts[&r.account].public.clone(),
                sealed: r.sealed.clone(),
            },
            None => RelayFrame::Error {
                req: Some(req),
                code: ErrorCode::RecoveryNotFound,
                message: "nothing is filed under that recovery key".into(),
            },
        };
        out.push(Effect::Send { conn, frame });
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn recover(
        &mut self,
        conn: ConnId,
        req: ReqId,
        device: &DeviceId,
        lookup_id: [u8; 32],
        cert: DeviceCert,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if !self.recovery_attempt(conn, req, device, now_ms, out) {
            return Ok(());
        }
        let record = self
            .recoveries
            .get(&lookup_id)
            .ok_or((ErrorCode::RecoveryNotFound, "nothing is filed under that recovery key".to_string()))?;
        let account = record.account;
        if let Some(refusal) = self.account_refusal(account) {
            return Err(refusal);
        }
        self.check_signed(account, "the certificate", |g| cert.verify(g))?;
        if !self.devices.contains_key(device) {
            self.check_room_for_device(account)?;
        }
        if &cert.body.device != device {
            return Err((ErrorCode::BadCertificate, "the certificate names another device".into()));
        }
        match self.devices.get(device) {
            Some(d) if d.account == account && !d.state.revoked => {
                // A retry whose reply was lost.
                self.attach(conn, account);
                self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
                return Ok(());
            }
            Some(_) => return Err((ErrorCode::AlreadyExists, "this device already belongs to an account".into())),
            None => {}
        }
        if cert.body.name.len() > MAX_DEVICE_NAME_BYTES {
            return Err((ErrorCode::TooLarge, format!("device names are at most {MAX_DEVICE_NAME_BYTES} bytes")));
        }
        let state = DeviceState { registered_ms: now_ms, last_active_ms: now_ms, revoked: false };
        let mut ops = vec![StoreOp::PutDevice(cert.clone()), StoreOp::PutDeviceState(device.clone(), state)];
        self.devices.insert(device.clone(), Device::new(cert.clone(), state));
        self.accounts.get_mut(&account).expect("the record's account exists").devices.insert(device.clone());
        let entry = self.log_entry(account, AccountEvent::DeviceAdded { cert }, &mut ops);
        self.write_for(account, ops, out);
        self.attach(conn, account);
        self.after_durable(Deferred::AccountDurable { account, entry }, out);
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }

    /// Ends `device`'s session if its account sets a time-to-live and the device has been
    /// inactive longer (a device whose last activity is unknown is left alone).
    pub(super) fn expire_if_idle(&mut self, device: &DeviceId, now_ms: u64, out: &mut Vec<Effect>) {
        // Ending a session is a write: with the disk full, it waits until the relay can write.
        if self.storage_failed {
            return;
        }
        let Some(d) = self.devices.get(device) else { return };
        let ttl_days = self.accounts.get(&d.account).map_or(0, |a| a.settings.session_ttl_days);
        let last = d.state.last_active_ms;
        if d.state.revoked || ttl_days == 0 || last == 0 || now_ms.saturating_sub(last) <= u64::from(ttl_days) * DAY_MS
        {
            return;
        }
        let account = d.account;
        let dev = self.devices.get_mut(device).expect("checked above");
        dev.state.revoked = true;
        dev.held = None;
        let mut ops = vec![StoreOp::PutDeviceState(device.clone(), dev.state)];
        self.withdraw_recovery(account, device, &mut ops);
        // Nobody rotated the keys: the account's devices are asked to (`Rotate`).
        let a = self.accounts.get_mut(&account).expect("a device's account exists");
        a.settings.rotation_due = true;
        ops.push(StoreOp::PutAccountSettings(account, a.settings));
        let entry = self.log_entry(
            account,
            AccountEvent::DeviceExpired { device: device.clone(), last_active_ms: last },
            &mut ops,
        );
        self.record_session_end(device, &entry, &mut ops);
        let token = self.token();
        out.push(Effect::Write { token, ops });
        self.cut_off(device, out);
        self.after_durable(Deferred::AccountDurable { account, entry }, out);
    }

    /// Withdraws a recovery bundle that `device` stored (its session ended), into `ops`.
    pub(super) fn withdraw_recovery(&mut self, account: AccountId, device: &DeviceId, ops: &mut Vec<StoreOp>) {
        let Some(a) = self.accounts.get_mut(&account) else { return };
        if let Some(id) = a.recovery.filter(|id| self.recoveries.get(id).is_some_and(|r| &r.by == device)) {
            a.recovery = None;
            self.recoveries.remove(&id);
            ops.push(StoreOp::DeleteRecovery(id));
        }
    }

    /// Keeps the account log entry that ended `device`'s session (written with `ops`), to show
    /// the device as proof (`RelayFrame::SessionEnded`).
    pub(super) fn record_session_end(&mut self, device: &DeviceId, entry: &AccountEntry, ops: &mut Vec<StoreOp>) {
        if let Some(d) = self.devices.get_mut(device) {
            d.ended = Some(Box::new(entry.clone()));
            ops.push(StoreOp::PutSessionEnd(device.clone(), entry.clone()));
        }
    }

    /// Closes every stream of a device whose session ended, telling it why once what ended it
    /// is durable.
    pub(super) fn cut_off(&mut self, device: &DeviceId, out: &mut Vec<Effect>) {
        let cut: Vec<ConnId> = self.conns.iter().filter(|(_, c)| &c.device == device).map(|(id, _)| *id).collect();
        for c in cut {
            // Nothing more is pushed to it, not even the news of its own end.
            self.detach(c);
            self.end_stream(c, out);
        }
    }

    /// Ends a stream of a device whose session ended: once the entry that ended it is durable,
    /// the stream gets the proof (the entry and the account's keys), then `SessionRevoked`,
    /// then its close. Frames from it are dropped meanwhile. A device whose proof the relay
    /// lacks (its session ended before the relay kept them) gets `SessionRevoked` alone, and
    /// keeps its data.
    pub(super) fn end_stream(&mut self, conn: ConnId, out: &mut Vec<Effect>) {
        let Some(c) = self.conns.get_mut(&conn).filter(|c| !c.ending) else { return };
        c.ending = true;
        self.after_durable(Deferred::EndSession(conn), out);
    }

    /// Sends the end of a stream (see [`RelayCore::end_stream`]); with `proven` false (the disk is
    /// full and the entry may never be durable), without the proof.
    pub(super) fn send_session_end(&mut self, conn: ConnId, proven: bool, out: &mut Vec<Effect>) {
        let Some(c) = self.conns.get(&conn) else { return };
        let ended = self.devices.get(&c.device).and_then(|d| d.ended.as_deref());
        if let (Some(entry), true) = (ended, proven) {
            let Some(d) = self.devices.get(&c.device) else { return };
            let frame =
                RelayFrame::SessionEnded { entry: Box::new(entry.clone()), chain: Box::new(self.chain_of(d.account)) };
            out.push(Effect::Send { conn, frame });
        }
        out.push(revoked(conn));
        out.push(Effect::Close { conn });
    }

    /// Refuses a policy change from a session younger than the configured minimum age.
    pub(super) fn check_session_age(&self, by: &DeviceId, now_ms: u64) -> Result<(), (ErrorCode, String)> {
        let age = now_ms.saturating_sub(self.devices[by].state.registered_ms);
        if age < self.limits.min_session_age_ms {
            return Err((
                ErrorCode::SessionTooNew,
                format!(
                    "this device's session is {} min old; changing the account's sessions needs {} min",
                    age / 60_000,
                    self.limits.min_session_age_ms / 60_000
                ),
            ));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn set_session_ttl(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        by: &DeviceId,
        days: u32,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if days > MAX_SESSION_TTL_DAYS {
            return Err((
                ErrorCode::TooLarge,
                format!("a session time-to-live is at most {MAX_SESSION_TTL_DAYS} days"),
            ));
        }
        // A short time-to-live ends the other sessions: the same rule as revoking them.
        self.check_session_age(by, now_ms)?;
        let a = self.accounts.get_mut(&account).expect("an attached connection's account exists");
        a.settings.session_ttl_days = days;
        let settings = a.settings;
        self.write_for(account, vec![StoreOp::PutAccountSettings(account, settings)], out);
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }
}
