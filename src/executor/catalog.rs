//! The store's catalog: one Parquet fragment per dataset (`STORE/catalog/<name>.parquet`),
//! read as one table with a glob (`read_parquet('STORE/catalog/*.parquet')`). One file per
//! dataset, written aside and renamed, so parallel jobs on a shared file system never write
//! the same file and need no locks.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Int64Builder, ListBuilder, StringBuilder, StructBuilder};
use arrow_array::RecordBatch;
use arrow_array::{Array, ArrayRef, Int64Array, StringArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};

pub const FOLDER: &str = "catalog";

/// One dataset of the store.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CatalogRow {
    pub dataset: String,
    pub source_name: String,
    /// BLAKE3 over the source's entries and their content hashes (as in the manifest).
    pub source_checksum: String,
    /// The cheap container fingerprint (as in the lock), used to recognise a source again.
    pub source_fingerprint: String,
    pub n_trials: i64,
    pub tiers: BTreeMap<String, i64>,
    pub n_neurons: Option<i64>,
    pub n_frames: Option<i64>,
    pub dtype: String,
    pub tool_version: String,
    pub pipeline: String,
    pub pipeline_hash: String,
    pub status: String,
}

fn tier_fields() -> Fields {
    Fields::from(vec![
        Field::new("tier", DataType::Utf8, false),
        Field::new("trials", DataType::Int64, false),
    ])
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("dataset", DataType::Utf8, false),
        Field::new("source_name", DataType::Utf8, false),
        Field::new("source_checksum", DataType::Utf8, false),
        Field::new("source_fingerprint", DataType::Utf8, false),
        Field::new("n_trials", DataType::Int64, false),
        Field::new(
            "tiers",
            DataType::List(Arc::new(Field::new(
                "item",
                DataType::Struct(tier_fields()),
                true,
            ))),
            false,
        ),
        Field::new("n_neurons", DataType::Int64, true),
        Field::new("n_frames", DataType::Int64, true),
        Field::new("dtype", DataType::Utf8, false),
        Field::new("tool_version", DataType::Utf8, false),
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("pipeline_hash", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
    ]))
}

pub fn fragment_path(store: &Path, dataset: &str) -> PathBuf {
    store.join(FOLDER).join(format!("{dataset}.parquet"))
}

/// Writes (or replaces) a dataset's catalog fragment atomically.
pub fn write(store: &Path, row: &CatalogRow) -> Result<()> {
    write_aside(store, row)?.put_in_place()
}

/// A catalog fragment written and flushed beside its place, put there once its dataset is
/// published: a disk that fills up on the catalog then stops the run before it publishes.
pub struct StagedRow {
    tmp: PathBuf,
    path: PathBuf,
    placed: bool,
}

impl StagedRow {
    pub fn put_in_place(mut self) -> Result<()> {
        self.placed = true;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::io(&self.path, "cannot publish the catalog fragment", e))
    }
}

impl Drop for StagedRow {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes the dataset's fragment aside (`catalog/.<name>.parquet.<pid>.tmp`, which listings
/// skip).
pub fn write_aside(store: &Path, row: &CatalogRow) -> Result<StagedRow> {
    let dir = store.join(FOLDER);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(&dir, "cannot create the catalog folder", e))?;
    let staged = StagedRow {
        tmp: dir.join(format!(
            ".{}.parquet.{}.tmp",
            row.dataset,
            std::process::id()
        )),
        path: fragment_path(store, &row.dataset),
        placed: false,
    };
    let batch = row_batch(row)?;
    let failed = |e: String| {
        Error::io(
            &staged.tmp,
            "cannot write the catalog",
            std::io::Error::other(e),
        )
    };
    let file = File::create(&staged.tmp)
        .map_err(|e| Error::io(&staged.tmp, "cannot write the catalog", e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).map_err(|e| Error::Internal(e.to_string()))?,
        ))
        .set_created_by(format!("sensorium-ingest {}", crate::VERSION))
        .build();
    let mut writer = ArrowWriter::try_new(file, schema(), Some(props))
        .map_err(|e| Error::Internal(e.to_string()))?;
    writer.write(&batch).map_err(|e| failed(e.to_string()))?;
    let file = writer.into_inner().map_err(|e| failed(e.to_string()))?;
    file.sync_all()
        .map_err(|e| Error::io(&staged.tmp, "cannot flush the catalog", e))?;
    Ok(staged)
}

/// The row as a one-row record batch.
fn row_batch(row: &CatalogRow) -> Result<RecordBatch> {
    let text = |v: &str| Arc::new(StringArray::from(vec![v.to_string()])) as ArrayRef;
    let mut tiers = ListBuilder::new(StructBuilder::new(
        tier_fields(),
        vec![
            Box::new(StringBuilder::new()),
            Box::new(Int64Builder::new()),
        ],
    ));
    for (tier, n) in &row.tiers {
        let s = tiers.values();
        if let Some(b) = s.field_builder::<StringBuilder>(0) {
            b.append_value(tier);
        }
        if let Some(b) = s.field_builder::<Int64Builder>(1) {
            b.append_value(*n);
        }
        s.append(true);
    }
    tiers.append(true);
    let columns: Vec<ArrayRef> = vec![
        text(&row.dataset),
        text(&row.source_name),
        text(&row.source_checksum),
        text(&row.source_fingerprint),
        Arc::new(Int64Array::from(vec![row.n_trials])),
        Arc::new(tiers.finish()),
        Arc::new(Int64Array::from(vec![row.n_neurons])),
        Arc::new(Int64Array::from(vec![row.n_frames])),
        text(&row.dtype),
        text(&row.tool_version),
        text(&row.pipeline),
        text(&row.pipeline_hash),
        text(&row.status),
    ];
    RecordBatch::try_new(schema(), columns).map_err(|e| Error::Internal(e.to_string()))
}

/// `(dataset, source_fingerprint)` of every fragment in the store; unreadable fragments are
/// skipped with a warning (a rerun of that dataset's conversion rewrites it).
pub fn fingerprints(store: &Path) -> Vec<(String, String)> {
    let Ok(listing) = std::fs::read_dir(store.join(FOLDER)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for path in listing.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') || !name.ends_with(".parquet") {
            continue;
        }
        match read_fingerprint(&path) {
            Ok(pair) => out.push(pair),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable catalog fragment")
            }
        }
    }
    out.sort();
    out
}

/// Whether the dataset's catalog row describes this source and pipeline: false when the row is
/// missing, unreadable or from an earlier version of the dataset (a replacement killed between
/// its publish and its catalog row).
pub fn describes(store: &Path, dataset: &str, fingerprint: &str, pipeline_hash: &str) -> bool {
    let path = fragment_path(store, dataset);
    read_columns(&path, &["dataset", "source_fingerprint", "pipeline_hash"])
        .is_ok_and(|v| v == [dataset, fingerprint, pipeline_hash])
}

fn read_fingerprint(path: &Path) -> std::result::Result<(String, String), String> {
    let mut values = read_columns(path, &["dataset", "source_fingerprint"])?.into_iter();
    match (values.next(), values.next()) {
        (Some(d), Some(f)) => Ok((d, f)),
        _ => Err("no row".into()),
    }
}

/// The first row's values of these string columns.
fn read_columns(path: &Path, names: &[&str]) -> std::result::Result<Vec<String>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| e.to_string())?;
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .filter(|c| !c.is_empty())
                .map(|c| c.value(0).to_string())
        };
        if let Some(values) = names.iter().map(|n| col(n)).collect::<Option<Vec<_>>>() {
            return Ok(values);
        }
    }
    Err("no row".into())
}
