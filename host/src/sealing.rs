//! The data owner's side of the sealed-data format: `cloister encrypt` and
//! `cloister decrypt`, streaming with constant memory, with the data key from the
//! key broker and AES-256-GCM from RustCrypto.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use cloister_sealed::{self as sealed, DataKey, SealedError};

/// An output file that appears only when complete: written to a temporary file
/// beside it, fsynced, then renamed; removed if dropped unfinished.
pub struct AtomicOutput {
    tmp: PathBuf,
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl AtomicOutput {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path")
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".partial{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        Ok(AtomicOutput {
            tmp,
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    pub fn commit(mut self) -> std::io::Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_all()?;
        }
        std::fs::rename(&self.tmp, &self.path)
    }
}

impl Write for AtomicOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(std::io::Error::other("output already committed")),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Prints progress on stderr when it is a terminal.
struct Progress {
    total: u64,
    done: u64,
    shown: u64,
    on: bool,
}

impl Progress {
    fn new(total: u64) -> Self {
        Progress {
            total,
            done: 0,
            shown: 0,
            on: std::io::stderr().is_terminal(),
        }
    }
    fn add(&mut self, n: usize) {
        self.done += n as u64;
        if self.on && (self.done - self.shown >= 1 << 20 || self.done == self.total) {
            self.shown = self.done;
            let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
            eprint!(
                "\r{:>3}% {} / {} MiB",
                pct,
                self.done >> 20,
                self.total >> 20
            );
        }
    }
    fn end(&self) {
        if self.on {
            eprintln!();
        }
    }
}

/// Seals `input` line by line (records never straddle chunks).
pub fn seal_file(
    input: &Path,
    output: &Path,
    key: &DataKey,
    key_id: &str,
    encrypted_data_key: Vec<u8>,
    context: Vec<(String, String)>,
    chunk_size: u32,
) -> Result<u64, SealedError> {
    let file = std::fs::File::open(input)?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut prefix = [0u8; 7];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut prefix);
    let out = AtomicOutput::create(output)?;
    let mut writer = sealed::Writer::new(
        std::io::BufWriter::new(out),
        key,
        key_id,
        encrypted_data_key,
        context,
        chunk_size,
        prefix,
    )?;
    let mut progress = Progress::new(total);
    let mut line = Vec::new();
    let mut records = 0;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        writer.write_record(&line)?;
        progress.add(line.len());
        records += 1;
    }
    progress.end();
    let out = writer.finish()?;
    out.into_inner()
        .map_err(|e| SealedError::Io(e.into_error()))?
        .commit()?;
    Ok(records)
}

/// Opens a sealed file into `output`; nothing appears unless every chunk checks.
pub fn open_file<R: Read>(
    header: sealed::Header,
    rest: R,
    key: &DataKey,
    output: &Path,
) -> Result<u64, SealedError> {
    let mut reader = sealed::Reader::new(header, rest, key)?;
    let mut out = std::io::BufWriter::new(AtomicOutput::create(output)?);
    let mut bytes = 0;
    while let Some(chunk) = reader.next_chunk()? {
        out.write_all(&chunk)?;
        bytes += chunk.len() as u64;
    }
    out.into_inner()
        .map_err(|e| SealedError::Io(e.into_error()))?
        .commit()?;
    Ok(bytes)
}

/// The codes of the sealed-data format.
pub const CODES: &[cloister_proto::CodeInfo] = &[
    cloister_proto::CodeInfo {
        code: "E-SEALED-FORMAT",
        summary: "not a sealed file, or an unsupported version",
        explanation: "A sealed file starts with CLSEAL and version 1, then its header (key id, encrypted data key, encryption context, chunk size, nonce prefix, key commitment). See docs/sealed-format.md.",
    },
    cloister_proto::CodeInfo {
        code: "E-SEALED-TRUNCATED",
        summary: "the sealed file is cut short",
        explanation: "The final chunk (flagged last inside its authenticated nonce) is missing: the file was truncated in storage or transfer. Nothing was written.",
    },
    cloister_proto::CodeInfo {
        code: "E-SEALED-TAMPERED",
        summary: "a chunk does not authenticate",
        explanation: "A chunk was altered, chunks were reordered, a chunk was copied from another sealed file, or the header was changed (it is bound to every chunk). Nothing was written.",
    },
    cloister_proto::CodeInfo {
        code: "E-SEALED-KEY-COMMITMENT",
        summary: "the data key does not match the file",
        explanation: "The header commits to one data key; the key the broker returned is another. The header's encrypted data key was replaced.",
    },
    cloister_proto::CodeInfo {
        code: "E-SEALED-RECORD-TOO-LARGE",
        summary: "a record is larger than a chunk",
        explanation: "Records (lines) never straddle chunks, so each must fit in one. Use a larger --chunk-size.",
    },
    cloister_proto::CodeInfo {
        code: "E-SEALED-CRYPTO",
        summary: "the key holder could not encrypt or decrypt",
        explanation: "The data key is not a 256-bit key, or AES-GCM failed.",
    },
    cloister_proto::CodeInfo {
        code: "E-SEALED-IO",
        summary: "the sealed file could not be read or written",
        explanation: "Check the paths and the free space. No partial output is left behind.",
    },
];
