//! One secret stream between two devices, from its opening to its end, without I/O: the
//! opener names the chat and shows its certificate in the clear (inside libp2p's own
//! encrypted connection between the two devices, which authenticates both device ids), the
//! other device answers, and a Noise KK handshake between the certificates' static keys starts
//! the link. Feed each frame from the stream to [`Device::secret_step`] and send what it
//! returns; [`Device::secret_open`] and the session's secret chats drive it over libp2p.

use serde::{Deserialize, Serialize};

use crate::device::error::Error;
use crate::device::local::secret::SecretUpdate;
use crate::device::local::Device;
use crate::device::secret::{Ends, Handshake, Pattern, SecretError, SecretFrame, SecretLink};
use crate::device::store::{SecretChat, SecretState};
use crate::proto::cert::DeviceCert;
use crate::proto::ids::{AccountId, DeviceId, SecretId};

/// The first frame on a secret stream, from the device that opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opening {
    /// The chat.
    pub chat: SecretId,
    /// The opening device's certificate.
    pub cert: DeviceCert,
    /// The opening device closed the chat (or never took the offer): the other deletes it too,
    /// without a handshake (libp2p authenticated the opener's device id).
    pub close: bool,
}

/// The answer to an [`Opening`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The chat is accepted here: the handshake follows.
    Go,
    /// The chat waits for this device's user to accept it.
    Pending,
    /// The chat is not (or no longer) here: the opener deletes it too.
    Gone,
}

/// How long the other device may take for each step of the opening and the handshake.
pub(crate) const OPENING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most secret chats started by other devices (offered or taken) on one device: more offers
/// are refused.
pub(crate) const MAX_OFFERS: usize = 256;

/// A secret stream's state; see the module's documentation.
#[derive(Debug)]
pub struct SecretConn {
    peer: DeviceId,
    opened_here: bool,
    chat: Option<SecretId>,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Answering: waits for the [`Opening`].
    AwaitOpening,
    /// Answering: the offering account's keys are being looked up.
    AwaitLookup(Opening),
    /// Opening: waits for the [`Answer`].
    AwaitAnswer { close: bool },
    /// Waits for the peer's handshake message.
    Handshake(Box<Handshake>),
    /// The link is up.
    Up(SecretLink),
    /// Nothing more passes.
    Ended,
}

/// What a frame did to a [`SecretConn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A step of the opening or the handshake.
    Continue,
    /// The link came up: the chat's messages pass from now on.
    Up(SecretId),
    /// A message from the peer on the live link, and what it did (`closed`: the stream is done).
    Update(SecretUpdate),
    /// The answering device takes offers at once and needs the offering `account`'s keys to
    /// check its certificate: look them up ([`Device::take_accounts`]), then call
    /// [`Device::secret_looked_up`] (also if the lookup failed).
    Lookup(AccountId),
    /// The stream's work is done: close it.
    Ended(Ended),
}

/// Why a stream ended before its link came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The chat waits for a user to accept it (the other device's user if this device opened
    /// the stream; this device's user if the other did: an offer was recorded).
    Pending(SecretId),
    /// The chat was closed on one side; it is deleted on this device too.
    Gone(SecretId),
}

impl SecretConn {
    /// The device at the other end (authenticated by libp2p).
    pub fn peer(&self) -> &DeviceId {
        &self.peer
    }

    /// The chat, once named.
    pub fn chat(&self) -> Option<SecretId> {
        self.chat
    }

    /// Whether this device opened the stream.
    pub fn opened_here(&self) -> bool {
        self.opened_here
    }

    /// Whether the link is up.
    pub fn is_up(&self) -> bool {
        matches!(self.phase, Phase::Up(_))
    }

    /// The live link, once up.
    pub fn into_link(self) -> Option<SecretLink> {
        match self.phase {
            Phase::Up(link) => Some(link),
            _ => None,
        }
    }
}

fn decode<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> Result<T, Error> {
    postcard::from_bytes(bytes).map_err(|_| Error::Secret(SecretError::Malformed))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("encoding a frame cannot fail")
}

fn out_of_turn() -> Error {
    Error::Secret(SecretError::Handshake("a frame out of turn".into()))
}

impl Device {
    /// Opens a stream for the secret chat `id` (one this device started, accepted, or closed
    /// and has not told the peer yet): the conn and the first frame to send.
    pub fn secret_connect(&mut self, id: SecretId) -> Result<(SecretConn, Vec<u8>), Error> {
        let chat = self.store.secret(id)?.ok_or(Error::UnknownSecret(id))?;
        if chat.state == SecretState::Invited {
            return Err(Error::SecretNotAccepted(id));
        }
        let close = chat.state == SecretState::Closing;
        let cert = self.login()?.cert.clone();
        let conn = SecretConn {
            peer: chat.peer_cert.body.device.clone(),
            opened_here: true,
            chat: Some(id),
            phase: Phase::AwaitAnswer { close },
        };
        Ok((conn, encode(&Opening { chat: id, cert, close })))
    }

    /// A stream the device `peer` (authenticated by libp2p) opened to this one.
    pub fn secret_incoming(&self, peer: DeviceId) -> SecretConn {
        SecretConn { peer, opened_here: false, chat: None, phase: Phase::AwaitOpening }
    }

    /// Feeds one frame from the stream. Returns what to send and what it did. An error leaves
    /// the conn dead (close the stream); what was applied before stays.
    pub fn secret_step(&mut self, conn: &mut SecretConn, frame: &[u8]) -> Result<(Vec<Vec<u8>>, Step), Error> {
        let result = self.step(conn, frame);
        if result.is_err() {
            conn.phase = Phase::Ended;
        }
        result
    }

    fn step(&mut self, conn: &mut SecretConn, frame: &[u8]) -> Result<(Vec<Vec<u8>>, Step), Error> {
        match std::mem::replace(&mut conn.phase, Phase::Ended) {
            Phase::AwaitOpening => {
                let opening: Opening = decode(frame)?;
                if opening.cert.body.device != conn.peer {
                    return Err(Error::Untrusted("a secret chat opened with another device's certificate"));
                }
                // A new offer, to be taken at once, from an account whose keys are not here:
                // look them up first (within the cap on offers).
                let new = self.store.secret(opening.chat)?.is_none() && !self.store.is_closed_secret(opening.chat)?;
                if new && !opening.close && self.secret_auto_accept()? {
                    self.check_offer_cap()?;
                    let account = opening.cert.body.account;
                    if !self.check_peer_cert(&opening.cert)? {
                        conn.phase = Phase::AwaitLookup(opening);
                        return Ok((Vec::new(), Step::Lookup(account)));
                    }
                }
                self.answer(conn, opening)
            }
            Phase::AwaitAnswer { close } => {
                let id = conn.chat.expect("an opener names its chat");
                match (decode::<Answer>(frame)?, close) {
                    (Answer::Go, false) => {}
                    (Answer::Pending, false) => return Ok((Vec::new(), Step::Ended(Ended::Pending(id)))),
                    (Answer::Gone, _) => {
                        self.forget_secret(id, None)?;
                        return Ok((Vec::new(), Step::Ended(Ended::Gone(id))));
                    }
                    (_, true) => return Err(Error::Untrusted("the other device kept a chat closed here")),
                }
                let chat = self.store.secret(id)?.ok_or(Error::UnknownSecret(id))?;
                let ends = Ends { chat: id, initiator: self.identity.id(), responder: &conn.peer };
                let mut hs = Handshake::new(
                    Pattern::KK,
                    true,
                    &ends,
                    self.identity.x25519_secret(),
                    &chat.peer_static(),
                    &mut self.rng,
                )?;
                let first = hs.write(b"")?;
                conn.phase = Phase::Handshake(Box::new(hs));
                Ok((vec![first], Step::Continue))
            }
            Phase::Handshake(mut hs) => {
                let id = conn.chat.expect("a handshake names its chat");
                hs.read(frame)?;
                let mut out = Vec::new();
                if !conn.opened_here {
                    out.push(hs.write(b"")?);
                }
                let channel = hs.finish(self.now_ms())?;
                let mut chat = self.store.secret(id)?.ok_or(Error::UnknownSecret(id))?;
                if chat.state == SecretState::Inviting {
                    // The device it was offered to opened it, or answered `Go`: it accepted.
                    chat.state = SecretState::Active;
                    self.store.put_secret(&chat)?;
                }
                let (link, first) = self.secret_link_up(id, channel)?;
                out.extend(first);
                conn.phase = Phase::Up(link);
                Ok((out, Step::Up(id)))
            }
            Phase::Up(mut link) => {
                let result = self.secret_receive(&mut link, frame);
                conn.phase = Phase::Up(link);
                let (out, update) = result?;
                if update.closed {
                    conn.phase = Phase::Ended;
                }
                Ok((out, Step::Update(update)))
            }
            Phase::AwaitLookup(_) | Phase::Ended => Err(out_of_turn()),
        }
    }

    /// Goes on with an opening that waited for [`Step::Lookup`] (the keys taken, or the lookup
    /// failed: then the offer waits for this device's user).
    pub fn secret_looked_up(&mut self, conn: &mut SecretConn) -> Result<(Vec<Vec<u8>>, Step), Error> {
        let Phase::AwaitLookup(opening) = std::mem::replace(&mut conn.phase, Phase::Ended) else {
            return Err(out_of_turn());
        };
        self.answer(conn, opening)
    }

    /// Answers an opening: the chat's record decides.
    fn answer(&mut self, conn: &mut SecretConn, opening: Opening) -> Result<(Vec<Vec<u8>>, Step), Error> {
        let id = opening.chat;
        let peer = conn.peer.clone();
        let chat: Option<SecretChat> = match self.store.secret(id)? {
            Some(c) if c.peer_cert.body.device != peer => {
                return Err(Error::Untrusted("another device's secret chat"));
            }
            Some(_) if opening.close => None,
            Some(c) => Some(c),
            // Closed here lately: an opening sent before the other device heard of it.
            None if opening.close || self.store.is_closed_secret(id)? => None,
            None => {
                self.check_offer_cap()?;
                let verified = self.check_peer_cert(&opening.cert)?;
                let auto = self.secret_auto_accept()?;
                Some(self.secret_offered(id, opening.cert, verified, auto)?)
            }
        };
        let answer = match chat.as_ref().map(|c| c.state) {
            Some(SecretState::Active | SecretState::Inviting) => Answer::Go,
            Some(SecretState::Invited) => Answer::Pending,
            Some(SecretState::Closing) | None => Answer::Gone,
        };
        let out = vec![encode(&answer)];
        conn.chat = Some(id);
        match (answer, chat) {
            (Answer::Go, Some(chat)) => {
                let ends = Ends { chat: id, initiator: &peer, responder: self.identity.id() };
                let hs = Handshake::new(
                    Pattern::KK,
                    false,
                    &ends,
                    self.identity.x25519_secret(),
                    &chat.peer_static(),
                    &mut self.rng,
                )?;
                conn.phase = Phase::Handshake(Box::new(hs));
                Ok((out, Step::Continue))
            }
            (Answer::Pending, _) => Ok((out, Step::Ended(Ended::Pending(id)))),
            _ => {
                if self.store.secret(id)?.is_some() {
                    self.forget_secret(id, None)?;
                }
                Ok((out, Step::Ended(Ended::Gone(id))))
            }
        }
    }

    /// Offers cost a record (and with auto-accept a lookup) each: bounded, also those taken at
    /// once.
    fn check_offer_cap(&self) -> Result<(), Error> {
        let offered = self.store.secret_chats()?.iter().filter(|c| !c.started_here).count();
        match offered >= MAX_OFFERS {
            true => Err(Error::Untrusted("too many secret chats started by other devices; close some")),
            false => Ok(()),
        }
    }

    /// The state of the secret chat `id`, if it is here.
    pub fn secret_state(&self, id: SecretId) -> Option<SecretState> {
        self.store.secret(id).ok().flatten().map(|c| c.state)
    }

    /// Whether a live conn has carried everything: the peer has this device's heads, and every
    /// key sent on it was acknowledged.
    pub fn secret_conn_settled(&mut self, conn: &SecretConn) -> bool {
        let Phase::Up(link) = &conn.phase else { return false };
        if !link.keys_sent.is_empty() || link.sync.in_flight {
            return false;
        }
        let mut shared = link.sync.shared_heads.clone();
        shared.sort();
        self.secret_doc(link.chat).is_ok_and(|doc| {
            let mut heads = doc.head_hashes();
            heads.sort();
            heads == shared
        })
    }

    /// The device at the other end of the secret chat `id`.
    pub fn secret_peer(&self, id: SecretId) -> Option<DeviceId> {
        self.store.secret(id).ok().flatten().map(|c| c.peer_cert.body.device)
    }

    /// The offering device's certificate, if `id` is an offer waiting for this device's user.
    pub fn secret_offer(&self, id: SecretId) -> Option<DeviceCert> {
        let chat = self.store.secret(id).ok().flatten()?;
        (chat.state == SecretState::Invited).then_some(chat.peer_cert)
    }

    /// Whether the secret chat `id` has something for the peer that only a link carries: an
    /// offer or a close to tell, or keys of messages written here not yet delivered.
    pub fn secret_waiting(&self, id: SecretId) -> Result<bool, Error> {
        let Some(chat) = self.store.secret(id)? else { return Ok(false) };
        if matches!(chat.state, SecretState::Closing | SecretState::Inviting) {
            return Ok(true);
        }
        Ok(chat.state == SecretState::Active && !self.store.undelivered_keys(id)?.is_empty())
    }

    /// What a live conn is to carry after this device wrote, read or closed in its chat (see
    /// [`Device::secret_flush`]); nothing before the link is up.
    pub fn secret_conn_flush(&mut self, conn: &mut SecretConn) -> Result<Vec<Vec<u8>>, Error> {
        let Phase::Up(link) = &mut conn.phase else { return Ok(Vec::new()) };
        let id = link.chat;
        if self.store.secret(id)?.is_some_and(|c| c.state == SecretState::Closing) {
            return Ok(link.seal(&[SecretFrame::Close], self.now_ms())?);
        }
        self.secret_flush(link)
    }
}
