//! An in-process container runtime for unit and scale tests. It models what pod sync relies
//! on: images present or pullable, sandboxes with an IP, containers whose command decides how
//! they run (`exit N` exits with N, `sleep N` runs N seconds, anything else runs until
//! stopped; a `while` loop without `sleep` keeps one core busy, as a shell busy loop would),
//! stop and removal, exec of `echo`, and usage stats. `conformance::run` holds it and containerd
//! to the same behaviour.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use corral_proto::cri;

use crate::cri::{CriError, CriResult, ExecOutput, Runtime};
use crate::sync::now_ns;

#[derive(Clone, Debug)]
struct Sandbox {
    config: cri::PodSandboxConfig,
    ready: bool,
    ip: String,
    created_at: i64,
}

#[derive(Clone, Debug)]
enum Behaviour {
    Exit(i32),
    RunFor(i64),
    Forever,
}

#[derive(Clone, Debug)]
struct Container {
    sandbox_id: String,
    config: cri::ContainerConfig,
    image_ref: String,
    created_at: i64,
    started_at: i64,
    /// Set once stopped (or when its behaviour ends): (finished_at, exit code).
    stopped: Option<(i64, i32)>,
    behaviour: Behaviour,
    /// Uses a whole core while it runs.
    busy: bool,
}

/// Memory a running fake container uses.
const FAKE_WORKING_SET: u64 = 1 << 20;

#[derive(Default)]
struct State {
    images: BTreeMap<String, String>,
    pullable: HashSet<String>,
    sandboxes: HashMap<String, Sandbox>,
    containers: HashMap<String, Container>,
    next_id: u64,
    next_ip: u32,
}

/// The fake runtime. Clock: the system's, so CRI timestamps compare with the agent's.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

/// `busybox` and `docker.io/library/busybox:latest` name the same image, as in containerd.
fn normalize(image: &str) -> String {
    let with_tag = if image.rsplit('/').next().unwrap_or(image).contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    };
    match with_tag.split_once('/') {
        Some((host, _)) if host.contains('.') || host.contains(':') || host == "localhost" => with_tag,
        Some(_) => format!("docker.io/{with_tag}"),
        None => format!("docker.io/library/{with_tag}"),
    }
}

impl FakeRuntime {
    /// A runtime that has these images.
    pub fn with_images(images: &[&str]) -> Self {
        let fake = Self::default();
        {
            let mut s = fake.state.lock().expect("not poisoned");
            for (i, image) in images.iter().enumerate() {
                s.images.insert(normalize(image), format!("sha256:{:064x}", i + 1));
            }
        }
        fake
    }

    /// Images a pull can fetch (as a registry would serve them).
    pub fn allow_pull(&self, image: &str) {
        self.state.lock().expect("not poisoned").pullable.insert(normalize(image));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        let mut s = self.state.lock().expect("not poisoned");
        // Containers whose behaviour has run its course exit now.
        let now = now_ns();
        for c in s.containers.values_mut() {
            if c.started_at == 0 || c.stopped.is_some() {
                continue;
            }
            match c.behaviour {
                Behaviour::Exit(code) => c.stopped = Some((c.started_at, code)),
                Behaviour::RunFor(ns) if now >= c.started_at + ns => c.stopped = Some((c.started_at + ns, 0)),
                _ => {}
            }
        }
        s
    }
}

fn behaviour(config: &cri::ContainerConfig) -> Behaviour {
    let words: Vec<&str> = config.command.iter().chain(config.args.iter()).flat_map(|w| w.split_whitespace()).collect();
    let after = |word: &str| words.iter().position(|w| *w == word).and_then(|i| words.get(i + 1));
    if let Some(code) = after("exit").and_then(|c| c.parse().ok()) {
        return Behaviour::Exit(code);
    }
    if let Some(secs) = after("sleep").and_then(|s| s.parse::<f64>().ok()) {
        return Behaviour::RunFor((secs * 1e9) as i64);
    }
    Behaviour::Forever
}

fn container_state(c: &Container) -> cri::ContainerState {
    match (c.started_at, c.stopped) {
        (_, Some(_)) => cri::ContainerState::ContainerExited,
        (0, None) => cri::ContainerState::ContainerCreated,
        _ => cri::ContainerState::ContainerRunning,
    }
}

impl Runtime for FakeRuntime {
    async fn version(&self) -> CriResult<cri::VersionResponse> {
        Ok(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "fake".into(),
            runtime_version: "1".into(),
            runtime_api_version: "v1".into(),
        })
    }

    async fn run_pod_sandbox(&self, config: cri::PodSandboxConfig) -> CriResult<String> {
        let mut s = self.lock();
        s.next_id += 1;
        s.next_ip += 1;
        let id = format!("sandbox-{:06}", s.next_id);
        let ip = format!("10.88.{}.{}", s.next_ip / 250, s.next_ip % 250 + 2);
        s.sandboxes.insert(id.clone(), Sandbox { config, ready: true, ip, created_at: now_ns() });
        Ok(id)
    }

    async fn stop_pod_sandbox(&self, id: &str) -> CriResult<()> {
        let mut s = self.lock();
        let sandbox = s.sandboxes.get_mut(id).ok_or_else(|| CriError::NotFound(format!("sandbox {id}")))?;
        sandbox.ready = false;
        let now = now_ns();
        for c in s.containers.values_mut().filter(|c| c.sandbox_id == id && c.stopped.is_none() && c.started_at > 0) {
            c.stopped = Some((now, 137));
        }
        Ok(())
    }

    async fn remove_pod_sandbox(&self, id: &str) -> CriResult<()> {
        let mut s = self.lock();
        s.sandboxes.remove(id);
        s.containers.retain(|_, c| c.sandbox_id != id);
        Ok(())
    }

    async fn pod_sandbox_status(&self, id: &str) -> CriResult<cri::PodSandboxStatus> {
        let s = self.lock();
        let sb = s.sandboxes.get(id).ok_or_else(|| CriError::NotFound(format!("sandbox {id}")))?;
        let state = if sb.ready { cri::PodSandboxState::SandboxReady } else { cri::PodSandboxState::SandboxNotready };
        Ok(cri::PodSandboxStatus {
            id: id.into(),
            metadata: sb.config.metadata.clone(),
            state: state as i32,
            created_at: sb.created_at,
            network: Some(cri::PodSandboxNetworkStatus { ip: sb.ip.clone(), ..Default::default() }),
            labels: sb.config.labels.clone(),
            annotations: sb.config.annotations.clone(),
            ..Default::default()
        })
    }

    async fn list_pod_sandboxes(&self) -> CriResult<Vec<cri::PodSandbox>> {
        let s = self.lock();
        Ok(s.sandboxes
            .iter()
            .map(|(id, sb)| cri::PodSandbox {
                id: id.clone(),
                metadata: sb.config.metadata.clone(),
                state: if sb.ready { cri::PodSandboxState::SandboxReady } else { cri::PodSandboxState::SandboxNotready }
                    as i32,
                created_at: sb.created_at,
                labels: sb.config.labels.clone(),
                annotations: sb.config.annotations.clone(),
                ..Default::default()
            })
            .collect())
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        _sandbox: cri::PodSandboxConfig,
    ) -> CriResult<String> {
        let mut s = self.lock();
        if !s.sandboxes.get(sandbox_id).is_some_and(|sb| sb.ready) {
            return Err(CriError::NotFound(format!("sandbox {sandbox_id} is not ready")));
        }
        let image = normalize(&config.image.as_ref().map(|i| i.image.clone()).unwrap_or_default());
        let image_ref = s.images.get(&image).cloned().ok_or_else(|| {
            CriError::NotFound(format!("failed to create containerd container: get image {image:?}: not found"))
        })?;
        s.next_id += 1;
        let id = format!("container-{:06}", s.next_id);
        let behaviour = behaviour(&config);
        let words = config.command.iter().chain(config.args.iter()).cloned().collect::<Vec<_>>().join(" ");
        let busy = words.contains("while") && !words.contains("sleep");
        s.containers.insert(
            id.clone(),
            Container {
                sandbox_id: sandbox_id.into(),
                config,
                image_ref,
                created_at: now_ns(),
                started_at: 0,
                stopped: None,
                behaviour,
                busy,
            },
        );
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> CriResult<()> {
        let mut s = self.lock();
        let c = s.containers.get_mut(id).ok_or_else(|| CriError::NotFound(format!("container {id}")))?;
        if c.started_at != 0 {
            return Err(CriError::Failed(format!("container {id} was started already")));
        }
        c.started_at = now_ns();
        Ok(())
    }

    async fn stop_container(&self, id: &str, _timeout: Duration) -> CriResult<()> {
        let mut s = self.lock();
        let c = s.containers.get_mut(id).ok_or_else(|| CriError::NotFound(format!("container {id}")))?;
        if c.stopped.is_none() {
            c.stopped = Some((now_ns(), 137));
        }
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> CriResult<()> {
        self.lock().containers.remove(id);
        Ok(())
    }

    async fn list_containers(&self) -> CriResult<Vec<cri::Container>> {
        let s = self.lock();
        Ok(s.containers
            .iter()
            .map(|(id, c)| cri::Container {
                id: id.clone(),
                pod_sandbox_id: c.sandbox_id.clone(),
                metadata: c.config.metadata.clone(),
                image: c.config.image.clone(),
                image_ref: c.image_ref.clone(),
                state: container_state(c) as i32,
                created_at: c.created_at,
                labels: c.config.labels.clone(),
                annotations: c.config.annotations.clone(),
            })
            .collect())
    }

    async fn container_status(&self, id: &str) -> CriResult<cri::ContainerStatus> {
        let s = self.lock();
        let c = s.containers.get(id).ok_or_else(|| CriError::NotFound(format!("container {id}")))?;
        let (finished_at, exit_code) = c.stopped.unwrap_or((0, 0));
        Ok(cri::ContainerStatus {
            id: id.into(),
            metadata: c.config.metadata.clone(),
            state: container_state(c) as i32,
            created_at: c.created_at,
            started_at: c.started_at,
            finished_at,
            exit_code,
            image: c.config.image.clone(),
            image_ref: c.image_ref.clone(),
            reason: match c.stopped {
                Some((_, 0)) => "Completed".into(),
                Some(_) => "Error".into(),
                None => String::new(),
            },
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
            log_path: c.config.log_path.clone(),
            ..Default::default()
        })
    }

    async fn exec_sync(&self, id: &str, command: Vec<String>, _timeout: Duration) -> CriResult<ExecOutput> {
        let s = self.lock();
        let c = s.containers.get(id).ok_or_else(|| CriError::NotFound(format!("container {id}")))?;
        if container_state(c) != cri::ContainerState::ContainerRunning {
            return Err(CriError::Failed(format!("container {id} is not running")));
        }
        let words: Vec<&str> = command.iter().flat_map(|w| w.split_whitespace()).collect();
        let out = match words.iter().position(|w| *w == "echo") {
            Some(i) => format!("{}\n", words[i + 1..].join(" ")).into_bytes(),
            None => Vec::new(),
        };
        let exit_code =
            words.iter().position(|w| *w == "exit").and_then(|i| words.get(i + 1)?.parse().ok()).unwrap_or(0);
        Ok(ExecOutput { stdout: out, stderr: Vec::new(), exit_code })
    }

    async fn stream_url(&self, _request: crate::cri::StreamRequest) -> CriResult<String> {
        Err(CriError::Failed("the fake runtime has no streaming server".into()))
    }

    async fn image_status(&self, image: &str) -> CriResult<Option<cri::Image>> {
        let s = self.lock();
        let name = normalize(image);
        Ok(s.images.get(&name).map(|id| cri::Image { id: id.clone(), repo_tags: vec![name], ..Default::default() }))
    }

    async fn pull_image(&self, image: &str) -> CriResult<String> {
        let mut s = self.lock();
        let name = normalize(image);
        if let Some(id) = s.images.get(&name) {
            if s.pullable.contains(&name) {
                return Ok(id.clone());
            }
        } else if s.pullable.contains(&name) {
            let id = format!("sha256:{:064x}", s.images.len() + 1000);
            s.images.insert(name, id.clone());
            return Ok(id);
        }
        Err(CriError::Failed(format!(
            "failed to pull and unpack image {name:?}: failed to resolve reference {name:?}: no registry reachable"
        )))
    }

    async fn list_images(&self) -> CriResult<Vec<cri::Image>> {
        let s = self.lock();
        Ok(s.images
            .iter()
            .map(|(name, id)| cri::Image { id: id.clone(), repo_tags: vec![name.clone()], ..Default::default() })
            .collect())
    }

    async fn remove_image(&self, image: &str) -> CriResult<()> {
        // By name, or by id with every name it has, as containerd does.
        let name = normalize(image);
        self.lock().images.retain(|n, id| *n != name && id != image);
        Ok(())
    }

    async fn image_fs_mountpoint(&self) -> CriResult<std::path::PathBuf> {
        Ok(std::env::temp_dir())
    }

    async fn status(&self) -> CriResult<cri::RuntimeStatus> {
        let ready = |kind: &str| cri::RuntimeCondition { r#type: kind.into(), status: true, ..Default::default() };
        Ok(cri::RuntimeStatus { conditions: vec![ready("RuntimeReady"), ready("NetworkReady")] })
    }

    async fn list_container_stats(&self) -> CriResult<Vec<cri::ContainerStats>> {
        let s = self.lock();
        let now = now_ns();
        Ok(s.containers
            .iter()
            .map(|(id, c)| {
                let running = c.started_at > 0 && c.stopped.is_none();
                let end = c.stopped.map_or(now, |(at, _)| at);
                let cpu = if c.busy && c.started_at > 0 { (end - c.started_at).max(0) as u64 } else { 0 };
                cri::ContainerStats {
                    attributes: Some(cri::ContainerAttributes {
                        id: id.clone(),
                        metadata: c.config.metadata.clone(),
                        labels: c.config.labels.clone(),
                        annotations: c.config.annotations.clone(),
                    }),
                    cpu: Some(cri::CpuUsage {
                        timestamp: now,
                        usage_core_nano_seconds: Some(cri::UInt64Value { value: cpu }),
                        usage_nano_cores: None,
                    }),
                    memory: Some(cri::MemoryUsage {
                        timestamp: now,
                        working_set_bytes: Some(cri::UInt64Value { value: if running { FAKE_WORKING_SET } else { 0 } }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_image_names_are_docker_hub_library_images() {
        assert_eq!(normalize("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(normalize("nginx:1.27"), "docker.io/library/nginx:1.27");
        assert_eq!(normalize("registry.k8s.io/pause:3.9"), "registry.k8s.io/pause:3.9");
        assert_eq!(normalize("user/app"), "docker.io/user/app:latest");
    }

    #[tokio::test]
    async fn the_fake_passes_the_runtime_conformance_suite() {
        let fake = FakeRuntime::with_images(&["busybox", "registry.k8s.io/pause:3.9"]);
        crate::conformance::run(&fake).await.unwrap();
    }
}
