//! The cluster as the scheduler sees it: nodes with what is allocatable and what the pods
//! bound to them request. Built from API objects; updated in place as bindings are decided,
//! so one snapshot schedules a batch of pods without double-booking a node.

use std::collections::BTreeMap;
use std::sync::Arc;

use corral_api::meta::JsonAt;
use corral_api::meta::{str_at as text, string_map};
use corral_api::quantity::Quantity;
use serde_json::Value;

/// Pods per node when the node does not say.
pub const DEFAULT_MAX_PODS: i64 = 110;
/// What scoring counts for a pod that requests no cpu or memory (Kubernetes' non-zero
/// defaults), so such pods still spread.
pub const DEFAULT_MILLI_CPU: i64 = 100;
pub const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

/// Requested or allocatable amounts, in kubelet's units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
    pub ephemeral_storage: i64,
    pub pods: i64,
}

impl Resources {
    fn of(map: Option<&Value>) -> Self {
        let q = |name: &str| map.and_then(|m| m.get(name)).and_then(Quantity::from_json);
        Resources {
            milli_cpu: q("cpu").map_or(0, |v| v.millis()),
            memory: q("memory").map_or(0, |v| v.value()),
            ephemeral_storage: q("ephemeral-storage").map_or(0, |v| v.value()),
            pods: q("pods").map_or(0, |v| v.value()),
        }
    }

    fn add(&mut self, other: &Resources) {
        self.milli_cpu += other.milli_cpu;
        self.memory += other.memory;
        self.ephemeral_storage += other.ephemeral_storage;
        self.pods += other.pods;
    }

    fn max(self, other: Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu.max(other.milli_cpu),
            memory: self.memory.max(other.memory),
            ephemeral_storage: self.ephemeral_storage.max(other.ephemeral_storage),
            pods: self.pods.max(other.pods),
        }
    }
}

/// A pod as the plugins look at it.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// What the scheduler reserves for it: the sum of its containers' requests, or the
    /// largest init container's when that is more (as Kubernetes computes it), plus overhead.
    pub requests: Resources,
    /// The uid of its controller (ReplicaSet, StatefulSet, ...), for spreading.
    pub owner: Option<String>,
    pub node_name: String,
    /// Requests with the non-zero defaults, as scoring counts them: (milli-cpu, memory).
    pub non_zero: (i64, i64),
    /// Whether it has required pod anti-affinity terms (which every later pod must respect).
    pub required_anti_affinity: bool,
    /// spec.nodeSelector, read once: NodeAffinity asks for every node.
    pub node_selector: Vec<(String, String)>,
    /// Succeeded or Failed: it holds no room on its node any more.
    pub finished: bool,
    pub object: Arc<Value>,
}

impl PodInfo {
    pub fn new(pod: Arc<Value>) -> Self {
        let mut sum = Resources::default();
        for c in pod.at("/spec/containers").and_then(Value::as_array).into_iter().flatten() {
            sum.add(&Resources::of(c.at("/resources/requests")));
        }
        let mut init = Resources::default();
        for c in pod.at("/spec/initContainers").and_then(Value::as_array).into_iter().flatten() {
            init = init.max(Resources::of(c.at("/resources/requests")));
        }
        let mut requests = sum.max(init);
        requests.add(&Resources::of(pod.at("/spec/overhead")));
        requests.pods = 1;
        let owner = pod
            .at("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
            .map(|r| text(r, "/uid").to_string());
        let non_zero = (
            if requests.milli_cpu == 0 { DEFAULT_MILLI_CPU } else { requests.milli_cpu },
            if requests.memory == 0 { DEFAULT_MEMORY } else { requests.memory },
        );
        let required_anti_affinity = pod
            .at("/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution")
            .and_then(Value::as_array)
            .is_some_and(|terms| !terms.is_empty());
        PodInfo {
            non_zero,
            required_anti_affinity,
            namespace: text(&pod, "/metadata/namespace").to_string(),
            name: text(&pod, "/metadata/name").to_string(),
            uid: text(&pod, "/metadata/uid").to_string(),
            labels: string_map(pod.at("/metadata/labels")),
            requests,
            owner,
            node_name: text(&pod, "/spec/nodeName").to_string(),
            node_selector: string_map(pod.at("/spec/nodeSelector")).into_iter().collect(),
            finished: matches!(text(&pod, "/status/phase"), "Succeeded" | "Failed"),
            object: pod,
        }
    }

    pub fn spec(&self) -> &Value {
        self.object.get("spec").unwrap_or(&Value::Null)
    }
}

/// A node with the pods bound to it.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    /// Shared by every copy of this node version (a pass starts from copies).
    pub labels: Arc<BTreeMap<String, String>>,
    pub allocatable: Resources,
    pub requested: Resources,
    /// The pods' requests with the non-zero defaults, summed: (milli-cpu, memory).
    pub non_zero_requested: (i64, i64),
    /// Pods here with required anti-affinity terms.
    pub anti_affinity_pods: usize,
    pub pods: Vec<Arc<PodInfo>>,
    /// spec.unschedulable (cordoned) and spec.taints, read once: filters ask for every pod.
    pub unschedulable: bool,
    pub taints: Arc<Vec<Value>>,
    pub object: Arc<Value>,
}

impl NodeInfo {
    pub fn new(node: Arc<Value>) -> Self {
        let mut allocatable = Resources::of(node.at("/status/allocatable"));
        if node.at("/status/allocatable/pods").is_none() {
            allocatable.pods = DEFAULT_MAX_PODS;
        }
        NodeInfo {
            name: text(&node, "/metadata/name").to_string(),
            labels: Arc::new(string_map(node.at("/metadata/labels"))),
            allocatable,
            requested: Resources::default(),
            non_zero_requested: (0, 0),
            anti_affinity_pods: 0,
            pods: Vec::new(),
            unschedulable: node.at("/spec/unschedulable").and_then(Value::as_bool) == Some(true),
            taints: Arc::new(node.at("/spec/taints").and_then(Value::as_array).cloned().unwrap_or_default()),
            object: node,
        }
    }

    pub fn add_pod(&mut self, pod: Arc<PodInfo>) {
        self.requested.add(&pod.requests);
        self.non_zero_requested.0 += pod.non_zero.0;
        self.non_zero_requested.1 += pod.non_zero.1;
        self.anti_affinity_pods += usize::from(pod.required_anti_affinity);
        self.pods.push(pod);
    }

    pub fn spec(&self) -> &Value {
        self.object.get("spec").unwrap_or(&Value::Null)
    }
}

/// Every node, with the pods that occupy it.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub nodes: Vec<NodeInfo>,
    /// PersistentVolumeClaims by `namespace/name`, for pods that mount them.
    pub claims: std::collections::HashMap<String, Arc<Value>>,
    /// PersistentVolumes by name.
    pub volumes: std::collections::HashMap<String, Arc<Value>>,
    /// Bound pods with required anti-affinity terms, over all nodes.
    pub anti_affinity_pods: usize,
}

/// Whether a pod still occupies its node: bound and not finished.
fn occupies(pod: &Value) -> bool {
    !text(pod, "/spec/nodeName").is_empty() && !matches!(text(pod, "/status/phase"), "Succeeded" | "Failed")
}

impl Snapshot {
    /// The nodes with the bound, unfinished pods on them (pods of unknown nodes are left out).
    pub fn new(nodes: impl IntoIterator<Item = Arc<Value>>, pods: impl IntoIterator<Item = Arc<Value>>) -> Self {
        Self::from_infos(nodes, pods.into_iter().filter(|p| occupies(p)).map(|p| Arc::new(PodInfo::new(p))))
    }

    /// The same from pods already read (bound and unfinished ones only are kept).
    pub fn from_infos(
        nodes: impl IntoIterator<Item = Arc<Value>>,
        pods: impl IntoIterator<Item = Arc<PodInfo>>,
    ) -> Self {
        Self::from_node_infos(nodes.into_iter().map(NodeInfo::new), pods)
    }

    /// From nodes already read (with no pods yet: a reader may keep them from pass to pass)
    /// and the pods' infos.
    pub fn from_node_infos(
        nodes: impl IntoIterator<Item = NodeInfo>,
        pods: impl IntoIterator<Item = Arc<PodInfo>>,
    ) -> Self {
        let mut nodes: Vec<NodeInfo> = nodes.into_iter().collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let mut snapshot = Snapshot { nodes, ..Default::default() };
        for info in pods.into_iter().filter(|p| !p.node_name.is_empty() && !p.finished) {
            snapshot.assume(info);
        }
        snapshot
    }

    /// Adds the claims and volumes that pods' persistentVolumeClaim volumes are checked against.
    pub fn with_volumes(
        mut self,
        claims: impl IntoIterator<Item = Arc<Value>>,
        volumes: impl IntoIterator<Item = Arc<Value>>,
    ) -> Self {
        self.claims = claims
            .into_iter()
            .map(|c| (format!("{}/{}", text(&c, "/metadata/namespace"), text(&c, "/metadata/name")), c))
            .collect();
        self.volumes = volumes.into_iter().map(|v| (text(&v, "/metadata/name").to_string(), v)).collect();
        self
    }

    /// Records a pod as bound to its node (a decision not yet seen back from the store).
    pub fn assume(&mut self, pod: Arc<PodInfo>) {
        if let Ok(i) = self.nodes.binary_search_by(|n| n.name.as_str().cmp(&pod.node_name)) {
            self.anti_affinity_pods += usize::from(pod.required_anti_affinity);
            self.nodes[i].add_pod(pod);
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.binary_search_by(|n| n.name.as_str().cmp(name)).ok().map(|i| &self.nodes[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_sum_containers_and_take_the_largest_init_container() {
        let pod = json!({"metadata": {"name": "p", "namespace": "d", "uid": "u",
                          "ownerReferences": [{"uid": "rs1", "controller": true}]},
                         "spec": {"containers": [{"resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
                                                  {"resources": {"requests": {"cpu": "200m"}}}],
                                  "initContainers": [{"resources": {"requests": {"cpu": "1", "memory": "1Mi"}}}]}});
        let info = PodInfo::new(Arc::new(pod));
        assert_eq!(info.requests, Resources { milli_cpu: 1000, memory: 64 << 20, ephemeral_storage: 0, pods: 1 });
        assert_eq!(info.owner.as_deref(), Some("rs1"));
    }

    #[test]
    fn bound_unfinished_pods_occupy_their_nodes() {
        let node = json!({"metadata": {"name": "n1"}, "status": {"allocatable": {"cpu": "2", "memory": "1Gi"}}});
        let pods = [
            json!({"metadata": {"name": "a"}, "spec": {"nodeName": "n1", "containers": []}}),
            json!({"metadata": {"name": "b"}, "spec": {"nodeName": "n1", "containers": []}, "status": {"phase": "Succeeded"}}),
            json!({"metadata": {"name": "c"}, "spec": {"containers": []}}),
        ];
        let s = Snapshot::new([Arc::new(node)], pods.into_iter().map(Arc::new));
        let n1 = s.node("n1").unwrap();
        assert_eq!((n1.pods.len(), n1.allocatable.pods, n1.allocatable.milli_cpu), (1, DEFAULT_MAX_PODS, 2000));
    }
}
