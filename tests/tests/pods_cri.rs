//! The agent's pod sync against a real containerd (its own root, socket and CNI bridge, started
//! by the test) with the images `corral image build` makes offline: a run-to-completion pod
//! writes through a claimed volume and logs, nginx serves on its pod IP with env from a
//! ConfigMap, a crashing container backs off, a bad image and a missing ConfigMap wait with
//! kubelet's reasons, and termination leaves nothing behind. containerd also passes the runtime
//! conformance scenario the fake runtime is held to.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use corral_agent::containerd::{self, Layout};
use corral_agent::cri::Runtime;
use corral_agent::gc::GcPolicy;
use corral_agent::worker::{Lookup, NodeConfig, Worker};
use corral_e2e::init_tracing;
use serde_json::{Value, json};
use tracing::info;

/// A bridge and subnet of this test's own, removed at the end.
const BRIDGE: &str = "corral-e2e0";
const SUBNET: &str = "10.250.7.0/24";

struct Objects(HashMap<(String, String, String), Value>);

impl Lookup for Objects {
    async fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.0.get(&(plural.to_string(), namespace.to_string(), name.to_string())).cloned()
    }
}

/// Stops the containerd this test started (by its pid) and removes its bridge.
struct Cleanup<'a>(&'a Layout);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        // Whatever the test left running (it failed midway) goes, and containerd with it.
        containerd::teardown(self.0);
        let _ = std::process::Command::new("ip").args(["link", "del", BRIDGE]).status();
    }
}

fn pod(name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
           "spec": spec, "status": {}})
}

/// Syncs the pods until `done` holds for the named pod's status, or fails after `timeout`.
async fn sync_until<R: Runtime, L: Lookup>(
    worker: &Worker<R, L>,
    pods: &[Value],
    name: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let started = Instant::now();
    let mut last = Value::Null;
    while started.elapsed() < timeout {
        let views = worker.observe().await?;
        for p in pods {
            let uid = p["metadata"]["uid"].as_str().unwrap_or_default();
            let status = worker.sync_pod(p, &views.get(uid).cloned().unwrap_or_default()).await;
            if p["metadata"]["name"] == name {
                last = status;
            }
        }
        if done(&last) {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bail!("pod {name} did not get there in {timeout:?}; last status: {last:#}")
}

fn log_of(root: &Path, pod: &str, container: &str, attempt: u32) -> String {
    let file = root.join(format!("default_{pod}_uid-{pod}")).join(container).join(format!("{attempt}.log"));
    std::fs::read_to_string(&file).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_through_containerd_with_offline_images() -> Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let layout = Layout::new(&dir.path().join("containerd"));
    let _cleanup = Cleanup(&layout);

    info!("containerd starts with the node's config, and imports the images built offline");
    let images = dir.path().join("images");
    corral_image::build_all(&corral_image::Host::default(), &images, |_, _| {}).context("building images")?;
    let cni = containerd::cni_bridge_config(BRIDGE, SUBNET, false, &dir.path().join("cni-ipam"));
    let client = containerd::ensure_running(&layout, &cni, Duration::from_secs(30)).await?;
    let imported = containerd::import_all(&layout, &images)?;
    for name in [corral_image::PAUSE_IMAGE, "docker.io/library/busybox:latest", "docker.io/library/nginx:latest"] {
        assert!(imported.iter().any(|r| r == name), "{name} imported: {imported:?}");
    }
    let version = client.version().await?;
    assert_eq!(version.runtime_name, "containerd");
    assert!(client.image_status("busybox").await?.is_some(), "short names resolve to docker.io/library");
    let conformance_logs = dir.path().join("conformance");
    std::fs::create_dir_all(&conformance_logs)?;
    corral_agent::conformance::run_in(&client, &conformance_logs.display().to_string()).await?;

    let data = dir.path().join("pv-data");
    let objects = Objects(HashMap::from([
        (("configmaps".into(), "default".into(), "settings".into()), json!({"data": {"GREETING": "hi"}})),
        (
            ("persistentvolumeclaims".into(), "default".into(), "pvc-demo".into()),
            json!({"spec": {"volumeName": "pv-demo"}, "status": {"phase": "Bound"}}),
        ),
        (
            ("persistentvolumes".into(), String::new(), "pv-demo".into()),
            json!({"spec": {"hostPath": {"path": data.display().to_string(), "type": "DirectoryOrCreate"}}}),
        ),
    ]));
    let node = NodeConfig {
        node_name: "e2e-node".into(),
        host_ip: "127.0.0.1".into(),
        cgroup_root: "/corral-e2e".into(),
        log_root: dir.path().join("logs"),
        pods_root: dir.path().join("pods"),
        cluster_dns: None,
        pinned_images: imported.clone(),
    };
    let worker = Worker::new(Arc::new(client.clone()), Arc::new(objects), node.clone());

    info!("a run-to-completion pod writes through its claim and logs what it did: Succeeded");
    let writer = pod(
        "pod1",
        json!({"restartPolicy": "Never", "containers": [{"name": "c1", "image": "busybox",
               "command": ["sh", "-c", "echo Hello Students > /data/file.txt && echo written"],
               "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
               "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "pvc-demo"}}]}),
    );
    let done = sync_until(&worker, std::slice::from_ref(&writer), "pod1", Duration::from_secs(90), |s| {
        s["phase"] == "Succeeded"
    })
    .await?;
    assert_eq!(done["containerStatuses"][0]["state"]["terminated"]["reason"], "Completed");
    assert_eq!(std::fs::read_to_string(data.join("file.txt"))?, "Hello Students\n");
    assert!(log_of(&node.log_root, "pod1", "c1", 0).contains(" stdout F written"), "CRI log format");

    info!("nginx runs with its environment and answers on its pod IP");
    let web = pod(
        "web",
        json!({"containers": [{"name": "nginx", "image": "nginx:latest", "ports": [{"containerPort": 80}],
               "envFrom": [{"configMapRef": {"name": "settings"}}],
               "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}),
    );
    let running = sync_until(&worker, std::slice::from_ref(&web), "web", Duration::from_secs(60), |s| {
        s["phase"] == "Running" && s["containerStatuses"][0]["ready"] == true
    })
    .await?;
    let ip = running["podIP"].as_str().context("a pod IP")?.to_string();
    assert!(ip.starts_with("10.250.7."), "{ip}");
    // Running (and, without a readiness probe, ready) as soon as the process starts, as with
    // kubelet; nginx listens a moment later.
    let mut answer = String::new();
    for _ in 0..50 {
        match http_get(&ip, "/hostname").await {
            Ok(a) => {
                answer = a;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("web\n"), "{answer}");
    let views = worker.observe().await?;
    let nginx = views["uid-web"].containers[0].id.clone();
    let env = client
        .exec_sync(&nginx, vec!["sh".into(), "-c".into(), "echo $GREETING $POD".into()], Duration::from_secs(10))
        .await?;
    assert_eq!(String::from_utf8_lossy(&env.stdout), "hi web\n");

    info!("a crashing container restarts, then backs off: CrashLoopBackOff");
    let crasher =
        pod("crash", json!({"containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "exit 3"]}]}));
    let backing_off = sync_until(&worker, std::slice::from_ref(&crasher), "crash", Duration::from_secs(60), |s| {
        s["containerStatuses"][0]["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    })
    .await?;
    assert!(backing_off["containerStatuses"][0]["restartCount"].as_u64() >= Some(1));
    assert_eq!(backing_off["containerStatuses"][0]["lastState"]["terminated"]["exitCode"], 3);

    info!("a missing image and a missing ConfigMap wait with kubelet's reasons");
    let bad = pod(
        "bad",
        json!({"containers": [
            {"name": "noimage", "image": "registry.invalid/nothing:1", "imagePullPolicy": "IfNotPresent"},
            {"name": "noconfig", "image": "busybox", "command": ["sleep", "3600"],
             "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}}]}]}),
    );
    let waiting = sync_until(&worker, std::slice::from_ref(&bad), "bad", Duration::from_secs(60), |s| {
        s["containerStatuses"][1]["state"]["waiting"]["reason"] == "CreateContainerConfigError"
            && s["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull"
    })
    .await?;
    assert_eq!(waiting["containerStatuses"][1]["state"]["waiting"]["message"], "configmap \"absent\" not found");
    assert_eq!(waiting["phase"], "Pending");

    info!("garbage collection keeps the runs kubectl can ask for and the images the node was given");
    let everything = GcPolicy { high_percent: 0, low_percent: 0, min_image_age: Duration::ZERO };
    assert_eq!(worker.collect_images(&everything).await?, 0, "every image is pinned or in use");
    assert!(client.image_status("nginx").await?.is_some());
    assert_eq!(worker.collect_containers().await?, 0, "a container's newest two runs stay");

    info!("termination stops every container within the grace period and removes the sandboxes");
    let started = Instant::now();
    for (uid, view) in worker.observe().await? {
        worker.terminate(&uid, &view, Duration::from_secs(5), None).await?;
    }
    assert!(started.elapsed() < Duration::from_secs(20), "nginx stops on SIGQUIT well within its grace");
    assert!(worker.observe().await?.is_empty(), "nothing left in the runtime");
    assert!(!node.pods_root.join("uid-web").exists(), "volume directories removed");
    Ok(())
}

/// A plain HTTP/1.1 GET; the whole response as text.
async fn http_get(ip: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect((ip, 80))).await??;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
