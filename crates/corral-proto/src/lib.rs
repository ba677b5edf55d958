//! Generated protobuf types and gRPC stubs.
//!
//! - [`etcdserverpb`], [`mvccpb`], [`authpb`]: etcd's v3 API, wire-compatible with etcd 3.4+.
//! - [`store`]: Corral's Raft entries and server-to-server RPCs.
//! - [`agent`]: what agents and servers say to each other over QUIC (framed, no gRPC).
//! - [`cri`]: the Kubernetes CRI (`runtime.v1`) the agent speaks to containerd.

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod authpb {
    tonic::include_proto!("authpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// Nested as its package is, so the generated paths to `etcdserverpb` resolve.
pub mod corral {
    pub mod store {
        pub mod v1 {
            tonic::include_proto!("corral.store.v1");
        }
    }
    pub mod agent {
        pub mod v1 {
            tonic::include_proto!("corral.agent.v1");
        }
    }
}

pub use corral::agent::v1 as agent;
pub use corral::store::v1 as store;

/// The container runtime interface, package `runtime.v1` (proto/cri/runtime.proto).
pub mod runtime {
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

pub use runtime::v1 as cri;
