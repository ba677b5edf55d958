//! etcd-style URLs: `https://host:port`.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};

/// The socket address of `https://127.0.0.1:2379`.
pub fn socket_addr(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .with_context(|| format!("URL {url:?} has no https:// scheme"))?;
    let host_port = rest.trim_end_matches('/');
    host_port.parse().with_context(|| format!("URL {url:?}: want https://IP:PORT"))
}

/// Parses `--initial-cluster name=url,name=url`.
pub fn parse_initial_cluster(spec: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let Some((name, url)) = part.split_once('=') else {
            bail!("--initial-cluster entry {part:?}: want NAME=https://IP:PORT");
        };
        socket_addr(url)?;
        out.push((name.to_string(), url.to_string()));
    }
    if out.is_empty() {
        bail!("--initial-cluster is empty: want NAME=https://IP:PORT[,...]");
    }
    Ok(out)
}

/// A stable 64-bit id (FNV-1a): member and cluster ids derived from names and URLs, the
/// same on every server.
pub fn stable_id(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf29ce484222325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0u8)) {
            hash ^= b as u64;
            hash = hash.wrapping_mul(0x100000001b3);
        }
    }
    hash.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_clusters_parse_or_say_why_not() {
        assert_eq!(socket_addr("https://127.0.0.1:2379").unwrap().port(), 2379);
        assert!(socket_addr("127.0.0.1:2379").unwrap_err().to_string().contains("scheme"));
        let c = parse_initial_cluster("a=https://127.0.0.1:1,b=https://127.0.0.1:2").unwrap();
        assert_eq!(c.len(), 2);
        assert!(parse_initial_cluster("a").is_err());
        assert_ne!(stable_id(&["a", "x"]), stable_id(&["ax", ""]));
    }
}
