//! Cloister attestation: measurements, attestation documents, the emulated NSM
//! and the verifier.
//!
//! - [`pcr`]: the 32-register SHA-384 bank and Nitro's measurement recipes.
//! - [`document`]: the COSE_Sign1 attestation document with Nitro's CBOR fields,
//!   decoded strictly.
//! - [`nsm`]: a platform root CA and a per-host NSM certificate (Ed25519 X.509)
//!   and the emulated NSM that signs documents with them.
//! - [`verify`]: the verifier for emulated AND real AWS Nitro documents; trust
//!   anchors are always explicit.
//! - [`keyfile`]: PEM key files, written atomically with mode 0600.

pub mod codes;
pub mod document;
pub mod keyfile;
pub mod nsm;
pub mod pcr;
pub mod verify;

pub use document::{AttestationDocument, DocumentError, SigningAlgorithm, UnverifiedDocument};
pub use nsm::{AttestationRequest, Nsm, NsmError, PlatformDir};
pub use pcr::{Pcr, PcrBank, PcrError};
pub use verify::{TrustAnchor, VerifiedDocument, VerifyError, VerifyOptions, verify};
