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
}

pub async fn run(args: FailoverArgs) -> Result<()> {
    let target = Target::from_args(&args.target)?;
    if target.kind == Kind::Remote {
        bail!("failover kills processes: give --state-dir of a local cluster (corral up, or corral bench etcd up)");
    }
    let mut gaps_ms = Vec::new();
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
        let killed_at = Instant::now();
        unsafe { libc::kill(victim.pid as i32, libc::SIGKILL) };
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
        println!(
            "kill {kill}: leader {} killed; new leader seen after {elected}; longest write gap {gap_ms:.0} ms",
            victim.name
        );
        gaps_ms.push(gap_ms);
        restart(&target, &victim.name).await?;
    }
    gaps_ms.sort_by(|a, b| a.total_cmp(b));
    let median = gaps_ms[gaps_ms.len() / 2];
    let max = gaps_ms.last().copied().unwrap_or(0.0);
    println!("kills={} unavailability_ms_median={median:.0} unavailability_ms_max={max:.0}", gaps_ms.len());
    Ok(())
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

async fn restart(target: &Target, name: &str) -> Result<()> {
    let dir = target.state_dir.as_ref().context("state dir")?;
    match target.kind {
        Kind::Corral => {
            let servers = target.processes()?.len();
            let status = std::process::Command::new(std::env::current_exe()?)
                .args(["up", "--servers", &servers.to_string(), "--state-dir"])
                .arg(dir)
                .stdout(std::process::Stdio::null())
                .status()?;
            if !status.success() {
                bail!("corral up could not restart {name}");
            }
        }
        Kind::Etcd => {
            let mut processes = target.processes()?;
            for p in processes.iter_mut().filter(|p| p.name == name) {
                let log = p.log.clone().unwrap_or_else(|| dir.join(format!("{name}.log")));
                p.pid = super::etcd::spawn(&p.argv, &log)?;
            }
            super::etcd::save(dir, &processes)?;
        }
        Kind::Remote => unreachable!("checked at start"),
    }
    Ok(())
}

async fn wait_all_healthy(target: &Target) -> Result<()> {
    use corral_proto::etcdserverpb::StatusRequest;
    use corral_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut healthy = 0;
        for url in &target.endpoints {
            let mut client = MaintenanceClient::new(target.channel(url)?);
            let mut req = tonic::Request::new(StatusRequest {});
            req.set_timeout(Duration::from_secs(1));
            if let Ok(resp) = client.status(req).await
                && resp.into_inner().leader != 0
            {
                healthy += 1;
            }
        }
        if healthy == target.endpoints.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster did not recover in 60s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
