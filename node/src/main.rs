//! `stratus`: the reference Stratus device, a CLI on the engine.
//!
//! Exit codes: 0 success; 1 error (one line on stderr); 2 usage error; 3 the relay was
//! unreachable — what was written stays queued on this device and is sent by the next
//! `send`, `sync` or `watch`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use stratus_engine::proto::wire::ErrorCode;
use stratus_engine::{ChatId, Device, Error, Event, LinkCode, Message, MessageOp, Session};

/// Exit code when the relay cannot be reached; the outbox keeps what was written.
const EXIT_UNREACHABLE: u8 = 3;
/// Failed connection attempts in a row (about 0.3 s with the session's backoff) before a
/// command gives up with [`EXIT_UNREACHABLE`].
const CONNECT_TRIES: u32 = 3;

/// A Stratus device: chats synced through a relay that cannot read them.
#[derive(Parser)]
#[command(name = "stratus", version)]
struct Cli {
    /// This device's directory (identity, store, outbox).
    #[arg(long, global = true, default_value = "./stratus-home")]
    home: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Account commands.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Device (session) commands.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Chat commands.
    Chat {
        #[command(subcommand)]
        command: ChatCommand,
    },
    /// Other accounts: check that an account is who it says it is.
    Contact {
        #[command(subcommand)]
        command: members::ContactCommand,
    },
    /// Every session (device) of the account, as the relay and this device know them.
    Devices {
        #[arg(long)]
        json: bool,
    },
    /// Write a message: durable here first, exit 0 once the relay acknowledged it.
    Send { chat: ChatId, text: String },
    /// Answer a message (MESSAGE: its id, as `log` and `send` print it).
    Reply { chat: ChatId, message: String, text: String },
    /// Change the text of one of this account's messages; every device shows it edited.
    Edit { chat: ChatId, message: String, text: String },
    /// Delete one of this account's messages for everyone.
    Delete { chat: ChatId, message: String },
    /// Mark the chat read up to a message (the last one if none is given), on every device of
    /// the account and as a read receipt for the other members.
    Read { chat: ChatId, message: Option<String> },
    /// Tell the chat's members' connected devices that you are typing (shown for 6 seconds;
    /// never stored).
    Typing { chat: ChatId },
    /// React to a message (one emoji or word), or take the reaction back with --remove.
    React {
        chat: ChatId,
        message: String,
        reaction: String,
        #[arg(long)]
        remove: bool,
    },
    /// Connect, send the outbox, catch up, exit.
    Sync,
    /// This device's history of a chat, in display order.
    Log {
        chat: ChatId,
        #[arg(long)]
        json: bool,
    },
    /// Stay connected and print each new message as it arrives, secret chats' too (this device
    /// stays reachable for them, and delivers what waits whenever the other device is).
    Watch {
        #[arg(long)]
        json: bool,
        /// The TCP address to listen on for direct connections of secret chats.
        #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
        tcp: stratus_engine::libp2p::Multiaddr,
    },
    /// Secret chats: this device and one device of another account, never on the relay.
    Secret {
        #[command(subcommand)]
        command: secret::SecretCommand,
    },
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Create an account on a relay with this device as its first device.
    Create {
        /// The relay's multiaddr, ending in /p2p/<peer id> (as `stratus-relay` prints it).
        #[arg(long)]
        relay: String,
        /// A name for this device.
        #[arg(long)]
        name: String,
    },
    /// End the account's sessions that stay inactive for more than DAYS days (0: never).
    SetSessionTtl { days: u32 },
    /// Make a recovery key (printed once; keep it safe) and store the account's keys on the
    /// relay sealed under it. A new key replaces the old one.
    RecoveryKey,
    /// Log this new device in with a recovery key (read from standard input) and pull the
    /// whole history.
    Recover {
        #[arg(long)]
        relay: String,
        #[arg(long)]
        name: String,
    },
    /// Take NAME as this account's username on the relay (3 to 32 of a-z, 0-9 and _, starting
    /// with a letter), so that others can find it; --clear releases it.
    SetUsername {
        #[arg(required_unless_present = "clear")]
        name: Option<String>,
        #[arg(long, conflicts_with = "name")]
        clear: bool,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Log this device in to an existing account: prints a link code, waits for approval,
    /// pulls the history.
    Link {
        #[arg(long)]
        relay: String,
        #[arg(long)]
        name: String,
    },
    /// Approve a new device by the link code it shows.
    Approve { code: String },
    /// The account's devices known to this device (offline; `stratus devices` asks the relay).
    List {
        #[arg(long)]
        json: bool,
    },
    /// End another device's session: it is cut off at once and its account data deleted when
    /// it next reaches the relay. DEVICE is a device id or a name only one session has.
    Revoke { device: String },
}

#[derive(Subcommand)]
enum ChatCommand {
    /// Create a chat: notes (this account alone) with --title, a direct chat with --direct
    /// USER, or a group with --group --title T --member USER...; prints its id alone.
    Create {
        #[arg(long, required_unless_present = "direct")]
        title: Option<String>,
        /// A direct chat with this user.
        #[arg(long, conflicts_with_all = ["group", "member"])]
        direct: Option<String>,
        /// A group (with --member for each other member).
        #[arg(long, requires = "title")]
        group: bool,
        /// A member of the group (by username); repeat for more.
        #[arg(long, requires = "group")]
        member: Vec<String>,
    },
    /// The chats on this device.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add users to a group. With --share-history they read what was written before they
    /// joined; without, from their joining on.
    Add {
        chat: ChatId,
        #[arg(required = true)]
        users: Vec<String>,
        #[arg(long)]
        share_history: bool,
    },
    /// Remove a user from a group (only the group's creator may): nothing written afterwards
    /// is readable to them.
    Remove { chat: ChatId, user: String },
    /// Leave a chat: the others go on under a new key; what this device has stays readable.
    Leave { chat: ChatId },
    /// Give a chat a new title.
    Rename { chat: ChatId, title: String },
}

enum Failure {
    Error(Error),
    Unreachable(String),
    Other(String),
}

impl From<stratus_engine::net::NetError> for Failure {
    fn from(e: stratus_engine::net::NetError) -> Self {
        Error::Net(e).into()
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        match e {
            Error::Net(stratus_engine::net::NetError::BadAddress(_)) => Failure::Error(e),
            Error::Net(n) => Failure::Unreachable(n.to_string()),
            e => Failure::Error(e),
        }
    }
}

fn main() -> ExitCode {
    // A panic is a bug in stratus: say so in one line, without a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("stratus: internal error{at}; please report it");
    }));
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG").unwrap_or_else(|_| "off".into()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stratus: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Unreachable(why)) => {
            eprintln!("stratus: relay unreachable ({why}); anything written stays queued on this device");
            ExitCode::from(EXIT_UNREACHABLE)
        }
        Err(Failure::Error(e)) => {
            eprintln!("stratus: {e}");
            if let Some(hint) = hint(&e) {
                eprintln!("stratus: {hint}");
            }
            ExitCode::FAILURE
        }
        Err(Failure::Other(e)) => {
            eprintln!("stratus: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What to run about `e`, where a command helps: the engine's messages name no commands.
fn hint(e: &Error) -> Option<String> {
    Some(match e {
        Error::NotLoggedIn => "run `stratus account create` or `stratus device link` first".into(),
        Error::UnknownChat(_) => "see `stratus chat list`".into(),
        Error::UnknownSecret(_) => "see `stratus secret list`".into(),
        Error::BadLinkCode => "copy it exactly as `stratus device link` printed it".into(),
        Error::KeyChanged { username, number, .. } => {
            format!("after comparing: `stratus contact verify {username} --confirm \"{number}\"`")
        }
        Error::SecretNotAccepted(id) => format!("accept it with `stratus secret accept {id}`"),
        _ => return None,
    })
}

fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn message_json(chat: ChatId, m: &Message) -> String {
    serde_json::json!({
        "chat": chat.to_string(),
        "id": m.id,
        "author": m.author,
        "device": m.device,
        "text": m.text,
        "ts": m.ts,
        "reply_to": m.reply_to,
        "edited": m.edited,
        "deleted": m.deleted,
        "reactions": m.reactions,
        "attachments": m.attachments,
        "read_by": m.read_by,
    })
    .to_string()
}

/// `TS AUTHOR@DEVICE [ID]: TEXT`, then what happened to it: `(edited)`, `(deleted)`, the
/// message it answers, and reactions with their counts. Ids, authors and devices shortened to
/// their last 8 characters (`log --json` has them whole).
fn message_line(m: &Message) -> String {
    let short = |s: &str| s.chars().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect::<String>();
    let mut line = format!("{} {}@{} [{}]: ", m.ts, short(&m.author), short(&m.device), short(&m.id));
    if m.deleted {
        line.push_str("(deleted)");
    } else {
        line.push_str(&m.text);
        if m.edited.is_some() {
            line.push_str(" (edited)");
        }
    }
    if let Some(to) = &m.reply_to {
        line.push_str(&format!(" ↩ {}", short(to)));
    }
    for (reaction, accounts) in &m.reactions {
        line.push_str(&format!(" {reaction}×{}", accounts.len()));
    }
    if !m.read_by.is_empty() {
        line.push_str(&format!(" ✓{}", m.read_by.len()));
    }
    line
}

/// Carries out a message operation here and waits until the relay has it.
async fn write_and_sync(mut device: Device, chat: ChatId, op: MessageOp) -> Result<Message, Failure> {
    device.account().ok_or(Error::NotLoggedIn)?;
    let (message, _) = device.write_local(chat, &op)?;
    sync_until_idle(device).await?;
    Ok(message)
}

/// Runs a request signed with the account's keys; if the relay answers that a rotation replaced
/// them (`StaleEpoch`), syncs (which takes the new keys from the account log) and runs it again.
macro_rules! with_current_keys {
    ($device:ident, $request:expr) => {{
        let mut attempt = 1;
        loop {
            match $request {
                Err(Error::Relay { code: ErrorCode::StaleEpoch, .. }) if attempt < CONNECT_TRIES => {
                    attempt += 1;
                    $device = sync_until_idle($device).await?;
                }
                result => break result?,
            }
        }
    }};
}

mod members;
mod secret;

async fn run(cli: Cli) -> Result<(), Failure> {
    let mut device = Device::open(&cli.home)?;
    match cli.command {
        Command::Account { command: AccountCommand::Create { relay, name } } => {
            let id = device.create_account(&relay, &name).await?;
            out(&format!("account: {id}"));
        }
        Command::Account { command: AccountCommand::SetSessionTtl { days } } => {
            device.set_session_ttl(days).await?;
            out(&match days {
                0 => "sessions never expire".to_string(),
                d => format!("sessions inactive for more than {d} days end"),
            });
        }
        Command::Account { command: AccountCommand::RecoveryKey } => {
            let key = with_current_keys!(device, device.create_recovery_key().await);
            out(&format!("recovery key: {key}"));
            eprintln!("stratus: write it down and keep it safe; it is not stored anywhere and logs anyone in");
        }
        Command::Account { command: AccountCommand::Recover { relay, name } } => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map_err(|e| Failure::Other(format!("reading the key: {e}")))?;
            let key: stratus_engine::proto::crypto::RecoveryKey =
                line.trim().parse().map_err(|_| Failure::Other("not a recovery key (stratus-recovery-…)".into()))?;
            let id = device.recover(&relay, &name, &key).await?;
            out(&format!("recovered account {id}; pulling history"));
            let device = sync_until_idle(device).await?;
            out(&format!("history pulled: {} chats", device_chats(device)?));
        }
        Command::Device { command: DeviceCommand::Link { relay, name } } => {
            if let Some(a) = device.account() {
                return Err(Error::AlreadyLoggedIn(a.to_string()).into());
            }
            let code = device.link_code()?;
            out(&format!("link code: {code}"));
            let id = device.link(&relay, &name, &code).await?;
            out(&format!("linked to account {id}; pulling history"));
            let device = sync_until_idle(device).await?;
            out(&format!("history pulled: {} chats", device_chats(device)?));
        }
        Command::Device { command: DeviceCommand::Approve { code } } => {
            let code: LinkCode = code.parse()?;
            let (id, name) = with_current_keys!(device, device.approve(&code).await);
            out(&format!("approved {id} ({name})"));
        }
        Command::Device { command: DeviceCommand::List { json } } => {
            for cert in device.devices()? {
                let this = cert.body.device == *device.id();
                if json {
                    out(&serde_json::json!({
                        "device": cert.body.device.to_string(),
                        "name": cert.body.name,
                        "created_ms": cert.body.created_ms,
                        "this": this,
                    })
                    .to_string());
                } else {
                    out(&format!(
                        "{} {}{}",
                        cert.body.device,
                        cert.body.name,
                        if this { " (this device)" } else { "" }
                    ));
                }
            }
        }
        Command::Devices { json } => {
            let (sessions, ttl) = device.sessions().await?;
            if !json {
                match ttl {
                    0 => out("sessions never expire (set with `stratus account set-session-ttl DAYS`)"),
                    d => out(&format!("sessions inactive for more than {d} days end")),
                }
            }
            for s in sessions {
                if json {
                    out(&serde_json::to_string(&s).map_err(|e| Failure::Other(e.to_string()))?);
                } else {
                    let active = if s.online { "online now".to_string() } else { time(s.last_active_ms) };
                    out(&format!(
                        "{} {}  created {}  last active {}{}",
                        s.device,
                        s.name.as_deref().unwrap_or("(not yet synced)"),
                        time(s.created_ms.unwrap_or(s.registered_ms)),
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
            out(&format!("revoked {target}; the account's keys are rotated"));
        }
        Command::Chat { command: ChatCommand::Create { title, direct, group, member } } => {
            let chat = members::create_chat(device, title, direct, group, member).await?;
            out(&chat.to_string());
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
            out(&match name {
                Some(n) => format!("username: {n}"),
                None => "username released".into(),
            });
        }
        Command::Contact { command } => members::contact(device, command).await?,
        Command::Secret { command } => secret::secret(device, command).await?,
        Command::Chat { command: ChatCommand::List { json } } => {
            for c in device.chats()? {
                if json {
                    out(&serde_json::to_string(&c).map_err(|e| Failure::Other(e.to_string()))?);
                } else {
                    let title = match c.title.as_deref() {
                        Some(t) if !t.is_empty() => t.to_string(),
                        _ if !c.members.is_empty() => c.members.join(", "),
                        _ => "(untitled)".into(),
                    };
                    let left = if c.left { ", left" } else { "" };
                    out(&format!(
                        "{} {} [{}] ({} messages, {} unread{left})",
                        c.id, title, c.kind, c.messages, c.unread
                    ));
                }
            }
        }
        Command::Send { chat, text } => {
            device.account().ok_or(Error::NotLoggedIn)?;
            let (msg, _) = device.compose(chat, &text)?;
            sync_until_idle(device).await?;
            out(&msg.id);
        }
        Command::Reply { chat, message, text } => {
            let m = write_and_sync(device, chat, MessageOp::Send { text, reply_to: Some(message) }).await?;
            out(&m.id);
        }
        Command::Edit { chat, message, text } => {
            write_and_sync(device, chat, MessageOp::Edit { id: message, text }).await?;
        }
        Command::Delete { chat, message } => {
            write_and_sync(device, chat, MessageOp::Delete { id: message }).await?;
        }
        Command::React { chat, message, reaction, remove } => {
            write_and_sync(device, chat, MessageOp::React { id: message, reaction, add: !remove }).await?;
        }
        Command::Read { chat, message } => {
            let last = device.messages(chat)?.last().map(|m| m.id.clone());
            let Some(id) = message.or(last) else { return Ok(()) };
            write_and_sync(device, chat, MessageOp::Read { id }).await?;
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
            out(&format!("synced: {} chats, outbox empty", device_chats(device)?));
        }
        Command::Log { chat, json } => {
            for m in device.messages(chat)? {
                out(&if json { message_json(chat, &m) } else { message_line(&m) });
            }
        }
        Command::Watch { json, tcp } => {
            device.account().ok_or(Error::NotLoggedIn)?;
            let mut session = secret::session(device, tcp)?;
            let mut events = session.events();
            loop {
                let e = match events.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        eprintln!("stratus: {n} events skipped (output too slow)");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                match e {
                    Event::MessageAdded { chat, message, local: false }
                    | Event::MessageChanged { chat, message, local: false } => {
                        out(&if json { message_json(chat, &message) } else { message_line(&message) })
                    }
                    Event::Typing { chat, account, device } => out(&if json {
                        serde_json::json!({ "chat": chat.to_string(), "typing": account, "device": device }).to_string()
                    } else {
                        format!("{account} is typing in {chat}")
                    }),
                    Event::Read { chat, account, up_to } => out(&if json {
                        serde_json::json!({ "chat": chat.to_string(), "read": account, "up_to": up_to }).to_string()
                    } else {
                        format!("read by {account} up to {up_to}")
                    }),
                    Event::Disconnected { reason } => eprintln!("stratus: disconnected ({reason}); retrying"),
                    Event::Error { message } => eprintln!("stratus: {message}"),
                    Event::CaughtUp => eprintln!("stratus: caught up"),
                    Event::SessionRevoked => return Err(Error::SessionRevoked.into()),
                    e => secret::print_event(&e, json),
                }
            }
        }
    }
    Ok(())
}

fn device_chats(mut device: Device) -> Result<usize, Failure> {
    Ok(device.chats()?.len())
}

/// Runs a session until the outbox is empty and the device is caught up. Fails with
/// `Unreachable` if the relay cannot be reached.
async fn sync_until_idle(device: Device) -> Result<Device, Failure> {
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
            Event::Rejected { message, code, .. } => {
                return Err(Failure::Other(format!("the relay rejected a message: {message} ({code:?})")))
            }
            Event::Error { message } => eprintln!("stratus: {message}"),
            Event::SessionRevoked => return Err(Error::SessionRevoked.into()),
            _ => {}
        }
    }
}

/// A time in milliseconds since the Unix epoch, as RFC 3339 in UTC (or "unknown" for 0).
fn time(ms: u64) -> String {
    if ms == 0 {
        return "unknown".into();
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
