//! The runtime binary on its own: it serves only a supervisor. Started by hand
//! (no boot message, or a malformed one) it refuses clearly and exits non-zero.
//! (These tests also make `cargo test` build the binary that the end-to-end
//! tests' supervisors launch.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

fn runtime(stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloister-runtime"))
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn without_a_supervisor_it_refuses_to_start() {
    let out = runtime(b"");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no boot message from the supervisor"), "{err}");
}

#[test]
fn a_malformed_or_oversized_boot_frame_is_refused() {
    // Wrong protocol version.
    let err = runtime(b"\x09\0\0\0\x01x");
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("version"));
    // A length over the channel's cap: refused before anything is allocated.
    let out = runtime(b"\x01\xff\xff\xff\xff");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exceeds the limit"));
    // A frame that is not a boot message.
    let out = runtime(b"\x01\0\0\0\x01\xf6");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("malformed"));
}
