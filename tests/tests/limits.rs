//! What a cluster refuses, and how it says so: a leader cut off from its quorum, a full
//! disk quota, and a client that never finishes its TLS handshake.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use corral_e2e::{Cluster, init_tracing};
use tracing::info;

fn signal(pid: u32, sig: i32) {
    unsafe { libc::kill(pid as i32, sig) };
}

#[test]
fn a_leader_without_its_quorum_refuses_linearizable_reads_and_writes_fast() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, 24600, &[])?;
    c.ctl(&["put", "k", "before"])?;
    let leader = c.leader()?;
    let followers: Vec<_> = c.servers()?.into_iter().filter(|s| s.name != leader.name).collect();

    info!("SIGSTOP both followers: the leader is alone");
    for f in &followers {
        signal(f.pid, libc::SIGSTOP);
    }
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let read = corral_e2e::run(c.etcdctl_at(&leader.client_url).args(["get", "k", "--command-timeout=8s"]), None);
    let write =
        corral_e2e::run(c.etcdctl_at(&leader.client_url).args(["put", "k", "alone", "--command-timeout=8s"]), None);
    let elapsed = started.elapsed();
    let serializable = corral_e2e::run(c.etcdctl_at(&leader.client_url).args(["get", "k", "--consistency=s"]), None);
    for f in &followers {
        signal(f.pid, libc::SIGCONT);
    }
    let read_err = read.expect_err("a linearizable read must fail without a quorum").to_string();
    ensure!(read_err.contains("no leader") || read_err.contains("timed out"), "{read_err}");
    ensure!(write.is_err(), "a write must fail without a quorum");
    ensure!(elapsed < Duration::from_secs(8), "refusals took {elapsed:?}: they must not hang");
    ensure!(serializable? == "k\nbefore\n", "a serializable read is served locally");

    info!("SIGCONT: the cluster serves again");
    let deadline = Instant::now() + Duration::from_secs(15);
    while c.ctl(&["put", "k", "after"]).is_err() {
        ensure!(Instant::now() < deadline, "the cluster did not recover");
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(c.ctl(&["get", "k", "--print-value-only"])? == "after\n");
    Ok(())
}

#[test]
fn a_full_quota_raises_the_alarm_until_compaction_defragment_and_disarm() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, 24700, &["--quota-backend-bytes", &(4u64 << 20).to_string()])?;
    let value = "v".repeat(512 << 10);

    info!("fill past the 4 MiB quota: writes get etcd's error and a NOSPACE alarm");
    let mut refused = None;
    for i in 0..40 {
        if let Err(e) = c.ctl_stdin(&["put", &format!("big/{i}")], &value) {
            refused = Some((i, e.to_string()));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (stored, refused) = refused.expect("the quota was never enforced");
    ensure!(refused.contains("database space exceeded"), "{refused}");
    ensure!(stored > 0, "the first put was refused: the quota counts more than the data");
    ensure!(c.ctl(&["alarm", "list"])?.contains("alarm:NOSPACE"));
    let keys = c.ctl(&["get", "big/", "--prefix", "--keys-only"])?;
    ensure!(keys.lines().filter(|l| !l.is_empty()).count() == stored, "reads still work: {keys:?}");

    info!("delete, compact, defragment, disarm: writes are accepted again");
    c.ctl(&["del", "big/", "--prefix"])?;
    let rev = serde_json::from_str::<serde_json::Value>(&c.ctl(&["get", "x", "-w", "json"])?)?["header"]["revision"]
        .as_i64()
        .unwrap();
    c.ctl(&["compaction", "--physical", &rev.to_string()])?;
    std::thread::sleep(Duration::from_secs(2));
    c.ctl_combined(&["defrag", "--cluster"])?;
    std::thread::sleep(Duration::from_secs(2));
    c.ctl(&["alarm", "disarm"])?;
    ensure!(c.ctl(&["alarm", "list"])?.is_empty());
    c.ctl(&["put", "small", "ok"])?;
    Ok(())
}

#[test]
fn a_client_that_never_finishes_its_tls_handshake_is_dropped() -> Result<()> {
    init_tracing();
    let c = Cluster::up(1, 25000, &[])?;
    let server = c.servers()?.remove(0);

    info!("open a bare TCP connection to each of the etcd, peer and API ports, and send nothing");
    let mut silent = Vec::new();
    for url in [&server.client_url, &server.peer_url, &server.api_url] {
        let authority = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest).trim_end_matches('/');
        let tcp = std::net::TcpStream::connect(authority)?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        silent.push((url.clone(), tcp));
    }

    info!("each server end closes its connection after the 10 s handshake timeout");
    let opened = Instant::now();
    for (url, mut tcp) in silent {
        let mut buf = [0u8; 64];
        let read = std::io::Read::read(&mut tcp, &mut buf);
        let waited = opened.elapsed();
        let closed = match &read {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        };
        ensure!(closed, "{url}: expected the server to close the connection, read {read:?} after {waited:?}");
        ensure!(waited >= Duration::from_secs(9), "{url} closed after {waited:?}, before the timeout");
        ensure!(waited < Duration::from_secs(25), "{url} was kept open for {waited:?}");
    }

    info!("a real client is still served");
    ensure!(c.ctl(&["put", "k", "v"]).is_ok());
    Ok(())
}
