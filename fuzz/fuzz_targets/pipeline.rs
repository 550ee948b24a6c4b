//! The pipeline parser on arbitrary text (body: `sensorium_ingest::fuzzing::pipeline`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        sensorium_ingest::fuzzing::pipeline(text);
    }
});
