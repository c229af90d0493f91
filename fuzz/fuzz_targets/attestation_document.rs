//! Attestation document decode and verification, against the AWS Nitro root at
//! the real document's own time (so mutations of the seed reach the chain and
//! signature checks).
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use cloister_attestation::document::UnverifiedDocument;
use cloister_attestation::verify::{TrustAnchor, VerifyOptions, verify};
use libfuzzer_sys::fuzz_target;

fn options() -> &'static VerifyOptions {
    static OPTIONS: OnceLock<VerifyOptions> = OnceLock::new();
    OPTIONS.get_or_init(|| VerifyOptions {
        anchors: vec![TrustAnchor::aws_nitro()],
        at: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_722_457_107_047)),
        max_age: Some(Duration::from_secs(300)),
        ..Default::default()
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = UnverifiedDocument::parse(data);
    let _ = verify(data, options());
});
