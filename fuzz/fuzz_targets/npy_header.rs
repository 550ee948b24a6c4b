//! The npy header parser on arbitrary bytes: never panics, never promises a payload that does not
//! fit the bytes it was checked against.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorium_ingest::npy;

fuzz_target!(|data: &[u8]| {
    let _ = npy::header_end(data);
    if let Ok(header) = npy::parse_header(data) {
        assert!(header.payload_offset <= data.len());
        if header.check_file_len(data.len() as u64).is_ok() {
            let payload = &data[header.payload_offset..];
            assert_eq!(Some(payload.len() as u64), header.payload_len());
            if !header.dtype.is_numeric() {
                let _ = npy::decode_strings(&header, payload);
            }
        }
    }
});
