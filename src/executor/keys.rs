//! Stage keys and the decision to run or reuse each stage (the `dvc.lock` model): a stage's
//! key hashes its resolved config, the fingerprints of the entries it reads, the trial axis,
//! the keys of the stages it depends on, and the settings every output carries. Same key,
//! same outputs.

use std::collections::BTreeMap;
use std::path::Path;

use crate::executor::lock::{Lock, LockedEntry, Progress, StageLock};
use crate::pipeline::plan::{Disposition, Plan};
use crate::pipeline::spec::Pipeline;
use crate::source::Source;
use crate::stages::registry::Stage;
use crate::stages::MeasureValues;

#[derive(Debug, Clone)]
pub struct StageKey {
    pub config_hash: String,
    pub inputs_hash: String,
    pub depends_on: BTreeMap<String, String>,
    pub key: String,
}

impl StageKey {
    pub fn lock(
        &self,
        stage: &Stage,
        outputs: BTreeMap<String, String>,
        entries: Vec<LockedEntry>,
        measures: BTreeMap<String, MeasureValues>,
    ) -> StageLock {
        StageLock {
            id: stage.id().to_string(),
            kind: stage.name().to_string(),
            config_hash: self.config_hash.clone(),
            inputs_hash: self.inputs_hash.clone(),
            depends_on: self.depends_on.clone(),
            key: self.key.clone(),
            outputs,
            entries,
            measures,
        }
    }
}

fn hash(parts: &[&str]) -> String {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update(b"\0");
    }
    format!("blake3:{}", h.finalize().to_hex())
}

/// The source's fingerprint and every stage's key.
pub fn stage_keys(
    pipeline: &Pipeline,
    source: &Source,
    plan: &Plan,
    dataset: &str,
) -> (String, Vec<StageKey>) {
    let source_fingerprint = source.fingerprint();
    let trial_ids: Vec<String> = plan.trial_ids.iter().map(u32::to_string).collect();
    let trial_axis = trial_ids.join(",");
    // Settings that every output carries (attributes, Parquet metadata).
    let mut global = format!(
        "tool={}\ndataset={dataset}\nsource={}\npipeline={}",
        crate::VERSION,
        source.name,
        pipeline.pipeline,
    );
    if let Some(rate) = pipeline.frame_rate_hz {
        global.push_str(&format!("\nframe_rate_hz={rate}"));
    }
    let mut keys: Vec<StageKey> = Vec::with_capacity(pipeline.stages.len());
    for (i, stage) in pipeline.stages.iter().enumerate() {
        let config = serde_json::to_string(stage).unwrap_or_default();
        let config_hash = hash(&[&config]);
        let mut inputs = blake3::Hasher::new();
        inputs.update(trial_axis.as_bytes());
        for (entry, d) in source.entries.iter().zip(&plan.dispositions) {
            if *d == Disposition::Stage(i) {
                inputs.update(b"\n");
                inputs.update(entry.path.as_bytes());
                inputs.update(b"\0");
                inputs.update(entry.fingerprint.as_bytes());
            }
        }
        let inputs_hash = format!("blake3:{}", inputs.finalize().to_hex());
        let mut depends_on = BTreeMap::new();
        for (upstream, _) in stage.reads() {
            if let Some(pos) = pipeline.stages.iter().position(|s| s.id() == upstream) {
                depends_on.insert(upstream, keys[pos].key.clone());
            }
        }
        let deps: Vec<String> = depends_on.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let key = hash(&[&global, &config_hash, &inputs_hash, &deps.join(",")]);
        keys.push(StageKey {
            config_hash,
            inputs_hash,
            depends_on,
            key,
        });
    }
    (source_fingerprint, keys)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The dataset already in the store.
    Existing,
    /// The staging folder of an interrupted run.
    Partial,
    /// The tasks of a sharded run (`finalize`), checked against their receipts.
    Shards,
}

#[derive(Debug, Clone)]
pub enum Decision {
    Reuse { origin: Origin, lock: StageLock },
    Run { reason: String },
}

impl Decision {
    pub fn reason(&self) -> String {
        match self {
            Decision::Reuse {
                origin: Origin::Existing,
                ..
            } => "up to date".into(),
            Decision::Reuse {
                origin: Origin::Partial,
                ..
            } => "finished by an interrupted run; its output is kept".into(),
            Decision::Reuse {
                origin: Origin::Shards,
                ..
            } => "converted by the tasks of a sharded run".into(),
            Decision::Run { reason } => reason.clone(),
        }
    }
}

fn outputs_exist(dir: &Path, lock: &StageLock) -> bool {
    lock.outputs.keys().all(|f| dir.join(f).is_file())
}

pub fn decide(
    pipeline: &Pipeline,
    keys: &[StageKey],
    existing: Option<&Lock>,
    progress: Option<&Progress>,
    staging_dir: &Path,
    dataset_dir: &Path,
    force: bool,
) -> Vec<Decision> {
    let mut decisions: Vec<Decision> = Vec::with_capacity(keys.len());
    for (stage, key) in pipeline.stages.iter().zip(keys) {
        let id = stage.id();
        if force {
            decisions.push(Decision::Run {
                reason: "--force".into(),
            });
            continue;
        }
        let partial = progress
            .and_then(|p| p.stages.iter().find(|s| s.id == id && s.key == key.key))
            .filter(|l| outputs_exist(staging_dir, l));
        if let Some(lock) = partial {
            decisions.push(Decision::Reuse {
                origin: Origin::Partial,
                lock: lock.clone(),
            });
            continue;
        }
        let previous = existing.and_then(|l| l.stages.iter().find(|s| s.id == id));
        let reason = match previous {
            None if existing.is_none() => "no earlier run".to_string(),
            None => "new stage".to_string(),
            Some(p) if p.key == key.key => {
                if outputs_exist(dataset_dir, p) {
                    decisions.push(Decision::Reuse {
                        origin: Origin::Existing,
                        lock: p.clone(),
                    });
                    continue;
                }
                "its outputs are missing from the dataset".to_string()
            }
            Some(p) if p.config_hash != key.config_hash => "its settings changed".to_string(),
            Some(p) if p.inputs_hash != key.inputs_hash => "its source files changed".to_string(),
            Some(p) if p.depends_on != key.depends_on => {
                let changed: Vec<&str> = key
                    .depends_on
                    .iter()
                    .filter(|(k, v)| p.depends_on.get(*k) != Some(v))
                    .map(|(k, _)| k.as_str())
                    .collect();
                format!("it reads stage {} which changed", changed.join(", "))
            }
            Some(_) => {
                "the tool version or the pipeline's name, frame rate or dataset name changed"
                    .to_string()
            }
        };
        decisions.push(Decision::Run { reason });
    }
    decisions
}
