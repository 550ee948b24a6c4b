//! `trial_table`: per-trial `(channels, frames)` arrays as one long Parquet table, one row per
//! (trial, frame) in trial-axis order, one column per channel; per-trial `(channels,)` arrays
//! (no frame axis) as one row per trial. Written a window of trials at a time, so memory does
//! not grow with the number of trials.

use std::path::Path;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_array::{ArrayRef, Int32Array};
use arrow_schema::{Field, Schema, SchemaRef};
use rayon::prelude::*;

use arrow_schema::DataType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::kind::{self, ConfigProblem, Description, PlanContext, StageKind, StageNeed};
use super::registry::Stage;
use super::{read_planned, window_len, EntryRecord, StageContext, StageResult};
use crate::error::{Error, Result};
use crate::npy;
use crate::pipeline::plan::{trial_number, trial_plan, ArrayEntry, Plan, TrialPlan};
use crate::pipeline::spec::Compression;
use crate::source::{EntryReader, Source};
use crate::validate;
use crate::writers::parquet::{arrow_type, numeric_column, TableWriter};

/// Per-trial `(channels, frames)` arrays written as a long table, one row per (trial, frame);
/// or per-trial `(channels,)` arrays, one row per trial, when there is no `frame_column`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrialTableConfig {
    /// Unique name of the stage, used in messages, the manifest and `derived`.
    pub id: String,
    pub source: String,
    pub output: String,
    /// Column name of the trial number.
    pub trial_column: String,
    /// Column name of the frame index; leave it out for trials without a frame axis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_column: Option<String>,
    /// One column name per row of the source's first axis.
    pub columns: Vec<String>,
    pub compression: Compression,
}

/// Trials per record batch.
pub(crate) const TRIALS_PER_BATCH: usize = 16;

pub fn run(ctx: &StageContext, plan: &TrialPlan<TrialTableConfig>) -> Result<StageResult> {
    let c = plan.config;
    let schema = schema(plan)?;
    let path = ctx.dataset_dir.join(&c.output);
    let mut writer = TableWriter::create(&path, schema.clone(), &c.compression, ctx.provenance)?;
    let batches: Vec<usize> = (0..plan.trials.len().div_ceil(TRIALS_PER_BATCH)).collect();
    let mut result = StageResult::default();
    // Batches are made in parallel a window at a time, and written in order.
    for window in batches.chunks(window_len()) {
        let done: Vec<Result<(RecordBatch, Vec<EntryRecord>)>> = window
            .par_iter()
            .map_init(
                || ctx.source.reader(),
                |reader, &b| {
                    let reader = reader.as_mut().map_err(|e| {
                        Error::Internal(format!("cannot open a source reader: {e}"))
                    })?;
                    record_batch(ctx, plan, &schema, reader.as_mut(), b)
                },
            )
            .collect();
        for r in done {
            let (batch, records) = r?;
            writer.write(&batch)?;
            result.entries.extend(records);
        }
    }
    writer.finish()?;
    let (channels, frames) = channels_and_frames(plan);
    result.bytes = plan.trials.len() as u64 * (channels * frames * plan.dtype.size) as u64;
    Ok(result)
}

/// The trial column, the frame column where there is one, then one column per channel.
fn schema(plan: &TrialPlan<TrialTableConfig>) -> Result<SchemaRef> {
    let c = plan.config;
    let value_type = arrow_type(plan.dtype)
        .ok_or_else(|| Error::Internal(format!("dtype {} has no table form", plan.dtype)))?;
    let mut fields = vec![Field::new(
        &c.trial_column,
        arrow_schema::DataType::Int32,
        false,
    )];
    fields.extend(
        c.frame_column
            .iter()
            .map(|f| Field::new(f, arrow_schema::DataType::Int32, false)),
    );
    fields.extend(
        c.columns
            .iter()
            .map(|name| Field::new(name, value_type.clone(), false)),
    );
    Ok(Arc::new(Schema::new(fields)))
}

/// A trial's `(channels, frames)`. Without a frame axis a trial is one row: the same layout
/// with one frame.
fn channels_and_frames(plan: &TrialPlan<TrialTableConfig>) -> (usize, usize) {
    let channels = plan.trial_shape[0] as usize;
    let frames = plan.trial_shape.get(1).map_or(1, |&f| f as usize);
    (channels, frames)
}

/// Batch `b`: its `TRIALS_PER_BATCH` trials' rows, and the entries it read.
fn record_batch(
    ctx: &StageContext,
    plan: &TrialPlan<TrialTableConfig>,
    schema: &SchemaRef,
    reader: &mut dyn EntryReader,
    b: usize,
) -> Result<(RecordBatch, Vec<EntryRecord>)> {
    let (channels, frames) = channels_and_frames(plan);
    let first = b * TRIALS_PER_BATCH;
    let trials = &plan.trials[first..(first + TRIALS_PER_BATCH).min(plan.trials.len())];
    let mut ids = Vec::with_capacity(trials.len() * frames);
    let mut frame_index = Vec::with_capacity(trials.len() * frames);
    // Channel-major per trial: transpose (channels, frames) into one column per channel.
    let mut per_channel: Vec<Vec<u8>> =
        vec![Vec::with_capacity(trials.len() * frames * plan.dtype.size); channels];
    let mut records = Vec::with_capacity(trials.len());
    for (k, planned) in trials.iter().enumerate() {
        let (header, bytes, hash) = read_planned(ctx.source, reader, planned)?;
        let le = npy::to_little_endian_c(&header, &bytes[header.payload_offset..]);
        let row_bytes = frames * plan.dtype.size;
        for (ch, column) in per_channel.iter_mut().enumerate() {
            column.extend_from_slice(&le[ch * row_bytes..(ch + 1) * row_bytes]);
        }
        let id = ctx.plan.trial_ids[first + k] as i32;
        ids.extend(std::iter::repeat_n(id, frames));
        frame_index.extend(0..frames as i32);
        records.push(EntryRecord {
            entry: planned.entry,
            blake3: hash,
            output: plan.config.output.clone(),
            values_blake3: None,
            index: Some((first + k) as u64),
        });
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(Int32Array::from(ids))];
    if plan.config.frame_column.is_some() {
        columns.push(Arc::new(Int32Array::from(frame_index)));
    }
    for column in &per_channel {
        columns.push(numeric_column(plan.dtype, column, 0, 1)?);
    }
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok((batch, records))
}

impl StageKind for TrialTableConfig {
    const KIND: &'static str = "trial_table";
    type Plan<'p> = TrialPlan<'p, TrialTableConfig>;

    fn id(&self) -> &str {
        &self.id
    }
    fn source(&self) -> &str {
        &self.source
    }
    fn output(&self) -> &str {
        &self.output
    }

    fn check(&self, _earlier: &[Stage]) -> std::result::Result<(), ConfigProblem> {
        kind::check_table_output(&self.output)?;
        let mut names = vec![&self.trial_column];
        names.extend(self.frame_column.iter());
        names.extend(self.columns.iter());
        kind::check_column_names(&names)?;
        kind::check_codec(&self.compression, true)
    }

    fn has_frame_axis(&self) -> bool {
        self.frame_column.is_some()
    }

    fn claims(&self, rest: &str) -> bool {
        trial_number(rest).is_some()
    }

    fn plan<'p>(
        &'p self,
        entries: Vec<ArrayEntry>,
        ctx: &mut PlanContext,
    ) -> Result<Self::Plan<'p>> {
        let p = trial_plan(ctx, self, &self.source, &self.id, entries)?;
        let rank = if self.frame_column.is_some() { 2 } else { 1 };
        if p.trial_shape.len() != rank || p.trial_shape[0] != self.columns.len() as u64 {
            let expected = match self.frame_column {
                Some(_) => format!("({}, frames)", self.columns.len()),
                None => format!("({},)", self.columns.len()),
            };
            return Err(Error::bad_input(
                format!("{}: {}", ctx.source.path.display(), self.source),
                format!("trials have shape {:?}; stage {} expects {expected}, one row per column {:?}", p.trial_shape, self.id, self.columns),
                "fix `columns` in the pipeline (and `frame_column`: set for (columns, frames) trials, left out for (columns,) ones), or check the source",
            ));
        }
        if let Some(frame) = &self.frame_column {
            ctx.dims
                .add(frame, p.trial_shape[1], &self.source, ctx.source)?;
        }
        Ok(p)
    }

    fn zarr_arrays(_plan: &Self::Plan<'_>) -> Vec<String> {
        Vec::new()
    }

    fn memory(plan: &Self::Plan<'_>, source: &Source, _pipeline_file: &str) -> Result<StageNeed> {
        // Two batches per thread in flight (`window_len`), each as columns and as a record
        // batch; the writer keeps a row group of the whole table at most.
        let batch = TRIALS_PER_BATCH as u64;
        let entry = kind::largest_entry(source, plan.trials.iter());
        let total = entry.saturating_mul(plan.trials.len() as u64);
        Ok(StageNeed {
            fixed: total.saturating_mul(2),
            per_thread: entry.saturating_mul(batch * 2 * 2),
            per_helping_thread: 0,
            items: plan.trials.len().div_ceil(TRIALS_PER_BATCH),
        })
    }

    fn run(ctx: &StageContext, plan: &Self::Plan<'_>) -> Result<StageResult> {
        run(ctx, plan)
    }

    fn check_output(dir: &Path, _plan: &Plan, p: &Self::Plan<'_>) -> Result<()> {
        let c = p.config;
        let value = arrow_type(p.dtype).unwrap_or(DataType::Null);
        let mut columns = vec![(c.trial_column.clone(), DataType::Int32)];
        columns.extend(c.frame_column.iter().map(|f| (f.clone(), DataType::Int32)));
        columns.extend(c.columns.iter().map(|n| (n.clone(), value.clone())));
        let frames = p.trial_shape.get(1).copied().unwrap_or(1);
        validate::check_parquet(
            &dir.join(&c.output),
            &columns,
            p.trials.len() as u64 * frames,
        )
    }

    fn describe(_source: &Source, plan: &Self::Plan<'_>) -> Result<Description> {
        let c = plan.config;
        Ok(Description {
            variable: Some(kind::variable(
                &c.id,
                &c.source,
                plan.dtype.to_string(),
                &plan.trials,
                &plan.trial_shape,
            )),
            ..Description::default()
        })
    }
}
