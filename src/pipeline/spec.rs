//! The pipeline file: YAML-declared stages, deserialized strictly (unknown keys are errors).
//! Every key is documented in `docs/pipeline-reference.md`; a test checks the two agree.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::stages::registry::{config_error, Stage};
pub use crate::writers::codec::{Codec, Compression, Shuffle};

/// The dimension name that marks a frame (time) axis.
pub const FRAME_DIMENSION: &str = "frame";

/// The default pipeline (the first embedded one), as `default-pipeline` prints it.
pub const DEFAULT_PIPELINE: &str = super::embedded::EMBEDDED[0].1;

/// Files of the dataset folder that the tool itself writes.
const RESERVED_OUTPUTS: [&str; 2] = ["manifest.json", "run.json"];

pub(crate) const HINT: &str = "see docs/pipeline-reference.md for every key and its type";

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Name recorded in outputs.
    pub pipeline: String,
    /// Schema version of the pipeline file; only 1 exists.
    pub version: u32,
    /// Frame rate of the per-trial arrays, recorded as an attribute of the arrays that have a
    /// `frame` axis. Required when a stage has a frame axis, refused when none has: a rate
    /// that describes no axis would be recorded nowhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_rate_hz: Option<f64>,
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

    /// The stage that has a frame axis, if any: an array with a `frame` dimension or a table
    /// with a frame column.
    pub fn frame_axis_stage(&self) -> Option<&str> {
        self.stages
            .iter()
            .find(|s| s.has_frame_axis())
            .map(Stage::id)
    }

    fn check_frame_rate(&self) -> std::result::Result<(), (String, &'static str)> {
        match (self.frame_rate_hz, self.frame_axis_stage()) {
            (Some(rate), Some(_)) if !(rate.is_finite() && rate > 0.0) => Err((
                "frame_rate_hz must be a positive number".into(),
                HINT,
            )),
            (None, Some(stage)) => Err((
                format!("stage {stage} has a frame axis, so the pipeline needs `frame_rate_hz`"),
                "add e.g. `frame_rate_hz: 30.0` at the top of the pipeline file",
            )),
            (Some(_), None) => Err((
                "frame_rate_hz is set but no stage has a frame axis (a `frame` dimension or a `frame_column`)".into(),
                "remove `frame_rate_hz`, or name the frame axis of the stage that has one",
            )),
            _ => Ok(()),
        }
    }

    fn check(&self, file: &str) -> Result<()> {
        if self.version != 1 {
            return bad(
                file,
                format!("version {} is not supported", self.version),
                "this tool reads pipeline files of version 1",
            );
        }
        self.check_frame_rate().or_else(|(p, h)| bad(file, p, h))?;
        self.check_contract(file)?;
        if self.stages.is_empty() {
            return bad(file, "the pipeline has no stages".into(), HINT);
        }
        let mut seen = SeenStages::default();
        for (i, stage) in self.stages.iter().enumerate() {
            let here = format!("stages[{i}] ({})", stage.id());
            check_stage_common(file, &here, stage, &mut seen)?;
            stage
                .check(&self.stages[..i])
                .or_else(|p| bad(file, format!("{here}: {}", p.problem), &p.hint))?;
        }
        self.check_nested_outputs(file)?;
        for rule in &self.skip {
            if let Err(e) = globset::Glob::new(&rule.pattern) {
                return bad(file, format!("skip pattern {:?}: {e}", rule.pattern), HINT);
            }
        }
        Ok(())
    }

    fn check_contract(&self, file: &str) -> Result<()> {
        let Some(name) = &self.contract else {
            return Ok(());
        };
        if crate::validate::contract::load(name).is_some() {
            return Ok(());
        }
        let known: Vec<&str> = crate::validate::contract::known().collect();
        bad(
            file,
            format!("unknown contract {name:?}"),
            &format!("known contracts: {}; remove `contract` for a pipeline whose outputs differ from them", known.join(", ")),
        )
    }

    /// No stage writes inside another's output.
    fn check_nested_outputs(&self, file: &str) -> Result<()> {
        for (a, b) in self
            .stages
            .iter()
            .flat_map(|a| self.stages.iter().map(move |b| (a, b)))
        {
            if b.output().starts_with(&format!("{}/", a.output())) {
                return bad(
                    file,
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
        Ok(())
    }
}

fn bad(file: &str, problem: String, hint: &str) -> Result<()> {
    Err(Error::bad_pipeline(file, problem, hint))
}

/// The ids and outputs of the stages checked so far.
#[derive(Default)]
struct SeenStages<'a> {
    ids: std::collections::BTreeSet<&'a str>,
    outputs: std::collections::BTreeSet<String>,
}

/// The checks every stage gets, whatever its kind: a plain, unique id; a source and an output
/// that are paths inside the dataset; an output of its own, not one the tool writes itself.
/// `here` names the stage in messages.
fn check_stage_common<'a>(
    file: &str,
    here: &str,
    stage: &'a Stage,
    seen: &mut SeenStages<'a>,
) -> Result<()> {
    if !is_plain_name(stage.id()) {
        return bad(
            file,
            format!("{here}: id must be letters, digits, `_` or `-`"),
            HINT,
        );
    }
    if !seen.ids.insert(stage.id()) {
        return bad(
            file,
            format!("{here}: a second stage has the id {:?}", stage.id()),
            "give every stage its own id",
        );
    }
    let output = stage.output();
    check_relative_path(output).or_else(|p| bad(file, format!("{here}: output {output:?} {p}"), "outputs are paths inside the dataset folder, like `data.zarr/videos` or `trials.parquet`"))?;
    check_relative_path(stage.source()).or_else(|p| {
        bad(
            file,
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
            file,
            format!("{here}: output {output:?} would overwrite {reserved}, which the tool writes itself"),
            "choose another output path",
        );
    }
    if !seen.outputs.insert(output.to_string()) {
        return bad(
            file,
            format!("{here}: output {output:?} is written by an earlier stage too"),
            "give every stage its own output",
        );
    }
    Ok(())
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
        if let Some(message) = config_error(&kind, &fields) {
            // The location is inside the re-serialized stage, meaningless to the user.
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
