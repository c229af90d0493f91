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
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().join("kms"));
        data.init(None, &[]).unwrap();
        let broker = Arc::new(data.open(None, BrokerConfig::default()).unwrap());
        let shared = broker.clone();
        let addr = Address::Unix(dir.path().join("kms.sock"));
        let listener = cloister_proto::listen(&addr).await.unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            serve(
                broker,
                vec![listener],
                ServerLimits::default(),
                None,
                async {
                    let _ = rx.await;
                },
            )
            .await
            .unwrap();
        });
        let platform = PlatformDir::new(dir.path().join("platform"));
        platform.init("t", DEFAULT_NSM_VALIDITY).unwrap();
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
