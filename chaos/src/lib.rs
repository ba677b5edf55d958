//! Corral's chaos harness: workloads that record what they saw, fault schedules driven by a
//! seed, and checkers that judge the histories. The process-level and network faults (kill,
//! stop, restart, nftables cuts) are the binary's: this crate reaches a cluster only through
//! [`runner::Cluster`]. The link proxies that delay and lose traffic are here ([`proxy`]).

pub mod checks;
pub mod history;
pub mod kube;
pub mod linearizable;
pub mod proxy;
pub mod runner;
pub mod scenario;
pub mod workload;
