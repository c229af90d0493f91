//! End to end through the `cloister` binary: platform init, the emulated NSM,
//! `attestation verify` on emulated and real AWS Nitro documents, `pcr`, `explain`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sha2::{Digest, Sha384};

mod common;
use common::{cloister, fails_with, ok_json, s};

const REAL_TIMESTAMP_MS: &str = "1722457107047";
const REAL_PCR0: &str = "a6cdfede5b1e7950de33218995add7d8f1f6e059c9cccd204316e69feaa2ce54f6f9ff6f5992db0f1ca6135f9b095b85";

fn real(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../attestation/testdata/nitro")
        .join(name)
        .display()
        .to_string()
}

struct Platform {
    dir: tempfile::TempDir,
}

impl Platform {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = ok_json(&[
            "platform",
            "init",
            "--dir",
            s(&dir.path().join("p")),
            "--name",
            "e2e",
        ]);
        assert_eq!(
            out["RootSubject"],
            "CN=Cloister Platform Root CA,OU=e2e,O=Cloister"
        );
        Platform { dir }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join("p").join(name)
    }
    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn dir(&self) -> String {
        s(&self.dir.path().join("p")).to_owned()
    }
    fn attest(&self, out: &str, extra: &[String]) -> PathBuf {
        let path = self.out(out);
        let mut args = strings(&[
            "platform",
            "attest",
            "--dir",
            &self.dir(),
            "--out",
            s(&path),
        ]);
        args.extend_from_slice(extra);
        ok_json(&args);
        path
    }
    fn verify(&self, doc: &Path, extra: &[String]) -> Output {
        let mut args = strings(&[
            "attestation",
            "verify",
            "--doc",
            s(doc),
            "--root",
            s(&self.p("root.pem")),
        ]);
        args.extend_from_slice(extra);
        cloister(&args)
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

#[test]
fn platform_init_makes_a_chain_openssl_accepts_and_private_keys_0600() {
    let p = Platform::new();
    for key in ["root.key", "nsm.key"] {
        let mode = std::fs::metadata(p.p(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    if Command::new("openssl").arg("version").output().is_ok() {
        let out = Command::new("openssl")
            .args(["verify", "-CAfile", s(&p.p("root.pem")), s(&p.p("nsm.pem"))])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // openssl must also reject the chain against a different root.
        let other = Platform::new();
        let out = Command::new("openssl")
            .args([
                "verify",
                "-CAfile",
                s(&other.p("root.pem")),
                s(&p.p("nsm.pem")),
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
    } else {
        eprintln!("openssl not installed: skipping the independent chain check");
    }

    // A second init never replaces the root.
    let root = std::fs::read(p.p("root.pem")).unwrap();
    fails_with(
        &["platform", "init", "--dir", &p.dir()],
        "E-PLATFORM-EXISTS",
    );
    assert_eq!(std::fs::read(p.p("root.pem")).unwrap(), root);

    // Renew issues a new NSM certificate under the same root.
    let before = std::fs::read(p.p("nsm.pem")).unwrap();
    ok_json(&[
        "platform",
        "renew",
        "--dir",
        &p.dir(),
        "--nsm-validity-hours",
        "2",
    ]);
    assert_ne!(std::fs::read(p.p("nsm.pem")).unwrap(), before);
    assert_eq!(std::fs::read(p.p("root.pem")).unwrap(), root);
}

#[test]
fn an_emulated_document_verifies_with_its_root() {
    let p = Platform::new();
    let pcr0 = "ab".repeat(48);
    std::fs::write(p.out("pk.bin"), [0x42u8; 32]).unwrap();
    let doc = p.attest(
        "doc.cose",
        &strings(&[
            "--pcr",
            &format!("0={pcr0}"),
            "--nonce",
            "0102",
            "--user-data",
            "cafe",
            "--public-key",
            s(&p.out("pk.bin")),
        ]),
    );
    let out = p.verify(
        &doc,
        &strings(&[
            "--expect-pcr",
            &format!("0={pcr0}"),
            "--max-age",
            "60",
            "--expect-nonce",
            "0102",
        ]),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["Verified"], true);
    assert_eq!(v["Algorithm"], "EdDSA");
    assert_eq!(v["PCRs"]["PCR0"], pcr0);
    assert_eq!(v["PCRs"]["PCR1"], "00".repeat(48));
    assert_eq!(v["PCRs"].as_object().unwrap().len(), 32);
    assert_eq!(v["Nonce"], "0102");
    assert_eq!(v["UserData"], "cafe");
    assert_eq!(v["PublicKey"], "42".repeat(32));
    assert_eq!(v["Debug"], false);
    assert_eq!(v["Chain"].as_array().unwrap().len(), 2);

    // A wrong expected PCR names the register.
    let out = p.verify(&doc, &[format!("--expect-pcr=0={}", "cd".repeat(48))]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error[E-ATTEST-PCR-MISMATCH]") && err.contains("PCR0 is abab"),
        "{err}"
    );

    // A document answering another challenge is refused.
    let out = p.verify(&doc, &strings(&["--expect-nonce", "0103"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error[E-ATTEST-NONCE]"));

    // Another platform's root does not vouch for it.
    let other = Platform::new();
    let out = other.verify(&doc, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("E-ATTEST-UNTRUSTED-ROOT"));
}

#[test]
fn one_changed_byte_in_the_document_or_its_chain_fails_verification() {
    let p = Platform::new();
    let doc_path = p.attest("doc.cose", &[]);
    let doc = std::fs::read(&doc_path).unwrap();
    assert!(p.verify(&doc_path, &[]).status.success());

    // Bytes spread over the whole document: headers, payload fields, the NSM
    // certificate, the root in the bundle, the signature.
    let tampered = p.out("tampered.cose");
    for i in (0..doc.len()).step_by(97).chain([doc.len() - 1]) {
        let mut bad = doc.clone();
        bad[i] ^= 0x20;
        std::fs::write(&tampered, &bad).unwrap();
        let out = p.verify(&tampered, &[]);
        assert!(
            !out.status.success(),
            "byte {i} changed and the document still verified"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("error[E-"),
            "byte {i}: no code"
        );
    }

    // The trusted root file changed by one byte (inside its base64 body).
    let root = std::fs::read_to_string(p.p("root.pem")).unwrap();
    let body_at = root.find('\n').unwrap() + 40;
    let mut bad_root = root.into_bytes();
    bad_root[body_at] = if bad_root[body_at] == b'A' {
        b'B'
    } else {
        b'A'
    };
    std::fs::write(p.out("bad-root.pem"), &bad_root).unwrap();
    let out = cloister(&[
        "attestation",
        "verify",
        "--doc",
        s(&doc_path),
        "--root",
        s(&p.out("bad-root.pem")),
    ]);
    assert!(!out.status.success(), "a changed root still verified");
}

#[test]
fn debug_documents_read_all_zeros_and_say_so() {
    let p = Platform::new();
    let doc = p.attest("dbg.cose", &strings(&["--debug"]));
    let v: Value = serde_json::from_slice(&p.verify(&doc, &[]).stdout).unwrap();
    assert_eq!(v["Debug"], true);
    assert!(
        v["PCRs"]
            .as_object()
            .unwrap()
            .values()
            .all(|x| x == &Value::String("00".repeat(48)))
    );
}

#[test]
fn bad_attest_inputs_fail_with_codes_and_write_nothing() {
    let p = Platform::new();
    let dir = p.dir.path().join("p");
    let out = p.out("never.cose");
    let big = "00".repeat(1025);
    let cases: &[(&[&str], &str)] = &[
        (&["--nonce", "zz"], "E-CLI-USAGE"),
        (&["--pcr", "0=abcd"], "E-CLI-USAGE"),
        (&["--pcr", "32=00"], "E-CLI-USAGE"),
        (&["--pcr", "16"], "E-CLI-USAGE"),
        (&["--nonce", &big], "E-ATTEST-FIELD-TOO-LARGE"),
        (&["--user-data", &big], "E-ATTEST-FIELD-TOO-LARGE"),
    ];
    for (extra, code) in cases {
        let mut args = vec!["platform", "attest", "--dir", s(&dir), "--out", s(&out)];
        args.extend_from_slice(extra);
        fails_with(&args, code);
        assert!(!out.exists(), "{extra:?} left an output file");
    }
    fails_with(
        &[
            "platform",
            "attest",
            "--dir",
            s(&p.out("no-platform")),
            "--out",
            s(&out),
        ],
        "E-PLATFORM-MISSING",
    );
    assert!(!out.exists());
}

#[test]
fn an_expired_nsm_certificate_is_reported_by_the_verifier() {
    let p = Platform::new();
    ok_json(&[
        "platform",
        "renew",
        "--dir",
        &p.dir(),
        "--nsm-validity-hours",
        "1",
    ]);
    let doc = p.attest("doc.cose", &[]);
    let later = (std::time::SystemTime::now() + std::time::Duration::from_secs(7200))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let out = p.verify(&doc, &strings(&["--at", &later]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("E-ATTEST-CERTIFICATE-EXPIRED"));
}

#[test]
fn real_aws_nitro_documents() {
    let v = ok_json(&[
        "attestation",
        "verify",
        "--doc",
        &real("real-production.cose"),
        "--aws-nitro-root",
        "--at",
        REAL_TIMESTAMP_MS,
        "--expect-pcr",
        &format!("0={REAL_PCR0}"),
    ]);
    assert_eq!(v["Algorithm"], "ES384");
    assert_eq!(v["ModuleId"], "i-0809070ca8037095f-enc01910a70380dca7e");
    assert_eq!(v["TimestampUtc"], "2024-07-31T20:18:27.047Z");
    assert_eq!(v["PCRs"]["PCR0"], REAL_PCR0);
    assert_eq!(v["PCRs"].as_object().unwrap().len(), 16);
    assert_eq!(v["TrustAnchor"], "aws-nitro-enclaves-root");

    // The same instant in RFC 3339.
    ok_json(&[
        "attestation",
        "verify",
        "--doc",
        &real("real-production.cose"),
        "--aws-nitro-root",
        "--at",
        "2024-07-31T20:18:27.047Z",
    ]);
    // Today its certificates have expired.
    fails_with(
        &[
            "attestation",
            "verify",
            "--doc",
            &real("real-production.cose"),
            "--aws-nitro-root",
        ],
        "E-ATTEST-CERTIFICATE-EXPIRED",
    );
    // Nothing is trusted by default.
    fails_with(
        &[
            "attestation",
            "verify",
            "--doc",
            &real("real-production.cose"),
            "--at",
            REAL_TIMESTAMP_MS,
        ],
        "E-ATTEST-NO-TRUST-ANCHOR",
    );
    // The tampered one fails on its signature at its own time.
    fails_with(
        &[
            "attestation",
            "verify",
            "--doc",
            &real("real-bad-signature.cose"),
            "--aws-nitro-root",
            "--at",
            "1721770180771",
        ],
        "E-ATTEST-SIGNATURE",
    );
    fails_with(
        &[
            "attestation",
            "verify",
            "--doc",
            &real("real-production.cose"),
            "--aws-nitro-root",
            "--at",
            "yesterday",
        ],
        "E-CLI-USAGE",
    );
}

#[test]
fn pcr_command_follows_the_recipes() {
    let v = ok_json(&[
        "pcr",
        "--string",
        "arn:aws:iam::123456789012:role/Webserver",
    ]);
    assert!(v["PCR"].as_str().unwrap().starts_with("78fce75d"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("component.wasm");
    std::fs::write(&file, b"\0asm\x01\0\0\0").unwrap();
    let mut h = Sha384::new();
    h.update([0u8; 48]);
    h.update(Sha384::digest(b"\0asm\x01\0\0\0"));
    let v = ok_json(&["pcr", "--input", s(&file)]);
    assert_eq!(v["PCR"], hex_lower(&h.finalize()));

    let p = Platform::new();
    let der = cloister_attestation::nsm::read_pem_certificates(&p.p("nsm.pem"))
        .unwrap()
        .remove(0);
    let mut h = Sha384::new();
    h.update([0u8; 48]);
    h.update(Sha384::digest(&der));
    let v = ok_json(&["pcr", "--signing-certificate", s(&p.p("nsm.pem"))]);
    assert_eq!(v["PCR"], hex_lower(&h.finalize()));

    fails_with(
        &["pcr", "--signing-certificate", s(&file)],
        "E-KEYFILE-FORMAT",
    );
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn explain_knows_every_code_it_prints() {
    let out = cloister(&["explain", "e-attest-chain"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("E-ATTEST-CHAIN: "));
    fails_with(&["explain", "E-NOT-A-CODE"], "E-CLI-USAGE");
}

/// The standard output of a tool that must succeed.
fn stdout_of(out: std::io::Result<Output>) -> String {
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn keygen_writes_keys_that_openssl_and_python_cryptography_read() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    let public = dir.path().join("k.pub");
    ok_json(&[
        "keygen",
        "--private-key",
        s(&key),
        "--public-key",
        s(&public),
    ]);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public_pem = std::fs::read_to_string(&public).unwrap();
    // PKCS#8 v1 (version 0, no public key inside), as RFC 8410 shows it.
    let pem = std::fs::read_to_string(&key).unwrap();
    let der = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        pem.lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>(),
    )
    .unwrap();
    assert_eq!(der.len(), 48, "an RFC 8410 v1 Ed25519 key is 48 bytes");
    assert_eq!(&der[..5], &[0x30, 0x2e, 0x02, 0x01, 0x00]);
    if Command::new("openssl").arg("version").output().is_ok() {
        let out = Command::new("openssl")
            .args(["pkey", "-pubout", "-in", s(&key)])
            .output();
        assert_eq!(stdout_of(out), public_pem);
    } else {
        eprintln!("openssl not installed: skipping its check");
    }
    if let Some(python) = common::python_with(&["cryptography==44.0.0"]) {
        let script = r#"
import sys
from cryptography.hazmat.primitives import serialization as s
key = s.load_pem_private_key(open(sys.argv[1], "rb").read(), password=None)
sys.stdout.write(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo).decode())
"#;
        let out = Command::new(python).args(["-c", script, s(&key)]).output();
        assert_eq!(stdout_of(out), public_pem);
    }
}
