//! The key broker's wire protocol and its client, apart from the server
//! (`cloister-kms`): what callers of the broker link, the enclave runtime among
//! them, with no keystore, policy engine or SQLite in their tree.
//!
//! - [`protocol`]: signed requests, responses signed by the broker, operations.
//! - [`client`]: a signing client over Unix, vsock or TLS.
//! - [`recipient`]: HPKE `CiphertextForRecipient` for attested operations.
//! - [`error`]: AWS-style exceptions with stable codes.
//! - [`tls`]: the client's TLS configuration.

pub mod client;
pub mod error;
pub mod protocol;
pub mod recipient;
pub mod tls;

pub use error::{ErrorKind, KmsError};

/// Milliseconds since the Unix epoch (0 before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
