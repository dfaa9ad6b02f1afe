//! The Stratus relay: the always-on cloud store.
//!
//! It keeps every chat's history as an ordered log of client-side-encrypted deltas, assigns each
//! accepted delta the chat's next seq, acknowledges it only after an fsync barrier, pushes it to
//! every connected device of every member, and serves catch-up pages.
//!
//! * [`core`] decides everything and is sans-IO: inputs in, effects out, no clock, no sockets.
//! * [`store`] keeps the data in sled behind the [`store::RelayStore`] trait and provides the
//!   durability barrier.
//! * [`config`] reads the relay's settings (defaults, a TOML file, the environment, flags).
//! * [`metrics`] counts what the driver carries out, for the admin HTTP listener
//!   ([`server::http`]).
//! * [`limits`] holds what one peer, connection or device may hold or ask for at once.
//! * [`admin`] is the owner-only admin socket (`stratus-relay admin`, `backup`): it parses
//!   the operator's requests and hands them to the core, which decides.
//! * [`backups`] decides about a backup made while the relay runs (sans-IO too); the store
//!   copies, the driver hands the copy what is written meanwhile.
//! * [`server`] is the driver: libp2p, one task per stream, the core task and the group-commit
//!   barrier task.
//!
//! The relay never links Automerge and never holds a chat key.

pub mod admin;
pub mod backups;
pub mod config;
pub mod core;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod store;
