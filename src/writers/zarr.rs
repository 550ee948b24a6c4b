//! Zarr v3 through `zarrs`, on the local file system.

use std::path::Path;
use std::sync::Arc;

use zarrs::array::codec::api::{BytesToBytesCodecTraits, CodecSpecificOptions};
use zarrs::array::codec::{
    BloscCodec, BloscCompressionLevel, BloscCompressor, BloscShuffleMode, GzipCodec,
    ShardingCodecOptions, SubchunkWriteOrder, ZstdCodec,
};
use zarrs::array::{Array, ArrayBuilder, ArrayBytes, ArrayMetadata, FillValue};
use zarrs::filesystem::FilesystemStore;
use zarrs::group::GroupBuilder;
use zarrs::metadata::v3::ArrayMetadataV3;

use crate::error::{Error, Result};
use crate::npy::{Dtype, Kind};
use crate::writers::codec::{Codec, Compression, Shuffle};
use crate::writers::output_store::{OutputStore, WriteLog};
use crate::writers::shard::ShardLayout;

pub type ZarrArray = Array<OutputStore>;

/// A Zarr v3 store rooted at a `.zarr` folder.
#[derive(Clone)]
pub struct ZarrStore {
    pub root: std::path::PathBuf,
    store: Arc<OutputStore>,
}

/// How to create one array.
pub struct ArraySpec<'a> {
    /// Path inside the store, starting with `/`.
    pub path: &'a str,
    pub shape: Vec<u64>,
    pub dtype: Dtype,
    /// Shard (storage object) shape; `None` for an unsharded array whose chunks are `chunk_shape`.
    pub shard_shape: Option<Vec<u64>>,
    pub chunk_shape: Vec<u64>,
    pub dimension_names: Vec<String>,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub compression: &'a Compression,
}

impl ZarrStore {
    pub fn open(root: &Path, writes: &Arc<WriteLog>) -> Result<ZarrStore> {
        std::fs::create_dir_all(root)
            .map_err(|e| Error::io(root, "cannot create the Zarr store", e))?;
        let store = FilesystemStore::new(root).map_err(|e| {
            Error::Internal(format!("cannot open Zarr store {}: {e}", root.display()))
        })?;
        Ok(ZarrStore {
            root: root.to_path_buf(),
            store: Arc::new(OutputStore::new(store, writes)),
        })
    }

    /// The store objects are written through.
    pub fn output(&self) -> &OutputStore {
        &self.store
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::io(
            &self.root,
            "cannot write the Zarr store",
            std::io::Error::other(format!("{what}: {e}")),
        )
    }

    pub fn write_group(
        &self,
        path: &str,
        attributes: serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        let mut builder = GroupBuilder::new();
        builder.attributes(attributes);
        let group = builder
            .build(self.store.clone(), path)
            .map_err(|e| self.err(path, e))?;
        group.store_metadata().map_err(|e| self.err(path, e))
    }

    /// Creates an array: its metadata (`zarr.json`) is written, its chunks are not.
    pub fn create_array(&self, spec: &ArraySpec) -> Result<ZarrArray> {
        let array = self.array(spec)?;
        array.store_metadata().map_err(|e| self.err(spec.path, e))?;
        Ok(array)
    }

    /// An array handle for writing chunks, without writing its metadata: a shard task of a
    /// sharded run writes chunks only, `finalize` writes the metadata once.
    pub fn array(&self, spec: &ArraySpec) -> Result<ZarrArray> {
        builder(spec)?
            .build(self.store.clone(), spec.path)
            .map_err(|e| self.err(spec.path, e))
    }
}

/// The metadata an array of `spec` is created with, without a store: what `encoder_layout`
/// reads, for estimates made before any array exists.
pub fn array_metadata(spec: &ArraySpec) -> Result<ArrayMetadataV3> {
    builder(spec)?
        .build_metadata()
        .map_err(|e| Error::Internal(format!("array {}: {e}", spec.path)))
}

/// How `writers::shard` encodes the array's shards (its chunk, if unsharded), read from the
/// metadata the array was built with; `None`: `zarrs` encodes them.
pub fn encoder_layout(array: &ZarrArray) -> Option<ShardLayout> {
    let ArrayMetadata::V3(metadata) = array.metadata() else {
        return None;
    };
    ShardLayout::from_metadata(metadata)
}

/// The one place an array's metadata is put together, for `ZarrStore::array` and
/// `array_metadata`.
fn builder(spec: &ArraySpec) -> Result<ArrayBuilder> {
    let (grid, inner) = match &spec.shard_shape {
        Some(shard) => (shard.clone(), Some(spec.chunk_shape.clone())),
        None => (spec.chunk_shape.clone(), None),
    };
    let mut builder = ArrayBuilder::new(
        spec.shape.clone(),
        grid,
        zarr_data_type(spec.dtype)?,
        FillValue::new(fill_value(spec.dtype)),
    );
    builder
        .subchunk_shape(inner)
        .bytes_to_bytes_codecs(codecs(spec.compression, spec.dtype.size)?)
        .dimension_names(Some(spec.dimension_names.clone()))
        .attributes(spec.attributes.clone())
        // Inner chunks are written in C order, not in the order threads finish them, so a
        // shard's bytes are the same whatever the thread count (determinism).
        .codec_specific_options(CodecSpecificOptions::default().with_option(
            ShardingCodecOptions::default().with_subchunk_write_order(SubchunkWriteOrder::C),
        ));
    Ok(builder)
}

/// Stores one chunk (a whole shard for sharded arrays) from little-endian C-order bytes.
pub fn store_chunk(array: &ZarrArray, indices: &[u64], bytes: Vec<u8>) -> Result<()> {
    array
        .store_chunk(indices, ArrayBytes::from(bytes))
        .map_err(|e| {
            Error::io(
                array.path().as_str(),
                "cannot write a Zarr chunk",
                std::io::Error::other(e.to_string()),
            )
        })
}

fn zarr_data_type(dtype: Dtype) -> Result<&'static str> {
    Ok(match (dtype.kind, dtype.size) {
        (Kind::Float, 2) => "float16",
        (Kind::Float, 4) => "float32",
        (Kind::Float, 8) => "float64",
        (Kind::Int, 1) => "int8",
        (Kind::Int, 2) => "int16",
        (Kind::Int, 4) => "int32",
        (Kind::Int, 8) => "int64",
        (Kind::UInt, 1) => "uint8",
        (Kind::UInt, 2) => "uint16",
        (Kind::UInt, 4) => "uint32",
        (Kind::UInt, 8) => "uint64",
        (Kind::Bool, 1) => "bool",
        _ => {
            return Err(Error::Internal(format!(
                "dtype {dtype} has no Zarr array form"
            )))
        }
    })
}

/// NaN for floats (so a padded trial reads as missing), zero otherwise. Native-endian bytes.
fn fill_value(dtype: Dtype) -> Vec<u8> {
    match (dtype.kind, dtype.size) {
        (Kind::Float, 2) => vec![0x00, 0x7e],
        (Kind::Float, 4) => f32::NAN.to_ne_bytes().to_vec(),
        (Kind::Float, 8) => f64::NAN.to_ne_bytes().to_vec(),
        (_, size) => vec![0; size],
    }
}

/// The fill bytes of one element, as stored (little endian).
pub fn fill_bytes(dtype: Dtype) -> Vec<u8> {
    fill_value(dtype)
}

/// The bytes-to-bytes codecs of a compression setting; `typesize` (bytes per element) is what
/// blosc's shuffle regroups by.
fn codecs(c: &Compression, typesize: usize) -> Result<Vec<Arc<dyn BytesToBytesCodecTraits>>> {
    let blosc = |cname| -> Result<Vec<Arc<dyn BytesToBytesCodecTraits>>> {
        let level = u8::try_from(c.level.unwrap_or(5))
            .ok()
            .and_then(|l| BloscCompressionLevel::try_from(l).ok())
            .ok_or_else(|| Error::Internal(format!("blosc level {:?}", c.level)))?;
        let shuffle = match c.shuffle.unwrap_or(Shuffle::Byte) {
            Shuffle::None => BloscShuffleMode::NoShuffle,
            Shuffle::Byte => BloscShuffleMode::Shuffle,
            Shuffle::Bit => BloscShuffleMode::BitShuffle,
        };
        let codec = BloscCodec::new(cname, level, None, shuffle, Some(typesize))
            .map_err(|e| Error::Internal(format!("blosc codec: {e}")))?;
        Ok(vec![Arc::new(codec)])
    };
    Ok(match c.codec {
        Codec::BloscLz4 => blosc(BloscCompressor::LZ4)?,
        Codec::BloscZstd => blosc(BloscCompressor::Zstd)?,
        Codec::Zstd => vec![Arc::new(ZstdCodec::new(c.level.unwrap_or(3), false))],
        Codec::Gzip => vec![Arc::new(
            GzipCodec::new(c.level.unwrap_or(6) as u32)
                .map_err(|e| Error::Internal(format!("gzip level: {e}")))?,
        )],
        Codec::None => vec![],
    })
}

/// A path in a dataset folder that leads into a Zarr store: `data.zarr/statistics/videos` is
/// the node `statistics/videos` of the store `data.zarr`. The store is the first path part that
/// ends in `.zarr`. The one place such paths are parsed, so a pipeline's check, the stages that
/// write and the groups written around them cannot disagree on where a store begins.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ZarrPath {
    /// The store folder, relative to the dataset folder.
    pub store: String,
    /// The node inside the store, `/`-separated; empty for the store's root group.
    pub node: String,
}

impl ZarrPath {
    /// `None` when no part of the path is a `.zarr` folder.
    pub fn parse(path: &str) -> Option<ZarrPath> {
        let parts: Vec<&str> = path.split('/').collect();
        let at = parts
            .iter()
            .position(|p| p.len() > ".zarr".len() && p.ends_with(".zarr"))?;
        Some(ZarrPath {
            store: parts[..=at].join("/"),
            node: parts[at + 1..].join("/"),
        })
    }

    pub fn is_root(&self) -> bool {
        self.node.is_empty()
    }

    /// The node as the store names it: `/statistics/videos`, or `/` for the root group.
    pub fn node_path(&self) -> String {
        format!("/{}", self.node)
    }

    /// The node's `zarr.json`, relative to the dataset folder.
    pub fn metadata_file(&self) -> String {
        match self.is_root() {
            true => format!("{}/zarr.json", self.store),
            false => format!("{}/{}/zarr.json", self.store, self.node),
        }
    }

    /// The node `name` below this one.
    pub fn join(&self, name: &str) -> ZarrPath {
        let node = match self.is_root() {
            true => name.to_string(),
            false => format!("{}/{name}", self.node),
        };
        ZarrPath {
            store: self.store.clone(),
            node,
        }
    }

    /// Every group above the node, from the root group down (not the node itself).
    pub fn ancestors(&self) -> Vec<ZarrPath> {
        let parts: Vec<&str> = self.node.split('/').filter(|p| !p.is_empty()).collect();
        (0..parts.len())
            .map(|depth| ZarrPath {
                store: self.store.clone(),
                node: parts[..depth].join("/"),
            })
            .collect()
    }
}

#[cfg(test)]
mod zarr_path_tests {
    use super::ZarrPath;

    #[test]
    fn the_store_is_the_first_part_ending_in_zarr() {
        let p = ZarrPath::parse("data.zarr/statistics/videos").unwrap_or_else(|| panic!("parse"));
        assert_eq!(
            (p.store.as_str(), p.node.as_str()),
            ("data.zarr", "statistics/videos")
        );
        assert_eq!(p.node_path(), "/statistics/videos");
        assert_eq!(p.metadata_file(), "data.zarr/statistics/videos/zarr.json");
        let ancestors: Vec<String> = p.ancestors().iter().map(|a| a.node_path()).collect();
        assert_eq!(ancestors, ["/", "/statistics"]);
        let root = ZarrPath::parse("out/s.zarr").unwrap_or_else(|| panic!("parse"));
        assert!(root.is_root());
        assert_eq!(root.metadata_file(), "out/s.zarr/zarr.json");
        for not_zarr in ["s.zarrx/a", "trials.parquet", ".zarr/a", "data/zarr/a"] {
            assert_eq!(ZarrPath::parse(not_zarr), None, "{not_zarr}");
        }
    }
}
