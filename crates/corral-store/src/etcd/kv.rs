use std::sync::Arc;

use corral_proto::etcdserverpb::kv_server::Kv;
use corral_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse, request_op,
};
use corral_proto::store::command_result::Result as R;
use corral_proto::store::{Command, command};
use tonic::{Request, Response, Status};

use super::check_size;
use crate::StoreError;
use crate::mvcc::{KeyRange, txn_is_read_only};
use crate::node::StoreNode;

pub struct KvService {
    node: Arc<StoreNode>,
}

impl KvService {
    pub fn new(node: Arc<StoreNode>) -> Self {
        Self { node }
    }

    async fn write(&self, op: command::Op) -> Result<R, Status> {
        let result = self.node.propose(Command { op: Some(op) }).await?;
        result.result.ok_or_else(|| Status::internal("etcdserver: empty result"))
    }

    /// The full header for a write's response, keeping the revision the write produced (a
    /// later write may already have moved the store on: clients rely on their own).
    fn stamp(
        &self,
        applied: Option<corral_proto::etcdserverpb::ResponseHeader>,
    ) -> Option<corral_proto::etcdserverpb::ResponseHeader> {
        let revision = applied.map(|h| h.revision).unwrap_or_else(|| self.node.mvcc().current_revision());
        Some(self.node.header(revision))
    }
}

fn check_range(key: &[u8], range_end: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        return Err(StoreError::EmptyKey.into());
    }
    let _ = KeyRange::new(key, range_end);
    Ok(())
}

#[tonic::async_trait]
impl Kv for KvService {
    #[tracing::instrument(skip_all, fields(key_len = req.get_ref().key.len()))]
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let req = req.into_inner();
        check_range(&req.key, &req.range_end)?;
        Ok(Response::new(self.node.range(&req).await?))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = req.into_inner();
        check_size(&req)?;
        if req.key.is_empty() {
            return Err(StoreError::EmptyKey.into());
        }
        let R::Put(mut resp) = self.write(command::Op::Put(req)).await? else {
            return Err(unexpected());
        };
        resp.header = self.stamp(resp.header);
        Ok(Response::new(resp))
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let req = req.into_inner();
        check_range(&req.key, &req.range_end)?;
        let R::DeleteRange(mut resp) = self.write(command::Op::DeleteRange(req)).await? else {
            return Err(unexpected());
        };
        resp.header = self.stamp(resp.header);
        Ok(Response::new(resp))
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let req = req.into_inner();
        check_size(&req)?;
        crate::mvcc::check_txn_request(&req)?;
        if txn_is_read_only(&req) {
            let serializable = req
                .success
                .iter()
                .chain(req.failure.iter())
                .all(|op| matches!(&op.request, Some(request_op::Request::RequestRange(r)) if r.serializable));
            if !serializable {
                self.node.read_barrier().await?;
            }
            let mut resp = self.node.mvcc().read_only_txn(&req)?;
            // The revision it read at, not the store's by the time it finished.
            resp.header = self.stamp(resp.header);
            return Ok(Response::new(resp));
        }
        let R::Txn(mut resp) = self.write(command::Op::Txn(req)).await? else {
            return Err(unexpected());
        };
        resp.header = self.stamp(resp.header);
        Ok(Response::new(resp))
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let req = req.into_inner();
        let (revision, physical) = (req.revision, req.physical);
        let R::Compaction(mut resp) = self.write(command::Op::Compaction(req)).await? else {
            return Err(unexpected());
        };
        if physical {
            // As etcd: answer once the compacted history is gone from this server's disk.
            // Bounded by the client's deadline, and by our own.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(600);
            while self.node.mvcc().compact_finished_revision() < revision {
                if tokio::time::Instant::now() > deadline {
                    return Err(StoreError::Timeout.into());
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        resp.header = self.stamp(resp.header);
        Ok(Response::new(resp))
    }
}

fn unexpected() -> Status {
    Status::internal("etcdserver: a write produced a result of another kind")
}
