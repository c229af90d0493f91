//! The Cloister supervisor — the analog of the Nitro hypervisor and its NSM —
//! and the control protocol its clients (the parent's commands) speak.
//!
//! - [`daemon`]: the long-running process (`cloister supervisor`): it alone
//!   holds the platform's NSM key, the compiled-code cache and the run state;
//!   it measures images, launches one runtime process per enclave, answers
//!   their NSM requests and relays calls to them.
//! - [`cache`]: compiled code bound to the component by a MAC.
//! - [`protocol`]: requests and replies on the control socket, and the client.

pub mod cache;
pub mod daemon;
pub mod protocol;

pub use protocol::{SupervisorError, Which};

/// The supervisor's own codes.
pub const CODES: &[cloister_proto::CodeInfo] = &[
    cloister_proto::CodeInfo {
        code: "E-SUPERVISOR-UNREACHABLE",
        summary: "the supervisor's control socket cannot be reached",
        explanation: "run-enclave, describe-enclaves, terminate-enclave, console and call talk to \
            the supervisor (`cloister supervisor`) on its control socket: CLOISTER_SUPERVISOR, \
            default unix:/run/cloister/supervisor.sock. Start it (the README shows how), or point \
            CLOISTER_SUPERVISOR at it.",
    },
    cloister_proto::CodeInfo {
        code: "E-SUPERVISOR-UNAUTHORIZED",
        summary: "this user may not use the supervisor",
        explanation: "The supervisor serves root, its own uid, and the uids and groups given with \
            --allow-uid and --allow-gid (as Nitro's `ne` group), judged by the peer credentials \
            of the control socket.",
    },
    cloister_proto::CodeInfo {
        code: "E-SUPERVISOR-STATE",
        summary: "the supervisor refuses its state or platform directory",
        explanation: "The state directory and the platform directory (the NSM key) must be owned \
            by the supervisor's uid and writable by no one else; the code cache and its key are \
            closed to group and others (0700 / 0600), so that no parent can read the NSM key or \
            plant compiled code. Run as root, every directory above the state directory must let \
            others pass (o+x): enclave runtimes run as uids of their own.",
    },
];
