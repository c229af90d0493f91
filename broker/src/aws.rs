//! The AWS KMS front end: the JSON 1.1 protocol (`POST /`, `X-Amz-Target:
//! TrentService.<Operation>`, base64 blobs, `{"__type", "message"}` errors)
//! with SigV4 authentication, in front of the same service layer, policies and
//! audit log as Cloister's own protocol.
//!
//! A request is authenticated by its `AWS4-HMAC-SHA256` signature: the access
//! key id names a principal's access key (`kms principal add-access-key`), the
//! expected signature is computed by the `aws-sigv4` crate over the headers the
//! request says it signed, and compared in constant time. The scope must name
//! this broker's region and the `kms` service; `X-Amz-Date` must be within
//! five minutes of the broker's clock (as AWS). As at AWS, a signed request is
//! bound to its time, not to one use: TLS keeps it from being captured, which
//! is why plain HTTP is allowed on loopback only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::audit::RequestRecord;
use crate::crypto::KeyId;
use crate::error::{self, ErrorKind, KmsError};
use crate::keystore::PrincipalRecord;
use crate::protocol::{
    CiphertextForRecipient, EncryptionContext, KeyMetadata, Operation, Output, Recipient, Secret,
};
use crate::service::{Broker, Prepared};

/// How far `X-Amz-Date` may be from the broker's clock (AWS's window).
pub const SIGV4_SKEW: Duration = Duration::from_secs(300);
/// The service name in a SigV4 credential scope.
pub const SERVICE: &str = "kms";
/// The region a broker answers for unless told otherwise.
pub const DEFAULT_REGION: &str = "us-east-1";
const TARGET_PREFIX: &str = "TrentService.";
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";
/// The headers every request must have signed.
const SIGNED_HEADERS: [&str; 4] = ["content-type", "host", "x-amz-date", "x-amz-target"];

/// An HTTP request as the listener read it.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    /// The request target as sent (path and query).
    pub uri: String,
    /// Header names in lower case, values as sent, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> impl Iterator<Item = &str> {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A header that must appear at most once.
    fn single(&self, name: &str) -> Result<Option<&str>, KmsError> {
        let mut values = self.header(name);
        let first = values.next();
        if values.next().is_some() {
            return Err(error::incomplete_signature(format!(
                "the {name} header appears more than once"
            )));
        }
        Ok(first)
    }
}

/// An HTTP response for the listener to send.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpResponse {
    pub status: u16,
    pub request_id: String,
    /// The Cloister code of an error (sent as `x-cloister-error-code`).
    pub error_code: Option<&'static str>,
    pub body: Vec<u8>,
}

/// One AWS API request handled up to its audit record.
pub struct AwsCall {
    pub request_id: String,
    pub prepared: Prepared,
}

/// The HTTP response for a request's outcome (once its audit record is written).
pub fn respond(request_body: &[u8], response: crate::protocol::Response) -> HttpResponse {
    match response.result {
        Ok(output) => HttpResponse {
            status: 200,
            request_id: response.request_id,
            error_code: None,
            body: response_body(request_body, output),
        },
        Err(e) => error_response(response.request_id, &e),
    }
}

/// The HTTP response of an error, in AWS's JSON 1.1 error shape.
pub fn error_response(request_id: String, e: &KmsError) -> HttpResponse {
    use cloister_proto::ErrorCode;
    let status = match e.kind {
        ErrorKind::KMSInternalException => 500,
        ErrorKind::UnknownOperationException if e.message.starts_with("method") => 405,
        _ => 400,
    };
    HttpResponse {
        status,
        request_id,
        error_code: Some(e.code()),
        body: json!({ "__type": e.kind.name(), "message": e.message })
            .to_string()
            .into_bytes(),
    }
}

/// A SigV4 `Authorization` header's parts.
#[derive(Debug, PartialEq, Eq)]
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Result<Authorization<'_>, KmsError> {
    let incomplete = |what: &str| {
        error::incomplete_signature(format!(
            "the Authorization header is not AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...: {what}"
        ))
    };
    let rest = value
        .strip_prefix(ALGORITHM)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| incomplete("the algorithm must be AWS4-HMAC-SHA256"))?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (name, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| incomplete("a part has no '='"))?;
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => return Err(incomplete("an unknown part")),
        };
        if slot.replace(v).is_some() {
            return Err(incomplete("a part appears twice"));
        }
    }
    let credential = credential.ok_or_else(|| incomplete("no Credential"))?;
    let signed = signed.ok_or_else(|| incomplete("no SignedHeaders"))?;
    let signature = signature.ok_or_else(|| incomplete("no Signature"))?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, "aws4_request"] = scope[..] else {
        return Err(incomplete(
            "Credential must be ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/aws4_request",
        ));
    };
    if access_key_id.is_empty() || access_key_id.len() > 128 {
        return Err(incomplete("the access key id must be 1 to 128 characters"));
    }
    let signed_headers: Vec<&str> = signed.split(';').collect();
    let well_formed = signed_headers.windows(2).all(|w| w[0] < w[1])
        && signed_headers.iter().all(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        });
    if !well_formed {
        return Err(incomplete(
            "SignedHeaders must be lower-case header names, sorted, each once, separated by ';'",
        ));
    }
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(incomplete("the Signature must be 64 hex digits"));
    }
    Ok(Authorization {
        access_key_id,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

/// `YYYYMMDDTHHMMSSZ` as a time.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let t = time::PrimitiveDateTime::parse(s, &format)
        .ok()?
        .assume_utc();
    let secs = u64::try_from(t.unix_timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Checks a request's SigV4 signature; returns the access key id and the
/// principal it stands for.
fn authenticate(
    broker: &Broker,
    req: &HttpRequest,
    region: &str,
    now: SystemTime,
) -> Result<(String, PrincipalRecord), KmsError> {
    let header = req.single("authorization")?.ok_or_else(|| {
        error::incomplete_signature(
            "the request is not signed: it has no Authorization header (AWS4-HMAC-SHA256)",
        )
    })?;
    let auth = parse_authorization(header)?;
    // A shared store's keystore may have changed on another replica.
    broker.keystore().refresh()?;
    let (access_key, principal) = broker
        .keystore()
        .access_key(auth.access_key_id)?
        .ok_or_else(|| {
            error::unrecognized_client(format!(
                "the security token included in the request is invalid: access key {:?} is not known to this broker",
                auth.access_key_id
            ))
        })?;
    if auth.service != SERVICE {
        return Err(error::invalid_signature(format!(
            "the credential scope names service {:?}; this is {SERVICE}",
            auth.service
        )));
    }
    if auth.region != region {
        return Err(error::invalid_signature(format!(
            "the credential scope names region {:?}; this broker answers for {region:?} (set the client's region to it)",
            auth.region
        )));
    }
    if req.single("x-amz-security-token")?.is_some() {
        return Err(error::unrecognized_client(
            "temporary credentials (X-Amz-Security-Token) are not issued by Cloister; sign with an access key from `kms principal add-access-key`",
        ));
    }
    // What decides the operation and how its body is read is signed, not
    // only where and when (the AWS SDKs sign all four).
    for required in SIGNED_HEADERS {
        if !auth.signed_headers.contains(&required) {
            return Err(error::incomplete_signature(format!(
                "SignedHeaders must include {}",
                SIGNED_HEADERS.join(", ")
            )));
        }
    }
    let amz_date = req
        .single("x-amz-date")?
        .ok_or_else(|| error::incomplete_signature("the X-Amz-Date header is missing"))?;
    let signed_at = parse_amz_date(amz_date).ok_or_else(|| {
        error::incomplete_signature(format!(
            "X-Amz-Date {amz_date:?} is not of the form YYYYMMDDTHHMMSSZ"
        ))
    })?;
    if amz_date.get(..8) != Some(auth.date) {
        return Err(error::invalid_signature(format!(
            "the credential scope's date {} is not X-Amz-Date's ({amz_date})",
            auth.date
        )));
    }
    let skew = match now.duration_since(signed_at) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    if skew > SIGV4_SKEW {
        return Err(error::expired(format!(
            "signature expired: X-Amz-Date {amz_date} is more than {} s from the broker's clock",
            SIGV4_SKEW.as_secs()
        )));
    }
    // Exactly the headers the request says it signed, in order received.
    let mut headers = Vec::new();
    for name in &auth.signed_headers {
        let mut found = false;
        for v in req.header(name) {
            headers.push((*name, v));
            found = true;
        }
        if !found {
            return Err(error::incomplete_signature(format!(
                "signed header {name} is not in the request"
            )));
        }
    }
    let expected = expected_signature(
        req,
        &headers,
        &access_key.access_key_id,
        &access_key.secret,
        region,
        signed_at,
    )?;
    if !bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        return Err(error::invalid_signature(
            "the request signature we calculated does not match the signature you provided; check the secret access key and the signing method",
        ));
    }
    Ok((access_key.access_key_id, principal))
}

/// The SigV4 signature of a request with these signed headers, computed by
/// the `aws-sigv4` crate.
fn expected_signature(
    req: &HttpRequest,
    headers: &[(&str, &str)],
    access_key_id: &str,
    secret: &str,
    region: &str,
    signed_at: SystemTime,
) -> Result<String, KmsError> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let refuse = |e: &dyn std::fmt::Display| {
        error::incomplete_signature(format!("the request cannot be canonicalised: {e}"))
    };
    let identity = aws_credential_types::Credentials::new(
        access_key_id,
        secret,
        None,
        None,
        "cloister-access-key",
    )
    .into();
    let mut settings = SigningSettings::default();
    // Sign exactly what the client signed: nothing is excluded or added.
    settings.excluded_headers = None;
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(signed_at)
        .settings(settings)
        .build()
        .map_err(|e| refuse(&e))?
        .into();
    let signable = SignableRequest::new(
        &req.method,
        req.uri.as_str(),
        headers.iter().copied(),
        SignableBody::Bytes(&req.body),
    )
    .map_err(|e| refuse(&e))?;
    let out = sign(signable, &params).map_err(|e| refuse(&e))?;
    Ok(out.signature().to_owned())
}

impl Broker {
    /// Handles one request of the AWS API up to its audit record: the target,
    /// the SigV4 signature, the JSON input, then the same operation, policies
    /// and audit as Cloister's own protocol. Should the handler panic (a bug),
    /// the request is still audited, as an error, and answered with a coded
    /// error that shows no internals.
    pub fn prepare_aws(&self, req: &HttpRequest, region: &str) -> AwsCall {
        let request_id = KeyId::random().to_string();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.prepare_aws_unguarded(req, region, request_id.clone())
        }))
        .unwrap_or_else(|_| AwsCall {
            prepared: Prepared::Audit {
                record: RequestRecord {
                    request_id: request_id.clone(),
                    decision: crate::audit::Decision::Error,
                    reason: "the AWS API handler panicked (a broker bug)".into(),
                    ..Default::default()
                },
                response: crate::protocol::Response {
                    request_id: request_id.clone(),
                    request_digest: Sha256::digest(&req.body).to_vec(),
                    result: Err(error::internal(
                        "the broker failed while handling this request; the failure is in its audit log",
                    )),
                },
            },
            request_id,
        })
    }

    /// A request of the AWS API refused before it could be read whole (too
    /// large, too slow): recorded as an unauthenticated failure, answered.
    pub fn refuse_aws(&self, e: KmsError) -> HttpResponse {
        let request_id = KeyId::random().to_string();
        let record = RequestRecord {
            request_id: request_id.clone(),
            reason: e.to_string(),
            ..Default::default()
        };
        let response = crate::protocol::Response {
            request_id: request_id.clone(),
            request_digest: Vec::new(),
            result: Err(e),
        };
        let response =
            match self.unauthenticated_failure(record, response, crate::service::now_ms()) {
                Prepared::Done { response, .. } => response,
                Prepared::Audit { record, response } => {
                    Prepared::finish(self.audit().record(record), response)
                }
            };
        respond(&[], response)
    }

    fn prepare_aws_unguarded(
        &self,
        req: &HttpRequest,
        region: &str,
        request_id: String,
    ) -> AwsCall {
        let now_ms = crate::service::now_ms();
        let digest = Sha256::digest(&req.body).to_vec();
        let operation = req
            .single("x-amz-target")
            .ok()
            .flatten()
            .and_then(|t| t.strip_prefix(TARGET_PREFIX))
            .filter(|op| op.len() <= 64 && op.bytes().all(|b| b.is_ascii_alphanumeric()))
            .unwrap_or_default()
            .to_owned();
        let mut record = RequestRecord {
            request_id: request_id.clone(),
            action: if operation.is_empty() {
                String::new()
            } else {
                format!("kms:{operation}")
            },
            ..Default::default()
        };
        let refuse = |mut record: RequestRecord, e: KmsError| {
            record.reason = e.to_string();
            self.unauthenticated_failure(
                record,
                crate::protocol::Response {
                    request_id: request_id.clone(),
                    request_digest: digest.clone(),
                    result: Err(e),
                },
                now_ms,
            )
        };
        let prepared = match check_envelope(req, &operation)
            .and_then(|()| authenticate(self, req, region, SystemTime::now()))
        {
            Err(e) => {
                if let Ok(Some(h)) = req.single("authorization")
                    && let Ok(a) = parse_authorization(h)
                {
                    record.access_key_id = Some(a.access_key_id.to_owned());
                }
                refuse(record, e)
            }
            Ok((access_key_id, principal)) => {
                record.principal = principal.name.clone();
                record.access_key_id = Some(access_key_id);
                match parse_operation(&operation, &req.body) {
                    Ok(op) => {
                        record.action = op.action().to_owned();
                        self.run(principal, op, record, digest.clone(), now_ms)
                    }
                    Err(e) => {
                        record.authenticated = true;
                        Broker::audited(record, request_id.clone(), digest.clone(), Err(e))
                    }
                }
            }
        };
        AwsCall {
            request_id,
            prepared,
        }
    }
}

/// The parts of the request that come before its signature: `POST /`, the
/// content type, a target naming a known operation.
fn check_envelope(req: &HttpRequest, operation: &str) -> Result<(), KmsError> {
    if req.method != "POST" {
        return Err(error::unknown_operation(format!(
            "method {} is not served: the KMS JSON API is POST / with X-Amz-Target",
            req.method
        )));
    }
    if req.uri != "/" {
        return Err(error::unknown_operation(format!(
            "path {:?} is not served: the KMS JSON API is POST /",
            req.uri.chars().take(128).collect::<String>()
        )));
    }
    match req.single("content-type").ok().flatten() {
        Some(t) if t.starts_with("application/x-amz-json-1.1") => {}
        other => {
            return Err(error::serialization(format!(
                "Content-Type {:?} is not application/x-amz-json-1.1",
                other.unwrap_or("").chars().take(128).collect::<String>()
            )));
        }
    }
    if operation.is_empty() {
        return Err(error::unknown_operation(
            "X-Amz-Target must be TrentService.<Operation>",
        ));
    }
    if !OPERATIONS.contains(&operation) {
        return Err(error::unknown_operation(format!(
            "operation {operation} is not served by Cloister (it serves {})",
            OPERATIONS.join(", ")
        )));
    }
    Ok(())
}

/// The KMS operations this front end serves.
pub const OPERATIONS: &[&str] = &[
    "CreateKey",
    "DescribeKey",
    "ListKeys",
    "CreateAlias",
    "ListAliases",
    "DeleteAlias",
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateRandom",
    "GetKeyPolicy",
    "PutKeyPolicy",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "EnableKeyRotation",
    "DisableKeyRotation",
    "GetKeyRotationStatus",
    "RotateKeyOnDemand",
];

/// A request body's members, each taken once; what is left is refused.
struct Input(Map<String, Value>);

impl Input {
    fn parse(body: &[u8]) -> Result<Self, KmsError> {
        if body.is_empty() {
            return Ok(Input(Map::new()));
        }
        match serde_json::from_slice(body) {
            Ok(Value::Object(m)) => Ok(Input(m)),
            Ok(_) => Err(error::serialization(
                "the request body must be a JSON object",
            )),
            Err(e) => Err(error::serialization(format!(
                "the request body is not JSON: {e}"
            ))),
        }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, KmsError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(error::serialization(format!("{name} must be a string"))),
        }
    }

    fn required(&mut self, name: &str) -> Result<String, KmsError> {
        self.string(name)?
            .ok_or_else(|| error::validation(format!("{name} is required")))
    }

    fn number(&mut self, name: &str) -> Result<Option<u32>, KmsError> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| error::serialization(format!("{name} must be a whole number"))),
        }
    }

    fn boolean(&mut self, name: &str) -> Result<Option<bool>, KmsError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(error::serialization(format!(
                "{name} must be true or false"
            ))),
        }
    }

    fn blob(&mut self, name: &str) -> Result<Option<Vec<u8>>, KmsError> {
        self.string(name)?
            .map(|s| {
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| error::serialization(format!("{name} is not base64: {e}")))
            })
            .transpose()
    }

    fn required_blob(&mut self, name: &str) -> Result<Vec<u8>, KmsError> {
        self.blob(name)?
            .ok_or_else(|| error::validation(format!("{name} is required")))
    }

    fn context(&mut self, name: &str) -> Result<EncryptionContext, KmsError> {
        match self.take(name) {
            None => Ok(EncryptionContext::new()),
            Some(Value::Object(m)) => m
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(v) => Ok((k, v)),
                    _ => Err(error::serialization(format!(
                        "{name} values must be strings ({k:?} is not)"
                    ))),
                })
                .collect(),
            Some(_) => Err(error::serialization(format!(
                "{name} must be an object of strings"
            ))),
        }
    }

    fn recipient(&mut self) -> Result<Option<Recipient>, KmsError> {
        let Some(v) = self.take("Recipient") else {
            return Ok(None);
        };
        let Value::Object(m) = v else {
            return Err(error::serialization("Recipient must be an object"));
        };
        let mut r = Input(m);
        let recipient = Recipient {
            key_encryption_algorithm: r
                .string("KeyEncryptionAlgorithm")?
                .unwrap_or_else(|| crate::cms::ALGORITHM.to_owned()),
            attestation_document: r.required_blob("AttestationDocument")?,
        };
        r.finish("Recipient.")?;
        Ok(Some(recipient))
    }

    /// Refuses what AWS accepts but Cloister does not do, rather than
    /// silently ignoring it.
    fn unsupported(&mut self) -> Result<(), KmsError> {
        if let Some(v) = self.take("GrantTokens")
            && v.as_array().is_none_or(|a| !a.is_empty())
        {
            return Err(error::validation(
                "GrantTokens: grants are not supported by Cloister",
            ));
        }
        if self.boolean("DryRun")? == Some(true) {
            return Err(error::validation("DryRun is not supported by Cloister"));
        }
        for name in [
            "EncryptionAlgorithm",
            "SourceEncryptionAlgorithm",
            "DestinationEncryptionAlgorithm",
        ] {
            if let Some(a) = self.string(name)?
                && a != SYMMETRIC_DEFAULT
            {
                return Err(error::validation(format!(
                    "{name} {a:?}: Cloister's keys are symmetric (SYMMETRIC_DEFAULT)"
                )));
            }
        }
        Ok(())
    }

    fn finish(self, prefix: &str) -> Result<(), KmsError> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(k) => Err(error::serialization(format!(
                "{prefix}{k} is not a member Cloister knows for this operation"
            ))),
        }
    }
}

/// A page of a listing: `Limit` (1 to 1000, default 100) items after `Marker`.
struct Page {
    limit: usize,
    marker: Option<String>,
}

impl Page {
    fn take(input: &mut Input) -> Result<Self, KmsError> {
        let limit = input.number("Limit")?.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(error::validation(format!(
                "Limit {limit} must be 1 to 1000"
            )));
        }
        let marker = input.string("Marker")?;
        Ok(Page {
            limit: limit as usize,
            marker,
        })
    }
}

/// The operation a request's body describes.
pub fn parse_operation(name: &str, body: &[u8]) -> Result<Operation, KmsError> {
    let mut i = Input::parse(body)?;
    i.unsupported()?;
    let op = match name {
        "CreateKey" => {
            for (member, allowed) in [
                ("KeyUsage", "ENCRYPT_DECRYPT"),
                ("KeySpec", SYMMETRIC_DEFAULT),
                ("CustomerMasterKeySpec", SYMMETRIC_DEFAULT),
                ("Origin", "AWS_KMS"),
            ] {
                if let Some(v) = i.string(member)?
                    && v != allowed
                {
                    return Err(error::validation(format!(
                        "{member} {v:?} is not supported: Cloister makes {allowed} keys"
                    )));
                }
            }
            if i.boolean("MultiRegion")? == Some(true) {
                return Err(error::validation(
                    "MultiRegion keys are not supported by Cloister",
                ));
            }
            if let Some(tags) = i.take("Tags")
                && tags.as_array().is_none_or(|a| !a.is_empty())
            {
                return Err(error::validation("Tags are not supported by Cloister"));
            }
            i.boolean("BypassPolicyLockoutSafetyCheck")?;
            Operation::CreateKey {
                description: i.string("Description")?.unwrap_or_default(),
                policy: i.string("Policy")?,
            }
        }
        "DescribeKey" => Operation::DescribeKey {
            key_id: i.required("KeyId")?,
        },
        "ListKeys" => {
            Page::take(&mut i)?;
            Operation::ListKeys
        }
        "CreateAlias" => Operation::CreateAlias {
            alias_name: i.required("AliasName")?,
            target_key_id: i.required("TargetKeyId")?,
        },
        "ListAliases" => {
            Page::take(&mut i)?;
            i.string("KeyId")?;
            Operation::ListAliases
        }
        "DeleteAlias" => Operation::DeleteAlias {
            alias_name: i.required("AliasName")?,
        },
        "Encrypt" => Operation::Encrypt {
            key_id: i.required("KeyId")?,
            plaintext: Secret::new(i.required_blob("Plaintext")?),
            encryption_context: i.context("EncryptionContext")?,
        },
        "Decrypt" => Operation::Decrypt {
            ciphertext_blob: i.required_blob("CiphertextBlob")?,
            key_id: i.string("KeyId")?,
            encryption_context: i.context("EncryptionContext")?,
            recipient: i.recipient()?,
        },
        "ReEncrypt" => Operation::ReEncrypt {
            ciphertext_blob: i.required_blob("CiphertextBlob")?,
            source_key_id: i.string("SourceKeyId")?,
            source_encryption_context: i.context("SourceEncryptionContext")?,
            destination_key_id: i.required("DestinationKeyId")?,
            destination_encryption_context: i.context("DestinationEncryptionContext")?,
        },
        "GenerateDataKey" => Operation::GenerateDataKey {
            key_id: i.required("KeyId")?,
            key_spec: i.string("KeySpec")?.unwrap_or_default(),
            number_of_bytes: i.number("NumberOfBytes")?,
            encryption_context: i.context("EncryptionContext")?,
            recipient: i.recipient()?,
        },
        "GenerateDataKeyWithoutPlaintext" => Operation::GenerateDataKeyWithoutPlaintext {
            key_id: i.required("KeyId")?,
            key_spec: i.string("KeySpec")?.unwrap_or_default(),
            number_of_bytes: i.number("NumberOfBytes")?,
            encryption_context: i.context("EncryptionContext")?,
        },
        "GenerateRandom" => {
            if i.string("CustomKeyStoreId")?.is_some() {
                return Err(error::validation(
                    "custom key stores are not supported by Cloister",
                ));
            }
            Operation::GenerateRandom {
                number_of_bytes: i
                    .number("NumberOfBytes")?
                    .ok_or_else(|| error::validation("NumberOfBytes is required"))?,
                recipient: i.recipient()?,
            }
        }
        "GetKeyPolicy" | "PutKeyPolicy" => {
            if let Some(p) = i.string("PolicyName")?
                && p != "default"
            {
                return Err(error::validation(format!(
                    "PolicyName {p:?}: a key has one policy, \"default\""
                )));
            }
            let key_id = i.required("KeyId")?;
            if name == "GetKeyPolicy" {
                Operation::GetKeyPolicy { key_id }
            } else {
                i.boolean("BypassPolicyLockoutSafetyCheck")?;
                Operation::PutKeyPolicy {
                    key_id,
                    policy: i.required("Policy")?,
                }
            }
        }
        "EnableKey" => Operation::EnableKey {
            key_id: i.required("KeyId")?,
        },
        "DisableKey" => Operation::DisableKey {
            key_id: i.required("KeyId")?,
        },
        "ScheduleKeyDeletion" => Operation::ScheduleKeyDeletion {
            key_id: i.required("KeyId")?,
            pending_window_in_days: i.number("PendingWindowInDays")?.unwrap_or(30),
        },
        "CancelKeyDeletion" => Operation::CancelKeyDeletion {
            key_id: i.required("KeyId")?,
        },
        "EnableKeyRotation" => Operation::EnableKeyRotation {
            key_id: i.required("KeyId")?,
            rotation_period_in_days: i.number("RotationPeriodInDays")?,
        },
        "DisableKeyRotation" => Operation::DisableKeyRotation {
            key_id: i.required("KeyId")?,
        },
        "GetKeyRotationStatus" => Operation::GetKeyRotationStatus {
            key_id: i.required("KeyId")?,
        },
        "RotateKeyOnDemand" => Operation::RotateKey {
            key_id: i.required("KeyId")?,
        },
        other => {
            return Err(error::unknown_operation(format!(
                "operation {other} is not served by Cloister"
            )));
        }
    };
    i.finish("")?;
    Ok(op)
}

fn b64(bytes: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// An RFC 3339 time as AWS JSON's timestamp: seconds since the epoch.
fn epoch(rfc3339: &str) -> Value {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map(|t| json!(t.unix_timestamp_nanos() as f64 / 1e9))
        .unwrap_or(Value::Null)
}

fn key_metadata(m: &KeyMetadata) -> Value {
    let mut v = json!({
        "KeyId": m.key_id,
        "Arn": m.arn,
        "CreationDate": epoch(&m.creation_date),
        "Enabled": m.key_state == "Enabled",
        "Description": m.description,
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeyState": m.key_state,
        "Origin": "AWS_KMS",
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": SYMMETRIC_DEFAULT,
        "KeySpec": SYMMETRIC_DEFAULT,
        "EncryptionAlgorithms": [SYMMETRIC_DEFAULT],
        "MultiRegion": false,
    });
    if let Some(d) = &m.deletion_date {
        v["DeletionDate"] = epoch(d);
    }
    v
}

/// Adds `Plaintext` or `CiphertextForRecipient` (and, for Cloister's HPKE
/// form, the `info` and `aad` it was sealed with, as extra members; AWS's CMS
/// form has neither). The AWS API and the CLI answer alike.
pub fn add_secret(v: &mut Value, plaintext: Option<Secret>, cfr: Option<CiphertextForRecipient>) {
    if let Some(p) = plaintext {
        v["Plaintext"] = b64(p.as_bytes());
    }
    if let Some(c) = cfr {
        v["CiphertextForRecipient"] = b64(&c.ciphertext);
        if !c.info.is_empty() || !c.aad.is_empty() {
            v["RecipientInfo"] = b64(&c.info);
            v["RecipientAad"] = b64(&c.aad);
        }
    }
}

/// The output of an operation in AWS's response shape.
fn render(output: Output) -> Value {
    match output {
        Output::KeyMetadata(m) => json!({ "KeyMetadata": key_metadata(&m) }),
        Output::Ciphertext {
            key_id,
            ciphertext_blob,
        } => json!({
            "CiphertextBlob": b64(&ciphertext_blob),
            "KeyId": key_id,
            "EncryptionAlgorithm": SYMMETRIC_DEFAULT,
        }),
        Output::ReEncrypted {
            source_key_id,
            key_id,
            ciphertext_blob,
        } => json!({
            "CiphertextBlob": b64(&ciphertext_blob),
            "SourceKeyId": source_key_id,
            "KeyId": key_id,
            "SourceEncryptionAlgorithm": SYMMETRIC_DEFAULT,
            "DestinationEncryptionAlgorithm": SYMMETRIC_DEFAULT,
        }),
        Output::Plaintext {
            key_id,
            plaintext,
            ciphertext_for_recipient,
        } => {
            let mut v = json!({});
            if let Some(k) = key_id {
                v["KeyId"] = json!(k);
                v["EncryptionAlgorithm"] = json!(SYMMETRIC_DEFAULT);
            }
            add_secret(&mut v, plaintext, ciphertext_for_recipient);
            v
        }
        Output::DataKey {
            key_id,
            ciphertext_blob,
            plaintext,
            ciphertext_for_recipient,
        } => {
            let mut v = json!({ "CiphertextBlob": b64(&ciphertext_blob), "KeyId": key_id });
            add_secret(&mut v, plaintext, ciphertext_for_recipient);
            v
        }
        Output::KeyPolicy(p) => json!({ "Policy": p, "PolicyName": "default" }),
        Output::Rotated { key_id, .. } | Output::KeyId(key_id) => json!({ "KeyId": key_id }),
        Output::DeletionScheduled {
            key_id,
            deletion_date,
        } => json!({
            "KeyId": key_id,
            "DeletionDate": epoch(&deletion_date),
            "KeyState": "PendingDeletion",
        }),
        Output::RotationStatus {
            key_id,
            enabled,
            period_in_days,
            next_rotation_date,
        } => {
            let mut v = json!({ "KeyRotationEnabled": enabled, "KeyId": key_id });
            if let Some(d) = period_in_days {
                v["RotationPeriodInDays"] = json!(d);
            }
            if let Some(n) = next_rotation_date {
                v["NextRotationDate"] = epoch(&n);
            }
            v
        }
        // Listings are paged by `page`; the rest answer with no members.
        _ => json!({}),
    }
}

/// Pages a listing as `ListKeys` / `ListAliases` return it.
fn page(body: &[u8], output: Output) -> Value {
    let mut input = Input::parse(body).unwrap_or(Input(Map::new()));
    let page = Page::take(&mut input).unwrap_or(Page {
        limit: 100,
        marker: None,
    });
    let filter_key = input.string("KeyId").ok().flatten();
    let (member, items): (&str, Vec<(String, Value)>) = match output {
        Output::Keys(keys) => (
            "Keys",
            keys.into_iter()
                .map(|(id, arn)| (id.clone(), json!({ "KeyId": id, "KeyArn": arn })))
                .collect(),
        ),
        Output::Aliases(aliases) => (
            "Aliases",
            aliases
                .into_iter()
                .filter(|(_, id)| {
                    filter_key
                        .as_deref()
                        .is_none_or(|k| k == id || k.ends_with(&format!("key/{id}")))
                })
                .map(|(name, id)| {
                    (
                        name.clone(),
                        json!({
                            "AliasName": name,
                            "AliasArn": format!("arn:cloister:kms:local:{name}"),
                            "TargetKeyId": id,
                        }),
                    )
                })
                .collect(),
        ),
        other => return render(other),
    };
    let start = match &page.marker {
        Some(m) => items.iter().position(|(k, _)| k > m).unwrap_or(items.len()),
        None => 0,
    };
    let rest = &items[start..];
    let shown = &rest[..rest.len().min(page.limit)];
    let truncated = rest.len() > shown.len();
    let mut v = Map::new();
    v.insert(
        member.into(),
        Value::Array(shown.iter().map(|(_, v)| v.clone()).collect()),
    );
    v.insert("Truncated".into(), json!(truncated));
    if truncated && let Some((last, _)) = shown.last() {
        v.insert("NextMarker".into(), json!(last));
    }
    Value::Object(v)
}

/// The response body for an operation's output (listings paged as the
/// request asked).
fn response_body(request_body: &[u8], output: Output) -> Vec<u8> {
    match output {
        o @ (Output::Keys(_) | Output::Aliases(_)) => page(request_body, o),
        o => render(o),
    }
    .to_string()
    .into_bytes()
}
