//! The file system store the Zarr writer writes through. It is `zarrs`' `FilesystemStore` with
//! two changes to whole-object writes (`set`), the only writes a conversion makes:
//!
//! - Large objects (shards) are written with direct I/O (`O_DIRECT`) where the file system takes
//!   it, so they do not pass through the page cache. Why: a conversion writes each shard once
//!   and never reads it again, and copying it into fresh page-cache pages is a large share of
//!   the conversion's CPU (docs/performance.md, "Direct I/O, hashes taken as written"). It also
//!   keeps a 10-20 GB mouse from filling the node's page cache (which cgroups charge to the job)
//!   with pages nobody reads. Where `O_DIRECT` is refused (ramfs, tmpfs before Linux 6.6, some FUSE and network file
//!   systems), the store falls back to ordinary writes for the rest of the run. Linux only:
//!   elsewhere every write is an ordinary one (see [`DIRECT_IO_AVAILABLE`]).
//! - Every object's size and BLAKE3 are taken from the bytes as they are written and kept in a
//!   [`WriteLog`], so the runner need not read the stage's files back to hash them.
//!
//! Every write still ends with `fsync`, as `FilesystemStore`'s does: a published dataset must
//! survive a crash. Reads, partial writes, erases and listings are `FilesystemStore`'s own.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use zarrs::filesystem::FilesystemStore;
use zarrs::storage::{
    Bytes, OffsetBytesIterator, StorageError, StoreKey, StorePrefix, WritableStorageTraits,
};

/// Alignment of buffers, offsets and lengths for direct I/O. 4096 covers the logical block
/// size of every common device and file system (512 or 4096).
const ALIGN: usize = 4096;

/// Objects smaller than this are written through the page cache: direct I/O saves nothing on
/// them and makes each a synchronous device write (metadata, small statistics arrays).
const DIRECT_IO_MIN_BYTES: usize = 1 << 20;

/// Size of the pieces an unaligned object is copied through, in a per-thread aligned buffer.
/// (Shards start page-aligned, from `writers::shard` or as `zarrs` assembles them, so this is
/// a fallback.)
const BOUNCE_BYTES: usize = 4 << 20;

/// Whether this build tries direct I/O at all: `O_DIRECT` is a Linux flag (macOS has none; the
/// BSDs' differ and are untested here), so elsewhere objects go through the page cache, as
/// with `--no-direct-io`. The bytes written are the same either way.
pub const DIRECT_IO_AVAILABLE: bool = cfg!(target_os = "linux");

/// The most a thread's copy buffer holds, for the memory estimate.
pub const BOUNCE_CAPACITY: u64 = (BOUNCE_BYTES + ALIGN) as u64;

/// What the Zarr writes of one run share: whether direct I/O is (still) tried, the sizes and
/// BLAKE3s of the objects written, by file path, and how many were written each way (for
/// run.json: whether direct I/O was really used).
#[derive(Debug, Default)]
pub struct WriteLog {
    /// Cleared the first time the file system refuses direct I/O.
    direct_io: AtomicBool,
    files: Mutex<HashMap<PathBuf, (u64, String)>>,
    direct: AtomicU64,
    buffered: AtomicU64,
}

impl WriteLog {
    /// `direct_io`: try direct I/O for large objects (where [`DIRECT_IO_AVAILABLE`]); `false`:
    /// always through the page cache.
    pub fn new(direct_io: bool) -> Arc<WriteLog> {
        Arc::new(WriteLog {
            direct_io: AtomicBool::new(direct_io && DIRECT_IO_AVAILABLE),
            ..Default::default()
        })
    }

    /// Objects written with direct I/O, and through the page cache.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.direct.load(Ordering::Relaxed),
            self.buffered.load(Ordering::Relaxed),
        )
    }

    /// The size and BLAKE3 (hex) written last to `path`, unless it was changed since by a
    /// partial write or erased.
    pub fn get(&self, path: &Path) -> Option<(u64, String)> {
        self.lock().get(path).cloned()
    }

    fn record(&self, path: PathBuf, size: u64, hash: String, direct: bool) {
        self.lock().insert(path, (size, hash));
        let counter = if direct { &self.direct } else { &self.buffered };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn forget(&self, path: &Path) {
        self.lock().remove(path);
    }

    fn forget_below(&self, dir: &Path) {
        self.lock().retain(|p, _| !p.starts_with(dir));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (u64, String)>> {
        // Single inserts and removals: a poisoned lock is still usable.
        crate::per_thread::lock(&self.files)
    }
}

#[derive(Debug)]
pub struct OutputStore {
    inner: FilesystemStore,
    log: Arc<WriteLog>,
}

impl OutputStore {
    pub fn new(inner: FilesystemStore, log: &Arc<WriteLog>) -> OutputStore {
        OutputStore {
            inner,
            log: log.clone(),
        }
    }

    /// `set` from borrowed bytes.
    pub fn write(&self, key: &StoreKey, value: &[u8]) -> Result<(), StorageError> {
        self.write_hashed(key, value, blake3::hash(value).to_hex().to_string())
    }

    /// `write`, for bytes whose BLAKE3 (hex) the caller has taken: the shard encoder's buffer,
    /// lent by `writers::write_behind`, hashed on the worker that encoded it.
    pub fn write_hashed(
        &self,
        key: &StoreKey,
        value: &[u8],
        hash: String,
    ) -> Result<(), StorageError> {
        let path = self.inner.key_to_fspath(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        super::unlink_existing(&path)?;
        let direct =
            value.len() >= DIRECT_IO_MIN_BYTES && self.log.direct_io.load(Ordering::Relaxed);
        let written_direct = direct
            && match write_direct(&path, value) {
                Ok(()) => true,
                Err(e) if refused(&e) => {
                    // Said once per run: whichever thread clears the flag first.
                    if self.log.direct_io.swap(false, Ordering::Relaxed) {
                        tracing::info!(path = %path.display(), error = %e,
                            "the file system refuses direct I/O; writing through the page cache");
                    }
                    false
                }
                Err(e) => return Err(e.into()),
            };
        if !written_direct {
            write_buffered(&path, value)?;
        }
        self.log
            .record(path, value.len() as u64, hash, written_direct);
        Ok(())
    }
}

impl WritableStorageTraits for OutputStore {
    fn set(&self, key: &StoreKey, value: Bytes) -> Result<(), StorageError> {
        self.write(key, &value)
    }

    fn set_partial_many(
        &self,
        key: &StoreKey,
        offset_values: OffsetBytesIterator,
    ) -> Result<(), StorageError> {
        self.log.forget(&self.inner.key_to_fspath(key));
        self.inner.set_partial_many(key, offset_values)
    }

    fn erase(&self, key: &StoreKey) -> Result<(), StorageError> {
        self.log.forget(&self.inner.key_to_fspath(key));
        self.inner.erase(key)
    }

    fn erase_prefix(&self, prefix: &StorePrefix) -> Result<(), StorageError> {
        self.log.forget_below(&self.inner.prefix_to_fs_path(prefix));
        self.inner.erase_prefix(prefix)
    }

    fn supports_set_partial(&self) -> bool {
        self.inner.supports_set_partial()
    }
}

/// Errors that mean "this file system does not do direct I/O (like this)", not a failed write.
fn refused(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

fn write_buffered(path: &Path, value: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(value)?;
    file.sync_all()
}

thread_local! {
    /// The aligned copy buffer of this thread, allocated on its first direct write and reused:
    /// memory that stays mapped costs no page faults.
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Creates (or truncates) `path` for writing with `O_DIRECT`.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// No `O_DIRECT` here: answered as a file system that refuses it (`refused`), so a caller falls
/// back to an ordinary write. Not reached while `WriteLog` keeps `DIRECT_IO_AVAILABLE`.
#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> std::io::Result<File> {
    Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

/// Writes `value` to `path` with `O_DIRECT`: whole aligned blocks, the last one zero-padded,
/// then the file is cut to the value's length.
fn write_direct(path: &Path, value: &[u8]) -> std::io::Result<()> {
    let file = open_direct(path)?;
    let whole = value.len() / ALIGN * ALIGN;
    let aligned = value.as_ptr().align_offset(ALIGN) == 0;
    BOUNCE.with(|bounce| -> std::io::Result<()> {
        let mut bounce = bounce.borrow_mut();
        // Room for an aligned block (the tail) or an aligned piece, wherever the Vec starts.
        let need = if aligned {
            2 * ALIGN
        } else {
            BOUNCE_BYTES + ALIGN
        };
        if bounce.len() < need {
            bounce.resize(need, 0);
        }
        let start = bounce.as_ptr().align_offset(ALIGN);
        let buffer = &mut bounce[start..];
        if aligned {
            file.write_all_at(&value[..whole], 0)?;
        } else {
            for (i, piece) in value[..whole].chunks(BOUNCE_BYTES).enumerate() {
                buffer[..piece.len()].copy_from_slice(piece);
                file.write_all_at(&buffer[..piece.len()], (i * BOUNCE_BYTES) as u64)?;
            }
        }
        let tail = &value[whole..];
        if !tail.is_empty() {
            buffer[..tail.len()].copy_from_slice(tail);
            buffer[tail.len()..ALIGN].fill(0);
            file.write_all_at(&buffer[..ALIGN], whole as u64)?;
        }
        Ok(())
    })?;
    file.set_len(value.len() as u64)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, direct_io: bool) -> (OutputStore, Arc<WriteLog>) {
        let log = WriteLog::new(direct_io);
        let inner = FilesystemStore::new(dir).expect("store");
        (OutputStore::new(inner, &log), log)
    }

    /// Lengths around the block size and the bounce buffer, from aligned and unaligned memory:
    /// the file must hold exactly the bytes, and the log their size and hash.
    #[test]
    fn writes_exact_bytes_at_every_length_and_alignment() {
        let dir = tempfile::tempdir().expect("tempdir");
        for direct_io in [true, false] {
            let (store, log) = store(dir.path(), direct_io);
            let lengths = [
                0,
                1,
                ALIGN - 1,
                ALIGN,
                ALIGN + 1,
                DIRECT_IO_MIN_BYTES,
                DIRECT_IO_MIN_BYTES + 1,
                BOUNCE_BYTES - 7,
                BOUNCE_BYTES,
                BOUNCE_BYTES + ALIGN + 3,
                3 * BOUNCE_BYTES + 5,
            ];
            for (i, &len) in lengths.iter().enumerate() {
                for misalign in [0, 1, 17] {
                    // Bytes::slice keeps the offset, so the value starts `misalign` bytes past
                    // an allocation that is itself aligned or not, as it happens.
                    let data: Vec<u8> = (0..len + misalign).map(|j| (j * 31 + i) as u8).collect();
                    let value = Bytes::from(data).slice(misalign..);
                    let key =
                        StoreKey::new(format!("a/c/{direct_io}/{i}/{misalign}")).expect("key");
                    store.set(&key, value.clone()).expect("set");
                    let path = dir.path().join(key.as_str());
                    let on_disk = std::fs::read(&path).expect("read back");
                    assert_eq!(on_disk.len(), len, "length {len}, misalign {misalign}");
                    assert!(on_disk == value, "bytes differ at length {len}");
                    let (size, hash) = log.get(&path).expect("logged");
                    assert_eq!(size, len as u64);
                    assert_eq!(hash, blake3::hash(&on_disk).to_hex().to_string());
                }
            }
        }
    }

    /// A rewrite replaces the whole file (a shorter value leaves no old bytes behind); erasing
    /// forgets the logged hash.
    #[test]
    fn rewrites_truncate_and_erases_forget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, log) = store(dir.path(), true);
        let key = StoreKey::new("c/0").expect("key");
        let path = dir.path().join("c/0");
        store
            .set(&key, Bytes::from(vec![7u8; 3 * DIRECT_IO_MIN_BYTES]))
            .expect("set");
        store.set(&key, Bytes::from(vec![9u8; 10])).expect("set");
        assert_eq!(std::fs::read(&path).expect("read"), vec![9u8; 10]);
        assert_eq!(log.get(&path).expect("logged").0, 10);
        store.erase(&key).expect("erase");
        assert!(log.get(&path).is_none());
        assert!(!path.exists());
    }
}
