//! The resource metrics API (`metrics.k8s.io/v1beta1` NodeMetrics and PodMetrics, what
//! metrics-server serves for `kubectl top` and the HorizontalPodAutoscaler), from the samples
//! agents report. Each node's latest sample is one key in the store, written with a lease
//! that lets it expire when the node stops reporting; so every server answers the same, and
//! a new leader's autoscaler has the usage at once.

use std::collections::BTreeMap;

use corral_api::metrics::NodeSample;
use corral_api::selector::{FieldSelector, LabelSelector};
use corral_api::{ApiError, Resource};
use serde_json::{Value, json};

use crate::api::{Api, Query, Reply};
use crate::route::ObjectRoute;

/// Where each node's latest sample lives.
pub const PREFIX: &str = "/registry/corral.dev/metrics/";

impl Api {
    /// Keeps `sample` as its node's latest.
    pub async fn record_metrics(&self, sample: &NodeSample) -> Result<(), ApiError> {
        let value = serde_json::to_value(sample).map_err(|e| ApiError::Internal(e.to_string()))?;
        self.store.put_metrics(&format!("{PREFIX}{}", sample.node), &value).await
    }

    /// Every node's latest sample that is still fresh, by node name.
    async fn samples(&self) -> Result<Vec<NodeSample>, ApiError> {
        let page = self.store.list(PREFIX, None, 0, 0, true).await?;
        let now = self.mint.now();
        Ok(page
            .items
            .into_iter()
            .filter_map(|s| serde_json::from_value::<NodeSample>(s.value).ok())
            .filter(|s| s.fresh(now))
            .collect())
    }

    pub(crate) async fn metrics_get(&self, route: &ObjectRoute, name: &str) -> Result<Reply, ApiError> {
        let r = route.resource;
        let samples = self.samples().await?;
        let found = if r.namespaced {
            let ns = route.namespace.as_deref().unwrap_or_default();
            samples
                .iter()
                .find_map(|s| s.pods.iter().find(|p| p.namespace == ns && p.name == name).map(|p| s.pod_metrics(p)))
        } else {
            samples.iter().find(|s| s.node == name).map(NodeSample::node_metrics)
        };
        found.map(|obj| Reply::Object(200, obj)).ok_or_else(|| ApiError::not_found(r, name))
    }

    pub(crate) async fn metrics_list(&self, route: &ObjectRoute, q: &Query) -> Result<Reply, ApiError> {
        let r = route.resource;
        let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or_default())?;
        let fields = FieldSelector::parse(q.get("fieldSelector").unwrap_or_default(), r)?;
        let samples = self.samples().await?;
        let items = if r.namespaced {
            pod_items(&samples, route.namespace.as_deref(), &labels, &fields)
        } else {
            // Nodes' labels are not in their samples: a selector is matched against the Nodes.
            let selected = if labels.is_empty() { None } else { Some(self.node_names(&labels).await?) };
            node_items(&samples, selected.as_ref(), &fields)
        };
        Ok(Reply::Object(200, list(r, items)))
    }

    async fn node_names(&self, labels: &LabelSelector) -> Result<Vec<String>, ApiError> {
        let page = self.store.list("/registry/nodes/", None, 0, 0, true).await?;
        Ok(page
            .items
            .iter()
            .filter(|n| labels.matches(&n.value))
            .map(|n| corral_api::meta::name(&n.value).to_string())
            .collect())
    }
}

fn list(r: &Resource, items: Vec<Value>) -> Value {
    json!({"kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": {}, "items": items})
}

/// PodMetrics of the pods in `namespace` (None: all) whose labels and fields match.
fn pod_items(
    samples: &[NodeSample],
    namespace: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Vec<Value> {
    let mut items: BTreeMap<(&str, &str), Value> = BTreeMap::new();
    for s in samples {
        for p in s.pods.iter().filter(|p| namespace.is_none_or(|ns| p.namespace == ns)) {
            if !labels.matches_labels(&p.labels) {
                continue;
            }
            let obj = s.pod_metrics(p);
            if fields.matches(&obj) {
                items.insert((&p.namespace, &p.name), obj);
            }
        }
    }
    items.into_values().collect()
}

fn node_items(samples: &[NodeSample], selected: Option<&Vec<String>>, fields: &FieldSelector) -> Vec<Value> {
    let mut items: Vec<Value> = samples
        .iter()
        .filter(|s| selected.is_none_or(|names| names.contains(&s.node)))
        .map(NodeSample::node_metrics)
        .filter(|obj| fields.matches(obj))
        .collect();
    items.sort_by(|a, b| a["metadata"]["name"].as_str().cmp(&b["metadata"]["name"].as_str()));
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_api::metrics::{ContainerSample, PodSample, Usage};
    use corral_api::resources;

    fn pod(ns: &str, name: &str, app: &str) -> PodSample {
        PodSample {
            namespace: ns.into(),
            name: name.into(),
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            containers: vec![ContainerSample {
                name: "c".into(),
                usage: Usage { cpu_nanocores: 1_000_000, memory_bytes: 1024 },
            }],
        }
    }

    fn node(name: &str, pods: Vec<PodSample>) -> NodeSample {
        NodeSample { node: name.into(), timestamp: 1, window_s: 15, usage: Usage::default(), pods }
    }

    #[test]
    fn pod_metrics_are_listed_by_namespace_labels_and_fields_across_nodes() {
        let samples = vec![
            node("a2", vec![pod("shop", "web-2", "web"), pod("kube-system", "dns", "dns")]),
            node("a1", vec![pod("shop", "web-1", "web"), pod("shop", "db-1", "db")]),
        ];
        let pods = resources::find(resources::METRICS_GROUP, "pods").unwrap();
        let names = |items: Vec<Value>| -> Vec<String> {
            items.iter().map(|i| i["metadata"]["name"].as_str().unwrap().to_string()).collect()
        };
        let everything = FieldSelector::parse("", pods).unwrap();
        let web = LabelSelector::parse("app=web").unwrap();
        let any = LabelSelector::parse("").unwrap();
        assert_eq!(names(pod_items(&samples, Some("shop"), &web, &everything)), ["web-1", "web-2"]);
        assert_eq!(names(pod_items(&samples, None, &any, &everything)).len(), 4);
        let one = FieldSelector::parse("metadata.name=db-1", pods).unwrap();
        assert_eq!(names(pod_items(&samples, Some("shop"), &any, &one)), ["db-1"]);

        let nodes = resources::find(resources::METRICS_GROUP, "nodes").unwrap();
        let all = FieldSelector::parse("", nodes).unwrap();
        assert_eq!(names(node_items(&samples, None, &all)), ["a1", "a2"]);
        assert_eq!(names(node_items(&samples, Some(&vec!["a2".to_string()]), &all)), ["a2"]);
        assert_eq!(list(nodes, vec![])["kind"], "NodeMetricsList");
    }
}
