//! The one address syntax: `vsock:CID:PORT`, `unix:PATH`, `tcp:HOST:PORT`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::codes::ErrorCode;

/// Where a Cloister process listens or connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A vsock endpoint (context id and port), as Nitro's parent/enclave channel.
    Vsock { cid: u32, port: u32 },
    /// A Unix domain socket path; the default transport on machines without vsock.
    Unix(PathBuf),
    /// A TCP endpoint; `host` is a name, an IPv4 literal or a bracket-less IPv6 literal.
    /// Port 0 asks the kernel for a free port when listening.
    Tcp { host: String, port: u16 },
}

/// Why an address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address {0:?} has no scheme: write vsock:CID:PORT, unix:PATH or tcp:HOST:PORT")]
    MissingScheme(String),
    #[error("address {input:?} has unknown scheme {scheme:?}: expected vsock, unix or tcp")]
    UnknownScheme { input: String, scheme: String },
    #[error("address {input:?}: {what}")]
    Invalid { input: String, what: &'static str },
}

impl ErrorCode for AddressError {
    fn code(&self) -> &'static str {
        "E-PROTO-ADDRESS"
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, AddressError> {
        let invalid = |what| AddressError::Invalid {
            input: input.to_owned(),
            what,
        };
        let (scheme, rest) = input
            .split_once(':')
            .ok_or_else(|| AddressError::MissingScheme(input.to_owned()))?;
        match scheme {
            "unix" => {
                if rest.is_empty() {
                    return Err(invalid("the Unix socket path is empty"));
                }
                if rest.contains('\0') {
                    return Err(invalid("the Unix socket path contains a NUL byte"));
                }
                Ok(Address::Unix(PathBuf::from(rest)))
            }
            "vsock" => {
                let (cid, port) = rest
                    .split_once(':')
                    .ok_or_else(|| invalid("expected vsock:CID:PORT"))?;
                let cid = parse_decimal::<u32>(cid)
                    .ok_or_else(|| invalid("the CID is not an unsigned 32-bit integer"))?;
                let port = parse_decimal::<u32>(port)
                    .ok_or_else(|| invalid("the port is not an unsigned 32-bit integer"))?;
                Ok(Address::Vsock { cid, port })
            }
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| invalid("expected tcp:HOST:PORT"))?;
                let host = match host.strip_prefix('[') {
                    Some(v6) => v6
                        .strip_suffix(']')
                        .filter(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
                        .ok_or_else(|| invalid("a bracketed host must be an IPv6 literal"))?,
                    None if host.contains(':') => {
                        return Err(invalid("write IPv6 hosts in brackets: tcp:[::1]:PORT"));
                    }
                    None => host,
                };
                if host.is_empty() {
                    return Err(invalid("the host is empty"));
                }
                if !host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
                {
                    return Err(invalid("the host has characters a host name cannot have"));
                }
                // Port 0 is meaningful when listening: the kernel picks a free port.
                let port = parse_decimal::<u16>(port)
                    .ok_or_else(|| invalid("the port is not an integer from 0 to 65535"))?;
                Ok(Address::Tcp {
                    host: host.to_owned(),
                    port,
                })
            }
            other => Err(AddressError::UnknownScheme {
                input: input.to_owned(),
                scheme: other.to_owned(),
            }),
        }
    }
}

/// Decimal digits only: no sign, no whitespace, no hex.
fn parse_decimal<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_each_scheme() {
        assert_eq!(
            "vsock:16:5000".parse::<Address>().unwrap(),
            Address::Vsock {
                cid: 16,
                port: 5000
            }
        );
        assert_eq!(
            "unix:/run/cloister/e.sock".parse::<Address>().unwrap(),
            Address::Unix("/run/cloister/e.sock".into())
        );
        assert_eq!(
            "unix:rel/a:b.sock".parse::<Address>().unwrap(),
            Address::Unix("rel/a:b.sock".into())
        );
        assert_eq!(
            "tcp:kms.example.com:8443".parse::<Address>().unwrap(),
            Address::Tcp {
                host: "kms.example.com".into(),
                port: 8443
            }
        );
        assert_eq!(
            "tcp:[::1]:443".parse::<Address>().unwrap(),
            Address::Tcp {
                host: "::1".into(),
                port: 443
            }
        );
    }

    #[test]
    fn refuses_malformed_addresses_with_reasons() {
        let cases = [
            ("", "no scheme"),
            ("localhost:80", "unknown scheme"),
            ("http:x", "unknown scheme"),
            ("unix:", "path is empty"),
            ("vsock:16", "expected vsock:CID:PORT"),
            ("vsock:-1:5", "CID"),
            ("vsock:0x10:5", "CID"),
            ("vsock:4294967296:5", "CID"),
            ("vsock:3: 5", "port"),
            ("tcp:host", "expected tcp:HOST:PORT"),
            ("tcp::80", "host is empty"),
            ("tcp:host:-1", "0 to 65535"),
            ("tcp:host:65536", "0 to 65535"),
            ("tcp:::1:80", "brackets"),
            ("tcp:[nothex]:80", "IPv6 literal"),
            ("tcp:a b:80", "characters"),
        ];
        for (input, why) in cases {
            let err = input.parse::<Address>().unwrap_err();
            assert!(err.to_string().contains(why), "{input:?}: {err}");
            assert_eq!(err.code(), "E-PROTO-ADDRESS");
        }
    }

    proptest! {
        #[test]
        fn display_round_trips(cid in any::<u32>(), port in any::<u32>(), tport in 1u16.., v6 in any::<bool>()) {
            let vs = Address::Vsock { cid, port };
            prop_assert_eq!(vs.to_string().parse::<Address>().unwrap(), vs);
            let host = if v6 { "fe80::1".to_string() } else { "10.0.0.1".to_string() };
            let tcp = Address::Tcp { host, port: tport };
            prop_assert_eq!(tcp.to_string().parse::<Address>().unwrap(), tcp);
        }

        #[test]
        fn never_panics(s in ".{0,64}") {
            let _ = s.parse::<Address>();
        }
    }
}
