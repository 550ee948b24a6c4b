//! The pipeline file (`spec`: top-level keys and the stages, each its kind's config), the
//! pipelines embedded in the binary and `--pipeline auto` (`embedded`), and the plan a pipeline
//! makes for one source (`plan`): which entry feeds which stage, checked before anything is
//! written.

pub mod embedded;
pub mod plan;
pub mod spec;
