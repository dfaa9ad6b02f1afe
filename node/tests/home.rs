//! Which home the `stratus` CLI runs on (issue 19, item 8): `--home`, else `STRATUS_HOME`, else
//! `$XDG_DATA_HOME/stratus` (`~/.local/share/stratus`), never the current directory; and only
//! the commands that make an identity make a home.

use std::path::Path;
use std::process::{Command, Output};

/// An unreachable relay: `account create` makes the device, then exits 3.
const NOWHERE: &str = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQK4ZGUF4pJKaeDndqfWZgsqrdcakkkJQCFJ7NhVRmUgs";

/// Runs `stratus` in `cwd` with only the given variables of the home's kind set (`HOME`,
/// `XDG_DATA_HOME`, `STRATUS_HOME`).
fn stratus(cwd: &Path, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stratus"));
    c.current_dir(cwd).env_remove("XDG_DATA_HOME").env_remove("STRATUS_HOME").env("HOME", cwd.join("no-home"));
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every entry under `dir`, for "nothing was created".
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn a_command_without_a_device_names_the_home_it_looked_at_and_creates_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (cwd, xdg) = (t.path().join("cwd"), t.path().join("xdg"));
    std::fs::create_dir_all(&cwd).unwrap();
    for args in [&["sync"][..], &["chat", "list"], &["device", "list"], &["log", "00000000000000000000000000000000"]] {
        let o = stratus(&cwd, &[("XDG_DATA_HOME", &xdg)], args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        let looked = xdg.join("stratus");
        assert!(err.contains("no stratus device in") && err.contains(&*looked.to_string_lossy()), "{err}");
        assert!(err.contains("stratus account create"), "{err}");
    }
    assert!(entries(&cwd).is_empty(), "nothing in the current directory: {:?}", entries(&cwd));
    assert!(!xdg.exists(), "no home was made");

    // STRATUS_HOME is named as the reason when it chose the home.
    let o = stratus(&cwd, &[("STRATUS_HOME", &t.path().join("env-home"))], &["sync"]);
    assert!(stderr(&o).contains("env-home") && stderr(&o).contains("STRATUS_HOME"), "{}", stderr(&o));
    assert!(!t.path().join("env-home").exists());
}

#[test]
fn the_default_home_follows_xdg_from_any_directory() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, xdg) = (t.path().join("a"), t.path().join("b"), t.path().join("xdg"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let o = stratus(&a, &[("XDG_DATA_HOME", &xdg)], &["account", "create", "--relay", NOWHERE, "--name", "x"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(xdg.join("stratus").join("store").is_dir(), "the device is in $XDG_DATA_HOME/stratus");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(xdg.join("stratus")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "the home holds secrets: owner only");
    }
    assert!(entries(&a).is_empty(), "{:?}", entries(&a));
    // From another directory, the same device (not logged in), not a new one.
    let o = stratus(&b, &[("XDG_DATA_HOME", &xdg)], &["sync"]);
    assert!(stderr(&o).contains("not logged in"), "{}", stderr(&o));
    assert!(entries(&b).is_empty());

    // Without XDG_DATA_HOME (or with a relative one, which XDG says to ignore): ~/.local/share.
    let home = t.path().join("home");
    let o = stratus(&a, &[("HOME", &home)], &["account", "create", "--relay", NOWHERE, "--name", "x"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(home.join(".local/share/stratus/store").is_dir());
    let o = stratus(&b, &[("HOME", &home), ("XDG_DATA_HOME", Path::new("relative"))], &["sync"]);
    assert!(stderr(&o).contains("not logged in"), "{}", stderr(&o));
}

#[test]
fn stratus_home_overrides_xdg_and_the_flag_overrides_both() {
    let t = tempfile::tempdir().unwrap();
    let (xdg, env_home, flag_home) = (t.path().join("xdg"), t.path().join("env"), t.path().join("flag"));
    let create = ["account", "create", "--relay", NOWHERE, "--name", "x"];
    let o = stratus(t.path(), &[("XDG_DATA_HOME", &xdg), ("STRATUS_HOME", &env_home)], &create);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(env_home.join("store").is_dir() && !xdg.exists());

    let flag = flag_home.to_str().unwrap();
    let mut args = vec!["--home", flag];
    args.extend(create);
    let o = stratus(t.path(), &[("XDG_DATA_HOME", &xdg), ("STRATUS_HOME", &env_home)], &args);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(flag_home.join("store").is_dir() && !xdg.exists());
    // An empty STRATUS_HOME is unset.
    let o = stratus(t.path(), &[("XDG_DATA_HOME", &xdg), ("STRATUS_HOME", Path::new(""))], &["sync"]);
    assert!(stderr(&o).contains(&*xdg.join("stratus").to_string_lossy()), "{}", stderr(&o));
}
