//! etcd's data model over an [`Engine`]: one global revision, every key's create revision,
//! mod revision, version and lease, and the history of every key until compaction.
//!
//! Writes happen only through a [`Writer`], from one task (the Raft state machine); reads
//! run concurrently from any task on consistent views. The in-memory revision counters are
//! bumped only after a batch is written, so a reader never sees a revision that it cannot
//! read.

mod index;
mod keys;
mod read;
mod record;
mod write;

pub use read::{KeyRange, RangeOptions};
pub use record::Record;
pub use write::{Applied, Writer, check_txn_request, txn_is_read_only};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use corral_proto::mvccpb;

use crate::engine::{Cf, EngineError, SharedEngine};
use crate::error::{StoreError, StoreResult};

/// Meta keys of the state machine.
pub(crate) mod meta {
    pub const CURRENT_REV: &[u8] = b"current_rev";
    pub const COMPACT_REV: &[u8] = b"compact_rev";
    pub const COMPACT_FINISHED: &[u8] = b"compact_finished";
    pub const ALARMS: &[u8] = b"alarms";
}

/// Lease column family key prefixes.
const LEASE_PREFIX: u8 = b'L';
const LEASE_KEY_PREFIX: u8 = b'K';

/// A lease as the state machine knows it. Deadlines are the leader's business, not state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseInfo {
    pub ttl_s: i64,
    pub keys: BTreeSet<Vec<u8>>,
}

/// One change, as a watcher receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub sub: u32,
    pub inner: mvccpb::Event,
}

impl Event {
    pub fn revision(&self) -> i64 {
        self.inner.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0)
    }

    pub fn key(&self) -> &[u8] {
        self.inner.kv.as_ref().map(|kv| kv.key.as_slice()).unwrap_or(&[])
    }
}

/// The MVCC store.
pub struct Mvcc {
    engine: SharedEngine,
    current_rev: AtomicI64,
    compact_rev: AtomicI64,
    /// The compaction the background compactor last finished.
    compact_finished: Arc<AtomicI64>,
    leases: Mutex<BTreeMap<i64, LeaseInfo>>,
    alarms: Mutex<Vec<(u64, i32)>>,
    /// The newest version of every live key, for the writer.
    index: Mutex<index::KeyIndex>,
    /// The background compactor, stopped and joined when the store is dropped.
    compactor: Mutex<Option<Compactor>>,
    /// Readers hold it shared; a snapshot install holds it exclusively while it empties and
    /// refills the engine, so no read sees the state half restored.
    restore_gate: std::sync::RwLock<()>,
}

struct Compactor {
    tx: std::sync::mpsc::Sender<i64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Drop for Mvcc {
    fn drop(&mut self) {
        if let Some(c) = self.compactor.lock().expect("compactor lock").take() {
            c.stop.store(true, Ordering::Release);
            drop(c.tx);
            let _ = c.thread.join();
        }
    }
}

impl Mvcc {
    /// Opens the store over `engine`, loading the revisions and leases it holds.
    pub fn open(engine: SharedEngine) -> StoreResult<Arc<Self>> {
        let loaded = Loaded::read(engine.as_ref())?;
        let index = index::KeyIndex::build(engine.view().as_ref())?;
        tracing::debug!(live_keys = index.len(), "key index built");
        let compact_finished = Arc::new(AtomicI64::new(loaded.compact_finished));
        let mvcc = Self {
            index: Mutex::new(index),
            compactor: Mutex::new(Some(spawn_compactor(engine.clone(), compact_finished.clone()))),
            compact_finished,
            engine,
            current_rev: AtomicI64::new(loaded.current_rev),
            compact_rev: AtomicI64::new(loaded.compact_rev),
            leases: Mutex::new(loaded.leases),
            alarms: Mutex::new(loaded.alarms),
            restore_gate: std::sync::RwLock::new(()),
        };
        if loaded.compact_finished < loaded.compact_rev {
            // A crash interrupted a compaction: finish it in the background.
            mvcc.schedule_compaction(loaded.compact_rev);
        }
        Ok(Arc::new(mvcc))
    }

    /// Shared while a read runs against the engine (not re-entrant: take it once per read).
    pub(crate) fn reading(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.restore_gate.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Exclusive while the engine's contents are replaced by a snapshot and reloaded: reads
    /// wait rather than see a half-restored state.
    pub fn restoring(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.restore_gate.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Re-reads the in-memory state after the engine's contents were replaced (a snapshot
    /// was installed). The caller is the only writer.
    pub fn reload(&self) -> StoreResult<()> {
        let loaded = Loaded::read(self.engine.as_ref())?;
        *self.index.lock().expect("index lock") = index::KeyIndex::build(self.engine.view().as_ref())?;
        *self.leases.lock().expect("lease lock") = loaded.leases;
        *self.alarms.lock().expect("alarm lock") = loaded.alarms;
        self.compact_rev.store(loaded.compact_rev, Ordering::Release);
        self.compact_finished.store(loaded.compact_finished, Ordering::Release);
        self.current_rev.store(loaded.current_rev, Ordering::Release);
        if loaded.compact_finished < loaded.compact_rev {
            self.schedule_compaction(loaded.compact_rev);
        }
        Ok(())
    }

    /// The compaction whose physical removal has finished on this server.
    pub fn compact_finished_revision(&self) -> i64 {
        self.compact_finished.load(Ordering::Acquire)
    }

    /// Hands a compaction to the background compactor.
    pub(crate) fn schedule_compaction(&self, compact_rev: i64) {
        if let Some(c) = self.compactor.lock().expect("compactor lock").as_ref() {
            let _ = c.tx.send(compact_rev);
        }
    }

    pub fn engine(&self) -> &SharedEngine {
        &self.engine
    }

    /// The revision of the last write applied.
    pub fn current_revision(&self) -> i64 {
        self.current_rev.load(Ordering::Acquire)
    }

    /// Revisions below this one are gone.
    pub fn compact_revision(&self) -> i64 {
        self.compact_rev.load(Ordering::Acquire)
    }

    /// Every lease with its TTL and keys.
    pub fn leases(&self) -> BTreeMap<i64, LeaseInfo> {
        self.leases.lock().expect("lease lock").clone()
    }

    pub fn lease(&self, id: i64) -> Option<LeaseInfo> {
        self.leases.lock().expect("lease lock").get(&id).cloned()
    }

    /// Active alarms as (member id, alarm type).
    pub fn alarms(&self) -> Vec<(u64, i32)> {
        self.alarms.lock().expect("alarm lock").clone()
    }

    /// Starts a batch of writes. Only one writer may exist at a time.
    pub fn writer(&self) -> Writer<'_> {
        Writer::new(self)
    }

    /// Checks that `rev` can be read: not compacted away, not in the future. 0 means current.
    fn check_revision(&self, rev: i64) -> StoreResult<i64> {
        let current = self.current_revision();
        if rev <= 0 {
            return Ok(current);
        }
        if rev > current {
            return Err(StoreError::FutureRev);
        }
        let compact_rev = self.compact_revision();
        if rev < compact_rev {
            return Err(StoreError::Compacted { compact_rev });
        }
        Ok(rev)
    }
}

/// A thread that removes compacted history, one compaction at a time, the newest asked for.
/// Stopped midway, a compaction resumes at the next start.
fn spawn_compactor(engine: SharedEngine, finished: Arc<AtomicI64>) -> Compactor {
    let (tx, rx) = std::sync::mpsc::channel::<i64>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
        .name("mvcc-compactor".into())
        .spawn(move || {
            while let Ok(mut target) = rx.recv() {
                while let Ok(newer) = rx.try_recv() {
                    target = target.max(newer);
                }
                match write::compact(engine.as_ref(), target, &stopped) {
                    Ok(true) => finished.fetch_max(target, Ordering::AcqRel),
                    Ok(false) => return,
                    Err(e) => {
                        tracing::error!(compact_rev = target, error = %e, "compaction failed; it resumes at the next start");
                        continue;
                    }
                };
            }
        })
        .expect("spawning the compactor thread");
    Compactor { tx, stop, thread }
}

/// The state kept in memory, as read from the engine.
struct Loaded {
    current_rev: i64,
    compact_rev: i64,
    compact_finished: i64,
    leases: BTreeMap<i64, LeaseInfo>,
    alarms: Vec<(u64, i32)>,
}

impl Loaded {
    fn read(engine: &dyn crate::engine::Engine) -> Result<Self, EngineError> {
        let view = engine.view();
        let read_i64 = |key: &[u8]| -> Result<Option<i64>, EngineError> {
            Ok(view.get(Cf::Meta, key)?.map(|raw| i64::from_be_bytes(raw.as_slice().try_into().unwrap_or([0; 8]))))
        };
        let current_rev = read_i64(meta::CURRENT_REV)?.unwrap_or(1);
        let compact_rev = read_i64(meta::COMPACT_REV)?.unwrap_or(0);
        let compact_finished = read_i64(meta::COMPACT_FINISHED)?.unwrap_or(0);
        let alarms = match view.get(Cf::Meta, meta::ALARMS)? {
            Some(raw) => decode_alarms(&raw),
            None => Vec::new(),
        };
        let mut leases = BTreeMap::<i64, LeaseInfo>::new();
        let mut cursor = view.cursor(Cf::Lease);
        cursor.seek(&[]);
        while cursor.valid() {
            let key = cursor.key();
            if key.len() >= 9 {
                let id = i64::from_be_bytes(key[1..9].try_into().expect("8 bytes"));
                match key[0] {
                    LEASE_PREFIX => {
                        let ttl = i64::from_be_bytes(cursor.value().try_into().unwrap_or([0; 8]));
                        leases.entry(id).or_default().ttl_s = ttl;
                    }
                    LEASE_KEY_PREFIX => {
                        leases.entry(id).or_default().keys.insert(key[9..].to_vec());
                    }
                    _ => {}
                }
            }
            cursor.next();
        }
        cursor.status()?;
        Ok(Loaded { current_rev, compact_rev, compact_finished, leases, alarms })
    }
}

pub(crate) fn lease_key(id: i64) -> Vec<u8> {
    let mut k = vec![LEASE_PREFIX];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub(crate) fn lease_attachment_key(id: i64, key: &[u8]) -> Vec<u8> {
    let mut k = vec![LEASE_KEY_PREFIX];
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(key);
    k
}

pub(crate) fn encode_alarms(alarms: &[(u64, i32)]) -> Vec<u8> {
    alarms.iter().flat_map(|(member, alarm)| member.to_be_bytes().into_iter().chain(alarm.to_be_bytes())).collect()
}

fn decode_alarms(raw: &[u8]) -> Vec<(u64, i32)> {
    raw.chunks_exact(12)
        .map(|c| (u64::from_be_bytes(c[..8].try_into().expect("8")), i32::from_be_bytes(c[8..].try_into().expect("4"))))
        .collect()
}

#[cfg(test)]
mod tests;
