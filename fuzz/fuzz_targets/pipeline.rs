//! The pipeline parser (YAML, then the checks) on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorium_ingest::pipeline::spec::Pipeline;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Pipeline::parse(text, "fuzz.yaml");
    }
});
