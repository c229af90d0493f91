//! The attestation document verifier: one code path for Cloister's emulated
//! documents (EdDSA, Ed25519 chain) and real AWS Nitro documents (ES384, P-384
//! chain to the AWS Nitro root).
//!
//! Checks, in order: size and COSE/CBOR structure; that `cabundle[0]` is one of
//! the configured trust anchors (nothing is trusted by default); each
//! certificate's encoding, validity at the verification time, basicConstraints
//! and keyUsage; the COSE signature with the leaf's key, whose type must match
//! the COSE algorithm; the X.509 path from leaf to anchor (rustls-webpki); the
//! document's age; and any expected PCR values.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use der::{Decode, Encode};
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};
use x509_cert::Certificate;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage};

use cloister_proto::ErrorCode;

use crate::document::{DocumentError, SigningAlgorithm, UnverifiedDocument};
use crate::pcr::PCR_LEN;

/// The AWS Nitro Enclaves root (CN=aws.nitro-enclaves), built in and pinned.
const AWS_NITRO_ROOT_PEM: &str = include_str!("aws-nitro-root.pem");
/// SHA-256 of the AWS Nitro root's DER, as AWS publishes it.
pub const AWS_NITRO_ROOT_SHA256: &str =
    "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";

/// How far a document's timestamp may be ahead of the verifier's clock.
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(60);

const OID_ED25519: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_EC_PUBLIC_KEY: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_SECP384R1: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.3.132.0.34");

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error(
        "no trust anchor is configured: trust an emulated platform root or the AWS Nitro root explicitly"
    )]
    NoTrustAnchors,
    #[error("the document's root ({subject}, SHA-256 {fingerprint}) is not a trusted root")]
    UntrustedRoot {
        subject: String,
        fingerprint: String,
    },
    #[error("{which}: {problem}")]
    Certificate { which: String, problem: String },
    #[error("{which} ({subject}) is not valid at {at}: valid from {not_before} to {not_after}")]
    CertificateTime {
        which: String,
        subject: String,
        at: String,
        not_before: String,
        not_after: String,
    },
    #[error("certificate chain does not verify: {0}")]
    Chain(String),
    #[error("COSE algorithm {alg} does not match the signing certificate's key ({key})")]
    KeyMismatch { alg: &'static str, key: String },
    #[error("the COSE signature does not verify with the signing certificate's key")]
    Signature,
    #[error("the document is {age_secs} s old, more than the allowed {max_secs} s")]
    TooOld { age_secs: u64, max_secs: u64 },
    #[error("the document's timestamp {timestamp} is ahead of the verification time {at}")]
    FromTheFuture { timestamp: String, at: String },
    #[error("PCR{index} is {actual}, expected {expected}")]
    PcrMismatch {
        index: usize,
        expected: String,
        actual: String,
    },
    #[error(
        "the document is a debug-mode enclave's (PCR0, PCR1 and PCR2 are zero): its memory and console are open to the parent"
    )]
    DebugEnclave,
    #[error("PCR{0} is expected but the document does not include it")]
    PcrMissing(usize),
    #[error("the document's nonce is {actual}, expected {expected}: it answers another challenge")]
    NonceMismatch { expected: String, actual: String },
}

impl ErrorCode for VerifyError {
    fn code(&self) -> &'static str {
        match self {
            VerifyError::Document(e) => e.code(),
            VerifyError::NoTrustAnchors => "E-ATTEST-NO-TRUST-ANCHOR",
            VerifyError::UntrustedRoot { .. } => "E-ATTEST-UNTRUSTED-ROOT",
            VerifyError::Certificate { .. } => "E-ATTEST-CERTIFICATE",
            VerifyError::CertificateTime { .. } => "E-ATTEST-CERTIFICATE-EXPIRED",
            VerifyError::Chain(_) => "E-ATTEST-CHAIN",
            VerifyError::KeyMismatch { .. } => "E-ATTEST-ALGORITHM",
            VerifyError::Signature => "E-ATTEST-SIGNATURE",
            VerifyError::TooOld { .. } | VerifyError::FromTheFuture { .. } => "E-ATTEST-STALE",
            VerifyError::PcrMismatch { .. } | VerifyError::PcrMissing(_) => "E-ATTEST-PCR-MISMATCH",
            VerifyError::NonceMismatch { .. } => "E-ATTEST-NONCE",
            VerifyError::DebugEnclave => "E-ATTEST-DEBUG-ENCLAVE",
        }
    }
}

/// A root certificate the verifier trusts, with a label for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustAnchor {
    pub label: String,
    der: Vec<u8>,
}

impl TrustAnchor {
    /// Trusts a root given as DER. It must parse as a CA certificate.
    pub fn from_der(label: impl Into<String>, der: Vec<u8>) -> Result<Self, VerifyError> {
        let label = label.into();
        let parsed = ParsedCertificate::parse(&label, &der)?;
        if !parsed.is_ca {
            return Err(VerifyError::Certificate {
                which: label,
                problem: "a trust anchor must be a CA certificate (basicConstraints CA=true)"
                    .into(),
            });
        }
        Ok(TrustAnchor { label, der })
    }

    /// The AWS Nitro Enclaves root, checked against its published fingerprint.
    pub fn aws_nitro() -> Self {
        let der = CertificateDer::from_pem_slice(AWS_NITRO_ROOT_PEM.as_bytes())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        assert_eq!(
            hex::encode(Sha256::digest(&der)),
            AWS_NITRO_ROOT_SHA256,
            "the built-in AWS Nitro root does not match its pinned fingerprint"
        );
        TrustAnchor {
            label: "aws-nitro-enclaves-root".into(),
            der,
        }
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub fn fingerprint_sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.der))
    }
}

use rustls_pki_types::pem::PemObject;

/// What the verifier needs besides the document.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    pub anchors: Vec<TrustAnchor>,
    /// The verification time; `None` means now. Tests pass a document's own time.
    pub at: Option<SystemTime>,
    /// Refuse documents older than this at the verification time.
    pub max_age: Option<Duration>,
    /// PCR values the document must have.
    pub expected_pcrs: BTreeMap<usize, Vec<u8>>,
    /// The challenge the document must answer (its `nonce`).
    pub expected_nonce: Option<Vec<u8>>,
    /// Reuse chain validations across documents of the same NSM.
    pub chain_cache: Option<std::sync::Arc<ChainCache>>,
    /// Refuse a debug-mode enclave's document (PCR0..2 all zero) before the
    /// PCRs are compared, so that the refusal says so.
    pub refuse_debug: bool,
}

/// A document whose signature, chain and freshness have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDocument {
    pub algorithm: SigningAlgorithm,
    pub module_id: String,
    pub digest: String,
    pub timestamp_ms: u64,
    pub pcrs: BTreeMap<usize, Vec<u8>>,
    pub public_key: Option<Vec<u8>>,
    pub user_data: Option<Vec<u8>>,
    pub nonce: Option<Vec<u8>>,
    /// PCR0, PCR1 and PCR2 are all zero: a debug-mode enclave.
    pub debug: bool,
    /// The label of the trust anchor the chain ends in.
    pub trust_anchor: String,
    /// Subjects from the root to the signing certificate.
    pub chain_subjects: Vec<String>,
}

impl VerifiedDocument {
    /// PCR0, the image measurement (`ImageSha384`), if present.
    pub fn image_sha384(&self) -> Option<&[u8]> {
        self.pcrs.get(&0).map(Vec::as_slice)
    }
}

/// Verifies an attestation document.
pub fn verify(bytes: &[u8], opts: &VerifyOptions) -> Result<VerifiedDocument, VerifyError> {
    if opts.anchors.is_empty() {
        return Err(VerifyError::NoTrustAnchors);
    }
    let at = opts.at.unwrap_or_else(SystemTime::now);
    let unverified = UnverifiedDocument::parse(bytes)?;
    let doc = &unverified.document;

    // The bundle must start with a root we trust, byte for byte.
    let root_der = &doc.cabundle[0];
    let anchor = opts
        .anchors
        .iter()
        .find(|a| a.der.as_slice() == root_der.as_slice())
        .ok_or_else(|| VerifyError::UntrustedRoot {
            subject: ParsedCertificate::parse("cabundle[0]", root_der)
                .map(|c| c.subject)
                .unwrap_or_else(|_| "unparseable certificate".into()),
            fingerprint: hex::encode(Sha256::digest(root_der)),
        })?;

    let chain = match &opts.chain_cache {
        Some(cache) => cache.get_or_validate(anchor, doc, at)?,
        None => validate_chain(anchor, doc, at)?,
    };

    // The COSE signature, with the leaf's key of the algorithm's type.
    match (unverified.algorithm, &chain.key) {
        (SigningAlgorithm::EdDSA, PublicKey::Ed25519(key)) => {
            let key = ed25519_dalek::VerifyingKey::from_bytes(key).map_err(|_| {
                VerifyError::Certificate {
                    which: "certificate".into(),
                    problem: "the Ed25519 public key is not a valid point".into(),
                }
            })?;
            unverified.verify_signature(|sig, data| {
                let sig = ed25519_dalek::Signature::from_slice(sig)
                    .map_err(|_| VerifyError::Signature)?;
                key.verify_strict(data, &sig)
                    .map_err(|_| VerifyError::Signature)
            })?;
        }
        (SigningAlgorithm::ES384, PublicKey::P384(point)) => {
            unverified.verify_signature(|sig, data| {
                ring::signature::UnparsedPublicKey::new(
                    &ring::signature::ECDSA_P384_SHA384_FIXED,
                    point,
                )
                .verify(data, sig)
                .map_err(|_| VerifyError::Signature)
            })?;
        }
        (alg, key) => {
            return Err(VerifyError::KeyMismatch {
                alg: alg.name(),
                key: key.describe(),
            });
        }
    }

    // Freshness.
    let issued = unix_ms(doc.timestamp);
    if issued > at + MAX_FUTURE_SKEW {
        return Err(VerifyError::FromTheFuture {
            timestamp: rfc3339(issued),
            at: rfc3339(at),
        });
    }
    if let Some(max) = opts.max_age {
        let age = at.duration_since(issued).unwrap_or_default();
        if age > max {
            return Err(VerifyError::TooOld {
                age_secs: age.as_secs(),
                max_secs: max.as_secs(),
            });
        }
    }

    let zero = [0u8; PCR_LEN];
    let debug = (0..3).all(|i| doc.pcrs.get(&i).is_some_and(|v| v.as_slice() == zero));
    if debug && opts.refuse_debug {
        return Err(VerifyError::DebugEnclave);
    }
    for (index, expected) in &opts.expected_pcrs {
        let actual = doc.pcrs.get(index).ok_or(VerifyError::PcrMissing(*index))?;
        if actual != expected {
            return Err(VerifyError::PcrMismatch {
                index: *index,
                expected: hex::encode(expected),
                actual: hex::encode(actual),
            });
        }
    }

    if let Some(expected) = &opts.expected_nonce
        && doc.nonce.as_ref() != Some(expected)
    {
        return Err(VerifyError::NonceMismatch {
            expected: hex::encode(expected),
            actual: doc.nonce.as_ref().map_or("absent".into(), hex::encode),
        });
    }

    let chain_subjects = chain.subjects;
    let doc = unverified.document;
    Ok(VerifiedDocument {
        algorithm: unverified.algorithm,
        module_id: doc.module_id,
        digest: doc.digest,
        timestamp_ms: doc.timestamp,
        pcrs: doc.pcrs,
        public_key: doc.public_key,
        user_data: doc.user_data,
        nonce: doc.nonce,
        debug,
        trust_anchor: anchor.label.clone(),
        chain_subjects,
    })
}

/// A certificate chain that validated: what the signature check and the report
/// need, and the window in which every certificate of it is valid.
#[derive(Debug, Clone)]
struct ValidChain {
    key: PublicKey,
    subjects: Vec<String>,
    not_before: SystemTime,
    not_after: SystemTime,
}

/// Every certificate well-formed, in its validity period at `at`, with proper
/// constraints, and a webpki path from the leaf through the bundle to the anchor.
fn validate_chain(
    anchor: &TrustAnchor,
    doc: &crate::document::AttestationDocument,
    at: SystemTime,
) -> Result<ValidChain, VerifyError> {
    let mut chain = Vec::with_capacity(doc.cabundle.len() + 1);
    for (i, der) in doc.cabundle.iter().enumerate() {
        let c = ParsedCertificate::parse(&format!("cabundle[{i}]"), der)?;
        c.check_time(at)?;
        c.check_ca()?;
        chain.push(c);
    }
    let leaf = ParsedCertificate::parse("certificate", &doc.certificate)?;
    leaf.check_time(at)?;
    leaf.check_signer()?;

    // The path from the leaf through the bundle to the anchor.
    let leaf_der = CertificateDer::from(doc.certificate.as_slice());
    let end_entity =
        webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| VerifyError::Certificate {
            which: "certificate".into(),
            problem: format!("{e:?}"),
        })?;
    let anchor_der = CertificateDer::from(anchor.der.as_slice());
    let trust = [webpki::anchor_from_trusted_cert(&anchor_der)
        .map_err(|e| VerifyError::Chain(format!("trust anchor {}: {e:?}", anchor.label)))?];
    let intermediates: Vec<CertificateDer<'_>> = doc.cabundle[1..]
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let unix = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    end_entity
        .verify_for_usage(
            &[
                webpki::ring::ECDSA_P384_SHA384,
                webpki::ring::ECDSA_P256_SHA256,
                webpki::ring::ED25519,
            ],
            &trust,
            &intermediates,
            UnixTime::since_unix_epoch(unix),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| VerifyError::Chain(describe_webpki(&e)))?;
    chain.push(leaf);
    Ok(ValidChain {
        key: chain[chain.len() - 1].key.clone(),
        not_before: chain.iter().map(|c| c.not_before).max().unwrap_or(at),
        not_after: chain.iter().map(|c| c.not_after).min().unwrap_or(at),
        subjects: chain.into_iter().map(|c| c.subject).collect(),
    })
}

/// Certificate chains that validated, so that the documents of one NSM (which all
/// carry the same chain) are path-validated once. Keyed by SHA-256 over the anchor,
/// the signing certificate and the bundle, byte for byte; a hit is used only when
/// the verification time is inside every certificate's validity period, and a
/// failed validation is never stored. The anchor must still be configured: the
/// lookup happens after `cabundle[0]` matched one.
#[derive(Debug, Default)]
pub struct ChainCache {
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], ValidChain>>,
}

impl ChainCache {
    const CAPACITY: usize = 1024;

    fn get_or_validate(
        &self,
        anchor: &TrustAnchor,
        doc: &crate::document::AttestationDocument,
        at: SystemTime,
    ) -> Result<ValidChain, VerifyError> {
        let mut h = Sha256::new();
        for part in std::iter::once(&anchor.der)
            .chain(std::iter::once(&doc.certificate))
            .chain(doc.cabundle.iter())
        {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let key: [u8; 32] = h.finalize().into();
        if let Ok(entries) = self.entries.lock()
            && let Some(hit) = entries.get(&key)
            && at >= hit.not_before
            && at <= hit.not_after
        {
            return Ok(hit.clone());
        }
        let chain = validate_chain(anchor, doc, at)?;
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= Self::CAPACITY {
                entries.clear();
            }
            entries.insert(key, chain.clone());
        }
        Ok(chain)
    }
}

fn describe_webpki(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => {
            "no path from the signing certificate to the trusted root (unknown issuer)".into()
        }
        webpki::Error::InvalidSignatureForPublicKey => {
            "a certificate's signature does not verify with its issuer's key".into()
        }
        webpki::Error::CaUsedAsEndEntity => "the signing certificate is a CA certificate".into(),
        webpki::Error::EndEntityUsedAsCa => "a certificate in the bundle is not a CA".into(),
        webpki::Error::PathLenConstraintViolated => {
            "the chain is longer than a pathLenConstraint allows".into()
        }
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "the signing certificate's extended key usage forbids this use".into()
        }
        other => format!("{other:?}"),
    }
}

/// RFC 3339 text of a time, for messages and JSON.
/// Total: a time outside what RFC 3339 can write (before 1970 here, after
/// year 9999) is written as a count of Unix milliseconds instead.
pub fn rfc3339(t: SystemTime) -> String {
    let Ok(since) = t.duration_since(SystemTime::UNIX_EPOCH) else {
        return "before 1970-01-01T00:00:00Z".into();
    };
    i128::try_from(since.as_nanos())
        .ok()
        .and_then(|n| time::OffsetDateTime::from_unix_timestamp_nanos(n).ok())
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{} ms after the Unix epoch", since.as_millis()))
}

/// RFC 3339 text of a count of Unix milliseconds (as documents and requests
/// carry them), total like [`rfc3339`].
pub fn rfc3339_ms(ms: u64) -> String {
    rfc3339(unix_ms(ms))
}

/// A count of Unix milliseconds as a time (any `u64` fits a `SystemTime`).
pub fn unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PublicKey {
    Ed25519([u8; 32]),
    /// SEC1 uncompressed point.
    P384(Vec<u8>),
    Other(String),
}

impl PublicKey {
    fn describe(&self) -> String {
        match self {
            PublicKey::Ed25519(_) => "Ed25519".into(),
            PublicKey::P384(_) => "ECDSA P-384".into(),
            PublicKey::Other(oid) => format!("algorithm {oid}"),
        }
    }
}

/// The parts of an X.509 certificate the verifier and the CLI report on.
#[derive(Debug, Clone)]
pub struct ParsedCertificate {
    which: String,
    pub subject: String,
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    key_usage: Option<KeyUsage>,
    key: PublicKey,
}

impl ParsedCertificate {
    /// Parses DER; `which` names the certificate in errors.
    pub fn parse(which: &str, der: &[u8]) -> Result<Self, VerifyError> {
        let bad = |problem: String| VerifyError::Certificate {
            which: which.to_owned(),
            problem,
        };
        let cert = Certificate::from_der(der)
            .map_err(|e| bad(format!("not a DER X.509 certificate: {e}")))?;
        // from_der accepts exactly one certificate; re-encoding must give the input
        // back, which refuses non-canonical (BER) encodings.
        if cert.to_der().map_err(|e| bad(e.to_string()))? != der {
            return Err(bad("the certificate is not canonically DER-encoded".into()));
        }
        let tbs = &cert.tbs_certificate;
        let basic = tbs
            .get::<BasicConstraints>()
            .map_err(|e| bad(format!("basicConstraints: {e}")))?;
        let key_usage = tbs
            .get::<KeyUsage>()
            .map_err(|e| bad(format!("keyUsage: {e}")))?
            .map(|(_, ku)| ku);
        let spki = &tbs.subject_public_key_info;
        let raw = spki.subject_public_key.raw_bytes();
        let key = if spki.algorithm.oid == OID_ED25519 {
            PublicKey::Ed25519(
                raw.try_into()
                    .map_err(|_| bad("Ed25519 key is not 32 bytes".into()))?,
            )
        } else if spki.algorithm.oid == OID_EC_PUBLIC_KEY
            && spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok())
                == Some(OID_SECP384R1)
        {
            PublicKey::P384(raw.to_vec())
        } else {
            PublicKey::Other(spki.algorithm.oid.to_string())
        };
        Ok(ParsedCertificate {
            which: which.to_owned(),
            subject: tbs.subject.to_string(),
            issuer: tbs.issuer.to_string(),
            not_before: tbs.validity.not_before.to_system_time(),
            not_after: tbs.validity.not_after.to_system_time(),
            is_ca: basic.is_some_and(|(_, b)| b.ca),
            key_usage,
            key,
        })
    }

    /// The raw Ed25519 public key, if the certificate has one.
    pub fn ed25519_public_key(&self) -> Option<[u8; 32]> {
        match self.key {
            PublicKey::Ed25519(k) => Some(k),
            _ => None,
        }
    }

    fn check_time(&self, at: SystemTime) -> Result<(), VerifyError> {
        if at < self.not_before || at > self.not_after {
            return Err(VerifyError::CertificateTime {
                which: self.which.clone(),
                subject: self.subject.clone(),
                at: rfc3339(at),
                not_before: rfc3339(self.not_before),
                not_after: rfc3339(self.not_after),
            });
        }
        Ok(())
    }

    fn check_ca(&self) -> Result<(), VerifyError> {
        let bad = |problem: &str| VerifyError::Certificate {
            which: self.which.clone(),
            problem: format!("{} ({problem})", self.subject),
        };
        if !self.is_ca {
            return Err(bad(
                "a cabundle certificate must be a CA: basicConstraints CA=true",
            ));
        }
        if self
            .key_usage
            .as_ref()
            .is_some_and(|ku| !ku.key_cert_sign())
        {
            return Err(bad("a CA's keyUsage must include keyCertSign"));
        }
        Ok(())
    }

    fn check_signer(&self) -> Result<(), VerifyError> {
        let bad = |problem: &str| VerifyError::Certificate {
            which: self.which.clone(),
            problem: format!("{} ({problem})", self.subject),
        };
        if self.is_ca {
            return Err(bad("the signing certificate must not be a CA"));
        }
        if self
            .key_usage
            .as_ref()
            .is_some_and(|ku| !ku.digital_signature())
        {
            return Err(bad(
                "the signing certificate's keyUsage must include digitalSignature",
            ));
        }
        Ok(())
    }
}
