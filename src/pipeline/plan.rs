//! The plan: which source entry feeds which stage, checked against the source before anything
//! is written. Every entry is claimed by exactly one stage or skipped with a reason; every array
//! header is read and checked for dtype, shape and the dataset's shared dimensions.

use std::collections::BTreeMap;

use globset::{Glob, GlobMatcher};

use super::spec::{
    MetaAxis, MetaTableConfig, Pipeline, Stage, StatisticsConfig, TrialArrayConfig,
    TrialTableConfig,
};
use crate::error::{Error, Result};
use crate::npy::{Dtype, Header};
use crate::source::{read_npy_header, Source};

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

#[derive(Debug, Clone)]
pub struct TrialPlan<'p, C> {
    pub config: &'p C,
    /// One entry per trial, in trial-axis order.
    pub trials: Vec<ArrayEntry>,
    pub dtype: Dtype,
    /// Shape of one trial's array.
    pub trial_shape: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct StatisticsPlan<'p> {
    pub config: &'p StatisticsConfig,
    /// `(var/subset/stat, entry)`, sorted by name.
    pub arrays: Vec<(String, ArrayEntry)>,
}

#[derive(Debug, Clone)]
pub struct MetaPlan<'p> {
    pub config: &'p MetaTableConfig,
    /// `(file stem, entry)` in column order.
    pub files: Vec<(String, ArrayEntry)>,
    pub rows: u64,
}

#[derive(Debug, Clone)]
pub enum StagePlan<'p> {
    TrialArray(TrialPlan<'p, TrialArrayConfig>),
    TrialTable(TrialPlan<'p, TrialTableConfig>),
    Statistics(StatisticsPlan<'p>),
    MetaTable(MetaPlan<'p>),
}

pub struct Plan<'p> {
    /// Trial numbers (`<trial>.npy`) in numeric order: the trial axis.
    pub trial_ids: Vec<u32>,
    /// Size of every named dimension (trial, neuron, frame, ...).
    pub dims: BTreeMap<String, u64>,
    pub stages: Vec<StagePlan<'p>>,
    /// One per `Source::entries`.
    pub dispositions: Vec<Disposition>,
}

impl Plan<'_> {
    pub fn n_trials(&self) -> usize {
        self.trial_ids.len()
    }
}

/// Builds and checks the plan. Reads every array header (a few KB per entry), nothing more.
pub fn plan<'p>(pipeline: &'p Pipeline, source: &Source) -> Result<Plan<'p>> {
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
        .map(|s| match s {
            Stage::Statistics(c) => c.exclude.iter().map(|p| compile(p)).collect(),
            _ => Ok(Vec::new()),
        })
        .collect::<Result<_>>()?;
    for entry in &source.entries {
        if let Some((_, reason)) = skips.iter().find(|(m, _)| m.is_match(&entry.path)) {
            dispositions.push(Disposition::Skipped(format!(
                "skipped by the pipeline: {reason}"
            )));
            continue;
        }
        let mut claim = None;
        for (i, stage) in pipeline.stages.iter().enumerate() {
            let Some(rest) = entry
                .path
                .strip_prefix(stage.source())
                .and_then(|r| r.strip_prefix('/'))
            else {
                continue;
            };
            let claimed = match stage {
                Stage::TrialArray(_) | Stage::TrialTable(_) => trial_number(rest).is_some(),
                Stage::Statistics(_) => rest.ends_with(".npy"),
                Stage::MetaTable(_) => rest.ends_with(".npy") && !rest.contains('/'),
            };
            if claimed {
                let name = rest.trim_end_matches(".npy");
                claim = Some(match excludes[i].iter().any(|m| m.is_match(name)) {
                    true => Disposition::Skipped(format!("excluded by stage {}", stage.id())),
                    false => Disposition::Stage(i),
                });
                break;
            }
        }
        match claim {
            Some(d) => dispositions.push(d),
            None => {
                unclaimed.push(entry.path.clone());
                dispositions.push(Disposition::Skipped(String::new()));
            }
        }
    }
    if !unclaimed.is_empty() {
        let shown: Vec<_> = unclaimed.iter().take(5).map(String::as_str).collect();
        return Err(Error::bad_input(
            source.path.display().to_string(),
            format!(
                "{} entr{} that no stage of the pipeline reads: {}{}",
                unclaimed.len(),
                if unclaimed.len() == 1 { "y" } else { "ies" },
                shown.join(", "),
                if unclaimed.len() > 5 { ", ..." } else { "" }
            ),
            "nothing is dropped silently: add a `skip` rule (with a reason) or a stage for them to the pipeline file",
        ));
    }

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

    // 3. Stage plans and the dataset's shared dimensions.
    let mut dims = Dims::default();
    let mut trial_ids: Option<(Vec<u32>, String)> = None;
    let mut stages = Vec::with_capacity(pipeline.stages.len());
    for (stage, entries) in pipeline.stages.iter().zip(per_stage) {
        let plan = match stage {
            Stage::TrialArray(c) => {
                let p = trial_plan(source, c, &c.source, &c.id, entries, &mut trial_ids)?;
                if p.trial_shape.len() + 1 != c.dimension_names.len() {
                    return Err(Error::bad_input(
                        format!("{}: {}", source.path.display(), c.source),
                        format!("trials have {} axes but stage {} names {} dimensions after the trial axis", p.trial_shape.len(), c.id, c.dimension_names.len() - 1),
                        "fix `dimension_names` in the pipeline, or check the source",
                    ));
                }
                dims.add(
                    &c.dimension_names[0],
                    p.trials.len() as u64,
                    &c.source,
                    source,
                )?;
                for (name, &len) in c.dimension_names[1..].iter().zip(&p.trial_shape) {
                    dims.add(name, len, &c.source, source)?;
                }
                StagePlan::TrialArray(p)
            }
            Stage::TrialTable(c) => {
                let p = trial_plan(source, c, &c.source, &c.id, entries, &mut trial_ids)?;
                if p.trial_shape.len() != 2 || p.trial_shape[0] != c.columns.len() as u64 {
                    return Err(Error::bad_input(
                        format!("{}: {}", source.path.display(), c.source),
                        format!("trials have shape {:?}; stage {} expects ({}, frames), one row per column {:?}", p.trial_shape, c.id, c.columns.len(), c.columns),
                        "fix `columns` in the pipeline, or check the source",
                    ));
                }
                dims.add(&c.frame_column, p.trial_shape[1], &c.source, source)?;
                StagePlan::TrialTable(p)
            }
            Stage::Statistics(c) => {
                let mut arrays = Vec::new();
                for a in entries {
                    let path = &source.entries[a.entry].path;
                    let name = path[c.source.len() + 1..]
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
                    if let Some(names) = c.dimension_names.get(var) {
                        if names.len() == a.header.shape.len() {
                            for (n, &len) in names.iter().zip(&a.header.shape) {
                                dims.add(n, len, path, source)?;
                            }
                        }
                    }
                    arrays.push((name, a));
                }
                arrays.sort_by(|a, b| a.0.cmp(&b.0));
                StagePlan::Statistics(StatisticsPlan { config: c, arrays })
            }
            Stage::MetaTable(c) => StagePlan::MetaTable(meta_plan(
                source,
                c,
                entries,
                &mut dims,
                trial_ids.as_ref().map(|t| t.0.len() as u64),
            )?),
        };
        stages.push(plan);
    }
    let trial_ids = trial_ids.map(|t| t.0).unwrap_or_default();
    Ok(Plan {
        trial_ids,
        dims: dims.0,
        stages,
        dispositions,
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

#[derive(Default)]
struct Dims(BTreeMap<String, u64>, BTreeMap<String, String>);

impl Dims {
    fn add(&mut self, name: &str, len: u64, from: &str, source: &Source) -> Result<()> {
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

fn trial_plan<'p, C>(
    source: &Source,
    config: &'p C,
    folder: &str,
    id: &str,
    mut entries: Vec<ArrayEntry>,
    trial_ids: &mut Option<(Vec<u32>, String)>,
) -> Result<TrialPlan<'p, C>>
where
    C: 'p,
{
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
    let Some(first) = entries.first() else {
        return Err(Error::bad_input(
            format!("{}: {folder}", source.path.display()),
            format!("no trial files (`{folder}/<trial>.npy`) for stage {id}"),
            "check that the source is a complete Sensorium mouse, or remove the stage from the pipeline",
        ));
    };
    let ids: Vec<u32> = entries.iter().map(number).collect();
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
    // Every per-trial variable must hold the same trials.
    match trial_ids {
        None => *trial_ids = Some((ids, folder.to_string())),
        Some((have, from)) => {
            if *have != ids {
                let missing_here = have.iter().find(|t| !ids.contains(t));
                let extra_here = ids.iter().find(|t| !have.contains(t));
                let problem = match (missing_here, extra_here) {
                    (Some(t), _) => format!("trial {t} exists in {from} but not in {folder}"),
                    (None, Some(t)) => format!("trial {t} exists in {folder} but not in {from}"),
                    _ => format!("{folder} and {from} hold different trials"),
                };
                return Err(Error::bad_input(source.path.display().to_string(), problem, "every data/<variable>/ folder must hold the same trial numbers; re-download the archive"));
            }
        }
    }
    let (dtype, shape) = (first.header.dtype, first.header.shape.clone());
    if !dtype.is_numeric() {
        return Err(Error::bad_input(
            source.locate(&source.entries[first.entry]),
            format!("per-trial arrays must be numeric, this one is {dtype}"),
            "check the source",
        ));
    }
    for a in &entries {
        if a.header.dtype != dtype || a.header.shape != shape {
            return Err(Error::bad_input(
                source.locate(&source.entries[a.entry]),
                format!("dtype {} and shape {:?} differ from {} (dtype {dtype}, shape {shape:?})", a.header.dtype, a.header.shape, source.entries[first.entry].path),
                "all trials of a variable must have one dtype and shape; the file is damaged or from another dataset",
            ));
        }
    }
    Ok(TrialPlan {
        config,
        trials: entries,
        dtype,
        trial_shape: shape,
    })
}

fn meta_plan<'p>(
    source: &Source,
    c: &'p MetaTableConfig,
    entries: Vec<ArrayEntry>,
    dims: &mut Dims,
    n_trials: Option<u64>,
) -> Result<MetaPlan<'p>> {
    let stem = |a: &ArrayEntry| {
        source.entries[a.entry]
            .path
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .trim_end_matches(".npy")
            .to_string()
    };
    let mut files: Vec<(String, ArrayEntry)> = entries.into_iter().map(|a| (stem(&a), a)).collect();
    for req in &c.required {
        if !files.iter().any(|(s, _)| s == req) {
            return Err(Error::bad_input(
                format!("{}: {}/{req}.npy", source.path.display(), c.source),
                "required file is missing".to_string(),
                format!("stage {} requires it; check that the source is complete, or remove it from `required`", c.id),
            ));
        }
    }
    let rank = |s: &str| c.order.iter().position(|o| o == s).unwrap_or(usize::MAX);
    files.sort_by(|a, b| (rank(&a.0), &a.0).cmp(&(rank(&b.0), &b.0)));
    let mut rows = match c.axis {
        MetaAxis::Trial => n_trials,
        MetaAxis::Neuron => dims.0.get("neuron").copied(),
    };
    for (name, a) in &files {
        let located = source.locate(&source.entries[a.entry]);
        let shape = &a.header.shape;
        let ok_rank = match c.split.get(name) {
            Some(cols) => shape.len() == 2 && shape[1] == cols.len() as u64,
            None => shape.len() == 1,
        };
        if !ok_rank {
            let want = match c.split.get(name) {
                Some(cols) => format!("(rows, {})", cols.len()),
                None => "(rows,)".to_string(),
            };
            return Err(Error::bad_input(
                located,
                format!(
                    "shape {shape:?} does not fit table {}: expected {want}",
                    c.output
                ),
                "list 2-D files under `split` in the pipeline, or skip the file with a `skip` rule",
            ));
        }
        let len = shape[0];
        match rows {
            Some(r) if r != len => {
                let what = match c.axis {
                    MetaAxis::Trial => "trials",
                    MetaAxis::Neuron => "neurons",
                };
                return Err(Error::bad_input(located, format!("has {len} rows but the dataset has {r} {what}"), "the meta data does not belong to these trials/neurons; re-download the archive"));
            }
            _ => rows = Some(len),
        }
    }
    let rows = rows.unwrap_or(0);
    if c.axis == MetaAxis::Neuron {
        dims.add("neuron", rows, &c.source, source)?;
    }
    Ok(MetaPlan {
        config: c,
        files,
        rows,
    })
}
