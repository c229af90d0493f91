//! The Cloister guest SDK: bindings to the enclave runtime's imports (the WIT
//! world `cloister:enclave/workload` in `wit/`) for wasm32-wasip2 workloads.
//!
//! A workload implements [`Handler`] and exports it with [`export_workload!`].
//! This one counts the records of a sealed file: the runtime obtains the data key
//! by attested KMS Decrypt and keeps it; the guest holds only a handle.
//!
//! ```ignore
//! use cloister_guest::{Error, Handler, sealed};
//!
//! struct Count;
//! impl Handler for Count {
//!     fn handle(request: Vec<u8>) -> Result<Vec<u8>, Error> {
//!         let (key, header, body) = cloister_guest::open_sealed(&request, &[])?;
//!         let mut reader = sealed::Reader::new(header, body, &key)?;
//!         let mut rows = 0u64;
//!         reader.for_each_line(|_| {
//!             rows += 1;
//!             Ok(())
//!         })?;
//!         Ok(rows.to_string().into_bytes())
//!     }
//! }
//! cloister_guest::export_workload!(Count);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`, then
//! `cloister build-enclave --wasm target/wasm32-wasip2/release/count.wasm ...`.
//! `examples/phi-scorer` is a complete workload; the end-to-end tests run it and
//! `examples/test-guest` in the real runtime.

pub use cloister_sealed as sealed;

#[doc(hidden)]
#[allow(unsafe_code, clippy::all, missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "workload",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_workload",
        default_bindings_module: "cloister_guest::__bindings",
    });
}

#[doc(hidden)]
pub use bindings as __bindings;

pub use bindings::cloister::enclave::types::{Error, KeyHandle};
pub use bindings::cloister::enclave::{config, console, keys, kms, nsm};
pub use bindings::exports::cloister::enclave::handler::Guest as Handler;

/// Exports a type implementing [`Handler`] as the workload's `handler`.
#[macro_export]
macro_rules! export_workload {
    ($t:ident) => {
        $crate::__bindings::__export_workload!($t with_types_in $crate::__bindings);
    };
}

/// An [`Error`] with a code and a message.
pub fn error(code: &str, message: impl Into<String>) -> Error {
    Error {
        code: code.to_owned(),
        message: message.into(),
    }
}

/// A data key held in the runtime's keyring: the guest sees a handle, never the
/// key. Dropping it removes the key from the keyring.
pub struct DataKey {
    handle: KeyHandle,
}

impl DataKey {
    /// Attested KMS Decrypt of a ciphertext blob holding a data key.
    pub fn decrypt(
        ciphertext_blob: &[u8],
        encryption_context: &[(String, String)],
    ) -> Result<DataKey, Error> {
        Ok(DataKey {
            handle: kms::decrypt(ciphertext_blob, encryption_context)?,
        })
    }

    /// Attested KMS GenerateDataKey: the key stays here, its encrypted form and the
    /// KMS key's ARN are returned for storing beside the data.
    pub fn generate(
        key_id: &str,
        encryption_context: &[(String, String)],
    ) -> Result<(DataKey, Vec<u8>, String), Error> {
        let dk = kms::generate_data_key(key_id, encryption_context)?;
        Ok((DataKey { handle: dk.handle }, dk.ciphertext_blob, dk.key_id))
    }

    /// AES-256-GCM seal with a 12-byte nonce, in the runtime.
    pub fn seal(&self, nonce: &[u8; 12], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, Error> {
        keys::seal(self.handle, nonce, plaintext, aad)
    }

    /// AES-256-GCM open, in the runtime.
    pub fn open(&self, nonce: &[u8; 12], ciphertext: &[u8], aad: &[u8]) -> Result<Vec<u8>, Error> {
        keys::open(self.handle, nonce, ciphertext, aad)
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        keys::forget(self.handle);
    }
}

impl sealed::Aead for DataKey {
    fn seal(
        &self,
        nonce: &[u8; 12],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, sealed::SealedError> {
        DataKey::seal(self, nonce, plaintext, aad)
            .map_err(|e| sealed::SealedError::Crypto(format!("[{}] {}", e.code, e.message)))
    }
    fn open(
        &self,
        nonce: &[u8; 12],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, sealed::SealedError> {
        DataKey::open(self, nonce, ciphertext, aad)
            .map_err(|e| sealed::SealedError::Crypto(format!("[{}] {}", e.code, e.message)))
    }
}

impl From<sealed::SealedError> for Error {
    fn from(e: sealed::SealedError) -> Self {
        error(e.code(), e.to_string())
    }
}

impl From<sealed::parts::PartsError> for Error {
    fn from(e: sealed::parts::PartsError) -> Self {
        error(e.code(), e.to_string())
    }
}

/// A request of several named inputs (`cloister call --part NAME=FILE ...`),
/// such as sealed inputs under different owners' keys; each part is borrowed
/// from `request`.
pub fn request_parts(request: &[u8]) -> Result<sealed::parts::Parts<'_>, Error> {
    Ok(sealed::parts::Parts::decode(request)?)
}

/// Opens a sealed input inside the enclave: reads its header, checks that its
/// encryption context holds every pair of `required_context` (before any KMS
/// call: the parent chooses which bytes arrive, so a workload names what kind
/// of input it accepts), obtains its data key by attested KMS Decrypt and
/// returns the key and the rest, for a [`sealed::Reader`].
pub fn open_sealed<'r>(
    bytes: &'r [u8],
    required_context: &[(String, String)],
) -> Result<(DataKey, sealed::Header, &'r [u8]), Error> {
    let mut rest = bytes;
    let header = sealed::Header::read(&mut rest)?;
    for (k, v) in required_context {
        if !header
            .encryption_context
            .iter()
            .any(|(hk, hv)| hk == k && hv == v)
        {
            return Err(error(
                "E-WORKLOAD-INPUT",
                format!(
                    "the input was not sealed with the encryption context {k}={v} that this workload requires"
                ),
            ));
        }
    }
    let key = DataKey::decrypt(&header.encrypted_data_key, &header.encryption_context)?;
    Ok((key, header, rest))
}

/// Opens a whole sealed input into memory (a model, a small table), as
/// [`open_sealed`]: every chunk authenticates or nothing is returned.
pub fn unseal(bytes: &[u8], required_context: &[(String, String)]) -> Result<Vec<u8>, Error> {
    let (key, header, rest) = open_sealed(bytes, required_context)?;
    let mut reader = sealed::Reader::new(header, rest, &key)?;
    let mut plaintext = Vec::with_capacity(rest.len());
    while let Some(chunk) = reader.next_chunk()? {
        plaintext.extend_from_slice(&chunk);
    }
    Ok(plaintext)
}

/// Seals the records that `write` writes under a fresh data key from an
/// attested GenerateDataKey on `key_id` with `encryption_context`; returns the
/// sealed file, which the key's owner opens with `cloister decrypt`.
pub fn seal_with_new_key(
    key_id: &str,
    encryption_context: Vec<(String, String)>,
    write: impl FnOnce(&mut sealed::Writer<'_, Vec<u8>>) -> Result<(), Error>,
) -> Result<Vec<u8>, Error> {
    let (key, encrypted, key_arn) = DataKey::generate(key_id, &encryption_context)?;
    let mut prefix = [0u8; 7];
    prefix.copy_from_slice(&nsm::get_random(7)?);
    let mut writer = sealed::Writer::new(
        Vec::new(),
        &key,
        &key_arn,
        encrypted,
        encryption_context,
        sealed::DEFAULT_CHUNK_SIZE,
        prefix,
    )?;
    write(&mut writer)?;
    Ok(writer.finish()?)
}

/// An encryption context from the image's measured configuration, written
/// `k=v,k=v` (empty when the image does not set `key`); an entry without `=`,
/// an empty key or a key given twice is an error, not silently dropped.
pub fn config_context(key: &str) -> Result<Vec<(String, String)>, Error> {
    let mut context: Vec<(String, String)> = Vec::new();
    for entry in config::get(key).unwrap_or_default().split(',') {
        if entry.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| {
            error(
                "E-WORKLOAD-CONFIG",
                format!("{key}: {entry:?} {why} (write k=v,k=v)"),
            )
        };
        let (k, v) = entry.split_once('=').ok_or_else(|| bad("has no ="))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(bad("has an empty key"));
        }
        if context.iter().any(|(seen, _)| seen == k) {
            return Err(bad("repeats a key"));
        }
        context.push((k.to_owned(), v.to_owned()));
    }
    Ok(context)
}

/// A value of the image's measured configuration that the workload cannot do
/// without: an error naming the key when the image does not set it.
pub fn required_config(key: &str) -> Result<String, Error> {
    config::get(key).ok_or_else(|| {
        error(
            "E-WORKLOAD-CONFIG",
            format!("the image sets no {key:?} (build it with --config {key}=VALUE)"),
        )
    })
}
