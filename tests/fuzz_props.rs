//! The three fuzz targets of `fuzz/` (npy header parser, archive inventory, pipeline parser),
//! run briefly inside `cargo test` as property tests: arbitrary bytes and mutations of the seed
//! corpus in `fuzz/corpus/`. Errors are expected; a panic fails the test. For long runs with
//! coverage guidance use `cargo +nightly fuzz run <target>` (docs/fuzzing.md).
//!
//! Case counts stay small so the suite stays fast; `PROPTEST_CASES=100000 cargo test --release
//! --test fuzz_props` runs longer without libFuzzer.

use proptest::prelude::*;
use sensorium_ingest::fuzzing::{archive as archive_target, npy_header as npy_target};
use sensorium_ingest::npy;
use sensorium_ingest::pipeline::spec::DEFAULT_PIPELINE;

const NPY_SEEDS: &[&[u8]] = &[
    include_bytes!("../fuzz/corpus/npy_header/f4-3d.npy"),
    include_bytes!("../fuzz/corpus/npy_header/f8-be-fortran.npy"),
    include_bytes!("../fuzz/corpus/npy_header/U6.npy"),
    include_bytes!("../fuzz/corpus/npy_header/S4.npy"),
    include_bytes!("../fuzz/corpus/npy_header/v3.npy"),
    include_bytes!("../fuzz/corpus/npy_header/scalar.npy"),
];

const ZIP_SEEDS: &[&[u8]] = &[
    include_bytes!("../fuzz/corpus/archive/two-entries.zip"),
    include_bytes!("../fuzz/corpus/archive/tiny-mouse.zip"),
];

/// `PROPTEST_CASES` from the environment when set (long runs), else the suite's small default.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Byte edits applied to a seed: overwrite at positions, then cut.
fn mutate(seed: &[u8], edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut data = seed.to_vec();
    if data.is_empty() {
        return data;
    }
    for &(pos, byte) in edits {
        let at = pos % data.len();
        data[at] = byte;
    }
    if let Some(c) = cut {
        data.truncate(c % (data.len() + 1));
    }
    data
}

fn edits(max: usize) -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>()), 0..max)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(512), ..ProptestConfig::default() })]

    #[test]
    fn npy_header_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..600)) {
        npy_target(&data);
    }

    #[test]
    fn npy_header_arbitrary_after_magic(body in prop::collection::vec(any::<u8>(), 0..300),
                                        version in 0u8..5) {
        let mut data = b"\x93NUMPY".to_vec();
        data.extend([version, 0]);
        data.extend(body);
        npy_target(&data);
    }

    #[test]
    fn npy_header_mutated_seeds(seed in 0..NPY_SEEDS.len(), e in edits(6),
                                cut in prop::option::of(any::<usize>())) {
        npy_target(&mutate(NPY_SEEDS[seed], &e, cut));
    }

    #[test]
    fn npy_header_dict_text(text in "\\{[ -~]{0,120}\\}") {
        // Printable dict-ish headers: the hand-written dict parser's input space.
        let mut header = text.into_bytes();
        header.push(b'\n');
        let mut data = b"\x93NUMPY\x01\x00".to_vec();
        data.extend((header.len() as u16).to_le_bytes());
        data.extend(header);
        npy_target(&data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    #[test]
    fn archive_mutated_seeds(seed in 0..ZIP_SEEDS.len(), e in edits(8),
                             cut in prop::option::of(any::<usize>())) {
        let dir = tempfile::tempdir().expect("temp dir");
        archive_target(dir.path(), &mutate(ZIP_SEEDS[seed], &e, cut));
    }

    #[test]
    fn archive_mutated_tail(seed in 0..ZIP_SEEDS.len(), e in prop::collection::vec((0usize..200, any::<u8>()), 1..8)) {
        // Aim at the central directory and end record, at the end of the file.
        let data = ZIP_SEEDS[seed];
        let e: Vec<(usize, u8)> = e.into_iter().map(|(back, b)| (data.len().saturating_sub(back + 1), b)).collect();
        let dir = tempfile::tempdir().expect("temp dir");
        archive_target(dir.path(), &mutate(data, &e, None));
    }

    #[test]
    fn archive_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut bytes = data;
        // Half the cases end in an end-of-central-directory signature so the parser goes deeper.
        if bytes.len() > 22 && bytes[0] % 2 == 0 {
            let at = bytes.len() - 22;
            bytes[at..at + 4].copy_from_slice(b"PK\x05\x06");
        }
        archive_target(dir.path(), &bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    #[test]
    fn pipeline_arbitrary_text(text in "\\PC{0,300}") {
        sensorium_ingest::fuzzing::pipeline(&text);
    }

    #[test]
    fn pipeline_mutated_default(e in prop::collection::vec((any::<usize>(), "[ -~\\n]{0,3}"), 1..6)) {
        let mut text = DEFAULT_PIPELINE.to_string();
        for (pos, insert) in e {
            let mut at = pos % (text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let end = (at + insert.len()).min(text.len());
            let end = (end..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
            text.replace_range(at..end, &insert);
        }
        sensorium_ingest::fuzzing::pipeline(&text);
    }

    #[test]
    fn pipeline_lines_shuffled(drop in prop::collection::vec(any::<usize>(), 0..6),
                               dup in prop::collection::vec(any::<usize>(), 0..3)) {
        let mut lines: Vec<&str> = DEFAULT_PIPELINE.lines().collect();
        for d in drop {
            if !lines.is_empty() {
                let i = d % lines.len();
                lines.remove(i);
            }
        }
        for d in dup {
            if !lines.is_empty() {
                let i = d % lines.len();
                lines.insert(i, lines[i]);
            }
        }
        sensorium_ingest::fuzzing::pipeline(&lines.join("\n"));
    }
}

/// Crashes found by fuzzing, kept as regression tests.
#[test]
fn regression_non_ascii_descr_in_a_v3_header() {
    // Found by tests/python/test_hostile.py (header-utf8-descr): `Dtype::parse` sliced a str
    // inside a multi-byte character and panicked.
    let header = b"{'descr': '\xc3\xa94', 'fortran_order': False, 'shape': (1,), }\n";
    let mut data = b"\x93NUMPY\x03\x00".to_vec();
    data.extend((header.len() as u32).to_le_bytes());
    data.extend(header);
    data.extend([0; 4]);
    let err = npy::parse_header(&data).expect_err("a non-ASCII descr is refused");
    assert!(err.contains("dtype"), "{err}");
}
