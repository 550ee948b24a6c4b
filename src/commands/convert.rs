//! `convert`, `plan`, `convert --shard` and `finalize`: the pipeline is chosen for the source
//! (`--pipeline auto` looks at its entries), then the executor runs it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Result};
pub use crate::executor::memory::parse_size;
pub use crate::executor::name_lock::Waiting;
use crate::executor::parts::convert_shard;
pub use crate::executor::parts::{
    finalize, plan_part, FinalizeOptions, Finalized, Shard, ShardArg, ShardReport,
};
use crate::executor::remote::{
    committed_and_current, convert_to_bucket, finalize_in_bucket, shard_task_to_bucket, work_folder,
};
pub use crate::executor::{ConvertOptions, ConvertReport, RunPlan};
use crate::pipeline::embedded::PipelineChoice;
use crate::progress::ProgressMode;
use crate::source::Source;
use crate::writers::bucket::{Bucket, StoreLocation};

/// What the user asked to convert, before the pipeline is chosen.
pub struct Request {
    pub source: PathBuf,
    pub store: StoreLocation,
    pub name: Option<String>,
    pub pipeline: PipelineChoice,
    pub force: bool,
    pub threads: Option<usize>,
    pub max_memory: Option<u64>,
    pub direct_io: bool,
    pub progress: ProgressMode,
    /// What to do when another writer holds the dataset's name: refuse, or wait.
    pub wait: Waiting,
    pub no_space_check: bool,
}

impl Request {
    /// The executor's options, with the pipeline resolved for this source.
    pub fn options(self) -> Result<ConvertOptions> {
        let (pipeline_text, pipeline_file) = match self.pipeline.fixed() {
            Some(fixed) => fixed,
            None => self.pipeline.resolve(&Source::open(&self.source)?)?,
        };
        let (store, bucket) = local_and_bucket(self.store);
        Ok(ConvertOptions {
            source: self.source,
            store,
            bucket,
            name: self.name,
            pipeline_text,
            pipeline_file,
            force: self.force,
            threads: self.threads,
            max_memory: self.max_memory,
            direct_io: self.direct_io,
            progress: self.progress,
            wait: self.wait,
            writer: "convert",
            no_space_check: self.no_space_check,
        })
    }
}

/// The folder the executor writes to, and the bucket it commits to: a bucket store is built in
/// a local work folder first (`executor::remote`).
pub fn local_and_bucket(store: StoreLocation) -> (PathBuf, Option<String>) {
    match store {
        StoreLocation::Local(path) => (path, None),
        StoreLocation::Bucket(url) => (work_folder(&url), Some(url)),
    }
}

pub fn convert(options: &ConvertOptions) -> Result<ConvertReport> {
    match &options.bucket {
        None => crate::executor::convert(options),
        Some(url) => convert_to_bucket(options, Arc::new(Bucket::open(url)?)),
    }
}

/// What would run, and why, without writing anything. For a bucket store: what the local work
/// folder would run, unless the bucket already holds the dataset, committed and current.
pub fn plan(options: &ConvertOptions) -> Result<RunPlan> {
    let mut plan = crate::executor::plan_run(options)?;
    if let Some(url) = &options.bucket {
        let bucket = Bucket::open(url)?;
        bucket.check_name(&plan.dataset)?;
        plan.dataset_dir = PathBuf::from(bucket.url_of(&plan.dataset));
        if committed_and_current(options, &bucket)? {
            plan.up_to_date = true;
            plan.threads = None;
            for stage in &mut plan.stages {
                stage.run = false;
                stage.reason = "up to date in the bucket".into();
            }
        }
    }
    Ok(plan)
}

/// One task of a sharded run: its part of the trials, into the run's shared folder.
pub fn shard_task(options: &ConvertOptions, shard: Shard) -> Result<ShardReport> {
    match &options.bucket {
        None => convert_shard(options, shard),
        Some(url) => shard_task_to_bucket(options, &Bucket::open(url)?, shard),
    }
}

/// `finalize STORE/NAME`, the store a folder or a bucket URL.
pub fn finalize_at(options: &FinalizeOptions, dataset: &str) -> Result<Finalized> {
    match StoreLocation::parse(dataset)? {
        StoreLocation::Local(_) => finalize(options),
        StoreLocation::Bucket(url) => {
            let (store, name) = url
                .rsplit_once('/')
                .filter(|(s, _)| !s.ends_with('/'))
                .ok_or_else(|| {
                    Error::usage(
                        format!("{url}: not a dataset URL"),
                        "give the dataset as s3://bucket/prefix/NAME",
                    )
                })?;
            finalize_in_bucket(options, store, name)
        }
    }
}
