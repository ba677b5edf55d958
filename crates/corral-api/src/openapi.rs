//! OpenAPI v3 schemas of the served types, generated from the message table the protobuf
//! decoder uses (`protobuf/schema.txt`): one component per message, fields with their
//! types, lists with the merge keys of strategic merge patch, and each kind tagged with its
//! group, version and kind. This is what `kubectl explain` walks and where kubectl learns
//! how lists merge for client-side apply.

use serde_json::{Map, Value, json};

use crate::patch::{ListStrategy, list_strategy};
use crate::protobuf::schema::{self, Field, Message, Type};
use crate::resources::RESOURCES;

/// The component name of a message.
pub fn component(message: &str) -> String {
    format!("io.corral.api.{message}")
}

fn reference(message: &str) -> Value {
    json!({ "allOf": [{ "$ref": format!("#/components/schemas/{}", component(message)) }] })
}

/// `components.schemas` for every message; kinds carry `x-kubernetes-group-version-kind`.
pub fn components() -> Value {
    let mut schemas = Map::new();
    for m in schema::messages() {
        schemas.insert(component(&m.name), message_schema(m));
    }
    for r in RESOURCES.iter() {
        let name = component(r.kind);
        let entry = schemas.entry(name).or_insert_with(|| json!({ "type": "object", "properties": {} }));
        let gvks = entry.as_object_mut().expect("schemas are objects");
        let list = gvks.entry("x-kubernetes-group-version-kind").or_insert_with(|| json!([]));
        let gvk = json!({ "group": r.group, "version": r.version, "kind": r.kind });
        if let Some(list) = list.as_array_mut()
            && !list.contains(&gvk)
        {
            list.push(gvk);
        }
        let props = entry["properties"].as_object_mut().expect("kinds have properties");
        props.insert(
            "apiVersion".into(),
            json!({ "type": "string", "description": "APIVersion defines the versioned schema of this representation of an object." }),
        );
        props.insert(
            "kind".into(),
            json!({ "type": "string", "description": "Kind is a string value representing the REST resource this object represents." }),
        );
        props.entry("metadata").or_insert_with(|| reference("ObjectMeta"));
    }
    Value::Object(schemas)
}

fn message_schema(m: &Message) -> Value {
    let mut props = Map::new();
    add_fields(m, &mut props);
    json!({ "type": "object", "properties": props })
}

fn add_fields(m: &Message, props: &mut Map<String, Value>) {
    for f in &m.fields {
        if f.name == schema::INLINE {
            if let Type::Message(inner) = &f.ty
                && let Some(inner) = schema::message(inner)
            {
                add_fields(inner, props);
            }
            continue;
        }
        props.insert(f.name.clone(), field_schema(m, f));
    }
}

fn field_schema(m: &Message, f: &Field) -> Value {
    let item = type_schema(&f.ty);
    if !f.repeated {
        return item;
    }
    let mut list = json!({ "type": "array", "items": item });
    let path = context(&m.name, &f.name);
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    match list_strategy(&path) {
        ListStrategy::MergeByKey(key) => {
            list["x-kubernetes-patch-merge-key"] = json!(key);
            list["x-kubernetes-patch-strategy"] = json!("merge");
            list["x-kubernetes-list-type"] = json!("map");
            list["x-kubernetes-list-map-keys"] = json!([key]);
        }
        ListStrategy::MergePrimitives => {
            list["x-kubernetes-patch-strategy"] = json!("merge");
            list["x-kubernetes-list-type"] = json!("set");
        }
        ListStrategy::Replace => list["x-kubernetes-list-type"] = json!("atomic"),
    }
    list
}

/// A representative path to a message's field, for the merge-key table (which is keyed by
/// where a list sits in an object).
fn context(message: &str, field: &str) -> Vec<String> {
    let parents: &[&str] = match message {
        "Container" | "EphemeralContainerCommon" | "EphemeralContainer" => &["spec", "containers"],
        m if m.ends_with("Spec") => &["spec"],
        m if m.ends_with("Status") => &["status"],
        "ObjectMeta" => &["metadata"],
        _ => &[],
    };
    parents.iter().map(|p| p.to_string()).chain([field.to_string()]).collect()
}

fn type_schema(ty: &Type) -> Value {
    match ty {
        Type::String => json!({ "type": "string" }),
        Type::Bytes => json!({ "type": "string", "format": "byte" }),
        Type::Int32 => json!({ "type": "integer", "format": "int32" }),
        Type::Int64 => json!({ "type": "integer", "format": "int64" }),
        Type::Bool => json!({ "type": "boolean" }),
        Type::Double => json!({ "type": "number", "format": "double" }),
        Type::Time { .. } => json!({ "type": "string", "format": "date-time" }),
        Type::Quantity => json!({ "type": "string", "x-kubernetes-int-or-string": true, "format": "quantity" }),
        Type::IntOrString => json!({ "type": "string", "x-kubernetes-int-or-string": true, "format": "int-or-string" }),
        Type::Duration => json!({ "type": "string" }),
        Type::RawJson => json!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true }),
        Type::Map(value) => json!({ "type": "object", "additionalProperties": type_schema(value) }),
        Type::Message(name) => reference(name),
    }
}

/// Removes the fields an object of `kind` does not have, and returns their paths
/// (`spec.template.spec.containers[0].bogus`), as kube-apiserver drops what its types do not
/// know. Kinds without a schema are left alone.
pub fn prune_unknown(kind: &str, obj: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    if let (Some(m), Value::Object(map)) = (schema::message(kind), obj) {
        prune_message(m, map, "", &mut unknown, true);
    }
    unknown
}

fn prune_message(m: &'static Message, map: &mut Map<String, Value>, path: &str, unknown: &mut Vec<String>, top: bool) {
    let fields = flattened(m);
    map.retain(|k, v| {
        let here = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
        if top && (k == "apiVersion" || k == "kind") {
            return true;
        }
        let Some(f) = fields.iter().find(|f| f.name == *k) else {
            unknown.push(here);
            return false;
        };
        prune_value(&f.ty, f.repeated, v, &here, unknown);
        true
    });
}

fn prune_value(ty: &Type, repeated: bool, v: &mut Value, path: &str, unknown: &mut Vec<String>) {
    match (ty, v) {
        (_, Value::Array(items)) if repeated => {
            for (i, item) in items.iter_mut().enumerate() {
                prune_value(ty, false, item, &format!("{path}[{i}]"), unknown);
            }
        }
        (Type::Map(inner), Value::Object(map)) => {
            for (k, item) in map.iter_mut() {
                prune_value(inner, false, item, &format!("{path}.{k}"), unknown);
            }
        }
        (Type::Message(name), Value::Object(map)) => {
            if let Some(m) = schema::message(name) {
                prune_message(m, map, path, unknown, false);
            }
        }
        _ => {}
    }
}

/// A message's fields with the inline structs' fields in place.
fn flattened(m: &'static Message) -> Vec<&'static Field> {
    let mut out = Vec::new();
    for f in &m.fields {
        match (&f.ty, f.name == schema::INLINE) {
            (Type::Message(inner), true) => {
                if let Some(inner) = schema::message(inner) {
                    out.extend(flattened(inner));
                }
            }
            _ => out.push(f),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_named_by_path_and_removed() {
        let mut d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "bogus": 1,
            "metadata": { "name": "x", "labels": { "any": "thing" } },
            "spec": { "template": { "spec": { "containers": [
                { "name": "c", "image": "i", "imagePullPolicy": "Always", "colour": "red",
                  "livenessProbe": { "httpGet": { "path": "/", "port": 80 }, "periodSeconds": 3 } }
            ] } } }
        });
        let unknown = prune_unknown("Deployment", &mut d);
        assert_eq!(unknown, ["bogus", "spec.template.spec.containers[0].colour"]);
        assert!(d.get("bogus").is_none());
        assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"], 80);
        let mut widget = json!({ "kind": "Widget", "whatever": 1 });
        assert!(prune_unknown("Widget", &mut widget).is_empty(), "kinds without a schema are left alone");
    }

    #[test]
    fn kinds_are_tagged_and_lists_carry_their_merge_keys() {
        let c = components();
        let pod = &c[component("Pod")];
        assert_eq!(pod["x-kubernetes-group-version-kind"], json!([{ "group": "", "version": "v1", "kind": "Pod" }]));
        assert!(pod["properties"]["spec"]["allOf"][0]["$ref"].as_str().unwrap().ends_with("PodSpec"));
        let containers = &c[component("PodSpec")]["properties"]["containers"];
        assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");
        let env = &c[component("Container")]["properties"]["env"];
        assert_eq!(env["x-kubernetes-patch-merge-key"], "name");
        let ports = &c[component("Container")]["properties"]["ports"];
        assert_eq!(ports["x-kubernetes-patch-merge-key"], "containerPort");
        let command = &c[component("Container")]["properties"]["command"];
        assert_eq!(command["x-kubernetes-list-type"], "atomic");
        let probe = &c[component("Probe")]["properties"];
        assert!(probe.get("httpGet").is_some(), "an inline struct's fields are the parent's");
        let node = &c[component("Node")];
        assert_eq!(node["x-kubernetes-group-version-kind"][0]["kind"], "Node");
    }

    #[test]
    fn prune_keeps_every_field_of_served_system_kinds() {
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": "node-1", "uid": "6a1f0c3e-9d0b-4c51-a3a4-5d0d3c6c1b11", "resourceVersion": "812",
                "creationTimestamp": "2025-05-01T10:00:00Z",
                "labels": { "kubernetes.io/hostname": "node-1", "node-role.kubernetes.io/control-plane": "" },
                "annotations": { "node.alpha.kubernetes.io/ttl": "0" }
            },
            "spec": {
                "podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24", "fd00:10:244::/64"],
                "providerID": "kind://docker/kind/node-1", "unschedulable": true,
                "taints": [
                    { "key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule" },
                    { "key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule",
                      "timeAdded": "2025-05-01T10:05:00Z" }
                ]
            },
            "status": {
                "capacity": { "cpu": "4", "memory": "16318864Ki", "pods": "110", "ephemeral-storage": "102626232Ki" },
                "allocatable": {
                    "cpu": "3800m", "memory": "15704464Ki", "pods": "110", "ephemeral-storage": "94580335255"
                },
                "conditions": [
                    { "type": "MemoryPressure", "status": "False", "lastHeartbeatTime": "2025-05-01T10:10:00Z",
                      "lastTransitionTime": "2025-05-01T10:00:00Z", "reason": "KubeletHasSufficientMemory",
                      "message": "kubelet has sufficient memory available" },
                    { "type": "Ready", "status": "True", "lastHeartbeatTime": "2025-05-01T10:10:00Z",
                      "lastTransitionTime": "2025-05-01T10:00:30Z", "reason": "KubeletReady",
                      "message": "kubelet is posting ready status" }
                ],
                "addresses": [
                    { "type": "InternalIP", "address": "172.18.0.2" },
                    { "type": "Hostname", "address": "node-1" }
                ],
                "daemonEndpoints": { "kubeletEndpoint": { "Port": 10250 } },
                "nodeInfo": {
                    "machineID": "3050fbb203394830ad38c698ab0e261d",
                    "systemUUID": "3ca8f8fd-1d9f-4bbc-99cb-d07cf9242484",
                    "bootID": "5c5a1d6b-6447-45ac-ba88-b6a0c12c43f0", "kernelVersion": "6.8.0-59-generic",
                    "osImage": "Debian GNU/Linux 12 (bookworm)", "containerRuntimeVersion": "containerd://2.0.3",
                    "kubeletVersion": "v1.33.1", "kubeProxyVersion": "", "operatingSystem": "linux",
                    "architecture": "amd64", "swap": { "capacity": 0 }
                },
                "images": [{ "names": ["registry.k8s.io/pause:3.10"], "sizeBytes": 320368 }],
                "volumesInUse": ["kubernetes.io/csi/hostpath.csi.k8s.io^vol-1"],
                "volumesAttached": [{ "name": "kubernetes.io/csi/hostpath.csi.k8s.io^vol-1", "devicePath": "" }],
                "config": { "active": { "configMap": {
                    "namespace": "kube-system", "name": "node-1-config", "uid": "c0ffee", "resourceVersion": "7",
                    "kubeletConfigKey": "kubelet"
                } } },
                "runtimeHandlers": [
                    { "name": "", "features": { "recursiveReadOnlyMounts": true, "userNamespaces": true } },
                    { "name": "runc", "features": { "recursiveReadOnlyMounts": true, "userNamespaces": false } }
                ],
                "features": { "supplementalGroupsPolicy": true }
            }
        });
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": { "name": "web-7d4b9c-x2x9q.183b1f2a4c6d8e00", "namespace": "default" },
            "involvedObject": {
                "kind": "Pod", "namespace": "default", "name": "web-7d4b9c-x2x9q", "uid": "0b1c",
                "apiVersion": "v1", "resourceVersion": "1234", "fieldPath": "spec.containers{nginx}"
            },
            "reason": "Pulled", "message": "Successfully pulled image \"nginx:1.25\"",
            "source": { "component": "kubelet", "host": "node-1" },
            "firstTimestamp": "2025-05-01T10:00:00Z", "lastTimestamp": "2025-05-01T10:02:00Z", "count": 3,
            "type": "Normal", "eventTime": "2025-05-01T10:00:00.123456Z",
            "series": { "count": 2, "lastObservedTime": "2025-05-01T10:02:00.654321Z" },
            "action": "Pulling", "related": { "kind": "Node", "name": "node-1", "apiVersion": "v1" },
            "reportingComponent": "kubelet", "reportingInstance": "node-1"
        });
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {
                "name": "node-1", "namespace": "kube-node-lease",
                "ownerReferences": [{ "apiVersion": "v1", "kind": "Node", "name": "node-1", "uid": "6a1f" }]
            },
            "spec": {
                "holderIdentity": "node-1", "leaseDurationSeconds": 40, "acquireTime": "2025-05-01T10:00:00.000000Z",
                "renewTime": "2025-05-01T10:10:00.123456Z", "leaseTransitions": 0,
                "strategy": "OldestEmulationVersion", "preferredHolder": "node-2"
            }
        });
        let endpoints = json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": { "name": "web", "namespace": "default", "labels": { "app": "web" } },
            "subsets": [{
                "addresses": [{
                    "ip": "10.244.0.5", "nodeName": "node-1",
                    "targetRef": { "kind": "Pod", "namespace": "default", "name": "web-1", "uid": "a1" }
                }],
                "notReadyAddresses": [{ "ip": "10.244.0.6", "hostname": "web-2", "nodeName": "node-1" }],
                "ports": [{ "name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http" }]
            }]
        });
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": "web-abcde", "generateName": "web-", "namespace": "default",
                "labels": { "kubernetes.io/service-name": "web" }
            },
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": ["10.244.0.5"],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "hostname": "web-1",
                "targetRef": { "kind": "Pod", "namespace": "default", "name": "web-1", "uid": "a1" },
                "nodeName": "node-1", "zone": "zone-a",
                "hints": { "forZones": [{ "name": "zone-a" }], "forNodes": [{ "name": "node-1" }] }
            }],
            "ports": [{ "name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http" }]
        });
        let pv = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {
                "name": "pv-local", "finalizers": ["kubernetes.io/pv-protection"],
                "annotations": { "pv.kubernetes.io/bound-by-controller": "yes" }
            },
            "spec": {
                "capacity": { "storage": "10Gi" },
                "hostPath": { "path": "/data/pv-local", "type": "DirectoryOrCreate" },
                "accessModes": ["ReadWriteOnce"],
                "claimRef": {
                    "kind": "PersistentVolumeClaim", "namespace": "default", "name": "data", "uid": "d4",
                    "apiVersion": "v1", "resourceVersion": "777"
                },
                "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "manual",
                "mountOptions": ["noatime"], "volumeMode": "Filesystem",
                "nodeAffinity": { "required": { "nodeSelectorTerms": [{ "matchExpressions": [
                    { "key": "kubernetes.io/hostname", "operator": "In", "values": ["node-1"] }
                ] }] } }
            },
            "status": { "phase": "Bound", "lastPhaseTransitionTime": "2025-05-01T10:00:00Z" }
        });
        let csi_pv = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": { "name": "pvc-0b1c" },
            "spec": {
                "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"],
                "csi": {
                    "driver": "hostpath.csi.k8s.io", "volumeHandle": "vol-1", "fsType": "ext4",
                    "volumeAttributes": { "kubernetes.io/csi/node": "node-1" },
                    "nodeExpandSecretRef": { "name": "expand", "namespace": "kube-system" }
                },
                "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "csi-hostpath",
                "volumeAttributesClassName": "gold"
            },
            "status": { "phase": "Available" }
        });
        let hpa = json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": { "name": "web", "namespace": "default" },
            "spec": {
                "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": "web" },
                "minReplicas": 1, "maxReplicas": 10,
                "metrics": [
                    { "type": "Resource", "resource": {
                        "name": "cpu", "target": { "type": "Utilization", "averageUtilization": 50 }
                    } },
                    { "type": "Pods", "pods": {
                        "metric": { "name": "requests_per_second", "selector": { "matchLabels": { "app": "web" } } },
                        "target": { "type": "AverageValue", "averageValue": "100" }
                    } }
                ],
                "behavior": {
                    "scaleDown": {
                        "stabilizationWindowSeconds": 300, "selectPolicy": "Max",
                        "policies": [{ "type": "Percent", "value": 100, "periodSeconds": 15 }]
                    },
                    "scaleUp": {
                        "stabilizationWindowSeconds": 0, "selectPolicy": "Max", "tolerance": "50m",
                        "policies": [
                            { "type": "Pods", "value": 4, "periodSeconds": 15 },
                            { "type": "Percent", "value": 100, "periodSeconds": 15 }
                        ]
                    }
                }
            },
            "status": {
                "observedGeneration": 1, "lastScaleTime": "2025-05-01T10:00:00Z", "currentReplicas": 2,
                "desiredReplicas": 3,
                "currentMetrics": [
                    { "type": "Resource", "resource": {
                        "name": "cpu", "current": { "averageValue": "120m", "averageUtilization": 60 }
                    } }
                ],
                "conditions": [{
                    "type": "AbleToScale", "status": "True", "lastTransitionTime": "2025-05-01T10:00:00Z",
                    "reason": "ReadyForNewScale", "message": "recommended size matches current size"
                }]
            }
        });
        for (kind, obj) in [
            ("Node", node.clone()),
            ("Event", event),
            ("Lease", lease),
            ("Endpoints", endpoints),
            ("EndpointSlice", slice),
            ("PersistentVolume", pv),
            ("PersistentVolume", csi_pv),
            ("HorizontalPodAutoscaler", hpa),
        ] {
            let mut pruned = obj.clone();
            let unknown = prune_unknown(kind, &mut pruned);
            assert!(unknown.is_empty(), "{kind}: {unknown:?} reported unknown");
            assert_eq!(pruned, obj, "{kind} is unchanged");
        }

        let mut bogus = node;
        bogus["spec"]["bogus"] = json!(true);
        assert_eq!(prune_unknown("Node", &mut bogus), ["spec.bogus"]);
        assert!(bogus["spec"].get("bogus").is_none(), "an invented field is dropped");
        assert_eq!(bogus["spec"]["podCIDR"], "10.244.0.0/24", "its siblings are kept");
    }
}
