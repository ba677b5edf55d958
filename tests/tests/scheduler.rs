//! The scheduler on the Raft leader, with the real kubectl, containerd and one agent: a pod
//! with no node is placed and runs; one that fits nowhere stays Pending with Kubernetes'
//! message; a cordoned node takes nothing until uncordoned; a ReplicaSet keeps its count
//! (replacing a deleted pod, scaled up and down); the garbage collector orphans or deletes
//! its pods with it; after `kill -9` of the leader, the new leader's scheduler places the
//! next pod.

use std::time::{Duration, Instant};

use anyhow::Result;
use corral_e2e::{Cluster, init_tracing};
use tracing::info;

const BASE_PORT: u16 = 25400;

const SCHEDULED: &str = "jsonpath={.spec.nodeName} {.status.conditions[?(@.type==\"PodScheduled\")].status} \
                         {.status.conditions[?(@.type==\"PodScheduled\")].message}";

const REPLICASET: &str = "
apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{name: main, image: busybox, command: [sleep, '3600']}]
";

#[test]
fn the_leaders_scheduler_places_pods_and_explains_the_ones_it_cannot() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, BASE_PORT, &["--agents", "1", "--dedicated-servers", "--cluster-cidr", "10.249.0.0/16"])?;
    let minute = Duration::from_secs(60);

    info!("a pod with no node is scheduled to the agent's node and runs");
    c.kube(&["run", "free", "--image=busybox", "--", "sleep", "3600"])?;
    c.kube_until(&["get", "pod", "free", "-o", "jsonpath={.spec.nodeName} {.status.phase}"], minute, |o| {
        o == "a1 Running"
    })?;
    let events = c.kube(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=free,reason=Scheduled",
        "-o",
        "jsonpath={.items[*].message}",
    ])?;
    assert_eq!(events, "Successfully assigned default/free to a1");

    info!("a pod that fits nowhere stays Pending with Kubernetes' message");
    let huge = r#"{"spec":{"containers":[{"name":"huge","image":"busybox","command":["sleep","3600"],"resources":{"requests":{"cpu":"64"}}}]}}"#;
    c.kube(&["run", "huge", "--image=busybox", &format!("--overrides={huge}")])?;
    c.kube_until(&["get", "pod", "huge", "-o", SCHEDULED], minute, |o| {
        o == " False 0/1 nodes are available: 1 Insufficient cpu."
    })?;
    let described = c.kube(&["describe", "pod", "huge"])?;
    assert!(described.contains("FailedScheduling") && described.contains("default-scheduler"), "{described}");

    info!("a cordoned node takes no pod; uncordoned, it takes the waiting one");
    c.kube(&["cordon", "a1"])?;
    c.kube(&["run", "patient", "--image=busybox", "--", "sleep", "3600"])?;
    c.kube_until(&["get", "pod", "patient", "-o", SCHEDULED], minute, |o| {
        o == " False 0/1 nodes are available: 1 node(s) were unschedulable."
    })?;
    c.kube(&["uncordon", "a1"])?;
    c.kube_until(&["get", "pod", "patient", "-o", "jsonpath={.spec.nodeName}"], minute, |o| o == "a1")?;

    info!("a ReplicaSet keeps its count: pods created, a deleted one replaced, scaled up and down");
    c.kube(&["delete", "pod", "huge", "patient", "--wait=false"])?;
    c.kube_stdin(&["apply", "-f", "-"], REPLICASET)?;
    let running = "jsonpath={range .items[?(@.status.phase==\"Running\")]}{.metadata.name} {end}";
    let names =
        c.kube_until(&["get", "pods", "-l", "app=web", "-o", running], minute, |o| o.split_whitespace().count() == 3)?;
    assert!(names.split_whitespace().all(|n| n.starts_with("web-") && n.len() == "web-".len() + 5), "{names}");
    let victim = names.split_whitespace().next().unwrap_or_default().to_string();
    c.kube(&["delete", "pod", &victim, "--wait=false"])?;
    c.kube_until(&["get", "pods", "-l", "app=web", "-o", running], minute, |o| {
        o.split_whitespace().count() == 3 && !o.split_whitespace().any(|n| n == victim)
    })?;
    c.kube(&["scale", "rs", "web", "--replicas=5"])?;
    c.kube_until(&["get", "rs", "web", "-o", "jsonpath={.status.readyReplicas}"], minute, |o| o == "5")?;
    c.kube(&["scale", "rs", "web", "--replicas=1"])?;
    let all = "jsonpath={range .items[*]}{.metadata.name} {end}";
    c.kube_until(&["get", "pods", "-l", "app=web", "-o", all], minute, |o| o.split_whitespace().count() == 1)?;
    let described = c.kube(&["describe", "rs", "web"])?;
    assert!(described.contains("SuccessfulCreate") && described.contains("SuccessfulDelete"), "{described}");

    info!("garbage collection: orphaned pods stay and are adopted again; a deleted owner's pods go");
    let kept =
        c.kube_until(&["get", "pods", "-l", "app=web", "-o", running], minute, |o| o.split_whitespace().count() == 1)?;
    c.kube(&["delete", "rs", "web", "--cascade=orphan"])?;
    let owners = ["get", "pod", kept.trim(), "-o", "jsonpath={.metadata.ownerReferences}"];
    c.kube_until(&owners, minute, |o| o.is_empty() || o == "[]")?;
    c.kube_stdin(&["apply", "-f", "-"], REPLICASET)?;
    let names =
        c.kube_until(&["get", "pods", "-l", "app=web", "-o", running], minute, |o| o.split_whitespace().count() == 3)?;
    assert!(names.split_whitespace().any(|n| n == kept.trim()), "the orphan was adopted: {names}");
    c.kube(&["delete", "rs", "web", "--wait=false"])?;
    c.kube_until(&["get", "pods", "-l", "app=web", "-o", all], minute, |o| o.trim().is_empty())?;

    info!("kill -9 the leader: the new leader's scheduler places the next pod");
    let leader = c.leader()?;
    c.kill(&leader.name)?;
    let killed = Instant::now();
    let index: usize = leader.name.trim_start_matches('s').parse::<usize>()? - 1;
    let other = c.api_url((index + 1) % 3);
    let create = || c.kube(&["--server", &other, "run", "after-kill", "--image=busybox", "--", "sleep", "3600"]);
    if create().is_err() {
        std::thread::sleep(Duration::from_secs(2));
        create()?;
    }
    let args = ["--server", other.as_str(), "get", "pod", "after-kill", "-o", "jsonpath={.spec.nodeName}"];
    c.kube_until(&args, minute, |o| o == "a1")?;
    info!(took = ?killed.elapsed(), "placed by the new leader");
    let bindings = c.kube(&[
        "--server",
        &other,
        "get",
        "pods",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.spec.nodeName} {end}",
    ])?;
    assert!(bindings.contains("free=a1") && bindings.contains("after-kill=a1"), "{bindings}");
    Ok(())
}
