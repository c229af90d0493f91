//! Sealed files (header, key commitment, chunks) opened with a fixed data key,
//! and the named parts of a request.
#![no_main]

use cloister_sealed::{DataKey, Header, Reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cloister_sealed::parts::Parts::decode(data);
    let mut input = data;
    let Ok(header) = Header::read(&mut input) else {
        return;
    };
    let key = DataKey::new(zeroize::Zeroizing::new(vec![0u8; 32])).expect("32 bytes");
    if let Ok(mut reader) = Reader::new(header, input, &key) {
        let _ = reader.for_each_line(|_| Ok(()));
    }
});
