//! The ReplicaSet controller: as many active pods as `spec.replicas`, created from the
//! template (named `<rs>-<5 chars>` by generateName) and deleted worst-first (unscheduled,
//! then pending, then not ready, then the youngest); orphans matching the selector adopted,
//! owned pods that no longer match released. Expectations: after creating or deleting, a
//! ReplicaSet is not counted again until the informer shows those changes (or they time
//! out), so a slow watch never causes extra pods. `reconcile` is pure; `run` is the loop.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_api::events::{Involved, Recorder};
use corral_api::meta::JsonAt;
use serde_json::{Map, Value, json};

use crate::cluster::{Cluster, ClusterError, now_seconds, omit_zeros, pod_ready as ready, text};
use crate::informer::Informers;
use crate::scheduling::flush_events;

/// Pods created or deleted per ReplicaSet per pass, as Kubernetes' burst replicas.
pub const BURST: usize = 500;
/// Expectations not met by then are dropped (a lost watch event must not block forever).
const EXPECTATION_TTL: Duration = Duration::from_secs(60);
const DEBOUNCE: Duration = Duration::from_millis(10);
const RESYNC: Duration = Duration::from_secs(30);

/// What the controller is waiting to see after its own writes.
#[derive(Clone, Debug, Default)]
pub struct Expectations {
    /// Names of pods created and not yet seen.
    pub creates: HashSet<String>,
    /// Uids of pods deleted and still seen alive.
    pub deletes: HashSet<String>,
    pub since: Option<Instant>,
}

impl Expectations {
    /// Whether the pods seen include every creation and no deletion still to come.
    pub fn met(&self, pods: &[&Arc<Value>]) -> bool {
        let nothing = self.creates.is_empty() && self.deletes.is_empty();
        if nothing || self.since.is_some_and(|t| t.elapsed() > EXPECTATION_TTL) {
            return true;
        }
        let names: HashSet<&str> = pods.iter().map(|p| text(p, "/metadata/name")).collect();
        let alive: HashSet<&str> = pods
            .iter()
            .filter(|p| p.at("/metadata/deletionTimestamp").is_none())
            .map(|p| text(p, "/metadata/uid"))
            .collect();
        self.creates.iter().all(|n| names.contains(n.as_str()))
            && self.deletes.iter().all(|u| !alive.contains(u.as_str()))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A new pod (its full object, generateName set).
    Create(Value),
    /// Deletes a pod (name, uid).
    Delete(String, String),
    /// Updates a pod's ownerReferences (adoption or release): the pod as it should be.
    Own(Value),
    /// The ReplicaSet's new status.
    Status(Value),
}

/// The controller ownerReference's uid, if any.
pub fn controller_uid(obj: &Value) -> Option<&str> {
    obj.at("/metadata/ownerReferences")
        .and_then(Value::as_array)?
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        .and_then(|r| r.get("uid").and_then(Value::as_str))
}

fn labels(obj: &Value) -> std::collections::BTreeMap<String, String> {
    corral_api::meta::string_map(obj.at("/metadata/labels"))
}

fn owner_ref(rs: &Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": text(rs, "/metadata/name"),
           "uid": text(rs, "/metadata/uid"), "controller": true, "blockOwnerDeletion": true})
}

fn active(pod: &Value) -> bool {
    pod.at("/metadata/deletionTimestamp").is_none() && !matches!(text(pod, "/status/phase"), "Succeeded" | "Failed")
}

/// Ready for at least `min_ready` seconds at `now` (seconds since the epoch).
fn available(pod: &Value, min_ready: i64, now: i64) -> bool {
    if !ready(pod) {
        return false;
    }
    if min_ready <= 0 {
        return true;
    }
    let since = pod
        .at("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c.get("lastTransitionTime").and_then(Value::as_str))
        .and_then(corral_api::meta::parse_rfc3339);
    since.is_some_and(|t| now - t >= min_ready)
}

/// Worst first: what to delete when there are too many (Kubernetes' ActivePods ordering).
fn deletion_rank(pod: &Value) -> (bool, u8, bool, std::cmp::Reverse<i64>, std::cmp::Reverse<String>) {
    let phase = match text(pod, "/status/phase") {
        "Pending" | "" => 0,
        "Unknown" => 1,
        _ => 2,
    };
    let restarts: i64 = pod
        .at("/status/containerStatuses")
        .and_then(Value::as_array)
        .map_or(0, |cs| cs.iter().filter_map(|c| c.get("restartCount").and_then(Value::as_i64)).sum());
    (
        !text(pod, "/spec/nodeName").is_empty(),
        phase,
        ready(pod),
        std::cmp::Reverse(restarts),
        std::cmp::Reverse(text(pod, "/metadata/creationTimestamp").to_string()),
    )
}

/// A pod from the ReplicaSet's template.
pub fn new_pod(rs: &Value) -> Value {
    let template = rs.at("/spec/template").cloned().unwrap_or_else(|| json!({}));
    let mut metadata = template.get("metadata").and_then(Value::as_object).cloned().unwrap_or_else(Map::new);
    metadata.remove("name");
    metadata.insert("generateName".into(), json!(format!("{}-", text(rs, "/metadata/name"))));
    metadata.insert("namespace".into(), json!(text(rs, "/metadata/namespace")));
    metadata.insert("ownerReferences".into(), json!([owner_ref(rs)]));
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
           "spec": template.get("spec").cloned().unwrap_or_else(|| json!({}))})
}

/// What to do for one ReplicaSet, given the pods of its namespace. `expectations_met` says
/// whether earlier creations and deletions have all been seen; until then, counts are not
/// acted on. `now` is seconds since the epoch.
pub fn reconcile(rs: &Value, pods: &[&Arc<Value>], expectations_met: bool, now: i64) -> Vec<Action> {
    let uid = text(rs, "/metadata/uid");
    let deleting = rs.at("/metadata/deletionTimestamp").is_some();
    // An empty selector selects nothing for a ReplicaSet (the API refuses it anyway).
    let selector = corral_scheduler::plugins::parse_selector(rs.at("/spec/selector")).filter(|s| !s.is_empty());
    let selects = |pod: &Value| selector.as_ref().is_some_and(|s| s.matches(pod));
    let mut actions = Vec::new();
    let mut owned: Vec<&Value> = Vec::new();
    for pod in pods {
        let pod: &Value = pod;
        match controller_uid(pod) {
            Some(owner) if owner == uid => {
                if selects(pod) || !active(pod) {
                    owned.push(pod);
                } else if !deleting {
                    // No longer selected: released, so another controller may take it.
                    let mut released = pod.clone();
                    if let Some(refs) = released.pointer_mut("/metadata/ownerReferences").and_then(Value::as_array_mut)
                    {
                        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
                    }
                    actions.push(Action::Own(released));
                }
            }
            None if !deleting && active(pod) && selects(pod) => {
                let mut adopted = pod.clone();
                let refs = adopted["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
                let mut refs: Vec<Value> = refs;
                refs.push(owner_ref(rs));
                adopted["metadata"]["ownerReferences"] = Value::Array(refs);
                actions.push(Action::Own(adopted));
                owned.push(pod);
            }
            _ => {}
        }
    }
    let mut alive: Vec<&Value> = owned.iter().copied().filter(|p| active(p)).collect();
    let want = rs.at("/spec/replicas").and_then(Value::as_i64).unwrap_or(1).max(0) as usize;
    if expectations_met && !deleting {
        if alive.len() < want {
            for _ in 0..(want - alive.len()).min(BURST) {
                actions.push(Action::Create(new_pod(rs)));
            }
        } else if alive.len() > want {
            alive.sort_by_key(|p| deletion_rank(p));
            for p in alive.iter().take((alive.len() - want).min(BURST)) {
                actions.push(Action::Delete(text(p, "/metadata/name").into(), text(p, "/metadata/uid").into()));
            }
        }
    }
    let min_ready = rs.at("/spec/minReadySeconds").and_then(Value::as_i64).unwrap_or(0);
    let template_labels = labels(rs.at("/spec/template").unwrap_or(&Value::Null));
    let count = |f: &dyn Fn(&Value) -> bool| owned.iter().filter(|p| active(p) && f(p)).count();
    let mut status = rs.get("status").cloned().unwrap_or_else(|| json!({}));
    status["replicas"] = json!(count(&|_| true));
    status["fullyLabeledReplicas"] = json!(count(&|p| {
        let l = labels(p);
        template_labels.iter().all(|(k, v)| l.get(k) == Some(v))
    }));
    status["readyReplicas"] = json!(count(&ready));
    status["availableReplicas"] = json!(count(&|p| available(p, min_ready, now)));
    status["observedGeneration"] = rs.at("/metadata/generation").cloned().unwrap_or(json!(1));
    omit_zeros(&mut status, &["fullyLabeledReplicas", "readyReplicas", "availableReplicas"]);
    if rs.get("status") != Some(&status) {
        actions.push(Action::Status(status));
    }
    actions
}

/// Runs the controller until aborted.
pub async fn run<C: Cluster>(cluster: Arc<C>, informers: Arc<Informers>, host: String) {
    let sets = informers.get("apps/replicasets").await;
    let pods = informers.get("pods").await;
    let events = Arc::new(Mutex::new(Recorder::new("replicaset-controller", &host)));
    let mut expectations: HashMap<String, Expectations> = HashMap::new();
    loop {
        let pass = std::time::Instant::now();
        let rs_change = sets.changed();
        let pod_change = pods.changed();
        let all_sets = sets.list();
        // Only the namespaces that have ReplicaSets: their pods, each namespace read once.
        let mut by_namespace: HashMap<&str, Vec<Arc<Value>>> = HashMap::new();
        for rs in &all_sets {
            let ns = text(rs, "/metadata/namespace");
            by_namespace.entry(ns).or_insert_with(|| pods.list_in(ns));
        }
        // By uid: a ReplicaSet deleted and made again under its name starts afresh.
        let live: HashSet<&str> = all_sets.iter().map(|rs| text(rs, "/metadata/uid")).collect();
        expectations.retain(|uid, _| live.contains(uid.as_str()));
        // Every set's deletions (and other actions) before any set's creations: when a
        // rolling update scales an old set down and the new one up within one pass, the old
        // pod is terminating before its replacement exists, so a watch never sees more than
        // replicas + maxSurge pods.
        let (mut actions, mut creations) = (Vec::new(), Vec::new());
        for rs in &all_sets {
            let in_ns: Vec<&Arc<Value>> =
                by_namespace.get(text(rs, "/metadata/namespace")).into_iter().flatten().collect();
            let exp = expectations.entry(text(rs, "/metadata/uid").to_string()).or_default();
            let met = exp.met(&in_ns);
            if met {
                *exp = Expectations::default();
            }
            for action in reconcile(rs, &in_ns, met, now_seconds()) {
                let to = if matches!(action, Action::Create(_)) { &mut creations } else { &mut actions };
                to.push((rs, action));
            }
        }
        for (rs, action) in actions.into_iter().chain(creations) {
            let exp =
                expectations.get_mut(text(rs, "/metadata/uid")).expect("every set's expectations were made above");
            act(cluster.as_ref(), rs, action, exp, &events).await;
        }
        flush_events(cluster.as_ref(), &events).await;
        let worked = pass.elapsed();
        tokio::select! {
            _ = rs_change => {}
            _ = pod_change => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
        crate::informer::pace(worked, DEBOUNCE, 0.2).await;
    }
}

async fn act<C: Cluster>(cluster: &C, rs: &Value, action: Action, exp: &mut Expectations, events: &Mutex<Recorder>) {
    let namespace = text(rs, "/metadata/namespace");
    let record = |warning: bool, reason: &str, message: String| {
        let now = now_seconds();
        let involved = Involved { api_version: "apps/v1".into(), kind: "ReplicaSet".into(), ..Involved::object(rs) };
        events.lock().expect("not poisoned").record(&involved, warning, reason, &message, now);
    };
    match action {
        Action::Create(pod) => match cluster.create("pods", namespace, pod).await {
            Ok(created) => {
                let name = text(&created, "/metadata/name").to_string();
                record(false, "SuccessfulCreate", format!("Created pod: {name}"));
                exp.creates.insert(name);
                exp.since.get_or_insert_with(Instant::now);
            }
            Err(e) => record(true, "FailedCreate", format!("Error creating: {e}")),
        },
        Action::Delete(name, uid) => {
            let options = json!({"preconditions": {"uid": uid}});
            match cluster.delete("pods", namespace, &name, options).await {
                Ok(()) => {
                    record(false, "SuccessfulDelete", format!("Deleted pod: {name}"));
                    exp.deletes.insert(uid);
                    exp.since.get_or_insert_with(Instant::now);
                }
                Err(ClusterError::NotFound(_)) | Err(ClusterError::Conflict(_)) => {}
                Err(e) => record(true, "FailedDelete", format!("Error deleting: {e}")),
            }
        }
        Action::Own(pod) => {
            if let Err(e) = cluster.update("pods", pod).await {
                tracing::debug!(rs = %text(rs, "/metadata/name"), error = %e, "adopting or releasing a pod");
            }
        }
        Action::Status(status) => {
            let mut updated = rs.clone();
            updated["status"] = status;
            match cluster.update_status("apps/replicasets", updated).await {
                Ok(_) | Err(ClusterError::Conflict(_)) | Err(ClusterError::NotFound(_)) => {}
                Err(e) => tracing::warn!(rs = %text(rs, "/metadata/name"), error = %e, "writing ReplicaSet status"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(replicas: i64) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default", "uid": "rs-uid", "generation": 2},
               "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}}})
    }

    fn pod(name: &str, owner: Option<&str>, node: &str, ready: bool, created: &str) -> Arc<Value> {
        let mut p = json!({"metadata": {"name": name, "namespace": "default", "uid": format!("u-{name}"),
                                         "labels": {"app": "web"}, "creationTimestamp": created},
                           "spec": {"nodeName": node},
                           "status": {"phase": if node.is_empty() { "Pending" } else { "Running" },
                                      "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
        if let Some(o) = owner {
            p["metadata"]["ownerReferences"] =
                json!([{"uid": o, "controller": true, "kind": "ReplicaSet", "name": "web"}]);
        }
        Arc::new(p)
    }

    fn creates(actions: &[Action]) -> usize {
        actions.iter().filter(|a| matches!(a, Action::Create(_))).count()
    }

    #[test]
    fn missing_pods_are_created_from_the_template_with_an_owner() {
        let a = pod("web-aaaaa", Some("rs-uid"), "n1", true, "1");
        let actions = reconcile(&rs(3), &[&a], true, 0);
        assert_eq!(creates(&actions), 2);
        let Action::Create(new) = &actions[0] else { panic!("{actions:?}") };
        assert_eq!(new["metadata"]["generateName"], "web-");
        assert_eq!(new["metadata"]["ownerReferences"][0]["uid"], "rs-uid");
        assert_eq!(new["metadata"]["labels"]["app"], "web");
        let Some(Action::Status(status)) = actions.last() else { panic!() };
        assert_eq!((status["replicas"].as_i64(), status["readyReplicas"].as_i64()), (Some(1), Some(1)));
        assert_eq!(status["observedGeneration"], 2);
    }

    #[test]
    fn unmet_expectations_hold_the_counts() {
        let a = pod("web-aaaaa", Some("rs-uid"), "n1", true, "1");
        assert_eq!(creates(&reconcile(&rs(3), &[&a], false, 0)), 0, "creations in flight are not repeated");
        let exp = Expectations {
            creates: HashSet::from(["web-bbbbb".to_string()]),
            since: Some(Instant::now()),
            ..Default::default()
        };
        assert!(!exp.met(&[&a]));
        let b = pod("web-bbbbb", Some("rs-uid"), "", false, "2");
        assert!(exp.met(&[&a, &b]));
    }

    #[test]
    fn the_worst_pods_go_first_when_scaling_down() {
        let running = pod("web-run", Some("rs-uid"), "n1", true, "1");
        let young = pod("web-young", Some("rs-uid"), "n1", true, "5");
        let unscheduled = pod("web-pending", Some("rs-uid"), "", false, "3");
        let actions = reconcile(&rs(1), &[&running, &young, &unscheduled], true, 0);
        let deleted: Vec<&str> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Delete(n, _) => Some(n.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, ["web-pending", "web-young"]);
    }

    #[test]
    fn orphans_are_adopted_and_strays_released() {
        let orphan = pod("loose", None, "n1", true, "1");
        let mut stray = (*pod("stray", Some("rs-uid"), "n1", true, "1")).clone();
        stray["metadata"]["labels"] = json!({"app": "other"});
        let stray = Arc::new(stray);
        let actions = reconcile(&rs(1), &[&orphan, &stray], true, 0);
        let owned: Vec<&Value> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Own(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(owned.len(), 2);
        let adopted = owned.iter().find(|p| p["metadata"]["name"] == "loose").unwrap();
        assert_eq!(adopted["metadata"]["ownerReferences"][0]["uid"], "rs-uid");
        let released = owned.iter().find(|p| p["metadata"]["name"] == "stray").unwrap();
        assert_eq!(released["metadata"]["ownerReferences"], json!([]));
        assert_eq!(creates(&actions), 0, "the adopted orphan counts");
    }
}
