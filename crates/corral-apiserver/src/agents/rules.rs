//! The agent endpoint's decisions, apart from its IO: who may join, which pod changes an
//! agent sees, and how what an agent reports merges into the stored Node.

use base64::Engine;
use corral_api::meta;
use corral_proto::agent::pod_event::Type;
use corral_transport::JoinToken;
use serde_json::{Value, json};

/// The group every agent's certificate carries, and its name's prefix (as kubelets').
pub const NODES_GROUP: &str = "system:nodes";
pub const NODE_USER_PREFIX: &str = "system:node:";

/// Why a join was refused, worded for the person running `corral agent`.
pub fn check_join(token: &JoinToken, ca_hash: &str, secret: Option<&Value>, now: i64) -> Result<(), String> {
    if token.ca_hash != ca_hash {
        return Err("the join token is for another cluster (its CA hash differs): make one with `corral token create` on this cluster".into());
    }
    let unknown = || format!("the join token {} is unknown or revoked: make one with `corral token create`", token.id);
    let secret = secret.ok_or_else(unknown)?;
    let field = |name: &str| {
        secret
            .pointer(&format!("/data/{name}"))
            .and_then(Value::as_str)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
    };
    if secret.get("type").and_then(Value::as_str) != Some("bootstrap.kubernetes.io/token")
        || field("token-id").as_deref() != Some(token.id.as_str())
    {
        return Err(unknown());
    }
    let stored = field("token-secret").unwrap_or_default();
    // Compared in full whatever the first difference, so timing tells nothing.
    let same = stored.len() == token.secret.len()
        && stored.bytes().zip(token.secret.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if !same {
        return Err(unknown());
    }
    if field("usage-bootstrap-authentication").as_deref() != Some("true") {
        return Err(format!("the join token {} may not be used to join", token.id));
    }
    if let Some(expiry) = field("expiration")
        && meta::parse_rfc3339(&expiry).is_some_and(|t| t <= now)
    {
        return Err(format!(
            "the join token {} expired at {expiry}: make a new one with `corral token create`",
            token.id
        ));
    }
    Ok(())
}

/// The Secret that holds a join token, as kubeadm writes bootstrap tokens.
pub fn token_secret(token: &JoinToken, expires: Option<i64>, description: &str) -> Value {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut data = json!({
        "token-id": b64(&token.id),
        "token-secret": b64(&token.secret),
        "usage-bootstrap-authentication": b64("true"),
        "description": b64(description),
    });
    if let Some(t) = expires {
        data["expiration"] = json!(b64(&meta::rfc3339(t)));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": token.secret_name(), "namespace": "kube-system"},
        "type": "bootstrap.kubernetes.io/token",
        "data": data,
    })
}

/// The node an agent's certificate names, if it is an agent's.
pub fn node_of(name: &str, groups: &[String]) -> Option<String> {
    let node = name.strip_prefix(NODE_USER_PREFIX)?;
    (groups.iter().any(|g| g == NODES_GROUP) && !node.is_empty()).then(|| node.to_string())
}

pub fn node_name(pod: &Value) -> &str {
    pod.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("")
}

/// What a change to a pod means to the agent of `node`: a pod bound to it was written
/// (PUT, the event's object being `obj`) or deleted (DELETE, its object `deleted`); None
/// when the pod is not the node's. A pod never moves from one node to another (an update may not change
/// `spec.nodeName`), so the object before any other change never matters.
pub fn pod_event(obj: Option<&Value>, deleted: Option<&Value>, node: &str) -> Option<Type> {
    match (obj, deleted) {
        (Some(o), _) => (node_name(o) == node).then_some(Type::Put),
        (None, Some(p)) => (node_name(p) == node).then_some(Type::Delete),
        (None, None) => None,
    }
}

/// A hostPath volume with no node affinity, pinned to `node`, the first to mount it (its
/// data is on that machine from then on); None when it needs no pinning.
pub fn pin_to_node(pv: &Value, node: &str) -> Option<Value> {
    if pv.pointer("/spec/hostPath").is_none() || pv.pointer("/spec/nodeAffinity").is_some() {
        return None;
    }
    let mut pinned = pv.clone();
    pinned["spec"]["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}});
    Some(pinned)
}

/// What a change to a Service or EndpointSlice means to an agent: every one is its
/// business (as kube-proxy's).
pub fn object_event(obj: Option<&Value>, deleted: Option<&Value>) -> Option<Type> {
    match (obj, deleted) {
        (Some(_), _) => Some(Type::Put),
        (None, Some(_)) => Some(Type::Delete),
        (None, None) => None,
    }
}

/// The stored Node after an agent's report: the agent owns the status and its own labels
/// and annotations; the spec (pod CIDR, taints, cordon) belongs to the cluster.
pub fn merge_node(stored: Option<&Value>, reported: &Value) -> Value {
    let Some(stored) = stored else {
        let mut node = reported.clone();
        node.as_object_mut().map(|m| m.remove("spec"));
        return node;
    };
    let mut node = stored.clone();
    for field in ["labels", "annotations"] {
        if let Some(reported) = reported.pointer(&format!("/metadata/{field}")).and_then(Value::as_object) {
            let m = meta::metadata_mut(&mut node);
            let target = m.entry(field).or_insert_with(|| json!({}));
            if let Some(target) = target.as_object_mut() {
                for (k, v) in reported {
                    target.insert(k.clone(), v.clone());
                }
            }
        }
    }
    if let Some(status) = reported.get("status") {
        let mut status = status.clone();
        // A condition the servers changed meanwhile (to Unknown, by the node controller)
        // changes again now, whatever transition time the agent remembers.
        let before = stored.pointer("/status/conditions").and_then(Value::as_array);
        for c in status.get_mut("conditions").and_then(Value::as_array_mut).into_iter().flatten() {
            let was = before.and_then(|b| b.iter().find(|o| o["type"] == c["type"]));
            let stale = |w: &Value| c["lastTransitionTime"].as_str() <= w["lastTransitionTime"].as_str();
            if let Some(was) = was
                && was["status"] != c["status"]
                && stale(was)
            {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                c["lastTransitionTime"] = json!(meta::rfc3339(now.as_secs() as i64));
            }
        }
        node["status"] = status;
    }
    node
}

/// The node's Lease in kube-node-lease, renewed at `now_micros`.
pub fn lease(node: &str, uid: Option<&str>, now_micros: &str, duration_s: i64) -> Value {
    let mut lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": node, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": duration_s, "renewTime": now_micros},
    });
    if let Some(uid) = uid {
        lease["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}]);
    }
    lease
}

/// Whether a pod refers to a ConfigMap, Secret or PersistentVolumeClaim of its namespace by
/// this name: in a volume (also projected), env, envFrom or imagePullSecrets. An agent may
/// read only what the pods bound to its node refer to, as Kubernetes' node authorizer allows.
pub fn pod_refers(pod: &Value, plural: &str, name: &str) -> bool {
    let is = |v: Option<&Value>| v.and_then(Value::as_str) == Some(name);
    let list = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_array).cloned().unwrap_or_default();
    let containers: Vec<Value> = [list(pod, "/spec/containers"), list(pod, "/spec/initContainers")].concat();
    let mut volumes = list(pod, "/spec/volumes");
    for v in list(pod, "/spec/volumes") {
        volumes.extend(list(&v, "/projected/sources"));
    }
    match plural {
        "configmaps" => {
            volumes.iter().any(|v| is(v.pointer("/configMap/name")))
                || containers.iter().any(|c| {
                    list(c, "/env").iter().any(|e| is(e.pointer("/valueFrom/configMapKeyRef/name")))
                        || list(c, "/envFrom").iter().any(|e| is(e.pointer("/configMapRef/name")))
                })
        }
        "secrets" => {
            volumes.iter().any(|v| is(v.pointer("/secret/secretName")) || is(v.pointer("/secret/name")))
                || list(pod, "/spec/imagePullSecrets").iter().any(|s| is(s.get("name")))
                || containers.iter().any(|c| {
                    list(c, "/env").iter().any(|e| is(e.pointer("/valueFrom/secretKeyRef/name")))
                        || list(c, "/envFrom").iter().any(|e| is(e.pointer("/secretRef/name")))
                })
        }
        "persistentvolumeclaims" => volumes.iter().any(|v| is(v.pointer("/persistentVolumeClaim/claimName"))),
        _ => false,
    }
}

/// An Event an agent may write: about a pod or its own Node, with itself as the source
/// whatever it claimed.
pub fn agent_event(node: &str, mut event: Value) -> Result<Value, String> {
    let kind = event.pointer("/involvedObject/kind").and_then(Value::as_str).unwrap_or_default();
    let about = event.pointer("/involvedObject/name").and_then(Value::as_str).unwrap_or_default();
    let in_namespace = event.pointer("/metadata/namespace") == event.pointer("/involvedObject/namespace");
    match kind {
        "Pod" if in_namespace => {}
        "Node" if about == node => {}
        _ => return Err(format!("node {node} may record events about pods and itself, not {kind} {about}")),
    }
    if event.pointer("/metadata/name").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err("the event has no name".into());
    }
    event["apiVersion"] = json!("v1");
    event["kind"] = json!("Event");
    event["source"] = json!({"component": "kubelet", "host": node});
    event["reportingComponent"] = json!("kubelet");
    event["reportingInstance"] = json!(node);
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_path_volume_is_pinned_to_its_first_node_once() {
        let pv = json!({"metadata": {"name": "pv"}, "spec": {"hostPath": {"path": "/mnt/data"}}});
        let pinned = pin_to_node(&pv, "a2").unwrap();
        let term = &pinned["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0];
        assert_eq!(term, &json!({"key": "kubernetes.io/hostname", "operator": "In", "values": ["a2"]}));
        assert_eq!(pin_to_node(&pinned, "a1"), None, "pinned once, by the first");
        let local = json!({"spec": {"local": {"path": "/mnt/ssd"}}});
        assert_eq!(pin_to_node(&local, "a1"), None, "local volumes name their node themselves");
    }

    #[test]
    fn a_join_needs_this_clusters_ca_and_a_live_matching_token() {
        let hash = "0f".repeat(32);
        let token = JoinToken::generate(&hash);
        let secret = token_secret(&token, Some(2_000), "test");
        assert_eq!(check_join(&token, &hash, Some(&secret), 1_000), Ok(()));

        assert!(check_join(&token, &"aa".repeat(32), Some(&secret), 1_000).unwrap_err().contains("another cluster"));
        assert!(check_join(&token, &hash, None, 1_000).unwrap_err().contains("unknown or revoked"));
        let mut wrong = token.clone();
        wrong.secret = "0123456789abcdef".into();
        assert!(check_join(&wrong, &hash, Some(&secret), 1_000).unwrap_err().contains("unknown or revoked"));
        assert!(check_join(&token, &hash, Some(&secret), 3_000).unwrap_err().contains("expired"));
        let forever = token_secret(&token, None, "test");
        assert_eq!(check_join(&token, &hash, Some(&forever), i64::MAX / 2), Ok(()));
    }

    #[test]
    fn only_node_certificates_name_a_node() {
        let nodes = vec![NODES_GROUP.to_string()];
        assert_eq!(node_of("system:node:w1", &nodes).as_deref(), Some("w1"));
        assert_eq!(node_of("system:node:w1", &[]), None);
        assert_eq!(node_of("admin", &nodes), None);
    }

    #[test]
    fn an_agent_sees_puts_of_its_pods_and_their_deletion() {
        let pod = |node: &str| json!({"metadata": {"name": "p"}, "spec": {"nodeName": node}});
        let kind = |e: Option<Type>| e;
        assert_eq!(kind(pod_event(Some(&pod("w1")), None, "w1")), Some(Type::Put));
        assert_eq!(kind(pod_event(None, Some(&pod("w1")), "w1")), Some(Type::Delete));
        assert_eq!(kind(pod_event(None, Some(&pod("w2")), "w1")), None, "another node's deleted");
        assert_eq!(kind(pod_event(Some(&pod("w2")), None, "w1")), None);
        assert_eq!(kind(pod_event(Some(&pod("")), None, "w1")), None, "not scheduled yet");
    }

    #[test]
    fn a_report_updates_status_and_labels_but_not_the_clusters_spec() {
        let stored = json!({
            "metadata": {"name": "w1", "labels": {"team": "a", "kubernetes.io/os": "linux"}},
            "spec": {"podCIDR": "10.244.1.0/24", "unschedulable": true},
            "status": {"conditions": []},
        });
        let reported = json!({
            "metadata": {"name": "w1", "labels": {"kubernetes.io/os": "linux", "kubernetes.io/hostname": "w1"}},
            "spec": {"podCIDR": "bogus"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        });
        let merged = merge_node(Some(&stored), &reported);
        assert_eq!(merged["spec"], stored["spec"]);
        assert_eq!(merged["metadata"]["labels"]["team"], "a");
        assert_eq!(merged["metadata"]["labels"]["kubernetes.io/hostname"], "w1");
        assert_eq!(merged["status"], reported["status"]);
        assert!(merge_node(None, &reported).get("spec").is_none(), "a new node's spec is the cluster's");
    }

    #[test]
    fn agents_read_only_what_their_pods_refer_to() {
        let pod = json!({"spec": {
            "volumes": [{"name": "a", "configMap": {"name": "settings"}},
                        {"name": "b", "projected": {"sources": [{"secret": {"name": "token"}}]}},
                        {"name": "c", "persistentVolumeClaim": {"claimName": "data"}}],
            "containers": [{"envFrom": [{"secretRef": {"name": "db"}}]}]}});
        assert!(pod_refers(&pod, "configmaps", "settings"));
        assert!(pod_refers(&pod, "secrets", "token") && pod_refers(&pod, "secrets", "db"));
        assert!(pod_refers(&pod, "persistentvolumeclaims", "data"));
        assert!(!pod_refers(&pod, "secrets", "bootstrap-token-abcdef"));
    }

    #[test]
    fn agents_record_events_about_pods_and_their_own_node_only() {
        let event = |kind: &str, name: &str| {
            json!({"metadata": {"name": "x.1", "namespace": "default"},
                   "involvedObject": {"kind": kind, "name": name, "namespace": "default"},
                   "source": {"host": "elsewhere"}})
        };
        let written = agent_event("n1", event("Pod", "web")).unwrap();
        assert_eq!(written["source"], json!({"component": "kubelet", "host": "n1"}));
        assert!(agent_event("n1", event("Node", "n1")).is_ok());
        assert!(agent_event("n1", event("Node", "n2")).is_err());
        assert!(agent_event("n1", event("Secret", "s")).is_err());
        let mut elsewhere = event("Pod", "web");
        elsewhere["metadata"]["namespace"] = json!("kube-system");
        assert!(agent_event("n1", elsewhere).is_err(), "an Event lives in its object's namespace");
    }
}
