//! `trial_array`: per-trial arrays stacked into one sharded Zarr array with a leading trial axis.
//! Each shard is one task on the pool: its trials are read (each thread with its own source
//! reader) as raw little-endian bytes, a chunk row at a time where writers::shard encodes the
//! shard (the whole shard where zarrs does), and the encoded shard is written at once.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use zarrs::array::{ArrayBytes, CodecOptions};

use super::kind::{self, ConfigProblem, Description, PlanContext, StageKind, StageNeed};
use super::registry::Stage;
use super::{
    read_planned, read_planned_into, zarr_output, EntryRecord, Measure, MeasureValues,
    StageContext, StageResult,
};
use crate::error::{Error, Result};
use crate::npy::{self, Dtype, Kind};
use crate::per_thread::{lock, map_with_state_helping, Queue};
use crate::pipeline::plan::{trial_number, trial_plan, ArrayEntry, Plan, TrialPlan};
use crate::pipeline::spec::{Compression, FRAME_DIMENSION, HINT};
use crate::source::{read_npy, EntryReader, Source};
use crate::validate::{self, ExpectedArray};
use crate::writers::output_store::BOUNCE_CAPACITY;
use crate::writers::shard::{Compressor, EncodedRun, ShardLayout};
use crate::writers::write_behind::{self, EncoderSlot, WriteBehind};
use crate::writers::zarr::{
    array_metadata, encoder_layout, fill_bytes, ArraySpec, ZarrArray, ZarrPath, ZarrStore,
};

/// Per-trial arrays (`<source>/<trial>.npy`) stacked into one Zarr array with a leading trial axis.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrialArrayConfig {
    /// Unique name of the stage, used in messages, the manifest and `derived`.
    pub id: String,
    pub source: String,
    /// Path of the array inside the dataset folder, e.g. `data.zarr/videos`.
    pub output: String,
    /// One name per output axis (trial axis first).
    pub dimension_names: Vec<String>,
    /// Inner chunk shape (the unit of reading), one extent per output axis.
    pub chunk_shape: Vec<Extent>,
    /// Shard shape (the unit of storage: one file), a multiple of `chunk_shape`.
    pub shard_shape: Vec<Extent>,
    pub compression: Compression,
    #[serde(default)]
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// Per-trial facts computed while copying, for later stages (`valid_frames`, `all_zero`).
    #[serde(default)]
    pub measures: Vec<Measure>,
    /// Where NaN may appear in a trial: `allow` (anywhere, the default) or `tail_only` (only in
    /// the trailing frames in which every value is NaN; a NaN before them stops the run).
    #[serde(default)]
    pub nan: NanPolicy,
}

/// Where NaN may appear in a trial's values (checked while copying, per trial).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    /// NaN may appear anywhere; values are copied as they are.
    #[default]
    Allow,
    /// NaN only in the trailing frames in which every value is NaN (the part after the stimulus
    /// ended); any NaN before them is refused as bad input.
    TailOnly,
}

/// An axis extent in a chunk or shard shape: a number, or `full` for the whole axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    Full,
    Size(u64),
}

impl Extent {
    pub fn resolve(self, axis_len: u64) -> u64 {
        match self {
            Extent::Full => axis_len.max(1),
            Extent::Size(n) => n,
        }
    }
}

impl JsonSchema for Extent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Extent".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "An axis extent: a positive integer, or `full` for the whole axis.",
            "oneOf": [{"type": "integer", "minimum": 1}, {"const": "full"}]
        })
    }
}

impl Serialize for Extent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Extent::Full => s.serialize_str("full"),
            Extent::Size(n) => s.serialize_u64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Extent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Extent, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Extent;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a positive integer or `full`")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Extent, E> {
                if v == 0 {
                    return Err(E::custom("a chunk or shard extent must be at least 1"));
                }
                Ok(Extent::Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Extent, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("a chunk or shard extent must be at least 1"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Extent, E> {
                if v == "full" {
                    Ok(Extent::Full)
                } else {
                    Err(E::custom(format!(
                        "unknown extent {v:?}: expected a positive integer or `full`"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

pub fn run(ctx: &StageContext, plan: &TrialPlan<TrialArrayConfig>) -> Result<StageResult> {
    let open = open_array(ctx, plan, true)?;
    write_trials(ctx, plan, &open, 0..plan.trials.len())
}

/// One task's part of a sharded run: the shards holding trials `trials` (a range aligned to the
/// shard's trial extent), without the array's metadata, which `finalize` writes once. The
/// result lists the files written.
pub fn run_part(
    ctx: &StageContext,
    plan: &TrialPlan<TrialArrayConfig>,
    trials: std::ops::Range<usize>,
) -> Result<StageResult> {
    let open = open_array(ctx, plan, false)?;
    let (array, shard) = (&open.array, &open.shard);
    let per_shard = shard[0] as usize;
    if trials.start % per_shard != 0
        || (trials.end % per_shard != 0 && trials.end != plan.trials.len())
    {
        return Err(Error::Internal(format!(
            "trials {trials:?} of stage {} are not aligned to its {per_shard}-trial shards",
            plan.config.id
        )));
    }
    let mut result = write_trials(ctx, plan, &open, trials.clone())?;
    let store_dir = zarr_output(&plan.config.output)?.store;
    for group in trials.start / per_shard..trials.end.div_ceil(per_shard) {
        let mut indices = vec![0u64; shard.len()];
        indices[0] = group as u64;
        let file = format!("{store_dir}/{}", array.chunk_key(&indices).as_str());
        // An all-fill shard is not stored at all (zarrs erases it), in a single run as here.
        if ctx.dataset_dir.join(&file).is_file() {
            result.written.push(file);
        }
    }
    Ok(result)
}

/// Writes the array's metadata only (`finalize` of a sharded run); returns its file, relative
/// to the dataset folder.
pub fn write_metadata(ctx: &StageContext, plan: &TrialPlan<TrialArrayConfig>) -> Result<String> {
    open_array(ctx, plan, true)?;
    Ok(zarr_output(&plan.config.output)?.metadata_file())
}

/// Trials per shard of this stage's array: the grain a sharded run splits the trial axis at.
pub fn trials_per_shard(plan: &TrialPlan<TrialArrayConfig>, pipeline_file: &str) -> Result<usize> {
    Ok(shard_shape(plan, pipeline_file)?[0] as usize)
}

/// The shape of one shard, as it is built in memory (`full` extents rounded up to whole chunks).
pub fn shard_shape(plan: &TrialPlan<TrialArrayConfig>, pipeline_file: &str) -> Result<Vec<u64>> {
    Ok(resolve_shapes(plan.config, &array_shape(plan), pipeline_file)?.1)
}

/// What one thread holds while it writes this stage's shards, in bytes, for the memory
/// estimate: the trials it reads at once (a unit of `write_trials`) and the encoded shard,
/// taken as incompressible.
pub fn thread_buffer_bytes(
    plan: &TrialPlan<TrialArrayConfig>,
    pipeline_file: &str,
) -> Result<(u64, u64)> {
    let shape = array_shape(plan);
    let (chunk, shard) = resolve_shapes(plan.config, &shape, pipeline_file)?;
    let size = plan.dtype.size as u64;
    let shard_bytes = shard.iter().fold(size, |a, &d| a.saturating_mul(d));
    // The layout of the metadata the run will write; attributes play no part in it.
    let array_path = zarr_output(&plan.config.output)?.node_path();
    let spec = array_spec(
        plan,
        &array_path,
        shape,
        &chunk,
        &shard,
        serde_json::Map::new(),
    );
    let layout = ShardLayout::from_metadata(&array_metadata(&spec)?);
    let unit_trials = unit_trials(layout.as_ref(), &chunk, &shard);
    let read = shard[1..]
        .iter()
        .fold(size, |a, &d| a.saturating_mul(d))
        .saturating_mul(unit_trials as u64);
    Ok((read, shard_bytes))
}

/// The trials a thread reads at once: the trials one inner chunk row spans (one in the default
/// layouts) where writers::shard encodes the shards (`layout`), the whole shard where zarrs
/// does.
fn unit_trials(layout: Option<&ShardLayout>, chunk: &[u64], shard: &[u64]) -> usize {
    let trials_per_shard = shard[0].max(1) as usize;
    match layout {
        Some(_) => (chunk[0] as usize).clamp(1, trials_per_shard),
        None => trials_per_shard,
    }
}

fn array_shape(plan: &TrialPlan<TrialArrayConfig>) -> Vec<u64> {
    let mut shape = vec![plan.trials.len() as u64];
    shape.extend(&plan.trial_shape);
    shape
}

/// An open array: its handle, the store it writes through, its chunk and shard shapes.
struct OpenArray {
    array: ZarrArray,
    store: ZarrStore,
    chunk: Vec<u64>,
    shard: Vec<u64>,
}

/// How the stage's array is created, `shape` cut into `shard` shards of `chunk` chunks.
fn array_spec<'a>(
    plan: &'a TrialPlan<TrialArrayConfig>,
    array_path: &'a str,
    shape: Vec<u64>,
    chunk: &[u64],
    shard: &[u64],
    attributes: serde_json::Map<String, serde_json::Value>,
) -> ArraySpec<'a> {
    ArraySpec {
        path: array_path,
        shape,
        dtype: plan.dtype,
        shard_shape: Some(shard.to_vec()),
        chunk_shape: chunk.to_vec(),
        dimension_names: plan.config.dimension_names.clone(),
        attributes,
        compression: &plan.config.compression,
    }
}

/// Opens the stage's array; its metadata is written when `store_metadata`.
fn open_array(
    ctx: &StageContext,
    plan: &TrialPlan<TrialArrayConfig>,
    store_metadata: bool,
) -> Result<OpenArray> {
    let c = plan.config;
    let shape = array_shape(plan);
    let (chunk, shard) = resolve_shapes(c, &shape, ctx.pipeline_file)?;
    let output = zarr_output(&c.output)?;
    let (array_path, store_dir) = (output.node_path(), output.store);
    let store = ZarrStore::open(&ctx.dataset_dir.join(store_dir), ctx.writes)?;
    let mut attributes = serde_json::Map::new();
    let has_frames = c.dimension_names.iter().any(|d| d == FRAME_DIMENSION);
    if let Some(rate) = ctx.pipeline.frame_rate_hz.filter(|_| has_frames) {
        attributes.insert("frame_rate_hz".into(), rate.into());
    }
    attributes.insert("source".into(), ctx.provenance.source.clone().into());
    attributes.insert("source_variable".into(), c.source.clone().into());
    attributes.insert("source_dtype".into(), plan.dtype.to_string().into());
    for (k, v) in &c.attributes {
        attributes.insert(k.clone(), v.clone());
    }
    let spec = array_spec(plan, &array_path, shape, &chunk, &shard, attributes);
    let array = if store_metadata {
        store.create_array(&spec)?
    } else {
        store.array(&spec)?
    };
    Ok(OpenArray {
        array,
        store,
        chunk,
        shard,
    })
}

/// Reads the trials `part` (whole shards) into the array.
///
/// Every shard is one task on the pool; tasks keep only entry records and measures, so memory
/// is bounded by the thread count whatever the number of trials, with no window barrier between
/// groups of shards. A task reads its shard a unit at a time into its thread's buffer (reused
/// from unit to unit: no fresh pages): the trials one inner chunk row spans (one trial in the
/// default layouts) where writers::shard encodes the shard, so a thread holds one trial and the
/// shard's compressed bytes, not a shard of raw values (docs/performance.md, "One trial in
/// memory per thread"); the whole shard where zarrs encodes it. A thread that runs out of
/// shards helps with the last units of the shards still being encoded (`ShardTail`).
fn write_trials(
    ctx: &StageContext,
    plan: &TrialPlan<TrialArrayConfig>,
    open: &OpenArray,
    part: std::ops::Range<usize>,
) -> Result<StageResult> {
    let writing = ShardWriting::new(ctx, plan, open, part);
    let groups = writing.groups.len();
    // Shards go to disk on I/O threads while their worker reads its next shard's trials
    // (writers::write_behind).
    let io_threads = rayon::current_num_threads().min(groups);
    let (done, last_writes) = write_behind::run(open.store.output(), io_threads, |writer| {
        map_with_state_helping(
            groups,
            UnitState::new(ctx),
            |i, state, queue| writing.write_shard(i, state, queue, writer),
            |state| writing.help(state),
        )
    });
    let done: Vec<Vec<TrialRead>> = done.into_iter().collect::<Result<_>>()?;
    last_writes.map_err(|e| writing.write_failed(e))?;
    Ok(writing.result(done))
}

/// One stage's shards being written: what every shard task and helping thread shares.
struct ShardWriting<'a> {
    ctx: &'a StageContext<'a>,
    plan: &'a TrialPlan<'a, TrialArrayConfig>,
    array: &'a ZarrArray,
    shard: &'a [u64],
    reading: TrialReading<'a>,
    /// Shards writers::shard can encode, as the array's metadata says; `None`: zarrs does.
    encodable: Option<ShardLayout>,
    part: std::ops::Range<usize>,
    /// The shards (by index on the trial axis) of this part.
    groups: Vec<usize>,
    trials_per_shard: usize,
    unit_trials: usize,
    units_per_shard: usize,
    /// The shards being encoded, whose last units a thread that has run out of shards takes.
    tails: Mutex<Vec<Arc<ShardTail>>>,
}

impl<'a> ShardWriting<'a> {
    fn new(
        ctx: &'a StageContext<'a>,
        plan: &'a TrialPlan<'a, TrialArrayConfig>,
        open: &'a OpenArray,
        part: std::ops::Range<usize>,
    ) -> Self {
        let shard = open.shard.as_slice();
        let trials_per_shard = shard[0] as usize;
        let encodable = encoder_layout(&open.array);
        let unit_trials = unit_trials(encodable.as_ref(), &open.chunk, shard);
        ShardWriting {
            ctx,
            plan,
            array: &open.array,
            shard,
            reading: TrialReading::new(ctx, plan, &shard[1..]),
            encodable,
            groups: (part.start / trials_per_shard..part.end.div_ceil(trials_per_shard)).collect(),
            part,
            trials_per_shard,
            unit_trials,
            units_per_shard: trials_per_shard / unit_trials,
            tails: Mutex::new(Vec::new()),
        }
    }

    fn write_failed(&self, e: String) -> Error {
        Error::io(
            self.ctx.dataset_dir.join(&self.plan.config.output),
            "cannot write a shard",
            std::io::Error::other(e),
        )
    }

    /// The first trial of shard `group` and its trials (within this part).
    fn shard_trials(&self, group: usize) -> (usize, &'a [ArrayEntry]) {
        let first = group * self.trials_per_shard;
        let end = (first + self.trials_per_shard).min(self.part.end);
        (first, &self.plan.trials[first..end])
    }

    /// The task of shard `i` of this part: its trials read and encoded, the shard handed to the
    /// I/O threads.
    fn write_shard(
        &self,
        i: usize,
        state: &mut UnitState,
        queue: &Queue,
        writer: &WriteBehind,
    ) -> Result<Vec<TrialRead>> {
        let group = self.groups[i];
        let mut indices = vec![0u64; self.shard.len()];
        indices[0] = group as u64;
        let Some(layout) = &self.encodable else {
            return self.write_by_zarrs(group, &indices, state, queue);
        };
        let tail = Arc::new(ShardTail::new(group, self.units_per_shard));
        lock(&self.tails).push(tail.clone());
        let mut read = Vec::with_capacity(self.shard_trials(group).1.len());
        let owned = self.encode_own_units(layout, &tail, state, queue, &mut read);
        // Failed or not, no thread is to help with this shard any more.
        lock(&self.tails).retain(|t| !Arc::ptr_eq(t, &tail));
        owned?;
        // The units other threads took, in order after this thread's.
        for (_, run, trials_read) in tail.wait_for_helpers() {
            read.extend(trials_read?);
            state
                .slot
                .encoder()
                .map_err(|e| self.write_failed(e))?
                .append_run(layout, &run)
                .map_err(|e| self.write_failed(e.to_string()))?;
        }
        state
            .slot
            .encoder()
            .map_err(|e| self.write_failed(e))?
            .finish(layout)
            .map_err(|e| self.write_failed(e.to_string()))?;
        writer
            .store(&mut state.slot, self.array.chunk_key(&indices))
            .map_err(|e| self.write_failed(e))?;
        Ok(read)
    }

    /// zarrs encodes the shard: one unit, the whole shard. Once threads run out of shards, the
    /// last ones spread their chunks over the idle threads.
    fn write_by_zarrs(
        &self,
        group: usize,
        indices: &[u64],
        state: &mut UnitState,
        queue: &Queue,
    ) -> Result<Vec<TrialRead>> {
        let (first, trials) = self.shard_trials(group);
        let reading = &self.reading;
        let read = reading.read_unit(state, trials, first, 0..self.trials_per_shard)?;
        let concurrency = 1 + queue.idle_workers();
        self.array
            .store_chunk_opt(
                indices,
                ArrayBytes::from(&state.buffer[reading.lead..]),
                &CodecOptions::default().with_concurrent_target(concurrency),
            )
            .map_err(|e| self.write_failed(e.to_string()))?;
        Ok(read)
    }

    /// This thread's units of its shard, front first, until helpers have taken the rest.
    fn encode_own_units(
        &self,
        layout: &ShardLayout,
        tail: &ShardTail,
        state: &mut UnitState,
        queue: &Queue,
        read: &mut Vec<TrialRead>,
    ) -> Result<()> {
        let (first, trials) = self.shard_trials(tail.group);
        let (reading, unit_trials) = (&self.reading, self.unit_trials);
        let mut next = Some(0);
        while let Some(unit) = next {
            let units = unit * unit_trials..(unit + 1) * unit_trials;
            // The next unit's bytes are fetched while this one is worked on: this shard's, or
            // after its last unit the first of the shard taken next.
            if unit + 1 < self.units_per_shard {
                reading.prefetch(state, trials, units.end..units.end + unit_trials);
            } else if let Some(i) = queue.next_item() {
                let (_, trials) = self.shard_trials(self.groups[i]);
                reading.prefetch(state, trials, 0..unit_trials);
            }
            read.extend(reading.read_unit(state, trials, first, units)?);
            // Asked for after the first unit is read: meanwhile, the last shard's write has had
            // time to finish and give its buffer back.
            let encoder = state.slot.encoder().map_err(|e| self.write_failed(e))?;
            if unit == 0 {
                encoder.begin(layout);
            }
            encoder
                .add_chunks(layout, &state.buffer[reading.lead..])
                .map_err(|e| self.write_failed(e.to_string()))?;
            next = tail.take_front();
        }
        Ok(())
    }

    /// A thread out of shards takes the last unit of a shard still being encoded; false when
    /// there is none.
    fn help(&self, state: &mut UnitState) -> bool {
        let Some(layout) = &self.encodable else {
            return false;
        };
        let Some((tail, unit)) = ShardTail::claim_last(&self.tails) else {
            return false;
        };
        // Handed over when dropped, even if this thread panics: the owner waits for it.
        let mut helping = Helping {
            tail,
            unit,
            done: None,
        };
        let (first, trials) = self.shard_trials(helping.tail.group);
        let units = unit * self.unit_trials..(unit + 1) * self.unit_trials;
        let trials_read = self
            .reading
            .read_unit(state, trials, first, units)
            .and_then(|r| {
                state
                    .compressor
                    .encode_run(layout, &state.buffer[self.reading.lead..], &mut state.run)
                    .map_err(|e| self.write_failed(e.to_string()))?;
                Ok(r)
            });
        helping.done = Some((std::mem::take(&mut state.run), trials_read));
        true
    }

    /// The stage's records and measures, in trial order.
    fn result(&self, done: Vec<Vec<TrialRead>>) -> StageResult {
        let measures_wanted = &self.plan.config.measures;
        let mut result = StageResult::default();
        let mut measures: Vec<Vec<MeasureValue>> = vec![Vec::new(); measures_wanted.len()];
        for (record, values) in done.into_iter().flatten() {
            result.entries.push(record);
            for (all, value) in measures.iter_mut().zip(values) {
                all.push(value);
            }
        }
        result.bytes = self.part.len() as u64 * self.reading.trial_bytes as u64;
        for (m, values) in measures_wanted.iter().zip(measures) {
            let values = match m {
                Measure::ValidFrames => {
                    MeasureValues::Int32(values.iter().map(|v| v.as_i32()).collect())
                }
                Measure::AllZero => {
                    MeasureValues::Bool(values.iter().map(|v| v.as_bool()).collect())
                }
            };
            result.measures.push((*m, values));
        }
        result
    }
}

/// One trial as read: its entry record and its measures (in the stage's order).
type TrialRead = (EntryRecord, Vec<MeasureValue>);

/// What a thread keeps from shard to shard: no fresh pages per shard.
struct UnitState {
    reader: Result<Box<dyn EntryReader>>,
    /// The unit's trial slots, after room for a header (`TrialReading::lead`).
    buffer: Vec<u8>,
    /// A trial's little-endian copy, for sources that need one.
    scratch: Vec<u8>,
    /// The encoder of the thread's own shards.
    slot: EncoderSlot,
    /// For the units it encodes for another thread's shard.
    compressor: Compressor,
    run: EncodedRun,
}

impl UnitState {
    /// A maker of each thread's state, on its first shard.
    fn new<'c>(ctx: &'c StageContext<'c>) -> impl Fn() -> UnitState + Sync + 'c {
        move || UnitState {
            reader: ctx.source.reader(),
            buffer: Vec::new(),
            scratch: Vec::new(),
            slot: EncoderSlot::default(),
            compressor: Compressor::default(),
            run: EncodedRun::default(),
        }
    }
}

/// A shard being encoded by its thread, front to back, whose last units a thread that has run
/// out of shards may take from the back (read, encoded, handed over in order). Why: at the end
/// of a stage the threads ran out of shards up to a shard apart, and one thread read the last
/// shard's trials alone while the others sat idle (docs/performance.md, "Help with the last
/// shard").
struct ShardTail {
    group: usize,
    state: Mutex<TailState>,
    helped: Condvar,
}

struct TailState {
    /// Units before this one are taken by the shard's thread.
    front: usize,
    /// Units from this one on are taken by helping threads.
    back: usize,
    /// Helping threads still at work.
    helping: usize,
    /// Units encoded by helping threads.
    done: Vec<HelpedUnit>,
}

/// A unit encoded by a helping thread: its index in the shard, its chunks, its trials.
type HelpedUnit = (usize, EncodedRun, Result<Vec<TrialRead>>);

impl ShardTail {
    /// The shard's thread holds unit 0 from the start (so it always begins the shard).
    fn new(group: usize, units: usize) -> ShardTail {
        ShardTail {
            group,
            state: Mutex::new(TailState {
                front: 1,
                back: units.max(1),
                helping: 0,
                done: Vec::new(),
            }),
            helped: Condvar::new(),
        }
    }

    /// The next unit for the shard's thread, if no helper took it.
    fn take_front(&self) -> Option<usize> {
        let mut state = lock(&self.state);
        (state.front < state.back).then(|| {
            state.front += 1;
            state.front - 1
        })
    }

    /// The last unit taken by nobody, of the shard with the most of them.
    fn claim_last(tails: &Mutex<Vec<Arc<ShardTail>>>) -> Option<(Arc<ShardTail>, usize)> {
        let tails = lock(tails);
        let left = |t: &ShardTail| {
            let state = lock(&t.state);
            state.back.saturating_sub(state.front)
        };
        let tail = tails
            .iter()
            .filter(|t| left(t) > 0)
            .max_by_key(|t| left(t))?;
        let mut state = lock(&tail.state);
        if state.back <= state.front {
            return None;
        }
        state.back -= 1;
        state.helping += 1;
        Some((tail.clone(), state.back))
    }

    /// Waits for the helping threads; their units, in order.
    fn wait_for_helpers(&self) -> Vec<HelpedUnit> {
        let mut state = lock(&self.state);
        while state.helping > 0 {
            state = self.helped.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        let mut done = std::mem::take(&mut state.done);
        done.sort_unstable_by_key(|(unit, _, _)| *unit);
        done
    }
}

/// A helping thread's claim on a unit: its encoded chunks and trials, handed to the shard's
/// thread when dropped.
struct Helping {
    tail: Arc<ShardTail>,
    unit: usize,
    done: Option<(EncodedRun, Result<Vec<TrialRead>>)>,
}

impl Drop for Helping {
    fn drop(&mut self) {
        let (run, trials) = self.done.take().unwrap_or_else(|| {
            let stopped = Error::Internal("a thread stopped while reading a unit".into());
            (EncodedRun::default(), Err(stopped))
        });
        let mut state = lock(&self.tail.state);
        state.done.push((self.unit, run, trials));
        state.helping -= 1;
        self.tail.helped.notify_all();
    }
}

/// How this stage's trials are read into their slots.
struct TrialReading<'a> {
    ctx: &'a StageContext<'a>,
    plan: &'a TrialPlan<'a, TrialArrayConfig>,
    padding: Padding,
    fill: Vec<u8>,
    trial_bytes: usize,
    frames: u64,
    /// Room before the first slot for the longest header: a trial is read whole (header, then
    /// payload) so that its payload lands in its slot, its header just before.
    lead: usize,
}

impl<'a> TrialReading<'a> {
    fn new(
        ctx: &'a StageContext<'a>,
        plan: &'a TrialPlan<'a, TrialArrayConfig>,
        slot_shape: &[u64],
    ) -> TrialReading<'a> {
        TrialReading {
            ctx,
            plan,
            padding: Padding::new(&plan.trial_shape, slot_shape, plan.dtype.size),
            fill: fill_pattern(plan.dtype),
            trial_bytes: plan.trial_shape.iter().product::<u64>() as usize * plan.dtype.size,
            frames: *plan.trial_shape.last().unwrap_or(&1),
            lead: plan
                .trials
                .iter()
                .map(|t| t.header.payload_offset)
                .max()
                .unwrap_or(0),
        }
    }

    /// Asks the source to start fetching the trials `unit` of a shard (`trials`: the shard's)
    /// in the background (`EntryReader::prefetch`).
    fn prefetch(&self, state: &mut UnitState, trials: &[ArrayEntry], unit: std::ops::Range<usize>) {
        let Ok(reader) = state.reader.as_mut() else {
            return;
        };
        // The last shard may hold fewer trials than the shard shape.
        let end = unit.end.min(trials.len());
        for planned in &trials[unit.start.min(end)..end] {
            reader.prefetch(&self.ctx.source.entries[planned.entry]);
        }
    }

    /// Reads the trials `unit` of a shard (`trials`: the shard's, the first being trial `first`
    /// of the array) into their slots in `state.buffer`, after `lead` bytes; fill where the
    /// shard has no trial. Returns them in order.
    fn read_unit(
        &self,
        state: &mut UnitState,
        trials: &[ArrayEntry],
        first: usize,
        unit: std::ops::Range<usize>,
    ) -> Result<Vec<TrialRead>> {
        let reader = state
            .reader
            .as_mut()
            .map_err(|e| Error::Internal(format!("cannot open a source reader: {e}")))?
            .as_mut();
        let (buffer, scratch) = (&mut state.buffer, &mut state.scratch);
        let (ctx, plan, c) = (self.ctx, self.plan, self.plan.config);
        // Sized once per thread; every byte of it is rewritten for each unit.
        buffer.resize(self.lead + unit.len() * self.padding.padded, 0);
        let mut read = Vec::with_capacity(unit.len());
        let mut bytes: Vec<u8>;
        // Last to first: a trial read in place puts its header over the end of the slot before
        // its own (or into the lead), which is filled after it.
        for k in unit.clone().rev() {
            let start = self.lead + (k - unit.start) * self.padding.padded;
            let end = start + self.padding.padded;
            let Some(planned) = trials.get(k) else {
                // The last shard may hold fewer trials than the shard shape.
                write_fill(&mut buffer[start..end], &self.fill);
                continue;
            };
            let (hash, values_blake3, le) = if self.padding.contiguous()
                && npy::is_little_endian_c(&planned.header)
            {
                // The usual case: the payload is inflated straight into its slot.
                let offset = planned.header.payload_offset;
                let payload_end = start + self.trial_bytes.min(self.padding.padded);
                let whole = &mut buffer[start - offset.min(self.lead)..payload_end];
                let read = read_planned_into(ctx.source, reader, planned, whole)?;
                write_fill(&mut buffer[payload_end..end], &self.fill);
                (
                    read.blake3,
                    read.payload_blake3,
                    &buffer[start..payload_end],
                )
            } else {
                let (header, read, hash) = read_planned(ctx.source, reader, planned)?;
                bytes = read;
                let le = npy::little_endian_c(&header, &bytes[header.payload_offset..], scratch);
                if le.len() != self.trial_bytes {
                    return Err(Error::Internal(format!(
                        "{}: {} payload bytes, the plan expects {}",
                        ctx.source.locate(&ctx.source.entries[planned.entry]),
                        le.len(),
                        self.trial_bytes
                    )));
                }
                self.padding.place(le, &mut buffer[start..end], &self.fill);
                (hash, blake3::hash(le).to_hex().to_string(), le)
            };
            check_trial_nan(c.nan, plan.dtype, &plan.trial_shape, le).map_err(|problem| {
                Error::bad_input(
                    ctx.source.locate(&ctx.source.entries[planned.entry]),
                    problem,
                    "the trial has NaN before its NaN tail; fix the source, or set `nan: allow` for this stage in the pipeline",
                )
            })?;
            let values = c
                .measures
                .iter()
                .map(|m| measure(*m, plan.dtype, le, self.frames))
                .collect();
            let record = EntryRecord {
                entry: planned.entry,
                blake3: hash,
                output: c.output.clone(),
                // The trial's values as the array stores them, for `verify`.
                values_blake3: Some(values_blake3),
                index: Some((first + k) as u64),
            };
            read.push((record, values));
        }
        read.reverse();
        Ok(read)
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

/// Where one trial's C-order bytes go inside its slot of a shard whose extents may exceed the
/// trial's (a `full` shard extent rounds up to whole chunks): contiguous blocks, fill between.
struct Padding {
    /// The trial's shape and the padded (shard) shape of one trial slot.
    shape: Vec<usize>,
    padded_shape: Vec<usize>,
    /// Last axis whose extent is padded (blocks are contiguous from it on), if any.
    axis: Option<usize>,
    /// Bytes of one contiguous block copied from the trial.
    block: usize,
    /// Bytes of one padded trial slot.
    padded: usize,
    size: usize,
}

impl Padding {
    fn new(shape: &[u64], padded_shape: &[u64], size: usize) -> Padding {
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let padded_shape: Vec<usize> = padded_shape.iter().map(|&d| d as usize).collect();
        let axis = (0..shape.len())
            .rev()
            .find(|&a| shape[a] != padded_shape[a]);
        let block = shape[axis.unwrap_or(0)..].iter().product::<usize>() * size;
        let padded = padded_shape.iter().product::<usize>() * size;
        Padding {
            shape,
            padded_shape,
            axis,
            block,
            padded,
            size,
        }
    }

    /// Whether a trial's bytes are one block at the start of its slot (fill, if any, after it),
    /// so a payload can be read straight into place.
    fn contiguous(&self) -> bool {
        self.axis.is_none_or(|a| a == 0)
    }

    /// Writes one trial (`le`: its little-endian C-order bytes) into its padded slot.
    fn place(&self, le: &[u8], slot: &mut [u8], fill: &[u8]) {
        let Some(axis) = self.axis else {
            slot.copy_from_slice(le);
            return;
        };
        // Byte strides of the padded slot over the axes before `axis`.
        let mut strides = vec![0usize; axis];
        let mut stride = self.padded_shape[axis..].iter().product::<usize>() * self.size;
        for a in (0..axis).rev() {
            strides[a] = stride;
            stride *= self.padded_shape[a];
        }
        let mut index = vec![0usize; axis];
        let mut end = 0;
        for block in le.chunks_exact(self.block) {
            let offset: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
            write_fill(&mut slot[end..offset], fill);
            end = offset + block.len();
            slot[offset..end].copy_from_slice(block);
            for a in (0..axis).rev() {
                index[a] += 1;
                if index[a] < self.shape[a] {
                    break;
                }
                index[a] = 0;
            }
        }
        write_fill(&mut slot[end..], fill);
    }
}

/// A run of fill-value elements to copy from (64 KiB, whole elements).
fn fill_pattern(dtype: Dtype) -> Vec<u8> {
    let element = fill_bytes(dtype);
    element.repeat((65_536 / element.len().max(1)).max(1))
}

/// Overwrites `out` (a whole number of elements) with fill.
fn write_fill(out: &mut [u8], pattern: &[u8]) {
    for run in out.chunks_mut(pattern.len()) {
        run.copy_from_slice(&pattern[..run.len()]);
    }
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

/// Frames before the trailing frames in which every value is NaN: over all rows (the last axis
/// being frames), the largest index of a non-NaN value, plus one. Rows are scanned from their end
/// and only as far as they could raise the answer.
pub fn valid_frames(dtype: Dtype, le: &[u8], frames: usize) -> usize {
    if dtype.kind != Kind::Float || frames == 0 {
        return frames;
    }
    let size = dtype.size;
    let mut best = 0;
    for row in le.chunks_exact(frames * size) {
        // The usual row: NaN from `best` on, so it cannot raise the answer.
        if !any_nan_is(false, size, &row[best * size..]) {
            continue;
        }
        let mut k = frames;
        while k > best && is_nan(size, &row[(k - 1) * size..k * size]) {
            k -= 1;
        }
        if k > best {
            best = k;
            if best == frames {
                break;
            }
        }
    }
    best
}

/// Checks one trial against its stage's `nan` policy. `le` is the trial's values in little-endian
/// C order, last axis = frames.
///
/// With `tail_only`, the trial's tail is its trailing frames in which every value is NaN (the
/// frames the `valid_frames` measure excludes, computed by that same function); a NaN in any
/// frame before the tail is an error, returned as a message naming the frame and the element.
pub fn check_trial_nan(
    policy: NanPolicy,
    dtype: Dtype,
    shape: &[u64],
    le: &[u8],
) -> std::result::Result<(), String> {
    if policy == NanPolicy::Allow || dtype.kind != Kind::Float || !matches!(dtype.size, 2 | 4 | 8) {
        return Ok(());
    }
    let frames = shape.last().copied().unwrap_or(1).max(1) as usize;
    let size = dtype.size;
    let valid = valid_frames(dtype, le, frames);
    // Each row's frames before the tail are scanned by a branch-free `any_nan`; only a row that
    // has a NaN there is scanned again element by element, to name it.
    let Some(i) = le.chunks(frames * size).enumerate().find_map(|(r, row)| {
        let head = &row[..(valid * size).min(row.len())];
        if !any_nan(size, head) {
            return None;
        }
        let k = head.chunks_exact(size).position(|b| is_nan(size, b))?;
        Some(r * frames + k)
    }) else {
        return Ok(());
    };
    let mut index = Vec::with_capacity(shape.len());
    let mut rest = i as u64;
    for &d in shape.iter().rev() {
        let d = d.max(1);
        index.push(rest % d);
        rest /= d;
    }
    index.reverse();
    Err(format!(
        "NaN at frame {} (index {index:?}) before the trial's NaN tail: only the trailing {} of {frames} frames may be NaN",
        i % frames,
        frames - valid
    ))
}

/// Whether a little-endian float element of `size` bytes (2, 4 or 8) is NaN.
fn is_nan(size: usize, b: &[u8]) -> bool {
    match size {
        4 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_nan(),
        8 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]).is_nan(),
        _ => half::f16::from_le_bytes([b[0], b[1]]).is_nan(),
    }
}

/// Whether any element (`N` bytes) of `le` passes `test`. Blocks without early exit inside a
/// block, elements taken as fixed-size arrays: the loop vectorises (built from single bytes it
/// does not, and runs many times slower; docs/performance.md, "Vectorised NaN-tail check").
fn any_element<const N: usize>(le: &[u8], test: impl Fn([u8; N]) -> bool) -> bool {
    const BLOCK: usize = 4096;
    le.chunks(BLOCK).any(|block| {
        block.chunks_exact(N).fold(false, |acc, b| {
            let Ok(b) = <[u8; N]>::try_from(b) else {
                return acc;
            };
            acc | test(b)
        })
    })
}

/// Whether any little-endian float element of `size` bytes (2, 4 or 8) in `le` is NaN (exponent
/// all ones, mantissa non-zero), or with `!nan`, whether any is not NaN.
fn any_nan_is(nan: bool, size: usize, le: &[u8]) -> bool {
    match size {
        4 => any_element::<4>(le, |b| {
            (u32::from_le_bytes(b) & 0x7fff_ffff > 0x7f80_0000) == nan
        }),
        8 => any_element::<8>(le, |b| {
            (u64::from_le_bytes(b) & 0x7fff_ffff_ffff_ffff > 0x7ff0_0000_0000_0000) == nan
        }),
        2 => any_element::<2>(le, |b| (u16::from_le_bytes(b) & 0x7fff > 0x7c00) == nan),
        _ => !nan,
    }
}

/// Whether any float element of `size` bytes in `le` is NaN.
fn any_nan(size: usize, le: &[u8]) -> bool {
    any_nan_is(true, size, le)
}

/// Every value is zero (NaN is not zero). Floats compare their bits without the sign bit, in
/// blocks without early exit inside a block, so the loop vectorises (elements are taken as
/// fixed-size arrays: built from single bytes, the loop does not vectorise and runs many times
/// slower).
pub fn all_zero(dtype: Dtype, le: &[u8]) -> bool {
    const BLOCK: usize = 4096;
    match (dtype.kind, dtype.size) {
        (Kind::Float, 4) => le.chunks(BLOCK).all(|block| {
            block.chunks_exact(4).fold(0u32, |acc, b| {
                let Ok(b) = <[u8; 4]>::try_from(b) else {
                    return acc;
                };
                acc | (u32::from_le_bytes(b) & 0x7fff_ffff)
            }) == 0
        }),
        (Kind::Float, 8) => le.chunks(BLOCK).all(|block| {
            block.chunks_exact(8).fold(0u64, |acc, b| {
                let Ok(b) = <[u8; 8]>::try_from(b) else {
                    return acc;
                };
                acc | (u64::from_le_bytes(b) & 0x7fff_ffff_ffff_ffff)
            }) == 0
        }),
        (Kind::Float, _) => le.chunks(BLOCK).all(|block| {
            block.chunks_exact(2).fold(0u16, |acc, b| {
                let Ok(b) = <[u8; 2]>::try_from(b) else {
                    return acc;
                };
                acc | (u16::from_le_bytes(b) & 0x7fff)
            }) == 0
        }),
        _ => le.iter().all(|&b| b == 0),
    }
}

impl StageKind for TrialArrayConfig {
    const KIND: &'static str = "trial_array";
    type Plan<'p> = TrialPlan<'p, TrialArrayConfig>;

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
        let rank = self.dimension_names.len();
        if rank < 2 {
            return Err(ConfigProblem::new(
                "dimension_names needs the trial axis and at least one more",
                HINT,
            ));
        }
        if self.chunk_shape.len() != rank || self.shard_shape.len() != rank {
            return Err(ConfigProblem::new(
                format!("chunk_shape and shard_shape need {rank} extents, one per dimension name"),
                HINT,
            ));
        }
        if ZarrPath::parse(&self.output).is_none_or(|p| p.is_root()) {
            return Err(ConfigProblem::new(
                format!(
                    "output {:?} is not an array inside a `.zarr` group",
                    self.output
                ),
                "write arrays to e.g. `data.zarr/videos`",
            ));
        }
        let frames_last = self
            .dimension_names
            .last()
            .is_some_and(|d| d == FRAME_DIMENSION);
        let reads_frames =
            self.measures.contains(&Measure::ValidFrames) || self.nan == NanPolicy::TailOnly;
        if reads_frames && !frames_last {
            return Err(ConfigProblem::new(
                format!("the `valid_frames` measure and `nan: tail_only` read the frame axis, and the last of dimension_names is not `{FRAME_DIMENSION}`"),
                "remove them for arrays without a frame axis, or name the last axis `frame`",
            ));
        }
        kind::check_codec(&self.compression, false)
    }

    fn has_frame_axis(&self) -> bool {
        self.dimension_names.iter().any(|d| d == FRAME_DIMENSION)
    }

    fn measures(&self) -> &[Measure] {
        &self.measures
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
        let source = ctx.source;
        if p.trial_shape.len() + 1 != self.dimension_names.len() {
            return Err(Error::bad_input(
                format!("{}: {}", source.path.display(), self.source),
                format!(
                    "trials have {} axes but stage {} names {} dimensions after the trial axis",
                    p.trial_shape.len(),
                    self.id,
                    self.dimension_names.len() - 1
                ),
                "fix `dimension_names` in the pipeline, or check the source",
            ));
        }
        let trials = p.trials.len() as u64;
        ctx.dims
            .add(&self.dimension_names[0], trials, &self.source, source)?;
        for (name, &len) in self.dimension_names[1..].iter().zip(&p.trial_shape) {
            ctx.dims.add(name, len, &self.source, source)?;
        }
        Ok(p)
    }

    fn zarr_arrays(_plan: &Self::Plan<'_>) -> Vec<String> {
        vec![String::new()]
    }

    fn trial_dtype(plan: &Self::Plan<'_>) -> Option<Dtype> {
        Some(plan.dtype)
    }

    fn memory(plan: &Self::Plan<'_>, source: &Source, pipeline_file: &str) -> Result<StageNeed> {
        let shard = shard_shape(plan, pipeline_file)?;
        let (read, encoded) = thread_buffer_bytes(plan, pipeline_file)?;
        let entry = kind::largest_entry(source, plan.trials.iter());
        Ok(StageNeed {
            fixed: 0,
            per_thread: read
                .saturating_add(encoded)
                .saturating_add(entry.saturating_mul(2))
                .saturating_add(BOUNCE_CAPACITY),
            // The unit it encodes for another thread's shard, as incompressible.
            per_helping_thread: read,
            items: plan.trials.len().div_ceil(shard[0].max(1) as usize),
        })
    }

    fn run(ctx: &StageContext, plan: &Self::Plan<'_>) -> Result<StageResult> {
        run(ctx, plan)
    }

    const RUNS_IN_PARTS: bool = true;

    fn part_block(plan: &Self::Plan<'_>, pipeline_file: &str) -> Result<Option<usize>> {
        trials_per_shard(plan, pipeline_file).map(Some)
    }

    fn run_part(
        ctx: &StageContext,
        plan: &Self::Plan<'_>,
        part: Range<usize>,
    ) -> Result<StageResult> {
        run_part(ctx, plan, part)
    }

    fn finish_parts(ctx: &StageContext, plan: &Self::Plan<'_>) -> Result<Vec<String>> {
        Ok(vec![write_metadata(ctx, plan)?])
    }

    fn check_output(dir: &Path, _plan: &Plan, p: &Self::Plan<'_>) -> Result<()> {
        let c = p.config;
        let mut shape = vec![p.trials.len() as u64];
        shape.extend(&p.trial_shape);
        validate::check_zarr_array(&ExpectedArray {
            path: &dir.join(&c.output),
            shape: &shape,
            data_type: &validate::zarr_type_name(p.dtype),
            dimension_names: &c.dimension_names,
        })?;
        Ok(())
    }

    fn describe(source: &Source, plan: &Self::Plan<'_>) -> Result<Description> {
        let c = plan.config;
        let mut description = Description {
            variable: Some(kind::variable(
                &c.id,
                &c.source,
                plan.dtype.to_string(),
                &plan.trials,
                &plan.trial_shape,
            )),
            ..Description::default()
        };
        if c.measures.contains(&Measure::ValidFrames) {
            description.valid_frames = valid_frame_counts(source, plan)?;
        }
        Ok(description)
    }
}

/// Valid-frame length -> number of trials, read from every trial (for `inspect`).
fn valid_frame_counts(
    source: &Source,
    plan: &TrialPlan<TrialArrayConfig>,
) -> Result<BTreeMap<u64, usize>> {
    let frames = *plan.trial_shape.last().unwrap_or(&0) as usize;
    let lengths: Vec<Result<usize>> = plan
        .trials
        .par_iter()
        .map_init(
            || source.reader(),
            |reader, a| {
                let reader = reader
                    .as_mut()
                    .map_err(|e| Error::Internal(e.to_string()))?;
                let (header, bytes) = read_npy(source, reader.as_mut(), &source.entries[a.entry])?;
                let le = npy::to_little_endian_c(&header, &bytes[header.payload_offset..]);
                Ok(valid_frames(header.dtype, &le, frames))
            },
        )
        .collect();
    let mut counts = BTreeMap::new();
    for length in lengths {
        *counts.entry(length? as u64).or_insert(0) += 1;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn helped(tail: &Arc<ShardTail>, unit: usize) -> Helping {
        Helping {
            tail: tail.clone(),
            unit,
            done: Some((EncodedRun::default(), Ok(Vec::new()))),
        }
    }

    #[test]
    fn a_shard_tail_hands_each_unit_out_once() {
        let tail = Arc::new(ShardTail::new(7, 4));
        let tails = Mutex::new(vec![tail.clone()]);
        // The shard's thread has unit 0; it takes from the front, helpers from the back.
        assert_eq!(tail.take_front(), Some(1));
        let (claimed, unit) = ShardTail::claim_last(&tails).expect("units left");
        assert_eq!((claimed.group, unit), (7, 3));
        assert_eq!(tail.take_front(), Some(2));
        assert!(
            ShardTail::claim_last(&tails).is_none(),
            "nothing left to claim"
        );
        assert_eq!(tail.take_front(), None);
        drop(helped(&claimed, unit));
        let done = tail.wait_for_helpers();
        assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), vec![3]);

        // A helper that stops without a result hands over an error, not nothing.
        let tail = Arc::new(ShardTail::new(0, 2));
        let tails = Mutex::new(vec![tail.clone()]);
        let (claimed, unit) = ShardTail::claim_last(&tails).expect("unit 1");
        assert_eq!(unit, 1);
        drop(Helping {
            tail: claimed,
            unit,
            done: None,
        });
        let done = tail.wait_for_helpers();
        assert!(done.len() == 1 && done[0].0 == 1 && done[0].2.is_err());
        // A one-unit shard is its thread's alone.
        let tail = Arc::new(ShardTail::new(0, 1));
        let tails = Mutex::new(vec![tail.clone()]);
        assert!(ShardTail::claim_last(&tails).is_none());
        assert_eq!(tail.take_front(), None);
    }

    #[test]
    fn a_shard_tail_shared_by_threads_gets_every_unit_back_in_order() {
        for units in [1, 2, 5, 64] {
            let tail = Arc::new(ShardTail::new(0, units));
            let tails = Mutex::new(vec![tail.clone()]);
            let mut mine = vec![0];
            std::thread::scope(|scope| {
                for _ in 0..3 {
                    scope.spawn(|| {
                        while let Some((claimed, unit)) = ShardTail::claim_last(&tails) {
                            std::thread::yield_now();
                            drop(helped(&claimed, unit));
                        }
                    });
                }
                while let Some(unit) = tail.take_front() {
                    std::thread::yield_now();
                    mine.push(unit);
                }
            });
            let theirs: Vec<usize> = tail.wait_for_helpers().iter().map(|d| d.0).collect();
            let all: Vec<usize> = mine.iter().chain(&theirs).copied().collect();
            assert_eq!(
                all,
                (0..units).collect::<Vec<_>>(),
                "mine {mine:?}, theirs {theirs:?}"
            );
        }
    }

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
    fn padding_places_blocks_and_fills_the_rest() {
        let fill = [9u8];
        // (2, 3) trial in a (3, 4) slot: rows of 3 bytes at 0 and 4, fill elsewhere.
        let p = Padding::new(&[2, 3], &[3, 4], 1);
        assert!(!p.contiguous());
        let mut out = vec![7u8; 12];
        p.place(&[1, 2, 3, 4, 5, 6], &mut out, &fill);
        assert_eq!(out, [1, 2, 3, 9, 4, 5, 6, 9, 9, 9, 9, 9]);
        // Padded first axis only: one block, then fill.
        let p = Padding::new(&[2, 2], &[3, 2], 1);
        assert!(p.contiguous());
        let mut out = vec![7u8; 6];
        p.place(&[1, 2, 3, 4], &mut out, &fill);
        assert_eq!(out, [1, 2, 3, 4, 9, 9]);
        // No padding: a straight copy.
        let p = Padding::new(&[2, 2], &[2, 2], 1);
        assert!(p.contiguous());
        let mut out = vec![7u8; 4];
        p.place(&[1, 2, 3, 4], &mut out, &fill);
        assert_eq!(out, [1, 2, 3, 4]);
        let mut out = vec![0u8; 5];
        write_fill(&mut out, &[5, 5]);
        assert_eq!(out, [5, 5, 5, 5, 5]);
    }

    #[test]
    fn valid_frames_f64_and_all_zero_f64() {
        let dt = Dtype::parse("<f8").unwrap();
        let b: Vec<u8> = [1.0f64, f64::NAN, f64::NAN, 2.0, 3.0, f64::NAN]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(valid_frames(dt, &b, 3), 2);
        let z: Vec<u8> = [0.0f64, -0.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert!(all_zero(dt, &z));
    }

    #[test]
    fn all_zero_is_false_with_nan_or_values() {
        let dt = Dtype::parse("<f4").unwrap();
        assert!(all_zero(dt, &f32_bytes(&[0.0, -0.0, 0.0])));
        assert!(!all_zero(dt, &f32_bytes(&[0.0, f32::NAN])));
        assert!(!all_zero(dt, &f32_bytes(&[0.0, 1e-30])));
    }

    #[test]
    fn any_nan_agrees_with_is_nan() {
        let specials32 = [
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
        ];
        let nans32 = [
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffc0_0000),
        ];
        assert!(!any_nan(4, &f32_bytes(&specials32)));
        for n in nans32 {
            let mut v = specials32.to_vec();
            v.insert(3, n);
            assert!(any_nan(4, &f32_bytes(&v)) && is_nan(4, &n.to_le_bytes()));
        }
        let b64 = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        assert!(!any_nan(
            8,
            &b64(&[0.0, f64::INFINITY, -f64::INFINITY, 1e300])
        ));
        assert!(any_nan(
            8,
            &b64(&[0.0, f64::from_bits(0x7ff0_0000_0000_0001)])
        ));
        let b16 = |v: &[half::f16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        assert!(!any_nan(
            2,
            &b16(&[half::f16::INFINITY, half::f16::MAX, half::f16::ZERO])
        ));
        assert!(any_nan(2, &b16(&[half::f16::ZERO, half::f16::NAN])));
        assert!(any_nan(2, &b16(&[half::f16::from_bits(0xfc01)])));
        // And the other way round: whether any element is not NaN.
        assert!(!any_nan_is(false, 4, &f32_bytes(&nans32)));
        assert!(any_nan_is(false, 4, &f32_bytes(&[f32::NAN, f32::INFINITY])));
        assert!(!any_nan_is(false, 8, &b64(&[f64::NAN, -f64::NAN])));
        assert!(!any_nan_is(false, 4, &[]));
    }

    #[test]
    fn nan_tail_only() {
        let dt = Dtype::parse("<f4").unwrap_or_else(|e| panic!("{e}"));
        let n = f32::NAN;
        let tail = NanPolicy::TailOnly;
        // 2 rows x 4 frames, tail = frame 3.
        assert!(check_trial_nan(
            tail,
            dt,
            &[2, 4],
            &f32_bytes(&[1., 2., 3., n, 4., 5., 6., n])
        )
        .is_ok());
        let err = check_trial_nan(
            tail,
            dt,
            &[2, 4],
            &f32_bytes(&[1., n, 3., n, 4., 5., 6., n]),
        )
        .unwrap_err();
        assert!(err.contains("frame 1") && err.contains("[0, 1]"), "{err}");
        // A frame NaN in one row only is not part of the tail.
        assert!(check_trial_nan(
            tail,
            dt,
            &[2, 4],
            &f32_bytes(&[1., 2., 3., n, 4., 5., 6., 7.])
        )
        .is_err());
        // All NaN: everything is tail.
        assert!(check_trial_nan(tail, dt, &[1, 2], &f32_bytes(&[n, n])).is_ok());
        assert!(check_trial_nan(NanPolicy::Allow, dt, &[1, 2], &f32_bytes(&[n, 1.])).is_ok());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// The scans' plain definitions, element by element.
        fn naive(v: &[f64], frames: usize) -> (usize, Option<usize>, bool) {
            let valid = v
                .chunks(frames)
                .map(|row| row.iter().rposition(|x| !x.is_nan()).map_or(0, |k| k + 1))
                .max()
                .unwrap_or(0);
            let first_bad = (0..v.len()).find(|&i| i % frames < valid && v[i].is_nan());
            (valid, first_bad, v.iter().all(|&x| x == 0.0))
        }

        fn value(code: u8) -> f64 {
            match code {
                0 => f64::NAN,
                1 => -f64::NAN,
                2 => 0.0,
                3 => -0.0,
                4 => f64::INFINITY,
                5 => f64::NEG_INFINITY,
                _ => 1.5,
            }
        }

        proptest! {
            #[test]
            fn vectorised_scans_match_their_definitions(
                rows in 1usize..5,
                frames in 1usize..70,
                tail in 0usize..70,
                codes in prop::collection::vec(0u8..8, 350),
            ) {
                let mut v: Vec<f64> = codes[..rows * frames].iter().map(|&c| value(c)).collect();
                // A NaN tail over every row, as the real data have.
                for (i, x) in v.iter_mut().enumerate() {
                    if i % frames >= frames.saturating_sub(tail) {
                        *x = f64::NAN;
                    }
                }
                let (valid, first_bad, zero) = naive(&v, frames);
                let shape = [rows as u64, frames as u64];
                for dt in ["<f4", "<f8", "<f2"] {
                    let dtype = Dtype::parse(dt).unwrap_or_else(|e| panic!("{e}"));
                    let le: Vec<u8> = match dtype.size {
                        4 => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
                        8 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
                        _ => v.iter().flat_map(|&x| half::f16::from_f64(x).to_le_bytes()).collect(),
                    };
                    prop_assert_eq!(valid_frames(dtype, &le, frames), valid, "{}", dt);
                    prop_assert_eq!(all_zero(dtype, &le), zero, "{}", dt);
                    let checked = check_trial_nan(NanPolicy::TailOnly, dtype, &shape, &le);
                    match first_bad {
                        None => prop_assert!(checked.is_ok(), "{}: {:?}", dt, checked),
                        Some(i) => {
                            let err = checked.err().unwrap_or_default();
                            let want = format!("index [{}, {}]", i / frames, i % frames);
                            prop_assert!(err.contains(&want), "{}: {} lacks {}", dt, err, want);
                        }
                    }
                }
            }
        }
    }
}
