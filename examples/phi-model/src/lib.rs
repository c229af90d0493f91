//! The clinical model of the PHI scoring demo, shared by the enclave workload
//! (wasm32-wasip2) and the native baseline it is compared with.
//!
//! Framingham general cardiovascular disease 10-year risk: R. B. D'Agostino Sr,
//! R. S. Vasan, M. J. Pencina, P. A. Wolf, M. Cobain, J. M. Massaro, W. B. Kannel,
//! "General Cardiovascular Risk Profile for Use in Primary Care: The Framingham
//! Heart Study", Circulation 2008;117:743-753, Table 2 (sex-specific Cox
//! coefficients, baseline survival S0(10) and mean risk-factor sums):
//!
//! risk = 1 - S0 ^ exp(sum(beta_i * x_i) - mean), with x = ln(age), ln(total
//! cholesterol), ln(HDL), ln(systolic BP) (treated or untreated coefficient),
//! smoker (0/1), diabetes (0/1).

pub mod generate;

use cloister_sealed::records;
use cloister_sealed::{Reader, SealedError, Writer};

/// Sex as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sex {
    Female,
    Male,
}

/// One patient record (borrowing its id from the line).
#[derive(Debug, Clone, PartialEq)]
pub struct Patient<'a> {
    pub id: &'a str,
    pub sex: Sex,
    pub age: f64,
    /// Total cholesterol, mg/dL.
    pub total_cholesterol: f64,
    /// HDL cholesterol, mg/dL.
    pub hdl: f64,
    /// Systolic blood pressure, mmHg.
    pub systolic_bp: f64,
    pub bp_treated: bool,
    pub smoker: bool,
    pub diabetes: bool,
}

struct Coefficients {
    ln_age: f64,
    ln_total_cholesterol: f64,
    ln_hdl: f64,
    ln_sbp_untreated: f64,
    ln_sbp_treated: f64,
    smoker: f64,
    diabetes: f64,
    baseline_survival: f64,
    mean: f64,
}

const WOMEN: Coefficients = Coefficients {
    ln_age: 2.32888,
    ln_total_cholesterol: 1.20904,
    ln_hdl: -0.70833,
    ln_sbp_untreated: 2.76157,
    ln_sbp_treated: 2.82263,
    smoker: 0.52873,
    diabetes: 0.69154,
    baseline_survival: 0.95012,
    mean: 26.1931,
};

const MEN: Coefficients = Coefficients {
    ln_age: 3.06117,
    ln_total_cholesterol: 1.12370,
    ln_hdl: -0.93263,
    ln_sbp_untreated: 1.93303,
    ln_sbp_treated: 1.99881,
    smoker: 0.65451,
    diabetes: 0.57367,
    baseline_survival: 0.88936,
    mean: 23.9802,
};

/// The 10-year risk of a first cardiovascular event, 0..1.
pub fn risk(p: &Patient) -> f64 {
    let c = match p.sex {
        Sex::Female => &WOMEN,
        Sex::Male => &MEN,
    };
    let sbp = if p.bp_treated {
        c.ln_sbp_treated
    } else {
        c.ln_sbp_untreated
    };
    let sum = c.ln_age * p.age.ln()
        + c.ln_total_cholesterol * p.total_cholesterol.ln()
        + c.ln_hdl * p.hdl.ln()
        + sbp * p.systolic_bp.ln()
        + if p.smoker { c.smoker } else { 0.0 }
        + if p.diabetes { c.diabetes } else { 0.0 };
    1.0 - c.baseline_survival.powf((sum - c.mean).exp())
}

/// The CSV header the generator writes and the scorer expects.
pub const CSV_HEADER: &str =
    "patient_id,sex,age,total_cholesterol,hdl,systolic_bp,bp_treated,smoker,diabetes";

/// Why a row was not scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError(pub String);

fn shown(field: &[u8]) -> String {
    String::from_utf8_lossy(field).into_owned()
}

fn flag(field: &[u8], name: &str) -> Result<bool, RowError> {
    match records::trim(field) {
        b"1" | b"true" | b"yes" => Ok(true),
        b"0" | b"false" | b"no" => Ok(false),
        other => Err(RowError(format!("{name} is {:?}, not 0/1", shown(other)))),
    }
}

fn number(field: &[u8], name: &str, range: std::ops::RangeInclusive<f64>) -> Result<f64, RowError> {
    let v = records::parse_f64(field)
        .ok_or_else(|| RowError(format!("{name} is {:?}, not a number", shown(field))))?;
    if !range.contains(&v) {
        return Err(RowError(format!(
            "{name} {v} is outside {}..{}",
            range.start(),
            range.end()
        )));
    }
    Ok(v)
}

/// Parses one CSV row (without the header). Values outside the model's
/// validated ranges are refused rather than extrapolated.
pub fn parse_row(line: &[u8]) -> Result<Patient<'_>, RowError> {
    let mut fields = [&b""[..]; 9];
    let mut count = 0;
    for field in records::fields(line) {
        if let Some(slot) = fields.get_mut(count) {
            *slot = field;
        }
        count += 1;
    }
    if count != 9 {
        return Err(RowError(format!("{count} fields, expected 9")));
    }
    let [id, sex, values @ ..] = fields;
    let (id, sex) = (records::trim(id), records::trim(sex));
    if id.is_empty() {
        return Err(RowError("empty patient_id".into()));
    }
    let id = std::str::from_utf8(id).map_err(|_| RowError("patient_id is not UTF-8".into()))?;
    Ok(Patient {
        id,
        sex: match sex {
            b"F" | b"f" => Sex::Female,
            b"M" | b"m" => Sex::Male,
            other => return Err(RowError(format!("sex is {:?}, not F/M", shown(other)))),
        },
        age: number(values[0], "age", 30.0..=74.0)?,
        total_cholesterol: number(values[1], "total_cholesterol", 80.0..=500.0)?,
        hdl: number(values[2], "hdl", 10.0..=150.0)?,
        systolic_bp: number(values[3], "systolic_bp", 70.0..=260.0)?,
        bp_treated: flag(values[4], "bp_treated")?,
        smoker: flag(values[5], "smoker")?,
        diabetes: flag(values[6], "diabetes")?,
    })
}

/// Aggregate statistics: what the scorer may report in the clear.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub scored: u64,
    pub malformed: u64,
    pub sum: f64,
    /// < 10 %
    pub low: u64,
    /// 10 % to < 20 %
    pub intermediate: u64,
    /// >= 20 %
    pub high: u64,
}

impl Summary {
    pub fn add(&mut self, risk: f64) {
        self.scored += 1;
        self.sum += risk;
        if risk < 0.10 {
            self.low += 1;
        } else if risk < 0.20 {
            self.intermediate += 1;
        } else {
            self.high += 1;
        }
    }

    pub fn mean(&self) -> f64 {
        if self.scored == 0 {
            0.0
        } else {
            self.sum / self.scored as f64
        }
    }

    pub fn to_json(&self) -> String {
        format!(
            "{{\"scored\":{},\"malformed\":{},\"mean_risk\":{:.6},\"bands\":{{\"low_lt_10\":{},\"intermediate_10_20\":{},\"high_ge_20\":{}}}}}",
            self.scored,
            self.malformed,
            self.mean(),
            self.low,
            self.intermediate,
            self.high
        )
    }
}

/// The header of the scores the scorer writes.
pub const OUTPUT_HEADER: &[u8] = b"patient_id,risk_10y\n";

/// Scores one CSV line, appending `id,risk\n` (risk with 6 decimals) to `out`
/// for a patient; the header and blank lines are skipped, malformed rows
/// counted, not fatal. Returns whether a row was written.
pub fn score_record(line: &[u8], summary: &mut Summary, out: &mut Vec<u8>) -> bool {
    let content = records::line_content(line);
    if content.is_empty() || content == CSV_HEADER.as_bytes() {
        return false;
    }
    match parse_row(content) {
        Ok(p) => {
            let r = risk(&p);
            summary.add(r);
            out.extend_from_slice(p.id.as_bytes());
            out.push(b',');
            records::push_fixed(out, r, 6);
            out.push(b'\n');
            true
        }
        Err(_) => {
            summary.malformed += 1;
            false
        }
    }
}

/// [`score_record`] for a line of text: `Some(output row)` for a patient.
pub fn score_line(line: &str, summary: &mut Summary) -> Option<String> {
    let mut out = Vec::new();
    score_record(line.as_bytes(), summary, &mut out)
        .then(|| String::from_utf8(out).expect("ids are UTF-8 and the rest ASCII"))
}

/// Scores every record of a sealed file into a sealed output ([`OUTPUT_HEADER`],
/// then one row per patient): the loop that the enclave workload and the
/// native baseline both run.
pub fn score_sealed<W: std::io::Write>(
    reader: &mut Reader<'_, impl std::io::Read>,
    writer: &mut Writer<'_, W>,
    summary: &mut Summary,
) -> Result<(), SealedError> {
    writer.write_record(OUTPUT_HEADER)?;
    let mut row = Vec::with_capacity(64);
    reader.for_each_line(|line| {
        row.clear();
        if score_record(line, summary, &mut row) {
            writer.write_record(&row)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn patient(
        sex: Sex,
        age: f64,
        tc: f64,
        hdl: f64,
        sbp: f64,
        treated: bool,
        smoker: bool,
        diabetes: bool,
    ) -> Patient<'static> {
        Patient {
            id: "x",
            sex,
            age,
            total_cholesterol: tc,
            hdl,
            systolic_bp: sbp,
            bp_treated: treated,
            smoker,
            diabetes,
        }
    }

    #[test]
    fn the_papers_worked_examples() {
        // D'Agostino et al. 2008: a 61-year-old woman, total cholesterol 180, HDL 47,
        // untreated SBP 124, smoker, not diabetic: 10.48 %.
        let w = risk(&patient(
            Sex::Female,
            61.0,
            180.0,
            47.0,
            124.0,
            false,
            true,
            false,
        ));
        assert!((w - 0.1048).abs() < 0.00005, "{w}");
        // A 53-year-old man, total cholesterol 161, HDL 55, treated SBP 125,
        // non-smoker, diabetic: 15.6 %.
        let m = risk(&patient(
            Sex::Male,
            53.0,
            161.0,
            55.0,
            125.0,
            true,
            false,
            true,
        ));
        assert!((m - 0.156).abs() < 0.0005, "{m}");
    }

    /// An independent transcription of the published equation (hazard-ratio
    /// form, written separately from `risk`), over a grid of patients.
    #[test]
    fn agrees_with_an_independent_implementation() {
        #[allow(clippy::too_many_arguments)]
        fn independent(
            female: bool,
            age: f64,
            tc: f64,
            hdl: f64,
            sbp: f64,
            treated: bool,
            smoker: bool,
            diabetes: bool,
        ) -> f64 {
            let (b, s0, mean): ([f64; 7], f64, f64) = if female {
                (
                    [
                        2.32888, 1.20904, -0.70833, 2.76157, 2.82263, 0.52873, 0.69154,
                    ],
                    0.95012,
                    26.1931,
                )
            } else {
                (
                    [
                        3.06117, 1.12370, -0.93263, 1.93303, 1.99881, 0.65451, 0.57367,
                    ],
                    0.88936,
                    23.9802,
                )
            };
            let hazard_ratio = age.powf(b[0])
                * tc.powf(b[1])
                * hdl.powf(b[2])
                * sbp.powf(if treated { b[4] } else { b[3] })
                * (if smoker { b[5].exp() } else { 1.0 })
                * (if diabetes { b[6].exp() } else { 1.0 })
                / mean.exp();
            1.0 - s0.powf(hazard_ratio)
        }
        for female in [true, false] {
            for age in [30.0, 45.0, 60.0, 74.0] {
                for (tc, hdl) in [(150.0, 70.0), (220.0, 45.0), (310.0, 30.0)] {
                    for sbp in [100.0, 135.0, 180.0] {
                        for flags in 0..8u8 {
                            let (t, s, d) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
                            let sex = if female { Sex::Female } else { Sex::Male };
                            let a = risk(&patient(sex, age, tc, hdl, sbp, t, s, d));
                            let b = independent(female, age, tc, hdl, sbp, t, s, d);
                            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_rows_are_counted_not_fatal() {
        let mut s = Summary::default();
        assert_eq!(score_line(CSV_HEADER, &mut s), None);
        assert!(
            score_line("P1,F,61,180,47,124,0,1,0\n", &mut s)
                .unwrap()
                .starts_with("P1,0.104")
        );
        for bad in [
            "P2,X,61,180,47,124,0,1,0",
            "P3,F,sixty,180,47,124,0,1,0",
            "P4,F,61,180",
            "P5,M,99,180,47,124,0,0,0",
            ",F,61,180,47,124,0,1,0",
            "P6,F,61,180,47,124,2,1,0",
        ] {
            assert_eq!(score_line(bad, &mut s), None, "{bad}");
        }
        assert_eq!((s.scored, s.malformed), (1, 6));
        assert!(s.to_json().contains("\"malformed\":6"));
    }
}
