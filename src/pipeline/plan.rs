//! The plan: which source entry feeds which stage, checked against the source before anything
//! is written. Every entry is claimed by exactly one stage or skipped with a reason; every array
//! header is read and checked for dtype, shape and the dataset's shared dimensions.

use std::collections::BTreeMap;

use globset::{Glob, GlobMatcher};

use super::spec::Pipeline;
use crate::error::{Error, Result};
use crate::npy::{Dtype, Header};
use crate::source::{read_npy_header, Source};
use crate::stages::kind::PlanContext;
use crate::stages::registry::StagePlan;

/// What happens to one source entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Read by the stage with this index in `Pipeline::stages`.
    Stage(usize),
    Skipped(String),
}

/// An array entry of the source with its checked header.
#[derive(Debug, Clone)]
pub struct ArrayEntry {
    /// Index into `Source::entries`.
    pub entry: usize,
    pub header: Header,
}

/// The entries of a per-trial variable (`<source>/<trial>.npy`), checked alike.
#[derive(Debug, Clone)]
pub struct TrialPlan<'p, C> {
    pub config: &'p C,
    /// One entry per trial, in trial-axis order.
    pub trials: Vec<ArrayEntry>,
    pub dtype: Dtype,
    /// Shape of one trial's array.
    pub trial_shape: Vec<u64>,
}

pub struct Plan<'p> {
    /// Trial numbers (`<trial>.npy`) in numeric order: the trial axis.
    pub trial_ids: Vec<u32>,
    /// Size of every named dimension (trial, neuron, frame, ...).
    pub dims: BTreeMap<String, u64>,
    pub stages: Vec<StagePlan<'p>>,
    /// One per `Source::entries`.
    pub dispositions: Vec<Disposition>,
    /// The checked header of every entry a stage reads, by `Source::entries` index.
    pub headers: BTreeMap<usize, Header>,
}

impl Plan<'_> {
    pub fn n_trials(&self) -> usize {
        self.trial_ids.len()
    }
}

/// Builds and checks the plan. Reads every array header (a few KB per entry), nothing more.
pub fn plan<'p>(pipeline: &'p Pipeline, source: &Source) -> Result<Plan<'p>> {
    let dispositions = claim_entries(pipeline, source)?;
    plan_claimed(pipeline, source, dispositions)
}

/// Step 1 of the plan, from entry names alone: which stage or skip rule takes each entry. An
/// entry that none takes is an error, so nothing is dropped silently.
pub fn claim_entries(pipeline: &Pipeline, source: &Source) -> Result<Vec<Disposition>> {
    let skips: Vec<(GlobMatcher, &str)> = pipeline
        .skip
        .iter()
        .map(|r| Ok((compile(&r.pattern)?, r.reason.as_str())))
        .collect::<Result<_>>()?;

    // 1. Claims.
    let mut dispositions = Vec::with_capacity(source.entries.len());
    let mut unclaimed = Vec::new();
    let excludes: Vec<Vec<GlobMatcher>> = pipeline
        .stages
        .iter()
        .map(|s| s.excludes().iter().map(|p| compile(p)).collect())
        .collect::<Result<_>>()?;
    for entry in &source.entries {
        if let Some((_, reason)) = skips.iter().find(|(m, _)| m.is_match(&entry.path)) {
            dispositions.push(Disposition::Skipped(format!(
                "skipped by the pipeline: {reason}"
            )));
            continue;
        }
        match claim(pipeline, &excludes, &entry.path) {
            Some(d) => dispositions.push(d),
            None => {
                unclaimed.push(entry.path.clone());
                dispositions.push(Disposition::Skipped(String::new()));
            }
        }
    }
    if !unclaimed.is_empty() {
        return Err(unclaimed_error(source, &unclaimed));
    }
    Ok(dispositions)
}

/// The first stage whose source holds `path` and that claims it: the stage, or skipped where
/// one of the stage's `excludes` matches.
fn claim(pipeline: &Pipeline, excludes: &[Vec<GlobMatcher>], path: &str) -> Option<Disposition> {
    for (i, stage) in pipeline.stages.iter().enumerate() {
        let Some(rest) = path
            .strip_prefix(stage.source())
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        if stage.claims(rest) {
            let name = rest.trim_end_matches(".npy");
            return Some(match excludes[i].iter().any(|m| m.is_match(name)) {
                true => Disposition::Skipped(format!("excluded by stage {}", stage.id())),
                false => Disposition::Stage(i),
            });
        }
    }
    None
}

fn unclaimed_error(source: &Source, unclaimed: &[String]) -> Error {
    let shown: Vec<_> = unclaimed.iter().take(5).map(String::as_str).collect();
    Error::bad_input(
        source.path.display().to_string(),
        format!(
            "{} entr{} that no stage of the pipeline reads: {}{}",
            unclaimed.len(),
            if unclaimed.len() == 1 { "y" } else { "ies" },
            shown.join(", "),
            if unclaimed.len() > 5 { ", ..." } else { "" }
        ),
        "nothing is dropped silently: add a `skip` rule (with a reason) or a stage for them to the pipeline file",
    )
}

fn plan_claimed<'p>(
    pipeline: &'p Pipeline,
    source: &Source,
    dispositions: Vec<Disposition>,
) -> Result<Plan<'p>> {
    // 2. Headers of every claimed entry.
    let mut reader = source.reader()?;
    let mut per_stage: Vec<Vec<ArrayEntry>> = vec![Vec::new(); pipeline.stages.len()];
    for (index, d) in dispositions.iter().enumerate() {
        if let Disposition::Stage(s) = d {
            let header = read_npy_header(source, reader.as_mut(), &source.entries[index])?;
            per_stage[*s].push(ArrayEntry {
                entry: index,
                header,
            });
        }
    }

    let headers = per_stage
        .iter()
        .flatten()
        .map(|a| (a.entry, a.header.clone()))
        .collect();

    // 3. Stage plans and the dataset's shared dimensions.
    let mut dims = Dims::default();
    let mut trial_ids: Option<(Vec<u32>, String)> = None;
    let mut ctx = PlanContext {
        source,
        dims: &mut dims,
        trial_ids: &mut trial_ids,
    };
    let stages = pipeline
        .stages
        .iter()
        .zip(per_stage)
        .map(|(stage, entries)| stage.plan(entries, &mut ctx))
        .collect::<Result<Vec<_>>>()?;
    let trial_ids = trial_ids.map(|t| t.0).unwrap_or_default();
    Ok(Plan {
        trial_ids,
        dims: dims.0,
        stages,
        dispositions,
        headers,
    })
}

fn compile(pattern: &str) -> Result<GlobMatcher> {
    Glob::new(pattern)
        .map(|g| g.compile_matcher())
        .map_err(|e| {
            Error::bad_pipeline(
                "pipeline",
                format!("pattern {pattern:?}: {e}"),
                "use `*` within a path part and `**` across parts",
            )
        })
}

/// `<digits>.npy` -> the trial number.
pub fn trial_number(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".npy")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The dataset's named dimensions and where each was first seen: every output that names a
/// dimension must agree on its length.
#[derive(Default)]
pub struct Dims(BTreeMap<String, u64>, BTreeMap<String, String>);

impl Dims {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }

    pub fn add(&mut self, name: &str, len: u64, from: &str, source: &Source) -> Result<()> {
        match self.0.get(name) {
            Some(&have) if have != len => Err(Error::bad_input(
                format!("{}: {from}", source.path.display()),
                format!("dimension `{name}` has length {len} here but {have} in {}", self.1[name]),
                "the dataset is inconsistent (files from different mice or releases mixed?); check the source",
            )),
            Some(_) => Ok(()),
            None => {
                self.0.insert(name.to_string(), len);
                self.1.insert(name.to_string(), from.to_string());
                Ok(())
            }
        }
    }
}

/// The plan of a per-trial variable: its trials in numeric order, each of one dtype and shape,
/// the same trials as every other per-trial variable of the source.
pub(crate) fn trial_plan<'p, C>(
    ctx: &mut PlanContext,
    config: &'p C,
    folder: &str,
    id: &str,
    mut entries: Vec<ArrayEntry>,
) -> Result<TrialPlan<'p, C>>
where
    C: 'p,
{
    let source = ctx.source;
    let number = |a: &ArrayEntry| {
        trial_number(
            source.entries[a.entry]
                .path
                .rsplit('/')
                .next()
                .unwrap_or_default(),
        )
        .unwrap_or(u32::MAX)
    };
    entries.sort_by_key(number);
    if entries.is_empty() {
        return Err(Error::bad_input(
            format!("{}: {folder}", source.path.display()),
            format!("no trial files (`{folder}/<trial>.npy`) for stage {id}"),
            "check that the source is a complete Sensorium mouse, or remove the stage from the pipeline",
        ));
    }
    let ids: Vec<u32> = entries.iter().map(number).collect();
    check_unique_trials(source, folder, &ids)?;
    same_trials(source, folder, ctx.trial_ids, ids)?;
    let (dtype, trial_shape) = common_dtype_and_shape(source, &entries)?;
    Ok(TrialPlan {
        config,
        trials: entries,
        dtype,
        trial_shape,
    })
}

/// Trial numbers (sorted) appear once each.
fn check_unique_trials(source: &Source, folder: &str, ids: &[u32]) -> Result<()> {
    for pair in ids.windows(2) {
        if pair[0] == pair[1] {
            return Err(Error::bad_input(
                format!("{}: {folder}", source.path.display()),
                format!(
                    "trial {} appears twice (numbers with leading zeros?)",
                    pair[0]
                ),
                "keep one file per trial number",
            ));
        }
    }
    Ok(())
}

/// Every per-trial variable must hold the same trials: the first one read sets `trial_ids`.
fn same_trials(
    source: &Source,
    folder: &str,
    trial_ids: &mut Option<(Vec<u32>, String)>,
    ids: Vec<u32>,
) -> Result<()> {
    let Some((have, from)) = trial_ids else {
        *trial_ids = Some((ids, folder.to_string()));
        return Ok(());
    };
    if *have == ids {
        return Ok(());
    }
    let missing_here = have.iter().find(|t| !ids.contains(t));
    let extra_here = ids.iter().find(|t| !have.contains(t));
    let problem = match (missing_here, extra_here) {
        (Some(t), _) => format!("trial {t} exists in {from} but not in {folder}"),
        (None, Some(t)) => format!("trial {t} exists in {folder} but not in {from}"),
        _ => format!("{folder} and {from} hold different trials"),
    };
    Err(Error::bad_input(
        source.path.display().to_string(),
        problem,
        "every data/<variable>/ folder must hold the same trial numbers; re-download the archive",
    ))
}

/// The numeric dtype and the shape that every trial (at least one) has.
fn common_dtype_and_shape(source: &Source, entries: &[ArrayEntry]) -> Result<(Dtype, Vec<u64>)> {
    let first = &entries[0];
    let (dtype, shape) = (first.header.dtype, first.header.shape.clone());
    if !dtype.is_numeric() {
        return Err(Error::bad_input(
            source.locate(&source.entries[first.entry]),
            format!("per-trial arrays must be numeric, this one is {dtype}"),
            "check the source",
        ));
    }
    for a in entries {
        if a.header.dtype != dtype || a.header.shape != shape {
            return Err(Error::bad_input(
                source.locate(&source.entries[a.entry]),
                format!("dtype {} and shape {:?} differ from {} (dtype {dtype}, shape {shape:?})", a.header.dtype, a.header.shape, source.entries[first.entry].path),
                "all trials of a variable must have one dtype and shape; the file is damaged or from another dataset",
            ));
        }
    }
    Ok((dtype, shape))
}
