//! `stratus-relay`: the Stratus cloud store server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;
use stratus_relay::config::{LogFormat, Settings};
use stratus_relay::server;

/// Stores client-side-encrypted chat deltas durably and pushes them to every connected device.
#[derive(Parser, Serialize)]
#[command(
    name = "stratus-relay",
    version,
    after_help = "Every setting above can also be given in the --config file (as `max_connections = 100`) or \
                  as an environment variable (STRATUS_RELAY_MAX_CONNECTIONS=100); flags override the \
                  environment, which overrides the file. --print-config shows every setting's effective \
                  value, defaults included."
)]
struct Args {
    /// Without a command, the relay runs.
    #[command(subcommand)]
    #[serde(skip)]
    command: Option<Command>,
    /// A TOML file of settings (see --print-config for every setting and its form).
    #[arg(long, global = true, value_name = "PATH")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Prints the effective settings as TOML (defaults, file, environment and flags together)
    /// and exits.
    #[arg(long)]
    #[serde(skip)]
    print_config: bool,
    /// Directory for the sled store and the relay's identity key.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Multiaddr to listen on.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<libp2p::Multiaddr>,
    /// Most connections in total; more are closed after the handshake.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections: Option<u32>,
    /// Most connections from one device.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections_per_peer: Option<u32>,
    /// Most sync streams per connection; more are reset.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_streams_per_connection: Option<u32>,
    /// Longest frame a device may send, in bytes.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_frame_bytes: Option<usize>,
    /// Most catch-up pages one device may have asked for and not yet received.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_fetches_in_flight: Option<u32>,
    /// Most appends of one device waiting for their fsync barrier.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_appends_in_flight: Option<u32>,
    /// Sustained requests per second per device; 0 turns the rate limit off.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    requests_per_second: Option<u32>,
    /// Requests per device allowed at once above the sustained rate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    request_burst: Option<u32>,
    /// Seconds a device's session must have existed before it may end other sessions.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    min_session_age_secs: Option<u64>,
    /// Most devices reachable through the relay (circuit reservations, for secret chats).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_reservations: Option<u32>,
    /// Most relayed connections between devices at once (0: none, the relay relays nothing).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_circuits: Option<u32>,
    /// Most relayed connections one device takes part in at once.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_circuits_per_peer: Option<u32>,
    /// Seconds a relayed connection may last.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_circuit_secs: Option<u32>,
    /// Bytes a relayed connection may carry, both ways (0: no limit).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_circuit_bytes: Option<u64>,
    /// Bytes that may wait to be written to one device stream before pushes to it are dropped
    /// (it is then told what it missed and fetches it).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_push_backlog_bytes: Option<u64>,
    /// Seconds a device stream may have frames waiting with none written before it is cut off.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    stalled_reader_secs: Option<u64>,
    /// Bytes one account may have the relay store (0: no quota); past it, appends, new chats
    /// and added members are refused with `QuotaExceeded`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_account_bytes: Option<u64>,
    /// Most key epochs a chat reaches by adding members; then adding is refused.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_chat_epochs: Option<u32>,
    /// Seconds between member changes of one chat, sustained (0: no limit); leaving is never
    /// limited.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    member_change_interval_secs: Option<u64>,
    /// Member changes a chat may have at once above the sustained rate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    member_change_burst: Option<u32>,
    /// Requests per second from a peer with no session on this relay (0 turns it off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    unregistered_requests_per_second: Option<u32>,
    /// Requests such a peer may send at once above the sustained rate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    unregistered_request_burst: Option<u32>,
    /// An address devices can reach the relay at (repeatable), when it is not the one it
    /// listens on (behind NAT or a port forward). Devices reachable through the relay are given
    /// these.
    #[arg(long = "external-address")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    external_addresses: Vec<libp2p::Multiaddr>,
    /// Address of the admin HTTP listener (/metrics, /healthz, /readyz), e.g. 127.0.0.1:9101;
    /// off by default. Only loopback addresses unless --admin-http-allow-remote.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_http: Option<std::net::SocketAddr>,
    /// Lets --admin-http listen on an address other hosts can reach (it has no authentication).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    admin_http_allow_remote: bool,
    /// Log lines as text or as one JSON object per line [default: text].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Copies the running relay's store (as durable at that moment) and identity key into a new
    /// or empty directory, through its admin socket; the relay keeps serving.
    Backup {
        /// Where the copy goes (created if missing; refused if not empty).
        #[arg(long)]
        to: PathBuf,
    },
    /// Replaces the store of a stopped relay with a backup, as a new incarnation: devices that
    /// synced with any earlier one go back to where the logs still agree and send again what
    /// the relay lacks. The replaced store is kept as `store.replaced-<generation>`.
    Restore {
        /// A directory `stratus-relay backup` made.
        #[arg(long)]
        from: PathBuf,
    },
}

fn backup(data_dir: &std::path::Path, to: &std::path::Path) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stratus-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(stratus_relay::admin::request_backup(data_dir, to)) {
        Ok(answer) => {
            println!("backed up to {} (store and generation {answer})", to.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stratus-relay: backup failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn restore(data_dir: &std::path::Path, from: &std::path::Path) -> ExitCode {
    let socket = data_dir.join(stratus_relay::admin::SOCKET_NAME);
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        eprintln!("stratus-relay: restore failed: a relay is running on {}; stop it first", data_dir.display());
        return ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::create_dir_all(data_dir) {
        eprintln!("stratus-relay: restore failed: cannot create {}: {e}", data_dir.display());
        return ExitCode::FAILURE;
    }
    let key = data_dir.join("identity.key");
    let backup_key = from.join("identity.key");
    if !key.exists() && backup_key.exists() {
        if let Err(e) = std::fs::copy(&backup_key, &key).and_then(|_| std::fs::File::open(&key)?.sync_all()) {
            eprintln!("stratus-relay: restore failed: copying the identity key: {e}");
            return ExitCode::FAILURE;
        }
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    match stratus_relay::store::restore(from, &data_dir.join("store"), now_ms) {
        Ok(inc) => {
            println!("restored {} as generation {}; start the relay", from.display(), inc.generation);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stratus-relay: restore failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match Settings::load(args.config.as_deref(), std::env::vars(), &args) {
        Ok(s) => s,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("stratus-relay: {line}");
            }
            return ExitCode::FAILURE;
        }
    };
    if args.print_config {
        print!("{}", settings.print());
        return ExitCode::SUCCESS;
    }
    match &args.command {
        Some(Command::Backup { to }) => return backup(&settings.data_dir, to),
        Some(Command::Restore { from }) => return restore(&settings.data_dir, from),
        None => {}
    }
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG").unwrap_or_else(|_| "stratus_relay=info".into());
    // Colours only for a person at a terminal: a journal or a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi).with_env_filter(filter);
    match settings.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stratus-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(server::run(
        settings.server_config(),
        |addr| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening {addr}");
            let _ = out.flush();
        },
        shutdown_signal(),
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stratus-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
