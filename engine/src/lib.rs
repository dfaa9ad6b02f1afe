//! Stratus device engine.
//!
//! The engine keeps one Automerge document per chat, a local sled store with a durable outbox,
//! seals every delta with the chat key before it leaves the device, and syncs with a Stratus
//! relay over libp2p.
//!
//! # Contract
//!
//! * Bytes from the network never cause a panic, an unbounded allocation or a hang: they give a
//!   typed error ([`Error`]) or an [`Event::Error`] and change nothing.
//! * The decision logic ([`core::SyncCore`]) is sans-IO: it never reads the clock, awaits, or
//!   touches a socket or a file. [`Session`] runs it over libp2p and sled.
//! * A panic means a bug in Stratus, never bad input.
//!
//! # Features
//!
//! * `proto` — wire types, ids, certificates and crypto shared with the relay. It links no
//!   Automerge and no sled, so the relay can use it.
//! * `device` (default) — everything a device needs.
//!
//! # Example
//!
//! An app opens its [`Device`], creates an account on a relay (or links to one, see
//! [`Device::link_code`]), and runs a [`Session`]: one handle for everything while the device
//! syncs. Here the relay runs in the same process; in production it is the `stratus-relay`
//! binary and `relay` is the address it prints.
//!
//! ```
//! use stratus_engine::{Device, Event, MessageOp, Session};
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let (tx, rx) = tokio::sync::oneshot::channel();
//! # let config = stratus_relay::server::Config {
//! #     data_dir: dir.path().join("relay"),
//! #     listen: "/ip4/127.0.0.1/tcp/0".parse()?,
//! #     listen_ws: None,
//! #     external_addresses: Vec::new(),
//! #     limits: Default::default(),
//! #     admin_http: None,
//! #     shutdown_grace: std::time::Duration::from_secs(5),
//! #     admin_socket: None,
//! # };
//! # tokio::spawn(stratus_relay::server::run(config, move |a| drop(tx.send(a)), std::future::pending()));
//! # let relay = rx.await?.to_string();
//! # let home = dir.path().join("laptop");
//! let mut laptop = Device::open(&home)?;
//! laptop.create_account(&relay, "laptop").await?;
//!
//! let mut session = Session::start(laptop)?;
//! let mut events = session.events();
//! let chat = session.create_chat("Notes").await?;
//! // Durable on this device when it returns; the relay has it when `Acked` comes.
//! let (message, sent) = session.send(chat, "hello").await?;
//! while !matches!(events.recv().await?, Event::Acked { client_seq, .. } if client_seq == sent) {}
//!
//! session.write(chat, MessageOp::Edit { id: message.id.clone(), text: "hello, world".into() }).await?;
//! assert_eq!(session.messages(chat).await?[0].text, "hello, world");
//! let device = session.stop().await?; // the device back, e.g. to open it again later
//! # drop(device);
//! # Ok(())
//! # }
//! ```
//!
//! `engine/examples/two_devices.rs` adds a second device (linking and approving) against a relay
//! started by hand.

pub mod proto;

#[cfg(feature = "device")]
mod device;

#[cfg(feature = "device")]
pub use device::*;

pub use proto::ids::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, SecretId, Seq};
