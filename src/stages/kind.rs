//! The stage-kind contract: everything the rest of the program needs from a kind of stage, so
//! that the planner, the executor, `inspect` and `verify` never ask which kind a stage is.
//!
//! A kind is one file in `src/stages/` with a config type (its keys in the pipeline file) that
//! implements [`StageKind`], plus one line in `registry.rs`. See docs/architecture.md, "Adding a
//! stage kind".

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Serialize;

use super::registry::Stage;
use super::{Measure, StageContext, StageResult};
use crate::error::{Error, Result};
use crate::npy::{Dtype, Header};
use crate::pipeline::plan::{ArrayEntry, Dims, Plan};
use crate::pipeline::spec::HINT;
use crate::source::Source;
use crate::writers::codec::{Codec, Compression};

/// A setting the pipeline file cannot have: what is wrong, and what to do.
pub struct ConfigProblem {
    pub problem: String,
    pub hint: String,
}

impl ConfigProblem {
    pub fn new(problem: impl Into<String>, hint: impl Into<String>) -> ConfigProblem {
        ConfigProblem {
            problem: problem.into(),
            hint: hint.into(),
        }
    }
}

/// What a kind's plan may read and update: the source, the dataset's named dimensions, and the
/// trial axis (the first per-trial stage sets it, every later one must hold the same trials).
pub struct PlanContext<'a> {
    pub source: &'a Source,
    pub dims: &'a mut Dims,
    /// Trial numbers in numeric order, with the folder they were first read from.
    pub trial_ids: &'a mut Option<(Vec<u32>, String)>,
}

/// One stage's memory: `fixed + per_thread * min(threads, items)`, plus `per_helping_thread`
/// per thread from 2 threads on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageNeed {
    pub fixed: u64,
    pub per_thread: u64,
    /// More per thread when threads share items (a thread helping with another's shard holds
    /// that shard's unit too): counted from 2 threads on.
    pub per_helping_thread: u64,
    /// Items the stage hands to threads: more threads than this hold no more buffers.
    pub items: usize,
}

/// What `inspect` shows of a stage's plan.
#[derive(Debug, Default, Serialize)]
pub struct Description {
    /// A per-trial variable.
    pub variable: Option<Variable>,
    /// Valid-frame length -> number of trials, where the stage measures it.
    pub valid_frames: BTreeMap<u64, usize>,
    /// One line per statistic: `var/subset/stat dtype shape`.
    pub statistics: Vec<String>,
    /// One line per meta file: `path dtype shape`.
    pub meta_files: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Variable {
    pub stage: String,
    pub source: String,
    pub dtype: String,
    pub trial_shape: Vec<u64>,
    pub fortran_order: bool,
}

/// A kind of stage. Implemented by the kind's config type; the plan is what the kind makes of
/// the config for one source, checked before anything is written.
pub trait StageKind: Sized {
    /// The kind's name in pipeline files (`kind: trial_array`).
    const KIND: &'static str;
    type Plan<'p>: std::fmt::Debug + Clone
    where
        Self: 'p;

    fn id(&self) -> &str;
    /// The source folder it reads.
    fn source(&self) -> &str;
    /// What it writes, relative to the dataset folder.
    fn output(&self) -> &str;

    /// Checks of the kind's own settings, after the ones every stage gets. `earlier` are the
    /// stages listed before it (the only ones whose measures it may read).
    fn check(&self, earlier: &[Stage]) -> std::result::Result<(), ConfigProblem>;
    /// Whether the stage has a frame axis (the pipeline then needs `frame_rate_hz`).
    fn has_frame_axis(&self) -> bool {
        false
    }
    /// Per-trial facts it computes for later stages.
    fn measures(&self) -> &[Measure] {
        &[]
    }
    /// Measures of earlier stages it reads, as `(stage id, measure)`.
    fn reads(&self) -> Vec<(String, Measure)> {
        Vec::new()
    }

    /// Whether the entry at `rest`, its path below [`StageKind::source`], is this stage's.
    fn claims(&self, rest: &str) -> bool;
    /// Globs over claimed entries (`rest` without `.npy`) left out on purpose, recorded as
    /// skipped.
    fn excludes(&self) -> &[String] {
        &[]
    }
    /// The plan for one source, from the headers of the entries it claimed.
    fn plan<'p>(
        &'p self,
        entries: Vec<ArrayEntry>,
        ctx: &mut PlanContext,
    ) -> Result<Self::Plan<'p>>;
    /// The Zarr arrays it writes, relative to its output (`""`: the output is the array);
    /// empty for a stage that writes no Zarr array.
    fn zarr_arrays(plan: &Self::Plan<'_>) -> Vec<String>;

    /// The dtype of the per-trial values it stores as an array, if it does (the dataset's dtype
    /// in the catalog and in `inspect`).
    fn trial_dtype(_plan: &Self::Plan<'_>) -> Option<Dtype> {
        None
    }

    /// Its memory, from the plan.
    fn memory(plan: &Self::Plan<'_>, source: &Source, pipeline_file: &str) -> Result<StageNeed>;

    /// Runs the stage whole.
    fn run(ctx: &StageContext, plan: &Self::Plan<'_>) -> Result<StageResult>;
    /// Whether `--shard` tasks run it, each a part of the trials; the other kinds run whole in
    /// `finalize`.
    const RUNS_IN_PARTS: bool = false;
    /// The trials a `--shard` task converts together (whole shards), when it runs in parts.
    fn part_block(_plan: &Self::Plan<'_>, _pipeline_file: &str) -> Result<Option<usize>> {
        Ok(None)
    }
    /// Runs the trials `part` of the stage (a `--shard` task), writing only files no other
    /// part writes.
    fn run_part(
        _ctx: &StageContext,
        _plan: &Self::Plan<'_>,
        _part: Range<usize>,
    ) -> Result<StageResult> {
        Err(Error::Internal(format!(
            "{} stages do not run in parts",
            Self::KIND
        )))
    }
    /// Writes what the parts leave to the end (an array's metadata); returns those files.
    fn finish_parts(_ctx: &StageContext, _plan: &Self::Plan<'_>) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Reads back what it wrote (under `dir`) and compares it with the plan.
    fn check_output(dir: &Path, plan: &Plan, stage_plan: &Self::Plan<'_>) -> Result<()>;

    /// What `inspect` shows of it. May read entries (the valid-frame lengths).
    fn describe(source: &Source, plan: &Self::Plan<'_>) -> Result<Description>;
}

/// A per-trial variable as `inspect` shows it.
pub(crate) fn variable(
    id: &str,
    source: &str,
    dtype: String,
    trials: &[ArrayEntry],
    trial_shape: &[u64],
) -> Variable {
    Variable {
        stage: id.into(),
        source: source.into(),
        dtype,
        trial_shape: trial_shape.to_vec(),
        fortran_order: trials.iter().any(|a| a.header.fortran_order),
    }
}

/// `name dtype shape`, as `inspect` lists single arrays.
pub(crate) fn header_line(name: &str, header: &Header) -> String {
    format!("{name} {} {:?}", header.dtype, header.shape)
}

/// The largest of these entries, in bytes as stored, for memory estimates.
pub(crate) fn largest_entry<'a>(
    source: &Source,
    entries: impl Iterator<Item = &'a ArrayEntry>,
) -> u64 {
    entries
        .map(|e| source.entries.get(e.entry).map_or(0, |e| e.size))
        .max()
        .unwrap_or(0)
}

/// A table stage's output is a Parquet file.
pub(crate) fn check_table_output(output: &str) -> std::result::Result<(), ConfigProblem> {
    match output.ends_with(".parquet") {
        true => Ok(()),
        false => Err(ConfigProblem::new(
            format!("output {output:?} must end in .parquet"),
            HINT,
        )),
    }
}

/// Column names of a table: none empty, none twice.
pub(crate) fn check_column_names(names: &[&String]) -> std::result::Result<(), ConfigProblem> {
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        if n.is_empty() {
            return Err(ConfigProblem::new("column names must not be empty", HINT));
        }
        if !seen.insert(n.as_str()) {
            return Err(ConfigProblem::new(
                format!("column {n:?} appears twice"),
                HINT,
            ));
        }
    }
    Ok(())
}

/// Checks a stage's compression; `table` for Parquet outputs, which have no blosc.
pub(crate) fn check_codec(c: &Compression, table: bool) -> std::result::Result<(), ConfigProblem> {
    let problem = |p: String| Err(ConfigProblem::new(p, HINT));
    if c.codec.is_blosc() && table {
        return problem(
            "blosc codecs are for Zarr arrays; Parquet tables take `zstd`, `gzip` or `none`".into(),
        );
    }
    if c.shuffle.is_some() && !c.codec.is_blosc() {
        return problem("`shuffle` applies to the blosc codecs only".into());
    }
    match (c.codec, c.level) {
        (Codec::Zstd, Some(l)) if !(-7..=22).contains(&l) => {
            problem(format!("zstd level {l} is outside -7..=22"))
        }
        (Codec::Gzip, Some(l)) if !(0..=9).contains(&l) => {
            problem(format!("gzip level {l} is outside 0..=9"))
        }
        (Codec::BloscLz4 | Codec::BloscZstd, Some(l)) if !(0..=9).contains(&l) => {
            problem(format!("blosc level {l} is outside 0..=9"))
        }
        (Codec::None, Some(_)) => problem("codec `none` takes no level".into()),
        _ => Ok(()),
    }
}
