//! Errors as AWS KMS names them, with a stable Cloister code each.

use cloister_proto::{CodeInfo, ErrorCode};

/// The AWS-style exception type of a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ErrorKind {
    ValidationException,
    AccessDeniedException,
    NotFoundException,
    AlreadyExistsException,
    InvalidCiphertextException,
    IncorrectKeyException,
    DisabledException,
    KMSInvalidStateException,
    InvalidSignatureException,
    RequestExpiredException,
    LimitExceededException,
    KMSInternalException,
    /// The AWS API's: the access key id is not known.
    UnrecognizedClientException,
    /// The AWS API's: the SigV4 signature is missing or malformed.
    IncompleteSignatureException,
    /// The AWS API's: no such operation (or not `POST /`).
    UnknownOperationException,
    /// The AWS API's: the JSON body is malformed.
    SerializationException,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::ValidationException => "ValidationException",
            ErrorKind::AccessDeniedException => "AccessDeniedException",
            ErrorKind::NotFoundException => "NotFoundException",
            ErrorKind::AlreadyExistsException => "AlreadyExistsException",
            ErrorKind::InvalidCiphertextException => "InvalidCiphertextException",
            ErrorKind::IncorrectKeyException => "IncorrectKeyException",
            ErrorKind::DisabledException => "DisabledException",
            ErrorKind::KMSInvalidStateException => "KMSInvalidStateException",
            ErrorKind::InvalidSignatureException => "InvalidSignatureException",
            ErrorKind::RequestExpiredException => "RequestExpiredException",
            ErrorKind::LimitExceededException => "LimitExceededException",
            ErrorKind::KMSInternalException => "KMSInternalException",
            ErrorKind::UnrecognizedClientException => "UnrecognizedClientException",
            ErrorKind::IncompleteSignatureException => "IncompleteSignatureException",
            ErrorKind::UnknownOperationException => "UnknownOperationException",
            ErrorKind::SerializationException => "SerializationException",
        }
    }
}

/// A failed request: the exception type and a message saying why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{}: {message}", kind.name())]
pub struct KmsError {
    pub kind: ErrorKind,
    pub message: String,
}

impl KmsError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        KmsError {
            kind,
            message: message.into(),
        }
    }
}

macro_rules! ctor {
    ($($fn:ident => $kind:ident),*) => {
        $(pub fn $fn(message: impl Into<String>) -> KmsError { KmsError::new(ErrorKind::$kind, message) })*
    };
}
ctor!(
    validation => ValidationException,
    access_denied => AccessDeniedException,
    not_found => NotFoundException,
    already_exists => AlreadyExistsException,
    invalid_ciphertext => InvalidCiphertextException,
    incorrect_key => IncorrectKeyException,
    disabled => DisabledException,
    invalid_state => KMSInvalidStateException,
    invalid_signature => InvalidSignatureException,
    expired => RequestExpiredException,
    limit_exceeded => LimitExceededException,
    internal => KMSInternalException,
    unrecognized_client => UnrecognizedClientException,
    incomplete_signature => IncompleteSignatureException,
    unknown_operation => UnknownOperationException,
    serialization => SerializationException
);

/// How a refused Recipient's refusal begins; the attestation error's code follows
/// in brackets.
const RECIPIENT_REJECTED: &str = "the Recipient's attestation document was rejected: ";

/// AccessDenied for a Recipient whose attestation document did not verify.
pub fn recipient_rejected(code: &str, why: impl std::fmt::Display) -> KmsError {
    access_denied(format!("{RECIPIENT_REJECTED}[{code}] {why}"))
}

impl KmsError {
    /// Whether this refused a Recipient's document with the attestation code
    /// `code` (as [`recipient_rejected`] wrote it; text that merely contains the
    /// code elsewhere, such as an echoed request value, does not count).
    pub fn rejected_recipient_with(&self, code: &str) -> bool {
        self.kind == ErrorKind::AccessDeniedException
            && self
                .message
                .strip_prefix(RECIPIENT_REJECTED)
                .and_then(|rest| rest.strip_prefix('['))
                .and_then(|rest| rest.strip_prefix(code))
                .is_some_and(|rest| rest.starts_with(']'))
    }
}

impl ErrorCode for KmsError {
    fn code(&self) -> &'static str {
        match self.kind {
            ErrorKind::ValidationException => "E-KMS-VALIDATION",
            ErrorKind::AccessDeniedException => "E-KMS-ACCESS-DENIED",
            ErrorKind::NotFoundException => "E-KMS-NOT-FOUND",
            ErrorKind::AlreadyExistsException => "E-KMS-ALREADY-EXISTS",
            ErrorKind::InvalidCiphertextException => "E-KMS-INVALID-CIPHERTEXT",
            ErrorKind::IncorrectKeyException => "E-KMS-INCORRECT-KEY",
            ErrorKind::DisabledException => "E-KMS-DISABLED",
            ErrorKind::KMSInvalidStateException => "E-KMS-INVALID-STATE",
            ErrorKind::InvalidSignatureException => "E-KMS-INVALID-SIGNATURE",
            ErrorKind::RequestExpiredException => "E-KMS-REQUEST-EXPIRED",
            ErrorKind::LimitExceededException => "E-KMS-LIMIT-EXCEEDED",
            ErrorKind::KMSInternalException => "E-KMS-INTERNAL",
            ErrorKind::UnrecognizedClientException => "E-KMS-UNRECOGNIZED-CLIENT",
            ErrorKind::IncompleteSignatureException => "E-KMS-INCOMPLETE-SIGNATURE",
            ErrorKind::UnknownOperationException => "E-KMS-UNKNOWN-OPERATION",
            ErrorKind::SerializationException => "E-KMS-SERIALIZATION",
        }
    }
}

/// The codes of the key broker.
pub const CODES: &[CodeInfo] = &[
    CodeInfo {
        code: "E-KMS-VALIDATION",
        summary: "ValidationException: the request is malformed",
        explanation: "A parameter is missing, out of range or of the wrong form (key spec, byte count, encryption context, policy JSON, pending window). The message names it.",
    },
    CodeInfo {
        code: "E-KMS-ACCESS-DENIED",
        summary: "AccessDeniedException: a policy refused the request",
        explanation: "Cloister requires BOTH the caller's identity policy and the key's policy to allow a request, and an explicit Deny in either wins. The message names the policy, the statement and the condition with the value seen; the audit log has the same reason. A Recipient whose attestation document does not verify is refused here too.",
    },
    CodeInfo {
        code: "E-KMS-NOT-FOUND",
        summary: "NotFoundException: no such key, alias, principal or trust root",
        explanation: "Check the key id, ARN or alias (alias/NAME). A key whose deletion completed is gone for good.",
    },
    CodeInfo {
        code: "E-KMS-ALREADY-EXISTS",
        summary: "AlreadyExistsException: the name is taken",
        explanation: "An alias, principal or trust-root label with that name exists already.",
    },
    CodeInfo {
        code: "E-KMS-INVALID-CIPHERTEXT",
        summary: "InvalidCiphertextException: the ciphertext blob does not decrypt",
        explanation: "The blob is truncated or altered, was made by another broker, or the encryption context differs from the one given at encryption (it is bound as AAD and must match exactly).",
    },
    CodeInfo {
        code: "E-KMS-INCORRECT-KEY",
        summary: "IncorrectKeyException: the blob belongs to another key",
        explanation: "A KeyId was given with Decrypt and the ciphertext blob was made under a different key.",
    },
    CodeInfo {
        code: "E-KMS-DISABLED",
        summary: "DisabledException: the key is disabled",
        explanation: "Enable it with `cloister kms enable-key` to use it again.",
    },
    CodeInfo {
        code: "E-KMS-INVALID-STATE",
        summary: "KMSInvalidStateException: the key's state forbids the operation",
        explanation: "A key pending deletion cannot be used; cancel the deletion first. Only a key pending deletion can have its deletion cancelled.",
    },
    CodeInfo {
        code: "E-KMS-INVALID-SIGNATURE",
        summary: "InvalidSignatureException: the request is not authentic",
        explanation: "Every request is signed with the principal's Ed25519 key. The principal is unknown, the signature does not verify with its registered public key, or the request id was seen before (a replay).",
    },
    CodeInfo {
        code: "E-KMS-REQUEST-EXPIRED",
        summary: "RequestExpiredException: the request's timestamp is outside the window",
        explanation: "Requests must be signed within 5 minutes of the broker's clock, and after the broker started. Check the client's clock and retry.",
    },
    CodeInfo {
        code: "E-KMS-LIMIT-EXCEEDED",
        summary: "LimitExceededException: too many requests",
        explanation: "The principal exceeded its request rate, or the broker its connection limit. Retry with backoff.",
    },
    CodeInfo {
        code: "E-KMS-INTERNAL",
        summary: "KMSInternalException: the broker could not complete the request",
        explanation: "The keystore or the audit log could not be written; nothing was released. The broker's log says more.",
    },
    CodeInfo {
        code: "E-KMS-UNRECOGNIZED-CLIENT",
        summary: "UnrecognizedClientException: the access key is not known",
        explanation: "A request to the AWS API listener was signed with an access key id this broker did not issue, or one deleted since (or with temporary credentials, which Cloister does not issue). Create one with `cloister kms principal add-access-key` and configure the SDK with it.",
    },
    CodeInfo {
        code: "E-KMS-INCOMPLETE-SIGNATURE",
        summary: "IncompleteSignatureException: the SigV4 signature is missing or malformed",
        explanation: "Requests to the AWS API listener carry an Authorization header AWS4-HMAC-SHA256 Credential=KEY/DATE/REGION/kms/aws4_request, SignedHeaders=... (at least host and x-amz-date), Signature=64 hex digits, and an X-Amz-Date header. Every signed header must be present. AWS SDKs and the aws CLI do this; check a hand-made client.",
    },
    CodeInfo {
        code: "E-KMS-UNKNOWN-OPERATION",
        summary: "UnknownOperationException: not an operation this broker serves",
        explanation: "The AWS API listener serves POST / with X-Amz-Target: TrentService.<Operation> for the operations listed in docs/aws-api.md. Other paths, methods and operations are refused.",
    },
    CodeInfo {
        code: "E-KMS-SERIALIZATION",
        summary: "SerializationException: the request body is not the JSON the operation takes",
        explanation: "The body must be a JSON object (Content-Type: application/x-amz-json-1.1) with the operation's members; blobs in base64. A member Cloister does not know for the operation is refused rather than ignored.",
    },
    CodeInfo {
        code: "E-KMS-UNAUTHENTICATED-RESPONSE",
        summary: "an answer did not come from the pinned key broker",
        explanation: "An enclave accepts only answers signed by the broker key its image names (build-enclave --kms-broker-key), each bound to the SHA-256 of the request it answers. A relay or proxy that answers itself, replays another answer, or alters one is refused; nothing it sent is used.",
    },
    CodeInfo {
        code: "E-KMS-TLS",
        summary: "TLS with the key broker failed or is missing",
        explanation: "Over TCP the broker speaks TLS 1.3 only, and clients must name its CA (--ca, CLOISTER_KMS_CA; for enclaves, the image's measured kms.tls_ca). The handshake failed: the certificate is not from that CA, does not name the host (--tls-name at kms init), or the peer does not speak TLS 1.3.",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_recipient_is_told_apart_from_text_that_merely_names_a_code() {
        let stale = recipient_rejected("E-ATTEST-STALE", "the document is 31 s old");
        assert!(stale.rejected_recipient_with("E-ATTEST-STALE"));
        // A prefix of the code is not the code.
        assert!(!stale.rejected_recipient_with(&"E-ATTEST-STALE"[..13]));
        assert!(!stale.rejected_recipient_with("E-ATTEST-SIGNATURE"));
        // A policy refusal that echoes a request value naming the code.
        let echoed = access_denied(
            "failed condition StringEquals kms:EncryptionContext:app: the request has \"E-ATTEST-STALE\"",
        );
        assert!(!echoed.rejected_recipient_with("E-ATTEST-STALE"));
        let other_kind = validation(stale.message.clone());
        assert!(!other_kind.rejected_recipient_with("E-ATTEST-STALE"));
    }
}
