//! The broker in one process: a real Unix socket, a real keystore and audit log.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use cloister_attestation::keyfile;
use cloister_attestation::nsm::{
    AttestationRequest, DEFAULT_NSM_VALIDITY, Nsm, PlatformDir, read_pem_certificates,
};
use cloister_attestation::pcr;
use cloister_kms::datadir::{ADMIN, DataDir};
use cloister_kms::protocol::*;
use cloister_kms::recipient::{self, RecipientKey};
use cloister_kms::server::{ServerLimits, serve};
use cloister_kms::service::BrokerConfig;
use cloister_kms::{ErrorKind, KmsError};
use cloister_kms_api::client::{ClientError, Credentials, KmsClient};
use cloister_proto::Address;
use ed25519_dalek::SigningKey;

struct Env {
    dir: tempfile::TempDir,
    addr: Address,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    platform: PlatformDir,
    broker: Arc<cloister_kms::service::Broker>,
}

impl Env {
    /// The next answer on a raw connection: a SignedResponse whose signature
    /// verifies with the broker's public key (and fails once altered).
    async fn answer(&self, stream: &mut cloister_proto::Stream) -> Response {
        let signed: SignedResponse = cloister_proto::frame::recv(stream, MAX_MESSAGE)
            .await
            .unwrap()
            .unwrap();
        let key = cloister_attestation::keyfile::read_verifying_key(
            &self.dir.path().join("kms/broker.pub"),
        )
        .unwrap();
        let mut altered = signed.clone();
        let last = altered.payload.len() - 1;
        altered.payload[last] ^= 1;
        assert_eq!(altered.verify(&key), Err(ResponseError::BadSignature));
        let other = SigningKey::generate(&mut rand_core::OsRng).verifying_key();
        assert_eq!(signed.verify(&other), Err(ResponseError::BadSignature));
        signed.verify(&key).unwrap()
    }

    async fn start() -> Env {
        Env::start_with(None, ServerLimits::default()).await
    }

    /// A broker on `dir` (a new data directory when `None`) with these limits.
    async fn start_with(dir: Option<tempfile::TempDir>, limits: ServerLimits) -> Env {
        let dir = match dir {
            Some(dir) => dir,
            None => {
                let dir = tempfile::tempdir().unwrap();
                DataDir::new(dir.path().join("kms"))
                    .init(None, &[], None)
                    .unwrap();
                dir
            }
        };
        let data = DataDir::new(dir.path().join("kms"));
        let broker = Arc::new(data.open(None, BrokerConfig::default()).unwrap());
        let shared = broker.clone();
        let addr = Address::Unix(dir.path().join("kms.sock"));
        let listener = cloister_proto::listen(&addr).await.unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            serve(broker, vec![listener], Vec::new(), limits, None, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        let platform = PlatformDir::new(dir.path().join("platform"));
        if !platform.root_cert().exists() {
            platform.init("t", DEFAULT_NSM_VALIDITY).unwrap();
        }
        Env {
            dir,
            addr,
            stop: Some(stop),
            server: Some(server),
            platform,
            broker: shared,
        }
    }

    async fn admin(&self) -> KmsClient {
        let key = keyfile::read_signing_key(&self.dir.path().join("kms/admin.key")).unwrap();
        KmsClient::connect(
            &self.addr,
            None,
            Credentials {
                principal: ADMIN.into(),
                key,
            },
        )
        .await
        .unwrap()
    }

    async fn principal(&self, name: &str, policy: &str) -> KmsClient {
        let key = SigningKey::generate(&mut rand_core::OsRng);
        let mut admin = self.admin().await;
        admin
            .call(Operation::PrincipalAdd {
                name: name.into(),
                public_key: key.verifying_key().to_bytes().to_vec(),
                policy: policy.into(),
            })
            .await
            .unwrap();
        KmsClient::connect(
            &self.addr,
            None,
            Credentials {
                principal: name.into(),
                key,
            },
        )
        .await
        .unwrap()
    }

    async fn trust_platform(&self) {
        let der = read_pem_certificates(&self.platform.root_cert())
            .unwrap()
            .remove(0);
        self.admin()
            .await
            .call(Operation::TrustAdd {
                label: "test".into(),
                root_der: der,
            })
            .await
            .unwrap();
    }

    fn document(&self, pcr0: pcr::Pcr, public_key: [u8; 32]) -> Vec<u8> {
        let nsm = Nsm::load(&self.platform).unwrap();
        let mut pcrs: BTreeMap<usize, pcr::Pcr> = (0..16).map(|i| (i, [0u8; 48])).collect();
        pcrs.insert(0, pcr0);
        pcrs.insert(1, pcr::measure(b"runtime"));
        nsm.attest(
            &AttestationRequest {
                module_id: "i-test-enc1".into(),
                pcrs,
                public_key: Some(public_key.to_vec()),
                ..Default::default()
            },
            SystemTime::now(),
        )
        .unwrap()
    }

    async fn stop(mut self) -> tempfile::TempDir {
        self.stop.take().unwrap().send(()).unwrap();
        self.server.take().unwrap().await.unwrap();
        self.dir
    }
}

const ALLOW_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}"#;

fn kms_err(r: Result<Output, ClientError>) -> KmsError {
    match r {
        Err(ClientError::Kms(e)) => e,
        other => panic!("expected a broker error, got {other:?}"),
    }
}

async fn create_key(c: &mut KmsClient, policy: Option<String>) -> String {
    match c
        .call(Operation::CreateKey {
            description: "k".into(),
            policy,
        })
        .await
        .unwrap()
    {
        Output::KeyMetadata(m) => m.key_id,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_decrypt_with_context_rotation_and_states() {
    let env = Env::start().await;
    let mut app = env.principal("app", ALLOW_ALL).await;
    let key = create_key(&mut app, None).await;
    let ctx: EncryptionContext = [("dept".to_string(), "cardio".to_string())].into();
    let Output::Ciphertext {
        ciphertext_blob, ..
    } = app
        .call(Operation::Encrypt {
            key_id: key.clone(),
            plaintext: Secret::new(b"hello".to_vec()),
            encryption_context: ctx.clone(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let decrypt = |blob: Vec<u8>, ctx: EncryptionContext| Operation::Decrypt {
        ciphertext_blob: blob,
        key_id: None,
        encryption_context: ctx,
        recipient: None,
    };
    let Output::Plaintext {
        plaintext: Some(p), ..
    } = app
        .call(decrypt(ciphertext_blob.clone(), ctx.clone()))
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(p.as_bytes(), b"hello");

    let e = kms_err(
        app.call(decrypt(ciphertext_blob.clone(), EncryptionContext::new()))
            .await,
    );
    assert_eq!(e.kind, ErrorKind::InvalidCiphertextException);
    let mut tampered = ciphertext_blob.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert_eq!(
        kms_err(app.call(decrypt(tampered, ctx.clone())).await).kind,
        ErrorKind::InvalidCiphertextException
    );

    // Rotation: old blobs still decrypt, new ones use version 2.
    let Output::Rotated { version, .. } = app
        .call(Operation::RotateKey {
            key_id: key.clone(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(version, 2);
    assert!(matches!(
        app.call(decrypt(ciphertext_blob.clone(), ctx.clone()))
            .await
            .unwrap(),
        Output::Plaintext { .. }
    ));

    // Disabled keys refuse; enabled again they work.
    app.call(Operation::DisableKey {
        key_id: key.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        kms_err(
            app.call(decrypt(ciphertext_blob.clone(), ctx.clone()))
                .await
        )
        .kind,
        ErrorKind::DisabledException
    );
    app.call(Operation::EnableKey {
        key_id: key.clone(),
    })
    .await
    .unwrap();

    // Scheduled deletion: 7..30 days; pending keys refuse; cancel leaves it Disabled.
    assert_eq!(
        kms_err(
            app.call(Operation::ScheduleKeyDeletion {
                key_id: key.clone(),
                pending_window_in_days: 6
            })
            .await
        )
        .kind,
        ErrorKind::ValidationException
    );
    app.call(Operation::ScheduleKeyDeletion {
        key_id: key.clone(),
        pending_window_in_days: 7,
    })
    .await
    .unwrap();
    assert_eq!(
        kms_err(
            app.call(decrypt(ciphertext_blob.clone(), ctx.clone()))
                .await
        )
        .kind,
        ErrorKind::KMSInvalidStateException
    );
    app.call(Operation::CancelKeyDeletion {
        key_id: key.clone(),
    })
    .await
    .unwrap();
    let Output::KeyMetadata(m) = app
        .call(Operation::DescribeKey {
            key_id: key.clone(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(m.key_state, "Disabled");

    // Aliases resolve.
    app.call(Operation::EnableKey {
        key_id: key.clone(),
    })
    .await
    .unwrap();
    app.call(Operation::CreateAlias {
        alias_name: "alias/phi".into(),
        target_key_id: key.clone(),
    })
    .await
    .unwrap();
    assert!(matches!(
        app.call(Operation::Encrypt {
            key_id: "alias/phi".into(),
            plaintext: Secret::new(b"x".to_vec()),
            encryption_context: ctx.clone()
        })
        .await
        .unwrap(),
        Output::Ciphertext { .. }
    ));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attested_decrypt_is_pinned_to_pcr0_and_wrapped_to_the_enclave() {
    let env = Env::start().await;
    env.trust_platform().await;
    let image = pcr::measure(b"scorer image");
    let policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[
            {{"Sid":"Owner","Effect":"Allow","Principal":{{"AWS":"owner"}},"Action":["kms:Encrypt","kms:CreateKey","kms:DescribeKey"],"Resource":"*"}},
            {{"Sid":"Enclave","Effect":"Allow","Principal":{{"AWS":"parent"}},"Action":["kms:Decrypt","kms:GenerateDataKey"],"Resource":"*",
              "Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"{}"}}}}}}]}}"#,
        hex::encode(image)
    );
    let mut owner = env.principal("owner", ALLOW_ALL).await;
    let mut parent = env.principal("parent", ALLOW_ALL).await;
    let key = create_key(&mut owner, Some(policy)).await;
    let Output::Ciphertext {
        ciphertext_blob, ..
    } = owner
        .call(Operation::Encrypt {
            key_id: key.clone(),
            plaintext: Secret::new(b"data key".to_vec()),
            encryption_context: EncryptionContext::new(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    let decrypt = |doc: Option<Vec<u8>>| Operation::Decrypt {
        ciphertext_blob: ciphertext_blob.clone(),
        key_id: None,
        encryption_context: EncryptionContext::new(),
        recipient: doc.map(|d| Recipient {
            key_encryption_algorithm: recipient::ALGORITHM.into(),
            attestation_document: d,
        }),
    };

    // Without a recipient: denied, with the reason.
    let e = kms_err(parent.call(decrypt(None)).await);
    assert_eq!(e.kind, ErrorKind::AccessDeniedException);
    assert!(
        e.message
            .contains("no kms:RecipientAttestation:ImageSha384 (no attestation document)"),
        "{e}"
    );

    // The right image: the result comes only as CiphertextForRecipient.
    let r = RecipientKey::generate();
    let doc = env.document(image, r.public_key());
    let out = parent.call(decrypt(Some(doc.clone()))).await.unwrap();
    let Output::Plaintext {
        plaintext: None,
        ciphertext_for_recipient: Some(cfr),
        key_id: Some(arn),
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!(cfr.aad, recipient::aad(&doc));
    assert!(cfr.info.windows(arn.len()).any(|w| w == arn.as_bytes()));
    assert_eq!(
        r.open(&cfr.ciphertext, &cfr.info, &cfr.aad)
            .unwrap()
            .as_slice(),
        b"data key"
    );

    // Another image: denied, naming the value seen.
    let other = env.document(pcr::measure(b"modified image"), r.public_key());
    let e = kms_err(parent.call(decrypt(Some(other))).await);
    assert!(
        e.message.contains(
            "failed condition StringEqualsIgnoreCase kms:RecipientAttestation:ImageSha384"
        ),
        "{e}"
    );
    assert!(
        e.message
            .contains(&hex::encode(pcr::measure(b"modified image"))),
        "{e}"
    );

    // A debug enclave (all zeros): denied.
    let e = kms_err(
        parent
            .call(decrypt(Some(env.document([0; 48], r.public_key()))))
            .await,
    );
    assert_eq!(e.kind, ErrorKind::AccessDeniedException);

    // A document from an untrusted platform: denied with the attestation code.
    let stranger = PlatformDir::new(env.dir.path().join("stranger"));
    stranger.init("s", DEFAULT_NSM_VALIDITY).unwrap();
    let foreign = Nsm::load(&stranger)
        .unwrap()
        .attest(
            &AttestationRequest {
                module_id: "m".into(),
                pcrs: [(0, image)].into(),
                public_key: Some(r.public_key().to_vec()),
                ..Default::default()
            },
            SystemTime::now(),
        )
        .unwrap();
    let e = kms_err(parent.call(decrypt(Some(foreign))).await);
    assert!(e.message.contains("E-ATTEST-UNTRUSTED-ROOT"), "{e}");

    // GenerateDataKey with a recipient: no plaintext, a blob the owner... cannot decrypt (policy), the enclave can open.
    let out = parent
        .call(Operation::GenerateDataKey {
            key_id: key.clone(),
            key_spec: "AES_256".into(),
            number_of_bytes: None,
            encryption_context: EncryptionContext::new(),
            recipient: Some(Recipient {
                key_encryption_algorithm: recipient::ALGORITHM.into(),
                attestation_document: doc.clone(),
            }),
        })
        .await
        .unwrap();
    let Output::DataKey {
        plaintext: None,
        ciphertext_for_recipient: Some(cfr),
        ..
    } = out
    else {
        panic!()
    };
    assert_eq!(
        r.open(&cfr.ciphertext, &cfr.info, &cfr.aad).unwrap().len(),
        32
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_key_policy_are_both_required() {
    let env = Env::start().await;
    let mut owner = env.principal("owner", ALLOW_ALL).await;
    let mut reader = env
        .principal("reader", r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Encrypt","Resource":"*"}}"#)
        .await;
    let key = create_key(&mut owner, None).await;
    // The key policy names only the owner: reader is refused by the key policy...
    let e = kms_err(
        reader
            .call(Operation::Encrypt {
                key_id: key.clone(),
                plaintext: Secret::new(b"x".to_vec()),
                encryption_context: EncryptionContext::new(),
            })
            .await,
    );
    assert!(e.message.contains("key policy"), "{e}");
    // ...and by its identity policy for other actions.
    let e = kms_err(
        reader
            .call(Operation::DescribeKey {
                key_id: key.clone(),
            })
            .await,
    );
    assert!(e.message.contains("identity policy of \"reader\""), "{e}");
    // Admin operations need the admin's identity policy.
    let e = kms_err(owner.call(Operation::PrincipalList).await);
    assert!(e.message.contains("cloister:PrincipalList"), "{e}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_stale_requests_are_refused() {
    let env = Env::start().await;
    let _ = env.principal("app", ALLOW_ALL).await;
    let mut stream = cloister_proto::connect(&env.addr).await.unwrap();
    let payload = RequestPayload {
        principal: "app".into(),
        timestamp_ms: cloister_kms::service::now_ms(),
        request_id: "0123456789abcdef0123".into(),
        operation: Operation::ListKeys,
    };

    // Signed by a key that is not app's.
    let wrong =
        SignedRequest::sign(&payload, &SigningKey::generate(&mut rand_core::OsRng)).unwrap();
    cloister_proto::frame::send(&mut stream, &wrong, MAX_MESSAGE)
        .await
        .unwrap();
    let r = env.answer(&mut stream).await;
    assert_eq!(
        r.result.unwrap_err().kind,
        ErrorKind::InvalidSignatureException
    );

    // A correctly signed request works once; the same bytes again are a replay.
    let app_key = SigningKey::generate(&mut rand_core::OsRng);
    env.admin()
        .await
        .call(Operation::PrincipalAdd {
            name: "app2".into(),
            public_key: app_key.verifying_key().to_bytes().to_vec(),
            policy: ALLOW_ALL.into(),
        })
        .await
        .unwrap();
    let mut p2 = payload.clone();
    p2.principal = "app2".into();
    p2.timestamp_ms = cloister_kms::service::now_ms();
    let good = SignedRequest::sign(&p2, &app_key).unwrap();
    for expect_ok in [true, false] {
        cloister_proto::frame::send(&mut stream, &good, MAX_MESSAGE)
            .await
            .unwrap();
        let r = env.answer(&mut stream).await;
        assert_eq!(r.request_digest, request_digest(&good.payload));
        if expect_ok {
            r.result.unwrap();
        } else {
            let e = r.result.unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidSignatureException);
            assert!(e.message.contains("replayed"), "{e}");
        }
    }
    // Signed ten minutes ago: expired.
    let mut old = p2.clone();
    old.request_id = "fedcba9876543210fedc".into();
    old.timestamp_ms -= 600_000;
    cloister_proto::frame::send(
        &mut stream,
        &SignedRequest::sign(&old, &app_key).unwrap(),
        MAX_MESSAGE,
    )
    .await
    .unwrap();
    let r = env.answer(&mut stream).await;
    assert_eq!(
        r.result.unwrap_err().kind,
        ErrorKind::RequestExpiredException
    );

    // Garbage in a frame: a typed error, and the server keeps serving.
    cloister_proto::frame::write_frame(&mut stream, b"\xff\x00garbage", MAX_MESSAGE)
        .await
        .unwrap();
    let r = env.answer(&mut stream).await;
    let e = r.result.unwrap_err();
    assert_eq!(e.kind, ErrorKind::ValidationException);
    assert!(e.message.contains("malformed request"), "{e}");
    let mut admin = env.admin().await;
    admin.call(Operation::ListKeys).await.unwrap();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_material_is_destroyed_when_the_waiting_period_ends() {
    let env = Env::start().await;
    let mut app = env.principal("app", ALLOW_ALL).await;
    let key = create_key(&mut app, None).await;
    let Output::Ciphertext {
        ciphertext_blob, ..
    } = app
        .call(Operation::Encrypt {
            key_id: key.clone(),
            plaintext: Secret::new(b"gone".to_vec()),
            encryption_context: EncryptionContext::new(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    app.call(Operation::CreateAlias {
        alias_name: "alias/doomed".into(),
        target_key_id: key.clone(),
    })
    .await
    .unwrap();
    app.call(Operation::ScheduleKeyDeletion {
        key_id: key.clone(),
        pending_window_in_days: 7,
    })
    .await
    .unwrap();
    let now = cloister_kms::service::now_ms();
    assert_eq!(
        env.broker.purge_due_keys(now + 6 * 86_400_000).unwrap(),
        0,
        "not before the date"
    );
    assert_eq!(env.broker.purge_due_keys(now + 8 * 86_400_000).unwrap(), 1);
    let e = kms_err(
        app.call(Operation::DescribeKey {
            key_id: key.clone(),
        })
        .await,
    );
    assert_eq!(e.kind, ErrorKind::NotFoundException);
    let e = kms_err(
        app.call(Operation::DescribeKey {
            key_id: "alias/doomed".into(),
        })
        .await,
    );
    assert_eq!(e.kind, ErrorKind::NotFoundException);
    let e = kms_err(
        app.call(Operation::Decrypt {
            ciphertext_blob,
            key_id: None,
            encryption_context: EncryptionContext::new(),
            recipient: None,
        })
        .await,
    );
    assert_eq!(e.kind, ErrorKind::NotFoundException);
    // The keystore no longer holds the material, and the destruction is audited.
    let dir = env.stop().await;
    let conn = rusqlite::Connection::open(dir.path().join("kms/keystore.db")).unwrap();
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM key_versions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    let log = std::fs::read_to_string(dir.path().join("kms/audit.log")).unwrap();
    assert!(log.contains("\"action\":\"kms:DeleteKey\""));
}

/// A principal added by the admin with this key (for hand-made requests).
async fn principal_with_key(env: &Env, name: &str) -> SigningKey {
    let key = SigningKey::generate(&mut rand_core::OsRng);
    env.admin()
        .await
        .call(Operation::PrincipalAdd {
            name: name.into(),
            public_key: key.verifying_key().to_bytes().to_vec(),
            policy: ALLOW_ALL.into(),
        })
        .await
        .unwrap();
    key
}

fn request(principal: &str, timestamp_ms: u64, operation: Operation) -> RequestPayload {
    RequestPayload {
        principal: principal.into(),
        timestamp_ms,
        request_id: hex::encode(rand_core::RngCore::next_u64(&mut rand_core::OsRng).to_be_bytes())
            + "-request",
        operation,
    }
}

async fn exchange(
    env: &Env,
    stream: &mut cloister_proto::Stream,
    signed: &SignedRequest,
) -> Result<Output, KmsError> {
    cloister_proto::frame::send(stream, signed, MAX_REQUEST)
        .await
        .unwrap();
    env.answer(stream).await.result
}

fn audit_lines(env: &Env) -> Vec<String> {
    std::fs::read_to_string(env.dir.path().join("kms/audit.log"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_and_oversized_input_gets_typed_errors_and_bounded_audit_lines() {
    let env = Env::start().await;
    env.trust_platform().await;
    let key = principal_with_key(&env, "app").await;
    let mut stream = cloister_proto::connect(&env.addr).await.unwrap();
    let now = cloister_kms::service::now_ms();
    // Timestamps past year 9999, at u64::MAX and at 0: expired, not a panic.
    for ts in [u64::MAX, 253_402_300_800_000 + 86_400_000, 0] {
        let signed = SignedRequest::sign(&request("app", ts, Operation::ListKeys), &key).unwrap();
        let e = exchange(&env, &mut stream, &signed).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::RequestExpiredException, "{e}");
        assert!(e.message.contains("more than 120 s"), "{e}");
    }
    // A 60 KB principal name is refused before it is looked up or verified,
    // and its audit line is cut.
    let huge = "x".repeat(60_000);
    let signed = SignedRequest::sign(&request(&huge, now, Operation::ListKeys), &key).unwrap();
    let e = exchange(&env, &mut stream, &signed).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidSignatureException);
    assert!(
        e.message.contains("1 to 256 bytes (this one is 60000)"),
        "{e}"
    );
    // A condition key with a multibyte character across byte 18 and a policy
    // over 32 KB: validation errors.
    let odd_key = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"StringEquals":{"kms:EncryptionContexté":"x"}}}}"#;
    let padded = format!(
        r#"{{"Version":"2012-10-17","Id":"{}","Statement":{{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"}}}}"#,
        "p".repeat(33_000)
    );
    for (policy, says) in [
        (odd_key.to_owned(), "kms:EncryptionContexté"),
        (padded, "at most 32768"),
    ] {
        let op = Operation::CreateKey {
            description: String::new(),
            policy: Some(policy),
        };
        let signed = SignedRequest::sign(&request("app", now, op), &key).unwrap();
        let e = exchange(&env, &mut stream, &signed).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::ValidationException, "{e}");
        assert!(e.message.contains(says), "{e}");
    }
    // A validly signed attestation document dated past year 9999.
    let mut raw = cloister_attestation::document::UnverifiedDocument::parse(
        &env.document(pcr::measure(b"image"), [7; 32]),
    )
    .unwrap()
    .document;
    raw.timestamp = 400_000_000_000_000;
    let nsm_key = keyfile::read_signing_key(&env.platform.nsm_key()).unwrap();
    let doc = cloister_attestation::document::sign(
        &raw,
        cloister_attestation::document::SigningAlgorithm::EdDSA,
        |data| {
            ed25519_dalek::Signer::sign(&nsm_key, data)
                .to_bytes()
                .to_vec()
        },
    )
    .unwrap();
    let op = Operation::GenerateRandom {
        number_of_bytes: 8,
        recipient: Some(Recipient {
            key_encryption_algorithm: recipient::ALGORITHM.into(),
            attestation_document: doc,
        }),
    };
    let signed = SignedRequest::sign(&request("app", now, op), &key).unwrap();
    let e = exchange(&env, &mut stream, &signed).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::AccessDeniedException, "{e}");
    assert!(e.message.contains("ms after the Unix epoch"), "{e}");
    // A frame over the request limit (64 KB): refused, and the connection
    // closed (it is out of step with frames).
    let big = SignedRequest::sign(
        &request(&"y".repeat(70_000), now, Operation::ListKeys),
        &key,
    )
    .unwrap();
    cloister_proto::frame::send(&mut stream, &big, MAX_MESSAGE)
        .await
        .unwrap_or(());
    let e = env.answer(&mut stream).await.result.unwrap_err();
    assert!(e.message.contains("request refused"), "{e}");
    assert!(
        cloister_proto::frame::read_frame(&mut stream, MAX_MESSAGE)
            .await
            .map_or(true, |f| f.is_none())
    );
    // The broker still serves, and no audit line carries the long names.
    env.admin().await.call(Operation::ListKeys).await.unwrap();
    let lines = audit_lines(&env);
    assert!(lines.iter().any(|l| l.contains("(60000 bytes)")));
    assert!(
        lines.iter().all(|l| l.len() < 2048),
        "an audit line is long"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_flood_costs_the_audit_log_a_bounded_number_of_bytes() {
    let limits = ServerLimits {
        // The per-peer allowance is tested on its own: here everything comes
        // from this process's uid.
        unauthenticated_per_peer_per_sec: 1e9,
        ..Default::default()
    };
    let env = Env::start_with(None, limits).await;
    let before = audit_lines(&env).len();
    let forger = SigningKey::generate(&mut rand_core::OsRng);
    let started = std::time::Instant::now();
    const SENT: u64 = 4 * 400;
    let mut floods = Vec::new();
    for _ in 0..4 {
        let addr = env.addr.clone();
        let forger = forger.clone();
        floods.push(tokio::spawn(async move {
            let mut stream = cloister_proto::connect(&addr).await.unwrap();
            for _ in 0..400 {
                let name = "z".repeat(200);
                let signed = SignedRequest::sign(
                    &request(&name, cloister_kms::service::now_ms(), Operation::ListKeys),
                    &forger,
                )
                .unwrap();
                cloister_proto::frame::send(&mut stream, &signed, MAX_REQUEST)
                    .await
                    .unwrap();
                let _: SignedResponse = cloister_proto::frame::recv(&mut stream, MAX_MESSAGE)
                    .await
                    .unwrap()
                    .unwrap();
            }
        }));
    }
    for f in floods {
        f.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Authenticated clients are served meanwhile and after.
    env.admin().await.call(Operation::ListKeys).await.unwrap();
    env.broker.record_uncounted().unwrap();
    let lines = audit_lines(&env);
    let flood: Vec<&String> = lines[before..]
        .iter()
        .filter(|l| l.contains("unknown principal"))
        .collect();
    // 20 per second (and a burst of 20) are recorded one by one...
    let allowed = (20.0 * elapsed + 21.0) as usize;
    assert!(
        flood.len() <= allowed,
        "{} flood lines in {elapsed:.1} s",
        flood.len()
    );
    assert!(flood.iter().all(|l| l.len() < 2048));
    // ...and the rest are counted: every request sent is accounted for.
    let counted: u64 = lines[before..]
        .iter()
        .filter_map(|l| {
            let (_, after) = l.split_once("before it, ").or_else(|| {
                l.contains("cloister:UnauthenticatedFailures")
                    .then(|| l.split_once("\"reason\":\""))?
            })?;
            after.split(' ').next()?.parse::<u64>().ok()
        })
        .sum();
    assert_eq!(flood.len() as u64 + counted, SENT);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_make_way_and_slow_or_failing_peers_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let limits = ServerLimits {
        max_connections: 8,
        max_connections_per_peer: 3,
        unauthenticated_per_peer_per_sec: 5.0,
        frame_timeout: std::time::Duration::from_millis(1000),
        ..Default::default()
    };
    let env = Env::start_with(None, limits).await;
    let closed = |mut s: cloister_proto::Stream| async move {
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            cloister_proto::frame::read_frame(&mut s, MAX_MESSAGE),
        )
        .await
        .expect("the broker did not close the connection")
        .map_or(true, |f| f.is_none())
    };
    let settle = || tokio::time::sleep(std::time::Duration::from_millis(100));
    // Three idle connections fill this peer's share; a fourth (the admin's)
    // displaces the oldest, which the broker closes.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(cloister_proto::connect(&env.addr).await.unwrap());
        settle().await;
    }
    env.admin().await.call(Operation::ListKeys).await.unwrap();
    assert!(closed(idle.remove(0)).await);
    drop(idle);
    settle().await;
    // Connections trickling a request hold no slot: a newcomer displaces the
    // oldest of them...
    let mut trickling = Vec::new();
    for _ in 0..3 {
        let mut s = cloister_proto::connect(&env.addr).await.unwrap();
        s.write_all(&[1, 0, 0]).await.unwrap();
        trickling.push(s);
        settle().await;
    }
    env.admin().await.call(Operation::ListKeys).await.unwrap();
    assert!(closed(trickling.remove(0)).await);
    // ...and each trickling request is cut off after the frame timeout.
    for s in trickling {
        assert!(closed(s).await);
    }
    // A peer that keeps sending what no principal signed is cut off once
    // its allowance (5 per second, 10 at once) is spent, and refused for a while.
    // Forged requests on one connection, up to `most`: how many were answered
    // before the broker closed it.
    let forge = |most: usize| {
        let addr = env.addr.clone();
        async move {
            let forger = SigningKey::generate(&mut rand_core::OsRng);
            let mut s = cloister_proto::connect(&addr).await.unwrap();
            let mut answered = 0;
            while answered < most {
                let signed = SignedRequest::sign(
                    &request("app", cloister_kms::service::now_ms(), Operation::ListKeys),
                    &forger,
                )
                .unwrap();
                if cloister_proto::frame::send(&mut s, &signed, MAX_REQUEST)
                    .await
                    .is_err()
                {
                    break;
                }
                match cloister_proto::frame::recv::<_, SignedResponse>(&mut s, MAX_MESSAGE).await {
                    Ok(Some(_)) => answered += 1,
                    _ => break,
                }
            }
            answered
        }
    };
    // (The three trickling requests above were charged to this peer: wait
    // until its allowance is full again.)
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let answered = forge(20).await;
    assert!((9..=10).contains(&answered), "cut off after {answered}");
    let mut next = cloister_proto::connect(&env.addr).await.unwrap();
    let e = env.answer(&mut next).await.result.unwrap_err();
    assert!(e.message.contains("too many unauthenticated"), "{e}");
    // Once the allowance has refilled, the peer is served again...
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    env.admin().await.call(Operation::ListKeys).await.unwrap();
    // ...and closing a connection before the cut does not refill it: six
    // failures, then a new connection is cut off after about four more.
    assert_eq!(forge(6).await, 6);
    let more = forge(20).await;
    assert!(
        more <= 6,
        "reconnecting refilled the allowance: {more} more"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_accepted_before_a_restart_is_a_replay_after_it() {
    let env = Env::start().await;
    let key = principal_with_key(&env, "app").await;
    let now = cloister_kms::service::now_ms();
    // One dated now, one 100 s ahead (within the 120 s skew).
    let signed: Vec<SignedRequest> = [now, now + 100_000]
        .into_iter()
        .map(|ts| SignedRequest::sign(&request("app", ts, Operation::ListKeys), &key).unwrap())
        .collect();
    let mut stream = cloister_proto::connect(&env.addr).await.unwrap();
    for s in &signed {
        exchange(&env, &mut stream, s).await.unwrap();
    }
    drop(stream);
    let dir = env.stop().await;
    let env = Env::start_with(Some(dir), ServerLimits::default()).await;
    let mut stream = cloister_proto::connect(&env.addr).await.unwrap();
    for s in &signed {
        let e = exchange(&env, &mut stream, s).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidSignatureException);
        assert!(e.message.contains("replayed"), "{e}");
    }
    // A fresh request from the same principal is served.
    let fresh = SignedRequest::sign(
        &request("app", cloister_kms::service::now_ms(), Operation::ListKeys),
        &key,
    )
    .unwrap();
    exchange(&env, &mut stream, &fresh).await.unwrap();
    env.stop().await;
}

async fn key_state(c: &mut KmsClient, key: &str) -> Option<String> {
    match c.call(Operation::DescribeKey { key_id: key.into() }).await {
        Ok(Output::KeyMetadata(m)) => Some(m.key_state),
        Err(ClientError::Kms(e)) if e.kind == ErrorKind::NotFoundException => None,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_state_changes_never_lose_an_acknowledged_one() {
    let env = Env::start().await;
    let mut app = env.principal("app", ALLOW_ALL).await;
    let mut other = env.principal("other", ALLOW_ALL).await;
    let schedule = |key: &str, days| Operation::ScheduleKeyDeletion {
        key_id: key.into(),
        pending_window_in_days: days,
    };
    let mut seen = Vec::new();
    let both = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Principal":{"AWS":["app","other","admin"]},"Action":"kms:*","Resource":"*"}}"#;
    for round in 0..40 {
        let key = create_key(&mut app, Some(both.into())).await;
        if round % 2 == 0 {
            // A cancelled deletion against the purge (dated past the window):
            // an acknowledged cancel leaves the key (Disabled); a destruction
            // means the cancel was refused.
            app.call(schedule(&key, 7)).await.unwrap();
            let broker = env.broker.clone();
            let later = cloister_kms::service::now_ms() + 8 * 86_400_000;
            let purge = tokio::task::spawn_blocking(move || broker.purge_due_keys(later).unwrap());
            let cancel = app
                .call(Operation::CancelKeyDeletion {
                    key_id: key.clone(),
                })
                .await;
            let destroyed = purge.await.unwrap();
            let state = key_state(&mut app, &key).await;
            match cancel {
                Ok(_) => {
                    assert_eq!(destroyed, 0);
                    assert_eq!(state.as_deref(), Some("Disabled"));
                }
                Err(_) => {
                    assert_eq!(destroyed, 1);
                    assert_eq!(state, None);
                }
            }
            seen.push((key, state));
        } else {
            // EnableKey against ScheduleKeyDeletion on a Disabled key: an
            // acknowledged schedule is never undone by the enable.
            app.call(Operation::DisableKey {
                key_id: key.clone(),
            })
            .await
            .unwrap();
            let (enable, scheduled) = tokio::join!(
                other.call(Operation::EnableKey {
                    key_id: key.clone(),
                }),
                // (30 days: the purges of the other rounds leave it alone)
                app.call(schedule(&key, 30)),
            );
            let state = key_state(&mut app, &key).await;
            scheduled.unwrap();
            assert_eq!(state.as_deref(), Some("PendingDeletion"), "{enable:?}");
            if let Err(e) = enable {
                let ClientError::Kms(e) = e else {
                    panic!("{e:?}")
                };
                assert_eq!(e.kind, ErrorKind::KMSInvalidStateException);
                assert!(e.message.contains("cancel the deletion first"), "{e}");
            }
            seen.push((key, state));
        }
    }
    // What the broker answered is what the database holds.
    drop((app, other));
    let dir = env.stop().await;
    let env = Env::start_with(Some(dir), ServerLimits::default()).await;
    let mut admin = env.admin().await;
    for (key, state) in seen {
        assert_eq!(key_state(&mut admin, &key).await, state, "{key}");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_changes_of_one_key_interleave_without_deadlock() {
    let env = Env::start().await;
    let mut owner = env.principal("app", ALLOW_ALL).await;
    let everyone = r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"}}"#;
    let key = create_key(&mut owner, Some(everyone.into())).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..4 {
        let mut client = env.principal(&format!("reader{i}"), ALLOW_ALL).await;
        let key = key.clone();
        let describe = i % 2 == 0;
        tasks.spawn(async move {
            for _ in 0..300 {
                if describe {
                    client
                        .call(Operation::DescribeKey {
                            key_id: key.clone(),
                        })
                        .await
                        .unwrap();
                } else {
                    client.call(Operation::ListKeys).await.unwrap();
                }
            }
        });
    }
    let writer_key = key.clone();
    tasks.spawn(async move {
        for _ in 0..300 {
            owner
                .call(Operation::RotateKey {
                    key_id: writer_key.clone(),
                })
                .await
                .unwrap();
        }
    });
    // A deadlock blocks the runtime's workers (the broker runs on them), so
    // a thread of its own watches.
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watched = finished.clone();
    std::thread::spawn(move || {
        for _ in 0..1200 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if watched.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
        }
        eprintln!("the broker hung: reads and changes of one key deadlocked");
        std::process::exit(101);
    });
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    finished.store(true, std::sync::atomic::Ordering::SeqCst);
    env.stop().await;
}
