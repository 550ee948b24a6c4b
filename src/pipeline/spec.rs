//! The pipeline file: YAML-declared stages, deserialized strictly (unknown keys are errors).
//! Every key is documented in `docs/pipeline-reference.md`; a test checks the two agree.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};
pub use crate::writers::codec::{Codec, Compression, Shuffle};

/// The default pipeline, embedded in the binary.
pub const DEFAULT_PIPELINE: &str = include_str!("../../pipelines/sensorium2023.yaml");
pub const DEFAULT_PIPELINE_NAME: &str = "pipelines/sensorium2023.yaml (embedded)";

/// Files of the dataset folder that the tool itself writes.
const RESERVED_OUTPUTS: [&str; 2] = ["manifest.json", "run.json"];

const HINT: &str = "see docs/pipeline-reference.md for every key and its type";

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Name recorded in outputs.
    pub pipeline: String,
    /// Schema version of the pipeline file; only 1 exists.
    pub version: u32,
    /// Frame rate of the per-trial arrays, recorded as an attribute.
    pub frame_rate_hz: f64,
    /// Output contract (`schemas/<name>.output.json`) the written dataset is checked against.
    #[serde(default)]
    pub contract: Option<String>,
    /// Source entries ignored on purpose; recorded as skipped in the manifest.
    #[serde(default)]
    pub skip: Vec<SkipRule>,
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SkipRule {
    /// Glob over entry paths relative to the dataset root (`*` within a path part, `**` across).
    pub pattern: String,
    pub reason: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Stage {
    TrialArray(TrialArrayConfig),
    TrialTable(TrialTableConfig),
    Statistics(StatisticsConfig),
    MetaTable(MetaTableConfig),
}

impl Stage {
    pub fn name(&self) -> &'static str {
        match self {
            Stage::TrialArray(_) => "trial_array",
            Stage::TrialTable(_) => "trial_table",
            Stage::Statistics(_) => "statistics",
            Stage::MetaTable(_) => "meta_table",
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Stage::TrialArray(c) => &c.id,
            Stage::TrialTable(c) => &c.id,
            Stage::Statistics(c) => &c.id,
            Stage::MetaTable(c) => &c.id,
        }
    }

    pub fn output(&self) -> &str {
        match self {
            Stage::TrialArray(c) => &c.output,
            Stage::TrialTable(c) => &c.output,
            Stage::Statistics(c) => &c.output,
            Stage::MetaTable(c) => &c.output,
        }
    }

    pub fn source(&self) -> &str {
        match self {
            Stage::TrialArray(c) => &c.source,
            Stage::TrialTable(c) => &c.source,
            Stage::Statistics(c) => &c.source,
            Stage::MetaTable(c) => &c.source,
        }
    }
}

/// Per-trial arrays (`<source>/<trial>.npy`) stacked into one Zarr array with a leading trial axis.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrialArrayConfig {
    /// Unique name of the stage, used in messages, the manifest and `derived`.
    pub id: String,
    pub source: String,
    /// Path of the array inside the dataset folder, e.g. `data.zarr/videos`.
    pub output: String,
    /// One name per output axis (trial axis first).
    pub dimension_names: Vec<String>,
    /// Inner chunk shape (the unit of reading), one extent per output axis.
    pub chunk_shape: Vec<Extent>,
    /// Shard shape (the unit of storage: one file), a multiple of `chunk_shape`.
    pub shard_shape: Vec<Extent>,
    pub compression: Compression,
    #[serde(default)]
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// Per-trial facts computed while copying, for later stages (`valid_frames`, `all_zero`).
    #[serde(default)]
    pub measures: Vec<Measure>,
    /// Where NaN may appear in a trial: `allow` (anywhere, the default) or `tail_only` (only in
    /// the trailing frames in which every value is NaN; a NaN before them stops the run).
    #[serde(default)]
    pub nan: NanPolicy,
}

/// Where NaN may appear in a trial's values (checked while copying, per trial).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NanPolicy {
    /// NaN may appear anywhere; values are copied as they are.
    #[default]
    Allow,
    /// NaN only in the trailing frames in which every value is NaN (the part after the stimulus
    /// ended); any NaN before them is refused as bad input.
    TailOnly,
}

/// Per-trial `(channels, frames)` arrays written as a long table: one row per (trial, frame).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrialTableConfig {
    /// Unique name of the stage, used in messages, the manifest and `derived`.
    pub id: String,
    pub source: String,
    pub output: String,
    /// Column name of the trial number.
    pub trial_column: String,
    /// Column name of the frame index.
    pub frame_column: String,
    /// One column name per row of the source's first axis.
    pub columns: Vec<String>,
    pub compression: Compression,
}

/// Every `<source>/<var>/<subset>/<stat>.npy` copied unchanged to `<output>/<var>/<subset>/<stat>`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatisticsConfig {
    /// Unique name of the stage, used in messages, the manifest and `derived`.
    pub id: String,
    pub source: String,
    pub output: String,
    pub compression: Compression,
    /// Dimension names per variable; arrays whose rank does not match get `dim_0, dim_1, ...`.
    #[serde(default)]
    pub dimension_names: BTreeMap<String, Vec<String>>,
    /// Globs (relative to `source`, without `.npy`) of statistics to leave out; recorded as skipped.
    #[serde(default)]
    pub exclude: Vec<String>,
}

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

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Frames before the trailing frames in which every value is NaN (int32).
    ValidFrames,
    /// Every value of the trial is zero (bool).
    AllZero,
}

impl fmt::Display for Measure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Measure::ValidFrames => "valid_frames",
            Measure::AllZero => "all_zero",
        })
    }
}

/// An axis extent in a chunk or shard shape: a number, or `full` for the whole axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    Full,
    Size(u64),
}

impl Extent {
    pub fn resolve(self, axis_len: u64) -> u64 {
        match self {
            Extent::Full => axis_len.max(1),
            Extent::Size(n) => n,
        }
    }
}

impl JsonSchema for Extent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Extent".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "An axis extent: a positive integer, or `full` for the whole axis.",
            "oneOf": [{"type": "integer", "minimum": 1}, {"const": "full"}]
        })
    }
}

impl Serialize for Extent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Extent::Full => s.serialize_str("full"),
            Extent::Size(n) => s.serialize_u64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Extent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Extent, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Extent;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a positive integer or `full`")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Extent, E> {
                if v == 0 {
                    return Err(E::custom("a chunk or shard extent must be at least 1"));
                }
                Ok(Extent::Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Extent, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("a chunk or shard extent must be at least 1"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Extent, E> {
                if v == "full" {
                    Ok(Extent::Full)
                } else {
                    Err(E::custom(format!(
                        "unknown extent {v:?}: expected a positive integer or `full`"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl Pipeline {
    /// Parses and checks a pipeline file. `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Pipeline> {
        let pipeline: Pipeline = yaml_serde::from_str(text).map_err(|e| {
            let mut problem = e.to_string();
            let mut reported = e.location().map(|l| (l.line(), l.column()));
            // Inside a stage, the tagged enum hides which key was wrong: ask the stage's own type.
            if problem.starts_with("stages") {
                if let Some((id, key, better)) = stage_error(text) {
                    problem = better;
                    let stage = key_location(text, "id", &id, reported);
                    reported = key_location(text, &key, "", stage.or(reported)).or(reported);
                }
            }
            Error::BadPipeline {
                file: file.to_string(),
                line: refine_location(text, &problem, reported).or(reported),
                problem,
                hint: HINT.to_string(),
            }
        })?;
        pipeline.check(file)?;
        Ok(pipeline)
    }

    /// The JSON Schema of pipeline files (`schemas/pipeline.schema.json` is this, committed).
    pub fn json_schema() -> String {
        let schema = schemars::schema_for!(Pipeline);
        let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
        text.push('\n');
        text
    }

    /// BLAKE3 of the pipeline's text, recorded in every output.
    pub fn hash(text: &str) -> String {
        format!("blake3:{}", blake3::hash(text.as_bytes()).to_hex())
    }

    fn check(&self, file: &str) -> Result<()> {
        let bad = |problem: String, hint: &str| Err(Error::bad_pipeline(file, problem, hint));
        if self.version != 1 {
            return bad(
                format!("version {} is not supported", self.version),
                "this tool reads pipeline files of version 1",
            );
        }
        if !(self.frame_rate_hz.is_finite() && self.frame_rate_hz > 0.0) {
            return bad("frame_rate_hz must be a positive number".into(), HINT);
        }
        if let Some(name) = &self.contract {
            if crate::validate::contract::load(name).is_none() {
                return bad(format!("unknown contract {name:?}"), "known contracts: sensorium2023; remove `contract` for a pipeline whose outputs differ from it");
            }
        }
        if self.stages.is_empty() {
            return bad("the pipeline has no stages".into(), HINT);
        }
        let mut ids = std::collections::BTreeSet::new();
        let mut outputs = std::collections::BTreeSet::new();
        for (i, stage) in self.stages.iter().enumerate() {
            let here = format!("stages[{i}] ({})", stage.id());
            if !is_plain_name(stage.id()) {
                return bad(
                    format!("{here}: id must be letters, digits, `_` or `-`"),
                    HINT,
                );
            }
            if !ids.insert(stage.id()) {
                return bad(
                    format!("{here}: a second stage has the id {:?}", stage.id()),
                    "give every stage its own id",
                );
            }
            let output = stage.output();
            check_relative_path(output).or_else(|p| bad(format!("{here}: output {output:?} {p}"), "outputs are paths inside the dataset folder, like `data.zarr/videos` or `trials.parquet`"))?;
            check_relative_path(stage.source()).or_else(|p| {
                bad(
                    format!("{here}: source {:?} {p}", stage.source()),
                    "sources are folders inside the dataset, like `data/videos`",
                )
            })?;
            if let Some(reserved) = output
                .split('/')
                .next()
                .filter(|first| RESERVED_OUTPUTS.contains(first))
            {
                return bad(
                    format!("{here}: output {output:?} would overwrite {reserved}, which the tool writes itself"),
                    "choose another output path",
                );
            }
            if !outputs.insert(output.to_string()) {
                return bad(
                    format!("{here}: output {output:?} is written by an earlier stage too"),
                    "give every stage its own output",
                );
            }
            match stage {
                Stage::TrialArray(c) => {
                    let rank = c.dimension_names.len();
                    if rank < 2 {
                        return bad(format!("{here}: dimension_names needs the trial axis and at least one more"), HINT);
                    }
                    if c.chunk_shape.len() != rank || c.shard_shape.len() != rank {
                        return bad(format!("{here}: chunk_shape and shard_shape need {rank} extents, one per dimension name"), HINT);
                    }
                    if !output.contains(".zarr/") {
                        return bad(
                            format!("{here}: output {output:?} is not inside a `.zarr` group"),
                            "write arrays to e.g. `data.zarr/videos`",
                        );
                    }
                    check_codec(&c.compression, false)
                        .or_else(|p| bad(format!("{here}: {p}"), HINT))?;
                }
                Stage::Statistics(c) => {
                    if !output.contains(".zarr") {
                        return bad(
                            format!("{here}: output {output:?} is not inside a `.zarr` group"),
                            "write statistics to e.g. `data.zarr/statistics`",
                        );
                    }
                    check_codec(&c.compression, false)
                        .or_else(|p| bad(format!("{here}: {p}"), HINT))?;
                }
                Stage::TrialTable(c) => {
                    if !output.ends_with(".parquet") {
                        return bad(
                            format!("{here}: output {output:?} must end in .parquet"),
                            HINT,
                        );
                    }
                    let mut names = vec![&c.trial_column, &c.frame_column];
                    names.extend(c.columns.iter());
                    check_column_names(&names).or_else(|p| bad(format!("{here}: {p}"), HINT))?;
                    check_codec(&c.compression, true)
                        .or_else(|p| bad(format!("{here}: {p}"), HINT))?;
                }
                Stage::MetaTable(c) => {
                    if !output.ends_with(".parquet") {
                        return bad(
                            format!("{here}: output {output:?} must end in .parquet"),
                            HINT,
                        );
                    }
                    if c.axis == MetaAxis::Neuron
                        && (c.trial_id_column.is_some() || !c.derived.is_empty())
                    {
                        return bad(
                            format!(
                                "{here}: trial_id_column and derived apply to trial tables only"
                            ),
                            HINT,
                        );
                    }
                    for d in &c.derived {
                        let Some(pos) = self.stages.iter().position(|s| s.id() == d.stage) else {
                            return bad(format!("{here}: derived column {:?} reads stage {:?}, which does not exist", d.column, d.stage), "name a trial_array stage of this pipeline");
                        };
                        if pos >= i {
                            return bad(format!("{here}: derived column {:?} reads stage {:?}, which runs later", d.column, d.stage), "list the stage that computes a measure before the stage that reads it");
                        }
                        match &self.stages[pos] {
                            Stage::TrialArray(t) if t.measures.contains(&d.measure) => {}
                            _ => return bad(format!("{here}: derived column {:?} reads measure {} of stage {:?}, which does not compute it", d.column, d.measure, d.stage), "add the measure to that stage's `measures`"),
                        }
                    }
                    check_codec(&c.compression, true)
                        .or_else(|p| bad(format!("{here}: {p}"), HINT))?;
                }
            }
        }
        for (a, b) in self
            .stages
            .iter()
            .flat_map(|a| self.stages.iter().map(move |b| (a, b)))
        {
            if b.output().starts_with(&format!("{}/", a.output())) {
                return bad(
                    format!(
                        "output {:?} of stage {} is inside output {:?} of stage {}",
                        b.output(),
                        b.id(),
                        a.output(),
                        a.id()
                    ),
                    "outputs must not contain one another; give each stage its own path",
                );
            }
        }
        for rule in &self.skip {
            if let Err(e) = globset::Glob::new(&rule.pattern) {
                return bad(format!("skip pattern {:?}: {e}", rule.pattern), HINT);
            }
        }
        Ok(())
    }
}

/// Deserializes each stage alone with the type its `kind` names, which reports the key at fault
/// (`columns: invalid type ...`) where the tagged enum only says `stages: invalid type ...`.
/// Returns that key and the message.
fn stage_error(text: &str) -> Option<(String, String, String)> {
    let value: yaml_serde::Value = yaml_serde::from_str(text).ok()?;
    let stages = value.get("stages")?.as_sequence()?;
    for (i, stage) in stages.iter().enumerate() {
        let kind = stage.get("kind")?.as_str()?.to_string();
        let id = stage
            .get("id")
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_string();
        let mut fields = stage.clone();
        fields.as_mapping_mut()?.remove("kind");
        // Through text: errors of `from_str` carry the key path (`columns: invalid type ...`).
        let fields = yaml_serde::to_string(&fields).ok()?;
        let error = match kind.as_str() {
            "trial_array" => yaml_serde::from_str::<TrialArrayConfig>(&fields).err(),
            "trial_table" => yaml_serde::from_str::<TrialTableConfig>(&fields).err(),
            "statistics" => yaml_serde::from_str::<StatisticsConfig>(&fields).err(),
            "meta_table" => yaml_serde::from_str::<MetaTableConfig>(&fields).err(),
            _ => None,
        };
        if let Some(e) = error {
            // The location is inside the re-serialized stage, meaningless to the user.
            let message = e.to_string();
            let message = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(m, _)| m)
                .to_string();
            let key = message
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or_default()
                .to_string();
            return Some((id.clone(), key, format!("stages[{i}] ({id}): {message}")));
        }
    }
    None
}

/// The line and column of `key: value` (any value when `value` is empty) at or after `from`.
fn key_location(
    text: &str,
    key: &str,
    value: &str,
    from: Option<(usize, usize)>,
) -> Option<(usize, usize)> {
    if key.is_empty() {
        return None;
    }
    let from = from.map_or(0, |(line, _)| line.saturating_sub(1));
    text.lines().enumerate().skip(from).find_map(|(i, line)| {
        let trimmed = line.trim_start().trim_start_matches("- ");
        let rest = trimmed.strip_prefix(key)?.strip_prefix(':')?;
        (value.is_empty() || rest.split('#').next().unwrap_or("").trim() == value)
            .then(|| (i + 1, line.len() - trimmed.len() + 1))
    })
}

/// Inside a stage (an internally tagged enum), the YAML parser can only point at the stage's
/// first line; for an unknown key, point at the key itself.
fn refine_location(
    text: &str,
    problem: &str,
    reported: Option<(usize, usize)>,
) -> Option<(usize, usize)> {
    let key = problem
        .split("unknown field `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())?;
    let from = reported.map_or(0, |(line, _)| line.saturating_sub(1));
    text.lines()
        .enumerate()
        .skip(from)
        .find_map(|(i, line)| {
            let trimmed = line.trim_start().trim_start_matches("- ");
            trimmed
                .starts_with(&format!("{key}:"))
                .then(|| (i + 1, line.len() - trimmed.len() + 1))
        })
        .or(reported)
}

fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn check_relative_path(p: &str) -> std::result::Result<(), &'static str> {
    if p.is_empty() || p.starts_with('/') || p.contains('\\') || p.contains(':') {
        return Err("must be a relative path");
    }
    if p.split('/')
        .any(|part| part.is_empty() || part == ".." || part == ".")
    {
        return Err("must not contain `..`, `.` or empty parts");
    }
    Ok(())
}

fn check_column_names(names: &[&String]) -> std::result::Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        if n.is_empty() {
            return Err("column names must not be empty".into());
        }
        if !seen.insert(n.as_str()) {
            return Err(format!("column {n:?} appears twice"));
        }
    }
    Ok(())
}

/// Checks a stage's compression; `table` for Parquet outputs, which have no blosc.
fn check_codec(c: &Compression, table: bool) -> std::result::Result<(), String> {
    if c.codec.is_blosc() && table {
        return Err(
            "blosc codecs are for Zarr arrays; Parquet tables take `zstd`, `gzip` or `none`".into(),
        );
    }
    if c.shuffle.is_some() && !c.codec.is_blosc() {
        return Err("`shuffle` applies to the blosc codecs only".into());
    }
    match (c.codec, c.level) {
        (Codec::Zstd, Some(l)) if !(-7..=22).contains(&l) => {
            Err(format!("zstd level {l} is outside -7..=22"))
        }
        (Codec::Gzip, Some(l)) if !(0..=9).contains(&l) => {
            Err(format!("gzip level {l} is outside 0..=9"))
        }
        (Codec::BloscLz4 | Codec::BloscZstd, Some(l)) if !(0..=9).contains(&l) => {
            Err(format!("blosc level {l} is outside 0..=9"))
        }
        (Codec::None, Some(_)) => Err("codec `none` takes no level".into()),
        _ => Ok(()),
    }
}
