//! The PHI scoring workload.
//!
//! Request: the sealed patient CSV. Response: one JSON line of aggregates (what
//! the key policy lets leave in the clear), then the per-patient scores sealed
//! under a fresh data key from the output KMS key:
//! `{"scored":..,"malformed":..,"mean_risk":..,"bands":{..}}\n<sealed bytes>`.
//!
//! Where the scores go is the image's measured configuration, never the
//! request's (the parent relays requests and must not choose it):
//! `output-key-id` (required) and `output-context` (`k=v,k=v`).
//!
//! The input's data key comes from an attested KMS Decrypt and the output's from
//! an attested GenerateDataKey; both stay in the runtime's keyring for this call.

use cloister_guest::sealed::{self, DEFAULT_CHUNK_SIZE};
use cloister_guest::{DataKey, Error, Handler, config, nsm};
use phi_model::{Summary, score_line};

struct Scorer;

/// `k=v,k=v` as an encryption context.
fn context(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

impl Handler for Scorer {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>, Error> {
        let output_key = cloister_guest::required_config("output-key-id")?;
        let output_context = context(&config::get("output-context").unwrap_or_default());
        let (input_key, header, rest) = cloister_guest::open_sealed(&request)?;
        let mut reader = sealed::Reader::new(header, rest, &input_key)?;

        let (output_key, encrypted, key_arn) = DataKey::generate(&output_key, &output_context)?;
        let mut prefix = [0u8; 7];
        prefix.copy_from_slice(&nsm::get_random(7)?);
        let mut summary = Summary::default();
        let mut writer = sealed::Writer::new(
            Vec::new(),
            &output_key,
            &key_arn,
            encrypted,
            output_context,
            DEFAULT_CHUNK_SIZE,
            prefix,
        )?;
        writer.write_record(b"patient_id,risk_10y\n")?;
        let mut failure: Option<sealed::SealedError> = None;
        reader.for_each_line(|line| {
            let Ok(text) = std::str::from_utf8(line) else {
                summary.malformed += 1;
                return Ok(());
            };
            if let Some(row) = score_line(text, &mut summary)
                && let Err(e) = writer.write_record(row.as_bytes())
            {
                failure = Some(e);
            }
            Ok(())
        })?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        let sealed_output = writer.finish()?;
        let mut response = summary.to_json().into_bytes();
        response.push(b'\n');
        response.extend_from_slice(&sealed_output);
        Ok(response)
    }
}

cloister_guest::export_workload!(Scorer);
