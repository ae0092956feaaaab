//! One generation interface for every stage that asks a model for text
//! (`llm_map`, `evaluate`): the model in-process (`backend: local`, burn on
//! CPU or CUDA, batched with a KV cache) or behind any OpenAI-compatible API
//! (`backend: openai`: OpenAI, vLLM, llama.cpp server).
//!
//! Every reply is journaled in the kind's cache directory as soon as it
//! arrives, keyed by blake3 of the backend's identity (model name, or the
//! checkpoint's content digest), the sampling params and the prompt, so a
//! killed or partly failed stage asks only for what is missing when rerun.

mod journal;
mod local;
mod openai;

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::ConfigError;
use crate::model::DeviceSpec;
use crate::model::tokenizer::Tokenizer;
use crate::progress::Progress;

pub use journal::Journal;

/// Which generator serves the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The stage's `model` input, run in-process with burn.
    Local,
    /// An OpenAI-compatible chat-completions server.
    Openai,
}

/// Generation params shared by the kinds that generate; they sit next to the
/// kind's own params in `params:` (see [`split_params`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenParams {
    /// `local` or `openai`; each kind has its own default.
    #[serde(default)]
    pub backend: Option<BackendKind>,
    /// OpenAI: API root, e.g. `http://localhost:8000/v1`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// OpenAI: model name.
    #[serde(default = "default_model")]
    pub model: String,
    /// OpenAI: environment variable holding the API key (read at run time, never stored).
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
    /// OpenAI: requests in flight at most.
    #[serde(default = "default_concurrency")]
    pub max_concurrent: usize,
    /// OpenAI: request starts per minute at most.
    #[serde(default)]
    pub requests_per_minute: Option<f64>,
    /// OpenAI: seconds before a request is abandoned (and retried).
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// OpenAI: retries after the first attempt.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// OpenAI: first backoff in seconds; doubles each retry (with jitter), capped at 60 s.
    #[serde(default = "default_backoff")]
    pub retry_base_s: f64,
    /// Local: `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Local: prompts generated together.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// System message put before every prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// Sampling temperature (0 is greedy); each kind has its own default.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Most new tokens per reply (also `max_new_tokens`); each kind has its own default.
    #[serde(default, alias = "max_new_tokens")]
    pub max_tokens: Option<u32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Keep only the `top_k` most likely tokens (local; sent to servers that take it, like vLLM).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Sampling seed (sample `i` of a prompt uses `seed + i`).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Strings that end a reply (cut from it).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Replies per prompt.
    #[serde(default = "one")]
    pub n: usize,
    /// More chat-template variables (e.g. `{enable_thinking: false}` for
    /// Qwen3): the local backend renders prompts with them, and requests to
    /// a server carry them as vLLM's `chat_template_kwargs`.
    #[serde(default)]
    pub chat_template_kwargs: Map<String, Value>,
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
fn default_batch() -> usize {
    16
}
fn one() -> usize {
    1
}

/// The names of [`GenParams`]' fields, for [`split_params`].
pub const GEN_FIELDS: &[&str] = &[
    "backend",
    "base_url",
    "model",
    "api_key_env",
    "max_concurrent",
    "requests_per_minute",
    "timeout_s",
    "max_retries",
    "retry_base_s",
    "device",
    "batch_size",
    "system",
    "temperature",
    "max_tokens",
    "max_new_tokens",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "chat_template_kwargs",
];

/// Splits a stage's `params` into the kind's own and the generation ones.
pub fn split_params(params: &Value) -> (Value, Value) {
    let mut own = serde_json::Map::new();
    let mut generation = serde_json::Map::new();
    if let Value::Object(m) = params {
        for (k, v) in m {
            if GEN_FIELDS.contains(&k.as_str()) {
                generation.insert(k.clone(), v.clone());
            } else {
                own.insert(k.clone(), v.clone());
            }
        }
    }
    (Value::Object(own), Value::Object(generation))
}

/// Parses a generating kind's params: its own (`T`) and the generation ones.
/// A misspelt key is matched against both sets of names.
pub fn parse_split<T: serde::de::DeserializeOwned>(
    params: &Value,
) -> Result<(T, GenParams), ConfigError> {
    let (own, generation) = split_params(params);
    let own: T = crate::params::parse(&own).map_err(|mut e| {
        let field = e
            .message
            .strip_prefix("unknown param '")
            .and_then(|r| r.split_once('\''))
            .map(|(f, _)| f.to_owned());
        if let Some(f) = field
            && !e.message.contains("did you mean")
            && let Some(best) = GEN_FIELDS
                .iter()
                .map(|c| (strsim::jaro_winkler(&f, c), *c))
                .filter(|(s, _)| *s > 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0))
        {
            e.message = format!("unknown param '{f}'; did you mean '{}'?", best.1);
        }
        e
    })?;
    let generation: GenParams = crate::params::parse(&generation)?;
    generation.validate()?;
    Ok((own, generation))
}

impl GenParams {
    /// Values out of range, if any.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| {
            Err(ConfigError {
                key: format!("params.{key}"),
                message,
            })
        };
        if self.max_concurrent == 0 {
            return bad("max_concurrent", "max_concurrent must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "batch_size must be at least 1".into());
        }
        if self.n == 0 {
            return bad("n", "n must be at least 1".into());
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
        if self.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return bad("temperature", "temperature must be in [0, 2]".into());
        }
        if self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return bad("top_p", "top_p must be in (0, 1]".into());
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens", "max_tokens must be at least 1".into());
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

/// Sampling settings of one stage, after the kind's defaults are applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f64,
    /// Most new tokens.
    pub max_tokens: u32,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Top-k filtering.
    pub top_k: Option<usize>,
    /// Seed of sample 0.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Chat-template variables (left out of the key when empty, so earlier
    /// journals stay valid).
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub chat_template_kwargs: Map<String, Value>,
}

/// One request: a chat (system and user messages, or a whole conversation).
#[derive(Debug, Clone)]
pub struct Request {
    /// OpenAI-style messages.
    pub messages: Vec<Value>,
    /// Which of the `n` samples of its prompt this is.
    pub sample: usize,
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The generated text.
    pub text: String,
    /// Tokens generated, when the backend says.
    #[serde(default)]
    pub completion_tokens: Option<u64>,
}

/// Counters a backend keeps while it runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenStats {
    /// Requests sent (API) or prompts generated (local).
    pub requests: u64,
    /// Retried requests (API).
    pub retries: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// Seconds spent generating.
    pub generate_seconds: f64,
}

/// A text generator behind one of the backends.
pub trait Generator {
    /// What identifies its replies in cache keys: the model (name or content
    /// digest) and where relevant the server.
    fn identity(&self) -> Value;
    /// Generates every request, calling `done(i, reply)` for request `i` as
    /// soon as it is finished, in any order. A per-request failure is an
    /// `Err` given to `done`; an `Err` returned by `done` stops everything.
    fn generate(
        &self,
        requests: &[Request],
        done: &mut dyn FnMut(usize, Result<Reply, String>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;
    /// Counters so far.
    fn stats(&self) -> GenStats;
    /// A status line for the progress bar.
    fn status(&self) -> String {
        String::new()
    }
    /// The tokenizer it encodes prompts with, where it loaded one (`local`).
    fn tokenizer(&self) -> Option<&Tokenizer> {
        None
    }
}

/// Where a backend finds what it needs.
pub struct BackendSetup<'a> {
    /// Which backend.
    pub kind: BackendKind,
    /// The generation params.
    pub params: &'a GenParams,
    /// Sampling with the kind's defaults applied.
    pub sampling: Sampling,
    /// The checkpoint directory (local backend).
    pub model_dir: Option<&'a Path>,
}

/// Builds the backend and hands it to `f`.
pub fn with_generator<T>(
    setup: BackendSetup<'_>,
    f: impl FnOnce(&dyn Generator) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match setup.kind {
        BackendKind::Openai => {
            let g = openai::OpenAi::new(setup.params, setup.sampling)?;
            f(&g)
        }
        BackendKind::Local => {
            let Some(dir) = setup.model_dir else {
                anyhow::bail!(
                    "backend: local needs the model: declare the checkpoint directory as the input `model` under deps:"
                );
            };
            local::with_local(dir, setup.params, setup.sampling, f)
        }
    }
}

/// The cache key of one request.
pub fn item_key(identity: &Value, sampling: &Sampling, extra: &Value, req: &Request) -> String {
    let canon = json!({
        "v": 2,
        "backend": identity,
        "sampling": sampling,
        "extra": extra,
        "messages": req.messages,
        "sample": req.sample,
    });
    blake3::hash(canon.to_string().as_bytes())
        .to_hex()
        .to_string()
}

/// What [`run_journaled`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunCounts {
    /// Requests answered from the journal.
    pub cached: u64,
    /// Requests sent to the backend.
    pub called: u64,
    /// Requests that failed.
    pub failed: u64,
}

/// Answers `requests` from the journal where it can and from `generator`
/// otherwise, recording each new reply at once. `extra` goes into the keys
/// (e.g. the prompt template). Progress advances by one per request.
pub fn run_journaled(
    generator: &dyn Generator,
    journal: &Journal,
    requests: &[Request],
    extra: &Value,
    sampling: &Sampling,
    progress: &Progress,
    counts: &mut RunCounts,
) -> anyhow::Result<Vec<Result<Reply, String>>> {
    let identity = generator.identity();
    let keys: Vec<String> = requests
        .iter()
        .map(|r| item_key(&identity, sampling, extra, r))
        .collect();
    let mut out: Vec<Option<Result<Reply, String>>> = vec![None; requests.len()];
    let mut todo = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        match journal.get(k) {
            Some(r) => out[i] = Some(Ok(r)),
            None => todo.push(i),
        }
    }
    let cached = (requests.len() - todo.len()) as u64;
    counts.cached += cached;
    progress.inc(cached);
    let pending: Vec<Request> = todo.iter().map(|&i| requests[i].clone()).collect();
    counts.called += pending.len() as u64;
    let mut last = std::time::Instant::now();
    generator.generate(&pending, &mut |j, r| {
        let i = todo[j];
        match &r {
            Ok(reply) => journal.record(&keys[i], reply)?,
            Err(_) => counts.failed += 1,
        }
        out[i] = Some(r);
        progress.inc(1);
        if last.elapsed().as_millis() >= 200 {
            last = std::time::Instant::now();
            progress.message(generator.status());
        }
        Ok(())
    })?;
    Ok(out
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("no reply".into())))
        .collect())
}

/// Messages for a prompt: the system message, if any, then the user's.
pub fn chat(system: Option<&str>, user: &str) -> Vec<Value> {
    let mut m = Vec::with_capacity(2);
    if let Some(s) = system {
        m.push(json!({"role": "system", "content": s}));
    }
    m.push(json!({"role": "user", "content": user}));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gen_fields_are_the_struct_fields() {
        let p: GenParams = serde_json::from_value(json!({})).unwrap();
        let v = serde_json::to_value(&p).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut fields: Vec<&str> = GEN_FIELDS
            .iter()
            .copied()
            .filter(|f| *f != "max_new_tokens")
            .collect();
        keys.sort_unstable();
        fields.sort_unstable();
        assert_eq!(keys, fields);
    }

    #[test]
    fn params_split_by_name() {
        let (own, generation) = split_params(&json!({"task": "gsm8k", "temperature": 0.5}));
        assert_eq!(own, json!({"task": "gsm8k"}));
        assert_eq!(generation, json!({"temperature": 0.5}));
        let (_, g) = split_params(&json!({"max_new_tokens": 7}));
        let g: GenParams = serde_json::from_value(g).unwrap();
        assert_eq!(g.max_tokens, Some(7));
    }

    #[test]
    fn keys_follow_every_input() {
        let s = Sampling {
            temperature: 0.0,
            max_tokens: 8,
            top_p: None,
            top_k: None,
            seed: None,
            stop: vec![],
            chat_template_kwargs: Map::new(),
        };
        // Without kwargs the key is what it was before they existed.
        assert!(
            serde_json::to_value(&s)
                .unwrap()
                .get("chat_template_kwargs")
                .is_none()
        );
        let r = Request {
            messages: chat(None, "hi"),
            sample: 0,
        };
        let id = json!({"model": "m"});
        let k = item_key(&id, &s, &Value::Null, &r);
        assert_eq!(k, item_key(&id, &s, &Value::Null, &r));
        assert_ne!(k, item_key(&json!({"model": "m2"}), &s, &Value::Null, &r));
        assert_ne!(k, item_key(&id, &s, &json!("T"), &r));
        let mut s2 = s.clone();
        s2.temperature = 0.7;
        assert_ne!(k, item_key(&id, &s2, &Value::Null, &r));
        let mut s3 = s.clone();
        s3.chat_template_kwargs
            .insert("enable_thinking".into(), json!(false));
        assert_ne!(k, item_key(&id, &s3, &Value::Null, &r));
        let r2 = Request { sample: 1, ..r };
        assert_ne!(k, item_key(&id, &s, &Value::Null, &r2));
    }
}
