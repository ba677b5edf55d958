//! The chaos suite's short profile: `corral chaos run` as a user runs it, on Corral (mixed
//! kills and pauses, every failpoint, partitions with nftables in the servers' namespaces,
//! slow and lossy peer links through proxies, Kubernetes clients under kills and partitions,
//! all servers down for 60 s with pods running, the leader's clock jumping), on Debian's etcd 3.4 (the checkers must pass on
//! the anchor), and on the negative control (a build that acknowledges writes it never put
//! on disk: the checkers must catch it).

use std::process::Command;

use anyhow::{Result, bail, ensure};
use corral_e2e::{backtrace_frame, corral_bin, init_tracing, text};
use tracing::info;

/// Runs `corral chaos run ARGS` with `binary`; returns (succeeded, stdout and stderr without
/// backtrace frames).
fn chaos(binary: &std::path::Path, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(binary).args(["chaos", "run"]).args(args).output()?;
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let kept: Vec<&str> = all.lines().filter(|l| !backtrace_frame(l)).collect();
    Ok((out.status.success(), kept.join("\n")))
}

/// A passed run's headline (scenario, operations, verdict); what a failed one printed, whole,
/// in the error: CI shows a window of the test's output, and it must hold the failure.
fn passed(binary: &std::path::Path, args: &[&str]) -> Result<()> {
    let (ok, out) = chaos(binary, args)?;
    if ok && out.contains("\nPASSED") && !out.contains("FAIL ") {
        let headline = ["scenario ", "operations: ", "write unavailability", "PASSED"];
        for line in out.lines().filter(|l| headline.iter().any(|h| l.starts_with(h))) {
            println!("{line}");
        }
        return Ok(());
    }
    bail!("chaos run {args:?} did not pass:\n{out}")
}

#[test]
fn chaos_short_profile() -> Result<()> {
    init_tracing();
    let corral = corral_bin();

    info!("Corral under kills and pauses of leaders, followers, two and all servers: every checker passes");
    passed(&corral, &["mixed", "--seed", "11", "--duration", "30"])?;

    info!("Corral crashed at each failpoint in turn: every one fires, every checker passes");
    passed(&corral, &["failpoints", "--seed", "12", "--duration", "120"])?;

    info!("Corral with its leader cut off both ways, one way, and a follower cut off until it needs a snapshot");
    passed(&corral, &["partitions", "--seed", "15", "--duration", "30"])?;

    info!("Corral with a follower wiped, removed from the membership and added back under load");
    passed(&corral, &["wipe-follower", "--seed", "19", "--duration", "20"])?;

    info!(
        "Corral with a server's disk full: it stops rather than go on half-written, and catches up once it has space"
    );
    passed(&corral, &["disk-full", "--seed", "21", "--duration", "20"])?;

    info!("Corral with delay, jitter and loss on every peer link");
    passed(&corral, &["slow-links", "--seed", "16", "--duration", "25"])?;

    info!("Kubernetes clients create, scale, roll and delete deployments through kills and partitions");
    passed(&corral, &["kube-mixed", "--seed", "17", "--duration", "40"])?;

    info!("every server down for 60 s: the pods run on, the nodes are Ready again within 40 s");
    passed(&corral, &["servers-down", "--seed", "18", "--duration", "10"])?;

    info!("the leader's wall clock jumps five minutes forward and back: no node goes NotReady");
    passed(&corral, &["clock-jump", "--seed", "20", "--duration", "10"])?;

    info!("Debian's etcd 3.4 under the same workload and faults: the checkers pass on the anchor");
    passed(&corral, &["mixed", "--system", "etcd", "--seed", "13", "--duration", "30", "--base-port", "26800"])?;

    info!("the negative control, killed whole: acknowledged writes vanish and the checkers say so");
    let negative = std::env::var_os("CORRAL_NEGATIVE_BIN").map(std::path::PathBuf::from);
    let Some(negative) = negative.filter(|p| p.exists()) else {
        anyhow::bail!(
            "CORRAL_NEGATIVE_BIN is not a built binary: tests/run.sh builds it (--features ack-before-fsync)"
        );
    };
    let (ok, out) = chaos(&negative, &["kill-all", "--seed", "14", "--duration", "15", "--base-port", "26700"])?;
    let _ = Command::new(&corral).args(["down", "--state-dir", "/var/tmp/corral-chaos/corral-kill-all-14"]).output();
    let _ = std::fs::remove_dir_all("/var/tmp/corral-chaos/corral-kill-all-14");
    ensure!(!ok && out.contains("\nFAILED"), "the negative control was not caught:\n{out}");
    let caught: Vec<&str> = ["linearizable", "no lost write", "watch", "judged"]
        .into_iter()
        .filter(|name| out.contains(&format!("FAIL  {name}")))
        .collect();
    ensure!(!caught.is_empty(), "the negative control failed, but no history checker caught it:\n{out}");
    info!(caught = ?caught, "caught");
    Ok(())
}
