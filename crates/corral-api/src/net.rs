//! IPv4 networks as flags and specs write them (`10.244.0.0/16`): the service range, the
//! cluster CIDR and the nodes' pod CIDRs.

use std::net::Ipv4Addr;

/// An IPv4 network: address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub base: u32,
    pub prefix: u8,
}

impl Cidr {
    /// `a.b.c.d/n`, with no host bits set.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (cidr, addr) = Cidr::network_of(text)?;
        if cidr.base != addr {
            return Err(format!("{text:?} has host bits set"));
        }
        Ok(cidr)
    }

    /// The network `a.b.c.d/n` lies in (host bits cleared, as Go's ParseCIDR gives it), and
    /// the address as written.
    pub fn network_of(text: &str) -> Result<(Cidr, u32), String> {
        let (addr, prefix) = text.split_once('/').ok_or_else(|| format!("{text:?} is not a CIDR (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{text:?}: {addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{text:?}: bad prefix"))?;
        let addr = u32::from(addr);
        Ok((Cidr { base: addr & mask(prefix), prefix }, addr))
    }

    /// The network's first address: a node's bridge (its pods' gateway) on its pod CIDR.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    /// Whether `other` lies within this network.
    pub fn contains(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && other.base & mask(self.prefix) == self.base
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) }
}
