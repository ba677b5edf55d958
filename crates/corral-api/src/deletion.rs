//! What a DELETE does to an object, as kube-apiserver decides it: remove it now, or mark it
//! (deletionTimestamp, deletionGracePeriodSeconds, finalizers) for someone else to finish.
//!
//! A pod bound to a node is deleted gracefully: it is marked with its grace period and its
//! kubelet (Corral's agent) stops the containers, then deletes it with grace 0. Finalizers,
//! including the garbage collector's `orphan` and `foregroundDeletion`, keep a marked object
//! until the last one is removed by an update.

use serde_json::{Value, json};

use crate::meta;
use crate::resources::Resource;
use crate::status::ApiError;

/// The default grace period of a pod that does not set one.
pub const DEFAULT_POD_GRACE_SECONDS: i64 = 30;

/// How the dependents of a deleted object are treated (`propagationPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// Unset: the object's own finalizers decide.
    Default,
    Background,
    Foreground,
    Orphan,
}

impl Propagation {
    pub fn parse(text: Option<&str>) -> Result<Self, ApiError> {
        match text {
            None | Some("") => Ok(Self::Default),
            Some("Background") => Ok(Self::Background),
            Some("Foreground") => Ok(Self::Foreground),
            Some("Orphan") => Ok(Self::Orphan),
            Some(other) => Err(ApiError::BadRequest(format!("unsupported propagation policy {other:?}"))),
        }
    }
}

/// The outcome of a DELETE request on one object.
#[derive(Debug, PartialEq)]
pub enum Deletion {
    /// Remove the object from the store now.
    Now,
    /// Write this marked object; whoever holds a finalizer or runs the pod finishes it.
    Mark(Value),
    /// Already marked at least as soon: nothing to write.
    Unchanged,
}

/// Decides a DELETE of `obj` with the request's grace period (`gracePeriodSeconds`) and
/// propagation policy, at `now` (seconds since the epoch).
pub fn plan(r: &Resource, obj: &Value, grace: Option<i64>, policy: Propagation, now: i64) -> Deletion {
    let period = grace_period(r, obj, grace);
    let old_finalizers = finalizers(obj);
    let mut wanted = old_finalizers.clone();
    let (add, drop) = match policy {
        Propagation::Default => (None, None),
        Propagation::Background => (None, Some(["orphan", "foregroundDeletion"].as_slice())),
        Propagation::Foreground => (Some("foregroundDeletion"), Some(["orphan"].as_slice())),
        Propagation::Orphan => (Some("orphan"), Some(["foregroundDeletion"].as_slice())),
    };
    if let Some(drop) = drop {
        wanted.retain(|f| !drop.contains(&f.as_str()));
    }
    if let Some(add) = add
        && !wanted.iter().any(|f| f == add)
    {
        wanted.push(add.to_string());
    }
    let marked_grace = obj.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_i64);
    let already = obj.pointer("/metadata/deletionTimestamp").is_some();
    if wanted.is_empty() && period == 0 {
        return Deletion::Now;
    }
    let shorter = match marked_grace {
        Some(g) => period < g,
        None => !already,
    };
    if already && !shorter && wanted == old_finalizers {
        return Deletion::Unchanged;
    }
    let mut new = obj.clone();
    let m = meta::metadata_mut(&mut new);
    if !already || shorter {
        m.insert("deletionTimestamp".into(), json!(meta::rfc3339(now + period)));
        m.insert("deletionGracePeriodSeconds".into(), json!(period));
    }
    if wanted.is_empty() {
        m.remove("finalizers");
    } else {
        m.insert("finalizers".into(), json!(wanted));
    }
    Deletion::Mark(new)
}

/// True when a marked object has nothing left to wait for, so that the update that removed
/// its last finalizer (or a pod's final delete) removes it from the store.
pub fn finished(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some()
        && finalizers(obj).is_empty()
        && obj.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_i64).unwrap_or(0) == 0
}

/// Seconds until the object should be gone: only pods running on a node wait.
fn grace_period(r: &Resource, obj: &Value, grace: Option<i64>) -> i64 {
    if !r.group.is_empty() || r.plural != "pods" {
        return 0;
    }
    let on_node = obj.pointer("/spec/nodeName").and_then(Value::as_str).is_some_and(|n| !n.is_empty());
    let phase = obj.pointer("/status/phase").and_then(Value::as_str).unwrap_or_default();
    if !on_node || matches!(phase, "Succeeded" | "Failed") {
        return 0;
    }
    let default =
        obj.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_i64).unwrap_or(DEFAULT_POD_GRACE_SECONDS);
    match grace {
        Some(g) if g >= 0 => g,
        _ => default.max(0),
    }
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|f| f.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources;

    fn pods() -> &'static Resource {
        resources::find("", "pods").expect("pods are served")
    }

    fn pod(node: &str) -> Value {
        json!({"metadata": {"name": "web"}, "spec": {"nodeName": node, "terminationGracePeriodSeconds": 20},
               "status": {"phase": "Running"}})
    }

    fn marked(d: Deletion) -> Value {
        match d {
            Deletion::Mark(v) => v,
            other => panic!("expected a mark, got {other:?}"),
        }
    }

    #[test]
    fn a_pod_on_a_node_waits_its_grace_period_and_a_shorter_one_brings_it_forward() {
        let first = marked(plan(pods(), &pod("n1"), None, Propagation::Default, 1_000));
        assert_eq!(first["metadata"]["deletionGracePeriodSeconds"], 20);
        assert_eq!(first["metadata"]["deletionTimestamp"], meta::rfc3339(1_020));
        assert!(!finished(&first));

        assert_eq!(plan(pods(), &first, None, Propagation::Default, 1_005), Deletion::Unchanged);
        assert_eq!(plan(pods(), &first, Some(30), Propagation::Default, 1_005), Deletion::Unchanged);
        let sooner = marked(plan(pods(), &first, Some(5), Propagation::Default, 1_005));
        assert_eq!(sooner["metadata"]["deletionTimestamp"], meta::rfc3339(1_010));
        assert_eq!(plan(pods(), &sooner, Some(0), Propagation::Default, 1_006), Deletion::Now);
    }

    #[test]
    fn unscheduled_and_finished_pods_and_other_kinds_go_at_once() {
        assert_eq!(plan(pods(), &pod(""), None, Propagation::Default, 0), Deletion::Now);
        let mut done = pod("n1");
        done["status"]["phase"] = json!("Succeeded");
        assert_eq!(plan(pods(), &done, Some(30), Propagation::Default, 0), Deletion::Now);
        let cm = resources::find("", "configmaps").expect("served");
        assert_eq!(plan(cm, &json!({"metadata": {"name": "c"}}), Some(30), Propagation::Default, 0), Deletion::Now);
    }

    #[test]
    fn finalizers_hold_the_object_until_an_update_removes_the_last() {
        let cm = resources::find("", "configmaps").expect("served");
        let obj = json!({"metadata": {"name": "c", "finalizers": ["example.com/keep"]}});
        let held = marked(plan(cm, &obj, None, Propagation::Default, 50));
        assert_eq!(held["metadata"]["deletionGracePeriodSeconds"], 0);
        assert!(!finished(&held));
        let mut released = held.clone();
        released["metadata"].as_object_mut().expect("metadata").remove("finalizers");
        assert!(finished(&released));
    }

    #[test]
    fn propagation_policies_set_the_garbage_collectors_finalizers() {
        let rs = resources::find("apps", "replicasets").expect("served");
        let obj = json!({"metadata": {"name": "r"}});
        let orphan = marked(plan(rs, &obj, None, Propagation::Orphan, 0));
        assert_eq!(orphan["metadata"]["finalizers"], json!(["orphan"]));
        let foreground = marked(plan(rs, &orphan, None, Propagation::Foreground, 0));
        assert_eq!(foreground["metadata"]["finalizers"], json!(["foregroundDeletion"]));
        assert_eq!(plan(rs, &foreground, None, Propagation::Foreground, 9), Deletion::Unchanged);
        assert_eq!(plan(rs, &obj, None, Propagation::Background, 0), Deletion::Now);
        assert!(Propagation::parse(Some("Sideways")).is_err());
    }
}
