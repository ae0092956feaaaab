//! Training rows -> conversations -> token ids with labels.
//!
//! Rows may be verl SFT rows (`prompt` messages + `extra_info.answer` or
//! `answer`), multi-turn `messages`, or ShareGPT (`conversations` of
//! `{from, value}` + `system` + `tools`). The model's chat template renders
//! the conversation; assistant tokens are found by rendering prefixes (the
//! text up to each assistant turn with the generation prompt, and through the
//! turn), so any template works without knowing its markers.

use serde_json::{Map, Value, json};

use crate::model::tokenizer::Tokenizer;

/// How rows are read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Key of the prompt messages in verl rows.
    #[serde(default = "default_prompt_key")]
    pub prompt_key: String,
    /// Key of the response: looked up in `extra_info` first, then at top level.
    #[serde(default = "default_response_key")]
    pub response_key: String,
    /// Key of OpenAI-style multi-turn messages.
    #[serde(default = "default_messages_key")]
    pub messages_key: String,
    /// Train on every token, not only the assistant's.
    #[serde(default)]
    pub train_on_prompt: bool,
    /// Longest sample in tokens; longer ones are truncated.
    #[serde(default = "default_cutoff")]
    pub cutoff_len: usize,
    /// Which end of a long sample is cut: `right` (default) or `left`.
    #[serde(default)]
    pub truncation_side: Side,
    /// Which trained tokens count: `all`, `reasoning` or `tool_calls`.
    #[serde(default)]
    pub train_on: TrainOn,
    /// Train on the last assistant turn only (LLaMA-Factory's
    /// `mask_history`); earlier turns are context, and a cut on the right
    /// drops earlier tokens instead of that turn's.
    #[serde(default)]
    pub mask_history: bool,
    /// More chat-template variables (e.g. `enable_thinking: false`).
    #[serde(default)]
    pub chat_template_kwargs: Map<String, Value>,
}

impl Default for DataSpec {
    /// The defaults a pipeline gets when it sets none of the keys.
    fn default() -> Self {
        DataSpec {
            prompt_key: default_prompt_key(),
            response_key: default_response_key(),
            messages_key: default_messages_key(),
            train_on_prompt: false,
            cutoff_len: default_cutoff(),
            truncation_side: Side::default(),
            train_on: TrainOn::default(),
            mask_history: false,
            chat_template_kwargs: Map::new(),
        }
    }
}

pub(crate) fn default_prompt_key() -> String {
    "prompt".into()
}
pub(crate) fn default_response_key() -> String {
    "answer".into()
}
pub(crate) fn default_messages_key() -> String {
    "messages".into()
}
pub(crate) fn default_cutoff() -> usize {
    2048
}

/// Truncation side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Keep the beginning.
    #[default]
    Right,
    /// Keep the end.
    Left,
}

/// Token class filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// Every trained token.
    #[default]
    All,
    /// Only tokens outside tool-call blocks.
    Reasoning,
    /// Only tokens inside `<tool_call>...</tool_call>` / `<function...>...</function>`.
    ToolCalls,
}

/// Class of a trained token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenClass {
    /// Not trained.
    Ignored,
    /// Outside tool-call blocks.
    Reasoning,
    /// Inside a tool-call block.
    ToolCall,
}

/// One tokenised training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Same length as `ids`: the id where trained, -100 elsewhere.
    pub labels: Vec<i64>,
    /// Same length as `ids`.
    pub classes: Vec<TokenClass>,
    /// Whether `cutoff_len` cut it.
    pub truncated: bool,
}

/// A conversation ready for the chat template.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// OpenAI-style messages.
    pub messages: Vec<Value>,
    /// Tool specs, if any.
    pub tools: Option<Value>,
}

/// Reads one row in any of the supported shapes.
pub fn conversation(row: &Value, spec: &DataSpec) -> Result<Conversation, String> {
    let obj = row.as_object().ok_or("the row is not a JSON object")?;
    if let Some(conv) = obj.get("conversations") {
        return sharegpt(obj, conv);
    }
    if let Some(m) = obj.get(&spec.messages_key).filter(|v| !v.is_null()) {
        let messages = m
            .as_array()
            .ok_or_else(|| format!("'{}' is not a list of messages", spec.messages_key))?
            .clone();
        check_messages(&messages)?;
        return Ok(Conversation {
            messages,
            tools: tools_of(obj.get("tools"))?,
        });
    }
    if let Some(p) = obj.get(&spec.prompt_key).filter(|v| !v.is_null()) {
        let mut messages = match p {
            Value::Array(a) => a.clone(),
            Value::String(s) => vec![json!({"role": "user", "content": s})],
            _ => {
                return Err(format!(
                    "'{}' is neither messages nor text",
                    spec.prompt_key
                ));
            }
        };
        let answer = obj
            .get("extra_info")
            .and_then(|e| e.get(&spec.response_key))
            .or_else(|| obj.get(&spec.response_key))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                format!(
                    "no response: neither 'extra_info.{0}' nor '{0}' is a string",
                    spec.response_key
                )
            })?;
        messages.push(json!({"role": "assistant", "content": answer}));
        check_messages(&messages)?;
        return Ok(Conversation {
            messages,
            tools: tools_of(obj.get("tools"))?,
        });
    }
    if obj.contains_key("instruction") && obj.contains_key("output") {
        return alpaca(obj);
    }
    Err(format!(
        "the row has none of 'conversations' (ShareGPT), '{}' (messages), '{}' (verl prompt) \
         or 'instruction' and 'output' (Alpaca)",
        spec.messages_key, spec.prompt_key
    ))
}

/// An Alpaca row as LLaMA-Factory reads it: `history` (`[[query, response],
/// ...]`) as earlier turns, then `instruction` and `input` joined by a line
/// break as the last query (empty ones left out), `output` the response, and
/// `system` a system message.
fn alpaca(obj: &Map<String, Value>) -> Result<Conversation, String> {
    let text = |k: &str| -> Result<&str, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(""),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(format!("'{k}' is not a string")),
        }
    };
    let mut messages = Vec::new();
    let system = text("system")?;
    if !system.is_empty() {
        messages.push(json!({"role": "system", "content": system}));
    }
    match obj.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(turns)) => {
            for (i, t) in turns.iter().enumerate() {
                let pair = t.as_array().filter(|p| p.len() == 2);
                let (q, a) = pair
                    .and_then(|p| Some((p[0].as_str()?, p[1].as_str()?)))
                    .ok_or_else(|| {
                        format!("history[{i}] is not a [query, response] pair of strings")
                    })?;
                messages.push(json!({"role": "user", "content": q}));
                messages.push(json!({"role": "assistant", "content": a}));
            }
        }
        Some(_) => return Err("'history' is not a list of [query, response] pairs".into()),
    }
    let query: Vec<&str> = [text("instruction")?, text("input")?]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    messages.push(json!({"role": "user", "content": query.join("\n")}));
    messages.push(json!({"role": "assistant", "content": text("output")?}));
    check_messages(&messages)?;
    Ok(Conversation {
        messages,
        tools: tools_of(obj.get("tools"))?,
    })
}

fn check_messages(messages: &[Value]) -> Result<(), String> {
    for (i, m) in messages.iter().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() {
            return Err(format!("message {i} has no string 'role'"));
        }
    }
    if !messages
        .iter()
        .any(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
    {
        return Err("the conversation has no assistant message to train on".into());
    }
    Ok(())
}

/// The tool list for the chat template, each tool in the OpenAI form
/// `{"type": "function", "function": {...}}` that serving (vLLM, OpenAI
/// clients) and LLaMA-Factory give the template; bare `{"name", ...}` schemas
/// are wrapped so training prompts match what the model sees when served.
fn tools_of(v: Option<&Value>) -> Result<Option<Value>, String> {
    Ok(tools_listed(v)?.map(|t| match t {
        Value::Array(list) => Value::Array(list.into_iter().map(wrap_tool).collect()),
        other => other,
    }))
}

fn wrap_tool(t: Value) -> Value {
    match &t {
        Value::Object(m) if !m.contains_key("type") && m.contains_key("name") => {
            json!({"type": "function", "function": t})
        }
        _ => t,
    }
}

fn tools_listed(v: Option<&Value>) -> Result<Option<Value>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s)
            .map(|t| {
                if t.as_array().is_some_and(|a| a.is_empty()) {
                    None
                } else {
                    Some(t)
                }
            })
            .map_err(|e| format!("'tools' is a string but not JSON: {e}")),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(t @ Value::Array(_)) => Ok(Some(t.clone())),
        Some(_) => Err("'tools' must be a list (or a JSON string of one)".into()),
    }
}

fn sharegpt(obj: &Map<String, Value>, conv: &Value) -> Result<Conversation, String> {
    let turns = conv.as_array().ok_or("'conversations' is not a list")?;
    let mut messages = Vec::new();
    if let Some(s) = obj.get("system").and_then(Value::as_str)
        && !s.is_empty()
    {
        messages.push(json!({"role": "system", "content": s}));
    }
    for (i, t) in turns.iter().enumerate() {
        let from = t
            .get("from")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("conversations[{i}] has no string 'from'"))?;
        let value = t
            .get("value")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("conversations[{i}] has no string 'value'"))?;
        let m = match from {
            "human" | "user" => json!({"role": "user", "content": value}),
            "gpt" | "assistant" => json!({"role": "assistant", "content": value}),
            "system" => json!({"role": "system", "content": value}),
            "observation" | "tool" => json!({"role": "tool", "content": value}),
            "function_call" => function_call(value)
                .map_err(|e| format!("conversations[{i}] (function_call): {e}"))?,
            other => return Err(format!("conversations[{i}] has unknown 'from': '{other}'")),
        };
        messages.push(m);
    }
    check_messages(&messages)?;
    Ok(Conversation {
        messages,
        tools: tools_of(obj.get("tools"))?,
    })
}

/// `[<think>..</think>] {"name", "arguments"}`, or a JSON list of such calls
/// (parallel calls, as LLaMA-Factory accepts) -> an assistant message with
/// its tool calls.
fn function_call(value: &str) -> Result<Value, String> {
    let (text, call) = match value.rfind("</think>") {
        Some(i) => (value[..i + "</think>".len()].trim(), value[i + 8..].trim()),
        None => ("", value.trim()),
    };
    let parsed: Value =
        serde_json::from_str(call).map_err(|e| format!("not a JSON function call: {e}"))?;
    let calls = match &parsed {
        Value::Array(list) if list.is_empty() => return Err("an empty list of calls".into()),
        Value::Array(list) => list.iter().collect(),
        one => vec![one],
    };
    let mut tool_calls = Vec::new();
    for (k, c) in calls.into_iter().enumerate() {
        let at = if parsed.is_array() {
            format!("call {k}: ")
        } else {
            String::new()
        };
        let name = c
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{at}function call without a string 'name'"))?;
        let args = match c.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
            Some(v) => v.clone(),
            None => json!({}),
        };
        tool_calls.push(json!({"type": "function", "function": {"name": name, "arguments": args}}));
    }
    Ok(json!({
        "role": "assistant",
        "content": text,
        "tool_calls": tool_calls
    }))
}

/// Byte ranges of tool-call blocks in `text`.
fn tool_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    for (open, close) in [
        ("<tool_call>", "</tool_call>"),
        ("<function", "</function>"),
    ] {
        let mut from = 0;
        while let Some(i) = text[from..].find(open) {
            let start = from + i;
            // An opening without its closing tag (e.g. `<function-name>` in a
            // system prompt's instructions) is not a call.
            let Some(j) = text[start..].find(close) else {
                break;
            };
            let end = start + j + close.len();
            spans.push((start, end));
            from = end;
        }
    }
    spans
}

/// A conversation, its rendering `full`, and how to render others like it:
/// what locates assistant turns in `full` when rendering prefixes does not.
struct Turns<'a> {
    tok: &'a Tokenizer,
    messages: &'a [Value],
    tools: Option<&'a Value>,
    kwargs: &'a Map<String, Value>,
    full: &'a str,
}

impl Turns<'_> {
    fn render(&self, messages: Vec<Value>, generation_prompt: bool) -> Option<String> {
        self.tok
            .apply_chat_template_with(
                &Value::Array(messages),
                self.tools,
                generation_prompt,
                self.kwargs,
            )
            .ok()
    }

    /// The rendering of the first `head` messages and what the generation
    /// prompt `p` (their rendering with one) adds to it.
    fn generation_prompt<'p>(&self, head: usize, p: &'p str) -> Option<(String, &'p str)> {
        let before = self.render(self.messages[..head].to_vec(), false)?;
        let prompt = p.strip_prefix(before.as_str())?;
        Some((before, prompt))
    }

    /// Where, in `full`, assistant turn `i` starts: after its generation
    /// prompt `p` when `full` goes on with it, else after the prompt's first
    /// line, the role header (a template may add more to a generation prompt
    /// than to a past turn, as Qwen3's empty think block without thinking).
    /// When `full` renders the earlier messages otherwise (gpt-oss drops a
    /// tool call's reasoning once a final answer follows), after the header's
    /// first occurrence from `after` (the end of the previous assistant turn)
    /// and the previous message's content on.
    fn start(&self, i: usize, p: &str, after: usize) -> Option<usize> {
        let full = self.full;
        if full.starts_with(p) {
            return Some(p.len());
        }
        let (before, prompt) = self.generation_prompt(i, p)?;
        let header = match prompt.find('\n') {
            Some(k) => &prompt[..=k],
            None => prompt,
        };
        if header.is_empty() {
            return None;
        }
        if let Some(rest) = full.strip_prefix(before.as_str()) {
            return rest
                .starts_with(header)
                .then_some(before.len() + header.len());
        }
        let previous = match i {
            0 => 0,
            _ => self.content_at(i - 1).unwrap_or(0),
        };
        let from = after.max(previous);
        let k = full.get(from..)?.find(header)?;
        Some(from + k + header.len())
    }

    /// The end, in `full`, of assistant turn `i` that starts at `start`:
    /// with a message after it, [`Self::end_before`]; else the first
    /// end-of-turn text at or after `start`, plus that text. The end-of-turn
    /// text is what the template writes after a last assistant reply's
    /// content, found by rendering two one-character replies and keeping
    /// their common ending; `None` when the template writes nothing there
    /// or `full` does not hold it.
    fn end(&self, i: usize, start: usize, p: &str) -> Option<usize> {
        if i + 1 < self.messages.len() {
            return self.end_before(i + 1, start, p);
        }
        let render = |reply: &str| {
            let mut m = self.messages[..i].to_vec();
            m.push(json!({"role": "assistant", "content": reply}));
            self.render(m, false)
        };
        let (x, y) = (render("\u{E000}")?, render("\u{E001}")?);
        let common = x
            .bytes()
            .rev()
            .zip(y.bytes().rev())
            .take_while(|(a, b)| a == b)
            .count();
        let mut cut = x.len() - common;
        while !x.is_char_boundary(cut) {
            cut += 1;
        }
        let end_of_turn = &x[cut..];
        if end_of_turn.trim().is_empty() {
            return None;
        }
        self.full
            .get(start..)?
            .find(end_of_turn)
            .map(|k| start + k + end_of_turn.len())
    }

    /// Where, in `full`, message `next` has its content: the first byte
    /// that changes when that content does (`None` when nothing changes, as
    /// for a message the template leaves out).
    fn content_at(&self, next: usize) -> Option<usize> {
        let mut changed = self.messages.to_vec();
        let sentinel = match changed[next].get("content").and_then(Value::as_str) {
            Some("\u{E000}") => "\u{E001}",
            _ => "\u{E000}",
        };
        changed[next]["content"] = json!(sentinel);
        let (full, other) = (self.full, self.render(changed, false)?);
        let mut at = full
            .bytes()
            .zip(other.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        if at == full.len() && at == other.len() {
            return None;
        }
        while !full.is_char_boundary(at) {
            at -= 1;
        }
        Some(at)
    }

    /// The text each message's header starts with: the first token of the
    /// generation prompt `p` after the first `head` messages, when the
    /// tokenizer holds it as an added token (`<|im_start|>`, `<|start|>`,
    /// `<|start_header_id|>`, `<start_of_turn>`).
    fn header_marker(&self, head: usize, p: &str) -> Option<String> {
        let (_, prompt) = self.generation_prompt(head, p)?;
        let inner = self.tok.inner();
        let enc = inner.encode(prompt, false).ok()?;
        let (&id, &(a, b)) = enc.get_ids().first().zip(enc.get_offsets().first())?;
        let added = inner.get_added_tokens_decoder().contains_key(&id);
        (added && a == 0 && b > 0).then(|| prompt[..b].to_owned())
    }

    /// The end, in `full`, of the assistant turn at `start` that message
    /// `next` follows: the last message header (see
    /// [`Self::header_marker`]) before that message's content. The turn
    /// keeps all the template writes after its reply (`<|im_end|>\n`,
    /// gpt-oss's `<|end|>` or `<|call|>`, and a message of several segments
    /// whole) and the next message's header stays out.
    fn end_before(&self, next: usize, start: usize, p: &str) -> Option<usize> {
        let at = self.content_at(next)?;
        let marker = self.header_marker(next - 1, p)?;
        let k = self.full.get(start..at)?.rfind(marker.as_str())?;
        (k > 0).then_some(start + k)
    }
}

/// Renders and tokenises a conversation with labels on assistant tokens.
pub fn tokenize(tok: &Tokenizer, conv: &Conversation, spec: &DataSpec) -> Result<Sample, String> {
    let tools = conv.tools.as_ref();
    let kw = &spec.chat_template_kwargs;
    let full = tok
        .apply_chat_template_with(&Value::Array(conv.messages.clone()), tools, false, kw)
        .map_err(|e| format!("{e:#}"))?;
    // Byte spans of the assistant turns, by rendering prefixes.
    let mut spans = Vec::new();
    for (i, m) in conv.messages.iter().enumerate() {
        if m.get("role").and_then(Value::as_str) != Some("assistant") {
            continue;
        }
        let head = Value::Array(conv.messages[..i].to_vec());
        let through = Value::Array(conv.messages[..=i].to_vec());
        let p = tok
            .apply_chat_template_with(&head, tools, true, kw)
            .map_err(|e| format!("{e:#}"))?;
        let q = tok
            .apply_chat_template_with(&through, tools, false, kw)
            .map_err(|e| format!("{e:#}"))?;
        let after = spans.last().map_or(0, |&(_, end)| end);
        let span = if q.starts_with(&p) && full.starts_with(&q) {
            Some((p.len(), q.len()))
        } else {
            // A template that renders a turn differently once later turns
            // follow (Qwen3 drops earlier turns' reasoning, and their empty
            // think blocks without thinking; gpt-oss ends the last turn with
            // `<|return|>`, the others with `<|end|>`): the turn is what the
            // whole conversation holds from its role header to its
            // end-of-turn text, or, with a message after it, to that
            // message's header.
            let turns = Turns {
                tok,
                messages: &conv.messages,
                tools,
                kwargs: kw,
                full: &full,
            };
            let start = turns.start(i, &p, after);
            start.and_then(|start| Some((start, turns.end(i, start, &p)?)))
        };
        match span.filter(|&(start, _)| start >= after) {
            Some(span) => spans.push(span),
            None => {
                return Err(format!(
                    "the chat template does not render message {i} as a prefix of the whole \
                     conversation (it rewrites earlier turns), so assistant tokens cannot be located; \
                     set train_on_prompt: true or use a template that renders turns independently"
                ));
            }
        }
    }
    if spec.mask_history {
        spans.drain(..spans.len().saturating_sub(1));
    }
    let enc = tok
        .inner()
        .encode(full.as_str(), false)
        .map_err(|e| format!("tokenizing: {e}"))?;
    let ids = enc.get_ids().to_vec();
    let offsets = enc.get_offsets();
    // Calls only inside assistant turns: a tools system prompt describes the
    // call syntax (`<function-name>`, `<tool_call>` examples) without calling.
    let calls: Vec<(usize, usize)> = spans
        .iter()
        .flat_map(|&(a, b)| {
            tool_spans(&full[a..b])
                .into_iter()
                .map(move |(x, y)| (a + x, a + y))
        })
        .collect();
    let mut labels = Vec::with_capacity(ids.len());
    let mut classes = Vec::with_capacity(ids.len());
    for (k, &id) in ids.iter().enumerate() {
        let (s, e) = offsets[k];
        let trained = spec.train_on_prompt || spans.iter().any(|&(a, b)| s >= a && s < b);
        let class = if !trained {
            TokenClass::Ignored
        } else if calls.iter().any(|&(a, b)| s < b && e > a) {
            TokenClass::ToolCall
        } else {
            TokenClass::Reasoning
        };
        let keep = match (spec.train_on, class) {
            (_, TokenClass::Ignored) => false,
            (TrainOn::All, _) => true,
            (TrainOn::Reasoning, c) => c == TokenClass::Reasoning,
            (TrainOn::ToolCalls, c) => c == TokenClass::ToolCall,
        };
        labels.push(if keep { id as i64 } else { -100 });
        classes.push(class);
    }
    let mut sample = Sample {
        ids,
        labels,
        classes,
        truncated: false,
    };
    if sample.ids.len() > spec.cutoff_len {
        let n = spec.cutoff_len;
        let len = sample.ids.len();
        // Under mask_history the cut keeps the one trained turn whole (as
        // LLaMA-Factory gives the last turn the budget first): a right cut
        // ends with that turn's last token instead, a prefix of earlier turns
        // dropped, unless the turn alone is longer than cutoff_len.
        let trained_end = match spec.mask_history {
            true => sample
                .classes
                .iter()
                .rposition(|&c| c != TokenClass::Ignored),
            false => None,
        };
        let range = match (spec.truncation_side, trained_end) {
            (Side::Right, Some(end)) if end >= n => {
                let first = sample
                    .classes
                    .iter()
                    .position(|&c| c != TokenClass::Ignored);
                let start = (end + 1 - n).min(first.unwrap_or(end));
                start..start + n
            }
            (Side::Right, _) => 0..n,
            (Side::Left, _) => len - n..len,
        };
        sample.ids = sample.ids[range.clone()].to_vec();
        sample.labels = sample.labels[range.clone()].to_vec();
        sample.classes = sample.classes[range].to_vec();
        sample.truncated = true;
    }
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DataSpec {
        let s: DataSpec = serde_json::from_value(json!({})).unwrap();
        assert_eq!(s, DataSpec::default(), "serde defaults and Default agree");
        s
    }

    #[test]
    fn reads_the_three_shapes() {
        let verl =
            json!({"prompt": [{"role": "user", "content": "Q"}], "extra_info": {"answer": "A"}});
        let c = conversation(&verl, &spec()).unwrap();
        assert_eq!(c.messages[1], json!({"role": "assistant", "content": "A"}));
        let top = json!({"prompt": "Q", "answer": "A"});
        assert_eq!(conversation(&top, &spec()).unwrap().messages.len(), 2);
        let sg = json!({"system": "S", "tools": "[{\"name\": \"f\"}]", "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "function_call", "value": "<think>x</think>\n{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}"},
            {"from": "observation", "value": "{\"ok\": true}"},
            {"from": "gpt", "value": "done"}]});
        let c = conversation(&sg, &spec()).unwrap();
        assert_eq!(c.messages[0]["role"], "system");
        assert_eq!(c.messages[2]["content"], "<think>x</think>");
        assert_eq!(
            c.messages[2]["tool_calls"][0]["function"]["arguments"],
            json!({"a": 1})
        );
        assert_eq!(c.messages[3]["role"], "tool");
        assert_eq!(
            c.tools,
            Some(json!([{"type": "function", "function": {"name": "f"}}]))
        );
        // Parallel calls: a JSON list.
        let par = json!({"conversations": [
            {"from": "human", "value": "hi"},
            {"from": "function_call", "value": "[{\"name\": \"f\", \"arguments\": {\"a\": 1}}, {\"name\": \"g\"}]"},
            {"from": "observation", "value": "[1, 2]"},
            {"from": "gpt", "value": "done"}]});
        let c = conversation(&par, &spec()).unwrap();
        let calls = c.messages[1]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1]["function"], json!({"name": "g", "arguments": {}}));
        let bad = json!({"conversations": [
            {"from": "human", "value": "hi"},
            {"from": "function_call", "value": "[{\"name\": \"f\"}, {\"x\": 1}]"}]});
        let e = conversation(&bad, &spec()).unwrap_err();
        assert!(
            e.contains("call 1: function call without a string 'name'"),
            "{e}"
        );
        let e = conversation(&json!({"x": 1}), &spec()).unwrap_err();
        assert!(e.contains("none of 'conversations'"), "{e}");
        let e = conversation(&json!({"prompt": "Q"}), &spec()).unwrap_err();
        assert!(e.contains("no response"), "{e}");
    }

    #[test]
    fn reads_alpaca_rows_as_llamafactory() {
        let row = json!({"instruction": "Add.", "input": "2 + 3", "output": "5",
            "system": "Be brief.", "history": [["Hi", "Hello"]]});
        let c = conversation(&row, &spec()).unwrap();
        assert_eq!(
            c.messages,
            vec![
                json!({"role": "system", "content": "Be brief."}),
                json!({"role": "user", "content": "Hi"}),
                json!({"role": "assistant", "content": "Hello"}),
                json!({"role": "user", "content": "Add.\n2 + 3"}),
                json!({"role": "assistant", "content": "5"}),
            ]
        );
        let plain = json!({"instruction": "Say hi.", "input": "", "output": "hi"});
        let c = conversation(&plain, &spec()).unwrap();
        assert_eq!(c.messages[0], json!({"role": "user", "content": "Say hi."}));
        assert_eq!(c.messages.len(), 2);
        let bad = json!({"instruction": "x", "output": "y", "history": [["only one"]]});
        let e = conversation(&bad, &spec()).unwrap_err();
        assert!(
            e.contains("history[0] is not a [query, response] pair"),
            "{e}"
        );
        let bad = json!({"instruction": "x", "output": 5});
        let e = conversation(&bad, &spec()).unwrap_err();
        assert!(e.contains("'output' is not a string"), "{e}");
    }

    #[test]
    fn tool_spans_cover_blocks() {
        let t = "a<tool_call>\n{}\n</tool_call>b<function=f>x</function>";
        let s = tool_spans(t);
        assert_eq!(s.len(), 2);
        assert!(tool_spans("say <function-name> then stop").is_empty());
        assert_eq!(&t[s[0].0..s[0].1], "<tool_call>\n{}\n</tool_call>");
        assert_eq!(&t[s[1].0..s[1].1], "<function=f>x</function>");
    }
}
