//! etcd's v3 gRPC API over a [`StoreNode`]: KV, Watch, Lease, Cluster and Maintenance, so
//! that etcdctl and etcd client libraries work unchanged.

mod cluster;
mod kv;
mod lease;
mod maintenance;
mod watch;

use std::sync::Arc;

use corral_proto::etcdserverpb::cluster_server::ClusterServer;
use corral_proto::etcdserverpb::kv_server::KvServer;
use corral_proto::etcdserverpb::lease_server::LeaseServer;
use corral_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use corral_proto::etcdserverpb::watch_server::WatchServer;
use tonic::service::Routes;

use crate::node::StoreNode;

/// etcd's default limit on a request: larger ones get "request is too large".
pub const MAX_REQUEST_BYTES: usize = 3 << 19; // 1.5 MiB
/// What gRPC accepts, so that a request just over the limit still gets etcd's own error.
const MAX_GRPC_BYTES: usize = MAX_REQUEST_BYTES + (512 << 10);
/// The version Maintenance.Status reports: the etcd API level Corral speaks.
pub const ETCD_VERSION: &str = "3.5.0";

/// Every etcd service for `node`, routed by gRPC path.
pub fn routes(node: Arc<StoreNode>) -> Routes {
    Routes::new(KvServer::new(kv::KvService::new(node.clone())).max_decoding_message_size(MAX_GRPC_BYTES))
        .add_service(WatchServer::new(watch::WatchService::new(node.clone())).max_decoding_message_size(MAX_GRPC_BYTES))
        .add_service(LeaseServer::new(lease::LeaseService::new(node.clone())))
        .add_service(ClusterServer::new(cluster::ClusterService::new(node.clone())))
        .add_service(
            MaintenanceServer::new(maintenance::MaintenanceService::new(node)).max_encoding_message_size(64 << 20),
        )
}

fn check_size(msg: &impl prost::Message) -> Result<(), tonic::Status> {
    if msg.encoded_len() > MAX_REQUEST_BYTES {
        return Err(crate::StoreError::RequestTooLarge.into());
    }
    Ok(())
}
