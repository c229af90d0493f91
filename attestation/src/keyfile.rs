//! Private and public key files: Ed25519 keys as PKCS#8 / SPKI PEM (so that
//! `openssl genpkey -algorithm ed25519` makes a usable key), and secret files
//! written atomically with mode 0600.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};

use cloister_proto::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an Ed25519 {what} in PEM: {problem}")]
    Format {
        path: PathBuf,
        what: &'static str,
        problem: String,
    },
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
}

impl ErrorCode for KeyFileError {
    fn code(&self) -> &'static str {
        match self {
            KeyFileError::Read { .. } | KeyFileError::Write { .. } => "E-KEYFILE-IO",
            KeyFileError::Format { .. } => "E-KEYFILE-FORMAT",
            KeyFileError::Permissions { .. } => "E-KEYFILE-PERMISSIONS",
            KeyFileError::Exists(_) => "E-KEYFILE-EXISTS",
        }
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of
/// the directory) with mode 0600. With `overwrite` false an existing file is an
/// error and is left untouched.
pub fn write_secret(path: &Path, bytes: &[u8], overwrite: bool) -> Result<(), KeyFileError> {
    write_atomic(path, bytes, 0o600, overwrite)
}

/// As [`write_secret`] for public material (mode 0644).
pub fn write_public(path: &Path, bytes: &[u8], overwrite: bool) -> Result<(), KeyFileError> {
    write_atomic(path, bytes, 0o644, overwrite)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32, overwrite: bool) -> Result<(), KeyFileError> {
    let werr = |source| KeyFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    if !overwrite && path.exists() {
        return Err(KeyFileError::Exists(path.to_path_buf()));
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        werr(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file path",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if overwrite {
            fs::rename(&tmp, path)?;
        } else {
            // hard_link fails if `path` appeared meanwhile: never clobber.
            fs::hard_link(&tmp, path)?;
            fs::remove_file(&tmp)?;
        }
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(werr)
}

fn read(path: &Path) -> Result<String, KeyFileError> {
    fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads an Ed25519 private key (PKCS#8 PEM). Refuses a file other users can read.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    let meta = fs::metadata(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let pem = zeroize::Zeroizing::new(read(path)?);
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyFileError::Format {
        path: path.to_path_buf(),
        what: "private key (PKCS#8)",
        problem: e.to_string(),
    })
}

/// Reads an Ed25519 public key (SPKI PEM, as `openssl pkey -pubout` writes it).
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, KeyFileError> {
    VerifyingKey::from_public_key_pem(&read(path)?).map_err(|e| KeyFileError::Format {
        path: path.to_path_buf(),
        what: "public key (SPKI)",
        problem: e.to_string(),
    })
}

/// PKCS#8 v1 PEM of a private key (RFC 8410's form without the public key,
/// which OpenSSL and Python `cryptography` read; zeroized on drop).
pub fn signing_key_pem(key: &SigningKey) -> zeroize::Zeroizing<String> {
    let v1 = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    };
    v1.to_pkcs8_pem(LineEnding::LF)
        .unwrap_or_else(|_| unreachable!("an Ed25519 key always encodes"))
}

/// SPKI PEM of a public key.
pub fn verifying_key_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(LineEnding::LF)
        .unwrap_or_else(|_| unreachable!("an Ed25519 key always encodes"))
}

/// Writes a private key (0600) and returns it.
pub fn write_signing_key(
    path: &Path,
    key: &SigningKey,
    overwrite: bool,
) -> Result<(), KeyFileError> {
    write_secret(path, signing_key_pem(key).as_bytes(), overwrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_key_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let key = SigningKey::generate(&mut rand_core::OsRng);
        write_signing_key(&path, &key, false).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_signing_key(&path).unwrap().to_bytes(), key.to_bytes());

        // No overwrite, and the original survives.
        let other = SigningKey::generate(&mut rand_core::OsRng);
        let err = write_signing_key(&path, &other, false).unwrap_err();
        assert_eq!(err.code(), "E-KEYFILE-EXISTS");
        assert_eq!(read_signing_key(&path).unwrap().to_bytes(), key.to_bytes());
        // Nothing temporary is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        let pub_path = dir.path().join("k.pub");
        write_public(
            &pub_path,
            verifying_key_pem(&key.verifying_key()).as_bytes(),
            false,
        )
        .unwrap();
        assert_eq!(read_verifying_key(&pub_path).unwrap(), key.verifying_key());
    }

    #[test]
    fn refuses_group_readable_and_malformed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let key = SigningKey::generate(&mut rand_core::OsRng);
        write_signing_key(&path, &key, false).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_signing_key(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");

        let bad = dir.path().join("bad.pem");
        write_secret(
            &bad,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            false,
        )
        .unwrap();
        assert_eq!(
            read_signing_key(&bad).unwrap_err().code(),
            "E-KEYFILE-FORMAT"
        );
        assert_eq!(
            read_verifying_key(&dir.path().join("absent"))
                .unwrap_err()
                .code(),
            "E-KEYFILE-IO"
        );
    }
}
