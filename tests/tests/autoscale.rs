//! Resource metrics and the HorizontalPodAutoscaler on a 3-server cluster with a real agent
//! and containerd: a busy pod's CPU (from CRI stats) reaches `kubectl top`; `kubectl
//! autoscale` scales its Deployment up to the maximum, with the status and Events kubectl
//! shows; once the pods go idle it scales back down to the minimum.

use std::time::Duration;

use anyhow::Result;
use corral_e2e::{Cluster, init_tracing};
use tracing::info;

const BASE_PORT: u16 = 25700;

/// A busy loop limited to a fifth of a core, requesting a tenth: 200% of its request.
const BURNER: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: burner
spec:
  replicas: 1
  selector:
    matchLabels: {app: burner}
  template:
    metadata:
      labels: {app: burner}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: burn
        image: busybox
        command: ["sh", "-c"]
        args: ["while :; do :; done"]
        resources:
          requests: {cpu: 100m, memory: 16Mi}
          limits: {cpu: 200m, memory: 32Mi}
"#;

#[test]
fn busy_pods_are_measured_and_autoscaled_up_then_down() -> Result<()> {
    init_tracing();
    let c = Cluster::up(3, BASE_PORT, &["--agents", "1", "--cluster-cidr", "10.249.0.0/16"])?;
    let minutes = |n: u64| Duration::from_secs(60 * n);

    info!("a busy pod: its usage reaches the metrics API and kubectl top");
    c.kube_stdin(&["apply", "-f", "-"], BURNER)?;
    c.kube_until(&["get", "deployment", "burner", "-o", "jsonpath={.status.readyReplicas}"], minutes(1), |o| o == "1")?;
    let top =
        c.kube_until(&["top", "pod", "-l", "app=burner", "--no-headers"], minutes(1), |o| o.contains("burner-"))?;
    let millicores: u64 = top.split_whitespace().nth(1).and_then(|c| c.strip_suffix('m')?.parse().ok()).unwrap_or(0);
    assert!(millicores >= 100, "a busy loop limited to 200m uses at least half of it: {top}");
    let nodes = c.kube(&["top", "node", "--no-headers"])?;
    assert!(nodes.starts_with("a1 "), "{nodes}");
    let raw = c.kube(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes/a1"])?;
    assert!(raw.contains("\"kind\":\"NodeMetrics\""), "{raw}");
    let refused = c.kube_fails(&["delete", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes/a1"])?;
    assert!(refused.contains("MethodNotAllowed") || refused.contains("not allowed"), "{refused}");
    let missing = c.kube_fails(&["top", "pod", "nosuch"])?;
    assert!(missing.contains("not found") || missing.contains("not available"), "{missing}");

    info!("kubectl autoscale: 200% of the request against a 50% target scales to the maximum");
    c.kube(&["autoscale", "deployment", "burner", "--cpu-percent=50", "--min=1", "--max=3"])?;
    c.kube_until(&["get", "deployment", "burner", "-o", "jsonpath={.spec.replicas}"], minutes(2), |o| o == "3")?;
    c.kube_until(&["get", "hpa", "burner", "-o", "jsonpath={.status.currentReplicas}"], minutes(1), |o| o == "3")?;
    let table = c.kube(&["get", "hpa", "burner"])?;
    assert!(table.contains("Deployment/burner") && table.contains("%/50%"), "{table}");
    let described = c.kube(&["describe", "hpa", "burner"])?;
    for wanted in ["SuccessfulRescale", "New size: 3", "above target", "ScalingActive", "TooManyReplicas"] {
        assert!(described.contains(wanted), "{wanted} in:\n{described}");
    }

    info!("idle pods: with no stabilization window the target goes back to the minimum");
    c.kube(&[
        "patch",
        "hpa",
        "burner",
        "--type=merge",
        "-p",
        r#"{"spec":{"behavior":{"scaleDown":{"stabilizationWindowSeconds":0}}}}"#,
    ])?;
    c.kube(&[
        "patch",
        "deployment",
        "burner",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/template/spec/containers/0/args","value":["sleep 3600"]}]"#,
    ])?;
    c.kube_until(&["get", "deployment", "burner", "-o", "jsonpath={.spec.replicas}"], minutes(3), |o| o == "1")?;
    let described = c.kube(&["describe", "hpa", "burner"])?;
    assert!(described.contains("All metrics below target"), "{described}");
    Ok(())
}
