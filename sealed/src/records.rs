//! Fast, exact helpers for the CSV records that workloads read from and write
//! into sealed files, working on bytes: on wasm32, `str::split`, `trim` and
//! `{:.6}` go through char decoding and general formatting machinery that cost
//! a guest far more than the same source costs natively. Every function here
//! gives the same answer as the standard library's (tested against it); where
//! the fast path does not apply, it calls the standard library.

/// The fields of a CSV line (without quoting), split at `,`, after removing
/// the line's `\n` or `\r\n`.
pub fn fields(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line_content(line).split(|b| *b == b',')
}

/// A line without its trailing `\n`, `\r\n` or any run of `\r`/`\n`
/// (as `str::trim_end_matches(['\n', '\r'])`).
pub fn line_content(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &line[..end]
}

/// `field` without leading and trailing ASCII whitespace.
pub fn trim(field: &[u8]) -> &[u8] {
    field.trim_ascii()
}

/// Parses a decimal number as `str::parse::<f64>` does (the same value, to the
/// last bit, and `None` where it fails), surrounding ASCII whitespace removed.
/// Plain decimals of at most 15 significant digits and 22 fraction digits
/// (which records nearly always are) take Clinger's exact fast path: the
/// digits as an integer, exactly representable, divided by an exactly
/// representable power of ten — one correctly rounded operation.
pub fn parse_f64(field: &[u8]) -> Option<f64> {
    let s = trim(field);
    match exact_decimal(s) {
        Some(value) => Some(value),
        None => std::str::from_utf8(s).ok()?.parse().ok(),
    }
}

/// Parses a decimal number as `str::parse::<f32>` does (the same value, to the
/// last bit, and `None` where it fails), surrounding ASCII whitespace removed.
/// Plain decimals take [`parse_f64`]'s fast path, then are narrowed to `f32`:
/// rounding the exact value to `f64` first cannot move it across a point
/// halfway between two `f32` values (those points are `f64` values), so the
/// narrowed result is the `f32` nearest the exact value — unless the `f64`
/// lands exactly on such a halfway point, which the standard library decides.
pub fn parse_f32(field: &[u8]) -> Option<f32> {
    let s = trim(field);
    if let Some(value) = exact_decimal(s) {
        // The fast path's values are 0 or within 1e-22..1e15, inside f32's
        // normal range, where an f32 keeps 24 of an f64's 53 significant bits:
        // the 29 bits dropped from a halfway point are 1 followed by zeros.
        const DROPPED: u64 = (1 << 29) - 1;
        if value.to_bits() & DROPPED != 1 << 28 {
            return Some(value as f32);
        }
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// The value of a plain decimal (`-12.5`; at most 15 significant digits and 22
/// fraction digits), correctly rounded to `f64`, or `None` for anything else.
fn exact_decimal(s: &[u8]) -> Option<f64> {
    let (negative, digits) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let mut mantissa: u64 = 0;
    let mut significant = 0u32;
    let mut fraction_digits = 0u32;
    let mut seen_point = false;
    let mut seen_digit = false;
    let mut fast = !digits.is_empty();
    for &b in digits {
        match b {
            b'0'..=b'9' => {
                seen_digit = true;
                if mantissa != 0 || b != b'0' {
                    significant += 1;
                }
                mantissa = mantissa * 10 + u64::from(b - b'0');
                if seen_point {
                    fraction_digits += 1;
                }
                if significant > 15 || fraction_digits > 22 {
                    fast = false;
                    break;
                }
            }
            b'.' if !seen_point => seen_point = true,
            _ => {
                fast = false;
                break;
            }
        }
    }
    if fast && seen_digit {
        const POWERS: [f64; 23] = [
            1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
            1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
        ];
        let value = mantissa as f64 / POWERS[fraction_digits as usize];
        return Some(if negative { -value } else { value });
    }
    None
}

/// Appends `value` with `decimals` digits after the point, exactly as
/// `format!("{value:.decimals$}")` writes it (the exact binary value rounded
/// half to even). Values below 2^53 with at most 9 decimals are done in
/// integer arithmetic; anything else by the standard library.
pub fn push_fixed(out: &mut Vec<u8>, value: f64, decimals: usize) {
    if let Some(scaled) = scaled(value.abs(), decimals) {
        if value.is_sign_negative() {
            out.push(b'-');
        }
        let unit = 10u64.pow(decimals as u32);
        push_u64(out, scaled / unit);
        if decimals > 0 {
            out.push(b'.');
            let fraction = scaled % unit;
            let mut digits = [b'0'; 9];
            let mut f = fraction;
            for d in digits[..decimals].iter_mut().rev() {
                *d = b'0' + (f % 10) as u8;
                f /= 10;
            }
            out.extend_from_slice(&digits[..decimals]);
        }
    } else {
        use std::io::Write;
        let _ = write!(out, "{value:.decimals$}");
    }
}

/// round_half_even(value * 10^decimals) for 0 <= value < 2^53, decimals <= 9.
fn scaled(value: f64, decimals: usize) -> Option<u64> {
    if !value.is_finite() || decimals > 9 || value >= 9_007_199_254_740_992.0 {
        return None;
    }
    if value == 0.0 {
        return Some(0);
    }
    // value = mantissa * 2^exponent, exactly.
    let bits = value.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1u64 << 52) - 1);
    let (mantissa, exponent) = if biased == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1u64 << 52), biased - 1075)
    };
    let product = u128::from(mantissa) * u128::from(10u64.pow(decimals as u32));
    if exponent >= 0 {
        // value < 2^53 and mantissa >= 2^52 (normal): exponent is 0 here.
        return u64::try_from(product << exponent).ok();
    }
    let shift = (-exponent) as u32;
    if shift >= 128 {
        // product < 2^83 < 2^(shift-1): below half a unit, rounds to zero.
        return Some(0);
    }
    let quotient = product >> shift;
    let remainder = product & ((1u128 << shift) - 1);
    let half = 1u128 << (shift - 1);
    let round_up = remainder > half || (remainder == half && quotient & 1 == 1);
    u64::try_from(quotient + u128::from(round_up)).ok()
}

/// Appends the decimal digits of `n`.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of bit patterns (splitmix64).
    fn stream(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    fn fixed(value: f64, decimals: usize) -> String {
        let mut out = Vec::new();
        push_fixed(&mut out, value, decimals);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn fixed_formatting_is_the_standard_librarys() {
        let mut next = stream(1);
        let mut checked = 0;
        for i in 0..150_000u64 {
            let value = match i % 4 {
                // Any bit pattern (NaN, infinities, subnormals, huge, tiny).
                0 => f64::from_bits(next()),
                // Probabilities, as scorers write them.
                1 => (next() >> 11) as f64 / (1u64 << 53) as f64,
                // Values exactly halfway at the 6th decimal, and their neighbours.
                2 => {
                    let half = ((next() % 2_000_000) as f64 + 0.5) / 1e6;
                    f64::from_bits(half.to_bits().wrapping_add(next() % 3).wrapping_sub(1))
                }
                _ => (next() % 10_000_000) as f64 / 1024.0 - 4000.0,
            };
            for decimals in [0, 1, 2, 6, 9, 12] {
                assert_eq!(
                    fixed(value, decimals),
                    format!("{value:.decimals$}"),
                    "{value:e} ({:#x}) at {decimals} decimals",
                    value.to_bits()
                );
                checked += 1;
            }
        }
        for value in [
            0.0,
            -0.0,
            0.5,
            1.5,
            2.5,
            0.0000005,
            0.0000015,
            0.1048,
            9_007_199_254_740_991.0,
            9_007_199_254_740_992.0,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            for decimals in 0..=10 {
                assert_eq!(fixed(value, decimals), format!("{value:.decimals$}"));
            }
        }
        assert!(checked > 800_000);
    }

    #[test]
    fn parsing_is_the_standard_librarys() {
        let same = |text: &str| {
            let ours = parse_f64(text.as_bytes());
            let std = text.trim_ascii().parse::<f64>().ok();
            assert_eq!(
                ours.map(f64::to_bits),
                std.map(f64::to_bits),
                "{text:?}: {ours:?} vs {std:?}"
            );
        };
        for text in [
            "0",
            "61",
            " 124 ",
            "47.5",
            "-3.25",
            "+7",
            ".5",
            "5.",
            ".",
            "",
            " ",
            "-",
            "+",
            "1e5",
            "1E-3",
            "inf",
            "-inf",
            "NaN",
            "nan",
            "infinity",
            "0x10",
            "1,5",
            "1.2.3",
            "--1",
            "12a",
            "\t180\r",
            "0000000000000000000001",
            "0.1000000000000000055511151231257827",
            "123456789012345",
            "1234567890123456",
            "9007199254740993",
            "0.0000000000000000000001",
            "0.00000000000000000000001",
            "179769313486231570000000000000000000000000000",
            "٣",
            "1\u{a0}",
        ] {
            same(text);
        }
        let mut next = stream(2);
        for _ in 0..100_000 {
            let v = f64::from_bits(next());
            same(&format!("{v}"));
            same(&format!("{v:e}"));
            let p = (next() % 100_000_000) as f64 / 10f64.powi((next() % 12) as i32);
            same(&format!("{p}"));
            same(&format!("{p:.3}"));
            same(&format!("-{:.1}", (next() % 3000) as f64 / 10.0));
        }
    }

    #[test]
    fn f32_parsing_is_the_standard_librarys() {
        let same = |text: &str| {
            let ours = parse_f32(text.as_bytes());
            let std = text.trim_ascii().parse::<f32>().ok();
            assert_eq!(
                ours.map(f32::to_bits),
                std.map(f32::to_bits),
                "{text:?}: {ours:?} vs {std:?}"
            );
        };
        for text in [
            "0",
            "-0",
            "-0.0",
            "+7",
            "-.5",
            "+.5",
            "61",
            " 124 ",
            "47.5",
            "-3.25",
            ".5",
            "5.",
            ".",
            "",
            "-",
            "1e5",
            "inf",
            "NaN",
            "1,5",
            "12a",
            "\t180\r",
            "٣",
            "1\u{a0}",
            // Halfway between two f32 (2^24 + 1 and + 3): ties go to even.
            "16777217",
            "16777219",
            "-16777217.000",
            "16777217.0000001",
            "16777216.9999999",
            // At and past the ends of f32's normal range.
            "340282346638528859811704183484516925440",
            "340282356779733661637539395458142568448",
            "0.0000000000000000000000000000000000000117549435",
            "0.00000000000000000000001",
            "123456789012345",
            "0.1000000000000000055511151231257827",
        ] {
            same(text);
        }
        let mut next = stream(3);
        for _ in 0..200_000 {
            let v = f32::from_bits(next() as u32);
            same(&format!("{v}"));
            same(&format!("{v:e}"));
            // Every integer from 2^24 to 2^25 that is halfway between two f32.
            let halfway = (1u64 << 24) + 2 * (next() % (1 << 23)) + 1;
            same(&format!("{halfway}"));
            same(&format!("{halfway}.{}", next() % 10));
            let p = (next() % 100_000_000_000) as f64 / 10f64.powi((next() % 16) as i32);
            same(&format!("{p}"));
            same(&format!("-{p:.5}"));
            // A point halfway between two f32, written with 15 significant
            // digits: often nearer to it than half an f64 step, so that the
            // f64 of the decimal is the halfway point itself while the decimal
            // is not (narrowing it would round to even, maybe the wrong way).
            // (Below 1, where such points need more digits than 15.)
            let low = f32::from_bits(0x3800_0000 + (next() as u32 % 0x0780_0000));
            let halfway = (f64::from(low) + f64::from(low.next_up())) / 2.0;
            let decimals = (14 - halfway.log10().floor() as i32).clamp(0, 22) as usize;
            same(&format!("{halfway:.decimals$}"));
        }
    }

    #[test]
    fn fields_and_lines() {
        let split: Vec<&[u8]> = fields(b"P1, F ,61,,x\r\n").collect();
        assert_eq!(split, [&b"P1"[..], b" F ", b"61", b"", b"x"]);
        assert_eq!(line_content(b"a\n\r\n"), b"a");
        assert_eq!(line_content(b"\n"), b"");
        assert_eq!(trim(b" \tx y \r"), b"x y");
        let mut out = Vec::new();
        for n in [0, 7, 10, 1234567890, u64::MAX] {
            out.clear();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }
}
