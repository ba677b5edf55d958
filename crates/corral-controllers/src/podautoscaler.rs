//! The HorizontalPodAutoscaler controller (autoscaling/v2, resource metrics): every 15 s,
//! and at once when an HPA changes, each HPA's target is scaled to what its pods' CPU or
//! memory usage (the metrics API, from the agents' CRI stats) asks for, as Kubernetes'
//! controller does: the replica calculator and behavior of `hpa`, then the status
//! (currentMetrics, conditions AbleToScale, ScalingActive and ScalingLimited) and Events
//! (SuccessfulRescale, FailedGetResourceMetric, ...).
//!
//! `plan` decides from in-memory state and is tested without a cluster; `run` reads and
//! writes. What each HPA recommended and scaled lately is kept in memory, as Kubernetes
//! keeps it: a new leader starts with none (so a scale down waits one stabilization window).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_api::events::{Involved, Recorder};
use corral_api::meta::JsonAt;
use corral_api::metrics::{pod_cpu_millis, pod_memory_bytes};
use corral_api::quantity::Quantity;
use corral_api::selector::LabelSelector;
use serde_json::{Value, json};

use crate::cluster::{Cluster, ClusterError, now_seconds, pod_ready, text};
use crate::hpa::{self, Behavior, PodSample, Policy, Recommendations, Rules, Select};
use crate::informer::Informers;
use crate::scheduling::flush_events;

/// Kubernetes' `--horizontal-pod-autoscaler-sync-period`.
const SYNC_EVERY: Duration = Duration::from_secs(15);
const DEBOUNCE: Duration = Duration::from_millis(200);
/// When no metrics are given: 80% CPU (autoscaling/v1's default).
const DEFAULT_CPU_UTILIZATION: i64 = 80;

/// A resource metric of the spec.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSpec {
    pub resource: String,
    pub target: TargetValue,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TargetValue {
    /// Percent of the pods' requests.
    Utilization(i64),
    /// Per pod: millicores for cpu, bytes for memory.
    AverageValue(i64),
}

/// The target's current scale.
#[derive(Clone, Debug)]
pub struct Scale {
    pub replicas: i32,
    pub selector: LabelSelector,
}

/// What each HPA recommended and changed in recent passes.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    recommendations: Recommendations,
    /// (seconds, change in replicas), oldest first.
    scaled: Vec<(u64, i32)>,
}

/// What one pass decided for one HPA.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The replicas to set on the target, when they change.
    pub scale_to: Option<i32>,
    /// The HPA's new status, as if the scale succeeds.
    pub status: Value,
    /// (warning, reason, message)
    pub events: Vec<(bool, String, String)>,
}

fn quantity_in(resource: &str, q: Quantity) -> i64 {
    if resource == "cpu" { q.millis() } else { q.value() }
}

fn format_in(resource: &str, v: i64) -> String {
    if resource == "cpu" { format!("{v}m") } else { v.to_string() }
}

/// The spec's resource metrics (80% CPU when none are given).
pub fn metric_specs(hpa: &Value) -> Result<Vec<MetricSpec>, String> {
    let Some(metrics) = hpa.at("/spec/metrics").and_then(Value::as_array).filter(|m| !m.is_empty()) else {
        return Ok(vec![MetricSpec {
            resource: "cpu".into(),
            target: TargetValue::Utilization(DEFAULT_CPU_UTILIZATION),
        }]);
    };
    let mut specs = Vec::new();
    for m in metrics {
        let kind = text(m, "/type");
        if kind != "Resource" {
            return Err(format!("metrics of type {kind} are not supported (only Resource: cpu and memory)"));
        }
        let resource = text(m, "/resource/name").to_string();
        if resource != "cpu" && resource != "memory" {
            return Err(format!("resource metric {resource:?} is not supported (cpu and memory are)"));
        }
        let target = match text(m, "/resource/target/type") {
            "Utilization" => TargetValue::Utilization(
                m.at("/resource/target/averageUtilization")
                    .and_then(Value::as_i64)
                    .filter(|u| *u > 0)
                    .ok_or(format!("the {resource} target of type Utilization needs a positive averageUtilization"))?,
            ),
            "AverageValue" => {
                let q = m.at("/resource/target/averageValue").and_then(Quantity::from_json);
                TargetValue::AverageValue(
                    q.map(|q| quantity_in(&resource, q))
                        .filter(|v| *v > 0)
                        .ok_or(format!("the {resource} target of type AverageValue needs a positive averageValue"))?,
                )
            }
            other => return Err(format!("the {resource} target type {other:?} is not supported for resource metrics")),
        };
        specs.push(MetricSpec { resource, target });
    }
    Ok(specs)
}

fn rules(spec: Option<&Value>, default: Rules) -> Rules {
    let Some(spec) = spec else { return default };
    let policies = match spec.get("policies").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .filter_map(|p| {
                let value = p.get("value")?.as_i64()? as i32;
                let period_s = p.get("periodSeconds")?.as_u64()?;
                match p.get("type")?.as_str()? {
                    "Pods" => Some(Policy::Pods { value, period_s }),
                    "Percent" => Some(Policy::Percent { value, period_s }),
                    _ => None,
                }
            })
            .collect(),
        None => default.policies,
    };
    Rules {
        stabilization_s: spec
            .get("stabilizationWindowSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(default.stabilization_s),
        select: match spec.get("selectPolicy").and_then(Value::as_str) {
            Some("Min") => Select::Min,
            Some("Disabled") => Select::Disabled,
            Some("Max") => Select::Max,
            _ => default.select,
        },
        policies,
    }
}

/// spec.behavior over Kubernetes' defaults.
pub fn behavior_of(hpa: &Value) -> Behavior {
    let default = Behavior::default();
    Behavior {
        up: rules(hpa.at("/spec/behavior/scaleUp"), default.up),
        down: rules(hpa.at("/spec/behavior/scaleDown"), default.down),
    }
}

/// The target's scale: spec.replicas and the pods' selector.
pub fn scale_of(target: &Value) -> Result<Scale, String> {
    let selector = target.at("/spec/selector").ok_or("the target has no selector")?;
    Ok(Scale {
        replicas: target.at("/spec/replicas").and_then(Value::as_i64).unwrap_or(1) as i32,
        selector: LabelSelector::from_json(selector)?,
    })
}

/// What a pod's containers request of `resource`, or None when one of them requests none.
fn requested(pod: &Value, resource: &str) -> Option<i64> {
    let containers = pod.at("/spec/containers").and_then(Value::as_array)?;
    containers.iter().try_fold(0, |sum, c| {
        let q = c.at(&format!("/resources/requests/{resource}")).and_then(Quantity::from_json)?;
        Some(sum + quantity_in(resource, q))
    })
}

/// One metric's recommendation and its `currentMetrics` entry.
fn measure(
    spec: &MetricSpec,
    current: i32,
    pods: &[&Value],
    metrics: &HashMap<&str, &Value>,
) -> Result<(i32, Value), String> {
    let resource = spec.resource.as_str();
    let mut samples = Vec::with_capacity(pods.len());
    let (mut used, mut measured) = (0i64, 0i64);
    for pod in pods {
        let usage = metrics
            .get(text(pod, "/metadata/name"))
            .and_then(|m| if resource == "cpu" { pod_cpu_millis(m) } else { pod_memory_bytes(m) });
        let pending = text(pod, "/status/phase") == "Pending";
        // As Kubernetes: readiness matters for CPU only; a pending pod counts as unready
        // (using nothing when scaling up, left out when scaling down).
        let ready = !pending && (resource != "cpu" || pod_ready(pod));
        let request = match spec.target {
            TargetValue::Utilization(_) => requested(pod, resource).ok_or_else(|| {
                format!(
                    "failed to get {resource} utilization: missing request for {resource} in containers of pod {}",
                    text(pod, "/metadata/name")
                )
            })?,
            TargetValue::AverageValue(v) => v,
        };
        if let (Some(u), true) = (usage, ready) {
            used += u;
            measured += 1;
        }
        samples.push(PodSample { ready, usage_milli: if pending { Some(0) } else { usage }, request_milli: request });
    }
    let target = match spec.target {
        TargetValue::Utilization(u) => u,
        TargetValue::AverageValue(_) => 100,
    };
    let rec = hpa::utilization_replicas(current, target, &samples)
        .map_err(|e| format!("failed to get {resource} utilization: {e}"))?;
    let average = if measured > 0 { used / measured } else { 0 };
    let mut now = json!({"averageValue": format_in(resource, average)});
    if let TargetValue::Utilization(_) = spec.target {
        now["averageUtilization"] = json!(rec.utilization);
    }
    Ok((rec.replicas, json!({"type": "Resource", "resource": {"name": resource, "current": now}})))
}

/// Kubernetes' name of a metric in messages.
fn metric_name(spec: &MetricSpec) -> String {
    match spec.target {
        TargetValue::Utilization(_) => format!("{} resource utilization (percentage of request)", spec.resource),
        TargetValue::AverageValue(_) => format!("{} resource", spec.resource),
    }
}

/// The conditions a pass sets, each keeping its transition time when its status stays.
struct Conditions {
    old: Vec<Value>,
    now: String,
    set: Vec<Value>,
}

/// What most passes that end early have done.
const GOT_SCALE: &str = "the HPA controller was able to get the target's current scale";

impl Conditions {
    fn new(hpa: &Value, now: i64) -> Self {
        let old = hpa.at("/status/conditions").and_then(Value::as_array).cloned().unwrap_or_default();
        Conditions { old, now: corral_api::meta::rfc3339(now), set: Vec::new() }
    }

    fn set(&mut self, kind: &str, status: bool, reason: &str, message: &str) {
        let status = if status { "True" } else { "False" };
        let since = self
            .old
            .iter()
            .find(|c| c["type"] == kind && c["status"] == status)
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| json!(self.now));
        self.set.retain(|c| c["type"] != kind);
        self.set.push(json!({"type": kind, "status": status, "lastTransitionTime": since,
                             "reason": reason, "message": message}));
    }

    /// The plan, with the conditions in Kubernetes' order in its status.
    fn finish(mut self, mut status: Value, scale_to: Option<i32>, events: Vec<(bool, String, String)>) -> Plan {
        let rank = |c: &Value| ["AbleToScale", "ScalingActive", "ScalingLimited"].iter().position(|k| c["type"] == *k);
        self.set.sort_by_key(rank);
        status["conditions"] = json!(self.set);
        Plan { scale_to, status, events }
    }
}

/// One pass for one HPA: `scale` is the target's (or why it could not be read), `pods` the
/// namespace's pods and `metrics` their PodMetrics by name.
pub fn plan(
    hpa: &Value,
    scale: Result<Scale, String>,
    pods: &[&Value],
    metrics: &HashMap<&str, &Value>,
    memory: &mut Memory,
    now: i64,
) -> Plan {
    let stamp = corral_api::meta::rfc3339(now);
    let mut conds = Conditions::new(hpa, now);
    let mut events = Vec::new();
    let mut status = json!({
        "currentReplicas": hpa.at("/status/currentReplicas").cloned().unwrap_or(json!(0)),
        "desiredReplicas": hpa.at("/status/desiredReplicas").cloned().unwrap_or(json!(0)),
    });
    if let Some(last) = hpa.at("/status/lastScaleTime") {
        status["lastScaleTime"] = last.clone();
    }
    if let Some(generation) = hpa.at("/metadata/generation") {
        status["observedGeneration"] = generation.clone();
    }
    let scale = match scale {
        Ok(s) => s,
        Err(e) => {
            let message = format!("the HPA controller was unable to get the target's current scale: {e}");
            conds.set("AbleToScale", false, "FailedGetScale", &message);
            events.push((true, "FailedGetScale".into(), e));
            return conds.finish(status, None, events);
        }
    };
    let current = scale.replicas;
    status["currentReplicas"] = json!(current);
    let min = hpa.at("/spec/minReplicas").and_then(Value::as_i64).unwrap_or(1) as i32;
    let max = hpa.at("/spec/maxReplicas").and_then(Value::as_i64).unwrap_or(1) as i32;
    if current == 0 && min != 0 {
        status["desiredReplicas"] = json!(0);
        conds.set("AbleToScale", true, "SucceededGetScale", GOT_SCALE);
        conds.set(
            "ScalingActive",
            false,
            "ScalingDisabled",
            "scaling is disabled since the replica count of the target is zero",
        );
        return conds.finish(status, None, events);
    }
    let specs = match metric_specs(hpa) {
        Ok(s) => s,
        Err(e) => {
            conds.set("AbleToScale", true, "SucceededGetScale", GOT_SCALE);
            conds.set("ScalingActive", false, "InvalidMetricSourceType", &e);
            events.push((true, "InvalidMetricSourceType".into(), e));
            return conds.finish(status, None, events);
        }
    };
    let selected: Vec<&Value> = pods
        .iter()
        .copied()
        .filter(|p| scale.selector.matches(p))
        .filter(|p| p.at("/metadata/deletionTimestamp").is_none() && text(p, "/status/phase") != "Failed")
        .collect();

    // Every metric recommends; the highest wins (as Kubernetes), naming the metric that did.
    let mut best: Option<(i32, String)> = None;
    let mut current_metrics = Vec::new();
    let mut failure = None;
    for spec in &specs {
        match measure(spec, current, &selected, metrics) {
            Ok((replicas, entry)) => {
                current_metrics.push(entry);
                if best.as_ref().is_none_or(|(r, _)| replicas > *r) {
                    best = Some((replicas, metric_name(spec)));
                }
            }
            Err(e) => failure = Some(e),
        }
    }
    if !current_metrics.is_empty() {
        status["currentMetrics"] = json!(current_metrics);
    }
    let Some((recommended, metric)) = best else {
        let e = failure.unwrap_or_default();
        conds.set("AbleToScale", true, "SucceededGetScale", GOT_SCALE);
        let message = format!("the HPA was unable to compute the replica count: {e}");
        conds.set("ScalingActive", false, "FailedGetResourceMetric", &message);
        events.push((true, "FailedGetResourceMetric".into(), e.clone()));
        events.push((
            true,
            "FailedComputeMetricsReplicas".into(),
            format!("invalid metrics ({} invalid out of {}), first error is: {e}", specs.len(), specs.len()),
        ));
        return conds.finish(status, None, events);
    };
    conds.set(
        "ScalingActive",
        true,
        "ValidMetricFound",
        &format!("the HPA was able to successfully calculate a replica count from {metric}"),
    );

    let behavior = behavior_of(hpa);
    let secs = now.max(0) as u64;
    let stabilized = memory.recommendations.stabilized(secs, current, recommended, &behavior);
    let longest = behavior.up.policies.iter().chain(&behavior.down.policies).map(|p| match *p {
        Policy::Pods { period_s, .. } | Policy::Percent { period_s, .. } => period_s,
    });
    let longest = longest.max().unwrap_or(0);
    memory.scaled.retain(|(t, _)| secs.saturating_sub(*t) <= longest);
    let rated = hpa::limit_rate(secs, current, stabilized, &memory.scaled, &behavior, 1, i32::MAX);
    let desired = rated.clamp(min.max(1), max.max(min.max(1)));
    let (limited, limit_reason, limit_message) = if desired > rated {
        (true, "TooFewReplicas", "the desired replica count is less than the minimum replica count")
    } else if desired < rated {
        (true, "TooManyReplicas", "the desired replica count is more than the maximum replica count")
    } else if stabilized > current && rated < stabilized {
        (true, "ScaleUpLimit", "the desired replica count is increasing faster than the maximum scale rate")
    } else if stabilized < current && rated > stabilized {
        (true, "ScaleDownLimit", "the desired replica count is decreasing faster than the maximum scale rate")
    } else {
        (false, "DesiredWithinRange", "the desired count is within the acceptable range")
    };
    status["desiredReplicas"] = json!(desired);
    if desired == current {
        let (reason, message) = if stabilized > recommended && recommended < current {
            (
                "ScaleDownStabilized",
                "recent recommendations were higher than current one, applying the highest recent recommendation",
            )
        } else {
            ("ReadyForNewScale", "recommended size matches current size")
        };
        conds.set("AbleToScale", true, reason, message);
        conds.set("ScalingLimited", limited, limit_reason, limit_message);
        return conds.finish(status, None, events);
    }
    let why = if desired > current { format!("{metric} above target") } else { "All metrics below target".to_string() };
    memory.scaled.push((secs, desired - current));
    status["lastScaleTime"] = json!(stamp);
    conds.set(
        "AbleToScale",
        true,
        "SucceededRescale",
        &format!("the HPA controller was able to update the target scale to {desired}"),
    );
    conds.set("ScalingLimited", limited, limit_reason, limit_message);
    events.push((false, "SuccessfulRescale".into(), format!("New size: {desired}; reason: {why}")));
    conds.finish(status, Some(desired), events)
}

/// The resource a scaleTargetRef names, among those Corral scales.
fn target_plural(hpa: &Value) -> Result<&'static str, String> {
    match (text(hpa, "/spec/scaleTargetRef/apiVersion"), text(hpa, "/spec/scaleTargetRef/kind")) {
        ("apps/v1", "Deployment") => Ok("apps/deployments"),
        ("apps/v1", "ReplicaSet") => Ok("apps/replicasets"),
        (v, k) => Err(format!("no matches for kind {k:?} in group version {v:?}")),
    }
}

/// Runs the controller until aborted.
pub async fn run<C: Cluster>(cluster: Arc<C>, informers: Arc<Informers>, host: String) {
    let autoscalers = informers.get("autoscaling/horizontalpodautoscalers").await;
    let pods = informers.get("pods").await;
    let events = Arc::new(Mutex::new(Recorder::new("horizontal-pod-autoscaler", &host)));
    let mut memory: HashMap<String, Memory> = HashMap::new();
    loop {
        let pass = std::time::Instant::now();
        let changed = autoscalers.changed();
        let all = autoscalers.list();
        let live: HashSet<&str> = all.iter().map(|h| text(h, "/metadata/uid")).collect();
        memory.retain(|uid, _| live.contains(uid.as_str()));
        if !all.is_empty() {
            // Pods and their usage, read once a pass and grouped by namespace.
            let all_pods = pods.list();
            let mut pods_by_ns: HashMap<&str, Vec<&Value>> = HashMap::new();
            for p in &all_pods {
                pods_by_ns.entry(text(p, "/metadata/namespace")).or_default().push(p);
            }
            let usage = cluster.list("metrics.k8s.io/pods", "", "").await.unwrap_or_else(|e| {
                tracing::debug!(error = %e, "no pod metrics");
                Vec::new()
            });
            let mut usage_by_ns: HashMap<&str, HashMap<&str, &Value>> = HashMap::new();
            for m in &usage {
                usage_by_ns.entry(text(m, "/metadata/namespace")).or_default().insert(text(m, "/metadata/name"), m);
            }
            let none = HashMap::new();
            for h in &all {
                let ns = text(h, "/metadata/namespace");
                let mem = memory.entry(text(h, "/metadata/uid").to_string()).or_default();
                let in_ns = pods_by_ns.get(ns).map(Vec::as_slice).unwrap_or_default();
                reconcile(cluster.as_ref(), h, in_ns, usage_by_ns.get(ns).unwrap_or(&none), mem, &events).await;
            }
            flush_events(cluster.as_ref(), &events).await;
        }
        let worked = pass.elapsed();
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(SYNC_EVERY) => {}
        }
        crate::informer::pace(worked, DEBOUNCE, 0.1).await;
    }
}

/// One HPA's pass: `pods` and `metrics` (by pod name) are its namespace's.
async fn reconcile<C: Cluster>(
    cluster: &C,
    hpa: &Value,
    pods: &[&Value],
    metrics: &HashMap<&str, &Value>,
    memory: &mut Memory,
    events: &Mutex<Recorder>,
) {
    let ns = text(hpa, "/metadata/namespace");
    let name = text(hpa, "/spec/scaleTargetRef/name");
    let target = match target_plural(hpa) {
        Ok(plural) => cluster.get(plural, ns, name).await.map_err(|e| e.to_string()).map(|t| (plural, t)),
        Err(e) => Err(e),
    };
    let scale = target.as_ref().map_err(Clone::clone).and_then(|(_, t)| scale_of(t));
    let mut plan = plan(hpa, scale, pods, metrics, memory, now_seconds());
    if let (Some(replicas), Ok((plural, target))) = (plan.scale_to, target) {
        let mut updated = target.clone();
        updated["spec"]["replicas"] = json!(replicas);
        if let Err(e) = cluster.update(plural, updated).await {
            // Not scaled: the next pass tries again from what it reads then.
            memory.scaled.pop();
            let message = format!("the HPA controller was unable to update the target scale: {e}");
            let conditions = plan.status["conditions"].as_array_mut().expect("conditions are set");
            conditions.retain(|c| c["type"] != "AbleToScale");
            conditions.push(json!({"type": "AbleToScale", "status": "False", "reason": "FailedUpdateScale",
                                   "message": message, "lastTransitionTime": corral_api::meta::rfc3339(now_seconds())}));
            plan.status["currentReplicas"] = target["spec"]["replicas"].clone();
            if let Some(old) = hpa.at("/status/lastScaleTime") {
                plan.status["lastScaleTime"] = old.clone();
            }
            plan.events.retain(|(_, reason, _)| reason != "SuccessfulRescale");
            if !matches!(e, ClusterError::Conflict(_)) {
                plan.events.push((true, "FailedRescale".into(), format!("New size: {replicas}; error: {e}")));
            }
        }
    }
    {
        let involved = Involved::object(hpa);
        let mut recorder = events.lock().expect("not poisoned");
        for (warning, reason, message) in &plan.events {
            recorder.record(&involved, *warning, reason, message, now_seconds());
        }
    }
    if hpa.get("status") != Some(&plan.status) {
        let mut updated = hpa.clone();
        updated["status"] = plan.status;
        if let Err(e) = cluster.update_status("autoscaling/horizontalpodautoscalers", updated).await {
            tracing::debug!(hpa = %crate::cluster::key_of(hpa), error = %e, "status not written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa(extra: Value) -> Value {
        let mut h = json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "h1", "generation": 1},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                     "minReplicas": 1, "maxReplicas": 5,
                     "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                                  "target": {"type": "Utilization", "averageUtilization": 50}}}]},
        });
        if let (Some(h), Some(extra)) = (h.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                h.insert(k.clone(), v.clone());
            }
        }
        h
    }

    fn pod(name: &str, ready: bool) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        })
    }

    fn usage(name: &str, cpu: &str) -> Value {
        json!({"metadata": {"name": name}, "containers": [{"name": "c", "usage": {"cpu": cpu, "memory": "32Mi"}}]})
    }

    fn scale(replicas: i32) -> Result<Scale, String> {
        Ok(Scale { replicas, selector: LabelSelector::parse("app=web").unwrap() })
    }

    fn condition<'a>(plan: &'a Plan, kind: &str) -> &'a Value {
        plan.status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == kind).unwrap()
    }

    #[test]
    fn busy_pods_scale_the_target_up_within_the_rate_and_the_maximum() {
        // Phase 1: one pod at 250% of its request against a 50% target asks for 5 pods;
        // the scale-up policy (100% or 4 pods per 15 s) allows them, max 5 caps them.
        let pods = [pod("web-1", true)];
        let m = [usage("web-1", "250m")];
        let metrics: HashMap<&str, &Value> = m.iter().map(|v| ("web-1", v)).collect();
        let pod_refs: Vec<&Value> = pods.iter().collect();
        let mut memory = Memory::default();
        let p = plan(&hpa(json!({})), scale(1), &pod_refs, &metrics, &mut memory, 1000);
        assert_eq!(p.scale_to, Some(5));
        assert_eq!(
            p.status["currentMetrics"][0]["resource"]["current"],
            json!({"averageValue": "250m", "averageUtilization": 250})
        );
        assert_eq!(
            p.events,
            vec![(
                false,
                "SuccessfulRescale".into(),
                "New size: 5; reason: cpu resource utilization (percentage of request) above target".into()
            )]
        );
        assert_eq!(condition(&p, "ScalingActive")["reason"], "ValidMetricFound");
        assert_eq!(condition(&p, "ScalingLimited")["status"], "False");

        // Phase 2: with maxReplicas 3 the same usage stops at 3, and says so.
        let mut memory = Memory::default();
        let capped =
            hpa(json!({"spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "maxReplicas": 3}}));
        let p = plan(&capped, scale(1), &pod_refs, &metrics, &mut memory, 1000);
        assert_eq!(p.scale_to, Some(3));
        assert_eq!(condition(&p, "ScalingLimited")["reason"], "TooManyReplicas");
        assert_eq!(capped["spec"].get("metrics"), None, "no metrics given: 80% CPU");

        // Phase 3: at the maximum, still busy: nothing to do, and still limited.
        let three: Vec<Value> = (1..=3).map(|i| pod(&format!("web-{i}"), true)).collect();
        let busy: Vec<Value> = (1..=3).map(|i| usage(&format!("web-{i}"), "250m")).collect();
        let busy_metrics: HashMap<&str, &Value> = busy.iter().map(|v| (text(v, "/metadata/name"), v)).collect();
        let p = plan(&capped, scale(3), &three.iter().collect::<Vec<_>>(), &busy_metrics, &mut memory, 1015);
        assert_eq!(p.scale_to, None);
        assert_eq!(condition(&p, "AbleToScale")["reason"], "ReadyForNewScale");
        assert_eq!(condition(&p, "ScalingLimited")["reason"], "TooManyReplicas");
        let kinds: Vec<&str> =
            p.status["conditions"].as_array().unwrap().iter().map(|c| c["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["AbleToScale", "ScalingActive", "ScalingLimited"]);
    }

    #[test]
    fn idle_pods_scale_down_only_after_the_stabilization_window() {
        let pods: Vec<Value> = (1..=4).map(|i| pod(&format!("web-{i}"), true)).collect();
        let m: Vec<Value> = (1..=4).map(|i| usage(&format!("web-{i}"), "5m")).collect();
        let metrics: HashMap<&str, &Value> = m.iter().map(|v| (text(v, "/metadata/name"), v)).collect();
        let pod_refs: Vec<&Value> = pods.iter().collect();
        let mut memory = Memory::default();
        // A busy pass first: its recommendation (4) holds the replicas for 300 s.
        let busy: Vec<Value> = (1..=4).map(|i| usage(&format!("web-{i}"), "50m")).collect();
        let busy_metrics: HashMap<&str, &Value> = busy.iter().map(|v| (text(v, "/metadata/name"), v)).collect();
        assert_eq!(plan(&hpa(json!({})), scale(4), &pod_refs, &busy_metrics, &mut memory, 0).scale_to, None);

        let p = plan(&hpa(json!({})), scale(4), &pod_refs, &metrics, &mut memory, 60);
        assert_eq!(p.scale_to, None);
        assert_eq!(condition(&p, "AbleToScale")["reason"], "ScaleDownStabilized");
        let p = plan(&hpa(json!({})), scale(4), &pod_refs, &metrics, &mut memory, 301);
        assert_eq!(p.scale_to, Some(1));
        assert_eq!(p.events[0].2, "New size: 1; reason: All metrics below target");
    }

    #[test]
    fn unmeasurable_targets_say_why_and_do_not_scale() {
        let pods = [pod("web-1", true)];
        let pod_refs: Vec<&Value> = pods.iter().collect();
        let none = HashMap::new();
        let mut memory = Memory::default();
        let p = plan(&hpa(json!({})), scale(1), &pod_refs, &none, &mut memory, 0);
        assert_eq!(p.scale_to, None);
        let active = condition(&p, "ScalingActive");
        assert_eq!(
            (active["status"].as_str(), active["reason"].as_str()),
            (Some("False"), Some("FailedGetResourceMetric"))
        );
        assert!(p.events.iter().any(|(w, r, _)| *w && r == "FailedGetResourceMetric"));

        let mut no_request = pod("web-1", true);
        no_request["spec"]["containers"][0]["resources"] = json!({});
        let m = [usage("web-1", "50m")];
        let metrics: HashMap<&str, &Value> = m.iter().map(|v| ("web-1", v)).collect();
        let p = plan(&hpa(json!({})), scale(1), &[&no_request], &metrics, &mut memory, 0);
        assert!(condition(&p, "ScalingActive")["message"].as_str().unwrap().contains("missing request for cpu"));

        let p = plan(&hpa(json!({})), Err("deployments \"web\" not found".into()), &pod_refs, &metrics, &mut memory, 0);
        assert_eq!(condition(&p, "AbleToScale")["reason"], "FailedGetScale");
        let p = plan(&hpa(json!({})), scale(0), &pod_refs, &metrics, &mut memory, 0);
        assert_eq!(condition(&p, "ScalingActive")["reason"], "ScalingDisabled");
    }

    #[test]
    fn specs_and_behavior_read_with_kubernetes_defaults() {
        let h = hpa(json!({"spec": {"metrics": [
            {"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "64Mi"}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}}}}));
        assert_eq!(
            metric_specs(&h).unwrap(),
            vec![MetricSpec { resource: "memory".into(), target: TargetValue::AverageValue(64 << 20) }]
        );
        let b = behavior_of(&h);
        assert_eq!(b.down.stabilization_s, 0);
        assert_eq!(b.down.policies, vec![Policy::Pods { value: 1, period_s: 60 }]);
        assert_eq!(b.up, Behavior::default().up);
        let bad = hpa(json!({"spec": {"metrics": [{"type": "External"}]}}));
        assert!(metric_specs(&bad).unwrap_err().contains("External"));
        assert_eq!(target_plural(&hpa(json!({}))), Ok("apps/deployments"));
    }
}
