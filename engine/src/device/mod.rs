//! Everything a device needs (feature `device`).

pub mod core;
pub mod doc;
mod error;
mod local;
pub mod net;
mod session;
pub mod store;

pub use doc::Message;
pub use error::Error;
pub use local::{ChatSummary, Device, LinkCode};
pub use session::{Event, Session, Status};

/// The libp2p version the engine is built on, for apps that need its types (keys, addresses).
pub use libp2p;
