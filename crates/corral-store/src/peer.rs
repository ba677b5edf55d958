//! The server side of the Raft peer service: openraft's RPCs, and what followers forward
//! to the leader.

use std::sync::Arc;

use corral_proto::etcdserverpb::{
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use corral_proto::store::raft_peer_server::{RaftPeer, RaftPeerServer};
use corral_proto::store::{
    ClusterInfoRequest, ClusterInfoResponse, CommandBatch, CommandResults, ElectionProbeRequest, ElectionProbeResponse,
    MemberChangeRequest, MemberChangeResponse, RaftPayload, ReadIndexRequest, ReadIndexResponse,
};
use tonic::{Request, Response, Status};

use crate::node::StoreNode;

/// What a forwarded batch is refused with when this server is not the leader: nothing was
/// appended, so the follower may send it again.
pub(crate) const NOT_APPENDED: &str = "corral: not the leader, nothing appended";
use crate::raft::network::MAX_PEER_MESSAGE_BYTES;
use crate::raft::{decode, encode};

pub struct PeerService {
    node: Arc<StoreNode>,
}

impl PeerService {
    pub fn server(node: Arc<StoreNode>) -> RaftPeerServer<Self> {
        RaftPeerServer::new(Self { node })
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES)
    }
}

fn bad_payload(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable raft payload: {e}"))
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(&req.into_inner().data).map_err(bad_payload)?;
        let result = self.node.raft().append_entries(rpc).await;
        Ok(Response::new(RaftPayload { data: encode(&result) }))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(&req.into_inner().data).map_err(bad_payload)?;
        let result = self.node.raft().vote(rpc).await;
        Ok(Response::new(RaftPayload { data: encode(&result) }))
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(&req.into_inner().data).map_err(bad_payload)?;
        let result = self.node.raft().install_snapshot(rpc).await;
        Ok(Response::new(RaftPayload { data: encode(&result) }))
    }

    async fn propose(&self, req: Request<CommandBatch>) -> Result<Response<CommandResults>, Status> {
        // Client errors travel inside the results. "Not the leader" (nothing appended) has a
        // code of its own, so the follower retries with the new leader; every other failure
        // leaves the outcome unknown and is passed on as it is.
        match self.node.commit_local(req.into_inner()).await {
            Ok(results) => Ok(Response::new(CommandResults { results })),
            Err(crate::StoreError::LeaderChanged) => Err(Status::failed_precondition(NOT_APPENDED)),
            Err(e) => Err(e.into()),
        }
    }

    async fn read_index(&self, _req: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
        let read_index = self.node.read_index().await?;
        Ok(Response::new(ReadIndexResponse { read_index }))
    }

    async fn lease_keep_alive(
        &self,
        req: Request<LeaseKeepAliveRequest>,
    ) -> Result<Response<LeaseKeepAliveResponse>, Status> {
        Ok(Response::new(self.node.lease_keep_alive(req.into_inner()).await?))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        Ok(Response::new(self.node.lease_time_to_live(req.into_inner()).await?))
    }

    async fn member_change(&self, req: Request<MemberChangeRequest>) -> Result<Response<MemberChangeResponse>, Status> {
        let change = StoreNode::decode_member_change(&req.into_inner().change)?;
        let (members, member_id) = self.node.member_change(change).await?;
        Ok(Response::new(MemberChangeResponse { members, member_id }))
    }

    async fn cluster_info(&self, _req: Request<ClusterInfoRequest>) -> Result<Response<ClusterInfoResponse>, Status> {
        let status = self.node.status();
        Ok(Response::new(ClusterInfoResponse {
            cluster_id: self.node.config().cluster_id,
            leader_id: status.leader,
            members: self.node.members(),
        }))
    }

    async fn election_probe(
        &self,
        _req: Request<ElectionProbeRequest>,
    ) -> Result<Response<ElectionProbeResponse>, Status> {
        Ok(Response::new(crate::election::answer_probe(&self.node).await))
    }
}
