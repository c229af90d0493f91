//! A client of the broker: signs each request with the principal's key.

use ed25519_dalek::SigningKey;
use rand_core::RngCore;

use cloister_proto::frame::{self, FrameError};
use cloister_proto::{Address, ErrorCode, Stream, TransportError};

use crate::error::KmsError;
use crate::protocol::{MAX_MESSAGE, Operation, Output, RequestPayload, Response, SignedRequest};
use crate::service::now_ms;

/// Who the client speaks for.
pub struct Credentials {
    pub principal: String,
    pub key: SigningKey,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error("the broker closed the connection without answering")]
    Closed,
    #[error("the broker answered request {got:?} to request {sent:?}")]
    Mismatch { sent: String, got: String },
}

impl ErrorCode for ClientError {
    fn code(&self) -> &'static str {
        match self {
            ClientError::Transport(e) => e.code(),
            ClientError::Frame(e) => e.code(),
            ClientError::Kms(e) => e.code(),
            ClientError::Closed | ClientError::Mismatch { .. } => "E-PROTO-IO",
        }
    }
}

pub struct KmsClient {
    stream: Stream,
    credentials: Credentials,
}

impl KmsClient {
    pub async fn connect(addr: &Address, credentials: Credentials) -> Result<Self, ClientError> {
        Ok(KmsClient {
            stream: cloister_proto::connect(addr).await?,
            credentials,
        })
    }

    /// Wraps an already connected stream (e.g. one relayed by a proxy).
    pub fn from_stream(stream: Stream, credentials: Credentials) -> Self {
        KmsClient {
            stream,
            credentials,
        }
    }

    /// Signs and sends one operation; returns its output or the broker's error.
    pub async fn call(&mut self, operation: Operation) -> Result<Output, ClientError> {
        let mut id = [0u8; 16];
        rand_core::OsRng.fill_bytes(&mut id);
        let payload = RequestPayload {
            principal: self.credentials.principal.clone(),
            timestamp_ms: now_ms(),
            request_id: hex::encode(id),
            operation,
        };
        let signed = SignedRequest::sign(&payload, &self.credentials.key)?;
        frame::send(&mut self.stream, &signed, MAX_MESSAGE).await?;
        let response: Response = frame::recv(&mut self.stream, MAX_MESSAGE)
            .await?
            .ok_or(ClientError::Closed)?;
        if response.request_id != payload.request_id {
            // A refusal before the request was read (connection limit, bad frame)
            // carries no id; report the broker's reason.
            if response.request_id.is_empty()
                && let Err(e) = response.result
            {
                return Err(e.into());
            }
            return Err(ClientError::Mismatch {
                sent: payload.request_id,
                got: response.request_id,
            });
        }
        Ok(response.result?)
    }
}
