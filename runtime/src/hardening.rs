//! How the enclave runtime process hardens itself on Linux, and what it reports.
//!
//! Before any thread starts: not dumpable (no ptrace by ordinary users, no
//! /proc/PID/mem), no_new_privs, no core files, and its own empty network
//! namespace where the kernel permits it. After start-up (component loaded,
//! socket bound): a seccomp filter that refuses, with EPERM, process execution,
//! tracing, module and mount operations, new namespaces (unshare, setns, clone
//! with a namespace flag; clone3 answers ENOSYS so threads use clone),
//! io_uring, and sockets of every family but Unix and vsock — so even without a
//! network namespace the runtime has no network of its own; it reaches the key
//! broker only through the parent's proxy on a Unix or vsock socket.

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

/// Steps that must run while the process has a single thread: a network
/// namespace of its own (while it may still make one), then, when the
/// supervisor named one, the unprivileged uid (no supplementary groups), then
/// the process flags (after the uid change, which would reset some of them).
pub fn before_threads(report: &mut Report, uid: Option<u32>) -> Result<(), String> {
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

/// The filters: what the runtime never needs fails with EPERM; `clone3`, whose
/// flags a filter cannot read, fails with ENOSYS so that threads are made with
/// `clone`, whose flags it can.
fn filters() -> Result<[seccompiler::BpfProgram; 2], String> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let always = Vec::new;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_kexec_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_userfaultfd,
        // io_uring would perform socket and file operations the filter never sees.
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ]
    .into_iter()
    .map(|nr| (nr, always()))
    .collect();
    let arg = |index: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value).map_err(err)
    };
    // Sockets of any family but Unix and vsock.
    let other_family = || -> Result<SeccompRule, String> {
        SeccompRule::new(vec![
            arg(0, SeccompCmpOp::Ne, libc::AF_UNIX as u64)?,
            arg(0, SeccompCmpOp::Ne, libc::AF_VSOCK as u64)?,
        ])
        .map_err(err)
    };
    rules.insert(libc::SYS_socket, vec![other_family()?]);
    rules.insert(libc::SYS_socketpair, vec![other_family()?]);
    // clone with any namespace flag.
    let namespaces = [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ];
    rules.insert(
        libc::SYS_clone,
        namespaces
            .iter()
            .map(|flag| {
                SeccompRule::new(vec![arg(
                    0,
                    SeccompCmpOp::MaskedEq(*flag as u64),
                    *flag as u64,
                )?])
                .map_err(err)
            })
            .collect::<Result<_, _>>()?,
    );
    let clone3 = BTreeMap::from([(libc::SYS_clone3, always())]);
    Ok([compile(rules, libc::EPERM)?, compile(clone3, libc::ENOSYS)?])
}

/// Installs the seccomp filter on every thread of the process.
pub fn after_start(report: &mut Report) {
    report.seccomp = match filters().and_then(|fs| {
        fs.iter()
            .try_for_each(|p| seccompiler::apply_filter_all_threads(p).map_err(err))
    }) {
        Ok(()) => "filter (exec, ptrace, mount, modules, namespaces, io_uring, sockets but unix/vsock refused)".into(),
        Err(e) => {
            eprintln!("cloister enclave runtime: WARNING: seccomp filter not installed: {e}");
            format!("not installed: {e}")
        }
    };
}
