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
    let mut cores = vec![
        root().join("relay/src/core.rs"),
        root().join("engine/src/device/core.rs"),
        root().join("engine/src/device/core_schedule.rs"),
        root().join("engine/src/device/session_core.rs"),
        root().join("engine/src/device/ops.rs"),
        root().join("engine/src/device/peer_links.rs"),
        root().join("engine/src/device/secret_links.rs"),
    ];
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

/// docs/ARCHITECTURE.md's codemap names every source file (so that whoever carries this on
/// finds each one there, with what it holds).
#[test]
fn the_codemap_names_every_source_file() {
    let doc = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut missing = Vec::new();
    let dirs = [
        "engine/src",
        "relay/src",
        "node/src",
        "tests/src",
        "tests/tests",
        "relay/tests",
        "node/tests",
        "engine/tests",
        "engine/benches",
        "engine/examples",
        "fuzz/fuzz_targets",
    ];
    for dir in dirs {
        let mut stack = vec![root().join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("a source directory") {
                let path = entry.expect("a directory entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let rel = path.strip_prefix(root()).expect("under the root").display().to_string();
                    if !doc.contains(&format!("`{rel}`")) {
                        missing.push(rel);
                    }
                }
            }
        }
    }
    missing.sort();
    assert!(missing.is_empty(), "docs/ARCHITECTURE.md's codemap does not name: {missing:?}");
}
