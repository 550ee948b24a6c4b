//! `meta_table`: the arrays of a meta folder (`meta/trials`, `meta/neurons`) as one Parquet
//! table, one row per trial or neuron, plus columns computed by earlier stages' measures.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_array::{ArrayRef, BooleanArray, Int32Array};
use arrow_schema::{Field, Schema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::kind::{self, ConfigProblem, Description, PlanContext, StageKind, StageNeed};
use super::registry::Stage;
use super::{read_planned, EntryRecord, Measure, MeasureValues, StageContext, StageResult};
use crate::error::{Error, Result};
use crate::npy::{self, Header, Kind};
use crate::pipeline::plan::{ArrayEntry, Disposition, Plan};
use crate::pipeline::spec::{Compression, HINT};
use crate::source::{read_npy, Source};
use crate::validate;
use crate::writers::parquet::{arrow_type, numeric_column, string_column, TableWriter};

/// Axis a meta table describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MetaAxis {
    Trial,
    Neuron,
}

/// The 1-D (and listed 2-D) arrays of a meta folder as one Parquet table, one row per item.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetaTableConfig {
    /// Unique name of the stage, used in messages, the manifest and `derived`.
    pub id: String,
    pub source: String,
    pub output: String,
    pub axis: MetaAxis,
    /// Column holding the row's position on the axis.
    pub position_column: String,
    /// Trial tables only: column holding the trial number (the source file number).
    #[serde(default)]
    pub trial_id_column: Option<String>,
    /// Files (stems) that must exist.
    #[serde(default)]
    pub required: Vec<String>,
    /// Column names for files whose column is not named after the file.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// 2-D files split into one column per second-axis index.
    #[serde(default)]
    pub split: BTreeMap<String, Vec<String>>,
    /// Files (stems) whose columns come first, in this order; the rest follow sorted by name.
    #[serde(default)]
    pub order: Vec<String>,
    /// Columns computed by earlier stages' measures (trial tables only).
    #[serde(default)]
    pub derived: Vec<DerivedColumn>,
    pub compression: Compression,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DerivedColumn {
    pub column: String,
    pub stage: String,
    pub measure: Measure,
}

#[derive(Debug, Clone)]
pub struct MetaPlan<'p> {
    pub config: &'p MetaTableConfig,
    /// `(file stem, entry)` in column order.
    pub files: Vec<(String, ArrayEntry)>,
    pub rows: u64,
}

pub fn run(ctx: &StageContext, plan: &MetaPlan) -> Result<StageResult> {
    let mut table = Columns::new(ctx.pipeline_file, &plan.config.id);
    push_index_columns(ctx, plan, &mut table)?;
    let result = push_file_columns(ctx, plan, &mut table)?;
    push_derived_columns(ctx, plan, &mut table)?;
    write_table(ctx, plan.config, table)?;
    Ok(result)
}

/// The table's columns in order, as they are made. Names must be unique: two files can map to
/// one name through `rename`, `split` or `derived`.
struct Columns<'a> {
    pipeline_file: &'a str,
    stage: &'a str,
    fields: Vec<Field>,
    columns: Vec<ArrayRef>,
}

impl<'a> Columns<'a> {
    fn new(pipeline_file: &'a str, stage: &'a str) -> Columns<'a> {
        Columns {
            pipeline_file,
            stage,
            fields: Vec::new(),
            columns: Vec::new(),
        }
    }

    fn push(&mut self, name: &str, column: ArrayRef) -> Result<()> {
        if self.fields.iter().any(|f| f.name() == name) {
            return Err(Error::bad_pipeline(
                self.pipeline_file,
                format!("stage {}: two columns are named {name:?}", self.stage),
                "use `rename` to give every column its own name",
            ));
        }
        self.fields
            .push(Field::new(name, column.data_type().clone(), true));
        self.columns.push(column);
        Ok(())
    }
}

/// The position on the axis, and for trial tables the trial number where the config names it.
fn push_index_columns(ctx: &StageContext, plan: &MetaPlan, table: &mut Columns) -> Result<()> {
    let c = plan.config;
    let rows = plan.rows as usize;
    table.push(
        &c.position_column,
        Arc::new(Int32Array::from((0..rows as i32).collect::<Vec<_>>())),
    )?;
    if let (MetaAxis::Trial, Some(name)) = (c.axis, &c.trial_id_column) {
        let ids: Vec<i32> = ctx.plan.trial_ids.iter().map(|&t| t as i32).collect();
        table.push(name, Arc::new(Int32Array::from(ids)))?;
    }
    Ok(())
}

/// The meta files' columns, in the plan's order; returns what was read.
fn push_file_columns(
    ctx: &StageContext,
    plan: &MetaPlan,
    table: &mut Columns,
) -> Result<StageResult> {
    let c = plan.config;
    let mut reader = ctx.source.reader()?;
    let mut result = StageResult::default();
    for (stem, planned) in &plan.files {
        let (header, bytes, hash) = read_planned(ctx.source, reader.as_mut(), planned)?;
        let payload = &bytes[header.payload_offset..];
        push_file(ctx, c, (stem, planned), &header, payload, table)?;
        result.bytes += payload.len() as u64;
        result.entries.push(EntryRecord {
            entry: planned.entry,
            blake3: hash,
            output: c.output.clone(),
            values_blake3: None,
            index: None,
        });
    }
    Ok(result)
}

/// One file's column, named after the file (or as `rename` says); a file listed under `split`
/// gives one column per second-axis index.
fn push_file(
    ctx: &StageContext,
    c: &MetaTableConfig,
    (stem, planned): (&str, &ArrayEntry),
    header: &Header,
    payload: &[u8],
    table: &mut Columns,
) -> Result<()> {
    let located = || ctx.source.locate(&ctx.source.entries[planned.entry]);
    arrow_type(header.dtype).ok_or_else(|| {
        Error::bad_input(
            located(),
            format!("dtype {} cannot become a table column", header.dtype),
            "skip the file in the pipeline",
        )
    })?;
    if let Some(names) = c.split.get(stem) {
        if !header.dtype.is_numeric() {
            return Err(Error::bad_input(
                located(),
                "only numeric 2-D arrays can be split into columns",
                "skip the file in the pipeline",
            ));
        }
        let le = npy::to_little_endian_c(header, payload);
        for (j, name) in names.iter().enumerate() {
            table.push(name, numeric_column(header.dtype, &le, j, names.len())?)?;
        }
        return Ok(());
    }
    let name = c.rename.get(stem).map_or(stem, String::as_str);
    let column = match header.dtype.kind {
        Kind::Unicode | Kind::Bytes => string_column(
            npy::decode_strings(header, payload)
                .map_err(|p| Error::bad_input(located(), p, "re-export the file with numpy"))?,
        ),
        _ => numeric_column(
            header.dtype,
            &npy::to_little_endian_c(header, payload),
            0,
            1,
        )?,
    };
    table.push(name, column)
}

/// The columns computed by earlier stages' measures.
fn push_derived_columns(ctx: &StageContext, plan: &MetaPlan, table: &mut Columns) -> Result<()> {
    let rows = plan.rows as usize;
    for d in &plan.config.derived {
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
        table.push(&d.column, column)?;
    }
    Ok(())
}

/// Writes the columns as one record batch.
fn write_table(ctx: &StageContext, c: &MetaTableConfig, table: Columns) -> Result<()> {
    // Source arrays have no nulls (NaN is a value), so no column is nullable.
    let fields: Vec<Field> = table
        .fields
        .into_iter()
        .map(|f| f.with_nullable(false))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), table.columns)
        .map_err(|e| Error::Internal(e.to_string()))?;
    let mut writer = TableWriter::create(
        &ctx.dataset_dir.join(&c.output),
        schema,
        &c.compression,
        ctx.provenance,
    )?;
    writer.write(&batch)?;
    writer.finish()
}

/// Trials per tier, from the source's `tiers.npy` read by a stage (empty when there is none).
pub fn tier_counts(source: &Source, plan: &Plan) -> Result<BTreeMap<String, usize>> {
    let mut tiers = BTreeMap::new();
    let claimed = source
        .entries
        .iter()
        .zip(&plan.dispositions)
        .filter(|(e, d)| {
            matches!(d, Disposition::Stage(_)) && e.path.rsplit('/').next() == Some("tiers.npy")
        });
    for (entry, _) in claimed {
        let mut reader = source.reader()?;
        let (header, bytes) = read_npy(source, reader.as_mut(), entry)?;
        if header.shape != [plan.n_trials() as u64] {
            continue;
        }
        let values =
            npy::decode_strings(&header, &bytes[header.payload_offset..]).map_err(|p| {
                Error::bad_input(source.locate(entry), p, "re-export tiers.npy with numpy")
            })?;
        for v in values {
            *tiers.entry(v).or_insert(0) += 1;
        }
        break;
    }
    Ok(tiers)
}

impl StageKind for MetaTableConfig {
    const KIND: &'static str = "meta_table";
    type Plan<'p> = MetaPlan<'p>;

    fn id(&self) -> &str {
        &self.id
    }
    fn source(&self) -> &str {
        &self.source
    }
    fn output(&self) -> &str {
        &self.output
    }

    fn check(&self, earlier: &[Stage]) -> std::result::Result<(), ConfigProblem> {
        kind::check_table_output(&self.output)?;
        if self.axis == MetaAxis::Neuron
            && (self.trial_id_column.is_some() || !self.derived.is_empty())
        {
            return Err(ConfigProblem::new(
                "trial_id_column and derived apply to trial tables only",
                HINT,
            ));
        }
        for d in &self.derived {
            check_derived(d, earlier)?;
        }
        kind::check_codec(&self.compression, true)
    }

    fn reads(&self) -> Vec<(String, Measure)> {
        self.derived
            .iter()
            .map(|d| (d.stage.clone(), d.measure))
            .collect()
    }

    fn claims(&self, rest: &str) -> bool {
        rest.ends_with(".npy") && !rest.contains('/')
    }

    fn plan<'p>(
        &'p self,
        entries: Vec<ArrayEntry>,
        ctx: &mut PlanContext,
    ) -> Result<Self::Plan<'p>> {
        let source = ctx.source;
        let n_trials = ctx.trial_ids.as_ref().map(|t| t.0.len() as u64);
        let files = self.files_in_order(source, entries)?;
        let known = match self.axis {
            MetaAxis::Trial => n_trials,
            MetaAxis::Neuron => ctx.dims.get("neuron"),
        };
        let rows = self.rows(source, &files, known)?.unwrap_or(0);
        if self.axis == MetaAxis::Neuron {
            ctx.dims.add("neuron", rows, &self.source, source)?;
        }
        Ok(MetaPlan {
            config: self,
            files,
            rows,
        })
    }

    fn zarr_arrays(_plan: &Self::Plan<'_>) -> Vec<String> {
        Vec::new()
    }

    fn memory(plan: &Self::Plan<'_>, source: &Source, _pipeline_file: &str) -> Result<StageNeed> {
        let total: u64 = plan
            .files
            .iter()
            .map(|(_, e)| source.entries.get(e.entry).map_or(0, |e| e.size))
            .sum();
        Ok(StageNeed {
            fixed: total.saturating_mul(3),
            per_thread: 0,
            per_helping_thread: 0,
            items: 1,
        })
    }

    fn run(ctx: &StageContext, plan: &Self::Plan<'_>) -> Result<StageResult> {
        run(ctx, plan)
    }

    fn check_output(dir: &Path, plan: &Plan, p: &Self::Plan<'_>) -> Result<()> {
        let c = p.config;
        let (columns, rows) = validate::read_parquet_schema(&dir.join(&c.output))?;
        let want_rows = match c.axis {
            MetaAxis::Trial => plan.n_trials() as u64,
            MetaAxis::Neuron => p.rows,
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
        Ok(())
    }

    fn describe(_source: &Source, plan: &Self::Plan<'_>) -> Result<Description> {
        let c = plan.config;
        Ok(Description {
            meta_files: plan
                .files
                .iter()
                .map(|(stem, a)| kind::header_line(&format!("{}/{stem}.npy", c.source), &a.header))
                .collect(),
            ..Description::default()
        })
    }
}

impl MetaTableConfig {
    /// The claimed files by stem, in column order (`order` first, the rest by name); every
    /// `required` stem must be among them.
    fn files_in_order(
        &self,
        source: &Source,
        entries: Vec<ArrayEntry>,
    ) -> Result<Vec<(String, ArrayEntry)>> {
        let stem = |a: &ArrayEntry| {
            source.entries[a.entry]
                .path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .trim_end_matches(".npy")
                .to_string()
        };
        let mut files: Vec<(String, ArrayEntry)> =
            entries.into_iter().map(|a| (stem(&a), a)).collect();
        for req in &self.required {
            if !files.iter().any(|(s, _)| s == req) {
                return Err(Error::bad_input(
                format!("{}: {}/{req}.npy", source.path.display(), self.source),
                "required file is missing".to_string(),
                format!("stage {} requires it; check that the source is complete, or remove it from `required`", self.id),
            ));
            }
        }
        let rank = |s: &str| self.order.iter().position(|o| o == s).unwrap_or(usize::MAX);
        files.sort_by(|a, b| (rank(&a.0), &a.0).cmp(&(rank(&b.0), &b.0)));
        Ok(files)
    }

    /// The table's rows: every file's first axis, which must agree with the others and with
    /// `known`, the axis's length where an earlier stage set it.
    fn rows(
        &self,
        source: &Source,
        files: &[(String, ArrayEntry)],
        known: Option<u64>,
    ) -> Result<Option<u64>> {
        let mut rows = known;
        for (name, a) in files {
            self.check_rank(source, name, a)?;
            let len = a.header.shape[0];
            match rows {
                Some(r) if r != len => {
                    let what = match self.axis {
                        MetaAxis::Trial => "trials",
                        MetaAxis::Neuron => "neurons",
                    };
                    let located = source.locate(&source.entries[a.entry]);
                    return Err(Error::bad_input(located, format!("has {len} rows but the dataset has {r} {what}"), "the meta data does not belong to these trials/neurons; re-download the archive"));
                }
                _ => rows = Some(len),
            }
        }
        Ok(rows)
    }

    /// A file is 1-D, or 2-D with one column per name where `split` lists it.
    fn check_rank(&self, source: &Source, name: &str, a: &ArrayEntry) -> Result<()> {
        let shape = &a.header.shape;
        let ok_rank = match self.split.get(name) {
            Some(cols) => shape.len() == 2 && shape[1] == cols.len() as u64,
            None => shape.len() == 1,
        };
        if ok_rank {
            return Ok(());
        }
        let want = match self.split.get(name) {
            Some(cols) => format!("(rows, {})", cols.len()),
            None => "(rows,)".to_string(),
        };
        Err(Error::bad_input(
            source.locate(&source.entries[a.entry]),
            format!(
                "shape {shape:?} does not fit table {}: expected {want}",
                self.output
            ),
            "list 2-D files under `split` in the pipeline, or skip the file with a `skip` rule",
        ))
    }
}

/// A derived column reads a measure that a stage listed earlier computes.
fn check_derived(d: &DerivedColumn, earlier: &[Stage]) -> std::result::Result<(), ConfigProblem> {
    let Some(stage) = earlier.iter().find(|s| s.id() == d.stage) else {
        return Err(ConfigProblem::new(
            format!("derived column {:?} reads stage {:?}, which does not exist or runs later", d.column, d.stage),
            "name a stage listed before this one; list the stage that computes a measure before the stage that reads it",
        ));
    };
    if !stage.measures().contains(&d.measure) {
        return Err(ConfigProblem::new(
            format!(
                "derived column {:?} reads measure {} of stage {:?}, which does not compute it",
                d.column, d.measure, d.stage
            ),
            "add the measure to that stage's `measures`",
        ));
    }
    Ok(())
}
