//! nitro-cli-style enclave commands: build-enclave, describe-image, run-enclave,
//! describe-enclaves, terminate-enclave, console, call; and the proxy.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use cloister_attestation::keyfile;
use cloister_attestation::nsm::read_pem_certificates;
use cloister_host::enclave::{self, EnclaveDir, LaunchError, Registry, Spec};
use cloister_host::image::{Image, ImageSigner, Manifest};
use cloister_host::runtime;
use cloister_proto::Address;

use crate::errors::UsageError;

#[derive(Args)]
pub struct BuildArgs {
    /// The WebAssembly component (wasm32-wasip2).
    #[arg(long)]
    wasm: PathBuf,
    #[arg(long)]
    name: String,
    #[arg(long)]
    version: String,
    #[arg(long, default_value_t = 64)]
    memory_mib: u32,
    #[arg(long, default_value_t = 1000)]
    cpu_ms_per_call: u32,
    #[arg(long, default_value_t = 4)]
    max_concurrent_calls: u32,
    /// A JSON object stored in the manifest.
    #[arg(long)]
    metadata: Option<String>,
    /// Sign the image: an X.509 certificate (PEM) with an Ed25519 key...
    #[arg(long, requires = "private_key")]
    signing_certificate: Option<PathBuf>,
    /// ...and that key (PKCS#8 PEM).
    #[arg(long, requires = "signing_certificate")]
    private_key: Option<PathBuf>,
    #[arg(long)]
    output: PathBuf,
}

fn measurements_json(pcrs: &BTreeMap<usize, [u8; 48]>) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("HashAlgorithm".into(), "Sha384".into());
    for (i, v) in pcrs {
        m.insert(format!("PCR{i}"), hex::encode(v).into());
    }
    Value::Object(m)
}

pub fn build(args: BuildArgs) -> anyhow::Result<()> {
    let component = super::read_file(&args.wasm)?;
    let mut manifest = Manifest::new(&args.name, &args.version);
    manifest.memory_mib = args.memory_mib;
    manifest.cpu_ms_per_call = args.cpu_ms_per_call;
    manifest.max_concurrent_calls = args.max_concurrent_calls;
    if let Some(m) = &args.metadata {
        manifest.metadata =
            serde_json::from_str(m).map_err(|e| UsageError(format!("--metadata: {e}")))?;
    }
    let signer = match (&args.signing_certificate, &args.private_key) {
        (Some(cert), Some(key)) => Some(ImageSigner {
            certificate_der: read_pem_certificates(cert)?.remove(0),
            key: keyfile::read_signing_key(key)?,
        }),
        _ => None,
    };
    let bytes = Image::build(manifest, component, signer.as_ref())?;
    super::write_output(&args.output, &bytes)?;
    let image = Image::parse(&bytes)?;
    super::print_json(
        &json!({ "Measurements": measurements_json(&runtime::measurements(&image, None, None)) }),
    )
}

pub fn describe_image(path: &std::path::Path) -> anyhow::Result<()> {
    let bytes = super::read_file(path)?;
    let image = Image::parse(&bytes).with_context(|| format!("{} is refused", path.display()))?;
    let signature = image.verify_signature();
    let sig_json = match &signature {
        Ok(None) => json!({ "Signed": false }),
        Ok(Some(info)) => json!({
            "Signed": true,
            "SignatureValid": true,
            "CertificateSubject": info.subject,
            "CertificateNotBefore": info.not_before,
            "CertificateNotAfter": info.not_after,
            "CertificateValidNow": info.valid_now,
        }),
        Err(e) => json!({ "Signed": true, "SignatureValid": false, "Reason": e.to_string() }),
    };
    let m = &image.manifest;
    super::print_json(&json!({
        "Measurements": measurements_json(&runtime::measurements(&image, None, None)),
        "ImageSize": bytes.len(),
        "ComponentSize": image.component.len(),
        "Signature": sig_json,
        "Manifest": {
            "Name": m.name, "Version": m.version, "MemoryMiB": m.memory_mib,
            "CpuMsPerCall": m.cpu_ms_per_call, "MaxConcurrentCalls": m.max_concurrent_calls,
        },
        "Metadata": m.metadata,
        "RuntimeIdentity": runtime::runtime_identity(),
    }))?;
    if let Err(e) = signature {
        return Err(e.into());
    }
    Ok(())
}

#[derive(Args, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunArgs {
    /// A JSON file with these same options (snake_case keys, `eif_path` accepted
    /// for `image`), as nitro-cli's --config; flags given too take precedence.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    #[arg(long, required_unless_present = "config")]
    #[serde(alias = "eif_path")]
    image: Option<PathBuf>,
    /// 0 or absent: the next free CID from 16.
    #[arg(long, default_value_t = 0)]
    enclave_cid: u32,
    #[arg(long)]
    enclave_name: Option<String>,
    /// Override the image's memory limit.
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Debug mode: every PCR reads as zeros and the console is available.
    #[arg(long)]
    debug_mode: bool,
    /// The platform directory whose NSM signs this host's documents.
    #[arg(long, env = "CLOISTER_PLATFORM_DIR")]
    platform: Option<PathBuf>,
    /// The proxy through which the enclave reaches the key broker (unix: or vsock:).
    #[arg(long)]
    kms_proxy: Option<String>,
    /// The parent's principal, whose credentials sign the enclave's KMS requests.
    #[arg(long, requires = "kms_principal_key")]
    kms_principal: Option<String>,
    #[arg(long, requires = "kms_principal")]
    kms_principal_key: Option<PathBuf>,
    /// The broker's TLS CA when the proxy leads to a TCP (TLS) broker.
    #[arg(long)]
    kms_ca: Option<PathBuf>,
    /// The name in the broker's TLS certificate (default: localhost).
    #[arg(long)]
    kms_tls_name: Option<String>,
    /// The parent's role ARN: measured into PCR3.
    #[arg(long)]
    parent_role: Option<String>,
    /// The parent's instance id: measured into PCR4.
    #[arg(long)]
    instance_id: Option<String>,
}

fn abs(p: PathBuf) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(&p).map_err(|source| {
        crate::errors::InputError {
            path: p.display().to_string(),
            source,
        }
        .into()
    })
}

/// Flags win over the config file's values.
fn merge(args: RunArgs) -> anyhow::Result<RunArgs> {
    let Some(path) = &args.config else {
        return Ok(args);
    };
    let file: RunArgs = serde_json::from_slice(&super::read_file(path)?)
        .map_err(|e| UsageError(format!("--config {}: {e}", path.display())))?;
    Ok(RunArgs {
        config: None,
        image: args.image.or(file.image),
        enclave_cid: if args.enclave_cid != 0 {
            args.enclave_cid
        } else {
            file.enclave_cid
        },
        enclave_name: args.enclave_name.or(file.enclave_name),
        memory_mib: args.memory_mib.or(file.memory_mib),
        debug_mode: args.debug_mode || file.debug_mode,
        platform: args.platform.or(file.platform),
        kms_proxy: args.kms_proxy.or(file.kms_proxy),
        kms_principal: args.kms_principal.or(file.kms_principal),
        kms_principal_key: args.kms_principal_key.or(file.kms_principal_key),
        kms_ca: args.kms_ca.or(file.kms_ca),
        kms_tls_name: args.kms_tls_name.or(file.kms_tls_name),
        parent_role: args.parent_role.or(file.parent_role),
        instance_id: args.instance_id.or(file.instance_id),
    })
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let args = merge(args)?;
    let image_path = abs(args
        .image
        .ok_or_else(|| UsageError("--image (or image in --config) is required".into()))?)?;
    let image = Image::parse(&super::read_file(&image_path)?)?;
    image.verify_signature()?;
    if args.kms_proxy.is_some() != args.kms_principal.is_some() {
        bail!(UsageError(
            "--kms-proxy and --kms-principal/--kms-principal-key go together".into()
        ));
    }
    if let Some(p) = &args.kms_proxy {
        let addr: Address = p.parse()?;
        if matches!(addr, Address::Tcp { .. }) {
            bail!(UsageError(format!(
                "--kms-proxy {p}: the enclave has no network; give the proxy's unix: or vsock: address"
            )));
        }
    }
    let mut rnd = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut rnd);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let enclave_id = format!(
        "i-{}-enc{}",
        host.trim()
            .replace(|c: char| !c.is_ascii_alphanumeric(), ""),
        hex::encode(rnd)
    );
    let spec = Spec {
        enclave_name: args
            .enclave_name
            .unwrap_or_else(|| image.manifest.name.clone()),
        enclave_id,
        enclave_cid: args.enclave_cid,
        image: image_path,
        debug_mode: args.debug_mode,
        memory_mib: args.memory_mib,
        parent_role: args.parent_role,
        instance_id: args.instance_id,
        platform: abs(args.platform.ok_or_else(|| {
            UsageError(
                "--platform (or CLOISTER_PLATFORM_DIR, or platform in --config) is required".into(),
            )
        })?)?,
        kms_proxy: args.kms_proxy,
        kms_principal: args.kms_principal,
        kms_principal_key: args.kms_principal_key.map(abs).transpose()?,
        kms_ca: args.kms_ca.map(abs).transpose()?,
        kms_tls_name: args.kms_tls_name,
    };
    let registry = Registry::new(enclave::run_dir())?;
    let (spec, state) = enclave::launch(&registry, spec)?;
    super::print_json(&describe(&spec, &state, "RUNNING"))
}

fn describe(spec: &Spec, state: &enclave::State, status: &str) -> Value {
    json!({
        "EnclaveName": spec.enclave_name,
        "EnclaveID": spec.enclave_id,
        "ProcessID": state.process_id,
        "EnclaveCID": spec.enclave_cid,
        "MemoryMiB": state.memory_mib,
        "State": status,
        "Flags": if spec.debug_mode { "DEBUG_MODE" } else { "NONE" },
        "Measurements": state.measurements,
        "Socket": state.socket,
        "Vsock": state.vsock,
        "Hardening": state.hardening,
    })
}

pub fn describe_enclaves() -> anyhow::Result<()> {
    let registry = Registry::new(enclave::run_dir())?;
    let list: Vec<Value> = registry
        .all()
        .into_iter()
        .filter(EnclaveDir::alive)
        .filter_map(|d| Some(describe(&d.read_spec().ok()?, &d.read_state()?, "RUNNING")))
        .collect();
    super::print_json(&Value::Array(list))
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("which").required(true)))]
pub struct Which {
    #[arg(long, group = "which")]
    enclave_id: Option<String>,
    #[arg(long, group = "which")]
    enclave_name: Option<String>,
    #[arg(long, group = "which")]
    enclave_cid: Option<u32>,
}

impl Which {
    fn find(&self, registry: &Registry) -> Result<EnclaveDir, LaunchError> {
        registry.find(
            self.enclave_id.as_deref(),
            self.enclave_name.as_deref(),
            self.enclave_cid,
        )
    }
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true)))]
pub struct TerminateArgs {
    #[arg(long, group = "target")]
    enclave_id: Option<String>,
    #[arg(long, group = "target")]
    enclave_name: Option<String>,
    #[arg(long, group = "target")]
    enclave_cid: Option<u32>,
    /// Every running enclave.
    #[arg(long, group = "target")]
    all: bool,
}

pub fn terminate(args: TerminateArgs) -> anyhow::Result<()> {
    let registry = Registry::new(enclave::run_dir())?;
    let targets: Vec<EnclaveDir> = if args.all {
        registry
            .all()
            .into_iter()
            .filter(EnclaveDir::alive)
            .collect()
    } else {
        let d = registry.find(
            args.enclave_id.as_deref(),
            args.enclave_name.as_deref(),
            args.enclave_cid,
        )?;
        if !d.alive() {
            return Err(
                LaunchError::NotFound(format!("{} (it is not running)", d.dir.display())).into(),
            );
        }
        vec![d]
    };
    let mut done = Vec::new();
    for d in targets {
        let spec = d.read_spec()?;
        enclave::terminate(&d)?;
        done.push(json!({ "EnclaveName": spec.enclave_name, "EnclaveID": spec.enclave_id, "Terminated": true }));
    }
    super::print_json(&Value::Array(done))
}

pub fn console(which: Which) -> anyhow::Result<()> {
    let registry = Registry::new(enclave::run_dir())?;
    let d = which.find(&registry)?;
    let spec = d.read_spec()?;
    if !spec.debug_mode {
        return Err(LaunchError::NotDebug(spec.enclave_id).into());
    }
    let text = std::fs::read(d.console()).unwrap_or_default();
    std::io::stdout().write_all(&text)?;
    Ok(())
}

#[derive(Args)]
pub struct CallArgs {
    #[command(flatten)]
    which: Which,
    /// The request: a file, or - for standard input (default: empty).
    #[arg(long)]
    input: Option<String>,
    /// Where to write the response: a file, or - for standard output (default).
    #[arg(long)]
    output: Option<String>,
    /// Connect over vsock instead of the Unix socket (where the kernel has vsock loopback).
    #[arg(long)]
    vsock: bool,
}

pub fn call(args: CallArgs) -> anyhow::Result<()> {
    let registry = Registry::new(enclave::run_dir())?;
    let d = args.which.find(&registry)?;
    if !d.alive() {
        let id = d.read_spec().map(|s| s.enclave_id).unwrap_or_default();
        return Err(LaunchError::NotFound(format!("{id} (it is not running)")).into());
    }
    let request = match args.input.as_deref() {
        None => Vec::new(),
        Some("-") => {
            let mut b = Vec::new();
            std::io::stdin().read_to_end(&mut b)?;
            b
        }
        Some(p) => super::read_file(std::path::Path::new(p))?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let address = match (&args.vsock, d.read_state().and_then(|s| s.vsock)) {
        (true, Some(v)) => v.parse()?,
        (true, None) => bail!(UsageError(
            "--vsock: this enclave does not listen on vsock (no vsock loopback here)".into()
        )),
        (false, _) => Address::Unix(d.socket()),
    };
    let response = rt.block_on(enclave::call(&address, &request))?;
    match args.output.as_deref() {
        None | Some("-") => std::io::stdout().write_all(&response)?,
        Some(p) => super::write_output(std::path::Path::new(p), &response)?,
    }
    Ok(())
}

#[derive(Args)]
pub struct ProxyArgs {
    /// Where the enclave connects (unix:PATH or vsock:CID:PORT).
    #[arg(long)]
    listen: String,
    /// Where to relay to (the key broker).
    #[arg(long)]
    to: String,
    /// Destinations this proxy may relay to; --to must be one of them.
    #[arg(long = "allow")]
    allow: Vec<String>,
}

pub fn proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let listen: Address = args.listen.parse()?;
    let to: Address = args.to.parse()?;
    let allow = args
        .allow
        .iter()
        .map(|a| a.parse::<Address>())
        .collect::<Result<Vec<_>, _>>()?;
    if !allow.is_empty() && !allow.contains(&to) {
        bail!(UsageError(format!("--to {to} is not in the --allow list")));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = cloister_proto::listen(&listen).await?;
        super::print_json(&json!({ "Listening": listener.local_address()?.to_string(), "RelayTo": to.to_string() }))?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((mut inbound, _)) = accepted else { continue };
                    let to = to.clone();
                    tokio::spawn(async move {
                        // A blind relay: bytes in, bytes out, nothing parsed or kept.
                        if let Ok(mut outbound) = cloister_proto::connect(&to).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
                _ = term.recv() => return Ok::<(), anyhow::Error>(()),
            }
        }
    })
}
