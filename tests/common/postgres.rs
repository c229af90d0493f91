//! A real PostgreSQL server for tests: its own cluster in a temporary
//! directory, on a loopback port, stopped when dropped. Started from Debian's
//! packages (`scripts/test` installs them where it can); without a server
//! the tests that need one say so and skip, except under CI, where they fail.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Postgres {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    /// More server options (TLS).
    tls: Vec<String>,
}

/// The newest installed server's bin directory (`/usr/lib/postgresql/N/bin`).
fn bindir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// The uid and gid the server runs as: root may not run it, so under root
/// the `postgres` account (or `nobody`).
fn server_user() -> Option<(u32, u32)> {
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .or_else(|| nix::unistd::User::from_name("nobody").ok().flatten())?;
        Some((user.uid.as_raw(), user.gid.as_raw()))
    } else {
        None
    }
}

fn as_server_user(program: &Path, user: Option<(u32, u32)>) -> Command {
    match user {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Postgres {
    /// Starts a server, or returns None (saying why) where none is installed.
    pub fn start() -> Option<Postgres> {
        let Some(bin) = bindir() else {
            let why = "no PostgreSQL server is installed (/usr/lib/postgresql/*/bin/postgres; Debian: apt-get install postgresql)";
            assert!(std::env::var_os("CI").is_none(), "under CI: {why}");
            eprintln!("SKIPPED: {why}");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let user = server_user();
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        for d in [&data, &sockets] {
            std::fs::create_dir(d).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        if let Some((uid, gid)) = user {
            for d in [&data, &sockets] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
            }
        }
        let init = as_server_user(&bin.join("initdb"), user)
            .args(["-D", data.to_str().unwrap()])
            .args(["-U", "cloister", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let mut pg = Postgres {
            dir,
            child: None,
            port: super::free_port(),
            bin,
            user,
            tls: Vec::new(),
        };
        pg.run();
        Some(pg)
    }

    /// As [`Postgres::start`], accepting TCP connections over TLS only (its
    /// certificate, for 127.0.0.1 and localhost, from a CA that openssl makes);
    /// returns the server and the CA's PEM file. Its own client uses the Unix socket.
    pub fn start_tls() -> Option<(Postgres, PathBuf)> {
        let mut pg = Postgres::start()?;
        let dir = pg.dir.path().join("tls");
        std::fs::create_dir(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"],
                &ec[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=Test PostgreSQL CA",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"],
                &ec[..],
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        if let Some((uid, gid)) = pg.user {
            std::os::unix::fs::chown(dir.join("server.key"), Some(uid), Some(gid)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(
            pg.dir.path().join("data/pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n",
        )
        .unwrap();
        pg.tls = vec![
            "-c".into(),
            "ssl=on".into(),
            "-c".into(),
            format!("ssl_cert_file={}", dir.join("server.pem").display()),
            "-c".into(),
            format!("ssl_key_file={}", dir.join("server.key").display()),
        ];
        pg.stop();
        pg.run();
        Some((pg, dir.join("ca.pem")))
    }

    /// Starts the server on the cluster (again) and waits until it answers.
    fn run(&mut self) {
        let data = self.dir.path().join("data");
        let sockets = self.dir.path().join("sockets");
        let child = as_server_user(&self.bin.join("postgres"), self.user)
            .args(["-D", data.to_str().unwrap()])
            .args(["-p", &self.port.to_string()])
            .args(["-k", sockets.to_str().unwrap()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=300"])
            .args(&self.tls)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.config("postgres").connect(postgres::NoTls) {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "PostgreSQL did not start: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// SIGKILL to the server and all its processes, as a machine losing power
    /// (what was not flushed is lost), then a restart on the same cluster
    /// (crash recovery replays its write-ahead log).
    pub fn crash_and_restart(&mut self) {
        let mut postmaster = self.child.take().unwrap();
        let pid = postmaster.id().to_string();
        let children = Command::new("pgrep").args(["-P", &pid]).output().unwrap();
        let _ = postmaster.kill();
        for child in String::from_utf8_lossy(&children.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", child]).status();
        }
        postmaster.wait().unwrap();
        // The old processes must be gone before the shared memory is reused.
        let deadline = Instant::now() + Duration::from_secs(10);
        while String::from_utf8_lossy(&children.stdout)
            .split_whitespace()
            .any(|c| Path::new(&format!("/proc/{c}")).exists())
        {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL's processes did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.run();
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://cloister@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database; returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.client("postgres")
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        self.url(name)
    }

    /// A client of the test's own, through the server's Unix socket.
    pub fn client(&self, database: &str) -> postgres::Client {
        self.config(database).connect(postgres::NoTls).unwrap()
    }

    fn config(&self, database: &str) -> postgres::Config {
        let mut config = postgres::Config::new();
        config
            .host_path(self.dir.path().join("sockets"))
            .port(self.port)
            .user("cloister")
            .dbname(database);
        config
    }

    /// The postmaster's pid (the setpriv wrapper execs the server).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Postgres {
    /// Stops the server (fast shutdown), as a database outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Fast shutdown (SIGINT); the setpriv wrapper execs the server.
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
