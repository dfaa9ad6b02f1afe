//! [`Session`]: the driver that keeps a [`Device`] in sync with its relay.
//!
//! One tokio task owns the device, the libp2p swarm and the [`SessionCore`] (sans-IO, around the
//! sync core), which decides everything: when to connect and reconnect, when a quiet
//! connection is dead, which answers go to which request. The task waits for a frame from the
//! relay, a command from the app, a finished dial or the core's next wake-up, feeds the core,
//! and carries out its work (send a frame, apply a delta, drop an acknowledged outbox item).
//! It takes what is already waiting together: the app's writes under one store barrier
//! ([`Device::write_batch`]), the relay's frames in one step ([`Device::session_steps`]).
//!
//! Bounds: [`COMMAND_QUEUE`] commands wait for the task. Events go to a broadcast channel of
//! [`EVENT_QUEUE`] entries: the session never waits for the app (that would deadlock an app that
//! awaits a command while not reading events); a receiver that falls more than
//! [`EVENT_QUEUE`] events behind gets `RecvError::Lagged` and should re-read state it cares
//! about ([`Session::messages`], [`Session::status`]).
//!
//! With [`SessionConfig::secret_chats`] the session also runs the device's secret chats (see
//! `secret_links.rs`, sans-IO, and its driver `session_secret.rs`): it stays reachable for other devices, delivers what waits whenever the
//! other device can be reached, and reports what arrives as events.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::device::doc::Message;
use crate::device::drive::{Action, Event};
use crate::device::error::Error;
use crate::device::group_commit::BarrierStart;
use crate::device::local::SecretMessage;
use crate::device::local::{ChatSummary, ContactInfo, Device, LinkCode, MessageOp, SessionInfo};
use crate::device::net::{parse_relay_addrs, Net, NetError, RelayLink, RelayStream};
use crate::device::ops::{Op, OpOut, Step};
use crate::device::session_core::{SessionCore, SessionInput, Work};
use crate::device::session_secret::{HubOut, Input, SecretHub};
use crate::device::store::SecretChat;
use crate::proto::cert::DeviceCert;
use crate::proto::crypto::RecoveryKey;
use crate::proto::directory::Membership;
use crate::proto::ids::{AccountId, ChatId, ClientSeq, DeviceId, SecretId};
use crate::proto::wire::ChatKind;
use crate::proto::wire::{ClientFrame, RelayFrame};

/// Commands from the app waiting for the session task.
pub(crate) const COMMAND_QUEUE: usize = 64;
/// Events waiting for the app.
pub(crate) const EVENT_QUEUE: usize = 4096;

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

/// A write of the app's with whom to answer.
type WriteCmd = (ChatId, MessageOp, Reply<(Message, ClientSeq)>);

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
    /// A message sent, replied, edited, deleted, reacted to or read (see [`take_writes`]).
    Write {
        chat: ChatId,
        write: MessageOp,
        reply: Reply<(Message, ClientSeq)>,
    },
    Typing {
        chat: ChatId,
        reply: Reply<bool>,
    },
    CreateChat {
        title: String,
        reply: Reply<ChatId>,
    },
    Messages {
        chat: ChatId,
        reply: Reply<Vec<Message>>,
    },
    Heads {
        chat: ChatId,
        reply: Reply<Vec<String>>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Secret(SecretCmd),
    /// An operation that needs the relay (see `ops.rs`).
    Op {
        op: Op,
        reply: Reply<OpOut>,
    },
    /// A local chat with other accounts, made after their lookups.
    CreateChatWith {
        kind: ChatKind,
        title: String,
        others: Vec<AccountId>,
        reply: Reply<ChatId>,
    },
    /// A local rename, queued for the relay.
    Rename {
        chat: ChatId,
        title: String,
        reply: Reply<()>,
    },
    /// Local reads of the device's state.
    Read(ReadCmd),
    Stop {
        reply: oneshot::Sender<Device>,
    },
}

/// What the app reads of the device while the session runs.
enum ReadCmd {
    Chats(Reply<Vec<ChatSummary>>),
    Devices(Reply<Vec<DeviceCert>>),
    Contact(AccountId, Reply<Option<ContactInfo>>),
}

/// A handle on a running session: every operation of the device, served while it syncs (the
/// crate docs show one in use; [`Session::approve`] links a second device). Dropping it stops
/// the session; [`Session::stop`] hands the device back.
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
        let relays = parse_relay_addrs(&device.login()?.relay)?;
        let net = Net::start(device.keypair())?;
        let hub = match config.secret_chats {
            // Circuits go through the address the session connected on (see `relay_up`).
            true => Some(SecretHub::new(net.handle(), relays[0].1.to_string(), config.secret_tcp, &device)?),
            false => None,
        };
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (ev_tx, ev_rx) = broadcast::channel(EVENT_QUEUE);
        let mut device = device;
        let core = device.start_session()?.with_addresses(relays.len());
        let driver = Driver {
            device,
            core,
            net,
            relays,
            connecting_to: 0,
            events: ev_tx.clone(),
            link: None,
            connecting: None,
            epoch: Instant::now(),
            hub,
            waiting: BTreeMap::new(),
            ops: BTreeMap::new(),
            next_token: 0,
            pending_outs: Vec::new(),
            write_replies: Default::default(),
            barrier: None,
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
        let write = MessageOp::Send { text: text.to_string(), reply_to: None };
        self.call(|reply| Command::Write { chat, write, reply }).await
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

    /// Stops the session and gives the device back.
    pub async fn stop(self) -> Result<Device, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Stop { reply: tx }).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }
}

struct Driver {
    device: Device,
    /// Every decision about the relay connection: see [`SessionCore`].
    core: SessionCore,
    net: Net,
    /// The relay's addresses, in the order the core tries them ([`Work::Connect`] names one).
    relays: Vec<(libp2p::PeerId, libp2p::Multiaddr)>,
    /// The address of the connection being opened, or of the open one.
    connecting_to: usize,
    events: broadcast::Sender<Event>,
    /// The open stream's task, while connected.
    link: Option<RelayLink>,
    /// A connection being opened ([`Work::Connect`]); the session goes on meanwhile.
    connecting: Option<tokio::task::JoinHandle<Result<RelayStream, NetError>>>,
    /// The driver's clock: ms since this instant are the session core's time.
    epoch: Instant,
    /// The secret chats, if the session runs them.
    hub: Option<SecretHub>,
    /// What each app request of the session's is for, by the token the core routes answers to.
    waiting: BTreeMap<u64, Pending>,
    /// Operations under way, by token, with whom to answer.
    ops: BTreeMap<u64, (Op, Reply<OpOut>)>,
    next_token: u64,
    /// What the hub asked for while a request was settled, to carry out next.
    pending_outs: Vec<HubOut>,
    /// Whom to answer for each batch of writes the device holds until its barrier is done
    /// (`group_commit.rs`), oldest first.
    write_replies: std::collections::VecDeque<Vec<Reply<(Message, ClientSeq)>>>,
    /// The barrier under way for them, on a blocking thread.
    barrier: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Driver {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        if let Some(hub) = self.hub.as_mut() {
            hub.listen_first(&mut self.device).await;
        }
        loop {
            let wake = self.core.next_wake().map(|ms| self.epoch + Duration::from_millis(ms));
            let hub_wake = match self.hub.as_mut() {
                Some(h) => h.wake_at(&self.device),
                None => Instant::now() + Duration::from_secs(3600),
            };
            let has_hub = self.hub.is_some();
            let hub = self.hub.as_mut();
            let link = self.link.as_mut();
            let connecting = self.connecting.as_mut();
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
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { return };
                    let (writes, rest) = take_writes(cmd, &mut commands);
                    if !writes.is_empty() {
                        self.writes(writes).await;
                    }
                    if rest.is_some() {
                        // Anything else comes after the writes before it are durable and
                        // queued: it may queue writes of its own, which must follow theirs.
                        self.settle_writes().await;
                    }
                    match rest {
                        Some(Command::Stop { reply }) => {
                            // What was sent last (a typing indicator has no answer to wait
                            // for) reaches the relay before the connection goes.
                            if let Some(link) = self.link.take() {
                                link.close(Duration::from_secs(1)).await;
                            }
                            let _ = reply.send(self.device);
                            return;
                        }
                        Some(cmd) => self.command(cmd).await,
                        None => {}
                    }
                }
                frame = recv(link) => match frame {
                    Ok(Some(frame)) => {
                        // With the frames that arrived meanwhile: pushes that came together are
                        // applied and stored together.
                        let mut inputs = vec![SessionInput::Frame(Box::new(frame))];
                        while inputs.len() < MAX_FRAMES_PER_STEP {
                            match self.link.as_mut().and_then(RelayLink::try_recv) {
                                Some(f) => inputs.push(SessionInput::Frame(Box::new(f))),
                                None => break,
                            }
                        }
                        let now = self.now_ms();
                        let work = self.device.session_steps(&mut self.core, now, inputs);
                        self.carry(work).await;
                    }
                    Ok(None) => self.lost("relay closed the stream".into()).await,
                    Err(e) => self.lost(e.to_string()).await,
                },
                done = barrier_done(self.barrier.as_mut()) => {
                    self.barrier = None;
                    self.barrier_done(done.unwrap_or_else(|e| Err(format!("the barrier's thread failed: {e}")))).await;
                    self.start_barrier().await;
                }
                opened = connected(connecting) => {
                    self.connecting = None;
                    match opened {
                        Ok(stream) => {
                            self.link = Some(RelayLink::start(stream));
                            if let Some(hub) = self.hub.as_mut() {
                                let at = self.relays.get(self.connecting_to).map(|(_, a)| a.to_string());
                                hub.relay_up(at);
                            }
                            self.step(SessionInput::Connected).await;
                        }
                        Err(e) => self.step(SessionInput::ConnectFailed(e.to_string())).await,
                    }
                }
                () = tokio::time::sleep_until(wake.unwrap_or(self.epoch)), if wake.is_some() => {
                    self.step(SessionInput::Timeout).await;
                }
            }
        }
    }

    /// Feeds the session core and carries out what it decided.
    async fn step(&mut self, input: SessionInput) {
        let now = self.now_ms();
        let work = self.device.session_step(&mut self.core, now, input);
        self.carry(work).await;
    }

    async fn lost(&mut self, reason: String) {
        self.link = None;
        self.step(SessionInput::Lost(reason)).await;
    }

    /// Carries out the session core's work, in order.
    async fn carry(&mut self, work: Vec<Work>) {
        let mut queue = std::collections::VecDeque::from(work);
        while let Some(w) = queue.pop_front() {
            match w {
                Work::Connect { addr } => {
                    // The core only names addresses it was told of; were it not to, the first.
                    let (peer, at) = self.relays.get(addr).unwrap_or(&self.relays[0]).clone();
                    self.connecting_to = addr;
                    let mut net = self.net.handle();
                    self.connecting = Some(tokio::spawn(async move { net.open(peer, at).await }));
                }
                Work::Close => self.link = None,
                Work::Send(frame) => {
                    let Some(link) = self.link.as_ref() else { continue };
                    if let Err(e) = link.send(frame) {
                        tracing::info!(error = %e, "the relay connection is stuck; dropping it");
                        self.link = None;
                        let now = self.now_ms();
                        queue.extend(self.device.session_step(&mut self.core, now, SessionInput::Lost(e.to_string())));
                    }
                }
                Work::Emit(Event::SessionRevoked) => {
                    // The account's data is gone here: no secret chat runs, nothing is answered.
                    self.hub = None;
                    self.pending_outs.clear();
                    self.emit(Event::SessionRevoked);
                }
                Work::Emit(event) => self.emit(event),
                Work::Answer { token, frame } => {
                    if let Some(p) = self.waiting.remove(&token) {
                        Box::pin(self.answered(p, frame)).await;
                    } else {
                        queue.extend(self.op_answered(token, frame));
                    }
                }
                Work::Unanswered { token } => {
                    if let Some(p) = self.waiting.remove(&token) {
                        self.unanswered(p);
                    } else if let Some((_, reply)) = self.ops.remove(&token) {
                        let _ = reply.send(Err(Error::Offline));
                    }
                }
                Work::Ready { token } => queue.extend(self.op_send(token)),
            }
        }
        let outs = std::mem::take(&mut self.pending_outs);
        if !outs.is_empty() {
            Box::pin(self.hub_outs(outs)).await;
        }
    }

    fn emit(&mut self, e: Event) {
        // No receiver is fine: nobody listens.
        let _ = self.events.send(e);
    }

    /// Carries out what a local write asked for.
    async fn local(&mut self, actions: Vec<Action>) {
        let now = self.now_ms();
        let work = self.core.actions(now, actions);
        self.carry(work).await;
    }

    /// Carries out a batch of the app's writes on the documents and stores it; it is answered
    /// and sent once a barrier makes it durable, which runs on a blocking thread while the task
    /// goes on (`group_commit.rs`): the writes that come meanwhile share the next barrier.
    async fn writes(&mut self, writes: Vec<WriteCmd>) {
        let (ops, replies): (Vec<_>, Vec<_>) = writes.into_iter().map(|(chat, op, reply)| ((chat, op), reply)).unzip();
        self.device.stage_batch(ops);
        self.write_replies.push_back(replies);
        self.start_barrier().await;
    }

    /// Starts a barrier for the writes staged, unless one is under way.
    async fn start_barrier(&mut self) {
        loop {
            match self.device.start_barrier() {
                BarrierStart::Nothing => return,
                BarrierStart::Done => self.barrier_done(Ok(())).await,
                BarrierStart::Run(barrier) => {
                    self.barrier =
                        Some(tokio::task::spawn_blocking(move || barrier.barrier().map_err(|e| e.to_string())));
                    return;
                }
            }
        }
    }

    /// Answers the writes a barrier covered and sends them.
    async fn barrier_done(&mut self, barrier: Result<(), String>) {
        let (answers, actions) = self.device.barrier_done(self.core.sync(), barrier);
        for results in answers {
            let replies = self.write_replies.pop_front().unwrap_or_default();
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        self.local(actions).await;
    }

    /// Waits until every write staged is durable, answered and queued.
    async fn settle_writes(&mut self) {
        while self.device.writes_unsettled() {
            match self.barrier.take() {
                Some(task) => {
                    let done = task.await.unwrap_or_else(|e| Err(format!("the barrier's thread failed: {e}")));
                    self.barrier_done(done).await;
                }
                None => {
                    self.start_barrier().await;
                    if self.barrier.is_none() && self.device.writes_unsettled() {
                        // Not reached: a start either settles the batches or runs a barrier.
                        return;
                    }
                }
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Write { chat, write, reply } => self.writes(vec![(chat, write, reply)]).await,
            Command::Typing { chat, reply } => {
                let connected = self.core.sync_ref().is_connected();
                if connected {
                    self.carry(vec![Work::Send(ClientFrame::Typing { chat })]).await;
                }
                let _ = reply.send(Ok(connected));
            }
            Command::CreateChat { title, reply } => match self.device.create_chat(self.core.sync(), &title) {
                Ok((chat, actions)) => {
                    let _ = reply.send(Ok(chat));
                    self.local(actions).await;
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
                let sync = self.core.sync_ref();
                let _ = reply.send(Status {
                    connected: sync.is_connected(),
                    caught_up: sync.is_caught_up(),
                    outbox: self.device.outbox_len(),
                });
            }
            Command::Secret(cmd) => self.secret_command(cmd).await,
            Command::Op { op, reply } => {
                let token = self.next_token;
                self.next_token += 1;
                // Made once connected (or caught up, for those that must see everything first).
                let sync_first = op.sync_first();
                self.ops.insert(token, (op, reply));
                let now = self.now_ms();
                let work = self.core.park(now, token, sync_first);
                self.carry(work).await;
            }
            Command::CreateChatWith { kind, title, others, reply } => {
                match self.device.create_chat_with(self.core.sync(), kind, &title, &others) {
                    Ok((chat, actions)) => {
                        let _ = reply.send(Ok(chat));
                        self.local(actions).await;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Rename { chat, title, reply } => match self.device.rename(self.core.sync(), chat, &title) {
                Ok(actions) => {
                    let _ = reply.send(Ok(()));
                    self.local(actions).await;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Read(read) => match read {
                ReadCmd::Chats(reply) => drop(reply.send(self.device.chats())),
                ReadCmd::Devices(reply) => drop(reply.send(self.device.devices())),
                ReadCmd::Contact(account, reply) => drop(reply.send(self.device.contact(account))),
            },
            Command::Stop { .. } => unreachable!("handled in run"),
        }
    }

    /// Makes an operation's next request; what the driver does next.
    fn op_send(&mut self, token: u64) -> Vec<Work> {
        let Some((op, _)) = self.ops.get_mut(&token) else { return Vec::new() };
        let device = &mut self.device;
        match self.core.try_request(token, |req| device.op_request(op, req)) {
            Ok(w) => vec![w],
            Err(e) => {
                if let Some((_, reply)) = self.ops.remove(&token) {
                    let _ = reply.send(Err(e));
                }
                Vec::new()
            }
        }
    }

    /// The relay answered an operation's request.
    fn op_answered(&mut self, token: u64, frame: RelayFrame) -> Vec<Work> {
        let Some((op, _)) = self.ops.get_mut(&token) else {
            tracing::debug!(?frame, "an answer for an operation that ended");
            return Vec::new();
        };
        match self.device.op_answer(op, frame) {
            Ok(Step::Next) => self.op_send(token),
            Ok(Step::AfterSync) => {
                // What the device knows is behind the relay: the heads are asked for again
                // first, so that "caught up" covers what the refusal was about.
                let now = self.now_ms();
                let mut work = self.device.session_step(&mut self.core, now, SessionInput::Refresh);
                work.extend(self.core.park(now, token, true));
                work
            }
            Ok(Step::Done(out)) => {
                if let Some((_, reply)) = self.ops.remove(&token) {
                    let _ = reply.send(Ok(out));
                }
                Vec::new()
            }
            Err(e) => {
                if let Some((_, reply)) = self.ops.remove(&token) {
                    let _ = reply.send(Err(e));
                }
                Vec::new()
            }
        }
    }
}

#[path = "session_secret_cmds.rs"]
mod secret_cmds;

#[path = "session_methods.rs"]
mod methods;

/// Most frames from the relay taken in one step (see [`Device::session_steps`]): as many as
/// [`Device::carry_out`] carries out together, so that acks and pushes are taken as fast as a
/// batch of the app's writes (up to [`MAX_WRITE_BATCH`]) makes them.
const MAX_FRAMES_PER_STEP: usize = 512;

/// Most writes carried out under one store barrier.
const MAX_WRITE_BATCH: usize = 256;

/// The app's writes waiting for the session, from `first` on, up to [`MAX_WRITE_BATCH`] and
/// without waiting for more; and the first other command taken, which comes after them.
fn take_writes(first: Command, commands: &mut mpsc::Receiver<Command>) -> (Vec<WriteCmd>, Option<Command>) {
    let mut writes = Vec::new();
    let mut next = Some(first);
    while let Some(cmd) = next.take() {
        match cmd {
            Command::Write { chat, write, reply } => writes.push((chat, write, reply)),
            other => return (writes, Some(other)),
        }
        if writes.len() < MAX_WRITE_BATCH {
            next = commands.try_recv().ok();
        }
    }
    (writes, None)
}

/// An operation answered with another kind of result: a bug in the session.
fn unexpected(out: OpOut) -> Error {
    tracing::error!(?out, "an operation gave an unexpected result");
    Error::Relay { code: crate::proto::wire::ErrorCode::Internal, message: "unexpected result".into() }
}

async fn hub_recv(hub: Option<&mut SecretHub>) -> Input {
    match hub {
        Some(h) => h.recv().await,
        None => std::future::pending().await,
    }
}

async fn barrier_done(
    barrier: Option<&mut tokio::task::JoinHandle<Result<(), String>>>,
) -> Result<Result<(), String>, tokio::task::JoinError> {
    match barrier {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

async fn recv(link: Option<&mut RelayLink>) -> Result<Option<RelayFrame>, NetError> {
    match link {
        Some(l) => l.recv().await,
        None => std::future::pending().await,
    }
}

async fn connected(
    connecting: Option<&mut tokio::task::JoinHandle<Result<RelayStream, NetError>>>,
) -> Result<RelayStream, NetError> {
    match connecting {
        Some(task) => match task.await {
            Ok(r) => r,
            Err(e) => Err(NetError::Unreachable(e.to_string())),
        },
        None => std::future::pending().await,
    }
}
