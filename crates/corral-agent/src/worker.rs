//! Runs pod sync against a real runtime: observes what the runtime has (`observe`), carries
//! out `sync::plan`'s actions for a pod (images, volumes, sandboxes, containers), terminates
//! pods with their grace period, and computes the status to report.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_proto::cri;
use serde_json::Value;

use crate::cri::{CriError, CriResult, Runtime};
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
}

impl<R: Runtime, L: Lookup> Worker<R, L> {
    pub fn new(runtime: Arc<R>, lookup: Arc<L>, node: NodeConfig) -> Self {
        Self {
            runtime,
            lookup,
            node,
            memory: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            sandbox_ips: Mutex::new(HashMap::new()),
        }
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
        for _round in 0..2 {
            let actions = sync::plan(pod, &view, &mut memory, now);
            let started_sandbox = actions.iter().any(|a| matches!(a, Action::StartSandbox { .. }));
            for action in actions {
                let span = tracing::info_span!("pod", pod = %str_at(pod, "/metadata/name"), uid = %uid, ?action);
                let _enter = span.enter();
                if !self.act(pod, action, &mut view, &mut memory, now).await {
                    break;
                }
            }
            if !started_sandbox || !view.sandbox().is_some_and(|s| s.ready) {
                break;
            }
        }
        let status = sync::pod_status(pod, &view, &memory, &self.node.host_ip, now);
        self.memory.lock().expect("not poisoned").insert(uid, memory);
        status
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
                        tracing::info!(container = %name, reason = %waiting.reason, message = %waiting.message, "not started");
                        let pulling = |r: &str| r == "ErrImagePull" || r == "ImagePullBackOff";
                        let retry = if pulling(&waiting.reason) { PULL_BACKOFF_NS } else { CONFIG_RETRY_NS };
                        let again = memory.waiting.get(&name).is_some_and(|w| pulling(&w.reason));
                        let (reason, message) = if again && waiting.reason == "ErrImagePull" {
                            let image = image_of(pod, &name);
                            (
                                "ImagePullBackOff".to_string(),
                                format!("Back-off pulling image {image:?}: {}", waiting.message),
                            )
                        } else {
                            (waiting.reason, waiting.message)
                        };
                        memory.waiting.insert(name.clone(), Waiting { reason, message, until: now + retry });
                    }
                }
            }
            Action::KillContainer { id, name, why } => {
                tracing::info!(container = %name, why, "killing");
                if let Err(e) = self.runtime.stop_container(&id, grace_period(pod)).await {
                    tracing::warn!(error = %e, "stopping a container");
                }
            }
        }
        true
    }

    /// Stops every container of the pod within `grace` (SIGTERM, then SIGKILL), then its
    /// sandboxes, and removes them and the pod's volume directories.
    pub async fn terminate(&self, uid: &str, view: &PodView, grace: Duration) -> CriResult<()> {
        let stops = view
            .containers
            .iter()
            .filter(|c| matches!(c.state, State::Running | State::Created))
            .map(|c| self.runtime.stop_container(&c.id, grace));
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
        if let Err(e) = volumes::cleanup(&self.node.pods_root, uid) {
            tracing::warn!(uid, error = %e, "removing the pod's volumes");
        }
        Ok(())
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
        self.ensure_image(image, str_at(container, "/imagePullPolicy")).await?;
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
        self.runtime.start_container(&id).await.map_err(|e| waiting("RunContainerError", e.to_string()))?;
        Ok(id)
    }

    /// Makes the image present: `Never` only checks, `IfNotPresent` pulls when missing,
    /// `Always` pulls but, on a node with no registry, runs the image it has when the pull fails.
    async fn ensure_image(&self, image: &str, policy: &str) -> Result<(), Waiting> {
        let waiting = |reason: &str, message: String| Waiting { reason: reason.into(), message, until: 0 };
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
            ("Never", true) | ("IfNotPresent", true) => Ok(()),
            (_, present) => match self.runtime.pull_image(image).await {
                Ok(_) => Ok(()),
                Err(e) if present => {
                    tracing::debug!(image, error = %e, "pull failed; using the image the node has");
                    Ok(())
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
        let mut sources = VolumeSources::default();
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
        worker.terminate("u1", &views["u1"], Duration::from_secs(1)).await.unwrap();
        assert!(worker.observe().await.unwrap().is_empty());
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
