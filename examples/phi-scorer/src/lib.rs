//! The PHI scoring workload.
//!
//! Request: one JSON line of parameters, then the sealed patient CSV:
//! `{"output_key_id":"alias/phi-results","output_context":{"k":"v"}}\n<sealed bytes>`.
//! Response: one JSON line of aggregates (what the key policy lets leave in the
//! clear), then the per-patient scores sealed under a fresh data key from the
//! output KMS key: `{"scored":..,"malformed":..,"mean_risk":..,"bands":{..}}\n<sealed bytes>`.
//!
//! The input's data key comes from an attested KMS Decrypt and the output's from an
//! attested GenerateDataKey; both stay in the runtime's keyring.

use cloister_guest::sealed::{self, DEFAULT_CHUNK_SIZE};
use cloister_guest::{DataKey, Error, Handler, error, nsm};
use phi_model::{Summary, score_line};

struct Scorer;

/// Pulls `"name":"value"` and `"name":{...}` out of the small parameter line
/// without a JSON dependency: keys and values are plain strings.
fn string_field(json: &str, name: &str) -> Option<String> {
    let at = json.find(&format!("\"{name}\""))? + name.len() + 2;
    let rest = json[at..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

fn object_field(json: &str, name: &str) -> Vec<(String, String)> {
    let Some(at) = json.find(&format!("\"{name}\"")) else {
        return Vec::new();
    };
    let Some(open) = json[at..].find('{') else {
        return Vec::new();
    };
    let Some(close) = json[at + open..].find('}') else {
        return Vec::new();
    };
    json[at + open + 1..at + open + close]
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once(':')?;
            Some((
                k.trim().trim_matches('"').to_owned(),
                v.trim().trim_matches('"').to_owned(),
            ))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

impl Handler for Scorer {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>, Error> {
        let newline = request.iter().position(|b| *b == b'\n').ok_or_else(|| {
            error(
                "E-PHI-REQUEST",
                "the request starts with a JSON parameter line",
            )
        })?;
        let params = std::str::from_utf8(&request[..newline])
            .map_err(|_| error("E-PHI-REQUEST", "parameters are not UTF-8"))?;
        let output_key = string_field(params, "output_key_id")
            .ok_or_else(|| error("E-PHI-REQUEST", "output_key_id is missing"))?;
        let output_context = object_field(params, "output_context");

        let (input_key, header, rest) = cloister_guest::open_sealed(&request[newline + 1..])?;
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
