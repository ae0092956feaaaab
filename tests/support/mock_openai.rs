//! An in-process, OpenAI-compatible chat-completions server for tests and
//! benchmarks (axum on its own multi-thread tokio runtime, bound to
//! 127.0.0.1).
//!
//! Include it with
//! `#[allow(dead_code)] #[path = "support/mock_openai.rs"] mod mock_openai;`
//! (tests) or `#[path = "../tests/support/mock_openai.rs"]` (examples).
//!
//! Routes:
//! - `POST /v1/chat/completions`: after `Config::latency_ms` (a tokio sleep),
//!   replies 200 with a `chat.completion` whose content is deterministic:
//!   `summary:<first 8 hex chars of FNV-1a 64 of the last user message>:<model>:<temperature or "none">`.
//!   `usage.prompt_tokens` is the whitespace-separated word count of all
//!   message contents, `completion_tokens` is 3. A body that is not JSON, or
//!   lacks `model` (a string) or `messages` (a non-empty array of objects with
//!   a string `role`), gets 400 with an OpenAI-style error. The body is read
//!   whatever its content type.
//! - `GET /v1/models`: a one-model list.
//! - anything else: 404 with an OpenAI-style error.
//!
//! Scripted replies (`Config::replies`, pairs of prompt substring and reply)
//! replace that content: the first pair whose substring the last user
//! message contains gives the reply.
//!
//! Faults (`Config::faults`) are matched against the last user message by
//! substring, in order; the first matching fault with injections left is
//! used and its count goes down by one (atomically). Fault replies, like
//! normal ones, come after `latency_ms`.
//!
//! If `Config::require_key` is set, both routes answer 401 (OpenAI-style
//! `invalid_api_key` error) unless `Authorization: Bearer <key>` is sent; such
//! requests still count in `requests()` and `requests_for()`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// What a matching request gets instead of a normal answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// 429 with a `Retry-After: <retry_after_s>` header and a rate-limit error.
    TooMany { retry_after_s: u64 },
    /// 500 with a `server_error`.
    ServerError,
    /// Sleep `ms` (on top of `latency_ms`), then answer normally. Meant for a
    /// client that times out first, so the reply is not counted in
    /// `answered()` even if it does get written.
    Hang { ms: u64 },
    /// 200 with `Content-Type: application/json` and the body `not json{`.
    Garbage,
    /// 400 with an `invalid_request_error`.
    BadRequest,
}

/// Inject `kind` on the first `times` requests whose last user message
/// contains `when_prompt_contains`, then answer those normally.
#[derive(Clone, Debug)]
pub struct Fault {
    pub when_prompt_contains: String,
    pub kind: FaultKind,
    pub times: usize,
}

impl Fault {
    pub fn new(when_prompt_contains: impl Into<String>, kind: FaultKind, times: usize) -> Fault {
        Fault {
            when_prompt_contains: when_prompt_contains.into(),
            kind,
            times,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Delay before every reply to a chat completion (401s excepted).
    pub latency_ms: u64,
    pub faults: Vec<Fault>,
    /// If set, 401 unless `Authorization: Bearer <key>`.
    pub require_key: Option<String>,
    /// Keep every request body for `bodies()` (off by default: it costs a
    /// clone and memory per request).
    pub record_bodies: bool,
    /// (substring of the last user message, reply): scripted answers.
    pub replies: Vec<(String, String)>,
}

struct FaultState {
    fault: Fault,
    remaining: AtomicUsize,
}

#[derive(Default)]
struct Stats {
    requests: AtomicUsize,
    per_prompt: Mutex<HashMap<String, usize>>,
    answered: Mutex<HashMap<String, usize>>,
    bodies: Mutex<Vec<Value>>,
    auth: Mutex<Vec<String>>,
}

struct Shared {
    latency: Duration,
    require_key: Option<String>,
    record_bodies: bool,
    replies: Vec<(String, String)>,
    faults: Vec<FaultState>,
    stats: Stats,
}

/// A running mock server; dropping it shuts the server down (in-flight
/// requests are abandoned) and joins its thread.
pub struct MockServer {
    /// Base URL, `http://127.0.0.1:PORT/v1`.
    pub url: String,
    /// The bound address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockServer {
    /// Starts on its own thread with its own multi-thread tokio runtime (2
    /// worker threads) on 127.0.0.1 and a free port; returns once listening.
    /// Panics if it cannot bind.
    pub fn start(config: Config) -> MockServer {
        MockServer::start_on(config, 0).expect("mock_openai: cannot start the server")
    }

    /// Like `start`, on 127.0.0.1:`port` (0: any free port).
    pub fn start_on(config: Config, port: u16) -> std::io::Result<MockServer> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            latency: Duration::from_millis(config.latency_ms),
            require_key: config.require_key,
            record_bodies: config.record_bodies,
            replies: config.replies,
            faults: config
                .faults
                .into_iter()
                .map(|f| FaultState {
                    remaining: AtomicUsize::new(f.times),
                    fault: f,
                })
                .collect(),
            stats: Stats::default(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(shared.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mock-openai")
            .enable_all()
            .build()?;
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let thread = std::thread::Builder::new()
            .name("mock-openai".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    use axum::serve::ListenerExt;
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    // Not a graceful shutdown: on drop, in-flight requests
                    // (a `Hang`, say) are abandoned rather than awaited.
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = shutdown_rx => {}
                    }
                });
                // Dropping the runtime cancels the connection tasks.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(std::io::Error::other("mock_openai: server thread died"));
            }
        }
        Ok(MockServer {
            url: format!("http://{addr}/v1"),
            addr,
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// Total POST /v1/chat/completions requests received (faulty, invalid
    /// and unauthorized ones included).
    pub fn requests(&self) -> usize {
        self.shared.stats.requests.load(Ordering::SeqCst)
    }

    /// Requests whose last user message equals `prompt` exactly.
    pub fn requests_for(&self, prompt: &str) -> usize {
        let map = self.shared.stats.per_prompt.lock().unwrap();
        map.get(prompt).copied().unwrap_or(0)
    }

    /// Successful (200, valid) replies sent, per last-user-message prompt.
    /// The count is updated before the reply is written, so a client that
    /// has its reply sees it counted. Replies delayed by a `Hang` fault are
    /// not counted.
    pub fn answered(&self) -> HashMap<String, usize> {
        self.shared.stats.answered.lock().unwrap().clone()
    }

    /// Sum of `answered()`.
    pub fn answered_total(&self) -> usize {
        self.shared.stats.answered.lock().unwrap().values().sum()
    }

    /// Every request body received (JSON), in arrival order; only kept if
    /// `Config::record_bodies` (empty otherwise). Bodies that are not JSON
    /// are kept as a JSON string of their (lossy UTF-8) text.
    pub fn bodies(&self) -> Vec<Value> {
        self.shared.stats.bodies.lock().unwrap().clone()
    }

    /// `Authorization` header values seen on chat-completion requests, in
    /// arrival order (requests without the header add nothing).
    pub fn auth_headers(&self) -> Vec<String> {
        self.shared.stats.auth.lock().unwrap().clone()
    }

    /// Injections left for `faults[index]` (as given in `Config::faults`).
    pub fn faults_remaining(&self, index: usize) -> usize {
        self.shared.faults[index].remaining.load(Ordering::SeqCst)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// --- handlers -------------------------------------------------------------------

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn json_response(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.into(),
    )
        .into_response()
}

fn error_response(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let body = json!({
        "error": {"message": message, "type": kind, "param": null, "code": code}
    });
    json_response(status, body.to_string())
}

fn unauthorized() -> Response {
    error_response(
        StatusCode::UNAUTHORIZED,
        "Incorrect API key provided.",
        "invalid_request_error",
        Some("invalid_api_key"),
    )
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    match &shared.require_key {
        None => true,
        Some(key) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|k| k == key),
    }
}

/// The text of a message's content: a string, or the `text` parts of an
/// array of content parts, joined with newlines.
fn content_text(content: Option<&Value>) -> Option<String> {
    match content? {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => None,
    }
}

/// The last user message (`""` if there is none), or an error message for
/// a body that is not a chat-completions request.
fn parse_request(body: &Value) -> Result<(String, usize), String> {
    let obj = body
        .as_object()
        .ok_or("the request body must be a JSON object")?;
    match obj.get("model") {
        Some(Value::String(_)) => {}
        Some(_) => return Err("'model' must be a string".into()),
        None => return Err("you must provide a model parameter".into()),
    }
    let messages = match obj.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => return Err("'messages' must not be empty".into()),
        Some(_) => return Err("'messages' must be an array".into()),
        None => return Err("missing required parameter: 'messages'".into()),
    };
    let mut last_user = String::new();
    let mut words = 0;
    for (i, m) in messages.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("'messages.{i}.role' must be a string"))?;
        let text = content_text(m.get("content")).unwrap_or_default();
        words += text.split_whitespace().count();
        if role == "user" {
            last_user = text;
        }
    }
    Ok((last_user, words))
}

fn bump(map: &Mutex<HashMap<String, usize>>, key: &str) {
    let mut map = map.lock().unwrap();
    if let Some(n) = map.get_mut(key) {
        *n += 1;
    } else {
        map.insert(key.to_owned(), 1);
    }
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let stats = &shared.stats;
    let n = stats.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let auth = String::from_utf8_lossy(auth.as_bytes()).into_owned();
        stats.auth.lock().unwrap().push(auth);
    }
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    if shared.record_bodies {
        let v = match &parsed {
            Some(v) => v.clone(),
            None => Value::String(String::from_utf8_lossy(&body).into_owned()),
        };
        stats.bodies.lock().unwrap().push(v);
    }
    let Some(req) = parsed else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            None,
        );
    };
    let (prompt, words) = match parse_request(&req) {
        Ok(p) => p,
        Err(msg) => {
            return error_response(StatusCode::BAD_REQUEST, &msg, "invalid_request_error", None);
        }
    };
    bump(&stats.per_prompt, &prompt);
    if !authorized(&shared, &headers) {
        return unauthorized();
    }

    let fault = shared.faults.iter().find_map(|f| {
        if !prompt.contains(f.fault.when_prompt_contains.as_str()) {
            return None;
        }
        f.remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(1))
            .ok()
            .map(|_| f.fault.kind.clone())
    });

    if !shared.latency.is_zero() {
        tokio::time::sleep(shared.latency).await;
    }
    let mut hung = false;
    match fault {
        None => {}
        Some(FaultKind::TooMany { retry_after_s }) => {
            let mut resp = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached for requests. Please try again later.",
                "requests",
                Some("rate_limit_exceeded"),
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            return resp;
        }
        Some(FaultKind::ServerError) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server had an error while processing your request.",
                "server_error",
                None,
            );
        }
        Some(FaultKind::BadRequest) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "Invalid request (injected fault).",
                "invalid_request_error",
                None,
            );
        }
        Some(FaultKind::Garbage) => {
            return json_response(StatusCode::OK, "not json{");
        }
        Some(FaultKind::Hang { ms }) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            hung = true;
        }
    }

    let model = req.get("model").and_then(Value::as_str).unwrap_or_default();
    let temperature = match req.get("temperature") {
        None | Some(Value::Null) => "none".to_owned(),
        Some(t) => t.to_string(),
    };
    let hash = format!("{:016x}", fnv1a64(prompt.as_bytes()));
    let reply = match shared
        .replies
        .iter()
        .find(|(k, _)| prompt.contains(k.as_str()))
    {
        Some((_, r)) => r.clone(),
        None => format!("summary:{}:{model}:{temperature}", &hash[..8]),
    };
    let completion_tokens = 3;
    let body = json!({
        "id": format!("chatcmpl-mock-{n}"),
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": words,
            "completion_tokens": completion_tokens,
            "total_tokens": words + completion_tokens,
        },
    });
    if !hung {
        bump(&stats.answered, &prompt);
    }
    json_response(StatusCode::OK, body.to_string())
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let body = json!({
        "object": "list",
        "data": [
            {"id": "mock-model", "object": "model", "created": 0, "owned_by": "anneal-mock"},
            {"id": "bench-model", "object": "model", "created": 0, "owned_by": "anneal-mock"},
        ],
    });
    json_response(StatusCode::OK, body.to_string())
}

async fn not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "Unknown request URL. Only POST /v1/chat/completions and GET /v1/models are served.",
        "invalid_request_error",
        Some("unknown_url"),
    )
}
