//! `statistics`: every `<source>/<var>/<subset>/<stat>.npy` copied unchanged (shape, dtype,
//! values) into its own small Zarr array `<output>/<var>/<subset>/<stat>`. Arrays are
//! independent, so they are written in parallel (each thread with its own source reader).

use super::trial_array::split_zarr_path;
use super::{read_planned, EntryRecord, StageContext, StageResult};
use crate::error::{Error, Result};
use crate::npy;
use crate::per_thread::map_with_state;
use crate::pipeline::plan::{ArrayEntry, StatisticsPlan};
use crate::pipeline::spec::StatisticsConfig;
use crate::source::EntryReader;
use crate::writers::zarr::{store_chunk, ArraySpec, ZarrStore};

pub fn run(ctx: &StageContext, plan: &StatisticsPlan) -> Result<StageResult> {
    let c = plan.config;
    let (store_dir, base) = split_zarr_path(&c.output);
    let store = ZarrStore::open(&ctx.dataset_dir.join(store_dir), ctx.writes)?;
    let done: Vec<Result<(EntryRecord, u64)>> = map_with_state(
        plan.arrays.len(),
        || ctx.source.reader(),
        |i, reader, _| {
            let (name, planned) = &plan.arrays[i];
            let reader = reader
                .as_mut()
                .map_err(|e| Error::Internal(format!("cannot open a source reader: {e}")))?;
            write_one(ctx, c, &store, &base, name, planned, reader.as_mut())
        },
    );
    let mut result = StageResult::default();
    for r in done {
        let (record, bytes) = r?;
        result.bytes += bytes;
        result.entries.push(record);
    }
    Ok(result)
}

fn write_one(
    ctx: &StageContext,
    c: &StatisticsConfig,
    store: &ZarrStore,
    base: &str,
    name: &str,
    planned: &ArrayEntry,
    reader: &mut dyn EntryReader,
) -> Result<(EntryRecord, u64)> {
    let (header, bytes, hash) = read_planned(ctx.source, reader, planned)?;
    let var = name.split('/').next().unwrap_or_default();
    let rank = header.shape.len();
    let dimension_names = match c.dimension_names.get(var) {
        Some(names) if names.len() == rank => names.clone(),
        _ => (0..rank).map(|i| format!("dim_{i}")).collect(),
    };
    let mut attributes = serde_json::Map::new();
    attributes.insert("source".into(), ctx.provenance.source.clone().into());
    attributes.insert(
        "source_file".into(),
        ctx.source.entries[planned.entry].path.clone().into(),
    );
    attributes.insert("source_dtype".into(), header.dtype.to_string().into());
    let path = format!("{}/{name}", base.trim_end_matches('/'));
    let array = store.create_array(&ArraySpec {
        path: &path,
        shape: header.shape.clone(),
        dtype: header.dtype,
        shard_shape: None,
        chunk_shape: header.shape.iter().map(|&d| d.max(1)).collect(),
        dimension_names,
        attributes,
        compression: &c.compression,
    })?;
    let payload = npy::to_little_endian_c(&header, &bytes[header.payload_offset..]);
    let len = payload.len() as u64;
    let values_blake3 = Some(blake3::hash(&payload).to_hex().to_string());
    if !payload.is_empty() || header.shape.is_empty() {
        store_chunk(&array, &vec![0; rank], payload)?;
    }
    let record = EntryRecord {
        entry: planned.entry,
        blake3: hash,
        output: format!("{}/{name}", c.output),
        values_blake3,
        index: None,
    };
    Ok((record, len))
}
