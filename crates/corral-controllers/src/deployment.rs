//! The Deployment controller: one ReplicaSet per pod template, named `<deployment>-<hash>`
//! with the template's hash as its `pod-template-hash` label, and the rollout between them.
//! RollingUpdate scales the new ReplicaSet up and the old ones down within maxSurge and
//! maxUnavailable (25% each by default); Recreate scales the old ones to zero and waits for
//! their pods to go before the new one starts. Revisions are annotations on the ReplicaSets
//! (a template brought back by `kubectl rollout undo` takes the next revision), old
//! ReplicaSets beyond revisionHistoryLimit are deleted once the rollout is complete, a
//! paused Deployment is only scaled, and a change of replicas during a rollout is shared out
//! in proportion. Status and the Progressing and Available conditions follow Kubernetes',
//! progressDeadlineSeconds included, so `kubectl rollout status` reads them as it does there.
//!
//! `reconcile` is pure (one pass over one Deployment, from what the informers hold); `run`
//! is the loop. A pass never acts on ReplicaSets older than its own last writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_api::events::{Involved, Recorder};
use corral_api::meta::JsonAt;
use serde_json::{Map, Value, json};

use crate::cluster::{Cluster, ClusterError, now_seconds, omit_zeros, text};
use crate::informer::Informers;
use crate::replicaset::controller_uid;
use crate::scheduling::flush_events;

pub const TEMPLATE_HASH: &str = "pod-template-hash";
pub const REVISION: &str = "deployment.kubernetes.io/revision";
const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
const DESIRED: &str = "deployment.kubernetes.io/desired-replicas";
const MAX: &str = "deployment.kubernetes.io/max-replicas";
/// Deployment annotations not copied to its ReplicaSets (nor back by `rollout undo`).
const NOT_COPIED: [&str; 6] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED,
    MAX,
    "deprecated.deployment.rollback.to",
];
const DEBOUNCE: Duration = Duration::from_millis(10);
/// Also the resolution of progress deadlines.
const RESYNC: Duration = Duration::from_secs(5);
/// Own writes not seen by the informer by then are no longer waited for.
const WRITES_TTL: Duration = Duration::from_secs(30);

/// FNV-1a, 32 bits, as Kubernetes hashes pod templates.
fn fnv32a(bytes: &[u8], mut hash: u32) -> u32 {
    for b in bytes {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The value in one canonical text: keys sorted at every level, whatever the map type.
fn canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map.iter().collect();
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The `pod-template-hash` of a template: FNV-1a of its canonical form (and the collision
/// count, when there is one), written in Kubernetes' alphabet without vowels.
pub fn template_hash(template: &Value, collisions: Option<i64>) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut text = String::new();
    canonical(&normalized(template), &mut text);
    let mut hash = fnv32a(text.as_bytes(), 0x811c_9dc5);
    if let Some(c) = collisions {
        hash = fnv32a(&(c as u32).to_le_bytes(), hash);
    }
    hash.to_string().bytes().map(|d| ALPHABET[usize::from(d) % ALPHABET.len()] as char).collect()
}

/// A template as Kubernetes' typed comparison sees it: without the `pod-template-hash`
/// label, null fields (kubectl sends `creationTimestamp: null`) and empty metadata maps.
fn normalized(template: &Value) -> Value {
    fn strip_nulls(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.retain(|_, v| !v.is_null());
                map.values_mut().for_each(strip_nulls);
            }
            Value::Array(items) => items.iter_mut().for_each(strip_nulls),
            _ => {}
        }
    }
    let mut t = template.clone();
    strip_nulls(&mut t);
    if let Some(labels) = t.pointer_mut("/metadata/labels").and_then(Value::as_object_mut) {
        labels.remove(TEMPLATE_HASH);
    }
    if let Some(meta) = t.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|_, v| v.as_object().is_none_or(|m| !m.is_empty()));
        if meta.is_empty() {
            t.as_object_mut().map(|m| m.remove("metadata"));
        }
    }
    t
}

/// Whether two templates are the same but for the `pod-template-hash` label.
fn same_template(a: &Value, b: &Value) -> bool {
    normalized(a) == normalized(b)
}

/// An int-or-percent of `total` (`"25%"` or `1`), rounded up or down.
fn scaled(value: Option<&Value>, total: i64, round_up: bool) -> i64 {
    match value {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => {
            let Some(Ok(percent)) = s.strip_suffix('%').map(str::parse::<i64>) else {
                return s.parse().unwrap_or(0);
            };
            let exact = percent * total;
            if round_up { (exact + 99).div_euclid(100) } else { exact.div_euclid(100) }
        }
        _ => 0,
    }
}

fn replicas_of(obj: &Value) -> i64 {
    obj.at("/spec/replicas").and_then(Value::as_i64).unwrap_or(1).max(0)
}

fn number(obj: &Value, pointer: &str) -> i64 {
    obj.at(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn annotation<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.at("/metadata/annotations").and_then(|a| a.get(key)).and_then(Value::as_str)
}

fn set_annotation(obj: &mut Value, key: &str, value: String) -> bool {
    if annotation(obj, key) == Some(value.as_str()) {
        return false;
    }
    if !obj["metadata"]["annotations"].is_object() {
        obj["metadata"]["annotations"] = json!({});
    }
    obj["metadata"]["annotations"][key] = json!(value);
    true
}

fn revision_of(obj: &Value) -> i64 {
    annotation(obj, REVISION).and_then(|r| r.parse().ok()).unwrap_or(0)
}

/// (maxSurge, maxUnavailable) as numbers of pods; never both zero.
pub fn fenceposts(d: &Value) -> (i64, i64) {
    if text(d, "/spec/strategy/type") == "Recreate" {
        return (0, 0);
    }
    let want = replicas_of(d);
    let ru = d.at("/spec/strategy/rollingUpdate");
    let default = json!("25%");
    let surge = scaled(Some(ru.and_then(|r| r.get("maxSurge")).unwrap_or(&default)), want, true);
    let unavailable = scaled(Some(ru.and_then(|r| r.get("maxUnavailable")).unwrap_or(&default)), want, false);
    if surge == 0 && unavailable == 0 { (0, 1) } else { (surge, unavailable.min(want)) }
}

/// One of the Deployment's ReplicaSets as a pass plans it.
#[derive(Clone, Debug)]
struct Set {
    /// The object as it will be written (spec.replicas and annotations planned).
    obj: Value,
    /// spec.replicas as read.
    read: i64,
    /// Created by this pass (not written as an update).
    created: bool,
    /// Anything but the replicas planned to change.
    touched: bool,
}

impl Set {
    fn replicas(&self) -> i64 {
        replicas_of(&self.obj)
    }
    fn available(&self) -> i64 {
        number(&self.obj, "/status/availableReplicas")
    }
    fn name(&self) -> &str {
        text(&self.obj, "/metadata/name")
    }
    fn scale(&mut self, d: &Value, to: i64) {
        self.obj["spec"]["replicas"] = json!(to.max(0));
        self.annotate(d);
    }
    /// The desired- and max-replicas annotations for the Deployment's size now.
    fn annotate(&mut self, d: &Value) {
        let (surge, _) = fenceposts(d);
        self.touched |= set_annotation(&mut self.obj, DESIRED, replicas_of(d).to_string());
        self.touched |= set_annotation(&mut self.obj, MAX, (replicas_of(d) + surge).to_string());
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Adopts or releases a ReplicaSet: the object as it should be.
    Own(Value),
    /// A new ReplicaSet.
    Create(Value),
    /// Writes a ReplicaSet (replicas and annotations); `from` is the replicas it had.
    Update { set: Value, from: i64 },
    /// Deletes an old ReplicaSet beyond the history limit (name, uid).
    Delete(String, String),
    /// The Deployment with its revision annotation.
    Annotate(Value),
    /// The Deployment's new status.
    Status(Value),
}

fn condition<'a>(conditions: &'a [Value], kind: &str) -> Option<&'a Value> {
    conditions.iter().find(|c| c["type"] == kind)
}

/// Sets a condition as Kubernetes' SetDeploymentCondition: nothing changes when status and
/// reason are the same; the transition time is kept when only the reason changes.
fn set_condition(conditions: &mut Vec<Value>, kind: &str, status: &str, reason: &str, message: String, now: &str) {
    let current = condition(conditions, kind).cloned();
    if let Some(c) = &current
        && c["status"] == status
        && c["reason"] == reason
    {
        return;
    }
    let since = match &current {
        Some(c) if c["status"] == status => c["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    conditions.retain(|c| c["type"] != kind);
    conditions.push(json!({"type": kind, "status": status, "reason": reason, "message": message,
                           "lastUpdateTime": now, "lastTransitionTime": since}));
}

/// Whether a status shows the whole Deployment updated and available.
fn complete(d: &Value, status: &Value) -> bool {
    let want = replicas_of(d);
    number(status, "/updatedReplicas") == want
        && number(status, "/replicas") == want
        && number(status, "/availableReplicas") == want
        && number(status, "/observedGeneration") >= number(d, "/metadata/generation")
}

/// A pass over one Deployment. `sets` are the ReplicaSets and `pods` the pods of its
/// namespace; `now` is seconds since the epoch.
pub fn reconcile(d: &Value, sets: &[&Arc<Value>], pods: &[&Arc<Value>], now: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    if d.at("/metadata/deletionTimestamp").is_some() {
        return actions;
    }
    let uid = text(d, "/metadata/uid");
    let Some(selector) = corral_scheduler::plugins::parse_selector(d.at("/spec/selector")).filter(|s| !s.is_empty())
    else {
        return actions;
    };
    // Claim: owned ReplicaSets that still match, orphans that match; release the others.
    let mut owned: Vec<Set> = Vec::new();
    for rs in sets {
        if rs.at("/metadata/deletionTimestamp").is_some() {
            continue;
        }
        let matches = selector.matches(rs);
        let set = Set { obj: (***rs).clone(), read: replicas_of(rs), created: false, touched: false };
        match controller_uid(rs) {
            Some(owner) if owner == uid && matches => owned.push(set),
            Some(owner) if owner == uid => {
                let mut released = (***rs).clone();
                if let Some(refs) = released.pointer_mut("/metadata/ownerReferences").and_then(Value::as_array_mut) {
                    refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
                }
                actions.push(Action::Own(released));
            }
            None if matches => {
                let mut adopted = set.obj.clone();
                let mut refs = adopted["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
                refs.push(owner_ref(d));
                adopted["metadata"]["ownerReferences"] = Value::Array(refs);
                actions.push(Action::Own(adopted.clone()));
                owned.push(Set { obj: adopted, ..set });
            }
            _ => {}
        }
    }
    owned.sort_by(|a, b| {
        (text(&a.obj, "/metadata/creationTimestamp"), a.name())
            .cmp(&(text(&b.obj, "/metadata/creationTimestamp"), b.name()))
    });
    let template = d.at("/spec/template").cloned().unwrap_or(Value::Null);
    let mut new =
        owned.iter().position(|s| same_template(s.obj.at("/spec/template").unwrap_or(&Value::Null), &template));
    let new_revision =
        owned.iter().enumerate().filter(|(i, _)| Some(*i) != new).map(|(_, s)| revision_of(&s.obj)).max().unwrap_or(0)
            + 1;
    let now_text = corral_api::meta::rfc3339(now);
    let mut status = d.get("status").cloned().unwrap_or_else(|| json!({}));
    let mut conditions: Vec<Value> = status.get("conditions").and_then(Value::as_array).cloned().unwrap_or_default();
    let has_deadline =
        d.at("/spec/progressDeadlineSeconds").and_then(Value::as_i64).is_some_and(|s| s < i64::from(i32::MAX));
    let paused = d.at("/spec/paused").and_then(Value::as_bool) == Some(true);
    let progressing_reason = condition(&conditions, "Progressing").map(|c| text(c, "/reason").to_string());
    if has_deadline && progressing_reason.as_deref() != Some("ProgressDeadlineExceeded") {
        let paused_shown = progressing_reason.as_deref() == Some("DeploymentPaused");
        if paused && !paused_shown {
            set_condition(
                &mut conditions,
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused".into(),
                &now_text,
            );
        } else if !paused && paused_shown {
            set_condition(
                &mut conditions,
                "Progressing",
                "Unknown",
                "DeploymentResumed",
                "Deployment is resumed".into(),
                &now_text,
            );
        }
    }
    let want = replicas_of(d);
    let scaling = owned.iter().any(|s| {
        s.replicas() > 0 && annotation(&s.obj, DESIRED).and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v != want)
    });
    let mut deletes = Vec::new();
    if let Some(n) = new {
        let found = sync_new_set(d, &mut owned[n], new_revision);
        if has_deadline && condition(&conditions, "Progressing").is_none() {
            set_condition(
                &mut conditions,
                "Progressing",
                "True",
                "FoundNewReplicaSet",
                format!("Found new replica set {:?}", found),
                &now_text,
            );
        }
    }
    if paused || scaling {
        scale(d, &mut owned, new);
        if paused {
            cleanup(d, &owned, new, &mut deletes);
        }
    } else {
        let recreate = text(d, "/spec/strategy/type") == "Recreate";
        if new.is_none()
            && !(recreate && scale_old_to_zero(d, &mut owned, new))
            && !(recreate && old_pods_running(&owned, pods))
        {
            let taken = |name: &str| sets.iter().any(|rs| text(rs, "/metadata/name") == name);
            match new_set(d, &owned, new_revision, recreate, taken) {
                Ok(set) => {
                    let name = set.name().to_string();
                    owned.push(set);
                    new = Some(owned.len() - 1);
                    if has_deadline {
                        set_condition(
                            &mut conditions,
                            "Progressing",
                            "True",
                            "NewReplicaSetCreated",
                            format!("Created new replica set {name:?}"),
                            &now_text,
                        );
                    }
                }
                Err(()) => status["collisionCount"] = json!(number(&status, "/collisionCount") + 1),
            }
        }
        let stepped =
            if recreate { rollout_recreate(d, &mut owned, new, pods) } else { rollout_rolling(d, &mut owned, new) };
        if !stepped && complete(d, &status) {
            cleanup(d, &owned, new, &mut deletes);
        }
    }
    for set in &owned {
        if set.created {
            actions.push(Action::Create(set.obj.clone()));
        } else if set.touched || set.replicas() != set.read {
            actions.push(Action::Update { set: set.obj.clone(), from: set.read });
        }
    }
    actions.append(&mut deletes);
    if let Some(n) = new {
        let mut annotated = d.clone();
        if set_annotation(&mut annotated, REVISION, revision_of(&owned[n].obj).to_string()) {
            actions.push(Action::Annotate(annotated));
        }
    }
    status["conditions"] = Value::Array(conditions);
    let status = calculate_status(d, &owned, new, status, paused || scaling, &now_text, now);
    if d.get("status") != Some(&status) {
        actions.push(Action::Status(status));
    }
    actions
}

fn owner_ref(d: &Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": text(d, "/metadata/name"),
           "uid": text(d, "/metadata/uid"), "controller": true, "blockOwnerDeletion": true})
}

/// The Deployment's annotations that its ReplicaSets carry.
fn copied_annotations(d: &Value) -> Map<String, Value> {
    let mut out = d.at("/metadata/annotations").and_then(Value::as_object).cloned().unwrap_or_default();
    out.retain(|k, _| !NOT_COPIED.contains(&k.as_str()));
    out
}

/// Brings an existing new ReplicaSet's revision (a template brought back takes the next
/// one, its old number kept in revision-history), annotations and minReadySeconds up to
/// date. Returns its name.
fn sync_new_set(d: &Value, set: &mut Set, new_revision: i64) -> String {
    let old = revision_of(&set.obj);
    if old < new_revision {
        if old > 0 {
            let history = match annotation(&set.obj, REVISION_HISTORY) {
                Some(h) if !h.is_empty() => format!("{h},{old}"),
                _ => old.to_string(),
            };
            set.touched |= set_annotation(&mut set.obj, REVISION_HISTORY, history);
        }
        set.touched |= set_annotation(&mut set.obj, REVISION, new_revision.to_string());
    }
    for (k, v) in copied_annotations(d) {
        if let Some(v) = v.as_str() {
            set.touched |= set_annotation(&mut set.obj, &k, v.to_string());
        }
    }
    let min_ready = d.at("/spec/minReadySeconds").cloned().unwrap_or(json!(0));
    if set.obj.at("/spec/minReadySeconds").cloned().unwrap_or(json!(0)) != min_ready {
        set.obj["spec"]["minReadySeconds"] = min_ready;
        set.touched = true;
    }
    set.name().to_string()
}

/// The new ReplicaSet for the Deployment's template, or Err when its name is taken by
/// another template (the collision count goes up and the next pass hashes again).
fn new_set(d: &Value, owned: &[Set], revision: i64, recreate: bool, taken: impl Fn(&str) -> bool) -> Result<Set, ()> {
    let collisions = d.at("/status/collisionCount").and_then(Value::as_i64);
    let mut template = d.at("/spec/template").cloned().unwrap_or_else(|| json!({}));
    let hash = template_hash(&template, collisions);
    let name = format!("{}-{hash}", text(d, "/metadata/name"));
    if taken(&name) {
        return Err(());
    }
    if !template["metadata"].is_object() {
        template["metadata"] = json!({});
    }
    if !template["metadata"]["labels"].is_object() {
        template["metadata"]["labels"] = json!({});
    }
    template["metadata"]["labels"][TEMPLATE_HASH] = json!(hash);
    let mut selector = d.at("/spec/selector").cloned().unwrap_or_else(|| json!({}));
    if !selector["matchLabels"].is_object() {
        selector["matchLabels"] = json!({});
    }
    selector["matchLabels"][TEMPLATE_HASH] = json!(hash);
    let mut annotations = copied_annotations(d);
    annotations.insert(REVISION.into(), json!(revision.to_string()));
    let obj = json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": text(d, "/metadata/namespace"),
                     "labels": template["metadata"]["labels"].clone(), "annotations": annotations,
                     "ownerReferences": [owner_ref(d)]},
        "spec": {"replicas": 0, "minReadySeconds": d.at("/spec/minReadySeconds").cloned().unwrap_or(json!(0)),
                 "selector": selector, "template": template},
    });
    let mut set = Set { obj, read: 0, created: true, touched: true };
    let mut all: Vec<Set> = owned.to_vec();
    all.push(set.clone());
    let replicas = if recreate { replicas_of(d) } else { new_replicas(d, &all, all.len() - 1) };
    set.scale(d, replicas);
    Ok(set)
}

/// RollingUpdate's size for the new ReplicaSet: up to replicas + maxSurge pods in all.
fn new_replicas(d: &Value, sets: &[Set], new: usize) -> i64 {
    let (surge, _) = fenceposts(d);
    let want = replicas_of(d);
    let current: i64 = sets.iter().map(Set::replicas).sum();
    let max_total = want + surge;
    let new_now = sets[new].replicas();
    if current >= max_total {
        return new_now;
    }
    new_now + (max_total - current).min(want - new_now).max(0)
}

/// One RollingUpdate step; true when it changed a size (the rest waits for the next pass).
fn rollout_rolling(d: &Value, sets: &mut [Set], new: Option<usize>) -> bool {
    let Some(n) = new else { return false };
    let want = replicas_of(d);
    // The new ReplicaSet first.
    let current = sets[n].replicas();
    let target = if current > want { want } else { new_replicas(d, sets, n) };
    if target != current {
        sets[n].scale(d, target);
        return true;
    }
    // Then the old ones, within maxUnavailable.
    let (_, max_unavailable) = fenceposts(d);
    let old: Vec<usize> = (0..sets.len()).filter(|i| *i != n && sets[*i].replicas() > 0).collect();
    if old.is_empty() {
        return false;
    }
    let all_pods: i64 = sets.iter().map(Set::replicas).sum();
    let min_available = want - max_unavailable;
    let new_unavailable = sets[n].replicas() - sets[n].available();
    let max_scaled_down = all_pods - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return false;
    }
    // Unhealthy old replicas go first (oldest ReplicaSet first): they count for nothing.
    let mut cleaned = 0;
    for &i in &old {
        if cleaned >= max_scaled_down {
            break;
        }
        let unhealthy = sets[i].replicas() - sets[i].available();
        if unhealthy <= 0 {
            continue;
        }
        let down = unhealthy.min(max_scaled_down - cleaned);
        let to = sets[i].replicas() - down;
        sets[i].scale(d, to);
        cleaned += down;
    }
    // Then available ones, keeping minAvailable.
    let available: i64 = sets.iter().map(Set::available).sum();
    let mut scaled_down = 0;
    if available > min_available {
        let total = available - min_available;
        for &i in &old {
            if scaled_down >= total {
                break;
            }
            let have = sets[i].replicas();
            if have == 0 {
                continue;
            }
            let down = have.min(total - scaled_down);
            sets[i].scale(d, have - down);
            scaled_down += down;
        }
    }
    cleaned + scaled_down > 0
}

/// Scales every old ReplicaSet to zero; true when one changed.
fn scale_old_to_zero(d: &Value, sets: &mut [Set], new: Option<usize>) -> bool {
    let mut changed = false;
    for (i, set) in sets.iter_mut().enumerate() {
        if Some(i) != new && set.replicas() > 0 {
            set.scale(d, 0);
            changed = true;
        }
    }
    changed
}

/// Whether a pod of an old ReplicaSet has not finished (terminating ones included).
fn old_pods_running(sets: &[Set], pods: &[&Arc<Value>]) -> bool {
    let uids: Vec<&str> = sets.iter().map(|s| text(&s.obj, "/metadata/uid")).filter(|u| !u.is_empty()).collect();
    pods.iter().any(|p| {
        controller_uid(p).is_some_and(|u| uids.contains(&u))
            && !matches!(text(p, "/status/phase"), "Succeeded" | "Failed")
    })
}

/// One Recreate step: old ones to zero, wait for their pods, then the new one to size.
fn rollout_recreate(d: &Value, sets: &mut [Set], new: Option<usize>, pods: &[&Arc<Value>]) -> bool {
    if scale_old_to_zero(d, sets, new) {
        return true;
    }
    let Some(n) = new else { return false };
    let olds: Vec<Set> = sets.iter().enumerate().filter(|(i, _)| *i != n).map(|(_, s)| s.clone()).collect();
    if old_pods_running(&olds, pods) {
        return false;
    }
    let want = replicas_of(d);
    if sets[n].replicas() != want {
        sets[n].scale(d, want);
        return true;
    }
    false
}

/// A change of replicas (or a paused Deployment): the active ReplicaSets are resized, in
/// proportion to their sizes when a rollout is under way. Every active set ends with the
/// Deployment's size in its annotations, even one whose size did not change: an annotation
/// left behind would make every pass a scaling event, and the rollout would never go on
/// (Kubernetes' controller can stall so, kubernetes#138840).
fn scale(d: &Value, sets: &mut [Set], new: Option<usize>) {
    resize(d, sets, new);
    for set in sets.iter_mut().filter(|s| s.replicas() > 0) {
        set.annotate(d);
    }
}

fn resize(d: &Value, sets: &mut [Set], new: Option<usize>) {
    let want = replicas_of(d);
    let active: Vec<usize> = (0..sets.len()).filter(|i| sets[*i].replicas() > 0).collect();
    let only = match (active.len(), new) {
        (0, Some(n)) => Some(n),
        (0, None) => (!sets.is_empty()).then(|| sets.len() - 1),
        (1, _) => Some(active[0]),
        _ => None,
    };
    if let Some(i) = only {
        if sets[i].replicas() != want {
            sets[i].scale(d, want);
        }
        return;
    }
    // The new ReplicaSet at full size and available: the old ones are no longer needed.
    if let Some(n) = new
        && sets[n].replicas() == want
        && sets[n].available() == want
        && annotation(&sets[n].obj, DESIRED) == Some(want.to_string().as_str())
    {
        for i in active.into_iter().filter(|i| *i != n) {
            sets[i].scale(d, 0);
        }
        return;
    }
    if text(d, "/spec/strategy/type") == "Recreate" {
        return;
    }
    let (surge, _) = fenceposts(d);
    let allowed = if want > 0 { want + surge } else { 0 };
    let total: i64 = active.iter().map(|i| sets[*i].replicas()).sum();
    let to_add = allowed - total;
    let mut order = active.clone();
    // Growing: the largest (newest on a tie) first; shrinking: the largest (oldest) first.
    if to_add > 0 {
        order.sort_by(|a, b| sets[*b].replicas().cmp(&sets[*a].replicas()).then(b.cmp(a)));
    } else {
        order.sort_by(|a, b| sets[*b].replicas().cmp(&sets[*a].replicas()).then(a.cmp(b)));
    }
    let mut sizes: HashMap<usize, i64> = HashMap::new();
    let mut added = 0;
    for &i in &order {
        let have = sets[i].replicas();
        let mut proportion = 0;
        if to_add != 0 && added != to_add {
            let annotated = annotation(&sets[i].obj, MAX).and_then(|v| v.parse::<i64>().ok()).unwrap_or(total).max(1);
            let fraction =
                if want == 0 { -have } else { ((have * allowed) as f64 / annotated as f64).round() as i64 - have };
            let allowed_left = to_add - added;
            proportion = if to_add > 0 { fraction.min(allowed_left) } else { fraction.max(allowed_left) };
        }
        sizes.insert(i, have + proportion);
        added += proportion;
    }
    if let Some(&first) = order.first()
        && to_add != 0
    {
        let size = sizes.entry(first).or_insert(0);
        *size = (*size + to_add - added).max(0);
    }
    for (i, size) in sizes {
        sets[i].scale(d, size);
    }
}

/// Deletes old ReplicaSets with no pods beyond revisionHistoryLimit, oldest revision first.
fn cleanup(d: &Value, sets: &[Set], new: Option<usize>, actions: &mut Vec<Action>) {
    let Some(limit) = d.at("/spec/revisionHistoryLimit").and_then(Value::as_i64) else { return };
    let mut idle: Vec<&Set> = sets
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            Some(*i) != new
                && !s.created
                && s.replicas() == 0
                && number(&s.obj, "/status/replicas") == 0
                && number(&s.obj, "/metadata/generation") <= number(&s.obj, "/status/observedGeneration")
        })
        .map(|(_, s)| s)
        .collect();
    let excess = idle.len() as i64 - limit.max(0);
    if excess <= 0 {
        return;
    }
    idle.sort_by_key(|s| (revision_of(&s.obj), text(&s.obj, "/metadata/creationTimestamp").to_string()));
    for s in idle.into_iter().take(excess as usize) {
        actions.push(Action::Delete(s.name().to_string(), text(&s.obj, "/metadata/uid").to_string()));
    }
}

/// The Deployment's status from its ReplicaSets', with the Available condition and (unless
/// paused or scaling) the Progressing one.
fn calculate_status(
    d: &Value,
    sets: &[Set],
    new: Option<usize>,
    mut status: Value,
    sync_only: bool,
    now_text: &str,
    now: i64,
) -> Value {
    let want = replicas_of(d);
    let (_, max_unavailable) = fenceposts(d);
    let sum = |p: &str| sets.iter().map(|s| number(&s.obj, p)).sum::<i64>();
    let available = sum("/status/availableReplicas");
    status["observedGeneration"] = json!(number(d, "/metadata/generation"));
    status["replicas"] = json!(sum("/status/replicas"));
    status["updatedReplicas"] = json!(new.map_or(0, |n| number(&sets[n].obj, "/status/replicas")));
    status["readyReplicas"] = json!(sum("/status/readyReplicas"));
    status["availableReplicas"] = json!(available);
    status["unavailableReplicas"] = json!((want - available).max(0));
    let mut conditions: Vec<Value> = status["conditions"].as_array().cloned().unwrap_or_default();
    if available >= want - max_unavailable {
        set_condition(
            &mut conditions,
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
            now_text,
        );
    } else {
        set_condition(
            &mut conditions,
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
            now_text,
        );
    }
    let deadline = d.at("/spec/progressDeadlineSeconds").and_then(Value::as_i64).filter(|s| *s < i64::from(i32::MAX));
    if deadline.is_none() {
        conditions.retain(|c| c["type"] != "Progressing");
    }
    if let Some(deadline) = deadline.filter(|_| !sync_only) {
        let subject = match new {
            Some(n) => format!("ReplicaSet {:?}", sets[n].name()),
            None => format!("Deployment {:?}", text(d, "/metadata/name")),
        };
        let current = condition(&conditions, "Progressing").cloned();
        let reason = current.as_ref().map(|c| text(c, "/reason").to_string()).unwrap_or_default();
        let done =
            number(&status, "/replicas") == number(&status, "/updatedReplicas") && reason == "NewReplicaSetAvailable";
        let old = d.get("status").cloned().unwrap_or_else(|| json!({}));
        let progressed = {
            let old_olds = number(&old, "/replicas") - number(&old, "/updatedReplicas");
            let new_olds = number(&status, "/replicas") - number(&status, "/updatedReplicas");
            number(&status, "/updatedReplicas") > number(&old, "/updatedReplicas")
                || new_olds < old_olds
                || number(&status, "/readyReplicas") > number(&old, "/readyReplicas")
                || available > number(&old, "/availableReplicas")
        };
        let timed_out = match reason.as_str() {
            "" | "NewReplicaSetAvailable" => false,
            "ProgressDeadlineExceeded" => true,
            _ => current
                .as_ref()
                .and_then(|c| c.get("lastUpdateTime").and_then(Value::as_str))
                .and_then(corral_api::meta::parse_rfc3339)
                .is_some_and(|from| from + deadline < now),
        };
        if !done {
            if complete(d, &status) {
                set_condition(
                    &mut conditions,
                    "Progressing",
                    "True",
                    "NewReplicaSetAvailable",
                    format!("{subject} has successfully progressed."),
                    now_text,
                );
            } else if progressed {
                // Every step forward renews the deadline (lastUpdateTime).
                let since = match &current {
                    Some(c) if c["status"] == "True" => c["lastTransitionTime"].clone(),
                    _ => json!(now_text),
                };
                conditions.retain(|c| c["type"] != "Progressing");
                conditions.push(json!({"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                                       "message": format!("{subject} is progressing."),
                                       "lastUpdateTime": now_text, "lastTransitionTime": since}));
            } else if timed_out {
                set_condition(
                    &mut conditions,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    format!("{subject} has timed out progressing."),
                    now_text,
                );
            }
        }
    }
    // Available first, as Kubernetes lists them.
    conditions.sort_by_key(|c| c["type"] != "Available");
    status["conditions"] = Value::Array(conditions);
    omit_zeros(
        &mut status,
        &["replicas", "updatedReplicas", "readyReplicas", "availableReplicas", "unavailableReplicas"],
    );
    status
}

/// Runs the controller until aborted.
pub async fn run<C: Cluster>(cluster: Arc<C>, informers: Arc<Informers>, host: String) {
    let deployments = informers.get("apps/deployments").await;
    let sets = informers.get("apps/replicasets").await;
    let pods = informers.get("pods").await;
    let events = Arc::new(Mutex::new(Recorder::new("deployment-controller", &host)));
    // Per Deployment uid: the ReplicaSets this controller wrote (key, resourceVersion or
    // None for a creation) that the informer has not shown yet.
    let mut writes: HashMap<String, (Vec<Written>, Instant)> = HashMap::new();
    loop {
        let pass = std::time::Instant::now();
        let changes = (deployments.changed(), sets.changed(), pods.changed());
        let all_sets = sets.list();
        let mut sets_by_ns: HashMap<&str, Vec<&Arc<Value>>> = HashMap::new();
        for rs in &all_sets {
            sets_by_ns.entry(text(rs, "/metadata/namespace")).or_default().push(rs);
        }
        // Only Recreate looks at pods (whether old ones still run).
        let all = deployments.list();
        let all_pods =
            if all.iter().any(|d| text(d, "/spec/strategy/type") == "Recreate") { pods.list() } else { Vec::new() };
        let mut pods_by_ns: HashMap<&str, Vec<&Arc<Value>>> = HashMap::new();
        for p in &all_pods {
            pods_by_ns.entry(text(p, "/metadata/namespace")).or_default().push(p);
        }
        let live: std::collections::HashSet<&str> = all.iter().map(|d| text(d, "/metadata/uid")).collect();
        writes.retain(|uid, _| live.contains(uid.as_str()));
        for d in &all {
            let uid = text(d, "/metadata/uid").to_string();
            if let Some((pending, since)) = writes.get(&uid) {
                let seen = pending
                    .iter()
                    .all(|(key, rv)| sets.get(key).is_some_and(|rs| rv.is_none_or(|rv| resource_version(&rs) >= rv)));
                if !seen && since.elapsed() < WRITES_TTL {
                    continue;
                }
                writes.remove(&uid);
            }
            let ns = text(d, "/metadata/namespace");
            let in_ns = sets_by_ns.get(ns).cloned().unwrap_or_default();
            let ns_pods = pods_by_ns.get(ns).cloned().unwrap_or_default();
            let actions = reconcile(d, &in_ns, &ns_pods, now_seconds());
            let written = act(cluster.as_ref(), d, actions, &events).await;
            if !written.is_empty() {
                writes.insert(uid, (written, Instant::now()));
            }
        }
        flush_events(cluster.as_ref(), &events).await;
        let worked = pass.elapsed();
        tokio::select! {
            _ = changes.0 => {}
            _ = changes.1 => {}
            _ = changes.2 => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
        crate::informer::pace(worked, DEBOUNCE, 0.2).await;
    }
}

/// A ReplicaSet this controller wrote: its key, and the resourceVersion written (None for a
/// creation).
type Written = (String, Option<i64>);

fn resource_version(obj: &Value) -> i64 {
    text(obj, "/metadata/resourceVersion").parse().unwrap_or(0)
}

/// Carries out one pass's actions in order, stopping at the first conflict (the next pass
/// reads again). Returns the ReplicaSets written, for the next pass to wait for.
async fn act<C: Cluster>(cluster: &C, d: &Value, actions: Vec<Action>, events: &Mutex<Recorder>) -> Vec<Written> {
    let namespace = text(d, "/metadata/namespace");
    let record = |warning: bool, reason: &str, message: String| {
        let involved = Involved { api_version: "apps/v1".into(), kind: "Deployment".into(), ..Involved::object(d) };
        events.lock().expect("not poisoned").record(&involved, warning, reason, &message, now_seconds());
    };
    let scaled = |name: &str, from: i64, to: i64| {
        let how = if to > from { "up" } else { "down" };
        record(false, "ScalingReplicaSet", format!("Scaled {how} replica set {name} from {from} to {to}"));
    };
    let key = |name: &str| format!("{namespace}/{name}");
    let mut written = Vec::new();
    let mut current = d.clone();
    for action in actions {
        let result = match action {
            Action::Own(rs) => cluster.update("apps/replicasets", rs).await.map(|rs| {
                written.push((key(text(&rs, "/metadata/name")), Some(resource_version(&rs))));
            }),
            Action::Create(rs) => {
                let name = text(&rs, "/metadata/name").to_string();
                let to = replicas_of(&rs);
                match cluster.create("apps/replicasets", namespace, rs).await {
                    Ok(_) => {
                        if to > 0 {
                            scaled(&name, 0, to);
                        }
                        written.push((key(&name), None));
                        Ok(())
                    }
                    Err(e) => {
                        record(true, "FailedCreate", format!("Failed to create new replica set {name:?}: {e}"));
                        Err(e)
                    }
                }
            }
            Action::Update { set, from } => {
                let name = text(&set, "/metadata/name").to_string();
                let to = replicas_of(&set);
                cluster.update("apps/replicasets", set).await.map(|rs| {
                    if to != from {
                        scaled(&name, from, to);
                    }
                    written.push((key(&name), Some(resource_version(&rs))));
                })
            }
            Action::Delete(name, uid) => {
                let options = json!({"preconditions": {"uid": uid}});
                match cluster.delete("apps/replicasets", namespace, &name, options).await {
                    Err(ClusterError::NotFound(_)) => Ok(()),
                    other => other,
                }
            }
            Action::Annotate(annotated) => cluster.update("apps/deployments", annotated).await.map(|d| current = d),
            Action::Status(status) => {
                let mut updated = current.clone();
                updated["status"] = status;
                cluster.update_status("apps/deployments", updated).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => {}
            Err(ClusterError::Conflict(_)) | Err(ClusterError::NotFound(_)) | Err(ClusterError::AlreadyExists(_)) => {
                break;
            }
            Err(e) => {
                tracing::warn!(deployment = %text(d, "/metadata/name"), error = %e, "deployment pass stopped");
                break;
            }
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Deployment, its ReplicaSets, and pods that start and turn available as soon as
    /// `settle` is called: enough of a cluster to run rollouts pass by pass.
    struct World {
        d: Value,
        sets: Vec<Arc<Value>>,
        clock: i64,
    }

    impl World {
        fn new(replicas: i64, strategy: Value) -> World {
            let d = json!({"metadata": {"name": "web", "namespace": "default", "uid": "d-uid", "generation": 1},
                           "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                                    "strategy": strategy, "revisionHistoryLimit": 10, "progressDeadlineSeconds": 600,
                                    "template": {"metadata": {"labels": {"app": "web"}},
                                                 "spec": {"containers": [{"name": "nginx", "image": "nginx:1"}]}}}});
            World { d, sets: Vec::new(), clock: 1_000 }
        }

        fn pass(&mut self) -> Vec<Action> {
            self.clock += 1;
            let sets: Vec<&Arc<Value>> = self.sets.iter().collect();
            let actions = reconcile(&self.d, &sets, &[], self.clock);
            for a in &actions {
                match a {
                    Action::Create(rs) => {
                        let mut rs = rs.clone();
                        rs["metadata"]["uid"] = json!(format!("rs-{}", self.sets.len()));
                        rs["metadata"]["creationTimestamp"] = json!(format!("{:08}", self.clock));
                        rs["metadata"]["generation"] = json!(1);
                        self.sets.push(Arc::new(rs));
                    }
                    Action::Update { set, .. } | Action::Own(set) => {
                        let i =
                            self.sets.iter().position(|s| s["metadata"]["name"] == set["metadata"]["name"]).unwrap();
                        self.sets[i] = Arc::new(set.clone());
                    }
                    Action::Delete(name, _) => self.sets.retain(|s| s["metadata"]["name"] != name.as_str()),
                    Action::Annotate(d) => self.d = d.clone(),
                    Action::Status(s) => self.d["status"] = s.clone(),
                }
            }
            actions
        }

        /// Every ReplicaSet's pods exist and are available.
        fn settle(&mut self) {
            for rs in &mut self.sets {
                let mut s = (**rs).clone();
                let n = replicas_of(&s);
                s["status"] =
                    json!({"replicas": n, "readyReplicas": n, "availableReplicas": n, "observedGeneration": 1});
                *rs = Arc::new(s);
            }
        }

        fn sizes(&self) -> Vec<i64> {
            self.sets.iter().map(|s| replicas_of(s)).collect()
        }

        fn set_image(&mut self, image: &str) {
            self.d["spec"]["template"]["spec"]["containers"][0]["image"] = json!(image);
            self.d["metadata"]["generation"] = json!(number(&self.d, "/metadata/generation") + 1);
        }

        fn progressing(&self) -> String {
            let c = self.d["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Progressing");
            c.map(|c| c["reason"].as_str().unwrap().to_string()).unwrap_or_default()
        }

        /// Passes until nothing changes; checks the rolling bounds at every step.
        fn run(&mut self, surge: i64, unavailable: i64) {
            let want = replicas_of(&self.d);
            for _ in 0..100 {
                self.settle();
                let actions = self.pass();
                let total: i64 = self.sizes().iter().sum();
                assert!(total <= want + surge, "{total} pods wanted, over {want}+{surge}: {:?}", self.sizes());
                let available: i64 = self.sets.iter().map(|s| number(s, "/status/availableReplicas")).sum();
                let scaled_down =
                    actions.iter().any(|a| matches!(a, Action::Update { set, from } if replicas_of(set) < *from));
                if scaled_down {
                    let after: i64 =
                        self.sets.iter().map(|s| number(s, "/status/availableReplicas").min(replicas_of(s))).sum();
                    assert!(
                        after >= want - unavailable,
                        "availability {after} (from {available}) below {want}-{unavailable}"
                    );
                }
                self.settle();
                if actions.is_empty() {
                    return;
                }
            }
            panic!("no steady state: {:?}", self.sizes());
        }
    }

    fn rolling() -> Value {
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
    }

    #[test]
    fn a_new_deployment_gets_one_replicaset_named_by_its_template_hash() {
        let mut w = World::new(3, rolling());
        let actions = w.pass();
        let Action::Create(rs) = &actions[0] else { panic!("{actions:?}") };
        let hash = template_hash(&w.d["spec"]["template"], None);
        assert_eq!(rs["metadata"]["name"], format!("web-{hash}"));
        assert_eq!(rs["spec"]["replicas"], 3);
        assert_eq!(rs["spec"]["template"]["metadata"]["labels"][TEMPLATE_HASH], hash);
        assert_eq!(rs["spec"]["selector"]["matchLabels"][TEMPLATE_HASH], hash);
        assert_eq!(rs["metadata"]["annotations"][REVISION], "1");
        assert_eq!(rs["metadata"]["ownerReferences"][0]["kind"], "Deployment");
        assert!(hash.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)), "{hash}");
        assert_eq!(w.progressing(), "NewReplicaSetCreated");
        w.run(1, 0);
        assert_eq!(w.d["metadata"]["annotations"][REVISION], "1");
        assert_eq!(
            (w.d["status"]["updatedReplicas"].as_i64(), w.d["status"]["availableReplicas"].as_i64()),
            (Some(3), Some(3))
        );
        assert_eq!(w.progressing(), "NewReplicaSetAvailable");
        assert!(complete(&w.d, &w.d["status"]));
    }

    #[test]
    fn a_rolling_update_stays_within_surge_and_unavailability() {
        let mut w = World::new(4, rolling());
        w.run(1, 1);
        w.set_image("nginx:2");
        // First pass: the new ReplicaSet at 1 (4 + 25% surge) and an old pod let go (25%).
        w.pass();
        assert_eq!(w.sizes(), [3, 1]);
        w.settle();
        w.run(1, 1);
        assert_eq!(w.sizes(), [0, 4]);
        assert_eq!(w.sets[1]["metadata"]["annotations"][REVISION], "2");
        assert_eq!(w.d["metadata"]["annotations"][REVISION], "2");
        assert_eq!(w.progressing(), "NewReplicaSetAvailable");
    }

    #[test]
    fn a_stale_desired_annotation_on_the_only_active_set_does_not_stall_a_rollout() {
        let mut w = World::new(1, rolling());
        w.run(1, 0);
        // A scale raced a leader change: the one active set has the Deployment's size, but
        // its desired-replicas annotation is from before (as a chaos run left it).
        let mut old = (*w.sets[0]).clone();
        set_annotation(&mut old, DESIRED, "2".into());
        w.sets[0] = Arc::new(old);
        w.set_image("nginx:2");
        w.run(1, 0);
        assert_eq!(w.sizes(), [0, 1]);
        assert_eq!(w.d["status"]["updatedReplicas"], 1);
        assert_eq!(w.progressing(), "NewReplicaSetAvailable");
    }

    #[test]
    fn zero_surge_rolls_one_down_before_one_up() {
        let mut w =
            World::new(10, json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}));
        w.run(0, 1);
        w.set_image("nginx:2");
        w.run(0, 1);
        assert_eq!(w.sizes(), [0, 10]);
    }

    #[test]
    fn recreate_waits_for_the_old_pods_to_go() {
        let mut w = World::new(3, json!({"type": "Recreate"}));
        w.run(0, 3);
        w.set_image("nginx:2");
        w.pass();
        assert_eq!(w.sizes(), [0], "old scaled to zero, no new one yet");
        let old_pod =
            Arc::new(json!({"metadata": {"name": "p", "ownerReferences": [{"uid": "rs-0", "controller": true}]},
                                      "status": {"phase": "Running"}}));
        let sets: Vec<&Arc<Value>> = w.sets.iter().collect();
        let actions = reconcile(&w.d, &sets, &[&old_pod], w.clock);
        assert!(!actions.iter().any(|a| matches!(a, Action::Create(_))), "an old pod still runs: {actions:?}");
        w.settle();
        w.run(0, 3);
        assert_eq!(w.sizes(), [0, 3]);
    }

    #[test]
    fn recreate_with_two_active_sets_and_stale_annotations_goes_on_to_the_new_one() {
        let mut w = World::new(3, json!({"type": "Recreate"}));
        w.run(0, 3);
        w.set_image("nginx:2");
        w.run(0, 3);
        // Writes from views that were behind: the old set active again, and both sets
        // annotated with a size the Deployment no longer has.
        for (i, replicas) in [(0, 1), (1, 3)] {
            let mut set = (*w.sets[i]).clone();
            set["spec"]["replicas"] = json!(replicas);
            set_annotation(&mut set, DESIRED, "4".into());
            w.sets[i] = Arc::new(set);
        }
        w.run(1, 3);
        assert_eq!(w.sizes(), [0, 3]);
    }

    #[test]
    fn undo_brings_the_old_template_back_as_the_next_revision() {
        let mut w = World::new(2, rolling());
        w.run(1, 0);
        w.set_image("nginx:2");
        w.run(1, 0);
        // What `kubectl rollout undo` does: the old ReplicaSet's template without its hash,
        // as Go serializes it (`creationTimestamp: null`).
        let mut first = w.sets[0]["spec"]["template"].clone();
        first["metadata"]["labels"].as_object_mut().unwrap().remove(TEMPLATE_HASH);
        first["metadata"]["creationTimestamp"] = Value::Null;
        w.d["spec"]["template"] = first;
        w.run(1, 0);
        assert_eq!(w.sets.len(), 2, "no third ReplicaSet");
        assert_eq!(w.sizes(), [2, 0]);
        assert_eq!(w.sets[0]["metadata"]["annotations"][REVISION], "3");
        assert_eq!(w.sets[0]["metadata"]["annotations"][REVISION_HISTORY], "1");
        assert_eq!(w.d["metadata"]["annotations"][REVISION], "3");
    }

    #[test]
    fn a_paused_deployment_is_scaled_but_not_rolled() {
        let mut w = World::new(2, rolling());
        w.run(1, 0);
        w.d["spec"]["paused"] = json!(true);
        w.set_image("nginx:2");
        w.d["spec"]["replicas"] = json!(5);
        w.run(2, 0);
        assert_eq!(w.sizes(), [5], "scaled, and no new ReplicaSet while paused");
        assert_eq!(w.progressing(), "DeploymentPaused");
        w.d["spec"]["paused"] = json!(false);
        w.run(2, 1);
        assert_eq!(w.sizes(), [0, 5]);
    }

    #[test]
    fn scaling_during_a_rollout_is_shared_in_proportion() {
        let mut w =
            World::new(10, json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 3, "maxUnavailable": 2}}));
        w.run(3, 2);
        w.set_image("nginx:2");
        w.pass();
        assert_eq!(w.sizes(), [8, 3]);
        w.d["spec"]["replicas"] = json!(20);
        w.pass();
        // 13 pods become 23 (20 + 3 surge), the new room shared 8:3 (15 and 8 after rounding, leftover to the largest).
        assert_eq!(w.sizes().iter().sum::<i64>(), 23);
        assert!(w.sizes()[0] > w.sizes()[1], "{:?}", w.sizes());
        w.settle();
        w.run(3, 5);
        assert_eq!(w.sizes(), [0, 20]);
    }

    #[test]
    fn old_replicasets_beyond_the_history_limit_are_deleted() {
        let mut w = World::new(1, rolling());
        w.d["spec"]["revisionHistoryLimit"] = json!(1);
        for image in ["nginx:2", "nginx:3", "nginx:4"] {
            w.run(1, 0);
            w.set_image(image);
        }
        w.run(1, 0);
        let revisions: Vec<&str> =
            w.sets.iter().map(|s| s["metadata"]["annotations"][REVISION].as_str().unwrap()).collect();
        assert_eq!(revisions, ["3", "4"]);
    }

    #[test]
    fn a_rollout_that_does_not_progress_times_out() {
        let mut w = World::new(2, rolling());
        w.d["spec"]["progressDeadlineSeconds"] = json!(10);
        w.pass();
        assert_eq!(w.progressing(), "NewReplicaSetCreated");
        w.clock += 30;
        w.pass();
        assert_eq!(w.progressing(), "ProgressDeadlineExceeded");
        let c = w.d["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Progressing").unwrap();
        assert_eq!(
            (c["status"].as_str(), c["message"].as_str()),
            (
                Some("False"),
                Some(
                    format!(
                        "ReplicaSet \"{}\" has timed out progressing.",
                        w.sets[0]["metadata"]["name"].as_str().unwrap()
                    )
                    .as_str()
                )
            )
        );
        let available = w.d["status"]["conditions"][0].clone();
        assert_eq!((available["type"].as_str(), available["status"].as_str()), (Some("Available"), Some("False")));
    }

    #[test]
    fn a_taken_name_raises_the_collision_count() {
        let mut w = World::new(1, rolling());
        let hash = template_hash(&w.d["spec"]["template"], None);
        w.sets.push(Arc::new(json!({"metadata": {"name": format!("web-{hash}"), "namespace": "default", "uid": "x",
                                                  "labels": {"app": "other"}},
                                     "spec": {"replicas": 1, "template": {}}})));
        w.pass();
        assert_eq!(w.d["status"]["collisionCount"], 1);
        let actions = w.pass();
        let Some(Action::Create(rs)) = actions.first() else { panic!("{actions:?}") };
        assert_eq!(rs["metadata"]["name"], format!("web-{}", template_hash(&w.d["spec"]["template"], Some(1))));
    }

    #[test]
    fn percentages_round_surge_up_and_unavailability_down() {
        let d = json!({"spec": {"replicas": 10, "strategy": {"type": "RollingUpdate",
                       "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}}});
        assert_eq!(fenceposts(&d), (3, 2));
        let d =
            json!({"spec": {"replicas": 1, "strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}}}});
        assert_eq!(fenceposts(&d), (0, 1), "never both zero");
    }
}
