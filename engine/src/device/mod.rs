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
