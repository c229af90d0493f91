//! TLS for the broker's TCP listeners (rustls, TLS 1.3 only, ring provider).
//!
//! `kms init` makes a broker-local CA (`tls/ca.pem`, `tls/ca.key`) and a server
//! certificate it issues (`tls/server.pem`, `tls/server.key`) for `localhost`,
//! `127.0.0.1`, `::1` and any `--tls-name`. Clients trust `tls/ca.pem`
//! (`--ca` / `CLOISTER_KMS_CA`). An operator may serve a certificate of their own
//! with `--tls-cert` / `--tls-key` instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;

use cloister_attestation::keyfile;

use cloister_kms_api::error::{self, KmsError};
use cloister_kms_api::tls::{provider, read_certs};

pub struct TlsFiles {
    pub dir: PathBuf,
}

impl TlsFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TlsFiles { dir: dir.into() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// Makes the local CA and a server certificate for `names` (plus localhost).
    pub fn init(&self, extra_names: &[String]) -> Result<(), KmsError> {
        let fail =
            |e: rcgen::Error| error::internal(format!("cannot make the TLS certificates: {e}"));
        let kf = |e: keyfile::KeyFileError| error::internal(e.to_string());
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| error::internal(format!("{}: {e}", self.dir.display())))?;
        let now = OffsetDateTime::now_utc();
        let ca_key = KeyPair::generate().map_err(fail)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = DistinguishedName::new();
        ca.distinguished_name
            .push(DnType::OrganizationName, "Cloister");
        ca.distinguished_name
            .push(DnType::CommonName, "Cloister KMS local CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = now - time::Duration::minutes(5);
        ca.not_after = now + time::Duration::days(3650);
        let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;

        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        names.extend(extra_names.iter().cloned());
        let server_key = KeyPair::generate().map_err(fail)?;
        let mut server = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        server.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .map_err(fail)?;
        server.distinguished_name = DistinguishedName::new();
        server
            .distinguished_name
            .push(DnType::CommonName, "Cloister KMS");
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        server.not_before = now - time::Duration::minutes(5);
        server.not_after = now + time::Duration::days(825);
        let issuer = Issuer::new(ca, ca_key);
        let server_cert = server.signed_by(&server_key, &issuer).map_err(fail)?;

        keyfile::write_secret(
            &self.ca_key(),
            issuer.key().serialize_pem().as_bytes(),
            false,
        )
        .map_err(kf)?;
        keyfile::write_public(&self.ca_cert(), ca_cert.pem().as_bytes(), false).map_err(kf)?;
        keyfile::write_secret(
            &self.server_key(),
            server_key.serialize_pem().as_bytes(),
            false,
        )
        .map_err(kf)?;
        keyfile::write_public(&self.server_cert(), server_cert.pem().as_bytes(), false)
            .map_err(kf)?;
        Ok(())
    }
}

/// A TLS 1.3 server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, KmsError> {
    let certs = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        error::validation(format!("{}: not a PEM private key ({e})", key.display()))
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| error::internal(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| error::validation(format!("TLS certificate and key do not fit: {e}")))?;
    Ok(Arc::new(config))
}
