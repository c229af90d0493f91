//! The Cloister key broker (KMS analog).
//!
//! - [`policy`]: AWS-style identity and key policies and the two-factor check.

pub mod policy;
