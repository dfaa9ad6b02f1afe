//! Accounts, the account key bundle, and device certificates.
//!
//! Every device of an account holds the same [`AccountKeys`] bundle. The account signing key
//! signs [`DeviceCert`]s; clients verify the device list themselves, and the relay checks the
//! same signatures as defence in depth.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};

use super::crypto::SealedBox;
use super::ids::{AccountId, ChatId, DeviceId, Epoch};
use super::wire::ChatKind;

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

    /// Verifies a signature made by [`AccountKeys::sign_chat_key`] of this account.
    pub fn verify_chat_key(
        &self,
        chat: ChatId,
        kind: ChatKind,
        epoch: Epoch,
        recipient: AccountId,
        key: &SealedBox,
        signature: &[u8],
    ) -> Result<(), CertError> {
        self.verify_signature(&chat_key_signed_bytes(chat, kind, epoch, recipient, key), signature)
    }

    /// Verifies an Ed25519 signature of this account's signing key over `message`.
    fn verify_signature(&self, message: &[u8], signature: &[u8]) -> Result<(), CertError> {
        let key = VerifyingKey::from_bytes(&self.signing_key).map_err(|_| CertError::Malformed("signing key"))?;
        let sig: [u8; 64] = signature.try_into().map_err(|_| CertError::Malformed("signature length"))?;
        key.verify(message, &Signature::from_bytes(&sig)).map_err(|_| CertError::BadSignature)
    }
}

fn chat_key_signed_bytes(chat: ChatId, kind: ChatKind, epoch: Epoch, recipient: AccountId, key: &SealedBox) -> Vec<u8> {
    let mut b = b"stratus-chat-key-v1".to_vec();
    b.extend(postcard::to_allocvec(&(chat, kind, epoch, recipient, key)).expect("serializing cannot fail"));
    b
}

/// The id an account with this signing key has.
pub fn account_id_for(signing_key: &[u8; 32]) -> AccountId {
    let h = blake3::hash(signing_key);
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.as_bytes()[..16]);
    AccountId(id)
}

/// The secret account bundle every device of the account holds. Never sent except sealed.
#[derive(Clone, Serialize, Deserialize)]
pub struct AccountKeys {
    /// Ed25519 secret: signs device certificates (and later revocations).
    pub signing: [u8; 32],
    /// X25519 secret: unwraps chat keys.
    pub kem: [u8; 32],
    /// Symmetric root key for account-private data and recovery.
    pub root: [u8; 32],
}

impl std::fmt::Debug for AccountKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccountKeys(..)")
    }
}

impl AccountKeys {
    /// Fresh keys for a new account.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut k = Self { signing: [0; 32], kem: [0; 32], root: [0; 32] };
        rng.fill_bytes(&mut k.signing);
        rng.fill_bytes(&mut k.kem);
        rng.fill_bytes(&mut k.root);
        k
    }

    /// The public half.
    pub fn public(&self) -> AccountPublic {
        let signing_key = SigningKey::from_bytes(&self.signing).verifying_key().to_bytes();
        AccountPublic {
            id: account_id_for(&signing_key),
            signing_key,
            kem_key: PublicKey::from(&self.kem_secret()).to_bytes(),
        }
    }

    /// The KEM secret as an X25519 key.
    pub fn kem_secret(&self) -> StaticSecret {
        StaticSecret::from(self.kem)
    }

    /// Signs a chat key wrapped to `recipient`, so that the recipient's devices accept only keys
    /// that an account they trust handed out: the relay, which knows every KEM public key, could
    /// otherwise wrap a key of its own and read or forge everything sealed under it.
    pub fn sign_chat_key(
        &self,
        chat: ChatId,
        kind: ChatKind,
        epoch: Epoch,
        recipient: AccountId,
        key: &SealedBox,
    ) -> Vec<u8> {
        SigningKey::from_bytes(&self.signing)
            .sign(&chat_key_signed_bytes(chat, kind, epoch, recipient, key))
            .to_bytes()
            .to_vec()
    }

    /// Signs a certificate body.
    pub fn certify(&self, body: DeviceCertBody) -> DeviceCert {
        let sig = SigningKey::from_bytes(&self.signing).sign(&body.signed_bytes());
        DeviceCert { body, signature: sig.to_bytes().to_vec() }
    }
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
    /// Verifies the certificate against the account's public keys.
    pub fn verify(&self, account: &AccountPublic) -> Result<(), CertError> {
        if self.body.account != account.id {
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
    /// Verifies the revocation against the account's public keys.
    pub fn verify(&self, account: &AccountPublic) -> Result<(), CertError> {
        if self.body.account != account.id {
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
        cert.verify(&public).unwrap();

        let mut forged = cert.clone();
        forged.body.name = "laptop".into();
        assert_eq!(forged.verify(&public), Err(CertError::BadSignature));

        let other = AccountKeys::generate(&mut rng).public();
        assert_eq!(cert.verify(&other), Err(CertError::WrongAccount));
    }

    #[test]
    fn revocations_verify_only_under_their_account_and_as_signed() {
        let mut rng = rand::thread_rng();
        let keys = AccountKeys::generate(&mut rng);
        let public = keys.public();
        let body =
            RevocationBody { account: public.id, device: DeviceId("old".into()), by: DeviceId("me".into()), at_ms: 5 };
        let r = keys.revoke(body);
        r.verify(&public).unwrap();
        let mut forged = r.clone();
        forged.body.device = DeviceId("me".into());
        assert_eq!(forged.verify(&public), Err(CertError::BadSignature));
        let stranger = AccountKeys::generate(&mut rng);
        let mut by_stranger = stranger.revoke(r.body.clone());
        assert_eq!(by_stranger.verify(&public), Err(CertError::BadSignature));
        by_stranger.body.account = stranger.public().id;
        assert_eq!(by_stranger.verify(&public), Err(CertError::WrongAccount));
        // A certificate signature is not a revocation signature (domain separation).
        let cert = keys.certify(DeviceCertBody {
            account: public.id,
            device: DeviceId("old".into()),
            device_x25519: [0; 32],
            name: String::new(),
            created_ms: 0,
        });
        let mixed = Revocation { body: r.body.clone(), signature: cert.signature };
        assert_eq!(mixed.verify(&public), Err(CertError::BadSignature));
    }
}
