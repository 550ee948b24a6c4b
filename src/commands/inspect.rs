//! `inspect`: what a user needs to know about a source before converting it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::Result;
use crate::pipeline::embedded::PipelineChoice;
use crate::pipeline::plan::{plan, Disposition};
use crate::pipeline::spec::Pipeline;
use crate::source::{Source, SourceKind};
pub use crate::stages::kind::Variable;
use crate::stages::meta_table::tier_counts;

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub name: String,
    /// The pipeline the source was inspected with (which `auto` picked, or the file given).
    pub pipeline: String,
    pub pipeline_file: String,
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
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// `inspect` as the command runs it: with the pipeline chosen for this source (or picked by
/// `auto`), named in the report.
pub fn inspect_with(source: &Source, choice: &PipelineChoice) -> Result<Inspection> {
    let (text, file) = choice.resolve(source)?;
    let pipeline = Pipeline::parse(&text, &file)?;
    let mut report = inspect(source, &pipeline)?;
    report.pipeline_file = file;
    Ok(report)
}

pub fn inspect(source: &Source, pipeline: &Pipeline) -> Result<Inspection> {
    let plan = plan(pipeline, source)?;
    let mut variables = Vec::new();
    let mut valid = BTreeMap::new();
    let mut meta_files = Vec::new();
    let mut statistics = Vec::new();
    let mut warnings = Vec::new();
    for stage_plan in &plan.stages {
        let d = stage_plan.describe(source)?;
        variables.extend(d.variable);
        valid.extend(d.valid_frames);
        meta_files.extend(d.meta_files);
        statistics.extend(d.statistics);
    }
    let dtype = plan
        .stages
        .iter()
        .find_map(|p| p.trial_dtype())
        .map(|d| d.to_string());
    let tiers = tier_counts(source, &plan)?;
    let skipped = skipped_entries(source, &plan.dispositions);
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
        pipeline: pipeline.pipeline.clone(),
        pipeline_file: String::new(),
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

/// The entries the pipeline's rules skip, each with the rule's reason.
fn skipped_entries(source: &Source, dispositions: &[Disposition]) -> Vec<Skipped> {
    source
        .entries
        .iter()
        .zip(dispositions)
        .filter_map(|(e, d)| match d {
            Disposition::Skipped(reason) => Some(Skipped {
                path: e.path.clone(),
                reason: reason.clone(),
            }),
            _ => None,
        })
        .collect()
}

impl Inspection {
    /// A readable report for a terminal: the summary, then one section per list.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        self.write_summary(&mut s);
        self.write_lists(&mut s);
        s
    }

    fn write_summary(&self, s: &mut String) {
        use std::fmt::Write;
        let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        let _ = writeln!(s, "dataset    {}", self.name);
        let _ = writeln!(s, "pipeline   {} ({})", self.pipeline, self.pipeline_file);
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
        let frames = match self.n_frames {
            Some(n) => n.to_string(),
            None => "none (no frame axis)".to_string(),
        };
        let _ = writeln!(s, "frames     {frames}");
        let _ = writeln!(s, "dtype      {}", self.dtype.as_deref().unwrap_or("?"));
    }

    fn write_lists(&self, s: &mut String) {
        use std::fmt::Write;
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
    }
}
