//! The broker's wire messages: a signed request and its payload (what any
//! client or the proxy sends), and a signed response (what the runtime reads).
#![no_main]

use cloister_kms_api::protocol::{RequestPayload, Response, SignedRequest, SignedResponse};
use cloister_proto::frame::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = decode::<SignedRequest>(data) {
        let _ = decode::<RequestPayload>(&signed.payload);
    }
    let _ = decode::<RequestPayload>(data);
    let _ = decode::<Response>(data);
    if let Ok(signed) = decode::<SignedResponse>(data) {
        let key = ed25519_key();
        let _ = signed.verify(&key);
    }
});

fn ed25519_key() -> ed25519_dalek::VerifyingKey {
    ed25519_dalek::VerifyingKey::from_bytes(&[
        0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64, 0x07,
        0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68, 0xf7, 0x07,
        0x51, 0x1a,
    ])
    .expect("RFC 8032 test key 1")
}
