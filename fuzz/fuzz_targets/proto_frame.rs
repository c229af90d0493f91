//! Length-prefixed frames read from a stream (every Cloister connection), and
//! the CBOR inside them.
#![no_main]

use cloister_proto::frame::{decode, read_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut stream = data;
        while let Ok(Some(frame)) = read_frame(&mut stream, 64 * 1024).await {
            let _ = decode::<ciborium::Value>(&frame);
        }
    });
});
