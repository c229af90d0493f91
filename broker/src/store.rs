//! Where a broker keeps what must survive it: embedded SQLite (one broker, the
//! default) or PostgreSQL (several broker replicas sharing one keystore, one
//! audit chain and one replay guard).
//!
//! The keystore's statements are written once, with PostgreSQL's `$1, $2...`
//! placeholders (turned into SQLite's `?1, ?2...`), over a few value types
//! (integers, text, bytes, NULL) that both engines store alike. What differs
//! stays here: the schema and its migrations (`migrations/sqlite`,
//! `migrations/postgres`), how a transaction begins, and the row lock a
//! read-then-write takes (`FOR UPDATE` on PostgreSQL; SQLite's writer lock
//! already covers the whole transaction).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::crypto::KeyId;
use crate::error::{self, KmsError};

/// SQLite's schema migrations, in order: the schema version is the number applied.
const SQLITE_MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_initial.sql"),
    include_str!("../migrations/sqlite/0002_access_keys_rotation.sql"),
    include_str!("../migrations/sqlite/0003_row_macs.sql"),
];
/// PostgreSQL's schema migrations, in order.
const POSTGRES_MIGRATIONS: &[&str] = &[
    include_str!("../migrations/postgres/0001_initial.sql"),
    include_str!("../migrations/postgres/0002_row_macs.sql"),
];

/// A column value, as both engines store it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v as i64)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}
impl From<&Vec<u8>> for Value {
    fn from(v: &Vec<u8>) -> Self {
        Value::Blob(v.clone())
    }
}
impl From<KeyId> for Value {
    fn from(v: KeyId) -> Self {
        Value::Blob(v.0.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Statement parameters: `params![a, b]` is `&[Value::from(a), Value::from(b)]`.
#[macro_export]
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::store::Value::from($v)),*][..] };
}

/// A row read.
#[derive(Debug)]
pub struct Row(Vec<Value>);

fn malformed(i: usize, want: &str, got: &Value) -> KmsError {
    error::internal(format!(
        "keystore: column {i} holds {got:?} where {want} belongs"
    ))
}

impl Row {
    /// The row's values, in the order selected.
    pub fn values(&self) -> &[Value] {
        &self.0
    }
    fn value(&self, i: usize) -> &Value {
        self.0.get(i).unwrap_or(&Value::Null)
    }
    pub fn int(&self, i: usize) -> Result<i64, KmsError> {
        self.opt_int(i)?
            .ok_or_else(|| malformed(i, "an integer", &Value::Null))
    }
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, KmsError> {
        match self.value(i) {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            other => Err(malformed(i, "an integer", other)),
        }
    }
    pub fn text(&self, i: usize) -> Result<String, KmsError> {
        match self.value(i) {
            Value::Text(v) => Ok(v.clone()),
            other => Err(malformed(i, "text", other)),
        }
    }
    pub fn blob(&self, i: usize) -> Result<Vec<u8>, KmsError> {
        match self.value(i) {
            Value::Blob(v) => Ok(v.clone()),
            other => Err(malformed(i, "bytes", other)),
        }
    }
}

/// Where the store is: `postgres://...` / `postgresql://...`, or a SQLite file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    /// A connection URL and, for TLS, the CA certificates (PEM) that issued
    /// the server's certificate.
    Postgres {
        url: String,
        ca: Option<PathBuf>,
    },
}

impl Location {
    /// A `--store` argument: a PostgreSQL connection URL, or a SQLite file
    /// path (optionally as `sqlite:PATH`).
    pub fn parse(s: &str) -> Result<Self, KmsError> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            s.parse::<postgres::Config>().map_err(|e| {
                error::validation(format!(
                    "--store: not a PostgreSQL connection URL ({e}); expected postgres://USER@HOST:PORT/DB"
                ))
            })?;
            return Ok(Location::Postgres {
                url: s.to_owned(),
                ca: None,
            });
        }
        let path = s.strip_prefix("sqlite:").unwrap_or(s);
        if path.is_empty() || s.contains("://") {
            return Err(error::validation(format!(
                "--store {s:?}: expected postgres://USER@HOST:PORT/DB or a SQLite file path"
            )));
        }
        Ok(Location::Sqlite(PathBuf::from(path)))
    }

    /// The location without a password (in the user part or as a
    /// `password=` parameter), to print or record.
    pub fn redacted(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres { url, .. } => redact_url(url),
        }
    }
}

fn redact_url(url: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((user, host)) => {
                let user = user.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}@{host}")
            }
            None => base.to_owned(),
        },
        None => base.to_owned(),
    };
    let params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.to_ascii_lowercase().starts_with("password="))
        .collect();
    if params.is_empty() {
        base
    } else {
        format!("{base}?{}", params.join("&"))
    }
}

/// The store: one SQLite connection (writes serialize on it), or a pool of
/// PostgreSQL connections.
pub struct Store {
    backend: Backend,
}

enum Backend {
    Sqlite(Mutex<rusqlite::Connection>),
    /// The second pool's sessions commit without waiting for the flush (see
    /// [`Store::query_relaxed`]).
    Postgres {
        pool: Box<PgPool>,
        relaxed: Box<PgPool>,
    },
}

fn sqlite_err(e: rusqlite::Error) -> KmsError {
    error::internal(format!("keystore: {e}"))
}

fn pg_err(e: postgres::Error) -> KmsError {
    if let Some(db) = e.as_db_error() {
        if db.code() == &postgres::error::SqlState::UNIQUE_VIOLATION {
            return error::already_exists(format!(
                "another broker replica made it meanwhile ({})",
                db.message()
            ));
        }
        return error::internal(format!("keystore (PostgreSQL): {}", db.message()));
    }
    error::internal(format!("keystore (PostgreSQL): {e}"))
}

fn open_sqlite(path: &Path) -> Result<rusqlite::Connection, KmsError> {
    // Created owner-only: SQLite gives its -wal and -shm files the database
    // file's mode, so they are owner-only too.
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| error::internal(format!("keystore {}: {e}", path.display())))?;
    let conn = rusqlite::Connection::open(path).map_err(sqlite_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sqlite_err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sqlite_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(sqlite_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sqlite_err)?;
    Ok(conn)
}

impl Store {
    /// Connects to a store that may not hold a keystore yet.
    pub fn connect(location: &Location) -> Result<Self, KmsError> {
        let backend = match location {
            Location::Sqlite(path) => Backend::Sqlite(Mutex::new(open_sqlite(path)?)),
            Location::Postgres { url, ca } => {
                let connector = Connector::new(url, ca.as_deref())?;
                let pool = Box::new(PgPool::new(url, connector.clone(), false)?);
                // Connect now, so that a wrong URL fails here with its reason.
                drop(pool.get()?);
                Backend::Postgres {
                    pool,
                    relaxed: Box::new(PgPool::new(url, connector, true)?),
                }
            }
        };
        Ok(Store { backend })
    }

    /// Whether several brokers may share this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres { .. })
    }

    fn migrations(&self) -> &'static [&'static str] {
        match self.backend {
            Backend::Sqlite(_) => SQLITE_MIGRATIONS,
            Backend::Postgres { .. } => POSTGRES_MIGRATIONS,
        }
    }

    /// The first schema version whose rows carry MACs (see `keystore`).
    pub fn row_macs_since(&self) -> i64 {
        match self.backend {
            Backend::Sqlite(_) => 3,
            Backend::Postgres { .. } => 2,
        }
    }

    /// The schema version this broker writes.
    pub fn latest_version(&self) -> i64 {
        self.migrations().len() as i64
    }

    /// A connection: SQLite's one (locked), or one from the pool (`relaxed`:
    /// the relaxed pool's).
    fn conn(&self, relaxed: bool) -> Result<Conn<'_>, KmsError> {
        Ok(match &self.backend {
            Backend::Sqlite(c) => Conn::Sqlite(
                c.lock()
                    .map_err(|_| error::internal("keystore lock poisoned"))?,
            ),
            Backend::Postgres { pool, relaxed: r } => {
                Conn::Postgres(if relaxed { r.get()? } else { pool.get()? })
            }
        })
    }

    /// Runs `f` on a connection; if it fails because that connection was found
    /// closed (PostgreSQL restarted or failed over since it was pooled), once
    /// more on a new one. Returns the connection with the result.
    fn on_conn<T>(
        &self,
        relaxed: bool,
        mut f: impl FnMut(&mut Conn<'_>) -> Result<T, KmsError>,
    ) -> Result<(Conn<'_>, T), KmsError> {
        let mut conn = self.conn(relaxed)?;
        match f(&mut conn) {
            Ok(v) => Ok((conn, v)),
            Err(_) if conn.is_closed() => {
                drop(conn);
                let mut conn = self.conn(relaxed)?;
                let v = f(&mut conn)?;
                Ok((conn, v))
            }
            Err(e) => Err(e),
        }
    }

    /// Begins a transaction: SQLite takes its writer lock at once (`BEGIN
    /// IMMEDIATE`); PostgreSQL reads committed data and locks rows as the
    /// statements ([`Tx::for_update`]) say.
    pub fn begin(&self) -> Result<Tx<'_>, KmsError> {
        let (conn, ()) = self.on_conn(false, |c| c.batch("BEGIN IMMEDIATE", "BEGIN"))?;
        Ok(Tx { conn, open: true })
    }

    /// Begins a read-only transaction that sees one snapshot throughout
    /// (PostgreSQL's READ COMMITTED would give each statement its own, and a
    /// copy read over several statements could mix two generations).
    pub fn begin_snapshot(&self) -> Result<Tx<'_>, KmsError> {
        let (conn, ()) = self.on_conn(false, |c| {
            c.batch(
                "BEGIN DEFERRED",
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            )
        })?;
        Ok(Tx { conn, open: true })
    }

    /// Runs one statement in a transaction of its own.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, KmsError> {
        let mut tx = self.begin()?;
        let n = tx.execute(sql, params)?;
        tx.commit()?;
        Ok(n)
    }

    /// Reads rows outside a transaction.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, KmsError> {
        Ok(self.on_conn(false, |c| c.query(sql, params))?.1)
    }

    /// The integer in the first column of the first row (an error when there is none).
    pub fn query_int(&self, sql: &str, params: &[Value]) -> Result<i64, KmsError> {
        first_int(self.query(sql, params)?, sql)
    }

    /// As [`Store::query`], for a statement that writes, committed without
    /// waiting for PostgreSQL to flush it (`synchronous_commit = off`): only
    /// for writes that a later flushed commit of the same request covers.
    ///
    /// Retried on a new connection if its pooled one was found closed: a
    /// claim that did commit then reads as a replay (refused, never twice
    /// accepted).
    pub fn query_relaxed(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, KmsError> {
        Ok(self.on_conn(true, |c| c.query(sql, params))?.1)
    }

    /// Whether a keystore was made here (its `meta` table holds a schema version).
    pub fn schema_version(&self) -> Result<Option<i64>, KmsError> {
        let exists = match &self.backend {
            Backend::Sqlite(_) => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            }
            Backend::Postgres { .. } => {
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = 'meta'"
            }
        };
        if self.query_int(exists, &[])? != 1 {
            return Ok(None);
        }
        let rows = self.query("SELECT value FROM meta WHERE name = 'schema_version'", &[])?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        // SQLite stores it as an integer; PostgreSQL's meta holds bytes (its digits).
        match row.value(0) {
            Value::Int(v) => Ok(Some(*v)),
            Value::Blob(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .map(Some)
                .ok_or_else(|| error::internal("keystore: malformed schema version")),
            other => Err(malformed(0, "the schema version", other)),
        }
    }

    /// Creates the schema (every migration) in `tx`, recording its version.
    pub fn create_schema(&self, tx: &mut Tx<'_>) -> Result<(), KmsError> {
        self.migrate(tx, 0)
    }

    /// Applies the migrations after `from` in `tx` and records the new version.
    pub fn migrate(&self, tx: &mut Tx<'_>, from: i64) -> Result<(), KmsError> {
        for m in &self.migrations()[from as usize..] {
            tx.conn.batch(m, m)?;
        }
        let version = self.latest_version();
        let value = match self.backend {
            Backend::Sqlite(_) => Value::Int(version),
            Backend::Postgres { .. } => Value::Blob(version.to_string().into_bytes()),
        };
        let sql = if from == 0 {
            "INSERT INTO meta (name, value) VALUES ('schema_version', $1)"
        } else {
            "UPDATE meta SET value = $1 WHERE name = 'schema_version'"
        };
        tx.execute(sql, &[value])?;
        Ok(())
    }

    /// Whether the store answers a query (readiness).
    pub fn ping(&self) -> Result<(), KmsError> {
        self.query_int("SELECT 1", &[]).map(|_| ())
    }

    /// SQLite's integrity check, or PostgreSQL's answer to a query.
    pub fn check(&self) -> Result<String, KmsError> {
        match &self.backend {
            Backend::Sqlite(_) => self.query("PRAGMA integrity_check", &[])?[0].text(0),
            Backend::Postgres { .. } => {
                self.query("SELECT 'ok'::text", &[])?;
                Ok("ok".into())
            }
        }
    }
}

fn first_int(rows: Vec<Row>, sql: &str) -> Result<i64, KmsError> {
    rows.first()
        .ok_or_else(|| error::internal(format!("keystore: no row for {sql:?}")))?
        .int(0)
}

/// A transaction; dropped without [`Tx::commit`], it rolls back.
pub struct Tx<'a> {
    conn: Conn<'a>,
    open: bool,
}

impl Tx<'_> {
    pub fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, KmsError> {
        self.conn.execute(sql, params)
    }
    pub fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, KmsError> {
        self.conn.query(sql, params)
    }
    /// The first row, if any.
    pub fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, KmsError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
    /// The integer in the first column of the first row (an error when there is none).
    pub fn query_int(&mut self, sql: &str, params: &[Value]) -> Result<i64, KmsError> {
        first_int(self.query(sql, params)?, sql)
    }
    /// What a SELECT whose answer decides a write ends with: PostgreSQL locks
    /// the rows read until the commit (another replica's change waits), SQLite
    /// holds its writer lock already.
    pub fn for_update(&self) -> &'static str {
        match self.conn {
            Conn::Sqlite(_) => "",
            Conn::Postgres(_) => " FOR UPDATE",
        }
    }
    pub fn is_postgres(&self) -> bool {
        matches!(self.conn, Conn::Postgres(_))
    }
    pub fn commit(mut self) -> Result<(), KmsError> {
        // A COMMIT that fails leaves the transaction to the rollback on drop.
        self.conn.batch("COMMIT", "COMMIT")?;
        self.open = false;
        Ok(())
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open && self.conn.batch("ROLLBACK", "ROLLBACK").is_err() {
            // A connection that could not roll back is not reused.
            if let Conn::Postgres(c) = &mut self.conn {
                c.broken = true;
            }
        }
    }
}

enum Conn<'a> {
    Sqlite(MutexGuard<'a, rusqlite::Connection>),
    Postgres(PgConn<'a>),
}

/// `$1` → `?1`: SQLite's numbered parameters. Only a `$` followed by a digit
/// and outside a quoted literal or identifier is a parameter.
fn sqlite_sql(sql: &str) -> Cow<'_, str> {
    if !sql.contains('$') {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut quote = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '$') if chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('?');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    Cow::Owned(out)
}

impl Conn<'_> {
    fn is_closed(&self) -> bool {
        match self {
            Conn::Sqlite(_) => false,
            Conn::Postgres(c) => c.client.as_ref().is_none_or(|c| c.client.is_closed()),
        }
    }

    fn batch(&mut self, sqlite: &str, postgres: &str) -> Result<(), KmsError> {
        match self {
            Conn::Sqlite(c) => c.execute_batch(sqlite).map_err(sqlite_err),
            Conn::Postgres(c) => c.client()?.batch_execute(postgres).map_err(pg_err),
        }
    }

    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, KmsError> {
        match self {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(&sqlite_sql(sql)).map_err(sqlite_err)?;
                let n = stmt
                    .execute(rusqlite::params_from_iter(params.iter().map(sqlite_value)))
                    .map_err(sqlite_err)?;
                Ok(n as u64)
            }
            Conn::Postgres(c) => {
                let stmt = c.prepare(sql)?;
                let client = c.client()?;
                client.execute(&stmt, &pg_params(params)).map_err(pg_err)
            }
        }
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, KmsError> {
        match self {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(&sqlite_sql(sql)).map_err(sqlite_err)?;
                let columns = stmt.column_count();
                let mut rows = stmt
                    .query(rusqlite::params_from_iter(params.iter().map(sqlite_value)))
                    .map_err(sqlite_err)?;
                let mut out = Vec::new();
                while let Some(r) = rows.next().map_err(sqlite_err)? {
                    let mut row = Vec::with_capacity(columns);
                    for i in 0..columns {
                        row.push(match r.get_ref(i).map_err(sqlite_err)? {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(v) => Value::Int(v),
                            rusqlite::types::ValueRef::Text(t) => {
                                Value::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                            rusqlite::types::ValueRef::Real(_) => {
                                return Err(error::internal("keystore: unexpected REAL value"));
                            }
                        });
                    }
                    out.push(Row(row));
                }
                Ok(out)
            }
            Conn::Postgres(c) => {
                let stmt = c.prepare(sql)?;
                let rows = c
                    .client()?
                    .query(&stmt, &pg_params(params))
                    .map_err(pg_err)?;
                rows.iter().map(pg_row).collect()
            }
        }
    }
}

fn sqlite_value(v: &Value) -> rusqlite::types::Value {
    match v {
        Value::Null => rusqlite::types::Value::Null,
        Value::Int(i) => rusqlite::types::Value::Integer(*i),
        Value::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Value::Blob(b) => rusqlite::types::Value::Blob(b.clone()),
    }
}

fn pg_params(params: &[Value]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| p as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

fn pg_row(r: &postgres::Row) -> Result<Row, KmsError> {
    use postgres::types::Type;
    let mut row = Vec::with_capacity(r.len());
    for (i, column) in r.columns().iter().enumerate() {
        let ty = column.type_();
        let v = if *ty == Type::INT8 {
            r.try_get::<_, Option<i64>>(i).map(|v| v.map(Value::Int))
        } else if *ty == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)
                .map(|v| v.map(|v| Value::Int(v.into())))
        } else if *ty == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)
                .map(|v| v.map(|v| Value::Int(v.into())))
        } else if *ty == Type::BOOL {
            r.try_get::<_, Option<bool>>(i)
                .map(|v| v.map(|v| Value::Int(v.into())))
        } else if *ty == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(i)
                .map(|v| v.map(Value::Blob))
        } else {
            r.try_get::<_, Option<String>>(i)
                .map(|v| v.map(Value::Text))
        }
        .map_err(pg_err)?;
        row.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(row))
}

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        match self {
            Value::Null => Ok(postgres::types::IsNull::Yes),
            Value::Int(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            Value::Int(v) if *ty == Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
            Value::Int(v) => v.to_sql(ty, out),
            Value::Text(v) => v.to_sql(ty, out),
            Value::Blob(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// How the replicas reach PostgreSQL: TLS (rustls, TLS 1.3, the server's
/// certificate checked against the given CA and the URL's host name), or in
/// the clear — which only a loopback or Unix-socket host, or a URL that says
/// `sslmode=disable`, is allowed.
#[derive(Clone)]
enum Connector {
    Plain,
    Tls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Connector {
    fn new(url: &str, ca: Option<&Path>) -> Result<Self, KmsError> {
        use postgres::config::{Host, SslMode};
        let config: postgres::Config = url
            .parse()
            .map_err(|e| error::validation(format!("--store: {e}")))?;
        let said_disable = config.get_ssl_mode() == SslMode::Disable;
        if let Some(ca) = ca {
            if said_disable {
                return Err(error::validation(
                    "--store says sslmode=disable but a CA for TLS to PostgreSQL is given",
                ));
            }
            // Only the host name is checked against the certificate; the
            // CA file alone decides whom to trust.
            let tls = cloister_kms_api::tls::ClientTls::new(ca, "localhost")?;
            return Ok(Connector::Tls(
                tokio_postgres_rustls::MakeRustlsConnect::new((*tls.config).clone()),
            ));
        }
        let local = |h: &Host| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        };
        if let Some(far) = config.get_hosts().iter().find(|h| !local(h))
            && !said_disable
        {
            return Err(error::validation(format!(
                "PostgreSQL at {far:?} is reached over the network: give the CA that issued its certificate (--store-ca) for TLS, or say sslmode=disable in the URL to send keystore traffic in the clear"
            )));
        }
        if config.get_ssl_mode() == SslMode::Require {
            return Err(error::validation(
                "--store says sslmode=require: give the CA that issued the server's certificate (--store-ca)",
            ));
        }
        Ok(Connector::Plain)
    }
}

/// PostgreSQL connections, reused, at most `max` open at once (a request
/// waits up to [`PG_WAIT`] for one); each keeps its prepared statements.
struct PgPool {
    config: postgres::Config,
    connector: Connector,
    relaxed: bool,
    max: usize,
    state: Mutex<PoolState>,
    returned: std::sync::Condvar,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<PgClient>,
    /// Connections open: idle or taken.
    open: usize,
}

struct PgClient {
    client: postgres::Client,
    statements: HashMap<String, postgres::Statement>,
}

/// A connection taken from the pool; it goes back when dropped, unless broken.
struct PgConn<'a> {
    pool: &'a PgPool,
    client: Option<Box<PgClient>>,
    broken: bool,
}

/// Connections per replica: the main pool's and the relaxed pool's (three
/// replicas fit PostgreSQL's default `max_connections` of 100).
const PG_MAX: usize = 20;
const PG_MAX_RELAXED: usize = 8;
/// How long a request waits for a connection when all are taken.
const PG_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl PgPool {
    fn new(url: &str, connector: Connector, relaxed: bool) -> Result<Self, KmsError> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| error::validation(format!("--store: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(5));
        }
        config.application_name("cloister-kms");
        if matches!(connector, Connector::Tls(_)) {
            config.ssl_mode(postgres::config::SslMode::Require);
        }
        Ok(PgPool {
            config,
            connector,
            relaxed,
            max: if relaxed { PG_MAX_RELAXED } else { PG_MAX },
            state: Mutex::new(PoolState::default()),
            returned: std::sync::Condvar::new(),
        })
    }

    fn get(&self) -> Result<PgConn<'_>, KmsError> {
        fn poisoned<T>(_: T) -> KmsError {
            error::internal("keystore: connection pool poisoned")
        }
        let deadline = std::time::Instant::now() + PG_WAIT;
        let mut state = self.state.lock().map_err(poisoned)?;
        loop {
            while let Some(c) = state.idle.pop() {
                if !c.client.is_closed() {
                    return Ok(self.conn(c));
                }
                state.open -= 1;
            }
            if state.open < self.max {
                state.open += 1;
                break;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(error::internal(format!(
                    "all {} connections to PostgreSQL stayed busy for {} s",
                    self.max,
                    PG_WAIT.as_secs()
                )));
            }
            state = self.returned.wait_timeout(state, left).map_err(poisoned)?.0;
        }
        drop(state);
        match self.connect() {
            Ok(c) => Ok(self.conn(c)),
            Err(e) => {
                self.release();
                Err(e)
            }
        }
    }

    fn conn(&self, client: PgClient) -> PgConn<'_> {
        PgConn {
            pool: self,
            client: Some(Box::new(client)),
            broken: false,
        }
    }

    fn connect(&self) -> Result<PgClient, KmsError> {
        let connected = match &self.connector {
            Connector::Plain => self.config.connect(postgres::NoTls),
            Connector::Tls(tls) => self.config.connect(tls.clone()),
        };
        let mut client = connected.map_err(|e| {
            // The TLS failure's reason is in the error's source.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why = format!("{why}: {s}");
                source = s.source();
            }
            error::internal(format!("cannot reach PostgreSQL: {why}"))
        })?;
        // Commits wait for the flush (whatever the server's default), but
        // the relaxed pool's (see `Store::query_relaxed`).
        client
            .batch_execute(if self.relaxed {
                "SET synchronous_commit TO off"
            } else {
                "SET synchronous_commit TO on"
            })
            .map_err(pg_err)?;
        Ok(PgClient {
            client,
            statements: HashMap::new(),
        })
    }

    /// A taken connection is gone (broken or closed): another may open.
    fn release(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.open -= 1;
        }
        self.returned.notify_one();
    }
}

impl PgConn<'_> {
    fn client(&mut self) -> Result<&mut postgres::Client, KmsError> {
        self.client
            .as_mut()
            .map(|c| &mut c.client)
            .ok_or_else(|| error::internal("keystore: connection already returned"))
    }

    fn prepare(&mut self, sql: &str) -> Result<postgres::Statement, KmsError> {
        let c = self
            .client
            .as_mut()
            .ok_or_else(|| error::internal("keystore: connection already returned"))?;
        if let Some(s) = c.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = c.client.prepare(sql).map_err(pg_err)?;
        c.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}

impl Drop for PgConn<'_> {
    fn drop(&mut self) {
        let Some(c) = self.client.take() else { return };
        if self.broken || c.client.is_closed() {
            self.pool.release();
            return;
        }
        if let Ok(mut state) = self.pool.state.lock() {
            state.idle.push(*c);
        }
        self.pool.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_hide_passwords() {
        let pg = Location::parse("postgres://kms:s3cret@db.internal:5432/keys").unwrap();
        assert_eq!(pg.redacted(), "postgres://kms@db.internal:5432/keys");
        let pg =
            Location::parse("postgres://db.internal/keys?user=kms&password=s3cret&sslmode=disable")
                .unwrap();
        assert_eq!(
            pg.redacted(),
            "postgres://db.internal/keys?user=kms&sslmode=disable"
        );
        assert_eq!(
            Location::parse("sqlite:/var/lib/kms/keystore.db").unwrap(),
            Location::Sqlite("/var/lib/kms/keystore.db".into())
        );
        assert_eq!(
            Location::parse("keystore.db").unwrap(),
            Location::Sqlite("keystore.db".into())
        );
        // In the clear only to loopback, a Unix socket, or when the URL says so.
        for plain in [
            "postgres://kms@127.0.0.1:5432/keys",
            "postgres://kms@localhost/keys",
            "postgres://kms@[::1]:5432/keys",
            "postgres://kms@db.internal/keys?sslmode=disable",
        ] {
            assert!(
                matches!(Connector::new(plain, None), Ok(Connector::Plain)),
                "{plain}"
            );
        }
        for far in [
            "postgres://kms@db.internal:5432/keys",
            "postgres://kms@10.0.0.7/keys",
            "postgres://kms@localhost/keys?sslmode=require",
        ] {
            let e = Connector::new(far, None).err().unwrap();
            assert!(e.message.contains("--store-ca"), "{far}: {e}");
        }
        for bad in ["", "sqlite:", "mysql://x/y", "postgres://a:b@h:notaport/db"] {
            let e = Location::parse(bad).unwrap_err();
            assert_eq!(e.kind, crate::ErrorKind::ValidationException, "{bad}");
        }
    }

    #[test]
    fn only_numbered_dollars_outside_quotes_become_parameters() {
        assert_eq!(
            sqlite_sql("SELECT '$1', \"a$2\", $3, price$ FROM t WHERE x = $10"),
            "SELECT '$1', \"a$2\", ?3, price$ FROM t WHERE x = ?10"
        );
        assert!(matches!(sqlite_sql("SELECT 1"), Cow::Borrowed(_)));
    }

    #[test]
    fn sqlite_statements_use_numbered_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&Location::Sqlite(dir.path().join("t.db"))).unwrap();
        assert_eq!(store.schema_version().unwrap(), None);
        store
            .execute("CREATE TABLE t (a INTEGER, b TEXT, c BLOB)", &[])
            .unwrap();
        // Parameters out of order in the text: bound by number, not position.
        store
            .execute(
                "INSERT INTO t (b, a, c) VALUES ($2, $1, $3)",
                params![7i64, "seven", &b"\x07"[..]],
            )
            .unwrap();
        let rows = store
            .query("SELECT a, b, c, NULL FROM t WHERE a = $1", params![7i64])
            .unwrap();
        assert_eq!(rows[0].int(0).unwrap(), 7);
        assert_eq!(rows[0].text(1).unwrap(), "seven");
        assert_eq!(rows[0].blob(2).unwrap(), b"\x07");
        assert_eq!(rows[0].opt_int(3).unwrap(), None);
        assert!(rows[0].text(0).is_err(), "an integer is not text");
        // A transaction dropped without commit leaves nothing.
        {
            let mut tx = store.begin().unwrap();
            tx.execute("DELETE FROM t", &[]).unwrap();
        }
        assert_eq!(store.query("SELECT a FROM t", &[]).unwrap().len(), 1);
    }
}
