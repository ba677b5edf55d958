//! The agent's routes to other nodes' pods against a real kernel: in a network namespace the
//! test makes (and removes), Corral's routes are added, moved and removed to match what the
//! Nodes say, and a route somebody else made is left alone.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Result, bail};
use corral_agent::routes::{IpRoutes, ROUTE_PROTOCOL, Routes};

/// A network namespace with one link on 192.0.2.1/24, removed when dropped.
struct Netns(String);

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Netns {
    fn new() -> Result<Netns> {
        let name = format!("corral-routes-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])?;
        ip(&["-n", &ns.0, "addr", "add", "192.0.2.1/24", "dev", "v0"])?;
        ip(&["-n", &ns.0, "link", "set", "v0", "up"])?;
        ip(&["-n", &ns.0, "link", "set", "v1", "up"])?;
        Ok(ns)
    }

    fn routes(&self) -> Result<String> {
        ip(&["-n", &self.0, "-4", "route", "show"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn route(cidr: &str, via: [u8; 4]) -> (String, Ipv4Addr) {
    (cidr.to_string(), Ipv4Addr::from(via))
}

#[tokio::test]
async fn routes_are_reconciled_and_foreign_ones_kept() -> Result<()> {
    let ns = Netns::new()?;
    let routes = IpRoutes { netns: Some(ns.0.clone()) };
    ip(&["-n", &ns.0, "route", "add", "10.244.9.0/24", "via", "192.0.2.99"])?;

    // Two nodes' pod CIDRs.
    let first = Routes::from([route("10.244.1.0/24", [192, 0, 2, 12]), route("10.244.2.0/24", [192, 0, 2, 13])]);
    assert_eq!(routes.reconcile(&first).await.map_err(anyhow::Error::msg)?, (2, 0));
    assert_eq!(routes.current().await.map_err(anyhow::Error::msg)?, first);
    let table = ns.routes()?;
    assert!(table.contains(&format!("10.244.1.0/24 via 192.0.2.12 dev v0 proto {ROUTE_PROTOCOL}")), "{table}");

    // Nothing changed: nothing written.
    assert_eq!(routes.reconcile(&first).await.map_err(anyhow::Error::msg)?, (0, 0));

    // One node moved to another address, one left, one joined.
    let second = Routes::from([route("10.244.1.0/24", [192, 0, 2, 22]), route("10.244.3.0/24", [192, 0, 2, 14])]);
    assert_eq!(routes.reconcile(&second).await.map_err(anyhow::Error::msg)?, (2, 1));
    assert_eq!(routes.current().await.map_err(anyhow::Error::msg)?, second);

    // All gone: Corral's routes go, the foreign one stays.
    routes.reconcile(&Routes::new()).await.map_err(anyhow::Error::msg)?;
    let table = ns.routes()?;
    assert!(!table.contains("10.244.1.0/24") && !table.contains("10.244.3.0/24"), "{table}");
    assert!(table.contains("10.244.9.0/24 via 192.0.2.99"), "{table}");
    Ok(())
}
