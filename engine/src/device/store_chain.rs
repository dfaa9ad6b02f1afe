//! The account log's hash chain as this device computed it (see `proto/account_chain.rs`):
//! tree `account_chain`, seq → [`ChainHash`] of the log up to that entry, written with the
//! account cursor that passes the entry; a rewind drops the hashes past the lowered cursor.
//! `meta` keeps `account_chain_unknown` when the chain does not start at the log's start (a
//! store migrated from format 1 in the middle of its log), and `account_forked`, the position
//! of the first fork this device found (it stays until the user acts on it).

use super::{DeviceStore, StoreError};
use crate::proto::account_chain::ChainHash;
use crate::proto::ids::Seq;

impl DeviceStore {
    /// Whether this device's chain covers the account log from its start.
    pub fn account_chain_known(&self) -> Result<bool, StoreError> {
        Ok(!self.meta.contains_key("account_chain_unknown")?)
    }

    /// The chain's hash after the entry at `seq` (≥ 1), if this device applied it with the chain
    /// known.
    pub fn account_chain_at(&self, seq: Seq) -> Result<Option<ChainHash>, StoreError> {
        match self.account_chain.get(seq.0.to_be_bytes())? {
            Some(v) => Ok(Some(ChainHash(v.as_ref().try_into().map_err(|_| StoreError::Corrupt("account chain"))?))),
            None => Ok(None),
        }
    }

    /// Where this device found the account log forked, if it did.
    pub fn account_forked(&self) -> Result<Option<Seq>, StoreError> {
        self.meta.get("account_forked")?.map(|v| super::u64_of(&v, "account fork").map(Seq)).transpose()
    }

    /// Records a fork found at `seq` (the first one found is kept).
    pub fn set_account_forked(&self, seq: Seq) -> Result<(), StoreError> {
        if self.account_forked()?.is_none() {
            self.meta.insert("account_forked", &seq.0.to_be_bytes()[..])?;
            self.barrier()?;
        }
        Ok(())
    }

    /// The chain's hashes past `seq`, to drop when the cursor is lowered to it.
    pub(super) fn account_chain_past(&self, seq: Seq) -> Result<Vec<sled::IVec>, StoreError> {
        self.account_chain.range_from((seq.0 + 1).to_be_bytes(), usize::MAX).keys().collect()
    }

    /// The migration from format 1: a store that applied part of the log already cannot hash
    /// what it applied, so its chain is unknown (it compares nothing) rather than wrong.
    pub(super) fn migrate_account_chain(&self) -> Result<(), StoreError> {
        if self.account_cursor()? > Seq(0) {
            self.meta.insert("account_chain_unknown", &[][..])?;
        }
        Ok(())
    }
}
