//! The host side of Cloister: enclave images and the enclave runtime. The
//! `cloister` binary (src/main.rs) is the CLI over them.

pub mod enclave;
pub mod hardening;
pub mod image;
pub mod runtime;
pub mod sealing;
