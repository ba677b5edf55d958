//! Guards against openraft's known sharp edges: snapshots built, purged and installed while
//! writes are applied at full speed, and stale reads around a change of leader.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use corral_e2e::{Cluster, init_tracing};
use corral_proto::etcdserverpb::kv_client::KvClient;
use corral_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use corral_proto::etcdserverpb::{HashKvRequest, PutRequest, RangeRequest};
use tracing::info;

/// Writes `reg` = 1, 2, 3, ... through one server and, after each acknowledgement, reads it
/// linearizably through another: a read must never see less than what was acknowledged.
async fn register_check(c: &Cluster, writer_url: String, reader_url: String, until: Instant) -> Result<u64> {
    let mut writer = KvClient::new(c.channel(&writer_url).await?);
    let mut reader = KvClient::new(c.channel(&reader_url).await?);
    let mut acked = 0u64;
    let mut checked = 0u64;
    while Instant::now() < until {
        let next = acked + 1;
        let mut put = tonic::Request::new(PutRequest {
            key: b"reg".to_vec(),
            value: next.to_string().into(),
            ..Default::default()
        });
        put.set_timeout(Duration::from_secs(2));
        if writer.put(put).await.is_ok() {
            acked = next;
        }
        let mut get = tonic::Request::new(RangeRequest { key: b"reg".to_vec(), ..Default::default() });
        get.set_timeout(Duration::from_secs(2));
        if let Ok(resp) = reader.range(get).await {
            let seen: u64 = resp
                .into_inner()
                .kvs
                .first()
                .map(|kv| String::from_utf8_lossy(&kv.value).parse().unwrap_or(0))
                .unwrap_or(0);
            ensure!(seen >= acked, "stale read: {seen} after {acked} was acknowledged");
            checked += 1;
        }
    }
    Ok(checked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_under_load_and_reads_across_a_leader_change() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, 24500, &["--snapshot-count", "200", "--snapshot-catchup-entries", "20"])?;
    let servers = c.servers()?;
    let leader = c.leader()?;
    let followers: Vec<_> = servers.iter().filter(|s| s.name != leader.name).cloned().collect();

    info!("load with a snapshot every 200 entries; a register checked for stale reads");
    let until = Instant::now() + Duration::from_secs(10);
    let mut writers = Vec::new();
    for (i, s) in servers.iter().cycle().take(32).enumerate() {
        let channel = c.channel(&s.client_url).await?;
        writers.push(tokio::spawn(async move {
            let mut kv = KvClient::new(channel);
            let mut n = 0u64;
            while Instant::now() < until {
                let req = PutRequest {
                    key: format!("churn/{i}/{}", n % 50).into(),
                    value: vec![b'x'; 128],
                    ..Default::default()
                };
                if kv.put(req).await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let register = {
        let cluster = Cluster::adopt(&c);
        let (w, r) = (followers[0].client_url.clone(), followers[1].client_url.clone());
        tokio::spawn(async move { register_check(&cluster, w, r, until).await })
    };

    info!("mid-way, kill a follower and bring it back: it catches up while snapshots churn");
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.kill(&followers[1].name)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.restart_stopped(3)?;
    info!("then kill the leader: reads through the survivors must not go back in time");
    c.kill(&leader.name)?;

    let mut writes = 0;
    for w in writers {
        writes += w.await?;
    }
    let checked = register.await??;
    info!(writes, register_reads = checked, "load done");
    ensure!(writes > 1000, "too little load to prove anything: {writes}");
    ensure!(checked > 50, "too few register reads: {checked}");
    c.restart_stopped(3)?;

    info!("every member converges: the same HashKV at the same revision");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut kv = KvClient::new(c.channel(&servers[0].client_url).await?);
        let rev = kv
            .range(RangeRequest { key: b"reg".to_vec(), ..Default::default() })
            .await?
            .into_inner()
            .header
            .context("header")?
            .revision;
        let mut hashes = Vec::new();
        for s in &servers {
            let mut m = MaintenanceClient::new(c.channel(&s.client_url).await?);
            match m.hash_kv(HashKvRequest { revision: rev }).await {
                Ok(r) => hashes.push(r.into_inner().hash),
                Err(e) => hashes.push(e.code() as u32),
            }
        }
        if hashes.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        ensure!(Instant::now() < deadline, "members did not converge at revision {rev}: {hashes:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for s in &servers {
        let log = std::fs::read_to_string(c.state_dir().join("servers").join(&s.name).join("server.log"))?;
        ensure!(!log.contains("panicked") && !log.contains("Fatal"), "{} logged a fatal error", s.name);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_every_server_under_load_loses_nothing_acknowledged() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, 24800, &["--snapshot-count", "300", "--snapshot-catchup-entries", "50"])?;
    let servers = c.servers()?;

    info!("writers on every server; all three servers SIGKILLed at once mid-load");
    let until = Instant::now() + Duration::from_secs(3);
    let mut writers = Vec::new();
    for (i, s) in servers.iter().cycle().take(24).enumerate() {
        let channel = c.channel(&s.client_url).await?;
        writers.push(tokio::spawn(async move {
            let mut kv = KvClient::new(channel);
            let mut acked = Vec::new();
            for n in 0u64.. {
                if Instant::now() > until {
                    break;
                }
                let key = format!("crash/{i}/{n}");
                let mut req = tonic::Request::new(PutRequest {
                    key: key.clone().into(),
                    value: b"v".to_vec(),
                    ..Default::default()
                });
                req.set_timeout(Duration::from_secs(1));
                if kv.put(req).await.is_ok() {
                    acked.push(key);
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for s in &servers {
        c.kill(&s.name)?;
    }
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await?);
    }
    ensure!(acked.len() > 200, "too little load to prove anything: {}", acked.len());

    info!(acknowledged = acked.len(), "restart all: every acknowledged write is on every server");
    c.restart_stopped(3)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in &servers {
        let mut kv = KvClient::new(c.channel(&s.client_url).await?);
        loop {
            let req = RangeRequest {
                key: b"crash/".to_vec(),
                range_end: b"crash0".to_vec(),
                keys_only: true,
                serializable: true,
                ..Default::default()
            };
            let stored: std::collections::BTreeSet<Vec<u8>> = match kv.range(req).await {
                Ok(r) => r.into_inner().kvs.into_iter().map(|kv| kv.key).collect(),
                Err(_) => Default::default(),
            };
            let missing = acked.iter().filter(|k| !stored.contains(k.as_bytes())).count();
            if missing == 0 {
                break;
            }
            ensure!(Instant::now() < deadline, "{} lost {missing} acknowledged writes", s.name);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    Ok(())
}
