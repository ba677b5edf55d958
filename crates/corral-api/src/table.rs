//! Server-side printing: `meta.k8s.io/v1` Tables with the columns kube-apiserver prints for
//! each resource (priority 1 columns only with `-o wide`), so `kubectl get` looks as it does
//! on Kubernetes.

use serde_json::{Value, json};

use crate::meta::{self, str_at};
use crate::resources::Resource;

/// A column: name, type (`string`, `integer`, `date`) and priority.
type Column = (&'static str, &'static str, u8);

/// How much of each object a row carries, from the Accept header's `includeObject`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IncludeObject {
    None,
    #[default]
    Metadata,
    Object,
}

/// The Table of `objects` (which are all of resource `r`), as of `now` (seconds).
pub fn table(r: &Resource, objects: &[Value], now: i64, include: IncludeObject, list_meta: Value) -> Value {
    let columns = columns(r);
    let rows: Vec<Value> = objects.iter().map(|o| row(r, o, now, include)).collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns.iter().map(|(name, ty, priority)| {
            let mut c = json!({"name": name, "type": ty, "format": "", "description": description(name), "priority": priority});
            if *name == "Name" {
                c["format"] = json!("name");
            }
            c
        }).collect::<Vec<_>>(),
        "rows": rows,
    })
}

/// One row, for a watch event's one-row Table.
pub fn row(r: &Resource, obj: &Value, now: i64, include: IncludeObject) -> Value {
    let object = match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Object => obj.clone(),
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
        }),
    };
    json!({ "cells": cells(r, obj, now), "object": object })
}

fn description(name: &str) -> &'static str {
    match name {
        "Name" => "Name must be unique within a namespace.",
        "Age" => "CreationTimestamp is a timestamp representing the server time when this object was created.",
        _ => "",
    }
}

fn columns(r: &Resource) -> Vec<Column> {
    let s = "string";
    let i = "integer";
    match (r.group, r.plural) {
        ("", "pods") => vec![
            ("Name", s, 0),
            ("Ready", s, 0),
            ("Status", s, 0),
            ("Restarts", s, 0),
            ("Age", s, 0),
            ("IP", s, 1),
            ("Node", s, 1),
            ("Nominated Node", s, 1),
            ("Readiness Gates", s, 1),
        ],
        ("", "namespaces") => vec![("Name", s, 0), ("Status", s, 0), ("Age", s, 0)],
        ("", "nodes") => vec![
            ("Name", s, 0),
            ("Status", s, 0),
            ("Roles", s, 0),
            ("Age", s, 0),
            ("Version", s, 0),
            ("Internal-IP", s, 1),
            ("External-IP", s, 1),
            ("OS-Image", s, 1),
            ("Kernel-Version", s, 1),
            ("Container-Runtime", s, 1),
        ],
        ("", "services") => vec![
            ("Name", s, 0),
            ("Type", s, 0),
            ("Cluster-IP", s, 0),
            ("External-IP", s, 0),
            ("Port(s)", s, 0),
            ("Age", s, 0),
            ("Selector", s, 1),
        ],
        ("", "endpoints") => vec![("Name", s, 0), ("Endpoints", s, 0), ("Age", s, 0)],
        ("discovery.k8s.io", "endpointslices") => {
            vec![("Name", s, 0), ("AddressType", s, 0), ("Ports", s, 0), ("Endpoints", s, 0), ("Age", s, 0)]
        }
        ("", "configmaps") => vec![("Name", s, 0), ("Data", i, 0), ("Age", s, 0)],
        ("", "secrets") => vec![("Name", s, 0), ("Type", s, 0), ("Data", i, 0), ("Age", s, 0)],
        ("", "serviceaccounts") => vec![("Name", s, 0), ("Secrets", i, 0), ("Age", s, 0)],
        ("", "events") => vec![
            ("Last Seen", s, 0),
            ("Type", s, 0),
            ("Reason", s, 0),
            ("Object", s, 0),
            ("Subobject", s, 1),
            ("Source", s, 1),
            ("Message", s, 0),
            ("First Seen", s, 1),
            ("Count", s, 1),
            ("Name", s, 1),
        ],
        ("", "persistentvolumes") => vec![
            ("Name", s, 0),
            ("Capacity", s, 0),
            ("Access Modes", s, 0),
            ("Reclaim Policy", s, 0),
            ("Status", s, 0),
            ("Claim", s, 0),
            ("StorageClass", s, 0),
            ("VolumeAttributesClass", s, 0),
            ("Reason", s, 0),
            ("Age", s, 0),
            ("VolumeMode", s, 1),
        ],
        ("", "persistentvolumeclaims") => vec![
            ("Name", s, 0),
            ("Status", s, 0),
            ("Volume", s, 0),
            ("Capacity", s, 0),
            ("Access Modes", s, 0),
            ("StorageClass", s, 0),
            ("VolumeAttributesClass", s, 0),
            ("Age", s, 0),
            ("VolumeMode", s, 1),
        ],
        ("apps", "deployments") => vec![
            ("Name", s, 0),
            ("Ready", s, 0),
            ("Up-to-date", i, 0),
            ("Available", i, 0),
            ("Age", s, 0),
            ("Containers", s, 1),
            ("Images", s, 1),
            ("Selector", s, 1),
        ],
        ("apps", "replicasets") => vec![
            ("Name", s, 0),
            ("Desired", i, 0),
            ("Current", i, 0),
            ("Ready", i, 0),
            ("Age", s, 0),
            ("Containers", s, 1),
            ("Images", s, 1),
            ("Selector", s, 1),
        ],
        ("coordination.k8s.io", "leases") => vec![("Name", s, 0), ("Holder", s, 0), ("Age", s, 0)],
        ("autoscaling", "horizontalpodautoscalers") => vec![
            ("Name", s, 0),
            ("Reference", s, 0),
            ("Targets", s, 0),
            ("MinPods", s, 0),
            ("MaxPods", i, 0),
            ("Replicas", i, 0),
            ("Age", s, 0),
        ],
        _ => vec![("Name", s, 0), ("Age", s, 0)],
    }
}

/// An HPA's resource metrics as kubectl prints them: `cpu: 250%/50%`, `<unknown>` for a
/// current value not measured yet; the spec's order, comma-separated.
fn hpa_targets(hpa: &Value) -> String {
    let specs = hpa.pointer("/spec/metrics").and_then(Value::as_array).cloned().unwrap_or_default();
    let current = hpa.pointer("/status/currentMetrics").and_then(Value::as_array).cloned().unwrap_or_default();
    let parts: Vec<String> = specs
        .iter()
        .filter(|m| m["type"] == "Resource")
        .map(|m| {
            let resource = str_at(m, "/resource/name");
            let now = current.iter().find(|c| c["type"] == "Resource" && str_at(c, "/resource/name") == resource);
            let (have, want) = match str_at(m, "/resource/target/type") {
                "Utilization" => (
                    now.and_then(|c| c.pointer("/resource/current/averageUtilization"))
                        .and_then(Value::as_i64)
                        .map(|u| format!("{u}%")),
                    format!("{}%", int_at(m, "/resource/target/averageUtilization")),
                ),
                _ => (
                    now.map(|c| str_at(c, "/resource/current/averageValue").to_string()).filter(|v| !v.is_empty()),
                    str_at(m, "/resource/target/averageValue").to_string(),
                ),
            };
            format!("{resource}: {}/{want}", have.unwrap_or_else(|| "<unknown>".into()))
        })
        .collect();
    if parts.is_empty() { "<none>".into() } else { parts.join(", ") }
}

fn int_at(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn none_if_empty(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn age(obj: &Value, now: i64) -> String {
    match meta::parse_rfc3339(str_at(obj, "/metadata/creationTimestamp")) {
        Some(t) => human_duration(now - t),
        None => "<unknown>".into(),
    }
}

fn count(obj: &Value, field: &str) -> i64 {
    obj.get(field).and_then(Value::as_object).map_or(0, |m| m.len() as i64)
}

fn cells(r: &Resource, obj: &Value, now: i64) -> Vec<Value> {
    let name = json!(meta::name(obj));
    let age = json!(age(obj, now));
    match (r.group, r.plural) {
        ("", "pods") => pod_cells(obj, now),
        ("", "namespaces") => {
            vec![name, json!(or(str_at(obj, "/status/phase"), "Active")), age]
        }
        ("", "nodes") => node_cells(obj, age),
        ("", "services") => service_cells(obj, age),
        ("", "endpoints") => {
            let mut eps = Vec::new();
            for subset in obj.get("subsets").and_then(Value::as_array).into_iter().flatten() {
                for addr in subset.get("addresses").and_then(Value::as_array).into_iter().flatten() {
                    for port in subset.get("ports").and_then(Value::as_array).into_iter().flatten() {
                        eps.push(format!("{}:{}", str_at(addr, "/ip"), int_at(port, "/port")));
                    }
                }
            }
            let shown = if eps.len() > 3 {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                none_if_empty(eps.join(","))
            };
            vec![name, json!(shown), age]
        }
        ("discovery.k8s.io", "endpointslices") => {
            let list = |pointer: &str, each: &dyn Fn(&Value) -> Vec<String>| -> String {
                let all: Vec<String> =
                    obj.pointer(pointer).and_then(Value::as_array).into_iter().flatten().flat_map(each).collect();
                match all.len() {
                    0 => "<unset>".to_string(),
                    n if n > 3 => format!("{} + {} more...", all[..3].join(","), n - 3),
                    _ => all.join(","),
                }
            };
            let ports = list("/ports", &|p| vec![int_at(p, "/port").to_string()]);
            let addresses = list("/endpoints", &|e| meta::string_list(e.get("addresses")));
            vec![name, json!(str_at(obj, "/addressType")), json!(ports), json!(addresses), age]
        }
        ("", "configmaps") => vec![name, json!(count(obj, "data") + count(obj, "binaryData")), age],
        ("", "secrets") => {
            vec![name, json!(or(str_at(obj, "/type"), "Opaque")), json!(count(obj, "data")), age]
        }
        ("", "serviceaccounts") => {
            let n = obj.get("secrets").and_then(Value::as_array).map_or(0, Vec::len);
            vec![name, json!(n), age]
        }
        ("", "events") => event_cells(obj, now),
        ("", "persistentvolumes") => {
            let claim = match obj.pointer("/spec/claimRef") {
                Some(c) => format!("{}/{}", str_at(c, "/namespace"), str_at(c, "/name")),
                None => String::new(),
            };
            vec![
                name,
                json!(str_at(obj, "/spec/capacity/storage")),
                json!(access_modes(obj.pointer("/spec/accessModes"))),
                json!(or(str_at(obj, "/spec/persistentVolumeReclaimPolicy"), "Retain")),
                json!(str_at(obj, "/status/phase")),
                json!(claim),
                json!(str_at(obj, "/spec/storageClassName")),
                json!(or(str_at(obj, "/spec/volumeAttributesClassName"), "<unset>")),
                json!(str_at(obj, "/status/reason")),
                age,
                json!(or(str_at(obj, "/spec/volumeMode"), "Filesystem")),
            ]
        }
        ("", "persistentvolumeclaims") => {
            let phase = str_at(obj, "/status/phase");
            let bound = phase == "Bound";
            vec![
                name,
                json!(phase),
                json!(str_at(obj, "/spec/volumeName")),
                json!(if bound { str_at(obj, "/status/capacity/storage") } else { "" }),
                json!(if bound { access_modes(obj.pointer("/status/accessModes")) } else { String::new() }),
                json!(str_at(obj, "/spec/storageClassName")),
                json!(or(str_at(obj, "/spec/volumeAttributesClassName"), "<unset>")),
                age,
                json!(or(str_at(obj, "/spec/volumeMode"), "Filesystem")),
            ]
        }
        ("apps", "deployments") => {
            let (containers, images) = containers_images(obj);
            vec![
                name,
                json!(format!("{}/{}", int_at(obj, "/status/readyReplicas"), int_at(obj, "/spec/replicas"))),
                json!(int_at(obj, "/status/updatedReplicas")),
                json!(int_at(obj, "/status/availableReplicas")),
                age,
                json!(containers),
                json!(images),
                json!(selector_text(obj.pointer("/spec/selector"))),
            ]
        }
        ("apps", "replicasets") => {
            let (containers, images) = containers_images(obj);
            vec![
                name,
                json!(int_at(obj, "/spec/replicas")),
                json!(int_at(obj, "/status/replicas")),
                json!(int_at(obj, "/status/readyReplicas")),
                age,
                json!(containers),
                json!(images),
                json!(selector_text(obj.pointer("/spec/selector"))),
            ]
        }
        ("coordination.k8s.io", "leases") => vec![name, json!(str_at(obj, "/spec/holderIdentity")), age],
        ("autoscaling", "horizontalpodautoscalers") => {
            let reference =
                format!("{}/{}", str_at(obj, "/spec/scaleTargetRef/kind"), str_at(obj, "/spec/scaleTargetRef/name"));
            let min =
                obj.pointer("/spec/minReplicas").and_then(Value::as_i64).map_or("<unset>".into(), |m| m.to_string());
            vec![
                name,
                json!(reference),
                json!(hpa_targets(obj)),
                json!(min),
                json!(int_at(obj, "/spec/maxReplicas")),
                json!(int_at(obj, "/status/currentReplicas")),
                age,
            ]
        }
        _ => vec![name, age],
    }
}

fn or<'a>(value: &'a str, default: &'a str) -> &'a str {
    if value.is_empty() { default } else { value }
}

fn access_modes(modes: Option<&Value>) -> String {
    let short = |m: &str| {
        match m {
            "ReadWriteOnce" => "RWO",
            "ReadOnlyMany" => "ROX",
            "ReadWriteMany" => "RWX",
            "ReadWriteOncePod" => "RWOP",
            other => other,
        }
        .to_string()
    };
    let mut out: Vec<String> = Vec::new();
    for m in modes.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
        let s = short(m);
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out.join(",")
}

fn containers_images(obj: &Value) -> (String, String) {
    let containers = obj.pointer("/spec/template/spec/containers").and_then(Value::as_array);
    let names: Vec<&str> = containers.into_iter().flatten().map(|c| str_at(c, "/name")).collect();
    let images: Vec<&str> = containers.into_iter().flatten().map(|c| str_at(c, "/image")).collect();
    (names.join(","), images.join(","))
}

/// A label selector as text: `app=web,tier in (a,b)`.
pub fn selector_text(selector: Option<&Value>) -> String {
    let Some(sel) = selector else { return "<none>".into() };
    let mut parts: Vec<String> = Vec::new();
    if let Some(labels) = sel.get("matchLabels").and_then(Value::as_object) {
        parts.extend(labels.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())));
    }
    for e in sel.get("matchExpressions").and_then(Value::as_array).into_iter().flatten() {
        let key = str_at(e, "/key");
        let values: Vec<&str> =
            e.get("values").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        parts.push(match str_at(e, "/operator") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            op => format!("{key} {op}"),
        });
    }
    none_if_empty(parts.join(","))
}

fn pod_cells(pod: &Value, now: i64) -> Vec<Value> {
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array).map_or(0, Vec::len);
    let statuses = pod.pointer("/status/containerStatuses").and_then(Value::as_array);
    let mut ready = 0;
    let mut restarts = 0;
    let mut last_restart: Option<i64> = None;
    let mut reason = or(str_at(pod, "/status/reason"), str_at(pod, "/status/phase")).to_string();
    if reason.is_empty() {
        reason = "Pending".into();
    }
    // Init containers first: a pod still initializing says so.
    let mut initializing = false;
    for (i, st) in
        pod.pointer("/status/initContainerStatuses").and_then(Value::as_array).into_iter().flatten().enumerate()
    {
        restarts += int_at(st, "/restartCount");
        if let Some(t) = st.pointer("/lastState/terminated/finishedAt").and_then(Value::as_str) {
            last_restart = last_restart.max(meta::parse_rfc3339(t));
        }
        let terminated = st.pointer("/state/terminated");
        if terminated.is_some_and(|t| int_at(t, "/exitCode") == 0) {
            continue;
        }
        initializing = true;
        let inits = pod.pointer("/spec/initContainers").and_then(Value::as_array).map_or(0, Vec::len);
        reason = match (terminated, st.pointer("/state/waiting/reason").and_then(Value::as_str)) {
            (Some(t), _) => {
                let r = str_at(t, "/reason");
                if r.is_empty() { format!("Init:ExitCode:{}", int_at(t, "/exitCode")) } else { format!("Init:{r}") }
            }
            (None, Some(w)) if !w.is_empty() && w != "PodInitializing" => format!("Init:{w}"),
            _ => format!("Init:{i}/{inits}"),
        };
        break;
    }
    if !initializing {
        let mut has_running = false;
        for st in statuses.into_iter().flatten().rev() {
            restarts += int_at(st, "/restartCount");
            if let Some(t) = st.pointer("/lastState/terminated/finishedAt").and_then(Value::as_str) {
                last_restart = last_restart.max(meta::parse_rfc3339(t));
            }
            if let Some(w) = st.pointer("/state/waiting/reason").and_then(Value::as_str).filter(|w| !w.is_empty()) {
                reason = w.to_string();
            } else if let Some(t) = st.pointer("/state/terminated") {
                let r = str_at(t, "/reason");
                reason = if !r.is_empty() {
                    r.to_string()
                } else if int_at(t, "/signal") != 0 {
                    format!("Signal:{}", int_at(t, "/signal"))
                } else {
                    format!("ExitCode:{}", int_at(t, "/exitCode"))
                };
            } else if st.get("ready").and_then(Value::as_bool) == Some(true) && st.pointer("/state/running").is_some() {
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && has_running {
            let ready_cond = pod
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|c| str_at(c, "/type") == "Ready" && str_at(c, "/status") == "True");
            reason = if ready_cond { "Running".into() } else { "NotReady".into() };
        }
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        reason = if str_at(pod, "/status/reason") == "NodeLost" { "Unknown".into() } else { "Terminating".into() };
    }
    let restarts_text = match last_restart {
        Some(t) if restarts > 0 => format!("{restarts} ({} ago)", human_duration(now - t)),
        _ => restarts.to_string(),
    };
    let ip = or(str_at(pod, "/status/podIP"), "<none>");
    let node = or(str_at(pod, "/spec/nodeName"), "<none>");
    let nominated = or(str_at(pod, "/status/nominatedNodeName"), "<none>");
    let gates = pod.pointer("/spec/readinessGates").and_then(Value::as_array).map_or(0, Vec::len);
    let gates_text = if gates == 0 { "<none>".to_string() } else { format!("0/{gates}") };
    vec![
        json!(meta::name(pod)),
        json!(format!("{ready}/{containers}")),
        json!(reason),
        json!(restarts_text),
        json!(age(pod, now)),
        json!(ip),
        json!(node),
        json!(nominated),
        json!(gates_text),
    ]
}

fn node_cells(node: &Value, age: Value) -> Vec<Value> {
    let conditions = node.pointer("/status/conditions").and_then(Value::as_array);
    let mut status: Vec<String> = Vec::new();
    match conditions.into_iter().flatten().find(|c| str_at(c, "/type") == "Ready") {
        Some(c) if str_at(c, "/status") == "True" => status.push("Ready".into()),
        Some(_) => status.push("NotReady".into()),
        None => status.push("Unknown".into()),
    }
    if node.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push("SchedulingDisabled".into());
    }
    let mut roles: Vec<String> = Vec::new();
    for (label, value) in node.pointer("/metadata/labels").and_then(Value::as_object).into_iter().flatten() {
        if let Some(role) = label.strip_prefix("node-role.kubernetes.io/") {
            if !role.is_empty() {
                roles.push(role.to_string());
            }
        } else if label == "kubernetes.io/role" {
            roles.push(value.as_str().unwrap_or_default().to_string());
        }
    }
    roles.sort();
    let address = |kind: &str| {
        node.pointer("/status/addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|a| str_at(a, "/type") == kind)
            .map_or("<none>".to_string(), |a| str_at(a, "/address").to_string())
    };
    vec![
        json!(meta::name(node)),
        json!(status.join(",")),
        json!(none_if_empty(roles.join(","))),
        age,
        json!(str_at(node, "/status/nodeInfo/kubeletVersion")),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        json!(str_at(node, "/status/nodeInfo/osImage")),
        json!(str_at(node, "/status/nodeInfo/kernelVersion")),
        json!(str_at(node, "/status/nodeInfo/containerRuntimeVersion")),
    ]
}

fn service_cells(svc: &Value, age: Value) -> Vec<Value> {
    let kind = or(str_at(svc, "/spec/type"), "ClusterIP");
    let cluster_ip = or(str_at(svc, "/spec/clusterIP"), "<none>");
    let mut external: Vec<String> = svc
        .pointer("/spec/externalIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    let external_text = match kind {
        "LoadBalancer" => {
            for ing in svc.pointer("/status/loadBalancer/ingress").and_then(Value::as_array).into_iter().flatten() {
                let ip = or(str_at(ing, "/ip"), str_at(ing, "/hostname"));
                if !ip.is_empty() {
                    external.push(ip.to_string());
                }
            }
            if external.is_empty() { "<pending>".to_string() } else { external.join(",") }
        }
        "ExternalName" => str_at(svc, "/spec/externalName").to_string(),
        _ => none_if_empty(external.join(",")),
    };
    let ports: Vec<String> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let protocol = or(str_at(p, "/protocol"), "TCP");
            match int_at(p, "/nodePort") {
                0 => format!("{}/{protocol}", int_at(p, "/port")),
                np => format!("{}:{np}/{protocol}", int_at(p, "/port")),
            }
        })
        .collect();
    let selector: Vec<String> = svc
        .pointer("/spec/selector")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    vec![
        json!(meta::name(svc)),
        json!(kind),
        json!(cluster_ip),
        json!(external_text),
        json!(none_if_empty(ports.join(","))),
        age,
        json!(none_if_empty(selector.join(","))),
    ]
}

fn event_cells(ev: &Value, now: i64) -> Vec<Value> {
    let ts = |p: &str| meta::parse_rfc3339(str_at(ev, p));
    let last = ts("/lastTimestamp").or_else(|| ts("/eventTime")).or_else(|| ts("/metadata/creationTimestamp"));
    let first = ts("/firstTimestamp").or_else(|| ts("/eventTime")).or_else(|| ts("/metadata/creationTimestamp"));
    let since = |t: Option<i64>| t.map_or("<unknown>".to_string(), |t| human_duration(now - t));
    let object =
        format!("{}/{}", str_at(ev, "/involvedObject/kind").to_lowercase(), str_at(ev, "/involvedObject/name"));
    let source = or(str_at(ev, "/source/component"), str_at(ev, "/reportingComponent"));
    let count = match int_at(ev, "/count") {
        0 => 1,
        n => n,
    };
    vec![
        json!(since(last)),
        json!(str_at(ev, "/type")),
        json!(str_at(ev, "/reason")),
        json!(object),
        json!(str_at(ev, "/involvedObject/fieldPath")),
        json!(source),
        json!(str_at(ev, "/message").trim()),
        json!(since(first)),
        json!(count.to_string()),
        json!(meta::name(ev)),
    ]
}

/// A duration as `kubectl get` prints ages: `45s`, `3m12s`, `17m`, `5h3m`, `2d4h`, `400d`,
/// `3y20d`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        return match secs % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        return match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        return match hours % 24 {
            0 => format!("{}d", hours / 24),
            h => format!("{}d{h}h", hours / 24),
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        return match (hours / 24) % 365 {
            0 => format!("{}y", hours / 24 / 365),
            d => format!("{}y{d}d", hours / 24 / 365),
        };
    }
    format!("{}y", hours / 24 / 365)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources;

    #[test]
    fn ages_print_as_kubectl_prints_them() {
        for (secs, text) in [
            (5, "5s"),
            (119, "119s"),
            (192, "3m12s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (30 * 3600, "30h"),
            (50 * 3600, "2d2h"),
            (400 * 86400, "400d"),
            (3 * 365 * 86400, "3y"),
        ] {
            assert_eq!(human_duration(secs), text);
        }
    }

    #[test]
    fn autoscaler_rows_show_each_metric_against_its_target() {
        let hpa = json!({
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "minReplicas": 1, "maxReplicas": 5,
                     "metrics": [
                         {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}},
                         {"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "64Mi"}}}]},
            "status": {"currentReplicas": 3, "currentMetrics": [
                {"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 250, "averageValue": "250m"}}}]},
        });
        assert_eq!(hpa_targets(&hpa), "cpu: 250%/50%, memory: <unknown>/64Mi");
        let r = resources::find("autoscaling", "horizontalpodautoscalers").unwrap();
        let row = cells(r, &hpa, 0);
        assert_eq!(row[1], "Deployment/web");
        assert_eq!((row[3].as_str(), &row[4], &row[5]), (Some("1"), &json!(5), &json!(3)));
    }

    #[test]
    fn pod_rows_show_readiness_status_and_restarts() {
        let pods = resources::find("", "pods").unwrap();
        let pod = json!({
            "metadata": {"name": "web", "creationTimestamp": "2023-11-14T22:13:20Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.244.1.5", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                 "lastState": {"terminated": {"finishedAt": "2023-11-14T22:14:20Z"}}}
            ]}
        });
        let t = table(pods, &[pod], 1_700_000_000 + 120, IncludeObject::Metadata, json!({"resourceVersion": "5"}));
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web");
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "CrashLoopBackOff");
        assert_eq!(cells[3], "2 (60s ago)");
        assert_eq!(cells[4], "2m");
        assert_eq!(cells[6], "n1");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}
