//! Shards of a sharded Zarr array encoded here, when that is simple, instead of by `zarrs`'
//! sharding codec: the inner chunks are contiguous byte ranges of the shard (chunked along at
//! most one axis, whole along the ones after it: the default pipeline's arrays) and the codec is
//! zstd or none.
//!
//! Why: for every inner chunk, `zarrs` copies the chunk out of the shard, makes a new zstd
//! context, compresses into a new buffer, copies that once more, and then assembles the shard in
//! a new buffer of the shard's size. Those are fresh pages the kernel must clear, and the page
//! clearing grew with the thread count: 2% of a 1-thread conversion's CPU, 5% of a 2-thread
//! one's (docs/performance.md, "Sixth round"). Here each thread keeps one zstd context and one
//! output buffer for a whole stage, and zstd writes each chunk straight into it; a shard may be
//! given a few chunks at a time (`begin`, `add_chunks`, `finish`), so the caller need not hold
//! the shard's raw values at once.
//!
//! The bytes are the ones `zarrs` writes (same zstd library and settings, inner chunks in C
//! order, all-fill chunks left out, index of `(offset, nbytes)` little-endian `u64` pairs with
//! `u64::MAX` for absent chunks, then its CRC-32C, at the end): a unit test compares them with
//! `zarrs`' own, and `verify` and the Python tests read the arrays back with `zarrs` and
//! zarr-python.

use zstd::zstd_safe::{zstd_sys::ZSTD_EndDirective, InBuffer, OutBuffer};

use crate::pipeline::spec::{Codec, Compression};

/// Direct I/O wants the object to start on this boundary (`output_store`).
const ALIGN: usize = 4096;

/// How one array's shards are laid out and compressed, when this module can encode them.
#[derive(Debug, Clone)]
pub struct ShardLayout {
    chunk_bytes: usize,
    chunks: usize,
    /// One element of the fill value, as stored.
    fill: Vec<u8>,
    /// zstd level; `None`: no compression.
    zstd_level: Option<i32>,
}

impl ShardLayout {
    /// `None` when the shards must go through `zarrs`: inner chunks that are not contiguous in
    /// the shard, or a codec other than zstd or none.
    pub fn new(
        shard_shape: &[u64],
        chunk_shape: &[u64],
        element_bytes: usize,
        compression: &Compression,
        fill: &[u8],
    ) -> Option<ShardLayout> {
        let zstd_level = match compression.codec {
            Codec::Zstd => Some(compression.level.unwrap_or(3)),
            Codec::None => None,
            Codec::Gzip | Codec::BloscLz4 | Codec::BloscZstd => return None,
        };
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
            zstd_level,
        })
    }

    /// The most bytes one encoded chunk can take.
    fn chunk_bound(&self) -> usize {
        match self.zstd_level {
            Some(_) => zstd::zstd_safe::compress_bound(self.chunk_bytes),
            None => self.chunk_bytes,
        }
    }

    fn is_fill(&self, chunk: &[u8]) -> bool {
        chunk
            .chunks_exact(self.fill.len())
            .all(|element| element == self.fill.as_slice())
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
    pub fn begin(&mut self, layout: &ShardLayout) {
        let index_bytes = layout.chunks * 16 + 4;
        let start = self.start_object(layout.chunk_bound() * layout.chunks + index_bytes);
        self.shard = Some(start);
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
        let start = match self.shard.take() {
            Some(start) if self.lens.len() == layout.chunks => start,
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
        let mut index = Vec::with_capacity(layout.chunks * 16 + 4);
        let mut offset = 0u64;
        for len in &self.lens {
            // `(offset, nbytes)` from the shard's start; all ones for a chunk left out.
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
        let checksum = crc32c::crc32c(&index);
        self.out.extend_from_slice(&index);
        self.out.extend_from_slice(&checksum.to_le_bytes());
        self.object_start = Some(start);
        Ok(Some(&self.out[start..]))
    }

    /// Encodes the one chunk of an unsharded array (`layout` made with the chunk's shape as
    /// both shard and chunk shape) as `zarrs` stores it: the codec's output alone, no index.
    /// `None` when the chunk is all fill (`zarrs` stores no object then).
    pub fn encode_chunk(
        &mut self,
        layout: &ShardLayout,
        chunk: &[u8],
    ) -> std::io::Result<Option<&[u8]>> {
        self.object_start = None;
        if layout.chunks != 1 || chunk.len() != layout.chunk_bytes {
            return Err(std::io::Error::other(format!(
                "a chunk of {} bytes, the layout takes {} chunks of {}",
                chunk.len(),
                layout.chunks,
                layout.chunk_bytes
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
    /// The context and the level it was made for.
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
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
            let Some(level) = layout.zstd_level else {
                bytes.extend_from_slice(chunk);
                lens.push(Some(chunk.len()));
                continue;
            };
            let zstd = match &mut self.zstd {
                Some((made_for, zstd)) if *made_for == level => zstd,
                other => &mut other.insert((level, zstd::bulk::Compressor::new(level)?)).1,
            };
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
    use super::*;
    use crate::npy::{Dtype, Kind};
    use crate::writers::output_store::WriteLog;
    use crate::writers::zarr::{fill_bytes, ArraySpec, ZarrStore};
    use zarrs::array::ArrayBytes;

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
    /// nothing.
    fn zarrs_bytes(
        dir: &std::path::Path,
        shard: &[u64],
        chunk: &[u64],
        c: &Compression,
        values: &[u8],
    ) -> Option<Vec<u8>> {
        let store = ZarrStore::open(dir, &WriteLog::new(false)).expect("store");
        let array = store
            .create_array(&ArraySpec {
                path: "/a",
                shape: shard.to_vec(),
                dtype: F32,
                shard_shape: Some(shard.to_vec()),
                chunk_shape: chunk.to_vec(),
                dimension_names: (0..shard.len()).map(|i| format!("d{i}")).collect(),
                attributes: serde_json::Map::new(),
                compression: c,
            })
            .expect("array");
        let zeros = vec![0; shard.len()];
        array
            .store_chunk(&zeros, ArrayBytes::from(values.to_vec()))
            .expect("zarrs stores the shard");
        let key = array.chunk_key(&zeros);
        std::fs::read(dir.join(key.as_str())).ok()
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
            let want = zarrs_bytes(dir.path(), &shard, &chunk, &c, &values).expect("a shard");
            let layout = ShardLayout::new(&shard, &chunk, 4, &c, &fill_bytes(F32))
                .expect("contiguous chunks with zstd or none are encodable");
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
        let layout = ShardLayout::new(&shard, &chunk, 4, &c, &fill_bytes(F32)).expect("layout");
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
                    path: "/s",
                    shape: shape.clone(),
                    dtype: F32,
                    shard_shape: None,
                    chunk_shape: chunk.clone(),
                    dimension_names: (0..shape.len()).map(|i| format!("d{i}")).collect(),
                    attributes: serde_json::Map::new(),
                    compression: &c,
                })
                .expect("array");
            let zeros = vec![0; shape.len()];
            crate::writers::zarr::store_chunk(&array, &zeros, values.clone()).expect("stored");
            let want = std::fs::read(dir.path().join(array.chunk_key(&zeros).as_str()))
                .expect("zarrs wrote the chunk");
            let layout = ShardLayout::new(&chunk, &chunk, 4, &c, &fill_bytes(F32)).expect("layout");
            let mut encoder = ShardEncoder::default();
            let got = encoder.encode_chunk(&layout, &values).expect("encodes");
            assert_eq!(got, Some(want.as_slice()), "shape {shape:?} {c:?}");
            let nan: Vec<u8> = values
                .chunks(4)
                .flat_map(|_| f32::NAN.to_le_bytes())
                .collect();
            assert_eq!(encoder.encode_chunk(&layout, &nan).expect("encodes"), None);
        }
    }

    #[test]
    fn an_all_fill_shard_is_not_stored_as_by_zarrs() {
        let (shard, chunk) = (vec![2u64, 4, 3], vec![1u64, 4, 3]);
        let c = compression(Codec::Zstd, Some(1));
        let values = shard_values(&shard, 12, &[0, 1]);
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(zarrs_bytes(dir.path(), &shard, &chunk, &c, &values), None);
        let layout = ShardLayout::new(&shard, &chunk, 4, &c, &fill_bytes(F32)).expect("layout");
        let mut encoder = ShardEncoder::default();
        let got = encode_whole(&mut encoder, &layout, &values).expect("encodes");
        assert!(got.is_none());
    }

    #[test]
    fn layouts_it_cannot_encode_are_left_to_zarrs() {
        let fill = fill_bytes(F32);
        let zstd = compression(Codec::Zstd, Some(1));
        // Chunked along two axes: a chunk is not one byte range of the shard.
        assert!(ShardLayout::new(&[2, 8, 6], &[1, 4, 3], 4, &zstd, &fill).is_none());
        assert!(ShardLayout::new(&[8, 6], &[4, 3], 4, &zstd, &fill).is_none());
        // Other codecs.
        for codec in [Codec::Gzip, Codec::BloscLz4, Codec::BloscZstd] {
            let c = compression(codec, Some(5));
            assert!(ShardLayout::new(&[2, 8, 6], &[1, 8, 6], 4, &c, &fill).is_none());
        }
        // A shard that does not hold whole chunks.
        assert!(ShardLayout::new(&[2, 10, 6], &[1, 4, 6], 4, &zstd, &fill).is_none());
        // The wrong length of shard bytes is an error, not a short shard.
        let layout = ShardLayout::new(&[2, 8, 6], &[1, 8, 6], 4, &zstd, &fill).expect("layout");
        assert!(encode_whole(&mut ShardEncoder::default(), &layout, &[0; 10]).is_err());
    }
}
