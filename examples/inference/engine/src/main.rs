//! The inference example's native side: the baseline the benchmark compares the
//! enclave with (same engine, same model, plaintext), and the generator of
//! synthetic records for throughput runs.
//!
//! ```text
//! inference-native score MODEL.onnx RECORDS.csv > PREDICTIONS.csv
//! inference-native generate DISTRIBUTION.json ROWS SEED > RECORDS.csv
//! ```
//! `score` prints to standard error how many records it scored and how fast.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Instant;

use inference_engine::Model;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["score", model, records] => score(model, records),
        ["generate", distribution, rows, seed] => generate(distribution, rows, seed),
        _ => Err("usage: inference-native score MODEL.onnx RECORDS.csv\n       inference-native generate DISTRIBUTION.json ROWS SEED".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inference-native: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn score(model: &str, records: &str) -> Result<()> {
    let start = Instant::now();
    let model = Model::load(&std::fs::read(model)?)?;
    let names: Vec<String> = (0..model.classes()).map(|c| c.to_string()).collect();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    out.write_all(model.header(&names)?.as_bytes())?;
    let mut scorer = model.scorer()?;
    let mut rows = String::new();
    let mut input = std::io::BufReader::new(std::fs::File::open(records)?);
    let mut line = Vec::new();
    while input.read_until(b'\n', &mut line)? > 0 {
        scorer.push(&line, &mut rows)?;
        line.clear();
        if !rows.is_empty() {
            out.write_all(rows.as_bytes())?;
            rows.clear();
        }
    }
    let counts = scorer.finish(&mut rows)?;
    out.write_all(rows.as_bytes())?;
    out.flush()?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "scored {} records ({} malformed) in {:.1} ms: {:.0} records/s",
        counts.scored,
        counts.malformed,
        secs * 1e3,
        counts.scored as f64 / secs
    );
    Ok(())
}

/// splitmix64 (statistics, not secrets), with Box-Muller normals.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit().max(f64::MIN_POSITIVE), self.unit());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[derive(serde::Deserialize)]
struct Class {
    weight: f64,
    mean: Vec<f64>,
    cholesky: Vec<Vec<f64>>,
}

#[derive(serde::Deserialize)]
struct Distribution {
    features: Vec<String>,
    classes: std::collections::BTreeMap<String, Class>,
}

/// Records drawn from the training distribution that train.py wrote: a class
/// by its share, then mean + L z (z standard normal, L the Cholesky factor of
/// that class's covariance), negative values clipped to 0 (every feature of
/// the data set is a non-negative measurement).
fn generate(distribution: &str, rows: &str, seed: &str) -> Result<()> {
    let d: Distribution = serde_json::from_slice(&std::fs::read(distribution)?)?;
    let rows: u64 = rows.parse()?;
    let mut rng = Rng(seed.parse()?);
    let n = d.features.len();
    let classes: Vec<&Class> = d.classes.values().collect();
    if classes.iter().any(|c| {
        c.mean.len() != n || c.cholesky.len() != n || c.cholesky.iter().any(|r| r.len() != n)
    }) {
        return Err("distribution: every class needs a mean and an n x n Cholesky factor".into());
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(out, "record_id,{}", d.features.join(","))?;
    let mut z = vec![0.0; n];
    for i in 0..rows {
        let mut pick = rng.unit();
        let class = classes
            .iter()
            .find(|c| {
                pick -= c.weight;
                pick < 0.0
            })
            .unwrap_or(&classes[classes.len() - 1]);
        z.iter_mut().for_each(|v| *v = rng.normal());
        write!(out, "s{i:07}")?;
        for (mean, row) in class.mean.iter().zip(&class.cholesky) {
            let x: f64 = mean + row.iter().zip(&z).map(|(l, z)| l * z).sum::<f64>();
            write!(out, ",{}", x.max(0.0) as f32)?;
        }
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}
