//! The parent is untrusted: each way it used to read the PHI, tried end to end
//! with the parent's commands running as another uid (`nobody`, by `setpriv`)
//! than the supervisor, the broker and the enclave runtimes, and a hostile proxy
//! between the runtime and the broker. Each attack now fails with a coded error.
//!
//! These tests need root (to run the parent as `nobody` and the runtimes as uids
//! of their own); elsewhere they skip, saying why. CI runs as root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use serde_json::Value;

mod common;
use common::{Broker, Host, failed_with, json_of, s};

use cloister_kms_api::protocol::{
    CiphertextForRecipient, MAX_MESSAGE, Operation, Output as KmsOutput, RequestPayload, Response,
    SignedRequest, SignedResponse, request_digest,
};

const ROLE: &str = "arn:aws:iam::123456789012:role/Parent";
const NOBODY: u32 = 65534;

/// Whether this process can run commands as another uid.
fn multi_uid() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: the parent runs as `nobody`, which needs root (CI runs as root)");
        return false;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipping: setpriv (util-linux) is not installed");
        return false;
    }
    true
}

/// `cloister ARGS` as the parent: uid and gid `nobody`, no supplementary groups.
fn as_parent(h: &Host, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        common::bin(),
    ])
    .args(args);
    for (k, v) in h.env() {
        c.env(k, v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Any command as the parent.
fn parent_sh(cmd: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(cmd)
        .output()
        .unwrap()
}

fn chown_nobody(p: &Path) {
    nix::unistd::chown(
        p,
        Some(nix::unistd::Uid::from_raw(NOBODY)),
        Some(nix::unistd::Gid::from_raw(NOBODY)),
    )
    .unwrap();
}

struct World {
    h: Host,
    broker: Broker,
    /// The parent's own directory (owned by `nobody`).
    parent: PathBuf,
    parent_key: PathBuf,
    owner_key: PathBuf,
    image: PathBuf,
}

impl World {
    /// The world, where this process can run the parent as another uid.
    fn if_multi_uid() -> Option<World> {
        multi_uid().then(World::new)
    }

    fn new() -> World {
        let mut h = Host::new();
        // Two parents: nobody, and another (65532) for the ownership checks.
        h.start_supervisor(&["--allow-uid", &NOBODY.to_string(), "--allow-uid", "65532"]);
        let broker = Broker::start(&h);
        // The parent's KMS client reaches the broker too (the broker
        // authenticates every request); make its socket connectable.
        std::fs::set_permissions(&broker.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let parent = h.path("parent");
        std::fs::create_dir(&parent).unwrap();
        chown_nobody(&parent);
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).unwrap();
        // The parent's role may do anything its identity policy allows: kms:*.
        let parent_key = parent.join("parent.key");
        broker.add_principal(ROLE, &parent_key);
        chown_nobody(&parent_key);
        let owner_key = h.path("owner.key");
        broker.add_principal("owner", &owner_key);

        let (image, built) = broker.scorer_image(&h, "study=fhs", "scorer.cimg", &[]);
        let pcr0 = built["Measurements"]["PCR0"].as_str().unwrap().to_owned();
        let pcr3 = h.ok(&["pcr", "--string", ROLE])["PCR"]
            .as_str()
            .unwrap()
            .to_owned();
        let policy = format!(
            r#"{{"Version":"2012-10-17","Statement":[
              {{"Sid":"Owner","Effect":"Allow","Principal":{{"AWS":"owner"}},"Action":"kms:*","Resource":"*"}},
              {{"Sid":"ScorerEnclave","Effect":"Allow","Principal":{{"AWS":"{ROLE}"}},"Action":["kms:Decrypt","kms:GenerateDataKey"],"Resource":"*",
                "Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"{pcr0}","kms:RecipientAttestation:PCR3":"{pcr3}"}}}}}}]}}"#
        );
        std::fs::write(h.path("policy.json"), policy).unwrap();
        let w = World {
            h,
            broker,
            parent,
            parent_key,
            owner_key,
            image: image.clone(),
        };
        for alias in ["alias/phi-input", "alias/phi-results"] {
            w.broker
                .create_key("owner", &w.owner_key, &w.h.path("policy.json"), alias);
        }
        w
    }

    fn owner(&self, args: &[&str]) -> Value {
        json_of(
            &self.broker.client("owner", &self.owner_key, args),
            &format!("owner {args:?}"),
        )
    }

    /// The parent's KMS client environment.
    fn parent_kms(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "CLOISTER_KMS_ENDPOINT",
                format!("unix:{}", s(&self.broker.sock)),
            ),
            ("CLOISTER_PRINCIPAL", ROLE.into()),
            ("CLOISTER_PRINCIPAL_KEY", s(&self.parent_key).into()),
        ]
    }

    fn parent(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        as_parent(&self.h, args, env)
    }

    /// The parent launches the scorer (its role measured as PCR3), through `proxy`.
    fn launch(&self, name: &str, proxy: &Path, env: &[(&str, &str)]) -> Value {
        self.launch_image(name, &self.image, proxy, env)
    }

    /// The parent launches an image with its role and KMS credentials.
    fn launch_image(&self, name: &str, image: &Path, proxy: &Path, env: &[(&str, &str)]) -> Value {
        json_of(
            &self.parent(
                &common::run_enclave_args(image, name, ROLE, proxy, &self.parent_key)
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
                env,
            ),
            "the parent's run-enclave",
        )
    }

    /// A sealed file of patients, readable by the parent (it is ciphertext).
    fn sealed_input(&self) -> PathBuf {
        let csv: String = phi_model::generate::patients(7, 200, 0).collect();
        std::fs::write(self.h.path("patients.csv"), &csv).unwrap();
        let out = self.parent.join("patients.sealed");
        self.owner(&[
            "encrypt",
            "--key-id",
            "alias/phi-input",
            "--encryption-context",
            "study=fhs",
            "--in",
            s(&self.h.path("patients.csv")),
            "--out",
            s(&out),
        ]);
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
        out
    }

    /// The parent calls an enclave with a request file it wrote.
    fn call(&self, name: &str, request: &[u8]) -> Output {
        let req = self.parent.join(format!("{name}.req"));
        std::fs::write(&req, request).unwrap();
        chown_nobody(&req);
        self.parent(&["call", "--enclave-name", name, "--input", s(&req)], &[])
    }
}

fn audit(w: &World) -> Vec<Value> {
    std::fs::read_to_string(w.broker.data.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Attack 1: the parent chose the output key. Now the image's measured
/// configuration names it; the parent's own key is never used, and the parent
/// cannot open the results.
#[test]
fn the_parent_cannot_choose_where_results_are_sealed() {
    let Some(w) = World::if_multi_uid() else {
        return;
    };
    let kms_env = w.parent_kms();
    let kms_env: Vec<(&str, &str)> = kms_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let own = json_of(
        &w.parent(
            &["kms", "create-key", "--description", "the parent's"],
            &kms_env,
        ),
        "the parent makes a key of its own",
    )["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    w.launch("scorer", &w.broker.proxy_sock, &[]);
    let sealed = std::fs::read(w.sealed_input()).unwrap();

    // The old request form, naming the parent's key: not a sealed file (so read
    // as records in the clear, and refused as no patient row); no key is used.
    let mut request =
        format!("{{\"output_key_id\":\"{own}\",\"output_context\":{{}}}}\n").into_bytes();
    request.extend_from_slice(&sealed);
    let e = failed_with(&w.call("scorer", &request), "E-ENCLAVE-WORKLOAD");
    assert!(e.contains("E-PHI-RECORD"), "{e}");

    // A well-formed request: the results are sealed under alias/phi-results.
    let out = w.call("scorer", &sealed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nl = out.stdout.iter().position(|b| *b == b'\n').unwrap();
    let scores = &out.stdout[nl + 1..];
    let header = cloister_sealed::Header::read(&mut &scores[..]).unwrap();
    assert_ne!(header.key_id, format!("arn:cloister:kms:local:key/{own}"));
    let results_key = w.owner(&["kms", "describe-key", "--key-id", "alias/phi-results"]);
    assert_eq!(
        header.key_id,
        results_key["KeyMetadata"]["Arn"].as_str().unwrap()
    );
    assert!(
        !audit(&w)
            .iter()
            .any(|r| r["action"] == "kms:GenerateDataKey"
                && r["key_id"].as_str().is_some_and(|k| k.contains(&own))),
        "the parent's key was used"
    );
    // The parent holds the scores' ciphertext, but cannot open it.
    let scores_file = w.parent.join("scores.sealed");
    std::fs::write(&scores_file, scores).unwrap();
    chown_nobody(&scores_file);
    let e = failed_with(
        &w.parent(
            &[
                "decrypt",
                "--in",
                s(&scores_file),
                "--out",
                s(&w.parent.join("scores.csv")),
            ],
            &kms_env,
        ),
        "E-KMS-ACCESS-DENIED",
    );
    assert!(
        e.contains("RecipientAttestation") || e.contains("ScorerEnclave"),
        "{e}"
    );
    assert!(!w.parent.join("scores.csv").exists());
    let denial = audit(&w)
        .into_iter()
        .rfind(|r| r["action"] == "kms:Decrypt")
        .unwrap();
    assert_eq!(denial["principal"], ROLE);
    assert_eq!(denial["decision"], "Deny");
}

/// Attack 2 (and 4's precondition): the parent cannot read the NSM key, the
/// code cache or an enclave's directory, cannot choose the runtime's
/// environment, and the runtime does not run as the parent.
#[test]
fn the_parent_holds_no_nsm_key_and_does_not_shape_the_runtime() {
    let Some(w) = World::if_multi_uid() else {
        return;
    };
    let run = w.launch(
        "scorer",
        &w.broker.proxy_sock,
        &[
            ("LD_PRELOAD", "/tmp/parent-code.so"),
            ("CLOISTER_EVIL", "1"),
        ],
    );
    let pid = run["ProcessID"].as_u64().unwrap();
    let id = run["EnclaveID"].as_str().unwrap();
    let uid = run["RuntimeUid"].as_u64().unwrap();
    assert_ne!(uid, u64::from(NOBODY));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == uid.to_string()),
        "{uid_line}"
    );
    let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
    assert_eq!(
        groups.trim(),
        "Groups:",
        "the runtime kept supplementary groups"
    );
    // The environment the parent had is not the runtime's: it has none.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.is_empty(), "{}", String::from_utf8_lossy(&environ));
    // The parent can neither read the NSM key nor the cache, nor enter the
    // enclave's directory, nor signal the runtime.
    let denied = |cmd: &[&str]| {
        let out = parent_sh(cmd);
        assert!(!out.status.success(), "{cmd:?} succeeded as the parent");
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            err.contains("permission denied") || err.contains("not permitted"),
            "{cmd:?}: {err}"
        );
    };
    let nsm_key = w.h.path("platform/nsm.key");
    denied(&["cat", s(&nsm_key)]);
    denied(&["ls", s(&w.h.path("state/cache"))]);
    denied(&["cp", "/etc/hostname", s(&w.h.path("state/cache/planted"))]);
    denied(&["ls", s(&w.h.path(&format!("state/enclaves/{id}")))]);
    denied(&["kill", "-0", &pid.to_string()]);
    // The runtime's uid owns its directory: were a guest to take the runtime
    // over, it could plant links there. The supervisor, as root, follows none:
    // not the console to the NSM key, not the call socket to another service.
    let dbg_run = json_of(
        &w.parent(
            &[
                "run-enclave",
                "--image",
                s(&w.image),
                "--enclave-name",
                "dbg",
                "--debug-mode",
            ],
            &[],
        ),
        "debug run",
    );
    let dbg_dir = w.h.path(&format!(
        "state/enclaves/{}",
        dbg_run["EnclaveID"].as_str().unwrap()
    ));
    let console = dbg_dir.join("console.log");
    let _ = std::fs::remove_file(&console);
    std::os::unix::fs::symlink(&nsm_key, &console).unwrap();
    let out = w.parent(&["console", "--enclave-name", "dbg"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nsm_pem = std::fs::read(&nsm_key).unwrap();
    assert!(
        !out.stdout
            .windows(40)
            .any(|x| nsm_pem.windows(40).any(|y| x == y)),
        "the console showed the NSM key"
    );
    let sock = dbg_dir.join("enclave.sock");
    std::fs::remove_file(&sock).unwrap();
    std::os::unix::fs::symlink(&w.broker.sock, &sock).unwrap();
    let e = failed_with(&w.call("dbg", b"echo:x"), "E-ENCLAVE-IO");
    assert!(e.contains("does not lead to its runtime"), "{e}");
    // run-enclave has no way to name a platform (an NSM key) at all.
    let out = w.parent(
        &["run-enclave", "--image", s(&w.image), "--platform", "/tmp"],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--platform"));
    // The cloister CLI as another uid.
    let as_uid = |uid: u32, args: &[&str]| {
        Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
                common::bin(),
            ])
            .args(args)
            .envs(w.h.env())
            .output()
            .unwrap()
    };
    // A uid the supervisor does not allow is refused outright.
    failed_with(
        &as_uid(65533, &["describe-enclaves"]),
        "E-SUPERVISOR-UNAUTHORIZED",
    );
    // Its request is drained, not held, however large: it sees the refusal,
    // not a broken pipe, after sending an image of 15 MB (far more than a
    // socket buffers).
    let large = w.h.path("large.cimg");
    w.h.ok(&[
        "build-enclave",
        "--wasm",
        s(&common::guest("inference")),
        "--name",
        "large",
        "--version",
        "1",
        "--output",
        s(&large),
    ]);
    std::fs::set_permissions(&large, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(std::fs::metadata(&large).unwrap().len() > 10 << 20);
    failed_with(
        &as_uid(65533, &["run-enclave", "--image", s(&large)]),
        "E-SUPERVISOR-UNAUTHORIZED",
    );
    // A peer that announces a request and stalls is answered, and cut off,
    // after the control read timeout.
    {
        use std::io::{Read, Write};
        let mut stalled =
            std::os::unix::net::UnixStream::connect(w.h.path("supervisor.sock")).unwrap();
        stalled.write_all(&[1, 0, 0x10, 0, 0]).unwrap();
        stalled.write_all(b"0123456789").unwrap();
        stalled
            .set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut answer = Vec::new();
        stalled.read_to_end(&mut answer).unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= std::time::Duration::from_secs(9)
                && waited < std::time::Duration::from_secs(40),
            "cut off after {waited:?}"
        );
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.contains("E-PROTO-IO") && answer.contains("did not arrive within 10 s"),
            "{answer}"
        );
    }
    // An allowed uid manages only the enclaves it launched: another parent
    // (uid 65533, allowed too) can neither call, read nor stop this one.
    let other_parent = |args: &[&str]| as_uid(65532, args);
    // It sees the enclave (as nitro-cli's users of one host do), no more.
    assert!(
        json_of(
            &other_parent(&["describe-enclaves"]),
            "another parent lists"
        )
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["EnclaveName"] == "scorer")
    );
    for args in [
        &["terminate-enclave", "--enclave-name", "scorer"][..],
        &["console", "--enclave-name", "scorer"],
        &["call", "--enclave-name", "scorer"],
    ] {
        let e = failed_with(&other_parent(args), "E-SUPERVISOR-UNAUTHORIZED");
        assert!(e.contains("did not launch"), "{e}");
    }
    assert!(
        json_of(
            &other_parent(&["terminate-enclave", "--all"]),
            "all of its own"
        )
        .as_array()
        .unwrap()
        .is_empty()
    );
    let e = failed_with(
        &other_parent(&["terminate-enclave", "--enclave-name", "scorer"]),
        "E-SUPERVISOR-UNAUTHORIZED",
    );
    assert!(e.contains("did not launch"), "{e}");
    // The supervisor refuses a state directory others could write, and, as
    // root, one its enclave runtimes could not reach.
    let refused_state = |dir: &str, mode: u32, state: &str| {
        let d = w.h.path(dir);
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = common::cloister(&[
            "supervisor",
            "--state-dir",
            s(&d.join(state)),
            "--platform",
            s(&w.h.path("platform")),
            "--listen",
            &format!("unix:{}", s(&w.h.path(&format!("{dir}.sock")))),
        ]);
        failed_with(&out, "E-SUPERVISOR-STATE")
    };
    let e = refused_state("bad-state", 0o777, "");
    assert!(e.contains("must not be able to write"), "{e}");
    let e = refused_state("closed", 0o700, "state");
    assert!(e.contains("must pass through"), "{e}");
}

/// What a hostile proxy does with the enclave's KMS requests.
#[derive(Clone, Copy)]
enum Hostile {
    /// Answers GenerateDataKey/GenerateRandom itself, with a data key it knows,
    /// correctly sealed to the enclave's recipient key, signed by its own key.
    Forge,
    /// Relays the first request to the broker, then answers every later request
    /// with that genuine, broker-signed answer.
    Replay,
}

fn hostile_proxy(listen: PathBuf, broker: PathBuf, mode: Hostile, seen: Arc<Mutex<u32>>) {
    let listener = UnixListener::bind(&listen).unwrap();
    std::fs::set_permissions(&listen, std::fs::Permissions::from_mode(0o666)).unwrap();
    let recorded: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let forger = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let Ok(frame) = read_frame(&mut conn) else {
                continue;
            };
            *seen.lock().unwrap() += 1;
            let answer = match mode {
                Hostile::Forge => forge(&frame, &forger),
                Hostile::Replay => {
                    let mut recorded = recorded.lock().unwrap();
                    match recorded.clone() {
                        Some(old) => old,
                        None => {
                            let mut up = UnixStream::connect(&broker).unwrap();
                            up.write_all(&frame).unwrap();
                            let genuine = read_frame(&mut up).unwrap();
                            *recorded = Some(genuine.clone());
                            genuine
                        }
                    }
                }
            };
            let _ = conn.write_all(&answer);
        }
    });
}

/// One whole frame (header included).
fn read_frame(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    assert!(len <= MAX_MESSAGE);
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok([header.to_vec(), body].concat())
}

/// The answer a broker would give, made up by the proxy.
fn forge(frame: &[u8], forger: &ed25519_dalek::SigningKey) -> Vec<u8> {
    let signed: SignedRequest = cloister_proto::frame::decode(&frame[5..]).unwrap();
    let payload: RequestPayload = cloister_proto::frame::decode(&signed.payload).unwrap();
    let (recipient, op, key_arn) = match &payload.operation {
        Operation::GenerateDataKey { recipient, .. } => (
            recipient.clone().unwrap(),
            "GenerateDataKey",
            "arn:cloister:kms:local:key/00000000-0000-4000-8000-000000000000".to_owned(),
        ),
        Operation::GenerateRandom { recipient, .. } => {
            (recipient.clone().unwrap(), "GenerateRandom", String::new())
        }
        other => panic!("unexpected {other:?}"),
    };
    let doc =
        cloister_attestation::UnverifiedDocument::parse(&recipient.attestation_document).unwrap();
    let public_key = doc.document.public_key.unwrap();
    let sealed = cloister_kms_api::recipient::seal(
        &public_key,
        cloister_kms_api::recipient::info(&key_arn, op, &payload.request_id),
        cloister_kms_api::recipient::aad(&recipient.attestation_document),
        &[0x55; 32],
    )
    .unwrap();
    let cfr = Some(CiphertextForRecipient {
        ciphertext: sealed.ciphertext,
        info: sealed.info,
        aad: sealed.aad,
    });
    let output = match op {
        "GenerateDataKey" => KmsOutput::DataKey {
            key_id: key_arn,
            ciphertext_blob: vec![1, 2, 3],
            plaintext: None,
            ciphertext_for_recipient: cfr,
        },
        _ => KmsOutput::Plaintext {
            key_id: None,
            plaintext: None,
            ciphertext_for_recipient: cfr,
        },
    };
    let response = Response {
        request_id: payload.request_id.clone(),
        request_digest: request_digest(&signed.payload),
        result: Ok(output),
    };
    let answer = SignedResponse::sign(&response, forger).unwrap();
    let body = cloister_proto::frame::encode(&answer).unwrap();
    [
        cloister_proto::frame::header(body.len(), MAX_MESSAGE)
            .unwrap()
            .to_vec(),
        body,
    ]
    .concat()
}

/// Attack 3: a proxy that answers for the broker, or replays its answers.
#[test]
fn a_hostile_proxy_cannot_answer_for_the_broker() {
    let Some(w) = World::if_multi_uid() else {
        return;
    };
    // The test guest, trusting this broker (its image names broker.pub).
    let trust = w.broker.trust_args();
    let trust: Vec<&str> = trust.iter().map(String::as_str).collect();
    let (guest_image, _) = w.h.build("guest.cimg", &trust);
    let results = w.owner(&["kms", "describe-key", "--key-id", "alias/phi-results"])["KeyMetadata"]
        ["KeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    for (name, mode) in [("forged", Hostile::Forge), ("replayed", Hostile::Replay)] {
        let sock = w.h.path(&format!("{name}.sock"));
        let seen = Arc::new(Mutex::new(0));
        hostile_proxy(sock.clone(), w.broker.sock.clone(), mode, seen.clone());
        w.launch_image(name, &guest_image, &sock, &[]);
        if let Hostile::Replay = mode {
            // The first request goes through to the broker: a genuine answer.
            let out = w.call(name, b"kms-random:16");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for request in [format!("kms-gdk:{results}"), "kms-random:16".to_owned()] {
            let e = failed_with(&w.call(name, request.as_bytes()), "E-ENCLAVE-WORKLOAD");
            assert!(e.contains("E-KMS-UNAUTHENTICATED-RESPONSE"), "{name}: {e}");
        }
        assert!(
            *seen.lock().unwrap() >= 2,
            "the hostile proxy was not in the path"
        );
    }
}

/// Attack 4: compiled code in the cache is bound to its component. Code of
/// another component copied over an entry is detected, discarded and
/// recompiled: the enclave runs the code its PCR0 names.
#[test]
fn swapped_compiled_code_is_detected_and_recompiled() {
    let Some(w) = World::if_multi_uid() else {
        return;
    };
    let (test_image, _) = w.h.build("t.cimg", &[]);
    let (demo_image, _) = w.h.build_guest("attest_demo", "demo", "demo.cimg", &[]);
    let run = |name: &str, image: &Path| {
        json_of(
            &w.parent(
                &["run-enclave", "--image", s(image), "--enclave-name", name],
                &[],
            ),
            "run-enclave",
        )
    };
    run("t1", &test_image);
    run("d1", &demo_image);
    use sha2::Digest;
    let entry = |wasm: &str| {
        let bytes = std::fs::read(common::guest(wasm)).unwrap();
        w.h.path(&format!(
            "state/cache/{}",
            hex::encode(sha2::Sha256::digest(bytes))
        ))
    };
    let (test_entry, demo_entry) = (entry("test_guest"), entry("attest_demo"));
    assert!(test_entry.exists() && demo_entry.exists());
    // Planted: the demo's code (with its valid tag) under the test guest's name.
    std::fs::copy(&demo_entry, &test_entry).unwrap();
    run("t2", &test_image);
    let out = w.call("t2", b"echo:the test guest's own code");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"the test guest's own code");
    // The bad entry was replaced by the right code: it differs from the demo's again.
    assert_ne!(
        std::fs::read(&test_entry).unwrap(),
        std::fs::read(&demo_entry).unwrap()
    );
    // Edited code (one byte) is refused the same way.
    let mut bytes = std::fs::read(&test_entry).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&test_entry, &bytes).unwrap();
    run("t3", &test_image);
    assert_eq!(w.call("t3", b"echo:ok").stdout, b"ok");
    assert_ne!(std::fs::read(&test_entry).unwrap(), bytes);
}

/// Every readable mapping of a process (as root: the runtime is not dumpable).
fn process_memory(pid: u64) -> Vec<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut regions = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_ok() && mem.read_exact(&mut buf).is_ok() {
            regions.push(buf);
        }
    }
    regions
}

fn holds(regions: &[Vec<u8>], needle: &[u8]) -> bool {
    regions
        .iter()
        .any(|r| memchr::memmem::find(r, needle).is_some())
}

/// After a call, the runtime's memory holds neither the data keys it was
/// released nor the records it read: the call's keyring died with its Store,
/// its linear memory was unmapped, and freed heap blocks were zeroed.
#[test]
fn after_a_call_the_runtime_holds_no_key_and_no_record() {
    let Some(w) = World::if_multi_uid() else {
        return;
    };
    let run = w.launch("scorer", &w.broker.proxy_sock, &[]);
    let pid = run["ProcessID"].as_u64().unwrap();
    let sealed_path = w.sealed_input();
    let sealed = std::fs::read(&sealed_path).unwrap();
    let out = w.call("scorer", &sealed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nl = out.stdout.iter().position(|b| *b == b'\n').unwrap();
    // The owner recovers both data keys the enclave held: the input's and the output's.
    let data_key = |file: &[u8], name: &str| {
        let edk = cloister_sealed::Header::read(&mut &file[..])
            .unwrap()
            .encrypted_data_key;
        let path = w.h.path(name);
        std::fs::write(&path, edk).unwrap();
        let v = w.owner(&[
            "kms",
            "decrypt",
            "--ciphertext-blob",
            &format!("fileb://{}", s(&path)),
            "--encryption-context",
            "study=fhs",
        ]);
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(v["Plaintext"].as_str().unwrap())
            .unwrap()
    };
    let input_key = data_key(&sealed, "in.edk");
    let output_key = data_key(&out.stdout[nl + 1..], "out.edk");
    assert_eq!((input_key.len(), output_key.len()), (32, 32));
    let csv = std::fs::read_to_string(w.h.path("patients.csv")).unwrap();
    // The last records: their chunk was the last to pass through the heap.
    let records: Vec<&str> = csv.lines().rev().take(3).collect();
    let memory = process_memory(pid);
    assert!(
        memory.iter().map(Vec::len).sum::<usize>() > 1 << 20,
        "no memory read"
    );
    // The scan finds what is there: the measured configuration, kept on the heap.
    assert!(
        holds(&memory, b"alias/phi-results"),
        "the scan finds nothing at all"
    );
    assert!(
        !holds(&memory, &input_key),
        "the input data key is still in the runtime"
    );
    assert!(
        !holds(&memory, &output_key),
        "the output data key is still in the runtime"
    );
    for record in records {
        assert!(
            !holds(&memory, record.as_bytes()),
            "a record is still in the runtime: {record}"
        );
    }

    // A record a client sent over the attested channel (here the parent itself,
    // as `nobody`, verifying the image first) does not stay in the runtime
    // either: the opened request, its Binary HTTP copies and the answer are
    // zeroed when the call ends.
    let root = w.parent.join("root.pem");
    std::fs::copy(w.h.path("platform/root.pem"), &root).unwrap();
    chown_nobody(&root);
    let request = w.parent.join("record.csv");
    std::fs::write(&request, "channel-7731,F,61,212,47,141,1,0,1\n").unwrap();
    chown_nobody(&request);
    let out = w.parent(
        &[
            "call",
            "--enclave-name",
            "scorer",
            "--input",
            s(&request),
            "--attested",
            "--root",
            s(&root),
            "--expect-image",
            s(&w.image),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("channel-7731,"));
    let memory = process_memory(pid);
    assert!(
        holds(&memory, b"alias/phi-results"),
        "the scan finds nothing at all"
    );
    assert!(
        !holds(&memory, b"channel-7731"),
        "a record sent over the attested channel is still in the runtime"
    );
}
