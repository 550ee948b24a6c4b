//! `meta_table`: the arrays of a meta folder (`meta/trials`, `meta/neurons`) as one Parquet
//! table, one row per trial or neuron, plus columns computed by earlier stages' measures.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int32Array};
use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;

use super::{read_planned, EntryRecord, MeasureValues, StageContext, StageResult};
use crate::error::{Error, Result};
use crate::npy::{self, Kind};
use crate::pipeline::plan::MetaPlan;
use crate::pipeline::spec::MetaAxis;
use crate::writers::parquet::{arrow_type, numeric_column, string_column, TableWriter};

pub fn run(ctx: &StageContext, plan: &MetaPlan) -> Result<StageResult> {
    let c = plan.config;
    let rows = plan.rows as usize;
    let mut fields: Vec<Field> = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    let mut push = |fields: &mut Vec<Field>, name: &str, column: ArrayRef| -> Result<()> {
        if fields.iter().any(|f| f.name() == name) {
            return Err(Error::bad_pipeline(
                ctx.pipeline_file,
                format!("stage {}: two columns are named {name:?}", c.id),
                "use `rename` to give every column its own name",
            ));
        }
        fields.push(Field::new(name, column.data_type().clone(), true));
        columns.push(column);
        Ok(())
    };
    push(
        &mut fields,
        &c.position_column,
        Arc::new(Int32Array::from((0..rows as i32).collect::<Vec<_>>())),
    )?;
    if let (MetaAxis::Trial, Some(name)) = (c.axis, &c.trial_id_column) {
        push(
            &mut fields,
            name,
            Arc::new(Int32Array::from(
                ctx.plan
                    .trial_ids
                    .iter()
                    .map(|&t| t as i32)
                    .collect::<Vec<_>>(),
            )),
        )?;
    }
    let mut reader = ctx.source.reader()?;
    let mut result = StageResult::default();
    for (stem, planned) in &plan.files {
        let (header, bytes, hash) = read_planned(ctx.source, reader.as_mut(), planned)?;
        let payload = &bytes[header.payload_offset..];
        let located = || ctx.source.locate(&ctx.source.entries[planned.entry]);
        arrow_type(header.dtype).ok_or_else(|| {
            Error::bad_input(
                located(),
                format!("dtype {} cannot become a table column", header.dtype),
                "skip the file in the pipeline",
            )
        })?;
        match c.split.get(stem) {
            Some(names) => {
                if !header.dtype.is_numeric() {
                    return Err(Error::bad_input(
                        located(),
                        "only numeric 2-D arrays can be split into columns",
                        "skip the file in the pipeline",
                    ));
                }
                let le = npy::to_little_endian_c(&header, payload);
                for (j, name) in names.iter().enumerate() {
                    push(
                        &mut fields,
                        name,
                        numeric_column(header.dtype, &le, j, names.len())?,
                    )?;
                }
            }
            None => {
                let name = c.rename.get(stem).unwrap_or(stem);
                let column = match header.dtype.kind {
                    Kind::Unicode | Kind::Bytes => {
                        string_column(npy::decode_strings(&header, payload).map_err(|p| {
                            Error::bad_input(located(), p, "re-export the file with numpy")
                        })?)
                    }
                    _ => numeric_column(
                        header.dtype,
                        &npy::to_little_endian_c(&header, payload),
                        0,
                        1,
                    )?,
                };
                push(&mut fields, name, column)?;
            }
        }
        result.bytes += payload.len() as u64;
        result.entries.push(EntryRecord {
            entry: planned.entry,
            blake3: hash,
            output: c.output.clone(),
            values_blake3: None,
            index: None,
        });
    }
    for d in &c.derived {
        let values = ctx
            .measures
            .get(&(d.stage.clone(), d.measure))
            .ok_or_else(|| {
                Error::Internal(format!(
                    "measure {} of stage {} was not computed",
                    d.measure, d.stage
                ))
            })?;
        let column: ArrayRef = match values {
            MeasureValues::Int32(v) => Arc::new(Int32Array::from(v.clone())),
            MeasureValues::Bool(v) => Arc::new(BooleanArray::from(v.clone())),
        };
        if column.len() != rows {
            return Err(Error::Internal(format!(
                "measure {} has {} values for {rows} rows",
                d.measure,
                column.len()
            )));
        }
        push(&mut fields, &d.column, column)?;
    }
    // Source arrays have no nulls (NaN is a value), so no column is nullable.
    let fields: Vec<Field> = fields.into_iter().map(|f| f.with_nullable(false)).collect();
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| Error::Internal(e.to_string()))?;
    let mut writer = TableWriter::create(
        &ctx.dataset_dir.join(&c.output),
        schema,
        &c.compression,
        ctx.provenance,
    )?;
    writer.write(&batch)?;
    writer.finish()?;
    Ok(result)
}
