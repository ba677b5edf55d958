//! What runs on the Raft leader only: the scheduling loop and the controllers. They see the
//! cluster through `Cluster` (the server's own API in production, an in-memory one in
//! tests), keep informers (a list, then a watch) of what they read, and write with
//! compare-and-swap on the resourceVersion they read, through their own server's Raft: a
//! deposed leader's writes never commit. `leader::run_while_leader` starts them when the
//! server becomes leader and stops them at once when it is not.

pub mod cluster;
pub mod deployment;
pub mod endpoints;
pub mod gc;
pub mod hpa;
pub mod informer;
pub mod leader;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod podautoscaler;
pub mod replicaset;
pub mod scheduling;
pub mod volumes;

pub use cluster::{Cluster, ClusterError, EventKind, WatchEvent};
