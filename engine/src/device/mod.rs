//! Everything a device needs (feature `device`).

pub mod core;
pub mod doc;
mod drive;
mod error;
mod local;
pub mod net;
pub mod secret;
mod session;
pub mod store;

pub use doc::Message;
pub use drive::{Action, Event};
pub use error::Error;
pub use local::{ChatSummary, ContactInfo, Device, LinkCode, MessageOp, SecretMessage, SecretUpdate, SessionInfo};
pub use session::{Session, Status};

/// The libp2p version the engine is built on, for apps that need its types (keys, addresses).
pub use libp2p;
