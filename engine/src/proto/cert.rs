//! Accounts, the account key bundle, and device certificates.
//!
//! Every device of an account holds the same [`AccountKeys`] bundle. The account signing key
//! signs [`DeviceCert`]s; clients verify the device list themselves, and the relay checks the
//! same signatures as defence in depth.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};

use super::crypto::{wrap_chat_key, ChatKey, SealedBox};
use super::directory::{KeyTerms, MemberChange, MemberChangeBody};
use super::ids::{AccountId, DeviceId};
use super::wire::WrappedKey;

/// Longest device name accepted, in bytes.
pub const MAX_DEVICE_NAME_BYTES: usize = 64;

/// Why a certificate or bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The signature does not verify under the account's signing key.
    #[error("certificate signature does not verify")]
    BadSignature,
    /// The certificate names another account, or the account id does not match its key.
    #[error("certificate does not belong to this account")]
    WrongAccount,
    /// A field is out of bounds (name too long, malformed key).
    #[error("certificate is malformed: {0}")]
    Malformed(&'static str),
}

/// What everybody may know of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountPublic {
    /// `blake3(signing key)[..16]`.
    pub id: AccountId,
    /// Ed25519: verifies device certificates.
    pub signing_key: [u8; 32],
    /// X25519: chat keys are wrapped to it.
    pub kem_key: [u8; 32],
}

impl AccountPublic {
    /// Checks that the id commits to the signing key and the key is a valid Ed25519 point.
    pub fn validate(&self) -> Result<(), CertError> {
        if account_id_for(&self.signing_key) != self.id {
            return Err(CertError::WrongAccount);
        }
        VerifyingKey::from_bytes(&self.signing_key).map_err(|_| CertError::Malformed("signing key"))?;
        Ok(())
    }

    /// The account's first generation of keys (the one its id commits to).
    pub fn genesis(&self) -> AccountGen {
        AccountGen { account: self.id, generation: 0, signing_key: self.signing_key, kem_key: self.kem_key }
    }
}

/// The public keys of one generation of an account's keys. Generation 0 is the account's
/// [`AccountPublic`]; each [`Rotation`], signed by the generation before it, starts the next.
/// Everything the account signs is checked against the generation in force when it was made:
/// in the account log, the generation reached by the rotations before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountGen {
    /// The account.
    pub account: AccountId,
    /// 0 for the account's first keys, one more at each rotation.
    pub generation: u32,
    /// Ed25519: verifies what the account signs in this generation.
    pub signing_key: [u8; 32],
    /// X25519: chat keys of this generation are wrapped to it.
    pub kem_key: [u8; 32],
}

impl AccountGen {
    /// Verifies a signature made by [`AccountKeys::sign_chat_key`] in this generation over a key
    /// handed out on `terms` to `recipient`, wrapped to generation `generation` of its keys.
    pub fn verify_chat_key(&self, terms: &KeyTerms, key: &WrappedKey) -> Result<(), CertError> {
        if !terms.members.contains(&key.account) {
            return Err(CertError::Malformed("a chat key for an account that is not a member"));
        }
        self.verify_signature(
            &chat_key_signed_bytes(terms, key.account, key.generation, key.content, &key.key),
            &key.signature,
        )
    }

    /// Checks that `rotation` starts the generation after this one, signed with this one's key,
    /// and returns the generation it starts.
    pub fn verify_rotation(&self, rotation: &Rotation) -> Result<AccountGen, CertError> {
        let b = &rotation.body;
        if b.account != self.account {
            return Err(CertError::WrongAccount);
        }
        if Some(b.generation) != self.generation.checked_add(1) || b.generation > MAX_GENERATION {
            return Err(CertError::Malformed("rotation generation"));
        }
        VerifyingKey::from_bytes(&b.signing_key).map_err(|_| CertError::Malformed("signing key"))?;
        if rotation.bundles.len() > MAX_ROTATION_DEVICES
            || rotation.bundles.iter().any(|(d, b)| d.0.len() > DeviceId::MAX_LEN || b.sealed.len() > MAX_BUNDLE_BYTES)
        {
            return Err(CertError::Malformed("rotation bundles"));
        }
        self.verify_signature(&b.signed_bytes(), &rotation.signature)?;
        Ok(AccountGen { account: b.account, generation: b.generation, signing_key: b.signing_key, kem_key: b.kem_key })
    }

    /// Verifies a member change made by [`AccountKeys::sign_member_change`] in this generation.
    pub fn verify_member_change(&self, change: &MemberChange) -> Result<(), CertError> {
        if change.body.by != self.account {
            return Err(CertError::WrongAccount);
        }
        self.verify_signature(&change.body.signed_bytes(), &change.signature)
    }

    /// Verifies a checkpoint of the account log made by [`AccountKeys::sign_checkpoint`] in
    /// this generation.
    pub fn verify_checkpoint(&self, c: &crate::proto::account_chain::Checkpoint) -> Result<(), CertError> {
        let bytes = crate::proto::account_chain::Checkpoint::signed_bytes(self.account, c.seq, &c.hash, &c.by);
        self.verify_signature(&bytes, &c.signature)
    }

    /// Verifies the signature over a recovery key's public half (see
    /// [`AccountKeys::sign_recovery`]).
    pub fn verify_recovery(&self, public: &[u8; 32], by: &DeviceId, signature: &[u8]) -> Result<(), CertError> {
        self.verify_signature(&recovery_signed_bytes(self.account, public, by), signature)
    }

    /// Verifies an Ed25519 signature of this generation's signing key over `message`.
    fn verify_signature(&self, message: &[u8], signature: &[u8]) -> Result<(), CertError> {
        let key = VerifyingKey::from_bytes(&self.signing_key).map_err(|_| CertError::Malformed("signing key"))?;
        let sig: [u8; 64] = signature.try_into().map_err(|_| CertError::Malformed("signature length"))?;
        key.verify(message, &Signature::from_bytes(&sig)).map_err(|_| CertError::BadSignature)
    }
}

fn recovery_signed_bytes(account: AccountId, public: &[u8; 32], by: &DeviceId) -> Vec<u8> {
    let mut b = b"stratus-recovery-key-v1".to_vec();
    b.extend(postcard::to_allocvec(&(account, public, by)).expect("serializing cannot fail"));
    b
}

fn chat_key_signed_bytes(
    terms: &KeyTerms,
    recipient: AccountId,
    generation: u32,
    content: bool,
    key: &SealedBox,
) -> Vec<u8> {
    let mut b = b"stratus-chat-key-v2".to_vec();
    b.extend(postcard::to_allocvec(&(terms, recipient, generation, content, key)).expect("serializing cannot fail"));
    b
}

/// The id an account with this signing key has.
pub fn account_id_for(signing_key: &[u8; 32]) -> AccountId {
    let h = blake3::hash(signing_key);
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.as_bytes()[..16]);
    AccountId(id)
}

/// Most rotations an account can make: every generation adds 64 bytes to the bundle, which
/// must fit a frame once per device in a rotation.
pub const MAX_GENERATION: u32 = 256;
/// Most devices a rotation hands the new bundle to (the relay caps an account's live sessions
/// at it): with 2,048 chats and the last generation's bundles, a rotation fits one frame.
pub const MAX_ROTATION_DEVICES: usize = 32;
/// Longest sealed account bundle accepted.
pub const MAX_BUNDLE_BYTES: usize = 20 * 1024;

/// The secret account bundle every device of the account holds. Never sent except sealed.
#[derive(Clone, Serialize, Deserialize)]
pub struct AccountKeys {
    /// Ed25519 secret of the current generation: signs certificates, chat keys, revocations.
    pub signing: [u8; 32],
    /// X25519 secret of the current generation: unwraps chat keys wrapped in it.
    pub kem: [u8; 32],
    /// Symmetric root key for account-private data.
    pub root: [u8; 32],
    /// The current generation (0 until the first rotation).
    pub generation: u32,
    /// The generations before, oldest first: their public signing keys (to check what they
    /// signed) and their KEM secrets (to unwrap the chat keys of their time, for history).
    pub previous: Vec<PastKeys>,
}

/// What the bundle keeps of a past generation.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PastKeys {
    /// Its Ed25519 public key.
    pub signing_key: [u8; 32],
    /// Its X25519 secret.
    pub kem: [u8; 32],
}

impl std::fmt::Debug for AccountKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccountKeys(..)")
    }
}

impl AccountKeys {
    /// Fresh keys for a new account.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut k = Self { signing: [0; 32], kem: [0; 32], root: [0; 32], generation: 0, previous: Vec::new() };
        rng.fill_bytes(&mut k.signing);
        rng.fill_bytes(&mut k.kem);
        rng.fill_bytes(&mut k.root);
        k
    }

    /// The next generation: fresh keys, with this one's kept as the newest past generation.
    /// `None` past [`MAX_GENERATION`].
    pub fn rotated<R: RngCore + CryptoRng>(&self, rng: &mut R) -> Option<AccountKeys> {
        let generation = self.generation.checked_add(1).filter(|g| *g <= MAX_GENERATION)?;
        let mut next = AccountKeys::generate(rng);
        next.generation = generation;
        next.previous = self.previous.clone();
        next.previous.push(PastKeys { signing_key: signing_public(&self.signing), kem: self.kem });
        Some(next)
    }

    /// The account's public identity: its generation-0 keys.
    pub fn public(&self) -> AccountPublic {
        let (signing_key, kem) = match self.previous.first() {
            Some(p) => (p.signing_key, p.kem),
            None => (signing_public(&self.signing), self.kem),
        };
        AccountPublic {
            id: account_id_for(&signing_key),
            signing_key,
            kem_key: PublicKey::from(&StaticSecret::from(kem)).to_bytes(),
        }
    }

    /// The current generation's public keys.
    pub fn current(&self) -> AccountGen {
        AccountGen {
            account: self.public().id,
            generation: self.generation,
            signing_key: signing_public(&self.signing),
            kem_key: PublicKey::from(&self.kem_secret()).to_bytes(),
        }
    }

    /// The public keys of generation `generation`, if this bundle reaches it.
    pub fn generation(&self, generation: u32) -> Option<AccountGen> {
        if generation == self.generation {
            return Some(self.current());
        }
        let p = self.previous.get(generation as usize)?;
        Some(AccountGen {
            account: self.public().id,
            generation,
            signing_key: p.signing_key,
            kem_key: PublicKey::from(&StaticSecret::from(p.kem)).to_bytes(),
        })
    }

    /// True when the bundle is well formed: one past generation per generation before the
    /// current one.
    pub fn is_consistent(&self) -> bool {
        self.generation <= MAX_GENERATION && self.previous.len() == self.generation as usize
    }

    /// The current KEM secret as an X25519 key.
    pub fn kem_secret(&self) -> StaticSecret {
        StaticSecret::from(self.kem)
    }

    /// The KEM secret of generation `generation`, if this bundle reaches it.
    pub fn kem_secret_of(&self, generation: u32) -> Option<StaticSecret> {
        if generation == self.generation {
            return Some(self.kem_secret());
        }
        self.previous.get(generation as usize).map(|p| StaticSecret::from(p.kem))
    }

    /// Signs the start of `next` (the bundle [`AccountKeys::rotated`] made) with this
    /// generation's key; the caller adds the sealed bundles.
    pub fn sign_rotation(&self, next: &AccountKeys) -> Rotation {
        let n = next.current();
        let body = RotationBody {
            account: n.account,
            generation: n.generation,
            signing_key: n.signing_key,
            kem_key: n.kem_key,
        };
        let signature = SigningKey::from_bytes(&self.signing).sign(&body.signed_bytes()).to_bytes().to_vec();
        Rotation { body, signature, bundles: Vec::new() }
    }

    /// Signs device `by`'s checkpoint of the account log: its hash `hash` up to `seq`.
    pub fn sign_checkpoint(
        &self,
        seq: crate::proto::ids::Seq,
        hash: crate::proto::account_chain::ChainHash,
        by: DeviceId,
    ) -> crate::proto::account_chain::Checkpoint {
        let bytes = crate::proto::account_chain::Checkpoint::signed_bytes(self.public().id, seq, &hash, &by);
        let signature = SigningKey::from_bytes(&self.signing).sign(&bytes).to_bytes().to_vec();
        crate::proto::account_chain::Checkpoint { seq, hash, by, signature }
    }

    /// Signs a recovery key's public half, so that devices seal the bundle to it at a rotation
    /// only if the account put it there.
    pub fn sign_recovery(&self, public: &[u8; 32], by: &DeviceId) -> Vec<u8> {
        SigningKey::from_bytes(&self.signing)
            .sign(&recovery_signed_bytes(self.public().id, public, by))
            .to_bytes()
            .to_vec()
    }

    /// Signs a chat key wrapped to generation `generation` of `recipient`'s keys, handed out on
    /// `terms`, so that the recipient's devices accept only keys that a member they trust handed
    /// out: the relay, which knows every KEM public key, could otherwise wrap a key of its own
    /// and read or forge everything sealed under it.
    pub fn sign_chat_key(
        &self,
        terms: &KeyTerms,
        recipient: AccountId,
        generation: u32,
        content: bool,
        key: &SealedBox,
    ) -> Vec<u8> {
        SigningKey::from_bytes(&self.signing)
            .sign(&chat_key_signed_bytes(terms, recipient, generation, content, key))
            .to_bytes()
            .to_vec()
    }

    /// Signs a change of a chat's members.
    pub fn sign_member_change(&self, body: MemberChangeBody) -> MemberChange {
        let signature = SigningKey::from_bytes(&self.signing).sign(&body.signed_bytes()).to_bytes().to_vec();
        MemberChange { body, signature }
    }

    /// Wraps `key` (or with `content` false only its transport key, see [`ChatKey::transport`])
    /// to the current generation of `recipient`'s keys and signs it on `terms`.
    pub fn grant_chat_key<R: RngCore + CryptoRng>(
        &self,
        key: &ChatKey,
        terms: &KeyTerms,
        recipient: &AccountGen,
        content: bool,
        rng: &mut R,
    ) -> WrappedKey {
        let given = if content { key.clone() } else { key.transport() };
        let wrapped = wrap_chat_key(&given, terms.chat, terms.epoch, recipient.account, &recipient.kem_key, rng);
        WrappedKey {
            account: recipient.account,
            generation: recipient.generation,
            content,
            signature: self.sign_chat_key(terms, recipient.account, recipient.generation, content, &wrapped),
            key: wrapped,
        }
    }

    /// Signs a certificate body.
    pub fn certify(&self, body: DeviceCertBody) -> DeviceCert {
        let sig = SigningKey::from_bytes(&self.signing).sign(&body.signed_bytes());
        DeviceCert { body, signature: sig.to_bytes().to_vec() }
    }
}

fn signing_public(secret: &[u8; 32]) -> [u8; 32] {
    SigningKey::from_bytes(secret).verifying_key().to_bytes()
}

/// The signed part of a rotation: the account's next generation of public keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationBody {
    /// The account.
    pub account: AccountId,
    /// The generation it starts.
    pub generation: u32,
    /// Its Ed25519 public key.
    pub signing_key: [u8; 32],
    /// Its X25519 public key.
    pub kem_key: [u8; 32],
}

impl RotationBody {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut b = b"stratus-rotation-v1".to_vec();
        b.extend(postcard::to_allocvec(self).expect("serializing a rotation body cannot fail"));
        b
    }
}

/// A rotation of the account's keys: the next generation's public keys signed by the current
/// generation, and the new bundle sealed to each device that stays (with
/// [`rotation_bundle_context`]). A device takes the bundle only if its keys are the signed ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// What is signed.
    pub body: RotationBody,
    /// Ed25519 signature of the previous generation over the body.
    pub signature: Vec<u8>,
    /// The new bundle sealed to each remaining device's X25519 key.
    pub bundles: Vec<(DeviceId, SealedBox)>,
}

/// The context a rotated bundle is sealed under: binds account, generation and device.
pub fn rotation_bundle_context(account: AccountId, generation: u32, device: &DeviceId) -> Vec<u8> {
    let mut c = b"rotation-bundle/".to_vec();
    c.extend_from_slice(&account.0);
    c.extend_from_slice(&generation.to_be_bytes());
    c.extend_from_slice(device.0.as_bytes());
    c
}

/// The signed part of a device certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCertBody {
    /// The account the device belongs to.
    pub account: AccountId,
    /// The device (its libp2p PeerId).
    pub device: DeviceId,
    /// The device's X25519 static key (sealed boxes, Noise for secret chats).
    pub device_x25519: [u8; 32],
    /// A name the user gave the device.
    pub name: String,
    /// When the certificate was made, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl DeviceCertBody {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut b = b"stratus-device-cert-v1".to_vec();
        b.extend(postcard::to_allocvec(self).expect("serializing a certificate body cannot fail"));
        b
    }
}

/// A device certificate: the body signed with the account signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCert {
    /// What is certified.
    pub body: DeviceCertBody,
    /// Ed25519 signature (64 bytes) over the body.
    pub signature: Vec<u8>,
}

impl DeviceCert {
    /// Verifies the certificate against a generation of the account's keys.
    pub fn verify(&self, account: &AccountGen) -> Result<(), CertError> {
        if self.body.account != account.account {
            return Err(CertError::WrongAccount);
        }
        if self.body.name.len() > MAX_DEVICE_NAME_BYTES {
            return Err(CertError::Malformed("device name too long"));
        }
        if self.body.device.0.len() > DeviceId::MAX_LEN {
            return Err(CertError::Malformed("device id too long"));
        }
        account.verify_signature(&self.body.signed_bytes(), &self.signature)
    }
}

/// The signed part of a revocation: the account ends one of its device sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationBody {
    /// The account.
    pub account: AccountId,
    /// The device whose session ends.
    pub device: DeviceId,
    /// The device that ended it.
    pub by: DeviceId,
    /// When, milliseconds since the Unix epoch, by the revoking device's clock.
    pub at_ms: u64,
}

impl RevocationBody {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut b = b"stratus-revocation-v1".to_vec();
        b.extend(postcard::to_allocvec(self).expect("serializing a revocation body cannot fail"));
        b
    }
}

/// A revocation signed with the account signing key. The relay checks it before it acts on it,
/// and every other device of the account checks it again before it drops the device from its
/// own list: neither takes the other's word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// What is revoked.
    pub body: RevocationBody,
    /// Ed25519 signature (64 bytes) over the body.
    pub signature: Vec<u8>,
}

impl Revocation {
    /// Verifies the revocation against a generation of the account's keys.
    pub fn verify(&self, account: &AccountGen) -> Result<(), CertError> {
        if self.body.account != account.account {
            return Err(CertError::WrongAccount);
        }
        if self.body.device.0.len() > DeviceId::MAX_LEN || self.body.by.0.len() > DeviceId::MAX_LEN {
            return Err(CertError::Malformed("device id too long"));
        }
        account.verify_signature(&self.body.signed_bytes(), &self.signature)
    }
}

impl AccountKeys {
    /// Signs a revocation.
    pub fn revoke(&self, body: RevocationBody) -> Revocation {
        let sig = SigningKey::from_bytes(&self.signing).sign(&body.signed_bytes());
        Revocation { body, signature: sig.to_bytes().to_vec() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_verify_only_under_their_account() {
        let mut rng = rand::thread_rng();
        let keys = AccountKeys::generate(&mut rng);
        let public = keys.public();
        public.validate().unwrap();
        let cert = keys.certify(DeviceCertBody {
            account: public.id,
            device: DeviceId("d".into()),
            device_x25519: [3; 32],
            name: "phone".into(),
            created_ms: 1,
        });
        cert.verify(&public.genesis()).unwrap();

        let mut forged = cert.clone();
        forged.body.name = "laptop".into();
        assert_eq!(forged.verify(&public.genesis()), Err(CertError::BadSignature));

        let other = AccountKeys::generate(&mut rng).public();
        assert_eq!(cert.verify(&other.genesis()), Err(CertError::WrongAccount));
    }

    #[test]
    fn revocations_verify_only_under_their_account_and_as_signed() {
        let mut rng = rand::thread_rng();
        let keys = AccountKeys::generate(&mut rng);
        let public = keys.public();
        let body =
            RevocationBody { account: public.id, device: DeviceId("old".into()), by: DeviceId("me".into()), at_ms: 5 };
        let r = keys.revoke(body);
        r.verify(&public.genesis()).unwrap();
        let mut forged = r.clone();
        forged.body.device = DeviceId("me".into());
        assert_eq!(forged.verify(&public.genesis()), Err(CertError::BadSignature));
        let stranger = AccountKeys::generate(&mut rng);
        let mut by_stranger = stranger.revoke(r.body.clone());
        assert_eq!(by_stranger.verify(&public.genesis()), Err(CertError::BadSignature));
        by_stranger.body.account = stranger.public().id;
        assert_eq!(by_stranger.verify(&public.genesis()), Err(CertError::WrongAccount));
        // A certificate signature is not a revocation signature (domain separation).
        let cert = keys.certify(DeviceCertBody {
            account: public.id,
            device: DeviceId("old".into()),
            device_x25519: [0; 32],
            name: String::new(),
            created_ms: 0,
        });
        let mixed = Revocation { body: r.body.clone(), signature: cert.signature };
        assert_eq!(mixed.verify(&public.genesis()), Err(CertError::BadSignature));
    }

    #[test]
    fn rotations_chain_from_the_previous_generation_and_keep_the_past() {
        let mut rng = rand::thread_rng();
        let g0 = AccountKeys::generate(&mut rng);
        let g1 = g0.rotated(&mut rng).unwrap();
        let g2 = g1.rotated(&mut rng).unwrap();
        assert!(g2.is_consistent());
        assert_eq!(g2.public(), g0.public(), "the account's identity stays");
        assert_eq!(g2.generation(0), Some(g0.current()));
        assert_eq!(g2.generation(1), Some(g1.current()));
        assert_eq!(g2.generation(3), None);
        assert_eq!(g2.kem_secret_of(1).unwrap().to_bytes(), g1.kem);

        let r1 = g0.sign_rotation(&g1);
        assert_eq!(g0.current().verify_rotation(&r1).unwrap(), g1.current());
        // Only the generation before may start the next one, and only the next one.
        let r2 = g1.sign_rotation(&g2);
        assert!(g0.current().verify_rotation(&r2).is_err());
        assert_eq!(g1.current().verify_rotation(&r2).unwrap(), g2.current());
        let forged = g2.sign_rotation(&g2.rotated(&mut rng).unwrap());
        assert!(g1.current().verify_rotation(&forged).is_err());
        let mut tampered = r1.clone();
        tampered.body.kem_key = [9; 32];
        assert_eq!(g0.current().verify_rotation(&tampered), Err(CertError::BadSignature));

        // What an old generation signs does not verify under a new one.
        let body = DeviceCertBody {
            account: g0.public().id,
            device: DeviceId("d".into()),
            device_x25519: [0; 32],
            name: String::new(),
            created_ms: 0,
        };
        assert_eq!(g0.certify(body.clone()).verify(&g1.current()), Err(CertError::BadSignature));
        g1.certify(body).verify(&g2.generation(1).unwrap()).unwrap();
    }
}
