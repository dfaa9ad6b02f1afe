//! A secret chat between two devices in two network namespaces (two network stacks joined by
//! a bridge, the relay on the bridge's own address): the devices reach each other through the
//! relay, DCUtR makes a real direct connection between the namespaces, and the chat runs over
//! it. Needs root and `ip netns`; elsewhere the test says why it skips (the same flow runs on
//! 127.0.0.1 in `secret.rs`).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Output, Stdio};

use stratus_tests::bin;

/// Two namespaces on a bridge, removed on drop.
struct Hosts {
    bridge: String,
    namespaces: Vec<String>,
    /// The first three octets of the bridge's /24.
    net: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip").args(args).output().map_err(|e| e.to_string())?;
    match o.status.success() {
        true => Ok(()),
        false => Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim())),
    }
}

impl Hosts {
    fn new() -> Result<Hosts, String> {
        let tag = std::process::id() % 100_000;
        let net = format!("10.{}.{}", 100 + tag % 100, tag / 100 % 250);
        let hosts = Hosts {
            bridge: format!("stbr{tag}"),
            namespaces: (0..2).map(|i| format!("stns{tag}-{i}")).collect(),
            net: net.clone(),
        };
        ip(&["link", "add", &hosts.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &hosts.bridge])?;
        ip(&["link", "set", &hosts.bridge, "up"])?;
        for (i, ns) in hosts.namespaces.iter().enumerate() {
            let (outer, inner) = (format!("stv{tag}o{i}"), format!("stv{tag}i{i}"));
            ip(&["netns", "add", ns])?;
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", ns])?;
            ip(&["link", "set", &outer, "master", &hosts.bridge])?;
            ip(&["link", "set", &outer, "up"])?;
            ip(&["netns", "exec", ns, "ip", "addr", "add", &format!("{net}.{}/24", i + 2), "dev", &inner])?;
            ip(&["netns", "exec", ns, "ip", "link", "set", &inner, "up"])?;
            ip(&["netns", "exec", ns, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// `stratus --home HOME ARGS…` inside namespace `i`.
    fn stratus(&self, i: usize, home: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.namespaces[i]]).arg(bin("stratus")).arg("--home").arg(home).args(args);
        c.stdin(Stdio::null());
        c
    }

    fn run(&self, i: usize, home: &Path, args: &[&str]) -> Output {
        let o: Output = self.stratus(i, home, args).output().expect("stratus runs");
        assert!(o.status.success(), "stratus {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        o
    }

    fn ok(&self, i: usize, home: &Path, args: &[&str]) -> String {
        String::from_utf8(self.run(i, home, args).stdout).unwrap()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// The relay on the bridge's address (outside both namespaces); returns it and its address.
fn relay(dir: &Path, net: &str) -> (Child, String) {
    let mut child = Command::new(bin("stratus-relay"))
        .args(["--data-dir", dir.to_str().unwrap(), "--listen", &format!("/ip4/{net}.1/tcp/0")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("relay starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening ").expect("the relay's address").to_string();
    (child, addr)
}

#[test]
fn a_secret_chat_runs_over_a_direct_connection_between_two_network_namespaces() {
    let hosts = match Hosts::new() {
        Ok(h) => h,
        Err(why) => {
            eprintln!("skipped: network namespaces are not available here ({why})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, addr) = relay(&dir.path().join("relay"), &hosts.net);
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    for (i, home, name) in [(0, &alice, "alice"), (1, &bob, "bob")] {
        hosts.ok(i, home, &["account", "create", "--relay", &addr, "--name", name]);
        hosts.ok(i, home, &["account", "set-username", name]);
    }
    hosts.ok(1, &bob, &["contact", "accept", "alice"]);
    hosts.ok(0, &alice, &["contact", "accept", "bob"]);
    hosts.ok(1, &bob, &["secret", "auto-accept"]);
    let mut listen = hosts
        .stratus(1, &bob, &["secret", "listen", "--for", "8"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("stratus runs");
    let mut out: BufReader<ChildStdout> = BufReader::new(listen.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");

    // The id alone on standard output; how the other device was reached on standard error.
    let started = hosts.run(0, &alice, &["secret", "start", "bob"]);
    let id = String::from_utf8_lossy(&started.stdout).trim().to_string();
    assert!(String::from_utf8_lossy(&started.stderr).contains("delivered (direct)"), "{started:?}");
    let sent = hosts.run(0, &alice, &["secret", "send", &id, "across the namespaces"]);
    assert!(String::from_utf8_lossy(&sent.stderr).contains("delivered (direct)"), "{sent:?}");
    assert!(listen.wait().unwrap().success());
    let mut printed = String::new();
    out.read_to_string(&mut printed).unwrap();
    assert!(printed.contains("across the namespaces"), "{printed}");
    assert!(hosts.ok(1, &bob, &["secret", "log", &id]).contains("across the namespaces"));
    let _ = relay.kill();
    let _ = relay.wait();
}
