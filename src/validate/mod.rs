//! Checks between stages and before a dataset is declared complete: outputs are read back from
//! disk (Zarr metadata, Parquet schemas and row counts) and compared with what the plan expects
//! and with the output contract in `schemas/`; every output file is hashed for the manifest.

pub mod contract;

use std::fs::File;
use std::path::Path;

use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{Error, Result};

/// What a Zarr array's `zarr.json` must say.
pub struct ExpectedArray<'a> {
    pub path: &'a Path,
    pub shape: &'a [u64],
    pub data_type: &'a str,
    pub dimension_names: &'a [String],
}

fn mismatch(path: &Path, problem: String) -> Error {
    Error::Internal(format!(
        "{}: written output does not match the plan: {problem}",
        path.display()
    ))
}

/// Reads `<array>/zarr.json` back and checks node type, shape, data type and dimension names.
pub fn check_zarr_array(expected: &ExpectedArray) -> Result<serde_json::Value> {
    let meta_path = expected.path.join("zarr.json");
    let text = std::fs::read_to_string(&meta_path)
        .map_err(|e| Error::io(&meta_path, "cannot read back", e))?;
    let meta: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| mismatch(&meta_path, e.to_string()))?;
    let shape: Vec<u64> = meta["shape"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    if meta["node_type"] != "array" || meta["zarr_format"] != 3 {
        return Err(mismatch(&meta_path, "not a Zarr v3 array".into()));
    }
    if shape != expected.shape {
        return Err(mismatch(
            &meta_path,
            format!("shape {shape:?}, expected {:?}", expected.shape),
        ));
    }
    if meta["data_type"] != expected.data_type {
        return Err(mismatch(
            &meta_path,
            format!(
                "data type {}, expected {}",
                meta["data_type"], expected.data_type
            ),
        ));
    }
    let names: Vec<&str> = meta["dimension_names"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if names != expected.dimension_names {
        return Err(mismatch(
            &meta_path,
            format!(
                "dimension names {names:?}, expected {:?}",
                expected.dimension_names
            ),
        ));
    }
    Ok(meta)
}

/// Reads a Parquet file's footer back and returns its columns and row count.
pub fn read_parquet_schema(path: &Path) -> Result<(Vec<(String, DataType)>, u64)> {
    let file = File::open(path).map_err(|e| Error::io(path, "cannot read back", e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| mismatch(path, e.to_string()))?;
    let rows = builder.metadata().file_metadata().num_rows() as u64;
    let columns = builder
        .schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    Ok((columns, rows))
}

pub fn check_parquet(path: &Path, columns: &[(String, DataType)], rows: u64) -> Result<()> {
    let (have, have_rows) = read_parquet_schema(path)?;
    if have != columns {
        return Err(mismatch(
            path,
            format!("columns {have:?}, expected {columns:?}"),
        ));
    }
    if have_rows != rows {
        return Err(mismatch(path, format!("{have_rows} rows, expected {rows}")));
    }
    Ok(())
}

/// Every file below `dir`, as sorted `/`-separated paths relative to it.
pub fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    files.sort();
    Ok(files)
}

/// Size and BLAKE3 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut hasher = blake3::Hasher::new();
    let file = File::open(path).map_err(|e| Error::io(path, "cannot read back", e))?;
    hasher
        .update_reader(file)
        .map_err(|e| Error::io(path, "cannot read back", e))?;
    Ok((hasher.count(), hasher.finalize().to_hex().to_string()))
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for item in std::fs::read_dir(dir).map_err(|e| Error::io(dir, "cannot list", e))? {
        let path = item.map_err(|e| Error::io(dir, "cannot list", e))?.path();
        if path.is_dir() {
            collect(root, &path, out)?;
        } else {
            let rel = path
                .strip_prefix(root)
                .map_err(|_| Error::Internal("output outside the dataset".into()))?;
            out.push(
                rel.to_string_lossy()
                    .replace(std::path::MAIN_SEPARATOR, "/"),
            );
        }
    }
    Ok(())
}

/// The Zarr v3 data type name of a numpy dtype.
pub fn zarr_type_name(dtype: crate::npy::Dtype) -> String {
    use crate::npy::Kind;
    match dtype.kind {
        Kind::Float => format!("float{}", dtype.size * 8),
        Kind::Int => format!("int{}", dtype.size * 8),
        Kind::UInt => format!("uint{}", dtype.size * 8),
        Kind::Bool => "bool".into(),
        _ => "unsupported".into(),
    }
}
