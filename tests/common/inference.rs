//! The confidential-inference example's world (examples/inference), shared by
//! its end-to-end tests and the benchmark: a host with a supervisor, a broker
//! and a capturing relay before the parent's proxy; principals model-owner,
//! data-owner and the parent's role.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{Broker, Host, json_of, s};

pub const ROLE: &str = "arn:aws:iam::123456789012:role/Inference";
pub const MODELS: [&str; 3] = ["logreg", "forest", "mlp"];
/// The encryption context pairs the images require of each part.
pub const MODEL_CONTEXT: &str = "purpose=model";
pub const RECORDS_CONTEXT: &str = "purpose=records";
pub const TOLERANCE: f64 = 1e-5;

pub fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/inference")
        .join(path)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

pub struct World {
    pub h: Host,
    pub broker: Broker,
    pub relay_sock: PathBuf,
    pub captured: Arc<Mutex<Vec<u8>>>,
    /// The connections the enclaves made to the broker through the relay.
    pub relay: Arc<super::RelayConnections>,
}

impl World {
    pub fn new() -> World {
        let h = Host::new();
        let broker = Broker::start(&h);
        let captured = Arc::new(Mutex::new(Vec::new()));
        let relay_sock = h.path("relay.sock");
        let relay = super::capturing_relay(
            relay_sock.clone(),
            broker.proxy_sock.clone(),
            captured.clone(),
        );
        for who in ["model-owner", "data-owner", "parent"] {
            let name = if who == "parent" { ROLE } else { who };
            broker.add_principal(name, &h.path(&format!("{who}.key")));
        }
        World {
            h,
            broker,
            relay_sock,
            captured,
            relay,
        }
    }

    /// A command as `who` (model-owner, data-owner).
    pub fn as_owner(&self, who: &str, args: &[&str]) -> std::process::Output {
        self.broker
            .client(who, &self.h.path(&format!("{who}.key")), args)
    }
    pub fn owner_ok(&self, who: &str, args: &[&str]) -> Value {
        json_of(&self.as_owner(who, args), &format!("{who} {args:?}"))
    }

    /// An image of the inference guest that runs only `model` (more
    /// build-enclave options in `extra`).
    pub fn image(&self, model: &str, extra: &[&str]) -> (PathBuf, String) {
        let onnx = std::fs::read(example(&format!("models/{model}.onnx"))).unwrap();
        let mut args = self.broker.trust_args();
        for config in [
            format!("model-sha256={}", sha256_hex(&onnx)),
            format!("model-context={MODEL_CONTEXT}"),
            format!("records-context={RECORDS_CONTEXT}"),
            "output-key-id=alias/predictions".into(),
            "output-context=purpose=predictions".into(),
            "class-names=malignant,benign".into(),
        ] {
            args.extend(["--config".into(), config]);
        }
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let (image, built) =
            self.h
                .build_guest("inference", "inference", &format!("{model}.cimg"), &args);
        let pcr0 = built["Measurements"]["PCR0"].as_str().unwrap().to_owned();
        (image, pcr0)
    }

    /// A key of `who` under `alias`: the owner manages it; the parent's role may
    /// use it for `action` only from an enclave whose PCR0 is one of `pcr0s`.
    pub fn create_key(&self, who: &str, alias: &str, action: &str, pcr0s: &[&str]) -> String {
        let policy = self
            .h
            .path(&format!("{}.policy.json", alias.replace('/', "-")));
        std::fs::write(&policy, key_policy(who, action, pcr0s)).unwrap();
        self.broker
            .create_key(who, &self.h.path(&format!("{who}.key")), &policy, alias)
    }

    /// The three keys of a run, for enclaves of the images `pcr0s`: the model
    /// owner's (the enclave may Decrypt), the data owner's for records (Decrypt)
    /// and for predictions (GenerateDataKey only). Returns their key ids.
    pub fn create_keys(&self, pcr0s: &[&str]) -> [String; 3] {
        [
            self.create_key("model-owner", "alias/model", "kms:Decrypt", pcr0s),
            self.create_key("data-owner", "alias/records", "kms:Decrypt", pcr0s),
            self.create_key(
                "data-owner",
                "alias/predictions",
                "kms:GenerateDataKey",
                pcr0s,
            ),
        ]
    }

    /// `who` seals `input` under `alias` into `out` (in the scratch directory).
    pub fn seal(&self, who: &str, alias: &str, context: &str, input: &Path, out: &str) -> PathBuf {
        let out = self.h.path(out);
        self.owner_ok(
            who,
            &[
                "encrypt",
                "--key-id",
                alias,
                "--encryption-context",
                context,
                "--in",
                s(input),
                "--out",
                s(&out),
            ],
        );
        out
    }

    pub fn launch(&self, name: &str, image: &Path) {
        let key = self.h.path("parent.key");
        let args = super::run_enclave_args(image, name, ROLE, &self.relay_sock, &key);
        self.h
            .ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// The parent's call with the two sealed parts.
    pub fn call(&self, enclave: &str, model: &Path, records: &Path) -> std::process::Output {
        self.h.run(&[
            "call",
            "--enclave-name",
            enclave,
            "--part",
            &format!("model={}", s(model)),
            "--part",
            &format!("records={}", s(records)),
        ])
    }

    /// A successful call: the summary line and the predictions, opened by the data owner.
    pub fn score(&self, enclave: &str, model: &Path, records: &Path) -> (Value, String, Vec<u8>) {
        let out = self.call(enclave, model, records);
        assert!(
            out.status.success(),
            "call {enclave}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nl = out.stdout.iter().position(|b| *b == b'\n').unwrap();
        let summary: Value = serde_json::from_slice(&out.stdout[..nl]).unwrap();
        let sealed = self.h.path(&format!("{enclave}.predictions.sealed"));
        std::fs::write(&sealed, &out.stdout[nl + 1..]).unwrap();
        let opened = self.h.path(&format!("{enclave}.predictions.csv"));
        self.owner_ok(
            "data-owner",
            &["decrypt", "--in", s(&sealed), "--out", s(&opened)],
        );
        (
            summary,
            std::fs::read_to_string(&opened).unwrap(),
            out.stdout,
        )
    }
}

pub fn key_policy(owner: &str, action: &str, pcr0s: &[&str]) -> String {
    let pcr0s: Vec<String> = pcr0s.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        r#"{{"Version":"2012-10-17","Statement":[
          {{"Sid":"Owner","Effect":"Allow","Principal":{{"AWS":"{owner}"}},"Action":"kms:*","Resource":"*"}},
          {{"Sid":"InferenceEnclave","Effect":"Allow","Principal":{{"AWS":"{ROLE}"}},"Action":"{action}","Resource":"*",
            "Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":[{}]}}}}}}]}}"#,
        pcr0s.join(",")
    )
}
