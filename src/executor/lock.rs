//! The lock file (`lock.json`, modelled on `dvc.lock`): for each stage, the hash of its
//! resolved config and inputs (its key) and the hashes of the files it wrote. A later run
//! compares keys to decide what to redo; `verify` uses it to check the manifest itself.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::stages::{EntryRecord, MeasureValues};

pub const FILE_NAME: &str = "lock.json";
pub const FORMAT: &str = "sensorium-ingest-lock/1";
/// Progress of a run in its staging folder: the stages already finished (for resuming).
pub const PROGRESS_FILE: &str = ".progress.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lock {
    pub format: String,
    pub tool_version: String,
    pub dataset: String,
    pub source: LockSource,
    pub pipeline_hash: String,
    pub stages: Vec<StageLock>,
    /// BLAKE3 of `manifest.json` as written.
    pub manifest_blake3: String,
    /// BLAKE3 of this file's JSON with this field empty: a damaged lock is detected.
    pub checksum: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockSource {
    pub name: String,
    /// BLAKE3 over every entry's path and container fingerprint (zip: CRC-32 and size; folder:
    /// size and modification time): cheap to recompute, changes when any entry changes.
    pub fingerprint: String,
}

/// What one stage did, and what a later run needs to reuse its outputs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageLock {
    pub id: String,
    pub kind: String,
    /// BLAKE3 of the stage's resolved config.
    pub config_hash: String,
    /// BLAKE3 of the fingerprints of the entries it reads and of the trial axis.
    pub inputs_hash: String,
    /// Keys of the stages it reads measures from.
    pub depends_on: BTreeMap<String, String>,
    /// BLAKE3 over all of the above plus the tool version and global settings.
    pub key: String,
    /// Files it wrote (relative to the dataset folder) and their BLAKE3.
    pub outputs: BTreeMap<String, String>,
    /// Entries it read, as recorded in the manifest.
    pub entries: Vec<LockedEntry>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub measures: BTreeMap<String, MeasureValues>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockedEntry {
    pub path: String,
    pub blake3: String,
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values_blake3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
}

impl LockedEntry {
    pub fn from_record(path: &str, r: &EntryRecord) -> LockedEntry {
        LockedEntry {
            path: path.to_string(),
            blake3: r.blake3.clone(),
            output: r.output.clone(),
            values_blake3: r.values_blake3.clone(),
            index: r.index,
        }
    }
}

impl Lock {
    /// Serialises with the self-checksum filled in.
    pub fn to_json(&self) -> Result<String> {
        let mut lock = self.clone();
        lock.checksum = String::new();
        lock.checksum = self_checksum(&lock)?;
        let mut text =
            serde_json::to_string_pretty(&lock).map_err(|e| Error::Internal(e.to_string()))?;
        text.push('\n');
        Ok(text)
    }

    /// Reads a lock file and checks its self-checksum.
    pub fn read(path: &Path) -> Result<Lock> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(path, "cannot read the lock file", e))?;
        Lock::parse(&text, &path.display().to_string())
    }

    /// A lock from its JSON, checked against its own checksum; `location` names it in errors.
    pub fn parse(text: &str, location: &str) -> Result<Lock> {
        let damaged = |why: String| {
            Error::bad_input(
                location,
                format!("the lock file is damaged: {why}"),
                "run `convert --force` to rebuild the dataset",
            )
        };
        let lock: Lock = serde_json::from_str(text).map_err(|e| damaged(e.to_string()))?;
        let mut blank = lock.clone();
        blank.checksum = String::new();
        if self_checksum(&blank)? != lock.checksum {
            return Err(damaged("its checksum does not match its content".into()));
        }
        Ok(lock)
    }
}

/// Progress of an unfinished run, kept in its staging folder.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Progress {
    pub source_fingerprint: String,
    pub stages: Vec<StageLock>,
}

impl Progress {
    pub fn read(dir: &Path) -> Option<Progress> {
        let text = std::fs::read_to_string(dir.join(PROGRESS_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string(self).map_err(|e| Error::Internal(e.to_string()))?;
        write_replacing(
            &dir.join(PROGRESS_FILE),
            text.as_bytes(),
            "cannot record progress",
        )
    }
}

/// The self-checksum of a record (lock, shard receipt): BLAKE3 of its pretty JSON, given with
/// its checksum field empty.
pub fn self_checksum(blank: &impl Serialize) -> Result<String> {
    let body = serde_json::to_string_pretty(blank).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(format!("blake3:{}", blake3::hash(body.as_bytes()).to_hex()))
}

/// Writes `path` aside (`<path>.tmp`), flushes it and renames it into place, so a kill leaves
/// the old or the new version, never half of one.
pub fn write_replacing(path: &Path, bytes: &[u8], action: &'static str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, action, e))
}

/// Writes a file and flushes it to disk before returning.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = crate::writers::unlink_existing(path)
        .and_then(|()| std::fs::File::create(path))
        .map_err(|e| Error::io(path, "cannot create", e))?;
    file.write_all(bytes)
        .map_err(|e| Error::io(path, "cannot write", e))?;
    file.sync_all()
        .map_err(|e| Error::io(path, "cannot flush", e))
}
