//! Output writers: Zarr v3 arrays and groups, Parquet tables. They know nothing of Sensorium.

pub mod parquet;
pub mod zarr;

/// Where an output lands, and its provenance, shared by all writers.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub tool_version: String,
    pub dataset: String,
    pub source: String,
    pub pipeline: String,
    pub pipeline_hash: String,
}
