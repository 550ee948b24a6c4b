//! Validation between stages: what a stage wrote, read back from disk, against the plan.

use std::path::Path;

use arrow::datatypes::DataType;

use crate::error::{Error, Result};
use crate::pipeline::plan::{Plan, StagePlan};
use crate::pipeline::spec::{MetaAxis, Stage};
use crate::validate::{self, ExpectedArray};
use crate::writers::parquet::arrow_type;

/// Reads back what a stage wrote and compares it with the plan.
pub fn check_stage_output(
    dir: &Path,
    plan: &Plan,
    stage: &Stage,
    stage_plan: &StagePlan,
) -> Result<()> {
    match (stage, stage_plan) {
        (Stage::TrialArray(c), StagePlan::TrialArray(p)) => {
            let mut shape = vec![p.trials.len() as u64];
            shape.extend(&p.trial_shape);
            let data_type = zarr_type_name(p.dtype);
            validate::check_zarr_array(&ExpectedArray {
                path: &dir.join(&c.output),
                shape: &shape,
                data_type: &data_type,
                dimension_names: &c.dimension_names,
            })?;
        }
        (Stage::Statistics(c), StagePlan::Statistics(p)) => {
            for (name, a) in &p.arrays {
                let rank = a.header.shape.len();
                let var = name.split('/').next().unwrap_or_default();
                let names = match c.dimension_names.get(var) {
                    Some(n) if n.len() == rank => n.clone(),
                    _ => (0..rank).map(|i| format!("dim_{i}")).collect(),
                };
                let data_type = zarr_type_name(a.header.dtype);
                validate::check_zarr_array(&ExpectedArray {
                    path: &dir.join(&c.output).join(name),
                    shape: &a.header.shape,
                    data_type: &data_type,
                    dimension_names: &names,
                })?;
            }
        }
        (Stage::TrialTable(c), StagePlan::TrialTable(p)) => {
            let value = arrow_type(p.dtype).unwrap_or(DataType::Null);
            let mut columns = vec![
                (c.trial_column.clone(), DataType::Int32),
                (c.frame_column.clone(), DataType::Int32),
            ];
            columns.extend(c.columns.iter().map(|n| (n.clone(), value.clone())));
            validate::check_parquet(
                &dir.join(&c.output),
                &columns,
                p.trials.len() as u64 * p.trial_shape[1],
            )?;
        }
        (Stage::MetaTable(c), StagePlan::MetaTable(p)) => {
            let (columns, rows) = validate::read_parquet_schema(&dir.join(&c.output))?;
            let want_rows = if c.axis == MetaAxis::Trial {
                plan.n_trials() as u64
            } else {
                p.rows
            };
            let want_columns = 1
                + c.trial_id_column.iter().count()
                + p.files
                    .iter()
                    .map(|(s, _)| c.split.get(s).map_or(1, |v| v.len()))
                    .sum::<usize>()
                + c.derived.len();
            if rows != want_rows || columns.len() != want_columns {
                return Err(Error::Internal(format!(
                    "{}: {rows} rows and {} columns, expected {want_rows} and {want_columns}",
                    c.output,
                    columns.len()
                )));
            }
        }
        _ => return Err(Error::Internal("stage and plan disagree".into())),
    }
    Ok(())
}

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
