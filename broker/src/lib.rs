//! The Cloister key broker (KMS analog).
//!
//! - [`policy`]: AWS-style identity and key policies and the two-factor check.
//! - [`crypto`]: the root key, the ciphertext blob format, encryption contexts.
//! - [`recipient`]: HPKE `CiphertextForRecipient` for attested operations.
//! - [`error`]: AWS-style exceptions with stable codes.

pub mod audit;
pub mod client;
pub mod crypto;
pub mod datadir;
pub mod error;
pub mod keystore;
pub mod policy;
pub mod protocol;
pub mod recipient;
pub mod server;
pub mod service;
pub mod tls;

pub use error::{ErrorKind, KmsError};
