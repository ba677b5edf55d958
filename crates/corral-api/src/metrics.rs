//! Resource usage as agents report it and as the metrics API (`metrics.k8s.io/v1beta1`)
//! serves it: one [`NodeSample`] per node every resolution period, holding the node's usage
//! and its pods' per container. `kubectl top` and the HorizontalPodAutoscaler read the same
//! samples, as NodeMetrics and PodMetrics.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::resources::METRICS_GROUP;

/// How often agents sample, and the window each sample's rates cover (metrics-server's
/// default resolution).
pub const RESOLUTION_S: i64 = 15;
/// A sample older than this is not served: its node stopped reporting.
pub const STALE_AFTER_S: i64 = 3 * 60;

/// CPU in nanocores and memory (working set) in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub cpu_nanocores: u64,
    pub memory_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSample {
    pub name: String,
    pub usage: Usage,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSample {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub containers: Vec<ContainerSample>,
}

/// One node's sample.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSample {
    pub node: String,
    /// Unix seconds at the end of the window.
    pub timestamp: i64,
    pub window_s: i64,
    pub usage: Usage,
    pub pods: Vec<PodSample>,
}

/// `123456n`, as metrics-server writes CPU.
pub fn cpu_quantity(nanocores: u64) -> String {
    format!("{nanocores}n")
}

/// `1234Ki` (or bytes when not a whole number of KiB), as metrics-server writes memory.
pub fn memory_quantity(bytes: u64) -> String {
    if bytes.is_multiple_of(1024) { format!("{}Ki", bytes / 1024) } else { bytes.to_string() }
}

fn usage_json(u: Usage) -> Value {
    json!({"cpu": cpu_quantity(u.cpu_nanocores), "memory": memory_quantity(u.memory_bytes)})
}

fn api_version() -> String {
    format!("{METRICS_GROUP}/v1beta1")
}

impl NodeSample {
    /// Whether it is recent enough to serve at `now` (unix seconds).
    pub fn fresh(&self, now: i64) -> bool {
        now - self.timestamp <= STALE_AFTER_S
    }

    pub fn node_metrics(&self) -> Value {
        let at = crate::meta::rfc3339(self.timestamp);
        json!({
            "kind": "NodeMetrics",
            "apiVersion": api_version(),
            "metadata": {"name": self.node, "creationTimestamp": at},
            "timestamp": at,
            "window": format!("{}s", self.window_s),
            "usage": usage_json(self.usage),
        })
    }

    pub fn pod_metrics(&self, pod: &PodSample) -> Value {
        let at = crate::meta::rfc3339(self.timestamp);
        let containers: Vec<Value> =
            pod.containers.iter().map(|c| json!({"name": c.name, "usage": usage_json(c.usage)})).collect();
        let mut metadata = json!({"name": pod.name, "namespace": pod.namespace, "creationTimestamp": at});
        if !pod.labels.is_empty() {
            metadata["labels"] = json!(pod.labels);
        }
        json!({
            "kind": "PodMetrics",
            "apiVersion": api_version(),
            "metadata": metadata,
            "timestamp": at,
            "window": format!("{}s", self.window_s),
            "containers": containers,
        })
    }
}

/// A pod's CPU use in millicores, summed over its containers, from its PodMetrics.
pub fn pod_cpu_millis(pod_metrics: &Value) -> Option<i64> {
    resource_total(pod_metrics, "cpu").map(|q| q.millis())
}

/// A pod's memory use in bytes, summed over its containers, from its PodMetrics.
pub fn pod_memory_bytes(pod_metrics: &Value) -> Option<i64> {
    resource_total(pod_metrics, "memory").map(|q| q.value())
}

fn resource_total(pod_metrics: &Value, resource: &str) -> Option<crate::quantity::Quantity> {
    let containers = pod_metrics.get("containers")?.as_array()?;
    let mut total = crate::quantity::Quantity::default();
    for c in containers {
        total = total + crate::quantity::Quantity::from_json(c.pointer(&format!("/usage/{resource}"))?)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeSample {
        NodeSample {
            node: "a1".into(),
            timestamp: 1_700_000_000,
            window_s: 15,
            usage: Usage { cpu_nanocores: 250_000_000, memory_bytes: 512 * 1024 * 1024 },
            pods: vec![PodSample {
                namespace: "shop".into(),
                name: "web-1".into(),
                labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
                containers: vec![
                    ContainerSample {
                        name: "nginx".into(),
                        usage: Usage { cpu_nanocores: 120_500_000, memory_bytes: 4096 },
                    },
                    ContainerSample {
                        name: "side".into(),
                        usage: Usage { cpu_nanocores: 30_000_000, memory_bytes: 1000 },
                    },
                ],
            }],
        }
    }

    #[test]
    fn samples_read_as_metrics_server_objects_and_add_up_per_pod() {
        let s = sample();
        let node = s.node_metrics();
        assert_eq!(node["usage"], json!({"cpu": "250000000n", "memory": "524288Ki"}));
        assert_eq!((node["kind"].as_str(), node["window"].as_str()), (Some("NodeMetrics"), Some("15s")));

        let pod = s.pod_metrics(&s.pods[0]);
        assert_eq!(pod["apiVersion"], "metrics.k8s.io/v1beta1");
        assert_eq!(pod["metadata"]["labels"]["app"], "web");
        assert_eq!(pod["containers"][1]["usage"]["memory"], "1000");
        assert_eq!(pod_cpu_millis(&pod), Some(151), "150.5m, rounded up");
        assert_eq!(pod_memory_bytes(&pod), Some(5096));
        assert_eq!(pod_cpu_millis(&json!({"containers": [{"name": "x"}]})), None, "no usage is no metric");

        assert!(s.fresh(s.timestamp + STALE_AFTER_S));
        assert!(!s.fresh(s.timestamp + STALE_AFTER_S + 1));
        let round: NodeSample = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(round, s);
    }
}
