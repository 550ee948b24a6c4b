//! The one loop over a pipeline's stages, for a whole run (`convert`, `finalize`) and for the part
//! of the trials a `--shard` task converts. Per stage: reuse it (after checking its files against
//! their recorded hashes) or run it; read back and check what it wrote; hash its files; turn its
//! records into its lock. The caller decides what happens after each stage and after the last.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use super::keys::{Decision, Origin, StageKey};
use super::lock::{LockedEntry, StageLock};
use super::staging::{damaged_output, link_outputs, remove_stage_outputs};
use super::{Prepared, StageReport};
use crate::error::{Error, Result};
use crate::pipeline::plan::{Disposition, Plan};
use crate::progress::{self, ProgressMode, StageProgress};
use crate::source::Source;
use crate::stages::registry::{Stage, StagePlan};
use crate::stages::{Measure, MeasureValues, StageContext, StageResult};
use crate::validate;
use crate::writers::output_store::WriteLog;
use crate::writers::zarr::ZarrPath;
use crate::writers::Provenance;

/// Which stages run, on which trials, into which folder.
pub(crate) enum Scope<'a> {
    /// Every stage, each run or reused as the plan decided, into the staging folder.
    Whole,
    /// A `--shard` task: the stages that run in parts, on trials `trials`, into `dir`.
    Part { trials: Range<usize>, dir: &'a Path },
}

/// What running the stages needs besides the plan: the threads, how files are written, what
/// every output records about its origin, how progress is shown.
pub(crate) struct StageRunner<'r, 'p> {
    prep: &'r Prepared<'p>,
    pool: rayon::ThreadPool,
    pub(crate) writes: Arc<WriteLog>,
    provenance: Provenance,
    progress: ProgressMode,
    /// Zarr groups around the arrays: written once at the end, never part of a stage.
    pub(crate) groups: BTreeSet<ZarrPath>,
}

impl<'r, 'p> StageRunner<'r, 'p> {
    pub(crate) fn new(
        prep: &'r Prepared<'p>,
        threads: usize,
        direct_io: bool,
        progress: ProgressMode,
    ) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Internal(format!("cannot start {threads} threads: {e}")))?;
        Ok(StageRunner {
            prep,
            pool,
            writes: WriteLog::new(direct_io),
            provenance: super::provenance(prep),
            progress,
            groups: group_paths(prep.pipeline, &prep.plan),
        })
    }

    pub(crate) fn provenance(&self) -> &Provenance {
        &self.provenance
    }

    /// Runs the stages of `scope` in order; `finished` is called with each stage's lock as soon
    /// as the stage is done (a whole run records it in the staging folder, for resuming).
    pub(crate) fn run(
        &self,
        scope: &Scope,
        mut finished: impl FnMut(&StageLock) -> Result<()>,
    ) -> Result<Vec<(StageLock, StageReport)>> {
        let mut measures: BTreeMap<(String, Measure), MeasureValues> = BTreeMap::new();
        let mut done = Vec::new();
        for index in 0..self.prep.pipeline.stages.len() {
            crate::interrupt::check()?;
            let started = Instant::now();
            let ran = match scope {
                Scope::Whole => Some(self.whole(index, &measures)?),
                Scope::Part { trials, dir } => self.part(index, trials, dir)?,
            };
            let Some((lock, mut report)) = ran else {
                continue;
            };
            add_measures(&mut measures, &lock)?;
            finished(&lock)?;
            report.seconds = started.elapsed().as_secs_f64();
            tracing::info!(stage = %report.id, action = %report.action, entries = report.entries, bytes = report.bytes, seconds = report.seconds, "stage finished");
            done.push((lock, report));
        }
        Ok(done)
    }

    fn context<'c>(
        &'c self,
        dir: &'c Path,
        provenance: &'c Provenance,
        measures: &'c BTreeMap<(String, Measure), MeasureValues>,
    ) -> StageContext<'c> {
        StageContext {
            source: &self.prep.source,
            pipeline: self.prep.pipeline,
            plan: &self.prep.plan,
            dataset_dir: dir,
            provenance,
            measures,
            pipeline_file: &self.prep.pipeline_file,
            writes: &self.writes,
        }
    }

    /// Stage `index` of a whole run: reused when the plan says so and its files are intact,
    /// else run.
    fn whole(
        &self,
        index: usize,
        measures: &BTreeMap<(String, Measure), MeasureValues>,
    ) -> Result<(StageLock, StageReport)> {
        let (stage, key) = (&self.prep.pipeline.stages[index], &self.prep.keys[index]);
        let provenance = stage_provenance(&self.provenance, stage, key);
        let ctx = self.context(&self.prep.staging_dir, &provenance, measures);
        match self.checked_decision(index)? {
            Decision::Reuse { origin, lock } => self.reuse(index, &ctx, origin, lock),
            Decision::Run { reason } => self.execute(index, &ctx, &reason),
        }
    }

    /// The plan's decision for stage `index`, with reused outputs checked against their
    /// recorded hashes first: damaged or changed files make the stage run again instead of
    /// being carried into the new dataset. A sharded run's files were checked against their
    /// receipts already.
    fn checked_decision(&self, index: usize) -> Result<Decision> {
        let decision = &self.prep.decisions[index];
        let Decision::Reuse { origin, lock } = decision else {
            return Ok(decision.clone());
        };
        let dir = match origin {
            Origin::Shards => return Ok(decision.clone()),
            Origin::Existing => &self.prep.dataset_dir,
            Origin::Partial => &self.prep.staging_dir,
        };
        let Some(file) = damaged_output(dir, lock) else {
            return Ok(decision.clone());
        };
        let stage = self.prep.pipeline.stages[index].id();
        tracing::warn!(stage, file = %file, "a reusable output does not match its recorded hash; running the stage again");
        if *origin == Origin::Partial {
            remove_stage_outputs(&self.prep.staging_dir, lock)?;
        }
        Ok(Decision::Run {
            reason: format!("{file} no longer matches its recorded hash"),
        })
    }

    fn reuse(
        &self,
        index: usize,
        ctx: &StageContext,
        origin: Origin,
        mut lock: StageLock,
    ) -> Result<(StageLock, StageReport)> {
        let (stage, stage_plan) = (
            &self.prep.pipeline.stages[index],
            &self.prep.plan.stages[index],
        );
        let staging = &self.prep.staging_dir;
        match origin {
            Origin::Existing => link_outputs(&self.prep.dataset_dir, staging, &lock)?,
            Origin::Partial => {}
            Origin::Shards => {
                let dir = self.prep.shards_dir.as_deref().ok_or_else(|| {
                    Error::Internal("shards reused without a shards folder".into())
                })?;
                link_outputs(dir, staging, &lock)?;
                // The tasks wrote the parts; what they leave to the end is written once, here.
                for file in stage_plan.finish_parts(ctx)? {
                    let hash = validate::hash_file(&staging.join(&file))?.1;
                    lock.outputs.insert(file, hash);
                }
                stage_plan.check_output(staging, &self.prep.plan)?;
            }
        }
        tracing::info!(stage = stage.id(), from = ?origin, "stage reused");
        let report = stage_report(
            stage,
            format!("reused ({origin:?})").to_lowercase(),
            lock.entries.len(),
            0,
        );
        Ok((lock, report))
    }

    fn execute(
        &self,
        index: usize,
        ctx: &StageContext,
        reason: &str,
    ) -> Result<(StageLock, StageReport)> {
        let (stage, stage_plan) = (
            &self.prep.pipeline.stages[index],
            &self.prep.plan.stages[index],
        );
        tracing::info!(stage = stage.id(), kind = stage.name(), reason = %reason, "stage started");
        let (entries, bytes) = stage_totals(&self.prep.source, &self.prep.plan, index);
        let result = self.with_progress(stage, entries, bytes, || stage_plan.run(ctx))?;
        // Validation between stages: what this stage wrote, read back from disk.
        let staging = &self.prep.staging_dir;
        stage_plan.check_output(staging, &self.prep.plan)?;
        let outputs = self
            .pool
            .install(|| hash_stage_outputs(staging, stage.output(), &self.groups, &self.writes))?;
        let report = stage_report(stage, "ran".into(), result.entries.len(), result.bytes);
        let lock = lock_from_result(
            &self.prep.keys[index],
            stage,
            &self.prep.source,
            outputs,
            &result,
        );
        Ok((lock, report))
    }

    /// Stage `index` of a `--shard` task, when it runs in parts: its part of the trials, into
    /// the sharded run's folder. Its files are hashed here, for the task's receipt.
    fn part(
        &self,
        index: usize,
        trials: &Range<usize>,
        dir: &Path,
    ) -> Result<Option<(StageLock, StageReport)>> {
        let (stage, stage_plan) = (
            &self.prep.pipeline.stages[index],
            &self.prep.plan.stages[index],
        );
        if !stage_plan.runs_in_parts() {
            return Ok(None);
        }
        let key = &self.prep.keys[index];
        let provenance = stage_provenance(&self.provenance, stage, key);
        let no_measures = BTreeMap::new();
        let ctx = self.context(dir, &provenance, &no_measures);
        let (entries, bytes) = stage_totals(&self.prep.source, &self.prep.plan, index);
        let n = self.prep.plan.n_trials().max(1) as u64;
        let share = |total: u64| total * trials.len() as u64 / n;
        tracing::info!(
            stage = stage.id(),
            first = trials.start,
            end = trials.end,
            "stage started"
        );
        let result = self.with_progress(stage, share(entries), share(bytes), || {
            stage_plan.run_part(&ctx, trials.clone())
        })?;
        let outputs = self.pool.install(|| {
            result
                .written
                .par_iter()
                .map(|f| Ok((f.clone(), written_hash(&dir.join(f), &self.writes)?)))
                .collect::<Result<BTreeMap<_, _>>>()
        })?;
        let report = stage_report(stage, "ran".into(), result.entries.len(), result.bytes);
        let lock = lock_from_result(key, stage, &self.prep.source, outputs, &result);
        Ok(Some((lock, report)))
    }

    /// Runs `work` on the pool with a progress display for the stage.
    fn with_progress(
        &self,
        stage: &Stage,
        entries: u64,
        bytes: u64,
        work: impl FnOnce() -> Result<StageResult> + Send,
    ) -> Result<StageResult> {
        progress::set_current(Some(std::sync::Arc::new(StageProgress::new(
            self.progress,
            stage.id(),
            entries,
            bytes,
        ))));
        let result = self.pool.install(work);
        progress::set_current(None);
        result
    }
}

fn stage_report(stage: &Stage, action: String, entries: usize, bytes: u64) -> StageReport {
    StageReport {
        id: stage.id().into(),
        kind: stage.name().into(),
        action,
        entries,
        bytes,
        seconds: 0.0,
    }
}

/// The measures a finished stage recorded, for the stages after it.
fn add_measures(
    measures: &mut BTreeMap<(String, Measure), MeasureValues>,
    lock: &StageLock,
) -> Result<()> {
    for (name, values) in &lock.measures {
        let measure: Measure = serde_json::from_value(serde_json::Value::String(name.clone()))
            .map_err(|_| Error::Internal(format!("unknown measure {name} in a lock")))?;
        measures.insert((lock.id.clone(), measure), values.clone());
    }
    Ok(())
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

/// Entries a stage reads and their stored size, for progress totals.
pub(crate) fn stage_totals(source: &Source, plan: &Plan, stage: usize) -> (u64, u64) {
    source
        .entries
        .iter()
        .zip(&plan.dispositions)
        .filter(|(_, d)| **d == Disposition::Stage(stage))
        .fold((0, 0), |(n, b), (e, _)| (n + 1, b + e.size))
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

/// Every Zarr group on the way to an array (Zarr v3 has no implicit groups), derived from the
/// plan so it never depends on what happens to be on disk. A stage whose output holds several
/// arrays makes its output a group too.
fn group_paths(pipeline: &crate::pipeline::spec::Pipeline, plan: &Plan) -> BTreeSet<ZarrPath> {
    let mut groups = BTreeSet::new();
    for (stage, stage_plan) in pipeline.stages.iter().zip(&plan.stages) {
        groups.extend(stage_groups(stage, stage_plan));
    }
    groups
}

fn stage_groups(stage: &Stage, stage_plan: &StagePlan) -> Vec<ZarrPath> {
    let arrays = stage_plan.zarr_arrays();
    let Some(output) = ZarrPath::parse(stage.output()).filter(|_| !arrays.is_empty()) else {
        return Vec::new();
    };
    let mut groups = Vec::new();
    for array in &arrays {
        let node = match array.is_empty() {
            true => output.clone(),
            false => output.join(array),
        };
        groups.extend(node.ancestors());
    }
    if arrays.iter().any(|a| !a.is_empty()) {
        groups.push(output);
    }
    groups
}
