//! The resources Corral serves: what discovery lists, and what the server needs to route,
//! store and print each of them.

/// A subresource as discovery lists it (`pods/status`, `deployments/scale`).
#[derive(Debug)]
pub struct Subresource {
    pub name: &'static str,
    /// Kind of the subresource's body, with its group and version when they differ from the
    /// parent's (`pods/eviction` is policy/v1 Eviction).
    pub kind: &'static str,
    pub group: Option<&'static str>,
    pub version: Option<&'static str>,
    pub verbs: &'static [&'static str],
}

/// One resource type.
#[derive(Debug)]
pub struct Resource {
    /// "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub subresources: &'static [Subresource],
    /// Whether a write to the main resource keeps the stored status (the status has its own
    /// subresource and writers).
    pub has_status: bool,
}

pub const VERBS: &[&str] = &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];
/// The verbs of a resource computed on read rather than stored (metrics).
pub const READ_VERBS: &[&str] = &["get", "list"];
/// The resource metrics API (`kubectl top`, the HorizontalPodAutoscaler): served from what
/// agents report, never written by clients.
pub const METRICS_GROUP: &str = "metrics.k8s.io";
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

const fn status(kind: &'static str) -> Subresource {
    Subresource { name: "status", kind, group: None, version: None, verbs: STATUS_VERBS }
}

const fn scale() -> Subresource {
    Subresource { name: "scale", kind: "Scale", group: Some("autoscaling"), version: Some("v1"), verbs: STATUS_VERBS }
}

const ALL: &[&str] = &["all"];
const NONE: &[&str] = &[];

macro_rules! resource {
    ($group:expr, $version:expr, $plural:expr, $singular:expr, $kind:expr, $namespaced:expr,
     short: $short:expr, categories: $cat:expr, status: $has_status:expr, sub: $sub:expr) => {
        Resource {
            group: $group,
            version: $version,
            plural: $plural,
            singular: $singular,
            kind: $kind,
            namespaced: $namespaced,
            short_names: $short,
            categories: $cat,
            subresources: $sub,
            has_status: $has_status,
        }
    };
}

pub static RESOURCES: &[Resource] = &[
    resource!("", "v1", "namespaces", "namespace", "Namespace", false, short: &["ns"], categories: NONE,
    status: true, sub: &[
        Subresource { name: "finalize", kind: "Namespace", group: None, version: None, verbs: &["update"] },
        status("Namespace"),
    ]),
    resource!("", "v1", "pods", "pod", "Pod", true, short: &["po"], categories: ALL, status: true, sub: &[
        Subresource { name: "attach", kind: "PodAttachOptions", group: None, version: None, verbs: &["create", "get"] },
        Subresource { name: "binding", kind: "Binding", group: None, version: None, verbs: &["create"] },
        Subresource { name: "eviction", kind: "Eviction", group: Some("policy"), version: Some("v1"), verbs: &["create"] },
        Subresource { name: "exec", kind: "PodExecOptions", group: None, version: None, verbs: &["create", "get"] },
        Subresource { name: "log", kind: "Pod", group: None, version: None, verbs: &["get"] },
        Subresource {
            name: "portforward",
            kind: "PodPortForwardOptions",
            group: None,
            version: None,
            verbs: &["create", "get"],
        },
        status("Pod"),
    ]),
    resource!("", "v1", "nodes", "node", "Node", false, short: &["no"], categories: NONE, status: true,
        sub: &[status("Node")]),
    resource!("", "v1", "services", "service", "Service", true, short: &["svc"], categories: ALL, status: true,
        sub: &[status("Service")]),
    resource!("", "v1", "endpoints", "endpoints", "Endpoints", true, short: &["ep"], categories: NONE,
        status: false, sub: &[]),
    resource!("", "v1", "configmaps", "configmap", "ConfigMap", true, short: &["cm"], categories: NONE,
        status: false, sub: &[]),
    resource!("", "v1", "secrets", "secret", "Secret", true, short: NONE, categories: NONE, status: false, sub: &[]),
    resource!("", "v1", "events", "event", "Event", true, short: &["ev"], categories: NONE, status: false, sub: &[]),
    resource!("", "v1", "persistentvolumes", "persistentvolume", "PersistentVolume", false, short: &["pv"],
        categories: NONE, status: true, sub: &[status("PersistentVolume")]),
    resource!("", "v1", "persistentvolumeclaims", "persistentvolumeclaim", "PersistentVolumeClaim", true,
        short: &["pvc"], categories: NONE, status: true, sub: &[status("PersistentVolumeClaim")]),
    resource!("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", true, short: &["sa"],
        categories: NONE, status: false, sub: &[]),
    resource!("apps", "v1", "deployments", "deployment", "Deployment", true, short: &["deploy"], categories: ALL,
        status: true, sub: &[scale(), status("Deployment")]),
    resource!("apps", "v1", "replicasets", "replicaset", "ReplicaSet", true, short: &["rs"], categories: ALL,
        status: true, sub: &[scale(), status("ReplicaSet")]),
    resource!("coordination.k8s.io", "v1", "leases", "lease", "Lease", true, short: NONE, categories: NONE,
        status: false, sub: &[]),
    resource!("discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice", true, short: NONE,
        categories: NONE, status: false, sub: &[]),
    resource!("autoscaling", "v2", "horizontalpodautoscalers", "horizontalpodautoscaler", "HorizontalPodAutoscaler",
        true, short: &["hpa"], categories: ALL, status: true, sub: &[status("HorizontalPodAutoscaler")]),
    resource!("policy", "v1", "poddisruptionbudgets", "poddisruptionbudget", "PodDisruptionBudget", true,
        short: &["pdb"], categories: NONE, status: true, sub: &[status("PodDisruptionBudget")]),
    resource!(METRICS_GROUP, "v1beta1", "nodes", "", "NodeMetrics", false, short: NONE, categories: NONE,
        status: false, sub: &[]),
    resource!(METRICS_GROUP, "v1beta1", "pods", "", "PodMetrics", true, short: NONE, categories: NONE,
        status: false, sub: &[]),
];

/// The resource named by group and plural.
pub fn find(group: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.plural == plural)
}

/// The resource named by group, version and plural, as a URL names it.
pub fn find_versioned(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource of a kind in a group.
pub fn by_kind(group: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.kind == kind)
}

/// The groups served, each with its one version, core first.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

/// Resources are static and unique by group and plural.
impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        self.group == other.group && self.plural == other.plural
    }
}

impl Resource {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }

    /// Where objects live in the store: `/registry/<plural>/<namespace>/<name>`, as in
    /// Kubernetes (plurals are unique across the groups served).
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{}", self.prefix(namespace), name)
    }

    /// The store prefix of every object of this resource, or of one namespace's.
    pub fn prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("/registry/{}/{ns}/", self.plural),
            _ => format!("/registry/{}/", self.plural),
        }
    }

    /// Whether objects of this resource live in the store (metrics are computed on read).
    pub fn stored(&self) -> bool {
        self.group != METRICS_GROUP
    }

    /// What clients may do with it, as discovery lists it.
    pub fn verbs(&self) -> &'static [&'static str] {
        if self.stored() { VERBS } else { READ_VERBS }
    }

    pub fn subresource(&self, name: &str) -> Option<&'static Subresource>
    where
        Self: 'static,
    {
        self.subresources.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resource_is_unique_and_keys_nest_by_namespace() {
        let stored: Vec<&Resource> = RESOURCES.iter().filter(|r| r.stored()).collect();
        for (i, a) in stored.iter().enumerate() {
            for b in &stored[i + 1..] {
                assert!(a.plural != b.plural, "{} twice: store keys would collide", a.plural);
            }
        }
        let pods = find("", "pods").unwrap();
        assert_eq!(pods.key(Some("default"), "web"), "/registry/pods/default/web");
        let nodes = find("", "nodes").unwrap();
        assert_eq!(nodes.key(None, "n1"), "/registry/nodes/n1");
        assert_eq!(find("apps", "deployments").unwrap().api_version(), "apps/v1");
        assert_eq!(groups()[0], ("", "v1"));
    }
}
