//! Applying the account log: devices added, revoked and expired, chats added and their keys,
//! member changes, rotations of the account's keys and recovery keys. Every signature is
//! checked against the generation of the account's keys the log has reached.

use crate::device::error::Error;
use crate::device::local::Device;
use crate::device::store::OutboxItem;
use crate::proto::account_chain::{self, ChainHash, Checkpoint};
use crate::proto::cert::{AccountGen, Rotation};
use crate::proto::ids::Seq;
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
    /// The entry extends this device's hash chain of the log (`proto/account_chain.rs`), refused
    /// or not: the chain is of what the relay showed.
    pub(crate) fn apply_account_entry(&mut self, entry: &AccountEntry) -> Result<Applied, Error> {
        let chain = self.account_chain_at(Seq(entry.seq.0.saturating_sub(1)))?.map(|h| h.then(entry));
        let mut next_gen = None;
        let result = self.apply_account_event(&entry.event, &mut next_gen);
        self.store.advance_account_log(entry.seq, next_gen.as_ref(), chain.as_ref())?;
        result
    }

    /// This device's hash of the account log up to `seq`: `None` when it has not applied that
    /// far, or its chain does not start at the log's start (a store migrated mid-log).
    pub(crate) fn account_chain_at(&self, seq: Seq) -> Result<Option<ChainHash>, Error> {
        if !self.store.account_chain_known()? || seq > self.store.account_cursor()? {
            return Ok(None);
        }
        if seq == Seq(0) {
            return Ok(Some(ChainHash::genesis(self.login()?.account.id)));
        }
        Ok(self.store.account_chain_at(seq)?)
    }

    /// Where this device's account log stands: its cursor and its hash there (when known), to
    /// compare with what another device of the account, or the relay, holds.
    pub fn account_log_head(&self) -> Result<(Seq, Option<ChainHash>), Error> {
        let cursor = self.store.account_cursor()?;
        Ok((cursor, self.account_chain_at(cursor)?))
    }

    /// Checks another party's hash of the account log up to `seq` against this device's: a
    /// difference means the relay showed two versions of the log, and is refused with
    /// [`Error::AccountLogForked`] (and remembered, [`Device::account_log_forked`]). A position
    /// this device has not reached, or has no hash for, is not compared.
    pub fn check_account_log(&mut self, seq: Seq, theirs: ChainHash) -> Result<(), Error> {
        if let Err(f) = account_chain::compare(seq, self.account_chain_at(seq)?, theirs) {
            self.store.set_account_forked(f.seq)?;
            return Err(Error::AccountLogForked(f));
        }
        Ok(())
    }

    /// This device's checkpoint of the account log at its cursor, signed with the account's
    /// keys, to send to the relay (`ClientFrame::Checkpoint`); `None` while its chain is
    /// unknown or the log is empty.
    pub fn account_checkpoint(&self) -> Result<Option<Checkpoint>, Error> {
        match self.account_log_head()? {
            (seq, Some(hash)) if seq > Seq(0) => {
                Ok(Some(self.login()?.keys.sign_checkpoint(seq, hash, self.identity.id().clone())))
            }
            _ => Ok(None),
        }
    }

    /// The position of the first fork of the account log this device found, if any.
    pub fn account_log_forked(&self) -> Result<Option<Seq>, Error> {
        Ok(self.store.account_forked()?)
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
            AccountEvent::Checkpoint { checkpoint } => {
                // Signed by the account (the relay could make up any hash), then compared: the
                // position is before this entry, so this device has its own hash there.
                gen.verify_checkpoint(checkpoint)?;
                self.check_account_log(checkpoint.seq, checkpoint.hash)?;
            }
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
    use crate::proto::ids::{DeviceId, Epoch};
    use crate::proto::wire::AccountEntry;
    use crate::proto::wire::{ChatKind, WrappedKey};

    #[test]
    fn a_chat_key_the_account_did_not_sign_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::thread_rng();
        let keys = AccountKeys::generate(&mut rng);
        let account = keys.public();
        let mut d = member(dir.path(), &keys);

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

    /// A device of `keys`' account, logged in (the device's own store on `dir`).
    fn member(dir: &std::path::Path, keys: &AccountKeys) -> Device {
        let mut d = Device::open(dir).unwrap();
        let account = keys.public();
        let cert = keys.certify(DeviceCertBody {
            account: account.id,
            device: d.id().clone(),
            device_x25519: d.identity.x25519_public(),
            name: "d".into(),
            created_ms: 0,
        });
        d.identity.log_in(Login { account, keys: keys.clone(), cert, relay: "x".into() });
        d
    }

    fn expired(seq: u64, device: &str) -> AccountEntry {
        AccountEntry {
            seq: Seq(seq),
            event: AccountEvent::DeviceExpired { device: DeviceId(device.into()), last_active_ms: 1 },
        }
    }

    /// Item 8: a relay that shows two devices of one account different entries at one position
    /// is caught as soon as either compares its hash with the other's; the positions before
    /// agree, a third device shown the same log agrees, and a rewound device shown the log again
    /// agrees again.
    #[test]
    fn two_devices_shown_different_entries_at_one_position_detect_the_fork() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let keys = AccountKeys::generate(&mut rand::thread_rng());
        let [mut a, mut b, mut c] = [0, 1, 2].map(|i| member(dirs[i].path(), &keys));
        for d in [&mut a, &mut b, &mut c] {
            assert_eq!(d.account_log_head().unwrap(), (Seq(0), Some(ChainHash::genesis(keys.public().id))));
            d.apply_account_entry(&expired(1, "old")).unwrap();
        }
        // The fork: the relay hides one device's expiry from `b` and shows it another.
        a.apply_account_entry(&expired(2, "hidden")).unwrap();
        c.apply_account_entry(&expired(2, "hidden")).unwrap();
        b.apply_account_entry(&expired(2, "decoy")).unwrap();
        let (seq, a_head) = a.account_log_head().unwrap();
        let (_, b_head) = b.account_log_head().unwrap();
        assert_eq!(seq, Seq(2));
        let (a_head, b_head) = (a_head.unwrap(), b_head.unwrap());
        assert_ne!(a_head, b_head);

        assert_eq!(c.check_account_log(seq, a_head).ok(), Some(()), "the same log agrees");
        let b_at_1 = b.account_chain_at(Seq(1)).unwrap().unwrap();
        assert!(a.check_account_log(Seq(1), b_at_1).is_ok(), "the histories agree before the fork");
        match a.check_account_log(seq, b_head) {
            Err(Error::AccountLogForked(f)) => assert_eq!(f.seq, Seq(2)),
            other => panic!("the fork was not detected: {other:?}"),
        }
        assert!(matches!(b.check_account_log(seq, a_head), Err(Error::AccountLogForked(_))));
        assert_eq!((a.account_log_forked().unwrap(), c.account_log_forked().unwrap()), (Some(Seq(2)), None));
        assert!(a.check_account_log(Seq(9), b_head).is_ok(), "a position not reached is not compared");

        // Through the log: `a`'s signed checkpoint, applied by `b`, is the fork (and the typed
        // error); applied by `c`, agreement. One made with other keys is refused unread.
        let mut b2 = member(dirs[1].path().join("again").as_path(), &keys);
        b2.apply_account_entry(&expired(1, "old")).unwrap();
        b2.apply_account_entry(&expired(2, "decoy")).unwrap();
        let checkpoint = a.account_checkpoint().unwrap().expect("a has a chain");
        assert_eq!((checkpoint.seq, checkpoint.hash), (seq, a_head));
        let logged = |checkpoint| AccountEntry { seq: Seq(3), event: AccountEvent::Checkpoint { checkpoint } };
        let forged = AccountKeys::generate(&mut rand::thread_rng()).sign_checkpoint(seq, b_head, a.id().clone());
        assert!(matches!(b2.apply_account_entry(&logged(forged)), Err(Error::Cert(_))));
        assert_eq!(b2.account_log_forked().unwrap(), None, "a forged checkpoint proves nothing");
        let mut b3 = member(dirs[1].path().join("third").as_path(), &keys);
        for e in [expired(1, "old"), expired(2, "decoy")] {
            b3.apply_account_entry(&e).unwrap();
        }
        match b3.apply_account_entry(&logged(checkpoint.clone())) {
            Err(Error::AccountLogForked(f)) => assert_eq!(f.seq, seq),
            other => panic!("the fork was not detected through the log: {other:?}"),
        }
        assert!(c.apply_account_entry(&logged(checkpoint)).is_ok());

        // A rewind (the relay restored from a backup) drops `b`'s hashes past the lowered
        // cursor; shown the log again, it agrees with `a`.
        let inc = b.store.incarnation().unwrap().unwrap_or_default();
        b.store.rewind(inc, Seq(1), &[], None).unwrap();
        assert_eq!(b.account_log_head().unwrap(), (Seq(1), Some(b_at_1)));
        b.apply_account_entry(&expired(2, "hidden")).unwrap();
        assert_eq!(b.account_log_head().unwrap(), (Seq(2), Some(a_head)));
    }
}
