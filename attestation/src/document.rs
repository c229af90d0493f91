//! The attestation document: a COSE_Sign1 (RFC 9052) over a CBOR map with the
//! field names and types of AWS Nitro Enclaves.
//!
//! ```text
//! AttestationDocument = {
//!     module_id:   text,                 ; non-empty
//!     digest:      "SHA384",
//!     timestamp:   uint,                 ; milliseconds since the Unix epoch
//!     pcrs:        { + uint => bstr },   ; index 0..31, 48 bytes each
//!     certificate: bstr,                 ; DER, the signing (NSM) certificate
//!     cabundle:    [ + bstr ],           ; DER, root first
//!     ? public_key: bstr / nil,          ; at most 1024 bytes
//!     ? user_data:  bstr / nil,          ; at most 1024 bytes
//!     ? nonce:      bstr / nil,          ; at most 1024 bytes
//! }
//! ```
//!
//! Decoding is strict: every field is type-checked, unknown or repeated keys and
//! trailing bytes are refused, and the 1024-byte limit on the last three fields is
//! enforced on both encode and decode.

use std::collections::BTreeMap;

use ciborium::Value;
use coset::{
    CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable, iana,
};

use cloister_proto::ErrorCode;

use crate::pcr::{PCR_COUNT, PCR_LEN};

/// The largest attestation document accepted (real Nitro documents are ~4.5 KiB).
pub const MAX_DOCUMENT_LEN: usize = 32 * 1024;
/// The limit on each of `public_key`, `user_data` and `nonce`.
pub const MAX_USER_FIELD_LEN: usize = 1024;
/// The only digest Cloister and Nitro use.
pub const DIGEST_SHA384: &str = "SHA384";

/// The COSE tag for COSE_Sign1.
const COSE_SIGN1_TAG: u8 = 0xd2;

/// The payload of an attestation document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationDocument {
    pub module_id: String,
    pub digest: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    pub pcrs: BTreeMap<usize, Vec<u8>>,
    pub certificate: Vec<u8>,
    pub cabundle: Vec<Vec<u8>>,
    pub public_key: Option<Vec<u8>>,
    pub user_data: Option<Vec<u8>>,
    pub nonce: Option<Vec<u8>>,
}

/// The signature algorithms an attestation document may be signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SigningAlgorithm {
    /// EdDSA with Ed25519 (COSE alg -8): Cloister's emulated NSM.
    EdDSA,
    /// ECDSA P-384 with SHA-384 (COSE alg -35): AWS Nitro's NSM.
    ES384,
}

impl SigningAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            SigningAlgorithm::EdDSA => "EdDSA",
            SigningAlgorithm::ES384 => "ES384",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("attestation document is {len} bytes, more than the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("not a COSE_Sign1 structure: {0}")]
    Cose(String),
    #[error("COSE algorithm {0} is not accepted: expected EdDSA (-8) or ES384 (-35)")]
    Algorithm(String),
    #[error("malformed attestation document payload: {0}")]
    Cbor(String),
    #[error("attestation document field `{field}`: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    #[error("attestation document field `{field}` is {len} bytes, more than the limit of {max}")]
    FieldTooLarge {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

impl ErrorCode for DocumentError {
    fn code(&self) -> &'static str {
        match self {
            DocumentError::TooLarge { .. } => "E-ATTEST-DOCUMENT-TOO-LARGE",
            DocumentError::Cose(_) => "E-ATTEST-COSE",
            DocumentError::Algorithm(_) => "E-ATTEST-ALGORITHM",
            DocumentError::Cbor(_) | DocumentError::Field { .. } => "E-ATTEST-DOCUMENT",
            DocumentError::FieldTooLarge { .. } => "E-ATTEST-FIELD-TOO-LARGE",
        }
    }
}

fn field(field: &'static str, problem: impl Into<String>) -> DocumentError {
    DocumentError::Field {
        field,
        problem: problem.into(),
    }
}

impl AttestationDocument {
    /// Checks the rules that do not need a signature: types are enforced by the
    /// struct, this checks values and sizes.
    pub fn validate(&self) -> Result<(), DocumentError> {
        if self.module_id.is_empty() {
            return Err(field("module_id", "is empty"));
        }
        if self.digest != DIGEST_SHA384 {
            return Err(field(
                "digest",
                format!("is {:?}, expected \"SHA384\"", self.digest),
            ));
        }
        if self.pcrs.is_empty() {
            return Err(field("pcrs", "is empty"));
        }
        for (i, v) in &self.pcrs {
            if *i >= PCR_COUNT {
                return Err(field("pcrs", format!("index {i} is outside 0..31")));
            }
            if v.len() != PCR_LEN {
                return Err(field(
                    "pcrs",
                    format!("PCR{i} is {} bytes, SHA384 registers are 48", v.len()),
                ));
            }
        }
        if self.certificate.is_empty() {
            return Err(field("certificate", "is empty"));
        }
        if self.cabundle.is_empty() {
            return Err(field("cabundle", "is empty: it must start with the root"));
        }
        if self.cabundle.iter().any(Vec::is_empty) {
            return Err(field("cabundle", "holds an empty certificate"));
        }
        for (name, value) in [
            ("public_key", &self.public_key),
            ("user_data", &self.user_data),
            ("nonce", &self.nonce),
        ] {
            if let Some(v) = value
                && v.len() > MAX_USER_FIELD_LEN
            {
                return Err(DocumentError::FieldTooLarge {
                    field: name,
                    len: v.len(),
                    max: MAX_USER_FIELD_LEN,
                });
            }
        }
        Ok(())
    }

    /// The CBOR payload, fields in Nitro's order, absent optionals as `nil`.
    pub fn to_cbor(&self) -> Result<Vec<u8>, DocumentError> {
        self.validate()?;
        let opt = |v: &Option<Vec<u8>>| v.clone().map_or(Value::Null, Value::Bytes);
        let map = Value::Map(vec![
            (text("module_id"), Value::Text(self.module_id.clone())),
            (text("digest"), Value::Text(self.digest.clone())),
            (text("timestamp"), Value::Integer(self.timestamp.into())),
            (
                text("pcrs"),
                Value::Map(
                    self.pcrs
                        .iter()
                        .map(|(i, v)| (Value::Integer((*i as u64).into()), Value::Bytes(v.clone())))
                        .collect(),
                ),
            ),
            (text("certificate"), Value::Bytes(self.certificate.clone())),
            (
                text("cabundle"),
                Value::Array(self.cabundle.iter().cloned().map(Value::Bytes).collect()),
            ),
            (text("public_key"), opt(&self.public_key)),
            (text("user_data"), opt(&self.user_data)),
            (text("nonce"), opt(&self.nonce)),
        ]);
        let mut out = Vec::new();
        ciborium::into_writer(&map, &mut out).map_err(|e| DocumentError::Cbor(e.to_string()))?;
        Ok(out)
    }

    /// Decodes a CBOR payload strictly.
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, DocumentError> {
        let mut rest = bytes;
        let value: Value =
            ciborium::from_reader(&mut rest).map_err(|e| DocumentError::Cbor(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DocumentError::Cbor(format!(
                "{} trailing bytes after the payload map",
                rest.len()
            )));
        }
        let Value::Map(entries) = value else {
            return Err(DocumentError::Cbor("the payload is not a CBOR map".into()));
        };
        let mut fields: BTreeMap<String, Value> = BTreeMap::new();
        for (k, v) in entries {
            let Value::Text(k) = k else {
                return Err(DocumentError::Cbor("a payload map key is not text".into()));
            };
            if !KNOWN_FIELDS.contains(&k.as_str()) {
                return Err(DocumentError::Cbor(format!("unknown field `{k}`")));
            }
            if fields.contains_key(&k) {
                return Err(DocumentError::Cbor(format!("field `{k}` appears twice")));
            }
            fields.insert(k, v);
        }
        let mut take = |name: &'static str| fields.remove(name);
        let required =
            |name: &'static str, v: Option<Value>| v.ok_or_else(|| field(name, "is missing"));

        let doc = AttestationDocument {
            module_id: as_text("module_id", required("module_id", take("module_id"))?)?,
            digest: as_text("digest", required("digest", take("digest"))?)?,
            timestamp: as_u64("timestamp", required("timestamp", take("timestamp"))?)?,
            pcrs: as_pcrs(required("pcrs", take("pcrs"))?)?,
            certificate: as_bytes("certificate", required("certificate", take("certificate"))?)?,
            cabundle: match required("cabundle", take("cabundle"))? {
                Value::Array(items) => items
                    .into_iter()
                    .map(|v| as_bytes("cabundle", v))
                    .collect::<Result<_, _>>()?,
                _ => return Err(field("cabundle", "is not an array")),
            },
            public_key: as_optional_bytes("public_key", take("public_key"))?,
            user_data: as_optional_bytes("user_data", take("user_data"))?,
            nonce: as_optional_bytes("nonce", take("nonce"))?,
        };
        doc.validate()?;
        Ok(doc)
    }
}

const KNOWN_FIELDS: [&str; 9] = [
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
];

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn as_text(name: &'static str, v: Value) -> Result<String, DocumentError> {
    match v {
        Value::Text(s) => Ok(s),
        _ => Err(field(name, "is not a text string")),
    }
}

fn as_u64(name: &'static str, v: Value) -> Result<u64, DocumentError> {
    match v {
        Value::Integer(i) => {
            u64::try_from(i).map_err(|_| field(name, "is not an unsigned 64-bit integer"))
        }
        _ => Err(field(name, "is not an unsigned integer")),
    }
}

fn as_bytes(name: &'static str, v: Value) -> Result<Vec<u8>, DocumentError> {
    match v {
        Value::Bytes(b) => Ok(b),
        _ => Err(field(name, "is not a byte string")),
    }
}

fn as_optional_bytes(
    name: &'static str,
    v: Option<Value>,
) -> Result<Option<Vec<u8>>, DocumentError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => as_bytes(name, v).map(Some),
    }
}

fn as_pcrs(v: Value) -> Result<BTreeMap<usize, Vec<u8>>, DocumentError> {
    let Value::Map(entries) = v else {
        return Err(field("pcrs", "is not a map"));
    };
    let mut pcrs = BTreeMap::new();
    for (k, v) in entries {
        let i = as_u64("pcrs", k)?;
        let i = usize::try_from(i)
            .ok()
            .filter(|i| *i < PCR_COUNT)
            .ok_or_else(|| field("pcrs", format!("index {i} is outside 0..31")))?;
        if pcrs.insert(i, as_bytes("pcrs", v)?).is_some() {
            return Err(field("pcrs", format!("PCR{i} appears twice")));
        }
    }
    Ok(pcrs)
}

/// A decoded COSE_Sign1 whose signature has NOT been checked yet.
#[derive(Debug, Clone)]
pub struct UnverifiedDocument {
    pub algorithm: SigningAlgorithm,
    pub document: AttestationDocument,
    sign1: CoseSign1,
}

impl UnverifiedDocument {
    /// Decodes a tagged (18) or untagged COSE_Sign1 attestation document.
    pub fn parse(bytes: &[u8]) -> Result<Self, DocumentError> {
        if bytes.len() > MAX_DOCUMENT_LEN {
            return Err(DocumentError::TooLarge {
                len: bytes.len(),
                max: MAX_DOCUMENT_LEN,
            });
        }
        let sign1 = if bytes.first() == Some(&COSE_SIGN1_TAG) {
            CoseSign1::from_tagged_slice(bytes)
        } else {
            CoseSign1::from_slice(bytes)
        }
        .map_err(|e| DocumentError::Cose(e.to_string()))?;

        let algorithm = match &sign1.protected.header.alg {
            Some(coset::RegisteredLabelWithPrivate::Assigned(iana::Algorithm::EdDSA)) => {
                SigningAlgorithm::EdDSA
            }
            Some(coset::RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES384)) => {
                SigningAlgorithm::ES384
            }
            Some(other) => return Err(DocumentError::Algorithm(format!("{other:?}"))),
            None => {
                return Err(DocumentError::Algorithm(
                    "(none in the protected header)".into(),
                ));
            }
        };
        if sign1.unprotected.alg.is_some() {
            return Err(DocumentError::Cose(
                "the algorithm must be in the protected header only".into(),
            ));
        }
        let payload = sign1
            .payload
            .as_deref()
            .ok_or_else(|| DocumentError::Cose("the payload is detached (nil)".into()))?;
        let document = AttestationDocument::from_cbor(payload)?;
        Ok(UnverifiedDocument {
            algorithm,
            document,
            sign1,
        })
    }

    /// Runs `verify(signature, Sig_structure)` over the COSE signature.
    pub fn verify_signature<E>(
        &self,
        verify: impl FnOnce(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.sign1.verify_signature(b"", verify)
    }
}

/// Signs `doc` as an untagged COSE_Sign1 (as Nitro's NSM emits it) with `sign`,
/// which receives the Sig_structure bytes and returns the raw signature.
pub fn sign(
    doc: &AttestationDocument,
    algorithm: SigningAlgorithm,
    sign: impl FnOnce(&[u8]) -> Vec<u8>,
) -> Result<Vec<u8>, DocumentError> {
    let alg = match algorithm {
        SigningAlgorithm::EdDSA => iana::Algorithm::EdDSA,
        SigningAlgorithm::ES384 => iana::Algorithm::ES384,
    };
    let bytes = CoseSign1Builder::new()
        .protected(HeaderBuilder::new().algorithm(alg).build())
        .payload(doc.to_cbor()?)
        .create_signature(b"", sign)
        .build()
        .to_vec()
        .map_err(|e| DocumentError::Cose(e.to_string()))?;
    if bytes.len() > MAX_DOCUMENT_LEN {
        return Err(DocumentError::TooLarge {
            len: bytes.len(),
            max: MAX_DOCUMENT_LEN,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> AttestationDocument {
        AttestationDocument {
            module_id: "i-0123-enc0456".into(),
            digest: "SHA384".into(),
            timestamp: 1_700_000_000_000,
            pcrs: (0..32).map(|i| (i, vec![i as u8; 48])).collect(),
            certificate: vec![0x30, 1, 2],
            cabundle: vec![vec![0x30, 3, 4]],
            public_key: Some(vec![7; 32]),
            user_data: None,
            nonce: Some(vec![9; 16]),
        }
    }

    fn encode_map(entries: Vec<(Value, Value)>) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(&Value::Map(entries), &mut out).unwrap();
        out
    }

    fn sample_entries() -> Vec<(Value, Value)> {
        let bytes = sample().to_cbor().unwrap();
        match ciborium::from_reader::<Value, _>(&bytes[..]).unwrap() {
            Value::Map(e) => e,
            _ => unreachable!(),
        }
    }

    fn with(name: &str, value: Option<Value>) -> Vec<u8> {
        let mut e: Vec<_> = sample_entries()
            .into_iter()
            .filter(|(k, _)| k != &text(name))
            .collect();
        if let Some(v) = value {
            e.push((text(name), v));
        }
        encode_map(e)
    }

    #[test]
    fn payload_round_trips_with_nitro_field_order() {
        let doc = sample();
        let bytes = doc.to_cbor().unwrap();
        assert_eq!(AttestationDocument::from_cbor(&bytes).unwrap(), doc);
        let keys: Vec<_> = sample_entries().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            KNOWN_FIELDS.iter().map(|k| text(k)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn strict_decoding_names_the_problem() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (with("module_id", None), "`module_id`: is missing"),
            (
                with("module_id", Some(Value::Integer(1.into()))),
                "`module_id`: is not a text string",
            ),
            (with("module_id", Some(text(""))), "`module_id`: is empty"),
            (with("digest", Some(text("SHA256"))), "expected \"SHA384\""),
            (
                with("timestamp", Some(Value::Integer((-1).into()))),
                "`timestamp`: is not an unsigned",
            ),
            (
                with("timestamp", Some(text("now"))),
                "`timestamp`: is not an unsigned integer",
            ),
            (
                with("pcrs", Some(Value::Array(vec![]))),
                "`pcrs`: is not a map",
            ),
            (with("pcrs", Some(Value::Map(vec![]))), "`pcrs`: is empty"),
            (
                with(
                    "pcrs",
                    Some(Value::Map(vec![(
                        Value::Integer(32.into()),
                        Value::Bytes(vec![0; 48]),
                    )])),
                ),
                "index 32 is outside",
            ),
            (
                with(
                    "pcrs",
                    Some(Value::Map(vec![(
                        Value::Integer(0.into()),
                        Value::Bytes(vec![0; 32]),
                    )])),
                ),
                "PCR0 is 32 bytes",
            ),
            (
                with(
                    "pcrs",
                    Some(Value::Map(vec![
                        (Value::Integer(1.into()), Value::Bytes(vec![0; 48])),
                        (Value::Integer(1.into()), Value::Bytes(vec![0; 48])),
                    ])),
                ),
                "PCR1 appears twice",
            ),
            (
                with("certificate", Some(text("pem?"))),
                "`certificate`: is not a byte string",
            ),
            (
                with("cabundle", Some(Value::Array(vec![]))),
                "`cabundle`: is empty",
            ),
            (
                with("cabundle", Some(Value::Bytes(vec![1]))),
                "`cabundle`: is not an array",
            ),
            (
                with("nonce", Some(Value::Bytes(vec![0; 1025]))),
                "`nonce` is 1025 bytes",
            ),
            (
                with("user_data", Some(Value::Bytes(vec![0; 1025]))),
                "`user_data` is 1025 bytes",
            ),
            (
                with("public_key", Some(Value::Bytes(vec![0; 1025]))),
                "`public_key` is 1025 bytes",
            ),
            (
                with("public_key", Some(Value::Bool(true))),
                "`public_key`: is not a byte string",
            ),
            (with("extra", Some(Value::Null)), "unknown field `extra`"),
            (
                encode_map(vec![(Value::Integer(1.into()), Value::Null)]),
                "key is not text",
            ),
            (
                {
                    let mut e = sample_entries();
                    e.push((text("nonce"), Value::Null));
                    encode_map(e)
                },
                "field `nonce` appears twice",
            ),
            (
                {
                    let mut b = sample().to_cbor().unwrap();
                    b.push(0);
                    b
                },
                "1 trailing bytes",
            ),
            (
                {
                    let b = sample().to_cbor().unwrap();
                    b[..b.len() - 3].to_vec()
                },
                "malformed",
            ),
            (vec![0x80], "not a CBOR map"),
        ];
        for (bytes, want) in cases {
            let err = AttestationDocument::from_cbor(&bytes).unwrap_err();
            assert!(err.to_string().contains(want), "want {want:?}, got {err}");
        }
    }

    #[test]
    fn exactly_1024_bytes_is_allowed_and_absent_or_nil_optionals_decode_as_none() {
        let mut doc = sample();
        doc.nonce = Some(vec![1; 1024]);
        doc.user_data = Some(vec![2; 1024]);
        doc.public_key = Some(vec![3; 1024]);
        assert_eq!(
            AttestationDocument::from_cbor(&doc.to_cbor().unwrap()).unwrap(),
            doc
        );
        assert_eq!(
            AttestationDocument::from_cbor(&with("nonce", None))
                .unwrap()
                .nonce,
            None
        );
        doc.nonce = Some(vec![1; 1025]);
        assert!(matches!(
            doc.to_cbor(),
            Err(DocumentError::FieldTooLarge { field: "nonce", .. })
        ));
    }

    #[test]
    fn cose_envelope_round_trips_tagged_and_untagged() {
        let doc = sample();
        let bytes = sign(&doc, SigningAlgorithm::EdDSA, |data| data[..4].to_vec()).unwrap();
        let parsed = UnverifiedDocument::parse(&bytes).unwrap();
        assert_eq!(parsed.document, doc);
        assert_eq!(parsed.algorithm, SigningAlgorithm::EdDSA);
        parsed
            .verify_signature(|sig, data| if sig == &data[..4] { Ok(()) } else { Err(()) })
            .unwrap();

        let mut tagged = vec![COSE_SIGN1_TAG];
        tagged.extend_from_slice(&bytes);
        assert_eq!(UnverifiedDocument::parse(&tagged).unwrap().document, doc);

        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            UnverifiedDocument::parse(&trailing),
            Err(DocumentError::Cose(_))
        ));
        assert!(matches!(
            UnverifiedDocument::parse(&bytes[..bytes.len() - 1]),
            Err(DocumentError::Cose(_))
        ));
    }

    #[test]
    fn cose_refusals() {
        let doc = sample();
        let sign_with = |alg: iana::Algorithm, in_protected: bool, payload: Option<Vec<u8>>| {
            let header = HeaderBuilder::new().algorithm(alg).build();
            let mut b = CoseSign1Builder::new();
            b = if in_protected {
                b.protected(header)
            } else {
                b.unprotected(header)
            };
            if let Some(p) = payload {
                b = b.payload(p);
            }
            b.signature(vec![1, 2, 3]).build().to_vec().unwrap()
        };
        let err = UnverifiedDocument::parse(&sign_with(
            iana::Algorithm::ES256,
            true,
            Some(doc.to_cbor().unwrap()),
        ))
        .unwrap_err();
        assert!(matches!(err, DocumentError::Algorithm(_)), "{err}");
        assert_eq!(err.code(), "E-ATTEST-ALGORITHM");
        let err = UnverifiedDocument::parse(&sign_with(
            iana::Algorithm::EdDSA,
            false,
            Some(doc.to_cbor().unwrap()),
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("none in the protected header"),
            "{err}"
        );
        let err =
            UnverifiedDocument::parse(&sign_with(iana::Algorithm::EdDSA, true, None)).unwrap_err();
        assert!(err.to_string().contains("detached"), "{err}");

        let big = vec![0u8; MAX_DOCUMENT_LEN + 1];
        assert!(matches!(
            UnverifiedDocument::parse(&big),
            Err(DocumentError::TooLarge { .. })
        ));
        // A byte string header claiming 2^62 bytes in a tiny input: no huge allocation, an error.
        let hostile = [0x84, 0x40, 0xa0, 0x5b, 0x40, 0, 0, 0, 0, 0, 0, 0, 0x40];
        assert!(UnverifiedDocument::parse(&hostile).is_err());
    }
}
