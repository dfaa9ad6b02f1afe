//! The device's error type: everything that can go wrong on a device, each message saying what
//! to do about it in the API's terms.

use crate::device::doc::DocError;
use crate::device::net::NetError;
use crate::device::secret::SecretError;
use crate::device::store::StoreError;
use crate::proto::cert::CertError;
use crate::proto::crypto::CryptoError;
use crate::proto::ids::{ChatId, SecretId};
use crate::proto::wire::ErrorCode;

/// Everything that can go wrong on a device. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device belongs to no account yet.
    #[error("this device is not logged in: create an account, or link or recover this device into one, first")]
    NotLoggedIn,
    /// The device already belongs to an account.
    #[error("this device already belongs to account {0}")]
    AlreadyLoggedIn(String),
    /// No such chat on this device.
    #[error("no chat {0} on this device")]
    UnknownChat(ChatId),
    /// No such secret chat on this device (or it was closed).
    #[error("no secret chat {0} on this device (or it was closed)")]
    UnknownSecret(SecretId),
    /// A secret chat's session failed; the connection is to be closed (the next one starts
    /// afresh).
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The local store could not make a batch of writes durable (its barrier failed): none of
    /// them was answered or sent; they may or may not be on this device after a restart.
    #[error("the local store could not make the write durable: {0}")]
    NotDurable(String),
    /// The relay could not be reached or the connection broke.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The relay does not serve this device's version of the sync protocol: the relay's words,
    /// naming both versions and which side to upgrade. The session stops (nothing reconnects).
    #[error("the relay refuses this device: {0}")]
    VersionRefused(String),
    /// The relay showed this device a version of the account log that another device of the
    /// account (or the relay's own word) contradicts (docs/crypto.md, "Account log forks"):
    /// entries were hidden, changed or added for one of them. Nothing from the comparison was
    /// applied; the user is to be told.
    #[error(transparent)]
    AccountLogForked(#[from] crate::proto::account_chain::Forked),
    /// The relay refused a request.
    #[error("relay refused: {message} ({code:?})")]
    Relay {
        /// The typed error code.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// A link code did not parse.
    #[error("not a valid link code: pass it exactly as the new device showed it")]
    BadLinkCode,
    /// The device waiting under a link code is not the one the code names: someone is
    /// interfering. Nothing was approved.
    #[error("the waiting device does not match the link code; nothing was approved")]
    LinkMismatch,
    /// A document operation failed.
    #[error(transparent)]
    Doc(#[from] DocError),
    /// Opening sealed bytes failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A certificate failed to verify.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// A message text longer than allowed.
    #[error("message too long: {0} bytes (limit {1})")]
    TooLong(usize, usize),
    /// Another device of the account ended this device's session; its account data was deleted
    /// from this device.
    #[error("this device's session was ended by another device of the account; its account data was deleted here")]
    SessionRevoked,
    /// The relay refuses this device's session, saying the account ended it, without a proof
    /// this device accepts; nothing was deleted here.
    #[error("the relay refuses this device's session and says the account ended it, but showed no proof signed by the account; nothing was deleted here")]
    SessionRefused,
    /// A delta is sealed under a key epoch whose key has not arrived yet (it comes in the
    /// account log after a rotation); the delta is applied once it has.
    #[error("chat {0}: the key of epoch {epoch} has not arrived yet", epoch = .1.0)]
    NoKeyYet(ChatId, crate::proto::ids::Epoch),
    /// Only the account that wrote a message can edit or delete it.
    #[error("message {0} was written by another account; only its author can change it")]
    NotYours(String),
    /// A rotation of the account's keys could not be taken: what this device holds does not
    /// agree with it (the reason says how). The device keeps its keys; it can read what it
    /// could, and what is sealed under the new keys stays closed to it.
    #[error("the account's key rotation could not be applied here: {0}")]
    Rotation(&'static str),
    /// This account is no longer a member of the chat (it left or was removed).
    #[error("this account is no longer a member of chat {0}")]
    NotMember(ChatId),
    /// What another account's keys or signed statements say does not hold together (the
    /// reason says how); nothing was taken from it.
    #[error("refused from another account: {0}")]
    Untrusted(&'static str),
    /// The directory gave another account for a username than the one this device pinned
    /// for it: someone may be impersonating the user. Compare safety numbers, then confirm the
    /// contact with the number ([`crate::Session::lookup`] with `confirm`) before trusting it.
    #[error(
        "WARNING: the relay now says {username} is account {now} (safety number {number}), but this device \
         pinned account {pinned} for that name; compare the number with them before trusting it, then confirm \
         the contact with that number"
    )]
    KeyChanged {
        /// The username.
        username: String,
        /// The account pinned for it.
        pinned: crate::proto::ids::AccountId,
        /// The account the directory gives now.
        now: crate::proto::ids::AccountId,
        /// The safety number with the account it gives now.
        number: String,
    },
    /// The account has not accepted chats from this one: the relay would refuse to put it in a
    /// chat this account makes or changes. Nothing was made.
    #[error("{0} has not accepted chats from this account: invite them, and try again once they accept")]
    NotAccepted(String),
    /// The safety number given does not match the account the directory names now.
    #[error("the safety number does not match the account the relay names for {0}; nothing was pinned")]
    NumberMismatch(String),
    /// The session task stopped.
    #[error("the sync session stopped")]
    Stopped,

    /// A secret chat offered by another device that this device's user has not accepted yet.
    #[error("secret chat {0} was offered by another device and waits to be accepted here")]
    SecretNotAccepted(SecretId),

    /// A secret chat command to a session that does not run them.
    #[error("this session does not run secret chats (start it with SessionConfig::secret_chats)")]
    SecretChatsOff,

    /// The session is not connected to the relay, which the request needs.
    #[error("not connected to the relay; try again once connected")]
    Offline,
}
