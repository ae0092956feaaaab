//! Kind `agent_samples`: search-agent traces -> SFT samples (verl schema).
//!
//! Input: JSONL, one `{"question", "trace": [step, ...]}` per line, with steps of
//! type `reasoning` (`content`), `search` (`query`), `search_result`
//! (`documents: [{title, content}]`), `CorrectAnswer` (`content`), or any other
//! type `t` (`content`).
//!
//! - `mode: per_step`: one sample per `search_result` step k: the prompt is the
//!   question and every step up to and including it, the answer the steps up to
//!   the next `search_result` (or the end).
//! - `mode: multiturn`: steps grouped into assistant turns (reasoning, then a
//!   search or an answer; a `search_result` or `CorrectAnswer` closes a turn), as
//!   a conversation in which the tool results are user messages. One sample per
//!   assistant turn that follows only closed search turns: the conversation so
//!   far is the prompt, that turn the answer. The `<think>` block of a turn is
//!   dropped with probability `think_drop_prob`, drawn deterministically from
//!   `seed`, the question and the turn index, so reruns give identical bytes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::lines::{LineOut, map_lines};
use crate::params::{self, OnError};
use crate::sink::Sink;
use crate::{ConfigError, KeySpec, Stage, StageContext};

/// The `agent_samples` kind.
pub struct AgentSamples;

/// How traces become samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One sample per search result.
    PerStep,
    /// Conversations, one sample per assistant turn.
    Multiturn,
}

/// Params of `agent_samples`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// `per_step` or `multiturn`.
    pub mode: Mode,
    /// Probability of dropping a turn's `<think>` block (multiturn).
    #[serde(default = "default_drop")]
    pub think_drop_prob: f64,
    /// Seed of the think-drop draws (multiturn).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `data_source` of every record.
    #[serde(default = "default_source")]
    pub data_source: String,
    /// `ability` of every record.
    #[serde(default = "default_ability")]
    pub ability: String,
    /// `fail` (default) or `skip` on a malformed trace.
    #[serde(default)]
    pub on_error: OnError,
}

impl params::Validate for Params {
    fn validate(&self) -> Result<(), ConfigError> {
        if (0.0..=1.0).contains(&self.think_drop_prob) {
            Ok(())
        } else {
            Err(ConfigError {
                key: "params.think_drop_prob".into(),
                message: format!(
                    "think_drop_prob must be between 0 and 1, got {}",
                    self.think_drop_prob
                ),
            })
        }
    }
}

fn default_drop() -> f64 {
    0.3
}
fn default_seed() -> u64 {
    42
}
fn default_source() -> String {
    "search_r1".into()
}
fn default_ability() -> String {
    "search_reasoning".into()
}

/// One trace as read.
#[derive(Debug, Deserialize)]
pub struct Trace<'a> {
    /// The question.
    #[serde(borrow)]
    pub question: Cow<'a, str>,
    /// Its steps.
    #[serde(borrow)]
    pub trace: Vec<Step<'a>>,
}

/// One step as read. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub struct Step<'a> {
    /// `reasoning`, `search`, `search_result`, `CorrectAnswer`, or another type.
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// Text of reasoning, answers and other types.
    #[serde(default, borrow)]
    pub content: Option<Cow<'a, str>>,
    /// The query of a search.
    #[serde(default, borrow)]
    pub query: Option<Cow<'a, str>>,
    /// The documents of a search result.
    #[serde(default, borrow)]
    pub documents: Option<Vec<Doc<'a>>>,
}

/// A retrieved document.
#[derive(Debug, Deserialize)]
pub struct Doc<'a> {
    /// Title.
    #[serde(borrow, default)]
    pub title: Cow<'a, str>,
    /// Text.
    #[serde(borrow, default)]
    pub content: Cow<'a, str>,
}

impl Step<'_> {
    fn field(&self, i: usize, name: &str, v: &Option<Cow<'_, str>>) -> Result<(), String> {
        match v {
            Some(_) => Ok(()),
            None => Err(format!("step {i} ({}) has no `{name}`", self.kind)),
        }
    }

    fn check(&self, i: usize) -> Result<(), String> {
        match self.kind.as_ref() {
            "search" => self.field(i, "query", &self.query),
            "search_result" => match self.documents {
                Some(_) => Ok(()),
                None => Err(format!("step {i} (search_result) has no `documents`")),
            },
            _ => self.field(i, "content", &self.content),
        }
    }
}

/// Renders one step exactly as the training data expects it.
pub fn render_step(step: &Step, out: &mut String) {
    let text = |v: &Option<Cow<str>>| v.as_deref().unwrap_or("").to_owned();
    match step.kind.as_ref() {
        "reasoning" => wrap(out, "think", &text(&step.content)),
        "search" => wrap(out, "search", &text(&step.query)),
        "CorrectAnswer" => wrap(out, "answer", &text(&step.content)),
        "search_result" => render_documents(step.documents.as_deref().unwrap_or(&[]), out),
        other => wrap(out, other, &text(&step.content)),
    }
}

fn wrap(out: &mut String, tag: &str, body: &str) {
    out.push('<');
    out.push_str(tag);
    out.push_str(">\n");
    out.push_str(body);
    out.push_str("\n</");
    out.push_str(tag);
    out.push('>');
}

/// `<information>` block of a search result.
pub fn render_documents(docs: &[Doc], out: &mut String) {
    out.push_str("<information>\n");
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("\n\n");
        }
        out.push_str("Document ");
        out.push_str(&(i + 1).to_string());
        out.push_str(":\nTitle: ");
        out.push_str(&d.title);
        out.push_str("\nContent: ");
        out.push_str(&d.content);
    }
    out.push_str("\n</information>");
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct TurnInfo<'a> {
    question: &'a str,
    split_index: usize,
    total_splits: usize,
    turn_index: usize,
    num_assistant_turns: usize,
}

#[derive(Serialize)]
struct TurnRecord<'a> {
    data_source: &'a str,
    prompt: Vec<Message<'a>>,
    ability: &'a str,
    answer: &'a str,
    extra_info: TurnInfo<'a>,
}

fn push_record<T: Serialize>(out: &mut LineOut, rec: &T) -> Result<(), String> {
    serde_json::to_writer(&mut *out.out, rec).map_err(|e| e.to_string())?;
    out.out.push(b'\n');
    out.rows += 1;
    Ok(())
}

/// Appends `s` JSON-escaped, without quotes. Escaping is per character, so the
/// escaping of a concatenation is the concatenation of the escapings.
fn escape_into(s: &str, out: &mut Vec<u8>, tmp: &mut Vec<u8>) -> Result<(), String> {
    tmp.clear();
    serde_json::to_writer(&mut *tmp, s).map_err(|e| e.to_string())?;
    out.extend_from_slice(&tmp[1..tmp.len() - 1]);
    Ok(())
}

/// Per-step samples, written straight as JSON lines: every step is rendered and
/// escaped once, and each sample's prompt (which repeats the earlier context) is
/// assembled from those escaped pieces.
fn per_step(trace: &Trace, p: &Params, out: &mut LineOut) -> Result<(), String> {
    let results: Vec<usize> = (0..trace.trace.len())
        .filter(|&i| trace.trace[i].kind == "search_result")
        .collect();
    if results.is_empty() {
        return Ok(());
    }
    let (mut tmp, mut text) = (Vec::new(), String::new());
    let mut steps = Vec::new();
    let mut ranges = Vec::with_capacity(trace.trace.len());
    for step in &trace.trace {
        text.clear();
        render_step(step, &mut text);
        let start = steps.len();
        escape_into(&text, &mut steps, &mut tmp)?;
        ranges.push(start..steps.len());
    }
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    head.extend_from_slice(b"{\"data_source\":\"");
    escape_into(&p.data_source, &mut head, &mut tmp)?;
    head.extend_from_slice(b"\",\"prompt\":[{\"role\":\"user\",\"content\":\"");
    tail.extend_from_slice(b"\"}],\"ability\":\"");
    escape_into(&p.ability, &mut tail, &mut tmp)?;
    tail.extend_from_slice(b"\",\"extra_info\":{\"question\":\"");
    // The prompt: "Question: {q}" and every step so far, joined by blank lines.
    let mut context = Vec::new();
    escape_into("Question: ", &mut context, &mut tmp)?;
    escape_into(&trace.question, &mut context, &mut tmp)?;
    let mut next = 0;
    for (k, &s) in results.iter().enumerate() {
        for r in &ranges[next..=s] {
            context.extend_from_slice(b"\\n\\n");
            context.extend_from_slice(&steps[r.clone()]);
        }
        next = s + 1;
        let end = results.get(k + 1).copied().unwrap_or(trace.trace.len());
        if end <= next {
            continue;
        }
        let o = &mut *out.out;
        o.extend_from_slice(&head);
        o.extend_from_slice(&context);
        o.extend_from_slice(&tail);
        o.extend_from_slice(&context);
        o.extend_from_slice(b"\",\"answer\":\"");
        for (i, r) in ranges[next..end].iter().enumerate() {
            if i > 0 {
                o.extend_from_slice(b"\\n\\n");
            }
            o.extend_from_slice(&steps[r.clone()]);
        }
        o.extend_from_slice(
            format!(
                "\",\"split_index\":{k},\"total_splits\":{}}}}}\n",
                results.len()
            )
            .as_bytes(),
        );
        out.rows += 1;
    }
    Ok(())
}

/// One assistant turn of a multiturn conversation.
#[derive(Default)]
pub struct Turn {
    reasoning: Vec<String>,
    parts: Vec<String>,
    result: Option<String>,
}

impl Turn {
    fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.parts.is_empty() && self.result.is_none()
    }

    /// The assistant's text; `think` says whether its reasoning is kept.
    pub fn text(&self, think: bool) -> String {
        let mut blocks = Vec::new();
        if think && !self.reasoning.is_empty() {
            let mut s = String::new();
            wrap(&mut s, "think", &self.reasoning.join("\n"));
            blocks.push(s);
        }
        blocks.extend(self.parts.iter().cloned());
        blocks.join("\n\n").trim().to_owned()
    }
}

/// Groups a trace's steps into turns.
pub fn turns(trace: &Trace) -> Vec<Turn> {
    let mut turns = Vec::new();
    let mut cur = Turn::default();
    for step in &trace.trace {
        let content = step.content.as_deref().unwrap_or("");
        match step.kind.as_ref() {
            "reasoning" => cur.reasoning.push(content.to_owned()),
            "search" => {
                let mut s = String::new();
                wrap(&mut s, "search", step.query.as_deref().unwrap_or(""));
                cur.parts.push(s);
            }
            "search_result" => {
                let mut s = String::new();
                render_documents(step.documents.as_deref().unwrap_or(&[]), &mut s);
                cur.result = Some(s);
                turns.push(std::mem::take(&mut cur));
            }
            "CorrectAnswer" => {
                let mut s = String::new();
                wrap(&mut s, "answer", content);
                cur.parts.push(s);
                turns.push(std::mem::take(&mut cur));
            }
            other => {
                let mut s = String::new();
                wrap(&mut s, other, content);
                cur.parts.push(s);
            }
        }
    }
    if !cur.is_empty() {
        turns.push(cur);
    }
    turns
}

/// Whether turn `turn` of the trace with `question` keeps its `<think>` block.
pub fn keep_think(seed: u64, question: &str, turn: usize, drop_prob: f64) -> bool {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(&(turn as u64).to_le_bytes());
    h.update(question.as_bytes());
    let bytes = h.finalize();
    let x = u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or([0; 8]));
    (x >> 11) as f64 / (1u64 << 53) as f64 >= drop_prob
}

fn multiturn(trace: &Trace, p: &Params, out: &mut LineOut) -> Result<(), String> {
    let turns = turns(trace);
    let texts: Vec<String> = turns
        .iter()
        .enumerate()
        .map(|(i, t)| t.text(keep_think(p.seed, &trace.question, i, p.think_drop_prob)))
        .collect();
    // Turn j can be a sample while every turn before it ended with a search result.
    let candidates = 1 + turns
        .iter()
        .take_while(|t| t.result.is_some())
        .count()
        .min(turns.len().saturating_sub(1));
    let candidates = candidates.min(turns.len());
    for j in 0..candidates {
        if texts[j].is_empty() {
            out.counters.add("empty_turns", 1);
            continue;
        }
        let mut prompt = vec![Message {
            role: "user",
            content: &trace.question,
        }];
        for (t, text) in turns[..j].iter().zip(&texts) {
            prompt.push(Message {
                role: "assistant",
                content: text,
            });
            prompt.push(Message {
                role: "user",
                content: t.result.as_deref().unwrap_or(""),
            });
        }
        push_record(
            out,
            &TurnRecord {
                data_source: &p.data_source,
                prompt,
                ability: &p.ability,
                answer: &texts[j],
                extra_info: TurnInfo {
                    question: &trace.question,
                    split_index: j,
                    total_splits: candidates,
                    turn_index: j,
                    num_assistant_turns: turns.len(),
                },
            },
        )?;
    }
    Ok(())
}

/// Parses one line into a checked trace.
pub fn parse_trace(line: &[u8]) -> Result<Trace<'_>, String> {
    let t: Trace = serde_json::from_slice(line).map_err(|e| {
        let m = e.to_string();
        if e.is_data() {
            format!("not a trace: {m}")
        } else {
            format!("not valid JSON: {m}")
        }
    })?;
    for (i, s) in t.trace.iter().enumerate() {
        s.check(i)?;
    }
    Ok(t)
}

fn process_line(p: &Params, line: &[u8], out: &mut LineOut) -> Result<(), String> {
    let trace = parse_trace(line)?;
    let before = out.rows;
    match p.mode {
        Mode::PerStep => per_step(&trace, p, out)?,
        Mode::Multiturn => multiturn(&trace, p, out)?,
    }
    if out.rows == before {
        out.counters.add("traces_without_samples", 1);
    }
    Ok(())
}

const INPUTS: &[KeySpec] = &[KeySpec {
    name: "traces",
    required: true,
    doc: "JSONL of {question, trace: [steps]}",
}];
const OUTPUTS: &[KeySpec] = &[KeySpec {
    name: "samples",
    required: true,
    doc: "the samples (.jsonl or .parquet)",
}];

impl Stage for AgentSamples {
    fn kind(&self) -> &'static str {
        "agent_samples"
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
        let input = ctx.input("traces")?;
        let output = ctx
            .output("samples")
            .context("output 'samples' is not declared")?;
        let mut sink = Sink::create(&output, &ctx.scratch)?;
        let counters = map_lines(
            &input,
            &mut sink,
            p.on_error,
            &ctx.progress,
            |_, line, out| process_line(&p, line, out),
        )?;
        let rows = sink.finish()?;
        let mut report = json!({
            "mode": match p.mode { Mode::PerStep => "per_step", Mode::Multiturn => "multiturn" },
            "rows_in": counters.get("lines_in"),
            "rows_out": rows,
            "skipped": counters.get("skipped_malformed"),
        });
        for (k, v) in &counters.0 {
            if !["lines_in", "rows_out", "skipped_malformed"].contains(&k.as_str()) {
                report[k] = json!(v);
            }
        }
        ctx.report(&report);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several searches, unicode, an unknown step type, empty documents, trailing reasoning.
    const A: &str = r#"{"question": "Qui a écrit « Ténèbres »?", "trace": [
        {"type": "reasoning", "content": "Je dois chercher l'auteur."},
        {"type": "search", "query": "auteur Ténèbres"},
        {"type": "search_result", "documents": [{"title": "Ténèbres", "content": "Roman de Zoë Ålund, 東京."}]},
        {"type": "reasoning", "content": "Zoë Ålund. Vérifions."},
        {"type": "plan", "content": "check birth"},
        {"type": "search", "query": "Zoë Ålund"},
        {"type": "search_result", "documents": []},
        {"type": "reasoning", "content": "Rien de neuf."},
        {"type": "CorrectAnswer", "content": "Zoë Ålund"},
        {"type": "reasoning", "content": "Done."}]}"#;
    /// No search at all.
    const B: &str = r#"{"question": "2+2?", "trace": [{"type": "reasoning", "content": "2+2 is 4."}, {"type": "CorrectAnswer", "content": "4"}]}"#;
    /// Two reasoning steps in one turn, two documents, an answer with no reasoning before it.
    const C: &str = r#"{"question": "Q", "trace": [{"type": "reasoning", "content": "a"}, {"type": "reasoning", "content": "b"},
        {"type": "search", "query": "q"}, {"type": "search_result", "documents": [{"title": "t1", "content": "c1"}, {"title": "t2", "content": ""}]},
        {"type": "CorrectAnswer", "content": "x"}]}"#;
    /// Ends on a search result: nothing follows it.
    const D: &str = r#"{"question": "Q", "trace": [{"type": "search", "query": "q"}, {"type": "search_result", "documents": [{"title": "t", "content": "c"}]}]}"#;

    fn params(mode: Mode, drop: f64) -> Params {
        Params {
            mode,
            think_drop_prob: drop,
            seed: 42,
            data_source: default_source(),
            ability: default_ability(),
            on_error: OnError::Fail,
        }
    }

    fn records(line: &str, p: &Params) -> Vec<Value> {
        let mut out = Vec::new();
        let mut counters = crate::lines::Counters::default();
        let mut lo = LineOut {
            out: &mut out,
            rows: 0,
            counters: &mut counters,
        };
        process_line(p, line.as_bytes(), &mut lo).unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    const A_P0: &str = "Question: Qui a écrit « Ténèbres »?\n\n<think>\nJe dois chercher l'auteur.\n</think>\n\n<search>\nauteur Ténèbres\n</search>\n\n<information>\nDocument 1:\nTitle: Ténèbres\nContent: Roman de Zoë Ålund, 東京.\n</information>";
    const A_A0: &str = "<think>\nZoë Ålund. Vérifions.\n</think>\n\n<plan>\ncheck birth\n</plan>\n\n<search>\nZoë Ålund\n</search>";

    #[test]
    fn per_step_golden() {
        let r = records(A, &params(Mode::PerStep, 0.3));
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            json!({"data_source": "search_r1", "prompt": [{"role": "user", "content": A_P0}], "ability": "search_reasoning",
                   "extra_info": {"question": A_P0, "answer": A_A0, "split_index": 0, "total_splits": 2}})
        );
        let p1 = format!("{A_P0}\n\n{A_A0}\n\n<information>\n\n</information>");
        assert_eq!(r[1]["prompt"][0]["content"], p1.as_str());
        assert_eq!(
            r[1]["extra_info"]["answer"],
            "<think>\nRien de neuf.\n</think>\n\n<answer>\nZoë Ålund\n</answer>\n\n<think>\nDone.\n</think>"
        );
        assert_eq!(r[1]["extra_info"]["split_index"], 1);

        assert!(records(B, &params(Mode::PerStep, 0.3)).is_empty());
        assert!(records(D, &params(Mode::PerStep, 0.3)).is_empty());
        let c = records(C, &params(Mode::PerStep, 0.3));
        assert_eq!(
            c[0]["prompt"][0]["content"],
            "Question: Q\n\n<think>\na\n</think>\n\n<think>\nb\n</think>\n\n<search>\nq\n</search>\n\n<information>\nDocument 1:\nTitle: t1\nContent: c1\n\nDocument 2:\nTitle: t2\nContent: \n</information>"
        );
        assert_eq!(c[0]["extra_info"]["answer"], "<answer>\nx\n</answer>");
    }

    #[test]
    fn multiturn_golden() {
        let r = records(A, &params(Mode::Multiturn, 0.0));
        let t0 =
            "<think>\nJe dois chercher l'auteur.\n</think>\n\n<search>\nauteur Ténèbres\n</search>";
        let info0 = "<information>\nDocument 1:\nTitle: Ténèbres\nContent: Roman de Zoë Ålund, 東京.\n</information>";
        let q = "Qui a écrit « Ténèbres »?";
        assert_eq!(r.len(), 3);
        assert_eq!(
            r[0],
            json!({"data_source": "search_r1", "prompt": [{"role": "user", "content": q}], "ability": "search_reasoning", "answer": t0,
                   "extra_info": {"question": q, "split_index": 0, "total_splits": 3, "turn_index": 0, "num_assistant_turns": 4}})
        );
        assert_eq!(
            r[1]["prompt"],
            json!([{"role": "user", "content": q}, {"role": "assistant", "content": t0}, {"role": "user", "content": info0}])
        );
        assert_eq!(r[1]["answer"], A_A0);
        assert_eq!(
            r[2]["prompt"][3],
            json!({"role": "assistant", "content": A_A0})
        );
        assert_eq!(
            r[2]["prompt"][4],
            json!({"role": "user", "content": "<information>\n\n</information>"})
        );
        assert_eq!(
            r[2]["answer"],
            "<think>\nRien de neuf.\n</think>\n\n<answer>\nZoë Ålund\n</answer>"
        );

        let b = records(B, &params(Mode::Multiturn, 0.0));
        assert_eq!(b.len(), 1);
        assert_eq!(
            b[0]["answer"],
            "<think>\n2+2 is 4.\n</think>\n\n<answer>\n4\n</answer>"
        );
        let c = records(C, &params(Mode::Multiturn, 0.0));
        assert_eq!(
            c[0]["answer"],
            "<think>\na\nb\n</think>\n\n<search>\nq\n</search>"
        );
        assert_eq!(c[1]["answer"], "<answer>\nx\n</answer>");

        // Dropping every think block.
        let r = records(A, &params(Mode::Multiturn, 1.0));
        assert_eq!(r[0]["answer"], "<search>\nauteur Ténèbres\n</search>");
        assert_eq!(
            r[1]["prompt"][1]["content"],
            "<search>\nauteur Ténèbres\n</search>"
        );
    }

    #[test]
    fn think_drop_is_deterministic_and_near_its_probability() {
        let a = records(A, &params(Mode::Multiturn, 0.5));
        assert_eq!(a, records(A, &params(Mode::Multiturn, 0.5)));
        let kept = (0..2000).filter(|&i| keep_think(7, "q", i, 0.3)).count();
        assert!((1300..1500).contains(&kept), "kept {kept} of 2000 at p=0.3");
        assert_ne!(
            (0..64)
                .map(|i| keep_think(1, "q", i, 0.5))
                .collect::<Vec<_>>(),
            (0..64)
                .map(|i| keep_think(2, "q", i, 0.5))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn malformed_traces_name_the_problem() {
        assert!(
            parse_trace(b"{not json")
                .unwrap_err()
                .starts_with("not valid JSON")
        );
        assert!(
            parse_trace(br#"{"trace": []}"#)
                .unwrap_err()
                .contains("missing field `question`")
        );
        assert_eq!(
            parse_trace(br#"{"question": "q", "trace": [{"type": "search"}]}"#)
                .err()
                .unwrap(),
            "step 0 (search) has no `query`"
        );
        assert_eq!(
            parse_trace(br#"{"question": "q", "trace": [{"type": "search_result"}]}"#)
                .err()
                .unwrap(),
            "step 0 (search_result) has no `documents`"
        );
    }
}
