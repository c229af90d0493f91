//! A request of several named inputs (for example a sealed model and sealed
//! records, each under its own owner's key): one CBOR map (RFC 8949) from text
//! names to byte strings in deterministic encoding (RFC 8949 section 4.2.1:
//! definite lengths in their shortest form, keys in order). `cloister call
//! --part NAME=FILE` writes it; a workload reads it with [`Parts::decode`],
//! which borrows every part from the request and refuses any other encoding.
//! Any CBOR library reads it and, in deterministic mode, writes it; see
//! `docs/sealed-format.md`.

use ciborium_ll::{Decoder, Encoder, Header};

/// At most this many parts in one request.
pub const MAX_PARTS: usize = 16;
/// A part's name: 1 to 64 bytes of `a-z`, `0-9` and `-`.
pub const MAX_NAME: usize = 64;

/// Why a request is not a valid set of parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartsError(pub String);

impl PartsError {
    pub fn code(&self) -> &'static str {
        "E-REQUEST-PARTS"
    }
}

impl std::fmt::Display for PartsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request is not a set of named parts: {}", self.0)
    }
}

impl std::error::Error for PartsError {}

fn check_name(name: &str) -> Result<(), PartsError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(PartsError(format!(
            "part name {name:?} is not 1 to {MAX_NAME} characters of a-z, 0-9 and -"
        )))
    }
}

/// RFC 8949's deterministic order of text keys: the encoded keys bytewise,
/// which for these names is shorter first, then bytewise.
fn order(a: &str, b: &str) -> std::cmp::Ordering {
    (a.len(), a.as_bytes()).cmp(&(b.len(), b.as_bytes()))
}

fn encode_header(out: &mut Vec<u8>, header: Header) {
    // Writing into a Vec cannot fail.
    let _ = Encoder::from(&mut *out).push(header);
}

/// One CBOR header from the front of `rest`, which must be in its shortest
/// form (deterministic encoding); `rest` moves past it.
fn next_header(rest: &mut &[u8]) -> Result<Header, PartsError> {
    let before = *rest;
    let header = Decoder::from(&mut *rest)
        .pull()
        .map_err(|_| PartsError("not CBOR, or cut short".into()))?;
    let mut shortest = Vec::new();
    encode_header(&mut shortest, header);
    if before[..before.len() - rest.len()] != shortest[..] {
        return Err(PartsError(
            "a length is not in its shortest form (deterministic CBOR)".into(),
        ));
    }
    Ok(header)
}

/// `len` bytes from the front of `rest`, without copying.
fn take<'a>(rest: &mut &'a [u8], len: usize) -> Result<&'a [u8], PartsError> {
    if rest.len() < len {
        return Err(PartsError("cut short".into()));
    }
    let (taken, after) = rest.split_at(len);
    *rest = after;
    Ok(taken)
}

/// Named inputs, in the deterministic order of their names; borrowed from the
/// request (decoding copies nothing).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parts<'a>(Vec<(&'a str, &'a [u8])>);

impl<'a> Parts<'a> {
    /// Parts from (name, bytes) pairs: names valid and distinct.
    pub fn new(mut parts: Vec<(&'a str, &'a [u8])>) -> Result<Parts<'a>, PartsError> {
        if parts.len() > MAX_PARTS {
            return Err(PartsError(format!(
                "{} parts (at most {MAX_PARTS})",
                parts.len()
            )));
        }
        parts.sort_by(|a, b| order(a.0, b.0));
        for (i, (name, _)) in parts.iter().enumerate() {
            check_name(name)?;
            if i > 0 && parts[i - 1].0 == *name {
                return Err(PartsError(format!("part {name:?} is given twice")));
            }
        }
        Ok(Parts(parts))
    }

    /// The request's bytes: deterministic CBOR (RFC 8949 section 4.2.1).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.iter().map(|(k, v)| k.len() + v.len() + 18).sum());
        encode_header(&mut out, Header::Map(Some(self.0.len())));
        for (name, bytes) in &self.0 {
            encode_header(&mut out, Header::Text(Some(name.len())));
            out.extend_from_slice(name.as_bytes());
            encode_header(&mut out, Header::Bytes(Some(bytes.len())));
            out.extend_from_slice(bytes);
        }
        out
    }

    /// Reads a request: one map of definite length, its keys valid text names
    /// in deterministic order (so no duplicates), its values byte strings of
    /// definite length, every length in its shortest form, nothing after it.
    /// Exactly the bytes [`Parts::encode`] writes.
    pub fn decode(bytes: &'a [u8]) -> Result<Parts<'a>, PartsError> {
        let mut rest = bytes;
        let count = match next_header(&mut rest)? {
            Header::Map(Some(n)) if n <= MAX_PARTS => n,
            Header::Map(Some(n)) => {
                return Err(PartsError(format!("{n} parts (at most {MAX_PARTS})")));
            }
            _ => return Err(PartsError("not a CBOR map of definite length".into())),
        };
        let mut parts: Vec<(&str, &[u8])> = Vec::with_capacity(count);
        for _ in 0..count {
            let name = match next_header(&mut rest)? {
                Header::Text(Some(len)) if len <= MAX_NAME => take(&mut rest, len)?,
                _ => {
                    return Err(PartsError(format!(
                        "every key must be a text name of at most {MAX_NAME} bytes"
                    )));
                }
            };
            let name = std::str::from_utf8(name)
                .map_err(|_| PartsError("a part name is not UTF-8".into()))?;
            check_name(name)?;
            if let Some((last, _)) = parts.last()
                && order(last, name) != std::cmp::Ordering::Less
            {
                return Err(PartsError(format!(
                    "part {name:?} is out of order or given twice (deterministic CBOR)"
                )));
            }
            let value = match next_header(&mut rest)? {
                Header::Bytes(Some(len)) => take(&mut rest, len)?,
                _ => {
                    return Err(PartsError(format!(
                        "part {name:?} is not a byte string of definite length"
                    )));
                }
            };
            parts.push((name, value));
        }
        if !rest.is_empty() {
            return Err(PartsError(format!("{} bytes after the map", rest.len())));
        }
        Ok(Parts(parts))
    }

    /// The part called `name`.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.0
            .binary_search_by(|(k, _)| order(k, name))
            .ok()
            .map(|i| self.0[i].1)
    }

    /// The part called `name`, or an error naming what the request holds.
    pub fn required(&self, name: &str) -> Result<&'a [u8], PartsError> {
        self.get(name).ok_or_else(|| {
            PartsError(format!(
                "no part {name:?} (the request has: {})",
                self.names().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.0.iter().map(|(k, _)| *k)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn two() -> Parts<'static> {
        Parts::new(vec![("records", b"r"), ("model", &[0, 1, 2])]).unwrap()
    }

    #[test]
    fn round_trips_in_deterministic_order_and_reads_as_plain_cbor() {
        let bytes = two().encode();
        // a2 (map of 2), 65 "model", 43 00 01 02, 67 "records", 41 "r"
        assert_eq!(
            bytes,
            [
                &[0xa2, 0x65][..],
                b"model",
                &[0x43, 0, 1, 2, 0x67],
                b"records",
                &[0x41, b'r']
            ]
            .concat()
        );
        let parts = Parts::decode(&bytes).unwrap();
        assert_eq!(parts, two());
        assert_eq!(parts.get("model"), Some(&[0u8, 1, 2][..]));
        assert_eq!(parts.get("other"), None);
        let e = parts.required("other").unwrap_err();
        assert!(e.to_string().contains("model, records"), "{e}");
        // Shorter names first (RFC 8949 4.2.1), whatever order they are given in.
        let p = Parts::new(vec![("aa", b""), ("b", b""), ("a", b"")]).unwrap();
        assert_eq!(p.names().collect::<Vec<_>>(), ["a", "b", "aa"]);
        assert_eq!(Parts::decode(&p.encode()).unwrap(), p);
        // Large parts use longer length headers, still the shortest form.
        let big = vec![7u8; 70_000];
        let p = Parts::new(vec![("big", &big)]).unwrap();
        assert_eq!(
            Parts::decode(&p.encode()).unwrap().get("big"),
            Some(&big[..])
        );
    }

    #[test]
    fn refuses_what_is_not_exactly_a_deterministic_set_of_named_byte_strings() {
        let good = two().encode();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("trailing", [&good[..], &[0]].concat()),
            ("array", vec![0x81, 0x41, 0]),
            ("indefinite map", vec![0xbf, 0x61, b'a', 0x40, 0xff]),
            (
                "indefinite bytes",
                vec![0xa1, 0x61, b'a', 0x5f, 0x41, 0, 0xff],
            ),
            // {"a": 24 as a two-byte length}: not the shortest form
            ("long-form length", vec![0xa1, 0x61, b'a', 0x58, 0x01, 0]),
            (
                "map length in long form",
                vec![0xb8, 0x01, 0x61, b'a', 0x40],
            ),
            // a length far past the end
            (
                "huge length",
                vec![0xa1, 0x61, b'a', 0x5b, 0, 0, 0, 1, 0, 0, 0, 0],
            ),
            ("text value", vec![0xa1, 0x61, b'a', 0x61, b'x']),
            ("int key", vec![0xa1, 0x01, 0x40]),
            ("duplicate", vec![0xa2, 0x61, b'a', 0x40, 0x61, b'a', 0x40]),
            (
                "out of order",
                vec![0xa2, 0x61, b'b', 0x40, 0x61, b'a', 0x40],
            ),
            (
                "longer first",
                vec![0xa2, 0x62, b'a', b'a', 0x40, 0x61, b'b', 0x40],
            ),
            ("bad name", vec![0xa1, 0x61, b'A', 0x40]),
            ("empty name", vec![0xa1, 0x60, 0x40]),
            ("17 parts", vec![0xb1]),
        ];
        for (what, bytes) in cases {
            let e = Parts::decode(&bytes).unwrap_err();
            assert_eq!(e.code(), "E-REQUEST-PARTS", "{what}");
        }
        let names: Vec<String> = (0..=MAX_PARTS).map(|i| format!("p{i}")).collect();
        let many: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
        assert!(Parts::new(many).is_err());
    }
}
