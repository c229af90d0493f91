//! The emulated Nitro Security Module and the platform it belongs to.
//!
//! A *platform* is a directory made by `cloister platform init`:
//!
//! | file | what |
//! |---|---|
//! | `root.pem` | the platform root CA: Ed25519, self-signed X.509 |
//! | `root.key` | its private key, PKCS#8 PEM, mode 0600 |
//! | `nsm.pem` | this host's NSM certificate, issued by the root, short-lived |
//! | `nsm.key` | the NSM's private key, mode 0600 |
//! | `platform.json` | the platform name (the root's subject) |
//!
//! The NSM signs attestation documents with EdDSA (COSE alg -8); the document
//! carries `nsm.pem` as `certificate` and `[root.pem]` as `cabundle`, so a
//! verifier that trusts `root.pem` can check it exactly as it checks Nitro's.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::{Signer, SigningKey};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use cloister_proto::ErrorCode;

use crate::document::{self, AttestationDocument, DIGEST_SHA384, DocumentError, SigningAlgorithm};
use crate::keyfile::{self, KeyFileError};
use crate::pcr::Pcr;

/// Default lifetime of an NSM certificate.
pub const DEFAULT_NSM_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a platform root.
const ROOT_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Certificates start this much before they are made, for clocks that disagree.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum NsmError {
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("{0} already holds a platform; refusing to replace its root")]
    AlreadyInitialised(PathBuf),
    #[error("{path} is not a platform directory ({problem}); run `cloister platform init --dir {dir}`", dir = .path.display())]
    NotAPlatform { path: PathBuf, problem: String },
    #[error("cannot issue a certificate: {0}")]
    Certificate(String),
    #[error("the NSM certificate expired at {expired}; run `cloister platform renew --dir {dir}`", dir = .dir.display())]
    Expired { dir: PathBuf, expired: String },
    #[error(transparent)]
    Document(#[from] DocumentError),
}

impl ErrorCode for NsmError {
    fn code(&self) -> &'static str {
        match self {
            NsmError::KeyFile(e) => e.code(),
            NsmError::AlreadyInitialised(_) => "E-PLATFORM-EXISTS",
            NsmError::NotAPlatform { .. } => "E-PLATFORM-MISSING",
            NsmError::Certificate(_) => "E-PLATFORM-CERTIFICATE",
            NsmError::Expired { .. } => "E-PLATFORM-NSM-EXPIRED",
            NsmError::Document(e) => e.code(),
        }
    }
}

/// The files of a platform directory.
#[derive(Debug, Clone)]
pub struct PlatformDir {
    pub dir: PathBuf,
}

impl PlatformDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PlatformDir { dir: dir.into() }
    }
    pub fn root_cert(&self) -> PathBuf {
        self.dir.join("root.pem")
    }
    pub fn root_key(&self) -> PathBuf {
        self.dir.join("root.key")
    }
    pub fn nsm_cert(&self) -> PathBuf {
        self.dir.join("nsm.pem")
    }
    pub fn nsm_key(&self) -> PathBuf {
        self.dir.join("nsm.key")
    }
    fn meta(&self) -> PathBuf {
        self.dir.join("platform.json")
    }

    /// Creates the root CA and a first NSM certificate. Refuses to touch a
    /// directory that already holds a root.
    pub fn init(&self, name: &str, nsm_validity: Duration) -> Result<(), NsmError> {
        if self.root_cert().exists() || self.root_key().exists() {
            return Err(NsmError::AlreadyInitialised(self.dir.clone()));
        }
        // Private to its owner (the parents above keep their usual mode).
        let write_err = |source| KeyFileError::Write {
            path: self.dir.clone(),
            source,
        };
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(write_err)?;
        }
        if !self.dir.is_dir() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&self.dir)
                .map_err(write_err)?;
        }
        let root_key = SigningKey::generate(&mut rand_core::OsRng);
        let now = OffsetDateTime::now_utc();
        let mut params = root_params(name);
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&rcgen_key(&root_key)?)
            .map_err(|e| NsmError::Certificate(e.to_string()))?;
        keyfile::write_signing_key(&self.root_key(), &root_key, false)?;
        let meta = format!("{{\"name\":{}}}\n", json_string(name));
        keyfile::write_public(&self.meta(), meta.as_bytes(), false)?;
        keyfile::write_public(&self.root_cert(), cert.pem().as_bytes(), false)?;
        self.renew(nsm_validity)
    }

    /// Issues a fresh NSM key and certificate, replacing the previous ones.
    pub fn renew(&self, validity: Duration) -> Result<(), NsmError> {
        let name = self.name()?;
        let root_key = keyfile::read_signing_key(&self.root_key())?;
        let issuer = Issuer::new(root_params(&name), rcgen_key(&root_key)?);
        let nsm_key = SigningKey::generate(&mut rand_core::OsRng);
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = platform_name(&name, &format!("Cloister NSM {}", hostname()));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&rcgen_key(&nsm_key)?, &issuer)
            .map_err(|e| NsmError::Certificate(e.to_string()))?;
        // Key first: a crash between the two writes leaves an old certificate
        // that no longer matches, which `Nsm::load` reports, never a silent mix.
        keyfile::write_signing_key(&self.nsm_key(), &nsm_key, true)?;
        keyfile::write_public(&self.nsm_cert(), cert.pem().as_bytes(), true)?;
        Ok(())
    }

    fn name(&self) -> Result<String, NsmError> {
        let not_platform = |problem: String| NsmError::NotAPlatform {
            path: self.dir.clone(),
            problem,
        };
        let text = std::fs::read_to_string(self.meta())
            .map_err(|e| not_platform(format!("platform.json: {e}")))?;
        parse_name(&text).ok_or_else(|| not_platform("platform.json has no name".into()))
    }
}

/// The root's parameters; also what an [`Issuer`] needs to name it, so that one
/// function fixes the root's subject for both self-signing and issuing.
fn root_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = platform_name(name, "Cloister Platform Root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// O=Cloister, OU=<platform name>, CN=<common name>.
fn platform_name(platform: &str, common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Cloister");
    dn.push(DnType::OrganizationalUnitName, platform);
    dn.push(DnType::CommonName, common_name);
    dn
}

fn rcgen_key(key: &SigningKey) -> Result<KeyPair, NsmError> {
    let der = key
        .to_pkcs8_der()
        .map_err(|e| NsmError::Certificate(e.to_string()))?;
    KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(der.as_bytes()),
        &rcgen::PKCS_ED25519,
    )
    .map_err(|e| NsmError::Certificate(e.to_string()))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and without a leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn parse_name(text: &str) -> Option<String> {
    // platform.json is written by `init` alone: {"name":"..."}.
    let rest = text.trim().strip_prefix("{\"name\":\"")?;
    let body = rest.strip_suffix("\"}")?;
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                'u' => {
                    let code: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&code, 16).ok()?)?);
                }
                _ => return None,
            },
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// Loads certificates from a PEM file.
pub fn read_pem_certificates(path: &Path) -> Result<Vec<Vec<u8>>, KeyFileError> {
    let text = std::fs::read(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&text)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| KeyFileError::Format {
            path: path.to_path_buf(),
            what: "certificate",
            problem: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(KeyFileError::Format {
            path: path.to_path_buf(),
            what: "certificate",
            problem: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// What an enclave asks the NSM to attest.
#[derive(Debug, Clone, Default)]
pub struct AttestationRequest {
    pub module_id: String,
    pub pcrs: BTreeMap<usize, Pcr>,
    pub public_key: Option<Vec<u8>>,
    pub user_data: Option<Vec<u8>>,
    pub nonce: Option<Vec<u8>>,
}

/// The emulated NSM of one host: its signing key and certificate chain.
pub struct Nsm {
    dir: PathBuf,
    key: SigningKey,
    certificate: Vec<u8>,
    cabundle: Vec<Vec<u8>>,
    not_after: SystemTime,
}

impl std::fmt::Debug for Nsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nsm")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Nsm {
    /// Loads the NSM key and certificates of a platform directory.
    pub fn load(platform: &PlatformDir) -> Result<Self, NsmError> {
        if !platform.nsm_cert().exists() {
            return Err(NsmError::NotAPlatform {
                path: platform.dir.clone(),
                problem: "nsm.pem is missing".into(),
            });
        }
        let key = keyfile::read_signing_key(&platform.nsm_key())?;
        let certificate = read_pem_certificates(&platform.nsm_cert())?.remove(0);
        let cabundle = read_pem_certificates(&platform.root_cert())?;
        let parsed = crate::verify::ParsedCertificate::parse("nsm.pem", &certificate)
            .map_err(|e| NsmError::Certificate(e.to_string()))?;
        if parsed.ed25519_public_key() != Some(key.verifying_key().to_bytes()) {
            return Err(NsmError::Certificate(
                "nsm.pem does not certify nsm.key; run `cloister platform renew`".into(),
            ));
        }
        Ok(Nsm {
            dir: platform.dir.clone(),
            key,
            certificate,
            cabundle,
            not_after: parsed.not_after,
        })
    }

    /// The DER of the root this NSM chains to.
    pub fn root_certificate(&self) -> &[u8] {
        &self.cabundle[0]
    }

    /// Signs an attestation document at time `now`.
    pub fn attest(&self, req: &AttestationRequest, now: SystemTime) -> Result<Vec<u8>, NsmError> {
        if now >= self.not_after {
            return Err(NsmError::Expired {
                dir: self.dir.clone(),
                expired: crate::verify::rfc3339(self.not_after),
            });
        }
        let timestamp = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let doc = AttestationDocument {
            module_id: req.module_id.clone(),
            digest: DIGEST_SHA384.into(),
            timestamp,
            pcrs: req.pcrs.iter().map(|(i, v)| (*i, v.to_vec())).collect(),
            certificate: self.certificate.clone(),
            cabundle: self.cabundle.clone(),
            public_key: req.public_key.clone(),
            user_data: req.user_data.clone(),
            nonce: req.nonce.clone(),
        };
        Ok(document::sign(&doc, SigningAlgorithm::EdDSA, |data| {
            self.key.sign(data).to_bytes().to_vec()
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_json_round_trips_odd_names() {
        for name in ["lab-1", "quote\"back\\slash", "tab\there", "ünïcode"] {
            assert_eq!(
                parse_name(&format!("{{\"name\":{}}}\n", json_string(name))).as_deref(),
                Some(name)
            );
        }
        assert_eq!(parse_name("{\"name\":1}"), None);
    }

    #[test]
    fn init_refuses_an_existing_platform_and_keeps_its_root() {
        let dir = tempfile::tempdir().unwrap();
        let p = PlatformDir::new(dir.path());
        p.init("t", DEFAULT_NSM_VALIDITY).unwrap();
        let root = std::fs::read(p.root_cert()).unwrap();
        let err = p.init("t", DEFAULT_NSM_VALIDITY).unwrap_err();
        assert_eq!(err.code(), "E-PLATFORM-EXISTS");
        assert_eq!(std::fs::read(p.root_cert()).unwrap(), root);
    }

    #[test]
    fn renew_replaces_the_nsm_key_and_keeps_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let p = PlatformDir::new(dir.path());
        p.init("t", DEFAULT_NSM_VALIDITY).unwrap();
        let root = std::fs::read(p.root_cert()).unwrap();
        let old = std::fs::read(p.nsm_key()).unwrap();
        p.renew(Duration::from_secs(60)).unwrap();
        assert_ne!(std::fs::read(p.nsm_key()).unwrap(), old);
        assert_eq!(std::fs::read(p.root_cert()).unwrap(), root);
        Nsm::load(&p).unwrap();
    }

    #[test]
    fn an_expired_nsm_refuses_to_sign() {
        let dir = tempfile::tempdir().unwrap();
        let p = PlatformDir::new(dir.path());
        p.init("t", Duration::from_secs(60)).unwrap();
        let nsm = Nsm::load(&p).unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600);
        let err = nsm
            .attest(
                &AttestationRequest {
                    module_id: "m".into(),
                    pcrs: [(0, [0; 48])].into(),
                    ..Default::default()
                },
                later,
            )
            .unwrap_err();
        assert_eq!(err.code(), "E-PLATFORM-NSM-EXPIRED");
        assert!(err.to_string().contains("platform renew"), "{err}");
    }

    #[test]
    fn a_mismatched_key_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = PlatformDir::new(dir.path());
        p.init("t", DEFAULT_NSM_VALIDITY).unwrap();
        keyfile::write_signing_key(
            &p.nsm_key(),
            &SigningKey::generate(&mut rand_core::OsRng),
            true,
        )
        .unwrap();
        let err = Nsm::load(&p).unwrap_err();
        assert!(err.to_string().contains("does not certify"), "{err}");
        let err = Nsm::load(&PlatformDir::new(dir.path().join("nope"))).unwrap_err();
        assert_eq!(err.code(), "E-PLATFORM-MISSING");
    }
}
