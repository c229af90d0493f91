//! The call protocol between a caller (through the supervisor's relay) and an
//! enclave runtime: one CBOR frame saying what is asked ([`CallKind`]), the
//! request as data frames (each at most [`CHUNK`]) ended by an empty frame; the
//! answer as one CBOR status frame ([`CallStatus`]), then, on success, the
//! response as data frames ended by an empty frame.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::codes::ErrorCode;
use crate::frame::{self, FrameError};

/// Data frames of the call protocol carry at most this much.
pub const CHUNK: usize = 1 << 20;
/// The largest request an enclave accepts.
pub const MAX_REQUEST: usize = 64 << 20;
/// The largest response a call may return.
pub const MAX_RESPONSE: usize = 16 << 20;

/// Responses carry at most this much: the workload's response, or its
/// encapsulation in the attested channel (a few hundred bytes more).
pub const MAX_ANSWER: usize = MAX_RESPONSE + (64 << 10);
/// The longest nonce a client may ask the channel's attestation document to hold.
pub const MAX_NONCE: usize = 512;
/// The shortest: a channel document always answers a client's challenge.
pub const MIN_NONCE: usize = 16;

/// What a connection to an enclave asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallKind {
    /// The workload's handler: the request and response as they are (what the
    /// parent relays, it can read).
    Workload,
    /// The attested channel: the request is an Oblivious HTTP encapsulated
    /// request (RFC 9458, `message/ohttp-req`) to one of the enclave's channel
    /// keys, the response an encapsulated response (`message/ohttp-res`).
    Channel,
    /// The channel's current key configuration (`application/ohttp-keys`).
    ChannelKeys,
    /// An attestation document of the enclave whose `public_key` is the
    /// channel's current key and whose `user_data` is its key configuration,
    /// over the caller's nonce ([`MIN_NONCE`] to [`MAX_NONCE`] bytes).
    ChannelAttestation { nonce: Option<ByteBuf> },
}

/// The status frame of a call's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallStatus {
    Ok,
    Err { code: String, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the connection closed in the middle of a message")]
    Closed,
    #[error("the message is over the limit of {0} bytes")]
    TooLarge(usize),
    /// The enclave's refusal, with its own code (`E-ENCLAVE-...`).
    #[error("[{code}] {message}")]
    Refused { code: String, message: String },
}

impl ErrorCode for CallError {
    fn code(&self) -> &'static str {
        match self {
            CallError::Frame(e) => e.code(),
            CallError::Closed => "E-PROTO-IO",
            CallError::TooLarge(_) => "E-ENCLAVE-REQUEST-TOO-LARGE",
            CallError::Refused { .. } => "E-ENCLAVE-CALL",
        }
    }
}

/// Reads a message sent as data frames ended by an empty frame.
pub async fn read_chunks<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Vec<u8>, CallError> {
    let mut out = Vec::new();
    loop {
        // Each frame lands in `out` directly; one over the limit is refused
        // once read (at most CHUNK bytes past it).
        let len = frame::read_frame_into(r, CHUNK as u32, &mut out)
            .await?
            .ok_or(CallError::Closed)?;
        if len == 0 {
            return Ok(out);
        }
        if out.len() > max {
            return Err(CallError::TooLarge(max));
        }
    }
}

/// Writes a message as data frames ended by an empty frame.
pub async fn write_chunks<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> Result<(), CallError> {
    for chunk in data.chunks(CHUNK) {
        frame::write_frame(w, chunk, CHUNK as u32).await?;
    }
    Ok(frame::write_frame(w, &[], CHUNK as u32).await?)
}

/// Sends one request over a connection to an enclave and returns its response.
pub async fn call<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    kind: &CallKind,
    request: &[u8],
) -> Result<Vec<u8>, CallError> {
    frame::send(stream, kind, CHUNK as u32).await?;
    write_chunks(stream, request).await?;
    let status: CallStatus = frame::recv(stream, CHUNK as u32)
        .await?
        .ok_or(CallError::Closed)?;
    match status {
        CallStatus::Ok => read_chunks(stream, MAX_ANSWER).await,
        CallStatus::Err { code, message } => Err(CallError::Refused { code, message }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], max: usize) -> Result<Vec<u8>, CallError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(read_chunks(&mut &bytes[..], max))
    }

    fn chunked(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(write_chunks(&mut out, data))
            .unwrap();
        out
    }

    #[test]
    fn a_message_of_many_frames_reads_back_whole() {
        let data: Vec<u8> = (0..CHUNK * 2 + 12_345).map(|i| (i % 251) as u8).collect();
        let wire = chunked(&data);
        assert_eq!(read(&wire, data.len()).unwrap(), data);
        assert_eq!(read(&chunked(&[]), 0).unwrap(), b"");
    }

    #[test]
    fn over_the_limit_truncated_and_unended_messages_are_refused() {
        let data = vec![7u8; CHUNK + 10];
        let wire = chunked(&data);
        assert!(
            matches!(read(&wire, data.len() - 1), Err(CallError::TooLarge(n)) if n == data.len() - 1)
        );
        // Cut inside the second frame's payload, and inside its header.
        let first = frame::HEADER_LEN + CHUNK;
        assert!(matches!(
            read(&wire[..first + frame::HEADER_LEN + 3], usize::MAX),
            Err(CallError::Frame(FrameError::Truncated { got, expected }))
                if got == frame::HEADER_LEN + 3 && expected == frame::HEADER_LEN + 10
        ));
        assert!(matches!(
            read(&wire[..first + 2], usize::MAX),
            Err(CallError::Frame(FrameError::Truncated { got: 2, .. }))
        ));
        // Every frame, but not the empty one that ends the message.
        let unended = &wire[..wire.len() - frame::HEADER_LEN];
        assert!(matches!(read(unended, usize::MAX), Err(CallError::Closed)));
    }
}
