//! Corral's agent: the kubelet of a worker node. It joins the cluster and keeps a QUIC link
//! to the servers (`link`), runs the pods bound to its node through the container runtime's
//! CRI (`worker`, `sync`, `cri`), and reports them, the node and their resource usage
//! (`agent`, `node`, `metrics`).

pub mod agent;
pub mod conformance;
pub mod containerd;
pub mod cri;
pub mod dns;
pub mod fake;
pub mod gc;
pub mod link;
pub mod logs;
pub mod metrics;
pub mod node;
pub mod probe;
pub mod proxy;
pub mod routes;
pub mod services;
pub mod spdy;
pub mod spec;
pub mod streams;
pub mod sync;
pub mod volumes;
pub mod websocket;
pub mod worker;
