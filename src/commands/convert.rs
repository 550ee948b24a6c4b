//! `convert`, `plan`, `convert --shard` and `finalize`: the pipeline is chosen for the source
//! (`--pipeline auto` looks at its entries), then the executor runs it.

use std::path::PathBuf;

use crate::error::Result;
pub use crate::executor::memory::parse_size;
pub use crate::executor::name_lock::Waiting;
use crate::executor::parts::convert_shard;
pub use crate::executor::parts::{
    finalize, plan_part, FinalizeOptions, Finalized, Shard, ShardArg, ShardReport,
};
pub use crate::executor::{ConvertOptions, ConvertReport, RunPlan};
use crate::pipeline::embedded::PipelineChoice;
use crate::progress::ProgressMode;
use crate::source::Source;

/// What the user asked to convert, before the pipeline is chosen.
pub struct Request {
    pub source: PathBuf,
    pub store: PathBuf,
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
        Ok(ConvertOptions {
            source: self.source,
            store: self.store,
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

pub fn convert(options: &ConvertOptions) -> Result<ConvertReport> {
    crate::executor::convert(options)
}

/// What would run, and why, without writing anything.
pub fn plan(options: &ConvertOptions) -> Result<RunPlan> {
    crate::executor::plan_run(options)
}

/// One task of a sharded run: its part of the trials, into the run's shared folder.
pub fn shard_task(options: &ConvertOptions, shard: Shard) -> Result<ShardReport> {
    convert_shard(options, shard)
}
