//! Pure metric and extraction functions for the `evaluate` stage.
//!
//! Everything here is a total function of its input: no I/O, no state, and
//! no panics on any string. Tag and marker searches work on byte offsets that
//! `str::find` returns, which always lie on char boundaries.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Trims `s` and collapses every run of (unicode) whitespace to one space.
pub fn normalize_ws(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `pred` and `reference` are equal after [`normalize_ws`].
pub fn exact_match(pred: &str, reference: &str) -> bool {
    normalize_ws(pred) == normalize_ws(reference)
}

/// SQuAD-style normalization: lowercases, deletes punctuation (every char
/// that is neither alphanumeric nor whitespace), drops the English articles
/// `a`, `an` and `the` as whole words, and collapses whitespace.
pub fn squad_normalize(s: &str) -> String {
    let kept: String = s
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace())
        .collect();
    kept.split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// SQuAD token F1 between the [`squad_normalize`]d whitespace tokens of
/// `pred` and `reference`, counting overlap as a multiset. Two empty token
/// lists score 1.0; exactly one empty list scores 0.0.
pub fn token_f1(pred: &str, reference: &str) -> f64 {
    let (pred, reference) = (squad_normalize(pred), squad_normalize(reference));
    let p: Vec<&str> = pred.split_whitespace().collect();
    let r: Vec<&str> = reference.split_whitespace().collect();
    if p.is_empty() || r.is_empty() {
        return if p.is_empty() && r.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in &r {
        *counts.entry(t).or_default() += 1;
    }
    let common = p
        .iter()
        .filter(|t| match counts.get_mut(*t) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
        .count();
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / r.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Byte spans of one top-level, depth-matched `<tag>...</tag>` block.
struct Block {
    /// Where the opening tag starts.
    start: usize,
    /// The content between the opening and the closing tag.
    content: Range<usize>,
    /// Just past the closing tag.
    end: usize,
}

/// Scans `text` for exact `<tag>` and `</tag>` markers. Returns the closed
/// top-level blocks in order and whether the markers are balanced (no close
/// below depth 0, depth 0 at the end). A close at depth 0 is ignored.
fn scan(text: &str, tag: &str) -> (Vec<Block>, bool) {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let find = |pat: &str, from: usize| text[from..].find(pat).map(|i| i + from);
    let (mut next_open, mut next_close) = (find(&open, 0), find(&close, 0));
    let (mut blocks, mut balanced) = (Vec::new(), true);
    let (mut pos, mut depth, mut start) = (0, 0usize, 0);
    loop {
        if next_open.is_some_and(|o| o < pos) {
            next_open = find(&open, pos);
        }
        if next_close.is_some_and(|c| c < pos) {
            next_close = find(&close, pos);
        }
        let (at, is_open) = match (next_open, next_close) {
            (Some(o), Some(c)) if o <= c => (o, true),
            (Some(o), None) => (o, true),
            (_, Some(c)) => (c, false),
            (None, None) => break,
        };
        if is_open {
            if depth == 0 {
                start = at;
            }
            depth += 1;
            pos = at + open.len();
        } else {
            pos = at + close.len();
            match depth {
                0 => balanced = false,
                1 => blocks.push(Block {
                    start,
                    content: start + open.len()..at,
                    end: pos,
                }),
                _ => {}
            }
            depth = depth.saturating_sub(1);
        }
    }
    (blocks, balanced && depth == 0)
}

/// Contents (untrimmed) of every top-level `<tag>...</tag>` block in `text`,
/// in order. `tag` is the bare name, e.g. `"answer"`; only the exact markers
/// `<tag>` and `</tag>` count. Nested same-name blocks stay inside the outer
/// block's content; an open tag that is never closed yields nothing, and a
/// stray close tag is ignored.
pub fn tag_blocks<'a>(text: &'a str, tag: &str) -> Vec<&'a str> {
    scan(text, tag)
        .0
        .into_iter()
        .map(|b| &text[b.content])
        .collect()
}

/// Content of the first top-level `<tag>` block, as in [`tag_blocks`].
pub fn first_block<'a>(text: &'a str, tag: &str) -> Option<&'a str> {
    tag_blocks(text, tag).first().copied()
}

/// Content of the last top-level `<tag>` block, as in [`tag_blocks`].
pub fn last_block<'a>(text: &'a str, tag: &str) -> Option<&'a str> {
    tag_blocks(text, tag).last().copied()
}

/// Whether every `<tag>` has a matching later `</tag>` and no `</tag>` closes
/// below depth 0. Text without the tag is balanced.
pub fn tags_balanced(text: &str, tag: &str) -> bool {
    scan(text, tag).1
}

/// Bare name of the block that states what the agent has established.
pub const THINK_TAG: &str = "think_summary";

/// Bare name of the block that quotes the facts the next step needs.
pub const INFO_TAG: &str = "information_summary";

/// Bare name of the answer tag a next step may carry.
pub const ANSWER_TAG: &str = "answer";

/// Splits a summary-format text (the shape `pipelines/prompts/summary.md`
/// asks for: optional `Question: ...`, a `<think_summary>` block, then an
/// `<information_summary>` block, then the next step) into the summary —
/// everything through the close of the last top-level `<information_summary>`
/// block — and the trimmed text after it. Without a closed information block:
/// `(None, text.trim())`.
pub fn split_summary(text: &str) -> (Option<&str>, &str) {
    match scan(text, INFO_TAG).0.last() {
        Some(b) => (Some(text[..b.end].trim()), text[b.end..].trim()),
        None => (None, text.trim()),
    }
}

/// Whether `text` follows the summary format: exactly one closed top-level
/// `<think_summary>` block followed by exactly one closed top-level
/// `<information_summary>` block, both tags balanced, then a non-empty next
/// step with balanced `<answer>` tags.
pub fn summary_format_valid(text: &str) -> bool {
    let (think, think_ok) = scan(text, THINK_TAG);
    let (info, info_ok) = scan(text, INFO_TAG);
    let ([t], [i]) = (think.as_slice(), info.as_slice()) else {
        return false;
    };
    let step = text[i.end..].trim();
    think_ok && info_ok && t.end <= i.start && !step.is_empty() && tags_balanced(step, ANSWER_TAG)
}

/// Whether a next step (as `agent_samples` writes them) is well formed:
/// `<think>`, `<search>` and `<answer>` tags balanced, and a closed
/// `<search>` or `<answer>` block, the action, present.
pub fn step_format_valid(step: &str) -> bool {
    ["think", "search", ANSWER_TAG]
        .iter()
        .all(|t| tags_balanced(step, t))
        && (first_block(step, "search").is_some() || first_block(step, ANSWER_TAG).is_some())
}

/// Quoted spans in `text`: between straight double quotes `"..."`, curly
/// quotes `“...”`, and matching backtick runs (`` `x` ``, ```` ``x`` ````, as
/// in Markdown code spans). Each kind pairs left to right on its own; an
/// unclosed opener is ignored. Spans are trimmed, empty ones dropped, and
/// duplicates removed, keeping the order of first appearance.
pub fn quoted_spans(text: &str) -> Vec<String> {
    let mut found: Vec<(usize, &str)> = Vec::new();
    for (open, close) in [("\"", "\""), ("\u{201C}", "\u{201D}")] {
        let mut pos = 0;
        while let Some(o) = text[pos..].find(open).map(|i| pos + i + open.len()) {
            let Some(c) = text[o..].find(close).map(|i| o + i) else {
                break;
            };
            found.push((o, &text[o..c]));
            pos = c + close.len();
        }
    }
    // Backtick runs as (start, length); a run closes at the next run of the
    // same length. Backtick is ASCII, so byte offsets are char boundaries.
    let bytes = text.as_bytes();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'`' {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == i => *n += 1,
                _ => runs.push((i, 1)),
            }
        }
    }
    let mut i = 0;
    while i < runs.len() {
        let (s, n) = runs[i];
        match runs[i + 1..].iter().position(|r| r.1 == n) {
            Some(k) => {
                found.push((s + n, &text[s + n..runs[i + 1 + k].0]));
                i += k + 2;
            }
            None => i += 1,
        }
    }
    found.sort_by_key(|f| f.0);
    let mut seen = HashSet::new();
    found
        .into_iter()
        .map(|f| f.1.trim())
        .filter(|s| !s.is_empty() && seen.insert(*s))
        .map(String::from)
        .collect()
}

/// Share of the [`quoted_spans`] of `reference_info` that occur verbatim in
/// `generated_info`; `None` when the reference has no quoted spans.
pub fn fact_retention(reference_info: &str, generated_info: &str) -> Option<f64> {
    let spans = quoted_spans(reference_info);
    if spans.is_empty() {
        return None;
    }
    let kept = spans
        .iter()
        .filter(|s| generated_info.contains(s.as_str()))
        .count();
    Some(kept as f64 / spans.len() as f64)
}

/// Removes GSM8K calculator annotations such as `<<48/2=24>>`. An unclosed
/// `<<` and everything after it are kept.
fn strip_calculator(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(o) = rest.find("<<") {
        let Some(c) = rest[o + 2..].find(">>") else {
            break;
        };
        out.push_str(&rest[..o]);
        rest = &rest[o + 2 + c + 2..];
    }
    out.push_str(rest);
    out
}

/// Splits a GSM8K `answer` field (`"reasoning ...\n#### 72"`) at its last
/// `####` into the trimmed reasoning, with calculator annotations
/// (`<<48/2=24>>`) removed, and the trimmed final answer without commas.
/// Without `####`: the whole (cleaned, trimmed) field and `""`.
pub fn gsm8k_reference(answer: &str) -> (String, String) {
    let (reasoning, fin) = answer.rsplit_once("####").unwrap_or((answer, ""));
    (
        strip_calculator(reasoning).trim().to_string(),
        fin.trim().replace(',', ""),
    )
}

/// Where a model puts its final answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerFormat {
    /// Between [`FormatTags`] markers.
    #[default]
    Tags,
    /// Inside the last LaTeX `\boxed{...}`.
    Boxed,
    /// After the last `####`, to the end of that line.
    Hashes,
}

/// The literal markers (not bare names) around reasoning and solution for
/// [`AnswerFormat::Tags`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FormatTags {
    /// Opens the reasoning, e.g. `<start_working_out>`.
    pub reasoning_start: String,
    /// Closes the reasoning, e.g. `<end_working_out>`.
    pub reasoning_end: String,
    /// Opens the solution, e.g. `<SOLUTION>`.
    pub solution_start: String,
    /// Closes the solution, e.g. `</SOLUTION>`.
    pub solution_end: String,
}

impl Default for FormatTags {
    fn default() -> Self {
        Self {
            reasoning_start: "<start_working_out>".into(),
            reasoning_end: "<end_working_out>".into(),
            solution_start: "<SOLUTION>".into(),
            solution_end: "</SOLUTION>".into(),
        }
    }
}

/// Reasoning and final answer pulled out of a model output, both trimmed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Extracted {
    /// The reasoning, or `""` when none was found.
    pub reasoning: String,
    /// The final answer, or `""` when none was found.
    pub answer: String,
}

/// Content of the last closed `\boxed{...}`, braces matched, with the byte
/// offset of its `\boxed`. An unclosed last one falls back to the one before.
fn last_boxed(text: &str) -> Option<(usize, &str)> {
    const OPEN: &str = "\\boxed{";
    text.rmatch_indices(OPEN).find_map(|(at, _)| {
        let start = at + OPEN.len();
        let mut depth = 1usize;
        for (i, b) in text[start..].bytes().enumerate() {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some((at, &text[start..start + i]));
                    }
                }
                _ => {}
            }
        }
        None
    })
}

/// Extracts reasoning and answer from a model output.
///
/// - [`AnswerFormat::Tags`]: reasoning lies between the first
///   `reasoning_start` and the next `reasoning_end` (without that end: up to
///   the next `solution_start`, else to the end of text); without
///   `reasoning_start` but with `reasoning_end` (a prefilled start marker) it
///   is the text before `reasoning_end`. The answer lies between the last
///   `solution_start` and the next `solution_end`, else the end of text.
/// - [`AnswerFormat::Boxed`]: the answer is the content of the last closed
///   `\boxed{...}` and the reasoning the text before it; both empty without
///   one.
/// - [`AnswerFormat::Hashes`]: the answer is the rest of the line after the
///   last `####` and the reasoning the text before it; both empty without
///   one.
pub fn extract(text: &str, format: AnswerFormat, tags: &FormatTags) -> Extracted {
    let (reasoning, answer) = match format {
        AnswerFormat::Tags => {
            let reasoning = match text.find(&tags.reasoning_start) {
                Some(s) => {
                    let rest = &text[s + tags.reasoning_start.len()..];
                    let end = rest
                        .find(&tags.reasoning_end)
                        .or_else(|| rest.find(&tags.solution_start))
                        .unwrap_or(rest.len());
                    &rest[..end]
                }
                None => text.find(&tags.reasoning_end).map_or("", |e| &text[..e]),
            };
            let answer = text.rfind(&tags.solution_start).map_or("", |s| {
                let rest = &text[s + tags.solution_start.len()..];
                &rest[..rest.find(&tags.solution_end).unwrap_or(rest.len())]
            });
            (reasoning, answer)
        }
        AnswerFormat::Boxed => match last_boxed(text) {
            Some((at, answer)) => (&text[..at], answer),
            None => ("", ""),
        },
        AnswerFormat::Hashes => match text.rfind("####") {
            Some(at) => {
                let rest = &text[at + 4..];
                (&text[..at], rest.lines().next().unwrap_or(""))
            }
            None => ("", ""),
        },
    };
    Extracted {
        reasoning: reasoning.trim().to_string(),
        answer: answer.trim().to_string(),
    }
}

/// Parses a numeric answer: trims, removes commas, strips one leading `$`
/// and one trailing `.`, and parses an `f64`. Non-finite values (`NaN`,
/// `inf`) are rejected.
pub fn parse_number(s: &str) -> Option<f64> {
    let s = s.trim().replace(',', "");
    let s = s.strip_prefix('$').unwrap_or(&s).trim();
    let s = s.strip_suffix('.').unwrap_or(s);
    s.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// Whether a predicted answer matches the reference: numerically within
/// 1e-6 when both parse with [`parse_number`], else equal after
/// [`normalize_ws`]. An empty (all-whitespace) prediction never matches.
pub fn answers_match(pred: &str, reference: &str) -> bool {
    if pred.trim().is_empty() {
        return false;
    }
    match (parse_number(pred), parse_number(reference)) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-6,
        _ => normalize_ws(pred) == normalize_ws(reference),
    }
}

/// A running arithmetic mean.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mean {
    sum: f64,
    count: u64,
}

impl Mean {
    /// Adds one value.
    pub fn add(&mut self, x: f64) {
        self.sum += x;
        self.count += 1;
    }

    /// Adds 1.0 for `true` and 0.0 for `false`.
    pub fn add_bool(&mut self, b: bool) {
        self.add(if b { 1.0 } else { 0.0 });
    }

    /// The mean so far; `None` before the first value.
    pub fn value(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// How many values were added.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn normalize_ws_collapses_unicode_whitespace() {
        assert_eq!(normalize_ws("  a \t b\n\nc  "), "a b c");
        assert_eq!(normalize_ws("café\u{3000}東京 🎉"), "café 東京 🎉");
        assert_eq!(normalize_ws(""), "");
        assert_eq!(normalize_ws(" \n\t "), "");
    }

    #[test]
    fn exact_match_ignores_whitespace_only() {
        assert!(exact_match(" Paris\n", "Paris"));
        assert!(exact_match("New   York", "New York"));
        assert!(!exact_match("paris", "Paris"));
        assert!(exact_match("", "  "));
    }

    #[test]
    fn squad_normalize_lowercases_and_strips() {
        assert_eq!(
            squad_normalize("The Cat, an apple & A dog!"),
            "cat apple dog"
        );
        assert_eq!(squad_normalize("CAFÉ au lait."), "café au lait");
        assert_eq!(squad_normalize("東京 is «big» 🎉"), "東京 is big");
        // Articles only as whole words; punctuation is deleted, not spaced.
        assert_eq!(squad_normalize("theater an-the a's"), "theater anthe as");
        assert_eq!(squad_normalize(""), "");
        assert_eq!(squad_normalize("the a an"), "");
    }

    #[test]
    fn token_f1_cases() {
        assert!(close(token_f1("", ""), 1.0));
        assert!(close(token_f1("the", "a"), 1.0));
        assert!(close(token_f1("cat", ""), 0.0));
        assert!(close(token_f1("", "cat"), 0.0));
        assert!(close(token_f1("The cat.", "cat"), 1.0));
        assert!(close(token_f1("dog", "cat"), 0.0));
        // pred: black cat (2), ref: cat (1): p = 0.5, r = 1 -> 2/3.
        assert!(close(token_f1("black cat", "the cat"), 2.0 / 3.0));
        // Multiset: "cat cat" vs "cat": common 1, p = 0.5, r = 1.
        assert!(close(token_f1("cat cat", "cat"), 2.0 / 3.0));
        assert!(close(token_f1("Café", "café"), 1.0));
    }

    #[test]
    fn tag_blocks_flat_and_multiple() {
        let t = "x <answer> 1 </answer> y <answer>2</answer>";
        assert_eq!(tag_blocks(t, "answer"), vec![" 1 ", "2"]);
        assert_eq!(first_block(t, "answer"), Some(" 1 "));
        assert_eq!(last_block(t, "answer"), Some("2"));
    }

    #[test]
    fn tag_blocks_nested_stay_inside_outer() {
        let t = "<a>1<a>2</a>3</a><a>4</a>";
        assert_eq!(tag_blocks(t, "a"), vec!["1<a>2</a>3", "4"]);
        assert!(tags_balanced(t, "a"));
    }

    #[test]
    fn tag_blocks_missing_and_unclosed() {
        assert!(tag_blocks("no tags here", "answer").is_empty());
        assert_eq!(first_block("", "answer"), None);
        assert!(tag_blocks("<answer>never closed", "answer").is_empty());
        // Outer never closes, so the inner block is not top-level.
        assert!(tag_blocks("<a>x<a>y</a>", "a").is_empty());
        assert_eq!(tag_blocks("<a>x</a><a>dangling", "a"), vec!["x"]);
        // Attributes or other case do not count.
        assert!(tag_blocks("<a x=1>y</a><A>z</A>", "a").is_empty());
    }

    #[test]
    fn tag_blocks_stray_close_ignored() {
        let t = "</a><a>x</a></a>";
        assert_eq!(tag_blocks(t, "a"), vec!["x"]);
        assert!(!tags_balanced(t, "a"));
    }

    #[test]
    fn tag_blocks_unicode_content() {
        let t = "🎉<ans>café 東京</ans>é";
        assert_eq!(first_block(t, "ans"), Some("café 東京"));
        assert_eq!(first_block("<é>ü</é>", "é"), Some("ü"));
    }

    #[test]
    fn tags_balanced_cases() {
        assert!(tags_balanced("", "a"));
        assert!(tags_balanced("plain", "a"));
        assert!(tags_balanced("<a><a></a></a>", "a"));
        assert!(!tags_balanced("<a>", "a"));
        assert!(!tags_balanced("</a><a>", "a"));
        assert!(!tags_balanced("<a></a></a>", "a"));
        assert!(tags_balanced("<b></b></a>", "b"));
        assert!(!tags_balanced("<b></b></a>", "a"));
    }

    #[test]
    fn split_summary_cases() {
        let t = "Question: q?\n<think_summary>t</think_summary>\n\
                 <information_summary>\"a\" <information_summary>n</information_summary></information_summary>\n Next step. ";
        let (summary, step) = split_summary(t);
        assert!(
            summary
                .unwrap()
                .ends_with("</information_summary></information_summary>")
        );
        assert!(summary.unwrap().starts_with("Question: q?"));
        assert_eq!(step, "Next step.");
        assert_eq!(split_summary(" only text "), (None, "only text"));
        assert_eq!(
            split_summary("<information_summary>open"),
            (None, "<information_summary>open")
        );
        assert_eq!(split_summary(""), (None, ""));
    }

    const GOOD: &str = "Question: Who?\n<think_summary>Found the founder.</think_summary>\n\
        <information_summary>\"Founded in 1984 by Émeric\" (Doc)</information_summary>\n\
        Next: compute <answer>42</answer>";

    #[test]
    fn summary_format_valid_accepts_reference_shape() {
        assert!(summary_format_valid(GOOD));
        assert!(summary_format_valid(&format!("\n  {GOOD}")));
        let no_answer =
            "<think_summary></think_summary><information_summary></information_summary>go on";
        assert!(summary_format_valid(no_answer));
    }

    #[test]
    fn summary_format_valid_rejects_violations() {
        let think = "<think_summary>t</think_summary>";
        let info = "<information_summary>i</information_summary>";
        for bad in [
            "".to_string(),
            "no summary at all".to_string(),
            format!("{think}{info}"),
            format!("{think}{info}   \n "),
            format!("{info} step"),
            format!("{think} step"),
            format!("{info}{think} step"),
            format!("{think}{info}{info} step"),
            format!("{think}{think}{info} step"),
            format!("{think}{info} step <information_summary>"),
            format!("{think}<think_summary>{info} step"),
            format!("{think}{info} <answer>1"),
            format!("{think}{info} </answer>1<answer>"),
        ] {
            assert!(!summary_format_valid(&bad), "accepted: {bad}");
        }
    }

    #[test]
    fn step_format_cases() {
        assert!(step_format_valid(
            "<think>\nq\n</think>\n\n<search>\nq\n</search>"
        ));
        assert!(step_format_valid("<answer>\nZoë Ålund\n</answer>"));
        assert!(!step_format_valid("<think>x</think>"));
        assert!(!step_format_valid("<think>x<search>q</search>"));
        assert!(!step_format_valid("<answer>4"));
        assert!(!step_format_valid(""));
    }

    #[test]
    fn quoted_spans_kinds_order_and_dedup() {
        let t = "Use `x_1` and \"café\", then “東京 🎉” and \"café\" again, `x_1`.";
        assert_eq!(quoted_spans(t), vec!["x_1", "café", "東京 🎉"]);
    }

    #[test]
    fn quoted_spans_empty_unclosed_and_trimmed() {
        assert!(quoted_spans("").is_empty());
        assert!(quoted_spans("\"\" \"  \" ``").is_empty());
        assert_eq!(quoted_spans("\" a \" and \"unclosed"), vec!["a"]);
        assert_eq!(quoted_spans("“open only"), Vec::<String>::new());
        assert_eq!(quoted_spans("5\" tall"), Vec::<String>::new());
    }

    #[test]
    fn quoted_spans_backtick_runs() {
        assert_eq!(quoted_spans("``a ` b`` c"), vec!["a ` b"]);
        assert_eq!(
            quoted_spans("```py\nprint(1)\n``` `x`"),
            vec!["py\nprint(1)", "x"]
        );
        assert_eq!(quoted_spans("` lone ``"), Vec::<String>::new());
    }

    #[test]
    fn fact_retention_cases() {
        let reference = "Keys: \"alpha\", `beta`, “γ-ray”.";
        assert_eq!(
            fact_retention(reference, "alpha and γ-ray"),
            Some(2.0 / 3.0)
        );
        assert_eq!(fact_retention(reference, ""), Some(0.0));
        assert_eq!(fact_retention(reference, "alphabeta γ-ray"), Some(1.0));
        assert_eq!(fact_retention("no quotes", "anything"), None);
        assert_eq!(fact_retention("", ""), None);
    }

    #[test]
    fn gsm8k_reference_splits_and_cleans() {
        let a = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\
                 She sold 48+24 = <<48+24=72>>72 clips.\n#### 1,072 ";
        let (r, ans) = gsm8k_reference(a);
        assert_eq!(
            r,
            "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips."
        );
        assert_eq!(ans, "1072");
    }

    #[test]
    fn gsm8k_reference_without_hashes() {
        assert_eq!(
            gsm8k_reference(" just <<1+1=2>>2 and <<open "),
            ("just 2 and <<open".to_string(), String::new())
        );
        assert_eq!(gsm8k_reference(""), (String::new(), String::new()));
        assert_eq!(gsm8k_reference("####"), (String::new(), String::new()));
    }

    fn tags(text: &str) -> Extracted {
        extract(text, AnswerFormat::Tags, &FormatTags::default())
    }

    fn ex(reasoning: &str, answer: &str) -> Extracted {
        Extracted {
            reasoning: reasoning.into(),
            answer: answer.into(),
        }
    }

    #[test]
    fn extract_tags_full() {
        let t = "<start_working_out> think <end_working_out><SOLUTION> 42 </SOLUTION>";
        assert_eq!(tags(t), ex("think", "42"));
    }

    #[test]
    fn extract_tags_prefilled_start_and_missing_end() {
        assert_eq!(
            tags("think café<end_working_out><SOLUTION>7</SOLUTION>"),
            ex("think café", "7")
        );
        assert_eq!(
            tags("<start_working_out>think <SOLUTION>7</SOLUTION>"),
            ex("think", "7")
        );
        assert_eq!(
            tags("<start_working_out> only thinking"),
            ex("only thinking", "")
        );
        assert_eq!(tags("nothing at all"), ex("", ""));
        assert_eq!(tags(""), ex("", ""));
    }

    #[test]
    fn extract_tags_last_solution_and_unclosed() {
        let t = "<SOLUTION>1</SOLUTION> wait <SOLUTION>2</SOLUTION>";
        assert_eq!(tags(t).answer, "2");
        assert_eq!(tags("<SOLUTION> 3\nmore 🎉 ").answer, "3\nmore 🎉");
        let custom = FormatTags {
            solution_start: "<answer>".into(),
            solution_end: "</answer>".into(),
            ..FormatTags::default()
        };
        let got = extract("<answer>東京</answer>", AnswerFormat::Tags, &custom);
        assert_eq!(got.answer, "東京");
    }

    #[test]
    fn extract_boxed_nested_and_last() {
        let b = |t: &str| extract(t, AnswerFormat::Boxed, &FormatTags::default());
        assert_eq!(
            b("so \\boxed{1} or rather \\boxed{\\frac{1}{2}}."),
            ex("so \\boxed{1} or rather", "\\frac{1}{2}")
        );
        assert_eq!(b("x \\boxed{5} then \\boxed{unclosed"), ex("x", "5"));
        assert_eq!(b("no box"), ex("", ""));
        assert_eq!(b("\\boxed{}"), ex("", ""));
        assert_eq!(b("é \\boxed{café}"), ex("é", "café"));
    }

    #[test]
    fn extract_hashes_line() {
        let h = |t: &str| extract(t, AnswerFormat::Hashes, &FormatTags::default());
        assert_eq!(
            h("a\n#### 5\n#### 1,000 \ntrailing"),
            ex("a\n#### 5", "1,000")
        );
        assert_eq!(h("####"), ex("", ""));
        assert_eq!(h("no hashes"), ex("", ""));
        assert_eq!(h("r ##### 🎉"), ex("r #", "🎉"));
    }

    #[test]
    fn parse_number_cases() {
        assert_eq!(parse_number(" 1,234 "), Some(1234.0));
        assert_eq!(parse_number("$5.50"), Some(5.5));
        assert_eq!(parse_number("72."), Some(72.0));
        assert_eq!(parse_number("-3"), Some(-3.0));
        assert_eq!(parse_number("1e3"), Some(1000.0));
        for bad in ["", "NaN", "inf", "-infinity", "abc", "5%", "$", ".", "١٢"] {
            assert_eq!(parse_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn answers_match_cases() {
        assert!(answers_match("1,000", "1000"));
        assert!(answers_match("$18.", "18"));
        assert!(answers_match("0.30000000001", "0.3"));
        assert!(!answers_match("18", "19"));
        assert!(answers_match(" New  York ", "New York"));
        assert!(!answers_match("", ""));
        assert!(!answers_match("  ", "  "));
        assert!(!answers_match("café", "cafe"));
    }

    #[test]
    fn mean_accumulates() {
        let mut m = Mean::default();
        assert_eq!((m.value(), m.count()), (None, 0));
        m.add(1.0);
        m.add_bool(false);
        m.add_bool(true);
        assert_eq!(m.count(), 3);
        assert!(close(m.value().unwrap(), 2.0 / 3.0));
    }

    #[test]
    fn serde_shapes() {
        assert_eq!(AnswerFormat::default(), AnswerFormat::Tags);
        let f: AnswerFormat = serde_json::from_str("\"hashes\"").unwrap();
        assert_eq!(f, AnswerFormat::Hashes);
        assert_eq!(
            serde_json::to_string(&AnswerFormat::Boxed).unwrap(),
            "\"boxed\""
        );
        let t: FormatTags = serde_json::from_str(r#"{"solution_end":"</S>"}"#).unwrap();
        assert_eq!(t.solution_end, "</S>");
        assert_eq!(t.solution_start, "<SOLUTION>");
        assert!(serde_json::from_str::<FormatTags>(r#"{"typo":"x"}"#).is_err());
        let e = serde_json::to_value(ex("r", "a")).unwrap();
        assert_eq!(e, serde_json::json!({"reasoning": "r", "answer": "a"}));
    }

    #[test]
    fn nothing_panics_on_any_slice() {
        let text = "é<a>“ü`🎉</a>”<<\\boxed{東{#### <SOLUTION>\"</SOLUTION>``}<summary>";
        let cuts: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let empty = FormatTags {
            reasoning_start: String::new(),
            reasoning_end: String::new(),
            solution_start: String::new(),
            solution_end: String::new(),
        };
        for &i in &cuts {
            for &j in cuts.iter().filter(|&&j| j >= i) {
                let s = &text[i..j];
                for tag in ["a", "", "think_summary", "é"] {
                    tag_blocks(s, tag);
                    tags_balanced(s, tag);
                }
                split_summary(s);
                summary_format_valid(s);
                quoted_spans(s);
                fact_retention(s, s);
                gsm8k_reference(s);
                parse_number(s);
                answers_match(s, s);
                token_f1(s, text);
                for f in [
                    AnswerFormat::Tags,
                    AnswerFormat::Boxed,
                    AnswerFormat::Hashes,
                ] {
                    extract(s, f, &FormatTags::default());
                    extract(s, f, &empty);
                }
            }
        }
    }
}
