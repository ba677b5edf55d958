//! Cluster IPs and node ports for Services.
//!
//! Each allocated address is a claim key in the store (`/registry/corral/serviceips/<ip>`,
//! `/registry/corral/nodeports/<port>`), written in the same transaction as the Service on
//! the condition that the claim does not exist yet, and deleted with the Service. Two
//! servers racing for one address cannot both win; a Service and its claims are never
//! apart, whatever process dies when.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use corral_api::meta::{self, Minter};
use corral_api::net::Cidr;
use corral_api::{ApiError, FieldError, Resource};
use rand::Rng;
use serde_json::{Value, json};

use crate::storage::{ObjectStore, Side};

pub const IP_CLAIMS: &str = "/registry/corral/serviceips/";
pub const PORT_CLAIMS: &str = "/registry/corral/nodeports/";

/// The ranges addresses come from.
#[derive(Clone, Debug)]
pub struct Ranges {
    network: Cidr,
    pub node_ports: (u16, u16),
}

impl Default for Ranges {
    fn default() -> Self {
        Ranges::parse("10.96.0.0/12", "30000-32767").expect("the defaults parse")
    }
}

impl Ranges {
    /// `cidr` as `a.b.c.d/n` (IPv4), `ports` as `first-last`.
    pub fn parse(cidr: &str, ports: &str) -> Result<Ranges, String> {
        let (network, _) = Cidr::network_of(cidr)?;
        if !(8..=30).contains(&network.prefix) {
            return Err(format!("{cidr}: the prefix length must be between 8 and 30"));
        }
        let (first, last) =
            ports.split_once('-').ok_or_else(|| format!("{ports}: a port range is written first-last"))?;
        let parse_port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{ports}: {e}"));
        let node_ports = (parse_port(first)?, parse_port(last)?);
        if node_ports.0 == 0 || node_ports.0 > node_ports.1 {
            return Err(format!("{ports}: the first port must be at least 1 and not above the last"));
        }
        Ok(Ranges { network, node_ports })
    }

    pub fn cidr(&self) -> String {
        self.network.to_string()
    }

    /// Usable addresses: not the network's own nor its broadcast address.
    fn ip_span(&self) -> (u32, u32) {
        let size = 1u32 << (32 - self.network.prefix);
        (self.network.base + 1, self.network.base + size - 2)
    }

    /// The first address, which the `kubernetes` Service in `default` holds.
    pub fn first_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.ip_span().0)
    }

    fn contains_ip(&self, ip: Ipv4Addr) -> bool {
        let (lo, hi) = self.ip_span();
        (lo..=hi).contains(&u32::from(ip))
    }
}

/// What is taken: read from the claim keys.
#[derive(Debug, Default)]
pub struct Taken {
    pub ips: HashSet<Ipv4Addr>,
    pub ports: HashSet<u16>,
}

pub fn is_service(r: &Resource) -> bool {
    r.group.is_empty() && r.plural == "services"
}

/// Reads what is taken from the claim keys.
pub async fn taken(store: &ObjectStore) -> Result<Taken, ApiError> {
    let mut taken = Taken::default();
    for prefix in [IP_CLAIMS, PORT_CLAIMS] {
        for item in store.list(prefix, None, 0, 0, false).await?.items {
            let claim = item.value.get("claim").and_then(Value::as_str).unwrap_or_default();
            if let Some(ip) = claim.strip_prefix(IP_CLAIMS).and_then(|ip| ip.parse().ok()) {
                taken.ips.insert(ip);
            } else if let Some(port) = claim.strip_prefix(PORT_CLAIMS).and_then(|p| p.parse().ok()) {
                taken.ports.insert(port);
            }
        }
    }
    Ok(taken)
}

/// The side writes of writing `new` over `old` (None: a create): claims to take and
/// release. Empty for everything but Services.
pub async fn side_of_write(
    store: &ObjectStore,
    ranges: &Ranges,
    r: &Resource,
    old: Option<&Value>,
    new: &mut Value,
) -> Result<Side, ApiError> {
    // Events are written with a lease, so they expire (`storage::EVENT_TTL`).
    if (r.group.is_empty() || r.group == "events.k8s.io") && r.plural == "events" {
        return Ok(Side { lease: store.event_lease().await?, ..Side::default() });
    }
    if !is_service(r) {
        return Ok(Side::default());
    }
    // Most writes keep the addresses the Service holds: then what others hold does not
    // matter, and the claims need not be read.
    let mut kept = new.clone();
    let unchanged =
        allocate(r, old, &mut kept, ranges, &Taken::default(), &mut rand::rng()).is_ok_and(|claims| claims.is_empty());
    let claims = if unchanged {
        *new = kept;
        Vec::new()
    } else {
        let taken = taken(store).await?;
        allocate(r, old, new, ranges, &taken, &mut rand::rng())?
    };
    let releases = old.map(|o| released(o, Some(new))).unwrap_or_default();
    let owner = json!(format!("{}/{}", meta::namespace(new).unwrap_or_default(), meta::name(new)));
    Ok(Side { claims, owner, releases, lease: 0 })
}

/// The side writes of deleting `old`: its claims go with it.
pub fn side_of_delete(r: &Resource, old: &Value) -> Side {
    if !is_service(r) {
        return Side::default();
    }
    Side { releases: claims_of(old), ..Side::default() }
}

/// Creates `default/kubernetes`, the Service pods reach the API through, on the range's
/// first address. Safe on every server and every start.
pub async fn ensure_kubernetes(store: &ObjectStore, mint: &dyn Minter, ranges: &Ranges) -> Result<(), ApiError> {
    let r = corral_api::resources::find("", "services").expect("services are served");
    let key = r.key(Some("default"), "kubernetes");
    if store.get(&key, false).await?.is_some() {
        return Ok(());
    }
    let ip = ranges.first_ip().to_string();
    let mut svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "kubernetes", "namespace": "default",
                      "labels": { "component": "apiserver", "provider": "kubernetes" } },
        "spec": { "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "sessionAffinity": "None",
                  "ports": [{ "name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443 }] },
    });
    meta::prepare_create(r, &mut svc, Some("default"), mint)?;
    crate::defaults::apply(r, &mut svc);
    let side = Side { claims: claims_of(&svc), owner: json!("default/kubernetes"), ..Side::default() };
    store.put_if_with(&key, &svc, 0, &side).await?;
    Ok(())
}

/// The claim keys a Service holds.
pub fn claims_of(svc: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(ip) = cluster_ip(svc) {
        keys.push(format!("{IP_CLAIMS}{ip}"));
    }
    for port in node_ports(svc) {
        keys.push(format!("{PORT_CLAIMS}{port}"));
    }
    keys
}

fn cluster_ip(svc: &Value) -> Option<Ipv4Addr> {
    svc.pointer("/spec/clusterIP").and_then(Value::as_str).and_then(|ip| ip.parse().ok())
}

fn node_ports(svc: &Value) -> Vec<u16> {
    let ports = svc.pointer("/spec/ports").and_then(Value::as_array);
    ports
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
        .filter_map(|p| u16::try_from(p).ok())
        .collect()
}

fn service_type(svc: &Value) -> &str {
    svc.pointer("/spec/type").and_then(Value::as_str).unwrap_or("ClusterIP")
}

/// Fills in the cluster IP and node ports of `new` (carrying over `old`'s on an update) and
/// returns the claim keys it must newly take. Asked-for addresses are checked against the
/// ranges and against what is taken.
pub fn allocate(
    r: &Resource,
    old: Option<&Value>,
    new: &mut Value,
    ranges: &Ranges,
    taken: &Taken,
    rng: &mut impl Rng,
) -> Result<Vec<String>, ApiError> {
    let name = corral_api::meta::name(new).to_string();
    let invalid = |field: &str, value: Value, detail: String| {
        ApiError::invalid(r, &name, vec![FieldError::invalid(field, &value, &detail)])
    };
    let held: HashSet<String> = old.map(claims_of).unwrap_or_default().into_iter().collect();
    let ty = service_type(new).to_string();
    let spec = new
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ApiError::invalid(r, &name, vec![FieldError::required("spec", "")]))?;

    // The cluster IP.
    let old_ip = old.and_then(|o| o.pointer("/spec/clusterIP")).and_then(Value::as_str).map(str::to_string);
    let asked = spec.get("clusterIP").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    let ip = match (ty.as_str(), asked, old_ip) {
        ("ExternalName", _, _) => None,
        (_, Some(a), Some(o)) if a != o => {
            return Err(invalid("spec.clusterIPs[0]", json!(a), "may not change once set".into()));
        }
        (_, None, Some(o)) => Some(o),
        (_, Some(a), _) if a == "None" => Some(a),
        (_, Some(a), old) => {
            let ip: Ipv4Addr =
                a.parse().map_err(|_| invalid("spec.clusterIPs[0]", json!(a), "must be a valid IP address".into()))?;
            let claim = format!("{IP_CLAIMS}{ip}");
            if old.is_none() && !ranges.contains_ip(ip) {
                let detail = format!(
                    "failed to allocate IP {ip}: the provided IP ({ip}) is not in the valid range. \
                     The range of valid IPs is {}",
                    ranges.cidr()
                );
                return Err(invalid("spec.clusterIPs", json!([a]), detail));
            }
            if taken.ips.contains(&ip) && !held.contains(&claim) {
                let detail = format!("failed to allocate IP {ip}: provided IP is already allocated");
                return Err(invalid("spec.clusterIPs", json!([a]), detail));
            }
            Some(a)
        }
        (_, None, None) => Some(free_ip(ranges, taken, rng).ok_or_else(|| {
            ApiError::Internal(format!("failed to allocate a service IP: range {} is full", ranges.cidr()))
        })?),
    };
    match ip {
        Some(ip) => {
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
        }
        None => {
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        }
    }

    // Node ports, for NodePort and LoadBalancer Services.
    let wants_node_ports = matches!(ty.as_str(), "NodePort" | "LoadBalancer");
    let old_ports = old.and_then(|o| o.pointer("/spec/ports")).and_then(Value::as_array).cloned().unwrap_or_default();
    let mut fresh: HashSet<u16> = HashSet::new();
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for (i, port) in ports.iter_mut().enumerate() {
            let Some(port) = port.as_object_mut() else { continue };
            if !wants_node_ports {
                port.remove("nodePort");
                continue;
            }
            let same = |p: &Value| p.get("port") == port.get("port") && p.get("protocol") == port.get("protocol");
            let carried = old_ports.iter().find(|p| same(p)).and_then(|p| p.get("nodePort")).cloned();
            let asked = port.get("nodePort").and_then(Value::as_u64).filter(|p| *p != 0);
            let chosen = match (asked, carried.and_then(|c| c.as_u64())) {
                (Some(a), _) => {
                    let field = format!("spec.ports[{i}].nodePort");
                    let a16 = u16::try_from(a).ok().filter(|p| (ranges.node_ports.0..=ranges.node_ports.1).contains(p));
                    let Some(a16) = a16 else {
                        let (lo, hi) = ranges.node_ports;
                        let detail =
                            format!("provided port is not in the valid range. The range of valid ports is {lo}-{hi}");
                        return Err(invalid(&field, json!(a), detail));
                    };
                    let mine = held.contains(&format!("{PORT_CLAIMS}{a16}"));
                    if (taken.ports.contains(&a16) && !mine) || fresh.contains(&a16) {
                        return Err(invalid(&field, json!(a), "provided port is already allocated".into()));
                    }
                    a16
                }
                (None, Some(c)) => c as u16,
                (None, None) => free_port(ranges, taken, &fresh, rng)
                    .ok_or_else(|| ApiError::Internal("failed to allocate a node port: the range is full".into()))?,
            };
            fresh.insert(chosen);
            port.insert("nodePort".into(), json!(chosen));
        }
    }
    Ok(claims_of(new).into_iter().filter(|k| !held.contains(k)).collect())
}

/// Claim keys `old` held that `new` no longer does.
pub fn released(old: &Value, new: Option<&Value>) -> Vec<String> {
    let keep: HashSet<String> = new.map(claims_of).unwrap_or_default().into_iter().collect();
    claims_of(old).into_iter().filter(|k| !keep.contains(k)).collect()
}

fn free_ip(ranges: &Ranges, taken: &Taken, rng: &mut impl Rng) -> Option<String> {
    let (lo, hi) = ranges.ip_span();
    // The first address is the `kubernetes` Service's; random picks start after it.
    let span = hi - lo;
    let start = rng.random_range(0..span.max(1));
    (0..span)
        .map(|i| Ipv4Addr::from(lo + 1 + (start + i) % span))
        .find(|ip| !taken.ips.contains(ip))
        .map(|ip| ip.to_string())
}

fn free_port(ranges: &Ranges, taken: &Taken, fresh: &HashSet<u16>, rng: &mut impl Rng) -> Option<u16> {
    let (lo, hi) = ranges.node_ports;
    let span = u32::from(hi - lo) + 1;
    let start = rng.random_range(0..span);
    (0..span).map(|i| lo + ((start + i) % span) as u16).find(|p| !taken.ports.contains(p) && !fresh.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn services() -> &'static Resource {
        corral_api::resources::find("", "services").expect("served")
    }

    fn svc(ty: &str, cluster_ip: Option<&str>, node_port: Option<u16>) -> Value {
        let mut s = json!({
            "metadata": { "name": "web", "namespace": "default" },
            "spec": { "type": ty, "ports": [{ "port": 80, "protocol": "TCP" }] }
        });
        if let Some(ip) = cluster_ip {
            s["spec"]["clusterIP"] = json!(ip);
        }
        if let Some(p) = node_port {
            s["spec"]["ports"][0]["nodePort"] = json!(p);
        }
        s
    }

    #[test]
    fn a_new_service_gets_a_free_ip_and_node_port_in_range() {
        let ranges = Ranges::parse("10.96.0.0/28", "30000-30001").unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let taken = Taken {
            ips: (2..=13).map(|i| Ipv4Addr::new(10, 96, 0, i)).collect(),
            ports: [30000].into_iter().collect(),
        };
        let mut s = svc("NodePort", None, None);
        let claims = allocate(services(), None, &mut s, &ranges, &taken, &mut rng).unwrap();
        assert_eq!(s["spec"]["clusterIP"], "10.96.0.14", "the only free address (.1 is kept for kubernetes)");
        assert_eq!(s["spec"]["clusterIPs"], json!(["10.96.0.14"]));
        assert_eq!(s["spec"]["ports"][0]["nodePort"], 30001);
        assert_eq!(claims, ["/registry/corral/serviceips/10.96.0.14", "/registry/corral/nodeports/30001"]);
    }

    #[test]
    fn asked_for_addresses_are_checked_and_kept_on_update() {
        let ranges = Ranges::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let taken = Taken { ips: [Ipv4Addr::new(10, 96, 0, 10)].into_iter().collect(), ports: HashSet::new() };
        let err = |s: &mut Value| allocate(services(), None, s, &ranges, &taken, &mut rand::rng()).unwrap_err();
        let out = err(&mut svc("ClusterIP", Some("10.0.0.1"), None)).to_status()["message"].to_string();
        assert!(out.contains("is not in the valid range. The range of valid IPs is 10.96.0.0/12"), "{out}");
        let out = err(&mut svc("ClusterIP", Some("10.96.0.10"), None)).to_status()["message"].to_string();
        assert!(out.contains("provided IP is already allocated"), "{out}");
        let out = err(&mut svc("NodePort", None, Some(80))).to_status()["message"].to_string();
        assert!(out.contains("spec.ports[0].nodePort: Invalid value: 80"), "{out}");

        let mut old = svc("NodePort", Some("10.96.0.20"), Some(30080));
        allocate(services(), None, &mut old, &ranges, &Taken::default(), &mut rng).unwrap();
        let mut update = svc("NodePort", None, None);
        let claims = allocate(services(), Some(&old), &mut update, &ranges, &taken, &mut rng).unwrap();
        assert!(claims.is_empty(), "an update keeps what the Service holds");
        assert_eq!(
            (update["spec"]["clusterIP"].as_str(), update["spec"]["ports"][0]["nodePort"].as_u64()),
            (Some("10.96.0.20"), Some(30080))
        );
        let mut changed = svc("NodePort", Some("10.96.0.21"), None);
        assert!(allocate(services(), Some(&old), &mut changed, &ranges, &taken, &mut rng).is_err(), "immutable");

        let mut to_cluster_ip = svc("ClusterIP", None, None);
        allocate(services(), Some(&old), &mut to_cluster_ip, &ranges, &taken, &mut rng).unwrap();
        assert_eq!(released(&old, Some(&to_cluster_ip)), ["/registry/corral/nodeports/30080"]);
        let mut headless = svc("ClusterIP", Some("None"), None);
        assert!(allocate(services(), None, &mut headless, &ranges, &taken, &mut rng).unwrap().is_empty());
    }
}
