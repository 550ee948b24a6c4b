//! `statistics`: every `<source>/<var>/<subset>/<stat>.npy` copied unchanged (shape, dtype,
//! values) into its own small Zarr array `<output>/<var>/<subset>/<stat>`. Arrays are
//! independent, so they are written in parallel (each thread with its own source reader and
//! buffers, reused from array to array: fresh buffers for each array of a recording's size
//! left the stage's peak memory to when the allocator returned the last ones).

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::kind::{self, ConfigProblem, Description, PlanContext, StageKind, StageNeed};
use super::registry::Stage;
use super::{read_planned_into, zarr_output, EntryRecord, StageContext, StageResult};
use crate::error::{Error, Result};
use crate::npy::{self, Header};
use crate::per_thread::map_with_state;
use crate::pipeline::plan::{ArrayEntry, Plan};
use crate::pipeline::spec::Compression;
use crate::source::{Entry, EntryReader, Source};
use crate::validate::{self, ExpectedArray};
use crate::writers::output_store::BOUNCE_CAPACITY;
use crate::writers::write_behind::{self, EncoderSlot, WriteBehind};
use crate::writers::zarr::{
    encoder_layout, store_chunk, ArraySpec, ZarrArray, ZarrPath, ZarrStore,
};

/// Every `<source>/<var>/<subset>/<stat>.npy` copied unchanged to `<output>/<var>/<subset>/<stat>`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatisticsConfig {
    /// Unique name of the stage, used in messages, the manifest and `derived`.
    pub id: String,
    pub source: String,
    pub output: String,
    pub compression: Compression,
    /// Dimension names per variable; arrays whose rank does not match get `dim_0, dim_1, ...`.
    #[serde(default)]
    pub dimension_names: BTreeMap<String, Vec<String>>,
    /// Globs (relative to `source`, without `.npy`) of statistics to leave out; recorded as skipped.
    #[serde(default)]
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct StatisticsPlan<'p> {
    pub config: &'p StatisticsConfig,
    /// `(var/subset/stat, entry)`, sorted by name.
    pub arrays: Vec<(String, ArrayEntry)>,
}

pub fn run(ctx: &StageContext, plan: &StatisticsPlan) -> Result<StageResult> {
    let c = plan.config;
    let output = zarr_output(&c.output)?;
    let (base, store_dir) = (output.node_path(), output.store);
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
    buffers
        .entry
        .resize(addressable_size(ctx.source, entry)?, 0);
    let read = read_planned_into(ctx.source, reader, planned, &mut buffers.entry)?;
    let header = &planned.header;
    let path = format!("{}/{name}", base.trim_end_matches('/'));
    let array = create_array(ctx, c, store, &path, name, header, entry)?;
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
        store_whole(
            store,
            writer,
            &array,
            header.shape.len(),
            payload,
            &mut buffers.encoder,
        )?;
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

/// The entry's size as the container declares it, as a buffer length.
fn addressable_size(source: &Source, entry: &Entry) -> Result<usize> {
    usize::try_from(entry.size).map_err(|_| {
        Error::bad_input(
            source.locate(entry),
            format!(
                "the entry claims {} bytes, more than this machine can address",
                entry.size
            ),
            "check the source; a statistics array is a few MB",
        )
    })
}

/// Creates statistic `name`'s array at `path`: its shape and dtype, in one chunk.
fn create_array(
    ctx: &StageContext,
    c: &StatisticsConfig,
    store: &ZarrStore,
    path: &str,
    name: &str,
    header: &Header,
    entry: &Entry,
) -> Result<ZarrArray> {
    let mut attributes = serde_json::Map::new();
    attributes.insert("source".into(), ctx.provenance.source.clone().into());
    attributes.insert("source_file".into(), entry.path.clone().into());
    attributes.insert("source_dtype".into(), header.dtype.to_string().into());
    // One chunk: the whole array.
    let chunk_shape: Vec<u64> = header.shape.iter().map(|&d| d.max(1)).collect();
    store.create_array(&ArraySpec {
        path,
        shape: header.shape.clone(),
        dtype: header.dtype,
        shard_shape: None,
        chunk_shape,
        dimension_names: dimension_names(c, name, header.shape.len()),
        attributes,
        compression: &c.compression,
    })
}

/// Writes `payload` as the array's one chunk.
fn store_whole(
    store: &ZarrStore,
    writer: &WriteBehind,
    array: &ZarrArray,
    rank: usize,
    payload: &[u8],
    slot: &mut EncoderSlot,
) -> Result<()> {
    let indices = vec![0; rank];
    // Encoded with the thread's zstd context and buffer where writers::shard can, as the
    // array's metadata says (the same bytes as zarrs'), else by zarrs.
    let Some(layout) = encoder_layout(array) else {
        return store_chunk(array, &indices, payload.to_vec());
    };
    let key = array.chunk_key(&indices);
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
        })
}

/// The dimension names of statistic `name` (`var/subset/stat`): its variable's, where they fit
/// its rank, else `dim_0, dim_1, ...`.
fn dimension_names(c: &StatisticsConfig, name: &str, rank: usize) -> Vec<String> {
    let var = name.split('/').next().unwrap_or_default();
    match c.dimension_names.get(var) {
        Some(names) if names.len() == rank => names.clone(),
        _ => (0..rank).map(|i| format!("dim_{i}")).collect(),
    }
}

impl StageKind for StatisticsConfig {
    const KIND: &'static str = "statistics";
    type Plan<'p> = StatisticsPlan<'p>;

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
        if ZarrPath::parse(&self.output).is_none() {
            return Err(ConfigProblem::new(
                format!("output {:?} is not inside a `.zarr` group", self.output),
                "write statistics to e.g. `data.zarr/statistics`",
            ));
        }
        kind::check_codec(&self.compression, false)
    }

    fn claims(&self, rest: &str) -> bool {
        rest.ends_with(".npy")
    }

    fn excludes(&self) -> &[String] {
        &self.exclude
    }

    fn plan<'p>(
        &'p self,
        entries: Vec<ArrayEntry>,
        ctx: &mut PlanContext,
    ) -> Result<Self::Plan<'p>> {
        let source = ctx.source;
        let mut arrays = Vec::new();
        for a in entries {
            let path = &source.entries[a.entry].path;
            let name = path[self.source.len() + 1..]
                .trim_end_matches(".npy")
                .to_string();
            if !a.header.dtype.is_numeric() {
                return Err(Error::bad_input(
                    source.locate(&source.entries[a.entry]),
                    format!(
                        "statistic has dtype {}; statistics must be numeric",
                        a.header.dtype
                    ),
                    "skip it in the pipeline (`exclude`) or fix the file",
                ));
            }
            let var = name.split('/').next().unwrap_or_default();
            if let Some(names) = self.dimension_names.get(var) {
                if names.len() == a.header.shape.len() {
                    for (n, &len) in names.iter().zip(&a.header.shape) {
                        ctx.dims.add(n, len, path, source)?;
                    }
                }
            }
            arrays.push((name, a));
        }
        arrays.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(StatisticsPlan {
            config: self,
            arrays,
        })
    }

    fn zarr_arrays(plan: &Self::Plan<'_>) -> Vec<String> {
        plan.arrays.iter().map(|(name, _)| name.clone()).collect()
    }

    fn memory(plan: &Self::Plan<'_>, source: &Source, _pipeline_file: &str) -> Result<StageNeed> {
        Ok(StageNeed {
            fixed: 0,
            // The entry as read, its little-endian copy, its encoded chunk.
            per_thread: kind::largest_entry(source, plan.arrays.iter().map(|(_, e)| e))
                .saturating_mul(3)
                .saturating_add(BOUNCE_CAPACITY),
            per_helping_thread: 0,
            items: plan.arrays.len(),
        })
    }

    fn run(ctx: &StageContext, plan: &Self::Plan<'_>) -> Result<StageResult> {
        run(ctx, plan)
    }

    fn check_output(dir: &Path, _plan: &Plan, p: &Self::Plan<'_>) -> Result<()> {
        let c = p.config;
        for (name, a) in &p.arrays {
            validate::check_zarr_array(&ExpectedArray {
                path: &dir.join(&c.output).join(name),
                shape: &a.header.shape,
                data_type: &validate::zarr_type_name(a.header.dtype),
                dimension_names: &dimension_names(c, name, a.header.shape.len()),
            })?;
        }
        Ok(())
    }

    fn describe(_source: &Source, plan: &Self::Plan<'_>) -> Result<Description> {
        Ok(Description {
            statistics: plan
                .arrays
                .iter()
                .map(|(name, a)| kind::header_line(name, &a.header))
                .collect(),
            ..Description::default()
        })
    }
}
