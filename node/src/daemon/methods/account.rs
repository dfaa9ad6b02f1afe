//! The account, its devices and sessions, the directory and chat members, as the running
//! session carries them out over its own connection while it syncs: `approve`, `devices`,
//! `sessions`, `revoke`, `set_session_ttl`, `recovery_key`, `set_username`, `lookup`,
//! `confirm_contact`, `invite`, `accept_contact`, `invitations`, `add_members`,
//! `remove_member`, `leave_chat`, `rename_chat`, `create_chat_with`.

use serde::Deserialize;
use serde_json::{json, Value};
use stratus_engine::proto::directory::Membership;
use stratus_engine::proto::wire::ChatKind;
use stratus_engine::{AccountId, ChatId, LinkCode};

use super::{done, to_json, with, Ctx, Handler, Id, NoParams, Reply};
use crate::daemon::rpc::RpcError;
use crate::view::{rfc3339, session_json};

pub(super) const METHODS: &[(&str, Handler)] = &[
    ("approve", approve),
    ("devices", devices),
    ("sessions", sessions),
    ("revoke", revoke),
    ("set_session_ttl", set_session_ttl),
    ("recovery_key", recovery_key),
    ("set_username", set_username),
    ("lookup", lookup),
    ("confirm_contact", confirm_contact),
    ("invite", invite),
    ("accept_contact", accept_contact),
    ("invitations", invitations),
    ("add_members", add_members),
    ("remove_member", remove_member),
    ("leave_chat", leave_chat),
    ("rename_chat", rename_chat),
    ("create_chat_with", create_chat_with),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Code {
    code: Id<LinkCode>,
}

fn approve(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Code { code: Id(code) }| async move {
        let (id, name) = cx.session().approve(&code).await?;
        Ok(json!({ "approved": id.to_string(), "name": name }))
    })
}

fn devices(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, NoParams {}| async move {
        let certs = cx.session().devices().await?;
        Ok(Value::Array(
            certs
                .iter()
                .map(|c| {
                    json!({
                        "device": c.body.device.to_string(),
                        "name": c.body.name,
                        "created": rfc3339(i64::try_from(c.body.created_ms).unwrap_or(i64::MAX)),
                    })
                })
                .collect(),
        ))
    })
}

fn sessions(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, NoParams {}| async move {
        let (sessions, ttl) = cx.session().sessions().await?;
        let list: Vec<Value> = sessions.iter().map(session_json).collect();
        Ok(json!({ "session_ttl_days": ttl, "sessions": list }))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Which {
    /// A device id or a session's name.
    device: String,
}

fn revoke(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Which { device: which }| async move {
        let (sessions, _) = cx.session().sessions().await?;
        let matches: Vec<_> =
            sessions.iter().filter(|s| s.device.0 == which || s.name.as_deref() == Some(which.as_str())).collect();
        let target = match matches[..] {
            [one] if one.this_device => return Err(RpcError::bad_params("this is this device's own session")),
            [one] => one.device.clone(),
            [] => return Err(RpcError::bad_params(format!("no session {which}"))),
            _ => return Err(RpcError::bad_params(format!("{which} names several sessions; use the device id"))),
        };
        cx.session().revoke(target.clone()).await?;
        Ok(json!({ "revoked": target.to_string() }))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Days {
    days: u32,
}

fn set_session_ttl(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Days { days }| async move {
        cx.session().set_session_ttl(days).await?;
        Ok(json!({ "session_ttl_days": days }))
    })
}

fn recovery_key(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, NoParams {}| async move {
        let key = cx.session().create_recovery_key().await?;
        Ok(json!({ "recovery_key": key.to_string() }))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Username {
    /// `null` releases it.
    name: Option<String>,
}

fn set_username(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Username { name }| async move {
        cx.session().set_username(name.as_deref()).await?;
        Ok(json!({ "username": name }))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct User {
    user: String,
}

fn lookup(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, User { user }| async move { to_json(cx.session().lookup(&user, None).await?) })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Confirm {
    user: String,
    number: String,
}

fn confirm_contact(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Confirm { user, number }| async move { to_json(cx.session().lookup(&user, Some(&number)).await?) })
}

fn invite(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, User { user }| async move {
        let account = account_of(&cx, &user).await?;
        cx.session().invite(account).await?;
        done()
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptContact {
    /// A username, or an account id.
    who: String,
    accept: bool,
}

fn accept_contact(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, AcceptContact { who, accept }| async move {
        let account = match who.parse::<AccountId>() {
            Ok(id) => id,
            Err(_) => account_of(&cx, &who).await?,
        };
        cx.session().accept_chats_from(account, accept).await?;
        done()
    })
}

fn invitations(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, NoParams {}| async move {
        let from = cx.session().invitations().await?;
        Ok(Value::Array(from.into_iter().map(|(a, at)| json!({ "account": a.to_string(), "at_ms": at })).collect()))
    })
}

/// The account `user` names in the directory (pinned on first use).
async fn account_of(cx: &Ctx, user: &str) -> Result<AccountId, RpcError> {
    let info = cx.session().lookup(user, None).await?;
    info.account
        .parse()
        .map_err(|_| RpcError::new(-32603, "internal", format!("the directory gave a bad id for {user}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    chat: Id<ChatId>,
    users: Vec<String>,
    #[serde(default)]
    share_history: bool,
}

fn add_members(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Add { chat: Id(chat), users, share_history }| async move {
        let mut accounts = std::collections::BTreeSet::new();
        for u in &users {
            let info = cx.session().lookup(u, None).await?;
            if info.accepts_you == Some(false) {
                return Err(stratus_engine::Error::NotAccepted(u.clone()).into());
            }
            accounts.insert(account_of(&cx, u).await?);
        }
        cx.session().change_members(chat, Membership::Add { accounts, share_history }).await?;
        done()
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Remove {
    chat: Id<ChatId>,
    user: String,
}

fn remove_member(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Remove { chat: Id(chat), user }| async move {
        let account = account_of(&cx, &user).await?;
        cx.session().change_members(chat, Membership::Remove { account }).await?;
        done()
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Chat {
    chat: Id<ChatId>,
}

fn leave_chat(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Chat { chat: Id(chat) }| async move {
        cx.session().change_members(chat, Membership::Leave).await?;
        done()
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rename {
    chat: Id<ChatId>,
    title: String,
}

fn rename_chat(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Rename { chat: Id(chat), title }| async move {
        cx.session().rename(chat, &title).await?;
        done()
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct With {
    /// `direct` (one user) or `group`.
    kind: String,
    #[serde(default)]
    title: String,
    users: Vec<String>,
}

fn create_chat_with(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, With { kind, title, users }| async move {
        let kind = match kind.as_str() {
            "direct" if users.len() == 1 => ChatKind::Direct,
            "direct" => return Err(RpcError::bad_params("a direct chat is with one user")),
            "group" => ChatKind::Group,
            other => return Err(RpcError::bad_params(format!("kind {other:?} is not direct or group"))),
        };
        let chat = cx.session().create_chat_with(kind, &title, &users).await?;
        Ok(json!({ "chat": chat.to_string() }))
    })
}
