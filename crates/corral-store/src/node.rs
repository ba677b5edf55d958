//! One server's store: the Raft instance, the MVCC state it applies to, watchers, and the
//! leader's lease clock. Everything the etcd API does goes through a [`StoreNode`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_proto::etcdserverpb::{
    self as pb, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
    RangeRequest, RangeResponse, ResponseHeader,
};
use corral_proto::store::{Command, CommandBatch, CommandResult, MemberChangeRequest, ReadIndexRequest, command};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use corral_proto::store::raft_peer_client::RaftPeerClient;
use tonic::transport::Channel;

use crate::batch::{Proposer, ReadBarriers, append_batch};
use crate::engine::{RocksEngine, SharedEngine};
use crate::error::{StoreError, StoreResult};
use crate::mvcc::{KeyRange, Mvcc};
use crate::raft::network::Peers;
use crate::raft::{LogStore, Member, NodeId, Raft, RaftMetrics, StateMachine, decode, encode};
use crate::watch::{WatchHub, WatchStream};

/// A store server's settings. Defaults suit a cluster on one machine.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub member_id: NodeId,
    pub cluster_id: u64,
    pub data_dir: PathBuf,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// A snapshot is built after this many entries since the last one.
    pub snapshot_every_entries: u64,
    /// Entries kept behind a snapshot, for followers that are only a little behind.
    pub logs_kept_behind_snapshot: u64,
    /// Beyond this many bytes on disk, writes get "database space exceeded".
    pub quota_bytes: u64,
    pub request_timeout_ms: u64,
    /// Allows an even number of voters (refused by default: it adds no fault tolerance).
    pub allow_even_voters: bool,
}

impl StoreConfig {
    pub fn new(member_id: NodeId, cluster_id: u64, data_dir: PathBuf) -> Self {
        Self {
            member_id,
            cluster_id,
            data_dir,
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_every_entries: 50_000,
            logs_kept_behind_snapshot: 5_000,
            quota_bytes: 8 << 30,
            request_timeout_ms: 5_000,
            allow_even_voters: false,
        }
    }

    /// Checks the settings before anything starts.
    pub fn validate(&self) -> StoreResult<()> {
        if self.member_id == 0 {
            return Err(StoreError::InvalidArgument("member id must not be 0".into()));
        }
        if self.heartbeat_interval_ms * 2 > self.election_timeout_min_ms
            || self.election_timeout_min_ms >= self.election_timeout_max_ms
        {
            return Err(StoreError::InvalidArgument(format!(
                "election timeouts ({}..{} ms) must exceed twice the heartbeat ({} ms), min below max",
                self.election_timeout_min_ms, self.election_timeout_max_ms, self.heartbeat_interval_ms
            )));
        }
        Ok(())
    }

    /// etcd's minimum lease TTL: leases shorter than an election could expire during one.
    pub fn min_lease_ttl_s(&self) -> i64 {
        ((self.election_timeout_max_ms * 3 / 2).div_ceil(1000)).max(1) as i64
    }
}

tokio::task_local! {
    /// Set (true) around the control loops' tasks: their writes are fenced to this server's
    /// own leadership (see [`StoreNode::propose`]).
    pub static LEADER_ONLY: bool;
}

/// A membership change, forwarded to the leader as bincode.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MemberChange {
    Add {
        peer_urls: Vec<String>,
        is_learner: bool,
    },
    Remove {
        id: NodeId,
    },
    Promote {
        id: NodeId,
    },
    Update {
        id: NodeId,
        peer_urls: Vec<String>,
    },
    /// A server announces its name and client URLs once it runs.
    Publish {
        id: NodeId,
        name: String,
        client_urls: Vec<String>,
    },
}

/// Status of this server, for etcd's Maintenance.Status.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    pub leader: NodeId,
    pub term: u64,
    pub raft_index: u64,
    pub applied_index: u64,
    pub db_size: i64,
    pub is_learner: bool,
    pub revision: i64,
}

pub struct StoreNode {
    cfg: StoreConfig,
    raft: Raft,
    mvcc: Arc<Mvcc>,
    hub: Arc<WatchHub>,
    peers: Peers,
    engine: SharedEngine,
    /// Lease deadlines, kept by the leader only.
    lease_deadlines: Mutex<HashMap<i64, Instant>>,
    proposer: Proposer,
    reads: ReadBarriers,
    /// Raft's metrics, read on every request: borrowed, never cloned on the hot path.
    metrics_rx: tokio::sync::watch::Receiver<RaftMetrics>,
    /// Bytes on disk, refreshed at most once a second for the space quota.
    size_cache: Mutex<(Instant, u64)>,
    restart: Restart,
    shutdown: tokio::sync::watch::Sender<bool>,
}

/// Where this server's log stood when it started, for the reads it leads.
///
/// A server whose vote was committed for itself resumes as leader of that term at once, and
/// openraft starts its commit index at what the state machine had applied. The state
/// machine's writes are replayable (the log replays them after a crash), so that can be well
/// behind what clients read before the stop; openraft's read index (the larger of the commit
/// index and the term's first entry) would let a linearizable read see the past. Everything
/// committed before the stop is in the log, at or below its last entry then, and a leader
/// never drops entries of its own log: while the term is the one it started in, a read
/// through this server waits for that entry to be applied as well.
#[derive(Clone, Copy, Debug)]
struct Restart {
    term: u64,
    last_index: u64,
}

impl Restart {
    async fn read(log: &mut LogStore) -> StoreResult<Self> {
        use openraft::storage::RaftLogStorage;
        let internal = |e: openraft::StorageError<NodeId>| StoreError::Internal(format!("reading the raft log: {e}"));
        let state = log.get_log_state().await.map_err(internal)?;
        let vote = log.read_vote().await.map_err(internal)?;
        Ok(Self {
            term: vote.map(|v| v.leader_id().term).unwrap_or(0),
            last_index: state.last_log_id.map(|id| id.index).unwrap_or(0),
        })
    }
}

impl StoreNode {
    /// The log index a linearizable read through this leader must see applied, beyond
    /// openraft's read index: see [`Restart`].
    fn restart_read_index(&self) -> u64 {
        match self.metrics_rx.borrow().current_term == self.restart.term {
            true => self.restart.last_index,
            false => 0,
        }
    }

    /// Opens the server's data directory and starts Raft. The cluster is formed by
    /// [`StoreNode::bootstrap`] on a new cluster, or by joining through MemberAdd.
    pub async fn open(cfg: StoreConfig, peers: Peers) -> StoreResult<Arc<Self>> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| StoreError::Internal(format!("data dir: {e}")))?;
        let engine: SharedEngine = Arc::new(RocksEngine::open(&cfg.data_dir.join("db"))?);
        let mvcc = Mvcc::open(engine.clone())?;
        let hub = WatchHub::new(mvcc.current_revision());
        let sm = StateMachine::open(mvcc.clone(), hub.clone(), cfg.data_dir.join("snapshots"))
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let mut log = LogStore::new(engine.clone());
        let restart = Restart::read(&mut log).await?;
        let raft_config = openraft::Config {
            cluster_name: format!("corral-{:x}", cfg.cluster_id),
            heartbeat_interval: cfg.heartbeat_interval_ms,
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            install_snapshot_timeout: 60_000,
            // At most a few MiB per AppendEntries (entries are at most MAX_BATCH_BYTES):
            // openraft cancels an AppendEntries after one heartbeat interval.
            max_payload_entries: 4,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every_entries),
            max_in_snapshot_log_to_keep: cfg.logs_kept_behind_snapshot,
            purge_batch_size: 256,
            snapshot_max_chunk_size: 4 << 20,
            // Elections are started only by `election::prompt_elections`, which campaigns
            // when a quorum of voters reports the leader gone (our pre-vote): openraft's own
            // timer would let a server cut off alone raise its term again and again, and on
            // its return depose a healthy leader (found by `corral chaos run partition-leader`).
            enable_elect: false,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StoreError::InvalidArgument(format!("raft config: {e}")))?;
        let raft = Raft::new(cfg.member_id, Arc::new(raft_config), peers.clone(), log, sm)
            .await
            .map_err(|e| StoreError::Internal(format!("raft did not start: {e}")))?;
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let metrics_rx = raft.metrics();
        let size_cache = Mutex::new((Instant::now(), engine.size_bytes()));
        let node = Arc::new_cyclic(|weak: &std::sync::Weak<StoreNode>| Self {
            cfg,
            raft,
            mvcc,
            hub,
            peers,
            engine,
            lease_deadlines: Mutex::new(HashMap::new()),
            metrics_rx,
            size_cache,
            restart,
            proposer: Proposer::start(weak.clone()),
            reads: ReadBarriers::start(weak.clone()),
            shutdown,
        });
        tokio::spawn(lease_clock(Arc::downgrade(&node), node.shutdown.subscribe()));
        tokio::spawn(crate::election::prompt_elections(Arc::downgrade(&node), node.shutdown.subscribe()));
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.cfg.member_id
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub(crate) fn peers(&self) -> &Peers {
        &self.peers
    }

    pub fn mvcc(&self) -> &Arc<Mvcc> {
        &self.mvcc
    }

    pub fn engine(&self) -> &SharedEngine {
        &self.engine
    }

    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    /// Whether this server is the Raft leader, as it changes (for what runs on the leader only).
    pub fn leadership(&self) -> tokio::sync::watch::Receiver<bool> {
        let mut server = self.raft.server_metrics();
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let leading = server.borrow_and_update().state == ServerState::Leader;
                tx.send_if_modified(|l| std::mem::replace(l, leading) != leading);
                tokio::select! {
                    changed = server.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                }
            }
        });
        rx
    }

    /// Forms a new cluster from the initial members. Safe to call on every initial member
    /// and on every restart: an initialized server ignores it.
    pub async fn bootstrap(&self, members: BTreeMap<NodeId, Member>) -> StoreResult<()> {
        if members.len().is_multiple_of(2) && !self.cfg.allow_even_voters {
            return Err(StoreError::InvalidArgument(format!(
                "refusing to bootstrap {} voters: an even count tolerates no more failures than one fewer; \
                 use an odd count or --allow-even-voters",
                members.len()
            )));
        }
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(StoreError::Internal(format!("bootstrap: {e}"))),
        }
    }

    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        let _ = self.raft.shutdown().await;
    }

    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cfg.cluster_id,
            member_id: self.cfg.member_id,
            revision,
            raft_term: self.metrics_rx.borrow().current_term,
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.request_timeout_ms)
    }

    /// The leader's member record, waiting up to one election for one to be known.
    async fn leader(&self) -> StoreResult<(NodeId, Member)> {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.election_timeout_max_ms * 3);
        let mut server = self.raft.server_metrics();
        loop {
            let found = {
                let m = server.borrow_and_update();
                m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).cloned().map(|n| (id, n)))
            };
            if let Some(found) = found {
                return Ok(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, server.changed()).await.is_err() {
                return Err(StoreError::NoLeader);
            }
        }
    }

    /// Resolves when Raft has stopped on a fatal error (a storage write that failed: a full
    /// or failing disk); what stopped it. Raft reports it last, then drops its metrics, so
    /// this waits on the server metrics (changed only by elections and membership) rather
    /// than being woken by every entry.
    pub async fn raft_stopped(&self) -> String {
        let mut server = self.raft.server_metrics();
        while server.changed().await.is_ok() {}
        match &self.raft.metrics().borrow().running_state {
            Err(fatal) => fatal.to_string(),
            Ok(()) => "raft's metrics closed".into(),
        }
    }

    /// Calls the leader with `call`, for what a follower forwards. A call that could not
    /// reach it (no connection: the leader died and this server has not heard yet) waits
    /// for the next leader and goes again, three times at most; a call that left is never
    /// sent again here.
    async fn at_leader<T, F, Fut>(&self, call: F) -> StoreResult<T>
    where
        F: Fn(RaftPeerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (leader, member) = self.leader().await?;
            let client = self.peers.member_client(&member).map_err(StoreError::Unavailable)?;
            match call(client).await {
                Err(status) if never_sent(&status) && attempts < 3 => self.next_leader(leader).await,
                other => return other.map_err(StoreError::from),
            }
        }
    }

    /// Waits (up to three election timeouts) until `leader` is no longer the leader here.
    async fn next_leader(&self, leader: NodeId) {
        let most = Duration::from_millis(self.cfg.election_timeout_max_ms * 3);
        let _ = tokio::time::timeout(most, self.leadership_lost(leader)).await;
    }

    /// Whether a leader with these metrics has gone two election timeouts without hearing
    /// from a quorum: it is cut off.
    fn quorum_lost(&self, metrics: &RaftMetrics) -> bool {
        metrics.millis_since_quorum_ack.is_some_and(|ms| ms > self.cfg.election_timeout_max_ms * 2)
    }

    /// Resolves once `leader` no longer leads as this server sees it: another is known or
    /// none is, or (on `leader` itself) it has not heard from a quorum for two election
    /// timeouts. A write in flight to it then has an unknown outcome, and waiting longer
    /// only holds up the writes queued behind it.
    ///
    /// It waits on the server metrics, which change with leaders and votes only: every write
    /// in flight waits here, and the full metrics change with every entry.
    async fn leadership_lost(&self, leader: NodeId) {
        let mut server = self.raft.server_metrics();
        loop {
            {
                let m = server.borrow_and_update();
                if m.current_leader != Some(leader) || (m.id == leader && self.quorum_lost(&self.metrics_rx.borrow())) {
                    return;
                }
            }
            // The time since the quorum's last ack grows without a change: look again at
            // least every heartbeat.
            let beat = Duration::from_millis(self.cfg.heartbeat_interval_ms);
            if let Ok(Err(_)) = tokio::time::timeout(beat, server.changed()).await {
                return; // Raft stopped
            }
        }
    }

    fn is_leader(&self) -> bool {
        self.metrics_rx.borrow().state == ServerState::Leader
    }

    /// A leader that has not heard from a quorum for an election timeout is cut off:
    /// it fails requests at once instead of letting them hang.
    fn check_quorum(&self) -> StoreResult<()> {
        if self.quorum_lost(&self.metrics_rx.borrow()) { Err(StoreError::NoLeader) } else { Ok(()) }
    }

    // ---- writes ----

    /// Replicates a write and returns what applying it produced. Writes that arrive
    /// together share a Raft entry; on a follower they are forwarded to the leader together.
    /// Inside [`LEADER_ONLY`] (the control loops' tasks) a write is never forwarded: it
    /// commits only while this server leads, so a deposed leader's loops, still running
    /// until they hear of it, cannot write through the new leader.
    pub async fn propose(&self, cmd: Command) -> StoreResult<CommandResult> {
        if is_quota_bound(&cmd) {
            self.check_space().await?;
        }
        let leader_only = LEADER_ONLY.try_with(|only| *only).unwrap_or(false);
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.proposer.propose(cmd.clone(), leader_only).await {
                Err(StoreError::LeaderChanged) if attempts < 3 && !leader_only => continue,
                other => return other,
            }
        }
    }

    /// Appends a batch here if this server leads; never forwards it.
    pub(crate) async fn commit_here(&self, batch: CommandBatch) -> StoreResult<Vec<CommandResult>> {
        if !self.is_leader() {
            return Err(StoreError::NoLeader);
        }
        self.commit_local(batch).await
    }

    /// Commits one batch: appended here on the leader, forwarded to the leader otherwise.
    pub(crate) async fn commit_batch(&self, batch: CommandBatch) -> StoreResult<Vec<CommandResult>> {
        if self.is_leader() {
            return self.commit_local(batch).await;
        }
        let (leader, member) = self.leader().await?;
        let mut client = self.peers.member_client(&member).map_err(StoreError::Unavailable)?;
        let mut request = tonic::Request::new(batch);
        request.set_timeout(self.timeout());
        tokio::select! {
            reply = client.propose(request) => match reply {
                Ok(reply) => Ok(reply.into_inner().results),
                Err(status) if status.code() == tonic::Code::FailedPrecondition
                    && status.message() == crate::peer::NOT_APPENDED => Err(StoreError::LeaderChanged),
                // The leader could not be reached: the batch never left; `propose` sends it
                // again once another leads.
                Err(status) if never_sent(&status) => {
                    self.next_leader(leader).await;
                    Err(StoreError::LeaderChanged)
                }
                Err(status) => Err(status.into()),
            },
            // The leader it went to was deposed or cut off: its batch may never be answered.
            _ = self.leadership_lost(leader) => Err(StoreError::LeaderChangedInFlight),
        }
    }

    /// Appends a batch on this server, which must be the leader.
    pub async fn commit_local(&self, batch: CommandBatch) -> StoreResult<Vec<CommandResult>> {
        self.check_quorum()?;
        tokio::select! {
            written = append_batch(&self.raft, batch, self.timeout()) => written,
            _ = self.leadership_lost(self.id()) => Err(StoreError::LeaderChangedInFlight),
        }
    }

    async fn check_space(&self) -> StoreResult<()> {
        let nospace = corral_proto::etcdserverpb::AlarmType::Nospace as i32;
        if self.mvcc.alarms().iter().any(|(_, a)| *a == nospace) {
            return Err(StoreError::NoSpace);
        }
        if self.size_bytes() > self.cfg.quota_bytes {
            let alarm = pb::AlarmRequest {
                action: pb::alarm_request::AlarmAction::Activate as i32,
                member_id: self.cfg.member_id,
                alarm: nospace,
            };
            let _ = Box::pin(self.propose(Command { op: Some(command::Op::Alarm(alarm)) })).await;
            return Err(StoreError::NoSpace);
        }
        Ok(())
    }

    /// Bytes on disk, at most a second old.
    fn size_bytes(&self) -> u64 {
        let mut cache = self.size_cache.lock().expect("size lock");
        if cache.0.elapsed() > Duration::from_secs(1) {
            *cache = (Instant::now(), self.engine.size_bytes());
        }
        cache.1
    }

    // ---- reads ----

    /// Waits until this server has applied everything committed before the call: after it,
    /// a local read is linearizable. Concurrent callers share one quorum round.
    pub async fn read_barrier(&self) -> StoreResult<()> {
        self.reads.wait().await
    }

    /// One read barrier, now.
    pub(crate) async fn read_barrier_now(&self) -> StoreResult<()> {
        if self.is_leader() {
            self.check_quorum()?;
            let confirmed = tokio::time::timeout(self.timeout(), self.raft.ensure_linearizable()).await;
            return match confirmed {
                Err(_) => Err(StoreError::Timeout),
                Ok(Ok(_)) => self.applied_at_least(self.restart_read_index()).await,
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => self.follower_barrier().await,
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => Err(StoreError::NoLeader),
                Ok(Err(e)) => Err(StoreError::Internal(e.to_string())),
            };
        }
        self.follower_barrier().await
    }

    async fn follower_barrier(&self) -> StoreResult<()> {
        let index = self
            .at_leader(|mut client| async move {
                let mut request = tonic::Request::new(ReadIndexRequest {});
                request.set_timeout(self.timeout());
                client.read_index(request).await
            })
            .await?
            .into_inner()
            .read_index;
        self.applied_at_least(index).await
    }

    async fn applied_at_least(&self, index: u64) -> StoreResult<()> {
        if self.metrics_rx.borrow().last_applied.map(|id| id.index).unwrap_or(0) >= index {
            return Ok(());
        }
        self.raft
            .wait(Some(self.timeout()))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map_err(|_| StoreError::Timeout)?;
        Ok(())
    }

    /// The read index this leader confirms with a quorum, for a follower's read.
    pub async fn read_index(&self) -> StoreResult<u64> {
        if !self.is_leader() {
            return Err(StoreError::LeaderChanged);
        }
        self.check_quorum()?;
        let confirmed = tokio::time::timeout(self.timeout(), self.raft.get_read_log_id()).await;
        match confirmed {
            Err(_) => Err(StoreError::Timeout),
            Ok(Ok((read_log_id, _))) => Ok(read_log_id.map(|l| l.index).unwrap_or(0).max(self.restart_read_index())),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => Err(StoreError::NoLeader),
            Ok(Err(_)) => Err(StoreError::LeaderChanged),
        }
    }

    /// A Range: linearizable unless the request asks for a serializable read.
    pub async fn range(&self, req: &RangeRequest) -> StoreResult<RangeResponse> {
        if !req.serializable {
            self.read_barrier().await?;
        }
        let mut resp = self.mvcc.range(req)?;
        let rev = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
        resp.header = Some(self.header(rev));
        Ok(resp)
    }

    /// A watcher of `range` from `start_rev` (0: from now on).
    pub fn watch(&self, range: KeyRange, start_rev: i64, prev_kv: bool) -> StoreResult<WatchStream> {
        WatchStream::new(self.mvcc.clone(), &self.hub, range, start_rev, prev_kv)
    }

    // ---- leases ----

    /// Grants a lease; the id is chosen here when the client leaves it 0.
    pub async fn lease_grant(&self, mut req: pb::LeaseGrantRequest) -> StoreResult<pb::LeaseGrantResponse> {
        if req.id == 0 {
            req.id = (rand::random::<u64>() >> 1).max(1) as i64;
        }
        req.ttl = req.ttl.max(self.cfg.min_lease_ttl_s());
        match self.propose(Command { op: Some(command::Op::LeaseGrant(req)) }).await?.result {
            Some(corral_proto::store::command_result::Result::LeaseGrant(mut resp)) => {
                resp.header = Some(self.header(self.mvcc.current_revision()));
                Ok(resp)
            }
            other => Err(StoreError::Internal(format!("unexpected lease grant result {other:?}"))),
        }
    }

    /// Renews a lease's deadline on the leader; followers forward.
    pub async fn lease_keep_alive(&self, req: LeaseKeepAliveRequest) -> StoreResult<LeaseKeepAliveResponse> {
        if !self.is_leader() {
            let reply = self.at_leader(|mut client| async move { client.lease_keep_alive(req).await });
            return Ok(reply.await?.into_inner());
        }
        self.check_quorum()?;
        let Some(info) = self.mvcc.lease(req.id) else { return Err(StoreError::LeaseNotFound) };
        self.lease_deadlines
            .lock()
            .expect("lease lock")
            .insert(req.id, Instant::now() + Duration::from_secs(info.ttl_s as u64));
        Ok(LeaseKeepAliveResponse {
            header: Some(self.header(self.mvcc.current_revision())),
            id: req.id,
            ttl: info.ttl_s,
        })
    }

    pub async fn lease_time_to_live(&self, req: LeaseTimeToLiveRequest) -> StoreResult<LeaseTimeToLiveResponse> {
        if !self.is_leader() {
            let reply = self.at_leader(|mut client| async move { client.lease_time_to_live(req).await });
            return Ok(reply.await?.into_inner());
        }
        let header = Some(self.header(self.mvcc.current_revision()));
        let Some(info) = self.mvcc.lease(req.id) else {
            // etcd answers a missing lease with TTL -1 rather than an error.
            return Ok(LeaseTimeToLiveResponse { header, id: req.id, ttl: -1, granted_ttl: 0, keys: vec![] });
        };
        let remaining = self
            .lease_deadlines
            .lock()
            .expect("lease lock")
            .get(&req.id)
            .map(|d| d.saturating_duration_since(Instant::now()).as_secs() as i64)
            .unwrap_or(info.ttl_s);
        let keys = if req.keys { info.keys.into_iter().collect() } else { vec![] };
        Ok(LeaseTimeToLiveResponse { header, id: req.id, ttl: remaining, granted_ttl: info.ttl_s, keys })
    }

    // ---- membership ----

    /// Every member, with learners marked.
    pub fn members(&self) -> Vec<pb::Member> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| pb::Member {
                id: *id,
                name: node.name.clone(),
                peer_ur_ls: node.peer_urls.clone(),
                client_ur_ls: node.client_urls.clone(),
                is_learner: !voters.contains(id),
            })
            .collect()
    }

    /// Applies a membership change on the leader (forwarding if this server is not).
    pub async fn member_change(&self, change: MemberChange) -> StoreResult<(Vec<pb::Member>, NodeId)> {
        if !self.is_leader() {
            let reply = self.at_leader(|mut client| {
                let request = MemberChangeRequest { change: encode(&change) };
                async move { client.member_change(request).await }
            });
            let reply = reply.await?.into_inner();
            return Ok((reply.members, reply.member_id));
        }
        self.check_quorum()?;
        let m = self.metrics();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let wrap = |e: RaftError<NodeId, ClientWriteError<NodeId, Member>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => StoreError::LeaderChanged,
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                StoreError::Unavailable(format!("etcdserver: membership change refused: {e}"))
            }
            e => StoreError::Internal(e.to_string()),
        };
        let check_even = |count: usize| {
            if count.is_multiple_of(2) && !self.cfg.allow_even_voters {
                Err(StoreError::InvalidArgument(format!(
                    "corral: refusing to make the voter count even ({count}): it tolerates no more failures than {}; \
                     add the member as a learner, or start the servers with --allow-even-voters",
                    count - 1
                )))
            } else {
                Ok(())
            }
        };
        let id = match change {
            MemberChange::Add { peer_urls, is_learner } => {
                if membership.nodes().any(|(_, n)| n.peer_urls.iter().any(|u| peer_urls.contains(u))) {
                    return Err(StoreError::PeerUrlExists);
                }
                if !is_learner {
                    check_even(voters.len() + 1)?;
                }
                let id = loop {
                    let id = rand::random::<u64>();
                    if id != 0 && membership.get_node(&id).is_none() {
                        break id;
                    }
                };
                let node = Member { name: String::new(), peer_urls, client_urls: vec![] };
                self.raft.add_learner(id, node, false).await.map_err(wrap)?;
                if !is_learner {
                    self.raft
                        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                        .await
                        .map_err(wrap)?;
                }
                id
            }
            MemberChange::Remove { id } => {
                if membership.get_node(&id).is_none() {
                    return Err(StoreError::MemberNotFound);
                }
                if voters.contains(&id) {
                    if voters.len() == 1 {
                        return Err(StoreError::InvalidArgument(
                            "etcdserver: cannot remove the only voting member".into(),
                        ));
                    }
                    self.raft
                        .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                        .await
                        .map_err(wrap)?;
                } else {
                    self.raft
                        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                        .await
                        .map_err(wrap)?;
                }
                id
            }
            MemberChange::Promote { id } => {
                if membership.get_node(&id).is_none() {
                    return Err(StoreError::MemberNotFound);
                }
                if voters.contains(&id) {
                    return Err(StoreError::NotLearner);
                }
                let matched =
                    m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map(|l| l.index).unwrap_or(0);
                let last = m.last_log_index.unwrap_or(0);
                if last.saturating_sub(matched) > 1000 {
                    return Err(StoreError::LearnerNotReady);
                }
                check_even(voters.len() + 1)?;
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(wrap)?;
                id
            }
            MemberChange::Update { id, peer_urls } => {
                let Some(node) = membership.get_node(&id) else { return Err(StoreError::MemberNotFound) };
                let node = Member { peer_urls, ..node.clone() };
                self.raft
                    .change_membership(ChangeMembers::SetNodes(BTreeMap::from([(id, node)])), false)
                    .await
                    .map_err(wrap)?;
                id
            }
            MemberChange::Publish { id, name, client_urls } => {
                let Some(node) = membership.get_node(&id) else { return Err(StoreError::MemberNotFound) };
                if node.name != name || node.client_urls != client_urls {
                    let node = Member { name, client_urls, ..node.clone() };
                    self.raft
                        .change_membership(ChangeMembers::SetNodes(BTreeMap::from([(id, node)])), false)
                        .await
                        .map_err(wrap)?;
                }
                id
            }
        };
        Ok((self.members(), id))
    }

    /// Decodes a forwarded membership change.
    pub fn decode_member_change(raw: &[u8]) -> StoreResult<MemberChange> {
        decode(raw).map_err(|e| StoreError::InvalidArgument(format!("bad member change: {e}")))
    }

    // ---- maintenance ----

    pub fn status(&self) -> NodeStatus {
        let m = self.metrics();
        let is_learner = !m.membership_config.membership().voter_ids().any(|id| id == self.cfg.member_id);
        NodeStatus {
            leader: m.current_leader.unwrap_or(0),
            term: m.current_term,
            raft_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            db_size: self.engine.size_bytes() as i64,
            is_learner,
            revision: self.mvcc.current_revision(),
        }
    }
}

fn is_quota_bound(cmd: &Command) -> bool {
    matches!(cmd.op, Some(command::Op::Put(_)) | Some(command::Op::Txn(_)) | Some(command::Op::LeaseGrant(_)))
}

/// The leader's lease clock: expires leases whose deadline passed, by proposing their
/// revocation, so every server deletes their keys at the same revision. A new leader
/// starts every deadline afresh, extended by one election timeout.
async fn lease_clock(node: std::sync::Weak<StoreNode>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut was_leader = false;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let Some(node) = node.upgrade() else { return };
        if !node.is_leader() {
            was_leader = false;
            node.lease_deadlines.lock().expect("lease lock").clear();
            continue;
        }
        let now = Instant::now();
        let leases = node.mvcc.leases();
        let expired: Vec<i64> = {
            let mut deadlines = node.lease_deadlines.lock().expect("lease lock");
            let extension =
                if was_leader { Duration::ZERO } else { Duration::from_millis(node.cfg.election_timeout_max_ms) };
            deadlines.retain(|id, _| leases.contains_key(id));
            for (id, info) in &leases {
                deadlines.entry(*id).or_insert(now + Duration::from_secs(info.ttl_s as u64) + extension);
            }
            deadlines.iter().filter(|(_, d)| **d <= now).map(|(id, _)| *id).take(64).collect()
        };
        was_leader = true;
        for id in expired {
            let revoke = Command { op: Some(command::Op::LeaseRevoke(pb::LeaseRevokeRequest { id })) };
            match node.propose(revoke).await {
                Ok(_) => tracing::debug!(lease = id, "lease expired"),
                Err(e) => tracing::warn!(lease = id, error = %e, "could not expire lease"),
            }
        }
    }
}

/// Whether a call to a peer failed before its request left: no connection could be made.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_to_a_closed_port_was_never_sent_and_an_answer_was() {
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
        let refused = RaftPeerClient::new(channel).read_index(ReadIndexRequest {}).await.unwrap_err();
        assert!(never_sent(&refused), "{refused:?}");

        let answered = tonic::Status::unavailable("etcdserver: no leader");
        assert!(!never_sent(&answered));
    }
}
