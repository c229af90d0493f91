//! The Cloister enclave runtime: one hardened process per enclave, started by
//! the supervisor (the hypervisor analog) as the `cloister-runtime` binary,
//! measured as PCR1.
//!
//! - [`channel`]: the private channel to the supervisor (boot, NSM requests).
//! - [`engine`]: wasmtime and the workload's imports.
//! - [`hardening`]: what the process does to itself on Linux.
//! - [`serve`]: the process's life: boot, serve calls, exit.
//!
//! Its dependency tree holds no broker server, no SQLite and no CLI (a test in
//! `tests/layout.rs` checks it).

pub mod channel;
pub mod engine;
pub mod gateway;
pub mod hardening;
pub mod serve;

pub use engine::{CODES, EnclaveError};
