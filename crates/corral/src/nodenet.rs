//! A network namespace per node for `corral up` (unless `--host-network`), as minikube's nodes have a machine
//! each: a host bridge (`cr<tag>`, the node network's first address, which the servers
//! listen on for agents), and per agent a namespace (`cr<tag>-a<i>`) joined to it by a veth
//! pair, with its own address, its default route through the host, and inside it the
//! agent, its containerd, pod bridge, service rules and DNS. The host routes each node's pod
//! CIDR through the node, so tests and users reach pods from the host, and masquerades what
//! the nodes send beyond the bridge. Everything here is
//! found again by name, so `corral down` removes it even after a crash halfway through.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The node network of one local cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeNetwork {
    /// The host bridge.
    pub bridge: String,
    /// The host's address on it (a /24): what agents reach the servers at.
    pub host_ip: Ipv4Addr,
}

impl NodeNetwork {
    /// The network of the cluster tagged `tag` (from its state directory): 10.200-10.215,
    /// a /24 each, so that two local clusters rarely share one.
    pub fn for_tag(tag: u32) -> NodeNetwork {
        let n = tag & 0x0fff;
        NodeNetwork {
            bridge: format!("cr{tag:04x}"),
            host_ip: Ipv4Addr::new(10, 200 + (n >> 8) as u8, (n & 0xff) as u8, 1),
        }
    }

    /// The node network's address (its /24).
    pub fn network(&self) -> Ipv4Addr {
        let o = self.host_ip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 0)
    }

    /// Node `i`'s (0-based) address.
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        let o = self.host_ip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 11 + i as u8)
    }

    pub fn netns(&self, agent: &str) -> String {
        format!("{}-{agent}", self.bridge)
    }

    /// The host end of an agent's veth pair (at most 15 characters).
    fn veth(&self, agent: &str) -> String {
        format!("v{}-{agent}", &self.bridge[2..])
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn exists(args: &[&str]) -> bool {
    Command::new("ip").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Makes the host bridge with the host's address, if it is not there.
pub fn ensure_host(net: &NodeNetwork) -> Result<()> {
    if !exists(&["link", "show", &net.bridge]) {
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
    }
    ip(&["addr", "replace", &format!("{}/24", net.host_ip), "dev", &net.bridge])?;
    ip(&["link", "set", &net.bridge, "up"])?;
    // The host forwards between the nodes and to their pods, and masquerades what the nodes
    // send elsewhere (containerd resolving a registry, pods reaching out), as a home router.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling IPv4 forwarding")?;
    nft(&format!(
        "table ip {b} {{}}\ndelete table ip {b}\ntable ip {b} {{\n  chain postrouting {{\n    \
         type nat hook postrouting priority srcnat; policy accept;\n    \
         ip saddr {net}/24 oifname != \"{b}\" masquerade\n  }}\n}}\n",
        b = net.bridge,
        net = net.network(),
    ))
}

/// Runs an nftables script.
pub fn nft(script: &str) -> Result<()> {
    run_nft(Command::new("nft"), script)
}

/// Runs an nftables script in a network namespace.
pub fn nft_in(netns: &str, script: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "nft"]);
    run_nft(cmd, script)
}

fn run_nft(mut cmd: Command, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (install nftables)")?;
    child.stdin.take().context("nft's stdin")?.write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft refused the rules: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Makes agent `i`'s namespace, veth pair and addresses, if they are not there.
pub fn ensure_node(net: &NodeNetwork, agent: &str, i: usize) -> Result<()> {
    let ns = net.netns(agent);
    if !std::path::Path::new(&format!("/run/netns/{ns}")).exists() {
        ip(&["netns", "add", &ns])?;
    }
    let veth = net.veth(agent);
    if !exists(&["-n", &ns, "link", "show", "eth0"]) {
        // A host end without its peer here is left from a namespace being torn down (the
        // kernel removes a deleted namespace's links asynchronously): replace it, waiting
        // up to 2 s for the old one to be gone.
        let _ = Command::new("ip").args(["link", "del", &veth]).stderr(Stdio::null()).status();
        let mut attempts = 0;
        while let Err(e) = ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]) {
            attempts += 1;
            if attempts >= 20 {
                return Err(e);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    ip(&["link", "set", &veth, "master", &net.bridge, "up"])?;
    ip(&["-n", &ns, "addr", "replace", &format!("{}/24", net.node_ip(i)), "dev", "eth0"])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    ip(&["-n", &ns, "route", "replace", "default", "via", &net.host_ip.to_string()])?;
    Ok(())
}

/// Routes a node's pod CIDR through the node, from the host.
pub fn route_pods(cidr: &str, node_ip: &str) -> Result<()> {
    ip(&["route", "replace", cidr, "via", node_ip, "proto", &corral_agent::routes::ROUTE_PROTOCOL.to_string()])
}

/// Removes an agent's namespace (its veth pair goes with it).
pub fn remove_node(net: &NodeNetwork, agent: &str) {
    let _ = Command::new("ip").args(["netns", "del", &net.netns(agent)]).stderr(Stdio::null()).status();
}

/// Removes every namespace of the network (`<bridge>-*`), recorded or not.
pub fn remove_all(net: &NodeNetwork) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).stderr(Stdio::null()).output() else { return };
    let prefix = format!("{}-", net.bridge);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(&prefix) {
            let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        }
    }
    remove_host(net);
}

/// Removes the host bridge (the routes through it go with it) and its masquerade table.
pub fn remove_host(net: &NodeNetwork) {
    let _ = Command::new("ip").args(["link", "del", &net.bridge]).stderr(Stdio::null()).status();
    let _ = nft(&format!("table ip {b} {{}}\ndelete table ip {b}\n", b = net.bridge));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses_follow_the_tag() {
        let net = NodeNetwork::for_tag(0xa1b2);
        assert_eq!(net.bridge, "cra1b2");
        assert_eq!(net.host_ip, Ipv4Addr::new(10, 201, 0xb2, 1));
        assert_eq!(net.node_ip(0), Ipv4Addr::new(10, 201, 0xb2, 11));
        assert_eq!(net.netns("a1"), "cra1b2-a1");
        assert_eq!(net.veth("a12"), "va1b2-a12");
        assert!(net.veth("a50").len() <= 15);
        assert_eq!(NodeNetwork::for_tag(0xffff).host_ip, Ipv4Addr::new(10, 215, 0xff, 1));
    }
}
