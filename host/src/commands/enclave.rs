//! nitro-cli-style enclave commands: build-enclave, describe-image (the image
//! owner's), run-enclave, describe-enclaves, terminate-enclave, console, call
//! (the parent's: clients of the supervisor), the supervisor daemon itself, and
//! the proxy.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};

use cloister_attestation::keyfile;
use cloister_attestation::nsm::read_pem_certificates;
use cloister_attestation::pcr::Pcr;
use cloister_image::{BrokerTrust, Image, ImageSigner, Manifest};
use cloister_proto::Address;
use cloister_proto::call::CallKind;
use cloister_supervisor::protocol::{self as control, EnclaveInfo, Reply, Request, RunSpec};

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
    /// Measured configuration the workload reads (KEY=VALUE, repeatable): covered
    /// by PCR0, so the parent cannot choose it.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// The key broker this enclave trusts: its public key (`broker.pub` of its
    /// data directory). Every answer to the enclave must be signed by it.
    #[arg(long)]
    kms_broker_key: Option<PathBuf>,
    /// The broker's TLS CA (`tls/ca.pem`), for a broker on TCP.
    #[arg(long, requires = "kms_broker_key")]
    kms_ca: Option<PathBuf>,
    /// The name in the broker's TLS certificate (default: localhost).
    #[arg(long, requires = "kms_ca")]
    kms_tls_name: Option<String>,
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
    for entry in &args.config {
        let (k, v) = entry
            .split_once('=')
            .ok_or_else(|| UsageError(format!("--config {entry:?}: write KEY=VALUE")))?;
        manifest.config.insert(k.to_owned(), v.to_owned());
    }
    if let Some(path) = &args.kms_broker_key {
        let key = keyfile::read_verifying_key(path)?;
        manifest.kms = Some(BrokerTrust {
            broker_key: hex::encode(key.as_bytes()),
            tls_ca: args
                .kms_ca
                .as_ref()
                .map(|p| super::read_file(p).map(|b| String::from_utf8_lossy(&b).into_owned()))
                .transpose()?,
            tls_name: args.kms_tls_name.clone(),
        });
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
        &json!({ "Measurements": measurements_json(&image.measurements(runtime_pcr1(), None, None)) }),
    )
}

/// PCR1 of the runtime binary installed beside this executable, if there is one.
pub fn runtime_pcr1() -> Option<Pcr> {
    let exe = std::env::current_exe().ok()?;
    let bytes = std::fs::read(exe.with_file_name("cloister-runtime")).ok()?;
    Some(cloister_runtime::engine::pcr1(&bytes))
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
        "Measurements": measurements_json(&image.measurements(runtime_pcr1(), None, None)),
        "ImageSize": bytes.len(),
        "ComponentSize": image.component.len(),
        "Signature": sig_json,
        "Manifest": {
            "Name": m.name, "Version": m.version, "MemoryMiB": m.memory_mib,
            "CpuMsPerCall": m.cpu_ms_per_call, "MaxConcurrentCalls": m.max_concurrent_calls,
        },
        "Metadata": m.metadata,
        "Config": m.config,
        "KeyBroker": m.kms.as_ref().map(|k| json!({
            "BrokerKey": k.broker_key, "TlsCa": k.tls_ca.is_some(), "TlsName": k.tls_name,
        })),
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
    /// Its name (default: the image's name, then NAME-2, NAME-3... for
    /// further enclaves of the image); a name in use is refused.
    #[arg(long)]
    enclave_name: Option<String>,
    /// Override the image's memory limit.
    #[arg(long)]
    memory_mib: Option<u32>,
    /// Debug mode: every PCR reads as zeros and the console is available.
    #[arg(long)]
    debug_mode: bool,
    /// The proxy through which the enclave reaches the key broker (unix: or vsock:).
    #[arg(long)]
    kms_proxy: Option<String>,
    /// The parent's principal, whose credentials sign the enclave's KMS requests.
    #[arg(long, requires = "kms_principal_key")]
    kms_principal: Option<String>,
    #[arg(long, requires = "kms_principal")]
    kms_principal_key: Option<PathBuf>,
    /// The parent's role ARN: measured into PCR3.
    #[arg(long)]
    parent_role: Option<String>,
    /// The parent's instance id: measured into PCR4.
    #[arg(long)]
    instance_id: Option<String>,
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
        kms_proxy: args.kms_proxy.or(file.kms_proxy),
        kms_principal: args.kms_principal.or(file.kms_principal),
        kms_principal_key: args.kms_principal_key.or(file.kms_principal_key),
        parent_role: args.parent_role.or(file.parent_role),
        instance_id: args.instance_id.or(file.instance_id),
    })
}

/// The supervisor's control socket.
fn supervisor() -> anyhow::Result<Address> {
    Ok(control::default_address().parse()?)
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

fn ask(request: Request) -> anyhow::Result<Reply> {
    let address = supervisor()?;
    Ok(block_on(control::request(&address, request))??)
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let args = merge(args)?;
    let image_path = args
        .image
        .ok_or_else(|| UsageError("--image (or image in --config) is required".into()))?;
    let image_bytes = super::read_file(&image_path)?;
    let image = Image::parse(&image_bytes)
        .with_context(|| format!("{} is refused", image_path.display()))?;
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
    let kms = match (args.kms_proxy, args.kms_principal, args.kms_principal_key) {
        (Some(proxy), Some(principal), Some(key)) => {
            let key = keyfile::read_signing_key(&key)?;
            Some(cloister_runtime::channel::KmsRoute {
                proxy,
                principal,
                principal_key: cloister_kms_api::protocol::Secret::new(key.to_bytes().to_vec()),
            })
        }
        _ => None,
    };
    let reply = ask(Request::RunEnclave(RunSpec {
        image: serde_bytes::ByteBuf::from(image_bytes),
        name: args.enclave_name,
        cid: args.enclave_cid,
        debug: args.debug_mode,
        memory_mib: args.memory_mib,
        parent_role: args.parent_role,
        instance_id: args.instance_id,
        kms,
    }))?;
    let Reply::Enclave(info) = reply else {
        bail!(cloister_supervisor::SupervisorError::Unexpected);
    };
    if let Some(warning) = &info.boundary_warning {
        eprintln!("cloister: WARNING: {warning}");
    }
    super::print_json(&describe(&info))
}

fn describe(info: &EnclaveInfo) -> Value {
    json!({
        "EnclaveName": info.enclave_name,
        "EnclaveID": info.enclave_id,
        "ProcessID": info.process_id,
        "EnclaveCID": info.enclave_cid,
        "MemoryMiB": info.memory_mib,
        "State": "RUNNING",
        "Flags": if info.debug { "DEBUG_MODE" } else { "NONE" },
        "Measurements": info.measurements,
        "Vsock": info.vsock,
        "RuntimeUid": info.runtime_uid,
        "Hardening": info.hardening,
    })
}

pub fn describe_enclaves() -> anyhow::Result<()> {
    let Reply::Enclaves(list) = ask(Request::DescribeEnclaves)? else {
        bail!(cloister_supervisor::SupervisorError::Unexpected);
    };
    super::print_json(&Value::Array(list.iter().map(describe).collect()))
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
    pub(crate) fn to_control(&self) -> control::Which {
        control::Which {
            id: self.enclave_id.clone(),
            name: self.enclave_name.clone(),
            cid: self.enclave_cid,
        }
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
    let which = (!args.all).then_some(control::Which {
        id: args.enclave_id,
        name: args.enclave_name,
        cid: args.enclave_cid,
    });
    let Reply::Terminated(done) = ask(Request::Terminate(which))? else {
        bail!(cloister_supervisor::SupervisorError::Unexpected);
    };
    super::print_json(&Value::Array(
        done.into_iter()
            .map(|(name, id)| json!({ "EnclaveName": name, "EnclaveID": id, "Terminated": true }))
            .collect(),
    ))
}

pub fn console(which: Which) -> anyhow::Result<()> {
    let Reply::Console(text) = ask(Request::Console(which.to_control()))? else {
        bail!(cloister_supervisor::SupervisorError::Unexpected);
    };
    std::io::stdout().write_all(&text)?;
    Ok(())
}

#[derive(Args)]
pub struct CallArgs {
    #[command(flatten)]
    which: Which,
    /// The request: a file, or - for standard input (default: empty).
    #[arg(long, conflicts_with = "part")]
    input: Option<String>,
    /// A request of named parts instead, NAME=FILE (repeatable): one CBOR map of
    /// names to contents, e.g. a sealed model and sealed records under two
    /// owners' keys (docs/sealed-format.md).
    #[arg(long = "part", value_name = "NAME=FILE")]
    part: Vec<String>,
    /// Where to write the response: a file, or - for standard output (default).
    #[arg(long)]
    output: Option<String>,
    /// Connect over vsock to the enclave instead of through the supervisor
    /// (where the kernel has vsock loopback).
    #[arg(long)]
    vsock: bool,
    #[command(flatten)]
    attested: AttestedArgs,
}

/// Verify the enclave before sending, and send only what it can open.
#[derive(Args)]
pub struct AttestedArgs {
    /// Verify the enclave first (chain to --root, the expected PCRs, a fresh
    /// document over a nonce of this call's), then send the request encrypted to
    /// the channel key its document binds (Oblivious HTTP, RFC 9458): the parent
    /// relays ciphertext both ways (docs/attested-channel.md).
    #[arg(long, requires = "root")]
    attested: bool,
    /// The platform root certificate(s) to trust (PEM): an emulated platform's root.pem.
    #[arg(long, requires = "attested")]
    root: Option<PathBuf>,
    /// A PCR the enclave must have, N=HEX (repeatable).
    #[arg(long = "expect-pcr", value_name = "N=HEX", requires = "attested")]
    expect_pcr: Vec<String>,
    /// The image the enclave must run: its PCR0 and PCR2.
    #[arg(long, value_name = "IMAGE.cimg", requires = "attested")]
    expect_image: Option<PathBuf>,
    /// Refuse documents older than this many seconds.
    #[arg(long, default_value_t = 300, requires = "attested")]
    max_age: u64,
    /// Accept a debug-mode enclave (its PCRs are zeros and its console is the
    /// parent's): for development only.
    #[arg(long, requires = "attested")]
    allow_debug: bool,
}

impl AttestedArgs {
    fn expectations(&self) -> anyhow::Result<cloister_channel::Expectations> {
        let root = self
            .root
            .as_deref()
            .ok_or_else(|| UsageError("--attested needs --root ROOT.pem".into()))?;
        let mut expect = cloister_channel::Expectations::from_root_pem(&super::read_file(root)?)?
            .max_age(std::time::Duration::from_secs(self.max_age))
            .allow_debug(self.allow_debug);
        if let Some(image) = &self.expect_image {
            expect = expect.image(&super::read_file(image)?)?;
        }
        for arg in &self.expect_pcr {
            let (index, value) = super::parse_pcr_arg(arg)?;
            expect = expect.pcr(index, value);
        }
        Ok(expect)
    }
}

pub fn call(args: CallArgs) -> anyhow::Result<()> {
    let request = match args.input.as_deref() {
        None if !args.part.is_empty() => {
            let mut files = Vec::new();
            for part in &args.part {
                let Some((name, file)) = part.split_once('=') else {
                    bail!(UsageError(format!("--part {part:?}: expected NAME=FILE")));
                };
                files.push((name, super::read_file(std::path::Path::new(file))?));
            }
            let parts = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
            cloister_sealed::parts::Parts::new(parts)
                .map_err(|e| UsageError(format!("--part: {e}")))?
                .encode()
        }
        None => Vec::new(),
        Some("-") => {
            let mut b = Vec::new();
            std::io::stdin().read_to_end(&mut b)?;
            b
        }
        Some(p) => super::read_file(std::path::Path::new(p))?,
    };
    let vsock = if args.vsock {
        let Reply::Enclaves(list) = ask(Request::DescribeEnclaves)? else {
            bail!(cloister_supervisor::SupervisorError::Unexpected);
        };
        let w = args.which.to_control();
        let info = list
            .iter()
            .find(|i| w.matches(i))
            .ok_or_else(|| UsageError("no such running enclave".into()))?;
        let Some(v) = &info.vsock else {
            bail!(UsageError(
                "--vsock: this enclave does not listen on vsock (no vsock loopback here)".into()
            ));
        };
        Some(v.parse::<Address>()?)
    } else {
        None
    };
    let address = supervisor()?;
    let send = |kind: CallKind, request: &[u8]| -> anyhow::Result<Vec<u8>> {
        match &vsock {
            Some(v) => block_on(async {
                let mut s = cloister_proto::connect(v).await?;
                Ok::<_, anyhow::Error>(cloister_proto::call::call(&mut s, &kind, request).await?)
            })?,
            None => Ok(block_on(control::call_enclave(
                &address,
                args.which.to_control(),
                &kind,
                request,
            ))??),
        }
    };
    let response = if args.attested.attested {
        let expect = args.attested.expectations()?;
        let nonce = cloister_channel::new_nonce();
        let document = send(
            CallKind::ChannelAttestation {
                nonce: Some(serde_bytes::ByteBuf::from(nonce.to_vec())),
            },
            &[],
        )?;
        let enclave = cloister_channel::verify(&document, &nonce, &expect)?;
        let verified = enclave.document();
        eprintln!(
            "verified enclave {} (PCR0 {}), document signed {}, via {}; sending encrypted to its channel key",
            verified.module_id,
            verified.image_sha384().map(hex::encode).unwrap_or_default(),
            cloister_attestation::verify::rfc3339_ms(verified.timestamp_ms),
            verified.trust_anchor,
        );
        let (sealed, pending) = enclave.seal(&request)?;
        let answer = send(CallKind::Channel, &sealed)?;
        pending.open(&answer)?
    } else {
        zeroize::Zeroizing::new(send(CallKind::Workload, &request)?)
    };
    match args.output.as_deref() {
        None | Some("-") => std::io::stdout().write_all(&response)?,
        Some(p) => super::write_output(std::path::Path::new(p), &response)?,
    }
    Ok(())
}

#[derive(Args)]
pub struct SupervisorArgs {
    /// Its state: code cache, enclave directories (0711, its own, writable by no one else).
    #[arg(long)]
    state_dir: PathBuf,
    /// The platform directory whose NSM key signs this host's documents (its own, writable by no one else).
    #[arg(long)]
    platform: PathBuf,
    /// The control socket the parent's commands use.
    #[arg(long, default_value = control::DEFAULT_ADDRESS)]
    listen: String,
    /// The enclave runtime binary (default: cloister-runtime beside this executable).
    #[arg(long)]
    runtime: Option<PathBuf>,
    /// A uid allowed to use the supervisor besides root and its own (repeatable).
    #[arg(long = "allow-uid")]
    allow_uid: Vec<u32>,
    /// A group whose members may use the supervisor (repeatable), as Nitro's `ne`.
    #[arg(long = "allow-gid")]
    allow_gid: Vec<u32>,
    /// When run as root: each enclave runtime runs as a free uid from BASE to
    /// BASE+65535 (never an account's, the caller's or an allowed uid).
    #[arg(long, default_value_t = 200_000)]
    enclave_uid_base: u32,
}

pub fn supervisor_daemon(args: SupervisorArgs) -> anyhow::Result<()> {
    let runtime = match args.runtime {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("cloister-runtime"),
    };
    let listen: Address = args.listen.parse()?;
    if !matches!(listen, Address::Unix(_)) {
        bail!(UsageError(
            "--listen: the supervisor listens on a unix: socket (clients are known by their uid)"
                .into()
        ));
    }
    cloister_supervisor::daemon::run(cloister_supervisor::daemon::Options {
        state_dir: args.state_dir,
        platform_dir: args.platform,
        listen,
        runtime,
        allow_uids: args.allow_uid,
        allow_gids: args.allow_gid,
        enclave_uid_base: args.enclave_uid_base,
    })
}

#[derive(Args)]
pub struct ProxyArgs {
    /// Where the enclave connects (unix:PATH or vsock:CID:PORT). A Unix socket is
    /// made connectable by every uid: enclave runtimes run as users of their own.
    #[arg(long)]
    listen: String,
    /// Where to relay to (the key broker): must be in the allowlist.
    #[arg(long)]
    to: String,
    /// The administrator's allowlist, as Nitro's vsock-proxy.yaml: a JSON file
    /// `{"allowlist": ["unix:/run/kms.sock", "tcp:kms.example:8443"]}` that
    /// group and others cannot write.
    #[arg(long, default_value = "/etc/cloister/proxy-allowlist.json")]
    allowlist: PathBuf,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Allowlist {
    allowlist: Vec<String>,
}

/// The destinations the administrator allows, from a file only they can write.
fn read_allowlist(path: &std::path::Path) -> anyhow::Result<Vec<Address>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|source| crate::errors::InputError {
        path: path.display().to_string(),
        source,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.mode() & 0o022 != 0 || (meta.uid() != 0 && meta.uid() != me) {
        bail!(UsageError(format!(
            "--allowlist {}: it must belong to root or to this user and be writable by no one else (it is uid {}, mode {:o})",
            path.display(),
            meta.uid(),
            meta.mode() & 0o777
        )));
    }
    let list: Allowlist = serde_json::from_slice(&super::read_file(path)?)
        .map_err(|e| UsageError(format!("--allowlist {}: {e}", path.display())))?;
    Ok(list
        .allowlist
        .iter()
        .map(|a| a.parse::<Address>())
        .collect::<Result<Vec<_>, _>>()?)
}

pub fn proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let listen: Address = args.listen.parse()?;
    let to: Address = args.to.parse()?;
    let allow = read_allowlist(&args.allowlist)?;
    if !allow.contains(&to) {
        bail!(ProxyRefused(format!(
            "--to {to} is not in the allowlist {}",
            args.allowlist.display()
        )));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = cloister_proto::listen(&listen).await?;
        if let Address::Unix(path) = &listen {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        }
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

/// A destination the proxy's allowlist does not name.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProxyRefused(pub String);

impl cloister_proto::ErrorCode for ProxyRefused {
    fn code(&self) -> &'static str {
        "E-PROXY-NOT-ALLOWED"
    }
}
