//! The pipelines embedded in the binary, and `--pipeline auto`: the one that fits a source is
//! picked from the source's entry names, so a folder of Sensorium 2022 images and a 2023 video
//! mouse each get theirs without the user naming it.

use std::path::Path;

use super::plan::{claim_entries, Disposition};
use super::spec::Pipeline;
use crate::error::{Error, Result};
use crate::source::Source;

/// `(name, text)` of every embedded pipeline. The first is the one `default-pipeline` prints.
pub const EMBEDDED: &[(&str, &str)] = &[
    (
        "sensorium2023",
        include_str!("../../pipelines/sensorium2023.yaml"),
    ),
    (
        "sensorium2022",
        include_str!("../../pipelines/sensorium2022.yaml"),
    ),
    (
        "sensorium2023-training",
        include_str!("../../pipelines/sensorium2023-training.yaml"),
    ),
];

/// The embedded pipelines `auto` tries, in order. A layout variant of another (the training
/// layout of `sensorium2023`) fits the same sources, so it is only ever chosen by name.
const PICKED_BY_CONTENT: [&str; 2] = ["sensorium2023", "sensorium2022"];

/// Which pipeline a command runs.
#[derive(Debug, Clone, PartialEq)]
pub enum PipelineChoice {
    /// The embedded pipeline that fits the source.
    Auto,
    /// A named embedded pipeline.
    Embedded(&'static str),
    /// A pipeline file's text and the name it is reported under.
    File { text: String, file: String },
}

impl PipelineChoice {
    /// `auto`, the name of an embedded pipeline, or a path to a pipeline file.
    pub fn from_argument(argument: &str) -> Result<PipelineChoice> {
        if argument == "auto" {
            return Ok(PipelineChoice::Auto);
        }
        if let Some((name, _)) = EMBEDDED.iter().find(|(name, _)| *name == argument) {
            if !Path::new(argument).exists() {
                return Ok(PipelineChoice::Embedded(name));
            }
        }
        let path = Path::new(argument);
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => Error::bad_pipeline(
                argument,
                "the file is not UTF-8 text",
                "a pipeline file is YAML text; start from `sensorium-ingest default-pipeline`",
            ),
            _ => Error::io(path, "cannot read the pipeline file", e),
        })?;
        Ok(PipelineChoice::File {
            text,
            file: argument.to_string(),
        })
    }

    /// The pipeline's text and the name it is reported under, when that does not depend on
    /// the source.
    pub fn fixed(&self) -> Option<(String, String)> {
        match self {
            PipelineChoice::File { text, file } => Some((text.clone(), file.clone())),
            PipelineChoice::Embedded(name) => {
                Some((embedded_text(name).to_string(), label(name, false)))
            }
            PipelineChoice::Auto => None,
        }
    }

    /// The pipeline's text and the name it is reported under, for this source.
    pub fn resolve(&self, source: &Source) -> Result<(String, String)> {
        match self.fixed() {
            Some(fixed) => Ok(fixed),
            None => {
                let name = pick(source)?;
                Ok((embedded_text(name).to_string(), label(name, true)))
            }
        }
    }
}

/// The text of the embedded pipeline `name`, for `default-pipeline`.
pub fn by_name(name: &str) -> Result<&'static str> {
    match EMBEDDED.iter().find(|(n, _)| *n == name) {
        Some((_, text)) => Ok(text),
        None => {
            let names: Vec<&str> = EMBEDDED.iter().map(|(n, _)| *n).collect();
            Err(Error::bad_input(
                name,
                "no embedded pipeline has this name",
                format!("embedded pipelines: {}", names.join(", ")),
            ))
        }
    }
}

fn embedded_text(name: &str) -> &'static str {
    EMBEDDED
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, text)| text)
}

/// How the pipeline is named in `plan`, `inspect` and `run.json`.
fn label(name: &str, picked: bool) -> String {
    match picked {
        true => format!("pipelines/{name}.yaml (embedded, picked by content)"),
        false => format!("pipelines/{name}.yaml (embedded)"),
    }
}

/// The first embedded pipeline that fits the source: every entry is read by one of its stages
/// or skipped by one of its rules, and every stage reads something. Decided from entry names
/// only, so a damaged file in a mouse still gets that mouse's pipeline and its precise error.
pub fn pick(source: &Source) -> Result<&'static str> {
    let mut misfits = Vec::new();
    for name in PICKED_BY_CONTENT {
        let pipeline = Pipeline::parse(embedded_text(name), &label(name, false))?;
        match fits(&pipeline, source) {
            Ok(()) => return Ok(name),
            Err(why) => misfits.push(format!("{name}: {why}")),
        }
    }
    Err(Error::bad_input(
        source.path.display().to_string(),
        format!(
            "no embedded pipeline fits this source ({})",
            misfits.join("; ")
        ),
        "pass a pipeline file with `--pipeline FILE`: print the closest one with `sensorium-ingest default-pipeline NAME`, add a stage or a skip rule for what it lacks (docs/pipeline-reference.md has a worked example)",
    ))
}

fn fits(pipeline: &Pipeline, source: &Source) -> std::result::Result<(), String> {
    let dispositions = claim_entries(pipeline, source).map_err(|e| match e {
        Error::BadInput { problem, .. } => problem,
        other => other.to_string(),
    })?;
    let idle = pipeline
        .stages
        .iter()
        .enumerate()
        .find(|(i, _)| !dispositions.contains(&Disposition::Stage(*i)));
    match idle {
        Some((_, stage)) => Err(format!(
            "nothing in {} for stage {}",
            stage.source(),
            stage.id()
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_pipeline_parses_under_its_name() {
        for (name, text) in EMBEDDED {
            let pipeline = Pipeline::parse(text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(pipeline.pipeline, *name);
        }
    }

    #[test]
    fn auto_tries_every_embedded_pipeline_but_layout_variants() {
        for name in PICKED_BY_CONTENT {
            assert!(EMBEDDED.iter().any(|(n, _)| *n == name), "{name}");
        }
        // A pipeline left out of `auto` must be a variant (`BASE-...`) of one it tries.
        for (name, _) in EMBEDDED {
            let variant_of = |base: &str| name.starts_with(&format!("{base}-"));
            assert!(
                PICKED_BY_CONTENT.contains(name) || PICKED_BY_CONTENT.iter().any(|b| variant_of(b)),
                "{name} is neither tried by auto nor a variant of a pipeline it tries"
            );
        }
    }
}
