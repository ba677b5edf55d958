//! openraft wired to the engine: log storage, the state machine, and the gRPC network.

// openraft's trait signatures fix the error type (`StorageError`), large as it is.
#![allow(clippy::result_large_err)]

mod entry_cache;
mod log_store;
pub mod network;
mod state_machine;
pub mod types;

pub use log_store::LogStore;
pub use state_machine::StateMachine;
pub(crate) use state_machine::{END_OF_RECORDS, write_snapshot};
pub use types::*;

#[cfg(test)]
mod tests;
