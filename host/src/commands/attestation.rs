//! `cloister attestation verify`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Subcommand;
use serde_json::{Map, Value, json};

use cloister_attestation::nsm::read_pem_certificates;
use cloister_attestation::verify::{
    TrustAnchor, VerifyOptions, rfc3339, rfc3339_ms, unix_ms, verify,
};

use crate::errors::UsageError;

#[derive(Subcommand)]
pub enum AttestationCommand {
    /// Verify an attestation document: COSE signature, certificate chain to a
    /// trusted root, freshness and expected PCRs. Prints a JSON summary; exits
    /// non-zero with the reason when any check fails.
    Verify {
        /// The COSE_Sign1 document (tagged or untagged).
        #[arg(long)]
        doc: PathBuf,
        /// Trust this root (PEM), e.g. a platform's root.pem. Repeatable.
        #[arg(long = "root", value_name = "PEM")]
        roots: Vec<PathBuf>,
        /// Trust the AWS Nitro Enclaves root (built in, pinned by fingerprint).
        #[arg(long)]
        aws_nitro_root: bool,
        /// Verify as of this time: RFC 3339 (2024-07-31T20:18:27Z) or Unix milliseconds.
        #[arg(long)]
        at: Option<String>,
        /// Refuse documents older than this many seconds.
        #[arg(long)]
        max_age: Option<u64>,
        /// Require a PCR value, N=HEX. Repeatable.
        #[arg(long = "expect-pcr", value_name = "N=HEX")]
        expect_pcrs: Vec<String>,
        /// Require the document to answer this challenge (its nonce, hex).
        #[arg(long)]
        expect_nonce: Option<String>,
    },
}

pub fn run(cmd: AttestationCommand) -> anyhow::Result<()> {
    let AttestationCommand::Verify {
        doc,
        roots,
        aws_nitro_root,
        at,
        max_age,
        expect_pcrs,
        expect_nonce,
    } = cmd;
    let mut opts = VerifyOptions {
        expected_nonce: expect_nonce
            .map(|h| super::parse_hex_arg("--expect-nonce", &h))
            .transpose()?,
        at: at.as_deref().map(parse_time).transpose()?,
        max_age: max_age.map(Duration::from_secs),
        ..Default::default()
    };
    for path in &roots {
        for der in read_pem_certificates(path)? {
            opts.anchors.push(
                TrustAnchor::from_der(path.display().to_string(), der)
                    .with_context(|| format!("--root {}", path.display()))?,
            );
        }
    }
    if aws_nitro_root {
        opts.anchors.push(TrustAnchor::aws_nitro());
    }
    for arg in &expect_pcrs {
        let (i, v) = super::parse_pcr_arg(arg)?;
        opts.expected_pcrs.insert(i, v);
    }
    let bytes = super::read_file(&doc)?;
    let v = verify(&bytes, &opts).with_context(|| format!("{} does not verify", doc.display()))?;

    let pcrs: Map<String, Value> = v
        .pcrs
        .iter()
        .map(|(i, value)| (format!("PCR{i}"), Value::String(hex::encode(value))))
        .collect();
    let hex_opt = |b: &Option<Vec<u8>>| {
        b.as_ref()
            .map_or(Value::Null, |b| Value::String(hex::encode(b)))
    };
    super::print_json(&json!({
        "Verified": true,
        "Algorithm": v.algorithm.name(),
        "ModuleId": v.module_id,
        "Digest": v.digest,
        "Timestamp": v.timestamp_ms,
        "TimestampUtc": rfc3339_ms(v.timestamp_ms),
        "VerifiedAt": rfc3339(opts.at.unwrap_or_else(SystemTime::now)),
        "Debug": v.debug,
        "PCRs": pcrs,
        "PublicKey": hex_opt(&v.public_key),
        "UserData": hex_opt(&v.user_data),
        "Nonce": hex_opt(&v.nonce),
        "TrustAnchor": v.trust_anchor,
        "Chain": v.chain_subjects,
    }))
}

/// RFC 3339, or an integer count of Unix milliseconds (as documents carry).
fn parse_time(s: &str) -> Result<SystemTime, UsageError> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let ms: u64 = s
            .parse()
            .map_err(|_| UsageError(format!("--at {s}: too large")))?;
        return Ok(unix_ms(ms));
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| {
            UsageError(format!(
                "--at {s:?}: not RFC 3339 or Unix milliseconds ({e})"
            ))
        })
}
