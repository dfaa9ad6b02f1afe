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
use crate::proto::ids::{AccountId, DeviceId};
use crate::proto::wire::{ClientFrame, ErrorCode, RelayFrame, ReqId};

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

impl Device {
    // ---- sessions ----

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
