//! `trial_array`: per-trial arrays stacked into one sharded Zarr array with a leading trial axis.
//! Trials are streamed shard by shard: a shard's trials are read (each thread with its own
//! source reader), copied as raw little-endian bytes into the shard buffer and written at once.

use rayon::prelude::*;
use zarrs::array::{ArrayBytes, ArraySubset};

use super::{read_planned, window_len, EntryRecord, MeasureValues, StageContext, StageResult};
use crate::error::{Error, Result};
use crate::npy::{self, Dtype, Kind};
use crate::pipeline::plan::TrialPlan;
use crate::pipeline::spec::{Extent, Measure, TrialArrayConfig};
use crate::writers::zarr::{ArraySpec, ZarrStore};

/// What one shard's task reports: the entries it read and its trials' measures.
type ShardDone = (Vec<EntryRecord>, Vec<Vec<MeasureValue>>);

pub fn run(ctx: &StageContext, plan: &TrialPlan<TrialArrayConfig>) -> Result<StageResult> {
    let c = plan.config;
    let n_trials = plan.trials.len() as u64;
    let mut shape = vec![n_trials];
    shape.extend(&plan.trial_shape);
    let (chunk, shard) = resolve_shapes(c, &shape, ctx.pipeline_file)?;
    let (store_dir, array_path) = split_zarr_path(&c.output);
    let store = ZarrStore::open(&ctx.dataset_dir.join(store_dir))?;
    let mut attributes = serde_json::Map::new();
    attributes.insert("frame_rate_hz".into(), ctx.pipeline.frame_rate_hz.into());
    attributes.insert("source".into(), ctx.provenance.source.clone().into());
    attributes.insert("source_variable".into(), c.source.clone().into());
    attributes.insert("source_dtype".into(), plan.dtype.to_string().into());
    for (k, v) in &c.attributes {
        attributes.insert(k.clone(), v.clone());
    }
    let array = store.create_array(&ArraySpec {
        path: &array_path,
        shape: shape.clone(),
        dtype: plan.dtype,
        shard_shape: Some(shard.clone()),
        chunk_shape: chunk,
        dimension_names: c.dimension_names.clone(),
        attributes,
        compression: &c.compression,
    })?;

    let trials_per_shard = shard[0] as usize;
    let trial_bytes = plan.trial_shape.iter().product::<u64>() as usize * plan.dtype.size;
    let groups: Vec<usize> = (0..plan.trials.len().div_ceil(trials_per_shard)).collect();
    let mut result = StageResult::default();
    let mut measures: Vec<Vec<MeasureValue>> = vec![Vec::new(); c.measures.len()];
    for window in groups.chunks(window_len()) {
        let done: Vec<Result<ShardDone>> = window
            .par_iter()
            .map_init(
                || ctx.source.reader(),
                |reader, &group| {
                    let reader = reader.as_mut().map_err(|e| {
                        Error::Internal(format!("cannot open a source reader: {e}"))
                    })?;
                    let first = group * trials_per_shard;
                    let trials =
                        &plan.trials[first..(first + trials_per_shard).min(plan.trials.len())];
                    let mut buffer = Vec::with_capacity(trials.len() * trial_bytes);
                    let mut records = Vec::with_capacity(trials.len());
                    let mut group_measures =
                        vec![Vec::with_capacity(trials.len()); c.measures.len()];
                    for planned in trials {
                        let (header, bytes, hash) =
                            read_planned(ctx.source, reader.as_mut(), planned)?;
                        let start = buffer.len();
                        npy::append_little_endian_c(
                            &header,
                            &bytes[header.payload_offset..],
                            &mut buffer,
                        );
                        drop(bytes);
                        crate::pipeline::plan::check_trial_nan(c.nan, plan.dtype, &plan.trial_shape, &buffer[start..])
                            .map_err(|problem| {
                                Error::bad_input(
                                    ctx.source.locate(&ctx.source.entries[planned.entry]),
                                    problem,
                                    "the trial has NaN before its NaN tail; fix the source, or set `nan: allow` for this stage in the pipeline",
                                )
                            })?;
                        for (m, values) in c.measures.iter().zip(group_measures.iter_mut()) {
                            values.push(measure(
                                *m,
                                plan.dtype,
                                &buffer[start..],
                                *plan.trial_shape.last().unwrap_or(&1),
                            ));
                        }
                        // The trial's values as the array stores them, for `verify`.
                        let values_blake3 =
                            Some(blake3::hash(&buffer[start..]).to_hex().to_string());
                        records.push(EntryRecord {
                            entry: planned.entry,
                            blake3: hash,
                            output: c.output.clone(),
                            values_blake3,
                            index: Some((first + records.len()) as u64),
                        });
                    }
                    let ranges: Vec<std::ops::Range<u64>> =
                        std::iter::once(first as u64..(first + trials.len()) as u64)
                            .chain(plan.trial_shape.iter().map(|&d| 0..d))
                            .collect();
                    array
                        .store_array_subset(
                            &ArraySubset::new_with_ranges(&ranges),
                            ArrayBytes::from(buffer),
                        )
                        .map_err(|e| {
                            Error::io(
                                ctx.dataset_dir.join(&c.output),
                                "cannot write a shard",
                                std::io::Error::other(e.to_string()),
                            )
                        })?;
                    Ok((records, group_measures))
                },
            )
            .collect();
        for r in done {
            let (records, group_measures) = r?;
            result.entries.extend(records);
            for (all, part) in measures.iter_mut().zip(group_measures) {
                all.extend(part);
            }
        }
    }
    result.bytes = n_trials * trial_bytes as u64;
    for (m, values) in c.measures.iter().zip(measures) {
        let values = match m {
            Measure::ValidFrames => {
                MeasureValues::Int32(values.iter().map(|v| v.as_i32()).collect())
            }
            Measure::AllZero => MeasureValues::Bool(values.iter().map(|v| v.as_bool()).collect()),
        };
        result.measures.push((*m, values));
    }
    Ok(result)
}

/// `data.zarr/videos` -> (`data.zarr`, `/videos`).
pub fn split_zarr_path(output: &str) -> (String, String) {
    match output.find(".zarr/") {
        Some(pos) => (output[..pos + 5].to_string(), output[pos + 5..].to_string()),
        None => (output.to_string(), "/".to_string()),
    }
}

fn resolve_shapes(c: &TrialArrayConfig, shape: &[u64], file: &str) -> Result<(Vec<u64>, Vec<u64>)> {
    let chunk: Vec<u64> = c
        .chunk_shape
        .iter()
        .zip(shape)
        .map(|(e, &len)| e.resolve(len))
        .collect();
    // `full` shards round up to a whole number of chunks (Zarr requires shards to be multiples
    // of chunks; the part beyond the array's edge holds nothing).
    let shard: Vec<u64> = c
        .shard_shape
        .iter()
        .zip(shape)
        .zip(&chunk)
        .map(|((e, &len), &ch)| match e {
            Extent::Full => len.max(1).div_ceil(ch) * ch,
            Extent::Size(n) => *n,
        })
        .collect();
    for (axis, ((&ch, &sh), name)) in chunk.iter().zip(&shard).zip(&c.dimension_names).enumerate() {
        if sh % ch != 0 {
            return Err(Error::bad_pipeline(file, format!("stage {}: shard extent {sh} of axis {axis} ({name}) is not a multiple of the chunk extent {ch}", c.id), "make every shard_shape extent a multiple of the chunk_shape extent"));
        }
    }
    // A shard is built in memory: refuse shapes that cannot fit (limit 1 GiB per shard).
    let shard_bytes = shard
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(8));
    if shard_bytes.is_none_or(|b| b > 1 << 30) {
        return Err(Error::bad_pipeline(
            file,
            format!(
                "stage {}: shard shape {shard:?} needs more than 1 GiB of memory",
                c.id
            ),
            "use fewer trials per shard",
        ));
    }
    if shard.iter().zip(shape).skip(1).any(|(&s, &len)| s < len) {
        return Err(Error::bad_pipeline(file, format!("stage {}: shards must span every axis but the trial axis (got {shard:?} for shape {shape:?})", c.id), "use `full` for every shard_shape extent after the first"));
    }
    Ok((chunk, shard))
}

#[derive(Debug, Clone, Copy)]
pub enum MeasureValue {
    Int(i32),
    Bool(bool),
}

impl MeasureValue {
    fn as_i32(self) -> i32 {
        match self {
            MeasureValue::Int(v) => v,
            MeasureValue::Bool(b) => b as i32,
        }
    }
    fn as_bool(self) -> bool {
        match self {
            MeasureValue::Bool(b) => b,
            MeasureValue::Int(v) => v != 0,
        }
    }
}

/// Computes a measure of one trial from its little-endian C-order bytes (last axis = frames).
pub fn measure(m: Measure, dtype: Dtype, le: &[u8], frames: u64) -> MeasureValue {
    match m {
        Measure::ValidFrames => MeasureValue::Int(valid_frames(dtype, le, frames as usize) as i32),
        Measure::AllZero => MeasureValue::Bool(all_zero(dtype, le)),
    }
}

/// Frames before the trailing frames in which every value is NaN.
pub fn valid_frames(dtype: Dtype, le: &[u8], frames: usize) -> usize {
    if dtype.kind != Kind::Float || frames == 0 {
        return frames;
    }
    let mut has_value = vec![false; frames];
    match dtype.size {
        4 => {
            for (i, b) in le.chunks_exact(4).enumerate() {
                if !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_nan() {
                    has_value[i % frames] = true;
                }
            }
        }
        8 => {
            for (i, b) in le.chunks_exact(8).enumerate() {
                if !f64::from_le_bytes(b.try_into().unwrap_or_default()).is_nan() {
                    has_value[i % frames] = true;
                }
            }
        }
        _ => {
            for (i, b) in le.chunks_exact(2).enumerate() {
                if !half::f16::from_le_bytes([b[0], b[1]]).is_nan() {
                    has_value[i % frames] = true;
                }
            }
        }
    }
    has_value.iter().rposition(|&v| v).map_or(0, |p| p + 1)
}

/// Every value is zero (NaN is not zero).
pub fn all_zero(dtype: Dtype, le: &[u8]) -> bool {
    match (dtype.kind, dtype.size) {
        (Kind::Float, 4) => le
            .chunks_exact(4)
            .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) == 0.0),
        (Kind::Float, 8) => le
            .chunks_exact(8)
            .all(|b| f64::from_le_bytes(b.try_into().unwrap_or_default()) == 0.0),
        (Kind::Float, _) => le
            .chunks_exact(2)
            .all(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32() == 0.0),
        _ => le.iter().all(|&b| b == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn valid_frames_counts_up_to_trailing_all_nan_frames() {
        let dt = Dtype::parse("<f4").unwrap();
        let n = f32::NAN;
        // 2 rows x 4 frames: frame 2 is NaN in one row only, frame 3 in both.
        let le = f32_bytes(&[1.0, 2.0, n, n, 3.0, 4.0, 5.0, n]);
        assert_eq!(valid_frames(dt, &le, 4), 3);
        assert_eq!(valid_frames(dt, &f32_bytes(&[n, n, n, n]), 4), 0);
        assert_eq!(valid_frames(dt, &f32_bytes(&[n, 1.0, n, n]), 4), 2);
        assert_eq!(valid_frames(dt, &f32_bytes(&[1.0, 1.0, 1.0, 1.0]), 4), 4);
    }

    #[test]
    fn all_zero_is_false_with_nan_or_values() {
        let dt = Dtype::parse("<f4").unwrap();
        assert!(all_zero(dt, &f32_bytes(&[0.0, -0.0, 0.0])));
        assert!(!all_zero(dt, &f32_bytes(&[0.0, f32::NAN])));
        assert!(!all_zero(dt, &f32_bytes(&[0.0, 1e-30])));
    }
}
