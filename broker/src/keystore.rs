//! The keystore: SQLite (WAL, synchronous=FULL) as the durable record, and an
//! in-memory copy that requests read without touching the database.
//!
//! Key material is encrypted at rest under the root key with AES-256-GCM, bound to
//! its key id and version. Every change runs in one SQLite transaction; a
//! `before_commit` hook (the audit log) runs inside it, so a change the audit log
//! could not record is rolled back. A change's preconditions (a key's state, a
//! name not taken) are read inside its transaction, and the in-memory copy is
//! updated after the commit under the same lock, so no check-then-act race
//! exists between requests (or with the purge).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ed25519_dalek::VerifyingKey;

use zeroize::Zeroizing;

use crate::crypto::{self, KeyId, KeyMaterial, RootKey};
use crate::error::{self, KmsError};
use crate::params;
use crate::policy::{Policy, PolicyKind};
use crate::protocol::EncryptionContext;
use crate::store::{Location, Store, Tx, Value};

/// The store's generation (shared stores; see [`Keystore::refresh`]).
const GENERATION: &str = "SELECT n FROM generation WHERE id = 1";
const ROOT_CHECK_AAD: &[u8] = b"cloister-kms-root-check-v1";
/// The root check's plaintext once the rows carry MACs (before: `ok`).
const ROOT_CHECK_SEALED_ROWS: &[u8] = b"ok; rows sealed v1";
const ACCESS_KEY_AAD: &[u8] = b"cloister-kms-access-key-v1\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
}

impl KeyState {
    fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::PendingDeletion => "PendingDeletion",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "Enabled" => Some(KeyState::Enabled),
            "Disabled" => Some(KeyState::Disabled),
            "PendingDeletion" => Some(KeyState::PendingDeletion),
            _ => None,
        }
    }
}

/// A customer master key: metadata, policy and every version's material.
pub struct KeyRecord {
    pub id: KeyId,
    pub description: String,
    pub state: KeyState,
    pub created_ms: u64,
    pub deletion_ms: Option<u64>,
    pub policy_json: String,
    pub policy: Policy,
    /// Version n's material is `versions[n - 1]`.
    pub versions: Vec<KeyMaterial>,
    /// Automatic rotation: every this many days, next at `next_rotation_ms`.
    pub rotation: Option<Rotation>,
}

/// A key's automatic rotation schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    pub period_days: u32,
    pub next_ms: u64,
}

/// The days between automatic rotations that AWS KMS allows, and its default.
pub const ROTATION_DAYS: std::ops::RangeInclusive<u32> = 90..=2560;
pub const DEFAULT_ROTATION_DAYS: u32 = 365;

/// A SigV4 access key: the principal it stands for and its secret.
#[derive(Clone)]
pub struct AccessKeyRecord {
    pub access_key_id: String,
    pub principal: String,
    pub secret: Zeroizing<String>,
    pub created_ms: u64,
}

impl KeyRecord {
    pub fn current_version(&self) -> u32 {
        self.versions.len() as u32
    }
    pub fn material(&self, version: u32) -> Option<&KeyMaterial> {
        version
            .checked_sub(1)
            .and_then(|i| self.versions.get(i as usize))
    }

    /// Encrypts under the current version into a ciphertext blob.
    pub fn seal(&self, plaintext: &[u8], ctx: &EncryptionContext) -> Result<Vec<u8>, KmsError> {
        let version = self.current_version();
        let material = self
            .material(version)
            .ok_or_else(|| error::internal("the current key version is missing"))?;
        crypto::seal_blob(self.id, version, material, plaintext, ctx)
    }

    /// Decrypts a blob of this key with the version its header names.
    pub fn open(
        &self,
        blob: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let header = crypto::blob_header(blob)?;
        let material = self.material(header.version).ok_or_else(|| {
            error::invalid_ciphertext(format!("key {} has no version {}", self.id, header.version))
        })?;
        crypto::open_blob(blob, material, ctx)
    }
}

/// A principal: a name, its Ed25519 public key and its identity policy.
#[derive(Clone)]
pub struct PrincipalRecord {
    pub name: String,
    pub public_key: VerifyingKey,
    pub policy_json: String,
    pub policy: Policy,
    pub created_ms: u64,
}

#[derive(Default)]
struct State {
    keys: HashMap<KeyId, KeyRecord>,
    aliases: BTreeMap<String, KeyId>,
    principals: BTreeMap<String, PrincipalRecord>,
    trust_roots: BTreeMap<String, Vec<u8>>,
    access_keys: BTreeMap<String, AccessKeyRecord>,
}

pub struct Keystore {
    store: Arc<Store>,
    root: RootKey,
    /// The MAC key of the rows in [`SEALED_ROWS`], derived from the root key.
    row_key: Zeroizing<[u8; 32]>,
    state: RwLock<State>,
    /// Held by this broker's changes, so that the copy sees them in the order
    /// the database committed them.
    writing: Mutex<()>,
    /// The store's generation the copy was read at (shared stores).
    generation: AtomicI64,
}

fn material_aad(id: KeyId, version: u32) -> Vec<u8> {
    [
        b"cloister-kms-material-v1".as_slice(),
        &id.0,
        &version.to_be_bytes(),
    ]
    .concat()
}

fn access_key_aad(access_key_id: &str) -> Vec<u8> {
    [ACCESS_KEY_AAD, access_key_id.as_bytes()].concat()
}

fn key_id(bytes: Vec<u8>) -> Result<KeyId, KmsError> {
    Ok(KeyId(bytes.try_into().map_err(|_| {
        error::internal("keystore: malformed key id")
    })?))
}

impl Keystore {
    /// Creates a new keystore; refuses a store that already holds one.
    pub fn create(
        location: &Location,
        root: RootKey,
        extra_meta: &[(&str, &[u8])],
    ) -> Result<Self, KmsError> {
        if let Location::Sqlite(path) = location
            && path.exists()
        {
            return Err(error::already_exists(format!(
                "{} already exists",
                path.display()
            )));
        }
        let store = Store::connect(location)?;
        if store.schema_version()?.is_some() {
            return Err(error::already_exists(format!(
                "{} already holds a keystore; refusing to replace it",
                location.redacted()
            )));
        }
        let mut tx = store.begin()?;
        store.create_schema(&mut tx)?;
        tx.execute(
            "INSERT INTO meta (name, value) VALUES ('root_check', $1)",
            params![&root.seal(ROOT_CHECK_AAD, ROOT_CHECK_SEALED_ROWS)?],
        )?;
        for (name, value) in extra_meta {
            tx.execute(
                "INSERT INTO meta (name, value) VALUES ($1, $2)",
                params![*name, *value],
            )?;
        }
        tx.commit()?;
        Ok(Keystore {
            store: Arc::new(store),
            row_key: row_key(&root),
            root,
            state: RwLock::new(State::default()),
            writing: Mutex::new(()),
            generation: AtomicI64::new(0),
        })
    }

    /// Whether a keystore can be made at `location`: it is reachable and holds
    /// none yet.
    pub fn check_creatable(location: &Location) -> Result<(), KmsError> {
        if Store::connect(location)?.schema_version()?.is_some() {
            return Err(error::already_exists(format!(
                "{} already holds a keystore; refusing to replace it",
                location.redacted()
            )));
        }
        Ok(())
    }

    /// Reads a keystore's meta value without the root key (e.g. the passphrase salt).
    pub fn read_meta(location: &Location, name: &str) -> Result<Option<Vec<u8>>, KmsError> {
        Self::connect_existing(location)?
            .query("SELECT value FROM meta WHERE name = $1", params![name])?
            .first()
            .map(|r| r.blob(0))
            .transpose()
    }

    fn connect_existing(location: &Location) -> Result<Store, KmsError> {
        if let Location::Sqlite(path) = location
            && !path.exists()
        {
            return Err(error::not_found(format!(
                "no keystore at {}; run `cloister kms init`",
                path.display()
            )));
        }
        let store = Store::connect(location)?;
        if store.schema_version()?.is_none() {
            return Err(error::not_found(format!(
                "no keystore at {}; run `cloister kms init`",
                location.redacted()
            )));
        }
        Ok(store)
    }

    /// Whether `root` opens the keystore at `location` (its root check).
    pub fn root_opens(location: &Location, root: &RootKey) -> Result<bool, KmsError> {
        let check = Self::read_meta(location, "root_check")?.unwrap_or_default();
        Ok(root.open(ROOT_CHECK_AAD, &check).is_some())
    }

    /// Opens an existing keystore and loads it into memory.
    pub fn open(location: &Location, root: RootKey) -> Result<Self, KmsError> {
        let store = Self::connect_existing(location)?;
        let version = store.schema_version()?.unwrap_or_default();
        let latest = store.latest_version();
        if !(1..=latest).contains(&version) {
            return Err(error::internal(format!(
                "keystore schema {version} is not supported (this broker knows 1 to {latest}; a newer broker wrote it?)"
            )));
        }
        let check = store
            .query("SELECT value FROM meta WHERE name = 'root_check'", &[])?
            .first()
            .map(|r| r.blob(0))
            .transpose()?
            .unwrap_or_default();
        let Some(checked) = root.open(ROOT_CHECK_AAD, &check) else {
            return Err(error::internal(
                "the root key does not open this keystore (wrong key file or passphrase)",
            ));
        };
        // The root check says, under the root key, whether the rows carry MACs:
        // a schema version set back (to have forged rows sealed by the
        // migration) is refused.
        let rows_sealed = checked.as_slice() == ROOT_CHECK_SEALED_ROWS;
        if rows_sealed && version < store.row_macs_since() {
            return Err(error::internal(format!(
                "the keystore's rows carry MACs but its schema version says {version}, from before them: it was edited outside the broker"
            )));
        }
        // Only a keystore this root key opens is migrated.
        if version < latest {
            // The migrations after the stored version, and the new version, in
            // one transaction: a keystore is at one version or the next.
            let mut tx = store.begin()?;
            store.migrate(&mut tx, version)?;
            // Rows from before their MACs get them now, once, under this
            // root key, and the root check says so from then on.
            if version < store.row_macs_since() {
                seal_all_rows(&mut tx, &row_key(&root))?;
                tx.execute(
                    "UPDATE meta SET value = $1 WHERE name = 'root_check'",
                    params![root.seal(ROOT_CHECK_AAD, ROOT_CHECK_SEALED_ROWS)?],
                )?;
            }
            tx.commit()?;
        }
        let keystore = Keystore {
            store: Arc::new(store),
            row_key: row_key(&root),
            root,
            state: RwLock::new(State::default()),
            writing: Mutex::new(()),
            generation: AtomicI64::new(-1),
        };
        keystore.refresh()?;
        Ok(keystore)
    }

    /// The store (shared with the audit log and the replay guard of a shared store).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Makes the in-memory copy current: on a shared store, reloads it when
    /// another replica changed the keystore since it was read (one query when
    /// nothing changed). A single broker's copy is always current.
    pub fn refresh(&self) -> Result<(), KmsError> {
        let current = if self.store.is_shared() {
            self.store.query_int(GENERATION, &[])?
        } else {
            0
        };
        self.refresh_to(current)
    }

    /// Reloads the copy, if the store is at `generation` (read by the caller
    /// in its own query) and the copy is older.
    pub fn refresh_to(&self, generation: i64) -> Result<(), KmsError> {
        // Generations only grow: a copy already newer than the one asked for
        // (another request reloaded it meanwhile) is kept.
        if generation > self.generation.load(Ordering::Acquire) {
            self.reload(generation)?;
        }
        Ok(())
    }

    fn reload(&self, generation: i64) -> Result<(), KmsError> {
        let _writing = self
            .writing
            .lock()
            .map_err(|_| error::internal("keystore lock poisoned"))?;
        if generation > self.generation.load(Ordering::Acquire) {
            self.reload_locked()?;
        }
        Ok(())
    }

    /// Reads the whole copy again (the caller holds `writing`), in one
    /// transaction, so that it is one generation's.
    fn reload_locked(&self) -> Result<(), KmsError> {
        let mut tx = self.store.begin_snapshot()?;
        self.check_root(&mut tx)?;
        verify_rows(&mut tx, &self.row_key)?;
        let state = load(&mut tx, &self.root)?;
        let loaded = if tx.is_postgres() {
            tx.query_int(GENERATION, &[])?
        } else {
            0
        };
        drop(tx);
        *self.write_state()? = state;
        self.generation.store(loaded, Ordering::Release);
        Ok(())
    }

    /// Claims a request id in a shared store (see [`crate::store`]): false if
    /// any replica accepted it already. Also returns the store's generation.
    ///
    /// The claim commits without waiting for its own flush: the request's
    /// audit record commits (flushed) after it, and PostgreSQL's log is one
    /// sequence, so no response is sent before its claim is durable too.
    pub fn claim_request_id(
        &self,
        digest: [u8; 16],
        expires_ms: u64,
    ) -> Result<(bool, i64), KmsError> {
        let row = self.store.query_relaxed(
            "WITH claim AS (INSERT INTO request_ids (digest, expires_ms) VALUES ($1, $2) \
             ON CONFLICT (digest) DO NOTHING RETURNING 1) \
             SELECT (SELECT COUNT(*) FROM claim), (SELECT n FROM generation WHERE id = 1)",
            params![&digest[..], expires_ms],
        )?;
        let row = row
            .first()
            .ok_or_else(|| error::internal("keystore: the request id claim returned nothing"))?;
        Ok((row.int(0)? == 1, row.int(1)?))
    }

    /// Records that replica `name` serves, and returns how many replicas were
    /// heard from since `alive_since` (itself included).
    pub fn heartbeat(&self, name: &str, now_ms: u64, alive_since: u64) -> Result<u64, KmsError> {
        let mut tx = self.store.begin()?;
        tx.execute(
            "INSERT INTO replicas (name, started_ms, seen_ms) VALUES ($1, $2, $2) \
             ON CONFLICT (name) DO UPDATE SET seen_ms = $2",
            params![name, now_ms],
        )?;
        let alive = tx.query_int(
            "SELECT COUNT(*) FROM replicas WHERE seen_ms >= $1",
            params![alive_since],
        )?;
        tx.commit()?;
        Ok(alive as u64)
    }

    /// Forgets claimed request ids that no request can carry any more, `margin`
    /// after they expired by this broker's clock: replicas' clocks differ, and
    /// one whose clock is behind still accepts an id for that long.
    pub fn forget_request_ids(&self, now_ms: u64, margin_ms: u64) -> Result<u64, KmsError> {
        if !self.store.is_shared() {
            return Ok(0);
        }
        self.store.execute(
            "DELETE FROM request_ids WHERE expires_ms < $1",
            params![now_ms.saturating_sub(margin_ms)],
        )
    }

    /// Forgets replicas not heard from since `before` (ms).
    pub fn forget_replicas(&self, before: u64) -> Result<u64, KmsError> {
        if !self.store.is_shared() {
            return Ok(0);
        }
        self.store
            .execute("DELETE FROM replicas WHERE seen_ms < $1", params![before])
    }

    /// Runs one change: `change` inside a transaction, then `before_commit`
    /// (the audit record, in the same transaction on a shared store), the
    /// commit, and `apply` to the in-memory copy — all under this broker's
    /// write lock, so that the copy sees changes in the order the database
    /// committed them. Conditions a change depends on are checked inside
    /// `change` (with [`Tx::for_update`] row locks on a shared store). On a
    /// shared store the change also moves the generation, first: changes of
    /// all replicas are serialized on that row, so they cannot deadlock.
    fn write<T>(
        &self,
        change: impl FnOnce(&mut Tx<'_>) -> Result<T, KmsError>,
        before_commit: impl FnOnce(&T, &mut Tx<'_>) -> Result<(), KmsError>,
        apply: impl FnOnce(&mut State, &T),
    ) -> Result<T, KmsError> {
        let _writing = self
            .writing
            .lock()
            .map_err(|_| error::internal("keystore lock poisoned"))?;
        let mut tx = self.store.begin()?;
        let generation = if tx.is_postgres() {
            Some(tx.query_int(
                "UPDATE generation SET n = n + 1 WHERE id = 1 RETURNING n",
                &[],
            )?)
        } else {
            None
        };
        // A root key rotated since this broker opened the store: its writes
        // would seal material under a key the store no longer opens with.
        self.check_root(&mut tx)?;
        let out = change(&mut tx)?;
        before_commit(&out, &mut tx)?;
        tx.commit()?;
        match generation {
            // Another replica's change is missing from the copy: applying this
            // one to it could misplace it (a key version numbered after one
            // the copy lacks), so the copy is read again instead.
            Some(n) if self.generation.load(Ordering::Acquire) != n - 1 => {
                // The change is committed whatever happens now: should the
                // copy not be read (the database gone meanwhile), it is
                // marked stale, and the next request reloads it.
                if self.reload_locked().is_err() {
                    self.generation.store(-1, Ordering::Release);
                }
            }
            _ => {
                apply(&mut *self.write_state()?, &out);
                if let Some(n) = generation {
                    self.generation.store(n, Ordering::Release);
                }
            }
        }
        Ok(out)
    }

    /// A key's row as stored, its MAC checked (and on a shared store, locked
    /// until the commit): what a change of the key starts from.
    fn key_row(&self, tx: &mut Tx<'_>, id: KeyId) -> Result<Vec<Value>, KmsError> {
        verified_row(tx, &self.row_key, &KEYS, id.into())?
            .ok_or_else(|| error::not_found(format!("key {id} does not exist")))
    }

    fn check_root(&self, tx: &mut Tx<'_>) -> Result<(), KmsError> {
        let check = tx
            .query_opt("SELECT value FROM meta WHERE name = 'root_check'", &[])?
            .map(|r| r.blob(0))
            .transpose()?
            .unwrap_or_default();
        match self.root.open(ROOT_CHECK_AAD, &check) {
            Some(_) => Ok(()),
            None => Err(error::internal(
                "the keystore's root key was rotated: this broker holds the old one; restart it with the new root key",
            )),
        }
    }

    /// Re-seals every key version's material and every access key's secret
    /// under `new` (and the root check; `new_salt` is the passphrase salt
    /// `new` was derived with, if it was), in one transaction with its audit
    /// record. Brokers still holding the old root key have their writes
    /// refused from then on and must restart with the new one.
    pub fn rotate_root(
        &self,
        new: &RootKey,
        new_salt: Option<&[u8]>,
        before_commit: impl FnOnce(u64, &mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<u64, KmsError> {
        let reseal = |aad: &[u8], sealed: &[u8], what: &str| {
            let plain = self.root.open(aad, sealed).ok_or_else(|| {
                error::internal(format!(
                    "keystore: {what} does not decrypt under the root key"
                ))
            })?;
            new.seal(aad, &plain)
        };
        self.write(
            |tx| {
                let mut resealed = 0u64;
                let rows = tx.query(
                    &format!(
                        "SELECT key_id, version, material FROM key_versions{}",
                        tx.for_update()
                    ),
                    &[],
                )?;
                for r in rows {
                    let id = key_id(r.blob(0)?)?;
                    let version = u32::try_from(r.int(1)?)
                        .map_err(|_| error::internal("keystore: malformed key version"))?;
                    let material = reseal(
                        &material_aad(id, version),
                        &r.blob(2)?,
                        &format!("material of {id} v{version}"),
                    )?;
                    tx.execute(
                        "UPDATE key_versions SET material = $3 WHERE key_id = $1 AND version = $2",
                        params![id, version, material],
                    )?;
                    resealed += 1;
                }
                // Every sealed row is checked under the old key, then written
                // with its MAC under the new one (access keys with their
                // secret re-sealed): a row forged meanwhile is refused, not
                // sealed anew.
                let new_key = row_key(new);
                for rows in SEALED_ROWS {
                    let select = format!(
                        "SELECT {}, mac FROM {}{}",
                        rows.fields.join(", "),
                        rows.table,
                        tx.for_update()
                    );
                    for row in tx.query(&select, &[])? {
                        let mut values = check_row(&self.row_key, rows, row.values())?;
                        if rows.table == ACCESS_KEYS.table {
                            let (Value::Text(id), Value::Blob(secret)) = (&values[0], &values[2])
                            else {
                                return Err(error::internal("keystore: malformed access key row"));
                            };
                            values[2] = Value::Blob(reseal(
                                &access_key_aad(id),
                                secret,
                                &format!("the secret of access key {id}"),
                            )?);
                            resealed += 1;
                        }
                        update_row(tx, &new_key, rows, values)?;
                    }
                }
                tx.execute(
                    "UPDATE meta SET value = $1 WHERE name = 'root_check'",
                    params![new.seal(ROOT_CHECK_AAD, ROOT_CHECK_SEALED_ROWS)?],
                )?;
                match new_salt {
                    Some(salt) => tx.execute(
                        "INSERT INTO meta (name, value) VALUES ('root_salt', $1) \
                         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                        params![salt],
                    )?,
                    None => tx.execute("DELETE FROM meta WHERE name = 'root_salt'", &[])?,
                };
                Ok(resealed)
            },
            |resealed, tx| before_commit(*resealed, tx),
            |_, _| {},
        )
    }

    /// A removal: deletes the one row `sql` names (NotFound, saying `missing`,
    /// when there is none), audits, commits, then `apply`s it to memory.
    fn remove(
        &self,
        sql: &str,
        key: &[crate::store::Value],
        missing: impl FnOnce() -> String,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
        apply: impl FnOnce(&mut State),
    ) -> Result<(), KmsError> {
        self.write(
            |tx| match tx.execute(sql, key)? {
                0 => Err(error::not_found(missing())),
                _ => Ok(()),
            },
            |_, tx| before_commit(tx),
            |state, _| apply(state),
        )
    }

    fn read_state(&self) -> Result<std::sync::RwLockReadGuard<'_, State>, KmsError> {
        self.state
            .read()
            .map_err(|_| error::internal("keystore state poisoned"))
    }

    fn write_state(&self) -> Result<std::sync::RwLockWriteGuard<'_, State>, KmsError> {
        self.state
            .write()
            .map_err(|_| error::internal("keystore state poisoned"))
    }

    /// Runs `f` with a key, found by id, ARN, alias name or alias ARN, under
    /// the state's read lock: `f` must not call the keystore (a second read
    /// lock waits behind a queued writer that waits for the first: deadlock).
    pub fn with_key<T>(
        &self,
        key_ref: &str,
        f: impl FnOnce(&KeyRecord) -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let state = self.read_state()?;
        let id = resolve(&state, key_ref)?;
        let key = state
            .keys
            .get(&id)
            .ok_or_else(|| error::not_found(format!("key {key_ref} does not exist")))?;
        f(key)
    }

    /// Runs `f` with the key a blob names (by its id); as [`Keystore::with_key`],
    /// `f` must not call the keystore.
    pub fn with_key_id<T>(
        &self,
        id: KeyId,
        f: impl FnOnce(&KeyRecord) -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let state = self.read_state()?;
        let key = state
            .keys
            .get(&id)
            .ok_or_else(|| error::not_found(format!("key {id} does not exist")))?;
        f(key)
    }

    /// Resolves a key reference to its id.
    pub fn resolve(&self, key_ref: &str) -> Result<KeyId, KmsError> {
        resolve(&*self.read_state()?, key_ref)
    }

    pub fn list_keys(&self) -> Result<Vec<(KeyId, KeyState)>, KmsError> {
        let state = self.read_state()?;
        let mut keys: Vec<_> = state.keys.values().map(|k| (k.id, k.state)).collect();
        keys.sort_by_key(|(id, _)| *id);
        Ok(keys)
    }

    pub fn list_aliases(&self) -> Result<Vec<(String, KeyId)>, KmsError> {
        Ok(self
            .read_state()?
            .aliases
            .iter()
            .map(|(a, k)| (a.clone(), *k))
            .collect())
    }

    pub fn principal(&self, name: &str) -> Result<Option<PrincipalRecord>, KmsError> {
        Ok(self.read_state()?.principals.get(name).cloned())
    }

    pub fn list_principals(&self) -> Result<Vec<PrincipalRecord>, KmsError> {
        Ok(self.read_state()?.principals.values().cloned().collect())
    }

    pub fn trust_roots(&self) -> Result<Vec<(String, Vec<u8>)>, KmsError> {
        Ok(self
            .read_state()?
            .trust_roots
            .iter()
            .map(|(l, d)| (l.clone(), d.clone()))
            .collect())
    }

    /// Creates a key with one version of fresh material.
    pub fn create_key(
        &self,
        description: &str,
        policy_json: &str,
        now_ms: u64,
        before_commit: impl FnOnce(KeyId, &mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<KeyId, KmsError> {
        let policy = Policy::parse(policy_json, PolicyKind::Key)
            .map_err(|e| error::validation(e.to_string()))?;
        let id = KeyId::random();
        let material = crate::crypto::random_key();
        let sealed = self.root.seal(&material_aad(id, 1), material.as_ref())?;
        self.write(
            |tx| {
                insert_row(
                    tx,
                    &self.row_key,
                    &KEYS,
                    vec![
                        id.into(),
                        description.into(),
                        KeyState::Enabled.as_str().into(),
                        now_ms.into(),
                        Value::Null,
                        policy_json.into(),
                        Value::Null,
                        Value::Null,
                    ],
                )?;
                tx.execute(
                    "INSERT INTO key_versions VALUES ($1, 1, $2, $3)",
                    params![id, sealed, now_ms as i64],
                )?;
                Ok(id)
            },
            |id, tx| before_commit(*id, tx),
            |state, _| {
                state.keys.insert(
                    id,
                    KeyRecord {
                        id,
                        description: description.to_owned(),
                        state: KeyState::Enabled,
                        created_ms: now_ms,
                        deletion_ms: None,
                        policy_json: policy_json.to_owned(),
                        policy,
                        versions: vec![material],
                        rotation: None,
                    },
                );
            },
        )
    }

    /// Adds a version of fresh material to an Enabled key; it becomes the one
    /// Encrypt uses. `Rotate::OnDemand` leaves the automatic schedule as it
    /// is (as AWS KMS does); `Rotate::Due` rotates only if, in the same
    /// transaction, the key's automatic rotation is due, and schedules the
    /// next (returns `None` when it was not due).
    pub fn rotate_key(
        &self,
        id: KeyId,
        now_ms: u64,
        how: Rotate,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<Option<u32>, KmsError> {
        let material = crate::crypto::random_key();
        let stored = material.clone();
        self.write(
            |tx| {
                let mut row = self.key_row(tx, id)?;
                usable(id, row_state(id, &row)?, None)?;
                let next = match how {
                    Rotate::OnDemand => None,
                    Rotate::Due => {
                        let int = |v: &Value| match v {
                            Value::Int(i) => Some(*i),
                            _ => None,
                        };
                        match int(&row[KEY_ROTATION_DAYS]).zip(int(&row[KEY_NEXT_ROTATION])) {
                            Some((days, next)) if next as u64 <= now_ms => Some(Rotation {
                                period_days: u32::try_from(days).map_err(|_| {
                                    error::internal("keystore: malformed rotation period")
                                })?,
                                next_ms: now_ms + days as u64 * 86_400_000,
                            }),
                            _ => return Ok(None),
                        }
                    }
                };
                if let Some(r) = next {
                    row[KEY_NEXT_ROTATION] = r.next_ms.into();
                    update_row(tx, &self.row_key, &KEYS, row)?;
                }
                let version = tx
                    .query_opt(
                        "SELECT MAX(version) + 1 FROM key_versions WHERE key_id = $1",
                        params![id],
                    )?
                    .map(|r| r.int(0))
                    .transpose()?
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| error::internal(format!("key {id} has no versions")))?;
                let sealed = self
                    .root
                    .seal(&material_aad(id, version), stored.as_ref())?;
                tx.execute(
                    "INSERT INTO key_versions VALUES ($1, $2, $3, $4)",
                    params![id, version, sealed, now_ms as i64],
                )?;
                Ok(Some((version, next)))
            },
            |rotated, tx| match rotated {
                Some(_) => before_commit(tx),
                None => Ok(()),
            },
            |state, rotated| {
                if let (Some((_, next)), Some(key)) = (rotated, state.keys.get_mut(&id)) {
                    key.versions.push(material);
                    if next.is_some() {
                        key.rotation = *next;
                    }
                }
            },
        )
        .map(|rotated| rotated.map(|(version, _)| version))
    }

    /// Turns a key's automatic rotation on (every `period_days`, the first
    /// one that many days from now) or off. The key must be usable.
    pub fn set_rotation(
        &self,
        id: KeyId,
        period_days: Option<u32>,
        now_ms: u64,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<Option<Rotation>, KmsError> {
        let rotation = period_days.map(|days| Rotation {
            period_days: days,
            next_ms: now_ms + u64::from(days) * 86_400_000,
        });
        self.write(
            |tx| {
                let mut row = self.key_row(tx, id)?;
                usable(id, row_state(id, &row)?, None)?;
                row[KEY_ROTATION_DAYS] = rotation.map(|r| r.period_days).into();
                row[KEY_NEXT_ROTATION] = rotation.map(|r| r.next_ms).into();
                update_row(tx, &self.row_key, &KEYS, row)?;
                Ok(rotation)
            },
            |_, tx| before_commit(tx),
            |state, _| {
                if let Some(key) = state.keys.get_mut(&id) {
                    key.rotation = rotation;
                }
            },
        )
    }

    /// Enabled keys whose automatic rotation is due.
    pub fn due_for_rotation(&self, now_ms: u64) -> Result<Vec<KeyId>, KmsError> {
        Ok(self
            .read_state()?
            .keys
            .values()
            .filter(|k| {
                k.state == KeyState::Enabled && k.rotation.is_some_and(|r| r.next_ms <= now_ms)
            })
            .map(|k| k.id)
            .collect())
    }

    /// A new access key for a principal: a random id and secret, the secret
    /// stored encrypted under the root key (bound to the id).
    pub fn create_access_key(
        &self,
        principal: &str,
        now_ms: u64,
        before_commit: impl FnOnce(&str, &mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<AccessKeyRecord, KmsError> {
        let record = AccessKeyRecord {
            access_key_id: crypto::random_access_key_id(),
            principal: principal.to_owned(),
            secret: crypto::random_secret_access_key(),
            created_ms: now_ms,
        };
        let sealed = self.root.seal(
            &access_key_aad(&record.access_key_id),
            record.secret.as_bytes(),
        )?;
        self.write(
            |tx| {
                if !exists(
                    tx,
                    "SELECT 1 FROM principals WHERE name = $1",
                    params![principal],
                )? {
                    return Err(error::not_found(format!(
                        "principal {principal:?} does not exist"
                    )));
                }
                insert_row(
                    tx,
                    &self.row_key,
                    &ACCESS_KEYS,
                    vec![
                        (&record.access_key_id).into(),
                        principal.into(),
                        (&sealed).into(),
                        now_ms.into(),
                    ],
                )?;
                Ok(())
            },
            |_, tx| before_commit(&record.access_key_id, tx),
            |state, _| {
                state
                    .access_keys
                    .insert(record.access_key_id.clone(), record.clone());
            },
        )?;
        Ok(record)
    }

    /// Deletes an access key, if it is still `principal`'s (the one authorized on).
    pub fn delete_access_key(
        &self,
        access_key_id: &str,
        principal: &str,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<(), KmsError> {
        self.remove(
            "DELETE FROM access_keys WHERE access_key_id = $1 AND principal = $2",
            params![access_key_id, principal],
            || format!("access key {access_key_id} does not exist"),
            before_commit,
            |state| {
                state.access_keys.remove(access_key_id);
            },
        )
    }

    /// An access key and the principal it stands for.
    pub fn access_key(
        &self,
        access_key_id: &str,
    ) -> Result<Option<(AccessKeyRecord, PrincipalRecord)>, KmsError> {
        let state = self.read_state()?;
        Ok(state.access_keys.get(access_key_id).and_then(|k| {
            let principal = state.principals.get(&k.principal)?;
            Some((k.clone(), principal.clone()))
        }))
    }

    pub fn list_access_keys(&self) -> Result<Vec<AccessKeyRecord>, KmsError> {
        Ok(self.read_state()?.access_keys.values().cloned().collect())
    }

    /// Deletes an alias, if it still names `id` (the key authorized on).
    pub fn delete_alias(
        &self,
        alias: &str,
        id: KeyId,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<(), KmsError> {
        self.remove(
            "DELETE FROM aliases WHERE alias = $1 AND key_id = $2",
            params![alias, id],
            || format!("alias {alias} does not exist (or no longer names key {id})"),
            before_commit,
            |state| {
                state.aliases.remove(alias);
            },
        )
    }

    /// Moves a key to another state, if its state (read in the same
    /// transaction) allows it; refused with KMSInvalidStateException otherwise.
    pub fn transition(
        &self,
        id: KeyId,
        transition: Transition,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<(), KmsError> {
        let (to, deletion_ms) = transition.target();
        self.write(
            |tx| {
                let mut row = self.key_row(tx, id)?;
                let current = row_state(id, &row)?;
                if !transition.allowed_from(current) {
                    return Err(error::invalid_state(transition.refusal(id, current)));
                }
                row[KEY_STATE] = to.as_str().into();
                row[KEY_DELETION] = deletion_ms.into();
                update_row(tx, &self.row_key, &KEYS, row)?;
                Ok(())
            },
            |_, tx| before_commit(tx),
            |state, _| {
                if let Some(key) = state.keys.get_mut(&id) {
                    key.state = to;
                    key.deletion_ms = deletion_ms;
                }
            },
        )
    }

    pub fn put_key_policy(
        &self,
        id: KeyId,
        policy_json: &str,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<(), KmsError> {
        let policy = Policy::parse(policy_json, PolicyKind::Key)
            .map_err(|e| error::validation(e.to_string()))?;
        self.write(
            |tx| {
                let mut row = self.key_row(tx, id)?;
                row[KEY_POLICY] = policy_json.into();
                update_row(tx, &self.row_key, &KEYS, row)?;
                Ok(())
            },
            |_, tx| before_commit(tx),
            |state, _| {
                if let Some(key) = state.keys.get_mut(&id) {
                    key.policy = policy;
                    key.policy_json = policy_json.to_owned();
                }
            },
        )
    }

    pub fn create_alias(
        &self,
        alias: &str,
        id: KeyId,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<(), KmsError> {
        let valid = alias.strip_prefix("alias/").is_some_and(|n| {
            !n.is_empty()
                && n.len() <= 250
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c))
                && !n.starts_with("aws/")
        });
        if !valid {
            return Err(error::validation(format!(
                "alias {alias:?} must be alias/NAME with letters, digits, '/', '_' or '-' (and not alias/aws/...)"
            )));
        }
        self.write(
            |tx| {
                if exists(tx, "SELECT 1 FROM aliases WHERE alias = $1", params![alias])? {
                    return Err(error::already_exists(format!(
                        "alias {alias} already exists"
                    )));
                }
                self.key_row(tx, id)?;
                insert_row(tx, &self.row_key, &ALIASES, vec![alias.into(), id.into()])?;
                Ok(())
            },
            |_, tx| before_commit(tx),
            |state, _| {
                state.aliases.insert(alias.to_owned(), id);
            },
        )
    }

    pub fn add_principal(
        &self,
        name: &str,
        public_key: VerifyingKey,
        policy_json: &str,
        now_ms: u64,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<(), KmsError> {
        let max = crate::service::MAX_PRINCIPAL_NAME;
        if name.is_empty() || name.len() > max || name.chars().any(char::is_control) {
            return Err(error::validation(format!(
                "a principal name is 1 to {max} bytes of printable characters"
            )));
        }
        let policy = Policy::parse(policy_json, PolicyKind::Identity)
            .map_err(|e| error::validation(e.to_string()))?;
        self.write(
            |tx| {
                if exists(
                    tx,
                    "SELECT 1 FROM principals WHERE name = $1",
                    params![name],
                )? {
                    return Err(error::already_exists(format!(
                        "principal {name:?} already exists"
                    )));
                }
                insert_row(
                    tx,
                    &self.row_key,
                    &PRINCIPALS,
                    vec![
                        name.into(),
                        (&public_key.to_bytes()[..]).into(),
                        policy_json.into(),
                        now_ms.into(),
                    ],
                )?;
                Ok(())
            },
            |_, tx| before_commit(tx),
            |state, _| {
                state.principals.insert(
                    name.to_owned(),
                    PrincipalRecord {
                        name: name.to_owned(),
                        public_key,
                        policy_json: policy_json.to_owned(),
                        policy,
                        created_ms: now_ms,
                    },
                );
            },
        )
    }

    pub fn remove_principal(
        &self,
        name: &str,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<(), KmsError> {
        self.remove(
            "DELETE FROM principals WHERE name = $1",
            params![name],
            || format!("principal {name:?} does not exist"),
            before_commit,
            |state| {
                state.principals.remove(name);
                // Its access keys went with it (ON DELETE CASCADE).
                state.access_keys.retain(|_, k| k.principal != name);
            },
        )
    }

    pub fn add_trust_root(
        &self,
        label: &str,
        der: &[u8],
        now_ms: u64,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<(), KmsError> {
        self.write(
            |tx| {
                if exists(
                    tx,
                    "SELECT 1 FROM trust_roots WHERE label = $1",
                    params![label],
                )? {
                    return Err(error::already_exists(format!(
                        "trust root {label:?} already exists"
                    )));
                }
                let other = tx
                    .query_opt("SELECT label FROM trust_roots WHERE der = $1", params![der])?
                    .map(|r| r.text(0))
                    .transpose()?;
                if let Some(other) = other {
                    return Err(error::already_exists(format!(
                        "this root is already trusted as {other:?}"
                    )));
                }
                insert_row(
                    tx,
                    &self.row_key,
                    &TRUST_ROOTS,
                    vec![label.into(), der.into(), now_ms.into()],
                )?;
                Ok(())
            },
            |_, tx| before_commit(tx),
            |state, _| {
                state.trust_roots.insert(label.to_owned(), der.to_vec());
            },
        )
    }

    pub fn remove_trust_root(
        &self,
        label: &str,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<(), KmsError> {
        self.remove(
            "DELETE FROM trust_roots WHERE label = $1",
            params![label],
            || format!("trust root {label:?} does not exist"),
            before_commit,
            |state| {
                state.trust_roots.remove(label);
            },
        )
    }

    /// Keys pending deletion whose date has come.
    pub fn due_for_deletion(&self, now_ms: u64) -> Result<Vec<KeyId>, KmsError> {
        Ok(self
            .read_state()?
            .keys
            .values()
            .filter(|k| {
                k.state == KeyState::PendingDeletion && k.deletion_ms.is_some_and(|d| d <= now_ms)
            })
            .map(|k| k.id)
            .collect())
    }

    /// Destroys a key (its material, versions and aliases) if, in the same
    /// transaction, it is still pending deletion with its date come; returns
    /// whether it did (a deletion cancelled meanwhile wins, and nothing is
    /// recorded).
    pub fn destroy_key(
        &self,
        id: KeyId,
        now_ms: u64,
        before_commit: impl FnOnce(&mut Tx<'_>) -> Result<(), KmsError>,
    ) -> Result<bool, KmsError> {
        self.write(
            |tx| {
                let destroyed = tx
                    .execute(
                        "DELETE FROM keys WHERE key_id = $1 AND state = 'PendingDeletion' AND deletion_ms <= $2",
                        params![id, now_ms as i64],
                    )?;
                Ok(destroyed == 1)
            },
            |destroyed, tx| {
                if *destroyed {
                    before_commit(tx)
                } else {
                    Ok(())
                }
            },
            |state, destroyed| {
                if *destroyed {
                    state.keys.remove(&id);
                    state.aliases.retain(|_, k| *k != id);
                }
            },
        )
    }

    /// SQLite's integrity check, or a query answered by PostgreSQL (for
    /// tests, `kms doctor` and readiness).
    pub fn integrity_check(&self) -> Result<String, KmsError> {
        self.store.check()
    }
}

/// Rows whose every field (but their `mac`) is covered by an HMAC-SHA256 under
/// a key derived from the root key: whoever can write the store, but does not
/// hold the root key, cannot make a principal, policy, trust root, key state,
/// alias or access key's owner that the broker accepts — every load checks
/// them all. (Material and access-key secrets are sealed under the root key
/// itself.) A row copied back from an older state still verifies: a rollback
/// is not detected row by row.
pub struct SealedRows {
    table: &'static str,
    key: &'static str,
    fields: &'static [&'static str],
}

const KEYS: SealedRows = SealedRows {
    table: "keys",
    key: "key_id",
    fields: &[
        "key_id",
        "description",
        "state",
        "created_ms",
        "deletion_ms",
        "policy",
        "rotation_days",
        "next_rotation_ms",
    ],
};
const ALIASES: SealedRows = SealedRows {
    table: "aliases",
    key: "alias",
    fields: &["alias", "key_id"],
};
const PRINCIPALS: SealedRows = SealedRows {
    table: "principals",
    key: "name",
    fields: &["name", "public_key", "policy", "created_ms"],
};
const TRUST_ROOTS: SealedRows = SealedRows {
    table: "trust_roots",
    key: "label",
    fields: &["label", "der", "added_ms"],
};
const ACCESS_KEYS: SealedRows = SealedRows {
    table: "access_keys",
    key: "access_key_id",
    fields: &["access_key_id", "principal", "secret", "created_ms"],
};
const SEALED_ROWS: [&SealedRows; 5] = [&KEYS, &ALIASES, &PRINCIPALS, &TRUST_ROOTS, &ACCESS_KEYS];

/// The rows' MAC key: HKDF-SHA256 of the root key.
fn row_key(root: &RootKey) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<sha2::Sha256>::new(None, root.bytes())
        .expand(b"cloister-kms-row-mac-v1", key.as_mut())
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 length"));
    key
}

/// A row's MAC: over its table's name and each field, typed and length-prefixed.
fn row_mac(key: &[u8; 32], table: &str, values: &[Value]) -> Result<Vec<u8>, KmsError> {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)
        .map_err(|_| error::internal("row MAC key"))?;
    mac.update(table.as_bytes());
    mac.update(&[0]);
    for v in values {
        match v {
            Value::Null => mac.update(&[0]),
            Value::Int(i) => {
                mac.update(&[1]);
                mac.update(&i.to_be_bytes());
            }
            Value::Text(t) => {
                mac.update(&[2]);
                mac.update(&(t.len() as u64).to_be_bytes());
                mac.update(t.as_bytes());
            }
            Value::Blob(b) => {
                mac.update(&[3]);
                mac.update(&(b.len() as u64).to_be_bytes());
                mac.update(b);
            }
        }
    }
    Ok(mac.finalize().into_bytes().to_vec())
}

/// The columns of a keys row, as [`KEYS`] lists them.
const KEY_STATE: usize = 2;
const KEY_DELETION: usize = 4;
const KEY_POLICY: usize = 5;
const KEY_ROTATION_DAYS: usize = 6;
const KEY_NEXT_ROTATION: usize = 7;

/// A key's state, from its row.
fn row_state(id: KeyId, row: &[Value]) -> Result<KeyState, KmsError> {
    match &row[KEY_STATE] {
        Value::Text(state) => KeyState::parse(state),
        _ => None,
    }
    .ok_or_else(|| error::internal(format!("key {id} has an unknown state")))
}

/// Checks a row read as `fields..., mac`; returns its fields.
fn check_row(
    row_key: &[u8; 32],
    rows: &SealedRows,
    values: &[Value],
) -> Result<Vec<Value>, KmsError> {
    use subtle::ConstantTimeEq;
    let (fields, stored) = values.split_at(rows.fields.len().min(values.len()));
    let expected = row_mac(row_key, rows.table, fields)?;
    if matches!(stored, [Value::Blob(m)] if bool::from(m.as_slice().ct_eq(&expected))) {
        return Ok(fields.to_vec());
    }
    let which = match fields.first() {
        Some(Value::Text(t)) => format!("{t:?}"),
        Some(Value::Blob(b)) => hex::encode(b),
        other => format!("{other:?}"),
    };
    Err(error::internal(format!(
        "keystore: the {} row {which} fails its integrity check: it was written or changed outside the broker (without the root key)",
        rows.table
    )))
}

/// The row of `rows` whose key is `key`, its MAC checked, locked on a shared
/// store until the commit; `None` if there is none.
fn verified_row(
    tx: &mut Tx<'_>,
    row_key: &[u8; 32],
    rows: &SealedRows,
    key: Value,
) -> Result<Option<Vec<Value>>, KmsError> {
    let select = format!(
        "SELECT {}, mac FROM {} WHERE {} = $1{}",
        rows.fields.join(", "),
        rows.table,
        rows.key,
        tx.for_update()
    );
    tx.query_opt(&select, &[key])?
        .map(|row| check_row(row_key, rows, row.values()))
        .transpose()
}

/// A row's values followed by their MAC, as written.
fn with_mac(
    row_key: &[u8; 32],
    rows: &SealedRows,
    mut values: Vec<Value>,
) -> Result<Vec<Value>, KmsError> {
    let mac = row_mac(row_key, rows.table, &values)?;
    values.push(Value::Blob(mac));
    Ok(values)
}

/// Inserts a row with the MAC of exactly these values (the first is the key).
fn insert_row(
    tx: &mut Tx<'_>,
    row_key: &[u8; 32],
    rows: &SealedRows,
    values: Vec<Value>,
) -> Result<(), KmsError> {
    let values = with_mac(row_key, rows, values)?;
    let placeholders: Vec<String> = (1..=values.len()).map(|i| format!("${i}")).collect();
    tx.execute(
        &format!(
            "INSERT INTO {} ({}, mac) VALUES ({})",
            rows.table,
            rows.fields.join(", "),
            placeholders.join(", ")
        ),
        &values,
    )?;
    Ok(())
}

/// Writes every field of a row (found by its key, the first value) and the
/// MAC of exactly these values: never of what the store holds, so that a row
/// changed outside the broker is not sealed by the broker's next write.
fn update_row(
    tx: &mut Tx<'_>,
    row_key: &[u8; 32],
    rows: &SealedRows,
    values: Vec<Value>,
) -> Result<(), KmsError> {
    let values = with_mac(row_key, rows, values)?;
    let sets: Vec<String> = rows
        .fields
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, f)| format!("{f} = ${}", i + 1))
        .chain([format!("mac = ${}", rows.fields.len() + 1)])
        .collect();
    let changed = tx.execute(
        &format!(
            "UPDATE {} SET {} WHERE {} = $1",
            rows.table,
            sets.join(", "),
            rows.key
        ),
        &values,
    )?;
    if changed != 1 {
        return Err(error::internal(format!(
            "keystore: the {} row to update is gone",
            rows.table
        )));
    }
    Ok(())
}

/// Gives every row of the tables in [`SEALED_ROWS`] its MAC, as the rows
/// are: only when a keystore from before the MACs is migrated (its root
/// check, under the root key, says so).
fn seal_all_rows(tx: &mut Tx<'_>, row_key: &[u8; 32]) -> Result<(), KmsError> {
    for rows in SEALED_ROWS {
        let select = format!("SELECT {} FROM {}", rows.fields.join(", "), rows.table);
        for row in tx.query(&select, &[])? {
            update_row(tx, row_key, rows, row.values().to_vec())?;
        }
    }
    Ok(())
}

/// Checks every sealed row's MAC; the first row that fails is named.
fn verify_rows(tx: &mut Tx<'_>, row_key: &[u8; 32]) -> Result<(), KmsError> {
    for rows in SEALED_ROWS {
        let select = format!("SELECT {}, mac FROM {}", rows.fields.join(", "), rows.table);
        for row in tx.query(&select, &[])? {
            check_row(row_key, rows, row.values())?;
        }
    }
    Ok(())
}

fn exists(tx: &mut Tx<'_>, sql: &str, params: &[crate::store::Value]) -> Result<bool, KmsError> {
    Ok(tx.query_opt(sql, params)?.is_some())
}

/// Unless the key is Enabled, why it cannot be used (as AWS KMS says it).
pub fn usable(id: KeyId, state: KeyState, deletion_ms: Option<u64>) -> Result<(), KmsError> {
    match state {
        KeyState::Enabled => Ok(()),
        KeyState::Disabled => Err(error::disabled(format!("key {id} is disabled"))),
        KeyState::PendingDeletion => Err(error::invalid_state(match deletion_ms {
            Some(ms) => format!(
                "key {id} is pending deletion (on {})",
                cloister_attestation::verify::rfc3339_ms(ms)
            ),
            None => format!("key {id} is pending deletion"),
        })),
    }
}

/// How [`Keystore::rotate_key`] rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotate {
    /// Now, as asked (RotateKeyOnDemand).
    OnDemand,
    /// If the key's automatic rotation is due.
    Due,
}

/// The changes of a key's state that requests make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Enable,
    Disable,
    /// To PendingDeletion, to be destroyed at this time (Unix ms).
    ScheduleDeletion(u64),
    /// Back from PendingDeletion; the key is then Disabled (as in AWS KMS).
    CancelDeletion,
}

impl Transition {
    fn target(self) -> (KeyState, Option<u64>) {
        match self {
            Transition::Enable => (KeyState::Enabled, None),
            Transition::Disable | Transition::CancelDeletion => (KeyState::Disabled, None),
            Transition::ScheduleDeletion(at) => (KeyState::PendingDeletion, Some(at)),
        }
    }

    fn allowed_from(self, current: KeyState) -> bool {
        match self {
            Transition::CancelDeletion => current == KeyState::PendingDeletion,
            _ => current != KeyState::PendingDeletion,
        }
    }

    fn refusal(self, id: KeyId, current: KeyState) -> String {
        match (self, current) {
            (Transition::CancelDeletion, _) => format!("key {id} is not pending deletion"),
            (Transition::ScheduleDeletion(_), _) => {
                format!("key {id} is already pending deletion")
            }
            _ => format!("key {id} is pending deletion; cancel the deletion first"),
        }
    }
}

fn resolve(state: &State, key_ref: &str) -> Result<KeyId, KmsError> {
    let alias = key_ref
        .strip_prefix("arn:cloister:kms:local:")
        .filter(|r| r.starts_with("alias/"))
        .unwrap_or(key_ref);
    if alias.starts_with("alias/") {
        return state
            .aliases
            .get(alias)
            .copied()
            .ok_or_else(|| error::not_found(format!("alias {alias} does not exist")));
    }
    let id = key_ref
        .strip_prefix("arn:cloister:kms:local:key/")
        .unwrap_or(key_ref);
    KeyId::parse(id).ok_or_else(|| {
        error::validation(format!(
            "{key_ref:?} is not a key id, key ARN, alias name or alias ARN"
        ))
    })
}

fn load(tx: &mut Tx<'_>, root: &RootKey) -> Result<State, KmsError> {
    let mut state = State::default();
    let keys = tx.query(
        "SELECT key_id, description, state, created_ms, deletion_ms, policy, rotation_days, next_rotation_ms FROM keys",
        &[],
    )?;
    for r in keys {
        let id = key_id(r.blob(0)?)?;
        let key_state = KeyState::parse(&r.text(2)?)
            .ok_or_else(|| error::internal("keystore: malformed key state"))?;
        let policy_json = r.text(5)?;
        let policy = Policy::parse(&policy_json, PolicyKind::Key).map_err(|e| {
            error::internal(format!("keystore: stored policy of {id} is invalid: {e}"))
        })?;
        let rotation = match r.opt_int(6)?.zip(r.opt_int(7)?) {
            Some((days, next)) => Some(Rotation {
                period_days: u32::try_from(days)
                    .map_err(|_| error::internal("keystore: malformed rotation period"))?,
                next_ms: next as u64,
            }),
            None => None,
        };
        state.keys.insert(
            id,
            KeyRecord {
                id,
                description: r.text(1)?,
                state: key_state,
                created_ms: r.int(3)? as u64,
                deletion_ms: r.opt_int(4)?.map(|d| d as u64),
                policy_json,
                policy,
                versions: Vec::new(),
                rotation,
            },
        );
    }
    let versions = tx.query(
        "SELECT key_id, version, material FROM key_versions ORDER BY key_id, version",
        &[],
    )?;
    for r in versions {
        let id = key_id(r.blob(0)?)?;
        let version = u32::try_from(r.int(1)?)
            .map_err(|_| error::internal("keystore: malformed key version"))?;
        let sealed = r.blob(2)?;
        let key = state
            .keys
            .get_mut(&id)
            .ok_or_else(|| error::internal("keystore: version without key"))?;
        if version != key.current_version() + 1 {
            return Err(error::internal(format!(
                "keystore: key {id} is missing version {}",
                key.current_version() + 1
            )));
        }
        let plain = root
            .open(&material_aad(id, version), &sealed)
            .ok_or_else(|| {
                error::internal(format!(
                    "keystore: material of {id} v{version} does not decrypt"
                ))
            })?;
        let material: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| error::internal("keystore: material is not 32 bytes"))?;
        key.versions.push(zeroize::Zeroizing::new(material));
    }
    if let Some(k) = state.keys.values().find(|k| k.versions.is_empty()) {
        return Err(error::internal(format!(
            "keystore: key {} has no material",
            k.id
        )));
    }
    for r in tx.query("SELECT alias, key_id FROM aliases", &[])? {
        state.aliases.insert(r.text(0)?, key_id(r.blob(1)?)?);
    }
    for r in tx.query(
        "SELECT name, public_key, policy, created_ms FROM principals",
        &[],
    )? {
        let name = r.text(0)?;
        let pk: [u8; 32] = r
            .blob(1)?
            .try_into()
            .map_err(|_| error::internal("keystore: malformed public key"))?;
        let public_key = VerifyingKey::from_bytes(&pk)
            .map_err(|_| error::internal("keystore: malformed public key"))?;
        let policy_json = r.text(2)?;
        let policy = Policy::parse(&policy_json, PolicyKind::Identity).map_err(|e| {
            error::internal(format!("keystore: stored policy of {name} is invalid: {e}"))
        })?;
        state.principals.insert(
            name.clone(),
            PrincipalRecord {
                name,
                public_key,
                policy_json,
                policy,
                created_ms: r.int(3)? as u64,
            },
        );
    }
    for r in tx.query("SELECT label, der FROM trust_roots", &[])? {
        state.trust_roots.insert(r.text(0)?, r.blob(1)?);
    }
    for r in tx.query(
        "SELECT access_key_id, principal, secret, created_ms FROM access_keys",
        &[],
    )? {
        let access_key_id = r.text(0)?;
        let secret = root
            .open(&access_key_aad(&access_key_id), &r.blob(2)?)
            .and_then(|plain| String::from_utf8(plain.to_vec()).ok())
            .ok_or_else(|| {
                error::internal(format!(
                    "keystore: the secret of access key {access_key_id} does not decrypt"
                ))
            })?;
        state.access_keys.insert(
            access_key_id.clone(),
            AccessKeyRecord {
                access_key_id,
                principal: r.text(1)?,
                secret: Zeroizing::new(secret),
                created_ms: r.int(3)? as u64,
            },
        );
    }
    Ok(state)
}
