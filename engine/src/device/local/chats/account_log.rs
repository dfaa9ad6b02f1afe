//! Applying the account log: devices added, revoked and expired, chats added and their keys,
//! member changes, rotations of the account's keys and recovery keys. Every signature is
//! checked against the generation of the account's keys the log has reached.

use crate::device::error::Error;
use crate::device::local::Device;
use crate::device::store::OutboxItem;
use crate::proto::cert::{AccountGen, Rotation};
use crate::proto::ids::{ChatId, DeviceId};
use crate::proto::wire::{AccountEntry, AccountEvent};

/// What applying an account log entry changed that the sync core must hear of.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Applied {
    /// A chat that got a key: readable from now on (again, if deltas of the new epoch waited).
    pub chat: Option<ChatId>,
    /// The chat is new on this device.
    pub new_chat: bool,
    /// Outbox items sealed again under new keys (same client seqs).
    pub resealed: Vec<OutboxItem>,
    /// Key work became due from this device (`Some(true)`: a session expired, or a chat's
    /// members changed) or the account's keys were rotated (`Some(false)`).
    pub rotation_due: Option<bool>,
    /// This account is no longer a member of the chat.
    pub left: Option<ChatId>,
}

impl Device {
    /// The generation of the account's keys the account log has reached at its cursor.
    pub(crate) fn log_gen(&self) -> Result<AccountGen, Error> {
        match self.store.account_gen()? {
            Some(g) => Ok(g),
            None => Ok(self.login()?.account.genesis()),
        }
    }

    /// Applies an account log entry and moves the account cursor past it (also when the entry
    /// is refused: a bad entry must not stall the log). Every signature is checked against the
    /// generation of the account's keys that the log has reached at the entry.
    pub(crate) fn apply_account_entry(&mut self, entry: &AccountEntry) -> Result<Applied, Error> {
        let mut next_gen = None;
        let result = self.apply_account_event(&entry.event, &mut next_gen);
        self.store.advance_account_log(entry.seq, next_gen.as_ref())?;
        result
    }

    /// Applies one account log event; a rotation sets `next_gen`, which the caller stores with
    /// the cursor.
    fn apply_account_event(
        &mut self,
        event: &AccountEvent,
        next_gen: &mut Option<AccountGen>,
    ) -> Result<Applied, Error> {
        let gen = self.log_gen()?;
        match event {
            AccountEvent::DeviceAdded { cert } => {
                cert.verify(&gen)?;
                self.store.put_device(cert)?;
            }
            AccountEvent::DeviceRevoked { revocation } => {
                // Checked here too: the relay's word is not enough to drop a device.
                revocation.verify(&gen)?;
                self.session_ended(&revocation.body.device)?;
            }
            AccountEvent::DeviceExpired { device, .. } => {
                // The relay's decision (the account set the time-to-live); it can refuse any
                // device anyway, so there is nothing to check it against. Nobody rotated the
                // keys: the devices that stay do (`Rotate`), the first one the relay takes.
                self.session_ended(device)?;
                if device != self.identity.id() {
                    self.store.set_rotation_due(true)?;
                    return Ok(Applied { rotation_due: Some(true), ..Applied::default() });
                }
            }
            AccountEvent::ChatAdded { terms, key, signer, signer_chain } => {
                return self.apply_chat_key(terms, key, *signer, signer_chain.as_ref(), &gen);
            }
            AccountEvent::MembersChanged { change, by_chain } => {
                return self.apply_member_change(change, by_chain.as_ref(), &gen);
            }
            AccountEvent::Rotated { rotation } => return self.apply_rotation(rotation, &gen, next_gen),
            AccountEvent::RecoverySet { public, by, signature } => {
                gen.verify_recovery(public, by, signature)?;
                self.store.set_recovery_public(Some(&(*public, by.clone())))?;
            }
        }
        Ok(Applied::default())
    }

    /// Forgets a device whose session ended (and the recovery key it made: the relay withdrew it).
    fn session_ended(&mut self, device: &DeviceId) -> Result<(), Error> {
        if device != self.identity.id() {
            self.store.remove_device(device)?;
        }
        if self.store.recovery_public()?.is_some_and(|(_, by)| by == *device) {
            self.store.set_recovery_public(None)?;
        }
        Ok(())
    }

    /// Applies a rotation from the account log: checks it against the generation the log has
    /// reached, takes this device's new bundle (only if its keys are the signed ones and it
    /// keeps every past generation this device has), and makes the chat creations the relay
    /// refused as stale again under the new keys. (A creation the relay took before the rotation
    /// is not made again: the rotation gave that chat a new epoch, which reseals its deltas.) The log's generation moves on even when the bundle
    /// cannot be taken: the chain of signatures holds, and later entries are checked against it.
    fn apply_rotation(
        &mut self,
        rotation: &Rotation,
        gen: &AccountGen,
        next_gen: &mut Option<AccountGen>,
    ) -> Result<Applied, Error> {
        let next = gen.verify_rotation(rotation)?;
        let result = self.take_bundle(rotation, &next);
        *next_gen = Some(next.clone());
        self.store.set_rotation_due(false)?;
        // The chats with other members are due their next epoch from this account's devices
        // (the relay stores nothing more in them until one comes).
        let me = gen.account;
        let mut due = self.store.rekey_due()?;
        for (chat, meta, _) in self.store.chats()? {
            if !meta.left && meta.members.len() > 1 && meta.members.contains(&me) {
                due.entry(chat).or_default();
            }
        }
        self.store.set_rekey_due(&due)?;
        let rekey = !due.is_empty();
        result.map(|applied| Applied { rotation_due: Some(rekey), ..applied })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::store::Login;
    use crate::proto::cert::AccountKeys;
    use crate::proto::cert::DeviceCertBody;
    use crate::proto::crypto::wrap_chat_key;
    use crate::proto::crypto::ChatKey;
    use crate::proto::ids::{Epoch, Seq};
    use crate::proto::wire::AccountEntry;
    use crate::proto::wire::{ChatKind, WrappedKey};

    #[test]
    fn a_chat_key_the_account_did_not_sign_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Device::open(dir.path()).unwrap();
        let mut rng = rand::thread_rng();
        let keys = AccountKeys::generate(&mut rng);
        let account = keys.public();
        let cert = keys.certify(DeviceCertBody {
            account: account.id,
            device: d.id().clone(),
            device_x25519: d.identity.x25519_public(),
            name: "d".into(),
            created_ms: 0,
        });
        d.identity.log_in(Login { account: account.clone(), keys: keys.clone(), cert, relay: "x".into() });

        // The relay knows the account's KEM public key: it can wrap a key of its own.
        let chat = ChatId([1; 16]);
        let relay_key = ChatKey::random(&mut rng);
        let terms = crate::proto::directory::KeyTerms {
            chat,
            kind: ChatKind::Notes,
            epoch: Epoch(0),
            members: [account.id].into(),
        };
        let wrapped = wrap_chat_key(&relay_key, chat, Epoch(0), account.id, &account.kem_key, &mut rng);
        let entry = |seq, signer, signature| AccountEntry {
            seq: Seq(seq),
            event: AccountEvent::ChatAdded {
                terms: terms.clone(),
                key: WrappedKey { account: account.id, generation: 0, content: true, key: wrapped.clone(), signature },
                signer,
                signer_chain: None,
            },
        };
        let stranger = AccountKeys::generate(&mut rng);
        let forged = stranger.sign_chat_key(&terms, account.id, 0, true, &wrapped);
        assert!(d.apply_account_entry(&entry(1, account.id, forged.clone())).is_err());
        assert!(d.apply_account_entry(&entry(2, stranger.public().id, forged)).is_err());
        assert!(d.apply_account_entry(&entry(3, account.id, vec![0; 64])).is_err());
        assert!(d.store.chat(chat).unwrap().is_none(), "no key was taken");

        let signed = keys.sign_chat_key(&terms, account.id, 0, true, &wrapped);
        assert_eq!(d.apply_account_entry(&entry(4, account.id, signed)).unwrap().chat, Some(chat));
        assert!(d.store.chat(chat).unwrap().is_some());
    }
}
