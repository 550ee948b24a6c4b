//! The pipeline: its file (`spec`), the plan it makes for one source (`plan`) and the runner.

pub mod embedded;
pub mod keys;
pub mod memory;
pub mod plan;
pub mod runner;
pub mod shards;
pub mod spec;
