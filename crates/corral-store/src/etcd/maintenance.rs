use std::pin::Pin;
use std::sync::Arc;

use corral_proto::etcdserverpb::maintenance_server::Maintenance;
use corral_proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest,
    SnapshotResponse, StatusRequest, StatusResponse, alarm_request,
};
use corral_proto::store::command_result::Result as R;
use corral_proto::store::{Command, command};
use futures::Stream;
use sha2::Digest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::node::StoreNode;

/// Bytes per Snapshot message, as etcd sends them.
const SNAPSHOT_CHUNK_BYTES: usize = 32 << 10;

pub struct MaintenanceService {
    node: Arc<StoreNode>,
}

impl MaintenanceService {
    pub fn new(node: Arc<StoreNode>) -> Self {
        Self { node }
    }

    fn header(&self) -> Option<corral_proto::etcdserverpb::ResponseHeader> {
        Some(self.node.header(self.node.mvcc().current_revision()))
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let req = req.into_inner();
        if req.action == alarm_request::AlarmAction::Get as i32 {
            let alarms = self
                .node
                .mvcc()
                .alarms()
                .into_iter()
                .filter(|(m, a)| {
                    (req.member_id == 0 || *m == req.member_id)
                        && (req.alarm == AlarmType::None as i32 || *a == req.alarm)
                })
                .map(|(member_id, alarm)| AlarmMember { member_id, alarm })
                .collect();
            return Ok(Response::new(AlarmResponse { header: self.header(), alarms }));
        }
        let result = self.node.propose(Command { op: Some(command::Op::Alarm(req)) }).await?;
        match result.result {
            Some(R::Alarm(mut resp)) => {
                resp.header = self.header();
                Ok(Response::new(resp))
            }
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = self.node.status();
        let errors = if s.leader == 0 { vec!["etcdserver: no leader".to_string()] } else { vec![] };
        Ok(Response::new(StatusResponse {
            header: self.header(),
            version: super::ETCD_VERSION.into(),
            db_size: s.db_size,
            leader: s.leader,
            raft_index: s.raft_index,
            raft_term: s.term,
            raft_applied_index: s.applied_index,
            errors,
            db_size_in_use: s.db_size,
            is_learner: s.is_learner,
        }))
    }

    async fn defragment(&self, _req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        let engine = self.node.engine().clone();
        tokio::task::spawn_blocking(move || engine.defragment())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(DefragmentResponse { header: self.header() }))
    }

    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let (hash, _) = self.node.mvcc().hash_kv(0)?;
        Ok(Response::new(HashResponse { header: self.header(), hash }))
    }

    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let (hash, compact_revision) = self.node.mvcc().hash_kv(req.into_inner().revision)?;
        Ok(Response::new(HashKvResponse { header: self.header(), hash, compact_revision }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, _req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let engine = self.node.engine().clone();
        let dir = self.node.config().data_dir.join("snapshots");
        let path = dir.join(format!("client-{}.tmp", rand::random::<u64>()));
        let build_path = path.clone();
        tokio::task::spawn_blocking(move || crate::raft::write_snapshot(engine.as_ref(), &build_path))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        // etcdctl wants what a bolt file looks like: a multiple of 512 bytes, then the
        // SHA-256 of all of it. Our records end with a marker, so padding is harmless.
        let mut data = tokio::fs::read(&path).await.map_err(|e| Status::internal(e.to_string()))?;
        let _ = tokio::fs::remove_file(&path).await;
        data.push(crate::raft::END_OF_RECORDS);
        data.resize(data.len().div_ceil(512) * 512, 0);
        let digest = sha2::Sha256::digest(&data);
        data.extend_from_slice(&digest);
        let total = data.len() as u64;
        let header = self.header();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut sent = 0u64;
            for chunk in data.chunks(SNAPSHOT_CHUNK_BYTES) {
                sent += chunk.len() as u64;
                let resp = SnapshotResponse { header, remaining_bytes: total - sent, blob: chunk.to_vec() };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn move_leader(&self, _req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(Status::unimplemented("corral: move-leader is not supported (openraft 0.9 has no leadership transfer)"))
    }
}
