//! `corral bench pods`: how long a pod takes from its creation to Running, seen by a watch,
//! on one node of a `corral up` cluster, beside the floor: the same binary calling the
//! node's containerd directly (RunPodSandbox, CreateContainer, StartContainer) for pods of
//! the same spec. Both are measured one pod at a time and as a burst of N at once; then the
//! agent's RSS with the N pods running.
//!
//! The floor's sandboxes carry no pod uid label, so the agent leaves them alone; they are
//! removed at the end.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_agent::cri::{CriClient, Runtime};
use corral_agent::spec::{self, Placement, References};
use hyper::Method;
use serde_json::{Value, json};

use crate::kube::Client;
use crate::local::ClusterRecord;

#[derive(Args, Debug)]
pub struct PodsArgs {
    /// A state directory from `corral up` with at least one agent.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Pods per phase.
    #[arg(long, default_value_t = 30)]
    pub pods: usize,
    /// The node (agent) to run them on.
    #[arg(long, default_value = "a1")]
    pub node: String,
}

const NS: &str = "bench-pods";
const JSON: &str = "application/json";
const IMAGE: &str = "busybox:1.35";
/// Longest wait for one pod (or a burst) to be Running.
const PATIENCE: Duration = Duration::from_secs(120);

fn pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": format!("floor-{name}"), "labels": {"app": "bench-pods"}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "app", "image": IMAGE, "command": ["sleep", "3600"]}]},
    })
}

/// Percentiles of durations, in milliseconds.
fn summary(d: &mut [Duration]) -> String {
    d.sort();
    let at = |q: f64| d[((d.len() as f64 * q).ceil() as usize).clamp(1, d.len()) - 1].as_secs_f64() * 1000.0;
    format!("p50 {:>6.0} ms   p99 {:>6.0} ms   max {:>6.0} ms", at(0.5), at(0.99), at(1.0))
}

/// Starts one pod straight through CRI, as the agent would with nothing else to do.
async fn floor_pod(cri: &CriClient, pod: &Value, placement: &Placement) -> Result<String> {
    let mut sandbox = spec::sandbox_config(pod, placement, 0);
    sandbox.labels.remove(spec::POD_UID);
    std::fs::create_dir_all(&sandbox.log_directory)?;
    let id = cri.run_pod_sandbox(sandbox.clone()).await?;
    let container = &pod["spec"]["containers"][0];
    let mut config = spec::container_config(pod, container, 0, false, placement, &References::default())
        .map_err(|e| anyhow::anyhow!("{}", e.0))?;
    config.labels.remove(spec::POD_UID);
    std::fs::create_dir_all(PathBuf::from(&sandbox.log_directory).join("app"))?;
    let c = cri.create_container(&id, config, sandbox).await?;
    cri.start_container(&c).await?;
    Ok(id)
}

/// Watches the bench pods; records when each is first seen Running.
async fn watch_running(client: Client, rv: String, seen: Arc<Mutex<HashMap<String, Instant>>>) -> Result<()> {
    let path = format!("/api/v1/namespaces/{NS}/pods?watch=1&resourceVersion={rv}");
    let resp = client.stream(Method::GET, &path).await?;
    Client::each_event(resp, |event| {
        if event.pointer("/object/status/phase").and_then(Value::as_str) == Some("Running") {
            let name = event.pointer("/object/metadata/name").and_then(Value::as_str).unwrap_or_default();
            seen.lock().expect("not poisoned").entry(name.to_string()).or_insert_with(Instant::now);
        }
    })
    .await
}

async fn wait_running(seen: &Mutex<HashMap<String, Instant>>, names: &[String]) -> Result<()> {
    let started = Instant::now();
    while names.iter().any(|n| !seen.lock().expect("not poisoned").contains_key(n)) {
        if started.elapsed() > PATIENCE {
            bail!("{} pods not all Running after {PATIENCE:?}: is the agent up?", names.len());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub async fn run(args: PodsArgs) -> Result<()> {
    let record = ClusterRecord::load(&args.state_dir)?
        .with_context(|| format!("no cluster in {}: start one with corral up --agents 1", args.state_dir.display()))?;
    let agent = record.agents.iter().find(|a| a.name == args.node).with_context(|| {
        format!("no agent {} in {}: corral up --agents 1 makes a1", args.node, args.state_dir.display())
    })?;
    let data = agent.data_dir(&args.state_dir);
    let cri = CriClient::new(&data.join("containerd/containerd.sock")).map_err(|e| anyhow::anyhow!("{e}"))?;
    cri.version().await.context("the node's containerd does not answer")?;
    let placement = Placement {
        cgroup_root: format!("/corral/{}", args.node),
        log_root: data.join("logs"),
        node_name: args.node.clone(),
        ..Placement::default()
    };
    let n = args.pods;
    println!("pod start on node {} ({} pods per phase, image {IMAGE})", args.node, n);

    // The floor: straight through CRI.
    let mut sandboxes = Vec::new();
    let mut one_by_one = Vec::new();
    for i in 0..n {
        let started = Instant::now();
        sandboxes.push(floor_pod(&cri, &pod(&format!("floor-seq-{i}"), &args.node), &placement).await?);
        one_by_one.push(started.elapsed());
    }
    let floor_seq = summary(&mut one_by_one);
    println!("  CRI floor, one at a time       {floor_seq}");
    let burst_start = Instant::now();
    let starts = (0..n).map(|i| {
        let (cri, placement, node) = (&cri, &placement, &args.node);
        async move {
            let id = floor_pod(cri, &pod(&format!("floor-burst-{i}"), node), placement).await?;
            Ok::<_, anyhow::Error>((id, burst_start.elapsed()))
        }
    });
    let mut burst = Vec::new();
    for r in futures::future::join_all(starts).await {
        let (id, took) = r?;
        sandboxes.push(id);
        burst.push(took);
    }
    let floor_burst = summary(&mut burst);
    println!("  CRI floor, {n} at once          {floor_burst}");
    for id in &sandboxes {
        let _ = cri.stop_pod_sandbox(id).await;
        let _ = cri.remove_pod_sandbox(id).await;
    }

    // Through Corral: created by the API, Running as a watch sees it.
    let api = &record.servers.first().context("the cluster has no server")?.api_url;
    let client = Client::connect(&args.state_dir.join("pki"), api, 4).await?;
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}});
    let _ = client.call(Method::POST, "/api/v1/namespaces", Some(&namespace), JSON).await?;
    let list: Value =
        serde_json::from_slice(&client.ok(Method::GET, &format!("/api/v1/namespaces/{NS}/pods"), None, JSON).await?)?;
    let rv = list.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or("0").to_string();
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let watcher = tokio::spawn(watch_running(client.clone(), rv, seen.clone()));
    let create = |name: String| {
        let client = client.clone();
        let mut body = pod(&name, &args.node);
        body["metadata"].as_object_mut().expect("object").remove("uid");
        async move {
            let started = Instant::now();
            client.ok(Method::POST, &format!("/api/v1/namespaces/{NS}/pods"), Some(&body), JSON).await?;
            Ok::<_, anyhow::Error>((name, started))
        }
    };
    let mut one_by_one = Vec::new();
    for i in 0..n {
        let (name, started) = create(format!("seq-{i}")).await?;
        wait_running(&seen, std::slice::from_ref(&name)).await?;
        one_by_one.push(seen.lock().expect("not poisoned")[&name] - started);
    }
    let corral_seq = summary(&mut one_by_one);
    println!("  Corral, one at a time          {corral_seq}");
    // The one-by-one pods go first, so the burst starts on an idle node as the floor's did.
    delete_all(&client, &seen).await?;
    let burst_start = Instant::now();
    let mut names = Vec::new();
    for r in futures::future::join_all((0..n).map(|i| create(format!("burst-{i}")))).await {
        names.push(r?.0);
    }
    wait_running(&seen, &names).await?;
    let mut burst: Vec<Duration> = names.iter().map(|n| seen.lock().expect("not poisoned")[n] - burst_start).collect();
    let corral_burst = summary(&mut burst);
    println!("  Corral, {n} at once             {corral_burst}");
    // Settle, then the agent's memory with the pods running.
    tokio::time::sleep(Duration::from_secs(3)).await;
    match agent.pid.and_then(rss_mib) {
        Some(rss) => println!("  agent RSS with {n} pods running: {rss:.1} MiB"),
        None => println!("  agent RSS: the agent's process is not running"),
    }
    delete_all(&client, &seen).await?;
    watcher.abort();
    Ok(())
}

/// Deletes the bench pods and waits until they are gone.
async fn delete_all(client: &Client, seen: &Mutex<HashMap<String, Instant>>) -> Result<()> {
    let path = format!("/api/v1/namespaces/{NS}/pods");
    client.ok(Method::DELETE, &path, None, JSON).await?;
    let started = Instant::now();
    loop {
        let list: Value = serde_json::from_slice(&client.ok(Method::GET, &path, None, JSON).await?)?;
        if list["items"].as_array().is_none_or(|i| i.is_empty()) {
            break;
        }
        if started.elapsed() > PATIENCE {
            bail!("bench pods still there after {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    seen.lock().expect("not poisoned").clear();
    Ok(())
}
