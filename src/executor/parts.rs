//! Sharded runs, for cluster job arrays: `convert --shard K/N` converts part K of N of the trial
//! axis of every `trial_array` stage into `STORE/.<name>.shards/` and records a receipt;
//! `finalize STORE/NAME` checks every receipt against the files, runs the remaining stages
//! (tables, statistics), writes the manifest and lock, and publishes the dataset exactly as a
//! single-process `convert` would (byte for byte, `run.json` aside).
//!
//! Why the work splits this way: `trial_array` shards are independent, deterministic files,
//! and they are nearly all of the work; every other stage writes one small file. Parts are whole
//! blocks of trials, a block being the least common multiple of the stages' trials per shard,
//! so no two tasks ever write the same file. The tasks share no state but files whose names are
//! theirs alone (their shards and their receipt) and `job.json`, which the first task creates
//! with an atomic link and the others only read: no lock that NFS could break.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::keys::StageKey;
use super::lock::{self_checksum, write_replacing, write_synced, StageLock};
use super::name_lock::{self, Holder, NameLock, Waiting};
use super::stage_run::{Scope, StageRunner};
use super::{self as runner, ConvertOptions, Prepared};
use crate::error::{Error, Result};
use crate::pipeline::spec::Pipeline;
use crate::progress::ProgressMode;
use crate::stages::registry::Stage;
use crate::stages::MeasureValues;

pub const JOB_FILE: &str = "job.json";
pub const JOB_FORMAT: &str = "sensorium-ingest-shard-job/1";
pub const RECEIPT_FORMAT: &str = "sensorium-ingest-shard-receipt/1";
const RECEIPTS: &str = "receipts";
/// Markers of the tasks converting a part right now (`running/K-of-N.lock`): never copied
/// between hosts.
pub const RUNNING: &str = "running";

/// Where the tasks of a sharded run of dataset `name` write.
pub fn shards_dir(store: &Path, name: &str) -> PathBuf {
    store.join(shards_folder(name))
}

/// The name of that folder in its store (or of the prefix, in a bucket).
pub fn shards_folder(name: &str) -> String {
    format!(".{name}.shards")
}

/// `--shard` as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardArg {
    /// `K/N`.
    Fixed(Shard),
    /// `auto`: from a SLURM job array (`SLURM_ARRAY_TASK_ID`, `_MIN`, `_STEP`, `_COUNT`).
    Auto,
    /// `auto/N`: the index from `SLURM_ARRAY_TASK_ID` or `JOB_COMPLETION_INDEX` (Kubernetes
    /// Indexed Jobs), the count given. Safe for resubmitting one task of an array.
    AutoOf(usize),
}

/// Part `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for ShardArg {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<ShardArg, String> {
        let count = |n: &str| -> std::result::Result<usize, String> {
            match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!(
                    "{n:?} is not a shard count (a whole number above 0)"
                )),
            }
        };
        if text == "auto" {
            return Ok(ShardArg::Auto);
        }
        let Some((k, n)) = text.split_once('/') else {
            return Err("expected K/N (e.g. 0/3), auto, or auto/N".into());
        };
        let n = count(n)?;
        if k == "auto" {
            return Ok(ShardArg::AutoOf(n));
        }
        let index: usize = k
            .parse()
            .map_err(|_| format!("{k:?} is not a shard index (0 to N-1)"))?;
        if index >= n {
            return Err(format!(
                "shard index {index} is not below the count {n} (indices start at 0)"
            ));
        }
        Ok(ShardArg::Fixed(Shard { index, count: n }))
    }
}

impl ShardArg {
    /// The shard this task converts; `env` looks up environment variables.
    pub fn resolve(self, env: impl Fn(&str) -> Option<String>) -> Result<Shard> {
        let number = |name: &str| -> Result<Option<usize>> {
            match env(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::usage(
                        format!("--shard auto: {name}={v:?} is not a whole number"),
                        "run inside a job array, or give the shard as K/N",
                    )
                }),
            }
        };
        match self {
            ShardArg::Fixed(s) => Ok(s),
            ShardArg::Auto => {
                let (Some(id), Some(count)) = (
                    number("SLURM_ARRAY_TASK_ID")?,
                    number("SLURM_ARRAY_TASK_COUNT")?,
                ) else {
                    return Err(Error::usage(
                        "--shard auto needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, which are not set",
                        "submit with `sbatch --array=0-<N-1>`; elsewhere (Kubernetes: JOB_COMPLETION_INDEX) give the count: --shard auto/N",
                    ));
                };
                let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
                let offset = id.checked_sub(min).filter(|o| o % step == 0);
                match offset.map(|o| o / step) {
                    Some(index) if index < count => Ok(Shard { index, count }),
                    _ => Err(Error::usage(
                        format!("--shard auto: task {id} of an array of {count} (min {min}, step {step}) is not one of {count} evenly spaced tasks"),
                        "submit a plain range array (--array=0-<N-1>); to resubmit one task, use --shard auto/N or K/N",
                    )),
                }
            }
            ShardArg::AutoOf(count) => {
                let index = match number("SLURM_ARRAY_TASK_ID")? {
                    Some(id) => id,
                    None => number("JOB_COMPLETION_INDEX")?.ok_or_else(|| {
                        Error::usage(
                            format!("--shard auto/{count} needs SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX, and neither is set"),
                            "run inside a SLURM job array or a Kubernetes Indexed Job, or give the shard as K/N",
                        )
                    })?,
                };
                if index >= count {
                    return Err(Error::usage(
                        format!("--shard auto/{count}: the task index is {index}, not below {count}"),
                        format!("number the tasks 0 to {} (sbatch --array=0-{}, or completions: {count})", count - 1, count - 1),
                    ));
                }
                Ok(Shard { index, count })
            }
        }
    }
}

/// What every task of one sharded run must agree on; written once as `job.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub format: String,
    pub dataset: String,
    pub tool_version: String,
    pub source_name: String,
    /// The source as the first task saw it (absolute); `finalize --source` overrides it.
    pub source_path: PathBuf,
    pub source_fingerprint: String,
    pub pipeline_hash: String,
    pub pipeline_file: String,
    pub pipeline_text: String,
    pub force: bool,
    pub shards: usize,
    pub trials: usize,
    /// Trials per block: parts are whole blocks.
    pub trial_block: usize,
}

impl Job {
    /// Everything but where the files were seen from: two tasks may mount the source or the
    /// pipeline file at different paths.
    fn identity(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.format,
            self.dataset,
            self.tool_version,
            self.source_fingerprint,
            self.pipeline_hash,
            self.force,
            self.shards,
            self.trials,
            self.trial_block
        )
    }

    fn identity_hash(&self) -> String {
        format!(
            "blake3:{}",
            blake3::hash(self.identity().as_bytes()).to_hex()
        )
    }
}

/// One task's record: its trials and, per `trial_array` stage, what a lock records (files and
/// their BLAKE3, entries, measures). Written last, aside and renamed, so it exists only when
/// every file it names is complete.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Receipt {
    pub format: String,
    pub dataset: String,
    /// BLAKE3 of the job's identity (see `Job::identity`).
    pub job: String,
    pub shard: Shard,
    pub trials: Range<usize>,
    pub host: String,
    pub stages: Vec<StageLock>,
    /// BLAKE3 of this file's JSON with this field empty.
    pub checksum: String,
}

impl Receipt {
    fn body_hash(&self) -> Result<String> {
        let mut blank = self.clone();
        blank.checksum = String::new();
        self_checksum(&blank)
    }

    fn write(&mut self, path: &Path) -> Result<()> {
        self.checksum = self.body_hash()?;
        let mut text =
            serde_json::to_string_pretty(self).map_err(|e| Error::Internal(e.to_string()))?;
        text.push('\n');
        write_replacing(path, text.as_bytes(), "cannot record the receipt")
    }

    /// Reads a receipt; `Err` says why it cannot be trusted.
    fn read(path: &Path) -> std::result::Result<Receipt, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("unreadable: {e}"))?;
        let receipt: Receipt =
            serde_json::from_str(&text).map_err(|e| format!("not a receipt: {e}"))?;
        if receipt.format != RECEIPT_FORMAT {
            return Err(format!("unknown format {:?}", receipt.format));
        }
        if receipt.body_hash().map_err(|e| e.to_string())? != receipt.checksum {
            return Err("its checksum does not match its content (damaged)".into());
        }
        Ok(receipt)
    }

    /// The first file it names whose content differs from the recorded hash.
    fn damaged_file(&self, dir: &Path) -> Option<String> {
        self.stages
            .iter()
            .find_map(|stage| runner::damaged_output(dir, stage))
    }
}

fn receipt_path(dir: &Path, shard: Shard) -> PathBuf {
    dir.join(RECEIPTS)
        .join(format!("{:04}-of-{:04}.json", shard.index, shard.count))
}

/// Whether stage `index` runs in the tasks (the others run in `finalize`).
fn runs_in_parts(prep: &Prepared, index: usize) -> bool {
    prep.plan
        .stages
        .get(index)
        .is_some_and(|p| p.runs_in_parts())
}

/// Trials per block: the least common multiple of every `trial_array` stage's trials per shard.
fn trial_block(pipeline: &Pipeline, prep: &Prepared) -> Result<usize> {
    let mut block: Option<usize> = None;
    for (stage, plan) in pipeline.stages.iter().zip(&prep.plan.stages) {
        if let Some(per_shard) = plan.part_block(&prep.pipeline_file)? {
            let per_shard = per_shard.max(1);
            let b = block.unwrap_or(1);
            let lcm = b / gcd(b, per_shard) * per_shard;
            tracing::debug!(stage = stage.id(), per_shard, "trials per shard");
            block = Some(lcm);
        }
    }
    block.ok_or_else(|| {
        Error::usage(
            "--shard: the pipeline has no trial_array stage, so there is nothing to split",
            "convert without --shard",
        )
    })
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The trials of part `shard`: whole blocks, spread as evenly as blocks allow (a task may get
/// none when there are more tasks than blocks).
pub fn part(trials: usize, block: usize, shard: Shard) -> Range<usize> {
    let blocks = trials.div_ceil(block.max(1));
    let first = shard.index * blocks / shard.count;
    let last = (shard.index + 1) * blocks / shard.count;
    (first * block).min(trials)..(last * block).min(trials)
}

/// The trials part `shard` would convert, and the block size (for `--dry-run`).
pub fn plan_part(opts: &ConvertOptions, shard: Shard) -> Result<(Range<usize>, usize)> {
    let pipeline = Pipeline::parse(&opts.pipeline_text, &opts.pipeline_file)?;
    let (source, name) = runner::open_source(opts)?;
    let prep = runner::prepare(opts, &pipeline, source, name)?;
    let block = trial_block(&pipeline, &prep)?;
    Ok((part(prep.plan.n_trials(), block, shard), block))
}

/// What one task did.
#[derive(Debug, Serialize)]
pub struct ShardReport {
    pub dataset: String,
    pub shard: Shard,
    pub trials: Range<usize>,
    /// The dataset in the store is already complete and current: nothing to do.
    pub up_to_date: bool,
    /// A receipt for this very part was already there and its files intact: nothing redone.
    pub already_done: bool,
    pub shards_dir: PathBuf,
    pub bytes: u64,
    pub seconds: f64,
}

/// `convert --shard`: one task of a sharded run.
pub fn convert_shard(opts: &ConvertOptions, shard: Shard) -> Result<ShardReport> {
    let started = Instant::now();
    let pipeline = Pipeline::parse(&opts.pipeline_text, &opts.pipeline_file)?;
    let (source, name) = runner::open_source(opts)?;
    let prep = runner::prepare(opts, &pipeline, source, name)?;
    let dir = shards_dir(&opts.store, &prep.name);
    let block = trial_block(&pipeline, &prep)?;
    let trials = part(prep.plan.n_trials(), block, shard);
    let mut report = ShardReport {
        dataset: prep.name.clone(),
        shard,
        trials: trials.clone(),
        up_to_date: false,
        already_done: false,
        shards_dir: dir.clone(),
        bytes: 0,
        seconds: 0.0,
    };
    if prep.up_to_date() && !dir.exists() {
        report.up_to_date = true;
        return Ok(report);
    }
    let job = new_job(opts, &prep, shard, block);
    // The run holds the dataset's name (its tasks share it); this task holds its part.
    let run = Holder::this_process("shard task", Some(job.identity_hash()));
    if dir.join(JOB_FILE).is_file() {
        // A task of another run is refused before it takes the name: a run's lock is left in
        // place by its tasks, so one taken here would keep the other run's finalize out. (Any
        // other trouble, such as a finalize removing the folder meanwhile, is met below.)
        if let Err(conflict @ Error::ShardConflict { .. }) = join_job(&dir, &job) {
            return Err(conflict);
        }
    }
    let name_lock = match runner::claim_name(opts, &prep.name, run, None) {
        Err(busy @ Error::Busy { .. }) => return Err(another_run_or(&dir, &job, busy)),
        claimed => claimed?,
    };
    std::fs::create_dir_all(dir.join(RECEIPTS))
        .map_err(|e| Error::io(dir.join(RECEIPTS), "cannot create the shards folder", e))?;
    join_job(&dir, &job)?;
    let _part = hold_part(opts, &dir, shard)?;
    // The run may have been finalized between the name and the part: then this task is late.
    name_lock.check_held()?;

    let receipt_file = receipt_path(&dir, shard);
    if earlier_receipt_holds(&dir, &receipt_file, &job, shard, &trials) {
        report.already_done = true;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    // The old receipt goes before any file it names is rewritten: a receipt never vouches for a
    // file being written.
    if receipt_file.exists() {
        std::fs::remove_file(&receipt_file)
            .map_err(|e| Error::io(&receipt_file, "cannot remove an old receipt", e))?;
    }

    runner::check_space(opts, runner::space_needed_for_part(&prep, &trials))?;
    let (locks, bytes) = run_part(opts, &prep, &dir, trials.clone())?;
    report.bytes = bytes;
    let mut receipt = Receipt {
        format: RECEIPT_FORMAT.into(),
        dataset: prep.name.clone(),
        job: job.identity_hash(),
        shard,
        trials,
        host: runner::hostname(),
        stages: locks,
        checksum: String::new(),
    };
    name_lock.check_held()?;
    receipt.write(&receipt_file)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A task refused the name because another sharded run holds it gets that run's difference
/// from this one (exit 73, as any task of another run); otherwise the refusal stands.
fn another_run_or(dir: &Path, job: &Job, busy: Error) -> Error {
    if !dir.join(JOB_FILE).is_file() {
        return busy;
    }
    match join_job(dir, job) {
        Err(conflict) => conflict,
        Ok(()) => busy,
    }
}

/// Marks part `shard` as being converted (`running/K-of-N.lock`): the same part started twice
/// runs once, and `finalize` waits for no running part.
fn hold_part(opts: &ConvertOptions, dir: &Path, shard: Shard) -> Result<NameLock> {
    let running = dir.join(RUNNING);
    std::fs::create_dir_all(&running)
        .map_err(|e| Error::io(&running, "cannot create the shards folder", e))?;
    let what = format!("shard task {shard}");
    NameLock::acquire(name_lock::Request {
        path: &running.join(format!("{}-of-{}.lock", shard.index, shard.count)),
        holder: Holder::this_process(&what, None),
        refusal: &format!("another process converts {what}"),
        waiting: opts.wait,
        take_over_run: None,
    })
}

/// Refuses to finalize while a task of the run still runs, naming it; markers of tasks that
/// died are left to their staleness.
fn check_no_task_runs(dir: &Path) -> Result<()> {
    let Ok(markers) = std::fs::read_dir(dir.join(RUNNING)) else {
        return Ok(());
    };
    for marker in markers.flatten() {
        if let Some(holder) = name_lock::live_holder(&marker.path()) {
            return Err(Error::Busy {
                path: marker.path(),
                what: "a task of this sharded run is still running".into(),
                holder: holder.describe(),
                hint: "run finalize once every task of the job array has ended (sbatch --dependency=afterok)".into(),
            });
        }
    }
    Ok(())
}

/// The job this task belongs to, as it would record it in `job.json`.
fn new_job(opts: &ConvertOptions, prep: &Prepared, shard: Shard, block: usize) -> Job {
    Job {
        format: JOB_FORMAT.into(),
        dataset: prep.name.clone(),
        tool_version: crate::VERSION.into(),
        source_name: prep.source.name.clone(),
        source_path: std::fs::canonicalize(&opts.source).unwrap_or_else(|_| opts.source.clone()),
        source_fingerprint: prep.source_fingerprint.clone(),
        pipeline_hash: prep.pipeline_hash.clone(),
        pipeline_file: opts.pipeline_file.clone(),
        pipeline_text: opts.pipeline_text.clone(),
        force: opts.force,
        shards: shard.count,
        trials: prep.plan.n_trials(),
        trial_block: block,
    }
}

/// Whether an earlier task already did this part: its receipt is this job's, for these trials,
/// and every file it names is intact.
fn earlier_receipt_holds(
    dir: &Path,
    receipt_file: &Path,
    job: &Job,
    shard: Shard,
    trials: &Range<usize>,
) -> bool {
    let Ok(r) = Receipt::read(receipt_file) else {
        return false;
    };
    if r.job != job.identity_hash() || r.shard != shard || r.trials != *trials {
        return false;
    }
    match r.damaged_file(dir) {
        None => true,
        Some(file) => {
            tracing::warn!(file = %file, "a file of this shard's earlier receipt is damaged; converting the shard again");
            false
        }
    }
}

/// Runs the trials `trials` of the stages that run in parts (`finalize` runs the others);
/// returns their locks and the bytes they wrote.
fn run_part(
    opts: &ConvertOptions,
    prep: &Prepared,
    dir: &Path,
    trials: Range<usize>,
) -> Result<(Vec<StageLock>, u64)> {
    let threads = runner::thread_choice(opts, prep, |i| runs_in_parts(prep, i))?.threads;
    let stages = StageRunner::new(prep, threads, opts.direct_io, opts.progress)?;
    let scope = Scope::Part { trials, dir };
    let mut locks = Vec::new();
    let mut bytes = 0;
    for (lock, stage) in stages.run(&scope, |_| Ok(()))? {
        bytes += stage.bytes;
        locks.push(lock);
    }
    Ok((locks, bytes))
}

/// Creates `job.json` if this is the first task, or checks that this task belongs to the run
/// already recorded there. The file is written aside and hard-linked into place: creating a link
/// fails if the name exists, atomically, on local file systems and NFS alike.
fn join_job(dir: &Path, job: &Job) -> Result<()> {
    let path = dir.join(JOB_FILE);
    let mut text = serde_json::to_string_pretty(job).map_err(|e| Error::Internal(e.to_string()))?;
    text.push('\n');
    if !path.exists() {
        let tmp = dir.join(format!(
            "{JOB_FILE}.{}.{}.tmp",
            runner::hostname(),
            std::process::id()
        ));
        write_synced(&tmp, text.as_bytes())?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(&path, "cannot record the sharded run", e)),
        }
    }
    let theirs = read_job(dir)?;
    if theirs.identity() != job.identity() {
        return Err(Error::ShardConflict {
            path: dir.to_path_buf(),
            why: describe_difference(&theirs, job),
        });
    }
    Ok(())
}

fn describe_difference(theirs: &Job, ours: &Job) -> String {
    let mut diffs = Vec::new();
    if theirs.shards != ours.shards {
        diffs.push(format!(
            "it was split in {} shards, this task says {}",
            theirs.shards, ours.shards
        ));
    }
    if theirs.source_fingerprint != ours.source_fingerprint {
        diffs.push(format!(
            "it was made from another source (or the source changed): {}",
            theirs.source_path.display()
        ));
    }
    if theirs.pipeline_hash != ours.pipeline_hash || theirs.force != ours.force {
        diffs.push(format!(
            "it was made with another pipeline or --force setting ({})",
            theirs.pipeline_file
        ));
    }
    if theirs.tool_version != ours.tool_version {
        diffs.push(format!(
            "it was made by sensorium-ingest {}",
            theirs.tool_version
        ));
    }
    if diffs.is_empty() {
        diffs.push("its trial blocks differ".into());
    }
    diffs.join("; ")
}

fn read_job(dir: &Path) -> Result<Job> {
    let path = dir.join(JOB_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, "cannot read", e))?;
    let job: Job = serde_json::from_str(&text).map_err(|e| {
        Error::bad_input(
            path.display().to_string(),
            format!("not a sharded run's job file: {e}"),
            format!("remove {} and convert every shard again", dir.display()),
        )
    })?;
    if job.format != JOB_FORMAT {
        return Err(Error::bad_input(
            path.display().to_string(),
            format!("unknown job format {:?}", job.format),
            "finalize with the sensorium-ingest version that converted the shards",
        ));
    }
    Ok(job)
}

/// What `finalize` was asked and did.
#[derive(Clone)]
pub struct FinalizeOptions {
    /// `STORE/NAME`.
    pub dataset_dir: PathBuf,
    /// The source, where it is not at the path the first task recorded.
    pub source: Option<PathBuf>,
    pub threads: Option<usize>,
    pub max_memory: Option<u64>,
    /// Write large Zarr objects with direct I/O where the file system takes it
    /// (`writers::output_store`); `false`: through the page cache.
    pub direct_io: bool,
    pub progress: ProgressMode,
    /// What to do when another writer holds the dataset's name: refuse, or wait.
    pub wait: Waiting,
    pub no_space_check: bool,
}

pub enum Finalized {
    Converted(runner::ConvertReport),
    /// No sharded run is pending and the dataset is complete (a finalize job run twice).
    AlreadyComplete(PathBuf),
}

/// `finalize STORE/NAME`: checks every receipt and publishes the dataset.
pub fn finalize(opts: &FinalizeOptions) -> Result<Finalized> {
    let (store, name) = store_and_name(&opts.dataset_dir)?;
    let dir = shards_dir(&store, &name);
    if !dir.join(JOB_FILE).is_file() {
        if opts
            .dataset_dir
            .join(crate::executor::manifest::FILE_NAME)
            .is_file()
        {
            return Ok(Finalized::AlreadyComplete(opts.dataset_dir.clone()));
        }
        return Err(Error::bad_input(
            dir.display().to_string(),
            format!("no sharded run of {name} to finalize"),
            "run `sensorium-ingest convert SOURCE --out STORE --shard K/N` for every K first (the dataset name must match)",
        ));
    }
    let job = read_job(&dir)?;
    let source = opts
        .source
        .clone()
        .unwrap_or_else(|| job.source_path.clone());
    let convert_opts = ConvertOptions {
        source,
        store: store.clone(),
        bucket: None,
        name: Some(name),
        pipeline_text: job.pipeline_text.clone(),
        pipeline_file: job.pipeline_file.clone(),
        force: job.force,
        threads: opts.threads,
        max_memory: opts.max_memory,
        direct_io: opts.direct_io,
        progress: opts.progress,
        wait: opts.wait,
        writer: "finalize",
        no_space_check: opts.no_space_check,
    };
    let collect =
        |pipeline: &Pipeline, prep: &Prepared| collect_receipts(pipeline, prep, &job, &dir);
    let run = job.identity_hash();
    let no_task_runs = || check_no_task_runs(&dir);
    let assembly = runner::Assembly {
        dir: &dir,
        run: &run,
        collect: &collect,
        no_task_runs: &no_task_runs,
    };
    let report = runner::convert_assembled(&convert_opts, &assembly)?;
    Ok(Finalized::Converted(report))
}

/// `STORE/NAME` split into the store (`.` when not given) and the dataset name.
fn store_and_name(dataset_dir: &Path) -> Result<(PathBuf, String)> {
    let name = dataset_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            Error::usage(
                format!("{}: not a dataset path", dataset_dir.display()),
                "give STORE/NAME, the folder the dataset is published as",
            )
        })?
        .to_string();
    let store = match dataset_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((store, name))
}

/// Checks every receipt of the run against the plan and the files, and merges them into one
/// lock per `trial_array` stage (by stage index), as a single run would have recorded it.
fn collect_receipts(
    pipeline: &Pipeline,
    prep: &Prepared,
    job: &Job,
    dir: &Path,
) -> Result<Vec<(usize, StageLock)>> {
    let block = check_job(pipeline, prep, job, dir)?;
    let n = prep.plan.n_trials();
    let receipts = read_receipts(job, dir, n, block)?;
    let mut merged = Vec::new();
    for (index, ((stage, plan), key)) in pipeline
        .stages
        .iter()
        .zip(&prep.plan.stages)
        .zip(&prep.keys)
        .enumerate()
    {
        if plan.runs_in_parts() {
            merged.push((index, merge_stage(stage, key, &receipts, n)?));
        }
    }
    Ok(merged)
}

/// The shards were converted from this source, into the trial blocks of this plan; returns the
/// block.
fn check_job(pipeline: &Pipeline, prep: &Prepared, job: &Job, dir: &Path) -> Result<usize> {
    if job.source_fingerprint != prep.source_fingerprint {
        return Err(Error::bad_input(
            prep.source.name.clone(),
            "the source is not the one the shards were converted from (it changed, or this is another file)",
            format!("point --source at the original, or remove {} and convert every shard again", dir.display()),
        ));
    }
    let block = trial_block(pipeline, prep)?;
    let n = prep.plan.n_trials();
    if block != job.trial_block || n != job.trials {
        return Err(Error::Internal(format!(
            "the plan ({n} trials, blocks of {block}) differs from the shards' job ({} trials, blocks of {})",
            job.trials, job.trial_block
        )));
    }
    Ok(block)
}

/// Every task's receipt, in shard order; what is wrong with any of them is reported together.
fn read_receipts(job: &Job, dir: &Path, n: usize, block: usize) -> Result<Vec<Receipt>> {
    let mut problems = Vec::new();
    let mut receipts = Vec::with_capacity(job.shards);
    for index in 0..job.shards {
        let shard = Shard {
            index,
            count: job.shards,
        };
        match checked_receipt(job, dir, shard, part(n, block, shard)) {
            Ok(receipt) => receipts.push(receipt),
            Err(problem) => problems.push(problem),
        }
    }
    if !problems.is_empty() {
        return Err(Error::ShardsIncomplete {
            path: dir.to_path_buf(),
            problems,
        });
    }
    Ok(receipts)
}

/// The receipt of `shard`, when it is there, of this run, for `trials`, and every file it names
/// is intact; else what is wrong.
fn checked_receipt(
    job: &Job,
    dir: &Path,
    shard: Shard,
    trials: Range<usize>,
) -> std::result::Result<Receipt, String> {
    let path = receipt_path(dir, shard);
    let receipt = match Receipt::read(&path) {
        Ok(r) => r,
        Err(_) if !path.exists() => {
            return Err(format!(
                "shard {shard}: no receipt (the task did not finish)"
            ))
        }
        Err(why) => return Err(format!("shard {shard}: receipt {}: {why}", path.display())),
    };
    if receipt.job != job.identity_hash() || receipt.shard != shard || receipt.trials != trials {
        return Err(format!(
            "shard {shard}: receipt {} belongs to another run",
            path.display()
        ));
    }
    if let Some(file) = receipt.damaged_file(dir) {
        return Err(format!(
            "shard {shard}: {file} is missing or does not match its receipt"
        ));
    }
    Ok(receipt)
}

/// One stage's lock from its record in every receipt, joined in shard (so trial) order; the
/// records must cover the plan's `n` trials.
fn merge_stage(stage: &Stage, key: &StageKey, receipts: &[Receipt], n: usize) -> Result<StageLock> {
    let mut outputs = BTreeMap::new();
    let mut entries = Vec::new();
    let mut measures: BTreeMap<String, MeasureValues> = BTreeMap::new();
    for receipt in receipts {
        let part = receipt
            .stages
            .iter()
            .find(|s| s.id == stage.id() && s.key == key.key)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "receipt of shard {} has no record of stage {} with this key",
                    receipt.shard,
                    stage.id()
                ))
            })?;
        outputs.extend(part.outputs.clone());
        entries.extend(part.entries.iter().cloned());
        append_measures(&mut measures, &part.measures, stage.id())?;
    }
    if entries.len() != n {
        return Err(Error::Internal(format!(
            "the receipts of stage {} cover {} trials, the plan has {n}",
            stage.id(),
            entries.len()
        )));
    }
    Ok(key.lock(stage, outputs, entries, measures))
}

/// Appends one part's values of each measure to those of the parts before it.
fn append_measures(
    measures: &mut BTreeMap<String, MeasureValues>,
    part: &BTreeMap<String, MeasureValues>,
    stage: &str,
) -> Result<()> {
    for (m, values) in part {
        match (measures.get_mut(m), values) {
            (None, v) => {
                measures.insert(m.clone(), v.clone());
            }
            (Some(MeasureValues::Int32(all)), MeasureValues::Int32(more)) => all.extend(more),
            (Some(MeasureValues::Bool(all)), MeasureValues::Bool(more)) => all.extend(more),
            _ => {
                return Err(Error::Internal(format!(
                    "measure {m} of stage {stage} has different types across receipts"
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn parts_are_whole_blocks_covering_every_trial_once() {
        for trials in [0, 1, 15, 16, 17, 40, 711] {
            for count in 1..9 {
                let mut next = 0;
                for index in 0..count {
                    let p = part(trials, 16, Shard { index, count });
                    assert_eq!(p.start, next, "trials {trials}, {index}/{count}");
                    assert!(p.start % 16 == 0);
                    assert!(p.end % 16 == 0 || p.end == trials);
                    next = p.end;
                }
                assert_eq!(next, trials);
            }
        }
    }

    #[test]
    fn shard_arguments() {
        let fixed: ShardArg = "2/3".parse().unwrap();
        assert_eq!(fixed, ShardArg::Fixed(Shard { index: 2, count: 3 }));
        assert!("3/3".parse::<ShardArg>().is_err());
        assert!("1/0".parse::<ShardArg>().is_err());
        assert!("x/3".parse::<ShardArg>().is_err());
        assert!("3".parse::<ShardArg>().is_err());
        assert_eq!("auto/4".parse::<ShardArg>(), Ok(ShardArg::AutoOf(4)));

        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert_eq!(
            ShardArg::Auto.resolve(env(&slurm)).unwrap(),
            Shard { index: 2, count: 3 }
        );
        assert!(ShardArg::Auto.resolve(env(&[])).is_err());
        let k8s = [("JOB_COMPLETION_INDEX", "1")];
        assert_eq!(
            ShardArg::AutoOf(3).resolve(env(&k8s)).unwrap(),
            Shard { index: 1, count: 3 }
        );
        assert!(ShardArg::AutoOf(1).resolve(env(&k8s)).is_err());
        assert!(ShardArg::AutoOf(3).resolve(env(&[])).is_err());
        let resubmitted = [
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
        ];
        assert_eq!(
            ShardArg::AutoOf(3).resolve(env(&resubmitted)).unwrap(),
            Shard { index: 2, count: 3 }
        );
    }
}
