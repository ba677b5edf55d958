//! QUIC endpoints for the agent protocol, with the cluster's mutual TLS.
//!
//! Servers present `[leaf, CA]` and accept clients with or without a certificate: an agent
//! that has not joined yet has none, and may only ask to join (the application checks
//! `peer()` on every request). Agents trust either the cluster CA, or, before they have it,
//! the CA whose SHA-256 their join token pins.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::tls::{certs, key, provider, read};

/// The application protocol both ends must agree on.
pub const ALPN: &[u8] = b"corral-agent/1";

/// How quickly a dead peer is noticed: keep-alives every 400 ms, the connection given up
/// after two silent seconds (a killed server sends nothing, so this bounds failover: five
/// keep-alives lost in a row, never on a working LAN, even with a busy server).
pub const KEEP_ALIVE: Duration = Duration::from_millis(400);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}: {1}")]
    File(String, String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("QUIC: {0}")]
    Quic(String),
}

/// The SHA-256 of a CA certificate (DER), in hex: what join tokens pin.
pub fn ca_hash(ca_pem: &str) -> Result<String, TransportError> {
    let der = certs(ca_pem, "CA")?.into_iter().next().ok_or_else(|| TransportError::Tls("no CA certificate".into()))?;
    Ok(Sha256::digest(der.as_ref()).iter().map(|b| format!("{b:02x}")).collect())
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("a small timeout")));
    t.max_concurrent_bidi_streams(1024u32.into());
    Arc::new(t)
}

/// A server endpoint on `addr` with `dir/name.crt`, `dir/name.key` and `dir/ca.crt`.
pub fn server(addr: SocketAddr, dir: &Path, name: &str) -> Result<quinn::Endpoint, TransportError> {
    let ca_pem = read(&dir.join("ca.crt"))?;
    let mut chain = certs(&read(&dir.join(format!("{name}.crt")))?, "server certificate")?;
    let ca = certs(&ca_pem, "ca.crt")?;
    chain.extend(ca.iter().cloned());
    let key = key(&read(&dir.join(format!("{name}.key")))?, "server key")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots.add(c).map_err(|e| TransportError::Tls(e.to_string()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    quinn::Endpoint::server(config, addr).map_err(|e| TransportError::Quic(format!("binding {addr}: {e}")))
}

/// Whom a client trusts as server.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The cluster CA (PEM).
    Ca(String),
    /// Before joining: the CA whose SHA-256 (hex) the join token carries.
    Pinned(String),
}

/// A client's certificate and key (PEM), once it has joined.
#[derive(Clone, Debug)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A client endpoint (bound to an ephemeral port) that trusts servers as `trust` says and
/// presents `identity` when it has one.
pub fn client(trust: &Trust, identity: Option<&ClientIdentity>) -> Result<quinn::Endpoint, TransportError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let builder = match trust {
        Trust::Ca(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(pem, "ca.crt")? {
                roots.add(c).map_err(|e| TransportError::Tls(e.to_string()))?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::Pinned(hash) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa { hash: hash.to_lowercase(), provider: provider() })),
    };
    let mut tls = match identity {
        Some(id) => builder
            .with_client_auth_cert(certs(&id.cert_pem, "client certificate")?, key(&id.key_pem, "client key")?)
            .map_err(|e| TransportError::Tls(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
        .map_err(|e| TransportError::Quic(format!("binding a client socket: {e}")))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Who is on the other end of a connection: the CN and O of its client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub groups: Vec<String>,
}

/// The peer's identity, None when it presented no certificate (only joining is allowed then).
pub fn peer(conn: &quinn::Connection) -> Option<Peer> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let groups = subject.iter_organization().filter_map(|o| o.as_str().ok().map(str::to_string)).collect();
    Some(Peer { name, groups })
}

/// Verifies a server against the CA its chain carries, when that CA's hash is the pinned one.
#[derive(Debug)]
struct PinnedCa {
    hash: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let hex =
            |c: &CertificateDer<'_>| Sha256::digest(c.as_ref()).iter().map(|b| format!("{b:02x}")).collect::<String>();
        let ca = intermediates.iter().find(|c| hex(c) == self.hash).ok_or_else(|| {
            rustls::Error::General("the server did not present the cluster CA the join token names".into())
        })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertificateAuthority, Usage, signing_request};

    struct Server {
        _dir: tempfile::TempDir,
        endpoint: quinn::Endpoint,
        ca: CertificateAuthority,
    }

    fn server_with(ca: CertificateAuthority) -> Server {
        let dir = tempfile::tempdir().unwrap();
        ca.write(dir.path()).unwrap();
        ca.issue("server-1", &[], &["127.0.0.1".into()], Usage::ServerAndClient)
            .unwrap()
            .write(dir.path(), "server")
            .unwrap();
        let endpoint = server("127.0.0.1:0".parse().unwrap(), dir.path(), "server").unwrap();
        Server { _dir: dir, endpoint, ca }
    }

    /// Connects, and returns what the server saw of the client (or the server's error).
    async fn handshake(
        s: &Server,
        trust: &Trust,
        id: Option<&ClientIdentity>,
    ) -> (Result<(), String>, Result<Option<Peer>, String>) {
        let client = client(trust, id).unwrap();
        let addr = s.endpoint.local_addr().unwrap();
        let accept = async {
            let incoming = s.endpoint.accept().await.expect("an incoming connection");
            match incoming.await {
                Ok(conn) => Ok(peer(&conn)),
                Err(e) => Err(e.to_string()),
            }
        };
        let connect = async {
            match client.connect(addr, "127.0.0.1").map_err(|e| e.to_string())?.await {
                // Hold the connection until the server has seen it.
                Ok(conn) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    drop(conn);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        };
        let (c, a) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(connect, accept) }).await.unwrap();
        (c, a)
    }

    #[tokio::test]
    async fn an_agent_joins_with_a_pinned_ca_then_connects_with_its_own_certificate() {
        let s = server_with(CertificateAuthority::generate("corral-ca").unwrap());
        let pin = Trust::Pinned(ca_hash(s.ca.cert_pem()).unwrap());
        let (client_side, server_side) = handshake(&s, &pin, None).await;
        assert!(client_side.is_ok(), "{client_side:?}");
        assert_eq!(server_side, Ok(None), "no certificate yet: the server knows it may only join");

        let (key_pem, csr) = signing_request("anything-the-agent-asks").unwrap();
        let cert_pem = s.ca.sign_request(&csr, "system:node:worker-1", &["system:nodes"]).unwrap();
        let id = ClientIdentity { cert_pem, key_pem };
        let (client_side, server_side) = handshake(&s, &Trust::Ca(s.ca.cert_pem().to_string()), Some(&id)).await;
        assert!(client_side.is_ok(), "{client_side:?}");
        assert_eq!(
            server_side,
            Ok(Some(Peer { name: "system:node:worker-1".into(), groups: vec!["system:nodes".into()] })),
            "the CA's subject, not the one requested"
        );
    }

    #[tokio::test]
    async fn a_wrong_pin_and_a_foreign_certificate_are_refused() {
        let s = server_with(CertificateAuthority::generate("corral-ca").unwrap());
        let other = CertificateAuthority::generate("other-ca").unwrap();
        let (client_side, _) = handshake(&s, &Trust::Pinned(ca_hash(other.cert_pem()).unwrap()), None).await;
        assert!(client_side.unwrap_err().contains("cluster CA"), "the agent refuses a server its token does not name");

        let foreign = other.issue("system:node:evil", &["system:nodes"], &[], Usage::Client).unwrap();
        let id = ClientIdentity { cert_pem: foreign.cert_pem, key_pem: foreign.key_pem };
        let (_, server_side) = handshake(&s, &Trust::Ca(s.ca.cert_pem().to_string()), Some(&id)).await;
        assert!(server_side.is_err(), "the server refuses a certificate from another CA: {server_side:?}");
    }
}
