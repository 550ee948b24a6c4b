//! `trial_table`: per-trial `(channels, frames)` arrays as one long Parquet table, one row per
//! (trial, frame) in trial-axis order, one column per channel. Written a window of trials at a
//! time, so memory does not grow with the number of trials.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array};
use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use rayon::prelude::*;

use super::{read_planned, window_len, EntryRecord, StageContext, StageResult};
use crate::error::{Error, Result};
use crate::npy;
use crate::pipeline::plan::TrialPlan;
use crate::pipeline::spec::TrialTableConfig;
use crate::writers::parquet::{arrow_type, numeric_column, TableWriter};

/// Trials per record batch.
pub(crate) const TRIALS_PER_BATCH: usize = 16;

pub fn run(ctx: &StageContext, plan: &TrialPlan<TrialTableConfig>) -> Result<StageResult> {
    let c = plan.config;
    let value_type = arrow_type(plan.dtype)
        .ok_or_else(|| Error::Internal(format!("dtype {} has no table form", plan.dtype)))?;
    let mut fields = vec![
        Field::new(&c.trial_column, arrow::datatypes::DataType::Int32, false),
        Field::new(&c.frame_column, arrow::datatypes::DataType::Int32, false),
    ];
    fields.extend(
        c.columns
            .iter()
            .map(|name| Field::new(name, value_type.clone(), false)),
    );
    let schema = Arc::new(Schema::new(fields));
    let path = ctx.dataset_dir.join(&c.output);
    let mut writer = TableWriter::create(&path, schema.clone(), &c.compression, ctx.provenance)?;
    let (channels, frames) = (plan.trial_shape[0] as usize, plan.trial_shape[1] as usize);
    let trial_ids = &ctx.plan.trial_ids;
    let batches: Vec<usize> = (0..plan.trials.len().div_ceil(TRIALS_PER_BATCH)).collect();
    let mut result = StageResult::default();
    for window in batches.chunks(window_len()) {
        let done: Vec<Result<(RecordBatch, Vec<EntryRecord>)>> = window
            .par_iter()
            .map_init(
                || ctx.source.reader(),
                |reader, &b| {
                    let reader = reader.as_mut().map_err(|e| {
                        Error::Internal(format!("cannot open a source reader: {e}"))
                    })?;
                    let first = b * TRIALS_PER_BATCH;
                    let trials =
                        &plan.trials[first..(first + TRIALS_PER_BATCH).min(plan.trials.len())];
                    let mut ids = Vec::with_capacity(trials.len() * frames);
                    let mut frame_index = Vec::with_capacity(trials.len() * frames);
                    // Channel-major per trial: transpose (channels, frames) into one column per channel.
                    let mut per_channel: Vec<Vec<u8>> =
                        vec![Vec::with_capacity(trials.len() * frames * plan.dtype.size); channels];
                    let mut records = Vec::with_capacity(trials.len());
                    for (k, planned) in trials.iter().enumerate() {
                        let (header, bytes, hash) =
                            read_planned(ctx.source, reader.as_mut(), planned)?;
                        let le = npy::to_little_endian_c(&header, &bytes[header.payload_offset..]);
                        let row_bytes = frames * plan.dtype.size;
                        for (ch, column) in per_channel.iter_mut().enumerate() {
                            column.extend_from_slice(&le[ch * row_bytes..(ch + 1) * row_bytes]);
                        }
                        let id = trial_ids[first + k] as i32;
                        ids.extend(std::iter::repeat_n(id, frames));
                        frame_index.extend(0..frames as i32);
                        records.push(EntryRecord {
                            entry: planned.entry,
                            blake3: hash,
                            output: c.output.clone(),
                            values_blake3: None,
                            index: Some((first + k) as u64),
                        });
                    }
                    let mut columns: Vec<ArrayRef> = vec![
                        Arc::new(Int32Array::from(ids)),
                        Arc::new(Int32Array::from(frame_index)),
                    ];
                    for column in &per_channel {
                        columns.push(numeric_column(plan.dtype, column, 0, 1)?);
                    }
                    let batch = RecordBatch::try_new(schema.clone(), columns)
                        .map_err(|e| Error::Internal(e.to_string()))?;
                    Ok((batch, records))
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
    result.bytes = plan.trials.len() as u64 * (channels * frames * plan.dtype.size) as u64;
    Ok(result)
}
