//! `corral bench failover`: write unavailability after SIGKILL of the leader.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_proto::etcdserverpb::PutRequest;
use corral_proto::etcdserverpb::kv_client::KvClient;

use super::TargetArgs;
use super::target::{Kind, Target};

#[derive(Args, Debug)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Leader kills, each followed by a restart of the killed server.
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Also time the controllers' failover (a Corral cluster from `corral up`): right after each
    /// kill a ReplicaSet is scaled up through a surviving server, and the time until its new
    /// pod exists (the new leader's first reconcile) is measured.
    #[arg(long)]
    pub controllers: bool,
}

pub async fn run(args: FailoverArgs) -> Result<()> {
    let target = Target::from_args(&args.target)?;
    if target.kind == Kind::Remote {
        bail!("failover kills processes: give --state-dir of a local cluster (corral up, or corral bench etcd up)");
    }
    let probe = match args.controllers {
        true if target.kind != Kind::Corral => bail!("--controllers needs a Corral cluster from `corral up`"),
        true => Some(Probe::create(target.state_dir.as_deref().context("state dir")?).await?),
        false => None,
    };
    let mut gaps_ms = Vec::new();
    let mut reconciles_ms = Vec::new();
    for kill in 1..=args.kills {
        wait_all_healthy(&target).await?;
        let (leader_url, leader_id) = target.leader().await?;
        let acks = Arc::new(Mutex::new(Vec::<Instant>::new()));
        let stop = Arc::new(Mutex::new(false));
        let mut writers = Vec::new();
        for w in 0..args.writers {
            let channels: Vec<_> = target.endpoints.iter().map(|u| target.channel(u)).collect::<Result<_>>()?;
            let (acks, stop) = (acks.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut at = w % channels.len();
                for i in 0u64.. {
                    if *stop.lock().expect("lock") {
                        return;
                    }
                    let mut req = tonic::Request::new(PutRequest {
                        key: format!("failover/{w}/{i}").into_bytes(),
                        value: b"v".to_vec(),
                        ..Default::default()
                    });
                    req.set_timeout(Duration::from_millis(500));
                    match KvClient::new(channels[at].clone()).put(req).await {
                        Ok(_) => acks.lock().expect("lock").push(Instant::now()),
                        Err(_) => at = (at + 1) % channels.len(),
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let victim = target.processes()?.into_iter().find(|p| p.client_url == leader_url).context("leader process")?;
        let survivors: Vec<_> = target.endpoints.iter().filter(|u| **u != leader_url).cloned().collect();
        // New connections each time: a server restarted after an earlier kill closed its own.
        let fresh = match &probe {
            Some(_) => Some(Probe::connect(target.state_dir.as_deref().context("state dir")?).await?),
            None => None,
        };
        let killed_at = Instant::now();
        unsafe { libc::kill(victim.pid as i32, libc::SIGKILL) };
        let scaled = fresh.map(|p| tokio::spawn(p.scale_after_kill(kill, victim.name.clone(), killed_at)));
        let elected = new_leader_after(&target, &survivors, leader_id, killed_at).await;
        tokio::time::sleep(Duration::from_secs(4).saturating_sub(killed_at.elapsed())).await;
        *stop.lock().expect("lock") = true;
        for w in writers {
            w.await?;
        }
        let mut times = acks.lock().expect("lock").clone();
        times.sort();
        let before = times.iter().rev().find(|t| **t <= killed_at).copied().unwrap_or(killed_at);
        let gap = times
            .iter()
            .filter(|t| **t > before)
            .fold((before, Duration::ZERO), |(prev, max), t| (*t, max.max(*t - prev)))
            .1;
        let gap_ms = gap.as_secs_f64() * 1000.0;
        let elected = elected.map_or("none in 4 s".to_string(), |d| format!("{} ms", d.as_millis()));
        let controllers = match scaled {
            Some(task) => {
                let (accepted, reconciled) = task.await??;
                reconciles_ms.push(reconciled.as_secs_f64() * 1000.0);
                format!(
                    "; scale accepted after {} ms, ReplicaSet reconciled after {} ms",
                    accepted.as_millis(),
                    reconciled.as_millis()
                )
            }
            None => String::new(),
        };
        println!(
            "kill {kill}: leader {} killed; new leader seen after {elected}; longest write gap {gap_ms:.0} ms{controllers}",
            victim.name
        );
        gaps_ms.push(gap_ms);
        target.restart(&victim.name)?;
    }
    gaps_ms.sort_by(|a, b| a.total_cmp(b));
    let median = gaps_ms[gaps_ms.len() / 2];
    let max = gaps_ms.last().copied().unwrap_or(0.0);
    println!("kills={} unavailability_ms_median={median:.0} unavailability_ms_max={max:.0}", gaps_ms.len());
    if let Some(probe) = probe {
        reconciles_ms.sort_by(|a, b| a.total_cmp(b));
        let median = reconciles_ms[reconciles_ms.len() / 2];
        let max = reconciles_ms.last().copied().unwrap_or(0.0);
        println!(
            "kills={} controller_failover_ms_median={median:.0} controller_failover_ms_max={max:.0}",
            gaps_ms.len()
        );
        drop(probe);
        Probe::remove(target.state_dir.as_deref().context("state dir")?).await?;
    }
    Ok(())
}

const PROBE_NS: &str = "bench-failover";
const JSON: &str = "application/json";

/// A ReplicaSet whose pods fit no node (they stay Pending, on real agents too), scaled up
/// by one after each kill: its new pod appears once the new leader's controllers run.
#[derive(Clone)]
struct Probe {
    /// (server name, API client) for every server.
    apis: Vec<(String, crate::kube::Client)>,
}

impl Probe {
    async fn connect(state_dir: &std::path::Path) -> Result<Probe> {
        let (servers, _) = super::cluster_api(state_dir, 0)?;
        let mut apis = Vec::new();
        for (i, s) in servers.iter().enumerate() {
            let (_, url) = super::cluster_api(state_dir, i)?;
            let client = crate::kube::Client::connect(&state_dir.join("pki"), &url, 1).await?;
            apis.push((s["name"].as_str().unwrap_or_default().to_string(), client));
        }
        Ok(Probe { apis })
    }

    async fn create(state_dir: &std::path::Path) -> Result<Probe> {
        let probe = Probe::connect(state_dir).await?;
        let api = &probe.apis[0].1;
        let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PROBE_NS}});
        let (status, body) = api.call(hyper::Method::POST, "/api/v1/namespaces", Some(&ns), JSON).await?;
        if !status.is_success() && status != hyper::StatusCode::CONFLICT {
            bail!("creating namespace {PROBE_NS}: {status}: {}", String::from_utf8_lossy(&body));
        }
        let rs = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "probe"},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "failover-probe"}},
                     "template": {"metadata": {"labels": {"app": "failover-probe"}},
                                  "spec": {"nodeSelector": {"corral.dev/failover-probe": "no-such-node"},
                                           "containers": [{"name": "c", "image": "pause"}]}}}});
        let path = format!("/apis/apps/v1/namespaces/{PROBE_NS}/replicasets");
        let (status, body) = api.call(hyper::Method::POST, &path, Some(&rs), JSON).await?;
        if !status.is_success() && status != hyper::StatusCode::CONFLICT {
            bail!("creating the probe ReplicaSet: {status}: {}", String::from_utf8_lossy(&body));
        }
        // Back to zero replicas if a previous run left some.
        let zero = serde_json::json!({"spec": {"replicas": 0}});
        api.ok(hyper::Method::PATCH, &format!("{path}/probe"), Some(&zero), "application/merge-patch+json").await?;
        Ok(probe)
    }

    /// Scales the probe to `replicas` through the surviving servers, then waits for its pods
    /// to exist: (scale accepted, pods created), both from the kill, each within 10 s.
    async fn scale_after_kill(
        self,
        replicas: usize,
        killed: String,
        killed_at: Instant,
    ) -> Result<(Duration, Duration)> {
        let survivors: Vec<_> = self.apis.iter().filter(|(name, _)| *name != killed).map(|(_, c)| c).collect();
        let path = format!("/apis/apps/v1/namespaces/{PROBE_NS}/replicasets/probe");
        let body = serde_json::json!({"spec": {"replicas": replicas}});
        let deadline = killed_at + Duration::from_secs(10);
        let mut at = 0;
        let accepted = loop {
            let call = survivors[at].call(hyper::Method::PATCH, &path, Some(&body), "application/merge-patch+json");
            if let Ok(Ok((status, _))) = tokio::time::timeout(Duration::from_millis(500), call).await
                && status.is_success()
            {
                break killed_at.elapsed();
            }
            if Instant::now() > deadline {
                bail!("the probe ReplicaSet could not be scaled within 10 s of the kill");
            }
            at = (at + 1) % survivors.len();
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let pods = format!("/api/v1/namespaces/{PROBE_NS}/pods?labelSelector=app%3Dfailover-probe");
        loop {
            let call = survivors[at].call(hyper::Method::GET, &pods, None, JSON);
            if let Ok(Ok((status, raw))) = tokio::time::timeout(Duration::from_millis(500), call).await
                && status.is_success()
                && serde_json::from_slice::<serde_json::Value>(&raw)
                    .is_ok_and(|l| l["items"].as_array().is_some_and(|items| items.len() >= replicas))
            {
                return Ok((accepted, killed_at.elapsed()));
            }
            if Instant::now() > deadline {
                bail!("the new leader's ReplicaSet controller made no pod within 10 s of the kill");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn remove(state_dir: &std::path::Path) -> Result<()> {
        let probe = Probe::connect(state_dir).await?;
        let api = &probe.apis.first().context("no server")?.1;
        api.call(hyper::Method::DELETE, &format!("/api/v1/namespaces/{PROBE_NS}"), None, JSON).await?;
        Ok(())
    }
}

/// How long after the kill a survivor first reports a leader other than the killed one, polled
/// every 10 ms for at most 4 s.
async fn new_leader_after(target: &Target, survivors: &[String], old: u64, killed_at: Instant) -> Option<Duration> {
    use corral_proto::etcdserverpb::StatusRequest;
    use corral_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    let clients: Vec<_> = survivors.iter().filter_map(|u| target.channel(u).ok()).map(MaintenanceClient::new).collect();
    while killed_at.elapsed() < Duration::from_secs(4) {
        for client in &clients {
            let mut req = tonic::Request::new(StatusRequest {});
            req.set_timeout(Duration::from_millis(100));
            if let Ok(resp) = client.clone().status(req).await
                && let leader = resp.into_inner().leader
                && leader != 0
                && leader != old
            {
                return Some(killed_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Waits until every member answers with a leader and has applied everything in the
/// cluster's log: a member restarted after the previous kill may still be applying what its
/// crash left unapplied (Corral replays it from the Raft log after starting; etcd from its
/// WAL before serving). Killing the leader then would be a second fault, not the one measured.
async fn wait_all_healthy(target: &Target) -> Result<()> {
    use corral_proto::etcdserverpb::StatusRequest;
    use corral_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut statuses = Vec::new();
        for url in &target.endpoints {
            let mut client = MaintenanceClient::new(target.channel(url)?);
            let mut req = tonic::Request::new(StatusRequest {});
            req.set_timeout(Duration::from_secs(1));
            if let Ok(resp) = client.status(req).await {
                statuses.push(resp.into_inner());
            }
        }
        let logged = statuses.iter().map(|s| s.raft_index).max().unwrap_or(0);
        if statuses.len() == target.endpoints.len()
            && statuses.iter().all(|s| s.leader != 0 && s.raft_applied_index >= logged)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster did not recover in 60s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
