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
//!
//! Single records: a request that is not a sealed file is CSV rows in the clear
//! (`patient_id,sex,age,...`, the header optional), and the response is their
//! scores in the clear (`patient_id,risk_10y` rows). Send them over the attested
//! channel (`cloister call --attested`, or the HTTP relay): then only the client
//! and this enclave read either. A malformed row is refused with its reason
//! (E-PHI-RECORD), at most 10,000 rows per request.

use cloister_guest::sealed;
use cloister_guest::{Error, Handler, error};
use phi_model::{OUTPUT_HEADER, Summary, score_sealed};

/// Rows one single-record request may hold.
const MAX_ROWS: usize = 10_000;

/// Scores rows sent in the clear (through the attested channel).
fn score_rows(request: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = OUTPUT_HEADER.to_vec();
    let mut summary = Summary::default();
    for (n, line) in request.split_inclusive(|b| *b == b'\n').enumerate() {
        if n > MAX_ROWS {
            return Err(error(
                "E-PHI-RECORD",
                format!("more than {MAX_ROWS} rows: seal a batch instead"),
            ));
        }
        let before = summary.malformed;
        phi_model::score_record(line, &mut summary, &mut out);
        if summary.malformed > before {
            let content = cloister_guest::sealed::records::line_content(line);
            let reason = phi_model::parse_row(content)
                .err()
                .map(|e| e.0)
                .unwrap_or_default();
            return Err(error(
                "E-PHI-RECORD",
                format!("row {} is not a patient record: {reason}", n + 1),
            ));
        }
    }
    if summary.scored == 0 {
        return Err(error(
            "E-PHI-RECORD",
            "no patient record: send CSV rows (patient_id,sex,age,total_cholesterol,hdl,systolic_bp,bp_treated,smoker,diabetes) or a sealed file",
        ));
    }
    Ok(out)
}

struct Scorer;

impl Handler for Scorer {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>, Error> {
        if !request.starts_with(sealed::MAGIC) {
            return score_rows(&request);
        }
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
