//! What a user does to a chat's messages: send (possibly as a reply), edit, delete for
//! everyone, react. Each is one change of the chat's document, sealed and queued like any
//! other. Part of [`Device`]; split out of `local.rs` for size.

use super::*;
use crate::device::doc::DocError;

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
    /// Carries out `write` on the chat's document, seals the change, and stores both and the
    /// outbox item durably (sending is the session's job). Returns the message as it is now.
    /// Only messages of this account can be edited or deleted.
    pub fn write_local(&mut self, chat: ChatId, write: &MessageOp) -> Result<(Message, OutboxItem), Error> {
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
                let mut msg = new_message(account, &self.id, text, now, id);
                msg.reply_to = reply_to.clone();
                let change = self.doc(chat)?.add_message(&msg)?;
                (msg.id.clone(), change, Some(msg))
            }
            MessageOp::Edit { id, text } => {
                check_text(text)?;
                self.own_message(chat, id, account)?;
                (id.clone(), self.doc(chat)?.edit_message(id, text, now)?, None)
            }
            MessageOp::Delete { id } => {
                self.own_message(chat, id, account)?;
                (id.clone(), self.doc(chat)?.delete_message(id, now)?, None)
            }
            MessageOp::Read { id } => {
                let device = self.id.clone();
                (id.clone(), self.doc(chat)?.mark_read(&account, &device, id, now)?, None)
            }
            MessageOp::React { id, reaction, add } => {
                (id.clone(), self.doc(chat)?.react(id, &account, reaction, *add, now)?, None)
            }
        };
        let item = self.seal_and_store(chat, &change)?;
        let message = match sent {
            Some(m) => m,
            None => self.message(chat, &id)?,
        };
        Ok((message, item))
    }

    /// One message of a chat, as it is now.
    pub fn message(&mut self, chat: ChatId, id: &str) -> Result<Message, Error> {
        self.doc(chat)?
            .messages()
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| Error::Doc(DocError::UnknownMessage(id.to_string())))
    }

    fn own_message(&mut self, chat: ChatId, id: &str, account: AccountId) -> Result<(), Error> {
        if self.message(chat, id)?.author != account.to_string() {
            return Err(Error::NotYours(id.to_string()));
        }
        Ok(())
    }
}
