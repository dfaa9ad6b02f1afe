//! The relay binary's command line.

use std::process::Command;

#[test]
fn bad_arguments_are_one_clear_error() {
    let o = Command::new(env!("CARGO_BIN_EXE_stratus-relay")).args(["--listen", "not-a-multiaddr"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--listen"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn an_unusable_data_dir_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_stratus-relay"))
        .args(["--data-dir", file.to_str().unwrap(), "--listen", "/ip4/127.0.0.1/tcp/0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("stratus-relay: "), "{err}");
}
