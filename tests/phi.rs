//! The PHI scoring flow end to end, across processes: the data owner seals
//! synthetic patient records, an attested scorer enclave decrypts them with a key
//! only its image may use, scores them, seals the results for the owner; the
//! parent side relays only ciphertext.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;

mod common;
use common::{Host, failed_with, json_of, s};

const ROLE: &str = "arn:aws:iam::123456789012:role/Scorer";
/// The encryption context the scorer image seals its results with.
const CONTEXT: &str = "study=fhs-demo,kind=scores";
/// Another parent role, allowed by the key policy's Principal but not by its PCR3 pin.
const OTHER_ROLE: &str = "arn:aws:iam::123456789012:role/Other";
/// A parent role the key policy names, whose identity policy allows no Decrypt.
const NO_IDENTITY: &str = "arn:aws:iam::123456789012:role/NoIdentity";
/// A parent role with full identity permissions that the key policy does not name.
const NOT_IN_KEY_POLICY: &str = "arn:aws:iam::123456789012:role/Stranger";

struct Setup {
    h: Host,
    broker: common::Broker,
    relay_sock: PathBuf,
    owner_key: PathBuf,
    captured: Arc<Mutex<Vec<u8>>>,
}

/// The key file of a principal, by its name.
fn key_name(principal: &str) -> String {
    principal
        .rsplit('/')
        .next()
        .unwrap_or(principal)
        .to_ascii_lowercase()
}

impl Setup {
    fn client(&self, principal: &str, key: &Path, args: &[&str]) -> std::process::Output {
        self.broker.client(principal, key, args)
    }
    /// Launches an enclave whose parent acts as `role` (PCR3 and KMS credentials).
    fn launch(&self, name: &str, image: &Path, role: &str, extra: &[&str]) -> Value {
        let key = self.h.path(&format!("{}.key", key_name(role)));
        let mut args = common::run_enclave_args(image, name, role, &self.relay_sock, &key);
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.h.ok(&args)
    }
}

fn setup() -> Setup {
    let h = Host::new();
    let broker = common::Broker::start(&h);
    let captured = Arc::new(Mutex::new(Vec::new()));
    let relay_sock = h.path("relay.sock");
    common::capturing_relay(
        relay_sock.clone(),
        broker.proxy_sock.clone(),
        captured.clone(),
    );
    let owner_key = h.path("owner.key");
    broker.add_principal("owner", &owner_key);
    for role in [ROLE, OTHER_ROLE, NOT_IN_KEY_POLICY] {
        broker.add_principal(role, &h.path(&format!("{}.key", key_name(role))));
    }
    // A parent role whose identity policy allows only Encrypt.
    let narrow = h.path(&format!("{}.key", key_name(NO_IDENTITY)));
    json_of(
        &common::cloister(&[
            "keygen",
            "--private-key",
            s(&narrow),
            "--public-key",
            s(&narrow.with_extension("pub")),
        ]),
        "keygen",
    );
    std::fs::write(h.path("encrypt-only.json"), r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Encrypt","Resource":"*"}}"#).unwrap();
    broker.admin(&[
        "kms",
        "principal",
        "add",
        "--name",
        NO_IDENTITY,
        "--public-key",
        s(&narrow.with_extension("pub")),
        "--policy",
        &format!("file://{}", s(&h.path("encrypt-only.json"))),
    ]);
    Setup {
        h,
        broker,
        relay_sock,
        owner_key,
        captured,
    }
}

fn split_response(response: &[u8]) -> (Value, Vec<u8>) {
    let nl = response
        .iter()
        .position(|b| *b == b'\n')
        .expect("a summary line");
    (
        serde_json::from_slice(&response[..nl]).unwrap(),
        response[nl + 1..].to_vec(),
    )
}

#[test]
fn scores_sealed_records_in_an_attested_enclave_and_the_parent_sees_no_plaintext() {
    let st = setup();
    let h = &st.h;
    // Where results go is measured configuration: in the image, not the request.
    let (image, built) = st.broker.scorer_image(h, CONTEXT, "scorer.cimg", &[]);
    let pcr0 = built["Measurements"]["PCR0"].as_str().unwrap().to_owned();
    let pcr3 = h.ok(&["pcr", "--string", ROLE])["PCR"]
        .as_str()
        .unwrap()
        .to_owned();
    let policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[
              {{"Sid":"Owner","Effect":"Allow","Principal":{{"AWS":"owner"}},"Action":["kms:GenerateDataKey","kms:Decrypt","kms:DescribeKey","kms:CreateAlias"],"Resource":"*"}},
              {{"Sid":"ScorerEnclave","Effect":"Allow","Principal":{{"AWS":["{ROLE}","{OTHER_ROLE}","{NO_IDENTITY}"]}},"Action":["kms:Decrypt","kms:GenerateDataKey"],"Resource":"*",
                "Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"{pcr0}","kms:RecipientAttestation:PCR3":"{pcr3}"}}}}}}]}}"#
    );
    std::fs::write(h.path("policy.json"), policy).unwrap();
    for alias in ["alias/phi-input", "alias/phi-results"] {
        st.broker
            .create_key("owner", &st.owner_key, &h.path("policy.json"), alias);
    }

    // The data owner seals synthetic patients (a few malformed on purpose).
    let csv: String = phi_model::generate::patients(2026, 3000, 250).collect();
    std::fs::write(h.path("patients.csv"), &csv).unwrap();
    json_of(
        &st.client(
            "owner",
            &st.owner_key,
            &[
                "encrypt",
                "--key-id",
                "alias/phi-input",
                "--encryption-context",
                "study=fhs-demo",
                "--in",
                s(&h.path("patients.csv")),
                "--out",
                s(&h.path("patients.sealed")),
            ],
        ),
        "encrypt",
    );
    let sealed = std::fs::read(h.path("patients.sealed")).unwrap();
    let request = sealed.clone();

    st.launch("scorer", &image, ROLE, &[]);
    let response = h.call_ok(&["--enclave-name", "scorer"], &request);
    let (summary, sealed_scores) = split_response(&response);
    assert_eq!(summary["scored"], 2988);
    assert_eq!(summary["malformed"], 12);

    // 1. The owner decrypts the results: they equal the same scores computed natively.
    std::fs::write(h.path("scores.sealed"), &sealed_scores).unwrap();
    json_of(
        &st.client(
            "owner",
            &st.owner_key,
            &[
                "decrypt",
                "--in",
                s(&h.path("scores.sealed")),
                "--out",
                s(&h.path("scores.csv")),
            ],
        ),
        "decrypt",
    );
    let mut native = phi_model::Summary::default();
    let expected: String = std::iter::once("patient_id,risk_10y\n".to_string())
        .chain(
            csv.lines()
                .filter_map(|l| phi_model::score_line(l, &mut native)),
        )
        .collect();
    assert_eq!(
        std::fs::read_to_string(h.path("scores.csv")).unwrap(),
        expected
    );
    assert_eq!(
        summary["mean_risk"].as_f64().unwrap(),
        (native.mean() * 1e6).round() / 1e6
    );

    // 3. Nothing the parent side handled holds a record, an identifier or a data key.
    let dk = json_of(
        &st.client(
            "owner",
            &st.owner_key,
            &[
                "kms",
                "decrypt",
                "--ciphertext-blob",
                &format!(
                    "fileb://{}",
                    s(&write(
                        h,
                        "edk",
                        &cloister_sealed::Header::read(&mut &sealed[..])
                            .unwrap()
                            .encrypted_data_key
                    ))
                ),
                "--encryption-context",
                "study=fhs-demo",
            ],
        ),
        "owner decrypts the data key",
    );
    use base64::Engine;
    let data_key = base64::engine::general_purpose::STANDARD
        .decode(dk["Plaintext"].as_str().unwrap())
        .unwrap();
    let proxy_stream = st.captured.lock().unwrap().clone();
    assert!(proxy_stream.len() > 1000, "the relay saw the KMS traffic");
    for (what, haystack) in [
        ("proxy stream", &proxy_stream),
        ("call request", &request),
        ("call response", &response),
    ] {
        for needle in [
            &b"P0000017"[..],
            b"P0001234",
            b"patient_id",
            b",F,",
            data_key.as_slice(),
        ] {
            assert!(
                !haystack.windows(needle.len()).any(|w| w == needle),
                "{what} contains {:?}",
                String::from_utf8_lossy(needle)
            );
        }
    }
    let first_row = csv.lines().nth(1).unwrap();
    assert!(
        !proxy_stream
            .windows(first_row.len())
            .any(|w| w == first_row.as_bytes())
    );

    // 4. A truncated or tampered input: an error, and no output.
    let mut truncated = request.clone();
    truncated.truncate(request.len() - 40);
    let e = failed_with(
        &h.call(&["--enclave-name", "scorer"], &truncated),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(e.contains("E-SEALED-TRUNCATED"), "{e}");
    let mut tampered = request.clone();
    let at = request.len() - 2000;
    tampered[at] ^= 1;
    let e = failed_with(
        &h.call(&["--enclave-name", "scorer"], &tampered),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(e.contains("E-SEALED-TAMPERED"), "{e}");

    // 2. Refusals, each with its reason, in the response and in the audit log.
    let (modified, _) = st.broker.scorer_image(
        h,
        CONTEXT,
        "modified.cimg",
        &["--metadata", "{\"patched\":1}"],
    );
    st.launch("modified", &modified, ROLE, &[]);
    let e = failed_with(
        &h.call(&["--enclave-name", "modified"], &request),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(
        e.contains("E-KMS-ACCESS-DENIED") && e.contains("ImageSha384"),
        "{e}"
    );
    st.launch("debug", &image, ROLE, &["--debug-mode"]);
    let e = failed_with(
        &h.call(&["--enclave-name", "debug"], &request),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(e.contains("E-KMS-ACCESS-DENIED"), "{e}");
    st.launch("wrong-role", &image, OTHER_ROLE, &[]);
    let e = failed_with(
        &h.call(&["--enclave-name", "wrong-role"], &request),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(e.contains("PCR3"), "{e}");
    st.launch("no-identity", &image, NO_IDENTITY, &[]);
    let e = failed_with(
        &h.call(&["--enclave-name", "no-identity"], &request),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(
        e.contains("the identity policy of") && e.contains("does not allow kms:Decrypt"),
        "{e}"
    );
    st.launch("stranger", &image, NOT_IN_KEY_POLICY, &[]);
    let e = failed_with(
        &h.call(&["--enclave-name", "stranger"], &request),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(e.contains("does not name principal"), "{e}");
    // An enclave of a supervisor whose platform the broker does not trust.
    h.ok(&["platform", "init", "--dir", s(&h.path("rogue-platform"))]);
    let rogue_sock = h.path("rogue.sock");
    let _rogue = common::Server::start(
        &[
            "supervisor",
            "--state-dir",
            s(&h.path("rogue-state")),
            "--platform",
            s(&h.path("rogue-platform")),
            "--listen",
            &format!("unix:{}", s(&rogue_sock)),
        ],
        &[],
        &rogue_sock,
    );
    let rogue_env = format!("unix:{}", s(&rogue_sock));
    let rogue = |args: &[&str]| common::cloister_env(args, &[("CLOISTER_SUPERVISOR", &rogue_env)]);
    let key = h.path(&format!("{}.key", key_name(ROLE)));
    let args = common::run_enclave_args(&image, "rogue", ROLE, &st.relay_sock, &key);
    json_of(
        &rogue(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        "run on the rogue platform",
    );
    let req = write(h, "rogue.req", &request);
    let e = failed_with(
        &rogue(&["call", "--enclave-name", "rogue", "--input", s(&req)]),
        "E-ENCLAVE-WORKLOAD",
    );
    assert!(e.contains("E-ATTEST-UNTRUSTED-ROOT"), "{e}");
    let log = std::fs::read_to_string(h.path("kms/audit.log")).unwrap();
    let denials: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["decision"] == "Deny" && l["action"] == "kms:Decrypt")
        .collect();
    assert_eq!(denials.len(), 6, "{denials:?}");
    let reasons: Vec<&str> = denials
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert!(reasons[3].contains("identity policy"), "{}", reasons[3]);
    assert!(
        reasons[4].contains("does not name principal"),
        "{}",
        reasons[4]
    );
    assert!(
        reasons[5].contains("E-ATTEST-UNTRUSTED-ROOT"),
        "{}",
        reasons[5]
    );
    let denials = &denials[..3];
    assert!(
        denials
            .iter()
            .all(|d| d["reason"].as_str().unwrap().contains("ScorerEnclave"))
    );
}

fn write(h: &Host, name: &str, bytes: &[u8]) -> PathBuf {
    let p = h.path(name);
    std::fs::write(&p, bytes).unwrap();
    p
}
