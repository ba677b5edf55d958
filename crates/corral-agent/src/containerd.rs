//! One containerd per node: its config (own root, state and socket, so several run on one
//! machine; the CRI settings this machine needs), the CNI bridge config from the node's pod
//! CIDR, starting it detached (it outlives an agent that is killed, and so do the pods),
//! and importing image archives.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cri::{CriClient, Runtime};

/// The files of one containerd, all under `dir`.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
    /// The sandbox image (imported from the images directory, never pulled).
    pub sandbox_image: String,
    pub cni_bin_dir: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            sandbox_image: corral_image::PAUSE_IMAGE.into(),
            cni_bin_dir: "/usr/lib/cni".into(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("containerd.pid")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// containerd's config (version 2, containerd 1.6 and 1.7).
    pub fn config(&self) -> String {
        let d = self.dir.display();
        format!(
            r#"# Written by corral agent: one containerd per node.
version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  # This machine's kernel refuses lowering oom_score_adj below the runtime's own.
  restrict_oom_score_adj = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"#,
            socket = self.socket().display(),
            sandbox = self.sandbox_image,
            cni_bin = self.cni_bin_dir.display(),
            cni_conf = self.cni_conf_dir().display(),
        )
    }
}

/// A CNI config for one node: a bridge with host-local addresses from the pod CIDR, and
/// portmap for hostPorts.
pub fn cni_bridge_config(bridge: &str, subnet: &str, ip_masq: bool, data_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "corral",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": ip_masq,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": data_dir.display().to_string(),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
    .to_string()
}

/// Makes the node's bridge with its gateway address (`10.244.1.1/24`) if it is not there,
/// before any pod: the node's DNS answers on that address from the start. The CNI bridge
/// plugin takes the bridge as it finds it.
pub fn ensure_bridge(bridge: &str, gateway_cidr: &str) -> Result<(), ContainerdError> {
    let ip = |args: &[&str]| -> Result<std::process::Output, ContainerdError> {
        std::process::Command::new("ip").args(args).output().map_err(|e| ContainerdError::Io("running ip".into(), e))
    };
    let exists = ip(&["link", "show", bridge])?.status.success();
    if !exists {
        let out = ip(&["link", "add", bridge, "type", "bridge"])?;
        if !out.status.success() && !ip(&["link", "show", bridge])?.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(ContainerdError::Io(format!("creating bridge {bridge}"), std::io::Error::other(why)));
        }
    }
    for args in [["addr", "replace", gateway_cidr, "dev", bridge].as_slice(), &["link", "set", bridge, "up"]] {
        let out = ip(args)?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(ContainerdError::Io(format!("ip {}", args.join(" ")), std::io::Error::other(why)));
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("containerd did not answer on {socket} within {waited:?}; its log: {log}")]
    NotReady { socket: String, waited: Duration, log: String },
    #[error("importing {archive}: {message}")]
    Import { archive: String, message: String },
}

/// Writes the config and starts containerd unless one already answers on the socket.
/// containerd runs in its own session, so it (and every pod) outlives the agent.
pub async fn ensure_running(
    layout: &Layout,
    cni_config: &str,
    timeout: Duration,
) -> Result<CriClient, ContainerdError> {
    let io = |p: &Path, e| ContainerdError::Io(p.display().to_string(), e);
    std::fs::create_dir_all(layout.cni_conf_dir()).map_err(|e| io(&layout.cni_conf_dir(), e))?;
    std::fs::write(layout.config_file(), layout.config()).map_err(|e| io(&layout.config_file(), e))?;
    let cni = layout.cni_conf_dir().join("10-corral.conflist");
    std::fs::write(&cni, cni_config).map_err(|e| io(&cni, e))?;
    let client = CriClient::new(&layout.socket()).map_err(|e| io(&layout.socket(), std::io::Error::other(e)))?;
    if client.version().await.is_ok() {
        return Ok(client);
    }
    let log = std::fs::File::create(layout.log_file()).map_err(|e| io(&layout.log_file(), e))?;
    let mut command = Command::new("containerd");
    command
        .arg("--config")
        .arg(layout.config_file())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| io(&layout.log_file(), e))?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it only detaches the child from our session.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| io(Path::new("containerd"), e))?;
    std::fs::write(layout.pid_file(), child.id().to_string()).map_err(|e| io(&layout.pid_file(), e))?;
    let started = Instant::now();
    while started.elapsed() < timeout {
        if client.version().await.is_ok() {
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(layout.log_file()).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(5).collect();
    Err(ContainerdError::NotReady {
        socket: layout.socket().display().to_string(),
        waited: timeout,
        log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    })
}

/// The pid of the containerd `ensure_running` started, if it is still alive.
pub fn running_pid(layout: &Layout) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(layout.pid_file()).ok()?.trim().parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    // A zombie has exited; a pid reused by another program is not ours.
    let zombie = stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'));
    let ours = String::from_utf8_lossy(&cmdline).contains("containerd");
    (!zombie && ours).then_some(pid)
}

/// Ends everything a node's containerd runs, then containerd itself: kills every task,
/// stops and removes every sandbox (their network namespaces and mounts go with them) while
/// containerd still answers, then stops containerd (by the pid it was started with).
/// Blocking; safe to call from inside a runtime, and when containerd is not running.
pub fn teardown(layout: &Layout) {
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .arg("--address")
            .arg(layout.socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    if layout.socket().exists() {
        for task in ctr(&["tasks", "ls", "-q"]).lines() {
            ctr(&["tasks", "kill", "--signal", "SIGKILL", task]);
        }
        // A thread and runtime of its own: the caller may be inside a runtime that cannot block.
        let socket = layout.socket();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let Ok(client) = CriClient::new(&socket) else { return };
                let Ok(Ok(sandboxes)) = tokio::time::timeout(Duration::from_secs(5), client.list_pod_sandboxes()).await
                else {
                    return;
                };
                for s in sandboxes {
                    let _ = client.stop_pod_sandbox(&s.id).await;
                    let _ = client.remove_pod_sandbox(&s.id).await;
                }
            });
        })
        .join();
    }
    if let Some(pid) = running_pid(layout) {
        // SAFETY: the pid is the containerd `ensure_running` started, from its pid file.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while running_pid(layout).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if running_pid(layout).is_some() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Imports an OCI archive into the CRI's image namespace (with containerd's own `ctr`).
/// Imports one archive; returns the references it named (`docker.io/library/busybox:latest`).
pub fn import(layout: &Layout, archive: &Path) -> Result<Vec<String>, ContainerdError> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(layout.socket())
        .args(["--namespace", "k8s.io", "images", "import"])
        .arg(archive)
        .output()
        .map_err(|e| ContainerdError::Io("ctr".into(), e))?;
    if !out.status.success() {
        return Err(ContainerdError::Import {
            archive: archive.display().to_string(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(imported_refs(&String::from_utf8_lossy(&out.stdout)))
}

/// The references in ctr's import output: `unpacking <ref> (sha256:...)...done`.
fn imported_refs(output: &str) -> Vec<String> {
    output.lines().filter_map(|l| l.strip_prefix("unpacking ")?.split(" (").next()).map(str::to_string).collect()
}

/// Imports every `*.tar` in `dir`; returns the references imported.
pub fn import_all(layout: &Layout, dir: &Path) -> Result<Vec<String>, ContainerdError> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut archives: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .collect();
    archives.sort();
    let mut refs = Vec::new();
    for a in &archives {
        refs.extend(import(layout, a)?);
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keeps_everything_under_the_nodes_directory() {
        let layout = Layout::new(Path::new("/var/lib/corral/n1/containerd"));
        let config = layout.config();
        for line in [
            r#"root = "/var/lib/corral/n1/containerd/root""#,
            r#"address = "/var/lib/corral/n1/containerd/containerd.sock""#,
            "restrict_oom_score_adj = true",
            r#"sandbox_image = "registry.k8s.io/pause:3.9""#,
            r#"conf_dir = "/var/lib/corral/n1/containerd/cni""#,
        ] {
            assert!(config.contains(line), "{line}\n{config}");
        }
        let cni: serde_json::Value =
            serde_json::from_str(&cni_bridge_config("corral0", "10.244.1.0/24", true, Path::new("/d"))).unwrap();
        assert_eq!(cni["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(cni["plugins"][1]["type"], "portmap");
    }

    #[test]
    fn imported_references_are_read_from_ctr() {
        let out = "unpacking docker.io/library/busybox:latest (sha256:ec)...done\nunpacking docker.io/library/busybox:1.35 (sha256:ec)...done\n";
        assert_eq!(imported_refs(out), ["docker.io/library/busybox:latest", "docker.io/library/busybox:1.35"]);
    }
}
