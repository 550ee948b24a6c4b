//! Compression settings of the writers' outputs. The pipeline file declares them per stage
//! (`pipeline::spec` re-exports these types), so their serialized form and JSON schema are the
//! pipeline format's.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    pub codec: Codec,
    #[serde(default)]
    pub level: Option<i32>,
    /// Blosc codecs only: the filter before compression, `byte` (the default), `bit` or `none`.
    /// Left out of the serialized form when absent, so existing stage hashes do not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shuffle: Option<Shuffle>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    Zstd,
    Gzip,
    /// Zarr v3 `blosc` codec with LZ4 inside (Zarr arrays only).
    BloscLz4,
    /// Zarr v3 `blosc` codec with zstd inside (Zarr arrays only).
    BloscZstd,
    None,
}

impl Codec {
    pub fn is_blosc(self) -> bool {
        matches!(self, Codec::BloscLz4 | Codec::BloscZstd)
    }
}

/// The blosc shuffle filter: regroups the bytes (or bits) of each element before compressing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Shuffle {
    None,
    Byte,
    Bit,
}
