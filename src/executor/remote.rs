//! Stores in object storage. A bucket cannot rename, so the run is built and checked in a
//! local work folder exactly as for a local store (staging, resume, validation, manifest),
//! then committed to the bucket:
//!
//! 1. the dataset's name is taken by a lock object written only if absent (`.<name>.lock`,
//!    conditional write; kept fresh by a heartbeat, taken over once stale);
//! 2. a replaced version's `manifest.json` is deleted first: from then on the prefix is not a
//!    dataset, so no reader that checks for the manifest opens a mix of two versions;
//! 3. every other file is uploaded (objects already there with the same BLAKE3 are kept, so a
//!    rerun after a kill resumes), and objects of an older version that the new one lacks are
//!    deleted;
//! 4. `manifest.json` is written last, only if absent: its presence commits the dataset;
//! 5. the catalog fragment is written, then the local copy is removed.
//!
//! docs/operations.md describes the protocol for operators.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::UpdateVersion;
use serde::{Deserialize, Serialize};

use super::catalog;
use super::keys::stage_keys;
use super::lock::{self, Lock};
use super::manifest::{self, Manifest};
use super::name_lock::{dead_on_this_host, stale_after, unknown_holder, Holder, Waiting};
use super::parts::{
    convert_shard, finalize, plan_part, shards_folder, FinalizeOptions, Finalized, Shard,
    ShardReport, JOB_FILE, RUNNING,
};
use super::{open_source, ConvertOptions, ConvertReport};
use crate::error::{Error, Result};
use crate::pipeline::plan::plan;
use crate::pipeline::spec::Pipeline;
use crate::source::Source;
use crate::validate;
use crate::writers::bucket::{Bucket, Transferred, Upload};

/// The local work folder for a bucket store: `SENSORIUM_INGEST_WORK`, else a folder in the
/// system's temporary directory named after the URL. A killed run resumes from it.
pub fn work_folder(url: &str) -> PathBuf {
    let base = std::env::var_os("SENSORIUM_INGEST_WORK")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("sensorium-ingest-work"));
    let tag = blake3::hash(url.as_bytes()).to_hex();
    base.join(&tag.as_str()[..16])
}

/// Converts into the local work folder (`opts.store`), then commits the dataset to the bucket.
pub fn convert_to_bucket(opts: &ConvertOptions, bucket: Arc<Bucket>) -> Result<ConvertReport> {
    let started = Instant::now();
    let pipeline = Pipeline::parse(&opts.pipeline_text, &opts.pipeline_file)?;
    let (source, name) = open_source(opts)?;
    let held = BucketLock::acquire(bucket.clone(), &name, opts.writer, opts.wait)?;
    let current = committed_state(opts, &bucket, &pipeline, &source, &name)?;
    let local = opts.store.join(&name);
    if current {
        remove_local(&local)?;
        ensure_catalog_row(opts, &bucket, &pipeline, source, &name)?;
        return Ok(up_to_date_report(&bucket, &name, started));
    }
    drop(source);
    discard_other_version(opts, &pipeline, &name, &local)?;
    let mut report = super::convert(opts)?;
    held.check_held()?;
    let sent = publish(&bucket, &opts.store, &name, &held, opts.force)?;
    tracing::info!(dataset = %name, objects = sent.objects, bytes = sent.bytes, kept = sent.kept, "committed to {}", bucket.url());
    report.dataset_dir = PathBuf::from(bucket.url_of(&name));
    report.up_to_date = false;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Commits the finished dataset `work/name` with its catalog row, then removes the local copy.
fn publish(
    bucket: &Bucket,
    work: &Path,
    name: &str,
    held: &BucketLock,
    force: bool,
) -> Result<Transferred> {
    let sent = commit(bucket, work, name, held, force)?;
    held.check_held()?;
    upload_catalog_row(bucket, work, name)?;
    remove_local(&work.join(name))?;
    Ok(sent)
}

/// `convert --shard K/N` into a bucket: the task joins the run recorded in the bucket (its
/// `job.json`, so a task of another run is refused as on a shared folder), converts its part in
/// the local work folder, and uploads the part's files and receipt to `PREFIX/.<name>.shards/`.
/// Tasks do not take the bucket's name lock (they run on many nodes at once); `finalize` does.
pub fn shard_task_to_bucket(
    opts: &ConvertOptions,
    bucket: &Bucket,
    shard: Shard,
) -> Result<ShardReport> {
    let pipeline = Pipeline::parse(&opts.pipeline_text, &opts.pipeline_file)?;
    let (source, name) = open_source(opts)?;
    bucket.check_name(&name)?;
    let folder = shards_folder(&name);
    if committed_state(opts, bucket, &pipeline, &source, &name)? {
        return Ok(ShardReport {
            dataset: name.clone(),
            shard,
            trials: plan_part(opts, shard)?.0,
            up_to_date: true,
            already_done: false,
            shards_dir: PathBuf::from(bucket.url_of(&folder)),
            bytes: 0,
            seconds: 0.0,
        });
    }
    drop(source);
    let local = opts.store.join(&folder);
    join_bucket_job(bucket, &folder, &local)?;
    let mut report = convert_shard(opts, shard)?;
    let job_key = format!("{folder}/{JOB_FILE}");
    let job = std::fs::read(local.join(JOB_FILE))
        .map_err(|e| Error::io(local.join(JOB_FILE), "cannot read the run's job record", e))?;
    if bucket.create(&job_key, job.clone())?.is_none()
        && bucket.read(&job_key)?.map(|(b, _)| b) != Some(job)
    {
        return Err(Error::ShardConflict {
            path: PathBuf::from(bucket.url_of(&folder)),
            why: "another run started in the bucket meanwhile".into(),
        });
    }
    let skip = |f: &str| f == JOB_FILE || f.starts_with(RUNNING) || f.ends_with(".tmp");
    bucket.upload(uploads(&local, &folder, skip)?)?;
    report.shards_dir = PathBuf::from(bucket.url_of(&folder));
    Ok(report)
}

/// The local shards folder follows the bucket's: the run's `job.json` if the bucket has one
/// (written aside and renamed, for tasks reading it on this node), else no folder at all, so a
/// finished run's leftovers on this node cannot refuse a new run.
fn join_bucket_job(bucket: &Bucket, folder: &str, local: &Path) -> Result<()> {
    let Some((job, _)) = bucket.read(&format!("{folder}/{JOB_FILE}"))? else {
        return remove_local(local);
    };
    std::fs::create_dir_all(local)
        .map_err(|e| Error::io(local, "cannot create the work folder", e))?;
    let path = local.join(JOB_FILE);
    if std::fs::read(&path).is_ok_and(|there| there == job) {
        return Ok(());
    }
    let aside = local.join(format!(".{JOB_FILE}.{}.tmp", std::process::id()));
    std::fs::write(&aside, job).map_err(|e| Error::io(&aside, "cannot write", e))?;
    std::fs::rename(&aside, &path).map_err(|e| Error::io(&path, "cannot write", e))
}

/// `finalize PREFIX/NAME` of a sharded run in a bucket: its parts are downloaded into the work
/// folder, finalized there as on a shared folder, and the dataset committed like a conversion's.
/// The parts are deleted after, `job.json` last, so an interrupted clean-up is finished by the
/// next finalize.
pub fn finalize_in_bucket(
    opts: &FinalizeOptions,
    store_url: &str,
    name: &str,
) -> Result<Finalized> {
    let bucket = Arc::new(Bucket::open(store_url)?);
    let work = work_folder(store_url);
    let held = BucketLock::acquire(bucket.clone(), name, "finalize", opts.wait)?;
    let folder = shards_folder(name);
    let job_key = format!("{folder}/{JOB_FILE}");
    let keys: Vec<String> = bucket.list(&folder)?.into_iter().map(|(k, _)| k).collect();
    let dataset_url = bucket.url_of(name);
    let committed = bucket.head(&manifest_key(name))?.is_some();
    if !keys.contains(&job_key) {
        if committed {
            delete_parts(&bucket, keys, &job_key)?;
            return Ok(Finalized::AlreadyComplete(PathBuf::from(dataset_url)));
        }
        return Err(Error::bad_input(
            bucket.url_of(&folder),
            format!("no sharded run of {name} to finalize"),
            "run `sensorium-ingest convert SOURCE --out STORE --shard K/N` for every K first (the dataset name must match)",
        ));
    }
    remove_local(&work.join(&folder))?;
    remove_local(&work.join(name))?;
    bucket.download(&keys, &work)?;
    let local = FinalizeOptions {
        dataset_dir: work.join(name),
        source: opts.source.clone(),
        ..*opts
    };
    let Finalized::Converted(mut report) = finalize(&local)? else {
        return Err(Error::Internal(
            "a downloaded sharded run finalized to nothing".into(),
        ));
    };
    publish(&bucket, &work, name, &held, false)?;
    delete_parts(&bucket, keys, &job_key)?;
    report.dataset_dir = PathBuf::from(dataset_url);
    Ok(Finalized::Converted(report))
}

fn delete_parts(bucket: &Bucket, keys: Vec<String>, job_key: &str) -> Result<()> {
    for key in keys.iter().filter(|k| *k != job_key) {
        bucket.delete(key)?;
    }
    bucket.delete(job_key)
}

/// Whether the committed dataset of this name (if any) is current. Refuses one from another
/// source, or one whose lock cannot be read, without `--force`, as for a local store.
fn committed_state(
    opts: &ConvertOptions,
    bucket: &Bucket,
    pipeline: &Pipeline,
    source: &Source,
    name: &str,
) -> Result<bool> {
    let exists = |why: &str| Error::Exists {
        path: PathBuf::from(bucket.url_of(name)),
        why: why.into(),
    };
    let remote = match committed_lock(bucket, name)? {
        Committed::None => return Ok(false),
        Committed::Unreadable if opts.force => return Ok(false),
        Committed::Unreadable => {
            return Err(exists(
                "it has no readable lock file, so it cannot be updated in place",
            ))
        }
        Committed::Lock(lock) => lock,
    };
    let (fingerprint, current) = compare(opts, pipeline, source, name, &remote)?;
    if !opts.force && remote.source.fingerprint != fingerprint {
        return Err(exists(
            "it was converted from a different source (or the source has changed since)",
        ));
    }
    Ok(current && !opts.force)
}

/// Whether the bucket holds this source's dataset, committed and current (for `plan`).
pub fn committed_and_current(opts: &ConvertOptions, bucket: &Bucket) -> Result<bool> {
    let pipeline = Pipeline::parse(&opts.pipeline_text, &opts.pipeline_file)?;
    let (source, name) = open_source(opts)?;
    committed_state(opts, bucket, &pipeline, &source, &name)
}

/// What the bucket holds under a name.
enum Committed {
    None,
    /// A manifest, but no lock that passes its own checksum.
    Unreadable,
    Lock(Box<Lock>),
}

/// The committed dataset's lock (checked against its own checksum), if the bucket has one.
fn committed_lock(bucket: &Bucket, name: &str) -> Result<Committed> {
    if bucket.head(&manifest_key(name))?.is_none() {
        return Ok(Committed::None);
    }
    let key = format!("{name}/{}", lock::FILE_NAME);
    let Some((bytes, _)) = bucket.read(&key)? else {
        return Ok(Committed::Unreadable);
    };
    let read = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| Lock::parse(text, &bucket.url_of(&key)).ok());
    Ok(read.map_or(Committed::Unreadable, |l| Committed::Lock(Box::new(l))))
}

/// The source's fingerprint, and whether `lock` records exactly what this source and
/// pipeline give now (every stage's key, the pipeline's hash).
fn compare(
    opts: &ConvertOptions,
    pipeline: &Pipeline,
    source: &Source,
    name: &str,
    lock: &Lock,
) -> Result<(String, bool)> {
    let plan = plan(pipeline, source)?;
    let (fingerprint, keys) = stage_keys(pipeline, source, &plan, name);
    let same_stages = lock.stages.len() == keys.len()
        && lock
            .stages
            .iter()
            .zip(pipeline.stages.iter().zip(&keys))
            .all(|(l, (s, k))| l.id == s.id() && l.key == k.key);
    let current = same_stages
        && lock.source.fingerprint == fingerprint
        && lock.pipeline_hash == Pipeline::hash(&opts.pipeline_text);
    Ok((fingerprint, current))
}

/// A finished local copy of another version (an older source or pipeline) would make the local
/// run refuse or reuse the wrong files: the work folder is a cache, so it goes.
fn discard_other_version(
    opts: &ConvertOptions,
    pipeline: &Pipeline,
    name: &str,
    local: &Path,
) -> Result<()> {
    let Ok(existing) = Lock::read(&local.join(lock::FILE_NAME)) else {
        return remove_local(local);
    };
    let source = Source::open(&opts.source)?;
    let (_, current) = compare(opts, pipeline, &source, name, &existing)?;
    if current && !opts.force {
        return Ok(());
    }
    remove_local(local)
}

/// The key of dataset `name`'s manifest: its presence commits the dataset.
pub fn manifest_key(name: &str) -> String {
    format!("{name}/{}", manifest::FILE_NAME)
}

/// The key of dataset `name`'s row in the store's catalog.
fn catalog_key(name: &str) -> String {
    format!("{}/{name}.parquet", catalog::FOLDER)
}

/// Removes a folder of the local work folder, if it is there.
pub fn remove_local(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| Error::io(dir, "cannot clean the work folder", e))?;
    }
    Ok(())
}

/// Uploads the finished dataset `work/name` and commits it (see the module's steps 2-4).
/// Before each step that changes what readers see, the lock is rewritten at its version: a
/// writer that lost its name stops before touching the new holder's objects.
pub(crate) fn commit(
    bucket: &Bucket,
    work: &Path,
    name: &str,
    held: &BucketLock,
    force: bool,
) -> Result<Transferred> {
    let dir = work.join(name);
    let manifest_key = manifest_key(name);
    let manifest_path = dir.join(manifest::FILE_NAME);
    let manifest_text = std::fs::read(&manifest_path).map_err(|e| {
        Error::io(
            &manifest_path,
            "cannot read the finished dataset's manifest",
            e,
        )
    })?;
    match bucket.read(&manifest_key)? {
        // Committed already (a rerun after a kill); `--force` checks every object again.
        Some((there, _)) if there == manifest_text && !force => return Ok(Transferred::default()),
        Some(_) => {
            held.reassert()?;
            bucket.delete(&manifest_key)?;
        }
        None => {}
    }
    let files = uploads(&dir, name, |f| f == manifest::FILE_NAME)?;
    check_against_manifest(&dir, name, &manifest_text, &files)?;
    held.reassert()?;
    let sent = bucket.upload(files.clone())?;
    held.reassert()?;
    let wanted: std::collections::BTreeSet<&str> = files.iter().map(|f| f.key.as_str()).collect();
    for (key, _) in bucket.list(name)? {
        if !wanted.contains(key.as_str()) && key != manifest_key {
            bucket.delete(&key)?;
        }
    }
    held.reassert()?;
    if bucket.create(&manifest_key, manifest_text)?.is_none() {
        return Err(Error::Busy {
            path: PathBuf::from(bucket.url_of(&manifest_key)),
            what: "another writer committed this dataset meanwhile".into(),
            holder: "unknown (the bucket's lock was not respected)".into(),
            hint: "verify the dataset, then run the same command again".into(),
        });
    }
    Ok(sent)
}

/// The files about to be uploaded are exactly the manifest's outputs (plus the records the
/// manifest does not list), each with the size and BLAKE3 it records: a local copy damaged
/// since it was written is never committed under a manifest that vouches for it.
fn check_against_manifest(dir: &Path, name: &str, text: &[u8], files: &[Upload]) -> Result<()> {
    let manifest: Manifest = serde_json::from_slice(text)
        .map_err(|e| Error::Internal(format!("our own manifest does not parse: {e}")))?;
    let by_key: std::collections::BTreeMap<&str, &Upload> =
        files.iter().map(|f| (f.key.as_str(), f)).collect();
    let records = [lock::FILE_NAME, super::RUN_RECORD];
    let extra = files.iter().find(|f| {
        let file = f.key.trim_start_matches(&format!("{name}/")).to_string();
        !records.contains(&file.as_str()) && !manifest.outputs.iter().any(|o| o.path == file)
    });
    let damaged = manifest.outputs.iter().find(|o| {
        by_key
            .get(format!("{name}/{}", o.path).as_str())
            .is_none_or(|f| f.size != o.bytes || f.blake3 != o.blake3)
    });
    let bad = damaged
        .map(|o| (o.path.clone(), "missing or changed since it was written"))
        .or(extra.map(|f| (f.key.clone(), "not listed in the manifest")));
    match bad {
        None => Ok(()),
        Some((file, problem)) => Err(Error::bad_input(
            dir.join(file.trim_start_matches(&format!("{name}/")))
                .display()
                .to_string(),
            format!("the finished local copy cannot be committed: {problem}"),
            "run the same command with --force: the dataset is converted again",
        )),
    }
}

/// Every file under `dir` but those `skip` names, hashed as it is on disk now, to go under
/// `prefix` in the bucket.
fn uploads(dir: &Path, prefix: &str, skip: impl Fn(&str) -> bool + Sync) -> Result<Vec<Upload>> {
    use rayon::prelude::*;
    validate::list_files(dir)?
        .into_par_iter()
        .filter(|f| !skip(f))
        .map(|file| {
            let local = dir.join(&file);
            let (size, blake3) = validate::hash_file(&local)?;
            Ok(Upload {
                local,
                key: format!("{prefix}/{file}"),
                size,
                blake3,
            })
        })
        .collect()
}

fn upload_catalog_row(bucket: &Bucket, work: &Path, name: &str) -> Result<()> {
    let path = catalog::fragment_path(work, name);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, "cannot read", e))?;
    bucket.put(&catalog_key(name), bytes)?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// A run killed between its commit and its catalog row left the row missing or old: it is
/// written again from the source, the pipeline and the committed manifest.
fn ensure_catalog_row(
    opts: &ConvertOptions,
    bucket: &Bucket,
    pipeline: &Pipeline,
    source: Source,
    name: &str,
) -> Result<()> {
    let key = catalog_key(name);
    let path = catalog::fragment_path(&opts.store, name);
    let manifest: Manifest = bucket
        .read(&manifest_key(name))?
        .and_then(|(bytes, _)| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| Error::Internal("a committed dataset has no readable manifest".into()))?;
    let prep = super::prepare(opts, pipeline, source, name.to_string())?;
    if let Some((bytes, _)) = bucket.read(&key)? {
        std::fs::create_dir_all(path.parent().unwrap_or(&opts.store))
            .map_err(|e| Error::io(&path, "cannot create the catalog folder", e))?;
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, "cannot write", e))?;
        if catalog::describes(
            &opts.store,
            name,
            &prep.source_fingerprint,
            &prep.pipeline_hash,
        ) {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
    }
    catalog::write(
        &opts.store,
        &super::complete::catalog_row(&prep, &manifest.source.checksum)?,
    )?;
    upload_catalog_row(bucket, &opts.store, name)
}

fn up_to_date_report(bucket: &Bucket, name: &str, started: Instant) -> ConvertReport {
    tracing::info!(dataset = %name, "up to date in {}", bucket.url());
    ConvertReport {
        dataset: name.to_string(),
        dataset_dir: PathBuf::from(bucket.url_of(name)),
        up_to_date: true,
        trials: 0,
        dimensions: Default::default(),
        source_bytes: 0,
        output_bytes: 0,
        seconds: started.elapsed().as_secs_f64(),
        threads: 0,
        peak_memory_bytes: super::peak_memory_bytes(),
        stages: Vec::new(),
    }
}

/// What the lock object holds: who, and when it last proved alive.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LockRecord {
    holder: Holder,
    /// Seconds since the Unix epoch, rewritten by the heartbeat.
    refreshed: u64,
}

/// A dataset's name held in a bucket: `.<name>.lock`, created only if absent, refreshed by a
/// heartbeat with a conditional replace (a holder that lost it notices), removed when done.
/// Stale (not refreshed for `SENSORIUM_INGEST_LOCK_STALE_SECONDS`), it is taken over by a
/// conditional replace, so two takers cannot both win. Staleness compares the holder's clock
/// with the taker's: hosts must keep their clocks in sync (NTP), as for a shared file system.
pub struct BucketLock {
    state: Arc<LockState>,
    beat: Option<std::thread::JoinHandle<()>>,
}

struct LockState {
    bucket: Arc<Bucket>,
    key: String,
    holder: Holder,
    version: Mutex<UpdateVersion>,
    /// When the lock was last rewritten: a holder that could not refresh it for half the
    /// stale time stops, as another writer may be about to take it over.
    refreshed: Mutex<Instant>,
    lost: AtomicBool,
    stop: AtomicBool,
}

impl BucketLock {
    pub fn acquire(
        bucket: Arc<Bucket>,
        name: &str,
        what: &str,
        waiting: Waiting,
    ) -> Result<BucketLock> {
        bucket.check_name(name)?;
        check_conditional_writes(&bucket)?;
        let key = format!(".{name}.lock");
        let holder = Holder::this_process(what, None);
        let started = Instant::now();
        loop {
            if let Some(version) = try_take(&bucket, &key, &holder)? {
                return Ok(BucketLock::start(bucket, key, holder, version));
            }
            let Some((record, _)) = read_record(&bucket, &key)? else {
                continue;
            };
            let limit = match waiting {
                Waiting::No => Some(Duration::ZERO),
                Waiting::Up(limit) => limit,
            };
            if limit.is_some_and(|l| started.elapsed() >= l) {
                return Err(Error::Busy {
                    path: PathBuf::from(bucket.url_of(&key)),
                    what: format!("another writer holds dataset {name}"),
                    holder: record.holder.describe(),
                    hint: "wait for it to finish, or pass --wait to wait for it; a holder that died is taken over at once on its own host, from other hosts once its lock is older than the stale time (docs/operations.md)".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn start(bucket: Arc<Bucket>, key: String, holder: Holder, version: UpdateVersion) -> Self {
        let state = Arc::new(LockState {
            bucket,
            key,
            holder,
            version: Mutex::new(version),
            refreshed: Mutex::new(Instant::now()),
            lost: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let beating = state.clone();
        let beat = std::thread::spawn(move || beating.heartbeat());
        BucketLock {
            state,
            beat: Some(beat),
        }
    }

    pub fn check_held(&self) -> Result<()> {
        let state = &self.state;
        let silent = crate::per_thread::lock(&state.refreshed).elapsed() > stale_after() / 2;
        if !state.lost.load(Ordering::SeqCst) && !silent {
            return Ok(());
        }
        let now = read_record(&state.bucket, &state.key)
            .ok()
            .flatten()
            .map_or_else(|| "nobody".into(), |(r, _)| r.holder.describe());
        Err(Error::Busy {
            path: PathBuf::from(state.bucket.url_of(&state.key)),
            what: "this run lost its lock (or could not refresh it for half the stale time)".into(),
            holder: now,
            hint: "another process may have taken the name over; run the command again".into(),
        })
    }

    /// Rewrites the lock at the version this holder wrote last: fails (75) when someone else
    /// took it over, so no step that changes what readers see runs after the name was lost.
    pub fn reassert(&self) -> Result<()> {
        self.check_held()?;
        if !self.state.refresh()? {
            self.state.lost.store(true, Ordering::SeqCst);
            return self.check_held();
        }
        Ok(())
    }
}

impl LockState {
    /// One conditional rewrite: `false` when the lock is no longer this holder's.
    fn refresh(&self) -> Result<bool> {
        let mut version = crate::per_thread::lock(&self.version);
        match self
            .bucket
            .replace(&self.key, record_bytes(&self.holder, unix_now()), &version)?
        {
            Some(v) => {
                *version = v;
                *crate::per_thread::lock(&self.refreshed) = Instant::now();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn heartbeat(&self) {
        let every = (stale_after() / 4).min(Duration::from_secs(30));
        let mut last = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            if last.elapsed() < every {
                continue;
            }
            last = Instant::now();
            match self.refresh() {
                Ok(true) => {}
                Ok(false) => {
                    self.lost.store(true, Ordering::SeqCst);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "cannot refresh the dataset's lock; retrying"),
            }
        }
    }
}

/// Released by a conditional rewrite as a record refreshed at time 0, which the next writer
/// takes over at once: a plain delete could remove a lock someone else took over meanwhile.
impl Drop for BucketLock {
    fn drop(&mut self) {
        let state = &self.state;
        state.stop.store(true, Ordering::SeqCst);
        if let Some(beat) = self.beat.take() {
            let _ = beat.join();
        }
        if state.lost.load(Ordering::SeqCst) {
            return;
        }
        let version = crate::per_thread::lock(&state.version).clone();
        if let Err(e) = state
            .bucket
            .replace(&state.key, record_bytes(&state.holder, 0), &version)
        {
            tracing::warn!(error = %e, "cannot release the dataset's lock; it goes stale");
        }
    }
}

fn record_bytes(holder: &Holder, refreshed: u64) -> Vec<u8> {
    let record = LockRecord {
        holder: holder.clone(),
        refreshed,
    };
    serde_json::to_vec_pretty(&record).unwrap_or_default()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Creates the lock, or takes over a released or stale one (or one whose holder died on this
/// host); `None` while someone else holds it.
fn try_take(bucket: &Bucket, key: &str, holder: &Holder) -> Result<Option<UpdateVersion>> {
    if let Some(version) = bucket.create(key, record_bytes(holder, unix_now()))? {
        return Ok(Some(version));
    }
    let Some((record, version)) = read_record(bucket, key)? else {
        return Ok(None);
    };
    let age = unix_now().saturating_sub(record.refreshed);
    if Duration::from_secs(age) < record.holder.stale_after() && !dead_on_this_host(&record.holder)
    {
        return Ok(None);
    }
    if record.refreshed != 0 {
        tracing::warn!(holder = %record.holder.describe(), "taking over a stale lock");
    }
    bucket.replace(key, record_bytes(holder, unix_now()), &version)
}

/// A server that ignores conditional writes would let two writers both commit: refused loudly.
/// Probed on a key of its own: a second create of it, and a replace at a version that never
/// was, must both be refused.
fn check_conditional_writes(bucket: &Bucket) -> Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let key = format!(".conditional-write-probe.{}.{nanos}", std::process::id());
    let probe = b"probe".to_vec();
    let honoured = bucket.create(&key, probe.clone())?.is_some()
        && bucket.create(&key, probe.clone())?.is_none()
        && bucket
            .replace(
                &key,
                probe,
                &UpdateVersion {
                    e_tag: Some("\"no-such-version\"".into()),
                    version: None,
                },
            )?
            .is_none();
    bucket.delete(&key)?;
    if honoured {
        return Ok(());
    }
    Err(Error::usage(
        format!("{}: the object store ignores conditional writes (If-None-Match, If-Match)", bucket.url()),
        "two writers of one dataset could both commit; use a store that supports conditional writes (AWS S3, recent MinIO, Ceph RGW, GCS, Azure)",
    ))
}

/// A lock record that cannot be parsed (damaged, or some other tool's) names no holder and no
/// refresh time: it is taken over as stale.
fn read_record(bucket: &Bucket, key: &str) -> Result<Option<(LockRecord, UpdateVersion)>> {
    let Some((bytes, version)) = bucket.read(key)? else {
        return Ok(None);
    };
    let record = serde_json::from_slice(&bytes).unwrap_or_else(|_| LockRecord {
        holder: unknown_holder("an unknown writer"),
        refreshed: 0,
    });
    Ok(Some((record, version)))
}
