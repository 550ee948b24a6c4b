//! sensorium-ingest: Sensorium 2023 mouse datasets (per-trial `.npy` files in zip archives)
//! into analysis-ready Zarr v3 arrays and Parquet tables, through YAML-declared stages.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library, whose layers go from the source
//! to the commands; no module uses one of a layer above its own (docs/architecture.md; enforced
//! by `tests/layers.rs`):
//! - foundations: [`error`], [`interrupt`], [`per_thread`], [`progress`];
//! - sources: [`source`] (zip archives and folders, entry by entry, checked against the
//!   container) and [`npy`];
//! - [`writers`]: Zarr (with the project's own shard encoder) and Parquet, with their own
//!   config types;
//! - stage kinds: [`stages`] (one module per kind, the registry), the pipeline file and its
//!   plan ([`pipeline`]), read-back checks and output contracts ([`validate`]);
//! - [`executor`]: staging, validation between stages, checksums, lock, manifest, catalog,
//!   publish; whole runs, `--shard` parts and `finalize`;
//! - [`commands`]: convert, plan, finalize, verify, ingest, inspect.

pub mod commands;
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
