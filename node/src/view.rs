//! What the CLI prints and the daemon sends, in one shape for both: messages, secret chats and
//! session events as JSON objects, and the human lines made from those same objects. A command
//! run through the daemon gets these objects over the socket and prints them with the same
//! functions as the command run on the store, so its output cannot differ.
//!
//! Times are RFC 3339 in UTC with milliseconds (`2026-12-07T09:55:00.123Z`), in JSON and in
//! human lines alike.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use stratus_engine::store::SecretChat;
use stratus_engine::{ChatId, ChatSummary, Event, Message, SecretId, SecretMessage};

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const LAST_MS: i64 = 253_402_300_799_999;

/// `ms` since the Unix epoch as RFC 3339 in UTC with milliseconds. Times come from other
/// devices' clocks, so anything outside years 1970–9999 is clamped into them rather than
/// refused (or, worse, a panic in the formatter).
pub(crate) fn rfc3339(ms: i64) -> String {
    let ms = u64::try_from(ms.clamp(0, LAST_MS)).unwrap_or(0);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A time the relay reports where 0 means "not known": `None` for 0.
pub(crate) fn known_time(ms: u64) -> Option<String> {
    (ms != 0).then(|| rfc3339(i64::try_from(ms).unwrap_or(i64::MAX)))
}

/// A message of a chat or a secret chat, without saying which.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MessageBody {
    pub id: String,
    pub author: String,
    pub device: String,
    pub text: String,
    /// When it was written, by its device's clock.
    pub ts: String,
    pub reply_to: Option<String>,
    /// When its text was last edited.
    pub edited: Option<String>,
    pub deleted: bool,
    pub reactions: BTreeMap<String, Vec<String>>,
    pub attachments: Vec<String>,
    pub read_by: Vec<String>,
}

impl From<&Message> for MessageBody {
    fn from(m: &Message) -> Self {
        MessageBody {
            id: m.id.clone(),
            author: m.author.clone(),
            device: m.device.clone(),
            text: m.text.clone(),
            ts: rfc3339(m.ts),
            reply_to: m.reply_to.clone(),
            edited: m.edited.map(rfc3339),
            deleted: m.deleted,
            reactions: m.reactions.clone(),
            attachments: m.attachments.clone(),
            read_by: m.read_by.clone(),
        }
    }
}

/// A message of a cloud chat: `log --json`, `watch --json`, the daemon's `messages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChatMessage {
    pub chat: String,
    #[serde(flatten)]
    pub message: MessageBody,
}

impl ChatMessage {
    pub(crate) fn new(chat: ChatId, m: &Message) -> Self {
        ChatMessage { chat: chat.to_string(), message: m.into() }
    }
}

/// A message of a secret chat: `secret log --json`, the daemon's `secret_messages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SecretChatMessage {
    pub secret: String,
    #[serde(flatten)]
    pub message: MessageBody,
    /// Seconds after it is read that it disappears, if it does.
    pub ttl_s: Option<u32>,
    /// When it disappears, once its timer runs.
    pub expires: Option<String>,
}

impl SecretChatMessage {
    pub(crate) fn new(id: SecretId, m: &SecretMessage) -> Self {
        SecretChatMessage {
            secret: id.to_string(),
            message: (&m.message).into(),
            ttl_s: m.ttl_s,
            expires: m.expires_ms.map(rfc3339),
        }
    }
}

/// A chat as `chat list` shows it (and the daemon sends it): the engine's summary as it is.
pub(crate) type ChatRow = ChatSummary;

/// A secret chat as `secret list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SecretChatView {
    pub id: String,
    pub account: String,
    pub device: String,
    pub device_name: String,
    /// `inviting`, `invited`, `active` or `closing`.
    pub state: String,
    pub verified: bool,
    pub created: String,
}

impl From<&SecretChat> for SecretChatView {
    fn from(c: &SecretChat) -> Self {
        SecretChatView {
            id: c.id.to_string(),
            account: c.peer_cert.body.account.to_string(),
            device: c.peer_cert.body.device.0.clone(),
            device_name: c.peer_cert.body.name.clone(),
            state: format!("{:?}", c.state).to_lowercase(),
            verified: c.verified,
            created: rfc3339(c.created_ms),
        }
    }
}

/// `TS AUTHOR@DEVICE [ID]: TEXT`, then what happened to it: `(edited)`, `(deleted)`, the
/// message it answers, reactions with their counts and read receipts. Ids, authors and devices
/// shortened to their last 8 characters (`--json` has them whole).
pub(crate) fn message_line(m: &MessageBody) -> String {
    let short = |s: &str| s.chars().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect::<String>();
    let mut line = format!("{} {}@{} [{}]: ", m.ts, short(&m.author), short(&m.device), short(&m.id));
    if m.deleted {
        line.push_str("(deleted)");
    } else {
        line.push_str(&m.text);
        if m.edited.is_some() {
            line.push_str(" (edited)");
        }
    }
    if let Some(to) = &m.reply_to {
        line.push_str(&format!(" ↩ {}", short(to)));
    }
    for (reaction, accounts) in &m.reactions {
        line.push_str(&format!(" {reaction}×{}", accounts.len()));
    }
    if !m.read_by.is_empty() {
        line.push_str(&format!(" ✓{}", m.read_by.len()));
    }
    line
}

/// A secret chat's message line: a message line and its timer.
pub(crate) fn secret_line(m: &SecretChatMessage) -> String {
    let mut line = message_line(&m.message);
    if let Some(ttl) = m.ttl_s {
        line.push_str(&format!(" ⏱{ttl}s"));
    }
    line
}

/// A session event as the daemon sends it (`{"type": "message_added", …}`); see
/// docs/daemon.md for each.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum EventView {
    MessageAdded { message: ChatMessage, local: bool },
    MessageChanged { message: ChatMessage, local: bool },
    Read { chat: String, account: String, up_to: String },
    Typing { chat: String, account: String, device: String },
    ChatAdded { chat: String },
    ChatLeft { chat: String },
    Acked { chat: String, client_seq: u64, seq: Option<u64> },
    Rejected { chat: String, client_seq: u64, code: String, message: String },
    Connected,
    Disconnected { reason: String },
    CaughtUp,
    Idle,
    Error { message: String },
    SecretMessage { message: SecretChatMessage },
    SecretOffered { secret: String, account: String, device: String, device_name: String },
    SecretLinked { secret: String },
    SecretClosed { secret: String },
    SecretExpired { secret: String, message: String },
    SessionRevoked,
    SessionRefused,
    Refused { code: String, message: String },
}

impl EventView {
    /// The view of an event; `None` for kinds this build does not know (the engine's `Event`
    /// may grow).
    pub(crate) fn of(e: &Event) -> Option<EventView> {
        Some(match e {
            Event::MessageAdded { chat, message, local } => {
                EventView::MessageAdded { message: ChatMessage::new(*chat, message), local: *local }
            }
            Event::MessageChanged { chat, message, local } => {
                EventView::MessageChanged { message: ChatMessage::new(*chat, message), local: *local }
            }
            Event::Read { chat, account, up_to } => {
                EventView::Read { chat: chat.to_string(), account: account.clone(), up_to: up_to.clone() }
            }
            Event::Typing { chat, account, device } => {
                EventView::Typing { chat: chat.to_string(), account: account.clone(), device: device.clone() }
            }
            Event::ChatAdded { chat } => EventView::ChatAdded { chat: chat.to_string() },
            Event::ChatLeft { chat } => EventView::ChatLeft { chat: chat.to_string() },
            Event::Acked { chat, client_seq, seq } => {
                EventView::Acked { chat: chat.to_string(), client_seq: client_seq.0, seq: seq.map(|s| s.0) }
            }
            Event::Rejected { chat, client_seq, code, message } => EventView::Rejected {
                chat: chat.to_string(),
                client_seq: client_seq.0,
                code: format!("{code:?}"),
                message: message.clone(),
            },
            Event::Connected => EventView::Connected,
            Event::Disconnected { reason } => EventView::Disconnected { reason: reason.clone() },
            Event::CaughtUp => EventView::CaughtUp,
            Event::Idle => EventView::Idle,
            Event::Error { message } => EventView::Error { message: message.clone() },
            Event::SecretMessage { chat, message } => {
                EventView::SecretMessage { message: SecretChatMessage::new(*chat, message) }
            }
            Event::SecretOffered { chat, from } => EventView::SecretOffered {
                secret: chat.to_string(),
                account: from.body.account.to_string(),
                device: from.body.device.0.clone(),
                device_name: from.body.name.clone(),
            },
            Event::SecretLinked { chat } => EventView::SecretLinked { secret: chat.to_string() },
            Event::SecretClosed { chat } => EventView::SecretClosed { secret: chat.to_string() },
            Event::SecretExpired { chat, message } => {
                EventView::SecretExpired { secret: chat.to_string(), message: message.clone() }
            }
            Event::SessionRevoked => EventView::SessionRevoked,
            Event::SessionRefused => EventView::SessionRefused,
            Event::Refused { code, message } => {
                EventView::Refused { code: format!("{code:?}"), message: message.clone() }
            }
            _ => return None,
        })
    }
}

/// A session of the account as `devices --json` and the daemon's `sessions` show it.
pub(crate) fn session_json(s: &stratus_engine::SessionInfo) -> serde_json::Value {
    serde_json::json!({
        "device": s.device.to_string(),
        "name": s.name,
        "created": s.created_ms.and_then(known_time),
        "registered": known_time(s.registered_ms),
        "last_active": known_time(s.last_active_ms),
        "online": s.online,
        "this_device": s.this_device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc_with_milliseconds_and_out_of_range_ones_are_clamped() {
        assert_eq!(rfc3339(1_796_637_300_123), "2026-12-07T09:55:00.123Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(known_time(0), None);
        assert_eq!(known_time(u64::MAX).as_deref(), Some("9999-12-31T23:59:59.999Z"));
    }

    #[test]
    fn a_message_survives_the_trip_through_json() {
        let m = Message {
            id: "abc".into(),
            author: "alice".into(),
            device: "phone".into(),
            text: "hi".into(),
            ts: 1_796_637_300_123,
            reply_to: Some("xyz".into()),
            edited: Some(1_796_637_301_000),
            deleted: false,
            reactions: BTreeMap::from([("👍".to_string(), vec!["bob".to_string()])]),
            attachments: Vec::new(),
            read_by: vec!["bob".into()],
        };
        let view = ChatMessage::new(ChatId([7; 16]), &m);
        let json = serde_json::to_string(&view).unwrap();
        let back: ChatMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(message_line(&back.message), message_line(&view.message));
        assert_eq!(back.message.edited.as_deref(), Some("2026-12-07T09:55:01.000Z"));
        let event = EventView::of(&Event::MessageAdded { chat: ChatId([7; 16]), message: m, local: false }).unwrap();
        let v = serde_json::to_value(&event).unwrap();
        assert_eq!((v["type"].as_str(), v["message"]["text"].as_str()), (Some("message_added"), Some("hi")));
    }
}
