//! Everything a device needs (feature `device`).

pub mod core;
pub mod doc;
mod drive;
mod error;
mod group_commit;
mod kv;
mod local;
pub mod net;
mod ops;
pub mod peer_links;
pub mod secret;
pub mod secret_links;
mod session;
pub mod session_core;
mod session_secret;
pub mod store;

pub use doc::Message;
pub use drive::{Action, Event, Written};
pub use error::Error;
pub use group_commit::BarrierStart;
pub use kv::MemDisk;
pub use local::{
    Answer, ChatSummary, ContactInfo, Device, Ended, LinkCode, MessageOp, Opening, SecretConn, SecretMessage,
    SecretUpdate, SessionInfo, Step,
};
pub use session::{Session, SessionConfig, Status};
pub use session_secret::{CONN_QUEUE, MAX_CONNS};

/// The libp2p version the engine is built on, for apps that need its types (keys, addresses).
pub use libp2p;
