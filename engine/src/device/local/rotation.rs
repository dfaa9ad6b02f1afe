//! Key rotation: the revoking device makes the account's next generation of keys and a new key
//! epoch in every chat; every device takes them from the account log and seals what waits in
//! its outbox again under them (see docs/crypto.md, "Rotation"). Part of [`Device`]; split out
//! of `local.rs` for size.

use std::collections::BTreeSet;

use super::*;
use crate::proto::cert::{rotation_bundle_context, Rotation};
use crate::proto::directory::KeyTerms;
use crate::proto::ids::ClientSeq;
use crate::proto::wire::NewEpoch;

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

/// A rotation, the chats' new epochs and the recovery bundle, as `Revoke` and `Rotate` carry
/// them.
type RotationParts = (Rotation, Vec<NewEpoch>, Option<Vec<u8>>);

impl Device {
    /// The generation of the account's keys the account log has reached at its cursor.
    pub(crate) fn log_gen(&self) -> Result<AccountGen, Error> {
        match self.store.account_gen()? {
            Some(g) => Ok(g),
            None => Ok(self.login()?.account.genesis()),
        }
    }

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
            by: self.id.clone(),
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

    /// Chats whose creation still waits in the outbox.
    pub(super) fn pending_chats(&self) -> Result<BTreeSet<ChatId>, Error> {
        Ok(self
            .store
            .outbox_after(ClientSeq(0), usize::MAX)?
            .into_iter()
            .filter(|i| matches!(i.body, OutboxBody::CreateChat { .. }))
            .map(|i| i.chat)
            .collect())
    }

    /// Applies a rotation from the account log: checks it against the generation the log has
    /// reached, takes this device's new bundle (only if its keys are the signed ones and it
    /// keeps every past generation this device has), and makes the chat creations the relay
    /// refused as stale again under the new keys. (A creation the relay took before the rotation
    /// is not made again: the rotation gave that chat a new epoch, which reseals its deltas.) The log's generation moves on even when the bundle
    /// cannot be taken: the chain of signatures holds, and later entries are checked against it.
    pub(super) fn apply_rotation(
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

    fn take_bundle(&mut self, rotation: &Rotation, next: &AccountGen) -> Result<Applied, Error> {
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
            .find(|(d, _)| *d == self.id)
            .ok_or(Error::Rotation("the rotation has no bundle for this device"))?;
        let context = rotation_bundle_context(next.account, next.generation, &self.id);
        let plain = open_box(&StaticSecret::from(self.secrets.x25519), &[], &context, sealed)?;
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
        self.login = Some(login);
        Ok(Applied { resealed: self.rekey_stale_creations()?, ..Applied::default() })
    }

    /// Makes an outbox item the relay refused as stale again under this device's newest keys,
    /// and returns what changed (nothing while those keys have not arrived: the account log
    /// brings them, and applying it makes the item again).
    pub(crate) fn remake_stale(&mut self, cs: ClientSeq) -> Result<Vec<OutboxItem>, Error> {
        let Some(item) = self.store.outbox_item(cs)? else { return Ok(Vec::new()) };
        match &item.body {
            OutboxBody::CreateChat { kind, keys } => {
                let current = self.login()?.keys.current();
                let members = keys.iter().map(|k| k.account).collect();
                let terms = KeyTerms { chat: item.chat, kind: *kind, epoch: item.epoch, members };
                let signed_now = keys.iter().all(|k| current.verify_chat_key(&terms, k).is_ok());
                if signed_now {
                    // The relay has a newer generation than this device (wait for it), or another
                    // member's keys moved on (look them up and wrap the key again: key work).
                    self.stale_creations.insert(item.chat);
                    if keys.len() > 1 {
                        self.relook.insert(item.chat);
                    }
                    Ok(Vec::new())
                } else {
                    self.rekey_creation(&item)
                }
            }
            OutboxBody::Delta { .. } => self.reseal(item.chat),
        }
    }

    /// Makes the creations the relay refused as stale again, now that new keys are here.
    fn rekey_stale_creations(&mut self) -> Result<Vec<OutboxItem>, Error> {
        let mut out = Vec::new();
        for chat in std::mem::take(&mut self.stale_creations) {
            let items = self.store.outbox_after(ClientSeq(0), usize::MAX)?;
            if let Some(item) = items.iter().find(|i| i.chat == chat && matches!(i.body, OutboxBody::CreateChat { .. }))
            {
                out.extend(self.rekey_creation(item)?);
            }
        }
        Ok(out)
    }

    /// Makes a chat creation the relay refused as stale (so the relay has no such chat) again
    /// under the current generation: the chat key wrapped to the members' current keys and
    /// signed anew. The key itself stays: the texts of the chat's waiting messages are sealed
    /// under it inside their changes, which cannot be made again. (The old wrapping reached only
    /// the relay, which refused it; see docs/crypto.md, "Rotation".) Returns the changed item.
    pub(super) fn rekey_creation(&mut self, item: &OutboxItem) -> Result<Vec<OutboxItem>, Error> {
        let OutboxBody::CreateChat { kind, .. } = item.body else { return Ok(Vec::new()) };
        let meta = self.store.chat(item.chat)?.ok_or(Error::UnknownChat(item.chat))?;
        let key = meta.keys.get(&item.epoch).cloned().ok_or(Error::UnknownChat(item.chat))?;
        let terms = KeyTerms { chat: item.chat, kind, epoch: item.epoch, members: meta.members.clone() };
        let keys = self.grant(&key, &terms, &meta.members)?;
        let create = OutboxItem { body: OutboxBody::CreateChat { kind, keys }, ..item.clone() };
        self.store.replace_outbox(std::slice::from_ref(&create), None)?;
        Ok(vec![create])
    }

    /// Seals the outbox deltas of `chat` that are under an older epoch again under its newest.
    pub(crate) fn reseal(&mut self, chat: ChatId) -> Result<Vec<OutboxItem>, Error> {
        let meta = self.store.chat(chat)?.ok_or(Error::UnknownChat(chat))?;
        let items = self.store.outbox_after(ClientSeq(0), usize::MAX)?;
        let changed = self.sealed_again(chat, &meta, &items);
        if !changed.is_empty() {
            self.store.replace_outbox(&changed, None)?;
        }
        Ok(changed)
    }

    /// `items`' deltas of `chat` under an older epoch, sealed under the chat's newest key.
    fn sealed_again(&mut self, chat: ChatId, meta: &ChatMeta, items: &[OutboxItem]) -> Vec<OutboxItem> {
        let (Some((epoch, key)), Some(account)) = (meta.current(), self.account()) else { return Vec::new() };
        let key = key.transport();
        let mut out = Vec::new();
        for item in items.iter().filter(|i| i.chat == chat && i.epoch < epoch) {
            let OutboxBody::Delta { plain, .. } = &item.body else { continue };
            let ad = DeltaAd { chat, epoch, device: &self.id, account, client_seq: item.client_seq };
            let sealed = seal_delta(&key, &ad, plain, &mut self.rng);
            out.push(OutboxItem { epoch, body: OutboxBody::Delta { sealed, plain: plain.clone() }, ..item.clone() });
        }
        out
    }
}
