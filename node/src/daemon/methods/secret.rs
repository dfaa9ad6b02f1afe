//! Secret chats, as the running session carries them (it stays reachable for the other device
//! and delivers what waits whenever it can): `secret_devices`, `secret_start`,
//! `secret_accept`, `secret_send`, `secret_messages`, `secret_read`, `secret_close`,
//! `secret_chats`, `secret_fingerprint`.

use serde::Deserialize;
use serde_json::{json, Value};
use stratus_engine::proto::cert::DeviceCert;
use stratus_engine::{AccountId, SecretId};

use super::{done, to_json, with, Ctx, Handler, Id, NoParams, Reply};
use crate::daemon::rpc::RpcError;
use crate::view::{rfc3339, SecretChatMessage, SecretChatView};

pub(super) const METHODS: &[(&str, Handler)] = &[
    ("secret_devices", secret_devices),
    ("secret_start", secret_start),
    ("secret_accept", secret_accept),
    ("secret_send", secret_send),
    ("secret_messages", secret_messages),
    ("secret_read", secret_read),
    ("secret_close", secret_close),
    ("secret_chats", secret_chats),
    ("secret_fingerprint", secret_fingerprint),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Secret {
    secret: Id<SecretId>,
}

fn device_json(cert: &DeviceCert, online: bool) -> Value {
    json!({
        "account": cert.body.account.to_string(),
        "device": cert.body.device.0,
        "name": cert.body.name,
        "online": online,
        "created": rfc3339(i64::try_from(cert.body.created_ms).unwrap_or(i64::MAX)),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Account {
    account: Id<AccountId>,
}

fn secret_devices(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Account { account: Id(account) }| async move {
        let devices = cx.session().secret_devices(account).await?;
        Ok(Value::Array(devices.iter().map(|(c, on)| device_json(c, *on)).collect()))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Start {
    account: Id<AccountId>,
    /// The device's id or name; may be left out when the account has one device.
    device: Option<String>,
}

/// Starts a secret chat with one device of an account, its certificate checked by the session
/// (a client never hands the daemon a certificate to trust).
fn secret_start(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Start { account: Id(account), device }| async move {
        let devices = cx.session().secret_devices(account).await?;
        let chosen: Vec<_> = devices
            .iter()
            .filter(|(c, _)| device.as_ref().is_none_or(|w| c.body.device.0 == *w || c.body.name == *w))
            .collect();
        let [(cert, _)] = chosen[..] else {
            let all: Vec<Value> = devices.iter().map(|(c, on)| device_json(c, *on)).collect();
            return Err(RpcError::new(-32602, "choose_device", "choose one of the account's devices with \"device\"")
                .with("devices", all));
        };
        let id = cx.session().secret_start(cert.clone()).await?;
        Ok(json!({ "secret": id.to_string(), "device": cert.body.device.0 }))
    })
}

fn secret_accept(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Secret { secret: Id(id) }| async move {
        cx.session().secret_accept(id).await?;
        done()
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Send {
    secret: Id<SecretId>,
    text: String,
    ttl_s: Option<u32>,
}

fn secret_send(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Send { secret: Id(id), text, ttl_s }| async move {
        let m = cx.session().secret_send(id, &text, ttl_s).await?;
        to_json(SecretChatMessage::new(id, &m))
    })
}

fn secret_messages(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Secret { secret: Id(id) }| async move {
        let all = cx.session().secret_messages(id).await?;
        to_json(all.iter().map(|m| SecretChatMessage::new(id, m)).collect::<Vec<_>>())
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Read {
    secret: Id<SecretId>,
    up_to: String,
}

fn secret_read(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Read { secret: Id(id), up_to }| async move {
        cx.session().secret_read(id, &up_to).await?;
        done()
    })
}

fn secret_close(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Secret { secret: Id(id) }| async move {
        cx.session().secret_close(id).await?;
        done()
    })
}

fn secret_chats(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, NoParams {}| async move {
        let all = cx.session().secret_chats().await?;
        to_json(all.iter().map(SecretChatView::from).collect::<Vec<_>>())
    })
}

fn secret_fingerprint(cx: Ctx, p: Value) -> Reply {
    with(cx, p, |cx, Secret { secret: Id(id) }| async move {
        Ok(json!({ "fingerprint": cx.session().secret_fingerprint(id).await? }))
    })
}
