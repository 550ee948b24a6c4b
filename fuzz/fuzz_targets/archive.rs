//! The archive inventory on arbitrary bytes (body: `sensorium_ingest::fuzzing::archive`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("sensorium-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    sensorium_ingest::fuzzing::archive(&dir, data);
});
