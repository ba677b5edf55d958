//! What the workload did, as it saw it: operations with their call and return times.
//!
//! Times are microseconds since the run's start, taken by one process for every client, so
//! they are comparable across clients.

use serde::{Deserialize, Serialize};

/// A value written to a hot key. Every write of a run writes a value no other write wrote
/// (client number and sequence), so a value seen anywhere names the one write that made it.
pub type Value = u64;

/// Makes the unique value of `client`'s `seq`-th write.
pub fn value_of(client: u32, seq: u32) -> Value {
    (u64::from(client) << 32) | u64::from(seq)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A range of one key. `value` is what it returned (None: no such key).
    Read { value: Option<Value>, serializable: bool },
    /// A put.
    Write { value: Value },
    /// A txn: if the key holds `expect` (None: the key does not exist) put `value`.
    /// `succeeded` is the txn's answer (meaningless when the outcome is unknown).
    Cas { expect: Option<Value>, value: Value, succeeded: bool },
    /// A delete of the key.
    Delete,
}

/// What the client learnt of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Answered: it took effect (for a txn, as `succeeded` says).
    Ok,
    /// Refused before it could take effect (no connection, an error the server returns
    /// before proposing).
    Failed,
    /// No answer (a timeout, a connection lost after the request left): it may or may not
    /// have taken effect, at any moment after its call.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub client: u32,
    pub key: String,
    pub kind: Kind,
    pub outcome: Outcome,
    pub call_us: u64,
    /// When the answer came (or the client gave up).
    pub return_us: u64,
    /// The response header's revision, when answered.
    pub revision: Option<i64>,
}

impl Op {
    pub fn is_write(&self) -> bool {
        !matches!(self.kind, Kind::Read { .. })
    }

    /// The value this operation wrote, if it writes one.
    pub fn written(&self) -> Option<Value> {
        match self.kind {
            Kind::Write { value } | Kind::Cas { value, .. } => Some(value),
            _ => None,
        }
    }

    /// True when the client was told that its write took effect.
    pub fn acknowledged(&self) -> bool {
        self.outcome == Outcome::Ok
            && match self.kind {
                Kind::Write { .. } | Kind::Delete => true,
                Kind::Cas { succeeded, .. } => succeeded,
                Kind::Read { .. } => false,
            }
    }
}

/// One event a watch delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub revision: i64,
    pub key: String,
    /// None for a delete.
    pub value: Option<Value>,
    /// The response it came in, counted per watcher: events of one revision must share it.
    pub response: u64,
}

/// Everything one watcher saw: from which revision it started, the events in arrival order,
/// and how many times it moved to another server.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WatchHistory {
    pub watcher: u32,
    pub start_revision: i64,
    pub events: Vec<Event>,
    pub resumes: u32,
    /// It saw the run's end (the sentinel key the runner writes last).
    pub finished: bool,
}

/// A run's whole record.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct History {
    pub ops: Vec<Op>,
    pub watches: Vec<WatchHistory>,
    /// The store's own account: every event under the workload's prefix from the run's first
    /// revision, read after the cluster healed.
    pub log: Vec<Event>,
    /// The revision the run started after.
    pub start_revision: i64,
}

/// Parses a value as the workload stores it (decimal).
pub fn parse_value(raw: &[u8]) -> Option<Value> {
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// The bytes the workload stores for a value.
pub fn encode_value(value: Value) -> Vec<u8> {
    value.to_string().into_bytes()
}
