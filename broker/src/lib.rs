//! The Cloister key broker (KMS analog): the server. Its wire protocol and client
//! are `cloister-kms-api`.
//!
//! - [`policy`]: AWS-style identity and key policies and the two-factor check.
//! - [`crypto`]: the root key, the ciphertext blob format, encryption contexts.
//! - [`aws`]: the AWS KMS JSON API with SigV4, a second front end.
//! - [`cms`]: `CiphertextForRecipient` in AWS's CMS form (RSA recipients).
//! - [`keystore`], [`audit`], [`service`], [`server`]: storage, the audit log,
//!   the operations, the listeners.

pub mod audit;
pub mod aws;
pub mod cms;
pub mod crypto;
pub mod datadir;
pub mod keystore;
pub mod policy;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;

pub use cloister_kms_api::{ErrorKind, KmsError, error, protocol, recipient};
