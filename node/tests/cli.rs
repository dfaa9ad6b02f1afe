//! The `stratus` CLI's errors: one line on stderr, a documented exit code, never a panic.

use std::process::Command;

fn stratus(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stratus")).arg("--home").arg(home).args(args).output().unwrap()
}

/// An unreachable relay: `account create` makes the device (its home and identity), then
/// fails with exit 3.
const NOWHERE: &str = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQK4ZGUF4pJKaeDndqfWZgsqrdcakkkJQCFJ7NhVRmUgs";

/// A home with a device that is not logged in.
fn device_home() -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    let o = stratus(home.path(), &["account", "create", "--relay", NOWHERE, "--name", "x"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    home
}

#[test]
fn commands_that_need_an_account_say_so() {
    let home = device_home();
    for args in
        [&["sync"][..], &["send", "00000000000000000000000000000000", "hi"], &["chat", "create", "--title", "t"]]
    {
        let o = stratus(home.path(), args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("not logged in"), "{err}");
    }
}

#[test]
fn bad_ids_and_codes_are_usage_or_input_errors() {
    let home = device_home();
    let o = stratus(home.path(), &["log", "xyz"]);
    assert_eq!(o.status.code(), Some(2), "clap rejects a malformed chat id");
    let o = stratus(home.path(), &["log", "00000000000000000000000000000000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no chat"));
    let o = stratus(home.path(), &["device", "approve", "garbage"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("link code"));
}

#[test]
fn an_unreachable_relay_exits_3() {
    let home = tempfile::tempdir().unwrap();
    let o = stratus(home.path(), &["account", "create", "--relay", NOWHERE, "--name", "x"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let o = stratus(home.path(), &["account", "create", "--relay", "/ip4/127.0.0.1/tcp/1", "--name", "x"]);
    assert_eq!(o.status.code(), Some(1), "an address without /p2p/ is bad input");
}
