//! openraft wired to the engine: log storage, the state machine, and the gRPC network.

mod log_store;
pub mod network;
mod state_machine;
pub mod types;

pub use log_store::LogStore;
pub use state_machine::StateMachine;
pub(crate) use state_machine::{write_snapshot, END_OF_RECORDS};
pub use types::*;

#[cfg(test)]
mod tests;
