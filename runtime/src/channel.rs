//! The channel between the supervisor and one runtime process: the runtime's
//! standard input (supervisor → runtime) and standard output (runtime →
//! supervisor), carrying Cloister frames of CBOR.
//!
//! ```text
//! supervisor → runtime   Start::Boot(Boot)        once, first; or
//!                        Start::Compile{..}       to compile a component and exit,
//!                                                 answered Compiled or Failed
//! supervisor → runtime   Boot                     (the enclave case:)
//! runtime → supervisor   Ready | Failed           once, when serving (or not)
//! runtime → supervisor   Nsm(NsmRequest)          then any number, each answered
//! supervisor → runtime   NsmResponse              by exactly one response
//! ```
//!
//! The supervisor plays the Nitro hypervisor's NSM: it measured the image
//! itself, holds the PCR bank and the NSM signing key, and signs attestation
//! documents; the runtime never sees the key and cannot set PCR0..15.

use std::io::{Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use cloister_proto::frame;

/// The largest frame the supervisor sends: a Boot carries the image and its code.
pub const MAX_FRAME: u32 = 512 << 20;
/// The largest frame a runtime sends (NSM requests are small): the supervisor
/// reads no more from a runtime that a hostile guest may have taken over.
pub const MAX_FROM_RUNTIME: u32 = 64 << 10;

/// The first message: run an enclave, or compile a component for the cache
/// (untrusted input, so the supervisor, which holds the NSM key, does not
/// compile it itself).
#[derive(Debug, Serialize, Deserialize)]
pub enum Start {
    Boot(Box<Boot>),
    Compile {
        /// As for an enclave: the uid to drop to, when the supervisor is root.
        uid: Option<u32>,
        component: ByteBuf,
    },
}

/// Everything a runtime is started with.
#[derive(Serialize, Deserialize)]
pub struct Boot {
    pub enclave_id: String,
    /// The uid (and gid) the runtime drops to once it has entered a network
    /// namespace of its own; `None` when the supervisor is not root.
    pub uid: Option<u32>,
    pub debug: bool,
    /// The memory limit in force (the image's, or run-enclave's override).
    pub memory_mib: u32,
    /// The whole enclave image; the supervisor has parsed and measured it.
    pub image: ByteBuf,
    /// The component compiled by the supervisor with [`crate::engine::config`].
    pub code: ByteBuf,
    /// Where to listen for calls (in a directory only the runtime's uid and the
    /// supervisor can enter).
    pub socket: PathBuf,
    /// Where a debug enclave's console goes.
    pub console: Option<PathBuf>,
    /// The vsock port to listen on where the kernel has vsock loopback.
    pub vsock_port: Option<u32>,
    /// The route to the key broker, when the parent gave one.
    pub kms: Option<KmsRoute>,
}

impl std::fmt::Debug for Boot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Boot")
            .field("enclave_id", &self.enclave_id)
            .field("image", &self.image.len())
            .field("code", &self.code.len())
            .finish_non_exhaustive()
    }
}

/// How the runtime reaches the broker: the parent's proxy and the parent's
/// principal credentials. Which broker it trusts is not here: the image names it.
#[derive(Serialize, Deserialize)]
pub struct KmsRoute {
    pub proxy: String,
    pub principal: String,
    /// The principal's Ed25519 secret key (32 bytes).
    pub principal_key: cloister_kms_api::protocol::Secret,
}

/// What the runtime tells the supervisor.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromRuntime {
    Ready {
        hardening: crate::hardening::Report,
        vsock: Option<String>,
    },
    Failed {
        message: String,
    },
    Nsm(NsmRequest),
    /// The compiled component (the answer to `Start::Compile`).
    Compiled {
        code: ByteBuf,
    },
}

/// The NSM's operations, as the runtime asks them for its workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsmRequest {
    DescribePcr(u8),
    ExtendPcr(u8, ByteBuf),
    LockPcr(u8),
    LockPcrs(u8),
    Attestation {
        user_data: Option<ByteBuf>,
        nonce: Option<ByteBuf>,
        public_key: Option<ByteBuf>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsmResponse {
    Pcr { value: ByteBuf, locked: bool },
    Done,
    Document(ByteBuf),
    Err { code: String, message: String },
}

/// The runtime's end of the channel: blocking, one request at a time.
pub struct RuntimeEnd {
    io: std::sync::Mutex<(std::io::Stdin, std::io::Stdout)>,
}

#[derive(Debug, thiserror::Error)]
#[error("the supervisor channel failed: {0}")]
pub struct ChannelError(pub String);

fn read<T: serde::de::DeserializeOwned>(r: &mut impl Read) -> Result<T, ChannelError> {
    let mut header = [0u8; frame::HEADER_LEN];
    r.read_exact(&mut header)
        .map_err(|e| ChannelError(format!("closed: {e}")))?;
    let len = frame::check_header(&header, MAX_FRAME).map_err(|e| ChannelError(e.to_string()))?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .map_err(|e| ChannelError(format!("truncated frame: {e}")))?;
    frame::decode(&payload).map_err(|e| ChannelError(e.to_string()))
}

fn write<T: Serialize>(w: &mut impl Write, value: &T, max: u32) -> Result<(), ChannelError> {
    let payload = frame::encode(value).map_err(|e| ChannelError(e.to_string()))?;
    let header = frame::header(payload.len(), max).map_err(|e| ChannelError(e.to_string()))?;
    w.write_all(&header)
        .and_then(|()| w.write_all(&payload))
        .and_then(|()| w.flush())
        .map_err(|e| ChannelError(e.to_string()))
}

impl RuntimeEnd {
    /// Takes standard input and output; nothing else may use them.
    pub fn new() -> Self {
        RuntimeEnd {
            io: std::sync::Mutex::new((std::io::stdin(), std::io::stdout())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (std::io::Stdin, std::io::Stdout)> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn start(&self) -> Result<Start, ChannelError> {
        read(&mut self.lock().0)
    }

    /// The compiled code: the one large message a runtime sends.
    pub fn send_compiled(&self, code: Vec<u8>) -> Result<(), ChannelError> {
        write(
            &mut self.lock().1,
            &FromRuntime::Compiled { code: code.into() },
            MAX_FRAME,
        )
    }

    pub fn send(&self, message: &FromRuntime) -> Result<(), ChannelError> {
        write(&mut self.lock().1, message, MAX_FROM_RUNTIME)
    }

    /// One NSM request and its response.
    pub fn nsm(&self, request: NsmRequest) -> Result<NsmResponse, ChannelError> {
        let mut io = self.lock();
        write(&mut io.1, &FromRuntime::Nsm(request), MAX_FROM_RUNTIME)?;
        read(&mut io.0)
    }
}

impl Default for RuntimeEnd {
    fn default() -> Self {
        Self::new()
    }
}
