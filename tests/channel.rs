//! The attested channel end to end: clients verify the enclave, then send
//! records encrypted to the key its document binds; the parent (the HTTP relay,
//! the supervisor's control socket, anything between) relays ciphertext.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::Value;

mod common;
use common::{Host, Server, failed_with, s};

/// One patient, and a value in it that must never cross the parent in the clear.
const RECORD: &[u8] = b"patient-7731,F,61,212,47,141,1,0,1\n";
const MARKER: &[u8] = b"patient-7731";

fn score_of(record: &[u8]) -> String {
    let mut summary = phi_model::Summary::default();
    phi_model::score_line(std::str::from_utf8(record).unwrap(), &mut summary).unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

struct Setup {
    h: Host,
    image: PathBuf,
    pcr0: String,
}

/// The PHI scorer in an enclave named `scorer` (single records need no broker).
fn setup() -> Setup {
    let h = Host::new();
    let (image, built) = h.launch_scorer();
    let pcr0 = built["Measurements"]["PCR0"].as_str().unwrap().to_owned();
    Setup { h, image, pcr0 }
}

impl Setup {
    fn root(&self) -> PathBuf {
        self.h.path("platform/root.pem")
    }

    /// `cloister call --attested` with the given expectations, through the
    /// supervisor at `supervisor`.
    fn attested_call(
        &self,
        supervisor: &str,
        which: &str,
        request: &[u8],
        expect: &[&str],
    ) -> std::process::Output {
        let input = self.h.path("record.csv");
        std::fs::write(&input, request).unwrap();
        let root = self.root();
        let mut args = vec![
            "call",
            "--enclave-name",
            which,
            "--input",
            s(&input),
            "--attested",
            "--root",
            s(&root),
        ];
        args.extend_from_slice(expect);
        common::cloister_env(&args, &[("CLOISTER_SUPERVISOR", supervisor)])
    }

    fn supervisor(&self) -> String {
        format!("unix:{}", s(&self.h.path("supervisor.sock")))
    }
}

/// `cloister relay` for an enclave on a free loopback port; its base URL.
fn relay(h: &Host, name: &str) -> (Server, String) {
    let env = h.env();
    let mut child = Command::new(common::bin())
        .args([
            "relay",
            "--enclave-name",
            name,
            "--listen",
            "tcp:127.0.0.1:0",
        ])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    // The JSON object spans lines; read until it closes.
    while !first.trim_end().ends_with('}') {
        assert!(
            out.read_line(&mut first).unwrap() > 0,
            "the relay printed nothing"
        );
    }
    let v: Value = serde_json::from_str(&first).unwrap();
    let listening = v["Listening"].as_str().unwrap();
    let url = format!("http://{}", listening.trim_start_matches("tcp:"));
    (Server { child: Some(child) }, url)
}

/// A TCP relay the test controls in front of `to`: it keeps every byte it
/// forwards, both ways. Returns its address.
fn capturing_tcp(to: &str, captured: Arc<Mutex<Vec<u8>>>) -> String {
    let to = to.trim_start_matches("http://").to_owned();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { continue };
            let Ok(outbound) = std::net::TcpStream::connect(&to) else {
                continue;
            };
            common::splice_capturing(inbound, outbound, captured.clone());
        }
    });
    format!("http://{addr}")
}

/// curl (an HTTP client no one here wrote): status, headers, body.
fn curl(args: &[&str], dir: &Path) -> (u16, String, Vec<u8>) {
    let body = dir.join(format!("curl-{}.out", rand_suffix()));
    let headers = dir.join(format!("curl-{}.headers", rand_suffix()));
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            s(&body),
            "-D",
            s(&headers),
            "-w",
            "%{http_code}",
        ])
        .args(args)
        .output()
        .expect("curl is installed");
    let status = String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0);
    (
        status,
        std::fs::read_to_string(&headers)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        std::fs::read(&body).unwrap_or_default(),
    )
}

fn rand_suffix() -> String {
    hex::encode(cloister_channel::new_nonce())
}

fn post(url: &str, body: &[u8], dir: &Path) -> (u16, String, Vec<u8>) {
    let file = dir.join(format!("post-{}.bin", rand_suffix()));
    std::fs::write(&file, body).unwrap();
    curl(
        &[
            "-X",
            "POST",
            "-H",
            "content-type: message/ohttp-req",
            "--data-binary",
            &format!("@{}", s(&file)),
            &format!("{url}/.well-known/ohttp-gateway"),
        ],
        dir,
    )
}

/// The enclave's document over `nonce`, fetched from the relay with curl.
fn document(url: &str, nonce: &[u8], dir: &Path) -> Vec<u8> {
    let (status, headers, doc) = curl(
        &[&format!(
            "{url}/.well-known/cloister-attestation?nonce={}",
            hex::encode(nonce)
        )],
        dir,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&doc));
    assert!(
        headers.contains("content-type: application/cose"),
        "{headers}"
    );
    doc
}

fn expectations(st: &Setup) -> cloister_channel::Expectations {
    cloister_channel::Expectations::from_root_pem(&std::fs::read(st.root()).unwrap())
        .unwrap()
        .pcr(0, hex::decode(&st.pcr0).unwrap())
}

#[test]
fn an_independent_python_client_scores_a_record_through_the_http_relay_and_the_parent_sees_ciphertext()
 {
    let st = setup();
    let (_relay, url) = relay(&st.h, "scorer");

    // The key configuration, for standard OHTTP clients (RFC 9540's path).
    let (status, headers, keys) = curl(
        &[&format!("{url}/.well-known/ohttp-gateway")],
        st.h.dir.path(),
    );
    assert_eq!(status, 200);
    assert!(
        headers.contains("content-type: application/ohttp-keys"),
        "{headers}"
    );
    assert_eq!(&keys[..2], &[0, 41], "one configuration of 41 bytes");
    assert_eq!(&keys[3..5], &[0, 0x20], "DHKEM(X25519, HKDF-SHA256)");
    // ... and it is the key the enclave's document binds.
    let nonce = cloister_channel::new_nonce();
    let enclave = cloister_channel::verify(
        &document(&url, &nonce, st.h.dir.path()),
        &nonce,
        &expectations(&st),
    )
    .unwrap();
    assert_eq!(enclave.key_config(), keys[2..]);

    let Some(python) =
        common::python_with_requirements("examples/attested-client/requirements.txt")
    else {
        return;
    };
    let captured = Arc::new(Mutex::new(Vec::new()));
    let front = capturing_tcp(&url, captured.clone());
    let client = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/attested-client/cloister_client.py");
    let run = |record: &[u8], pcr0: &str| {
        let mut child = Command::new(&python)
            .arg(&client)
            .args([
                "--relay",
                &front,
                "--root",
                s(&st.root()),
                "--expect-pcr",
                &format!("0={pcr0}"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(record).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(RECORD, &st.pcr0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scores = String::from_utf8(out.stdout).unwrap();
    assert_eq!(scores, format!("patient_id,risk_10y\n{}", score_of(RECORD)));

    // Refusals the Python client makes itself, with the same codes.
    let other = "00".repeat(48);
    let refused = run(RECORD, &other);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("error[E-ATTEST-PCR-MISMATCH]"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let malformed = run(b"patient-7731,F,12,212,47,141,1,0,1\n", &st.pcr0);
    let stderr = String::from_utf8_lossy(&malformed.stderr);
    assert!(
        stderr.contains("error[E-PHI-RECORD]") && stderr.contains("age 12"),
        "{stderr}"
    );

    let captured = captured.lock().unwrap();
    assert!(
        contains(&captured, b"message/ohttp-req"),
        "the capture saw the exchange"
    );
    let score = score_of(RECORD);
    let risk = score.trim().rsplit(',').next().unwrap();
    for secret in [MARKER, risk.as_bytes(), b"age 12", b",F,61,212"] {
        assert!(
            !contains(&captured, secret),
            "the parent's relay saw {:?} in the clear",
            String::from_utf8_lossy(secret)
        );
    }
}

#[test]
fn call_attested_verifies_first_and_the_control_socket_carries_only_ciphertext() {
    let st = setup();
    // The parent's side of the control socket, captured.
    let captured = Arc::new(Mutex::new(Vec::new()));
    let front = st.h.path("front.sock");
    common::capturing_relay(
        front.clone(),
        st.h.path("supervisor.sock"),
        captured.clone(),
    );
    let via_front = format!("unix:{}", s(&front));

    let expect = format!("0={}", st.pcr0);
    let out = st.attested_call(&via_front, "scorer", RECORD, &["--expect-pcr", &expect]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("patient_id,risk_10y\n{}", score_of(RECORD))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("verified enclave"));
    // The image file gives the same expectation (PCR0 and PCR2).
    let out = st.attested_call(
        &via_front,
        "scorer",
        RECORD,
        &["--expect-image", s(&st.image)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The workload's refusal travels encrypted too.
    let out = st.attested_call(
        &via_front,
        "scorer",
        b"patient-7731,F,61,212,47,999,1,0,1\n",
        &["--expect-pcr", &expect],
    );
    let message = failed_with(&out, "E-CHANNEL-REFUSED");
    assert!(
        message.contains("E-PHI-RECORD") && message.contains("systolic_bp 999"),
        "{message}"
    );
    {
        let seen = captured.lock().unwrap();
        assert!(!seen.is_empty());
        let score = score_of(RECORD);
        let risk = score.trim().rsplit(',').next().unwrap();
        for secret in [MARKER, risk.as_bytes(), b"systolic_bp 999"] {
            assert!(
                !contains(&seen, secret),
                "the control socket carried {:?}",
                String::from_utf8_lossy(secret)
            );
        }
    }
    // The same capture sees a plain call's record: it would have seen it above.
    let input = st.h.path("plain.csv");
    std::fs::write(&input, RECORD).unwrap();
    let plain = common::cloister_env(
        &["call", "--enclave-name", "scorer", "--input", s(&input)],
        &[("CLOISTER_SUPERVISOR", &via_front)],
    );
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    assert!(contains(&captured.lock().unwrap(), MARKER));
}

#[test]
fn clients_refuse_an_enclave_that_is_not_the_one_expected() {
    let st = setup();
    let sup = st.supervisor();
    let expect = format!("0={}", st.pcr0);

    let other = format!("0={}", "ab".repeat(48));
    failed_with(
        &st.attested_call(&sup, "scorer", RECORD, &["--expect-pcr", &other]),
        "E-ATTEST-PCR-MISMATCH",
    );
    let (other_image, _) = st.h.build_guest(
        "phi_scorer",
        "phi-scorer",
        "other.cimg",
        &["--config", "output-key-id=alias/elsewhere"],
    );
    failed_with(
        &st.attested_call(&sup, "scorer", RECORD, &["--expect-image", s(&other_image)]),
        "E-ATTEST-PCR-MISMATCH",
    );
    // Expecting nothing is not verifying.
    failed_with(
        &st.attested_call(&sup, "scorer", RECORD, &[]),
        "E-CHANNEL-EXPECTATION",
    );

    // A document signed under another platform's root.
    let stranger = st.h.path("stranger");
    st.h.ok(&["platform", "init", "--dir", s(&stranger)]);
    let input = st.h.path("r.csv");
    std::fs::write(&input, RECORD).unwrap();
    let out = common::cloister_env(
        &[
            "call",
            "--enclave-name",
            "scorer",
            "--input",
            s(&input),
            "--attested",
            "--root",
            s(&stranger.join("root.pem")),
            "--expect-pcr",
            &expect,
        ],
        &[("CLOISTER_SUPERVISOR", &sup)],
    );
    failed_with(&out, "E-ATTEST-UNTRUSTED-ROOT");

    // A debug-mode enclave of the same image: its parent reads its console.
    st.h.ok(&[
        "run-enclave",
        "--image",
        s(&st.image),
        "--enclave-name",
        "dbg",
        "--debug-mode",
    ]);
    failed_with(
        &st.attested_call(&sup, "dbg", RECORD, &["--expect-pcr", &expect]),
        "E-ATTEST-DEBUG-ENCLAVE",
    );
    let zeros = format!("0={}", "00".repeat(48));
    let allowed = st.attested_call(
        &sup,
        "dbg",
        RECORD,
        &["--expect-pcr", &zeros, "--allow-debug"],
    );
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );

    // A relay that answers with a document it kept from earlier: it answers
    // another challenge.
    let (_relay, url) = relay(&st.h, "scorer");
    let old_nonce = cloister_channel::new_nonce();
    let kept = document(&url, &old_nonce, st.h.dir.path());
    let e = cloister_channel::verify(&kept, &cloister_channel::new_nonce(), &expectations(&st))
        .unwrap_err();
    assert_eq!(cloister_proto::ErrorCode::code(&e), "E-ATTEST-NONCE", "{e}");
    // A document the relay altered (here: the nonce it answers): the NSM's
    // signature no longer covers it.
    let at = kept
        .windows(old_nonce.len())
        .position(|w| w == old_nonce)
        .expect("the nonce is in the payload");
    let mut forged = kept.clone();
    forged[at] ^= 1;
    let mut wanted = old_nonce;
    wanted[0] ^= 1;
    let e = cloister_channel::verify(&forged, &wanted, &expectations(&st)).unwrap_err();
    assert_eq!(
        cloister_proto::ErrorCode::code(&e),
        "E-ATTEST-SIGNATURE",
        "{e}"
    );
    // A document too old for the client.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let e = cloister_channel::verify(
        &kept,
        &old_nonce,
        &expectations(&st).max_age(std::time::Duration::from_secs(1)),
    )
    .unwrap_err();
    assert_eq!(cloister_proto::ErrorCode::code(&e), "E-ATTEST-STALE", "{e}");
}

#[test]
fn replayed_altered_and_misdirected_messages_are_refused() {
    let st = setup();
    let (_relay, url) = relay(&st.h, "scorer");
    let dir = st.h.dir.path();
    let nonce = cloister_channel::new_nonce();
    let enclave =
        cloister_channel::verify(&document(&url, &nonce, dir), &nonce, &expectations(&st)).unwrap();

    let (request, pending) = enclave.seal(RECORD).unwrap();
    let (status, headers, answer) = post(&url, &request, dir);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert!(
        headers.contains("content-type: message/ohttp-res"),
        "{headers}"
    );

    // The relay replays the request: refused, not answered twice.
    let (status, headers, body) = post(&url, &request, dir);
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert!(
        headers.contains("cloister-error: e-channel-replayed"),
        "{headers}"
    );

    // The relay alters a request: it does not open.
    let (fresh, _) = enclave.seal(RECORD).unwrap();
    let mut altered = fresh.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    let (status, headers, _) = post(&url, &altered, dir);
    assert_eq!(status, 400);
    assert!(
        headers.contains("cloister-error: e-channel-decrypt"),
        "{headers}"
    );
    // ... which does not burn the genuine request.
    let (status, _, _) = post(&url, &fresh, dir);
    assert_eq!(status, 200);

    // A key id the enclave never issued.
    let mut misdirected = enclave.seal(RECORD).unwrap().0;
    misdirected[0] ^= 0x80;
    let (status, headers, _) = post(&url, &misdirected, dir);
    assert_eq!(status, 422);
    assert!(
        headers.contains("cloister-error: e-channel-key-unknown"),
        "{headers}"
    );
    // Not an OHTTP request at all; the wrong media type; the wrong method.
    let (status, headers, _) = post(&url, b"hello", dir);
    assert_eq!(status, 400);
    assert!(
        headers.contains("cloister-error: e-channel-malformed"),
        "{headers}"
    );
    let (status, _, _) = curl(
        &[
            "-X",
            "POST",
            "-H",
            "content-type: text/plain",
            "--data-binary",
            "x",
            &format!("{url}/"),
        ],
        dir,
    );
    assert_eq!(status, 415);
    let (status, _, _) = curl(
        &["-X", "DELETE", &format!("{url}/.well-known/ohttp-gateway")],
        dir,
    );
    assert_eq!(status, 405);
    let (status, _, _) = curl(
        &[&format!("{url}/.well-known/cloister-attestation?nonce=zz")],
        dir,
    );
    assert_eq!(status, 400);

    // The relay alters the answer: the client refuses it.
    let mut tampered = answer.clone();
    tampered[40] ^= 1;
    let (again, pending_again) = enclave.seal(RECORD).unwrap();
    let (_, _, genuine) = post(&url, &again, dir);
    let e = pending.open(&tampered).unwrap_err();
    assert_eq!(
        cloister_proto::ErrorCode::code(&e),
        "E-CHANNEL-RESPONSE",
        "{e}"
    );
    assert_eq!(
        String::from_utf8(pending_again.open(&genuine).unwrap().to_vec()).unwrap(),
        format!("patient_id,risk_10y\n{}", score_of(RECORD))
    );
}
