//! The agent's Node object: what the machine has (`Facts`, read from /proc and the runtime)
//! and the status kubelet would write from it (`node_object`), with conditions whose
//! transition times only move when their status does.

use std::path::Path;

use serde_json::{Value, json};

/// Pods a node takes, as kubelet's default --max-pods.
pub const MAX_PODS: u32 = 110;
/// Memory below this is pressure (kubelet's default hard eviction threshold).
const MEMORY_PRESSURE_BYTES: u64 = 100 << 20;
/// Free disk below this share of the node's filesystem is pressure (kubelet: nodefs 10%).
const DISK_PRESSURE_PERCENT: u64 = 10;

/// What the machine and its runtime are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    pub node_name: String,
    pub host_ip: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_bytes: u64,
    pub disk_available_bytes: u64,
    pub pids_max: u64,
    pub pids_used: u64,
    pub kernel: String,
    pub os_image: String,
    pub machine_id: String,
    pub boot_id: String,
    /// `containerd://1.6.20`, from the runtime's CRI version.
    pub runtime_version: String,
    pub labels: Vec<(String, String)>,
    /// The filesystem pods' data lives on (ephemeral storage).
    pub data_dir: std::path::PathBuf,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default().trim().to_string()
}

fn meminfo(field: &str) -> u64 {
    read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Total and available bytes of the filesystem holding `path` (zeros when unreadable).
fn statvfs(path: &Path) -> (u64, u64) {
    crate::gc::filesystem_usage(path).map_or((0, 0), |(used, total)| (total, total - used))
}

impl Facts {
    /// Reads the machine's facts now; `data_dir` is the filesystem pods' data lives on.
    pub fn gather(node_name: &str, host_ip: &str, data_dir: &Path, runtime_version: &str) -> Self {
        let os_image = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
            .unwrap_or_else(|| "Linux".into());
        let mut facts = Facts {
            node_name: node_name.to_string(),
            host_ip: host_ip.to_string(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_bytes: meminfo("MemTotal"),
            memory_available_bytes: 0,
            disk_bytes: 0,
            disk_available_bytes: 0,
            pids_max: read("/proc/sys/kernel/pid_max").parse().unwrap_or(32768),
            pids_used: 0,
            kernel: read("/proc/sys/kernel/osrelease"),
            os_image,
            machine_id: read("/etc/machine-id"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            runtime_version: runtime_version.to_string(),
            labels: Vec::new(),
            data_dir: data_dir.to_path_buf(),
        };
        facts.refresh();
        facts
    }

    /// Reads again what changes while the node runs: free memory, disk and pids.
    pub fn refresh(&mut self) {
        self.memory_available_bytes = meminfo("MemAvailable");
        (self.disk_bytes, self.disk_available_bytes) = statvfs(&self.data_dir);
        self.pids_used = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten().filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit())).count()
            })
            .unwrap_or(0) as u64;
    }
}

fn condition(kind: &str, pressure: bool, reason_ok: &str, reason_bad: &str, message: &str, now: &str) -> Value {
    let (status, reason) = if pressure { ("True", reason_bad) } else { ("False", reason_ok) };
    json!({"type": kind, "status": status, "reason": reason, "message": message,
           "lastHeartbeatTime": now, "lastTransitionTime": now})
}

/// The Node as the agent reports it (labels and status; the spec is the cluster's).
pub fn node_object(f: &Facts, version: &str, now: &str) -> Value {
    let memory_pressure = f.memory_available_bytes > 0 && f.memory_available_bytes < MEMORY_PRESSURE_BYTES;
    let disk_pressure = f.disk_bytes > 0 && f.disk_available_bytes * 100 < f.disk_bytes * DISK_PRESSURE_PERCENT;
    let pid_pressure = f.pids_max > 0 && f.pids_used * 100 > f.pids_max * 90;
    let mut labels = json!({
        "kubernetes.io/hostname": f.node_name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": "amd64",
    });
    for (k, v) in &f.labels {
        labels[k] = json!(v);
    }
    let resources = json!({
        "cpu": f.cpus.to_string(),
        "memory": format!("{}Ki", f.memory_bytes / 1024),
        "ephemeral-storage": format!("{}Ki", f.disk_bytes / 1024),
        "pods": MAX_PODS.to_string(),
    });
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": f.node_name, "labels": labels},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": f.host_ip},
                {"type": "Hostname", "address": f.node_name},
            ],
            "conditions": [
                condition("MemoryPressure", memory_pressure, "KubeletHasSufficientMemory", "KubeletHasInsufficientMemory",
                    if memory_pressure { "node has memory pressure" } else { "node has sufficient memory available" }, now),
                condition("DiskPressure", disk_pressure, "KubeletHasNoDiskPressure", "KubeletHasDiskPressure",
                    if disk_pressure { "node has disk pressure" } else { "node has no disk pressure" }, now),
                condition("PIDPressure", pid_pressure, "KubeletHasSufficientPID", "KubeletHasInsufficientPID",
                    if pid_pressure { "node has PID pressure" } else { "node has sufficient PID available" }, now),
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "corral agent is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": f.machine_id,
                "systemUUID": f.machine_id,
                "bootID": f.boot_id,
                "kernelVersion": f.kernel,
                "osImage": f.os_image,
                "containerRuntimeVersion": f.runtime_version,
                "kubeletVersion": version,
                "kubeProxyVersion": version,
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    })
}

/// Keeps each condition's lastTransitionTime (and, for `heartbeat = false`, its
/// lastHeartbeatTime) from `previous` while its status is unchanged, so a report differs
/// from the last only when something did.
pub fn stabilize(previous: Option<&Value>, current: &mut Value, heartbeat: bool) {
    let Some(prev) = previous.and_then(|p| p.pointer("/status/conditions")).and_then(Value::as_array) else {
        return;
    };
    let Some(conditions) = current.pointer_mut("/status/conditions").and_then(Value::as_array_mut) else { return };
    for c in conditions {
        let Some(p) = prev.iter().find(|p| p["type"] == c["type"]) else { continue };
        if p["status"] == c["status"] {
            c["lastTransitionTime"] = p["lastTransitionTime"].clone();
            if !heartbeat && let Some(h) = p.get("lastHeartbeatTime") {
                c["lastHeartbeatTime"] = h.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            node_name: "w1".into(),
            host_ip: "10.0.0.5".into(),
            cpus: 2,
            memory_bytes: 4 << 30,
            memory_available_bytes: 2 << 30,
            disk_bytes: 100 << 30,
            disk_available_bytes: 50 << 30,
            pids_max: 4_000_000,
            pids_used: 300,
            runtime_version: "containerd://1.6.20".into(),
            ..Facts::default()
        }
    }

    #[test]
    fn the_node_shows_capacity_addresses_and_healthy_conditions() {
        let node = node_object(&facts(), "v1.33.0", "2026-01-01T00:00:00Z");
        let status = &node["status"];
        assert_eq!(status["capacity"]["pods"], "110");
        assert_eq!(status["capacity"]["memory"], format!("{}Ki", 4 << 20));
        assert_eq!(status["allocatable"], status["capacity"]);
        assert_eq!(status["addresses"][0]["address"], "10.0.0.5");
        assert_eq!(status["nodeInfo"]["containerRuntimeVersion"], "containerd://1.6.20");
        let by_type = |t: &str| {
            status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap()["status"].clone()
        };
        assert_eq!(by_type("Ready"), "True");
        assert_eq!(by_type("MemoryPressure"), "False");
        assert_eq!(node["metadata"]["labels"]["kubernetes.io/hostname"], "w1");
    }

    #[test]
    fn pressure_shows_in_the_conditions() {
        let mut f = facts();
        f.memory_available_bytes = 50 << 20;
        f.disk_available_bytes = 5 << 30;
        let node = node_object(&f, "v1", "t");
        let conditions = node["status"]["conditions"].as_array().unwrap();
        assert_eq!(conditions[0]["status"], "True");
        assert_eq!(conditions[0]["reason"], "KubeletHasInsufficientMemory");
        assert_eq!(conditions[1]["status"], "True");
    }

    #[test]
    fn transition_times_move_only_when_the_status_does() {
        let before = node_object(&facts(), "v1", "t1");
        let mut f = facts();
        f.memory_available_bytes = 1;
        let mut after = node_object(&f, "v1", "t2");
        stabilize(Some(&before), &mut after, false);
        let conditions = after["status"]["conditions"].as_array().unwrap();
        assert_eq!(conditions[0]["lastTransitionTime"], "t2", "memory pressure changed");
        assert_eq!(conditions[3]["lastTransitionTime"], "t1");
        assert_eq!(conditions[3]["lastHeartbeatTime"], "t1");
        let mut again = node_object(&facts(), "v1", "t3");
        stabilize(Some(&before), &mut again, true);
        assert_eq!(again["status"]["conditions"][3]["lastHeartbeatTime"], "t3");
        assert_eq!(again["status"]["conditions"][3]["lastTransitionTime"], "t1");
    }
}
