//! `CiphertextForRecipient` as AWS KMS returns it when a Recipient asks for
//! `KeyEncryptionAlgorithm = RSAES_OAEP_SHA_256` (what the AWS Nitro Enclaves
//! SDK's enclaves send): a CMS EnvelopedData (RFC 5652) with one
//! KeyTransRecipientInfo — the content-encryption key under the document's
//! RSA public key with RSAES-OAEP (SHA-256, MGF1-SHA-256, RFC 8017 / RFC 4055)
//! — and the result encrypted with AES-256-CBC (PKCS#7 padding).
//!
//! The encoding is the one the AWS Nitro Enclaves SDK's parser reads: the
//! ContentInfo, its `[0]`, the EnvelopedData and the EncryptedContentInfo in
//! indefinite-length BER (that parser consumes only their headers), EnvelopedData
//! and KeyTransRecipientInfo version 2 with a subjectKeyIdentifier (RFC 7093
//! method 1: the leftmost 160 bits of the SHA-256 of the subjectPublicKey),
//! and the encrypted content as one `[0]` primitive string. Every other element
//! is DER. docs/recipient.md fixes the bytes; `openssl cms -decrypt` reads them.

use aes::cipher::{BlockEncryptMut, KeyIvInit, block_padding::Pkcs7};
use der::asn1::ObjectIdentifier;
use rand_core::{OsRng, RngCore};
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPublicKey, pkcs8::DecodePublicKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use cloister_kms_api::KmsError;
use cloister_kms_api::error;

/// The Recipient algorithm that asks for this form.
pub const ALGORITHM: &str = "RSAES_OAEP_SHA_256";
/// RSA moduli accepted: AWS KMS's range for these keys.
const MIN_BITS: usize = 2048;
const MAX_BITS: usize = 4096;

const ENVELOPED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.3");
const DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const RSAES_OAEP: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.7");
const MGF1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.8");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const AES256_CBC: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.1.42");

/// A DER element: tag, definite length, content.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A constructed BER element of indefinite length: tag, 0x80, the parts,
/// end-of-contents.
fn indefinite(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![tag, 0x80];
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&[0, 0]);
    out
}

fn oid(o: &ObjectIdentifier) -> Vec<u8> {
    tlv(0x06, o.as_bytes())
}

/// `AlgorithmIdentifier` of RSAES-OAEP with SHA-256 and MGF1-SHA-256 (RFC 4055
/// §4.1; SHA-256's parameters absent, RFC 5754; pSourceAlgorithm the default).
fn oaep_sha256() -> Vec<u8> {
    let sha256 = tlv(0x30, &oid(&SHA256));
    let mgf1 = tlv(0x30, &[oid(&MGF1), sha256.clone()].concat());
    let params = tlv(0x30, &[tlv(0xa0, &sha256), tlv(0xa1, &mgf1)].concat());
    tlv(0x30, &[oid(&RSAES_OAEP), params].concat())
}

/// A Recipient's RSA key, checked when its document is (before any key is used).
#[derive(Debug, Clone)]
pub struct RsaRecipient {
    key: RsaPublicKey,
    /// RFC 7093 method 1: the leftmost 160 bits of SHA-256(subjectPublicKey).
    ski: [u8; 20],
}

impl RsaRecipient {
    /// The RSA key of a SubjectPublicKeyInfo (DER) of 2048 to 4096 bits.
    pub fn from_spki(spki_der: &[u8]) -> Result<RsaRecipient, KmsError> {
        let not_rsa = |why: String| {
            error::validation(format!(
                "the Recipient's attestation document must carry an RSA SubjectPublicKeyInfo (DER, {MIN_BITS} to {MAX_BITS} bits) as its public_key for {ALGORITHM}: {why}"
            ))
        };
        let key =
            RsaPublicKey::from_public_key_der(spki_der).map_err(|e| not_rsa(e.to_string()))?;
        let bits = key.n().bits();
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return Err(not_rsa(format!("this key has {bits} bits")));
        }
        let spki = spki::SubjectPublicKeyInfoRef::try_from(spki_der)
            .map_err(|e| not_rsa(e.to_string()))?;
        let mut ski = [0u8; 20];
        ski.copy_from_slice(&Sha256::digest(spki.subject_public_key.raw_bytes())[..20]);
        Ok(RsaRecipient { key, ski })
    }

    /// `plaintext` as a CMS EnvelopedData to this key.
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, KmsError> {
        let random = |buf: &mut [u8]| {
            OsRng
                .try_fill_bytes(buf)
                .map_err(|e| error::internal(format!("no randomness: {e}")))
        };
        let mut cek = Zeroizing::new([0u8; 32]);
        let mut iv = [0u8; 16];
        random(&mut *cek)?;
        random(&mut iv)?;
        let content = cbc::Encryptor::<aes::Aes256>::new(cek.as_ref().into(), &iv.into())
            .encrypt_padded_vec_mut::<Pkcs7>(plaintext);
        let encrypted_key = self
            .key
            .encrypt(&mut OsRng, Oaep::new::<Sha256>(), cek.as_ref())
            .map_err(|e| error::internal(format!("RSAES-OAEP failed: {e}")))?;

        let recipient_info = tlv(
            0x30,
            &[
                tlv(0x02, &[2]),
                tlv(0x80, &self.ski),
                oaep_sha256(),
                tlv(0x04, &encrypted_key),
            ]
            .concat(),
        );
        let content_algorithm = tlv(0x30, &[oid(&AES256_CBC), tlv(0x04, &iv)].concat());
        let encrypted_content_info = indefinite(
            0x30,
            &[&oid(&DATA), &content_algorithm, &tlv(0x80, &content)],
        );
        let enveloped_data = indefinite(
            0x30,
            &[
                &tlv(0x02, &[2]),
                &tlv(0x31, &recipient_info),
                &encrypted_content_info,
            ],
        );
        Ok(indefinite(
            0x30,
            &[&oid(&ENVELOPED_DATA), &indefinite(0xa0, &[&enveloped_data])],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn seal(spki_der: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KmsError> {
        RsaRecipient::from_spki(spki_der)?.seal(plaintext)
    }

    /// An RSA key made by openssl: (private PEM path, SPKI DER); `None` where
    /// openssl is not installed.
    fn openssl_key(dir: &std::path::Path, bits: u32) -> Option<(std::path::PathBuf, Vec<u8>)> {
        let key = dir.join(format!("rsa{bits}.pem"));
        let made = Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt"])
            .arg(format!("rsa_keygen_bits:{bits}"))
            .arg("-out")
            .arg(&key)
            .output()
            .ok()?;
        if !made.status.success() {
            return None;
        }
        let spki = Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER", "-in"])
            .arg(&key)
            .output()
            .ok()?;
        Some((key, spki.stdout))
    }

    /// Where the Nitro SDK's parser reads only a header, the header is
    /// indefinite; the rest is one definite element each.
    #[test]
    fn the_layers_are_the_ones_the_nitro_sdk_parser_walks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((_, spki)) = openssl_key(dir.path(), 2048) else {
            eprintln!("skipping: openssl is not installed");
            return;
        };
        let cms = seal(&spki, &[7u8; 32]).expect("seal");
        let env_oid = oid(&ENVELOPED_DATA);
        let mut at = 0;
        let mut take = |expected: &[u8]| {
            assert_eq!(&cms[at..at + expected.len()], expected, "at byte {at}");
            at += expected.len();
        };
        take(&[0x30, 0x80]);
        take(&env_oid);
        take(&[0xa0, 0x80, 0x30, 0x80]);
        take(&[0x02, 0x01, 0x02]);
        assert_eq!(cms[at], 0x31, "RecipientInfos");
        assert!(cms.ends_with(&[0; 8]), "four end-of-contents");
        // 32 bytes of content: AES-256-CBC with PKCS#7 padding makes 48.
        let content = tlv(0x80, &[0; 48]);
        let from_end = 8 + content.len();
        assert_eq!(
            &cms[cms.len() - from_end..cms.len() - from_end + 2],
            &[0x80, 48]
        );
    }

    #[test]
    fn openssl_opens_it_with_the_private_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        for bits in [2048, 4096] {
            let Some((key, spki)) = openssl_key(dir.path(), bits) else {
                eprintln!("skipping: openssl is not installed");
                return;
            };
            for plaintext in [&b""[..], &[0x42; 32][..], &[9; 1000][..]] {
                let cms = seal(&spki, plaintext).expect("seal");
                let ct = dir.path().join("ct.ber");
                std::fs::write(&ct, &cms).expect("write");
                let out = Command::new("openssl")
                    .args(["cms", "-decrypt", "-binary", "-inform", "DER", "-in"])
                    .arg(&ct)
                    .arg("-inkey")
                    .arg(&key)
                    .output()
                    .expect("openssl");
                assert!(
                    out.status.success(),
                    "{bits} bits: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_eq!(out.stdout, plaintext, "{bits} bits");
            }
        }
    }

    #[test]
    fn keys_that_are_not_rsa_or_out_of_range_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for bad in [&[0x42u8; 32][..], b"", &[0x30, 0x03, 0x02, 0x01, 0x01]] {
            let e = seal(bad, b"k").expect_err("not RSA");
            assert!(e.message.contains("RSA SubjectPublicKeyInfo"), "{e}");
        }
        let Some((_, small)) = openssl_key(dir.path(), 1024) else {
            return;
        };
        let e = seal(&small, b"k").expect_err("1024 bits");
        assert!(e.message.contains("1024 bits"), "{e}");
    }
}
