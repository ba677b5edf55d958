//! The leader dies while kubectl watches through another server: the watch carries on and
//! every object written before and after is there.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use corral_e2e::{Cluster, init_tracing, text};
use tracing::info;

fn configmap(name: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  n: \"{name}\"\n")
}

#[test]
fn kubectl_watching_a_survivor_carries_on_when_the_leader_dies() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, 25100, &[])?;
    let leader = c.leader()?;
    let servers = c.servers()?;
    let survivor = servers.iter().position(|s| s.name != leader.name).expect("three servers");
    let url = c.api_url(survivor);
    let apply = |name: &str| {
        corral_e2e::run(c.kubectl().arg(format!("--server={url}")).args(["apply", "-f", "-"]), Some(&configmap(name)))
    };

    info!(watching = %url, "kubectl get -w through a follower; objects written before the kill");
    let watcher = c
        .kubectl()
        .arg(format!("--server={url}"))
        .args(["get", "configmaps", "-w", "-o", "name"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    for i in 0..5 {
        apply(&format!("before-{i}"))?;
    }

    info!(leader = %leader.name, "SIGKILL the leader; keep writing through the survivor");
    c.kill(&leader.name)?;
    let killed = Instant::now();
    let mut written = 0;
    while written < 5 {
        ensure!(killed.elapsed() < Duration::from_secs(30), "the survivors never accepted a write");
        match apply(&format!("after-{written}")) {
            Ok(_) => written += 1,
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    info!(elapsed_ms = killed.elapsed().as_millis() as u64, "writes accepted again after the kill");
    std::thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(watcher.id() as i32, libc::SIGTERM) };
    let out = watcher.wait_with_output()?;
    let seen = text(&out.stdout);

    info!("the watch printed every object, and every object is stored");
    let listed = c.kube_at(&url, &["get", "configmaps", "-o", "name"])?;
    for name in (0..5).flat_map(|i| [format!("before-{i}"), format!("after-{i}")]) {
        let line = format!("configmap/{name}");
        ensure!(seen.lines().any(|l| l == line), "the watch missed {name}:\n{seen}\n{}", text(&out.stderr));
        ensure!(listed.lines().any(|l| l == line), "{name} was lost:\n{listed}");
    }
    Ok(())
}
