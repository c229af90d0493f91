//! Scores CSV records with an ONNX classifier, using tract (pure Rust, builds
//! for wasm32-wasip2). The inference enclave (`examples/inference`) and its
//! native baseline (`inference-native`) run this same code, so the benchmark
//! compares like with like.
//!
//! Records: `record_id,f1,...,fN` (one header line allowed first), N being the
//! model's input width. Output rows: `record_id,p_1,...,p_K` with the model's K
//! class probabilities, each printed as the shortest decimal that reads back as
//! the same `f32`.
//!
//! The model must have one input (float32 `[batch, N]`) and an output named
//! `probabilities` (float32 `[batch, K]`), as skl2onnx writes classifiers with
//! `zipmap=False`; any other output (such as `label`) is pruned before the
//! model is optimised.

use std::fmt::Write as _;
use std::sync::Arc;

use cloister_sealed::records;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid as _;
use tract_onnx::tract_hir::internal::DimLike as _;

/// The output the models must name.
pub const OUTPUT: &str = "probabilities";
/// Records scored per model run (the last run scores what is left).
pub const BATCH: usize = 1024;

/// Why a model could not be used.
#[derive(Debug)]
pub struct ModelError(pub String);

impl std::fmt::Display for ModelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ModelError {}

fn model_error(what: &str) -> impl Fn(TractError) -> ModelError + '_ {
    move |e| ModelError(format!("{what}: {e:#}"))
}

/// An ONNX classifier, optimised for batches of any number of records.
pub struct Model {
    plan: Arc<TypedRunnableModel>,
    features: usize,
    classes: usize,
}

impl Model {
    /// Parses, checks and optimises an ONNX model.
    pub fn load(onnx: &[u8]) -> Result<Model, ModelError> {
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .map_err(model_error("not a model tract can read"))?;
        if model.inputs.len() != 1 {
            return Err(ModelError(format!(
                "the model has {} inputs; one (float32 [batch, features]) is expected",
                model.inputs.len()
            )));
        }
        model.select_outputs_by_name([OUTPUT]).map_err(model_error(
            "the model has no output named \"probabilities\"",
        ))?;
        let features = model
            .input_fact(0)
            .ok()
            .and_then(|f| f.shape.dim(1))
            .and_then(|d| d.concretize())
            .and_then(|d| d.to_usize().ok())
            .filter(|n| (1..=4096).contains(n))
            .ok_or_else(|| {
                ModelError("the model's input is not float32 [batch, features]".into())
            })?;
        let rows = model.symbols.sym("N");
        model
            .set_input_fact(0, f32::fact([TDim::from(rows), features.into()]).into())
            .map_err(model_error("setting the input shape"))?;
        let model = model
            .into_optimized()
            .map_err(model_error("the model does not type-check"))?;
        let output = model
            .output_fact(0)
            .map_err(model_error("the model's output"))?;
        let classes = match output.shape.dims() {
            [_, classes] if output.datum_type == f32::datum_type() => classes.to_usize().ok(),
            _ => None,
        };
        let classes = match classes {
            Some(classes) if classes > 0 => classes,
            _ => {
                return Err(ModelError(format!(
                    "the output \"probabilities\" is {output:?}, not float32 [batch, classes]"
                )));
            }
        };
        let plan = model
            .into_runnable()
            .map_err(model_error("planning the model"))?;
        Ok(Model {
            plan,
            features,
            classes,
        })
    }

    /// Input width: the number of features a record has.
    pub fn features(&self) -> usize {
        self.features
    }

    /// Output width: the number of class probabilities per record.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The output's CSV header for these class names.
    pub fn header(&self, class_names: &[String]) -> Result<String, ModelError> {
        if class_names.len() != self.classes {
            return Err(ModelError(format!(
                "{} class names for a model with {} classes",
                class_names.len(),
                self.classes
            )));
        }
        let mut header = String::from("record_id");
        for name in class_names {
            header.push_str(",p_");
            header.push_str(name);
        }
        header.push('\n');
        Ok(header)
    }

    /// A scorer that feeds records through this model in batches.
    pub fn scorer(&self) -> Result<Scorer<'_>, ModelError> {
        Ok(Scorer {
            model: self,
            state: self
                .plan
                .spawn()
                .map_err(model_error("starting the model"))?,
            ids: Vec::with_capacity(BATCH),
            values: Vec::with_capacity(BATCH * self.features),
            scored: 0,
            malformed: 0,
            lines: 0,
        })
    }
}

/// Records seen by a [`Scorer`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub scored: u64,
    pub malformed: u64,
}

/// Collects records into batches and scores each full batch.
pub struct Scorer<'m> {
    model: &'m Model,
    state: TypedSimpleState,
    ids: Vec<String>,
    values: Vec<f32>,
    scored: u64,
    malformed: u64,
    lines: u64,
}

/// A record id's longest form: ids are copied into the predictions.
pub const MAX_ID: usize = 128;

/// One record of `features` finite numbers (its id, which must be UTF-8), or
/// `None`. Bytes throughout: on wasm32, `str::split`, `trim` and `parse` go
/// through char decoding that costs a guest far more than it costs natively.
fn parse_record<'l>(line: &'l [u8], features: usize, values: &mut Vec<f32>) -> Option<&'l str> {
    let start = values.len();
    let mut fields = line.split(|b| *b == b',');
    let id = fields
        .next()
        .filter(|id| !id.is_empty() && id.len() <= MAX_ID)
        .and_then(|id| std::str::from_utf8(id).ok())?;
    for field in fields {
        match number(field) {
            Some(v) if v.is_finite() && values.len() - start < features => values.push(v),
            _ => {
                values.truncate(start);
                return None;
            }
        }
    }
    if values.len() - start != features {
        values.truncate(start);
        return None;
    }
    Some(id)
}

/// A field's number, as `str::trim` then `parse::<f32>` read it: the byte
/// parser first, the standard library for what it refuses (such as a number
/// with non-ASCII whitespace around it).
fn number(field: &[u8]) -> Option<f32> {
    records::parse_f32(field).or_else(|| std::str::from_utf8(field).ok()?.trim().parse().ok())
}

fn is_number(field: Option<&[u8]>) -> bool {
    field.and_then(number).is_some()
}

impl Scorer<'_> {
    /// Adds one CSV line (with or without its newline). Blank lines are
    /// skipped, and so is the first other line when its second field is not a
    /// number (a header); any other line that is not a record of the model's
    /// width is counted as malformed. When a batch is full it is scored and its
    /// output rows are appended to `out`.
    pub fn push(&mut self, line: &[u8], out: &mut String) -> Result<(), ModelError> {
        let text = records::line_content(line);
        if text.is_empty() {
            return Ok(());
        }
        self.lines += 1;
        match parse_record(text, self.model.features, &mut self.values) {
            Some(id) => self.ids.push(id.to_owned()),
            // A header is valid UTF-8, its second field not a number.
            None if self.lines == 1
                && std::str::from_utf8(text).is_ok()
                && !is_number(text.split(|b| *b == b',').nth(1)) => {}
            None => self.malformed += 1,
        }
        if self.ids.len() == BATCH {
            self.flush(out)?;
        }
        Ok(())
    }

    /// Scores what is left and returns the counts.
    pub fn finish(mut self, out: &mut String) -> Result<Counts, ModelError> {
        self.flush(out)?;
        Ok(Counts {
            scored: self.scored,
            malformed: self.malformed,
        })
    }

    fn flush(&mut self, out: &mut String) -> Result<(), ModelError> {
        let rows = self.ids.len();
        if rows == 0 {
            return Ok(());
        }
        let features = self.model.features;
        let input = tract_ndarray::Array2::from_shape_vec(
            (rows, features),
            std::mem::take(&mut self.values),
        )
        .map_err(|e| ModelError(format!("batch shape: {e}")))?;
        let outputs = self
            .state
            .run(tvec!(Tensor::from(input).into()))
            .map_err(model_error("running the model"))?;
        let probabilities = outputs[0]
            .to_plain_array_view::<f32>()
            .map_err(model_error("reading the probabilities"))?;
        let classes = self.model.classes;
        if probabilities.shape() != [rows, classes] {
            return Err(ModelError(format!(
                "the model answered {:?} for {rows} records of {classes} classes",
                probabilities.shape()
            )));
        }
        let flat = probabilities
            .as_slice()
            .ok_or_else(|| ModelError("the probabilities are not contiguous".into()))?;
        for (id, row) in self.ids.iter().zip(flat.chunks_exact(classes)) {
            out.push_str(id);
            for p in row {
                let _ = write!(out, ",{p}");
            }
            out.push('\n');
        }
        self.scored += rows as u64;
        self.ids.clear();
        self.values = Vec::with_capacity(BATCH * features);
        Ok(())
    }
}
