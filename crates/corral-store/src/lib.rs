//! Corral's replicated store: etcd's data model and v3 API over openraft and RocksDB.
//!
//! - [`engine`]: the ordered key-value engine (RocksDB, or memory for tests).
//! - [`mvcc`]: revisions, versions, history, txns, leases, compaction.
//! - [`raft`]: openraft's log storage, state machine and snapshots over the engine.
//! - [`watch`]: fan-out of applied events to watchers on one server.

mod batch;
pub mod election;
pub mod engine;
pub mod error;
pub mod etcd;
pub mod failpoints;
pub mod mvcc;
pub mod node;
pub mod peer;
pub mod raft;
pub mod watch;

pub use error::{StoreError, StoreResult};
