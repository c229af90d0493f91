//! Broker replicas on one PostgreSQL keystore, end to end: a real PostgreSQL
//! server (its own cluster, started here), three `cloister kms serve`
//! processes sharing it, clients spread over them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloister_kms::protocol::{
    EncryptionContext, Operation, Output, Recipient, Secret, SignedRequest, SignedResponse,
};
use cloister_kms_api::client::{ClientError, Credentials, KmsClient};
use ed25519_dalek::SigningKey;
use serde_json::Value;

mod common;
use common::postgres::Postgres;
use common::{Server, cloister_env, free_port, json_of, ok_json, s};

const ALLOW_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}"#;

/// A PostgreSQL server, a keystore in it, and broker replicas `r0`, `r1`...
/// each with its own copy of the data directory (as a replica that joins is
/// given one) and its own socket.
struct Cluster {
    pg: Postgres,
    dir: tempfile::TempDir,
    replicas: Vec<Option<Server>>,
}

impl Cluster {
    fn start(n: usize) -> Option<Cluster> {
        let pg = Postgres::start()?;
        let url = pg.create_database("kms");
        let dir = tempfile::tempdir().unwrap();
        let init = ok_json(&[
            "kms",
            "init",
            "--data-dir",
            s(&dir.path().join("r0")),
            "--store",
            &url,
        ]);
        assert_eq!(init["Keystore"], url.as_str(), "{init}");
        assert_eq!(init["AuditLog"], "in the keystore's database");
        // A joining replica gets a copy of the data directory: the root key,
        // the broker key, the TLS files and the store's URL.
        for i in 1..n {
            let copied = std::process::Command::new("cp")
                .arg("-a")
                .arg(dir.path().join("r0"))
                .arg(dir.path().join(format!("r{i}")))
                .status()
                .unwrap();
            assert!(copied.success());
        }
        let mut c = Cluster {
            pg,
            dir,
            replicas: (0..n).map(|_| None).collect(),
        };
        for i in 0..n {
            c.serve(i);
        }
        Some(c)
    }

    fn data(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("r{i}"))
    }

    fn sock(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("r{i}.sock"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn serve(&mut self, i: usize) {
        self.serve_with(i, &[]);
    }

    fn serve_with(&mut self, i: usize, more: &[&str]) {
        let _ = std::fs::remove_file(self.sock(i));
        let mut args = vec![
            "kms".to_owned(),
            "serve".into(),
            "--data-dir".into(),
            s(&self.data(i)).into(),
            "--listen".into(),
            format!("unix:{}", s(&self.sock(i))),
            "--replica".into(),
            format!("r{i}"),
        ];
        args.extend(more.iter().map(|a| a.to_string()));
        self.replicas[i] = Some(Server::start(&args, &[], &self.sock(i)));
    }

    fn admin(&self) -> Credentials {
        Credentials {
            principal: "admin".into(),
            key: cloister_attestation::keyfile::read_signing_key(&self.data(0).join("admin.key"))
                .unwrap(),
        }
    }

    /// The CLI as the admin, through replica `i`.
    fn admin_cli(&self, i: usize, args: &[&str]) -> Value {
        let out = cloister_env(
            args,
            &[
                (
                    "CLOISTER_KMS_ENDPOINT",
                    &format!("unix:{}", s(&self.sock(i))),
                ),
                ("CLOISTER_PRINCIPAL", "admin"),
                ("CLOISTER_PRINCIPAL_KEY", s(&self.data(0).join("admin.key"))),
            ],
        );
        json_of(&out, &format!("{args:?} through r{i}"))
    }

    /// Every line of the shared audit chain, in order.
    fn audit_lines(&self) -> Vec<Value> {
        self.pg
            .client("kms")
            .query("SELECT line FROM audit_log ORDER BY seq", &[])
            .unwrap()
            .iter()
            .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
            .collect()
    }

    /// The request ids of the chain's allowed requests.
    fn allowed_request_ids(&self) -> std::collections::HashSet<String> {
        self.audit_lines()
            .iter()
            .filter(|l| l["decision"] == "Allow")
            .filter_map(|l| l["request_id"].as_str().map(str::to_owned))
            .collect()
    }

    fn verify_audit(&self, i: usize) -> Value {
        ok_json(&["kms", "audit", "verify", "--data-dir", s(&self.data(i))])
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One call through replica socket `sock`, on a connection of its own.
fn call(sock: &Path, who: &Credentials, op: Operation) -> Result<(String, Output), ClientError> {
    let who = Credentials {
        principal: who.principal.clone(),
        key: who.key.clone(),
    };
    let addr = cloister_proto::Address::Unix(sock.to_path_buf());
    runtime().block_on(async move {
        KmsClient::connect(&addr, None, who)
            .await?
            .call_identified(op)
            .await
    })
}

fn ok(sock: &Path, who: &Credentials, op: Operation) -> Output {
    let what = op.action();
    call(sock, who, op)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .1
}

fn refused(sock: &Path, who: &Credentials, op: Operation) -> String {
    match call(sock, who, op) {
        Ok((_, out)) => panic!("accepted: {out:?}"),
        Err(e) => {
            use cloister_proto::ErrorCode;
            format!("{} {e}", e.code())
        }
    }
}

/// A principal with an Ed25519 key of its own, added through replica `i`.
fn add_principal(c: &Cluster, i: usize, name: &str) -> Credentials {
    let key = SigningKey::generate(&mut rand_core::OsRng);
    ok(
        &c.sock(i),
        &c.admin(),
        Operation::PrincipalAdd {
            name: name.into(),
            public_key: key.verifying_key().to_bytes().to_vec(),
            policy: ALLOW_ALL.into(),
        },
    );
    Credentials {
        principal: name.into(),
        key,
    }
}

/// A key made through r0 and a blob of `text` under it made through r1.
fn key_and_blob(c: &Cluster, app: &Credentials, description: &str, text: &[u8]) -> Vec<u8> {
    let key = key_id(ok(
        &c.sock(0),
        app,
        Operation::CreateKey {
            description: description.into(),
            policy: None,
        },
    ));
    blob(ok(&c.sock(1), app, encrypt(&key, text)))
}

fn key_id(out: Output) -> String {
    match out {
        Output::KeyMetadata(m) => m.key_id,
        other => panic!("not key metadata: {other:?}"),
    }
}

fn encrypt(key: &str, text: &[u8]) -> Operation {
    Operation::Encrypt {
        key_id: key.into(),
        plaintext: Secret::new(text.to_vec()),
        encryption_context: EncryptionContext::new(),
    }
}

fn blob(out: Output) -> Vec<u8> {
    match out {
        Output::Ciphertext {
            ciphertext_blob, ..
        } => ciphertext_blob,
        other => panic!("not a ciphertext: {other:?}"),
    }
}

fn decrypt(blob: &[u8], recipient: Option<Recipient>) -> Operation {
    Operation::Decrypt {
        ciphertext_blob: blob.to_vec(),
        key_id: None,
        encryption_context: EncryptionContext::new(),
        recipient,
    }
}

/// A request as the client library frames it, signed by `who` now.
fn signed_frame(who: &Credentials, request_id: &str, operation: Operation) -> Vec<u8> {
    let payload = cloister_kms::protocol::RequestPayload {
        principal: who.principal.clone(),
        timestamp_ms: cloister_kms::service::now_ms(),
        request_id: request_id.into(),
        operation,
    };
    let signed = SignedRequest::sign(&payload, &who.key).unwrap();
    let body = cloister_proto::frame::encode(&signed).unwrap();
    let mut frame = cloister_proto::frame::header(body.len(), 1 << 24)
        .unwrap()
        .to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Sends one already-signed request frame and returns the broker's answer.
fn send_frame(sock: &Path, frame: &[u8]) -> cloister_kms::protocol::Response {
    try_send_frame(sock, frame).expect("an answer")
}

/// As [`send_frame`]; `None` when the connection fails or closes unanswered.
fn try_send_frame(sock: &Path, frame: &[u8]) -> Option<cloister_kms::protocol::Response> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(sock).ok()?;
    stream.write_all(frame).ok()?;
    let mut header = [0u8; cloister_proto::frame::HEADER_LEN];
    stream.read_exact(&mut header).ok()?;
    let len = cloister_proto::frame::check_header(&header, 1 << 24).ok()?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some(
        cloister_proto::frame::decode::<SignedResponse>(&body)
            .unwrap()
            .decode_unverified()
            .unwrap(),
    )
}

#[test]
fn replicas_share_one_keystore_one_replay_guard_and_one_audit_chain() {
    let Some(c) = Cluster::start(3) else { return };
    // A principal added through r0 is known to r1 and r2 at once.
    let app = add_principal(&c, 0, "app");
    let key = key_id(ok(
        &c.sock(1),
        &app,
        Operation::CreateKey {
            description: "shared".into(),
            policy: None,
        },
    ));
    let data_key = blob(ok(&c.sock(2), &app, encrypt(&key, b"the data key")));

    // Attested decrypts spread over the replicas all succeed.
    ok_json(&["platform", "init", "--dir", s(&c.path("platform"))]);
    c.admin_cli(
        1,
        &[
            "kms",
            "trust",
            "add",
            "--root",
            s(&c.path("platform/root.pem")),
            "--label",
            "lab",
        ],
    );
    std::fs::write(c.path("enclave.pk"), [7u8; 32]).unwrap();
    ok_json(&[
        "platform",
        "attest",
        "--dir",
        s(&c.path("platform")),
        "--public-key",
        s(&c.path("enclave.pk")),
        "--out",
        s(&c.path("enclave.cose")),
    ]);
    let recipient = Recipient {
        key_encryption_algorithm: "HPKE-Base-X25519-SHA256-AES256GCM".into(),
        attestation_document: std::fs::read(c.path("enclave.cose")).unwrap(),
    };
    for n in 0..30 {
        let out = ok(
            &c.sock(n % 3),
            &app,
            decrypt(&data_key, Some(recipient.clone())),
        );
        match out {
            Output::Plaintext {
                plaintext: None,
                ciphertext_for_recipient: Some(ct),
                ..
            } => assert!(ct.ciphertext.len() > 32),
            other => panic!("decrypt {n}: {other:?}"),
        }
    }

    // A key disabled through one replica is refused by the others at once.
    ok(
        &c.sock(0),
        &app,
        Operation::DisableKey {
            key_id: key.clone(),
        },
    );
    for i in [1, 2] {
        let e = refused(&c.sock(i), &app, decrypt(&data_key, None));
        assert!(
            e.contains("E-KMS-DISABLED") && e.contains("disabled"),
            "r{i}: {e}"
        );
    }
    ok(
        &c.sock(2),
        &app,
        Operation::EnableKey {
            key_id: key.clone(),
        },
    );
    assert!(matches!(
        ok(&c.sock(1), &app, decrypt(&data_key, None)),
        Output::Plaintext { plaintext: Some(p), .. } if p.0.as_slice() == b"the data key"
    ));

    // A request accepted by one replica is refused by every other: the
    // parent (or a proxy) replaying its bytes gets nothing.
    let frame = signed_frame(
        &app,
        "replayed-across-replicas-0001",
        decrypt(&data_key, None),
    );
    assert!(send_frame(&c.sock(0), &frame).result.is_ok());
    for i in [1, 2, 0] {
        let e = send_frame(&c.sock(i), &frame).result.unwrap_err();
        assert!(e.message.contains("replayed"), "r{i}: {e}");
    }
    // The same request sent to two replicas at once is accepted by one.
    for n in 0..10 {
        let frame = signed_frame(
            &app,
            &format!("raced-across-replicas-{n:04}"),
            Operation::ListKeys,
        );
        let answers: Vec<bool> = std::thread::scope(|scope| {
            let sent: Vec<_> = [1, 2]
                .map(|i| {
                    let (sock, frame) = (c.sock(i), frame.clone());
                    scope.spawn(move || send_frame(&sock, &frame).result.is_ok())
                })
                .into_iter()
                .collect();
            sent.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(
            answers.iter().filter(|a| **a).count(),
            1,
            "round {n}: {answers:?}"
        );
    }

    // A principal removed through one replica is refused by the others.
    let gone = add_principal(&c, 2, "gone");
    ok(&c.sock(1), &gone, Operation::ListKeys);
    ok(
        &c.sock(0),
        &c.admin(),
        Operation::PrincipalRemove {
            name: "gone".into(),
        },
    );
    let e = refused(&c.sock(1), &gone, Operation::ListKeys);
    assert!(e.contains("E-KMS-INVALID-SIGNATURE"), "{e}");

    // One chain, written by all three, verifies from any replica's data directory.
    let lines = c.audit_lines();
    for r in ["r0", "r1", "r2"] {
        assert!(
            lines
                .iter()
                .any(|l| l["type"] == "startup" && l["replica"] == r),
            "no startup line of {r}"
        );
        assert!(
            lines.iter().any(|l| l["action"] == "kms:Decrypt"
                && l["replica"] == r
                && l["decision"] == "Allow"),
            "{r} recorded no decrypt"
        );
    }
    let replays: Vec<_> = lines
        .iter()
        .filter(|l| l["request_id"] == "replayed-across-replicas-0001")
        .collect();
    assert_eq!(replays.len(), 4, "{replays:?}");
    assert_eq!(
        replays.iter().filter(|l| l["decision"] == "Allow").count(),
        1
    );
    let verified = c.verify_audit(2);
    assert_eq!(verified["Lines"], lines.len());
}

#[test]
fn racing_state_changes_across_replicas_end_consistent_and_audited() {
    let Some(c) = Cluster::start(3) else { return };
    let app = add_principal(&c, 0, "app");
    let keys: Vec<String> = (0..12)
        .map(|i| {
            key_id(ok(
                &c.sock(i % 3),
                &app,
                Operation::CreateKey {
                    description: format!("race {i}"),
                    policy: None,
                },
            ))
        })
        .collect();
    // Per key, three replicas race: schedule deletion, cancel it, disable.
    let ops = |key: &str| {
        vec![
            Operation::ScheduleKeyDeletion {
                key_id: key.into(),
                pending_window_in_days: 7,
            },
            Operation::CancelKeyDeletion { key_id: key.into() },
            Operation::DisableKey { key_id: key.into() },
            Operation::EnableKey { key_id: key.into() },
        ]
    };
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let keys = keys.clone();
            let sock = c.sock(t);
            let app = Credentials {
                principal: app.principal.clone(),
                key: app.key.clone(),
            };
            std::thread::spawn(move || {
                for round in 0..3 {
                    for key in &keys {
                        let all = ops(key);
                        let op = all[(t + round) % all.len()].clone();
                        let _ = call(&sock, &app, op);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Each key's state is what its audited, allowed transitions lead to, in
    // the chain's order; and every replica describes it so.
    let lines = c.audit_lines();
    for key in &keys {
        let allowed = lines
            .iter()
            .filter(|l| {
                l["key_id"].as_str().is_some_and(|k| key.ends_with(k))
                    && l["decision"] == "Allow"
                    && l["action"] != "kms:CreateKey"
            })
            .count();
        assert!(
            allowed >= 2,
            "key {key}: only {allowed} transitions were allowed"
        );
        let mut state = "Enabled";
        for l in lines.iter().filter(|l| {
            l["key_id"]
                .as_str()
                .is_some_and(|k| key.ends_with(k) || k.ends_with(key.as_str()))
                && l["decision"] == "Allow"
        }) {
            state = match l["action"].as_str().unwrap() {
                "kms:ScheduleKeyDeletion" => "PendingDeletion",
                "kms:CancelKeyDeletion" | "kms:DisableKey" => "Disabled",
                "kms:EnableKey" => "Enabled",
                _ => state,
            };
        }
        for i in 0..3 {
            let described = match ok(
                &c.sock(i),
                &app,
                Operation::DescribeKey {
                    key_id: key.clone(),
                },
            ) {
                Output::KeyMetadata(m) => m.key_state,
                other => panic!("{other:?}"),
            };
            assert_eq!(described, state, "key {key} on r{i}");
        }
    }
    c.verify_audit(0);
}

#[test]
fn a_replica_killed_mid_burst_loses_no_acknowledged_key_blob_or_record() {
    let Some(mut c) = Cluster::start(3) else {
        return;
    };
    let app = add_principal(&c, 0, "app");
    let stop_at = Instant::now() + Duration::from_millis(2000);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let socks: Vec<PathBuf> = (0..3).map(|i| c.sock(i)).collect();
            let app = Credentials {
                principal: app.principal.clone(),
                key: app.key.clone(),
            };
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut n = 0;
                while Instant::now() < stop_at {
                    n += 1;
                    let sock = &socks[(w + n) % 3];
                    let Ok((created_id, created)) = call(
                        sock,
                        &app,
                        Operation::CreateKey {
                            description: format!("w{w} n{n}"),
                            policy: None,
                        },
                    ) else {
                        continue;
                    };
                    let key = key_id(created);
                    let text = format!("worker {w} item {n}");
                    let encrypted = call(sock, &app, encrypt(&key, text.as_bytes()))
                        .ok()
                        .map(|(id, out)| (id, blob(out)));
                    acked.push((created_id, key, encrypted, text));
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    c.replicas[1].take().unwrap().kill();
    let acked: Vec<_> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(acked.len() >= 12, "only {} keys acknowledged", acked.len());
    eprintln!("{} keys acknowledged around the kill", acked.len());

    // The survivors know every acknowledged key and open every acknowledged blob,
    // and every acknowledged request is in the chain.
    let recorded = c.allowed_request_ids();
    for (n, (created_id, key, encrypted, text)) in acked.iter().enumerate() {
        let sock = c.sock([0, 2][n % 2]);
        ok(
            &sock,
            &app,
            Operation::DescribeKey {
                key_id: key.clone(),
            },
        );
        assert!(
            recorded.contains(created_id),
            "CreateKey {created_id} not in the chain"
        );
        if let Some((encrypt_id, blob)) = encrypted {
            assert!(
                recorded.contains(encrypt_id),
                "Encrypt {encrypt_id} not in the chain"
            );
            match ok(&sock, &app, decrypt(blob, None)) {
                Output::Plaintext {
                    plaintext: Some(p), ..
                } => assert_eq!(p.0.as_slice(), text.as_bytes()),
                other => panic!("{other:?}"),
            }
        }
    }
    // The killed replica comes back on the same store.
    c.serve(1);
    ok(&c.sock(1), &app, Operation::ListKeys);
    c.verify_audit(1);
}

/// An HTTP GET with curl (an independent client, as a load balancer's probe
/// would be): the status code and the body.
fn probe(port: u16, path: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn readiness_follows_the_database_and_rate_limits_split_across_replicas() {
    let Some(mut c) = Cluster::start(2) else {
        return;
    };
    let port = free_port();
    c.replicas[0].take();
    c.serve_with(
        0,
        &["--health", &format!("tcp:127.0.0.1:{port}"), "--rate", "10"],
    );
    c.replicas[1].take();
    c.serve_with(1, &["--rate", "10"]);
    assert_eq!(probe(port, "/healthz"), (200, "ok\n".into()));
    assert_eq!(probe(port, "/readyz"), (200, "ready\n".into()));
    assert_eq!(probe(port, "/metrics").0, 404);

    // Two replicas serve: each allows half of the principal's 10/s (burst
    // 20): about 10 at once on one replica, where one broker alone allows 20.
    let app = add_principal(&c, 0, "app");
    std::thread::sleep(Duration::from_millis(2500));
    let mut allowed = 0;
    let mut refusal = String::new();
    for _ in 0..30 {
        match call(&c.sock(0), &app, Operation::ListKeys) {
            Ok(_) => allowed += 1,
            Err(e) => refusal = e.to_string(),
        }
    }
    assert!((9..=14).contains(&allowed), "{allowed} allowed: {refusal}");
    assert!(
        refusal.contains("5.0 on each of the 2 replicas serving"),
        "{refusal}"
    );

    // The database goes away: the replica is alive but not ready, saying why.
    c.pg.stop();
    assert_eq!(probe(port, "/healthz").0, 200);
    let (code, body) = probe(port, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("not ready") && body.contains("PostgreSQL"),
        "{body}"
    );
}

#[test]
fn the_root_key_rotates_under_running_replicas_which_refuse_writes_until_restarted() {
    let Some(mut c) = Cluster::start(2) else {
        return;
    };
    let app = add_principal(&c, 0, "app");
    let sealed = key_and_blob(&c, &app, "before", b"before the rotation");

    let rotated = ok_json(&["kms", "rotate-root-key", "--data-dir", s(&c.data(0))]);
    assert_eq!(rotated["Resealed"], 1, "{rotated}");
    // r1 still holds the old root key: its writes are refused, saying why;
    // its copy cannot be reloaded under the old key either.
    let e = refused(
        &c.sock(1),
        &app,
        Operation::CreateKey {
            description: "after".into(),
            policy: None,
        },
    );
    assert!(e.contains("root key was rotated"), "{e}");
    let e = refused(&c.sock(1), &app, decrypt(&sealed, None));
    assert!(e.contains("root key was rotated"), "{e}");

    // Given the new root key and restarted, both serve what was sealed before.
    std::fs::copy(c.data(0).join("root.key"), c.data(1).join("root.key")).unwrap();
    for i in 0..2 {
        c.replicas[i].take().unwrap().terminate();
        c.serve(i);
        match ok(&c.sock(i), &app, decrypt(&sealed, None)) {
            Output::Plaintext {
                plaintext: Some(p), ..
            } => assert_eq!(p.0.as_slice(), b"before the rotation"),
            other => panic!("{other:?}"),
        }
    }
    let lines = c.audit_lines();
    assert!(lines.iter().any(|l| {
        l["action"] == "cloister:RotateRootKey"
            && l["replica"]
                .as_str()
                .is_some_and(|r| r.starts_with("rotate-root-key@"))
    }));
    c.verify_audit(1);
}

#[test]
fn a_database_crash_loses_no_acknowledged_record_or_request_id_claim() {
    let Some(mut c) = Cluster::start(2) else {
        return;
    };
    let app = add_principal(&c, 0, "app");
    let sealed = key_and_blob(&c, &app, "crash", b"through the crash");
    let stop_at = Instant::now() + Duration::from_millis(3000);
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let socks: Vec<PathBuf> = (0..2).map(|i| c.sock(i)).collect();
            let app = Credentials {
                principal: app.principal.clone(),
                key: app.key.clone(),
            };
            let sealed = sealed.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut n = 0;
                while Instant::now() < stop_at {
                    n += 1;
                    let id = format!("crash-w{w}-n{n:06}");
                    let frame = signed_frame(&app, &id, decrypt(&sealed, None));
                    let sock = &socks[n % 2];
                    if try_send_frame(sock, &frame).is_some_and(|r| r.result.is_ok()) {
                        acked.push((id, frame));
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    c.pg.crash_and_restart();
    let acked: Vec<_> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    eprintln!("{} decrypts acknowledged around the crash", acked.len());
    let recorded = c.allowed_request_ids();
    let after = acked
        .iter()
        .filter(|(id, _)| !recorded.contains(id))
        .map(|(id, _)| id.clone())
        .collect::<Vec<_>>();
    assert!(
        after.is_empty(),
        "acknowledged but not in the chain: {after:?}"
    );
    // Served again after the restart (the replicas' pooled connections were
    // closed by the crash), and acknowledged requests' ids are still claimed:
    // replayed now to either replica, each is refused. (A sample: past ~100
    // refusals a peer's allowance of unauthenticated failures runs out.)
    assert!(acked.len() >= 20, "only {} acknowledged", acked.len());
    let every = acked.len().div_ceil(60);
    for (n, (id, frame)) in acked.iter().enumerate().step_by(every) {
        let e = send_frame(&c.sock(n % 2), frame).result.unwrap_err();
        assert!(e.message.contains("replayed"), "{id}: {e}");
    }
    c.verify_audit(0);
}

#[test]
fn a_chain_edited_in_the_database_is_refused_by_the_replicas_and_by_verify() {
    let Some(c) = Cluster::start(1) else { return };
    let app = add_principal(&c, 0, "app");
    for _ in 0..3 {
        ok(&c.sock(0), &app, Operation::ListKeys);
    }
    let mut db = c.pg.client("kms");
    let head = |db: &mut postgres::Client| -> (i64, String, String) {
        let r = db
            .query_one("SELECT seq, hash, signature FROM audit_head", &[])
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    let verify = |c: &Cluster| {
        let out = common::cloister(&["kms", "audit", "verify", "--data-dir", s(&c.data(0))]);
        common::failed_with(&out, "E-KMS-AUDIT-TAMPERED")
    };
    let refused_now = |why: &str| {
        let e = refused(&c.sock(0), &app, Operation::ListKeys);
        assert!(e.contains("edited") && e.contains(why), "{e}");
    };

    // A line added after the head, chained to it as the broker would.
    let (seq, hash, _) = head(&mut db);
    let forged = serde_json::json!({
        "seq": seq + 1, "type": "request", "time": "2026-11-29T00:00:00Z",
        "request_id": "forged-0000000000000", "principal": "app", "action": "kms:Decrypt",
        "decision": "Allow", "reason": "inserted in the database", "prev": hash,
    })
    .to_string();
    db.execute(
        "INSERT INTO audit_log VALUES ($1, $2)",
        &[&(seq + 1), &forged],
    )
    .unwrap();
    assert!(verify(&c).contains("goes on after line"));
    refused_now("follow line");
    db.execute("DELETE FROM audit_log WHERE seq > $1", &[&seq])
        .unwrap();
    ok(&c.sock(0), &app, Operation::ListKeys);

    // An earlier head, validly signed, to roll back to at the end.
    let earlier = head(&mut db);
    for _ in 0..3 {
        ok(&c.sock(0), &app, Operation::ListKeys);
    }

    // The last line cut, and the head moved back to the line before it
    // (unsigned: only the broker key signs heads).
    let (seq, hash_now, signature_now) = head(&mut db);
    let last: String = db
        .query_one("SELECT line FROM audit_log WHERE seq = $1", &[&seq])
        .unwrap()
        .get(0);
    let before: String = db
        .query_one("SELECT line FROM audit_log WHERE seq = $1", &[&(seq - 1)])
        .unwrap()
        .get(0);
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(before.as_bytes()));
    db.execute("DELETE FROM audit_log WHERE seq = $1", &[&seq])
        .unwrap();
    db.execute(
        "UPDATE audit_head SET seq = $1, hash = $2, signature = ''",
        &[&(seq - 1), &hash],
    )
    .unwrap();
    assert!(verify(&c).contains("not signed by the broker key"));
    refused_now("not signed");
    db.execute("INSERT INTO audit_log VALUES ($1, $2)", &[&seq, &last])
        .unwrap();
    db.execute(
        "UPDATE audit_head SET seq = $1, hash = $2, signature = $3",
        &[&seq, &hash_now, &signature_now],
    )
    .unwrap();
    ok(&c.sock(0), &app, Operation::ListKeys);

    // Rolled back to the earlier signed state: the chain alone cannot tell
    // (verify passes: it is a state the broker did sign), but a replica that
    // has seen a later head refuses to go on from it.
    db.execute("DELETE FROM audit_log WHERE seq > $1", &[&earlier.0])
        .unwrap();
    db.execute(
        "UPDATE audit_head SET seq = $1, hash = $2, signature = $3",
        &[&earlier.0, &earlier.1, &earlier.2],
    )
    .unwrap();
    c.verify_audit(0);
    refused_now("went back");
    // Restarted, the replica still knows how far the chain went.
    let mut c = c;
    c.replicas[0].take().unwrap().terminate();
    let out = common::cloister(&[
        "kms",
        "serve",
        "--data-dir",
        s(&c.data(0)),
        "--listen",
        &format!("unix:{}", s(&c.sock(0))),
    ]);
    let e = common::failed_with(&out, "E-KMS-INTERNAL");
    assert!(e.contains("went back") && e.contains("audit.seen"), "{e}");
}

#[test]
fn replicas_reach_postgresql_over_verified_tls_and_a_failed_init_leaves_nothing() {
    let Some((pg, ca)) = Postgres::start_tls() else {
        return;
    };
    let url = pg.create_database("kms");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kms");
    let init = |more: &[&str]| {
        common::cloister(
            &[
                &["kms", "init", "--data-dir", s(&data), "--store"][..],
                more,
            ]
            .concat(),
        )
    };
    // The server takes TLS only: in the clear, it refuses.
    let e = common::failed_with(&init(&[&url]), "E-KMS-INTERNAL");
    assert!(e.contains("cannot reach PostgreSQL"), "{e}");
    assert!(!data.exists(), "a failed init left {}", data.display());
    // TLS asked for without a CA to check the server with.
    let e = common::failed_with(
        &init(&[&format!("{url}?sslmode=require")]),
        "E-KMS-VALIDATION",
    );
    assert!(e.contains("--store-ca"), "{e}");
    // A certificate from another CA is refused.
    let other = dir.path().join("other");
    ok_json(&["kms", "init", "--data-dir", s(&other)]);
    let e = common::failed_with(
        &init(&[&url, "--store-ca", s(&other.join("tls/ca.pem"))]),
        "E-KMS-INTERNAL",
    );
    assert!(e.contains("certificate"), "{e}");
    assert!(!data.exists());
    // The right CA, but the server is not who the URL names (the address is
    // right, the name the certificate must carry is not).
    let port = url.rsplit_once(':').unwrap().1.split('/').next().unwrap();
    let e = common::failed_with(
        &init(&[
            &format!("postgres://cloister@db.invalid:{port}/kms?hostaddr=127.0.0.1"),
            "--store-ca",
            s(&ca),
        ]),
        "E-KMS-INTERNAL",
    );
    assert!(
        e.contains("certificate") && e.contains("not valid for name"),
        "{e}"
    );
    assert!(!data.exists());

    // With the CA that issued it: TLS 1.3, checked, for every connection.
    json_of(&init(&[&url, "--store-ca", s(&ca)]), "init over TLS");
    assert!(data.join("store-ca.pem").exists());
    let sock = dir.path().join("kms.sock");
    let _server = Server::start(
        &[
            "kms",
            "serve",
            "--data-dir",
            s(&data),
            "--listen",
            &format!("unix:{}", s(&sock)),
        ],
        &[],
        &sock,
    );
    let admin = Credentials {
        principal: "admin".into(),
        key: cloister_attestation::keyfile::read_signing_key(&data.join("admin.key")).unwrap(),
    };
    ok(&sock, &admin, Operation::ListKeys);
    let sessions = pg
        .client("kms")
        .query(
            "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'cloister-kms'",
            &[],
        )
        .unwrap();
    assert!(!sessions.is_empty());
    for row in &sessions {
        assert!(row.get::<_, bool>(0), "a broker connection without TLS");
        assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("TLSv1.3"));
    }
    ok_json(&["kms", "audit", "verify", "--data-dir", s(&data)]);
}

#[test]
fn rows_written_in_the_database_without_the_root_key_are_refused() {
    let Some(c) = Cluster::start(2) else { return };
    let app = add_principal(&c, 0, "app");
    let sealed = key_and_blob(&c, &app, "owned by app", b"app's secret");
    ok(
        &c.sock(0),
        &app,
        Operation::DisableKey {
            key_id: key_id_of(&c, &app),
        },
    );
    let mut db = c.pg.client("kms");
    let bump = |db: &mut postgres::Client| {
        db.execute("UPDATE generation SET n = n + 1", &[]).unwrap();
    };

    // Whoever can write the database adds a principal of their own, allowed
    // everything: the replica refuses to read such a keystore at all.
    let mallory = SigningKey::generate(&mut rand_core::OsRng);
    db.execute(
        "INSERT INTO principals (name, public_key, policy, created_ms, mac) VALUES ($1, $2, $3, 0, $4)",
        &[
            &"mallory",
            &mallory.verifying_key().to_bytes().to_vec(),
            &ALLOW_ALL,
            &vec![0u8; 32],
        ],
    )
    .unwrap();
    bump(&mut db);
    let as_mallory = Credentials {
        principal: "mallory".into(),
        key: mallory,
    };
    let e = refused(&c.sock(0), &as_mallory, decrypt(&sealed, None));
    assert!(
        e.contains("principals row \"mallory\" fails its integrity check"),
        "{e}"
    );
    let e = refused(&c.sock(0), &app, Operation::ListKeys);
    assert!(e.contains("integrity check"), "{e}");
    db.execute("DELETE FROM principals WHERE name = 'mallory'", &[])
        .unwrap();
    bump(&mut db);
    ok(&c.sock(0), &app, Operation::ListKeys);

    // A key's policy widened in the database, quietly (no generation moved):
    // the broker's next change of that key starts from the row it checks,
    // and refuses it, rather than sealing the edit with its own write.
    db.execute("UPDATE keys SET policy = $1", &[&ALLOW_ALL])
        .unwrap();
    let e = refused(
        &c.sock(0),
        &app,
        Operation::EnableKey {
            key_id: key_id_of(&c, &app),
        },
    );
    assert!(
        e.contains("keys row") && e.contains("integrity check"),
        "{e}"
    );
    // A disabled key enabled there too: any reload refuses the row.
    db.execute("UPDATE keys SET state = 'Enabled'", &[])
        .unwrap();
    bump(&mut db);
    let e = refused(&c.sock(0), &app, decrypt(&sealed, None));
    assert!(
        e.contains("keys row") && e.contains("integrity check"),
        "{e}"
    );
}

/// The id of the one key `app` made.
fn key_id_of(c: &Cluster, app: &Credentials) -> String {
    match ok(&c.sock(0), app, Operation::ListKeys) {
        Output::Keys(keys) => keys[0].0.clone(),
        other => panic!("{other:?}"),
    }
}
