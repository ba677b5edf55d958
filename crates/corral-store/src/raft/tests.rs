//! openraft's own storage conformance suite, run on our log store and state machine over
//! RocksDB and over the memory engine.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};

use super::{LogStore, StateMachine, StorageError, TypeConfig};
use crate::engine::{MemEngine, RocksEngine, SharedEngine};
use crate::mvcc::Mvcc;
use crate::watch::WatchHub;

fn open(engine: SharedEngine, dir: &std::path::Path) -> Result<(LogStore, StateMachine), StorageError> {
    let mvcc = Mvcc::open(engine.clone()).expect("mvcc opens");
    let hub = WatchHub::new(mvcc.current_revision());
    let sm = StateMachine::open(mvcc, hub, dir.join("snapshots"))?;
    Ok((LogStore::new(engine), sm))
}

struct Rocks;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Rocks {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine: SharedEngine = Arc::new(RocksEngine::open(&dir.path().join("db")).expect("rocksdb opens"));
        let (log, sm) = open(engine, dir.path())?;
        Ok((dir, log, sm))
    }
}

struct Memory;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Memory {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm) = open(Arc::new(MemEngine::new()), dir.path())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_on_rocksdb() -> Result<(), StorageError> {
    Suite::test_all(Rocks)
}

#[test]
fn openraft_storage_suite_on_memory() -> Result<(), StorageError> {
    Suite::test_all(Memory)
}
