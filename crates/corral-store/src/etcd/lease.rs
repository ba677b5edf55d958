use std::pin::Pin;
use std::sync::Arc;

use corral_proto::etcdserverpb::lease_server::Lease;
use corral_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use corral_proto::store::command_result::Result as R;
use corral_proto::store::{Command, command};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::StoreError;
use crate::node::StoreNode;

pub struct LeaseService {
    node: Arc<StoreNode>,
}

impl LeaseService {
    pub fn new(node: Arc<StoreNode>) -> Self {
        Self { node }
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        Ok(Response::new(self.node.lease_grant(req.into_inner()).await?))
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        let result = self.node.propose(Command { op: Some(command::Op::LeaseRevoke(req.into_inner())) }).await?;
        match result.result {
            Some(R::LeaseRevoke(mut resp)) => {
                resp.header = Some(self.node.header(self.node.mvcc().current_revision()));
                Ok(Response::new(resp))
            }
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut requests = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let node = self.node.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = requests.message().await {
                let id = req.id;
                let resp = match node.lease_keep_alive(req).await {
                    Ok(resp) => Ok(resp),
                    // etcd answers a keep-alive for an unknown lease with TTL 0, not an error
                    // (from a forwarded call, the error arrives as its message).
                    Err(e)
                        if matches!(e, StoreError::LeaseNotFound)
                            || e.to_string() == StoreError::LeaseNotFound.to_string() =>
                    {
                        Ok(LeaseKeepAliveResponse {
                            header: Some(node.header(node.mvcc().current_revision())),
                            id,
                            ttl: 0,
                        })
                    }
                    Err(e) => Err(Status::from(e)),
                };
                let failed = resp.is_err();
                if tx.send(resp).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        Ok(Response::new(self.node.lease_time_to_live(req.into_inner()).await?))
    }

    async fn lease_leases(&self, _req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.node.read_barrier().await?;
        let leases = self.node.mvcc().leases().into_keys().map(|id| LeaseStatus { id }).collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.node.header(self.node.mvcc().current_revision())),
            leases,
        }))
    }
}
