//! How the enclave runtime process hardens itself on Linux, and what it reports.
//!
//! Before any thread starts: its own empty network namespace where the kernel
//! permits it (as root), then the unprivileged uid the supervisor chose (no
//! supplementary groups), then not dumpable (no ptrace by ordinary users, no
//! /proc/PID/mem), no_new_privs, no core files, death with the supervisor.
//! After start-up (component loaded,
//! socket bound): a seccomp allowlist — I/O on its descriptors, Unix and vsock
//! sockets, memory, threads without namespace flags, signals, time — so that
//! exec, ptrace, mounts, modules, unshare/setns, io_uring, bpf, and sockets of
//! any other family fail with EPERM (clone3 with ENOSYS, so threads use clone).
//! Even without a network namespace the runtime has no network of its own; it
//! reaches the key broker only through the parent's proxy.

use std::collections::BTreeMap;

use serde::Serialize;

/// What hardening took effect; the runtime reports it to the supervisor, which
/// shows it in describe-enclaves.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Report {
    pub not_dumpable: bool,
    pub no_new_privs: bool,
    pub no_core_files: bool,
    pub network_namespace: String,
    pub seccomp: String,
    /// The runtime dies with its supervisor (PR_SET_PDEATHSIG).
    pub dies_with_supervisor: bool,
    /// The uid the runtime runs as.
    pub uid: u32,
}

/// The first step, before the supervisor's start message (a runtime started
/// ahead of the next launch has done it by then): a network namespace of its
/// own, while the process may still make one.
pub fn own_network_namespace(report: &mut Report) {
    report.network_namespace = match nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        Ok(()) => "own (empty)".into(),
        Err(e) => {
            eprintln!(
                "cloister enclave runtime: WARNING: cannot enter a network namespace of its own ({e}); \
                 falling back to the seccomp socket filter alone"
            );
            format!("shared with the host ({e}); inet sockets blocked by seccomp")
        }
    };
}

/// Steps that must run while the process has a single thread, after
/// [`own_network_namespace`]: when the supervisor named one, the unprivileged
/// uid (no supplementary groups), then the process flags (after the uid
/// change, which would reset some of them).
pub fn before_threads(report: &mut Report, uid: Option<u32>) -> Result<(), String> {
    if let Some(uid) = uid {
        use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
        let (u, g) = (Uid::from_raw(uid), Gid::from_raw(uid));
        setgroups(&[])
            .and_then(|()| setresgid(g, g, g))
            .and_then(|()| setresuid(u, u, u))
            .map_err(|e| format!("cannot drop to uid {uid}: {e}"))?;
    }
    report.uid = nix::unistd::getuid().as_raw();
    report.not_dumpable = nix::sys::prctl::set_dumpable(false).is_ok()
        && nix::sys::prctl::get_dumpable().is_ok_and(|d| !d);
    report.no_new_privs = nix::sys::prctl::set_no_new_privs().is_ok();
    report.dies_with_supervisor = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .is_ok()
        && nix::unistd::getppid() != nix::unistd::Pid::from_raw(1);
    report.no_core_files =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0).is_ok();
    Ok(())
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn compile(
    rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>>,
    errno: i32,
) -> Result<seccompiler::BpfProgram, String> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(errno as u32),
        arch,
    )
    .map_err(err)?
    .try_into()
    .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// The system calls the runtime makes once it serves (found by tracing it
/// through the test suite, plus their close relatives: the vector and 64-bit
/// forms, exit paths, clocks). Everything else fails with EPERM.
const ALLOWED: &[i64] = &[
    // I/O on descriptors it already has, and the event loop.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_ppoll,
    // Sockets it connects or accepts on (socket itself is filtered below).
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // Memory: the heap, wasm linear memories, fiber stacks, CoW memory images.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_membarrier,
    // Signals (wasm traps are signals), threads, time, randomness, exit.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_prlimit64,
    libc::SYS_uname,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_arch_prctl,
];

/// The filters, in the order they are installed. The first makes `clone3`,
/// whose flags a filter cannot read, fail with ENOSYS, so that threads are made
/// with `clone`. The second (installed last: nothing is installed after it)
/// allows [`ALLOWED`] and, with their arguments checked: sockets of the Unix and
/// vsock families, clone without namespace flags, prctl to name a thread, and
/// opening files read-only; anything else fails with EPERM. The kernel takes the
/// strictest answer of the two, so clone3 gets ENOSYS.
fn filters() -> Result<[seccompiler::BpfProgram; 2], String> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let arg = |index: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).map_err(err)
    };
    let rule = |conditions: Vec<SeccompCondition>| SeccompRule::new(conditions).map_err(err);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .chain([&libc::SYS_clone3])
        .map(|nr| (*nr, Vec::new()))
        .collect();
    let families = || -> Result<Vec<SeccompRule>, String> {
        Ok(vec![
            rule(vec![arg(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])?,
            rule(vec![arg(0, SeccompCmpOp::Eq, libc::AF_VSOCK as u64)?])?,
        ])
    };
    rules.insert(libc::SYS_socket, families()?);
    rules.insert(libc::SYS_socketpair, families()?);
    let namespaces = (libc::CLONE_NEWUSER
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP) as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![arg(0, SeccompCmpOp::MaskedEq(namespaces), 0)?])?],
    );
    rules.insert(
        libc::SYS_prctl,
        vec![rule(vec![arg(
            0,
            SeccompCmpOp::Eq,
            libc::PR_SET_NAME as u64,
        )?])?],
    );
    let writes = (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u64;
    rules.insert(
        libc::SYS_openat,
        vec![rule(vec![arg(2, SeccompCmpOp::MaskedEq(writes), 0)?])?],
    );
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    let allowlist: seccompiler::BpfProgram = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::SeccompAction::Allow,
        arch,
    )
    .map_err(err)?
    .try_into()
    .map_err(|e: seccompiler::BackendError| e.to_string())?;
    let clone3 = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    Ok([compile(clone3, libc::ENOSYS)?, allowlist])
}

/// Installs the seccomp filter on every thread of the process.
pub fn after_start(report: &mut Report) {
    report.seccomp = match filters().and_then(|fs| {
        fs.iter()
            .try_for_each(|p| seccompiler::apply_filter_all_threads(p).map_err(err))
    }) {
        Ok(()) => "allowlist (I/O on its descriptors, unix/vsock sockets, memory, threads without namespaces, time; all else EPERM)".into(),
        Err(e) => {
            eprintln!("cloister enclave runtime: WARNING: seccomp filter not installed: {e}");
            format!("not installed: {e}")
        }
    };
}
