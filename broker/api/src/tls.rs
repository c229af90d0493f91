//! TLS client configuration for reaching the broker (rustls, TLS 1.3 only, ring
//! provider). The server side (certificates, listener configuration) is in
//! `cloister-kms`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::error::{self, KmsError};

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, KmsError> {
    let pem =
        std::fs::read(path).map_err(|e| error::validation(format!("{}: {e}", path.display())))?;
    parse_certs(&pem).map_err(|e| error::validation(format!("{}: {}", path.display(), e.message)))
}

/// The certificates of PEM text; at least one.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, KmsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error::validation(format!("not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(error::validation("no certificate in it"));
    }
    Ok(certs)
}

/// What a client needs to reach the broker over TLS.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl ClientTls {
    /// Trusts the CA certificates in the PEM file `ca` and expects the server to be `server_name`.
    pub fn new(ca: &Path, server_name: &str) -> Result<Self, KmsError> {
        Self::from_certs(read_certs(ca)?, server_name)
    }

    /// Trusts the CA certificates in PEM text (an enclave image's measured CA).
    pub fn from_pem(ca_pem: &[u8], server_name: &str) -> Result<Self, KmsError> {
        Self::from_certs(parse_certs(ca_pem)?, server_name)
    }

    fn from_certs(cas: Vec<CertificateDer<'static>>, server_name: &str) -> Result<Self, KmsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in cas {
            roots
                .add(c)
                .map_err(|e| error::validation(format!("TLS CA certificate: {e}")))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| error::internal(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_owned()).map_err(|_| {
            error::validation(format!("{server_name:?} is not a valid TLS server name"))
        })?;
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }
}
