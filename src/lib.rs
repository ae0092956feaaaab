//! anneal: LLM fine-tuning pipelines declared in YAML, run as a content-hashed DAG.
//!
//! The engine (this crate) loads a pipeline file, plans what must run, runs
//! stages in child processes and commits their outputs to the store. It knows
//! nothing about what stages do: that lives in `anneal-stages`.

pub mod cli;
pub mod commands;
pub mod diag;
pub mod exec;
pub mod interp;
pub mod metrics_cmd;
pub mod model_cmd;
pub mod pipeline;
pub mod plan;
pub mod status;
pub mod ui;
pub mod yaml;
