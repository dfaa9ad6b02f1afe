//! A Unix domain socket only this user can connect to, for a process's local control socket
//! (the device daemon's `stratus.sock`, the relay's `admin.sock`).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds a socket at `path` that only this user can connect to: it is bound inside `staging`,
/// a fresh directory only this user can enter, made owner-only there, then moved into place,
/// so that at no moment can another user connect, whatever the umask. `staging` (a path next
/// to `path`, unique to this process) is removed afterwards, also on failure. The listener is
/// non-blocking, ready for `tokio::net::UnixListener::from_std`.
pub fn bind_owner_only(path: &Path, staging: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_dir_all(staging);
    let made = (|| {
        std::fs::DirBuilder::new().mode(0o700).create(staging)?;
        let inside = staging.join("socket");
        let listener = UnixListener::bind(&inside)?;
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inside, path)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(staging);
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_owner_only_and_the_staging_directory_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (path, staging) = (dir.path().join("x.sock"), dir.path().join(".x.staging"));
        let _listener = bind_owner_only(&path, &staging).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!staging.exists());
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
    }
}
