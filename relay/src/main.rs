//! `stratus-relay`: the Stratus cloud store server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
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
    #[arg(long, global = true, default_value_os_t = Settings::default().data_dir)]
    data_dir: PathBuf,
    /// Where the owner-only admin socket is (default: admin.sock in the data directory).
    #[arg(long, global = true, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_socket: Option<PathBuf>,
    /// Multiaddr to listen on (TCP).
    #[arg(long, default_value_t = Settings::default().listen)]
    listen: libp2p::Multiaddr,
    /// Multiaddr to serve WebSocket on as well, e.g. /ip4/127.0.0.1/tcp/8080/ws behind a
    /// reverse proxy that terminates TLS (devices then dial /dns4/HOST/tcp/443/wss/p2p/ID);
    /// off by default. Plain /ws only.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen_ws: Option<libp2p::Multiaddr>,
    /// Most connections in total; more are closed after the handshake.
    #[arg(long, default_value_t = Settings::default().max_connections)]
    max_connections: u32,
    /// Most connections from one device.
    #[arg(long, default_value_t = Settings::default().max_connections_per_peer)]
    max_connections_per_peer: u32,
    /// Most sync streams per connection; more are reset.
    #[arg(long, default_value_t = Settings::default().max_streams_per_connection)]
    max_streams_per_connection: u32,
    /// Longest frame a device may send, in bytes.
    #[arg(long, default_value_t = Settings::default().max_frame_bytes)]
    max_frame_bytes: usize,
    /// Most catch-up pages one device may have asked for and not yet received.
    #[arg(long, default_value_t = Settings::default().max_fetches_in_flight)]
    max_fetches_in_flight: u32,
    /// Most appends of one device waiting for their fsync barrier.
    #[arg(long, default_value_t = Settings::default().max_appends_in_flight)]
    max_appends_in_flight: u32,
    /// Sustained requests per second per device; 0 turns the rate limit off.
    #[arg(long, default_value_t = Settings::default().requests_per_second)]
    requests_per_second: u32,
    /// Requests per device allowed at once above the sustained rate.
    #[arg(long, default_value_t = Settings::default().request_burst)]
    request_burst: u32,
    /// Seconds a device's session must have existed before it may end other sessions.
    #[arg(long, default_value_t = Settings::default().min_session_age_secs)]
    min_session_age_secs: u64,
    /// Most devices reachable through the relay (circuit reservations, for secret chats).
    #[arg(long, default_value_t = Settings::default().max_reservations)]
    max_reservations: u32,
    /// Most relayed connections between devices at once (0: none, the relay relays nothing).
    #[arg(long, default_value_t = Settings::default().max_circuits)]
    max_circuits: u32,
    /// Most relayed connections one device takes part in at once.
    #[arg(long, default_value_t = Settings::default().max_circuits_per_peer)]
    max_circuits_per_peer: u32,
    /// Seconds a relayed connection may last.
    #[arg(long, default_value_t = Settings::default().max_circuit_secs)]
    max_circuit_secs: u32,
    /// Bytes a relayed connection may carry, both ways (0: no limit).
    #[arg(long, default_value_t = Settings::default().max_circuit_bytes)]
    max_circuit_bytes: u64,
    /// Bytes that may wait to be written to one device stream before pushes to it are dropped
    /// (it is then told what it missed and fetches it).
    #[arg(long, default_value_t = Settings::default().max_push_backlog_bytes)]
    max_push_backlog_bytes: u64,
    /// Seconds a device stream may have frames waiting with none written before it is cut off.
    #[arg(long, default_value_t = Settings::default().stalled_reader_secs)]
    stalled_reader_secs: u64,
    /// Bytes one account may have the relay store (0: no quota); past it, appends, new chats
    /// and added members are refused with `QuotaExceeded`.
    #[arg(long, default_value_t = Settings::default().max_account_bytes)]
    max_account_bytes: u64,
    /// Most key epochs a chat reaches by adding members; then adding is refused.
    #[arg(long, default_value_t = Settings::default().max_chat_epochs)]
    max_chat_epochs: u32,
    /// Seconds between member changes of one chat, sustained (0: no limit); leaving is never
    /// limited.
    #[arg(long, default_value_t = Settings::default().member_change_interval_secs)]
    member_change_interval_secs: u64,
    /// Member changes a chat may have at once above the sustained rate.
    #[arg(long, default_value_t = Settings::default().member_change_burst)]
    member_change_burst: u32,
    /// Requests per second from a peer with no session on this relay (0 turns it off).
    #[arg(long, default_value_t = Settings::default().unregistered_requests_per_second)]
    unregistered_requests_per_second: u32,
    /// Requests such a peer may send at once above the sustained rate.
    #[arg(long, default_value_t = Settings::default().unregistered_request_burst)]
    unregistered_request_burst: u32,
    /// Bytes per second one account's devices may append, sustained (0 turns it off); over
    /// it an append gets `RateLimited` with the wait.
    #[arg(long, default_value_t = Settings::default().append_bytes_per_second)]
    append_bytes_per_second: u64,
    /// Bytes one account may append at once above the sustained rate (at least the largest
    /// delta, 65,728).
    #[arg(long, default_value_t = Settings::default().append_bytes_burst)]
    append_bytes_burst: u64,
    /// An address devices can reach the relay at (repeatable), when it is not the one it
    /// listens on (behind NAT or a port forward). Devices reachable through the relay are given
    /// these.
    #[arg(long = "external-address")]
    external_addresses: Vec<libp2p::Multiaddr>,
    /// Address of the admin HTTP listener (/metrics, /healthz, /readyz), e.g. 127.0.0.1:9101;
    /// off by default. Only loopback addresses unless --admin-http-allow-remote.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_http: Option<std::net::SocketAddr>,
    /// Lets --admin-http listen on an address other hosts can reach (it has no authentication).
    #[arg(long)]
    admin_http_allow_remote: bool,
    /// Seconds a stopping relay (SIGTERM, SIGINT) lets what it accepted finish and its devices'
    /// streams close before it exits anyway.
    #[arg(long, default_value_t = Settings::default().shutdown_grace_secs)]
    shutdown_grace_secs: u64,
    /// Log lines as text or as one JSON object per line.
    #[arg(long, value_enum, default_value_t = Settings::default().log_format)]
    log_format: LogFormat,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Copies the running relay's store (as durable when the copy is done) and identity key into
    /// a new or empty directory, through its admin socket; the relay keeps serving meanwhile.
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
        /// Brings back, as the backup has them, the accounts deleted after it was made; without
        /// it the relay deletes them again as it starts.
        #[arg(long)]
        undelete: bool,
    },
    /// Administers the running relay through its admin socket (only as the user it runs as):
    /// accounts, their quotas, suspending, banning and deleting them, and registration.
    Admin {
        /// Prints the relay's answer as one line of JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(clap::Subcommand)]
enum AdminCommand {
    /// Lists every account with its devices, storage and last activity.
    Accounts,
    /// Sets an account's byte quota in place of max_account_bytes: a number of bytes (0: no
    /// quota), or `default` for the relay's again.
    Quota {
        /// The account's id or username.
        account: String,
        /// Bytes, or `default`.
        bytes: String,
    },
    /// Suspends an account: its devices are refused until `unsuspend`; nothing is deleted.
    Suspend {
        /// The account's id or username.
        account: String,
    },
    /// Lifts an account's suspension or ban.
    Unsuspend {
        /// The account's id or username.
        account: String,
    },
    /// Bans an account: its devices are refused, and it and they cannot register again.
    Ban {
        /// The account's id or username.
        account: String,
    },
    /// Deletes an account: its devices, records and the chats only it is in go; the chats it
    /// shares stay for their other members.
    Delete {
        /// The account's id or username.
        account: String,
    },
    /// Shows or sets who may make an account: open (anyone), invite (with a token from
    /// `admin invite create`) or closed.
    Registration {
        #[arg(value_parser = ["open", "invite", "closed"])]
        mode: Option<String>,
    },
    /// Invite tokens for registration by invitation.
    Invite {
        #[command(subcommand)]
        command: InviteCommand,
    },
}

#[derive(clap::Subcommand)]
enum InviteCommand {
    /// Makes an invite token, good for one new account; prints it.
    Create,
    /// Lists the unused invite tokens by id (the relay keeps only a digest of each token).
    List,
    /// Revokes an unused invite token: no account can be made with it any more.
    Revoke {
        /// The token (`stratus-invite-…`) or its id as `invite list` shows it.
        invite: String,
    },
}

/// `stratus-relay admin …`: one request to the running relay, its answer printed.
fn admin(socket: &std::path::Path, json: bool, command: &AdminCommand) -> ExitCode {
    use stratus_relay::admin::client;
    let fail = |e: String| {
        eprintln!("stratus-relay: admin: {e}");
        ExitCode::FAILURE
    };
    let request = match command {
        AdminCommand::Accounts => serde_json::json!({ "command": "accounts" }),
        AdminCommand::Quota { account, bytes } => {
            let bytes = match bytes.as_str() {
                "default" => None,
                n => match n.parse::<u64>() {
                    Ok(n) => Some(n),
                    Err(_) => return fail(format!("{n:?} is not a number of bytes nor `default`")),
                },
            };
            serde_json::json!({ "command": "quota", "account": account, "bytes": bytes })
        }
        AdminCommand::Suspend { account } => serde_json::json!({ "command": "suspend", "account": account }),
        AdminCommand::Unsuspend { account } => serde_json::json!({ "command": "unsuspend", "account": account }),
        AdminCommand::Ban { account } => serde_json::json!({ "command": "ban", "account": account }),
        AdminCommand::Delete { account } => serde_json::json!({ "command": "delete", "account": account }),
        AdminCommand::Registration { mode } => serde_json::json!({ "command": "registration", "mode": mode }),
        AdminCommand::Invite { command: InviteCommand::Create } => serde_json::json!({ "command": "invite_create" }),
        AdminCommand::Invite { command: InviteCommand::List } => serde_json::json!({ "command": "invite_list" }),
        AdminCommand::Invite { command: InviteCommand::Revoke { invite } } => {
            serde_json::json!({ "command": "invite_revoke", "invite": invite })
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let result = match rt.block_on(client::request(socket, &request)) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if json {
        println!("{result}");
        return ExitCode::SUCCESS;
    }
    let text = match command {
        AdminCommand::Accounts => client::accounts_text(&result),
        AdminCommand::Quota { .. } => client::account_text(&result, "quota set"),
        AdminCommand::Suspend { .. } => {
            client::account_text(&result, "suspended: its devices are refused until `admin unsuspend`")
        }
        AdminCommand::Unsuspend { .. } => client::account_text(&result, "suspension and ban lifted"),
        AdminCommand::Ban { .. } => client::account_text(&result, "banned"),
        AdminCommand::Delete { .. } => client::deleted_text(&result),
        AdminCommand::Registration { .. } => client::registration_text(&result),
        AdminCommand::Invite { command: InviteCommand::List } => client::invites_text(&result),
        AdminCommand::Invite { command: InviteCommand::Revoke { .. } } => format!(
            "revoked invite {}; {} unused left",
            result.get("revoked").and_then(serde_json::Value::as_str).unwrap_or("?"),
            result.get("invites").and_then(serde_json::Value::as_u64).unwrap_or(0)
        ),
        AdminCommand::Invite { command: InviteCommand::Create } => {
            let mode = result.get("registration").and_then(serde_json::Value::as_str).unwrap_or("");
            if mode != "invite" {
                eprintln!(
                    "stratus-relay: note: registration is {mode}; the token is asked for only once it is invite                      (`stratus-relay admin registration invite`)"
                );
            }
            result.get("invite").and_then(serde_json::Value::as_str).unwrap_or("").to_string()
        }
    };
    println!("{text}");
    ExitCode::SUCCESS
}

fn backup(socket: &std::path::Path, to: &std::path::Path) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stratus-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(stratus_relay::admin::client::backup(socket, to)) {
        Ok((store, generation)) => {
            println!("backed up to {} (store and generation {store} {generation})", to.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stratus-relay: backup failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn restore(data_dir: &std::path::Path, socket: &std::path::Path, from: &std::path::Path, undelete: bool) -> ExitCode {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
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
    match stratus_relay::store::restore(from, &data_dir.join("store"), now_ms, undelete) {
        Ok(r) => {
            println!("restored {} as generation {}; start the relay", from.display(), r.incarnation.generation);
            if !r.deleted_since.is_empty() {
                let ids = r.deleted_since.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" ");
                match undelete {
                    true => {
                        println!("brought back {} account(s) deleted after the backup: {ids}", r.deleted_since.len())
                    }
                    false => println!(
                        "{} account(s) deleted after the backup will be deleted again as the relay starts \
                         (restore with --undelete to bring them back): {ids}",
                        r.deleted_since.len()
                    ),
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stratus-relay: restore failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The settings given on the command line, by name: only those, so that a flag's default does
/// not override the file or the environment.
fn given_flags(args: &Args, matches: &clap::ArgMatches) -> Result<figment::value::Dict, String> {
    let all = figment::value::Value::serialize(args).map_err(|e| format!("reading the flags: {e}"))?;
    let mut dict = all.into_dict().ok_or("reading the flags: not a map")?;
    dict.retain(|name, _| matches.value_source(name) == Some(clap::parser::ValueSource::CommandLine));
    Ok(dict)
}

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let flags = match given_flags(&args, &matches) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("stratus-relay: {e}");
            return ExitCode::FAILURE;
        }
    };
    let settings = match Settings::load(args.config.as_deref(), std::env::vars(), &flags) {
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
        Some(Command::Backup { to }) => return backup(&settings.admin_socket_path(), to),
        Some(Command::Restore { from, undelete }) => {
            return restore(&settings.data_dir, &settings.admin_socket_path(), from, *undelete)
        }
        Some(Command::Admin { json, command }) => return admin(&settings.admin_socket_path(), *json, command),
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
