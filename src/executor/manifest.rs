//! `manifest.json`: what was read, where it went, and checksums of everything written.
//! Written last: a dataset folder without it is not complete.

use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "sensorium-ingest-manifest/1";
pub const FILE_NAME: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub tool: Tool,
    pub dataset: String,
    pub source: SourceInfo,
    pub pipeline: PipelineInfo,
    pub counts: Counts,
    /// Length of every named dimension (trial, neuron, frame, height, ...).
    pub dimensions: std::collections::BTreeMap<String, u64>,
    pub entries: Vec<EntryInfo>,
    pub outputs: Vec<OutputInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceInfo {
    pub name: String,
    /// BLAKE3 over every entry's path and content hash: equal for an archive and its extraction.
    pub checksum: String,
    pub entries: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PipelineInfo {
    pub name: String,
    pub hash: String,
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Counts {
    pub trials: usize,
    pub neurons: Option<u64>,
    pub frames: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EntryInfo {
    pub path: String,
    /// `converted` or `skipped`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub output: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shape: Option<Vec<u64>>,
    pub bytes: u64,
    pub blake3: String,
    /// BLAKE3 of the values as stored in a Zarr array (little endian, C order).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub values_blake3: Option<String>,
    /// Position on the output's trial axis.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub index: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputInfo {
    /// File path relative to the dataset folder.
    pub path: String,
    pub bytes: u64,
    pub blake3: String,
}

/// BLAKE3 of a source: over `path\0hash\n` lines of every entry, sorted by path.
pub fn source_checksum(entries: &[EntryInfo]) -> String {
    let mut hasher = blake3::Hasher::new();
    for e in entries {
        hasher.update(e.path.as_bytes());
        hasher.update(b"\0");
        hasher.update(e.blake3.as_bytes());
        hasher.update(b"\n");
    }
    format!("blake3:{}", hasher.finalize().to_hex())
}
