//! Commands run on the device's store: nobody else holds it. Each opens its own session (or its
//! own relay connection) for as long as it needs one.

use std::time::Duration;

use serde_json::json;
use stratus_engine::{ChatId, Device, Error, Event, LinkCode, Message, MessageOp, Session};

use crate::print::{self, out};
use crate::view::{known_time, rfc3339, ChatMessage, ChatRow};
use crate::{members, secret, AccountCommand, ChatCommand, Command, DeviceCommand, Failure, CONNECT_TRIES};

/// Runs a request signed with the account's keys; if the relay answers that a rotation replaced
/// them (`StaleEpoch`), syncs (which takes the new keys from the account log) and runs it again.
macro_rules! with_current_keys {
    ($device:ident, $request:expr) => {{
        let mut attempt = 1;
        loop {
            match $request {
                Err(stratus_engine::Error::Relay {
                    code: stratus_engine::proto::wire::ErrorCode::StaleEpoch, ..
                }) if attempt < $crate::CONNECT_TRIES => {
                    attempt += 1;
                    $device = $crate::local::sync_until_idle($device).await?;
                }
                result => break result?,
            }
        }
    }};
}
pub(crate) use with_current_keys;

pub(crate) async fn run(mut device: Device, command: Command, json: bool) -> Result<(), Failure> {
    match command {
        Command::Account { command: AccountCommand::Create { relay, name, invite } } => {
            let id = device.create_account_invited(&relay, &name, invite).await?;
            out(&if json { json!({ "account": id.to_string() }).to_string() } else { id.to_string() });
        }
        Command::Account { command: AccountCommand::SetRelay { addrs } } => {
            device.set_relay(&addrs.iter().map(String::as_str).collect::<Vec<_>>())?;
            let addrs = device.relay_addrs();
            out(&if json { json!({ "relay": addrs }).to_string() } else { format!("relay: {}", addrs.join(" ")) });
        }
        Command::Account { command: AccountCommand::SetSessionTtl { days } } => {
            device.set_session_ttl(days).await?;
            out(&match (json, days) {
                (true, d) => json!({ "session_ttl_days": d }).to_string(),
                (false, 0) => "sessions never expire".to_string(),
                (false, d) => format!("sessions inactive for more than {d} days end"),
            });
        }
        Command::Account { command: AccountCommand::RecoveryKey } => {
            let key = with_current_keys!(device, device.create_recovery_key().await);
            out(&if json {
                json!({ "recovery_key": key.to_string() }).to_string()
            } else {
                format!("recovery key: {key}")
            });
            eprintln!("stratus: write it down and keep it safe; it is not stored anywhere and logs anyone in");
        }
        Command::Account { command: AccountCommand::Recover { relay, name } } => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map_err(|e| Failure::Other(format!("reading the key: {e}")))?;
            let key: stratus_engine::proto::crypto::RecoveryKey =
                line.trim().parse().map_err(|_| Failure::Other("not a recovery key (stratus-recovery-…)".into()))?;
            let id = device.recover(&relay, &name, &key).await?;
            if !json {
                out(&format!("recovered account {id}; pulling history"));
            }
            let device = sync_until_idle(device).await?;
            let chats = device_chats(device)?;
            out(&match json {
                true => json!({ "account": id.to_string(), "chats": chats }).to_string(),
                false => format!("history pulled: {chats} chats"),
            });
        }
        Command::Device { command: DeviceCommand::Link { relay, name } } => {
            if let Some(a) = device.account() {
                return Err(Error::AlreadyLoggedIn(a.to_string()).into());
            }
            let code = device.link_code()?;
            out(&if json {
                json!({ "link_code": code.to_string() }).to_string()
            } else {
                format!("link code: {code}")
            });
            let id = device.link(&relay, &name, &code).await?;
            if !json {
                out(&format!("linked to account {id}; pulling history"));
            }
            let device = sync_until_idle(device).await?;
            let chats = device_chats(device)?;
            out(&match json {
                true => json!({ "account": id.to_string(), "chats": chats }).to_string(),
                false => format!("history pulled: {chats} chats"),
            });
        }
        Command::Device { command: DeviceCommand::Approve { code } } => {
            let code: LinkCode = code.parse()?;
            let (id, name) = with_current_keys!(device, device.approve(&code).await);
            out(&match json {
                true => json!({ "approved": id.to_string(), "name": name }).to_string(),
                false => format!("approved {id} ({name})"),
            });
        }
        Command::Device { command: DeviceCommand::List } => {
            for cert in device.devices()? {
                let this = cert.body.device == *device.id();
                let created = rfc3339(i64::try_from(cert.body.created_ms).unwrap_or(i64::MAX));
                out(&match json {
                    true => json!({
                        "device": cert.body.device.to_string(),
                        "name": cert.body.name,
                        "created": created,
                        "this": this,
                    })
                    .to_string(),
                    false => {
                        format!("{} {}{}", cert.body.device, cert.body.name, if this { " (this device)" } else { "" })
                    }
                });
            }
        }
        Command::Devices => {
            let (sessions, ttl) = device.sessions().await?;
            if !json {
                match ttl {
                    0 => out("sessions never expire (set with `stratus account set-session-ttl DAYS`)"),
                    d => out(&format!("sessions inactive for more than {d} days end")),
                }
            }
            for s in sessions {
                let created = s.created_ms.and_then(known_time).or_else(|| known_time(s.registered_ms));
                if json {
                    out(&crate::view::session_json(&s).to_string());
                } else {
                    let unknown = || "unknown".to_string();
                    let active = if s.online {
                        "online now".to_string()
                    } else {
                        known_time(s.last_active_ms).unwrap_or_else(unknown)
                    };
                    out(&format!(
                        "{} {}  created {}  last active {}{}",
                        s.device,
                        s.name.as_deref().unwrap_or("(not yet synced)"),
                        created.unwrap_or_else(unknown),
                        active,
                        if s.this_device { "  (this device)" } else { "" }
                    ));
                }
            }
        }
        Command::Device { command: DeviceCommand::Revoke { device: which } } => {
            let (sessions, _) = device.sessions().await?;
            let matches: Vec<_> =
                sessions.iter().filter(|s| s.device.0 == which || s.name.as_deref() == Some(which.as_str())).collect();
            let target = match matches[..] {
                [one] => one.device.clone(),
                [] => return Err(Failure::Other(format!("no session {which}; see `stratus devices`"))),
                _ => return Err(Failure::Other(format!("{which} names several sessions; use the device id"))),
            };
            if target == *device.id() {
                return Err(Failure::Other("this is this device's own session".into()));
            }
            // The revocation rotates the account's keys for every device and chat the relay
            // has: sync first, and again if the account moved on meanwhile.
            device = sync_until_idle(device).await?;
            with_current_keys!(device, device.revoke(&target).await);
            out(&match json {
                true => json!({ "revoked": target.to_string() }).to_string(),
                false => format!("revoked {target}; the account's keys are rotated"),
            });
        }
        Command::Chat { command: ChatCommand::Create { title, direct, group, member } } => {
            let chat = members::create_chat(device, title, direct, group, member).await?;
            print::chat_created(json, &chat.to_string());
        }
        Command::Chat { command: ChatCommand::Add { chat, users, share_history } } => {
            members::add(device, chat, users, share_history).await?;
        }
        Command::Chat { command: ChatCommand::Remove { chat, user } } => members::remove(device, chat, user).await?,
        Command::Chat { command: ChatCommand::Leave { chat } } => members::leave(device, chat).await?,
        Command::Chat { command: ChatCommand::Rename { chat, title } } => {
            device.account().ok_or(Error::NotLoggedIn)?;
            device.rename_local(chat, &title)?;
            sync_until_idle(device).await?;
        }
        Command::Account { command: AccountCommand::SetUsername { name, clear: _ } } => {
            device.set_username(name.as_deref()).await?;
            out(&match (json, name) {
                (true, n) => json!({ "username": n }).to_string(),
                (false, Some(n)) => format!("username: {n}"),
                (false, None) => "username released".into(),
            });
        }
        Command::Contact { command } => members::contact(device, command, json).await?,
        Command::Secret { command } => secret::secret(device, command, json).await?,
        Command::Chat { command: ChatCommand::List } => {
            let rows: Vec<ChatRow> = device.chats()?;
            print::chats(json, &rows);
        }
        Command::Send { chat, text } => {
            device.account().ok_or(Error::NotLoggedIn)?;
            let (msg, _) = device.compose(chat, &text)?;
            sync_until_idle(device).await?;
            print::written(json, &ChatMessage::new(chat, &msg), true);
        }
        Command::Reply { chat, message, text } => {
            let m = write_and_sync(device, chat, MessageOp::Send { text, reply_to: Some(message) }).await?;
            print::written(json, &ChatMessage::new(chat, &m), true);
        }
        Command::Edit { chat, message, text } => {
            let m = write_and_sync(device, chat, MessageOp::Edit { id: message, text }).await?;
            print::written(json, &ChatMessage::new(chat, &m), false);
        }
        Command::Delete { chat, message } => {
            let m = write_and_sync(device, chat, MessageOp::Delete { id: message }).await?;
            print::written(json, &ChatMessage::new(chat, &m), false);
        }
        Command::React { chat, message, reaction, remove } => {
            let m = write_and_sync(device, chat, MessageOp::React { id: message, reaction, add: !remove }).await?;
            print::written(json, &ChatMessage::new(chat, &m), false);
        }
        Command::Read { chat, message } => {
            let last = device.messages(chat)?.last().map(|m| m.id.clone());
            let Some(id) = message.or(last) else { return Ok(()) };
            let m = write_and_sync(device, chat, MessageOp::Read { id }).await?;
            print::written(json, &ChatMessage::new(chat, &m), false);
        }
        Command::Typing { chat } => {
            device.account().ok_or(Error::NotLoggedIn)?;
            device.messages(chat)?;
            let mut session = Session::start(device)?;
            let mut events = session.events();
            wait_for(&mut events, |e| matches!(e, Event::Connected)).await?;
            if !session.typing(chat).await? {
                return Err(Failure::Unreachable("the relay connection dropped".into()));
            }
            // `typing` answers once the frame is written to the stream.
            session.stop().await?;
        }
        Command::Sync => {
            device.account().ok_or(Error::NotLoggedIn)?;
            let device = sync_until_idle(device).await?;
            print::synced(json, device_chats(device)?);
        }
        Command::Log { chat } => {
            let all: Vec<ChatMessage> = device.messages(chat)?.iter().map(|m| ChatMessage::new(chat, m)).collect();
            print::messages(json, &all);
        }
        Command::Watch { .. } | Command::Daemon { .. } => unreachable!("run by `serve`"),
    }
    Ok(())
}

/// Carries out a message operation here and waits until the relay has it.
async fn write_and_sync(mut device: Device, chat: ChatId, op: MessageOp) -> Result<Message, Failure> {
    device.account().ok_or(Error::NotLoggedIn)?;
    let (message, _) = device.write_local(chat, &op)?;
    sync_until_idle(device).await?;
    Ok(message)
}

pub(crate) fn device_chats(mut device: Device) -> Result<usize, Failure> {
    Ok(device.chats()?.len())
}

/// Runs a session until the outbox is empty and the device is caught up. Fails with
/// `Unreachable` if the relay cannot be reached.
pub(crate) async fn sync_until_idle(device: Device) -> Result<Device, Failure> {
    let mut session = Session::start(device)?;
    let mut events = session.events();
    wait_for(&mut events, |e| matches!(e, Event::Idle)).await?;
    session.stop().await.map_err(Failure::from)
}

/// Waits for an event matching `done`. A disconnection before it is `Unreachable`; a delta the
/// relay rejected is an error.
async fn wait_for(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    done: impl Fn(&Event) -> bool,
) -> Result<(), Failure> {
    use tokio::sync::broadcast::error::RecvError;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut failures = 0;
    loop {
        let e = match tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| Failure::Other("timed out waiting for the relay".into()))?
        {
            Ok(e) => e,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return Err(Failure::Other("the sync session stopped".into())),
        };
        if done(&e) {
            return Ok(());
        }
        match e {
            // A stream can be dropped at open when many devices connect at once; give the
            // session's reconnect a few tries before calling the relay unreachable.
            Event::Disconnected { reason } => {
                failures += 1;
                if failures >= CONNECT_TRIES {
                    return Err(Failure::Unreachable(reason));
                }
            }
            Event::Connected => failures = 0,
            Event::Rejected { message, code, .. } => return Err(rejected(&message, &format!("{code:?}"))),
            Event::Error { message } => eprintln!("stratus: {message}"),
            Event::SessionRevoked => return Err(Error::SessionRevoked.into()),
            Event::SessionRefused => return Err(Error::SessionRefused.into()),
            Event::VersionRefused { message } => return Err(Error::VersionRefused(message).into()),
            Event::Refused { code, message } => return Err(refused(&message, &format!("{code:?}"))),
            _ => {}
        }
    }
}

/// The relay's operator refuses this account (suspended, banned or deleted).
pub(crate) fn refused(message: &str, code: &str) -> Failure {
    Failure::Other(format!("the relay refuses this account: {message} ({code})"))
}

/// The relay refused a delta for good.
pub(crate) fn rejected(message: &str, code: &str) -> Failure {
    Failure::Other(format!("the relay rejected a message: {message} ({code})"))
}
