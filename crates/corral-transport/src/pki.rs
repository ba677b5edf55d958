use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The CA lives ten years; leaf certificates two.
const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 730;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid subject alternative name {0:?}: want a DNS name or an IP address")]
    BadSan(String),
}

/// What a certificate may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// Servers: accept connections and dial their peers.
    ServerAndClient,
    /// Clients only: kubectl, etcdctl, agents.
    Client,
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Identity {
    /// Writes `NAME.crt` and `NAME.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(), PkiError> {
        write_file(&dir.join(format!("{name}.crt")), self.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(format!("{name}.key")), self.key_pem.as_bytes(), 0o600)
    }

    pub fn read(dir: &Path, name: &str) -> Result<Self, PkiError> {
        Ok(Self {
            cert_pem: read_file(&dir.join(format!("{name}.crt")))?,
            key_pem: read_file(&dir.join(format!("{name}.key")))?,
        })
    }
}

/// A CA certificate with what a peer needs to trust it.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub ca_pem: String,
    pub identity: Identity,
}

/// The cluster CA.
pub struct CertificateAuthority {
    identity: Identity,
    key: KeyPair,
}

impl CertificateAuthority {
    /// Generates a new CA named `name`.
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        Ok(Self { identity: Identity { cert_pem: cert.pem(), key_pem: key.serialize_pem() }, key })
    }

    /// Loads the CA from `ca.crt` and `ca.key` in `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let identity = Identity::read(dir, "ca")?;
        let key = KeyPair::from_pem(&identity.key_pem)?;
        Ok(Self { identity, key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.identity.cert_pem
    }

    /// Writes `ca.crt` and `ca.key` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        self.identity.write(dir, "ca")
    }

    /// Issues a certificate for `common_name` in `organizations` (Kubernetes reads them as
    /// user and groups), valid for the DNS names and IP addresses in `sans`.
    pub fn issue(
        &self,
        common_name: &str,
        organizations: &[&str],
        sans: &[String],
        usage: Usage,
    ) -> Result<Identity, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, organizations);
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s.clone().try_into().map(SanType::DnsName).map_err(|_| PkiError::BadSan(s.clone())),
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = match usage {
            Usage::ServerAndClient => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        let issuer = Issuer::from_ca_cert_pem(&self.identity.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Identity { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

impl CertificateAuthority {
    /// Signs a certificate signing request for the public key it carries, with the subject
    /// the CA decides (`common_name`, `organizations`), never the one the request asks for.
    pub fn sign_request(&self, csr_pem: &str, common_name: &str, organizations: &[&str]) -> Result<String, PkiError> {
        let mut request = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let params = &mut request.params;
        params.distinguished_name = dn(common_name, organizations);
        params.subject_alt_names = Vec::new();
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        let issuer = Issuer::from_ca_cert_pem(&self.identity.cert_pem, &self.key)?;
        Ok(request.signed_by(&issuer)?.pem())
    }
}

/// A new key pair and a signing request for it: the key never leaves the machine that asks.
pub fn signing_request(common_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(common_name, &[]);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

fn dn(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for org in organizations {
        dn.push(DnType::OrganizationName, *org);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io { path: path.display().to_string(), source };
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(io)?;
    f.write_all(data).map_err(io)
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_subject_and_chain_to_the_ca() {
        let ca = CertificateAuthority::generate("corral-ca").unwrap();
        let leaf =
            ca.issue("admin", &["system:masters"], &["localhost".into(), "127.0.0.1".into()], Usage::Client).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(leaf.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert_eq!(cert.subject().iter_common_name().next().unwrap().as_str().unwrap(), "admin");
        assert_eq!(cert.subject().iter_organization().next().unwrap().as_str().unwrap(), "system:masters");
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
        let ca_cert = ca_pem.parse_x509().unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        let validity = cert.validity().time_to_expiration().unwrap();
        assert!(validity.whole_days() > 700 && validity.whole_days() <= 730);
    }
}
