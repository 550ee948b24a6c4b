//! The registry of stage kinds: the one place that lists them. `Stage` (a pipeline file's stage,
//! chosen by its `kind` key) and `StagePlan` (its plan for one source) are generated from the
//! list, with one method per [`StageKind`] item that hands the call to the stage's kind. Nothing
//! else in the program matches on kinds.

use std::ops::Range;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::kind::{ConfigProblem, Description, PlanContext, StageKind, StageNeed};
use super::{meta_table, statistics, trial_array, trial_table};
use super::{Measure, StageContext, StageResult};
use crate::error::Result;
use crate::npy::Dtype;
use crate::pipeline::plan::{ArrayEntry, Plan, TrialPlan};
use crate::source::Source;

macro_rules! stage_kinds {
    ($($variant:ident => $config:ty, $plan:ty;)+) => {
        /// One stage of a pipeline file: the config of the kind its `kind` key names.
        #[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        pub enum Stage {
            $($variant($config)),+
        }

        /// A stage's plan for one source. The plan types are named here, not projected from
        /// the trait, so that `StagePlan<'p>` stays covariant in `'p`.
        #[derive(Debug, Clone)]
        pub enum StagePlan<'p> {
            $($variant($plan)),+
        }

        /// The kinds' names, as pipeline files spell them.
        pub const KINDS: &[&str] = &[$(<$config as StageKind>::KIND),+];

        /// The error of reading `fields` (a stage's keys, without `kind`) as the config of
        /// `kind`: it names the key at fault, where the tagged `Stage` only names `stages`.
        pub(crate) fn config_error(kind: &str, fields: &str) -> Option<String> {
            $(
                if kind == <$config as StageKind>::KIND {
                    return yaml_serde::from_str::<$config>(fields).err().map(|e| e.to_string());
                }
            )+
            None
        }

        impl Stage {
            pub fn name(&self) -> &'static str {
                match self { $(Stage::$variant(_) => <$config as StageKind>::KIND),+ }
            }
            pub fn id(&self) -> &str {
                match self { $(Stage::$variant(c) => c.id()),+ }
            }
            pub fn source(&self) -> &str {
                match self { $(Stage::$variant(c) => c.source()),+ }
            }
            pub fn output(&self) -> &str {
                match self { $(Stage::$variant(c) => c.output()),+ }
            }
            pub fn check(&self, earlier: &[Stage]) -> std::result::Result<(), ConfigProblem> {
                match self { $(Stage::$variant(c) => c.check(earlier)),+ }
            }
            pub fn has_frame_axis(&self) -> bool {
                match self { $(Stage::$variant(c) => c.has_frame_axis()),+ }
            }
            pub fn measures(&self) -> &[Measure] {
                match self { $(Stage::$variant(c) => c.measures()),+ }
            }
            pub fn reads(&self) -> Vec<(String, Measure)> {
                match self { $(Stage::$variant(c) => c.reads()),+ }
            }
            pub fn claims(&self, rest: &str) -> bool {
                match self { $(Stage::$variant(c) => c.claims(rest)),+ }
            }
            pub fn excludes(&self) -> &[String] {
                match self { $(Stage::$variant(c) => c.excludes()),+ }
            }
            pub fn plan<'p>(
                &'p self,
                entries: Vec<ArrayEntry>,
                ctx: &mut PlanContext,
            ) -> Result<StagePlan<'p>> {
                match self { $(Stage::$variant(c) => Ok(StagePlan::$variant(c.plan(entries, ctx)?))),+ }
            }
        }

        impl StagePlan<'_> {
            pub fn zarr_arrays(&self) -> Vec<String> {
                match self { $(StagePlan::$variant(p) => <$config as StageKind>::zarr_arrays(p)),+ }
            }
            pub fn trial_dtype(&self) -> Option<Dtype> {
                match self { $(StagePlan::$variant(p) => <$config as StageKind>::trial_dtype(p)),+ }
            }
            pub fn memory(&self, source: &Source, pipeline_file: &str) -> Result<StageNeed> {
                match self { $(StagePlan::$variant(p) => <$config as StageKind>::memory(p, source, pipeline_file)),+ }
            }
            pub fn run(&self, ctx: &StageContext) -> Result<StageResult> {
                match self { $(StagePlan::$variant(p) => <$config as StageKind>::run(ctx, p)),+ }
            }
            pub fn runs_in_parts(&self) -> bool {
                match self { $(StagePlan::$variant(_) => <$config as StageKind>::RUNS_IN_PARTS),+ }
            }
            pub fn part_block(&self, pipeline_file: &str) -> Result<Option<usize>> {
                match self { $(StagePlan::$variant(p) => <$config as StageKind>::part_block(p, pipeline_file)),+ }
            }
            pub fn run_part(&self, ctx: &StageContext, part: Range<usize>) -> Result<StageResult> {
                match self { $(StagePlan::$variant(p) => <$config as StageKind>::run_part(ctx, p, part)),+ }
            }
            pub fn finish_parts(&self, ctx: &StageContext) -> Result<Vec<String>> {
                match self { $(StagePlan::$variant(p) => <$config as StageKind>::finish_parts(ctx, p)),+ }
            }
            pub fn check_output(&self, dir: &Path, plan: &Plan) -> Result<()> {
                match self { $(StagePlan::$variant(p) => <$config as StageKind>::check_output(dir, plan, p)),+ }
            }
            pub fn describe(&self, source: &Source) -> Result<Description> {
                match self { $(StagePlan::$variant(p) => <$config as StageKind>::describe(source, p)),+ }
            }
        }
    };
}

stage_kinds! {
    TrialArray => trial_array::TrialArrayConfig, TrialPlan<'p, trial_array::TrialArrayConfig>;
    TrialTable => trial_table::TrialTableConfig, TrialPlan<'p, trial_table::TrialTableConfig>;
    Statistics => statistics::StatisticsConfig, statistics::StatisticsPlan<'p>;
    MetaTable => meta_table::MetaTableConfig, meta_table::MetaPlan<'p>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `kind:` tag serde reads is the variant's name in snake case; it must be the kind's
    /// `KIND`, which errors and the registry's list use.
    #[test]
    fn every_kind_is_read_under_its_own_name() {
        for kind in KINDS {
            let text = format!("kind: {kind}\nid: x\n");
            let error = yaml_serde::from_str::<Stage>(&text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(!error.contains("unknown variant"), "{kind}: {error}");
            assert!(config_error(kind, "id: x\n").is_some(), "{kind}");
        }
    }
}
