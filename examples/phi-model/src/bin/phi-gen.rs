//! `phi-gen --seed N --rows N [--malformed-every K] [--out FILE]`: synthetic
//! patients as CSV (no real PHI).
//! `phi-gen --score FILE [--out FILE]`: the native baseline, scoring a plaintext
//! CSV with the same model outside any enclave.
//! `phi-gen --score-sealed FILE --data-key FILE [--out FILE]`: the benchmark's
//! native baseline of the enclave workload: the same loop (`score_sealed`) over
//! a sealed file whose 32-byte data key is given in the clear, the scores
//! sealed under that key; writes the summary line, then the sealed scores, as
//! the workload answers.

use std::io::Write;

const USAGE: &str = "\
phi-gen: synthetic patients (no real PHI) and the native scoring baselines

usage:
  phi-gen --seed N --rows N [--malformed-every K] [--out FILE]
      synthetic patients as CSV
  phi-gen --score FILE [--out FILE]
      score a plaintext CSV with the PHI model, outside any enclave
  phi-gen --score-sealed FILE --data-key FILE [--out FILE]
      the benchmark's native baseline: score a sealed file whose 32-byte data
      key is given in the clear, sealing the scores under that key
";

fn main() {
    let mut seed = 1u64;
    let mut rows = 1000u64;
    let mut malformed = 0u64;
    let mut out: Option<String> = None;
    let mut score: Option<String> = None;
    let mut score_sealed: Option<String> = None;
    let mut data_key: Option<String> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        let parsed = value.parse::<u64>();
        match (args[i].as_str(), parsed) {
            ("--help" | "-h", _) => {
                print!("{USAGE}");
                return;
            }
            ("--seed", Ok(v)) => seed = v,
            ("--rows", Ok(v)) => rows = v,
            ("--malformed-every", Ok(v)) => malformed = v,
            ("--out", _) => out = Some(value),
            ("--score", _) => score = Some(value),
            ("--score-sealed", _) => score_sealed = Some(value),
            ("--data-key", _) => data_key = Some(value),
            (other, _) => {
                eprintln!("phi-gen: unexpected argument {other:?}\n\n{USAGE}");
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
        if let Some(input) = &score_sealed {
            let key = std::fs::read(data_key.as_deref().unwrap_or_default())?;
            let (summary, sealed) = score_sealed_file(&std::fs::read(input)?, key)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            writeln!(w, "{}", summary.to_json())?;
            w.write_all(&sealed)?;
        } else if let Some(input) = &score {
            let text = std::fs::read(input)?;
            let mut summary = phi_model::Summary::default();
            let mut row = Vec::new();
            w.write_all(phi_model::OUTPUT_HEADER)?;
            for line in text.split_inclusive(|b| *b == b'\n') {
                row.clear();
                if phi_model::score_record(line, &mut summary, &mut row) {
                    w.write_all(&row)?;
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

fn score_sealed_file(
    input: &[u8],
    key: Vec<u8>,
) -> Result<(phi_model::Summary, Vec<u8>), cloister_sealed::SealedError> {
    use cloister_sealed as sealed;
    let key = sealed::DataKey::new(key.into())?;
    let mut rest = input;
    let header = sealed::Header::read(&mut rest)?;
    let (key_id, encrypted) = (header.key_id.clone(), header.encrypted_data_key.clone());
    let mut reader = sealed::Reader::new(header, rest, &key)?;
    let mut prefix = [0u8; 7];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut prefix)?;
    let mut writer = sealed::Writer::new(
        Vec::new(),
        &key,
        &key_id,
        encrypted,
        vec![],
        sealed::DEFAULT_CHUNK_SIZE,
        prefix,
    )?;
    let mut summary = phi_model::Summary::default();
    phi_model::score_sealed(&mut reader, &mut writer, &mut summary)?;
    Ok((summary, writer.finish()?))
}
