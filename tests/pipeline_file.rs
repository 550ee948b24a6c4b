//! The pipeline file: the default parses, errors point at the line, the schema and the
//! reference stay in step with the code.

use sensorium_ingest::pipeline::spec::{Pipeline, DEFAULT_PIPELINE};
use sensorium_ingest::Error;

fn parse(text: &str) -> Result<Pipeline, Error> {
    Pipeline::parse(text, "test.yaml")
}

fn pipeline_error(text: &str) -> (Option<(usize, usize)>, String) {
    match parse(text) {
        Err(Error::BadPipeline { line, problem, .. }) => (line, problem),
        other => panic!("expected a pipeline error, got {other:?}"),
    }
}

#[test]
fn default_pipeline_parses() {
    let p = parse(DEFAULT_PIPELINE).unwrap();
    let ids: Vec<&str> = p.stages.iter().map(|s| s.id()).collect();
    assert_eq!(
        ids,
        [
            "videos",
            "responses",
            "behavior",
            "pupil_center",
            "statistics",
            "trials",
            "neurons"
        ]
    );
}

#[test]
fn unknown_key_names_line_and_key() {
    let text = DEFAULT_PIPELINE.replace(
        "    chunk_shape: [1, 512, full]",
        "    chunk_shap: [1, 512, full]",
    );
    let (line, problem) = pipeline_error(&text);
    assert!(problem.contains("chunk_shap"), "{problem}");
    let line = line.expect("a line number").0;
    let want = text
        .lines()
        .position(|l| l.contains("chunk_shap:"))
        .unwrap()
        + 1;
    assert_eq!(line, want);
}

#[test]
fn wrong_type_names_line() {
    let text = DEFAULT_PIPELINE.replace("frame_rate_hz: 30.0", "frame_rate_hz: fast");
    let (line, problem) = pipeline_error(&text);
    assert!(problem.contains("frame_rate_hz"), "{problem}");
    let want = DEFAULT_PIPELINE
        .lines()
        .position(|l| l.starts_with("frame_rate_hz"))
        .unwrap()
        + 1;
    assert_eq!(line.map(|l| l.0), Some(want));
}

#[test]
fn bad_settings_are_refused() {
    let cases = [
        (
            "output: data.zarr/videos",
            "output: ../escape.zarr/videos",
            "output",
        ),
        (
            "output: trials.parquet",
            "output: /abs/trials.parquet",
            "relative",
        ),
        (
            "    chunk_shape: [1, full, full, full]",
            "    chunk_shape: [0, full, full, full]",
            "at least 1",
        ),
        (
            "{column: valid_frames, stage: videos, measure: valid_frames}",
            "{column: valid_frames, stage: nobody, measure: valid_frames}",
            "does not exist",
        ),
        (
            "{column: responses_withheld, stage: responses, measure: all_zero}",
            "{column: responses_withheld, stage: videos, measure: all_zero}",
            "does not compute",
        ),
        (
            "    compression: {codec: zstd, level: 1}\n    attributes:\n      units: grey",
            "    compression: {codec: zstd, level: 99}\n    attributes:\n      units: grey",
            "level",
        ),
        (
            "    compression: {codec: zstd, level: 1}\n    attributes:\n      units: grey",
            "    compression: {codec: blosc_lz4, level: 12}\n    attributes:\n      units: grey",
            "blosc level 12",
        ),
        (
            "    compression: {codec: zstd, level: 1}\n    attributes:\n      units: grey",
            "    compression: {codec: zstd, level: 1, shuffle: byte}\n    attributes:\n      units: grey",
            "`shuffle` applies to the blosc codecs only",
        ),
        (
            "    compression: {codec: zstd, level: 3}",
            "    compression: {codec: blosc_zstd}",
            "blosc codecs are for Zarr arrays",
        ),
        ("contract: sensorium2023", "contract: nonsense", "contract"),
        (
            "output: data.zarr/videos",
            "output: run.json/x.zarr/videos",
            "run.json",
        ),
        (
            "output: data.zarr/statistics",
            "output: data.zarr/videos/statistics",
            "inside output",
        ),
        ("nan: tail_only", "nan: sometimes", "sometimes"),
        ("version: 1", "version: 2", "version"),
    ];
    for (from, to, expect) in cases {
        assert!(
            DEFAULT_PIPELINE.contains(from),
            "fixture text missing: {from}"
        );
        let (_, problem) = pipeline_error(&DEFAULT_PIPELINE.replacen(from, to, 1));
        assert!(problem.contains(expect), "{to}: {problem}");
    }
}

#[test]
fn blosc_codecs_parse_for_arrays() {
    let text = DEFAULT_PIPELINE.replacen(
        "compression: {codec: zstd, level: 1}",
        "compression: {codec: blosc_lz4, level: 5, shuffle: bit}",
        1,
    );
    let pipeline = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let yaml = yaml_serde::to_string(&pipeline).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        yaml.contains("blosc_lz4") && yaml.contains("shuffle: bit"),
        "{yaml}"
    );
    // Without `shuffle`, the serialized form (and so every stage hash) is what it was.
    let default = yaml_serde::to_string(&parse(DEFAULT_PIPELINE).unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!default.contains("shuffle"), "{default}");
}

#[test]
fn wrong_type_inside_a_stage_names_key_and_line() {
    let text = DEFAULT_PIPELINE.replace("    columns: [x, y]", "    columns: x");
    let (line, problem) = pipeline_error(&text);
    assert!(
        problem.contains("pupil_center") && problem.contains("columns"),
        "{problem}"
    );
    let want = text.lines().position(|l| l == "    columns: x").unwrap() + 1;
    assert_eq!(line.map(|l| l.0), Some(want));
}

#[test]
fn default_pipeline_wants_nan_only_in_tails() {
    use sensorium_ingest::stages::registry::Stage;
    use sensorium_ingest::stages::trial_array::NanPolicy;
    let p = parse(DEFAULT_PIPELINE).unwrap();
    for stage in &p.stages {
        if let Stage::TrialArray(c) = stage {
            assert_eq!(c.nan, NanPolicy::TailOnly, "{}", c.id);
        }
    }
}

#[test]
fn alias_bombs_are_refused() {
    let mut text = String::from("a: &a [\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\"]\n");
    let mut prev = 'a';
    for name in 'b'..='j' {
        text.push_str(&format!("{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
        prev = name;
    }
    text.push_str(DEFAULT_PIPELINE);
    assert!(parse(&text).is_err());
}

#[test]
fn committed_schema_is_current() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/pipeline.schema.json"
    ))
    .unwrap();
    assert_eq!(
        committed,
        Pipeline::json_schema(),
        "regenerate with `sensorium-ingest pipeline-schema > schemas/pipeline.schema.json`"
    );
}

fn property_names(value: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Object(props)) = map.get("properties") {
                out.extend(props.keys().cloned());
            }
            for v in map.values() {
                property_names(v, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| property_names(v, out)),
        _ => {}
    }
}

#[test]
fn every_key_is_documented() {
    let schema: serde_json::Value = serde_json::from_str(&Pipeline::json_schema()).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    property_names(&schema, &mut keys);
    assert!(keys.len() > 20, "too few keys found: {keys:?}");
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/pipeline-reference.md"
    ))
    .unwrap();
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "keys missing from docs/pipeline-reference.md: {missing:?}"
    );
}

#[test]
fn outputs_must_lead_into_a_zarr_store_by_a_whole_path_part() {
    // `s.zarrx/a` once passed the check and then landed in another folder than its groups.
    for (from, to) in [
        ("output: data.zarr/statistics", "output: s.zarrx/a"),
        ("output: data.zarr/videos", "output: data.zarrx/videos"),
        ("output: data.zarr/videos", "output: data.zarr"),
    ] {
        let text = DEFAULT_PIPELINE.replacen(from, to, 1);
        let (_, problem) = pipeline_error(&text);
        assert!(problem.contains(".zarr"), "{to}: {problem}");
    }
    let nested = DEFAULT_PIPELINE.replacen(
        "output: data.zarr/statistics",
        "output: more/stats.zarr/all",
        1,
    );
    assert!(parse(&nested).is_ok());
}

#[test]
fn frame_rate_only_where_a_stage_has_a_frame_axis() {
    let without = DEFAULT_PIPELINE.replace("frame_rate_hz: 30.0\n", "");
    let (_, problem) = pipeline_error(&without);
    assert!(problem.contains("frame_rate_hz"), "{problem}");
    for (_, text) in sensorium_ingest::pipeline::embedded::EMBEDDED {
        let p = parse(text).unwrap();
        assert_eq!(p.frame_rate_hz.is_some(), p.frame_axis_stage().is_some());
    }
    let static_text = sensorium_ingest::pipeline::embedded::EMBEDDED[1].1;
    let with_rate = static_text.replace("version: 1\n", "version: 1\nframe_rate_hz: 30.0\n");
    let (_, problem) = pipeline_error(&with_rate);
    assert!(problem.contains("no stage has a frame axis"), "{problem}");
}

/// The training pipeline is the default with other chunks and no compression for the two
/// large arrays; everything else (stages, names, checks, contract) must not drift apart.
#[test]
fn training_pipeline_differs_from_the_default_only_in_layout() {
    use yaml_serde::Value;
    let embedded = |name: &str| {
        let (_, text) = sensorium_ingest::pipeline::embedded::EMBEDDED
            .iter()
            .find(|(n, _)| *n == name)
            .expect("embedded pipeline");
        yaml_serde::from_str::<Value>(text).expect("YAML")
    };
    let mut training = embedded("sensorium2023-training");
    let mut default = embedded("sensorium2023");
    let mut changed = Vec::new();
    for doc in [&mut training, &mut default] {
        doc["pipeline"] = Value::Null;
        let stages = doc["stages"].as_sequence_mut().expect("stages");
        for stage in stages
            .iter_mut()
            .filter(|s| s["id"] == "videos" || s["id"] == "responses")
        {
            let map = stage.as_mapping_mut().expect("stage mapping");
            changed.push((
                map.remove("chunk_shape").expect("chunk_shape"),
                map.remove("compression").expect("compression"),
            ));
        }
    }
    assert_eq!(training, default);
    assert_eq!(changed.len(), 4);
    assert!(changed[..2].iter().all(|(_, c)| c["codec"] == "none"));
}
