//! Free space on a file system, and the space the current run expects to need, so that a full
//! disk is reported as "needs about X, Y free" wherever it strikes.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes the current conversion expects to write at most; 0 when unknown.
static NEEDED: AtomicU64 = AtomicU64::new(0);

/// Records what the current run expects to write, for messages about a full disk.
pub fn set_needed(bytes: u64) {
    NEEDED.store(bytes, Ordering::Relaxed);
}

pub fn needed() -> Option<u64> {
    Some(NEEDED.load(Ordering::Relaxed)).filter(|&b| b > 0)
}

/// Bytes an unprivileged writer may still use on the file system holding `path` (or its
/// nearest existing ancestor); `None` where the system does not say.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let c_path = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to writable memory
    // of the right type; statvfs fills it on success, and it is read only then.
    let stat = unsafe {
        if libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    // A file system without a size (ramfs, some FUSE mounts) reports no blocks at all: its
    // free space is unknown, not zero.
    if stat.f_blocks == 0 {
        return None;
    }
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// `1.5 GiB`, `320 MiB`, `12 KiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if value < 10.0 => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.0} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_well() {
        assert_eq!(super::human(512), "512 B");
        assert_eq!(super::human(1536), "1.5 KiB");
        assert_eq!(super::human(320 << 20), "320 MiB");
        assert!(super::free_bytes(std::path::Path::new("/tmp/does/not/exist")).is_some());
    }
}
