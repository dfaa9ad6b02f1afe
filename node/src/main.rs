//! `stratus`: the reference Stratus device, a CLI on the engine.
//!
//! A command runs on the device's store, or, when a daemon (`stratus daemon` or `watch`) runs on
//! the home and holds the store, through the daemon's socket (`remote.rs`); either way it prints
//! the same (`print.rs`). The home is `--home`, else `STRATUS_HOME`, else
//! `$XDG_DATA_HOME/stratus` (`home.rs`); only `account create`, `account recover` and `device
//! link` make one.
//!
//! Exit codes: 0 success; 1 error (one line on stderr); 2 usage error; 3 the relay was
//! unreachable — what was written stays queued on this device and is sent by the next
//! `send`, `sync` or `watch` (or by the running daemon).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use stratus_engine::{ChatId, Device, Error};

mod daemon;
mod home;
mod local;
mod members;
mod print;
mod remote;
mod secret;
mod view;

use print::{out, Shown};

/// Exit code when the relay cannot be reached; the outbox keeps what was written.
const EXIT_UNREACHABLE: u8 = 3;
/// Failed connection attempts in a row (about 0.3 s with the session's backoff) before a
/// command gives up with [`EXIT_UNREACHABLE`].
const CONNECT_TRIES: u32 = 3;
/// How long a command waits for a store that another command holds (or a daemon that is still
/// starting) before it gives up.
const LOCKED_WAIT: Duration = Duration::from_secs(5);

/// A Stratus device: chats synced through a relay that cannot read them.
#[derive(Parser)]
#[command(name = "stratus", version)]
struct Cli {
    /// This device's directory (identity, store, outbox, the daemon's socket). Default:
    /// $STRATUS_HOME, else $XDG_DATA_HOME/stratus (~/.local/share/stratus). Only `account
    /// create`, `account recover` and `device link` make a new one.
    #[arg(long, global = true, value_name = "DIR")]
    home: Option<PathBuf>,
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
    /// stays reachable for them, and delivers what waits whenever the other device is). Serves
    /// other commands on this home meanwhile, as `daemon` does; if a daemon already runs, prints
    /// its events.
    Watch {
        /// The TCP address to listen on for direct connections of secret chats.
        #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
        tcp: stratus_engine::libp2p::Multiaddr,
    },
    /// Run this device: stay connected, keep its secret chats reachable, and serve other
    /// `stratus` commands and programs on the local socket HOME/stratus.sock (JSON-RPC,
    /// docs/daemon.md). Prints `listening PATH` once serving; stops on SIGINT or SIGTERM.
    Daemon {
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
        /// An invite token from the relay's operator (`stratus-invite-…`), for a relay that
        /// takes new accounts only by invitation.
        #[arg(long, value_name = "TOKEN")]
        invite: Option<stratus_engine::proto::wire::InviteToken>,
    },
    /// Move this device to its relay's new addresses (tried in this order, each ending in
    /// /p2p/<peer id>; /ip4, /ip6, /dns4, /dns6, each over TCP or /ws, /wss), e.g. after the
    /// relay moved host or port. Offline: the next sync connects there. Run it on each device.
    SetRelay {
        #[arg(required = true, value_name = "ADDR")]
        addrs: Vec<String>,
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
            Error::Net(
                stratus_engine::net::NetError::BadAddress(_)
                | stratus_engine::net::NetError::UnsupportedAddress(_)
                | stratus_engine::net::NetError::AddressCount(_),
            ) => Failure::Error(e),
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
            // One line: the engine's message, and what to run about it where a command helps.
            match hint(&e) {
                Some(hint) => eprintln!("stratus: {e}; {hint}"),
                None => eprintln!("stratus: {e}"),
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
        Error::Relay { code: stratus_engine::proto::wire::ErrorCode::InviteRequired, .. } => {
            "ask the relay's operator for an invite token and pass it with `--invite`".into()
        }
        _ => return None,
    })
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.json;
    let home = home::Home::resolve(cli.home).map_err(Failure::Other)?;
    // Only the commands that make an identity make a home; the others need a device there.
    let creates = matches!(
        cli.command,
        Command::Account { command: AccountCommand::Create { .. } | AccountCommand::Recover { .. } }
            | Command::Device { command: DeviceCommand::Link { .. } }
    );
    match creates {
        true if !home.has_device() => home.create().map_err(Failure::Other)?,
        true => {}
        false => home.require_device().map_err(Failure::Other)?,
    }
    let home = home.path;
    match cli.command {
        Command::Daemon { tcp } => serve(&home, tcp, json, Shown::State).await,
        Command::Watch { tcp } => serve(&home, tcp, json, Shown::Everything).await,
        command => match open(&home).await? {
            Home::Store(device) => local::run(device, command, json).await,
            Home::Daemon(mut client) => remote::run(&mut client, command, json).await,
        },
    }
}

/// Where a command runs.
enum Home {
    /// On the store: nobody else holds it.
    Store(Device),
    /// Through the daemon that holds it.
    Daemon(remote::Client),
}

/// The daemon if one answers on the home's socket, else the store. A store that another
/// process holds is waited for (up to [`LOCKED_WAIT`]): a daemon still starting answers soon,
/// another command ends soon.
async fn open(home: &Path) -> Result<Home, Failure> {
    let deadline = tokio::time::Instant::now() + LOCKED_WAIT;
    loop {
        if let Some(client) = remote::Client::connect(home).await {
            return Ok(Home::Daemon(client));
        }
        match Device::open(home) {
            Ok(device) => return Ok(Home::Store(device)),
            Err(e) if store_locked(&e) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) if store_locked(&e) => {
                return Err(Failure::Other(format!(
                    "another stratus command holds this home's store, and no daemon answers on {}; try again when \
                     it is done",
                    daemon::socket_path(home).display()
                )))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// sled refuses a store another process has open with an I/O error saying so (its only sign).
fn store_locked(e: &Error) -> bool {
    matches!(e, Error::Store(_)) && e.to_string().contains("could not acquire lock")
}

/// `daemon` and `watch`: runs the device and serves the home's socket, showing its events as
/// `shown` says. `watch` on a home whose daemon already runs prints that daemon's events.
async fn serve(home: &Path, tcp: stratus_engine::libp2p::Multiaddr, json: bool, shown: Shown) -> Result<(), Failure> {
    let device = match open(home).await? {
        Home::Store(device) => device,
        Home::Daemon(mut client) if shown == Shown::Everything => return remote::watch(&mut client, json).await,
        Home::Daemon(_) => {
            let at = daemon::socket_path(home);
            return Err(Failure::Other(format!("a daemon already serves this home on {}", at.display())));
        }
    };
    device.account().ok_or(Error::NotLoggedIn)?;
    let listener = daemon::Listener::bind(home).await?;
    let session = secret::session(device, tcp)?;
    let at = listener.path().display().to_string();
    match shown {
        Shown::State if json => out(&serde_json::json!({ "listening": at }).to_string()),
        Shown::State => out(&format!("listening {at}")),
        _ => eprintln!("stratus: serving {at} (other stratus commands on this home go through it)"),
    }
    daemon::serve(listener, session, move |e| match view::EventView::of(e) {
        Some(v) => print::event(&v, json, shown),
        None => Ok(()),
    })
    .await
}
