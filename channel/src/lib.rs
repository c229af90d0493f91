//! The client side of Cloister's attested channel (docs/attested-channel.md).
//!
//! Before a client sends anything to an enclave it checks what runs there: it
//! asks for an attestation document over a nonce of its own, verifies the
//! certificate chain to a root it trusts, the signature, the document's age,
//! the nonce and the PCRs it expects, and refuses debug-mode enclaves. The
//! document's `public_key` is the enclave's channel key (X25519) and its
//! `user_data` that key's Oblivious HTTP key configuration (RFC 9458 §3), so a
//! verified document says which key only that enclave holds. Requests are then
//! Binary HTTP POSTs (RFC 9292) encapsulated to that key (RFC 9458 §4.3); the
//! parent, which relays them, sees ciphertext both ways.
//!
//! The crate does no I/O: fetch the document and relay the messages however the
//! enclave is reached (`cloister call --attested` through the supervisor, or the
//! HTTP face `cloister relay`).
//!
//! ```no_run
//! # fn fetch_document(_: &[u8]) -> Vec<u8> { Vec::new() }
//! # fn post(_: &[u8]) -> Vec<u8> { Vec::new() }
//! # fn main() -> Result<(), cloister_channel::ChannelError> {
//! use cloister_channel::{Expectations, new_nonce, verify};
//!
//! let root = std::fs::read("platform/root.pem").expect("root");
//! let expect = Expectations::from_root_pem(&root)?.pcr(0, hex::decode("ab12...").unwrap_or_default());
//! let nonce = new_nonce();
//! // GET /.well-known/cloister-attestation?nonce=HEX from the relay:
//! let enclave = verify(&fetch_document(&nonce), &nonce, &expect)?;
//! let (request, pending) = enclave.seal(b"patient-17,F,61,...")?;
//! // POST it as message/ohttp-req; the answer is message/ohttp-res:
//! let score = pending.open(&post(&request))?;
//! # let _ = score; Ok(()) }
//! ```

pub mod encapsulation;
pub mod message;

use std::collections::BTreeMap;
use std::time::Duration;

use zeroize::Zeroizing;

use cloister_attestation::verify::{self as attestation, VerifyOptions};
pub use cloister_attestation::verify::{TrustAnchor, VerifiedDocument, VerifyError};
use cloister_proto::ErrorCode;
use encapsulation::{Aes256Gcm, KeyConfig, ResponseOpener};

/// A document older than this is refused unless the client says otherwise.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// The length of the nonces [`new_nonce`] makes.
pub const NONCE_LEN: usize = 32;
/// Nonces shorter than this are not a challenge (anyone could have asked for
/// the same document earlier); the longest an attestation document holds.
pub use cloister_proto::call::{MAX_NONCE, MIN_NONCE};
/// The PCRs that name the image: PCR0 (the image with its measured
/// configuration), PCR2 (its code), PCR8 (its signer). PCR1 names only the
/// runtime and PCR3/4 are what the parent chose, so pinning only those would
/// accept any image the parent starts.
pub const IMAGE_PCRS: [usize; 3] = [0, 2, 8];

/// Why the client refused the enclave or its answer.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The document does not verify (its own code: chain, signature, age,
    /// nonce, PCRs, debug mode).
    #[error(transparent)]
    Attestation(#[from] VerifyError),
    #[error("{0}")]
    Expectation(String),
    #[error("the attestation document does not bind a channel key: {0}")]
    KeyBinding(String),
    #[error("the request could not be encapsulated: {0}")]
    Seal(String),
    #[error("the enclave's answer does not open as its response to this request: {0}")]
    Response(String),
    /// The enclave opened the request and refused it; only this client can read why.
    #[error("the enclave answered {status} [{code}]: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
}

impl ErrorCode for ChannelError {
    fn code(&self) -> &'static str {
        match self {
            ChannelError::Attestation(e) => e.code(),
            ChannelError::Expectation(_) => "E-CHANNEL-EXPECTATION",
            ChannelError::KeyBinding(_) => "E-CHANNEL-KEY-BINDING",
            ChannelError::Seal(_) => "E-CHANNEL-MALFORMED",
            ChannelError::Response(_) => "E-CHANNEL-RESPONSE",
            ChannelError::Refused { .. } => "E-CHANNEL-REFUSED",
        }
    }
}

macro_rules! codes {
    ($($code:literal => $summary:literal, $explanation:literal;)*) => {
        /// The client's codes (the runtime's `E-CHANNEL-*` codes are the runtime's).
        pub const CODES: &[cloister_proto::CodeInfo] = &[$(cloister_proto::CodeInfo { code: $code, summary: $summary, explanation: $explanation }),*];
    };
}

codes! {
    "E-CHANNEL-EXPECTATION" => "the client's expectations are incomplete or unreadable",
    "An attested call needs a trust root (--root ROOT.pem), an expected PCR that names the image (PCR0, PCR2 or PCR8: --expect-pcr N=HEX, or --expect-image IMAGE.cimg) and a nonce of 16 to 512 bytes: a document that proves only 'some enclave on this platform', or one anyone could have asked for earlier, is not a reason to send it data.";
    "E-CHANNEL-KEY-BINDING" => "the document does not bind the channel key",
    "The document's public_key must be a 32-byte X25519 key and its user_data that key's RFC 9458 key configuration (DHKEM(X25519, HKDF-SHA256) with HKDF-SHA256/AES-256-GCM) naming the same key. A document without them was asked for by the guest, not made by the runtime for its channel.";
    "E-CHANNEL-RESPONSE" => "the answer does not open",
    "The encapsulated response failed authentication (altered by the relay, or the answer to another request) or is not a Binary HTTP response.";
    "E-CHANNEL-REFUSED" => "the enclave refused the request inside the channel",
    "The enclave opened the request and answered with an HTTP error; the message carries its code (cloister-error) and reason, which only the client could read.";
}

/// What the client requires of the enclave.
#[derive(Debug, Clone)]
pub struct Expectations {
    anchors: Vec<TrustAnchor>,
    pcrs: BTreeMap<usize, Vec<u8>>,
    max_age: Duration,
    allow_debug: bool,
}

impl Expectations {
    /// Trust these roots (an emulated platform's `root.pem`, or
    /// [`TrustAnchor::aws_nitro`]).
    pub fn new(anchors: Vec<TrustAnchor>) -> Expectations {
        Expectations {
            anchors,
            pcrs: BTreeMap::new(),
            max_age: DEFAULT_MAX_AGE,
            allow_debug: false,
        }
    }

    /// Trust the certificates of a PEM file.
    pub fn from_root_pem(pem: &[u8]) -> Result<Expectations, ChannelError> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let mut anchors = Vec::new();
        for (i, cert) in CertificateDer::pem_slice_iter(pem).enumerate() {
            let cert = cert.map_err(|e| {
                ChannelError::Expectation(format!("certificate {} of the root: {e}", i + 1))
            })?;
            anchors.push(TrustAnchor::from_der(
                format!("root {}", i + 1),
                cert.to_vec(),
            )?);
        }
        if anchors.is_empty() {
            return Err(ChannelError::Expectation(
                "the root file holds no PEM certificate".into(),
            ));
        }
        Ok(Expectations::new(anchors))
    }

    /// Require PCR `index` to be `value` (48 bytes).
    pub fn pcr(mut self, index: usize, value: Vec<u8>) -> Expectations {
        self.pcrs.insert(index, value);
        self
    }

    /// Require the PCRs an image file measures: PCR0 (the image, its
    /// measured configuration included) and PCR2 (its code).
    pub fn image(self, cimg: &[u8]) -> Result<Expectations, ChannelError> {
        let image = cloister_image::Image::parse(cimg)
            .map_err(|e| ChannelError::Expectation(format!("the expected image: {e}")))?;
        Ok(self
            .pcr(0, image.pcr0().to_vec())
            .pcr(2, image.pcr2().to_vec()))
    }

    /// Refuse documents older than this (default [`DEFAULT_MAX_AGE`]).
    pub fn max_age(mut self, max_age: Duration) -> Expectations {
        self.max_age = max_age;
        self
    }

    /// Accept a debug-mode enclave (its PCRs are zeros; its parent reads its
    /// console). For development only.
    pub fn allow_debug(mut self, allow: bool) -> Expectations {
        self.allow_debug = allow;
        self
    }
}

/// A fresh random nonce for one document request.
pub fn new_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    nonce
}

/// An enclave whose document verified, and the channel key it binds.
#[derive(Debug)]
pub struct AttestedEnclave {
    document: VerifiedDocument,
    config: KeyConfig,
}

/// Verifies an enclave's channel document against the client's expectations
/// and the nonce the client sent, and extracts the channel key it binds.
pub fn verify(
    document: &[u8],
    nonce: &[u8],
    expect: &Expectations,
) -> Result<AttestedEnclave, ChannelError> {
    if !IMAGE_PCRS.iter().any(|i| expect.pcrs.contains_key(i)) {
        return Err(ChannelError::Expectation(
            "no expected PCR names the image: give PCR0 (--expect-pcr 0=HEX), PCR2, PCR8 or the image (--expect-image)".into(),
        ));
    }
    if !(MIN_NONCE..=MAX_NONCE).contains(&nonce.len()) {
        return Err(ChannelError::Expectation(format!(
            "the nonce is {} bytes: a client's challenge is {MIN_NONCE} to {MAX_NONCE} random bytes",
            nonce.len()
        )));
    }
    let verified = attestation::verify(
        document,
        &VerifyOptions {
            anchors: expect.anchors.clone(),
            max_age: Some(expect.max_age),
            expected_pcrs: expect.pcrs.clone(),
            expected_nonce: Some(nonce.to_vec()),
            refuse_debug: !expect.allow_debug,
            ..Default::default()
        },
    )?;
    let binding = |m: &str| ChannelError::KeyBinding(m.to_owned());
    let public_key = verified
        .public_key
        .as_deref()
        .ok_or_else(|| binding("the document has no public_key"))?;
    let encoded = verified
        .user_data
        .as_deref()
        .ok_or_else(|| binding("the document has no user_data (the key configuration)"))?;
    let config = KeyConfig::decode::<Aes256Gcm>(encoded).map_err(|e| {
        ChannelError::KeyBinding(format!(
            "user_data is not the channel's RFC 9458 key configuration (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM): {e}"
        ))
    })?;
    if public_key != config.public_key {
        return Err(binding(
            "public_key is not the key of the key configuration in user_data",
        ));
    }
    Ok(AttestedEnclave {
        document: verified,
        config,
    })
}

impl AttestedEnclave {
    /// What was verified: PCRs, module id, time, chain.
    pub fn document(&self) -> &VerifiedDocument {
        &self.document
    }

    /// The channel key's RFC 9458 key configuration.
    pub fn key_config(&self) -> Vec<u8> {
        self.config.encode::<Aes256Gcm>()
    }

    /// Encapsulates a request for the workload (a Binary HTTP POST of `body`
    /// to `/`) to the enclave's channel key; returns the `message/ohttp-req`
    /// bytes and what opens the answer.
    pub fn seal(&self, body: &[u8]) -> Result<(Vec<u8>, PendingResponse), ChannelError> {
        let plain = Zeroizing::new(message::post(body)?);
        let (request, opener) = encapsulation::seal_request::<Aes256Gcm>(&self.config, &plain)
            .map_err(|e| ChannelError::Seal(e.to_string()))?;
        Ok((request, PendingResponse(opener)))
    }
}

/// Opens the enclave's answer to one request.
pub struct PendingResponse(ResponseOpener<Aes256Gcm>);

impl PendingResponse {
    /// The workload's response, or the enclave's refusal (read only here).
    pub fn open(self, encapsulated: &[u8]) -> Result<Zeroizing<Vec<u8>>, ChannelError> {
        let plain = self
            .0
            .open(encapsulated)
            .map_err(|e| ChannelError::Response(e.to_string()))?;
        message::response_body(&plain).map(Zeroizing::new)
    }
}
