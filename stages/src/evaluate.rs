//! Kind `evaluate`: generates with a model (in-process or behind an API) and
//! scores the replies, or scores a dataset teacher-forced.
//!
//! Tasks (`task:`):
//! - `gsm8k`: `{question, answer}` rows with `#### N` references; accuracy,
//!   thinking proportion and answer proportion (and pass@n for `n` > 1).
//! - `summary_reasoning`: the model sees the full context and writes a
//!   summary then the next step; format validity, next-step exact match and
//!   token F1, `<answer>` exact match, summary length ratio and verbatim fact
//!   retention.
//! - `reasoning_from_summary`: the model sees the summary alone and writes
//!   the next step; exact match, token F1, `<answer>` exact match, format.
//! - `teacher_forced`: no generation; loss, perplexity, entropy and top-k
//!   probabilities of the reference tokens, per token class.
//!
//! Outputs: `metrics` (JSON, what `anneal metrics` compares), and optionally
//! `results` (one row per example and sample, JSONL or Parquet) and `csv`.
//! Replies are journaled as they arrive, so a killed evaluation resumes.

pub mod metrics;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::tensor::ElementConversion;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::generation::{
    self, BackendKind, BackendSetup, GenParams, Journal, Reply, Request, RunCounts, Sampling,
};
use crate::model::Model;
use crate::model::device::{OnDevice, run_on};
use crate::model::tokenizer::Tokenizer;
use crate::params::OnError;
use crate::rows::RowReader;
use crate::sink::{Sink, write_json};
use crate::train::data::{DataSpec, Sample, Side, TrainOn};
use crate::train::stats::Stats;
use crate::{ConfigError, KeySpec, Stage, StageContext};
use metrics::{AnswerFormat, FormatTags, Mean};

/// The `evaluate` kind.
pub struct Evaluate;

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Full context -> summary then next step.
    SummaryReasoning,
    /// Summary alone -> next step.
    ReasoningFromSummary,
    /// Grade-school math with `#### N` references.
    Gsm8k,
    /// Loss and token statistics of the references, no generation.
    TeacherForced,
}

/// Params of `evaluate` besides the generation ones ([`GenParams`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The task.
    pub task: Task,
    /// Only the first `limit` rows.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Key of the prompt (messages or text) in verl rows.
    #[serde(default = "crate::train::data::default_prompt_key")]
    pub prompt_key: String,
    /// Key of the reference reply: `extra_info.<key>` first, then top level.
    #[serde(default = "crate::train::data::default_response_key")]
    pub response_key: String,
    /// gsm8k: key of the question.
    #[serde(default = "default_question_key")]
    pub question_key: String,
    /// gsm8k: key of the reference answer (`reasoning #### N`).
    #[serde(default = "crate::train::data::default_response_key")]
    pub answer_key: String,
    /// gsm8k: how the model is asked to mark its answer: `tags`, `boxed` or `hashes`.
    #[serde(default)]
    pub answer_format: AnswerFormat,
    /// gsm8k with `answer_format: tags`: the four markers.
    #[serde(default)]
    pub format_tags: FormatTags,
    /// teacher_forced: key of multi-turn messages.
    #[serde(default = "crate::train::data::default_messages_key")]
    pub messages_key: String,
    /// teacher_forced: longest sample in tokens.
    #[serde(default = "crate::train::data::default_cutoff")]
    pub cutoff_len: usize,
    /// teacher_forced: which end of a long sample is cut.
    #[serde(default)]
    pub truncation_side: Side,
    /// teacher_forced: score prompt tokens too.
    #[serde(default)]
    pub train_on_prompt: bool,
    /// teacher_forced: which tokens count: `all`, `reasoning` or `tool_calls`.
    #[serde(default)]
    pub train_on: TrainOn,
    /// teacher_forced: score the last assistant turn only (as `train`'s
    /// `mask_history`).
    #[serde(default)]
    pub mask_history: bool,
    /// Failed generations tolerated before the stage fails.
    #[serde(default)]
    pub max_failures: u64,
    /// `fail` (default) or `skip` on a malformed row.
    #[serde(default)]
    pub on_error: OnError,
}

fn default_question_key() -> String {
    "question".into()
}

/// Both halves of the params.
struct AllParams {
    own: Params,
    generation: GenParams,
}

fn parse_all(params: &Value) -> Result<AllParams, ConfigError> {
    let (own, generation) = generation::parse_split::<Params>(params)?;
    if own.limit == Some(0) {
        return Err(ConfigError {
            key: "params.limit".into(),
            message: "limit must be at least 1 (leave it out for every row)".into(),
        });
    }
    if own.cutoff_len == 0 {
        return Err(ConfigError {
            key: "params.cutoff_len".into(),
            message: "cutoff_len must be at least 1".into(),
        });
    }
    if own.mask_history && own.train_on_prompt {
        return Err(ConfigError {
            key: "params.mask_history".into(),
            message: "mask_history (score the last turn only) contradicts train_on_prompt (score everything); set one of them".into(),
        });
    }
    Ok(AllParams { own, generation })
}

impl AllParams {
    /// The backend: as set, else local when a model is declared, else openai.
    fn backend(&self, has_model: bool) -> BackendKind {
        self.generation.backend.unwrap_or(if has_model {
            BackendKind::Local
        } else {
            BackendKind::Openai
        })
    }

    /// Greedy, 512 new tokens, unless set.
    fn sampling(&self) -> Sampling {
        let g = &self.generation;
        Sampling {
            temperature: g.temperature.unwrap_or(0.0),
            max_tokens: g.max_tokens.unwrap_or(512),
            top_p: g.top_p,
            top_k: g.top_k,
            seed: g.seed,
            stop: g.stop.clone(),
            chat_template_kwargs: g.chat_template_kwargs.clone(),
        }
    }

    /// The system prompt: as set, else the task's default (gsm8k only).
    fn system(&self) -> Option<String> {
        if let Some(s) = &self.generation.system {
            return Some(s.clone());
        }
        if self.own.task != Task::Gsm8k {
            return None;
        }
        let t = &self.own.format_tags;
        Some(match self.own.answer_format {
            AnswerFormat::Tags => format!(
                "You are given a problem. Think about the problem and provide your working out. \
                 Place it between {} and {}. Then, provide your solution between {}{}",
                t.reasoning_start, t.reasoning_end, t.solution_start, t.solution_end
            ),
            AnswerFormat::Boxed => {
                "Solve the problem step by step. Put the final answer, a number, \
                                    in \\boxed{}."
                    .into()
            }
            AnswerFormat::Hashes => "Solve the problem step by step. End with a line \
                                     `#### N` where N is the final answer, a number."
                .into(),
        })
    }
}

const INPUTS: &[KeySpec] = &[
    KeySpec {
        name: "data",
        required: true,
        doc: "rows to evaluate on (.jsonl or .parquet)",
    },
    KeySpec {
        name: "model",
        required: false,
        doc: "checkpoint directory: generates with it (backend: local), scores with it (teacher_forced), counts tokens with its tokenizer",
    },
];
const OUTPUTS: &[KeySpec] = &[
    KeySpec {
        name: "metrics",
        required: true,
        doc: "metrics.json: the task's metrics (compared by `anneal metrics`)",
    },
    KeySpec {
        name: "results",
        required: false,
        doc: "one row per example and sample (.jsonl or .parquet)",
    },
    KeySpec {
        name: "csv",
        required: false,
        doc: "the per-example results as CSV",
    },
];

impl Stage for Evaluate {
    fn kind(&self) -> &'static str {
        "evaluate"
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
        let p = parse_all(&ctx.params).map_err(|e| anyhow::anyhow!("{}: {}", e.key, e.message))?;
        match p.own.task {
            Task::TeacherForced => teacher_forced(ctx, &p),
            _ => generative(ctx, &p),
        }
    }
}

/// An example read from the data.
struct Example {
    line: u64,
    messages: Vec<Value>,
    reference: String,
    /// gsm8k: the question.
    question: String,
}

/// Reads the examples of a generative task.
fn read_examples(path: &Path, p: &AllParams) -> anyhow::Result<(Vec<Example>, u64)> {
    let own = &p.own;
    let system = p.system();
    let mut reader = RowReader::open(path)?;
    let mut out = Vec::new();
    let mut skipped = 0;
    while own.limit.is_none_or(|l| out.len() < l) {
        let Some(row) = reader.next_row() else { break };
        let example = row.map_err(anyhow::Error::from).and_then(|(line, row)| {
            example_of(&row, p, system.as_deref())
                .map(|e| Example { line, ..e })
                .map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))
        });
        match example {
            Ok(e) => out.push(e),
            Err(e) if own.on_error == OnError::Skip => {
                tracing::warn!("{e:#}");
                skipped += 1;
            }
            Err(e) => return Err(e).context("set `on_error: skip` to leave such rows out"),
        }
    }
    Ok((out, skipped))
}

fn str_field<'a>(row: &'a Value, key: &str) -> Result<&'a str, String> {
    row.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("'{key}' is missing or not a string"))
}

fn example_of(row: &Value, p: &AllParams, system: Option<&str>) -> Result<Example, String> {
    let own = &p.own;
    if !row.is_object() {
        return Err("the row is not a JSON object".into());
    }
    if own.task == Task::Gsm8k {
        let question = str_field(row, &own.question_key)?;
        let answer = str_field(row, &own.answer_key)?;
        return Ok(Example {
            line: 0,
            messages: generation::chat(system, question),
            reference: answer.to_owned(),
            question: question.to_owned(),
        });
    }
    let mut messages = match row.get(&own.prompt_key) {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
        _ => {
            return Err(format!(
                "'{}' is neither a list of messages nor text",
                own.prompt_key
            ));
        }
    };
    if let Some(s) = system
        && messages.first().and_then(|m| m.get("role")) != Some(&json!("system"))
    {
        messages.insert(0, json!({"role": "system", "content": s}));
    }
    let reference = row
        .get("extra_info")
        .and_then(|e| e.get(&own.response_key))
        .or_else(|| row.get(&own.response_key))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            format!(
                "no reference: neither 'extra_info.{0}' nor '{0}' is a string",
                own.response_key
            )
        })?;
    Ok(Example {
        line: 0,
        messages,
        reference: reference.to_owned(),
        question: String::new(),
    })
}

/// Counts tokens with the model's tokenizer, or words without one.
struct Counter(Option<Tokenizer>);

impl Counter {
    fn count(&self, text: &str) -> usize {
        match &self.0 {
            Some(t) => t
                .encode(text, false)
                .map(|ids| ids.len())
                .unwrap_or_else(|_| text.split_whitespace().count()),
            None => text.split_whitespace().count(),
        }
    }

    fn unit(&self) -> &'static str {
        if self.0.is_some() { "tokens" } else { "words" }
    }
}

/// Running means of every metric, by name, in first-seen order.
#[derive(Default)]
struct Means(Vec<(&'static str, Mean)>);

impl Means {
    fn get(&mut self, name: &'static str) -> &mut Mean {
        let i = match self.0.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                self.0.push((name, Mean::default()));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }

    fn to_json(&self) -> Map<String, Value> {
        self.0
            .iter()
            .map(|(n, m)| (n.to_string(), json!(m.value())))
            .collect()
    }
}

/// Scores one reply; returns the per-sample record and, for gsm8k, whether it is correct.
fn score(
    task: Task,
    own: &Params,
    ex: &Example,
    text: &str,
    counter: &Counter,
    means: &mut Means,
) -> (Map<String, Value>, bool) {
    use metrics::*;
    let mut r = Map::new();
    match task {
        Task::Gsm8k => {
            let (ref_reasoning, ref_answer) = gsm8k_reference(&ex.reference);
            let ext = extract(text, own.answer_format, &own.format_tags);
            let correct = answers_match(&ext.answer, &ref_answer);
            means.get("accuracy").add_bool(correct);
            means
                .get("thinking_proportion")
                .add_bool(!ext.reasoning.trim().is_empty());
            means
                .get("answer_proportion")
                .add_bool(!ext.answer.trim().is_empty());
            r.insert("question".into(), json!(ex.question));
            r.insert("reference_reasoning".into(), json!(ref_reasoning));
            r.insert("reference_answer".into(), json!(ref_answer));
            r.insert("generated".into(), json!(text));
            r.insert("extracted_reasoning".into(), json!(ext.reasoning));
            r.insert("extracted_answer".into(), json!(ext.answer));
            r.insert("correct".into(), json!(correct));
            return (r, correct);
        }
        Task::SummaryReasoning => {
            let (ref_summary, ref_step) = split_summary(&ex.reference);
            let (gen_summary, gen_step) = split_summary(text);
            let valid = summary_format_valid(text);
            means.get("format_valid").add_bool(valid);
            r.insert("format_valid".into(), json!(valid));
            step_metrics(ref_step, gen_step, means, &mut r);
            if let Some(s) = gen_summary {
                let context: String = ex
                    .messages
                    .iter()
                    .filter_map(|m| m.get("content").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n");
                let c = counter.count(&context);
                if c > 0 {
                    let ratio = counter.count(s) as f64 / c as f64;
                    means.get("summary_length_ratio").add(ratio);
                    r.insert("summary_length_ratio".into(), json!(ratio));
                }
            }
            let ref_info = ref_summary.and_then(|s| first_block(s, INFO_TAG));
            let gen_info = gen_summary.and_then(|s| last_block(s, INFO_TAG));
            if let Some(f) = ref_info.and_then(|ri| fact_retention(ri, gen_info.unwrap_or(""))) {
                means.get("fact_retention").add(f);
                r.insert("fact_retention".into(), json!(f));
            }
            r.insert("reference".into(), json!(ex.reference));
            r.insert("generated".into(), json!(text));
            r.insert("generated_step".into(), json!(gen_step));
        }
        Task::ReasoningFromSummary => {
            let gen_step = text.trim();
            let valid = step_format_valid(gen_step);
            means.get("format_valid").add_bool(valid);
            r.insert("format_valid".into(), json!(valid));
            step_metrics(ex.reference.trim(), gen_step, means, &mut r);
            r.insert("reference".into(), json!(ex.reference));
            r.insert("generated".into(), json!(text));
        }
        Task::TeacherForced => {}
    }
    (r, false)
}

/// Next-step exact match, token F1 and, when the reference answers, `<answer>` match.
fn step_metrics(reference: &str, generated: &str, means: &mut Means, r: &mut Map<String, Value>) {
    use metrics::*;
    let em = exact_match(generated, reference);
    let f1 = token_f1(generated, reference);
    means.get("next_step_exact_match").add_bool(em);
    means.get("next_step_f1").add(f1);
    r.insert("next_step_exact_match".into(), json!(em));
    r.insert("next_step_f1".into(), json!(f1));
    if let Some(ra) = last_block(reference, ANSWER_TAG) {
        let ok = last_block(generated, ANSWER_TAG).is_some_and(|ga| exact_match(ga, ra));
        means.get("answer_exact_match").add_bool(ok);
        r.insert("answer_exact_match".into(), json!(ok));
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn generative(ctx: &StageContext, p: &AllParams) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let own = &p.own;
    let n = p.generation.n;
    let data = ctx.input("data")?;
    let model_dir = match ctx.deps.get("model") {
        Some(_) => Some(ctx.input("model")?),
        None => None,
    };
    let backend = p.backend(model_dir.is_some());
    let (examples, skipped) = read_examples(&data, p)?;
    if examples.is_empty() {
        bail!("no examples to evaluate in {}", data.display());
    }
    // Lengths in tokens need the model's tokenizer: the local backend loads
    // it anyway; for a server it is loaded here, before any request is sent.
    let count_tokens = own.task == Task::SummaryReasoning && model_dir.is_some();
    let mut tokenizer = match &model_dir {
        Some(d) if count_tokens && backend != BackendKind::Local => Some(Tokenizer::from_dir(d)?),
        _ => None,
    };
    let requests: Vec<Request> = examples
        .iter()
        .flat_map(|e| {
            (0..n).map(|sample| Request {
                messages: e.messages.clone(),
                sample,
            })
        })
        .collect();
    ctx.progress.set_total(requests.len() as u64);
    let sampling = p.sampling();
    let journal = Journal::open(&ctx.cache, &ctx.name)?;
    let mut counts = RunCounts::default();
    let setup = BackendSetup {
        kind: backend,
        params: &p.generation,
        sampling: sampling.clone(),
        model_dir: model_dir.as_deref(),
    };
    let (replies, stats, identity) = generation::with_generator(setup, |g| {
        let r = generation::run_journaled(
            g,
            &journal,
            &requests,
            &json!({"task": "evaluate"}),
            &sampling,
            &ctx.progress,
            &mut counts,
        )?;
        if count_tokens && tokenizer.is_none() {
            tokenizer = g.tokenizer().cloned();
        }
        Ok((r, g.stats(), g.identity()))
    })?;
    let counter = Counter(tokenizer);

    let mut means = Means::default();
    let mut failures: Vec<String> = Vec::new();
    let mut rows: Vec<Map<String, Value>> = Vec::new();
    let (mut any_correct, mut tokens) = (Mean::default(), 0u64);
    for (i, ex) in examples.iter().enumerate() {
        let mut correct_any = false;
        for s in 0..n {
            let text = match &replies[i * n + s] {
                Ok(Reply {
                    text,
                    completion_tokens,
                }) => {
                    tokens += completion_tokens.unwrap_or(0);
                    text
                }
                Err(e) => {
                    failures.push(format!("{}:{}: {e}", data.display(), ex.line));
                    continue;
                }
            };
            let (mut r, correct) = score(own.task, own, ex, text, &counter, &mut means);
            correct_any |= correct;
            let mut row = Map::new();
            row.insert("index".into(), json!(i));
            row.insert("line".into(), json!(ex.line));
            row.insert("sample".into(), json!(s));
            row.append(&mut r);
            rows.push(row);
        }
        any_correct.add_bool(correct_any);
    }
    for f in failures.iter().take(20) {
        eprintln!("error: {f}");
    }
    if failures.len() as u64 > own.max_failures {
        bail!(
            "{} generation(s) failed (max_failures: {}); completed replies are kept: a rerun generates only the failed ones",
            failures.len(),
            own.max_failures
        );
    }
    let mut m = means.to_json();
    if own.task == Task::Gsm8k && n > 1 {
        m.insert(format!("pass@{n}"), json!(any_correct.value()));
    }
    for v in m.values_mut() {
        if let Some(x) = v.as_f64() {
            *v = json!(round4(x));
        }
    }
    // metrics.json holds only what follows from the inputs (same bytes on a
    // rerun or elsewhere); timings and cache counts go to the run record.
    let mut generation = json!({
        "backend": identity,
        "sampling": sampling,
        "n": n,
        "completion_tokens": tokens,
    });
    if own.task == Task::SummaryReasoning {
        generation["length_unit"] = json!(counter.unit());
    }
    let out = json!({
        "task": own.task,
        "examples": examples.len(),
        "samples": rows.len(),
        "skipped": skipped,
        "metrics": m,
        "generation": generation,
    });
    write_outputs(ctx, own.task, &out, &rows)?;
    let mut report = json!({"examples": examples.len(), "skipped": skipped});
    for (k, v) in out["metrics"].as_object().into_iter().flatten() {
        report[k] = v.clone();
    }
    report["cached"] = json!(counts.cached);
    report["called"] = json!(counts.called);
    report["failed"] = json!(failures.len());
    if counts.called > 0 {
        let secs = stats.generate_seconds;
        report["new_tokens"] = json!(stats.completion_tokens);
        report["generate_seconds"] = json!(round4(secs));
        report["tokens_per_s"] = json!(round4(stats.completion_tokens as f64 / secs.max(1e-9)));
    }
    report["seconds"] = json!((t0.elapsed().as_secs_f64() * 100.0).round() / 100.0);
    eprintln!("evaluate: {report}");
    ctx.report(&report);
    Ok(())
}

/// Columns of the CSV, per task.
fn csv_columns(task: Task) -> &'static [&'static str] {
    match task {
        Task::Gsm8k => &[
            "index",
            "sample",
            "question",
            "reference_reasoning",
            "reference_answer",
            "generated",
            "extracted_reasoning",
            "extracted_answer",
            "correct",
        ],
        Task::SummaryReasoning => &[
            "index",
            "sample",
            "format_valid",
            "next_step_exact_match",
            "next_step_f1",
            "answer_exact_match",
            "summary_length_ratio",
            "fact_retention",
            "reference",
            "generated",
        ],
        Task::ReasoningFromSummary => &[
            "index",
            "sample",
            "format_valid",
            "next_step_exact_match",
            "next_step_f1",
            "answer_exact_match",
            "reference",
            "generated",
        ],
        Task::TeacherForced => &["index", "line", "loss", "tokens"],
    }
}

fn write_outputs(
    ctx: &StageContext,
    task: Task,
    metrics: &Value,
    rows: &[Map<String, Value>],
) -> anyhow::Result<()> {
    let path = ctx
        .output("metrics")
        .context("output 'metrics' is not declared")?;
    write_json(&path, metrics)?;
    if let Some(path) = ctx.output("results") {
        let mut sink = Sink::create(&path, &ctx.scratch)?;
        for r in rows {
            sink.write(r)?;
        }
        sink.finish()?;
    }
    if let Some(path) = ctx.output("csv") {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let mut w =
            csv::Writer::from_path(&path).with_context(|| format!("writing {}", path.display()))?;
        let cols = csv_columns(task);
        w.write_record(cols)?;
        for r in rows {
            w.write_record(cols.iter().map(|c| match r.get(*c) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            }))?;
        }
        w.flush()
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

struct TeacherForced<'a> {
    ctx: &'a StageContext,
    p: &'a AllParams,
    dir: &'a Path,
}

impl OnDevice for TeacherForced<'_> {
    type Output = ();

    fn run<B: crate::model::TrainBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let (ctx, own) = (self.ctx, &self.p.own);
        let t0 = Instant::now();
        let tok = Tokenizer::from_dir(self.dir)?;
        let spec = DataSpec {
            prompt_key: own.prompt_key.clone(),
            response_key: own.response_key.clone(),
            messages_key: own.messages_key.clone(),
            train_on_prompt: own.train_on_prompt,
            cutoff_len: own.cutoff_len,
            truncation_side: own.truncation_side,
            train_on: own.train_on,
            mask_history: own.mask_history,
            chat_template_kwargs: self.p.generation.chat_template_kwargs.clone(),
        };
        let data = ctx.input("data")?;
        let mut counts = BTreeMap::new();
        let mut samples =
            crate::train::load_samples(&data, &tok, &spec, own.on_error, &mut counts, "", None)?;
        if let Some(l) = own.limit {
            samples.truncate(l);
        }
        if samples.is_empty() {
            bail!("no usable samples in {}", data.display());
        }
        let model = Model::<B::InnerBackend>::load(self.dir, &device)?;
        let pad_id = tok
            .pad_token_id()
            .or(model.config.pad_token_id)
            .unwrap_or(0);
        // One sample per batch when per-example losses are asked for.
        let batch = if ctx.output("results").is_some() || ctx.output("csv").is_some() {
            1
        } else {
            self.p.generation.batch_size
        };
        ctx.progress.set_total(samples.len() as u64);
        let mut stats = Stats::default();
        let (mut sum, mut tokens) = (0.0f64, 0usize);
        let mut rows = Vec::new();
        for (c, chunk) in samples.chunks(batch).enumerate() {
            let refs: Vec<&Sample> = chunk.iter().collect();
            let padded = crate::train::pad(&refs, pad_id);
            let (loss, k) = model.net.loss(&padded.0, &padded.1, &padded.2);
            stats.add_batch(&model.net, &refs, &padded);
            if k > 0 {
                let l = loss.into_scalar().elem::<f64>();
                sum += l * k as f64;
                tokens += k;
                if batch == 1 {
                    let mut r = Map::new();
                    r.insert("index".into(), json!(c));
                    r.insert("loss".into(), json!(l));
                    r.insert("tokens".into(), json!(k));
                    rows.push(r);
                }
            }
            ctx.progress.inc(chunk.len() as u64);
        }
        let loss = sum / tokens.max(1) as f64;
        let out = json!({
            "task": Task::TeacherForced,
            "examples": samples.len(),
            "samples": samples.len(),
            "counts": counts,
            "metrics": {
                "loss": round4(loss),
                "perplexity": round4(loss.exp().min(1e6)),
                "tokens": tokens,
                "detailed": stats.to_json(),
            },
        });
        write_outputs(ctx, Task::TeacherForced, &out, &rows)?;
        let report = json!({
            "examples": samples.len(),
            "loss": round4(loss),
            "perplexity": round4(loss.exp().min(1e6)),
            "tokens": tokens,
            "seconds": (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        });
        eprintln!("evaluate: {report}");
        ctx.report(&report);
        Ok(())
    }
}

fn teacher_forced(ctx: &StageContext, p: &AllParams) -> anyhow::Result<()> {
    let dir = ctx.input("model").context(
        "task: teacher_forced scores the data with a model: declare it as the input `model`",
    )?;
    run_on(p.generation.device, TeacherForced { ctx, p, dir: &dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(v: Value) -> AllParams {
        parse_all(&v).map_err(|e| e.message).unwrap()
    }

    #[test]
    fn params_mix_own_and_generation_keys() {
        let p = all(json!({"task": "gsm8k", "temperature": 0.7, "n": 4, "limit": 20}));
        assert_eq!(p.own.task, Task::Gsm8k);
        assert_eq!(p.sampling().temperature, 0.7);
        assert_eq!(p.sampling().max_tokens, 512);
        assert_eq!(p.generation.n, 4);
        assert_eq!(p.backend(true), BackendKind::Local);
        assert_eq!(p.backend(false), BackendKind::Openai);
        let e = parse_all(&json!({"task": "gsm8k", "temprature": 1}))
            .err()
            .unwrap();
        assert_eq!(e.key, "params.temprature");
        assert!(e.message.contains("temperature"), "{}", e.message);
        assert!(parse_all(&json!({"task": "nope"})).is_err());
        assert!(parse_all(&json!({"task": "gsm8k", "limit": 0})).is_err());
    }

    #[test]
    fn gsm8k_system_prompt_names_the_markers() {
        let p = all(json!({"task": "gsm8k"}));
        let s = p.system().unwrap();
        assert!(s.contains("<start_working_out>") && s.contains("<SOLUTION></SOLUTION>"));
        let p = all(json!({"task": "gsm8k", "answer_format": "boxed"}));
        assert!(p.system().unwrap().contains("\\boxed{}"));
        let p = all(json!({"task": "summary_reasoning"}));
        assert_eq!(p.system(), None);
    }

    #[test]
    fn scoring_a_gsm8k_reply() {
        let p = all(json!({"task": "gsm8k"}));
        let ex = Example {
            line: 1,
            messages: vec![],
            reference: "2 + 2 = <<2+2=4>>4 and 1,000 more\n#### 1,004".into(),
            question: "q".into(),
        };
        let mut means = Means::default();
        let counter = Counter(None);
        let text = "<start_working_out>add<end_working_out><SOLUTION>1004</SOLUTION>";
        let (r, ok) = score(Task::Gsm8k, &p.own, &ex, text, &counter, &mut means);
        assert!(ok);
        assert_eq!(r["reference_answer"], "1004");
        let (_, ok) = score(Task::Gsm8k, &p.own, &ex, "no markers", &counter, &mut means);
        assert!(!ok);
        let m = means.to_json();
        assert_eq!(m["accuracy"], 0.5);
        assert_eq!(m["thinking_proportion"], 0.5);
        assert_eq!(m["answer_proportion"], 0.5);
    }

    #[test]
    fn scoring_a_summary_reply() {
        let p = all(json!({"task": "summary_reasoning"}));
        let reference = "Question: Who?\n<think_summary>t</think_summary>\n<information_summary>\"founded in 1984\" (A) \"by Zoë\" (B)</information_summary>\n\n<answer>\nZoë\n</answer>";
        let ex = Example {
            line: 1,
            messages: vec![
                json!({"role": "user", "content": "one two three four five six seven eight"}),
            ],
            reference: reference.into(),
            question: String::new(),
        };
        let mut means = Means::default();
        let text = "<think_summary>x</think_summary><information_summary>\"founded in 1984\"</information_summary> <answer>Zoë</answer>";
        let (r, _) = score(
            Task::SummaryReasoning,
            &p.own,
            &ex,
            text,
            &Counter(None),
            &mut means,
        );
        assert_eq!(r["format_valid"], true);
        assert_eq!(r["answer_exact_match"], true);
        assert_eq!(r["next_step_exact_match"], false);
        assert_eq!(r["fact_retention"], 0.5);
        assert_eq!(r["summary_length_ratio"], 0.375);
    }

    #[test]
    fn scoring_a_next_step_from_a_summary() {
        let p = all(json!({"task": "reasoning_from_summary"}));
        let ex = Example {
            line: 1,
            messages: vec![],
            reference: "<think>\nfound it\n</think>\n\n<answer>\n東京\n</answer>".into(),
            question: String::new(),
        };
        let mut means = Means::default();
        let c = Counter(None);
        let task = Task::ReasoningFromSummary;
        let (r, _) = score(task, &p.own, &ex, &ex.reference, &c, &mut means);
        assert_eq!(r["format_valid"], true);
        assert_eq!(r["next_step_exact_match"], true);
        assert_eq!(r["next_step_f1"], 1.0);
        assert_eq!(r["answer_exact_match"], true);
        let (r, _) = score(
            task,
            &p.own,
            &ex,
            "<think>x</think> <answer>大阪",
            &c,
            &mut means,
        );
        assert_eq!(r["format_valid"], false);
        assert_eq!(r["answer_exact_match"], false);
        let m = means.to_json();
        assert_eq!(m["format_valid"], 0.5);
        assert_eq!(m["answer_exact_match"], 0.5);
    }
}
