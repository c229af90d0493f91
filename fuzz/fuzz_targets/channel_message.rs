//! What reaches the attested channel from the parent's side: encapsulated
//! requests for the gateway (opened with a fixed key), the Binary HTTP inside,
//! and, for clients, key configurations and Binary HTTP responses.
#![no_main]

use std::sync::OnceLock;

use cloister_channel::encapsulation::{Aes256Gcm, KeyConfig, KeyPair};
use cloister_channel::message;
use libfuzzer_sys::fuzz_target;

/// The gateway key of the seeds (`fuzz/corpus/channel_message/seed-*`).
fn key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| KeyPair::from_private(0, &[1u8; 32]).expect("a valid X25519 key"))
}

fuzz_target!(|data: &[u8]| {
    let _ = KeyConfig::decode::<Aes256Gcm>(data);
    let _ = message::request_body(data);
    let _ = message::response_body(data);
    if let Ok((request, _)) = key().open_request::<Aes256Gcm>(data) {
        let _ = message::request_body(&request);
    }
});
