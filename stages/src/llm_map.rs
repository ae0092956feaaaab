//! Kind `llm_map`: one chat-completion call per row against any OpenAI-compatible
//! API (OpenAI, vLLM, llama.cpp server), the reply written to a field of the row.
//!
//! Every reply is appended to a journal in the kind's cache directory as soon as
//! it arrives, keyed by blake3 of (model, template, system, sampling params,
//! rendered prompt). A rerun — after a kill, a failure, or a change to some rows —
//! calls the API only for items whose key has no reply yet. A failed item is never
//! written as data: the stage fails when failures exceed `max_failures`, and
//! otherwise leaves such rows out and counts them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::params::{self, OnError};
use crate::rng::SplitMix64;
use crate::rows::RowReader;
use crate::sink::Sink;
use crate::{ConfigError, KeySpec, Stage, StageContext};

/// The `llm_map` kind.
pub struct LlmMap;

/// Params of `llm_map`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// API root, e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Model name.
    #[serde(default = "default_model")]
    pub model: String,
    /// Environment variable holding the API key (read at run time, never stored).
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
    /// System message.
    #[serde(default)]
    pub system: Option<String>,
    /// Sampling temperature.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Completion token limit.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Sampling seed, where the server supports it.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Requests in flight at most.
    #[serde(default = "default_concurrency")]
    pub max_concurrent: usize,
    /// Request starts per minute at most.
    #[serde(default)]
    pub requests_per_minute: Option<f64>,
    /// Seconds before a request is abandoned (and retried).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Retries after the first attempt.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// First backoff in seconds; doubles each retry (with jitter), capped at 60 s.
    #[serde(default = "default_backoff")]
    pub retry_base_s: f64,
    /// Failed items tolerated before the stage fails.
    #[serde(default)]
    pub max_failures: u64,
    /// Field that receives the reply.
    #[serde(default = "default_field")]
    pub output_field: String,
    /// Only rows matching `PATH OP VALUE` (e.g. `extra_info.turn_index >= 1`) are sent; others pass through unchanged.
    #[serde(default)]
    pub filter: Option<String>,
    /// `fail` (default) or `skip` on a malformed row or a template placeholder it lacks.
    #[serde(default)]
    pub on_error: OnError,
}

fn default_base_url() -> String {
    "https://api.openai.com/v1".into()
}
fn default_model() -> String {
    "gpt-4o-mini".into()
}
fn default_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_temperature() -> f64 {
    0.3
}
fn default_max_tokens() -> u32 {
    2000
}
fn default_concurrency() -> usize {
    16
}
fn default_timeout() -> f64 {
    120.0
}
fn default_retries() -> u32 {
    5
}
fn default_backoff() -> f64 {
    1.0
}
fn default_field() -> String {
    "summary".into()
}

impl params::Validate for Params {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| {
            Err(ConfigError {
                key: format!("params.{key}"),
                message,
            })
        };
        if self.max_concurrent == 0 {
            return bad("max_concurrent", "max_concurrent must be at least 1".into());
        }
        if self.timeout_s <= 0.0 {
            return bad(
                "timeout_s",
                format!("timeout_s must be positive, got {}", self.timeout_s),
            );
        }
        if self.requests_per_minute.is_some_and(|r| r <= 0.0) {
            return bad(
                "requests_per_minute",
                "requests_per_minute must be positive".into(),
            );
        }
        if let Some(f) = &self.filter
            && let Err(e) = Filter::parse(f)
        {
            return bad("filter", e);
        }
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return bad(
                "base_url",
                format!(
                    "base_url must start with http:// or https://, got '{}'",
                    self.base_url
                ),
            );
        }
        Ok(())
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

/// The request body of one item.
#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Msg<'a>>,
    temperature: f64,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
}

#[derive(Serialize)]
struct Msg<'a> {
    role: &'a str,
    content: &'a str,
}

/// The cache key of one item.
pub fn item_key(p: &Params, template: &str, prompt: &str) -> String {
    let canon = json!({
        "v": 1,
        "model": p.model,
        "template": template,
        "system": p.system,
        "temperature": p.temperature,
        "max_tokens": p.max_tokens,
        "top_p": p.top_p,
        "seed": p.seed,
        "prompt": prompt,
    });
    blake3::hash(canon.to_string().as_bytes())
        .to_hex()
        .to_string()
}

/// Completed replies, loaded from every journal in the cache directory.
struct Journal {
    done: HashMap<String, String>,
    file: Mutex<File>,
}

#[derive(Serialize, Deserialize)]
struct JournalLine {
    key: String,
    reply: String,
}

impl Journal {
    fn open(dir: &Path, stage: &str) -> anyhow::Result<Journal> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut done = HashMap::new();
        for e in std::fs::read_dir(dir)?.filter_map(Result::ok) {
            if e.path().extension().is_none_or(|x| x != "jsonl") {
                continue;
            }
            let f = BufReader::new(File::open(e.path())?);
            for line in f.lines() {
                // A line cut short by a kill is ignored; its item is simply called again.
                if let Ok(l) = serde_json::from_str::<JournalLine>(&line?) {
                    done.insert(l.key, l.reply);
                }
            }
        }
        let safe: String = stage
            .chars()
            .map(|c| {
                if c.is_alphanumeric() || "-_.@=,".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("{safe}.jsonl"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening the journal {}", path.display()))?;
        Ok(Journal {
            done,
            file: Mutex::new(file),
        })
    }

    /// Appends one reply in a single write, so a kill loses at most the call in flight.
    fn record(&self, key: &str, reply: &str) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&JournalLine {
            key: key.to_owned(),
            reply: reply.to_owned(),
        })?;
        line.push(b'\n');
        let mut f = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("journal lock poisoned"))?;
        f.write_all(&line)
    }
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    retries: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    in_flight: AtomicU64,
}

/// Spaces request starts for `requests_per_minute`.
struct Pacer {
    gap: Duration,
    next: tokio::sync::Mutex<Instant>,
}

impl Pacer {
    async fn wait(&self) {
        let mut next = self.next.lock().await;
        let now = Instant::now();
        let at = (*next).max(now);
        *next = at + self.gap;
        drop(next);
        tokio::time::sleep_until(at.into()).await;
    }
}

struct Client {
    http: reqwest::Client,
    url: String,
    key: Option<String>,
    p: Params,
    template_text: String,
    sem: Semaphore,
    pacer: Option<Pacer>,
    stats: Stats,
    journal: Journal,
    jitter: Mutex<SplitMix64>,
}

/// Why one attempt failed.
enum Attempt {
    Retry(String, Option<Duration>),
    Fatal(String),
}

impl Client {
    async fn call(&self, key: String, prompt: String) -> Result<String, String> {
        let _permit = self.sem.acquire().await.map_err(|e| e.to_string())?;
        let mut last = String::new();
        for attempt in 0..=self.p.max_retries {
            if let Some(p) = &self.pacer {
                p.wait().await;
            }
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let r = self.attempt(&prompt).await;
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(reply) => {
                    self.journal
                        .record(&key, &reply)
                        .map_err(|e| format!("writing the journal: {e}"))?;
                    return Ok(reply);
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e, after)) => {
                    last = e;
                    if attempt == self.p.max_retries {
                        break;
                    }
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(after.unwrap_or_else(|| self.backoff(attempt))).await;
                }
            }
        }
        Err(format!(
            "{last} (gave up after {} attempts)",
            self.p.max_retries + 1
        ))
    }

    /// Exponential backoff with full jitter.
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = (self.p.retry_base_s * 2f64.powi(attempt as i32)).min(60.0);
        let u = self.jitter.lock().map(|mut r| r.unit()).unwrap_or(0.5);
        Duration::from_secs_f64(cap * (0.5 + 0.5 * u))
    }

    /// A connection-level failure: always worth another attempt.
    fn transport(&self, e: reqwest::Error, what: &str) -> Attempt {
        if e.is_timeout() {
            Attempt::Retry(format!("timed out after {} s", self.p.timeout_s), None)
        } else {
            Attempt::Retry(format!("{what}: {}", error_chain(&e)), None)
        }
    }

    async fn attempt(&self, prompt: &str) -> Result<String, Attempt> {
        let mut messages = Vec::with_capacity(2);
        if let Some(s) = &self.p.system {
            messages.push(Msg {
                role: "system",
                content: s,
            });
        }
        messages.push(Msg {
            role: "user",
            content: prompt,
        });
        let body = ChatRequest {
            model: &self.p.model,
            messages,
            temperature: self.p.temperature,
            max_tokens: self.p.max_tokens,
            top_p: self.p.top_p,
            seed: self.p.seed,
        };
        let mut req = self.http.post(&self.url).json(&body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport(e, "request failed"))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|s| Duration::from_secs_f64(s.clamp(0.0, 600.0)));
        let text = resp
            .text()
            .await
            .map_err(|e| self.transport(e, "reading the reply"))?;
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(Attempt::Retry(
                format!("HTTP {status}: {}", api_error(&text)),
                retry_after,
            ));
        }
        if !status.is_success() {
            return Err(Attempt::Fatal(format!(
                "HTTP {status}: {}",
                api_error(&text)
            )));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Attempt::Retry(format!("malformed reply (not JSON: {e})"), None))?;
        let content = v
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Attempt::Retry(
                    "malformed reply (no choices[0].message.content)".into(),
                    None,
                )
            })?;
        if let Some(u) = v.get("usage") {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
            self.stats
                .prompt_tokens
                .fetch_add(n("prompt_tokens"), Ordering::Relaxed);
            self.stats
                .completion_tokens
                .fetch_add(n("completion_tokens"), Ordering::Relaxed);
        }
        Ok(content.to_owned())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The message of an OpenAI-style error body, or the start of the body.
fn api_error(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| body.chars().take(200).collect())
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

enum Slot {
    Ready(Option<Value>),
    Pending(tokio::task::JoinHandle<Result<String, String>>),
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
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        rt.block_on(run(ctx, p))
    }
}

async fn run(ctx: &StageContext, p: Params) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let input = ctx.input("rows")?;
    let template_path = ctx.input("template")?;
    let template_text = std::fs::read_to_string(&template_path)
        .with_context(|| format!("reading the template {}", template_path.display()))?;
    let template = Template::parse(&template_text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", template_path.display()))?;
    let filter = p
        .filter
        .as_deref()
        .map(Filter::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let key = std::env::var(&p.api_key_env).ok().filter(|k| !k.is_empty());
    if key.is_none() {
        eprintln!(
            "warning: {} is not set; sending requests without an API key (fine for local servers)",
            p.api_key_env
        );
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(p.timeout_s))
        .pool_max_idle_per_host(p.max_concurrent)
        .build()
        .context("building the HTTP client")?;
    let client = Arc::new(Client {
        http,
        url: format!("{}/chat/completions", p.base_url.trim_end_matches('/')),
        key,
        journal: Journal::open(&ctx.cache, &ctx.name)?,
        sem: Semaphore::new(p.max_concurrent),
        pacer: p.requests_per_minute.map(|rpm| Pacer {
            gap: Duration::from_secs_f64(60.0 / rpm),
            next: tokio::sync::Mutex::new(Instant::now()),
        }),
        stats: Stats::default(),
        jitter: Mutex::new(SplitMix64(
            t0.elapsed().as_nanos() as u64 ^ std::process::id() as u64,
        )),
        template_text,
        p: p.clone(),
    });
    let output = ctx
        .output("rows")
        .context("output 'rows' is not declared")?;
    let mut sink = Sink::create(&output, &ctx.scratch)?;
    if let Some(n) =
        count_rows(&input).filter(|_| crate::rows::Format::of(&input) == crate::rows::Format::Jsonl)
    {
        ctx.progress.set_total(n);
    }
    let mut reader = RowReader::open(&input)?;
    let window = p.max_concurrent * 8;
    let mut queue: VecDeque<(u64, Value, Slot)> = VecDeque::with_capacity(window);
    let (mut rows_in, mut cached, mut called, mut passed, mut skipped, mut written) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut failures: Vec<(u64, String)> = Vec::new();
    let mut last_progress = Instant::now();
    let mut eof = false;
    loop {
        // Fill the window; drain it from the front, in input order.
        while !eof && queue.len() < window {
            let Some(row) = reader.next_row() else {
                eof = true;
                break;
            };
            rows_in += 1;
            let (line, row) = match row {
                Ok(r) => r,
                Err(e) if p.on_error == OnError::Skip => {
                    eprintln!("warning: {e}");
                    skipped += 1;
                    continue;
                }
                Err(e) => return Err(e).context("set `on_error: skip` to leave such records out"),
            };
            if !row.is_object() {
                anyhow::bail!("{}:{line}: expected a JSON object", input.display());
            }
            if filter.as_ref().is_some_and(|f| !f.matches(&row)) {
                passed += 1;
                queue.push_back((line, row, Slot::Ready(None)));
                continue;
            }
            let prompt = match template.render(&row) {
                Ok(pr) => pr,
                Err(e) if p.on_error == OnError::Skip => {
                    eprintln!("warning: {}:{line}: {e}", input.display());
                    skipped += 1;
                    continue;
                }
                Err(e) => anyhow::bail!(
                    "{}:{line}: {e}\n  help: fix the template or the data, or set `on_error: skip`",
                    input.display()
                ),
            };
            let k = item_key(&p, &client.template_text, &prompt);
            if let Some(reply) = client.journal.done.get(&k) {
                cached += 1;
                queue.push_back((line, row, Slot::Ready(Some(Value::String(reply.clone())))));
            } else {
                called += 1;
                let c = client.clone();
                queue.push_back((
                    line,
                    row,
                    Slot::Pending(tokio::spawn(async move { c.call(k, prompt).await })),
                ));
            }
        }
        let Some((line, mut row, slot)) = queue.pop_front() else {
            break;
        };
        let reply = match slot {
            Slot::Ready(r) => Ok(r),
            Slot::Pending(h) => h
                .await
                .map_err(|e| format!("internal error: {e}"))
                .and_then(|r| r.map(|s| Some(Value::String(s)))),
        };
        match reply {
            Ok(r) => {
                if let (Some(r), Value::Object(m)) = (r, &mut row) {
                    m.insert(p.output_field.clone(), r);
                }
                sink.write(&row)?;
                written += 1;
            }
            Err(e) => {
                eprintln!("error: {}:{line}: {e}", input.display());
                failures.push((line, e));
            }
        }
        if last_progress.elapsed() >= Duration::from_millis(200) || queue.is_empty() {
            last_progress = Instant::now();
            let s = &client.stats;
            ctx.progress.set_done(written + failures.len() as u64);
            ctx.progress.message(format!(
                "{} in flight, {} failed, {} retries, {:.0} req/s",
                s.in_flight.load(Ordering::Relaxed),
                failures.len(),
                s.retries.load(Ordering::Relaxed),
                s.requests.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64().max(1e-3)
            ));
        }
    }
    let s = &client.stats;
    let report = json!({
        "rows_in": rows_in,
        "rows_out": written,
        "called": called,
        "cached": cached,
        "filtered_out": passed,
        "skipped": skipped,
        "failed": failures.len(),
        "requests": s.requests.load(Ordering::Relaxed),
        "retries": s.retries.load(Ordering::Relaxed),
        "prompt_tokens": s.prompt_tokens.load(Ordering::Relaxed),
        "completion_tokens": s.completion_tokens.load(Ordering::Relaxed),
        "seconds": (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0,
    });
    eprintln!("llm_map: {report}");
    if failures.len() as u64 > p.max_failures {
        let list: Vec<String> = failures
            .iter()
            .take(20)
            .map(|(l, e)| format!("  {}:{l}: {e}", input.display()))
            .collect();
        anyhow::bail!(
            "{} item(s) failed (max_failures: {}); their replies are not written. Completed replies are kept: a rerun calls only the failed items.\n{}{}",
            failures.len(),
            p.max_failures,
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

    #[test]
    fn item_keys_follow_every_input() {
        let p: Params = params::parse(&json!({})).unwrap();
        let k = item_key(&p, "T", "prompt");
        assert_eq!(k, item_key(&p, "T", "prompt"));
        assert_ne!(k, item_key(&p, "T2", "prompt"));
        assert_ne!(k, item_key(&p, "T", "prompt2"));
        let mut q = p.clone();
        q.temperature = 0.7;
        assert_ne!(k, item_key(&q, "T", "prompt"));
    }
}
