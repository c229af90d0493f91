//! The supervisor daemon: the one process that holds the platform's NSM key,
//! the compiled-code cache and the run state, measures images and launches a
//! runtime process per enclave.
//!
//! State directory (0711, owned by the supervisor's uid; one owned by someone
//! else or writable by group or others is refused):
//!
//! ```text
//! cache.key, cache/           0600 / 0700: compiled code, MAC'd (see `cache`)
//! enclaves/                    0711: runtimes pass through, nobody lists
//! enclaves/<EnclaveID>/        0700, owned by the enclave's runtime uid
//!     enclave.sock             the runtime's call socket (relayed by `Call`)
//!     console.log              a debug enclave's console
//! logs/<EnclaveID>.log         0700 dir: the runtime process's stderr
//! ```
//!
//! What lies in an enclave's directory belongs to its runtime's uid, which a
//! hostile guest may have taken over: the supervisor opens nothing there by a
//! path it follows (the console is opened O_NOFOLLOW and must be the runtime's
//! own regular file; a relayed connection must lead to the runtime's process).
//!
//! Each runtime is started from the fixed runtime binary with an empty
//! environment, no descriptors but its channel (stdin/stdout) and its log,
//! in its own process group, as the supervisor's uid or — when the supervisor
//! runs as root — an unprivileged uid of its own. Clients are authorised by
//! their peer credentials on the control socket.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use serde_bytes::ByteBuf;
use tokio::process::{ChildStdin, ChildStdout};

use cloister_attestation::nsm::{AttestationRequest, Nsm, PlatformDir};
use cloister_attestation::pcr::{self, PCR_COUNT, PcrBank};
use cloister_image::Image;
use cloister_proto::{Address, ErrorCode, frame};
use cloister_runtime::channel::{
    Boot, FromRuntime, MAX_FRAME, MAX_FROM_RUNTIME, NsmRequest, NsmResponse, Start,
};

use crate::cache::CodeCache;
use crate::protocol::{EnclaveInfo, MAX_CONTROL, Reply, Request, RunSpec, Which};

/// The first CID handed out, as Nitro's enclaves start at 16.
pub const FIRST_CID: u32 = 16;
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a compile of one component may take.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(300);
/// The highest CID: its vsock port (10000 + CID) must fit in 32 bits.
pub const MAX_CID: u32 = u32::MAX - 10_000;
/// Runtime uids come from `enclave_uid_base .. enclave_uid_base + UID_POOL`.
pub const UID_POOL: u32 = 65_536;
/// The most of a console that `console` returns (its end).
const MAX_CONSOLE: u64 = 1 << 20;
/// How long a control connection may take to send its request.
pub const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How the supervisor is run.
pub struct Options {
    pub state_dir: PathBuf,
    pub platform_dir: PathBuf,
    pub listen: Address,
    /// The runtime binary (default: `cloister-runtime` beside this executable).
    pub runtime: PathBuf,
    /// Clients allowed besides root and the supervisor's own uid.
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    /// When root: enclave runtimes run as uids from here up (one per enclave).
    pub enclave_uid_base: u32,
}

/// One launch in progress: its CID, name and runtime uid are taken.
struct Reservation {
    cid: u32,
    name: String,
    uid: u32,
}

/// Refuses a path not owned by this uid, or whose mode has any of `forbidden`.
fn check_owned(path: &Path, forbidden: u32, what: &str) -> anyhow::Result<()> {
    let m = std::fs::metadata(path).with_context(|| path.display().to_string())?;
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        bail!(StateError(format!(
            "{} is owned by uid {}, not by the supervisor's uid {me}: refusing to use it",
            path.display(),
            m.uid()
        )));
    }
    if m.mode() & forbidden != 0 {
        bail!(StateError(format!(
            "{} has mode {:o}: {what} (chmod it)",
            path.display(),
            m.mode() & 0o777
        )));
    }
    Ok(())
}

/// A secret file or private directory: this uid's, closed to group and others.
pub fn check_private(path: &Path) -> anyhow::Result<()> {
    check_owned(path, 0o077, "group and others must have no access")
}

/// A directory others may pass through but not change: this uid's, not
/// writable by group or others.
pub fn check_dir(path: &Path) -> anyhow::Result<()> {
    check_owned(path, 0o022, "group and others must not be able to write it")
}

/// Makes a directory with `mode` or checks an existing one.
fn make_dir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .with_context(|| dir.display().to_string())?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    }
    if mode & 0o077 == 0 {
        check_private(dir)
    } else {
        check_dir(dir)
    }
}

/// Makes a private directory (0700) or checks an existing one.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    make_dir(dir, 0o700)
}

/// Runtimes run as uids of their own: every directory above the state
/// directory must let others pass (o+x), or no enclave could reach its socket.
fn reachable_by_others(state_dir: &Path) -> anyhow::Result<()> {
    let state_dir = std::fs::canonicalize(state_dir)?;
    for dir in state_dir.ancestors() {
        let mode = std::fs::metadata(dir)?.mode();
        if mode & 0o001 == 0 {
            bail!(StateError(format!(
                "{} has mode {:o}: enclave runtimes run as uids of their own and must pass through it to {} (chmod o+x it, or choose another --state-dir)",
                dir.display(),
                mode & 0o777,
                state_dir.display()
            )));
        }
    }
    Ok(())
}

/// A state or platform directory the supervisor refuses to use.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StateError(pub String);

impl ErrorCode for StateError {
    fn code(&self) -> &'static str {
        "E-SUPERVISOR-STATE"
    }
}

/// (device, inode, size, mtime and ctime in ns) of the runtime binary.
type Stamp = (u64, u64, u64, i128, i128);

/// The runtime binary and its measurement.
struct RuntimeBinary {
    path: PathBuf,
    pcr1: pcr::Pcr,
    /// When measured: a changed file is measured again.
    stamp: Stamp,
}

/// A runtime process started ahead of the next launch, so that a launch does
/// not wait for exec, the dynamic loader and a network namespace: it has done
/// only what is the same for every enclave (its own network namespace) and
/// waits for its start message. It runs the binary of `stamp`; a launch after
/// the binary changed discards it. Its standard error goes to `log`, renamed to
/// the enclave's log when a launch takes it.
struct Spare {
    child: tokio::process::Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    stamp: Stamp,
    log: PathBuf,
}

impl Spare {
    /// Kills it (kill_on_drop; tokio reaps it) and removes its log.
    fn discard(self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The log files of spare runtimes, `spare-*.log` in the logs directory.
const SPARE_LOG_PREFIX: &str = "spare-";

fn stamp(path: &Path) -> anyhow::Result<Stamp> {
    let m =
        std::fs::metadata(path).with_context(|| format!("runtime binary {}", path.display()))?;
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    Ok((
        m.dev(),
        m.ino(),
        m.size(),
        ns(m.mtime(), m.mtime_nsec()),
        ns(m.ctime(), m.ctime_nsec()),
    ))
}

impl RuntimeBinary {
    fn measure(path: PathBuf) -> anyhow::Result<Self> {
        let stamp = stamp(&path)?;
        let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
        Ok(RuntimeBinary {
            pcr1: cloister_runtime::engine::pcr1(&bytes),
            path,
            stamp,
        })
    }
}

struct Running {
    info: EnclaveInfo,
    dir: PathBuf,
    exited: tokio::sync::watch::Receiver<bool>,
}

struct Supervisor {
    options: Options,
    nsm: Nsm,
    cache: CodeCache,
    runtime: Mutex<RuntimeBinary>,
    spare: Mutex<Option<Spare>>,
    enclaves: Mutex<BTreeMap<String, Running>>,
    /// CIDs and names reserved by launches in progress.
    reserved: Mutex<Vec<Reservation>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Errors answered to clients, with their codes.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("uid {0} is not allowed to use this supervisor (see --allow-uid/--allow-gid)")]
    Unauthorized(u32),
    #[error("no running enclave {0}")]
    NotFound(String),
    #[error(
        "uid {0} did not launch enclave {1}: only its owner (or root) may terminate it, call it or read its console"
    )]
    NotOwner(u32, String),
    #[error("CID {0} is already used by a running enclave")]
    CidInUse(u32),
    #[error("an enclave named {0:?} is already running")]
    NameInUse(String),
    #[error(
        "enclave {0} is not in debug mode: its console is not available (run it with --debug-mode)"
    )]
    NotDebug(String),
    #[error("the enclave runtime did not start: {0}")]
    Start(String),
    #[error("{message}")]
    Coded { code: &'static str, message: String },
}

impl Refusal {
    fn code(&self) -> &'static str {
        match self {
            Refusal::Unauthorized(_) | Refusal::NotOwner(..) => "E-SUPERVISOR-UNAUTHORIZED",
            Refusal::NotFound(_) => "E-ENCLAVE-NOT-FOUND",
            Refusal::CidInUse(_) | Refusal::NameInUse(_) => "E-ENCLAVE-IN-USE",
            Refusal::NotDebug(_) => "E-ENCLAVE-NOT-DEBUG",
            Refusal::Start(_) => "E-ENCLAVE-START",
            Refusal::Coded { code, .. } => code,
        }
    }
    fn coded<E: ErrorCode + std::fmt::Display>(e: E) -> Self {
        Refusal::Coded {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

/// Runs the supervisor until SIGTERM or SIGINT; enclaves end with it.
pub fn run(mut options: Options) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        if options.enclave_uid_base < 1000 {
            bail!(StateError(format!(
                "--enclave-uid-base {}: runtime uids must be unprivileged (1000 or more)",
                options.enclave_uid_base
            )));
        }
        // Uids that belong to an account are never handed to a runtime.
        if let Ok(passwd) = std::fs::read_to_string("/etc/passwd") {
            options.allow_uids.extend(
                passwd
                    .lines()
                    .filter_map(|l| l.split(':').nth(2)?.parse::<u32>().ok()),
            );
        }
        let compiler = options.enclave_uid_base.saturating_add(UID_POOL);
        if options.allow_uids.contains(&compiler) {
            bail!(StateError(format!(
                "uid {compiler} (the compiler's: --enclave-uid-base + {UID_POOL}) belongs to an account or an allowed client; choose another --enclave-uid-base"
            )));
        }
    }
    make_dir(&options.state_dir, 0o711)?;
    check_dir(&options.platform_dir)?;
    let nsm = Nsm::load(&PlatformDir::new(&options.platform_dir))?;
    let cache = CodeCache::open(&options.state_dir)?;
    make_dir(&options.state_dir.join("enclaves"), 0o711)?;
    private_dir(&options.state_dir.join("logs"))?;
    // Spares of an earlier supervisor exited with it; their logs go too.
    for entry in std::fs::read_dir(options.state_dir.join("logs"))?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(SPARE_LOG_PREFIX)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if nix::unistd::geteuid().is_root() {
        reachable_by_others(&options.state_dir)?;
    }
    let runtime = RuntimeBinary::measure(options.runtime.clone())?;
    let me = nix::unistd::geteuid();
    if !me.is_root() {
        eprintln!(
            "cloister supervisor: WARNING: not running as root, so every enclave runtime runs as this uid ({me}). \
             A parent running as uid {me} has no boundary to the enclaves; run the parent's commands as another user."
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = cloister_proto::listen(&options.listen).await?;
        if let Address::Unix(path) = &options.listen {
            // Anyone may connect; peer credentials decide who is served.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        }
        let supervisor = Arc::new(Supervisor {
            nsm,
            cache,
            runtime: Mutex::new(runtime),
            spare: Mutex::new(None),
            enclaves: Mutex::new(BTreeMap::new()),
            reserved: Mutex::new(Vec::new()),
            options,
        });
        supervisor.refill_spare();
        eprintln!(
            "cloister supervisor: listening on {}",
            supervisor.options.listen
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    tokio::spawn(client(supervisor.clone(), stream));
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        supervisor.terminate_all().await;
        Ok(())
    })
}

/// The peer's uid and whether it may use the supervisor.
fn authorize(options: &Options, stream: &cloister_proto::Stream) -> Result<u32, Refusal> {
    let cloister_proto::Stream::Unix(s) = stream else {
        return Err(Refusal::Unauthorized(u32::MAX));
    };
    let cred = s.peer_cred().map_err(|_| Refusal::Unauthorized(u32::MAX))?;
    let uid = cred.uid();
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() || options.allow_uids.contains(&uid) {
        return Ok(uid);
    }
    let mut gids = vec![cred.gid()];
    if let Some(pid) = cred.pid()
        && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
        && let Some(line) = status.lines().find(|l| l.starts_with("Groups:"))
    {
        gids.extend(
            line[7..]
                .split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok()),
        );
    }
    if gids.iter().any(|g| options.allow_gids.contains(g)) {
        return Ok(uid);
    }
    Err(Refusal::Unauthorized(uid))
}

async fn client(supervisor: Arc<Supervisor>, mut stream: cloister_proto::Stream) {
    let answer = async {
        let uid = authorize(&supervisor.options, &stream);
        // A refused peer's request is read too, and dropped through a fixed
        // buffer: closing before it is read would make the client's write fail
        // with a broken pipe instead of showing it the refusal. Neither may
        // take longer than CONTROL_READ_TIMEOUT, so a stalled peer holds
        // nothing for long.
        let read = async {
            match uid {
                Ok(_) => frame::recv::<_, Request>(&mut stream, MAX_CONTROL).await,
                Err(_) => frame::skip_frame(&mut stream, MAX_CONTROL)
                    .await
                    .map(|_| None),
            }
        };
        let request = tokio::time::timeout(CONTROL_READ_TIMEOUT, read).await;
        let uid = uid?;
        let request = request
            .map_err(|_| Refusal::Coded {
                code: "E-PROTO-IO",
                message: format!(
                    "the request did not arrive within {} s",
                    CONTROL_READ_TIMEOUT.as_secs()
                ),
            })?
            .map_err(Refusal::coded)?
            .ok_or_else(|| Refusal::NotFound("(no request)".into()))?;
        supervisor.handle(uid, request).await
    }
    .await;
    let reply = match answer {
        Ok(Handled::Reply(r)) => r,
        Ok(Handled::Relay(socket, pid)) => match connect_runtime(&socket, pid).await {
            Ok(mut enclave) => {
                if frame::send(&mut stream, &Reply::Relaying, MAX_CONTROL)
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut enclave).await;
                }
                return;
            }
            Err(message) => Reply::Err {
                code: "E-ENCLAVE-IO".into(),
                message,
            },
        },
        Err(r) => Reply::Err {
            code: r.code().into(),
            message: r.to_string(),
        },
    };
    let _ = frame::send(&mut stream, &reply, MAX_CONTROL).await;
}

/// Root, the supervisor's own uid and the launching uid manage an enclave.
fn may_manage(uid: u32, info: &EnclaveInfo) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw() || uid == info.owner_uid
}

enum Handled {
    Reply(Reply),
    /// Relay the connection to this socket, which must be this runtime's.
    Relay(PathBuf, u32),
}

/// The end of a debug enclave's console, read without following a link the
/// runtime's uid may have put there: only the runtime's own regular file.
fn read_console(dir: &Path, owner: u32) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(dir.join("console.log"))
    else {
        return Vec::new();
    };
    let Ok(meta) = file.metadata() else {
        return Vec::new();
    };
    if !meta.is_file() || meta.uid() != owner {
        return b"(the console is not the enclave's own file; not shown)\n".to_vec();
    }
    let start = meta.len().saturating_sub(MAX_CONSOLE);
    let mut out = Vec::new();
    let _ = file
        .seek(SeekFrom::Start(start))
        .and_then(|_| file.take(MAX_CONSOLE).read_to_end(&mut out));
    out
}

/// Connects to an enclave's socket and checks that the runtime process is at
/// the other end (a link planted in its directory leads elsewhere).
async fn connect_runtime(socket: &Path, pid: u32) -> Result<tokio::net::UnixStream, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("the enclave's socket: {e}"))?;
    let peer = stream
        .peer_cred()
        .map_err(|e| format!("the enclave's socket: {e}"))?;
    if peer.pid() != Some(pid as i32) {
        return Err(format!(
            "the enclave's socket does not lead to its runtime (process {:?}, not {pid}); refused",
            peer.pid()
        ));
    }
    Ok(stream)
}

impl Supervisor {
    async fn handle(self: &Arc<Self>, uid: u32, request: Request) -> Result<Handled, Refusal> {
        Ok(Handled::Reply(match request {
            Request::RunEnclave(spec) => {
                let mut info = self.clone().launch(spec, uid).await?;
                let me = nix::unistd::geteuid().as_raw();
                if uid == me || uid == info.runtime_uid {
                    info.boundary_warning = Some(format!(
                        "the parent (uid {uid}) shares a uid with the {}: this setup has no parent/enclave boundary (the parent could read the enclave's memory and keys). Run the parent's commands as another user.",
                        if uid == info.runtime_uid {
                            "enclave runtime"
                        } else {
                            "supervisor"
                        }
                    ));
                }
                Reply::Enclave(Box::new(info))
            }
            Request::DescribeEnclaves => Reply::Enclaves(
                lock(&self.enclaves)
                    .values()
                    .map(|r| r.info.clone())
                    .collect(),
            ),
            Request::Terminate(which) => {
                let ids: Vec<String> = match which {
                    Some(w) => vec![self.find_owned(&w, uid)?],
                    // "All": all of the caller's (everyone's for root and the supervisor).
                    None => lock(&self.enclaves)
                        .values()
                        .filter(|r| may_manage(uid, &r.info))
                        .map(|r| r.info.enclave_id.clone())
                        .collect(),
                };
                let mut done = Vec::new();
                for id in ids {
                    if let Some(name) = self.terminate(&id).await {
                        done.push((name, id));
                    }
                }
                Reply::Terminated(done)
            }
            Request::Console(which) => {
                let id = self.find_owned(&which, uid)?;
                let (dir, owner) = {
                    let enclaves = lock(&self.enclaves);
                    let r = enclaves
                        .get(&id)
                        .ok_or_else(|| Refusal::NotFound(id.clone()))?;
                    if !r.info.debug {
                        return Err(Refusal::NotDebug(id));
                    }
                    (r.dir.clone(), r.info.runtime_uid)
                };
                Reply::Console(ByteBuf::from(read_console(&dir, owner)))
            }
            Request::Call(which) => {
                let id = self.find_owned(&which, uid)?;
                let enclaves = lock(&self.enclaves);
                let r = enclaves
                    .get(&id)
                    .ok_or_else(|| Refusal::NotFound(id.clone()))?;
                return Ok(Handled::Relay(
                    r.dir.join("enclave.sock"),
                    r.info.process_id,
                ));
            }
        }))
    }

    /// An enclave the caller may manage (see [`may_manage`]).
    fn find_owned(&self, which: &Which, uid: u32) -> Result<String, Refusal> {
        let id = self.find(which)?;
        let enclaves = lock(&self.enclaves);
        match enclaves.get(&id) {
            Some(r) if may_manage(uid, &r.info) => Ok(id),
            Some(r) => Err(Refusal::NotOwner(uid, r.info.enclave_id.clone())),
            None => Err(Refusal::NotFound(which.describe())),
        }
    }

    fn find(&self, which: &Which) -> Result<String, Refusal> {
        lock(&self.enclaves)
            .values()
            .find(|r| which.matches(&r.info))
            .map(|r| r.info.enclave_id.clone())
            .ok_or_else(|| Refusal::NotFound(which.describe()))
    }

    /// Reserves a CID, a name and a runtime uid among the running and starting
    /// enclaves. The uid comes from the pool, whatever CID the parent asked for,
    /// and is never the caller's or an allowed client's. A name taken is
    /// refused, unless it is the image's name used by default: then the first
    /// free of NAME-2, NAME-3... is chosen.
    fn reserve(
        &self,
        name: &str,
        by_default: bool,
        cid: u32,
        caller: u32,
    ) -> Result<Reservation, Refusal> {
        let enclaves = lock(&self.enclaves);
        let mut reserved = lock(&self.reserved);
        let used: Vec<(u32, String, u32)> = enclaves
            .values()
            .map(|r| {
                (
                    r.info.enclave_cid,
                    r.info.enclave_name.clone(),
                    r.info.runtime_uid,
                )
            })
            .chain(reserved.iter().map(|r| (r.cid, r.name.clone(), r.uid)))
            .collect();
        let taken = |n: &str| used.iter().any(|(_, u, _)| u == n);
        let name = if !taken(name) {
            name.to_owned()
        } else if by_default {
            (2..)
                .map(|i| format!("{name}-{i}"))
                .find(|n| !taken(n))
                .ok_or_else(|| Refusal::NameInUse(name.into()))?
        } else {
            return Err(Refusal::NameInUse(name.into()));
        };
        let cid = if cid == 0 {
            (FIRST_CID..=MAX_CID)
                .find(|c| !used.iter().any(|(u, _, _)| u == c))
                .ok_or(Refusal::CidInUse(cid))?
        } else if !(4..=MAX_CID).contains(&cid) || used.iter().any(|(u, _, _)| *u == cid) {
            return Err(Refusal::CidInUse(cid));
        } else {
            cid
        };
        let me = nix::unistd::geteuid();
        let uid = if me.is_root() {
            let base = self.options.enclave_uid_base;
            (base..base.saturating_add(UID_POOL))
                .find(|u| {
                    !used.iter().any(|(_, _, x)| x == u)
                        && *u != caller
                        && !self.options.allow_uids.contains(u)
                })
                .ok_or_else(|| Refusal::Start("no free runtime uid in the pool".into()))?
        } else {
            me.as_raw()
        };
        reserved.push(Reservation {
            cid,
            name: name.clone(),
            uid,
        });
        Ok(Reservation { cid, name, uid })
    }

    fn unreserve(&self, cid: u32) {
        lock(&self.reserved).retain(|r| r.cid != cid);
    }

    /// PCR1 of the runtime binary as it is now on disk.
    fn runtime_binary(&self) -> anyhow::Result<(PathBuf, pcr::Pcr, Stamp)> {
        let mut rt = lock(&self.runtime);
        if stamp(&rt.path)? != rt.stamp {
            *rt = RuntimeBinary::measure(rt.path.clone())?;
        }
        Ok((rt.path.clone(), rt.pcr1, rt.stamp))
    }

    /// Starts a runtime process of `runtime` with its standard error to `log`.
    fn spawn_runtime_process(
        runtime: &Path,
        log: &Path,
    ) -> anyhow::Result<(tokio::process::Child, ChildStdin, ChildStdout)> {
        let log_file = std::fs::File::create(log).with_context(|| log.display().to_string())?;
        let mut child = tokio::process::Command::new(runtime)
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log_file)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| runtime.display().to_string())?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("no channel to the runtime");
        };
        // The boot message (image and compiled code, often MBs) in fewer
        // hand-offs than 64 KiB each, until the runtime is ready; the kernel's
        // limit may refuse, then the pipe keeps its size.
        let _ = nix::fcntl::fcntl(&stdin, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
        Ok((child, stdin, stdout))
    }

    /// Starts a spare runtime process (see [`Spare`]) unless there is one.
    fn refill_spare(&self) {
        if lock(&self.spare).is_some() {
            return;
        }
        let made = self.runtime_binary().and_then(|(path, _, stamp)| {
            let mut rnd = [0u8; 8];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut rnd);
            let log = self
                .options
                .state_dir
                .join("logs")
                .join(format!("{SPARE_LOG_PREFIX}{}.log", hex::encode(rnd)));
            let (child, stdin, stdout) = Self::spawn_runtime_process(&path, &log)?;
            Ok(Spare {
                child,
                stdin,
                stdout,
                stamp,
                log,
            })
        });
        match made {
            Ok(spare) => {
                let mut slot = lock(&self.spare);
                match slot.as_ref() {
                    // Another refill was quicker: this one is not needed.
                    Some(_) => spare.discard(),
                    None => *slot = Some(spare),
                }
            }
            Err(e) => eprintln!("cloister supervisor: no spare runtime process: {e:#}"),
        }
    }

    /// A runtime process of the binary measured as `stamp` for an enclave
    /// whose log is `log`: the spare when it runs that binary and is alive,
    /// else a new process. The caller starts the next spare once its launch is
    /// done (not during it: on few cores the two would compete).
    fn runtime_process(
        &self,
        runtime: &Path,
        stamp: Stamp,
        log: &Path,
    ) -> anyhow::Result<(tokio::process::Child, ChildStdin, ChildStdout)> {
        let spare = lock(&self.spare).take();
        if let Some(mut spare) = spare {
            if spare.stamp == stamp
                && matches!(spare.child.try_wait(), Ok(None))
                && std::fs::rename(&spare.log, log).is_ok()
            {
                return Ok((spare.child, spare.stdin, spare.stdout));
            }
            spare.discard();
        }
        Self::spawn_runtime_process(runtime, log)
    }

    async fn launch(self: Arc<Self>, spec: RunSpec, caller: u32) -> Result<EnclaveInfo, Refusal> {
        let image = Image::parse(&spec.image).map_err(Refusal::coded)?;
        image.verify_signature().map_err(Refusal::coded)?;
        if let Some(m) = spec.memory_mib
            && !(1..=4096).contains(&m)
        {
            return Err(Refusal::Start(format!(
                "--memory-mib {m}: choose 1 to 4096"
            )));
        }
        let slot = match &spec.name {
            Some(name) => self.reserve(name, false, spec.cid, caller)?,
            None => self.reserve(&image.manifest.name, true, spec.cid, caller)?,
        };
        let cid = slot.cid;
        let result = self.clone().start(spec, image, slot, caller).await;
        self.unreserve(cid);
        result
    }

    async fn start(
        self: Arc<Self>,
        spec: RunSpec,
        image: Image,
        slot: Reservation,
        caller: u32,
    ) -> Result<EnclaveInfo, Refusal> {
        let Reservation { cid, name, uid } = slot;
        let start = |e: anyhow::Error| Refusal::Start(format!("{e:#}"));
        let (runtime_path, pcr1, runtime_stamp) = self.runtime_binary().map_err(start)?;
        // PCR3 names the identity whose credentials the runtime signs with (the
        // principal, when no role is given), or a parent holding one principal's
        // key could claim another's role.
        let parent_role = spec
            .parent_role
            .clone()
            .or_else(|| spec.kms.as_ref().map(|k| k.principal.clone()));
        let measurements = image.measurements(
            Some(pcr1),
            parent_role.as_deref(),
            spec.instance_id.as_deref(),
        );
        if let (Some(route), Some(role)) = (&spec.kms, &parent_role)
            && route.principal != *role
        {
            return Err(Refusal::Start(format!(
                "--parent-role {role:?} differs from --kms-principal {:?}: PCR3 must measure the principal whose credentials the enclave uses",
                route.principal
            )));
        }
        let bank = if spec.debug {
            PcrBank::debug()
        } else {
            PcrBank::new(&measurements).map_err(Refusal::coded)?
        };
        let mut rnd = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut rnd);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let enclave_id = format!(
            "i-{}-enc{}",
            host.trim()
                .replace(|c: char| !c.is_ascii_alphanumeric(), ""),
            hex::encode(rnd)
        );
        let dir = self.options.state_dir.join("enclaves").join(&enclave_id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| start(e.into()))?;
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(
                &dir,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(uid)),
            )
            .map_err(|e| start(e.into()))?;
        }
        let log = self.log_path(&enclave_id);
        let launched = self
            .spawn_runtime(
                &runtime_path,
                runtime_stamp,
                &enclave_id,
                &dir,
                &log,
                uid,
                cid,
                &spec,
                &image,
            )
            .await;
        // On a runtime worker thread, which lives as long as the supervisor:
        // the kernel sends a child's parent-death signal when the *thread*
        // that forked it exits (a blocking-pool thread does, after 10 s idle),
        // which would kill the enclave that later takes this spare.
        let supervisor = self.clone();
        tokio::spawn(async move { supervisor.refill_spare() });
        let (mut child, stdin, stdout, ready) = match launched {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                let _ = std::fs::remove_file(&log);
                return Err(e);
            }
        };
        let (hardening, vsock) = ready;
        let memory_mib = spec.memory_mib.unwrap_or(image.manifest.memory_mib);
        let info = EnclaveInfo {
            enclave_name: name,
            enclave_id: enclave_id.clone(),
            process_id: child.id().unwrap_or(0),
            enclave_cid: cid,
            memory_mib,
            debug: spec.debug,
            measurements: bank
                .snapshot()
                .into_iter()
                .filter(|(i, _)| {
                    [0, 1, 2, 3, 4, 8].contains(i) && (spec.debug || measurements.contains_key(i))
                })
                .map(|(i, v)| (format!("PCR{i}"), hex::encode(v)))
                .collect(),
            hardening,
            vsock,
            runtime_uid: uid,
            boundary_warning: None,
            owner_uid: caller,
        };
        let (exited_tx, exited) = tokio::sync::watch::channel(false);
        lock(&self.enclaves).insert(
            enclave_id.clone(),
            Running {
                info: info.clone(),
                dir: dir.clone(),
                exited,
            },
        );
        let supervisor = self.clone();
        tokio::spawn(async move {
            supervisor.serve_nsm(&enclave_id, bank, stdin, stdout).await;
            // The channel ended: the runtime exited, or broke the protocol.
            let _ = child.start_kill();
            let _ = child.wait().await;
            lock(&supervisor.enclaves).remove(&enclave_id);
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(supervisor.log_path(&enclave_id));
            let _ = exited_tx.send(true);
        });
        Ok(info)
    }

    /// Compiles a component in a runtime process of its own (compile mode):
    /// the guest's bytes are untrusted input to Cranelift, so they are compiled
    /// under the runtime's confinement (its own uid past the pool, network
    /// namespace, seccomp allowlist), never in this process, which holds the
    /// NSM key. The result is MAC'd and cached by the caller.
    async fn compile_in_child(
        &self,
        runtime: &Path,
        component: Vec<u8>,
    ) -> anyhow::Result<Vec<u8>> {
        let mut child = tokio::process::Command::new(runtime)
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("the compiler process {}", runtime.display()))?;
        let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("no channel to the compiler process");
        };
        let uid = nix::unistd::geteuid()
            .is_root()
            .then_some(self.options.enclave_uid_base.saturating_add(UID_POOL));
        let work = async {
            frame::send(
                &mut stdin,
                &Start::Compile {
                    uid,
                    component: component.into(),
                },
                MAX_FRAME,
            )
            .await?;
            frame::recv::<_, FromRuntime>(&mut stdout, MAX_FRAME).await
        };
        match tokio::time::timeout(COMPILE_TIMEOUT, work).await {
            Ok(Ok(Some(FromRuntime::Compiled { code }))) => Ok(code.into_vec()),
            Ok(Ok(Some(FromRuntime::Failed { message }))) => bail!("{message}"),
            Ok(Ok(_)) => bail!("the compiler process gave no code"),
            Ok(Err(e)) => bail!("the compiler process failed: {e}"),
            Err(_) => bail!(
                "the compile did not finish within {} s",
                COMPILE_TIMEOUT.as_secs()
            ),
        }
    }

    fn log_path(&self, enclave_id: &str) -> PathBuf {
        self.options
            .state_dir
            .join("logs")
            .join(format!("{enclave_id}.log"))
    }

    #[allow(clippy::too_many_arguments)]
    async fn spawn_runtime(
        &self,
        runtime: &Path,
        runtime_stamp: Stamp,
        enclave_id: &str,
        dir: &Path,
        log_path: &Path,
        uid: u32,
        cid: u32,
        spec: &RunSpec,
        image: &Image,
    ) -> Result<
        (
            tokio::process::Child,
            ChildStdin,
            ChildStdout,
            (cloister_runtime::hardening::Report, Option<String>),
        ),
        Refusal,
    > {
        let start = |e: anyhow::Error| Refusal::Start(format!("{e:#}"));
        let (code, source) = self
            .cache
            .code_for(&image.component, |component| {
                self.compile_in_child(runtime, component)
            })
            .await
            .map_err(start)?;
        if source != crate::cache::Source::Cache {
            eprintln!("cloister supervisor: {enclave_id}: code {source:?}");
        }
        let (mut child, mut stdin, mut stdout) = self
            .runtime_process(runtime, runtime_stamp, log_path)
            .map_err(start)?;
        let boot = Boot {
            enclave_id: enclave_id.to_owned(),
            // As root, the runtime makes its own network namespace, then drops to
            // this uid before anything else.
            uid: nix::unistd::geteuid().is_root().then_some(uid),
            debug: spec.debug,
            memory_mib: spec.memory_mib.unwrap_or(image.manifest.memory_mib),
            image: ByteBuf::from(spec.image.to_vec()),
            code: ByteBuf::from(code),
            socket: dir.join("enclave.sock"),
            console: spec.debug.then(|| dir.join("console.log")),
            vsock_port: 10_000u32.checked_add(cid),
            kms: spec
                .kms
                .as_ref()
                .map(|k| cloister_runtime::channel::KmsRoute {
                    proxy: k.proxy.clone(),
                    principal: k.principal.clone(),
                    principal_key: k.principal_key.clone(),
                }),
        };
        let first = async {
            frame::send(&mut stdin, &Start::Boot(Box::new(boot)), MAX_FRAME).await?;
            frame::recv::<_, FromRuntime>(&mut stdout, MAX_FROM_RUNTIME).await
        };
        let log_tail = || std::fs::read_to_string(log_path).unwrap_or_default();
        match tokio::time::timeout(START_TIMEOUT, first).await {
            Ok(Ok(Some(FromRuntime::Ready { hardening, vsock }))) => {
                // Booted: back to the default size, which is all NSM answers
                // need (the kernel counts pipe capacity per user, and a
                // supervisor that is not root gets small pipes past its limit).
                let _ = nix::fcntl::fcntl(&stdin, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 16));
                Ok((child, stdin, stdout, (hardening, vsock)))
            }
            Ok(Ok(Some(FromRuntime::Failed { message }))) => Err(Refusal::Start(message)),
            Ok(Ok(_)) | Ok(Err(_)) => {
                let status = child.wait().await.ok();
                Err(Refusal::Start(format!(
                    "it exited ({}): {}",
                    status.map(|s| s.to_string()).unwrap_or_default(),
                    log_tail().trim()
                )))
            }
            Err(_) => Err(Refusal::Start(format!(
                "it did not become ready within {} s",
                START_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The NSM for one enclave: its PCR bank and the platform's signing key.
    async fn serve_nsm(
        &self,
        enclave_id: &str,
        mut bank: PcrBank,
        mut stdin: ChildStdin,
        mut stdout: ChildStdout,
    ) {
        while let Ok(Some(message)) =
            frame::recv::<_, FromRuntime>(&mut stdout, MAX_FROM_RUNTIME).await
        {
            let FromRuntime::Nsm(request) = message else {
                break;
            };
            let response = self.nsm_answer(enclave_id, &mut bank, request);
            if frame::send(&mut stdin, &response, MAX_FRAME).await.is_err() {
                break;
            }
        }
    }

    fn nsm_answer(&self, enclave_id: &str, bank: &mut PcrBank, request: NsmRequest) -> NsmResponse {
        fn err<E: ErrorCode + std::fmt::Display>(e: E) -> NsmResponse {
            NsmResponse::Err {
                code: e.code().into(),
                message: e.to_string(),
            }
        }
        match request {
            NsmRequest::DescribePcr(i) => match bank.describe(i.into()) {
                Ok((value, locked)) => NsmResponse::Pcr {
                    value: ByteBuf::from(value.to_vec()),
                    locked,
                },
                Err(e) => err(e),
            },
            NsmRequest::ExtendPcr(i, data) => match bank.extend(i.into(), &data) {
                Ok(value) => NsmResponse::Pcr {
                    value: ByteBuf::from(value.to_vec()),
                    locked: false,
                },
                Err(e) => err(e),
            },
            NsmRequest::LockPcr(i) => bank.lock(i.into()).map_or_else(err, |()| NsmResponse::Done),
            NsmRequest::LockPcrs(range) => {
                let end = usize::from(range);
                if end > PCR_COUNT {
                    return err(cloister_attestation::PcrError::OutOfRange(end));
                }
                // PCR0..15 are locked from the start; lock the runtime registers below `range`.
                bank.lock_range(pcr::FIRST_RUNTIME_PCR.min(end)..end)
                    .map_or_else(err, |()| NsmResponse::Done)
            }
            NsmRequest::Attestation {
                user_data,
                nonce,
                public_key,
            } => self
                .nsm
                .attest(
                    &AttestationRequest {
                        module_id: enclave_id.to_owned(),
                        pcrs: bank.snapshot(),
                        public_key: public_key.map(ByteBuf::into_vec),
                        user_data: user_data.map(ByteBuf::into_vec),
                        nonce: nonce.map(ByteBuf::into_vec),
                    },
                    SystemTime::now(),
                )
                .map_or_else(err, |d| NsmResponse::Document(ByteBuf::from(d))),
        }
    }

    /// SIGTERM, then SIGKILL after 10 s; returns the enclave's name.
    async fn terminate(&self, id: &str) -> Option<String> {
        let (pid, name, mut exited) = {
            let enclaves = lock(&self.enclaves);
            let r = enclaves.get(id)?;
            (
                r.info.process_id,
                r.info.enclave_name.clone(),
                r.exited.clone(),
            )
        };
        if pid == 0 {
            return None;
        }
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let gone = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e))
            .await
            .is_ok();
        if !gone {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = exited.wait_for(|e| *e).await;
        }
        Some(name)
    }

    async fn terminate_all(&self) {
        let ids: Vec<String> = lock(&self.enclaves).keys().cloned().collect();
        for id in ids {
            self.terminate(&id).await;
        }
    }
}
