//! The staging folder and the publish protocol. A dataset is built in `STORE/.<name>.partial`;
//! finished stages' files stay there across a killed run (the next run resumes); the folder is
//! renamed into place only when complete, `manifest.json` written last inside it, so a folder
//! without `manifest.json` is never a dataset. A replaced dataset is renamed aside first and
//! removed after; a run interrupted between the two renames is repaired by the next one.

use std::collections::BTreeSet;
use std::path::Path;

use super::keys::{Decision, Origin};
use super::lock::{self, StageLock};
use super::{manifest, Prepared, RUN_RECORD};
use crate::error::{Error, Result};
use crate::validate;

/// A publish interrupted between its two renames leaves the old dataset aside, whole: put it
/// back. Folders left to remove (a replaced dataset an NFS client still kept files of, a
/// finalized run's shards) are removed now if they will go.
pub(crate) fn recover_interrupted_publish(
    store: &Path,
    name: &str,
    dataset_dir: &Path,
) -> Result<()> {
    let aside = store.join(format!(".{name}.replaced"));
    let whole = aside.join(manifest::FILE_NAME).is_file();
    if whole && !dataset_dir.exists() {
        match std::fs::rename(&aside, dataset_dir) {
            // The shard tasks of one run share the name: another one restored it first.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(
                    &aside,
                    "cannot restore the dataset moved aside by an interrupted run",
                    e,
                ))
            }
            _ => {}
        }
    }
    for entry in std::fs::read_dir(store).into_iter().flatten().flatten() {
        let file_name = entry.file_name();
        if is_garbage_of(&file_name.to_string_lossy(), name) || entry.path() == aside {
            remove_folder(&entry.path());
        }
    }
    Ok(())
}

/// Whether `file_name` is one of `discard`'s folders for dataset `name`, exactly: a dataset
/// named `a.removed-x` has folders that begin like those of `a`.
fn is_garbage_of(file_name: &str, name: &str) -> bool {
    let Some(suffix) = file_name
        .strip_prefix('.')
        .and_then(|rest| rest.strip_prefix(name))
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.strip_prefix(GARBAGE))
    else {
        return false;
    };
    let parts: Vec<&str> = suffix.split('-').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// How the folders that only wait to be removed begin, after `.<name>.`.
const GARBAGE: &str = "removed-";

/// Moves `dir` (in the store, for dataset `name`) out of the way in one rename, then removes
/// it: nothing can find or write its files any more once this returns, even if removing them
/// fails (they are removed by a later run of the name).
pub(crate) fn discard(store: &Path, name: &str, dir: &Path, failed: &'static str) -> Result<()> {
    let gone = store.join(format!(".{name}.{GARBAGE}{}", unique_suffix()));
    std::fs::rename(dir, &gone).map_err(|e| Error::io(dir, failed, e))?;
    remove_folder(&gone);
    Ok(())
}

/// Removes a folder that is not a dataset any more: its manifest first, so a folder half
/// removed is never taken for a dataset. A failure is only logged (see `discard`).
fn remove_folder(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(manifest::FILE_NAME));
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(folder = %dir.display(), error = %e, "cannot remove this folder yet; a later run of the name will");
        }
    }
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// Files the runner keeps for itself, not outputs.
pub(crate) fn is_bookkeeping(path: &str) -> bool {
    [
        manifest::FILE_NAME,
        lock::FILE_NAME,
        RUN_RECORD,
        lock::PROGRESS_FILE,
    ]
    .contains(&path)
        || path.starts_with(".progress.json")
}

/// Starts from a clean staging folder, or resumes one left by a killed run: the outputs of
/// stages it finished are kept, everything else in it is removed.
pub(crate) fn prepare_staging(prep: &Prepared) -> Result<()> {
    let staging = &prep.staging_dir;
    let keep = kept_outputs(prep);
    if !staging.exists() || keep.is_empty() {
        if staging.exists() {
            std::fs::remove_dir_all(staging)
                .map_err(|e| Error::io(staging, "cannot remove a stale staging folder", e))?;
        }
        return std::fs::create_dir_all(staging)
            .map_err(|e| Error::io(staging, "cannot create the staging folder", e));
    }
    for file in validate::list_files(staging)? {
        if !keep.contains(file.as_str()) {
            let path = staging.join(&file);
            std::fs::remove_file(&path)
                .map_err(|e| Error::io(&path, "cannot clean the staging folder", e))?;
        }
    }
    Ok(())
}

/// The staging folder's files that the run resumes with: the outputs of the stages an earlier
/// run finished there.
fn kept_outputs<'a>(prep: &'a Prepared) -> BTreeSet<&'a str> {
    prep.decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Reuse {
                origin: Origin::Partial,
                lock,
            } => Some(lock),
            _ => None,
        })
        .flat_map(|l| l.outputs.keys().map(String::as_str))
        .collect()
}

/// The bytes `prepare_staging` will free: the files of a kept staging folder (after a full
/// disk, say) that the run does not resume with. The space check counts them as free.
pub(crate) fn reclaimable_bytes(prep: &Prepared) -> u64 {
    let staging = &prep.staging_dir;
    let Ok(files) = validate::list_files(staging) else {
        return 0;
    };
    let keep = kept_outputs(prep);
    files
        .iter()
        .filter(|f| !keep.contains(f.as_str()))
        .filter_map(|f| std::fs::metadata(staging.join(f)).ok())
        // A file shared with a published dataset frees nothing when unlinked.
        .filter(|m| std::os::unix::fs::MetadataExt::nlink(m) == 1)
        .map(|m| m.len())
        .sum()
}

/// The first output of a stage whose content no longer matches the lock, if any.
pub(crate) fn damaged_output(dir: &Path, lock: &StageLock) -> Option<String> {
    use rayon::prelude::*;
    let mut bad: Vec<&String> = lock
        .outputs
        .par_iter()
        .filter(|(file, hash)| {
            validate::hash_file(&dir.join(file))
                .map(|(_, h)| &h != *hash)
                .unwrap_or(true)
        })
        .map(|(file, _)| file)
        .collect();
    bad.sort();
    bad.first().map(|f| f.to_string())
}

pub(crate) fn remove_stage_outputs(staging: &Path, lock: &StageLock) -> Result<()> {
    for file in lock.outputs.keys() {
        let path = staging.join(file);
        if path.exists() {
            std::fs::remove_file(&path)
                .map_err(|e| Error::io(&path, "cannot clean the staging folder", e))?;
        }
    }
    Ok(())
}

/// Brings a finished stage's files from the existing dataset into the staging folder: hard
/// links (no copy, and the old dataset stays intact since files are never rewritten in place),
/// falling back to copies across file systems. Metadata files are always copied.
pub(crate) fn link_outputs(from: &Path, to: &Path, lock: &StageLock) -> Result<()> {
    for file in lock.outputs.keys() {
        let (src, dst) = (from.join(file), to.join(file));
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, "cannot create", e))?;
        }
        if dst.exists() {
            std::fs::remove_file(&dst).map_err(|e| Error::io(&dst, "cannot replace", e))?;
        }
        let linked = !file.ends_with("zarr.json") && std::fs::hard_link(&src, &dst).is_ok();
        if !linked {
            std::fs::copy(&src, &dst).map_err(|e| {
                Error::io(&src, "cannot reuse an output of the existing dataset", e)
            })?;
        }
    }
    Ok(())
}

/// Moves the finished staging folder into place. An existing dataset is swapped with it in one
/// atomic exchange where the system can (Linux `renameat2(RENAME_EXCHANGE)` on local file
/// systems), so the name always shows a complete dataset; elsewhere (NFS) the old one is renamed
/// aside first, and an interruption between the two renames is repaired by the next run
/// (`recover_interrupted_publish`). The old one is removed once the new one is in place.
pub(crate) fn publish(staging: &Path, dataset_dir: &Path, name: &str) -> Result<()> {
    let parent = dataset_dir.parent().unwrap_or(Path::new("."));
    let aside = parent.join(format!(".{name}.replaced"));
    if aside.exists() {
        // A replaced dataset that would not go yet: the name is needed for this publish.
        discard(parent, name, &aside, "cannot move a replaced dataset away")?;
    }
    let had_old = dataset_dir.exists();
    let swapped = had_old
        && exchange(staging, dataset_dir)
            .map_err(|e| Error::io(dataset_dir, "cannot swap the new dataset into place", e))?;
    if swapped {
        // The staging path now holds the old dataset.
        if let Err(e) = std::fs::rename(staging, &aside) {
            tracing::warn!(folder = %staging.display(), error = %e, "cannot set the replaced dataset aside");
        }
    } else {
        if had_old {
            std::fs::rename(dataset_dir, &aside)
                .map_err(|e| Error::io(dataset_dir, "cannot move the old dataset aside", e))?;
        }
        if let Err(e) = std::fs::rename(staging, dataset_dir) {
            // The old dataset goes back where it was: the name is never left empty by a failure.
            if had_old {
                let _ = std::fs::rename(&aside, dataset_dir);
            }
            return Err(Error::io(
                dataset_dir,
                "cannot move the new dataset into place",
                e,
            ));
        }
    }
    // The new dataset is published: an old copy that will not go (an NFS client keeping a
    // reader's files as .nfsXXXX) is left for the next run to remove, not an error.
    if had_old && aside.exists() {
        let _ = discard(
            parent,
            name,
            &aside,
            "cannot move the replaced dataset away",
        );
    }
    if let Ok(dir) = std::fs::File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Swaps two paths atomically; `Ok(false)` where the kernel or the file system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are valid NUL-terminated strings that live across the call; the
    // syscall only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::is_garbage_of;

    #[test]
    fn garbage_is_matched_exactly() {
        assert!(is_garbage_of(".a.removed-12-345", "a"));
        assert!(!is_garbage_of(".a.removed-12-345.partial", "a"));
        assert!(!is_garbage_of(".a.removed-x.partial", "a"));
        assert!(!is_garbage_of(".a.removed-1-2-3", "a"));
        assert!(!is_garbage_of(".ab.removed-1-2", "a"));
        assert!(!is_garbage_of("a.removed-1-2", "a"));
        assert!(is_garbage_of(".a.removed-x.removed-1-2", "a.removed-x"));
    }
}
