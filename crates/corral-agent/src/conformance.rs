//! What pod sync expects of a container runtime, as one scenario any `Runtime` must pass:
//! the fake in unit tests, containerd in the end-to-end suite. Needs the `busybox` image.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use corral_proto::cri;

use crate::cri::{CriError, Runtime};

#[derive(Debug, thiserror::Error)]
#[error("runtime conformance: {0}")]
pub struct Failure(String);

fn check(ok: bool, what: impl Into<String>) -> Result<(), Failure> {
    if ok { Ok(()) } else { Err(Failure(what.into())) }
}

fn cri_err(what: &str) -> impl Fn(CriError) -> Failure + '_ {
    move |e| Failure(format!("{what}: {e}"))
}

fn container(name: &str, command: &[&str], labels: &HashMap<String, String>) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: "busybox".into(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        labels: labels.clone(),
        log_path: format!("{name}/0.log"),
        ..Default::default()
    }
}

/// Waits until the container reaches `state`; its last status.
async fn wait_for<R: Runtime>(rt: &R, id: &str, state: cri::ContainerState) -> Result<cri::ContainerStatus, Failure> {
    let started = Instant::now();
    loop {
        let status = rt.container_status(id).await.map_err(cri_err("container status"))?;
        if status.state == state as i32 {
            return Ok(status);
        }
        if started.elapsed() > Duration::from_secs(20) {
            return Err(Failure(format!("container {id} never reached {state:?}; last {:?}", status.state)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The scenario: images, a sandbox with an IP and labels, a container exiting with a code, a
/// running one stopped and removed, exec, and the sandbox's removal taking its containers.
/// `log_dir` is where the sandbox may write logs.
pub async fn run_in<R: Runtime>(rt: &R, log_dir: &str) -> Result<(), Failure> {
    let version = rt.version().await.map_err(cri_err("version"))?;
    check(!version.runtime_name.is_empty(), "the runtime names itself")?;
    check(rt.image_status("busybox").await.map_err(cri_err("image status"))?.is_some(), "busybox is present")?;
    check(
        rt.image_status("nothing.invalid/absent:1").await.map_err(cri_err("image status"))?.is_none(),
        "absent image",
    )?;
    check(rt.pull_image("nothing.invalid/absent:1").await.is_err(), "pulling an image no registry has fails")?;

    let labels = HashMap::from([("io.kubernetes.pod.uid".to_string(), "conformance-uid".to_string())]);
    let sandbox = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "conformance".into(),
            uid: "conformance-uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "conformance".into(),
        log_directory: log_dir.into(),
        labels: labels.clone(),
        ..Default::default()
    };
    let sb = rt.run_pod_sandbox(sandbox.clone()).await.map_err(cri_err("run sandbox"))?;
    let result = scenario(rt, &sb, &sandbox, &labels).await;
    // Whatever happened, leave nothing behind.
    let _ = rt.stop_pod_sandbox(&sb).await;
    let _ = rt.remove_pod_sandbox(&sb).await;
    result?;
    let left = rt.list_pod_sandboxes().await.map_err(cri_err("list sandboxes"))?;
    check(!left.iter().any(|s| s.id == sb), "a removed sandbox is gone")?;
    let containers = rt.list_containers().await.map_err(cri_err("list containers"))?;
    check(!containers.iter().any(|c| c.pod_sandbox_id == sb), "its containers went with it")
}

async fn scenario<R: Runtime>(
    rt: &R,
    sb: &str,
    sandbox: &cri::PodSandboxConfig,
    labels: &HashMap<String, String>,
) -> Result<(), Failure> {
    let status = rt.pod_sandbox_status(sb).await.map_err(cri_err("sandbox status"))?;
    check(status.state == cri::PodSandboxState::SandboxReady as i32, "the sandbox is ready")?;
    check(status.network.is_some_and(|n| !n.ip.is_empty()), "the sandbox has an IP")?;
    let listed = rt.list_pod_sandboxes().await.map_err(cri_err("list sandboxes"))?;
    check(
        listed
            .iter()
            .any(|s| s.id == sb && s.labels.get("io.kubernetes.pod.uid").is_some_and(|u| u == "conformance-uid")),
        "the sandbox is listed with its labels",
    )?;

    let exits = rt
        .create_container(sb, container("exits", &["sh", "-c", "exit 3"], labels), sandbox.clone())
        .await
        .map_err(cri_err("create"))?;
    rt.start_container(&exits).await.map_err(cri_err("start"))?;
    let done = wait_for(rt, &exits, cri::ContainerState::ContainerExited).await?;
    check(done.exit_code == 3, format!("exit code 3, got {}", done.exit_code))?;
    // A process that exits at once may be seen to finish before containerd records its start:
    // both times are set, in either order.
    check(done.started_at > 0 && done.finished_at > 0, "start and finish times")?;

    let sleeps = rt
        .create_container(sb, container("sleeps", &["sleep", "3600"], labels), sandbox.clone())
        .await
        .map_err(cri_err("create"))?;
    let created = rt.container_status(&sleeps).await.map_err(cri_err("status"))?;
    check(created.state == cri::ContainerState::ContainerCreated as i32, "created, not started")?;
    rt.start_container(&sleeps).await.map_err(cri_err("start"))?;
    wait_for(rt, &sleeps, cri::ContainerState::ContainerRunning).await?;
    let echo = rt
        .exec_sync(&sleeps, vec!["sh".into(), "-c".into(), "echo conformance".into()], Duration::from_secs(10))
        .await
        .map_err(cri_err("exec"))?;
    check(echo.exit_code == 0 && echo.stdout == b"conformance\n", format!("exec output {:?}", echo))?;
    let listed = rt.list_containers().await.map_err(cri_err("list containers"))?;
    for id in [&exits, &sleeps] {
        check(
            listed
                .iter()
                .any(|c| &c.id == id && c.pod_sandbox_id == sb && c.labels.contains_key("io.kubernetes.pod.uid")),
            format!("container {id} listed with its sandbox and labels"),
        )?;
    }
    usage(rt, sb, sandbox, labels, &sleeps).await?;
    rt.stop_container(&sleeps, Duration::from_secs(1)).await.map_err(cri_err("stop"))?;
    wait_for(rt, &sleeps, cri::ContainerState::ContainerExited).await?;
    rt.remove_container(&sleeps).await.map_err(cri_err("remove"))?;
    check(matches!(rt.container_status(&sleeps).await, Err(CriError::NotFound(_))), "a removed container is not found")
}

/// Cumulative CPU time of each container, by id.
async fn cpu_times<R: Runtime>(rt: &R) -> Result<HashMap<String, (i64, u64)>, Failure> {
    let stats = rt.list_container_stats().await.map_err(cri_err("container stats"))?;
    Ok(stats
        .into_iter()
        .filter_map(|s| {
            let cpu = s.cpu?;
            Some((s.attributes?.id, (cpu.timestamp, cpu.usage_core_nano_seconds?.value)))
        })
        .collect())
}

/// A busy loop shows as CPU time in the stats (a fifth of a core at least, on a loaded
/// machine), a sleeping container as next to none.
async fn usage<R: Runtime>(
    rt: &R,
    sb: &str,
    sandbox: &cri::PodSandboxConfig,
    labels: &HashMap<String, String>,
    sleeps: &str,
) -> Result<(), Failure> {
    let busy = rt
        .create_container(sb, container("busy", &["sh", "-c", "while :; do :; done"], labels), sandbox.clone())
        .await
        .map_err(cri_err("create"))?;
    rt.start_container(&busy).await.map_err(cri_err("start"))?;
    wait_for(rt, &busy, cri::ContainerState::ContainerRunning).await?;
    let before = cpu_times(rt).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = cpu_times(rt).await?;
    let cores = |id: &str| -> Option<f64> {
        let ((t0, c0), (t1, c1)) = (before.get(id)?, after.get(id)?);
        Some(c1.saturating_sub(*c0) as f64 / (t1 - t0).max(1) as f64)
    };
    let (busy_cores, idle_cores) = (cores(&busy), cores(sleeps));
    rt.stop_container(&busy, Duration::from_secs(1)).await.map_err(cri_err("stop"))?;
    rt.remove_container(&busy).await.map_err(cri_err("remove"))?;
    check(busy_cores.is_some_and(|c| c >= 0.2), format!("a busy loop uses CPU: {busy_cores:?} cores"))?;
    check(idle_cores.is_some_and(|c| c < 0.05), format!("a sleeping container does not: {idle_cores:?} cores"))
}

/// `run_in` with a temporary log directory.
pub async fn run<R: Runtime>(rt: &R) -> Result<(), Failure> {
    let dir = std::env::temp_dir().join(format!("corral-conformance-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let result = run_in(rt, &dir.display().to_string()).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}
