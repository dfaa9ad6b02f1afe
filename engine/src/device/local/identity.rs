//! The device's identity and the account's keys as this device holds them (the identity
//! concern). [`Identity`] owns the device's secrets, its id and its login (the account's key
//! bundle, this device's certificate, the relay); only this module and its children touch
//! them, the rest of [`Device`] asks through [`Identity`]'s methods.
//!
//! The children: [`login`] (creating an account, linking and approving devices), [`sessions`]
//! (the account's sessions, revocation, recovery keys), [`rotation`] (the account's next
//! generation of keys) and [`directory`] (other accounts: usernames, pins, key chains).

use x25519_dalek::{PublicKey, StaticSecret};

use crate::device::error::Error;
use crate::device::local::Device;
use crate::device::store::{DeviceSecrets, Login};
use crate::proto::cert::{DeviceCert, MAX_DEVICE_NAME_BYTES};
use crate::proto::ids::{AccountId, DeviceId};

mod directory;
mod login;
mod rotation;
mod sessions;

pub use directory::ContactInfo;
pub use login::LinkCode;
pub use sessions::SessionInfo;

/// Who this device is, and the account it is logged in to.
pub(super) struct Identity {
    /// The device's Ed25519 (libp2p) and X25519 (Noise, sealed boxes) secrets.
    secrets: DeviceSecrets,
    /// Its id, the PeerId of its Ed25519 key.
    id: DeviceId,
    /// The account's keys, this device's certificate and the relay, once logged in.
    login: Option<Login>,
}

impl Identity {
    pub(super) fn new(secrets: DeviceSecrets, id: DeviceId, login: Option<Login>) -> Identity {
        Identity { secrets, id, login }
    }

    /// This device's id (its libp2p PeerId).
    pub(super) fn id(&self) -> &DeviceId {
        &self.id
    }

    /// The account, if logged in.
    pub(super) fn account(&self) -> Option<AccountId> {
        self.login.as_ref().map(|l| l.account.id)
    }

    pub(super) fn login(&self) -> Result<&Login, Error> {
        self.login.as_ref().ok_or(Error::NotLoggedIn)
    }

    pub(super) fn x25519_public(&self) -> [u8; 32] {
        PublicKey::from(&StaticSecret::from(self.secrets.x25519)).to_bytes()
    }

    /// The device's X25519 static secret, for the Noise handshake of secret chats: the one use
    /// of the device's secrets outside this module.
    pub(super) fn x25519_secret(&self) -> &[u8; 32] {
        &self.secrets.x25519
    }

    /// Forgets the login (the account's data is being deleted).
    pub(super) fn log_out(&mut self) {
        self.login = None;
    }

    /// Logs in without the relay, for tests.
    #[cfg(test)]
    pub(super) fn log_in(&mut self, login: Login) {
        self.login = Some(login);
    }
}

impl Device {
    /// This device's id (its libp2p PeerId).
    pub fn id(&self) -> &DeviceId {
        self.identity.id()
    }

    /// The account, if logged in.
    pub fn account(&self) -> Option<AccountId> {
        self.identity.account()
    }

    /// The relay this device syncs with, if logged in: its first address (the one secret
    /// chats' circuits start with; see [`Device::relay_addrs`] for all).
    pub fn relay(&self) -> Option<&str> {
        self.relay_addrs().into_iter().next()
    }

    /// Every address of the relay this device syncs with, in the order it tries them (empty
    /// when not logged in).
    pub fn relay_addrs(&self) -> Vec<&str> {
        self.identity.login.as_ref().map(|l| l.relay.split_whitespace().collect()).unwrap_or_default()
    }

    /// Moves this device's account to the relay at `addrs` (tried in this order; each
    /// `…/p2p/<peer id>`, at most [`crate::net::MAX_RELAY_ADDRS`]), durably. Nothing is sent:
    /// the account must be on that relay already (the same relay at new addresses, or one
    /// restored from its backup); the next session connects there. Addresses that do not
    /// parse change nothing.
    pub fn set_relay(&mut self, addrs: &[&str]) -> Result<(), Error> {
        let joined = addrs.join(" ");
        crate::net::parse_relay_addrs(&joined)?;
        let mut login = self.identity.login()?.clone();
        login.relay = joined;
        self.store.set_login(&login)?;
        self.identity.login = Some(login);
        Ok(())
    }

    /// The device's libp2p identity (its PeerId is the device id). For tools and tests.
    pub fn keypair(&self) -> libp2p::identity::Keypair {
        libp2p::identity::Keypair::ed25519_from_bytes(self.identity.secrets.ed25519)
            .expect("32 bytes are a valid Ed25519 secret")
    }

    pub(crate) fn login(&self) -> Result<&Login, Error> {
        self.identity.login()
    }

    /// The account's devices this device knows of (certificates verified on arrival).
    pub fn devices(&self) -> Result<Vec<DeviceCert>, Error> {
        Ok(self.store.devices()?)
    }
}

pub(super) fn check_name(name: &str) -> Result<(), Error> {
    if name.len() > MAX_DEVICE_NAME_BYTES {
        return Err(Error::TooLong(name.len(), MAX_DEVICE_NAME_BYTES));
    }
    Ok(())
}
