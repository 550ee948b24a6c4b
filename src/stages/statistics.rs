//! `statistics`: every `<source>/<var>/<subset>/<stat>.npy` copied unchanged (shape, dtype,
//! values) into its own small Zarr array `<output>/<var>/<subset>/<stat>`.

use super::trial_array::split_zarr_path;
use super::{read_planned, EntryRecord, StageContext, StageResult};
use crate::error::Result;
use crate::npy;
use crate::pipeline::plan::StatisticsPlan;
use crate::writers::zarr::{store_chunk, ArraySpec, ZarrStore};

pub fn run(ctx: &StageContext, plan: &StatisticsPlan) -> Result<StageResult> {
    let c = plan.config;
    let (store_dir, base) = split_zarr_path(&c.output);
    let store = ZarrStore::open(&ctx.dataset_dir.join(store_dir))?;
    let mut reader = ctx.source.reader()?;
    let mut result = StageResult::default();
    for (name, planned) in &plan.arrays {
        let (header, bytes, hash) = read_planned(ctx.source, reader.as_mut(), planned)?;
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
        result.bytes += payload.len() as u64;
        let values_blake3 = Some(blake3::hash(&payload).to_hex().to_string());
        if !payload.is_empty() || header.shape.is_empty() {
            store_chunk(&array, &vec![0; rank], payload)?;
        }
        result.entries.push(EntryRecord {
            entry: planned.entry,
            blake3: hash,
            output: format!("{}/{name}", c.output),
            values_blake3,
            index: None,
        });
    }
    Ok(result)
}
