//! [`Session`]: the driver that keeps a [`Device`] in sync with its relay.
//!
//! One tokio task owns the device, the libp2p swarm and the [`SyncCore`]. It waits for a frame
//! from the relay or a command from the app, feeds it to the core, and carries out the core's
//! outputs (send a frame, apply a delta, drop an acknowledged outbox item). When the stream
//! breaks it reconnects with exponential backoff (100 ms doubling to 5 s, with jitter).
//!
//! Bounds: [`COMMAND_QUEUE`] commands wait for the task. Events go to a broadcast channel of
//! [`EVENT_QUEUE`] entries: the session never waits for the app (that would deadlock an app that
//! awaits a command while not reading events); a receiver that falls more than
//! [`EVENT_QUEUE`] events behind gets `RecvError::Lagged` and should re-read state it cares
//! about ([`Session::messages`], [`Session::status`]).
//!
//! With [`SessionConfig::secret_chats`] the session also runs the device's secret chats (see
//! `session_secret.rs`): it stays reachable for other devices, delivers what waits whenever the
//! other device can be reached, and reports what arrives as events.

use std::collections::HashMap;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::device::core::{SyncCore, SyncInput, SyncOutput};
use crate::device::doc::Message;
use crate::device::drive::{Action, Event};
use crate::device::error::Error;
use crate::device::local::SecretMessage;
use crate::device::local::{Device, MessageOp};
use crate::device::net::{parse_relay_addr, Net, NetError, RelayStream};
use crate::device::session_secret::{HubOut, Input, SecretHub};
use crate::device::store::SecretChat;
use crate::proto::cert::DeviceCert;
use crate::proto::ids::{AccountId, ChatId, ClientSeq, SecretId};
use crate::proto::wire::{ClientFrame, RelayFrame, ReqId};

/// Commands from the app waiting for the session task.
pub const COMMAND_QUEUE: usize = 64;
/// Events waiting for the app.
pub const EVENT_QUEUE: usize = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A snapshot of the session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Connected and accepted by the relay.
    pub connected: bool,
    /// Caught up with the relay's heads.
    pub caught_up: bool,
    /// Deltas waiting in the outbox.
    pub outbox: usize,
}

/// How a session runs.
#[derive(Debug, Clone, Default)]
pub struct SessionConfig {
    /// Run this device's secret chats too: stay reachable for other devices (a circuit
    /// reservation on the relay), answer them, and deliver what waits whenever the other device
    /// can be reached.
    pub secret_chats: bool,
    /// With `secret_chats`: the TCP address to listen on for direct connections to other
    /// devices (e.g. `/ip4/0.0.0.0/tcp/0`). Without it the relay's circuit carries every secret
    /// chat.
    pub secret_tcp: Option<libp2p::Multiaddr>,
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A secret chat command ([`Session`]'s `secret_*` methods).
enum SecretCmd {
    Devices { account: AccountId, reply: Reply<Vec<(DeviceCert, bool)>> },
    Start { peer: Box<DeviceCert>, reply: Reply<SecretId> },
    Accept { chat: SecretId, reply: Reply<()> },
    Send { chat: SecretId, text: String, ttl_s: Option<u32>, reply: Reply<SecretMessage> },
    Messages { chat: SecretId, reply: Reply<Vec<SecretMessage>> },
    Read { chat: SecretId, upto: String, reply: Reply<()> },
    Close { chat: SecretId, reply: Reply<()> },
    Chats { reply: Reply<Vec<SecretChat>> },
    Fingerprint { chat: SecretId, reply: Reply<String> },
}

/// A request the session made of the relay itself, waiting for its answer.
enum Pending {
    /// The keys of an account offering a secret chat, for the stream `conn`.
    ConnLookup(u64),
    /// The keys of an account whose offer the user accepts.
    Accept(SecretId, Reply<()>),
    /// The keys of an account (`looked`: then its devices).
    Devices { account: AccountId, looked: bool, reply: Reply<Vec<(DeviceCert, bool)>> },
}

enum Command {
    Send { chat: ChatId, text: String, reply: Reply<(Message, ClientSeq)> },
    Write { chat: ChatId, write: MessageOp, reply: Reply<(Message, ClientSeq)> },
    Typing { chat: ChatId, reply: Reply<bool> },
    CreateChat { title: String, reply: Reply<ChatId> },
    Messages { chat: ChatId, reply: Reply<Vec<Message>> },
    Heads { chat: ChatId, reply: Reply<Vec<String>> },
    Status { reply: oneshot::Sender<Status> },
    Secret(SecretCmd),
    Stop { reply: oneshot::Sender<Device> },
}

/// A handle on a running session. Dropping it stops the session.
pub struct Session {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    first: Option<broadcast::Receiver<Event>>,
}

impl Session {
    /// Starts syncing `device` (which must be logged in) with its relay.
    pub fn start(device: Device) -> Result<Session, Error> {
        Session::start_with(device, SessionConfig::default())
    }

    /// Starts syncing `device` (which must be logged in) with its relay, as `config` says.
    pub fn start_with(device: Device, config: SessionConfig) -> Result<Session, Error> {
        let relay = device.login()?.relay.clone();
        let (peer, addr) = parse_relay_addr(&relay)?;
        let net = Net::start(device.keypair())?;
        let hub = match config.secret_chats {
            true => Some(SecretHub::new(net.handle(), relay, config.secret_tcp, &device)?),
            false => None,
        };
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (ev_tx, ev_rx) = broadcast::channel(EVENT_QUEUE);
        let core = device.start_core()?;
        let driver = Driver {
            device,
            core,
            net,
            peer,
            addr,
            events: ev_tx.clone(),
            stream: None,
            was_connected: false,
            was_caught_up: false,
            was_idle: false,
            resume_at: None,
            revoked: false,
            hub,
            pending: HashMap::new(),
            pending_outs: Vec::new(),
        };
        tokio::spawn(driver.run(cmd_rx));
        Ok(Session { commands: cmd_tx, events: ev_tx, first: Some(ev_rx) })
    }

    /// A receiver of the session's events. The first call gets every event since the session
    /// started; later calls get events from the moment of the call.
    pub fn events(&mut self) -> broadcast::Receiver<Event> {
        self.first.take().unwrap_or_else(|| self.events.subscribe())
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Writes a message durably on this device and queues it for the relay. Returns the message
    /// and the client seq of its delta: [`Event::Acked`] with that client seq tells when the
    /// relay has it.
    pub async fn send(&self, chat: ChatId, text: &str) -> Result<(Message, ClientSeq), Error> {
        self.call(|reply| Command::Send { chat, text: text.to_string(), reply }).await
    }

    /// Replies, edits, deletes for everyone or reacts ([`MessageOp`]), durably on this device, and
    /// queues the change for the relay. Returns the message as it is now and the client seq of
    /// the change's delta.
    pub async fn write(&self, chat: ChatId, write: MessageOp) -> Result<(Message, ClientSeq), Error> {
        self.call(|reply| Command::Write { chat, write, reply }).await
    }

    /// Tells the chat's other members' connected devices that the user is typing (send it again
    /// every few seconds while they type). Returns false, sending nothing, when not connected:
    /// typing indicators are never queued.
    pub async fn typing(&self, chat: ChatId) -> Result<bool, Error> {
        self.call(|reply| Command::Typing { chat, reply }).await
    }

    /// Creates a chat. It works offline: the chat's creation and title wait in the outbox, and
    /// the relay has the chat once [`Event::Acked`] comes for them (or the session is idle
    /// after this call returned).
    pub async fn create_chat(&self, title: &str) -> Result<ChatId, Error> {
        self.call(|reply| Command::CreateChat { title: title.to_string(), reply }).await
    }

    /// A chat's messages in display order.
    pub async fn messages(&self, chat: ChatId) -> Result<Vec<Message>, Error> {
        self.call(|reply| Command::Messages { chat, reply }).await
    }

    /// A chat's document heads.
    pub async fn heads(&self, chat: ChatId) -> Result<Vec<String>, Error> {
        self.call(|reply| Command::Heads { chat, reply }).await
    }

    /// The session's state.
    pub async fn status(&self) -> Result<Status, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Status { reply: tx }).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    async fn secret<T>(&self, make: impl FnOnce(Reply<T>) -> SecretCmd) -> Result<T, Error> {
        self.call(|reply| Command::Secret(make(reply))).await
    }

    /// The devices of `account` a secret chat can be started with, each certificate checked
    /// against the account's keys (fetched from the relay if need be), with whether it is
    /// connected now. Needs the relay.
    pub async fn secret_devices(&self, account: AccountId) -> Result<Vec<(DeviceCert, bool)>, Error> {
        self.secret(|reply| SecretCmd::Devices { account, reply }).await
    }

    /// Starts a secret chat with the device whose certificate is `peer` (from
    /// [`Session::secret_devices`]) and offers it to that device as soon as it can be reached.
    pub async fn secret_start(&self, peer: DeviceCert) -> Result<SecretId, Error> {
        self.secret(|reply| SecretCmd::Start { peer: Box::new(peer), reply }).await
    }

    /// Accepts a secret chat another device offered ([`Event::SecretOffered`]), its
    /// certificate checked first (against its account's keys from the relay if need be).
    pub async fn secret_accept(&self, chat: SecretId) -> Result<(), Error> {
        self.secret(|reply| SecretCmd::Accept { chat, reply }).await
    }

    /// Writes a secret chat message (`ttl_s`: it disappears that many seconds after it is
    /// read); delivered as soon as the other device can be reached.
    pub async fn secret_send(&self, chat: SecretId, text: &str, ttl_s: Option<u32>) -> Result<SecretMessage, Error> {
        self.secret(|reply| SecretCmd::Send { chat, text: text.to_string(), ttl_s, reply }).await
    }

    /// A secret chat's messages in display order.
    pub async fn secret_messages(&self, chat: SecretId) -> Result<Vec<SecretMessage>, Error> {
        self.secret(|reply| SecretCmd::Messages { chat, reply }).await
    }

    /// Marks a secret chat read up to message `upto`: the timers of the messages it covers start
    /// (on the other device when the read mark reaches it).
    pub async fn secret_read(&self, chat: SecretId, upto: &str) -> Result<(), Error> {
        self.secret(|reply| SecretCmd::Read { chat, upto: upto.to_string(), reply }).await
    }

    /// Closes a secret chat (or declines an offer): deleted here at once, and on the other
    /// device as soon as it can be reached.
    pub async fn secret_close(&self, chat: SecretId) -> Result<(), Error> {
        self.secret(|reply| SecretCmd::Close { chat, reply }).await
    }

    /// The secret chats on this device.
    pub async fn secret_chats(&self) -> Result<Vec<SecretChat>, Error> {
        self.secret(|reply| SecretCmd::Chats { reply }).await
    }

    /// The fingerprint of a secret chat's keys, for the two users to compare.
    pub async fn secret_fingerprint(&self, chat: SecretId) -> Result<String, Error> {
        self.secret(|reply| SecretCmd::Fingerprint { chat, reply }).await
    }

    /// Stops the session and gives the device back.
    pub async fn stop(self) -> Result<Device, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Stop { reply: tx }).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }
}

struct Driver {
    device: Device,
    core: SyncCore,
    net: Net,
    peer: libp2p::PeerId,
    addr: libp2p::Multiaddr,
    events: broadcast::Sender<Event>,
    stream: Option<RelayStream>,
    was_connected: bool,
    was_caught_up: bool,
    was_idle: bool,
    /// When to feed [`SyncInput::Resume`] after the relay limited this device.
    resume_at: Option<Instant>,
    /// The account ended this device's session: its data is gone and it never reconnects.
    revoked: bool,
    /// The secret chats, if the session runs them.
    hub: Option<SecretHub>,
    /// Requests the session made of the relay itself.
    pending: HashMap<ReqId, Pending>,
    /// What the hub asked for while a request was settled, to carry out next.
    pending_outs: Vec<HubOut>,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut backoff = BACKOFF_MIN;
        let mut reconnect_at = Instant::now();
        if let Some(hub) = self.hub.as_mut() {
            hub.listen_first().await;
        }
        loop {
            if self.stream.is_none() && !self.revoked && Instant::now() >= reconnect_at {
                match self.net.open(self.peer, self.addr.clone()).await {
                    Ok(s) => {
                        self.stream = Some(s);
                        backoff = BACKOFF_MIN;
                        if let Some(hub) = self.hub.as_mut() {
                            hub.relay_up();
                        }
                        let out = self.core.handle(SyncInput::Connected);
                        self.carry_out(out).await;
                    }
                    Err(e) => {
                        self.emit(Event::Disconnected { reason: e.to_string() }).await;
                        let jitter = self.device.rng.gen_range(0..=backoff.as_millis() as u64 / 4);
                        reconnect_at = Instant::now() + backoff + Duration::from_millis(jitter);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
                continue;
            }
            let offline = self.stream.is_none() && !self.revoked;
            let resume_at = self.resume_at;
            let stream = self.stream.as_mut();
            let hub_wake = match self.hub.as_mut() {
                Some(h) => h.wake_at(&self.device),
                None => Instant::now() + Duration::from_secs(3600),
            };
            let has_hub = self.hub.is_some();
            let hub = self.hub.as_mut();
            tokio::select! {
                input = hub_recv(hub) => {
                    let hub = self.hub.as_mut().expect("only with a hub");
                    let outs = hub.handle(&mut self.device, input);
                    self.hub_outs(outs).await;
                }
                () = tokio::time::sleep_until(hub_wake), if has_hub => {
                    let hub = self.hub.as_mut().expect("only with a hub");
                    let outs = hub.tick(&mut self.device);
                    self.hub_outs(outs).await;
                }
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Stop { reply }) => {
                        // What was sent last (a typing indicator has no answer to wait for)
                        // reaches the relay before the connection goes.
                        if let Some(mut s) = self.stream.take() {
                            s.close_and_drain(Duration::from_secs(1)).await;
                        }
                        let _ = reply.send(self.device);
                        return;
                    }
                    Some(cmd) => self.command(cmd).await,
                },
                frame = recv(stream) => match frame {
                    Ok(Some(frame)) => {
                        let out = self.core.handle(SyncInput::Frame(Box::new(frame)));
                        self.carry_out(out).await;
                    }
                    Ok(None) => self.lost("relay closed the stream".into(), &mut reconnect_at, backoff).await,
                    Err(e) => self.lost(e.to_string(), &mut reconnect_at, backoff).await,
                },
                () = tokio::time::sleep_until(reconnect_at), if offline => {}
                () = tokio::time::sleep_until(resume_at.unwrap_or(reconnect_at)), if resume_at.is_some() => {
                    self.resume_at = None;
                    let out = self.core.handle(SyncInput::Resume);
                    self.carry_out(out).await;
                }
            }
        }
    }

    async fn lost(&mut self, reason: String, reconnect_at: &mut Instant, backoff: Duration) {
        self.drop_stream(reason).await;
        *reconnect_at = Instant::now() + backoff;
    }

    /// Forgets the stream and everything that waited on it.
    async fn drop_stream(&mut self, reason: String) {
        if self.stream.is_none() {
            return;
        }
        self.stream = None;
        self.core.handle(SyncInput::Disconnected);
        for (_, p) in std::mem::take(&mut self.pending) {
            self.unanswered(p);
        }
        let outs = std::mem::take(&mut self.pending_outs);
        Box::pin(self.hub_outs(outs)).await;
        self.was_connected = false;
        self.was_caught_up = false;
        self.was_idle = false;
        self.emit(Event::Disconnected { reason }).await;
    }

    async fn emit(&mut self, e: Event) {
        // No receiver is fine: nobody listens.
        let _ = self.events.send(e);
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Send { chat, text, reply } => match self.device.send(&mut self.core, chat, &text) {
                Ok((message, client_seq, actions)) => {
                    let _ = reply.send(Ok((message, client_seq)));
                    self.run_actions(actions).await;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Write { chat, write, reply } => match self.device.write(&mut self.core, chat, &write) {
                Ok((message, client_seq, actions)) => {
                    let _ = reply.send(Ok((message, client_seq)));
                    self.run_actions(actions).await;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Typing { chat, reply } => {
                let connected = self.core.is_connected();
                if connected {
                    self.send_frame(ClientFrame::Typing { chat }).await;
                }
                let _ = reply.send(Ok(connected));
            }
            Command::CreateChat { title, reply } => match self.device.create_chat(&mut self.core, &title) {
                Ok((chat, actions)) => {
                    let _ = reply.send(Ok(chat));
                    self.run_actions(actions).await;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Messages { chat, reply } => {
                let _ = reply.send(self.device.messages(chat));
            }
            Command::Heads { chat, reply } => {
                let _ = reply.send(self.device.heads(chat));
            }
            Command::Status { reply } => {
                let _ = reply.send(Status {
                    connected: self.core.is_connected(),
                    caught_up: self.core.is_caught_up(),
                    outbox: self.device.outbox_len(),
                });
            }
            Command::Secret(cmd) => self.secret_command(cmd).await,
            Command::Stop { .. } => unreachable!("handled in run"),
        }
    }

    async fn secret_command(&mut self, cmd: SecretCmd) {
        let Some(hub) = self.hub.as_mut() else {
            return refuse(cmd);
        };
        let device = &mut self.device;
        match cmd {
            SecretCmd::Devices { account, reply } => {
                let looked = matches!(device.is_contact(account), Ok(true));
                let frame = |req| match looked {
                    true => ClientFrame::AccountDevices { req, account },
                    false => ClientFrame::LookupAccounts { req, accounts: vec![account] },
                };
                self.request(frame, Pending::Devices { account, looked, reply }).await;
            }
            SecretCmd::Start { peer, reply } => {
                let r = device.secret_start(*peer);
                if let Ok(chat) = r {
                    hub.touched(device, chat);
                }
                let _ = reply.send(r);
            }
            SecretCmd::Accept { chat, reply } => match device.secret(chat) {
                Ok(c) if !c.verified => {
                    let account = c.peer_cert.body.account;
                    let frame = |req| ClientFrame::LookupAccounts { req, accounts: vec![account] };
                    self.request(frame, Pending::Accept(chat, reply)).await;
                }
                Ok(_) => {
                    let r = device.secret_accept(chat);
                    hub.touched(device, chat);
                    let _ = reply.send(r);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            SecretCmd::Send { chat, text, ttl_s, reply } => {
                let r = device.secret_send(chat, &text, ttl_s);
                if r.is_ok() {
                    hub.touched(device, chat);
                }
                let _ = reply.send(r);
            }
            SecretCmd::Messages { chat, reply } => {
                let _ = reply.send(device.secret_messages(chat));
            }
            SecretCmd::Read { chat, upto, reply } => {
                let r = device.secret_read(chat, &upto);
                if r.is_ok() {
                    hub.touched(device, chat);
                }
                let _ = reply.send(r);
            }
            SecretCmd::Close { chat, reply } => {
                let r = device.secret_close(chat);
                if r.is_ok() {
                    hub.touched(device, chat);
                }
                let _ = reply.send(r);
            }
            SecretCmd::Chats { reply } => {
                let _ = reply.send(device.secret_chats());
            }
            SecretCmd::Fingerprint { chat, reply } => {
                let _ = reply.send(device.secret_fingerprint(chat));
            }
        }
    }

    /// Sends a request of the session's own; its answer comes to [`Driver::answered`]. Not
    /// connected: it fails at once.
    async fn request(&mut self, frame: impl FnOnce(ReqId) -> ClientFrame, pending: Pending) {
        if !self.core.is_connected() {
            return self.unanswered(pending);
        }
        let req = self.core.next_req();
        self.pending.insert(req, pending);
        self.send_frame(frame(req)).await;
    }

    /// A request of the session's own that will not be answered (the connection went).
    fn unanswered(&mut self, pending: Pending) {
        match pending {
            Pending::ConnLookup(conn) => {
                if let Some(hub) = self.hub.as_mut() {
                    let outs = hub.looked_up(&mut self.device, conn);
                    self.pending_outs.extend(outs);
                }
            }
            Pending::Accept(_, reply) => {
                let _ = reply.send(Err(Error::Offline));
            }
            Pending::Devices { reply, .. } => {
                let _ = reply.send(Err(Error::Offline));
            }
        }
    }

    /// The relay answered a request of the session's own.
    async fn answered(&mut self, pending: Pending, frame: RelayFrame) {
        let refused = |frame: &RelayFrame| match frame {
            RelayFrame::Error { code, message, .. } => Error::Relay { code: *code, message: message.clone() },
            _ => Error::Relay { code: crate::proto::wire::ErrorCode::Internal, message: "unexpected answer".into() },
        };
        if let RelayFrame::Accounts { accounts, .. } = &frame {
            if let Err(e) = self.device.take_accounts(accounts) {
                tracing::info!(error = %e, "an account's keys from the relay were refused");
            }
        }
        match pending {
            Pending::ConnLookup(_) => self.unanswered(pending),
            Pending::Accept(chat, reply) => {
                let r = self.device.secret_accept_checked(chat);
                if let (Ok(()), Some(hub)) = (&r, self.hub.as_mut()) {
                    hub.touched(&mut self.device, chat);
                }
                let _ = reply.send(r);
            }
            Pending::Devices { account, looked: false, reply } => match frame {
                RelayFrame::Accounts { .. } => {
                    let frame = |req| ClientFrame::AccountDevices { req, account };
                    self.request(frame, Pending::Devices { account, looked: true, reply }).await;
                }
                other => {
                    let _ = reply.send(Err(refused(&other)));
                }
            },
            Pending::Devices { account, looked: true, reply } => {
                let r = match frame {
                    f @ RelayFrame::AccountDevices { .. } => self.device.secret_devices_from(account, f),
                    other => Err(refused(&other)),
                };
                let _ = reply.send(r);
            }
        }
        let outs = std::mem::take(&mut self.pending_outs);
        self.hub_outs(outs).await;
    }

    async fn hub_outs(&mut self, outs: Vec<HubOut>) {
        for o in outs {
            match o {
                HubOut::Emit(e) => self.emit(e).await,
                HubOut::Lookup { conn, account } => {
                    let frame = |req| ClientFrame::LookupAccounts { req, accounts: vec![account] };
                    Box::pin(self.request(frame, Pending::ConnLookup(conn))).await;
                }
            }
        }
        let outs = std::mem::take(&mut self.pending_outs);
        if !outs.is_empty() {
            Box::pin(self.hub_outs(outs)).await;
        }
    }

    async fn send_frame(&mut self, frame: crate::proto::wire::ClientFrame) {
        if let Some(s) = self.stream.as_mut() {
            if let Err(e) = s.send(&frame).await {
                tracing::debug!(error = %e, "send failed");
                self.drop_stream(e.to_string()).await;
            }
        }
    }

    async fn carry_out(&mut self, outputs: Vec<SyncOutput>) {
        for o in &outputs {
            tracing::debug!(output = ?short(o), "sync output");
        }
        let actions = self.device.carry_out(&mut self.core, outputs);
        self.run_actions(actions).await;
    }

    async fn run_actions(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send(frame) => self.send_frame(frame).await,
                Action::Emit(Event::SessionRevoked) => {
                    self.revoked = true;
                    self.stream = None;
                    // The account's data is gone here: no secret chat runs, nothing is answered.
                    self.hub = None;
                    for (_, p) in std::mem::take(&mut self.pending) {
                        self.unanswered(p);
                    }
                    self.pending_outs.clear();
                    self.emit(Event::SessionRevoked).await;
                }
                Action::Emit(event) => self.emit(event).await,
                Action::RetryAfter(ms) => self.resume_at = Some(Instant::now() + Duration::from_millis(ms.into())),
                Action::Reply(frame) => match frame.req().and_then(|r| self.pending.remove(&r)) {
                    Some(p) => Box::pin(self.answered(p, frame)).await,
                    None => tracing::debug!(?frame, "unexpected reply"),
                },
            }
        }
        let connected = self.core.is_connected();
        if connected && !self.was_connected {
            self.emit(Event::Connected).await;
        }
        self.was_connected = connected;
        let caught_up = self.core.is_caught_up();
        if caught_up && !self.was_caught_up {
            self.emit(Event::CaughtUp).await;
        }
        self.was_caught_up = caught_up;
        let idle = self.core.is_idle();
        if idle && !self.was_idle {
            self.emit(Event::Idle).await;
        }
        self.was_idle = idle;
    }
}

/// Answers a secret chat command when the session does not run secret chats.
fn refuse(cmd: SecretCmd) {
    let no = || Error::SecretChatsOff;
    match cmd {
        SecretCmd::Devices { reply, .. } => drop(reply.send(Err(no()))),
        SecretCmd::Start { reply, .. } => drop(reply.send(Err(no()))),
        SecretCmd::Accept { reply, .. } | SecretCmd::Read { reply, .. } | SecretCmd::Close { reply, .. } => {
            drop(reply.send(Err(no())))
        }
        SecretCmd::Send { reply, .. } => drop(reply.send(Err(no()))),
        SecretCmd::Messages { reply, .. } => drop(reply.send(Err(no()))),
        SecretCmd::Chats { reply } => drop(reply.send(Err(no()))),
        SecretCmd::Fingerprint { reply, .. } => drop(reply.send(Err(no()))),
    }
}

async fn hub_recv(hub: Option<&mut SecretHub>) -> Input {
    match hub {
        Some(h) => h.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv(stream: Option<&mut RelayStream>) -> Result<Option<RelayFrame>, NetError> {
    match stream {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

fn short(o: &SyncOutput) -> String {
    match o {
        SyncOutput::Send(f) => format!("send {}", format!("{f:?}").chars().take(120).collect::<String>()),
        SyncOutput::ApplyDelta(d) => format!("apply {} seq {}", d.chat, d.seq),
        other => format!("{other:?}").chars().take(160).collect(),
    }
}
