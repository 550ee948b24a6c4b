//! Shards of a sharded Zarr array encoded here, when that is simple, instead of by `zarrs`'
//! sharding codec: the inner chunks are contiguous byte ranges of the shard (chunked along at
//! most one axis, whole along the ones after it: the default pipeline's arrays) and the codec is
//! zstd or none.
//!
//! Why: for every inner chunk, `zarrs` copies the chunk out of the shard, makes a new zstd
//! context, compresses into a new buffer, copies that once more, and then assembles the shard in
//! a new buffer of the shard's size. Those are fresh pages the kernel must clear, and the page
//! clearing grows with the thread count (docs/performance.md, "Own shard encoder, zarrs for the
//! rest"). Here each thread keeps one zstd
//! context and one output buffer for a whole stage, and zstd writes each chunk straight into
//! it; a shard may be given a few chunks at a time (`begin`, `add_chunks`, `finish`), so the
//! caller need not hold the shard's raw values at once.
//!
//! What is written comes from the array's own metadata, read in one place
//! (`ShardLayout::from_metadata`), so the bytes are the ones `zarrs` writes for that metadata:
//! inner chunks in C order through `bytes` (little endian) and optionally `zstd` (same library
//! and settings), all-fill chunks left out, an index of `(offset, nbytes)` little-endian `u64`
//! pairs with `u64::MAX` for absent chunks, optionally followed by its CRC-32C, at the start or
//! the end of the shard. Metadata outside that set gives `None`, and `zarrs` encodes the
//! shards. Unit tests compare the bytes with `zarrs`' own and read them back through `zarrs`;
//! `verify` and the Python tests read the arrays with `zarrs` and zarr-python.

use zarrs::array::DataType;
use zarrs::metadata::v3::{ArrayMetadataV3, MetadataV3};
use zarrs::metadata::Endianness;
use zarrs::metadata_ext::chunk_grid::regular::RegularChunkGridConfiguration;
use zarrs::metadata_ext::codec::bytes::BytesCodecConfiguration;
use zarrs::metadata_ext::codec::sharding::{ShardingCodecConfiguration, ShardingIndexLocation};
use zarrs::metadata_ext::codec::zstd::ZstdCodecConfiguration;
use zstd::zstd_safe::{zstd_sys::ZSTD_EndDirective, InBuffer, OutBuffer};

/// Direct I/O wants the object to start on this boundary (`output_store`).
const ALIGN: usize = 4096;

/// zstd's settings for the inner chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Zstd {
    level: i32,
    /// A content checksum at the end of each frame.
    checksum: bool,
}

/// A shard's index: where it goes, and whether its CRC-32C follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Index {
    at_start: bool,
    crc32c: bool,
}

impl Index {
    /// The index codecs this module writes: `bytes` little endian, then `crc32c` or nothing.
    fn from_codecs(codecs: &[MetadataV3], location: ShardingIndexLocation) -> Option<Index> {
        let (bytes, rest) = codecs.split_first()?;
        if !is_little_endian_bytes(bytes, 8) {
            return None;
        }
        let crc32c = match rest {
            [] => false,
            [crc] if crc.name() == "crc32c" && crc.configuration_is_none_or_empty() => true,
            _ => return None,
        };
        Some(Index {
            at_start: location == ShardingIndexLocation::Start,
            crc32c,
        })
    }

    /// Encoded size for a shard of `chunks` chunks.
    fn bytes(self, chunks: usize) -> usize {
        chunks * 16 + if self.crc32c { 4 } else { 0 }
    }
}

/// How one array's shards are laid out and compressed, when this module can encode them.
#[derive(Debug, Clone)]
pub struct ShardLayout {
    chunk_bytes: usize,
    chunks: usize,
    /// One element of the fill value, as stored.
    fill: Vec<u8>,
    /// `None`: chunks stored as they are.
    zstd: Option<Zstd>,
    /// `None`: an unsharded array, whose one chunk is stored without an index (`encode_chunk`).
    index: Option<Index>,
}

impl ShardLayout {
    /// The layout `zarrs` writes for an array of this metadata: sharded with one
    /// `sharding_indexed` codec, or unsharded with the inner codecs below. `None` when the
    /// chunks must go through `zarrs`: inner chunks that are not contiguous in the shard, inner
    /// codecs other than `bytes` (little endian) with optional `zstd`, index codecs other than
    /// `bytes` (little endian) with optional `crc32c`, or any other codec or transformer.
    pub fn from_metadata(metadata: &ArrayMetadataV3) -> Option<ShardLayout> {
        // The fill is compared with the chunks' little-endian bytes in its native form.
        if cfg!(target_endian = "big") || !metadata.storage_transformers.is_empty() {
            return None;
        }
        let grid = regular_chunk_shape(&metadata.chunk_grid)?;
        let data_type = DataType::from_metadata(&metadata.data_type).ok()?;
        let element_bytes = data_type.fixed_size()?;
        let fill = data_type.fill_value_v3(&metadata.fill_value).ok()?;
        let fill = fill.as_ne_bytes();
        match metadata.codecs.as_slice() {
            [sharding] if sharding.name() == "sharding_indexed" => {
                let config = sharding.to_typed_configuration().ok()?;
                let ShardingCodecConfiguration::V1(config) = config else {
                    return None;
                };
                let index = Index::from_codecs(&config.index_codecs, config.index_location)?;
                let zstd = inner_codecs(&config.codecs, element_bytes)?;
                let inner: Vec<u64> = config.chunk_shape.iter().map(|d| d.get()).collect();
                let layout = Self::contiguous(&grid, &inner, element_bytes, fill, zstd)?;
                Some(ShardLayout {
                    index: Some(index),
                    ..layout
                })
            }
            codecs => {
                let zstd = inner_codecs(codecs, element_bytes)?;
                Self::contiguous(&grid, &grid, element_bytes, fill, zstd)
            }
        }
    }

    /// An index-less layout of `shard_shape` cut into `chunk_shape` chunks, when each chunk is
    /// one byte range of the shard.
    fn contiguous(
        shard_shape: &[u64],
        chunk_shape: &[u64],
        element_bytes: usize,
        fill: &[u8],
        zstd: Option<Zstd>,
    ) -> Option<ShardLayout> {
        if shard_shape.len() != chunk_shape.len()
            || fill.len() != element_bytes
            || element_bytes == 0
        {
            return None;
        }
        // Contiguous chunks: extent 1 before some axis, the whole shard's extent after it.
        let split = chunk_shape.iter().position(|&c| c != 1).unwrap_or(0);
        let contiguous = shard_shape
            .iter()
            .zip(chunk_shape)
            .enumerate()
            .all(|(axis, (&s, &c))| c > 0 && s % c == 0 && (axis <= split || c == s));
        if !contiguous {
            return None;
        }
        let chunk_elements = usize::try_from(chunk_shape.iter().product::<u64>()).ok()?;
        let shard_elements = usize::try_from(shard_shape.iter().product::<u64>()).ok()?;
        Some(ShardLayout {
            chunk_bytes: chunk_elements.checked_mul(element_bytes)?,
            chunks: shard_elements / chunk_elements,
            fill: fill.to_vec(),
            zstd,
            index: None,
        })
    }

    /// The most bytes one encoded chunk can take.
    fn chunk_bound(&self) -> usize {
        match self.zstd {
            // The frame checksum is 4 bytes past zstd's bound for the data.
            Some(zstd) => {
                zstd::zstd_safe::compress_bound(self.chunk_bytes) + 4 * usize::from(zstd.checksum)
            }
            None => self.chunk_bytes,
        }
    }

    /// The encoded index's size; 0 for an unsharded array.
    fn index_bytes(&self) -> usize {
        self.index.map_or(0, |index| index.bytes(self.chunks))
    }

    fn is_fill(&self, chunk: &[u8]) -> bool {
        chunk
            .chunks_exact(self.fill.len())
            .all(|element| element == self.fill.as_slice())
    }
}

/// The chunk shape of a `regular` chunk grid.
fn regular_chunk_shape(grid: &MetadataV3) -> Option<Vec<u64>> {
    if grid.name() != "regular" {
        return None;
    }
    let config: RegularChunkGridConfiguration = grid.to_typed_configuration().ok()?;
    Some(config.chunk_shape.iter().map(|d| d.get()).collect())
}

/// The zstd settings of inner codecs this module writes, `bytes` (little endian) then `zstd` or
/// nothing (`Some(None)`); `None` for any other codecs.
fn inner_codecs(codecs: &[MetadataV3], element_bytes: usize) -> Option<Option<Zstd>> {
    let (bytes, rest) = codecs.split_first()?;
    if !is_little_endian_bytes(bytes, element_bytes) {
        return None;
    }
    match rest {
        [] => Some(None),
        [zstd] if zstd.name() == "zstd" => match zstd.to_typed_configuration().ok()? {
            ZstdCodecConfiguration::V1(config) => Some(Some(Zstd {
                level: config.level.into(),
                checksum: config.checksum,
            })),
            _ => None,
        },
        _ => None,
    }
}

/// A `bytes` codec writing little endian (or any order, for one-byte elements).
fn is_little_endian_bytes(codec: &MetadataV3, element_bytes: usize) -> bool {
    if codec.name() != "bytes" {
        return false;
    }
    match codec.to_typed_configuration() {
        Ok(BytesCodecConfiguration::V1(config)) => match config.endian {
            Some(endian) => endian == Endianness::Little,
            None => element_bytes == 1,
        },
        _ => false,
    }
}

/// One thread's encoder: kept for a whole stage, so its buffers and zstd context are reused.
#[derive(Default)]
pub struct ShardEncoder {
    compressor: Compressor,
    out: Vec<u8>,
    /// Where the last object encoded starts in `out`, until it is taken.
    object_start: Option<usize>,
    /// Where the shard being encoded starts in `out`, between `begin` and `finish`.
    shard: Option<usize>,
    /// Each chunk's encoded length so far (`None`: all fill, left out).
    lens: Vec<Option<usize>>,
}

impl ShardEncoder {
    /// Starts a shard, whose chunks are then given in C order by `add_chunks`, in as many
    /// pieces as the caller likes: it need not hold the whole shard at once.
    /// An unsharded layout starts no shard: its chunks are given to `encode_chunk`.
    pub fn begin(&mut self, layout: &ShardLayout) {
        let index_bytes = layout.index_bytes();
        let start = self.start_object(layout.chunk_bound() * layout.chunks + index_bytes);
        if let Some(index) = layout.index {
            if index.at_start {
                // Room for the index, written by `finish` once the chunks' lengths are known.
                self.out.resize(start + index_bytes, 0);
            }
            self.shard = Some(start);
        }
        self.lens.clear();
    }

    /// Encodes the shard's next chunks: `bytes` holds a whole number of them.
    pub fn add_chunks(&mut self, layout: &ShardLayout, bytes: &[u8]) -> std::io::Result<()> {
        let chunk_bytes = layout.chunk_bytes.max(1);
        let added = bytes.len() / chunk_bytes;
        if self.shard.is_none()
            || bytes.len() % chunk_bytes != 0
            || self.lens.len() + added > layout.chunks
        {
            return Err(std::io::Error::other(format!(
                "{} bytes added to a shard of {} chunks of {} bytes, {} chunks in",
                bytes.len(),
                layout.chunks,
                layout.chunk_bytes,
                self.lens.len()
            )));
        }
        self.compressor
            .append_chunks(layout, bytes, &mut self.out, &mut self.lens)
    }

    /// Appends the shard's next chunks, encoded elsewhere by `Compressor::encode_run`.
    pub fn append_run(&mut self, layout: &ShardLayout, run: &EncodedRun) -> std::io::Result<()> {
        if self.shard.is_none() || self.lens.len() + run.lens.len() > layout.chunks {
            return Err(std::io::Error::other(format!(
                "{} encoded chunks added to a shard of {} chunks, {} chunks in",
                run.lens.len(),
                layout.chunks,
                self.lens.len()
            )));
        }
        self.out.extend_from_slice(&run.bytes);
        self.lens.extend_from_slice(&run.lens);
        Ok(())
    }

    /// Ends the shard with its index. Returns the encoded shard, starting on a page boundary,
    /// or `None` when every chunk was fill: `zarrs` stores no object then.
    pub fn finish(&mut self, layout: &ShardLayout) -> std::io::Result<Option<&[u8]>> {
        let (start, index) = match (self.shard.take(), layout.index) {
            (Some(start), Some(index)) if self.lens.len() == layout.chunks => (start, index),
            _ => {
                return Err(std::io::Error::other(format!(
                    "a shard finished with {} of its {} chunks",
                    self.lens.len(),
                    layout.chunks
                )))
            }
        };
        if self.lens.iter().all(Option::is_none) {
            return Ok(None);
        }
        let first = if index.at_start {
            layout.index_bytes() as u64
        } else {
            0
        };
        let encoded = encode_index(&self.lens, first, index.crc32c);
        if index.at_start {
            self.out[start..start + encoded.len()].copy_from_slice(&encoded);
        } else {
            self.out.extend_from_slice(&encoded);
        }
        self.object_start = Some(start);
        Ok(Some(&self.out[start..]))
    }

    /// Encodes the one chunk of an unsharded array (`layout` of its metadata) as `zarrs` stores
    /// it: the codecs' output alone, no index.
    /// `None` when the chunk is all fill (`zarrs` stores no object then).
    pub fn encode_chunk(
        &mut self,
        layout: &ShardLayout,
        chunk: &[u8],
    ) -> std::io::Result<Option<&[u8]>> {
        self.object_start = None;
        if layout.index.is_some() || layout.chunks != 1 || chunk.len() != layout.chunk_bytes {
            return Err(std::io::Error::other(format!(
                "a chunk of {} bytes, the layout takes {} chunks of {}{}",
                chunk.len(),
                layout.chunks,
                layout.chunk_bytes,
                if layout.index.is_some() {
                    " in shards"
                } else {
                    ""
                }
            )));
        }
        if layout.is_fill(chunk) {
            return Ok(None);
        }
        let start = self.start_object(layout.chunk_bound());
        self.compressor
            .append(layout, &[chunk], &[true], &mut self.out, &mut Vec::new())?;
        self.object_start = Some(start);
        Ok(Some(&self.out[start..]))
    }

    /// Takes the buffer holding the object encoded last, and where the object starts in it
    /// (`None`: the last call encoded no object, or it was taken already). The encoder has no
    /// buffer until it is given one back (`give_back`), or makes a new one.
    pub fn take_object(&mut self) -> Option<(Vec<u8>, usize)> {
        let start = self.object_start.take()?;
        Some((std::mem::take(&mut self.out), start))
    }

    /// Returns a buffer from `take_object`, to be reused.
    pub fn give_back(&mut self, buffer: Vec<u8>) {
        if buffer.capacity() > self.out.capacity() {
            self.out = buffer;
        }
    }

    /// Empties the output buffer and reserves room for an object of up to `bound` bytes after a
    /// page boundary, all at once, so the buffer does not move while the object is appended and
    /// the object starts on the boundary (direct I/O). Returns where it starts.
    fn start_object(&mut self, bound: usize) -> usize {
        self.object_start = None;
        self.shard = None;
        self.out.clear();
        self.out.reserve(ALIGN + bound);
        let start = self.out.as_ptr().align_offset(ALIGN);
        self.out.resize(start, 0);
        start
    }
}

/// A shard's index: `(offset, nbytes)` little-endian pairs, offsets from the shard's start
/// (the chunks start at `first`), all ones for a chunk left out; then its CRC-32C if `crc32c`.
fn encode_index(lens: &[Option<usize>], first: u64, crc32c: bool) -> Vec<u8> {
    let mut index = Vec::with_capacity(lens.len() * 16 + 4);
    let mut offset = first;
    for len in lens {
        let (at, len) = match *len {
            Some(len) => {
                offset += len as u64;
                (offset - len as u64, len as u64)
            }
            None => (u64::MAX, u64::MAX),
        };
        index.extend_from_slice(&at.to_le_bytes());
        index.extend_from_slice(&len.to_le_bytes());
    }
    if crc32c {
        let checksum = crc32c::crc32c(&index);
        index.extend_from_slice(&checksum.to_le_bytes());
    }
    index
}

/// Encoded chunks appended one after the other, and each chunk's encoded length (`None`: all
/// fill, left out): a piece of a shard encoded on another thread than the shard's own, put into
/// the shard in order by `ShardEncoder::append_run`.
#[derive(Default)]
pub struct EncodedRun {
    bytes: Vec<u8>,
    lens: Vec<Option<usize>>,
}

/// A zstd context made on first use and kept.
#[derive(Default)]
pub struct Compressor {
    /// The context and the settings it was made for.
    zstd: Option<(Zstd, zstd::bulk::Compressor<'static>)>,
}

impl Compressor {
    /// Encodes `bytes` (whole chunks of `layout`, in C order) into `run`, replacing what it
    /// held (its buffers are reused).
    pub fn encode_run(
        &mut self,
        layout: &ShardLayout,
        bytes: &[u8],
        run: &mut EncodedRun,
    ) -> std::io::Result<()> {
        let chunk_bytes = layout.chunk_bytes.max(1);
        if bytes.len() % chunk_bytes != 0 {
            return Err(std::io::Error::other(format!(
                "{} bytes to encode, not whole chunks of {chunk_bytes}",
                bytes.len()
            )));
        }
        run.bytes.clear();
        run.lens.clear();
        // Room for the bound of every chunk at once: the bytes are never moved while appended.
        run.bytes
            .reserve(layout.chunk_bound() * (bytes.len() / chunk_bytes));
        self.append_chunks(layout, bytes, &mut run.bytes, &mut run.lens)
    }

    /// `append` for `bytes` cut into whole chunks of `layout` (the caller has checked that they
    /// are), all-fill chunks left out.
    fn append_chunks(
        &mut self,
        layout: &ShardLayout,
        bytes: &[u8],
        out: &mut Vec<u8>,
        lens: &mut Vec<Option<usize>>,
    ) -> std::io::Result<()> {
        let chunks: Vec<&[u8]> = bytes.chunks_exact(layout.chunk_bytes.max(1)).collect();
        let kept: Vec<bool> = chunks.iter().map(|c| !layout.is_fill(c)).collect();
        self.append(layout, &chunks, &kept, out, lens)
    }

    /// The kept context when it was made for `settings`, else a new one.
    fn context(&mut self, settings: Zstd) -> std::io::Result<&mut zstd::bulk::Compressor<'static>> {
        let kept = self
            .zstd
            .take()
            .filter(|(made_for, _)| *made_for == settings);
        let kept = match kept {
            Some(kept) => kept,
            None => {
                let mut zstd = zstd::bulk::Compressor::new(settings.level)?;
                // As `zarrs` sets it: a frame checksum only when the metadata asks for one.
                zstd.include_checksum(settings.checksum)?;
                (settings, zstd)
            }
        };
        Ok(&mut self.zstd.insert(kept).1)
    }

    /// Encodes the `kept` ones of `chunks` onto the end of `bytes`, and pushes each chunk's
    /// encoded length (`None`: left out) onto `lens`.
    fn append(
        &mut self,
        layout: &ShardLayout,
        chunks: &[&[u8]],
        kept: &[bool],
        bytes: &mut Vec<u8>,
        lens: &mut Vec<Option<usize>>,
    ) -> std::io::Result<()> {
        for (chunk, &keep) in chunks.iter().zip(kept) {
            if !keep {
                lens.push(None);
                continue;
            }
            let Some(settings) = layout.zstd else {
                bytes.extend_from_slice(chunk);
                lens.push(Some(chunk.len()));
                continue;
            };
            let zstd = self.context(settings)?;
            // Straight onto the end of `bytes`, in the spare capacity (not zeroed first): with
            // room for the bound and the whole input given with `e_end`, zstd compresses in one
            // pass, as `ZSTD_compress2` (zarrs' call) does, to the same bytes.
            let before = bytes.len();
            bytes.reserve(layout.chunk_bound());
            let mut output = OutBuffer::around_pos(bytes, before);
            let mut input = InBuffer::around(chunk);
            let left = zstd.context_mut().compress_stream2(
                &mut output,
                &mut input,
                ZSTD_EndDirective::ZSTD_e_end,
            );
            let written = output.pos() - before;
            let problem = match left {
                Ok(0) if input.pos() == chunk.len() => None,
                Ok(_) => Some("zstd did not finish a chunk within its bound".to_string()),
                Err(code) => Some(zstd::zstd_safe::get_error_name(code).to_string()),
            };
            if let Some(problem) = problem {
                // The context is left inside an unfinished frame: the next chunk gets a new one.
                self.zstd = None;
                return Err(std::io::Error::other(problem));
            }
            lens.push(Some(written));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use serde_json::{json, Value};
    use zarrs::array::codec::api::CodecSpecificOptions;
    use zarrs::array::codec::{ShardingCodecOptions, SubchunkWriteOrder};
    use zarrs::array::{Array, ArrayBytes};
    use zarrs::filesystem::FilesystemStore;

    use super::*;
    use crate::npy::{Dtype, Kind};
    use crate::writers::codec::{Codec, Compression};
    use crate::writers::output_store::WriteLog;
    use crate::writers::zarr::{array_metadata, encoder_layout, ArraySpec, ZarrStore};

    const F32: Dtype = Dtype {
        kind: Kind::Float,
        size: 4,
        big_endian: false,
    };

    fn compression(codec: Codec, level: Option<i32>) -> Compression {
        Compression {
            codec,
            level,
            shuffle: None,
        }
    }

    fn spec<'a>(shard: Option<&[u64]>, chunk: &[u64], c: &'a Compression) -> ArraySpec<'a> {
        ArraySpec {
            path: "/a",
            shape: shard.unwrap_or(chunk).to_vec(),
            dtype: F32,
            shard_shape: shard.map(<[u64]>::to_vec),
            chunk_shape: chunk.to_vec(),
            dimension_names: (0..chunk.len()).map(|i| format!("d{i}")).collect(),
            attributes: serde_json::Map::new(),
            compression: c,
        }
    }

    /// The layout of the metadata the writers give one shard of `shard` shape (`None`: an
    /// unsharded array of one `chunk`).
    fn layout_of(shard: Option<&[u64]>, chunk: &[u64], c: &Compression) -> Option<ShardLayout> {
        ShardLayout::from_metadata(&array_metadata(&spec(shard, chunk, c)).expect("metadata"))
    }

    /// A shard's worth of float32 values: a few chunks all NaN (the fill), the others
    /// compressible but not constant.
    fn shard_values(shard: &[u64], chunk_elements: usize, fill_chunks: &[usize]) -> Vec<u8> {
        let n: u64 = shard.iter().product();
        (0..n as usize)
            .map(|i| {
                if fill_chunks.contains(&(i / chunk_elements)) {
                    f32::NAN
                } else {
                    ((i * 7919) % 1000) as f32 / 8.0
                }
            })
            .flat_map(f32::to_le_bytes)
            .collect()
    }

    /// A whole shard in one piece.
    fn encode_whole<'e>(
        encoder: &'e mut ShardEncoder,
        layout: &ShardLayout,
        shard: &[u8],
    ) -> std::io::Result<Option<&'e [u8]>> {
        encoder.begin(layout);
        encoder.add_chunks(layout, shard)?;
        encoder.finish(layout)
    }

    /// The shard `encoder` was given, finished: its bytes, or `None` if all fill.
    fn finished(encoder: &mut ShardEncoder, layout: &ShardLayout) -> Option<Vec<u8>> {
        encoder
            .finish(layout)
            .expect("finishes")
            .map(<[u8]>::to_vec)
    }

    /// What zarrs itself writes for this shard (the file of chunk 0), or `None` if it stores
    /// nothing; and the layout read from the array's metadata.
    fn zarrs_bytes(
        dir: &std::path::Path,
        shard: &[u64],
        chunk: &[u64],
        c: &Compression,
        values: &[u8],
    ) -> (Option<Vec<u8>>, Option<ShardLayout>) {
        let store = ZarrStore::open(dir, &WriteLog::new(false)).expect("store");
        let array = store
            .create_array(&spec(Some(shard), chunk, c))
            .expect("array");
        let zeros = vec![0; shard.len()];
        array
            .store_chunk(&zeros, ArrayBytes::from(values.to_vec()))
            .expect("zarrs stores the shard");
        let key = array.chunk_key(&zeros);
        let bytes = std::fs::read(dir.join(key.as_str())).ok();
        (bytes, encoder_layout(&array))
    }

    #[test]
    fn shards_are_byte_identical_to_zarrs() {
        // (shard shape, chunk shape, compression, chunks left all fill)
        type Case = (Vec<u64>, Vec<u64>, Compression, Vec<usize>);
        let cases: Vec<Case> = vec![
            // The default pipeline's shapes, scaled down: whole trials, and rows of a trial.
            (
                vec![4, 6, 8, 10],
                vec![1, 6, 8, 10],
                compression(Codec::Zstd, Some(1)),
                vec![],
            ),
            (
                vec![3, 64, 20],
                vec![1, 16, 20],
                compression(Codec::Zstd, Some(1)),
                vec![2, 5],
            ),
            (
                vec![3, 64, 20],
                vec![1, 16, 20],
                compression(Codec::Zstd, Some(9)),
                vec![0],
            ),
            (
                vec![3, 64, 20],
                vec![1, 16, 20],
                compression(Codec::Zstd, None),
                vec![],
            ),
            (
                vec![2, 32, 12],
                vec![1, 32, 12],
                compression(Codec::None, None),
                vec![1],
            ),
            (
                vec![8, 5],
                vec![2, 5],
                compression(Codec::Zstd, Some(3)),
                vec![3],
            ),
            (vec![12], vec![4], compression(Codec::Zstd, Some(1)), vec![]),
        ];
        for (shard, chunk, c, fill_chunks) in cases {
            let chunk_elements = chunk.iter().product::<u64>() as usize;
            let values = shard_values(&shard, chunk_elements, &fill_chunks);
            let dir = tempfile::tempdir().expect("tempdir");
            let (want, layout) = zarrs_bytes(dir.path(), &shard, &chunk, &c, &values);
            let want = want.expect("a shard");
            let layout = layout.expect("contiguous chunks with zstd or none are encodable");
            let mut encoder = ShardEncoder::default();
            let got = encode_whole(&mut encoder, &layout, &values)
                .expect("encodes")
                .map(|g| (g.to_vec(), g.as_ptr().align_offset(ALIGN)));
            let (got, misalignment) = got.expect("not all fill");
            assert_eq!(misalignment, 0, "the shard starts on a page");
            assert!(
                got == want,
                "shard {shard:?} chunk {chunk:?} {c:?}: {} bytes, zarrs {}",
                got.len(),
                want.len()
            );
            // The same shard given a few chunks at a time (as trial_array gives it, one trial
            // at a time).
            for piece_chunks in [1, 2, 3] {
                let piece_bytes = piece_chunks * chunk_elements * 4;
                encoder.begin(&layout);
                for piece in values.chunks(piece_bytes) {
                    encoder.add_chunks(&layout, piece).expect("whole chunks");
                }
                assert!(
                    finished(&mut encoder, &layout).as_ref() == Some(&want),
                    "shard {shard:?} chunk {chunk:?} {c:?} in pieces of {piece_chunks} chunks"
                );
                // The same pieces encoded apart (as by a helping thread) and appended.
                let mut compressor = Compressor::default();
                let mut run = EncodedRun::default();
                encoder.begin(&layout);
                for piece in values.chunks(piece_bytes) {
                    compressor
                        .encode_run(&layout, piece, &mut run)
                        .expect("whole chunks");
                    encoder
                        .append_run(&layout, &run)
                        .expect("room in the shard");
                }
                assert!(
                    finished(&mut encoder, &layout).as_ref() == Some(&want),
                    "shard {shard:?} chunk {chunk:?} {c:?} in runs of {piece_chunks} chunks"
                );
            }
        }
    }

    #[test]
    fn a_shard_must_be_given_whole_chunks_and_all_of_them() {
        let (shard, chunk) = ([3u64, 8], [1u64, 8]);
        let c = compression(Codec::Zstd, Some(1));
        let layout = layout_of(Some(&shard), &chunk, &c).expect("layout");
        let values = shard_values(&shard, 8, &[]);
        let chunk_bytes = 8 * 4;
        let mut encoder = ShardEncoder::default();
        assert!(
            encoder.add_chunks(&layout, &values[..chunk_bytes]).is_err(),
            "chunks before begin"
        );
        encoder.begin(&layout);
        assert!(
            encoder
                .add_chunks(&layout, &values[..chunk_bytes + 4])
                .is_err(),
            "part of a chunk"
        );
        encoder
            .add_chunks(&layout, &values[..2 * chunk_bytes])
            .expect("two chunks");
        assert!(encoder.finish(&layout).is_err(), "finished one chunk short");
        encoder.begin(&layout);
        encoder.add_chunks(&layout, &values).expect("the shard");
        assert!(
            encoder.add_chunks(&layout, &values[..chunk_bytes]).is_err(),
            "a chunk past the shard"
        );
        let encoded = encoder
            .finish(&layout)
            .expect("finishes")
            .map(<[u8]>::to_vec);
        let (buffer, start) = encoder.take_object().expect("the object encoded last");
        assert_eq!(Some(&buffer[start..]), encoded.as_deref());
        assert!(encoder.take_object().is_none(), "taken once");
        encoder.give_back(buffer);
        // All fill: no object, as zarrs stores none.
        let fill = shard_values(&shard, 8, &[0, 1, 2]);
        encoder.begin(&layout);
        encoder.add_chunks(&layout, &fill).expect("the shard");
        assert!(encoder.finish(&layout).expect("finishes").is_none());
        assert!(encoder.take_object().is_none());
    }

    #[test]
    fn unsharded_chunks_are_byte_identical_to_zarrs() {
        for (shape, c) in [
            (vec![7u64, 30], compression(Codec::Zstd, Some(1))),
            (vec![5, 4, 3], compression(Codec::Zstd, None)),
            (vec![40], compression(Codec::None, None)),
            (vec![], compression(Codec::Zstd, Some(1))),
        ] {
            let values = shard_values(&shape, usize::MAX, &[]);
            let dir = tempfile::tempdir().expect("tempdir");
            let store = ZarrStore::open(dir.path(), &WriteLog::new(false)).expect("store");
            let chunk: Vec<u64> = shape.iter().map(|&d| d.max(1)).collect();
            let array = store
                .create_array(&ArraySpec {
                    shape: shape.clone(),
                    ..spec(None, &chunk, &c)
                })
                .expect("array");
            let zeros = vec![0; shape.len()];
            crate::writers::zarr::store_chunk(&array, &zeros, values.clone()).expect("stored");
            let want = std::fs::read(dir.path().join(array.chunk_key(&zeros).as_str()))
                .expect("zarrs wrote the chunk");
            let layout = encoder_layout(&array).expect("layout");
            let mut encoder = ShardEncoder::default();
            let got = encoder.encode_chunk(&layout, &values).expect("encodes");
            assert_eq!(got, Some(want.as_slice()), "shape {shape:?} {c:?}");
            let nan: Vec<u8> = values
                .chunks(4)
                .flat_map(|_| f32::NAN.to_le_bytes())
                .collect();
            assert_eq!(encoder.encode_chunk(&layout, &nan).expect("encodes"), None);
            // An unsharded layout has no shards to begin.
            encoder.begin(&layout);
            assert!(encoder.add_chunks(&layout, &values).is_err());
            assert!(encoder.finish(&layout).is_err());
        }
    }

    #[test]
    fn an_all_fill_shard_is_not_stored_as_by_zarrs() {
        let (shard, chunk) = (vec![2u64, 4, 3], vec![1u64, 4, 3]);
        let c = compression(Codec::Zstd, Some(1));
        let values = shard_values(&shard, 12, &[0, 1]);
        let dir = tempfile::tempdir().expect("tempdir");
        let (want, layout) = zarrs_bytes(dir.path(), &shard, &chunk, &c, &values);
        assert_eq!(want, None);
        let layout = layout.expect("layout");
        let mut encoder = ShardEncoder::default();
        let got = encode_whole(&mut encoder, &layout, &values).expect("encodes");
        assert!(got.is_none());
    }

    #[test]
    fn layouts_it_cannot_encode_are_left_to_zarrs() {
        let zstd = compression(Codec::Zstd, Some(1));
        // Chunked along two axes: a chunk is not one byte range of the shard.
        assert!(layout_of(Some(&[2, 8, 6]), &[1, 4, 3], &zstd).is_none());
        assert!(layout_of(Some(&[8, 6]), &[4, 3], &zstd).is_none());
        // Other codecs.
        for codec in [Codec::Gzip, Codec::BloscLz4, Codec::BloscZstd] {
            let c = compression(codec, Some(5));
            assert!(layout_of(Some(&[2, 8, 6]), &[1, 8, 6], &c).is_none());
            assert!(layout_of(None, &[8, 6], &c).is_none());
        }
        // A shard that does not hold whole chunks.
        assert!(layout_of(Some(&[2, 10, 6]), &[1, 4, 6], &zstd).is_none());
        // The wrong length of shard bytes is an error, not a short shard.
        let layout = layout_of(Some(&[2, 8, 6]), &[1, 8, 6], &zstd).expect("layout");
        assert!(encode_whole(&mut ShardEncoder::default(), &layout, &[0; 10]).is_err());
        // A sharded layout takes shards, not lone chunks.
        let chunk = shard_values(&[1, 8, 6], 48, &[]);
        assert!(ShardEncoder::default()
            .encode_chunk(&layout, &chunk)
            .is_err());
    }

    /// The variants' array: `VARIANT_SHAPE` float32 values in shards of `VARIANT_SHARD`.
    const VARIANT_SHAPE: [u64; 3] = [6, 8, 6];
    const VARIANT_SHARD: [u64; 3] = [2, 8, 6];
    /// Chunks of the array left all fill (NaN): one in the second shard, the whole third.
    const VARIANT_FILL_CHUNKS: [usize; 5] = [5, 8, 9, 10, 11];

    /// A sharding metadata variant: its name, its `sharding_indexed` configuration, and whether
    /// this module encodes it (else zarrs does).
    struct Variant {
        name: &'static str,
        sharding: Value,
        ours: bool,
    }

    fn variants() -> Vec<Variant> {
        let bytes = json!({"name": "bytes", "configuration": {"endian": "little"}});
        let crc32c = json!({"name": "crc32c"});
        let zstd = |level: i32, checksum: bool| json!({"name": "zstd", "configuration": {"level": level, "checksum": checksum}});
        let sharding = |codecs: Value, index_codecs: Value, location: &str| {
            json!({
                "chunk_shape": [1, 4, 6],
                "codecs": codecs,
                "index_codecs": index_codecs,
                "index_location": location,
            })
        };
        let variant = |name, codecs, index_codecs, location, ours| Variant {
            name,
            sharding: sharding(codecs, index_codecs, location),
            ours,
        };
        let both = json!([bytes, crc32c]);
        let zstd1 = json!([bytes, zstd(1, false)]);
        vec![
            // The writers' own arrays.
            variant("index_end_crc32c", zstd1.clone(), both.clone(), "end", true),
            variant("index_start", zstd1.clone(), both.clone(), "start", true),
            variant("index_without_crc32c", zstd1, json!([bytes]), "end", true),
            variant(
                "zstd_checksum",
                json!([bytes, zstd(3, true)]),
                both.clone(),
                "end",
                true,
            ),
            variant(
                "raw_index_start_bare",
                json!([bytes]),
                json!([bytes]),
                "start",
                true,
            ),
            // Left to zarrs.
            variant(
                "gzip",
                json!([bytes, {"name": "gzip", "configuration": {"level": 5}}]),
                both.clone(),
                "end",
                false,
            ),
            variant(
                "big_endian_chunks",
                json!([{"name": "bytes", "configuration": {"endian": "big"}}, zstd(1, false)]),
                both,
                "end",
                false,
            ),
            variant(
                "big_endian_index",
                json!([bytes, zstd(1, false)]),
                json!([{"name": "bytes", "configuration": {"endian": "big"}}, crc32c]),
                "end",
                false,
            ),
        ]
    }

    /// The variant's array at the root of `dir`, its metadata written, shards written in C order
    /// by zarrs as the writers ask it to.
    fn variant_array(dir: &Path, variant: &Variant) -> Array<FilesystemStore> {
        let metadata = json!({
            "zarr_format": 3,
            "node_type": "array",
            "shape": VARIANT_SHAPE,
            "data_type": "float32",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": VARIANT_SHARD}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": "NaN",
            "codecs": [{"name": "sharding_indexed", "configuration": variant.sharding}],
            "dimension_names": ["trial", "y", "x"],
        });
        let metadata = serde_json::from_value(metadata).expect("valid metadata");
        let store = Arc::new(FilesystemStore::new(dir).expect("store"));
        let order =
            ShardingCodecOptions::default().with_subchunk_write_order(SubchunkWriteOrder::C);
        let array = Array::new_with_metadata(store, "/", metadata)
            .expect("array")
            .with_codec_specific_options(&CodecSpecificOptions::default().with_option(order));
        array.store_metadata().expect("metadata stored");
        array
    }

    /// Stores every shard of `values`: encoded by `layout` here, or by zarrs when `None`.
    fn store_shards(
        dir: &Path,
        array: &Array<FilesystemStore>,
        layout: Option<&ShardLayout>,
        values: &[u8],
    ) {
        let shards = (VARIANT_SHAPE[0] / VARIANT_SHARD[0]) as usize;
        let mut encoder = ShardEncoder::default();
        for (i, shard) in values.chunks(values.len() / shards).enumerate() {
            let indices = [i as u64, 0, 0];
            let Some(layout) = layout else {
                let bytes = ArrayBytes::from(shard.to_vec());
                array.store_chunk(&indices, bytes).expect("zarrs stores");
                continue;
            };
            if let Some(encoded) = encode_whole(&mut encoder, layout, shard).expect("encodes") {
                let path = dir.join(array.chunk_key(&indices).as_str());
                std::fs::create_dir_all(path.parent().expect("a folder")).expect("folder");
                std::fs::write(path, encoded).expect("shard written");
            }
        }
    }

    /// Each shard's file, or `None` where none is stored.
    fn shard_files(dir: &Path, array: &Array<FilesystemStore>) -> Vec<Option<Vec<u8>>> {
        (0..VARIANT_SHAPE[0] / VARIANT_SHARD[0])
            .map(|i| std::fs::read(dir.join(array.chunk_key(&[i, 0, 0]).as_str())).ok())
            .collect()
    }

    /// Every variant encoded (here where the metadata allows, else by zarrs), read back through
    /// zarrs, and compared byte for byte with zarrs' own shards. With
    /// `SENSORIUM_ENCODER_VARIANTS_DIR` set, the arrays are kept there, one folder per variant,
    /// with `expected.json` (the values, `null` for fill), for zarr-python to read.
    #[test]
    fn encoder_variants_read_back() {
        let temp = tempfile::tempdir().expect("tempdir");
        let kept = std::env::var_os("SENSORIUM_ENCODER_VARIANTS_DIR").map(PathBuf::from);
        let root = kept.clone().unwrap_or_else(|| temp.path().join("ours"));
        let chunk_elements = 24;
        let values = shard_values(&VARIANT_SHAPE, chunk_elements, &VARIANT_FILL_CHUNKS);
        let mut encoded_by = serde_json::Map::new();
        for variant in variants() {
            let (dir, name) = (root.join(variant.name), variant.name);
            // A kept folder from an earlier run must not leave stale shards behind.
            let _ = std::fs::remove_dir_all(&dir);
            let array = variant_array(&dir, &variant);
            let metadata = match array.metadata() {
                zarrs::array::ArrayMetadata::V3(metadata) => metadata,
                other => panic!("{name}: not Zarr v3 metadata: {other:?}"),
            };
            let layout = ShardLayout::from_metadata(metadata);
            assert_eq!(layout.is_some(), variant.ours, "{name}: who encodes it");
            store_shards(&dir, &array, layout.as_ref(), &values);
            let got: Vec<f32> = array
                .retrieve_array_subset(&array.subset_all())
                .expect("zarrs reads the array");
            let got: Vec<u8> = got.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert!(
                got == values,
                "{name}: values read back through zarrs differ"
            );
            let reference_dir = temp.path().join("zarrs").join(name);
            let reference = variant_array(&reference_dir, &variant);
            store_shards(&reference_dir, &reference, None, &values);
            let (ours, theirs) = (
                shard_files(&dir, &array),
                shard_files(&reference_dir, &reference),
            );
            assert!(ours == theirs, "{name}: shards differ from zarrs' own");
            assert_eq!(ours.iter().filter(|f| f.is_some()).count(), 2, "{name}");
            let by = if variant.ours {
                "writers::shard"
            } else {
                "zarrs"
            };
            encoded_by.insert(name.into(), by.into());
        }
        if let Some(kept) = kept {
            write_expected(&kept, &values, encoded_by);
        }
    }

    /// `expected.json`: the variants' shape, values (`null` for NaN) and who encoded each.
    fn write_expected(dir: &Path, values: &[u8], encoded_by: serde_json::Map<String, Value>) {
        let values: Vec<Value> = values
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .map(|v| if v.is_nan() { Value::Null } else { json!(v) })
            .collect();
        let expected = json!({
            "shape": VARIANT_SHAPE,
            "values": values,
            "encoded_by": encoded_by,
        });
        let text = serde_json::to_string_pretty(&expected).expect("json");
        std::fs::write(dir.join("expected.json"), text).expect("expected.json written");
    }
}
