//! Output contracts (`schemas/<name>.output.json`): the machine-readable form of what a
//! pipeline promises analysts. Checked against the files on disk, never against memory.

use std::collections::BTreeMap;
use std::path::Path;

use arrow_schema::DataType;
use serde::Deserialize;

use super::read_parquet_schema;
use crate::error::{Error, Result};

/// Contracts known to this build, embedded so the binary needs no files beside it.
const CONTRACTS: &[(&str, &str)] = &[
    (
        "sensorium2023",
        include_str!("../../schemas/sensorium2023.output.json"),
    ),
    (
        "sensorium2022",
        include_str!("../../schemas/sensorium2022.output.json"),
    ),
];

#[derive(Debug, Deserialize)]
pub struct Contract {
    pub contract: String,
    pub arrays: Vec<ArrayRule>,
    pub groups: Vec<GroupRule>,
    pub tables: Vec<TableRule>,
}

#[derive(Debug, Deserialize)]
pub struct ArrayRule {
    pub path: String,
    pub dimension_names: Vec<String>,
    pub data_type: Vec<String>,
    #[serde(default)]
    pub attributes: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct GroupRule {
    pub path: String,
    #[serde(default)]
    pub attributes: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct TableRule {
    pub path: String,
    pub rows: String,
    pub first: Vec<Column>,
    #[serde(default)]
    pub optional: Vec<Column>,
    #[serde(default)]
    pub last: Vec<Column>,
    #[serde(default)]
    pub exact: bool,
}

#[derive(Debug, Deserialize)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// Names of the contracts known to this build.
pub fn known() -> impl Iterator<Item = &'static str> {
    CONTRACTS.iter().map(|(name, _)| *name)
}

pub fn load(name: &str) -> Option<Contract> {
    let (_, text) = CONTRACTS.iter().find(|(n, _)| *n == name)?;
    serde_json::from_str(text).ok()
}

fn broken(dir: &Path, what: &str, problem: String) -> Error {
    Error::Internal(format!(
        "{}: {what} breaks the output contract: {problem}",
        dir.display()
    ))
}

fn type_matches(kind: &str, t: &DataType) -> bool {
    match kind {
        "int32" => t == &DataType::Int32,
        "bool" => t == &DataType::Boolean,
        "string" => t == &DataType::Utf8,
        "float" => matches!(t, DataType::Float32 | DataType::Float64),
        "integer" => t.is_integer(),
        _ => true,
    }
}

/// Checks a written dataset folder against the contract. `dims` are the dataset's dimension sizes.
pub fn check(contract: &Contract, dir: &Path, dims: &BTreeMap<String, u64>) -> Result<()> {
    for rule in &contract.arrays {
        check_array(dir, rule, dims)?;
    }
    for rule in &contract.groups {
        check_group(dir, rule)?;
    }
    for rule in &contract.tables {
        check_table(dir, rule, dims)?;
    }
    Ok(())
}

/// An array's dimension names, data type, dimension sizes and attributes, from its `zarr.json`.
fn check_array(dir: &Path, rule: &ArrayRule, dims: &BTreeMap<String, u64>) -> Result<()> {
    let meta = read_json(&dir.join(&rule.path).join("zarr.json"))?;
    let names: Vec<&str> = meta["dimension_names"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if names != rule.dimension_names {
        return Err(broken(
            dir,
            &rule.path,
            format!(
                "dimension names {names:?}, expected {:?}",
                rule.dimension_names
            ),
        ));
    }
    let data_type = meta["data_type"].as_str().unwrap_or_default();
    if !rule.data_type.iter().any(|t| t == data_type) {
        return Err(broken(
            dir,
            &rule.path,
            format!(
                "data type {data_type}, expected one of {:?}",
                rule.data_type
            ),
        ));
    }
    let shape: Vec<u64> = meta["shape"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    for (name, len) in rule.dimension_names.iter().zip(&shape) {
        if dims.get(name).is_some_and(|d| d != len) {
            return Err(broken(
                dir,
                &rule.path,
                format!("dimension {name} is {len}, the dataset has {}", dims[name]),
            ));
        }
    }
    check_attributes(dir, &rule.path, &meta, &rule.attributes)
}

fn check_group(dir: &Path, rule: &GroupRule) -> Result<()> {
    let meta = read_json(&dir.join(&rule.path).join("zarr.json"))?;
    if meta["node_type"] != "group" {
        return Err(broken(dir, &rule.path, "not a Zarr group".into()));
    }
    check_attributes(dir, &rule.path, &meta, &rule.attributes)
}

/// A table's rows (the product of the dimensions `rows` names) and its columns.
fn check_table(dir: &Path, rule: &TableRule, dims: &BTreeMap<String, u64>) -> Result<()> {
    let (columns, rows) = read_parquet_schema(&dir.join(&rule.path))?;
    let want_rows: u64 = rule
        .rows
        .split('*')
        .map(|d| dims.get(d).copied().unwrap_or(0))
        .product();
    if rows != want_rows {
        return Err(broken(
            dir,
            &rule.path,
            format!("{rows} rows, expected {want_rows} ({})", rule.rows),
        ));
    }
    check_columns(dir, rule, &columns)
}

/// `first` in order, then each `optional` one where it comes next, then `last` at the end;
/// with `exact`, nothing else.
fn check_columns(dir: &Path, rule: &TableRule, columns: &[(String, DataType)]) -> Result<()> {
    let at = check_first_columns(dir, rule, columns)?;
    let at = skip_optional_columns(dir, rule, columns, at)?;
    check_last_columns(dir, rule, columns, at)?;
    if rule.exact && columns.len() != at {
        return Err(broken(
            dir,
            &rule.path,
            format!("{} columns, expected exactly {at}", columns.len()),
        ));
    }
    Ok(())
}

/// The `first` columns, in order from column 0; returns the position after them.
fn check_first_columns(
    dir: &Path,
    rule: &TableRule,
    columns: &[(String, DataType)],
) -> Result<usize> {
    let mut at = 0;
    for col in &rule.first {
        match columns.get(at) {
            Some((name, t)) if name == &col.name && type_matches(&col.kind, t) => at += 1,
            other => {
                return Err(broken(
                    dir,
                    &rule.path,
                    format!(
                        "column {at} is {other:?}, expected {} ({})",
                        col.name, col.kind
                    ),
                ))
            }
        }
    }
    Ok(at)
}

/// The `optional` columns present from position `at`, each of its type; returns the position
/// after them.
fn skip_optional_columns(
    dir: &Path,
    rule: &TableRule,
    columns: &[(String, DataType)],
    mut at: usize,
) -> Result<usize> {
    for col in &rule.optional {
        if let Some((name, t)) = columns.get(at) {
            if name == &col.name {
                if !type_matches(&col.kind, t) {
                    return Err(broken(
                        dir,
                        &rule.path,
                        format!("column {name} has type {t}, expected {}", col.kind),
                    ));
                }
                at += 1;
            }
        }
    }
    Ok(at)
}

/// The `last` columns end the table, after position `at`.
fn check_last_columns(
    dir: &Path,
    rule: &TableRule,
    columns: &[(String, DataType)],
    at: usize,
) -> Result<()> {
    let tail = columns
        .len()
        .checked_sub(rule.last.len())
        .filter(|&t| t >= at)
        .ok_or_else(|| broken(dir, &rule.path, "too few columns".into()))?;
    for (col, (name, t)) in rule.last.iter().zip(&columns[tail..]) {
        if name != &col.name || !type_matches(&col.kind, t) {
            return Err(broken(
                dir,
                &rule.path,
                format!(
                    "column {name} ({t}) where {} ({}) was expected",
                    col.name, col.kind
                ),
            ));
        }
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read back", e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Internal(format!("{}: not valid JSON: {e}", path.display())))
}

fn check_attributes(
    dir: &Path,
    what: &str,
    meta: &serde_json::Value,
    required: &[String],
) -> Result<()> {
    for a in required {
        if meta["attributes"].get(a).is_none() {
            return Err(broken(dir, what, format!("attribute {a} is missing")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_contracts_parse() {
        for name in super::known() {
            assert!(
                super::load(name).is_some(),
                "contract {name} does not parse"
            );
        }
    }
}
