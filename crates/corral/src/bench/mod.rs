//! `corral bench`: load generators that run the same client against Corral and against etcd,
//! and print figures (throughput, latency percentiles, unavailability) to compare side by side.

mod api;
mod etcd;
mod failover;
mod grpc;
mod kv;
mod pods;
mod scheduler;
mod target;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

pub use etcd::owns;
pub use target::Target;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// The Kubernetes API: writes at a fixed rate, a 10,000-pod list, watch fan-out, RSS.
    Api(api::ApiArgs),
    /// Put or range load against an etcd-v3 endpoint set; prints throughput and latency.
    Kv(kv::KvArgs),
    /// Kill the leader repeatedly under a write load; prints write unavailability per kill.
    Failover(failover::FailoverArgs),
    /// Start or stop a 3-member Debian etcd 3.4 cluster for side-by-side runs.
    Etcd(etcd::EtcdArgs),
    /// Pod start latency on one node, beside the runtime's own floor; the agent's RSS.
    Pods(pods::PodsArgs),
    /// Hollow nodes and many pods: pods bound per second, time until all are Running.
    Scheduler(scheduler::SchedulerArgs),
}

/// Where a benchmark connects: a local cluster's state directory (Corral's from `corral up`,
/// or etcd's from `corral bench etcd up`), or explicit endpoints and certificates.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// A state directory from `corral up` or `corral bench etcd up`.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Comma-separated https:// endpoints (instead of --state-dir).
    #[arg(long)]
    pub endpoints: Option<String>,
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    #[arg(long)]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
}

/// A `corral up` cluster's servers (from cluster.json) and the API URL of server `index`.
pub fn cluster_api(state_dir: &std::path::Path, index: usize) -> Result<(Vec<serde_json::Value>, String)> {
    use anyhow::Context;
    let raw = std::fs::read(state_dir.join("cluster.json")).with_context(|| {
        format!("{} has no cluster.json: start a cluster with `corral up` first", state_dir.display())
    })?;
    let record: serde_json::Value = serde_json::from_slice(&raw)?;
    let servers = record["servers"].as_array().context("cluster.json lists no servers")?.clone();
    let url = servers
        .get(index)
        .and_then(|s| s["api_url"].as_str())
        .with_context(|| format!("no server {index} with an API URL in cluster.json"))?
        .to_string();
    Ok((servers, url))
}

/// Prints each server's resident memory.
pub fn print_rss(servers: &[serde_json::Value]) {
    for s in servers {
        let pid = s["pid"].as_u64().unwrap_or(0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).map(str::trim).unwrap_or("?");
        println!("rss {}: {rss}", s["name"].as_str().unwrap_or("?"));
    }
}

pub async fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Api(args) => api::run(args).await,
        BenchCommand::Kv(args) => kv::run(args).await,
        BenchCommand::Failover(args) => failover::run(args).await,
        BenchCommand::Etcd(args) => etcd::run(args).await,
        BenchCommand::Pods(args) => pods::run(args).await,
        BenchCommand::Scheduler(args) => scheduler::run(args).await,
    }
}
