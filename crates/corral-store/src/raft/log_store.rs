//! The Raft log, vote and markers in the engine's `Log` and `Raft` column families.
//!
//! To ensure durability, an entry is reported flushed only once it is on disk, so a quorum's
//! acknowledgement means a quorum's fsync. `save_vote`, `truncate` and `purge` write with
//! sync. `append` writes without it (the entries are readable at once, as openraft requires)
//! and hands its flush callback to the [`Syncer`] thread, which syncs the write-ahead log and
//! then reports every append written before that sync began: no runtime worker thread waits
//! on the disk. (openraft 0.9 awaits each append's flush before the next one, so today each
//! append still has an fsync of its own.) The newest entries are also kept in memory
//! ([`EntryCache`]), so reading them back to apply or replicate them decodes nothing.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, mpsc};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, RaftLogReader, StorageIOError};

use super::entry_cache::{BOUNDS, EntryCache};
use super::types::{Entry, LogId, StorageError, TypeConfig, Vote, decode, encode};
use crate::engine::{Batch, Cf, SharedEngine};

const VOTE: &[u8] = b"vote";
const LAST_PURGED: &[u8] = b"last_purged";

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Appends waiting for a sync at most (openraft 0.9 has one outstanding); a full queue would
/// hold the next append back.
const SYNC_QUEUE: usize = 1024;

/// The log store. Clones share the engine, the syncer and the cache, and serve as log
/// readers.
#[derive(Clone)]
pub struct LogStore {
    engine: SharedEngine,
    syncer: Arc<Syncer>,
    cache: Arc<Mutex<EntryCache>>,
}

impl LogStore {
    pub fn new(engine: SharedEngine) -> Self {
        let syncer = Arc::new(Syncer::start(engine.clone()));
        Self { engine, syncer, cache: Arc::new(Mutex::new(EntryCache::new(BOUNDS))) }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        self.cache.lock().expect("the entry cache's lock")
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

    /// Entries in `range` from the engine.
    fn read_entries(&self, range: std::ops::Range<u64>) -> Result<Vec<Entry>, StorageError> {
        let start = range.start;
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
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let cached = self.cache().get(start, end);
        match cached {
            Some((entries, next)) if next >= end => Ok(entries),
            Some((mut entries, next)) => {
                entries.extend(self.read_entries(next..end)?);
                Ok(entries)
            }
            None => self.read_entries(start..end),
        }
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut batch = Batch::default();
        for entry in &entries {
            batch.put(Cf::Log, index_key(entry.log_id.index).to_vec(), encode(entry));
        }
        fail::fail_point!("raft-log-before-append");
        match self.engine.write(batch, false) {
            Ok(()) => {
                self.cache().append(&entries);
                self.syncer.after_next_sync(callback)
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache().truncate(log_id.index);
        let mut batch = Batch::default();
        batch.delete_range(Cf::Log, index_key(log_id.index).to_vec(), vec![0xFF; 9]);
        self.write(batch, true)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        fail::fail_point!("raft-log-purge");
        self.cache().purge(log_id.index);
        let mut batch = Batch::default();
        batch.put(Cf::Raft, LAST_PURGED, encode(&log_id));
        batch.delete_range(Cf::Log, index_key(0).to_vec(), index_key(log_id.index + 1).to_vec());
        self.write(batch, true)
    }
}

/// The thread that makes appended entries durable: it waits for a callback, takes every
/// other one queued by then (all written before the sync starts), syncs the engine's
/// write-ahead log once, and reports them all. Dropping the last log store ends the thread
/// and waits for it, so the engine is released when the store is.
struct Syncer {
    queue: Option<mpsc::SyncSender<LogFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Syncer {
    fn start(engine: SharedEngine) -> Self {
        let (queue, waiting) = mpsc::sync_channel(SYNC_QUEUE);
        let thread = std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || sync_appends(&engine, &waiting))
            .expect("spawning the raft log's sync thread");
        Self { queue: Some(queue), thread: Some(thread) }
    }

    /// Reports `callback` once a sync that started after this call has finished. The append
    /// must have been written before.
    fn after_next_sync(&self, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError> {
        let queue = self.queue.as_ref().expect("the queue lives as long as the syncer");
        queue
            .send(callback)
            .map_err(|_| StorageIOError::write_logs(AnyError::error("the log's sync thread is gone")).into())
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sync_appends(engine: &SharedEngine, waiting: &mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = waiting.recv() {
        let batch: Vec<_> = std::iter::once(first).chain(waiting.try_iter().take(SYNC_QUEUE)).collect();
        let result = engine.sync().map_err(|e| e.to_string());
        fail::fail_point!("raft-log-after-fsync");
        for callback in batch {
            callback.log_io_completed(result.clone().map_err(std::io::Error::other));
        }
    }
}
