//! What to do next for one pod, and what its status is: kubelet's pod sync as pure functions
//! of the pod, what the runtime has (`PodView`) and what the agent remembers (`PodMemory`).
//! The worker runs the actions; tests drive these functions with made-up runtime states.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::spec;

/// Back-off between restarts of a failing container: 10 s doubling to 5 min, as kubelet.
pub const BACKOFF_INITIAL_NS: i64 = 10_000_000_000;
pub const BACKOFF_MAX_NS: i64 = 300_000_000_000;
/// A container that ran this long before exiting starts its back-off over.
pub const BACKOFF_RESET_NS: i64 = 600_000_000_000;

/// The wall clock in nanoseconds since the epoch, as CRI timestamps are.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Exited,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxView {
    pub id: String,
    pub attempt: u32,
    pub ready: bool,
    pub ip: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerView {
    pub id: String,
    pub sandbox_id: String,
    pub name: String,
    pub attempt: u32,
    pub init: bool,
    pub state: State,
    pub exit_code: i32,
    /// The runtime's reason for an exit (`OOMKilled`, `Completed`, `Error`).
    pub reason: String,
    pub message: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub image_ref: String,
    pub hash: String,
}

/// What the runtime has of one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodView {
    pub sandboxes: Vec<SandboxView>,
    pub containers: Vec<ContainerView>,
}

impl PodView {
    /// The newest sandbox.
    pub fn sandbox(&self) -> Option<&SandboxView> {
        self.sandboxes.iter().max_by_key(|s| s.attempt)
    }

    /// The newest run of a container in the current sandbox.
    pub fn latest(&self, name: &str) -> Option<&ContainerView> {
        self.runs(name).next()
    }

    /// The run before the newest (kubectl's `lastState`, `logs --previous`).
    pub fn previous(&self, name: &str) -> Option<&ContainerView> {
        self.runs(name).nth(1)
    }

    /// Runs of a container in the current sandbox, newest first.
    fn runs(&self, name: &str) -> impl Iterator<Item = &ContainerView> {
        let sandbox = self.sandbox().map(|s| s.id.clone()).unwrap_or_default();
        let mut runs: Vec<&ContainerView> =
            self.containers.iter().filter(|c| c.name == name && c.sandbox_id == sandbox).collect();
        runs.sort_by_key(|c| std::cmp::Reverse(c.attempt));
        runs.into_iter()
    }
}

/// Why a container is not running, when the runtime cannot say (image pulls, config errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
    /// No new attempt before this time (ns since the epoch).
    pub until: i64,
}

/// A container's restart back-off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    /// The exit (finished_at) this back-off was computed for.
    pub exit: i64,
    pub delay: i64,
}

/// What the agent remembers about a pod between syncs.
#[derive(Clone, Debug, Default)]
pub struct PodMemory {
    pub waiting: HashMap<String, Waiting>,
    pub backoff: HashMap<String, Backoff>,
    /// Readiness by container, from its readiness probe (absent: it has none).
    pub ready: HashMap<String, bool>,
    /// Whether a container's startup probe has passed (absent: it has none).
    pub started: HashMap<String, bool>,
    /// Running containers that failed their liveness or startup probe: id and why.
    pub unhealthy: HashMap<String, (String, String)>,
    /// When the agent first took the pod (status.startTime).
    pub start_time: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Stop and remove a sandbox that is no longer usable, with its containers.
    StopSandbox {
        id: String,
    },
    StartSandbox {
        attempt: u32,
    },
    StartContainer {
        name: String,
        init: bool,
        attempt: u32,
    },
    KillContainer {
        id: String,
        name: String,
        why: String,
    },
}

fn restart_policy(pod: &Value) -> &str {
    pod.pointer("/spec/restartPolicy").and_then(Value::as_str).unwrap_or("Always")
}

fn spec_containers<'a>(pod: &'a Value, field: &str) -> impl Iterator<Item = &'a Value> {
    pod.pointer(&format!("/spec/{field}")).and_then(Value::as_array).into_iter().flatten()
}

fn name_of(c: &Value) -> &str {
    c.get("name").and_then(Value::as_str).unwrap_or_default()
}

/// Whether a container that exited this way is run again under the pod's policy.
fn restarts(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// True when the pod has run to its end: nothing will be started again.
pub fn is_terminal(pod: &Value, view: &PodView) -> bool {
    matches!(phase(pod, view), "Succeeded" | "Failed")
}

/// The next actions for a pod that is not being deleted. `now` is nanoseconds since the
/// epoch; back-offs are updated in `memory`.
pub fn plan(pod: &Value, view: &PodView, memory: &mut PodMemory, now: i64) -> Vec<Action> {
    let policy = restart_policy(pod);
    if is_terminal(pod, view) {
        return Vec::new();
    }
    match view.sandbox() {
        None => return vec![Action::StartSandbox { attempt: 0 }],
        Some(s) if !s.ready => {
            return vec![Action::StopSandbox { id: s.id.clone() }, Action::StartSandbox { attempt: s.attempt + 1 }];
        }
        Some(_) => {}
    }
    let waiting = |memory: &PodMemory, name: &str| memory.waiting.get(name).is_some_and(|w| w.until > now);

    for c in spec_containers(pod, "initContainers") {
        let name = name_of(c);
        match view.latest(name) {
            None if waiting(memory, name) => return Vec::new(),
            None => return vec![Action::StartContainer { name: name.into(), init: true, attempt: 0 }],
            Some(run) if run.state == State::Exited && run.exit_code == 0 => continue,
            Some(run) if run.state == State::Exited => {
                if policy == "Never" {
                    return Vec::new();
                }
                if in_backoff(memory, name, run, now) || waiting(memory, name) {
                    return Vec::new();
                }
                return vec![Action::StartContainer { name: name.into(), init: true, attempt: run.attempt + 1 }];
            }
            Some(_) => return Vec::new(),
        }
    }

    let mut actions = Vec::new();
    for c in spec_containers(pod, "containers") {
        let name = name_of(c);
        match view.latest(name) {
            None if waiting(memory, name) => {}
            None => actions.push(Action::StartContainer { name: name.into(), init: false, attempt: 0 }),
            Some(run) if matches!(run.state, State::Running | State::Created) => {
                if let Some((id, why)) = memory.unhealthy.get(name).filter(|(id, _)| *id == run.id) {
                    actions.push(Action::KillContainer { id: id.clone(), name: name.into(), why: why.clone() });
                } else if !run.hash.is_empty() && run.hash != spec::spec_hash(c) {
                    actions.push(Action::KillContainer {
                        id: run.id.clone(),
                        name: name.into(),
                        why: "Container definition changed, will be restarted".into(),
                    });
                }
            }
            Some(run) => {
                if !restarts(policy, run.exit_code) || in_backoff(memory, name, run, now) || waiting(memory, name) {
                    continue;
                }
                actions.push(Action::StartContainer { name: name.into(), init: false, attempt: run.attempt + 1 });
            }
        }
    }
    actions
}

/// Whether an exited container must still wait before its restart: the first restart is
/// at once, then after 10 s, 20 s, ... up to 5 min; a container that ran 10 min starts over.
fn in_backoff(memory: &mut PodMemory, name: &str, run: &ContainerView, now: i64) -> bool {
    let entry = memory.backoff.entry(name.to_string()).or_default();
    if entry.exit != run.finished_at {
        let forgiven = entry.exit == 0 || run.finished_at - run.started_at >= BACKOFF_RESET_NS;
        entry.delay = match (forgiven, entry.delay) {
            (true, _) => 0,
            (false, 0) => BACKOFF_INITIAL_NS,
            (false, d) => (d * 2).min(BACKOFF_MAX_NS),
        };
        entry.exit = run.finished_at;
    }
    now < run.finished_at + entry.delay
}

/// Until when an exited container waits for its restart (0: it does not wait).
fn backoff_until(memory: &PodMemory, name: &str, run: &ContainerView) -> i64 {
    match memory.backoff.get(name) {
        Some(b) if b.exit == run.finished_at && b.delay > 0 => run.finished_at + b.delay,
        _ => 0,
    }
}

/// The pod's phase from its containers, as kubelet computes it.
pub fn phase(pod: &Value, view: &PodView) -> &'static str {
    let policy = restart_policy(pod);
    for c in spec_containers(pod, "initContainers") {
        match view.latest(name_of(c)) {
            Some(run) if run.state == State::Exited && run.exit_code == 0 => continue,
            Some(run) if run.state == State::Exited && policy == "Never" => return "Failed",
            _ => return "Pending",
        }
    }
    let (mut running, mut waiting, mut succeeded, mut failed, mut restarting) = (0, 0, 0, 0, 0);
    for c in spec_containers(pod, "containers") {
        match view.latest(name_of(c)) {
            Some(run) if run.state == State::Running => running += 1,
            Some(run) if run.state == State::Exited => {
                if restarts(policy, run.exit_code) {
                    restarting += 1;
                } else if run.exit_code == 0 {
                    succeeded += 1;
                } else {
                    failed += 1;
                }
            }
            _ => waiting += 1,
        }
    }
    if waiting > 0 {
        // Containers not yet started keep a pod Pending unless one has run before.
        return if running + restarting > 0 && view.containers.iter().any(|c| !c.init) { "Running" } else { "Pending" };
    }
    if running + restarting > 0 {
        return "Running";
    }
    if failed > 0 {
        return "Failed";
    }
    if succeeded > 0 { "Succeeded" } else { "Pending" }
}

fn rfc3339_ns(ns: i64) -> Value {
    if ns <= 0 {
        return Value::Null;
    }
    json!(corral_api::meta::rfc3339(ns / 1_000_000_000))
}

fn terminated(run: &ContainerView) -> Value {
    let reason = if !run.reason.is_empty() {
        run.reason.clone()
    } else if run.exit_code == 0 {
        "Completed".into()
    } else {
        "Error".into()
    };
    let mut t = json!({
        "exitCode": run.exit_code,
        "reason": reason,
        "startedAt": rfc3339_ns(run.started_at),
        "finishedAt": rfc3339_ns(run.finished_at),
        "containerID": format!("containerd://{}", run.id),
    });
    if !run.message.is_empty() {
        t["message"] = json!(run.message);
    }
    t
}

/// One entry of containerStatuses / initContainerStatuses.
fn container_status(pod: &Value, c: &Value, init: bool, view: &PodView, memory: &PodMemory, now: i64) -> Value {
    let name = name_of(c);
    let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
    let latest = view.latest(name);
    let mut status = json!({
        "name": name,
        "image": image,
        "imageID": latest.map(|r| r.image_ref.clone()).unwrap_or_default(),
        "restartCount": latest.map_or(0, |r| r.attempt),
        "ready": false,
        "started": false,
        "lastState": {},
    });
    if let Some(run) = latest {
        status["containerID"] = json!(format!("containerd://{}", run.id));
    }
    let waiting = memory.waiting.get(name);
    let state = match latest {
        Some(run) if run.state == State::Running => {
            let started = memory.started.get(name).copied().unwrap_or(true);
            status["started"] = json!(started);
            status["ready"] = json!(started && memory.ready.get(name).copied().unwrap_or(true));
            json!({"running": {"startedAt": rfc3339_ns(run.started_at)}})
        }
        Some(run) if run.state == State::Exited => {
            let policy = restart_policy(pod);
            let until = backoff_until(memory, name, run);
            let pending_restart = restarts(policy, run.exit_code) && !(init && run.exit_code == 0) && now < until;
            if let Some(w) = waiting {
                status["lastState"] = json!({"terminated": terminated(run)});
                json!({"waiting": {"reason": w.reason, "message": w.message}})
            } else if pending_restart {
                status["lastState"] = json!({"terminated": terminated(run)});
                let delay = memory.backoff.get(name).map_or(0, |b| b.delay) / 1_000_000_000;
                json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!(
                    "back-off {} restarting failed container={name} pod={}_{}({})",
                    human_seconds(delay),
                    pod.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default(),
                    pod.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default(),
                    pod.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default(),
                )}})
            } else {
                json!({"terminated": terminated(run)})
            }
        }
        _ => match waiting {
            Some(w) => json!({"waiting": {"reason": w.reason, "message": w.message}}),
            None => json!({"waiting": {"reason": "ContainerCreating"}}),
        },
    };
    if status["lastState"] == json!({})
        && let Some(prev) = view.previous(name)
    {
        status["lastState"] = json!({"terminated": terminated(prev)});
    }
    status["state"] = state;
    status
}

fn human_seconds(s: i64) -> String {
    if s >= 60 && s % 60 == 0 {
        format!("{}m0s", s / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The pod's status as kubelet writes it.
pub fn pod_status(pod: &Value, view: &PodView, memory: &PodMemory, host_ip: &str, now: i64) -> Value {
    let phase = phase(pod, view);
    let now_text = rfc3339_ns(now);
    let mut init_done = true;
    let mut init_statuses = Vec::new();
    for c in spec_containers(pod, "initContainers") {
        let mut s = container_status(pod, c, true, view, memory, now);
        let done = view.latest(name_of(c)).is_some_and(|r| r.state == State::Exited && r.exit_code == 0);
        init_done &= done;
        if s["state"].get("waiting").is_some() && s["state"]["waiting"]["reason"] == "ContainerCreating" {
            s["state"]["waiting"]["reason"] = json!("PodInitializing");
        }
        s["ready"] = json!(done);
        init_statuses.push(s);
    }
    let mut statuses = Vec::new();
    let mut all_ready = true;
    for c in spec_containers(pod, "containers") {
        let mut s = container_status(pod, c, false, view, memory, now);
        if !init_done && s["state"].get("waiting").is_some() && s["state"]["waiting"]["reason"] == "ContainerCreating" {
            s["state"]["waiting"]["reason"] = json!("PodInitializing");
        }
        all_ready &= s["ready"] == true;
        statuses.push(s);
    }
    let terminal = matches!(phase, "Succeeded" | "Failed");
    let condition = |kind: &str, ok: bool, reason: Option<&str>| {
        let mut c = json!({"type": kind, "status": if ok { "True" } else { "False" },
                           "lastProbeTime": null, "lastTransitionTime": now_text});
        if let Some(r) = reason {
            c["reason"] = json!(r);
        }
        c
    };
    let ready = all_ready && !terminal && phase == "Running";
    let not_ready_reason = if terminal { Some("PodCompleted") } else { Some("ContainersNotReady") };
    let mut conditions = vec![
        condition("PodReadyToStartContainers", view.sandbox().is_some_and(|s| s.ready), None),
        condition("Initialized", init_done, if init_done { None } else { Some("ContainersNotInitialized") }),
        condition("Ready", ready, if ready { None } else { not_ready_reason }),
        condition("ContainersReady", ready, if ready { None } else { not_ready_reason }),
        condition("PodScheduled", true, None),
    ];
    if terminal {
        conditions[1] = condition("Initialized", true, Some("PodCompleted"));
    }
    let ip = view.sandbox().map(|s| s.ip.clone()).unwrap_or_default();
    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": memory.start_time.clone().map_or(now_text.clone(), Value::String),
        "containerStatuses": statuses,
        "qosClass": qos_class(pod),
    });
    if !init_statuses.is_empty() {
        status["initContainerStatuses"] = json!(init_statuses);
    }
    if !ip.is_empty() {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    status
}

/// Guaranteed (every container's requests equal its limits for cpu and memory), BestEffort
/// (none set), else Burstable.
pub fn qos_class(pod: &Value) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for c in spec_containers(pod, "containers").chain(spec_containers(pod, "initContainers")) {
        let requests = c.pointer("/resources/requests").and_then(Value::as_object);
        let limits = c.pointer("/resources/limits").and_then(Value::as_object);
        any |= requests.is_some_and(|r| !r.is_empty()) || limits.is_some_and(|l| !l.is_empty());
        for r in ["cpu", "memory"] {
            let limit = limits.and_then(|l| l.get(r));
            let request = requests.and_then(|q| q.get(r)).or(limit);
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    fn pod(policy: &str) -> Value {
        json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u"},
            "spec": {"restartPolicy": policy, "containers": [{"name": "app", "image": "busybox"}]},
        })
    }

    fn sandbox(ready: bool) -> SandboxView {
        SandboxView { id: "sb".into(), attempt: 0, ready, ip: "10.244.0.5".into() }
    }

    fn run(pod: &Value, attempt: u32, state: State, exit_code: i32, started: i64, finished: i64) -> ContainerView {
        ContainerView {
            id: format!("c{attempt}"),
            sandbox_id: "sb".into(),
            name: "app".into(),
            attempt,
            init: false,
            state,
            exit_code,
            reason: String::new(),
            message: String::new(),
            started_at: started,
            finished_at: finished,
            image_ref: "sha256:1".into(),
            hash: spec::spec_hash(&pod["spec"]["containers"][0]),
        }
    }

    #[test]
    fn a_new_pod_gets_a_sandbox_then_its_containers() {
        let p = pod("Always");
        let mut memory = PodMemory::default();
        assert_eq!(plan(&p, &PodView::default(), &mut memory, 0), [Action::StartSandbox { attempt: 0 }]);
        let view = PodView { sandboxes: vec![sandbox(true)], containers: vec![] };
        assert_eq!(
            plan(&p, &view, &mut memory, 0),
            [Action::StartContainer { name: "app".into(), init: false, attempt: 0 }]
        );
        let status = pod_status(&p, &view, &memory, "10.0.0.1", 5 * S);
        assert_eq!(status["phase"], "Pending");
        assert_eq!(status["containerStatuses"][0]["state"]["waiting"]["reason"], "ContainerCreating");
        assert_eq!(status["podIP"], "10.244.0.5");
    }

    #[test]
    fn a_crashing_container_restarts_with_a_growing_back_off() {
        let p = pod("Always");
        let mut memory = PodMemory::default();
        let mut view =
            PodView { sandboxes: vec![sandbox(true)], containers: vec![run(&p, 0, State::Exited, 1, S, 2 * S)] };
        // First exit: restarted at once.
        assert_eq!(plan(&p, &view, &mut memory, 2 * S).len(), 1);
        // Second exit: 10 s back-off, shown as CrashLoopBackOff.
        view.containers = vec![run(&p, 1, State::Exited, 1, 3 * S, 4 * S)];
        assert!(plan(&p, &view, &mut memory, 5 * S).is_empty());
        let status = pod_status(&p, &view, &memory, "10.0.0.1", 5 * S);
        let waiting = &status["containerStatuses"][0]["state"]["waiting"];
        assert_eq!(waiting["reason"], "CrashLoopBackOff");
        assert!(waiting["message"].as_str().unwrap().starts_with("back-off 10s restarting failed container=app"));
        assert_eq!(status["containerStatuses"][0]["lastState"]["terminated"]["exitCode"], 1);
        assert_eq!(status["containerStatuses"][0]["restartCount"], 1);
        assert_eq!(status["phase"], "Running");
        assert_eq!(
            plan(&p, &view, &mut memory, 14 * S),
            [Action::StartContainer { name: "app".into(), init: false, attempt: 2 }]
        );
        // Third exit: 20 s.
        view.containers = vec![run(&p, 2, State::Exited, 1, 15 * S, 16 * S)];
        assert!(plan(&p, &view, &mut memory, 30 * S).is_empty());
        assert_eq!(plan(&p, &view, &mut memory, 36 * S).len(), 1);
        assert_eq!(memory.backoff["app"].delay, 20 * S);
    }

    #[test]
    fn run_to_completion_pods_end_succeeded_or_failed_by_their_policy() {
        let p = pod("Never");
        let mut memory = PodMemory::default();
        let view = PodView { sandboxes: vec![sandbox(true)], containers: vec![run(&p, 0, State::Exited, 0, S, 2 * S)] };
        assert!(plan(&p, &view, &mut memory, 3 * S).is_empty());
        let status = pod_status(&p, &view, &memory, "10.0.0.1", 3 * S);
        assert_eq!(status["phase"], "Succeeded");
        assert_eq!(status["containerStatuses"][0]["state"]["terminated"]["reason"], "Completed");
        let failed =
            PodView { sandboxes: vec![sandbox(true)], containers: vec![run(&p, 0, State::Exited, 2, S, 2 * S)] };
        assert_eq!(phase(&p, &failed), "Failed");
        assert_eq!(phase(&pod("OnFailure"), &failed), "Running", "OnFailure restarts a failure");
        assert_eq!(phase(&pod("OnFailure"), &view), "Succeeded");
    }

    #[test]
    fn a_changed_spec_replaces_the_running_container_and_a_dead_sandbox_is_recreated() {
        let p = pod("Always");
        let mut memory = PodMemory::default();
        let mut running = run(&p, 0, State::Running, 0, S, 0);
        running.hash = "old".into();
        let view = PodView { sandboxes: vec![sandbox(true)], containers: vec![running] };
        assert!(matches!(plan(&p, &view, &mut memory, 2 * S)[..], [Action::KillContainer { .. }]));
        let dead = PodView { sandboxes: vec![sandbox(false)], containers: vec![] };
        assert_eq!(
            plan(&p, &dead, &mut memory, 0),
            [Action::StopSandbox { id: "sb".into() }, Action::StartSandbox { attempt: 1 }]
        );
    }

    #[test]
    fn probes_gate_started_and_ready_and_a_failed_liveness_kills() {
        let p = pod("Always");
        let mut memory = PodMemory::default();
        let view = PodView { sandboxes: vec![sandbox(true)], containers: vec![run(&p, 0, State::Running, 0, S, 0)] };
        memory.started.insert("app".into(), false);
        let status = pod_status(&p, &view, &memory, "10.0.0.1", 2 * S);
        assert_eq!(
            (&status["containerStatuses"][0]["started"], &status["containerStatuses"][0]["ready"]),
            (&json!(false), &json!(false))
        );
        memory.started.insert("app".into(), true);
        memory.ready.insert("app".into(), false);
        let status = pod_status(&p, &view, &memory, "10.0.0.1", 2 * S);
        assert_eq!(status["containerStatuses"][0]["started"], true);
        assert_eq!(status["conditions"][2]["status"], "False", "not Ready while its readiness probe fails");
        memory.ready.insert("app".into(), true);
        let status = pod_status(&p, &view, &memory, "10.0.0.1", 2 * S);
        assert_eq!(status["conditions"][2]["status"], "True");

        memory.unhealthy.insert("app".into(), ("c0".into(), "failed liveness probe".into()));
        assert_eq!(
            plan(&p, &view, &mut memory, 2 * S),
            [Action::KillContainer { id: "c0".into(), name: "app".into(), why: "failed liveness probe".into() }]
        );
        memory.unhealthy.insert("app".into(), ("an-older-run".into(), "failed liveness probe".into()));
        assert!(plan(&p, &view, &mut memory, 2 * S).is_empty(), "only the run that failed is killed");
    }

    #[test]
    fn init_containers_run_in_order_before_the_others() {
        let mut p = pod("Always");
        p["spec"]["initContainers"] =
            json!([{"name": "first", "image": "busybox"}, {"name": "second", "image": "busybox"}]);
        let mut memory = PodMemory::default();
        let mut first = run(&p, 0, State::Exited, 0, S, 2 * S);
        first.name = "first".into();
        first.init = true;
        let view = PodView { sandboxes: vec![sandbox(true)], containers: vec![first] };
        assert_eq!(
            plan(&p, &view, &mut memory, 3 * S),
            [Action::StartContainer { name: "second".into(), init: true, attempt: 0 }]
        );
        let status = pod_status(&p, &view, &memory, "10.0.0.1", 3 * S);
        assert_eq!(status["phase"], "Pending");
        assert_eq!(status["containerStatuses"][0]["state"]["waiting"]["reason"], "PodInitializing");
        assert_eq!(status["initContainerStatuses"][0]["state"]["terminated"]["reason"], "Completed");
    }

    #[test]
    fn quality_of_service_classes() {
        let with = |resources: Value| json!({"spec": {"containers": [{"name": "c", "resources": resources}]}});
        assert_eq!(qos_class(&with(json!({}))), "BestEffort");
        assert_eq!(qos_class(&with(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))), "Guaranteed");
        assert_eq!(qos_class(&with(json!({"requests": {"cpu": "1"}}))), "Burstable");
    }
}
