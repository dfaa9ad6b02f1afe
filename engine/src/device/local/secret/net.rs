//! Secret chats over the network, for one-shot use with a device of one's own (the CLI's
//! commands; a [`crate::Session`] runs them itself): which devices of another account one can
//! be started with (from the relay, each certificate checked against the account's keys), and
//! a [`SecretConn`] driven over one stream until its link is up, then served.

use crate::device::error::Error;
use crate::device::local::secret::conn::{SecretConn, Step, OPENING_TIMEOUT};
use crate::device::local::secret::SecretUpdate;
use crate::device::local::Device;
use crate::device::net::SecretStream;
use crate::device::secret::{SecretError, SecretLink};
use crate::proto::cert::DeviceCert;
use crate::proto::ids::{AccountId, DeviceId, SecretId};
use crate::proto::wire::{ClientFrame, ErrorCode, RelayFrame};

/// A link just opened: the link and what to send first.
pub type Opened = (SecretLink, Vec<Vec<u8>>);

impl Device {
    /// The devices of `account` a secret chat can be started with: the relay's list, each
    /// certificate checked against the account's keys as this device knows them (look the
    /// account up first), with whether the device is connected now.
    pub async fn secret_devices(&mut self, account: AccountId) -> Result<Vec<(DeviceCert, bool)>, Error> {
        if self.store.contact(account)?.is_none() {
            return Err(Error::Untrusted("not a contact: look the user up first"));
        }
        let frame = self.one_request(ClientFrame::AccountDevices { req: 1, account }, 1).await?;
        self.secret_devices_from(account, frame)
    }

    /// [`Device::secret_devices`] from the relay's answer to `AccountDevices`.
    pub(crate) fn secret_devices_from(
        &self,
        account: AccountId,
        frame: RelayFrame,
    ) -> Result<Vec<(DeviceCert, bool)>, Error> {
        let Some(contact) = self.store.contact(account)? else {
            return Err(Error::Untrusted("not a contact: look the user up first"));
        };
        let gens = contact.chain.verify()?;
        let RelayFrame::AccountDevices { devices, .. } = frame else {
            return Err(Error::Relay {
                code: ErrorCode::Internal,
                message: "unexpected reply to a device lookup".into(),
            });
        };
        Ok(devices.into_iter().filter(|(c, _)| gens.iter().any(|g| c.verify(g).is_ok())).collect())
    }

    /// Whether `cert` checks against its account's keys as this device knows them: `Ok(false)`
    /// if the account is not a contact, an error if it is and the certificate does not check.
    pub(super) fn check_peer_cert(&self, cert: &DeviceCert) -> Result<bool, Error> {
        let Some(contact) = self.store.contact(cert.body.account)? else { return Ok(false) };
        let gens = contact.chain.verify()?;
        match gens.iter().any(|g| cert.verify(g).is_ok()) {
            true => Ok(true),
            false => Err(Error::Untrusted("a device certificate its account did not sign")),
        }
    }

    /// Takes `account`'s keys from the relay's directory (checked from the account id, pinned
    /// as a contact's).
    async fn fetch_keys(&mut self, account: AccountId) -> Result<(), Error> {
        let frame = self.one_request(ClientFrame::LookupAccounts { req: 1, accounts: vec![account] }, 1).await?;
        if let RelayFrame::Accounts { accounts, .. } = frame {
            self.take_accounts(&accounts)?;
        }
        Ok(())
    }

    /// Accepts a secret chat another device offered, first checking its certificate against
    /// its account's keys (looked up from the relay if the account is not a contact yet).
    pub async fn secret_accept_offer(&mut self, id: SecretId) -> Result<(), Error> {
        let chat = self.secret(id)?;
        if !chat.verified {
            self.fetch_keys(chat.peer_cert.body.account).await?;
        }
        self.secret_accept_checked(id)
    }

    /// Accepts an offer once its account's keys are here ([`Device::take_accounts`]): its
    /// certificate must check.
    pub(crate) fn secret_accept_checked(&mut self, id: SecretId) -> Result<(), Error> {
        let mut chat = self.secret(id)?;
        if !chat.verified {
            if !self.check_peer_cert(&chat.peer_cert)? {
                return Err(Error::Untrusted("the offering device's account is unknown to the relay"));
            }
            chat.verified = true;
            self.store.put_secret(&chat)?;
        }
        self.secret_accept(id)
    }

    /// Opens the link of a secret chat this device started (or accepted, or closed: then the
    /// peer is told) over a stream it opened to the peer. `None` when the peer has not accepted
    /// yet, or the chat is gone (deleted here too).
    pub async fn secret_open(&mut self, id: SecretId, stream: &mut SecretStream) -> Result<Option<Opened>, Error> {
        let (conn, first) = self.secret_connect(id)?;
        self.until_up(conn, stream, vec![first]).await
    }

    /// Answers a secret stream the device `peer` (authenticated by libp2p) opened to this one.
    /// A chat this device does not know is recorded as offered, and taken at once if this
    /// device's auto-accept setting is on and the peer's certificate checks (the account's
    /// keys are looked up from the relay if need be). `None` when the chat waits for this
    /// device's user, or is gone.
    pub async fn secret_answer(&mut self, peer: &DeviceId, stream: &mut SecretStream) -> Result<Option<Opened>, Error> {
        let conn = self.secret_incoming(peer.clone());
        self.until_up(conn, stream, Vec::new()).await
    }

    /// Drives a conn over `stream` until its link is up (returned with what to send first) or
    /// it ends.
    async fn until_up(
        &mut self,
        mut conn: SecretConn,
        stream: &mut SecretStream,
        mut out: Vec<Vec<u8>>,
    ) -> Result<Option<Opened>, Error> {
        loop {
            for f in out.drain(..) {
                stream.send(&f).await?;
            }
            let frame = decode_raw(recv_within(stream).await?)?;
            let (o, mut step) = self.secret_step(&mut conn, &frame)?;
            out = o;
            if let Step::Lookup(account) = step {
                // A failed lookup leaves the offer waiting for this device's user.
                if let Err(e) = self.fetch_keys(account).await {
                    tracing::debug!(error = %e, "looking up an offering account failed");
                }
                (out, step) = self.secret_looked_up(&mut conn)?;
            }
            match step {
                Step::Continue => {}
                Step::Up(_) => return Ok(Some((conn.into_link().expect("the link is up"), out))),
                Step::Ended(_) | Step::Update(_) | Step::Lookup(_) => {
                    for f in &out {
                        stream.send(f).await?;
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// Carries a secret link: sends `first`, then answers each message from the peer, until
    /// the peer is quiet for `idle`, closes the stream, closes the chat, or `stop` says so of
    /// an update. Returns what the peer's messages did. An error leaves the link dead.
    pub async fn secret_serve(
        &mut self,
        link: &mut SecretLink,
        stream: &mut SecretStream,
        first: Vec<Vec<u8>>,
        idle: std::time::Duration,
        mut stop: impl FnMut(&SecretUpdate) -> bool,
    ) -> Result<Vec<SecretUpdate>, Error> {
        for f in &first {
            stream.send(f).await?;
        }
        let mut updates = Vec::new();
        loop {
            let Ok(frame) = tokio::time::timeout(idle, stream.recv()).await else { return Ok(updates) };
            let Some(frame) = frame? else { return Ok(updates) };
            let (out, update) = self.secret_receive(link, &frame)?;
            for f in &out {
                stream.send(f).await?;
            }
            let done = update.closed || stop(&update);
            updates.push(update);
            if done {
                return Ok(updates);
            }
        }
    }

    /// The fingerprint of a secret chat's keys, for the two users to compare.
    pub fn secret_fingerprint(&self, id: SecretId) -> Result<String, Error> {
        let chat = self.secret(id)?;
        Ok(crate::device::secret::fingerprint(id, &self.identity.x25519_public(), &chat.peer_static()))
    }
}

async fn recv_within(stream: &mut SecretStream) -> Result<Option<Vec<u8>>, Error> {
    tokio::time::timeout(OPENING_TIMEOUT, stream.recv())
        .await
        .map_err(|_| Error::Secret(SecretError::Handshake("the other device did not answer in time".into())))?
        .map_err(Error::from)
}

fn decode_raw(frame: Option<Vec<u8>>) -> Result<Vec<u8>, Error> {
    frame.ok_or(Error::Secret(SecretError::Handshake("the peer closed the stream".into())))
}
