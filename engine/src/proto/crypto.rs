//! Sealing deltas, sealing boxes to X25519 keys, and the account key bundle.
//!
//! * A **delta** is sealed with the chat key of its epoch: XChaCha20-Poly1305 with a random
//!   24-byte nonce; the associated data binds chat, epoch, sender device and client seq, so the
//!   relay cannot move a delta to another chat, epoch, sender or position.
//! * A **sealed box** is addressed to an X25519 public key: an ephemeral X25519 key, HKDF-SHA256
//!   over the shared secret (plus an optional extra secret), then XChaCha20-Poly1305. Chat keys
//!   are wrapped to an account's KEM key this way, and the account bundle to a new device.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use super::ids::{AccountId, ChatId, ClientSeq, DeviceId, Epoch};

const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;

/// Why sealed bytes could not be opened. Deliberately says nothing more: tampering, a wrong key
/// and truncation look the same.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// Authentication failed: wrong key, tampered bytes or tampered associated data.
    #[error("sealed bytes failed to authenticate (tampered, or sealed under another key)")]
    Authentication,
    /// Too short to hold a nonce and a tag.
    #[error("sealed bytes are truncated")]
    Truncated,
    /// A key had the wrong length or form.
    #[error("malformed key material")]
    MalformedKey,
}

/// A 256-bit symmetric chat key for one epoch.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatKey(pub [u8; 32]);

impl ChatKey {
    /// A fresh random key.
    pub fn random<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        Self(k)
    }

    /// The key the epoch's deltas are sealed under, derived from the epoch's key. A member who
    /// joins without the history gets only this one for the earlier epochs: enough to apply the
    /// chat's document (which needs its whole causal history) but not to read the messages'
    /// texts, which are sealed again under the epoch's key (see [`seal_text`]).
    pub fn transport(&self) -> ChatKey {
        ChatKey(blake3::derive_key("stratus chat transport key v1", &self.0))
    }

    fn text_key(&self) -> [u8; 32] {
        blake3::derive_key("stratus chat text key v1", &self.0)
    }
}

/// How a message text sealed by [`seal_text`] starts.
pub const SEALED_TEXT_PREFIX: &str = "sealed:";

fn text_ad(chat: ChatId, message: &str, epoch: Epoch) -> Vec<u8> {
    let mut ad = b"stratus-text-v1".to_vec();
    ad.extend_from_slice(&chat.0);
    ad.extend_from_slice(&epoch.0.to_be_bytes());
    ad.extend_from_slice(message.as_bytes());
    ad
}

/// Seals a message's text under the epoch's key (inside the delta, which is sealed under the
/// transport key), bound to chat, message and epoch: `sealed:` and the hex of epoch, nonce and
/// ciphertext.
pub fn seal_text<R: RngCore + CryptoRng>(
    key: &ChatKey,
    chat: ChatId,
    epoch: Epoch,
    message: &str,
    text: &str,
    rng: &mut R,
) -> String {
    let mut out = epoch.0.to_be_bytes().to_vec();
    out.extend(seal_with_key(&key.text_key(), &text_ad(chat, message, epoch), text.as_bytes(), rng));
    format!("{SEALED_TEXT_PREFIX}{}", hex::encode(out))
}

/// The epoch a text sealed by [`seal_text`] names, if it is one.
pub fn sealed_text_epoch(sealed: &str) -> Option<Epoch> {
    let body = sealed.strip_prefix(SEALED_TEXT_PREFIX)?;
    let mut head = [0u8; 4];
    hex::decode_to_slice(body.get(..8)?, &mut head).ok()?;
    Some(Epoch(u32::from_be_bytes(head)))
}

/// Opens a text sealed by [`seal_text`] with the key of the epoch it names.
pub fn open_text(key: &ChatKey, chat: ChatId, message: &str, sealed: &str) -> Result<String, CryptoError> {
    let epoch = sealed_text_epoch(sealed).ok_or(CryptoError::Truncated)?;
    // Into a buffer of the right size at once (`hex::decode` grows its vector a byte at a time:
    // a new device opens every text it receives).
    let body = &sealed.as_bytes()[SEALED_TEXT_PREFIX.len()..];
    let mut bytes = vec![0u8; body.len() / 2];
    hex::decode_to_slice(body, &mut bytes).map_err(|_| CryptoError::Truncated)?;
    let plain = open_with_key(&key.text_key(), &text_ad(chat, message, epoch), &bytes[4..])?;
    String::from_utf8(plain).map_err(|_| CryptoError::Authentication)
}

impl std::fmt::Debug for ChatKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatKey(..)")
    }
}

/// A recovery key: 256 random bits the user keeps (printed once, never stored on a device). An
/// X25519 key pair derives from it: the account bundle the relay keeps is sealed to its public
/// half (so the devices can seal each rotated bundle to it without holding the key), and filed
/// under a hash the relay cannot invert, so a new device that has only this key can log back in.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryKey(pub [u8; 32]);

impl RecoveryKey {
    const PREFIX: &'static str = "stratus-recovery-";
    const CONTEXT: &'static [u8] = b"recovery-bundle-v1";

    /// A fresh random key.
    pub fn random<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut k = [0u8; 32];
        rng.fill_bytes(&mut k);
        Self(k)
    }

    /// The id the relay files the sealed bundle under.
    pub fn lookup_id(&self) -> [u8; 32] {
        blake3::derive_key("stratus recovery lookup id v1", &self.0)
    }

    fn secret(&self) -> StaticSecret {
        StaticSecret::from(blake3::derive_key("stratus recovery kem v1", &self.0))
    }

    /// The public half bundles are sealed to.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.secret()).to_bytes()
    }

    /// Seals `bundle` to the recovery key whose public half is `public` (a device needs only
    /// that to seal a rotated bundle). The result is what the relay stores.
    pub fn seal_to<R: RngCore + CryptoRng>(public: &[u8; 32], bundle: &[u8], rng: &mut R) -> Vec<u8> {
        let sealed = seal_box(public, &[], Self::CONTEXT, bundle, rng);
        postcard::to_allocvec(&sealed).expect("serializing a sealed box cannot fail")
    }

    /// Opens what [`RecoveryKey::seal_to`] sealed to this key.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let sealed: SealedBox = postcard::from_bytes(sealed).map_err(|_| CryptoError::Truncated)?;
        open_box(&self.secret(), &[], Self::CONTEXT, &sealed)
    }
}

impl std::fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveryKey(..)")
    }
}

impl std::fmt::Display for RecoveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", Self::PREFIX, hex::encode(self.0))
    }
}

impl std::str::FromStr for RecoveryKey {
    type Err = CryptoError;
    fn from_str(s: &str) -> Result<Self, CryptoError> {
        let hexpart = s.trim().strip_prefix(Self::PREFIX).ok_or(CryptoError::MalformedKey)?;
        let bytes = hex::decode(hexpart).map_err(|_| CryptoError::MalformedKey)?;
        Ok(RecoveryKey(bytes.try_into().map_err(|_| CryptoError::MalformedKey)?))
    }
}

/// What a sealed delta is bound to. Changing any field makes [`open_delta`] fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaAd<'a> {
    /// The chat the delta belongs to.
    pub chat: ChatId,
    /// The key epoch it was sealed in.
    pub epoch: Epoch,
    /// The sending device.
    pub device: &'a DeviceId,
    /// The sending device's account.
    pub account: AccountId,
    /// The sender's client seq.
    pub client_seq: ClientSeq,
}

impl DeltaAd<'_> {
    fn bytes(&self) -> Vec<u8> {
        let mut ad = Vec::with_capacity(64 + self.device.0.len());
        ad.extend_from_slice(b"stratus-delta-v2");
        ad.extend_from_slice(&self.chat.0);
        ad.extend_from_slice(&self.account.0);
        ad.extend_from_slice(&self.epoch.0.to_be_bytes());
        ad.extend_from_slice(&(self.device.0.len() as u32).to_be_bytes());
        ad.extend_from_slice(self.device.0.as_bytes());
        ad.extend_from_slice(&self.client_seq.0.to_be_bytes());
        ad
    }
}

/// Seals `plaintext` (Automerge change bytes) under the chat key: `nonce || ciphertext+tag`.
pub fn seal_delta<R: RngCore + CryptoRng>(key: &ChatKey, ad: &DeltaAd<'_>, plaintext: &[u8], rng: &mut R) -> Vec<u8> {
    seal_with_key(&key.0, &ad.bytes(), plaintext, rng)
}

/// Opens a delta sealed by [`seal_delta`].
pub fn open_delta(key: &ChatKey, ad: &DeltaAd<'_>, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    open_with_key(&key.0, &ad.bytes(), sealed)
}

fn seal_with_key<R: RngCore + CryptoRng>(key: &[u8; 32], ad: &[u8], pt: &[u8], rng: &mut R) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut nonce = [0u8; NONCE_BYTES];
    rng.fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: pt, aad: ad })
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    let mut out = Vec::with_capacity(NONCE_BYTES + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

fn open_with_key(key: &[u8; 32], ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_BYTES + TAG_BYTES {
        return Err(CryptoError::Truncated);
    }
    let (nonce, ct) = sealed.split_at(NONCE_BYTES);
    XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: ad })
        .map_err(|_| CryptoError::Authentication)
}

/// A box sealed to an X25519 public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedBox {
    /// The sender's ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// `nonce || ciphertext+tag`.
    pub sealed: Vec<u8>,
}

fn box_key(shared: &[u8; 32], extra: &[u8], eph: &[u8; 32], recipient: &[u8; 32], context: &[u8]) -> [u8; 32] {
    let mut ikm = Vec::with_capacity(32 + extra.len());
    ikm.extend_from_slice(shared);
    ikm.extend_from_slice(extra);
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph);
    salt[32..].copy_from_slice(recipient);
    let hk = Hkdf::<Sha256>::new(Some(&salt), &ikm);
    let mut info = b"stratus-sealed-box-v1/".to_vec();
    info.extend_from_slice(context);
    let mut okm = [0u8; 32];
    hk.expand(&info, &mut okm).expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// Seals `plaintext` to `recipient`. `extra_secret` (may be empty) must also be known to open
/// it: device linking passes the link code's one-time secret, so the relay, which sees the new
/// device's public key but never the code, cannot forge a bundle. `context` binds the purpose.
pub fn seal_box<R: RngCore + CryptoRng>(
    recipient: &[u8; 32],
    extra_secret: &[u8],
    context: &[u8],
    plaintext: &[u8],
    rng: &mut R,
) -> SealedBox {
    let eph = StaticSecret::random_from_rng(&mut *rng);
    let eph_pub = PublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&PublicKey::from(*recipient)).to_bytes();
    let key = box_key(&shared, extra_secret, &eph_pub, recipient, context);
    SealedBox { ephemeral: eph_pub, sealed: seal_with_key(&key, context, plaintext, rng) }
}

/// Opens a box sealed by [`seal_box`] with the recipient's secret key.
pub fn open_box(
    recipient: &StaticSecret,
    extra_secret: &[u8],
    context: &[u8],
    sealed: &SealedBox,
) -> Result<Vec<u8>, CryptoError> {
    let recipient_pub = PublicKey::from(recipient).to_bytes();
    let shared = recipient.diffie_hellman(&PublicKey::from(sealed.ephemeral)).to_bytes();
    let key = box_key(&shared, extra_secret, &sealed.ephemeral, &recipient_pub, context);
    open_with_key(&key, context, &sealed.sealed)
}

/// The context a chat key is wrapped under: binds chat, epoch and recipient account.
pub fn chat_key_context(chat: ChatId, epoch: Epoch, account: AccountId) -> Vec<u8> {
    let mut c = b"chat-key/".to_vec();
    c.extend_from_slice(&chat.0);
    c.extend_from_slice(&epoch.0.to_be_bytes());
    c.extend_from_slice(&account.0);
    c
}

/// Wraps a chat key to an account's KEM public key.
pub fn wrap_chat_key<R: RngCore + CryptoRng>(
    key: &ChatKey,
    chat: ChatId,
    epoch: Epoch,
    account: AccountId,
    account_kem: &[u8; 32],
    rng: &mut R,
) -> SealedBox {
    seal_box(account_kem, &[], &chat_key_context(chat, epoch, account), &key.0, rng)
}

/// Unwraps a chat key with the account's KEM secret.
pub fn unwrap_chat_key(
    sealed: &SealedBox,
    chat: ChatId,
    epoch: Epoch,
    account: AccountId,
    account_kem: &StaticSecret,
) -> Result<ChatKey, CryptoError> {
    let bytes = open_box(account_kem, &[], &chat_key_context(chat, epoch, account), sealed)?;
    let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::MalformedKey)?;
    Ok(ChatKey(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad(device: &DeviceId) -> DeltaAd<'_> {
        DeltaAd {
            chat: ChatId([1; 16]),
            epoch: Epoch(0),
            device,
            account: AccountId([2; 16]),
            client_seq: ClientSeq(5),
        }
    }

    #[test]
    fn delta_round_trips_and_rejects_tampering() {
        let mut rng = rand::thread_rng();
        let key = ChatKey::random(&mut rng);
        let dev = DeviceId("dev".into());
        let sealed = seal_delta(&key, &ad(&dev), b"hello", &mut rng);
        assert_eq!(open_delta(&key, &ad(&dev), &sealed).unwrap(), b"hello");

        let mut tampered = sealed.clone();
        tampered[30] ^= 1;
        assert_eq!(open_delta(&key, &ad(&dev), &tampered), Err(CryptoError::Authentication));
        let other = DeltaAd { client_seq: ClientSeq(6), ..ad(&dev) };
        assert_eq!(open_delta(&key, &other, &sealed), Err(CryptoError::Authentication));
        let other_account = DeltaAd { account: AccountId([3; 16]), ..ad(&dev) };
        assert_eq!(open_delta(&key, &other_account, &sealed), Err(CryptoError::Authentication));
        assert_eq!(open_delta(&key, &ad(&dev), &sealed[..10]), Err(CryptoError::Truncated));
    }

    #[test]
    fn box_needs_the_extra_secret() {
        let mut rng = rand::thread_rng();
        let sk = StaticSecret::random_from_rng(&mut rng);
        let pk = PublicKey::from(&sk).to_bytes();
        let b = seal_box(&pk, b"code", b"ctx", b"bundle", &mut rng);
        assert_eq!(open_box(&sk, b"code", b"ctx", &b).unwrap(), b"bundle");
        assert!(open_box(&sk, b"", b"ctx", &b).is_err());

        let key = RecoveryKey::random(&mut rng);
        let sealed = RecoveryKey::seal_to(&key.public(), b"bundle", &mut rng);
        assert_eq!(key.open(&sealed).unwrap(), b"bundle");
        assert!(RecoveryKey::random(&mut rng).open(&sealed).is_err());
        let parsed: RecoveryKey = key.to_string().parse().unwrap();
        assert_eq!(parsed, key);
        assert!("stratus-recovery-00".parse::<RecoveryKey>().is_err());
        assert_ne!(key.lookup_id(), key.0, "the relay's id is not the key");
        assert!(open_box(&sk, b"code", b"other", &b).is_err());
    }
}
