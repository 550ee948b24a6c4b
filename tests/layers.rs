//! The layers of docs/architecture.md, enforced: no module of the library refers to a module of
//! a layer above its own. Each `crate::` or `super::` path in `src/` (use trees expanded, so
//! `use crate::{a, b::c}` counts both) is mapped to its layer by the longest module prefix in
//! `LAYERS`; a reference upwards fails the test, naming the file, the line and both layers.
//! `main.rs`, the CLI, sits on top and may use anything.

use std::path::{Path, PathBuf};

/// Module prefix -> layer, lowest first. The longest matching prefix wins.
const LAYERS: &[(&str, usize)] = &[
    // 0: foundations every layer may use (and items at the crate root).
    ("disk", 0),
    ("error", 0),
    ("interrupt", 0),
    ("per_thread", 0),
    ("progress", 0),
    // 1: reading sources.
    ("npy", 1),
    ("source", 1),
    // 2: writers, with their own config types.
    ("writers", 2),
    // 3: stage kinds, the pipeline file made of their configs and the plan they make, the
    // read-back checks and output contracts.
    ("stages", 3),
    ("pipeline", 3),
    ("validate", 3),
    // 4: the executor: staging, checksums, lock, manifest, catalog, publish, sharded runs.
    ("executor", 4),
    // 5: the commands.
    ("commands", 5),
    ("fuzzing", 5),
];

const LAYER_NAMES: &[&str] = &[
    "foundations",
    "sources",
    "writers",
    "stage kinds",
    "executor",
    "commands",
];

/// The layer of a module path; items at the crate root (`crate::Error`, `crate::VERSION`) are
/// foundations, and a module the table does not know fails the test.
fn layer_of(module: &str) -> usize {
    let first = module.split("::").next().unwrap_or_default();
    if first.is_empty() || first.starts_with(|c: char| c.is_ascii_uppercase()) {
        return 0;
    }
    LAYERS
        .iter()
        .filter(|(prefix, _)| {
            !prefix.is_empty() && (module == *prefix || module.starts_with(&format!("{prefix}::")))
        })
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, layer)| *layer)
        .unwrap_or_else(|| panic!("module {module} has no layer in tests/layers.rs"))
}

/// `src/executor/parts.rs` -> `executor::parts`; `src/stages/mod.rs` -> `stages`.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// Every module path the text refers to through `crate::` or `super::`, with its line.
fn references(module: &str, text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        found.extend(
            expand_line(module, code)
                .into_iter()
                .map(|p| (number + 1, p)),
        );
    }
    // Use trees that span lines: join them and parse once more.
    let joined: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" ");
    for path in expand_line(module, &joined) {
        if !found.iter().any(|(_, p)| *p == path) {
            let line = text
                .lines()
                .position(|l| l.contains("crate::{"))
                .unwrap_or(0)
                + 1;
            found.push((line, path));
        }
    }
    found
}

fn expand_line(module: &str, code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for root in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(root) {
            let preceded_by_ident = rest[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            rest = &rest[at + root.len()..];
            if preceded_by_ident {
                continue;
            }
            let mut base = match root {
                "crate::" => String::new(),
                _ => parent(module),
            };
            while let Some(after) = rest.strip_prefix("super::") {
                base = parent(&base);
                rest = after;
            }
            let mut tokens = Tokens { text: rest };
            for path in tokens.tree() {
                paths.push(join(&base, &path));
            }
        }
    }
    paths
}

fn parent(module: &str) -> String {
    module
        .rsplit_once("::")
        .map_or(String::new(), |(p, _)| p.to_string())
}

fn join(base: &str, path: &str) -> String {
    match (base.is_empty(), path.is_empty()) {
        (true, _) => path.to_string(),
        (false, true) => base.to_string(),
        (false, false) => format!("{base}::{path}"),
    }
}

/// A use tree after its root: `a::b::{c, d::{e}}` -> `a::b::c`, `a::b::d::e`.
struct Tokens<'a> {
    text: &'a str,
}

impl Tokens<'_> {
    fn tree(&mut self) -> Vec<String> {
        let mut segments = Vec::new();
        loop {
            self.text = self.text.trim_start();
            if self.text.starts_with('{') {
                self.text = &self.text[1..];
                return self.group(&segments.join("::"));
            }
            let ident: String = self
                .text
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if ident.is_empty() {
                break;
            }
            self.text = &self.text[ident.len()..];
            if ident != "self" {
                segments.push(ident);
            }
            match self.text.strip_prefix("::") {
                Some(rest) => self.text = rest,
                None => break,
            }
        }
        vec![segments.join("::")]
    }

    fn group(&mut self, prefix: &str) -> Vec<String> {
        let mut paths = Vec::new();
        loop {
            self.text = self.text.trim_start();
            if let Some(rest) = self.text.strip_prefix('}') {
                self.text = rest;
                return paths;
            }
            if let Some(rest) = self.text.strip_prefix(',') {
                self.text = rest;
                continue;
            }
            let before = self.text.len();
            paths.extend(self.tree().into_iter().map(|p| join(prefix, &p)));
            // Skip `as name` and anything else up to the next separator.
            let skip = self.text.find([',', '}']).unwrap_or(self.text.len());
            self.text = &self.text[skip..];
            if self.text.len() == before || self.text.is_empty() {
                return paths;
            }
        }
    }
}

/// Upward references in one file: `(line, referenced module, its layer)`.
fn violations(module: &str, text: &str) -> Vec<(usize, String, usize)> {
    let own = layer_of(module);
    references(module, text)
        .into_iter()
        .map(|(line, path)| {
            let layer = layer_of(&path);
            (line, path, layer)
        })
        .filter(|(_, _, layer)| *layer > own)
        .collect()
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn no_module_refers_to_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let mut problems = Vec::new();
    for file in files.iter().filter(|f| !f.ends_with("main.rs")) {
        let module = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        // Unit tests sit at the end of their file, and `super` there is the file's own module.
        let text = text.split("#[cfg(test)]\nmod").next().unwrap_or_default();
        for (line, path, layer) in violations(&module, text) {
            problems.push(format!(
                "{}:{line}: {module} ({}) refers to {path} ({})",
                file.display(),
                LAYER_NAMES[layer_of(&module)],
                LAYER_NAMES[layer]
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "upward references (docs/architecture.md, \"Layers\"):\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_library_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap_or_default();
    let modules = lib.lines().filter_map(|l| {
        l.strip_prefix("pub mod ")
            .or_else(|| l.strip_prefix("mod "))
    });
    for name in modules.map(|m| m.trim_end_matches(';')) {
        assert!(
            LAYERS.iter().any(|(prefix, _)| *prefix == name),
            "module {name} has no layer in tests/layers.rs"
        );
    }
}

#[test]
fn the_check_catches_upward_references_in_every_form() {
    let cases = [
        ("writers::zarr", "use crate::pipeline::spec::Compression;"),
        (
            "writers::zarr",
            "use crate::{error::Result, pipeline::spec::Codec};",
        ),
        (
            "writers::zarr",
            "use crate::{\n    error::Result,\n    stages::{trial_array},\n};",
        ),
        (
            "source::archive",
            "let x = crate::writers::zarr::fill_bytes(d);",
        ),
        ("executor", "use crate::commands::inspect::tier_counts;"),
        ("stages::trial_array", "use super::super::executor::x;"),
        ("pipeline::plan", "use crate::executor::keys::StageKey;"),
    ];
    for (module, text) in cases {
        assert!(
            !violations(module, text).is_empty(),
            "not caught in {module}: {text}"
        );
    }
    let fine = [
        ("writers::zarr", "use crate::error::{Error, Result};"),
        ("executor::parts", "use super::stage_run::Scope;"),
        (
            "stages::trial_array",
            "use super::{read_planned, window_len};",
        ),
        ("commands::verify", "use crate::executor::lock::Lock;"),
    ];
    for (module, text) in fine {
        assert_eq!(violations(module, text), vec![], "{module}: {text}");
    }
}
