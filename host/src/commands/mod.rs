//! One module per top-level command.

pub mod attestation;
pub mod enclave;
pub mod explain;
pub mod kms;
pub mod pcr;
pub mod platform;
pub mod relay;

use std::path::Path;

use crate::errors::UsageError;

/// Prints a value as pretty JSON on stdout, as nitro-cli does.
pub fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(value)?;
    match writeln!(std::io::stdout().lock(), "{text}") {
        // A reader that went away (`| head`) is not an error of ours.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Parses `N=HEX` (a PCR index and its value).
pub fn parse_pcr_arg(arg: &str) -> Result<(usize, Vec<u8>), UsageError> {
    let bad = |why: &str| {
        UsageError(format!(
            "--pcr/--expect-pcr {arg:?}: {why} (write N=HEX, e.g. 0=a6cd...)"
        ))
    };
    let (index, value) = arg.split_once('=').ok_or_else(|| bad("no `=`"))?;
    let index: usize = index
        .trim_start_matches("PCR")
        .parse()
        .ok()
        .filter(|i| *i < cloister_attestation::pcr::PCR_COUNT)
        .ok_or_else(|| bad("the index is not 0 to 31"))?;
    let value = hex::decode(value).map_err(|_| bad("the value is not hex"))?;
    if value.len() != cloister_attestation::pcr::PCR_LEN {
        return Err(bad(&format!(
            "the value is {} bytes, a SHA-384 PCR is 48",
            value.len()
        )));
    }
    Ok((index, value))
}

/// Parses a hex option value.
pub fn parse_hex_arg(name: &str, arg: &str) -> Result<Vec<u8>, UsageError> {
    hex::decode(arg).map_err(|_| UsageError(format!("{name} {arg:?} is not hex")))
}

/// Reads a whole input file with its name in the error.
pub fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| {
        crate::errors::InputError {
            path: path.display().to_string(),
            source,
        }
        .into()
    })
}

/// Writes an output file atomically: either the whole file appears or nothing.
pub fn write_output(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    cloister_attestation::keyfile::write_public(path, bytes, true)?;
    Ok(())
}

/// `cloister keygen`: an Ed25519 key pair, as `openssl genpkey -algorithm ed25519` would make.
pub fn keygen(private_key: &Path, public_key: &Path) -> anyhow::Result<()> {
    use cloister_attestation::keyfile;
    let key = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
    keyfile::write_signing_key(private_key, &key, false)?;
    keyfile::write_public(
        public_key,
        keyfile::verifying_key_pem(&key.verifying_key()).as_bytes(),
        false,
    )?;
    print_json(&serde_json::json!({
        "PrivateKey": private_key.display().to_string(),
        "PublicKey": public_key.display().to_string(),
    }))
}
