//! What each command prints, whether it ran on the store or through the daemon: both paths end
//! here with the same views (`view.rs`). `--json` prints one JSON object per line; a command
//! that makes an id prints the id alone (human) or an object holding it (`--json`).

use std::io::Write;

use serde::Serialize;
use serde_json::json;

use crate::view::{message_line, secret_line, ChatMessage, ChatRow, EventView, SecretChatMessage, SecretChatView};
use crate::Failure;

/// Writes one line to standard output (flushed: scripts and tests read it as it comes).
pub(crate) fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

/// One JSON object as a line.
pub(crate) fn json_line(v: &impl Serialize) -> String {
    serde_json::to_string(v).expect("plain data always serializes")
}

/// A message this device wrote: its id alone (`send`, `reply`) or nothing (`edit`, `delete`,
/// `react`, `read`); with `--json` the message as it now is.
pub(crate) fn written(json: bool, m: &ChatMessage, print_id: bool) {
    if json {
        out(&json_line(m));
    } else if print_id {
        out(&m.message.id);
    }
}

pub(crate) fn messages(json: bool, all: &[ChatMessage]) {
    for m in all {
        out(&if json { json_line(m) } else { message_line(&m.message) });
    }
}

pub(crate) fn chat_created(json: bool, chat: &str) {
    out(&if json { json!({ "chat": chat }).to_string() } else { chat.to_string() });
}

pub(crate) fn chats(json: bool, rows: &[ChatRow]) {
    for c in rows {
        if json {
            out(&json_line(c));
            continue;
        }
        let title = match c.title.as_deref() {
            Some(t) if !t.is_empty() => t.to_string(),
            _ if !c.members.is_empty() => c.members.join(", "),
            _ => "(untitled)".into(),
        };
        let left = if c.left { ", left" } else { "" };
        out(&format!("{} {} [{}] ({} messages, {} unread{left})", c.id, title, c.kind, c.messages, c.unread));
    }
}

pub(crate) fn synced(json: bool, chats: usize) {
    out(&match json {
        true => json!({ "chats": chats, "outbox": 0 }).to_string(),
        false => format!("synced: {chats} chats, outbox empty"),
    });
}

pub(crate) fn secret_chats(json: bool, all: &[SecretChatView]) {
    for c in all {
        out(&match json {
            true => json_line(c),
            false => format!("{} {} ({}) [{}]", c.id, c.device_name, c.account, c.state),
        });
    }
}

pub(crate) fn secret_messages(json: bool, all: &[SecretChatMessage]) {
    for m in all {
        out(&if json { json_line(m) } else { secret_line(m) });
    }
}

/// A secret message this device wrote: its id alone, or (`--json`) the message.
pub(crate) fn secret_written(json: bool, m: &SecretChatMessage) {
    out(&if json { json_line(m) } else { m.message.id.clone() });
}

/// A new secret chat's id.
pub(crate) fn secret_made(json: bool, key: &str, id: &str) {
    out(&if json { json!({ key: id }).to_string() } else { id.to_string() });
}

/// A secret chat's new state (`accepted`, `closed here`).
pub(crate) fn secret_state(json: bool, id: &str, state: &str) {
    out(&match json {
        true => json!({ "secret": id, "state": state }).to_string(),
        false => format!("{id}: {state}"),
    });
}

pub(crate) fn fingerprint(json: bool, id: &str, fingerprint: &str) {
    out(&match json {
        true => json!({ "secret": id, "fingerprint": fingerprint }).to_string(),
        false => format!("fingerprint: {fingerprint}"),
    });
}

/// Which events a command shows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shown {
    /// `watch`: messages from other devices, typing, read marks and secret chats on standard
    /// output; the connection's state on standard error.
    Everything,
    /// `secret listen`: secret chats only.
    Secret,
    /// `daemon`: the connection's state on standard error, nothing on standard output.
    State,
}

/// Prints an event as `shown` says. A revoked session is an error: the command ends.
pub(crate) fn event(e: &EventView, json: bool, shown: Shown) -> Result<(), Failure> {
    use EventView as E;
    let all = shown == Shown::Everything;
    let state = shown != Shown::Secret;
    let secret = shown != Shown::State;
    match e {
        E::SessionRevoked => return Err(stratus_engine::Error::SessionRevoked.into()),
        E::SessionRefused => return Err(stratus_engine::Error::SessionRefused.into()),
        E::MessageAdded { message, local: false } | E::MessageChanged { message, local: false } if all => {
            out(&if json { json_line(message) } else { message_line(&message.message) })
        }
        E::Typing { chat, account, device } if all => out(&match json {
            true => json!({ "chat": chat, "typing": account, "device": device }).to_string(),
            false => format!("{account} is typing in {chat}"),
        }),
        E::Read { chat, account, up_to } if all => out(&match json {
            true => json!({ "chat": chat, "read": account, "up_to": up_to }).to_string(),
            false => format!("read by {account} up to {up_to}"),
        }),
        E::Disconnected { reason } if state => eprintln!("stratus: disconnected ({reason}); retrying"),
        E::Error { message } if state => eprintln!("stratus: {message}"),
        E::Refused { code, message } if state => {
            eprintln!("stratus: the relay refuses this account: {message} ({code}); retrying")
        }
        E::CaughtUp if state => eprintln!("stratus: caught up"),
        E::SecretMessage { message } if secret => {
            out(&if json { json_line(message) } else { format!("{} {}", message.secret, secret_line(message)) })
        }
        E::SecretOffered { secret: id, account, device, device_name } if secret => out(&match json {
            true => {
                json!({ "secret": id, "offered_by": account, "device": device, "device_name": device_name }).to_string()
            }
            false => format!("{id}: offered by {device_name} ({account}); `secret accept` it"),
        }),
        E::SecretLinked { secret: id } if secret => eprintln!("stratus: {id}: linked with the other device"),
        E::SecretClosed { secret: id } if secret => out(&match json {
            true => json!({ "secret": id, "closed": true }).to_string(),
            false => format!("{id}: closed"),
        }),
        E::SecretExpired { secret: id, message } if secret => out(&match json {
            true => json!({ "secret": id, "disappeared": message }).to_string(),
            false => format!("{id}: message {message} disappeared"),
        }),
        _ => {}
    }
    Ok(())
}
