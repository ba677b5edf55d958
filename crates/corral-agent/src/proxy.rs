//! The service proxy, as kube-proxy's nftables mode: every Service port's cluster IP (and
//! node port) is DNATed to one of its ready endpoints, chosen at random per connection, or
//! by the client's address for `sessionAffinity: ClientIP`; a port with no ready endpoint is
//! rejected. `internalTrafficPolicy: Local` (cluster IP) and `externalTrafficPolicy: Local`
//! (node port) use only this node's endpoints, and drop what comes when it has none; the
//! node port of a Local Service is not masqueraded, so its pods see the client's address.
//! The rules are one nftables table, replaced whole in one transaction whenever the
//! Services or EndpointSlices change: reconciled, never appended, so an agent that restarts
//! over stale rules converges on its first write.
//!
//! `service_ports` and `render` are pure; `Nft` applies a script.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;
use std::net::Ipv4Addr;

use corral_api::meta::{JsonAt, str_at as text};
use serde_json::Value;

/// The packet mark of connections to masquerade on their way out, so that replies come back
/// through this node (the client may be a pod on the endpoint's own bridge, or the endpoint
/// on another node).
const MASQUERADE_MARK: u32 = 0x4000;
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_S: u64 = 10800;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "" | "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => None,
        }
    }

    fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One port of one Service, with the endpoints behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name:port`, for the comments in the rules.
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: Option<u16>,
    /// Seconds a client stays with its endpoint (`sessionAffinity: ClientIP`).
    pub affinity_s: Option<u64>,
    /// Ready endpoints (ip, port), sorted.
    pub backends: Vec<(Ipv4Addr, u16)>,
    /// Indexes into `backends` of the endpoints on this node.
    pub local: Vec<usize>,
    /// `internalTrafficPolicy: Local`: the cluster IP goes to this node's endpoints only.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` (NodePort and LoadBalancer Services): the node port
    /// goes to this node's endpoints only, unmasqueraded.
    pub external_local: bool,
}

/// Endpoints (ip, port) of one Service port.
type Backends = BTreeSet<(Ipv4Addr, u16)>;

/// Every Service port that has a cluster IP, sorted by name, with the ready endpoints of its
/// EndpointSlices (matched by port name, as kube-proxy matches them); `node` is this node,
/// for the traffic policies.
pub fn service_ports<'a>(
    services: impl IntoIterator<Item = &'a Value>,
    slices: impl IntoIterator<Item = &'a Value>,
    node: &str,
) -> Vec<ServicePort> {
    let mut on_node: BTreeSet<Ipv4Addr> = BTreeSet::new();
    // (namespace, service) -> port name -> endpoints
    let mut endpoints: HashMap<(&str, &str), HashMap<&str, Backends>> = HashMap::new();
    for slice in slices {
        if text(slice, "/addressType") != "IPv4" {
            continue;
        }
        let service = text(slice, "/metadata/labels/kubernetes.io~1service-name");
        let by_port = endpoints.entry((text(slice, "/metadata/namespace"), service)).or_default();
        let ports = slice.get("ports").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let eps = slice.get("endpoints").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for ep in eps {
            // Kubernetes: a missing ready condition means ready.
            if ep.at("/conditions/ready").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            let Some(ip) = ep.at("/addresses/0").and_then(Value::as_str).and_then(|a| a.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if !node.is_empty() && text(ep, "/nodeName") == node {
                on_node.insert(ip);
            }
            for port in ports {
                let Some(number) = port.get("port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                by_port.entry(text(port, "/name")).or_default().insert((ip, number));
            }
        }
    }
    let mut out = Vec::new();
    for svc in services {
        let (ns, name) = (text(svc, "/metadata/namespace"), text(svc, "/metadata/name"));
        let Ok(cluster_ip) = text(svc, "/spec/clusterIP").parse::<Ipv4Addr>() else {
            continue; // headless, ExternalName, or not yet allocated
        };
        let affinity_s = (text(svc, "/spec/sessionAffinity") == "ClientIP").then(|| {
            svc.at("/spec/sessionAffinityConfig/clientIP/timeoutSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(DEFAULT_AFFINITY_S)
        });
        let internal_local = text(svc, "/spec/internalTrafficPolicy") == "Local";
        let external_local = text(svc, "/spec/externalTrafficPolicy") == "Local"
            && matches!(text(svc, "/spec/type"), "NodePort" | "LoadBalancer");
        let ports = svc.at("/spec/ports").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for p in ports {
            let (Some(port), Some(protocol)) = (
                p.get("port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()),
                Protocol::parse(text(p, "/protocol")),
            ) else {
                continue;
            };
            let port_name = text(p, "/name");
            let backends: Vec<(Ipv4Addr, u16)> = endpoints
                .get(&(ns, name))
                .and_then(|m| m.get(port_name))
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            let local = (0..backends.len()).filter(|j| on_node.contains(&backends[*j].0)).collect();
            out.push(ServicePort {
                name: format!(
                    "{ns}/{name}:{}",
                    if port_name.is_empty() { port.to_string() } else { port_name.to_string() }
                ),
                cluster_ip,
                port,
                protocol,
                node_port: p
                    .get("nodePort")
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p > 0),
                affinity_s,
                backends,
                local,
                internal_local,
                external_local,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The nftables script that replaces table `ip <table>` with the rules for `ports`, in one
/// transaction (creating the table first so the delete cannot fail). `pod_cidr` is this
/// node's: its pods, like the node itself, reach a Local node port through every endpoint,
/// masqueraded (as kube-proxy does), since a reply from a pod on the same bridge would not
/// come back through the node.
pub fn render(table: &str, ports: &[ServicePort], pod_cidr: Option<&str>) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{");
    for (hook, priority) in [("prerouting", "dstnat"), ("output", "-100")] {
        let _ = writeln!(w, "  chain nat-{hook} {{\n    type nat hook {hook} priority {priority}; policy accept;");
        let _ = writeln!(w, "    jump services\n  }}");
    }
    let _ = writeln!(
        w,
        "  chain nat-postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         meta mark & {MASQUERADE_MARK:#x} == {MASQUERADE_MARK:#x} masquerade\n  }}"
    );
    for hook in ["input", "forward", "output"] {
        let _ = writeln!(
            w,
            "  chain filter-{hook} {{\n    type filter hook {hook} priority filter; policy accept;\n    jump no-endpoints\n  }}"
        );
    }
    // Node ports answer on every local address but loopback (a DNAT from 127.0.0.1 could not
    // be routed back), as kube-proxy's default.
    let node_port = |proto: Protocol, port: u16| {
        format!("fib daddr type local ip daddr != 127.0.0.0/8 {} dport {port}", proto.nft())
    };
    // A port with endpoints goes to its chain; one without is rejected; one whose traffic
    // policy keeps it on this node, with no endpoint here, is dropped (as kube-proxy does).
    let _ = writeln!(w, "  chain services {{");
    for (i, p) in ports.iter().enumerate().filter(|(_, p)| !p.backends.is_empty()) {
        let (ip, proto, port, has_local) = (p.cluster_ip, p.protocol.nft(), p.port, !p.local.is_empty());
        let cluster = match (p.internal_local, has_local) {
            (false, _) => Some(format!("goto svc-{i}")),
            (true, true) => Some(format!("meta mark set meta mark | {MASQUERADE_MARK:#x} goto local-{i}")),
            (true, false) => None,
        };
        if let Some(verdict) = cluster {
            let _ = writeln!(w, "    ip daddr {ip} {proto} dport {port} {verdict} comment \"{}\"", p.name);
        }
        if let Some(np) = p.node_port {
            let rule = node_port(p.protocol, np);
            if p.external_local {
                let _ = writeln!(w, "    fib saddr type local {rule} goto svc-{i}");
                if let Some(cidr) = pod_cidr {
                    let _ = writeln!(w, "    ip saddr {cidr} {rule} goto svc-{i}");
                }
                if has_local {
                    let _ = writeln!(w, "    {rule} goto local-{i}");
                }
            } else {
                let _ = writeln!(w, "    {rule} goto svc-{i}");
            }
        }
    }
    let _ = writeln!(w, "  }}\n  chain no-endpoints {{");
    for p in ports {
        let (ip, proto, port) = (p.cluster_ip, p.protocol.nft(), p.port);
        let none = p.backends.is_empty();
        let local_none = p.local.is_empty();
        if none || (p.internal_local && local_none) {
            let (verdict, note) = if none { ("reject", "no endpoints") } else { ("drop", "no local endpoints") };
            let _ = writeln!(w, "    ip daddr {ip} {proto} dport {port} {verdict} comment \"{} has {note}\"", p.name);
        }
        if let Some(np) = p.node_port
            && (none || (p.external_local && local_none))
        {
            let verdict = if none { "reject" } else { "drop" };
            let _ = writeln!(w, "    {} {verdict}", node_port(p.protocol, np));
        }
    }
    let _ = writeln!(w, "  }}");
    for (i, p) in ports.iter().enumerate().filter(|(_, p)| !p.backends.is_empty()) {
        // With affinity, a client seen lately goes back to its endpoint: one set of recent
        // clients per endpoint, declared before the chains that read it.
        if let Some(timeout) = p.affinity_s {
            for j in 0..p.backends.len() {
                let _ = writeln!(
                    w,
                    "  set affinity-{i}-{j} {{
    type ipv4_addr; flags dynamic,timeout; timeout {timeout}s;
  }}"
                );
            }
        }
        let all: Vec<usize> = (0..p.backends.len()).collect();
        let _ = writeln!(w, "  chain svc-{i} {{\n    meta mark set meta mark | {MASQUERADE_MARK:#x}");
        pick(w, i, p.affinity_s.is_some(), &all);
        if p.internal_local || p.external_local {
            let _ = writeln!(w, "  chain local-{i} {{");
            pick(w, i, p.affinity_s.is_some(), &p.local);
        }
        for (j, (ip, port)) in p.backends.iter().enumerate() {
            let _ = writeln!(w, "  chain ep-{i}-{j} {{");
            if p.affinity_s.is_some() {
                let _ = writeln!(w, "    update @affinity-{i}-{j} {{ ip saddr }}");
            }
            let _ = writeln!(w, "    meta l4proto {} dnat to {ip}:{port}\n  }}", p.protocol.nft());
        }
    }
    let _ = writeln!(w, "}}");
    s
}

/// The end of a chain that picks one of `endpoints` (indexes of port `i`'s backends): the
/// one a recent client had, with affinity, else one at random. An empty list picks nothing.
fn pick(w: &mut String, i: usize, affinity: bool, endpoints: &[usize]) {
    if affinity {
        for j in endpoints {
            let _ = writeln!(w, "    ip saddr @affinity-{i}-{j} goto ep-{i}-{j}");
        }
    }
    if !endpoints.is_empty() {
        let choices: Vec<String> =
            endpoints.iter().enumerate().map(|(k, j)| format!("{k} : goto ep-{i}-{j}")).collect();
        let _ = writeln!(w, "    numgen random mod {} vmap {{ {} }}", endpoints.len(), choices.join(", "));
    }
    let _ = writeln!(w, "  }}");
}

/// Where scripts are applied.
pub trait Firewall: Send + Sync + 'static {
    fn apply(&self, script: &str) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// The machine's nftables, through `nft -f -` in the agent's network namespace.
pub struct Nft;

impl Firewall for Nft {
    async fn apply(&self, script: &str) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("running nft: {e} (install nftables)"))?;
        let mut stdin = child.stdin.take().ok_or("nft's stdin")?;
        stdin.write_all(script.as_bytes()).await.map_err(|e| format!("writing to nft: {e}"))?;
        drop(stdin);
        let out = child.wait_with_output().await.map_err(|e| format!("waiting for nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("nft refused the rules: {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
    }
}

/// Removes the table (at `corral down`, or when the proxy is turned off).
pub fn remove_script(table: &str) -> String {
    format!("table ip {table} {{}}\ndelete table ip {table}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(name: &str, ip: &str, affinity: bool, node_port: Option<u16>) -> Value {
        let mut port = json!({"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080});
        if let Some(np) = node_port {
            port["nodePort"] = json!(np);
        }
        json!({
            "metadata": {"namespace": "shop", "name": name},
            "spec": {"clusterIP": ip, "ports": [port],
                     "sessionAffinity": if affinity { "ClientIP" } else { "None" }},
        })
    }

    fn slice(service: &str, endpoints: &[(&str, Option<bool>)]) -> Value {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|(ip, ready)| {
                let mut ep = json!({"addresses": [ip]});
                if let Some(r) = ready {
                    ep["conditions"] = json!({"ready": r});
                }
                ep
            })
            .collect();
        json!({
            "metadata": {"namespace": "shop", "name": format!("{service}-abc"),
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps,
        })
    }

    #[test]
    fn ready_endpoints_back_each_service_port() {
        let services = [
            service("web", "10.96.0.20", false, Some(30080)),
            service("db", "10.96.0.21", true, None),
            service("headless", "None", false, None),
        ];
        let slices = [
            slice("web", &[("10.244.1.5", None), ("10.244.2.7", Some(true)), ("10.244.2.8", Some(false))]),
            // A second slice of the same Service adds to it; a duplicate counts once.
            slice("web", &[("10.244.1.5", Some(true)), ("10.244.3.2", None)]),
        ];
        let ports = service_ports(&services, &slices, "");
        let names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["shop/db:http", "shop/web:http"], "headless Services have no rules");
        let web = &ports[1];
        assert_eq!(web.node_port, Some(30080));
        let backends: Vec<String> = web.backends.iter().map(|(ip, port)| format!("{ip}:{port}")).collect();
        assert_eq!(backends, ["10.244.1.5:8080", "10.244.2.7:8080", "10.244.3.2:8080"], "not-ready endpoints left out");
        assert_eq!((ports[0].affinity_s, ports[0].backends.len()), (Some(DEFAULT_AFFINITY_S), 0));
    }

    #[test]
    fn the_table_is_replaced_whole_with_dnat_affinity_and_rejects() {
        let services = [service("web", "10.96.0.20", true, Some(30080)), service("db", "10.96.0.21", false, None)];
        let slices = [slice("web", &[("10.244.1.5", None), ("10.244.2.7", None)])];
        let script = render("corral", &service_ports(&services, &slices, ""), None);
        let lines: Vec<&str> = script.lines().map(str::trim).collect();
        assert_eq!(&lines[..3], ["table ip corral {}", "delete table ip corral", "table ip corral {"]);
        for wanted in [
            "ip daddr 10.96.0.20 tcp dport 80 goto svc-1 comment \"shop/web:http\"",
            "fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 30080 goto svc-1",
            "ip saddr @affinity-1-0 goto ep-1-0",
            "meta mark set meta mark | 0x4000",
            "numgen random mod 2 vmap { 0 : goto ep-1-0, 1 : goto ep-1-1 }",
            "update @affinity-1-1 { ip saddr }",
            "meta l4proto tcp dnat to 10.244.2.7:8080",
            "ip daddr 10.96.0.21 tcp dport 80 reject comment \"shop/db:http has no endpoints\"",
            "meta mark & 0x4000 == 0x4000 masquerade",
        ] {
            assert!(lines.contains(&wanted), "{wanted} in:\n{script}");
        }
        assert_eq!(
            script,
            render("corral", &service_ports(&services, &slices, ""), None),
            "the same input, the same script"
        );
    }

    #[test]
    fn local_traffic_policies_keep_to_this_nodes_endpoints() {
        let mut web = service("web", "10.96.0.20", false, Some(30080));
        web["spec"]["type"] = json!("NodePort");
        web["spec"]["externalTrafficPolicy"] = json!("Local");
        let mut db = service("db", "10.96.0.21", false, None);
        db["spec"]["internalTrafficPolicy"] = json!("Local");
        let on_nodes = |service: &str, eps: &[(&str, &str)]| {
            let mut s = slice(service, &eps.iter().map(|(ip, _)| (*ip, None)).collect::<Vec<_>>());
            for (k, (_, node)) in eps.iter().enumerate() {
                s["endpoints"][k]["nodeName"] = json!(node);
            }
            s
        };
        let slices =
            [on_nodes("web", &[("10.244.1.5", "a1"), ("10.244.2.7", "a2")]), on_nodes("db", &[("10.244.2.9", "a2")])];
        let services = [web, db];

        // On a1: the node port goes to a1's endpoint only, unmarked; the cluster IP to both.
        let ports = service_ports(&services, &slices, "a1");
        assert_eq!((ports[1].local.clone(), ports[1].external_local, ports[1].internal_local), (vec![0], true, false));
        let script = render("corral", &ports, Some("10.244.1.0/24"));
        let lines: Vec<&str> = script.lines().map(str::trim).collect();
        for wanted in [
            "fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 30080 goto local-1",
            // The node itself and its pods go to every endpoint, masqueraded.
            "fib saddr type local fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 30080 goto svc-1",
            "ip saddr 10.244.1.0/24 fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 30080 goto svc-1",
            "ip daddr 10.96.0.20 tcp dport 80 goto svc-1 comment \"shop/web:http\"",
            "numgen random mod 1 vmap { 0 : goto ep-1-0 }",
            // db lives on a2 only: a1 drops its cluster IP.
            "ip daddr 10.96.0.21 tcp dport 80 drop comment \"shop/db:http has no local endpoints\"",
        ] {
            assert!(lines.contains(&wanted), "{wanted} in:\n{script}");
        }
        let local_chain = &script[script.find("chain local-1").unwrap()..];
        assert!(!local_chain[..local_chain.find('}').unwrap()].contains("mark"), "the client's address is kept");

        // On a2: db's cluster IP goes to its endpoint (masqueraded), web's node port to a2's.
        let script = render("corral", &service_ports(&services, &slices, "a2"), None);
        let lines: Vec<&str> = script.lines().map(str::trim).collect();
        for wanted in [
            "ip daddr 10.96.0.21 tcp dport 80 meta mark set meta mark | 0x4000 goto local-0 comment \"shop/db:http\"",
            "numgen random mod 1 vmap { 0 : goto ep-1-1 }",
        ] {
            assert!(lines.contains(&wanted), "{wanted} in:\n{script}");
        }
        assert!(!script.contains("has no local endpoints"), "{script}");

        // On a node with neither: the node port is dropped, not rejected.
        let script = render("corral", &service_ports(&services, &slices, "s1"), None);
        assert!(script.contains("tcp dport 30080 drop"), "{script}");
    }
}
