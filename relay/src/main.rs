//! `stratus-relay`: the Stratus cloud store server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use stratus_relay::server::{self, Config};

/// Stores client-side-encrypted chat deltas durably and pushes them to every connected device.
#[derive(Parser)]
#[command(name = "stratus-relay", version)]
struct Args {
    /// Directory for the sled store and the relay's identity key.
    #[arg(long, default_value = "./stratus-relay-data")]
    data_dir: PathBuf,
    /// Multiaddr to listen on.
    #[arg(long, default_value = "/ip4/0.0.0.0/tcp/4001")]
    listen: libp2p::Multiaddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG").unwrap_or_else(|_| "stratus_relay=info".into()),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stratus-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = Config { data_dir: args.data_dir, listen: args.listen };
    let result = rt.block_on(server::run(
        config,
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
