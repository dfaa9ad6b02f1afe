//! What one account knows of another: its username on the relay, the chain of its keys'
//! generations (checkable from the account id alone), the terms a chat key is handed out on,
//! and the safety number two users compare.
//!
//! The relay's directory maps a username to an account id and serves the account's
//! [`AccountChain`]. The id commits to the genesis signing key and every later generation is
//! signed by the one before, so the chain cannot be forged; what the relay could still lie
//! about is which account a username belongs to. Devices pin the account they first saw under
//! a username and warn when the directory answers another; users who compare safety numbers
//! rule the relay out.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::cert::{AccountGen, AccountPublic, CertError, Rotation, RotationBody, MAX_GENERATION};
use super::ids::{AccountId, ChatId, Epoch};
use super::wire::ChatKind;

/// Shortest username.
pub const MIN_USERNAME_BYTES: usize = 3;
/// Longest username.
pub const MAX_USERNAME_BYTES: usize = 32;
/// Most accounts one directory lookup asks for.
pub const MAX_LOOKUP_ACCOUNTS: usize = 256;

/// Checks a username: 3 to 32 of `a-z`, `0-9` and `_`, starting with a letter. (Lowercase only,
/// so that two names that look alike are the same name.)
pub fn check_username(name: &str) -> Result<(), CertError> {
    let ok = (MIN_USERNAME_BYTES..=MAX_USERNAME_BYTES).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(CertError::Malformed("a username is 3 to 32 of a-z, 0-9 and _, starting with a letter"))
    }
}

/// One rotation as the directory serves it: the signed body, without the sealed bundles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedGen {
    /// The generation's public keys.
    pub body: RotationBody,
    /// The previous generation's signature over it.
    pub signature: Vec<u8>,
}

impl SignedGen {
    /// The signed part of a rotation.
    pub fn of(rotation: &Rotation) -> Self {
        SignedGen { body: rotation.body.clone(), signature: rotation.signature.clone() }
    }
}

/// An account's public keys through all their generations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountChain {
    /// Generation 0 (the id commits to it).
    pub public: AccountPublic,
    /// Every rotation since, oldest first.
    pub rotations: Vec<SignedGen>,
}

impl AccountChain {
    /// Checks the chain from the account id on and returns every generation, the genesis first:
    /// the id must commit to the genesis key and each rotation must be signed by the generation
    /// before it.
    pub fn verify(&self) -> Result<Vec<AccountGen>, CertError> {
        self.public.validate()?;
        if self.rotations.len() > MAX_GENERATION as usize {
            return Err(CertError::Malformed("more generations than an account may have"));
        }
        let mut gens = vec![self.public.genesis()];
        for r in &self.rotations {
            let rotation = Rotation { body: r.body.clone(), signature: r.signature.clone(), bundles: Vec::new() };
            let next = gens.last().expect("starts with the genesis").verify_rotation(&rotation)?;
            gens.push(next);
        }
        Ok(gens)
    }

    /// The account.
    pub fn id(&self) -> AccountId {
        self.public.id
    }

    /// True when `other` is this chain or continues it (same account, same generations so
    /// far, maybe more).
    pub fn extended_by(&self, other: &AccountChain) -> bool {
        self.public == other.public && other.rotations.get(..self.rotations.len()) == Some(&self.rotations[..])
    }
}

/// What the directory says of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    /// Its username, if it set one.
    pub username: Option<String>,
    /// Its keys.
    pub chain: AccountChain,
    /// Whether it accepts chats from the account that asked (the relay's word, so that a
    /// device can say so before it makes a chat the relay would refuse; the relay enforces it).
    pub accepts_you: bool,
}

/// What a chat key's signature covers besides the wrapped key itself and its recipient: the
/// chat, its kind, the epoch, and the epoch's members. A member's devices learn the member list
/// from it, so the relay cannot add anyone a member did not hand the key to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyTerms {
    /// The chat.
    pub chat: ChatId,
    /// Its kind.
    pub kind: ChatKind,
    /// The key epoch.
    pub epoch: Epoch,
    /// Every member account of the epoch (for a key of an earlier epoch shared with a new
    /// member: the members of the epoch it was shared in).
    pub members: BTreeSet<AccountId>,
}

/// Most accounts one change adds (each gets up to [`MAX_SHARED_EPOCHS`] earlier keys in the
/// `Rekey` that follows, which must fit one frame).
pub const MAX_ADDED_AT_ONCE: usize = 8;
/// Most earlier epochs whose keys a new member gets (the newest ones): their transport keys, or
/// with the history the whole keys.
pub const MAX_SHARED_EPOCHS: usize = 256;

/// A change of a chat's members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Membership {
    /// Adds accounts (groups only; any member may). With `share_history` they get the keys of
    /// earlier epochs too (the newest [`MAX_SHARED_EPOCHS`]); without, they read from their
    /// joining on.
    Add { accounts: BTreeSet<AccountId>, share_history: bool },
    /// Removes a member (groups only; only the group's creator may).
    Remove { account: AccountId },
    /// The signing account leaves.
    Leave,
}

/// What a member signs to change a chat's members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberChangeBody {
    /// The chat.
    pub chat: ChatId,
    /// The chat's newest key epoch when the change was made, and how many changes the chat had
    /// had in it: the change is taken only then, so that an old change cannot be replayed.
    pub base_epoch: Epoch,
    /// See `base_epoch`.
    pub seq: u32,
    /// The member making it.
    pub by: AccountId,
    /// The change.
    pub change: Membership,
}

impl MemberChangeBody {
    pub(crate) fn signed_bytes(&self) -> Vec<u8> {
        let mut b = b"stratus-member-change-v1".to_vec();
        b.extend(postcard::to_allocvec(self).expect("serializing cannot fail"));
        b
    }

    /// The members after the change, given those before.
    pub fn apply(&self, members: &BTreeSet<AccountId>) -> BTreeSet<AccountId> {
        let mut after = members.clone();
        match &self.change {
            Membership::Add { accounts, .. } => after.extend(accounts.iter().copied()),
            Membership::Remove { account } => {
                after.remove(account);
            }
            Membership::Leave => {
                after.remove(&self.by);
            }
        }
        after
    }

    /// The account that is no longer a member after the change, if any.
    pub fn departed(&self) -> Option<AccountId> {
        match &self.change {
            Membership::Add { .. } => None,
            Membership::Remove { account } => Some(*account),
            Membership::Leave => Some(self.by),
        }
    }
}

/// A signed change of a chat's members (see [`AccountKeys::sign_member_change`]).
///
/// [`AccountKeys::sign_member_change`]: super::cert::AccountKeys::sign_member_change
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberChange {
    /// What is signed.
    pub body: MemberChangeBody,
    /// The signature of `body.by`'s keys in force.
    pub signature: Vec<u8>,
}

/// The number two users compare to know that each has the other's real account: 60 digits in
/// twelve groups of five, the same on both sides (it depends on the pair, not the order).
pub fn safety_number(a: AccountId, b: AccountId) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut h = blake3::Hasher::new();
    h.update(b"stratus-safety-number-v1");
    h.update(&lo.0);
    h.update(&hi.0);
    let mut out = [0u8; 60];
    h.finalize_xof().fill(&mut out);
    let groups: Vec<String> = out
        .chunks(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect();
    groups.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cert::AccountKeys;

    #[test]
    fn usernames_are_checked() {
        for good in ["ann", "bob_2", "a23456789012345678901234567890xy"] {
            assert!(check_username(good).is_ok(), "{good}");
        }
        for bad in ["", "an", "Ann", "1ann", "_ann", "ann bob", "ann-b", "a234567890123456789012345678901xy", "än"] {
            assert!(check_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_chain_verifies_from_the_id_and_refuses_tampering() {
        let mut rng = rand::thread_rng();
        let g0 = AccountKeys::generate(&mut rng);
        let g1 = g0.rotated(&mut rng).unwrap();
        let g2 = g1.rotated(&mut rng).unwrap();
        let chain = AccountChain {
            public: g0.public(),
            rotations: vec![SignedGen::of(&g0.sign_rotation(&g1)), SignedGen::of(&g1.sign_rotation(&g2))],
        };
        let gens = chain.verify().unwrap();
        assert_eq!(gens.last(), Some(&g2.current()));
        let short = AccountChain { public: g0.public(), rotations: chain.rotations[..1].to_vec() };
        assert!(short.extended_by(&chain) && !chain.extended_by(&short));

        let mut forged = chain.clone();
        forged.rotations[1].body.kem_key = [7; 32];
        assert!(forged.verify().is_err());
        let mut skipped = chain.clone();
        skipped.rotations.remove(0);
        assert!(skipped.verify().is_err());
        let mut other = chain;
        other.public.id = AccountId([1; 16]);
        assert!(other.verify().is_err());
    }

    #[test]
    fn the_safety_number_is_the_pairs() {
        let (a, b, c) = (AccountId([1; 16]), AccountId([2; 16]), AccountId([3; 16]));
        let n = safety_number(a, b);
        assert_eq!(n, safety_number(b, a));
        assert_ne!(n, safety_number(a, c));
        assert_eq!(n.len(), 12 * 5 + 11);
        assert!(n.split(' ').all(|g| g.len() == 5 && g.chars().all(|c| c.is_ascii_digit())));
    }
}
