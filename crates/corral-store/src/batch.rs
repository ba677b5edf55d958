//! Group commit and read-barrier coalescing on one server.
//!
//! Many clients' writes go into one Raft entry (one log append, one fsync per server, one
//! replication round), and many clients' linearizable reads share one quorum round. Neither
//! changes what a client sees: each write still takes its own revision, and each read is
//! served after a barrier that started after the read arrived.

use std::sync::{Arc, Weak};
use std::time::Duration;

use corral_proto::store::{Command, CommandBatch, CommandResult};
use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{StoreError, StoreResult};
use crate::node::StoreNode;
use crate::raft::{Raft, Request};

/// Writes waiting for a batch; beyond this, proposers wait (back-pressure).
const QUEUED_WRITES: usize = 16_384;
/// Commands in one Raft entry.
const MAX_BATCH_COMMANDS: usize = 1_024;
/// Bytes in one Raft entry (a larger command, up to etcd's 1.5 MiB limit, goes alone). An
/// AppendEntries must reach a follower and be fsynced there within openraft's heartbeat
/// interval or it is cancelled and sent again: entries stay small so a lagging follower
/// catches up instead of being sent the same megabytes over and over.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Batches proposed but not yet applied, per server. One is best measured (docs/benchmarks.md):
/// while it is in flight the next batch grows, and the servers' batches still overlap.
const BATCHES_IN_FLIGHT: usize = 1;
/// A batch at least this big means many clients write through this server at once: the
/// next batch then waits [`LINGER`] before it is cut, so that it grows. One Raft entry then
/// carries more writes, and the per-entry work (an fsync on every server, AppendEntries,
/// an apply on every server, and the wake-ups between them) is shared by more of them. A few
/// clients (smaller batches) never wait: a lone write goes out at once.
const LINGER_AFTER_BATCH: usize = 8;
/// How long a batch under load waits to grow. docs/benchmarks.md has the measurements:
/// 0.5 to 5 ms raised put throughput at 256 clients by 10-20%; 2 ms was best.
const LINGER: Duration = Duration::from_millis(2);
/// Reads waiting for a barrier.
const QUEUED_READS: usize = 16_384;

struct PendingWrite {
    cmd: Command,
    reply: oneshot::Sender<StoreResult<CommandResult>>,
    /// Never forwarded: committed only while this server leads (the control loops' writes).
    leader_only: bool,
}

/// Batches commands: on the leader into Raft entries, on a follower into one forwarded call.
pub(crate) struct Proposer {
    tx: mpsc::Sender<PendingWrite>,
}

impl Proposer {
    pub(crate) fn start(node: Weak<StoreNode>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUED_WRITES);
        tokio::spawn(run_proposer(node, rx));
        Self { tx }
    }

    /// Replicates `cmd` in the next batch and returns what applying it produced.
    pub(crate) async fn propose(&self, cmd: Command, leader_only: bool) -> StoreResult<CommandResult> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(PendingWrite { cmd, reply, leader_only })
            .await
            .map_err(|_| StoreError::Unavailable("etcdserver: server stopped".into()))?;
        // A dropped reply means the batch's outcome is unknown (the proposer stopped).
        rx.await.unwrap_or(Err(StoreError::Timeout))
    }
}

async fn run_proposer(node: Weak<StoreNode>, mut rx: mpsc::Receiver<PendingWrite>) {
    let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let mut last_batch = 0;
    while let Some(first) = rx.recv().await {
        // Waiting for a slot is what lets the next batch grow, and under load, lingering.
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        if let Some(linger) = linger_after(last_batch) {
            tokio::time::sleep(linger).await;
        }
        let mut bytes = first.cmd.encoded_len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(next) => {
                    bytes += next.cmd.encoded_len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        last_batch = batch.len();
        let Some(node) = node.upgrade() else { return };
        tokio::spawn(async move {
            let _permit = permit;
            let (leader_only, anywhere): (Vec<_>, Vec<_>) = batch.into_iter().partition(|p| p.leader_only);
            if !anywhere.is_empty() {
                commit(&node, anywhere, false).await;
            }
            if !leader_only.is_empty() {
                commit(&node, leader_only, true).await;
            }
        });
    }
}

/// How long the next batch waits to grow after one of `last_batch` commands.
fn linger_after(last_batch: usize) -> Option<Duration> {
    (last_batch >= LINGER_AFTER_BATCH).then_some(LINGER)
}

/// Commits `batch` (appended here, or forwarded unless `leader_only`) and answers each write.
async fn commit(node: &StoreNode, batch: Vec<PendingWrite>, leader_only: bool) {
    let (commands, replies): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let count = commands.len();
    let committed = if leader_only {
        node.commit_here(CommandBatch { commands }).await
    } else {
        node.commit_batch(CommandBatch { commands }).await
    };
    match committed {
        Ok(results) => {
            debug_assert_eq!(results.len(), count, "one result per command");
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result_of(result));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(StoreError::from_code_keeping(&e)));
            }
        }
    }
}

/// Appends one batch on this server, which must be the leader.
pub(crate) async fn append_batch(
    raft: &Raft,
    batch: CommandBatch,
    timeout: Duration,
) -> StoreResult<Vec<CommandResult>> {
    let written = tokio::time::timeout(timeout, raft.client_write(Request::new(batch))).await;
    match written {
        Ok(Ok(resp)) => Ok(resp.data.0.results),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(StoreError::LeaderChanged),
        Ok(Err(e)) => Err(StoreError::Internal(e.to_string())),
        Err(_) => Err(StoreError::Timeout),
    }
}

/// A command's result as the client sees it: its etcd error, if applying it failed.
pub(crate) fn result_of(result: CommandResult) -> StoreResult<CommandResult> {
    if result.error_code != 0 {
        return Err(StoreError::from_code(tonic::Code::from(result.error_code as i32), result.error_message));
    }
    Ok(result)
}

/// Coalesces linearizable reads: all reads waiting when a barrier starts share it.
pub(crate) struct ReadBarriers {
    tx: mpsc::Sender<oneshot::Sender<StoreResult<()>>>,
}

impl ReadBarriers {
    pub(crate) fn start(node: Weak<StoreNode>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUED_READS);
        tokio::spawn(run_barriers(node, rx));
        Self { tx }
    }

    /// Returns once a barrier that started after this call has passed.
    pub(crate) async fn wait(&self) -> StoreResult<()> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(reply).await.map_err(|_| StoreError::Unavailable("etcdserver: server stopped".into()))?;
        rx.await.unwrap_or(Err(StoreError::Timeout))
    }
}

async fn run_barriers(node: Weak<StoreNode>, mut rx: mpsc::Receiver<oneshot::Sender<StoreResult<()>>>) {
    while let Some(first) = rx.recv().await {
        let mut waiting = vec![first];
        while let Ok(next) = rx.try_recv() {
            waiting.push(next);
        }
        let Some(node) = node.upgrade() else { return };
        let outcome = node.read_barrier_now().await;
        for reply in waiting {
            let _ = reply.send(outcome.as_ref().map(|_| ()).map_err(StoreError::from_code_keeping));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_server_under_load_lets_its_batches_linger() {
        // A lone client's write, and a handful of clients', go out at once.
        assert_eq!(linger_after(0), None);
        assert_eq!(linger_after(1), None);
        assert_eq!(linger_after(LINGER_AFTER_BATCH - 1), None);
        // Many clients at once: the next batch waits to grow.
        assert_eq!(linger_after(LINGER_AFTER_BATCH), Some(LINGER));
        assert_eq!(linger_after(MAX_BATCH_COMMANDS), Some(LINGER));
    }
}
