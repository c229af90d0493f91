//! The stable error codes of this crate, for `cloister explain`.

use cloister_proto::CodeInfo;

macro_rules! codes {
    ($($code:literal => $summary:literal, $explanation:literal;)*) => {
        /// Every code this crate's errors can carry.
        pub const CODES: &[CodeInfo] = &[$(CodeInfo { code: $code, summary: $summary, explanation: $explanation }),*];
    };
}

codes! {
    "E-ATTEST-PCR-RANGE" => "no such PCR",
    "Registers are numbered 0 to 31.";
    "E-ATTEST-PCR-READONLY" => "a build-time PCR cannot be changed",
    "PCR0 to PCR15 are fixed when the enclave starts (image, runtime, application, parent role, instance id, signing certificate). A workload may extend and lock only PCR16 to PCR31.";
    "E-ATTEST-PCR-LOCKED" => "the PCR is locked",
    "A locked register can no longer be extended, until the enclave restarts. Lock a register after the last measurement that belongs in it.";
    "E-ATTEST-DOCUMENT-TOO-LARGE" => "the attestation document is too large",
    "Documents are at most 32 KiB; real Nitro documents are about 4.5 KiB. The input is probably not an attestation document.";
    "E-ATTEST-COSE" => "not a COSE_Sign1 structure",
    "An attestation document is a COSE_Sign1 (RFC 9052), tagged (18) or untagged: an array of protected header, unprotected header, payload and signature, with nothing after it. The algorithm must be in the protected header and the payload must be attached.";
    "E-ATTEST-ALGORITHM" => "the signature algorithm is not accepted",
    "Documents are signed with EdDSA (Ed25519, COSE alg -8) by Cloister's emulated NSM, or ES384 (ECDSA P-384 with SHA-384, alg -35) by AWS Nitro's NSM, and the signing certificate's key must be of that algorithm's type.";
    "E-ATTEST-DOCUMENT" => "the attestation document payload is malformed",
    "The payload must be a CBOR map with exactly Nitro's fields: module_id (text), digest (\"SHA384\"), timestamp (unsigned, ms), pcrs (map of index 0-31 to 48-byte strings), certificate (bytes), cabundle (non-empty array of bytes, root first) and optionally public_key, user_data and nonce (bytes or nil). Unknown or repeated fields and trailing bytes are refused.";
    "E-ATTEST-FIELD-TOO-LARGE" => "public_key, user_data or nonce is over 1024 bytes",
    "Each of these three fields holds at most 1024 bytes, as the Nitro NSM enforces. Hash larger data and attest the hash.";
    "E-ATTEST-NO-TRUST-ANCHOR" => "no trust anchor is configured",
    "Nothing is trusted by default. Pass the platform root (`--root root.pem`, made by `cloister platform init`) or `--aws-nitro-root` for real Nitro documents.";
    "E-ATTEST-UNTRUSTED-ROOT" => "the document chains to a root that is not trusted",
    "cabundle[0] must be byte-for-byte one of the configured roots. The document comes from another platform, or the configured root is the wrong file.";
    "E-ATTEST-CERTIFICATE" => "a certificate is malformed or has the wrong constraints",
    "Every certificate must be canonical DER X.509. Bundle certificates must be CAs (basicConstraints CA=true, keyUsage keyCertSign); the signing certificate must not be a CA and, if it has keyUsage, must allow digitalSignature.";
    "E-ATTEST-CERTIFICATE-EXPIRED" => "a certificate is not valid at the verification time",
    "NSM certificates are short-lived (Nitro's live for hours, Cloister's for 24 hours by default). Verify fresh documents, or pass --at with the document's own time to check an old one. `cloister platform renew` issues a new NSM certificate.";
    "E-ATTEST-CHAIN" => "the certificate chain does not verify",
    "No valid path leads from the signing certificate through the bundle to the trusted root: a signature in the chain is wrong, a certificate was replaced, or a constraint (path length, key usage) is violated.";
    "E-ATTEST-SIGNATURE" => "the document's signature does not verify",
    "The COSE signature does not match the document and the signing certificate's key: the document was altered after signing, or signed by another key.";
    "E-ATTEST-STALE" => "the document is too old, or dated in the future",
    "A verifier refuses documents older than its maximum age (--max-age) and documents dated more than 60 s after the verification time. Request a fresh document.";
    "E-ATTEST-PCR-MISMATCH" => "a PCR does not have the expected value",
    "The enclave's measurement differs from the one expected: another image, runtime, parent role or instance, or a debug-mode enclave (all zeros).";
    "E-ATTEST-NONCE" => "the document answers another challenge",
    "A verifier that sent a nonce accepts only a document carrying that nonce; any other is a replay of an older document or an answer to someone else's challenge.";
    "E-ATTEST-DEBUG-ENCLAVE" => "the document is a debug-mode enclave's",
    "A debug-mode enclave's PCR0, PCR1 and PCR2 read as zeros and its parent can read its console: a client that sends it data hands the data to the parent. The attested channel refuses it unless the client allows debug enclaves.";
    "E-PLATFORM-EXISTS" => "the platform directory already has a root",
    "`platform init` never replaces a platform root: every verifier that trusts it would break. Use another directory, or `platform renew` to issue a new NSM certificate.";
    "E-PLATFORM-MISSING" => "not a platform directory",
    "The directory lacks the files `cloister platform init --dir DIR` makes (root.pem, nsm.pem, nsm.key, platform.json).";
    "E-PLATFORM-CERTIFICATE" => "a platform certificate could not be issued or does not match its key",
    "The NSM certificate must certify nsm.key. Run `cloister platform renew --dir DIR` to issue a matching pair.";
    "E-PLATFORM-NSM-EXPIRED" => "the NSM certificate has expired",
    "The emulated NSM refuses to sign with an expired certificate. Run `cloister platform renew --dir DIR`.";
    "E-KEYFILE-IO" => "a key or certificate file could not be read or written",
    "Check that the path exists and that this user may read it (or write its directory).";
    "E-KEYFILE-FORMAT" => "a key or certificate file is not in the expected format",
    "Private keys are Ed25519 PKCS#8 PEM (`openssl genpkey -algorithm ed25519`), public keys SPKI PEM (`openssl pkey -pubout`), certificates PEM CERTIFICATE blocks.";
    "E-KEYFILE-PERMISSIONS" => "a private key file is readable by other users",
    "Private key files must be mode 0600 (or stricter); run chmod 600 on the file.";
    "E-KEYFILE-EXISTS" => "the file exists and will not be overwritten",
    "Key files are never overwritten silently. Remove the file or choose another path.";
}

#[cfg(test)]
mod tests {
    use super::CODES;
    use crate::document::DocumentError;
    use crate::keyfile::KeyFileError;
    use crate::nsm::NsmError;
    use crate::pcr::PcrError;
    use crate::verify::VerifyError;
    use cloister_proto::ErrorCode;

    #[test]
    fn every_error_variant_has_an_explained_code() {
        let io = || std::io::Error::other("x");
        let doc = DocumentError::Cbor(String::new());
        let errors: Vec<Box<dyn ErrorCode>> = vec![
            Box::new(PcrError::OutOfRange(0)),
            Box::new(PcrError::ReadOnly(0)),
            Box::new(PcrError::Locked(0)),
            Box::new(DocumentError::TooLarge { len: 0, max: 0 }),
            Box::new(DocumentError::Cose(String::new())),
            Box::new(DocumentError::Algorithm(String::new())),
            Box::new(doc.clone()),
            Box::new(DocumentError::Field {
                field: "f",
                problem: String::new(),
            }),
            Box::new(DocumentError::FieldTooLarge {
                field: "f",
                len: 0,
                max: 0,
            }),
            Box::new(VerifyError::Document(doc)),
            Box::new(VerifyError::NoTrustAnchors),
            Box::new(VerifyError::UntrustedRoot {
                subject: String::new(),
                fingerprint: String::new(),
            }),
            Box::new(VerifyError::Certificate {
                which: String::new(),
                problem: String::new(),
            }),
            Box::new(VerifyError::CertificateTime {
                which: String::new(),
                subject: String::new(),
                at: String::new(),
                not_before: String::new(),
                not_after: String::new(),
            }),
            Box::new(VerifyError::Chain(String::new())),
            Box::new(VerifyError::KeyMismatch {
                alg: "",
                key: String::new(),
            }),
            Box::new(VerifyError::Signature),
            Box::new(VerifyError::TooOld {
                age_secs: 0,
                max_secs: 0,
            }),
            Box::new(VerifyError::FromTheFuture {
                timestamp: String::new(),
                at: String::new(),
            }),
            Box::new(VerifyError::PcrMismatch {
                index: 0,
                expected: String::new(),
                actual: String::new(),
            }),
            Box::new(VerifyError::PcrMissing(0)),
            Box::new(VerifyError::NonceMismatch {
                expected: String::new(),
                actual: String::new(),
            }),
            Box::new(NsmError::AlreadyInitialised("d".into())),
            Box::new(NsmError::NotAPlatform {
                path: "d".into(),
                problem: String::new(),
            }),
            Box::new(NsmError::Certificate(String::new())),
            Box::new(NsmError::Expired {
                dir: "d".into(),
                expired: String::new(),
            }),
            Box::new(KeyFileError::Read {
                path: "p".into(),
                source: io(),
            }),
            Box::new(KeyFileError::Write {
                path: "p".into(),
                source: io(),
            }),
            Box::new(KeyFileError::Format {
                path: "p".into(),
                what: "",
                problem: String::new(),
            }),
            Box::new(KeyFileError::Permissions {
                path: "p".into(),
                mode: 0,
            }),
            Box::new(KeyFileError::Exists("p".into())),
        ];
        for e in errors {
            assert!(
                cloister_proto::codes::lookup(&[CODES], e.code()).is_some(),
                "{} has no explanation",
                e.code()
            );
        }
        let mut seen = std::collections::HashSet::new();
        assert!(CODES.iter().all(|c| seen.insert(c.code)), "duplicate code");
    }
}
