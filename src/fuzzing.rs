//! The bodies of the fuzz targets, in one place: `fuzz/fuzz_targets/*.rs` (cargo-fuzz, with
//! coverage guidance) and `tests/fuzz_props.rs` (proptest, inside `cargo test`) both call these.
//! Errors are the expected outcome on junk; a panic, a hang or a huge allocation is a bug.

use std::path::Path;

use crate::npy;
use crate::pipeline::spec::Pipeline;
use crate::source::{read_npy, read_npy_header, Source};

/// The npy header parser on arbitrary bytes: never panics, never promises a payload that does
/// not fit the bytes it was checked against.
pub fn npy_header(data: &[u8]) {
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
}

/// The archive inventory on arbitrary bytes, written to `dir/mouse.zip`: open it as a source,
/// list it, read every entry whole, into place (as trials are) and as an npy header. Whole and
/// in-place reads must agree: both succeed with the same bytes, or both fail.
pub fn archive(dir: &Path, data: &[u8]) {
    let path = dir.join("mouse.zip");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(source) = Source::open(&path) else {
        return;
    };
    let Ok(mut reader) = source.reader() else {
        return;
    };
    for entry in &source.entries {
        let whole = reader.read(entry);
        // Whatever this small input holds is small; larger claims are not read into place.
        if entry.size <= 64 << 20 {
            let size = entry.size as usize;
            let mut into = vec![0u8; size];
            let read = reader.read_exact_into(entry, &mut into);
            match (&whole, read) {
                (Ok(bytes), Ok(())) => assert_eq!(bytes, &into),
                (Err(_), Err(_)) => {}
                (whole, read) => panic!(
                    "whole read {:?} but in-place read {:?}",
                    whole.as_ref().map(|b| b.len()),
                    read.err()
                ),
            }
        }
        let _ = read_npy_header(&source, reader.as_mut(), entry);
        let _ = read_npy(&source, reader.as_mut(), entry);
    }
}

/// The pipeline parser (YAML, then the checks) on arbitrary text.
pub fn pipeline(text: &str) {
    let _ = Pipeline::parse(text, "fuzz.yaml");
}
