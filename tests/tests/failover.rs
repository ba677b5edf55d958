//! Kill the leader under a write load: nothing acknowledged is lost, watchers resume on
//! another server without a gap or a duplicate, restarted and wiped servers catch up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use corral_e2e::{Cluster, init_tracing};
use corral_proto::etcdserverpb::kv_client::KvClient;
use corral_proto::etcdserverpb::watch_client::WatchClient;
use corral_proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest, WatchRequest, watch_request};
use tracing::info;

const PREFIX: &str = "load/";

fn prefix_end() -> Vec<u8> {
    b"load0".to_vec()
}

/// Writers that put unique keys round-robin over the servers until told to stop; they record
/// every key whose put was acknowledged.
async fn write_load(cluster: &Cluster, writers: usize, stop: Arc<Mutex<bool>>) -> Result<Vec<String>> {
    let urls: Vec<String> = cluster.servers()?.iter().map(|s| s.client_url.clone()).collect();
    let mut channels = Vec::new();
    for url in &urls {
        channels.push(cluster.channel(url).await?);
    }
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let channels = channels.clone();
        let acked = acked.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut target = w % channels.len();
            for i in 0u64..1_000_000 {
                if *stop.lock().unwrap() {
                    break;
                }
                let key = format!("{PREFIX}{w}/{i:06}");
                let mut client = KvClient::new(channels[target].clone());
                let mut req = tonic::Request::new(PutRequest {
                    key: key.clone().into(),
                    value: b"v".to_vec(),
                    ..Default::default()
                });
                req.set_timeout(Duration::from_secs(3));
                match client.put(req).await {
                    Ok(_) => acked.lock().unwrap().push(key),
                    // Unknown outcome: the key may or may not exist; it is not counted.
                    Err(_) => {
                        target = (target + 1) % channels.len();
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let keys = acked.lock().unwrap().clone();
    Ok(keys)
}

/// Watches the load prefix from `start_rev` on the first server in `urls`, moving to the next
/// server (from the last revision seen + 1) whenever the stream breaks. Returns (revision,
/// key) of every event seen, in arrival order.
async fn resumable_watch(
    cluster: &Cluster,
    urls: Vec<String>,
    start_rev: i64,
    until: Arc<Mutex<bool>>,
) -> Result<Vec<(i64, String)>> {
    let mut seen: Vec<(i64, String)> = Vec::new();
    let mut next_rev = start_rev;
    let mut server = 0;
    let mut resumes = 0;
    let quiet_deadline = || Instant::now() + Duration::from_secs(3);
    let mut quiet_until = quiet_deadline();
    while resumes < 20 {
        let channel = cluster.channel(&urls[server % urls.len()]).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                key: PREFIX.into(),
                range_end: prefix_end(),
                start_revision: next_rev,
                ..Default::default()
            })),
        };
        tx.send(create).await?;
        let stream = WatchClient::new(channel).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(_) => {
                server += 1;
                resumes += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                Ok(Ok(Some(resp))) => {
                    ensure!(!resp.canceled, "watch canceled: {}", resp.cancel_reason);
                    for e in resp.events {
                        let kv = e.kv.context("event without kv")?;
                        next_rev = kv.mod_revision + 1;
                        seen.push((kv.mod_revision, String::from_utf8(kv.key)?));
                    }
                    quiet_until = quiet_deadline();
                }
                Ok(_) => break, // the server went away: resume elsewhere
                Err(_) => {
                    if *until.lock().unwrap() && Instant::now() > quiet_until {
                        return Ok(seen);
                    }
                }
            }
        }
        drop(tx);
        server += 1;
        resumes += 1;
    }
    Ok(seen)
}

/// Counts the load keys a server holds locally (a serializable read).
async fn local_count(cluster: &Cluster, url: &str) -> Result<i64> {
    let mut client = KvClient::new(cluster.channel(url).await?);
    let req = RangeRequest {
        key: PREFIX.into(),
        range_end: prefix_end(),
        count_only: true,
        serializable: true,
        ..Default::default()
    };
    Ok(client.range(req).await?.into_inner().count)
}

/// Waits until every listed server holds `expected` load keys.
async fn converge(cluster: &Cluster, urls: &[String], expected: i64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut counts = BTreeMap::new();
        for url in urls {
            counts.insert(url.clone(), local_count(cluster, url).await.unwrap_or(-1));
        }
        if counts.values().all(|c| *c == expected) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "servers did not converge on {expected} keys: {counts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_nothing_acknowledged() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, 24200, &["--snapshot-count", "1000", "--snapshot-catchup-entries", "100"])?;
    let servers = c.servers()?;
    let urls: Vec<String> = servers.iter().map(|s| s.client_url.clone()).collect();
    let leader = c.leader()?;
    let start_rev = {
        let mut kv = KvClient::new(c.channel(&urls[0]).await?);
        kv.range(RangeRequest { key: b"x".to_vec(), ..Default::default() }).await?.into_inner().header.unwrap().revision
            + 1
    };

    info!(leader = %leader.name, "a write load on every server, and a watcher on the leader");
    let stop = Arc::new(Mutex::new(false));
    let mut watch_order: Vec<String> = vec![leader.client_url.clone()];
    watch_order.extend(urls.iter().filter(|u| **u != leader.client_url).cloned());
    let watcher = {
        let c_urls = watch_order.clone();
        let stop = stop.clone();
        let cluster: &'static Cluster = Box::leak(Box::new(Cluster::adopt(&c)));
        tokio::spawn(async move { resumable_watch(cluster, c_urls, start_rev, stop).await })
    };
    let load = {
        let stop = stop.clone();
        let cluster: &'static Cluster = Box::leak(Box::new(Cluster::adopt(&c)));
        tokio::spawn(async move { write_load(cluster, 16, stop).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    info!("SIGKILL the leader; writes go on");
    c.kill(&leader.name)?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    *stop.lock().unwrap() = true;
    let acked = load.await??;
    info!(acknowledged = acked.len(), "load stopped");
    ensure!(acked.len() > 500, "the load did too little to prove anything: {}", acked.len());

    info!("a new leader took over, and every acknowledged write is on both survivors");
    let new_leader = c.leader()?;
    ensure!(new_leader.name != leader.name, "the killed server is still reported leader");
    let survivors: Vec<String> = urls.iter().filter(|u| **u != leader.client_url).cloned().collect();
    let total = local_count(&c, &survivors[0]).await?;
    ensure!(total >= acked.len() as i64, "lost writes: {} acknowledged, {} stored", acked.len(), total);
    converge(&c, &survivors, total).await?;
    let mut kv = KvClient::new(c.channel(&survivors[1]).await?);
    let stored: BTreeSet<String> = kv
        .range(RangeRequest {
            key: PREFIX.into(),
            range_end: prefix_end(),
            keys_only: true,
            serializable: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .kvs
        .into_iter()
        .map(|kv| String::from_utf8(kv.key).unwrap())
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|k| !stored.contains(*k)).take(5).collect();
    ensure!(missing.is_empty(), "acknowledged but missing: {missing:?}");

    info!("the watcher resumed on another server: every event once, in order, none missed");
    let events = watcher.await??;
    let revs: Vec<i64> = events.iter().map(|(r, _)| *r).collect();
    ensure!(revs.windows(2).all(|w| w[0] < w[1]), "events out of order or repeated");
    let watched: BTreeSet<&String> = events.iter().map(|(_, k)| k).collect();
    ensure!(watched.len() == events.len(), "an event was delivered twice");
    let unseen: Vec<&String> = stored.iter().filter(|k| !watched.contains(k)).take(5).collect();
    ensure!(unseen.is_empty(), "stored but never watched: {unseen:?}");

    info!("the killed server restarts and catches up");
    c.restart_stopped(3)?;
    converge(&c, &urls, total).await?;

    info!("restart every server: the state is intact");
    for s in c.servers()? {
        c.kill(&s.name)?;
    }
    c.restart_stopped(3)?;
    converge(&c, &urls, total).await?;

    info!("wipe one server, remove and re-add it: it catches up by snapshot");
    let current_leader = c.leader()?.name;
    let victim = c.servers()?.into_iter().find(|s| s.name != current_leader).context("a follower")?;
    let list = c.ctl(&["member", "list"])?;
    let id = list
        .lines()
        .find(|l| l.contains(&format!(", {}, ", victim.name)))
        .and_then(|l| l.split(',').next())
        .context("victim id")?
        .to_string();
    c.ctl(&["member", "remove", &id])?;
    c.kill(&victim.name)?;
    std::fs::remove_dir_all(c.state_dir().join("servers").join(&victim.name).join("data"))?;
    // Enough new entries (one per sequential put) for several snapshots, so the leader's log
    // no longer reaches back to what the wiped server needs.
    let mut kv = KvClient::new(c.channel(&c.leader()?.client_url).await?);
    for i in 0..3000 {
        kv.put(PutRequest { key: format!("filler/{i}").into(), value: b"f".to_vec(), ..Default::default() }).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.ctl(&["member", "add", &victim.name, &format!("--peer-urls={}", victim.peer_url)])?;
    c.start_server(&victim.name, &["--initial-cluster-state", "existing"])?;
    converge(&c, &urls, total).await?;
    let log = std::fs::read_to_string(c.state_dir().join("servers").join(&victim.name).join("server.log"))?;
    if !log.contains("installing snapshot") {
        let leader_log =
            std::fs::read_to_string(c.state_dir().join("servers").join(c.leader()?.name).join("server.log"))?;
        let snaps: Vec<&str> = leader_log.lines().filter(|l| l.contains("snapshot")).take(10).collect();
        anyhow::bail!(
            "the wiped server caught up without a snapshot; leader snapshot lines: {snaps:#?}\nvictim log: {}",
            corral_e2e::clip(&log)
        );
    }
    Ok(())
}
