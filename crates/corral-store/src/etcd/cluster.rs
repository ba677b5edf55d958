use std::sync::Arc;

use corral_proto::etcdserverpb::cluster_server::Cluster;
use corral_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use tonic::{Request, Response, Status};

use crate::node::{MemberChange, StoreNode};

pub struct ClusterService {
    node: Arc<StoreNode>,
}

impl ClusterService {
    pub fn new(node: Arc<StoreNode>) -> Self {
        Self { node }
    }

    /// etcd's Cluster responses carry no revision: membership is not in the keyspace.
    fn header(&self) -> Option<corral_proto::etcdserverpb::ResponseHeader> {
        Some(self.node.header(0))
    }
}

fn check_urls(urls: &[String]) -> Result<(), Status> {
    if urls.is_empty() {
        return Err(Status::invalid_argument("etcdserver: member peer URLs are missing: give --peer-urls"));
    }
    for url in urls {
        if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() < 10 {
            return Err(Status::invalid_argument(format!("etcdserver: bad peer URL {url:?}: want https://host:port")));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        let req = req.into_inner();
        check_urls(&req.peer_ur_ls)?;
        let change = MemberChange::Add { peer_urls: req.peer_ur_ls.clone(), is_learner: req.is_learner };
        let (members, id) = self.node.member_change(change).await?;
        let member = Member {
            id,
            name: String::new(),
            peer_ur_ls: req.peer_ur_ls,
            client_ur_ls: vec![],
            is_learner: req.is_learner,
        };
        Ok(Response::new(MemberAddResponse { header: self.header(), member: Some(member), members }))
    }

    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        let (members, _) = self.node.member_change(MemberChange::Remove { id: req.into_inner().id }).await?;
        Ok(Response::new(MemberRemoveResponse { header: self.header(), members }))
    }

    async fn member_update(&self, req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        let req = req.into_inner();
        check_urls(&req.peer_ur_ls)?;
        let (members, _) =
            self.node.member_change(MemberChange::Update { id: req.id, peer_urls: req.peer_ur_ls }).await?;
        Ok(Response::new(MemberUpdateResponse { header: self.header(), members }))
    }

    async fn member_list(&self, req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        if req.into_inner().linearizable {
            self.node.read_barrier().await?;
        }
        Ok(Response::new(MemberListResponse { header: self.header(), members: self.node.members() }))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let (members, _) = self.node.member_change(MemberChange::Promote { id: req.into_inner().id }).await?;
        Ok(Response::new(MemberPromoteResponse { header: self.header(), members }))
    }
}
