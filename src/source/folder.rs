//! An extracted dataset folder.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{check_entry_size, Entry, EntryReader};
use crate::error::{Error, Result};

pub struct FolderSource {
    root: PathBuf,
}

impl FolderSource {
    pub fn open(path: &Path) -> Result<FolderSource> {
        let root = std::fs::canonicalize(path)
            .map_err(|e| Error::io(path, "cannot open the source folder", e))?;
        Ok(FolderSource { root })
    }

    /// (relative path, size, index) of every file below the folder, sorted by path.
    pub fn list(&self) -> Result<Vec<super::RawEntry>> {
        let mut files = Vec::new();
        self.walk(&self.root, &mut files)?;
        files.sort();
        Ok(files
            .into_iter()
            .enumerate()
            .map(|(i, (p, s, f))| (p, s, i, f))
            .collect())
    }

    fn walk(&self, dir: &Path, out: &mut Vec<(String, u64, String)>) -> Result<()> {
        let listing =
            std::fs::read_dir(dir).map_err(|e| Error::io(dir, "cannot list the folder", e))?;
        for item in listing {
            let item = item.map_err(|e| Error::io(dir, "cannot list the folder", e))?;
            let path = item.path();
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, "cannot stat", e))?;
            let meta = if meta.file_type().is_symlink() {
                let target = std::fs::canonicalize(&path).map_err(|e| {
                    if e.raw_os_error() == Some(40) {
                        // ELOOP: the link resolves through itself.
                        Error::bad_input(
                            path.display().to_string(),
                            "symbolic link loop: the link resolves through itself",
                            "remove the link; the source must hold plain files",
                        )
                    } else {
                        Error::io(&path, "cannot follow the symbolic link", e)
                    }
                })?;
                if !target.starts_with(&self.root) {
                    return Err(Error::bad_input(
                        path.display().to_string(),
                        format!(
                            "symbolic link points outside the source folder (to {})",
                            target.display()
                        ),
                        "copy the file into the folder instead of linking to it",
                    ));
                }
                let meta =
                    std::fs::metadata(&path).map_err(|e| Error::io(&path, "cannot stat", e))?;
                if meta.is_dir() {
                    // A link to a folder inside the source lists its files twice, or forever
                    // when it points at a folder above itself.
                    return Err(Error::bad_input(
                        path.display().to_string(),
                        format!(
                            "symbolic link to a folder inside the source (to {}): its files would be read twice, or forever if it points above itself",
                            target.display()
                        ),
                        "remove the link; the source must hold each file once",
                    ));
                }
                meta
            } else {
                meta
            };
            if meta.is_dir() {
                self.walk(&path, out)?;
            } else if meta.is_file() {
                let rel = path.strip_prefix(&self.root).map_err(|_| {
                    Error::Internal(format!("{} escaped the source root", path.display()))
                })?;
                let rel = rel.to_str().ok_or_else(|| {
                    Error::bad_input(
                        path.display().to_string(),
                        "file name is not valid UTF-8",
                        "rename the file",
                    )
                })?;
                check_entry_size(&path.display().to_string(), meta.len())?;
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                out.push((
                    rel.replace(std::path::MAIN_SEPARATOR, "/"),
                    meta.len(),
                    format!("mtime:{mtime}:{}", meta.len()),
                ));
            } else {
                // A FIFO would block the reader forever; a device or socket is no data file.
                return Err(Error::bad_input(
                    path.display().to_string(),
                    "not a regular file (a FIFO, socket or device)",
                    "remove it from the source folder; nothing is skipped silently",
                ));
            }
        }
        Ok(())
    }

    pub fn reader(&self) -> FolderReader {
        FolderReader {
            root: self.root.clone(),
        }
    }
}

pub struct FolderReader {
    root: PathBuf,
}

impl FolderReader {
    fn open(&self, entry: &Entry) -> Result<(File, PathBuf)> {
        let path = self.root.join(&entry.raw_path);
        let file = File::open(&path).map_err(|e| Error::io(&path, "cannot open", e))?;
        Ok((file, path))
    }
}

impl EntryReader for FolderReader {
    fn read_exact_into(&mut self, entry: &Entry, out: &mut [u8]) -> Result<()> {
        let want = out.len() as u64;
        if want != entry.size {
            return Err(Error::Internal(format!(
                "{}: asked to read {want} bytes of a file of {}",
                entry.raw_path, entry.size
            )));
        }
        let (mut file, path) = self.open(entry)?;
        let now = match super::fill_exact(&mut file, out) {
            Ok(super::Filled::Exact) => return Ok(()),
            Ok(super::Filled::Short(n)) => n.to_string(),
            Ok(super::Filled::Long) => format!("more than {want}"),
            Err(e) => return Err(Error::io(&path, "cannot read", e)),
        };
        Err(Error::bad_input(
            path.display().to_string(),
            format!(
                "file changed while reading: it was {} bytes when listed, {now} now",
                entry.size
            ),
            "wait until the folder is fully copied, then run again",
        ))
    }

    fn read(&mut self, entry: &Entry) -> Result<Vec<u8>> {
        let (file, path) = self.open(entry)?;
        let mut buf = Vec::with_capacity(entry.size.min(super::PREALLOCATE_LIMIT) as usize);
        file.take(entry.size + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(&path, "cannot read", e))?;
        if buf.len() as u64 != entry.size {
            return Err(Error::bad_input(
                path.display().to_string(),
                format!(
                    "file changed while reading: it was {} bytes when listed, {} now",
                    entry.size,
                    buf.len()
                ),
                "wait until the folder is fully copied, then run again",
            ));
        }
        Ok(buf)
    }

    fn prefetch(&mut self, entry: &Entry) {
        // The kernel goes on fetching after the file is closed.
        if let Ok((file, _)) = self.open(entry) {
            super::will_need(&file, 0, entry.size);
        }
    }

    fn read_prefix(&mut self, entry: &Entry, len: usize) -> Result<Vec<u8>> {
        let (file, path) = self.open(entry)?;
        let mut buf = Vec::with_capacity(len);
        file.take(len as u64)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(&path, "cannot read", e))?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_brings_a_files_bytes_into_memory() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let len = 4u64 << 20;
        let path = dir.path().join("x.npy");
        std::fs::write(&path, vec![7u8; len as usize]).expect("write the file");
        let source = FolderSource::open(dir.path()).expect("open the folder");
        let entry = crate::source::first_entry(source.list().expect("list the folder"));
        let mut reader = source.reader();
        crate::source::prefetch_fills_page_cache(&path, 0..len, || reader.prefetch(&entry));
    }
}
