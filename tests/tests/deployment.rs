//! The controllers on a 3-server cluster with the real kubectl and containerd: the seed's
//! auto-healing (three nginx pods, one deleted and replaced, seen by `kubectl get pods -w`);
//! `kubectl set image` rolling within maxSurge and maxUnavailable at every moment a watch
//! sees; `rollout history` and `rollout undo`; Endpoints and EndpointSlices of an exposed
//! Deployment; the seed's volume steps (PV binding, `Hello Students`); scaling to 10, 0 and
//! back; a rollout that survives `kill -9` of the leader with no extra pods; and a lost
//! node's pods evicted and replaced on another.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use corral_e2e::{Cluster, init_tracing};
use tracing::info;

const BASE_PORT: u16 = 25500;
const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/seed/deployment.yml");
const RUNNING: &str = "jsonpath={range .items[?(@.status.phase==\"Running\")]}{.metadata.name} {end}";
const ALL: &str = "jsonpath={range .items[*]}{.metadata.name} {end}";

/// What a `kubectl get pods -w` saw: every line, and the extremes of the pods alive (not
/// terminating) and of those also Ready, counted after each event.
#[derive(Default)]
struct Seen {
    lines: Vec<String>,
    pods: BTreeMap<String, bool>,
    max_alive: usize,
    /// The fewest Ready pods once `floor_from` Ready pods had been seen.
    min_ready: Option<usize>,
}

/// `kubectl get pods -w` on one server, in the background.
struct PodWatch {
    child: Child,
    seen: Arc<Mutex<Seen>>,
}

impl PodWatch {
    fn start(c: &Cluster, server: &str, selector: &str, floor_from: usize) -> Result<PodWatch> {
        let template = "jsonpath={.type}|{.object.metadata.name}|{.object.metadata.deletionTimestamp}|\
                        {.object.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}";
        let mut child = c
            .kubectl()
            .args(["--server", server, "get", "pods", "-w", "-l", selector, "--output-watch-events", "-o", template])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child.stdout.take().context("kubectl's stdout")?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut seen = s.lock().unwrap();
                let fields: Vec<&str> = line.split('|').collect();
                if let [kind, name, deleting, ready] = fields[..] {
                    if kind == "DELETED" {
                        seen.pods.remove(name);
                    } else if deleting.is_empty() {
                        seen.pods.insert(name.to_string(), ready == "True");
                    } else {
                        seen.pods.remove(name);
                    }
                    let alive = seen.pods.len();
                    let ready = seen.pods.values().filter(|r| **r).count();
                    seen.max_alive = seen.max_alive.max(alive);
                    if seen.min_ready.is_some() || ready >= floor_from {
                        seen.min_ready = Some(seen.min_ready.map_or(ready, |m| m.min(ready)));
                    }
                }
                seen.lines.push(line);
            }
        });
        Ok(PodWatch { child, seen })
    }

    /// Stops the watch; what it saw.
    fn stop(mut self) -> Seen {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

#[test]
fn deployments_heal_roll_back_scale_and_survive_the_leaders_death() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, BASE_PORT, &["--agents", "1", "--dedicated-servers", "--cluster-cidr", "10.248.0.0/16"])?;
    let minute = Duration::from_secs(60);
    let first = c.api_url(0);

    info!("the seed: three nginx pods named after the deployment and its template hash");
    c.kube(&["apply", "-f", SEED])?;
    let names = c.kube_until(&["get", "pods", "-l", "app=myapp", "-o", RUNNING], minute, |o| words(o).len() == 3)?;
    let hash =
        c.kube(&["get", "rs", "-l", "app=myapp", "-o", "jsonpath={.items[0].metadata.labels.pod-template-hash}"])?;
    for name in words(&names) {
        let suffix = name.strip_prefix(&format!("my-deployment-{hash}-")).context(name.to_string())?;
        assert_eq!(suffix.len(), 5, "{name}");
    }
    let rollout = c.kube(&["rollout", "status", "deployment/my-deployment", "--timeout=60s"])?;
    assert!(rollout.contains("successfully rolled out"), "{rollout}");

    info!("auto-healing: a deleted pod is replaced, and kubectl get pods -w shows it");
    let watch = PodWatch::start(&c, &first, "app=myapp", 3)?;
    let victim = words(&names)[0].to_string();
    c.kube(&["delete", "pod", &victim, "--wait=false"])?;
    let healed = Instant::now();
    let after = c.kube_until(&["get", "pods", "-l", "app=myapp", "-o", RUNNING], minute, |o| {
        words(o).len() == 3 && !words(o).contains(&victim.as_str())
    })?;
    info!(took = ?healed.elapsed(), "replacement running");
    let replacement = words(&after).into_iter().find(|n| !words(&names).contains(n)).context("a new pod")?.to_string();
    std::thread::sleep(Duration::from_millis(500));
    let seen = watch.stop();
    assert!(seen.lines.iter().any(|l| l.contains(&replacement)), "the watch shows {replacement}: {:?}", seen.lines);

    info!("kubectl set image rolls within maxSurge 1 and maxUnavailable 0 (25% of 3)");
    let watch = PodWatch::start(&c, &first, "app=myapp", 3)?;
    c.kube(&["set", "image", "deployment/my-deployment", "myapp-container=nginx:1.25"])?;
    c.kube(&["rollout", "status", "deployment/my-deployment", "--timeout=120s"])?;
    c.kube_until(&["get", "pods", "-l", "app=myapp", "-o", ALL], minute, |o| words(o).len() == 3)?;
    let seen = watch.stop();
    info!(max_alive = seen.max_alive, min_ready = ?seen.min_ready, events = seen.lines.len(), "rollout seen");
    assert!(seen.max_alive <= 4, "more than 3 + 1 pods at once: {:?}", seen.lines);
    assert_eq!(seen.min_ready, Some(3), "fewer than 3 - 0 ready pods at some moment: {:?}", seen.lines);
    let images = "jsonpath={range .items[*]}{.spec.containers[0].image} {end}";
    let now =
        c.kube_until(&["get", "pods", "-l", "app=myapp", "-o", images], minute, |o| words(o) == ["nginx:1.25"; 3])?;
    info!(%now, "every pod runs the new image");

    info!("rollout history lists the revisions; undo brings the old template back as revision 3");
    let history = c.kube(&["rollout", "history", "deployment/my-deployment"])?;
    let revisions: Vec<&str> = history.lines().skip(2).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(revisions, ["1", "2"], "{history}");
    c.kube(&["rollout", "undo", "deployment/my-deployment"])?;
    c.kube(&["rollout", "status", "deployment/my-deployment", "--timeout=120s"])?;
    c.kube_until(&["get", "pods", "-l", "app=myapp", "-o", images], minute, |o| words(o) == ["nginx:latest"; 3])?;
    let history = c.kube(&["rollout", "history", "deployment/my-deployment"])?;
    let revisions: Vec<&str> = history.lines().skip(2).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(revisions, ["2", "3"], "{history}");
    let sets = c.kube(&["get", "rs", "-l", "app=myapp", "-o", ALL])?;
    assert_eq!(words(&sets).len(), 2, "the first ReplicaSet came back rather than a third: {sets}");

    info!("kubectl expose: Endpoints and an EndpointSlice list the three ready pods, and follow a deletion");
    c.kube(&["expose", "deployment", "my-deployment", "--port=80"])?;
    let addresses = "jsonpath={.subsets[*].addresses[*].ip}";
    let ips = c.kube_until(&["get", "endpoints", "my-deployment", "-o", addresses], minute, |o| words(o).len() == 3)?;
    let slice = [
        "get",
        "endpointslices",
        "-l",
        "kubernetes.io/service-name=my-deployment",
        "-o",
        "jsonpath={.items[*].endpoints[*].addresses[0]}",
    ];
    c.kube_until(&slice, minute, |o| {
        let mut a = words(o);
        let mut b = words(&ips);
        a.sort();
        b.sort();
        a == b
    })?;
    let pod_ips = c.kube(&["get", "pods", "-l", "app=myapp", "-o", "jsonpath={.items[*].status.podIP}"])?;
    let gone = c.kube(&["get", "pods", "-l", "app=myapp", "-o", "jsonpath={.items[0].metadata.name}"])?;
    let gone_ip = c.kube(&["get", "pod", &gone, "-o", "jsonpath={.status.podIP}"])?;
    assert!(words(&pod_ips).contains(&gone_ip.as_str()), "{pod_ips} has {gone_ip}");
    c.kube(&["delete", "pod", &gone, "--wait=false"])?;
    c.kube_until(&["get", "endpoints", "my-deployment", "-o", addresses], minute, |o| {
        !words(o).contains(&gone_ip.as_str())
    })?;
    c.kube_until(&["get", "endpoints", "my-deployment", "-o", addresses], minute, |o| words(o).len() == 3)?;

    info!("the seed's volume steps: the claim binds, pod1 writes, pod2 reads Hello Students");
    let _ = std::fs::remove_file("/data/demo/file.txt");
    let seed = |name: &str| format!("{}/fixtures/seed/{name}", env!("CARGO_MANIFEST_DIR"));
    c.kube(&["apply", "-f", &seed("pv-pvc.yml")])?;
    c.kube_until(&["get", "pvc", "pvc-demo", "-o", "jsonpath={.status.phase} {.spec.volumeName}"], minute, |o| {
        o == "Bound pv-demo"
    })?;
    c.kube_until(&["get", "pv", "pv-demo", "-o", "jsonpath={.status.phase}"], minute, |o| o == "Bound")?;
    c.kube(&["apply", "-f", &seed("pod1.yml")])?;
    c.kube_until(&["get", "pod", "pod1", "-o", "jsonpath={.status.phase}"], minute, |o| o == "Succeeded")?;
    c.kube(&["delete", "pod", "pod1"])?;
    c.kube(&["apply", "-f", &seed("pod2.yml")])?;
    c.kube_until(&["get", "pod", "pod2", "-o", "jsonpath={.status.phase}"], minute, |o| o == "Running")?;
    let said = c.kube_until(&["logs", "pod2"], minute, |o| !o.trim().is_empty())?;
    assert_eq!(said.trim(), "Hello Students");
    c.kube(&["delete", "pod", "pod2", "--wait=false"])?;
    let _ = std::fs::remove_file("/data/demo/file.txt");

    info!("scale to 10, to 0, and back to 3");
    for replicas in [10, 0, 3] {
        c.kube(&["scale", "deployment/my-deployment", &format!("--replicas={replicas}")])?;
        let ready = "jsonpath={.status.readyReplicas}/{.status.replicas}";
        // Zero counts are left out of a status, as Kubernetes' omitempty does.
        let want = if replicas == 0 { "/".to_string() } else { format!("{replicas}/{replicas}") };
        c.kube_until(&["get", "deployment", "my-deployment", "-o", ready], minute * 2, |o| o == want)?;
        c.kube_until(&["get", "pods", "-l", "app=myapp", "-o", ALL], minute, |o| words(o).len() == replicas)?;
    }

    info!("kill -9 the leader in the middle of a rollout: it completes on the new leader, no extra pods");
    let leader = c.leader()?;
    let index: usize = leader.name.trim_start_matches('s').parse::<usize>()? - 1;
    let other = c.api_url((index + 1) % 3);
    let watch = PodWatch::start(&c, &other, "app=myapp", 3)?;
    c.kube(&["--server", &other, "set", "image", "deployment/my-deployment", "myapp-container=nginx:1.27"])?;
    let updated =
        ["--server", other.as_str(), "get", "deployment", "my-deployment", "-o", "jsonpath={.status.updatedReplicas}"];
    c.kube_until(&updated, minute, |o| o.parse::<u32>().is_ok_and(|n| n >= 1))?;
    c.kill(&leader.name)?;
    let killed = Instant::now();
    let status = ["--server", other.as_str(), "rollout", "status", "deployment/my-deployment", "--timeout=30s"];
    let mut done = false;
    for _ in 0..6 {
        if c.kube(&status).is_ok_and(|o| o.contains("successfully rolled out")) {
            done = true;
            break;
        }
    }
    assert!(done, "the rollout did not complete after the leader died\n{}", c.logs());
    info!(took = ?killed.elapsed(), "rollout completed on the new leader");
    let pods = ["--server", other.as_str(), "get", "pods", "-l", "app=myapp", "-o", images];
    c.kube_until(&pods, minute, |o| words(o) == ["nginx:1.27"; 3])?;
    let seen = watch.stop();
    assert!(seen.max_alive <= 4, "more than 3 + 1 pods at once across the failover: {:?}", seen.lines);
    let sizes = c.kube(&[
        "--server",
        &other,
        "get",
        "rs",
        "-l",
        "app=myapp",
        "-o",
        "jsonpath={range .items[*]}{.spec.replicas} {end}",
    ])?;
    let mut sizes: Vec<u32> = words(&sizes).iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    sizes.sort();
    assert_eq!(sizes.iter().sum::<u32>(), 3, "{sizes:?}");
    assert_eq!(sizes.last(), Some(&3), "one ReplicaSet holds every pod: {sizes:?}");
    Ok(())
}

const SPREAD: &str = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: spread}
spec:
  replicas: 4
  selector: {matchLabels: {app: spread}}
  template:
    metadata: {labels: {app: spread}}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{name: main, image: busybox, command: [sleep, '3600']}]
";

fn placement(c: &Cluster) -> Result<Vec<(String, String)>> {
    let out = c.kube(&[
        "get",
        "pods",
        "-l",
        "app=spread",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.spec.nodeName}={.metadata.deletionTimestamp} {end}",
    ])?;
    Ok(words(&out)
        .iter()
        .filter(|w| w.contains('='))
        .filter_map(|w| {
            let mut parts = w.splitn(3, '=');
            let (name, node, deleting) = (parts.next()?, parts.next()?, parts.next().unwrap_or_default());
            deleting.is_empty().then(|| (name.to_string(), node.to_string()))
        })
        .collect())
}

#[test]
fn a_lost_node_goes_not_ready_and_its_pods_are_replaced_elsewhere() -> Result<()> {
    init_tracing();
    let flags = [
        "--agents",
        "2",
        "--dedicated-servers",
        "--cluster-cidr",
        "10.247.0.0/16",
        "--node-monitor-grace-period",
        "10s",
        "--default-toleration-seconds",
        "10",
    ];
    let c = Cluster::up(3, BASE_PORT + 100, &flags)?;
    let minute = Duration::from_secs(60);

    info!("four replicas spread over both nodes, each tolerating a lost node for 10 s");
    c.kube_stdin(&["apply", "-f", "-"], SPREAD)?;
    c.kube_until(&["get", "deployment", "spread", "-o", "jsonpath={.status.readyReplicas}"], minute, |o| o == "4")?;
    let before = placement(&c)?;
    let on_a2: Vec<String> = before.iter().filter(|(_, n)| n == "a2").map(|(p, _)| p.clone()).collect();
    assert!(!on_a2.is_empty() && on_a2.len() < 4, "spread over both nodes: {before:?}");
    let tolerations = c.kube(&["get", "pod", &on_a2[0], "-o", "jsonpath={.spec.tolerations[*].key}"])?;
    assert!(tolerations.contains("node.kubernetes.io/unreachable"), "{tolerations}");

    info!("kill -9 agent a2: NotReady after the grace period, tainted unreachable");
    let agent = c.agent_pid("a2")?;
    unsafe { libc::kill(agent as i32, libc::SIGKILL) };
    let lost = Instant::now();
    let ready = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
    c.kube_until(&["get", "node", "a2", "-o", ready], minute, |o| o == "Unknown")?;
    info!(after = ?lost.elapsed(), "a2 is NotReady");
    let nodes = c.kube(&["get", "nodes"])?;
    assert!(nodes.lines().any(|l| l.starts_with("a2") && l.contains("NotReady")), "{nodes}");
    c.kube_until(&["get", "node", "a2", "-o", "jsonpath={.spec.taints[*].key}"], minute, |o| {
        o.contains("node.kubernetes.io/unreachable")
    })?;
    let pod_ready = ["get", "pod", on_a2[0].as_str(), "-o", ready];
    c.kube_until(&pod_ready, minute, |o| o == "False")?;

    info!("after the toleration its pods are evicted and replaced on a1");
    c.kube_until(&["get", "deployment", "spread", "-o", "jsonpath={.status.readyReplicas}"], minute * 2, |o| o == "4")?;
    let after = placement(&c)?;
    info!(after = ?lost.elapsed(), ?after, "replaced");
    assert_eq!(after.len(), 4, "{after:?}");
    assert!(after.iter().all(|(_, n)| n == "a1"), "every live pod on a1: {after:?}");
    let described = c.kube(&["describe", "pod", &on_a2[0]])?;
    assert!(described.contains("TaintManagerEviction"), "{described}");

    info!("a2 comes back: Ready, untainted, and the evicted pods finish terminating");
    c.up_again(3, &flags)?;
    c.kube_until(&["get", "node", "a2", "-o", ready], minute, |o| o == "True")?;
    c.kube_until(&["get", "node", "a2", "-o", "jsonpath={.spec.taints}"], minute, |o| o.is_empty())?;
    c.kube_until(&["get", "pods", "-l", "app=spread", "-o", ALL], minute, |o| words(o).len() == 4)?;
    Ok(())
}
