//! tonic's TLS settings for the peer client, from a directory of PEM files (ca.crt,
//! NAME.crt, NAME.key). rustls's, for the gRPC ports and the binary's own HTTP/2 clients,
//! are `corral_transport::tls`'s.

use std::path::Path;

use anyhow::{Context, Result};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Client side: trust the cluster CA and present our certificate.
pub fn client_config(dir: &Path, name: &str) -> Result<ClientTlsConfig> {
    let identity = Identity::from_pem(read(&dir.join(format!("{name}.crt")))?, read(&dir.join(format!("{name}.key")))?);
    Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&dir.join("ca.crt"))?)).identity(identity))
}
