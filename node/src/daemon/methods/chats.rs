//! Cloud chats and the session's state: `status`, `send`, `write`, `typing`, `create_chat`,
//! `chats`, `messages`, `heads`.

use serde::Deserialize;
use serde_json::{json, Value};
use stratus_engine::{ChatId, MessageOp};

use super::{to_json, with, Ctx, Handler, Id, NoParams, Reply};
use crate::daemon::rpc::RpcError;
use crate::view::ChatMessage;

pub(super) const METHODS: &[(&str, Handler)] = &[
    ("status", status),
    ("send", send),
    ("write", write),
    ("typing", typing),
    ("create_chat", create_chat),
    ("chats", chats),
    ("messages", messages),
    ("heads", heads),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Chat {
    chat: Id<ChatId>,
}

fn status(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, NoParams {}| async move {
        let s = cx.session().status().await?;
        Ok(json!({ "connected": s.connected, "caught_up": s.caught_up, "outbox": s.outbox }))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Send {
    chat: Id<ChatId>,
    text: String,
}

fn send(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Send { chat: Id(chat), text }| async move {
        let (m, seq) = cx.session().send(chat, &text).await?;
        Ok(json!({ "message": ChatMessage::new(chat, &m), "client_seq": seq.0 }))
    })
}

/// `write`'s params: the chat, what to do (`op`), and what that needs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Write {
    chat: Id<ChatId>,
    op: String,
    id: Option<String>,
    text: Option<String>,
    reply_to: Option<String>,
    reaction: Option<String>,
    add: Option<bool>,
}

impl Write {
    fn op(self) -> Result<MessageOp, RpcError> {
        let need = |what: Option<String>, name: &str| {
            what.ok_or_else(|| RpcError::bad_params(format!("op {:?} needs {name:?}", self.op)))
        };
        Ok(match self.op.as_str() {
            "send" => MessageOp::Send { text: need(self.text.clone(), "text")?, reply_to: self.reply_to.clone() },
            "edit" => MessageOp::Edit { id: need(self.id.clone(), "id")?, text: need(self.text.clone(), "text")? },
            "delete" => MessageOp::Delete { id: need(self.id.clone(), "id")? },
            "react" => MessageOp::React {
                id: need(self.id.clone(), "id")?,
                reaction: need(self.reaction.clone(), "reaction")?,
                add: self.add.unwrap_or(true),
            },
            "read" => MessageOp::Read { id: need(self.id.clone(), "id")? },
            other => {
                return Err(RpcError::bad_params(format!("op {other:?} is not one of send, edit, delete, react, read")))
            }
        })
    }
}

fn write(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, w: Write| async move {
        let chat = w.chat.0;
        let op = w.op()?;
        let (m, seq) = cx.session().write(chat, op).await?;
        Ok(json!({ "message": ChatMessage::new(chat, &m), "client_seq": seq.0 }))
    })
}

fn typing(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Chat { chat: Id(chat) }| async move {
        let sent = cx.session().typing(chat).await?;
        Ok(json!({ "sent": sent }))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateChat {
    title: String,
}

fn create_chat(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, CreateChat { title }| async move {
        let chat = cx.session().create_chat(&title).await?;
        Ok(json!({ "chat": chat.to_string() }))
    })
}

fn chats(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, NoParams {}| async move { to_json(cx.session().chats().await?) })
}

fn messages(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Chat { chat: Id(chat) }| async move {
        let all = cx.session().messages(chat).await?;
        to_json(all.iter().map(|m| ChatMessage::new(chat, m)).collect::<Vec<_>>())
    })
}

fn heads(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Chat { chat: Id(chat) }| async move { to_json(cx.session().heads(chat).await?) })
}
