//! Node IPAM, as Kubernetes' range allocator does it: every node gets a pod CIDR, a subnet
//! of the cluster CIDR (a /24 of 10.244.0.0/16 by default), in `spec.podCIDR` and
//! `spec.podCIDRs`; the agent builds its CNI bridge from it. The lowest free subnet goes to
//! the oldest node without one. What is allocated is what the nodes' specs say, so a new
//! leader, or a node deleted and its subnet freed, needs no other record; a subnet that two
//! nodes claim (written by hand) stays with the older node and the other is left alone with
//! a warning, as a node whose CIDR lies outside the cluster CIDR is.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_api::events::{Involved, Recorder};
use corral_api::meta::JsonAt;
use serde_json::{Value, json};

use crate::cluster::{Cluster, ClusterError, now_seconds, text};
use crate::informer::Informers;
use crate::scheduling::flush_events;

pub use corral_api::net::Cidr;

/// The subnets of `cluster` with prefix `size`, by index.
#[derive(Clone, Copy, Debug)]
pub struct Allocator {
    cluster: Cidr,
    size: u8,
}

impl Allocator {
    pub fn new(cluster: Cidr, size: u8) -> Result<Allocator, String> {
        if size < cluster.prefix || size > 30 {
            return Err(format!(
                "node CIDR mask size /{size} must lie between the cluster CIDR's /{} and /30",
                cluster.prefix
            ));
        }
        if size - cluster.prefix > 20 {
            return Err(format!("/{size} subnets of {cluster} are too many (at most 2^20)"));
        }
        Ok(Allocator { cluster, size })
    }

    fn count(&self) -> u32 {
        1 << (self.size - self.cluster.prefix)
    }

    fn subnet(&self, index: u32) -> Cidr {
        Cidr { base: self.cluster.base + (index << (32 - self.size)), prefix: self.size }
    }

    /// The index of `cidr` if it is one of the subnets.
    fn index_of(&self, cidr: &Cidr) -> Option<u32> {
        (cidr.prefix == self.size && self.cluster.contains(cidr))
            .then(|| (cidr.base - self.cluster.base) >> (32 - self.size))
    }
}

/// What a pass decided.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// (node, its pod CIDR) to write.
    pub assign: Vec<(Arc<Value>, String)>,
    /// (node, why it got none).
    pub failed: Vec<(Arc<Value>, String)>,
}

/// Gives every node without a pod CIDR the lowest free subnet, oldest nodes first.
pub fn plan(allocator: &Allocator, nodes: &[Arc<Value>]) -> Plan {
    let mut by_age: Vec<&Arc<Value>> = nodes.iter().collect();
    by_age
        .sort_by_cached_key(|n| [text(n, "/metadata/creationTimestamp"), text(n, "/metadata/name")].map(String::from));
    let mut used = BTreeSet::new();
    let mut plan = Plan::default();
    let mut without = Vec::new();
    for node in by_age {
        let current = text(node, "/spec/podCIDR");
        if current.is_empty() {
            if node.at("/metadata/deletionTimestamp").is_none() {
                without.push(node);
            }
            continue;
        }
        match Cidr::parse(current).ok().and_then(|c| allocator.index_of(&c)) {
            Some(i) if used.insert(i) => {}
            Some(_) => {
                tracing::warn!(node = %text(node, "/metadata/name"), cidr = current, "pod CIDR taken by an older node")
            }
            None => {
                tracing::warn!(node = %text(node, "/metadata/name"), cidr = current, "pod CIDR outside the cluster CIDR")
            }
        }
    }
    let mut free = (0..allocator.count()).filter(|i| !used.contains(i));
    for node in without {
        match free.next() {
            Some(i) => plan.assign.push((node.clone(), allocator.subnet(i).to_string())),
            None => plan.failed.push((
                node.clone(),
                format!("no pod CIDR is left in {} (/{} per node)", allocator.cluster, allocator.size),
            )),
        }
    }
    plan
}

/// Runs the allocator until aborted.
pub async fn run<C: Cluster>(cluster: Arc<C>, informers: Arc<Informers>, allocator: Allocator) {
    let nodes = informers.get("nodes").await;
    let events = Arc::new(Mutex::new(Recorder::new("node-ipam-controller", "")));
    // A node just written shows its CIDR in the informer soon after: not allocated twice.
    let mut written: HashMap<String, Instant> = HashMap::new();
    loop {
        let pass = Instant::now();
        let change = nodes.changed();
        let list = nodes.list();
        written.retain(|_, at| at.elapsed() < Duration::from_secs(30));
        let decided = plan(&allocator, &list);
        for (node, cidr) in decided.assign {
            let name = text(&node, "/metadata/name").to_string();
            if written.contains_key(&name) {
                continue;
            }
            let mut updated = (*node).clone();
            updated["spec"]["podCIDR"] = json!(cidr);
            updated["spec"]["podCIDRs"] = json!([cidr]);
            match cluster.update("nodes", updated).await {
                Ok(_) => {
                    tracing::info!(node = %name, %cidr, "pod CIDR allocated");
                    written.insert(name, Instant::now());
                }
                Err(ClusterError::Conflict(_)) | Err(ClusterError::NotFound(_)) => {}
                Err(e) => tracing::warn!(node = %name, error = %e, "writing the pod CIDR"),
            }
        }
        for (node, why) in decided.failed {
            let involved = Involved { api_version: "v1".into(), kind: "Node".into(), ..Involved::object(&node) };
            events.lock().expect("not poisoned").record(&involved, true, "CIDRNotAvailable", &why, now_seconds());
        }
        flush_events(cluster.as_ref(), &events).await;
        let worked = pass.elapsed();
        tokio::select! {
            _ = change => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        // Every heartbeat changes a node: a pass over 5,000 of them takes its small share.
        crate::informer::pace(worked, Duration::from_millis(50), 0.05).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, created: &str, cidr: &str) -> Arc<Value> {
        let mut n = json!({"metadata": {"name": name, "creationTimestamp": created}, "spec": {}});
        if !cidr.is_empty() {
            n["spec"]["podCIDR"] = json!(cidr);
        }
        Arc::new(n)
    }

    fn allocator(cluster: &str, size: u8) -> Allocator {
        Allocator::new(Cidr::parse(cluster).unwrap(), size).unwrap()
    }

    fn assigned(plan: &Plan) -> Vec<(&str, &str)> {
        plan.assign.iter().map(|(n, c)| (text(n, "/metadata/name"), c.as_str())).collect()
    }

    #[test]
    fn new_nodes_get_the_lowest_free_subnets_oldest_first() {
        let a = allocator("10.244.0.0/16", 24);
        let nodes = [
            node("late", "2026-01-01T00:00:09Z", ""),
            node("has", "2026-01-01T00:00:01Z", "10.244.0.0/24"),
            node("early", "2026-01-01T00:00:02Z", ""),
            node("gap", "2026-01-01T00:00:03Z", "10.244.2.0/24"),
        ];
        assert_eq!(assigned(&plan(&a, &nodes)), [("early", "10.244.1.0/24"), ("late", "10.244.3.0/24")]);
    }

    #[test]
    fn a_deleted_nodes_subnet_is_free_again() {
        let a = allocator("10.244.0.0/16", 24);
        let nodes = [node("b", "2026-01-01T00:00:02Z", "10.244.1.0/24"), node("c", "2026-01-01T00:00:03Z", "")];
        assert_eq!(assigned(&plan(&a, &nodes)), [("c", "10.244.0.0/24")]);
    }

    #[test]
    fn a_full_range_is_reported_and_foreign_cidrs_take_nothing() {
        let a = allocator("10.0.0.0/23", 24);
        let nodes = [
            node("x", "2026-01-01T00:00:01Z", "10.0.0.0/24"),
            node("foreign", "2026-01-01T00:00:02Z", "192.168.0.0/24"),
            node("dup", "2026-01-01T00:00:03Z", "10.0.0.0/24"),
            node("y", "2026-01-01T00:00:04Z", ""),
            node("z", "2026-01-01T00:00:05Z", ""),
        ];
        let p = plan(&a, &nodes);
        assert_eq!(assigned(&p), [("y", "10.0.1.0/24")]);
        assert_eq!(p.failed.len(), 1);
        assert_eq!(p.failed[0].1, "no pod CIDR is left in 10.0.0.0/23 (/24 per node)");
    }

    #[test]
    fn cidrs_are_checked() {
        assert!(Cidr::parse("10.244.0.1/16").unwrap_err().contains("host bits"));
        assert!(Cidr::parse("10.244.0.0").is_err());
        assert!(Cidr::parse("10.244.0.0/33").is_err());
        assert_eq!(Cidr::parse("10.244.0.0/16").unwrap().to_string(), "10.244.0.0/16");
        assert!(Allocator::new(Cidr::parse("10.244.0.0/16").unwrap(), 8).is_err());
        assert!(Allocator::new(Cidr::parse("10.0.0.0/8").unwrap(), 30).is_err());
    }
}
