//! `stratus`: the reference Stratus device, a CLI on the engine.
//!
//! Commands run on the device's store (`local.rs`) and print through `print.rs`.
//!
//! Exit codes: 0 success; 1 error (one line on stderr); 2 usage error; 3 the relay was
//! unreachable — what was written stays queued on this device and is sent by the next
//! `send`, `sync` or `watch`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stratus_engine::{ChatId, Device, Error};

mod local;
mod members;
mod print;
mod secret;
mod view;

use print::Shown;

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
    /// Print JSON: one object per line.
    #[arg(long, global = true)]
    json: bool,
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
    Devices,
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
    Log { chat: ChatId },
    /// Stay connected and print each new message as it arrives, secret chats' too (this device
    /// stays reachable for them, and delivers what waits whenever the other device is).
    Watch {
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
    List,
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
    List,
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
            ExitCode::FAILURE
        }
        Err(Failure::Other(e)) => {
            eprintln!("stratus: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let device = Device::open(&cli.home)?;
    match cli.command {
        Command::Watch { tcp } => watch(device, tcp, cli.json).await,
        command => local::run(device, command, cli.json).await,
    }
}

/// `watch`: runs the device and prints its events.
async fn watch(device: Device, tcp: stratus_engine::libp2p::Multiaddr, json: bool) -> Result<(), Failure> {
    use tokio::sync::broadcast::error::RecvError;
    device.account().ok_or(Error::NotLoggedIn)?;
    let mut session = secret::session(device, tcp)?;
    let mut events = session.events();
    loop {
        match events.recv().await {
            Ok(e) => {
                if let Some(v) = view::EventView::of(&e) {
                    print::event(&v, json, Shown::Everything)?;
                }
            }
            Err(RecvError::Lagged(n)) => eprintln!("stratus: {n} events skipped (output too slow)"),
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}
