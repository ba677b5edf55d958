//! `corral bench scheduler`: the scheduler and controllers at scale, against a real cluster
//! from `corral up --agents 0`, with simulated ("hollow") nodes in this process:
//!
//! 1. N hollow nodes register through the API (a Node, its status Ready, a Lease) and renew
//!    their Leases every 10 s, as kubelets do, for the whole run.
//! 2. A watch on the benchmark's namespace sees each pod bound; a pool of hollow kubelets
//!    writes it Running (status as kubelet writes it) once bound.
//! 3. M pods are created as fast as C concurrent clients can (each selects hollow nodes, so
//!    real agents are left alone).
//!
//! Every request goes to one of the cluster's servers in turn, as clients behind a load
//! balancer would (`--server N`: all to one server). Which server is the Raft leader then
//! matters less: with every request on the leader, creates crowd out its scheduler; with
//! none, they all cross the network first.
//!
//! It prints pods created per second, pods bound per second (first to last binding, and the
//! best 5 s), create-to-bind latency, and the time until every pod is Running; then removes
//! what it made.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use clap::Args;
use hdrhistogram::Histogram;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use crate::kube::Client;

#[derive(Args, Debug)]
pub struct SchedulerArgs {
    /// A state directory from `corral up`.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Hollow nodes to register.
    #[arg(long, default_value_t = 5_000)]
    pub nodes: usize,
    /// Pods to create.
    #[arg(long, default_value_t = 50_000)]
    pub pods: usize,
    /// Concurrent creates.
    #[arg(long, default_value_t = 64)]
    pub creators: usize,
    /// Concurrent status writes of the hollow kubelets.
    #[arg(long, default_value_t = 64)]
    pub kubelets: usize,
    /// Seconds between a hollow node's Lease renewals (0: none; then run the cluster with a
    /// long --node-monitor-grace-period).
    #[arg(long, default_value_t = 10)]
    pub lease_every_s: u64,
    /// Give up waiting for every pod to run after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_s: u64,
    /// Send every request to this server (0-based index in the cluster); by default they
    /// go to each server in turn.
    #[arg(long)]
    pub server: Option<usize>,
    /// Leave the nodes and pods in place afterwards.
    #[arg(long)]
    pub keep: bool,
}

const NS: &str = "bench-scheduler";
const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";
const HOLLOW: &str = "corral.dev/hollow";

fn now_text() -> String {
    corral_api::meta::rfc3339(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64)
}

fn micro_now() -> String {
    corral_api::meta::micro_time(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default())
}

fn node_name(i: usize) -> String {
    format!("hollow-{i:05}")
}

/// Runs `work(i)` for i in 0..n, `width` at a time; stops at the first error.
async fn each<F, Fut>(n: usize, width: usize, work: F) -> Result<()>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let work = Arc::new(work);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..width.max(1) {
        let (next, work) = (next.clone(), work.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                work(i).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Sends a write; a conflict counts as done (a retry after an unknown outcome), a server
/// error or timeout is tried again up to 5 times (a busy leader is part of what is measured).
async fn expect_ok(client: &Client, method: Method, path: &str, body: &Value, ct: &str) -> Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.call(method.clone(), path, Some(body), ct).await {
            Ok((s, _)) if s.is_success() || s == StatusCode::CONFLICT => return Ok(()),
            Ok((s, _)) if s.is_server_error() && attempt < 5 => {}
            Err(_) if attempt < 5 => {}
            Ok((s, b)) => bail!("{method} {path}: {s}: {}", String::from_utf8_lossy(&b)),
            Err(e) => return Err(e.context(format!("{method} {path}"))),
        }
        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
    }
}

async fn register(client: &Client, i: usize) -> Result<()> {
    let name = node_name(i);
    let node = json!({"apiVersion": "v1", "kind": "Node",
                      "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, HOLLOW: "true"}}});
    expect_ok(client, Method::POST, "/api/v1/nodes", &node, JSON).await?;
    let now = now_text();
    let condition = |kind: &str, status: &str, reason: &str| json!({"type": kind, "status": status, "reason": reason, "lastHeartbeatTime": now, "lastTransitionTime": now});
    let resources = json!({"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "100Gi"});
    let status = json!({"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                       condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                       condition("PIDPressure", "False", "KubeletHasSufficientPID"),
                       condition("Ready", "True", "KubeletReady")],
        "addresses": [{"type": "InternalIP", "address": format!("10.{}.{}.{}", 200 + i / 65536, i / 256 % 256, i % 256)},
                      {"type": "Hostname", "address": name}],
        "nodeInfo": {"kubeletVersion": "v1.33.0-hollow", "containerRuntimeVersion": "fake://0", "osImage": "hollow",
                     "kernelVersion": "0", "architecture": "amd64", "operatingSystem": "linux"}}});
    expect_ok(client, Method::PATCH, &format!("/api/v1/nodes/{name}/status"), &status, MERGE).await?;
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": name, "namespace": "kube-node-lease"},
                       "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro_now()}});
    expect_ok(client, Method::POST, "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", &lease, JSON)
        .await
}

fn pod(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("p-{i:06}"), "labels": {"app": "bench-scheduler", "group": format!("g{}", i % 100)}},
           "spec": {"nodeSelector": {HOLLOW: "true"}, "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "app", "image": "busybox", "command": ["sleep", "3600"],
                                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}})
}

/// The status a kubelet writes for a started pod.
fn running(node: &str, i: usize) -> Value {
    let now = now_text();
    let cond = |kind: &str| json!({"type": kind, "status": "True", "lastTransitionTime": now});
    json!({"status": {
        "phase": "Running", "hostIP": "10.200.0.1", "podIP": format!("10.{}.{}.{}", 100 + i / 65536, i / 256 % 256, i % 256),
        "startTime": now,
        "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
        "containerStatuses": [{"name": "app", "ready": true, "started": true, "restartCount": 0, "image": "busybox",
                               "imageID": "", "containerID": format!("fake://{node}-{i}"),
                               "state": {"running": {"startedAt": now}}}]}})
}

/// A client per server; request `i` goes to server `i` modulo their number.
#[derive(Clone)]
struct Spread(Arc<Vec<Client>>);

impl Spread {
    fn at(&self, i: usize) -> &Client {
        &self.0[i % self.0.len()]
    }
}

/// What the watch saw, per pod index.
#[derive(Default)]
struct Seen {
    created: HashMap<usize, Instant>,
    bound: HashMap<usize, Instant>,
    running: HashMap<usize, Instant>,
}

fn index_of(name: &str) -> Option<usize> {
    name.strip_prefix("p-")?.parse().ok()
}

pub async fn run(args: SchedulerArgs) -> Result<()> {
    let (servers, url) = super::cluster_api(&args.state_dir, args.server.unwrap_or(0))?;
    let url = url.as_str();
    let client = Client::connect(&args.state_dir.join("pki"), url, 8).await?;
    let mut clients = Vec::new();
    for (k, server) in servers.iter().enumerate() {
        match (args.server, server["api_url"].as_str()) {
            (Some(_), _) => {}
            (None, Some(api)) if k > 0 => clients.push(Client::connect(&args.state_dir.join("pki"), api, 8).await?),
            _ => clients.push(client.clone()),
        }
    }
    if clients.is_empty() {
        clients.push(client.clone());
    }
    let spread = Spread(Arc::new(clients));
    let to = match args.server {
        Some(_) => url.to_string(),
        None => format!("{} servers in turn", spread.0.len()),
    };
    println!("corral bench scheduler: {to}, {} hollow nodes, {} pods", args.nodes, args.pods);
    // A previous run's namespace may still be going away.
    namespace_gone(&client).await?;
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}});
    expect_ok(&client, Method::POST, "/api/v1/namespaces", &ns, JSON).await?;

    // 1. Hollow nodes.
    let started = Instant::now();
    let c = spread.clone();
    each(args.nodes, 64, move |i| {
        let c = c.clone();
        async move { register(c.at(i), i).await }
    })
    .await?;
    println!("registered {} hollow nodes in {:.1} s", args.nodes, started.elapsed().as_secs_f64());
    let stop = Arc::new(AtomicBool::new(false));
    let renewals = tokio::spawn(renew_leases(spread.clone(), args.nodes, args.lease_every_s, stop.clone()));

    // 2. The watch and the hollow kubelets.
    let list = client.ok(Method::GET, &format!("/api/v1/namespaces/{NS}/pods?limit=1"), None, JSON).await?;
    let list: Value = serde_json::from_slice(&list)?;
    let rv = list.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or("0").to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (to_run, ready_rx) = tokio::sync::mpsc::channel::<(usize, String)>(args.pods.max(1));
    let s = seen.clone();
    let note = move |pod: &Value| {
        let Some(name) = pod.pointer("/metadata/name").and_then(Value::as_str) else { return };
        let Some(i) = index_of(name) else { return };
        let node = pod.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or_default();
        let phase = pod.pointer("/status/phase").and_then(Value::as_str).unwrap_or_default();
        let mut seen = s.lock().expect("seen");
        if !node.is_empty() && !seen.bound.contains_key(&i) {
            seen.bound.insert(i, Instant::now());
            let _ = to_run.try_send((i, node.to_string()));
        }
        if phase == "Running" {
            seen.running.entry(i).or_insert_with(Instant::now);
        }
    };
    let watcher = tokio::spawn(watch_pods(client.clone(), rv, note));
    let ready_rx = Arc::new(tokio::sync::Mutex::new(ready_rx));
    let mut kubelets = tokio::task::JoinSet::new();
    for _ in 0..args.kubelets.max(1) {
        let (spread, rx) = (spread.clone(), ready_rx.clone());
        kubelets.spawn(async move {
            loop {
                let Some((i, node)) = rx.lock().await.recv().await else { return };
                let path = format!("/api/v1/namespaces/{NS}/pods/p-{i:06}/status");
                if let Err(e) = expect_ok(spread.at(i), Method::PATCH, &path, &running(&node, i), MERGE).await {
                    eprintln!("hollow kubelet: {e}");
                }
            }
        });
    }

    // 3. The pods.
    let began = Instant::now();
    let (c, s) = (spread.clone(), seen.clone());
    let creating = tokio::spawn(each(args.pods, args.creators, move |i| {
        let (c, s) = (c.clone(), s.clone());
        async move {
            let at = Instant::now();
            expect_ok(c.at(i), Method::POST, &format!("/api/v1/namespaces/{NS}/pods"), &pod(i), JSON).await?;
            s.lock().expect("seen").created.insert(i, at);
            Ok(())
        }
    }));
    let deadline = began + Duration::from_secs(args.timeout_s);
    let mut created_at = None;
    let mut last = (0, Instant::now());
    let mut best_window = 0.0f64;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (created, bound, running) = {
            let s = seen.lock().expect("seen");
            (s.created.len(), s.bound.len(), s.running.len())
        };
        if created == args.pods && created_at.is_none() {
            created_at = Some(began.elapsed());
        }
        let rate = (bound - last.0) as f64 / last.1.elapsed().as_secs_f64();
        best_window = best_window.max(rate);
        last = (bound, Instant::now());
        println!(
            "  {:>6.1} s: {created} created, {bound} bound ({rate:.0}/s), {running} running",
            began.elapsed().as_secs_f64()
        );
        if running >= args.pods || Instant::now() > deadline || creating.is_finished() && created < args.pods {
            break;
        }
    }
    if creating.is_finished() {
        creating.await??;
    }
    stop.store(true, Ordering::Relaxed);
    watcher.abort();
    kubelets.abort_all();
    let _ = renewals.await;

    report(&seen.lock().expect("seen"), args.pods, began, created_at, best_window);
    super::print_rss(&servers);
    if !args.keep {
        cleanup(&client, args.nodes).await?;
    }
    Ok(())
}

fn report(seen: &Seen, pods: usize, began: Instant, created_at: Option<Duration>, best_window: f64) {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
    for (i, bound) in &seen.bound {
        if let Some(created) = seen.created.get(i) {
            let _ = latency.record(bound.saturating_duration_since(*created).as_micros().max(1) as u64);
        }
    }
    let first = seen.bound.values().min().copied();
    let last = seen.bound.values().max().copied();
    let span = match (first, last) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(0.001),
        _ => 0.0,
    };
    let all_running = seen.running.values().max().map(|t| t.duration_since(began).as_secs_f64());
    match created_at {
        Some(t) => {
            println!("created {pods} pods in {:.1} s: {:.0} creates/s", t.as_secs_f64(), pods as f64 / t.as_secs_f64())
        }
        None => println!("created {} of {pods} pods", seen.created.len()),
    }
    println!(
        "bound {} pods: {:.0} pods/s from the first binding to the last, best 5 s: {best_window:.0}/s",
        seen.bound.len(),
        seen.bound.len() as f64 / span.max(0.001)
    );
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "create to bound: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1000.0
    );
    let created: Vec<Instant> = seen.created.values().copied().collect();
    let bound: Vec<Instant> = seen.bound.values().copied().collect();
    for backlog in [BACKLOG / 2, BACKLOG] {
        let (secs, n) = pace_with_backlog(&created, &bound, backlog);
        if n > 0 {
            println!(
                "while at least {backlog} pods waited ({secs:.1} s): {n} bound, {:.0} pods/s",
                n as f64 / secs.max(0.001)
            );
        }
    }
    match all_running {
        Some(t) if seen.running.len() >= pods => println!("all {pods} pods Running {t:.1} s after the first create"),
        _ => println!("{} of {pods} pods Running when the bench stopped waiting", seen.running.len()),
    }
}

/// A queue of created pods this long keeps the scheduler busy whatever the creates' pace:
/// bindings counted while it lasted are the scheduler's own rate.
const BACKLOG: usize = 1_000;

/// Seconds during which at least `backlog` created pods were not yet bound, and the
/// bindings seen in that time: the scheduler's pace when it never waits for pods to come.
fn pace_with_backlog(created: &[Instant], bound: &[Instant], backlog: usize) -> (f64, usize) {
    // +1 at each create, -1 at each binding, in time order (creates first at a tie).
    let mut events: Vec<(Instant, i8)> =
        created.iter().map(|t| (*t, 1)).chain(bound.iter().map(|t| (*t, -1))).collect();
    events.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let (backlog, mut waiting, mut secs, mut bindings) = (backlog as i64, 0i64, 0.0, 0);
    for (k, &(at, change)) in events.iter().enumerate() {
        if change < 0 && waiting >= backlog {
            bindings += 1;
        }
        waiting += i64::from(change);
        if waiting >= backlog
            && let Some((next, _)) = events.get(k + 1)
        {
            secs += next.duration_since(at).as_secs_f64();
        }
    }
    (secs, bindings)
}

/// Renews every hollow node's Lease once per period, spread over it.
async fn renew_leases(clients: Spread, nodes: usize, every_s: u64, stop: Arc<AtomicBool>) {
    if every_s == 0 || nodes == 0 {
        return;
    }
    let gap = Duration::from_secs(every_s).div_f64(nodes as f64);
    let mut tick = tokio::time::interval(gap.max(Duration::from_micros(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut tasks = tokio::task::JoinSet::new();
    for i in (0..nodes).cycle() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        tick.tick().await;
        let c = clients.at(i).clone();
        tasks.spawn(async move {
            let path = format!("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{}", node_name(i));
            let _ = c.call(Method::PATCH, &path, Some(&json!({"spec": {"renewTime": micro_now()}})), MERGE).await;
        });
        while tasks.len() > 256 {
            tasks.join_next().await;
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

async fn cleanup(client: &Client, nodes: usize) -> Result<()> {
    let started = Instant::now();
    client.call(Method::DELETE, &format!("/api/v1/namespaces/{NS}"), None, JSON).await?;
    let c = client.clone();
    each(nodes, 64, move |i| {
        let c = c.clone();
        async move {
            let name = node_name(i);
            c.call(Method::DELETE, &format!("/api/v1/nodes/{name}"), None, JSON).await?;
            let lease = format!("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}");
            c.call(Method::DELETE, &lease, None, JSON).await?;
            Ok(())
        }
    })
    .await?;
    namespace_gone(client).await?;
    println!("removed the namespace, the hollow nodes and their leases in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Follows the benchmark's pods as an informer does: a watch that ends (the server drops
/// one that falls behind) is opened again from the last resourceVersion seen, and one whose
/// revision is compacted away (an ERROR event) lists the pods again. At most 1,000 watches.
async fn watch_pods(client: Client, mut rv: String, mut note: impl FnMut(&Value)) -> Result<()> {
    for _ in 0..1_000 {
        let path = format!("/api/v1/namespaces/{NS}/pods?watch=1&resourceVersion={rv}&allowWatchBookmarks=true");
        let Ok(watch) = client.stream(Method::GET, &path).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut expired = false;
        let _ = Client::each_event(watch, |event| {
            if event["type"] == "ERROR" {
                expired = true;
                return;
            }
            if let Some(v) = event.pointer("/object/metadata/resourceVersion").and_then(Value::as_str) {
                rv = v.to_string();
            }
            if event["type"] != "BOOKMARK" {
                note(&event["object"]);
            }
        })
        .await;
        if expired {
            let list = client.ok(Method::GET, &format!("/api/v1/namespaces/{NS}/pods"), None, JSON).await?;
            let list: Value = serde_json::from_slice(&list)?;
            for pod in list["items"].as_array().into_iter().flatten() {
                note(pod);
            }
            rv = list.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or("0").to_string();
        }
    }
    Ok(())
}

/// Waits until the benchmark's namespace is gone or was never there (its content is deleted
/// first), at most five minutes.
async fn namespace_gone(client: &Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (status, body) = client.call(Method::GET, &format!("/api/v1/namespaces/{NS}"), None, JSON).await?;
        let terminating = status.is_success()
            && serde_json::from_slice::<Value>(&body).is_ok_and(|n| n.pointer("/metadata/deletionTimestamp").is_some());
        if !terminating {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("namespace {NS} is still being deleted after 5 minutes; try again later");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_counts_only_the_time_a_backlog_waited() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 4 pods created at once; one bound every 100 ms from 1 s on.
        let created = vec![at(0), at(0), at(0), at(0)];
        let bound = vec![at(1000), at(1100), at(1200), at(1300)];
        // At least 2 waiting: from 0 until the third binding (1.2 s); bindings made while
        // 4, 3 and 2 waited count, the last one (1 waiting) does not.
        let (secs, n) = pace_with_backlog(&created, &bound, 2);
        assert!((secs - 1.2).abs() < 1e-6, "{secs}");
        assert_eq!(n, 3);
        // A backlog never reached counts nothing.
        assert_eq!(pace_with_backlog(&created, &bound, 5), (0.0, 0));
    }
}
