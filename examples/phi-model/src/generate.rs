//! Realistic synthetic patients (no real PHI anywhere): deterministic for a seed.
//! Distributions roughly follow adult US population statistics: age 30-74, total
//! cholesterol ~ N(200, 38), HDL ~ N(58 F / 47 M, 14), systolic BP ~ N(115 + 0.4
//! (age - 30), 16), 25 % treated for hypertension (more when older), 15 % smokers,
//! 10 % diabetic; a few rows are deliberately malformed when asked for.

use crate::CSV_HEADER;

/// splitmix64: a small, well-mixed, seedable generator (statistics, not secrets).
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
    fn normal(&mut self, mean: f64, sd: f64) -> f64 {
        let (u1, u2) = (self.unit().max(f64::MIN_POSITIVE), self.unit());
        mean + sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// The header and `rows` patient rows; every `malformed_every`-th row is broken
/// (0 = none), to exercise the scorer's error counting.
pub fn patients(seed: u64, rows: u64, malformed_every: u64) -> impl Iterator<Item = String> {
    let mut rng = Rng(seed);
    std::iter::once(format!("{CSV_HEADER}\n")).chain((1..=rows).map(move |i| {
        let female = rng.chance(0.52);
        let age = (30.0 + rng.unit() * 44.0).round();
        let tc = rng.normal(200.0, 38.0).clamp(110.0, 380.0).round();
        let hdl = rng
            .normal(if female { 58.0 } else { 47.0 }, 14.0)
            .clamp(22.0, 110.0)
            .round();
        let sbp = rng
            .normal(115.0 + 0.4 * (age - 30.0), 16.0)
            .clamp(90.0, 220.0)
            .round();
        let treated = rng.chance(0.10 + 0.006 * (age - 30.0));
        let smoker = rng.chance(0.15);
        let diabetes = rng.chance(0.06 + 0.002 * (age - 30.0));
        let b = |x: bool| u8::from(x);
        if malformed_every > 0 && i % malformed_every == 0 {
            return format!(
                "P{i:07},{},n/a,{tc},{hdl},{sbp},{},{},{}\n",
                if female { 'F' } else { 'M' },
                b(treated),
                b(smoker),
                b(diabetes)
            );
        }
        format!(
            "P{i:07},{},{age},{tc},{hdl},{sbp},{},{},{}\n",
            if female { 'F' } else { 'M' },
            b(treated),
            b(smoker),
            b(diabetes)
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Summary, score_line};

    #[test]
    fn deterministic_realistic_and_scoreable() {
        let a: Vec<String> = patients(7, 2000, 0).collect();
        let b: Vec<String> = patients(7, 2000, 0).collect();
        assert_eq!(a, b);
        assert_ne!(a, patients(8, 2000, 0).collect::<Vec<_>>());
        let mut s = Summary::default();
        for line in &a {
            score_line(line, &mut s);
        }
        assert_eq!((s.scored, s.malformed), (2000, 0));
        // A plausible population: mean risk between 5 % and 25 %, every band used.
        assert!((0.05..0.25).contains(&s.mean()), "{}", s.mean());
        assert!(s.low > 0 && s.intermediate > 0 && s.high > 0);
        let mut s = Summary::default();
        for line in patients(7, 100, 10) {
            score_line(&line, &mut s);
        }
        assert_eq!((s.scored, s.malformed), (90, 10));
    }
}
