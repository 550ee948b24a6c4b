//! sensorium-ingest: Sensorium 2023 mouse datasets (per-trial `.npy` files in zip archives)
//! into analysis-ready Zarr v3 arrays and Parquet tables, through YAML-declared stages.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library:
//! - [`source`]: reading archives and folders, entry by entry, checked against the container;
//! - [`npy`]: `.npy` headers and payloads;
//! - [`pipeline`]: the pipeline file ([`pipeline::spec`]), the plan for one source, the runner;
//! - [`stages`]: one module per stage kind;
//! - [`writers`]: Zarr and Parquet;
//! - [`validate`]: read-back checks, output contracts and checksums; [`manifest`].
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

pub mod catalog;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
pub mod inspect;
pub mod interrupt;
pub mod lock;
pub mod manifest;
pub mod npy;
pub mod per_thread;
pub mod pipeline;
pub mod progress;
pub mod source;
pub mod stages;
pub mod validate;
pub mod verify;
pub mod writers;

pub use error::{Error, Result};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
