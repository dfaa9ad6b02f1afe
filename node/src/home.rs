//! Where the device lives: `--home`, else `STRATUS_HOME`, else `$XDG_DATA_HOME/stratus`
//! (`~/.local/share/stratus` when it is unset), found with `etcetera`'s XDG strategy.
//!
//! Only the commands that make an identity (`account create`, `account recover`, `device link`)
//! create a home; every other command needs a device already there and fails with one line
//! naming the home it looked at, so that running from another directory, or with another
//! environment, never quietly makes a new identity.

use std::path::{Path, PathBuf};

use etcetera::BaseStrategy;

/// The environment variable that names the home when `--home` is not given.
pub const HOME_ENV: &str = "STRATUS_HOME";

/// The home a command runs on, and why that one.
#[derive(Debug, Clone)]
pub struct Home {
    pub path: PathBuf,
    source: Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Flag,
    Env,
    Default,
}

impl Home {
    /// The home from the `--home` flag, the environment, or the XDG default, in that order. An
    /// empty `STRATUS_HOME` counts as unset.
    pub fn resolve(flag: Option<PathBuf>) -> Result<Home, String> {
        if let Some(path) = flag {
            return Ok(Home { path, source: Source::Flag });
        }
        if let Some(path) = std::env::var_os(HOME_ENV).filter(|v| !v.is_empty()) {
            return Ok(Home { path: PathBuf::from(path), source: Source::Env });
        }
        let base = etcetera::choose_base_strategy()
            .map_err(|e| format!("cannot find the default home ({e}); pass --home DIR or set {HOME_ENV}"))?;
        Ok(Home { path: base.data_dir().join("stratus"), source: Source::Default })
    }

    /// Where the choice came from, for messages.
    fn source(&self) -> String {
        match self.source {
            Source::Flag => "from --home".into(),
            Source::Env => format!("from {HOME_ENV}"),
            Source::Default => format!("the default; --home or {HOME_ENV} choose another"),
        }
    }

    /// Whether a device lives here (its store exists).
    pub fn has_device(&self) -> bool {
        store_dir(&self.path).is_dir()
    }

    /// Fails with one line naming the home unless a device lives here.
    pub fn require_device(&self) -> Result<(), String> {
        match self.has_device() {
            true => Ok(()),
            false => Err(format!(
                "no stratus device in {} ({}); make one with `stratus account create`, `stratus device link` or \
                 `stratus account recover`",
                self.path.display(),
                self.source()
            )),
        }
    }

    /// Creates the home (owner-only: it holds the device's secrets) for a command that makes
    /// an identity.
    pub fn create(&self) -> Result<(), String> {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(&self.path).map_err(|e| format!("cannot create the home {}: {e}", self.path.display()))
    }
}

/// The device's store inside a home (see `Device::open`).
fn store_dir(home: &Path) -> PathBuf {
    home.join("store")
}
