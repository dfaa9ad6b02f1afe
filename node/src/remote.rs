//! Commands run through the daemon that holds the home's store: the same commands as
//! `local.rs`, asked of the daemon over its socket (docs/daemon.md), printed by the same
//! functions (`print.rs`). What the running session does not offer yet is answered by the
//! daemon with `not_available_in_daemon`, which the user sees.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::daemon::{self, rpc, rpc::RpcError};
use crate::print::{self, Shown};
use crate::view::{ChatMessage, ChatRow, EventView};
use crate::{secret, AccountCommand, ChatCommand, Command, DeviceCommand, Failure, CONNECT_TRIES};

/// The longest line taken from the daemon. Answers hold whole chats (`messages`), so this is
/// far above what a request may be; it only keeps a broken daemon from taking all memory.
const MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;
/// Events kept while waiting for an answer; the oldest go first.
const EVENT_BUFFER: usize = 4096;
/// How long a command waits for what it waits on (an acknowledgement, idle).
const WAIT: Duration = Duration::from_secs(600);
/// How long a command waits for an answer: the daemon answers every request within its
/// `REQUEST_TIMEOUT`, so a longer silence is a daemon that stopped working.
const ANSWER_WAIT: Duration = Duration::from_secs(daemon::REQUEST_TIMEOUT.as_secs() + 30);

/// A connection to the daemon.
pub(crate) struct Client {
    lines: FramedRead<OwnedReadHalf, LinesCodec>,
    write: OwnedWriteHalf,
    next_id: u64,
    /// Events that came while an answer was awaited, oldest first.
    events: VecDeque<EventView>,
}

/// The session's state (`status`).
#[derive(Deserialize)]
pub(crate) struct Status {
    pub connected: bool,
    pub caught_up: bool,
    pub outbox: usize,
}

/// What `send` and `write` answer.
#[derive(Deserialize)]
struct Written {
    message: ChatMessage,
    client_seq: u64,
}

impl Client {
    /// A connection to the daemon serving `home`, if one answers.
    pub(crate) async fn connect(home: &Path) -> Option<Client> {
        let stream = UnixStream::connect(daemon::socket_path(home)).await.ok()?;
        let (read, write) = stream.into_split();
        let lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_ANSWER_BYTES));
        Some(Client { lines, write, next_id: 1, events: VecDeque::new() })
    }

    /// Calls `method`: its result, or the daemon's typed error as it gave it.
    pub(crate) async fn call_raw(&mut self, method: &str, params: Value) -> Result<Result<Value, RpcError>, Failure> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = rpc::request(id, method, params);
        line.push('\n');
        // A daemon that refused the connection (another user, too many clients) has closed it
        // and left its reason to read: the write fails, the reading tells why.
        let written = self.write.write_all(line.as_bytes()).await;
        let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
        loop {
            let read = tokio::time::timeout_at(deadline, self.read())
                .await
                .map_err(|_| gone(&format!("it did not answer {method} within {} s", ANSWER_WAIT.as_secs())))?;
            let v = match (read, &written) {
                (Ok(v), _) => v,
                (Err(_), Err(e)) => return Err(gone(&e.to_string())),
                (Err(e), Ok(())) => return Err(e),
            };
            if v.get("method").and_then(Value::as_str) == Some("event") {
                self.buffer(&v);
                continue;
            }
            if let Some(e) = v.get("error") {
                // An error without our id: the daemon refused the connection itself.
                if v.get("id").and_then(Value::as_u64) == Some(id) || v.get("id").is_none_or(Value::is_null) {
                    return Ok(Err(RpcError::from_value(e)));
                }
            }
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                return Ok(Ok(v.get("result").cloned().unwrap_or(Value::Null)));
            }
        }
    }

    /// Calls `method` and reads its result as `T`; the daemon's error is the command's.
    pub(crate) async fn call<T: DeserializeOwned>(&mut self, method: &str, params: Value) -> Result<T, Failure> {
        read(self.call_raw(method, params).await?.map_err(failure)?)
    }

    /// Asks for an operation the running session does not offer yet: the daemon says so.
    pub(crate) async fn not_yet(&mut self, method: &str) -> Result<(), Failure> {
        self.call::<Value>(method, json!({})).await?;
        Err(Failure::Other(format!("this stratus cannot run {method} through the daemon; stop the daemon for it")))
    }

    pub(crate) async fn status(&mut self) -> Result<Status, Failure> {
        self.call("status", json!({})).await
    }

    /// From now on the session's events come too ([`Client::next_event`]).
    pub(crate) async fn subscribe(&mut self) -> Result<(), Failure> {
        self.call::<Value>("subscribe", json!({})).await.map(drop)
    }

    /// The next event (after [`Client::subscribe`]).
    pub(crate) async fn next_event(&mut self) -> Result<EventView, Failure> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(e);
            }
            let v = self.read().await?;
            match v.get("method").and_then(Value::as_str) {
                Some("event") => self.buffer(&v),
                Some("lagged") => eprintln!("stratus: {} events skipped (output too slow)", v["params"]["skipped"]),
                _ => {}
            }
        }
    }

    fn buffer(&mut self, v: &Value) {
        // An event kind this build does not know is skipped.
        if let Ok(e) = serde_json::from_value(v["params"].clone()) {
            if self.events.len() == EVENT_BUFFER {
                self.events.pop_front();
            }
            self.events.push_back(e);
        }
    }

    async fn read(&mut self) -> Result<Value, Failure> {
        match self.lines.next().await {
            Some(Ok(line)) => serde_json::from_str(&line).map_err(|e| gone(&format!("it sent a bad line: {e}"))),
            Some(Err(e)) => Err(gone(&e.to_string())),
            None => Err(gone("it closed the connection")),
        }
    }

    /// Waits for an event `done` accepts (subscribed before what it waits on was asked for).
    /// A disconnection from the relay before it is `Unreachable` (the daemon keeps what was
    /// written and sends it later); a delta the relay refused is an error.
    async fn wait_for(&mut self, done: impl Fn(&EventView) -> bool) -> Result<EventView, Failure> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut failures = 0;
        loop {
            let e = tokio::time::timeout_at(deadline, self.next_event())
                .await
                .map_err(|_| Failure::Other("timed out waiting for the relay".into()))??;
            if done(&e) {
                return Ok(e);
            }
            match e {
                EventView::Disconnected { reason } => {
                    failures += 1;
                    if failures >= CONNECT_TRIES {
                        return Err(Failure::Unreachable(reason));
                    }
                }
                EventView::Connected => failures = 0,
                EventView::Error { message } => eprintln!("stratus: {message}"),
                EventView::SessionRevoked => return Err(stratus_engine::Error::SessionRevoked.into()),
                EventView::SessionRefused => return Err(stratus_engine::Error::SessionRefused.into()),
                EventView::Refused { code, message } => return Err(crate::local::refused(&message, &code)),
                _ => {}
            }
        }
    }

    /// Waits until the relay has the delta `w` made.
    async fn acked(&mut self, w: &Written) -> Result<(), Failure> {
        let (chat, seq) = (w.message.chat.clone(), w.client_seq);
        let answer = self
            .wait_for(|e| match e {
                EventView::Acked { chat: c, client_seq, .. } => *c == chat && *client_seq == seq,
                EventView::Rejected { chat: c, client_seq, .. } => *c == chat && *client_seq == seq,
                _ => false,
            })
            .await?;
        match answer {
            EventView::Rejected { message, code, .. } => Err(crate::local::rejected(&message, &code)),
            _ => Ok(()),
        }
    }

    /// Waits until the device is connected, caught up and its outbox empty.
    async fn idle(&mut self) -> Result<(), Failure> {
        let s = self.status().await?;
        if s.connected && s.caught_up && s.outbox == 0 {
            return Ok(());
        }
        self.wait_for(|e| matches!(e, EventView::Idle)).await.map(drop)
    }
}

/// The daemon's answer as `T`.
pub(crate) fn read<T: DeserializeOwned>(v: Value) -> Result<T, Failure> {
    serde_json::from_value(v)
        .map_err(|e| Failure::Other(format!("the daemon answered what this stratus cannot read: {e}")))
}

/// The daemon's error as the command's: the relay unreachable exits 3, like without a daemon.
pub(crate) fn failure(e: RpcError) -> Failure {
    match e.kind.as_str() {
        "offline" | "unreachable" => Failure::Unreachable(e.message),
        _ => Failure::Other(e.message),
    }
}

fn gone(why: &str) -> Failure {
    Failure::Other(format!("lost the daemon serving this home: {why}"))
}

pub(crate) async fn run(c: &mut Client, command: Command, json: bool) -> Result<(), Failure> {
    match command {
        Command::Send { chat, text } => {
            c.subscribe().await?;
            let w: Written = c.call("send", json!({ "chat": chat.to_string(), "text": text })).await?;
            c.acked(&w).await?;
            print::written(json, &w.message, true);
        }
        Command::Reply { chat, message, text } => {
            let w = write(c, chat, json!({ "op": "send", "text": text, "reply_to": message })).await?;
            print::written(json, &w, true);
        }
        Command::Edit { chat, message, text } => {
            let w = write(c, chat, json!({ "op": "edit", "id": message, "text": text })).await?;
            print::written(json, &w, false);
        }
        Command::Delete { chat, message } => {
            let w = write(c, chat, json!({ "op": "delete", "id": message })).await?;
            print::written(json, &w, false);
        }
        Command::React { chat, message, reaction, remove } => {
            let op = json!({ "op": "react", "id": message, "reaction": reaction, "add": !remove });
            let w = write(c, chat, op).await?;
            print::written(json, &w, false);
        }
        Command::Read { chat, message } => {
            let id = match message {
                Some(id) => id,
                None => match messages(c, chat).await?.pop() {
                    Some(last) => last.message.id,
                    None => return Ok(()),
                },
            };
            let w = write(c, chat, json!({ "op": "read", "id": id })).await?;
            print::written(json, &w, false);
        }
        Command::Typing { chat } => {
            // Like the command without a daemon: an unknown chat is an error.
            c.call::<Value>("heads", json!({ "chat": chat.to_string() })).await?;
            let sent: Value = c.call("typing", json!({ "chat": chat.to_string() })).await?;
            if sent["sent"] != true {
                return Err(Failure::Unreachable("the daemon is not connected to the relay".into()));
            }
        }
        Command::Sync => {
            c.subscribe().await?;
            c.idle().await?;
            let rows: Vec<ChatRow> = c.call("chats", json!({})).await?;
            print::synced(json, rows.len());
        }
        Command::Log { chat } => print::messages(json, &messages(c, chat).await?),
        Command::Chat { command: ChatCommand::List } => {
            let rows: Vec<ChatRow> = c.call("chats", json!({})).await?;
            print::chats(json, &rows);
        }
        Command::Chat { command: ChatCommand::Create { title, direct, group: _, member } } => {
            c.subscribe().await?;
            let made: Value = match (direct, member.is_empty()) {
                (Some(user), _) => {
                    let p = json!({ "kind": "direct", "title": title.unwrap_or_default(), "users": [user] });
                    c.call("create_chat_with", p).await?
                }
                (None, false) => {
                    let p = json!({ "kind": "group", "title": title.unwrap_or_default(), "users": member });
                    c.call("create_chat_with", p).await?
                }
                (None, true) => c.call("create_chat", json!({ "title": title.unwrap_or_default() })).await?,
            };
            let chat = made["chat"].as_str().unwrap_or_default().to_string();
            // Like without a daemon: the command returns once the relay has the chat.
            c.idle().await?;
            print::chat_created(json, &chat);
        }
        Command::Chat { command: ChatCommand::Add { chat, users, share_history } } => {
            let p = json!({ "chat": chat.to_string(), "users": users, "share_history": share_history });
            c.call::<Value>("add_members", p).await?;
        }
        Command::Chat { command: ChatCommand::Remove { chat, user } } => {
            c.call::<Value>("remove_member", json!({ "chat": chat.to_string(), "user": user })).await?;
        }
        Command::Chat { command: ChatCommand::Leave { chat } } => {
            c.call::<Value>("leave_chat", json!({ "chat": chat.to_string() })).await?;
        }
        Command::Chat { command: ChatCommand::Rename { chat, title } } => {
            c.subscribe().await?;
            c.call::<Value>("rename_chat", json!({ "chat": chat.to_string(), "title": title })).await?;
            c.idle().await?;
        }
        Command::Secret { command } => secret::remote(c, command, json).await?,
        Command::Contact { command: crate::members::ContactCommand::Invite { user } } => {
            c.call::<Value>("invite", json!({ "user": user })).await?;
        }
        Command::Contact { command: crate::members::ContactCommand::Accept { who } } => {
            c.call::<Value>("accept_contact", json!({ "who": who, "accept": true })).await?;
        }
        Command::Contact { command: crate::members::ContactCommand::Decline { who } } => {
            c.call::<Value>("accept_contact", json!({ "who": who, "accept": false })).await?;
        }
        Command::Contact { command: crate::members::ContactCommand::Invitations } => {
            let all: Value = c.call("invitations", json!({})).await?;
            for i in all.as_array().into_iter().flatten() {
                let (account, at) = (i["account"].as_str().unwrap_or_default(), i["at_ms"].as_u64().unwrap_or(0));
                print::out(&crate::members::invitation_line(json, account, at));
            }
        }
        Command::Contact { command: crate::members::ContactCommand::Verify { user, confirm } } => {
            let info: Value = match confirm {
                Some(number) => c.call("confirm_contact", json!({ "user": user, "number": number })).await?,
                None => c.call("lookup", json!({ "user": user })).await?,
            };
            if json {
                print::out(&info.to_string());
            } else {
                print::out(&format!("{user}: account {}", info["account"].as_str().unwrap_or_default()));
                print::out(&format!("safety number: {}", info["safety_number"].as_str().unwrap_or_default()));
                print::out(if info["verified"] == true {
                    "verified: you confirmed this number"
                } else {
                    "not verified: compare the number with them, then run `contact verify USER --confirm NUMBER`"
                });
            }
        }
        Command::Devices => {
            let all: Value = c.call("sessions", json!({})).await?;
            if !json {
                match all["session_ttl_days"].as_u64().unwrap_or(0) {
                    0 => print::out("sessions never expire (set with `stratus account set-session-ttl DAYS`)"),
                    d => print::out(&format!("sessions inactive for more than {d} days end")),
                }
            }
            for s in all["sessions"].as_array().into_iter().flatten() {
                if json {
                    print::out(&s.to_string());
                    continue;
                }
                let text = |k: &str| s[k].as_str().unwrap_or("unknown").to_string();
                let active = if s["online"] == true { "online now".to_string() } else { text("last_active") };
                let created = s["created"].as_str().map_or_else(|| text("registered"), str::to_string);
                print::out(&format!(
                    "{} {}  created {}  last active {}{}",
                    text("device"),
                    s["name"].as_str().unwrap_or("(not yet synced)"),
                    created,
                    active,
                    if s["this_device"] == true { "  (this device)" } else { "" }
                ));
            }
        }
        Command::Device { command: DeviceCommand::Approve { code } } => {
            let r: Value = c.call("approve", json!({ "code": code })).await?;
            print::out(&match json {
                true => r.to_string(),
                false => format!(
                    "approved {} ({})",
                    r["approved"].as_str().unwrap_or_default(),
                    r["name"].as_str().unwrap_or_default()
                ),
            });
        }
        Command::Device { command: DeviceCommand::List } => {
            let status: Value = c.call("sessions", json!({})).await?;
            let this = status["sessions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["this_device"] == true)
                .and_then(|s| s["device"].as_str().map(str::to_string));
            let all: Value = c.call("devices", json!({})).await?;
            for d in all.as_array().into_iter().flatten() {
                let is_this = d["device"].as_str() == this.as_deref();
                print::out(&match json {
                    true => {
                        json!({ "device": d["device"], "name": d["name"], "created": d["created"], "this": is_this })
                            .to_string()
                    }
                    false => format!(
                        "{} {}{}",
                        d["device"].as_str().unwrap_or_default(),
                        d["name"].as_str().unwrap_or_default(),
                        if is_this { " (this device)" } else { "" }
                    ),
                });
            }
        }
        Command::Device { command: DeviceCommand::Revoke { device } } => {
            let r: Value = c.call("revoke", json!({ "device": device })).await?;
            let target = r["revoked"].as_str().unwrap_or_default().to_string();
            print::out(&match json {
                true => r.to_string(),
                false => format!("revoked {target}; the account's keys are rotated"),
            });
        }
        Command::Device { command: DeviceCommand::Link { .. } } => c.not_yet("link").await?,
        Command::Account { command: AccountCommand::SetSessionTtl { days } } => {
            c.call::<Value>("set_session_ttl", json!({ "days": days })).await?;
            print::out(&match (json, days) {
                (true, d) => json!({ "session_ttl_days": d }).to_string(),
                (false, 0) => "sessions never expire".to_string(),
                (false, d) => format!("sessions inactive for more than {d} days end"),
            });
        }
        Command::Account { command: AccountCommand::RecoveryKey } => {
            let r: Value = c.call("recovery_key", json!({})).await?;
            let key = r["recovery_key"].as_str().unwrap_or_default().to_string();
            print::out(&if json { r.to_string() } else { format!("recovery key: {key}") });
            eprintln!("stratus: write it down and keep it safe; it is not stored anywhere and logs anyone in");
        }
        Command::Account { command: AccountCommand::SetUsername { name, clear: _ } } => {
            c.call::<Value>("set_username", json!({ "name": name })).await?;
            print::out(&match (json, name) {
                (true, n) => json!({ "username": n }).to_string(),
                (false, Some(n)) => format!("username: {n}"),
                (false, None) => "username released".into(),
            });
        }
        Command::Account { command: AccountCommand::Create { .. } } => c.not_yet("create_account").await?,
        Command::Account { command: AccountCommand::Recover { .. } } => c.not_yet("recover").await?,
        Command::Account { command: AccountCommand::SetRelay { .. } } => c.not_yet("set_relay").await?,
        Command::Watch { .. } | Command::Daemon { .. } => unreachable!("run by `serve`"),
    }
    Ok(())
}

/// `watch` while a daemon runs: its events, printed as `watch` prints its own, until it stops.
pub(crate) async fn watch(c: &mut Client, json: bool) -> Result<(), Failure> {
    c.subscribe().await?;
    if c.status().await?.caught_up {
        eprintln!("stratus: caught up");
    }
    loop {
        let e = c.next_event().await?;
        print::event(&e, json, Shown::Everything)?;
    }
}

async fn messages(c: &mut Client, chat: stratus_engine::ChatId) -> Result<Vec<ChatMessage>, Failure> {
    c.call("messages", json!({ "chat": chat.to_string() })).await
}

/// A message operation through the daemon, returned once the relay has it.
async fn write(c: &mut Client, chat: stratus_engine::ChatId, op: Value) -> Result<ChatMessage, Failure> {
    let mut params = op;
    params["chat"] = json!(chat.to_string());
    c.subscribe().await?;
    let w: Written = c.call("write", params).await?;
    c.acked(&w).await?;
    Ok(w.message)
}
