//! What a user does to a chat's messages: send (possibly as a reply), edit, delete for
//! everyone, react. Each is one change of the chat's document, sealed and queued like any
//! other.

use rand::RngCore;

use crate::device::doc::{new_message, DocError, Message};
use crate::device::error::Error;
use crate::device::local::{Device, LocalWrites};
use crate::device::store::{ChatMeta, OutboxItem};
use crate::proto::crypto::{open_text, seal_text, sealed_text_epoch};
use crate::proto::ids::{AccountId, ChatId};

/// Longest message text, in bytes (a sealed delta must fit the relay's 64 KiB limit).
pub(crate) const MAX_TEXT_BYTES: usize = 16 * 1024;

/// Something a user does to a chat's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageOp {
    /// A new message, answering `reply_to` if given.
    Send { text: String, reply_to: Option<String> },
    /// New text for one of this account's messages.
    Edit { id: String, text: String },
    /// Deletes one of this account's messages for everyone.
    Delete { id: String },
    /// Adds (`add`) or removes this account's reaction to a message.
    React { id: String, reaction: String, add: bool },
    /// Marks the chat read up to this message (on every device of the account, and as a read
    /// receipt for the other members). Never moves the mark back.
    Read { id: String },
}

impl Device {
    /// Writes a message: edits the document, seals the change, and stores both and the outbox
    /// item durably. Sending is the session's job. (See [`Device::write_local`] for replies,
    /// edits, deletes and reactions.)
    pub fn compose(&mut self, chat: ChatId, text: &str) -> Result<(Message, OutboxItem), Error> {
        self.write_local(chat, &MessageOp::Send { text: text.to_string(), reply_to: None })
    }

    /// Carries out `write` on the chat's document, seals the change, and stores both and the
    /// outbox item durably (sending is the session's job). Returns the message as it is now.
    /// Only messages of this account can be edited or deleted.
    pub fn write_local(&mut self, chat: ChatId, write: &MessageOp) -> Result<(Message, OutboxItem), Error> {
        let mut writes = LocalWrites::default();
        let (message, item, stored) = self.write_staged(chat, write, &mut writes)?;
        self.store_writes(&mut writes)?;
        self.store.barrier()?;
        self.maybe_compact(chat, stored)?;
        Ok((message, item))
    }

    /// [`Device::write_local`] without storing: the change and its outbox item are added to
    /// `writes`. The caller stores a batch of writes with [`Device::store_writes`] and makes one
    /// barrier before any of them is answered or sent, then [`Device::maybe_compact`] with the
    /// returned count.
    pub(crate) fn write_staged(
        &mut self,
        chat: ChatId,
        write: &MessageOp,
        writes: &mut LocalWrites,
    ) -> Result<(Message, OutboxItem, u64), Error> {
        let account = self.login()?.account.id;
        if self.store.chat(chat)?.is_some_and(|m| m.left) {
            return Err(Error::NotMember(chat));
        }
        let now = self.now_ms();
        let (id, change, sent) = match write {
            MessageOp::Send { text, reply_to } => {
                check_text(text)?;
                if let Some(to) = reply_to {
                    self.message(chat, to)?;
                }
                let mut id = [0u8; 16];
                self.rng.fill_bytes(&mut id);
                let mut msg = new_message(account, self.identity.id(), text, now, id);
                msg.reply_to = reply_to.clone();
                let stored = Message { text: self.seal_text(chat, &msg.id, text)?, ..msg.clone() };
                let change = self.doc(chat)?.add_message(&stored)?;
                (msg.id.clone(), change, Some(msg))
            }
            MessageOp::Edit { id, text } => {
                check_text(text)?;
                self.own_message(chat, id, account)?;
                let sealed = self.seal_text(chat, id, text)?;
                (id.clone(), self.doc(chat)?.edit_message(id, &sealed, now)?, None)
            }
            MessageOp::Delete { id } => {
                self.own_message(chat, id, account)?;
                (id.clone(), self.doc(chat)?.delete_message(id, now)?, None)
            }
            MessageOp::Read { id } => {
                let device = self.identity.id().clone();
                (id.clone(), self.doc(chat)?.mark_read(&account, &device, id, now)?, None)
            }
            MessageOp::React { id, reaction, add } => {
                (id.clone(), self.doc(chat)?.react(id, &account, reaction, *add, now)?, None)
            }
        };
        let (item, stored) = self.seal_and_stage(chat, &change, writes)?;
        let message = match sent {
            Some(m) => m,
            None => self.message(chat, &id)?,
        };
        Ok((message, item, stored))
    }

    /// Gives the chat a new title (any member may), durably queued like a message.
    pub fn rename_local(&mut self, chat: ChatId, title: &str) -> Result<OutboxItem, Error> {
        check_text(title)?;
        if self.store.chat(chat)?.ok_or(Error::UnknownChat(chat))?.left {
            return Err(Error::NotMember(chat));
        }
        let now = self.now_ms();
        let change = self.doc(chat)?.set_title(title, now);
        self.seal_and_store(chat, &change)
    }

    /// One message of a chat, as it is now (if this device may read it).
    pub fn message(&mut self, chat: ChatId, id: &str) -> Result<Message, Error> {
        self.messages(chat)?
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| Error::Doc(DocError::UnknownMessage(id.to_string())))
    }

    /// A chat's messages in display order, their texts opened: without those from before this
    /// account joined, unless it was given the history.
    pub fn messages(&mut self, chat: ChatId) -> Result<Vec<Message>, Error> {
        let all = self.doc(chat)?.messages();
        self.reveal(chat, all)
    }

    /// Opens the texts of `messages` of `chat` (sealed under their epochs' keys, see
    /// [`seal_text`]) and leaves out the ones this device has no key for: written before this
    /// account joined, without the history.
    pub(crate) fn reveal(&self, chat: ChatId, messages: Vec<Message>) -> Result<Vec<Message>, Error> {
        let meta = self.store.chat(chat)?.ok_or(Error::UnknownChat(chat))?;
        Ok(reveal_with(&meta, chat, messages))
    }

    fn seal_text(&mut self, chat: ChatId, message: &str, text: &str) -> Result<String, Error> {
        let meta = self.store.chat(chat)?.ok_or(Error::UnknownChat(chat))?;
        let (epoch, key) = meta.current().ok_or(Error::UnknownChat(chat))?;
        Ok(seal_text(key, chat, epoch, message, text, &mut self.rng))
    }

    fn own_message(&mut self, chat: ChatId, id: &str, account: AccountId) -> Result<(), Error> {
        if self.message(chat, id)?.author != account.to_string() {
            return Err(Error::NotYours(id.to_string()));
        }
        Ok(())
    }
}

pub(in crate::device::local) fn check_text(text: &str) -> Result<(), Error> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(Error::TooLong(text.len(), MAX_TEXT_BYTES));
    }
    Ok(())
}

/// Opens the sealed texts of `messages` of `chat` with the chat's keys in `meta`; a message
/// whose text does not open is left out.
pub(crate) fn reveal_with(meta: &ChatMeta, chat: ChatId, messages: Vec<Message>) -> Vec<Message> {
    messages
        .into_iter()
        .filter_map(|mut m| {
            if let Some(epoch) = sealed_text_epoch(&m.text) {
                m.text = open_text(meta.keys.get(&epoch)?, chat, &m.id, &m.text).ok()?;
            }
            Some(m)
        })
        .collect()
}
