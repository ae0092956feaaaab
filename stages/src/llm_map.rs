//! Kind `llm_map`: one chat completion per row, the reply written to a field
//! of the row — from any OpenAI-compatible API (`backend: openai`, the
//! default: OpenAI, vLLM, llama.cpp server) or from a local checkpoint run
//! in-process (`backend: local`, with the input `model`).
//!
//! Every reply is journaled in the kind's cache directory as soon as it
//! arrives (see [`crate::generation`]), keyed by the backend's identity, the
//! template, the sampling params and the rendered prompt. A rerun — after a
//! kill, a failure, or a change to some rows — generates only for items whose
//! key has no reply yet. A failed item is never written as data: the stage
//! fails when failures exceed `max_failures`, and otherwise leaves such rows
//! out and counts them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::generation::{
    self, BackendKind, BackendSetup, GenParams, Journal, Request, RunCounts, Sampling,
};
use crate::params::OnError;
use crate::rows::RowReader;
use crate::sink::Sink;
use crate::{ConfigError, KeySpec, Stage, StageContext};

/// The `llm_map` kind.
pub struct LlmMap;

/// Params of `llm_map` besides the generation ones ([`GenParams`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Failed items tolerated before the stage fails.
    #[serde(default)]
    pub max_failures: u64,
    /// Field that receives the reply (a list of replies when `n` > 1).
    #[serde(default = "default_field")]
    pub output_field: String,
    /// Only rows matching `PATH OP VALUE` (e.g. `extra_info.turn_index >= 1`) are sent; others pass through unchanged.
    #[serde(default)]
    pub filter: Option<String>,
    /// `fail` (default) or `skip` on a malformed row or a template placeholder it lacks.
    #[serde(default)]
    pub on_error: OnError,
}

fn default_field() -> String {
    "summary".into()
}

/// Both halves of the params.
struct AllParams {
    own: Params,
    generation: GenParams,
}

fn parse_all(params: &Value) -> Result<AllParams, ConfigError> {
    let (own, generation) = generation::parse_split::<Params>(params)?;
    if let Some(f) = &own.filter
        && let Err(e) = Filter::parse(f)
    {
        return Err(ConfigError {
            key: "params.filter".into(),
            message: e,
        });
    }
    Ok(AllParams { own, generation })
}

impl AllParams {
    fn backend(&self) -> BackendKind {
        self.generation.backend.unwrap_or(BackendKind::Openai)
    }

    fn sampling(&self) -> Sampling {
        let g = &self.generation;
        Sampling {
            temperature: g.temperature.unwrap_or(0.3),
            max_tokens: g.max_tokens.unwrap_or(2000),
            top_p: g.top_p,
            top_k: g.top_k,
            seed: g.seed,
            stop: g.stop.clone(),
            chat_template_kwargs: g.chat_template_kwargs.clone(),
        }
    }
}

/// A prompt template: text with `{dotted.path}` placeholders filled from a row;
/// `{{` and `}}` are literal braces.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Field(Vec<String>),
}

impl Template {
    /// Parses template text.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().is_some_and(|(_, n)| *n == '{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().is_some_and(|(_, n)| *n == '}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let rest = &text[i + 1..];
                    let end = rest.find('}').ok_or_else(|| {
                        format!("unclosed '{{' at byte {i}; write '{{{{' for a literal brace")
                    })?;
                    let path = rest[..end].trim();
                    if path.is_empty() || path.contains(['{', ' ']) {
                        return Err(format!(
                            "bad placeholder '{{{}}}' at byte {i}",
                            &rest[..end]
                        ));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(path.split('.').map(str::to_owned).collect()));
                    for _ in 0..=end {
                        chars.next();
                    }
                }
                '}' => {
                    return Err(format!(
                        "unmatched '}}' at byte {i}; write '}}}}' for a literal brace"
                    ));
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Text(lit));
        }
        Ok(Template { parts })
    }

    /// Fills the placeholders from `row`.
    pub fn render(&self, row: &Value) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Field(path) => match lookup(row, path) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(Value::Null) | None => {
                        return Err(format!(
                            "the row has no `{}` for the template",
                            path.join(".")
                        ));
                    }
                    Some(other) => out.push_str(&other.to_string()),
                },
            }
        }
        Ok(out)
    }
}

fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, k| match cur {
        Value::Object(m) => m.get(k),
        Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// `PATH OP LITERAL` (ops `== != >= <= > <`), or `PATH` alone (present and truthy).
#[derive(Debug, Clone)]
pub struct Filter {
    path: Vec<String>,
    op: Option<(String, Value)>,
}

impl Filter {
    /// Parses a filter expression.
    pub fn parse(s: &str) -> Result<Filter, String> {
        let s = s.trim();
        for op in ["==", "!=", ">=", "<=", ">", "<"] {
            if let Some((lhs, rhs)) = s.split_once(op) {
                let rhs = rhs.trim();
                let lit = serde_json::from_str::<Value>(rhs)
                    .or_else(|_| {
                        serde_json::from_str::<Value>(&format!("\"{}\"", rhs.trim_matches('\'')))
                    })
                    .map_err(|_| format!("cannot read the value '{rhs}' in filter '{s}'"))?;
                return Ok(Filter {
                    path: lhs.trim().split('.').map(str::to_owned).collect(),
                    op: Some((op.to_owned(), lit)),
                });
            }
        }
        if s.is_empty() || s.contains(' ') {
            return Err(format!(
                "filter '{s}' is not `PATH OP VALUE` (e.g. `extra_info.turn_index >= 1`)"
            ));
        }
        Ok(Filter {
            path: s.split('.').map(str::to_owned).collect(),
            op: None,
        })
    }

    /// Whether `row` passes.
    pub fn matches(&self, row: &Value) -> bool {
        let v = lookup(row, &self.path);
        let Some((op, lit)) = &self.op else {
            return !matches!(v, None | Some(Value::Null) | Some(Value::Bool(false)));
        };
        let Some(v) = v else { return false };
        let ord = match (v, lit) {
            (Value::Number(a), Value::Number(b)) => a
                .as_f64()
                .zip(b.as_f64())
                .and_then(|(a, b)| a.partial_cmp(&b)),
            (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
            (a, b) => (a == b).then_some(std::cmp::Ordering::Equal),
        };
        match op.as_str() {
            "==" => ord == Some(std::cmp::Ordering::Equal),
            "!=" => ord != Some(std::cmp::Ordering::Equal),
            ">=" => ord.is_some_and(|o| o.is_ge()),
            "<=" => ord.is_some_and(|o| o.is_le()),
            ">" => ord.is_some_and(|o| o.is_gt()),
            _ => ord.is_some_and(|o| o.is_lt()),
        }
    }
}

/// The key under which llm_map v1 journaled the reply to `prompt`.
pub fn legacy_key(p: &GenParams, sampling: &Sampling, template: &str, prompt: &str) -> String {
    let canon = json!({
        "v": 1,
        "model": p.model,
        "template": template,
        "system": p.system,
        "temperature": sampling.temperature,
        "max_tokens": sampling.max_tokens,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "prompt": prompt,
    });
    blake3::hash(canon.to_string().as_bytes())
        .to_hex()
        .to_string()
}

/// Records under the current key every reply that only a v1 journal holds.
fn adopt_legacy(
    g: &dyn generation::Generator,
    journal: &Journal,
    items: &[Item],
    requests: &[Request],
    template: &str,
    p: &AllParams,
    sampling: &Sampling,
) -> anyhow::Result<()> {
    let identity = g.identity();
    let extra = json!({"template": template});
    let prompts = items.iter().filter(|it| it.messages.is_some());
    for (it, req) in prompts.zip(requests) {
        let key = generation::item_key(&identity, sampling, &extra, req);
        if journal.get(&key).is_some() {
            continue;
        }
        if let Some(r) = journal.get(&legacy_key(&p.generation, sampling, template, &it.prompt)) {
            journal.record(&key, &r)?;
        }
    }
    Ok(())
}

/// Rows in a JSONL file (newlines of non-blank lines), for the progress total.
fn count_rows(path: &Path) -> Option<u64> {
    let mut r = crate::rows::LineReader::open(path).ok()?;
    let mut n = 0;
    while let Ok(Some(_)) = r.next_line() {
        n += 1;
    }
    Some(n)
}

const INPUTS: &[KeySpec] = &[
    KeySpec {
        name: "rows",
        required: true,
        doc: "rows to send (.jsonl or .parquet)",
    },
    KeySpec {
        name: "template",
        required: true,
        doc: "prompt template file with {field.path} placeholders",
    },
    KeySpec {
        name: "model",
        required: false,
        doc: "checkpoint directory for `backend: local`",
    },
];
const OUTPUTS: &[KeySpec] = &[KeySpec {
    name: "rows",
    required: true,
    doc: "the rows with the reply in `output_field`",
}];

impl Stage for LlmMap {
    fn kind(&self) -> &'static str {
        "llm_map"
    }

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
        let model_dir = if p.backend() == BackendKind::Local {
            Some(ctx.input("model").context(
                "backend: local generates with a checkpoint: declare it as the input `model`",
            )?)
        } else {
            None
        };
        let setup = BackendSetup {
            kind: p.backend(),
            params: &p.generation,
            sampling: p.sampling(),
            model_dir: model_dir.as_deref(),
        };
        generation::with_generator(setup, |g| run(ctx, &p, g))
    }
}

/// A row read from the input, and what to do with it.
struct Item {
    line: u64,
    row: Value,
    /// The prompt's messages, or `None` for a row passed through by the filter.
    messages: Option<Vec<Value>>,
    /// The rendered prompt (for keys of journals written before v2).
    prompt: String,
}

fn run(ctx: &StageContext, p: &AllParams, g: &dyn generation::Generator) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let own = &p.own;
    let n = p.generation.n;
    let sampling = p.sampling();
    let input = ctx.input("rows")?;
    let template_path = ctx.input("template")?;
    let template_text = std::fs::read_to_string(&template_path)
        .with_context(|| format!("reading the template {}", template_path.display()))?;
    let template = Template::parse(&template_text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", template_path.display()))?;
    let extra = json!({"template": template_text});
    let filter = own
        .filter
        .as_deref()
        .map(Filter::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let journal = Journal::open(&ctx.cache, &ctx.name)?;
    // Replies journaled by llm_map before v2 (OpenAI only, one reply per row,
    // no top_k or stop: what that version could send) are reused, not paid again.
    let legacy = p.backend() == BackendKind::Openai
        && n == 1
        && sampling.top_k.is_none()
        && sampling.stop.is_empty();
    let output = ctx
        .output("rows")
        .context("output 'rows' is not declared")?;
    let mut sink = Sink::create(&output, &ctx.scratch)?;
    if let Some(rows) =
        count_rows(&input).filter(|_| crate::rows::Format::of(&input) == crate::rows::Format::Jsonl)
    {
        ctx.progress.set_total(rows * n as u64);
    }
    let mut reader = RowReader::open(&input)?;
    // Rows are read, generated and written a chunk at a time: memory stays
    // bounded and the backend still sees enough requests to batch or overlap.
    let chunk = match p.backend() {
        BackendKind::Openai => p.generation.max_concurrent * 8,
        BackendKind::Local => p.generation.batch_size * 4,
    }
    .max(1);
    let (mut rows_in, mut passed, mut skipped, mut written) = (0u64, 0u64, 0u64, 0u64);
    let mut counts = RunCounts::default();
    let mut failures: Vec<(u64, String)> = Vec::new();
    let mut eof = false;
    while !eof {
        let mut items = Vec::with_capacity(chunk);
        while items.len() < chunk {
            let Some(row) = reader.next_row() else {
                eof = true;
                break;
            };
            rows_in += 1;
            let (line, row) = match row {
                Ok(r) => r,
                Err(e) if own.on_error == OnError::Skip => {
                    eprintln!("warning: {e}");
                    skipped += 1;
                    ctx.progress.inc(n as u64);
                    continue;
                }
                Err(e) => return Err(e).context("set `on_error: skip` to leave such records out"),
            };
            if !row.is_object() {
                anyhow::bail!("{}:{line}: expected a JSON object", input.display());
            }
            if filter.as_ref().is_some_and(|f| !f.matches(&row)) {
                passed += 1;
                ctx.progress.inc(n as u64);
                items.push(Item {
                    line,
                    row,
                    messages: None,
                    prompt: String::new(),
                });
                continue;
            }
            match template.render(&row) {
                Ok(prompt) => items.push(Item {
                    line,
                    row,
                    messages: Some(generation::chat(p.generation.system.as_deref(), &prompt)),
                    prompt,
                }),
                Err(e) if own.on_error == OnError::Skip => {
                    eprintln!("warning: {}:{line}: {e}", input.display());
                    skipped += 1;
                    ctx.progress.inc(n as u64);
                }
                Err(e) => anyhow::bail!(
                    "{}:{line}: {e}\n  help: fix the template or the data, or set `on_error: skip`",
                    input.display()
                ),
            }
        }
        let mut requests = Vec::new();
        for it in &items {
            if let Some(m) = &it.messages {
                for sample in 0..n {
                    requests.push(Request {
                        messages: m.clone(),
                        sample,
                    });
                }
            }
        }
        if legacy {
            adopt_legacy(g, &journal, &items, &requests, &template_text, p, &sampling)?;
        }
        let mut replies = generation::run_journaled(
            g,
            &journal,
            &requests,
            &extra,
            &sampling,
            &ctx.progress,
            &mut counts,
        )?
        .into_iter();
        for mut it in items {
            if it.messages.is_none() {
                sink.write(&it.row)?;
                written += 1;
                continue;
            }
            let mine: Result<Vec<String>, String> = replies
                .by_ref()
                .take(n)
                .map(|r| r.map(|r| r.text))
                .collect();
            match mine {
                Ok(mut texts) => {
                    let value = if n == 1 {
                        Value::String(texts.remove(0))
                    } else {
                        json!(texts)
                    };
                    if let Value::Object(m) = &mut it.row {
                        m.insert(own.output_field.clone(), value);
                    }
                    sink.write(&it.row)?;
                    written += 1;
                }
                Err(e) => {
                    eprintln!("error: {}:{}: {e}", input.display(), it.line);
                    failures.push((it.line, e));
                }
            }
        }
    }
    let s = g.stats();
    let report = json!({
        "rows_in": rows_in,
        "rows_out": written,
        "called": counts.called,
        "cached": counts.cached,
        "filtered_out": passed,
        "skipped": skipped,
        "failed": failures.len(),
        "requests": s.requests,
        "retries": s.retries,
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "seconds": (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0,
    });
    eprintln!("llm_map: {report}");
    if failures.len() as u64 > own.max_failures {
        let list: Vec<String> = failures
            .iter()
            .take(20)
            .map(|(l, e)| format!("  {}:{l}: {e}", input.display()))
            .collect();
        anyhow::bail!(
            "{} item(s) failed (max_failures: {}); their replies are not written. Completed replies are kept: a rerun calls only the failed items.\n{}{}",
            failures.len(),
            own.max_failures,
            list.join("\n"),
            if failures.len() > 20 {
                format!("\n  ... and {} more", failures.len() - 20)
            } else {
                String::new()
            }
        );
    }
    sink.finish()?;
    ctx.report(&report);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_dotted_paths_and_escape_braces() {
        let t = Template::parse("Q: {extra_info.question} {{literal}} #{n}").unwrap();
        let row = json!({"extra_info": {"question": "why?"}, "n": 3});
        assert_eq!(t.render(&row).unwrap(), "Q: why? {literal} #3");
        assert_eq!(
            t.render(&json!({"n": 1})).unwrap_err(),
            "the row has no `extra_info.question` for the template"
        );
        assert!(Template::parse("{oops").is_err());
        assert!(Template::parse("a } b").is_err());
    }

    #[test]
    fn filters() {
        let f = Filter::parse("extra_info.turn_index >= 1").unwrap();
        assert!(f.matches(&json!({"extra_info": {"turn_index": 2}})));
        assert!(!f.matches(&json!({"extra_info": {"turn_index": 0}})));
        assert!(!f.matches(&json!({})));
        assert!(
            Filter::parse("kind == 'a'")
                .unwrap()
                .matches(&json!({"kind": "a"}))
        );
        assert!(
            Filter::parse("flag")
                .unwrap()
                .matches(&json!({"flag": true}))
        );
        assert!(Filter::parse("a b c").is_err());
    }
}
