//! Corral's public-key infrastructure: the cluster CA that `corral` generates at bootstrap,
//! and the certificates it issues to servers, agents and clients.
//!
//! Every connection in a cluster is mutual TLS with certificates from one CA: Raft peers,
//! etcd API clients, and agents over QUIC (`quic`). The CA key never leaves the servers.

mod pki;
pub mod quic;

pub use pki::{Bundle, CertificateAuthority, Identity, PkiError, Usage, signing_request};
