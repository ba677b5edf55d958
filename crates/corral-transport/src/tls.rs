//! rustls settings for TCP from a directory of PEM files (`ca.crt`, `NAME.crt`, `NAME.key`):
//! the servers' gRPC ports and the Kubernetes API, and the binary's own HTTP/2 clients. The
//! QUIC endpoints (`quic`) build theirs from the same pieces.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::quic::TransportError;

/// A client that connects but does not finish its TLS handshake in this time is dropped, so
/// that it holds no task nor descriptor (HTTP/2 pings find dead clients after it).
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The server side of a TLS handshake on an accepted connection, bounded by
/// [`HANDSHAKE_TIMEOUT`]; `None` (logged at debug level) when it fails or times out.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Whether a server asks its clients for a certificate from the cluster CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCerts {
    /// A client without one is refused (Raft peers, the etcd API).
    Required,
    /// A client without one may still authenticate otherwise (bearer tokens).
    Optional,
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::File(what.into(), e.to_string()))
}

pub(crate) fn key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TransportError::File(what.into(), e.to_string()))
}

pub(crate) fn read(path: &Path) -> Result<String, TransportError> {
    std::fs::read_to_string(path).map_err(|e| TransportError::File(path.display().to_string(), e.to_string()))
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(&read(ca)?, &ca.display().to_string())? {
        roots.add(cert).map_err(|e| TransportError::Tls(format!("{}: {e}", ca.display())))?;
    }
    Ok(roots)
}

fn identity(
    cert: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TransportError> {
    Ok((certs(&read(cert)?, &cert.display().to_string())?, key(&read(key_path)?, &key_path.display().to_string())?))
}

/// A server presenting `dir/NAME.crt`, verifying clients against `dir/ca.crt` as `clients`
/// says, speaking the `alpn` protocols.
pub fn server_config(
    dir: &Path,
    name: &str,
    clients: ClientCerts,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    let (chain, key) = identity(&dir.join(format!("{name}.crt")), &dir.join(format!("{name}.key")))?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&dir.join("ca.crt"))?), provider());
    let verifier = match clients {
        ClientCerts::Required => verifier,
        ClientCerts::Optional => verifier.allow_unauthenticated(),
    };
    let verifier = verifier.build().map_err(|e| TransportError::Tls(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TransportError::Tls(format!("server certificate: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client trusting the CA in `ca`, presenting `cert` and `key`, speaking HTTP/2 (by ALPN).
pub fn h2_client_config(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig, TransportError> {
    let (chain, key) = identity(cert, key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TransportError::Tls(format!("client certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertificateAuthority, Usage};

    #[test]
    fn servers_and_clients_from_one_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate("test").expect("CA");
        ca.write(dir.path()).expect("writes the CA");
        ca.issue("server", &[], &["127.0.0.1".to_string()], Usage::ServerAndClient)
            .expect("issues")
            .write(dir.path(), "server")
            .expect("writes");

        let required = server_config(dir.path(), "server", ClientCerts::Required, &[b"h2"]).expect("required");
        assert_eq!(required.alpn_protocols, vec![b"h2".to_vec()]);
        let optional =
            server_config(dir.path(), "server", ClientCerts::Optional, &[b"h2", b"http/1.1"]).expect("optional");
        assert_eq!(optional.alpn_protocols.len(), 2);
        let client = h2_client_config(
            &dir.path().join("ca.crt"),
            &dir.path().join("server.crt"),
            &dir.path().join("server.key"),
        )
        .expect("client");
        assert_eq!(client.alpn_protocols, vec![b"h2".to_vec()]);

        let missing = server_config(dir.path(), "nobody", ClientCerts::Required, &[b"h2"]).expect_err("no such files");
        assert!(missing.to_string().contains("nobody.crt"), "the error names the file: {missing}");
    }
}
