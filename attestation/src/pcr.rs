//! Platform configuration registers: 32 SHA-384 registers with Nitro's recipes.
//!
//! - Build-time measurements: `PCRn = SHA384(0^48 || SHA384(bytes))` ([`measure`]),
//!   and for PCR3/PCR4 the raw string appended instead of its digest
//!   ([`measure_raw`]), as AWS documents for the parent's role ARN.
//! - Run time: PCR16..31 are extended by the workload as `SHA384(old || data)` and
//!   can be locked; PCR0..15 are fixed when the enclave starts.

use std::collections::BTreeMap;

use sha2::{Digest, Sha384};

use cloister_proto::ErrorCode;

/// Number of registers in the bank.
pub const PCR_COUNT: usize = 32;
/// Bytes in one register (SHA-384).
pub const PCR_LEN: usize = 48;
/// First register the workload may extend.
pub const FIRST_RUNTIME_PCR: usize = 16;

/// One register value.
pub type Pcr = [u8; PCR_LEN];

/// Well-known register indices, as Nitro assigns them.
pub mod index {
    /// The enclave image minus its signature section (also `ImageSha384`).
    pub const IMAGE: usize = 0;
    /// The runtime: cloister version, wasmtime version, semantics-affecting config.
    pub const RUNTIME: usize = 1;
    /// The WASM component bytes.
    pub const APPLICATION: usize = 2;
    /// The parent's role / principal (raw string recipe).
    pub const PARENT_ROLE: usize = 3;
    /// The parent's instance id (raw string recipe).
    pub const INSTANCE_ID: usize = 4;
    /// The image signing certificate (DER).
    pub const SIGNING_CERTIFICATE: usize = 8;
}

/// `SHA384(0^48 || SHA384(bytes))`: one extend of a zero register by the digest
/// of `bytes`. PCR0, PCR1, PCR2 and PCR8 are computed this way.
pub fn measure(bytes: &[u8]) -> Pcr {
    extend_value(&[0u8; PCR_LEN], &Sha384::digest(bytes))
}

/// `SHA384(0^48 || raw)`: the raw string appended, as Nitro computes PCR3 (role
/// ARN) and PCR4 (instance id).
pub fn measure_raw(raw: &str) -> Pcr {
    extend_value(&[0u8; PCR_LEN], raw.as_bytes())
}

/// `SHA384(old || data)`.
pub fn extend_value(old: &Pcr, data: &[u8]) -> Pcr {
    let mut h = Sha384::new();
    h.update(old);
    h.update(data);
    h.finalize().into()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcrError {
    #[error("PCR{0} does not exist: registers are numbered 0 to 31")]
    OutOfRange(usize),
    #[error("PCR{0} is read-only: only PCR16 to PCR31 can be extended or locked at run time")]
    ReadOnly(usize),
    #[error("PCR{0} is locked and can no longer be extended")]
    Locked(usize),
}

impl ErrorCode for PcrError {
    fn code(&self) -> &'static str {
        match self {
            PcrError::OutOfRange(_) => "E-ATTEST-PCR-RANGE",
            PcrError::ReadOnly(_) => "E-ATTEST-PCR-READONLY",
            PcrError::Locked(_) => "E-ATTEST-PCR-LOCKED",
        }
    }
}

/// An enclave's 32 registers and which of them are locked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrBank {
    values: [Pcr; PCR_COUNT],
    locked: [bool; PCR_COUNT],
}

impl PcrBank {
    /// A bank whose build-time registers hold `initial` (absent ones are zero).
    /// PCR0..15 are locked from the start, as on Nitro.
    pub fn new(initial: &BTreeMap<usize, Pcr>) -> Result<Self, PcrError> {
        let mut values = [[0u8; PCR_LEN]; PCR_COUNT];
        for (&i, v) in initial {
            if i >= FIRST_RUNTIME_PCR {
                return Err(if i < PCR_COUNT {
                    PcrError::ReadOnly(i)
                } else {
                    PcrError::OutOfRange(i)
                });
            }
            values[i] = *v;
        }
        let mut locked = [false; PCR_COUNT];
        locked[..FIRST_RUNTIME_PCR].fill(true);
        Ok(PcrBank { values, locked })
    }

    /// A debug-mode bank: every register reads as zeros, as Nitro's debug enclaves do.
    pub fn debug() -> Self {
        Self::new(&BTreeMap::new()).unwrap_or_else(|_| unreachable!("empty map is valid"))
    }

    /// Reads one register and whether it is locked.
    pub fn describe(&self, i: usize) -> Result<(Pcr, bool), PcrError> {
        check_index(i)?;
        Ok((self.values[i], self.locked[i]))
    }

    /// `PCRi = SHA384(PCRi || data)`, for an unlocked runtime register.
    pub fn extend(&mut self, i: usize, data: &[u8]) -> Result<Pcr, PcrError> {
        self.check_runtime(i)?;
        if self.locked[i] {
            return Err(PcrError::Locked(i));
        }
        self.values[i] = extend_value(&self.values[i], data);
        Ok(self.values[i])
    }

    /// Locks one runtime register. Locking a locked register is a no-op.
    pub fn lock(&mut self, i: usize) -> Result<(), PcrError> {
        self.check_runtime(i)?;
        self.locked[i] = true;
        Ok(())
    }

    /// Locks every register in `range`: all of it or, on error, none of it.
    pub fn lock_range(&mut self, range: std::ops::Range<usize>) -> Result<(), PcrError> {
        for i in range.clone() {
            self.check_runtime(i)?;
        }
        self.locked[range].fill(true);
        Ok(())
    }

    /// All registers, as an attestation document lists them.
    pub fn snapshot(&self) -> BTreeMap<usize, Pcr> {
        self.values.iter().copied().enumerate().collect()
    }

    fn check_runtime(&self, i: usize) -> Result<(), PcrError> {
        check_index(i)?;
        if i < FIRST_RUNTIME_PCR {
            return Err(PcrError::ReadOnly(i));
        }
        Ok(())
    }
}

fn check_index(i: usize) -> Result<(), PcrError> {
    if i >= PCR_COUNT {
        return Err(PcrError::OutOfRange(i));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcr3_matches_aws_documented_example() {
        // AWS's Nitro Enclaves documentation computes PCR3 of this role ARN with
        // the raw-string recipe; its value starts with 78fce75d.
        let pcr = measure_raw("arn:aws:iam::123456789012:role/Webserver");
        assert!(
            hex::encode(pcr).starts_with("78fce75d"),
            "{}",
            hex::encode(pcr)
        );
    }

    #[test]
    fn measure_is_extend_of_zero_by_digest() {
        let digest = Sha384::digest(b"component");
        let mut manual = Sha384::new();
        manual.update([0u8; 48]);
        manual.update(digest);
        assert_eq!(measure(b"component"), <Pcr>::from(manual.finalize()));
        assert_ne!(measure(b"component"), measure_raw("component"));
    }

    #[test]
    fn runtime_registers_extend_and_lock() {
        let mut bank = PcrBank::new(&BTreeMap::from([(0, measure(b"img"))])).unwrap();
        assert_eq!(bank.describe(0).unwrap(), (measure(b"img"), true));
        let v = bank.extend(16, b"config").unwrap();
        assert_eq!(v, extend_value(&[0; 48], b"config"));
        assert_eq!(bank.extend(16, b"more").unwrap(), extend_value(&v, b"more"));
        bank.lock(16).unwrap();
        assert_eq!(bank.extend(16, b"x"), Err(PcrError::Locked(16)));
        assert!(bank.describe(16).unwrap().1);
        bank.lock(16).unwrap();
    }

    #[test]
    fn build_time_registers_are_read_only() {
        let mut bank = PcrBank::debug();
        for i in [0, 3, 8, 15] {
            assert_eq!(bank.extend(i, b"x"), Err(PcrError::ReadOnly(i)));
            assert_eq!(bank.lock(i), Err(PcrError::ReadOnly(i)));
        }
        assert_eq!(bank.extend(32, b"x"), Err(PcrError::OutOfRange(32)));
        assert_eq!(bank.describe(99), Err(PcrError::OutOfRange(99)));
        assert_eq!(
            PcrBank::new(&BTreeMap::from([(16, [1; 48])])),
            Err(PcrError::ReadOnly(16))
        );
        assert_eq!(PcrError::Locked(1).code(), "E-ATTEST-PCR-LOCKED");
    }

    #[test]
    fn lock_range_is_all_or_nothing() {
        let mut bank = PcrBank::debug();
        assert_eq!(bank.lock_range(15..20), Err(PcrError::ReadOnly(15)));
        bank.extend(17, b"still open").unwrap();
        assert_eq!(bank.lock_range(30..33), Err(PcrError::OutOfRange(32)));
        bank.extend(30, b"still open").unwrap();
        bank.lock_range(16..32).unwrap();
        for i in 16..32 {
            assert_eq!(bank.extend(i, b"x"), Err(PcrError::Locked(i)));
        }
    }

    #[test]
    fn debug_bank_is_all_zero() {
        let snap = PcrBank::debug().snapshot();
        assert_eq!(snap.len(), 32);
        assert!(snap.values().all(|v| v == &[0u8; 48]));
    }
}
