//! `stratus daemon` (and `stratus watch`): the device's [`Session`] runs, holding the store, and
//! serves other `stratus` commands and programs on a local socket, `<home>/stratus.sock`.
//! The protocol is newline-delimited JSON-RPC 2.0 (docs/daemon.md).
//!
//! Who may connect: the socket is made owner-only (0600, created inside a private directory and
//! moved into place, so it is never reachable with looser rights), and a connection whose peer
//! runs as another user is refused with `wrong_user` even so.
//!
//! Bounds, each with what happens when it is hit:
//! - [`MAX_CLIENTS`] connections at once; one more gets `too_many_clients` and is closed.
//! - A request line is at most [`MAX_REQUEST_BYTES`]; a longer one gets `request_too_large` and
//!   the connection is closed, nothing done.
//! - Per connection, one request runs at a time (the next line is read when it is answered);
//!   each gets [`REQUEST_TIMEOUT`], then `timeout`.
//! - What waits to go out to a connection is its one answer and, when subscribed, the session's
//!   events it has not taken yet: at most the session's event queue (4,096); a subscriber
//!   further behind skips the oldest and is told how many (`lagged`). A connection that takes
//!   nothing for [`WRITE_TIMEOUT`] is closed.
//!
//! Nothing a connection sends reaches the session other than as a method's typed params; bad
//! input is answered with a typed error and the session goes on syncing.

mod conn;
pub(crate) mod methods;
pub(crate) mod rpc;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use stratus_engine::proto::owner_socket::bind_owner_only;
use stratus_engine::{Error, Event, Session};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, Semaphore};
use tokio::task::JoinSet;

use crate::Failure;
use methods::Ctx;
use rpc::RpcError;

/// The socket's file name in the home directory.
pub(crate) const SOCKET_NAME: &str = "stratus.sock";
/// Connections served at once.
pub(crate) const MAX_CLIENTS: usize = 16;
/// The longest request line, newline excluded.
pub(crate) const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long a connection may leave a line untaken before it is closed.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may run before it is answered with `timeout`.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a home's daemon listens.
pub(crate) fn socket_path(home: &Path) -> PathBuf {
    home.join(SOCKET_NAME)
}

/// The daemon's socket, bound and owner-only; removed again when dropped (if it is still this
/// daemon's).
pub(crate) struct Listener {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's inode, to remove only our own.
    inode: u64,
    /// This process's user: the only one served.
    uid: u32,
}

impl Listener {
    /// Binds `<home>/stratus.sock`. A socket file already there is removed only when no daemon
    /// answers on it (one left by a daemon that was killed); one that answers is an error.
    pub(crate) async fn bind(home: &Path) -> Result<Listener, Failure> {
        let path = socket_path(home);
        let fail = |what: &str, e: std::io::Error| Failure::Other(format!("{what} {}: {e}", path.display()));
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if UnixStream::connect(&path).await.is_ok() {
                return Err(Failure::Other(format!("a daemon already serves this home on {}", path.display())));
            }
            if !meta.file_type().is_socket() {
                return Err(Failure::Other(format!("{} is in the way (not a socket); remove it", path.display())));
            }
            std::fs::remove_file(&path).map_err(|e| fail("removing the stale socket", e))?;
        }
        // Bound inside a directory only this user can enter, made owner-only there, then moved
        // into place: at no moment can another user connect whatever the umask.
        let staging = home.join(format!(".stratus-sock.{}", std::process::id()));
        let made = bind_owner_only(&path, &staging).and_then(UnixListener::from_std);
        let listener = made.map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => Failure::Other(format!(
                "cannot listen on {}: {e} (a Unix socket's path is at most 107 bytes; use a shorter --home)",
                path.display()
            )),
            _ => fail("cannot listen on", e),
        })?;
        let inode = std::fs::metadata(&path).map_err(|e| fail("reading", e))?.ino();
        // This process's own user, as the kernel reports it for a socket pair.
        let (a, _b) = UnixStream::pair().map_err(|e| fail("checking the user for", e))?;
        let uid = a.peer_cred().map_err(|e| fail("checking the user for", e))?.uid();
        Ok(Listener { listener, path, inode, uid })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves `session` on `listener` until the session ends (its device revoked: an error), `show`
/// returns an error, or SIGINT/SIGTERM (a clean stop). `show` sees every event of the session
/// (`watch` prints them; the daemon logs its state to stderr); it runs on its own task, so a
/// slow terminal never holds up the socket.
pub(crate) async fn serve(
    listener: Listener,
    mut session: Session,
    show: impl FnMut(&Event) -> Result<(), Failure> + Send + 'static,
) -> Result<(), Failure> {
    let events = session.events();
    let cx = Ctx::new(session, events.resubscribe());
    let mut shown = tokio::spawn(show_events(events, show));
    let mut clients = JoinSet::new();
    let result = tokio::select! {
        r = &mut shown => r.unwrap_or_else(|e| Err(Failure::Other(format!("the event task failed: {e}")))),
        () = accept(&listener, &cx, &mut clients) => Ok(()),
        () = stopped() => Ok(()),
    };
    drop(listener);
    shown.abort();
    clients.shutdown().await;
    if let Some(session) = cx.into_session() {
        // What was sent last reaches the relay before the connection goes.
        let _ = session.stop().await;
    }
    result
}

/// Accepts connections for ever: each from this user, while there is room, gets its task.
async fn accept(listener: &Listener, cx: &Ctx, clients: &mut JoinSet<()>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        tokio::select! {
            accepted = listener.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let uid = match stream.peer_cred() {
                        Ok(c) => c.uid(),
                        Err(e) => {
                            tracing::info!(error = %e, "a connection without credentials");
                            continue;
                        }
                    };
                    if uid != listener.uid {
                        refuse(&stream, RpcError::wrong_user(uid));
                        continue;
                    }
                    match slots.clone().try_acquire_owned() {
                        Ok(slot) => drop(clients.spawn(conn::serve(cx.clone(), stream, slot))),
                        Err(_) => refuse(&stream, RpcError::too_many_clients(MAX_CLIENTS)),
                    }
                }
                // Out of file descriptors, say: wait a little instead of spinning.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    }
}

/// Tells a connection why it is not served, as far as its socket buffer takes it without
/// waiting, and closes it.
fn refuse(stream: &UnixStream, e: RpcError) {
    let line = rpc::error(Value::Null, &e) + "\n";
    let _ = stream.try_write(line.as_bytes());
}

async fn show_events(
    mut events: broadcast::Receiver<Event>,
    mut show: impl FnMut(&Event) -> Result<(), Failure>,
) -> Result<(), Failure> {
    use broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(Event::SessionRevoked) => return Err(Error::SessionRevoked.into()),
            Ok(Event::SessionRefused) => return Err(Error::SessionRefused.into()),
            Ok(Event::VersionRefused { message }) => return Err(Error::VersionRefused(message).into()),
            Ok(e) => show(&e)?,
            Err(RecvError::Lagged(n)) => eprintln!("stratus: {n} events skipped (output too slow)"),
            Err(RecvError::Closed) => return Err(Failure::Other("the sync session stopped".into())),
        }
    }
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn stopped() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
