//! The garbage collector, by ownerReferences, over pods, ReplicaSets and Deployments.
//! Background deletion: an object whose owners are all gone is deleted; one that lost some
//! of its owners loses those references. An owner marked with the `orphan` finalizer has its
//! references removed from its dependents, then the finalizer; one marked
//! `foregroundDeletion` has its dependents deleted first, then the finalizer. An owner is
//! only taken as gone once a quorum read confirms it (an informer may simply be behind).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use corral_api::meta::JsonAt;
use serde_json::{Value, json};

use crate::cluster::{Cluster, ClusterError, text};
use crate::informer::Informers;

/// The resources collected, and the kinds their owners may be.
pub const RESOURCES: [(&str, &str); 7] = [
    ("pods", "Pod"),
    ("apps/replicasets", "ReplicaSet"),
    ("apps/deployments", "Deployment"),
    ("services", "Service"),
    ("discovery.k8s.io/endpointslices", "EndpointSlice"),
    ("nodes", "Node"),
    ("coordination.k8s.io/leases", "Lease"),
];
const DEBOUNCE: Duration = Duration::from_millis(50);
const RESYNC: Duration = Duration::from_secs(30);

fn plural_of(kind: &str) -> Option<&'static str> {
    RESOURCES.iter().find(|(_, k)| *k == kind).map(|(p, _)| *p)
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Delete the object (background), once the owners named are confirmed gone (none: now).
    Delete { plural: &'static str, object: Arc<Value>, gone: Vec<Value> },
    /// Write the object as given (references or finalizers removed), once the owners named
    /// are confirmed gone (none: now).
    Update { plural: &'static str, object: Value, gone: Vec<Value> },
}

fn refs(obj: &Value) -> &[Value] {
    obj.at("/metadata/ownerReferences").and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn finalizers(obj: &Value) -> Vec<&str> {
    obj.at("/metadata/finalizers").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect()
}

fn deleting(obj: &Value) -> bool {
    obj.at("/metadata/deletionTimestamp").is_some()
}

fn without_refs(obj: &Value, uids: &[&str]) -> Value {
    let mut out = obj.clone();
    let kept: Vec<Value> = refs(obj).iter().filter(|r| !uids.contains(&text(r, "/uid"))).cloned().collect();
    out["metadata"]["ownerReferences"] = Value::Array(kept);
    out
}

/// What to do, from every collected object (with its plural).
pub fn plan(objects: &[(&'static str, Arc<Value>)]) -> Vec<Action> {
    // Most objects have no owner and are no owner being deleted: those are read once, for
    // two fields, and only the owners that dependents name are looked up.
    let with_owners: Vec<&(&'static str, Arc<Value>)> = objects.iter().filter(|(_, o)| !refs(o).is_empty()).collect();
    let deleting_owners: Vec<&(&'static str, Arc<Value>)> = objects.iter().filter(|(_, o)| deleting(o)).collect();
    let named: std::collections::HashSet<&str> =
        with_owners.iter().flat_map(|(_, o)| refs(o)).map(|r| text(r, "/uid")).collect();
    // Owners are looked for among the kinds named only (a Lease's owner is a Node: the
    // pods need not be read for it).
    let kinds: std::collections::HashSet<&str> =
        with_owners.iter().flat_map(|(_, o)| refs(o)).filter_map(|r| plural_of(text(r, "/kind"))).collect();
    let by_uid: HashMap<&str, &Arc<Value>> = objects
        .iter()
        .filter(|(plural, _)| kinds.contains(plural))
        .map(|(_, o)| (text(o, "/metadata/uid"), o))
        .filter(|(uid, _)| named.contains(uid))
        .collect();
    let mut dependents: HashMap<&str, usize> = HashMap::new();
    let mut actions = Vec::new();
    for (plural, obj) in with_owners {
        let owners = refs(obj);
        let mut missing = Vec::new();
        let mut orphaned_by = Vec::new();
        let mut foreground = false;
        for r in owners {
            let uid = text(r, "/uid");
            *dependents.entry(uid).or_default() += 1;
            match by_uid.get(uid) {
                // Only kinds collected here are judged; anything else is left alone.
                None if plural_of(text(r, "/kind")).is_some() => missing.push(r.clone()),
                None => {}
                Some(owner) if deleting(owner) && finalizers(owner).contains(&"orphan") => orphaned_by.push(uid),
                Some(owner) if deleting(owner) && finalizers(owner).contains(&"foregroundDeletion") => {
                    foreground = true
                }
                Some(_) => {}
            }
        }
        if !orphaned_by.is_empty() {
            actions.push(Action::Update { plural, object: without_refs(obj, &orphaned_by), gone: Vec::new() });
        } else if !missing.is_empty() && missing.len() == owners.len() || foreground {
            if !deleting(obj) {
                let gone = if foreground { Vec::new() } else { missing };
                actions.push(Action::Delete { plural, object: obj.clone(), gone });
            }
        } else if !missing.is_empty() {
            let uids: Vec<&str> = missing.iter().map(|r| text(r, "/uid")).collect();
            let object = without_refs(obj, &uids);
            actions.push(Action::Update { plural, object, gone: missing });
        }
    }
    // Owners whose finalizer has done its work: no dependent refers to them any more.
    for (plural, owner) in deleting_owners {
        let uid = text(owner, "/metadata/uid");
        if dependents.get(uid).is_some_and(|n| *n > 0) {
            continue;
        }
        let held = finalizers(owner);
        if held.contains(&"orphan") || held.contains(&"foregroundDeletion") {
            let mut released = (**owner).clone();
            let kept: Vec<&str> = held.into_iter().filter(|f| !matches!(*f, "orphan" | "foregroundDeletion")).collect();
            released["metadata"]["finalizers"] = json!(kept);
            actions.push(Action::Update { plural, object: released, gone: Vec::new() });
        }
    }
    actions
}

/// Whether the owner a reference names is really gone: not found, or replaced by another
/// object of the same name.
async fn confirmed_gone<C: Cluster>(cluster: &C, namespace: &str, owner: &Value) -> bool {
    let Some(plural) = plural_of(text(owner, "/kind")) else { return false };
    match cluster.get(plural, namespace, text(owner, "/name")).await {
        Err(ClusterError::NotFound(_)) => true,
        Ok(found) => text(&found, "/metadata/uid") != text(owner, "/uid"),
        Err(_) => false,
    }
}

/// Runs the collector until aborted.
pub async fn run<C: Cluster>(cluster: Arc<C>, shared: Arc<Informers>) {
    let mut informers = Vec::new();
    for (plural, _) in RESOURCES {
        informers.push((plural, shared.get(plural).await));
    }
    loop {
        let pass = std::time::Instant::now();
        let changes: Vec<_> = informers.iter().map(|(_, i)| Box::pin(i.changed())).collect();
        let objects: Vec<(&'static str, Arc<Value>)> =
            informers.iter().flat_map(|(p, i)| i.list().into_iter().map(move |o| (*p, o))).collect();
        // One quorum read per gone owner per pass, however many dependents it had.
        let mut gone: HashMap<String, bool> = HashMap::new();
        for action in plan(&objects) {
            carry_out(cluster.as_ref(), action, &mut gone).await;
        }
        let worked = pass.elapsed();
        tokio::select! {
            _ = futures::future::select_all(changes) => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
        // A collector may lag: a twentieth of a core at most, however large the cluster.
        crate::informer::pace(worked, DEBOUNCE, 0.05).await;
    }
}

async fn carry_out<C: Cluster>(cluster: &C, action: Action, gone_owners: &mut HashMap<String, bool>) {
    let (object, gone) = match &action {
        Action::Delete { object, gone, .. } => (object.as_ref(), gone),
        Action::Update { object, gone, .. } => (object, gone),
    };
    let namespace = text(object, "/metadata/namespace");
    for owner in gone {
        let key = format!("{namespace}/{}", text(owner, "/uid"));
        let confirmed = match gone_owners.get(&key) {
            Some(c) => *c,
            None => {
                let c = confirmed_gone(cluster, namespace, owner).await;
                gone_owners.insert(key, c);
                c
            }
        };
        if !confirmed {
            return;
        }
    }
    let name = text(object, "/metadata/name");
    let result = match &action {
        Action::Delete { plural, object, .. } => {
            let options =
                json!({"propagationPolicy": "Background", "preconditions": {"uid": text(object, "/metadata/uid")}});
            tracing::info!(resource = plural, namespace, name, "garbage-collecting: its owner is gone");
            cluster.delete(plural, namespace, name, options).await
        }
        Action::Update { plural, object, .. } => cluster.update(plural, object.clone()).await.map(|_| ()),
    };
    match result {
        Ok(()) | Err(ClusterError::NotFound(_)) | Err(ClusterError::Conflict(_)) => {}
        Err(e) => tracing::warn!(namespace, name, error = %e, "garbage collection"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(kind: &str, name: &str, uid: &str, owners: &[(&str, &str)]) -> Arc<Value> {
        let refs: Vec<Value> =
            owners.iter().map(|(k, u)| json!({"kind": k, "name": "owner", "uid": u, "controller": true})).collect();
        Arc::new(
            json!({"kind": kind, "metadata": {"name": name, "namespace": "default", "uid": uid, "ownerReferences": refs}}),
        )
    }

    fn marked(o: &Arc<Value>, finalizer: &str) -> Arc<Value> {
        let mut v = (**o).clone();
        v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        v["metadata"]["finalizers"] = json!([finalizer]);
        Arc::new(v)
    }

    #[test]
    fn dependents_of_a_gone_owner_are_deleted_once_it_is_confirmed_gone() {
        let pod = obj("Pod", "web-1", "p1", &[("ReplicaSet", "rs-gone")]);
        let actions = plan(&[("pods", pod)]);
        let [Action::Delete { plural: "pods", gone, .. }] = &actions[..] else { panic!("{actions:?}") };
        assert_eq!(gone[0]["uid"], "rs-gone", "the owner is checked before the delete");
    }

    #[test]
    fn live_owners_keep_their_dependents_and_unknown_kinds_are_left_alone() {
        let rs = obj("ReplicaSet", "web", "rs1", &[]);
        let pod = obj("Pod", "web-1", "p1", &[("ReplicaSet", "rs1")]);
        let foreign = obj("Pod", "other", "p2", &[("StatefulSet", "ss1")]);
        assert!(plan(&[("apps/replicasets", rs), ("pods", pod), ("pods", foreign)]).is_empty());
        let two = obj("Pod", "shared", "p3", &[("ReplicaSet", "rs1"), ("ReplicaSet", "rs-gone")]);
        let rs = obj("ReplicaSet", "web", "rs1", &[]);
        let actions = plan(&[("apps/replicasets", rs), ("pods", two)]);
        let [Action::Update { object, .. }] = &actions[..] else { panic!("{actions:?}") };
        assert_eq!(
            object["metadata"]["ownerReferences"].as_array().unwrap().len(),
            1,
            "only the dangling reference goes"
        );
    }

    #[test]
    fn orphan_and_foreground_finalizers_run_then_go() {
        let rs = obj("ReplicaSet", "web", "rs1", &[]);
        let pod = obj("Pod", "web-1", "p1", &[("ReplicaSet", "rs1")]);
        let actions = plan(&[("apps/replicasets", marked(&rs, "orphan")), ("pods", pod.clone())]);
        let [Action::Update { plural: "pods", object, .. }] = &actions[..] else { panic!("{actions:?}") };
        assert_eq!(object["metadata"]["ownerReferences"], json!([]), "orphaned, not deleted");
        let actions = plan(&[("apps/replicasets", marked(&rs, "orphan"))]);
        let [Action::Update { plural: "apps/replicasets", object, .. }] = &actions[..] else { panic!("{actions:?}") };
        assert_eq!(object["metadata"]["finalizers"], json!([]));

        let actions = plan(&[("apps/replicasets", marked(&rs, "foregroundDeletion")), ("pods", pod)]);
        assert!(matches!(&actions[..], [Action::Delete { plural: "pods", .. }]), "dependents first: {actions:?}");
        let actions = plan(&[("apps/replicasets", marked(&rs, "foregroundDeletion"))]);
        assert!(matches!(&actions[..], [Action::Update { plural: "apps/replicasets", .. }]), "then the owner");
    }
}
