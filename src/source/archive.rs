//! Zip archives, read in place. Each reader shares the parsed central directory and reads the
//! file with positioned reads, so any number of threads read one archive without a lock.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zip::{CompressionMethod, ZipArchive};

use super::{check_entry_name, check_entry_size, Entry, EntryReader};
use crate::error::{Error, Result};

/// Deflate cannot expand data by more than ~1032:1; anything claiming more is a zip bomb.
const MAX_COMPRESSION_RATIO: u64 = 1100;

/// A file handle with its own position, cheap to clone (positioned reads on a shared file).
#[derive(Clone)]
struct SharedFile {
    file: Arc<File>,
    pos: u64,
    len: u64,
}

impl Read for SharedFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SharedFile {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before start")
        })?;
        Ok(self.pos)
    }
}

pub struct ArchiveSource {
    path: PathBuf,
    archive: ZipArchive<SharedFile>,
    len: u64,
}

impl ArchiveSource {
    pub fn open(path: &Path) -> Result<ArchiveSource> {
        let file = File::open(path).map_err(|e| Error::io(path, "cannot open the archive", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "cannot read the archive's size", e))?
            .len();
        let shared = SharedFile {
            file: Arc::new(file),
            pos: 0,
            len,
        };
        let archive = ZipArchive::new(shared).map_err(|e| {
            Error::bad_input(
                path.display().to_string(),
                format!("not a readable zip archive: {e}"),
                "the download is probably truncated or damaged; download it again and compare its checksum",
            )
        })?;
        Ok(ArchiveSource {
            path: path.to_path_buf(),
            archive,
            len,
        })
    }

    /// (name, declared size, index) of every file entry.
    pub fn list(&self) -> Result<Vec<super::RawEntry>> {
        // The zip crate keys entries by name: of two entries with one name, only one would be
        // seen. Refuse such archives instead of converting whichever copy it kept.
        if self.archive.has_duplicate_names() {
            let which = self
                .duplicate_name()
                .map(|n| format!("{}: {n}", self.path.display()))
                .unwrap_or_else(|| self.path.display().to_string());
            return Err(Error::bad_input(
                which,
                "the archive holds this entry twice (two entries with one name)",
                "rebuild the archive so that every entry name is unique; which copy is right cannot be known",
            ));
        }
        let mut archive = self.archive.clone();
        let directory_start = archive.central_directory_start();
        let mut out = Vec::with_capacity(archive.len());
        for index in 0..archive.len() {
            let file = archive
                .by_index_raw(index)
                .map_err(|e| self.damaged(&format!("entry #{index}"), e))?;
            let name = std::str::from_utf8(file.name_raw())
                .map_err(|_| {
                    Error::bad_input(
                        format!(
                            "{}: entry #{index} ({})",
                            self.path.display(),
                            String::from_utf8_lossy(file.name_raw())
                        ),
                        "entry name is not valid UTF-8",
                        "rebuild the archive with UTF-8 file names",
                    )
                })?
                .to_string();
            if file.is_dir() || name.ends_with('/') {
                continue;
            }
            check_entry_name(&self.path, &name)?;
            let located = || format!("{}: {name}", self.path.display());
            let (size, compressed) = (file.size(), file.compressed_size());
            // The entry's data must lie between its local header and the central directory.
            let data_end = file
                .data_start()
                .and_then(|start| start.checked_add(compressed));
            if data_end.is_none_or(|end| end > directory_start.min(self.len)) {
                return Err(Error::bad_input(
                    located(),
                    format!(
                        "entry claims {compressed} compressed bytes, more than the archive holds"
                    ),
                    "the archive is damaged or was edited by hand; download it again",
                ));
            }
            if size > compressed.max(1).saturating_mul(MAX_COMPRESSION_RATIO) {
                return Err(Error::bad_input(
                    located(),
                    format!("entry claims {size} bytes from {compressed} compressed bytes, beyond what deflate can produce"),
                    "this looks like a zip bomb; do not process this archive",
                ));
            }
            check_entry_size(&located(), size)?;
            let fingerprint = format!("crc32:{:08x}:{size}", file.crc32());
            out.push((name, size, index, fingerprint));
        }
        Ok(out)
    }

    /// The first name the central directory lists twice, read from its raw records (the zip
    /// crate keeps one entry per name, so it cannot say which).
    fn duplicate_name(&self) -> Option<String> {
        const RECORD: usize = 46;
        let start = self.archive.central_directory_start();
        let len = self.len.checked_sub(start)?.min(256 << 20) as usize;
        let mut directory = vec![0u8; len];
        self.archive
            .clone()
            .into_inner()
            .file
            .read_exact_at(&mut directory, start)
            .ok()?;
        let mut seen = std::collections::HashSet::new();
        let mut at = 0usize;
        while directory.get(at..at + 4) == Some(b"PK\x01\x02".as_slice()) {
            let field = |o: usize| -> Option<usize> {
                let b = directory.get(at + o..at + o + 2)?;
                Some(u16::from_le_bytes([b[0], b[1]]) as usize)
            };
            let (name_len, extra_len, comment_len) = (field(28)?, field(30)?, field(32)?);
            let name = directory.get(at + RECORD..at + RECORD + name_len)?;
            if !seen.insert(name) {
                return Some(String::from_utf8_lossy(name).into_owned());
            }
            at += RECORD + name_len + extra_len + comment_len;
        }
        None
    }

    pub fn reader(&self) -> ArchiveReader {
        let archive = self.archive.clone();
        ArchiveReader {
            path: self.path.clone(),
            file: archive.clone().into_inner().file,
            archive,
            inflater: Inflater::default(),
        }
    }

    fn damaged(&self, what: &str, e: zip::result::ZipError) -> Error {
        Error::bad_input(
            format!("{}: {what}", self.path.display()),
            format!("cannot read the archive: {e}"),
            "the download is probably truncated or damaged; download it again",
        )
    }
}

pub struct ArchiveReader {
    path: PathBuf,
    archive: ZipArchive<SharedFile>,
    file: Arc<File>,
    inflater: Inflater,
}

/// Whole-entry inflation with libdeflate, for deflated entries: it inflates these float arrays
/// much faster than zip's streaming reader over zlib-rs, CRC-32 included (docs/performance.md,
/// "libdeflate, entries read in place"), at the cost of holding one entry's compressed bytes
/// per reader (~2.5 MB for a responses trial).
struct Inflater {
    decompressor: libdeflater::Decompressor,
    compressed: Vec<u8>,
}

impl Default for Inflater {
    fn default() -> Inflater {
        Inflater {
            decompressor: libdeflater::Decompressor::new(),
            compressed: Vec::new(),
        }
    }
}

/// Where a deflated entry's compressed bytes are, and the CRC-32 its inflated bytes must have.
struct Deflated {
    start: u64,
    len: usize,
    crc32: u32,
}

impl ArchiveReader {
    /// The entry's compressed bytes when it can be inflated whole: deflated, not encrypted, and
    /// its compressed size plausible for its declared size. Anything else (stored, encrypted,
    /// padded with junk) goes through zip's streaming reader, which reads it in bounded memory.
    fn deflated(&mut self, entry: &Entry) -> Result<Option<Deflated>> {
        let raw = self
            .archive
            .by_index_raw(entry.index)
            .map_err(|e| damaged(&self.path, entry, &e))?;
        // Deflate's worst case: 5 bytes per 64 KiB stored block, plus a little.
        let plausible = entry.size + entry.size / 1024 + 64;
        if raw.compression() != CompressionMethod::Deflated
            || raw.encrypted()
            || raw.compressed_size() > plausible
        {
            return Ok(None);
        }
        let (Some(start), Ok(len)) = (raw.data_start(), usize::try_from(raw.compressed_size()))
        else {
            return Ok(None);
        };
        Ok(Some(Deflated {
            start,
            len,
            crc32: raw.crc32(),
        }))
    }

    /// Inflates a deflated entry into `out` (its declared size): the data must fill it exactly
    /// and match the entry's CRC-32.
    fn inflate(&mut self, entry: &Entry, at: &Deflated, out: &mut [u8]) -> Result<()> {
        let compressed = &mut self.inflater.compressed;
        compressed.resize(at.len, 0);
        self.file
            .read_exact_at(compressed, at.start)
            .map_err(|e| match e.kind() {
                // Its bounds were checked against the file when listed: it has shrunk since.
                std::io::ErrorKind::UnexpectedEof => Error::bad_input(
                    format!("{}: {}", self.path.display(), entry.raw_path),
                    "the archive ends inside this entry's data: it was truncated while being read",
                    "the archive is being replaced or written; wait until it is complete and run again",
                ),
                _ => Error::io(&self.path, "cannot read the archive", e),
            })?;
        let held = match self
            .inflater
            .decompressor
            .deflate_decompress(compressed, out)
        {
            Ok(n) if n == out.len() => return self.check_crc(entry, at, crc32fast::hash(out)),
            Ok(n) => n.to_string(),
            Err(libdeflater::DecompressionError::InsufficientSpace) => {
                format!("more than {}", out.len())
            }
            Err(libdeflater::DecompressionError::BadData) => {
                return Err(damaged(&self.path, entry, &"invalid deflate data"))
            }
        };
        Err(wrong_size(&self.path, entry, &held))
    }

    fn check_crc(&self, entry: &Entry, at: &Deflated, crc32: u32) -> Result<()> {
        if crc32 == at.crc32 {
            return Ok(());
        }
        Err(damaged(
            &self.path,
            entry,
            &format_args!(
                "CRC-32 checksum mismatch (the archive records {:08x}, the data gives {crc32:08x})",
                at.crc32
            ),
        ))
    }
}

fn damaged(path: &Path, entry: &Entry, e: &dyn std::fmt::Display) -> Error {
    Error::bad_input(
        format!("{}: {}", path.display(), entry.raw_path),
        format!("cannot read the entry: {e}"),
        "the archive is damaged (bad CRC, truncated or corrupt data); download it again",
    )
}

fn wrong_size(path: &Path, entry: &Entry, held: &dyn std::fmt::Display) -> Error {
    Error::bad_input(
        format!("{}: {}", path.display(), entry.raw_path),
        format!("entry declares {} bytes but holds {held}", entry.size),
        "the archive is damaged; download it again",
    )
}

impl ArchiveReader {
    fn read_limited(&mut self, entry: &Entry, limit: Option<usize>) -> Result<Vec<u8>> {
        if limit.is_none() {
            if let Some(at) = self.deflated(entry)? {
                let mut buf = vec![0u8; self.checked_len(entry)?];
                self.inflate(entry, &at, &mut buf)?;
                return Ok(buf);
            }
        }
        let file = self
            .archive
            .by_index(entry.index)
            .map_err(|e| damaged(&self.path, entry, &e))?;
        let want = match limit {
            Some(l) => (l as u64).min(entry.size),
            None => entry.size,
        };
        // Read at most one byte past the declared size, so an entry that inflates beyond it is
        // caught without ever holding more than the declared size in memory.
        // Capacity from a declared size is capped: the data may turn out much shorter.
        let mut buf = Vec::with_capacity(want.min(super::PREALLOCATE_LIMIT) as usize);
        let take = if limit.is_some() { want } else { want + 1 };
        let read = file.take(take).read_to_end(&mut buf);
        read.map_err(|e| damaged(&self.path, entry, &e))?;
        if limit.is_none() && buf.len() as u64 != entry.size {
            return Err(wrong_size(&self.path, entry, &buf.len()));
        }
        Ok(buf)
    }

    /// The declared size as a length in memory.
    fn checked_len(&self, entry: &Entry) -> Result<usize> {
        usize::try_from(entry.size)
            .map_err(|_| wrong_size(&self.path, entry, &"more than fits in memory"))
    }
}

impl EntryReader for ArchiveReader {
    fn read_exact_into(&mut self, entry: &Entry, out: &mut [u8]) -> Result<()> {
        let want = out.len() as u64;
        if want != entry.size {
            return Err(Error::Internal(format!(
                "{}: {}: asked to read {want} bytes of an entry of {}",
                self.path.display(),
                entry.raw_path,
                entry.size
            )));
        }
        if let Some(at) = self.deflated(entry)? {
            return self.inflate(entry, &at, out);
        }
        let mut file = self
            .archive
            .by_index(entry.index)
            .map_err(|e| damaged(&self.path, entry, &e))?;
        // Reading on to the end (one byte past the declared size at most) makes zip verify the
        // CRC-32.
        let held = match super::fill_exact(&mut file, out) {
            Ok(super::Filled::Exact) => return Ok(()),
            Ok(super::Filled::Short(n)) => n.to_string(),
            Ok(super::Filled::Long) => format!("more than {want}"),
            Err(e) => return Err(damaged(&self.path, entry, &e)),
        };
        Err(wrong_size(&self.path, entry, &held))
    }

    fn read(&mut self, entry: &Entry) -> Result<Vec<u8>> {
        // zip verifies the CRC-32 when the entry is read to its end.
        self.read_limited(entry, None)
    }

    fn read_prefix(&mut self, entry: &Entry, len: usize) -> Result<Vec<u8>> {
        self.read_limited(entry, Some(len))
    }

    fn prefetch(&mut self, entry: &Entry) {
        // The data's place was found when the archive was listed: nothing is read for it here.
        if let Ok(raw) = self.archive.by_index_raw(entry.index) {
            if let Some(start) = raw.data_start() {
                super::will_need(&self.file, start, raw.compressed_size());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use zip::write::SimpleFileOptions;

    use super::*;
    use crate::source::EntryReader;

    /// A zip of one deflated entry of `len` barely compressible bytes, and that entry.
    fn one_entry_zip(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
        let path = dir.join("mouse.zip");
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let file = File::create(&path).expect("create the zip");
        let mut zip = zip::ZipWriter::new(file);
        let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        zip.start_file("mouse/data/x.npy", options)
            .expect("start the entry");
        zip.write_all(&data).expect("write the entry");
        zip.finish().expect("finish the zip");
        (path, data)
    }

    /// A one-entry zip of `len` bytes (in `dir`), opened and listed: its path, bytes, source and
    /// entry.
    fn listed_zip(dir: &Path, len: usize) -> (PathBuf, Vec<u8>, ArchiveSource, Entry) {
        let (path, data) = one_entry_zip(dir, len);
        let source = ArchiveSource::open(&path).expect("open the zip");
        let entry = crate::source::first_entry(source.list().expect("list the zip"));
        (path, data, source, entry)
    }

    #[test]
    fn prefetch_brings_an_entrys_compressed_bytes_into_memory() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let (path, _, source, entry) = listed_zip(dir.path(), 4 << 20);
        let mut reader = source.reader();
        let at = reader.deflated(&entry).expect("locate").expect("deflated");
        let range = at.start..at.start + at.len as u64;
        crate::source::prefetch_fills_page_cache(&path, range, || reader.prefetch(&entry));
    }

    #[test]
    fn deflated_entries_read_whole_and_into_place_alike() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let (_, data, source, entry) = listed_zip(dir.path(), 300_000);
        let mut reader = source.reader();
        assert_eq!(reader.read(&entry).expect("read whole"), data);
        let mut into = vec![0u8; data.len()];
        reader
            .read_exact_into(&entry, &mut into)
            .expect("read into place");
        assert_eq!(into, data);
        let mut short = vec![0u8; data.len() - 1];
        assert!(matches!(
            reader.read_exact_into(&entry, &mut short),
            Err(Error::Internal(_))
        ));
    }

    #[test]
    fn an_archive_truncated_after_listing_is_bad_input_naming_the_entry() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let (path, data, source, entry) = listed_zip(dir.path(), 300_000);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(1_000))
            .expect("truncate the zip");
        let mut into = vec![0u8; data.len()];
        match source.reader().read_exact_into(&entry, &mut into) {
            Err(Error::BadInput {
                location, problem, ..
            }) => {
                assert!(location.ends_with("mouse/data/x.npy"), "{location}");
                assert!(problem.contains("truncated"), "{problem}");
            }
            other => panic!("expected bad input, got {other:?}"),
        }
    }
}
