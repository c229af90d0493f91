//! Confidential inference: a sealed ONNX model scores sealed records.
//!
//! Two owners, two keys. The model owner seals the model (an ONNX classifier)
//! under their KMS key; the data owner seals the records (`record_id,f1,..,fN`
//! CSV) under theirs. Each key policy pins this image's PCR0, so each owner
//! alone decides whether the next run may open their bytes.
//!
//! Request: two parts (`cloister call --part model=M.sealed --part
//! records=R.sealed`). Response: one JSON line
//! `{"model_sha256":..,"scored":..,"malformed":..}`, then the predictions
//! (`record_id,p_<class>,...`) sealed under a fresh data key from the output KMS
//! key.
//!
//! The image's measured configuration (PCR0) says what runs and where results
//! go, never the request:
//! - `model-sha256` (required): the SHA-256 of the only model this image runs.
//!   A model with another hash is refused even when it is sealed under the
//!   right key, so PCR0 tells a client which model scores their records.
//! - `model-context` and `records-context` (`k=v,k=v`): pairs each input's
//!   encryption context must hold, checked before its key is asked for, so
//!   that the parent cannot pass one owner's file (or earlier predictions) as
//!   the other part. Owners seal with them, e.g. `purpose=model`.
//! - `output-key-id` (required) and `output-context` (`k=v,k=v`): the KMS key
//!   and encryption context the predictions are sealed under.
//! - `class-names` (optional, `a,b`): the output's column names (default the
//!   class indices).
//!
//! Single records: when the image's measured configuration has
//! `clear-records=allow` and the `records` part is not a sealed file, the part
//! is CSV rows in the clear (at most 10,000 besides a header) and the response
//! their predictions in the clear (the header, then `record_id,p_<class>,...`),
//! nothing sealed. Send them over the attested channel so that only the client
//! and this enclave read them; the model still comes sealed by its owner and
//! pinned by its hash. Whoever can call the enclave — the parent included —
//! can then query the model: the model owner decides that by approving (in
//! their key policy) an image whose PCR0 includes `clear-records=allow`.

use cloister_guest::{Error, Handler, error, sealed};
use inference_engine::Model;
use sha2::{Digest, Sha256};

struct Inference;

/// A measured encryption context that the image must set.
fn required_context(key: &str) -> Result<Vec<(String, String)>, Error> {
    cloister_guest::required_config(key)?;
    cloister_guest::config_context(key)
}

/// The model, opened with the model owner's key and checked against the image.
fn load_model(sealed_model: &[u8]) -> Result<(Model, String), Error> {
    let pinned = cloister_guest::required_config("model-sha256")?.to_ascii_lowercase();
    let onnx = cloister_guest::unseal(sealed_model, &required_context("model-context")?)?;
    let actual = hex::encode(Sha256::digest(&onnx));
    if actual != pinned {
        // Not the hash itself: it would tell the parent the SHA-256 of whatever
        // the enclave could open.
        return Err(error(
            "E-INFERENCE-MODEL-MISMATCH",
            format!(
                "the model is not the one this image runs (its measured model-sha256 is {pinned})"
            ),
        ));
    }
    let model = Model::load(&onnx).map_err(|e| error("E-INFERENCE-MODEL", e.to_string()))?;
    Ok((model, actual))
}

/// Rows one single-record request may hold.
const MAX_ROWS: usize = 10_000;

/// Predictions for rows sent in the clear (through the attested channel).
fn predict_rows(model: &Model, header: &str, records: &[u8]) -> Result<Vec<u8>, Error> {
    let refuse = |m: String| error("E-INFERENCE-RECORD", m);
    let model_error = |e: inference_engine::ModelError| error("E-INFERENCE-MODEL", e.to_string());
    let mut scorer = model.scorer().map_err(model_error)?;
    let mut out = String::from(header);
    for (n, line) in records.split_inclusive(|b| *b == b'\n').enumerate() {
        if n > MAX_ROWS {
            return Err(refuse(format!(
                "more than {MAX_ROWS} rows: seal a batch instead"
            )));
        }
        scorer.push(line, &mut out).map_err(model_error)?;
    }
    let counts = scorer.finish(&mut out).map_err(model_error)?;
    if counts.malformed > 0 || counts.scored == 0 {
        return Err(refuse(format!(
            "{} of the rows are not records of this model ({} features: record_id,f1,..,f{})",
            counts.malformed,
            model.features(),
            model.features()
        )));
    }
    Ok(out.into_bytes())
}

impl Handler for Inference {
    fn handle(request: Vec<u8>) -> Result<Vec<u8>, Error> {
        let output_key = cloister_guest::required_config("output-key-id")?;
        let output_context = cloister_guest::config_context("output-context")?;
        let records_context = required_context("records-context")?;
        let parts = cloister_guest::request_parts(&request)?;
        let records = parts.required("records")?;
        let clear = !records.starts_with(sealed::MAGIC);
        // Refused before the model is opened: no key is asked for.
        if clear && cloister_guest::config::get("clear-records").as_deref() != Some("allow") {
            return Err(error(
                "E-INFERENCE-RECORD",
                "the records part is not a sealed file, and this image does not take records in the clear (its measured configuration lacks clear-records=allow)",
            ));
        }
        let (model, model_sha256) = load_model(parts.required("model")?)?;
        let class_names: Vec<String> = match cloister_guest::config::get("class-names") {
            Some(names) => names.split(',').map(|n| n.trim().to_owned()).collect(),
            None => (0..model.classes()).map(|c| c.to_string()).collect(),
        };
        let header = model
            .header(&class_names)
            .map_err(|e| error("E-INFERENCE-MODEL", format!("class-names: {e}")))?;

        if clear {
            return predict_rows(&model, &header, records);
        }
        let (records_key, records_header, body) =
            cloister_guest::open_sealed(records, &records_context)?;
        let mut reader = sealed::Reader::new(records_header, body, &records_key)?;
        let model_error =
            |e: inference_engine::ModelError| error("E-INFERENCE-MODEL", e.to_string());
        let mut scorer = model.scorer().map_err(model_error)?;
        let mut counts = inference_engine::Counts::default();
        let sealed_predictions =
            cloister_guest::seal_with_new_key(&output_key, output_context, |writer| {
                writer.write_record(header.as_bytes())?;
                let mut rows = String::new();
                let mut write_rows = |rows: &mut String| {
                    for row in rows.as_bytes().split_inclusive(|b| *b == b'\n') {
                        writer.write_record(row)?;
                    }
                    rows.clear();
                    Ok::<_, Error>(())
                };
                // Records never straddle chunks (the sealed format's rule).
                while let Some(chunk) = reader.next_chunk()? {
                    for line in chunk.split_inclusive(|b| *b == b'\n') {
                        scorer.push(line, &mut rows).map_err(model_error)?;
                        write_rows(&mut rows)?;
                    }
                }
                counts = scorer.finish(&mut rows).map_err(model_error)?;
                write_rows(&mut rows)
            })?;
        let mut response = format!(
            "{{\"model_sha256\":\"{model_sha256}\",\"scored\":{},\"malformed\":{}}}\n",
            counts.scored, counts.malformed
        )
        .into_bytes();
        response.extend_from_slice(&sealed_predictions);
        Ok(response)
    }
}

cloister_guest::export_workload!(Inference);
