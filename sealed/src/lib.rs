//! The sealed-data format: client-side envelope encryption of a stream of
//! records, readable inside an enclave and by the data owner. See
//! `docs/sealed-format.md` for the bytes.
//!
//! - A header names the KMS key, carries the data key encrypted by KMS, the
//!   encryption context, the chunk size, a random nonce prefix and a key
//!   commitment.
//! - The body is AES-256-GCM chunks in a STREAM construction: chunk i has nonce
//!   `prefix (7) || i (u32 BE) || last (1)` and AAD = SHA-256(header), so
//!   truncation, reordering, chunks moved between files and header changes are
//!   all detected.
//! - Records (CSV rows, JSON lines) never straddle chunks.
//!
//! The format does no cryptography itself: an [`Aead`] is supplied — the
//! runtime's `keys` import inside an enclave, or [`DataKey`] (RustCrypto's
//! AES-256-GCM) on the host and in the runtime.

pub mod parts;
pub mod records;

use std::io::{Read, Write};

use aes_gcm::aead::{Aead as _, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub const MAGIC: &[u8; 6] = b"CLSEAL";
pub const VERSION: u8 = 1;
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
const TAG: usize = 16;
const COMMIT_COUNTER: u32 = u32::MAX;
const COMMIT_FLAG: u8 = 2;
const COMMIT_LEN: usize = 32 + TAG;
const MAX_FIELD: usize = 64 * 1024;

/// AES-256-GCM with a 12-byte nonce, wherever the key lives.
pub trait Aead {
    fn seal(&self, nonce: &[u8; 12], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealedError>;
    fn open(&self, nonce: &[u8; 12], ciphertext: &[u8], aad: &[u8])
    -> Result<Vec<u8>, SealedError>;
}

#[derive(Debug)]
pub enum SealedError {
    /// Not a sealed file, or a version this build does not read.
    Format(String),
    /// The file ends early: a chunk or the final chunk is missing.
    Truncated(String),
    /// A chunk does not authenticate: altered, reordered, or from another file.
    Chunk(u64),
    /// The data key is not the one the header commits to.
    Commitment,
    /// A record does not fit in one chunk.
    RecordTooLarge {
        len: usize,
        chunk_size: u32,
    },
    /// An AEAD operation failed in the key holder.
    Crypto(String),
    Io(std::io::Error),
}

impl SealedError {
    pub fn code(&self) -> &'static str {
        match self {
            SealedError::Format(_) => "E-SEALED-FORMAT",
            SealedError::Truncated(_) => "E-SEALED-TRUNCATED",
            SealedError::Chunk(_) => "E-SEALED-TAMPERED",
            SealedError::Commitment => "E-SEALED-KEY-COMMITMENT",
            SealedError::RecordTooLarge { .. } => "E-SEALED-RECORD-TOO-LARGE",
            SealedError::Crypto(_) => "E-SEALED-CRYPTO",
            SealedError::Io(_) => "E-SEALED-IO",
        }
    }
}

impl std::fmt::Display for SealedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SealedError::Format(m) => write!(f, "not a sealed file: {m}"),
            SealedError::Truncated(m) => write!(f, "the sealed file is truncated: {m}"),
            SealedError::Chunk(i) => write!(
                f,
                "chunk {i} does not authenticate: the file was altered, its chunks reordered, or a chunk comes from another file"
            ),
            SealedError::Commitment => {
                write!(f, "the data key does not match the header's key commitment")
            }
            SealedError::RecordTooLarge { len, chunk_size } => {
                write!(
                    f,
                    "a record of {len} bytes does not fit in a chunk of {chunk_size} bytes"
                )
            }
            SealedError::Crypto(m) => write!(f, "{m}"),
            SealedError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SealedError {}

impl From<std::io::Error> for SealedError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            SealedError::Truncated("unexpected end of file".into())
        } else {
            SealedError::Io(e)
        }
    }
}

/// What a sealed file says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key_id: String,
    /// The data key as KMS encrypted it (a ciphertext blob).
    pub encrypted_data_key: Vec<u8>,
    /// Sorted by key; bound into the data key's encryption at KMS.
    pub encryption_context: Vec<(String, String)>,
    pub chunk_size: u32,
    pub nonce_prefix: [u8; 7],
    commitment: [u8; COMMIT_LEN],
}

fn put_str16(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn nonce(prefix: &[u8; 7], counter: u32, flag: u8) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..7].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = flag;
    n
}

impl Header {
    fn unsigned_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(VERSION);
        put_str16(&mut out, self.key_id.as_bytes());
        out.extend_from_slice(&(self.encrypted_data_key.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.encrypted_data_key);
        out.extend_from_slice(&(self.encryption_context.len() as u16).to_be_bytes());
        for (k, v) in &self.encryption_context {
            put_str16(&mut out, k.as_bytes());
            put_str16(&mut out, v.as_bytes());
        }
        out.extend_from_slice(&self.chunk_size.to_be_bytes());
        out.extend_from_slice(&self.nonce_prefix);
        out
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.unsigned_bytes();
        out.extend_from_slice(&self.commitment);
        out
    }

    /// The AAD of every chunk.
    fn aad(&self) -> [u8; 32] {
        Sha256::digest(self.bytes()).into()
    }

    fn commit(&self, aead: &dyn Aead) -> Result<Vec<u8>, SealedError> {
        let aad = Sha256::digest(self.unsigned_bytes());
        aead.seal(
            &nonce(&self.nonce_prefix, COMMIT_COUNTER, COMMIT_FLAG),
            &[0u8; 32],
            &aad,
        )
    }

    /// Reads and checks a header's structure (not yet its commitment: that needs the key).
    pub fn read<R: Read>(r: &mut R) -> Result<Header, SealedError> {
        let mut magic = [0u8; 7];
        r.read_exact(&mut magic)
            .map_err(|_| SealedError::Format("too short to be a sealed file".into()))?;
        if &magic[..6] != MAGIC {
            return Err(SealedError::Format("it does not start with CLSEAL".into()));
        }
        if magic[6] != VERSION {
            return Err(SealedError::Format(format!(
                "version {} is not supported (expected {VERSION})",
                magic[6]
            )));
        }
        let key_id = read_str16(r)?;
        let edk_len = read_u32(r)? as usize;
        if edk_len == 0 || edk_len > MAX_FIELD {
            return Err(SealedError::Format(format!(
                "encrypted data key of {edk_len} bytes"
            )));
        }
        let mut encrypted_data_key = vec![0u8; edk_len];
        r.read_exact(&mut encrypted_data_key)?;
        let n = read_u16(r)?;
        let mut encryption_context = Vec::with_capacity(n.into());
        for _ in 0..n {
            encryption_context.push((read_str16(r)?, read_str16(r)?));
        }
        if encryption_context.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(SealedError::Format(
                "the encryption context is not sorted by key".into(),
            ));
        }
        let chunk_size = read_u32(r)?;
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(SealedError::Format(format!(
                "chunk size {chunk_size} is outside 1..{MAX_CHUNK_SIZE}"
            )));
        }
        let mut nonce_prefix = [0u8; 7];
        r.read_exact(&mut nonce_prefix)?;
        let mut commitment = [0u8; COMMIT_LEN];
        r.read_exact(&mut commitment)?;
        Ok(Header {
            key_id,
            encrypted_data_key,
            encryption_context,
            chunk_size,
            nonce_prefix,
            commitment,
        })
    }
}

fn read_u16<R: Read>(r: &mut R) -> Result<u16, SealedError> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32<R: Read>(r: &mut R) -> Result<u32, SealedError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_str16<R: Read>(r: &mut R) -> Result<String, SealedError> {
    let len = read_u16(r)?;
    let mut b = vec![0u8; len.into()];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| SealedError::Format("a header string is not UTF-8".into()))
}

/// Writes a sealed stream, packing whole records into chunks.
pub struct Writer<'a, W: Write> {
    out: W,
    aead: &'a dyn Aead,
    header: Header,
    aad: [u8; 32],
    buffer: Vec<u8>,
    counter: u32,
}

impl<'a, W: Write> Writer<'a, W> {
    /// Starts a sealed stream: writes the header with its key commitment.
    /// `nonce_prefix` must be random (7 bytes) and `aead` must hold the data key
    /// that `encrypted_data_key` encrypts.
    pub fn new(
        mut out: W,
        aead: &'a dyn Aead,
        key_id: &str,
        encrypted_data_key: Vec<u8>,
        mut encryption_context: Vec<(String, String)>,
        chunk_size: u32,
        nonce_prefix: [u8; 7],
    ) -> Result<Self, SealedError> {
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(SealedError::Format(format!(
                "chunk size {chunk_size} is outside 1..{MAX_CHUNK_SIZE}"
            )));
        }
        encryption_context.sort();
        encryption_context.dedup_by(|a, b| a.0 == b.0);
        let mut header = Header {
            key_id: key_id.to_owned(),
            encrypted_data_key,
            encryption_context,
            chunk_size,
            nonce_prefix,
            commitment: [0u8; COMMIT_LEN],
        };
        let commitment = header.commit(aead)?;
        header.commitment = commitment
            .try_into()
            .map_err(|_| SealedError::Crypto("the key commitment has the wrong length".into()))?;
        out.write_all(&header.bytes())?;
        let aad = header.aad();
        Ok(Writer {
            out,
            aead,
            header,
            aad,
            buffer: Vec::with_capacity(chunk_size as usize),
            counter: 0,
        })
    }

    /// Adds one record (for example a CSV row with its newline). It goes into the
    /// current chunk, or starts the next one; it never straddles two.
    pub fn write_record(&mut self, record: &[u8]) -> Result<(), SealedError> {
        let size = self.header.chunk_size as usize;
        if record.len() > size {
            return Err(SealedError::RecordTooLarge {
                len: record.len(),
                chunk_size: self.header.chunk_size,
            });
        }
        if self.buffer.len() + record.len() > size {
            self.flush_chunk(false)?;
        }
        self.buffer.extend_from_slice(record);
        Ok(())
    }

    fn flush_chunk(&mut self, last: bool) -> Result<(), SealedError> {
        if self.counter == COMMIT_COUNTER {
            return Err(SealedError::Format("too many chunks for one file".into()));
        }
        let n = nonce(&self.header.nonce_prefix, self.counter, u8::from(last));
        let ct = self.aead.seal(&n, &self.buffer, &self.aad)?;
        self.out.write_all(&(ct.len() as u32).to_be_bytes())?;
        self.out.write_all(&ct)?;
        self.buffer.clear();
        self.counter += 1;
        Ok(())
    }

    /// Writes the final chunk (flagged last) and returns the output.
    pub fn finish(mut self) -> Result<W, SealedError> {
        self.flush_chunk(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a sealed stream chunk by chunk, checking every one.
pub struct Reader<'a, R: Read> {
    input: R,
    aead: &'a dyn Aead,
    header: Header,
    aad: [u8; 32],
    counter: u32,
    done: bool,
}

impl<'a, R: Read> Reader<'a, R> {
    /// Checks the key commitment of `header` (already read from `input`) with
    /// the data key in `aead`.
    pub fn new(header: Header, input: R, aead: &'a dyn Aead) -> Result<Self, SealedError> {
        let expected = header.commit(aead)?;
        // Not secret-dependent timing worth protecting: both sides are public
        // once the key is known; a mismatch means the wrong key.
        if expected != header.commitment {
            return Err(SealedError::Commitment);
        }
        let aad = header.aad();
        Ok(Reader {
            input,
            aead,
            header,
            aad,
            counter: 0,
            done: false,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next chunk's plaintext; `None` after the last chunk, which must be
    /// followed by the end of the input.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, SealedError> {
        if self.done {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        match self.input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(SealedError::Truncated(format!(
                    "{} chunks read and the final chunk is missing",
                    self.counter
                )));
            }
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len < TAG || len > self.header.chunk_size as usize + TAG {
            return Err(SealedError::Chunk(self.counter.into()));
        }
        let mut ct = vec![0u8; len];
        self.input.read_exact(&mut ct)?;
        let prefix = self.header.nonce_prefix;
        // Try as an inner chunk, then as the last: the flag is authenticated.
        let plain = match self
            .aead
            .open(&nonce(&prefix, self.counter, 0), &ct, &self.aad)
        {
            Ok(p) => p,
            Err(_) => {
                let p = self
                    .aead
                    .open(&nonce(&prefix, self.counter, 1), &ct, &self.aad)
                    .map_err(|_| SealedError::Chunk(self.counter.into()))?;
                self.done = true;
                let mut extra = [0u8; 1];
                if self.input.read(&mut extra)? != 0 {
                    return Err(SealedError::Format("data follows the final chunk".into()));
                }
                p
            }
        };
        self.counter += 1;
        Ok(Some(plain))
    }

    /// Calls `f` with each record (a line with its newline, as written).
    pub fn for_each_line(
        &mut self,
        mut f: impl FnMut(&[u8]) -> Result<(), SealedError>,
    ) -> Result<(), SealedError> {
        while let Some(chunk) = self.next_chunk()? {
            for line in chunk.split_inclusive(|b| *b == b'\n') {
                f(line)?;
            }
        }
        Ok(())
    }
}

/// A 256-bit data key held in this process, with RustCrypto's AES-256-GCM;
/// zeroized on drop.
pub struct DataKey(Zeroizing<Vec<u8>>);

impl DataKey {
    pub fn new(key: Zeroizing<Vec<u8>>) -> Result<Self, SealedError> {
        if key.len() != 32 {
            return Err(SealedError::Crypto(format!(
                "a data key is 32 bytes, not {}",
                key.len()
            )));
        }
        Ok(DataKey(key))
    }

    fn cipher(&self) -> Result<Aes256Gcm, SealedError> {
        Aes256Gcm::new_from_slice(&self.0).map_err(|_| SealedError::Crypto("bad key length".into()))
    }
}

impl Aead for DataKey {
    fn seal(&self, nonce: &[u8; 12], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealedError> {
        self.cipher()?
            .encrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| SealedError::Crypto("AES-GCM encryption failed".into()))
    }
    fn open(
        &self,
        nonce: &[u8; 12],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, SealedError> {
        self.cipher()?
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| SealedError::Crypto("AES-GCM authentication failed".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test AEAD: a keyed, nonce- and AAD-bound checksum. Not encryption; the
    /// real AES-GCM implementations are tested where they live.
    struct Fake(u8);

    impl Fake {
        fn tag(&self, nonce: &[u8; 12], data: &[u8], aad: &[u8]) -> [u8; 16] {
            let mut h = Sha256::new();
            h.update([self.0]);
            h.update(nonce);
            h.update(aad);
            h.update(data);
            h.finalize()[..16].try_into().unwrap()
        }
    }

    impl Aead for Fake {
        fn seal(
            &self,
            nonce: &[u8; 12],
            plaintext: &[u8],
            aad: &[u8],
        ) -> Result<Vec<u8>, SealedError> {
            let mut out: Vec<u8> = plaintext.iter().map(|b| b ^ self.0).collect();
            out.extend_from_slice(&self.tag(nonce, plaintext, aad));
            Ok(out)
        }
        fn open(&self, nonce: &[u8; 12], ct: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealedError> {
            let (body, tag) = ct.split_at(ct.len() - 16);
            let plain: Vec<u8> = body.iter().map(|b| b ^ self.0).collect();
            if self.tag(nonce, &plain, aad) != tag {
                return Err(SealedError::Crypto("bad tag".into()));
            }
            Ok(plain)
        }
    }

    fn seal(records: &[&[u8]], chunk: u32, prefix: [u8; 7]) -> Vec<u8> {
        let aead = Fake(7);
        let mut w = Writer::new(
            Vec::new(),
            &aead,
            "key",
            vec![1, 2, 3],
            vec![("b".into(), "2".into()), ("a".into(), "1".into())],
            chunk,
            prefix,
        )
        .unwrap();
        for r in records {
            w.write_record(r).unwrap();
        }
        w.finish().unwrap()
    }

    fn open(bytes: &[u8]) -> Result<Vec<Vec<u8>>, SealedError> {
        let aead = Fake(7);
        let mut input = bytes;
        let header = Header::read(&mut input)?;
        let mut r = Reader::new(header, input, &aead)?;
        let mut chunks = Vec::new();
        while let Some(c) = r.next_chunk()? {
            chunks.push(c);
        }
        Ok(chunks)
    }

    #[test]
    fn records_never_straddle_chunks() {
        let rows: Vec<Vec<u8>> = (0..50)
            .map(|i| format!("patient-{i},{}\n", "x".repeat(i % 7)).into_bytes())
            .collect();
        let refs: Vec<&[u8]> = rows.iter().map(|r| r.as_slice()).collect();
        let bytes = seal(&refs, 64, [9; 7]);
        let chunks = open(&bytes).unwrap();
        assert!(chunks.len() > 5);
        for c in &chunks {
            assert!(
                c.is_empty() || c.ends_with(b"\n"),
                "a chunk ends mid-record"
            );
            assert!(c.len() <= 64);
        }
        assert_eq!(chunks.concat(), rows.concat());
        let header = Header::read(&mut &bytes[..]).unwrap();
        assert_eq!(
            header.encryption_context,
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
    }

    #[test]
    fn empty_input_is_one_empty_final_chunk() {
        let bytes = seal(&[], 64, [0; 7]);
        assert_eq!(open(&bytes).unwrap(), vec![Vec::<u8>::new()]);
    }

    #[test]
    fn truncation_at_every_length_is_detected() {
        let bytes = seal(&[b"a,1\n", b"b,2\n", b"c,3\n"], 8, [1; 7]);
        for n in 0..bytes.len() {
            assert!(
                open(&bytes[..n]).is_err(),
                "truncated to {n} bytes was accepted"
            );
        }
        // Dropping whole final chunk specifically names truncation.
        let header_len = Header::read(&mut &bytes[..]).unwrap().bytes().len();
        let first_chunk = header_len
            + 4
            + u32::from_be_bytes(bytes[header_len..header_len + 4].try_into().unwrap()) as usize;
        assert!(matches!(
            open(&bytes[..first_chunk]),
            Err(SealedError::Truncated(_))
        ));
    }

    #[test]
    fn any_changed_byte_is_detected() {
        let bytes = seal(&[b"a,1\n", b"b,2\n"], 8, [1; 7]);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(
                open(&bad).is_err(),
                "byte {i} changed and the file still opened"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(open(&longer).is_err());
    }

    #[test]
    fn reordered_and_foreign_chunks_are_detected() {
        let a = seal(&[b"aaaa\n", b"bbbb\n", b"cccc\n"], 5, [1; 7]);
        let hl = Header::read(&mut &a[..]).unwrap().bytes().len();
        let chunk_len = 4 + 5 + 16;
        // Swap chunks 0 and 1.
        let mut swapped = a.clone();
        let (c0, c1) = (
            a[hl..hl + chunk_len].to_vec(),
            a[hl + chunk_len..hl + 2 * chunk_len].to_vec(),
        );
        swapped[hl..hl + chunk_len].copy_from_slice(&c1);
        swapped[hl + chunk_len..hl + 2 * chunk_len].copy_from_slice(&c0);
        assert!(matches!(open(&swapped), Err(SealedError::Chunk(0))));
        // A chunk from another file with the same key and layout.
        let b = seal(&[b"xxxx\n", b"yyyy\n", b"zzzz\n"], 5, [2; 7]);
        let mut mixed = a.clone();
        mixed[hl..hl + chunk_len].copy_from_slice(&b[hl..hl + chunk_len]);
        assert!(open(&mixed).is_err());
    }

    #[test]
    fn the_wrong_key_fails_the_commitment() {
        let bytes = seal(&[b"a\n"], 8, [1; 7]);
        let mut input = &bytes[..];
        let header = Header::read(&mut input).unwrap();
        assert!(matches!(
            Reader::new(header, input, &Fake(8)),
            Err(SealedError::Commitment)
        ));
    }

    #[test]
    fn oversized_records_and_chunk_lengths_are_refused() {
        let aead = Fake(7);
        let mut w = Writer::new(Vec::new(), &aead, "k", vec![1], vec![], 4, [0; 7]).unwrap();
        assert!(matches!(
            w.write_record(b"12345"),
            Err(SealedError::RecordTooLarge {
                len: 5,
                chunk_size: 4
            })
        ));
        // A chunk length field claiming more than chunk size + tag is refused before reading.
        let bytes = seal(&[b"ab\n"], 8, [1; 7]);
        let hl = Header::read(&mut &bytes[..]).unwrap().bytes().len();
        let mut bad = bytes.clone();
        bad[hl..hl + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(open(&bad), Err(SealedError::Chunk(0))));
        assert!(matches!(
            Header::read(&mut &b"CLSEAL\x02"[..]),
            Err(SealedError::Format(_))
        ));
        assert!(matches!(
            Header::read(&mut &b"NOTSEAL"[..]),
            Err(SealedError::Format(_))
        ));
    }
}
