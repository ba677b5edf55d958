//! Corral's replicated store: etcd's data model and v3 API over openraft and RocksDB.
//!
//! - [`engine`]: the ordered key-value engine (RocksDB, or memory for tests).
//! - [`mvcc`]: revisions, versions, history, txns, leases, compaction.

pub mod engine;
pub mod error;
pub mod mvcc;

pub use error::{StoreError, StoreResult};
