//! The broker's request handling: authentication, two-factor authorization,
//! attested key release, the operations, and one audit record per request.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use cloister_attestation::verify::{ChainCache, TrustAnchor, VerifyOptions, rfc3339_ms};

use crate::audit::{AuditLog, Decision, RequestRecord};
use crate::crypto::{self, KeyId};
use crate::error::{self, ErrorKind, KmsError};
use crate::keystore::{
    DEFAULT_ROTATION_DAYS, KeyRecord, Keystore, PrincipalRecord, ROTATION_DAYS, Rotate, Transition,
};
use crate::policy::{self, RequestContext};
use crate::protocol::*;
use crate::recipient;
use crate::store::Tx;

/// Tunables of a broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// How old a Recipient's attestation document may be.
    pub max_document_age: Duration,
    /// How far a request's timestamp may be from the broker's clock.
    pub clock_skew: Duration,
    /// Sustained requests per second per principal.
    pub rate_per_sec: f64,
    /// Burst allowance per principal.
    pub burst: f64,
    /// Unauthenticated failures (malformed, unknown principal, bad signature,
    /// expired, replayed) recorded one by one per second; beyond it they are
    /// counted, and the count is recorded (see [`Broker::record_uncounted`]).
    pub unauthenticated_records_per_sec: f64,
    /// This broker's name among replicas of a shared store (recorded in each
    /// audit line it writes there).
    pub replica: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_document_age: Duration::from_secs(300),
            clock_skew: Duration::from_secs(120),
            rate_per_sec: 10_000.0,
            burst: 20_000.0,
            unauthenticated_records_per_sec: 20.0,
            replica: default_replica_name(),
        }
    }
}

pub use cloister_kms_api::now_ms;

/// `HOSTNAME:PID`: unique among replicas that run at once.
pub fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// How often a replica of a shared store says it serves.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A replica not heard from for this long no longer counts as serving.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest principal name (checked before anything is looked up).
pub const MAX_PRINCIPAL_NAME: usize = 256;

fn uncounted_reason(count: u64, since_ms: u64) -> String {
    format!(
        "{count} further unauthenticated failures since {} were counted, not recorded one by one",
        rfc3339_ms(since_ms)
    )
}

/// A principal's request id as the replay guards keep it: the first 16
/// bytes of SHA-256(principal || 0 || request id).
fn request_id_digest(principal: &str, request_id: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(principal.as_bytes());
    h.update([0]);
    h.update(request_id.as_bytes());
    h.finalize()[..16].try_into().unwrap_or_default()
}

/// Why a request was not served: its sender could not be authenticated
/// (charged to the peer), or it was, and then the broker failed it (not charged).
enum Unserved {
    Unauthenticated(KmsError),
    Verified(KmsError),
}

fn replayed(request_id: &str) -> KmsError {
    error::invalid_signature(format!(
        "request id {request_id} was already used: a replayed request"
    ))
}

/// Request ids seen within the acceptance window, as 16-byte digests.
#[derive(Default)]
struct ReplayCache {
    seen: HashSet<[u8; 16]>,
    order: VecDeque<(u64, [u8; 16])>,
}

impl ReplayCache {
    /// Records an id; false if it was seen already.
    fn insert(&mut self, principal: &str, request_id: &str, expires_ms: u64, now_ms: u64) -> bool {
        while self.order.front().is_some_and(|(exp, _)| *exp < now_ms) {
            if let Some((_, d)) = self.order.pop_front() {
                self.seen.remove(&d);
            }
        }
        let digest = request_id_digest(principal, request_id);
        if !self.seen.insert(digest) {
            return false;
        }
        self.order.push_back((expires_ms, digest));
        true
    }
}

/// A token bucket: `rate` tokens a second accrue, up to `burst`.
pub(crate) struct Bucket {
    tokens: f64,
    last_ms: u64,
}

impl Bucket {
    pub(crate) fn full(burst: f64, now: u64) -> Self {
        Bucket {
            tokens: burst,
            last_ms: now,
        }
    }

    /// The tokens available now.
    pub(crate) fn refill(&mut self, now: u64, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last_ms = now;
        self.tokens
    }

    /// Takes a token if one is available.
    pub(crate) fn take(&mut self, now: u64, rate: f64, burst: f64) -> bool {
        if self.refill(now, rate, burst) < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// Unauthenticated failures beyond the recording rate: counted, not recorded.
struct Unauthenticated {
    bucket: Bucket,
    uncounted: u64,
    since_ms: u64,
}

pub struct Broker {
    keystore: Keystore,
    audit: AuditLog,
    config: BrokerConfig,
    replay: Mutex<ReplayCache>,
    unauthenticated: Mutex<Unauthenticated>,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Replicas serving a shared store (1 otherwise), from their heartbeats.
    replicas_alive: std::sync::atomic::AtomicU64,
    /// Parsed trust anchors, rebuilt when the keystore's roots change.
    anchors: Mutex<AnchorCache>,
    /// Validated NSM certificate chains (see `ChainCache`).
    chain_cache: std::sync::Arc<ChainCache>,
    /// The broker key: signs every response (and the audit log's checkpoints).
    response_key: ed25519_dalek::SigningKey,
}

/// The keystore's (label, DER) roots and the anchors parsed from them.
type AnchorCache = (Vec<(String, Vec<u8>)>, Vec<TrustAnchor>);

/// The parts of a verified Recipient that the request needs.
struct AttestedRecipient {
    /// AWS's CMS form (`RSAES_OAEP_SHA_256`) to this RSA key, or Cloister's HPKE form.
    rsa: Option<crate::cms::RsaRecipient>,
    document: Vec<u8>,
    public_key: Vec<u8>,
    pcrs: std::collections::BTreeMap<usize, Vec<u8>>,
}

/// One request in flight: who asks, and its audit record.
struct Call<'a> {
    broker: &'a Broker,
    principal: PrincipalRecord,
    request_id: String,
    record: RequestRecord,
    audited: bool,
    now_ms: u64,
}

impl Call<'_> {
    /// Writes the success record inside a keystore transaction.
    fn commit(&mut self, tx: &mut Tx<'_>, reason: String) -> Result<(), KmsError> {
        self.record.decision = Decision::Allow;
        self.record.reason = reason;
        self.broker.audit.record_in(tx, self.record.clone())?;
        self.audited = true;
        Ok(())
    }

    fn set_key(&mut self, key: &KeyRecord) {
        self.record.key_id = Some(key.id.to_string());
    }

    /// Two-factor authorization. Condition keys: the caller, the encryption
    /// context, and a verified recipient's measurements.
    fn authorize(
        &self,
        action: &str,
        key: Option<&KeyRecord>,
        context: &EncryptionContext,
        recipient: Option<&AttestedRecipient>,
    ) -> Result<String, KmsError> {
        let arn = key.map(|k| k.id.arn());
        let mut ctx = RequestContext {
            action: action.to_owned(),
            resource: arn.clone().unwrap_or_else(|| "*".to_owned()),
            principal: self.principal.name.clone(),
            ..Default::default()
        };
        ctx.set("kms:CallerPrincipal", self.principal.name.clone());
        if let Some(account) = policy::account_of(&self.principal.name) {
            ctx.set("kms:CallerAccount", account);
        }
        for (k, v) in context {
            ctx.set(&format!("kms:EncryptionContext:{k}"), v.clone());
        }
        if let Some(r) = recipient {
            for (i, v) in &r.pcrs {
                ctx.set(&format!("kms:RecipientAttestation:PCR{i}"), hex::encode(v));
            }
            if let Some(pcr0) = r.pcrs.get(&0) {
                ctx.set("kms:RecipientAttestation:ImageSha384", hex::encode(pcr0));
            }
        }
        let decision = policy::authorize(
            &self.principal.policy,
            key.map(|k| (arn.as_deref().unwrap_or_default(), &k.policy)),
            &ctx,
        );
        if decision.allowed {
            Ok(decision.reason)
        } else {
            Err(error::access_denied(decision.reason))
        }
    }

    /// Authorization of an operation on `target`'s access keys: `action`, and,
    /// when the target is not the caller itself, `also` (the principal
    /// operation it amounts to).
    fn authorize_for(&self, target: &str, action: &str, also: &str) -> Result<String, KmsError> {
        let none = EncryptionContext::new();
        let reason = self.authorize(action, None, &none, None)?;
        if target == self.principal.name {
            return Ok(reason);
        }
        let other = self.authorize(also, None, &none, None).map_err(|e| {
            error::access_denied(format!(
                "{action} on another principal's access keys needs {also} too: {}",
                e.message
            ))
        })?;
        Ok(format!("{reason}; {other}"))
    }

    fn verify_recipient(
        &mut self,
        r: &Option<Recipient>,
    ) -> Result<Option<AttestedRecipient>, KmsError> {
        let Some(r) = r else { return Ok(None) };
        let cms = match r.key_encryption_algorithm.as_str() {
            recipient::ALGORITHM => false,
            crate::cms::ALGORITHM => true,
            other => {
                return Err(error::validation(format!(
                    "Recipient KeyEncryptionAlgorithm {:?} is not supported; use {} (AWS's, an RSA public_key) or {} (Cloister's, an X25519 public_key)",
                    other.chars().take(64).collect::<String>(),
                    crate::cms::ALGORITHM,
                    recipient::ALGORITHM
                )));
            }
        };
        let opts = VerifyOptions {
            anchors: self.broker.trust_anchors()?,
            max_age: Some(self.broker.config.max_document_age),
            chain_cache: Some(self.broker.chain_cache.clone()),
            ..Default::default()
        };
        let v = cloister_attestation::verify(&r.attestation_document, &opts).map_err(|e| {
            use cloister_proto::ErrorCode;
            error::recipient_rejected(e.code(), &e)
        })?;
        self.record.recipient_pcr0 = v.image_sha384().map(hex::encode);
        self.record.recipient_module_id = Some(v.module_id.clone());
        let public_key = v.public_key.clone().ok_or_else(|| {
            error::validation(
                "the Recipient's attestation document has no public_key to encrypt to",
            )
        })?;
        // The RSA key is checked now, before any key is used.
        let rsa = cms
            .then(|| crate::cms::RsaRecipient::from_spki(&public_key))
            .transpose()?;
        Ok(Some(AttestedRecipient {
            rsa,
            document: r.attestation_document.clone(),
            public_key,
            pcrs: v.pcrs,
        }))
    }

    fn seal_for(
        &self,
        r: &AttestedRecipient,
        key_arn: &str,
        operation: &str,
        plaintext: &[u8],
    ) -> Result<CiphertextForRecipient, KmsError> {
        if let Some(rsa) = &r.rsa {
            // AWS's form binds no key, operation or request: the response that
            // carries it is signed by the broker and names the request.
            return Ok(CiphertextForRecipient {
                ciphertext: rsa.seal(plaintext)?,
                info: Vec::new(),
                aad: Vec::new(),
            });
        }
        let sealed = recipient::seal(
            &r.public_key,
            recipient::info(key_arn, operation, &self.request_id),
            recipient::aad(&r.document),
            plaintext,
        )?;
        Ok(CiphertextForRecipient {
            ciphertext: sealed.ciphertext,
            info: sealed.info,
            aad: sealed.aad,
        })
    }
}

/// A data key's length: `NumberOfBytes` (1 to 1024), or the `KeySpec`.
fn data_key_len(key_spec: &str, number_of_bytes: Option<u32>) -> Result<usize, KmsError> {
    match (key_spec, number_of_bytes) {
        ("", Some(n)) if (1..=1024).contains(&n) => Ok(n as usize),
        ("", Some(n)) => Err(error::validation(format!(
            "NumberOfBytes {n} must be 1 to 1024"
        ))),
        (_, Some(_)) => Err(error::validation("give KeySpec or NumberOfBytes, not both")),
        ("AES_256", None) => Ok(32),
        ("AES_128", None) => Ok(16),
        ("", None) => Err(error::validation("give KeySpec or NumberOfBytes")),
        (other, None) => Err(error::validation(format!(
            "KeySpec {:?} must be AES_256 or AES_128",
            other.chars().take(64).collect::<String>()
        ))),
    }
}

/// `len` random bytes from the operating system.
fn random_bytes(len: usize) -> Secret {
    let mut bytes = Secret::new(vec![0u8; len]);
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes.0);
    bytes
}

fn access_key_info(k: &crate::keystore::AccessKeyRecord) -> AccessKeyInfo {
    AccessKeyInfo {
        access_key_id: k.access_key_id.clone(),
        principal: k.principal.clone(),
        create_date: rfc3339_ms(k.created_ms),
    }
}

fn usable(key: &KeyRecord) -> Result<(), KmsError> {
    crate::keystore::usable(key.id, key.state, key.deletion_ms)
}

fn default_key_policy(creator: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "CreatorFullAccess",
            "Effect": "Allow",
            "Principal": {"AWS": creator},
            "Action": "kms:*",
            "Resource": "*"
        }]
    })
    .to_string()
}

impl Broker {
    pub fn new(
        keystore: Keystore,
        audit: AuditLog,
        config: BrokerConfig,
        response_key: ed25519_dalek::SigningKey,
    ) -> Self {
        let unauthenticated_burst = config.unauthenticated_records_per_sec;
        Broker {
            response_key,
            keystore,
            audit,
            config,
            replay: Mutex::new(ReplayCache::default()),
            unauthenticated: Mutex::new(Unauthenticated {
                bucket: Bucket::full(unauthenticated_burst, now_ms()),
                uncounted: 0,
                since_ms: now_ms(),
            }),
            buckets: Mutex::new(HashMap::new()),
            replicas_alive: std::sync::atomic::AtomicU64::new(1),
            anchors: Mutex::new((Vec::new(), Vec::new())),
            chain_cache: std::sync::Arc::new(ChainCache::default()),
        }
    }

    /// The keystore's trust roots as verifier anchors, parsed once per change.
    fn trust_anchors(&self) -> Result<Vec<TrustAnchor>, KmsError> {
        let roots = self.keystore.trust_roots()?;
        let mut cached = self
            .anchors
            .lock()
            .map_err(|_| error::internal("anchor cache poisoned"))?;
        if cached.0 != roots {
            let parsed = roots
                .iter()
                .filter_map(|(label, der)| TrustAnchor::from_der(label.clone(), der.clone()).ok())
                .collect();
            *cached = (roots, parsed);
        }
        Ok(cached.1.clone())
    }

    pub fn keystore(&self) -> &Keystore {
        &self.keystore
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The response as sent: signed with the broker key.
    pub fn sign(&self, response: &Response) -> SignedResponse {
        SignedResponse::sign(response, &self.response_key).unwrap_or_else(|e| {
            // A response always encodes; should it not, send a signed error.
            let fallback = Response {
                request_id: response.request_id.clone(),
                request_digest: response.request_digest.clone(),
                result: Err(error::internal(format!("the response did not encode: {e}"))),
            };
            SignedResponse::sign(&fallback, &self.response_key).unwrap_or(SignedResponse {
                payload: Vec::new(),
                signature: Vec::new(),
            })
        })
    }

    /// Handles one request frame and returns the response to send, and
    /// whether it counts against its peer ([`Prepared::charges_peer`]). The audit record is on disk
    /// before this returns; if it cannot be written, the response is an error
    /// and carries no result.
    pub fn handle(&self, frame: &[u8]) -> (Response, bool) {
        let prepared = self.guarded(frame, || self.prepare_decoded(frame, decode(frame)));
        let charged = prepared.charges_peer();
        let response = match prepared {
            Prepared::Done { response, .. } => response,
            Prepared::Audit { record, response } => {
                Prepared::finish(self.audit.record(record), response)
            }
        };
        (response, charged)
    }

    /// Handles a request up to its audit record. With `inline_only`, only
    /// operations that change nothing stored (Decrypt, Encrypt, GenerateDataKey,
    /// reads...) and malformed requests are handled, so that the caller never
    /// blocks on a keystore transaction (which audits inside itself); for the
    /// rest it returns `None` and the caller uses [`Broker::handle`] where
    /// blocking is allowed.
    pub fn prepare(&self, frame: &[u8], inline_only: bool) -> Option<Prepared> {
        // A shared store is asked (the replay guard, the keystore's
        // generation) on every request: only where blocking is allowed.
        if inline_only && self.keystore.store().is_shared() {
            return None;
        }
        let decoded = decode(frame);
        if inline_only
            && let Ok((_, payload)) = &decoded
            && !changes_nothing_stored(&payload.operation)
        {
            return None;
        }
        Some(self.guarded(frame, || self.prepare_decoded(frame, decoded)))
    }

    /// Runs a handler; should it panic (a bug), the request is still audited,
    /// as an error, and answered with a coded error that shows no internals.
    fn guarded(&self, frame: &[u8], handler: impl FnOnce() -> Prepared) -> Prepared {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(handler)).unwrap_or_else(|_| {
            let (request_id, principal, action, digest) = match decode(frame) {
                Ok((s, p)) => (
                    p.request_id,
                    p.principal,
                    p.operation.action().to_owned(),
                    request_digest(&s.payload),
                ),
                Err(_) => (
                    String::new(),
                    String::new(),
                    String::new(),
                    request_digest(frame),
                ),
            };
            let err = error::internal(
                "the broker failed while handling this request; the failure is in its audit log",
            );
            Prepared::Audit {
                record: RequestRecord {
                    request_id: request_id.clone(),
                    principal,
                    action,
                    decision: Decision::Error,
                    reason: "the request handler panicked (a broker bug)".into(),
                    ..Default::default()
                },
                response: Response {
                    request_id,
                    request_digest: digest,
                    result: Err(err),
                },
            }
        })
    }

    fn prepare_decoded(
        &self,
        frame: &[u8],
        decoded: Result<(SignedRequest, RequestPayload), cloister_proto::FrameError>,
    ) -> Prepared {
        let now = now_ms();
        let (signed, payload) = match decoded {
            Ok(d) => d,
            Err(e) => {
                let err = error::validation(format!("malformed request: {e}"));
                let record = RequestRecord {
                    reason: err.message.clone(),
                    ..Default::default()
                };
                let response = Response {
                    request_id: String::new(),
                    request_digest: request_digest(frame),
                    result: Err(err),
                };
                return self.unauthenticated_failure(record, response, now);
            }
        };
        let mut record = RequestRecord {
            request_id: payload.request_id.clone(),
            principal: payload.principal.clone(),
            action: payload.operation.action().to_owned(),
            ..Default::default()
        };
        let digest = request_digest(&signed.payload);
        match self.authenticate(&signed, &payload, now) {
            Ok(principal) => self.run(principal, payload.operation, record, digest, now),
            Err(Unserved::Verified(e)) => {
                // The sender is who it says: the broker failed it.
                record.authenticated = true;
                Self::audited(record, payload.request_id, digest, Err(e))
            }
            Err(Unserved::Unauthenticated(e)) => {
                record.reason = e.to_string();
                let response = Response {
                    request_id: payload.request_id,
                    request_digest: digest,
                    result: Err(e),
                };
                self.unauthenticated_failure(record, response, now)
            }
        }
    }

    /// Runs an authenticated principal's operation (both front ends): the
    /// rate limit, the two-factor authorization, the operation, and its audit
    /// record (written inside the operation's transaction, or left to the caller).
    pub(crate) fn run(
        &self,
        principal: PrincipalRecord,
        operation: Operation,
        mut record: RequestRecord,
        digest: Vec<u8>,
        now: u64,
    ) -> Prepared {
        record.authenticated = true;
        let request_id = record.request_id.clone();
        let result = match self.take_token(&principal.name, now) {
            Err(e) => Err(e),
            Ok(()) => {
                let mut call = Call {
                    broker: self,
                    principal,
                    request_id: request_id.clone(),
                    record: record.clone(),
                    audited: false,
                    now_ms: now,
                };
                let result = self.execute(&mut call, operation);
                if call.audited {
                    // The change was recorded inside its transaction. Should the
                    // commit itself have failed, say so in a second record.
                    if let Err(e) = &result {
                        let mut correction = call.record.clone();
                        correction.decision = Decision::Error;
                        correction.reason = format!("the change was not committed: {e}");
                        let _ = self.audit.record(correction);
                    }
                    return Prepared::Done {
                        response: Response {
                            request_id,
                            request_digest: digest,
                            result: result.map(|(out, _)| out),
                        },
                        authenticated: true,
                    };
                }
                record = call.record;
                result.map(|(out, reason)| {
                    record.reason = reason;
                    out
                })
            }
        };
        Self::audited(record, request_id, digest, result)
    }

    /// A request's outcome and its audit record, to be written before the
    /// response is sent.
    pub(crate) fn audited(
        mut record: RequestRecord,
        request_id: String,
        digest: Vec<u8>,
        result: Result<Output, KmsError>,
    ) -> Prepared {
        record.decision = match &result {
            Ok(_) => Decision::Allow,
            Err(e)
                if matches!(
                    e.kind,
                    ErrorKind::AccessDeniedException
                        | ErrorKind::InvalidSignatureException
                        | ErrorKind::IncompleteSignatureException
                        | ErrorKind::UnrecognizedClientException
                        | ErrorKind::RequestExpiredException
                        | ErrorKind::LimitExceededException
                ) =>
            {
                Decision::Deny
            }
            Err(_) => Decision::Error,
        };
        if let Err(e) = &result {
            record.reason = e.to_string();
        }
        Prepared::Audit {
            record,
            response: Response {
                request_id,
                request_digest: digest,
                result,
            },
        }
    }

    /// A request that failed before its sender was authenticated: recorded
    /// within the recording rate, otherwise only counted (and answered).
    pub(crate) fn unauthenticated_failure(
        &self,
        mut record: RequestRecord,
        response: Response,
        now: u64,
    ) -> Prepared {
        let Some((uncounted, since)) = self.admit_unauthenticated(now) else {
            return Prepared::Done {
                response,
                authenticated: false,
            };
        };
        if uncounted > 0 {
            record.reason = format!(
                "{}; before it, {}",
                record.reason,
                uncounted_reason(uncounted, since)
            );
        }
        Prepared::Audit { record, response }
    }

    fn authenticate(
        &self,
        signed: &SignedRequest,
        payload: &RequestPayload,
        now: u64,
    ) -> Result<PrincipalRecord, Unserved> {
        let principal = self
            .authenticate_sender(signed, payload, now)
            .map_err(Unserved::Unauthenticated)?;
        self.claim_shared(payload, principal)
    }

    /// Checks a request's sender: sizes, a known principal, its signature,
    /// the time, an id this broker has not seen.
    fn authenticate_sender(
        &self,
        signed: &SignedRequest,
        payload: &RequestPayload,
        now: u64,
    ) -> Result<PrincipalRecord, KmsError> {
        // Sizes first: nothing longer is looked up, verified or recorded whole.
        if payload.principal.is_empty() || payload.principal.len() > MAX_PRINCIPAL_NAME {
            return Err(error::invalid_signature(format!(
                "a principal name is 1 to {MAX_PRINCIPAL_NAME} bytes (this one is {})",
                payload.principal.len()
            )));
        }
        if payload.request_id.len() < 16 || payload.request_id.len() > 64 {
            return Err(error::validation(
                "the request id must be 16 to 64 characters",
            ));
        }
        let unknown =
            || error::invalid_signature(format!("unknown principal {:?}", payload.principal));
        let principal = match self.keystore.principal(&payload.principal)? {
            Some(p) => p,
            // Another replica may have added it since this copy was read.
            None if self.keystore.store().is_shared() => {
                self.keystore.refresh()?;
                self.keystore
                    .principal(&payload.principal)?
                    .ok_or_else(unknown)?
            }
            None => return Err(unknown()),
        };
        let signature = Signature::from_slice(&signed.signature)
            .map_err(|_| error::invalid_signature("the signature is not 64 bytes"))?;
        verify_request(&principal.public_key, &signed.payload, &signature)?;
        let skew = self.config.clock_skew.as_millis() as u64;
        if payload.timestamp_ms.saturating_add(skew) < now
            || payload.timestamp_ms > now.saturating_add(skew)
        {
            return Err(error::expired(format!(
                "the request was signed at {}, more than {} s from the broker's clock ({})",
                rfc3339_ms(payload.timestamp_ms),
                skew / 1000,
                rfc3339_ms(now)
            )));
        }
        // Ids used before a restart are remembered from the audit log (see
        // `remember_used_ids`), so none is accepted twice within the window.
        let fresh = self
            .replay
            .lock()
            .map_err(|_| error::internal("replay cache poisoned"))?
            .insert(
                &payload.principal,
                &payload.request_id,
                payload.timestamp_ms.saturating_add(skew),
                now,
            );
        if !fresh {
            return Err(replayed(&payload.request_id));
        }
        Ok(principal)
    }

    /// On a shared store, every replica's replay guard: the id is claimed in
    /// the store, and the same query says whether the keystore changed since
    /// this copy was read; if it did, the request is judged on the new copy
    /// (a principal removed or re-keyed meanwhile is refused).
    fn claim_shared(
        &self,
        payload: &RequestPayload,
        principal: PrincipalRecord,
    ) -> Result<PrincipalRecord, Unserved> {
        if !self.keystore.store().is_shared() {
            return Ok(principal);
        }
        let skew = self.config.clock_skew.as_millis() as u64;
        let (fresh, generation) = self
            .keystore
            .claim_request_id(
                request_id_digest(&payload.principal, &payload.request_id),
                payload.timestamp_ms.saturating_add(skew),
            )
            .map_err(Unserved::Verified)?;
        if !fresh {
            return Err(Unserved::Unauthenticated(replayed(&payload.request_id)));
        }
        self.keystore
            .refresh_to(generation)
            .map_err(Unserved::Verified)?;
        self.keystore
            .principal(&payload.principal)
            .map_err(Unserved::Verified)?
            .filter(|p| p.public_key == principal.public_key)
            .ok_or_else(|| {
                Unserved::Unauthenticated(error::invalid_signature(format!(
                    "principal {:?} was removed or given another key meanwhile",
                    payload.principal
                )))
            })
    }

    /// Remembers request ids that an earlier run accepted (read from the
    /// audit log's end): each for twice the clock skew after it was recorded,
    /// which covers any timestamp the guard accepted it with.
    pub fn remember_used_ids(&self, mut used: Vec<crate::audit::UsedRequestId>) {
        let skew = self.config.clock_skew.as_millis() as u64;
        used.sort_by_key(|u| u.recorded_ms);
        let now = now_ms();
        let mut replay = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        for u in used {
            replay.insert(
                &u.principal,
                &u.request_id,
                u.recorded_ms.saturating_add(2 * skew),
                now,
            );
        }
    }

    /// How far back the audit log must be read for [`Broker::remember_used_ids`].
    pub fn replay_window(&self) -> Duration {
        2 * self.config.clock_skew
    }

    fn take_token(&self, principal: &str, now: u64) -> Result<(), KmsError> {
        let mut buckets = self
            .buckets
            .lock()
            .map_err(|_| error::internal("rate limiter poisoned"))?;
        // Replicas of a shared store split each principal's allowance.
        let replicas = self
            .replicas_alive
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1) as f64;
        let (rate, burst) = (
            self.config.rate_per_sec / replicas,
            (self.config.burst / replicas).max(1.0),
        );
        let b = buckets
            .entry(principal.to_owned())
            .or_insert_with(|| Bucket::full(burst, now));
        if !b.take(now, rate, burst) {
            return Err(error::limit_exceeded(format!(
                "principal {principal:?} exceeded {} requests per second{}",
                self.config.rate_per_sec,
                if replicas > 1.0 {
                    format!(" ({rate:.1} on each of the {replicas} replicas serving)")
                } else {
                    String::new()
                }
            )));
        }
        Ok(())
    }

    /// Whether an unauthenticated failure is recorded one by one (with the
    /// count of those not recorded before it), or only counted.
    fn admit_unauthenticated(&self, now: u64) -> Option<(u64, u64)> {
        let mut u = self
            .unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let rate = self.config.unauthenticated_records_per_sec;
        if u.bucket.take(now, rate, rate) {
            let since = std::mem::replace(&mut u.since_ms, now);
            Some((std::mem::take(&mut u.uncounted), since))
        } else {
            u.uncounted += 1;
            None
        }
    }

    /// Records how many unauthenticated failures were counted but not recorded
    /// one by one since the last such record, if any were (the server calls
    /// this every minute and at shutdown).
    pub fn record_uncounted(&self) -> Result<(), KmsError> {
        let (count, since) = {
            let mut u = self
                .unauthenticated
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = now_ms();
            (
                std::mem::take(&mut u.uncounted),
                std::mem::replace(&mut u.since_ms, now),
            )
        };
        if count == 0 {
            return Ok(());
        }
        self.audit
            .record(RequestRecord {
                principal: "cloister-broker".into(),
                action: "cloister:UnauthenticatedFailures".into(),
                decision: Decision::Deny,
                reason: uncounted_reason(count, since),
                ..Default::default()
            })
            .map(|_| ())
    }

    /// Runs an operation; returns the output and the authorization reason.
    fn execute(&self, call: &mut Call<'_>, op: Operation) -> Result<(Output, String), KmsError> {
        let none = EncryptionContext::new();
        let ks = &self.keystore;
        match op {
            Operation::CreateKey {
                description,
                policy,
            } => {
                let reason = call.authorize("kms:CreateKey", None, &none, None)?;
                if description.len() > 8192 {
                    return Err(error::validation(
                        "the description is longer than 8192 bytes",
                    ));
                }
                let policy = policy.unwrap_or_else(|| default_key_policy(&call.principal.name));
                let now = call.now_ms;
                let id = ks.create_key(&description, &policy, now, |id, tx| {
                    call.record.key_id = Some(id.to_string());
                    call.commit(tx, reason.clone())
                })?;
                Ok((Output::KeyMetadata(self.metadata(id)?), reason))
            }
            Operation::DescribeKey { key_id } => {
                // The metadata is read after `with_key` returns: a read lock
                // taken again while one is held deadlocks once a writer waits.
                let (id, reason) = self.authorized_key(call, &key_id, "kms:DescribeKey")?;
                Ok((Output::KeyMetadata(self.metadata(id)?), reason))
            }
            Operation::ListKeys => {
                let reason = call.authorize("kms:ListKeys", None, &none, None)?;
                let keys = ks
                    .list_keys()?
                    .into_iter()
                    .map(|(id, _)| (id.to_string(), id.arn()))
                    .collect();
                Ok((Output::Keys(keys), reason))
            }
            Operation::CreateAlias {
                alias_name,
                target_key_id,
            } => {
                let (id, reason) = ks.with_key(&target_key_id, |k| {
                    call.set_key(k);
                    Ok((
                        k.id,
                        call.authorize("kms:CreateAlias", Some(k), &none, None)?,
                    ))
                })?;
                ks.create_alias(&alias_name, id, |tx| call.commit(tx, reason.clone()))?;
                Ok((Output::Done, reason))
            }
            Operation::ListAliases => {
                let reason = call.authorize("kms:ListAliases", None, &none, None)?;
                let aliases = ks
                    .list_aliases()?
                    .into_iter()
                    .map(|(a, id)| (a, id.to_string()))
                    .collect();
                Ok((Output::Aliases(aliases), reason))
            }
            Operation::DeleteAlias { alias_name } => {
                // As AWS KMS: allowed on the alias's key by both policies.
                let target = ks
                    .list_aliases()?
                    .into_iter()
                    .find(|(a, _)| *a == alias_name)
                    .map(|(_, id)| id)
                    .ok_or_else(|| {
                        error::not_found(format!("alias {alias_name} does not exist"))
                    })?;
                let (_, reason) =
                    self.authorized_key(call, &target.to_string(), "kms:DeleteAlias")?;
                // Deleted only if it still names the key authorized on.
                ks.delete_alias(&alias_name, target, |tx| call.commit(tx, reason.clone()))?;
                Ok((Output::Done, reason))
            }
            Operation::Encrypt {
                key_id,
                plaintext,
                encryption_context,
            } => {
                crypto::check_context(&encryption_context)?;
                if plaintext.as_bytes().is_empty()
                    || plaintext.as_bytes().len() > crypto::MAX_PLAINTEXT
                {
                    return Err(error::validation(format!(
                        "the plaintext must be 1 to {} bytes (it is {}); encrypt larger data with a data key",
                        crypto::MAX_PLAINTEXT,
                        plaintext.as_bytes().len()
                    )));
                }
                ks.with_key(&key_id, |k| {
                    call.set_key(k);
                    let reason =
                        call.authorize("kms:Encrypt", Some(k), &encryption_context, None)?;
                    usable(k)?;
                    let blob = k.seal(plaintext.as_bytes(), &encryption_context)?;
                    Ok((
                        Output::Ciphertext {
                            key_id: k.id.arn(),
                            ciphertext_blob: blob,
                        },
                        reason,
                    ))
                })
            }
            Operation::Decrypt {
                ciphertext_blob,
                key_id,
                encryption_context,
                recipient,
            } => {
                crypto::check_context(&encryption_context)?;
                let header = crypto::blob_header(&ciphertext_blob)?;
                if let Some(given) = &key_id {
                    let given = ks.resolve(given)?;
                    if given != header.key_id {
                        return Err(error::incorrect_key(format!(
                            "the ciphertext blob was made under key {}, not {given}",
                            header.key_id
                        )));
                    }
                }
                let attested = call.verify_recipient(&recipient)?;
                ks.with_key_id(header.key_id, |k| {
                    call.set_key(k);
                    let reason = call.authorize(
                        "kms:Decrypt",
                        Some(k),
                        &encryption_context,
                        attested.as_ref(),
                    )?;
                    usable(k)?;
                    let plaintext = k.open(&ciphertext_blob, &encryption_context)?;
                    let out = match &attested {
                        Some(r) => Output::Plaintext {
                            key_id: Some(k.id.arn()),
                            plaintext: None,
                            ciphertext_for_recipient: Some(call.seal_for(
                                r,
                                &k.id.arn(),
                                "Decrypt",
                                &plaintext,
                            )?),
                        },
                        None => Output::Plaintext {
                            key_id: Some(k.id.arn()),
                            plaintext: Some(Secret(plaintext)),
                            ciphertext_for_recipient: None,
                        },
                    };
                    Ok((out, reason))
                })
            }
            Operation::ReEncrypt {
                ciphertext_blob,
                source_key_id,
                source_encryption_context,
                destination_key_id,
                destination_encryption_context,
            } => {
                crypto::check_context(&source_encryption_context)?;
                crypto::check_context(&destination_encryption_context)?;
                let header = crypto::blob_header(&ciphertext_blob)?;
                if let Some(given) = &source_key_id
                    && ks.resolve(given)? != header.key_id
                {
                    return Err(error::incorrect_key(format!(
                        "the ciphertext blob was made under key {}",
                        header.key_id
                    )));
                }
                let (plaintext, from_reason) = ks.with_key_id(header.key_id, |k| {
                    call.set_key(k);
                    let reason = call.authorize(
                        "kms:ReEncryptFrom",
                        Some(k),
                        &source_encryption_context,
                        None,
                    )?;
                    usable(k)?;
                    Ok((
                        k.open(&ciphertext_blob, &source_encryption_context)?,
                        reason,
                    ))
                })?;
                ks.with_key(&destination_key_id, |k| {
                    let to_reason = call.authorize(
                        "kms:ReEncryptTo",
                        Some(k),
                        &destination_encryption_context,
                        None,
                    )?;
                    usable(k)?;
                    let blob = k.seal(&plaintext, &destination_encryption_context)?;
                    Ok((
                        Output::ReEncrypted {
                            source_key_id: header.key_id.arn(),
                            key_id: k.id.arn(),
                            ciphertext_blob: blob,
                        },
                        format!("{from_reason}; {to_reason}"),
                    ))
                })
            }
            Operation::GenerateDataKey {
                key_id,
                key_spec,
                number_of_bytes,
                encryption_context,
                recipient,
            } => {
                crypto::check_context(&encryption_context)?;
                let len = data_key_len(&key_spec, number_of_bytes)?;
                let attested = call.verify_recipient(&recipient)?;
                ks.with_key(&key_id, |k| {
                    call.set_key(k);
                    let reason = call.authorize(
                        "kms:GenerateDataKey",
                        Some(k),
                        &encryption_context,
                        attested.as_ref(),
                    )?;
                    usable(k)?;
                    let data_key = random_bytes(len);
                    let data_key = data_key.as_bytes();
                    let blob = k.seal(data_key, &encryption_context)?;
                    let (plaintext, cfr) = match &attested {
                        Some(r) => (
                            None,
                            Some(call.seal_for(r, &k.id.arn(), "GenerateDataKey", data_key)?),
                        ),
                        None => (Some(Secret::new(data_key.to_vec())), None),
                    };
                    Ok((
                        Output::DataKey {
                            key_id: k.id.arn(),
                            ciphertext_blob: blob,
                            plaintext,
                            ciphertext_for_recipient: cfr,
                        },
                        reason,
                    ))
                })
            }
            Operation::GenerateDataKeyWithoutPlaintext {
                key_id,
                key_spec,
                number_of_bytes,
                encryption_context,
            } => {
                crypto::check_context(&encryption_context)?;
                let len = data_key_len(&key_spec, number_of_bytes)?;
                ks.with_key(&key_id, |k| {
                    call.set_key(k);
                    let reason = call.authorize(
                        "kms:GenerateDataKeyWithoutPlaintext",
                        Some(k),
                        &encryption_context,
                        None,
                    )?;
                    usable(k)?;
                    let blob = k.seal(random_bytes(len).as_bytes(), &encryption_context)?;
                    Ok((
                        Output::DataKey {
                            key_id: k.id.arn(),
                            ciphertext_blob: blob,
                            plaintext: None,
                            ciphertext_for_recipient: None,
                        },
                        reason,
                    ))
                })
            }
            Operation::GenerateRandom {
                number_of_bytes,
                recipient,
            } => {
                if !(1..=1024).contains(&number_of_bytes) {
                    return Err(error::validation("NumberOfBytes must be 1 to 1024"));
                }
                let attested = call.verify_recipient(&recipient)?;
                let reason =
                    call.authorize("kms:GenerateRandom", None, &none, attested.as_ref())?;
                let bytes = random_bytes(number_of_bytes as usize);
                let out = match &attested {
                    Some(r) => Output::Plaintext {
                        key_id: None,
                        plaintext: None,
                        ciphertext_for_recipient: Some(call.seal_for(
                            r,
                            "",
                            "GenerateRandom",
                            bytes.as_bytes(),
                        )?),
                    },
                    None => Output::Plaintext {
                        key_id: None,
                        plaintext: Some(bytes),
                        ciphertext_for_recipient: None,
                    },
                };
                Ok((out, reason))
            }
            Operation::PutKeyPolicy { key_id, policy } => {
                let (id, reason) = ks.with_key(&key_id, |k| {
                    call.set_key(k);
                    Ok((
                        k.id,
                        call.authorize("kms:PutKeyPolicy", Some(k), &none, None)?,
                    ))
                })?;
                ks.put_key_policy(id, &policy, |tx| call.commit(tx, reason.clone()))?;
                Ok((Output::Done, reason))
            }
            Operation::GetKeyPolicy { key_id } => ks.with_key(&key_id, |k| {
                call.set_key(k);
                let reason = call.authorize("kms:GetKeyPolicy", Some(k), &none, None)?;
                Ok((Output::KeyPolicy(k.policy_json.clone()), reason))
            }),
            Operation::EnableKey { key_id } | Operation::DisableKey { key_id } => {
                let (action, transition) = if call.record.action == "kms:EnableKey" {
                    ("kms:EnableKey", Transition::Enable)
                } else {
                    ("kms:DisableKey", Transition::Disable)
                };
                let (id, reason) = self.authorized_key(call, &key_id, action)?;
                ks.transition(id, transition, |tx| call.commit(tx, reason.clone()))?;
                Ok((Output::Done, reason))
            }
            Operation::RotateKey { key_id } => {
                let (id, reason) = self.authorized_key(call, &key_id, "kms:RotateKeyOnDemand")?;
                let now = call.now_ms;
                let version = ks
                    .rotate_key(id, now, Rotate::OnDemand, |tx| {
                        call.commit(tx, reason.clone())
                    })?
                    .ok_or_else(|| error::internal("an on-demand rotation did not rotate"))?;
                Ok((
                    Output::Rotated {
                        key_id: id.arn(),
                        version,
                    },
                    reason,
                ))
            }
            Operation::EnableKeyRotation {
                key_id,
                rotation_period_in_days,
            } => {
                let days = rotation_period_in_days.unwrap_or(DEFAULT_ROTATION_DAYS);
                if !ROTATION_DAYS.contains(&days) {
                    return Err(error::validation(format!(
                        "RotationPeriodInDays {days} must be {} to {}",
                        ROTATION_DAYS.start(),
                        ROTATION_DAYS.end()
                    )));
                }
                let (id, reason) = self.authorized_key(call, &key_id, "kms:EnableKeyRotation")?;
                let now = call.now_ms;
                ks.set_rotation(id, Some(days), now, |tx| call.commit(tx, reason.clone()))?;
                Ok((Output::Done, reason))
            }
            Operation::DisableKeyRotation { key_id } => {
                let (id, reason) = self.authorized_key(call, &key_id, "kms:DisableKeyRotation")?;
                let now = call.now_ms;
                ks.set_rotation(id, None, now, |tx| call.commit(tx, reason.clone()))?;
                Ok((Output::Done, reason))
            }
            Operation::GetKeyRotationStatus { key_id } => ks.with_key(&key_id, |k| {
                call.set_key(k);
                let reason = call.authorize("kms:GetKeyRotationStatus", Some(k), &none, None)?;
                Ok((
                    Output::RotationStatus {
                        key_id: k.id.arn(),
                        enabled: k.rotation.is_some(),
                        period_in_days: k.rotation.map(|r| r.period_days),
                        next_rotation_date: k.rotation.map(|r| rfc3339_ms(r.next_ms)),
                    },
                    reason,
                ))
            }),
            Operation::ScheduleKeyDeletion {
                key_id,
                pending_window_in_days,
            } => {
                if !(7..=30).contains(&pending_window_in_days) {
                    return Err(error::validation(format!(
                        "PendingWindowInDays {pending_window_in_days} must be 7 to 30"
                    )));
                }
                let (id, reason) = self.authorized_key(call, &key_id, "kms:ScheduleKeyDeletion")?;
                let when = call.now_ms + u64::from(pending_window_in_days) * 86_400_000;
                ks.transition(id, Transition::ScheduleDeletion(when), |tx| {
                    call.commit(tx, reason.clone())
                })?;
                Ok((
                    Output::DeletionScheduled {
                        key_id: id.arn(),
                        deletion_date: rfc3339_ms(when),
                    },
                    reason,
                ))
            }
            Operation::CancelKeyDeletion { key_id } => {
                let (id, reason) = self.authorized_key(call, &key_id, "kms:CancelKeyDeletion")?;
                ks.transition(id, Transition::CancelDeletion, |tx| {
                    call.commit(tx, reason.clone())
                })?;
                Ok((Output::KeyId(id.arn()), reason))
            }
            Operation::PrincipalAdd {
                name,
                public_key,
                policy,
            } => {
                let reason = call.authorize("cloister:PrincipalAdd", None, &none, None)?;
                let pk: [u8; 32] = public_key.as_slice().try_into().map_err(|_| {
                    error::validation("the public key must be a raw 32-byte Ed25519 key")
                })?;
                let pk = VerifyingKey::from_bytes(&pk).map_err(|_| {
                    error::validation("the public key is not a valid Ed25519 point")
                })?;
                let now = call.now_ms;
                ks.add_principal(&name, pk, &policy, now, |tx| {
                    call.commit(tx, reason.clone())
                })?;
                Ok((Output::Done, reason))
            }
            Operation::PrincipalList => {
                let reason = call.authorize("cloister:PrincipalList", None, &none, None)?;
                let list = ks
                    .list_principals()?
                    .into_iter()
                    .map(|p| PrincipalInfo {
                        name: p.name,
                        public_key_hex: hex::encode(p.public_key.to_bytes()),
                        policy: p.policy_json,
                    })
                    .collect();
                Ok((Output::Principals(list), reason))
            }
            Operation::PrincipalRemove { name } => {
                let reason = call.authorize("cloister:PrincipalRemove", None, &none, None)?;
                ks.remove_principal(&name, |tx| call.commit(tx, reason.clone()))?;
                Ok((Output::Done, reason))
            }
            Operation::AccessKeyCreate { principal } => {
                // A key for another principal is that principal's identity:
                // as much as registering it (cloister:PrincipalAdd).
                let reason = call.authorize_for(
                    &principal,
                    "cloister:AccessKeyCreate",
                    "cloister:PrincipalAdd",
                )?;
                let now = call.now_ms;
                let key = ks.create_access_key(&principal, now, |id, tx| {
                    call.commit(tx, format!("{reason}; access key {id} for {principal:?}"))
                })?;
                Ok((
                    Output::AccessKey {
                        info: access_key_info(&key),
                        secret_access_key: Secret::new(key.secret.as_bytes().to_vec()),
                    },
                    reason,
                ))
            }
            Operation::AccessKeyList { principal } => {
                let reason = match &principal {
                    Some(p) => {
                        call.authorize_for(p, "cloister:AccessKeyList", "cloister:PrincipalList")?
                    }
                    None => {
                        call.authorize_for("", "cloister:AccessKeyList", "cloister:PrincipalList")?
                    }
                };
                let list = ks
                    .list_access_keys()?
                    .iter()
                    .filter(|k| principal.as_ref().is_none_or(|p| *p == k.principal))
                    .map(access_key_info)
                    .collect();
                Ok((Output::AccessKeys(list), reason))
            }
            Operation::AccessKeyDelete { access_key_id } => {
                let owner = ks
                    .access_key(&access_key_id)?
                    .map(|(k, _)| k.principal)
                    .unwrap_or_default();
                let reason = call.authorize_for(
                    &owner,
                    "cloister:AccessKeyDelete",
                    "cloister:PrincipalRemove",
                )?;
                ks.delete_access_key(&access_key_id, &owner, |tx| call.commit(tx, reason.clone()))?;
                Ok((Output::Done, reason))
            }
            Operation::TrustAdd { label, root_der } => {
                let reason = call.authorize("cloister:TrustAdd", None, &none, None)?;
                if label.is_empty() || label.len() > 128 {
                    return Err(error::validation(
                        "a trust root label is 1 to 128 characters",
                    ));
                }
                TrustAnchor::from_der(label.clone(), root_der.clone()).map_err(|e| {
                    error::validation(format!("not a usable root certificate: {e}"))
                })?;
                let now = call.now_ms;
                ks.add_trust_root(&label, &root_der, now, |tx| call.commit(tx, reason.clone()))?;
                Ok((Output::Done, reason))
            }
            Operation::TrustList => {
                let reason = call.authorize("cloister:TrustList", None, &none, None)?;
                let list = ks
                    .trust_roots()?
                    .into_iter()
                    .map(|(label, der)| {
                        let subject =
                            cloister_attestation::verify::ParsedCertificate::parse(&label, &der)
                                .map(|c| c.subject)
                                .unwrap_or_default();
                        TrustRootInfo {
                            label,
                            subject,
                            fingerprint_sha256: hex::encode(Sha256::digest(&der)),
                        }
                    })
                    .collect();
                Ok((Output::TrustRoots(list), reason))
            }
            Operation::TrustRemove { label } => {
                let reason = call.authorize("cloister:TrustRemove", None, &none, None)?;
                ks.remove_trust_root(&label, |tx| call.commit(tx, reason.clone()))?;
                Ok((Output::Done, reason))
            }
        }
    }

    /// A key and the reason `action` on it is allowed (a state change checks
    /// the key's state itself, in its transaction).
    fn authorized_key(
        &self,
        call: &mut Call<'_>,
        key_id: &str,
        action: &str,
    ) -> Result<(KeyId, String), KmsError> {
        self.keystore.with_key(key_id, |k| {
            call.set_key(k);
            let reason = call.authorize(action, Some(k), &EncryptionContext::new(), None)?;
            Ok((k.id, reason))
        })
    }

    fn metadata(&self, id: KeyId) -> Result<KeyMetadata, KmsError> {
        let aliases: Vec<String> = self
            .keystore
            .list_aliases()?
            .into_iter()
            .filter(|(_, k)| *k == id)
            .map(|(a, _)| a)
            .collect();
        self.keystore.with_key_id(id, |k| {
            Ok(KeyMetadata {
                key_id: k.id.to_string(),
                arn: k.id.arn(),
                description: k.description.clone(),
                key_state: format!("{:?}", k.state),
                creation_date: rfc3339_ms(k.created_ms),
                deletion_date: k.deletion_ms.map(rfc3339_ms),
                current_version: k.current_version(),
                aliases,
            })
        })
    }

    /// The periodic upkeep (the server runs it every minute): unauthenticated
    /// failures counted, keys due rotated, keys due destroyed, and on a shared
    /// store request ids no longer acceptable forgotten.
    /// Each step runs whether or not another failed; the first failure is returned.
    pub fn upkeep(&self, now: u64) -> Result<(), KmsError> {
        let skew = self.config.clock_skew.as_millis() as u64;
        let steps = [
            self.record_uncounted(),
            self.keystore.refresh().and_then(|()| {
                self.rotate_due_keys(now)?;
                self.purge_due_keys(now).map(|_| ())
            }),
            self.keystore.forget_request_ids(now, skew).map(|_| ()),
            self.keystore
                .forget_replicas(now.saturating_sub(86_400_000))
                .map(|_| ()),
        ];
        steps.into_iter().collect()
    }

    /// On a shared store, says that this replica serves (the server calls
    /// this every [`HEARTBEAT`]) and learns how many do: each principal's
    /// rate limit is split among them.
    pub fn heartbeat(&self, now: u64) -> Result<u64, KmsError> {
        if !self.keystore.store().is_shared() {
            return Ok(1);
        }
        let alive = self.keystore.heartbeat(
            &self.config.replica,
            now,
            now.saturating_sub(REPLICA_TIMEOUT.as_millis() as u64),
        )?;
        self.replicas_alive
            .store(alive.max(1), std::sync::atomic::Ordering::Relaxed);
        Ok(alive)
    }

    /// Rotates keys whose automatic rotation is due; each rotation is audited.
    /// Returns how many were rotated.
    pub fn rotate_due_keys(&self, now: u64) -> Result<usize, KmsError> {
        let mut rotated = 0;
        for id in &self.keystore.due_for_rotation(now)? {
            let done = self.keystore.rotate_key(*id, now, Rotate::Due, |tx| {
                self.audit
                    .record_in(
                        tx,
                        RequestRecord {
                            principal: "cloister-broker".into(),
                            action: "kms:RotateKey".into(),
                            key_id: Some(id.to_string()),
                            decision: Decision::Allow,
                            reason: "automatic rotation: the key's rotation period ended".into(),
                            ..Default::default()
                        },
                    )
                    .map(|_| ())
            });
            // A key disabled or scheduled for deletion meanwhile is not rotated.
            rotated += usize::from(matches!(done, Ok(Some(_))));
        }
        Ok(rotated)
    }

    /// Destroys keys whose deletion date has come; each destruction is audited.
    /// Returns how many were destroyed (a deletion cancelled meanwhile wins).
    pub fn purge_due_keys(&self, now: u64) -> Result<usize, KmsError> {
        let mut destroyed = 0;
        for id in &self.keystore.due_for_deletion(now)? {
            let done =
                self.keystore.destroy_key(*id, now, |tx| {
                    self.audit
                    .record_in(tx, RequestRecord {
                        request_id: String::new(),
                        principal: "cloister-broker".into(),
                        action: "kms:DeleteKey".into(),
                        key_id: Some(id.to_string()),
                        decision: Decision::Allow,
                        reason: "the deletion waiting period ended; the key material is destroyed"
                            .into(),
                        ..Default::default()
                    })
                    .map(|_| ())
                })?;
            destroyed += usize::from(done);
        }
        Ok(destroyed)
    }
}

fn decode(frame: &[u8]) -> Result<(SignedRequest, RequestPayload), cloister_proto::FrameError> {
    let signed = cloister_proto::frame::decode::<SignedRequest>(frame)?;
    let payload = cloister_proto::frame::decode::<RequestPayload>(&signed.payload)?;
    Ok((signed, payload))
}

/// A request handled up to its audit record.
pub enum Prepared {
    /// Audited already (inside a keystore transaction), or an unauthenticated
    /// failure only counted: send this.
    Done {
        response: Response,
        authenticated: bool,
    },
    /// Send `response` only once `record` is on disk ([`Prepared::finish`]).
    Audit {
        record: RequestRecord,
        response: Response,
    },
}

impl Prepared {
    /// Whether the request counts against its peer's allowance of
    /// unauthenticated failures (and its connection is closed): its sender was
    /// not authenticated (signature, freshness, unused id). A request whose
    /// signature verified but that the broker then failed to serve (its
    /// database unreachable at the replay claim) is authenticated: not the
    /// peer's doing. Anything that fails before the signature is checked
    /// counts, the broker's own failures included.
    pub fn charges_peer(&self) -> bool {
        match self {
            Prepared::Done { authenticated, .. } => !*authenticated,
            Prepared::Audit { record, .. } => !record.authenticated,
        }
    }

    /// The response to send after the audit record was written, or not: an
    /// unwritten record turns the response into that error, without a result.
    pub fn finish(audited: Result<u64, KmsError>, response: Response) -> Response {
        match audited {
            Ok(_) => response,
            Err(e) => Response {
                result: Err(e),
                ..response
            },
        }
    }
}

/// Operations that read the keystore and change nothing stored: their only
/// write is the audit record after the fact, so they can run on a task that
/// must not block. Anything not listed is handled where blocking is allowed.
fn changes_nothing_stored(op: &Operation) -> bool {
    matches!(
        op,
        Operation::Decrypt { .. }
            | Operation::Encrypt { .. }
            | Operation::ReEncrypt { .. }
            | Operation::GenerateDataKey { .. }
            | Operation::GenerateDataKeyWithoutPlaintext { .. }
            | Operation::GenerateRandom { .. }
            | Operation::GetKeyRotationStatus { .. }
            | Operation::AccessKeyList { .. }
            | Operation::DescribeKey { .. }
            | Operation::ListKeys
            | Operation::ListAliases
            | Operation::GetKeyPolicy { .. }
            | Operation::PrincipalList
            | Operation::TrustList
    )
}

fn verify_request(
    key: &VerifyingKey,
    payload: &[u8],
    signature: &Signature,
) -> Result<(), KmsError> {
    key.verify_strict(&[REQUEST_LABEL, payload].concat(), signature)
        .map_err(|_| {
            error::invalid_signature(
                "the request signature does not verify with the principal's key",
            )
        })
}
