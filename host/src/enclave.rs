//! Enclaves as processes: the run directory, launching a detached runtime
//! process per enclave, the runtime's serving loop, and the call protocol.
//!
//! Run directory (`CLOISTER_RUN_DIR`, else `$XDG_RUNTIME_DIR/cloister`, else
//! `/tmp/cloister-UID`):
//!
//! ```text
//! registry.lock                 held while a CID is chosen
//! cache/                        compiled components, by content and wasmtime version
//! enclaves/<EnclaveID>/spec.json    what run-enclave asked for (CID reserved here)
//!                      state.json   written by the runtime once it serves
//!                      enclave.sock the enclave's Unix socket
//!                      console.log  debug console (kept after exit)
//!                      runtime.log  the runtime process's own messages
//!                      terminated   present once terminate-enclave finished
//! ```
//!
//! Call protocol on the enclave socket: the request as data frames (each at most
//! 1 MiB) ended by an empty frame; the answer as one CBOR status frame
//! (`CallStatus`), then, on success, the response as data frames ended by an
//! empty frame.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use cloister_proto::frame;
use cloister_proto::{Address, ErrorCode};

use crate::hardening;
use crate::image::Image;
use crate::runtime::{Enclave, EnclaveConfig, KmsAccess};

/// Data frames of the call protocol carry at most this much.
pub const CHUNK: usize = 1 << 20;
/// The largest request an enclave accepts.
pub const MAX_REQUEST: usize = 64 << 20;
/// The first CID handed out, as Nitro's enclaves start at 16.
pub const FIRST_CID: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Io(String),
    #[error("no enclave {0}")]
    NotFound(String),
    #[error("CID {0} is already used by a running enclave")]
    CidInUse(u32),
    #[error("an enclave named {0:?} is already running")]
    NameInUse(String),
    #[error("the enclave runtime did not start: {0}")]
    RuntimeFailed(String),
    #[error(
        "enclave {0} is not in debug mode: its console is not available (run it with --debug-mode)"
    )]
    NotDebug(String),
    #[error("{message}")]
    Call { code: String, message: String },
}

impl ErrorCode for LaunchError {
    fn code(&self) -> &'static str {
        match self {
            LaunchError::Io(_) => "E-ENCLAVE-IO",
            LaunchError::NotFound(_) => "E-ENCLAVE-NOT-FOUND",
            LaunchError::CidInUse(_) | LaunchError::NameInUse(_) => "E-ENCLAVE-IN-USE",
            LaunchError::RuntimeFailed(_) => "E-ENCLAVE-START",
            LaunchError::NotDebug(_) => "E-ENCLAVE-NOT-DEBUG",
            // The enclave's own code, when it is one of the runtime's.
            LaunchError::Call { code, .. } => crate::runtime::CODES
                .iter()
                .find(|c| c.code == code)
                .map_or("E-ENCLAVE-CALL", |c| c.code),
        }
    }
}

fn io(context: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> LaunchError {
    move |e| LaunchError::Io(format!("{context}: {e}"))
}

pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CLOISTER_RUN_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("cloister");
    }
    PathBuf::from(format!("/tmp/cloister-{}", nix::unistd::getuid()))
}

/// What `run-enclave` asks for; written to spec.json for the runtime process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Spec {
    pub enclave_id: String,
    pub enclave_name: String,
    pub enclave_cid: u32,
    pub image: PathBuf,
    pub debug_mode: bool,
    pub memory_mib: Option<u32>,
    pub parent_role: Option<String>,
    pub instance_id: Option<String>,
    pub platform: PathBuf,
    pub kms_proxy: Option<String>,
    pub kms_principal: Option<String>,
    pub kms_principal_key: Option<PathBuf>,
    pub kms_ca: Option<PathBuf>,
    pub kms_tls_name: Option<String>,
}

/// What the runtime publishes once it serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct State {
    pub process_id: u32,
    pub memory_mib: u32,
    pub measurements: BTreeMap<String, String>,
    pub hardening: hardening::Report,
    pub socket: PathBuf,
    /// The vsock address the enclave also listens on, where the kernel has vsock
    /// loopback: local CID 1, port 10000 + EnclaveCID (enclaves of one host share
    /// its CID, so the port tells them apart).
    pub vsock: Option<String>,
}

/// The vsock port an enclave with this CID listens on.
pub fn vsock_port(cid: u32) -> u32 {
    10_000 + cid
}

/// One enclave's directory.
pub struct EnclaveDir {
    pub dir: PathBuf,
}

impl EnclaveDir {
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("enclave.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn runtime_log(&self) -> PathBuf {
        self.dir.join("runtime.log")
    }
    fn terminated(&self) -> PathBuf {
        self.dir.join("terminated")
    }
    pub fn read_spec(&self) -> Result<Spec, LaunchError> {
        let bytes = std::fs::read(self.spec()).map_err(io(self.spec().display()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| LaunchError::Io(format!("{}: {e}", self.spec().display())))
    }
    pub fn read_state(&self) -> Option<State> {
        serde_json::from_slice(&std::fs::read(self.state()).ok()?).ok()
    }
    /// The runtime process is alive (and is this enclave's, not a reused pid).
    pub fn alive(&self) -> bool {
        let Some(state) = self.read_state() else {
            return false;
        };
        if self.terminated().exists() {
            return false;
        }
        std::fs::read(format!("/proc/{}/cmdline", state.process_id))
            .map(|c| String::from_utf8_lossy(&c).contains(&*self.dir.to_string_lossy()))
            .unwrap_or(false)
    }
}

pub struct Registry {
    pub root: PathBuf,
}

impl Registry {
    pub fn new(root: PathBuf) -> Result<Self, LaunchError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("enclaves"))
            .map_err(io(root.display()))?;
        Ok(Registry { root })
    }

    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }

    pub fn all(&self) -> Vec<EnclaveDir> {
        let mut dirs: Vec<EnclaveDir> = std::fs::read_dir(self.root.join("enclaves"))
            .map(|rd| rd.flatten().map(|e| EnclaveDir { dir: e.path() }).collect())
            .unwrap_or_default();
        dirs.sort_by(|a, b| a.dir.cmp(&b.dir));
        dirs
    }

    /// Finds an enclave by id, name or CID (running or not).
    pub fn find(
        &self,
        id: Option<&str>,
        name: Option<&str>,
        cid: Option<u32>,
    ) -> Result<EnclaveDir, LaunchError> {
        let wanted = id
            .or(name)
            .map(str::to_owned)
            .or(cid.map(|c| format!("CID {c}")))
            .unwrap_or_default();
        // Prefer a running enclave when a name or CID was reused.
        let mut candidates: Vec<EnclaveDir> = self
            .all()
            .into_iter()
            .filter(|d| {
                d.read_spec().is_ok_and(|s| {
                    id.is_none_or(|i| s.enclave_id == i)
                        && name.is_none_or(|n| s.enclave_name == n)
                        && cid.is_none_or(|c| s.enclave_cid == c)
                })
            })
            .collect();
        candidates.sort_by_key(|d| !d.alive());
        candidates
            .into_iter()
            .next()
            .ok_or(LaunchError::NotFound(wanted))
    }

    /// Reserves a CID and a name and writes the spec, under the registry lock.
    fn reserve(&self, mut spec: Spec) -> Result<(EnclaveDir, Spec), LaunchError> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("registry.lock"))
            .map_err(io("registry.lock"))?;
        lock.lock().map_err(io("registry.lock"))?;
        let mut used = std::collections::BTreeSet::new();
        for d in self.all() {
            let Ok(s) = d.read_spec() else { continue };
            // A spec without state is an enclave still starting: its CID is taken.
            if d.alive() || (d.read_state().is_none() && !d.terminated().exists() && starting(&d)) {
                used.insert(s.enclave_cid);
                if s.enclave_name == spec.enclave_name {
                    return Err(LaunchError::NameInUse(spec.enclave_name));
                }
            }
        }
        if spec.enclave_cid == 0 {
            spec.enclave_cid = (FIRST_CID..)
                .find(|c| !used.contains(c))
                .unwrap_or(FIRST_CID);
        } else if used.contains(&spec.enclave_cid) || spec.enclave_cid < 4 {
            return Err(LaunchError::CidInUse(spec.enclave_cid));
        }
        let dir = EnclaveDir {
            dir: self.root.join("enclaves").join(&spec.enclave_id),
        };
        std::fs::create_dir_all(&dir.dir).map_err(io(dir.dir.display()))?;
        let bytes = serde_json::to_vec_pretty(&spec).map_err(|e| LaunchError::Io(e.to_string()))?;
        cloister_attestation::keyfile::write_public(&dir.spec(), &bytes, true)
            .map_err(|e| LaunchError::Io(e.to_string()))?;
        Ok((dir, spec))
    }
}

/// A reservation younger than the start-up timeout still holds its CID.
fn starting(d: &EnclaveDir) -> bool {
    std::fs::metadata(d.spec())
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|e| e < START_TIMEOUT))
}

const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts a runtime process for `spec` and waits until it serves.
pub fn launch(registry: &Registry, spec: Spec) -> Result<(Spec, State), LaunchError> {
    let (dir, spec) = registry.reserve(spec)?;
    let log = std::fs::File::create(dir.runtime_log()).map_err(io("runtime.log"))?;
    let exe = std::env::current_exe().map_err(io("current executable"))?;
    let mut child = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(exe)
            .arg("enclave-runtime")
            .arg("--enclave-dir")
            .arg(&dir.dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(io("cannot start the enclave runtime"))?
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(state) = dir.read_state() {
            return Ok((spec, state));
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.runtime_log()).unwrap_or_default();
            let _ = std::fs::write(dir.terminated(), b"");
            return Err(LaunchError::RuntimeFailed(format!(
                "it exited with {status}: {}",
                log.trim()
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = std::fs::write(dir.terminated(), b"");
            return Err(LaunchError::RuntimeFailed(
                "it did not become ready within 120 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops an enclave: SIGTERM, then SIGKILL after 10 s. Its console log stays.
pub fn terminate(dir: &EnclaveDir) -> Result<(), LaunchError> {
    let state = dir
        .read_state()
        .ok_or_else(|| LaunchError::NotFound(dir.dir.display().to_string()))?;
    if dir.alive() {
        let pid = nix::unistd::Pid::from_raw(state.process_id as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while dir.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if dir.alive() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    std::fs::write(dir.terminated(), b"").map_err(io("terminated marker"))?;
    let _ = std::fs::remove_file(dir.socket());
    Ok(())
}

/// The status frame of a call's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CallStatus {
    Ok,
    Err { code: String, message: String },
}

/// Reads a request or response sent as data frames ended by an empty frame.
pub async fn read_chunks<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Vec<u8>, LaunchError> {
    let mut out = Vec::new();
    loop {
        let chunk = frame::read_frame(r, CHUNK as u32)
            .await
            .map_err(|e| LaunchError::Io(e.to_string()))?
            .ok_or_else(|| {
                LaunchError::Io("the connection closed in the middle of a message".into())
            })?;
        if chunk.is_empty() {
            return Ok(out);
        }
        if out.len() + chunk.len() > max {
            return Err(LaunchError::Call {
                code: "E-ENCLAVE-REQUEST-TOO-LARGE".into(),
                message: format!("the message is over the limit of {max} bytes"),
            });
        }
        out.extend_from_slice(&chunk);
    }
}

pub async fn write_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
) -> Result<(), LaunchError> {
    for chunk in data.chunks(CHUNK) {
        frame::write_frame(w, chunk, CHUNK as u32)
            .await
            .map_err(|e| LaunchError::Io(e.to_string()))?;
    }
    frame::write_frame(w, &[], CHUNK as u32)
        .await
        .map_err(|e| LaunchError::Io(e.to_string()))
}

/// Sends one request to an enclave (its Unix socket or vsock address) and
/// returns its response.
pub async fn call(address: &Address, request: &[u8]) -> Result<Vec<u8>, LaunchError> {
    let mut s = cloister_proto::connect(address)
        .await
        .map_err(|e| LaunchError::Io(e.to_string()))?;
    write_chunks(&mut s, request).await?;
    let status: CallStatus = frame::recv(&mut s, CHUNK as u32)
        .await
        .map_err(|e| LaunchError::Io(e.to_string()))?
        .ok_or_else(|| {
            LaunchError::Io("the enclave closed the connection without answering".into())
        })?;
    match status {
        CallStatus::Ok => read_chunks(&mut s, crate::runtime::MAX_RESPONSE).await,
        CallStatus::Err { code, message } => Err(LaunchError::Call { code, message }),
    }
}

/// The runtime process: hardens itself, starts the enclave, serves calls until
/// SIGTERM. Runs as `cloister enclave-runtime --enclave-dir DIR`.
pub fn runtime_main(dir: PathBuf) -> anyhow::Result<()> {
    let mut report = hardening::Report::default();
    hardening::before_threads(&mut report);
    let dir = EnclaveDir { dir };
    let spec = dir.read_spec()?;
    let image_bytes = std::fs::read(&spec.image).map_err(io(spec.image.display()))?;
    let image = Image::parse(&image_bytes)?;
    image.verify_signature()?;
    let console = if spec.debug_mode {
        Some(std::fs::File::create(dir.console()).map_err(io("console.log"))?)
    } else {
        None
    };
    // PCR3 must name the identity whose credentials the runtime signs with, or a
    // parent holding one principal's key could claim another's role.
    if let (Some(principal), Some(role)) = (&spec.kms_principal, &spec.parent_role)
        && principal != role
    {
        anyhow::bail!(
            "--parent-role {role:?} differs from --kms-principal {principal:?}: PCR3 must measure the principal whose credentials the enclave uses"
        );
    }
    let parent_role = spec
        .parent_role
        .clone()
        .or_else(|| spec.kms_principal.clone());
    let nsm =
        cloister_attestation::Nsm::load(&cloister_attestation::PlatformDir::new(&spec.platform))?;
    let kms = match (
        &spec.kms_proxy,
        &spec.kms_principal,
        &spec.kms_principal_key,
    ) {
        (Some(proxy), Some(principal), Some(key)) => {
            let proxy: Address = proxy.parse()?;
            let tls = match &spec.kms_ca {
                Some(ca) => Some(cloister_kms::tls::ClientTls::new(
                    ca,
                    spec.kms_tls_name.as_deref().unwrap_or("localhost"),
                )?),
                None => None,
            };
            Some(KmsAccess {
                proxy,
                tls,
                principal: principal.clone(),
                key: cloister_attestation::keyfile::read_signing_key(key)?,
            })
        }
        _ => None,
    };
    let registry_cache = dir
        .dir
        .parent()
        .and_then(Path::parent)
        .map(|r| r.join("cache"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let enclave = Enclave::start(EnclaveConfig {
            image,
            debug: spec.debug_mode,
            module_id: spec.enclave_id.clone(),
            parent_role,
            instance_id: spec.instance_id.clone(),
            memory_mib: spec.memory_mib,
            nsm,
            kms,
            console,
            cache_dir: registry_cache,
        })?;
        let enclave = Arc::new(enclave);
        let listener = cloister_proto::listen(&Address::Unix(dir.socket())).await?;
        // vsock only where the kernel has loopback; never probed otherwise.
        let vsock = match cloister_proto::vsock_loopback_available() {
            Ok(()) => {
                let addr = Address::Vsock {
                    cid: u32::MAX,
                    port: vsock_port(spec.enclave_cid),
                };
                match cloister_proto::listen(&addr).await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        eprintln!("cloister enclave runtime: not listening on vsock: {e}");
                        None
                    }
                }
            }
            Err(_) => None,
        };
        hardening::after_start(&mut report);
        let state = State {
            process_id: std::process::id(),
            memory_mib: enclave.memory_mib,
            measurements: enclave
                .pcrs
                .iter()
                .filter(|(i, _)| [0, 1, 2, 3, 4, 8].contains(*i))
                .map(|(i, v)| (format!("PCR{i}"), hex::encode(v)))
                .collect(),
            hardening: report,
            socket: dir.socket(),
            vsock: vsock
                .as_ref()
                .map(|_| format!("vsock:1:{}", vsock_port(spec.enclave_cid))),
        };
        let bytes = serde_json::to_vec_pretty(&state)?;
        cloister_attestation::keyfile::write_public(&dir.state(), &bytes, true)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        if let Some(v) = vsock {
            let enclave = enclave.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = v.accept().await {
                    tokio::spawn(serve_call(enclave.clone(), stream));
                }
            });
        }
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    tokio::spawn(serve_call(enclave.clone(), stream));
                }
                _ = term.recv() => break,
            }
        }
        Ok::<(), anyhow::Error>(())
    })
}

async fn serve_call(enclave: Arc<Enclave>, mut stream: cloister_proto::Stream) {
    let request = match read_chunks(&mut stream, MAX_REQUEST).await {
        Ok(r) => r,
        Err(e) => {
            let _ = frame::send(
                &mut stream,
                &CallStatus::Err {
                    code: e.code().into(),
                    message: e.to_string(),
                },
                CHUNK as u32,
            )
            .await;
            return;
        }
    };
    let result = tokio::task::spawn_blocking(move || enclave.call(&request)).await;
    let status = match &result {
        Ok(Ok(_)) => CallStatus::Ok,
        Ok(Err(e)) => CallStatus::Err {
            code: e.code().into(),
            message: e.to_string(),
        },
        Err(e) => CallStatus::Err {
            code: "E-ENCLAVE-TRAP".into(),
            message: format!("the call's thread failed: {e}"),
        },
    };
    if frame::send(&mut stream, &status, CHUNK as u32)
        .await
        .is_err()
    {
        return;
    }
    if let Ok(Ok(response)) = result {
        let _ = write_chunks(&mut stream, &response).await;
    }
}
