//! `inspect`: what a user needs to know about a source before converting it.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::npy;
use crate::pipeline::plan::{plan, Disposition, Plan, StagePlan, TrialPlan};
use crate::pipeline::spec::{Measure, MetaAxis, Pipeline, Stage};
use crate::source::{read_npy, Source, SourceKind};
use crate::stages::trial_array::valid_frames;

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub name: String,
    pub source: String,
    pub source_kind: SourceKind,
    pub source_bytes: u64,
    pub entries: usize,
    pub n_trials: usize,
    pub n_neurons: Option<u64>,
    pub n_frames: Option<u64>,
    pub dtype: Option<String>,
    pub trial_ids: TrialIds,
    pub tiers: BTreeMap<String, usize>,
    pub variables: Vec<Variable>,
    /// Valid-frame length -> number of trials.
    pub valid_frames: BTreeMap<u64, usize>,
    pub meta_files: Vec<String>,
    pub statistics: Vec<String>,
    pub skipped: Vec<Skipped>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct TrialIds {
    pub first: Option<u32>,
    pub last: Option<u32>,
    /// Numbers missing between first and last (older releases drop some trials).
    pub gaps: usize,
}

#[derive(Debug, Serialize)]
pub struct Variable {
    pub stage: String,
    pub source: String,
    pub dtype: String,
    pub trial_shape: Vec<u64>,
    pub fortran_order: bool,
}

impl Variable {
    fn of<C>(stage: &Stage, t: &TrialPlan<C>) -> Variable {
        Variable {
            stage: stage.id().into(),
            source: stage.source().into(),
            dtype: t.dtype.to_string(),
            trial_shape: t.trial_shape.clone(),
            fortran_order: t.trials.iter().any(|a| a.header.fortran_order),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

pub fn inspect(source: &Source, pipeline: &Pipeline) -> Result<Inspection> {
    let plan = plan(pipeline, source)?;
    let mut variables = Vec::new();
    let mut valid = BTreeMap::new();
    let mut meta_files = Vec::new();
    let mut statistics = Vec::new();
    let mut dtype = None;
    let mut warnings = Vec::new();
    for (stage, p) in pipeline.stages.iter().zip(&plan.stages) {
        match p {
            StagePlan::TrialArray(t) => {
                dtype.get_or_insert_with(|| t.dtype.to_string());
                variables.push(Variable::of(stage, t));
                if t.config.measures.contains(&Measure::ValidFrames) {
                    let frames = *t.trial_shape.last().unwrap_or(&0) as usize;
                    let lengths: Vec<Result<usize>> = t
                        .trials
                        .par_iter()
                        .map_init(
                            || source.reader(),
                            |reader, a| {
                                let reader = reader
                                    .as_mut()
                                    .map_err(|e| Error::Internal(e.to_string()))?;
                                let (header, bytes) =
                                    read_npy(source, reader.as_mut(), &source.entries[a.entry])?;
                                let le = npy::to_little_endian_c(
                                    &header,
                                    &bytes[header.payload_offset..],
                                );
                                Ok(valid_frames(header.dtype, &le, frames))
                            },
                        )
                        .collect();
                    for l in lengths {
                        *valid.entry(l? as u64).or_insert(0) += 1;
                    }
                }
            }
            StagePlan::TrialTable(t) => {
                variables.push(Variable::of(stage, t));
            }
            StagePlan::Statistics(s) => statistics.extend(
                s.arrays
                    .iter()
                    .map(|(n, a)| format!("{n} {} {:?}", a.header.dtype, a.header.shape)),
            ),
            StagePlan::MetaTable(m) => {
                for (stem, a) in &m.files {
                    meta_files.push(format!(
                        "{}/{stem}.npy {} {:?}",
                        m.config.source, a.header.dtype, a.header.shape
                    ));
                }
            }
        }
    }
    let tiers = tier_counts(source, &plan)?;
    let skipped: Vec<Skipped> = source
        .entries
        .iter()
        .zip(&plan.dispositions)
        .filter_map(|(e, d)| match d {
            Disposition::Skipped(reason) => Some(Skipped {
                path: e.path.clone(),
                reason: reason.clone(),
            }),
            _ => None,
        })
        .collect();
    let ids = &plan.trial_ids;
    let gaps = match (ids.first(), ids.last()) {
        (Some(&a), Some(&b)) => (b - a + 1) as usize - ids.len(),
        _ => 0,
    };
    if gaps > 0 {
        warnings.push(format!("{gaps} trial numbers are missing between {} and {} (an older release?); trials are kept in numeric order", ids[0], ids[ids.len() - 1]));
    }
    if tiers.is_empty() {
        warnings.push("no tiers.npy: trial tiers are unknown".into());
    }
    Ok(Inspection {
        name: source.dataset_name(),
        source: source.name.clone(),
        source_kind: source.kind,
        source_bytes: source.total_size(),
        entries: source.entries.len(),
        n_trials: plan.n_trials(),
        n_neurons: plan.dims.get("neuron").copied(),
        n_frames: plan.dims.get("frame").copied(),
        dtype,
        trial_ids: TrialIds {
            first: ids.first().copied(),
            last: ids.last().copied(),
            gaps,
        },
        tiers,
        variables,
        valid_frames: valid,
        meta_files,
        statistics,
        skipped,
        warnings,
    })
}

impl Inspection {
    /// A readable report for a terminal.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        let _ = writeln!(s, "dataset    {}", self.name);
        let _ = writeln!(
            s,
            "source     {} ({:?}, {} entries, {:.1} MB uncompressed)",
            self.source,
            self.source_kind,
            self.entries,
            self.source_bytes as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "trials     {} (numbers {}..{}, {} gaps)",
            self.n_trials,
            self.trial_ids.first.map_or("?".into(), |v| v.to_string()),
            self.trial_ids.last.map_or("?".into(), |v| v.to_string()),
            self.trial_ids.gaps
        );
        let _ = writeln!(s, "neurons    {}", opt(self.n_neurons));
        let _ = writeln!(s, "frames     {}", opt(self.n_frames));
        let _ = writeln!(s, "dtype      {}", self.dtype.as_deref().unwrap_or("?"));
        let _ = writeln!(s, "\ntiers");
        for (tier, n) in &self.tiers {
            let _ = writeln!(s, "  {tier:<20} {n:>6}");
        }
        let _ = writeln!(s, "\nper-trial variables");
        for v in &self.variables {
            let _ = writeln!(
                s,
                "  {:<20} {:<6} {:?}{}",
                v.source,
                v.dtype,
                v.trial_shape,
                if v.fortran_order {
                    " (Fortran order)"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(s, "\nvalid frames (length: trials)");
        for (len, n) in &self.valid_frames {
            let _ = writeln!(s, "  {len:>6}: {n}");
        }
        let _ = writeln!(s, "\nmeta files");
        for m in &self.meta_files {
            let _ = writeln!(s, "  {m}");
        }
        let _ = writeln!(s, "\nstatistics: {}", self.statistics.len());
        let _ = writeln!(s, "\nskipped: {}", self.skipped.len());
        for k in &self.skipped {
            let _ = writeln!(s, "  {} ({})", k.path, k.reason);
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(s, "\nwarnings");
            for w in &self.warnings {
                let _ = writeln!(s, "  {w}");
            }
        }
        s
    }
}

/// Trials per tier, from the trial table's `tiers.npy` (empty when there is none).
pub fn tier_counts(source: &Source, plan: &Plan) -> Result<BTreeMap<String, usize>> {
    let mut tiers = BTreeMap::new();
    for p in &plan.stages {
        let StagePlan::MetaTable(m) = p else { continue };
        if m.config.axis != MetaAxis::Trial {
            continue;
        }
        for (stem, a) in m.files.iter().filter(|(stem, _)| stem == "tiers") {
            let entry = &source.entries[a.entry];
            let mut reader = source.reader()?;
            let (header, bytes) = read_npy(source, reader.as_mut(), entry)?;
            let values =
                npy::decode_strings(&header, &bytes[header.payload_offset..]).map_err(|p| {
                    Error::bad_input(
                        source.locate(entry),
                        p,
                        format!("re-export {stem}.npy with numpy"),
                    )
                })?;
            for v in values {
                *tiers.entry(v).or_insert(0) += 1;
            }
        }
    }
    Ok(tiers)
}
