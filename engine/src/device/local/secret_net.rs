//! Secret chats over the network: which devices of another account one can be started with
//! (from the relay, each certificate checked against the account's keys), and the opening of a
//! secret stream between two devices: the opener names the chat and shows its certificate in
//! the clear (inside libp2p's own encrypted connection between the two devices), the other
//! answers, and a Noise KK handshake between the certificates' static keys starts the link.
//! Part of [`Device`]; split out of `local.rs` for size.

use serde::{Deserialize, Serialize};

use super::*;
use crate::device::local::secret::SecretUpdate;
use crate::device::net::SecretStream;
use crate::device::secret::{Ends, Handshake, Pattern, SecretError, SecretLink};
use crate::device::store::{SecretChat, SecretState};
use crate::proto::ids::SecretId;

/// The first frame on a secret stream, from the device that opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opening {
    /// The chat.
    pub chat: SecretId,
    /// The opening device's certificate.
    pub cert: DeviceCert,
}

/// The answer to an [`Opening`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The chat is accepted here: the handshake follows.
    Go,
    /// The chat waits for this device's user to accept it.
    Pending,
    /// The chat was closed here: the opener deletes it too.
    Gone,
}

/// A link just opened: the link and what to send first.
pub type Opened = (SecretLink, Vec<Vec<u8>>);

fn decode<T: for<'a> Deserialize<'a>>(frame: Option<Vec<u8>>) -> Result<T, Error> {
    let bytes = frame.ok_or(Error::Secret(SecretError::Handshake("the peer closed the stream".into())))?;
    postcard::from_bytes(&bytes).map_err(|_| Error::Secret(SecretError::Malformed))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("encoding a frame cannot fail")
}

impl Device {
    /// The devices of `account` a secret chat can be started with: the relay's list, each
    /// certificate checked against the account's keys as this device knows them (look the
    /// account up first), with whether the device is connected now.
    pub async fn secret_devices(&mut self, account: AccountId) -> Result<Vec<(DeviceCert, bool)>, Error> {
        let Some(contact) = self.store.contact(account)? else {
            return Err(Error::Untrusted("not a contact: look the user up first"));
        };
        let gens = contact.chain.verify()?;
        let frame = self.one_request(ClientFrame::AccountDevices { req: 1, account }, 1).await?;
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
    fn check_peer_cert(&self, cert: &DeviceCert) -> Result<bool, Error> {
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
        let mut chat = self.secret(id)?;
        if !chat.verified {
            self.fetch_keys(chat.peer_cert.body.account).await?;
            if !self.check_peer_cert(&chat.peer_cert)? {
                return Err(Error::Untrusted("the offering device's account is unknown to the relay"));
            }
            chat.verified = true;
            self.store.put_secret(&chat)?;
        }
        self.secret_accept(id)
    }

    /// Opens the link of a secret chat this device started (or that the peer offered and this
    /// device accepted) over a stream it opened to the peer. `None` when the peer has not
    /// accepted yet, or closed the chat (then it is deleted here too).
    pub async fn secret_open(&mut self, id: SecretId, stream: &mut SecretStream) -> Result<Option<Opened>, Error> {
        let mut chat = self.store.secret(id)?.ok_or(Error::UnknownSecret(id))?;
        let cert = self.login()?.cert.clone();
        stream.send(&encode(&Opening { chat: id, cert })).await?;
        match decode::<Answer>(recv_within(stream).await?)? {
            Answer::Go => {}
            Answer::Pending => return Ok(None),
            Answer::Gone => {
                self.forget_secret(id, None)?;
                return Ok(None);
            }
        }
        let peer = chat.peer_cert.body.device.clone();
        let ends = Ends { chat: id, initiator: &self.id, responder: &peer };
        let mut hs =
            Handshake::new(Pattern::KK, true, &ends, &self.secrets.x25519, &chat.peer_static(), &mut self.rng)?;
        stream.send(&hs.write(b"")?).await?;
        hs.read(&decode_raw(recv_within(stream).await?)?)?;
        let channel = hs.finish(self.now_ms())?;
        if chat.state == SecretState::Inviting {
            chat.state = SecretState::Active;
            self.store.put_secret(&chat)?;
        }
        Ok(Some(self.secret_link_up(id, channel)?))
    }

    /// Answers a secret stream the device `peer` (authenticated by libp2p) opened to this one.
    /// A chat this device does not know is recorded as offered, and taken at once if
    /// `auto_accept` and the peer's certificate checks. `None` when the chat waits for this
    /// device's user, or was closed here.
    pub async fn secret_answer(
        &mut self,
        peer: &DeviceId,
        stream: &mut SecretStream,
        auto_accept: bool,
    ) -> Result<Option<Opened>, Error> {
        let opening: Opening = decode(recv_within(stream).await?)?;
        if opening.cert.body.device != *peer {
            return Err(Error::Untrusted("a secret chat opened with another device's certificate"));
        }
        let id = opening.chat;
        let chat: SecretChat = match self.store.secret(id)? {
            Some(c) if c.peer_cert.body.device != *peer => {
                return Err(Error::Untrusted("another device's secret chat"));
            }
            // The device this device offered the chat to opens it: it accepted.
            Some(mut c) if c.state == SecretState::Inviting => {
                c.state = SecretState::Active;
                self.store.put_secret(&c)?;
                c
            }
            Some(c) => c,
            None => {
                // Offers cost a record (and with auto-accept a lookup) each: bounded, also those
                // taken at once.
                let offered = self.store.secret_chats()?.iter().filter(|c| !c.started_here).count();
                if offered >= MAX_OFFERS {
                    return Err(Error::Untrusted("too many secret chats started by other devices; close some"));
                }
                let mut verified = self.check_peer_cert(&opening.cert)?;
                if !verified && auto_accept {
                    self.fetch_keys(opening.cert.body.account).await?;
                    verified = self.check_peer_cert(&opening.cert)?;
                }
                self.secret_offered(id, opening.cert, verified, auto_accept)?
            }
        };
        let answer = match chat.state {
            SecretState::Active => Answer::Go,
            SecretState::Closing => Answer::Gone,
            SecretState::Invited | SecretState::Inviting => Answer::Pending,
        };
        stream.send(&encode(&answer)).await?;
        match answer {
            Answer::Go => {}
            Answer::Pending => return Ok(None),
            Answer::Gone => {
                self.forget_secret(id, None)?;
                return Ok(None);
            }
        }
        let ends = Ends { chat: id, initiator: peer, responder: &self.id };
        let mut hs =
            Handshake::new(Pattern::KK, false, &ends, &self.secrets.x25519, &chat.peer_static(), &mut self.rng)?;
        hs.read(&decode_raw(recv_within(stream).await?)?)?;
        stream.send(&hs.write(b"")?).await?;
        let channel = hs.finish(self.now_ms())?;
        Ok(Some(self.secret_link_up(id, channel)?))
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
        Ok(crate::device::secret::fingerprint(id, &self.x25519_public(), &chat.peer_static()))
    }
}

/// How long the other device may take for each step of the opening and the handshake.
pub const OPENING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most secret chats started by other devices (offered or taken) on one device: more offers
/// are refused.
pub const MAX_OFFERS: usize = 256;

async fn recv_within(stream: &mut SecretStream) -> Result<Option<Vec<u8>>, Error> {
    tokio::time::timeout(OPENING_TIMEOUT, stream.recv())
        .await
        .map_err(|_| Error::Secret(SecretError::Handshake("the other device did not answer in time".into())))?
        .map_err(Error::from)
}

fn decode_raw(frame: Option<Vec<u8>>) -> Result<Vec<u8>, Error> {
    frame.ok_or(Error::Secret(SecretError::Handshake("the peer closed the stream".into())))
}
