//! The broker's cryptography, all from RustCrypto crates: the root key that
//! encrypts key material at rest, the ciphertext blob format, and the canonical
//! encoding of encryption contexts.
//!
//! Ciphertext blob, version 1:
//!
//! ```text
//! "CKB" 0x01 | key id (16) | key version (u32 BE) | nonce (12) | AES-256-GCM ciphertext || tag (16)
//! AAD = the 36 header bytes || canonical(encryption context)
//! ```
//!
//! canonical(context) = u32 BE count, then for each entry in byte order of the key:
//! u32 BE length || key || u32 BE length || value.

use std::collections::BTreeMap;
use std::path::Path;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::error::{self, KmsError};

pub const BLOB_MAGIC: [u8; 4] = *b"CKB\x01";
const HEADER_LEN: usize = 4 + 16 + 4 + 12;
const TAG_LEN: usize = 16;
/// Encrypt accepts at most this much plaintext, as AWS KMS does.
pub const MAX_PLAINTEXT: usize = 4096;
/// Limits on an encryption context.
pub const MAX_CONTEXT_ENTRIES: usize = 64;
pub const MAX_CONTEXT_BYTES: usize = 8192;

/// 32 bytes of key material, zeroized when dropped.
pub type KeyMaterial = Zeroizing<[u8; 32]>;

/// A fresh random 256-bit key.
pub fn random_key() -> KeyMaterial {
    let mut k = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(k.as_mut());
    k
}

/// A new SigV4 access key id: `AKCL` and 16 random base-32 characters (80
/// bits), 20 characters in all like AWS's, and told apart from them by the prefix.
pub fn random_access_key_id() -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    let tail: String = b
        .iter()
        .map(|x| ALPHABET[usize::from(x % 32)] as char)
        .collect();
    format!("AKCL{tail}")
}

/// A new SigV4 secret access key: 30 random bytes in base64 (40 characters, as AWS's).
pub fn random_secret_access_key() -> Zeroizing<String> {
    use base64::Engine;
    let mut b = Zeroizing::new([0u8; 30]);
    OsRng.fill_bytes(b.as_mut());
    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(b.as_ref()))
}

/// A 16-byte key id, printed like a UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        OsRng.fill_bytes(&mut b);
        // RFC 4122 version 4, variant 1, so that tools see a UUID.
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        KeyId(b)
    }

    pub fn parse(s: &str) -> Option<Self> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if s.len() != 36
            || hex.len() != 32
            || [8, 13, 18, 23].iter().any(|i| s.as_bytes()[*i] != b'-')
        {
            return None;
        }
        let bytes = hex::decode(hex).ok()?;
        Some(KeyId(bytes.try_into().ok()?))
    }

    /// The key's ARN, the `Resource` that policies name.
    pub fn arn(&self) -> String {
        format!("arn:cloister:kms:local:key/{self}")
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = hex::encode(self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }
}

/// Checks an encryption context's limits.
pub fn check_context(ctx: &BTreeMap<String, String>) -> Result<(), KmsError> {
    if ctx.len() > MAX_CONTEXT_ENTRIES {
        return Err(error::validation(format!(
            "the encryption context has {} entries, at most {MAX_CONTEXT_ENTRIES} are allowed",
            ctx.len()
        )));
    }
    let size: usize = ctx.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_CONTEXT_BYTES {
        return Err(error::validation(format!(
            "the encryption context is {size} bytes, at most {MAX_CONTEXT_BYTES} are allowed"
        )));
    }
    if ctx.keys().any(String::is_empty) {
        return Err(error::validation("an encryption context key is empty"));
    }
    Ok(())
}

/// The canonical bytes of an encryption context (see the module docs).
pub fn canonical_context(ctx: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
    for (k, v) in ctx {
        for s in [k, v] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

/// Encrypts `plaintext` under one version of a key into a ciphertext blob.
pub fn seal_blob(
    key_id: KeyId,
    version: u32,
    key: &[u8; 32],
    plaintext: &[u8],
    ctx: &BTreeMap<String, String>,
) -> Result<Vec<u8>, KmsError> {
    let mut nonce = [0u8; 12];
    OsRng.fill_bytes(&mut nonce);
    let mut blob = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    blob.extend_from_slice(&BLOB_MAGIC);
    blob.extend_from_slice(&key_id.0);
    blob.extend_from_slice(&version.to_be_bytes());
    blob.extend_from_slice(&nonce);
    let mut aad = blob.clone();
    aad.extend_from_slice(&canonical_context(ctx));
    let ct = Aes256Gcm::new(key.into())
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| error::internal("encryption failed"))?;
    blob.extend_from_slice(&ct);
    Ok(blob)
}

/// The header of a ciphertext blob: which key and version made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobHeader {
    pub key_id: KeyId,
    pub version: u32,
}

/// Reads a blob's header; refuses anything that is not a version-1 blob.
pub fn blob_header(blob: &[u8]) -> Result<BlobHeader, KmsError> {
    if blob.len() < HEADER_LEN + TAG_LEN {
        return Err(error::invalid_ciphertext(format!(
            "the ciphertext blob is {} bytes, shorter than any blob ({} bytes)",
            blob.len(),
            HEADER_LEN + TAG_LEN
        )));
    }
    if blob[..4] != BLOB_MAGIC {
        return Err(error::invalid_ciphertext(
            "not a Cloister ciphertext blob (bad magic or unsupported version)",
        ));
    }
    let mut key_id = [0u8; 16];
    key_id.copy_from_slice(&blob[4..20]);
    let mut version = [0u8; 4];
    version.copy_from_slice(&blob[20..24]);
    let (key_id, version) = (KeyId(key_id), u32::from_be_bytes(version));
    Ok(BlobHeader { key_id, version })
}

/// Decrypts a blob with the key version its header names.
pub fn open_blob(
    blob: &[u8],
    key: &[u8; 32],
    ctx: &BTreeMap<String, String>,
) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    blob_header(blob)?;
    let mut aad = blob[..HEADER_LEN].to_vec();
    aad.extend_from_slice(&canonical_context(ctx));
    Aes256Gcm::new(key.into())
        .decrypt(
            Nonce::from_slice(&blob[24..HEADER_LEN]),
            Payload { msg: &blob[HEADER_LEN..], aad: &aad },
        )
        .map(Zeroizing::new)
        .map_err(|_| {
            error::invalid_ciphertext(
                "the ciphertext blob does not decrypt: it was altered, or the encryption context differs",
            )
        })
}

/// The key that encrypts all key material at rest.
pub struct RootKey(KeyMaterial);

impl RootKey {
    pub fn generate() -> Self {
        RootKey(random_key())
    }

    /// Reads a 32-byte root key file (mode 0600 or stricter).
    pub fn from_file(path: &Path) -> Result<Self, KmsError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|e| error::internal(format!("cannot read {}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(error::internal(format!(
                "{} is readable by other users; run `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
        let bytes = Zeroizing::new(
            std::fs::read(path)
                .map_err(|e| error::internal(format!("cannot read {}: {e}", path.display())))?,
        );
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            error::internal(format!("{} is not a 32-byte root key", path.display()))
        })?;
        Ok(RootKey(Zeroizing::new(key)))
    }

    /// Derives the root key from a passphrase with Argon2id.
    pub fn from_passphrase(passphrase: &[u8], salt: &[u8]) -> Result<Self, KmsError> {
        let mut key = Zeroizing::new([0u8; 32]);
        argon2::Argon2::default()
            .hash_password_into(passphrase, salt, key.as_mut())
            .map_err(|e| error::internal(format!("cannot derive the root key: {e}")))?;
        Ok(RootKey(key))
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Encrypts key material for storage: nonce || ciphertext || tag, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KmsError> {
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let ct = Aes256Gcm::new(self.0.as_ref().into())
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| error::internal("key material could not be encrypted for storage"))?;
        Ok([nonce.as_slice(), &ct].concat())
    }

    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < 12 + TAG_LEN {
            return None;
        }
        Aes256Gcm::new(self.0.as_ref().into())
            .decrypt(
                Nonce::from_slice(&sealed[..12]),
                Payload {
                    msg: &sealed[12..],
                    aad,
                },
            )
            .ok()
            .map(Zeroizing::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn key_ids_print_and_parse_as_uuids() {
        let id = KeyId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert_eq!(KeyId::parse(&s), Some(id));
        for bad in ["", "1234", &s[1..], &s.replace('-', "x"), &format!("{s}0")] {
            assert_eq!(KeyId::parse(bad), None, "{bad:?}");
        }
        assert!(KeyId::parse("zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz").is_none());
        assert!(id.arn().ends_with(&s));
    }

    #[test]
    fn blobs_bind_key_version_and_context() {
        let key = random_key();
        let id = KeyId::random();
        let c = ctx(&[("patient-set", "2026-q3"), ("dept", "cardio")]);
        let blob = seal_blob(id, 3, &key, b"secret", &c).unwrap();
        assert_eq!(
            blob_header(&blob).unwrap(),
            BlobHeader {
                key_id: id,
                version: 3
            }
        );
        assert_eq!(open_blob(&blob, &key, &c).unwrap().as_slice(), b"secret");

        // Another context, another key, any changed byte, truncation: refused.
        let err = open_blob(&blob, &key, &ctx(&[("dept", "cardio")])).unwrap_err();
        assert!(err.message.contains("encryption context differs"));
        assert!(open_blob(&blob, &random_key(), &c).is_err());
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 1;
            assert!(open_blob(&bad, &key, &c).is_err(), "byte {i}");
        }
        for n in 0..blob.len() {
            assert!(open_blob(&blob[..n], &key, &c).is_err(), "truncated to {n}");
        }
    }

    #[test]
    fn canonical_context_is_unambiguous() {
        // Entries that would collide under naive concatenation differ here.
        assert_ne!(
            canonical_context(&ctx(&[("ab", "c")])),
            canonical_context(&ctx(&[("a", "bc")]))
        );
        assert_eq!(canonical_context(&BTreeMap::new()), vec![0, 0, 0, 0]);
    }

    #[test]
    fn context_limits() {
        let big: BTreeMap<_, _> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(check_context(&big).is_err());
        assert!(check_context(&ctx(&[("k", &"v".repeat(8192))])).is_err());
        assert!(check_context(&ctx(&[("", "v")])).is_err());
        assert!(check_context(&ctx(&[("k", "v")])).is_ok());
    }

    #[test]
    fn root_key_seals_and_rejects_wrong_aad() {
        let root = RootKey::generate();
        let sealed = root.seal(b"aad", b"material").unwrap();
        assert_eq!(root.open(b"aad", &sealed).unwrap().as_slice(), b"material");
        assert!(root.open(b"other", &sealed).is_none());
        assert!(RootKey::generate().open(b"aad", &sealed).is_none());
        let a = RootKey::from_passphrase(b"correct horse", b"0123456789abcdef").unwrap();
        let b = RootKey::from_passphrase(b"correct horse", b"0123456789abcdef").unwrap();
        assert_eq!(a.bytes(), b.bytes());
        assert_ne!(
            a.bytes(),
            RootKey::from_passphrase(b"wrong", b"0123456789abcdef")
                .unwrap()
                .bytes()
        );
    }
}
