//! What both sides of the wire need: ids, frames, certificates and crypto.
//!
//! Nothing here links Automerge, sled or libp2p.

pub mod account_chain;
pub mod cert;
pub mod crypto;
pub mod directory;
pub mod durable;
pub mod ids;
pub mod owner_socket;
pub mod wire;
