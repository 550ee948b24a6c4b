//! Stage kinds: one module per kind (its config, plan, memory need, run, output check and
//! description), the contract they share (`kind`) and the registry that lists them. A stage
//! takes its checked plan and the shared context, writes its outputs into the dataset's staging
//! folder and reports every source entry it read.

pub mod kind;
pub mod meta_table;
pub mod registry;
pub mod statistics;
pub mod trial_array;
pub mod trial_table;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::npy::Header;
use crate::pipeline::plan::{ArrayEntry, Plan};
use crate::pipeline::spec::Pipeline;
use crate::source::{checked_header, read_npy, EntryReader, Source};
use crate::writers::output_store::WriteLog;
use crate::writers::zarr::ZarrPath;
use crate::writers::Provenance;

/// A per-trial fact a stage computes while copying, for later stages to read.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Frames before the trailing frames in which every value is NaN (int32).
    ValidFrames,
    /// Every value of the trial is zero (bool).
    AllZero,
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Measure::ValidFrames => "valid_frames",
            Measure::AllZero => "all_zero",
        })
    }
}

/// What every stage sees.
pub struct StageContext<'a> {
    pub source: &'a Source,
    pub pipeline: &'a Pipeline,
    pub plan: &'a Plan<'a>,
    /// The dataset's staging folder; outputs are paths inside it.
    pub dataset_dir: &'a Path,
    pub provenance: &'a Provenance,
    /// Measures computed by earlier stages, by (stage id, measure).
    pub measures: &'a BTreeMap<(String, Measure), MeasureValues>,
    /// The pipeline file's name, for errors about settings that only the data reveals.
    pub pipeline_file: &'a str,
    /// How Zarr objects are written, and where their sizes and hashes are logged.
    pub writes: &'a Arc<WriteLog>,
}

/// Per-trial facts computed while copying trials, in trial-axis order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeasureValues {
    Int32(Vec<i32>),
    Bool(Vec<bool>),
}

/// One source entry read by a stage.
#[derive(Debug, Clone)]
pub struct EntryRecord {
    /// Index into `Source::entries`.
    pub entry: usize,
    /// BLAKE3 of the entry's bytes as stored in the source.
    pub blake3: String,
    /// The output it went to (a Zarr array or a table, relative to the dataset folder).
    pub output: String,
    /// BLAKE3 of the decoded values (little endian, C order) as stored in a Zarr array:
    /// `verify` decodes the array and compares.
    pub values_blake3: Option<String>,
    /// Position on the output's trial axis, for per-trial entries.
    pub index: Option<u64>,
}

#[derive(Debug, Default)]
pub struct StageResult {
    pub entries: Vec<EntryRecord>,
    pub measures: Vec<(Measure, MeasureValues)>,
    /// Decoded payload bytes handled, for throughput figures.
    pub bytes: u64,
    /// Files written, relative to the dataset folder, where the stage lists them (the shard
    /// files of a sharded run's part).
    pub written: Vec<String>,
}

/// Reads an entry the plan has checked, verifies it still matches the planned header, and
/// returns the header, whole file bytes and its BLAKE3.
pub(crate) fn read_planned(
    source: &Source,
    reader: &mut dyn EntryReader,
    planned: &ArrayEntry,
) -> Result<(Header, Vec<u8>, String)> {
    crate::interrupt::check()?;
    let entry = &source.entries[planned.entry];
    let (header, bytes) = read_npy(source, reader, entry)?;
    if header != planned.header {
        return Err(Error::bad_input(
            source.locate(entry),
            "the entry changed between reading its header and reading its data",
            "the source is being modified while converting; wait until it is complete and run again",
        ));
    }
    let hash = blake3::hash(&bytes).to_hex().to_string();
    crate::progress::entry_read(entry.size);
    Ok((header, bytes, hash))
}

/// What `read_planned_into` read: the entry's BLAKE3 (as `read_planned`) and the BLAKE3 of its
/// payload alone.
pub(crate) struct ReadInto {
    pub blake3: String,
    pub payload_blake3: String,
}

/// `read_planned` for an entry the caller places itself: reads the whole entry (header, then
/// payload) straight into `whole`, which must be exactly the entry's size, so a payload lands
/// where the caller wants it without an intermediate copy. The same checks as `read_planned`:
/// size and CRC-32 (by the reader), header against the entry's size and against the plan.
pub(crate) fn read_planned_into(
    source: &Source,
    reader: &mut dyn EntryReader,
    planned: &ArrayEntry,
    whole: &mut [u8],
) -> Result<ReadInto> {
    crate::interrupt::check()?;
    let entry = &source.entries[planned.entry];
    let offset = planned.header.payload_offset;
    let payload_len = (whole.len() as u64).checked_sub(offset as u64);
    if whole.len() as u64 != entry.size
        || payload_len.is_none()
        || planned.header.payload_len() != payload_len
    {
        return Err(Error::Internal(format!(
            "{}: asked to read {} bytes, the plan expects a {offset}-byte header and {:?} payload bytes in {} bytes",
            source.locate(entry),
            whole.len(),
            planned.header.payload_len(),
            entry.size
        )));
    }
    reader.read_exact_into(entry, whole)?;
    let header = checked_header(source, entry, &whole[..offset], entry.size)?;
    if header != planned.header {
        return Err(Error::bad_input(
            source.locate(entry),
            "the entry changed between reading its header and reading its data",
            "the source is being modified while converting; wait until it is complete and run again",
        ));
    }
    // Both hashes in one pass, piece by piece, so each piece is read from memory once.
    let mut all = blake3::Hasher::new();
    let mut payload = blake3::Hasher::new();
    all.update(&whole[..offset]);
    for piece in whole[offset..].chunks(HASH_PIECE_LEN) {
        all.update(piece);
        payload.update(piece);
    }
    crate::progress::entry_read(entry.size);
    Ok(ReadInto {
        blake3: all.finalize().to_hex().to_string(),
        payload_blake3: payload.finalize().to_hex().to_string(),
    })
}

/// Pieces hashed by both hashers in turn: small enough to stay in a core's L2 cache.
const HASH_PIECE_LEN: usize = 128 << 10;

/// How many items to hand to the thread pool at once: enough to keep every thread busy,
/// few enough that memory stays bounded whatever the number of trials.
pub(crate) fn window_len() -> usize {
    rayon::current_num_threads() * 2
}

/// The Zarr store and node of a stage's output; the pipeline's check has made sure it has one.
pub(crate) fn zarr_output(output: &str) -> Result<ZarrPath> {
    ZarrPath::parse(output)
        .ok_or_else(|| Error::Internal(format!("output {output:?} is not inside a `.zarr` store")))
}
