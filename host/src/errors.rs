//! How the CLI reports errors: `error[CODE]: message` on stderr, the code found in
//! the typed error somewhere in the chain, and a pointer to `cloister explain`.

use cloister_attestation::keyfile::KeyFileError;
use cloister_attestation::{DocumentError, NsmError, PcrError, VerifyError};
use cloister_image::ImageError;
use cloister_kms::audit::AuditError;
use cloister_kms_api::KmsError;
use cloister_kms_api::client::ClientError;
use cloister_proto::call::CallError;
use cloister_proto::{AddressError, ErrorCode, FrameError, TransportError};
use cloister_runtime::EnclaveError;
use cloister_supervisor::SupervisorError;
use cloister_supervisor::daemon::StateError;

use crate::commands::enclave::ProxyRefused;

/// A mistake in how the command was called that clap cannot see.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl ErrorCode for UsageError {
    fn code(&self) -> &'static str {
        "E-CLI-USAGE"
    }
}

/// An input file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct InputError {
    pub path: String,
    pub source: std::io::Error,
}

impl ErrorCode for InputError {
    fn code(&self) -> &'static str {
        "E-CLI-INPUT"
    }
}

/// The codes of the CLI itself.
pub const CODES: &[cloister_proto::CodeInfo] = &[
    cloister_proto::CodeInfo {
        code: "E-CLI-USAGE",
        summary: "the command was called with an invalid value",
        explanation: "An option's value could not be understood (a PCR written other than N=HEX, \
            a time that is neither RFC 3339 nor Unix milliseconds, an unknown code). The message \
            names the option; `cloister COMMAND --help` shows the syntax.",
    },
    cloister_proto::CodeInfo {
        code: "E-CLI-INPUT",
        summary: "an input file could not be read",
        explanation: "The path does not exist, is not readable by this user, or is a directory.",
    },
    cloister_proto::CodeInfo {
        code: "E-PROXY-NOT-ALLOWED",
        summary: "the proxy refuses a destination its allowlist does not name",
        explanation: "`cloister proxy --to` must be one of the addresses in the administrator's \
            allowlist file (--allowlist, default /etc/cloister/proxy-allowlist.json), which \
            group and others cannot write: the parent cannot point enclaves elsewhere.",
    },
    cloister_proto::CodeInfo {
        code: "E-KMS-AUDIT-TAMPERED",
        summary: "the audit log does not verify",
        explanation: "A line of the audit log was edited, deleted, reordered or cut off, a \
            checkpoint signature does not verify with the broker's key, or the log ends before \
            the head the broker recorded. The message names the first bad line.",
    },
];

/// Every code table, for `cloister explain`.
pub fn tables() -> [&'static [cloister_proto::CodeInfo]; 8] {
    [
        cloister_host::sealing::CODES,
        cloister_proto::codes::CODES,
        cloister_attestation::codes::CODES,
        cloister_kms_api::error::CODES,
        cloister_image::CODES,
        cloister_runtime::CODES,
        cloister_supervisor::CODES,
        CODES,
    ]
}

/// The stable code of the first typed error in the chain.
pub fn code_of(err: &anyhow::Error) -> Option<&'static str> {
    macro_rules! try_types {
        ($e:expr, $($t:ty),*) => {
            $(if let Some(x) = $e.downcast_ref::<$t>() { return Some(x.code()); })*
        };
    }
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<cloister_sealed::SealedError>() {
            return Some(e.code());
        }
        try_types!(
            cause,
            UsageError,
            InputError,
            ProxyRefused,
            SupervisorError,
            StateError,
            CallError,
            ImageError,
            EnclaveError,
            ClientError,
            KmsError,
            AuditError,
            AddressError,
            FrameError,
            TransportError,
            DocumentError,
            VerifyError,
            NsmError,
            KeyFileError,
            PcrError
        );
    }
    None
}

pub fn report(err: &anyhow::Error) {
    // Typed errors often repeat their source's text in their own message; print
    // each cause only when it adds something.
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    match code_of(err) {
        Some(code) => {
            eprintln!("error[{code}]: {message}");
            eprintln!("  (run `cloister explain {code}` for more)");
        }
        None => eprintln!("error: {message}"),
    }
}
