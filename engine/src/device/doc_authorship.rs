//! Authorship: what a change from outside may do to a chat's document, given the account and
//! device that sent it.
//!
//! Every member holds the chat's key, so the seal alone says only that *a* member wrote a
//! change. The relay stamps each delta with the sending device and its account (the seal binds
//! both), and each change is checked against them before Automerge sees it:
//!
//! * its Automerge actor is the sending device's ([`device_actor`]);
//! * a new message names that account as `author` and that device as `device`, and its `id`
//!   begins with the device's [`message_id_prefix`] (so no member can make a message that
//!   another's edits, reactions or replies would be mistaken for);
//! * only the author's account edits (`text`, `edited`), deletes (`deleted`, emptying
//!   `attachments`) its messages;
//! * a reaction key names the sending account, a read mark the sending account and device;
//! * any member may set the `title`;
//! * nothing else: no other keys, no removing messages from the list, no new containers but a
//!   message and its attachment list.
//!
//! A change that breaks a rule is refused whole ([`DocError::Forbidden`]). The rules read only
//! the change and facts that never change once made (the genesis containers, a message's
//! author), so every device decides alike, whatever order concurrent changes came in.

use std::collections::{BTreeSet, HashMap};

use automerge::{Change, ObjId, ObjType, Prop, ReadDoc, ScalarValue};
use serde::{Deserialize, Serialize};

use super::{device_actor, guarded, ChatDoc, DocError, MAX_REACTION_BYTES};
use crate::proto::ids::{AccountId, DeviceId};

/// Who sent a change from outside: the account and device the relay stamped on its delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Author {
    /// The sending device's account.
    pub account: AccountId,
    /// The sending device.
    pub device: DeviceId,
}

/// The first 8 bytes of every message id a device makes: from its actor, so that ids made on
/// different devices never collide (see the module docs).
pub(crate) fn message_id_prefix(device: &DeviceId) -> [u8; 8] {
    device_actor(device).to_bytes()[..8].try_into().expect("an actor is 16 bytes")
}

/// What an operation does, as far as the rules care.
enum Act {
    MakeMap,
    MakeList,
    Delete,
    Str(String),
    Int,
    True,
    Other,
}

/// What an operation's object is, as far as the rules care.
#[derive(Debug, Clone)]
enum Target {
    Root,
    Messages,
    Read,
    Reactions,
    /// A message made earlier in this change.
    NewMessage,
    /// A message's attachment list made earlier in this change.
    NewAttachments,
    /// A message already in the document, with its author.
    Message(String),
    /// The attachment list of a message already in the document, with the message's author.
    Attachments(String),
}

/// What a change from outside touches, as its authorship check reads it: what its application
/// reports ([`super::DocUpdate`]) comes from this rather than from Automerge's patches, whose
/// paths cost a walk up the document for every operation.
#[derive(Debug, Default)]
pub(super) struct Touched {
    /// The messages it makes (their objects, `"counter@actor"`), in the change's order.
    pub new_messages: Vec<String>,
    /// Messages already in the document that it edits or deletes (their objects).
    pub messages: BTreeSet<String>,
    /// Attachment lists of messages already in the document that it changes (their objects).
    pub attachments: BTreeSet<String>,
    /// Ids of the messages it reacts to, or takes a reaction back from.
    pub reacted: BTreeSet<String>,
    /// Accounts whose read mark it moves.
    pub readers: BTreeSet<String>,
}

impl Touched {
    pub(super) fn extend(&mut self, other: Touched) {
        self.new_messages.extend(other.new_messages);
        self.messages.extend(other.messages);
        self.attachments.extend(other.attachments);
        self.reacted.extend(other.reacted);
        self.readers.extend(other.readers);
    }
}

impl ChatDoc {
    /// Checks `change` (from outside, its dependencies applied, its actor `from`'s device's)
    /// against the rules in the module docs; returns what it touches.
    pub(super) fn check_authorship(&self, change: &Change, from: &Author) -> Result<Touched, DocError> {
        let expanded = guarded(|| change.decode()).ok_or(DocError::Panicked)?;
        let account = from.account.to_string();
        let read_key = format!("{account} {}", from.device.0);
        let id_prefix = hex::encode(message_id_prefix(&from.device));
        let start = change.start_op().get();
        // What each object the change names is: made earlier in the change, or resolved once.
        let mut targets: HashMap<String, Target> = HashMap::new();
        let mut touched = Touched::default();
        for (i, op) in expanded.operations.iter().enumerate() {
            let obj = op.obj.to_string();
            let target = match targets.get(&obj) {
                Some(t) => t.clone(),
                None => {
                    let t = self.resolve(&obj)?;
                    targets.insert(obj.clone(), t.clone());
                    t
                }
            };
            // Automerge names the types of an operation's action and key only through serde.
            let text = |v: serde_json::Result<serde_json::Value>| match v {
                Ok(serde_json::Value::String(s)) => Ok(s),
                _ => Err(DocError::Forbidden("has an unreadable operation")),
            };
            let key = match op.key.is_map_key() {
                true => Some(text(serde_json::to_value(&op.key))?),
                false => None,
            };
            let key = key.as_deref();
            let action = text(serde_json::to_value(&op.action))?;
            let act = match (action.as_str(), op.primitive_value()) {
                ("makeMap", _) => Act::MakeMap,
                ("makeList", _) => Act::MakeList,
                ("del", _) => Act::Delete,
                ("set", Some(ScalarValue::Str(s))) => Act::Str(s.to_string()),
                ("set", Some(ScalarValue::Int(_))) => Act::Int,
                ("set", Some(ScalarValue::Boolean(true))) => Act::True,
                _ => Act::Other,
            };
            let mine = |owner: &str| owner == account;
            let new = match (&target, key, &act, op.insert) {
                (Target::Root, Some("title"), Act::Str(_), false) => None,
                (Target::Messages, None, Act::MakeMap, true) => Some(Target::NewMessage),
                (Target::NewMessage, Some("id"), Act::Str(id), false)
                    if id.len() == 32 && id.starts_with(&id_prefix) && id.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    None
                }
                (Target::NewMessage, Some("author"), Act::Str(a), false) if a == &account => None,
                (Target::NewMessage, Some("device"), Act::Str(d), false) if d == &from.device.0 => None,
                (Target::NewMessage, Some("text" | "reply_to"), Act::Str(_), false) => None,
                (Target::NewMessage, Some("ts"), Act::Int, false) => None,
                (Target::NewMessage, Some("attachments"), Act::MakeList, false) => Some(Target::NewAttachments),
                (Target::NewAttachments, None, Act::Str(_), true) => None,
                (Target::Message(owner), Some("text"), Act::Str(_), false) if mine(owner) => None,
                (Target::Message(owner), Some("edited" | "deleted"), Act::Int, false) if mine(owner) => None,
                (Target::Attachments(owner), None, Act::Delete, false) if mine(owner) => None,
                (Target::Read, Some(k), Act::Int, false) if k == read_key => None,
                (Target::Reactions, Some(k), Act::True | Act::Delete, false) if reaction_by(k) == Some(&account) => {
                    None
                }
                (target, ..) => return Err(DocError::Forbidden(refusal(target))),
            };
            match (&target, key) {
                (Target::Message(_), _) => {
                    touched.messages.insert(obj);
                }
                (Target::Attachments(_), _) => {
                    touched.attachments.insert(obj);
                }
                (Target::Read, Some(_)) => {
                    touched.readers.insert(account.clone());
                }
                (Target::Reactions, Some(k)) => {
                    touched.reacted.extend(k.split_once(' ').map(|(id, _)| id.to_string()));
                }
                _ => {}
            }
            if let Some(t) = new {
                let made = format!("{}@{}", start + i as u64, change.actor_id());
                if matches!(t, Target::NewMessage) {
                    touched.new_messages.push(made.clone());
                }
                targets.insert(made, t);
            }
        }
        Ok(touched)
    }

    /// What the object named `obj` (`"_root"` or `"counter@actor"`, not made in the change at
    /// hand) is in this document.
    fn resolve(&self, obj: &str) -> Result<Target, DocError> {
        const OUTSIDE: DocError = DocError::Forbidden("changes an object outside the chat's layout");
        let Some(Ok((id, typ))) = guarded(|| self.doc.import(obj)) else { return Err(OUTSIDE) };
        if id == ObjId::Root {
            return Ok(Target::Root);
        }
        let list = self.messages_obj();
        if Some(&id) == list.as_ref() {
            return Ok(Target::Messages);
        }
        if Some(&id) == self.read_obj().as_ref() {
            return Ok(Target::Read);
        }
        if Some(&id) == self.root_map("reactions").as_ref() {
            return Ok(Target::Reactions);
        }
        let parent = |of: &ObjId| self.doc.parents(of).ok().and_then(|mut p| p.next());
        let author = |m: &ObjId| self.str_at(m, "author").unwrap_or_default();
        match (typ, parent(&id)) {
            (ObjType::Map, Some(p)) if Some(&p.obj) == list.as_ref() => Ok(Target::Message(author(&id))),
            (ObjType::List, Some(p)) if p.prop == Prop::Map("attachments".into()) => match parent(&p.obj) {
                Some(pp) if Some(&pp.obj) == list.as_ref() => Ok(Target::Attachments(author(&p.obj))),
                _ => Err(OUTSIDE),
            },
            _ => Err(OUTSIDE),
        }
    }
}

/// The account a reaction key (`"<message id> <account> <reaction>"`) names, if it is well
/// formed.
fn reaction_by(key: &str) -> Option<&str> {
    let mut parts = key.splitn(3, ' ');
    let (id, account, reaction) = (parts.next()?, parts.next()?, parts.next()?);
    let well_formed = !id.is_empty()
        && !reaction.is_empty()
        && reaction.len() <= MAX_REACTION_BYTES
        && !reaction.chars().any(char::is_whitespace);
    well_formed.then_some(account)
}

fn refusal(target: &Target) -> &'static str {
    match target {
        Target::Root => "sets a key of the chat other than its title",
        Target::Messages => "removes or replaces a message",
        Target::Read => "moves a read mark not of the sending device",
        Target::Reactions => "reacts as another account",
        Target::NewMessage | Target::NewAttachments => "makes a message not of the sending device, or misshapen",
        Target::Message(_) | Target::Attachments(_) => {
            "changes another account's message, or a key of a message no edit or delete touches"
        }
    }
}
