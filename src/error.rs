//! The library's error type. Every variant names what went wrong, where, and what to do;
//! the CLI maps each class to a documented exit code (see `Error::exit_code`).

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source data is wrong: a damaged archive, a malformed npy file, an inconsistent dataset.
    #[error("{location}: {problem}\n  hint: {hint}")]
    BadInput {
        location: String,
        problem: String,
        hint: String,
    },

    /// The pipeline file is wrong: YAML syntax, unknown keys, wrong types, impossible settings.
    #[error("{file}{line}: {problem}\n  hint: {hint}", line = line.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    BadPipeline {
        file: String,
        line: Option<(usize, usize)>,
        problem: String,
        hint: String,
    },

    /// Reading or writing the file system failed.
    #[error("{}: {action}: {source}\n  hint: {}", path.display(), io_hint(path, source))]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The dataset already exists in the store and `--force` was not given.
    #[error("{}: dataset already exists and {why}\n  hint: pass --force to replace it, or --name to write it under another name", path.display())]
    Exists { path: PathBuf, why: String },

    /// Another process holds a lock this command needs: the store's ingest lock, or a
    /// dataset name.
    #[error("{}: {what}: {holder}\n  hint: {hint}", path.display())]
    Busy {
        path: PathBuf,
        what: String,
        holder: String,
        hint: String,
    },

    /// The store's file system clearly lacks the space the run needs; checked before starting.
    #[error("{}: not enough space: the run needs about {}, {} is free\n  hint: free some space or choose an --out folder on a larger disk; --no-space-check starts anyway", path.display(), crate::disk::human(*needed), crate::disk::human(*free))]
    NoSpace {
        path: PathBuf,
        needed: u64,
        free: u64,
    },

    /// SIGINT or SIGTERM stopped the run; nothing was published.
    #[error("interrupted: nothing was published\n  hint: run the same command again to resume where it stopped")]
    Interrupted,

    /// `verify` found outputs that do not match their checksums (or the source).
    #[error("verification failed: {} problem(s)\n{}\n  hint: reconvert the named datasets with `convert --force`", failures.len(), failures.iter().map(|f| format!("  {f}")).collect::<Vec<_>>().join("\n"))]
    Verify { failures: Vec<String> },

    /// `ingest` could not convert some sources (the others were converted).
    #[error("{} source(s) failed\n{}\n  hint: fix or replace the named sources; the next ingest retries them", failures.len(), failures.iter().map(|f| format!("  {f}")).collect::<Vec<_>>().join("\n"))]
    SourcesFailed { failures: Vec<String> },

    /// The command line asks for something impossible in this environment (e.g. `--shard auto`
    /// outside a job array).
    #[error("{problem}\n  hint: {hint}")]
    Usage { problem: String, hint: String },

    /// A shard task does not belong to the sharded run already under way for its dataset.
    #[error("{}: this folder holds a sharded run that this task does not belong to: {why}\n  hint: finish it (`finalize`) or remove the folder, then submit every shard again with the same --shard count, source and pipeline", path.display())]
    ShardConflict { path: PathBuf, why: String },

    /// `finalize` found shards missing or damaged; nothing was published.
    #[error("{}: cannot finalize, {} problem(s):\n{}\n  hint: resubmit the named shard tasks (the same `convert ... --shard K/N` command), then run finalize again", path.display(), problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    ShardsIncomplete {
        path: PathBuf,
        problems: Vec<String>,
    },

    /// A request to an object store failed: unreachable, refused credentials, missing bucket.
    #[error("{url}: {problem}\n  hint: {hint}")]
    Remote {
        url: String,
        problem: String,
        hint: String,
        /// The credentials were refused (exit 77, EX_NOPERM).
        denied: bool,
    },

    /// A check of our own output failed: a bug in this tool, not in the input.
    #[error("internal error: {0}\n  hint: this is a bug in sensorium-ingest; please report it with the command line")]
    Internal(String),
}

/// What to do about a failed file-system operation, by its kind.
fn io_hint(path: &std::path::Path, e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    if disk_full(e) {
        return full_disk_hint(path);
    }
    let hint = match e.kind() {
        K::ReadOnlyFilesystem => {
            "the folder is on a read-only file system; choose a writable --out folder"
        }
        K::PermissionDenied => "check the permissions of the file and the folders above it",
        K::NotFound => "check the path",
        K::AlreadyExists | K::NotADirectory | K::IsADirectory => {
            "a file or folder of that name is in the way; move it or choose another path"
        }
        K::InvalidData => "the file is not UTF-8 text",
        _ => "check the path, the disk and its permissions, then run again",
    };
    hint.to_string()
}

fn disk_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(e.kind(), K::StorageFull | K::QuotaExceeded) || says_disk_full(e)
}

/// Errors of the writers' libraries (zarrs, parquet) reach here as text inside an
/// `io::Error` of kind `Other`: the operating system's own words still tell a full disk.
fn says_disk_full(e: &std::io::Error) -> bool {
    let text = e.to_string();
    [
        "os error 28)",
        "os error 122)",
        "No space left on device",
        "Disk quota exceeded",
    ]
    .iter()
    .any(|s| text.contains(s))
}

/// What a full disk means for this run: the space it needs against the space left.
fn full_disk_hint(path: &std::path::Path) -> String {
    use crate::disk::{free_bytes, human, needed};
    let free = free_bytes(path).map_or_else(|| "unknown".into(), human);
    let need = needed().map_or_else(String::new, |n| {
        format!("; the run needs about {} in all", human(n))
    });
    format!("the disk is full ({free} free on the file system of {}{need}): free some space or choose an --out folder on a larger disk, then run the same command again: it resumes where it stopped, from the staging folder it kept (nothing was published)", path.display())
}

impl Error {
    pub fn bad_input(
        location: impl Into<String>,
        problem: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Error::BadInput {
            location: location.into(),
            problem: problem.into(),
            hint: hint.into(),
        }
    }

    pub fn bad_pipeline(
        file: impl Into<String>,
        problem: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Error::BadPipeline {
            file: file.into(),
            line: None,
            problem: problem.into(),
            hint: hint.into(),
        }
    }

    pub fn usage(problem: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Usage {
            problem: problem.into(),
            hint: hint.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, action: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }

    /// A write failed because the file system is full (or the user's quota is used up).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::Io { source, .. } if disk_full(source))
    }

    /// Exit codes follow BSD `sysexits.h`, so shell scripts and schedulers can tell classes apart.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::BadInput { .. } => 65,                              // EX_DATAERR
            Error::BadPipeline { .. } => 78,                           // EX_CONFIG
            Error::Io { .. } | Error::NoSpace { .. } => 74,            // EX_IOERR
            Error::Exists { .. } | Error::ShardConflict { .. } => 73,  // EX_CANTCREAT
            Error::Busy { .. } | Error::ShardsIncomplete { .. } => 75, // EX_TEMPFAIL: try again later
            Error::Usage { .. } => 2,                                  // as clap's own usage errors
            Error::Interrupted => 130, // the shell's convention for death by SIGINT
            Error::Verify { .. } | Error::SourcesFailed { .. } => 1, // like cmp/diff: the check ran and found differences
            Error::Remote { denied: true, .. } => 77,                // EX_NOPERM
            Error::Remote { .. } => 74,                              // EX_IOERR
            Error::Internal(_) => 70,                                // EX_SOFTWARE
        }
    }
}
