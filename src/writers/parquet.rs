//! Parquet tables through `arrow` + `parquet`: zstd, dictionary-encoded strings, provenance
//! in the key-value metadata. Files are written in row groups, never held whole.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_array::{
    ArrayRef, BooleanArray, Float16Array, Float32Array, Float64Array, Int16Array, Int32Array,
    Int64Array, Int8Array, StringArray, UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use arrow_schema::{DataType, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{GzipLevel, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::Provenance;
use crate::error::{Error, Result};
use crate::npy::{Dtype, Kind};
use crate::writers::codec::{Codec, Compression};

pub struct TableWriter {
    path: PathBuf,
    writer: ArrowWriter<File>,
}

impl TableWriter {
    pub fn create(
        path: &Path,
        schema: SchemaRef,
        compression: &Compression,
        provenance: &Provenance,
    ) -> Result<TableWriter> {
        let file = super::unlink_existing(path)
            .and_then(|()| File::create(path))
            .map_err(|e| Error::io(path, "cannot create the table", e))?;
        let codec = match compression.codec {
            Codec::Zstd => parquet::basic::Compression::ZSTD(
                ZstdLevel::try_new(compression.level.unwrap_or(3))
                    .map_err(|e| Error::Internal(e.to_string()))?,
            ),
            Codec::Gzip => parquet::basic::Compression::GZIP(
                GzipLevel::try_new(compression.level.unwrap_or(6) as u32)
                    .map_err(|e| Error::Internal(e.to_string()))?,
            ),
            Codec::None => parquet::basic::Compression::UNCOMPRESSED,
            // Refused for tables when the pipeline is checked.
            Codec::BloscLz4 | Codec::BloscZstd => {
                return Err(Error::Internal(
                    "a blosc codec reached the Parquet writer".into(),
                ))
            }
        };
        let metadata = vec![
            KeyValue::new(
                "sensorium_ingest.version".into(),
                provenance.tool_version.clone(),
            ),
            KeyValue::new(
                "sensorium_ingest.dataset".into(),
                provenance.dataset.clone(),
            ),
            KeyValue::new("sensorium_ingest.source".into(), provenance.source.clone()),
            KeyValue::new(
                "sensorium_ingest.pipeline".into(),
                provenance.pipeline.clone(),
            ),
            KeyValue::new("sensorium_ingest.stage".into(), provenance.stage.clone()),
            KeyValue::new(
                "sensorium_ingest.stage_hash".into(),
                provenance.stage_hash.clone(),
            ),
        ];
        // Dictionaries help repeated strings (tiers, areas) and hurt measurements; enable them
        // for string columns only.
        let mut props = WriterProperties::builder()
            .set_compression(codec)
            .set_dictionary_enabled(false)
            .set_key_value_metadata(Some(metadata))
            .set_created_by(format!("sensorium-ingest {}", provenance.tool_version));
        for field in schema.fields() {
            if field.data_type() == &DataType::Utf8 {
                props = props
                    .set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), true);
            }
        }
        let writer = ArrowWriter::try_new(file, schema, Some(props.build()))
            .map_err(|e| Error::Internal(format!("cannot start table {}: {e}", path.display())))?;
        Ok(TableWriter {
            path: path.to_path_buf(),
            writer,
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch).map_err(|e| self.err(e))
    }

    pub fn finish(self) -> Result<()> {
        let path = self.path.clone();
        let file = self.writer.into_inner().map_err(|e| {
            Error::io(
                &path,
                "cannot write the table",
                std::io::Error::other(e.to_string()),
            )
        })?;
        file.sync_all()
            .map_err(|e| Error::io(&path, "cannot flush the table", e))
    }

    fn err(&self, e: parquet::errors::ParquetError) -> Error {
        Error::io(
            &self.path,
            "cannot write the table",
            std::io::Error::other(e.to_string()),
        )
    }
}

/// The Arrow type a numpy dtype becomes in a table.
pub fn arrow_type(dtype: Dtype) -> Option<DataType> {
    Some(match (dtype.kind, dtype.size) {
        (Kind::Float, 2) => DataType::Float16,
        (Kind::Float, 4) => DataType::Float32,
        (Kind::Float, 8) => DataType::Float64,
        (Kind::Int, 1) => DataType::Int8,
        (Kind::Int, 2) => DataType::Int16,
        (Kind::Int, 4) => DataType::Int32,
        (Kind::Int, 8) => DataType::Int64,
        (Kind::UInt, 1) => DataType::UInt8,
        (Kind::UInt, 2) => DataType::UInt16,
        (Kind::UInt, 4) => DataType::UInt32,
        (Kind::UInt, 8) => DataType::UInt64,
        (Kind::Bool, 1) => DataType::Boolean,
        (Kind::Unicode | Kind::Bytes, _) => DataType::Utf8,
        _ => return None,
    })
}

/// An Arrow column from little-endian elements of a numeric dtype, taking every `stride`-th
/// element starting at `offset` (stride 1, offset 0 for a whole 1-D array).
pub fn numeric_column(
    dtype: Dtype,
    le_bytes: &[u8],
    offset: usize,
    stride: usize,
) -> Result<ArrayRef> {
    let size = dtype.size;
    let elements = le_bytes
        .chunks_exact(size)
        .skip(offset)
        .step_by(stride.max(1));
    macro_rules! prim {
        ($array:ty, $t:ty) => {
            Arc::new(<$array>::from(
                elements
                    .map(|b| <$t>::from_le_bytes(b.try_into().unwrap_or_default()))
                    .collect::<Vec<$t>>(),
            )) as ArrayRef
        };
    }
    Ok(match (dtype.kind, size) {
        (Kind::Float, 2) => Arc::new(Float16Array::from(
            elements
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
                .collect::<Vec<_>>(),
        )),
        (Kind::Float, 4) => prim!(Float32Array, f32),
        (Kind::Float, 8) => prim!(Float64Array, f64),
        (Kind::Int, 1) => prim!(Int8Array, i8),
        (Kind::Int, 2) => prim!(Int16Array, i16),
        (Kind::Int, 4) => prim!(Int32Array, i32),
        (Kind::Int, 8) => prim!(Int64Array, i64),
        (Kind::UInt, 1) => prim!(UInt8Array, u8),
        (Kind::UInt, 2) => prim!(UInt16Array, u16),
        (Kind::UInt, 4) => prim!(UInt32Array, u32),
        (Kind::UInt, 8) => prim!(UInt64Array, u64),
        (Kind::Bool, 1) => Arc::new(BooleanArray::from(
            elements.map(|b| b[0] != 0).collect::<Vec<bool>>(),
        )),
        _ => return Err(Error::Internal(format!("dtype {dtype} is not numeric"))),
    })
}

pub fn string_column(values: Vec<String>) -> ArrayRef {
    Arc::new(StringArray::from(values))
}
