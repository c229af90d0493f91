//! `CiphertextForRecipient`: results of attested operations, encrypted with HPKE
//! (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, to
//! the X25519 public key inside the recipient's attestation document.
//! `docs/recipient.md` specifies the bytes so that any RFC 9180 implementation
//! can open it.
//!
//! ```text
//! CiphertextForRecipient = enc (32 bytes) || AEAD ciphertext || tag (16)
//! info = "cloister-kms-recipient-v1" 0x00 || lp(key ARN) || lp(operation) || lp(request id)
//!        where lp(s) = u16 BE length || UTF-8 bytes; key ARN is "" for GenerateRandom
//! aad  = SHA-384(attestation document bytes)
//! ```

use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use rand_core::OsRng;
use sha2::{Digest, Sha384};
use zeroize::Zeroizing;

use crate::error::{self, KmsError};

/// The KeyEncryptionAlgorithm a Recipient names.
pub const ALGORITHM: &str = "HPKE-Base-X25519-SHA256-AES256GCM";
const INFO_LABEL: &[u8] = b"cloister-kms-recipient-v1\0";
const ENC_LEN: usize = 32;

/// What the broker returns for a recipient, with the exact `info` and `aad`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub info: Vec<u8>,
    pub aad: Vec<u8>,
}

/// The HPKE `info` for one response.
pub fn info(key_arn: &str, operation: &str, request_id: &str) -> Vec<u8> {
    let mut out = INFO_LABEL.to_vec();
    for s in [key_arn, operation, request_id] {
        let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&s.as_bytes()[..len as usize]);
    }
    out
}

/// The HPKE `aad`: the SHA-384 of the attestation document.
pub fn aad(attestation_document: &[u8]) -> Vec<u8> {
    Sha384::digest(attestation_document).to_vec()
}

/// Seals `plaintext` to an X25519 public key (raw 32 bytes).
pub fn seal(
    public_key: &[u8],
    info: Vec<u8>,
    aad: Vec<u8>,
    plaintext: &[u8],
) -> Result<Sealed, KmsError> {
    let pk = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(public_key).map_err(|_| {
        error::validation(format!(
            "the attestation document's public_key must be a raw 32-byte X25519 key for {ALGORITHM} (it is {} bytes)",
            public_key.len()
        ))
    })?;
    let (enc, ct) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, X25519HkdfSha256, _>(
        &OpModeS::Base,
        &pk,
        &info,
        plaintext,
        &aad,
        &mut OsRng,
    )
    .map_err(|e| error::internal(format!("HPKE seal failed: {e}")))?;
    let mut ciphertext = enc.to_bytes().to_vec();
    ciphertext.extend_from_slice(&ct);
    Ok(Sealed {
        ciphertext,
        info,
        aad,
    })
}

/// An X25519 key pair for receiving `CiphertextForRecipient`; the private half
/// never leaves the process that made it (the enclave runtime).
pub struct RecipientKey {
    private: <X25519HkdfSha256 as hpke::Kem>::PrivateKey,
    public: [u8; 32],
}

impl RecipientKey {
    pub fn generate() -> Self {
        let (private, public) = X25519HkdfSha256::gen_keypair(&mut OsRng);
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&public.to_bytes());
        RecipientKey {
            private,
            public: pk,
        }
    }

    /// The raw public key to put in the attestation document's `public_key`.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Opens a `CiphertextForRecipient` with the expected `info` and `aad`.
    pub fn open(
        &self,
        ciphertext: &[u8],
        info: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        if ciphertext.len() < ENC_LEN {
            return Err(error::invalid_ciphertext(
                "CiphertextForRecipient is shorter than its encapsulated key",
            ));
        }
        let enc = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(&ciphertext[..ENC_LEN])
            .map_err(|_| error::invalid_ciphertext("bad encapsulated key"))?;
        hpke::single_shot_open::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &self.private,
            &enc,
            info,
            &ciphertext[ENC_LEN..],
            aad,
        )
        .map(Zeroizing::new)
        .map_err(|_| {
            error::invalid_ciphertext(
                "CiphertextForRecipient does not open: wrong key, or a different key id, operation, request id or document",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_binding() {
        let r = RecipientKey::generate();
        let info_a = info("arn:cloister:kms:local:key/a", "Decrypt", "req-1");
        let sealed = seal(&r.public_key(), info_a.clone(), aad(b"doc"), b"data key").unwrap();
        assert_eq!(
            r.open(&sealed.ciphertext, &sealed.info, &sealed.aad)
                .unwrap()
                .as_slice(),
            b"data key"
        );
        // Substituting another key id, operation, request or document fails.
        for other in [
            info("arn:cloister:kms:local:key/b", "Decrypt", "req-1"),
            info("arn:cloister:kms:local:key/a", "GenerateDataKey", "req-1"),
            info("arn:cloister:kms:local:key/a", "Decrypt", "req-2"),
        ] {
            assert!(r.open(&sealed.ciphertext, &other, &sealed.aad).is_err());
        }
        assert!(
            r.open(&sealed.ciphertext, &info_a, &aad(b"other doc"))
                .is_err()
        );
        assert!(
            RecipientKey::generate()
                .open(&sealed.ciphertext, &info_a, &sealed.aad)
                .is_err()
        );
        assert!(
            r.open(&sealed.ciphertext[..20], &info_a, &sealed.aad)
                .is_err()
        );
    }

    #[test]
    fn info_is_length_prefixed() {
        assert_ne!(info("ab", "c", ""), info("a", "bc", ""));
        assert!(info("k", "op", "id").starts_with(b"cloister-kms-recipient-v1\0\0\x01k\0\x02op"));
    }

    #[test]
    fn public_key_must_be_x25519() {
        let err = seal(&[1; 31], vec![], vec![], b"x").unwrap_err();
        assert!(err.message.contains("raw 32-byte X25519"), "{err}");
    }
}
