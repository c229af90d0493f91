//! The AWS KMS JSON API front end: SigV4 requests (signed here by the
//! `aws-sigv4` crate as an AWS SDK signs them) against a real keystore and
//! audit log, the bad paths each with its AWS error type; and the listener
//! over real TCP. boto3 and the aws CLI drive it end to end in tests/cli_kms.rs.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use serde_json::{Value, json};

use cloister_kms::aws::{self, HttpRequest};
use cloister_kms::datadir::{ADMIN, DataDir};
use cloister_kms::protocol::*;
use cloister_kms::service::{Broker, BrokerConfig, Prepared};

const REGION: &str = "us-east-1";
const ROLE: &str = "arn:aws:iam::111122223333:role/app";
const ALLOW_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}"#;

struct Env {
    dir: tempfile::TempDir,
    broker: Broker,
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn b64d(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().join("kms"));
        data.init(None, &[], None).unwrap();
        let broker = data.open(None, BrokerConfig::default()).unwrap();
        Env { dir, broker }
    }

    fn reopen(self) -> Env {
        let data = DataDir::new(self.dir.path().join("kms"));
        self.broker.audit().shutdown().unwrap();
        drop(self.broker);
        let broker = data.open(None, BrokerConfig::default()).unwrap();
        Env {
            dir: self.dir,
            broker,
        }
    }

    /// An operation of Cloister's own protocol, as the admin.
    fn admin(&self, operation: Operation) -> Result<Output, cloister_kms::KmsError> {
        let key =
            cloister_attestation::keyfile::read_signing_key(&self.dir.path().join("kms/admin.key"))
                .unwrap();
        self.native(ADMIN, &key, operation)
    }

    /// An operation of Cloister's own protocol, as `principal`.
    fn native(
        &self,
        principal: &str,
        key: &ed25519_dalek::SigningKey,
        operation: Operation,
    ) -> Result<Output, cloister_kms::KmsError> {
        let payload = RequestPayload {
            principal: principal.into(),
            timestamp_ms: cloister_kms::service::now_ms(),
            request_id: format!(
                "{:032x}",
                rand_core::RngCore::next_u64(&mut rand_core::OsRng)
            ),
            operation,
        };
        let signed = SignedRequest::sign(&payload, key).unwrap();
        let frame = cloister_proto::frame::encode(&signed).unwrap();
        self.broker.handle(&frame).0.result
    }

    /// A principal named `name` with this identity policy and an access key.
    fn principal(&self, name: &str, policy: &str) -> (String, String) {
        let key = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
        self.admin(Operation::PrincipalAdd {
            name: name.into(),
            public_key: key.verifying_key().to_bytes().to_vec(),
            policy: policy.into(),
        })
        .unwrap();
        match self
            .admin(Operation::AccessKeyCreate {
                principal: name.into(),
            })
            .unwrap()
        {
            Output::AccessKey {
                info,
                secret_access_key,
            } => (
                info.access_key_id,
                String::from_utf8(secret_access_key.as_bytes().to_vec()).unwrap(),
            ),
            other => panic!("{other:?}"),
        }
    }

    /// Handles a request as the listener does: audit record, then response.
    fn send(&self, req: &HttpRequest) -> (u16, Value) {
        let call = self.broker.prepare_aws(req, REGION);
        let response = match call.prepared {
            Prepared::Done { response, .. } => response,
            Prepared::Audit { record, response } => {
                Prepared::finish(self.broker.audit().record(record), response)
            }
        };
        assert_eq!(response.request_id, call.request_id);
        let r = aws::respond(&req.body, response);
        (r.status, serde_json::from_slice(&r.body).unwrap())
    }

    fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("kms/audit.log"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// A request as an AWS SDK signs it (content-type;host;x-amz-date;x-amz-target).
fn signed(op: &str, body: &Value, key: &(String, String), at: SystemTime) -> HttpRequest {
    signed_in(op, body.to_string().into_bytes(), key, at, REGION)
}

fn signed_in(
    op: &str,
    body: Vec<u8>,
    key: &(String, String),
    at: SystemTime,
    region: &str,
) -> HttpRequest {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let mut headers = vec![
        ("host".to_owned(), "kms.local:4443".to_owned()),
        (
            "content-type".to_owned(),
            "application/x-amz-json-1.1".to_owned(),
        ),
        ("x-amz-target".to_owned(), format!("TrentService.{op}")),
    ];
    let identity =
        aws_credential_types::Credentials::new(&key.0, &key.1, None, None, "test").into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("kms")
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let signable = SignableRequest::new(
        "POST",
        "https://kms.local:4443/",
        headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        SignableBody::Bytes(&body),
    )
    .unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    let (added, _) = instructions.into_parts();
    for h in added {
        headers.push((h.name().to_ascii_lowercase(), h.value().to_owned()));
    }
    HttpRequest {
        method: "POST".into(),
        uri: "/".into(),
        headers,
        body,
    }
}

fn set_header(req: &mut HttpRequest, name: &str, value: &str) {
    req.headers.retain(|(n, _)| n != name);
    req.headers.push((name.into(), value.into()));
}

fn error_type(reply: &(u16, Value)) -> (&str, &str) {
    assert_eq!(reply.0, 400, "{reply:?}");
    (
        reply.1["__type"].as_str().unwrap(),
        reply.1["message"].as_str().unwrap(),
    )
}

#[test]
fn signed_requests_run_the_same_operations_policies_and_audit() {
    let env = Env::new();
    let key = env.principal(ROLE, ALLOW_ALL);
    let now = SystemTime::now();
    let (status, created) = env.send(&signed(
        "CreateKey",
        &json!({"Description": "orders"}),
        &key,
        now,
    ));
    assert_eq!(status, 200, "{created}");
    let meta = &created["KeyMetadata"];
    assert_eq!(meta["KeyState"], "Enabled");
    assert_eq!(meta["Enabled"], true);
    assert_eq!(meta["KeySpec"], "SYMMETRIC_DEFAULT");
    assert!(meta["CreationDate"].as_f64().unwrap() > 1.7e9);
    let key_id = meta["KeyId"].as_str().unwrap().to_owned();

    let (status, _) = env.send(&signed(
        "CreateAlias",
        &json!({"AliasName": "alias/orders", "TargetKeyId": key_id}),
        &key,
        now,
    ));
    assert_eq!(status, 200);
    let context = json!({"tenant": "a"});
    let (status, enc) = env.send(&signed(
        "Encrypt",
        &json!({"KeyId": "alias/orders", "Plaintext": b64(b"card 4111"), "EncryptionContext": context}),
        &key,
        now,
    ));
    assert_eq!(status, 200, "{enc}");
    assert_eq!(enc["EncryptionAlgorithm"], "SYMMETRIC_DEFAULT");
    let (status, dec) = env.send(&signed(
        "Decrypt",
        &json!({"CiphertextBlob": enc["CiphertextBlob"], "EncryptionContext": context}),
        &key,
        now,
    ));
    assert_eq!(status, 200, "{dec}");
    assert_eq!(b64d(&dec["Plaintext"]), b"card 4111");
    // Another context is the wrong one: InvalidCiphertextException.
    let reply = env.send(&signed(
        "Decrypt",
        &json!({"CiphertextBlob": enc["CiphertextBlob"], "EncryptionContext": {"tenant": "b"}}),
        &key,
        now,
    ));
    assert_eq!(error_type(&reply).0, "InvalidCiphertextException");

    // Data keys: with and without plaintext, by KeySpec or NumberOfBytes.
    let (_, dk) = env.send(&signed(
        "GenerateDataKey",
        &json!({"KeyId": key_id, "NumberOfBytes": 24}),
        &key,
        now,
    ));
    assert_eq!(b64d(&dk["Plaintext"]).len(), 24);
    let (_, opened) = env.send(&signed(
        "Decrypt",
        &json!({"CiphertextBlob": dk["CiphertextBlob"]}),
        &key,
        now,
    ));
    assert_eq!(opened["Plaintext"], dk["Plaintext"]);
    let (status, wp) = env.send(&signed(
        "GenerateDataKeyWithoutPlaintext",
        &json!({"KeyId": key_id, "KeySpec": "AES_128"}),
        &key,
        now,
    ));
    assert_eq!(status, 200);
    assert!(wp.get("Plaintext").is_none(), "{wp}");
    let (_, opened) = env.send(&signed(
        "Decrypt",
        &json!({"CiphertextBlob": wp["CiphertextBlob"]}),
        &key,
        now,
    ));
    assert_eq!(b64d(&opened["Plaintext"]).len(), 16);

    // Rotation: automatic rotation on, then due, then rotated by the broker.
    let (status, _) = env.send(&signed(
        "EnableKeyRotation",
        &json!({"KeyId": key_id, "RotationPeriodInDays": 90}),
        &key,
        now,
    ));
    assert_eq!(status, 200);
    let (_, rotation) = env.send(&signed(
        "GetKeyRotationStatus",
        &json!({"KeyId": key_id}),
        &key,
        now,
    ));
    assert_eq!(rotation["KeyRotationEnabled"], true);
    assert_eq!(rotation["RotationPeriodInDays"], 90);
    let next = rotation["NextRotationDate"].as_f64().unwrap();
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((next - now_s - 90.0 * 86400.0).abs() < 60.0, "{rotation}");
    let reply = env.send(&signed(
        "EnableKeyRotation",
        &json!({"KeyId": key_id, "RotationPeriodInDays": 30}),
        &key,
        now,
    ));
    assert!(error_type(&reply).1.contains("90 to 2560"), "{reply:?}");
    let later = cloister_kms::service::now_ms() + 91 * 86_400_000;
    assert_eq!(env.broker.rotate_due_keys(later).unwrap(), 1);
    assert_eq!(env.broker.rotate_due_keys(later).unwrap(), 0, "rescheduled");
    let (_, described) = env.send(&signed(
        "DescribeKey",
        &json!({"KeyId": "alias/orders"}),
        &key,
        now,
    ));
    assert_eq!(described["KeyMetadata"]["KeyId"], key_id.as_str());
    // Blobs of the first version still decrypt.
    let (status, _) = env.send(&signed(
        "Decrypt",
        &json!({"CiphertextBlob": enc["CiphertextBlob"], "EncryptionContext": context}),
        &key,
        now,
    ));
    assert_eq!(status, 200);
    let rotated = env
        .audit_lines()
        .into_iter()
        .filter(|l| l["action"] == "kms:RotateKey" && l["principal"] == "cloister-broker")
        .count();
    assert_eq!(rotated, 1);

    // Disabled: DisabledException; deletion scheduled and cancelled.
    env.send(&signed("DisableKey", &json!({"KeyId": key_id}), &key, now));
    let reply = env.send(&signed(
        "Encrypt",
        &json!({"KeyId": key_id, "Plaintext": b64(b"x")}),
        &key,
        now,
    ));
    assert_eq!(error_type(&reply).0, "DisabledException");
    let (status, sched) = env.send(&signed(
        "ScheduleKeyDeletion",
        &json!({"KeyId": key_id, "PendingWindowInDays": 7}),
        &key,
        now,
    ));
    assert_eq!(status, 200, "{sched}");
    assert_eq!(sched["KeyState"], "PendingDeletion");
    let (status, _) = env.send(&signed(
        "CancelKeyDeletion",
        &json!({"KeyId": key_id}),
        &key,
        now,
    ));
    assert_eq!(status, 200);
    let (status, _) = env.send(&signed(
        "DeleteAlias",
        &json!({"AliasName": "alias/orders"}),
        &key,
        now,
    ));
    assert_eq!(status, 200);
    let reply = env.send(&signed(
        "DescribeKey",
        &json!({"KeyId": "alias/orders"}),
        &key,
        now,
    ));
    assert_eq!(error_type(&reply).0, "NotFoundException");

    // Every request is in the audit log with its principal and access key.
    let lines = env.audit_lines();
    let ours: Vec<&Value> = lines
        .iter()
        .filter(|l| l["access_key_id"] == key.0.as_str())
        .collect();
    assert!(ours.len() >= 20, "{}", ours.len());
    assert!(ours.iter().all(|l| l["principal"] == ROLE));
    assert!(
        ours.iter()
            .any(|l| l["action"] == "kms:Decrypt" && l["decision"] == "Allow")
    );
}

#[test]
fn listings_are_paged_as_aws_pages_them() {
    let env = Env::new();
    let key = env.principal(ROLE, ALLOW_ALL);
    let now = SystemTime::now();
    let mut made = Vec::new();
    for _ in 0..5 {
        let (_, c) = env.send(&signed("CreateKey", &json!({}), &key, now));
        made.push(c["KeyMetadata"]["KeyId"].as_str().unwrap().to_owned());
    }
    made.sort();
    let mut seen = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let mut body = json!({"Limit": 2});
        if let Some(m) = &marker {
            body["Marker"] = json!(m);
        }
        let (status, page) = env.send(&signed("ListKeys", &body, &key, now));
        assert_eq!(status, 200, "{page}");
        let keys = page["Keys"].as_array().unwrap();
        assert!(keys.len() <= 2);
        seen.extend(keys.iter().map(|k| k["KeyId"].as_str().unwrap().to_owned()));
        if page["Truncated"] == false {
            assert!(page.get("NextMarker").is_none());
            break;
        }
        marker = Some(page["NextMarker"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen, made);
    let reply = env.send(&signed("ListKeys", &json!({"Limit": 0}), &key, now));
    assert!(error_type(&reply).1.contains("Limit 0"));
}

#[test]
fn bad_signatures_are_refused_with_aws_error_types_and_audited() {
    let env = Env::new();
    let key = env.principal(ROLE, ALLOW_ALL);
    let now = SystemTime::now();
    let body = json!({"NumberOfBytes": 16});
    let good = signed("GenerateRandom", &body, &key, now);
    assert_eq!(env.send(&good).0, 200);

    // The wrong secret.
    let wrong = (key.0.clone(), "wrong-secret".to_owned());
    let reply = env.send(&signed("GenerateRandom", &body, &wrong, now));
    assert_eq!(error_type(&reply).0, "InvalidSignatureException");
    assert!(error_type(&reply).1.contains("does not match"), "{reply:?}");
    // The body altered after signing.
    let mut altered = good.clone();
    altered.body = json!({"NumberOfBytes": 17}).to_string().into_bytes();
    assert_eq!(
        error_type(&env.send(&altered)).0,
        "InvalidSignatureException"
    );
    // A signed header altered (the target: another operation).
    let mut retargeted = good.clone();
    set_header(
        &mut retargeted,
        "x-amz-target",
        "TrentService.GenerateDataKey",
    );
    assert_eq!(
        error_type(&env.send(&retargeted)).0,
        "InvalidSignatureException"
    );
    // An access key this broker did not issue.
    let stranger = ("AKCLAAAAAAAAAAAAAAAA".to_owned(), key.1.clone());
    let reply = env.send(&signed("GenerateRandom", &body, &stranger, now));
    assert_eq!(error_type(&reply).0, "UnrecognizedClientException");
    // Signed six minutes ago, or six minutes ahead.
    for skew in [-360i64, 360] {
        let at = if skew < 0 {
            now - Duration::from_secs(360)
        } else {
            now + Duration::from_secs(360)
        };
        let reply = env.send(&signed("GenerateRandom", &body, &key, at));
        assert_eq!(error_type(&reply).0, "RequestExpiredException", "{skew}");
        assert!(error_type(&reply).1.contains("signature expired"));
    }
    // Four minutes is within AWS's five.
    assert_eq!(
        env.send(&signed(
            "GenerateRandom",
            &body,
            &key,
            now - Duration::from_secs(240)
        ))
        .0,
        200
    );
    // Another region.
    let reply = env.send(&signed_in(
        "GenerateRandom",
        body.to_string().into_bytes(),
        &key,
        now,
        "eu-west-1",
    ));
    assert!(error_type(&reply).1.contains("eu-west-1"), "{reply:?}");
    // No signature; a malformed one; host not signed; a session token.
    let mut unsigned = good.clone();
    unsigned.headers.retain(|(n, _)| n != "authorization");
    assert_eq!(
        error_type(&env.send(&unsigned)).0,
        "IncompleteSignatureException"
    );
    for bad in [
        "AWS4-HMAC-SHA1 Credential=a/b/c/d/aws4_request, SignedHeaders=host, Signature=00",
        "AWS4-HMAC-SHA256 Credential=AKCL/20260101/us-east-1/kms, SignedHeaders=host;x-amz-date, Signature=",
        "AWS4-HMAC-SHA256 garbage",
    ] {
        let mut r = good.clone();
        set_header(&mut r, "authorization", bad);
        assert_eq!(
            error_type(&env.send(&r)).0,
            "IncompleteSignatureException",
            "{bad}"
        );
    }
    let mut no_host = good.clone();
    let auth = no_host
        .headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .unwrap()
        .1
        .replace("content-type;host;x-amz-date", "content-type;x-amz-date");
    set_header(&mut no_host, "authorization", &auth);
    let reply = env.send(&no_host);
    assert!(error_type(&reply).1.contains("host"), "{reply:?}");
    // The target (which decides the operation) and the content type must be
    // signed: a request signed over host and x-amz-date alone is refused,
    // whatever its target says.
    let mut unsigned_target = good.clone();
    let auth = unsigned_target
        .headers
        .iter()
        .find(|(n, _)| n == "authorization")
        .unwrap()
        .1
        .replace(
            "content-type;host;x-amz-date;x-amz-target",
            "host;x-amz-date",
        );
    set_header(&mut unsigned_target, "authorization", &auth);
    let reply = env.send(&unsigned_target);
    assert_eq!(error_type(&reply).0, "IncompleteSignatureException");
    assert!(error_type(&reply).1.contains("x-amz-target"), "{reply:?}");
    let mut token = good.clone();
    token
        .headers
        .push(("x-amz-security-token".into(), "FQoGZXIvYXdz".into()));
    assert_eq!(
        error_type(&env.send(&token)).0,
        "UnrecognizedClientException"
    );

    // A deleted access key, and a removed principal's keys, are refused.
    env.admin(Operation::AccessKeyDelete {
        access_key_id: key.0.clone(),
    })
    .unwrap();
    assert_eq!(
        error_type(&env.send(&good)).0,
        "UnrecognizedClientException"
    );
    let other = env.principal("other", ALLOW_ALL);
    env.admin(Operation::PrincipalRemove {
        name: "other".into(),
    })
    .unwrap();
    let reply = env.send(&signed("GenerateRandom", &body, &other, now));
    assert_eq!(error_type(&reply).0, "UnrecognizedClientException");

    // Refusals are in the audit log as denials, naming the access key.
    let lines = env.audit_lines();
    let denied: Vec<&Value> = lines
        .iter()
        .filter(|l| l["decision"] == "Deny" && l["access_key_id"] == key.0.as_str())
        .collect();
    assert!(denied.len() >= 8, "{denied:?}");
    assert!(
        denied
            .iter()
            .any(|l| l["reason"].as_str().unwrap().contains("does not match"))
    );
}

#[test]
fn malformed_and_unsupported_input_gets_typed_errors() {
    let env = Env::new();
    let key = env.principal(ROLE, ALLOW_ALL);
    let now = SystemTime::now();
    let cases: &[(&str, Value, &str, &str)] = &[
        (
            "Encrypt",
            json!({"KeyId": "alias/x", "Plaintext": "not base64!"}),
            "SerializationException",
            "base64",
        ),
        (
            "Encrypt",
            json!({"KeyId": "alias/x", "Plaintext": "eA==", "Surprise": 1}),
            "SerializationException",
            "Surprise",
        ),
        (
            "Encrypt",
            json!({"KeyId": 7, "Plaintext": "eA=="}),
            "SerializationException",
            "KeyId",
        ),
        (
            "Encrypt",
            json!({"Plaintext": "eA=="}),
            "ValidationException",
            "KeyId is required",
        ),
        (
            "Encrypt",
            json!({"KeyId": "alias/x", "Plaintext": "eA==", "GrantTokens": ["t"]}),
            "ValidationException",
            "grants",
        ),
        (
            "CreateKey",
            json!({"KeySpec": "RSA_2048"}),
            "ValidationException",
            "RSA_2048",
        ),
        (
            "CreateKey",
            json!({"Tags": [{"TagKey": "a", "TagValue": "b"}]}),
            "ValidationException",
            "Tags",
        ),
        (
            "GenerateDataKey",
            json!({"KeyId": "alias/x", "KeySpec": "AES_256", "NumberOfBytes": 32}),
            "ValidationException",
            "not both",
        ),
        (
            "Decrypt",
            json!({"CiphertextBlob": "AAAA", "Recipient": {"AttestationDocument": "AAAA", "Extra": 1}}),
            "SerializationException",
            "Recipient.Extra",
        ),
        ("Sign", json!({}), "UnknownOperationException", "not served"),
    ];
    for (op, body, kind, says) in cases {
        let reply = env.send(&signed(op, body, &key, now));
        let (t, m) = error_type(&reply);
        assert_eq!(t, *kind, "{op} {body}: {m}");
        assert!(m.contains(says), "{op} {body}: {m}");
    }
    // Not JSON at all, though signed.
    let r = signed_in("ListKeys", b"{not json".to_vec(), &key, now, REGION);
    let reply = env.send(&r);
    assert_eq!(error_type(&reply).0, "SerializationException");
    // Not POST /, or not JSON 1.1.
    let mut get = signed("ListKeys", &json!({}), &key, now);
    get.method = "GET".into();
    let r = aws::respond(
        &[],
        match env.broker.prepare_aws(&get, REGION).prepared {
            Prepared::Done { response, .. } | Prepared::Audit { response, .. } => response,
        },
    );
    assert_eq!(r.status, 405);
    let mut xml = signed("ListKeys", &json!({}), &key, now);
    set_header(&mut xml, "content-type", "application/xml");
    assert_eq!(error_type(&env.send(&xml)).0, "SerializationException");
}

#[test]
fn access_key_secrets_are_encrypted_at_rest_and_survive_a_restart() {
    let env = Env::new();
    let key = env.principal(ROLE, ALLOW_ALL);
    let listed = env
        .admin(Operation::AccessKeyList {
            principal: Some(ROLE.into()),
        })
        .unwrap();
    let Output::AccessKeys(list) = listed else {
        panic!("{listed:?}")
    };
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].access_key_id, key.0);
    assert!(
        !format!("{list:?}").contains(&key.1),
        "a listing shows no secret"
    );
    let env = env.reopen();
    let now = SystemTime::now();
    let reply = env.send(&signed(
        "GenerateRandom",
        &json!({"NumberOfBytes": 8}),
        &key,
        now,
    ));
    assert_eq!(reply.0, 200, "{reply:?}");
    // The secret is not in the keystore's files, in any encoding we know.
    let kms = env.dir.path().join("kms");
    for entry in std::fs::read_dir(&kms).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            let hay = String::from_utf8_lossy(&bytes);
            assert!(!hay.contains(&key.1), "{} holds the secret", path.display());
        }
    }
    // An access key for no principal is refused.
    let err = env
        .admin(Operation::AccessKeyCreate {
            principal: "nobody".into(),
        })
        .unwrap_err();
    assert_eq!(err.kind, cloister_kms::ErrorKind::NotFoundException);
}

#[test]
fn an_aws_key_policy_works_unchanged_with_account_principals_and_caller_account() {
    let env = Env::new();
    let key = env.principal(ROLE, ALLOW_ALL);
    let outsider = env.principal("arn:aws:iam::999999999999:role/app", ALLOW_ALL);
    // The key policy AWS's console writes ("Enable IAM User Permissions")
    // and a kms:CallerAccount condition.
    let policy = json!({
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [
            {"Sid": "Enable IAM User Permissions", "Effect": "Allow",
             "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
             "Action": "kms:*", "Resource": "*"},
            {"Sid": "Deny other accounts", "Effect": "Deny", "Principal": "*",
             "Action": "kms:*", "Resource": "*",
             "Condition": {"StringNotEquals": {"kms:CallerAccount": "111122223333"}}}
        ]
    })
    .to_string();
    let now = SystemTime::now();
    let (status, created) = env.send(&signed("CreateKey", &json!({"Policy": policy}), &key, now));
    assert_eq!(status, 200, "{created}");
    let id = created["KeyMetadata"]["KeyId"].as_str().unwrap();
    let body = json!({"KeyId": id, "Plaintext": b64(b"x")});
    assert_eq!(env.send(&signed("Encrypt", &body, &key, now)).0, 200);
    let reply = env.send(&signed("Encrypt", &body, &outsider, now));
    let (t, m) = error_type(&reply);
    assert_eq!(t, "AccessDeniedException");
    assert!(m.contains("Deny other accounts"), "{m}");
}

/// The listener over real TCP: plain HTTP on loopback, oversized and
/// non-POST requests answered in AWS's error shape; plain HTTP elsewhere refused.
#[tokio::test]
async fn the_listener_speaks_http_with_aws_error_shapes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::new();
    let data = DataDir::new(env.dir.path().join("kms"));
    env.broker.audit().shutdown().unwrap();
    drop(env.broker);
    let broker = Arc::new(data.open(None, BrokerConfig::default()).unwrap());
    // Plain HTTP on a non-loopback address is refused before anything is served.
    let any = cloister_proto::listen(&"tcp:0.0.0.0:0".parse().unwrap())
        .await
        .unwrap();
    let refused = cloister_kms::server::serve(
        broker.clone(),
        Vec::new(),
        vec![cloister_kms::server::AwsApi {
            listener: any,
            plain_http: true,
            region: REGION.into(),
        }],
        Default::default(),
        None,
        async {},
    )
    .await
    .unwrap_err();
    assert!(refused.message.contains("loopback"), "{refused}");

    let listener = cloister_proto::listen(&"tcp:127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let cloister_proto::Address::Tcp { port, .. } = listener.local_address().unwrap() else {
        panic!()
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cloister_kms::server::serve(
        broker,
        Vec::new(),
        vec![cloister_kms::server::AwsApi {
            listener,
            plain_http: true,
            region: REGION.into(),
        }],
        Default::default(),
        None,
        async {
            let _ = rx.await;
        },
    ));
    let exchange = |request: Vec<u8>| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(&request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let get = exchange(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec()).await;
    assert!(get.starts_with("HTTP/1.1 405"), "{get}");
    assert!(get.contains("UnknownOperationException"), "{get}");
    assert!(
        get.to_ascii_lowercase().contains("x-amzn-requestid"),
        "{get}"
    );
    let big = vec![b'a'; MAX_REQUEST as usize + 1];
    let mut req = format!(
        "POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-amz-json-1.1\r\nx-amz-target: TrentService.ListKeys\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    let reply = exchange(req).await;
    assert!(
        reply.starts_with("HTTP/1.1 400"),
        "{}",
        &reply[..200.min(reply.len())]
    );
    assert!(reply.contains("larger than"), "{reply}");
    let audit = std::fs::read_to_string(env.dir.path().join("kms/audit.log")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("larger than")),
        "an unread request is audited too"
    );
    let unsigned = exchange(
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-amz-json-1.1\r\nx-amz-target: TrentService.ListKeys\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}".to_vec(),
    )
    .await;
    assert!(
        unsigned.contains("IncompleteSignatureException"),
        "{unsigned}"
    );
    assert!(
        unsigned.contains("E-KMS-INCOMPLETE-SIGNATURE"),
        "{unsigned}"
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// Someone who can write the keystore but not the root key sets its schema
/// version back (and drops the MAC columns) so that a migration would seal a
/// row they forged: the root check, under the root key, says the rows carry
/// MACs already, and the keystore is refused.
#[test]
fn a_schema_version_set_back_to_have_forged_rows_sealed_is_refused() {
    let env = Env::new();
    let path = env.dir.path().join("kms/keystore.db");
    let dir = env.dir;
    drop(env.broker);
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "ALTER TABLE keys DROP COLUMN mac; ALTER TABLE aliases DROP COLUMN mac; \
             ALTER TABLE principals DROP COLUMN mac; ALTER TABLE trust_roots DROP COLUMN mac; \
             ALTER TABLE access_keys DROP COLUMN mac; \
             UPDATE principals SET policy = '{\"Version\":\"2012-10-17\",\"Statement\":{\"Effect\":\"Allow\",\"Action\":\"*\",\"Resource\":\"*\"}}'; \
             UPDATE meta SET value = 2 WHERE name = 'schema_version';",
        )
        .unwrap();
    }
    let e = DataDir::new(dir.path().join("kms"))
        .open(None, BrokerConfig::default())
        .err()
        .unwrap();
    assert!(e.message.contains("edited outside the broker"), "{e}");
}

/// A keystore of schema 1 (before access keys, rotation and row MACs) is
/// migrated in place when a newer broker opens it, keeping its keys.
#[test]
fn a_schema_1_keystore_is_migrated_with_its_keys() {
    let env = Env::new();
    let Output::KeyMetadata(meta) = env
        .admin(Operation::CreateKey {
            description: "old".into(),
            policy: None,
        })
        .unwrap()
    else {
        panic!()
    };
    let Output::Ciphertext {
        ciphertext_blob, ..
    } = env
        .admin(Operation::Encrypt {
            key_id: meta.key_id.clone(),
            plaintext: Secret::new(b"kept".to_vec()),
            encryption_context: Default::default(),
        })
        .unwrap()
    else {
        panic!()
    };
    let path = env.dir.path().join("kms/keystore.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE access_keys; ALTER TABLE keys DROP COLUMN rotation_days; \
             ALTER TABLE keys DROP COLUMN next_rotation_ms; ALTER TABLE keys DROP COLUMN mac; \
             ALTER TABLE aliases DROP COLUMN mac; ALTER TABLE principals DROP COLUMN mac; \
             ALTER TABLE trust_roots DROP COLUMN mac; \
             UPDATE meta SET value = 1 WHERE name = 'schema_version';",
        )
        .unwrap();
        // A schema-1 keystore's root check, as brokers of then wrote it.
        let root =
            cloister_kms::crypto::RootKey::from_file(&env.dir.path().join("kms/root.key")).unwrap();
        let old_check = root.seal(b"cloister-kms-root-check-v1", b"ok").unwrap();
        conn.execute(
            "UPDATE meta SET value = ?1 WHERE name = 'root_check'",
            [old_check],
        )
        .unwrap();
    }
    let env = env.reopen();
    let Output::Plaintext {
        plaintext: Some(p), ..
    } = env
        .admin(Operation::Decrypt {
            ciphertext_blob,
            key_id: None,
            encryption_context: Default::default(),
            recipient: None,
        })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(p.as_bytes(), b"kept");
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT value FROM meta WHERE name = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, 3);
    // Its rows were sealed as it was migrated: they verify at the next open too.
    let env = env.reopen();
    env.principal(ROLE, ALLOW_ALL);
}

#[test]
fn access_keys_of_another_principal_need_that_principal_s_rights() {
    let env = Env::new();
    let key = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
    let self_service = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":["cloister:AccessKey*"],"Resource":"*"}}"#;
    env.admin(Operation::PrincipalAdd {
        name: "app".into(),
        public_key: key.verifying_key().to_bytes().to_vec(),
        policy: self_service.into(),
    })
    .unwrap();
    // Its own: allowed.
    let Output::AccessKey { info, .. } = env
        .native(
            "app",
            &key,
            Operation::AccessKeyCreate {
                principal: "app".into(),
            },
        )
        .unwrap()
    else {
        panic!()
    };
    // The admin's: that would be the admin's identity.
    let err = env
        .native(
            "app",
            &key,
            Operation::AccessKeyCreate {
                principal: ADMIN.into(),
            },
        )
        .unwrap_err();
    assert_eq!(err.kind, cloister_kms::ErrorKind::AccessDeniedException);
    assert!(err.message.contains("cloister:PrincipalAdd"), "{err}");
    let (other_key, _) = env.principal("other", ALLOW_ALL);
    let err = env
        .native(
            "app",
            &key,
            Operation::AccessKeyDelete {
                access_key_id: other_key,
            },
        )
        .unwrap_err();
    assert!(err.message.contains("cloister:PrincipalRemove"), "{err}");
    let err = env
        .native("app", &key, Operation::AccessKeyList { principal: None })
        .unwrap_err();
    assert!(err.message.contains("cloister:PrincipalList"), "{err}");
    let Output::AccessKeys(own) = env
        .native(
            "app",
            &key,
            Operation::AccessKeyList {
                principal: Some("app".into()),
            },
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(own.len(), 1);
    env.native(
        "app",
        &key,
        Operation::AccessKeyDelete {
            access_key_id: info.access_key_id,
        },
    )
    .unwrap();
}
