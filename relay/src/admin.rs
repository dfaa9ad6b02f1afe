//! The relay's local admin socket, `<data dir>/admin.sock`: owner-only operations on the running
//! relay (today: `backup`), asked by `stratus-relay backup` from the same machine.
//!
//! Owner-only: the socket is bound inside a directory only this user can enter, made 0600 there
//! and moved into place, and every connection's peer user (`SO_PEERCRED`) must be the relay's
//! own; another user's connection gets `error` and is closed, nothing done. One request per
//! connection, one line of at most [`MAX_REQUEST_BYTES`]: `backup <absolute directory>`. The
//! answer is one line: `ok <store id hex> <generation>` or `error <message>`. At most
//! [`MAX_CLIENTS`] connections are served at once; more are answered `error` and closed.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use stratus_engine::proto::owner_socket::bind_owner_only;
use stratus_engine::proto::wire::Incarnation;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// Longest request line.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// Most admin connections served at once.
pub const MAX_CLIENTS: usize = 4;
/// The socket's file name in the data directory.
pub const SOCKET_NAME: &str = "admin.sock";

/// A request the admin socket hands to the core task.
pub enum AdminRequest {
    /// Copy the store, as durable now, into this new or empty directory.
    Backup { to: PathBuf, reply: oneshot::Sender<Result<Incarnation, String>> },
}

/// Why the admin socket could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Another relay answers on the socket.
    #[error("another relay already runs on this data directory ({0} answers)")]
    InUse(PathBuf),
    /// Binding or preparing the socket failed.
    #[error("cannot listen on {0}: {1}")]
    Bind(PathBuf, std::io::Error),
}

/// The bound admin socket; removes its file when dropped.
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    inode: u64,
    uid: u32,
}

impl AdminSocket {
    /// Binds `<data_dir>/admin.sock`. A file already there is removed only when nothing answers
    /// on it (left by a relay that was killed).
    pub async fn bind(data_dir: &Path) -> Result<AdminSocket, AdminError> {
        let path = data_dir.join(SOCKET_NAME);
        let fail = |e: std::io::Error| AdminError::Bind(path.clone(), e);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if UnixStream::connect(&path).await.is_ok() {
                return Err(AdminError::InUse(path));
            }
            if !meta.file_type().is_socket() {
                return Err(fail(std::io::Error::other("a file that is not a socket is in the way; remove it")));
            }
            std::fs::remove_file(&path).map_err(fail)?;
        }
        let staging = data_dir.join(format!(".admin-sock.{}", std::process::id()));
        let listener = bind_owner_only(&path, &staging).and_then(UnixListener::from_std).map_err(fail)?;
        let inode = std::fs::metadata(&path).map_err(fail)?.ino();
        let (a, _b) = UnixStream::pair().map_err(fail)?;
        let uid = a.peer_cred().map_err(fail)?.uid();
        Ok(AdminSocket { listener, path, inode, uid })
    }

    /// Serves requests until the task is dropped, handing each to the core task on `core`.
    pub async fn serve(self, core: mpsc::Sender<AdminRequest>) {
        let busy = Arc::new(AtomicUsize::new(0));
        loop {
            let Ok((mut stream, _)) = self.listener.accept().await else { continue };
            let uid = stream.peer_cred().map(|c| c.uid()).ok();
            if uid != Some(self.uid) {
                tracing::warn!(?uid, "admin socket: refused a connection from another user");
                let _ = stream.write_all(b"error only the relay's own user may use the admin socket\n").await;
                continue;
            }
            if busy.load(Ordering::Relaxed) >= MAX_CLIENTS {
                let _ = stream.write_all(b"error too many admin connections; try again\n").await;
                continue;
            }
            busy.fetch_add(1, Ordering::Relaxed);
            let (core, busy) = (core.clone(), busy.clone());
            let data_dir = self.path.parent().map(Path::to_path_buf).unwrap_or_default();
            tokio::spawn(async move {
                let answer = match read_line(&mut stream).await {
                    Ok(line) => handle(&line, &data_dir, &core).await,
                    Err(e) => Err(e),
                };
                let line = match answer {
                    Ok(ok) => format!("ok {ok}\n"),
                    Err(e) => format!("error {}\n", e.replace('\n', " ")),
                };
                let _ = stream.write_all(line.as_bytes()).await;
                busy.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn read_line(stream: &mut UnixStream) -> Result<String, String> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST_BYTES as u64 + 1);
    reader.read_line(&mut line).await.map_err(|e| format!("reading the request: {e}"))?;
    if line.len() > MAX_REQUEST_BYTES || !line.ends_with('\n') {
        return Err(format!("the request is not one line of at most {MAX_REQUEST_BYTES} bytes"));
    }
    Ok(line.trim_end().to_string())
}

fn copy_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::copy(from, to)?;
    std::fs::File::open(to)?.sync_all()
}

async fn handle(line: &str, data_dir: &Path, core: &mpsc::Sender<AdminRequest>) -> Result<String, String> {
    let (command, arg) = line.split_once(' ').unwrap_or((line, ""));
    match command {
        "backup" => {
            let to = PathBuf::from(arg);
            if !to.is_absolute() {
                return Err("backup needs an absolute directory".into());
            }
            // The relay's identity goes first (it never changes); the store's manifest, written
            // last, marks the backup complete.
            std::fs::create_dir_all(&to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
            if std::fs::read_dir(&to).map_err(|e| e.to_string())?.next().is_some() {
                return Err(format!("{} is not empty; back up into a new or empty directory", to.display()));
            }
            let key = data_dir.join("identity.key");
            copy_synced(&key, &to.join("identity.key")).map_err(|e| format!("copying {}: {e}", key.display()))?;
            let (reply, answer) = oneshot::channel();
            core.send(AdminRequest::Backup { to, reply }).await.map_err(|_| "the relay is stopping".to_string())?;
            let inc = answer.await.map_err(|_| "the relay is stopping".to_string())??;
            Ok(format!("{} {}", hex(&inc.store), inc.generation))
        }
        other => Err(format!("unknown request {other:?}; this relay knows: backup")),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asks the relay running on `data_dir` for a backup into `to` (`stratus-relay backup`).
/// Returns its answer's text after `ok`, or the error to print.
pub async fn request_backup(data_dir: &Path, to: &Path) -> Result<String, String> {
    let path = data_dir.join(SOCKET_NAME);
    let mut stream = UnixStream::connect(&path).await.map_err(|e| {
        format!("no relay answers on {} ({e}); is it running with --data-dir {}?", path.display(), data_dir.display())
    })?;
    let to = std::path::absolute(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let to = to.to_str().ok_or("the backup directory's path is not UTF-8")?;
    if to.contains('\n') {
        return Err("the backup directory's path holds a newline".into());
    }
    stream.write_all(format!("backup {to}\n").as_bytes()).await.map_err(|e| format!("asking the relay: {e}"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .take(MAX_REQUEST_BYTES as u64)
        .read_line(&mut answer)
        .await
        .map_err(|e| format!("reading the relay's answer: {e}"))?;
    match answer.trim_end().split_once(' ') {
        Some(("ok", rest)) => Ok(rest.to_string()),
        Some(("error", message)) => Err(message.to_string()),
        _ => Err(format!("the relay answered {answer:?}")),
    }
}
