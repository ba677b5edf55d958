//! tonic TLS settings from a directory of PEM files (ca.crt, NAME.crt, NAME.key).

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
