//! The scheduling framework: named filter plugins decide where a pod may go, named score
//! plugins rank those nodes, weighted. Every node is filtered (the reasons of all nodes make
//! the message of a pod that fits nowhere); scores are normalized per plugin to 0..=100.

use std::collections::BTreeMap;

use crate::plugins;
use crate::snapshot::{NodeInfo, PodInfo, Snapshot};

pub const MAX_SCORE: i64 = 100;

/// Why a node cannot take a pod: reasons as Kubernetes words them (`Insufficient cpu`).
pub type Reasons = Vec<String>;

pub trait FilterPlugin: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether `node` may take `pod`; `snapshot` is the whole cluster, for plugins that
    /// look at other nodes' pods (affinity, spreading).
    fn filter(&self, pod: &PodInfo, node: &NodeInfo, snapshot: &Snapshot) -> Result<(), Reasons>;
    /// Whether the plugin can refuse any node for this pod (Kubernetes' PreFilter "Skip"):
    /// asked once per pod, so a pod with no volumes, affinity or spread constraints is not
    /// looked at again for every node by the plugins that judge those.
    fn relevant(&self, _pod: &PodInfo, _snapshot: &Snapshot) -> bool {
        true
    }
}

/// How a plugin's raw scores become 0..=100 across the feasible nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalize {
    /// Already 0..=100.
    None,
    /// Scaled so the highest is 100.
    Max,
    /// Scaled so the highest is 0 and zero is 100 (fewer is better).
    ReverseMax,
    /// Scaled so the lowest is 0 and the highest 100 (scores may be negative).
    MinMax,
}

pub trait ScorePlugin: Send + Sync {
    fn name(&self) -> &'static str;
    fn weight(&self) -> i64;
    fn normalize(&self) -> Normalize;
    fn score(&self, pod: &PodInfo, node: &NodeInfo, snapshot: &Snapshot) -> i64;
    /// Whether the plugin can score nodes differently for this pod (PreScore "Skip"); a
    /// plugin that cannot adds the same to every node and is left out.
    fn relevant(&self, _pod: &PodInfo, _snapshot: &Snapshot) -> bool {
        true
    }
}

/// Where a pod goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub node: String,
    pub score: i64,
}

/// Why a pod fits nowhere: how many nodes gave each reason, and Kubernetes' message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable {
    pub reasons: BTreeMap<String, usize>,
    pub message: String,
}

impl Unschedulable {
    fn new(nodes: usize, reasons: BTreeMap<String, usize>) -> Self {
        if nodes == 0 {
            return Unschedulable { reasons, message: "no nodes available to schedule pods".into() };
        }
        let mut parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        parts.sort();
        let message = format!("0/{nodes} nodes are available: {}.", parts.join(", "));
        Unschedulable { reasons, message }
    }
}

pub struct Framework {
    filters: Vec<Box<dyn FilterPlugin>>,
    scores: Vec<Box<dyn ScorePlugin>>,
    /// Where the next search for feasible nodes starts, so sampled searches take turns.
    next_start: std::sync::atomic::AtomicUsize,
}

/// How many feasible nodes a search stops at, as Kubernetes' adaptive
/// percentageOfNodesToScore: every node below 100, else 50% falling by 1% per 125 nodes
/// down to 5%, never fewer than 100.
pub fn nodes_to_find(nodes: usize) -> usize {
    if nodes < 100 {
        return nodes;
    }
    let percent = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percent / 100).max(100)
}

impl Default for Framework {
    /// Every plugin, with Kubernetes' default weights.
    fn default() -> Self {
        Framework::new(plugins::filters(), plugins::scores())
    }
}

impl Framework {
    pub fn new(filters: Vec<Box<dyn FilterPlugin>>, scores: Vec<Box<dyn ScorePlugin>>) -> Self {
        Framework { filters, scores, next_start: Default::default() }
    }

    pub fn filter_names(&self) -> Vec<&'static str> {
        self.filters.iter().map(|f| f.name()).collect()
    }

    pub fn score_names(&self) -> Vec<&'static str> {
        self.scores.iter().map(|s| s.name()).collect()
    }

    /// Nodes that may take the pod (in a large cluster, the first `nodes_to_find` of them
    /// from where the last search stopped), or why none may (every node looked at).
    pub fn feasible<'a>(&self, pod: &PodInfo, snapshot: &'a Snapshot) -> Result<Vec<&'a NodeInfo>, Unschedulable> {
        use std::sync::atomic::Ordering;
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut feasible = Vec::new();
        let n = snapshot.nodes.len();
        let enough = nodes_to_find(n);
        let start = if n == 0 { 0 } else { self.next_start.load(Ordering::Relaxed) % n };
        let mut looked = 0;
        let filters: Vec<&dyn FilterPlugin> =
            self.filters.iter().map(|f| f.as_ref()).filter(|f| f.relevant(pod, snapshot)).collect();
        'nodes: for node in snapshot.nodes[start..].iter().chain(&snapshot.nodes[..start]) {
            if feasible.len() >= enough {
                break;
            }
            looked += 1;
            for f in &filters {
                if let Err(why) = f.filter(pod, node, snapshot) {
                    for r in why {
                        *reasons.entry(r).or_default() += 1;
                    }
                    continue 'nodes;
                }
            }
            feasible.push(node);
        }
        if n > 0 {
            self.next_start.store((start + looked) % n, Ordering::Relaxed);
        }
        if feasible.is_empty() {
            return Err(Unschedulable::new(snapshot.nodes.len(), reasons));
        }
        Ok(feasible)
    }

    /// The best node for the pod. Ties go to the node with fewer pods, then to one chosen by
    /// the pod's uid, so equal nodes share a burst of pods.
    pub fn schedule(&self, pod: &PodInfo, snapshot: &Snapshot) -> Result<Decision, Unschedulable> {
        let feasible = self.feasible(pod, snapshot)?;
        let mut totals = vec![0i64; feasible.len()];
        if feasible.len() > 1 {
            for plugin in self.scores.iter().filter(|s| s.relevant(pod, snapshot)) {
                let raw: Vec<i64> = feasible.iter().map(|n| plugin.score(pod, n, snapshot)).collect();
                for (total, s) in totals.iter_mut().zip(normalize(plugin.normalize(), &raw)) {
                    *total += s * plugin.weight();
                }
            }
        }
        let tie = |name: &str| fnv(pod.uid.as_bytes()) ^ fnv(name.as_bytes());
        let best = (0..feasible.len())
            .max_by(|&a, &b| {
                totals[a]
                    .cmp(&totals[b])
                    .then(feasible[b].pods.len().cmp(&feasible[a].pods.len()))
                    .then(tie(&feasible[a].name).cmp(&tie(&feasible[b].name)))
            })
            .expect("at least one feasible node");
        Ok(Decision { node: feasible[best].name.clone(), score: totals[best] })
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn normalize(how: Normalize, raw: &[i64]) -> Vec<i64> {
    let max = raw.iter().copied().max().unwrap_or(0);
    let min = raw.iter().copied().min().unwrap_or(0);
    match how {
        Normalize::None => raw.iter().map(|s| (*s).clamp(0, MAX_SCORE)).collect(),
        Normalize::Max if max <= 0 => vec![0; raw.len()],
        Normalize::Max => raw.iter().map(|s| s * MAX_SCORE / max).collect(),
        Normalize::ReverseMax if max <= 0 => vec![MAX_SCORE; raw.len()],
        Normalize::ReverseMax => raw.iter().map(|s| MAX_SCORE - s * MAX_SCORE / max).collect(),
        Normalize::MinMax if max == min => vec![0; raw.len()],
        Normalize::MinMax => raw.iter().map(|s| (s - min) * MAX_SCORE / (max - min)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_clusters_are_sampled_as_kubernetes_does_and_searches_take_turns() {
        assert_eq!(nodes_to_find(50), 50);
        assert_eq!(nodes_to_find(1_000), 420, "42% of 1,000");
        assert_eq!(nodes_to_find(5_000), 500, "10% of 5,000");
        assert_eq!(nodes_to_find(100_000), 5_000, "never under 5%");
        let nodes: Vec<std::sync::Arc<serde_json::Value>> = (0..1_000)
            .map(|i| {
                std::sync::Arc::new(serde_json::json!({"metadata": {"name": format!("n{i:04}")},
                    "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}}}))
            })
            .collect();
        let snapshot = Snapshot::new(nodes, Vec::<std::sync::Arc<serde_json::Value>>::new());
        let pod = PodInfo::new(std::sync::Arc::new(serde_json::json!({"metadata": {"name": "p", "uid": "u"},
                                                                      "spec": {"containers": [{"name": "c"}]}})));
        let f = Framework::default();
        let first = f.feasible(&pod, &snapshot).unwrap();
        let second = f.feasible(&pod, &snapshot).unwrap();
        assert_eq!((first.len(), second.len()), (420, 420));
        assert_eq!(first[0].name, "n0000");
        assert_eq!(second[0].name, "n0420", "the next search starts where the last one stopped");
    }

    #[test]
    fn the_message_counts_nodes_per_reason_in_kubernetes_words() {
        let u = Unschedulable::new(3, BTreeMap::from([("Insufficient cpu".to_string(), 3)]));
        assert_eq!(u.message, "0/3 nodes are available: 3 Insufficient cpu.");
        let u = Unschedulable::new(
            3,
            BTreeMap::from([("Insufficient memory".to_string(), 1), ("node(s) were unschedulable".to_string(), 2)]),
        );
        assert_eq!(u.message, "0/3 nodes are available: 1 Insufficient memory, 2 node(s) were unschedulable.");
        assert_eq!(Unschedulable::new(0, BTreeMap::new()).message, "no nodes available to schedule pods");
    }

    #[test]
    fn scores_normalize_per_plugin() {
        assert_eq!(normalize(Normalize::Max, &[1, 2, 4]), [25, 50, 100]);
        assert_eq!(normalize(Normalize::ReverseMax, &[0, 2, 4]), [100, 50, 0]);
        assert_eq!(normalize(Normalize::MinMax, &[-2, 0, 2]), [0, 50, 100]);
    }
}
