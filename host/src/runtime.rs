//! The enclave runtime: wasmtime with the component model hosting one workload,
//! the emulated NSM and its PCR bank, the keyring, and the attested KMS client.
//!
//! Each call runs in a fresh instance (a fresh Store) with the image's memory limit
//! and an epoch deadline for its CPU budget, so a guest that loops, hoards memory
//! or panics loses only its own call. Enclave-wide state — PCRs, the keyring — is
//! host-side and shared by the calls.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cloister_guest::sealed::Aead;
use wasmtime::component::{HasSelf, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use zeroize::Zeroizing;

use cloister_attestation::nsm::{AttestationRequest, Nsm};
use cloister_attestation::pcr::{self, PCR_COUNT, Pcr, PcrBank};
use cloister_kms::client::{Credentials, KmsClient};
use cloister_kms::protocol::{Operation, Output, Recipient};
use cloister_kms::recipient::{self, RecipientKey};
use cloister_kms::tls::ClientTls;
use cloister_proto::{Address, ErrorCode};

use crate::image::Image;
use crate::sealing::DataKey;

wasmtime::component::bindgen!({
    world: "workload",
    path: "../enclave-guest/wit",
});

use cloister::enclave::types::Error as GuestError;

/// The wasmtime this runtime is built with (checked against Cargo.lock by a test).
pub const WASMTIME_VERSION: &str = "48.0.8";
/// How often the epoch advances: the granularity of CPU budgets.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// The largest response a call may return.
pub const MAX_RESPONSE: usize = 16 << 20;

/// What PCR1 measures: this runtime and every setting that changes guest semantics.
pub fn runtime_identity() -> String {
    format!(
        "cloister-runtime/{} wasmtime/{WASMTIME_VERSION} component-model epoch-interruption wasi-p2(no-fs,no-net,no-env) imports(nsm,keys,kms,console)",
        env!("CARGO_PKG_VERSION")
    )
}

pub fn pcr1() -> Pcr {
    pcr::measure(runtime_identity().as_bytes())
}

/// Errors of a call or of starting an enclave, with stable codes.
#[derive(Debug, thiserror::Error)]
pub enum EnclaveError {
    #[error("the enclave cannot start: {0}")]
    Start(String),
    #[error("the call exceeded its CPU budget of {0} ms and was stopped")]
    CpuLimit(u32),
    #[error("the call exceeded the enclave's memory limit of {0} MiB and was stopped")]
    MemoryLimit(u32),
    #[error("the response is {0} bytes, more than the limit of {MAX_RESPONSE}")]
    ResponseTooLarge(usize),
    #[error("the enclave is already running {0} calls, its limit")]
    Busy(u32),
    #[error("the workload trapped: {0}")]
    Trap(String),
    #[error("the workload returned an error [{code}]: {message}")]
    Workload { code: String, message: String },
}

impl ErrorCode for EnclaveError {
    fn code(&self) -> &'static str {
        match self {
            EnclaveError::Start(_) => "E-ENCLAVE-START",
            EnclaveError::CpuLimit(_) => "E-ENCLAVE-CPU-LIMIT",
            EnclaveError::MemoryLimit(_) => "E-ENCLAVE-MEMORY-LIMIT",
            EnclaveError::ResponseTooLarge(_) => "E-ENCLAVE-RESPONSE-TOO-LARGE",
            EnclaveError::Busy(_) => "E-ENCLAVE-BUSY",
            EnclaveError::Trap(_) => "E-ENCLAVE-TRAP",
            EnclaveError::Workload { .. } => "E-ENCLAVE-WORKLOAD",
        }
    }
}

/// How the runtime reaches the key broker: through the parent's proxy, signing
/// as the parent's principal, with TLS to the broker when it is on TCP.
pub struct KmsAccess {
    pub proxy: Address,
    pub tls: Option<ClientTls>,
    pub principal: String,
    pub key: ed25519_dalek::SigningKey,
}

/// Everything an enclave is started with.
pub struct EnclaveConfig {
    pub image: Image,
    pub debug: bool,
    pub module_id: String,
    pub parent_role: Option<String>,
    pub instance_id: Option<String>,
    pub memory_mib: Option<u32>,
    pub nsm: Nsm,
    pub kms: Option<KmsAccess>,
    pub console: Option<std::fs::File>,
    pub cache_dir: Option<PathBuf>,
}

/// The measurements an enclave reports (all zero in debug mode).
pub fn measurements(
    image: &Image,
    parent_role: Option<&str>,
    instance_id: Option<&str>,
) -> BTreeMap<usize, Pcr> {
    let mut m = BTreeMap::from([(0, image.pcr0()), (1, pcr1()), (2, image.pcr2())]);
    if let Some(role) = parent_role {
        m.insert(3, pcr::measure_raw(role));
    }
    if let Some(id) = instance_id {
        m.insert(4, pcr::measure_raw(id));
    }
    if let Some(p8) = image.pcr8() {
        m.insert(8, p8);
    }
    m
}

/// Keys held for the workload; their bytes never cross into the guest.
#[derive(Default)]
struct Keyring {
    next: u32,
    keys: HashMap<u32, DataKey>,
}

impl Keyring {
    /// At most this many keys are held at once; a guest that never forgets its
    /// keys gets an error, not the runtime's memory.
    const CAPACITY: usize = 4096;

    fn insert(&mut self, key: Zeroizing<Vec<u8>>) -> Result<u32, GuestError> {
        let key = DataKey::new(key).map_err(|e| {
            guest_error(
                "E-ENCLAVE-KMS",
                format!("the broker's answer is not a 256-bit data key: {e}"),
            )
        })?;
        if self.keys.len() >= Self::CAPACITY {
            return Err(guest_error(
                "E-ENCLAVE-KEYRING-FULL",
                format!(
                    "the keyring holds {} keys, its limit; forget keys that are no longer needed",
                    Self::CAPACITY
                ),
            ));
        }
        self.next = self.next.wrapping_add(1).max(1);
        self.keys.insert(self.next, key);
        Ok(self.next)
    }
}

struct Shared {
    bank: Mutex<PcrBank>,
    keyring: Mutex<Keyring>,
    nsm: Nsm,
    module_id: String,
    debug: bool,
    console: Option<Mutex<std::fs::File>>,
    kms: Option<KmsAccess>,
    tokio: Option<tokio::runtime::Handle>,
}

struct HostState {
    shared: Arc<Shared>,
    limits: StoreLimits,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn guest_error(code: &str, message: impl Into<String>) -> GuestError {
    GuestError {
        code: code.to_owned(),
        message: message.into(),
    }
}

fn from_code<E: ErrorCode + std::fmt::Display>(e: E) -> GuestError {
    guest_error(e.code(), e.to_string())
}

impl cloister::enclave::types::Host for HostState {}

impl cloister::enclave::nsm::Host for HostState {
    fn describe_pcr(&mut self, index: u8) -> Result<cloister::enclave::nsm::Pcr, GuestError> {
        let bank = self
            .shared
            .bank
            .lock()
            .map_err(|_| guest_error("E-ENCLAVE-INTERNAL", "PCR bank poisoned"))?;
        let (value, locked) = bank.describe(index.into()).map_err(from_code)?;
        Ok(cloister::enclave::nsm::Pcr {
            index,
            value: value.to_vec(),
            locked,
        })
    }

    fn extend_pcr(&mut self, index: u8, data: Vec<u8>) -> Result<Vec<u8>, GuestError> {
        let mut bank = self
            .shared
            .bank
            .lock()
            .map_err(|_| guest_error("E-ENCLAVE-INTERNAL", "PCR bank poisoned"))?;
        bank.extend(index.into(), &data)
            .map(|v| v.to_vec())
            .map_err(from_code)
    }

    fn lock_pcr(&mut self, index: u8) -> Result<(), GuestError> {
        let mut bank = self
            .shared
            .bank
            .lock()
            .map_err(|_| guest_error("E-ENCLAVE-INTERNAL", "PCR bank poisoned"))?;
        bank.lock(index.into()).map_err(from_code)
    }

    fn lock_pcrs(&mut self, range: u8) -> Result<(), GuestError> {
        let end = usize::from(range);
        if end > PCR_COUNT {
            return Err(from_code(cloister_attestation::PcrError::OutOfRange(end)));
        }
        let mut bank = self
            .shared
            .bank
            .lock()
            .map_err(|_| guest_error("E-ENCLAVE-INTERNAL", "PCR bank poisoned"))?;
        // PCR0..15 are locked from the start; lock the runtime registers below `range`.
        bank.lock_range(pcr::FIRST_RUNTIME_PCR.min(end)..end)
            .map_err(from_code)
    }

    fn get_random(&mut self, len: u32) -> Result<Vec<u8>, GuestError> {
        if len > 4096 {
            return Err(guest_error(
                "E-ENCLAVE-ARGUMENT",
                "get-random returns at most 4096 bytes per call",
            ));
        }
        let mut out = vec![0u8; len as usize];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut out);
        Ok(out)
    }

    fn attestation(
        &mut self,
        user_data: Option<Vec<u8>>,
        nonce: Option<Vec<u8>>,
        public_key: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, GuestError> {
        self.shared
            .attest(user_data, nonce, public_key)
            .map_err(from_code)
    }
}

impl Shared {
    fn attest(
        &self,
        user_data: Option<Vec<u8>>,
        nonce: Option<Vec<u8>>,
        public_key: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, cloister_attestation::NsmError> {
        let pcrs = self
            .bank
            .lock()
            .map(|b| b.snapshot())
            .unwrap_or_else(|p| p.into_inner().snapshot());
        self.nsm.attest(
            &AttestationRequest {
                module_id: self.module_id.clone(),
                pcrs,
                public_key,
                user_data,
                nonce,
            },
            SystemTime::now(),
        )
    }

    /// An attested KMS request: a fresh recipient key, a document over it, the
    /// request signed as the parent's principal, the answer opened here.
    fn kms_call(
        &self,
        make: impl FnOnce(Recipient) -> Operation,
    ) -> Result<(Output, RecipientKey), GuestError> {
        let access = self.kms.as_ref().ok_or_else(|| {
            guest_error(
                "E-ENCLAVE-NO-KMS",
                "this enclave was started without --kms-proxy and principal credentials",
            )
        })?;
        let tokio = self
            .tokio
            .as_ref()
            .ok_or_else(|| guest_error("E-ENCLAVE-INTERNAL", "no I/O runtime for KMS calls"))?;
        let recipient_key = RecipientKey::generate();
        let document = self
            .attest(None, None, Some(recipient_key.public_key().to_vec()))
            .map_err(from_code)?;
        let op = make(Recipient {
            key_encryption_algorithm: recipient::ALGORITHM.into(),
            attestation_document: document,
        });
        let credentials = Credentials {
            principal: access.principal.clone(),
            key: access.key.clone(),
        };
        let output = tokio
            .block_on(async {
                let mut client =
                    KmsClient::connect(&access.proxy, access.tls.as_ref(), credentials).await?;
                client.call(op).await
            })
            .map_err(from_code)?;
        Ok((output, recipient_key))
    }

    fn keyring(&self) -> Result<std::sync::MutexGuard<'_, Keyring>, GuestError> {
        self.keyring
            .lock()
            .map_err(|_| guest_error("E-ENCLAVE-INTERNAL", "keyring poisoned"))
    }
}

fn open_for(
    key: &RecipientKey,
    cfr: Option<cloister_kms::protocol::CiphertextForRecipient>,
) -> Result<Zeroizing<Vec<u8>>, GuestError> {
    let cfr = cfr.ok_or_else(|| {
        guest_error(
            "E-ENCLAVE-KMS",
            "the broker returned no CiphertextForRecipient",
        )
    })?;
    key.open(&cfr.ciphertext, &cfr.info, &cfr.aad)
        .map_err(from_code)
}

impl cloister::enclave::kms::Host for HostState {
    fn decrypt(
        &mut self,
        ciphertext_blob: Vec<u8>,
        encryption_context: Vec<(String, String)>,
    ) -> Result<u32, GuestError> {
        let (out, key) = self.shared.kms_call(|recipient| Operation::Decrypt {
            ciphertext_blob,
            key_id: None,
            encryption_context: encryption_context.into_iter().collect(),
            recipient: Some(recipient),
        })?;
        let Output::Plaintext {
            ciphertext_for_recipient,
            ..
        } = out
        else {
            return Err(guest_error(
                "E-ENCLAVE-KMS",
                "unexpected response to Decrypt",
            ));
        };
        // The keyring accepts only 256-bit keys (E-ENCLAVE-KMS otherwise).
        self.shared
            .keyring()?
            .insert(open_for(&key, ciphertext_for_recipient)?)
    }

    fn generate_data_key(
        &mut self,
        key_id: String,
        encryption_context: Vec<(String, String)>,
    ) -> Result<cloister::enclave::kms::DataKey, GuestError> {
        let (out, key) = self
            .shared
            .kms_call(|recipient| Operation::GenerateDataKey {
                key_id,
                key_spec: "AES_256".into(),
                encryption_context: encryption_context.into_iter().collect(),
                recipient: Some(recipient),
            })?;
        let Output::DataKey {
            key_id,
            ciphertext_blob,
            ciphertext_for_recipient,
            ..
        } = out
        else {
            return Err(guest_error(
                "E-ENCLAVE-KMS",
                "unexpected response to GenerateDataKey",
            ));
        };
        let data_key = open_for(&key, ciphertext_for_recipient)?;
        Ok(cloister::enclave::kms::DataKey {
            handle: self.shared.keyring()?.insert(data_key)?,
            ciphertext_blob,
            key_id,
        })
    }

    fn generate_random(&mut self, len: u32) -> Result<Vec<u8>, GuestError> {
        let (out, key) = self
            .shared
            .kms_call(|recipient| Operation::GenerateRandom {
                number_of_bytes: len,
                recipient: Some(recipient),
            })?;
        let Output::Plaintext {
            ciphertext_for_recipient,
            ..
        } = out
        else {
            return Err(guest_error(
                "E-ENCLAVE-KMS",
                "unexpected response to GenerateRandom",
            ));
        };
        Ok(open_for(&key, ciphertext_for_recipient)?.to_vec())
    }
}

/// The key behind a handle and the 12-byte nonce, for the keys import.
fn with_key<T>(
    shared: &Shared,
    key: u32,
    nonce: &[u8],
    f: impl FnOnce(&DataKey, &[u8; 12]) -> Result<T, cloister_guest::sealed::SealedError>,
) -> Result<T, GuestError> {
    let nonce: &[u8; 12] = nonce
        .try_into()
        .map_err(|_| guest_error("E-ENCLAVE-ARGUMENT", "the AES-GCM nonce must be 12 bytes"))?;
    let ring = shared.keyring()?;
    let data_key = ring.keys.get(&key).ok_or_else(|| {
        guest_error(
            "E-ENCLAVE-NO-SUCH-KEY",
            format!("no key with handle {key} in the keyring"),
        )
    })?;
    f(data_key, nonce).map_err(|_| {
        guest_error(
            "E-ENCLAVE-AEAD",
            "authentication failed: the ciphertext, nonce or AAD was altered",
        )
    })
}

impl cloister::enclave::keys::Host for HostState {
    fn seal(
        &mut self,
        key: u32,
        nonce: Vec<u8>,
        plaintext: Vec<u8>,
        aad: Vec<u8>,
    ) -> Result<Vec<u8>, GuestError> {
        with_key(&self.shared, key, &nonce, |k, n| {
            k.seal(n, &plaintext, &aad)
        })
    }

    fn open(
        &mut self,
        key: u32,
        nonce: Vec<u8>,
        ciphertext: Vec<u8>,
        aad: Vec<u8>,
    ) -> Result<Vec<u8>, GuestError> {
        with_key(&self.shared, key, &nonce, |k, n| {
            k.open(n, &ciphertext, &aad)
        })
    }

    fn forget(&mut self, key: u32) {
        if let Ok(mut ring) = self.shared.keyring.lock() {
            ring.keys.remove(&key);
        }
    }
}

impl cloister::enclave::console::Host for HostState {
    fn log(&mut self, message: String) {
        if let (true, Some(console)) = (self.shared.debug, &self.shared.console)
            && let Ok(mut f) = console.lock()
        {
            let _ = writeln!(f, "{message}");
        }
    }
}

/// A debug enclave's stdout/stderr go to its console; otherwise nowhere.
#[derive(Clone)]
struct ConsoleStream(Option<Arc<Shared>>);

impl wasmtime_wasi::cli::IsTerminal for ConsoleStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for ConsoleStream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(ConsoleWriter(self.0.clone()))
    }
}

struct ConsoleWriter(Option<Arc<Shared>>);

impl tokio::io::AsyncWrite for ConsoleWriter {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(shared) = &self.0
            && shared.debug
            && let Some(console) = &shared.console
            && let Ok(mut f) = console.lock()
        {
            let _ = f.write_all(buf);
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A running enclave: compiled once, instantiated per call.
pub struct Enclave {
    engine: Engine,
    pre: WorkloadPre<HostState>,
    shared: Arc<Shared>,
    pub memory_mib: u32,
    cpu_ms: u32,
    max_calls: u32,
    in_flight: AtomicU32,
    stop_ticker: Arc<AtomicBool>,
    pub pcrs: BTreeMap<usize, Pcr>,
}

impl Drop for Enclave {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

fn start_err(e: impl std::fmt::Display) -> EnclaveError {
    EnclaveError::Start(format!("{e:#}"))
}

impl Enclave {
    pub fn start(config: EnclaveConfig) -> Result<Enclave, EnclaveError> {
        let mut wt = wasmtime::Config::new();
        wt.wasm_component_model(true).epoch_interruption(true);
        if let Some(dir) = &config.cache_dir {
            std::fs::create_dir_all(dir).map_err(start_err)?;
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(dir);
            wt.cache(Some(wasmtime::Cache::new(cache).map_err(start_err)?));
        }
        let engine = Engine::new(&wt).map_err(start_err)?;
        let component = wasmtime::component::Component::new(&engine, &config.image.component)
            .map_err(start_err)?;
        let mut linker = wasmtime::component::Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(start_err)?;
        Workload::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(start_err)?;
        let pre = WorkloadPre::new(linker.instantiate_pre(&component).map_err(start_err)?)
            .map_err(start_err)?;

        let pcrs = if config.debug {
            BTreeMap::new()
        } else {
            measurements(
                &config.image,
                config.parent_role.as_deref(),
                config.instance_id.as_deref(),
            )
        };
        let bank = PcrBank::new(&pcrs).map_err(start_err)?;
        let manifest = &config.image.manifest;
        let stop_ticker = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop_ticker.clone();
            std::thread::Builder::new()
                .name("cloister-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(start_err)?;
        }
        Ok(Enclave {
            engine,
            pre,
            memory_mib: config.memory_mib.unwrap_or(manifest.memory_mib),
            cpu_ms: manifest.cpu_ms_per_call,
            max_calls: manifest.max_concurrent_calls,
            in_flight: AtomicU32::new(0),
            stop_ticker,
            pcrs: bank
                .snapshot()
                .into_iter()
                .filter(|(i, _)| *i < 16)
                .collect(),
            shared: Arc::new(Shared {
                bank: Mutex::new(bank),
                keyring: Mutex::new(Keyring::default()),
                nsm: config.nsm,
                module_id: config.module_id,
                debug: config.debug,
                console: config.console.map(Mutex::new),
                kms: config.kms,
                tokio: tokio::runtime::Handle::try_current().ok(),
            }),
        })
    }

    /// Runs one request through the workload's handler. Blocking: call it from a
    /// thread that may block (e.g. tokio's blocking pool).
    pub fn call(&self, request: &[u8]) -> Result<Vec<u8>, EnclaveError> {
        let before = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlight(&self.in_flight);
        if before >= self.max_calls {
            return Err(EnclaveError::Busy(self.max_calls));
        }
        let console = ConsoleStream(Some(self.shared.clone()));
        let mut wasi = WasiCtx::builder();
        wasi.stdout(console.clone())
            .stderr(console)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let memory = (self.memory_mib as usize) << 20;
        let state = HostState {
            shared: self.shared.clone(),
            limits: StoreLimitsBuilder::new()
                .memory_size(memory)
                .instances(64)
                .tables(64)
                .memories(16)
                .trap_on_grow_failure(true)
                .build(),
            wasi: wasi.build(),
            table: ResourceTable::new(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        let ticks = (u64::from(self.cpu_ms) * 1000)
            .div_ceil(EPOCH_TICK.as_micros() as u64)
            .max(1);
        store.set_epoch_deadline(ticks);
        let classify = |e: wasmtime::Error, store: &Store<HostState>| -> EnclaveError {
            let _ = store;
            if matches!(
                e.downcast_ref::<wasmtime::Trap>(),
                Some(wasmtime::Trap::Interrupt)
            ) {
                return EnclaveError::CpuLimit(self.cpu_ms);
            }
            let text = format!("{e:?}");
            if text.contains("memory")
                && (text.contains("limit") || text.contains("grow") || text.contains("allocat"))
            {
                return EnclaveError::MemoryLimit(self.memory_mib);
            }
            EnclaveError::Trap(e.root_cause().to_string())
        };
        let instance = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(e, &store))?;
        let result = instance
            .cloister_enclave_handler()
            .call_handle(&mut store, request)
            .map_err(|e| classify(e, &store))?;
        match result {
            Ok(response) if response.len() > MAX_RESPONSE => {
                Err(EnclaveError::ResponseTooLarge(response.len()))
            }
            Ok(response) => Ok(response),
            Err(e) => Err(EnclaveError::Workload {
                code: e.code,
                message: e.message,
            }),
        }
    }
}

struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

macro_rules! codes {
    ($($code:literal => $summary:literal, $explanation:literal;)*) => {
        /// The codes of enclaves: starting, calling, and the imports' errors.
        pub const CODES: &[cloister_proto::CodeInfo] = &[$(cloister_proto::CodeInfo { code: $code, summary: $summary, explanation: $explanation }),*];
    };
}

codes! {
    "E-ENCLAVE-START" => "the enclave could not start",
    "The image, the platform (NSM) or the KMS credentials could not be loaded, or wasmtime refused the component (for example it imports something the runtime does not provide). runtime.log in the enclave's directory has the details.";
    "E-ENCLAVE-CPU-LIMIT" => "a call ran out of its CPU budget",
    "Each call may run for the image's cpu-ms-per-call; a guest that loops forever is stopped there. The enclave keeps serving other calls.";
    "E-ENCLAVE-MEMORY-LIMIT" => "a call exceeded the enclave's memory limit",
    "Linear memory is limited to the image's (or run-enclave's) memory-mib. The call was stopped; the enclave keeps serving.";
    "E-ENCLAVE-RESPONSE-TOO-LARGE" => "the workload's response is too large",
    "Responses are limited to 16 MiB.";
    "E-ENCLAVE-REQUEST-TOO-LARGE" => "the request is too large",
    "Requests are limited to 64 MiB.";
    "E-ENCLAVE-BUSY" => "the enclave is running as many calls as it allows",
    "The image's max-concurrent-calls are all in progress. Retry later.";
    "E-ENCLAVE-TRAP" => "the workload trapped",
    "The guest hit a WebAssembly trap (a panic, an unreachable, an out-of-bounds access). Only that call failed.";
    "E-ENCLAVE-WORKLOAD" => "the workload's handler returned an error",
    "The message carries the workload's own code and text.";
    "E-ENCLAVE-IO" => "the enclave's files or socket could not be used",
    "Check the run directory (CLOISTER_RUN_DIR) and its permissions.";
    "E-ENCLAVE-NOT-FOUND" => "no such enclave",
    "No enclave with that id, name or CID is known, or it is not running; `cloister describe-enclaves` lists the running ones.";
    "E-ENCLAVE-IN-USE" => "the CID or name is taken",
    "Another running enclave has that CID or name. Leave --enclave-cid out (or 0) to get a free one.";
    "E-ENCLAVE-NOT-DEBUG" => "the console is for debug-mode enclaves only",
    "A production enclave has no console, as on Nitro. Start it with --debug-mode to see its console (its PCRs then read as zeros).";
    "E-ENCLAVE-CALL" => "the enclave refused the call",
    "The message carries the enclave's code (E-ENCLAVE-...) and reason.";
    "E-ENCLAVE-NO-KMS" => "the enclave has no route to the key broker",
    "Start it with --kms-proxy and --kms-principal/--kms-principal-key.";
    "E-ENCLAVE-KMS" => "the key broker's answer could not be used",
    "The broker's response lacked CiphertextForRecipient, or the decrypted blob is not a 256-bit data key.";
    "E-ENCLAVE-ARGUMENT" => "an import was called with an invalid argument",
    "The message names the argument (nonce length, byte count).";
    "E-ENCLAVE-KEYRING-FULL" => "the enclave's keyring is full",
    "A workload may hold 4096 keys at once. Forget keys (keys.forget, or drop the SDK's DataKey) when done with them.";
    "E-ENCLAVE-NO-SUCH-KEY" => "no key with that handle",
    "The handle was never issued or was forgotten.";
    "E-ENCLAVE-AEAD" => "AES-GCM authentication failed",
    "The ciphertext, nonce or additional data differ from what was sealed.";
    "E-ENCLAVE-INTERNAL" => "the runtime failed internally",
    "A lock was poisoned by an earlier failure; restart the enclave.";
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_wasmtime_version_in_pcr1_is_the_one_built() {
        let lock = include_str!("../../Cargo.lock");
        let entry = format!(
            "name = \"wasmtime\"\nversion = \"{}\"",
            super::WASMTIME_VERSION
        );
        assert!(
            lock.contains(&entry),
            "Cargo.lock has another wasmtime than {}",
            super::WASMTIME_VERSION
        );
    }

    #[test]
    fn pcr1_names_the_runtime() {
        assert!(super::runtime_identity().contains(super::WASMTIME_VERSION));
        assert_eq!(
            super::pcr1(),
            cloister_attestation::pcr::measure(super::runtime_identity().as_bytes())
        );
    }
}
