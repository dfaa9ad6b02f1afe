//! The end-to-end session of a secret chat: a Noise handshake between the two devices' static
//! X25519 keys (the ones their certificates carry), then Noise transport messages.
//!
//! Sans-IO: the caller moves the bytes (one frame per Noise message, see [`MAX_FRAME_BYTES`]),
//! passes the time and the randomness.
//!
//! * **Handshake.** `Noise_KK_25519_ChaChaPoly_BLAKE2s` when each side knows the other's static
//!   key from a verified certificate, `Noise_XX_…` otherwise; with XX the static key the peer
//!   proves is checked against the certificate's once the handshake ends
//!   ([`SecretError::WrongPeer`]). The prologue binds the secret chat and both device ids, so
//!   a handshake cannot be moved to another chat or pair.
//! * **Transport.** Each message's plaintext is a flags byte and a fragment of a payload; a
//!   payload longer than one message is cut into fragments (`FLAG_MORE`) and put together
//!   again up to [`MAX_PAYLOAD_BYTES`]. Noise's nonces count the messages each way and the two
//!   directions have their own keys, so a replayed, reordered, dropped or reflected message fails
//!   to decrypt ([`SecretError::Decrypt`]); the channel is then dead and the connection is to
//!   be closed (a new handshake starts afresh).
//! * **Re-key.** A sender re-keys its direction after [`REKEY_AFTER_MESSAGES`] messages or
//!   [`REKEY_AFTER_MS`] since the last re-key: the message says so (`FLAG_REKEY`), and both
//!   sides move to the next key right after it (Noise's `Rekey()`), so messages in flight
//!   across a re-key are read with the key they were sealed under. Old keys are gone: a key
//!   taken from a device later opens nothing sent before its last re-key.

use rand::{CryptoRng, RngCore, SeedableRng};
use snow::params::NoiseParams;
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver};
use snow::{HandshakeState, TransportState};

use crate::proto::ids::{DeviceId, SecretId};

/// Largest Noise message (the Noise limit).
pub const MAX_FRAME_BYTES: usize = 65_535;
/// Noise's authentication tag.
const TAG_BYTES: usize = 16;
/// Largest payload fragment in one message (after the flags byte and the tag).
pub const MAX_FRAGMENT_BYTES: usize = MAX_FRAME_BYTES - TAG_BYTES - 1;
/// Largest payload put together from fragments: a longer one is refused
/// ([`SecretError::TooLarge`]) and the channel is dead.
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;
/// Messages a direction carries before its key changes.
pub const REKEY_AFTER_MESSAGES: u64 = 100;
/// Time after which a direction's next message changes its key: 7 days.
pub const REKEY_AFTER_MS: i64 = 7 * 24 * 3600 * 1000;
/// Handshake messages carry no payload larger than this.
const MAX_HANDSHAKE_PAYLOAD: usize = 1024;

/// The message is the last under its key: both sides re-key this direction after it.
pub(crate) const FLAG_REKEY: u8 = 1;
/// More fragments of the same payload follow.
pub(crate) const FLAG_MORE: u8 = 2;

/// Why a handshake or a transport message failed. After any error the handshake or channel
/// is dead: drop it and close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The bytes are not a valid handshake message for this step, or fail to decrypt.
    #[error("the secret chat handshake failed: {0}")]
    Handshake(String),
    /// The peer proved a static key other than its certificate's.
    #[error("the peer's key is not the one its certificate names")]
    WrongPeer,
    /// A transport message failed to decrypt: tampered, replayed, reordered, dropped before it,
    /// or reflected back.
    #[error("a secret chat message failed to decrypt (tampered, replayed or out of order)")]
    Decrypt,
    /// A message or payload above the limits.
    #[error("a secret chat message or payload is too large")]
    TooLarge,
    /// A message with unknown flags, or empty.
    #[error("a malformed secret chat message")]
    Malformed,
}

/// Which Noise pattern a handshake uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Both static keys known beforehand: one round trip, the first message already encrypted
    /// to the responder.
    KK,
    /// Static keys exchanged in the handshake (and checked against the certificate after).
    XX,
}

impl Pattern {
    fn params(self) -> NoiseParams {
        let name = match self {
            Pattern::KK => "Noise_KK_25519_ChaChaPoly_BLAKE2s",
            Pattern::XX => "Noise_XX_25519_ChaChaPoly_BLAKE2s",
        };
        name.parse().expect("a valid Noise pattern name")
    }
}

/// The two ends of a secret chat's session, as both sides name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ends<'a> {
    /// The secret chat.
    pub chat: SecretId,
    /// The device that opens the connection (the Noise initiator).
    pub initiator: &'a DeviceId,
    /// The other device.
    pub responder: &'a DeviceId,
}

impl Ends<'_> {
    fn prologue(&self) -> Vec<u8> {
        let mut p = b"stratus-secret-v1".to_vec();
        p.extend_from_slice(&self.chat.0);
        for d in [self.initiator, self.responder] {
            p.extend_from_slice(&(d.0.len() as u32).to_be_bytes());
            p.extend_from_slice(d.0.as_bytes());
        }
        p
    }
}

/// A handshake in progress.
pub struct Handshake {
    state: HandshakeState,
    expected_remote: [u8; 32],
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake").field("initiator", &self.state.is_initiator()).finish_non_exhaustive()
    }
}

impl Handshake {
    /// Starts a handshake as `ends.initiator` (`initiator` true) or `ends.responder`, with this
    /// device's static secret and the peer's static key from its certificate.
    pub fn new<R: RngCore + CryptoRng>(
        pattern: Pattern,
        initiator: bool,
        ends: &Ends<'_>,
        local_secret: &[u8; 32],
        remote_static: &[u8; 32],
        rng: &mut R,
    ) -> Result<Handshake, SecretError> {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let resolver = FallbackResolver::new(Box::new(SeededResolver(seed)), Box::new(DefaultResolver));
        let prologue = ends.prologue();
        let builder = snow::Builder::with_resolver(pattern.params(), Box::new(resolver))
            .local_private_key(local_secret)
            .and_then(|b| b.prologue(&prologue))
            .map_err(noise_error)?;
        let builder = match pattern {
            Pattern::KK => builder.remote_public_key(remote_static).map_err(noise_error)?,
            Pattern::XX => builder,
        };
        let state = match initiator {
            true => builder.build_initiator(),
            false => builder.build_responder(),
        }
        .map_err(noise_error)?;
        Ok(Handshake { state, expected_remote: *remote_static })
    }

    /// True when this side is to write the next handshake message.
    pub fn is_my_turn(&self) -> bool {
        self.state.is_my_turn()
    }

    /// True when the handshake is complete ([`Handshake::finish`]).
    pub fn is_finished(&self) -> bool {
        self.state.is_handshake_finished()
    }

    /// The next handshake message, carrying `payload` (at most 1 KiB; encrypted from the
    /// pattern's second message on, and in KK's first).
    pub fn write(&mut self, payload: &[u8]) -> Result<Vec<u8>, SecretError> {
        if payload.len() > MAX_HANDSHAKE_PAYLOAD {
            return Err(SecretError::TooLarge);
        }
        let mut buf = vec![0u8; MAX_FRAME_BYTES];
        let n = self.state.write_message(payload, &mut buf).map_err(noise_error)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads the peer's handshake message; returns its payload.
    pub fn read(&mut self, message: &[u8]) -> Result<Vec<u8>, SecretError> {
        if message.len() > MAX_FRAME_BYTES {
            return Err(SecretError::TooLarge);
        }
        let mut buf = vec![0u8; MAX_FRAME_BYTES];
        let n = self.state.read_message(message, &mut buf).map_err(noise_error)?;
        if n > MAX_HANDSHAKE_PAYLOAD {
            return Err(SecretError::TooLarge);
        }
        buf.truncate(n);
        Ok(buf)
    }

    /// The channel, once the handshake is complete and the peer proved the expected static key.
    pub fn finish(self, now_ms: i64) -> Result<Channel, SecretError> {
        if !self.state.is_handshake_finished() {
            return Err(SecretError::Handshake("not finished".into()));
        }
        if self.state.get_remote_static() != Some(&self.expected_remote[..]) {
            return Err(SecretError::WrongPeer);
        }
        let transport = self.state.into_transport_mode().map_err(noise_error)?;
        Ok(Channel { transport, sent_under_key: 0, key_since_ms: now_ms, partial: Vec::new(), dead: false })
    }
}

/// An established session: seals payloads into messages and opens the peer's.
pub struct Channel {
    transport: TransportState,
    /// Messages sent under the current outgoing key.
    sent_under_key: u64,
    /// When the current outgoing key came into use.
    key_since_ms: i64,
    /// Fragments of an incoming payload so far.
    partial: Vec<u8>,
    /// Set by any error: everything after is refused.
    dead: bool,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("sent_under_key", &self.sent_under_key).finish_non_exhaustive()
    }
}

impl Channel {
    /// Seals `payload` into one or more messages to send in order. Re-keys this direction
    /// when it is due (see the module docs).
    pub fn seal(&mut self, payload: &[u8], now_ms: i64) -> Result<Vec<Vec<u8>>, SecretError> {
        if self.dead {
            return Err(SecretError::Decrypt);
        }
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(SecretError::TooLarge);
        }
        let mut chunks: Vec<&[u8]> = payload.chunks(MAX_FRAGMENT_BYTES).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        let mut out = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.into_iter().enumerate() {
            self.sent_under_key += 1;
            let rekey = self.sent_under_key >= REKEY_AFTER_MESSAGES
                || now_ms.saturating_sub(self.key_since_ms) >= REKEY_AFTER_MS;
            let flags = if rekey { FLAG_REKEY } else { 0 } | if i < last { FLAG_MORE } else { 0 };
            let mut plain = Vec::with_capacity(chunk.len() + 1);
            plain.push(flags);
            plain.extend_from_slice(chunk);
            let mut buf = vec![0u8; plain.len() + TAG_BYTES];
            let n = self.transport.write_message(&plain, &mut buf).map_err(|_| SecretError::TooLarge)?;
            buf.truncate(n);
            out.push(buf);
            if rekey {
                self.transport.rekey_outgoing();
                self.sent_under_key = 0;
                self.key_since_ms = now_ms;
            }
        }
        Ok(out)
    }

    /// Opens the peer's next message. Returns a whole payload once its last fragment arrived,
    /// `None` while more are to come. Any error leaves the channel dead.
    pub fn open(&mut self, message: &[u8]) -> Result<Option<Vec<u8>>, SecretError> {
        let r = self.open_inner(message);
        if r.is_err() {
            self.dead = true;
            self.partial = Vec::new();
        }
        r
    }

    fn open_inner(&mut self, message: &[u8]) -> Result<Option<Vec<u8>>, SecretError> {
        if self.dead {
            return Err(SecretError::Decrypt);
        }
        if message.len() > MAX_FRAME_BYTES {
            return Err(SecretError::TooLarge);
        }
        let mut plain = vec![0u8; message.len()];
        let n = self.transport.read_message(message, &mut plain).map_err(|_| SecretError::Decrypt)?;
        let (&flags, fragment) = plain[..n].split_first().ok_or(SecretError::Malformed)?;
        if flags & !(FLAG_REKEY | FLAG_MORE) != 0 {
            return Err(SecretError::Malformed);
        }
        if self.partial.len() + fragment.len() > MAX_PAYLOAD_BYTES {
            return Err(SecretError::TooLarge);
        }
        self.partial.extend_from_slice(fragment);
        if flags & FLAG_REKEY != 0 {
            self.transport.rekey_incoming();
        }
        Ok(match flags & FLAG_MORE {
            0 => Some(std::mem::take(&mut self.partial)),
            _ => None,
        })
    }
}

/// The fingerprint of a secret chat's keys, for the two users to compare: from the chat and
/// both devices' static keys (the same on both sides), as 8 groups of 5 digits. Equal numbers
/// mean no one sits between the devices with keys of its own.
pub fn fingerprint(chat: SecretId, a_static: &[u8; 32], b_static: &[u8; 32]) -> String {
    let (lo, hi) = if a_static <= b_static { (a_static, b_static) } else { (b_static, a_static) };
    let mut h = blake3::Hasher::new();
    h.update(b"stratus-secret-fingerprint-v1");
    h.update(&chat.0);
    h.update(lo);
    h.update(hi);
    let mut digest = [0u8; 40];
    h.finalize_xof().fill(&mut digest);
    digest
        .chunks(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn noise_error(e: snow::Error) -> SecretError {
    SecretError::Handshake(e.to_string())
}

/// Gives snow randomness from a seed the caller drew (the core never reads the OS's).
struct SeededResolver([u8; 32]);

impl CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        Some(Box::new(SeededRng(rand::rngs::StdRng::from_seed(self.0))))
    }
    fn resolve_dh(&self, _: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        None
    }
    fn resolve_hash(&self, _: &snow::params::HashChoice) -> Option<Box<dyn snow::types::Hash>> {
        None
    }
    fn resolve_cipher(&self, _: &snow::params::CipherChoice) -> Option<Box<dyn snow::types::Cipher>> {
        None
    }
}

struct SeededRng(rand::rngs::StdRng);

impl snow::types::Random for SeededRng {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

#[cfg(test)]
#[path = "noise_tests.rs"]
mod tests;
