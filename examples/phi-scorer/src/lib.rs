//! The PHI scoring workload.
//!
//! Request: the sealed patient CSV. Response: one JSON line of aggregates (what
//! the key policy lets leave in the clear), then the per-patient scores sealed
//! under a fresh data key from the output KMS key:
//! `{"scored":..,"malformed":..,"mean_risk":..,"bands":{..}}\n<sealed bytes>`.
//!
//! Where the scores go is the image's measured configuration, never the
//! request's (the parent relays requests and must not choose it):
//! `output-key-id` (required) and `output-context` (`k=v,k=v`). With
//! `input-context` (`k=v,k=v`) set, an input sealed without those pairs in its
//! encryption context is refused before any key is asked for.
//!
//! The input's data key comes from an attested KMS Decrypt and the output's from
//! an attested GenerateDataKey; both stay in the runtime's keyring for this call.

use cloister_guest::sealed;
use cloister_guest::{Error, Handler};
use phi_model::{Summary, score_sealed};

struct Scorer;

impl Handler for Scorer {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>, Error> {
        let output_key = cloister_guest::required_config("output-key-id")?;
        let output_context = cloister_guest::config_context("output-context")?;
        let input_context = cloister_guest::config_context("input-context")?;
        let (input_key, header, rest) = cloister_guest::open_sealed(&request, &input_context)?;
        let mut reader = sealed::Reader::new(header, rest, &input_key)?;
        let mut summary = Summary::default();
        let sealed_output =
            cloister_guest::seal_with_new_key(&output_key, output_context, |writer| {
                Ok(score_sealed(&mut reader, writer, &mut summary)?)
            })?;
        let mut response = summary.to_json().into_bytes();
        response.push(b'\n');
        response.extend_from_slice(&sealed_output);
        Ok(response)
    }
}

cloister_guest::export_workload!(Scorer);
