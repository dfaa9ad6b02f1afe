//! Newtype ids. Each prints and parses as lowercase hex (devices as their libp2p PeerId).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An error parsing an id from text.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("not a valid {kind}: expected {len} hex digits")]
pub struct ParseIdError {
    kind: &'static str,
    len: usize,
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr, $kind:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// A fresh random id.
            pub fn random<R: rand::RngCore + ?Sized>(rng: &mut R) -> Self {
                let mut b = [0u8; $len];
                rng.fill_bytes(&mut b);
                Self(b)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let err = ParseIdError { kind: $kind, len: $len * 2 };
                let bytes = hex::decode(s.trim()).map_err(|_| err.clone())?;
                Ok(Self(bytes.try_into().map_err(|_| err)?))
            }
        }
    };
}

hex_id!(
    /// An account: `blake3(account signing key)[..16]`, so the id commits to the key.
    AccountId, 16, "account id"
);
hex_id!(
    /// A chat, chosen at random by the device that creates it.
    ChatId, 16, "chat id"
);
hex_id!(
    /// A secret chat (two devices, never on the relay), chosen at random by the device that
    /// starts it.
    SecretId, 16, "secret chat id"
);

/// A device: the text form of its libp2p PeerId (which the Noise handshake authenticates).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub String);

impl DeviceId {
    /// Longest device id accepted from the wire; PeerIds of Ed25519 keys are 52 characters.
    pub const MAX_LEN: usize = 128;
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

/// A position in a chat's or an account's log on the relay. Seq 1 is the first entry; a cursor
/// of `Seq(0)` means "nothing yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Seq(pub u64);

impl Seq {
    /// The seq after this one.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A device's own counter for the deltas it sends, increasing by one per delta. The relay
/// stores `(device, client seq)` once, which makes retried appends idempotent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientSeq(pub u64);

/// A chat key epoch. A new epoch (and key) starts when a member leaves or a device is revoked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text() {
        let id = ChatId([7; 16]);
        assert_eq!(id.to_string().parse::<ChatId>(), Ok(id));
        assert!("zz".parse::<ChatId>().is_err());
        assert!("0011".parse::<AccountId>().is_err());
    }
}
