//! The compiled-code cache: native code for each component, in the
//! supervisor's private directory, each entry bound to the exact component
//! bytes by a MAC under a key only the supervisor holds.
//!
//! ```text
//! cache.key                 32 random bytes, 0600
//! cache/<sha256(component)>  tag (32) || code
//! tag = HMAC-SHA256(key, "cloister-code-cache-v1\0" || wasmtime version
//!                        || sha256(component) || code)
//! ```
//!
//! An entry whose tag does not verify (edited, truncated, or copied from
//! another component's name) is discarded and the component compiled again.
//! Compiles are serialised, so a burst of launches of one image compiles it once.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use cloister_runtime::engine::WASMTIME_VERSION;

type HmacSha256 = Hmac<Sha256>;
const LABEL: &[u8] = b"cloister-code-cache-v1\0";
const TAG_LEN: usize = 32;

pub struct CodeCache {
    dir: PathBuf,
    key: Zeroizing<[u8; 32]>,
    compiling: tokio::sync::Mutex<()>,
}

/// Where code came from, for the supervisor's log and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Compiled,
    /// A cache entry did not verify; it was replaced by a fresh compile.
    Recompiled,
}

impl CodeCache {
    /// Opens (or makes) the cache and its key in the supervisor's state directory.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let dir = state_dir.join("cache");
        crate::daemon::private_dir(&dir)?;
        let key_path = state_dir.join("cache.key");
        let key = match std::fs::read(&key_path) {
            Ok(bytes) => {
                crate::daemon::check_private(&key_path)?;
                let key: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("{} is not 32 bytes", key_path.display()))?;
                key
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut key);
                cloister_attestation::keyfile::write_secret(&key_path, &key, false)?;
                key
            }
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", key_path.display())),
        };
        Ok(CodeCache {
            dir,
            key: Zeroizing::new(key),
            compiling: tokio::sync::Mutex::new(()),
        })
    }

    fn tag(&self, component_hash: &[u8], code: &[u8]) -> HmacSha256 {
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(&*self.key).expect("HMAC takes any key length");
        mac.update(LABEL);
        mac.update(WASMTIME_VERSION.as_bytes());
        mac.update(component_hash);
        mac.update(code);
        mac
    }

    fn entry(&self, component_hash: &[u8]) -> PathBuf {
        self.dir.join(hex::encode(component_hash))
    }

    /// The entry's code if its tag verifies for this component.
    fn load(&self, component_hash: &[u8]) -> Option<Result<Vec<u8>, ()>> {
        let bytes = std::fs::read(self.entry(component_hash)).ok()?;
        if bytes.len() < TAG_LEN {
            return Some(Err(()));
        }
        let (tag, code) = bytes.split_at(TAG_LEN);
        match self.tag(component_hash, code).verify_slice(tag) {
            Ok(()) => Some(Ok(code.to_vec())),
            Err(_) => Some(Err(())),
        }
    }

    /// The code for a component: from the cache when an entry verifies,
    /// otherwise made by `compile` (once, however many launches wait for it)
    /// and stored.
    pub async fn code_for<F, Fut>(
        &self,
        component: &[u8],
        compile: F,
    ) -> anyhow::Result<(Vec<u8>, Source)>
    where
        F: FnOnce(Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Vec<u8>>>,
    {
        let hash = Sha256::digest(component).to_vec();
        if let Some(Ok(code)) = self.load(&hash) {
            return Ok((code, Source::Cache));
        }
        let _one_compile = self.compiling.lock().await;
        let source = match self.load(&hash) {
            Some(Ok(code)) => return Ok((code, Source::Cache)),
            Some(Err(())) => {
                eprintln!(
                    "cloister supervisor: cache entry {} failed its MAC check; discarded, compiling again",
                    hex::encode(&hash)
                );
                let _ = std::fs::remove_file(self.entry(&hash));
                Source::Recompiled
            }
            None => Source::Compiled,
        };
        let code = compile(component.to_vec()).await?;
        let tag = self.tag(&hash, &code).finalize().into_bytes();
        let mut entry = tag.to_vec();
        entry.extend_from_slice(&code);
        cloister_attestation::keyfile::write_secret(&self.entry(&hash), &entry, true)?;
        Ok((code, source))
    }
}
