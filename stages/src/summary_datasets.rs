//! Kind `summary_datasets`: samples with an LLM `summary` -> two training sets.
//!
//! - `prefix`: the answer becomes `{summary}\n\n{answer}` and
//!   `extra_info.has_summary_prefix` is true.
//! - `summary_only`: the prompt becomes the summary alone (`extra_info.question`
//!   too) and `extra_info.original_question_discarded` is true.
//!
//! The answer is `extra_info.answer` when present, else a top-level `answer`.
//! Rows without a usable summary are left out of both and counted by reason.

use std::collections::BTreeMap;

use anyhow::Context;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::lines::Counters;
use crate::params::{self, OnError};
use crate::rows::RowReader;
use crate::sink::Sink;
use crate::{ConfigError, KeySpec, Stage, StageContext};

/// The `summary_datasets` kind.
pub struct SummaryDatasets;

/// Params of `summary_datasets`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The field holding the summary.
    #[serde(default = "default_field")]
    pub summary_field: String,
    /// `fail` (default) or `skip` on a malformed row.
    #[serde(default)]
    pub on_error: OnError,
}

impl params::Validate for Params {}

fn default_field() -> String {
    "summary".into()
}

/// Why a row was left out, if it was.
pub fn summary_of<'a>(row: &'a Value, field: &str) -> Result<&'a str, &'static str> {
    match row.get(field) {
        None | Some(Value::Null) => Err("missing_summary"),
        Some(Value::String(s)) if s.trim().is_empty() => Err("empty_summary"),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err("summary_not_a_string"),
    }
}

fn extra_info(row: &mut Map<String, Value>) -> Result<&mut Map<String, Value>, String> {
    let e = row
        .entry("extra_info")
        .or_insert_with(|| Value::Object(Map::new()));
    e.as_object_mut()
        .ok_or_else(|| "`extra_info` is not an object".to_owned())
}

/// The `prefix` record for a row with `summary`.
pub fn prefix_record(row: &Value, summary: &str) -> Result<Value, String> {
    let mut row = row.as_object().cloned().ok_or("the row is not an object")?;
    let has_nested = row
        .get("extra_info")
        .and_then(|e| e.get("answer"))
        .is_some_and(Value::is_string);
    let slot = if has_nested {
        extra_info(&mut row)?.get_mut("answer")
    } else {
        row.get_mut("answer").filter(|a| a.is_string())
    };
    let slot = slot.ok_or("the row has no answer (`extra_info.answer` or `answer`)")?;
    let answer = slot.as_str().unwrap_or_default();
    *slot = Value::String(format!("{summary}\n\n{answer}"));
    extra_info(&mut row)?.insert("has_summary_prefix".into(), Value::Bool(true));
    Ok(Value::Object(row))
}

/// The `summary_only` record for a row with `summary`.
pub fn summary_only_record(row: &Value, summary: &str) -> Result<Value, String> {
    let mut row = row.as_object().cloned().ok_or("the row is not an object")?;
    row.insert(
        "prompt".into(),
        json!([{"role": "user", "content": summary}]),
    );
    let e = extra_info(&mut row)?;
    e.insert("question".into(), Value::String(summary.to_owned()));
    e.insert("original_question_discarded".into(), Value::Bool(true));
    Ok(Value::Object(row))
}

const INPUTS: &[KeySpec] = &[KeySpec {
    name: "samples",
    required: true,
    doc: "rows with a summary field (.jsonl or .parquet)",
}];
const OUTPUTS: &[KeySpec] = &[
    KeySpec {
        name: "prefix",
        required: false,
        doc: "summary as answer prefix",
    },
    KeySpec {
        name: "summary_only",
        required: false,
        doc: "summary as the whole prompt",
    },
];

impl Stage for SummaryDatasets {
    fn kind(&self) -> &'static str {
        "summary_datasets"
    }

    fn version(&self) -> u32 {
        1
    }

    fn inputs(&self) -> &'static [KeySpec] {
        INPUTS
    }

    fn outputs(&self) -> &'static [KeySpec] {
        OUTPUTS
    }

    fn check(&self, _config: &BTreeMap<String, Value>, params: &Value) -> Vec<ConfigError> {
        params::check::<Params>(params)
    }

    fn run(&self, ctx: &StageContext) -> anyhow::Result<()> {
        let p: Params = params::for_run(&ctx.params)?;
        let input = ctx.input("samples")?;
        let mut prefix = ctx
            .output("prefix")
            .map(|o| Sink::create(&o, &ctx.scratch))
            .transpose()?;
        let mut only = ctx
            .output("summary_only")
            .map(|o| Sink::create(&o, &ctx.scratch))
            .transpose()?;
        anyhow::ensure!(
            prefix.is_some() || only.is_some(),
            "declare at least one of the outputs 'prefix' and 'summary_only'"
        );
        let mut reader = RowReader::open(&input)?;
        ctx.progress.set_total(reader.len());
        let mut counts = Counters::default();
        let mut n = 0u64;
        while let Some(row) = reader.next_row() {
            n += 1;
            counts.add("rows_in", 1);
            let (line, row) = match row {
                Ok(r) => r,
                Err(e) if p.on_error == OnError::Skip => {
                    tracing::warn!("{e}");
                    counts.add("skipped_malformed", 1);
                    continue;
                }
                Err(e) => return Err(e).context("set `on_error: skip` to leave such records out"),
            };
            let summary = match summary_of(&row, &p.summary_field) {
                Ok(s) => s,
                Err(reason) => {
                    counts.add(reason, 1);
                    continue;
                }
            };
            let at = |e: String| anyhow::anyhow!("{}:{line}: {e}", input.display());
            if let Some(s) = prefix.as_mut() {
                s.write(&prefix_record(&row, summary).map_err(at)?)?;
            }
            if let Some(s) = only.as_mut() {
                s.write(&summary_only_record(&row, summary).map_err(at)?)?;
            }
            counts.add("rows_out", 1);
            if n.is_multiple_of(4096) {
                ctx.progress.set_done(reader.bytes_read());
            }
        }
        let mut report = json!({});
        if let Some(s) = prefix {
            report["prefix_rows"] = json!(s.finish()?);
        }
        if let Some(s) = only {
            report["summary_only_rows"] = json!(s.finish()?);
        }
        for (k, v) in &counts.0 {
            report[k] = json!(v);
        }
        ctx.report(&report);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_summary_only() {
        let row = json!({"prompt": [{"role": "user", "content": "Q"}], "extra_info": {"question": "Q", "answer": "A"}, "summary": "S"});
        let p = prefix_record(&row, "S").unwrap();
        assert_eq!(p["extra_info"]["answer"], "S\n\nA");
        assert_eq!(p["extra_info"]["has_summary_prefix"], true);
        let o = summary_only_record(&row, "S").unwrap();
        assert_eq!(o["prompt"], json!([{"role": "user", "content": "S"}]));
        assert_eq!(o["extra_info"]["question"], "S");
        assert_eq!(o["extra_info"]["original_question_discarded"], true);
        assert_eq!(o["extra_info"]["answer"], "A");
        let top = json!({"answer": "A", "summary": "S"});
        assert_eq!(prefix_record(&top, "S").unwrap()["answer"], "S\n\nA");
        assert!(prefix_record(&json!({"summary": "S"}), "S").is_err());
        assert_eq!(
            summary_of(&json!({"summary": " "}), "summary"),
            Err("empty_summary")
        );
        assert_eq!(summary_of(&json!({}), "summary"), Err("missing_summary"));
    }
}
