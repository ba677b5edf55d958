//! TLS settings from PEM files: tonic's, from a directory (ca.crt, NAME.crt, NAME.key), and
//! rustls's for the binary's own HTTP/2 clients.

use std::path::Path;

use anyhow::{Context, Result};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Server side: our certificate, and client certificates required from the cluster CA.
pub fn server_config(dir: &Path, name: &str) -> Result<ServerTlsConfig> {
    let identity = Identity::from_pem(read(&dir.join(format!("{name}.crt")))?, read(&dir.join(format!("{name}.key")))?);
    Ok(ServerTlsConfig::new().identity(identity).client_ca_root(Certificate::from_pem(read(&dir.join("ca.crt"))?)))
}

/// Client side: trust the cluster CA and present our certificate.
pub fn client_config(dir: &Path, name: &str) -> Result<ClientTlsConfig> {
    let identity = Identity::from_pem(read(&dir.join(format!("{name}.crt")))?, read(&dir.join(format!("{name}.key")))?);
    Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&dir.join("ca.crt"))?)).identity(identity))
}

/// A rustls client for HTTP/2 (by ALPN): trust the CA in `ca`, present `cert` and `key`.
pub fn h2_client_config(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for found in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
        roots.add(found.with_context(|| format!("reading {}", ca.display()))?)?;
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
