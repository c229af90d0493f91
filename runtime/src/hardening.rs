//! How the enclave runtime process hardens itself on Linux, and what it reports.
//!
//! Before any thread starts: not dumpable (no ptrace by ordinary users, no
//! /proc/PID/mem), no_new_privs, no core files, and its own empty network
//! namespace where the kernel permits it. After start-up (component compiled,
//! socket bound): a seccomp filter that refuses, with EPERM, process execution,
//! tracing, module and mount operations, new namespaces, and IPv4/IPv6/netlink
//! sockets — so even without a network namespace the runtime has no network of
//! its own; it reaches the key broker only through the parent's proxy on a Unix
//! or vsock socket.

use std::collections::BTreeMap;

use serde::Serialize;

/// What hardening took effect; the runtime publishes it in its state file.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Report {
    pub not_dumpable: bool,
    pub no_new_privs: bool,
    pub no_core_files: bool,
    pub network_namespace: String,
    pub seccomp: String,
    /// The runtime dies with its supervisor (PR_SET_PDEATHSIG).
    pub dies_with_supervisor: bool,
}

/// Steps that must run while the process has a single thread.
pub fn before_threads(report: &mut Report) {
    report.not_dumpable = nix::sys::prctl::set_dumpable(false).is_ok()
        && nix::sys::prctl::get_dumpable().is_ok_and(|d| !d);
    report.no_new_privs = nix::sys::prctl::set_no_new_privs().is_ok();
    report.dies_with_supervisor = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .is_ok()
        && nix::unistd::getppid() != nix::unistd::Pid::from_raw(1);
    report.no_core_files =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0).is_ok();
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

fn filter() -> Result<seccompiler::BpfProgram, String> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
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
    ]
    .into_iter()
    .map(|nr| (nr, always()))
    .collect();
    let family = |f: i32| -> Result<SeccompRule, String> {
        SeccompRule::new(vec![
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, f as u64)
                .map_err(|e| e.to_string())?,
        ])
        .map_err(|e| e.to_string())
    };
    rules.insert(
        libc::SYS_socket,
        vec![
            family(libc::AF_INET)?,
            family(libc::AF_INET6)?,
            family(libc::AF_NETLINK)?,
            family(libc::AF_PACKET)?,
        ],
    );
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// Installs the seccomp filter on every thread of the process.
pub fn after_start(report: &mut Report) {
    report.seccomp = match filter()
        .and_then(|p| seccompiler::apply_filter_all_threads(&p).map_err(|e| e.to_string()))
    {
        Ok(()) => "filter (exec, ptrace, mount, modules, namespaces, inet sockets refused)".into(),
        Err(e) => {
            eprintln!("cloister enclave runtime: WARNING: seccomp filter not installed: {e}");
            format!("not installed: {e}")
        }
    };
}
