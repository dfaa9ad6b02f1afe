//! The relay's settings (issue 19, item 1), against the real binary: a TOML file, `STRATUS_RELAY_*`
//! variables and flags, each overriding the one before; `--print-config` gives a file that makes
//! the same relay; a value the relay cannot use stops it before it starts, naming the setting.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use stratus_tests::*;

/// Runs `stratus-relay ARGS…` with these environment variables (and no other `STRATUS_RELAY_*`).
fn relay_cmd(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("stratus-relay"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("STRATUS_RELAY_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied()).args(args).stdin(Stdio::null()).output().expect("stratus-relay runs")
}

fn printed(env: &[(&str, &str)], args: &[&str]) -> toml::Table {
    let mut all = args.to_vec();
    all.push("--print-config");
    let o = relay_cmd(env, &all);
    assert!(o.status.success(), "--print-config failed: {}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).expect("utf-8");
    text.parse().unwrap_or_else(|e| panic!("--print-config printed no TOML ({e}):\n{text}"))
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn flags_override_the_environment_which_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir.path().join("relay.toml"),
        "max_connections = 11\nrequest_burst = 12\nmax_circuits = 13\nlisten = \"/ip4/127.0.0.1/tcp/4999\"\n",
    );
    let env = [("STRATUS_RELAY_REQUEST_BURST", "22"), ("STRATUS_RELAY_MAX_CIRCUITS", "23")];
    let s = printed(&env, &["--config", &file, "--max-circuits", "33"]);
    assert_eq!(s["max_connections"].as_integer(), Some(11), "from the file");
    assert_eq!(s["request_burst"].as_integer(), Some(22), "the environment over the file");
    assert_eq!(s["max_circuits"].as_integer(), Some(33), "the flag over both");
    assert_eq!(s["listen"].as_str(), Some("/ip4/127.0.0.1/tcp/4999"), "from the file");
    assert_eq!(s["max_chat_epochs"].as_integer(), Some(4096), "the default where nothing says otherwise");
    // A flag given with its default value still overrides; one not given does not.
    let s = printed(
        &[("STRATUS_RELAY_MAX_CONNECTIONS", "5"), ("STRATUS_RELAY_MAX_CIRCUITS", "6")],
        &["--max-connections", "10000"],
    );
    assert_eq!((s["max_connections"].as_integer(), s["max_circuits"].as_integer()), (Some(10000), Some(6)));
    // Every flag the relay had keeps working, under its name.
    let s = printed(
        &[],
        &["--max-fetches-in-flight", "5", "--min-session-age-secs", "7", "--external-address", "/ip4/192.0.2.1/tcp/1"],
    );
    assert_eq!(s["max_fetches_in_flight"].as_integer(), Some(5));
    assert_eq!(s["min_session_age_secs"].as_integer(), Some(7));
    assert_eq!(s["external_addresses"].as_array().map(Vec::len), Some(1));
}

#[test]
fn printed_settings_make_the_same_relay() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--max-connections", "99", "--admin-http", "127.0.0.1:9999", "--log-format", "json"];
    let first = relay_cmd(&[("STRATUS_RELAY_MAX_ACCOUNT_BYTES", "1234")], &[&args[..], &["--print-config"]].concat());
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let file = write(&dir.path().join("printed.toml"), &String::from_utf8(first.stdout.clone()).unwrap());
    let again = relay_cmd(&[], &["--config", &file, "--print-config"]);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), String::from_utf8(first.stdout).unwrap());
}

/// The relay runs from a file: its data directory, admin listener and log format come from it.
#[test]
fn a_relay_runs_from_its_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay");
    let file = write(&dir.path().join("relay.toml"), "admin_http = \"127.0.0.1:0\"\nlog_format = \"json\"\n");
    let relay = Relay::start_with(&data, &["--config", &file]);
    assert_eq!(http(&relay.admin_http(), "GET", "/healthz").0, 200);
    assert!(data.join("store").is_dir());
    assert!(relay.log().lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{}", relay.log());
}

#[test]
fn an_unusable_value_names_the_setting_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("never");
    let data_arg = data.to_str().unwrap();
    let unknown = write(&dir.path().join("unknown.toml"), "max_conections = 5\n");
    let bad_type = write(&dir.path().join("type.toml"), "max_connections = \"many\"\n");
    let malformed = write(&dir.path().join("malformed.toml"), "max_connections = 5\nlisten = \n");
    // (environment, flags, what the one-line error must say)
    type Case<'a> = (&'a [(&'a str, &'a str)], Vec<&'a str>, &'a [&'a str]);
    let cases: [Case; 7] = [
        (&[("STRATUS_RELAY_MAX_CIRCUITS", "lots")], vec![], &["max_circuits", "STRATUS_RELAY_MAX_CIRCUITS"]),
        (&[], vec!["--config", &unknown], &["unknown setting `max_conections`", "unknown.toml"]),
        (&[], vec!["--config", &bad_type], &["max_connections", "type.toml"]),
        (&[], vec!["--config", &malformed], &["malformed.toml", "not valid TOML at line 2"]),
        (&[], vec!["--max-chat-epochs", "0"], &["max_chat_epochs = 0", "--max-chat-epochs", "at least 1"]),
        (&[("STRATUS_RELAY_ADMIN_HTTP", "0.0.0.0:9101")], vec![], &["admin_http", "loopback"]),
        (
            &[("STRATUS_RELAY_STALLED_READER_SECS", "0")],
            vec![],
            &["stalled_reader_secs", "STRATUS_RELAY_STALLED_READER_SECS"],
        ),
    ];
    for (env, args, wanted) in cases {
        let o = relay_cmd(env, &[&["--data-dir", data_arg][..], &args].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{env:?} {args:?} started");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        for w in wanted {
            assert!(err.contains(w), "{env:?} {args:?}: no {w:?} in {err}");
        }
        assert!(!data.exists(), "nothing was created");
    }
    let o = relay_cmd(&[], &["--config", dir.path().join("missing.toml").to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("missing.toml"));
}
