//! A client of the broker: signs each request with the principal's key.

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::RngCore;

use tokio::io::{AsyncRead, AsyncWrite};

use cloister_proto::frame::{self, FrameError};
use cloister_proto::{Address, ErrorCode, TransportError};

use crate::error::KmsError;
use crate::now_ms;
use crate::protocol::{
    MAX_MESSAGE, MAX_REQUEST, Operation, Output, RequestPayload, ResponseError, SignedRequest,
    SignedResponse, request_digest,
};
use crate::tls::ClientTls;

/// Any byte stream the client can speak over: a socket, or TLS over one.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

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
    #[error("the answer is not the broker's: {0}")]
    Unauthenticated(#[from] ResponseError),
    #[error("the broker's signed answer is for another request than the one sent")]
    WrongRequest,
    #[error("TLS with the broker failed: {0}")]
    Tls(String),
    #[error(
        "{0} is a TCP address: the broker speaks TLS there; give its CA with --ca (CLOISTER_KMS_CA)"
    )]
    TlsRequired(Address),
}

impl ErrorCode for ClientError {
    fn code(&self) -> &'static str {
        match self {
            ClientError::Transport(e) => e.code(),
            ClientError::Frame(e) => e.code(),
            ClientError::Kms(e) => e.code(),
            ClientError::Closed | ClientError::Mismatch { .. } => "E-PROTO-IO",
            ClientError::Unauthenticated(_) | ClientError::WrongRequest => {
                "E-KMS-UNAUTHENTICATED-RESPONSE"
            }
            ClientError::Tls(_) | ClientError::TlsRequired(_) => "E-KMS-TLS",
        }
    }
}

pub struct KmsClient {
    stream: Box<dyn Io>,
    credentials: Credentials,
    broker_key: Option<VerifyingKey>,
}

impl KmsClient {
    /// Connects to the broker; with `tls`, speaks TLS over the connection (always
    /// for a TCP address; also through a relay such as `cloister proxy`).
    pub async fn connect(
        addr: &Address,
        tls: Option<&ClientTls>,
        credentials: Credentials,
    ) -> Result<Self, ClientError> {
        let stream = cloister_proto::connect(addr).await?;
        let stream: Box<dyn Io> = match tls {
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                Box::new(
                    connector
                        .connect(tls.server_name.clone(), stream)
                        .await
                        .map_err(|e| ClientError::Tls(e.to_string()))?,
                )
            }
            None if matches!(addr, Address::Tcp { .. }) => {
                return Err(ClientError::TlsRequired(addr.clone()));
            }
            None => Box::new(stream),
        };
        Ok(KmsClient {
            stream,
            credentials,
            broker_key: None,
        })
    }

    /// Accepts only answers signed by this broker key and bound to the request
    /// sent (an enclave runtime pins the key its image names).
    pub fn pin_broker_key(mut self, key: VerifyingKey) -> Self {
        self.broker_key = Some(key);
        self
    }

    /// Signs and sends one operation; returns its output or the broker's error.
    pub async fn call(&mut self, operation: Operation) -> Result<Output, ClientError> {
        Ok(self.call_identified(operation).await?.1)
    }

    /// As [`KmsClient::call`], also returning the request id it signed.
    pub async fn call_identified(
        &mut self,
        operation: Operation,
    ) -> Result<(String, Output), ClientError> {
        let mut id = [0u8; 16];
        rand_core::OsRng.fill_bytes(&mut id);
        let payload = RequestPayload {
            principal: self.credentials.principal.clone(),
            timestamp_ms: now_ms(),
            request_id: hex::encode(id),
            operation,
        };
        let signed = SignedRequest::sign(&payload, &self.credentials.key)?;
        frame::send(&mut self.stream, &signed, MAX_REQUEST).await?;
        let answer: SignedResponse = frame::recv(&mut self.stream, MAX_MESSAGE)
            .await?
            .ok_or(ClientError::Closed)?;
        let response = match &self.broker_key {
            Some(key) => {
                let response = answer.verify(key)?;
                // A refusal before the broker read a request (its connection
                // limit) names no request; it is the broker's all the same.
                let refusal = response.request_digest.is_empty()
                    && response.request_id.is_empty()
                    && response.result.is_err();
                if !refusal && response.request_digest != request_digest(&signed.payload) {
                    return Err(ClientError::WrongRequest);
                }
                response
            }
            None => answer.decode_unverified()?,
        };
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
        Ok((payload.request_id, response.result?))
    }
}
