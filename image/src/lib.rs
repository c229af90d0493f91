//! Enclave images (`*.cimg`): one deterministic file holding a manifest, the
//! WebAssembly component and an optional signature, and their measurements.
//!
//! ```text
//! "CIMG" | format version (u8) = 1
//! section*  : kind (u8) | length (u32 BE) | bytes
//!   kind 1  : manifest, canonical JSON (sorted keys, no spaces)   — required, first
//!   kind 2  : the WebAssembly component                           — required, second
//!   kind 3  : signature, CBOR {certificate: DER, signature: bytes} — optional, last
//! ```
//!
//! PCR0 = measure(the image without its signature section), PCR2 = measure(the
//! component), PCR8 = measure(the signing certificate's DER), PCR1 = measure(the
//! runtime identity, which names the SHA-384 of the runtime binary).
//!
//! The manifest also holds what the parent must not choose, so that PCR0 covers
//! it: the workload's configuration (`config`, read by the guest) and the key
//! broker the enclave trusts (`kms`: its Ed25519 response key and TLS CA), as a
//! Nitro EIF carries its CA bundle. The signature is Ed25519 over
//! `"cloister-image-signature-v1\0" || PCR0`, by the key the certificate certifies:
//! the analog of nitro-cli's signed EIF and PCR8.

use std::collections::BTreeMap;

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use cloister_attestation::pcr::{self, Pcr};
use cloister_attestation::verify::{ParsedCertificate, rfc3339};
use cloister_proto::ErrorCode;

const MAGIC: &[u8; 4] = b"CIMG";
const FORMAT_VERSION: u8 = 1;
const KIND_MANIFEST: u8 = 1;
const KIND_COMPONENT: u8 = 2;
const KIND_SIGNATURE: u8 = 3;
const SIGNATURE_LABEL: &[u8] = b"cloister-image-signature-v1\0";
/// The largest component accepted (64 MiB).
pub const MAX_COMPONENT: usize = 64 << 20;
const MAX_MANIFEST: usize = 64 << 10;
/// A component's preamble: `\0asm`, version 0x0d, layer 1.
const COMPONENT_PREAMBLE: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not an enclave image: {0}")]
    Format(String),
    #[error("invalid manifest: {0}")]
    Manifest(String),
    #[error("not a WebAssembly component: {0}")]
    Component(String),
    #[error("image signature: {0}")]
    Signature(String),
}

impl ErrorCode for ImageError {
    fn code(&self) -> &'static str {
        match self {
            ImageError::Format(_) => "E-IMAGE-FORMAT",
            ImageError::Manifest(_) => "E-IMAGE-MANIFEST",
            ImageError::Component(_) => "E-IMAGE-COMPONENT",
            ImageError::Signature(_) => "E-IMAGE-SIGNATURE",
        }
    }
}

pub const CODES: &[cloister_proto::CodeInfo] = &[
    cloister_proto::CodeInfo {
        code: "E-IMAGE-FORMAT",
        summary: "the file is not a well-formed enclave image",
        explanation: "An image starts with CIMG and version 1, then a manifest section, a \
            component section and optionally a signature section, each with its exact length, \
            and nothing after. A truncated, extended or altered file is refused.",
    },
    cloister_proto::CodeInfo {
        code: "E-IMAGE-MANIFEST",
        summary: "the image manifest is invalid",
        explanation: "The manifest names the workload (letters, digits, '.', '_', '-'), its \
            version, and its limits: memory 1-4096 MiB, CPU 1-600000 ms per call, 1-1024 \
            concurrent calls; metadata is a JSON object.",
    },
    cloister_proto::CodeInfo {
        code: "E-IMAGE-COMPONENT",
        summary: "the image does not hold a WebAssembly component",
        explanation: "build-enclave takes a component (for example `cargo build --target \
            wasm32-wasip2`), not a core module; its size is limited to 64 MiB.",
    },
    cloister_proto::CodeInfo {
        code: "E-IMAGE-SIGNATURE",
        summary: "the image signature is invalid or does not check",
        explanation: "A signed image carries an X.509 certificate with an Ed25519 key and an \
            Ed25519 signature over PCR0. The key must match the certificate and the signature \
            must verify; the certificate's validity is reported, as nitro-cli does.",
    },
];

/// The workload's name, version and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub name: String,
    pub version: String,
    pub memory_mib: u32,
    pub cpu_ms_per_call: u32,
    pub max_concurrent_calls: u32,
    pub metadata: Value,
    /// Measured configuration the workload reads through the SDK
    /// (`build-enclave --config KEY=VALUE`).
    pub config: BTreeMap<String, String>,
    /// The key broker this enclave trusts; without it the enclave makes no KMS calls.
    pub kms: Option<BrokerTrust>,
}

/// Which key broker an enclave trusts, fixed in its measured manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTrust {
    /// The broker's Ed25519 public key (hex, 32 bytes): every answer to the
    /// enclave must be signed by it.
    pub broker_key: String,
    /// The broker's TLS CA (PEM), for a broker on TCP reached through the proxy.
    pub tls_ca: Option<String>,
    /// The name in the broker's TLS certificate (default `localhost`).
    pub tls_name: Option<String>,
}

impl BrokerTrust {
    pub fn verifying_key(&self) -> Result<VerifyingKey, ImageError> {
        let bad = || {
            ImageError::Manifest(format!(
                "kms.broker_key {:?} is not a hex Ed25519 public key of 32 bytes",
                self.broker_key
            ))
        };
        let raw: [u8; 32] = hex::decode(&self.broker_key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        VerifyingKey::from_bytes(&raw).map_err(|_| bad())
    }
}

/// Limits of the measured configuration.
pub const MAX_CONFIG_ENTRIES: usize = 256;
pub const MAX_CONFIG_VALUE: usize = 4096;

impl Manifest {
    pub fn new(name: &str, version: &str) -> Self {
        Manifest {
            format: "cloister-image/1".into(),
            name: name.into(),
            version: version.into(),
            memory_mib: 64,
            cpu_ms_per_call: 1000,
            max_concurrent_calls: 4,
            metadata: Value::Object(Default::default()),
            config: BTreeMap::new(),
            kms: None,
        }
    }

    pub fn validate(&self) -> Result<(), ImageError> {
        let bad = |m: String| Err(ImageError::Manifest(m));
        if self.format != "cloister-image/1" {
            return bad(format!("format {:?} is not cloister-image/1", self.format));
        }
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return bad(format!(
                "name {:?}: 1-64 letters, digits, '.', '_' or '-'",
                self.name
            ));
        }
        if self.version.is_empty()
            || self.version.len() > 64
            || self.version.chars().any(char::is_control)
        {
            return bad(format!(
                "version {:?}: 1-64 printable characters",
                self.version
            ));
        }
        if !(1..=4096).contains(&self.memory_mib) {
            return bad(format!("memory {} MiB: choose 1 to 4096", self.memory_mib));
        }
        if !(1..=600_000).contains(&self.cpu_ms_per_call) {
            return bad(format!(
                "CPU per call {} ms: choose 1 to 600000",
                self.cpu_ms_per_call
            ));
        }
        if !(1..=1024).contains(&self.max_concurrent_calls) {
            return bad(format!(
                "{} concurrent calls: choose 1 to 1024",
                self.max_concurrent_calls
            ));
        }
        if !self.metadata.is_object() {
            return bad("metadata must be a JSON object".into());
        }
        if self.config.len() > MAX_CONFIG_ENTRIES {
            return bad(format!(
                "{} config entries: at most {MAX_CONFIG_ENTRIES}",
                self.config.len()
            ));
        }
        for (k, v) in &self.config {
            if k.is_empty()
                || k.len() > 64
                || !k
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            {
                return bad(format!(
                    "config key {k:?}: 1-64 lower-case letters, digits, '.', '_' or '-'"
                ));
            }
            if v.len() > MAX_CONFIG_VALUE {
                return bad(format!(
                    "config value of {k:?} is {} bytes: at most {MAX_CONFIG_VALUE}",
                    v.len()
                ));
            }
        }
        if let Some(kms) = &self.kms {
            kms.verifying_key()?;
            if kms.tls_ca.as_ref().is_some_and(|pem| pem.len() > 32 * 1024) {
                return bad("kms.tls_ca is over 32 KiB".into());
            }
        }
        Ok(())
    }

    /// Canonical JSON: keys sorted at every level, no whitespace.
    fn canonical_bytes(&self) -> Result<Vec<u8>, ImageError> {
        let v = serde_json::to_value(self).map_err(|e| ImageError::Manifest(e.to_string()))?;
        serde_json::to_vec(&canonical(v)).map_err(|e| ImageError::Manifest(e.to_string()))
    }
}

fn canonical(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<String, Value> =
                m.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(canonical).collect()),
        v => v,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureSection {
    #[serde(with = "serde_bytes")]
    certificate: Vec<u8>,
    #[serde(with = "serde_bytes")]
    signature: Vec<u8>,
}

/// How an image is signed.
pub struct ImageSigner {
    pub certificate_der: Vec<u8>,
    pub key: SigningKey,
}

/// A parsed image.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest: Manifest,
    pub component: Vec<u8>,
    /// The image bytes without the signature section (what PCR0 measures).
    unsigned: Vec<u8>,
    signature: Option<SignatureSection>,
}

/// What describe-image reports about a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureInfo {
    pub certificate_der: Vec<u8>,
    pub subject: String,
    pub not_before: String,
    pub not_after: String,
    pub valid_now: bool,
}

fn push_section(out: &mut Vec<u8>, kind: u8, bytes: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn check_component(bytes: &[u8]) -> Result<(), ImageError> {
    if bytes.len() > MAX_COMPONENT {
        return Err(ImageError::Component(format!(
            "{} bytes is over the 64 MiB limit",
            bytes.len()
        )));
    }
    if bytes.len() < 8 || bytes[..4] != COMPONENT_PREAMBLE[..4] {
        return Err(ImageError::Component(
            "it does not start with \\0asm".into(),
        ));
    }
    if bytes[4..8] != COMPONENT_PREAMBLE[4..8] {
        return Err(ImageError::Component(
            "it is a core module, not a component (build for wasm32-wasip2, or run `wasm-tools component new`)".into(),
        ));
    }
    Ok(())
}

/// The signature key's Ed25519 public key from a certificate.
fn certificate_key(der: &[u8]) -> Result<(ParsedCertificate, VerifyingKey), ImageError> {
    let cert = ParsedCertificate::parse("signing certificate", der)
        .map_err(|e| ImageError::Signature(e.to_string()))?;
    let raw = cert.ed25519_public_key().ok_or_else(|| {
        ImageError::Signature("the signing certificate's key is not Ed25519".into())
    })?;
    let key = VerifyingKey::from_bytes(&raw)
        .map_err(|_| ImageError::Signature("invalid Ed25519 key".into()))?;
    Ok((cert, key))
}

impl Image {
    /// Builds an image; the same inputs always give the same bytes.
    pub fn build(
        manifest: Manifest,
        component: Vec<u8>,
        signer: Option<&ImageSigner>,
    ) -> Result<Vec<u8>, ImageError> {
        manifest.validate()?;
        check_component(&component)?;
        let manifest_bytes = manifest.canonical_bytes()?;
        let mut out = MAGIC.to_vec();
        out.push(FORMAT_VERSION);
        push_section(&mut out, KIND_MANIFEST, &manifest_bytes);
        push_section(&mut out, KIND_COMPONENT, &component);
        if let Some(s) = signer {
            let (_, cert_key) = certificate_key(&s.certificate_der)?;
            if cert_key != s.key.verifying_key() {
                return Err(ImageError::Signature(
                    "the private key does not match the signing certificate".into(),
                ));
            }
            let pcr0 = pcr::measure(&out);
            let signature = s
                .key
                .sign(&[SIGNATURE_LABEL, &pcr0[..]].concat())
                .to_bytes()
                .to_vec();
            let section = SignatureSection {
                certificate: s.certificate_der.clone(),
                signature,
            };
            let mut cbor = Vec::new();
            ciborium::into_writer(&section, &mut cbor)
                .map_err(|e| ImageError::Signature(e.to_string()))?;
            push_section(&mut out, KIND_SIGNATURE, &cbor);
        }
        Ok(out)
    }

    /// Parses an image strictly: any truncation, extension or unknown section is refused.
    pub fn parse(bytes: &[u8]) -> Result<Image, ImageError> {
        let fmt = |m: &str| ImageError::Format(m.to_owned());
        if bytes.len() < 5 || &bytes[..4] != MAGIC {
            return Err(fmt("it does not start with CIMG"));
        }
        if bytes[4] != FORMAT_VERSION {
            return Err(ImageError::Format(format!(
                "format version {} is not supported (expected 1)",
                bytes[4]
            )));
        }
        let mut sections = Vec::new();
        let mut at = 5usize;
        while at < bytes.len() {
            if bytes.len() - at < 5 {
                return Err(fmt("truncated section header"));
            }
            let kind = bytes[at];
            let len =
                u32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]])
                    as usize;
            let start = at + 5;
            let end = start
                .checked_add(len)
                .filter(|e| *e <= bytes.len())
                .ok_or_else(|| {
                    ImageError::Format(format!(
                        "section {kind} claims {len} bytes, more than the file holds (truncated?)"
                    ))
                })?;
            sections.push((kind, at, start, end));
            at = end;
        }
        let kinds: Vec<u8> = sections.iter().map(|s| s.0).collect();
        let signed = match kinds.as_slice() {
            [KIND_MANIFEST, KIND_COMPONENT] => false,
            [KIND_MANIFEST, KIND_COMPONENT, KIND_SIGNATURE] => true,
            other => {
                return Err(ImageError::Format(format!(
                    "sections {other:?}: expected manifest (1), component (2) and an optional signature (3)"
                )));
            }
        };
        let (_, _, ms, me) = sections[0];
        if me - ms > MAX_MANIFEST {
            return Err(fmt("the manifest is over 64 KiB"));
        }
        let manifest: Manifest = serde_json::from_slice(&bytes[ms..me])
            .map_err(|e| ImageError::Manifest(e.to_string()))?;
        manifest.validate()?;
        if manifest.canonical_bytes()? != bytes[ms..me] {
            return Err(ImageError::Manifest(
                "the manifest is not in canonical form".into(),
            ));
        }
        let (_, _, cs, ce) = sections[1];
        check_component(&bytes[cs..ce])?;
        let (unsigned_end, signature) = if signed {
            let (_, header, ss, se) = sections[2];
            let mut slice = &bytes[ss..se];
            let section: SignatureSection = ciborium::from_reader(&mut slice)
                .map_err(|e| ImageError::Signature(format!("malformed section: {e}")))?;
            if !slice.is_empty() {
                return Err(ImageError::Signature(
                    "trailing bytes in the signature section".into(),
                ));
            }
            (header, Some(section))
        } else {
            (bytes.len(), None)
        };
        Ok(Image {
            manifest,
            component: bytes[cs..ce].to_vec(),
            unsigned: bytes[..unsigned_end].to_vec(),
            signature,
        })
    }

    /// The measurements an enclave of this image reports (Nitro's numbering):
    /// PCR0, PCR1 (the runtime's, when known), PCR2, PCR3 (the parent role),
    /// PCR4 (the instance id), PCR8 (when signed).
    pub fn measurements(
        &self,
        pcr1: Option<Pcr>,
        parent_role: Option<&str>,
        instance_id: Option<&str>,
    ) -> BTreeMap<usize, Pcr> {
        let mut m = BTreeMap::from([(0, self.pcr0()), (2, self.pcr2())]);
        m.extend(pcr1.map(|p| (1, p)));
        m.extend(parent_role.map(|r| (3, pcr::measure_raw(r))));
        m.extend(instance_id.map(|i| (4, pcr::measure_raw(i))));
        m.extend(self.pcr8().map(|p| (8, p)));
        m
    }

    /// PCR0: the image without its signature section.
    pub fn pcr0(&self) -> Pcr {
        pcr::measure(&self.unsigned)
    }

    /// PCR2: the component.
    pub fn pcr2(&self) -> Pcr {
        pcr::measure(&self.component)
    }

    /// PCR8: the signing certificate, when signed.
    pub fn pcr8(&self) -> Option<Pcr> {
        self.signature
            .as_ref()
            .map(|s| pcr::measure(&s.certificate))
    }

    /// Checks the signature, if any. `Ok(None)` for an unsigned image.
    pub fn verify_signature(&self) -> Result<Option<SignatureInfo>, ImageError> {
        let Some(s) = &self.signature else {
            return Ok(None);
        };
        let (cert, key) = certificate_key(&s.certificate)?;
        let sig = ed25519_dalek::Signature::from_slice(&s.signature)
            .map_err(|_| ImageError::Signature("the signature is not 64 bytes".into()))?;
        key.verify(&[SIGNATURE_LABEL, &self.pcr0()[..]].concat(), &sig)
            .map_err(|_| {
                ImageError::Signature(
                    "the signature does not verify: the image was altered after signing".into(),
                )
            })?;
        let now = std::time::SystemTime::now();
        Ok(Some(SignatureInfo {
            certificate_der: s.certificate.clone(),
            subject: cert.subject.clone(),
            not_before: rfc3339(cert.not_before),
            not_after: rfc3339(cert.not_after),
            valid_now: now >= cert.not_before && now <= cert.not_after,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component() -> Vec<u8> {
        let mut c = COMPONENT_PREAMBLE.to_vec();
        c.extend_from_slice(b"rest of a component");
        c
    }

    #[test]
    fn builds_are_deterministic_and_round_trip() {
        let mut m = Manifest::new("scorer", "1.0.0");
        m.metadata = serde_json::json!({"z": 1, "a": {"y": 2, "b": 3}});
        let a = Image::build(m.clone(), component(), None).unwrap();
        let b = Image::build(m.clone(), component(), None).unwrap();
        assert_eq!(a, b);
        let img = Image::parse(&a).unwrap();
        assert_eq!(img.manifest, m);
        assert_eq!(img.component, component());
        assert_eq!(img.pcr0(), pcr::measure(&a));
        assert_eq!(img.pcr2(), pcr::measure(&component()));
        assert!(img.pcr8().is_none());
        assert!(String::from_utf8_lossy(&a).contains(r#"{"a":{"b":3,"y":2},"z":1}"#));
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let bytes = Image::build(Manifest::new("w", "1"), component(), None).unwrap();
        for n in 0..bytes.len() {
            assert!(Image::parse(&bytes[..n]).is_err(), "truncated to {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Image::parse(&longer).is_err());
    }

    #[test]
    fn core_modules_and_bad_manifests_are_refused() {
        let mut module = b"\0asm\x01\0\0\0".to_vec();
        module.extend_from_slice(b"x");
        let err = Image::build(Manifest::new("w", "1"), module, None).unwrap_err();
        assert!(err.to_string().contains("core module"), "{err}");
        let mut m = Manifest::new("bad name", "1");
        assert_eq!(
            Image::build(m.clone(), component(), None)
                .unwrap_err()
                .code(),
            "E-IMAGE-MANIFEST"
        );
        m.name = "ok".into();
        m.memory_mib = 0;
        assert!(Image::build(m, component(), None).is_err());
    }
}
