//! The Kubernetes side of a chaos run: a workload of deployments and services sent to
//! whichever API server answers, what the nodes run before and after all servers go down,
//! and the store's own record of the run, read back for the control-plane checkers
//! (`corral_chaos::kube`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Result, bail};
use corral_chaos::kube::{Change, ControlPlaneLog};
use corral_proto::etcdserverpb::kv_client::KvClient;
use corral_proto::etcdserverpb::watch_client::WatchClient;
use corral_proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest, WatchRequest, watch_request};
use corral_proto::mvccpb::event::EventType;
use hyper::Method;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::kube::Client;

/// The namespace the workload works in.
const NAMESPACE: &str = "chaos";
/// Deployments alive at once, and replicas each: the nodes are two small namespaces.
const MAX_DEPLOYMENTS: usize = 4;
const MAX_REPLICAS: i64 = 3;
/// The resources the checkers replay.
const JUDGED: [&str; 5] = ["pods", "replicasets", "deployments", "services", "nodes"];

const MERGE_PATCH: &str = "application/merge-patch+json";
const JSON: &str = "application/json";

/// The Kubernetes API of a local cluster, any server that answers.
pub struct Kube {
    pki: PathBuf,
    urls: Vec<String>,
    clients: Mutex<Vec<Option<Client>>>,
    /// Where the next request starts: the server that answered last.
    at: AtomicU64,
    /// Requests answered (2xx) and not (after every server was tried).
    pub answered: AtomicU64,
    pub failed: AtomicU64,
    /// The running pods noted before all servers went down.
    before: Mutex<Vec<Value>>,
    /// The workload holds still while pods are noted before an outage and judged after it.
    paused: AtomicBool,
    /// When the servers were last started again.
    pub returned: std::sync::Mutex<Option<(Instant, SystemTime)>>,
}

impl Kube {
    pub fn new(pki: PathBuf, urls: Vec<String>) -> Kube {
        let clients = Mutex::new(urls.iter().map(|_| None).collect());
        Kube {
            pki,
            urls,
            clients,
            at: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            before: Mutex::new(Vec::new()),
            paused: AtomicBool::new(false),
            returned: std::sync::Mutex::new(None),
        }
    }

    /// Sends a request to the servers in turn until one answers with something other than
    /// "unavailable"; its status and body.
    async fn call(&self, method: Method, path: &str, body: Option<&Value>, ct: &str) -> Result<(u16, Value)> {
        let n = self.urls.len();
        let first = self.at.load(Ordering::Relaxed) as usize;
        let mut last = String::new();
        for i in (0..n).map(|k| (first + k) % n) {
            let client = {
                let mut clients = self.clients.lock().await;
                if clients[i].is_none() {
                    let connect = Client::connect(&self.pki, &self.urls[i], 1);
                    clients[i] = tokio::time::timeout(Duration::from_secs(2), connect).await.ok().and_then(Result::ok);
                }
                clients[i].clone()
            };
            let Some(client) = client else {
                last = format!("{}: unreachable", self.urls[i]);
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(10), client.call(method.clone(), path, body, ct)).await {
                Ok(Ok((status, raw))) if status.as_u16() != 503 && status.as_u16() != 504 => {
                    self.at.store(i as u64, Ordering::Relaxed);
                    return Ok((status.as_u16(), serde_json::from_slice(&raw).unwrap_or(Value::Null)));
                }
                Ok(Ok((status, raw))) => last = format!("{status}: {}", String::from_utf8_lossy(&raw)),
                Ok(Err(e)) => {
                    last = format!("{e:#}");
                    self.clients.lock().await[i] = None;
                }
                Err(_) => {
                    last = "no answer in 10 s".into();
                    self.clients.lock().await[i] = None;
                }
            }
        }
        bail!("{method} {path}: no server answered: {last}")
    }

    /// A request of the workload: counted as answered or not.
    async fn act(&self, method: Method, path: &str, body: Option<&Value>, ct: &str) -> Option<Value> {
        match self.call(method, path, body, ct).await {
            Ok((status, value)) if (200..300).contains(&status) => {
                self.answered.fetch_add(1, Ordering::Relaxed);
                Some(value)
            }
            Ok((status, value)) => {
                debug!(%status, answer = %value, "kubernetes request refused");
                self.failed.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => {
                debug!(error = %e, "kubernetes request unanswered");
                self.failed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    async fn list(&self, path: &str) -> Result<Vec<Value>> {
        match self.call(Method::GET, path, None, JSON).await? {
            (200, list) => Ok(list["items"].as_array().cloned().unwrap_or_default()),
            (status, body) => bail!("GET {path}: {status}: {body}"),
        }
    }

    /// Creates the workload's namespace (once).
    pub async fn prepare(&self) -> Result<()> {
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}});
        match self.call(Method::POST, "/api/v1/namespaces", Some(&ns), JSON).await? {
            (201 | 409, _) => Ok(()),
            (status, body) => bail!("creating namespace {NAMESPACE}: {status}: {body}"),
        }
    }

    /// Creates, scales, rolls and deletes deployments and exposes them, one step every
    /// 300-800 ms, until `stop`; bounded by 100,000 steps.
    pub async fn run_workload(self: Arc<Self>, seed: u64, stop: Arc<AtomicBool>) {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x6b75_6265);
        let mut live: Vec<(String, bool)> = Vec::new(); // (name, has a service)
        let apps = format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments");
        let services = format!("/api/v1/namespaces/{NAMESPACE}/services");
        for step in 0..100_000u64 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..800))).await;
            if self.paused.load(Ordering::Relaxed) {
                continue;
            }
            let roll = rng.random_range(0.0..1.0);
            if live.len() < 2 || (live.len() < MAX_DEPLOYMENTS && roll < 0.15) {
                let name = format!("d{step}");
                let replicas = rng.random_range(1..=MAX_REPLICAS);
                if self.act(Method::POST, &apps, Some(&deployment(&name, replicas)), JSON).await.is_some() {
                    // Exposed at once: every create takes a cluster IP and a node port.
                    let exposed = self.act(Method::POST, &services, Some(&node_port(&name)), JSON).await.is_some();
                    live.push((name, exposed));
                }
                continue;
            }
            let i = rng.random_range(0..live.len());
            let path = format!("{apps}/{}", live[i].0);
            match roll {
                r if r < 0.45 => {
                    let patch = json!({"spec": {"replicas": rng.random_range(1..=MAX_REPLICAS)}});
                    self.act(Method::PATCH, &path, Some(&patch), MERGE_PATCH).await;
                }
                r if r < 0.75 => {
                    let patch =
                        json!({"spec": {"template": {"metadata": {"annotations": {"chaos/step": step.to_string()}}}}});
                    self.act(Method::PATCH, &path, Some(&patch), MERGE_PATCH).await;
                }
                r if r < 0.9 && !live[i].1 => {
                    let name = live[i].0.clone();
                    if self.act(Method::POST, &services, Some(&node_port(&name)), JSON).await.is_some() {
                        live[i].1 = true;
                    }
                }
                _ if live.len() > 2 => {
                    let (name, exposed) = live.swap_remove(i);
                    self.act(Method::DELETE, &path, None, JSON).await;
                    if exposed {
                        self.act(Method::DELETE, &format!("{services}/{name}"), None, JSON).await;
                    }
                }
                _ => {}
            }
        }
    }

    /// Waits up to `bound` until every deployment has its replicas updated and available;
    /// how long it took, or the deployments still unsettled at the end, with their status.
    pub async fn settle(&self, bound: Duration) -> Result<Duration, String> {
        let began = Instant::now();
        let path = format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments");
        let mut unsettled = "no list of deployments answered".to_string();
        while began.elapsed() < bound {
            match self.list(&path).await {
                Ok(list) => {
                    let behind: Vec<String> = list.iter().filter_map(unsettled_status).collect();
                    if behind.is_empty() {
                        return Ok(began.elapsed());
                    }
                    unsettled = behind.join("; ");
                }
                Err(e) => unsettled = format!("listing deployments: {e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(unsettled)
    }

    /// Holds the workload still and notes the running pods, once the deployments have
    /// settled (up to 90 s).
    pub async fn note_pods(&self) -> Result<()> {
        self.paused.store(true, Ordering::Relaxed);
        if let Err(unsettled) = self.settle(Duration::from_secs(90)).await {
            warn!(%unsettled, "the deployments did not settle before the outage: noting the pods as they are");
        }
        let pods = self.list(&format!("/api/v1/namespaces/{NAMESPACE}/pods")).await?;
        info!(pods = pods.len(), "pods noted before the outage");
        *self.before.lock().await = pods;
        Ok(())
    }

    /// After all servers went down and came back: how long until every node was Ready with
    /// its Lease renewed since (up to `bound`), and the pods then.
    pub async fn judge_return(&self, bound: Duration) -> Vec<corral_chaos::checks::Check> {
        let (since, wall) = self.returned.lock().expect("returned lock").unwrap_or((Instant::now(), SystemTime::now()));
        let mut ready_after = None;
        let mut count = 0;
        while since.elapsed() < bound {
            if let (Ok(nodes), Ok(leases)) = (
                self.list("/api/v1/nodes").await,
                self.list("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases").await,
            ) {
                count = nodes.len();
                if !nodes.is_empty() && nodes.iter().all(|n| node_back(n, &leases, wall)) {
                    ready_after = Some(since.elapsed().as_secs_f64());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let after = self.list(&format!("/api/v1/namespaces/{NAMESPACE}/pods")).await.unwrap_or_default();
        let before = self.before.lock().await;
        self.paused.store(false, Ordering::Relaxed);
        vec![
            corral_chaos::kube::nodes_ready(ready_after, count, bound.as_secs_f64()),
            corral_chaos::kube::pods_undisturbed(&before, &after),
        ]
    }
}

/// Ready, untainted, and its Lease renewed after `since`.
fn node_back(node: &Value, leases: &[Value], since: SystemTime) -> bool {
    let name = node.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
    let since_secs = since.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let ready = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
    let tainted = node.pointer("/spec/taints").and_then(Value::as_array).is_some_and(|t| {
        t.iter().any(|t| {
            matches!(t["key"].as_str(), Some("node.kubernetes.io/not-ready" | "node.kubernetes.io/unreachable"))
        })
    });
    let renewed = leases.iter().any(|l| {
        l.pointer("/metadata/name").and_then(Value::as_str) == Some(name)
            && l.pointer("/spec/renewTime")
                .and_then(Value::as_str)
                .and_then(corral_api::meta::parse_rfc3339)
                .is_some_and(|t| t >= since_secs)
    });
    ready && !tainted && renewed
}

fn deployment(name: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "c", "image": corral_image::recipes::PAUSE_IMAGE, "imagePullPolicy": "Never"}]
                }
            }
        }
    })
}

fn node_port(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"type": "NodePort", "selector": {"app": name}, "ports": [{"port": 80}]}
    })
}

fn judged(key: &str) -> bool {
    key.strip_prefix("/registry/").and_then(|k| k.split('/').next()).is_some_and(|r| JUDGED.contains(&r))
}

/// The store's record of the run from `start_revision`: the judged objects as they stood
/// just before it (a range at the previous revision), then every change to them (a watch
/// until an end key this writes). `None` if no member serves it within `bound`.
pub async fn read_log(
    channels: &[Channel],
    start_revision: i64,
    seed: u64,
    bound: Duration,
) -> Option<ControlPlaneLog> {
    // Past every `/registry/<resource>/` key, inside the watched range, read by nothing.
    let end_key = format!("/registry0chaos-end-{seed}");
    for channel in channels {
        let read = async {
            let mut kv = KvClient::new(channel.clone());
            kv.put(PutRequest { key: end_key.clone().into_bytes(), value: b"end".to_vec(), ..Default::default() })
                .await
                .ok()?;
            let mut initial = Vec::new();
            for resource in JUDGED {
                let prefix = format!("/registry/{resource}/");
                let mut range_end = prefix.clone().into_bytes();
                *range_end.last_mut().expect("non-empty") += 1;
                let resp = kv
                    .range(RangeRequest {
                        key: prefix.into_bytes(),
                        range_end,
                        revision: start_revision - 1,
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner();
                for item in resp.kvs {
                    let key = String::from_utf8_lossy(&item.key).into_owned();
                    if let Ok(object) = serde_json::from_slice(&item.value) {
                        initial.push((key, object));
                    }
                }
            }
            let changes = watch_until(channel, start_revision, &end_key).await?;
            Some(ControlPlaneLog { initial, changes })
        };
        if let Ok(Some(log)) = tokio::time::timeout(bound, read).await {
            return Some(log);
        }
    }
    None
}

/// The judged changes from `start_revision` until `end_key` is seen.
async fn watch_until(channel: &Channel, start_revision: i64, end_key: &str) -> Option<Vec<Change>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"/registry/".to_vec(),
            range_end: b"/registry1".to_vec(),
            start_revision,
            ..Default::default()
        })),
    };
    tx.send(create).await.ok()?;
    let mut stream = WatchClient::new(channel.clone())
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .ok()?
        .into_inner();
    let mut changes = Vec::new();
    while let Ok(Some(resp)) = stream.message().await {
        if resp.compact_revision != 0 || resp.canceled {
            return None;
        }
        for e in resp.events {
            let Some(kv) = e.kv else { continue };
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            if key == end_key {
                return Some(changes);
            }
            if !judged(&key) {
                continue;
            }
            let object = match EventType::try_from(e.r#type) {
                Ok(EventType::Delete) => None,
                _ => serde_json::from_slice(&kv.value).ok(),
            };
            changes.push(Change { revision: kv.mod_revision, key, object });
        }
    }
    None
}

/// A deployment not yet settled (observed, every replica updated and available, no extra
/// ones), as "name: want N, generation G observed O, replicas R updated U available A";
/// None once it is settled.
fn unsettled_status(d: &Value) -> Option<String> {
    let want = d.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
    let generation = d.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
    let status = |f: &str| d.pointer(&format!("/status/{f}")).and_then(Value::as_i64).unwrap_or(0);
    let (observed, replicas) = (status("observedGeneration"), status("replicas"));
    let (updated, available) = (status("updatedReplicas"), status("availableReplicas"));
    if observed >= generation && updated == want && available == want && replicas == want {
        return None;
    }
    let name = d.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("?");
    Some(format!(
        "{name}: want {want}, generation {generation} observed {observed}, replicas {replicas} updated {updated} available {available}"
    ))
}
