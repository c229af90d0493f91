//! `cloister platform ...`: the platform owner's tools.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use serde_json::json;

use cloister_attestation::nsm::{AttestationRequest, Nsm, PlatformDir, read_pem_certificates};
use cloister_attestation::pcr::{self, PcrBank};
use cloister_attestation::verify::{ParsedCertificate, TrustAnchor, rfc3339};

use crate::errors::UsageError;

#[derive(Subcommand)]
pub enum PlatformCommand {
    /// Create a platform root CA and this host's NSM certificate in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The platform's name, written into the root's subject (OU).
        #[arg(long, default_value = "cloister-local")]
        name: String,
        /// Lifetime of the NSM certificate.
        #[arg(long, default_value_t = 24)]
        nsm_validity_hours: u64,
    },
    /// Issue a fresh NSM key and certificate under the existing root.
    Renew {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 24)]
        nsm_validity_hours: u64,
    },
    /// Emit an emulated attestation document outside any enclave (tests and demos).
    Attest {
        #[arg(long)]
        dir: PathBuf,
        /// A PCR value, N=HEX (48 bytes); repeat for several. Absent PCRs are zero.
        #[arg(long = "pcr", value_name = "N=HEX")]
        pcrs: Vec<String>,
        /// Take PCR0/1/2 (and PCR8 if signed) from an enclave image, as an enclave
        /// of it would report them; --pcr may add others (PCR3, PCR4, ...).
        #[arg(long, conflicts_with = "debug")]
        image: Option<PathBuf>,
        /// A file whose bytes become `public_key` (at most 1024).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// `nonce` as hex (at most 1024 bytes).
        #[arg(long)]
        nonce: Option<String>,
        /// `user_data` as hex (at most 1024 bytes).
        #[arg(long)]
        user_data: Option<String>,
        /// Attest as a debug-mode enclave: every PCR reads as zeros.
        #[arg(long, conflicts_with = "pcrs")]
        debug: bool,
        /// The document's module_id.
        #[arg(long, default_value = "i-cloister-platform-attest-enc0000000000000000")]
        module_id: String,
        /// Where to write the COSE_Sign1 document.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: PlatformCommand) -> anyhow::Result<()> {
    match cmd {
        PlatformCommand::Init {
            dir,
            name,
            nsm_validity_hours,
        } => {
            let platform = PlatformDir::new(&dir);
            platform.init(&name, hours(nsm_validity_hours)?)?;
            describe(&platform)
        }
        PlatformCommand::Renew {
            dir,
            nsm_validity_hours,
        } => {
            let platform = PlatformDir::new(&dir);
            platform.renew(hours(nsm_validity_hours)?)?;
            describe(&platform)
        }
        PlatformCommand::Attest {
            dir,
            pcrs,
            image,
            public_key,
            nonce,
            user_data,
            debug,
            module_id,
            out,
        } => {
            let pcrs = if debug {
                PcrBank::debug().snapshot()
            } else {
                let mut values: BTreeMap<usize, pcr::Pcr> = match &image {
                    Some(path) => {
                        let image = cloister_image::Image::parse(&super::read_file(path)?)?;
                        image.verify_signature()?;
                        image.measurements(super::enclave::runtime_pcr1(), None, None)
                    }
                    None => BTreeMap::new(),
                };
                for arg in &pcrs {
                    let (i, v) = super::parse_pcr_arg(arg)?;
                    let v: pcr::Pcr = v.try_into().map_err(|_| UsageError("PCR length".into()))?;
                    if values.insert(i, v).is_some() {
                        return Err(UsageError(format!(
                            "PCR{i} is given twice (by --pcr twice, or by --image and --pcr)"
                        ))
                        .into());
                    }
                }
                (0..pcr::PCR_COUNT)
                    .map(|i| (i, values.get(&i).copied().unwrap_or([0; pcr::PCR_LEN])))
                    .collect()
            };
            let request = AttestationRequest {
                module_id,
                pcrs,
                public_key: public_key.as_deref().map(super::read_file).transpose()?,
                user_data: user_data
                    .map(|h| super::parse_hex_arg("--user-data", &h))
                    .transpose()?,
                nonce: nonce
                    .map(|h| super::parse_hex_arg("--nonce", &h))
                    .transpose()?,
            };
            let nsm = Nsm::load(&PlatformDir::new(&dir))?;
            let doc = nsm.attest(&request, SystemTime::now())?;
            super::write_output(&out, &doc)?;
            eprintln!(
                "note: this document was made by the platform owner's tool, outside any enclave; \
                 it attests only the values given on the command line"
            );
            super::print_json(&json!({
                "Document": out.display().to_string(),
                "Bytes": doc.len(),
                "Debug": debug,
            }))
        }
    }
}

fn hours(h: u64) -> Result<Duration, UsageError> {
    if h == 0 || h > 24 * 366 {
        return Err(UsageError(format!(
            "--nsm-validity-hours {h}: choose 1 to 8784 (NSM certificates are meant to be short-lived)"
        )));
    }
    Ok(Duration::from_secs(h * 3600))
}

fn describe(platform: &PlatformDir) -> anyhow::Result<()> {
    let root = read_pem_certificates(&platform.root_cert())?.remove(0);
    let nsm = read_pem_certificates(&platform.nsm_cert())?.remove(0);
    let anchor = TrustAnchor::from_der("platform root", root.clone())?;
    let root = ParsedCertificate::parse("root.pem", &root)?;
    let nsm = ParsedCertificate::parse("nsm.pem", &nsm)?;
    super::print_json(&json!({
        "PlatformDir": platform.dir.display().to_string(),
        "RootCertificate": platform.root_cert().display().to_string(),
        "RootKey": platform.root_key().display().to_string(),
        "RootSubject": root.subject,
        "RootFingerprintSha256": anchor.fingerprint_sha256(),
        "NsmCertificate": platform.nsm_cert().display().to_string(),
        "NsmKey": platform.nsm_key().display().to_string(),
        "NsmSubject": nsm.subject,
        "NsmNotAfter": rfc3339(nsm.not_after),
    }))
}
