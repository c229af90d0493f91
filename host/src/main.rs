//! `cloister`: the command-line interface, in the spirit of nitro-cli, with JSON
//! output on stdout and errors with stable codes on stderr.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod errors;

#[derive(Parser)]
#[command(
    name = "cloister",
    version,
    about = "Attested enclaves for data in use: an AWS Nitro Enclaves + KMS analog for any Linux machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The platform owner's tools: the root CA and this host's emulated NSM.
    #[command(subcommand)]
    Platform(commands::platform::PlatformCommand),
    /// Verify attestation documents (emulated or real AWS Nitro).
    #[command(subcommand)]
    Attestation(commands::attestation::AttestationCommand),
    /// The key broker (KMS analog): serve it, administer it, call it.
    #[command(subcommand)]
    Kms(commands::kms::KmsCommand),
    /// Compute a PCR value the way the measurements are made (as `nitro-cli pcr`).
    Pcr(commands::pcr::PcrArgs),
    /// Explain a stable error code such as E-ATTEST-SIGNATURE.
    Explain {
        /// The code, e.g. E-ATTEST-SIGNATURE.
        code: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Platform(cmd) => commands::platform::run(cmd),
        Command::Attestation(cmd) => commands::attestation::run(cmd),
        Command::Kms(cmd) => commands::kms::run(cmd),
        Command::Pcr(args) => commands::pcr::run(args),
        Command::Explain { code } => commands::explain::run(&code),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            errors::report(&err);
            ExitCode::FAILURE
        }
    }
}
