//! Reading a chat's document: its messages as users see them, read marks, unread counts.
//! Part of [`ChatDoc`]; split out of `doc.rs` for size.

use std::collections::BTreeMap;

use automerge::{ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};

use super::{ChatDoc, Message};
use crate::proto::ids::AccountId;

impl ChatDoc {
    /// The title, if one was set.
    pub fn title(&self) -> Option<String> {
        match self.doc.get(ROOT, "title") {
            Ok(Some((Value::Scalar(s), _))) => match s.as_ref() {
                ScalarValue::Str(t) => Some(t.to_string()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Number of messages.
    pub fn message_count(&self) -> usize {
        self.messages_obj().map(|l| self.doc.length(&l)).unwrap_or(0)
    }

    /// The document's heads, hex, sorted: equal heads mean equal documents.
    pub fn heads(&self) -> Vec<String> {
        let mut h: Vec<String> = self.doc.get_heads().iter().map(|h| h.to_string()).collect();
        h.sort();
        h
    }

    /// Per account, the index of the furthest message one of its devices has read (the marks
    /// are counts; a count of 0 marks nothing).
    pub fn read_marks(&self) -> BTreeMap<String, usize> {
        let mut marks: BTreeMap<String, usize> = BTreeMap::new();
        let Some(read) = self.read_obj() else { return marks };
        for key in self.doc.keys(&read) {
            let (Some((account, _)), Some(count)) = (key.split_once(' '), self.int_at(&read, &key)) else { continue };
            if count > 0 {
                let i = usize::try_from(count - 1).unwrap_or(usize::MAX);
                let mark = marks.entry(account.to_string()).or_insert(i);
                *mark = (*mark).max(i);
            }
        }
        marks
    }

    /// How many messages of other accounts after `account`'s read mark are not deleted.
    pub fn unread(&self, account: &AccountId) -> usize {
        let account = account.to_string();
        let from = self.read_marks().get(&account).map_or(0, |i| i.saturating_add(1));
        self.messages().into_iter().skip(from).filter(|m| m.author != account && !m.deleted).count()
    }

    /// The message `account` has read up to, if any.
    pub fn read_up_to(&self, account: &AccountId) -> Option<String> {
        let list = self.messages_obj()?;
        self.read_marks().get(&account.to_string()).and_then(|i| self.message_id_at(&list, *i))
    }

    /// Every message, in display order. Entries that do not have the message shape (written by
    /// a buggy or hostile device) are skipped.
    pub fn messages(&self) -> Vec<Message> {
        self.messages_in(0, usize::MAX)
    }

    /// The messages at list positions `from..=to` (clamped to the list), in display order.
    pub fn messages_in(&self, from: usize, to: usize) -> Vec<Message> {
        let Some(list) = self.messages_obj() else { return Vec::new() };
        let n = self.doc.length(&list);
        let marks = self.read_marks();
        let mut out = Vec::new();
        for i in from..n.min(to.saturating_add(1)) {
            if let Ok(Some((Value::Object(ObjType::Map), m))) = self.doc.get(&list, i) {
                out.extend(self.message_at(&m, i, &marks));
            }
        }
        out
    }

    /// The message `id` and its position in the list, searched from the newest (new messages
    /// are where one looks).
    pub fn message(&self, id: &str) -> Option<(usize, Message)> {
        let list = self.messages_obj()?;
        let marks = self.read_marks();
        (0..self.doc.length(&list)).rev().find_map(|i| {
            let Ok(Some((Value::Object(ObjType::Map), m))) = self.doc.get(&list, i) else { return None };
            (self.str_at(&m, "id").as_deref() == Some(id))
                .then(|| self.message_at(&m, i, &marks).map(|m| (i, m)))
                .flatten()
        })
    }

    /// The message map `m`, at `index` in the list, with its read receipts from `marks`.
    pub(super) fn message_at(&self, m: &ObjId, index: usize, marks: &BTreeMap<String, usize>) -> Option<Message> {
        // One pass over the message map's few keys (cheaper than a lookup per field).
        let (mut id, mut author, mut device, mut text, mut ts) = (None, None, None, None, None);
        let (mut reply_to, mut edited, mut deleted, mut attachments_obj) = (None, None, false, None);
        for item in self.doc.map_range(m, ..) {
            let str_value = || match &item.value {
                Value::Scalar(v) => v.to_str().map(str::to_string),
                _ => None,
            };
            let int_value = || match &item.value {
                Value::Scalar(v) => match v.as_ref() {
                    ScalarValue::Int(t) => Some(*t),
                    _ => None,
                },
                _ => None,
            };
            match item.key {
                "id" => id = str_value(),
                "author" => author = str_value(),
                "device" => device = str_value(),
                "text" => text = str_value(),
                "ts" => ts = int_value(),
                "reply_to" => reply_to = str_value(),
                "edited" => edited = int_value(),
                "deleted" => deleted = true,
                "attachments" if matches!(item.value, Value::Object(ObjType::List)) => attachments_obj = Some(item.id),
                _ => {}
            }
        }
        let (id, author) = (id?, author?);
        let mut reactions: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut attachments = Vec::new();
        if !deleted {
            if let Some(r) = self.root_map("reactions").filter(|r| self.doc.length(r) > 0) {
                // Keys `"<id> <account> <reaction>"`: this message's sort together, accounts in
                // order.
                let (from, to) = (format!("{id} "), format!("{id}!"));
                for item in self.doc.map_range(&r, from..to) {
                    if let Some((account, reaction)) = item.key[id.len() + 1..].split_once(' ') {
                        reactions.entry(reaction.to_string()).or_default().push(account.to_string());
                    }
                }
            }
            if let Some(a) = attachments_obj {
                attachments.extend((0..self.doc.length(&a)).filter_map(|i| match self.doc.get(&a, i) {
                    Ok(Some((Value::Scalar(v), _))) => v.to_str().map(str::to_string),
                    _ => None,
                }));
            }
        }
        let read_by = marks.iter().filter(|(a, i)| **i >= index && **a != author).map(|(a, _)| a.clone()).collect();
        Some(Message {
            id,
            author,
            device: device?,
            // A delete wins over an edit made at the same time elsewhere.
            text: if deleted { String::new() } else { text? },
            ts: ts?,
            reply_to,
            edited,
            deleted,
            reactions,
            attachments,
            read_by,
        })
    }
}
