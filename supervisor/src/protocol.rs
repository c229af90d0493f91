//! The supervisor's control protocol, spoken by the parent's commands
//! (`run-enclave`, `describe-enclaves`, `terminate-enclave`, `console`, `call`)
//! on its control socket: one CBOR [`Request`] frame, one [`Reply`] frame. A
//! `Call` is answered `Relaying`, after which the connection carries the call
//! protocol (`cloister_proto::call`) straight to the enclave.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use cloister_proto::call::{self, CallError, CallKind};
use cloister_proto::{Address, ErrorCode, FrameError, TransportError, frame};
use cloister_runtime::channel::KmsRoute;
use cloister_runtime::hardening::Report;

/// Control frames carry at most this much (an image is at most 64 MiB).
pub const MAX_CONTROL: u32 = 80 << 20;

/// What the parent asks to run. Everything else about the enclave — the
/// runtime binary, its environment, its uid, the NSM — the supervisor decides.
#[derive(Serialize, Deserialize)]
pub struct RunSpec {
    pub image: ByteBuf,
    pub name: Option<String>,
    /// 0: the next free CID from 16.
    pub cid: u32,
    pub debug: bool,
    pub memory_mib: Option<u32>,
    pub parent_role: Option<String>,
    pub instance_id: Option<String>,
    pub kms: Option<KmsRoute>,
}

/// Which enclave: by id, name or CID.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Which {
    pub id: Option<String>,
    pub name: Option<String>,
    pub cid: Option<u32>,
}

impl Which {
    /// Whether an enclave is the one meant (every given field matches, and at
    /// least one is given).
    pub fn matches(&self, e: &EnclaveInfo) -> bool {
        (self.id.is_some() || self.name.is_some() || self.cid.is_some())
            && self.id.as_ref().is_none_or(|i| *i == e.enclave_id)
            && self.name.as_ref().is_none_or(|n| *n == e.enclave_name)
            && self.cid.is_none_or(|c| c == e.enclave_cid)
    }

    /// How to name it in an error.
    pub fn describe(&self) -> String {
        self.id
            .clone()
            .or(self.name.clone())
            .or(self.cid.map(|c| format!("CID {c}")))
            .unwrap_or_default()
    }
}

#[derive(Serialize, Deserialize)]
pub enum Request {
    RunEnclave(RunSpec),
    DescribeEnclaves,
    /// `None`: every enclave.
    Terminate(Option<Which>),
    Console(Which),
    Call(Which),
}

/// A running enclave as `describe-enclaves` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnclaveInfo {
    pub enclave_name: String,
    pub enclave_id: String,
    pub process_id: u32,
    pub enclave_cid: u32,
    pub memory_mib: u32,
    pub debug: bool,
    pub measurements: BTreeMap<String, String>,
    pub hardening: Report,
    pub vsock: Option<String>,
    /// The uid the runtime process runs as.
    pub runtime_uid: u32,
    /// The uid that launched it: only it (and root, and the supervisor's own
    /// uid) may terminate it, call it or read its console.
    pub owner_uid: u32,
    /// Set when the caller shares a uid with the supervisor or the runtime: then
    /// nothing separates the parent from the enclave.
    pub boundary_warning: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Enclave(Box<EnclaveInfo>),
    Enclaves(Vec<EnclaveInfo>),
    Terminated(Vec<(String, String)>),
    Console(ByteBuf),
    Relaying,
    Err { code: String, message: String },
}

/// Errors of the supervisor and of talking to it.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(
        "cannot reach the supervisor at {address}: {source} (start one with `cloister supervisor`, and set CLOISTER_SUPERVISOR)"
    )]
    Unreachable {
        address: String,
        source: TransportError,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("the supervisor closed the connection without answering")]
    Closed,
    #[error("the supervisor gave an unexpected answer")]
    Unexpected,
    /// The supervisor's (or the enclave's) refusal, with its code.
    #[error("{message}")]
    Refused { code: &'static str, message: String },
}

impl ErrorCode for SupervisorError {
    fn code(&self) -> &'static str {
        match self {
            SupervisorError::Unreachable { .. } => "E-SUPERVISOR-UNREACHABLE",
            SupervisorError::Frame(e) => e.code(),
            SupervisorError::Call(CallError::Refused { code, .. }) => known_code(code),
            SupervisorError::Call(e) => e.code(),
            SupervisorError::Closed | SupervisorError::Unexpected => "E-PROTO-IO",
            SupervisorError::Refused { code, .. } => code,
        }
    }
}

/// A code from another process, as one of this build's codes.
pub fn known_code(code: &str) -> &'static str {
    [
        cloister_runtime::CODES,
        crate::CODES,
        cloister_image::CODES,
        cloister_attestation::codes::CODES,
        cloister_kms_api::error::CODES,
        cloister_proto::codes::CODES,
    ]
    .iter()
    .flat_map(|t| t.iter())
    .find(|c| c.code == code)
    .map_or("E-ENCLAVE-CALL", |c| c.code)
}

/// The control socket's address: `CLOISTER_SUPERVISOR`, else the default.
pub fn default_address() -> String {
    std::env::var("CLOISTER_SUPERVISOR").unwrap_or_else(|_| DEFAULT_ADDRESS.into())
}

/// Where a system-wide supervisor listens (the systemd unit's socket).
pub const DEFAULT_ADDRESS: &str = "unix:/run/cloister/supervisor.sock";

async fn open(
    address: &Address,
    request: &Request,
) -> Result<(cloister_proto::Stream, Reply), SupervisorError> {
    let mut s =
        cloister_proto::connect(address)
            .await
            .map_err(|source| SupervisorError::Unreachable {
                address: address.to_string(),
                source,
            })?;
    frame::send(&mut s, request, MAX_CONTROL).await?;
    let reply: Reply = frame::recv(&mut s, MAX_CONTROL)
        .await?
        .ok_or(SupervisorError::Closed)?;
    if let Reply::Err { code, message } = reply {
        return Err(SupervisorError::Refused {
            code: known_code(&code),
            message,
        });
    }
    Ok((s, reply))
}

/// One request, one reply.
pub async fn request(address: &Address, request: Request) -> Result<Reply, SupervisorError> {
    Ok(open(address, &request).await?.1)
}

/// Sends one request to an enclave through the supervisor; returns its response.
pub async fn call_enclave(
    address: &Address,
    which: Which,
    kind: &CallKind,
    request: &[u8],
) -> Result<Vec<u8>, SupervisorError> {
    let (mut stream, reply) = open(address, &Request::Call(which)).await?;
    let Reply::Relaying = reply else {
        return Err(SupervisorError::Unexpected);
    };
    Ok(call::call(&mut stream, kind, request).await?)
}
