//! sensorium-ingest: datasets of the FileTree family (per-trial `.npy` files in zip archives or
//! folders: Sensorium 2023 and 2022 mice, colour-image mice, labs' own exports) into
//! analysis-ready Zarr v3 arrays and Parquet tables, through YAML-declared stages.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library, whose layers go from the source
//! to the commands; no module uses one of a layer above its own (docs/architecture.md; enforced
//! by `tests/layers.rs`):
//! - foundations: [`error`], [`disk`], [`interrupt`], [`per_thread`], [`progress`];
//! - sources: [`source`] (zip archives and folders, entry by entry, checked against the
//!   container) and [`npy`];
//! - [`writers`]: Zarr (with the project's own shard encoder) and Parquet, with their own
//!   config types;
//! - stage kinds: [`stages`] (one module per kind, the registry), the pipeline file and its
//!   plan ([`pipeline`]), read-back checks and output contracts ([`validate`]);
//! - [`executor`]: staging, validation between stages, checksums, lock, manifest, catalog,
//!   publish; whole runs, `--shard` parts and `finalize`;
//! - [`commands`]: convert, plan, finalize, verify, ingest, inspect.
//!
//! Platforms: Linux is the supported and tested one. Other Unix systems are expected to build
//! and convert the same bytes (best effort, untested), without the Linux-only parts: direct
//! I/O (ordinary writes instead), the read-ahead hint, peak memory, cgroup memory limits and
//! taking over a stale ingest lock (README.md, "Platform"). Other systems are refused at
//! compile time: the readers and writers use Unix positioned I/O and file descriptors.

#[cfg(not(unix))]
compile_error!(
    "sensorium-ingest supports Linux, and other Unix systems on a best-effort basis: it uses Unix \
     positioned reads and writes and file descriptors (std::os::unix, libc). Build it on Linux \
     (or WSL on Windows)."
);

pub mod commands;
pub mod disk;
pub mod error;
pub mod executor;
#[doc(hidden)]
pub mod fuzzing;
pub mod interrupt;
pub mod npy;
pub mod per_thread;
pub mod pipeline;
pub mod progress;
pub mod source;
pub mod stages;
pub mod validate;
pub mod writers;

pub use error::{Error, Result};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
