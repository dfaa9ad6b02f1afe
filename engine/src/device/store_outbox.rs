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
        self.journal.atomic(&[&self.outbox, &self.chats], |b| {
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

    /// Moves items the relay acknowledged from the outbox to `sent` (the newest [`SENT_KEPT`]
    /// are kept there, to be sent again to a restored relay), together (the acks a session took
    /// from the relay together).
    pub fn outbox_acked_many(&self, acked: &[ClientSeq]) -> Result<(), StoreError> {
        let mut items = Vec::with_capacity(acked.len());
        for cs in acked {
            if let Some(item) = self.outbox.get(cs.0.to_be_bytes())? {
                items.push((*cs, item));
            }
        }
        let Some(newest) = items.iter().map(|(cs, _)| cs.0).max() else { return Ok(()) };
        // Client seqs are consecutive: those more than SENT_KEPT below the newest go (a scan
        // from the start that stops at the first one kept; `len` would walk the whole tree).
        let bound = newest.saturating_sub(SENT_KEPT as u64 - 1).to_be_bytes();
        let mut old: Vec<sled::IVec> = Vec::new();
        for k in self.sent.iter().keys() {
            let k = k?;
            if k.as_ref() >= &bound[..] {
                break;
            }
            old.push(k);
        }
        // As plain writes, each item into `sent` before it leaves the outbox: a crash keeps a
        // prefix, at worst items both sent and still in the outbox, which go again and are
        // acknowledged again (the relay answers a repeat with its seq).
        in_order(&[&self.outbox, &self.sent], |b| {
            for (cs, item) in &items {
                let key = cs.0.to_be_bytes();
                if key >= bound {
                    b.insert(1, key, item.to_vec());
                }
                b.remove(0, key);
            }
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
        // The relay's log past the lowered cursor is served again, and may differ after a
        // restore (what was written after the backup is gone): this device's chain past it goes.
        let chain_past = self.account_chain_past(account)?;
        self.journal.atomic(&[&self.meta, &self.cursors, &self.outbox, &self.sent, &self.account_chain], |b| {
            b.insert(0, "account_cursor", &account.0.to_be_bytes()[..]);
            for k in &chain_past {
                b.remove(4, k);
            }
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
            store.outbox_acked_many(&[ClientSeq(cs)]).unwrap();
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

    /// The batched writes a session makes: local changes of two chats in one atomic write
    /// (numbered per chat, the client seq after the last), deltas of two chats (each chat's
    /// changes in order, each cursor at its last seq), and acks. A power loss before the
    /// barrier after any of their writes keeps the local batch whole or not at all, no cursor
    /// without its chat's changes before it, and no item in neither the outbox nor `sent`.
    #[test]
    fn batched_writes_are_numbered_per_chat_and_a_crash_keeps_a_safe_prefix() {
        let (a, b) = (ChatId([1; 16]), ChatId([2; 16]));
        let item = |cs: u64, chat| OutboxItem {
            client_seq: ClientSeq(cs),
            chat,
            epoch: Epoch(0),
            body: OutboxBody::Delta { sealed: vec![cs as u8], plain: vec![cs as u8] },
        };
        let items = [item(1, a), item(2, b), item(3, a)];
        let changes = [[1u8], [2], [3]];
        let writes: Vec<(ChatId, &[u8], &OutboxItem)> =
            items.iter().zip(&changes).map(|(i, c)| (i.chat, &c[..], i)).collect();
        let da: [(Seq, Option<&[u8]>); 2] = [(Seq(7), Some(&[7])), (Seq(8), None)];
        let db: [(Seq, Option<&[u8]>); 1] = [(Seq(4), Some(&[4]))];
        let da2: [(Seq, Option<&[u8]>); 1] = [(Seq(9), Some(&[9]))];
        let state = |s: &DeviceStore| {
            let outbox: Vec<u64> = s.outbox_after(ClientSeq(0), 10).unwrap().iter().map(|i| i.client_seq.0).collect();
            (s.doc_parts(a).unwrap().1, s.doc_parts(b).unwrap().1, s.cursor(a).unwrap().0, outbox, s.sent.len())
        };
        // The writes since the barrier after each batch.
        let write_all = |disk: &MemDisk| {
            let store = DeviceStore::open_mem(disk).unwrap();
            store.barrier().unwrap();
            let mut ends = vec![0];
            store.store_local_many(&writes).unwrap();
            ends.push(disk.unsynced());
            assert_eq!(store.next_client_seq().unwrap(), ClientSeq(4));
            assert_eq!((store.changes_stored(a).unwrap(), store.changes_stored(b).unwrap()), (2, 1));
            let counts = store.apply_remote_chats(&[(a, &da), (b, &db), (a, &da2)]).unwrap();
            assert_eq!(counts, [3, 2, 4], "each entry's chat count after it");
            assert_eq!(store.cursor(b).unwrap(), Seq(4));
            ends.push(disk.unsynced());
            store.outbox_acked_many(&[ClientSeq(1), ClientSeq(3), ClientSeq(99)]).unwrap();
            ends.push(disk.unsynced());
            ends
        };
        let ends = write_all(&MemDisk::new());
        let (ca, cb) = (vec![vec![1], vec![3]], vec![vec![2]]);
        let (ca2, cb2) = (vec![vec![1], vec![3], vec![7], vec![9]], vec![vec![2], vec![4]]);
        for keep in 0..=ends[3] {
            let disk = MemDisk::new();
            write_all(&disk);
            disk.crash(keep);
            let store = DeviceStore::open_mem(&disk).unwrap();
            let (got_a, got_b, cursor_a, outbox, sent) = state(&store);
            // At the batches' ends, exactly what they wrote.
            let want = match ends.iter().position(|&e| e == keep) {
                Some(0) => Some((vec![], vec![], 0, vec![], 0)),
                Some(1) => Some((ca.clone(), cb.clone(), 0, vec![1, 2, 3], 0)),
                Some(2) => Some((ca2.clone(), cb2.clone(), 9, vec![1, 2, 3], 0)),
                Some(_) => Some((ca2.clone(), cb2.clone(), 9, vec![2], 2)),
                None => None,
            };
            if let Some(want) = want {
                assert_eq!((got_a.clone(), got_b.clone(), cursor_a, outbox.clone(), sent), want, "{keep} writes kept");
            }
            // In between, a safe prefix.
            // The local batch's first write is its journal entry: with it, the batch is whole.
            if keep == 0 {
                assert!(outbox.is_empty() && got_a.is_empty(), "the local batch is absent");
            } else {
                let mut all: Vec<u64> = outbox.clone();
                all.extend(
                    store.sent.iter().keys().map(|k| u64::from_be_bytes(k.unwrap().as_ref().try_into().unwrap())),
                );
                all.sort();
                all.dedup();
                assert_eq!(all, vec![1, 2, 3], "no item lost ({keep} kept)");
                assert!(got_a.starts_with(&ca) && got_b.starts_with(&cb), "local changes first ({keep} kept)");
            }
            if cursor_a == 9 {
                assert_eq!(got_a, ca2, "a cursor comes after its chat's changes ({keep} kept)");
            }
            if store.cursor(b).unwrap() == Seq(4) {
                assert_eq!(got_b, cb2, "a cursor comes after its chat's changes ({keep} kept)");
            }
        }
    }

    /// A store of received changes that fails part-way leaves the changes it made, and the
    /// next changes of those chats are numbered after them, not over them.
    #[test]
    fn received_changes_after_a_failed_store_do_not_overwrite_those_it_made() {
        let a = ChatId([1; 16]);
        let disk = MemDisk::new();
        let store = DeviceStore::open_mem(&disk).unwrap();
        store.apply_remote_chats(&[(a, &[(Seq(1), Some(&[1u8][..]))])]).unwrap();
        disk.fail_after(Some(1));
        let two: [(Seq, Option<&[u8]>); 2] = [(Seq(2), Some(&[2])), (Seq(3), Some(&[3]))];
        assert!(store.apply_remote_chats(&[(a, &two)]).is_err());
        disk.fail_after(None);
        assert_eq!(store.cursor(a).unwrap(), Seq(1), "the cursor did not move");
        store.apply_remote_chats(&[(a, &[(Seq(3), Some(&[3u8][..]))])]).unwrap();
        assert_eq!(store.doc_parts(a).unwrap().1, vec![vec![1], vec![2], vec![3]], "nothing overwritten");
        assert_eq!(store.cursor(a).unwrap(), Seq(3));
    }
}
