//! `cloister pcr`: the PCR value of an input, as nitro-cli's `pcr` command.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use cloister_attestation::nsm::read_pem_certificates;
use cloister_attestation::pcr;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true)))]
pub struct PcrArgs {
    /// A file: PCR = SHA384(0^48 || SHA384(file)), the recipe of PCR0/1/2.
    #[arg(long, group = "source")]
    input: Option<PathBuf>,
    /// A PEM signing certificate: PCR8 = SHA384(0^48 || SHA384(DER)).
    #[arg(long, group = "source")]
    signing_certificate: Option<PathBuf>,
    /// A string such as a role ARN: SHA384(0^48 || string), the recipe of PCR3/PCR4.
    #[arg(long, group = "source")]
    string: Option<String>,
}

pub fn run(args: PcrArgs) -> anyhow::Result<()> {
    let value = if let Some(path) = &args.input {
        pcr::measure(&super::read_file(path)?)
    } else if let Some(path) = &args.signing_certificate {
        pcr::measure(&read_pem_certificates(path)?[0])
    } else {
        pcr::measure_raw(args.string.as_deref().unwrap_or_default())
    };
    super::print_json(&json!({ "HashAlgorithm": "Sha384", "PCR": hex::encode(value) }))
}
