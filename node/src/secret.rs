//! The commands for secret chats: two devices, a direct connection (or the relay's circuit
//! carrying ciphertext only), nothing stored on the relay.
//!
//! A secret chat lives between two devices, so both must be running at once for anything to
//! pass: `secret listen` keeps this device reachable; `send`, `start`, `close` and `sync`
//! reach the other device if it is (and leave what they wrote waiting otherwise).

use clap::Subcommand;
use stratus_engine::net::Net;
use stratus_engine::{DeviceId, SecretId, SecretMessage, SecretUpdate, SessionConfig};

use super::*;

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
    List {
        #[arg(long)]
        json: bool,
    },
    /// Write a message; with --ttl it disappears from both devices SECS seconds after it is
    /// read. Delivered now if the other device is reachable, else by a later command.
    Send {
        id: SecretId,
        text: String,
        #[arg(long, value_name = "SECS")]
        ttl: Option<u32>,
    },
    /// The chat's messages, marked read (their timers start).
    Log {
        id: SecretId,
        #[arg(long)]
        json: bool,
    },
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
        #[arg(long)]
        json: bool,
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

fn say(id: SecretId, r: &Reach) {
    match r {
        Reach::Linked(updates, direct) => {
            let n: usize = updates.iter().map(|u| u.added.len()).sum();
            let path = if *direct { "direct" } else { "through the relay" };
            out(&format!("{id}: delivered ({path}); {n} new from the other device"));
        }
        Reach::Pending => out(&format!("{id}: waiting for the other device to accept")),
        Reach::Gone => out(&format!("{id}: closed")),
        Reach::Offline(why) => out(&format!("{id}: the other device is not reachable ({why}); it waits here")),
    }
}

fn secret_line(m: &SecretMessage) -> String {
    let mut line = message_line(&m.message);
    if let Some(ttl) = m.ttl_s {
        line.push_str(&format!(" ⏱{ttl}s"));
    }
    line
}

fn secret_json(id: SecretId, m: &SecretMessage) -> String {
    serde_json::json!({
        "secret": id.to_string(),
        "id": m.message.id,
        "author": m.message.author,
        "device": m.message.device,
        "text": m.message.text,
        "ts": m.message.ts,
        "deleted": m.message.deleted,
        "read_by": m.message.read_by,
        "ttl_s": m.ttl_s,
        "expires_ms": m.expires_ms,
    })
    .to_string()
}

pub(crate) async fn secret(mut device: Device, command: SecretCommand) -> Result<(), Failure> {
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
                let names: Vec<String> = devices
                    .iter()
                    .map(|(c, on)| format!("{} ({}{})", c.body.device, c.body.name, if *on { ", online" } else { "" }))
                    .collect();
                return Err(Failure::Other(format!(
                    "choose one of {user}'s devices with --device: {}",
                    names.join(", ")
                )));
            };
            let peer = cert.body.device.clone();
            let id = device.secret_start(cert.clone())?;
            out(&id.to_string());
            let relay = relay_of(&device)?;
            let mut net = Net::start(device.keypair())?;
            let r = reach(&mut device, &mut net, &relay, id, &peer).await;
            say(id, &r);
        }
        SecretCommand::Accept { id } => {
            device.secret_accept_offer(id).await?;
            out(&format!("{id}: accepted"));
        }
        SecretCommand::AutoAccept { off } => {
            device.set_secret_auto_accept(!off)?;
            out(if off { "secret chats wait for `secret accept`" } else { "secret chats are taken at once" });
        }
        SecretCommand::List { json } => {
            for c in device.secret_chats()? {
                let state = format!("{:?}", c.state).to_lowercase();
                if json {
                    let v = serde_json::json!({
                        "id": c.id.to_string(),
                        "account": c.peer_cert.body.account.to_string(),
                        "device": c.peer_cert.body.device.0,
                        "device_name": c.peer_cert.body.name,
                        "state": state,
                        "verified": c.verified,
                    });
                    out(&v.to_string());
                } else {
                    out(&format!("{} {} ({}) [{state}]", c.id, c.peer_cert.body.name, c.peer_cert.body.account));
                }
            }
        }
        SecretCommand::Send { id, text, ttl } => {
            let m = device.secret_send(id, &text, ttl)?;
            out(&m.message.id);
            let peer = device.secret(id)?.peer_cert.body.device;
            let relay = relay_of(&device)?;
            let mut net = Net::start(device.keypair())?;
            match reach(&mut device, &mut net, &relay, id, &peer).await {
                Reach::Offline(why) => {
                    eprintln!("stratus: the other device is not reachable ({why}); the message waits here")
                }
                r => say(id, &r),
            }
        }
        SecretCommand::Log { id, json } => {
            let messages = device.secret_messages(id)?;
            if let Some(last) = messages.last() {
                device.secret_read(id, &last.message.id)?;
            }
            for m in device.secret_messages(id)? {
                out(&if json { secret_json(id, &m) } else { secret_line(&m) });
            }
        }
        SecretCommand::Close { id } => {
            let peer = device.secret(id)?.peer_cert.body.device;
            device.secret_close(id)?;
            out(&format!("{id}: closed here"));
            let relay = relay_of(&device)?;
            let mut net = Net::start(device.keypair())?;
            let r = reach(&mut device, &mut net, &relay, id, &peer).await;
            if !matches!(r, Reach::Offline(_)) {
                out(&format!("{id}: closed on the other device"));
            }
        }
        SecretCommand::Verify { id } => out(&format!("fingerprint: {}", device.secret_fingerprint(id)?)),
        SecretCommand::Sync => {
            let relay = relay_of(&device)?;
            let mut net = Net::start(device.keypair())?;
            for (id, peer) in device.secret_chats_to_reach()? {
                let r = reach(&mut device, &mut net, &relay, id, &peer).await;
                say(id, &r);
            }
        }
        SecretCommand::Listen { secs, tcp, json } => listen(device, secs, tcp, json).await?,
    }
    Ok(())
}

/// A session that runs this device's secret chats too, listening on `tcp` for direct
/// connections.
pub(crate) fn session(device: Device, tcp: stratus_engine::libp2p::Multiaddr) -> Result<Session, Failure> {
    let config = SessionConfig { secret_chats: true, secret_tcp: Some(tcp) };
    Ok(Session::start_with(device, config)?)
}

/// Prints a secret chat event (others are ignored).
pub(crate) fn print_event(e: &Event, json: bool) {
    match e {
        Event::SecretMessage { chat, message } => {
            out(&if json { secret_json(*chat, message) } else { format!("{chat} {}", secret_line(message)) })
        }
        Event::SecretOffered { chat, from } => out(&if json {
            serde_json::json!({ "secret": chat.to_string(), "offered_by": from.body.account.to_string(),
                "device": from.body.device.0, "device_name": from.body.name })
            .to_string()
        } else {
            format!("{chat}: offered by {} ({}); `secret accept` it", from.body.name, from.body.account)
        }),
        Event::SecretLinked { chat } => eprintln!("stratus: {chat}: linked with the other device"),
        Event::SecretClosed { chat } => out(&if json {
            serde_json::json!({ "secret": chat.to_string(), "closed": true }).to_string()
        } else {
            format!("{chat}: closed")
        }),
        Event::SecretExpired { chat, message } => out(&if json {
            serde_json::json!({ "secret": chat.to_string(), "disappeared": message }).to_string()
        } else {
            format!("{chat}: message {message} disappeared")
        }),
        _ => {}
    }
}

/// Stays reachable (for `secret` seconds, or until stopped): a session that runs the secret
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
            Ok(Event::SessionRevoked) => return Err(Error::SessionRevoked.into()),
            // Reachable once the session is connected (its listening came first).
            Ok(Event::Connected) if !said => {
                said = true;
                out("listening");
            }
            Ok(e) => print_event(&e, json),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                eprintln!("stratus: {n} events skipped (output too slow)")
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    session.stop().await?;
    Ok(())
}
