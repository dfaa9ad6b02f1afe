//! Ending a session and rotating the account's keys: the revoking device makes the account's
//! next generation of keys, sealed to every other device, and a new key epoch in every chat
//! with no other member; every device takes the new generation from the account log (see
//! docs/crypto.md, "Rotation"). Applying the log entry is the account log's part
//! ([`Device::apply_account_entry`]); taking this device's bundle out of it is here.

use std::collections::BTreeSet;

use x25519_dalek::StaticSecret;

use crate::device::error::Error;
use crate::device::local::chats::Applied;
use crate::device::local::Device;
use crate::device::store::Login;
use crate::proto::cert::{rotation_bundle_context, AccountGen, AccountKeys, RevocationBody, Rotation};
use crate::proto::crypto::{open_box, seal_box, ChatKey, RecoveryKey};
use crate::proto::directory::KeyTerms;
use crate::proto::ids::{DeviceId, Epoch};
use crate::proto::wire::{ClientFrame, NewEpoch, ReqId};

/// A rotation, the chats' new epochs and the recovery bundle, as `Revoke` and `Rotate` carry
/// them.
type RotationParts = (Rotation, Vec<NewEpoch>, Option<Vec<u8>>);

impl Device {
    /// The request that ends `device`'s session and rotates the account's keys, in one:
    ///
    /// * the revocation, signed with the current generation;
    /// * the next generation, signed with the current one, its bundle sealed to every other
    ///   device this device knows (and to itself), never to `device`;
    /// * a new key epoch for every chat the relay has, wrapped to the new generation;
    /// * the new bundle sealed to the account's recovery key, if it has one that `device`
    ///   did not make (that one is withdrawn with its session).
    ///
    /// This device keeps none of it: it takes the rotation from the account log like the other
    /// devices. After `Done`, call [`Device::revoke_done`]; on `StaleEpoch` the account moved
    /// on (a device or chat this device has not synced yet): sync and ask again.
    pub fn revoke_request(&mut self, device: &DeviceId, req: ReqId) -> Result<ClientFrame, Error> {
        let login = self.login()?.clone();
        let revocation = login.keys.revoke(RevocationBody {
            account: login.account.id,
            device: device.clone(),
            by: self.identity.id.clone(),
            at_ms: self.now_ms().max(0) as u64,
        });
        let (rotation, chats, recovery) = self.rotation_parts(Some(device))?;
        Ok(ClientFrame::Revoke { req, revocation, rotation, chats, recovery })
    }

    /// The request that rotates the account's keys after a session expired (the sync core asks
    /// for it with [`crate::core::SyncOutput::Rotate`]): like [`Device::revoke_request`]
    /// without the revocation.
    pub fn rotate_request(&mut self, req: ReqId) -> Result<ClientFrame, Error> {
        let (rotation, chats, recovery) = self.rotation_parts(None)?;
        Ok(ClientFrame::Rotate { req, rotation, chats, recovery })
    }

    /// The next generation for every device this device knows but `leaving`, a new epoch for
    /// every chat the relay has with this account as its only member, and the bundle sealed to
    /// the recovery key unless `leaving` made it. (Chats with other members get their next
    /// epoch from this account's devices after the rotation, see [`Device::key_work`]: their
    /// members' keys are looked up for it, and a rotation must fit one frame.)
    fn rotation_parts(&mut self, leaving: Option<&DeviceId>) -> Result<RotationParts, Error> {
        let login = self.login()?.clone();
        let account = login.account.id;
        let next =
            login.keys.rotated(&mut self.rng).ok_or(Error::Rotation("the account rotated its keys too often"))?;
        let new_gen = next.current();
        let bundle = postcard::to_allocvec(&next).expect("serializing keys cannot fail");
        let mut rotation = login.keys.sign_rotation(&next);
        for cert in self.store.devices()?.into_iter().filter(|c| Some(&c.body.device) != leaving) {
            let context = rotation_bundle_context(account, new_gen.generation, &cert.body.device);
            let sealed = seal_box(&cert.body.device_x25519, &[], &context, &bundle, &mut self.rng);
            rotation.bundles.push((cert.body.device, sealed));
        }
        let pending = self.pending_chats()?;
        let mut chats = Vec::new();
        for (chat, meta, _) in self.store.chats()? {
            if pending.contains(&chat) || meta.left || meta.members != BTreeSet::from([account]) {
                // Not on the relay yet (its creation is made again under the new keys), left,
                // or with other members (rekeyed after the rotation).
                continue;
            }
            let epoch = match meta.current() {
                Some((e, _)) => Epoch(e.0.checked_add(1).ok_or(Error::Rotation("a chat ran out of key epochs"))?),
                None => Epoch(0),
            };
            let key = ChatKey::random(&mut self.rng);
            let terms = KeyTerms { chat, kind: meta.kind, epoch, members: meta.members.clone() };
            chats.push(NewEpoch {
                chat,
                epoch,
                keys: vec![next.grant_chat_key(&key, &terms, &new_gen, true, &mut self.rng)],
            });
        }
        let recovery = match self.store.recovery_public()? {
            Some((public, by)) if Some(&by) != leaving => Some(RecoveryKey::seal_to(&public, &bundle, &mut self.rng)),
            _ => None,
        };
        Ok((rotation, chats, recovery))
    }

    pub(in crate::device::local) fn take_bundle(
        &mut self,
        rotation: &Rotation,
        next: &AccountGen,
    ) -> Result<Applied, Error> {
        let login = self.login()?.clone();
        if login.keys.generation >= next.generation {
            // Already held: made here, or the bundle this device was linked or recovered with.
            return match login.keys.generation(next.generation) {
                Some(g) if g == *next => Ok(Applied::default()),
                _ => Err(Error::Rotation("this device's keys disagree with the account log")),
            };
        }
        if login.keys.generation + 1 != next.generation {
            return Err(Error::Rotation("this device missed a generation of the account's keys"));
        }
        let (_, sealed) = rotation
            .bundles
            .iter()
            .find(|(d, _)| *d == self.identity.id)
            .ok_or(Error::Rotation("the rotation has no bundle for this device"))?;
        let context = rotation_bundle_context(next.account, next.generation, &self.identity.id);
        let plain = open_box(&StaticSecret::from(self.identity.secrets.x25519), &[], &context, sealed)?;
        let keys: AccountKeys =
            postcard::from_bytes(&plain).map_err(|_| Error::Rotation("the rotated bundle does not decode"))?;
        let old = &login.keys;
        if !keys.is_consistent()
            || keys.current() != *next
            || keys.public() != login.account
            || keys.previous.get(..old.previous.len()) != Some(&old.previous[..])
            || keys.generation(old.generation) != Some(old.current())
        {
            return Err(Error::Rotation("the rotated bundle is not the signed generation"));
        }
        let login = Login { keys, ..login };
        self.store.set_login(&login)?;
        self.identity.login = Some(login);
        Ok(Applied { resealed: self.rekey_stale_creations()?, ..Applied::default() })
    }
}
