//! The broker's wire protocol: CBOR messages in Cloister frames.
//!
//! A request is a [`SignedRequest`]: the CBOR bytes of a [`RequestPayload`] and an
//! Ed25519 signature by the principal over `"cloister-kms-request-v1\0" || payload`.
//! The broker verifies the signature over the exact bytes it received, then
//! decodes them — no canonicalisation is needed.
//!
//! The reply is a [`SignedResponse`]: the CBOR bytes of a [`Response`] and the
//! broker's Ed25519 signature over `"cloister-kms-response-v1\0" || response`.
//! The response names the SHA-256 of the request payload it answers, so a
//! caller that pins the broker's key (an enclave runtime, through its image)
//! knows that the broker, and no relay, answered this very request.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::KmsError;

pub const REQUEST_LABEL: &[u8] = b"cloister-kms-request-v1\0";
pub const RESPONSE_LABEL: &[u8] = b"cloister-kms-response-v1\0";
/// The largest response frame the broker sends.
pub const MAX_MESSAGE: u32 = 256 * 1024;
/// The largest request frame the broker reads (a 32 KB key policy, an
/// attestation document and an 8 KB encryption context fit with room).
pub const MAX_REQUEST: u32 = 64 * 1024;

/// Secret bytes (plaintext, data keys): zeroized on drop, redacted in Debug.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(pub Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(Zeroizing::new(bytes))
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret([{} bytes redacted])", self.0.len())
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let buf = serde_bytes::ByteBuf::deserialize(d)?;
        Ok(Secret::new(buf.into_vec()))
    }
}

pub type EncryptionContext = BTreeMap<String, String>;

/// An attestation document offered so that the result is encrypted to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub key_encryption_algorithm: String,
    #[serde(with = "serde_bytes")]
    pub attestation_document: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operation {
    CreateKey {
        description: String,
        policy: Option<String>,
    },
    DescribeKey {
        key_id: String,
    },
    ListKeys,
    CreateAlias {
        alias_name: String,
        target_key_id: String,
    },
    ListAliases,
    DeleteAlias {
        alias_name: String,
    },
    Encrypt {
        key_id: String,
        plaintext: Secret,
        encryption_context: EncryptionContext,
    },
    Decrypt {
        #[serde(with = "serde_bytes")]
        ciphertext_blob: Vec<u8>,
        key_id: Option<String>,
        encryption_context: EncryptionContext,
        recipient: Option<Recipient>,
    },
    ReEncrypt {
        #[serde(with = "serde_bytes")]
        ciphertext_blob: Vec<u8>,
        source_key_id: Option<String>,
        source_encryption_context: EncryptionContext,
        destination_key_id: String,
        destination_encryption_context: EncryptionContext,
    },
    /// A data key of `key_spec` (AES_256, AES_128) or of `number_of_bytes`.
    GenerateDataKey {
        key_id: String,
        key_spec: String,
        #[serde(default)]
        number_of_bytes: Option<u32>,
        encryption_context: EncryptionContext,
        recipient: Option<Recipient>,
    },
    /// A data key returned only as its ciphertext blob.
    GenerateDataKeyWithoutPlaintext {
        key_id: String,
        key_spec: String,
        #[serde(default)]
        number_of_bytes: Option<u32>,
        encryption_context: EncryptionContext,
    },
    GenerateRandom {
        number_of_bytes: u32,
        recipient: Option<Recipient>,
    },
    PutKeyPolicy {
        key_id: String,
        policy: String,
    },
    GetKeyPolicy {
        key_id: String,
    },
    EnableKey {
        key_id: String,
    },
    DisableKey {
        key_id: String,
    },
    RotateKey {
        key_id: String,
    },
    /// Automatic rotation every `rotation_period_in_days` (90 to 2560; 365 if none).
    EnableKeyRotation {
        key_id: String,
        rotation_period_in_days: Option<u32>,
    },
    DisableKeyRotation {
        key_id: String,
    },
    GetKeyRotationStatus {
        key_id: String,
    },
    ScheduleKeyDeletion {
        key_id: String,
        pending_window_in_days: u32,
    },
    CancelKeyDeletion {
        key_id: String,
    },
    PrincipalAdd {
        name: String,
        #[serde(with = "serde_bytes")]
        public_key: Vec<u8>,
        policy: String,
    },
    PrincipalList,
    PrincipalRemove {
        name: String,
    },
    /// An access key id and secret (SigV4, the AWS API listener) for a principal.
    AccessKeyCreate {
        principal: String,
    },
    /// The access key ids (never the secrets), of one principal or all.
    AccessKeyList {
        principal: Option<String>,
    },
    AccessKeyDelete {
        access_key_id: String,
    },
    TrustAdd {
        label: String,
        #[serde(with = "serde_bytes")]
        root_der: Vec<u8>,
    },
    TrustList,
    TrustRemove {
        label: String,
    },
}

impl Operation {
    /// The policy action this operation needs (ReEncrypt needs two, see the broker).
    pub fn action(&self) -> &'static str {
        match self {
            Operation::CreateKey { .. } => "kms:CreateKey",
            Operation::DescribeKey { .. } => "kms:DescribeKey",
            Operation::ListKeys => "kms:ListKeys",
            Operation::CreateAlias { .. } => "kms:CreateAlias",
            Operation::ListAliases => "kms:ListAliases",
            Operation::DeleteAlias { .. } => "kms:DeleteAlias",
            Operation::Encrypt { .. } => "kms:Encrypt",
            Operation::Decrypt { .. } => "kms:Decrypt",
            Operation::ReEncrypt { .. } => "kms:ReEncryptFrom",
            Operation::GenerateDataKey { .. } => "kms:GenerateDataKey",
            Operation::GenerateDataKeyWithoutPlaintext { .. } => {
                "kms:GenerateDataKeyWithoutPlaintext"
            }
            Operation::GenerateRandom { .. } => "kms:GenerateRandom",
            Operation::PutKeyPolicy { .. } => "kms:PutKeyPolicy",
            Operation::GetKeyPolicy { .. } => "kms:GetKeyPolicy",
            Operation::EnableKey { .. } => "kms:EnableKey",
            Operation::DisableKey { .. } => "kms:DisableKey",
            Operation::RotateKey { .. } => "kms:RotateKeyOnDemand",
            Operation::EnableKeyRotation { .. } => "kms:EnableKeyRotation",
            Operation::DisableKeyRotation { .. } => "kms:DisableKeyRotation",
            Operation::GetKeyRotationStatus { .. } => "kms:GetKeyRotationStatus",
            Operation::ScheduleKeyDeletion { .. } => "kms:ScheduleKeyDeletion",
            Operation::CancelKeyDeletion { .. } => "kms:CancelKeyDeletion",
            Operation::PrincipalAdd { .. } => "cloister:PrincipalAdd",
            Operation::PrincipalList => "cloister:PrincipalList",
            Operation::PrincipalRemove { .. } => "cloister:PrincipalRemove",
            Operation::AccessKeyCreate { .. } => "cloister:AccessKeyCreate",
            Operation::AccessKeyList { .. } => "cloister:AccessKeyList",
            Operation::AccessKeyDelete { .. } => "cloister:AccessKeyDelete",
            Operation::TrustAdd { .. } => "cloister:TrustAdd",
            Operation::TrustList => "cloister:TrustList",
            Operation::TrustRemove { .. } => "cloister:TrustRemove",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestPayload {
    pub principal: String,
    pub timestamp_ms: u64,
    pub request_id: String,
    pub operation: Operation,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRequest {
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedRequest {
    /// Encodes and signs a payload.
    pub fn sign(
        payload: &RequestPayload,
        key: &SigningKey,
    ) -> Result<Self, cloister_proto::FrameError> {
        let payload = cloister_proto::frame::encode(payload)?;
        let signature = key
            .sign(&[REQUEST_LABEL, &payload].concat())
            .to_bytes()
            .to_vec();
        Ok(SignedRequest { payload, signature })
    }
}

/// A result encrypted to a recipient, with the exact HPKE `info` and `aad`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CiphertextForRecipient {
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub info: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub aad: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMetadata {
    pub key_id: String,
    pub arn: String,
    pub description: String,
    pub key_state: String,
    pub creation_date: String,
    pub deletion_date: Option<String>,
    pub current_version: u32,
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrincipalInfo {
    pub name: String,
    pub public_key_hex: String,
    pub policy: String,
}

/// An access key as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyInfo {
    pub access_key_id: String,
    pub principal: String,
    pub create_date: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRootInfo {
    pub label: String,
    pub subject: String,
    pub fingerprint_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    KeyMetadata(KeyMetadata),
    Keys(Vec<(String, String)>),
    Aliases(Vec<(String, String)>),
    Ciphertext {
        key_id: String,
        #[serde(with = "serde_bytes")]
        ciphertext_blob: Vec<u8>,
    },
    ReEncrypted {
        source_key_id: String,
        key_id: String,
        #[serde(with = "serde_bytes")]
        ciphertext_blob: Vec<u8>,
    },
    Plaintext {
        key_id: Option<String>,
        plaintext: Option<Secret>,
        ciphertext_for_recipient: Option<CiphertextForRecipient>,
    },
    DataKey {
        key_id: String,
        #[serde(with = "serde_bytes")]
        ciphertext_blob: Vec<u8>,
        plaintext: Option<Secret>,
        ciphertext_for_recipient: Option<CiphertextForRecipient>,
    },
    KeyPolicy(String),
    Rotated {
        key_id: String,
        version: u32,
    },
    DeletionScheduled {
        key_id: String,
        deletion_date: String,
    },
    RotationStatus {
        key_id: String,
        enabled: bool,
        period_in_days: Option<u32>,
        next_rotation_date: Option<String>,
    },
    /// The key an operation acted on (CancelKeyDeletion).
    KeyId(String),
    /// A new access key; the secret is shown this once.
    AccessKey {
        info: AccessKeyInfo,
        secret_access_key: Secret,
    },
    AccessKeys(Vec<AccessKeyInfo>),
    Principals(Vec<PrincipalInfo>),
    TrustRoots(Vec<TrustRootInfo>),
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub request_id: String,
    /// SHA-256 of the signed request's payload bytes ([`request_digest`]);
    /// empty when the broker refused before it read a request.
    #[serde(with = "serde_bytes")]
    pub request_digest: Vec<u8>,
    pub result: Result<Output, KmsError>,
}

/// What a response answers: the SHA-256 of the request payload's exact bytes.
pub fn request_digest(payload: &[u8]) -> Vec<u8> {
    Sha256::digest(payload).to_vec()
}

/// A [`Response`] as sent: its CBOR bytes and the broker's signature over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedResponse {
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a response was not accepted as the broker's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("the response is malformed: {0}")]
    Malformed(String),
    #[error("the response is not signed by the broker's key (answered by something else?)")]
    BadSignature,
}

impl SignedResponse {
    pub fn sign(response: &Response, key: &SigningKey) -> Result<Self, cloister_proto::FrameError> {
        let payload = cloister_proto::frame::encode(response)?;
        let signature = key
            .sign(&[RESPONSE_LABEL, &payload].concat())
            .to_bytes()
            .to_vec();
        Ok(SignedResponse { payload, signature })
    }

    /// The response, its signature checked against the broker's key.
    pub fn verify(&self, broker: &VerifyingKey) -> Result<Response, ResponseError> {
        let signature =
            Signature::from_slice(&self.signature).map_err(|_| ResponseError::BadSignature)?;
        broker
            .verify_strict(&[RESPONSE_LABEL, &self.payload].concat(), &signature)
            .map_err(|_| ResponseError::BadSignature)?;
        self.decode_unverified()
    }

    /// The response without checking who signed it (for callers that rely on
    /// TLS or a local socket alone).
    pub fn decode_unverified(&self) -> Result<Response, ResponseError> {
        cloister_proto::frame::decode(&self.payload)
            .map_err(|e| ResponseError::Malformed(e.to_string()))
    }
}
