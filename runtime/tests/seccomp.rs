//! The runtime's seccomp filters, installed in a child process (they bind every
//! thread of the process that installs them): inet sockets, new listeners,
//! exec, writing files, io_uring and new namespaces are refused; Unix sockets,
//! reading files and new threads still work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::ErrorKind;
use std::process::Command;

const CHILD: &str = "CLOISTER_SECCOMP_PROBE";

fn errno_of(ret: i64) -> i32 {
    assert_eq!(ret, -1, "the call succeeded");
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

/// Runs in the child: install the filters, then probe.
fn probe() {
    // Made before the filters: afterwards no directory can be made.
    let dir = tempfile::tempdir().unwrap();
    let mut report = cloister_runtime::hardening::Report::default();
    cloister_runtime::hardening::after_start(&mut report);
    assert!(
        report.seccomp.starts_with("allowlist"),
        "{}",
        report.seccomp
    );

    let inet = std::net::TcpListener::bind("127.0.0.1:0").unwrap_err();
    assert_eq!(inet.kind(), ErrorKind::PermissionDenied, "{inet}");
    let inet6 = std::net::UdpSocket::bind("[::1]:0").unwrap_err();
    assert_eq!(inet6.kind(), ErrorKind::PermissionDenied, "{inet6}");
    // Unix sockets work (the proxy, the call socket), new listeners do not.
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    use std::io::{Read, Write};
    a.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    b.read_exact(&mut one).unwrap();
    let bind = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap_err();
    assert_eq!(bind.kind(), ErrorKind::PermissionDenied, "{bind}");
    // No programs, no files written; files read, yes.
    let exec = Command::new("/bin/true").status().unwrap_err();
    assert_eq!(exec.kind(), ErrorKind::PermissionDenied, "{exec}");
    let write = std::fs::File::create(dir.path().join("f")).unwrap_err();
    assert_eq!(write.kind(), ErrorKind::PermissionDenied, "{write}");
    std::fs::read("/proc/self/status").unwrap();
    // Threads (clone3 answers ENOSYS, glibc falls back to clone).
    assert_eq!(std::thread::spawn(|| 42).join().unwrap(), 42);
    assert_eq!(
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER),
        Err(nix::errno::Errno::EPERM)
    );
    #[allow(unsafe_code)]
    // SAFETY: raw syscalls the filter must refuse before the kernel reads any
    // argument. Should one get through: io_uring_setup with a null parameter
    // pointer fails with EFAULT; a clone that succeeds exits its child at once.
    unsafe {
        let r = libc::syscall(libc::SYS_io_uring_setup, 1, std::ptr::null_mut::<u8>());
        assert_eq!(errno_of(r), libc::EPERM, "io_uring_setup");
        let flags = (libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::SIGCHLD) as libc::c_ulong;
        let r = libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0);
        if r == 0 {
            libc::_exit(0);
        }
        assert_eq!(errno_of(r), libc::EPERM, "clone with namespace flags");
        let r = libc::syscall(libc::SYS_clone3, std::ptr::null_mut::<u8>(), 0);
        assert_eq!(errno_of(r), libc::ENOSYS, "clone3");
    }
}

#[test]
fn the_filters_refuse_what_the_runtime_never_needs() {
    if std::env::var_os(CHILD).is_some() {
        probe();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_filters_refuse_what_the_runtime_never_needs",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the probe did not run and pass:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
