//! Runs a pipeline over one source: plan, decide which stages to (re)run, run them, validate
//! between stages, write the manifest and lock, then rename into the store atomically.
//!
//! Everything is built in a hidden staging folder (`STORE/.<name>.partial`) that records each
//! finished stage (`.progress.json`), so a killed run resumes where it stopped; a dataset
//! folder only ever appears whole, with `manifest.json` written last inside it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::keys::{decide, stage_keys, Decision, Origin, StageKey};
use super::memory::{self, MemoryModel, ThreadChoice};
use super::plan::{plan, Disposition, Plan};
use super::spec::Pipeline;
use crate::catalog::{self, CatalogRow};
use crate::error::{Error, Result};
use crate::lock::{self, write_synced, Lock, LockSource, LockedEntry, Progress, StageLock};
use crate::manifest::{
    self, Counts, EntryInfo, Manifest, OutputInfo, PipelineInfo, SourceInfo, Tool,
};
use crate::progress::{self, ProgressMode, StageProgress};
use crate::source::Source;
use crate::stages::meta_table::tier_counts;
use crate::stages::registry::{Stage, StagePlan};
use crate::stages::{Measure, MeasureValues, StageContext, StageResult};
use crate::validate::{self, contract};
use crate::writers::output_store::WriteLog;
use crate::writers::zarr::{ZarrPath, ZarrStore};
use crate::writers::Provenance;

pub const RUN_RECORD: &str = "run.json";

pub struct ConvertOptions {
    pub source: PathBuf,
    pub store: PathBuf,
    pub name: Option<String>,
    pub pipeline_text: String,
    /// How to name the pipeline file in messages.
    pub pipeline_file: String,
    pub force: bool,
    /// Worker threads; `None` uses every core the process may use.
    pub threads: Option<usize>,
    /// Memory the run must fit in (fewer threads if needed); `None`: the cgroup's or SLURM's
    /// limit, if any (`memory::detect_limit`).
    pub max_memory: Option<u64>,
    /// Write large Zarr objects with direct I/O where the file system takes it
    /// (`writers::output_store`); `false`: through the page cache.
    pub direct_io: bool,
    /// How progress is shown.
    pub progress: ProgressMode,
}

#[derive(Debug, serde::Serialize)]
pub struct StageReport {
    pub id: String,
    pub kind: String,
    /// `ran`, or `reused` with where from.
    pub action: String,
    pub entries: usize,
    pub bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ConvertReport {
    pub dataset: String,
    pub dataset_dir: PathBuf,
    /// Nothing needed doing: the dataset matches the source and pipeline.
    pub up_to_date: bool,
    pub trials: usize,
    pub dimensions: BTreeMap<String, u64>,
    pub source_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
    pub threads: usize,
    /// Peak resident memory of this conversion, where the system reports it (Linux).
    pub peak_memory_bytes: Option<u64>,
    pub stages: Vec<StageReport>,
}

/// What `plan` / `convert --dry-run` shows.
#[derive(Debug, serde::Serialize)]
pub struct RunPlan {
    pub dataset: String,
    /// The pipeline's name and where it came from (a file, or embedded and picked by content).
    pub pipeline: String,
    pub pipeline_file: String,
    pub dataset_dir: PathBuf,
    pub up_to_date: bool,
    pub stages: Vec<PlannedStage>,
    /// Threads the run would use and the memory it may need; None when nothing would run.
    pub threads: Option<ThreadChoice>,
}

#[derive(Debug, serde::Serialize)]
pub struct PlannedStage {
    pub id: String,
    pub kind: String,
    pub run: bool,
    pub reason: String,
    /// What it reads: its source folder, and `stage.measure` of earlier stages (the graph's edges).
    pub reads: Vec<String>,
    pub writes: String,
}

/// Everything known before any output is written.
pub(crate) struct Prepared<'p> {
    pub(crate) pipeline: &'p Pipeline,
    pub(crate) pipeline_file: String,
    pub(crate) source: Source,
    pub(crate) name: String,
    pub(crate) dataset_dir: PathBuf,
    pub(crate) staging_dir: PathBuf,
    /// Where the stages decided `Reuse { origin: Shards }` find their files (`finalize`).
    pub(crate) shards_dir: Option<PathBuf>,
    pub(crate) plan: Plan<'p>,
    pub(crate) keys: Vec<StageKey>,
    pub(crate) source_fingerprint: String,
    pub(crate) pipeline_hash: String,
    pub(crate) existing: Option<Lock>,
    pub(crate) decisions: Vec<Decision>,
}

pub(crate) fn prepare<'p>(opts: &ConvertOptions, pipeline: &'p Pipeline) -> Result<Prepared<'p>> {
    let source = Source::open(&opts.source)?;
    let name = opts.name.clone().unwrap_or_else(|| source.dataset_name());
    check_dataset_name(&name)?;
    let dataset_dir = opts.store.join(&name);
    let staging_dir = opts.store.join(format!(".{name}.partial"));
    recover_interrupted_publish(&opts.store, &name, &dataset_dir)?;
    let plan = plan(pipeline, &source)?;
    let (source_fingerprint, keys) = stage_keys(pipeline, &source, &plan, &name);
    let existing = read_existing(&dataset_dir, opts.force, &source_fingerprint)?;
    let progress =
        Progress::read(&staging_dir).filter(|p| p.source_fingerprint == source_fingerprint);
    let decisions = decide(
        pipeline,
        &keys,
        existing.as_ref(),
        progress.as_ref(),
        &staging_dir,
        &dataset_dir,
        opts.force,
    );
    Ok(Prepared {
        pipeline,
        pipeline_file: opts.pipeline_file.clone(),
        source,
        shards_dir: None,
        name,
        dataset_dir,
        staging_dir,
        plan,
        keys,
        source_fingerprint,
        pipeline_hash: Pipeline::hash(&opts.pipeline_text),
        existing,
        decisions,
    })
}

impl Prepared<'_> {
    pub(crate) fn up_to_date(&self) -> bool {
        self.existing
            .as_ref()
            .is_some_and(|l| l.pipeline_hash == self.pipeline_hash)
            && self.decisions.iter().all(|d| {
                matches!(
                    d,
                    Decision::Reuse {
                        origin: Origin::Existing,
                        ..
                    }
                )
            })
    }
}

/// A dataset in the store: its lock, when it is complete and from this very source. Without
/// `--force`, a dataset from another source is never touched.
fn read_existing(dataset_dir: &Path, force: bool, fingerprint: &str) -> Result<Option<Lock>> {
    if !dataset_dir.exists() {
        return Ok(None);
    }
    let lock = Lock::read(&dataset_dir.join(lock::FILE_NAME)).ok();
    if force {
        return Ok(lock);
    }
    match lock {
        Some(l)
            if l.source.fingerprint == fingerprint
                && dataset_dir.join(manifest::FILE_NAME).exists() =>
        {
            Ok(Some(l))
        }
        Some(_) => Err(Error::Exists {
            path: dataset_dir.to_path_buf(),
            why: "it was converted from a different source (or the source has changed since)"
                .into(),
        }),
        None => Err(Error::Exists {
            path: dataset_dir.to_path_buf(),
            why: "it has no readable lock file, so it cannot be updated in place".into(),
        }),
    }
}

/// A publish interrupted between its two renames leaves the old dataset aside: put it back.
fn recover_interrupted_publish(store: &Path, name: &str, dataset_dir: &Path) -> Result<()> {
    let aside = store.join(format!(".{name}.replaced"));
    if aside.exists() {
        if dataset_dir.exists() {
            std::fs::remove_dir_all(&aside)
                .map_err(|e| Error::io(&aside, "cannot remove a replaced dataset", e))?;
        } else {
            std::fs::rename(&aside, dataset_dir).map_err(|e| {
                Error::io(
                    &aside,
                    "cannot restore the dataset moved aside by an interrupted run",
                    e,
                )
            })?;
        }
    }
    Ok(())
}

/// What would run, and why, without writing anything.
pub fn plan_run(opts: &ConvertOptions) -> Result<RunPlan> {
    let pipeline = Pipeline::parse(&opts.pipeline_text, &opts.pipeline_file)?;
    let prep = prepare(opts, &pipeline)?;
    let stages = pipeline
        .stages
        .iter()
        .zip(&prep.decisions)
        .map(|(s, d)| PlannedStage {
            id: s.id().into(),
            kind: s.name().into(),
            run: matches!(d, Decision::Run { .. }),
            reason: d.reason(),
            reads: std::iter::once(s.source().to_string())
                .chain(s.reads().iter().map(|(stage, m)| format!("{stage}.{m}")))
                .collect(),
            writes: s.output().to_string(),
        })
        .collect();
    let threads = if prep.up_to_date() {
        None
    } else {
        Some(thread_choice(opts, &prep, |i| may_run(&prep, i))?)
    };
    Ok(RunPlan {
        threads,
        pipeline: pipeline.pipeline.clone(),
        pipeline_file: opts.pipeline_file.clone(),
        up_to_date: prep.up_to_date(),
        dataset: prep.name.clone(),
        dataset_dir: prep.dataset_dir.clone(),
        stages,
    })
}

/// Worker threads: as asked, or every core the process may use, then as many of those as fit
/// in the memory limit (`memory::choose_threads`) with the stages that `runs` (by index).
pub(crate) fn thread_choice(
    opts: &ConvertOptions,
    prep: &Prepared,
    runs: impl Fn(usize) -> bool,
) -> Result<ThreadChoice> {
    let model = MemoryModel::new(&prep.plan, runs, &prep.source, &opts.pipeline_file)?;
    Ok(memory::choose_threads(
        opts.threads,
        opts.max_memory,
        &model,
    ))
}

/// Whether stage `index` may run: a stage reused from the store or a partial run still runs
/// when its files turn out damaged; one whose shards the tasks wrote does not (`finalize`).
fn may_run(prep: &Prepared, index: usize) -> bool {
    !matches!(
        prep.decisions.get(index),
        Some(Decision::Reuse {
            origin: Origin::Shards,
            ..
        })
    )
}

/// The locks of stages whose outputs a sharded run's tasks wrote, by stage index.
pub(crate) type AssembleShards<'a> =
    dyn Fn(&Pipeline, &Prepared) -> Result<Vec<(usize, StageLock)>> + 'a;

pub fn convert(opts: &ConvertOptions) -> Result<ConvertReport> {
    convert_with(opts, None)
}

/// `finalize` of a sharded run: a conversion whose `trial_array` stages are taken from the
/// shards folder (`collect` checks the receipts and returns their locks) instead of being run.
pub(crate) fn convert_assembled(
    opts: &ConvertOptions,
    shards_dir: &Path,
    collect: &AssembleShards,
) -> Result<ConvertReport> {
    convert_with(opts, Some((shards_dir, collect)))
}

fn convert_with(
    opts: &ConvertOptions,
    shards: Option<(&Path, &AssembleShards)>,
) -> Result<ConvertReport> {
    let started = Instant::now();
    reset_peak_memory();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let pipeline = Pipeline::parse(&opts.pipeline_text, &opts.pipeline_file)?;
    let mut prep = prepare(opts, &pipeline)?;
    if let Some((dir, collect)) = shards {
        for (index, lock) in collect(&pipeline, &prep)? {
            prep.decisions[index] = Decision::Reuse {
                origin: Origin::Shards,
                lock,
            };
        }
        prep.shards_dir = Some(dir.to_path_buf());
    }
    let mut report = ConvertReport {
        dataset: prep.name.clone(),
        dataset_dir: prep.dataset_dir.clone(),
        up_to_date: false,
        trials: prep.plan.n_trials(),
        dimensions: prep.plan.dims.clone(),
        source_bytes: std::fs::metadata(&opts.source)
            .map(|m| {
                if m.is_file() {
                    m.len()
                } else {
                    prep.source.total_size()
                }
            })
            .unwrap_or(0),
        output_bytes: 0,
        seconds: 0.0,
        // Chosen below, once it is known that something runs (an up-to-date dataset needs no
        // threads, and no warnings about them).
        threads: 0,
        peak_memory_bytes: None,
        stages: Vec::new(),
    };
    if prep.up_to_date() {
        report.up_to_date = true;
        report.output_bytes = prep
            .existing
            .as_ref()
            .map_or(0, |l| l.stages.iter().map(|s| s.outputs.len() as u64).sum());
        report.seconds = started.elapsed().as_secs_f64();
        report.peak_memory_bytes = peak_memory_bytes();
        tracing::info!(dataset = %prep.name, "up to date");
        if !catalog::fragment_path(&opts.store, &prep.name).exists() {
            let manifest: Manifest = std::fs::read(prep.dataset_dir.join(manifest::FILE_NAME))
                .ok()
                .and_then(|t| serde_json::from_slice(&t).ok())
                .ok_or_else(|| {
                    Error::Internal("an up-to-date dataset has no readable manifest".into())
                })?;
            catalog::write(
                &opts.store,
                &catalog_row(&prep, &pipeline, &manifest.source.checksum)?,
            )?;
        }
        return Ok(report);
    }
    let choice = thread_choice(opts, &prep, |i| may_run(&prep, i))?;
    report.threads = choice.threads;
    std::fs::create_dir_all(&opts.store)
        .map_err(|e| Error::io(&opts.store, "cannot create the store folder", e))?;
    let staging = &prep.staging_dir;
    prepare_staging(&prep)?;
    let result = run_stages_and_publish(
        opts,
        &pipeline,
        &prep,
        report,
        &choice,
        started,
        started_unix,
    );
    // A failed run leaves nothing behind; an interrupted one keeps its staging folder, so the
    // same command resumes it.
    if matches!(result, Err(ref e) if !matches!(e, Error::Interrupted)) {
        let _ = std::fs::remove_dir_all(staging);
    }
    result
}

fn run_stages_and_publish(
    opts: &ConvertOptions,
    pipeline: &Pipeline,
    prep: &Prepared,
    mut report: ConvertReport,
    choice: &ThreadChoice,
    started: Instant,
    started_unix: u64,
) -> Result<ConvertReport> {
    let threads = choice.threads;
    let staging = &prep.staging_dir;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Internal(format!("cannot start {threads} threads: {e}")))?;

    let provenance = provenance(prep, pipeline);
    let mut progress = Progress {
        source_fingerprint: prep.source_fingerprint.clone(),
        stages: Vec::new(),
    };
    let mut measures: BTreeMap<(String, Measure), MeasureValues> = BTreeMap::new();
    let writes = WriteLog::new(opts.direct_io);
    let groups = group_paths(pipeline, &prep.plan);
    for (index, (((stage, stage_plan), decision), key)) in pipeline
        .stages
        .iter()
        .zip(&prep.plan.stages)
        .zip(&prep.decisions)
        .zip(&prep.keys)
        .enumerate()
    {
        crate::interrupt::check()?;
        let t0 = Instant::now();
        // Reused outputs are checked against their recorded hashes first: damaged or changed
        // files make the stage run again instead of being carried into the new dataset.
        let checked;
        let decision = match decision {
            // A sharded run's files were checked against their receipts already.
            Decision::Reuse {
                origin: Origin::Shards,
                ..
            } => decision,
            Decision::Reuse { origin, lock } => {
                let dir = if *origin == Origin::Existing {
                    &prep.dataset_dir
                } else {
                    staging
                };
                match damaged_output(dir, lock) {
                    None => decision,
                    Some(file) => {
                        tracing::warn!(stage = stage.id(), file = %file, "a reusable output does not match its recorded hash; running the stage again");
                        if *origin == Origin::Partial {
                            remove_stage_outputs(staging, lock)?;
                        }
                        checked = Decision::Run {
                            reason: format!("{file} no longer matches its recorded hash"),
                        };
                        &checked
                    }
                }
            }
            run => run,
        };
        let stage_provenance = stage_provenance(&provenance, stage, key);
        let ctx = StageContext {
            source: &prep.source,
            pipeline,
            plan: &prep.plan,
            dataset_dir: staging,
            provenance: &stage_provenance,
            measures: &measures,
            pipeline_file: &opts.pipeline_file,
            writes: &writes,
        };
        let locked = match decision {
            Decision::Reuse { origin, lock } => {
                let mut lock = lock.clone();
                match origin {
                    Origin::Existing => link_outputs(&prep.dataset_dir, staging, &lock)?,
                    Origin::Partial => {}
                    Origin::Shards => {
                        let dir = prep.shards_dir.as_deref().ok_or_else(|| {
                            Error::Internal("shards reused without a shards folder".into())
                        })?;
                        link_outputs(dir, staging, &lock)?;
                        // The tasks wrote the parts; what they leave to the end is written once, here.
                        for file in stage_plan.finish_parts(&ctx)? {
                            let hash = validate::hash_file(&staging.join(&file))?.1;
                            lock.outputs.insert(file, hash);
                        }
                        stage_plan.check_output(staging, &prep.plan)?;
                    }
                }
                tracing::info!(stage = stage.id(), from = ?origin, "stage reused");
                lock
            }
            Decision::Run { reason } => {
                tracing::info!(stage = stage.id(), kind = stage.name(), reason = %reason, "stage started");
                let (entries, bytes) = stage_totals(&prep.source, &prep.plan, index);
                progress::set_current(Some(std::sync::Arc::new(StageProgress::new(
                    opts.progress,
                    stage.id(),
                    entries,
                    bytes,
                ))));
                let result: Result<StageResult> = pool.install(|| stage_plan.run(&ctx));
                progress::set_current(None);
                let result = result?;
                // Validation between stages: what this stage wrote, read back from disk.
                stage_plan.check_output(staging, &prep.plan)?;
                let outputs =
                    pool.install(|| hash_stage_outputs(staging, stage.output(), &groups, &writes))?;
                report.stages.push(StageReport {
                    id: stage.id().into(),
                    kind: stage.name().into(),
                    action: "ran".into(),
                    entries: result.entries.len(),
                    bytes: result.bytes,
                    seconds: 0.0,
                });
                lock_from_result(key, stage, &prep.source, outputs, &result)
            }
        };
        if let Decision::Reuse { origin, .. } = decision {
            report.stages.push(StageReport {
                id: stage.id().into(),
                kind: stage.name().into(),
                action: format!("reused ({origin:?})").to_lowercase(),
                entries: locked.entries.len(),
                bytes: 0,
                seconds: 0.0,
            });
        }
        for (m, values) in &locked.measures {
            let measure: Measure = serde_json::from_value(serde_json::Value::String(m.clone()))
                .map_err(|_| Error::Internal(format!("unknown measure {m} in a lock")))?;
            measures.insert((stage.id().to_string(), measure), values.clone());
        }
        progress.stages.push(locked);
        progress.write(staging)?;
        if let Some(last) = report.stages.last_mut() {
            last.seconds = t0.elapsed().as_secs_f64();
            tracing::info!(stage = %last.id, action = %last.action, entries = last.entries, bytes = last.bytes, seconds = last.seconds, "stage finished");
        }
    }

    write_groups(staging, pipeline, &provenance, &groups)?;
    if let Some(name) = &pipeline.contract {
        let c = contract::load(name)
            .ok_or_else(|| Error::Internal(format!("contract {name} vanished")))?;
        contract::check(&c, staging, &prep.plan.dims)?;
    }

    // Every output file: the stages' (from their locks) and the group metadata.
    let mut outputs: BTreeMap<String, String> = BTreeMap::new();
    for s in &progress.stages {
        outputs.extend(s.outputs.clone());
    }
    for g in groups.iter().map(ZarrPath::metadata_file) {
        outputs.insert(g.clone(), validate::hash_file(&staging.join(&g))?.1);
    }
    let on_disk: BTreeSet<String> = validate::list_files(staging)?
        .into_iter()
        .filter(|f| !is_bookkeeping(f))
        .collect();
    let expected: BTreeSet<String> = outputs.keys().cloned().collect();
    if on_disk != expected {
        let extra: Vec<_> = on_disk.difference(&expected).take(5).collect();
        let missing: Vec<_> = expected.difference(&on_disk).take(5).collect();
        return Err(Error::Internal(format!(
            "staging folder {} holds unexpected files {extra:?} or lacks {missing:?}",
            staging.display()
        )));
    }
    let output_infos: Vec<OutputInfo> = outputs
        .iter()
        .map(|(path, hash)| {
            let bytes = std::fs::metadata(staging.join(path))
                .map(|m| m.len())
                .map_err(|e| Error::io(staging.join(path), "cannot stat", e))?;
            Ok(OutputInfo {
                path: path.clone(),
                bytes,
                blake3: hash.clone(),
            })
        })
        .collect::<Result<_>>()?;
    report.output_bytes = output_infos.iter().map(|o| o.bytes).sum();

    let entries = entry_infos(prep, &progress)?;
    let manifest = Manifest {
        format: manifest::FORMAT.to_string(),
        tool: Tool {
            name: "sensorium-ingest".into(),
            version: crate::VERSION.into(),
        },
        dataset: prep.name.clone(),
        source: SourceInfo {
            name: prep.source.name.clone(),
            checksum: manifest::source_checksum(&entries),
            entries: entries.len(),
            bytes: prep.source.total_size(),
        },
        pipeline: PipelineInfo {
            name: pipeline.pipeline.clone(),
            hash: prep.pipeline_hash.clone(),
            text: opts.pipeline_text.clone(),
        },
        counts: Counts {
            trials: prep.plan.n_trials(),
            neurons: prep.plan.dims.get("neuron").copied(),
            frames: prep.plan.dims.get("frame").copied(),
        },
        dimensions: prep.plan.dims.clone(),
        entries,
        outputs: output_infos,
    };
    let manifest_text = to_json_text(&manifest)?;
    let lock = Lock {
        format: lock::FORMAT.into(),
        tool_version: crate::VERSION.into(),
        dataset: prep.name.clone(),
        source: LockSource {
            name: prep.source.name.clone(),
            fingerprint: prep.source_fingerprint.clone(),
        },
        pipeline_hash: prep.pipeline_hash.clone(),
        stages: progress.stages.clone(),
        manifest_blake3: blake3::hash(manifest_text.as_bytes()).to_hex().to_string(),
        checksum: String::new(),
    };
    report.seconds = started.elapsed().as_secs_f64();
    report.peak_memory_bytes = peak_memory_bytes();
    let (direct_writes, buffered_writes) = writes.counts();
    let run_record = serde_json::json!({
        "tool_version": crate::VERSION,
        "started_unix": started_unix,
        "seconds": report.seconds,
        "host": hostname(),
        "source_path": std::fs::canonicalize(&opts.source).unwrap_or_else(|_| opts.source.clone()),
        "source_kind": prep.source.kind,
        "pipeline_file": opts.pipeline_file,
        "threads": threads,
        "threads_wanted": choice.wanted,
        "memory_limit": choice.limit,
        "memory_estimate_bytes": choice.estimate_bytes,
        "peak_memory_bytes": report.peak_memory_bytes,
        "direct_io": opts.direct_io,
        "direct_io_writes": direct_writes,
        "buffered_zarr_writes": buffered_writes,
        "stages": report.stages,
    });
    write_synced(
        &staging.join(RUN_RECORD),
        to_json_text(&run_record)?.as_bytes(),
    )?;
    write_synced(&staging.join(lock::FILE_NAME), lock.to_json()?.as_bytes())?;
    // The manifest is written last: its presence is what marks the dataset complete.
    write_synced(&staging.join(manifest::FILE_NAME), manifest_text.as_bytes())?;
    let progress_file = staging.join(lock::PROGRESS_FILE);
    std::fs::remove_file(&progress_file)
        .map_err(|e| Error::io(&progress_file, "cannot remove", e))?;
    publish(staging, &prep.dataset_dir, &prep.name)?;
    catalog::write(
        &opts.store,
        &catalog_row(prep, pipeline, &manifest.source.checksum)?,
    )?;
    Ok(report)
}

/// The provenance of one stage's outputs.
pub(crate) fn stage_provenance(base: &Provenance, stage: &Stage, key: &StageKey) -> Provenance {
    Provenance {
        stage: stage.id().to_string(),
        stage_hash: key.config_hash.clone(),
        ..base.clone()
    }
}

/// A finished stage's lock: its key, the files it wrote and what it reported.
pub(crate) fn lock_from_result(
    key: &StageKey,
    stage: &Stage,
    source: &Source,
    outputs: BTreeMap<String, String>,
    result: &StageResult,
) -> StageLock {
    let entries = result
        .entries
        .iter()
        .map(|r| LockedEntry::from_record(&source.entries[r.entry].path, r))
        .collect();
    let measures = result
        .measures
        .iter()
        .map(|(m, v)| (m.to_string(), v.clone()))
        .collect();
    key.lock(stage, outputs, entries, measures)
}

/// What every output records about where it came from (`stage` filled in per stage).
pub(crate) fn provenance(prep: &Prepared, pipeline: &Pipeline) -> Provenance {
    Provenance {
        tool_version: crate::VERSION.to_string(),
        dataset: prep.name.clone(),
        source: prep.source.name.clone(),
        pipeline: pipeline.pipeline.clone(),
        pipeline_hash: prep.pipeline_hash.clone(),
        stage: String::new(),
        stage_hash: String::new(),
    }
}

/// The dataset's line in the store's catalog.
fn catalog_row(prep: &Prepared, pipeline: &Pipeline, source_checksum: &str) -> Result<CatalogRow> {
    let dtype = prep
        .plan
        .stages
        .iter()
        .find_map(|s| match s {
            StagePlan::TrialArray(t) => Some(t.dtype.little_endian_descr()),
            _ => None,
        })
        .unwrap_or_default();
    let dim = |name: &str| prep.plan.dims.get(name).map(|&d| d as i64);
    Ok(CatalogRow {
        dataset: prep.name.clone(),
        source_name: prep.source.name.clone(),
        source_checksum: source_checksum.to_string(),
        source_fingerprint: prep.source_fingerprint.clone(),
        n_trials: prep.plan.n_trials() as i64,
        tiers: tier_counts(&prep.source, &prep.plan)?
            .into_iter()
            .map(|(t, n)| (t, n as i64))
            .collect(),
        n_neurons: dim("neuron"),
        n_frames: dim("frame"),
        dtype,
        tool_version: crate::VERSION.into(),
        pipeline: pipeline.pipeline.clone(),
        pipeline_hash: prep.pipeline_hash.clone(),
        status: "complete".into(),
    })
}

/// Entries a stage reads and their stored size, for progress totals.
pub(crate) fn stage_totals(source: &Source, plan: &Plan, stage: usize) -> (u64, u64) {
    source
        .entries
        .iter()
        .zip(&plan.dispositions)
        .filter(|(_, d)| **d == Disposition::Stage(stage))
        .fold((0, 0), |(n, b), (e, _)| (n + 1, b + e.size))
}

/// Files the runner keeps for itself, not outputs.
fn is_bookkeeping(path: &str) -> bool {
    [
        manifest::FILE_NAME,
        lock::FILE_NAME,
        RUN_RECORD,
        lock::PROGRESS_FILE,
    ]
    .contains(&path)
        || path.starts_with(".progress.json")
}

/// Starts from a clean staging folder, or resumes one left by a killed run: the outputs of
/// stages it finished are kept, everything else in it is removed.
fn prepare_staging(prep: &Prepared) -> Result<()> {
    let staging = &prep.staging_dir;
    let keep: BTreeSet<&str> = prep
        .decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Reuse {
                origin: Origin::Partial,
                lock,
            } => Some(lock),
            _ => None,
        })
        .flat_map(|l| l.outputs.keys().map(String::as_str))
        .collect();
    if !staging.exists() || keep.is_empty() {
        if staging.exists() {
            std::fs::remove_dir_all(staging)
                .map_err(|e| Error::io(staging, "cannot remove a stale staging folder", e))?;
        }
        return std::fs::create_dir_all(staging)
            .map_err(|e| Error::io(staging, "cannot create the staging folder", e));
    }
    for file in validate::list_files(staging)? {
        if !keep.contains(file.as_str()) {
            let path = staging.join(&file);
            std::fs::remove_file(&path)
                .map_err(|e| Error::io(&path, "cannot clean the staging folder", e))?;
        }
    }
    Ok(())
}

/// The first output of a stage whose content no longer matches the lock, if any.
pub(crate) fn damaged_output(dir: &Path, lock: &StageLock) -> Option<String> {
    use rayon::prelude::*;
    let mut bad: Vec<&String> = lock
        .outputs
        .par_iter()
        .filter(|(file, hash)| {
            validate::hash_file(&dir.join(file))
                .map(|(_, h)| &h != *hash)
                .unwrap_or(true)
        })
        .map(|(file, _)| file)
        .collect();
    bad.sort();
    bad.first().map(|f| f.to_string())
}

fn remove_stage_outputs(staging: &Path, lock: &StageLock) -> Result<()> {
    for file in lock.outputs.keys() {
        let path = staging.join(file);
        if path.exists() {
            std::fs::remove_file(&path)
                .map_err(|e| Error::io(&path, "cannot clean the staging folder", e))?;
        }
    }
    Ok(())
}

/// Brings a finished stage's files from the existing dataset into the staging folder: hard
/// links (no copy, and the old dataset stays intact since files are never rewritten in place),
/// falling back to copies across file systems. Metadata files are always copied.
fn link_outputs(from: &Path, to: &Path, lock: &StageLock) -> Result<()> {
    for file in lock.outputs.keys() {
        let (src, dst) = (from.join(file), to.join(file));
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, "cannot create", e))?;
        }
        if dst.exists() {
            std::fs::remove_file(&dst).map_err(|e| Error::io(&dst, "cannot replace", e))?;
        }
        let linked = !file.ends_with("zarr.json") && std::fs::hard_link(&src, &dst).is_ok();
        if !linked {
            std::fs::copy(&src, &dst).map_err(|e| {
                Error::io(&src, "cannot reuse an output of the existing dataset", e)
            })?;
        }
    }
    Ok(())
}

/// BLAKE3 of every file a stage wrote (below its output path), group metadata excluded.
fn hash_stage_outputs(
    staging: &Path,
    output: &str,
    groups: &BTreeSet<ZarrPath>,
    log: &WriteLog,
) -> Result<BTreeMap<String, String>> {
    let group_files: BTreeSet<String> = groups.iter().map(ZarrPath::metadata_file).collect();
    let root = staging.join(output);
    let files: Vec<String> = if root.is_dir() {
        validate::list_files(&root)?
            .into_iter()
            .map(|f| format!("{output}/{f}"))
            .collect()
    } else {
        vec![output.to_string()]
    };
    // In parallel: files missing from the write log (Parquet tables, or a Zarr object whose size
    // changed) are read back whole, and a stage's files can be hundreds of MB.
    use rayon::prelude::*;
    files
        .into_par_iter()
        .filter(|f| !group_files.contains(f))
        .map(|f| {
            let hash = written_hash(&staging.join(&f), log)?;
            Ok((f, hash))
        })
        .collect()
}

/// BLAKE3 of a file the stage wrote: the one taken as it was written if the file still has
/// the size written, otherwise (a file written some other way, e.g. Parquet) read back.
pub(crate) fn written_hash(path: &Path, log: &WriteLog) -> Result<String> {
    if let Some((size, hash)) = log.get(path) {
        let on_disk = std::fs::metadata(path)
            .map_err(|e| Error::io(path, "cannot read back", e))?
            .len();
        if on_disk == size {
            return Ok(hash);
        }
    }
    Ok(validate::hash_file(path)?.1)
}

fn to_json_text<T: serde::Serialize>(value: &T) -> Result<String> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| Error::Internal(e.to_string()))?;
    text.push('\n');
    Ok(text)
}

fn check_dataset_name(name: &str) -> Result<()> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) {
        return Err(Error::bad_input(
            format!("--name {name:?}"),
            "a dataset name must be a plain folder name",
            "use letters, digits, `-` and `_`",
        ));
    }
    Ok(())
}

/// Moves the finished staging folder into place. An existing dataset is renamed aside first
/// and removed once the new one is in place; an interruption in between is repaired by the
/// next run (`recover_interrupted_publish`).
fn publish(staging: &Path, dataset_dir: &Path, name: &str) -> Result<()> {
    let parent = dataset_dir.parent().unwrap_or(Path::new("."));
    let aside = parent.join(format!(".{name}.replaced"));
    let had_old = dataset_dir.exists();
    if had_old {
        std::fs::rename(dataset_dir, &aside)
            .map_err(|e| Error::io(dataset_dir, "cannot move the old dataset aside", e))?;
    }
    std::fs::rename(staging, dataset_dir)
        .map_err(|e| Error::io(dataset_dir, "cannot move the new dataset into place", e))?;
    if had_old {
        std::fs::remove_dir_all(&aside)
            .map_err(|e| Error::io(&aside, "cannot remove the replaced dataset", e))?;
    }
    if let Ok(dir) = std::fs::File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Peak resident memory of this process since the last `reset_peak_memory` (Linux: `VmHWM` in
/// `/proc/self/status`); `None` where the system does not report it.
fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Starts the peak over from the current size, so that each dataset `ingest` converts records
/// its own peak, not the largest of every dataset before it. Best effort: `5` resets the peak
/// resident set size (Linux, proc(5) `clear_refs`); elsewhere, or where /proc is read-only,
/// the peak is the process's.
fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This host's name, for run.json and file names; empty where neither `/etc/hostname` nor
/// `HOSTNAME` gives one (macOS, for one).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// `zarr.json` path of a group (`path` inside the `.zarr` folder `store`).
/// Every Zarr group on the way to an array (Zarr v3 has no implicit groups), derived from the
/// plan so it never depends on what happens to be on disk. A stage whose output holds several
/// arrays makes its output a group too.
fn group_paths(pipeline: &Pipeline, plan: &Plan) -> BTreeSet<ZarrPath> {
    let mut groups = BTreeSet::new();
    for (stage, stage_plan) in pipeline.stages.iter().zip(&plan.stages) {
        let arrays = stage_plan.zarr_arrays();
        let Some(output) = ZarrPath::parse(stage.output()).filter(|_| !arrays.is_empty()) else {
            continue;
        };
        for array in &arrays {
            let node = if array.is_empty() {
                output.clone()
            } else {
                output.join(array)
            };
            groups.extend(node.ancestors());
        }
        if arrays.iter().any(|a| !a.is_empty()) {
            groups.insert(output);
        }
    }
    groups
}

fn write_groups(
    dir: &Path,
    pipeline: &Pipeline,
    provenance: &Provenance,
    groups: &BTreeSet<ZarrPath>,
) -> Result<()> {
    for group in groups {
        let store = ZarrStore::open(&dir.join(&group.store), &WriteLog::new(false))?;
        let mut attributes = serde_json::Map::new();
        if group.is_root() {
            attributes.insert("dataset".into(), provenance.dataset.clone().into());
            attributes.insert("source".into(), provenance.source.clone().into());
            attributes.insert("pipeline".into(), provenance.pipeline.clone().into());
            attributes.insert(
                "pipeline_hash".into(),
                provenance.pipeline_hash.clone().into(),
            );
            attributes.insert(
                "sensorium_ingest_version".into(),
                provenance.tool_version.clone().into(),
            );
            if let Some(rate) = pipeline.frame_rate_hz {
                attributes.insert("frame_rate_hz".into(), rate.into());
            }
        }
        store.write_group(&group.node_path(), attributes)?;
    }
    Ok(())
}

/// One manifest line per source entry. Skipped entries are hashed here so the source checksum
/// covers every byte; an entry that a stage claimed but did not report is a bug, caught here.
fn entry_infos(prep: &Prepared, progress: &Progress) -> Result<Vec<EntryInfo>> {
    let mut by_path: BTreeMap<&str, (&str, &LockedEntry)> = BTreeMap::new();
    for s in &progress.stages {
        for e in &s.entries {
            by_path.insert(e.path.as_str(), (s.id.as_str(), e));
        }
    }
    let headers: BTreeMap<usize, &crate::npy::Header> = prep
        .plan
        .stages
        .iter()
        .flat_map(|s| -> Vec<(usize, &crate::npy::Header)> {
            match s {
                StagePlan::TrialArray(p) => p.trials.iter().map(|a| (a.entry, &a.header)).collect(),
                StagePlan::TrialTable(p) => p.trials.iter().map(|a| (a.entry, &a.header)).collect(),
                StagePlan::Statistics(p) => {
                    p.arrays.iter().map(|(_, a)| (a.entry, &a.header)).collect()
                }
                StagePlan::MetaTable(p) => {
                    p.files.iter().map(|(_, a)| (a.entry, &a.header)).collect()
                }
            }
        })
        .collect();
    let mut reader = prep.source.reader()?;
    let mut out = Vec::with_capacity(prep.source.entries.len());
    for (index, (entry, disposition)) in prep
        .source
        .entries
        .iter()
        .zip(&prep.plan.dispositions)
        .enumerate()
    {
        let header = headers.get(&index);
        let info = match disposition {
            Disposition::Stage(s) => {
                let (stage, record) = by_path.remove(entry.path.as_str()).ok_or_else(|| {
                    Error::Internal(format!(
                        "{} was claimed by stage {} but never read",
                        entry.path,
                        prep.pipeline.stages[*s].id()
                    ))
                })?;
                EntryInfo {
                    path: entry.path.clone(),
                    status: "converted".into(),
                    stage: Some(stage.to_string()),
                    output: Some(record.output.clone()),
                    reason: None,
                    dtype: header.map(|h| h.dtype.to_string()),
                    shape: header.map(|h| h.shape.clone()),
                    bytes: entry.size,
                    blake3: record.blake3.clone(),
                    values_blake3: record.values_blake3.clone(),
                    index: record.index,
                }
            }
            Disposition::Skipped(reason) => {
                let bytes = reader.read(entry)?;
                EntryInfo {
                    path: entry.path.clone(),
                    status: "skipped".into(),
                    stage: None,
                    output: None,
                    reason: Some(reason.clone()),
                    dtype: None,
                    shape: None,
                    bytes: entry.size,
                    blake3: blake3::hash(&bytes).to_hex().to_string(),
                    values_blake3: None,
                    index: None,
                }
            }
        };
        out.push(info);
    }
    if let Some((path, _)) = by_path.into_iter().next() {
        return Err(Error::Internal(format!(
            "a stage reported {path}, which the plan did not give it"
        )));
    }
    Ok(out)
}
