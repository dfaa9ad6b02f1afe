//! Sessions and recovery: listing and ending the account's device sessions, their
//! time-to-live, and the recovery key.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::device::error::Error;
use crate::device::local::identity::check_name;
use crate::device::local::Device;
use crate::device::store::Login;
use crate::proto::cert::{AccountKeys, DeviceCert, DeviceCertBody};
use crate::proto::crypto::RecoveryKey;
use crate::proto::directory::AccountChain;
use crate::proto::ids::{AccountId, DeviceId};
use crate::proto::wire::{AccountEntry, AccountEvent, ClientFrame, ErrorCode, RelayFrame, ReqId};

/// A session of the account, as [`Device::sessions`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionInfo {
    /// The device id.
    pub device: DeviceId,
    /// The name in its certificate (`None` until this device has synced its certificate).
    pub name: Option<String>,
    /// When its certificate was made, by the certifying device's clock, ms since the Unix epoch.
    pub created_ms: Option<u64>,
    /// When the relay registered it (0: before the relay kept this).
    pub registered_ms: u64,
    /// When the relay last heard from it.
    pub last_active_ms: u64,
    /// Connected to the relay now.
    pub online: bool,
    /// It is this device.
    pub this_device: bool,
}

/// The shortest session time-to-live an account can set: an expiry of this device's session
/// is believed only after at least this long without a session.
pub(crate) const MIN_SESSION_TTL_MS: i64 = 24 * 3600 * 1000;

impl Device {
    // ---- sessions ----

    /// Whether what the relay showed as the end of this device's session proves it, so that
    /// the account's data may be deleted here. Either a revocation of this device signed by
    /// the account, with a generation of its keys no older than the one this device's account
    /// log has reached (a device revoked earlier holds only older ones), in a chain of keys
    /// that checks from the account id and agrees with what this device knows; or an expiry of
    /// this device's session (the relay's act, unsigned) when this device itself has had no
    /// session with the relay for at least [`MIN_SESSION_TTL_MS`] by its own clock. Anything
    /// else, including no proof at all, proves nothing.
    pub(crate) fn session_end_proven(&self, proof: Option<&(AccountEntry, AccountChain)>) -> bool {
        let Some((entry, chain)) = proof else { return false };
        let (Ok(login), Ok(known)) = (self.login(), self.log_gen()) else { return false };
        if chain.id() != login.account.id {
            return false;
        }
        let Ok(gens) = chain.verify() else { return false };
        let from = known.generation as usize;
        if gens.get(from) != Some(&known) {
            return false;
        }
        let me = self.identity.id();
        match &entry.event {
            AccountEvent::DeviceRevoked { revocation } => {
                &revocation.body.device == me && gens[from..].iter().any(|g| revocation.verify(g).is_ok())
            }
            AccountEvent::DeviceExpired { device, .. } => {
                let last = self.store.last_reached_ms().unwrap_or(0);
                device == me && last > 0 && self.now_ms().saturating_sub(last) >= MIN_SESSION_TTL_MS
            }
            _ => false,
        }
    }

    /// The account's sessions: every device whose session was not ended, with what this device
    /// knows of it (its certificate) and what the relay knows (registration, last activity);
    /// and after how many days of inactivity sessions end (0: never).
    pub async fn sessions(&mut self) -> Result<(Vec<SessionInfo>, u32), Error> {
        let reply = self.one_request(ClientFrame::ListDevices { req: 1 }, 1).await?;
        self.sessions_from(reply)
    }

    /// The account's sessions from the relay's answer to `ListDevices` (see
    /// [`Device::sessions`]).
    pub(crate) fn sessions_from(&self, reply: RelayFrame) -> Result<(Vec<SessionInfo>, u32), Error> {
        let RelayFrame::Devices { devices, session_ttl_days, .. } = reply else {
            return Err(Error::Relay { code: ErrorCode::Internal, message: "unexpected reply to list devices".into() });
        };
        let certs: BTreeMap<DeviceId, DeviceCert> =
            self.store.devices()?.into_iter().map(|c| (c.body.device.clone(), c)).collect();
        let sessions = devices
            .into_iter()
            .filter(|d| !d.revoked)
            .map(|d| {
                let cert = certs.get(&d.device);
                SessionInfo {
                    this_device: d.device == self.identity.id,
                    name: cert.map(|c| c.body.name.clone()),
                    created_ms: cert.map(|c| c.body.created_ms),
                    registered_ms: d.registered_ms,
                    last_active_ms: d.last_active_ms,
                    online: d.online,
                    device: d.device,
                }
            })
            .collect();
        Ok((sessions, session_ttl_days))
    }

    /// Sets after how many days of inactivity the account's sessions end (0: never). Like
    /// revoking, it needs a session older than the relay's minimum age.
    pub async fn set_session_ttl(&mut self, days: u32) -> Result<(), Error> {
        self.one_request(ClientFrame::SetSessionTtl { req: 1, days }, 1).await?;
        Ok(())
    }

    /// Ends another device's session and rotates the account's keys (see
    /// [`Device::revoke_request`]): the relay cuts the device off, and the other devices take
    /// the new keys from the account log (after checking the signatures themselves). Sync first:
    /// the request must cover every device and chat the relay has, or the relay answers
    /// `StaleEpoch`.
    pub async fn revoke(&mut self, device: &DeviceId) -> Result<(), Error> {
        let request = self.revoke_request(device, 1)?;
        self.one_request(request, 1).await?;
        self.revoke_done(device)
    }

    /// Drops `device` from this device's list once the relay took the revocation.
    pub fn revoke_done(&mut self, device: &DeviceId) -> Result<(), Error> {
        self.store.remove_device(device)?;
        Ok(())
    }

    // ---- recovery ----

    /// Makes a new recovery key for the account and stores the account bundle sealed under it
    /// on the relay (replacing an earlier one). Show the key to the user once; nothing keeps it.
    pub async fn create_recovery_key(&mut self) -> Result<RecoveryKey, Error> {
        let (request, key) = self.recovery_request(1)?;
        self.one_request(request, 1).await?;
        Ok(key)
    }

    /// A new recovery key and the request that stores the account bundle sealed under it (see
    /// [`Device::create_recovery_key`]); the key is good once the relay answers `Done`.
    pub(crate) fn recovery_request(&mut self, req: ReqId) -> Result<(ClientFrame, RecoveryKey), Error> {
        let login = self.login()?.clone();
        let key = RecoveryKey::random(&mut self.rng);
        let public = key.public();
        let bundle = postcard::to_allocvec(&login.keys).expect("serializing keys cannot fail");
        let sealed = RecoveryKey::seal_to(&public, &bundle, &mut self.rng);
        let signature = login.keys.sign_recovery(&public, &self.identity.id);
        Ok((ClientFrame::PutRecovery { req, lookup_id: key.lookup_id(), public, signature, sealed }, key))
    }

    /// Logs this (new) device in to the account whose bundle `key` sealed on `relay`: fetches
    /// and opens the bundle, certifies this device with the account key and registers it. Run a
    /// [`crate::Session`] afterwards to pull the history.
    pub async fn recover(&mut self, relay: &str, name: &str, key: &RecoveryKey) -> Result<AccountId, Error> {
        if let Some(a) = self.account() {
            return Err(Error::AlreadyLoggedIn(a.to_string()));
        }
        check_name(name)?;
        let (_net, mut stream, _) = self.connect(relay).await?;
        stream.send(&ClientFrame::FetchRecovery { req: 1, lookup_id: key.lookup_id() }).await?;
        let RelayFrame::Recovery { account, sealed, .. } = Self::reply(&mut stream, 1).await? else {
            return Err(Error::Relay { code: ErrorCode::Internal, message: "unexpected reply to a recovery".into() });
        };
        let keys: AccountKeys = postcard::from_bytes(&key.open(&sealed)?).map_err(|_| Error::LinkMismatch)?;
        account.validate()?;
        if keys.public() != account || !keys.is_consistent() {
            return Err(Error::LinkMismatch);
        }
        let cert = keys.certify(DeviceCertBody {
            account: account.id,
            device: self.identity.id.clone(),
            device_x25519: self.identity.x25519_public(),
            name: name.to_string(),
            created_ms: self.now_ms().max(0) as u64,
        });
        stream.send(&ClientFrame::Recover { req: 2, lookup_id: key.lookup_id(), cert: cert.clone() }).await?;
        Self::reply(&mut stream, 2).await?;
        let login = Login { account: account.clone(), keys, cert: cert.clone(), relay: relay.to_string() };
        self.store.set_login(&login)?;
        self.store.put_device(&cert)?;
        self.identity.login = Some(login);
        Ok(account.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::core::{SyncCore, SyncInput};
    use crate::device::drive::{Action, Event};
    use crate::proto::cert::RevocationBody;
    use crate::proto::directory::SignedGen;
    use crate::proto::ids::Seq;
    use crate::proto::wire::{AccountEntry, RelayFrame};

    const DAY_MS: i64 = 24 * 3600 * 1000;

    fn logged_in(dir: &std::path::Path, keys: &AccountKeys) -> Device {
        let mut d = Device::open(dir).unwrap();
        let cert = keys.certify(DeviceCertBody {
            account: keys.public().id,
            device: d.id().clone(),
            device_x25519: d.identity.x25519_public(),
            name: "d".into(),
            created_ms: 0,
        });
        let login = Login { account: keys.public(), keys: keys.clone(), cert, relay: "x".into() };
        d.store.set_login(&login).unwrap();
        d.identity.log_in(login);
        d
    }

    /// What the device does when the relay ends its session with `proof` shown first.
    fn ended(d: &mut Device, proof: Option<(AccountEvent, AccountChain)>) -> Vec<Action> {
        let mut core: SyncCore = d.start_core().unwrap();
        let out = core.handle(SyncInput::Connected);
        d.carry_out(&mut core, out);
        let mut frames = Vec::new();
        if let Some((event, chain)) = proof {
            let entry = Box::new(AccountEntry { seq: Seq(9), event });
            frames.push(RelayFrame::SessionEnded { entry, chain: Box::new(chain) });
        }
        frames.push(RelayFrame::Error { req: None, code: ErrorCode::SessionRevoked, message: "ended".into() });
        let mut actions = Vec::new();
        for f in frames {
            let out = core.handle(SyncInput::Frame(Box::new(f)));
            actions.extend(d.carry_out(&mut core, out));
        }
        actions
    }

    fn emitted(actions: &[Action], event: &Event) -> bool {
        actions.iter().any(|a| matches!(a, Action::Emit(e) if e == event))
    }

    fn revoked(keys: &AccountKeys, device: &DeviceId) -> AccountEvent {
        let body =
            RevocationBody { account: keys.public().id, device: device.clone(), by: DeviceId("x".into()), at_ms: 0 };
        AccountEvent::DeviceRevoked { revocation: keys.revoke(body) }
    }

    /// Issue 15, item 9: an unsigned `SessionRevoked`, or a proof that does not hold, ends the
    /// session and deletes nothing; a revocation signed by the account (under a generation the
    /// device has not reached yet, with the chain to it) or an expiry after a day away does.
    #[test]
    fn an_ended_session_deletes_the_data_only_with_a_proof_the_device_checks() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::thread_rng();
        let keys = AccountKeys::generate(&mut rng);
        let next = keys.rotated(&mut rng).unwrap();
        let chain = AccountChain { public: keys.public(), rotations: vec![SignedGen::of(&keys.sign_rotation(&next))] };
        let genesis = AccountChain { public: keys.public(), rotations: Vec::new() };
        let mut d = logged_in(dir.path(), &keys);
        let me = d.id().clone();
        let stranger = AccountKeys::generate(&mut rng);
        let strangers = AccountChain { public: stranger.public(), rotations: Vec::new() };
        let refused = [
            None,
            Some((revoked(&stranger, &me), strangers)),
            Some((revoked(&keys, &DeviceId("another".into())), chain.clone())),
            Some((revoked(&stranger, &me), chain.clone())),
            Some((AccountEvent::DeviceExpired { device: me.clone(), last_active_ms: 0 }, chain.clone())),
        ];
        for proof in refused {
            let what = format!("{proof:?}");
            let actions = ended(&mut d, proof);
            assert!(emitted(&actions, &Event::SessionRefused), "{what}: {actions:?}");
            assert!(d.login().is_ok() && d.store.login().unwrap().is_some(), "nothing deleted: {what}");
        }

        // The log reached generation 1: a revocation signed by generation 0 (which a device
        // revoked before holds) proves nothing any more.
        let gen1 = chain.verify().unwrap()[1].clone();
        d.store.advance_account_log(Seq(1), Some(&gen1), None).unwrap();
        let actions = ended(&mut d, Some((revoked(&keys, &me), chain.clone())));
        assert!(emitted(&actions, &Event::SessionRefused), "{actions:?}");
        // Nor does a chain that disagrees with the generation the device knows.
        let actions = ended(&mut d, Some((revoked(&next, &me), genesis)));
        assert!(emitted(&actions, &Event::SessionRefused), "{actions:?}");
        assert!(d.login().is_ok());

        // Signed by generation 1: the device's data goes.
        let actions = ended(&mut d, Some((revoked(&next, &me), chain.clone())));
        assert!(emitted(&actions, &Event::SessionRevoked), "{actions:?}");
        assert!(d.login().is_err() && d.store.login().unwrap().is_none());

        // An expiry: believed after a day without a session by the device's own clock.
        let dir = tempfile::tempdir().unwrap();
        let mut d = logged_in(dir.path(), &keys);
        let me = d.id().clone();
        let expired =
            || Some((AccountEvent::DeviceExpired { device: me.clone(), last_active_ms: 0 }, genesis_of(&keys)));
        d.store.set_last_reached_ms(d.now_ms() - DAY_MS / 2).unwrap();
        assert!(emitted(&ended(&mut d, expired()), &Event::SessionRefused));
        d.store.set_last_reached_ms(d.now_ms() - DAY_MS - 1).unwrap();
        assert!(emitted(&ended(&mut d, expired()), &Event::SessionRevoked));
        assert!(d.login().is_err());
    }

    fn genesis_of(keys: &AccountKeys) -> AccountChain {
        AccountChain { public: keys.public(), rotations: Vec::new() }
    }
}
