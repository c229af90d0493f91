//! The verifier against real AWS Nitro documents and emulated ones.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use cloister_attestation::document::{self, AttestationDocument, SigningAlgorithm};
use cloister_attestation::nsm::{
    AttestationRequest, DEFAULT_NSM_VALIDITY, Nsm, PlatformDir, read_pem_certificates,
};
use cloister_attestation::pcr::{self, PCR_LEN};
use cloister_attestation::verify::{TrustAnchor, VerifyError, VerifyOptions, verify};
use cloister_proto::ErrorCode;
use ed25519_dalek::Signer;
use proptest::prelude::*;

const REAL_TIMESTAMP_MS: u64 = 1_722_457_107_047;
const REAL_PCR0: &str = "a6cdfede5b1e7950de33218995add7d8f1f6e059c9cccd204316e69feaa2ce54f6f9ff6f5992db0f1ca6135f9b095b85";

fn testdata(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/nitro")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn at_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

fn aws_at_own_time() -> VerifyOptions {
    VerifyOptions {
        anchors: vec![TrustAnchor::aws_nitro()],
        at: Some(at_ms(REAL_TIMESTAMP_MS)),
        ..Default::default()
    }
}

#[test]
fn the_aws_root_is_pinned() {
    assert_eq!(
        TrustAnchor::aws_nitro().fingerprint_sha256(),
        "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
    );
}

#[test]
fn real_production_document_verifies_at_its_own_time() {
    let v = verify(&testdata("real-production.cose"), &aws_at_own_time()).unwrap();
    assert_eq!(v.algorithm, SigningAlgorithm::ES384);
    assert_eq!(v.module_id, "i-0809070ca8037095f-enc01910a70380dca7e");
    assert_eq!(v.timestamp_ms, REAL_TIMESTAMP_MS);
    assert_eq!(v.pcrs.len(), 16);
    assert_eq!(hex::encode(v.image_sha384().unwrap()), REAL_PCR0);
    assert!(!v.debug);
    assert_eq!(v.trust_anchor, "aws-nitro-enclaves-root");
    assert!(
        v.chain_subjects[0].contains("aws.nitro-enclaves"),
        "{:?}",
        v.chain_subjects
    );
    assert!(v.chain_subjects.len() >= 3);

    // Expected PCRs: the right one passes, a wrong one names the register.
    let mut opts = aws_at_own_time();
    opts.expected_pcrs
        .insert(0, hex::decode(REAL_PCR0).unwrap());
    verify(&testdata("real-production.cose"), &opts).unwrap();
    opts.expected_pcrs.insert(0, vec![0; PCR_LEN]);
    let err = verify(&testdata("real-production.cose"), &opts).unwrap_err();
    assert!(
        matches!(err, VerifyError::PcrMismatch { index: 0, .. }),
        "{err}"
    );
    opts.expected_pcrs = BTreeMap::from([(20, vec![0; PCR_LEN])]);
    assert_eq!(
        verify(&testdata("real-production.cose"), &opts).unwrap_err(),
        VerifyError::PcrMissing(20)
    );
}

#[test]
fn real_production_document_is_expired_now() {
    let opts = VerifyOptions {
        anchors: vec![TrustAnchor::aws_nitro()],
        ..Default::default()
    };
    let err = verify(&testdata("real-production.cose"), &opts).unwrap_err();
    assert_eq!(err.code(), "E-ATTEST-CERTIFICATE-EXPIRED", "{err}");
    assert!(err.to_string().contains("is not valid at"), "{err}");
}

#[test]
fn real_document_with_bad_signature_is_rejected_for_its_signature() {
    let bytes = testdata("real-bad-signature.cose");
    let own = document::UnverifiedDocument::parse(&bytes)
        .unwrap()
        .document
        .timestamp;
    assert_eq!(own, 1_721_770_180_771);
    let mut opts = aws_at_own_time();
    opts.at = Some(at_ms(own));
    let err = verify(&bytes, &opts).unwrap_err();
    assert_eq!(err, VerifyError::Signature);
    assert_eq!(err.code(), "E-ATTEST-SIGNATURE");
}

#[test]
fn real_document_needs_the_aws_root_explicitly() {
    let dir = tempfile::tempdir().unwrap();
    let platform = PlatformDir::new(dir.path());
    platform.init("test", DEFAULT_NSM_VALIDITY).unwrap();
    let mut opts = aws_at_own_time();
    opts.anchors = vec![emulated_anchor(&platform)];
    let err = verify(&testdata("real-production.cose"), &opts).unwrap_err();
    assert_eq!(err.code(), "E-ATTEST-UNTRUSTED-ROOT", "{err}");
    assert!(err.to_string().contains("aws.nitro-enclaves"), "{err}");

    opts.anchors.clear();
    assert_eq!(
        verify(&testdata("real-production.cose"), &opts).unwrap_err(),
        VerifyError::NoTrustAnchors
    );
}

#[test]
fn real_document_is_too_old_for_a_strict_max_age() {
    let mut opts = aws_at_own_time();
    opts.at = Some(at_ms(REAL_TIMESTAMP_MS + 120_000));
    opts.max_age = Some(Duration::from_secs(60));
    let err = verify(&testdata("real-production.cose"), &opts).unwrap_err();
    assert_eq!(
        err,
        VerifyError::TooOld {
            age_secs: 120,
            max_secs: 60
        }
    );
    opts.max_age = Some(Duration::from_secs(300));
    verify(&testdata("real-production.cose"), &opts).unwrap();
}

fn emulated_anchor(p: &PlatformDir) -> TrustAnchor {
    TrustAnchor::from_der(
        "test-platform",
        read_pem_certificates(&p.root_cert()).unwrap().remove(0),
    )
    .unwrap()
}

struct Emulated {
    _dir: tempfile::TempDir,
    platform: PlatformDir,
    nsm: Nsm,
}

fn emulated() -> Emulated {
    let dir = tempfile::tempdir().unwrap();
    let platform = PlatformDir::new(dir.path());
    platform.init("test", DEFAULT_NSM_VALIDITY).unwrap();
    let nsm = Nsm::load(&platform).unwrap();
    Emulated {
        _dir: dir,
        platform,
        nsm,
    }
}

fn request() -> AttestationRequest {
    AttestationRequest {
        module_id: "i-test-enc0001".into(),
        pcrs: (0..32)
            .map(|i| {
                (
                    i,
                    if i < 3 {
                        pcr::measure(&[i as u8])
                    } else {
                        [0; PCR_LEN]
                    },
                )
            })
            .collect(),
        public_key: Some(vec![0x42; 32]),
        user_data: Some(b"hello".to_vec()),
        nonce: Some(vec![7; 20]),
    }
}

fn opts_for(e: &Emulated) -> VerifyOptions {
    VerifyOptions {
        anchors: vec![emulated_anchor(&e.platform)],
        ..Default::default()
    }
}

#[test]
fn emulated_document_verifies_with_its_platform_root() {
    let e = emulated();
    let doc = e.nsm.attest(&request(), SystemTime::now()).unwrap();
    let v = verify(&doc, &opts_for(&e)).unwrap();
    assert_eq!(v.algorithm, SigningAlgorithm::EdDSA);
    assert_eq!(v.module_id, "i-test-enc0001");
    assert_eq!(v.pcrs.len(), 32);
    assert_eq!(v.pcrs[&0], pcr::measure(&[0]).to_vec());
    assert_eq!(v.public_key.as_deref(), Some(&[0x42; 32][..]));
    assert_eq!(v.user_data.as_deref(), Some(&b"hello"[..]));
    assert_eq!(v.nonce.as_deref(), Some(&[7; 20][..]));
    assert!(!v.debug);
    assert_eq!(v.chain_subjects.len(), 2);
    assert!(v.chain_subjects[0].contains("Cloister Platform Root CA"));
    assert!(v.chain_subjects[1].contains("Cloister NSM"));
}

#[test]
fn the_nonce_must_answer_the_challenge() {
    let e = emulated();
    let doc = e.nsm.attest(&request(), SystemTime::now()).unwrap();
    let mut opts = opts_for(&e);
    opts.expected_nonce = Some(vec![7; 20]);
    verify(&doc, &opts).unwrap();
    opts.expected_nonce = Some(vec![8; 20]);
    let err = verify(&doc, &opts).unwrap_err();
    assert_eq!(err.code(), "E-ATTEST-NONCE");
    let mut req = request();
    req.nonce = None;
    let err = verify(&e.nsm.attest(&req, SystemTime::now()).unwrap(), &opts).unwrap_err();
    assert!(err.to_string().contains("is absent"), "{err}");
}

#[test]
fn debug_documents_are_flagged() {
    let e = emulated();
    let mut req = request();
    req.pcrs = pcr::PcrBank::debug().snapshot();
    let v = verify(
        &e.nsm.attest(&req, SystemTime::now()).unwrap(),
        &opts_for(&e),
    )
    .unwrap();
    assert!(v.debug);
}

#[test]
fn every_single_byte_change_is_rejected() {
    let e = emulated();
    let doc = e.nsm.attest(&request(), SystemTime::now()).unwrap();
    let opts = opts_for(&e);
    verify(&doc, &opts).unwrap();
    for i in 0..doc.len() {
        let mut bad = doc.clone();
        bad[i] ^= 0x01;
        assert!(
            verify(&bad, &opts).is_err(),
            "flipping byte {i} was not detected"
        );
    }
}

#[test]
fn another_platforms_document_is_untrusted() {
    let (a, b) = (emulated(), emulated());
    let doc = b.nsm.attest(&request(), SystemTime::now()).unwrap();
    let err = verify(&doc, &opts_for(&a)).unwrap_err();
    assert_eq!(err.code(), "E-ATTEST-UNTRUSTED-ROOT");
}

/// Signs `doc` with an NSM key, bypassing the NSM's own document assembly.
fn sign_raw(
    doc: &AttestationDocument,
    key: &ed25519_dalek::SigningKey,
    alg: SigningAlgorithm,
) -> Vec<u8> {
    document::sign(doc, alg, |data| key.sign(data).to_bytes().to_vec()).unwrap()
}

fn parts(e: &Emulated) -> (AttestationDocument, ed25519_dalek::SigningKey) {
    let bytes = e.nsm.attest(&request(), SystemTime::now()).unwrap();
    let doc = document::UnverifiedDocument::parse(&bytes)
        .unwrap()
        .document;
    let key = cloister_attestation::keyfile::read_signing_key(&e.platform.nsm_key()).unwrap();
    (doc, key)
}

#[test]
fn a_certificate_from_another_root_under_a_trusted_bundle_breaks_the_chain() {
    let (a, b) = (emulated(), emulated());
    // B's NSM certificate and key, presenting A's root in the bundle.
    let (mut doc, b_key) = parts(&b);
    doc.cabundle = read_pem_certificates(&a.platform.root_cert()).unwrap();
    let err = verify(
        &sign_raw(&doc, &b_key, SigningAlgorithm::EdDSA),
        &opts_for(&a),
    )
    .unwrap_err();
    assert_eq!(err.code(), "E-ATTEST-CHAIN", "{err}");
}

#[test]
fn a_ca_cannot_sign_documents_and_a_leaf_cannot_be_a_ca() {
    let e = emulated();
    let (mut doc, _) = parts(&e);
    // The root as the signing certificate (signed with the root key).
    let root_key = cloister_attestation::keyfile::read_signing_key(&e.platform.root_key()).unwrap();
    doc.certificate = doc.cabundle[0].clone();
    let err = verify(
        &sign_raw(&doc, &root_key, SigningAlgorithm::EdDSA),
        &opts_for(&e),
    )
    .unwrap_err();
    assert!(err.to_string().contains("must not be a CA"), "{err}");

    // The NSM certificate placed in the bundle as if it were an intermediate.
    let (mut doc, key) = parts(&e);
    doc.cabundle.push(doc.certificate.clone());
    let err = verify(
        &sign_raw(&doc, &key, SigningAlgorithm::EdDSA),
        &opts_for(&e),
    )
    .unwrap_err();
    assert!(err.to_string().contains("must be a CA"), "{err}");
}

#[test]
fn the_algorithm_must_match_the_certificate_key() {
    let e = emulated();
    let (doc, key) = parts(&e);
    let err = verify(
        &sign_raw(&doc, &key, SigningAlgorithm::ES384),
        &opts_for(&e),
    )
    .unwrap_err();
    assert!(
        matches!(err, VerifyError::KeyMismatch { alg: "ES384", .. }),
        "{err}"
    );
}

#[test]
fn future_dated_and_old_documents_are_refused() {
    let e = emulated();
    let now = SystemTime::now();
    let doc = e
        .nsm
        .attest(&request(), now + Duration::from_secs(600))
        .unwrap();
    let err = verify(&doc, &opts_for(&e)).unwrap_err();
    assert!(matches!(err, VerifyError::FromTheFuture { .. }), "{err}");

    // Validly signed, dated past year 9999 or at the end of time: refused,
    // with the date written as milliseconds (no panic).
    let (mut raw, key) = parts(&e);
    for ts in [u64::MAX, 400_000_000_000_000] {
        raw.timestamp = ts;
        let doc = sign_raw(&raw, &key, SigningAlgorithm::EdDSA);
        let err = verify(&doc, &opts_for(&e)).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("{ts} ms after the Unix epoch")),
            "{err}"
        );
    }

    let doc = e.nsm.attest(&request(), now).unwrap();
    let mut opts = opts_for(&e);
    opts.max_age = Some(Duration::from_secs(30));
    opts.at = Some(now + Duration::from_secs(31));
    assert_eq!(verify(&doc, &opts).unwrap_err().code(), "E-ATTEST-STALE");
    opts.at = Some(now + Duration::from_secs(29));
    verify(&doc, &opts).unwrap();
}

#[test]
fn an_expired_nsm_certificate_is_refused_by_the_verifier() {
    let e = emulated();
    let doc = e.nsm.attest(&request(), SystemTime::now()).unwrap();
    let mut opts = opts_for(&e);
    opts.at = Some(SystemTime::now() + DEFAULT_NSM_VALIDITY + Duration::from_secs(60));
    let err = verify(&doc, &opts).unwrap_err();
    assert_eq!(err.code(), "E-ATTEST-CERTIFICATE-EXPIRED", "{err}");
}

#[test]
fn a_non_ca_cannot_be_a_trust_anchor() {
    let e = emulated();
    let nsm_cert = read_pem_certificates(&e.platform.nsm_cert())
        .unwrap()
        .remove(0);
    let err = TrustAnchor::from_der("leaf", nsm_cert).unwrap_err();
    assert!(err.to_string().contains("must be a CA"), "{err}");
    assert!(TrustAnchor::from_der("junk", vec![1, 2, 3]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_real_documents_never_panic_and_never_verify(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut doc = testdata("real-production.cose");
        let mut changed = false;
        for (i, b) in edits {
            let i = i.index(doc.len());
            changed |= doc[i] != b;
            doc[i] = b;
        }
        if truncate {
            let n = cut.index(doc.len());
            doc.truncate(n);
            changed = true;
        }
        let result = verify(&doc, &aws_at_own_time());
        if changed {
            prop_assert!(result.is_err());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(verify(&bytes, &aws_at_own_time()).is_err());
        let _ = document::UnverifiedDocument::parse(&bytes);
        let _ = AttestationDocument::from_cbor(&bytes);
    }
}

#[test]
fn the_chain_cache_never_vouches_for_what_the_full_check_would_refuse() {
    use cloister_attestation::verify::ChainCache;
    let e = emulated();
    let mut opts = opts_for(&e);
    opts.chain_cache = Some(std::sync::Arc::new(ChainCache::default()));
    let doc = e.nsm.attest(&request(), SystemTime::now()).unwrap();
    // Before the NSM certificate is valid: refused, and nothing is cached.
    let mut early = opts.clone();
    early.at = Some(SystemTime::now() - Duration::from_secs(86_400));
    assert_eq!(
        verify(&doc, &early).unwrap_err().code(),
        "E-ATTEST-CERTIFICATE-EXPIRED"
    );
    // Warm: the same answer as without the cache, twice.
    let cold = verify(&doc, &opts_for(&e)).unwrap();
    assert_eq!(verify(&doc, &opts).unwrap(), cold);
    assert_eq!(verify(&doc, &opts).unwrap(), cold);
    // With the chain cached, every changed byte is still refused.
    for i in 0..doc.len() {
        let mut bad = doc.clone();
        bad[i] ^= 0x01;
        assert!(verify(&bad, &opts).is_err(), "byte {i} with a warm cache");
    }
    // Outside the certificates' validity the cached chain is not used.
    let mut late = opts.clone();
    late.at = Some(SystemTime::now() + DEFAULT_NSM_VALIDITY + Duration::from_secs(60));
    assert_eq!(
        verify(&doc, &late).unwrap_err().code(),
        "E-ATTEST-CERTIFICATE-EXPIRED"
    );
    // Another platform's chain under this cache is still untrusted.
    let other = emulated();
    let foreign = other.nsm.attest(&request(), SystemTime::now()).unwrap();
    assert_eq!(
        verify(&foreign, &opts).unwrap_err().code(),
        "E-ATTEST-UNTRUSTED-ROOT"
    );
    // A document signed by another key under the cached chain fails its signature.
    let (d, _) = parts(&e);
    let wrong = sign_raw(
        &d,
        &ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng),
        SigningAlgorithm::EdDSA,
    );
    assert_eq!(verify(&wrong, &opts).unwrap_err(), VerifyError::Signature);
}
