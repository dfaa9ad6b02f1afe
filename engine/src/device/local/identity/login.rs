//! Logging in: creating an account with this device as its first, linking a new device (its
//! link code, waiting for approval, taking the account's bundle) and approving one from a
//! logged-in device. Each relay exchange comes as a request and a `_done` half, so that a
//! driver other than the one-shot `async` methods (a [`crate::Session`]'s operations) can run
//! it.

use rand::RngCore;
use x25519_dalek::StaticSecret;

use crate::device::error::Error;
use crate::device::local::identity::check_name;
use crate::device::local::Device;
use crate::device::store::Login;
use crate::proto::cert::{AccountKeys, DeviceCert, DeviceCertBody};
use crate::proto::crypto::{open_box, seal_box};
use crate::proto::ids::{AccountId, DeviceId};
use crate::proto::wire::{ClientFrame, InviteToken, RelayFrame, ReqId};

/// A link code: what a new device shows so that a logged-in device can approve it.
///
/// It holds a one-time secret (never sent to the relay; the relay only sees its hash as the
/// link id) and a fingerprint of the new device's keys, which the approving device checks
/// against what the relay says waits under the link id. The fingerprint has 128 bits: a relay
/// that wants to slip in a device of its own must find keys whose fingerprint matches, and at
/// 64 bits that search was within reach.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LinkCode {
    secret: [u8; 16],
    fingerprint: [u8; FINGERPRINT_BYTES],
}

/// The length of a link code's fingerprint of the new device's keys.
const FINGERPRINT_BYTES: usize = 16;

impl LinkCode {
    const PREFIX: &'static str = "stratus-link-";

    fn link_id(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"stratus-link-id");
        h.update(&self.secret);
        *h.finalize().as_bytes()
    }

    fn fingerprint_of(device: &DeviceId, x25519: &[u8; 32]) -> [u8; FINGERPRINT_BYTES] {
        let mut h = blake3::Hasher::new();
        h.update(b"stratus-link-fingerprint");
        h.update(device.0.as_bytes());
        h.update(x25519);
        let mut f = [0u8; FINGERPRINT_BYTES];
        f.copy_from_slice(&h.finalize().as_bytes()[..FINGERPRINT_BYTES]);
        f
    }

    fn context(device: &DeviceId) -> Vec<u8> {
        let mut c = b"link-bundle/".to_vec();
        c.extend_from_slice(device.0.as_bytes());
        c
    }
}

impl std::fmt::Display for LinkCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}{}", Self::PREFIX, hex::encode(self.secret), hex::encode(self.fingerprint))
    }
}

impl std::str::FromStr for LinkCode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let hexpart = s.trim().strip_prefix(Self::PREFIX).ok_or(Error::BadLinkCode)?;
        let bytes = hex::decode(hexpart).map_err(|_| Error::BadLinkCode)?;
        if bytes.len() != 16 + FINGERPRINT_BYTES {
            return Err(Error::BadLinkCode);
        }
        let mut code = LinkCode { secret: [0; 16], fingerprint: [0; FINGERPRINT_BYTES] };
        code.secret.copy_from_slice(&bytes[..16]);
        code.fingerprint.copy_from_slice(&bytes[16..]);
        Ok(code)
    }
}

impl Device {
    /// Creates a new account on `relay` with this device as its first device.
    pub async fn create_account(&mut self, relay: &str, name: &str) -> Result<AccountId, Error> {
        self.create_account_invited(relay, name, None).await
    }

    /// [`Device::create_account`] with an invite token from the relay's operator, for a relay
    /// that takes new accounts only by invitation. A relay that refuses says why with a typed
    /// error ([`Error::Relay`] with `RegistrationClosed` or `InviteRequired`).
    pub async fn create_account_invited(
        &mut self,
        relay: &str,
        name: &str,
        invite: Option<InviteToken>,
    ) -> Result<AccountId, Error> {
        let mut request = self.create_account_request(relay, name, 1)?;
        if let ClientFrame::CreateAccount { invite: slot, .. } = &mut request {
            *slot = invite;
        }
        let (_net, mut stream, _) = self.connect(relay).await?;
        stream.send(&request).await?;
        Self::reply(&mut stream, 1).await?;
        self.create_account_done()
    }

    /// The request that creates a new account with this device as its first device; after the
    /// relay answers `Done`, call [`Device::create_account_done`]. For drivers other than
    /// [`Device::create_account`]. Its `invite` is `None`: set it for a relay that takes new
    /// accounts only by invitation.
    ///
    /// The new account is kept before it is sent: if the reply is lost, asking again sends the
    /// same account, which the relay acknowledges again, instead of a new one that it would
    /// refuse for a device it already knows.
    pub fn create_account_request(&mut self, relay: &str, name: &str, req: ReqId) -> Result<ClientFrame, Error> {
        if let Some(a) = self.account() {
            return Err(Error::AlreadyLoggedIn(a.to_string()));
        }
        check_name(name)?;
        let pending = match self.store.pending_login()? {
            Some(p) if p.cert.body.device == self.identity.id && p.relay == relay => p,
            _ => {
                let keys = AccountKeys::generate(&mut self.rng);
                let account = keys.public();
                let cert = keys.certify(DeviceCertBody {
                    account: account.id,
                    device: self.identity.id.clone(),
                    device_x25519: self.identity.x25519_public(),
                    name: name.to_string(),
                    created_ms: self.now_ms() as u64,
                });
                let p = Login { account, keys, cert, relay: relay.to_string() };
                self.store.set_pending_login(&p)?;
                p
            }
        };
        Ok(ClientFrame::CreateAccount { req, account: pending.account, cert: pending.cert, invite: None })
    }

    /// Logs in with the account of [`Device::create_account_request`] once the relay accepted it.
    pub fn create_account_done(&mut self) -> Result<AccountId, Error> {
        let login =
            self.store.pending_login()?.filter(|p| p.cert.body.device == self.identity.id).ok_or(Error::NotLoggedIn)?;
        self.store.set_login(&login)?;
        self.store.put_device(&login.cert)?;
        let id = login.account.id;
        self.identity.login = Some(login);
        Ok(id)
    }

    /// The link code of this (not yet logged-in) device. It is made once and kept until the
    /// device is linked, so that a `link` interrupted after approval can be run again and
    /// fetch the approval the relay kept for it.
    pub fn link_code(&mut self) -> Result<LinkCode, Error> {
        let secret = match self.store.link_secret()? {
            Some(s) => s,
            None => {
                let mut s = [0u8; 16];
                self.rng.fill_bytes(&mut s);
                self.store.set_link_secret(&s)?;
                s
            }
        };
        Ok(LinkCode {
            secret,
            fingerprint: LinkCode::fingerprint_of(&self.identity.id, &self.identity.x25519_public()),
        })
    }

    /// Waits on `relay` until a logged-in device approves `code`, then stores the account
    /// bundle. Run a [`crate::Session`] afterwards to pull the history.
    pub async fn link(&mut self, relay: &str, name: &str, code: &LinkCode) -> Result<AccountId, Error> {
        let request = self.link_request(name, code, 1)?;
        let (_net, mut stream, _) = self.connect(relay).await?;
        stream.send(&request).await?;
        let reply = Self::reply(&mut stream, 1).await?;
        self.link_done(relay, code, reply)
    }

    /// The request that waits for approval of `code`; pass the relay's answer to
    /// [`Device::link_done`]. For drivers other than [`Device::link`].
    pub fn link_request(&mut self, name: &str, code: &LinkCode, req: ReqId) -> Result<ClientFrame, Error> {
        if let Some(a) = self.account() {
            return Err(Error::AlreadyLoggedIn(a.to_string()));
        }
        check_name(name)?;
        Ok(ClientFrame::LinkWait {
            req,
            link_id: code.link_id(),
            device_x25519: self.identity.x25519_public(),
            name: name.to_string(),
        })
    }

    /// Opens and checks the approval the relay delivered for `code` and logs in.
    pub fn link_done(&mut self, relay: &str, code: &LinkCode, reply: RelayFrame) -> Result<AccountId, Error> {
        let RelayFrame::LinkApproved { account, cert, bundle, .. } = reply else {
            return Err(Error::LinkMismatch);
        };
        let plain = open_box(
            &StaticSecret::from(self.identity.secrets.x25519),
            &code.secret,
            &LinkCode::context(&self.identity.id),
            &bundle,
        )?;
        let keys: AccountKeys = postcard::from_bytes(&plain).map_err(|_| Error::LinkMismatch)?;
        if keys.public() != account || !keys.is_consistent() {
            return Err(Error::LinkMismatch);
        }
        account.validate()?;
        cert.verify(&keys.current())?;
        if cert.body.device != self.identity.id || cert.body.device_x25519 != self.identity.x25519_public() {
            return Err(Error::LinkMismatch);
        }
        let login = Login { account: account.clone(), keys, cert: cert.clone(), relay: relay.to_string() };
        self.store.set_login(&login)?;
        self.store.put_device(&cert)?;
        self.identity.login = Some(login);
        Ok(account.id)
    }

    /// Approves the device that shows `code`: signs its certificate and seals the account bundle
    /// to it. Returns the new device's id and name.
    pub async fn approve(&mut self, code: &LinkCode) -> Result<(DeviceId, String), Error> {
        let relay = self.login()?.relay.clone();
        let (_net, mut stream, _) = self.connect(&relay).await?;
        stream.send(&Self::approve_lookup(code, 1)).await?;
        let info = Self::reply(&mut stream, 1).await?;
        let (request, cert) = self.approve_request(code, info, 2)?;
        stream.send(&request).await?;
        Self::reply(&mut stream, 2).await?;
        self.approve_done(&cert)
    }

    /// The request that asks the relay who waits under `code`; pass the answer to
    /// [`Device::approve_request`]. For drivers other than [`Device::approve`].
    pub fn approve_lookup(code: &LinkCode, req: ReqId) -> ClientFrame {
        ClientFrame::LinkLookup { req, link_id: code.link_id() }
    }

    /// Checks that the device the relay named in `info` is the one `code` shows, and returns the
    /// approval request with the certificate it carries (for [`Device::approve_done`] once the
    /// relay answers `Done`).
    pub fn approve_request(
        &mut self,
        code: &LinkCode,
        info: RelayFrame,
        req: ReqId,
    ) -> Result<(ClientFrame, DeviceCert), Error> {
        let login = self.login()?.clone();
        let RelayFrame::LinkInfo { device, device_x25519, name, .. } = info else {
            return Err(Error::LinkMismatch);
        };
        if LinkCode::fingerprint_of(&device, &device_x25519) != code.fingerprint {
            return Err(Error::LinkMismatch);
        }
        check_name(&name)?;
        let cert = login.keys.certify(DeviceCertBody {
            account: login.account.id,
            device: device.clone(),
            device_x25519,
            name,
            created_ms: self.now_ms() as u64,
        });
        let bundle_plain = postcard::to_allocvec(&login.keys).expect("serializing keys cannot fail");
        let bundle = seal_box(&device_x25519, &code.secret, &LinkCode::context(&device), &bundle_plain, &mut self.rng);
        Ok((ClientFrame::LinkApprove { req, link_id: code.link_id(), cert: cert.clone(), bundle }, cert))
    }

    /// Records the approved device once the relay accepted the approval.
    pub fn approve_done(&mut self, cert: &DeviceCert) -> Result<(DeviceId, String), Error> {
        self.store.put_device(cert)?;
        Ok((cert.body.device.clone(), cert.body.name.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15, item 10: the fingerprint of the new device's keys in a link code has 128 bits
    /// (a relay that could match a 64-bit one with keys of its own could slip its device in).
    #[test]
    fn a_link_code_carries_a_128_bit_fingerprint_of_the_new_devices_keys() {
        let device = DeviceId("12D3KooWnew".into());
        let code = LinkCode { secret: [7; 16], fingerprint: LinkCode::fingerprint_of(&device, &[9; 32]) };
        let text = code.to_string();
        assert_eq!(text.len(), LinkCode::PREFIX.len() + 2 * (16 + 16), "{text}");
        assert_eq!(text.parse::<LinkCode>().unwrap(), code);
        // Another key gives another fingerprint in all 128 bits' worth of places.
        let other = LinkCode::fingerprint_of(&device, &[8; 32]);
        assert_ne!(other, code.fingerprint);
        // A code of the earlier form (64-bit fingerprint) is refused, not half-checked.
        let short = &text[..text.len() - 16];
        assert!(matches!(short.parse::<LinkCode>(), Err(Error::BadLinkCode)));
    }
}
