//! The executor: runs a pipeline over one source, the same way for `convert`, for a `--shard`
//! task and for `finalize`. It plans, decides which stages to (re)run (`keys`), fits the
//! threads to the memory (`memory`), runs the stages with validation between them
//! (`stage_run`), and completes the dataset: manifest, lock, catalog, publish (`complete`).
//!
//! Everything is built in a hidden staging folder (`STORE/.<name>.partial`) that records each
//! finished stage (`.progress.json`), so a killed run resumes where it stopped; a dataset
//! folder only ever appears whole, with `manifest.json` written last inside it (`staging`).
//! A sharded run's tasks write their parts into `STORE/.<name>.shards/` with receipts, and
//! `finalize` takes them as reused stages (`parts`).

pub mod catalog;
mod complete;
pub mod keys;
pub mod lock;
pub mod manifest;
pub mod memory;
pub mod name_lock;
pub mod parts;
pub mod remote;
mod stage_run;
mod staging;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use self::keys::{decide, stage_keys, Decision, Origin, StageKey};
use self::lock::{Lock, Progress, StageLock};
use self::memory::{MemoryModel, ThreadChoice};
use self::name_lock::{Holder, NameLock, Waiting};
use self::stage_run::{Scope, StageRunner};
pub(crate) use self::staging::damaged_output;
use crate::error::{Error, Result};
use crate::pipeline::plan::{plan, Disposition, Plan};
use crate::pipeline::spec::Pipeline;
use crate::progress::ProgressMode;
use crate::source::Source;
use crate::writers::Provenance;

pub const RUN_RECORD: &str = "run.json";

pub struct ConvertOptions {
    pub source: PathBuf,
    /// The store folder; for a bucket store, the local work folder the run is built in.
    pub store: PathBuf,
    /// The bucket URL the dataset is committed to (`remote`); `None` for a local store.
    pub bucket: Option<String>,
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
    /// What to do when another writer holds the dataset's name: refuse, or wait.
    pub wait: Waiting,
    /// What this writer is, for the lock file and other writers' messages: `convert`,
    /// `ingest`, `finalize`.
    pub writer: &'static str,
    /// Start even when the store's file system seems to lack the space the run needs.
    pub no_space_check: bool,
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
    /// Bytes the run may write at most, and the bytes free on the store's file system.
    pub space_needed: u64,
    pub space_free: Option<u64>,
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

/// The source, opened (its index only), and the name of its dataset in the store.
pub(crate) fn open_source(opts: &ConvertOptions) -> Result<(Source, String)> {
    let source = Source::open(&opts.source)?;
    let name = opts.name.clone().unwrap_or_else(|| source.dataset_name());
    check_dataset_name(&name)?;
    Ok((source, name))
}

/// Takes the dataset's name in the store for this writer (exit 75 naming the holder when
/// another writer has it), then repairs a publish that a killed writer left half done: only
/// the holder of the name may touch its folders.
pub(crate) fn claim_name(
    opts: &ConvertOptions,
    name: &str,
    holder: Holder,
    take_over_run: Option<&str>,
) -> Result<NameLock> {
    std::fs::create_dir_all(&opts.store)
        .map_err(|e| Error::io(&opts.store, "cannot create the store folder", e))?;
    let lock = NameLock::acquire(name_lock::Request {
        path: &name_lock_path(&opts.store, name),
        holder,
        refusal: &format!("another writer holds dataset {name}"),
        waiting: opts.wait,
        take_over_run,
    })?;
    staging::recover_interrupted_publish(&opts.store, name, &opts.store.join(name))?;
    Ok(lock)
}

/// `STORE/.<name>.lock`: who writes dataset `name`.
pub fn name_lock_path(store: &Path, name: &str) -> PathBuf {
    store.join(format!(".{name}.lock"))
}

pub(crate) fn prepare<'p>(
    opts: &ConvertOptions,
    pipeline: &'p Pipeline,
    source: Source,
    name: String,
) -> Result<Prepared<'p>> {
    let dataset_dir = opts.store.join(&name);
    let staging_dir = opts.store.join(format!(".{name}.partial"));
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

/// What would run, and why, without writing anything.
pub fn plan_run(opts: &ConvertOptions) -> Result<RunPlan> {
    let pipeline = Pipeline::parse(&opts.pipeline_text, &opts.pipeline_file)?;
    let (source, name) = open_source(opts)?;
    let prep = prepare(opts, &pipeline, source, name)?;
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
        space_needed: space_wanted(&prep),
        space_free: crate::disk::free_bytes(&opts.store),
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

/// A finalize's parts: the sharded run's folder, its identity (whose lock finalize takes
/// over), and how its receipts become stage locks.
pub(crate) struct Assembly<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) run: &'a str,
    pub(crate) collect: &'a AssembleShards<'a>,
    /// Refuses while a task of the run still runs.
    pub(crate) no_task_runs: &'a dyn Fn() -> Result<()>,
}

pub fn convert(opts: &ConvertOptions) -> Result<ConvertReport> {
    convert_with(opts, None)
}

/// `finalize` of a sharded run: a conversion whose `trial_array` stages are taken from the
/// shards folder (`collect` checks the receipts and returns their locks) instead of being run.
pub(crate) fn convert_assembled(
    opts: &ConvertOptions,
    assembly: &Assembly,
) -> Result<ConvertReport> {
    convert_with(opts, Some(assembly))
}

fn convert_with(opts: &ConvertOptions, assembly: Option<&Assembly>) -> Result<ConvertReport> {
    let started = Instant::now();
    reset_peak_memory();
    let pipeline = Pipeline::parse(&opts.pipeline_text, &opts.pipeline_file)?;
    let (source, name) = open_source(opts)?;
    let holder = Holder::this_process(opts.writer, None);
    let mut name_lock = claim_name(opts, &name, holder, assembly.map(|a| a.run))?;
    if let Some(assembly) = assembly {
        // Checked with the name held: no task of the run can start after this.
        (assembly.no_task_runs)()?;
    }
    let report = convert_claimed(
        opts,
        &pipeline,
        source,
        name.clone(),
        assembly,
        started,
        &name_lock,
    )?;
    // Published: the name is not given back to a sharded run, whatever happens next.
    name_lock.finish();
    if let Some(assembly) = assembly {
        // Moved away in one rename while the name is still held: a task resubmitted later
        // starts a new folder, and never rewrites files the published dataset links to.
        let failed = "the dataset is published, but its shards folder cannot be moved away";
        staging::discard(&opts.store, &name, assembly.dir, failed)?;
    }
    Ok(report)
}

/// A conversion whose name this process holds.
fn convert_claimed(
    opts: &ConvertOptions,
    pipeline: &Pipeline,
    source: Source,
    name: String,
    assembly: Option<&Assembly>,
    started: Instant,
    name_lock: &NameLock,
) -> Result<ConvertReport> {
    let mut prep = prepare(opts, pipeline, source, name)?;
    if let Some(assembly) = assembly {
        for (index, lock) in (assembly.collect)(pipeline, &prep)? {
            prep.decisions[index] = Decision::Reuse {
                origin: Origin::Shards,
                lock,
            };
        }
        prep.shards_dir = Some(assembly.dir.to_path_buf());
    }
    let mut report = empty_report(opts, &prep);
    if prep.up_to_date() {
        report.up_to_date = true;
        report.output_bytes = prep
            .existing
            .as_ref()
            .map_or(0, |l| l.stages.iter().map(|s| s.outputs.len() as u64).sum());
        report.seconds = started.elapsed().as_secs_f64();
        report.peak_memory_bytes = peak_memory_bytes();
        tracing::info!(dataset = %prep.name, "up to date");
        name_lock.check_held()?;
        complete::catalog_existing(opts, &prep)?;
        return Ok(report);
    }
    check_space(opts, space_wanted(&prep))?;
    staging::prepare_staging(&prep)?;
    let result = run_whole(opts, &prep, report, started, name_lock);
    // A failed run leaves nothing behind; an interrupted one, or one that filled the disk,
    // keeps its staging folder, so the same command resumes it (once there is room). A run
    // that lost its name leaves the folder to the new holder.
    let failed =
        matches!(result, Err(ref e) if !matches!(e, Error::Interrupted) && !e.is_disk_full());
    if failed && name_lock.still_held() {
        let _ = std::fs::remove_dir_all(&prep.staging_dir);
    }
    result
}

/// The free space a run needs: what it writes, less what a staging folder kept from a run that
/// filled the disk holds that this run removes before it starts.
pub(crate) fn space_wanted(prep: &Prepared) -> u64 {
    space_needed(prep).saturating_sub(staging::reclaimable_bytes(prep))
}

/// An upper bound of the bytes a run writes: every entry a stage runs on, as stored in the
/// source (the values, uncompressed: compression can only shrink them, by more than its
/// framing), plus the manifest and lock (a few hundred bytes an entry) and slack for metadata.
/// Reused stages write nothing new: their files are hard-linked or already in place.
pub(crate) fn space_needed(prep: &Prepared) -> u64 {
    let running = |stage: usize| matches!(prep.decisions.get(stage), Some(Decision::Run { .. }));
    space_of_stages(prep, running, 1.0)
}

/// What a task of a sharded run writes for `trials`: the share of the per-trial stages (those
/// that run in parts) that its trials are. A task writes its part of every such stage, even one
/// the whole run would reuse. Trials of a variable are alike in size in this family, so the
/// share by count is the share by bytes.
pub(crate) fn space_needed_for_part(prep: &Prepared, trials: &std::ops::Range<usize>) -> u64 {
    let share = trials.len() as f64 / prep.plan.n_trials().max(1) as f64;
    let in_parts = |stage: usize| {
        prep.plan
            .stages
            .get(stage)
            .is_some_and(|p| p.runs_in_parts())
    };
    space_of_stages(prep, in_parts, share)
}

/// The space written by the stages `writes` picks, scaled by `share` (see [`space_needed`]).
fn space_of_stages(prep: &Prepared, writes: impl Fn(usize) -> bool, share: f64) -> u64 {
    let bytes: u64 = prep
        .source
        .entries
        .iter()
        .zip(&prep.plan.dispositions)
        .filter(|(_, d)| matches!(d, Disposition::Stage(s) if writes(*s)))
        .map(|(e, _)| e.size)
        .sum();
    let scaled = |v: u64| (v as f64 * share).ceil() as u64;
    let entries = scaled(bytes);
    let records = scaled(prep.source.entries.len() as u64) * 1024;
    let stages = (0..prep.plan.stages.len()).filter(|&s| writes(s)).count() as u64;
    entries + entries / 100 + records + stages * (1 << 20)
}

/// Refuses to start when the store's file system clearly lacks the space (`--no-space-check`
/// skips this), and records the need for the message of a disk that fills up anyway.
pub(crate) fn check_space(opts: &ConvertOptions, needed: u64) -> Result<()> {
    crate::disk::set_needed(needed);
    let free = crate::disk::free_bytes(&opts.store);
    match free {
        Some(free) if free < needed && !opts.no_space_check => Err(Error::NoSpace {
            path: opts.store.clone(),
            needed,
            free,
        }),
        _ => Ok(()),
    }
}

/// A report with what is known before anything runs.
fn empty_report(opts: &ConvertOptions, prep: &Prepared) -> ConvertReport {
    let source_bytes = std::fs::metadata(&opts.source)
        .map(|m| match m.is_file() {
            true => m.len(),
            false => prep.source.total_size(),
        })
        .unwrap_or(0);
    ConvertReport {
        dataset: prep.name.clone(),
        dataset_dir: prep.dataset_dir.clone(),
        up_to_date: false,
        trials: prep.plan.n_trials(),
        dimensions: prep.plan.dims.clone(),
        source_bytes,
        output_bytes: 0,
        seconds: 0.0,
        // Chosen once it is known that something runs (an up-to-date dataset needs no threads,
        // and no warnings about them).
        threads: 0,
        peak_memory_bytes: None,
        stages: Vec::new(),
    }
}

/// Every stage into the staging folder, each recorded there as it finishes (so a killed run
/// resumes), then the dataset completed and published.
fn run_whole(
    opts: &ConvertOptions,
    prep: &Prepared,
    mut report: ConvertReport,
    started: Instant,
    name_lock: &NameLock,
) -> Result<ConvertReport> {
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let choice = thread_choice(opts, prep, |i| may_run(prep, i))?;
    report.threads = choice.threads;
    let runner = StageRunner::new(prep, choice.threads, opts.direct_io, opts.progress)?;
    let mut progress = Progress {
        source_fingerprint: prep.source_fingerprint.clone(),
        stages: Vec::new(),
    };
    let done = runner.run(&Scope::Whole, |lock| {
        // A run that stalled past the stale time stops writing into the new holder's folder.
        name_lock.check_held()?;
        progress.stages.push(lock.clone());
        progress.write(&prep.staging_dir)
    })?;
    let (stages, reports): (Vec<_>, Vec<_>) = done.into_iter().unzip();
    report.stages = reports;
    let finished = complete::Finished {
        stages,
        groups: &runner.groups,
        provenance: runner.provenance(),
        writes: &runner.writes,
        choice: &choice,
        started,
        started_unix,
        name_lock,
    };
    complete::complete(opts, prep, &finished, &mut report)?;
    Ok(report)
}

/// What every output records about where it came from (`stage` filled in per stage).
pub(crate) fn provenance(prep: &Prepared) -> Provenance {
    Provenance {
        tool_version: crate::VERSION.to_string(),
        dataset: prep.name.clone(),
        source: prep.source.name.clone(),
        pipeline: prep.pipeline.pipeline.clone(),
        pipeline_hash: prep.pipeline_hash.clone(),
        stage: String::new(),
        stage_hash: String::new(),
    }
}

pub(crate) fn to_json_text<T: serde::Serialize>(value: &T) -> Result<String> {
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
    // The store's own files: the catalog folder, and `.ingest.lock` beside the names' locks.
    if ["catalog", "ingest"].contains(&name) {
        return Err(Error::bad_input(
            format!("--name {name:?}"),
            "this name is the store's own (its catalog folder or its ingest lock)",
            "choose another name with --name",
        ));
    }
    Ok(())
}

/// Peak resident memory of this process since the last `reset_peak_memory` (Linux: `VmHWM` in
/// `/proc/self/status`); `None` where the system does not report it.
pub(crate) fn peak_memory_bytes() -> Option<u64> {
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

/// This host's name (gethostname(2), else `/etc/hostname` or `HOSTNAME`), for locks, run.json
/// and file names; empty where none gives one.
pub(crate) fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length, which is passed; gethostname
    // writes at most that many bytes.
    let named = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let from_kernel = named
        .then(|| {
            let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
            String::from_utf8_lossy(&buffer[..end]).trim().to_string()
        })
        .filter(|h| !h.is_empty());
    from_kernel
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}
