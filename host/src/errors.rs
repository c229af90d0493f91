//! How the CLI reports errors: `error[CODE]: message` on stderr, the code found in
//! the typed error somewhere in the chain, and a pointer to `cloister explain`.

use cloister_attestation::keyfile::KeyFileError;
use cloister_attestation::{DocumentError, NsmError, PcrError, VerifyError};
use cloister_channel::ChannelError;
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

/// Codes that workloads return through `cloister call`: the guest SDK's
/// (`cloister-guest`, `cloister-sealed`'s request parts) and those of the
/// workloads shipped in `examples/`.
pub const WORKLOAD_CODES: &[cloister_proto::CodeInfo] = &[
    cloister_proto::CodeInfo {
        code: "E-WORKLOAD-INPUT",
        summary: "the workload refused its input",
        explanation: "A sealed input was not sealed with the encryption context the workload's \
            measured configuration requires (e.g. purpose=records), or the input is not what the \
            workload reads. The message names the context it wants; seal the input with it.",
    },
    cloister_proto::CodeInfo {
        code: "E-WORKLOAD-CONFIG",
        summary: "the image's measured configuration lacks or garbles a value the workload needs",
        explanation: "Workloads read settings (output key, encryption contexts, model digest) \
            from the configuration measured into the image (`build-enclave --config k=v`). The \
            message names the key; rebuild the image with it (this changes PCR0).",
    },
    cloister_proto::CodeInfo {
        code: "E-REQUEST-PARTS",
        summary: "the request is not a set of named parts, or lacks one",
        explanation: "Workloads that take several inputs (a model and records) receive them as \
            named parts (`cloister call --part NAME=FILE`). The message names the missing or \
            malformed part.",
    },
    cloister_proto::CodeInfo {
        code: "E-DEMO-NONCE",
        summary: "the attestation demo needs a nonce of 1 to 1024 bytes",
        explanation: "examples/attest-demo returns an attestation document that answers the \
            caller's challenge: send 1 to 1024 random bytes as the request.",
    },
    cloister_proto::CodeInfo {
        code: "E-PHI-RECORD",
        summary: "a single record sent to the PHI scorer is not a patient row",
        explanation: "Sent in the clear (through the attested channel), the PHI scorer takes CSV \
            rows patient_id,sex,age,total_cholesterol,hdl,systolic_bp,bp_treated,smoker,diabetes \
            (at most 10,000, the header optional) with values in the model's validated ranges; \
            the message names the row and the field.",
    },
    cloister_proto::CodeInfo {
        code: "E-INFERENCE-RECORD",
        summary: "a single record sent to the inference workload is not a record of the model",
        explanation: "Records sent in the clear (through the attested channel) are taken only \
            by an image whose measured configuration has clear-records=allow (then anyone who \
            can call the enclave can query the model, and PCR0 says so). The records part is \
            CSV rows record_id,f1,..,fN with as many features as the model takes (at most \
            10,000); the message says how many were malformed.",
    },
    cloister_proto::CodeInfo {
        code: "E-INFERENCE-MODEL",
        summary: "the inference workload could not load the model",
        explanation: "The opened model is not an ONNX graph the engine (tract) can run, or its \
            class names are malformed. Export it as examples/inference/train does.",
    },
    cloister_proto::CodeInfo {
        code: "E-INFERENCE-MODEL-MISMATCH",
        summary: "the model is not the one the image's measured configuration names",
        explanation: "An inference image names its model's SHA-256 in its measured configuration \
            (so PCR0 tells a client which model runs): any other model is refused, even one \
            sealed under the right key. Build an image for the new model.",
    },
];

/// Every code table, for `cloister explain`.
pub fn tables() -> [&'static [cloister_proto::CodeInfo]; 10] {
    [
        cloister_channel::CODES,
        cloister_host::sealing::CODES,
        cloister_proto::codes::CODES,
        cloister_attestation::codes::CODES,
        cloister_kms_api::error::CODES,
        cloister_image::CODES,
        cloister_runtime::CODES,
        cloister_supervisor::CODES,
        CODES,
        WORKLOAD_CODES,
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
            PcrError,
            ChannelError
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// Literals that look like codes and are not: proto's test of an unknown code.
    const NOT_CODES: &[&str] = &["NOPE"];

    /// Every `"E-..."` literal in the workspace's sources (the crates, the
    /// guest SDK and the example workloads): each is a code some error carries.
    fn codes_in_sources() -> BTreeSet<(String, String)> {
        fn walk(dir: &Path, found: &mut BTreeSet<(String, String)>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name();
                if path.is_dir() {
                    // Tests name codes they expect (already checked by their
                    // `failed_with`) and prefixes; the test guest's codes are
                    // the tests' own.
                    if !["target", ".git", "tests", "test-guest"]
                        .iter()
                        .any(|skip| name == *skip)
                    {
                        walk(&path, found);
                    }
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    for piece in text.split("\"E-").skip(1) {
                        let code: String = piece
                            .chars()
                            .take_while(|c| {
                                c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '-'
                            })
                            .collect();
                        if piece[code.len()..].starts_with('"')
                            && !code.is_empty()
                            && !code.ends_with('-')
                            && !NOT_CODES.contains(&code.as_str())
                        {
                            found.insert((format!("E-{code}"), path.display().to_string()));
                        }
                    }
                }
            }
        }
        let mut found = BTreeSet::new();
        walk(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
            &mut found,
        );
        found
    }

    #[test]
    fn every_code_in_the_sources_is_explained() {
        let known: BTreeSet<&str> = super::tables()
            .iter()
            .flat_map(|t| t.iter().map(|c| c.code))
            .collect();
        let found = codes_in_sources();
        assert!(found.len() > 50, "the scan found only {found:?}");
        let unexplained: Vec<_> = found
            .iter()
            .filter(|(code, _)| !known.contains(code.as_str()))
            .collect();
        assert!(
            unexplained.is_empty(),
            "codes that `cloister explain` does not know: {unexplained:#?}"
        );
    }
}
