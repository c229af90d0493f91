//! Cloister's performance figures, measured on the paths users run (real
//! processes, real sockets), each with its target, its run count and range and,
//! where there is one, its baseline and ratio:
//!
//! - `key-release`: attested key release as a workload sees it: the guest's
//!   `kms::decrypt`, through the runtime (a fresh recipient key, a document from
//!   the supervisor's NSM, a signed request), the parent's `cloister proxy` and
//!   the broker process, and back (answer checked, key opened). Timed inside the
//!   guest; p50 and p99.
//! - `broker`: attested decrypts per second from 1, 4, 16 and 64 client
//!   processes against `cloister kms serve`, beside the crypto-only limit measured
//!   in the same run (request signature, document signature and chain, HPKE
//!   seal, response signature per request, times the cores): the floor.
//! - `replicas`: the same attested decrypts from `REPLICA_CLIENTS` (default
//!   16) client processes against 1, 2 and 3 broker replicas sharing one
//!   PostgreSQL database (clients spread over the replicas' sockets as a
//!   load balancer would), beside one broker on its embedded SQLite keystore,
//!   in turns within each run; and where the CPU goes (brokers, PostgreSQL).
//! - `scoring`: the PHI scorer through `cloister call` against `phi-gen
//!   --score-sealed` (the same `score_sealed` loop, natively, given the data key)
//!   as processes, in pairs of alternating order; the median of per-pair ratios.
//! - `start`: `cloister run-enclave` until the enclave serves, warm (compiled code
//!   cached) and cold (the supervisor compiles it).
//! - `density`: idle enclaves (`DENSITY`, default 100) and their private memory:
//!   PSS per runtime process, from /proc/PID/smaps_rollup.
//! - `inference`: examples/inference through `cloister call --part` against
//!   `inference-native score`, as processes, paired.
//! - `channel`: one PHI record through the attested channel (encapsulate,
//!   supervisor, runtime, workload, encapsulated answer, open) against the same
//!   record sent in the clear, interleaved request by request from one client
//!   over the supervisor's socket; and a fresh document fetched and verified.
//!
//! Run: `cargo bench -p cloister-host --bench targets` (all; or name sections
//! after `--`). It prints the table and writes `bench/results.json` (figures of
//! the sections run replace those of the same name), `bench/results.md` and
//! the README's table (between its bench markers). `RUNS`, `PAIRS`, `ROWS`,
//! `DENSITY`, `BROKER_SECONDS`, `BROKER_CLIENTS` (e.g. `1,16`) change the
//! amount of work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use common::inference::{MODEL_CONTEXT, MODELS, RECORDS_CONTEXT, ROLE, World, example};
use common::s;

/// A section of the benchmark: runs and returns its figures.
type Section = fn() -> Vec<Figure>;

/// The sections, in the order they run.
const SECTIONS: [(&str, Section); 9] = [
    ("key-release", key_release),
    ("broker", broker),
    ("replicas", replicas),
    ("flood", flood),
    ("scoring", scoring),
    ("start", start),
    ("density", density),
    ("inference", inference),
    ("channel", channel),
];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One figure of `bench/results.json`.
#[derive(Debug, Clone, serde::Serialize)]
struct Figure {
    name: String,
    value: f64,
    unit: String,
    /// The range over the runs (min, max).
    low: f64,
    high: f64,
    runs: usize,
    /// What the value is compared with (native, crypto floor), if anything.
    baseline: Option<f64>,
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
    note: String,
}

impl Figure {
    fn new(name: &str, unit: &str, values: &[f64]) -> Figure {
        let (value, low, high) = median_and_range(values.to_vec());
        Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            low,
            high,
            runs: values.len(),
            baseline: None,
            ratio: None,
            target: String::new(),
            met: None,
            note: String::new(),
        }
    }
    fn target(mut self, target: &str, met: bool) -> Figure {
        self.target = target.into();
        self.met = Some(met);
        self
    }
    fn baseline(mut self, baseline: f64, ratio: f64) -> Figure {
        self.baseline = Some(baseline);
        self.ratio = Some(ratio);
        self
    }
    fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }
    fn print(&self) {
        let number = |v: f64| {
            if v.abs() >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        };
        let value = format!(
            "{} {} ({}-{}, {} runs)",
            number(self.value),
            self.unit,
            number(self.low),
            number(self.high),
            self.runs
        );
        let ratio = self
            .ratio
            .map(|r| {
                format!(
                    "{:.0}% of {}",
                    r * 100.0,
                    number(self.baseline.unwrap_or(0.0))
                )
            })
            .unwrap_or_default();
        let met = match self.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "",
        };
        println!(
            "{:<34} {:>34} {:>20}  {:<16} {met}",
            self.name, value, ratio, self.target
        );
        if !self.note.is_empty() {
            println!("{:<34} {}", "", self.note);
        }
    }
}

/// The median of `values` and their range.
fn median_and_range(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--broker-client") {
        return broker_client(Path::new(&args[1]));
    }
    if args.first().map(String::as_str) == Some("--flood-client") {
        return flood_client(&args[1..]);
    }
    // Errors that capture a backtrace (anyhow's, as tract makes them) cost far
    // more when RUST_BACKTRACE is set in the caller's shell: the processes
    // measured run with the environment users give them, without it.
    // SAFETY: no other thread has started yet.
    #[allow(unsafe_code)]
    unsafe {
        std::env::remove_var("RUST_BACKTRACE");
        std::env::remove_var("RUST_LIB_BACKTRACE");
    }
    let chosen: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let names: Vec<&str> = SECTIONS.iter().map(|(name, _)| *name).collect();
    for c in &chosen {
        assert!(
            names.contains(c),
            "unknown section {c:?}; the sections are {names:?}"
        );
    }
    let run = |name: &str| chosen.is_empty() || chosen.contains(&name);
    println!(
        "Cloister performance figures ({} cores, {}), written to bench/results.json\n",
        cores(),
        std::env::consts::ARCH
    );
    // Each section's figures are written as soon as it ends.
    let record = |new: Vec<Figure>| {
        for f in &new {
            f.print();
        }
        write_results(&new);
    };
    for (name, section) in SECTIONS {
        if run(name) {
            record(section());
        }
    }
}

/// Merges `figures` into bench/results.json (figures of other sections stay).
fn write_results(figures: &[Figure]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results.json");
    let mut all: BTreeMap<String, Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["figures"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| Some((f["name"].as_str()?.to_owned(), f)))
        .collect();
    for f in figures {
        all.insert(f.name.clone(), serde_json::to_value(f).unwrap());
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let results = json!({
        "command": "cargo bench -p cloister-host --bench targets",
        "machine": {"cores": cores(), "cpu": cpu, "kernel": kernel.trim()},
        "measured_at_unix": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
        "figures": all.into_values().collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&results).unwrap() + "\n",
    )
    .unwrap();
    let table = markdown(&results);
    std::fs::write(path.with_extension("md"), &table).unwrap();
    update_readme(&table);
}

/// Replaces the README's table (between its bench markers) with `table`, so
/// that the README shows what the last run wrote.
fn update_readme(table: &str) {
    const START: &str =
        "<!-- bench table: written by cargo bench -p cloister-host --bench targets -->\n";
    const END: &str = "<!-- /bench table -->";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let Ok(readme) = std::fs::read_to_string(&path) else {
        return;
    };
    let (Some(start), Some(end)) = (readme.find(START), readme.find(END)) else {
        eprintln!("README.md has no bench markers: its table is not updated");
        return;
    };
    let from = start + START.len();
    if from > end {
        return;
    }
    let updated = format!("{}{table}{}", &readme[..from], &readme[end..]);
    std::fs::write(&path, updated).unwrap();
}

/// The figures as the README's table (bench/results.md).
fn markdown(results: &Value) -> String {
    let n = |v: &Value| {
        let v = v.as_f64().unwrap_or(f64::NAN);
        if v.abs() >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    let mut out = String::from(
        "| figure | median (range, runs) | baseline, ratio | target | |\n|---|---|---|---|---|\n",
    );
    for f in results["figures"].as_array().unwrap() {
        let ratio = if f["ratio"].is_null() {
            String::new()
        } else {
            format!(
                "{}, {:.0} %",
                n(&f["baseline"]),
                f["ratio"].as_f64().unwrap_or(0.0) * 100.0
            )
        };
        let met = match f["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "",
        };
        out += &format!(
            "| {} | {} {} ({}-{}, {}) | {ratio} | {} | {met} |\n",
            f["name"].as_str().unwrap_or_default(),
            n(&f["value"]),
            f["unit"].as_str().unwrap_or_default(),
            n(&f["low"]),
            n(&f["high"]),
            f["runs"],
            f["target"].as_str().unwrap_or_default(),
        );
    }
    out
}

fn must(out: std::process::Output, what: &str) -> std::process::Output {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds a binary of the host workspace with the bench's own profile (in
/// target/release; a `--release` build there would rebuild what the bench's
/// build made, and the next bench build it again).
fn release_binary(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    must(
        Command::new(cargo)
            .args([
                "build",
                "--profile",
                "bench",
                "--locked",
                "-p",
                package,
                "--bin",
                bin,
            ])
            .current_dir(&root)
            .output()
            .unwrap(),
        &format!("building {bin}"),
    );
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    target.join("release").join(bin)
}

/// A key of the admin's that the parent's role may use from any enclave
/// (the benchmark measures the path, not the policy's selectivity).
fn open_key(w: &World, alias: &str) -> String {
    let policy = w.h.path("open.policy.json");
    std::fs::write(
        &policy,
        format!(
            r#"{{"Version":"2012-10-17","Statement":[
              {{"Effect":"Allow","Principal":{{"AWS":["admin","{ROLE}"]}},"Action":"kms:*","Resource":"*"}}]}}"#
        ),
    )
    .unwrap();
    w.broker
        .create_key("admin", &w.broker.data.join("admin.key"), &policy, alias)
}

/// An enclave whose parent is `ROLE`, reaching the broker through the parent's
/// proxy (no test relay in between).
fn launch(w: &World, name: &str, image: &Path) {
    let args = common::run_enclave_args(
        image,
        name,
        ROLE,
        &w.broker.proxy_sock,
        &w.h.path("parent.key"),
    );
    w.h.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// A data key from GenerateDataKey: (plaintext, ciphertext blob).
fn data_key(w: &World, key_id: &str) -> (Vec<u8>, Vec<u8>) {
    use base64::Engine;
    let out = w
        .broker
        .admin(&["kms", "generate-data-key", "--key-id", key_id]);
    let b64 = |k: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(out[k].as_str().unwrap())
            .unwrap()
    };
    (b64("Plaintext"), b64("CiphertextBlob"))
}

fn key_release() -> Vec<Figure> {
    let runs = env_or("RUNS", 5usize);
    let per_run = 200;
    let w = World::new();
    let key_id = open_key(&w, "alias/bench");
    let (_, blob) = data_key(&w, &key_id);
    let trust = w.broker.trust_args();
    let trust: Vec<&str> = trust.iter().map(String::as_str).collect();
    let (image, _) = w.h.build("kms.cimg", &trust);
    launch(&w, "kms", &image);
    let request = format!("kms-decrypt-timed:{per_run};{}", hex::encode(&blob));
    // One call to warm up, then the runs.
    w.h.call_ok(&["--enclave-name", "kms"], request.as_bytes());
    let (mut p50s, mut all) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let out = w.h.call_ok(&["--enclave-name", "kms"], request.as_bytes());
        let mut times: Vec<f64> = String::from_utf8(out)
            .unwrap()
            .split(',')
            .map(|t| t.parse::<f64>().unwrap() / 1000.0)
            .collect();
        times.sort_by(f64::total_cmp);
        p50s.push(percentile(&times, 0.5));
        all.extend(times);
    }
    all.sort_by(f64::total_cmp);
    let p99 = percentile(&all, 0.99);
    let p50 = Figure::new("key_release_p50", "ms", &p50s);
    let met = p50.value < 1.5;
    vec![
        p50.target("< 1.5 ms", met).note(format!(
            "guest kms::decrypt -> runtime -> cloister proxy -> kms serve (processes, Unix sockets); {per_run} releases per run"
        )),
        Figure::new("key_release_p99", "ms", &[p99])
            .note(format!("over all {} releases", all.len())),
    ]
}

/// What a broker client process does (`--broker-client SPEC`): make documents
/// with the platform's NSM, then send attested Decrypts on one connection from
/// `start` until `end` (Unix ms), and print how many were answered in between.
fn broker_client(spec: &Path) {
    use cloister_attestation::nsm::{Nsm, PlatformDir};
    use cloister_kms_api::client::{Credentials, KmsClient};
    use cloister_kms_api::protocol::{EncryptionContext, Operation, Recipient};
    use cloister_kms_api::recipient;
    let spec: Value = serde_json::from_slice(&std::fs::read(spec).unwrap()).unwrap();
    let field = |k: &str| spec[k].as_str().unwrap().to_owned();
    let nsm = Nsm::load(&PlatformDir::new(PathBuf::from(field("platform")))).unwrap();
    let documents: Vec<Vec<u8>> = (0..8).map(|_| recipient_document(&nsm)).collect();
    let blob = hex::decode(field("blob")).unwrap();
    let key = cloister_attestation::keyfile::read_signing_key(Path::new(&field("key"))).unwrap();
    let address: cloister_proto::Address = field("address").parse().unwrap();
    let (start, end) = (
        spec["start"].as_u64().unwrap(),
        spec["end"].as_u64().unwrap(),
    );
    let now_ms = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let count = rt.block_on(async {
        let credentials = Credentials {
            principal: field("principal"),
            key,
        };
        let mut client = KmsClient::connect(&address, None, credentials)
            .await
            .unwrap();
        while now_ms() < start {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut count = 0u64;
        for i in 0.. {
            let op = Operation::Decrypt {
                ciphertext_blob: blob.clone(),
                key_id: None,
                encryption_context: EncryptionContext::new(),
                recipient: Some(Recipient {
                    key_encryption_algorithm: recipient::ALGORITHM.into(),
                    attestation_document: documents[i % documents.len()].clone(),
                }),
            };
            client.call(op).await.unwrap();
            if now_ms() >= end {
                break;
            }
            count += 1;
        }
        count
    });
    println!("{count}");
}

/// How many requests `--broker-client` processes had answered, in all.
fn answered(children: Vec<std::process::Child>) -> u64 {
    children
        .into_iter()
        .map(|c| {
            let out = must(c.wait_with_output().unwrap(), "broker client");
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

/// The file that tells `--broker-client` processes what to do: attested
/// Decrypts of `blob` as admin from `start` until `end` (Unix ms).
fn client_spec(w: &World, blob: &[u8], start: u64, end: u64) -> PathBuf {
    let spec = w.h.path("client.json");
    std::fs::write(
        &spec,
        json!({
            "platform": s(&w.h.path("platform")),
            "address": format!("unix:{}", s(&w.broker.sock)),
            "principal": "admin",
            "key": s(&w.broker.data.join("admin.key")),
            "blob": hex::encode(blob),
            "start": start,
            "end": end,
        })
        .to_string(),
    )
    .unwrap();
    spec
}

/// An attestation document of the platform's NSM over 16 PCRs and a fresh
/// X25519 recipient key, as an enclave sends with each attested request.
fn recipient_document(nsm: &cloister_attestation::nsm::Nsm) -> Vec<u8> {
    use cloister_attestation::nsm::AttestationRequest;
    let pcrs: BTreeMap<usize, cloister_attestation::pcr::Pcr> = (0..16)
        .map(|i| (i, cloister_attestation::pcr::measure(&[i as u8])))
        .collect();
    nsm.attest(
        &AttestationRequest {
            module_id: "bench".into(),
            pcrs,
            public_key: Some(
                cloister_kms_api::recipient::RecipientKey::generate()
                    .public_key()
                    .to_vec(),
            ),
            ..Default::default()
        },
        SystemTime::now(),
    )
    .unwrap()
}

/// The crypto the broker must do per attested decrypt, on one core: verify the
/// request's signature, the document (signature, chain from the cache), seal to
/// the recipient (HPKE), sign the response. Returns microseconds per request.
fn crypto_per_request(w: &World, blob: &[u8]) -> f64 {
    use cloister_attestation::nsm::{Nsm, PlatformDir};
    use cloister_attestation::verify::{ChainCache, TrustAnchor, VerifyOptions};
    use cloister_kms_api::protocol::*;
    use cloister_kms_api::recipient;
    use ed25519_dalek::Signer;
    let nsm = Nsm::load(&PlatformDir::new(w.h.path("platform"))).unwrap();
    let root = cloister_attestation::nsm::read_pem_certificates(&w.h.path("platform/root.pem"))
        .unwrap()
        .remove(0);
    let client = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let broker = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let opts = VerifyOptions {
        anchors: vec![TrustAnchor::from_der("bench", root).unwrap()],
        max_age: Some(Duration::from_secs(300)),
        chain_cache: Some(std::sync::Arc::new(ChainCache::default())),
        ..Default::default()
    };
    let n = 400;
    let inputs: Vec<(Vec<u8>, Vec<u8>, ed25519_dalek::Signature)> = (0..n)
        .map(|i| {
            let document = recipient_document(&nsm);
            let payload = cloister_proto::frame::encode(&RequestPayload {
                principal: "admin".into(),
                timestamp_ms: 0,
                request_id: format!("{i:032x}"),
                operation: Operation::Decrypt {
                    ciphertext_blob: blob.to_vec(),
                    key_id: None,
                    encryption_context: EncryptionContext::new(),
                    recipient: Some(Recipient {
                        key_encryption_algorithm: recipient::ALGORITHM.into(),
                        attestation_document: document.clone(),
                    }),
                },
            })
            .unwrap();
            let signature = client.sign(&[REQUEST_LABEL, &payload].concat());
            (document, payload, signature)
        })
        .collect();
    let verifying = client.verifying_key();
    let t = Instant::now();
    for (document, payload, signature) in &inputs {
        verifying
            .verify_strict(&[REQUEST_LABEL, payload].concat(), signature)
            .unwrap();
        let v = cloister_attestation::verify(document, &opts).unwrap();
        let sealed = recipient::seal(
            v.public_key.as_deref().unwrap(),
            recipient::info("arn", "Decrypt", "id"),
            recipient::aad(document),
            &[1; 32],
        )
        .unwrap();
        let response = Response {
            request_id: "id".into(),
            request_digest: request_digest(payload),
            result: Ok(Output::Plaintext {
                key_id: Some("arn".into()),
                plaintext: None,
                ciphertext_for_recipient: Some(CiphertextForRecipient {
                    ciphertext: sealed.ciphertext,
                    info: sealed.info,
                    aad: sealed.aad,
                }),
            }),
        };
        std::hint::black_box(SignedResponse::sign(&response, &broker).unwrap());
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn broker() -> Vec<Figure> {
    let runs = env_or("RUNS", 3usize);
    let seconds = env_or("BROKER_SECONDS", 3u64);
    let w = World::new();
    let key_id = open_key(&w, "alias/bench");
    let (_, blob) = data_key(&w, &key_id);
    let me = std::env::current_exe().unwrap();
    let levels: Vec<usize> = std::env::var("BROKER_CLIENTS")
        .ok()
        .map(|l| l.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16, 64]);
    let mut rates: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut floors = Vec::new();
    let mut ratios: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut crypto_us = Vec::new();
    // CPU seconds (user + system) from /proc/PID/stat: `first` is the index
    // of utime (11) or, for waited-for children, cutime (13).
    let cpu_s = |pid: String, first: usize| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: f64 =
            fields[first].parse::<f64>().unwrap() + fields[first + 1].parse::<f64>().unwrap();
        ticks / 100.0
    };
    let broker_cpu_s = || cpu_s(w.broker.pid().to_string(), 11);
    let clients_cpu_s = || cpu_s("self".into(), 13);
    let mut client_cpu: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for _ in 0..runs {
        let crypto = crypto_per_request(&w, &blob);
        crypto_us.push(crypto);
        let floor = cores() as f64 * 1e6 / crypto;
        floors.push(floor);
        for &clients in &levels {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            // Time for every client process to start and connect.
            let start = now + 1500 + 20 * clients as u64;
            let spec = client_spec(&w, &blob, start, start + seconds * 1000);
            let children: Vec<_> = (0..clients)
                .map(|_| {
                    Command::new(&me)
                        .arg("--broker-client")
                        .arg(&spec)
                        .stdout(std::process::Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            let cpu_before = broker_cpu_s();
            let clients_before = clients_cpu_s();
            let total = answered(children);
            let rate = total as f64 / seconds as f64;
            // The broker's CPU over the whole client run (set-up included), per
            // request counted: an upper bound.
            cpu.entry(clients)
                .or_default()
                .push((broker_cpu_s() - cpu_before) * 1e6 / total as f64);
            client_cpu
                .entry(clients)
                .or_default()
                .push((clients_cpu_s() - clients_before) * 1e6 / total as f64);
            rates.entry(clients).or_default().push(rate);
            ratios.entry(clients).or_default().push(rate / floor);
        }
    }
    let (floor, ..) = median_and_range(floors.clone());
    let mut figures = vec![
        Figure::new("broker_crypto_floor", "decrypts/s", &floors).note(format!(
            "{} cores x 1/(crypto per request: request + document signatures, HPKE seal, response signature)",
            cores()
        )),
    ];
    for (clients, values) in rates {
        let (ratio, ..) = median_and_range(ratios[&clients].clone());
        let mut f = Figure::new(&format!("broker_decrypts_{clients}_clients"), "decrypts/s", &values)
            .baseline(floor, ratio)
            .note(format!(
                "{clients} client processes, one connection each, {seconds} s per run; ratio = median of per-run rate / floor"
            ));
        if clients == 16 {
            f = f.target(">= 80% of floor", ratio >= 0.8);
        }
        figures.push(f);
    }
    let (crypto, ..) = median_and_range(crypto_us);
    for (clients, values) in cpu {
        let (value, ..) = median_and_range(values.clone());
        let (client, ..) = median_and_range(client_cpu[&clients].clone());
        figures.push(
            Figure::new(&format!("broker_cpu_per_request_{clients}_clients"), "us", &values)
                .baseline(crypto, crypto / value)
                .note(format!(
                    "broker process CPU (user + system, /proc) per answered request; baseline = its crypto per request; ratio = crypto share; the client processes (same cores) used {client:.0} us per request"
                )),
        );
    }
    figures
}

/// One call as the admin of the broker at `sock`, on a connection of its own.
fn admin_call(
    sock: &Path,
    admin_key: &Path,
    op: cloister_kms_api::protocol::Operation,
) -> cloister_kms_api::protocol::Output {
    use cloister_kms_api::client::{Credentials, KmsClient};
    let credentials = Credentials {
        principal: "admin".into(),
        key: cloister_attestation::keyfile::read_signing_key(admin_key).unwrap(),
    };
    let address = cloister_proto::Address::Unix(sock.to_path_buf());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            KmsClient::connect(&address, None, credentials)
                .await
                .unwrap()
                .call(op)
                .await
                .unwrap()
        })
}

/// CPU seconds (user + system) of the processes `pids`, from /proc.
fn cpu_seconds_of(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
        })
        .sum()
}

/// The PostgreSQL server's processes: the postmaster and its children.
fn postgres_pids(postmaster: u32) -> Vec<u32> {
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat[stat.rfind(')').unwrap() + 2..].split(' ').nth(1);
        if ppid == Some(postmaster.to_string().as_str()) {
            pids.push(pid);
        }
    }
    pids
}

fn replicas() -> Vec<Figure> {
    use cloister_kms_api::protocol::{EncryptionContext, Operation, Output, Secret};
    let Some(pg) = common::postgres::Postgres::start() else {
        return Vec::new();
    };
    let runs = env_or("RUNS", 3usize);
    let seconds = env_or("BROKER_SECONDS", 3u64);
    let clients = env_or("REPLICA_CLIENTS", 16usize);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    common::ok_json(&["platform", "init", "--dir", s(&path("platform"))]);
    let root = cloister_attestation::nsm::read_pem_certificates(&path("platform/root.pem"))
        .unwrap()
        .remove(0);
    let url = pg.create_database("bench");
    common::ok_json(&["kms", "init", "--data-dir", s(&path("sqlite"))]);
    common::ok_json(&["kms", "init", "--data-dir", s(&path("r0")), "--store", &url]);
    for i in 1..3 {
        must(
            Command::new("cp")
                .arg("-a")
                .arg(path("r0"))
                .arg(path(&format!("r{i}")))
                .output()
                .unwrap(),
            "copying the data directory",
        );
    }
    // Rate limits off: the figure is throughput.
    let serve = |data: &str| {
        let sock = path(&format!("{data}.sock"));
        let _ = std::fs::remove_file(&sock);
        let server = common::Server::start(
            &[
                "kms",
                "serve",
                "--data-dir",
                s(&path(data)),
                "--listen",
                &format!("unix:{}", s(&sock)),
                "--replica",
                data,
                "--rate",
                "1000000000",
            ],
            &[],
            &sock,
        );
        (server, sock)
    };
    // One key and blob per keystore (the SQLite one, the shared one).
    let mut blobs = BTreeMap::new();
    for data in ["sqlite", "r0"] {
        let (server, sock) = serve(data);
        let admin = path(data).join("admin.key");
        admin_call(
            &sock,
            &admin,
            Operation::TrustAdd {
                label: "bench".into(),
                root_der: root.clone(),
            },
        );
        let Output::KeyMetadata(key) = admin_call(
            &sock,
            &admin,
            Operation::CreateKey {
                description: "bench".into(),
                policy: None,
            },
        ) else {
            panic!("CreateKey");
        };
        let Output::Ciphertext {
            ciphertext_blob, ..
        } = admin_call(
            &sock,
            &admin,
            Operation::Encrypt {
                key_id: key.key_id,
                plaintext: Secret::new(vec![1; 32]),
                encryption_context: EncryptionContext::new(),
            },
        )
        else {
            panic!("Encrypt");
        };
        blobs.insert(data, ciphertext_blob);
        drop(server);
    }
    let me = std::env::current_exe().unwrap();
    let configs: [(&str, usize); 4] = [
        ("sqlite", 1),
        ("postgres", 1),
        ("postgres", 2),
        ("postgres", 3),
    ];
    let mut rates: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut ratios: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut broker_us: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut pg_us: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let postmaster = pg.pid();
    for _ in 0..runs {
        let mut sqlite_rate = 0.0;
        for (n, (store, replicas)) in configs.iter().enumerate() {
            let names: Vec<String> = match *store {
                "sqlite" => vec!["sqlite".into()],
                _ => (0..*replicas).map(|i| format!("r{i}")).collect(),
            };
            let servers: Vec<_> = names.iter().map(|d| serve(d)).collect();
            let blob = &blobs[if *store == "sqlite" { "sqlite" } else { "r0" }];
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let start = now + 1500 + 20 * clients as u64;
            let specs: Vec<PathBuf> = names
                .iter()
                .zip(&servers)
                .map(|(name, (_, sock))| {
                    let spec = path(&format!("{name}-client.json"));
                    std::fs::write(
                        &spec,
                        json!({
                            "platform": s(&path("platform")),
                            "address": format!("unix:{}", s(sock)),
                            "principal": "admin",
                            "key": s(&path(name).join("admin.key")),
                            "blob": hex::encode(blob),
                            "start": start,
                            "end": start + seconds * 1000,
                        })
                        .to_string(),
                    )
                    .unwrap();
                    spec
                })
                .collect();
            let children: Vec<_> = (0..clients)
                .map(|c| {
                    Command::new(&me)
                        .arg("--broker-client")
                        .arg(&specs[c % specs.len()])
                        .stdout(std::process::Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            let broker_pids: Vec<u32> = servers.iter().map(|(srv, _)| srv.pid()).collect();
            let pg_pids = postgres_pids(postmaster);
            let (broker_before, pg_before) =
                (cpu_seconds_of(&broker_pids), cpu_seconds_of(&pg_pids));
            let total = answered(children);
            let rate = total as f64 / seconds as f64;
            broker_us
                .entry(n)
                .or_default()
                .push((cpu_seconds_of(&broker_pids) - broker_before) * 1e6 / total as f64);
            pg_us.entry(n).or_default().push(
                (cpu_seconds_of(&postgres_pids(postmaster)) - pg_before) * 1e6 / total as f64,
            );
            if n == 0 {
                sqlite_rate = rate;
            }
            rates.entry(n).or_default().push(rate);
            ratios.entry(n).or_default().push(rate / sqlite_rate);
            drop(servers);
        }
    }
    let (sqlite, ..) = median_and_range(rates[&0].clone());
    configs
        .iter()
        .enumerate()
        .map(|(n, (store, replicas))| {
            let (ratio, ..) = median_and_range(ratios[&n].clone());
            let (broker, ..) = median_and_range(broker_us[&n].clone());
            let (db, ..) = median_and_range(pg_us[&n].clone());
            let name = match *store {
                "sqlite" => format!("replicas_sqlite_1_broker_{clients}_clients"),
                _ => format!("replicas_postgres_{replicas}_{clients}_clients"),
            };
            let mut f = Figure::new(&name, "decrypts/s", &rates[&n]).note(format!(
                "{clients} client processes spread over the {replicas} broker(s); CPU per decrypt: brokers {broker:.0} us, PostgreSQL {db:.0} us (/proc, user + system)"
            ));
            if n > 0 {
                f = f.baseline(sqlite, ratio);
            }
            f
        })
        .collect()
}

/// What a flooding process does (`--flood-client ADDRESS START END`, as
/// another uid, so on its command line): from `start` until
/// `end`, send requests no principal signed (an unknown 200-byte principal
/// name, a junk signature) as fast as answers come, reconnecting whenever the
/// broker cuts it off; prints how many it sent.
fn flood_client(args: &[String]) {
    use cloister_kms_api::protocol::{MAX_MESSAGE, Operation, RequestPayload, SignedRequest};
    let address: cloister_proto::Address = args[0].parse().unwrap();
    let (start, end): (u64, u64) = (args[1].parse().unwrap(), args[2].parse().unwrap());
    let now_ms = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let forger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sent = rt.block_on(async {
        while now_ms() < start {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut sent = 0u64;
        while now_ms() < end {
            let Ok(mut stream) = cloister_proto::connect(&address).await else {
                continue;
            };
            loop {
                let payload = RequestPayload {
                    principal: "z".repeat(200),
                    timestamp_ms: now_ms(),
                    request_id: format!("{sent:032}"),
                    operation: Operation::ListKeys,
                };
                let signed = SignedRequest::sign(&payload, &forger).unwrap();
                sent += 1;
                let answered = cloister_proto::frame::send(&mut stream, &signed, MAX_MESSAGE)
                    .await
                    .is_ok()
                    && matches!(
                        cloister_proto::frame::read_frame(&mut stream, MAX_MESSAGE).await,
                        Ok(Some(_))
                    );
                if !answered || now_ms() >= end {
                    break;
                }
            }
        }
        sent
    });
    println!("{sent}");
}

/// Authenticated throughput with and without an unauthenticated flood from
/// another uid, and what the flood costs the audit log.
fn flood() -> Vec<Figure> {
    if !nix::unistd::geteuid().is_root() {
        println!("flood: skipped (needs root, to flood from another uid with setpriv)");
        return Vec::new();
    }
    let runs = env_or("RUNS", 3usize);
    let seconds = env_or("BROKER_SECONDS", 3u64);
    let (clients, flooders) = (4usize, 4usize);
    let w = World::new();
    let key_id = open_key(&w, "alias/flood");
    let (_, blob) = data_key(&w, &key_id);
    let me = std::env::current_exe().unwrap();
    // Any local user may reach and connect to the broker's socket (what a
    // broker serving several uids allows).
    use std::os::unix::fs::PermissionsExt;
    let traverse = w.broker.sock.parent().unwrap();
    std::fs::set_permissions(traverse, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&w.broker.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let audit_log = w.broker.data.join("audit.log");
    let audit_len = || std::fs::metadata(&audit_log).unwrap().len();
    // The bytes of the lines written since `from` that are not the
    // authenticated clients' own records.
    let flood_bytes = |from: u64| {
        let text = std::fs::read(&audit_log).unwrap();
        text[from as usize..]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty() && !l.windows(19).any(|w| w == b"\"principal\":\"admin\""))
            .map(|l| l.len() as u64 + 1)
            .sum::<u64>()
    };
    let (mut ratios, mut quiet_rates, mut flooded_rates) = (Vec::new(), Vec::new(), Vec::new());
    let (mut audit_rates, mut flood_rates) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut pair = [0.0; 2];
        for (i, flooded) in [false, true].into_iter().enumerate() {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let start = now + 1500;
            let end = start + seconds * 1000;
            let spec = client_spec(&w, &blob, start, end);
            let spawn = |args: &[&str]| {
                Command::new(args[0])
                    .args(&args[1..])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            };
            let (me, spec) = (s(&me), s(&spec));
            let address = format!("unix:{}", s(&w.broker.sock));
            let (start, end) = (start.to_string(), end.to_string());
            let legit: Vec<_> = (0..clients)
                .map(|_| spawn(&[me, "--broker-client", spec]))
                .collect();
            let attackers: Vec<_> = (0..if flooded { flooders } else { 0 })
                .map(|_| {
                    spawn(&[
                        "setpriv",
                        "--reuid=65534",
                        "--regid=65534",
                        "--clear-groups",
                        "--",
                        me,
                        "--flood-client",
                        &address,
                        &start,
                        &end,
                    ])
                })
                .collect();
            let bytes_before = audit_len();
            let count = |c: std::process::Child, what: &str| {
                let out = must(c.wait_with_output().unwrap(), what);
                String::from_utf8(out.stdout)
                    .unwrap()
                    .trim()
                    .parse::<u64>()
                    .unwrap()
            };
            let answered: u64 = legit.into_iter().map(|c| count(c, "broker client")).sum();
            let sent: u64 = attackers
                .into_iter()
                .map(|c| count(c, "flood client"))
                .sum();
            let rate = answered as f64 / seconds as f64;
            pair[i] = rate;
            if flooded {
                flooded_rates.push(rate);
                flood_rates.push(sent as f64 / seconds as f64);
                audit_rates.push(flood_bytes(bytes_before) as f64 / seconds as f64);
            } else {
                quiet_rates.push(rate);
            }
        }
        ratios.push(pair[1] / pair[0]);
    }
    let (quiet, ..) = median_and_range(quiet_rates);
    let (ratio, ..) = median_and_range(ratios);
    let (flood_rate, ..) = median_and_range(flood_rates);
    vec![
        Figure::new("broker_decrypts_under_flood", "decrypts/s", &flooded_rates)
            .baseline(quiet, ratio)
            .note(format!(
                "{clients} authenticated client processes with {flooders} processes of another uid flooding unauthenticated requests ({flood_rate:.0}/s sent, reconnecting when cut off); baseline = the same clients without the flood, runs paired; ratio = median of per-pair ratios"
            )),
        Figure::new("audit_bytes_per_s_of_flood", "B/s", &audit_rates).note(
            "audit log lines written during the flood other than the authenticated clients' records: bounded by 20 records/s of at most ~2 KB, plus checkpoints",
        ),
    ]
}

fn scoring() -> Vec<Figure> {
    let pairs = env_or("PAIRS", 5usize);
    let rows: u64 = env_or("ROWS", 200_000);
    let phi_gen = release_binary("phi-model", "phi-gen");
    let w = World::new();
    let key_id = open_key(&w, "alias/phi-results");
    let (plain_key, blob) = data_key(&w, &key_id);
    // The sealed input, as `cloister encrypt` would write it.
    let csv: Vec<String> = phi_model::generate::patients(7, rows, 0).collect();
    let dk = cloister_sealed::DataKey::new(plain_key.clone().into()).unwrap();
    let mut writer = cloister_sealed::Writer::new(
        Vec::new(),
        &dk,
        &key_id,
        blob,
        vec![],
        cloister_sealed::DEFAULT_CHUNK_SIZE,
        [3; 7],
    )
    .unwrap();
    for line in &csv {
        writer.write_record(line.as_bytes()).unwrap();
    }
    let input = w.h.path("patients.sealed");
    std::fs::write(&input, writer.finish().unwrap()).unwrap();
    let key_file = w.h.path("data.key");
    std::fs::write(&key_file, &plain_key).unwrap();
    let (image, _) = w.broker.scorer_image(
        &w.h,
        "study=bench",
        "scorer.cimg",
        &["--memory-mib", "1024", "--cpu-ms-per-call", "600000"],
    );
    launch(&w, "scorer", &image);
    let scored = |stdout: &[u8]| {
        let line = stdout.split(|b| *b == b'\n').next().unwrap();
        serde_json::from_slice::<Value>(line).unwrap()["scored"]
            .as_u64()
            .unwrap()
    };
    let native = || {
        let t = Instant::now();
        let out = must(
            Command::new(&phi_gen)
                .args(["--score-sealed", s(&input), "--data-key", s(&key_file)])
                .output()
                .unwrap(),
            "phi-gen --score-sealed",
        );
        let elapsed = t.elapsed();
        assert_eq!(scored(&out.stdout), rows);
        elapsed
    };
    let enclave = || {
        let t = Instant::now();
        let out = must(
            w.h.run(&["call", "--enclave-name", "scorer", "--input", s(&input)]),
            "cloister call",
        );
        let elapsed = t.elapsed();
        assert_eq!(scored(&out.stdout), rows);
        elapsed
    };
    native();
    enclave();
    let (ratios, native_ms, enclave_ms) = paired(pairs, native, enclave);
    let (ratio, ..) = median_and_range(ratios.clone());
    let (n, ..) = median_and_range(native_ms);
    let mut f = Figure::new("phi_scoring_vs_native", "ratio", &ratios)
        .target(">= 80%", ratio >= 0.8)
        .note(format!(
            "{rows} records: cloister call (2 attested key releases, decrypt, score, seal) vs phi-gen --score-sealed, processes; median enclave {:.0} ms, native {n:.0} ms",
            median_and_range(enclave_ms).0
        ));
    f.baseline = Some(1.0);
    f.ratio = Some(ratio);
    vec![f]
}

/// `pairs` pairs of (native, enclave), alternating which runs first; returns the
/// per-pair ratios native/enclave and the times (ms).
fn paired(
    pairs: usize,
    native: impl Fn() -> Duration,
    enclave: impl Fn() -> Duration,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut ratios, mut n_ms, mut e_ms) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..pairs {
        let (n, e) = if pair % 2 == 0 {
            let n = native();
            (n, enclave())
        } else {
            let e = enclave();
            (native(), e)
        };
        ratios.push(n.as_secs_f64() / e.as_secs_f64());
        n_ms.push(n.as_secs_f64() * 1e3);
        e_ms.push(e.as_secs_f64() * 1e3);
    }
    (ratios, n_ms, e_ms)
}

fn start() -> Vec<Figure> {
    let runs = env_or("RUNS", 10usize);
    let h = common::Host::new();
    let (image, _) = h.build("t.cimg", &[]);
    let cache = h.path("state/cache");
    let launch = |cold: bool| {
        if cold {
            for entry in std::fs::read_dir(&cache).unwrap() {
                std::fs::remove_file(entry.unwrap().path()).unwrap();
            }
        }
        let t = Instant::now();
        h.ok(&["run-enclave", "--image", s(&image), "--enclave-name", "s"]);
        let elapsed = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(h.call_ok(&["--enclave-name", "s"], b"echo:up"), b"up");
        h.ok(&["terminate-enclave", "--enclave-name", "s"]);
        elapsed
    };
    launch(false);
    // The floor: creating a process on this machine (run-enclave starts two:
    // the CLI and the runtime).
    let exec_true = || {
        let t = Instant::now();
        assert!(Command::new("true").status().unwrap().success());
        t.elapsed().as_secs_f64() * 1e3
    };
    let mut warm = Vec::new();
    let mut cold = Vec::new();
    let mut process = Vec::new();
    for i in 0..runs {
        process.push(exec_true());
        if i % 2 == 0 {
            warm.push(launch(false));
            cold.push(launch(true));
        } else {
            cold.push(launch(true));
            warm.push(launch(false));
        }
    }
    let w = Figure::new("start_warm", "ms", &warm);
    let met = w.value <= 10.0;
    let (floor, ..) = median_and_range(process.clone());
    let ratio = floor / w.value;
    vec![
        w.target("<= 10 ms", met)
            .baseline(floor, ratio)
            .note(format!(
                "cloister run-enclave until the enclave serves, compiled code cached (the CLI process included); baseline: one `true` process, {floor:.1} ms here (run-enclave starts two)"
            )),
        Figure::new("start_cold", "ms", &cold)
            .note("as start_warm, the supervisor compiling the component first"),
    ]
}

fn pss_kib(pid: u64) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("Pss:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn density() -> Vec<Figure> {
    let n = env_or("DENSITY", 100usize);
    let mut h = common::Host::new();
    let (image, _) = h.build("t.cimg", &[]);
    let t = Instant::now();
    let env = h.env();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    must(
                        common::cloister_env(
                            &[
                                "run-enclave",
                                "--image",
                                s(&image),
                                "--enclave-name",
                                &format!("e{i}"),
                            ],
                            &env,
                        ),
                        "run-enclave",
                    );
                }
            });
        }
    });
    let launched = t.elapsed().as_secs_f64();
    for i in [0, n / 2, n - 1] {
        assert_eq!(
            h.call_ok(&["--enclave-name", &format!("e{i}")], b"echo:ok"),
            b"ok"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let enclaves = h.ok(&["describe-enclaves"]);
    let pss: Vec<f64> = enclaves
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| pss_kib(e["ProcessID"].as_u64()?))
        .map(|k| k as f64 / 1024.0)
        .collect();
    assert_eq!(pss.len(), n, "every enclave's runtime is running");
    let f = Figure::new("idle_enclave_pss", "MiB", &pss);
    let met = f.value <= 3.0;
    // SIGKILL: the runtimes die with the supervisor (tearing down a thousand
    // network namespaces one by one would outlast the polite shutdown's wait).
    if let Some(supervisor) = h.supervisor.take() {
        supervisor.kill();
    }
    vec![f.target("<= 3 MiB", met).note(format!(
        "{n} idle enclaves of one image (runs = enclaves), launched in {launched:.1} s; PSS of each runtime process"
    ))]
}

/// Confidential inference: `cloister call --part` through the supervisor to the
/// enclave (two attested key releases, the model and records unsealed, tract,
/// the predictions sealed) against `inference-native score` (the same engine,
/// model and records, plaintext, in its own process), paired.
fn inference() -> Vec<Figure> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    must(
        Command::new(cargo)
            .args([
                "build",
                "--release",
                "--locked",
                "-p",
                "inference-engine",
                "--bin",
                "inference-native",
                "--manifest-path",
            ])
            .arg(examples.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", examples.join("target"))
            .output()
            .unwrap(),
        "building inference-native",
    );
    let native = examples.join("target/release/inference-native");
    let pairs = env_or("PAIRS", 5usize);
    let w = World::new();
    let images: Vec<_> = MODELS
        .iter()
        .map(|m| w.image(m, &["--memory-mib", "1024", "--cpu-ms-per-call", "600000"]))
        .collect();
    let pcr0s: Vec<&str> = images.iter().map(|(_, p)| p.as_str()).collect();
    w.create_keys(&pcr0s);
    let mut figures = Vec::new();
    // MODELS=logreg,mlp measures some of the models only.
    let only: String = env_or("MODELS", String::new());
    for (model, (image, _)) in MODELS.iter().zip(&images) {
        if !only.is_empty() && !only.split(',').any(|m| m == *model) {
            continue;
        }
        // tract's tree ensemble walks its leaf table linearly: ~4,000 records/s
        // for the forest natively, so it gets a tenth of the records.
        let rows: u64 = if *model == "forest" { 10_000 } else { 100_000 };
        let csv = w.h.path(&format!("synthetic-{rows}.csv"));
        if !csv.exists() {
            let out = must(
                Command::new(&native)
                    .arg("generate")
                    .arg(example("data/distribution.json"))
                    .args([rows.to_string(), "7".into()])
                    .output()
                    .unwrap(),
                "inference-native generate",
            );
            std::fs::write(&csv, out.stdout).unwrap();
        }
        let records = w.seal(
            "data-owner",
            "alias/records",
            &format!("{RECORDS_CONTEXT},study=synthetic"),
            &csv,
            &format!("synthetic-{rows}.sealed"),
        );
        let onnx = example(&format!("models/{model}.onnx"));
        let sealed_model = w.seal(
            "model-owner",
            "alias/model",
            &format!("{MODEL_CONTEXT},model={model}"),
            &onnx,
            &format!("{model}.sealed"),
        );
        launch(&w, model, image);
        let run_native = || {
            let t = Instant::now();
            must(
                Command::new(&native)
                    .arg("score")
                    .args([&onnx, &csv])
                    .output()
                    .unwrap(),
                "inference-native score",
            );
            t.elapsed()
        };
        let run_enclave = || {
            let t = Instant::now();
            let out = must(
                w.call(model, &sealed_model, &records),
                "cloister call --part",
            );
            let summary = out.stdout.split(|b| *b == b'\n').next().unwrap_or_default();
            let summary: Value = serde_json::from_slice(summary).unwrap();
            assert_eq!(summary["scored"], rows, "the enclave scored every record");
            t.elapsed()
        };
        run_native();
        run_enclave();
        let (ratios, native_ms, enclave_ms) = paired(pairs, run_native, run_enclave);
        let (ratio, ..) = median_and_range(ratios.clone());
        let rps = |ms: Vec<f64>| rows as f64 * 1e3 / median_and_range(ms).0;
        let mut f = Figure::new(&format!("inference_{model}_vs_native"), "ratio", &ratios)
            .target(">= 80%", ratio >= 0.8)
            .note(format!(
                "{rows} records; records/s medians: enclave {:.0}, native {:.0} (processes, model load included)",
                rps(enclave_ms),
                rps(native_ms)
            ));
        f.baseline = Some(1.0);
        f.ratio = Some(ratio);
        figures.push(f);
    }
    figures
}

fn channel() -> Vec<Figure> {
    use cloister_proto::call::CallKind;
    use cloister_supervisor::protocol::{Which, call_enclave};
    let runs = env_or("RUNS", 5usize);
    let per_run = 200;
    let h = common::Host::new();
    let (_, built) = h.launch_scorer();
    let pcr0 = hex::decode(built["Measurements"]["PCR0"].as_str().unwrap()).unwrap();
    let expect = cloister_channel::Expectations::from_root_pem(
        &std::fs::read(h.path("platform/root.pem")).unwrap(),
    )
    .unwrap()
    .pcr(0, pcr0);
    let supervisor: cloister_proto::Address = format!("unix:{}", s(&h.path("supervisor.sock")))
        .parse()
        .unwrap();
    let which = Which {
        name: Some("scorer".into()),
        ..Default::default()
    };
    let record = b"patient-1,F,61,212,47,141,1,0,1\n";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let send = |kind: CallKind, body: &[u8]| {
        rt.block_on(call_enclave(&supervisor, which.clone(), &kind, body))
            .unwrap()
    };
    let attest = || {
        let t = Instant::now();
        let nonce = cloister_channel::new_nonce();
        let doc = send(
            CallKind::ChannelAttestation {
                nonce: Some(serde_bytes::ByteBuf::from(nonce.to_vec())),
            },
            &[],
        );
        let enclave = cloister_channel::verify(&doc, &nonce, &expect).unwrap();
        (enclave, t.elapsed().as_secs_f64() * 1e3)
    };
    let (enclave, _) = attest();
    let plain = || {
        let t = Instant::now();
        let out = send(CallKind::Workload, record);
        assert!(out.starts_with(b"patient_id"));
        t.elapsed().as_secs_f64() * 1e3
    };
    let attested = || {
        let t = Instant::now();
        let (request, pending) = enclave.seal(record).unwrap();
        let out = pending.open(&send(CallKind::Channel, &request)).unwrap();
        assert!(out.starts_with(b"patient_id"));
        t.elapsed().as_secs_f64() * 1e3
    };
    plain();
    attested();
    let (mut plain_p50, mut attested_p50, mut ratios, mut overheads, mut attestations) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (mut p, mut a) = (Vec::new(), Vec::new());
        for i in 0..per_run {
            if i % 2 == 0 {
                p.push(plain());
                a.push(attested());
            } else {
                a.push(attested());
                p.push(plain());
            }
        }
        p.sort_by(f64::total_cmp);
        a.sort_by(f64::total_cmp);
        let (p50, a50) = (percentile(&p, 0.5), percentile(&a, 0.5));
        plain_p50.push(p50);
        attested_p50.push(a50);
        ratios.push(p50 / a50);
        overheads.push(a50 - p50);
        attestations.push(attest().1);
    }
    let (plain_ms, ..) = median_and_range(plain_p50);
    let (ratio, ..) = median_and_range(ratios);
    vec![
        Figure::new("channel_request_p50", "ms", &attested_p50)
            .baseline(plain_ms, ratio)
            .note(format!(
                "one PHI record, sealed to the enclave's channel key and opened by the client, vs the same record in the clear (baseline), interleaved; {per_run} of each per run, client -> supervisor -> runtime over Unix sockets"
            )),
        Figure::new("channel_overhead_p50", "ms", &overheads)
            .note("p50 with the channel minus p50 without, per run: HPKE, AES-256-GCM and Binary HTTP both ways"),
        Figure::new("channel_attestation", "ms", &attestations)
            .note("a fresh document over the client's nonce, fetched and verified (once per session, not per request)"),
    ]
}
