//! What travels inside a secret chat's Noise channel, and the texts' own keys.
//!
//! Frames (postcard, one payload of the channel each):
//! * `Sync`: an Automerge sync message for the chat's document;
//! * `Keys`: keys of messages written on the sending device, which the receiver stores apart
//!   from the document; `KeysAck` names the ones it stored;
//! * `Close`: the sending device deleted the chat; the receiver deletes its side.
//!
//! A message's text is sealed in the document under a key of its own (`seal_text`), with its
//! self-destruct timer. Automerge keeps every change, so a text written into the document
//! could never be removed from it; deleting the key removes it.

use std::collections::BTreeSet;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use super::noise::{Channel, SecretError};
use crate::device::doc::SyncState;
use crate::proto::ids::SecretId;

/// Most message keys in one `Keys` frame (a frame stays far below the channel's payload limit).
pub const MAX_KEYS_PER_FRAME: usize = 1024;
/// What a sealed text starts with in the document.
const PREFIX: &str = "shred:";

/// One payload of a secret chat's channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretFrame {
    /// An Automerge sync message.
    Sync(Vec<u8>),
    /// Message keys: `(message id, key)`.
    Keys(Vec<(String, [u8; 32])>),
    /// The message keys the sender stored.
    KeysAck(Vec<String>),
    /// The sender deleted the chat.
    Close,
}

impl SecretFrame {
    /// The frame a payload holds.
    pub fn decode(bytes: &[u8]) -> Result<SecretFrame, SecretError> {
        let frame: SecretFrame = postcard::from_bytes(bytes).map_err(|_| SecretError::Malformed)?;
        match &frame {
            SecretFrame::Keys(k) if k.len() > MAX_KEYS_PER_FRAME => Err(SecretError::TooLarge),
            SecretFrame::KeysAck(k) if k.len() > MAX_KEYS_PER_FRAME => Err(SecretError::TooLarge),
            _ => Ok(frame),
        }
    }

    /// Its bytes.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding a frame cannot fail")
    }
}

/// A live session with the peer device: the Noise channel and what Automerge's sync protocol
/// knows of the peer. Dropped when the connection ends; the next connection starts afresh.
pub struct SecretLink {
    /// The chat.
    pub chat: SecretId,
    pub(crate) channel: Channel,
    pub(crate) sync: SyncState,
    /// The message keys sent on this link (each goes once).
    pub(crate) keys_sent: BTreeSet<String>,
}

impl std::fmt::Debug for SecretLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretLink").field("chat", &self.chat).finish_non_exhaustive()
    }
}

impl SecretLink {
    /// A link over an established channel.
    pub fn new(chat: SecretId, channel: Channel) -> SecretLink {
        SecretLink { chat, channel, sync: SyncState::new(), keys_sent: BTreeSet::new() }
    }

    /// Seals frames into channel messages, in order.
    pub(crate) fn seal(&mut self, frames: &[SecretFrame], now_ms: i64) -> Result<Vec<Vec<u8>>, SecretError> {
        let mut out = Vec::new();
        for f in frames {
            out.extend(self.channel.seal(&f.encode(), now_ms)?);
        }
        Ok(out)
    }
}

/// What a message's own key seals: its text and its timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SecretText {
    /// The text.
    pub text: String,
    /// Seconds after it is read that it disappears, if it does.
    pub ttl_s: Option<u32>,
}

fn text_ad(chat: SecretId, message: &str) -> Vec<u8> {
    [&b"stratus-secret-text-v1"[..], &chat.0, message.as_bytes()].concat()
}

/// Seals a message's text under its own key, bound to the chat and the message id.
pub(crate) fn seal_text<R: RngCore + CryptoRng>(
    key: &[u8; 32],
    chat: SecretId,
    message: &str,
    text: &SecretText,
    rng: &mut R,
) -> String {
    let mut nonce = [0u8; 24];
    rng.fill_bytes(&mut nonce);
    let plain = postcard::to_allocvec(text).expect("encoding a text cannot fail");
    let ct = XChaCha20Poly1305::new(key.into())
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: &plain, aad: &text_ad(chat, message) })
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    format!("{PREFIX}{}{}", hex::encode(nonce), hex::encode(ct))
}

/// Opens a text sealed by [`seal_text`]; `None` if it is not one or does not open.
pub(crate) fn open_text(key: &[u8; 32], chat: SecretId, message: &str, sealed: &str) -> Option<SecretText> {
    let bytes = hex::decode(sealed.strip_prefix(PREFIX)?).ok()?;
    if bytes.len() < 24 {
        return None;
    }
    let (nonce, ct) = bytes.split_at(24);
    let plain = XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &text_ad(chat, message) })
        .ok()?;
    postcard::from_bytes(&plain).ok()
}
