//! `ingest`: converts every mouse in an inbox folder that the store does not have yet, for a
//! timer (cron, systemd) to run again and again. Sources are recognised by their container
//! fingerprint (entry names, sizes and CRC-32s), not by file name; files still being written
//! are left for the next run; one source failing does not stop the others.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::executor::catalog;
use crate::executor::{convert, ConvertOptions};
use crate::pipeline::embedded::PipelineChoice;
use crate::progress::ProgressMode;
use crate::source::Source;

pub const LOCK_FILE: &str = ".ingest.lock";

pub struct IngestOptions {
    pub inbox: PathBuf,
    pub store: PathBuf,
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
    pub progress: ProgressMode,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct IngestReport {
    pub added: Vec<(PathBuf, String)>,
    pub skipped: Vec<(PathBuf, String)>,
    pub failed: Vec<(PathBuf, String)>,
}

/// Held while an ingest runs: a file created exclusively (`O_EXCL` works on NFS v3+), removed
/// on drop. A lock left by a dead process on this host is taken over (Linux: `process_gone`).
struct IngestLock {
    path: PathBuf,
}

impl IngestLock {
    fn acquire(store: &Path) -> Result<IngestLock> {
        let path = store.join(LOCK_FILE);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    use std::io::Write;
                    let since = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let _ = writeln!(file, "{} {} {since}", std::process::id(), host());
                    return Ok(IngestLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let mut parts = holder.split_whitespace();
                    let (pid, holder_host) =
                        (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let dead = holder_host == host() && !pid.is_empty() && process_gone(pid);
                    if dead {
                        tracing::warn!(lock = %path.display(), pid, "removing the lock of an ingest that died");
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    return Err(Error::Busy {
                        path: path.clone(),
                        holder: format!("process {pid} on {holder_host}"),
                    });
                }
                Err(e) => return Err(Error::io(&path, "cannot create the ingest lock", e)),
            }
        }
        Err(Error::Busy {
            path,
            holder: "another process".into(),
        })
    }
}

impl Drop for IngestLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether no process `pid` runs on this host, from `/proc` (Linux). Elsewhere it cannot be
/// told reliably (no `/proc`, and no `/etc/hostname` to tell hosts apart), so a lock is never
/// taken over there: the user removes a stale one by hand, as `Error::Busy`'s hint says.
#[cfg(target_os = "linux")]
fn process_gone(pid: &str) -> bool {
    !Path::new("/proc").join(pid).exists()
}

#[cfg(not(target_os = "linux"))]
fn process_gone(_pid: &str) -> bool {
    false
}

fn host() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
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
    let _lock = IngestLock::acquire(&opts.store)?;
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
/// and the next source tried; only an interrupt stops the run.
fn convert_new_sources(
    opts: &IngestOptions,
    sources: Vec<PathBuf>,
    report: &mut IngestReport,
) -> Result<()> {
    let mut known = catalog::fingerprints(&opts.store);
    for path in sources {
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
        name: None,
        pipeline_text,
        pipeline_file,
        force: false,
        threads: opts.threads,
        max_memory: opts.max_memory,
        direct_io: opts.direct_io,
        progress: opts.progress,
    }
}

fn first_line(e: &Error) -> String {
    e.to_string().lines().collect::<Vec<_>>().join(" ")
}
