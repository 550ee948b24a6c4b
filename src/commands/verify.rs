//! `verify`: re-reads a dataset through the real decoding paths and compares everything with
//! the checksums recorded when it was written (and, with `--against`, with the source).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rayon::prelude::*;
use zarrs::array::{Array, ArrayBytes, ArraySubset};
use zarrs::filesystem::FilesystemStore;

use crate::error::{Error, Result};
use crate::executor::lock::{self, Lock};
use crate::executor::manifest::{self, Manifest};
use crate::executor::RUN_RECORD;
use crate::npy;
use crate::per_thread::map_with_state;
use crate::source::{Entry, EntryReader, Source};
use crate::validate;
use crate::writers::zarr::ZarrPath;

#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub dataset: PathBuf,
    pub files: usize,
    pub file_bytes: u64,
    /// Bytes of decoded array values compared.
    pub decoded_bytes: u64,
    pub seconds: f64,
    pub failures: Vec<String>,
}

/// Datasets in a store (folders holding a manifest), or the one dataset given.
pub fn datasets(path: &Path) -> Result<Vec<PathBuf>> {
    if path.join(manifest::FILE_NAME).exists() || path.join(lock::FILE_NAME).exists() {
        return Ok(vec![path.to_path_buf()]);
    }
    let listing =
        std::fs::read_dir(path).map_err(|e| Error::io(path, "cannot list the store", e))?;
    let mut out: Vec<PathBuf> = listing
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .filter(|p| p.join(manifest::FILE_NAME).exists())
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(Error::bad_input(
            path.display().to_string(),
            "no dataset here (no manifest.json in it or in its folders)",
            "point verify at STORE/NAME or at a store",
        ));
    }
    Ok(out)
}

impl VerifyReport {
    /// Records a problem with one file of the dataset, named by its full path.
    fn fail(&mut self, file: &str, problem: impl Into<String>) {
        let at = self.dataset.join(file);
        self.failures
            .push(format!("{}: {}", at.display(), problem.into()));
    }
}

/// Every check runs even after one fails, so that a single run names every bad file; only a
/// manifest that cannot be read stops it, as the later checks have nothing to go on.
pub fn verify(dir: &Path, against: Option<&Path>) -> Result<VerifyReport> {
    let started = Instant::now();
    let mut report = VerifyReport {
        dataset: dir.to_path_buf(),
        ..Default::default()
    };
    if let Some(manifest) = read_manifest(&mut report) {
        check_files(&mut report, &manifest)?;
        decode_arrays(&mut report, &manifest);
        decode_tables(&mut report, &manifest);
        if let Some(source_path) = against {
            compare_with_source(&mut report, &manifest, source_path)?;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The lock checks itself; the manifest is checked against the lock. `None` when there is no
/// readable manifest.
fn read_manifest(report: &mut VerifyReport) -> Option<Manifest> {
    let lock = read_lock(report);
    let text = match std::fs::read(report.dataset.join(manifest::FILE_NAME)) {
        Ok(t) => t,
        Err(e) => {
            report.fail(manifest::FILE_NAME, format!("cannot read: {e}"));
            return None;
        }
    };
    if let Some(l) = &lock {
        if blake3::hash(&text).to_hex().as_str() != l.manifest_blake3 {
            report.fail(
                manifest::FILE_NAME,
                "content differs from the checksum recorded in lock.json",
            );
        }
    }
    match serde_json::from_slice(&text) {
        Ok(m) => Some(m),
        Err(e) => {
            report.fail(manifest::FILE_NAME, format!("not a readable manifest: {e}"));
            None
        }
    }
}

fn read_lock(report: &mut VerifyReport) -> Option<Lock> {
    match Lock::read(&report.dataset.join(lock::FILE_NAME)) {
        Ok(l) => Some(l),
        Err(e) => {
            // One line per failure: the error's first line.
            let problem = e.to_string().lines().next().unwrap_or_default().to_string();
            report.fail(lock::FILE_NAME, problem);
            None
        }
    }
}

/// Every file present, listed in the manifest and unchanged since it was written.
fn check_files(report: &mut VerifyReport, manifest: &Manifest) -> Result<()> {
    let listed: BTreeMap<&str, &manifest::OutputInfo> = manifest
        .outputs
        .iter()
        .map(|o| (o.path.as_str(), o))
        .collect();
    let on_disk: BTreeSet<String> = validate::list_files(&report.dataset)?
        .into_iter()
        .filter(|f| ![manifest::FILE_NAME, lock::FILE_NAME, RUN_RECORD].contains(&f.as_str()))
        .collect();
    for f in on_disk.iter().filter(|f| !listed.contains_key(f.as_str())) {
        report.fail(f, "not listed in the manifest");
    }
    for f in listed.keys().filter(|f| !on_disk.contains(**f)) {
        report.fail(f, "missing");
    }
    for (f, problem, bytes) in rehash(&report.dataset, &listed, &on_disk) {
        report.files += 1;
        report.file_bytes += bytes;
        if let Some(p) = problem {
            report.fail(&f, p);
        }
    }
    Ok(())
}

/// (file, problem, bytes read) for every listed file that is on disk, hashed in parallel.
fn rehash(
    dir: &Path,
    listed: &BTreeMap<&str, &manifest::OutputInfo>,
    on_disk: &BTreeSet<String>,
) -> Vec<(String, Option<String>, u64)> {
    listed
        .par_iter()
        .filter(|(f, _)| on_disk.contains(**f))
        .map(|(f, info)| match validate::hash_file(&dir.join(f)) {
            Ok((bytes, hash)) if hash == info.blake3 && bytes == info.bytes => {
                (f.to_string(), None, bytes)
            }
            Ok((bytes, _)) => (
                f.to_string(),
                Some("content differs from its checksum in the manifest".to_string()),
                bytes,
            ),
            Err(e) => (f.to_string(), Some(e.to_string()), 0),
        })
        .collect()
}

/// Every trial of every array and every statistic, decoded and compared with its values hash:
/// a file can match its checksum and still not decode to what the source held.
fn decode_arrays(report: &mut VerifyReport, manifest: &Manifest) {
    let mut by_array: BTreeMap<&str, Vec<&manifest::EntryInfo>> = BTreeMap::new();
    for e in &manifest.entries {
        if let (Some(output), Some(_)) = (&e.output, &e.values_blake3) {
            by_array.entry(output.as_str()).or_default().push(e);
        }
    }
    for (output, entries) in by_array {
        let Some(path) = ZarrPath::parse(output) else {
            continue;
        };
        let array = match open_array(&report.dataset, &path) {
            Ok(a) => a,
            Err(e) => {
                report.fail(output, format!("cannot open the array: {e}"));
                continue;
            }
        };
        let results: Vec<(u64, Option<String>)> = entries
            .par_iter()
            .map(|e| decode_entry(&array, e))
            .collect();
        for (bytes, problem) in results {
            report.decoded_bytes += bytes;
            if let Some(p) = problem {
                report.fail(output, p);
            }
        }
    }
}

fn open_array(dir: &Path, path: &ZarrPath) -> std::result::Result<Array<FilesystemStore>, String> {
    let store = FilesystemStore::new(dir.join(&path.store)).map_err(|e| e.to_string())?;
    Array::open(Arc::new(store), &path.node_path()).map_err(|e| e.to_string())
}

/// (bytes decoded, problem) for one entry: its trial of the array (`index`), or the whole
/// array for a statistic.
fn decode_entry(array: &Array<FilesystemStore>, e: &manifest::EntryInfo) -> (u64, Option<String>) {
    let shape = array.shape();
    let ranges: Vec<std::ops::Range<u64>> = match e.index {
        Some(i) => std::iter::once(i..i + 1)
            .chain(shape[1..].iter().map(|&d| 0..d))
            .collect(),
        None => shape.iter().map(|&d| 0..d).collect(),
    };
    let decoded: std::result::Result<ArrayBytes<'static>, String> = array
        .retrieve_array_subset(&ArraySubset::new_with_ranges(&ranges))
        .map_err(|err| err.to_string());
    match decoded.and_then(|b| {
        b.into_fixed()
            .map(|raw| raw.into_owned())
            .map_err(|err| err.to_string())
    }) {
        Ok(raw) if Some(blake3::hash(&raw).to_hex().to_string()) == e.values_blake3 => {
            (raw.len() as u64, None)
        }
        Ok(raw) => (
            raw.len() as u64,
            Some(format!(
                "decoded values of {} differ from the source's",
                e.path
            )),
        ),
        Err(err) => (
            0,
            Some(format!("cannot decode the values of {}: {err}", e.path)),
        ),
    }
}

fn decode_tables(report: &mut VerifyReport, manifest: &Manifest) {
    for o in manifest
        .outputs
        .iter()
        .filter(|o| o.path.ends_with(".parquet"))
    {
        if let Err(problem) = decode_table(&report.dataset.join(&o.path)) {
            report.fail(&o.path, problem);
        }
    }
}

/// Reads every row group of a table, decoding every column.
fn decode_table(path: &Path) -> std::result::Result<u64, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| format!("not a readable Parquet file: {e}"))?;
    let want = builder.metadata().file_metadata().num_rows() as u64;
    let mut rows = 0u64;
    for batch in builder.build().map_err(|e| e.to_string())? {
        rows += batch.map_err(|e| format!("cannot decode: {e}"))?.num_rows() as u64;
    }
    if rows != want {
        return Err(format!("decoded {rows} rows, the footer says {want}"));
    }
    Ok(rows)
}

/// Against the source: the same entries, the same bytes, the same decoded values.
fn compare_with_source(
    report: &mut VerifyReport,
    manifest: &Manifest,
    source_path: &Path,
) -> Result<()> {
    let source = Source::open(source_path)?;
    let located = |p: &str| format!("{}: {p}", source_path.display());
    let in_manifest: BTreeMap<&str, &manifest::EntryInfo> = manifest
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e))
        .collect();
    for e in source
        .entries
        .iter()
        .filter(|e| !in_manifest.contains_key(e.path.as_str()))
    {
        report.failures.push(format!(
            "{}: in the source but not in the manifest",
            located(&e.path)
        ));
    }
    let present: BTreeSet<&str> = source.entries.iter().map(|e| e.path.as_str()).collect();
    for p in in_manifest.keys().filter(|p| !present.contains(**p)) {
        report.failures.push(format!(
            "{}: in the manifest but not in the source",
            located(p)
        ));
    }
    let problems: Vec<String> = map_with_state(
        source.entries.len(),
        || source.reader(),
        |i, reader, _| {
            let entry = &source.entries[i];
            let info = in_manifest.get(entry.path.as_str())?;
            match reader {
                Ok(r) => compare_entry(r.as_mut(), entry, info, source_path),
                Err(e) => Some(e.to_string()),
            }
        },
    )
    .into_iter()
    .flatten()
    .collect();
    report.failures.extend(problems);
    Ok(())
}

/// The entry's bytes against its checksum, then, for an array, its values in little-endian
/// C order against the hash of what the output decodes to.
fn compare_entry(
    reader: &mut dyn EntryReader,
    entry: &Entry,
    info: &manifest::EntryInfo,
    source_path: &Path,
) -> Option<String> {
    let located = format!("{}: {}", source_path.display(), entry.path);
    let bytes = match reader.read(entry) {
        Ok(b) => b,
        // Read errors name the entry themselves.
        Err(e) => return Some(e.to_string()),
    };
    if blake3::hash(&bytes).to_hex().as_str() != info.blake3 {
        return Some(format!(
            "{located}: differs from the entry that was converted"
        ));
    }
    let values = info.values_blake3.as_ref()?;
    let header =
        npy::parse_header(&bytes).and_then(|h| h.check_file_len(bytes.len() as u64).map(|_| h));
    match header {
        Ok(h) => {
            let le = npy::to_little_endian_c(&h, &bytes[h.payload_offset..]);
            (blake3::hash(&le).to_hex().as_str() != values)
                .then(|| format!("{located}: decoded values differ from the output's"))
        }
        Err(e) => Some(format!("{located}: {e}")),
    }
}

/// Verifies datasets in a bucket: `url` names one dataset (its prefix holds `manifest.json`) or
/// a store of them. Each is downloaded into the local work folder and verified there like a
/// local one, so what is checked is exactly what a reader gets from the bucket; failures name
/// the objects by URL. The copy is removed afterwards.
pub fn verify_bucket(url: &str, against: Option<&Path>) -> Result<Vec<VerifyReport>> {
    use crate::writers::bucket::Bucket;
    let (store_url, names) = bucket_datasets(url)?;
    if against.is_some() && names.len() != 1 {
        return Err(Error::bad_input(
            url,
            "--against compares one dataset with its source, but this is a store of several",
            "name the dataset: STORE/NAME",
        ));
    }
    let bucket = Bucket::open(&store_url)?;
    let work = crate::executor::remote::work_folder(&store_url).join(".verify");
    let mut reports = Vec::new();
    for name in names {
        let keys: Vec<String> = bucket.list(&name)?.into_iter().map(|(k, _)| k).collect();
        let copy = work.join(&name);
        crate::executor::remote::remove_local(&copy)?;
        bucket.download(&keys, &work)?;
        let mut report = verify(&copy, against)?;
        let local = copy.display().to_string();
        let remote = bucket.url_of(&name);
        for failure in &mut report.failures {
            *failure = failure.replace(&local, &remote);
        }
        report.dataset = PathBuf::from(remote);
        let _ = std::fs::remove_dir_all(&copy);
        reports.push(report);
    }
    Ok(reports)
}

/// The store's URL and the names of the datasets to verify: the one `url` names, or every
/// committed dataset in the store `url` is.
fn bucket_datasets(url: &str) -> Result<(String, Vec<String>)> {
    use crate::writers::bucket::Bucket;
    let url = url.trim_end_matches('/');
    if let Some((parent, name)) = url.rsplit_once('/') {
        if parent.contains("://") && !parent.ends_with(':') && !parent.ends_with('/') {
            let bucket = Bucket::open(parent)?;
            if bucket
                .head(&crate::executor::remote::manifest_key(name))?
                .is_some()
            {
                return Ok((parent.to_string(), vec![name.to_string()]));
            }
        }
    }
    let bucket = Bucket::open(url)?;
    let names: Vec<String> = bucket
        .list("")?
        .into_iter()
        .filter_map(|(key, _)| {
            let (name, file) = key.split_once('/')?;
            (file == manifest::FILE_NAME && !name.starts_with('.')).then(|| name.to_string())
        })
        .collect();
    if names.is_empty() {
        return Err(Error::bad_input(
            url,
            "no dataset here (no manifest.json in it or under it)",
            "point verify at STORE/NAME or at a store; a dataset whose run did not commit has no manifest.json",
        ));
    }
    Ok((url.to_string(), names))
}
