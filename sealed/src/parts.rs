//! A request of several named inputs (for example a sealed model and sealed
//! records, each under its own owner's key): one CBOR map (RFC 8949) from text
//! names to byte strings, with definite lengths and the names in ascending
//! order. `cloister call --part NAME=FILE` writes it; a workload reads it with
//! [`Parts::decode`]. Any CBOR library reads and writes it; see
//! `docs/sealed-format.md`.

use ciborium::Value;

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

/// Named inputs, in ascending order of name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parts(Vec<(String, Vec<u8>)>);

impl Parts {
    /// Parts from (name, bytes) pairs: names valid and distinct.
    pub fn new(parts: Vec<(String, Vec<u8>)>) -> Result<Parts, PartsError> {
        if parts.len() > MAX_PARTS {
            return Err(PartsError(format!(
                "{} parts (at most {MAX_PARTS})",
                parts.len()
            )));
        }
        let mut parts = parts;
        parts.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, (name, _)) in parts.iter().enumerate() {
            check_name(name)?;
            if i > 0 && parts[i - 1].0 == *name {
                return Err(PartsError(format!("part {name:?} is given twice")));
            }
        }
        Ok(Parts(parts))
    }

    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let map = Value::Map(
            self.0
                .iter()
                .map(|(k, v)| (Value::Text(k.clone()), Value::Bytes(v.clone())))
                .collect(),
        );
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = ciborium::into_writer(&map, &mut out);
        out
    }

    /// Reads a request: exactly one CBOR map of distinct, valid text names to
    /// byte strings, and nothing after it.
    pub fn decode(bytes: &[u8]) -> Result<Parts, PartsError> {
        let mut rest = bytes;
        let value: Value =
            ciborium::from_reader(&mut rest).map_err(|e| PartsError(format!("not CBOR ({e})")))?;
        if !rest.is_empty() {
            return Err(PartsError(format!("{} bytes after the map", rest.len())));
        }
        let Value::Map(entries) = value else {
            return Err(PartsError("not a CBOR map".into()));
        };
        if entries.len() > MAX_PARTS {
            return Err(PartsError(format!(
                "{} parts (at most {MAX_PARTS})",
                entries.len()
            )));
        }
        let parts = entries
            .into_iter()
            .map(|(k, v)| match (k, v) {
                (Value::Text(name), Value::Bytes(bytes)) => Ok((name, bytes)),
                _ => Err(PartsError(
                    "every entry must map a text name to a byte string".into(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Parts::new(parts)
    }

    /// The part called `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(name))
            .ok()
            .map(|i| self.0[i].1.as_slice())
    }

    /// The part called `name`, or an error naming what the request holds.
    pub fn required(&self, name: &str) -> Result<&[u8], PartsError> {
        self.get(name).ok_or_else(|| {
            PartsError(format!(
                "no part {name:?} (the request has: {})",
                self.names().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// The names, in ascending order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn two() -> Parts {
        Parts::new(vec![
            ("records".into(), b"r".to_vec()),
            ("model".into(), vec![0, 1, 2]),
        ])
        .unwrap()
    }

    #[test]
    fn round_trips_in_name_order_and_reads_as_plain_cbor() {
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
    }

    #[test]
    fn refuses_what_is_not_a_set_of_named_byte_strings() {
        let good = two().encode();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("trailing", [&good[..], &[0]].concat()),
            ("array", vec![0x81, 0x41, 0]),
            // {"model": "text"}: a text value
            (
                "text value",
                [&[0xa1, 0x65][..], b"model", &[0x61, b'x']].concat(),
            ),
            // {1: h''}: an integer key
            ("int key", vec![0xa1, 0x01, 0x40]),
            // {"a": h'', "a": h''}
            ("duplicate", vec![0xa2, 0x61, b'a', 0x40, 0x61, b'a', 0x40]),
            // {"A": h''}
            ("bad name", vec![0xa1, 0x61, b'A', 0x40]),
            // {"": h''}
            ("empty name", vec![0xa1, 0x60, 0x40]),
        ];
        for (what, bytes) in cases {
            let e = Parts::decode(&bytes).unwrap_err();
            assert_eq!(e.code(), "E-REQUEST-PARTS", "{what}");
        }
        let many: Vec<(String, Vec<u8>)> =
            (0..=MAX_PARTS).map(|i| (format!("p{i}"), vec![])).collect();
        assert!(Parts::new(many).is_err());
    }
}
