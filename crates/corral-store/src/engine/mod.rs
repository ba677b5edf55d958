//! The storage engine under the store: ordered key-value column families with atomic batches.
//!
//! The Raft log, the vote, and the MVCC state machine all live in one engine, so a state
//! machine batch and the applied log id it advances are written atomically, and one WAL
//! sync makes every earlier write durable. [`RocksEngine`] is the real one; [`MemEngine`]
//! runs the same conformance tests without a disk.

mod memory;
mod rocks;

pub use memory::MemEngine;
pub use rocks::RocksEngine;

use std::sync::Arc;

/// Column families. Each has its own key space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// Raft log entries by index (u64 big-endian).
    Log,
    /// Raft vote, committed and purged markers.
    Raft,
    /// MVCC versions: encoded user key, then the inverted revision.
    Kv,
    /// Revision (main, sub) to user key: the order of events, for watch replay and compaction.
    Rev,
    /// Leases by id, and lease-to-key attachments.
    Lease,
    /// State machine metadata: applied log id, membership, revisions, alarms.
    Meta,
}

impl Cf {
    pub const ALL: [Cf; 6] = [Cf::Log, Cf::Raft, Cf::Kv, Cf::Rev, Cf::Lease, Cf::Meta];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Log => "log",
            Cf::Raft => "raft",
            Cf::Kv => "kv",
            Cf::Rev => "rev",
            Cf::Lease => "lease",
            Cf::Meta => "meta",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// An engine failure: always fatal for the operation, never a client error.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("engine io: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt record in {cf:?}: {what}")]
    Corrupt { cf: Cf, what: String },
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// One write operation of a [`Batch`].
#[derive(Clone, Debug)]
pub enum WriteOp {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
    /// Deletes every key in `[start, end)`.
    DeleteRange {
        cf: Cf,
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// A set of writes applied atomically.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub ops: Vec<WriteOp>,
}

impl Batch {
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Put { cf, key: key.into(), value: value.into() });
    }

    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete { cf, key: key.into() });
    }

    pub fn delete_range(&mut self, cf: Cf, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::DeleteRange { cf, start: start.into(), end: end.into() });
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// A positioned iterator over one column family, in key order.
pub trait Cursor {
    /// Positions at the first key >= `key`.
    fn seek(&mut self, key: &[u8]);
    /// Positions at the last key <= `key`.
    fn seek_for_prev(&mut self, key: &[u8]);
    fn valid(&self) -> bool;
    fn key(&self) -> &[u8];
    fn value(&self) -> &[u8];
    fn next(&mut self);
    fn prev(&mut self);
    /// The error that ended iteration, if any.
    fn status(&self) -> Result<()>;
}

/// A consistent point-in-time view: reads through one view never see a later batch.
pub trait View {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn cursor(&self, cf: Cf) -> Box<dyn Cursor + '_>;
}

/// An ordered, batched, column-family key-value engine.
pub trait Engine: Send + Sync + 'static {
    /// A consistent view of the engine as of now.
    fn view(&self) -> Box<dyn View + '_>;

    /// Applies `batch` atomically. With `sync`, returns only once the batch and every earlier
    /// write is durable (fsync).
    fn write(&self, batch: Batch, sync: bool) -> Result<()>;

    /// Applies `batch` atomically without making it durable by itself: a crash may lose it,
    /// and with it every later replayable write, but never an earlier write. For what can be
    /// redone after a crash (the state machine's writes, which the Raft log replays); the
    /// engine persists them in its own time, all together.
    fn write_replayable(&self, batch: Batch) -> Result<()>;

    /// Flushes buffered writes to durable storage.
    fn sync(&self) -> Result<()>;

    /// Approximate bytes the state machine occupies on disk (the space quota counts these).
    fn size_bytes(&self) -> u64;

    /// Compacts the underlying files (etcd's Defragment).
    fn defragment(&self) -> Result<()>;

    /// Copies a consistent image of the engine to `dir`, for `etcdctl snapshot save`.
    fn checkpoint(&self, dir: &std::path::Path) -> Result<()>;
}

pub type SharedEngine = Arc<dyn Engine>;
