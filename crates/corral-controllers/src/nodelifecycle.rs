//! The node lifecycle controller: a node whose Lease (kube-node-lease) and Ready heartbeat
//! have not moved for the grace period (40 s by default) gets its conditions set to Unknown
//! ("Kubelet stopped posting node status."), and a node not Ready gets the not-ready or
//! unreachable taints, NoSchedule and NoExecute, removed again when it is Ready. Pods on a
//! node that is not Ready are marked not Ready (so Services stop sending them traffic), and
//! pods on a node with a NoExecute taint are evicted: at once if they do not tolerate it,
//! after their tolerationSeconds (300 by default, from the API's admission) if they do.
//!
//! Time since a node was last heard of is measured on this server's monotonic clock from
//! the moment this leader saw the Lease or heartbeat change, never from the timestamps in
//! them: a new leader gives every node a full grace period, and a clock that jumps on one
//! server marks no node NotReady.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_api::events::{Involved, Recorder};
use corral_api::meta::JsonAt;
use serde_json::{Value, json};

use crate::cluster::{Cluster, ClusterError, now_seconds, pod_ready, text};
use crate::informer::{ByVersion, Informers};
use crate::scheduling::flush_events;

pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const CONDITIONS: [&str; 4] = ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"];
const EVERY: Duration = Duration::from_secs(1);

/// When this leader last saw a node show signs of life.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The Lease's renewTime and the Ready condition's heartbeat, as last seen.
    seen: (String, String),
    at: Instant,
}

/// What passes read of each node and Lease version, read once per version: most passes
/// see most of them as they were.
#[derive(Default)]
pub struct Reads {
    nodes: ByVersion<Arc<NodeRead>>,
    /// A kube-node-lease Lease's name and renewTime (None: another namespace's).
    leases: ByVersion<Option<Arc<(String, String)>>>,
}

struct NodeRead {
    name: String,
    heartbeat: String,
    /// Ready (or not yet judged), no NoExecute taint, its taints as its readiness wants:
    /// while heard from, a pass has nothing to do for it.
    steady: bool,
}

impl Reads {
    fn node(&mut self, node: &Arc<Value>) -> Arc<NodeRead> {
        self.nodes.get(node, |n| {
            let current: &[Value] = n.at("/spec/taints").and_then(Value::as_array).map_or(&[], Vec::as_slice);
            Arc::new(NodeRead {
                name: text(n, "/metadata/name").to_string(),
                heartbeat: ready(n).map(|c| text(c, "/lastHeartbeatTime")).unwrap_or_default().to_string(),
                steady: matches!(ready_status(n), "True" | "")
                    && !current.iter().any(|t| t["effect"] == "NoExecute")
                    && wanted_taints(n, "") == current,
            })
        })
    }

    /// The nodes a pass must look at: those not steady, and those not heard from for `grace`.
    pub fn judged(
        &mut self,
        nodes: &[Arc<Value>],
        probes: &HashMap<String, Probe>,
        grace: Duration,
        now: Instant,
    ) -> Vec<Arc<Value>> {
        self.nodes.forget_gone(nodes);
        let silent = |name: &str| probes.get(name).is_some_and(|p| now.duration_since(p.at) >= grace);
        nodes
            .iter()
            .filter(|n| {
                let read = self.node(n);
                !read.steady || silent(&read.name)
            })
            .cloned()
            .collect()
    }
}

/// Notes what changed since the last look; a node seen for the first time (as after a
/// change of leader) counts as heard from now.
pub fn observe(
    probes: &mut HashMap<String, Probe>,
    reads: &mut Reads,
    nodes: &[Arc<Value>],
    leases: &[Arc<Value>],
    now: Instant,
) {
    reads.leases.forget_gone(leases);
    reads.nodes.forget_gone(nodes);
    let leases: Vec<Arc<(String, String)>> = leases
        .iter()
        .filter_map(|l| {
            reads.leases.get(l, |l| {
                (text(l, "/metadata/namespace") == "kube-node-lease")
                    .then(|| Arc::new((text(l, "/metadata/name").to_string(), text(l, "/spec/renewTime").to_string())))
            })
        })
        .collect();
    let renewed: HashMap<&str, &str> = leases.iter().map(|l| (l.0.as_str(), l.1.as_str())).collect();
    let nodes: Vec<Arc<NodeRead>> = nodes.iter().map(|n| reads.node(n)).collect();
    let present: std::collections::HashSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    probes.retain(|name, _| present.contains(name.as_str()));
    for node in &nodes {
        let seen = (renewed.get(node.name.as_str()).copied().unwrap_or_default().to_string(), node.heartbeat.clone());
        match probes.get_mut(&node.name) {
            Some(p) if p.seen == seen => {}
            Some(p) => *p = Probe { seen, at: now },
            None => {
                probes.insert(node.name.clone(), Probe { seen, at: now });
            }
        }
    }
}

fn ready(node: &Value) -> Option<&Value> {
    node.at("/status/conditions").and_then(Value::as_array)?.iter().find(|c| c["type"] == "Ready")
}

/// The Ready condition's status: `True`, `False`, `Unknown`, or empty for a node that has
/// posted none yet (just registered: neither tainted nor judged until its grace runs out).
fn ready_status(node: &Value) -> &str {
    ready(node).map(|c| text(c, "/status")).unwrap_or_default()
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// The node's status with its conditions set to Unknown.
    Unknown(Value),
    /// The node with its taints as they should be.
    Taint(Value),
    /// A pod's status with Ready set to False.
    PodNotReady(Value),
    /// Deletes a pod that does not tolerate its node's NoExecute taints (any longer).
    Evict { pod: Arc<Value>, taint: String },
}

/// The taints a node's readiness calls for, from `taints` as they are (others kept).
fn wanted_taints(node: &Value, now_text: &str) -> Vec<Value> {
    let current: Vec<Value> = node.at("/spec/taints").and_then(Value::as_array).cloned().unwrap_or_default();
    let key = match ready_status(node) {
        "" => return current,
        "True" => None,
        "False" => Some(NOT_READY),
        _ => Some(UNREACHABLE),
    };
    let ours = |t: &Value| matches!(t["key"].as_str(), Some(NOT_READY | UNREACHABLE));
    let mut taints: Vec<Value> = current.iter().filter(|t| !ours(t) || t["key"].as_str() == key).cloned().collect();
    if let Some(key) = key {
        for effect in ["NoSchedule", "NoExecute"] {
            if !taints.iter().any(|t| t["key"] == key && t["effect"] == effect) {
                let mut taint = json!({"key": key, "effect": effect});
                if effect == "NoExecute" {
                    taint["timeAdded"] = json!(now_text);
                }
                taints.push(taint);
            }
        }
    }
    taints
}

/// How long a pod may stay on a node with these NoExecute taints: None for ever, Some(0)
/// not at all; the shortest of its tolerations' seconds otherwise.
pub fn tolerated_for(pod: &Value, taint: &Value) -> Option<i64> {
    let tolerations = pod.at("/spec/tolerations").and_then(Value::as_array);
    let matching: Vec<&Value> = tolerations
        .into_iter()
        .flatten()
        .filter(|t| corral_scheduler::plugins::tolerates(std::slice::from_ref(*t), taint))
        .collect();
    if matching.is_empty() {
        return Some(0);
    }
    if matching.iter().any(|t| t.get("tolerationSeconds").is_none_or(Value::is_null)) {
        return None;
    }
    matching.iter().filter_map(|t| t["tolerationSeconds"].as_i64()).min().map(|s| s.max(0))
}

/// One pass. `now` is this server's monotonic time, `wall` seconds since the epoch (for
/// the taints' timeAdded, which is what survives a change of leader).
pub fn plan(
    nodes: &[Arc<Value>],
    pods: &[Arc<Value>],
    probes: &HashMap<String, Probe>,
    grace: Duration,
    now: Instant,
    wall: i64,
) -> Vec<Action> {
    let now_text = corral_api::meta::rfc3339(wall);
    let mut actions = Vec::new();
    // Pods matter only on nodes that are not ready or carry NoExecute taints: on a healthy
    // cluster a pass reads no pod at all.
    let judged = |node: &Value| {
        let silent = probes.get(text(node, "/metadata/name")).is_some_and(|p| now.duration_since(p.at) >= grace);
        let no_execute = node
            .at("/spec/taints")
            .and_then(Value::as_array)
            .is_some_and(|t| t.iter().any(|t| t["effect"] == "NoExecute"));
        silent || no_execute || !matches!(ready_status(node), "True" | "")
    };
    let troubled: std::collections::HashSet<&str> =
        nodes.iter().filter(|n| judged(n)).map(|n| text(n, "/metadata/name")).collect();
    let mut by_node: HashMap<&str, Vec<&Arc<Value>>> = HashMap::new();
    if !troubled.is_empty() {
        for pod in pods {
            let node = text(pod, "/spec/nodeName");
            if troubled.contains(node) {
                by_node.entry(node).or_default().push(pod);
            }
        }
    }
    for node in nodes {
        let name = text(node, "/metadata/name");
        let silent = probes.get(name).is_some_and(|p| now.duration_since(p.at) >= grace);
        let current: &[Value] = node.at("/spec/taints").and_then(Value::as_array).map_or(&[], Vec::as_slice);
        let mut readiness = ready_status(node);
        if silent && readiness != "Unknown" {
            readiness = "Unknown";
            let mut conditions: Vec<Value> =
                node.at("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
            for kind in CONDITIONS {
                let heartbeat = conditions.iter().find(|c| c["type"] == kind).map(|c| c["lastHeartbeatTime"].clone());
                conditions.retain(|c| c["type"] != kind);
                conditions.push(json!({"type": kind, "status": "Unknown", "reason": "NodeStatusUnknown",
                                       "message": "Kubelet stopped posting node status.",
                                       "lastHeartbeatTime": heartbeat.unwrap_or(Value::Null),
                                       "lastTransitionTime": now_text}));
            }
            let mut unknown = (**node).clone();
            unknown["status"]["conditions"] = Value::Array(conditions);
            actions.push(Action::Unknown(unknown));
        } else {
            // Tainted once the informer shows the node's conditions as they now are.
            let taints = wanted_taints(node, &now_text);
            if taints != current {
                let mut tainted = (**node).clone();
                if taints.is_empty() {
                    tainted["spec"].as_object_mut().map(|s| s.remove("taints"));
                } else {
                    tainted["spec"]["taints"] = Value::Array(taints);
                }
                actions.push(Action::Taint(tainted));
            }
        }
        let on_node = by_node.get(name).cloned().unwrap_or_default();
        if !matches!(readiness, "True" | "") {
            for pod in &on_node {
                if pod_ready(pod) && pod.at("/metadata/deletionTimestamp").is_none() {
                    let mut marked = (***pod).clone();
                    for c in marked["status"]["conditions"].as_array_mut().into_iter().flatten() {
                        if c["type"] == "Ready" {
                            c["status"] = json!("False");
                            c["lastTransitionTime"] = json!(now_text);
                        }
                    }
                    actions.push(Action::PodNotReady(marked));
                }
            }
        }
        // Evictions follow the taints the node has, not the ones about to be written.
        for taint in current.iter().filter(|t| t["effect"] == "NoExecute") {
            let added = taint.get("timeAdded").and_then(Value::as_str).and_then(corral_api::meta::parse_rfc3339);
            for pod in on_node.iter().filter(|p| p.at("/metadata/deletionTimestamp").is_none()) {
                let due = match tolerated_for(pod, taint) {
                    None => false,
                    Some(0) => true,
                    Some(s) => added.is_some_and(|t| wall >= t + s),
                };
                if due {
                    actions.push(Action::Evict { pod: (*pod).clone(), taint: text(taint, "/key").to_string() });
                }
            }
        }
    }
    actions
}

/// Runs the controller until aborted.
pub async fn run<C: Cluster>(cluster: Arc<C>, informers: Arc<Informers>, host: String, grace: Duration) {
    let nodes = informers.get("nodes").await;
    let leases = informers.get("coordination.k8s.io/leases").await;
    let pods = informers.get("pods").await;
    let events = Arc::new(Mutex::new(Recorder::new("node-controller", &host)));
    let mut probes: HashMap<String, Probe> = HashMap::new();
    let mut reads = Reads::default();
    let mut evicted: HashMap<String, Instant> = HashMap::new();
    loop {
        let node_list = nodes.list();
        observe(&mut probes, &mut reads, &node_list, &leases.list(), Instant::now());
        // Steady nodes heard from lately call for nothing: the pass plans for the others.
        let judged = reads.judged(&node_list, &probes, grace, Instant::now());
        let actions = match judged.is_empty() {
            true => Vec::new(),
            false => plan(&judged, &pods.list(), &probes, grace, Instant::now(), now_seconds()),
        };
        // An eviction is asked for once; the informer shows the deletion soon after.
        evicted.retain(|_, at| at.elapsed() < Duration::from_secs(30));
        for action in actions {
            act(cluster.as_ref(), action, &events, &mut evicted).await;
        }
        flush_events(cluster.as_ref(), &events).await;
        tokio::time::sleep(EVERY).await;
    }
}

async fn act<C: Cluster>(
    cluster: &C,
    action: Action,
    events: &Mutex<Recorder>,
    evicted: &mut HashMap<String, Instant>,
) {
    let record = |obj: &Value, kind: &str, reason: &str, message: String| {
        let involved = Involved { api_version: "v1".into(), kind: kind.into(), ..Involved::object(obj) };
        events.lock().expect("not poisoned").record(&involved, false, reason, &message, now_seconds());
    };
    let result = match action {
        Action::Unknown(node) => {
            let name = text(&node, "/metadata/name").to_string();
            tracing::warn!(node = %name, "node stopped posting its status: conditions set to Unknown");
            record(&node, "Node", "NodeNotReady", format!("Node {name} status is now: NodeNotReady"));
            cluster.update_status("nodes", node).await.map(|_| ())
        }
        Action::Taint(node) => cluster.update("nodes", node).await.map(|_| ()),
        Action::PodNotReady(pod) => {
            record(&pod, "Pod", "NodeNotReady", "Node is not ready".into());
            cluster.update_status("pods", pod).await.map(|_| ())
        }
        Action::Evict { pod, taint } => {
            let uid = text(&pod, "/metadata/uid").to_string();
            if evicted.contains_key(&uid) {
                return;
            }
            evicted.insert(uid.clone(), Instant::now());
            let (ns, name) = (text(&pod, "/metadata/namespace"), text(&pod, "/metadata/name"));
            tracing::info!(pod = %name, namespace = %ns, %taint, "evicting a pod from a tainted node");
            record(&pod, "Pod", "TaintManagerEviction", format!("Marking for deletion Pod {ns}/{name}"));
            cluster.delete("pods", ns, name, json!({"preconditions": {"uid": uid}})).await
        }
    };
    match result {
        Ok(()) | Err(ClusterError::Conflict(_)) | Err(ClusterError::NotFound(_)) => {}
        Err(e) => tracing::warn!(error = %e, "node lifecycle write failed; trying again"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: &str, heartbeat: &str) -> Arc<Value> {
        Arc::new(json!({"metadata": {"name": name}, "spec": {},
                        "status": {"conditions": [{"type": "Ready", "status": ready, "lastHeartbeatTime": heartbeat,
                                                   "lastTransitionTime": "t0"}]}}))
    }

    fn lease(name: &str, renewed: &str) -> Arc<Value> {
        Arc::new(json!({"metadata": {"name": name, "namespace": "kube-node-lease"}, "spec": {"renewTime": renewed}}))
    }

    fn pod(name: &str, node: &str, tolerations: Value) -> Arc<Value> {
        Arc::new(json!({"metadata": {"name": name, "namespace": "default", "uid": format!("u-{name}")},
                        "spec": {"nodeName": node, "tolerations": tolerations},
                        "status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
    }

    fn default_tolerations() -> Value {
        json!([{"key": NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
               {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}])
    }

    const GRACE: Duration = Duration::from_secs(40);

    #[test]
    fn a_silent_node_goes_unknown_after_the_grace_period_and_is_tainted_unreachable() {
        let start = Instant::now();
        let mut probes = HashMap::new();
        let mut reads = Reads::default();
        let nodes = [node("a1", "True", "h1"), node("a2", "True", "h1")];
        observe(&mut probes, &mut reads, &nodes, &[lease("a1", "r1"), lease("a2", "r1")], start);
        // a2 keeps renewing its Lease; a1 falls silent.
        let later = start + Duration::from_secs(30);
        observe(&mut probes, &mut reads, &nodes, &[lease("a1", "r1"), lease("a2", "r2")], later);
        let at = start + Duration::from_secs(41);
        assert!(plan(&nodes, &[], &probes, GRACE, start + Duration::from_secs(39), 0).is_empty());
        // Steady nodes are passed over until they fall silent.
        assert!(reads.judged(&nodes, &probes, GRACE, start + Duration::from_secs(39)).is_empty());
        let judged = reads.judged(&nodes, &probes, GRACE, at);
        assert_eq!(judged.iter().map(|n| text(n, "/metadata/name")).collect::<Vec<_>>(), ["a1"]);
        let actions = plan(&nodes, &[], &probes, GRACE, at, 1_000);
        let Some(Action::Unknown(n)) = actions.first() else { panic!("{actions:?}") };
        assert_eq!(n["metadata"]["name"], "a1");
        let conditions = n["status"]["conditions"].as_array().unwrap();
        assert_eq!(conditions.len(), 4);
        assert!(conditions.iter().all(|c| c["status"] == "Unknown" && c["reason"] == "NodeStatusUnknown"));
        assert_eq!(conditions.iter().find(|c| c["type"] == "Ready").unwrap()["lastHeartbeatTime"], "h1");
        assert_eq!(actions.len(), 1, "a2 is fine: {actions:?}");
        // The next pass, with the node as written, taints it.
        let actions = plan(&[Arc::new(n.clone()), nodes[1].clone()], &[], &probes, GRACE, at, 1_000);
        let Some(Action::Taint(t)) = actions.first() else { panic!("{actions:?}") };
        let taints: Vec<(&str, &str)> = t["spec"]["taints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["key"].as_str().unwrap(), t["effect"].as_str().unwrap()))
            .collect();
        assert_eq!(taints, [(UNREACHABLE, "NoSchedule"), (UNREACHABLE, "NoExecute")]);
        assert_eq!(actions.len(), 1, "{actions:?}");
    }

    #[test]
    fn a_new_leader_gives_every_node_a_full_grace_period() {
        let start = Instant::now();
        let mut probes = HashMap::new();
        // The Lease was last renewed long ago by the wall clock: that does not count.
        let nodes = [node("a1", "True", "2000-01-01T00:00:00Z")];
        observe(&mut probes, &mut Reads::default(), &nodes, &[lease("a1", "2000-01-01T00:00:00.000000Z")], start);
        assert!(plan(&nodes, &[], &probes, GRACE, start + Duration::from_secs(39), 0).is_empty());
    }

    #[test]
    fn pods_on_a_node_that_is_not_ready_are_marked_and_evicted_after_their_toleration() {
        let mut n = (*node("a1", "Unknown", "h1")).clone();
        n["spec"]["taints"] = json!([{"key": UNREACHABLE, "effect": "NoSchedule"},
                                     {"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": "2023-11-14T22:13:20Z"}]);
        let added = 1_700_000_000;
        let nodes = [Arc::new(n)];
        let patient = pod("patient", "a1", default_tolerations());
        let stubborn = pod("stubborn", "a1", json!([{"operator": "Exists"}]));
        let bare = pod("bare", "a1", json!([]));
        let elsewhere = pod("elsewhere", "a2", json!([]));
        let pods = [patient.clone(), stubborn.clone(), bare.clone(), elsewhere];
        let probes = HashMap::new();
        let evicted = |wall: i64| -> Vec<String> {
            plan(&nodes, &pods, &probes, GRACE, Instant::now(), wall)
                .into_iter()
                .filter_map(|a| match a {
                    Action::Evict { pod, .. } => Some(text(&pod, "/metadata/name").to_string()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(evicted(added + 10), ["bare"], "no toleration: at once");
        assert_eq!(evicted(added + 300), ["patient", "bare"], "300 s later the default toleration runs out");
        let marked = plan(&nodes, &pods, &probes, GRACE, Instant::now(), added)
            .into_iter()
            .filter(|a| matches!(a, Action::PodNotReady(_)))
            .count();
        assert_eq!(marked, 3, "every pod of the node is marked not Ready");
    }

    #[test]
    fn a_node_ready_again_loses_the_taints_and_keeps_the_others() {
        let mut n = (*node("a1", "True", "h2")).clone();
        n["spec"]["taints"] =
            json!([{"key": UNREACHABLE, "effect": "NoExecute"}, {"key": "dedicated", "effect": "NoSchedule"}]);
        let actions = plan(&[Arc::new(n)], &[], &HashMap::new(), GRACE, Instant::now(), 0);
        let Some(Action::Taint(t)) = actions.first() else { panic!("{actions:?}") };
        assert_eq!(t["spec"]["taints"], json!([{"key": "dedicated", "effect": "NoSchedule"}]));
    }

    #[test]
    fn a_node_that_has_posted_no_status_yet_is_left_alone_until_its_grace_runs_out() {
        let start = Instant::now();
        let fresh = Arc::new(json!({"metadata": {"name": "a1"}, "spec": {}}));
        let pod = pod("early", "a1", json!([]));
        let mut probes = HashMap::new();
        observe(&mut probes, &mut Reads::default(), std::slice::from_ref(&fresh), &[], start);
        assert!(plan(std::slice::from_ref(&fresh), std::slice::from_ref(&pod), &probes, GRACE, start, 0).is_empty());
        let late = plan(std::slice::from_ref(&fresh), &[], &probes, GRACE, start + GRACE, 0);
        assert!(matches!(&late[..], [Action::Unknown(_)]), "{late:?}");
    }

    #[test]
    fn a_node_reporting_not_ready_is_tainted_not_ready() {
        let actions = plan(&[node("a1", "False", "h")], &[], &HashMap::new(), GRACE, Instant::now(), 0);
        let Some(Action::Taint(t)) = actions.first() else { panic!("{actions:?}") };
        assert!(t["spec"]["taints"].as_array().unwrap().iter().all(|t| t["key"] == NOT_READY));
    }
}
