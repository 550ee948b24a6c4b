//! `statistics`: every `<source>/<var>/<subset>/<stat>.npy` copied unchanged (shape, dtype,
//! values) into its own small Zarr array `<output>/<var>/<subset>/<stat>`. Arrays are
//! independent, so they are written in parallel (each thread with its own source reader and
//! buffers, reused from array to array: fresh buffers for each array of a recording's size
//! left the stage's peak memory to when the allocator returned the last ones).

use super::trial_array::split_zarr_path;
use super::{read_planned_into, EntryRecord, StageContext, StageResult};
use crate::error::{Error, Result};
use crate::npy;
use crate::per_thread::map_with_state;
use crate::pipeline::plan::{ArrayEntry, StatisticsPlan};
use crate::pipeline::spec::StatisticsConfig;
use crate::source::EntryReader;
use crate::writers::write_behind::{self, EncoderSlot, WriteBehind};
use crate::writers::zarr::{encoder_layout, store_chunk, ArraySpec, ZarrStore};

pub fn run(ctx: &StageContext, plan: &StatisticsPlan) -> Result<StageResult> {
    let c = plan.config;
    let (store_dir, base) = split_zarr_path(&c.output);
    let store = ZarrStore::open(&ctx.dataset_dir.join(store_dir), ctx.writes)?;
    // Chunks go to disk on I/O threads while their worker reads its next array.
    let io_threads = rayon::current_num_threads().min(plan.arrays.len());
    let (done, last_writes) = write_behind::run(store.output(), io_threads, |writer| {
        map_with_state(
            plan.arrays.len(),
            || (ctx.source.reader(), Buffers::default()),
            |i, (reader, buffers), _| {
                let (name, planned) = &plan.arrays[i];
                let reader = reader
                    .as_mut()
                    .map_err(|e| Error::Internal(format!("cannot open a source reader: {e}")))?;
                write_one(
                    ctx,
                    c,
                    (&store, writer),
                    &base,
                    (name, planned),
                    reader.as_mut(),
                    buffers,
                )
            },
        )
    });
    let done: Vec<(EntryRecord, u64)> = done.into_iter().collect::<Result<_>>()?;
    last_writes.map_err(|e| {
        Error::io(
            store.root.clone(),
            "cannot write a Zarr chunk",
            std::io::Error::other(e),
        )
    })?;
    let mut result = StageResult::default();
    for (record, bytes) in done {
        result.bytes += bytes;
        result.entries.push(record);
    }
    Ok(result)
}

/// One thread's buffers: the entry as read, its little-endian copy where it needs one, and the
/// encoder's.
#[derive(Default)]
struct Buffers {
    entry: Vec<u8>,
    scratch: Vec<u8>,
    encoder: EncoderSlot,
}

fn write_one(
    ctx: &StageContext,
    c: &StatisticsConfig,
    (store, writer): (&ZarrStore, &WriteBehind),
    base: &str,
    (name, planned): (&str, &ArrayEntry),
    reader: &mut dyn EntryReader,
    buffers: &mut Buffers,
) -> Result<(EntryRecord, u64)> {
    let entry = &ctx.source.entries[planned.entry];
    let size = usize::try_from(entry.size).map_err(|_| {
        Error::bad_input(
            ctx.source.locate(entry),
            format!(
                "the entry claims {} bytes, more than this machine can address",
                entry.size
            ),
            "check the source; a statistics array is a few MB",
        )
    })?;
    buffers.entry.resize(size, 0);
    let read = read_planned_into(ctx.source, reader, planned, &mut buffers.entry)?;
    let header = &planned.header;
    let var = name.split('/').next().unwrap_or_default();
    let rank = header.shape.len();
    let dimension_names = match c.dimension_names.get(var) {
        Some(names) if names.len() == rank => names.clone(),
        _ => (0..rank).map(|i| format!("dim_{i}")).collect(),
    };
    let mut attributes = serde_json::Map::new();
    attributes.insert("source".into(), ctx.provenance.source.clone().into());
    attributes.insert("source_file".into(), entry.path.clone().into());
    attributes.insert("source_dtype".into(), header.dtype.to_string().into());
    let path = format!("{}/{name}", base.trim_end_matches('/'));
    // One chunk: the whole array.
    let chunk_shape: Vec<u64> = header.shape.iter().map(|&d| d.max(1)).collect();
    let array = store.create_array(&ArraySpec {
        path: &path,
        shape: header.shape.clone(),
        dtype: header.dtype,
        shard_shape: None,
        chunk_shape,
        dimension_names,
        attributes,
        compression: &c.compression,
    })?;
    let payload = npy::little_endian_c(
        header,
        &buffers.entry[header.payload_offset..],
        &mut buffers.scratch,
    );
    let len = payload.len() as u64;
    // The values as stored: the payload's own hash when it needed no conversion.
    let values_blake3 = Some(if npy::is_little_endian_c(header) {
        read.payload_blake3
    } else {
        blake3::hash(payload).to_hex().to_string()
    });
    if !payload.is_empty() || header.shape.is_empty() {
        let indices = vec![0; rank];
        // Encoded with the thread's zstd context and buffer where writers::shard can, as the
        // array's metadata says (the same bytes as zarrs'), else by zarrs.
        match encoder_layout(&array) {
            Some(layout) => {
                let key = array.chunk_key(&indices);
                let slot = &mut buffers.encoder;
                slot.encoder()
                    .and_then(|encoder| {
                        encoder
                            .encode_chunk(&layout, payload)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                    .and_then(|()| writer.store(slot, key))
                    .map_err(|e| {
                        // `e` names the chunk: a failed write may be this array's or the one
                        // this thread wrote before it.
                        Error::io(
                            &store.root,
                            "cannot write a Zarr chunk",
                            std::io::Error::other(e),
                        )
                    })?;
            }
            None => store_chunk(&array, &indices, payload.to_vec())?,
        }
    }
    let record = EntryRecord {
        entry: planned.entry,
        blake3: read.blake3,
        output: format!("{}/{name}", c.output),
        values_blake3,
        index: None,
    };
    Ok((record, len))
}
