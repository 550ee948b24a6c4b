//! `ingest`: converts every mouse in an inbox folder that the store does not have yet, for a
//! timer (cron, systemd) to run again and again. Sources are recognised by their container
//! fingerprint (entry names, sizes and CRC-32s), not by file name; files still being written
//! are left for the next run; one source failing does not stop the others.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::convert::convert;
use crate::error::{Error, Result};
use crate::executor::catalog;
use crate::executor::name_lock::{self, Holder, NameLock, Waiting};
use crate::executor::ConvertOptions;
use crate::pipeline::embedded::PipelineChoice;
use crate::progress::ProgressMode;
use crate::source::Source;

pub const LOCK_FILE: &str = ".ingest.lock";

pub struct IngestOptions {
    pub inbox: PathBuf,
    /// The store folder; for a bucket store, the local work folder.
    pub store: PathBuf,
    /// The bucket URL datasets are committed to; `None` for a local store.
    pub bucket: Option<String>,
    /// `Auto` picks the pipeline for each source by its content.
    pub pipeline: PipelineChoice,
    pub threads: Option<usize>,
    pub max_memory: Option<u64>,
    /// Write large Zarr objects with direct I/O where the file system takes it
    /// (`writers::output_store`); `false`: through the page cache.
    pub direct_io: bool,
    /// A source modified more recently than this is taken to be still arriving.
    pub min_age: Duration,
    /// Time between the two looks at each source; a source that changed between them is skipped.
    pub settle: Duration,
    /// Start each conversion even when the store's file system seems to lack its space.
    pub no_space_check: bool,
    pub progress: ProgressMode,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct IngestReport {
    pub added: Vec<(PathBuf, String)>,
    pub skipped: Vec<(PathBuf, String)>,
    pub failed: Vec<(PathBuf, String)>,
    /// Why the ingest stopped before trying every source (the store's disk is full): the
    /// command exits with this error once the report is printed.
    #[serde(skip)]
    pub stopped: Option<Error>,
}

/// The store's ingest lock: one ingest at a time, by the rules of every lock in a store
/// (`executor::name_lock`; a lock of an ingest that died is taken over).
fn lock_store(store: &Path) -> Result<NameLock> {
    std::fs::create_dir_all(store)
        .map_err(|e| Error::io(store, "cannot create the store folder", e))?;
    NameLock::acquire(name_lock::Request {
        path: &store.join(LOCK_FILE),
        holder: Holder::this_process("ingest", None),
        refusal: "another ingest is running",
        waiting: Waiting::No,
        take_over_run: None,
    })
}

/// Names of downloads in progress, by the usual browsers and tools.
fn is_partial_download(name: &str) -> bool {
    [
        ".part",
        ".partial",
        ".crdownload",
        ".download",
        ".tmp",
        ".filepart",
        ".aria2",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// (total size, newest modification) of a file, or of every file below a folder.
fn footprint(path: &Path) -> std::io::Result<(u64, SystemTime)> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Ok((meta.len(), meta.modified()?));
    }
    let mut total = (0u64, meta.modified()?);
    for item in std::fs::read_dir(path)? {
        let (size, modified) = footprint(&item?.path())?;
        total = (total.0 + size, total.1.max(modified));
    }
    Ok(total)
}

pub fn ingest(opts: &IngestOptions) -> Result<IngestReport> {
    std::fs::create_dir_all(&opts.store)
        .map_err(|e| Error::io(&opts.store, "cannot create the store folder", e))?;
    let _lock = lock_store(&opts.store)?;
    let mut report = IngestReport::default();
    let settled = settled_sources(opts, &mut report)?;
    convert_new_sources(opts, settled, &mut report)?;
    Ok(report)
}

/// A source seen in the inbox, with its size and newest modification at the first look.
struct FirstLook {
    path: PathBuf,
    size: u64,
    modified: SystemTime,
}

/// The sources in the inbox that are complete, as far as can be told: not modified for
/// `min_age`, and the same size and newest modification at two looks `settle` apart.
/// Everything else is recorded in the report.
fn settled_sources(opts: &IngestOptions, report: &mut IngestReport) -> Result<Vec<PathBuf>> {
    let listing = std::fs::read_dir(&opts.inbox)
        .map_err(|e| Error::io(&opts.inbox, "cannot list the inbox", e))?;
    let mut paths: Vec<PathBuf> = listing.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let first_looks: Vec<FirstLook> = paths
        .into_iter()
        .filter_map(|path| first_look(path, opts.min_age, report))
        .collect();
    std::thread::sleep(opts.settle);
    let mut stable = Vec::new();
    for FirstLook {
        path,
        size,
        modified,
    } in first_looks
    {
        match footprint(&path) {
            Ok(now) if now == (size, modified) => stable.push(path),
            Ok(_) => report.skipped.push((
                path,
                "changed while the inbox was scanned: still arriving".into(),
            )),
            Err(e) => report.failed.push((path, format!("cannot read: {e}"))),
        }
    }
    Ok(stable)
}

/// `path` if it looks like a source that has finished arriving; otherwise why not goes into the
/// report (hidden files are passed over without a word).
fn first_look(path: PathBuf, min_age: Duration, report: &mut IngestReport) -> Option<FirstLook> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with('.') {
        return None;
    }
    if is_partial_download(&name) {
        report
            .skipped
            .push((path, "a download in progress (by its name)".into()));
        return None;
    }
    if !(path.is_dir() || name.ends_with(".zip")) {
        report
            .skipped
            .push((path, "neither a .zip archive nor a folder".into()));
        return None;
    }
    let (size, modified) = match footprint(&path) {
        Ok(found) => found,
        Err(e) => {
            report.failed.push((path, format!("cannot read: {e}")));
            return None;
        }
    };
    let age = SystemTime::now()
        .duration_since(modified)
        .unwrap_or_default();
    if age < min_age {
        let why = format!(
            "modified {:.0} s ago: still arriving? (--min-age {} s)",
            age.as_secs_f64(),
            min_age.as_secs()
        );
        report.skipped.push((path, why));
        return None;
    }
    Some(FirstLook {
        path,
        size,
        modified,
    })
}

/// Converts each source whose fingerprint the store does not hold yet. A failure is recorded
/// and the next source tried; an interrupt stops the run, and so does a full disk (every
/// following source would fail the same way): the sources not tried are reported as skipped.
fn convert_new_sources(
    opts: &IngestOptions,
    sources: Vec<PathBuf>,
    report: &mut IngestReport,
) -> Result<()> {
    let mut known = match &opts.bucket {
        None => catalog::fingerprints(&opts.store),
        Some(url) => bucket_fingerprints(url, &opts.store)?,
    };
    let mut sources = sources.into_iter();
    while let Some(path) = sources.next() {
        let (fingerprint, pipeline) = match Source::open(&path)
            .and_then(|source| Ok((source.fingerprint(), opts.pipeline.resolve(&source)?)))
        {
            Ok(found) => found,
            Err(e) => {
                report.failed.push((path, first_line(&e)));
                continue;
            }
        };
        if let Some((dataset, _)) = known.iter().find(|(_, f)| *f == fingerprint) {
            report
                .skipped
                .push((path, format!("already in the store as {dataset}")));
            continue;
        }
        match convert(&convert_options(opts, &path, pipeline)) {
            Ok(r) if r.up_to_date => report
                .skipped
                .push((path, format!("already in the store as {}", r.dataset))),
            Ok(r) => {
                // A second copy of this source later in the same inbox is then skipped too.
                known.push((r.dataset.clone(), fingerprint));
                report.added.push((path, r.dataset));
            }
            Err(Error::Interrupted) => return Err(Error::Interrupted),
            // Another writer has this dataset now: the next ingest looks again.
            Err(e @ Error::Busy { .. }) => report
                .skipped
                .push((path, format!("busy: {}", first_line(&e)))),
            // A source the space check refuses is one failure (a smaller one may still fit); a
            // write that finds the disk full ends the ingest.
            Err(e) if e.is_disk_full() => {
                report.failed.push((path, first_line(&e)));
                let why = "not tried: the store's disk is full";
                report
                    .skipped
                    .extend(sources.by_ref().map(|p| (p, why.into())));
                report.stopped = Some(e);
            }
            Err(e) => report.failed.push((path, first_line(&e))),
        }
    }
    Ok(())
}

/// The executor's options for one source: the dataset named after it, never forced (a source
/// already converted is skipped, not redone).
fn convert_options(
    opts: &IngestOptions,
    source: &Path,
    (pipeline_text, pipeline_file): (String, String),
) -> ConvertOptions {
    ConvertOptions {
        source: source.to_path_buf(),
        store: opts.store.clone(),
        bucket: opts.bucket.clone(),
        name: None,
        pipeline_text,
        pipeline_file,
        force: false,
        threads: opts.threads,
        max_memory: opts.max_memory,
        direct_io: opts.direct_io,
        progress: opts.progress,
        wait: Waiting::No,
        writer: "ingest",
        no_space_check: opts.no_space_check,
    }
}

/// The bucket's catalog fragments, copied into the work folder and read there.
fn bucket_fingerprints(url: &str, work: &Path) -> Result<Vec<(String, String)>> {
    let bucket = crate::writers::bucket::Bucket::open(url)?;
    let copy = work.join(".bucket-catalog");
    crate::executor::remote::remove_local(&copy)?;
    let keys: Vec<String> = bucket
        .list(catalog::FOLDER)?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.ends_with(".parquet"))
        .collect();
    bucket.download(&keys, &copy)?;
    let known = catalog::fingerprints(&copy);
    let _ = std::fs::remove_dir_all(&copy);
    Ok(known)
}

fn first_line(e: &Error) -> String {
    e.to_string().lines().collect::<Vec<_>>().join(" ")
}
