//! Corral's scheduler, as pure functions of a snapshot of the cluster: `Snapshot` holds the
//! nodes with the pods bound to them (`NodeInfo`), `Framework` runs the filter plugins on
//! every node and the score plugins on those that pass, and picks the best. A pod that fits
//! nowhere gets Kubernetes' message (`0/3 nodes are available: 3 Insufficient cpu.`). The
//! leader's scheduling loop (in the server) feeds it and binds what it decides.

pub mod framework;
pub mod plugins;
pub mod snapshot;

pub use framework::{Decision, Framework, Unschedulable};
pub use snapshot::{NodeInfo, PodInfo, Resources, Snapshot};
