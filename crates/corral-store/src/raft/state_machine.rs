//! The Raft state machine: applies entries to the MVCC store, builds and installs snapshots.
//!
//! To ensure correctness, the applied log id and membership are written in the same engine
//! batch as the writes they cover. A snapshot is a file holding every state-machine column
//! family as of one engine view, so its `last_log_id` is exactly what it contains; it is
//! streamed in chunks by openraft and never held in memory whole.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, StorageIOError};

use super::types::{
    Entry, LogId, Response, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig, decode, encode,
};
use corral_proto::store::CommandResults;

use crate::engine::{Batch, Cf, Engine, EngineError};
use crate::mvcc::Mvcc;
use crate::watch::{Published, WatchHub};

const APPLIED: &[u8] = b"raft_applied";
const MEMBERSHIP: &[u8] = b"raft_membership";
/// Present while a snapshot is being installed: the state machine is incomplete until the
/// install finishes, and a restart must redo it.
const RESTORING: &[u8] = b"raft_restoring";
const MAGIC: &[u8] = b"CORRAL-SNAPSHOT-1\n";
/// The column families a snapshot carries.
const SNAPSHOT_CFS: [Cf; 4] = [Cf::Kv, Cf::Rev, Cf::Lease, Cf::Meta];
const RESTORE_BATCH_BYTES: usize = 8 << 20;
/// Commands (an entry without any counting as one) applied in one write at most. Live traffic brings a few entries of up to a few
/// hundred commands per apply, one write each; a server catching up gets thousands of entries
/// at once, and applies them in writes of about this many commands, yielding in between.
const APPLY_CHUNK_COMMANDS: usize = 2048;
/// Marks the end of the records; what follows (padding, a checksum) is not state.
pub(crate) const END_OF_RECORDS: u8 = 0xFF;

fn sm_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

fn snap_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, &e).into()
}

/// Where snapshots live, and which one is current.
struct SnapshotDir {
    dir: PathBuf,
    current: Mutex<Option<SnapshotMeta>>,
}

impl SnapshotDir {
    fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        // Files being built or received when the server stopped are never published.
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let current = match std::fs::read(dir.join("current.meta")) {
            Ok(raw) => decode::<SnapshotMeta>(&raw).ok().filter(|m| dir.join(file_name(m)).exists()),
            Err(_) => None,
        };
        Ok(Self { dir, current: Mutex::new(current) })
    }

    fn path(&self, meta: &SnapshotMeta) -> PathBuf {
        self.dir.join(file_name(meta))
    }

    /// The current snapshot, with its file opened under the lock: a publish that comes after
    /// may remove the file's name, but not what the open file reads.
    fn open_current(&self) -> std::io::Result<Option<(SnapshotMeta, tokio::fs::File)>> {
        let current = self.current.lock().expect("snapshot lock");
        let Some(meta) = current.as_ref() else { return Ok(None) };
        let file = std::fs::File::open(self.path(meta))?;
        Ok(Some((meta.clone(), tokio::fs::File::from_std(file))))
    }

    /// A name for a snapshot file being written: nothing removes it until it is published.
    fn temp_path(&self, purpose: &str) -> PathBuf {
        self.dir.join(format!("{purpose}-{:x}.tmp", rand::random::<u64>()))
    }

    /// Makes the snapshot written to `written` (a [`Self::temp_path`]) current as `meta`,
    /// unless a newer snapshot already is; removes the older files. The file is renamed under
    /// the lock, so another publish cannot remove it between the rename and the switch.
    fn publish(&self, meta: &SnapshotMeta, written: &Path) -> std::io::Result<bool> {
        let mut current = self.current.lock().expect("snapshot lock");
        if let Some(cur) = current.as_ref()
            && cur.last_log_id >= meta.last_log_id
            && cur.snapshot_id != meta.snapshot_id
        {
            let _ = std::fs::remove_file(written);
            return Ok(false);
        }
        std::fs::rename(written, self.path(meta))?;
        let tmp = self.dir.join("current.meta.tmp");
        std::fs::write(&tmp, encode(meta))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, self.dir.join("current.meta"))?;
        let keep = file_name(meta);
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".snap") && name != keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        *current = Some(meta.clone());
        Ok(true)
    }
}

fn file_name(meta: &SnapshotMeta) -> String {
    format!("{}.snap", meta.snapshot_id)
}

/// The state machine handed to openraft.
pub struct StateMachine {
    mvcc: Arc<Mvcc>,
    hub: Arc<WatchHub>,
    snapshots: Arc<SnapshotDir>,
    applied: Option<LogId>,
    membership: StoredMembership,
}

impl StateMachine {
    /// Opens the state machine; finishes an install that a crash interrupted.
    pub fn open(mvcc: Arc<Mvcc>, hub: Arc<WatchHub>, snapshot_dir: PathBuf) -> Result<Self, StorageError> {
        let snapshots = Arc::new(SnapshotDir::open(snapshot_dir).map_err(snap_err)?);
        let engine = mvcc.engine().clone();
        if engine.view().get(Cf::Meta, RESTORING).map_err(sm_err)?.is_some() {
            let meta = snapshots.current.lock().expect("snapshot lock").clone();
            let meta = meta.ok_or_else(|| {
                StorageError::from(StorageIOError::read_snapshot(
                    None,
                    AnyError::error("interrupted install has no snapshot file"),
                ))
            })?;
            tracing::warn!(snapshot = %meta.snapshot_id, "finishing a snapshot install interrupted by a crash");
            restore(engine.as_ref(), &snapshots.path(&meta)).map_err(sm_err)?;
            mvcc.reload().map_err(|e| sm_err(std::io::Error::other(e.to_string())))?;
        }
        let read_applied = || -> Result<Option<LogId>, StorageError> {
            match engine.view().get(Cf::Meta, APPLIED).map_err(sm_err)? {
                Some(raw) => decode::<Option<LogId>>(&raw).map_err(sm_err),
                None => Ok(None),
            }
        };
        // A crash between publishing a received snapshot and starting its restore leaves a
        // current snapshot ahead of the state machine (openraft refuses to start so: its
        // snapshot would be past what is committed). The file is whole and synced, and a
        // leader sends only committed state: install it now.
        let current = snapshots.current.lock().expect("snapshot lock").clone();
        if let Some(meta) = current
            && meta.last_log_id > read_applied()?
        {
            tracing::warn!(snapshot = %meta.snapshot_id, "finishing a snapshot install that a crash stopped before its restore");
            restore(engine.as_ref(), &snapshots.path(&meta)).map_err(sm_err)?;
            mvcc.reload().map_err(|e| sm_err(std::io::Error::other(e.to_string())))?;
        }
        let applied = read_applied()?;
        let view = engine.view();
        let membership = match view.get(Cf::Meta, MEMBERSHIP).map_err(sm_err)? {
            Some(raw) => decode::<StoredMembership>(&raw).map_err(sm_err)?,
            None => StoredMembership::default(),
        };
        drop(view);
        Ok(Self { mvcc, hub, snapshots, applied, membership })
    }
}

impl StateMachine {
    /// Applies entries from `entries` in one write, up to [`APPLY_CHUNK_COMMANDS`] commands
    /// (never splitting an entry), and publishes their events. The applied id is written with
    /// the data it covers, so a crash between chunks leaves a whole prefix applied.
    fn apply_chunk<I: Iterator<Item = Entry>>(
        &mut self,
        entries: &mut std::iter::Peekable<I>,
        replies: &mut Vec<Response>,
    ) -> Result<(), StorageError> {
        let mut writer = self.mvcc.writer().with_prev_kvs(self.hub.wants_prev_kvs());
        let from_rev = writer.revision();
        let mut commands = 0;
        while commands < APPLY_CHUNK_COMMANDS {
            let Some(entry) = entries.next() else { break };
            self.applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(request) => {
                    let mut results = Vec::with_capacity(request.batch().commands.len());
                    for cmd in &request.batch().commands {
                        results.push(writer.apply(cmd).map_err(|e| StorageIOError::apply(entry.log_id, &e))?);
                    }
                    Response(CommandResults { results })
                }
                EntryPayload::Membership(m) => {
                    fail::fail_point!("sm-membership-apply");
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::default()
                }
            };
            // An entry without commands counts as one, so that a long run of them is bounded too.
            commands += reply.0.results.len().max(1);
            replies.push(reply);
        }
        writer.put_meta(APPLIED, encode(&self.applied));
        writer.put_meta(MEMBERSHIP, encode(&self.membership));
        fail::fail_point!("sm-before-batch");
        let applied = writer.finish().map_err(sm_err)?;
        fail::fail_point!("sm-after-batch");
        self.hub.publish(Published {
            from_rev,
            to_rev: applied.revision,
            events: applied.events,
            prev_kvs: applied.prev_kvs,
        });
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut entries = entries.into_iter().peekable();
        let mut replies = Vec::new();
        loop {
            self.apply_chunk(&mut entries, &mut replies)?;
            if entries.peek().is_none() {
                return Ok(replies);
            }
            // Catching up (a restart replays what its last flush did not hold, a follower
            // back from a partition): let the Raft core, heartbeats and votes run between
            // chunks, so that a server busy replaying still answers its peers in time.
            tokio::task::yield_now().await;
        }
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { mvcc: self.mvcc.clone(), snapshots: self.snapshots.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.snapshots.temp_path("receiving");
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(snap_err)?;
        // The name is not needed again: the install copies the data into its own file.
        let _ = tokio::fs::remove_file(&path).await;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        tracing::info!(snapshot = %meta.snapshot_id, last_log_id = ?meta.last_log_id, "installing snapshot");
        let mut source = *snapshot;
        source.flush().await.map_err(snap_err)?;
        source.seek(std::io::SeekFrom::Start(0)).await.map_err(snap_err)?;
        let written = self.snapshots.temp_path("installing");
        let mut target = tokio::fs::File::create(&written).await.map_err(snap_err)?;
        tokio::io::copy(&mut source, &mut target).await.map_err(snap_err)?;
        target.sync_all().await.map_err(snap_err)?;
        drop(target);
        if !self.snapshots.publish(meta, &written).map_err(snap_err)? {
            // Only a snapshot built here can be current, and it is at most what was applied
            // here, which is behind what a leader sends.
            return Err(snap_err(std::io::Error::other(format!(
                "snapshot {} is older than the current one",
                meta.snapshot_id
            ))));
        }
        let path = self.snapshots.path(meta);
        fail::fail_point!("snapshot-install-before-restore");
        let mvcc = self.mvcc.clone();
        let restore_path = path.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            // Serializable reads and watches wait: the engine is empty, then half filled.
            let _gate = mvcc.restoring();
            restore(mvcc.engine().as_ref(), &restore_path).map_err(sm_err)?;
            mvcc.reload().map_err(|e| sm_err(std::io::Error::other(e.to_string())))
        })
        .await
        .map_err(|e| sm_err(std::io::Error::other(e.to_string())))??;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.hub.reset(self.mvcc.current_revision());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let current = self.snapshots.open_current().map_err(snap_err)?;
        Ok(current.map(|(meta, file)| Snapshot { meta, snapshot: Box::new(file) }))
    }
}

/// Builds snapshots from a consistent engine view, off the apply path.
pub struct SnapshotBuilder {
    mvcc: Arc<Mvcc>,
    snapshots: Arc<SnapshotDir>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let engine = self.mvcc.engine().clone();
        let snapshots = self.snapshots.clone();
        let meta = tokio::task::spawn_blocking(move || -> Result<SnapshotMeta, StorageError> {
            fail::fail_point!("snapshot-build", |_| Err(snap_err(std::io::Error::other("failpoint"))));
            let tmp = snapshots.temp_path("building");
            let (applied, membership) = write_snapshot(engine.as_ref(), &tmp).map_err(snap_err)?;
            let snapshot_id = match applied {
                Some(id) => {
                    format!("{}-{}-{}-{:x}", id.leader_id.term, id.leader_id.node_id, id.index, rand::random::<u32>())
                }
                None => format!("0-0-0-{:x}", rand::random::<u32>()),
            };
            let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };
            snapshots.publish(&meta, &tmp).map_err(snap_err)?;
            Ok(meta)
        })
        .await
        .map_err(|e| snap_err(std::io::Error::other(e.to_string())))??;
        tracing::info!(snapshot = %meta.snapshot_id, "built snapshot");
        // A newer snapshot may have been installed meanwhile: serve whichever is current.
        let (meta, file) = self
            .snapshots
            .open_current()
            .map_err(snap_err)?
            .ok_or_else(|| snap_err(std::io::Error::other("no current snapshot after a build")))?;
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }
}

/// Writes every snapshot column family of one view to `path`; returns the applied log id
/// and membership of that view.
pub(crate) fn write_snapshot(
    engine: &dyn Engine,
    path: &Path,
) -> Result<(Option<LogId>, StoredMembership), EngineError> {
    let view = engine.view();
    let applied = match view.get(Cf::Meta, APPLIED)? {
        Some(raw) => decode::<Option<LogId>>(&raw).map_err(|e| corrupt(e.to_string()))?,
        None => None,
    };
    let membership = match view.get(Cf::Meta, MEMBERSHIP)? {
        Some(raw) => decode::<StoredMembership>(&raw).map_err(|e| corrupt(e.to_string()))?,
        None => StoredMembership::default(),
    };
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    out.write_all(MAGIC)?;
    for cf in SNAPSHOT_CFS {
        let mut cursor = view.cursor(cf);
        cursor.seek(&[]);
        while cursor.valid() {
            let (k, v) = (cursor.key(), cursor.value());
            out.write_all(&[cf as u8])?;
            out.write_all(&(k.len() as u32).to_le_bytes())?;
            out.write_all(&(v.len() as u32).to_le_bytes())?;
            out.write_all(k)?;
            out.write_all(v)?;
            cursor.next();
        }
        cursor.status()?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((applied, membership))
}

fn corrupt(what: String) -> EngineError {
    EngineError::Corrupt { cf: Cf::Meta, what }
}

/// Replaces the state machine's column families with a snapshot file's contents.
fn restore(engine: &dyn Engine, path: &Path) -> Result<(), EngineError> {
    // The file is checked before anything is removed: a state machine is never emptied for a
    // snapshot that cannot be read.
    let mut input = BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut magic = vec![0u8; MAGIC.len()];
    input.read_exact(&mut magic)?;
    if magic != MAGIC {
        return Err(corrupt(format!("{} is not a snapshot", path.display())));
    }
    let mut start = Batch::default();
    for cf in SNAPSHOT_CFS {
        start.delete_range(cf, Vec::new(), vec![0xFF; 64]);
    }
    start.put(Cf::Meta, RESTORING.to_vec(), path.to_string_lossy().as_bytes().to_vec());
    engine.write(start, true)?;
    let mut batch = Batch::default();
    let mut bytes = 0usize;
    loop {
        let mut head = [0u8; 9];
        match input.read_exact(&mut head[..1]) {
            Ok(()) if head[0] == END_OF_RECORDS => break,
            Ok(()) => input.read_exact(&mut head[1..])?,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let cf = *SNAPSHOT_CFS
            .iter()
            .find(|cf| **cf as u8 == head[0])
            .ok_or_else(|| corrupt("unknown column family".into()))?;
        let klen = u32::from_le_bytes(head[1..5].try_into().expect("4")) as usize;
        let vlen = u32::from_le_bytes(head[5..9].try_into().expect("4")) as usize;
        let mut kv = vec![0u8; klen + vlen];
        input.read_exact(&mut kv)?;
        let value = kv.split_off(klen);
        bytes += klen + vlen;
        batch.put(cf, kv, value);
        if bytes >= RESTORE_BATCH_BYTES {
            engine.write(std::mem::take(&mut batch), false)?;
            bytes = 0;
        }
    }
    // The snapshot's Meta records carry the applied id and membership; the marker goes last.
    batch.delete(Cf::Meta, RESTORING.to_vec());
    engine.write(batch, true)
}

#[cfg(test)]
mod crash_tests {
    use std::sync::Arc;

    use corral_proto::etcdserverpb::{PutRequest, RangeRequest};
    use corral_proto::store::{Command, CommandBatch, command, command_result};
    use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};

    use super::*;
    use crate::engine::{MemEngine, SharedEngine};
    use crate::raft::types::Request;

    fn open(engine: SharedEngine, dir: &Path) -> StateMachine {
        let mvcc = Mvcc::open(engine).expect("mvcc opens");
        let hub = WatchHub::new(mvcc.current_revision());
        StateMachine::open(mvcc, hub, dir.join("snapshots")).expect("state machine opens")
    }

    #[tokio::test]
    async fn a_snapshot_published_but_not_restored_is_installed_at_the_next_start() {
        tracing::info!("a leader applies a put at log index 5 and builds a snapshot");
        let leader_dir = tempfile::tempdir().expect("tempdir");
        let mut leader = open(Arc::new(MemEngine::new()), leader_dir.path());
        let log_id = LogId::new(CommittedLeaderId::new(1, 1), 5);
        let put = Command {
            op: Some(command::Op::Put(PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() })),
        };
        let entry = Entry { log_id, payload: EntryPayload::Normal(Request::new(CommandBatch { commands: vec![put] })) };
        leader.apply(vec![entry]).await.expect("applies");
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("builds");

        tracing::info!("a follower receives it and crashes after publishing it, before restoring it");
        let follower_dir = tempfile::tempdir().expect("tempdir");
        let follower_engine: SharedEngine = Arc::new(MemEngine::new());
        let follower = open(follower_engine.clone(), follower_dir.path());
        let received = follower.snapshots.temp_path("installing");
        std::fs::copy(leader.snapshots.path(&snapshot.meta), &received).expect("copies");
        follower.snapshots.publish(&snapshot.meta, &received).expect("publishes");
        drop(follower);

        tracing::info!("at its next start the state machine holds the snapshot, as openraft requires");
        let mut follower = open(follower_engine, follower_dir.path());
        assert_eq!(follower.applied_state().await.expect("applied").0, Some(log_id));
        let found = follower.mvcc.range(&RangeRequest { key: b"k".to_vec(), ..Default::default() }).expect("reads");
        assert_eq!(found.kvs.len(), 1, "the snapshot's data is restored");
    }

    fn meta(index: u64, id: &str) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
            last_membership: StoredMembership::default(),
            snapshot_id: id.to_string(),
        }
    }

    #[test]
    fn snapshot_files_survive_every_publish_that_races_with_them() {
        tracing::info!("a follower starts receiving a leader's snapshot at index 90");
        let dir = tempfile::tempdir().expect("tempdir");
        let snapshots = SnapshotDir::open(dir.path().join("snapshots")).expect("opens");
        let received = snapshots.temp_path("installing");
        std::fs::write(&received, b"from the leader").expect("writes");

        tracing::info!("its own build, at index 40, finishes first and is published");
        let built = snapshots.temp_path("building");
        std::fs::write(&built, b"built here").expect("writes");
        assert!(snapshots.publish(&meta(40, "built"), &built).expect("publishes"));
        assert!(received.exists(), "a publish removes only published snapshots");

        tracing::info!("the received one becomes current, with its file, and stays so after a restart");
        assert!(snapshots.publish(&meta(90, "received"), &received).expect("publishes"));
        assert_eq!(std::fs::read(snapshots.path(&meta(90, "received"))).expect("reads"), b"from the leader");
        assert!(!snapshots.path(&meta(40, "built")).exists(), "the older snapshot is removed");
        drop(snapshots);
        let reopened = SnapshotDir::open(dir.path().join("snapshots")).expect("opens");
        let current = reopened.current.lock().expect("lock").clone().expect("a current snapshot");
        assert_eq!(current.snapshot_id, "received");

        tracing::info!("a snapshot opened to be sent stays readable when a newer one replaces it");
        let (sending, mut file) = reopened.open_current().expect("opens").expect("a current snapshot");
        assert_eq!(sending.snapshot_id, "received");
        let newer = reopened.temp_path("building");
        std::fs::write(&newer, b"newer").expect("writes");
        assert!(reopened.publish(&meta(120, "newer"), &newer).expect("publishes"));
        assert!(!reopened.path(&meta(90, "received")).exists(), "its name is gone");
        let mut sent = Vec::new();
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(async {
            use tokio::io::AsyncReadExt;
            file.read_to_end(&mut sent).await.expect("reads")
        });
        assert_eq!(sent, b"from the leader", "the open file still reads the whole snapshot");

        tracing::info!("an older build published late is dropped, and the current one stays");
        let late = reopened.temp_path("building");
        std::fs::write(&late, b"late").expect("writes");
        assert!(!reopened.publish(&meta(60, "late"), &late).expect("publishes"));
        assert!(!late.exists() && reopened.path(&meta(120, "newer")).exists());
    }

    #[tokio::test]
    async fn a_long_catch_up_is_applied_in_chunks_that_let_other_tasks_run() {
        tracing::info!("three entries of 1,500 puts each arrive in one apply, as after a restart");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sm = open(Arc::new(MemEngine::new()), dir.path());
        let entries: Vec<Entry> = (1..=3)
            .map(|i| {
                let commands = (0..1500)
                    .map(|k| Command {
                        op: Some(command::Op::Put(PutRequest {
                            key: format!("k{i}/{k}").into_bytes(),
                            value: b"v".to_vec(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                let log_id = LogId::new(CommittedLeaderId::new(1, 1), i);
                Entry { log_id, payload: EntryPayload::Normal(Request::new(CommandBatch { commands })) }
            })
            .collect();
        let last = entries.last().expect("entries").log_id;

        tracing::info!("another task on the same thread watches the published revision meanwhile");
        let published = sm.hub.revision();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let observer = tokio::spawn({
            let done = done.clone();
            async move {
                let mut seen = Vec::new();
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    seen.push(*published.borrow());
                    tokio::task::yield_now().await;
                }
                seen
            }
        });
        let replies = sm.apply(entries).await.expect("applies");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = observer.await.expect("observer");

        tracing::info!("every put is answered in order, one revision each, and the last id is applied");
        let revisions: Vec<i64> = replies
            .iter()
            .flat_map(|r| &r.0.results)
            .map(|result| match &result.result {
                Some(command_result::Result::Put(put)) => put.header.as_ref().expect("header").revision,
                other => panic!("a put's result, not {other:?}"),
            })
            .collect();
        assert_eq!(revisions.len(), 4500);
        assert!(revisions.windows(2).all(|w| w[1] == w[0] + 1), "consecutive revisions");
        assert_eq!(sm.applied_state().await.expect("applied").0, Some(last));

        tracing::info!("the observer ran between chunks: it saw the first two entries published alone");
        assert!(seen.contains(&revisions[2999]), "revisions seen while applying: {seen:?}");
    }

    #[tokio::test]
    async fn a_restore_from_a_missing_file_leaves_the_state_machine_as_it_was() {
        tracing::info!("a state machine holds a put applied at index 5");
        let dir = tempfile::tempdir().expect("tempdir");
        let engine: SharedEngine = Arc::new(MemEngine::new());
        let mut sm = open(engine.clone(), dir.path());
        let log_id = LogId::new(CommittedLeaderId::new(1, 1), 5);
        let put = Command {
            op: Some(command::Op::Put(PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() })),
        };
        let entry = Entry { log_id, payload: EntryPayload::Normal(Request::new(CommandBatch { commands: vec![put] })) };
        sm.apply(vec![entry]).await.expect("applies");

        tracing::info!("a restore from a file that is not there fails before touching anything");
        assert!(restore(engine.as_ref(), &dir.path().join("gone.snap")).is_err());
        assert!(engine.view().get(Cf::Meta, RESTORING).expect("reads").is_none(), "no install is marked as begun");
        drop(sm);
        let mut sm = open(engine, dir.path());
        assert_eq!(sm.applied_state().await.expect("applied").0, Some(log_id));
        let found = sm.mvcc.range(&RangeRequest { key: b"k".to_vec(), ..Default::default() }).expect("reads");
        assert_eq!(found.kvs.len(), 1, "the data is still there");
    }
}
