//! Invariants stated as absences (docs/ARCHITECTURE.md), each checked here.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

#[test]
fn the_relay_does_not_link_automerge() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root())
        .args(["tree", "-p", "stratus-relay", "-e", "normal", "--prefix", "none", "--offline"])
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("stratus-engine"), "the relay uses the engine's proto feature");
    assert!(!tree.lines().any(|l| l.starts_with("automerge ")), "the relay links automerge:\n{tree}");
}

#[test]
fn the_cores_know_nothing_of_tokio_libp2p_sled_or_the_clock() {
    let forbidden =
        ["tokio", "libp2p", "sled", "SystemTime", "Instant", "std::fs", "std::net", "thread_rng", "HashMap"];
    let mut cores = vec![root().join("relay/src/core.rs"), root().join("engine/src/device/core.rs")];
    // The relay core's parts split out for size.
    for entry in std::fs::read_dir(root().join("relay/src/core")).expect("relay/src/core/") {
        cores.push(entry.expect("a directory entry").path());
    }
    assert!(cores.len() > 2, "the relay core's parts are checked too");
    for core in cores {
        let core = core.display().to_string();
        let text = std::fs::read_to_string(&core).expect("core source");
        for word in forbidden {
            assert!(!text.contains(word), "{core} mentions {word}");
        }
    }
}
