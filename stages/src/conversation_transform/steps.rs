//! The transform steps, as pure functions of one conversation.
//!
//! Each step either returns the conversation (possibly changed, with the
//! number of turns it changed) or drops it with a reason.

use serde_json::{Map, Value, json};

use super::schema::{Repair, ToolSet};

/// One ShareGPT turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// `human`, `gpt`, `function_call`, `observation` (or `system`).
    pub from: String,
    /// The text.
    pub value: String,
}

impl Turn {
    /// A turn.
    pub fn new(from: &str, value: impl Into<String>) -> Turn {
        Turn {
            from: from.to_owned(),
            value: value.into(),
        }
    }
}

/// A conversation: its turns, system prompt and every other field of the record.
#[derive(Debug, Clone, PartialEq)]
pub struct Conv {
    /// The turns (`conversations`).
    pub turns: Vec<Turn>,
    /// `system` ("" when absent).
    pub system: String,
    /// The record as read, `conversations` and `system` included (rewritten on output).
    pub record: Map<String, Value>,
}

/// What a step did to one conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Kept, with this many turns changed (added, removed or rewritten).
    Kept(u64),
    /// Dropped for this reason.
    Dropped(&'static str),
}

/// Python's `json.dumps(v, ensure_ascii=False)`: `", "` and `": "` separators.
pub fn py_json(v: &Value) -> String {
    let mut out = String::new();
    write_py(v, &mut out);
    out
}

fn write_py(v: &Value, out: &mut String) {
    match v {
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_py(x, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// Splits `[<think>...</think>] rest` into the leading think block (if any) and the rest.
pub fn split_think(value: &str) -> (Option<&str>, &str) {
    let t = value.trim_start();
    if t.starts_with(THINK_OPEN)
        && let Some(i) = t.find(THINK_CLOSE)
    {
        let end = i + THINK_CLOSE.len();
        return (Some(&t[..end]), t[end..].trim_start());
    }
    (None, value)
}

/// Removes every closed `<think>...</think>` span and trims.
pub fn strip_think(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find(THINK_OPEN) {
        match rest[i..].find(THINK_CLOSE) {
            Some(j) => {
                out.push_str(&rest[..i]);
                rest = &rest[i + j + THINK_CLOSE.len()..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.trim().to_owned()
}

/// The arguments of a call, as an object: parsed from a string when given as
/// one, with single quotes turned into double quotes (and Python's `True`,
/// `False`, `None`) for `{...}` strings that are not JSON; `{}` otherwise.
/// The flag says whether anything had to be changed.
pub fn fix_args(args: Option<&Value>) -> (Value, bool) {
    match args {
        Some(Value::Object(_)) => (args.cloned().unwrap_or_default(), false),
        Some(Value::String(s)) => {
            let t = s.trim();
            if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(t) {
                return (v, true);
            }
            if t.starts_with('{') && t.ends_with('}') {
                let swapped = t
                    .replace('\'', "\"")
                    .replace(": True", ": true")
                    .replace(": False", ": false")
                    .replace(": None", ": null");
                if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(&swapped) {
                    return (v, true);
                }
            }
            (json!({}), true)
        }
        None | Some(Value::Null) => (json!({}), args.is_some()),
        Some(_) => (json!({}), true),
    }
}

/// A parsed `function_call` value: the leading think block and the call.
pub fn parse_call(value: &str) -> Option<(Option<&str>, Map<String, Value>)> {
    let (think, rest) = split_think(value);
    match serde_json::from_str::<Value>(rest.trim()) {
        Ok(Value::Object(m)) if m.get("name").is_some_and(Value::is_string) => Some((think, m)),
        _ => None,
    }
}

fn with_think(think: Option<&str>, body: &str) -> String {
    match think {
        Some(t) => format!("{t}\n{body}"),
        None => body.to_owned(),
    }
}

/// `fix_arguments`: string arguments become objects; conversations with
/// `<tool_` or `\n[{` in any value are dropped.
pub fn fix_arguments(c: &mut Conv) -> Outcome {
    if c.turns
        .iter()
        .any(|t| t.value.contains("<tool_") || t.value.contains("\n[{"))
    {
        return Outcome::Dropped("tool_markup_in_text");
    }
    let mut changed = 0;
    for t in &mut c.turns {
        if t.from != "function_call" {
            continue;
        }
        let Some((think, mut call)) = parse_call(&t.value) else {
            return Outcome::Dropped("function_call_not_json");
        };
        let (args, fixed) = fix_args(call.get("arguments"));
        if fixed {
            call.insert("arguments".into(), args);
            t.value = with_think(think, &py_json(&Value::Object(call)));
            changed += 1;
        }
    }
    Outcome::Kept(changed)
}

/// `to_hermes`: function calls become assistant turns with a `<tool_call>`
/// block (after their think block), observations become user turns.
pub fn to_hermes(c: &mut Conv) -> Outcome {
    let mut changed = 0;
    for t in &mut c.turns {
        match t.from.as_str() {
            "function_call" => {
                let Some((think, call)) = parse_call(&t.value) else {
                    return Outcome::Dropped("function_call_not_json");
                };
                let name = call.get("name").cloned().unwrap_or_default();
                let (args, _) = fix_args(call.get("arguments"));
                let body = py_json(&json!({"name": name, "arguments": args}));
                t.value = with_think(think, &format!("<tool_call>\n{body}\n</tool_call>"));
                t.from = "gpt".into();
                changed += 1;
            }
            "observation" => {
                t.from = "human".into();
                changed += 1;
            }
            _ => {}
        }
    }
    Outcome::Kept(changed)
}

/// Byte ranges of the JSON inside each `<tool_call>...</tool_call>` of `text`.
pub fn tool_call_bodies(text: &str) -> Vec<std::ops::Range<usize>> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(OPEN) {
        let start = from + i + OPEN.len();
        let Some(j) = text[start..].find(CLOSE) else {
            break;
        };
        out.push(start..start + j);
        from = start + j + CLOSE.len();
    }
    out
}

/// `validate_tool_calls`: every call (a `function_call` turn or a
/// `<tool_call>` block) is checked against the tools of the conversation's
/// domain, after the declared id repairs; any invalid call drops the
/// conversation.
pub fn validate_tool_calls(c: &mut Conv, tools: &ToolSet, repairs: &[Repair]) -> Outcome {
    let Some(domain) = tools.domain_of(&c.system) else {
        return Outcome::Dropped("unknown_domain");
    };
    let mut changed = 0;
    for t in &mut c.turns {
        if t.from == "function_call" {
            let Some((think, mut call)) = parse_call(&t.value) else {
                return Outcome::Dropped("function_call_not_json");
            };
            match tools.check(domain, &mut call, repairs) {
                Err(reason) => return Outcome::Dropped(reason),
                Ok(false) => {}
                Ok(true) => {
                    t.value = with_think(think, &py_json(&Value::Object(call)));
                    changed += 1;
                }
            }
        } else if t.from == "gpt" {
            let bodies = tool_call_bodies(&t.value);
            if bodies.is_empty() {
                continue;
            }
            let mut rebuilt = String::new();
            let mut last = 0;
            let mut repaired = false;
            for r in bodies {
                let Ok(Value::Object(mut call)) =
                    serde_json::from_str::<Value>(t.value[r.clone()].trim())
                else {
                    return Outcome::Dropped("tool_call_not_json");
                };
                if !call.get("name").is_some_and(Value::is_string) {
                    return Outcome::Dropped("tool_call_not_json");
                }
                match tools.check(domain, &mut call, repairs) {
                    Err(reason) => return Outcome::Dropped(reason),
                    Ok(fixed) => {
                        rebuilt.push_str(&t.value[last..r.start]);
                        if fixed {
                            repaired = true;
                            rebuilt.push('\n');
                            rebuilt.push_str(&py_json(&Value::Object(call)));
                            rebuilt.push('\n');
                        } else {
                            rebuilt.push_str(&t.value[r.clone()]);
                        }
                        last = r.end;
                    }
                }
            }
            if repaired {
                rebuilt.push_str(&t.value[last..]);
                t.value = rebuilt;
                changed += 1;
            }
        }
    }
    Outcome::Kept(changed)
}

/// `drop_think`: assistant turns that are only think blocks go, think spans
/// elsewhere are removed, and with `insert_call_text` a call with no text
/// before it gets `I will call the function {name}.`.
pub fn drop_think(c: &mut Conv, insert_call_text: bool) -> Outcome {
    let before = c.turns.len();
    let mut changed = 0;
    let mut kept = Vec::with_capacity(before);
    for mut t in std::mem::take(&mut c.turns) {
        let is_assistant = t.from == "gpt" || t.from == "function_call";
        if is_assistant && t.value.contains(THINK_OPEN) {
            let stripped = strip_think(&t.value);
            if stripped.is_empty() {
                continue;
            }
            if stripped != t.value {
                t.value = stripped;
                changed += 1;
            }
        }
        if insert_call_text && t.from == "gpt" && t.value.trim_start().starts_with("<tool_call>") {
            let name = tool_call_bodies(&t.value)
                .first()
                .and_then(|r| serde_json::from_str::<Value>(t.value[r.clone()].trim()).ok())
                .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_owned));
            if let Some(name) = name {
                t.value = format!("I will call the function {name}.\n{}", t.value.trim_start());
                changed += 1;
            }
        }
        kept.push(t);
    }
    changed += (before - kept.len()) as u64;
    c.turns = kept;
    Outcome::Kept(changed)
}

/// `set_system_prompt`: the system prompt replaced by the text of the first
/// `(domain, text)` whose domain the current prompt mentions
/// (case-insensitive). Without a match: dropped when `drop_unknown`, else
/// kept as is (`None` then, so the caller can count it).
pub fn set_system_prompt(
    c: &mut Conv,
    prompts: &[(String, String)],
    drop_unknown: bool,
) -> Option<Outcome> {
    match super::schema::domain_index(&c.system, prompts.iter().map(|(d, _)| d.as_str())) {
        Some(i) if c.system == prompts[i].1 => Some(Outcome::Kept(0)),
        Some(i) => {
            c.system = prompts[i].1.clone();
            Some(Outcome::Kept(1))
        }
        None if drop_unknown => Some(Outcome::Dropped("unknown_domain")),
        None => None,
    }
}

/// `merge_consecutive`: neighbouring turns from the same role are joined
/// with `\n` (function calls excepted: each is one call).
pub fn merge_consecutive(c: &mut Conv) -> Outcome {
    let before = c.turns.len();
    let mut out: Vec<Turn> = Vec::with_capacity(before);
    for t in std::mem::take(&mut c.turns) {
        match out.last_mut() {
            Some(prev) if prev.from == t.from && t.from != "function_call" => {
                prev.value.push('\n');
                prev.value.push_str(&t.value);
            }
            _ => out.push(t),
        }
    }
    let merged = (before - out.len()) as u64;
    c.turns = out;
    Outcome::Kept(merged)
}

/// `trim_trailing_user`: final user (and tool result) turns are dropped so
/// the conversation ends with the assistant.
pub fn trim_trailing_user(c: &mut Conv) -> Outcome {
    let before = c.turns.len();
    while c
        .turns
        .last()
        .is_some_and(|t| t.from == "human" || t.from == "observation")
    {
        c.turns.pop();
    }
    if c.turns.is_empty() {
        return Outcome::Dropped("no_assistant_turn");
    }
    Outcome::Kept((before - c.turns.len()) as u64)
}

/// Why `turns` break LLaMA-Factory's ShareGPT rule (user/observation at even
/// positions, assistant/function call at odd ones, an even count, no empty
/// value), if they do.
pub fn alternation_error(turns: &[Turn]) -> Option<&'static str> {
    if turns.is_empty() {
        return Some("empty");
    }
    if turns[0].from != "human" {
        return Some("first_turn_not_human");
    }
    for (i, t) in turns.iter().enumerate() {
        if t.value.trim().is_empty() {
            return Some("empty_value");
        }
        let ok = if i % 2 == 0 {
            t.from == "human" || t.from == "observation"
        } else {
            t.from == "gpt" || t.from == "function_call"
        };
        if !ok {
            return Some("roles_do_not_alternate");
        }
    }
    if turns.len() % 2 == 1 {
        return Some("ends_with_user");
    }
    None
}

/// `validate`: LLaMA-Factory's ShareGPT rule; a conversation that breaks it is dropped.
pub fn validate(c: &mut Conv) -> Outcome {
    match alternation_error(&c.turns) {
        Some(reason) => Outcome::Dropped(reason),
        None => Outcome::Kept(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(turns: &[(&str, &str)]) -> Conv {
        Conv {
            turns: turns.iter().map(|(f, v)| Turn::new(f, *v)).collect(),
            system: "# Retail agent policy".into(),
            record: Map::new(),
        }
    }

    fn turns(c: &Conv) -> Vec<(&str, &str)> {
        c.turns
            .iter()
            .map(|t| (t.from.as_str(), t.value.as_str()))
            .collect()
    }

    #[test]
    fn python_json_spacing_and_unicode() {
        let v: Value = serde_json::from_str(r#"{"a": [1, {"b": "café"}], "c": null}"#).unwrap();
        assert_eq!(py_json(&v), r#"{"a": [1, {"b": "café"}], "c": null}"#);
        assert_eq!(py_json(&json!("q\"x")), r#""q\"x""#);
    }

    #[test]
    fn arguments_are_repaired_or_emptied() {
        let cases = [
            (json!({"a": 1}), json!({"a": 1}), false),
            (json!("{\"a\": 1}"), json!({"a": 1}), true),
            (
                json!("{'order_id': '#W1', 'ok': True}"),
                json!({"order_id": "#W1", "ok": true}),
                true,
            ),
            (json!("order_id=#W1"), json!({}), true),
            (json!("{'broken': }"), json!({}), true),
            (json!([1]), json!({}), true),
        ];
        for (input, want, fixed) in cases {
            assert_eq!(fix_args(Some(&input)), (want, fixed), "{input}");
        }
        assert_eq!(fix_args(None), (json!({}), false));
    }

    #[test]
    fn fix_arguments_golden() {
        let mut c = conv(&[
            ("human", "Where is my order #W2378156?"),
            (
                "function_call",
                "<think>\nLook it up.\n</think>\n{\"name\": \"get_order_details\", \"arguments\": \"{'order_id': '#W2378156'}\"}",
            ),
            ("observation", "{\"status\": \"delivered\"}"),
            (
                "function_call",
                "{\"name\": \"get_product_details\", \"arguments\": {\"product_id\": \"6086499569\"}}",
            ),
        ]);
        assert_eq!(fix_arguments(&mut c), Outcome::Kept(1));
        assert_eq!(
            c.turns[1].value,
            "<think>\nLook it up.\n</think>\n{\"name\": \"get_order_details\", \"arguments\": {\"order_id\": \"#W2378156\"}}"
        );
        assert_eq!(
            c.turns[3].value,
            "{\"name\": \"get_product_details\", \"arguments\": {\"product_id\": \"6086499569\"}}",
            "untouched"
        );
        let mut bad = conv(&[("human", "hi"), ("gpt", "<tool_call>{}</tool_call>")]);
        assert_eq!(
            fix_arguments(&mut bad),
            Outcome::Dropped("tool_markup_in_text")
        );
        let mut list = conv(&[("human", "hi"), ("gpt", "Results:\n[{\"a\": 1}]")]);
        assert_eq!(
            fix_arguments(&mut list),
            Outcome::Dropped("tool_markup_in_text")
        );
        let mut nojson = conv(&[("human", "hi"), ("function_call", "call it")]);
        assert_eq!(
            fix_arguments(&mut nojson),
            Outcome::Dropped("function_call_not_json")
        );
    }

    #[test]
    fn to_hermes_golden() {
        let mut c = conv(&[
            ("human", "Cancel 8JX2WO"),
            (
                "function_call",
                "<think>Check first.</think>\n{\"name\": \"cancel_reservation\", \"arguments\": {\"reservation_id\": \"8JX2WO\"}}",
            ),
            ("observation", "{\"ok\": true}"),
            ("gpt", "Done."),
        ]);
        assert_eq!(to_hermes(&mut c), Outcome::Kept(2));
        assert_eq!(
            turns(&c),
            [
                ("human", "Cancel 8JX2WO"),
                (
                    "gpt",
                    "<think>Check first.</think>\n<tool_call>\n{\"name\": \"cancel_reservation\", \"arguments\": {\"reservation_id\": \"8JX2WO\"}}\n</tool_call>"
                ),
                ("human", "{\"ok\": true}"),
                ("gpt", "Done."),
            ]
        );
    }

    #[test]
    fn drop_think_golden() {
        let mut c = conv(&[
            ("human", "hi"),
            ("gpt", "<think>only thinking</think>"),
            ("gpt", "<think>plan</think>Sure, one moment."),
            (
                "gpt",
                "<tool_call>\n{\"name\": \"get_order_details\", \"arguments\": {}}\n</tool_call>",
            ),
            ("human", "<think>users keep theirs</think> ok"),
        ]);
        assert_eq!(drop_think(&mut c, true), Outcome::Kept(3));
        assert_eq!(
            turns(&c),
            [
                ("human", "hi"),
                ("gpt", "Sure, one moment."),
                (
                    "gpt",
                    "I will call the function get_order_details.\n<tool_call>\n{\"name\": \"get_order_details\", \"arguments\": {}}\n</tool_call>"
                ),
                ("human", "<think>users keep theirs</think> ok"),
            ]
        );
        let mut unclosed = conv(&[("human", "hi"), ("gpt", "<think>never closed")]);
        assert_eq!(drop_think(&mut unclosed, false), Outcome::Kept(0));
    }

    #[test]
    fn merge_and_trim_golden() {
        let mut c = conv(&[
            ("human", "a"),
            ("human", "b"),
            ("gpt", "c"),
            ("gpt", "d"),
            ("function_call", "{\"name\": \"x\"}"),
            ("function_call", "{\"name\": \"y\"}"),
            ("observation", "1"),
            ("observation", "2"),
            ("gpt", "e"),
            ("human", "thanks"),
            ("human", "bye"),
        ]);
        assert_eq!(merge_consecutive(&mut c), Outcome::Kept(4));
        assert_eq!(
            turns(&c),
            [
                ("human", "a\nb"),
                ("gpt", "c\nd"),
                ("function_call", "{\"name\": \"x\"}"),
                ("function_call", "{\"name\": \"y\"}"),
                ("observation", "1\n2"),
                ("gpt", "e"),
                ("human", "thanks\nbye"),
            ]
        );
        assert_eq!(trim_trailing_user(&mut c), Outcome::Kept(1));
        assert_eq!(c.turns.last().unwrap().value, "e");
        let mut only_user = conv(&[("human", "hello?")]);
        assert_eq!(
            trim_trailing_user(&mut only_user),
            Outcome::Dropped("no_assistant_turn")
        );
    }

    #[test]
    fn alternation_rule() {
        let ok = conv(&[
            ("human", "a"),
            ("function_call", "f"),
            ("observation", "o"),
            ("gpt", "b"),
        ]);
        assert_eq!(alternation_error(&ok.turns), None);
        for (t, why) in [
            (vec![("gpt", "a"), ("human", "b")], "first_turn_not_human"),
            (
                vec![("human", "a"), ("human", "b")],
                "roles_do_not_alternate",
            ),
            (
                vec![("human", "a"), ("gpt", "b"), ("human", "c")],
                "ends_with_user",
            ),
            (vec![("human", "a"), ("gpt", " ")], "empty_value"),
        ] {
            assert_eq!(alternation_error(&conv(&t).turns), Some(why));
        }
        assert_eq!(alternation_error(&[]), Some("empty"));
    }

    #[test]
    fn validate_tool_calls_golden() {
        let tools = ToolSet::from_json(&json!({"retail": [{"name": "get_order_details",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"]}}]}))
        .unwrap();
        let repairs = [Repair {
            key: "order_id".into(),
            prefix: "#".into(),
        }];
        // A hermes call whose id lacks its prefix: repaired in place, text around kept.
        let mut c = conv(&[
            ("human", "status of W2378156?"),
            (
                "gpt",
                "Let me check.\n<tool_call>\n{\"name\": \"get_order_details\", \"arguments\": {\"order_id\": \"W2378156\"}}\n</tool_call>",
            ),
            ("human", "{\"status\": \"pending\"}"),
            ("gpt", "It is pending."),
        ]);
        assert_eq!(
            validate_tool_calls(&mut c, &tools, &repairs),
            Outcome::Kept(1)
        );
        assert_eq!(
            c.turns[1].value,
            "Let me check.\n<tool_call>\n{\"name\": \"get_order_details\", \"arguments\": {\"order_id\": \"#W2378156\"}}\n</tool_call>"
        );
        // Without the repair rule the same call is still valid JSON-wise: a string.
        let mut c2 = c.clone();
        assert_eq!(validate_tool_calls(&mut c2, &tools, &[]), Outcome::Kept(0));
        // function_call turns are checked too.
        let mut f = conv(&[
            ("human", "hi"),
            (
                "function_call",
                "{\"name\": \"get_order_details\", \"arguments\": {}}",
            ),
        ]);
        assert_eq!(
            validate_tool_calls(&mut f, &tools, &repairs),
            Outcome::Dropped("missing_required_argument")
        );
        let mut unknown = conv(&[
            ("human", "hi"),
            (
                "gpt",
                "<tool_call>\n{\"name\": \"refund_everything\", \"arguments\": {}}\n</tool_call>",
            ),
        ]);
        assert_eq!(
            validate_tool_calls(&mut unknown, &tools, &repairs),
            Outcome::Dropped("unknown_tool")
        );
        let mut broken = conv(&[("human", "hi"), ("gpt", "<tool_call>\n{oops\n</tool_call>")]);
        assert_eq!(
            validate_tool_calls(&mut broken, &tools, &repairs),
            Outcome::Dropped("tool_call_not_json")
        );
        let mut other = c.clone();
        other.system = "You are a telecom agent".into();
        assert_eq!(
            validate_tool_calls(&mut other, &tools, &repairs),
            Outcome::Dropped("unknown_domain")
        );
    }

    #[test]
    fn set_system_prompt_golden() {
        let prompts = vec![
            (
                "airline".to_owned(),
                "You are an airline agent. Full policy.".to_owned(),
            ),
            (
                "retail".to_owned(),
                "You are a retail agent. Full policy.".to_owned(),
            ),
        ];
        let mut c = conv(&[("human", "hi"), ("gpt", "hello")]);
        c.system = "# Retail Agent Policy (short)".into();
        assert_eq!(
            set_system_prompt(&mut c, &prompts, false),
            Some(Outcome::Kept(1))
        );
        assert_eq!(c.system, "You are a retail agent. Full policy.");
        assert_eq!(
            set_system_prompt(&mut c, &prompts, false),
            Some(Outcome::Kept(0))
        );
        c.system = "Telecom support".into();
        assert_eq!(set_system_prompt(&mut c, &prompts, false), None);
        assert_eq!(c.system, "Telecom support");
        assert_eq!(
            set_system_prompt(&mut c, &prompts, true),
            Some(Outcome::Dropped("unknown_domain"))
        );
    }
}
