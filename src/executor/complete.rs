//! The end of a whole run: the Zarr groups, the output contract, the check that the staging
//! folder holds exactly the files the stages recorded, the manifest (every source entry, every
//! output, their checksums), the lock and the run record, then publish and the catalog row.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use super::catalog::{self, CatalogRow};
use super::lock::{self, write_synced, Lock, LockSource, LockedEntry, StageLock};
use super::manifest::{
    self, Counts, EntryInfo, Manifest, OutputInfo, PipelineInfo, SourceInfo, Tool,
};
use super::memory::ThreadChoice;
use super::name_lock::NameLock;
use super::staging::{is_bookkeeping, publish};
use super::{peak_memory_bytes, to_json_text, ConvertOptions, ConvertReport, Prepared, RUN_RECORD};
use crate::error::{Error, Result};
use crate::pipeline::plan::Disposition;
use crate::pipeline::spec::Pipeline;
use crate::stages::meta_table::tier_counts;
use crate::validate::{self, contract};
use crate::writers::output_store::WriteLog;
use crate::writers::zarr::{ZarrPath, ZarrStore};
use crate::writers::Provenance;

/// What the stages left for the end: their locks, the groups around their arrays, how files
/// were written.
pub(crate) struct Finished<'a> {
    pub(crate) stages: Vec<StageLock>,
    pub(crate) groups: &'a BTreeSet<ZarrPath>,
    pub(crate) provenance: &'a Provenance,
    pub(crate) writes: &'a WriteLog,
    pub(crate) choice: &'a ThreadChoice,
    pub(crate) started: Instant,
    pub(crate) started_unix: u64,
    /// The dataset's name: checked still held right before publishing.
    pub(crate) name_lock: &'a NameLock,
}

/// Finishes the dataset in the staging folder and publishes it.
pub(crate) fn complete(
    opts: &ConvertOptions,
    prep: &Prepared,
    finished: &Finished,
    report: &mut ConvertReport,
) -> Result<()> {
    let staging = &prep.staging_dir;
    write_groups(staging, prep.pipeline, finished.provenance, finished.groups)?;
    if let Some(name) = &prep.pipeline.contract {
        let c = contract::load(name)
            .ok_or_else(|| Error::Internal(format!("contract {name} vanished")))?;
        contract::check(&c, staging, &prep.plan.dims)?;
    }
    let outputs = collect_outputs(staging, &finished.stages, finished.groups)?;
    report.output_bytes = outputs.iter().map(|o| o.bytes).sum();
    let manifest = build_manifest(opts, prep, &finished.stages, outputs)?;
    let manifest_text = to_json_text(&manifest)?;
    let lock = build_lock(prep, &finished.stages, &manifest_text);
    report.seconds = finished.started.elapsed().as_secs_f64();
    report.peak_memory_bytes = peak_memory_bytes();
    let run_record = run_record(opts, prep, finished, report);
    write_synced(
        &staging.join(RUN_RECORD),
        to_json_text(&run_record)?.as_bytes(),
    )?;
    write_synced(&staging.join(lock::FILE_NAME), lock.to_json()?.as_bytes())?;
    // The manifest is written last: its presence is what marks the dataset complete.
    write_synced(&staging.join(manifest::FILE_NAME), manifest_text.as_bytes())?;
    // The catalog row is written before publishing and put in place after: a full disk or a
    // failure there publishes nothing, and leaves the stages to resume.
    let row = catalog::write_aside(&opts.store, &catalog_row(prep, &manifest.source.checksum)?)?;
    let progress_file = staging.join(lock::PROGRESS_FILE);
    std::fs::remove_file(&progress_file)
        .map_err(|e| Error::io(&progress_file, "cannot remove", e))?;
    finished.name_lock.check_held()?;
    publish(staging, &prep.dataset_dir, &prep.name)?;
    row.put_in_place()
}

/// The catalog row of a dataset already complete and current, when the catalog lacks it or
/// still describes the version it replaced.
pub(crate) fn catalog_existing(opts: &ConvertOptions, prep: &Prepared) -> Result<()> {
    let current = catalog::describes(
        &opts.store,
        &prep.name,
        &prep.source_fingerprint,
        &prep.pipeline_hash,
    );
    if current {
        return Ok(());
    }
    let manifest_path = prep.dataset_dir.join(manifest::FILE_NAME);
    let manifest: Manifest = std::fs::read(&manifest_path)
        .ok()
        .and_then(|t| serde_json::from_slice(&t).ok())
        .ok_or_else(|| {
            Error::bad_input(
                manifest_path.display().to_string(),
                "the dataset's manifest cannot be read, though its lock says it is current",
                "run `sensorium-ingest verify` on it, then convert again with --force",
            )
        })?;
    catalog::write(&opts.store, &catalog_row(prep, &manifest.source.checksum)?)
}

fn write_groups(
    dir: &Path,
    pipeline: &Pipeline,
    provenance: &Provenance,
    groups: &BTreeSet<ZarrPath>,
) -> Result<()> {
    for group in groups {
        let store = ZarrStore::open(&dir.join(&group.store), &WriteLog::new(false))?;
        let attributes = match group.is_root() {
            true => root_attributes(pipeline, provenance),
            false => serde_json::Map::new(),
        };
        store.write_group(&group.node_path(), attributes)?;
    }
    Ok(())
}

/// What a Zarr store's root group records about the dataset.
fn root_attributes(
    pipeline: &Pipeline,
    provenance: &Provenance,
) -> serde_json::Map<String, serde_json::Value> {
    let mut attributes = serde_json::Map::new();
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
    attributes
}

/// Every output file with its size and BLAKE3: the stages' (from their locks) and the group
/// metadata. The staging folder must hold exactly these, besides the tool's own records.
fn collect_outputs(
    staging: &Path,
    stages: &[StageLock],
    groups: &BTreeSet<ZarrPath>,
) -> Result<Vec<OutputInfo>> {
    let mut outputs: BTreeMap<String, String> = BTreeMap::new();
    for s in stages {
        outputs.extend(s.outputs.clone());
    }
    for file in groups.iter().map(ZarrPath::metadata_file) {
        let hash = validate::hash_file(&staging.join(&file))?.1;
        outputs.insert(file, hash);
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
    outputs
        .into_iter()
        .map(|(path, blake3)| {
            let bytes = std::fs::metadata(staging.join(&path))
                .map(|m| m.len())
                .map_err(|e| Error::io(staging.join(&path), "cannot stat", e))?;
            Ok(OutputInfo {
                path,
                bytes,
                blake3,
            })
        })
        .collect()
}

fn build_manifest(
    opts: &ConvertOptions,
    prep: &Prepared,
    stages: &[StageLock],
    outputs: Vec<OutputInfo>,
) -> Result<Manifest> {
    let entries = entry_infos(prep, stages)?;
    Ok(Manifest {
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
            name: prep.pipeline.pipeline.clone(),
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
        outputs,
    })
}

fn build_lock(prep: &Prepared, stages: &[StageLock], manifest_text: &str) -> Lock {
    Lock {
        format: lock::FORMAT.into(),
        tool_version: crate::VERSION.into(),
        dataset: prep.name.clone(),
        source: LockSource {
            name: prep.source.name.clone(),
            fingerprint: prep.source_fingerprint.clone(),
        },
        pipeline_hash: prep.pipeline_hash.clone(),
        stages: stages.to_vec(),
        manifest_blake3: blake3::hash(manifest_text.as_bytes()).to_hex().to_string(),
        checksum: String::new(),
    }
}

/// `run.json`: what differs from one run of the same conversion to the next.
fn run_record(
    opts: &ConvertOptions,
    prep: &Prepared,
    finished: &Finished,
    report: &ConvertReport,
) -> serde_json::Value {
    let (direct_writes, buffered_writes) = finished.writes.counts();
    serde_json::json!({
        "tool_version": crate::VERSION,
        "started_unix": finished.started_unix,
        "seconds": report.seconds,
        "host": super::hostname(),
        "source_path": std::fs::canonicalize(&opts.source).unwrap_or_else(|_| opts.source.clone()),
        "source_kind": prep.source.kind,
        "pipeline_file": opts.pipeline_file,
        "threads": finished.choice.threads,
        "threads_wanted": finished.choice.wanted,
        "memory_limit": finished.choice.limit,
        "memory_estimate_bytes": finished.choice.estimate_bytes,
        "peak_memory_bytes": report.peak_memory_bytes,
        "direct_io": opts.direct_io,
        "direct_io_writes": direct_writes,
        "buffered_zarr_writes": buffered_writes,
        "stages": report.stages,
    })
}

/// The dataset's line in the store's catalog.
pub(crate) fn catalog_row(prep: &Prepared, source_checksum: &str) -> Result<CatalogRow> {
    let dtype = prep
        .plan
        .stages
        .iter()
        .find_map(|s| s.trial_dtype())
        .map(|d| d.little_endian_descr())
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
        pipeline: prep.pipeline.pipeline.clone(),
        pipeline_hash: prep.pipeline_hash.clone(),
        status: "complete".into(),
    })
}

/// One manifest line per source entry. Skipped entries are hashed here so the source checksum
/// covers every byte; an entry that a stage claimed but did not report is a bug, caught here.
fn entry_infos(prep: &Prepared, stages: &[StageLock]) -> Result<Vec<EntryInfo>> {
    let mut by_path: BTreeMap<&str, (&str, &LockedEntry)> = BTreeMap::new();
    for s in stages {
        for e in &s.entries {
            by_path.insert(e.path.as_str(), (s.id.as_str(), e));
        }
    }
    let mut reader = prep.source.reader()?;
    let mut out = Vec::with_capacity(prep.source.entries.len());
    let entries = prep.source.entries.iter().zip(&prep.plan.dispositions);
    for (index, (entry, disposition)) in entries.enumerate() {
        let info = match disposition {
            Disposition::Stage(s) => {
                let (stage, record) = by_path.remove(entry.path.as_str()).ok_or_else(|| {
                    Error::Internal(format!(
                        "{} was claimed by stage {} but never read",
                        entry.path,
                        prep.pipeline.stages[*s].id()
                    ))
                })?;
                let header = prep.plan.headers.get(&index);
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
            Disposition::Skipped(reason) => EntryInfo {
                path: entry.path.clone(),
                status: "skipped".into(),
                stage: None,
                output: None,
                reason: Some(reason.clone()),
                dtype: None,
                shape: None,
                bytes: entry.size,
                blake3: blake3::hash(&reader.read(entry)?).to_hex().to_string(),
                values_blake3: None,
                index: None,
            },
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
