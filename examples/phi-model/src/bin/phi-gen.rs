//! `phi-gen --seed N --rows N [--malformed-every K] [--out FILE]`: synthetic
//! patients as CSV (no real PHI).
//! `phi-gen --score FILE [--out FILE]`: the native baseline, scoring a plaintext
//! CSV with the same model outside any enclave.

use std::io::Write;

fn main() {
    let mut seed = 1u64;
    let mut rows = 1000u64;
    let mut malformed = 0u64;
    let mut out: Option<String> = None;
    let mut score: Option<String> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        let parsed = value.parse::<u64>();
        match (args[i].as_str(), parsed) {
            ("--seed", Ok(v)) => seed = v,
            ("--rows", Ok(v)) => rows = v,
            ("--malformed-every", Ok(v)) => malformed = v,
            ("--out", _) => out = Some(value),
            ("--score", _) => score = Some(value),
            (other, _) => {
                eprintln!(
                    "phi-gen: unexpected argument {other:?} (use --seed N --rows N [--malformed-every K] [--out FILE])"
                );
                std::process::exit(2);
            }
        }
        i += 2;
    }
    let result = (|| -> std::io::Result<()> {
        let mut w: Box<dyn Write> = match &out {
            Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
            None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
        };
        if let Some(input) = &score {
            let text = std::fs::read_to_string(input)?;
            let mut summary = phi_model::Summary::default();
            w.write_all(b"patient_id,risk_10y\n")?;
            for line in text.lines() {
                if let Some(row) = phi_model::score_line(line, &mut summary) {
                    w.write_all(row.as_bytes())?;
                }
            }
            eprintln!("{}", summary.to_json());
        } else {
            for line in phi_model::generate::patients(seed, rows, malformed) {
                w.write_all(line.as_bytes())?;
            }
        }
        w.flush()
    })();
    if let Err(e) = result {
        eprintln!("phi-gen: {e}");
        std::process::exit(1);
    }
}
