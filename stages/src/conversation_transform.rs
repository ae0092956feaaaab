//! Kind `conversation_transform`: an ordered list of cleaning steps over
//! ShareGPT tool-calling conversations (`{conversations: [{from, value}],
//! system, tools}`, `from` in human / gpt / function_call / observation),
//! each step reported (conversations in and out, turns changed, drops by
//! reason).
//!
//! Steps (`steps:` in order; a name, or `{name: {params}}`):
//! - `fix_arguments`: string `arguments` parsed into objects (single quotes
//!   repaired for `{...}` strings, else `{}`); conversations with `<tool_` or
//!   `\n[{` in any value dropped.
//! - `to_hermes`: function calls become gpt turns with a `<tool_call>` block
//!   (keeping a leading think block), observations become human turns.
//! - `validate_tool_calls` (`repairs: {order_id: "#"}`): every call checked
//!   against the tool schemas of the conversation's domain (input
//!   `tool_schemas`, `{domain: [tool, ...]}`, the domain found in the system
//!   prompt); a conversation with any invalid call is dropped.
//! - `drop_think` (`insert_call_text: true`): think-only assistant turns
//!   removed, think spans stripped, optionally `I will call the function
//!   {name}.` before a call with no text.
//! - `set_system_prompt` (`on_unknown_domain: keep | drop`): the system
//!   prompt replaced by `<domain>.*` from the input directory `system_prompts`.
//! - `merge_consecutive`, `trim_trailing_user`.
//! - `validate` (`cutoff_len`): LLaMA-Factory's alternation rule (conversations
//!   breaking it are dropped) and statistics: turns, domains, and with the
//!   input `model` token counts from its chat template and the number over
//!   `cutoff_len`.

pub mod schema;
pub mod steps;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::model::tokenizer::Tokenizer;
use crate::params::{self, OnError};
use crate::rows::RowReader;
use crate::sink::Sink;
use crate::{ConfigError, KeySpec, Stage, StageContext};
use schema::{Repair, ToolSet, domain_index};
use steps::{Conv, Outcome, Turn};

/// The `conversation_transform` kind.
pub struct ConversationTransform;

/// What `set_system_prompt` does when no domain matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDomain {
    /// Keep the conversation with its prompt (counted).
    #[default]
    Keep,
    /// Drop the conversation.
    Drop,
}

/// One step with its params.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// See the module docs.
    FixArguments,
    /// See the module docs.
    ToHermes,
    /// Id repairs applied before the check.
    ValidateToolCalls(Vec<Repair>),
    /// Whether to insert a sentence before bare calls.
    DropThink(bool),
    /// What to do without a domain.
    SetSystemPrompt(UnknownDomain),
    /// See the module docs.
    MergeConsecutive,
    /// See the module docs.
    TrimTrailingUser,
    /// Token limit for the "over cutoff" count.
    Validate(Option<usize>),
}

const STEP_NAMES: &[&str] = &[
    "fix_arguments",
    "to_hermes",
    "validate_tool_calls",
    "drop_think",
    "set_system_prompt",
    "merge_consecutive",
    "trim_trailing_user",
    "validate",
];

impl Step {
    /// The name as written in `steps:`.
    pub fn name(&self) -> &'static str {
        match self {
            Step::FixArguments => "fix_arguments",
            Step::ToHermes => "to_hermes",
            Step::ValidateToolCalls(_) => "validate_tool_calls",
            Step::DropThink(_) => "drop_think",
            Step::SetSystemPrompt(_) => "set_system_prompt",
            Step::MergeConsecutive => "merge_consecutive",
            Step::TrimTrailingUser => "trim_trailing_user",
            Step::Validate(_) => "validate",
        }
    }

    fn parse(i: usize, v: &Value) -> Result<Step, ConfigError> {
        let key = format!("params.steps[{i}]");
        let err = |message: String| ConfigError {
            key: key.clone(),
            message,
        };
        let (raw, p) = match v {
            Value::String(s) => (s.as_str(), Value::Object(Map::new())),
            Value::Object(m) if m.len() == 1 => {
                let (k, p) = m.iter().next().expect("one entry");
                let p = if p.is_null() {
                    Value::Object(Map::new())
                } else {
                    p.clone()
                };
                (k.as_str(), p)
            }
            _ => {
                return Err(err(
                    "a step is a name (`to_hermes`) or a mapping with one name (`drop_think: {insert_call_text: true}`)".into(),
                ));
            }
        };
        let typed = |step: &'static str| {
            move |e: ConfigError| ConfigError {
                key: format!(
                    "params.steps[{i}].{step}{}",
                    e.key.trim_start_matches("params")
                ),
                message: e.message,
            }
        };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Nothing {}
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Repairs {
            #[serde(default)]
            repairs: BTreeMap<String, String>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Think {
            #[serde(default)]
            insert_call_text: bool,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct System {
            #[serde(default)]
            on_unknown_domain: UnknownDomain,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Check {
            #[serde(default)]
            cutoff_len: Option<usize>,
        }
        let name: &'static str = STEP_NAMES
            .iter()
            .find(|n| **n == raw)
            .copied()
            .unwrap_or("");
        let none = |p: &Value| params::parse::<Nothing>(p).map_err(typed(name)).map(|_| ());
        Ok(match name {
            "fix_arguments" => none(&p).map(|_| Step::FixArguments)?,
            "to_hermes" => none(&p).map(|_| Step::ToHermes)?,
            "merge_consecutive" => none(&p).map(|_| Step::MergeConsecutive)?,
            "trim_trailing_user" => none(&p).map(|_| Step::TrimTrailingUser)?,
            "validate_tool_calls" => {
                let r: Repairs = params::parse(&p).map_err(typed(name))?;
                Step::ValidateToolCalls(
                    r.repairs
                        .into_iter()
                        .map(|(key, prefix)| Repair { key, prefix })
                        .collect(),
                )
            }
            "drop_think" => {
                let t: Think = params::parse(&p).map_err(typed(name))?;
                Step::DropThink(t.insert_call_text)
            }
            "set_system_prompt" => {
                let s: System = params::parse(&p).map_err(typed(name))?;
                Step::SetSystemPrompt(s.on_unknown_domain)
            }
            "validate" => {
                let c: Check = params::parse(&p).map_err(typed(name))?;
                Step::Validate(c.cutoff_len)
            }
            _ => {
                let other = raw;
                let hint = STEP_NAMES
                    .iter()
                    .map(|c| (strsim::jaro_winkler(other, c), *c))
                    .filter(|(s, _)| *s > 0.8)
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, c)| format!("did you mean '{c}'?"))
                    .unwrap_or_else(|| format!("expected one of: {}", STEP_NAMES.join(", ")));
                return Err(err(format!("unknown step '{other}'; {hint}")));
            }
        })
    }
}

/// Params of `conversation_transform`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The steps, in order.
    pub steps: Vec<Value>,
    /// Domain keywords looked for in system prompts (default: the tool
    /// schemas' domains, else the names of the system prompt files).
    #[serde(default)]
    pub domains: Option<Vec<String>>,
    /// `fail` (default) or `skip` on a malformed record.
    #[serde(default)]
    pub on_error: OnError,
}

fn parse_all(params: &Value) -> Result<(Params, Vec<Step>), ConfigError> {
    let p: Params = params::parse(params)?;
    if p.steps.is_empty() {
        return Err(ConfigError {
            key: "params.steps".into(),
            message: "give at least one step".into(),
        });
    }
    let steps = p
        .steps
        .iter()
        .enumerate()
        .map(|(i, v)| Step::parse(i, v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((p, steps))
}

const INPUTS: &[KeySpec] = &[
    KeySpec {
        name: "data",
        required: true,
        doc: "conversations: a JSON array (.json), JSONL or Parquet",
    },
    KeySpec {
        name: "tool_schemas",
        required: false,
        doc: "JSON {domain: [tool spec, ...]} for validate_tool_calls",
    },
    KeySpec {
        name: "system_prompts",
        required: false,
        doc: "a directory of <domain>.txt (or .md) files for set_system_prompt",
    },
    KeySpec {
        name: "model",
        required: false,
        doc: "checkpoint whose tokenizer and chat template count tokens in validate",
    },
];
const OUTPUTS: &[KeySpec] = &[
    KeySpec {
        name: "data",
        required: true,
        doc: "the conversations that remain (.json array, .jsonl or .parquet)",
    },
    KeySpec {
        name: "report",
        required: false,
        doc: "JSON: per step in/out/turns changed/drops by reason, and statistics",
    },
];

impl Stage for ConversationTransform {
    fn kind(&self) -> &'static str {
        "conversation_transform"
    }

    /// 2: tool schemas reach the chat template in the OpenAI form
    /// (`{"type": "function", "function": ...}`), as when served.
    fn version(&self) -> u32 {
        2
    }

    fn inputs(&self) -> &'static [KeySpec] {
        INPUTS
    }

    fn outputs(&self) -> &'static [KeySpec] {
        OUTPUTS
    }

    fn check(&self, _config: &BTreeMap<String, Value>, params: &Value) -> Vec<ConfigError> {
        parse_all(params).err().into_iter().collect()
    }

    fn run(&self, ctx: &StageContext) -> anyhow::Result<()> {
        let (p, steps) =
            parse_all(&ctx.params).map_err(|e| anyhow::anyhow!("{}: {}", e.key, e.message))?;
        run(ctx, &p, &steps)
    }
}

/// Reads every record of `path`: a JSON array (`.json`), JSONL or Parquet.
/// Each is (where, record).
pub fn read_records(path: &Path) -> anyhow::Result<Vec<(String, anyhow::Result<Value>)>> {
    let name = path.display().to_string();
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {name}"))?;
        let v: Value = serde_json::from_str(&text).with_context(|| {
            format!("{name} is not valid JSON (a .json file holds one array of conversations; use .jsonl for one per line)")
        })?;
        let Value::Array(items) = v else {
            bail!("{name}: expected a JSON array of conversations");
        };
        return Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("{name}[{i}]"), Ok(v)))
            .collect());
    }
    let mut reader = RowReader::open(path)?;
    let mut out = Vec::new();
    while let Some(r) = reader.next_row() {
        out.push(match r {
            Ok((line, v)) => (format!("{name}:{line}"), Ok(v)),
            Err(e) => (name.clone(), Err(anyhow::Error::from(e))),
        });
    }
    Ok(out)
}

/// A record as a conversation.
pub fn conv_of(v: Value) -> Result<Conv, String> {
    let Value::Object(record) = v else {
        return Err("the record is not a JSON object".into());
    };
    let list = record
        .get("conversations")
        .and_then(Value::as_array)
        .ok_or("no 'conversations' list")?;
    let mut turns = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let from = t.get("from").and_then(Value::as_str);
        let value = t.get("value").and_then(Value::as_str);
        match (from, value) {
            (Some(f), Some(v)) => turns.push(Turn::new(f, v)),
            _ => {
                return Err(format!(
                    "conversations[{i}] needs string 'from' and 'value'"
                ));
            }
        }
    }
    let system = match record.get("system") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("'system' is not a string".into()),
    };
    Ok(Conv {
        turns,
        system,
        record,
    })
}

/// The record of a conversation, its turns and system prompt written back.
pub fn record_of(c: &Conv) -> Value {
    let mut r = c.record.clone();
    let turns: Vec<Value> = c
        .turns
        .iter()
        .map(|t| json!({"from": t.from, "value": t.value}))
        .collect();
    r.insert("conversations".into(), Value::Array(turns));
    if r.contains_key("system") || !c.system.is_empty() {
        r.insert("system".into(), Value::String(c.system.clone()));
    }
    Value::Object(r)
}

/// Writes `records` to `path`: a JSON array for `.json`, else JSONL or Parquet.
pub fn write_records(path: &Path, scratch: &Path, records: &[Value]) -> anyhow::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        let mut text = String::from("[");
        for (i, r) in records.iter().enumerate() {
            text.push_str(if i == 0 { "\n" } else { ",\n" });
            text.push_str(&serde_json::to_string(r)?);
        }
        text.push_str("\n]\n");
        return std::fs::write(path, text).with_context(|| format!("writing {}", path.display()));
    }
    let mut sink = Sink::create(path, scratch)?;
    for r in records {
        sink.write(r)?;
    }
    sink.finish()?;
    Ok(())
}

/// Counts of one step.
#[derive(Debug, Default)]
struct StepReport {
    conversations_in: u64,
    conversations_out: u64,
    turns_changed: u64,
    dropped: BTreeMap<&'static str, u64>,
}

/// Min, mean and max of a series.
#[derive(Debug, Default)]
struct Spread {
    n: u64,
    sum: f64,
    min: Option<f64>,
    max: Option<f64>,
}

impl Spread {
    fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.min = Some(self.min.map_or(x, |m| m.min(x)));
        self.max = Some(self.max.map_or(x, |m| m.max(x)));
    }

    fn to_json(&self) -> Value {
        json!({
            "min": self.min,
            "avg": (self.n > 0).then(|| (self.sum / self.n as f64 * 100.0).round() / 100.0),
            "max": self.max,
        })
    }
}

/// The system prompt files: (domain, text), in name order.
fn system_prompts(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading the directory {}", dir.display()))?;
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if !p.is_file() {
            continue;
        }
        let Some(stem) = p.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        out.push((stem.to_owned(), text.trim_end().to_owned()));
    }
    out.sort();
    if out.is_empty() {
        bail!(
            "{} holds no prompt files; add one <domain>.txt per domain",
            dir.display()
        );
    }
    Ok(out)
}

fn run(ctx: &StageContext, p: &Params, steps: &[Step]) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let data = ctx.input("data")?;
    let needs = |f: fn(&Step) -> bool| steps.iter().any(f);
    let tools = if needs(|s| matches!(s, Step::ValidateToolCalls(_))) {
        let path = ctx
            .input("tool_schemas")
            .context("validate_tool_calls checks calls against tool schemas: declare the input `tool_schemas`")?;
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        ToolSet::from_json(&v).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
    } else {
        ToolSet::default()
    };
    let prompts = if needs(|s| matches!(s, Step::SetSystemPrompt(_))) {
        let dir = ctx.input("system_prompts").context(
            "set_system_prompt reads <domain>.txt files: declare the input directory `system_prompts`",
        )?;
        system_prompts(&dir)?
    } else {
        Vec::new()
    };
    let domains: Vec<String> = match &p.domains {
        Some(d) => d.clone(),
        None if !tools.domains().is_empty() => {
            tools.domains().into_iter().map(str::to_owned).collect()
        }
        None => prompts.iter().map(|(d, _)| d.clone()).collect(),
    };
    let tok = match ctx.deps.get("model") {
        Some(_) => Some(Tokenizer::from_dir(&ctx.input("model")?)?),
        None => None,
    };

    let records = read_records(&data)?;
    ctx.progress.set_total(records.len() as u64);
    let mut reports: Vec<StepReport> = steps.iter().map(|_| StepReport::default()).collect();
    let (mut malformed, mut unknown_domain_kept) = (0u64, 0u64);
    let mut out = Vec::new();
    let (mut turns, mut tokens) = (Spread::default(), Spread::default());
    let mut by_domain: BTreeMap<String, u64> = BTreeMap::new();
    let (mut over_cutoff, mut stats_seen) = (0u64, false);
    let mut cutoff_used = None;
    for (where_, rec) in records {
        ctx.progress.inc(1);
        let conv = rec
            .map_err(|e| format!("{e:#}"))
            .and_then(|v| conv_of(v).map_err(|e| format!("{where_}: {e}")));
        let mut c = match conv {
            Ok(c) => c,
            Err(e) if p.on_error == OnError::Skip => {
                tracing::warn!("{e}");
                malformed += 1;
                continue;
            }
            Err(e) => bail!(
                "{e}\n  help: fix the record, or set `on_error: skip` to leave such records out"
            ),
        };
        let mut kept = true;
        for (step, rep) in steps.iter().zip(reports.iter_mut()) {
            rep.conversations_in += 1;
            let outcome = match step {
                Step::FixArguments => steps::fix_arguments(&mut c),
                Step::ToHermes => steps::to_hermes(&mut c),
                Step::ValidateToolCalls(r) => steps::validate_tool_calls(&mut c, &tools, r),
                Step::DropThink(insert) => steps::drop_think(&mut c, *insert),
                Step::SetSystemPrompt(on_unknown) => {
                    let drop = *on_unknown == UnknownDomain::Drop;
                    steps::set_system_prompt(&mut c, &prompts, drop).unwrap_or_else(|| {
                        unknown_domain_kept += 1;
                        Outcome::Kept(0)
                    })
                }
                Step::MergeConsecutive => steps::merge_consecutive(&mut c),
                Step::TrimTrailingUser => steps::trim_trailing_user(&mut c),
                Step::Validate(cutoff) => {
                    let o = steps::validate(&mut c);
                    if o == Outcome::Kept(0) {
                        stats_seen = true;
                        cutoff_used = *cutoff;
                        turns.add(c.turns.len() as f64);
                        let d = domain_index(&c.system, domains.iter().map(String::as_str))
                            .map_or("unknown".to_owned(), |i| domains[i].clone());
                        *by_domain.entry(d).or_default() += 1;
                        if let Some(tok) = &tok {
                            let n = token_count(tok, &c)
                                .map_err(|e| anyhow::anyhow!("{where_}: {e}"))?;
                            tokens.add(n as f64);
                            if cutoff.is_some_and(|l| n > l) {
                                over_cutoff += 1;
                            }
                        }
                    }
                    o
                }
            };
            match outcome {
                Outcome::Kept(n) => {
                    rep.conversations_out += 1;
                    rep.turns_changed += n;
                }
                Outcome::Dropped(reason) => {
                    *rep.dropped.entry(reason).or_default() += 1;
                    kept = false;
                    break;
                }
            }
        }
        if kept {
            out.push(record_of(&c));
        }
    }
    let conversations_in = reports.first().map_or(0, |r| r.conversations_in);
    if out.is_empty() && conversations_in > 0 {
        let why: Vec<String> = steps
            .iter()
            .zip(&reports)
            .filter(|(_, r)| !r.dropped.is_empty())
            .map(|(s, r)| format!("{}: {:?}", s.name(), r.dropped))
            .collect();
        bail!(
            "every conversation was dropped ({}); check the steps and their inputs",
            why.join("; ")
        );
    }
    let output = ctx
        .output("data")
        .context("output 'data' is not declared")?;
    write_records(&output, &ctx.scratch, &out)?;

    let step_json: Vec<Value> = steps
        .iter()
        .zip(&reports)
        .map(|(s, r)| {
            json!({
                "step": s.name(),
                "conversations_in": r.conversations_in,
                "conversations_out": r.conversations_out,
                "turns_changed": r.turns_changed,
                "dropped": r.dropped,
            })
        })
        .collect();
    let mut full = json!({
        "conversations_in": conversations_in + malformed,
        "conversations_out": out.len(),
        "malformed": malformed,
        "steps": step_json,
    });
    if unknown_domain_kept > 0 {
        full["system_prompt_unknown_domain_kept"] = json!(unknown_domain_kept);
    }
    if stats_seen {
        let mut stats = json!({"turns": turns.to_json(), "domains": by_domain});
        if tok.is_some() {
            stats["tokens"] = tokens.to_json();
            if let Some(l) = cutoff_used {
                stats["cutoff_len"] = json!(l);
                stats["over_cutoff"] = json!(over_cutoff);
            }
        }
        full["stats"] = stats;
    }
    if let Some(path) = ctx.output("report") {
        crate::sink::write_json(&path, &full)?;
    }
    let mut report = json!({
        "conversations_in": conversations_in + malformed,
        "conversations_out": out.len(),
    });
    if malformed > 0 {
        report["malformed"] = json!(malformed);
    }
    for (s, r) in steps.iter().zip(&reports) {
        if r.turns_changed > 0 {
            report[format!("{}_turns_changed", s.name())] = json!(r.turns_changed);
        }
        for (reason, n) in &r.dropped {
            report[format!("{}_dropped_{reason}", s.name())] = json!(n);
        }
    }
    report["seconds"] = json!((t0.elapsed().as_secs_f64() * 100.0).round() / 100.0);
    eprintln!("conversation_transform: {report}");
    ctx.report(&report);
    Ok(())
}

/// Tokens of the conversation rendered with the model's chat template.
fn token_count(tok: &Tokenizer, c: &Conv) -> Result<usize, String> {
    let spec = crate::train::data::DataSpec {
        cutoff_len: usize::MAX,
        ..Default::default()
    };
    let conv = crate::train::data::conversation(&record_of(c), &spec)?;
    let text = tok
        .apply_chat_template(&Value::Array(conv.messages), conv.tools.as_ref(), false)
        .map_err(|e| format!("{e:#}"))?;
    tok.encode(&text, false)
        .map(|ids| ids.len())
        .map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_with_params_and_name_errors() {
        let (_, steps) = parse_all(&json!({"steps": [
            "fix_arguments",
            {"validate_tool_calls": {"repairs": {"order_id": "#"}}},
            {"drop_think": {"insert_call_text": true}},
            {"set_system_prompt": null},
            {"validate": {"cutoff_len": 4096}},
        ]}))
        .unwrap();
        assert_eq!(
            steps,
            [
                Step::FixArguments,
                Step::ValidateToolCalls(vec![Repair {
                    key: "order_id".into(),
                    prefix: "#".into()
                }]),
                Step::DropThink(true),
                Step::SetSystemPrompt(UnknownDomain::Keep),
                Step::Validate(Some(4096)),
            ]
        );
        let e = parse_all(&json!({"steps": ["to_hermez"]})).unwrap_err();
        assert_eq!(e.key, "params.steps[0]");
        assert!(
            e.message.contains("did you mean 'to_hermes'"),
            "{}",
            e.message
        );
        let e = parse_all(&json!({"steps": ["to_hermes", {"drop_think": {"insert": true}}]}))
            .unwrap_err();
        assert_eq!(e.key, "params.steps[1].drop_think.insert");
        assert!(parse_all(&json!({"steps": []})).is_err());
        assert!(parse_all(&json!({"steps": [{"a": 1, "b": 2}]})).is_err());
    }

    #[test]
    fn records_round_trip_keeping_other_fields() {
        let v = json!({"id": 7, "conversations": [{"from": "human", "value": "hi"}], "system": "s", "tools": "[]"});
        let c = conv_of(v.clone()).unwrap();
        assert_eq!(record_of(&c), v);
        assert!(conv_of(json!({"conversations": [{"from": "human"}]})).is_err());
        assert!(conv_of(json!([1])).is_err());
    }
}
