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
    /// Seal a file of records (CSV rows, JSON lines) under a fresh data key from the broker.
    Encrypt(commands::kms::EncryptArgs),
    /// Open a sealed file as its data owner (the broker must allow you kms:Decrypt).
    Decrypt(commands::kms::DecryptArgs),
    /// Compute a PCR value the way the measurements are made (as `nitro-cli pcr`).
    Pcr(commands::pcr::PcrArgs),
    /// Build an enclave image from a WebAssembly component; prints its measurements.
    BuildEnclave(commands::enclave::BuildArgs),
    /// Describe an enclave image (nitro-cli's describe-eif): measurements, signature, manifest.
    #[command(alias = "describe-eif")]
    DescribeImage {
        #[arg(long, alias = "eif-path")]
        image: std::path::PathBuf,
    },
    /// Start an enclave: one hardened runtime process per enclave.
    RunEnclave(commands::enclave::RunArgs),
    /// List the running enclaves.
    DescribeEnclaves,
    /// Stop an enclave, or all of them.
    TerminateEnclave(commands::enclave::TerminateArgs),
    /// Print a debug-mode enclave's console.
    Console {
        #[command(flatten)]
        which: commands::enclave::Which,
    },
    /// Send one request to an enclave's handler.
    Call(commands::enclave::CallArgs),
    /// Relay an enclave's connections to the key broker (the vsock-proxy analog).
    Proxy(commands::enclave::ProxyArgs),
    /// Serve an enclave's attested channel over HTTP (Oblivious HTTP relay):
    /// key configuration, attestation document, encapsulated requests.
    Relay(commands::relay::RelayArgs),
    /// The supervisor daemon (the hypervisor + NSM analog): holds the NSM key and
    /// the code cache, launches enclave runtimes for the parent's commands.
    Supervisor(commands::enclave::SupervisorArgs),
    /// Make an Ed25519 key pair for a principal (PKCS#8 private key 0600, SPKI public key).
    Keygen {
        #[arg(long)]
        private_key: std::path::PathBuf,
        #[arg(long)]
        public_key: std::path::PathBuf,
    },
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
        Command::Encrypt(args) => commands::kms::encrypt(args),
        Command::Decrypt(args) => commands::kms::decrypt(args),
        Command::Explain { code } => commands::explain::run(&code),
        Command::Keygen {
            private_key,
            public_key,
        } => commands::keygen(&private_key, &public_key),
        Command::BuildEnclave(args) => commands::enclave::build(args),
        Command::DescribeImage { image } => commands::enclave::describe_image(&image),
        Command::RunEnclave(args) => commands::enclave::run(args),
        Command::DescribeEnclaves => commands::enclave::describe_enclaves(),
        Command::TerminateEnclave(args) => commands::enclave::terminate(args),
        Command::Console { which } => commands::enclave::console(which),
        Command::Call(args) => commands::enclave::call(args),
        Command::Proxy(args) => commands::enclave::proxy(args),
        Command::Relay(args) => commands::relay::relay(args),
        Command::Supervisor(args) => commands::enclave::supervisor_daemon(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            errors::report(&err);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every command and subcommand says in `--help` what it does.
    #[test]
    fn every_command_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub
                    .get_about()
                    .is_none_or(|a| a.to_string().trim().is_empty())
                {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(
            &<super::Cli as clap::CommandFactory>::command(),
            "cloister",
            &mut missing,
        );
        assert!(
            missing.is_empty(),
            "commands without help text: {missing:#?}"
        );
    }
}
