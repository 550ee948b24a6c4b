//! Reading a source: a mouse's zip archive (read in place) or its extracted folder.
//!
//! Both present the same thing: a sorted list of entries with paths relative to the dataset root
//! (the top-level `<name>/` folder removed), and readers that return an entry's bytes after
//! checking them against what the container declared (size, and CRC-32 for archives).

mod archive;
mod folder;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::npy;

pub use archive::ArchiveSource;
pub use folder::FolderSource;

/// One file of the source.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path relative to the dataset root, `/`-separated (junk outside the root keeps its full path).
    pub path: String,
    /// Path as stored in the container, for messages.
    pub raw_path: String,
    /// Size declared by the container (checked against the bytes when read).
    pub size: u64,
    /// Index in the container (archive entry number, or position in the folder listing).
    pub index: usize,
    /// Cheap change detector from the container's own records: `crc32:<crc>:<size>` in an
    /// archive, `mtime:<ns>:<size>` in a folder. Used to decide what a rerun can reuse.
    pub fingerprint: String,
}

/// Reads entries' bytes. Each thread uses its own reader, so reads never contend on a lock.
pub trait EntryReader: Send {
    /// The whole entry, verified against its declared size (and CRC-32 in archives).
    fn read(&mut self, entry: &Entry) -> Result<Vec<u8>>;
    /// The first bytes of an entry (at most `len`), for headers.
    fn read_prefix(&mut self, entry: &Entry, len: usize) -> Result<Vec<u8>>;
    /// The whole entry, straight into the caller's memory: `out` must be exactly the declared
    /// size. Verified like `read` (size, CRC-32 in archives); on error, `out` holds partial data.
    fn read_exact_into(&mut self, entry: &Entry, out: &mut [u8]) -> Result<()>;
    /// A hint that `entry` is read soon: the system starts fetching its bytes from storage in
    /// the background, so that the read finds them in memory instead of waiting for the disk
    /// or network file system. Nothing is read or checked here; a hint cannot fail.
    fn prefetch(&mut self, _entry: &Entry) {}
}

/// Asks the kernel to read `len` bytes of `file` from `offset` into the page cache in the
/// background (`posix_fadvise(POSIX_FADV_WILLNEED)`): the caller goes on computing while the
/// bytes arrive. Why: a worker that reads a trial waits for it, its core idle, when the
/// archive is not in memory (a first conversion, files on a cluster file system); fetched
/// one trial ahead, the wait overlaps the previous trial's work (docs/performance.md, "Prefetch
/// the next trial"). The result is ignored: where the hint is not supported, reads work as
/// before. Linux only (macOS has no `posix_fadvise`): elsewhere it does nothing.
#[cfg(target_os = "linux")]
pub(crate) fn will_need(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise only reads its integer arguments; an fd that is not valid or a
    // range outside the file makes it return an error code, which is ignored.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED);
    }
}

/// `will_need` where there is no `posix_fadvise` to ask: reads wait for the disk as they come.
#[cfg(not(target_os = "linux"))]
pub(crate) fn will_need(_file: &std::fs::File, _offset: u64, _len: u64) {}

/// How a stream ended against the length it had to have.
pub(crate) enum Filled {
    /// Exactly `out.len()` bytes, then the end (for zip entries, the end is where the CRC-32 is
    /// checked).
    Exact,
    /// Fewer: the stream ended after this many bytes.
    Short(u64),
    /// More bytes followed.
    Long,
}

/// Fills `out` from `r`, then checks that the stream ends there.
pub(crate) fn fill_exact(r: &mut dyn std::io::Read, out: &mut [u8]) -> std::io::Result<Filled> {
    let mut got = 0;
    while got < out.len() {
        match r.read(&mut out[got..]) {
            Ok(0) => return Ok(Filled::Short(got as u64)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut probe = [0u8; 1];
    loop {
        match r.read(&mut probe) {
            Ok(0) => return Ok(Filled::Exact),
            Ok(_) => return Ok(Filled::Long),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// What kind of container the source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Zip,
    Folder,
}

pub struct Source {
    pub path: PathBuf,
    pub kind: SourceKind,
    /// The source's name: the zip's stem or the dataset folder's name.
    pub name: String,
    /// Every file entry, sorted by `path`.
    pub entries: Vec<Entry>,
    inner: Inner,
}

enum Inner {
    Archive(ArchiveSource),
    Folder(FolderSource),
}

impl Source {
    pub fn open(path: &Path) -> Result<Source> {
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io(path, "cannot open the source", e))?;
        let (kind, inner, raw_entries, container_name) = if meta.is_dir() {
            let folder = FolderSource::open(path)?;
            let entries = folder.list()?;
            let name = file_name(path);
            (SourceKind::Folder, Inner::Folder(folder), entries, name)
        } else {
            let archive = ArchiveSource::open(path)?;
            let entries = archive.list()?;
            let name = file_name(path);
            let name = name
                .strip_suffix(".zip")
                .map(str::to_string)
                .unwrap_or(name);
            (SourceKind::Zip, Inner::Archive(archive), entries, name)
        };
        let (root, mut entries) = locate_root(path, raw_entries)?;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        for pair in entries.windows(2) {
            if pair[0].path == pair[1].path {
                return Err(Error::bad_input(
                    format!("{}: {}", path.display(), pair[0].raw_path),
                    "the source holds this entry twice",
                    "rebuild the archive so that every entry name is unique",
                ));
            }
        }
        // A folder that merely wraps the dataset folder is named after the dataset folder, so that
        // a zip and its extraction get the same name.
        let name = match (&kind, root.as_str()) {
            (SourceKind::Folder, r) if !r.is_empty() => r
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or(r)
                .to_string(),
            _ => container_name,
        };
        Ok(Source {
            path: path.to_path_buf(),
            kind,
            name,
            entries,
            inner,
        })
    }

    pub fn reader(&self) -> Result<Box<dyn EntryReader>> {
        match &self.inner {
            Inner::Archive(a) => Ok(Box::new(a.reader())),
            Inner::Folder(f) => Ok(Box::new(f.reader())),
        }
    }

    /// Where an entry is, for messages: `SOURCE: raw/path`.
    pub fn locate(&self, entry: &Entry) -> String {
        format!("{}: {}", self.path.display(), entry.raw_path)
    }

    /// The default dataset name: the source name without a trailing `-<Stimulus>-<32 hex>`.
    pub fn dataset_name(&self) -> String {
        default_dataset_name(&self.name)
    }

    /// BLAKE3 over every entry's path and container fingerprint: cheap (no entry is read),
    /// independent of the container's file name, and changed by any change to an entry.
    pub fn fingerprint(&self) -> String {
        let mut all = blake3::Hasher::new();
        for e in &self.entries {
            all.update(e.path.as_bytes());
            all.update(b"\0");
            all.update(e.fingerprint.as_bytes());
            all.update(b"\n");
        }
        format!("blake3:{}", all.finalize().to_hex())
    }

    /// Total declared size of all entries.
    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

/// The FileTree family's name rule: a trailing `-<Stimulus>-<32 hex>` (`-Video-…`,
/// `-GrayImageNet-…`, `-ColorImageNet-…`) is removed; the stimulus is a word that starts with a
/// letter, so a name like `mouse-3-12-<hex>` keeps its numbers. Other names are kept whole.
pub fn default_dataset_name(source_name: &str) -> String {
    strip_stimulus_suffix(source_name)
        .unwrap_or(source_name)
        .to_string()
}

fn strip_stimulus_suffix(name: &str) -> Option<&str> {
    let (rest, hex) = name.rsplit_once('-')?;
    let (stem, stimulus) = rest.rsplit_once('-')?;
    let is_hex = hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    let is_word = stimulus.starts_with(|c: char| c.is_ascii_alphabetic())
        && stimulus
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (is_hex && is_word && !stem.is_empty()).then_some(stem)
}

fn file_name(path: &Path) -> String {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "source".to_string())
}

/// Junk that archivers and file managers add; never part of a dataset.
pub fn is_platform_junk(path: &str) -> bool {
    path.starts_with("__MACOSX/")
        || path
            .split('/')
            .any(|part| part.starts_with("._") || part == ".DS_Store" || part == "Thumbs.db")
}

/// An entry as the container lists it: (name, declared size, index, fingerprint).
pub(crate) type RawEntry = (String, u64, usize, String);

/// Finds the dataset root (the folder holding `data/` and `meta/`) and makes paths relative to it.
fn locate_root(source: &Path, raw: Vec<RawEntry>) -> Result<(String, Vec<Entry>)> {
    let has = |prefix: &str| {
        raw.iter().any(|(p, _, _, _)| {
            p.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with("data/") || rest.starts_with("meta/"))
        })
    };
    let root = if has("") {
        String::new()
    } else {
        let mut tops: Vec<&str> = raw
            .iter()
            .filter(|(p, _, _, _)| !is_platform_junk(p))
            .filter_map(|(p, _, _, _)| p.split_once('/').map(|(top, _)| top))
            .collect();
        tops.sort_unstable();
        tops.dedup();
        match tops.as_slice() {
            [top] if has(&format!("{top}/")) => format!("{top}/"),
            _ => {
                return Err(Error::bad_input(
                    source.display().to_string(),
                    "no dataset found: neither `data/` nor `meta/` exists at the top or inside one top-level folder",
                    "point the tool at a Sensorium mouse archive or at the folder that holds `data/` and `meta/`",
                ))
            }
        }
    };
    let entries = raw
        .into_iter()
        .map(|(raw_path, size, index, fingerprint)| {
            let path = raw_path
                .strip_prefix(&root)
                .unwrap_or(&raw_path)
                .to_string();
            Entry {
                path,
                raw_path,
                size,
                index,
                fingerprint,
            }
        })
        .collect();
    Ok((root, entries))
}

/// Entries are read whole, so one entry may not be larger than this. The largest file of a
/// Sensorium mouse (one trial's responses, N x T float64) is about 30 MB.
pub const MAX_ENTRY_BYTES: u64 = 4 << 30;

/// Buffers are never preallocated beyond this from a size that the container declares.
pub(crate) const PREALLOCATE_LIMIT: u64 = 64 << 20;

/// Refuses entries too large to read whole.
pub(crate) fn check_entry_size(location: &str, size: u64) -> Result<()> {
    if size > MAX_ENTRY_BYTES {
        return Err(Error::bad_input(
            location,
            format!(
                "entry is {size} bytes; this tool reads entries whole and refuses any over {} GiB (the largest file of a Sensorium mouse is about 30 MB)",
                MAX_ENTRY_BYTES >> 30
            ),
            "this is not a Sensorium file (or a zip bomb); remove it from the source",
        ));
    }
    Ok(())
}

/// Checks an entry name for things that have no place in a dataset path.
pub(crate) fn check_entry_name(source: &Path, name: &str) -> Result<()> {
    let bad = |problem: &str| {
        Err(Error::bad_input(
            format!("{}: {name:?}", source.display()),
            problem.to_string(),
            "the archive was not written by a normal zip tool; rebuild it from the original files",
        ))
    };
    if name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.as_bytes().get(1) == Some(&b':')
    {
        return bad("entry name is absolute or uses backslashes");
    }
    if name.split('/').any(|part| part == ".." || part == ".") {
        return bad("entry name contains `..` or `.` components");
    }
    Ok(())
}

/// Reads and parses the npy header of an entry, checking it against the entry's size.
pub fn read_npy_header(
    source: &Source,
    reader: &mut dyn EntryReader,
    entry: &Entry,
) -> Result<npy::Header> {
    let mut prefix = reader.read_prefix(entry, npy::HEADER_PROBE_LEN)?;
    // numpy writes headers of ~128 bytes but may write longer ones (up to MAX_HEADER_LEN).
    if let Some(end) = npy::header_end(&prefix).filter(|&end| end > prefix.len()) {
        if (end as u64) <= entry.size {
            prefix = reader.read_prefix(entry, end)?;
        }
    }
    checked_header(source, entry, &prefix, entry.size)
}

/// Parses the npy header at the start of `bytes` and checks it against the entry's length
/// (`file_len`): the shape and dtype it declares must need exactly the bytes that are there.
pub fn checked_header(
    source: &Source,
    entry: &Entry,
    bytes: &[u8],
    file_len: u64,
) -> Result<npy::Header> {
    let header = npy::parse_header(bytes).map_err(|problem| {
        Error::bad_input(
            source.locate(entry),
            problem,
            "the file is not a readable NumPy array; re-export it with numpy.save",
        )
    })?;
    header.check_file_len(file_len).map_err(|problem| {
        Error::bad_input(
            source.locate(entry),
            problem,
            "the file is truncated or its header is wrong; re-download the archive",
        )
    })?;
    Ok(header)
}

/// Reads an entry whole and returns its header and payload, checked against each other.
pub fn read_npy(
    source: &Source,
    reader: &mut dyn EntryReader,
    entry: &Entry,
) -> Result<(npy::Header, Vec<u8>)> {
    let bytes = reader.read(entry)?;
    let header = checked_header(source, entry, &bytes, bytes.len() as u64)?;
    Ok((header, bytes))
}

/// For tests: the first listed entry, as a source of one entry at its root lists it.
#[cfg(test)]
pub(crate) fn first_entry(listed: Vec<RawEntry>) -> Entry {
    let (name, size, index, fingerprint) = listed.into_iter().next().expect("one entry");
    Entry {
        path: name.clone(),
        raw_path: name,
        size,
        index,
        fingerprint,
    }
}

/// For tests of `EntryReader::prefetch`: drops `path`'s pages from the page cache, runs
/// `prefetch`, and waits (up to 10 s) until the bytes `range` of the file are all in memory.
/// Where the pages cannot be dropped (tmpfs and other memory-backed file systems) there is
/// nothing to observe: it says so and returns.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn prefetch_fills_page_cache(
    path: &Path,
    range: std::ops::Range<u64>,
    prefetch: impl FnOnce(),
) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).expect("open the file");
    let resident = || {
        let len = file.metadata().expect("the file's size").len() as usize;
        // SAFETY: a read-only shared mapping of a file this test owns and does not change;
        // mincore writes one byte per page into a vector sized for every page.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(at, libc::MAP_FAILED, "map the file");
            let mut pages = vec![0u8; len.div_ceil(page)];
            assert_eq!(libc::mincore(at, len, pages.as_mut_ptr()), 0, "mincore");
            libc::munmap(at, len);
            let (first, end) = (
                range.start as usize / page,
                (range.end as usize).div_ceil(page),
            );
            pages[first..end].iter().filter(|&&p| p & 1 == 1).count() * 100 / (end - first)
        }
    };
    // Dirty pages cannot be dropped: written out first.
    file.sync_all().expect("sync the file");
    // SAFETY: as in `will_need`.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
    if resident() > 10 {
        eprintln!(
            "{}: its pages stay in memory here (tmpfs?): prefetch not observable",
            path.display()
        );
        return;
    }
    prefetch();
    let started = std::time::Instant::now();
    while resident() < 100 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "after 10 s only {}% of the prefetched bytes are in memory",
            resident()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// `prefetch_fills_page_cache` where pages can be neither dropped nor prefetched (no
/// `posix_fadvise`): runs `prefetch`, which must not fail, and says there is nothing to observe.
#[cfg(all(test, not(target_os = "linux")))]
pub(crate) fn prefetch_fills_page_cache(
    path: &Path,
    _range: std::ops::Range<u64>,
    prefetch: impl FnOnce(),
) {
    prefetch();
    eprintln!(
        "{}: no posix_fadvise on this system: prefetch not observable",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_names_lose_the_stimulus_and_hash_suffix() {
        let hex = "9b4f6a1a067fe51e15306b9628efea20";
        for (source, name) in [
            (
                format!("dynamic29515-10-12-Video-{hex}"),
                "dynamic29515-10-12",
            ),
            (
                format!("static21067-10-18-GrayImageNet-{hex}"),
                "static21067-10-18",
            ),
            (
                format!("static22846-10-16-ColorImageNet-{hex}"),
                "static22846-10-16",
            ),
            (
                format!("mouse-3-12-{hex}"),
                "mouse-3-12-9b4f6a1a067fe51e15306b9628efea20",
            ),
            (
                "static20457-5-9-preproc0".to_string(),
                "static20457-5-9-preproc0",
            ),
            (
                format!("-Video-{hex}"),
                "-Video-9b4f6a1a067fe51e15306b9628efea20",
            ),
        ] {
            assert_eq!(default_dataset_name(&source), name, "{source}");
        }
    }

    fn fill(data: &[u8], len: usize) -> (Filled, Vec<u8>) {
        let mut out = vec![0u8; len];
        let filled = fill_exact(&mut &data[..], &mut out).unwrap_or_else(|e| panic!("{e}"));
        (filled, out)
    }

    #[test]
    fn fill_exact_checks_the_length() {
        let data: Vec<u8> = (0..300_000).map(|i| i as u8).collect();
        let (filled, bytes) = fill(&data, data.len());
        assert!(matches!(filled, Filled::Exact));
        assert_eq!(bytes, data);
        let (filled, _) = fill(&data, data.len() + 1);
        assert!(matches!(filled, Filled::Short(n) if n == data.len() as u64));
        let (filled, _) = fill(&data, data.len() - 1);
        assert!(matches!(filled, Filled::Long));
        let (filled, _) = fill(&[], 0);
        assert!(matches!(filled, Filled::Exact));
    }
}
