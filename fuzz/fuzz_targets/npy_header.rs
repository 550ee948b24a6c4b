//! The npy header parser on arbitrary bytes (body: `sensorium_ingest::fuzzing::npy_header`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sensorium_ingest::fuzzing::npy_header(data));
