//! Corral's chaos harness: workloads that record what they saw, fault schedules driven by a
//! seed, and checkers that judge the histories. The process-level faults (kill, stop,
//! restart) are the binary's: this crate reaches a cluster only through [`runner::Cluster`].

pub mod checks;
pub mod history;
pub mod linearizable;
pub mod runner;
pub mod scenario;
pub mod workload;
