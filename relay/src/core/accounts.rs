//! Accounts and linking: creating an account, a new device waiting for approval, and the
//! approval. Part of [`RelayCore`]; split out of `core.rs` for size.

use super::*;

impl RelayCore {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_account(
        &mut self,
        conn: ConnId,
        req: ReqId,
        device: &DeviceId,
        account: AccountPublic,
        cert: DeviceCert,
        invite: Option<InviteToken>,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        account.validate().map_err(|e| (ErrorCode::BadCertificate, e.to_string()))?;
        cert.verify(&account.genesis()).map_err(|e| (ErrorCode::BadCertificate, e.to_string()))?;
        if &cert.body.device != device {
            return Err((ErrorCode::BadCertificate, "the certificate names another device".into()));
        }
        if self.accounts.get(&account.id).is_some_and(|a| a.public == account)
            && self.devices.get(device).is_some_and(|d| d.account == account.id)
        {
            // A retry whose reply was lost: the same account from the same device.
            self.attach(conn, account.id);
            self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
            return Ok(());
        }
        if let Some(a) = self.accounts.get(&account.id) {
            // The operator's decisions about it first: a deleted or banned account does not
            // come back under the same keys.
            return Err(match (a.admin.status, a.admin.deleted) {
                (AccountStatus::Banned, _) => (ErrorCode::AccountBanned, banned_message(account.id)),
                (_, true) => (
                    ErrorCode::AccountDeleted,
                    format!("account {} was deleted on this relay; make a new account", account.id),
                ),
                _ => (ErrorCode::AlreadyExists, format!("account {} exists", account.id)),
            });
        }
        if self.devices.contains_key(device) {
            return Err((ErrorCode::AlreadyExists, "this device already belongs to an account".into()));
        }
        // Who may make an account (the operator's setting); a token is used up only by an
        // account that is made.
        let invite = self.check_registration(invite)?;
        let id = account.id;
        let state = DeviceState { registered_ms: now_ms, last_active_ms: now_ms, revoked: false };
        let mut ops = vec![
            StoreOp::PutAccount(account.clone()),
            StoreOp::PutDevice(cert.clone()),
            StoreOp::PutDeviceState(device.clone(), state),
        ];
        if let Some(digest) = invite {
            self.invites.remove(&digest);
            ops.push(StoreOp::PutInvite(digest, None));
        }
        let mut acct = Account::new(account);
        acct.devices.insert(device.clone());
        self.accounts.insert(id, acct);
        self.devices.insert(device.clone(), Device::new(cert.clone(), state));
        let entry = self.log_entry(id, AccountEvent::DeviceAdded { cert }, &mut ops);
        self.write_for(id, ops, out);
        self.attach(conn, id);
        self.after_durable(Deferred::AccountDurable { account: id, entry }, out);
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn link_wait(
        &mut self,
        conn: ConnId,
        req: ReqId,
        device: &DeviceId,
        link_id: [u8; 32],
        device_x25519: [u8; 32],
        name: String,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        if let Some(a) = self.approved.get(&link_id).filter(|a| &a.device == device) {
            let frame = RelayFrame::LinkApproved {
                req,
                account: a.account.clone(),
                cert: a.cert.clone(),
                bundle: a.bundle.clone(),
            };
            self.after_durable(Deferred::Send(conn, frame), out);
            return Ok(());
        }
        if self.devices.contains_key(device) {
            return Err((ErrorCode::AlreadyExists, "this device already belongs to an account".into()));
        }
        if name.len() > MAX_DEVICE_NAME_BYTES {
            return Err((ErrorCode::TooLarge, format!("device names are at most {MAX_DEVICE_NAME_BYTES} bytes")));
        }
        if self.links.get(&link_id).is_some_and(|l| &l.device != device) {
            return Err((ErrorCode::AlreadyExists, "another device waits under that link code".into()));
        }
        // One pending link per peer: a new wait replaces the peer's old one (from any of its
        // streams), so no peer holds more than one place, and a place lives only as long as
        // its stream. The table is therefore no larger than the connections the relay allows;
        // this cap is only a safety net that no fewer peers can fill.
        self.links.retain(|_, l| &l.device != device);
        if self.links.len() >= self.limits.max_connections as usize {
            return Err((ErrorCode::RateLimited, "too many devices wait for approval; try again later".into()));
        }
        self.links.insert(link_id, PendingLink { conn, req, device: device.clone(), device_x25519, name });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn link_approve(
        &mut self,
        conn: ConnId,
        req: ReqId,
        account: AccountId,
        link_id: [u8; 32],
        cert: DeviceCert,
        bundle: stratus_engine::proto::crypto::SealedBox,
        now_ms: u64,
        out: &mut Vec<Effect>,
    ) -> Result<(), (ErrorCode, String)> {
        let link =
            self.links.get(&link_id).ok_or((ErrorCode::LinkNotFound, "no device waits under that link code".into()))?;
        if self.devices.contains_key(&link.device) {
            return Err((ErrorCode::AlreadyExists, "the waiting device already belongs to an account".into()));
        }
        self.check_room_for_device(account)?;
        let public = self.accounts[&account].public.clone();
        self.check_signed(account, "the certificate", |g| cert.verify(g))?;
        if cert.body.device != link.device || cert.body.device_x25519 != link.device_x25519 {
            return Err((ErrorCode::BadCertificate, "the certificate does not match the waiting device".into()));
        }
        if bundle.sealed.len() > stratus_engine::proto::cert::MAX_BUNDLE_BYTES {
            return Err((ErrorCode::TooLarge, "account bundle too large".into()));
        }
        let link = self.links.remove(&link_id).expect("checked above");
        let approval = ApprovedLink {
            device: link.device.clone(),
            account: public.clone(),
            cert: cert.clone(),
            bundle: bundle.clone(),
        };
        self.approved.insert(link_id, approval.clone());
        let state = DeviceState { registered_ms: now_ms, last_active_ms: now_ms, revoked: false };
        let mut ops = vec![
            StoreOp::PutDevice(cert.clone()),
            StoreOp::PutDeviceState(link.device.clone(), state),
            StoreOp::PutApprovedLink(link_id, approval),
        ];
        self.devices.insert(link.device.clone(), Device::new(cert.clone(), state));
        self.accounts.get_mut(&account).expect("the approver's account exists").devices.insert(link.device.clone());
        let entry = self.log_entry(account, AccountEvent::DeviceAdded { cert: cert.clone() }, &mut ops);
        self.write_for(account, ops, out);
        self.attach(link.conn, account);
        self.after_durable(Deferred::AccountDurable { account, entry }, out);
        self.after_durable(
            Deferred::Send(link.conn, RelayFrame::LinkApproved { req: link.req, account: public, cert, bundle }),
            out,
        );
        self.after_durable(Deferred::Send(conn, RelayFrame::Done { req }), out);
        Ok(())
    }
}
