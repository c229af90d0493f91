//! The audit log (CloudTrail analog): one JSON line per request, append-only,
//! hash-chained, fsynced before the response is sent, with signed checkpoints.
//!
//! Each line carries `seq` (1, 2, ...) and `prev`, the SHA-256 (hex) of the
//! previous line's bytes (64 zeros for the first). Checkpoint lines carry an
//! Ed25519 signature by the broker's key over
//! `"cloister-audit-checkpoint-v1\0" || seq (u64 BE) || prev (32 bytes)`.
//! The writer records the head (seq and hash of a line already on disk, signed
//! by the broker) in one of two fixed slots of a head file beside the log, so
//! that truncation — which a hash chain alone cannot see — is detected too.
//! A log with records but no head is refused. A newest slot torn by a crash falls
//! back to the previous one.
//!
//! Writes are group-committed: one writer thread takes every record waiting,
//! writes them, fsyncs once and then answers all their requests. The head is
//! written at most every [`HEAD_LAG`] (an fsync costs a virtual machine far
//! more CPU than the records it makes durable): with a batch, it names the
//! previous batch's end, which that batch's fsync made durable, so the two
//! fdatasyncs (log and head) run at once and a request waits for one fsync's
//! time, never for two in a row; when no batch follows within `HEAD_LAG` (and
//! at shutdown) the head catches up with the log's end. So a head never names
//! a line that a crash could lose, and at most the records of the last
//! `HEAD_LAG` (and the batch after it) rely on the checkpoints alone.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc;

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{self, KmsError};
use crate::store::{Store, Tx};

const CHECKPOINT_LABEL: &[u8] = b"cloister-audit-checkpoint-v1\0";
/// How often the head is written, at most, and how long it may lag the log.
pub const HEAD_LAG: std::time::Duration = std::time::Duration::from_millis(20);
const HEAD_LABEL: &[u8] = b"cloister-audit-head-v1\0";
const CHECKPOINT_EVERY: u64 = 1000;
/// The live file's size at which it is rotated.
pub const ROTATE_BYTES: u64 = 64 * 1024 * 1024;
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The outcome a record reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Allow,
    #[default]
    Deny,
    Error,
}

/// What a request contributes to its audit line. Each text is cut to a few
/// hundred bytes when recorded (see [`RequestRecord::bounded`]): a record's
/// size does not depend on what an unauthenticated sender puts in a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The request's signature verified with the principal's key, and its id
    /// was fresh: this principal did send this request id (so the id is one
    /// the replay guard remembers across restarts).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub authenticated: bool,
    pub request_id: String,
    pub principal: String,
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key_id: Option<String>,
    pub decision: Decision,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recipient_pcr0: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recipient_module_id: Option<String>,
    /// The SigV4 access key a request of the AWS API was signed with (none:
    /// Cloister's own protocol, signed with the principal's Ed25519 key).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub access_key_id: Option<String>,
}

/// A request id the log shows a principal used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedRequestId {
    pub principal: String,
    pub request_id: String,
    /// When it was recorded (Unix ms).
    pub recorded_ms: u64,
}

/// The request ids of authenticated requests recorded at or after `since_ms`,
/// read from the log's end backwards (never the whole log): what the replay
/// guard must remember across a restart. Lines are in order of their
/// records' times, give or take a batch; reading stops at the first line a
/// minute older than `since_ms`.
pub fn used_request_ids(path: &Path, since_ms: u64) -> Result<Vec<UsedRequestId>, KmsError> {
    let stop_before = since_ms.saturating_sub(60_000);
    let mut used = Vec::new();
    let mut lines = Backward::new(log_files(path)?);
    while let Some(bytes) = lines.next_line()? {
        let Ok(line) = serde_json::from_slice::<Line>(&bytes) else {
            continue;
        };
        let Some(ms) = unix_ms_of(&line.time) else {
            continue;
        };
        if ms < stop_before {
            break;
        }
        if let Some(r) = line.request
            && r.authenticated
            && ms >= since_ms
        {
            used.push(UsedRequestId {
                principal: r.principal,
                request_id: r.request_id,
                recorded_ms: ms,
            });
        }
    }
    Ok(used)
}

/// The last `n` lines of a log (across its segments), oldest first.
pub fn tail(path: &Path, n: usize) -> Result<Vec<String>, KmsError> {
    let files = log_files(path)?;
    if files.is_empty() {
        return Err(error::not_found(format!(
            "there is no audit log {}",
            path.display()
        )));
    }
    let mut lines = Backward::new(files);
    let mut out = Vec::new();
    while out.len() < n
        && let Some(line) = lines.next_line()?
    {
        out.push(String::from_utf8_lossy(&line).into_owned());
    }
    out.reverse();
    Ok(out)
}

/// The last `n` lines of a shared store's chain, oldest first.
pub fn tail_shared(store: &Store, n: usize) -> Result<Vec<String>, KmsError> {
    let mut lines = store
        .query(
            "SELECT line FROM audit_log ORDER BY seq DESC LIMIT $1",
            crate::params![n as u64],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<Vec<_>, _>>()?;
    lines.reverse();
    Ok(lines)
}

/// Where a rotation makes the next live file before renaming it into place.
fn next_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".next");
    path.with_file_name(name)
}

/// A rotated segment's path: `<live file>.<seq of its first line, 20 digits>`.
fn segment_path(path: &Path, first_seq: u64) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{first_seq:020}"));
    path.with_file_name(name)
}

/// A log's files, oldest first: its rotated segments, then the live file (if
/// it exists).
pub fn log_files(path: &Path) -> Result<Vec<std::path::PathBuf>, KmsError> {
    let io = |e: std::io::Error| error::internal(format!("audit log {}: {e}", path.display()));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!(
        "{}.",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut segments: Vec<(u64, std::path::PathBuf)> = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(io)?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(seq) = name.strip_prefix(&prefix)
                    && seq.len() == 20
                    && let Ok(seq) = seq.parse::<u64>()
                {
                    segments.push((seq, entry.path()));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    segments.sort();
    let mut files: Vec<_> = segments.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

/// The length of a file up to and including its last newline.
fn complete_length(file: &mut File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(i) = part.iter().rposition(|b| *b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// A log's lines from its end backwards, across its files (each line
/// without its newline), reading 64 KiB at a time.
struct Backward {
    /// Files not yet started, oldest first.
    files: Vec<std::path::PathBuf>,
    file: Option<(File, u64)>,
    /// The start of a line whose beginning is further back in the file.
    carry: Vec<u8>,
    ready: Vec<Vec<u8>>,
}

impl Backward {
    fn new(files: Vec<std::path::PathBuf>) -> Self {
        Backward {
            files,
            file: None,
            carry: Vec::new(),
            ready: Vec::new(),
        }
    }

    fn next_line(&mut self) -> Result<Option<Vec<u8>>, KmsError> {
        const CHUNK: u64 = 64 * 1024;
        let io = |e: std::io::Error| error::internal(format!("audit log: {e}"));
        loop {
            if let Some(line) = self.ready.pop() {
                return Ok(Some(line));
            }
            let (file, end) = match &mut self.file {
                Some(open) => open,
                None => {
                    let Some(path) = self.files.pop() else {
                        return Ok(None);
                    };
                    let f = File::open(&path).map_err(io)?;
                    let len = f.metadata().map_err(io)?.len();
                    self.carry.clear();
                    self.file.insert((f, len))
                }
            };
            let start = end.saturating_sub(CHUNK);
            let mut chunk = vec![0u8; (*end - start) as usize];
            file.seek(SeekFrom::Start(start)).map_err(io)?;
            file.read_exact(&mut chunk).map_err(io)?;
            chunk.append(&mut self.carry);
            *end = start;
            let mut pieces: Vec<Vec<u8>> =
                chunk.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
            if start > 0 {
                self.carry = pieces.remove(0);
            } else {
                self.file = None;
            }
            self.ready = pieces.into_iter().filter(|p| !p.is_empty()).collect();
        }
    }
}

fn unix_ms_of(rfc3339: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

impl RequestRecord {
    /// The record with each text cut to its cap (on a character boundary,
    /// marked with the original length).
    pub fn bounded(mut self) -> Self {
        // `max` bounds the text as JSON writes it (a control character takes
        // six bytes there), so the line's size is bounded, not just the string's.
        fn cut(s: &mut String, max: usize) {
            let width = |c: char| match c {
                '"' | '\\' => 2,
                c if (c as u32) < 0x20 => 6,
                c => c.len_utf8(),
            };
            if s.chars().map(width).sum::<usize>() <= max {
                return;
            }
            let mut used = 0;
            let end = s
                .char_indices()
                .find(|(_, c)| {
                    used += width(*c);
                    used > max
                })
                .map_or(s.len(), |(i, _)| i);
            let len = s.len();
            s.truncate(end);
            s.push_str(&format!("... ({len} bytes)"));
        }
        cut(&mut self.request_id, 96);
        cut(&mut self.principal, 256);
        cut(&mut self.action, 64);
        cut(&mut self.reason, 1024);
        for s in [
            &mut self.key_id,
            &mut self.recipient_pcr0,
            &mut self.recipient_module_id,
        ]
        .into_iter()
        .flatten()
        {
            cut(s, 256);
        }
        self
    }
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub seq: u64,
    /// `request`, `checkpoint`, `startup` or `shutdown`.
    #[serde(rename = "type")]
    pub kind: String,
    pub time: String,
    #[serde(flatten)]
    pub request: Option<RequestRecord>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub note: Option<String>,
    /// The broker replica that wrote the line (a shared store's log).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub replica: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signature: Option<String>,
    pub prev: String,
}

enum Job {
    Append(Line, Reply),
}

/// Where the writer answers: a thread waiting, or a task awaiting.
enum Reply {
    Blocking(mpsc::SyncSender<Result<u64, KmsError>>),
    Async(tokio::sync::oneshot::Sender<Result<u64, KmsError>>),
}

impl Reply {
    fn send(self, result: Result<u64, KmsError>) {
        match self {
            Reply::Blocking(tx) => {
                let _ = tx.send(result);
            }
            Reply::Async(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// The writer's handle. Cloning is cheap; all clones feed one writer thread.
#[derive(Clone)]
pub struct AuditLog {
    jobs: mpsc::Sender<Job>,
    /// A shared store's chain: changes of the keystore append to it in their
    /// own transaction.
    shared: Option<std::sync::Arc<SharedChain>>,
}

/// What appends to a chain in a shared store need: the key that signs its
/// checkpoints and head, and this replica's name.
struct SharedChain {
    signing_key: SigningKey,
    replica: String,
    /// The highest head this replica has read: a head below it means rows
    /// were removed or the database was restored from an older state.
    high_water: std::sync::atomic::AtomicU64,
}

fn now_rfc3339() -> String {
    cloister_attestation::verify::rfc3339(std::time::SystemTime::now())
}

fn line_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn checkpoint_message(seq: u64, prev: &str) -> Vec<u8> {
    signed_message(CHECKPOINT_LABEL, seq, prev)
}

fn signed_message(label: &[u8], seq: u64, prev: &str) -> Vec<u8> {
    let mut m = label.to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&hex::decode(prev).unwrap_or_default());
    m
}

/// Locks `<log>.lock` for the one process that may append to a log: a second
/// broker (or a command that writes to it) on the same data directory is
/// refused, instead of forking the chain.
fn lock_writer(path: &Path) -> Result<File, KmsError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    // A writer that is stopping (its last handle just dropped) lets go within
    // moments; one that serves does not.
    lock_file(
        &path.with_file_name(name),
        std::time::Duration::from_secs(2),
    )?
    .ok_or_else(|| {
        error::internal(format!(
            "another process (a broker serving this data directory?) is writing the audit log {}",
            path.display()
        ))
    })
}

/// Takes an exclusive lock on `path` (created 0600), waiting up to `wait`;
/// `None` if another holder kept it that long. The lock lasts as long as the file.
pub(crate) fn lock_file(path: &Path, wait: std::time::Duration) -> Result<Option<File>, KmsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let lock = OpenOptions::new()
        .mode(0o600)
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| error::internal(format!("{}: {e}", path.display())))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(Some(lock)),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(error::internal(format!("{}: {e}", path.display())));
            }
        }
    }
}

/// A line without its seq, prev and signature (the writer stamps them).
fn system_line(kind: &str) -> Line {
    Line {
        seq: 0,
        kind: kind.into(),
        time: now_rfc3339(),
        request: None,
        note: None,
        replica: None,
        signature: None,
        prev: String::new(),
    }
}

/// Stamps lines onto a chain whose end is (`next_seq` - 1, `prev`): each gets
/// its seq and prev, lines other than requests a signature, and a signed
/// checkpoint follows every [`CHECKPOINT_EVERY`]th line. `emit` receives each
/// line's seq and bytes in order. Returns the seq of the first given line.
fn stamp_lines(
    lines: Vec<Line>,
    next_seq: &mut u64,
    prev: &mut String,
    key: &SigningKey,
    replica: Option<&str>,
    mut emit: impl FnMut(u64, Vec<u8>),
) -> Result<u64, KmsError> {
    let first = *next_seq;
    let mut stamp = |mut line: Line, next_seq: &mut u64| -> Result<(), KmsError> {
        line.seq = *next_seq;
        line.prev = std::mem::take(prev);
        line.replica = replica.map(str::to_owned);
        if line.kind != "request" {
            let sig = key.sign(&checkpoint_message(line.seq, &line.prev));
            line.signature = Some(base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()));
        }
        let bytes =
            serde_json::to_vec(&line).map_err(|e| error::internal(format!("audit record: {e}")))?;
        *prev = line_hash(&bytes);
        *next_seq += 1;
        emit(line.seq, bytes);
        Ok(())
    };
    for line in lines {
        stamp(line, next_seq)?;
        if (*next_seq - 1).is_multiple_of(CHECKPOINT_EVERY) {
            stamp(system_line("checkpoint"), next_seq)?;
        }
    }
    Ok(first)
}

/// Where the writer thread puts batches: a log file or a shared store.
trait Sink: Send + 'static {
    /// Writes lines durably; returns the seq of the first.
    fn write_batch(&mut self, lines: Vec<Line>) -> Result<u64, KmsError>;
    /// Called when no batch came for [`HEAD_LAG`], and after a shutdown line.
    fn idle(&mut self) -> Result<(), KmsError>;
}

fn spawn_writer(sink: impl Sink) -> Result<mpsc::Sender<Job>, KmsError> {
    let (jobs, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("cloister-audit".into())
        .spawn(move || run_writer(sink, rx))
        .map_err(|e| error::internal(format!("cannot start the audit writer: {e}")))?;
    Ok(jobs)
}

/// Group commit: takes every record waiting, writes them in one batch, then
/// answers all their requests.
fn run_writer(mut sink: impl Sink, rx: mpsc::Receiver<Job>) {
    loop {
        let first = match rx.recv_timeout(HEAD_LAG) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = sink.idle();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = sink.idle();
                return;
            }
        };
        let mut jobs = vec![first];
        while let Ok(more) = rx.try_recv() {
            jobs.push(more);
            if jobs.len() >= 4096 {
                break;
            }
        }
        let (lines, waiters): (Vec<Line>, Vec<_>) = jobs
            .into_iter()
            .map(|Job::Append(line, done)| (line, done))
            .unzip();
        let shutdown = lines.iter().any(|l| l.kind == "shutdown");
        let mut result = sink.write_batch(lines);
        if shutdown && let Err(e) = sink.idle() {
            result = Err(e);
        }
        for (i, done) in waiters.into_iter().enumerate() {
            done.send(result.clone().map(|first| first + i as u64));
        }
    }
}

/// Appends lines to a shared store's chain inside `tx` (see
/// [`AuditLog::open_shared`]); returns the seq of the first.
fn append_shared(
    tx: &mut Tx<'_>,
    chain: &SharedChain,
    lines: Vec<Line>,
) -> Result<(u64, u64), KmsError> {
    let head = tx
        .query_opt(
            "SELECT seq, hash, signature FROM audit_head WHERE id = 1 FOR UPDATE",
            &[],
        )?
        .ok_or_else(|| error::internal("the audit chain's head row is missing"))?;
    let (head_seq, head_hash) = (head.int(0)? as u64, head.text(1)?);
    // Only a head this broker key signed, naming the chain's last line, is
    // continued: a chain cut or extended in the database is not built upon.
    let edited = |what: String| {
        error::internal(format!(
            "the audit chain in the database was edited ({what}); nothing is served until it is repaired: run `cloister kms audit verify`"
        ))
    };
    let last_lines = tx.query(
        "SELECT seq, line FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT 2",
        crate::params![head_seq],
    )?;
    if head_seq == 0 {
        if !last_lines.is_empty() {
            return Err(edited("lines exist but the head names none".into()));
        }
    } else {
        if !head_signed(
            &chain.signing_key.verifying_key(),
            head_seq,
            &head_hash,
            &head.text(2)?,
        ) {
            return Err(edited(
                "its head row is not signed by the broker key".into(),
            ));
        }
        let named = match last_lines.as_slice() {
            [only] if only.int(0)? as u64 == head_seq => only.text(1)?,
            [] => {
                return Err(edited(format!(
                    "line {head_seq}, which the head names, is missing"
                )));
            }
            _ => {
                return Err(edited(format!(
                    "lines follow line {head_seq}, which the head names as the last"
                )));
            }
        };
        if line_hash(named.as_bytes()) != head_hash {
            return Err(edited(format!("line {head_seq} differs from the head")));
        }
    }
    let seen = chain
        .high_water
        .fetch_max(head_seq, std::sync::atomic::Ordering::AcqRel);
    if head_seq < seen {
        return Err(edited(format!(
            "its head went back from line {seen} to line {head_seq}: rows were removed or an older state restored (if the database was restored on purpose, remove the data directory's audit.seen)"
        )));
    }
    let mut next_seq = head_seq + 1;
    let mut prev = head_hash;
    let mut joined = Vec::new();
    let first = stamp_lines(
        lines,
        &mut next_seq,
        &mut prev,
        &chain.signing_key,
        Some(&chain.replica),
        |_, bytes| {
            if !joined.is_empty() {
                joined.push(b'\n');
            }
            joined.extend_from_slice(&bytes);
        },
    )?;
    // One statement per batch: JSON lines hold no raw newline.
    let joined = String::from_utf8(joined).map_err(|e| error::internal(e.to_string()))?;
    tx.execute(
        "INSERT INTO audit_log (seq, line) SELECT $1 + ord - 1, line FROM unnest(string_to_array($2, E'\\n')) WITH ORDINALITY AS t(line, ord)",
        crate::params![first, joined],
    )?;
    let last = next_seq - 1;
    let sig = chain
        .signing_key
        .sign(&signed_message(HEAD_LABEL, last, &prev));
    tx.execute(
        "UPDATE audit_head SET seq = $1, hash = $2, signature = $3 WHERE id = 1",
        crate::params![
            last,
            prev,
            base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
        ],
    )?;
    Ok((first, last))
}

/// Whether `signature` (base64) is the broker's over a head (`seq`, `hash`).
fn head_signed(key: &VerifyingKey, seq: u64, hash: &str, signature: &str) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(signature)
        .ok()
        .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
        .is_some_and(|sig| {
            key.verify(&signed_message(HEAD_LABEL, seq, hash), &sig)
                .is_ok()
        })
}

/// The writer of a shared store's chain.
struct SharedWriter {
    store: std::sync::Arc<Store>,
    chain: std::sync::Arc<SharedChain>,
    /// Where the highest head seen is kept, what it says, and since when.
    seen: std::path::PathBuf,
    recorded: u64,
    recorded_at: std::time::Instant,
}

impl SharedWriter {
    /// Keeps the highest head seen in the data directory (at most every
    /// second, and when idle): best effort, a crash may lose the last second.
    fn record_seen(&mut self, now: bool) {
        let high = self
            .chain
            .high_water
            .load(std::sync::atomic::Ordering::Acquire);
        if high <= self.recorded || (!now && self.recorded_at.elapsed() < HEARTBEAT_OF_SEEN) {
            return;
        }
        let tmp = self.seen.with_extension("tmp");
        match std::fs::write(&tmp, format!("{high}\n"))
            .and_then(|()| std::fs::rename(&tmp, &self.seen))
        {
            Ok(()) => {
                self.recorded = high;
                self.recorded_at = std::time::Instant::now();
            }
            Err(e) => eprintln!("cloister kms: {}: {e}", self.seen.display()),
        }
    }
}

/// How often the highest head seen is written down while batches come.
const HEARTBEAT_OF_SEEN: std::time::Duration = std::time::Duration::from_secs(1);

impl Sink for SharedWriter {
    fn write_batch(&mut self, lines: Vec<Line>) -> Result<u64, KmsError> {
        // A failed batch is rolled back whole: the chain in the store is
        // intact, so (unlike a file) the next batch may be tried.
        let mut tx = self.store.begin()?;
        let (first, last) = append_shared(&mut tx, &self.chain, lines)?;
        tx.commit()?;
        // Committed: the chain is at least this long now.
        self.chain
            .high_water
            .fetch_max(last, std::sync::atomic::Ordering::AcqRel);
        self.record_seen(false);
        Ok(first)
    }

    fn idle(&mut self) -> Result<(), KmsError> {
        self.record_seen(true);
        Ok(())
    }
}

struct FileWriter {
    /// Held while the writer runs: one writer per log (see [`lock_writer`]).
    _lock: File,
    file: File,
    path: std::path::PathBuf,
    /// Bytes in the live file, and the seq of its first line.
    file_len: u64,
    first_seq_of_file: u64,
    rotate_bytes: u64,
    next_seq: u64,
    prev: String,
    signing_key: SigningKey,
    head_writer: HeadWriter,
    head_writes: u64,
    /// The seq the head file names (0: none written by this run).
    head_seq: u64,
    head_written_at: std::time::Instant,
    failed: Option<String>,
}

impl AuditLog {
    /// Opens (or creates) the log, checks it against the head recorded beside
    /// it, and starts the writer thread. A startup checkpoint is written. Only
    /// the log's end is read (back to the line the head names), never all of it.
    pub fn open(path: &Path, head_path: &Path, signing_key: SigningKey) -> Result<Self, KmsError> {
        Self::open_rotating(path, head_path, signing_key, ROTATE_BYTES)
    }

    /// As [`AuditLog::open`], rotating the live file once it reaches
    /// `rotate_bytes`: it is renamed `<name>.<seq of its first line>` (20
    /// digits) and a new live file continues the chain.
    pub fn open_rotating(
        path: &Path,
        head_path: &Path,
        signing_key: SigningKey,
        rotate_bytes: u64,
    ) -> Result<Self, KmsError> {
        let io = |e: std::io::Error| error::internal(format!("audit log {}: {e}", path.display()));
        use std::os::unix::fs::OpenOptionsExt;
        let lock = lock_writer(path)?;
        // A rotation cut short by a crash may leave its new file unused.
        let _ = std::fs::remove_file(next_path(path));
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .mode(0o600)
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        if created && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        // A line without its newline was never acknowledged (the response waits
        // for the fsync); drop it and say so in the startup record.
        let len = file.metadata().map_err(io)?.len();
        let complete = complete_length(&mut file, len).map_err(io)?;
        let discarded = len - complete;
        if discarded > 0 {
            file.set_len(complete).map_err(io)?;
            file.seek(SeekFrom::End(0)).map_err(io)?;
        }
        let mut lines = Backward::new(log_files(path)?);
        let parse = |bytes: &[u8]| {
            serde_json::from_slice::<Line>(bytes).map_err(|e| {
                error::internal(format!(
                    "audit log {}: a line near its end is malformed: {e}",
                    path.display()
                ))
            })
        };
        let (next_seq, prev) = match lines.next_line()? {
            Some(last) => (parse(&last)?.seq + 1, line_hash(&last)),
            None => (1, GENESIS.to_owned()),
        };
        let head = recorded_head(head_path, &signing_key.verifying_key())?;
        if head.is_none() && next_seq > 1 {
            return Err(error::internal(format!(
                "the audit log {} has records but its head file {} is missing: it cannot be checked \
                 for truncation; run `cloister kms audit verify`",
                path.display(),
                head_path.display()
            )));
        }
        if let Some((head_seq, head_hash)) = head {
            // Back from the end to the line the head names.
            let mut lines = Backward::new(log_files(path)?);
            let mut found = None;
            while let Some(bytes) = lines.next_line()? {
                let seq = parse(&bytes)?.seq;
                if seq <= head_seq {
                    found = (seq == head_seq).then(|| line_hash(&bytes));
                    break;
                }
            }
            if found.as_deref() != Some(head_hash.as_str()) {
                return Err(error::internal(format!(
                    "the audit log {} does not contain the recorded head (line {head_seq}): it was truncated or \
                     edited; run `cloister kms audit verify`",
                    path.display()
                )));
            }
        }
        let first_seq_of_file = if complete == 0 {
            next_seq
        } else {
            let mut first = String::new();
            BufReader::new(File::open(path).map_err(io)?)
                .read_line(&mut first)
                .map_err(io)?;
            parse(first.trim_end().as_bytes())?.seq
        };
        let mut writer = FileWriter {
            _lock: lock,
            file,
            path: path.to_path_buf(),
            file_len: complete,
            first_seq_of_file,
            rotate_bytes,
            next_seq,
            prev,
            signing_key,
            head_writer: HeadWriter::spawn(head_path.to_path_buf())?,
            head_writes: 0,
            head_seq: 0,
            head_written_at: std::time::Instant::now(),
            failed: None,
        };
        let note = (discarded > 0)
            .then(|| format!("discarded {discarded} bytes of an unacknowledged partial line"));
        writer.write_batch(vec![Line {
            note,
            ..system_line("startup")
        }])?;
        writer.catch_up_head()?;
        Ok(AuditLog {
            jobs: spawn_writer(writer)?,
            shared: None,
        })
    }

    /// Opens the chain in a shared store (PostgreSQL), where every broker
    /// replica appends to one chain: each batch locks the head row, stamps
    /// its lines after the chain's end, inserts them, moves the signed head,
    /// and commits before any of its requests is answered. A startup line
    /// names the replica.
    ///
    /// `seen` (a file of the data directory) keeps the highest head this
    /// broker saw across restarts: a chain rolled back while it was stopped
    /// is refused when it starts.
    pub fn open_shared(
        store: std::sync::Arc<Store>,
        signing_key: SigningKey,
        replica: &str,
        seen: &Path,
    ) -> Result<Self, KmsError> {
        let recorded = match std::fs::read_to_string(seen) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|_| error::internal(format!("{} is not a line number", seen.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(error::internal(format!("{}: {e}", seen.display()))),
        };
        let chain = std::sync::Arc::new(SharedChain {
            signing_key,
            replica: replica.to_owned(),
            high_water: std::sync::atomic::AtomicU64::new(recorded),
        });
        let mut writer = SharedWriter {
            store,
            chain: chain.clone(),
            seen: seen.to_path_buf(),
            recorded,
            recorded_at: std::time::Instant::now(),
        };
        let start = Line {
            note: Some(format!("replica {replica} started")),
            ..system_line("startup")
        };
        writer.write_batch(vec![start])?;
        Ok(AuditLog {
            jobs: spawn_writer(writer)?,
            shared: Some(chain),
        })
    }

    /// Appends a request record and returns once it is on disk.
    pub fn record(&self, request: RequestRecord) -> Result<u64, KmsError> {
        self.append(Self::request_line(request))
    }

    /// Appends the record of a keystore change made in `tx`: on a shared
    /// store, in that transaction (the change and its record commit together);
    /// otherwise to the log file, on disk before the change commits.
    pub fn record_in(&self, tx: &mut Tx<'_>, request: RequestRecord) -> Result<u64, KmsError> {
        match &self.shared {
            Some(chain) => {
                append_shared(tx, chain, vec![Self::request_line(request)]).map(|(first, _)| first)
            }
            None => self.record(request),
        }
    }

    /// As [`AuditLog::record`], for a task: resolves once the record is on disk.
    /// The record is queued when this is called, whether or not it is awaited.
    pub fn record_async(
        &self,
        request: RequestRecord,
    ) -> impl std::future::Future<Output = Result<u64, KmsError>> + use<> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = self
            .jobs
            .send(Job::Append(Self::request_line(request), Reply::Async(tx)));
        async move {
            queued.map_err(|_| error::internal("the audit writer has stopped"))?;
            rx.await
                .map_err(|_| error::internal("the audit writer has stopped"))?
        }
    }

    fn request_line(request: RequestRecord) -> Line {
        Line {
            request: Some(request.bounded()),
            ..system_line("request")
        }
    }

    /// Writes a signed shutdown checkpoint.
    pub fn shutdown(&self) -> Result<u64, KmsError> {
        self.append(system_line("shutdown"))
    }

    fn append(&self, line: Line) -> Result<u64, KmsError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Job::Append(line, Reply::Blocking(tx)))
            .map_err(|_| error::internal("the audit writer has stopped"))?;
        rx.recv()
            .map_err(|_| error::internal("the audit writer has stopped"))?
    }
}

impl Sink for FileWriter {
    fn write_batch(&mut self, lines: Vec<Line>) -> Result<u64, KmsError> {
        FileWriter::write_batch(self, lines)
    }

    fn idle(&mut self) -> Result<(), KmsError> {
        self.catch_up_head()
    }
}

impl FileWriter {
    /// Writes lines (plus periodic checkpoints), fsyncs, records the head.
    /// Returns the seq of the first given line.
    fn write_batch(&mut self, lines: Vec<Line>) -> Result<u64, KmsError> {
        if let Some(why) = &self.failed {
            return Err(error::internal(format!(
                "the audit log cannot be written ({why}); nothing is served until restart"
            )));
        }
        let result = self.try_write_batch(lines);
        if let Err(e) = &result {
            self.failed = Some(e.message.clone());
        }
        result
    }

    fn try_write_batch(&mut self, lines: Vec<Line>) -> Result<u64, KmsError> {
        let io = |e: std::io::Error| error::internal(format!("audit log: {e}"));
        // The head that this batch writes: the end of what is already on disk.
        let durable = (self.next_seq - 1, self.prev.clone());
        let mut out = Vec::new();
        let first_seq = stamp_lines(
            lines,
            &mut self.next_seq,
            &mut self.prev,
            &self.signing_key,
            None,
            |_, bytes| {
                out.extend_from_slice(&bytes);
                out.push(b'\n');
            },
        )?;
        self.file.write_all(&out).map_err(io)?;
        if durable.0 > self.head_seq && self.head_written_at.elapsed() >= HEAD_LAG {
            // Both fdatasyncs at once: the head names only lines synced before.
            let slot = self.head_slot(durable.0, &durable.1)?;
            let index = self.head_writes % 2;
            self.head_writes += 1;
            self.head_writer.start(slot, index)?;
            let log = self.file.sync_data();
            let head = self.head_writer.finish();
            log.map_err(io)?;
            head?;
            self.head_seq = durable.0;
            self.head_written_at = std::time::Instant::now();
        } else {
            self.file.sync_data().map_err(io)?;
        }
        self.file_len += out.len() as u64;
        if self.file_len >= self.rotate_bytes {
            self.rotate()?;
        }
        Ok(first_seq)
    }

    /// Renames the live file (all of it synced) to its segment name and puts a
    /// new, empty one in its place; the chain goes on in it. The new file is
    /// made first (`<name>.next`), so that running out of file descriptors or
    /// space only postpones the rotation (to the next batch) and fails no
    /// request. A crash between the renames leaves no live file, which `open`
    /// creates, finding the chain's end in the newest segment.
    fn rotate(&mut self) -> Result<(), KmsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let next = next_path(&self.path);
        let _ = std::fs::remove_file(&next);
        let made = OpenOptions::new()
            .mode(0o600)
            .create_new(true)
            .read(true)
            .append(true)
            .open(&next)
            .and_then(|f| {
                std::fs::rename(&self.path, segment_path(&self.path, self.first_seq_of_file))?;
                Ok(f)
            });
        let new_file = match made {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&next);
                eprintln!(
                    "cloister kms: the audit log {} was not rotated ({e}); retrying after the next batch",
                    self.path.display()
                );
                return Ok(());
            }
        };
        // The live name must come back: without it the log's end is in a
        // file no reader looks at, so a failure here stops the log.
        std::fs::rename(&next, &self.path)
            .and_then(|()| match self.path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
                _ => Ok(()),
            })
            .map_err(|e| error::internal(format!("audit log rotation: {e}")))?;
        self.file = new_file;
        self.file_len = 0;
        self.first_seq_of_file = self.next_seq;
        Ok(())
    }

    /// Records the log's end (all of it on disk) as the head, if it is not yet.
    fn catch_up_head(&mut self) -> Result<(), KmsError> {
        let end = self.next_seq - 1;
        if end == 0 || end <= self.head_seq || self.failed.is_some() {
            return Ok(());
        }
        let index = self.head_writes % 2;
        self.head_writes += 1;
        let result = self.head_slot(end, &self.prev).and_then(|slot| {
            self.head_writer.start(slot, index)?;
            self.head_writer.finish()
        });
        match result {
            Ok(()) => {
                self.head_seq = end;
                self.head_written_at = std::time::Instant::now();
                Ok(())
            }
            Err(e) => {
                self.failed = Some(e.message.clone());
                Err(e)
            }
        }
    }

    /// A head slot naming line `seq` whose hash is `hash`, signed.
    fn head_slot(&self, seq: u64, hash: &str) -> Result<Vec<u8>, KmsError> {
        let sig = self
            .signing_key
            .sign(&signed_message(HEAD_LABEL, seq, hash));
        let head = Head {
            seq,
            hash: hash.to_owned(),
            signature: base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
        };
        let mut slot = serde_json::to_vec(&head).map_err(|e| error::internal(e.to_string()))?;
        if slot.len() >= HEAD_SLOT {
            return Err(error::internal("the audit head does not fit its slot"));
        }
        slot.resize(HEAD_SLOT - 1, b' ');
        slot.push(b'\n');
        Ok(slot)
    }
}

/// A thread of the writer's that writes head slots, so that the head's
/// fdatasync runs while the writer syncs the log.
struct HeadWriter {
    requests: mpsc::Sender<(Vec<u8>, u64)>,
    results: mpsc::Receiver<Result<(), KmsError>>,
}

impl HeadWriter {
    fn spawn(head_path: std::path::PathBuf) -> Result<HeadWriter, KmsError> {
        let (requests, work) = mpsc::channel::<(Vec<u8>, u64)>();
        let (done, results) = mpsc::channel();
        std::thread::Builder::new()
            .name("cloister-audit-head".into())
            .spawn(move || {
                for (slot, index) in work {
                    if done
                        .send(write_head_slot(&head_path, &slot, index))
                        .is_err()
                    {
                        return;
                    }
                }
            })
            .map_err(|e| error::internal(format!("cannot start the audit head writer: {e}")))?;
        Ok(HeadWriter { requests, results })
    }

    fn start(&self, slot: Vec<u8>, index: u64) -> Result<(), KmsError> {
        self.requests
            .send((slot, index))
            .map_err(|_| error::internal("the audit head writer has stopped"))
    }

    fn finish(&self) -> Result<(), KmsError> {
        self.results
            .recv()
            .map_err(|_| error::internal("the audit head writer has stopped"))?
    }
}

/// Two slots, written alternately in place with one fdatasync: a write torn
/// by a crash spoils only the slot being written, and the other still holds
/// the previous head (which the log contains). The file is opened each time,
/// so that a head file replaced behind the broker's back fails the write.
fn write_head_slot(head_path: &Path, slot: &[u8], slot_index: u64) -> Result<(), KmsError> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .mode(0o600)
        .create(true)
        .truncate(false)
        .write(true)
        .open(head_path)
        .and_then(|f| {
            f.write_all_at(slot, slot_index * HEAD_SLOT as u64)?;
            f.sync_data()
        })
        .map_err(|e| error::internal(format!("cannot record the audit head: {e}")))
}

/// Bytes per head slot; the head file holds two.
const HEAD_SLOT: usize = 256;

/// A head slot: the last line's seq and hash, signed by the broker.
#[derive(Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
    signature: String,
}

/// The head recorded beside a log, checked against the broker's key; `None`
/// when no head was recorded yet.
pub fn recorded_head(
    head_path: &Path,
    broker_key: &VerifyingKey,
) -> Result<Option<(u64, String)>, KmsError> {
    let mut bytes = Vec::with_capacity(2 * HEAD_SLOT);
    match File::open(head_path) {
        Ok(f) => f
            .take(2 * HEAD_SLOT as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| error::internal(format!("{}: {e}", head_path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(error::internal(format!("{}: {e}", head_path.display()))),
    };
    let bad = || {
        error::internal(format!(
            "the audit head {} is malformed or not signed by this broker",
            head_path.display()
        ))
    };
    let valid = |slot: &[u8]| -> Option<(u64, String)> {
        let head: Head = serde_json::from_slice(slot.trim_ascii()).ok()?;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&head.signature)
            .ok()
            .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())?;
        broker_key
            .verify(&signed_message(HEAD_LABEL, head.seq, &head.hash), &sig)
            .ok()?;
        Some((head.seq, head.hash))
    };
    if bytes.is_empty() {
        return Ok(None);
    }
    // The newest slot that is intact and signed by this broker.
    bytes
        .chunks(HEAD_SLOT)
        .take(2)
        .filter_map(valid)
        .max_by_key(|(seq, _)| *seq)
        .map(Some)
        .ok_or_else(bad)
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    pub lines: u64,
    pub checkpoints: u64,
    pub head_hash: String,
}

/// Where a log stops being trustworthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log line {line}: {problem}")]
pub struct AuditError {
    pub line: u64,
    pub problem: String,
}

impl cloister_proto::ErrorCode for AuditError {
    fn code(&self) -> &'static str {
        "E-KMS-AUDIT-TAMPERED"
    }
}

/// Verifies a log, its rotated segments first: every line well-formed, seq
/// consecutive from 1, each `prev` the hash of the line before, every
/// signature valid, and the recorded head (if any) present with the same hash.
/// A segment removed (even the oldest) breaks the chain.
pub fn verify_log(
    path: &Path,
    broker_key: &VerifyingKey,
    head: Option<(u64, String)>,
) -> Result<VerifySummary, AuditError> {
    let cannot = |problem: String| AuditError { line: 0, problem };
    let files = log_files(path).map_err(|e| cannot(e.message))?;
    if files.is_empty() {
        return Err(cannot(format!(
            "cannot read {}: it does not exist",
            path.display()
        )));
    }
    // The segments and the live file, read as one log.
    let mut chain: Box<dyn Read> = Box::new(std::io::empty());
    for f in &files {
        let file =
            File::open(f).map_err(|e| cannot(format!("cannot read {}: {e}", f.display())))?;
        chain = Box::new(chain.chain(file));
    }
    let mut reader = BufReader::new(chain);
    let mut verifier = ChainVerifier::new(broker_key, head, "in the head file");
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = reader.read_until(b'\n', &mut buf).map_err(|e| AuditError {
            line: verifier.lines + 1,
            problem: e.to_string(),
        })?;
        if read == 0 {
            break;
        }
        let Some(bytes) = buf.strip_suffix(b"\n") else {
            return Err(AuditError {
                line: verifier.lines + 1,
                problem: "the line is incomplete (no newline): the log was cut".into(),
            });
        };
        verifier.push(bytes)?;
    }
    verifier.finish()
}

/// Verifies the chain in a shared store: every line in seq order, as
/// [`verify_log`] does, up to the signed head row (which every append moves
/// in its transaction, so it names the chain's end).
pub fn verify_shared(
    store: &Store,
    broker_key: &VerifyingKey,
) -> Result<VerifySummary, AuditError> {
    let cannot = |e: KmsError| AuditError {
        line: 0,
        problem: e.message,
    };
    // One snapshot: replicas appending meanwhile do not show as lines past
    // the head read.
    let mut tx = store.begin_snapshot().map_err(cannot)?;
    let head = tx
        .query(
            "SELECT seq, hash, signature FROM audit_head WHERE id = 1",
            &[],
        )
        .map_err(cannot)?;
    let head = head.first().ok_or_else(|| AuditError {
        line: 0,
        problem: "the audit head row is missing: truncation cannot be ruled out".into(),
    })?;
    let (seq, hash, signature) = (
        head.int(0).map_err(cannot)? as u64,
        head.text(1).map_err(cannot)?,
        head.text(2).map_err(cannot)?,
    );
    if seq > 0 && !head_signed(broker_key, seq, &hash, &signature) {
        return Err(AuditError {
            line: seq,
            problem: "the audit head row is not signed by the broker key".into(),
        });
    }
    let mut verifier = ChainVerifier::new(
        broker_key,
        (seq > 0).then_some((seq, hash)),
        "in the head row",
    );
    const PAGE: i64 = 10_000;
    loop {
        let rows = tx
            .query(
                "SELECT seq, line FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                crate::params![verifier.lines, PAGE],
            )
            .map_err(cannot)?;
        for row in &rows {
            let stored_seq = row.int(0).map_err(cannot)? as u64;
            if stored_seq != verifier.lines + 1 {
                return Err(AuditError {
                    line: verifier.lines + 1,
                    problem: format!("the next line stored is {stored_seq}: lines were deleted"),
                });
            }
            verifier.push(row.text(1).map_err(cannot)?.as_bytes())?;
        }
        if (rows.len() as i64) < PAGE {
            break;
        }
    }
    // Every append moves the head in its transaction: nothing follows it.
    if verifier.lines > seq {
        return Err(AuditError {
            line: seq + 1,
            problem: format!(
                "the log goes on after line {seq}, which the signed head row names as its last: lines were added"
            ),
        });
    }
    verifier.finish()
}

/// Checks lines one by one: well-formed, seq consecutive from 1, each `prev`
/// the hash of the line before, every signature valid, and the head (if any)
/// reached with the same hash.
struct ChainVerifier<'k> {
    key: &'k VerifyingKey,
    head: Option<(u64, String)>,
    head_where: &'static str,
    head_seen: bool,
    prev: String,
    lines: u64,
    checkpoints: u64,
}

impl<'k> ChainVerifier<'k> {
    fn new(key: &'k VerifyingKey, head: Option<(u64, String)>, head_where: &'static str) -> Self {
        ChainVerifier {
            key,
            head_seen: head.is_none(),
            head,
            head_where,
            prev: GENESIS.to_owned(),
            lines: 0,
            checkpoints: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(), AuditError> {
        self.lines += 1;
        let n = self.lines;
        let fail = |problem: String| AuditError { line: n, problem };
        let line: Line = serde_json::from_slice(bytes)
            .map_err(|e| fail(format!("not a valid record ({e}): the line was edited")))?;
        if line.seq != n {
            return Err(fail(format!(
                "seq is {}, expected {n}: a line was deleted, inserted or moved",
                line.seq
            )));
        }
        if line.prev != self.prev {
            return Err(fail(format!(
                "prev does not match the hash of line {}: that line was edited, or lines were reordered",
                n - 1
            )));
        }
        if line.kind != "request" {
            let sig = line
                .signature
                .as_deref()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
                .ok_or_else(|| fail(format!("{} line without a valid signature", line.kind)))?;
            self.key
                .verify(&checkpoint_message(line.seq, &line.prev), &sig)
                .map_err(|_| {
                    fail(format!(
                        "the {} signature does not verify with the broker's key",
                        line.kind
                    ))
                })?;
            self.checkpoints += 1;
        }
        self.prev = line_hash(bytes);
        if let Some((head_seq, head_hash)) = &self.head
            && *head_seq == n
        {
            if &self.prev != head_hash {
                return Err(fail(format!(
                    "the line differs from the head recorded {}",
                    self.head_where
                )));
            }
            self.head_seen = true;
        }
        Ok(())
    }

    fn finish(self) -> Result<VerifySummary, AuditError> {
        let n = self.lines;
        if self.head.is_none() && n > 0 {
            return Err(AuditError {
                line: n,
                problem: "the log has records but no head was recorded (the head file is missing or empty): truncation cannot be ruled out".into(),
            });
        }
        if !self.head_seen {
            let (head_seq, _) = self.head.unwrap_or_default();
            return Err(AuditError {
                line: n,
                problem: format!(
                    "the log ends at line {n} but its head {} records line {head_seq}: the log was truncated",
                    self.head_where
                ),
            });
        }
        Ok(VerifySummary {
            lines: n,
            checkpoints: self.checkpoints,
            head_hash: self.prev,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct Fixture {
        dir: tempfile::TempDir,
        key: SigningKey,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            Fixture {
                dir,
                key: SigningKey::generate(&mut rand_core::OsRng),
            }
        }
        fn log(&self) -> PathBuf {
            self.dir.path().join("audit.log")
        }
        fn head(&self) -> PathBuf {
            self.dir.path().join("audit.head")
        }
        fn open(&self) -> Result<AuditLog, KmsError> {
            AuditLog::open(&self.log(), &self.head(), self.key.clone())
        }
        fn verify(&self) -> Result<VerifySummary, AuditError> {
            verify_log(
                &self.log(),
                &self.key.verifying_key(),
                recorded_head(&self.head(), &self.key.verifying_key()).unwrap(),
            )
        }
        fn lines(&self) -> Vec<String> {
            std::fs::read_to_string(self.log())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
        fn write_lines(&self, lines: &[String]) {
            std::fs::write(
                self.log(),
                lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
            )
            .unwrap();
        }
    }

    fn record(i: usize) -> RequestRecord {
        RequestRecord {
            authenticated: true,
            request_id: format!("req-{i}"),
            principal: "app".into(),
            action: "kms:Decrypt".into(),
            key_id: Some("k".into()),
            decision: if i.is_multiple_of(2) {
                Decision::Allow
            } else {
                Decision::Deny
            },
            reason: "because".into(),
            recipient_pcr0: None,
            recipient_module_id: None,
            access_key_id: None,
        }
    }

    fn filled(n: usize) -> Fixture {
        let f = Fixture::new();
        let log = f.open().unwrap();
        for i in 0..n {
            log.record(record(i)).unwrap();
        }
        log.shutdown().unwrap();
        f
    }

    #[test]
    fn records_are_bounded_as_json_writes_them() {
        let control = "\u{1}".repeat(256);
        let r = RequestRecord {
            principal: control.clone(),
            request_id: "\"".repeat(96),
            reason: format!("unknown principal {control:?}"),
            key_id: Some("\\".repeat(300)),
            ..Default::default()
        }
        .bounded();
        let line = serde_json::to_string(&r).unwrap();
        // Each text is cut to its cap as escaped: 96 + 256 + 1024 + 256 bytes.
        assert!(line.len() < 1800, "{} bytes: {line}", line.len());
        assert!(r.principal.ends_with("... (256 bytes)"), "{}", r.principal);
    }

    #[test]
    fn the_log_rotates_and_verifies_across_its_segments() {
        let f = Fixture::new();
        let open = || AuditLog::open_rotating(&f.log(), &f.head(), f.key.clone(), 4096);
        let log = open().unwrap();
        let start = cloister_kms_api::now_ms();
        for i in 0..200 {
            log.record(record(i)).unwrap();
        }
        log.shutdown().unwrap();
        drop(log);
        let files = log_files(&f.log()).unwrap();
        assert!(files.len() > 5, "{files:?}");
        assert!(files.iter().all(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777 == 0o600
        }));
        // Each segment starts where its name says, and holds about 4 KB.
        for p in &files[..files.len() - 1] {
            let text = std::fs::read_to_string(p).unwrap();
            let first: Line = serde_json::from_str(text.lines().next().unwrap()).unwrap();
            assert!(p.to_string_lossy().ends_with(&format!("{:020}", first.seq)));
            assert!(text.len() >= 4096 && text.len() < 8192, "{}", text.len());
        }
        assert_eq!(f.verify().unwrap().lines, 202); // startup, 200 records, shutdown
        // Reopening continues the chain in the live file; request ids are
        // found across segments.
        let log = open().unwrap();
        log.record(record(999)).unwrap();
        drop(log);
        f.verify().unwrap();
        let used = used_request_ids(&f.log(), start.saturating_sub(1000)).unwrap();
        assert_eq!(used.len(), 201);
        // A crash between the rename and the new live file: open finds the
        // chain's end in the newest segment.
        let live = f.log();
        let last = log_files(&live).unwrap().len();
        let text = std::fs::read_to_string(&live).unwrap();
        let first: Line = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        std::fs::rename(&live, segment_path(&live, first.seq)).unwrap();
        let log = open().unwrap();
        log.record(record(1000)).unwrap();
        drop(log);
        assert_eq!(log_files(&live).unwrap().len(), last + 1);
        f.verify().unwrap();
        // A removed segment breaks the chain, the oldest too.
        let files = log_files(&live).unwrap();
        for victim in [&files[2], &files[0]] {
            let saved = std::fs::read(victim).unwrap();
            std::fs::remove_file(victim).unwrap();
            let e = f.verify().unwrap_err();
            assert!(e.problem.contains("a line was deleted"), "{e}");
            std::fs::write(victim, saved).unwrap();
        }
        f.verify().unwrap();
        // A rotation that cannot make its next file is postponed: requests
        // are still recorded, and the next batch rotates once it can.
        let blocker = f.dir.path().join("audit.log.next");
        std::fs::create_dir(&blocker).unwrap();
        let before = log_files(&live).unwrap().len();
        let log = open().unwrap();
        for i in 0..40 {
            log.record(record(2000 + i)).unwrap();
        }
        assert_eq!(log_files(&live).unwrap().len(), before);
        std::fs::remove_dir(&blocker).unwrap();
        log.record(record(3000)).unwrap();
        drop(log);
        assert!(log_files(&live).unwrap().len() > before);
        f.verify().unwrap();
    }

    #[test]
    fn used_request_ids_are_read_from_the_end_across_chunks() {
        let f = Fixture::new();
        let log = f.open().unwrap();
        let start = cloister_kms_api::now_ms();
        // ~300 bytes a line: 1,000 lines span several 64 KB chunks.
        for i in 0..1000 {
            let mut r = record(i);
            r.authenticated = i % 3 != 0;
            r.reason = "r".repeat(150);
            log.record(r).unwrap();
        }
        log.shutdown().unwrap();
        let used = used_request_ids(&f.log(), start.saturating_sub(1000)).unwrap();
        let mut ids: Vec<String> = used.iter().map(|u| u.request_id.clone()).collect();
        ids.sort();
        let mut expected: Vec<String> = (0..1000)
            .filter(|i| i % 3 != 0)
            .map(|i| format!("req-{i}"))
            .collect();
        expected.sort();
        assert_eq!(ids, expected);
        assert!(used.iter().all(|u| u.principal == "app"));
        // Nothing is that recent in the future.
        let later = cloister_kms_api::now_ms() + 3_600_000;
        assert!(used_request_ids(&f.log(), later).unwrap().is_empty());
        assert!(
            used_request_ids(&f.dir.path().join("none"), 0)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_written_log_verifies_and_round_trips() {
        let f = filled(5);
        let s = f.verify().unwrap();
        assert_eq!(s.lines, 7); // startup + 5 + shutdown
        assert_eq!(s.checkpoints, 2);
        let line: Line = serde_json::from_str(&f.lines()[1]).unwrap();
        assert_eq!(line.request, Some(record(0)));
        // Reopening continues the chain.
        let log = f.open().unwrap();
        log.record(record(9)).unwrap();
        assert_eq!(f.verify().unwrap().lines, 9);
    }

    #[test]
    fn concurrent_appends_are_all_recorded_in_one_chain() {
        let f = Fixture::new();
        let log = f.open().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|i| log.record(record(t * 100 + i)).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        seqs.sort();
        seqs.dedup();
        assert_eq!(seqs.len(), 400, "every record got its own seq");
        assert_eq!(f.verify().unwrap().lines, 401);
    }

    #[test]
    fn an_edited_line_is_found() {
        let f = filled(4);
        let mut lines = f.lines();
        lines[2] = lines[2].replace("\"Deny\"", "\"Allow\"");
        f.write_lines(&lines);
        let err = f.verify().unwrap_err();
        assert_eq!(err.line, 4, "{err}");
        assert!(err.problem.contains("hash of line 3"), "{err}");
    }

    #[test]
    fn an_edited_last_line_is_found_through_the_head() {
        let f = filled(2);
        let mut lines = f.lines();
        let last = lines.len() - 1;
        lines[last] = lines[last].replace("shutdown", "Shutdown");
        f.write_lines(&lines);
        assert!(f.verify().is_err());
    }

    #[test]
    fn deleted_reordered_and_truncated_logs_are_found() {
        let f = filled(4);
        let lines = f.lines();

        let mut deleted = lines.clone();
        deleted.remove(2);
        f.write_lines(&deleted);
        let err = f.verify().unwrap_err();
        assert!(err.problem.contains("deleted, inserted or moved"), "{err}");
        assert_eq!(err.line, 3);

        let mut reordered = lines.clone();
        reordered.swap(2, 3);
        f.write_lines(&reordered);
        let err = f.verify().unwrap_err();
        assert_eq!(err.line, 3, "{err}");

        f.write_lines(&lines[..lines.len() - 2]);
        let err = f.verify().unwrap_err();
        assert!(err.problem.contains("was truncated"), "{err}");

        let mut cut = lines.join("\n").into_bytes();
        cut.truncate(cut.len() - 5);
        std::fs::write(f.log(), &cut).unwrap();
        assert!(f.verify().is_err());
    }

    #[test]
    fn a_forged_checkpoint_signature_is_found() {
        let f = filled(1);
        let other = SigningKey::generate(&mut rand_core::OsRng);
        let err = verify_log(&f.log(), &other.verifying_key(), None).unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.problem.contains("signature does not verify"), "{err}");
    }

    #[test]
    fn a_torn_head_slot_falls_back_to_the_other() {
        let f = filled(3);
        let (seq, _) = recorded_head(&f.head(), &f.key.verifying_key())
            .unwrap()
            .unwrap();
        // Spoil the newest slot as a crash in the middle of its write would.
        let mut bytes = std::fs::read(f.head()).unwrap();
        let newest = bytes
            .chunks(HEAD_SLOT)
            .position(|c| String::from_utf8_lossy(c).contains(&format!("\"seq\":{seq},")))
            .unwrap();
        let at = newest * HEAD_SLOT;
        bytes[at + 10..at + 40].fill(b'#');
        std::fs::write(f.head(), &bytes).unwrap();
        let (older, _) = recorded_head(&f.head(), &f.key.verifying_key())
            .unwrap()
            .unwrap();
        assert!(older < seq, "{older} {seq}");
        // The log still verifies against the older head, and the broker reopens it.
        f.verify().unwrap();
        f.open().unwrap().record(record(9)).unwrap();
        f.verify().unwrap();
    }

    #[test]
    fn the_head_never_names_a_line_not_on_disk_and_catches_up_when_idle() {
        let f = Fixture::new();
        let log = f.open().unwrap();
        let head = || {
            recorded_head(&f.head(), &f.key.verifying_key())
                .unwrap()
                .unwrap()
                .0 as usize
        };
        for i in 0..5 {
            log.record(record(i)).unwrap();
            assert!(
                head() <= f.lines().len(),
                "{} > {}",
                head(),
                f.lines().len()
            );
        }
        std::thread::sleep(HEAD_LAG * 10);
        assert_eq!(head(), 6, "startup and 5 records");
        // With the head caught up, cutting the last record is found, even
        // without a shutdown checkpoint after it.
        drop(log);
        let lines = f.lines();
        f.write_lines(&lines[..lines.len() - 1]);
        let err = f.open().err().unwrap();
        assert!(err.message.contains("truncated or edited"), "{err}");
    }

    #[test]
    fn a_second_writer_of_one_log_is_refused() {
        let f = Fixture::new();
        let log = f.open().unwrap();
        let err = f.open().err().unwrap();
        assert!(err.message.contains("another process"), "{err}");
        log.record(record(1)).unwrap();
        drop(log);
        // Once the first writer stops, the log opens again and verifies.
        let log = f.open().unwrap();
        log.shutdown().unwrap();
        assert_eq!(f.verify().unwrap().lines, 4);
    }

    #[test]
    fn a_missing_head_is_refused() {
        let f = filled(2);
        std::fs::remove_file(f.head()).unwrap();
        let err = verify_log(&f.log(), &f.key.verifying_key(), None).unwrap_err();
        assert!(err.problem.contains("no head was recorded"), "{err}");
        let err = f.open().err().unwrap();
        assert!(err.message.contains("head file"), "{err}");
    }

    #[test]
    fn a_forged_head_is_refused() {
        let f = filled(1);
        let other = SigningKey::generate(&mut rand_core::OsRng);
        let err = recorded_head(&f.head(), &other.verifying_key()).unwrap_err();
        assert!(err.message.contains("not signed by this broker"), "{err}");
    }

    #[test]
    fn the_broker_refuses_to_start_on_a_truncated_log() {
        let f = filled(3);
        let lines = f.lines();
        f.write_lines(&lines[..2]);
        let err = f.open().err().unwrap();
        assert!(err.message.contains("truncated or edited"), "{err}");
    }

    #[test]
    fn a_partial_unacknowledged_line_is_discarded_at_startup() {
        let f = filled(1);
        let mut bytes = std::fs::read(f.log()).unwrap();
        bytes.extend_from_slice(b"{\"seq\":99,\"ty");
        std::fs::write(f.log(), &bytes).unwrap();
        f.open().unwrap().record(record(1)).unwrap();
        assert!(f.lines().iter().any(|l| l.contains("discarded 13 bytes")));
        f.verify().unwrap();
    }

    #[test]
    fn when_the_log_cannot_be_written_requests_fail() {
        let f = Fixture::new();
        let log = f.open().unwrap();
        // Make the head unrecordable: the head's next write fails (with the next
        // batch, or when the writer catches up while idle), and so does every
        // request after it.
        std::fs::remove_file(f.head()).unwrap();
        std::fs::create_dir(f.head()).unwrap();
        let _ = log.record(record(0));
        std::thread::sleep(HEAD_LAG * 5);
        assert!(log.record(record(1)).is_err());
        let err = log.record(record(2)).unwrap_err();
        assert!(
            err.message.contains("nothing is served until restart"),
            "{err}"
        );
    }
}
