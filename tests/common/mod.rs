//! Helpers shared by the end-to-end tests: run the `cloister` binary, parse
//! its JSON, expect failures with stable codes, and manage server processes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod inference;
pub mod postgres;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cloister")
}

pub fn cloister<A: AsRef<OsStr>>(args: &[A]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run cloister")
}

pub fn cloister_env<A: AsRef<OsStr>>(args: &[A], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run cloister")
}

pub fn json_of(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e})"))
}

pub fn ok_json<A: AsRef<OsStr> + std::fmt::Debug>(args: &[A]) -> serde_json::Value {
    json_of(&cloister(args), &format!("cloister {args:?}"))
}

/// Asserts that `out` failed with `code` and printed nothing on stdout; returns stderr.
pub fn failed_with(out: &Output, code: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "succeeded but should fail with {code}"
    );
    assert!(out.stdout.is_empty(), "a failing command printed to stdout");
    assert!(
        stderr.contains(&format!("error[{code}]")),
        "want {code}, got: {stderr}"
    );
    // Every code a user can meet is one that `cloister explain` knows.
    assert!(
        cloister(&["explain", code]).status.success(),
        "`cloister explain {code}` does not know the code"
    );
    stderr
}

pub fn fails_with<A: AsRef<OsStr> + std::fmt::Debug>(args: &[A], code: &str) -> String {
    failed_with(&cloister(args), code)
}

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A child process that is killed (SIGKILL) when dropped, unless stopped first.
pub struct Server {
    pub child: Option<Child>,
}

impl Server {
    /// Starts `cloister ARGS` and waits until `socket` accepts connections.
    pub fn start<A: AsRef<OsStr>>(args: &[A], env: &[(&str, &str)], socket: &Path) -> Server {
        let mut c = Command::new(bin());
        c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn server");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("server exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits; returns the exit status and stderr.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        signal(child.id(), "TERM");
        let out = wait_output(&mut child);
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

fn wait_output(child: &mut Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = Vec::new();
            use std::io::Read;
            if let Some(mut e) = child.stderr.take() {
                e.read_to_end(&mut stderr).unwrap();
            }
            return Output {
                status,
                stdout: Vec::new(),
                stderr,
            };
        }
        assert!(Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Builds the guest workloads in examples/ (wasm32-wasip2) once and returns the
/// path of one, e.g. `guest("test_guest")`.
pub fn guest(name: &str) -> std::path::PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let target = examples.join("target");
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--release", "--locked", "--target", "wasm32-wasip2", "--manifest-path"])
            .arg(examples.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("RUSTFLAGS")
            .output()
            .expect("run cargo for the guests");
        assert!(
            out.status.success(),
            "building the guests failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let path = target
        .join("wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A scratch area with its own platform and a supervisor (its own process,
/// on its own control socket) that the parent's commands talk to.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub supervisor: Option<Server>,
}

/// Builds the runtime binary that the supervisor launches, once per test
/// process: it belongs to another package, which `cargo test -p cloister-host`
/// would otherwise leave as it was.
pub fn runtime_binary() {
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "--locked",
            "-p",
            "cloister-runtime",
            "--bin",
            "cloister-runtime",
        ]);
        // The benchmark runs a `cloister` of the bench profile (in
        // target/release), whose supervisor starts the runtime beside it; the
        // same profile, so that the two builds do not replace each other's.
        if !cfg!(debug_assertions) {
            build.args(["--profile", "bench"]);
        }
        let out = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo for the runtime");
        assert!(
            out.status.success(),
            "building cloister-runtime failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

impl Host {
    pub fn new() -> Host {
        runtime_binary();
        let dir = tempfile::tempdir().unwrap();
        // Enclave runtimes run as uids of their own (when the tests run as root):
        // they pass through this directory to reach the proxy's socket.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut h = Host {
            dir,
            supervisor: None,
        };
        h.ok(&["platform", "init", "--dir", s(&h.path("platform"))]);
        h.start_supervisor(&[]);
        h
    }
    /// (Re)starts the supervisor with extra options.
    pub fn start_supervisor(&mut self, extra: &[&str]) {
        if let Some(old) = self.supervisor.take() {
            old.terminate();
        }
        let sock = self.path("supervisor.sock");
        let listen = format!("unix:{}", s(&sock));
        let state = self.path("state");
        let platform = self.path("platform");
        let mut args = vec![
            "supervisor",
            "--state-dir",
            s(&state),
            "--platform",
            s(&platform),
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        self.supervisor = Some(Server::start(&args, &[], &sock));
    }
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![(
            "CLOISTER_SUPERVISOR",
            format!("unix:{}", s(&self.path("supervisor.sock"))),
        )]
    }
    pub fn run(&self, args: &[&str]) -> Output {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cloister_env(args, &env)
    }
    pub fn ok(&self, args: &[&str]) -> serde_json::Value {
        json_of(&self.run(args), &format!("{args:?}"))
    }
    pub fn build(&self, out: &str, extra: &[&str]) -> (std::path::PathBuf, serde_json::Value) {
        self.build_guest("test_guest", "test", out, extra)
    }
    /// Builds an image of one of the example guests.
    pub fn build_guest(
        &self,
        guest_name: &str,
        name: &str,
        out: &str,
        extra: &[&str],
    ) -> (std::path::PathBuf, serde_json::Value) {
        let image = self.path(out);
        let wasm = guest(guest_name);
        let mut args = vec![
            "build-enclave",
            "--wasm",
            s(&wasm),
            "--name",
            name,
            "--version",
            "1.0",
            "--output",
            s(&image),
        ];
        args.extend_from_slice(extra);
        let v = self.ok(&args);
        (image, v)
    }
    /// The PHI scorer (needing no broker for single records) running as the
    /// enclave `scorer`: its image and measurements.
    pub fn launch_scorer(&self) -> (std::path::PathBuf, serde_json::Value) {
        let (image, built) = self.build_guest(
            "phi_scorer",
            "phi-scorer",
            "scorer.cimg",
            &["--config", "output-key-id=alias/phi-results"],
        );
        self.ok(&[
            "run-enclave",
            "--image",
            s(&image),
            "--enclave-name",
            "scorer",
        ]);
        (image, built)
    }
    pub fn call(&self, which: &[&str], request: &[u8]) -> Output {
        let req = self.path("request.bin");
        std::fs::write(&req, request).unwrap();
        let mut args = vec!["call", "--input", s(&req)];
        args.extend_from_slice(which);
        self.run(&args)
    }
    pub fn call_ok(&self, which: &[&str], request: &[u8]) -> Vec<u8> {
        let out = self.call(which, request);
        assert!(
            out.status.success(),
            "call {:?}: {}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The supervisor's enclaves end with it.
        if let Some(sup) = self.supervisor.take() {
            sup.terminate();
        }
    }
}

/// A key broker (`kms serve` on a Unix socket) and a `cloister proxy` to it, in a
/// [`Host`]'s directory, trusting the host's platform root.
pub struct Broker {
    pub data: std::path::PathBuf,
    pub sock: std::path::PathBuf,
    pub proxy_sock: std::path::PathBuf,
    _servers: Vec<Server>,
}

pub const ALLOW_ALL_KMS: &str =
    r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}"#;

impl Broker {
    pub fn start(h: &Host) -> Broker {
        Broker::start_with(h, &[])
    }

    /// As [`Broker::start`], with more options of `kms serve`.
    pub fn start_with(h: &Host, serve_args: &[&str]) -> Broker {
        let data = h.path("kms");
        h.ok(&["kms", "init", "--data-dir", s(&data)]);
        let sock = h.path("kms.sock");
        let kms_addr = format!("unix:{}", s(&sock));
        let mut args = vec![
            "kms",
            "serve",
            "--data-dir",
            s(&data),
            "--listen",
            &kms_addr,
        ];
        args.extend_from_slice(serve_args);
        let kms = Server::start(&args, &[], &sock);
        let proxy_sock = h.path("proxy.sock");
        let allowlist = h.path("proxy-allowlist.json");
        std::fs::write(&allowlist, format!("{{\"allowlist\":[\"{kms_addr}\"]}}")).unwrap();
        let proxy = Server::start(
            &[
                "proxy",
                "--listen",
                &format!("unix:{}", s(&proxy_sock)),
                "--to",
                &kms_addr,
                "--allowlist",
                s(&allowlist),
            ],
            &[],
            &proxy_sock,
        );
        let broker = Broker {
            data,
            sock,
            proxy_sock,
            _servers: vec![kms, proxy],
        };
        broker.admin(&[
            "kms",
            "trust",
            "add",
            "--root",
            s(&h.path("platform/root.pem")),
            "--label",
            "host",
        ]);
        broker
    }

    /// The broker process's pid.
    pub fn pid(&self) -> u32 {
        self._servers[0].pid()
    }

    /// Options of build-enclave that make an image trust this broker.
    pub fn trust_args(&self) -> Vec<String> {
        vec![
            "--kms-broker-key".into(),
            s(&self.data.join("broker.pub")).to_owned(),
        ]
    }

    /// A PHI scorer image (at `out`) trusting this broker, sealing its results
    /// under alias/phi-results with the encryption context `context` (k=v,k=v).
    pub fn scorer_image(
        &self,
        h: &Host,
        context: &str,
        out: &str,
        extra: &[&str],
    ) -> (std::path::PathBuf, serde_json::Value) {
        let mut args = self.trust_args();
        args.extend([
            "--config".to_owned(),
            "output-key-id=alias/phi-results".to_owned(),
            "--config".to_owned(),
            format!("output-context={context}"),
        ]);
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        h.build_guest("phi_scorer", "phi-scorer", out, &args)
    }

    /// A client command as `principal` with its key.
    pub fn client(&self, principal: &str, key: &Path, args: &[&str]) -> Output {
        let endpoint = format!("unix:{}", s(&self.sock));
        cloister_env(
            args,
            &[
                ("CLOISTER_KMS_ENDPOINT", &endpoint),
                ("CLOISTER_PRINCIPAL", principal),
                ("CLOISTER_PRINCIPAL_KEY", s(key)),
            ],
        )
    }

    /// `principal` (with its `key`) creates a key under the key policy in the
    /// file `policy` and names it `alias`; returns the key id.
    pub fn create_key(&self, principal: &str, key: &Path, policy: &Path, alias: &str) -> String {
        let run = |args: &[&str]| {
            json_of(
                &self.client(principal, key, args),
                &format!("{principal} {args:?}"),
            )
        };
        let id = run(&[
            "kms",
            "create-key",
            "--policy",
            &format!("file://{}", s(policy)),
        ])["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_owned();
        run(&[
            "kms",
            "create-alias",
            "--alias-name",
            alias,
            "--target-key-id",
            &id,
        ]);
        id
    }

    pub fn admin(&self, args: &[&str]) -> serde_json::Value {
        json_of(
            &self.client("admin", &self.data.join("admin.key"), args),
            &format!("admin {args:?}"),
        )
    }

    /// Makes a key pair at `key` (and `key`.pub) and registers it as `name`, allowed kms:*.
    pub fn add_principal(&self, name: &str, key: &Path) {
        let public = key.with_extension("pub");
        json_of(
            &cloister(&[
                "keygen",
                "--private-key",
                s(key),
                "--public-key",
                s(&public),
            ]),
            "keygen",
        );
        let policy = key.with_extension("identity.json");
        std::fs::write(&policy, ALLOW_ALL_KMS).unwrap();
        self.admin(&[
            "kms",
            "principal",
            "add",
            "--name",
            name,
            "--public-key",
            s(&public),
            "--policy",
            &format!("file://{}", s(&policy)),
        ]);
    }
}

/// `run-enclave` for an enclave of `image` whose parent acts as `role` (PCR3 and
/// KMS principal, with `key`), reaching the broker through the proxy at `proxy`.
pub fn run_enclave_args(
    image: &Path,
    name: &str,
    role: &str,
    proxy: &Path,
    key: &Path,
) -> Vec<String> {
    [
        "run-enclave",
        "--image",
        s(image),
        "--enclave-name",
        name,
        "--parent-role",
        role,
        "--kms-proxy",
        &format!("unix:{}", s(proxy)),
        "--kms-principal",
        role,
        "--kms-principal-key",
        s(key),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A relay the test controls, between the enclave and `cloister proxy`: it keeps
/// every byte that crosses the parent side in either direction.
pub fn capturing_relay(
    listen: PathBuf,
    to: PathBuf,
    captured: Arc<Mutex<Vec<u8>>>,
) -> Arc<RelayConnections> {
    let listener = std::os::unix::net::UnixListener::bind(&listen).unwrap();
    // Enclave runtimes run as uids of their own: any uid may connect.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&listen, std::fs::Permissions::from_mode(0o666)).unwrap();
    let connections = Arc::new(RelayConnections::default());
    let control = connections.clone();
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { continue };
            let Ok(outbound) = std::os::unix::net::UnixStream::connect(&to) else {
                continue;
            };
            control
                .accepted
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            control
                .open
                .lock()
                .unwrap()
                .push(inbound.try_clone().unwrap());
            splice_capturing(inbound, outbound, captured.clone());
        }
    });
    connections
}

/// A connected socket the capturing relays can splice.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> std::io::Result<Self>;
    fn shutdown_write(&self);
}

impl Duplex for std::os::unix::net::UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::os::unix::net::UnixStream::try_clone(self)
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl Duplex for std::net::TcpStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::net::TcpStream::try_clone(self)
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// Copies both ways between two sockets on threads of their own, keeping
/// every byte that crosses in `captured`.
pub fn splice_capturing<S: Duplex>(inbound: S, outbound: S, captured: Arc<Mutex<Vec<u8>>>) {
    for (mut from, into) in [
        (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
        (outbound, inbound),
    ] {
        let captured = captured.clone();
        std::thread::spawn(move || {
            let mut into = into;
            let mut buf = [0u8; 16384];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || into.write_all(&buf[..n]).is_err() {
                    break;
                }
                captured.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            into.shutdown_write();
        });
    }
}

/// The connections a [`capturing_relay`] accepted, and a way to cut them.
#[derive(Default)]
pub struct RelayConnections {
    pub accepted: std::sync::atomic::AtomicUsize,
    open: Mutex<Vec<std::os::unix::net::UnixStream>>,
}

impl RelayConnections {
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Closes every connection relayed so far, as a proxy or broker that drops
    /// idle connections would.
    pub fn cut(&self) {
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// [`python_with`] the packages a requirements file (of the repository) pins.
pub fn python_with_requirements(file: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let packages: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    python_with(&packages)
}

/// A Python interpreter in a virtual environment (kept in the target
/// directory) with `packages` installed from PyPI, for independent clients.
/// `None`, said on stderr, where Python or the packages cannot be had —
/// except under CI (`CI` set), where that fails the test.
pub fn python_with(packages: &[&str]) -> Option<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut name: String = packages
        .iter()
        .map(|p| p.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
        .collect::<Vec<_>>()
        .join("-");
    if name.len() > 100 {
        use sha2::Digest;
        name = hex::encode(&sha2::Sha256::digest(name.as_bytes())[..12]);
    }
    let skip = |why: &str| {
        assert!(
            std::env::var_os("CI").is_none(),
            "{why}: CI runs the independent clients"
        );
        eprintln!("{why}: skipping the Python client");
        None
    };
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("venv-{name}"));
    let python = venv.join("bin/python");
    if venv.join("ready").exists() {
        return Some(python);
    }
    // Test binaries run one after another; within one, the lock serialises.
    let _ = std::fs::remove_dir_all(&venv);
    let ran = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    if !ran(Command::new("python3").args(["-m", "venv"]).arg(&venv)) {
        return skip("python3 -m venv failed");
    }
    if !ran(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages))
    {
        return skip(&format!("pip install {packages:?} failed (no PyPI?)"));
    }
    std::fs::write(venv.join("ready"), "").unwrap();
    Some(python)
}
