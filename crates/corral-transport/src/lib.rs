//! Corral's public-key infrastructure and agent transport: the cluster CA that `corral`
//! generates at bootstrap, the certificates it issues to servers, agents and clients, join
//! tokens (`token`), QUIC endpoints with mutual TLS (`quic`), rustls settings for the TCP ports
//! and HTTP/2 clients (`tls`), and the length-prefixed frames
//! the agent protocol sends over QUIC streams (`frame`).
//!
//! Every connection in a cluster is mutual TLS with certificates from one CA: Raft peers,
//! etcd API clients, and agents over QUIC. The CA key never leaves the servers.

pub mod frame;
mod pki;
pub mod quic;
pub mod tls;
pub mod token;

pub use pki::{Bundle, CertificateAuthority, Identity, PkiError, Usage, signing_request};
pub use token::JoinToken;
