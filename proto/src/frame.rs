//! Versioned, length-prefixed frames.
//!
//! ```text
//! +---------+----------------------+-----------------+
//! | version | length (u32, big end)| payload (length)|
//! |  1 byte |       4 bytes        |                 |
//! +---------+----------------------+-----------------+
//! ```
//!
//! The length is checked against the receiver's cap before the payload buffer is
//! allocated, so a hostile peer cannot make a receiver reserve memory it did not
//! agree to; the buffer is filled as bytes arrive (nothing is written ahead of
//! them). Payloads are CBOR messages ([`encode`], [`decode`]).

use std::io::Cursor;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codes::ErrorCode;

/// The wire protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// The default hard cap on one frame's payload: 4 MiB. Larger data is streamed.
pub const MAX_FRAME_LEN: u32 = 4 * 1024 * 1024;
/// The frame header: version and length.
pub const HEADER_LEN: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u32 },
    #[error("frame has protocol version {0}, this build speaks version {PROTOCOL_VERSION}")]
    Version(u8),
    #[error("connection closed after {got} of {expected} bytes of a frame")]
    Truncated { got: usize, expected: usize },
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Message(String),
}

impl ErrorCode for FrameError {
    fn code(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "E-PROTO-FRAME-TOO-LARGE",
            FrameError::Version(_) => "E-PROTO-FRAME-VERSION",
            FrameError::Truncated { .. } => "E-PROTO-FRAME-TRUNCATED",
            FrameError::Io(_) => "E-PROTO-IO",
            FrameError::Message(_) => "E-PROTO-MESSAGE",
        }
    }
}

/// Writes one frame. Refuses (without writing anything) a payload over `max`.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
    max: u32,
) -> Result<(), FrameError> {
    let header = header(payload.len(), max)?;
    w.write_all(&header).await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` means the peer closed cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut payload = Vec::new();
    Ok(read_frame_into(r, max, &mut payload)
        .await?
        .map(|_| payload))
}

/// Reads one frame and appends its payload to `out` (no buffer of its own for
/// a message read in many frames); returns the payload's length, or `Ok(None)`
/// when the peer closed cleanly between frames. On an error `out` may hold
/// part of the payload: the caller drops it.
pub async fn read_frame_into<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
    out: &mut Vec<u8>,
) -> Result<Option<usize>, FrameError> {
    let Some(len) = read_header(r, max).await? else {
        return Ok(None);
    };
    // Memory is reserved (address space), and filled only as bytes arrive: a
    // peer that sends a header and stalls holds no resident memory for it.
    let start = out.len();
    out.reserve(len);
    let mut payload = (&mut *r).take(len as u64);
    while out.len() - start < len {
        if payload.read_buf(out).await? == 0 {
            break;
        }
    }
    let got = out.len() - start;
    if got < len {
        return Err(FrameError::Truncated {
            got: HEADER_LEN + got,
            expected: HEADER_LEN + len,
        });
    }
    Ok(Some(len))
}

/// Reads one frame and drops its payload through a fixed buffer, however
/// large it says it is (up to `max`); returns its length, or `Ok(None)` on a
/// clean close. For a peer that is refused but should still see the refusal
/// rather than a broken pipe.
pub async fn skip_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
) -> Result<Option<usize>, FrameError> {
    let Some(len) = read_header(r, max).await? else {
        return Ok(None);
    };
    let got = tokio::io::copy(&mut (&mut *r).take(len as u64), &mut tokio::io::sink()).await?;
    if got < len as u64 {
        return Err(FrameError::Truncated {
            got: HEADER_LEN + got as usize,
            expected: HEADER_LEN + len,
        });
    }
    Ok(Some(len))
}

/// A frame's payload length from its header, checked against `max`;
/// `Ok(None)` when the peer closed cleanly before it.
async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
) -> Result<Option<usize>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(FrameError::Truncated {
            got,
            expected: HEADER_LEN,
        });
    }
    check_header(&header, max).map(Some)
}

/// The header of a frame of `len` bytes; refuses a length over `max`.
pub fn header(len: usize, max: u32) -> Result<[u8; HEADER_LEN], FrameError> {
    let len = u32::try_from(len)
        .ok()
        .filter(|l| *l <= max)
        .ok_or(FrameError::TooLarge {
            len: len as u64,
            max,
        })?;
    let mut header = [0u8; HEADER_LEN];
    header[0] = PROTOCOL_VERSION;
    header[1..].copy_from_slice(&len.to_be_bytes());
    Ok(header)
}

/// The payload length a header announces, checked against `max` (before
/// anything is allocated) and the protocol version.
pub fn check_header(header: &[u8; HEADER_LEN], max: u32) -> Result<usize, FrameError> {
    if header[0] != PROTOCOL_VERSION {
        return Err(FrameError::Version(header[0]));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len > max {
        return Err(FrameError::TooLarge {
            len: len.into(),
            max,
        });
    }
    Ok(len as usize)
}

/// Reads until `buf` is full or EOF; returns how many bytes were read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Encodes a message as CBOR.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    ciborium::into_writer(msg, &mut out).map_err(|e| FrameError::Message(e.to_string()))?;
    Ok(out)
}

/// Decodes exactly one CBOR message; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    let mut cursor = Cursor::new(bytes);
    let msg = ciborium::from_reader(&mut cursor).map_err(|e| FrameError::Message(e.to_string()))?;
    let used = cursor.position() as usize;
    if used != bytes.len() {
        return Err(FrameError::Message(format!(
            "{} trailing bytes after the message",
            bytes.len() - used
        )));
    }
    Ok(msg)
}

/// Encodes `msg` and writes it as one frame.
pub async fn send<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
    max: u32,
) -> Result<(), FrameError> {
    write_frame(w, &encode(msg)?, max).await
}

/// Reads one frame and decodes it; `Ok(None)` on a clean close between frames.
pub async fn recv<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max: u32,
) -> Result<Option<T>, FrameError> {
    match read_frame(r, max).await? {
        Some(payload) => decode(&payload).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    fn framed(version: u8, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![version];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn round_trip_and_clean_eof() {
        rt().block_on(async {
            let mut buf = Vec::new();
            write_frame(&mut buf, b"hello", MAX_FRAME_LEN)
                .await
                .unwrap();
            write_frame(&mut buf, b"", MAX_FRAME_LEN).await.unwrap();
            assert_eq!(buf.len(), 5 + 5 + 5);
            let mut r = &buf[..];
            assert_eq!(
                read_frame(&mut r, MAX_FRAME_LEN).await.unwrap().unwrap(),
                b"hello"
            );
            assert_eq!(
                read_frame(&mut r, MAX_FRAME_LEN).await.unwrap().unwrap(),
                b""
            );
            assert!(read_frame(&mut r, MAX_FRAME_LEN).await.unwrap().is_none());
        });
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        rt().block_on(async {
            // A header claiming 4 GiB with no payload: must fail on the length,
            // not try to allocate or wait for the bytes.
            let bytes = framed(PROTOCOL_VERSION, u32::MAX, b"");
            let err = read_frame(&mut &bytes[..], 1024).await.unwrap_err();
            assert!(
                matches!(err, FrameError::TooLarge { len, max: 1024 } if len == u64::from(u32::MAX))
            );
            assert_eq!(err.code(), "E-PROTO-FRAME-TOO-LARGE");
        });
    }

    #[test]
    fn oversized_payload_is_not_written() {
        rt().block_on(async {
            let mut buf = Vec::new();
            let err = write_frame(&mut buf, &[0u8; 11], 10).await.unwrap_err();
            assert!(matches!(err, FrameError::TooLarge { len: 11, max: 10 }));
            assert!(buf.is_empty(), "nothing may be written for a refused frame");
        });
    }

    #[test]
    fn wrong_version_and_truncation_are_typed() {
        rt().block_on(async {
            let bytes = framed(2, 1, b"x");
            let err = read_frame(&mut &bytes[..], 10).await.unwrap_err();
            assert!(matches!(err, FrameError::Version(2)));
            assert_eq!(err.code(), "E-PROTO-FRAME-VERSION");

            let bytes = framed(PROTOCOL_VERSION, 10, b"abc");
            let err = read_frame(&mut &bytes[..], 10).await.unwrap_err();
            assert!(matches!(
                err,
                FrameError::Truncated {
                    got: 8,
                    expected: 15
                }
            ));

            let bytes = [PROTOCOL_VERSION, 0, 0];
            let err = read_frame(&mut &bytes[..], 10).await.unwrap_err();
            assert!(matches!(
                err,
                FrameError::Truncated {
                    got: 3,
                    expected: 5
                }
            ));
            assert_eq!(err.code(), "E-PROTO-FRAME-TRUNCATED");
        });
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Msg {
        op: String,
        n: u32,
    }

    #[test]
    fn messages_decode_strictly() {
        let m = Msg {
            op: "x".into(),
            n: 7,
        };
        let mut bytes = encode(&m).unwrap();
        assert_eq!(decode::<Msg>(&bytes).unwrap(), m);
        bytes.push(0);
        let err = decode::<Msg>(&bytes).unwrap_err();
        assert!(err.to_string().contains("1 trailing bytes"), "{err}");
        let err = decode::<Msg>(&encode(&("x", 7)).unwrap()).unwrap_err();
        assert_eq!(err.code(), "E-PROTO-MESSAGE");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            rt().block_on(async {
                let _ = read_frame(&mut &bytes[..], 32).await;
            });
            let _ = decode::<Msg>(&bytes);
        }
    }
}
