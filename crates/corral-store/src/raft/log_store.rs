//! The Raft log, vote and markers in the engine's `Log` and `Raft` column families.
//!
//! To ensure durability, `append`, `save_vote`, `truncate` and `purge` write with sync: an
//! entry is reported flushed only once it is on disk, so a quorum's acknowledgement means a
//! quorum's fsync.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, RaftLogReader, StorageIOError};

use super::types::{Entry, LogId, StorageError, TypeConfig, Vote, decode, encode};
use crate::engine::{Batch, Cf, SharedEngine};

const VOTE: &[u8] = b"vote";
const LAST_PURGED: &[u8] = b"last_purged";

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The log store. Clones share the engine and serve as log readers.
#[derive(Clone)]
pub struct LogStore {
    engine: SharedEngine,
}

impl LogStore {
    pub fn new(engine: SharedEngine) -> Self {
        Self { engine }
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let raw = self.engine.view().get(Cf::Raft, key).map_err(|e| StorageIOError::read(&e))?;
        raw.map(|r| decode(&r).map_err(|e| StorageIOError::read(&e).into())).transpose()
    }

    /// The id of the last entry on disk, if the log holds any.
    pub fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let view = self.engine.view();
        let mut cursor = view.cursor(Cf::Log);
        cursor.seek_for_prev(&[0xFF; 9]);
        let last = if cursor.valid() {
            Some(decode::<Entry>(cursor.value()).map_err(|e| StorageIOError::read_logs(&e))?.log_id)
        } else {
            None
        };
        cursor.status().map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(last)
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<(), StorageError> {
        self.engine.write(batch, sync).map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let view = self.engine.view();
        let mut cursor = view.cursor(Cf::Log);
        cursor.seek(&index_key(start));
        let mut out = Vec::new();
        while cursor.valid() {
            let index = u64::from_be_bytes(
                cursor.key().try_into().map_err(|_| StorageIOError::read_logs(AnyError::error("bad log key")))?,
            );
            if !range.contains(&index) {
                break;
            }
            out.push(decode::<Entry>(cursor.value()).map_err(|e| StorageIOError::read_log_at_index(index, &e))?);
            cursor.next();
        }
        cursor.status().map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.read_meta(LAST_PURGED)?;
        let last = self.last_log_id()?;
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.or(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut batch = Batch::default();
        batch.put(Cf::Raft, VOTE, encode(vote));
        self.engine.write(batch, true).map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE)
    }

    // The committed marker is not persisted (openraft's default): after a restart the state
    // machine's own applied id, written atomically with what it applied, is where applying
    // resumes, and the leader tells a follower what is committed. Persisting it cost one
    // more engine write per commit on every server.

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = Batch::default();
        for entry in entries {
            batch.put(Cf::Log, index_key(entry.log_id.index).to_vec(), encode(&entry));
        }
        fail::fail_point!("raft-log-before-append");
        let result = self.engine.write(batch, true);
        fail::fail_point!("raft-log-after-fsync");
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = Batch::default();
        batch.delete_range(Cf::Log, index_key(log_id.index).to_vec(), vec![0xFF; 9]);
        self.write(batch, true)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        fail::fail_point!("raft-log-purge");
        let mut batch = Batch::default();
        batch.put(Cf::Raft, LAST_PURGED, encode(&log_id));
        batch.delete_range(Cf::Log, index_key(0).to_vec(), index_key(log_id.index + 1).to_vec());
        self.write(batch, true)
    }
}
