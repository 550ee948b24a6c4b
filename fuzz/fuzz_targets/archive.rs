//! The archive inventory on arbitrary bytes: open the bytes as a zip source, list it, read every
//! entry whole and as an npy header. Errors are fine; panics, hangs and huge allocations are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorium_ingest::source::{read_npy, read_npy_header, Source};

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("sensorium-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
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
        let _ = reader.read(entry);
        let _ = read_npy_header(&source, reader.as_mut(), entry);
        let _ = read_npy(&source, reader.as_mut(), entry);
    }
});
