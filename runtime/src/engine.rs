//! The enclave runtime's engine: wasmtime with the component model hosting one
//! workload, its imports (the NSM through the supervisor, the keyring, the
//! attested KMS client, the measured configuration, the console).
//!
//! Each call runs in a new instance (a new Store, in a call slot of wasmtime's
//! pooling allocator whose memory was zeroed when its last call ended) with the
//! image's memory limit (summed over all of its memories), an epoch deadline for its CPU budget and a wall-clock deadline that
//! also covers time blocked in WASI or KMS calls, so a guest that loops, sleeps,
//! hoards memory or panics loses only its own call. Keys released during a call
//! live in that call's keyring and are zeroized when it ends, whether it
//! returned or trapped.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::{SigningKey, VerifyingKey};
use wasmtime::component::{HasSelf, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use zeroize::Zeroizing;

use cloister_attestation::pcr::{self, Pcr};
use cloister_image::Image;
use cloister_kms_api::client::{ClientError, Credentials, KmsClient};
use cloister_kms_api::protocol::{EncryptionContext, Operation, Output, Recipient};
use cloister_kms_api::recipient::{self, RecipientKey};
use cloister_kms_api::tls::ClientTls;
use cloister_proto::call::MAX_RESPONSE;
use cloister_proto::{Address, ErrorCode};
use cloister_sealed::{Aead, DataKey};

use crate::channel::{NsmRequest, NsmResponse};
use crate::gateway::{self, Gateway, GatewayError};

wasmtime::component::bindgen!({
    world: "workload",
    path: "../enclave-guest/wit",
    imports: { default: async },
    exports: { default: async },
});

use cloister::enclave::types::Error as GuestError;

/// The wasmtime this runtime is built with (checked against Cargo.lock by a test).
pub const WASMTIME_VERSION: &str = "48.0.8";
/// How often the epoch advances: the granularity of CPU budgets.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// The settings that change what a guest computes or can reach.
const SEMANTICS: &str = "component-model async epoch-interruption wasi-p2(no-fs,no-net,no-env) imports(nsm,keys,kms,config,console) keys-per-call";

/// What PCR1 measures: this runtime's binary (its SHA-384) and every setting
/// that changes guest semantics.
pub fn runtime_identity(binary_sha384: &[u8]) -> String {
    format!(
        "cloister-runtime/{} binary-sha384:{} wasmtime/{WASMTIME_VERSION} {SEMANTICS}",
        env!("CARGO_PKG_VERSION"),
        hex::encode(binary_sha384)
    )
}

/// PCR1 of a runtime binary.
pub fn pcr1(binary: &[u8]) -> Pcr {
    use sha2::Digest;
    pcr::measure(runtime_identity(&sha2::Sha384::digest(binary)).as_bytes())
}

/// The wasmtime configuration: the supervisor compiles with it, the runtime
/// loads that code with it (wasmtime refuses code made with another).
pub fn config() -> wasmtime::Config {
    let mut wt = wasmtime::Config::new();
    wt.wasm_component_model(true).epoch_interruption(true);
    wt
}

/// Compiles a component for [`config`]; the supervisor caches the result.
pub fn compile(component: &[u8]) -> Result<Vec<u8>, EnclaveError> {
    let engine = Engine::new(&config()).map_err(start_err)?;
    engine.precompile_component(component).map_err(start_err)
}

/// Errors of a call or of starting an enclave, with stable codes.
#[derive(Debug, thiserror::Error)]
pub enum EnclaveError {
    #[error("the enclave cannot start: {0}")]
    Start(String),
    #[error("the call exceeded its CPU budget of {0} ms and was stopped")]
    CpuLimit(u32),
    #[error(
        "the call ran past its deadline of {0} ms (blocked in a sleep or an import) and was stopped"
    )]
    Deadline(u32),
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
            EnclaveError::Deadline(_) => "E-ENCLAVE-DEADLINE",
            EnclaveError::MemoryLimit(_) => "E-ENCLAVE-MEMORY-LIMIT",
            EnclaveError::ResponseTooLarge(_) => "E-ENCLAVE-RESPONSE-TOO-LARGE",
            EnclaveError::Busy(_) => "E-ENCLAVE-BUSY",
            EnclaveError::Trap(_) => "E-ENCLAVE-TRAP",
            EnclaveError::Workload { .. } => "E-ENCLAVE-WORKLOAD",
        }
    }
}

/// The NSM as the runtime reaches it: the supervisor, which holds the PCRs and
/// the signing key.
pub trait NsmPort: Send + Sync {
    fn request(&self, request: NsmRequest) -> Result<NsmResponse, String>;
}

impl NsmPort for crate::channel::RuntimeEnd {
    fn request(&self, request: NsmRequest) -> Result<NsmResponse, String> {
        self.nsm(request).map_err(|e| e.to_string())
    }
}

/// How the runtime reaches the key broker: the parent's proxy and principal,
/// the broker's key and TLS CA from the image.
pub struct KmsAccess {
    pub proxy: Address,
    pub principal: String,
    pub key: SigningKey,
}

struct BrokerRoute {
    proxy: Address,
    principal: String,
    key: SigningKey,
    broker_key: VerifyingKey,
    tls: Option<ClientTls>,
}

/// Everything an enclave is started with.
pub struct EnclaveConfig {
    pub image: Image,
    /// The component compiled by [`compile`] with this build's wasmtime.
    pub code: Vec<u8>,
    pub debug: bool,
    pub memory_mib: u32,
    pub nsm: Arc<dyn NsmPort>,
    pub kms: Option<KmsAccess>,
    pub console: Option<std::fs::File>,
}

/// Keys released to one call; their bytes never cross into the guest, and
/// they are zeroized when the call's store is dropped.
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

    fn get(&self, handle: u32) -> Result<&DataKey, GuestError> {
        self.keys.get(&handle).ok_or_else(|| {
            guest_error(
                "E-ENCLAVE-NO-SUCH-KEY",
                format!("no key with handle {handle} in this call's keyring"),
            )
        })
    }
}

struct Shared {
    nsm: Arc<dyn NsmPort>,
    debug: bool,
    console: Option<Mutex<std::fs::File>>,
    /// Why KMS calls cannot be made, or how they are made.
    kms: Result<BrokerRoute, String>,
    /// Connections to the broker (through the parent's proxy) that answered
    /// their last request, kept for the next KMS call: at most
    /// [`IDLE_BROKER_CONNECTIONS`]; a connection that failed is never kept.
    idle_connections: Mutex<Vec<KmsClient>>,
    /// The recipient key of KMS calls and the document over it, while fresh.
    recipient: Mutex<Option<Arc<AttestedRecipient>>>,
    config: BTreeMap<String, String>,
}

/// Broker connections an enclave keeps open between KMS calls.
const IDLE_BROKER_CONNECTIONS: usize = 4;

/// How long KMS calls reuse one recipient key and its attestation document
/// (as the Nitro Enclaves SDK's KMS client keeps its key pair): an NSM
/// document and a key pair less per call. Every answer is still sealed to
/// its own request (the request id is in HPKE's `info`). A key is replaced
/// (and the old one zeroized once no call uses it) by the first KMS call after
/// this long, and forgotten when the workload extends a PCR (the document
/// would show the old value). Well within the broker's default document age
/// (300 s); a broker that allows less refuses with E-ATTEST-STALE and the
/// call is made once more with a fresh document.
const RECIPIENT_REUSE: std::time::Duration = std::time::Duration::from_secs(30);

/// A recipient key and the attestation document that carries its public key.
struct AttestedRecipient {
    key: RecipientKey,
    document: Vec<u8>,
    /// HPKE `aad` of answers to this document (its SHA-384).
    aad: Vec<u8>,
    made: std::time::Instant,
}

/// What one call may use. Linear memory is counted over all of the call's
/// memories together (a component has several), not per memory; table
/// elements likewise.
struct CallLimits {
    memory: usize,
    memory_used: usize,
    table_elements_used: usize,
}

impl CallLimits {
    const TABLE_ELEMENTS: usize = 1 << 20;
}

impl wasmtime::ResourceLimiter for CallLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory_used + desired.saturating_sub(current);
        if total > self.memory {
            return Err(wasmtime::Error::msg(format!(
                "linear memory would grow to {total} bytes, over the memory limit of {} bytes",
                self.memory
            )));
        }
        self.memory_used = total;
        Ok(true)
    }
    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("memory grow failed"))
    }
    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.table_elements_used + desired.saturating_sub(current);
        if total > Self::TABLE_ELEMENTS {
            return Err(wasmtime::Error::msg(format!(
                "tables would grow to {total} elements, over the limit of {}",
                Self::TABLE_ELEMENTS
            )));
        }
        self.table_elements_used = total;
        Ok(true)
    }
    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES as usize
    }
    fn tables(&self) -> usize {
        MAX_TABLES as usize
    }
    fn memories(&self) -> usize {
        MAX_MEMORIES as usize
    }
}

struct HostState {
    shared: Arc<Shared>,
    keyring: Keyring,
    limits: CallLimits,
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

impl Shared {
    fn nsm(&self, request: NsmRequest) -> Result<NsmResponse, GuestError> {
        match self.nsm.request(request) {
            Ok(NsmResponse::Err { code, message }) => Err(guest_error(&code, message)),
            Ok(r) => Ok(r),
            Err(e) => Err(guest_error("E-ENCLAVE-INTERNAL", e)),
        }
    }

    fn attest(
        &self,
        user_data: Option<Vec<u8>>,
        nonce: Option<Vec<u8>>,
        public_key: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, GuestError> {
        let buf = |v: Option<Vec<u8>>| v.map(serde_bytes::ByteBuf::from);
        match self.nsm(NsmRequest::Attestation {
            user_data: buf(user_data),
            nonce: buf(nonce),
            public_key: buf(public_key),
        })? {
            NsmResponse::Document(d) => Ok(d.into_vec()),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(r: NsmResponse) -> GuestError {
    guest_error(
        "E-ENCLAVE-INTERNAL",
        format!("unexpected NSM response {r:?}"),
    )
}

impl cloister::enclave::nsm::Host for HostState {
    async fn describe_pcr(&mut self, index: u8) -> Result<cloister::enclave::nsm::Pcr, GuestError> {
        match self.shared.nsm(NsmRequest::DescribePcr(index))? {
            NsmResponse::Pcr { value, locked } => Ok(cloister::enclave::nsm::Pcr {
                index,
                value: value.into_vec(),
                locked,
            }),
            other => Err(unexpected(other)),
        }
    }

    async fn extend_pcr(&mut self, index: u8, data: Vec<u8>) -> Result<Vec<u8>, GuestError> {
        if data.len() > 4096 {
            return Err(guest_error(
                "E-ENCLAVE-ARGUMENT",
                "extend-pcr takes at most 4096 bytes per call",
            ));
        }
        let extended = self.shared.nsm(NsmRequest::ExtendPcr(index, data.into()))?;
        // A kept recipient document shows the PCR as it was: the next KMS
        // call gets a document with the new value. (A document being made
        // holds this lock until it is kept, so none made before the extension
        // is kept after it.)
        if let Ok(mut kept) = self.shared.recipient.lock() {
            *kept = None;
        }
        match extended {
            NsmResponse::Pcr { value, .. } => Ok(value.into_vec()),
            other => Err(unexpected(other)),
        }
    }

    async fn lock_pcr(&mut self, index: u8) -> Result<(), GuestError> {
        self.shared.nsm(NsmRequest::LockPcr(index)).map(drop)
    }

    async fn lock_pcrs(&mut self, range: u8) -> Result<(), GuestError> {
        self.shared.nsm(NsmRequest::LockPcrs(range)).map(drop)
    }

    async fn get_random(&mut self, len: u32) -> Result<Vec<u8>, GuestError> {
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

    async fn attestation(
        &mut self,
        user_data: Option<Vec<u8>>,
        nonce: Option<Vec<u8>>,
        public_key: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, GuestError> {
        // A key broker releases keys to the document's public_key. Were the guest
        // to choose it, a workload that signs a caller's key would hand the parent
        // a document of this image over the parent's own key.
        if public_key.is_some() {
            return Err(guest_error(
                "E-ENCLAVE-ARGUMENT",
                "public-key is reserved for keys the runtime holds (KMS recipients); put a guest's own data in user-data",
            ));
        }
        self.shared.attest(user_data, nonce, None)
    }
}

/// The broker's answer to an attested request, authenticated and opened.
struct Released {
    output: Output,
    secret: Zeroizing<Vec<u8>>,
}

impl Shared {
    /// The recipient of KMS calls: the one made within [`RECIPIENT_REUSE`], or
    /// (or when `fresh`) a new key and a document over it.
    fn recipient(&self, fresh: bool) -> Result<Arc<AttestedRecipient>, GuestError> {
        let mut slot = self
            .recipient
            .lock()
            .map_err(|_| guest_error("E-ENCLAVE-INTERNAL", "recipient lock poisoned"))?;
        if !fresh
            && let Some(r) = slot.as_ref()
            && r.made.elapsed() < RECIPIENT_REUSE
        {
            return Ok(r.clone());
        }
        // The old key goes (zeroized) once the calls using it are done.
        *slot = None;
        let key = RecipientKey::generate();
        let document = self.attest(None, None, Some(key.public_key().to_vec()))?;
        let made = Arc::new(AttestedRecipient {
            aad: recipient::aad(&document),
            key,
            document,
            made: std::time::Instant::now(),
        });
        *slot = Some(made.clone());
        Ok(made)
    }

    /// An attested KMS request: the recipient key, a document over it, the
    /// request signed as the parent's principal; the answer must be signed by
    /// the broker the image names and bound to this request, and the result is
    /// opened with `info`/`aad` recomputed here, never taken from the answer.
    async fn kms_call(
        self: Arc<Self>,
        operation: &str,
        make: impl Fn(Recipient) -> Operation,
    ) -> Result<Released, GuestError> {
        let route = self
            .kms
            .as_ref()
            .map_err(|why| guest_error("E-ENCLAVE-NO-KMS", why.clone()))?;
        let request = |r: &AttestedRecipient| {
            make(Recipient {
                key_encryption_algorithm: recipient::ALGORITHM.into(),
                attestation_document: r.document.clone(),
            })
        };
        let mut recipient = self.recipient(false)?;
        let mut answer = self.broker_call(route, request(&recipient)).await;
        if let Err(ClientError::Kms(e)) = &answer
            && e.rejected_recipient_with("E-ATTEST-STALE")
        {
            // The broker allows younger documents than the one kept.
            recipient = self.recipient(true)?;
            answer = self.broker_call(route, request(&recipient)).await;
        }
        let (request_id, output) = answer.map_err(from_code)?;
        let (key_arn, cfr) = match &output {
            Output::Plaintext {
                key_id,
                ciphertext_for_recipient,
                ..
            } => (key_id.clone().unwrap_or_default(), ciphertext_for_recipient),
            Output::DataKey {
                key_id,
                ciphertext_for_recipient,
                ..
            } => (key_id.clone(), ciphertext_for_recipient),
            _ => {
                return Err(guest_error(
                    "E-ENCLAVE-KMS",
                    format!("unexpected response to {operation}"),
                ));
            }
        };
        let cfr = cfr.as_ref().ok_or_else(|| {
            guest_error(
                "E-ENCLAVE-KMS",
                "the broker returned no CiphertextForRecipient",
            )
        })?;
        let info = recipient::info(&key_arn, operation, &request_id);
        let secret = recipient
            .key
            .open(&cfr.ciphertext, &info, &recipient.aad)
            .map_err(from_code)?;
        Ok(Released { output, secret })
    }
}

impl Shared {
    /// Sends `op` on an idle connection to the broker, or a new one. A kept
    /// connection that fails before it answers (the broker or the proxy closed
    /// it while idle) is dropped and the request sent once more, freshly
    /// signed, on a new connection; a new connection's failure is the call's.
    async fn broker_call(
        &self,
        route: &BrokerRoute,
        op: Operation,
    ) -> Result<(String, Output), ClientError> {
        let idle = self.idle_connections.lock().ok().and_then(|mut c| c.pop());
        let (mut client, retry) = match idle {
            Some(client) => (client, Some(op.clone())),
            None => (self.connect_broker(route).await?, None),
        };
        let result = match (client.call_identified(op).await, retry) {
            (
                Err(ClientError::Closed | ClientError::Transport(_) | ClientError::Frame(_)),
                Some(op),
            ) => {
                client = self.connect_broker(route).await?;
                client.call_identified(op).await
            }
            (result, _) => result,
        };
        if result.is_ok()
            && let Ok(mut idle) = self.idle_connections.lock()
            && idle.len() < IDLE_BROKER_CONNECTIONS
        {
            idle.push(client);
        }
        result
    }

    async fn connect_broker(&self, route: &BrokerRoute) -> Result<KmsClient, ClientError> {
        let credentials = Credentials {
            principal: route.principal.clone(),
            key: route.key.clone(),
        };
        Ok(
            KmsClient::connect(&route.proxy, route.tls.as_ref(), credentials)
                .await?
                .pin_broker_key(route.broker_key),
        )
    }
}

impl cloister::enclave::kms::Host for HostState {
    async fn decrypt(
        &mut self,
        ciphertext_blob: Vec<u8>,
        encryption_context: Vec<(String, String)>,
    ) -> Result<u32, GuestError> {
        let encryption_context: EncryptionContext = encryption_context.into_iter().collect();
        let released = self
            .shared
            .clone()
            .kms_call("Decrypt", |recipient| Operation::Decrypt {
                ciphertext_blob: ciphertext_blob.clone(),
                key_id: None,
                encryption_context: encryption_context.clone(),
                recipient: Some(recipient),
            })
            .await?;
        // The keyring accepts only 256-bit keys (E-ENCLAVE-KMS otherwise).
        self.keyring.insert(released.secret)
    }

    async fn generate_data_key(
        &mut self,
        key_id: String,
        encryption_context: Vec<(String, String)>,
    ) -> Result<cloister::enclave::kms::DataKey, GuestError> {
        let encryption_context: EncryptionContext = encryption_context.into_iter().collect();
        let released = self
            .shared
            .clone()
            .kms_call("GenerateDataKey", |recipient| Operation::GenerateDataKey {
                key_id: key_id.clone(),
                key_spec: "AES_256".into(),
                number_of_bytes: None,
                encryption_context: encryption_context.clone(),
                recipient: Some(recipient),
            })
            .await?;
        let Output::DataKey {
            key_id,
            ciphertext_blob,
            ..
        } = released.output
        else {
            return Err(guest_error(
                "E-ENCLAVE-KMS",
                "unexpected response to GenerateDataKey",
            ));
        };
        Ok(cloister::enclave::kms::DataKey {
            handle: self.keyring.insert(released.secret)?,
            ciphertext_blob,
            key_id,
        })
    }

    async fn generate_random(&mut self, len: u32) -> Result<Vec<u8>, GuestError> {
        let released = self
            .shared
            .clone()
            .kms_call("GenerateRandom", |recipient| Operation::GenerateRandom {
                number_of_bytes: len,
                recipient: Some(recipient),
            })
            .await?;
        Ok(released.secret.to_vec())
    }
}

fn nonce_of(nonce: &[u8]) -> Result<&[u8; 12], GuestError> {
    nonce
        .try_into()
        .map_err(|_| guest_error("E-ENCLAVE-ARGUMENT", "the AES-GCM nonce must be 12 bytes"))
}

fn aead_error(_: cloister_sealed::SealedError) -> GuestError {
    guest_error(
        "E-ENCLAVE-AEAD",
        "authentication failed: the ciphertext, nonce or AAD was altered",
    )
}

impl cloister::enclave::keys::Host for HostState {
    async fn seal(
        &mut self,
        key: u32,
        nonce: Vec<u8>,
        plaintext: Vec<u8>,
        aad: Vec<u8>,
    ) -> Result<Vec<u8>, GuestError> {
        let plaintext = Zeroizing::new(plaintext);
        self.keyring
            .get(key)?
            .seal(nonce_of(&nonce)?, &plaintext, &aad)
            .map_err(aead_error)
    }

    async fn open(
        &mut self,
        key: u32,
        nonce: Vec<u8>,
        ciphertext: Vec<u8>,
        aad: Vec<u8>,
    ) -> Result<Vec<u8>, GuestError> {
        self.keyring
            .get(key)?
            .open(nonce_of(&nonce)?, &ciphertext, &aad)
            .map_err(aead_error)
    }

    async fn forget(&mut self, key: u32) {
        self.keyring.keys.remove(&key);
    }
}

impl cloister::enclave::config::Host for HostState {
    async fn get(&mut self, key: String) -> Option<String> {
        self.shared.config.get(&key).cloned()
    }

    async fn entries(&mut self) -> Vec<(String, String)> {
        self.shared
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl cloister::enclave::console::Host for HostState {
    async fn log(&mut self, message: String) {
        self.shared.console_write(format!("{message}\n").as_bytes());
    }
}

impl Shared {
    /// A debug enclave's console; nothing otherwise.
    fn console_write(&self, bytes: &[u8]) {
        if let (true, Some(console)) = (self.debug, &self.console)
            && let Ok(mut f) = console.lock()
        {
            let _ = f.write_all(bytes);
        }
    }
}

/// A debug enclave's stdout/stderr go to its console; otherwise nowhere.
#[derive(Clone)]
struct ConsoleStream(Arc<Shared>);

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

struct ConsoleWriter(Arc<Shared>);

impl tokio::io::AsyncWrite for ConsoleWriter {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.console_write(buf);
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
    stop_ticker: Arc<std::sync::atomic::AtomicBool>,
    /// The attested channel's keys.
    gateway: Gateway,
}

impl Drop for Enclave {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

fn start_err(e: impl std::fmt::Display) -> EnclaveError {
    EnclaveError::Start(format!("{e:#}"))
}

/// The broker an image names, reached by the parent's route.
fn broker_route(image: &Image, access: Option<KmsAccess>) -> Result<BrokerRoute, String> {
    let trust = image.manifest.kms.as_ref().ok_or(
        "the image names no key broker (build it with --kms-broker-key): this enclave makes no KMS calls",
    )?;
    let access = access.ok_or(
        "this enclave was started without a route to the key broker (run-enclave --kms-proxy, --kms-principal, --kms-principal-key)",
    )?;
    let broker_key = trust.verifying_key().map_err(|e| e.to_string())?;
    let tls = match &trust.tls_ca {
        Some(ca) => Some(
            ClientTls::from_pem(
                ca.as_bytes(),
                trust.tls_name.as_deref().unwrap_or("localhost"),
            )
            .map_err(|e| format!("the image's kms.tls_ca: {e}"))?,
        ),
        None => None,
    };
    Ok(BrokerRoute {
        proxy: access.proxy,
        principal: access.principal,
        key: access.key,
        broker_key,
        tls,
    })
}

/// Linear memory a call slot keeps mapped after its call, zeroed with `memset`
/// when the call ends (the rest is returned to the kernel): the next call
/// reuses those pages without page faults and still finds only zeros.
const WARM_MEMORY_BYTES: usize = 64 << 20;

/// What one call may instantiate: core instances, memories, tables, and the
/// elements of one table. The pool's slots are these times the enclave's
/// concurrent calls (each memory slot reserves 4 GiB of address space, so 1,024
/// calls reserve 32 TiB of the 128 TiB a process has); a component over them
/// is refused when the enclave starts.
const MAX_CORE_INSTANCES: u32 = 64;
const MAX_MEMORIES: u32 = 8;
const MAX_TABLES: u32 = 32;
const MAX_TABLE_ELEMENTS: usize = 1 << 16;

/// The runtime's engine: [`config`] with wasmtime's pooling allocator, one
/// slot per concurrent call. A slot's memory, tables and async stack are reset
/// when its call ends — memory to zeros (`memset` for the first
/// [`WARM_MEMORY_BYTES`], `madvise(MADV_DONTNEED)` beyond), stacks zeroed —
/// so a call never sees an earlier call's bytes; memories cannot grow past the
/// enclave's limit.
fn runtime_config(max_calls: u32, memory_bytes: usize) -> wasmtime::Config {
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_component_instances(max_calls)
        .total_stacks(max_calls)
        .max_core_instances_per_component(MAX_CORE_INSTANCES)
        .total_core_instances(max_calls * MAX_CORE_INSTANCES)
        .max_memories_per_component(MAX_MEMORIES)
        .max_memories_per_module(MAX_MEMORIES)
        .total_memories(max_calls * MAX_MEMORIES)
        .max_tables_per_component(MAX_TABLES)
        .max_tables_per_module(MAX_TABLES)
        .total_tables(max_calls * MAX_TABLES)
        .table_elements(MAX_TABLE_ELEMENTS)
        // Checks of a component's metadata only (nothing is reserved for them):
        // large enough for big components (interpreters, .NET, JS engines).
        .max_core_instance_size(16 << 20)
        .max_component_instance_size(16 << 20)
        .max_memory_size(memory_bytes)
        .linear_memory_keep_resident(WARM_MEMORY_BYTES.min(memory_bytes))
        .max_unused_warm_slots(0);
    let mut wt = config();
    wt.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool))
        .async_stack_zeroing(true);
    wt
}

impl Enclave {
    pub fn start(config: EnclaveConfig) -> Result<Enclave, EnclaveError> {
        let manifest = &config.image.manifest;
        let memory_bytes = (config.memory_mib as usize) << 20;
        let engine = Engine::new(&runtime_config(manifest.max_concurrent_calls, memory_bytes))
            .map_err(start_err)?;
        // SAFETY: wasmtime runs deserialized code as native code without checking
        // it. These bytes come from the supervisor over this process's private
        // channel; the supervisor compiled them from this image's component with
        // the same wasmtime and configuration (`compile`), and loads them from
        // its own cache only after checking their MAC against the component's
        // hash. wasmtime itself refuses code of another version or configuration.
        #[allow(unsafe_code)]
        let component =
            unsafe { wasmtime::component::Component::deserialize(&engine, &config.code) }
                .map_err(start_err)?;
        let mut linker = wasmtime::component::Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(start_err)?;
        Workload::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s).map_err(start_err)?;
        let pre = WorkloadPre::new(linker.instantiate_pre(&component).map_err(start_err)?)
            .map_err(start_err)?;

        let (rotate, grace) =
            gateway::schedule(|k| manifest.config.get(k).cloned()).map_err(EnclaveError::Start)?;
        let gateway = Gateway::new(rotate, grace);
        let stop_ticker = Arc::new(std::sync::atomic::AtomicBool::new(false));
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
            memory_mib: config.memory_mib,
            cpu_ms: manifest.cpu_ms_per_call,
            max_calls: manifest.max_concurrent_calls,
            in_flight: AtomicU32::new(0),
            stop_ticker,
            gateway,
            shared: Arc::new(Shared {
                nsm: config.nsm,
                debug: config.debug,
                console: config.console.map(Mutex::new),
                kms: broker_route(&config.image, config.kms),
                idle_connections: Mutex::new(Vec::new()),
                recipient: Mutex::new(None),
                config: manifest.config.clone(),
            }),
        })
    }

    /// Runs one request through the workload's handler, within the image's
    /// CPU budget (epoch) and the same wall-clock deadline (which also stops a
    /// call blocked in an import).
    pub async fn call(&self, request: Vec<u8>) -> Result<Vec<u8>, EnclaveError> {
        let before = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlight(&self.in_flight);
        if before >= self.max_calls {
            return Err(EnclaveError::Busy(self.max_calls));
        }
        let console = ConsoleStream(self.shared.clone());
        let mut wasi = WasiCtx::builder();
        wasi.stdout(console.clone())
            .stderr(console)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let memory = (self.memory_mib as usize) << 20;
        let state = HostState {
            shared: self.shared.clone(),
            keyring: Keyring::default(),
            limits: CallLimits {
                memory,
                memory_used: 0,
                table_elements_used: 0,
            },
            wasi: wasi.build(),
            table: ResourceTable::new(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        let ticks = (u64::from(self.cpu_ms) * 1000)
            .div_ceil(EPOCH_TICK.as_micros() as u64)
            .max(1);
        store.set_epoch_deadline(ticks);
        let classify = |e: wasmtime::Error| -> EnclaveError {
            if e.is::<wasmtime::PoolConcurrencyLimitError>() {
                return EnclaveError::Busy(self.max_calls);
            }
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
        let request = Zeroizing::new(request);
        let run = async {
            let instance = self
                .pre
                .instantiate_async(&mut store)
                .await
                .map_err(classify)?;
            instance
                .cloister_enclave_handler()
                .call_handle(&mut store, &request)
                .await
                .map_err(classify)
        };
        let deadline = Duration::from_millis(self.cpu_ms.into());
        let result = tokio::time::timeout(deadline, run)
            .await
            .map_err(|_| EnclaveError::Deadline(self.cpu_ms))??;
        // The store (linear memory, this call's keyring) is dropped here.
        drop(store);
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

/// The attested channel (see [`gateway`]).
impl Enclave {
    /// The channel's key configuration list (`application/ohttp-keys`).
    pub fn channel_keys(&self) -> Result<Vec<u8>, GatewayError> {
        self.gateway.key_configs()
    }

    /// An attestation document over the caller's nonce whose `public_key` is
    /// the channel's current X25519 key and whose `user_data` is that key's
    /// RFC 9458 configuration. Blocks on the supervisor's NSM.
    pub fn channel_document(&self, nonce: Option<Vec<u8>>) -> Result<Vec<u8>, GatewayError> {
        let current = self.gateway.current()?;
        self.shared
            .attest(
                Some(current.config),
                nonce,
                Some(current.public_key.to_vec()),
            )
            .map_err(|e| GatewayError::Attestation(format!("[{}] {}", e.code, e.message)))
    }

    /// Opens an encapsulated request, runs the workload on its content and
    /// encapsulates the answer (the workload's refusals included) to the
    /// client. Only a request that cannot be opened is refused in the clear.
    pub async fn channel_call(&self, encapsulated: &[u8]) -> Result<Vec<u8>, GatewayError> {
        let opened = self.gateway.open(encapsulated)?;
        let answer = match gateway::request_body(&opened.request) {
            Ok(body) => match self.call(body).await {
                Ok(response) => gateway::ok(&response),
                Err(e) => {
                    let status = match e {
                        EnclaveError::Busy(_) => 503,
                        EnclaveError::Workload { .. } => 422,
                        _ => 500,
                    };
                    let code = match &e {
                        EnclaveError::Workload { code, .. } => code.clone(),
                        other => other.code().to_owned(),
                    };
                    gateway::refusal(status, &code, &e.to_string())
                }
            },
            Err(refusal) => refusal,
        };
        let answer = Zeroizing::new(answer);
        opened
            .response
            .seal(&answer)
            .map_err(|e| GatewayError::Internal(e.to_string()))
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
    "The image, the compiled code or the KMS credentials could not be loaded, or wasmtime refused the component (for example it imports something the runtime does not provide). The message (and the supervisor's log) has the details.";
    "E-ENCLAVE-CPU-LIMIT" => "a call ran out of its CPU budget",
    "Each call may run for the image's cpu-ms-per-call; a guest that loops forever is stopped there. The enclave keeps serving other calls.";
    "E-ENCLAVE-DEADLINE" => "a call ran past its deadline",
    "A call may last the image's cpu-ms-per-call in wall-clock time too, including time blocked in a sleep, a poll or a KMS call. It was stopped there and its keys were zeroized; the enclave keeps serving.";
    "E-ENCLAVE-MEMORY-LIMIT" => "a call exceeded the enclave's memory limit",
    "Linear memory is limited to the image's (or run-enclave's) memory-mib. The call was stopped; the enclave keeps serving.";
    "E-ENCLAVE-RESPONSE-TOO-LARGE" => "the workload's response is too large",
    "Responses are limited to 16 MiB.";
    "E-ENCLAVE-REQUEST-TOO-LARGE" => "the request is too large",
    "Requests are limited to 64 MiB.";
    "E-ENCLAVE-BUSY" => "the enclave is running as many calls as it allows",
    "The image's max-concurrent-calls are all in progress. Retry later.";
    "E-ENCLAVE-TRAP" => "the workload trapped",
    "The guest hit a WebAssembly trap (a panic, an unreachable, an out-of-bounds access). Only that call failed, and the keys it had obtained were zeroized.";
    "E-ENCLAVE-WORKLOAD" => "the workload's handler returned an error",
    "The message carries the workload's own code and text.";
    "E-ENCLAVE-IO" => "the enclave's socket could not be used",
    "The enclave runtime's connection failed; the supervisor's log says more.";
    "E-ENCLAVE-NOT-FOUND" => "no such enclave",
    "No enclave with that id, name or CID is running; `cloister describe-enclaves` lists the running ones.";
    "E-ENCLAVE-IN-USE" => "the CID or name is taken",
    "Another running enclave has that CID or name. Leave --enclave-cid out (or 0) to get a free one.";
    "E-ENCLAVE-NOT-DEBUG" => "the console is for debug-mode enclaves only",
    "A production enclave has no console, as on Nitro. Start it with --debug-mode to see its console (its PCRs then read as zeros).";
    "E-ENCLAVE-CALL" => "the enclave refused the call",
    "The message carries the enclave's code (E-ENCLAVE-...) and reason.";
    "E-ENCLAVE-NO-KMS" => "the enclave has no route to the key broker",
    "The image must name the broker it trusts (build-enclave --kms-broker-key, and --kms-ca for a TLS broker), and the enclave must be started with --kms-proxy and --kms-principal/--kms-principal-key.";
    "E-ENCLAVE-KMS" => "the key broker's answer could not be used",
    "The broker's response lacked CiphertextForRecipient, or the decrypted blob is not a 256-bit data key.";
    "E-ENCLAVE-ARGUMENT" => "an import was called with an invalid argument",
    "The message names the argument (nonce length, byte count).";
    "E-ENCLAVE-KEYRING-FULL" => "the call's keyring is full",
    "A call may hold 4096 keys at once. Forget keys (keys.forget, or drop the SDK's DataKey) when done with them.";
    "E-ENCLAVE-NO-SUCH-KEY" => "no key with that handle",
    "The handle was never issued in this call, or was forgotten. Keys do not outlive the call that obtained them.";
    "E-ENCLAVE-AEAD" => "AES-GCM authentication failed",
    "The ciphertext, nonce or additional data differ from what was sealed.";
    "E-ENCLAVE-INTERNAL" => "the runtime failed internally",
    "The runtime lost its channel to the supervisor, or a lock was poisoned by an earlier failure; restart the enclave.";
    "E-CHANNEL-MALFORMED" => "not a request of the attested channel",
    "The enclave's attested channel takes Oblivious HTTP encapsulated requests (RFC 9458) to its X25519/HKDF-SHA256/AES-256-GCM key, carrying a Binary HTTP POST (RFC 9292). Answered in the clear when the request did not open; inside the channel when the opened message was not a POST.";
    "E-CHANNEL-KEY-UNKNOWN" => "the request names no live channel key",
    "Channel keys rotate (cloister.channel.rotate-secs in the image's measured configuration) and are honoured a grace period after (cloister.channel.grace-secs); a key that opened 100,000 requests is retired. Fetch the attestation document (and key configuration) again.";
    "E-CHANNEL-DECRYPT" => "the encapsulated request does not open",
    "HPKE refused it: altered in transit, or sealed to another key with the same id.";
    "E-CHANNEL-REPLAYED" => "the encapsulated request was already answered",
    "Each encapsulated request is answered at most once per key; a copy replayed by the relay (or anyone) is refused. Clients encapsulate every request afresh.";
    "E-CHANNEL-ATTESTATION" => "the enclave could not get an attestation document for its channel key",
    "The supervisor's NSM refused (for example its certificate expired) or the nonce was missing or not 16 to 512 bytes. The message carries the NSM's code.";
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
    fn pcr1_measures_the_runtime_binary() {
        let a = super::pcr1(b"runtime binary a");
        assert_eq!(a, super::pcr1(b"runtime binary a"));
        assert_ne!(a, super::pcr1(b"runtime binary b"));
        use sha2::Digest;
        let identity = super::runtime_identity(&sha2::Sha384::digest(b"runtime binary a"));
        assert!(identity.contains(super::WASMTIME_VERSION), "{identity}");
        assert_eq!(a, cloister_attestation::pcr::measure(identity.as_bytes()));
    }
}
