//! Runs a pipeline over one source: plan, stages, read-back validation, manifest, then an
//! atomic rename into the store. Until that rename, everything lives in a hidden staging
//! folder (`STORE/.<name>.partial`), so a dataset never looks complete when it is not.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use arrow::datatypes::DataType;

use super::plan::{plan, Disposition, Plan, StagePlan};
use super::spec::{MetaAxis, Pipeline, Stage};
use crate::error::{Error, Result};
use crate::manifest::{self, Counts, EntryInfo, Manifest, PipelineInfo, SourceInfo, Tool};
use crate::source::Source;
use crate::stages::{self, EntryRecord, MeasureValues, StageContext, StageResult};
use crate::validate::{self, contract, ExpectedArray};
use crate::writers::parquet::arrow_type;
use crate::writers::zarr::ZarrStore;
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
    /// Worker threads; `None` uses every core.
    pub threads: Option<usize>,
}

#[derive(Debug, serde::Serialize)]
pub struct StageReport {
    pub id: String,
    pub kind: String,
    pub entries: usize,
    pub bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ConvertReport {
    pub dataset: String,
    pub dataset_dir: PathBuf,
    pub trials: usize,
    pub dimensions: BTreeMap<String, u64>,
    pub source_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
    pub threads: usize,
    pub stages: Vec<StageReport>,
}

/// Removes the staging folder unless the conversion completed.
struct Staging {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn convert(opts: &ConvertOptions) -> Result<ConvertReport> {
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let pipeline = Pipeline::parse(&opts.pipeline_text, &opts.pipeline_file)?;
    let source = Source::open(&opts.source)?;
    let name = opts.name.clone().unwrap_or_else(|| source.dataset_name());
    check_dataset_name(&name)?;
    let dataset_dir = opts.store.join(&name);
    if dataset_dir.exists() && !opts.force {
        return Err(Error::Exists { path: dataset_dir });
    }
    let threads = opts
        .threads
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Internal(format!("cannot start {threads} threads: {e}")))?;

    let plan = plan(&pipeline, &source)?;
    tracing::info!(dataset = %name, trials = plan.n_trials(), "plan checked");

    std::fs::create_dir_all(&opts.store)
        .map_err(|e| Error::io(&opts.store, "cannot create the store folder", e))?;
    let mut staging = Staging {
        dir: opts.store.join(format!(".{name}.partial")),
        keep: false,
    };
    if staging.dir.exists() {
        // Left by a run that was killed: nothing in it is trusted.
        std::fs::remove_dir_all(&staging.dir)
            .map_err(|e| Error::io(&staging.dir, "cannot remove a stale staging folder", e))?;
    }
    std::fs::create_dir_all(&staging.dir)
        .map_err(|e| Error::io(&staging.dir, "cannot create the staging folder", e))?;

    let provenance = Provenance {
        tool_version: crate::VERSION.to_string(),
        dataset: name.clone(),
        source: source.name.clone(),
        pipeline: pipeline.pipeline.clone(),
        pipeline_hash: Pipeline::hash(&opts.pipeline_text),
    };
    let mut measures: BTreeMap<(String, super::spec::Measure), MeasureValues> = BTreeMap::new();
    let mut records: Vec<(usize, EntryRecord)> = Vec::new();
    let mut reports = Vec::new();
    for (index, (stage, stage_plan)) in pipeline.stages.iter().zip(&plan.stages).enumerate() {
        let t0 = Instant::now();
        let ctx = StageContext {
            source: &source,
            pipeline: &pipeline,
            plan: &plan,
            dataset_dir: &staging.dir,
            provenance: &provenance,
            measures: &measures,
            pipeline_file: &opts.pipeline_file,
        };
        tracing::info!(stage = stage.id(), kind = stage.name(), "stage started");
        let result: StageResult = pool.install(|| match stage_plan {
            StagePlan::TrialArray(p) => stages::trial_array::run(&ctx, p),
            StagePlan::TrialTable(p) => stages::trial_table::run(&ctx, p),
            StagePlan::Statistics(p) => stages::statistics::run(&ctx, p),
            StagePlan::MetaTable(p) => stages::meta_table::run(&ctx, p),
        })?;
        // Validation between stages: what this stage wrote, read back from disk.
        check_stage_output(&staging.dir, &plan, stage, stage_plan)?;
        let seconds = t0.elapsed().as_secs_f64();
        tracing::info!(
            stage = stage.id(),
            entries = result.entries.len(),
            bytes = result.bytes,
            seconds,
            "stage finished"
        );
        reports.push(StageReport {
            id: stage.id().to_string(),
            kind: stage.name().to_string(),
            entries: result.entries.len(),
            bytes: result.bytes,
            seconds,
        });
        for (m, values) in result.measures {
            measures.insert((stage.id().to_string(), m), values);
        }
        records.extend(result.entries.into_iter().map(|r| (index, r)));
    }

    write_groups(&staging.dir, &pipeline, &provenance)?;
    if let Some(name) = &pipeline.contract {
        let c = contract::load(name)
            .ok_or_else(|| Error::Internal(format!("contract {name} vanished")))?;
        contract::check(&c, &staging.dir, &plan.dims)?;
    }

    let entries = entry_infos(&source, &pipeline, &plan, records)?;
    let outputs = validate::hash_outputs(&staging.dir, &[manifest::FILE_NAME, RUN_RECORD])?;
    let output_bytes = outputs.iter().map(|o| o.bytes).sum();
    let manifest = Manifest {
        format: manifest::FORMAT.to_string(),
        tool: Tool {
            name: "sensorium-ingest".into(),
            version: crate::VERSION.into(),
        },
        dataset: name.clone(),
        source: SourceInfo {
            name: source.name.clone(),
            checksum: manifest::source_checksum(&entries),
            entries: entries.len(),
            bytes: source.total_size(),
        },
        pipeline: PipelineInfo {
            name: pipeline.pipeline.clone(),
            hash: provenance.pipeline_hash.clone(),
            text: opts.pipeline_text.clone(),
        },
        counts: Counts {
            trials: plan.n_trials(),
            neurons: plan.dims.get("neuron").copied(),
            frames: plan.dims.get("frame").copied(),
        },
        dimensions: plan.dims.clone(),
        entries,
        outputs,
    };
    let report = ConvertReport {
        dataset: name.clone(),
        dataset_dir: dataset_dir.clone(),
        trials: plan.n_trials(),
        dimensions: plan.dims.clone(),
        source_bytes: std::fs::metadata(&opts.source)
            .map(|m| {
                if m.is_file() {
                    m.len()
                } else {
                    source.total_size()
                }
            })
            .unwrap_or(0),
        output_bytes,
        seconds: started.elapsed().as_secs_f64(),
        threads,
        stages: reports,
    };
    let run_record = serde_json::json!({
        "tool_version": crate::VERSION,
        "started_unix": started_unix,
        "seconds": report.seconds,
        "host": hostname(),
        "source_path": std::fs::canonicalize(&opts.source).unwrap_or_else(|_| opts.source.clone()),
        "source_kind": source.kind,
        "pipeline_file": opts.pipeline_file,
        "threads": threads,
        "stages": report.stages,
    });
    write_json(&staging.dir.join(RUN_RECORD), &run_record)?;
    // The manifest is written last: its presence is what marks the dataset complete.
    write_json(&staging.dir.join(manifest::FILE_NAME), &manifest)?;

    publish(&staging.dir, &dataset_dir, &name)?;
    staging.keep = true;
    Ok(report)
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

/// Moves the finished staging folder into place. With `--force`, the old dataset is renamed
/// aside first and removed only after the new one is in place.
fn publish(staging: &Path, dataset_dir: &Path, name: &str) -> Result<()> {
    let parent = dataset_dir.parent().unwrap_or(Path::new("."));
    let old = parent.join(format!(".{name}.replaced"));
    let had_old = dataset_dir.exists();
    if had_old {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, "cannot remove", e))?;
        }
        std::fs::rename(dataset_dir, &old)
            .map_err(|e| Error::io(dataset_dir, "cannot move the old dataset aside", e))?;
    }
    std::fs::rename(staging, dataset_dir)
        .map_err(|e| Error::io(dataset_dir, "cannot move the new dataset into place", e))?;
    if had_old {
        std::fs::remove_dir_all(&old)
            .map_err(|e| Error::io(&old, "cannot remove the replaced dataset", e))?;
    }
    Ok(())
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| Error::Internal(e.to_string()))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, "cannot write", e))
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// Every Zarr group on the way to an array gets its `zarr.json` (Zarr v3 has no implicit groups).
fn write_groups(dir: &Path, pipeline: &Pipeline, provenance: &Provenance) -> Result<()> {
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for stage in &pipeline.stages {
        let output = stage.output();
        let Some(pos) = output.find(".zarr") else {
            continue;
        };
        let store = output[..pos + 5].to_string();
        let inner = output[pos + 5..].trim_start_matches('/');
        let set = groups.entry(store).or_default();
        set.insert("/".into());
        let parts: Vec<&str> = inner.split('/').filter(|p| !p.is_empty()).collect();
        let group_depth = match stage {
            Stage::Statistics(_) => parts.len(),
            _ => parts.len().saturating_sub(1),
        };
        for depth in 1..=group_depth {
            set.insert(format!("/{}", parts[..depth].join("/")));
        }
        if let Stage::Statistics(_) = stage {
            // Every folder of statistics arrays (var, var/subset) is a group too.
            let base = dir.join(output);
            add_statistics_groups(&base, &format!("/{}", parts.join("/")), set)?;
        }
    }
    for (store_dir, paths) in groups {
        let store = ZarrStore::open(&dir.join(&store_dir))?;
        for path in paths {
            let mut attributes = serde_json::Map::new();
            if path == "/" {
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
                attributes.insert("frame_rate_hz".into(), pipeline.frame_rate_hz.into());
            }
            store.write_group(&path, attributes)?;
        }
    }
    Ok(())
}

fn add_statistics_groups(base: &Path, prefix: &str, out: &mut BTreeSet<String>) -> Result<()> {
    let Ok(listing) = std::fs::read_dir(base) else {
        return Ok(());
    };
    for item in listing {
        let path = item.map_err(|e| Error::io(base, "cannot list", e))?.path();
        if path.is_dir() && !path.join("zarr.json").exists() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let group = format!("{prefix}/{name}");
            out.insert(group.clone());
            add_statistics_groups(&path, &group, out)?;
        }
    }
    Ok(())
}

/// Reads back what a stage wrote and compares it with the plan.
fn check_stage_output(
    dir: &Path,
    plan: &Plan,
    stage: &Stage,
    stage_plan: &StagePlan,
) -> Result<()> {
    match (stage, stage_plan) {
        (Stage::TrialArray(c), StagePlan::TrialArray(p)) => {
            let mut shape = vec![p.trials.len() as u64];
            shape.extend(&p.trial_shape);
            let data_type = zarr_type_name(p.dtype);
            validate::check_zarr_array(&ExpectedArray {
                path: &dir.join(&c.output),
                shape: &shape,
                data_type: &data_type,
                dimension_names: &c.dimension_names,
            })?;
        }
        (Stage::Statistics(c), StagePlan::Statistics(p)) => {
            for (name, a) in &p.arrays {
                let rank = a.header.shape.len();
                let var = name.split('/').next().unwrap_or_default();
                let names = match c.dimension_names.get(var) {
                    Some(n) if n.len() == rank => n.clone(),
                    _ => (0..rank).map(|i| format!("dim_{i}")).collect(),
                };
                let data_type = zarr_type_name(a.header.dtype);
                validate::check_zarr_array(&ExpectedArray {
                    path: &dir.join(&c.output).join(name),
                    shape: &a.header.shape,
                    data_type: &data_type,
                    dimension_names: &names,
                })?;
            }
        }
        (Stage::TrialTable(c), StagePlan::TrialTable(p)) => {
            let value = arrow_type(p.dtype).unwrap_or(DataType::Null);
            let mut columns = vec![
                (c.trial_column.clone(), DataType::Int32),
                (c.frame_column.clone(), DataType::Int32),
            ];
            columns.extend(c.columns.iter().map(|n| (n.clone(), value.clone())));
            validate::check_parquet(
                &dir.join(&c.output),
                &columns,
                p.trials.len() as u64 * p.trial_shape[1],
            )?;
        }
        (Stage::MetaTable(c), StagePlan::MetaTable(p)) => {
            let (columns, rows) = validate::read_parquet_schema(&dir.join(&c.output))?;
            let want_rows = if c.axis == MetaAxis::Trial {
                plan.n_trials() as u64
            } else {
                p.rows
            };
            let want_columns = 1
                + c.trial_id_column.iter().count()
                + p.files
                    .iter()
                    .map(|(s, _)| c.split.get(s).map_or(1, |v| v.len()))
                    .sum::<usize>()
                + c.derived.len();
            if rows != want_rows || columns.len() != want_columns {
                return Err(Error::Internal(format!(
                    "{}: {rows} rows and {} columns, expected {want_rows} and {want_columns}",
                    c.output,
                    columns.len()
                )));
            }
        }
        _ => return Err(Error::Internal("stage and plan disagree".into())),
    }
    Ok(())
}

fn zarr_type_name(dtype: crate::npy::Dtype) -> String {
    use crate::npy::Kind;
    match dtype.kind {
        Kind::Float => format!("float{}", dtype.size * 8),
        Kind::Int => format!("int{}", dtype.size * 8),
        Kind::UInt => format!("uint{}", dtype.size * 8),
        Kind::Bool => "bool".into(),
        _ => "unsupported".into(),
    }
}

/// One manifest line per source entry. Skipped entries are hashed here so the source checksum
/// covers every byte; an entry that a stage claimed but did not report is a bug, caught here.
fn entry_infos(
    source: &Source,
    pipeline: &Pipeline,
    plan: &Plan,
    records: Vec<(usize, EntryRecord)>,
) -> Result<Vec<EntryInfo>> {
    let mut by_entry: BTreeMap<usize, (usize, EntryRecord)> = BTreeMap::new();
    for (stage, r) in records {
        by_entry.insert(r.entry, (stage, r));
    }
    let headers: BTreeMap<usize, &crate::npy::Header> = plan
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
    let mut reader = source.reader()?;
    let mut out = Vec::with_capacity(source.entries.len());
    for (index, (entry, disposition)) in source.entries.iter().zip(&plan.dispositions).enumerate() {
        let header = headers.get(&index);
        let info = match disposition {
            Disposition::Stage(s) => {
                let (stage, record) = by_entry.remove(&index).ok_or_else(|| {
                    Error::Internal(format!(
                        "{} was claimed by stage {} but never read",
                        entry.path,
                        pipeline.stages[*s].id()
                    ))
                })?;
                EntryInfo {
                    path: entry.path.clone(),
                    status: "converted".into(),
                    stage: Some(pipeline.stages[stage].id().to_string()),
                    output: Some(record.output),
                    reason: None,
                    dtype: header.map(|h| h.dtype.to_string()),
                    shape: header.map(|h| h.shape.clone()),
                    bytes: entry.size,
                    blake3: record.blake3,
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
                }
            }
        };
        out.push(info);
    }
    Ok(out)
}
