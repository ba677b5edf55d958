//! Routes to the other nodes' pods: every other node's pod CIDR through that node's address,
//! as flannel's host-gw backend keeps them, so pods reach each other across nodes by IP on
//! machines that share a network. The agent's routes carry their own protocol number
//! (`ROUTE_PROTOCOL`), so they are reconciled (added, replaced, removed) without touching any
//! route someone else made.
//!
//! `plan` and `changes` are pure; `IpRoutes` reads and writes through `ip`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use corral_api::meta::JsonAt;
use serde_json::Value;

/// The routing protocol number of Corral's routes (`ip route ... proto 250`; unnamed in
/// iproute2's table, unlike 186-192 which routing daemons use).
pub const ROUTE_PROTOCOL: u8 = 250;

/// Pod CIDR to the node address it is reached through.
pub type Routes = BTreeMap<String, Ipv4Addr>;

fn internal_ip(node: &Value) -> Option<Ipv4Addr> {
    let addresses = node.at("/status/addresses")?.as_array()?;
    addresses.iter().find(|a| a["type"] == "InternalIP").and_then(|a| a["address"].as_str()?.parse().ok())
}

/// What routing needs of a Node: its name, pod CIDR and addresses.
pub fn routing_fields(node: Value) -> Value {
    serde_json::json!({
        "metadata": {"name": node.at("/metadata/name")},
        "spec": {"podCIDR": node.at("/spec/podCIDR")},
        "status": {"addresses": node.at("/status/addresses")},
    })
}

/// The routes this node needs: each other node's pod CIDR through its InternalIP. Nodes on
/// this node's own address (several nodes of one machine, as `corral up` makes them today)
/// or on loopback need none: their bridges are this machine's.
pub fn plan<'a>(nodes: impl IntoIterator<Item = &'a Value>, me: &str) -> Routes {
    let nodes: Vec<&Value> = nodes.into_iter().collect();
    let mine =
        nodes.iter().find(|n| n.at("/metadata/name").and_then(Value::as_str) == Some(me)).and_then(|n| internal_ip(n));
    let mut routes = Routes::new();
    for node in nodes {
        if node.at("/metadata/name").and_then(Value::as_str) == Some(me) {
            continue;
        }
        let (Some(cidr), Some(via)) = (node.at("/spec/podCIDR").and_then(Value::as_str), internal_ip(node)) else {
            continue;
        };
        if via.is_loopback() || Some(via) == mine || corral_api::net::Cidr::parse(cidr).is_err() {
            continue;
        }
        routes.insert(cidr.to_string(), via);
    }
    routes
}

/// What turns `current` into `desired`: routes to add or replace, and pod CIDRs to remove.
pub fn changes(current: &Routes, desired: &Routes) -> (Vec<(String, Ipv4Addr)>, Vec<String>) {
    let set =
        desired.iter().filter(|(cidr, via)| current.get(*cidr) != Some(via)).map(|(c, v)| (c.clone(), *v)).collect();
    let removed = current.keys().filter(|cidr| !desired.contains_key(*cidr)).cloned().collect();
    (set, removed)
}

/// `ip -j route show proto N` output as routes.
pub fn parse_ip_json(json: &str) -> Routes {
    let list: Vec<Value> = serde_json::from_str(json).unwrap_or_default();
    list.iter()
        .filter_map(|r| Some((r.get("dst")?.as_str()?.to_string(), r.get("gateway")?.as_str()?.parse().ok()?)))
        .collect()
}

/// The routes of a network namespace (None: the agent's own) through `ip`.
pub struct IpRoutes {
    pub netns: Option<String>,
}

impl IpRoutes {
    async fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = tokio::process::Command::new("ip");
        if let Some(ns) = &self.netns {
            cmd.args(["-n", ns]);
        }
        let out = cmd.args(args).output().await.map_err(|e| format!("running ip: {e} (install iproute2)"))?;
        if !out.status.success() {
            return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Corral's routes now.
    pub async fn current(&self) -> Result<Routes, String> {
        let proto = ROUTE_PROTOCOL.to_string();
        Ok(parse_ip_json(&self.ip(&["-4", "-j", "route", "show", "proto", &proto]).await?))
    }

    /// Makes Corral's routes `desired`; what it changed, as (set, removed) counts.
    pub async fn reconcile(&self, desired: &Routes) -> Result<(usize, usize), String> {
        let (set, removed) = changes(&self.current().await?, desired);
        let proto = ROUTE_PROTOCOL.to_string();
        for (cidr, via) in &set {
            self.ip(&["route", "replace", cidr, "via", &via.to_string(), "proto", &proto]).await?;
        }
        for cidr in &removed {
            self.ip(&["route", "del", cidr, "proto", &proto]).await?;
        }
        Ok((set.len(), removed.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ip: &str, cidr: Option<&str>) -> Value {
        let mut n = json!({"metadata": {"name": name}, "status": {"addresses": [
            {"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}]}});
        if let Some(c) = cidr {
            n["spec"] = json!({"podCIDR": c});
        }
        n
    }

    #[test]
    fn every_other_node_with_a_cidr_is_routed_through_its_address() {
        let nodes = [
            node("a1", "192.0.2.11", Some("10.244.0.0/24")),
            node("a2", "192.0.2.12", Some("10.244.1.0/24")),
            node("a3", "192.0.2.13", None),
            node("a4", "192.0.2.11", Some("10.244.3.0/24")),
            node("a5", "127.0.0.1", Some("10.244.4.0/24")),
        ];
        let trimmed: Vec<Value> = nodes.iter().cloned().map(routing_fields).collect();
        assert_eq!(plan(&trimmed, "a1"), plan(&nodes, "a1"), "the fields kept are the ones used");
        let routes = plan(&nodes, "a1");
        assert_eq!(routes, Routes::from([("10.244.1.0/24".to_string(), Ipv4Addr::new(192, 0, 2, 12))]));
    }

    #[test]
    fn reconciling_replaces_what_moved_and_removes_what_went() {
        let current = Routes::from([
            ("10.244.1.0/24".to_string(), Ipv4Addr::new(192, 0, 2, 12)),
            ("10.244.2.0/24".to_string(), Ipv4Addr::new(192, 0, 2, 13)),
            ("10.244.3.0/24".to_string(), Ipv4Addr::new(192, 0, 2, 14)),
        ]);
        let desired = Routes::from([
            ("10.244.1.0/24".to_string(), Ipv4Addr::new(192, 0, 2, 12)),
            ("10.244.2.0/24".to_string(), Ipv4Addr::new(192, 0, 2, 23)),
            ("10.244.5.0/24".to_string(), Ipv4Addr::new(192, 0, 2, 15)),
        ]);
        let (set, removed) = changes(&current, &desired);
        assert_eq!(
            set,
            [
                ("10.244.2.0/24".to_string(), Ipv4Addr::new(192, 0, 2, 23)),
                ("10.244.5.0/24".to_string(), Ipv4Addr::new(192, 0, 2, 15))
            ]
        );
        assert_eq!(removed, ["10.244.3.0/24"]);
        let listed =
            r#"[{"dst":"10.244.5.0/24","gateway":"192.0.2.7","dev":"v0","flags":[]},{"dst":"default","dev":"v0"}]"#;
        assert_eq!(parse_ip_json(listed), Routes::from([("10.244.5.0/24".to_string(), Ipv4Addr::new(192, 0, 2, 7))]));
    }
}
