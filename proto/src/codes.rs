//! Stable error codes.
//!
//! Every typed error in Cloister maps to a code such as `E-PROTO-FRAME-TOO-LARGE`.
//! Codes never change meaning once published; `cloister explain CODE` prints the
//! [`CodeInfo`] registered for it. Each crate exports its own table and the CLI
//! concatenates them.

/// An error with a stable, documented code.
pub trait ErrorCode {
    /// The stable code, e.g. `E-PROTO-ADDRESS`.
    fn code(&self) -> &'static str;
}

/// What `cloister explain` says about one code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeInfo {
    pub code: &'static str,
    pub summary: &'static str,
    pub explanation: &'static str,
}

/// The codes of this crate.
pub const CODES: &[CodeInfo] = &[
    CodeInfo {
        code: "E-PROTO-ADDRESS",
        summary: "an address could not be parsed",
        explanation: "Addresses are written `vsock:CID:PORT` (CID and PORT are unsigned 32-bit \
            integers), `unix:PATH` (a filesystem path to a Unix socket) or `tcp:HOST:PORT` \
            (a host name or IP literal, IPv6 in brackets, and a port (0 lets a listener take any free one)). Check the \
            scheme and the numbers.",
    },
    CodeInfo {
        code: "E-PROTO-CONNECT",
        summary: "a connection could not be made",
        explanation: "Nothing accepted the connection at that address: the server is not \
            running, the Unix socket path is wrong, or a firewall or namespace is in the way.",
    },
    CodeInfo {
        code: "E-PROTO-LISTEN",
        summary: "a listener could not be opened",
        explanation: "The address is in use by a live listener, or the process may not bind \
            it (permissions, or vsock is not available on this kernel).",
    },
    CodeInfo {
        code: "E-PROTO-VSOCK-UNAVAILABLE",
        summary: "vsock is not available here",
        explanation: "The kernel has no vsock transport the address needs. Use a `unix:` \
            address on a machine without vsock.",
    },
    CodeInfo {
        code: "E-PROTO-IO",
        summary: "the connection failed while reading or writing",
        explanation: "The peer closed the connection, or the operating system reported an \
            I/O error on the socket.",
    },
    CodeInfo {
        code: "E-PROTO-FRAME-TOO-LARGE",
        summary: "a frame is larger than the limit",
        explanation: "Each frame carries a 4-byte length; a length above the receiver's hard \
            cap is refused before any memory is allocated and the connection is closed.",
    },
    CodeInfo {
        code: "E-PROTO-FRAME-VERSION",
        summary: "a frame has an unsupported protocol version",
        explanation: "The peer speaks a different version of the Cloister wire protocol. \
            Upgrade the older side.",
    },
    CodeInfo {
        code: "E-PROTO-FRAME-TRUNCATED",
        summary: "the connection ended in the middle of a frame",
        explanation: "The peer closed the connection after sending part of a frame; \
            nothing of the partial frame is used.",
    },
    CodeInfo {
        code: "E-PROTO-MESSAGE",
        summary: "a message could not be encoded or decoded",
        explanation: "A frame's payload is not the CBOR message the receiver expects: a \
            field is missing or of the wrong type, or bytes follow the message.",
    },
];

/// Looks a code up in a list of tables (case-insensitive).
pub fn lookup<'a>(tables: &[&'a [CodeInfo]], code: &str) -> Option<&'a CodeInfo> {
    tables
        .iter()
        .flat_map(|t| t.iter())
        .find(|info| info.code.eq_ignore_ascii_case(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for info in CODES {
            assert!(info.code.starts_with("E-PROTO-"), "{}", info.code);
            assert!(seen.insert(info.code), "duplicate {}", info.code);
            assert!(!info.summary.is_empty() && !info.explanation.is_empty());
        }
    }

    #[test]
    fn lookup_is_case_insensitive_and_misses_cleanly() {
        assert_eq!(
            lookup(&[CODES], "e-proto-address").map(|i| i.code),
            Some("E-PROTO-ADDRESS")
        );
        assert!(lookup(&[CODES], "E-NOPE").is_none());
    }
}
