//! `cloister kms ...`: the key broker's server, admin and client commands, in
//! the shape of `aws kms` (JSON out, `file://` and `fileb://` inputs, binary
//! values in base64).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::bail;
use base64::Engine;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use cloister_attestation::keyfile;
use cloister_attestation::nsm::read_pem_certificates;
use cloister_attestation::verify::TrustAnchor;
use cloister_kms::audit;
use cloister_kms::datadir::DataDir;
use cloister_kms::policy::{Policy, PolicyKind};
use cloister_kms::protocol::{EncryptionContext, Operation, Output, Recipient, Secret};
use cloister_kms::server::{AwsApi, ServerLimits, serve};
use cloister_kms::service::BrokerConfig;
use cloister_kms_api::client::{Credentials, KmsClient};
use cloister_kms_api::tls::ClientTls;
use cloister_proto::Address;

use crate::errors::UsageError;

#[derive(Subcommand)]
pub enum KmsCommand {
    /// Create a data directory: keystore, root key, broker key, admin principal.
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        /// Derive the root key from the passphrase in this environment variable
        /// (Argon2id) instead of writing root.key.
        #[arg(long)]
        passphrase_env: Option<String>,
        /// Another name (DNS or IP) for the broker's TLS certificate, besides
        /// localhost, 127.0.0.1 and ::1. Repeatable.
        #[arg(long = "tls-name")]
        tls_names: Vec<String>,
        /// Keep the keystore, the audit chain and the request ids used in a
        /// PostgreSQL database shared by broker replicas
        /// (postgres://USER[:PASSWORD]@HOST:PORT/DB) instead of keystore.db.
        #[arg(long)]
        store: Option<String>,
        /// The CA certificates (PEM) that issued PostgreSQL's certificate: the
        /// replicas then speak TLS to it (required off loopback), checking it.
        #[arg(long, requires = "store")]
        store_ca: Option<PathBuf>,
    },
    /// Serve the broker on one or more addresses until SIGTERM or SIGINT.
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        /// unix:PATH, vsock:CID:PORT or tcp:HOST:PORT (TLS 1.3). Repeatable.
        #[arg(long = "listen", required = true)]
        listen: Vec<String>,
        /// The TLS certificate chain for tcp: listeners (default: the data dir's tls/server.pem).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Its private key (default: tls/server.key).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        #[arg(long)]
        passphrase_env: Option<String>,
        /// Most connections open at once (a newcomer displaces the one idle longest).
        #[arg(long, default_value_t = 1024)]
        max_connections: usize,
        /// Most connections open at once from one peer (uid, IP address or CID).
        #[arg(long, default_value_t = 256)]
        max_connections_per_peer: usize,
        /// Sustained requests per second allowed per principal.
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        /// Oldest Recipient attestation document accepted, in seconds.
        #[arg(long, default_value_t = 300)]
        max_document_age: u64,
        /// Also serve the AWS KMS JSON API (SigV4; boto3, the aws CLI) on
        /// tcp:HOST:PORT, over HTTPS with the broker's certificate. Repeatable.
        #[arg(long = "aws-api")]
        aws_api: Vec<String>,
        /// Serve the AWS API over plain HTTP instead (loopback addresses only).
        #[arg(long, requires = "aws_api")]
        aws_api_plain_http: bool,
        /// The region that SigV4 credential scopes must name.
        #[arg(long, default_value = cloister_kms::aws::DEFAULT_REGION)]
        aws_region: String,
        /// This broker's name among the replicas of a shared store (recorded
        /// in the audit lines it writes; default HOSTNAME:PID).
        #[arg(long)]
        replica: Option<String>,
        /// Serve liveness (GET /healthz) and readiness (GET /readyz: the
        /// keystore's store answers) over plain HTTP on tcp:HOST:PORT.
        #[arg(long)]
        health: Option<String>,
    },
    /// Rotate the root key: re-seal every key's material and every access
    /// key's secret under a new one, in one audited transaction. Stop the
    /// broker first (a SQLite data directory refuses while one serves); give
    /// replicas of a shared store the new root.key (or passphrase) and restart them.
    RotateRootKey {
        #[arg(long)]
        data_dir: PathBuf,
        /// The current passphrase (passphrase mode).
        #[arg(long)]
        passphrase_env: Option<String>,
        /// The new passphrase (passphrase mode; file mode writes a new root.key).
        #[arg(long)]
        new_passphrase_env: Option<String>,
    },
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Warn about valid but risky policies (exit 1 when there are warnings).
    LintPolicy {
        /// file://policy.json
        policy: String,
        /// Lint an identity policy (default: a key policy).
        #[arg(long)]
        identity: bool,
    },
    /// Trusted attestation roots (admin).
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Principals (admin).
    #[command(subcommand)]
    Principal(PrincipalCommand),
    #[command(flatten)]
    Key(KeyCommand),
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain, the checkpoint signatures and the recorded head.
    Verify {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Print the last records.
    Tail {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
}

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// The broker's address.
    #[arg(long, env = "CLOISTER_KMS_ENDPOINT")]
    endpoint: String,
    /// The principal to act as.
    #[arg(long, env = "CLOISTER_PRINCIPAL")]
    principal: String,
    /// The principal's Ed25519 private key (PKCS#8 PEM).
    #[arg(long, env = "CLOISTER_PRINCIPAL_KEY")]
    principal_key: PathBuf,
    /// The CA that issued the broker's TLS certificate (for tcp: endpoints).
    #[arg(long, env = "CLOISTER_KMS_CA")]
    ca: Option<PathBuf>,
    /// The name to expect in the broker's certificate (default: the endpoint's host).
    #[arg(long, env = "CLOISTER_KMS_TLS_NAME")]
    tls_server_name: Option<String>,
}

#[derive(Subcommand)]
pub enum TrustCommand {
    /// Trust an emulated platform root (PEM), or the built-in AWS Nitro root.
    Add {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(
            long,
            conflicts_with = "aws_nitro_root",
            required_unless_present = "aws_nitro_root"
        )]
        root: Option<PathBuf>,
        #[arg(long)]
        aws_nitro_root: bool,
        /// A name for the root (default: the file name, or aws-nitro-enclaves-root).
        #[arg(long)]
        label: Option<String>,
    },
    /// The trusted roots: label, subject, SHA-256 fingerprint.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop trusting a root: documents that chain to it are refused from now on.
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        label: String,
    },
}

#[derive(Subcommand)]
pub enum PrincipalCommand {
    /// Register a principal: a name, its Ed25519 public key (SPKI PEM) and an identity policy.
    Add {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        name: String,
        #[arg(long)]
        public_key: PathBuf,
        /// file://identity.json
        #[arg(long)]
        policy: String,
    },
    /// The principals: name, public key, identity policy.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a principal: its requests are refused from now on.
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        name: String,
    },
    /// Issue an access key (id and secret) with which the principal signs
    /// requests to the AWS API (SigV4). The secret is shown this once.
    AddAccessKey {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        name: String,
    },
    /// The access key ids (never the secrets), of one principal or all.
    ListAccessKeys {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete an access key: requests signed with it are refused from now on.
    DeleteAccessKey {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        access_key_id: String,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create a symmetric key (AES-256-GCM material, rotated on request) with a key policy.
    CreateKey {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value = "")]
        description: String,
        /// file://key-policy.json (default: the creator may do everything)
        #[arg(long)]
        policy: Option<String>,
    },
    /// Show a key's metadata: state, dates, versions, aliases.
    DescribeKey {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
    },
    /// List the keys' ids and ARNs.
    ListKeys {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Name a key: alias/NAME refers to it wherever a key id is accepted.
    CreateAlias {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        alias_name: String,
        #[arg(long)]
        target_key_id: String,
    },
    /// List the aliases and the keys they name.
    ListAliases {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove an alias (the key stays).
    DeleteAlias {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        alias_name: String,
    },
    /// Encrypt up to 4096 bytes under a key (larger data: generate-data-key, or cloister encrypt).
    Encrypt {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
        /// fileb://data, file://text, or the literal text.
        #[arg(long)]
        plaintext: String,
        /// k=v,k2=v2
        #[arg(long)]
        encryption_context: Option<String>,
    },
    /// Decrypt a ciphertext blob; with --recipient, only to an attested enclave's key.
    Decrypt {
        #[command(flatten)]
        client: ClientArgs,
        /// fileb://blob
        #[arg(long)]
        ciphertext_blob: String,
        #[arg(long)]
        key_id: Option<String>,
        #[arg(long)]
        encryption_context: Option<String>,
        /// KeyEncryptionAlgorithm=HPKE-Base-X25519-SHA256-AES256GCM,AttestationDocument=fileb://doc
        #[arg(long)]
        recipient: Option<String>,
    },
    /// Decrypt a blob and encrypt it under another key, without showing the plaintext.
    ReEncrypt {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        ciphertext_blob: String,
        #[arg(long)]
        source_key_id: Option<String>,
        #[arg(long)]
        source_encryption_context: Option<String>,
        #[arg(long)]
        destination_key_id: String,
        #[arg(long)]
        destination_encryption_context: Option<String>,
    },
    /// Make a data key: its plaintext (or, with --recipient, for an enclave only) and its blob.
    GenerateDataKey {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
        #[arg(long, default_value = "AES_256")]
        key_spec: String,
        #[arg(long)]
        encryption_context: Option<String>,
        #[arg(long)]
        recipient: Option<String>,
    },
    /// Make a data key returned only as its blob (decrypt it where it is used).
    GenerateDataKeyWithoutPlaintext {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
        #[arg(long, default_value = "AES_256")]
        key_spec: String,
        #[arg(long)]
        encryption_context: Option<String>,
    },
    /// Random bytes from the broker (with --recipient, for an enclave only).
    GenerateRandom {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        number_of_bytes: u32,
        #[arg(long)]
        recipient: Option<String>,
    },
    /// Replace a key's policy (checked, as every policy, when it is put).
    PutKeyPolicy {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
        #[arg(long)]
        policy: String,
    },
    /// Show a key's policy.
    GetKeyPolicy {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
    },
    /// Allow a disabled key's use again.
    EnableKey {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
    },
    /// Refuse every use of a key until it is enabled.
    DisableKey {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
    },
    /// Add new key material; old blobs still decrypt with the version they name.
    RotateKey {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
    },
    /// Rotate a key automatically every N days (90 to 2560; default 365).
    EnableKeyRotation {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
        #[arg(long)]
        rotation_period_in_days: Option<u32>,
    },
    /// Stop a key's automatic rotation.
    DisableKeyRotation {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
    },
    /// Whether a key rotates automatically, how often, and when next.
    GetKeyRotationStatus {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
    },
    /// Make a key unusable now and destroy its material after 7 to 30 days.
    ScheduleKeyDeletion {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
        #[arg(long, default_value_t = 30)]
        pending_window_in_days: u32,
    },
    /// Stop a scheduled deletion; the key is then disabled.
    CancelKeyDeletion {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        key_id: String,
    },
}

fn b64(bytes: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `file://path` (text), `fileb://path` (bytes), or the literal value.
fn input(arg: &str) -> anyhow::Result<Vec<u8>> {
    if let Some(p) = arg
        .strip_prefix("fileb://")
        .or_else(|| arg.strip_prefix("file://"))
    {
        return super::read_file(std::path::Path::new(p));
    }
    Ok(arg.as_bytes().to_vec())
}

fn text_input(arg: &str) -> anyhow::Result<String> {
    String::from_utf8(input(arg)?).map_err(|_| UsageError(format!("{arg}: not UTF-8 text")).into())
}

/// `k=v,k2=v2` (also accepts a JSON object, as `aws kms` does).
fn context(arg: &Option<String>) -> Result<EncryptionContext, UsageError> {
    let Some(arg) = arg else {
        return Ok(BTreeMap::new());
    };
    if arg.trim_start().starts_with('{') {
        return serde_json::from_str(arg)
            .map_err(|e| UsageError(format!("--encryption-context: {e}")));
    }
    arg.split(',')
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| UsageError(format!("--encryption-context {arg:?}: write k=v,k2=v2")))
        })
        .collect()
}

fn recipient(arg: &Option<String>) -> anyhow::Result<Option<Recipient>> {
    let Some(arg) = arg else { return Ok(None) };
    let mut algorithm = None;
    let mut document = None;
    for part in arg.split(',') {
        match part.split_once('=') {
            Some(("KeyEncryptionAlgorithm", v)) => algorithm = Some(v.to_owned()),
            Some(("AttestationDocument", v)) => document = Some(input(v)?),
            _ => bail!(UsageError(format!(
                "--recipient {arg:?}: write KeyEncryptionAlgorithm=...,AttestationDocument=fileb://doc"
            ))),
        }
    }
    Ok(Some(Recipient {
        key_encryption_algorithm: algorithm
            .unwrap_or_else(|| cloister_kms::recipient::ALGORITHM.to_owned()),
        attestation_document: document.ok_or_else(|| {
            UsageError("--recipient needs AttestationDocument=fileb://...".into())
        })?,
    }))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn passphrase(var: &Option<String>) -> anyhow::Result<Option<Zeroizing<String>>> {
    match var {
        None => Ok(std::env::var("CLOISTER_KMS_PASSPHRASE")
            .ok()
            .map(Zeroizing::new)),
        Some(v) => std::env::var(v)
            .map(|p| Some(Zeroizing::new(p)))
            .map_err(|_| {
                UsageError(format!("--passphrase-env {v}: the variable is not set")).into()
            }),
    }
}

pub fn run(cmd: KmsCommand) -> anyhow::Result<()> {
    match cmd {
        KmsCommand::Init {
            data_dir,
            passphrase_env,
            tls_names,
            store,
            store_ca,
        } => {
            let dir = DataDir::new(&data_dir);
            let pass = passphrase(&passphrase_env)?;
            let passphrase_mode = pass.is_some();
            let store = match store
                .map(|s| cloister_kms::store::Location::parse(&s))
                .transpose()?
            {
                Some(cloister_kms::store::Location::Postgres { url, .. }) => {
                    Some(cloister_kms::store::Location::Postgres { url, ca: store_ca })
                }
                Some(_) if store_ca.is_some() => {
                    bail!(UsageError("--store-ca is for a PostgreSQL store".into()))
                }
                other => other,
            };
            dir.init(pass, &tls_names, store)?;
            super::print_json(&json!({
                "DataDir": data_dir.display().to_string(),
                "Keystore": dir.store()?.redacted(),
                "RootKey": if passphrase_mode { Value::String("derived from the passphrase (Argon2id)".into()) } else { Value::String(dir.root_key().display().to_string()) },
                "BrokerPublicKey": dir.broker_pub().display().to_string(),
                "AdminPrincipal": cloister_kms::datadir::ADMIN,
                "AdminPrivateKey": dir.admin_key().display().to_string(),
                "AuditLog": if dir.store_file().exists() { Value::String("in the keystore's database".into()) } else { Value::String(dir.audit_log().display().to_string()) },
                "TlsCa": dir.tls().ca_cert().display().to_string(),
            }))
        }
        KmsCommand::Serve {
            data_dir,
            listen,
            passphrase_env,
            max_connections,
            max_connections_per_peer,
            rate,
            max_document_age,
            tls_cert,
            tls_key,
            aws_api,
            aws_api_plain_http,
            aws_region,
            replica,
            health,
        } => {
            let addrs = listen
                .iter()
                .map(|a| a.parse::<Address>())
                .collect::<Result<Vec<_>, _>>()?;
            let aws_addrs = aws_api
                .iter()
                .map(|a| match a.parse::<Address>()? {
                    tcp @ Address::Tcp { .. } => Ok(tcp),
                    other => bail!(UsageError(format!(
                        "--aws-api {other}: the AWS API listens on tcp:HOST:PORT"
                    ))),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let dir = DataDir::new(&data_dir);
            let needs_tls = addrs.iter().any(|a| matches!(a, Address::Tcp { .. }))
                || (!aws_addrs.is_empty() && !aws_api_plain_http);
            let tls = if needs_tls {
                let files = dir.tls();
                let cert = tls_cert.unwrap_or_else(|| files.server_cert());
                let key = tls_key.unwrap_or_else(|| files.server_key());
                Some(cloister_kms::tls::server_config(&cert, &key)?)
            } else {
                None
            };
            let config = BrokerConfig {
                max_document_age: std::time::Duration::from_secs(max_document_age),
                rate_per_sec: rate,
                burst: (rate * 2.0).max(1.0),
                replica: replica.unwrap_or_else(cloister_kms::service::default_replica_name),
                ..Default::default()
            };
            let health = health
                .map(|a| match a.parse::<Address>()? {
                    tcp @ Address::Tcp { .. } => Ok(tcp),
                    other => bail!(UsageError(format!(
                        "--health {other}: health probes listen on tcp:HOST:PORT"
                    ))),
                })
                .transpose()?;
            let broker = Arc::new(dir.open(passphrase(&passphrase_env)?, config)?);
            runtime()?.block_on(async move {
                let mut health_endpoint = None;
                if let Some(a) = &health {
                    let cloister_proto::Listener::Tcp(l) = cloister_proto::listen(a).await? else {
                        bail!(UsageError("--health listens on TCP".into()));
                    };
                    health_endpoint = Some(format!("http://{}", l.local_addr()?));
                    tokio::spawn(cloister_kms::server::serve_health(broker.clone(), l));
                }
                let mut listeners = Vec::new();
                for a in &addrs {
                    listeners.push(cloister_proto::listen(a).await?);
                }
                let mut aws = Vec::new();
                for a in &aws_addrs {
                    aws.push(AwsApi {
                        listener: cloister_proto::listen(a).await?,
                        plain_http: aws_api_plain_http,
                        region: aws_region.clone(),
                    });
                }
                let bound: Vec<String> = listeners
                    .iter()
                    .map(|l| l.local_address().map(|a| a.to_string()).unwrap_or_default())
                    .collect();
                let scheme = if aws_api_plain_http { "http" } else { "https" };
                let endpoints: Vec<String> = aws
                    .iter()
                    .filter_map(|a| match a.listener.local_address() {
                        Ok(Address::Tcp { host, port }) if host.contains(':') => {
                            Some(format!("{scheme}://[{host}]:{port}"))
                        }
                        Ok(Address::Tcp { host, port }) => {
                            Some(format!("{scheme}://{host}:{port}"))
                        }
                        _ => None,
                    })
                    .collect();
                let mut listening = json!({ "Listening": bound });
                if let Some(h) = health_endpoint {
                    listening["Health"] = json!(h);
                }
                if !endpoints.is_empty() {
                    listening["AwsApiEndpoints"] = json!(endpoints);
                    listening["AwsRegion"] = json!(aws_region);
                }
                super::print_json(&listening)?;
                let limits = ServerLimits {
                    max_connections: fit_descriptors(max_connections),
                    max_connections_per_peer,
                    ..Default::default()
                };
                serve(broker, listeners, aws, limits, tls, shutdown_signal()).await?;
                eprintln!("cloister kms: stopped; the audit log has its shutdown checkpoint");
                Ok(())
            })
        }
        KmsCommand::RotateRootKey {
            data_dir,
            passphrase_env,
            new_passphrase_env,
        } => {
            let dir = DataDir::new(&data_dir);
            let new_passphrase = new_passphrase_env
                .as_ref()
                .map(|v| {
                    std::env::var(v).map(Zeroizing::new).map_err(|_| {
                        UsageError(format!("--new-passphrase-env {v}: the variable is not set"))
                    })
                })
                .transpose()?;
            let resealed = dir.rotate_root_key(passphrase(&passphrase_env)?, new_passphrase)?;
            super::print_json(&json!({
                "Resealed": resealed,
                "RootKey": if new_passphrase_env.is_some() { Value::String("derived from the new passphrase (Argon2id)".into()) } else { Value::String(dir.root_key().display().to_string()) },
            }))
        }
        KmsCommand::Audit(AuditCommand::Verify { data_dir }) => {
            let dir = DataDir::new(&data_dir);
            let key = keyfile::read_verifying_key(&dir.broker_pub())?;
            let summary = match dir.store()? {
                location @ cloister_kms::store::Location::Postgres { .. } => {
                    audit::verify_shared(&cloister_kms::store::Store::connect(&location)?, &key)?
                }
                cloister_kms::store::Location::Sqlite(_) => {
                    let head = audit::recorded_head(&dir.audit_head(), &key)?;
                    audit::verify_log(&dir.audit_log(), &key, head)?
                }
            };
            super::print_json(&json!({
                "Verified": true,
                "Lines": summary.lines,
                "SignedCheckpoints": summary.checkpoints,
                "HeadSha256": summary.head_hash,
            }))
        }
        KmsCommand::Audit(AuditCommand::Tail { data_dir, lines }) => {
            let dir = DataDir::new(&data_dir);
            let lines = match dir.store()? {
                location @ cloister_kms::store::Location::Postgres { .. } => {
                    audit::tail_shared(&cloister_kms::store::Store::connect(&location)?, lines)?
                }
                cloister_kms::store::Location::Sqlite(_) => audit::tail(&dir.audit_log(), lines)?,
            };
            for line in lines {
                println!("{line}");
            }
            Ok(())
        }
        KmsCommand::LintPolicy { policy, identity } => {
            let kind = if identity {
                PolicyKind::Identity
            } else {
                PolicyKind::Key
            };
            let policy = Policy::parse(&text_input(&policy)?, kind)
                .map_err(|e| cloister_kms::error::validation(e.to_string()))?;
            let warnings = policy.lint();
            super::print_json(&json!({ "Warnings": warnings }))?;
            if !warnings.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        KmsCommand::Trust(cmd) => {
            let (client, op) = match cmd {
                TrustCommand::Add {
                    client,
                    root,
                    aws_nitro_root,
                    label,
                } => {
                    let (label, der) = if aws_nitro_root {
                        let a = TrustAnchor::aws_nitro();
                        (label.unwrap_or(a.label.clone()), a.der().to_vec())
                    } else {
                        let path =
                            root.ok_or_else(|| UsageError("--root or --aws-nitro-root".into()))?;
                        let label = label.unwrap_or_else(|| path.display().to_string());
                        (label, read_pem_certificates(&path)?.remove(0))
                    };
                    (
                        client,
                        Operation::TrustAdd {
                            label,
                            root_der: der,
                        },
                    )
                }
                TrustCommand::List { client } => (client, Operation::TrustList),
                TrustCommand::Remove { client, label } => {
                    (client, Operation::TrustRemove { label })
                }
            };
            call(&client, op)
        }
        KmsCommand::Principal(cmd) => {
            let (client, op) = match cmd {
                PrincipalCommand::Add {
                    client,
                    name,
                    public_key,
                    policy,
                } => {
                    let pk = keyfile::read_verifying_key(&public_key)?;
                    let policy = text_input(&policy)?;
                    (
                        client,
                        Operation::PrincipalAdd {
                            name,
                            public_key: pk.to_bytes().to_vec(),
                            policy,
                        },
                    )
                }
                PrincipalCommand::List { client } => (client, Operation::PrincipalList),
                PrincipalCommand::Remove { client, name } => {
                    (client, Operation::PrincipalRemove { name })
                }
                PrincipalCommand::AddAccessKey { client, name } => {
                    (client, Operation::AccessKeyCreate { principal: name })
                }
                PrincipalCommand::ListAccessKeys { client, name } => {
                    (client, Operation::AccessKeyList { principal: name })
                }
                PrincipalCommand::DeleteAccessKey {
                    client,
                    access_key_id,
                } => (client, Operation::AccessKeyDelete { access_key_id }),
            };
            call(&client, op)
        }
        KmsCommand::Key(cmd) => {
            let (client, op) = key_operation(cmd)?;
            call(&client, op)
        }
    }
}

fn key_operation(cmd: KeyCommand) -> anyhow::Result<(ClientArgs, Operation)> {
    Ok(match cmd {
        KeyCommand::CreateKey {
            client,
            description,
            policy,
        } => {
            let policy = policy.as_deref().map(text_input).transpose()?;
            (
                client,
                Operation::CreateKey {
                    description,
                    policy,
                },
            )
        }
        KeyCommand::DescribeKey { client, key_id } => (client, Operation::DescribeKey { key_id }),
        KeyCommand::ListKeys { client } => (client, Operation::ListKeys),
        KeyCommand::CreateAlias {
            client,
            alias_name,
            target_key_id,
        } => (
            client,
            Operation::CreateAlias {
                alias_name,
                target_key_id,
            },
        ),
        KeyCommand::ListAliases { client } => (client, Operation::ListAliases),
        KeyCommand::DeleteAlias { client, alias_name } => {
            (client, Operation::DeleteAlias { alias_name })
        }
        KeyCommand::Encrypt {
            client,
            key_id,
            plaintext,
            encryption_context,
        } => (
            client,
            Operation::Encrypt {
                key_id,
                plaintext: Secret::new(input(&plaintext)?),
                encryption_context: context(&encryption_context)?,
            },
        ),
        KeyCommand::Decrypt {
            client,
            ciphertext_blob,
            key_id,
            encryption_context,
            recipient: r,
        } => (
            client,
            Operation::Decrypt {
                ciphertext_blob: input(&ciphertext_blob)?,
                key_id,
                encryption_context: context(&encryption_context)?,
                recipient: recipient(&r)?,
            },
        ),
        KeyCommand::ReEncrypt {
            client,
            ciphertext_blob,
            source_key_id,
            source_encryption_context,
            destination_key_id,
            destination_encryption_context,
        } => (
            client,
            Operation::ReEncrypt {
                ciphertext_blob: input(&ciphertext_blob)?,
                source_key_id,
                source_encryption_context: context(&source_encryption_context)?,
                destination_key_id,
                destination_encryption_context: context(&destination_encryption_context)?,
            },
        ),
        KeyCommand::GenerateDataKey {
            client,
            key_id,
            key_spec,
            encryption_context,
            recipient: r,
        } => (
            client,
            Operation::GenerateDataKey {
                key_id,
                key_spec,
                number_of_bytes: None,
                encryption_context: context(&encryption_context)?,
                recipient: recipient(&r)?,
            },
        ),
        KeyCommand::GenerateDataKeyWithoutPlaintext {
            client,
            key_id,
            key_spec,
            encryption_context,
        } => (
            client,
            Operation::GenerateDataKeyWithoutPlaintext {
                key_id,
                key_spec,
                number_of_bytes: None,
                encryption_context: context(&encryption_context)?,
            },
        ),
        KeyCommand::GenerateRandom {
            client,
            number_of_bytes,
            recipient: r,
        } => (
            client,
            Operation::GenerateRandom {
                number_of_bytes,
                recipient: recipient(&r)?,
            },
        ),
        KeyCommand::PutKeyPolicy {
            client,
            key_id,
            policy,
        } => (
            client,
            Operation::PutKeyPolicy {
                key_id,
                policy: text_input(&policy)?,
            },
        ),
        KeyCommand::GetKeyPolicy { client, key_id } => (client, Operation::GetKeyPolicy { key_id }),
        KeyCommand::EnableKey { client, key_id } => (client, Operation::EnableKey { key_id }),
        KeyCommand::DisableKey { client, key_id } => (client, Operation::DisableKey { key_id }),
        KeyCommand::RotateKey { client, key_id } => (client, Operation::RotateKey { key_id }),
        KeyCommand::EnableKeyRotation {
            client,
            key_id,
            rotation_period_in_days,
        } => (
            client,
            Operation::EnableKeyRotation {
                key_id,
                rotation_period_in_days,
            },
        ),
        KeyCommand::DisableKeyRotation { client, key_id } => {
            (client, Operation::DisableKeyRotation { key_id })
        }
        KeyCommand::GetKeyRotationStatus { client, key_id } => {
            (client, Operation::GetKeyRotationStatus { key_id })
        }
        KeyCommand::ScheduleKeyDeletion {
            client,
            key_id,
            pending_window_in_days,
        } => (
            client,
            Operation::ScheduleKeyDeletion {
                key_id,
                pending_window_in_days,
            },
        ),
        KeyCommand::CancelKeyDeletion { client, key_id } => {
            (client, Operation::CancelKeyDeletion { key_id })
        }
    })
}

fn call(args: &ClientArgs, op: Operation) -> anyhow::Result<()> {
    let (request_id, output) = kms_call_identified(args, op)?;
    let mut v = render(output);
    if v.get("RecipientInfo").is_some() {
        // RecipientInfo binds the request id: shown so that it can be checked.
        v["RequestId"] = json!(request_id);
    }
    super::print_json(&v)
}

/// The response as `aws kms` would print it.
fn render(output: Output) -> Value {
    match output {
        Output::KeyMetadata(m) => json!({ "KeyMetadata": {
            "KeyId": m.key_id, "Arn": m.arn, "Description": m.description, "KeyState": m.key_state,
            "CreationDate": m.creation_date, "DeletionDate": m.deletion_date,
            "CurrentKeyVersion": m.current_version, "Aliases": m.aliases,
        }}),
        Output::Keys(keys) => {
            json!({ "Keys": keys.into_iter().map(|(id, arn)| json!({"KeyId": id, "KeyArn": arn})).collect::<Vec<_>>() })
        }
        Output::Aliases(a) => {
            json!({ "Aliases": a.into_iter().map(|(n, id)| json!({"AliasName": n, "TargetKeyId": id})).collect::<Vec<_>>() })
        }
        Output::Ciphertext {
            key_id,
            ciphertext_blob,
        } => json!({ "KeyId": key_id, "CiphertextBlob": b64(&ciphertext_blob) }),
        Output::ReEncrypted {
            source_key_id,
            key_id,
            ciphertext_blob,
        } => {
            json!({ "SourceKeyId": source_key_id, "KeyId": key_id, "CiphertextBlob": b64(&ciphertext_blob) })
        }
        Output::Plaintext {
            key_id,
            plaintext,
            ciphertext_for_recipient,
        } => {
            let mut v = json!({ "KeyId": key_id });
            cloister_kms::aws::add_secret(&mut v, plaintext, ciphertext_for_recipient);
            v
        }
        Output::DataKey {
            key_id,
            ciphertext_blob,
            plaintext,
            ciphertext_for_recipient,
        } => {
            let mut v = json!({ "KeyId": key_id, "CiphertextBlob": b64(&ciphertext_blob) });
            cloister_kms::aws::add_secret(&mut v, plaintext, ciphertext_for_recipient);
            v
        }
        Output::KeyPolicy(p) => json!({ "Policy": p }),
        Output::KeyId(key_id) => json!({ "KeyId": key_id }),
        Output::Rotated { key_id, version } => {
            json!({ "KeyId": key_id, "CurrentKeyVersion": version })
        }
        Output::DeletionScheduled {
            key_id,
            deletion_date,
        } => {
            json!({ "KeyId": key_id, "KeyState": "PendingDeletion", "DeletionDate": deletion_date })
        }
        Output::Principals(list) => {
            json!({ "Principals": list.into_iter().map(|p| json!({"Name": p.name, "PublicKey": p.public_key_hex, "Policy": p.policy})).collect::<Vec<_>>() })
        }
        Output::TrustRoots(list) => {
            json!({ "TrustRoots": list.into_iter().map(|t| json!({"Label": t.label, "Subject": t.subject, "FingerprintSha256": t.fingerprint_sha256})).collect::<Vec<_>>() })
        }
        Output::RotationStatus {
            key_id,
            enabled,
            period_in_days,
            next_rotation_date,
        } => json!({
            "KeyId": key_id, "KeyRotationEnabled": enabled,
            "RotationPeriodInDays": period_in_days, "NextRotationDate": next_rotation_date,
        }),
        Output::AccessKey {
            info,
            secret_access_key,
        } => json!({ "AccessKey": {
            "AccessKeyId": info.access_key_id,
            "SecretAccessKey": String::from_utf8_lossy(secret_access_key.as_bytes()),
            "Principal": info.principal,
            "CreateDate": info.create_date,
        }}),
        Output::AccessKeys(list) => {
            json!({ "AccessKeys": list.into_iter().map(|k| json!({"AccessKeyId": k.access_key_id, "Principal": k.principal, "CreateDate": k.create_date})).collect::<Vec<_>>() })
        }
        Output::Done => json!({}),
    }
}

/// Connections the process can hold: the soft limit on open files is raised
/// to the hard one, and connections are capped below it, so that the audit
/// log and keystore (which open files as they go) never meet EMFILE.
fn fit_descriptors(wanted: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const RESERVED: u64 = 64;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return wanted;
    };
    let soft = if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let fits = usize::try_from(soft.saturating_sub(RESERVED)).unwrap_or(usize::MAX);
    if wanted > fits {
        eprintln!(
            "cloister kms: --max-connections {wanted} lowered to {fits}: this process may open {soft} files"
        );
        return fits.max(1);
    }
    wanted
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[derive(Args)]
pub struct EncryptArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The KMS key that encrypts the data key.
    #[arg(long)]
    key_id: String,
    /// k=v,k2=v2: bound to the data key at the broker, stored in the header.
    #[arg(long)]
    encryption_context: Option<String>,
    #[arg(long = "in")]
    input: PathBuf,
    #[arg(long = "out")]
    output: PathBuf,
    /// Plaintext bytes per chunk; records (lines) never straddle chunks.
    #[arg(long, default_value_t = cloister_sealed::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
}

#[derive(Args)]
pub struct DecryptArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long = "in")]
    input: PathBuf,
    #[arg(long = "out")]
    output: PathBuf,
}

/// Connects as the client args say and runs one operation.
fn kms_call(args: &ClientArgs, op: Operation) -> anyhow::Result<Output> {
    Ok(kms_call_identified(args, op)?.1)
}

/// A call, and the request id it was sent with.
fn kms_call_identified(args: &ClientArgs, op: Operation) -> anyhow::Result<(String, Output)> {
    let endpoint: Address = args.endpoint.parse()?;
    let credentials = Credentials {
        principal: args.principal.clone(),
        key: keyfile::read_signing_key(&args.principal_key)?,
    };
    let tls = match &args.ca {
        Some(ca) => {
            let name = match (&args.tls_server_name, &endpoint) {
                (Some(n), _) => n.clone(),
                (None, Address::Tcp { host, .. }) => host.clone(),
                (None, other) => bail!(UsageError(format!(
                    "--ca with {other}: name the broker's certificate with --tls-server-name"
                ))),
            };
            Some(ClientTls::new(ca, &name)?)
        }
        None => None,
    };
    Ok(runtime()?.block_on(async {
        let mut client = KmsClient::connect(&endpoint, tls.as_ref(), credentials).await?;
        client.call_identified(op).await
    })?)
}

/// `cloister encrypt`: seal a file under a fresh data key from the broker.
pub fn encrypt(args: EncryptArgs) -> anyhow::Result<()> {
    let context = context(&args.encryption_context)?;
    let out = kms_call(
        &args.client,
        Operation::GenerateDataKey {
            key_id: args.key_id.clone(),
            key_spec: "AES_256".into(),
            number_of_bytes: None,
            encryption_context: context.clone(),
            recipient: None,
        },
    )?;
    let Output::DataKey {
        key_id,
        ciphertext_blob,
        plaintext: Some(plaintext),
        ..
    } = out
    else {
        bail!("the broker did not return a data key");
    };
    let key = cloister_sealed::DataKey::new(plaintext.0)?;
    let records = cloister_host::sealing::seal_file(
        &args.input,
        &args.output,
        &key,
        &key_id,
        ciphertext_blob,
        context.into_iter().collect(),
        args.chunk_size,
    )?;
    super::print_json(
        &json!({ "KeyId": key_id, "Records": records, "Output": args.output.display().to_string() }),
    )
}

/// `cloister decrypt`: open a sealed file as its data owner.
pub fn decrypt(args: DecryptArgs) -> anyhow::Result<()> {
    let file = std::fs::File::open(&args.input).map_err(|source| crate::errors::InputError {
        path: args.input.display().to_string(),
        source,
    })?;
    let mut input = std::io::BufReader::with_capacity(1 << 20, file);
    let header = cloister_sealed::Header::read(&mut input)?;
    let out = kms_call(
        &args.client,
        Operation::Decrypt {
            ciphertext_blob: header.encrypted_data_key.clone(),
            key_id: None,
            encryption_context: header.encryption_context.iter().cloned().collect(),
            recipient: None,
        },
    )?;
    let Output::Plaintext {
        plaintext: Some(plaintext),
        key_id,
        ..
    } = out
    else {
        bail!("the broker did not return the data key");
    };
    let key = cloister_sealed::DataKey::new(plaintext.0)?;
    let bytes = cloister_host::sealing::open_file(header, input, &key, &args.output)?;
    super::print_json(
        &json!({ "KeyId": key_id, "Bytes": bytes, "Output": args.output.display().to_string() }),
    )
}
