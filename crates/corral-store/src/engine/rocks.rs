//! The RocksDB engine: one database per server, one column family per [`Cf`].

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DB, DBRawIterator, Options, ReadOptions, Snapshot,
    WriteBatch, WriteOptions,
};

use super::{Batch, Cf, Cursor, Engine, Result, View, WriteOp};

pub struct RocksEngine {
    db: DB,
    dir: std::path::PathBuf,
}

impl RocksEngine {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        // Keep the WAL bounded: memtables are flushed when it grows past this.
        opts.set_max_total_wal_size(256 << 20);
        // The state machine's writes skip the write-ahead log (the Raft log replays them after
        // a crash: `write_replayable`), so its column families must reach the disk together,
        // at one point of the write sequence: every flush is of all column families.
        // (RocksDB cannot pipeline writes with atomic flushes; measured, skipping the WAL for
        // the state machine gained more than pipelining did.)
        opts.set_atomic_flush(true);
        let cfs = Cf::ALL.iter().map(|cf| {
            let mut cf_opts = Options::default();
            if matches!(cf, Cf::Kv | Cf::Log) {
                cf_opts.set_write_buffer_size(64 << 20);
            }
            if *cf == Cf::Kv {
                // Writes read a key's newest version by its exact key (the key index knows
                // its revision): bloom filters spare the files that do not hold it.
                let mut table = BlockBasedOptions::default();
                table.set_bloom_filter(10.0, false);
                table.set_whole_key_filtering(true);
                cf_opts.set_block_based_table_factory(&table);
                cf_opts.set_memtable_prefix_bloom_ratio(0.02);
                cf_opts.set_memtable_whole_key_filtering(true);
            }
            ColumnFamilyDescriptor::new(cf.name(), cf_opts)
        });
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        Ok(Self { db, dir: dir.to_path_buf() })
    }

    /// Writes `batch` with `wo` (`sync` as it says), warning when that held the thread long.
    fn write_with(&self, batch: Batch, wo: &WriteOptions, sync: bool) -> Result<()> {
        let mut wb = WriteBatch::default();
        for op in batch.ops {
            match op {
                WriteOp::Put { cf, key, value } => wb.put_cf(self.handle(cf), key, value),
                WriteOp::Delete { cf, key } => wb.delete_cf(self.handle(cf), key),
                WriteOp::DeleteRange { cf, start, end } => wb.delete_range_cf(self.handle(cf), start, end),
            }
        }
        let started = std::time::Instant::now();
        self.db.write_opt(wb, wo)?;
        slow("write", sync, started);
        Ok(())
    }

    fn handle(&self, cf: Cf) -> &ColumnFamily {
        self.db.cf_handle(cf.name()).expect("every column family is created at open")
    }
}

impl Engine for RocksEngine {
    fn view(&self) -> Box<dyn View + '_> {
        Box::new(RocksView { engine: self, snapshot: self.db.snapshot() })
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        // The chaos suite's negative control (see Cargo.toml): nothing reaches the disk.
        #[cfg(feature = "ack-before-fsync")]
        {
            wo.set_sync(false);
            wo.disable_wal(true);
        }
        self.write_with(batch, &wo, sync)
    }

    fn write_replayable(&self, batch: Batch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.write_with(batch, &wo, false)
    }

    fn sync(&self) -> Result<()> {
        let started = std::time::Instant::now();
        self.db.flush_wal(true)?;
        slow("WAL sync", true, started);
        Ok(())
    }

    /// The state machine's table files plus the write-ahead log (the Raft log entries that
    /// hold what is not yet in them): what the store occupies on disk, as etcd counts its
    /// database file. The Raft log's own table files are left out (a snapshot purges them,
    /// compaction cannot); memtables are not counted by their arena memory, which is
    /// allocated in whole blocks.
    fn size_bytes(&self) -> u64 {
        let tables: u64 = Cf::ALL
            .iter()
            .filter(|cf| **cf != Cf::Log)
            .filter_map(|cf| {
                self.db.property_int_value_cf(self.handle(*cf), "rocksdb.total-sst-files-size").ok().flatten()
            })
            .sum();
        let wal: u64 = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        tables + wal
    }

    fn defragment(&self) -> Result<()> {
        for cf in Cf::ALL {
            self.db.compact_range_cf(self.handle(cf), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    fn checkpoint(&self, dir: &Path) -> Result<()> {
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(dir)?;
        Ok(())
    }
}

struct RocksView<'a> {
    engine: &'a RocksEngine,
    snapshot: Snapshot<'a>,
}

impl View for RocksView<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.snapshot.get_cf(self.engine.handle(cf), key)?)
    }

    fn cursor(&self, cf: Cf) -> Box<dyn Cursor + '_> {
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&self.snapshot);
        Box::new(RocksCursor { inner: self.engine.db.raw_iterator_cf_opt(self.engine.handle(cf), ro) })
    }
}

struct RocksCursor<'a> {
    inner: DBRawIterator<'a>,
}

impl Cursor for RocksCursor<'_> {
    fn seek(&mut self, key: &[u8]) {
        self.inner.seek(key);
    }

    fn seek_for_prev(&mut self, key: &[u8]) {
        self.inner.seek_for_prev(key);
    }

    fn valid(&self) -> bool {
        self.inner.valid()
    }

    fn key(&self) -> &[u8] {
        self.inner.key().expect("cursor is valid")
    }

    fn value(&self) -> &[u8] {
        self.inner.value().expect("cursor is valid")
    }

    fn next(&mut self) {
        self.inner.next();
    }

    fn prev(&mut self) {
        self.inner.prev();
    }

    fn status(&self) -> Result<()> {
        Ok(self.inner.status()?)
    }
}

/// Reports a write that held its thread long (a slow disk, or RocksDB delaying writes while
/// compaction catches up): a warning past a second, as etcd warns of a slow fdatasync.
fn slow(what: &str, sync: bool, started: std::time::Instant) {
    let ms = started.elapsed().as_millis() as u64;
    if ms >= 1000 {
        tracing::warn!(ms, sync, "slow engine {what}");
    } else if ms >= 50 {
        tracing::debug!(ms, sync, "slow engine {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD_DIR: &str = "CORRAL_TEST_CRASH_DIR";
    const KV_BATCHES: usize = 80;
    const KV_BATCH_BYTES: usize = 1 << 20;

    fn get(engine: &RocksEngine, cf: Cf, key: &[u8]) -> Option<Vec<u8>> {
        engine.view().get(cf, key).expect("reads")
    }

    /// The child's part: writes, waits for the engine's own flush, writes again, and dies
    /// without closing the database (as `kill -9` would; RocksDB flushes memtables on close).
    #[test]
    #[ignore = "run by replayable_writes_reach_the_disk_together in a child process"]
    fn crash_child() {
        let Ok(dir) = std::env::var(CHILD_DIR) else { return };
        let engine = RocksEngine::open(Path::new(&dir)).expect("opens");
        let mut log = Batch::default();
        log.put(Cf::Log, b"entry-1".to_vec(), b"synced".to_vec());
        engine.write(log, true).expect("writes the log");
        let mut applied = Batch::default();
        applied.put(Cf::Meta, b"applied".to_vec(), b"1".to_vec());
        engine.write_replayable(applied).expect("writes");
        // More than a memtable of state machine data: the engine flushes on its own.
        for i in 0..KV_BATCHES {
            let mut data = Batch::default();
            data.put(Cf::Kv, format!("key-{i:03}").into_bytes(), vec![i as u8; KV_BATCH_BYTES]);
            engine.write_replayable(data).expect("writes");
        }
        let flushed = |cf: Cf| {
            engine
                .db
                .property_int_value_cf(engine.handle(cf), "rocksdb.total-sst-files-size")
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        for _ in 0..600 {
            if flushed(Cf::Kv) > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(flushed(Cf::Kv) > 0, "the engine flushed the full memtable within 30 s");
        let mut later = Batch::default();
        later.put(Cf::Meta, b"applied".to_vec(), b"2".to_vec());
        engine.write_replayable(later).expect("writes");
        std::process::exit(0);
    }

    #[test]
    fn replayable_writes_reach_the_disk_together() {
        let dir = tempfile::tempdir().expect("tempdir");

        tracing::info!("phase 1: a child process writes, the engine flushes, the child dies");
        let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["engine::rocks::tests::crash_child", "--exact", "--ignored", "--quiet"])
            .env(CHILD_DIR, dir.path())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("runs the child");
        assert!(status.success(), "the child wrote and flushed: {status}");

        tracing::info!("phase 2: after the crash, the synced log write is there");
        let engine = RocksEngine::open(dir.path()).expect("reopens");
        assert_eq!(get(&engine, Cf::Log, b"entry-1").as_deref(), Some(&b"synced"[..]));

        tracing::info!("phase 3: the state machine is at the flush, in every column family");
        // Without atomic flushes the full Kv memtable would have reached the disk alone, and
        // the applied marker (in Meta, small) would be lost while the data it covers stayed.
        assert_eq!(get(&engine, Cf::Meta, b"applied").as_deref(), Some(&b"1"[..]), "the marker flushed with the data");
        let last = format!("key-{:03}", KV_BATCHES - 1);
        let kept = (0..KV_BATCHES).filter(|i| get(&engine, Cf::Kv, format!("key-{i:03}").as_bytes()).is_some()).count();
        assert!(kept > 0, "the flushed data is there");
        assert!(
            (0..kept).all(|i| get(&engine, Cf::Kv, format!("key-{i:03}").as_bytes()).is_some()),
            "what survived is a prefix of the writes (kept {kept}, last key {last})"
        );
    }
}
