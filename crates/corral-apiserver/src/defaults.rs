//! Kubernetes' defaulting for the types served: what kube-apiserver fills in when a client
//! leaves it out, so objects read back as they would from Kubernetes.

use corral_api::Resource;
use serde_json::{Map, Value, json};

/// Sets `key` when it is missing.
fn default(map: &mut Map<String, Value>, key: &str, value: Value) {
    map.entry(key.to_string()).or_insert(value);
}

fn object<'a>(parent: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    if parent.get(key).is_none() {
        parent[key] = json!({});
    }
    parent.get_mut(key)?.as_object_mut()
}

/// kube-apiserver's DefaultTolerationSeconds admission: a new pod that does not say
/// otherwise tolerates a not-ready or unreachable node for this many seconds, after which
/// the node controller evicts it.
#[derive(Clone, Copy, Debug)]
pub struct DefaultTolerations {
    pub not_ready_s: i64,
    pub unreachable_s: i64,
}

impl Default for DefaultTolerations {
    fn default() -> Self {
        DefaultTolerations { not_ready_s: 300, unreachable_s: 300 }
    }
}

impl DefaultTolerations {
    pub fn admit(&self, pod: &mut Value) {
        let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else { return };
        let list = spec.entry("tolerations").or_insert_with(|| json!([]));
        let Some(list) = list.as_array_mut() else { return };
        for (key, seconds) in
            [("node.kubernetes.io/not-ready", self.not_ready_s), ("node.kubernetes.io/unreachable", self.unreachable_s)]
        {
            // A toleration of the key for NoExecute (or every effect), or of every key, stands.
            let covered = list.iter().any(|t| {
                let key_ok = t.get("key").and_then(Value::as_str).is_none_or(|k| k.is_empty() || k == key);
                let effect_ok =
                    t.get("effect").and_then(Value::as_str).is_none_or(|e| e.is_empty() || e == "NoExecute");
                key_ok
                    && effect_ok
                    && (t.get("key").is_some() || t.get("operator").and_then(Value::as_str) == Some("Exists"))
            });
            if !covered {
                list.push(
                    json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}),
                );
            }
        }
    }
}

pub fn apply(r: &Resource, obj: &mut Value) {
    match (r.group, r.plural) {
        ("", "pods") => {
            if let Some(spec) = obj.get_mut("spec") {
                pod_spec(spec);
            }
            if let Some(status) = object(obj, "status") {
                default(status, "phase", json!("Pending"));
                default(status, "qosClass", json!("BestEffort"));
            }
        }
        ("apps", "deployments") => {
            if let Some(spec) = object(obj, "spec") {
                default(spec, "replicas", json!(1));
                default(spec, "revisionHistoryLimit", json!(10));
                default(spec, "progressDeadlineSeconds", json!(600));
                default(spec, "strategy", json!({}));
                if let Some(strategy) = spec.get_mut("strategy").and_then(Value::as_object_mut) {
                    default(strategy, "type", json!("RollingUpdate"));
                }
                if let Some(strategy) = spec.get_mut("strategy").and_then(Value::as_object_mut)
                    && strategy.get("type").and_then(Value::as_str) == Some("RollingUpdate")
                {
                    let ru = strategy.entry("rollingUpdate").or_insert(json!({}));
                    if let Some(ru) = ru.as_object_mut() {
                        default(ru, "maxSurge", json!("25%"));
                        default(ru, "maxUnavailable", json!("25%"));
                    }
                }
            }
            template(obj);
        }
        ("apps", "replicasets") => {
            if let Some(spec) = object(obj, "spec") {
                default(spec, "replicas", json!(1));
            }
            template(obj);
        }
        ("", "services") => {
            if let Some(spec) = object(obj, "spec") {
                default(spec, "type", json!("ClusterIP"));
                default(spec, "sessionAffinity", json!("None"));
                default(spec, "ipFamilyPolicy", json!("SingleStack"));
                default(spec, "ipFamilies", json!(["IPv4"]));
                default(spec, "internalTrafficPolicy", json!("Cluster"));
                for port in spec.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                    if let Some(p) = port.as_object_mut() {
                        default(p, "protocol", json!("TCP"));
                        let number = p.get("port").cloned().unwrap_or(Value::Null);
                        default(p, "targetPort", number);
                    }
                }
            }
        }
        ("", "namespaces") => {
            if let Some(spec) = object(obj, "spec") {
                default(spec, "finalizers", json!(["kubernetes"]));
            }
            if let Some(status) = object(obj, "status") {
                default(status, "phase", json!("Active"));
            }
            let name = obj.pointer("/metadata/name").cloned().unwrap_or(Value::Null);
            if let Some(labels) = obj.get_mut("metadata").and_then(|m| object(m, "labels")) {
                default(labels, "kubernetes.io/metadata.name", name);
            }
        }
        ("", "persistentvolumes") => {
            if let Some(spec) = object(obj, "spec") {
                default(spec, "persistentVolumeReclaimPolicy", json!("Retain"));
                default(spec, "volumeMode", json!("Filesystem"));
            }
            if let Some(status) = object(obj, "status") {
                default(status, "phase", json!("Pending"));
            }
        }
        ("", "persistentvolumeclaims") => {
            if let Some(spec) = object(obj, "spec") {
                default(spec, "volumeMode", json!("Filesystem"));
            }
            if let Some(status) = object(obj, "status") {
                default(status, "phase", json!("Pending"));
            }
        }
        ("", "secrets") => {
            if let Some(m) = obj.as_object_mut() {
                default(m, "type", json!("Opaque"));
            }
        }
        _ => {}
    }
}

fn template(obj: &mut Value) {
    if let Some(spec) = obj.pointer_mut("/spec/template/spec") {
        pod_spec(spec);
    }
}

fn pod_spec(spec: &mut Value) {
    let Some(s) = spec.as_object_mut() else { return };
    default(s, "restartPolicy", json!("Always"));
    default(s, "terminationGracePeriodSeconds", json!(30));
    default(s, "dnsPolicy", json!("ClusterFirst"));
    default(s, "schedulerName", json!("default-scheduler"));
    default(s, "securityContext", json!({}));
    for list in ["containers", "initContainers"] {
        for c in s.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
            let Some(c) = c.as_object_mut() else { continue };
            let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
            let tag = image.rsplit('/').next().unwrap_or_default();
            let latest = !tag.contains(':') && !image.contains('@') || tag.ends_with(":latest");
            default(c, "imagePullPolicy", json!(if latest { "Always" } else { "IfNotPresent" }));
            default(c, "terminationMessagePath", json!("/dev/termination-log"));
            default(c, "terminationMessagePolicy", json!("File"));
            default(c, "resources", json!({}));
            for port in c.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                if let Some(p) = port.as_object_mut() {
                    default(p, "protocol", json!("TCP"));
                }
            }
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let Some(p) = c.get_mut(probe).and_then(Value::as_object_mut) else { continue };
                default(p, "timeoutSeconds", json!(1));
                default(p, "periodSeconds", json!(10));
                default(p, "successThreshold", json!(1));
                default(p, "failureThreshold", json!(3));
                if let Some(http) = p.get_mut("httpGet").and_then(Value::as_object_mut) {
                    default(http, "path", json!("/"));
                    default(http, "scheme", json!("HTTP"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_pods_tolerate_a_lost_node_for_the_default_seconds_unless_they_say_otherwise() {
        let defaults = DefaultTolerations { not_ready_s: 300, unreachable_s: 60 };
        let mut pod = json!({"spec": {"containers": []}});
        defaults.admit(&mut pod);
        assert_eq!(
            pod["spec"]["tolerations"],
            json!([{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                   {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}])
        );
        let mut everything = json!({"spec": {"tolerations": [{"operator": "Exists"}]}});
        defaults.admit(&mut everything);
        assert_eq!(everything["spec"]["tolerations"].as_array().unwrap().len(), 1, "tolerating everything stands");
        let mut own = json!({"spec": {"tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                                                       "effect": "NoExecute", "tolerationSeconds": 5}]}});
        defaults.admit(&mut own);
        let keys: Vec<&str> =
            own["spec"]["tolerations"].as_array().unwrap().iter().map(|t| t["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"]);
        assert_eq!(own["spec"]["tolerations"][0]["tolerationSeconds"], 5);
    }
}
