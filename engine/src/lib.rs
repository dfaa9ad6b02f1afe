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
//!   touches a socket or a file. The [`Client`] driver runs it over libp2p and sled.
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
//! See `engine/examples/two_devices.rs` for a runnable walkthrough.

pub mod proto;

#[cfg(feature = "device")]
mod device;

#[cfg(feature = "device")]
pub use device::*;

pub use proto::ids::{AccountId, ChatId, ClientSeq, DeviceId, Epoch, SecretId, Seq};
