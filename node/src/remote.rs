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
            // Chats with others need their accounts looked up first, which the running session
            // does not offer yet: the daemon says so.
            if direct.is_some() || !member.is_empty() {
                return c.not_yet("lookup").await;
            }
            c.subscribe().await?;
            let made: Value = c.call("create_chat", json!({ "title": title.unwrap_or_default() })).await?;
            let chat = made["chat"].as_str().unwrap_or_default().to_string();
            // Like without a daemon: the command returns once the relay has the chat.
            c.idle().await?;
            print::chat_created(json, &chat);
        }
        Command::Chat { command: ChatCommand::Add { .. } } => c.not_yet("add_members").await?,
        Command::Chat { command: ChatCommand::Remove { .. } } => c.not_yet("remove_member").await?,
        Command::Chat { command: ChatCommand::Leave { .. } } => c.not_yet("leave_chat").await?,
        Command::Chat { command: ChatCommand::Rename { .. } } => c.not_yet("rename_chat").await?,
        Command::Secret { command } => secret::remote(c, command, json).await?,
        Command::Contact { .. } => c.not_yet("lookup").await?,
        Command::Devices => c.not_yet("sessions").await?,
        Command::Device { command } => {
            c.not_yet(match command {
                DeviceCommand::Link { .. } => "link",
                DeviceCommand::Approve { .. } => "approve",
                DeviceCommand::List => "devices",
                DeviceCommand::Revoke { .. } => "revoke",
            })
            .await?
        }
        Command::Account { command } => {
            c.not_yet(match command {
                AccountCommand::Create { .. } => "create_account",
                AccountCommand::SetSessionTtl { .. } => "set_session_ttl",
                AccountCommand::RecoveryKey => "recovery_key",
                AccountCommand::Recover { .. } => "recover",
                AccountCommand::SetUsername { .. } => "set_username",
            })
            .await?
        }
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
