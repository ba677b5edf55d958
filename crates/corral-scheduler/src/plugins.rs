//! One plugin per concern, as Kubernetes' scheduler names them. Filters: NodeUnschedulable,
//! NodeName, TaintToleration, NodeAffinity (nodeSelector and required affinity),
//! NodeResourcesFit (requests against allocatable, pod count), InterPodAffinity (required
//! affinity and anti-affinity, and existing pods' anti-affinity), PodTopologySpread
//! (DoNotSchedule constraints). Scores: NodeResourcesLeastAllocated,
//! NodeResourcesBalancedAllocation, SelectorSpread (replicas of one owner across nodes),
//! NodeAffinity (preferred terms), TaintToleration (PreferNoSchedule), InterPodAffinity
//! (preferred terms).

use std::collections::BTreeMap;

use corral_api::meta::JsonAt;
use corral_api::meta::str_at as text;
use corral_api::selector::LabelSelector;
use serde_json::Value;

use crate::framework::{FilterPlugin, MAX_SCORE, Normalize, Reasons, ScorePlugin};
use crate::snapshot::{NodeInfo, PodInfo, Snapshot};

pub fn filters() -> Vec<Box<dyn FilterPlugin>> {
    vec![
        Box::new(NodeUnschedulable),
        Box::new(NodeName),
        Box::new(TaintToleration),
        Box::new(NodeAffinity),
        Box::new(NodeResourcesFit),
        Box::new(InterPodAffinity),
        Box::new(PodTopologySpread),
        Box::new(VolumeBinding),
    ]
}

pub fn scores() -> Vec<Box<dyn ScorePlugin>> {
    vec![
        Box::new(LeastAllocated),
        Box::new(BalancedAllocation),
        Box::new(SelectorSpread),
        Box::new(PreferredNodeAffinity),
        Box::new(PreferNoScheduleTaints),
        Box::new(PreferredPodAffinity),
    ]
}

fn array<'a>(v: &'a Value, pointer: &str) -> impl Iterator<Item = &'a Value> {
    v.at(pointer).and_then(Value::as_array).into_iter().flatten()
}

/// A node selector requirement against a label map: a label selector's operators, and Gt
/// and Lt.
fn expression_matches(e: &Value, labels: &BTreeMap<String, String>) -> bool {
    let key = text(e, "/key");
    let values: Vec<&str> = array(e, "/values").filter_map(Value::as_str).collect();
    let value = labels.get(key);
    let number = |v: Option<&String>| v.and_then(|v| v.parse::<i64>().ok());
    match text(e, "/operator") {
        "In" => value.is_some_and(|v| values.contains(&v.as_str())),
        "NotIn" => value.is_none_or(|v| !values.contains(&v.as_str())),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => {
            matches!((number(value), values.first().and_then(|v| v.parse::<i64>().ok())), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((number(value), values.first().and_then(|v| v.parse::<i64>().ok())), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

/// A metav1.LabelSelector, read once before a loop over pods; None (absent or invalid)
/// selects nothing, an empty one everything.
pub fn parse_selector(selector: Option<&Value>) -> Option<LabelSelector> {
    LabelSelector::from_json(selector.filter(|s| s.is_object())?).ok()
}

fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    selector.is_some_and(|s| s.matches_labels(labels))
}

/// One nodeSelectorTerm: its expressions on labels and its fields (metadata.name), all of them.
fn term_matches(term: &Value, node: &NodeInfo) -> bool {
    let exprs = array(term, "/matchExpressions").collect::<Vec<_>>();
    let fields = array(term, "/matchFields").collect::<Vec<_>>();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    let name = BTreeMap::from([("metadata.name".to_string(), node.name.clone())]);
    exprs.iter().all(|e| expression_matches(e, &node.labels)) && fields.iter().all(|f| expression_matches(f, &name))
}

/// Whether a pod's tolerations cover a taint (key, value and effect as Kubernetes matches them).
pub fn tolerates(tolerations: &[Value], taint: &Value) -> bool {
    tolerations.iter().any(|t| {
        let effect = text(t, "/effect");
        if !effect.is_empty() && effect != text(taint, "/effect") {
            return false;
        }
        let key = text(t, "/key");
        if !key.is_empty() && key != text(taint, "/key") {
            return false;
        }
        match text(t, "/operator") {
            "Exists" => true,
            // Equal (the default) names a key and its value.
            _ => !key.is_empty() && text(t, "/value") == text(taint, "/value"),
        }
    })
}

fn tolerations(pod: &PodInfo) -> &[Value] {
    pod.spec().get("tolerations").and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn taints(node: &NodeInfo) -> impl Iterator<Item = &Value> {
    node.taints.iter()
}

pub struct NodeUnschedulable;

impl FilterPlugin for NodeUnschedulable {
    fn name(&self) -> &'static str {
        "NodeUnschedulable"
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, _: &Snapshot) -> Result<(), Reasons> {
        if !node.unschedulable {
            return Ok(());
        }
        let taint = serde_json::json!({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"});
        if !tolerates(tolerations(pod), &taint) {
            return Err(vec!["node(s) were unschedulable".into()]);
        }
        Ok(())
    }
}

pub struct NodeName;

impl FilterPlugin for NodeName {
    fn name(&self) -> &'static str {
        "NodeName"
    }

    fn relevant(&self, pod: &PodInfo, _: &Snapshot) -> bool {
        !pod.node_name.is_empty()
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, _: &Snapshot) -> Result<(), Reasons> {
        if !pod.node_name.is_empty() && pod.node_name != node.name {
            return Err(vec!["node(s) didn't match the requested node name".into()]);
        }
        Ok(())
    }
}

pub struct TaintToleration;

impl FilterPlugin for TaintToleration {
    fn name(&self) -> &'static str {
        "TaintToleration"
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, _: &Snapshot) -> Result<(), Reasons> {
        let tolerations = tolerations(pod);
        let untolerated = taints(node)
            .find(|t| matches!(text(t, "/effect"), "NoSchedule" | "NoExecute") && !tolerates(tolerations, t));
        match untolerated {
            Some(t) => {
                Err(vec![format!("node(s) had untolerated taint {{{}: {}}}", text(t, "/key"), text(t, "/value"))])
            }
            None => Ok(()),
        }
    }
}

/// nodeSelector and requiredDuringSchedulingIgnoredDuringExecution, both of them.
pub fn node_affinity_matches(pod: &PodInfo, node: &NodeInfo) -> bool {
    let selector_ok = pod.node_selector.iter().all(|(k, v)| node.labels.get(k) == Some(v));
    let required = pod.spec().at("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution");
    let affinity_ok = required.is_none_or(|r| array(r, "/nodeSelectorTerms").any(|t| term_matches(t, node)));
    selector_ok && affinity_ok
}

pub struct NodeAffinity;

impl FilterPlugin for NodeAffinity {
    fn name(&self) -> &'static str {
        "NodeAffinity"
    }

    fn relevant(&self, pod: &PodInfo, _: &Snapshot) -> bool {
        !pod.node_selector.is_empty()
            || pod.spec().at("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution").is_some()
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, _: &Snapshot) -> Result<(), Reasons> {
        if node_affinity_matches(pod, node) {
            Ok(())
        } else {
            Err(vec!["node(s) didn't match Pod's node affinity/selector".into()])
        }
    }
}

/// Pods' persistentVolumeClaim volumes: the claim must exist and be bound, and the node
/// must be one its volume's node affinity allows.
pub struct VolumeBinding;

impl FilterPlugin for VolumeBinding {
    fn name(&self) -> &'static str {
        "VolumeBinding"
    }

    fn relevant(&self, pod: &PodInfo, _: &Snapshot) -> bool {
        array(pod.spec(), "/volumes").any(|v| v.get("persistentVolumeClaim").is_some())
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, snapshot: &Snapshot) -> Result<(), Reasons> {
        let mut reasons = Vec::new();
        for claim in array(pod.spec(), "/volumes").filter_map(|v| v.at("/persistentVolumeClaim/claimName")) {
            let claim = claim.as_str().unwrap_or_default();
            let Some(pvc) = snapshot.claims.get(&format!("{}/{claim}", pod.namespace)) else {
                reasons.push(format!("persistentvolumeclaim {claim:?} not found"));
                continue;
            };
            let volume = text(pvc, "/spec/volumeName");
            if volume.is_empty() || text(pvc, "/status/phase") != "Bound" {
                reasons.push("pod has unbound immediate PersistentVolumeClaims".to_string());
                continue;
            }
            let required = snapshot.volumes.get(volume).and_then(|pv| pv.at("/spec/nodeAffinity/required"));
            if required.is_some_and(|r| !array(r, "/nodeSelectorTerms").any(|t| term_matches(t, node))) {
                reasons.push("node(s) had volume node affinity conflict".to_string());
            }
        }
        reasons.sort();
        reasons.dedup();
        if reasons.is_empty() { Ok(()) } else { Err(reasons) }
    }
}

pub struct NodeResourcesFit;

impl FilterPlugin for NodeResourcesFit {
    fn name(&self) -> &'static str {
        "NodeResourcesFit"
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, _: &Snapshot) -> Result<(), Reasons> {
        let (want, used, have) = (&pod.requests, &node.requested, &node.allocatable);
        let mut why = Vec::new();
        if used.pods + 1 > have.pods {
            why.push("Too many pods".to_string());
        }
        if want.milli_cpu > 0 && used.milli_cpu + want.milli_cpu > have.milli_cpu {
            why.push("Insufficient cpu".into());
        }
        if want.memory > 0 && used.memory + want.memory > have.memory {
            why.push("Insufficient memory".into());
        }
        if want.ephemeral_storage > 0 && used.ephemeral_storage + want.ephemeral_storage > have.ephemeral_storage {
            why.push("Insufficient ephemeral-storage".into());
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }
}

/// A pod (anti-)affinity term: which pods it selects (selector and namespaces, the term
/// owner's namespace by default).
fn term_selects(term: &Value, selector: Option<&LabelSelector>, owner_namespace: &str, other: &PodInfo) -> bool {
    let namespaces: Vec<&str> = array(term, "/namespaces").filter_map(Value::as_str).collect();
    let all_namespaces = term.get("namespaceSelector").is_some_and(|s| s.as_object().is_some_and(|o| o.is_empty()));
    let in_namespace = all_namespaces
        || if namespaces.is_empty() {
            other.namespace == owner_namespace
        } else {
            namespaces.contains(&other.namespace.as_str())
        };
    in_namespace && selects(selector, &other.labels)
}

/// The node's value of the term's topology key, None when the node lacks the label.
fn domain<'a>(term: &Value, node: &'a NodeInfo) -> Option<&'a String> {
    node.labels.get(text(term, "/topologyKey"))
}

/// Whether some pod the term selects runs in the same topology domain as `node`.
fn any_in_domain(term: &Value, owner_namespace: &str, node: &NodeInfo, snapshot: &Snapshot) -> bool {
    let Some(value) = domain(term, node) else { return false };
    let selector = parse_selector(term.get("labelSelector"));
    snapshot
        .nodes
        .iter()
        .filter(|n| domain(term, n) == Some(value))
        .flat_map(|n| n.pods.iter())
        .any(|p| term_selects(term, selector.as_ref(), owner_namespace, p))
}

fn required_terms<'a>(pod: &'a PodInfo, kind: &str) -> impl Iterator<Item = &'a Value> {
    let terms = pod.object.at("/spec/affinity").and_then(|a| a.get(kind));
    terms
        .and_then(|t| t.get("requiredDuringSchedulingIgnoredDuringExecution"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

pub struct InterPodAffinity;

impl FilterPlugin for InterPodAffinity {
    fn name(&self) -> &'static str {
        "InterPodAffinity"
    }

    fn relevant(&self, pod: &PodInfo, snapshot: &Snapshot) -> bool {
        let own = pod
            .spec()
            .at("/affinity")
            .is_some_and(|a| a.get("podAffinity").is_some() || a.get("podAntiAffinity").is_some());
        own || snapshot.anti_affinity_pods > 0
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, snapshot: &Snapshot) -> Result<(), Reasons> {
        // Existing pods' anti-affinity against this one, in this node's domain (only the
        // pods that have such terms are looked at: usually none).
        let with_terms = snapshot.nodes.iter().filter(|n| snapshot.anti_affinity_pods > 0 && n.anti_affinity_pods > 0);
        for other in with_terms.flat_map(|n| n.pods.iter().filter(|p| p.required_anti_affinity).map(move |p| (n, p))) {
            let (other_node, other) = other;
            for term in required_terms(other, "podAntiAffinity") {
                let selector = parse_selector(term.get("labelSelector"));
                if term_selects(term, selector.as_ref(), &other.namespace, pod)
                    && domain(term, node).is_some()
                    && domain(term, node) == domain(term, other_node)
                {
                    return Err(vec!["node(s) didn't satisfy existing pods anti-affinity rules".into()]);
                }
            }
        }
        for term in required_terms(pod, "podAffinity") {
            if any_in_domain(term, &pod.namespace, node, snapshot) {
                continue;
            }
            // The first pod of a group that selects itself may go where the domain exists.
            let selector = parse_selector(term.get("labelSelector"));
            let selects_pod = |p: &PodInfo| term_selects(term, selector.as_ref(), &pod.namespace, p);
            let nobody = !snapshot.nodes.iter().flat_map(|n| n.pods.iter()).any(|p| selects_pod(p));
            if nobody && selects_pod(pod) && domain(term, node).is_some() {
                continue;
            }
            return Err(vec!["node(s) didn't match pod affinity rules".into()]);
        }
        for term in required_terms(pod, "podAntiAffinity") {
            if any_in_domain(term, &pod.namespace, node, snapshot) {
                return Err(vec!["node(s) didn't match pod anti-affinity rules".into()]);
            }
        }
        Ok(())
    }
}

pub struct PodTopologySpread;

impl FilterPlugin for PodTopologySpread {
    fn name(&self) -> &'static str {
        "PodTopologySpread"
    }

    fn relevant(&self, pod: &PodInfo, _: &Snapshot) -> bool {
        array(pod.spec(), "/topologySpreadConstraints").next().is_some()
    }

    fn filter(&self, pod: &PodInfo, node: &NodeInfo, snapshot: &Snapshot) -> Result<(), Reasons> {
        for c in array(pod.spec(), "/topologySpreadConstraints") {
            if text(c, "/whenUnsatisfiable") != "DoNotSchedule" {
                continue;
            }
            let key = text(c, "/topologyKey");
            let Some(value) = node.labels.get(key) else {
                return Err(vec![
                    "node(s) didn't match pod topology spread constraints (missing required label)".into(),
                ]);
            };
            let selector = parse_selector(c.get("labelSelector"));
            let max_skew = c.get("maxSkew").and_then(Value::as_i64).unwrap_or(1);
            // Matching pods per domain, over the nodes the pod could go to by its affinity.
            let mut counts: BTreeMap<&String, i64> = BTreeMap::new();
            for n in snapshot.nodes.iter().filter(|n| node_affinity_matches(pod, n)) {
                let Some(v) = n.labels.get(key) else { continue };
                let matching = n
                    .pods
                    .iter()
                    .filter(|p| p.namespace == pod.namespace && selects(selector.as_ref(), &p.labels))
                    .count() as i64;
                *counts.entry(v).or_default() += matching;
            }
            let min = counts.values().copied().min().unwrap_or(0);
            let here = counts.get(value).copied().unwrap_or(0);
            let own = i64::from(selects(selector.as_ref(), &pod.labels));
            if here + own - min > max_skew {
                return Err(vec!["node(s) didn't match pod topology spread constraints".into()]);
            }
        }
        Ok(())
    }
}

fn fraction(used: i64, have: i64) -> f64 {
    if have <= 0 { 1.0 } else { (used as f64 / have as f64).min(1.0) }
}

pub struct LeastAllocated;

impl ScorePlugin for LeastAllocated {
    fn name(&self) -> &'static str {
        "NodeResourcesLeastAllocated"
    }
    fn weight(&self) -> i64 {
        1
    }
    fn normalize(&self) -> Normalize {
        Normalize::None
    }
    fn score(&self, pod: &PodInfo, node: &NodeInfo, _: &Snapshot) -> i64 {
        let ((pc, pm), (nc, nm)) = (pod.non_zero, node.non_zero_requested);
        let free = |used: i64, have: i64| ((1.0 - fraction(used, have)) * MAX_SCORE as f64) as i64;
        (free(nc + pc, node.allocatable.milli_cpu) + free(nm + pm, node.allocatable.memory)) / 2
    }
}

pub struct BalancedAllocation;

impl ScorePlugin for BalancedAllocation {
    fn name(&self) -> &'static str {
        "NodeResourcesBalancedAllocation"
    }
    fn weight(&self) -> i64 {
        1
    }
    fn normalize(&self) -> Normalize {
        Normalize::None
    }
    fn score(&self, pod: &PodInfo, node: &NodeInfo, _: &Snapshot) -> i64 {
        let ((pc, pm), (nc, nm)) = (pod.non_zero, node.non_zero_requested);
        let cpu = fraction(nc + pc, node.allocatable.milli_cpu);
        let memory = fraction(nm + pm, node.allocatable.memory);
        // The standard deviation of two fractions is half their difference.
        ((1.0 - (cpu - memory).abs() / 2.0) * MAX_SCORE as f64) as i64
    }
}

/// Fewer pods of the same owner on a node is better: replicas spread across nodes.
pub struct SelectorSpread;

impl ScorePlugin for SelectorSpread {
    fn name(&self) -> &'static str {
        "SelectorSpread"
    }

    fn relevant(&self, pod: &PodInfo, _: &Snapshot) -> bool {
        pod.owner.is_some()
    }
    fn weight(&self) -> i64 {
        2
    }
    fn normalize(&self) -> Normalize {
        Normalize::ReverseMax
    }
    fn score(&self, pod: &PodInfo, node: &NodeInfo, _: &Snapshot) -> i64 {
        let Some(owner) = &pod.owner else { return 0 };
        node.pods.iter().filter(|p| p.owner.as_ref() == Some(owner)).count() as i64
    }
}

pub struct PreferredNodeAffinity;

impl ScorePlugin for PreferredNodeAffinity {
    fn name(&self) -> &'static str {
        "NodeAffinity"
    }

    fn relevant(&self, pod: &PodInfo, _: &Snapshot) -> bool {
        array(pod.spec(), "/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution").next().is_some()
    }
    fn weight(&self) -> i64 {
        2
    }
    fn normalize(&self) -> Normalize {
        Normalize::Max
    }
    fn score(&self, pod: &PodInfo, node: &NodeInfo, _: &Snapshot) -> i64 {
        array(pod.spec(), "/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution")
            .filter(|p| p.get("preference").is_some_and(|t| term_matches(t, node)))
            .map(|p| p.get("weight").and_then(Value::as_i64).unwrap_or(0))
            .sum()
    }
}

pub struct PreferNoScheduleTaints;

impl ScorePlugin for PreferNoScheduleTaints {
    fn name(&self) -> &'static str {
        "TaintToleration"
    }
    fn weight(&self) -> i64 {
        3
    }
    fn normalize(&self) -> Normalize {
        Normalize::ReverseMax
    }
    fn score(&self, pod: &PodInfo, node: &NodeInfo, _: &Snapshot) -> i64 {
        let tolerations = tolerations(pod);
        taints(node).filter(|t| text(t, "/effect") == "PreferNoSchedule" && !tolerates(tolerations, t)).count() as i64
    }
}

pub struct PreferredPodAffinity;

impl ScorePlugin for PreferredPodAffinity {
    fn name(&self) -> &'static str {
        "InterPodAffinity"
    }

    fn relevant(&self, pod: &PodInfo, _: &Snapshot) -> bool {
        ["podAffinity", "podAntiAffinity"].iter().any(|kind| {
            array(pod.spec(), &format!("/affinity/{kind}/preferredDuringSchedulingIgnoredDuringExecution"))
                .next()
                .is_some()
        })
    }
    fn weight(&self) -> i64 {
        2
    }
    fn normalize(&self) -> Normalize {
        Normalize::MinMax
    }
    fn score(&self, pod: &PodInfo, node: &NodeInfo, snapshot: &Snapshot) -> i64 {
        let weighted = |kind: &str, sign: i64| -> i64 {
            let pointer = format!("/affinity/{kind}/preferredDuringSchedulingIgnoredDuringExecution");
            array(pod.spec(), &pointer)
                .filter(|w| w.get("podAffinityTerm").is_some_and(|t| any_in_domain(t, &pod.namespace, node, snapshot)))
                .map(|w| sign * w.get("weight").and_then(Value::as_i64).unwrap_or(0))
                .sum()
        };
        weighted("podAffinity", 1) + weighted("podAntiAffinity", -1)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Value, json};

    use crate::framework::Framework;
    use crate::snapshot::{PodInfo, Snapshot};

    fn node(name: &str, cpu: &str, extra: serde_json::Value) -> Arc<Value> {
        let mut n = json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                           "spec": {}, "status": {"allocatable": {"cpu": cpu, "memory": "4Gi", "pods": "110"}}});
        if let Some(spec) = extra.get("spec") {
            n["spec"] = spec.clone();
        }
        if let Some(labels) = extra.get("labels").and_then(Value::as_object) {
            for (k, v) in labels {
                n["metadata"]["labels"][k] = v.clone();
            }
        }
        Arc::new(n)
    }

    fn pod(name: &str, spec: serde_json::Value) -> PodInfo {
        let mut p = json!({"metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                                         "labels": {"app": "web"},
                                         "ownerReferences": [{"uid": "rs-1", "controller": true}]},
                           "spec": {"containers": [{"name": "c"}]}});
        for (k, v) in spec.as_object().into_iter().flatten() {
            p["spec"][k] = v.clone();
        }
        PodInfo::new(Arc::new(p))
    }

    #[test]
    fn plugins_a_pod_gives_nothing_to_judge_are_skipped() {
        let snapshot = Snapshot::new(vec![node("n1", "1", json!({}))], vec![]);
        let plain = pod("plain", json!({}));
        let skipped: Vec<&str> =
            super::filters().iter().filter(|f| !f.relevant(&plain, &snapshot)).map(|f| f.name()).collect();
        assert_eq!(skipped, ["NodeName", "NodeAffinity", "InterPodAffinity", "PodTopologySpread", "VolumeBinding"]);
        let rich = pod(
            "rich",
            json!({
            "nodeName": "n1", "nodeSelector": {"disk": "ssd"},
            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "c"}}],
            "affinity": {"podAntiAffinity": {}},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]}),
        );
        assert!(super::filters().iter().all(|f| f.relevant(&rich, &snapshot)));
    }

    fn cluster(nodes: Vec<Arc<Value>>) -> Snapshot {
        Snapshot::new(nodes, Vec::<Arc<Value>>::new())
    }

    /// Schedules `pod` and records it on its node, as the scheduling loop does.
    fn place(f: &Framework, s: &mut Snapshot, mut pod: PodInfo) -> Result<String, String> {
        let d = f.schedule(&pod, s).map_err(|u| u.message)?;
        pod.node_name = d.node.clone();
        s.assume(Arc::new(pod));
        Ok(d.node)
    }

    #[test]
    fn a_claim_must_be_bound_and_its_volume_on_the_node() {
        let f = Framework::default();
        let uses_claim =
            || pod("reader", json!({"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}));
        let nodes = vec![node("n1", "1", json!({})), node("n2", "1", json!({}))];
        let no_claim = cluster(nodes.clone());
        let message = f.schedule(&uses_claim(), &no_claim).unwrap_err().message;
        assert_eq!(message, "0/2 nodes are available: 2 persistentvolumeclaim \"data\" not found.");
        let pending =
            json!({"metadata": {"name": "data", "namespace": "default"}, "spec": {}, "status": {"phase": "Pending"}});
        let s = cluster(nodes.clone()).with_volumes([Arc::new(pending)], []);
        let message = f.schedule(&uses_claim(), &s).unwrap_err().message;
        assert_eq!(message, "0/2 nodes are available: 2 pod has unbound immediate PersistentVolumeClaims.");
        let bound = json!({"metadata": {"name": "data", "namespace": "default"}, "spec": {"volumeName": "pv1"},
                           "status": {"phase": "Bound"}});
        let pinned = json!({"metadata": {"name": "pv1"}, "spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["n2"]}]}]}}}});
        let mut s = cluster(nodes).with_volumes([Arc::new(bound)], [Arc::new(pinned)]);
        assert_eq!(place(&f, &mut s, uses_claim()), Ok("n2".to_string()), "where the volume's data is");
    }

    #[test]
    fn a_pod_too_big_for_every_node_gets_kubernetes_message() {
        let f = Framework::default();
        let s = cluster(vec![node("n1", "2", json!({})), node("n2", "2", json!({})), node("n3", "2", json!({}))]);
        let big = pod("big", json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": "3"}}}]}));
        assert_eq!(f.schedule(&big, &s).unwrap_err().message, "0/3 nodes are available: 3 Insufficient cpu.");
    }

    #[test]
    fn replicas_of_one_owner_spread_over_equal_nodes() {
        let f = Framework::default();
        let mut s = cluster(vec![node("n1", "2", json!({})), node("n2", "2", json!({})), node("n3", "2", json!({}))]);
        let mut placed: Vec<String> =
            (0..3).map(|i| place(&f, &mut s, pod(&format!("web-{i}"), json!({}))).unwrap()).collect();
        placed.sort();
        assert_eq!(placed, ["n1", "n2", "n3"]);
    }

    #[test]
    fn cordons_taints_selectors_and_affinity_keep_pods_off_nodes() {
        let f = Framework::default();
        let s = cluster(vec![
            node("n1", "2", json!({"spec": {"unschedulable": true}})),
            node("n2", "2", json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}})),
            node("n3", "2", json!({"labels": {"disk": "ssd"}})),
        ]);
        assert_eq!(f.schedule(&pod("any", json!({})), &s).unwrap().node, "n3");
        let tolerant = pod(
            "db",
            json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
                                      "nodeSelector": {"kubernetes.io/hostname": "n2"}}),
        );
        assert_eq!(f.schedule(&tolerant, &s).unwrap().node, "n2");
        let hdd = pod(
            "hdd",
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "disk", "operator": "In", "values": ["hdd"]}]}]}}}}),
        );
        assert_eq!(
            f.schedule(&hdd, &s).unwrap_err().message,
            "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, \
             1 node(s) had untolerated taint {dedicated: db}, 1 node(s) were unschedulable."
        );
        let by_name = pod(
            "named",
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n3"]}]}]}}}}),
        );
        assert_eq!(f.schedule(&by_name, &s).unwrap().node, "n3");
    }

    #[test]
    fn anti_affinity_and_topology_spread_keep_replicas_apart() {
        let f = Framework::default();
        let mut s = cluster(vec![node("n1", "8", json!({})), node("n2", "8", json!({}))]);
        let apart = json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}});
        place(&f, &mut s, pod("a", apart.clone())).unwrap();
        place(&f, &mut s, pod("b", apart.clone())).unwrap();
        assert_eq!(
            place(&f, &mut s, pod("c", apart)).unwrap_err(),
            "0/2 nodes are available: 2 node(s) didn't satisfy existing pods anti-affinity rules."
        );

        let mut s = cluster(vec![node("n1", "8", json!({})), node("n2", "8", json!({}))]);
        let spread = json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}],
            "nodeSelector": {"kubernetes.io/hostname": "n1"}});
        // Pinned to n1 by its selector, the spread counts only n1: skew stays 0.
        place(&f, &mut s, pod("s1", spread.clone())).unwrap();
        let free = json!({"topologySpreadConstraints": spread["topologySpreadConstraints"].clone()});
        let mut s2 = cluster(vec![node("n1", "8", json!({})), node("n2", "8", json!({}))]);
        let mut seen = Vec::new();
        for i in 0..4 {
            seen.push(place(&f, &mut s2, pod(&format!("t{i}"), free.clone())).unwrap());
        }
        seen.sort();
        assert_eq!(seen, ["n1", "n1", "n2", "n2"]);
    }

    #[test]
    fn the_emptier_node_wins_and_pod_count_is_a_limit() {
        let f = Framework::default();
        let busy = json!({"metadata": {"name": "old", "namespace": "x", "uid": "o"},
                          "spec": {"nodeName": "n1", "containers": [{"resources": {"requests": {"cpu": "1500m"}}}]}});
        let s = Snapshot::new(vec![node("n1", "2", json!({})), node("n2", "2", json!({}))], [Arc::new(busy)]);
        let mut lone = pod("lone", json!({}));
        lone.owner = None;
        assert_eq!(f.schedule(&lone, &s).unwrap().node, "n2");
        let tiny = Arc::new(
            json!({"metadata": {"name": "tiny"}, "status": {"allocatable": {"cpu": "1", "memory": "1Gi", "pods": "0"}}}),
        );
        assert_eq!(
            f.schedule(&lone, &cluster(vec![tiny])).unwrap_err().message,
            "0/1 nodes are available: 1 Too many pods."
        );
    }
}
