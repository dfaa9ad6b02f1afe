//! Secret chats: two devices, a direct connection, a Noise session, never on the relay.
//!
//! * [`noise`]: the handshake and the transport messages (sans-IO).
//! * [`link`]: what travels inside them, and the texts' own keys.
//! * `Device::secret_*` (in `local/secret.rs`): the chats themselves, in the device's store.

pub mod link;
pub mod noise;

pub(crate) use link::SecretText;
pub use link::{SecretFrame, SecretLink};
pub use noise::{fingerprint, Channel, Ends, Handshake, Pattern, SecretError};
