//! Runs pod sync against a real runtime: observes what the runtime has (`observe`), carries
//! out `sync::plan`'s actions for a pod (images, volumes, sandboxes, containers), terminates
//! pods with their grace period, and computes the status to report.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_api::events::{Involved, Recorder};
use corral_proto::cri;
use serde_json::Value;
use tokio::sync::Notify;

use crate::cri::{CriError, CriResult, Runtime};
use crate::gc::{self, GcPolicy};
use crate::probe::{self, Kind, Probe, ProbeState};
use crate::spec::{self, ConfigError, Placement, References, str_at};
use crate::sync::{self, Action, ContainerView, PodMemory, PodView, SandboxView, State, Waiting, now_ns};
use crate::volumes::{self, VolumeSources};

/// Where the node keeps things and how it is named and reached.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_name: String,
    pub host_ip: String,
    /// The cgroup (cgroupfs path) under which this node's pods go.
    pub cgroup_root: String,
    pub log_root: PathBuf,
    pub pods_root: PathBuf,
    pub cluster_dns: Option<(String, String)>,
    /// Images never garbage-collected (the sandbox image, the images the node was given).
    pub pinned_images: Vec<String>,
}

/// The API objects pods refer to, fetched by the agent from the servers.
pub trait Lookup: Send + Sync + 'static {
    /// A namespaced object (`configmaps`, `secrets`, `persistentvolumeclaims`) or a
    /// cluster-scoped one (`persistentvolumes`, namespace ""), None when it does not exist.
    fn get(&self, plural: &str, namespace: &str, name: &str) -> impl Future<Output = Option<Value>> + Send;
}

/// An image pull that failed, retried with a back-off.
const PULL_BACKOFF_NS: i64 = 10_000_000_000;
const CONFIG_RETRY_NS: i64 = 2_000_000_000;

pub struct Worker<R: Runtime, L: Lookup> {
    runtime: Arc<R>,
    lookup: Arc<L>,
    node: NodeConfig,
    memory: Mutex<HashMap<String, PodMemory>>,
    /// Containers whose runtime status cannot change any more (exited), and running ones'
    /// start times, by id and state: not asked for again.
    seen: Mutex<HashMap<(String, i32), ContainerView>>,
    sandbox_ips: Mutex<HashMap<String, String>>,
    /// Probe states by pod uid, container name and kind.
    probes: ProbeTable,
    /// Containers being stopped in the background (liveness failures, changed specs).
    killing: Arc<Mutex<HashSet<String>>>,
    events: Arc<Mutex<Recorder>>,
    /// Notified when a probe's result changes, so the next sync comes at once.
    wake: Arc<Notify>,
    images: Mutex<gc::ImageHistory>,
}

type ProbeTable = Arc<Mutex<HashMap<(String, String, Kind), ProbeState>>>;

impl<R: Runtime, L: Lookup> Worker<R, L> {
    pub fn new(runtime: Arc<R>, lookup: Arc<L>, node: NodeConfig) -> Self {
        Self {
            runtime,
            lookup,
            memory: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            sandbox_ips: Mutex::new(HashMap::new()),
            probes: Arc::new(Mutex::new(HashMap::new())),
            killing: Arc::new(Mutex::new(HashSet::new())),
            events: Arc::new(Mutex::new(Recorder::new("kubelet", &node.node_name))),
            wake: Arc::new(Notify::new()),
            images: Mutex::new(gc::ImageHistory::default()),
            node,
        }
    }

    /// Events about the pods, waiting to be written.
    pub fn events(&self) -> &Mutex<Recorder> {
        &self.events
    }

    /// Notified when something (a probe) needs a sync before the next tick.
    pub fn wake(&self) -> &Notify {
        &self.wake
    }

    fn event(&self, pod: &Value, container: &str, warning: bool, reason: &str, message: &str) {
        record(&self.events, &Involved::pod(pod, container), warning, reason, message);
    }

    pub fn runtime(&self) -> &Arc<R> {
        &self.runtime
    }

    /// What the runtime has of every pod of this node, by pod uid.
    pub async fn observe(&self) -> CriResult<HashMap<String, PodView>> {
        let sandboxes = self.runtime.list_pod_sandboxes().await?;
        let containers = self.runtime.list_containers().await?;
        let mut views: HashMap<String, PodView> = HashMap::new();
        for s in sandboxes {
            let Some(uid) = s.labels.get(spec::POD_UID) else { continue };
            let ready = s.state == cri::PodSandboxState::SandboxReady as i32;
            let known = self.sandbox_ips.lock().expect("not poisoned").get(&s.id).cloned();
            let ip = match known {
                Some(ip) => ip,
                None if ready => {
                    let ip = match self.runtime.pod_sandbox_status(&s.id).await {
                        Ok(st) => st.network.map(|n| n.ip).unwrap_or_default(),
                        Err(CriError::NotFound(_)) => continue,
                        Err(e) => return Err(e),
                    };
                    self.sandbox_ips.lock().expect("not poisoned").insert(s.id.clone(), ip.clone());
                    ip
                }
                None => String::new(),
            };
            let attempt = s.metadata.as_ref().map_or(0, |m| m.attempt);
            views.entry(uid.clone()).or_default().sandboxes.push(SandboxView { id: s.id, attempt, ready, ip });
        }
        for c in containers {
            let Some(uid) = c.labels.get(spec::POD_UID).cloned() else { continue };
            let key = (c.id.clone(), c.state);
            let cached = self.seen.lock().expect("not poisoned").get(&key).cloned();
            let view = match cached {
                Some(v) => v,
                None => {
                    let status = match self.runtime.container_status(&c.id).await {
                        Ok(s) => s,
                        Err(CriError::NotFound(_)) => continue,
                        Err(e) => return Err(e),
                    };
                    let v = container_view(&c, &status);
                    if matches!(v.state, State::Running | State::Exited) {
                        self.seen.lock().expect("not poisoned").insert(key, v.clone());
                    }
                    v
                }
            };
            views.entry(uid).or_default().containers.push(view);
        }
        Ok(views)
    }

    /// One round of sync for a pod that is not being deleted: runs what the plan says and
    /// returns the status to report.
    pub async fn sync_pod(&self, pod: &Value, view: &PodView) -> Value {
        let uid = str_at(pod, "/metadata/uid").to_string();
        let now = now_ns();
        let mut memory = self.memory.lock().expect("not poisoned").remove(&uid).unwrap_or_default();
        if memory.start_time.is_none() {
            memory.start_time = pod
                .pointer("/status/startTime")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| Some(corral_api::meta::rfc3339(now / 1_000_000_000)));
        }
        // What the actions change is added to the view, so one round starts a sandbox and
        // its containers, and the status reported already shows them.
        let mut view = view.clone();
        self.probe_pod(pod, &view, &mut memory, now);
        let backoffs_before = memory.backoff.clone();
        for _round in 0..2 {
            let actions = sync::plan(pod, &view, &mut memory, now);
            let started_sandbox = actions.iter().any(|a| matches!(a, Action::StartSandbox { .. }));
            for action in actions {
                let span = tracing::info_span!("pod", pod = %str_at(pod, "/metadata/name"), uid = %uid, ?action);
                let acted = self.act(pod, action, &mut view, &mut memory, now);
                if !tracing::Instrument::instrument(acted, span).await {
                    break;
                }
            }
            if !started_sandbox || !view.sandbox().is_some_and(|s| s.ready) {
                break;
            }
        }
        for (name, b) in &memory.backoff {
            if b.delay > 0 && backoffs_before.get(name) != Some(b) {
                let message = format!(
                    "Back-off restarting failed container {name} in pod {}_{}({uid})",
                    str_at(pod, "/metadata/name"),
                    str_at(pod, "/metadata/namespace")
                );
                self.event(pod, name, true, "BackOff", &message);
            }
        }
        let status = sync::pod_status(pod, &view, &memory, &self.node.host_ip, now);
        self.memory.lock().expect("not poisoned").insert(uid, memory);
        status
    }

    /// Brings the probes' results into `memory` (started, ready, unhealthy) for the running
    /// containers, and starts the runs that are due in the background.
    fn probe_pod(&self, pod: &Value, view: &PodView, memory: &mut PodMemory, now: i64) {
        let uid = str_at(pod, "/metadata/uid").to_string();
        memory.started.clear();
        memory.ready.clear();
        memory.unhealthy.clear();
        let ip = view.sandbox().map(|s| s.ip.clone()).filter(|ip| !ip.is_empty()).unwrap_or(self.node.host_ip.clone());
        let mut table = self.probes.lock().expect("not poisoned");
        table.retain(|(u, name, _), state| {
            *u != uid || view.latest(name).is_some_and(|r| r.id == state.container_id && r.state == State::Running)
        });
        let containers = pod.pointer("/spec/containers").and_then(Value::as_array).into_iter().flatten();
        for c in containers {
            let name = str_at(c, "/name");
            let Some(run) = view.latest(name).filter(|r| r.state == State::Running) else { continue };
            let mut started = true;
            for kind in Kind::ALL {
                let Some(probe) = Probe::of(c, kind) else { continue };
                if kind != Kind::Startup && !started {
                    // The startup probe gates the others.
                    continue;
                }
                let key = (uid.clone(), name.to_string(), kind);
                let state = table.entry(key.clone()).or_insert_with(|| ProbeState::new(&run.id));
                match (kind, state.result) {
                    (Kind::Startup, result) => {
                        started = result == Some(true);
                        memory.started.insert(name.into(), started);
                    }
                    (Kind::Readiness, result) => {
                        memory.ready.insert(name.into(), result == Some(true));
                    }
                    (Kind::Liveness, _) => {}
                }
                if state.result == Some(false) && kind != Kind::Readiness {
                    let why =
                        format!("Container {name} failed {} probe, will be restarted", kind.title().to_lowercase());
                    memory.unhealthy.insert(name.into(), (run.id.clone(), why));
                    continue;
                }
                if !state.due(&probe, run.started_at, now) {
                    continue;
                }
                state.running = true;
                state.last_run = now;
                let job = ProbeJob {
                    table: self.probes.clone(),
                    events: self.events.clone(),
                    wake: self.wake.clone(),
                    key,
                    container_id: run.id.clone(),
                    involved: Involved::pod(pod, name),
                };
                let (runtime, ip) = (self.runtime.clone(), ip.clone());
                tokio::spawn(async move {
                    let outcome = probe::run(runtime.as_ref(), &job.container_id, &ip, &probe).await;
                    job.finish(&probe, outcome);
                });
            }
        }
    }

    /// Carries out one action, recording its effect in `view` (and failures in `memory`);
    /// false when the round cannot go on.
    async fn act(&self, pod: &Value, action: Action, view: &mut PodView, memory: &mut PodMemory, now: i64) -> bool {
        match action {
            Action::StopSandbox { id } => {
                if let Err(e) = self.remove_sandbox(&id).await {
                    tracing::warn!(error = %e, "removing a dead sandbox");
                    return false;
                }
                view.sandboxes.retain(|s| s.id != id);
                view.containers.retain(|c| c.sandbox_id != id);
            }
            Action::StartSandbox { attempt } => match self.start_sandbox(pod, attempt).await {
                Ok(s) => view.sandboxes.push(s),
                Err(e) => {
                    tracing::warn!(error = %e, "starting the sandbox");
                    self.event(pod, "", true, "FailedCreatePodSandBox", &format!("Failed to create pod sandbox: {e}"));
                    return false;
                }
            },
            Action::StartContainer { name, init, attempt } => {
                let Some(sandbox) = view.sandbox().filter(|s| s.ready).cloned() else { return false };
                match self.start_container(pod, &sandbox, &name, init, attempt).await {
                    Ok(id) => {
                        memory.waiting.remove(&name);
                        if let Ok(status) = self.runtime.container_status(&id).await {
                            view.containers.push(view_of_status(&sandbox.id, &status, init));
                        }
                    }
                    Err(waiting) => {
                        let before = memory.waiting.get(&name).map(|w| w.message.as_str());
                        if before.is_none_or(|m| !m.ends_with(waiting.message.as_str())) {
                            tracing::info!(container = %name, reason = %waiting.reason, message = %waiting.message, "not started");
                        }
                        let pulling = |r: &str| r == "ErrImagePull" || r == "ImagePullBackOff";
                        let retry = if pulling(&waiting.reason) { PULL_BACKOFF_NS } else { CONFIG_RETRY_NS };
                        let again = memory.waiting.get(&name).is_some_and(|w| pulling(&w.reason));
                        let image = image_of(pod, &name);
                        let (reason, message) = if again && waiting.reason == "ErrImagePull" {
                            self.event(pod, &name, false, "BackOff", &format!("Back-off pulling image {image:?}"));
                            (
                                "ImagePullBackOff".to_string(),
                                format!("Back-off pulling image {image:?}: {}", waiting.message),
                            )
                        } else {
                            if waiting.reason == "ErrImagePull" {
                                let failed = format!("Failed to pull image {image:?}: {}", waiting.message);
                                self.event(pod, &name, true, "Failed", &failed);
                            }
                            (waiting.reason, waiting.message)
                        };
                        let error = if pulling(&reason) || reason == "ErrImageNeverPull" { &reason } else { &message };
                        self.event(pod, &name, true, "Failed", &format!("Error: {error}"));
                        memory.waiting.insert(name.clone(), Waiting { reason, message, until: now + retry });
                    }
                }
            }
            Action::KillContainer { id, name, why } => {
                // In the background: a grace period must not hold up the other pods' sync.
                if !self.killing.lock().expect("not poisoned").insert(id.clone()) {
                    return true;
                }
                tracing::info!(container = %name, why, "killing");
                self.event(pod, &name, false, "Killing", &why);
                let (runtime, killing, grace) = (self.runtime.clone(), self.killing.clone(), grace_period(pod));
                tokio::spawn(async move {
                    if let Err(e) = runtime.stop_container(&id, grace).await {
                        tracing::warn!(container = %name, error = %e, "stopping a container");
                    }
                    killing.lock().expect("not poisoned").remove(&id);
                });
            }
        }
        true
    }

    /// Stops every container of the pod within `grace` (SIGTERM, then SIGKILL), then its
    /// sandboxes, and removes them and the pod's volume directories.
    pub async fn terminate(&self, uid: &str, view: &PodView, grace: Duration, pod: Option<&Value>) -> CriResult<()> {
        let live: Vec<&ContainerView> =
            view.containers.iter().filter(|c| matches!(c.state, State::Running | State::Created)).collect();
        if let Some(pod) = pod {
            for c in &live {
                self.event(pod, &c.name, false, "Killing", &format!("Stopping container {}", c.name));
            }
        }
        let stops = live.iter().map(|c| self.runtime.stop_container(&c.id, grace));
        for result in futures::future::join_all(stops).await {
            match result {
                Ok(()) | Err(CriError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        for s in &view.sandboxes {
            self.remove_sandbox(&s.id).await?;
        }
        self.memory.lock().expect("not poisoned").remove(uid);
        self.probes.lock().expect("not poisoned").retain(|(u, _, _), _| u != uid);
        if let Err(e) = volumes::cleanup(&self.node.pods_root, uid) {
            tracing::warn!(uid, error = %e, "removing the pod's volumes");
        }
        Ok(())
    }

    /// Removes the exited runs no one will ask for any more, with their logs; returns how
    /// many.
    pub async fn collect_containers(&self) -> CriResult<usize> {
        let dead = gc::dead_containers(&self.observe().await?);
        for id in &dead {
            let log = self.runtime.container_status(id).await.map(|s| s.log_path).unwrap_or_default();
            match self.runtime.remove_container(id).await {
                Ok(()) | Err(CriError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            if !log.is_empty() {
                let _ = std::fs::remove_file(&log);
            }
            self.seen.lock().expect("not poisoned").retain(|(c, _), _| c != id);
        }
        Ok(dead.len())
    }

    /// Removes unused images when the image filesystem is past the policy's high threshold;
    /// returns the bytes freed.
    pub async fn collect_images(&self, policy: &GcPolicy) -> CriResult<u64> {
        let mountpoint = self.runtime.image_fs_mountpoint().await?;
        let (used, capacity) = gc::filesystem_usage(&mountpoint)
            .map_err(|e| CriError::Failed(format!("{}: {e}", mountpoint.display())))?;
        let images = self.runtime.list_images().await?;
        let in_use: HashSet<String> = self.runtime.list_containers().await?.into_iter().map(|c| c.image_ref).collect();
        let pinned = |i: &cri::Image| i.pinned || i.repo_tags.iter().any(|t| self.node.pinned_images.contains(t));
        let present: Vec<(String, u64, bool)> = images.iter().map(|i| (i.id.clone(), i.size, pinned(i))).collect();
        let now = now_ns();
        let weighed = self.images.lock().expect("not poisoned").update(&present, &in_use, now);
        let mut freed = 0;
        for id in gc::images_to_free(&weighed, used, capacity, policy, now) {
            match self.runtime.remove_image(&id).await {
                Ok(()) => {
                    freed += images.iter().find(|i| i.id == id).map_or(0, |i| i.size);
                    tracing::info!(image = %id, "removed an unused image");
                }
                Err(e) => tracing::warn!(image = %id, error = %e, "removing an unused image"),
            }
        }
        Ok(freed)
    }

    async fn remove_sandbox(&self, id: &str) -> CriResult<()> {
        for step in [self.runtime.stop_pod_sandbox(id).await, self.runtime.remove_pod_sandbox(id).await] {
            match step {
                Ok(()) | Err(CriError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.sandbox_ips.lock().expect("not poisoned").remove(id);
        self.seen.lock().expect("not poisoned").retain(|_, v| v.sandbox_id != id);
        Ok(())
    }

    fn placement(&self, volumes: HashMap<String, PathBuf>, pod_ip: &str) -> Placement {
        Placement {
            cgroup_root: self.node.cgroup_root.clone(),
            log_root: self.node.log_root.clone(),
            volumes,
            cluster_dns: self.node.cluster_dns.clone(),
            node_name: self.node.node_name.clone(),
            host_ip: self.node.host_ip.clone(),
            pod_ip: pod_ip.to_string(),
        }
    }

    async fn start_sandbox(&self, pod: &Value, attempt: u32) -> CriResult<SandboxView> {
        let placement = self.placement(HashMap::new(), "");
        let log_dir = spec::log_directory(pod, &placement);
        std::fs::create_dir_all(&log_dir).map_err(|e| CriError::Failed(format!("{}: {e}", log_dir.display())))?;
        let config = spec::sandbox_config(pod, &placement, attempt);
        let id = self.runtime.run_pod_sandbox(config).await?;
        let status = self.runtime.pod_sandbox_status(&id).await?;
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        self.sandbox_ips.lock().expect("not poisoned").insert(id.clone(), ip.clone());
        Ok(SandboxView { id, attempt, ready: true, ip })
    }

    /// Pulls (by policy), configures, creates and starts one container; on failure, why it
    /// waits as kubelet words it.
    async fn start_container(
        &self,
        pod: &Value,
        sandbox: &SandboxView,
        name: &str,
        init: bool,
        attempt: u32,
    ) -> Result<String, Waiting> {
        let waiting = |reason: &str, message: String| Waiting { reason: reason.into(), message, until: 0 };
        let field = if init { "initContainers" } else { "containers" };
        let container = pod
            .pointer(&format!("/spec/{field}"))
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| str_at(c, "/name") == name))
            .ok_or_else(|| waiting("CreateContainerConfigError", format!("no container {name} in the pod")))?;
        let image = str_at(container, "/image");
        match self.ensure_image(image, str_at(container, "/imagePullPolicy")).await? {
            Some(took) => {
                self.event(pod, name, false, "Pulling", &format!("Pulling image {image:?}"));
                let message = format!("Successfully pulled image {image:?} in {:.3}s", took.as_secs_f64());
                self.event(pod, name, false, "Pulled", &message);
            }
            None => {
                let message = format!("Container image {image:?} already present on machine");
                self.event(pod, name, false, "Pulled", &message);
            }
        }
        let namespace = str_at(pod, "/metadata/namespace");
        let sources = self.volume_sources(pod).await;
        let dirs = volumes::prepare(pod, &self.node.pods_root, &sources)
            .map_err(|ConfigError(m)| waiting("CreateContainerConfigError", m))?;
        let refs = self.references(namespace, container).await;
        let placement = self.placement(dirs, &sandbox.ip);
        let config = spec::container_config(pod, container, attempt, init, &placement, &refs)
            .map_err(|ConfigError(m)| waiting("CreateContainerConfigError", m))?;
        let sandbox_config = spec::sandbox_config(pod, &placement, sandbox.attempt);
        let log_dir = spec::log_directory(pod, &placement).join(name);
        let _ = std::fs::create_dir_all(&log_dir);
        let id = self
            .runtime
            .create_container(&sandbox.id, config, sandbox_config)
            .await
            .map_err(|e| waiting("CreateContainerError", e.to_string()))?;
        self.event(pod, name, false, "Created", &format!("Created container {name}"));
        self.runtime.start_container(&id).await.map_err(|e| waiting("RunContainerError", e.to_string()))?;
        self.event(pod, name, false, "Started", &format!("Started container {name}"));
        Ok(id)
    }

    /// Makes the image present: `Never` only checks, `IfNotPresent` pulls when missing,
    /// `Always` pulls but, on a node with no registry, runs the image it has when the pull fails.
    /// Returns how long a pull took, None when the node's image was used.
    async fn ensure_image(&self, image: &str, policy: &str) -> Result<Option<Duration>, Waiting> {
        let waiting = |reason: &str, message: String| Waiting { reason: reason.into(), message, until: 0 };
        let started = std::time::Instant::now();
        let present = self.runtime.image_status(image).await.map_err(|e| waiting("ErrImagePull", e.to_string()))?;
        let policy = if policy.is_empty() {
            if image.ends_with(":latest") || !image.rsplit('/').next().unwrap_or(image).contains(':') {
                "Always"
            } else {
                "IfNotPresent"
            }
        } else {
            policy
        };
        match (policy, present.is_some()) {
            ("Never", false) => Err(waiting(
                "ErrImageNeverPull",
                format!("Container image {image:?} is not present with pull policy of Never"),
            )),
            ("Never", true) | ("IfNotPresent", true) => Ok(None),
            (_, present) => match self.runtime.pull_image(image).await {
                Ok(_) => Ok(Some(started.elapsed())),
                Err(e) if present => {
                    tracing::debug!(image, error = %e, "pull failed; using the image the node has");
                    Ok(None)
                }
                Err(e) => Err(waiting("ErrImagePull", e.to_string())),
            },
        }
    }

    async fn references(&self, namespace: &str, container: &Value) -> References {
        let mut refs = References::default();
        let mut wanted: Vec<(&str, String)> = Vec::new();
        for from in container.get("envFrom").and_then(Value::as_array).into_iter().flatten() {
            if let Some(n) = from.pointer("/configMapRef/name").and_then(Value::as_str) {
                wanted.push(("configmaps", n.to_string()));
            }
            if let Some(n) = from.pointer("/secretRef/name").and_then(Value::as_str) {
                wanted.push(("secrets", n.to_string()));
            }
        }
        for e in container.get("env").and_then(Value::as_array).into_iter().flatten() {
            if let Some(n) = e.pointer("/valueFrom/configMapKeyRef/name").and_then(Value::as_str) {
                wanted.push(("configmaps", n.to_string()));
            }
            if let Some(n) = e.pointer("/valueFrom/secretKeyRef/name").and_then(Value::as_str) {
                wanted.push(("secrets", n.to_string()));
            }
        }
        for (plural, name) in wanted {
            if let Some(obj) = self.lookup.get(plural, namespace, &name).await {
                let map = if plural == "configmaps" { &mut refs.config_maps } else { &mut refs.secrets };
                map.insert(name, obj);
            }
        }
        refs
    }

    async fn volume_sources(&self, pod: &Value) -> VolumeSources {
        let namespace = str_at(pod, "/metadata/namespace");
        let mut sources = VolumeSources { node: self.node.node_name.clone(), ..VolumeSources::default() };
        for v in pod.pointer("/spec/volumes").and_then(Value::as_array).into_iter().flatten() {
            if let Some(n) = v.pointer("/configMap/name").and_then(Value::as_str)
                && let Some(o) = self.lookup.get("configmaps", namespace, n).await
            {
                sources.config_maps.insert(n.into(), o);
            }
            if let Some(n) = v.pointer("/secret/secretName").and_then(Value::as_str)
                && let Some(o) = self.lookup.get("secrets", namespace, n).await
            {
                sources.secrets.insert(n.into(), o);
            }
            if let Some(n) = v.pointer("/persistentVolumeClaim/claimName").and_then(Value::as_str)
                && let Some(claim) = self.lookup.get("persistentvolumeclaims", namespace, n).await
            {
                let volume = str_at(&claim, "/spec/volumeName").to_string();
                if let Some(pv) = self.lookup.get("persistentvolumes", "", &volume).await {
                    sources.volumes.insert(volume, pv);
                }
                sources.claims.insert(n.into(), claim);
            }
        }
        sources
    }
}

fn record(events: &Mutex<Recorder>, involved: &Involved, warning: bool, reason: &str, message: &str) {
    let now = now_ns() / 1_000_000_000;
    events.lock().expect("not poisoned").record(involved, warning, reason, message, now);
}

/// A probe run in flight, and where its result goes.
struct ProbeJob {
    table: ProbeTable,
    events: Arc<Mutex<Recorder>>,
    wake: Arc<Notify>,
    key: (String, String, Kind),
    container_id: String,
    involved: Involved,
}

impl ProbeJob {
    fn finish(self, probe: &Probe, outcome: probe::Outcome) {
        let changed = {
            let mut table = self.table.lock().expect("not poisoned");
            // The container may have been replaced (or the pod removed) meanwhile.
            let Some(state) = table.get_mut(&self.key).filter(|s| s.container_id == self.container_id) else {
                return;
            };
            state.record(probe, outcome.is_ok(), outcome.clone().err().unwrap_or_default())
        };
        if let Err(message) = &outcome {
            tracing::debug!(container = %self.key.1, kind = ?self.key.2, message, "probe failed");
            let text = format!("{} probe failed: {message}", probe.kind.title());
            record(&self.events, &self.involved, true, "Unhealthy", &text);
        }
        if changed {
            self.wake.notify_one();
        }
    }
}

fn image_of<'a>(pod: &'a Value, name: &str) -> &'a str {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|f| pod.pointer(&format!("/spec/{f}")).and_then(Value::as_array))
        .flatten()
        .find(|c| str_at(c, "/name") == name)
        .map_or("", |c| str_at(c, "/image"))
}

/// The pod's grace period for stopping its containers.
pub fn grace_period(pod: &Value) -> Duration {
    let seconds = pod
        .pointer("/metadata/deletionGracePeriodSeconds")
        .or_else(|| pod.pointer("/spec/terminationGracePeriodSeconds"))
        .and_then(Value::as_i64)
        .unwrap_or(corral_api::deletion::DEFAULT_POD_GRACE_SECONDS);
    Duration::from_secs(seconds.max(0) as u64)
}

fn container_view(c: &cri::Container, status: &cri::ContainerStatus) -> ContainerView {
    let mut v = view_of_status(&c.pod_sandbox_id, status, c.labels.contains_key(spec::INIT_CONTAINER));
    if v.hash.is_empty() {
        v.hash = c.annotations.get(spec::SPEC_HASH).cloned().unwrap_or_default();
    }
    v
}

fn view_of_status(sandbox_id: &str, status: &cri::ContainerStatus, init: bool) -> ContainerView {
    let state = match cri::ContainerState::try_from(status.state) {
        Ok(cri::ContainerState::ContainerCreated) => State::Created,
        Ok(cri::ContainerState::ContainerRunning) => State::Running,
        Ok(cri::ContainerState::ContainerExited) => State::Exited,
        _ => State::Unknown,
    };
    ContainerView {
        id: status.id.clone(),
        sandbox_id: sandbox_id.to_string(),
        name: status.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
        attempt: status.metadata.as_ref().map_or(0, |m| m.attempt),
        init,
        state,
        exit_code: status.exit_code,
        reason: status.reason.clone(),
        message: status.message.clone(),
        started_at: status.started_at,
        finished_at: status.finished_at,
        image_ref: status.image_ref.clone(),
        hash: status.annotations.get(spec::SPEC_HASH).cloned().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeRuntime;
    use serde_json::json;

    struct Nothing;

    impl Lookup for Nothing {
        async fn get(&self, _: &str, _: &str, _: &str) -> Option<Value> {
            None
        }
    }

    fn fake_worker(root: &std::path::Path) -> Worker<FakeRuntime, Nothing> {
        let node = NodeConfig {
            node_name: "n1".into(),
            host_ip: "10.0.0.1".into(),
            cgroup_root: "/corral/n1".into(),
            log_root: root.join("logs"),
            pods_root: root.join("pods"),
            cluster_dns: None,
            pinned_images: Vec::new(),
        };
        Worker::new(Arc::new(FakeRuntime::with_images(&["busybox"])), Arc::new(Nothing), node)
    }

    async fn sync(worker: &Worker<FakeRuntime, Nothing>, pod: &Value) -> Value {
        let views = worker.observe().await.unwrap();
        let uid = str_at(pod, "/metadata/uid");
        worker.sync_pod(pod, &views.get(uid).cloned().unwrap_or_default()).await
    }

    #[tokio::test]
    async fn a_pod_runs_on_the_fake_runtime_and_terminates() {
        let root = tempfile::tempdir().unwrap();
        let worker = fake_worker(root.path());
        let pod = json!({"metadata": {"name": "p", "namespace": "default", "uid": "u1"},
                         "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]}});
        // Round one starts the sandbox and the container; round two sees them.
        sync(&worker, &pod).await;
        let status = sync(&worker, &pod).await;
        assert_eq!(status["phase"], "Running", "{status:#}");
        assert!(status["podIP"].as_str().unwrap().starts_with("10.88."));
        assert_eq!(status["containerStatuses"][0]["imageID"], format!("sha256:{:064x}", 1));

        let views = worker.observe().await.unwrap();
        worker.terminate("u1", &views["u1"], Duration::from_secs(1), None).await.unwrap();
        assert!(worker.observe().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn image_collection_spares_pinned_and_used_images() {
        let root = tempfile::tempdir().unwrap();
        let mut worker = fake_worker(root.path());
        worker.runtime = Arc::new(FakeRuntime::with_images(&["busybox", "nginx", "pause"]));
        worker.node.pinned_images = vec!["docker.io/library/pause:latest".into()];
        let pod = json!({"metadata": {"name": "p", "namespace": "default", "uid": "u3"},
                         "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]}});
        sync(&worker, &pod).await;
        // Every byte over the threshold, and no minimum age: all that may go, goes.
        let policy = GcPolicy { high_percent: 0, low_percent: 0, min_image_age: Duration::ZERO };
        worker.collect_images(&policy).await.unwrap();
        let left: Vec<String> =
            worker.runtime.list_images().await.unwrap().into_iter().flat_map(|i| i.repo_tags).collect();
        assert_eq!(left, ["docker.io/library/busybox:latest", "docker.io/library/pause:latest"], "nginx was unused");
        assert_eq!(worker.collect_containers().await.unwrap(), 0, "nothing dead yet");
    }

    #[tokio::test]
    async fn an_image_no_registry_has_waits_in_err_image_pull_then_back_off() {
        let root = tempfile::tempdir().unwrap();
        let worker = fake_worker(root.path());
        let pod = json!({"metadata": {"name": "p", "namespace": "default", "uid": "u2"},
                         "spec": {"containers": [{"name": "c", "image": "example.invalid/app:2"}]}});
        sync(&worker, &pod).await;
        let status = sync(&worker, &pod).await;
        let waiting = &status["containerStatuses"][0]["state"]["waiting"];
        assert_eq!(waiting["reason"], "ErrImagePull", "{status:#}");
        assert!(waiting["message"].as_str().unwrap().contains("no registry reachable"));
        assert_eq!(status["phase"], "Pending");
    }
}
