//! A broker's data directory: what `cloister kms init` makes and `serve` opens.
//!
//! | file | what |
//! |---|---|
//! | `keystore.db` | SQLite keystore (WAL, synchronous=FULL) |
//! | `store` | instead of `keystore.db`: the PostgreSQL URL of a keystore shared by broker replicas (0600), which also holds the audit chain and the request ids used |
//! | `root.key` | the 32-byte root key, mode 0600 (absent in passphrase mode) |
//! | `root.key.prev` | the root key before the last `kms rotate-root-key` (0600): delete it once the rotation is safe |
//! | `root.lock` | held by a root-key rotation, and briefly by whoever reads the root key |
//! | `broker.key` / `broker.pub` | the broker's Ed25519 key: signs every response and the audit checkpoints |
//! | `admin.key` / `admin.pub` | the first principal, `admin`, allowed everything |
//! | `audit.log` | the hash-chained audit log (0600), rotated at 64 MiB into `audit.log.<first seq>` segments that continue the chain |
//! | `audit.head` | the log's last seq and hash, signed by the broker |
//! | `audit.seen` | with a shared store: the highest line of its audit chain seen (a rollback below it is refused) |
//! | `tls/` | the local CA and the server certificate for TCP listeners |

use std::path::PathBuf;

use ed25519_dalek::SigningKey;
use zeroize::Zeroizing;

use cloister_attestation::keyfile;

use crate::audit::AuditLog;
use crate::crypto::RootKey;
use crate::error::{self, KmsError};
use crate::keystore::Keystore;
use crate::service::{Broker, BrokerConfig, now_ms};
use crate::store::Location;

/// How long reading the root key waits for a rotation under way.
const ROOT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The name of the principal `init` creates.
pub const ADMIN: &str = "admin";
const ADMIN_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Administrator","Effect":"Allow","Action":"*","Resource":"*"}]}"#;

#[derive(Debug, Clone)]
pub struct DataDir {
    pub dir: PathBuf,
}

impl DataDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DataDir { dir: dir.into() }
    }
    pub fn keystore(&self) -> PathBuf {
        self.dir.join("keystore.db")
    }
    /// The file naming a shared store (PostgreSQL), if the keystore is there.
    pub fn store_file(&self) -> PathBuf {
        self.dir.join("store")
    }
    /// The CA certificates (PEM) for TLS to the shared store, if given at init.
    pub fn store_ca(&self) -> PathBuf {
        self.dir.join("store-ca.pem")
    }
    /// Where the keystore is: the shared store the `store` file names, or
    /// `keystore.db`.
    pub fn store(&self) -> Result<Location, KmsError> {
        match std::fs::read_to_string(self.store_file()) {
            Ok(url) => match Location::parse(url.trim())? {
                Location::Postgres { url, .. } => Ok(Location::Postgres {
                    url,
                    ca: self.store_ca().exists().then(|| self.store_ca()),
                }),
                sqlite => Ok(sqlite),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Location::Sqlite(self.keystore()))
            }
            Err(e) => Err(error::internal(format!(
                "{}: {e}",
                self.store_file().display()
            ))),
        }
    }
    pub fn root_key(&self) -> PathBuf {
        self.dir.join("root.key")
    }
    /// A new root key during its rotation (see [`DataDir::rotate_root_key`]).
    pub fn root_key_next(&self) -> PathBuf {
        self.dir.join("root.key.next")
    }
    /// The root key before the last rotation (see [`DataDir::rotate_root_key`]).
    pub fn root_key_prev(&self) -> PathBuf {
        self.dir.join("root.key.prev")
    }
    pub fn broker_key(&self) -> PathBuf {
        self.dir.join("broker.key")
    }
    pub fn broker_pub(&self) -> PathBuf {
        self.dir.join("broker.pub")
    }
    pub fn admin_key(&self) -> PathBuf {
        self.dir.join("admin.key")
    }
    pub fn admin_pub(&self) -> PathBuf {
        self.dir.join("admin.pub")
    }
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }
    pub fn audit_head(&self) -> PathBuf {
        self.dir.join("audit.head")
    }
    /// With a shared store: the highest line of its audit chain this data
    /// directory's broker saw (a chain rolled back below it is refused).
    pub fn audit_seen(&self) -> PathBuf {
        self.dir.join("audit.seen")
    }
    pub fn tls(&self) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles::new(self.dir.join("tls"))
    }

    /// Creates a data directory. With a passphrase the root key is derived with
    /// Argon2id (its salt is kept in the keystore) and no key file is written.
    ///
    /// With `store` a shared store (PostgreSQL), the keystore is made there and
    /// the data directory keeps its URL; what else it holds (the root key or
    /// nothing, the broker key, the TLS files) is what a replica joining the
    /// same store copies.
    pub fn init(
        &self,
        passphrase: Option<Zeroizing<String>>,
        tls_names: &[String],
        store: Option<Location>,
    ) -> Result<(), KmsError> {
        let io = |e: std::io::Error| error::internal(format!("{}: {e}", self.dir.display()));
        if self.keystore().exists() || self.store_file().exists() {
            return Err(error::already_exists(format!(
                "{} already holds a keystore; refusing to replace it",
                self.dir.display()
            )));
        }
        // A shared store is reached, and found empty, before any file is
        // written: a wrong URL or CA leaves nothing behind to clear.
        if let Some(location @ Location::Postgres { .. }) = &store {
            Keystore::check_creatable(location)?;
        }
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let kf = |e: keyfile::KeyFileError| error::internal(e.to_string());
        let (root, meta) = match &passphrase {
            Some(p) => {
                let mut salt = [0u8; 16];
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut salt);
                (RootKey::from_passphrase(p.as_bytes(), &salt)?, Some(salt))
            }
            None => {
                let root = RootKey::generate();
                keyfile::write_secret(&self.root_key(), root.bytes(), false).map_err(kf)?;
                (root, None)
            }
        };
        let broker = SigningKey::generate(&mut rand_core::OsRng);
        keyfile::write_signing_key(&self.broker_key(), &broker, false).map_err(kf)?;
        keyfile::write_public(
            &self.broker_pub(),
            keyfile::verifying_key_pem(&broker.verifying_key()).as_bytes(),
            false,
        )
        .map_err(kf)?;
        let admin = SigningKey::generate(&mut rand_core::OsRng);
        keyfile::write_signing_key(&self.admin_key(), &admin, false).map_err(kf)?;
        keyfile::write_public(
            &self.admin_pub(),
            keyfile::verifying_key_pem(&admin.verifying_key()).as_bytes(),
            false,
        )
        .map_err(kf)?;
        let salt_meta: Vec<(&str, &[u8])> = meta
            .as_ref()
            .map(|s| vec![("root_salt", s.as_slice())])
            .unwrap_or_default();
        self.tls().init(tls_names)?;
        let location = match store {
            // The CA goes with the data directory (as a replica copies it).
            Some(Location::Postgres { url, ca: Some(ca) }) => {
                let pem = std::fs::read(&ca)
                    .map_err(|e| error::validation(format!("--store-ca {}: {e}", ca.display())))?;
                keyfile::write_public(&self.store_ca(), &pem, false).map_err(kf)?;
                Location::Postgres {
                    url,
                    ca: Some(self.store_ca()),
                }
            }
            Some(other) => other,
            None => Location::Sqlite(self.keystore()),
        };
        let keystore = Keystore::create(&location, root, &salt_meta)?;
        if let Location::Postgres { url, .. } = &location {
            keyfile::write_secret(&self.store_file(), url.as_bytes(), false).map_err(kf)?;
        }
        keystore.add_principal(ADMIN, admin.verifying_key(), ADMIN_POLICY, now_ms(), |_| {
            Ok(())
        })?;
        Ok(())
    }

    /// Opens the keystore and the audit log and returns a ready broker.
    pub fn open(
        &self,
        passphrase: Option<Zeroizing<String>>,
        config: BrokerConfig,
    ) -> Result<Broker, KmsError> {
        self.restrict_modes()?;
        let location = self.store()?;
        let root = self.root(&location, passphrase)?;
        let keystore = Keystore::open(&location, root)?;
        let broker_key = keyfile::read_signing_key(&self.broker_key())
            .map_err(|e| error::internal(e.to_string()))?;
        if keystore.store().is_shared() {
            // The chain and the request ids used are in the store.
            let audit = AuditLog::open_shared(
                keystore.store().clone(),
                broker_key.clone(),
                &config.replica,
                &self.audit_seen(),
            )?;
            return Ok(Broker::new(keystore, audit, config, broker_key));
        }
        let audit = AuditLog::open(&self.audit_log(), &self.audit_head(), broker_key.clone())?;
        let broker = Broker::new(keystore, audit, config, broker_key);
        // Request ids accepted before a restart stay used (replay protection).
        let since = now_ms().saturating_sub(broker.replay_window().as_millis() as u64);
        broker.remember_used_ids(crate::audit::used_request_ids(&self.audit_log(), since)?);
        Ok(broker)
    }

    /// Rotates the root key: a new one (random, or derived from
    /// `new_passphrase` with a new salt — in the same mode as before) seals
    /// every key version's material and every access key's secret, in one
    /// transaction with its audit record. In file mode the new key is written
    /// to `root.key.next` (synced) before the commit and renamed over
    /// `root.key` after it; an interrupted rotation is finished (or undone) at
    /// the next open. Refused while a broker serves a SQLite data directory
    /// (its audit log is locked); replicas of a shared store must be given the
    /// new key and restarted (their writes are refused meanwhile).
    /// Returns how many sealed items were re-sealed.
    pub fn rotate_root_key(
        &self,
        passphrase: Option<Zeroizing<String>>,
        new_passphrase: Option<Zeroizing<String>>,
    ) -> Result<u64, KmsError> {
        let location = self.store()?;
        let file_mode = self.root_key().exists();
        // Held until the new key is installed; a second rotation is refused.
        let _rotation = self.lock_root(std::time::Duration::ZERO)?;
        if file_mode == new_passphrase.is_some() {
            return Err(error::validation(if file_mode {
                "this data directory keeps its root key in root.key: rotate it without --new-passphrase-env"
            } else {
                "this keystore's root key is derived from a passphrase: give the new one in the environment variable --new-passphrase-env names"
            }));
        }
        let root = if file_mode {
            self.root_file_locked(&location)?
        } else {
            self.root(&location, passphrase)?
        };
        let keystore = Keystore::open(&location, root)?;
        let broker_key = keyfile::read_signing_key(&self.broker_key())
            .map_err(|e| error::internal(e.to_string()))?;
        let audit = if keystore.store().is_shared() {
            AuditLog::open_shared(
                keystore.store().clone(),
                broker_key.clone(),
                &format!("rotate-root-key@{}", crate::service::default_replica_name()),
                &self.audit_seen(),
            )?
        } else {
            AuditLog::open(&self.audit_log(), &self.audit_head(), broker_key)?
        };
        let (new, salt) = match &new_passphrase {
            Some(p) => {
                let mut salt = [0u8; 16];
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut salt);
                (RootKey::from_passphrase(p.as_bytes(), &salt)?, Some(salt))
            }
            None => (RootKey::generate(), None),
        };
        if file_mode {
            keyfile::write_secret(&self.root_key_next(), new.bytes(), true)
                .map_err(|e| error::internal(e.to_string()))?;
        }
        let resealed = keystore.rotate_root(&new, salt.as_ref().map(|s| s.as_slice()), |n, tx| {
            audit
                .record_in(
                    tx,
                    crate::audit::RequestRecord {
                        principal: "cloister-broker".into(),
                        action: "cloister:RotateRootKey".into(),
                        decision: crate::audit::Decision::Allow,
                        reason: format!(
                            "the root key was rotated at the data directory: {n} sealed items re-sealed under the new one"
                        ),
                        ..Default::default()
                    },
                )
                .map(|_| ())
        });
        let resealed = match resealed {
            Ok(n) => n,
            // A COMMIT whose answer was lost may have committed: the new key
            // is removed only once the store is seen not to need it.
            Err(e) if file_mode => {
                let new_opens = RootKey::from_file(&self.root_key_next())
                    .and_then(|next| Keystore::root_opens(&location, &next));
                return match new_opens {
                    Ok(false) => {
                        let _ = std::fs::remove_file(self.root_key_next());
                        Err(e)
                    }
                    Ok(true) => {
                        self.install_next_root_key()?;
                        Err(error::internal(format!(
                            "the rotation committed although its commit reported: {e}; root.key is the new key"
                        )))
                    }
                    Err(unknown) => Err(error::internal(format!(
                        "the rotation's outcome is unknown ({e}; then {unknown}): {} is kept, and the next open of this data directory uses whichever key opens the keystore",
                        self.root_key_next().display()
                    ))),
                };
            }
            Err(e) => return Err(e),
        };
        if file_mode {
            self.install_next_root_key()?;
        }
        audit.shutdown()?;
        Ok(resealed)
    }

    /// root.key.next becomes root.key (the keystore is sealed under it), and
    /// the key it replaces root.key.prev: kept, so that a keystore restored
    /// from before the rotation (or a rotation a database failover lost) can
    /// still be opened. Delete root.key.prev once the rotation is safe.
    fn install_next_root_key(&self) -> Result<(), KmsError> {
        let io = |e: std::io::Error| {
            error::internal(format!(
                "the keystore is sealed under {} but it could not become {}: {e}; rename it by hand",
                self.root_key_next().display(),
                self.root_key().display()
            ))
        };
        if self.root_key().exists() {
            std::fs::rename(self.root_key(), self.root_key_prev()).map_err(io)?;
        }
        std::fs::rename(self.root_key_next(), self.root_key())
            .and_then(|()| std::fs::File::open(&self.dir)?.sync_all())
            .map_err(io)
    }

    /// The root key of a data directory in file mode (the caller holds the
    /// rotation lock): root.key if it opens the keystore (a leftover
    /// root.key.next, from a rotation that did not commit, is removed); else
    /// root.key.next if it does (a rotation committed but not installed: it
    /// is installed now); else root.key.prev if it does (the keystore is
    /// older than the last rotation), said on stderr; else root.key, which
    /// the keystore then refuses.
    fn root_file_locked(&self, location: &Location) -> Result<RootKey, KmsError> {
        let root = RootKey::from_file(&self.root_key())?;
        if Keystore::root_opens(location, &root)? {
            if self.root_key_next().exists() {
                std::fs::remove_file(self.root_key_next()).map_err(|e| {
                    error::internal(format!("{}: {e}", self.root_key_next().display()))
                })?;
            }
            return Ok(root);
        }
        if self.root_key_next().exists() {
            let next = RootKey::from_file(&self.root_key_next())?;
            if Keystore::root_opens(location, &next)? {
                self.install_next_root_key()?;
                return Ok(next);
            }
        }
        if self.root_key_prev().exists() {
            let prev = RootKey::from_file(&self.root_key_prev())?;
            if Keystore::root_opens(location, &prev)? {
                eprintln!(
                    "cloister kms: the keystore is sealed under the root key before the last rotation ({}): it was restored from before it, or the rotation was lost; rotate again",
                    self.root_key_prev().display()
                );
                return Ok(prev);
            }
        }
        Ok(root)
    }

    /// Takes the data directory's rotation lock (`root.lock`), waiting up to
    /// `wait`: a rotation holds it from writing root.key.next until it is
    /// installed, and whoever reads the root key takes it first, so that no
    /// one decides about a root.key.next a rotation is still writing.
    fn lock_root(&self, wait: std::time::Duration) -> Result<std::fs::File, KmsError> {
        crate::audit::lock_file(&self.dir.join("root.lock"), wait)?.ok_or_else(|| {
            error::internal(format!(
                "a root-key rotation of {} is under way; try again when it ends",
                self.dir.display()
            ))
        })
    }

    /// Files that hold keys or audit data and that others may read (made by
    /// a version that created them 0644) become owner-only.
    fn restrict_modes(&self) -> Result<(), KmsError> {
        use std::os::unix::fs::PermissionsExt;
        let mut files = crate::audit::log_files(&self.audit_log())?;
        let db = self.keystore();
        files.extend([
            self.audit_head(),
            db.clone(),
            db.with_extension("db-wal"),
            db.with_extension("db-shm"),
        ]);
        for file in files {
            if let Ok(meta) = std::fs::metadata(&file)
                && meta.permissions().mode() & 0o077 != 0
            {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(
                    |e| error::internal(format!("cannot make {} owner-only: {e}", file.display())),
                )?;
            }
        }
        Ok(())
    }

    fn root(
        &self,
        location: &Location,
        passphrase: Option<Zeroizing<String>>,
    ) -> Result<RootKey, KmsError> {
        if self.root_key().exists() {
            let _rotation = self.lock_root(ROOT_LOCK_WAIT)?;
            return self.root_file_locked(location);
        }
        let salt = Keystore::read_meta(location, "root_salt")?.ok_or_else(|| {
            error::not_found(format!(
                "{} has neither root.key nor a passphrase salt; is it a data directory made by `cloister kms init`?",
                self.dir.display()
            ))
        })?;
        let passphrase = passphrase.ok_or_else(|| {
            error::validation("this keystore's root key is derived from a passphrase; set it in the environment variable given by --passphrase-env")
        })?;
        RootKey::from_passphrase(passphrase.as_bytes(), &salt)
    }
}
