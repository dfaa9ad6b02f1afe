//! The account log's hash chain (issue 15, item 8; docs/crypto.md, "Account log forks").
//!
//! Each device folds the entries it applies, in order, into a chain: the hash at position `n`
//! commits to every entry up to `n`. Two devices of one account that were shown the same log
//! hold the same hash at every position they both reached; a relay that showed them different
//! entries at any position up to there cannot make their hashes agree. Comparing one
//! `(seq, hash)` pair therefore checks the whole history before it.
//!
//! `hash(0) = blake3("stratus-account-log-v1" ‖ 0 ‖ account id)`, and
//! `hash(n) = blake3("stratus-account-log-v1" ‖ 1 ‖ hash(n - 1) ‖ n ‖ postcard(event n))`.

use serde::{Deserialize, Serialize};

use crate::proto::ids::{AccountId, DeviceId, Seq};
use crate::proto::wire::AccountEntry;

const DOMAIN: &[u8] = b"stratus-account-log-v1";

/// The hash of an account log up to a position.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChainHash(pub [u8; 32]);

impl std::fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChainHash({})", hex::encode(&self.0[..8]))
    }
}

impl ChainHash {
    /// The hash of the empty log of `account` (position 0).
    pub fn genesis(account: AccountId) -> ChainHash {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(&[0]);
        h.update(&postcard::to_allocvec(&account).expect("serializing cannot fail"));
        ChainHash(*h.finalize().as_bytes())
    }

    /// The hash after `entry`, the entry following the position this is the hash of.
    pub fn then(&self, entry: &AccountEntry) -> ChainHash {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(&[1]);
        h.update(&self.0);
        h.update(&entry.seq.0.to_be_bytes());
        h.update(&postcard::to_allocvec(&entry.event).expect("serializing cannot fail"));
        ChainHash(*h.finalize().as_bytes())
    }
}

/// Two histories of one account log differ at or before `seq`: the relay showed two devices
/// (or one device, at two times) different entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the account log was shown in two different versions, differing at or before position {seq}")]
pub struct Forked {
    /// The position whose hashes differ.
    pub seq: Seq,
}

/// Compares a hash another party holds for position `seq` with ours (`None`: we did not reach
/// it, or do not know it): a difference is a fork.
pub fn compare(seq: Seq, ours: Option<ChainHash>, theirs: ChainHash) -> Result<(), Forked> {
    match ours {
        Some(h) if h != theirs => Err(Forked { seq }),
        _ => Ok(()),
    }
}

/// A device's statement, signed with its account's keys, that the account log it was shown
/// hashes to `hash` up to `seq`. Devices send theirs to the relay, which logs it
/// ([`crate::proto::wire::AccountEvent::Checkpoint`]); every device of the account compares it
/// with its own hash when it applies it, so that a relay that showed two devices different logs
/// must also keep each one's checkpoints from the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The position.
    pub seq: Seq,
    /// The device's hash of the log up to `seq`.
    pub hash: ChainHash,
    /// The device that made it.
    pub by: DeviceId,
    /// The account's signature (the generation in force when it was logged) over
    /// [`Checkpoint::signed_bytes`].
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// What the account signs: `"stratus-account-checkpoint-v1" ‖ postcard(account, seq, hash,
    /// device)`.
    pub fn signed_bytes(account: AccountId, seq: Seq, hash: &ChainHash, by: &DeviceId) -> Vec<u8> {
        let mut b = b"stratus-account-checkpoint-v1".to_vec();
        b.extend(postcard::to_allocvec(&(account, seq, hash, by)).expect("serializing cannot fail"));
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ids::DeviceId;
    use crate::proto::wire::AccountEvent;

    fn expired(seq: u64, device: &str) -> AccountEntry {
        AccountEntry {
            seq: Seq(seq),
            event: AccountEvent::DeviceExpired { device: DeviceId(device.into()), last_active_ms: 1 },
        }
    }

    /// Two histories that differ at one position differ at every later one, and agree before.
    #[test]
    fn a_different_entry_changes_every_later_hash() {
        let g = ChainHash::genesis(AccountId([1; 16]));
        let a1 = g.then(&expired(1, "a"));
        let b1 = g.then(&expired(1, "b"));
        assert_ne!(a1, b1);
        let (a2, b2) = (a1.then(&expired(2, "c")), b1.then(&expired(2, "c")));
        assert_ne!(a2, b2, "the same second entry after different first ones");
        assert_eq!(compare(Seq(2), Some(a2), b2), Err(Forked { seq: Seq(2) }));
        assert_eq!(compare(Seq(2), Some(a2), a1.then(&expired(2, "c"))), Ok(()));
        assert_eq!(compare(Seq(3), None, b2), Ok(()), "a position not reached is not compared");
        // Another account's log, or the same event at another position, hashes differently.
        assert_ne!(ChainHash::genesis(AccountId([2; 16])).then(&expired(1, "a")), a1);
        assert_ne!(g.then(&expired(2, "a")), a1);
    }
}
