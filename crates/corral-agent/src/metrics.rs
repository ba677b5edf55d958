//! Resource usage of the node and its pods, sampled every 15 s for the metrics API (`kubectl
//! top`, the HorizontalPodAutoscaler), as kubelet's summary gives it to metrics-server.
//!
//! CPU is a rate: the change in a container's cumulative CPU time (CRI stats) between two
//! samples over the time between them, so a container seen for the first time has no usage
//! yet, and a pod is left out until every running container of it has one. Memory is the
//! working set. The node's own usage comes from `/proc/stat` and `/proc/meminfo`.

use std::collections::{BTreeMap, HashMap, HashSet};

use corral_api::metrics::{ContainerSample, NodeSample, PodSample, Usage};
use corral_proto::cri;

use crate::spec::{CONTAINER_NAME, INIT_CONTAINER, POD_UID};

/// A pod as the sample names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The node's cumulative CPU time busy and its memory in use, at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCounters {
    pub at_ns: i64,
    pub cpu_busy_ns: u64,
    pub memory_bytes: u64,
}

/// Keeps the previous counters, to turn cumulative CPU time into rates.
#[derive(Default)]
pub struct Sampler {
    /// Per container id: (timestamp ns, cumulative core-nanoseconds).
    containers: HashMap<String, (i64, u64)>,
    host: Option<HostCounters>,
}

/// Nanocores from two cumulative readings.
fn rate(before: (i64, u64), after: (i64, u64)) -> Option<u64> {
    let elapsed = after.0 - before.0;
    if elapsed <= 0 || after.1 < before.1 {
        return None;
    }
    Some(((after.1 - before.1) as u128 * 1_000_000_000 / elapsed as u128) as u64)
}

impl Sampler {
    /// This period's sample: the pods of `pods` (by uid) with every running container
    /// measured, and the node's usage once two host readings exist.
    pub fn sample(
        &mut self,
        node: &str,
        stats: &[cri::ContainerStats],
        running: &HashSet<String>,
        pods: &HashMap<String, PodInfo>,
        host: Option<HostCounters>,
        now_ns: i64,
    ) -> NodeSample {
        let mut measured: BTreeMap<&str, Vec<ContainerSample>> = BTreeMap::new();
        let mut incomplete: HashSet<&str> = HashSet::new();
        let mut seen = HashMap::with_capacity(stats.len());
        for s in stats {
            let Some(attrs) = &s.attributes else { continue };
            if !running.contains(&attrs.id) || attrs.labels.contains_key(INIT_CONTAINER) {
                continue;
            }
            let Some(uid) = attrs.labels.get(POD_UID).filter(|uid| pods.contains_key(uid.as_str())) else {
                continue;
            };
            let cpu = s.cpu.as_ref().and_then(|c| Some((c.timestamp, c.usage_core_nano_seconds.as_ref()?.value)));
            let rate = cpu.and_then(|now| {
                seen.insert(attrs.id.clone(), now);
                rate(*self.containers.get(&attrs.id)?, now)
            });
            let Some(cpu_nanocores) = rate else {
                incomplete.insert(uid);
                continue;
            };
            let memory_bytes = s.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).map_or(0, |w| w.value);
            let name = attrs.labels.get(CONTAINER_NAME).cloned().unwrap_or_default();
            measured
                .entry(uid)
                .or_default()
                .push(ContainerSample { name, usage: Usage { cpu_nanocores, memory_bytes } });
        }
        // Containers gone since are forgotten.
        self.containers = seen;
        let pods = measured
            .into_iter()
            .filter(|(uid, _)| !incomplete.contains(uid))
            .map(|(uid, mut containers)| {
                let info = &pods[uid];
                containers.sort_by(|a, b| a.name.cmp(&b.name));
                PodSample {
                    namespace: info.namespace.clone(),
                    name: info.name.clone(),
                    labels: info.labels.clone(),
                    containers,
                }
            })
            .collect();
        let usage = match (self.host, host) {
            (Some(before), Some(after)) => Usage {
                cpu_nanocores: rate((before.at_ns, before.cpu_busy_ns), (after.at_ns, after.cpu_busy_ns)).unwrap_or(0),
                memory_bytes: after.memory_bytes,
            },
            (None, Some(after)) => Usage { cpu_nanocores: 0, memory_bytes: after.memory_bytes },
            _ => Usage::default(),
        };
        if host.is_some() {
            self.host = host;
        }
        NodeSample {
            node: node.to_string(),
            timestamp: now_ns / 1_000_000_000,
            window_s: corral_api::metrics::RESOLUTION_S,
            usage,
            pods,
        }
    }
}

/// Busy CPU time (all but idle and iowait) from `/proc/stat`'s first line, in nanoseconds.
pub fn parse_cpu_busy_ns(proc_stat: &str) -> Option<u64> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    // USER_HZ is 100 on Linux: a tick is 10 ms.
    Some((total - idle) * 10_000_000)
}

/// Memory in use (MemTotal - MemAvailable) from `/proc/meminfo`, in bytes.
pub fn parse_memory_used(meminfo: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    };
    Some(field("MemTotal:")?.saturating_sub(field("MemAvailable:")?))
}

/// The machine's counters now.
pub fn read_host(now_ns: i64) -> Option<HostCounters> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(HostCounters {
        at_ns: now_ns,
        cpu_busy_ns: parse_cpu_busy_ns(&stat)?,
        memory_bytes: parse_memory_used(&meminfo)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000_000;

    fn stats(id: &str, uid: &str, name: &str, at: i64, cpu_ns: u64, memory: u64) -> cri::ContainerStats {
        cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: id.into(),
                labels: [(POD_UID.to_string(), uid.to_string()), (CONTAINER_NAME.to_string(), name.to_string())]
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
            cpu: Some(cri::CpuUsage {
                timestamp: at,
                usage_core_nano_seconds: Some(cri::UInt64Value { value: cpu_ns }),
                usage_nano_cores: None,
            }),
            memory: Some(cri::MemoryUsage {
                timestamp: at,
                working_set_bytes: Some(cri::UInt64Value { value: memory }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn info(name: &str) -> PodInfo {
        PodInfo { namespace: "shop".into(), name: name.into(), labels: BTreeMap::from([("app".into(), "web".into())]) }
    }

    #[test]
    fn cpu_is_a_rate_between_samples_and_pods_wait_for_every_container() {
        let pods = HashMap::from([("u1".to_string(), info("web-1")), ("u2".to_string(), info("web-2"))]);
        let running: HashSet<String> = ["c1", "c2", "c3"].map(String::from).into();
        let host = |at: i64, busy: u64| Some(HostCounters { at_ns: at, cpu_busy_ns: busy, memory_bytes: 8 << 30 });
        let mut sampler = Sampler::default();

        // First sight: nothing to take a rate from.
        let first = [stats("c1", "u1", "app", 0, 0, 4096), stats("c2", "u2", "app", 0, 10 * SEC as u64, 100)];
        let s = sampler.sample("a1", &first, &running, &pods, host(0, 0), 0);
        assert!(s.pods.is_empty());
        assert_eq!(s.usage, Usage { cpu_nanocores: 0, memory_bytes: 8 << 30 });

        // 15 s later: web-1 used half a core; web-2 grew a sidecar not yet measured.
        let second = [
            stats("c1", "u1", "app", 15 * SEC, 15 * SEC as u64 / 2, 4096),
            stats("c2", "u2", "app", 15 * SEC, 10 * SEC as u64, 100),
            stats("c3", "u2", "side", 15 * SEC, 0, 100),
            stats("gone", "u1", "old", 15 * SEC, 0, 100),
        ];
        let s = sampler.sample("a1", &second, &running, &pods, host(15 * SEC, 30 * SEC as u64), 15 * SEC);
        assert_eq!(s.pods.len(), 1, "web-2 waits for its sidecar's rate");
        assert_eq!(s.pods[0].name, "web-1");
        assert_eq!(s.pods[0].containers[0].usage, Usage { cpu_nanocores: 500_000_000, memory_bytes: 4096 });
        assert_eq!(s.usage.cpu_nanocores, 2_000_000_000, "two cores busy on the host");
        assert_eq!((s.timestamp, s.window_s), (15, 15));

        // Then both pods are measured, web-2 idle.
        let third = [
            stats("c1", "u1", "app", 30 * SEC, 15 * SEC as u64, 4096),
            stats("c2", "u2", "app", 30 * SEC, 10 * SEC as u64, 100),
            stats("c3", "u2", "side", 30 * SEC, 0, 100),
        ];
        let s = sampler.sample("a1", &third, &running, &pods, None, 30 * SEC);
        let names: Vec<&str> = s.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["web-1", "web-2"]);
        assert_eq!(s.pods[1].containers.len(), 2);
        assert!(s.pods[1].containers.iter().all(|c| c.usage.cpu_nanocores == 0));
    }

    #[test]
    fn host_counters_parse_from_proc() {
        let stat = "cpu  100 20 30 1000 50 5 5 0 0 0\ncpu0 50 10 15 500 25 2 2 0 0 0\n";
        assert_eq!(parse_cpu_busy_ns(stat), Some(160 * 10_000_000));
        let meminfo = "MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(parse_memory_used(meminfo), Some(8_192_000 * 1024));
        assert_eq!(parse_memory_used("MemTotal: 1 kB\n"), None);
        assert!(read_host(0).is_some(), "this machine has /proc");
    }
}
