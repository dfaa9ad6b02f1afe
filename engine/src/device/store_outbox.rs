//! The device store's outbox (tree `outbox`: items waiting for the relay's ack) and the items
//! the relay acknowledged that are kept to send again to a restored relay (tree `sent`, the
//! rewind after a restore). Part of [`DeviceStore`]; split out of `store.rs` for size.

use super::*;

impl DeviceStore {
    /// Outbox items after `after`, at most `max`, in client-seq order.
    pub fn outbox_after(&self, after: ClientSeq, max: usize) -> Result<Vec<OutboxItem>, StoreError> {
        self.outbox.range_from((after.0 + 1).to_be_bytes(), max).map(|kv| dec(&kv?.1, "outbox item")).collect()
    }

    /// One outbox item.
    pub fn outbox_item(&self, cs: ClientSeq) -> Result<Option<OutboxItem>, StoreError> {
        self.outbox.get(cs.0.to_be_bytes())?.map(|v| dec(&v, "outbox item")).transpose()
    }

    /// Number of items in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Replaces outbox items (resealed after a rotation) and, with `meta`, a chat's keys,
    /// atomically and durably.
    pub fn replace_outbox(&self, items: &[OutboxItem], meta: Option<(ChatId, &ChatMeta)>) -> Result<(), StoreError> {
        atomic(&[&self.outbox, &self.chats], |b| {
            for item in items {
                b.insert(0, item.client_seq.0.to_be_bytes(), enc(item));
            }
            if let Some((chat, meta)) = meta {
                b.insert(1, chat.0, enc(meta));
            }
        })?;
        self.barrier()
    }

    /// Drops an acknowledged (or rejected) item.
    pub fn outbox_remove(&self, cs: ClientSeq) -> Result<(), StoreError> {
        self.outbox.remove(cs.0.to_be_bytes())?;
        Ok(())
    }

    /// Moves an item the relay acknowledged from the outbox to `sent` (the newest
    /// [`SENT_KEPT`] are kept there, to be sent again to a restored relay), in one write.
    pub fn outbox_acked(&self, cs: ClientSeq) -> Result<(), StoreError> {
        let Some(item) = self.outbox.get(cs.0.to_be_bytes())? else { return Ok(()) };
        // Client seqs are consecutive: those more than SENT_KEPT below this one go (a scan from
        // the start that stops at the first one kept; `len` would walk the whole tree).
        let bound = cs.0.saturating_sub(SENT_KEPT as u64 - 1).to_be_bytes();
        let mut old: Vec<sled::IVec> = Vec::new();
        for k in self.sent.iter().keys() {
            let k = k?;
            if k.as_ref() >= &bound[..] {
                break;
            }
            old.push(k);
        }
        atomic(&[&self.outbox, &self.sent], |b| {
            b.remove(0, cs.0.to_be_bytes());
            b.insert(1, cs.0.to_be_bytes(), item.to_vec());
            for k in &old {
                b.remove(1, k);
            }
        })
    }

    /// The relay incarnation this device last synced with.
    pub fn incarnation(&self) -> Result<Option<Incarnation>, StoreError> {
        self.meta.get("incarnation")?.map(|v| dec(&v, "incarnation")).transpose()
    }

    /// Carries out a rewind after the relay was restored (see `SyncOutput::Rewind`), in one
    /// durable write: cursors lowered to at most the given seqs, the new incarnation, and the
    /// acknowledged items after `resend_after` back in the outbox.
    pub fn rewind(
        &self,
        incarnation: Incarnation,
        account: Seq,
        chats: &[(ChatId, Seq)],
        resend_after: Option<ClientSeq>,
    ) -> Result<(), StoreError> {
        let account = self.account_cursor()?.min(account);
        let mut lowered = Vec::new();
        for (chat, seq) in chats {
            let cursor = self.cursor(*chat)?;
            if cursor > *seq {
                lowered.push((*chat, *seq));
            }
        }
        let resend: Vec<(sled::IVec, sled::IVec)> = match resend_after {
            Some(after) => self.sent.range_from((after.0 + 1).to_be_bytes(), usize::MAX).collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        atomic(&[&self.meta, &self.cursors, &self.outbox, &self.sent], |b| {
            b.insert(0, "account_cursor", &account.0.to_be_bytes()[..]);
            b.insert(0, "incarnation", enc(&incarnation));
            for (chat, seq) in &lowered {
                b.insert(1, chat.0, &seq.0.to_be_bytes()[..]);
            }
            for (k, v) in &resend {
                b.insert(2, k, v.clone());
                b.remove(3, k);
            }
        })?;
        self.barrier()
    }
}

#[cfg(test)]
mod sent_tests {
    use super::*;

    /// Acknowledged items move to `sent`, the newest `SENT_KEPT` stay, and a rewind puts back
    /// those after the relay's client seq, with the new incarnation, in one write.
    #[test]
    fn acknowledged_items_are_kept_for_a_restored_relay_and_put_back_by_a_rewind() {
        let store = DeviceStore::open_mem(&MemDisk::new()).unwrap();
        let chat = ChatId([4; 16]);
        let n = SENT_KEPT as u64 + 10;
        for cs in 1..=n {
            let item = OutboxItem {
                client_seq: ClientSeq(cs),
                chat,
                epoch: Epoch(0),
                body: OutboxBody::Delta { sealed: vec![1], plain: vec![2] },
            };
            store.outbox.insert(cs.to_be_bytes(), enc(&item)).unwrap();
            store.outbox_acked(ClientSeq(cs)).unwrap();
        }
        assert_eq!(store.outbox_len(), 0);
        assert_eq!(store.sent.len(), SENT_KEPT, "only the newest are kept");
        store.set_cursor(chat, Seq(50)).unwrap();
        let inc = Incarnation { store: [9; 16], generation: 3 };
        store.rewind(inc, Seq(0), &[(chat, Seq(20))], Some(ClientSeq(n - 5))).unwrap();
        assert_eq!(store.incarnation().unwrap(), Some(inc));
        assert_eq!(store.cursor(chat).unwrap(), Seq(20));
        let back: Vec<u64> = store.outbox_after(ClientSeq(0), 100).unwrap().iter().map(|i| i.client_seq.0).collect();
        assert_eq!(back, ((n - 4)..=n).collect::<Vec<_>>(), "the five the relay lacks, in order");
    }
}
