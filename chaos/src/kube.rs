//! The control plane's checkers, judged on the store's own record of the run: every object
//! under `/registry/` as it stood when the run began, then every change in revision order
//! (a watch from the run's first revision, read after healing). Pure: the binary reads the
//! log and the objects; these functions only replay them.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use crate::checks::Check;

/// One change to a Kubernetes object in the store: its key and what it became (`None`: deleted).
#[derive(Clone, Debug)]
pub struct Change {
    pub revision: i64,
    pub key: String,
    pub object: Option<Value>,
}

/// The store's record of a run: the objects at its start, then its changes.
#[derive(Clone, Debug, Default)]
pub struct ControlPlaneLog {
    pub initial: Vec<(String, Value)>,
    pub changes: Vec<Change>,
}

/// The resource of a key: `/registry/pods/default/web-1` is `pods`.
fn resource(key: &str) -> &str {
    key.strip_prefix("/registry/").and_then(|k| k.split('/').next()).unwrap_or("")
}

fn str_at<'a>(object: &'a Value, pointer: &str) -> Option<&'a str> {
    object.pointer(pointer).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn uid(object: &Value) -> Option<&str> {
    str_at(object, "/metadata/uid")
}

/// The uid of the object's controller (its ownerReference with `controller: true`).
fn controller(object: &Value) -> Option<&str> {
    object.pointer("/metadata/ownerReferences")?.as_array()?.iter().find(|r| r["controller"] == true)?["uid"].as_str()
}

/// A pod counts against its ReplicaSet while it is neither terminating nor finished, as the
/// ReplicaSet controller counts it.
fn active_pod(pod: &Value) -> bool {
    pod.pointer("/metadata/deletionTimestamp").is_none_or(Value::is_null)
        && !matches!(str_at(pod, "/status/phase"), Some("Succeeded" | "Failed"))
}

/// The surge a Deployment allows over its replicas: `maxSurge`, an integer or a percentage
/// rounded up (25% by default), for RollingUpdate; none for Recreate.
pub fn max_surge(deployment: &Value, replicas: i64) -> i64 {
    if str_at(deployment, "/spec/strategy/type") == Some("Recreate") {
        return 0;
    }
    match deployment.pointer("/spec/strategy/rollingUpdate/maxSurge") {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) if s.ends_with('%') => {
            let percent: i64 = s.trim_end_matches('%').parse().unwrap_or(25);
            (replicas * percent + 99) / 100
        }
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => (replicas * 25 + 99) / 100,
    }
}

/// Every version of the `resource`'s objects in the log, the initial ones at revision 0,
/// in revision order (deletions left out).
fn versions<'a>(
    log: &'a ControlPlaneLog,
    resource_name: &'a str,
) -> impl Iterator<Item = (i64, &'a String, &'a Value)> {
    let initial = log.initial.iter().map(|(k, v)| (0, k, v));
    let changes = log.changes.iter().filter_map(|c| c.object.as_ref().map(|o| (c.revision, &c.key, o)));
    initial.chain(changes).filter(move |(_, k, _)| resource(k) == resource_name)
}

/// The first three findings, for a check's detail.
fn first_few(findings: Vec<String>) -> String {
    findings.into_iter().take(3).collect::<Vec<_>>().join("; ")
}

/// Replays the log, calling `visit` with the objects after each change (and once for the
/// initial state, with revision 0).
fn replay(log: &ControlPlaneLog, mut visit: impl FnMut(i64, &str, &BTreeMap<String, Value>)) {
    let mut objects: BTreeMap<String, Value> = log.initial.iter().cloned().collect();
    visit(0, "", &objects);
    for change in &log.changes {
        match &change.object {
            Some(object) => objects.insert(change.key.clone(), object.clone()),
            None => objects.remove(&change.key),
        };
        visit(change.revision, &change.key, &objects);
    }
}

/// Every pod bound once: a pod's node, once set, never changes (across every version of it
/// in the log).
pub fn bound_once(log: &ControlPlaneLog) -> Check {
    let mut nodes: HashMap<String, String> = HashMap::new();
    let mut rebound = Vec::new();
    for (revision, key, pod) in versions(log, "pods") {
        let (Some(uid), Some(node)) = (uid(pod), str_at(pod, "/spec/nodeName")) else { continue };
        match nodes.get(uid) {
            Some(first) if first != node => rebound.push(format!("{key} moved from {first} to {node} at {revision}")),
            Some(_) => {}
            None => {
                nodes.insert(uid.to_string(), node.to_string());
            }
        }
    }
    Check {
        name: "pods bound once",
        criterion: "no pod's node changes once it is bound",
        passed: rebound.is_empty(),
        detail: if rebound.is_empty() {
            format!("{} pods bound", nodes.len())
        } else {
            format!("{} rebound: {}", rebound.len(), first_few(rebound))
        },
    }
}

/// No ReplicaSet ever has more active pods than the most replicas it was asked for so far,
/// at any revision (a controller that creates twice after a failover is caught even if it
/// later deletes the extra pod), and, once settled (the log's last revision, read after the
/// deployments settled), no Deployment more than its replicas plus its surge. Between, a
/// Deployment may pass that: its old ReplicaSet is scaled down before its pod is deleted,
/// while the new one may already be scaled up, in Kubernetes too.
pub fn replicas_bounded(log: &ControlPlaneLog) -> Check {
    // The most replicas each ReplicaSet and Deployment (by uid) was asked for so far, and
    // each Deployment's surge at that size.
    let mut rs_most: HashMap<String, i64> = HashMap::new();
    let mut deploy_most: HashMap<String, (i64, i64)> = HashMap::new();
    let mut over = Vec::new();
    let mut peak_checked = 0usize;
    let last = log.changes.last().map_or(0, |c| c.revision);
    replay(log, |revision, key, objects| {
        let changed = resource(key);
        if revision != 0 && !matches!(changed, "pods" | "replicasets" | "deployments") {
            return;
        }
        let mut rs_owner: HashMap<&str, &str> = HashMap::new();
        for (k, o) in objects {
            let Some(id) = uid(o) else { continue };
            match resource(k) {
                "replicasets" => {
                    let replicas = o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
                    let most = rs_most.entry(id.to_string()).or_insert(replicas);
                    *most = (*most).max(replicas);
                    if let Some(owner) = controller(o) {
                        rs_owner.insert(id, owner);
                    }
                }
                "deployments" => {
                    let replicas = o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1);
                    let most = deploy_most.entry(id.to_string()).or_insert((replicas, max_surge(o, replicas)));
                    if replicas > most.0 {
                        *most = (replicas, max_surge(o, replicas));
                    }
                }
                _ => {}
            }
        }
        let mut per_rs: HashMap<&str, i64> = HashMap::new();
        for (k, o) in objects {
            if resource(k) == "pods"
                && active_pod(o)
                && let Some(rs) = controller(o)
            {
                *per_rs.entry(rs).or_default() += 1;
            }
        }
        let mut per_deploy: HashMap<&str, i64> = HashMap::new();
        for (rs, count) in &per_rs {
            peak_checked += 1;
            if let Some(most) = rs_most.get(*rs).filter(|most| count > *most) {
                over.push(format!("ReplicaSet {rs} had {count} pods (at most {most} asked) at revision {revision}"));
            }
            if let Some(deploy) = rs_owner.get(rs) {
                *per_deploy.entry(deploy).or_default() += count;
            }
        }
        if revision != last {
            return;
        }
        for (deploy, count) in per_deploy {
            if let Some((most, surge)) = deploy_most.get(deploy).filter(|(most, surge)| count > most + surge) {
                over.push(format!(
                    "Deployment {deploy} had {count} pods (at most {most} + surge {surge}) at revision {revision}"
                ));
            }
        }
    });
    over.dedup();
    Check {
        name: "replicas bounded",
        criterion: "no ReplicaSet has more active pods than it was asked for at any revision; once settled, no Deployment more than replicas + maxSurge",
        passed: over.is_empty(),
        detail: if over.is_empty() {
            format!("{} ReplicaSets, {} Deployments, {} counts", rs_most.len(), deploy_most.len(), peak_checked)
        } else {
            format!("{} violations: {}", over.len(), first_few(over))
        },
    }
}

/// No node's Ready condition left True at any revision: every agent ran and renewed its
/// Lease throughout (the faults hit servers only), so a node marked NotReady or Unknown is
/// the control plane misjudging it (a clock read across a jump, a new leader's first look).
pub fn nodes_stayed_ready(log: &ControlPlaneLog) -> Check {
    let mut nodes = HashSet::new();
    let mut lapses = Vec::new();
    for (revision, key, node) in versions(log, "nodes") {
        let ready = node
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .and_then(|c| c["status"].as_str());
        nodes.insert(key.clone());
        if let Some(status) = ready.filter(|s| *s != "True") {
            lapses.push(format!("{key} Ready={status} at revision {revision}"));
        }
    }
    Check {
        name: "nodes stayed ready",
        criterion: "no node's Ready condition leaves True while its agent runs",
        passed: lapses.is_empty(),
        detail: if lapses.is_empty() {
            format!("{} nodes", nodes.len())
        } else {
            format!("{} lapses: {}", lapses.len(), first_few(lapses))
        },
    }
}

/// What a live object holds that must be unique in the cluster: a node's pod CIDR, a
/// Service's cluster IP and node ports.
fn allocations(key: &str, object: &Value) -> Vec<String> {
    match resource(key) {
        "nodes" => str_at(object, "/spec/podCIDR").map(|c| vec![format!("pod CIDR {c}")]).unwrap_or_default(),
        "services" => {
            let mut out = Vec::new();
            if let Some(ip) = str_at(object, "/spec/clusterIP").filter(|ip| *ip != "None") {
                out.push(format!("cluster IP {ip}"));
            }
            for port in object.pointer("/spec/ports").and_then(Value::as_array).into_iter().flatten() {
                if let Some(n) = port["nodePort"].as_i64().filter(|n| *n > 0) {
                    out.push(format!("node port {n}"));
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

/// No pod CIDR, cluster IP or node port held by two live objects at any revision.
pub fn unique_allocations(log: &ControlPlaneLog) -> Check {
    let mut seen = HashSet::new();
    let mut duplicates = Vec::new();
    replay(log, |revision, key, objects| {
        if revision != 0 && !matches!(resource(key), "nodes" | "services") {
            return;
        }
        let mut holders: HashMap<String, &str> = HashMap::new();
        for (k, o) in objects {
            for a in allocations(k, o) {
                seen.insert(a.clone());
                if let Some(other) = holders.insert(a.clone(), k) {
                    duplicates.push(format!("{a} held by {other} and {k} at revision {revision}"));
                }
            }
        }
    });
    duplicates.sort();
    duplicates.dedup();
    Check {
        name: "unique allocations",
        criterion: "no pod CIDR, cluster IP or node port is held by two live objects at any revision",
        passed: duplicates.is_empty(),
        detail: if duplicates.is_empty() { format!("{} allocations", seen.len()) } else { first_few(duplicates) },
    }
}

/// What a running pod is, for comparing it before and after an outage: its uid, node, and
/// each container's id and restart count.
pub fn pod_fingerprint(pod: &Value) -> Option<(String, String)> {
    if str_at(pod, "/status/phase") != Some("Running") {
        return None;
    }
    let name = format!("{}/{}", str_at(pod, "/metadata/namespace")?, str_at(pod, "/metadata/name")?);
    let containers: Vec<String> = pod
        .pointer("/status/containerStatuses")?
        .as_array()?
        .iter()
        .map(|c| format!("{}#{}", c["containerID"].as_str().unwrap_or("?"), c["restartCount"].as_i64().unwrap_or(-1)))
        .collect();
    Some((name, format!("{} on {} {}", uid(pod)?, str_at(pod, "/spec/nodeName")?, containers.join(","))))
}

/// With every server down, pods keep running: each pod running before the outage is there
/// after it, the same pod (uid), on the same node, with the same containers, none
/// restarted, none terminating.
pub fn pods_undisturbed(before: &[Value], after: &[Value]) -> Check {
    let now: HashMap<String, (&Value, Option<String>)> = after
        .iter()
        .filter_map(|p| {
            let name = format!("{}/{}", str_at(p, "/metadata/namespace")?, str_at(p, "/metadata/name")?);
            Some((name, (p, pod_fingerprint(p).map(|(_, f)| f))))
        })
        .collect();
    let running: Vec<(String, String)> = before.iter().filter_map(pod_fingerprint).collect();
    let mut disturbed = Vec::new();
    for (name, was) in &running {
        match now.get(name) {
            None => disturbed.push(format!("{name} is gone")),
            Some((pod, _)) if pod.pointer("/metadata/deletionTimestamp").is_some_and(|v| !v.is_null()) => {
                disturbed.push(format!("{name} is terminating"))
            }
            Some((_, Some(is))) if is == was => {}
            Some((_, is)) => disturbed.push(format!("{name} was {was}, is {}", is.as_deref().unwrap_or("not running"))),
        }
    }
    Check {
        name: "pods undisturbed",
        criterion: "every pod running before all servers went down runs after, unrestarted and not evicted",
        passed: disturbed.is_empty() && !running.is_empty(),
        detail: if running.is_empty() {
            "no pod was running before the outage: nothing was tested".into()
        } else if disturbed.is_empty() {
            format!("{} pods", running.len())
        } else {
            format!("{} of {}: {}", disturbed.len(), running.len(), first_few(disturbed))
        },
    }
}

/// Every node Ready again within `bound_s` of the servers' return.
pub fn nodes_ready(ready_after_s: Option<f64>, nodes: usize, bound_s: f64) -> Check {
    Check {
        name: "nodes ready",
        criterion: "every node is Ready within 40 s of the servers' return",
        passed: ready_after_s.is_some_and(|s| s <= bound_s) && nodes > 0,
        detail: match ready_after_s {
            Some(s) => format!("{nodes} nodes Ready {s:.1} s after the servers returned"),
            None => format!("not every one of {nodes} nodes was Ready within {bound_s:.0} s"),
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, uid: &str, rs: &str, node: &str) -> (String, Value) {
        (
            format!("/registry/pods/default/{name}"),
            json!({"metadata": {"name": name, "namespace": "default", "uid": uid,
                    "ownerReferences": [{"uid": rs, "controller": true}]},
                   "spec": {"nodeName": node}, "status": {"phase": "Running",
                    "containerStatuses": [{"containerID": format!("containerd://{uid}"), "restartCount": 0}]}}),
        )
    }

    fn rs(name: &str, uid: &str, deploy: &str, replicas: i64) -> (String, Value) {
        (
            format!("/registry/replicasets/default/{name}"),
            json!({"metadata": {"name": name, "uid": uid, "ownerReferences": [{"uid": deploy, "controller": true}]},
                   "spec": {"replicas": replicas}}),
        )
    }

    fn change(revision: i64, (key, object): (String, Value)) -> Change {
        Change { revision, key, object: Some(object) }
    }

    #[test]
    fn a_pod_that_moves_to_another_node_is_caught() {
        let log = ControlPlaneLog {
            initial: vec![pod("web-1", "u1", "rs", "a1")],
            changes: vec![change(5, pod("web-1", "u1", "rs", "a1")), change(6, pod("web-1", "u1", "rs", "a2"))],
        };
        let check = bound_once(&log);
        assert!(!check.passed, "{}", check.detail);
        assert!(check.detail.contains("from a1 to a2"), "{}", check.detail);

        // The same name for a new pod (a new uid) may land anywhere.
        let log = ControlPlaneLog {
            initial: vec![pod("web-1", "u1", "rs", "a1")],
            changes: vec![
                Change { revision: 5, key: "/registry/pods/default/web-1".into(), object: None },
                change(6, pod("web-1", "u2", "rs", "a2")),
            ],
        };
        assert!(bound_once(&log).passed);
    }

    #[test]
    fn a_replicaset_over_its_replicas_is_caught_and_a_scale_down_is_not() {
        let deploy = (
            "/registry/deployments/default/web".to_string(),
            json!({"metadata": {"uid": "d"}, "spec": {"replicas": 2}}),
        );
        // Scaled from 3 to 2: for a while three pods remain, which 3 allows.
        let log = ControlPlaneLog {
            initial: vec![
                deploy.clone(),
                rs("web-x", "rs", "d", 3),
                pod("p1", "u1", "rs", "a1"),
                pod("p2", "u2", "rs", "a1"),
            ],
            changes: vec![change(3, pod("p3", "u3", "rs", "a1")), change(4, rs("web-x", "rs", "d", 2))],
        };
        let check = replicas_bounded(&log);
        assert!(check.passed, "{}", check.detail);

        // A fourth pod for a ReplicaSet never asked for more than three.
        let mut log = log;
        log.changes.push(change(5, pod("p4", "u4", "rs", "a2")));
        let check = replicas_bounded(&log);
        assert!(!check.passed);
        assert!(check.detail.contains("had 4 pods"), "{}", check.detail);

        // A terminating pod does not count.
        let (key, mut p4) = pod("p4", "u4", "rs", "a2");
        p4["metadata"]["deletionTimestamp"] = json!("2026-11-24T00:00:00Z");
        let last = log.changes.len() - 1;
        log.changes[last] = Change { revision: 5, key, object: Some(p4) };
        assert!(replicas_bounded(&log).passed);
    }

    #[test]
    fn a_deployment_past_its_surge_is_caught() {
        // 4 replicas, maxSurge 25%: one extra pod at most, across old and new ReplicaSets.
        let deploy = (
            "/registry/deployments/default/web".to_string(),
            json!({"metadata": {"uid": "d"}, "spec": {"replicas": 4}}),
        );
        let mut initial = vec![deploy, rs("old", "r1", "d", 4), rs("new", "r2", "d", 2)];
        for i in 0..4 {
            initial.push(pod(&format!("o{i}"), &format!("o{i}"), "r1", "a1"));
        }
        initial.push(pod("n0", "n0", "r2", "a1"));
        let mut log = ControlPlaneLog { initial, changes: vec![] };
        assert!(replicas_bounded(&log).passed, "5 = 4 + 1 is within the surge");
        log.changes.push(change(7, pod("n1", "n1", "r2", "a2")));
        let check = replicas_bounded(&log);
        assert!(!check.passed);
        assert!(check.detail.contains("Deployment d had 6 pods"), "{}", check.detail);
        assert_eq!(max_surge(&json!({"spec": {"strategy": {"rollingUpdate": {"maxSurge": "50%"}}}}), 3), 2);
        assert_eq!(max_surge(&json!({"spec": {"strategy": {"type": "Recreate"}}}), 3), 0);
    }

    #[test]
    fn two_services_with_one_cluster_ip_are_caught() {
        let svc = |name: &str, ip: &str, port: i64| {
            (
                format!("/registry/services/default/{name}"),
                json!({"spec": {"clusterIP": ip, "ports": [{"port": 80, "nodePort": port}]}}),
            )
        };
        let log = ControlPlaneLog {
            initial: vec![svc("a", "10.96.0.10", 30001)],
            changes: vec![
                change(2, svc("b", "10.96.0.11", 30002)),
                Change { revision: 3, key: "/registry/services/default/a".into(), object: None },
                // a's address, free again, is taken by c: fine.
                change(4, svc("c", "10.96.0.10", 30003)),
            ],
        };
        assert!(unique_allocations(&log).passed);
        let mut log = log;
        log.changes.push(change(5, svc("d", "10.96.0.11", 30004)));
        let check = unique_allocations(&log);
        assert!(!check.passed);
        assert!(check.detail.contains("cluster IP 10.96.0.11"), "{}", check.detail);
    }

    #[test]
    fn a_node_marked_not_ready_is_caught() {
        let node = |status: &str| {
            ("/registry/nodes/a1".to_string(), json!({"status": {"conditions": [{"type": "Ready", "status": status}]}}))
        };
        let log = ControlPlaneLog { initial: vec![node("True")], changes: vec![change(4, node("True"))] };
        assert!(nodes_stayed_ready(&log).passed);
        let log = ControlPlaneLog { initial: vec![node("True")], changes: vec![change(4, node("Unknown"))] };
        let check = nodes_stayed_ready(&log);
        assert!(!check.passed);
        assert!(check.detail.contains("Ready=Unknown at revision 4"), "{}", check.detail);
    }

    #[test]
    fn an_outage_that_restarts_or_evicts_a_pod_is_caught() {
        let before: Vec<Value> = vec![pod("p1", "u1", "rs", "a1").1, pod("p2", "u2", "rs", "a2").1];
        assert!(pods_undisturbed(&before, &before).passed);

        let mut restarted = before.clone();
        restarted[0]["status"]["containerStatuses"][0]["restartCount"] = json!(1);
        let check = pods_undisturbed(&before, &restarted);
        assert!(!check.passed);
        assert!(check.detail.contains("default/p1"), "{}", check.detail);

        let mut evicted = before.clone();
        evicted[1]["metadata"]["deletionTimestamp"] = json!("2026-11-24T00:00:00Z");
        assert!(pods_undisturbed(&before, &evicted).detail.contains("terminating"));
        assert!(!pods_undisturbed(&before, &before[..1]).passed, "a pod gone");
        assert!(!pods_undisturbed(&[], &[]).passed, "nothing running tests nothing");
    }
}
