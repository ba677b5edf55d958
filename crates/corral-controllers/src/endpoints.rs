//! Endpoints and EndpointSlices from Services' selectors and the pods they select: for
//! each Service with a selector, the Endpoints of the same name (ready pods under
//! `addresses`, the others under `notReadyAddresses`, one subset per set of resolved
//! ports) and EndpointSlices named `<service>-<5 chars>`, owned by the Service, at most 100
//! endpoints each, with ready/serving/terminating conditions, which is what the agents'
//! service proxies read. A Service's named targetPort is resolved per pod from its
//! containers' ports. `desired_*` are pure; `run` writes only what differs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use corral_api::meta::JsonAt;
use serde_json::{Value, json};

use crate::cluster::{Cluster, ClusterError, pod_ready, text};
use crate::informer::Informers;

pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGER: &str = "endpointslice-controller.k8s.io";
/// The label Kubernetes puts on the Endpoints its controller manages.
const ENDPOINTS_MANAGED_BY: &str = "endpoints.kubernetes.io/managed-by";
const ENDPOINTS_MANAGER: &str = "endpoint-controller";
/// Endpoints per EndpointSlice, as Kubernetes' default --max-endpoints-per-slice.
pub const PER_SLICE: usize = 100;
const DEBOUNCE: Duration = Duration::from_millis(20);
const RESYNC: Duration = Duration::from_secs(30);

/// One port of a Service as its endpoints carry it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Port {
    name: String,
    port: i64,
    protocol: String,
}

impl Port {
    /// As an Endpoints subset has it: an unnamed port has no name.
    fn json(&self) -> Value {
        let mut p = json!({"port": self.port, "protocol": self.protocol});
        if !self.name.is_empty() {
            p["name"] = json!(self.name);
        }
        p
    }

    /// As an EndpointSlice has it: the name always there, empty for an unnamed port
    /// (kubectl describe reads it as a pointer).
    fn slice_json(&self) -> Value {
        json!({"name": self.name, "port": self.port, "protocol": self.protocol})
    }
}

/// A selected pod with an address.
struct Member<'a> {
    pod: &'a Value,
    ip: &'a str,
    ready: bool,
    terminating: bool,
}

/// The Service's selector (None: a Service without one, whose endpoints are not ours).
fn selector(svc: &Value) -> Option<BTreeMap<String, String>> {
    let s = svc.at("/spec/selector").filter(|s| s.is_object())?;
    Some(corral_api::meta::string_map(Some(s)))
}

fn selects(selector: &BTreeMap<String, String>, pod: &Value) -> bool {
    let labels = pod.at("/metadata/labels").and_then(Value::as_object);
    !selector.is_empty()
        && selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)).and_then(Value::as_str) == Some(v.as_str()))
}

/// The pods a Service sends traffic to (or may, once ready), with their readiness.
fn members<'a>(svc: &Value, pods: &[&'a Arc<Value>]) -> Vec<Member<'a>> {
    let Some(selector) = selector(svc) else { return Vec::new() };
    let publish_all = svc.at("/spec/publishNotReadyAddresses").and_then(Value::as_bool) == Some(true);
    let mut out: Vec<Member<'a>> = pods
        .iter()
        .map(|p| -> &'a Value { p })
        .filter(|p| selects(&selector, p))
        .filter(|p| !matches!(text(p, "/status/phase"), "Succeeded" | "Failed"))
        .filter_map(|pod| {
            let ip = text(pod, "/status/podIP");
            if ip.is_empty() {
                return None;
            }
            let ready = pod_ready(pod);
            let terminating = pod.at("/metadata/deletionTimestamp").is_some();
            Some(Member { pod, ip, ready: (ready || publish_all) && !terminating, terminating })
        })
        .collect();
    out.sort_by(|a, b| (a.ip, text(a.pod, "/metadata/name")).cmp(&(b.ip, text(b.pod, "/metadata/name"))));
    out
}

/// The Service's ports resolved for one pod (a named targetPort from its containers);
/// a port the pod does not have is left out.
fn ports_for(svc: &Value, pod: &Value) -> Vec<Port> {
    let mut ports = Vec::new();
    for sp in svc.at("/spec/ports").and_then(Value::as_array).into_iter().flatten() {
        let protocol = sp.get("protocol").and_then(Value::as_str).unwrap_or("TCP").to_string();
        let number = match sp.get("targetPort") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(name)) => match name.parse::<i64>() {
                Ok(n) => Some(n),
                Err(_) => pod
                    .at("/spec/containers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .flat_map(|c| c.get("ports").and_then(Value::as_array).into_iter().flatten())
                    .find(|p| {
                        p["name"] == name.as_str()
                            && p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == protocol
                    })
                    .and_then(|p| p["containerPort"].as_i64()),
            },
            _ => sp.get("port").and_then(Value::as_i64),
        };
        if let Some(port) = number {
            ports.push(Port { name: text(sp, "/name").to_string(), port, protocol });
        }
    }
    ports
}

fn target_ref(pod: &Value) -> Value {
    json!({"kind": "Pod", "namespace": text(pod, "/metadata/namespace"), "name": text(pod, "/metadata/name"),
           "uid": text(pod, "/metadata/uid")})
}

/// The Endpoints a Service with a selector should have (metadata without resourceVersion).
pub fn desired_endpoints(svc: &Value, pods: &[&Arc<Value>]) -> Option<Value> {
    selector(svc)?;
    let mut groups: BTreeMap<Vec<Port>, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
    for m in members(svc, pods).into_iter().filter(|m| !m.terminating) {
        let ports = ports_for(svc, m.pod);
        if ports.is_empty() {
            continue;
        }
        let mut address = json!({"ip": m.ip, "targetRef": target_ref(m.pod)});
        let node = text(m.pod, "/spec/nodeName");
        if !node.is_empty() {
            address["nodeName"] = json!(node);
        }
        let (ready, not_ready) = groups.entry(ports).or_default();
        if m.ready { ready.push(address) } else { not_ready.push(address) }
    }
    let subsets: Vec<Value> = groups
        .into_iter()
        .map(|(ports, (ready, not_ready))| {
            let mut subset = json!({"ports": ports.iter().map(Port::json).collect::<Vec<_>>()});
            if !ready.is_empty() {
                subset["addresses"] = Value::Array(ready);
            }
            if !not_ready.is_empty() {
                subset["notReadyAddresses"] = Value::Array(not_ready);
            }
            subset
        })
        .collect();
    let mut ep = json!({"apiVersion": "v1", "kind": "Endpoints",
                        "metadata": {"name": text(svc, "/metadata/name"), "namespace": text(svc, "/metadata/namespace")}});
    let mut labels = svc.at("/metadata/labels").and_then(Value::as_object).cloned().unwrap_or_default();
    labels.insert(ENDPOINTS_MANAGED_BY.into(), json!(ENDPOINTS_MANAGER));
    ep["metadata"]["labels"] = Value::Object(labels);
    if !subsets.is_empty() {
        ep["subsets"] = Value::Array(subsets);
    }
    Some(ep)
}

/// What the Endpoints controller does for one Service.
#[derive(Debug, PartialEq)]
pub enum EndpointsAction {
    Create(Value),
    Update(Value),
}

/// Compares with the Endpoints there are: nothing when they already say the same.
pub fn endpoints_action(desired: Value, existing: Option<&Value>) -> Option<EndpointsAction> {
    let Some(existing) = existing else { return Some(EndpointsAction::Create(desired)) };
    if existing.get("subsets") == desired.get("subsets")
        && existing.at("/metadata/labels") == desired.at("/metadata/labels")
    {
        return None;
    }
    let mut updated = existing.clone();
    match desired.get("subsets") {
        Some(s) => updated["subsets"] = s.clone(),
        None => {
            updated.as_object_mut().map(|m| m.remove("subsets"));
        }
    }
    updated["metadata"]["labels"] = desired.at("/metadata/labels").cloned().unwrap_or_else(|| json!({}));
    Some(EndpointsAction::Update(updated))
}

/// What the EndpointSlice controller does for one Service.
#[derive(Debug, PartialEq)]
pub enum SliceAction {
    Create(Value),
    Update(Value),
    Delete(String),
}

/// Brings a Service's EndpointSlices (`existing`: the ones it owns) to what its pods call
/// for: one run of slices per set of resolved ports, filled in order, reusing slices.
pub fn slice_actions(svc: &Value, pods: &[&Arc<Value>], existing: &[&Arc<Value>]) -> Vec<SliceAction> {
    let mut groups: BTreeMap<Vec<Port>, Vec<Value>> = BTreeMap::new();
    if selector(svc).is_some() {
        for m in members(svc, pods) {
            let ports = ports_for(svc, m.pod);
            if ports.is_empty() {
                continue;
            }
            let serving = if m.terminating { pod_ready(m.pod) } else { m.ready };
            let mut endpoint = json!({"addresses": [m.ip],
                                      "conditions": {"ready": m.ready, "serving": serving, "terminating": m.terminating},
                                      "targetRef": target_ref(m.pod)});
            let node = text(m.pod, "/spec/nodeName");
            if !node.is_empty() {
                endpoint["nodeName"] = json!(node);
            }
            groups.entry(ports).or_default().push(endpoint);
        }
    }
    // A Service with a selector and no endpoints still has one (empty) slice, as Kubernetes'.
    if groups.is_empty() && selector(svc).is_some() {
        let ports: Vec<Port> = Vec::new();
        groups.insert(ports, Vec::new());
    }
    let mut free: Vec<&Arc<Value>> = existing.to_vec();
    free.sort_by_key(|s| text(s, "/metadata/name").to_string());
    let mut actions = Vec::new();
    for (ports, endpoints) in groups {
        let ports_json: Vec<Value> = ports.iter().map(Port::slice_json).collect();
        let chunks: Vec<Vec<Value>> = if endpoints.is_empty() {
            vec![Vec::new()]
        } else {
            endpoints.chunks(PER_SLICE).map(<[Value]>::to_vec).collect()
        };
        for chunk in chunks {
            // Prefer a slice that already has these ports.
            let reuse = free
                .iter()
                .position(|s| s.get("ports").cloned().unwrap_or(json!([])) == json!(ports_json))
                .or((!free.is_empty()).then_some(0));
            let slice = match reuse {
                Some(i) => (**free.remove(i)).clone(),
                None => new_slice(svc),
            };
            let mut wanted = slice.clone();
            wanted["endpoints"] = Value::Array(chunk);
            wanted["ports"] = Value::Array(ports_json.clone());
            wanted["addressType"] = json!("IPv4");
            let mut labels = svc.at("/metadata/labels").and_then(Value::as_object).cloned().unwrap_or_default();
            labels.insert(SERVICE_NAME.into(), json!(text(svc, "/metadata/name")));
            labels.insert(MANAGED_BY.into(), json!(MANAGER));
            wanted["metadata"]["labels"] = Value::Object(labels);
            if reuse.is_none() {
                actions.push(SliceAction::Create(wanted));
            } else if wanted != slice {
                actions.push(SliceAction::Update(wanted));
            }
        }
    }
    for s in free {
        actions.push(SliceAction::Delete(text(s, "/metadata/name").to_string()));
    }
    actions
}

fn new_slice(svc: &Value) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"generateName": format!("{}-", text(svc, "/metadata/name")),
                        "namespace": text(svc, "/metadata/namespace"),
                        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": text(svc, "/metadata/name"),
                                             "uid": text(svc, "/metadata/uid"), "controller": true,
                                             "blockOwnerDeletion": true}]}})
}

/// Runs both controllers until aborted.
pub async fn run<C: Cluster>(cluster: Arc<C>, informers: Arc<Informers>) {
    let services = informers.get("services").await;
    let pods = informers.get("pods").await;
    let endpoints = informers.get("endpoints").await;
    let slices = informers.get("discovery.k8s.io/endpointslices").await;
    loop {
        let pass = std::time::Instant::now();
        let changes = (services.changed(), pods.changed(), endpoints.changed(), slices.changed());
        let all_services = services.list();
        // Only the namespaces that have Services with selectors: their pods, each read once.
        let mut by_ns: HashMap<&str, Vec<Arc<Value>>> = HashMap::new();
        for svc in all_services.iter().filter(|svc| selector(svc).is_some()) {
            let ns = text(svc, "/metadata/namespace");
            by_ns.entry(ns).or_insert_with(|| pods.list_in(ns));
        }
        let all_slices = slices.list();
        let mut owned: HashMap<String, Vec<&Arc<Value>>> = HashMap::new();
        for s in &all_slices {
            if s.at("/metadata/labels").and_then(|l| l.get(MANAGED_BY)).and_then(Value::as_str) == Some(MANAGER)
                && let Some(owner) = crate::replicaset::controller_uid(s)
            {
                owned.entry(owner.to_string()).or_default().push(s);
            }
        }
        for svc in &all_services {
            let ns = text(svc, "/metadata/namespace");
            let in_ns: Vec<&Arc<Value>> = by_ns.get(ns).into_iter().flatten().collect();
            if let Some(desired) = desired_endpoints(svc, &in_ns) {
                let existing = endpoints.get(&format!("{ns}/{}", text(svc, "/metadata/name")));
                let result = match endpoints_action(desired, existing.as_deref()) {
                    Some(EndpointsAction::Create(ep)) => cluster.create("endpoints", ns, ep).await.map(|_| ()),
                    Some(EndpointsAction::Update(ep)) => cluster.update("endpoints", ep).await.map(|_| ()),
                    None => Ok(()),
                };
                log_write("endpoints", svc, result);
            }
            let mine = owned.get(text(svc, "/metadata/uid")).cloned().unwrap_or_default();
            for action in slice_actions(svc, &in_ns, &mine) {
                let result = match action {
                    SliceAction::Create(s) => {
                        cluster.create("discovery.k8s.io/endpointslices", ns, s).await.map(|_| ())
                    }
                    SliceAction::Update(s) => cluster.update("discovery.k8s.io/endpointslices", s).await.map(|_| ()),
                    SliceAction::Delete(name) => {
                        cluster.delete("discovery.k8s.io/endpointslices", ns, &name, json!({})).await
                    }
                };
                log_write("endpointslice", svc, result);
            }
        }
        // Endpoints this controller made for Services gone or without a selector now.
        for ep in endpoints.list() {
            let (ns, name) = (text(&ep, "/metadata/namespace"), text(&ep, "/metadata/name"));
            let ours = ep.at("/metadata/labels").and_then(|l| l.get(ENDPOINTS_MANAGED_BY)).and_then(Value::as_str)
                == Some(ENDPOINTS_MANAGER);
            let wanted = services.get(&format!("{ns}/{name}")).is_some_and(|svc| selector(&svc).is_some());
            if ours && !wanted {
                log_write("endpoints", &ep, cluster.delete("endpoints", ns, name, json!({})).await);
            }
        }
        let worked = pass.elapsed();
        tokio::select! {
            _ = changes.0 => {}
            _ = changes.1 => {}
            _ = changes.2 => {}
            _ = changes.3 => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
        crate::informer::pace(worked, DEBOUNCE, 0.2).await;
    }
}

fn log_write(what: &str, obj: &Value, result: Result<(), ClusterError>) {
    match result {
        Ok(())
        | Err(ClusterError::Conflict(_))
        | Err(ClusterError::NotFound(_))
        | Err(ClusterError::AlreadyExists(_)) => {}
        Err(e) => tracing::warn!(service = %text(obj, "/metadata/name"), error = %e, "writing {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ports: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "default", "uid": "svc-uid", "labels": {"tier": "front"}},
               "spec": {"selector": {"app": "web"}, "ports": ports}})
    }

    fn pod(name: &str, ip: &str, ready: bool, container_ports: Value) -> Arc<Value> {
        Arc::new(
            json!({"metadata": {"name": name, "namespace": "default", "uid": format!("u-{name}"), "labels": {"app": "web"}},
                        "spec": {"nodeName": "a1", "containers": [{"name": "c", "ports": container_ports}]},
                        "status": {"phase": "Running", "podIP": ip,
                                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}),
        )
    }

    #[test]
    fn ready_and_unready_pods_go_to_their_lists_with_named_ports_resolved() {
        let service = svc(json!([{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}]));
        let a = pod("a", "10.0.0.2", true, json!([{"name": "web", "containerPort": 8080}]));
        let b = pod("b", "10.0.0.1", false, json!([{"name": "web", "containerPort": 8080}]));
        let other = pod("c", "10.0.0.3", true, json!([{"name": "web", "containerPort": 9090}]));
        let no_port = pod("d", "10.0.0.4", true, json!([]));
        let mut stranger = (*pod("e", "10.0.0.5", true, json!([]))).clone();
        stranger["metadata"]["labels"] = json!({"app": "other"});
        let stranger = Arc::new(stranger);
        let ep = desired_endpoints(&service, &[&a, &b, &other, &no_port, &stranger]).unwrap();
        assert_eq!(ep["metadata"]["labels"]["tier"], "front");
        let subsets = ep["subsets"].as_array().unwrap();
        assert_eq!(subsets.len(), 2, "one subset per resolved port: {subsets:?}");
        assert_eq!(subsets[0]["ports"], json!([{"name": "http", "port": 8080, "protocol": "TCP"}]));
        assert_eq!(subsets[0]["addresses"][0]["ip"], "10.0.0.2");
        assert_eq!(subsets[0]["addresses"][0]["targetRef"]["name"], "a");
        assert_eq!(subsets[0]["notReadyAddresses"][0]["ip"], "10.0.0.1");
        assert_eq!(subsets[1]["ports"][0]["port"], 9090);
    }

    #[test]
    fn endpoints_are_written_only_when_they_change() {
        let service = svc(json!([{"port": 80, "targetPort": 80}]));
        let a = pod("a", "10.0.0.2", true, json!([]));
        let desired = desired_endpoints(&service, &[&a]).unwrap();
        let Some(EndpointsAction::Create(created)) = endpoints_action(desired.clone(), None) else { panic!() };
        assert_eq!(
            created["subsets"][0]["ports"],
            json!([{"port": 80, "protocol": "TCP"}]),
            "an unnamed port has no name"
        );
        let mut stored = created.clone();
        stored["metadata"]["resourceVersion"] = json!("7");
        assert_eq!(endpoints_action(desired, Some(&stored)), None);
        let gone = desired_endpoints(&service, &[]).unwrap();
        let Some(EndpointsAction::Update(updated)) = endpoints_action(gone, Some(&stored)) else { panic!() };
        assert!(updated.get("subsets").is_none(), "no pods: no subsets");
        assert_eq!(updated["metadata"]["resourceVersion"], "7", "compare-and-swap on what was read");
    }

    #[test]
    fn slices_hold_a_hundred_endpoints_each_and_are_reused() {
        let service = svc(json!([{"port": 80}]));
        let pods: Vec<Arc<Value>> = (0..150)
            .map(|i| pod(&format!("p{i}"), &format!("10.0.{}.{}", i / 200, i % 200 + 1), i % 2 == 0, json!([])))
            .collect();
        let refs: Vec<&Arc<Value>> = pods.iter().collect();
        let actions = slice_actions(&service, &refs, &[]);
        let created: Vec<&Value> = actions
            .iter()
            .map(|a| match a {
                SliceAction::Create(s) => s,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(created.len(), 2);
        assert_eq!(created[0]["endpoints"].as_array().unwrap().len(), 100);
        assert_eq!(created[0]["metadata"]["generateName"], "web-");
        assert_eq!(created[0]["metadata"]["labels"][SERVICE_NAME], "web");
        assert_eq!(created[0]["metadata"]["ownerReferences"][0]["uid"], "svc-uid");
        assert_eq!(created[0]["ports"], json!([{"name": "", "port": 80, "protocol": "TCP"}]));
        // Stored under names; the same pods again change nothing.
        let stored: Vec<Arc<Value>> = created
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut s = (*s).clone();
                s["metadata"]["name"] = json!(format!("web-{i}"));
                Arc::new(s)
            })
            .collect();
        let existing: Vec<&Arc<Value>> = stored.iter().collect();
        assert_eq!(slice_actions(&service, &refs, &existing), []);
        // Fewer pods: one slice updated, the other deleted.
        let actions = slice_actions(&service, &refs[..10], &existing);
        assert!(matches!(&actions[0], SliceAction::Update(s) if s["endpoints"].as_array().unwrap().len() == 10));
        assert_eq!(actions[1], SliceAction::Delete("web-1".into()));
    }

    #[test]
    fn terminating_pods_stay_in_slices_as_terminating_but_leave_endpoints() {
        let service = svc(json!([{"port": 80}]));
        let mut going = (*pod("going", "10.0.0.9", true, json!([]))).clone();
        going["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        let going = Arc::new(going);
        let ep = desired_endpoints(&service, &[&going]).unwrap();
        assert!(ep.get("subsets").is_none());
        let actions = slice_actions(&service, &[&going], &[]);
        let SliceAction::Create(s) = &actions[0] else { panic!() };
        assert_eq!(s["endpoints"][0]["conditions"], json!({"ready": false, "serving": true, "terminating": true}));
    }

    #[test]
    fn a_service_without_a_selector_is_left_alone() {
        let mut service = svc(json!([{"port": 80}]));
        service["spec"].as_object_mut().unwrap().remove("selector");
        assert!(desired_endpoints(&service, &[]).is_none());
        assert!(slice_actions(&service, &[], &[]).is_empty());
    }
}
