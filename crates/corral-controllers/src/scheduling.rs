//! The scheduling loop: pods with no node and the default scheduler's name are placed by
//! `corral_scheduler::Framework` on a snapshot of the nodes and the pods bound to them, then
//! bound through pods/binding (many at once). A pod that fits nowhere gets PodScheduled=False
//! with Kubernetes' message and a FailedScheduling event, and is tried again whenever a node
//! or a pod changes. Bindings made but not yet seen by the informer are assumed, so a pass
//! never counts a node's room twice.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_api::events::{Involved, Recorder};
use corral_api::meta::JsonAt;
use corral_scheduler::{Framework, NodeInfo, PodInfo, Snapshot};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::cluster::{Cluster, ClusterError, now_seconds, text};
use crate::informer::{ByVersion, Informer, Informers};

pub const SCHEDULER_NAME: &str = "default-scheduler";
/// Changes that come this close together are scheduled in one pass.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Unschedulable pods are tried again at least this often.
const RETRY_EVERY: Duration = Duration::from_secs(10);
/// An assumed binding the informer has not confirmed by then is forgotten.
const ASSUME_FOR: Duration = Duration::from_secs(30);
/// Bindings in flight at once: a whole pass's, which the store packs into a few Raft
/// entries (256 at once took four rounds of the store per pass of 1,000).
const BIND_CONCURRENCY: usize = PER_PASS;
/// How often the Event writer looks again when nothing was pending or a write failed.
const EVENTS_IDLE: Duration = Duration::from_millis(100);

/// Pods the scheduler must place: unbound, its own, alive.
pub fn pending(pod: &Value) -> bool {
    let scheduler = text(pod, "/spec/schedulerName");
    text(pod, "/spec/nodeName").is_empty()
        && (scheduler.is_empty() || scheduler == SCHEDULER_NAME)
        && pod.at("/metadata/deletionTimestamp").is_none()
        && !matches!(text(pod, "/status/phase"), "Succeeded" | "Failed")
}

/// The PersistentVolumeClaims and PersistentVolumes pods' volumes are checked against.
#[derive(Default)]
pub struct Volumes {
    pub claims: Vec<Arc<Value>>,
    pub volumes: Vec<Arc<Value>>,
}

/// What a pass needs of a pod, read once per version.
#[derive(Debug)]
pub struct PodFacts {
    pub info: Arc<PodInfo>,
    /// `pending` holds: the scheduler must place it.
    pub pending: bool,
    pub created: String,
}

/// Pods read once per version: a pass builds its snapshot from these instead of parsing
/// every pod again.
#[derive(Default)]
pub struct PodInfos(ByVersion<Arc<PodFacts>>);

impl PodInfos {
    fn get(&mut self, pod: &Arc<Value>) -> Arc<PodFacts> {
        self.0.get(pod, |pod| {
            Arc::new(PodFacts {
                info: Arc::new(PodInfo::new(pod.clone())),
                pending: pending(pod),
                created: text(pod, "/metadata/creationTimestamp").to_string(),
            })
        })
    }

    /// The pods' facts, in the same order; versions no longer listed are forgotten.
    pub fn read(&mut self, pods: &[Arc<Value>]) -> Vec<Arc<PodFacts>> {
        self.0.forget_gone(pods);
        pods.iter().map(|p| self.get(p)).collect()
    }
}

/// Nodes read once per version, without their pods: a pass starts from copies of these
/// (their labels and taints shared) instead of parsing every node again.
#[derive(Default)]
pub struct NodeInfos(ByVersion<NodeInfo>);

impl NodeInfos {
    /// The nodes' infos, read as the pass takes them (none if it needs no snapshot).
    pub fn read<'a>(&'a mut self, nodes: &'a [Arc<Value>]) -> impl Iterator<Item = NodeInfo> + 'a {
        self.0.forget_gone(nodes);
        nodes.iter().map(|n| self.0.get(n, |n| NodeInfo::new(n.clone())))
    }
}

/// Pods placed per pass at most: bindings go out while the rest wait for the next pass.
const PER_PASS: usize = 1_000;

/// What one pass decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Pending pods were left for the next pass (more than `PER_PASS`).
    pub more: bool,
    /// (pod, node) in the order decided.
    pub bind: Vec<(Arc<Value>, String)>,
    /// (pod, message).
    pub unschedulable: Vec<(Arc<Value>, String)>,
}

/// Decides a pass: the pending pods in creation order, each placed on the snapshot as it
/// was left by the ones before it; `facts` are the pods as listed (`PodInfos::read`),
/// `assumed` bindings not yet visible in them.
pub fn plan(
    framework: &Framework,
    nodes: impl IntoIterator<Item = NodeInfo>,
    facts: &[Arc<PodFacts>],
    volumes: &Volumes,
    assumed: &HashMap<String, String>,
) -> Plan {
    let mut waiting: Vec<&PodFacts> =
        facts.iter().filter(|f| f.pending && !assumed.contains_key(&f.info.uid)).map(|f| &**f).collect();
    if waiting.is_empty() {
        // Most changes are status reports of running pods: no snapshot is needed for them.
        return Plan::default();
    }
    let bound = facts.iter().filter(|f| !f.info.node_name.is_empty()).map(|f| f.info.clone());
    let mut snapshot = Snapshot::from_node_infos(nodes, bound)
        .with_volumes(volumes.claims.iter().cloned(), volumes.volumes.iter().cloned());
    for f in facts.iter().filter(|f| f.info.node_name.is_empty()) {
        if let Some(node) = assumed.get(&f.info.uid) {
            let mut info = (*f.info).clone();
            info.node_name = node.clone();
            snapshot.assume(Arc::new(info));
        }
    }
    waiting.sort_by(|a, b| {
        (&a.created, &a.info.namespace, &a.info.name).cmp(&(&b.created, &b.info.namespace, &b.info.name))
    });
    let mut plan = Plan { more: waiting.len() > PER_PASS, ..Plan::default() };
    waiting.truncate(PER_PASS);
    for f in waiting {
        let pod = &f.info.object;
        match framework.schedule(&f.info, &snapshot) {
            Ok(decision) => {
                let mut info = (*f.info).clone();
                info.node_name = decision.node.clone();
                snapshot.assume(Arc::new(info));
                plan.bind.push((pod.clone(), decision.node));
            }
            Err(u) => plan.unschedulable.push((pod.clone(), u.message)),
        }
    }
    plan
}

/// The pod with PodScheduled=False and the message, or None when it already says so.
pub fn unschedulable_status(pod: &Value, message: &str, now: &str) -> Option<Value> {
    let conditions = pod.at("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
    let current = conditions.iter().find(|c| c["type"] == "PodScheduled");
    if current.is_some_and(|c| c["status"] == "False" && c["message"] == message) {
        return None;
    }
    let mut updated = pod.clone();
    let mut kept: Vec<Value> = conditions.into_iter().filter(|c| c["type"] != "PodScheduled").collect();
    kept.push(json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                     "lastProbeTime": null, "lastTransitionTime": now}));
    updated["status"]["conditions"] = Value::Array(kept);
    if updated.at("/status/phase").is_none() {
        updated["status"]["phase"] = json!("Pending");
    }
    Some(updated)
}

/// Runs the loop until aborted.
pub async fn run<C: Cluster>(cluster: Arc<C>, informers: Arc<Informers>, host: String) {
    let nodes = informers.get("nodes").await;
    let claims = informers.get("persistentvolumeclaims").await;
    let volumes = informers.get("persistentvolumes").await;
    let pods = informers.get("pods").await;
    let events = Mutex::new(Recorder::new(SCHEDULER_NAME, &host));
    // Events are written beside the passes, never in their way: with 1,000 bindings a pass,
    // waiting for their 1,000 Scheduled Events took twice as long as the bindings themselves.
    tokio::select! {
        () = passes(cluster.as_ref(), [nodes, claims, volumes, pods], &events) => {}
        () = write_events(cluster.as_ref(), &events) => {}
    }
}

/// The scheduling passes, until aborted.
async fn passes<C: Cluster>(cluster: &C, informers: [Arc<Informer>; 4], events: &Mutex<Recorder>) {
    let [nodes, claims, volumes, pods] = informers;
    let framework = Framework::default();
    let mut assumed: HashMap<String, (String, Instant)> = HashMap::new();
    let mut infos = PodInfos::default();
    let mut node_infos = NodeInfos::default();
    loop {
        let node_change = nodes.changed();
        let volume_change = (claims.changed(), volumes.changed());
        let pod_change = pods.changed();
        let pod_list = pods.list();
        let facts = infos.read(&pod_list);
        // Forget assumptions the informer has caught up with, or that never came true.
        if !assumed.is_empty() {
            let unbound: std::collections::HashSet<&str> =
                facts.iter().filter(|f| f.info.node_name.is_empty()).map(|f| f.info.uid.as_str()).collect();
            assumed.retain(|uid, (_, at)| at.elapsed() < ASSUME_FOR && unbound.contains(uid.as_str()));
        }
        let view: HashMap<String, String> = assumed.iter().map(|(k, (n, _))| (k.clone(), n.clone())).collect();
        let started = Instant::now();
        let storage = Volumes { claims: claims.list(), volumes: volumes.list() };
        let node_list = nodes.list();
        let decided = plan(&framework, node_infos.read(&node_list), &facts, &storage, &view);
        let (to_bind, failed) = (decided.bind.len(), decided.unschedulable.len());
        let planned_ms = started.elapsed().as_millis() as u64;
        for bound in bind_all(cluster, &decided.bind, events).await {
            assumed.insert(bound.0, (bound.1, Instant::now()));
        }
        let now = corral_api::meta::rfc3339(now_seconds());
        for (pod, message) in &decided.unschedulable {
            if let Some(updated) = unschedulable_status(pod, message, &now) {
                match cluster.update_status("pods", updated).await {
                    Ok(_) | Err(ClusterError::Conflict(_)) | Err(ClusterError::NotFound(_)) => {}
                    Err(e) => tracing::warn!(pod = %text(pod, "/metadata/name"), error = %e, "writing PodScheduled"),
                }
                record(events, pod, true, "FailedScheduling", message);
            }
        }
        if to_bind + failed > 0 {
            tracing::debug!(
                bound = to_bind,
                unschedulable = failed,
                plan_ms = planned_ms,
                ms = started.elapsed().as_millis() as u64,
                "scheduling pass"
            );
        }
        if decided.more {
            // More pods wait: the next pass starts at once (its bindings are assumed).
            continue;
        }
        tokio::select! {
            _ = node_change => {}
            _ = volume_change.0 => {}
            _ = volume_change.1 => {}
            _ = pod_change => {}
            _ = tokio::time::sleep(RETRY_EVERY) => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
    }
}

fn record(events: &Mutex<Recorder>, pod: &Value, warning: bool, reason: &str, message: &str) {
    events.lock().expect("not poisoned").record(&Involved::pod(pod, ""), warning, reason, message, now_seconds());
}

/// Events written at once (the store puts many in one Raft entry).
const EVENT_CONCURRENCY: usize = 256;

/// Writes the pending Events, a bounded number at once (best effort: those that fail stay
/// pending for the next pass). Returns how many were tried and how many written.
pub async fn flush_events<C: Cluster>(cluster: &C, events: &Mutex<Recorder>) -> (usize, usize) {
    let batch = events.lock().expect("not poisoned").peek(1024);
    let tried = batch.len();
    let calls: Vec<_> = batch.into_iter().map(|event| put_event(cluster, event)).collect();
    let written = at_most(EVENT_CONCURRENCY, calls).await;
    events.lock().expect("not poisoned").written(&written);
    (tried, written.len())
}

/// Writes Events as they are recorded, until aborted.
async fn write_events<C: Cluster>(cluster: &C, events: &Mutex<Recorder>) {
    loop {
        let (tried, written) = flush_events(cluster, events).await;
        if tried == 0 || written < tried {
            tokio::time::sleep(EVENTS_IDLE).await;
        }
    }
}

async fn put_event<C: Cluster>(cluster: &C, event: Value) -> Option<Value> {
    match cluster.put_event(event.clone()).await {
        Ok(()) => Some(event),
        Err(e) => {
            tracing::debug!(error = %e, "an event was not written");
            None
        }
    }
}

/// Binds the pods, a bounded number in flight at once (the store puts many bindings in one
/// Raft entry); returns (uid, node) of those bound.
async fn bind_all<C: Cluster>(
    cluster: &C,
    binds: &[(Arc<Value>, String)],
    events: &Mutex<Recorder>,
) -> Vec<(String, String)> {
    // Collected first: an iterator's closure held across the awaits trips rustc's
    // higher-ranked lifetime check when the loop is spawned.
    let calls: Vec<_> = binds.iter().map(|(pod, node)| bind_one(cluster, events, pod, node)).collect();
    at_most(BIND_CONCURRENCY, calls).await
}

/// Runs the futures with at most `width` of them in flight; the outputs that are Some, in the
/// order they finished.
async fn at_most<T, F: Future<Output = Option<T>>>(width: usize, futures: impl IntoIterator<Item = F>) -> Vec<T> {
    let mut out = Vec::new();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    for f in futures {
        if in_flight.len() >= width
            && let Some(done) = in_flight.next().await
        {
            out.extend(done);
        }
        in_flight.push(f);
    }
    while let Some(done) = in_flight.next().await {
        out.extend(done);
    }
    out
}

async fn bind_one<C: Cluster>(
    cluster: &C,
    events: &Mutex<Recorder>,
    pod: &Value,
    node: &str,
) -> Option<(String, String)> {
    let (ns, name, uid) = (text(pod, "/metadata/namespace"), text(pod, "/metadata/name"), text(pod, "/metadata/uid"));
    match cluster.bind(pod, node).await {
        Ok(()) => {
            record(events, pod, false, "Scheduled", &format!("Successfully assigned {ns}/{name} to {node}"));
            Some((uid.to_string(), node.to_string()))
        }
        // Bound or deleted meanwhile: the informer will say.
        Err(ClusterError::Conflict(_)) | Err(ClusterError::NotFound(_)) => None,
        Err(e) => {
            tracing::warn!(pod = %name, node = %node, error = %e, "binding failed; trying again");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Arc<Value> {
        Arc::new(
            json!({"metadata": {"name": name}, "status": {"allocatable": {"cpu": "1", "memory": "1Gi", "pods": "110"}}}),
        )
    }

    fn pod(name: &str, cpu: &str, node: &str) -> Arc<Value> {
        Arc::new(json!({"metadata": {"name": name, "namespace": "default", "uid": format!("u-{name}"),
                                      "creationTimestamp": format!("2026-01-01T00:00:0{}Z", name.len() % 10)},
                        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}}))
    }

    #[test]
    fn a_pass_fills_nodes_and_reports_the_rest() {
        let f = Framework::default();
        let nodes = [node("n1"), node("n2")];
        let pods = [pod("a", "600m", ""), pod("bb", "600m", ""), pod("ccc", "600m", ""), pod("running", "100m", "n1")];
        let facts = PodInfos::default().read(&pods);
        let p = plan(&f, NodeInfos::default().read(&nodes), &facts, &Volumes::default(), &HashMap::new());
        let mut placed: Vec<&str> = p.bind.iter().map(|(_, n)| n.as_str()).collect();
        placed.sort();
        assert_eq!(placed, ["n1", "n2"], "one 600m pod per 1-cpu node");
        assert_eq!(p.unschedulable.len(), 1);
        assert_eq!(p.unschedulable[0].1, "0/2 nodes are available: 2 Insufficient cpu.");
    }

    #[test]
    fn assumed_bindings_hold_their_room() {
        let f = Framework::default();
        let pods = [pod("a", "600m", ""), pod("bb", "600m", "")];
        let assumed = HashMap::from([("u-a".to_string(), "n1".to_string())]);
        let facts = PodInfos::default().read(&pods);
        let p = plan(&f, NodeInfos::default().read(&[node("n1")]), &facts, &Volumes::default(), &assumed);
        assert!(p.bind.is_empty(), "a is assumed on n1 and not scheduled again; bb no longer fits");
        assert_eq!(p.unschedulable[0].0["metadata"]["name"], "bb");
    }

    #[test]
    fn the_unschedulable_condition_is_written_once_per_message() {
        let p = pod("a", "2", "");
        let first = unschedulable_status(&p, "0/1 nodes are available: 1 Insufficient cpu.", "t").unwrap();
        assert_eq!(first["status"]["conditions"][0]["reason"], "Unschedulable");
        assert!(unschedulable_status(&first, "0/1 nodes are available: 1 Insufficient cpu.", "t").is_none());
        assert!(unschedulable_status(&first, "0/2 nodes are available: 2 Insufficient cpu.", "t").is_some());
    }
}
