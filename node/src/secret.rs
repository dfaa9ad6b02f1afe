//! The commands for secret chats: two devices, a direct connection (or the relay's circuit
//! carrying ciphertext only), nothing stored on the relay.
//!
//! A secret chat lives between two devices, so both must be running at once for anything to
//! pass: `secret listen` keeps this device reachable; `send`, `start`, `close` and `sync`
//! reach the other device if it is (and leave what they wrote waiting otherwise).

use clap::Subcommand;
use futures::StreamExt;
use stratus_engine::net::{Net, SecretStream};
use stratus_engine::{DeviceId, SecretId, SecretMessage, SecretUpdate};

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

/// Stays reachable: answers each device that opens a secret stream, one at a time, printing
/// messages as they arrive; runs the self-destruct timers in between.
async fn listen(
    mut device: Device,
    secs: Option<u64>,
    tcp: stratus_engine::libp2p::Multiaddr,
    json: bool,
) -> Result<(), Failure> {
    let relay = relay_of(&device)?;
    let mut net = Net::start(device.keypair())?;
    net.listen_secret(Some(tcp), &relay).await?;
    let mut incoming = net.accept_secret()?;
    out("listening");
    let deadline = secs.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let auto = device.secret_auto_accept()?;
    loop {
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Ok(());
        }
        for (id, m) in device.secret_expire()? {
            out(&format!("{id}: message {m} disappeared"));
        }
        let Ok(next) = tokio::time::timeout(Duration::from_secs(1), incoming.next()).await else { continue };
        let Some((peer, stream)) = next else { return Ok(()) };
        let mut stream = SecretStream::from(stream);
        let peer = DeviceId(peer.to_string());
        let opened = match device.secret_answer(&peer, &mut stream, auto).await {
            Ok(o) => o,
            Err(e) => {
                eprintln!("stratus: a secret chat from {peer} failed: {e}");
                continue;
            }
        };
        let Some((mut link, first)) = opened else {
            for c in device.secret_chats()?.into_iter().filter(|c| c.peer_cert.body.device == peer) {
                if c.state == stratus_engine::store::SecretState::Invited {
                    out(&format!(
                        "{}: offered by {} ({}); `secret accept` it",
                        c.id, c.peer_cert.body.name, c.peer_cert.body.account
                    ));
                }
            }
            continue;
        };
        let id = link.chat;
        let print = |u: &SecretUpdate| {
            for m in &u.added {
                out(&if json { secret_json(id, m) } else { format!("{id} {}", secret_line(m)) });
            }
            if u.closed {
                out(&format!("{id}: closed by the other device"));
            }
            false
        };
        if let Err(e) = device.secret_serve(&mut link, &mut stream, first, IDLE * 20, print).await {
            eprintln!("stratus: the secret chat {id} link ended: {e}");
        }
    }
}
