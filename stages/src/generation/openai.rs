//! `backend: openai`: concurrent chat-completion calls with retries, backoff
//! (honouring `Retry-After`), a request-rate cap and per-request timeouts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::{GenParams, GenStats, Generator, Reply, Request, Sampling};
use crate::rng::SplitMix64;

/// The request body of one item.
#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: &'a [Value],
    temperature: f64,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    chat_template_kwargs: &'a serde_json::Map<String, Value>,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    retries: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    in_flight: AtomicU64,
    failed: AtomicU64,
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
    p: GenParams,
    sampling: Sampling,
    /// `max_concurrent` slots; each is held until its reply is journaled.
    sem: Arc<Semaphore>,
    pacer: Option<Pacer>,
    stats: Stats,
    jitter: Mutex<SplitMix64>,
}

/// Why one attempt failed.
enum Attempt {
    Retry(String, Option<Duration>),
    Fatal(String),
}

/// The OpenAI-compatible backend.
pub struct OpenAi {
    rt: tokio::runtime::Runtime,
    client: Arc<Client>,
    started: Instant,
}

impl OpenAi {
    /// A client for `p.base_url`; warns when the key variable is unset.
    pub fn new(p: &GenParams, sampling: Sampling) -> anyhow::Result<OpenAi> {
        let key = std::env::var(&p.api_key_env).ok().filter(|k| !k.is_empty());
        if key.is_none() {
            eprintln!(
                "warning: {} is not set; sending requests without an API key (fine for local servers)",
                p.api_key_env
            );
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        // The process's TLS provider (reqwest's `rustls-no-provider`); an
        // error only says one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(p.timeout_s))
            .pool_max_idle_per_host(p.max_concurrent)
            .build()
            .context("building the HTTP client")?;
        let started = Instant::now();
        let client = Arc::new(Client {
            http,
            url: format!("{}/chat/completions", p.base_url.trim_end_matches('/')),
            key,
            sem: Arc::new(Semaphore::new(p.max_concurrent)),
            pacer: p.requests_per_minute.map(|rpm| Pacer {
                gap: Duration::from_secs_f64(60.0 / rpm),
                next: tokio::sync::Mutex::new(Instant::now()),
            }),
            stats: Stats::default(),
            jitter: Mutex::new(SplitMix64(
                started.elapsed().as_nanos() as u64 ^ u64::from(std::process::id()),
            )),
            p: p.clone(),
            sampling,
        });
        Ok(OpenAi {
            rt,
            client,
            started,
        })
    }
}

impl Generator for OpenAi {
    fn identity(&self) -> Value {
        json!({"backend": "openai", "model": self.client.p.model})
    }

    fn generate(
        &self,
        requests: &[Request],
        done: &mut dyn FnMut(usize, Result<Reply, String>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        self.rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (i, r) in requests.iter().enumerate() {
                let c = self.client.clone();
                let r = r.clone();
                set.spawn(async move {
                    match c.sem.clone().acquire_owned().await {
                        Ok(slot) => (i, c.call(r).await, Some(slot)),
                        Err(e) => (i, Err(e.to_string()), None),
                    }
                });
            }
            while let Some(j) = set.join_next().await {
                let (i, r, slot) = j.context("a request task failed")?;
                if r.is_err() {
                    self.client.stats.failed.fetch_add(1, Ordering::Relaxed);
                }
                done(i, r)?;
                // Freed only now: a kill loses at most `max_concurrent` replies,
                // whether in flight or answered and not yet journaled.
                drop(slot);
            }
            Ok(())
        })
    }

    fn stats(&self) -> GenStats {
        let s = &self.client.stats;
        GenStats {
            requests: s.requests.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: s.completion_tokens.load(Ordering::Relaxed),
            generate_seconds: self.started.elapsed().as_secs_f64(),
        }
    }

    fn status(&self) -> String {
        let s = &self.client.stats;
        format!(
            "{} in flight, {} failed, {} retries, {:.0} req/s",
            s.in_flight.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
            s.retries.load(Ordering::Relaxed),
            s.requests.load(Ordering::Relaxed) as f64
                / self.started.elapsed().as_secs_f64().max(1e-3)
        )
    }
}

impl Client {
    async fn call(&self, req: Request) -> Result<Reply, String> {
        let mut last = String::new();
        for attempt in 0..=self.p.max_retries {
            if let Some(p) = &self.pacer {
                p.wait().await;
            }
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let r = self.attempt(&req).await;
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(reply) => return Ok(reply),
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

    async fn attempt(&self, r: &Request) -> Result<Reply, Attempt> {
        let s = &self.sampling;
        let body = ChatRequest {
            model: &self.p.model,
            messages: &r.messages,
            temperature: s.temperature,
            max_tokens: s.max_tokens,
            top_p: s.top_p,
            top_k: s.top_k,
            seed: s.seed.map(|x| x.wrapping_add(r.sample as u64)),
            stop: &s.stop,
            chat_template_kwargs: &s.chat_template_kwargs,
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
        let mut completion_tokens = None;
        if let Some(u) = v.get("usage") {
            let n = |k: &str| u.get(k).and_then(Value::as_u64);
            self.stats
                .prompt_tokens
                .fetch_add(n("prompt_tokens").unwrap_or(0), Ordering::Relaxed);
            completion_tokens = n("completion_tokens");
            self.stats
                .completion_tokens
                .fetch_add(completion_tokens.unwrap_or(0), Ordering::Relaxed);
        }
        Ok(Reply {
            text: content.to_owned(),
            completion_tokens,
        })
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
