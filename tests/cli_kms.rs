//! The key broker end to end: `cloister kms serve` as its own process, the CLI
//! as its clients, a real platform's attestation documents, an independent HPKE
//! implementation to open CiphertextForRecipient, crash and tamper tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

mod common;
use common::{Server, cloister, cloister_env, failed_with, free_port, json_of, ok_json, s};

const ALLOW_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}"#;

fn b64d(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 string"))
        .unwrap()
}

struct Kms {
    dir: tempfile::TempDir,
    server: Option<Server>,
    /// More options of `kms serve`.
    serve_args: Vec<String>,
}

impl Kms {
    fn start() -> Kms {
        Kms::start_with(&[])
    }
    fn start_with(serve_args: &[&str]) -> Kms {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("kms");
        let init = ok_json(&["kms", "init", "--data-dir", s(&data)]);
        assert_eq!(init["AdminPrincipal"], "admin");
        let mut kms = Kms {
            dir,
            server: None,
            serve_args: serve_args.iter().map(|a| a.to_string()).collect(),
        };
        kms.serve();
        kms
    }
    fn serve(&mut self) {
        let sock = self.sock();
        let mut args = vec![
            "kms".to_owned(),
            "serve".into(),
            "--data-dir".into(),
            s(&self.data()).into(),
            "--listen".into(),
            format!("unix:{}", s(&sock)),
        ];
        args.extend(self.serve_args.iter().cloned());
        self.server = Some(Server::start(&args, &[], &sock));
    }
    fn data(&self) -> PathBuf {
        self.dir.path().join("kms")
    }
    fn sock(&self) -> PathBuf {
        self.dir.path().join("kms.sock")
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn endpoint(&self) -> String {
        format!("unix:{}", s(&self.sock()))
    }
    /// Runs a client command as a principal (credentials from the environment, as a user would).
    fn run_as(&self, principal: &str, key: &Path, args: &[&str]) -> Output {
        cloister_env(
            args,
            &[
                ("CLOISTER_KMS_ENDPOINT", &self.endpoint()),
                ("CLOISTER_PRINCIPAL", principal),
                ("CLOISTER_PRINCIPAL_KEY", s(key)),
            ],
        )
    }
    fn admin(&self, args: &[&str]) -> Value {
        json_of(
            &self.run_as("admin", &self.data().join("admin.key"), args),
            &format!("admin {args:?}"),
        )
    }
    /// Makes a key pair (with openssl where it exists, to prove compatibility) and registers it.
    /// An emulated platform in `platform/`, its root trusted as `lab`.
    fn trust_a_platform(&self) {
        ok_json(&["platform", "init", "--dir", s(&self.path("platform"))]);
        self.admin(&[
            "kms",
            "trust",
            "add",
            "--root",
            s(&self.path("platform/root.pem")),
            "--label",
            "lab",
        ]);
    }

    fn add_principal(&self, name: &str, policy: &str) -> PathBuf {
        let file: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let key = self.path(&format!("{file}.key"));
        let public = self.path(&format!("{file}.pub"));
        let openssl = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out", s(&key)])
            .status()
            .is_ok_and(|st| st.success());
        if openssl {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(
                std::process::Command::new("openssl")
                    .args(["pkey", "-in", s(&key), "-pubout", "-out", s(&public)])
                    .status()
                    .unwrap()
                    .success()
            );
        } else {
            let k = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
            cloister_attestation::keyfile::write_signing_key(&key, &k, false).unwrap();
            std::fs::write(
                &public,
                cloister_attestation::keyfile::verifying_key_pem(&k.verifying_key()),
            )
            .unwrap();
        }
        let policy_file = self.path(&format!("{file}-identity.json"));
        std::fs::write(&policy_file, policy).unwrap();
        self.admin(&[
            "kms",
            "principal",
            "add",
            "--name",
            name,
            "--public-key",
            s(&public),
            "--policy",
            &format!("file://{}", s(&policy_file)),
        ]);
        key
    }
    fn stop(&mut self) {
        let (status, stderr) = self.server.take().unwrap().terminate();
        assert!(status.success(), "broker exit {status}: {stderr}");
    }
    fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.data().join("audit.log"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// An X25519 recipient key pair from hpke-rs, an HPKE implementation independent of the broker's.
struct IndependentRecipient {
    hpke: hpke_rs::Hpke<hpke_rs_rust_crypto::HpkeRustCrypto>,
    pair: hpke_rs::HpkeKeyPair,
}

impl IndependentRecipient {
    fn new() -> Self {
        use hpke_rs::hpke_types::{AeadAlgorithm, KdfAlgorithm, KemAlgorithm};
        let mut hpke = hpke_rs::Hpke::<hpke_rs_rust_crypto::HpkeRustCrypto>::new(
            hpke_rs::Mode::Base,
            KemAlgorithm::DhKem25519,
            KdfAlgorithm::HkdfSha256,
            AeadAlgorithm::Aes256Gcm,
        );
        let pair = hpke.generate_key_pair().unwrap();
        IndependentRecipient { hpke, pair }
    }
    fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_slice().to_vec()
    }
    /// Opens CiphertextForRecipient = enc (32) || ct, with the response's info and aad.
    fn open(&self, out: &Value) -> Vec<u8> {
        let ct = b64d(&out["CiphertextForRecipient"]);
        let info = b64d(&out["RecipientInfo"]);
        // RecipientInfo binds the request id, which the output shows.
        let id = out["RequestId"]
            .as_str()
            .expect("the output shows RequestId");
        assert!(info.ends_with(id.as_bytes()) && id.len() == 32, "{out}");
        let aad = b64d(&out["RecipientAad"]);
        self.hpke
            .open(
                &ct[..32],
                self.pair.private_key(),
                &info,
                &aad,
                &ct[32..],
                None,
                None,
                None,
            )
            .expect("an RFC 9180 implementation opens it")
    }
}

fn attest(
    kms: &Kms,
    name: &str,
    pcrs: &[(usize, String)],
    public_key: &[u8],
    debug: bool,
) -> PathBuf {
    let pk = kms.path(&format!("{name}.pk"));
    std::fs::write(&pk, public_key).unwrap();
    let out = kms.path(&format!("{name}.cose"));
    let mut args = vec![
        "platform".to_string(),
        "attest".into(),
        "--dir".into(),
        s(&kms.path("platform")).into(),
        "--public-key".into(),
        s(&pk).into(),
        "--out".into(),
        s(&out).into(),
    ];
    if debug {
        args.push("--debug".into());
    }
    for (i, v) in pcrs {
        args.push("--pcr".into());
        args.push(format!("{i}={v}"));
    }
    ok_json(&args);
    out
}

fn pcr_of(data: &[u8], kms: &Kms, name: &str) -> String {
    let f = kms.path(name);
    std::fs::write(&f, data).unwrap();
    ok_json(&["pcr", "--input", s(&f)])["PCR"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// An enclave's RSA key pair as the AWS Nitro Enclaves SDK makes one (PEM
/// private key at the returned path, and the SubjectPublicKeyInfo DER);
/// `None`, said, without openssl.
fn enclave_rsa_key(kms: &Kms) -> Option<(PathBuf, Vec<u8>)> {
    let key = kms.path("enclave-rsa.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .output();
    if !made.is_ok_and(|o| o.status.success()) {
        eprintln!("skipping: openssl is not installed");
        return None;
    }
    let spki = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .unwrap()
        .stdout;
    Some((key, spki))
}

/// `openssl cms -decrypt` of a CiphertextForRecipient with the enclave's key.
fn open_cms(kms: &Kms, key: &Path, cms: &[u8]) -> Vec<u8> {
    let ct = kms.path("cms.ber");
    std::fs::write(&ct, cms).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["cms", "-decrypt", "-binary", "-inform", "DER", "-in"])
        .arg(&ct)
        .arg("-inkey")
        .arg(key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn an_rsa_recipient_gets_the_key_as_aws_cms_that_openssl_opens() {
    let kms = Kms::start();
    kms.trust_a_platform();
    let Some((key, spki)) = enclave_rsa_key(&kms) else {
        return;
    };
    let role = "arn:aws:iam::123456789012:role/Enclave";
    let parent = kms.add_principal(role, ALLOW_ALL);
    let image = pcr_of(b"enclave image", &kms, "image.bin");
    let policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[
          {{"Effect":"Allow","Principal":{{"AWS":"{role}"}},"Action":["kms:CreateKey","kms:Encrypt"],"Resource":"*"}},
          {{"Effect":"Allow","Principal":{{"AWS":"{role}"}},"Action":["kms:Decrypt","kms:GenerateDataKey"],"Resource":"*",
            "Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"{image}"}}}}}}]}}"#
    );
    std::fs::write(kms.path("policy.json"), &policy).unwrap();
    let created = json_of(
        &kms.run_as(
            role,
            &parent,
            &[
                "kms",
                "create-key",
                "--policy",
                &format!("file://{}", s(&kms.path("policy.json"))),
            ],
        ),
        "create-key",
    );
    let key_id = created["KeyMetadata"]["KeyId"].as_str().unwrap().to_owned();
    std::fs::write(kms.path("secret"), b"the data key").unwrap();
    let enc = json_of(
        &kms.run_as(
            role,
            &parent,
            &[
                "kms",
                "encrypt",
                "--key-id",
                &key_id,
                "--plaintext",
                &format!("fileb://{}", s(&kms.path("secret"))),
            ],
        ),
        "encrypt",
    );
    std::fs::write(kms.path("blob"), b64d(&enc["CiphertextBlob"])).unwrap();
    let blob = format!("fileb://{}", s(&kms.path("blob")));
    let rsa_doc = attest(&kms, "rsa", &[(0, image.clone())], &spki, false);
    let recipient = |algorithm: &str, doc: &Path| {
        format!(
            "KeyEncryptionAlgorithm={algorithm},AttestationDocument=fileb://{}",
            s(doc)
        )
    };
    // kms decrypt of the blob for a Recipient.
    let decrypt = |algorithm: &str, doc: &Path| {
        kms.run_as(
            role,
            &parent,
            &[
                "kms",
                "decrypt",
                "--ciphertext-blob",
                &blob,
                "--recipient",
                &recipient(algorithm, doc),
            ],
        )
    };
    let open = |cms: &[u8]| open_cms(&kms, &key, cms);

    let out = json_of(
        &decrypt("RSAES_OAEP_SHA_256", &rsa_doc),
        "decrypt for an RSA recipient",
    );
    assert!(out.get("Plaintext").is_none(), "{out}");
    assert!(
        out.get("RecipientInfo").is_none(),
        "AWS's form has no HPKE info: {out}"
    );
    assert_eq!(open(&b64d(&out["CiphertextForRecipient"])), b"the data key");
    let generated = json_of(
        &kms.run_as(
            role,
            &parent,
            &[
                "kms",
                "generate-data-key",
                "--key-id",
                &key_id,
                "--recipient",
                &recipient("RSAES_OAEP_SHA_256", &rsa_doc),
            ],
        ),
        "generate-data-key for an RSA recipient",
    );
    assert_eq!(open(&b64d(&generated["CiphertextForRecipient"])).len(), 32);

    // The policy still decides (another image), and each algorithm wants its key.
    let other = attest(&kms, "other", &[(0, "ab".repeat(48))], &spki, false);
    failed_with(
        &decrypt("RSAES_OAEP_SHA_256", &other),
        "E-KMS-ACCESS-DENIED",
    );
    let x25519_doc = attest(&kms, "x25519", &[(0, image.clone())], &[0x42; 32], false);
    let e = failed_with(
        &decrypt("RSAES_OAEP_SHA_256", &x25519_doc),
        "E-KMS-VALIDATION",
    );
    assert!(e.contains("RSA SubjectPublicKeyInfo"), "{e}");
    failed_with(
        &decrypt("HPKE-Base-X25519-SHA256-AES256GCM", &rsa_doc),
        "E-KMS-VALIDATION",
    );
    let e = failed_with(&decrypt("RSAES_OAEP_SHA_1", &rsa_doc), "E-KMS-VALIDATION");
    assert!(e.contains("RSAES_OAEP_SHA_256"), "{e}");
}

#[test]
fn a_key_pinned_to_an_image_is_released_only_to_that_enclave() {
    let mut kms = Kms::start();
    ok_json(&["platform", "init", "--dir", s(&kms.path("platform"))]);
    let trust = kms.admin(&[
        "kms",
        "trust",
        "add",
        "--root",
        s(&kms.path("platform/root.pem")),
        "--label",
        "lab",
    ]);
    assert_eq!(trust, serde_json::json!({}));
    let roots = kms.admin(&["kms", "trust", "list"]);
    assert_eq!(roots["TrustRoots"][0]["Label"], "lab");

    let owner = kms.add_principal("owner", ALLOW_ALL);
    let role = "arn:aws:iam::123456789012:role/Scorer";
    let parent = kms.add_principal(role, ALLOW_ALL);
    let image = pcr_of(b"scorer image v1", &kms, "image.bin");
    let role_pcr = ok_json(&["pcr", "--string", role])["PCR"]
        .as_str()
        .unwrap()
        .to_owned();
    let policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[
          {{"Sid":"Owner","Effect":"Allow","Principal":{{"AWS":"owner"}},"Action":["kms:CreateKey","kms:Encrypt","kms:DescribeKey","kms:GetKeyPolicy"],"Resource":"*"}},
          {{"Sid":"ScorerEnclave","Effect":"Allow","Principal":{{"AWS":"{role}"}},"Action":"kms:Decrypt","Resource":"*",
            "Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"{image}","kms:RecipientAttestation:PCR3":"{role_pcr}"}}}}}}]}}"#
    );
    std::fs::write(kms.path("key-policy.json"), &policy).unwrap();
    let lint = cloister(&[
        "kms",
        "lint-policy",
        &format!("file://{}", s(&kms.path("key-policy.json"))),
    ]);
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stdout)
    );

    let created = json_of(
        &kms.run_as(
            "owner",
            &owner,
            &[
                "kms",
                "create-key",
                "--description",
                "PHI",
                "--policy",
                &format!("file://{}", s(&kms.path("key-policy.json"))),
            ],
        ),
        "create-key",
    );
    let key_id = created["KeyMetadata"]["KeyId"].as_str().unwrap().to_owned();
    std::fs::write(kms.path("secret.txt"), b"the data key").unwrap();
    let enc = json_of(
        &kms.run_as(
            "owner",
            &owner,
            &[
                "kms",
                "encrypt",
                "--key-id",
                &key_id,
                "--plaintext",
                &format!("fileb://{}", s(&kms.path("secret.txt"))),
                "--encryption-context",
                "study=framingham",
            ],
        ),
        "encrypt",
    );
    std::fs::write(kms.path("blob"), b64d(&enc["CiphertextBlob"])).unwrap();
    let blob_arg = format!("fileb://{}", s(&kms.path("blob")));

    let decrypt = |doc: Option<&Path>| {
        let mut args = vec![
            "kms",
            "decrypt",
            "--ciphertext-blob",
            &blob_arg,
            "--encryption-context",
            "study=framingham",
        ];
        let recipient;
        if let Some(d) = doc {
            recipient = format!(
                "KeyEncryptionAlgorithm=HPKE-Base-X25519-SHA256-AES256GCM,AttestationDocument=fileb://{}",
                s(d)
            );
            args.push("--recipient");
            args.push(&recipient);
        }
        kms.run_as(role, &parent, &args)
    };

    // The enclave of that image, launched by that role: the key comes back only wrapped.
    let r = IndependentRecipient::new();
    let good = attest(
        &kms,
        "good",
        &[(0, image.clone()), (3, role_pcr.clone())],
        &r.public_key(),
        false,
    );
    let out = json_of(&decrypt(Some(&good)), "attested decrypt");
    assert!(
        out.get("Plaintext").is_none(),
        "plaintext must never accompany a recipient: {out}"
    );
    assert_eq!(r.open(&out), b"the data key");
    assert_eq!(
        b64d(&out["RecipientAad"]),
        sha384(&std::fs::read(&good).unwrap())
    );

    // Refusals, each with its reason.
    let stderr = failed_with(&decrypt(None), "E-KMS-ACCESS-DENIED");
    assert!(
        stderr.contains("no kms:RecipientAttestation:ImageSha384 (no attestation document)"),
        "{stderr}"
    );
    let modified = pcr_of(b"scorer image v1 + backdoor", &kms, "image2.bin");
    let bad_image = attest(
        &kms,
        "modified",
        &[(0, modified.clone()), (3, role_pcr.clone())],
        &r.public_key(),
        false,
    );
    let stderr = failed_with(&decrypt(Some(&bad_image)), "E-KMS-ACCESS-DENIED");
    assert!(
        stderr.contains(&format!("the request has \"{modified}\"")),
        "{stderr}"
    );
    let wrong_role = attest(
        &kms,
        "wrong-role",
        &[(0, image.clone()), (3, "00".repeat(48))],
        &r.public_key(),
        false,
    );
    let stderr = failed_with(&decrypt(Some(&wrong_role)), "E-KMS-ACCESS-DENIED");
    assert!(stderr.contains("kms:RecipientAttestation:PCR3"), "{stderr}");
    let debug = attest(&kms, "debug", &[], &r.public_key(), true);
    failed_with(&decrypt(Some(&debug)), "E-KMS-ACCESS-DENIED");
    // The owner itself cannot decrypt: no statement gives it kms:Decrypt.
    let stderr = failed_with(
        &kms.run_as(
            "owner",
            &owner,
            &[
                "kms",
                "decrypt",
                "--ciphertext-blob",
                &blob_arg,
                "--encryption-context",
                "study=framingham",
            ],
        ),
        "E-KMS-ACCESS-DENIED",
    );
    assert!(stderr.contains("key policy"), "{stderr}");

    // The audit log has each decision with its reason and the recipient's PCR0.
    let lines = kms.audit_lines();
    let decrypts: Vec<&Value> = lines
        .iter()
        .filter(|l| l["action"] == "kms:Decrypt")
        .collect();
    assert_eq!(decrypts.len(), 6);
    assert_eq!(decrypts[0]["decision"], "Allow");
    assert_eq!(decrypts[0]["recipient_pcr0"], image.as_str());
    assert_eq!(decrypts[2]["decision"], "Deny");
    assert_eq!(decrypts[2]["recipient_pcr0"], modified.as_str());
    assert!(
        decrypts[2]["reason"]
            .as_str()
            .unwrap()
            .contains("ImageSha384")
    );

    // Graceful stop writes a signed shutdown checkpoint; the log verifies.
    kms.stop();
    assert_eq!(kms.audit_lines().last().unwrap()["type"], "shutdown");
    let v = ok_json(&["kms", "audit", "verify", "--data-dir", s(&kms.data())]);
    assert_eq!(v["Verified"], true);
}

fn sha384(b: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha384::digest(b).to_vec()
}

#[test]
fn key_lifecycle_through_the_cli() {
    let mut kms = Kms::start();
    // The keystore (and SQLite's files beside it), the audit log and its head
    // are readable by the broker's user alone; files an older version made
    // 0644 are made so when the broker opens its data directory.
    use std::os::unix::fs::PermissionsExt;
    let owner_only = |kms: &Kms| {
        for file in ["keystore.db", "keystore.db-wal", "audit.log", "audit.head"] {
            let mode = std::fs::metadata(kms.data().join(file))
                .unwrap_or_else(|e| panic!("{file}: {e}"))
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file} is {:o}", mode & 0o777);
        }
    };
    owner_only(&kms);
    kms.stop();
    for file in ["keystore.db", "audit.log", "audit.head"] {
        std::fs::set_permissions(
            kms.data().join(file),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    kms.serve();
    owner_only(&kms);
    let app = kms.add_principal("app", ALLOW_ALL);
    let run = |args: &[&str]| kms.run_as("app", &app, args);
    let key = json_of(&run(&["kms", "create-key"]), "create")["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    json_of(
        &run(&[
            "kms",
            "create-alias",
            "--alias-name",
            "alias/phi",
            "--target-key-id",
            &key,
        ]),
        "alias",
    );
    let aliases = json_of(&run(&["kms", "list-aliases"]), "aliases");
    assert_eq!(aliases["Aliases"][0]["TargetKeyId"], key.as_str());
    let keys = json_of(&run(&["kms", "list-keys"]), "keys");
    assert_eq!(keys["Keys"].as_array().unwrap().len(), 1);

    let enc = json_of(
        &run(&[
            "kms",
            "encrypt",
            "--key-id",
            "alias/phi",
            "--plaintext",
            "v1 secret",
        ]),
        "encrypt",
    );
    std::fs::write(kms.path("v1.blob"), b64d(&enc["CiphertextBlob"])).unwrap();
    let v1 = format!("fileb://{}", s(&kms.path("v1.blob")));
    let rot = json_of(&run(&["kms", "rotate-key", "--key-id", &key]), "rotate");
    assert_eq!(rot["CurrentKeyVersion"], 2);
    let dec = json_of(
        &run(&["kms", "decrypt", "--ciphertext-blob", &v1]),
        "decrypt v1 after rotation",
    );
    assert_eq!(b64d(&dec["Plaintext"]), b"v1 secret");

    // Re-encrypt under a second key with a new context.
    let key2 = json_of(&run(&["kms", "create-key"]), "create")["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    let re = json_of(
        &run(&[
            "kms",
            "re-encrypt",
            "--ciphertext-blob",
            &v1,
            "--destination-key-id",
            &key2,
            "--destination-encryption-context",
            "a=b",
        ]),
        "re-encrypt",
    );
    std::fs::write(kms.path("v2.blob"), b64d(&re["CiphertextBlob"])).unwrap();
    let v2 = format!("fileb://{}", s(&kms.path("v2.blob")));
    failed_with(
        &run(&["kms", "decrypt", "--ciphertext-blob", &v2]),
        "E-KMS-INVALID-CIPHERTEXT",
    );
    failed_with(
        &run(&[
            "kms",
            "decrypt",
            "--ciphertext-blob",
            &v2,
            "--encryption-context",
            "a=b",
            "--key-id",
            &key,
        ]),
        "E-KMS-INCORRECT-KEY",
    );
    json_of(
        &run(&[
            "kms",
            "decrypt",
            "--ciphertext-blob",
            &v2,
            "--encryption-context",
            "a=b",
        ]),
        "decrypt re-encrypted",
    );

    // Data keys and random bytes.
    let dk = json_of(&run(&["kms", "generate-data-key", "--key-id", &key]), "gdk");
    assert_eq!(b64d(&dk["Plaintext"]).len(), 32);
    let rnd = json_of(
        &run(&["kms", "generate-random", "--number-of-bytes", "48"]),
        "random",
    );
    assert_eq!(b64d(&rnd["Plaintext"]).len(), 48);
    failed_with(
        &run(&["kms", "generate-random", "--number-of-bytes", "0"]),
        "E-KMS-VALIDATION",
    );
    failed_with(
        &run(&[
            "kms",
            "generate-data-key",
            "--key-id",
            &key,
            "--key-spec",
            "RSA_2048",
        ]),
        "E-KMS-VALIDATION",
    );

    // States.
    json_of(&run(&["kms", "disable-key", "--key-id", &key]), "disable");
    failed_with(
        &run(&["kms", "decrypt", "--ciphertext-blob", &v1]),
        "E-KMS-DISABLED",
    );
    json_of(&run(&["kms", "enable-key", "--key-id", &key]), "enable");
    let stderr = failed_with(
        &run(&[
            "kms",
            "schedule-key-deletion",
            "--key-id",
            &key,
            "--pending-window-in-days",
            "6",
        ]),
        "E-KMS-VALIDATION",
    );
    assert!(stderr.contains("7 to 30"), "{stderr}");
    let del = json_of(
        &run(&[
            "kms",
            "schedule-key-deletion",
            "--key-id",
            &key,
            "--pending-window-in-days",
            "7",
        ]),
        "schedule",
    );
    assert_eq!(del["KeyState"], "PendingDeletion");
    failed_with(
        &run(&["kms", "decrypt", "--ciphertext-blob", &v1]),
        "E-KMS-INVALID-STATE",
    );
    json_of(
        &run(&["kms", "cancel-key-deletion", "--key-id", &key]),
        "cancel",
    );
    let d = json_of(
        &run(&["kms", "describe-key", "--key-id", "alias/phi"]),
        "describe",
    );
    assert_eq!(d["KeyMetadata"]["KeyState"], "Disabled");

    // Policies: invalid ones are refused with the reason at put time.
    std::fs::write(kms.path("bad.json"), r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"StringEquals":{"aws:SourceIp":"1.2.3.4"}}}}"#).unwrap();
    let stderr = failed_with(
        &run(&[
            "kms",
            "put-key-policy",
            "--key-id",
            &key,
            "--policy",
            &format!("file://{}", s(&kms.path("bad.json"))),
        ]),
        "E-KMS-VALIDATION",
    );
    assert!(
        stderr.contains("condition key \"aws:SourceIp\" is not known"),
        "{stderr}"
    );
    let p = json_of(
        &run(&["kms", "get-key-policy", "--key-id", &key]),
        "get policy",
    );
    assert!(p["Policy"].as_str().unwrap().contains("CreatorFullAccess"));

    // Not found, malformed input.
    failed_with(
        &run(&["kms", "describe-key", "--key-id", "alias/none"]),
        "E-KMS-NOT-FOUND",
    );
    failed_with(
        &run(&["kms", "describe-key", "--key-id", "not-a-key"]),
        "E-KMS-VALIDATION",
    );
    std::fs::write(kms.path("junk.blob"), b"CKB\x01short").unwrap();
    failed_with(
        &run(&[
            "kms",
            "decrypt",
            "--ciphertext-blob",
            &format!("fileb://{}", s(&kms.path("junk.blob"))),
        ]),
        "E-KMS-INVALID-CIPHERTEXT",
    );
    // Non-admins cannot administer.
    failed_with(&run(&["kms", "principal", "list"]), "E-KMS-ACCESS-DENIED");
}

#[test]
fn unknown_principals_and_wrong_keys_are_refused() {
    let kms = Kms::start();
    let app = kms.add_principal("app", ALLOW_ALL);
    let stderr = failed_with(
        &kms.run_as("nobody", &app, &["kms", "list-keys"]),
        "E-KMS-INVALID-SIGNATURE",
    );
    assert!(stderr.contains("unknown principal"), "{stderr}");
    let stderr = failed_with(
        &kms.run_as("app", &kms.data().join("admin.key"), &["kms", "list-keys"]),
        "E-KMS-INVALID-SIGNATURE",
    );
    assert!(stderr.contains("does not verify"), "{stderr}");
    // Every refusal is in the audit log.
    let denials = kms
        .audit_lines()
        .into_iter()
        .filter(|l| l["decision"] == "Deny")
        .count();
    assert_eq!(denials, 2);
}

#[test]
fn lint_policy_flags_the_nitro_pitfall() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.json");
    std::fs::write(
        &p,
        r#"{"Version":"2012-10-17","Statement":[
          {"Sid":"Enclave","Effect":"Allow","Principal":{"AWS":"parent"},"Action":"kms:Decrypt","Resource":"*","Condition":{"StringEqualsIgnoreCase":{"kms:RecipientAttestation:PCR0":"ab"}}},
          {"Sid":"Admins","Effect":"Allow","Principal":{"AWS":"parent"},"Action":"kms:*","Resource":"*"}]}"#,
    )
    .unwrap();
    let out = cloister(&["kms", "lint-policy", &format!("file://{}", s(&p))]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["Warnings"][0]
            .as_str()
            .unwrap()
            .contains("statement \"Admins\" allows kms:Decrypt without attestation conditions"),
        "{v}"
    );
}

#[test]
fn tampering_with_the_audit_log_is_detected() {
    let mut kms = Kms::start();
    let app = kms.add_principal("app", ALLOW_ALL);
    for _ in 0..3 {
        json_of(&kms.run_as("app", &app, &["kms", "create-key"]), "create");
    }
    kms.stop();
    let log = kms.data().join("audit.log");
    let original = std::fs::read_to_string(&log).unwrap();
    ok_json(&["kms", "audit", "verify", "--data-dir", s(&kms.data())]);
    let lines: Vec<&str> = original.lines().collect();
    let write = |ls: &[String]| {
        std::fs::write(
            &log,
            ls.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap()
    };
    let owned: Vec<String> = lines.iter().map(|l| l.to_string()).collect();

    let mut edited = owned.clone();
    edited[3] = edited[3].replace("\"Allow\"", "\"Deny\"");
    assert_ne!(edited[3], owned[3]);
    write(&edited);
    let stderr = common::fails_with(
        &["kms", "audit", "verify", "--data-dir", s(&kms.data())],
        "E-KMS-AUDIT-TAMPERED",
    );
    assert!(stderr.contains("audit log line 5"), "{stderr}");

    let mut deleted = owned.clone();
    deleted.remove(2);
    write(&deleted);
    let stderr = common::fails_with(
        &["kms", "audit", "verify", "--data-dir", s(&kms.data())],
        "E-KMS-AUDIT-TAMPERED",
    );
    assert!(
        stderr.contains("line 3") && stderr.contains("deleted, inserted or moved"),
        "{stderr}"
    );

    let mut reordered = owned.clone();
    reordered.swap(3, 4);
    write(&reordered);
    common::fails_with(
        &["kms", "audit", "verify", "--data-dir", s(&kms.data())],
        "E-KMS-AUDIT-TAMPERED",
    );

    write(&owned[..owned.len() - 1]);
    let stderr = common::fails_with(
        &["kms", "audit", "verify", "--data-dir", s(&kms.data())],
        "E-KMS-AUDIT-TAMPERED",
    );
    assert!(stderr.contains("truncated"), "{stderr}");

    // The broker refuses to start on a cut log rather than continue it.
    let out = cloister(&[
        "kms",
        "serve",
        "--data-dir",
        s(&kms.data()),
        "--listen",
        &format!("unix:{}", s(&kms.sock())),
    ]);
    let stderr = failed_with(&out, "E-KMS-INTERNAL");
    assert!(stderr.contains("truncated or edited"), "{stderr}");

    std::fs::write(&log, &original).unwrap();
    ok_json(&["kms", "audit", "verify", "--data-dir", s(&kms.data())]);
    let tail = cloister(&[
        "kms",
        "audit",
        "tail",
        "--data-dir",
        s(&kms.data()),
        "-n",
        "2",
    ]);
    assert_eq!(String::from_utf8_lossy(&tail.stdout).lines().count(), 2);
}

#[test]
fn a_passphrase_derived_root_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kms");
    let sock = dir.path().join("kms.sock");
    let init = json_of(
        &cloister_env(
            &["kms", "init", "--data-dir", s(&data)],
            &[("CLOISTER_KMS_PASSPHRASE", "correct horse battery")],
        ),
        "init",
    );
    assert!(init["RootKey"].as_str().unwrap().contains("Argon2id"));
    assert!(!data.join("root.key").exists());
    let listen = format!("unix:{}", s(&sock));
    let serve = ["kms", "serve", "--data-dir", s(&data), "--listen", &listen];
    let stderr = failed_with(&cloister(&serve), "E-KMS-VALIDATION");
    assert!(stderr.contains("derived from a passphrase"), "{stderr}");
    let stderr = failed_with(
        &cloister_env(&serve, &[("CLOISTER_KMS_PASSPHRASE", "wrong")]),
        "E-KMS-INTERNAL",
    );
    assert!(stderr.contains("does not open this keystore"), "{stderr}");
    let server = Server::start(
        &serve,
        &[("CLOISTER_KMS_PASSPHRASE", "correct horse battery")],
        &sock,
    );
    let out = cloister_env(
        &["kms", "list-keys"],
        &[
            ("CLOISTER_KMS_ENDPOINT", &listen),
            ("CLOISTER_PRINCIPAL", "admin"),
            ("CLOISTER_PRINCIPAL_KEY", s(&data.join("admin.key"))),
        ],
    );
    json_of(&out, "list-keys");
    let (status, _) = server.terminate();
    assert!(status.success());
}

/// A key of `app`'s and a blob of `text` under it, through the CLI.
fn key_and_blob(kms: &Kms, app: &Path, text: &str, blob: &Path) -> String {
    let key = json_of(
        &kms.run_as("app", app, &["kms", "create-key"]),
        "create-key",
    )["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    let enc = json_of(
        &kms.run_as(
            "app",
            app,
            &["kms", "encrypt", "--key-id", &key, "--plaintext", text],
        ),
        "encrypt",
    );
    std::fs::write(blob, b64d(&enc["CiphertextBlob"])).unwrap();
    key
}

fn decrypted(kms: &Kms, app: &Path, blob: &Path) -> Vec<u8> {
    let out = kms.run_as(
        "app",
        app,
        &[
            "kms",
            "decrypt",
            "--ciphertext-blob",
            &format!("fileb://{}", s(blob)),
        ],
    );
    b64d(&json_of(&out, "decrypt")["Plaintext"])
}

#[test]
fn the_root_key_rotates_and_every_sealed_item_follows_it() {
    let mut kms = Kms::start();
    let app = kms.add_principal("app", ALLOW_ALL);
    let blob = kms.path("blob");
    let key = key_and_blob(&kms, &app, "sealed under the first root key", &blob);
    let access_key = kms.admin(&["kms", "principal", "add-access-key", "--name", "app"]);
    let data = kms.data();
    let rotate = ["kms", "rotate-root-key", "--data-dir", s(&data)];

    // Not while a broker serves the data directory (its audit log is locked).
    let stderr = failed_with(&cloister(&rotate), "E-KMS-INTERNAL");
    assert!(stderr.contains("another process"), "{stderr}");
    // Not into the other mode.
    let stderr = failed_with(
        &cloister_env(
            &[&rotate[..], &["--new-passphrase-env", "NEW"]].concat(),
            &[("NEW", "a passphrase")],
        ),
        "E-KMS-VALIDATION",
    );
    assert!(stderr.contains("root.key"), "{stderr}");
    kms.stop();
    // Another rotation under way (holding the data directory's rotation
    // lock): refused at once.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data.join("root.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let stderr = failed_with(&cloister(&rotate), "E-KMS-INTERNAL");
    assert!(stderr.contains("rotation"), "{stderr}");
    drop(lock);

    let old_root = std::fs::read(kms.data().join("root.key")).unwrap();
    // The keystore as a backup taken before the rotation holds it.
    assert!(
        !data.join("keystore.db-wal").exists()
            || std::fs::metadata(data.join("keystore.db-wal"))
                .unwrap()
                .len()
                == 0
    );
    std::fs::copy(data.join("keystore.db"), kms.path("keystore-before.db")).unwrap();
    let rotated = ok_json(&rotate);
    // One key version and one access key secret.
    assert_eq!(rotated["Resealed"], 2, "{rotated}");
    let new_root = std::fs::read(kms.data().join("root.key")).unwrap();
    assert_ne!(old_root, new_root);
    assert!(!kms.data().join("root.key.next").exists());

    // Everything sealed before opens under the new key, and new keys work.
    kms.serve();
    assert_eq!(
        decrypted(&kms, &app, &blob),
        b"sealed under the first root key"
    );
    json_of(
        &kms.run_as("app", &app, &["kms", "rotate-key", "--key-id", &key]),
        "rotate-key",
    );
    let keys = kms.admin(&["kms", "principal", "list-access-keys", "--name", "app"]);
    assert_eq!(
        keys["AccessKeys"][0]["AccessKeyId"],
        access_key["AccessKey"]["AccessKeyId"]
    );
    kms.stop();
    let verified = ok_json(&["kms", "audit", "verify", "--data-dir", s(&kms.data())]);
    assert!(verified["Lines"].as_u64().unwrap() > 5);
    assert!(
        kms.audit_lines()
            .iter()
            .any(|l| l["action"] == "cloister:RotateRootKey"
                && l["reason"].as_str().unwrap().contains("2 sealed items"))
    );

    // The old key no longer opens the keystore.
    std::fs::write(kms.data().join("root.key"), &old_root).unwrap();
    let listen = kms.endpoint();
    let serve = ["kms", "serve", "--data-dir", s(&data), "--listen", &listen];
    let stderr = failed_with(&cloister(&serve), "E-KMS-INTERNAL");
    assert!(stderr.contains("does not open this keystore"), "{stderr}");

    // A rotation cut short after its commit (the new key still in
    // root.key.next) is finished at the next open; a leftover root.key.next
    // that opens nothing is removed.
    let next = kms.data().join("root.key.next");
    let plant_next = |bytes: &[u8]| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&next, bytes).unwrap();
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    plant_next(&new_root);
    kms.serve();
    assert_eq!(
        std::fs::read(kms.data().join("root.key")).unwrap(),
        new_root
    );
    assert!(!kms.data().join("root.key.next").exists());
    kms.stop();
    plant_next(&[9u8; 32]);
    kms.serve();
    assert!(!kms.data().join("root.key.next").exists());
    assert_eq!(
        decrypted(&kms, &app, &blob),
        b"sealed under the first root key"
    );

    // The rotation kept the key it replaced: a keystore restored from before
    // the rotation still opens (with a warning), under root.key.prev.
    kms.stop();
    assert_eq!(std::fs::read(data.join("root.key.prev")).unwrap(), old_root);
    std::fs::copy(kms.path("keystore-before.db"), data.join("keystore.db")).unwrap();
    for stale in ["keystore.db-wal", "keystore.db-shm"] {
        let _ = std::fs::remove_file(data.join(stale));
    }
    kms.serve();
    assert_eq!(
        decrypted(&kms, &app, &blob),
        b"sealed under the first root key"
    );
}

#[test]
fn a_passphrase_root_key_rotates_to_a_new_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kms");
    let first = [("CLOISTER_KMS_PASSPHRASE", "correct horse battery")];
    json_of(
        &cloister_env(&["kms", "init", "--data-dir", s(&data)], &first),
        "init",
    );
    let rotate = [
        "kms",
        "rotate-root-key",
        "--data-dir",
        s(&data),
        "--new-passphrase-env",
        "NEW",
    ];
    let stderr = failed_with(
        &cloister_env(
            &rotate,
            &[("CLOISTER_KMS_PASSPHRASE", "wrong"), ("NEW", "x")],
        ),
        "E-KMS-INTERNAL",
    );
    assert!(stderr.contains("does not open this keystore"), "{stderr}");
    let stderr = failed_with(&cloister_env(&rotate[..4], &first), "E-KMS-VALIDATION");
    assert!(stderr.contains("--new-passphrase-env"), "{stderr}");
    // Something sealed before the rotation.
    let sock = dir.path().join("kms.sock");
    let listen = format!("unix:{}", s(&sock));
    let serve = ["kms", "serve", "--data-dir", s(&data), "--listen", &listen];
    let admin_key = data.join("admin.key");
    let admin = [
        ("CLOISTER_KMS_ENDPOINT", listen.as_str()),
        ("CLOISTER_PRINCIPAL", "admin"),
        ("CLOISTER_PRINCIPAL_KEY", s(&admin_key)),
    ];
    let server = Server::start(&serve, &first, &sock);
    let key = json_of(&cloister_env(&["kms", "create-key"], &admin), "create-key")["KeyMetadata"]
        ["KeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    let enc = json_of(
        &cloister_env(
            &[
                "kms",
                "encrypt",
                "--key-id",
                &key,
                "--plaintext",
                "under the passphrase",
            ],
            &admin,
        ),
        "encrypt",
    );
    let blob = dir.path().join("blob");
    std::fs::write(&blob, b64d(&enc["CiphertextBlob"])).unwrap();
    server.terminate();
    let rotated = json_of(
        &cloister_env(&rotate, &[first[0], ("NEW", "staple tree ocean")]),
        "rotate",
    );
    assert_eq!(rotated["Resealed"], 1, "{rotated}");
    let stderr = failed_with(&cloister_env(&serve, &first), "E-KMS-INTERNAL");
    assert!(stderr.contains("does not open this keystore"), "{stderr}");
    let server = Server::start(
        &serve,
        &[("CLOISTER_KMS_PASSPHRASE", "staple tree ocean")],
        &sock,
    );
    let out = cloister_env(
        &[
            "kms",
            "decrypt",
            "--ciphertext-blob",
            &format!("fileb://{}", s(&blob)),
        ],
        &admin,
    );
    assert_eq!(
        b64d(&json_of(&out, "decrypt")["Plaintext"]),
        b"under the passphrase"
    );
    let (status, _) = server.terminate();
    assert!(status.success());
}

#[test]
fn a_keystore_row_edited_outside_the_broker_is_refused() {
    let mut kms = Kms::start();
    kms.add_principal("app", r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:Encrypt","Resource":"*"}}"#);
    kms.stop();
    let db = rusqlite::Connection::open(kms.data().join("keystore.db")).unwrap();
    let original: String = db
        .query_row(
            "SELECT policy FROM principals WHERE name = 'app'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    db.execute(
        "UPDATE principals SET policy = ?1 WHERE name = 'app'",
        [ALLOW_ALL],
    )
    .unwrap();
    let listen = kms.endpoint();
    let data = kms.data();
    let serve = ["kms", "serve", "--data-dir", s(&data), "--listen", &listen];
    let stderr = failed_with(&cloister(&serve), "E-KMS-INTERNAL");
    assert!(
        stderr.contains("principals row \"app\" fails its integrity check"),
        "{stderr}"
    );
    // Put back as the broker wrote it, the row verifies again.
    db.execute(
        "UPDATE principals SET policy = ?1 WHERE name = 'app'",
        [&original],
    )
    .unwrap();
    drop(db);
    kms.serve();
    kms.admin(&["kms", "principal", "list"]);
}

#[test]
fn sigkill_during_a_burst_loses_nothing_acknowledged() {
    let mut kms = Kms::start();
    let app = kms.add_principal("app", ALLOW_ALL);
    let endpoint = kms.endpoint();
    let stop_at = Instant::now() + Duration::from_millis(1500);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let app = app.clone();
            let endpoint = endpoint.clone();
            let dir = kms.dir.path().to_path_buf();
            std::thread::spawn(move || {
                let env = [
                    ("CLOISTER_KMS_ENDPOINT", endpoint.as_str()),
                    ("CLOISTER_PRINCIPAL", "app"),
                    ("CLOISTER_PRINCIPAL_KEY", s(&app)),
                ];
                let mut acked = Vec::new();
                let mut n = 0;
                while Instant::now() < stop_at + Duration::from_secs(1) {
                    n += 1;
                    let created = cloister_env(&["kms", "create-key"], &env);
                    if !created.status.success() {
                        continue;
                    }
                    let key: Value = serde_json::from_slice(&created.stdout).unwrap();
                    let key = key["KeyMetadata"]["KeyId"].as_str().unwrap().to_owned();
                    let text = format!("worker {w} item {n}");
                    let enc = cloister_env(
                        &["kms", "encrypt", "--key-id", &key, "--plaintext", &text],
                        &env,
                    );
                    let blob = enc.status.success().then(|| {
                        let v: Value = serde_json::from_slice(&enc.stdout).unwrap();
                        let path = dir.join(format!("w{w}-{n}.blob"));
                        std::fs::write(&path, b64d(&v["CiphertextBlob"])).unwrap();
                        path
                    });
                    acked.push((key, blob, text));
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    kms.server.take().unwrap().kill();
    let acked: Vec<_> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        acked.len() >= 4,
        "the burst made only {} keys before the kill",
        acked.len()
    );
    eprintln!("{} keys acknowledged around the kill", acked.len());

    // The database is intact.
    let conn = rusqlite::Connection::open(kms.data().join("keystore.db")).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    drop(conn);

    // After a restart every acknowledged key exists and every acknowledged blob decrypts.
    kms.serve();
    for (key, blob, text) in &acked {
        json_of(
            &kms.run_as("app", &app, &["kms", "describe-key", "--key-id", key]),
            "describe after crash",
        );
        if let Some(blob) = blob {
            let out = json_of(
                &kms.run_as(
                    "app",
                    &app,
                    &[
                        "kms",
                        "decrypt",
                        "--ciphertext-blob",
                        &format!("fileb://{}", s(blob)),
                    ],
                ),
                "decrypt after crash",
            );
            assert_eq!(b64d(&out["Plaintext"]), text.as_bytes());
        }
    }
    kms.stop();
    ok_json(&["kms", "audit", "verify", "--data-dir", s(&kms.data())]);
}

#[test]
fn over_tcp_the_broker_speaks_tls_1_3_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kms");
    ok_json(&[
        "kms",
        "init",
        "--data-dir",
        s(&data),
        "--tls-name",
        "kms.internal",
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sock = dir.path().join("kms.sock");
    let tcp = format!("tcp:127.0.0.1:{port}");
    let _server = Server::start(
        &[
            "kms",
            "serve",
            "--data-dir",
            s(&data),
            "--listen",
            &format!("unix:{}", s(&sock)),
            "--listen",
            &tcp,
        ],
        &[],
        &sock,
    );
    let ca = data.join("tls/ca.pem");
    let admin_env = |extra: &[(&'static str, String)]| {
        let mut env = vec![
            ("CLOISTER_KMS_ENDPOINT", tcp.clone()),
            ("CLOISTER_PRINCIPAL", "admin".to_string()),
            (
                "CLOISTER_PRINCIPAL_KEY",
                s(&data.join("admin.key")).to_string(),
            ),
        ];
        env.extend(extra.iter().cloned());
        env
    };
    let run = |extra: &[(&'static str, String)]| {
        let env = admin_env(extra);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cloister_env(&["kms", "list-keys"], &env)
    };
    json_of(
        &run(&[("CLOISTER_KMS_CA", s(&ca).into())]),
        "list-keys over TLS",
    );
    let stderr = failed_with(&run(&[]), "E-KMS-TLS");
    assert!(stderr.contains("--ca"), "{stderr}");

    // Another broker's CA does not vouch for this one; nor does a wrong name.
    let other = dir.path().join("other");
    ok_json(&["kms", "init", "--data-dir", s(&other)]);
    failed_with(
        &run(&[("CLOISTER_KMS_CA", s(&other.join("tls/ca.pem")).into())]),
        "E-KMS-TLS",
    );
    failed_with(
        &run(&[
            ("CLOISTER_KMS_CA", s(&ca).into()),
            ("CLOISTER_KMS_TLS_NAME", "evil.example".into()),
        ]),
        "E-KMS-TLS",
    );
    json_of(
        &run(&[
            ("CLOISTER_KMS_CA", s(&ca).into()),
            ("CLOISTER_KMS_TLS_NAME", "kms.internal".into()),
        ]),
        "by its extra name",
    );

    // An independent TLS client: openssl agrees on TLS 1.3 and cannot get TLS 1.2.
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok()
    {
        let s_client = |version: &str| {
            std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &format!("127.0.0.1:{port}"),
                    version,
                    "-CAfile",
                    s(&ca),
                    "-verify_return_error",
                    "-brief",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        };
        let ok = s_client("-tls1_3");
        let text =
            String::from_utf8_lossy(&ok.stderr).into_owned() + &String::from_utf8_lossy(&ok.stdout);
        assert!(text.contains("TLSv1.3"), "{text}");
        assert!(
            text.contains("Verification: OK") || text.contains("Verify return code: 0"),
            "{text}"
        );
        assert!(!s_client("-tls1_2").status.success());
    }
}

#[test]
fn a_principal_over_its_rate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kms");
    ok_json(&["kms", "init", "--data-dir", s(&data)]);
    let sock = dir.path().join("kms.sock");
    let listen = format!("unix:{}", s(&sock));
    let _server = Server::start(
        &[
            "kms",
            "serve",
            "--data-dir",
            s(&data),
            "--listen",
            &listen,
            "--rate",
            "0.1",
        ],
        &[],
        &sock,
    );
    let admin_key = data.join("admin.key");
    let env = [
        ("CLOISTER_KMS_ENDPOINT", listen.as_str()),
        ("CLOISTER_PRINCIPAL", "admin"),
        ("CLOISTER_PRINCIPAL_KEY", s(&admin_key)),
    ];
    json_of(&cloister_env(&["kms", "list-keys"], &env), "first request");
    let stderr = failed_with(
        &cloister_env(&["kms", "list-keys"], &env),
        "E-KMS-LIMIT-EXCEEDED",
    );
    assert!(stderr.contains("exceeded"), "{stderr}");
}

#[test]
fn trust_roots_and_principals_can_be_removed() {
    let kms = Kms::start();
    kms.trust_a_platform();
    kms.admin(&["kms", "trust", "add", "--aws-nitro-root"]);
    let dup = kms.run_as(
        "admin",
        &kms.data().join("admin.key"),
        &[
            "kms",
            "trust",
            "add",
            "--root",
            s(&kms.path("platform/root.pem")),
            "--label",
            "again",
        ],
    );
    failed_with(&dup, "E-KMS-ALREADY-EXISTS");
    let listed = kms.admin(&["kms", "trust", "list"]);
    let labels: Vec<&str> = listed["TrustRoots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["Label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["aws-nitro-enclaves-root", "lab"]);
    kms.admin(&["kms", "trust", "remove", "--label", "lab"]);
    assert_eq!(
        kms.admin(&["kms", "trust", "list"])["TrustRoots"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    failed_with(
        &kms.run_as(
            "admin",
            &kms.data().join("admin.key"),
            &["kms", "trust", "remove", "--label", "lab"],
        ),
        "E-KMS-NOT-FOUND",
    );

    // A document from the removed root is no longer accepted.
    let app = kms.add_principal("app", ALLOW_ALL);
    let r = IndependentRecipient::new();
    let doc = attest(&kms, "doc", &[], &r.public_key(), false);
    let out = kms.run_as(
        "app",
        &app,
        &[
            "kms",
            "generate-random",
            "--number-of-bytes",
            "8",
            "--recipient",
            &format!("AttestationDocument=fileb://{}", s(&doc)),
        ],
    );
    let stderr = failed_with(&out, "E-KMS-ACCESS-DENIED");
    assert!(stderr.contains("E-ATTEST-UNTRUSTED-ROOT"), "{stderr}");

    let principals = kms.admin(&["kms", "principal", "list"]);
    assert_eq!(principals["Principals"].as_array().unwrap().len(), 2);
    kms.admin(&["kms", "principal", "remove", "--name", "app"]);
    let stderr = failed_with(
        &kms.run_as("app", &app, &["kms", "list-keys"]),
        "E-KMS-INVALID-SIGNATURE",
    );
    assert!(stderr.contains("unknown principal"), "{stderr}");
}

#[test]
fn sealed_files_round_trip_and_every_kind_of_damage_is_refused_without_output() {
    let kms = Kms::start();
    let owner = kms.add_principal("owner", ALLOW_ALL);
    let key = json_of(
        &kms.run_as("owner", &owner, &["kms", "create-key"]),
        "create",
    )["KeyMetadata"]["KeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    let csv: String = (0..20_000)
        .map(|i| format!("P{i:06},{},F,{}.5,120\n", 40 + i % 40, 180 + i % 50))
        .collect();
    let plain = kms.path("patients.csv");
    std::fs::write(&plain, &csv).unwrap();
    let sealed = kms.path("patients.sealed");
    let seal = |input: &Path, output: &Path, extra: &[&str]| {
        let mut args = vec![
            "encrypt",
            "--key-id",
            key.as_str(),
            "--encryption-context",
            "study=fhs,site=7",
            "--in",
            s(input),
            "--out",
            s(output),
        ];
        args.extend_from_slice(extra);
        kms.run_as("owner", &owner, &args)
    };
    let out = json_of(&seal(&plain, &sealed, &["--chunk-size", "4096"]), "encrypt");
    assert_eq!(out["Records"], 20_000);
    let bytes = std::fs::read(&sealed).unwrap();
    assert!(
        !bytes.windows(7).any(|w| w == b"P000123"),
        "plaintext visible in the sealed file"
    );

    let opened = kms.path("opened.csv");
    let unseal = |input: &Path| {
        kms.run_as(
            "owner",
            &owner,
            &["decrypt", "--in", s(input), "--out", s(&opened)],
        )
    };
    json_of(&unseal(&sealed), "decrypt");
    assert_eq!(std::fs::read_to_string(&opened).unwrap(), csv);
    std::fs::remove_file(&opened).unwrap();

    let damaged = kms.path("damaged.sealed");
    let check = |bytes: &[u8], code: &str| {
        std::fs::write(&damaged, bytes).unwrap();
        failed_with(&unseal(&damaged), code);
        assert!(!opened.exists(), "{code}: a partial output was left");
        let leftovers: Vec<_> = std::fs::read_dir(kms.dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "{code}: temporary files left");
    };
    check(&bytes[..bytes.len() - 100], "E-SEALED-TRUNCATED");
    check(&bytes[..bytes.len() / 2], "E-SEALED-TRUNCATED");
    let mut flipped = bytes.clone();
    let at = bytes.len() - 5000;
    flipped[at] ^= 1;
    check(&flipped, "E-SEALED-TAMPERED");
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"more");
    check(&longer, "E-SEALED-FORMAT");
    check(b"not a sealed file at all", "E-SEALED-FORMAT");
    // The header's encryption context is bound at the broker: changing it fails there.
    let mut ctx = bytes.clone();
    let pos = ctx.windows(3).position(|w| w == b"fhs").unwrap();
    ctx[pos] = b'g';
    check(&ctx, "E-KMS-INVALID-CIPHERTEXT");

    // Another file's data key under this file's header: the key commitment catches it.
    let other = kms.path("other.sealed");
    json_of(
        &seal(&plain, &other, &["--chunk-size", "4096"]),
        "encrypt other",
    );
    let other_bytes = std::fs::read(&other).unwrap();
    let edk = cloister_sealed::Header::read(&mut &bytes[..])
        .unwrap()
        .encrypted_data_key;
    let other_edk = cloister_sealed::Header::read(&mut &other_bytes[..])
        .unwrap()
        .encrypted_data_key;
    assert_eq!(edk.len(), other_edk.len());
    let edk_at = bytes
        .windows(edk.len())
        .position(|w| w == edk.as_slice())
        .unwrap();
    let mut swapped = bytes.clone();
    swapped[edk_at..edk_at + edk.len()].copy_from_slice(&other_edk);
    check(&swapped, "E-SEALED-KEY-COMMITMENT");

    // A record longer than a chunk: refused, and no sealed output appears.
    std::fs::write(kms.path("long.csv"), format!("{}\n", "x".repeat(5000))).unwrap();
    let long_out = kms.path("long.sealed");
    failed_with(
        &seal(&kms.path("long.csv"), &long_out, &["--chunk-size", "4096"]),
        "E-SEALED-RECORD-TOO-LARGE",
    );
    assert!(!long_out.exists());
}

/// The AWS SDKs, unchanged: boto3 and the aws CLI against `kms serve
/// --aws-api` over HTTPS (the broker's own CA), with an access key of a
/// principal named by its IAM role ARN, and the key policy of
/// examples/aws-sdk/enclave-key-policy.json (which works at AWS as it is).
#[test]
fn boto3_and_the_aws_cli_use_the_broker_unchanged() {
    let Some(python) = common::python_with_requirements("tests/aws/requirements.txt") else {
        return;
    };
    let port = free_port();
    let endpoint = format!("https://127.0.0.1:{port}");
    let kms = Kms::start_with(&["--aws-api", &format!("tcp:127.0.0.1:{port}")]);
    kms.trust_a_platform();
    let Some((rsa_key, spki)) = enclave_rsa_key(&kms) else {
        return;
    };
    let role = "arn:aws:iam::111122223333:role/enclave-parent";
    kms.add_principal(role, ALLOW_ALL);
    let key_admin = "arn:aws:iam::111122223333:role/key-admin";
    kms.add_principal(key_admin, ALLOW_ALL);
    let admin_key = kms.admin(&["kms", "principal", "add-access-key", "--name", key_admin]);
    let issued = kms.admin(&["kms", "principal", "add-access-key", "--name", role]);
    let access_key_id = issued["AccessKey"]["AccessKeyId"].as_str().unwrap();
    let secret = issued["AccessKey"]["SecretAccessKey"].as_str().unwrap();
    assert!(access_key_id.starts_with("AKCL") && access_key_id.len() == 20);
    assert_eq!(secret.len(), 40);
    let listed = kms.admin(&["kms", "principal", "list-access-keys", "--name", role]);
    assert_eq!(
        listed["AccessKeys"].as_array().unwrap().len(),
        1,
        "{listed}"
    );
    assert_eq!(listed["AccessKeys"][0]["AccessKeyId"], access_key_id);
    let all = kms.admin(&["kms", "principal", "list-access-keys"]);
    assert_eq!(all["AccessKeys"].as_array().unwrap().len(), 2, "{all}");
    assert!(
        !listed.to_string().contains(secret),
        "listing shows no secret"
    );

    let image = pcr_of(b"enclave image", &kms, "image.bin");
    let policy = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/aws-sdk/enclave-key-policy.json"
    ))
    .unwrap()
    .replace("EXAMPLE_PCR0_OF_THE_ENCLAVE_IMAGE", &image);
    std::fs::write(kms.path("policy.json"), policy).unwrap();
    let lint = cloister(&[
        "kms",
        "lint-policy",
        &format!("file://{}", s(&kms.path("policy.json"))),
    ]);
    assert!(
        lint.status.success(),
        "the example policy lints clean: {}",
        String::from_utf8_lossy(&lint.stdout)
    );
    let document = attest(&kms, "rsa", &[(0, image.clone())], &spki, false);
    let ca = kms.data().join("tls/ca.pem");
    let config = serde_json::json!({
        "endpoint": endpoint,
        "ca": s(&ca),
        "region": "us-east-1",
        "access_key_id": access_key_id,
        "secret_access_key": secret,
        "admin_access_key_id": admin_key["AccessKey"]["AccessKeyId"],
        "admin_secret_access_key": admin_key["AccessKey"]["SecretAccessKey"],
        "policy": s(&kms.path("policy.json")),
        "attestation_document": s(&document),
        "cms_generated": s(&kms.path("generated.cms")),
        "cms_decrypted": s(&kms.path("decrypted.cms")),
        "attested_blob": s(&kms.path("attested.blob")),
    });
    std::fs::write(kms.path("boto3.json"), config.to_string()).unwrap();
    let run = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/aws/boto3_client.py"
        ))
        .arg(kms.path("boto3.json"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "boto3 client: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let seen: Value = serde_json::from_slice(&run.stdout).unwrap();
    let key_id = seen["created"]["KeyId"].as_str().unwrap();
    assert_eq!(seen["created"]["KeyState"], "Enabled");
    assert_eq!(seen["created"]["KeySpec"], "SYMMETRIC_DEFAULT");
    assert_eq!(seen["creation_date_type"], "datetime");
    assert_eq!(seen["round_trip"], "hello from boto3");
    assert!(seen["decrypt_key_id"].as_str().unwrap().ends_with(key_id));
    assert_eq!(seen["wrong_context"][0], "InvalidCiphertextException");
    assert_eq!(seen["re_encrypted"], "hello from boto3");
    assert_eq!(seen["data_key_len"], 32);
    assert_eq!(seen["data_key_opens"], true);
    assert_eq!(
        seen["without_plaintext"],
        serde_json::json!(["CiphertextBlob", "KeyId"])
    );
    assert_eq!(seen["random_len"], 48);
    assert!(
        seen["listed_keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k == key_id),
        "{seen}"
    );
    assert_eq!(seen["aliases"], serde_json::json!(["alias/boto3"]));
    assert_eq!(seen["rotation"], serde_json::json!([true, 180]));
    assert_eq!(seen["disabled"][0], "DisabledException");
    assert_eq!(seen["deletion_state"], "PendingDeletion");
    assert_eq!(seen["after_cancel"], "Disabled");
    assert!(seen["cancelled"].as_str().unwrap().ends_with(key_id));
    assert_eq!(seen["not_found"][0], "NotFoundException");
    assert_eq!(seen["policy_round_trip"], true);
    assert_eq!(seen["parent_put_policy"][0], "AccessDeniedException");
    // The data key reaches the enclave only, as AWS's CMS; openssl opens it.
    assert_eq!(
        seen["recipient_members"],
        serde_json::json!(["CiphertextBlob", "CiphertextForRecipient", "KeyId"])
    );
    let generated = open_cms(
        &kms,
        &rsa_key,
        &std::fs::read(kms.path("generated.cms")).unwrap(),
    );
    let decrypted = open_cms(
        &kms,
        &rsa_key,
        &std::fs::read(kms.path("decrypted.cms")).unwrap(),
    );
    assert_eq!(generated.len(), 32);
    assert_eq!(
        generated, decrypted,
        "Decrypt of the blob gives the same data key"
    );
    let denied = &seen["denied"];
    assert_eq!(denied[0], "AccessDeniedException", "{denied}");
    assert_eq!(denied[2], 400);
    assert!(
        denied[1].as_str().unwrap().contains("ImageSha384"),
        "the reason names the condition: {denied}"
    );
    assert_eq!(seen["bad_signature"][0], "InvalidSignatureException");
    assert_eq!(seen["unknown_key"][0], "UnrecognizedClientException");
    assert_eq!(seen["untrusted_tls"], "SSLError");

    // The aws CLI, pointed at the broker by --endpoint-url or AWS_ENDPOINT_URL_KMS.
    let aws = python.parent().unwrap().join("aws");
    let home = kms.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let aws_cli = |args: &[&str], secret: &str| {
        std::process::Command::new(&aws)
            .args(args)
            .args(["--output", "json"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("AWS_CONFIG_FILE", home.join("none"))
            .env("AWS_SHARED_CREDENTIALS_FILE", home.join("none"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ACCESS_KEY_ID", access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_CA_BUNDLE", &ca)
            .env("AWS_ENDPOINT_URL_KMS", &endpoint)
            .env("AWS_MAX_ATTEMPTS", "1")
            .output()
            .unwrap()
    };
    let ok = |out: std::process::Output| -> Value {
        assert!(
            out.status.success(),
            "aws: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let created = ok(aws_cli(
        &["kms", "create-key", "--description", "aws cli"],
        secret,
    ));
    let cli_key = created["KeyMetadata"]["KeyId"].as_str().unwrap();
    std::fs::write(kms.path("cli-secret"), b"from the aws cli").unwrap();
    let plaintext = format!("fileb://{}", s(&kms.path("cli-secret")));
    let enc = ok(aws_cli(
        &[
            "kms",
            "encrypt",
            "--endpoint-url",
            &endpoint,
            "--key-id",
            cli_key,
            "--plaintext",
            &plaintext,
            "--encryption-context",
            "purpose=cli",
        ],
        secret,
    ));
    std::fs::write(kms.path("cli.blob"), b64d(&enc["CiphertextBlob"])).unwrap();
    let blob = format!("fileb://{}", s(&kms.path("cli.blob")));
    let dec = ok(aws_cli(
        &[
            "kms",
            "decrypt",
            "--ciphertext-blob",
            &blob,
            "--encryption-context",
            "purpose=cli",
        ],
        secret,
    ));
    assert_eq!(b64d(&dec["Plaintext"]), b"from the aws cli");
    // (aws CLI v1, the one on PyPI, cannot give a binary AttestationDocument
    // inside --recipient: it sends a nested blob's text as is. boto3 above
    // and aws CLI v2 (`AttestationDocument=fileb://doc`) can.)
    let attested_key = format!("fileb://{}", s(&kms.path("attested.blob")));
    let denied = aws_cli(
        &["kms", "decrypt", "--ciphertext-blob", &attested_key],
        secret,
    );
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success());
    assert!(
        stderr.contains("AccessDeniedException") && stderr.contains("ImageSha384"),
        "{stderr}"
    );
    let forged = aws_cli(&["kms", "list-keys"], &format!("x{}", &secret[1..]));
    let stderr = String::from_utf8_lossy(&forged.stderr);
    assert!(!forged.status.success());
    assert!(stderr.contains("InvalidSignatureException"), "{stderr}");

    // One audit log for both front ends: every AWS request names its access
    // key and principal, and the log verifies.
    let lines: Vec<Value> = std::fs::read_to_string(kms.data().join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let aws_lines: Vec<&Value> = lines
        .iter()
        .filter(|l| l["access_key_id"] == access_key_id)
        .collect();
    assert!(aws_lines.len() > 30, "{}", aws_lines.len());
    assert!(aws_lines.iter().all(
        |l| l["principal"] == role || l["reason"].as_str().unwrap().contains("does not match")
    ));
    assert!(aws_lines.iter().any(|l| l["action"] == "kms:Decrypt"
        && l["decision"] == "Deny"
        && l["reason"].as_str().unwrap().contains("ImageSha384")));
    assert!(
        aws_lines
            .iter()
            .any(|l| l["action"] == "kms:GenerateDataKey"
                && l["decision"] == "Allow"
                && l["recipient_pcr0"] == image.as_str())
    );
    let verified = ok_json(&["kms", "audit", "verify", "--data-dir", s(&kms.data())]);
    assert_eq!(verified["Verified"], true);
}
