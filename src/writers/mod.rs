//! Output writers: Zarr v3 arrays and groups, Parquet tables. They know nothing of Sensorium.

pub mod aws_profile;
pub mod bucket;
pub mod codec;
pub mod output_store;
pub mod parquet;
pub mod shard;
pub mod write_behind;
pub mod zarr;

/// Removes the file at `path` if there is one, before a new file is written there. Outputs are
/// new files, never old ones rewritten: a file at that path may be a hard link that a published
/// dataset shares (a reused stage's, a finalized part's), and rewriting it would change that
/// dataset under its readers.
pub fn unlink_existing(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Where an output lands, and its provenance, shared by all writers.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub tool_version: String,
    pub dataset: String,
    pub source: String,
    pub pipeline: String,
    pub pipeline_hash: String,
    /// The stage writing the output, and the hash of its resolved config. Outputs name the
    /// stage's config rather than the whole pipeline's, so editing one stage leaves the other
    /// stages' outputs byte-identical (and reusable).
    pub stage: String,
    pub stage_hash: String,
}
