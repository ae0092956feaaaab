//! The `Stage` trait and the built-in stage kinds of anneal.
//!
//! A stage kind knows how to turn declared inputs and params into declared
//! outputs. It knows nothing about scheduling or caching: the engine resolves
//! the pipeline, decides what runs, and hands each stage a [`StageContext`]
//! in a child process through [`exec_job`], the single entry point that the
//! local executor (and later a cluster executor) calls.

pub mod agent_samples;
pub mod command;
pub mod conversation_transform;
pub mod evaluate;
pub mod generation;
pub mod init_model;
mod job;
pub mod lines;
pub mod llamafactory_export;
pub mod llm_map;
pub mod model;
pub mod params;
mod progress;
pub mod rng;
pub mod rows;
pub mod sink;
pub mod summary_datasets;
pub mod train;
pub mod train_val_split;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

pub use job::{Job, SECRET_SENTINEL, exec_job, expand_secrets};
pub use progress::{PROGRESS_PREFIX, Progress, ProgressEvent, REPORT_PREFIX};

/// A stage-level key that a kind accepts besides the generic ones
/// (`kind`, `deps`, `outs`, `params`, `resources`, `foreach`, `matrix`, `desc`).
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// The key as written in the pipeline file.
    pub name: &'static str,
    /// Whether a stage of this kind must set it.
    pub required: bool,
    /// One line shown in errors and help.
    pub doc: &'static str,
}

/// A problem with a stage's kind-specific keys or params, found before anything runs.
#[derive(Debug, Clone)]
pub struct ConfigError {
    /// Dotted path of the offending key below the stage, e.g. `params.lr` or `cmd`.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// Everything a stage sees while it runs.
#[derive(Debug)]
pub struct StageContext {
    /// The stage's name in the pipeline (fan-out instances look like `train@lr=1e-5`).
    pub name: String,
    /// The kind-specific keys, interpolated (e.g. `cmd` for `command`).
    pub config: BTreeMap<String, Value>,
    /// The resolved `params` mapping.
    pub params: Value,
    /// Declared inputs: name -> path (relative paths are relative to `workdir`).
    pub deps: BTreeMap<String, PathBuf>,
    /// Declared outputs: name -> path the stage must write (inside a staging directory).
    pub outs: BTreeMap<String, PathBuf>,
    /// Persistent scratch directory, kept across killed attempts of the same key,
    /// for resumable progress. Removed once the stage succeeds.
    pub scratch: PathBuf,
    /// A directory shared by every run of this kind in the store, kept across
    /// stage keys: for caches of work that does not depend on the whole input
    /// (per-item LLM replies). Entries must be keyed by content.
    pub cache: PathBuf,
    /// Working directory: the pipeline file's directory.
    pub workdir: PathBuf,
    /// Reports progress to the engine.
    pub progress: Progress,
}

/// A kind of pipeline stage.
pub trait Stage: Send + Sync {
    /// The name used as `kind:` in pipeline files.
    fn kind(&self) -> &'static str;
    /// Bumped whenever the kind's behaviour changes, so cached results are recomputed.
    fn version(&self) -> u32;
    /// The kind-specific stage-level keys (besides `params`); none by default.
    fn keys(&self) -> &'static [KeySpec] {
        &[]
    }
    /// The inputs (`deps:` names) it reads; empty means any names.
    fn inputs(&self) -> &'static [KeySpec] {
        &[]
    }
    /// The outputs (`outs:` names) it writes; empty means any names.
    fn outputs(&self) -> &'static [KeySpec] {
        &[]
    }
    /// Checks config and params before anything runs. Values still contain
    /// placeholders for secrets and outputs, so check shapes, not contents.
    fn check(&self, config: &BTreeMap<String, Value>, params: &Value) -> Vec<ConfigError>;
    /// Does the work. Outputs must be written to `ctx.outs`.
    fn run(&self, ctx: &StageContext) -> anyhow::Result<()>;
}

impl StageContext {
    /// Hands the engine a small summary of what the stage did (rows in and out,
    /// skipped by reason...). It is kept in the run record and shown by `anneal status`.
    pub fn report(&self, report: &Value) {
        self.progress.report(report);
    }

    /// The path of declared input `name`, resolved against the working directory.
    pub fn input(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.deps.get(name).ok_or_else(|| {
            anyhow::anyhow!(
                "stage '{}' has no input '{name}'; declare it under deps:",
                self.name
            )
        })?;
        Ok(self.workdir.join(p))
    }

    /// The path of declared output `name`, if declared.
    pub fn output(&self, name: &str) -> Option<PathBuf> {
        self.outs.get(name).map(|p| self.workdir.join(p))
    }
}

static COMMAND: command::Command = command::Command;
static AGENT_SAMPLES: agent_samples::AgentSamples = agent_samples::AgentSamples;
static SUMMARY_DATASETS: summary_datasets::SummaryDatasets = summary_datasets::SummaryDatasets;
static TRAIN_VAL_SPLIT: train_val_split::TrainValSplit = train_val_split::TrainValSplit;
static LLM_MAP: llm_map::LlmMap = llm_map::LlmMap;
static INIT_MODEL: init_model::InitModel = init_model::InitModel;
static TRAIN: train::Train = train::Train;
static EVALUATE: evaluate::Evaluate = evaluate::Evaluate;
static CONVERSATION_TRANSFORM: conversation_transform::ConversationTransform =
    conversation_transform::ConversationTransform;
static LLAMAFACTORY_EXPORT: llamafactory_export::LlamaFactoryExport =
    llamafactory_export::LlamaFactoryExport;

/// Every built-in kind.
pub fn builtin_kinds() -> Vec<&'static dyn Stage> {
    vec![
        &COMMAND,
        &AGENT_SAMPLES,
        &LLM_MAP,
        &SUMMARY_DATASETS,
        &TRAIN_VAL_SPLIT,
        &INIT_MODEL,
        &TRAIN,
        &EVALUATE,
        &CONVERSATION_TRANSFORM,
        &LLAMAFACTORY_EXPORT,
    ]
}

/// The built-in kind named `kind`.
pub fn builtin(kind: &str) -> Option<&'static dyn Stage> {
    builtin_kinds().into_iter().find(|s| s.kind() == kind)
}
