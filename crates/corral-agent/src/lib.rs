//! Corral's agent: the kubelet of a worker node. It runs the pods bound to its node through
//! the container runtime's CRI (`cri`), and reports their status.

pub mod conformance;
pub mod containerd;
pub mod cri;
pub mod fake;
pub mod spec;
pub mod sync;
pub mod volumes;
pub mod worker;
