//! The commands for secret chats: two devices, a direct connection (or the relay's circuit
//! carrying ciphertext only), nothing stored on the relay.
//!
//! A secret chat lives between two devices, so both must be running at once for anything to
//! pass: `secret listen` keeps this device reachable; `send`, `start`, `close` and `sync`
//! reach the other device if it is (and leave what they wrote waiting otherwise).

use std::time::Duration;

use clap::Subcommand;
use serde::Deserialize;
use serde_json::json;
use stratus_engine::net::Net;
use stratus_engine::{AccountId, Device, DeviceId, Error, Event, SecretId, SecretUpdate, Session, SessionConfig};

use crate::local::sync_until_idle;
use crate::print::{self, out, Shown};
use crate::remote::Client;
use crate::view::{EventView, SecretChatMessage, SecretChatView};
use crate::Failure;

/// How long the other device may stay quiet before a link is done with.
const IDLE: Duration = Duration::from_millis(1500);

#[derive(Subcommand)]
pub(crate) enum SecretCommand {
    /// Start a secret chat with one device of USER (--device: its id or name; by default its
    /// only device) and offer it to that device if it is reachable. Prints the chat's id.
    Start {
        user: String,
        #[arg(long)]
        device: Option<String>,
    },
    /// Accept a secret chat another device offered (its certificate is checked first).
    Accept { id: SecretId },
    /// Take secret chats other devices offer at once (--off: ask with `secret accept`).
    AutoAccept {
        #[arg(long)]
        off: bool,
    },
    /// The secret chats on this device.
    List,
    /// Write a message; with --ttl it disappears from both devices SECS seconds after it is
    /// read. Delivered now if the other device is reachable, else by a later command.
    Send {
        id: SecretId,
        text: String,
        #[arg(long, value_name = "SECS")]
        ttl: Option<u32>,
    },
    /// The chat's messages, marked read (their timers start).
    Log { id: SecretId },
    /// Close the chat: deleted here at once, and on the other device when it is next reached.
    Close { id: SecretId },
    /// The fingerprint of the chat's keys: compare it with the other user.
    Verify { id: SecretId },
    /// Reach every other device a secret chat waits on: deliver and take what waits.
    Sync,
    /// Stay reachable (for SECS seconds, or until stopped): answer other devices and print
    /// messages as they arrive.
    Listen {
        #[arg(long = "for", value_name = "SECS")]
        secs: Option<u64>,
        /// The TCP address to listen on for direct connections.
        #[arg(long, default_value = "/ip4/0.0.0.0/tcp/0")]
        tcp: stratus_engine::libp2p::Multiaddr,
    },
}

/// How reaching the other device went.
enum Reach {
    /// The link ran (over a direct connection, or through the relay); what the other
    /// device's messages did.
    Linked(Vec<SecretUpdate>, bool),
    /// The other device has not accepted the chat yet.
    Pending,
    /// The other device closed it (deleted here too), or it was closed here and now told.
    Gone,
    /// The other device could not be reached.
    Offline(String),
}

fn relay_of(device: &Device) -> Result<String, Failure> {
    Ok(device.relay().ok_or(Error::NotLoggedIn)?.to_string())
}

fn peer_id(device: &DeviceId) -> Result<stratus_engine::libp2p::PeerId, Failure> {
    device.0.parse().map_err(|_| Failure::Other(format!("{device} is not a device id")))
}

/// Opens a link for `id` to `peer` and carries it until the other device is quiet.
async fn reach(device: &mut Device, net: &mut Net, relay: &str, id: SecretId, peer: &DeviceId) -> Reach {
    let result = async {
        let p = peer_id(peer).map_err(|_| Error::UnknownSecret(id))?;
        // Listening on TCP first gives DCUtR an address to punch to on this side too (and
        // the relay connection the same port).
        net.listen_secret(Some("/ip4/0.0.0.0/tcp/0".parse().expect("a valid address")), relay).await?;
        let direct = net.connect_peer(p, relay).await?;
        let mut stream = net.open_secret(p).await?;
        let Some((mut link, first)) = device.secret_open(id, &mut stream).await? else {
            // Still here (also when closed here): the other device has not accepted it.
            let here = device.secret_chats_to_reach()?.iter().any(|(c, _)| *c == id);
            return Ok(if here { Reach::Pending } else { Reach::Gone });
        };
        let updates = device.secret_serve(&mut link, &mut stream, first, IDLE, |_| false).await?;
        stream.close().await;
        let here = device.secret_chats_to_reach()?.iter().any(|(c, _)| *c == id);
        Ok::<_, Error>(match (here, device.secret(id).is_ok()) {
            (false, _) => Reach::Gone,
            (true, true) => Reach::Linked(updates, direct),
            // Closed here, and the other device has not acknowledged it yet.
            (true, false) => Reach::Offline("the other device did not acknowledge the close".into()),
        })
    }
    .await;
    result.unwrap_or_else(|e| Reach::Offline(e.to_string()))
}

/// How reaching the other device went, as a line (`--json`: an object).
fn said(id: SecretId, r: &Reach, json: bool) -> String {
    if json {
        let (reach, more) = match r {
            Reach::Linked(updates, direct) => {
                let n: usize = updates.iter().map(|u| u.added.len()).sum();
                ("delivered", json!({ "direct": direct, "new": n }))
            }
            Reach::Pending => ("waiting", json!({})),
            Reach::Gone => ("closed", json!({})),
            Reach::Offline(why) => ("unreachable", json!({ "why": why })),
        };
        let mut v = json!({ "secret": id.to_string(), "reach": reach });
        if let (Some(v), Some(more)) = (v.as_object_mut(), more.as_object()) {
            v.extend(more.clone());
        }
        return v.to_string();
    }
    match r {
        Reach::Linked(updates, direct) => {
            let n: usize = updates.iter().map(|u| u.added.len()).sum();
            let path = if *direct { "direct" } else { "through the relay" };
            format!("{id}: delivered ({path}); {n} new from the other device")
        }
        Reach::Pending => format!("{id}: waiting for the other device to accept"),
        Reach::Gone => format!("{id}: closed"),
        Reach::Offline(why) => format!("{id}: the other device is not reachable ({why}); it waits here"),
    }
}

/// "choose one of USER's devices with --device: ID (NAME, online), …"
fn choose_device(user: &str, devices: impl Iterator<Item = (String, String, bool)>) -> Failure {
    let names: Vec<String> =
        devices.map(|(id, name, on)| format!("{id} ({name}{})", if on { ", online" } else { "" })).collect();
    Failure::Other(format!("choose one of {user}'s devices with --device: {}", names.join(", ")))
}

pub(crate) async fn secret(mut device: Device, command: SecretCommand, json: bool) -> Result<(), Failure> {
    device.account().ok_or(Error::NotLoggedIn)?;
    device.secret_expire()?;
    match command {
        SecretCommand::Start { user, device: which } => {
            device = sync_until_idle(device).await?;
            let info = device.lookup(&user).await?;
            let account = info.account.parse().map_err(|_| Failure::Other("the relay gave a bad id".into()))?;
            let devices = device.secret_devices(account).await?;
            let chosen: Vec<_> = devices
                .iter()
                .filter(|(c, _)| which.as_ref().is_none_or(|w| c.body.device.0 == *w || c.body.name == *w))
                .collect();
            let [(cert, _)] = chosen[..] else {
                let all = devices.iter().map(|(c, on)| (c.body.device.0.clone(), c.body.name.clone(), *on));
                return Err(choose_device(&user, all));
            };
            let peer = cert.body.device.clone();
            let id = device.secret_start(cert.clone())?;
            print::secret_made(json, "secret", &id.to_string());
            let relay = relay_of(&device)?;
            let mut net = Net::start(device.keypair())?;
            let r = reach(&mut device, &mut net, &relay, id, &peer).await;
            eprintln!("stratus: {}", said(id, &r, false));
        }
        SecretCommand::Accept { id } => {
            device.secret_accept_offer(id).await?;
            print::secret_state(json, &id.to_string(), "accepted");
        }
        SecretCommand::AutoAccept { off } => {
            device.set_secret_auto_accept(!off)?;
            out(&match (json, off) {
                (true, off) => json!({ "auto_accept": !off }).to_string(),
                (false, true) => "secret chats wait for `secret accept`".into(),
                (false, false) => "secret chats are taken at once".into(),
            });
        }
        SecretCommand::List => {
            let all: Vec<SecretChatView> = device.secret_chats()?.iter().map(SecretChatView::from).collect();
            print::secret_chats(json, &all);
        }
        SecretCommand::Send { id, text, ttl } => {
            let m = device.secret_send(id, &text, ttl)?;
            print::secret_written(json, &SecretChatMessage::new(id, &m));
            let peer = device.secret(id)?.peer_cert.body.device;
            let relay = relay_of(&device)?;
            let mut net = Net::start(device.keypair())?;
            match reach(&mut device, &mut net, &relay, id, &peer).await {
                Reach::Offline(why) => {
                    eprintln!("stratus: the other device is not reachable ({why}); the message waits here")
                }
                r => eprintln!("stratus: {}", said(id, &r, false)),
            }
        }
        SecretCommand::Log { id } => {
            let messages = device.secret_messages(id)?;
            if let Some(last) = messages.last() {
                device.secret_read(id, &last.message.id)?;
            }
            let all: Vec<_> = device.secret_messages(id)?.iter().map(|m| SecretChatMessage::new(id, m)).collect();
            print::secret_messages(json, &all);
        }
        SecretCommand::Close { id } => {
            let peer = device.secret(id)?.peer_cert.body.device;
            device.secret_close(id)?;
            print::secret_state(json, &id.to_string(), "closed here");
            let relay = relay_of(&device)?;
            let mut net = Net::start(device.keypair())?;
            let r = reach(&mut device, &mut net, &relay, id, &peer).await;
            if !matches!(r, Reach::Offline(_)) {
                print::secret_state(json, &id.to_string(), "closed on the other device");
            }
        }
        SecretCommand::Verify { id } => print::fingerprint(json, &id.to_string(), &device.secret_fingerprint(id)?),
        SecretCommand::Sync => {
            let relay = relay_of(&device)?;
            let mut net = Net::start(device.keypair())?;
            for (id, peer) in device.secret_chats_to_reach()? {
                let r = reach(&mut device, &mut net, &relay, id, &peer).await;
                out(&said(id, &r, json));
            }
        }
        SecretCommand::Listen { secs, tcp } => listen(device, secs, tcp, json).await?,
    }
    Ok(())
}

/// A session that runs this device's secret chats too, listening on `tcp` for direct
/// connections.
pub(crate) fn session(device: Device, tcp: stratus_engine::libp2p::Multiaddr) -> Result<Session, Failure> {
    let config = SessionConfig { secret_chats: true, secret_tcp: Some(tcp) };
    Ok(Session::start_with(device, config)?)
}

/// `listening` (once reachable: the session is connected, its listening came first).
pub(crate) fn listening(json: bool) {
    out(if json { r#"{"listening":true}"# } else { "listening" });
}

/// Stays reachable (for `secs` seconds, or until stopped): a session that runs the secret
/// chats, printing what arrives in them.
async fn listen(
    device: Device,
    secs: Option<u64>,
    tcp: stratus_engine::libp2p::Multiaddr,
    json: bool,
) -> Result<(), Failure> {
    let mut session = session(device, tcp)?;
    let mut events = session.events();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs.unwrap_or(u64::MAX / 4));
    let mut said = false;
    loop {
        let e = tokio::select! {
            e = events.recv() => e,
            () = tokio::time::sleep_until(deadline) => break,
        };
        match e {
            Ok(Event::Connected) if !said => {
                said = true;
                listening(json);
            }
            Ok(e) => {
                if let Some(v) = EventView::of(&e) {
                    print::event(&v, json, Shown::Secret)?;
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                eprintln!("stratus: {n} events skipped (output too slow)")
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    session.stop().await?;
    Ok(())
}

/// The secret chat commands through the running daemon: its session carries the chats, so
/// what is written is delivered by it whenever the other device is reachable.
pub(crate) async fn remote(c: &mut Client, command: SecretCommand, json: bool) -> Result<(), Failure> {
    match command {
        SecretCommand::Start { user, device } => {
            let account = match user.parse::<AccountId>() {
                Ok(a) => a.to_string(),
                Err(_) => c.call::<ContactView>("lookup", json!({ "username": user })).await?.account,
            };
            let started = c.call_raw("secret_start", json!({ "account": account, "device": device })).await?;
            let started: Started = match started {
                Ok(v) => crate::remote::read(v)?,
                Err(e) if e.kind == "choose_device" => {
                    let devices: Vec<DeviceView> =
                        e.data.get("devices").and_then(|d| serde_json::from_value(d.clone()).ok()).unwrap_or_default();
                    return Err(choose_device(&user, devices.into_iter().map(|d| (d.device, d.name, d.online))));
                }
                Err(e) => return Err(crate::remote::failure(e)),
            };
            print::secret_made(json, "secret", &started.secret);
            eprintln!(
                "stratus: {}: the running daemon offers it whenever the other device is reachable",
                started.secret
            );
        }
        SecretCommand::Accept { id } => {
            c.call::<serde_json::Value>("secret_accept", json!({ "secret": id.to_string() })).await?;
            print::secret_state(json, &id.to_string(), "accepted");
        }
        SecretCommand::AutoAccept { .. } => c.not_yet("secret_auto_accept").await?,
        SecretCommand::List => {
            let all: Vec<SecretChatView> = c.call("secret_chats", json!({})).await?;
            print::secret_chats(json, &all);
        }
        SecretCommand::Send { id, text, ttl } => {
            let m: SecretChatMessage =
                c.call("secret_send", json!({ "secret": id.to_string(), "text": text, "ttl_s": ttl })).await?;
            print::secret_written(json, &m);
            eprintln!("stratus: {id}: the running daemon delivers it whenever the other device is reachable");
        }
        SecretCommand::Log { id } => {
            let secret = json!({ "secret": id.to_string() });
            let all: Vec<SecretChatMessage> = c.call("secret_messages", secret.clone()).await?;
            if let Some(last) = all.last() {
                let read = json!({ "secret": id.to_string(), "up_to": last.message.id });
                c.call::<serde_json::Value>("secret_read", read).await?;
            }
            let all: Vec<SecretChatMessage> = c.call("secret_messages", secret).await?;
            print::secret_messages(json, &all);
        }
        SecretCommand::Close { id } => {
            c.call::<serde_json::Value>("secret_close", json!({ "secret": id.to_string() })).await?;
            print::secret_state(json, &id.to_string(), "closed here");
            eprintln!("stratus: {id}: the running daemon tells the other device whenever it is reachable");
        }
        SecretCommand::Verify { id } => {
            let f: Fingerprint = c.call("secret_fingerprint", json!({ "secret": id.to_string() })).await?;
            print::fingerprint(json, &id.to_string(), &f.fingerprint);
        }
        SecretCommand::Sync => {
            eprintln!("stratus: the running daemon reaches the other devices of secret chats by itself");
        }
        SecretCommand::Listen { secs, .. } => {
            c.subscribe().await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(secs.unwrap_or(u64::MAX / 4));
            let mut said = c.status().await?.connected;
            if said {
                listening(json);
            }
            loop {
                let e = tokio::select! {
                    e = c.next_event() => e?,
                    () = tokio::time::sleep_until(deadline) => break,
                };
                match e {
                    EventView::Connected if !said => {
                        said = true;
                        listening(json);
                    }
                    e => print::event(&e, json, Shown::Secret)?,
                }
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct ContactView {
    account: String,
}

#[derive(Deserialize)]
struct Started {
    secret: String,
}

#[derive(Deserialize)]
struct DeviceView {
    device: String,
    name: String,
    online: bool,
}

#[derive(Deserialize)]
struct Fingerprint {
    fingerprint: String,
}
