//! Chat templates rendered the way Hugging Face transformers renders them.
//!
//! transformers compiles a model's `chat_template` (Jinja) in an
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
//! loop-controls extension, overrides `tojson` with `json.dumps(x, ensure_ascii=False)`
//! and adds the globals `raise_exception` and `strftime_now`. It renders with
//! `messages`, `tools`, `documents`, `add_generation_prompt` and the tokenizer's
//! special tokens. [`ChatTemplate`] does the same with minijinja, so that the text
//! (and so the token ids) a model was trained on is reproduced byte for byte.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use minijinja::value::{Kwargs, Object, ObjectExt, Rest, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State, Value};
use serde_json::{Map, Value as Json};

/// The special tokens a chat template may refer to as `bos_token`, `eos_token`,
/// `unk_token` and `pad_token`. A token that is `None` is left undefined in the
/// template, as transformers does for unset tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token text, e.g. `<s>`.
    pub bos_token: Option<String>,
    /// End-of-sequence token text, e.g. `<|im_end|>`.
    pub eos_token: Option<String>,
    /// Unknown token text.
    pub unk_token: Option<String>,
    /// Padding token text.
    pub pad_token: Option<String>,
}

impl SpecialTokens {
    /// Reads the tokens from a parsed `tokenizer_config.json` (or
    /// `special_tokens_map.json`): each key is a string, an object with a
    /// `content` string (an `AddedToken` as transformers writes it), or null/missing.
    pub fn from_tokenizer_config(config: &Json) -> Self {
        let get = |key: &str| token_text(config.get(key));
        SpecialTokens {
            bos_token: get("bos_token"),
            eos_token: get("eos_token"),
            unk_token: get("unk_token"),
            pad_token: get("pad_token"),
        }
    }

    /// Fills the tokens that are `None` here from `other`.
    pub fn or(mut self, other: SpecialTokens) -> Self {
        self.bos_token = self.bos_token.or(other.bos_token);
        self.eos_token = self.eos_token.or(other.eos_token);
        self.unk_token = self.unk_token.or(other.unk_token);
        self.pad_token = self.pad_token.or(other.pad_token);
        self
    }

    fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("unk_token", &self.unk_token),
            ("pad_token", &self.pad_token),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    }
}

/// The text of a special token entry: a string or `{"content": "..."}`.
pub(crate) fn token_text(entry: Option<&Json>) -> Option<String> {
    match entry? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// One template compiled in the environment: the environment key, where it came
/// from (for error messages) and its source.
#[derive(Debug, Clone)]
struct Compiled {
    key: &'static str,
    origin: String,
    source: String,
}

/// A compiled chat template plus the special tokens it is rendered with.
///
/// Build it with [`ChatTemplate::from_dir`] for a checkpoint directory, or
/// [`ChatTemplate::new`] / [`ChatTemplate::with_origin`] for a template string.
/// Rendering is thread-safe (`&self`).
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    default: Compiled,
    tool_use: Option<Compiled>,
    tokens: SpecialTokens,
}

impl ChatTemplate {
    /// Compiles `source` (a Jinja chat template). Errors name it "chat template".
    pub fn new(source: impl Into<String>, special_tokens: SpecialTokens) -> anyhow::Result<Self> {
        Self::with_origin("chat template", source, special_tokens)
    }

    /// Compiles `source`; `origin` (usually a file path) names the template in
    /// errors, e.g. `/ckpt/chat_template.jinja`.
    pub fn with_origin(
        origin: impl Into<String>,
        source: impl Into<String>,
        special_tokens: SpecialTokens,
    ) -> anyhow::Result<Self> {
        Self::build(origin.into(), source.into(), None, special_tokens)
    }

    /// The template of a parsed `tokenizer_config.json` (its `chat_template` key),
    /// with the special tokens found there, or `None` when it has no template.
    /// `chat_template` is a string, or a list of `{name, template}`: the one
    /// named `default` is used, and one named `tool_use`, if any, is used when
    /// [`render`](Self::render) gets tools (as transformers does). `origin`
    /// names the file in errors.
    pub fn from_tokenizer_config(config: &Json, origin: &str) -> anyhow::Result<Option<Self>> {
        let tokens = SpecialTokens::from_tokenizer_config(config);
        let Some(template) = config.get("chat_template") else {
            return Ok(None);
        };
        match template {
            Json::Null => Ok(None),
            Json::String(s) => {
                Self::build(format!("{origin} (chat_template)"), s.clone(), None, tokens).map(Some)
            }
            Json::Array(list) => {
                let mut named = BTreeMap::new();
                for (i, entry) in list.iter().enumerate() {
                    let (Some(name), Some(template)) = (
                        entry.get("name").and_then(Json::as_str),
                        entry.get("template").and_then(Json::as_str),
                    ) else {
                        bail!(
                            "{origin}: chat_template[{i}] is not an object with string `name` and \
                             `template`; write chat_template as a string or a list of \
                             {{\"name\": ..., \"template\": ...}}"
                        );
                    };
                    named.insert(name.to_owned(), template.to_owned());
                }
                let Some(default) = named.get("default") else {
                    bail!(
                        "{origin}: chat_template lists templates {:?} but none is named \
                         \"default\"; name the one to use \"default\"",
                        named.keys().collect::<Vec<_>>()
                    );
                };
                let tool_use = named
                    .get("tool_use")
                    .map(|s| (format!("{origin} (chat_template \"tool_use\")"), s.clone()));
                Self::build(
                    format!("{origin} (chat_template \"default\")"),
                    default.clone(),
                    tool_use,
                    tokens,
                )
                .map(Some)
            }
            other => bail!(
                "{origin}: chat_template must be a string or a list of {{name, template}}, \
                 not {}; fix the file",
                json_kind(other)
            ),
        }
    }

    /// The chat template of a checkpoint directory, as transformers finds it:
    /// `chat_template.jinja` if present, else `tokenizer_config.json`'s
    /// `chat_template`, else `chat_template.json`'s (an older processor format).
    /// Special tokens come from `tokenizer_config.json`, completed by
    /// `special_tokens_map.json`. `Ok(None)` when the directory has no template.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?;
        let mut tokens = config
            .as_ref()
            .map(SpecialTokens::from_tokenizer_config)
            .unwrap_or_default();
        if let Some(map) = read_json_if_exists(&dir.join("special_tokens_map.json"))? {
            tokens = tokens.or(SpecialTokens::from_tokenizer_config(&map));
        }

        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            let source = std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("reading {}", jinja_path.display()))?;
            return Self::with_origin(jinja_path.display().to_string(), source, tokens).map(Some);
        }
        if let Some(config) = &config
            && let Some(mut t) =
                Self::from_tokenizer_config(config, &config_path.display().to_string())?
        {
            t.tokens = tokens;
            return Ok(Some(t));
        }
        let json_path = dir.join("chat_template.json");
        if let Some(json) = read_json_if_exists(&json_path)?
            && let Some(mut t) =
                Self::from_tokenizer_config(&json, &json_path.display().to_string())?
        {
            t.tokens = tokens;
            return Ok(Some(t));
        }
        Ok(None)
    }

    fn build(
        origin: String,
        source: String,
        tool_use: Option<(String, String)>,
        tokens: SpecialTokens,
    ) -> anyhow::Result<Self> {
        let mut env = new_environment();
        let default = Compiled {
            key: "default",
            origin,
            source,
        };
        let tool_use = tool_use.map(|(origin, source)| Compiled {
            key: "tool_use",
            origin,
            source,
        });
        for c in std::iter::once(&default).chain(tool_use.as_ref()) {
            env.add_template_owned(c.key, preprocess(&c.source))
                .map_err(|e| template_error(c, &e, false))?;
        }
        Ok(ChatTemplate {
            env,
            default,
            tool_use,
            tokens,
        })
    }

    /// The template source (the `default` one when there are several).
    pub fn source(&self) -> &str {
        &self.default.source
    }

    /// Where the template came from, as named in errors.
    pub fn origin(&self) -> &str {
        &self.default.origin
    }

    /// The special tokens passed to the template.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.tokens
    }

    /// Replaces the special tokens passed to the template.
    pub fn set_special_tokens(&mut self, tokens: SpecialTokens) {
        self.tokens = tokens;
    }

    /// Renders a conversation, like transformers'
    /// `apply_chat_template(messages, tools=tools, add_generation_prompt=..., tokenize=False)`.
    ///
    /// `messages` is normally a list of `{"role", "content", ...}` objects and
    /// `tools` a list of JSON schemas; both reach the template unchanged
    /// (objects keep their key order). Without tools the template sees
    /// `tools` = none. Errors name the template and line, and carry the message
    /// of a template's `raise_exception(...)`.
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        self.render_with(messages, tools, add_generation_prompt, &Map::new())
    }

    /// [`Self::render`] with more template variables, as transformers'
    /// `apply_chat_template(..., **kwargs)` and vLLM's `chat_template_kwargs`
    /// pass them (e.g. `enable_thinking: false` for Qwen3). A variable the
    /// renderer sets itself (`messages`, `tools`, `add_generation_prompt`,
    /// the special tokens) is an error.
    pub fn render_with(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        kwargs: &Map<String, Json>,
    ) -> anyhow::Result<String> {
        if let Some(k) = kwargs.keys().find(|k| RESERVED.contains(&k.as_str())) {
            bail!(
                "chat_template_kwargs: `{k}` is set by anneal itself; remove it (kwargs set other template variables, e.g. enable_thinking)"
            );
        }
        let compiled = match (&self.tool_use, tools) {
            (Some(t), Some(_)) => t,
            _ => &self.default,
        };
        let template = self
            .env
            .get_template(compiled.key)
            .map_err(|e| template_error(compiled, &e, false))?;
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", json_to_value(messages)),
            ("tools", tools.map_or(Value::from(()), json_to_value)),
            ("documents", Value::from(())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        ctx.extend(self.tokens.iter().map(|(k, v)| (k, Value::from(v))));
        ctx.extend(kwargs.iter().map(|(k, v)| (k.as_str(), json_to_value(v))));
        let ctx: BTreeMap<&str, Value> = ctx.into_iter().collect();
        template
            .render(ctx)
            .map_err(|e| template_error(compiled, &e, true))
    }
}

fn read_json_if_exists(path: &Path) -> anyhow::Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not valid JSON; fix or regenerate the file",
            path.display()
        )
    })?;
    Ok(Some(json))
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// The environment transformers uses, in minijinja.
fn new_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson_filter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// transformers' `AssistantTracker` extension adds `{% generation %}` ...
/// `{% endgeneration %}` around assistant text (to build assistant masks); it
/// renders its body unchanged. minijinja has no custom tags, so each becomes an
/// `{% if true %}` ... `{% endif %}` with the same whitespace control.
fn preprocess(source: &str) -> String {
    if !source.contains("generation") {
        return source.to_owned();
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, close) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => write!(out, "{{%{open} {r} {close}%}}").unwrap(),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The error a template's `raise_exception(msg)` produces, recognised in
/// [`template_error`].
#[derive(Debug)]
struct TemplateException(String);

impl std::fmt::Display for TemplateException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateException {}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(TemplateException(msg)))
}

/// `strftime_now(fmt)`: the local time formatted by the C library's
/// `strftime`, as Python's `datetime.now().strftime(fmt)` does.
fn strftime_now(fmt: &str) -> Result<String, Error> {
    if fmt.is_empty() {
        return Ok(String::new());
    }
    let cfmt = std::ffi::CString::new(fmt).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            "strftime_now: the format contains a NUL character",
        )
    })?;
    // SAFETY: `time` accepts a null pointer; `localtime_r` writes into the
    // zero-initialised `tm` we own; `strftime` writes at most `buf.len()`
    // bytes into `buf` and reads the NUL-terminated `cfmt`.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "strftime_now: could not read the local time",
            ));
        }
        let mut cap = 64 + 8 * fmt.len();
        loop {
            let mut buf = vec![0u8; cap];
            let n = libc::strftime(buf.as_mut_ptr().cast(), cap, cfmt.as_ptr(), &tm);
            // 0 means "empty or did not fit": grow a few times, then accept empty.
            if n > 0 || cap >= 1 << 16 {
                buf.truncate(n);
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
            cap *= 4;
        }
    }
}

/// Turns a minijinja error into one that names the template, the line and the
/// fix. `rendering` tells a render error from a compile (syntax) error.
fn template_error(compiled: &Compiled, err: &Error, rendering: bool) -> anyhow::Error {
    // minijinja chains errors from nested calls; the innermost one says what happened.
    let mut inner: &dyn std::error::Error = err;
    let mut exception = None;
    let mut chain = Some(inner);
    while let Some(e) = chain {
        if let Some(t) = e.downcast_ref::<TemplateException>() {
            exception = Some(t.0.clone());
        }
        if e.downcast_ref::<Error>().is_some() {
            inner = e;
        }
        chain = e.source();
    }
    let inner = inner.downcast_ref::<Error>().unwrap_or(err);
    let line = inner.line().or(err.line());
    let origin = &compiled.origin;
    let at = match line {
        Some(l) => {
            let text = compiled
                .source
                .lines()
                .nth(l.saturating_sub(1))
                .unwrap_or("")
                .trim();
            let text = if text.chars().count() > 160 {
                format!("{}...", text.chars().take(160).collect::<String>())
            } else {
                text.to_owned()
            };
            format!("{origin}, line {l}: `{text}`")
        }
        None => origin.clone(),
    };
    if let Some(msg) = exception {
        return anyhow::anyhow!(
            "{at}: the chat template raised an exception: {msg}\n\
             The conversation does not have the shape this template accepts \
             (roles, their order, required fields); change the messages or use another template."
        );
    }
    let what = match inner.detail() {
        Some(d) => format!("{}: {d}", inner.kind()),
        None => inner.kind().to_string(),
    };
    if rendering {
        anyhow::anyhow!(
            "{at}: rendering the chat template failed: {what}\n\
             Check that the messages have the fields this template uses (role, content, \
             tool_calls, ...) with the right types, or fix the template."
        )
    } else {
        anyhow::anyhow!(
            "{at}: the chat template does not compile: {what}\n\
             Fix the template: it must be a Jinja2 template as Hugging Face transformers \
             accepts it."
        )
    }
}

// ---------------------------------------------------------------------------
// JSON values in templates

/// A JSON object as a template value: keeps the key order (Python dicts do,
/// minijinja's own maps sort their keys), converting members when read.
#[derive(Debug)]
struct JsonObject(serde_json::Map<String, Json>);

impl Object for JsonObject {
    fn repr(self: &Arc<Self>) -> minijinja::value::ObjectRepr {
        minijinja::value::ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.get(key.as_str()?).map(json_to_value)
    }

    fn enumerate(self: &Arc<Self>) -> minijinja::value::Enumerator {
        self.mapped_key_value_enumerator(|this| {
            Box::new(
                this.0
                    .iter()
                    .map(|(k, v)| (Value::from(k.as_str()), json_to_value(v))),
            )
        })
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

/// Converts JSON to a template value; objects keep their key order.
fn json_to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(a) => Value::from(a.iter().map(json_to_value).collect::<Vec<_>>()),
        Json::Object(o) => Value::from_object(JsonObject(o.clone())),
    }
}

// ---------------------------------------------------------------------------
// tojson = Python's json.dumps

/// Options of Python's `json.dumps` that transformers' `tojson` exposes.
#[derive(Debug, Clone)]
struct DumpOptions {
    ensure_ascii: bool,
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            ensure_ascii: false,
            indent: None,
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            sort_keys: false,
        }
    }
}

/// Serializes JSON exactly as Python's `json.dumps(value, ensure_ascii=False)`:
/// `", "` and `": "` separators, keys in their order, non-ASCII text as is and
/// no HTML escaping. This is what `{{ x | tojson }}` gives in a chat template.
pub fn python_json(value: &Json) -> String {
    let mut out = String::new();
    // JSON input has no undefined values or unserializable objects, so this cannot fail.
    let _ = dump(&mut out, &json_to_value(value), &DumpOptions::default(), 0);
    out
}

/// The `tojson` filter transformers installs:
/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// arguments positional or by keyword.
fn tojson_filter(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > NAMES.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most ensure_ascii, indent, separators and sort_keys",
        ));
    }
    let mut given: [Option<Value>; 4] = Default::default();
    for (slot, v) in given.iter_mut().zip(args.iter()) {
        *slot = Some(v.clone());
    }
    for (slot, name) in given.iter_mut().zip(NAMES) {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            *slot = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = given;
    let mut opts = DumpOptions {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
        ..DumpOptions::default()
    };
    match indent {
        None => {}
        Some(v) if v.is_none() || v.is_undefined() => {}
        Some(v) if v.is_integer() => {
            let n = i64::try_from(v)?;
            opts.indent = Some(" ".repeat(n.max(0) as usize));
        }
        Some(v) if v.as_str().is_some() => opts.indent = Some(v.as_str().unwrap_or("").into()),
        Some(v) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "tojson: indent must be an integer or a string, not {}",
                    v.kind()
                ),
            ));
        }
    }
    if opts.indent.is_some() {
        opts.item_separator = ",".into();
    }
    if let Some(seps) = separators.filter(|v| !v.is_none() && !v.is_undefined()) {
        let parts: Vec<Value> = seps.try_iter()?.collect();
        match parts.as_slice() {
            [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                opts.item_separator = a.as_str().unwrap_or_default().into();
                opts.key_separator = b.as_str().unwrap_or_default().into();
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair of strings (item_separator, key_separator)",
                ));
            }
        }
    }
    let mut out = String::new();
    dump(&mut out, value, &opts, 0)?;
    Ok(out)
}

fn dump(out: &mut String, v: &Value, opts: &DumpOptions, level: usize) -> Result<(), Error> {
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => number(out, v, true)?,
        ValueKind::String => json_string(out, v.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            container(out, opts, level, ('[', ']'), &items, |out, item, level| {
                dump(out, item, opts, level)
            })?;
        }
        ValueKind::Map => {
            let mut pairs: Vec<(Value, Value)> = v
                .as_object()
                .and_then(|o| o.try_iter_pairs())
                .map(|it| it.collect())
                .unwrap_or_default();
            if opts.sort_keys {
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            container(
                out,
                opts,
                level,
                ('{', '}'),
                &pairs,
                |out, (k, v), level| {
                    let key = json_key(k)?;
                    json_string(out, &key, opts.ensure_ascii);
                    out.push_str(&opts.key_separator);
                    dump(out, v, opts, level)
                },
            )?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// Writes a list or dict the way Python's encoder does, with or without indent.
fn container<T>(
    out: &mut String,
    opts: &DumpOptions,
    level: usize,
    (open, close): (char, char),
    items: &[T],
    mut each: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    if items.is_empty() {
        out.push(open);
        out.push(close);
        return Ok(());
    }
    out.push(open);
    let newline = opts
        .indent
        .as_ref()
        .map(|ind| format!("\n{}", ind.repeat(level + 1)));
    if let Some(nl) = &newline {
        out.push_str(nl);
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&opts.item_separator);
            if let Some(nl) = &newline {
                out.push_str(nl);
            }
        }
        each(out, item, level + 1)?;
    }
    if let Some(ind) = &opts.indent {
        out.push('\n');
        out.push_str(&ind.repeat(level));
    }
    out.push(close);
    Ok(())
}

/// A dict key as Python's json converts it: strings as is, numbers, booleans
/// and None as their JSON text.
fn json_key(k: &Value) -> Result<String, Error> {
    match k.kind() {
        ValueKind::String => Ok(k.as_str().unwrap_or_default().to_owned()),
        ValueKind::None => Ok("null".into()),
        ValueKind::Bool => Ok(if k.is_true() { "true" } else { "false" }.into()),
        ValueKind::Number => {
            let mut s = String::new();
            number(&mut s, k, true)?;
            Ok(s)
        }
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

/// Writes a number: integers as digits, floats as Python's `repr` (`json` spells
/// non-finite floats `NaN`/`Infinity`, `repr` spells them `nan`/`inf`).
fn number(out: &mut String, v: &Value, json: bool) -> Result<(), Error> {
    if v.is_integer() {
        write!(out, "{v}").ok();
        return Ok(());
    }
    let f = f64::try_from(v.clone())?;
    out.push_str(&match (f.is_nan(), f.is_infinite(), json) {
        (true, _, true) => "NaN".into(),
        (true, _, false) => "nan".into(),
        (_, true, true) => if f > 0.0 { "Infinity" } else { "-Infinity" }.into(),
        (_, true, false) => if f > 0.0 { "inf" } else { "-inf" }.into(),
        _ => python_float_repr(f),
    });
    Ok(())
}

/// Python's `repr(float)` for a finite float: the shortest digits that round-trip,
/// positional when the decimal exponent is in -4..16, else `d.ddde±XX`.
fn python_float_repr(f: f64) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // `{:e}` gives the shortest round-trip digits, e.g. `-1.25e-7`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1; // value = 0.DIGITS * 10^decpt
    let n = digits.len() as i32;
    let body = if -4 < decpt && decpt <= 16 {
        if decpt <= 0 {
            format!("0.{}{digits}", "0".repeat((-decpt) as usize))
        } else if decpt >= n {
            format!("{digits}{}.0", "0".repeat((decpt - n) as usize))
        } else {
            let (a, b) = digits.split_at(decpt as usize);
            format!("{a}.{b}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let e = decpt - 1;
        format!(
            "{first}{frac}e{}{:02}",
            if e < 0 { '-' } else { '+' },
            e.unsigned_abs()
        )
    };
    format!("{sign}{body}")
}

/// A JSON string literal as Python writes it (`ensure_ascii` escapes every
/// character outside space..`~` as `\uXXXX`, with surrogate pairs).
fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    write!(out, "\\u{unit:04x}").unwrap();
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------
// Printing values as Python does

/// Prints `{{ value }}` as Jinja2 does with Python objects: `None`, `True`,
/// floats as `repr`, lists and dicts as their Python `repr`. Strings and
/// everything else print as minijinja prints them (no escaping).
fn python_formatter(out: &mut Output, state: &State, value: &Value) -> Result<(), Error> {
    let text = match value.kind() {
        ValueKind::Number if !value.is_integer() => {
            let mut s = String::new();
            number(&mut s, value, false)?;
            s
        }
        ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            python_repr(&mut s, value)?;
            s
        }
        _ => return minijinja::escape_formatter(out, state, value),
    };
    out.write_str(&text).map_err(Error::from)
}

/// Python's `repr` of a value (approximate for exotic unicode).
fn python_repr(out: &mut String, v: &Value) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined => out.push_str("Undefined"),
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => number(out, v, false)?,
        ValueKind::String => python_str_repr(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(out, &item)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            let pairs = v.as_object().and_then(|o| o.try_iter_pairs());
            for (i, (k, item)) in pairs.into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(out, &k)?;
                out.push_str(": ");
                python_repr(out, &item)?;
            }
            out.push('}');
        }
        _ => write!(out, "{v}").unwrap(),
    }
    Ok(())
}

fn python_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if c == ' ' || c.is_ascii_graphic() => out.push(c),
            c if python_printable(c) => out.push(c),
            c if (c as u32) < 0x100 => write!(out, "\\x{:02x}", c as u32).unwrap(),
            c if (c as u32) < 0x10000 => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c => write!(out, "\\U{:08x}", c as u32).unwrap(),
        }
    }
    out.push(quote);
}

/// Approximates Python's `str.isprintable` for non-ASCII characters: not
/// control, separator (other than space) or common format characters.
fn python_printable(c: char) -> bool {
    !(c.is_control()
        || c.is_whitespace()
        || matches!(c, '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{2060}'..='\u{2064}' | '\u{feff}'))
}

/// Template variables the renderer sets itself.
const RESERVED: &[&str] = &[
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, ctx: Json) -> anyhow::Result<String> {
        let t = ChatTemplate::new(source, SpecialTokens::default())?;
        let messages = ctx.get("messages").cloned().unwrap_or(json!([]));
        t.render(&messages, ctx.get("tools"), false)
    }

    fn tojson(value: Json, args: &str) -> String {
        render(
            &format!("{{{{ messages | tojson{args} }}}}"),
            json!({ "messages": value }),
        )
        .unwrap()
    }

    #[test]
    fn tojson_nested_keeps_key_order_and_python_separators() {
        let v = json!({"z": 1, "a": [1, 2, {"y": null, "b": true}], "m": {}, "e": []});
        assert_eq!(
            tojson(v.clone(), ""),
            r#"{"z": 1, "a": [1, 2, {"y": null, "b": true}], "m": {}, "e": []}"#
        );
        assert_eq!(python_json(&v), tojson(v, ""));
    }

    #[test]
    fn tojson_keeps_unicode_and_does_not_html_escape() {
        assert_eq!(
            tojson(
                json!({"d": "<temp> & 'humidity' (°C) \"q\" \\ 日本 😀"}),
                ""
            ),
            r#"{"d": "<temp> & 'humidity' (°C) \"q\" \\ 日本 😀"}"#
        );
        assert_eq!(
            tojson(json!("tab\tnl\ncr\r\u{1}\u{7f}"), ""),
            "\"tab\\tnl\\ncr\\r\\u0001\u{7f}\""
        );
    }

    #[test]
    fn tojson_ensure_ascii_escapes_like_python() {
        // json.dumps("°C 😀\x7f", ensure_ascii=True)
        assert_eq!(
            tojson(json!("°C 😀\u{7f}"), "(ensure_ascii=true)"),
            r#""\u00b0C \ud83d\ude00\u007f""#
        );
    }

    #[test]
    fn tojson_indent_matches_python() {
        let v = json!({"a": [1, {"b": []}], "c": {"d": "x"}, "e": {}});
        // json.dumps(v, ensure_ascii=False, indent=2)
        let expected = "{\n  \"a\": [\n    1,\n    {\n      \"b\": []\n    }\n  ],\n  \"c\": {\n    \"d\": \"x\"\n  },\n  \"e\": {}\n}";
        assert_eq!(tojson(v.clone(), "(indent=2)"), expected);
        // positional: tojson(ensure_ascii, indent)
        assert_eq!(tojson(v.clone(), "(false, 2)"), expected);
        assert_eq!(tojson(json!([1, 2]), "(indent=0)"), "[\n1,\n2\n]");
        assert_eq!(tojson(json!([1, 2]), "(indent='\\t')"), "[\n\t1,\n\t2\n]");
    }

    #[test]
    fn tojson_sort_keys_and_separators() {
        let v = json!({"b": 1, "a": {"d": 2, "c": 3}});
        assert_eq!(
            tojson(v.clone(), "(sort_keys=true)"),
            r#"{"a": {"c": 3, "d": 2}, "b": 1}"#
        );
        assert_eq!(
            tojson(v, "(separators=(',', ':'))"),
            r#"{"b":1,"a":{"d":2,"c":3}}"#
        );
    }

    #[test]
    fn tojson_numbers_bool_null_like_python() {
        // json.dumps([...]) in Python 3
        assert_eq!(
            tojson(
                json!([
                    1.0,
                    0.5,
                    1e-05,
                    0.0001,
                    1e16,
                    1e15,
                    123456789.125,
                    -2.5e-7,
                    1.7976931348623157e308,
                    0.1
                ]),
                ""
            ),
            "[1.0, 0.5, 1e-05, 0.0001, 1e+16, 1000000000000000.0, 123456789.125, -2.5e-07, 1.7976931348623157e+308, 0.1]"
        );
        assert_eq!(
            tojson(
                json!([0, -7, 18446744073709551615u64, true, false, null]),
                ""
            ),
            "[0, -7, 18446744073709551615, true, false, null]"
        );
        assert_eq!(python_float_repr(-0.0), "-0.0");
        assert_eq!(python_float_repr(1e22), "1e+22");
        assert_eq!(python_float_repr(1.5e300), "1.5e+300");
        assert_eq!(python_float_repr(2.0), "2.0");
        assert_eq!(python_float_repr(100.0), "100.0");
        assert_eq!(python_float_repr(2.675), "2.675");
        // template-made values: integer keys and floats
        assert_eq!(
            render("{{ {1: 2.0, 'k': none} | tojson }}", json!({})).unwrap(),
            r#"{"1": 2.0, "k": null}"#
        );
    }

    #[test]
    fn tojson_rejects_undefined() {
        let err = render("{{ nothing | tojson }}", json!({})).unwrap_err();
        assert!(
            format!("{err:#}").contains("not JSON serializable"),
            "{err:#}"
        );
    }

    #[test]
    fn raise_exception_names_template_line_and_message() {
        let src = "{% for m in messages %}\n{% if m.role == 'bot' %}\n{{ raise_exception('Conversation roles must alternate user/assistant') }}\n{% endif %}\n{% endfor %}";
        let t = ChatTemplate::with_origin("dir/chat_template.jinja", src, SpecialTokens::default())
            .unwrap();
        let err = t
            .render(&json!([{"role": "bot", "content": "x"}]), None, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Conversation roles must alternate user/assistant"),
            "{err}"
        );
        assert!(err.contains("dir/chat_template.jinja, line 3"), "{err}");
        assert!(err.contains("raised an exception"), "{err}");
    }

    #[test]
    fn syntax_and_render_errors_name_the_line() {
        let err = ChatTemplate::with_origin("t.jinja", "ok\n{% if %}", SpecialTokens::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.jinja, line 2"), "{err}");
        assert!(err.contains("does not compile"), "{err}");

        let t = ChatTemplate::with_origin(
            "t.jinja",
            "a\nb\n{{ messages[0].content + 1 }}",
            SpecialTokens::default(),
        )
        .unwrap();
        let err = t
            .render(&json!([{"content": "x"}]), None, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.jinja, line 3"), "{err}");
    }

    #[test]
    fn environment_behaves_like_transformers() {
        // trim_blocks / lstrip_blocks, special tokens, python methods, loop controls,
        // Python printing of None/booleans/containers, tools = none when absent.
        let src = "{% for m in messages %}\n    {% if loop.index > 2 %}{% break %}{% endif %}\n{{ bos_token }}{{ m.content.strip().upper() }}|{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}\n{% endfor %}{{ tools is none }} {{ m is defined }} {{ [1, 'a', none, true] }} {{ {'k': 'it\\'s'} }} {{ 0.5 }}\n";
        let t = ChatTemplate::new(
            src,
            SpecialTokens {
                bos_token: Some("<s>".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let out = t
            .render(
                &json!([{"role": "user", "content": " hi "}, {"role": "x", "content": "b"}, {"content": "c"}]),
                None,
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<s>HI|role=user;content= hi ;<s>B|role=x;content=b;True False [1, 'a', None, True] {'k': \"it's\"} 0.5"
        );
    }

    #[test]
    fn strftime_now_and_generation_tags() {
        let out = render("{{ strftime_now('%Y') }}", json!({})).unwrap();
        assert_eq!(out.len(), 4, "{out}");
        assert!(out.starts_with('2'), "{out}");
        let out = render(
            "{%- for m in messages %}[{%- generation -%} {{ m }} {%- endgeneration %}]{% endfor %}",
            json!({"messages": ["a", "b"]}),
        )
        .unwrap();
        assert_eq!(out, "[a][b]");
    }

    #[test]
    fn tool_use_template_is_chosen_with_tools() {
        let config = json!({
            "eos_token": {"content": "</s>", "special": true},
            "chat_template": [
                {"name": "default", "template": "D{{ eos_token }}"},
                {"name": "tool_use", "template": "T{{ tools | length }}"}
            ]
        });
        let t = ChatTemplate::from_tokenizer_config(&config, "tokenizer_config.json")
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&json!([]), None, false).unwrap(), "D</s>");
        assert_eq!(
            t.render(&json!([]), Some(&json!([{}, {}])), false).unwrap(),
            "T2"
        );
    }
}
