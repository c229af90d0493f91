//! Enclave images (.cimg): parse, signature, measurements.
#![no_main]

use cloister_image::Image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = Image::parse(data) {
        let _ = image.verify_signature();
        let _ = image.measurements(None, Some("role"), Some("i-1"));
    }
});
