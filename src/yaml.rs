//! A YAML tree that remembers where every node came from.
//!
//! serde_yaml reports locations only for its own errors; the pipeline loader
//! also needs them for semantic errors (unknown kinds, missing references,
//! cycles), so pipeline files are read from yaml-rust2's marked event stream.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::TScalarStyle;

/// A 1-based position in the source text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub col: usize,
}

/// A YAML node and its position.
#[derive(Clone, Debug)]
pub struct Node {
    /// Where the node starts.
    pub mark: Mark,
    /// The node itself.
    pub value: Yaml,
}

/// The shape of a node.
#[derive(Clone, Debug)]
pub enum Yaml {
    /// A scalar; `plain` is false when it was quoted, a block scalar, or tagged `!!str`.
    Scalar {
        /// The text.
        text: String,
        /// Whether it was written without quotes (so `1` is a number, `"1"` a string).
        plain: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in file order.
    Map(Vec<(Node, Node)>),
}

/// Most values that `*alias` references may expand to in one file (a guard
/// against "billion laughs" files; real pipelines stay far below).
const MAX_ALIAS_VALUES: usize = 1_000_000;

impl Node {
    /// Scalars, sequences and mappings in this node, itself included.
    fn size(&self) -> usize {
        1 + match &self.value {
            Yaml::Scalar { .. } => 0,
            Yaml::Seq(v) => v.iter().map(Node::size).sum(),
            Yaml::Map(v) => v.iter().map(|(k, x)| k.size() + x.size()).sum(),
        }
    }
}

/// A typed scalar per the YAML 1.2 core schema.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    /// `null`, `~` or empty.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer or a float.
    Num(serde_json::Number),
    /// Anything else.
    Str(String),
}

impl Node {
    /// "a mapping", "a list", "a string"... for error messages.
    pub fn type_name(&self) -> &'static str {
        match &self.value {
            Yaml::Map(_) => "a mapping",
            Yaml::Seq(_) => "a list",
            Yaml::Scalar { .. } => match self.scalar() {
                Some(Scalar::Null) => "null",
                Some(Scalar::Bool(_)) => "a boolean",
                Some(Scalar::Num(_)) => "a number",
                _ => "a string",
            },
        }
    }

    /// The mapping entries, if a mapping.
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Yaml::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The scalar text, if a scalar.
    pub fn as_text(&self) -> Option<&str> {
        match &self.value {
            Yaml::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The scalar, typed by the core schema.
    pub fn scalar(&self) -> Option<Scalar> {
        let Yaml::Scalar { text, plain } = &self.value else {
            return None;
        };
        if !plain {
            return Some(Scalar::Str(text.clone()));
        }
        Some(type_plain(text))
    }
}

fn type_plain(t: &str) -> Scalar {
    match t {
        "" | "~" | "null" | "Null" | "NULL" => return Scalar::Null,
        "true" | "True" | "TRUE" => return Scalar::Bool(true),
        "false" | "False" | "FALSE" => return Scalar::Bool(false),
        _ => {}
    }
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = t.parse::<i64>() {
            return Scalar::Num(i.into());
        }
        if let Ok(u) = t.parse::<u64>() {
            return Scalar::Num(u.into());
        }
    }
    if let Some(hex) = t.strip_prefix("0x")
        && let Ok(u) = u64::from_str_radix(hex, 16)
    {
        return Scalar::Num(u.into());
    }
    if let Some(oct) = t.strip_prefix("0o")
        && let Ok(u) = u64::from_str_radix(oct, 8)
    {
        return Scalar::Num(u.into());
    }
    if is_float(digits)
        && let Ok(f) = t.parse::<f64>()
        && let Some(n) = serde_json::Number::from_f64(f)
    {
        return Scalar::Num(n);
    }
    Scalar::Str(t.to_owned())
}

/// `(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`, sign already stripped.
fn is_float(s: &str) -> bool {
    let (mantissa, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (mantissa, None),
    };
    let all_digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match frac {
        Some(frac) => all_digits(int) && all_digits(frac) && !(int.is_empty() && frac.is_empty()),
        None => !int.is_empty() && all_digits(int),
    };
    let exp_ok = exp.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && all_digits(e)
    });
    mantissa_ok && exp_ok
}

// `${...}` is not valid inside flow collections (`{a: ${x}}`), yet people write it:
// hide the braces behind private-use characters of the same length while parsing.
const OPEN: [char; 2] = ['\u{E000}', '\u{E001}'];
const CLOSE: char = '\u{E002}';

fn shield(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("${") {
        let body = &rest[i + 2..];
        match body.find(['}', '\n']) {
            Some(end) if body.as_bytes()[end] == b'}' => {
                out.push_str(&rest[..i]);
                out.extend(OPEN);
                out.push_str(&body[..end]);
                out.push(CLOSE);
                rest = &body[end + 1..];
            }
            _ => {
                out.push_str(&rest[..i + 2]);
                rest = body;
            }
        }
    }
    out.push_str(rest);
    out
}

fn unshield(s: String) -> String {
    if !s.contains([OPEN[0], CLOSE]) {
        return s;
    }
    s.replace(OPEN[0], "$")
        .replace(OPEN[1], "{")
        .replace(CLOSE, "}")
}

/// Parses the first document of `src`. `Ok(None)` for an empty file.
pub fn parse(src: &str) -> Result<Option<Node>, (Mark, String)> {
    let shielded = shield(src);
    let src = shielded.as_str();
    enum Frame {
        Seq(Mark, usize, Vec<Node>),
        Map(
            Mark,
            usize,
            Vec<(Node, Node)>,
            Option<Node>,
            Vec<(Node, Node)>,
        ),
    }
    let mut parser = Parser::new_from_str(src);
    let mut stack: Vec<Frame> = Vec::new();
    // Anchored nodes with their sizes in values, to bound what aliases expand to.
    let mut anchors: HashMap<usize, (Node, usize)> = HashMap::new();
    let mut expanded = 0usize;
    let mut root: Option<Node> = None;
    loop {
        let (event, m) = parser
            .next_token()
            .map_err(|e| (mark_of(e.marker()), e.info().to_owned()))?;
        let mark = mark_of(&m);
        let done = match event {
            Event::StreamEnd | Event::DocumentEnd => break,
            Event::Nothing | Event::StreamStart | Event::DocumentStart => continue,
            Event::Scalar(text, style, anchor, tag) => {
                let is_str_tag = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let node = Node {
                    mark,
                    value: Yaml::Scalar {
                        text: unshield(text),
                        plain: style == TScalarStyle::Plain && !is_str_tag,
                    },
                };
                if anchor > 0 {
                    anchors.insert(anchor, (node.clone(), node.size()));
                }
                Some(node)
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some((n, size)) => {
                    expanded += size;
                    if expanded > MAX_ALIAS_VALUES {
                        return Err((
                            mark,
                            format!(
                                "aliases expand to more than {MAX_ALIAS_VALUES} values; \
                                 write the data in a file and declare it as an input instead"
                            ),
                        ));
                    }
                    Some(Node { mark, ..n.clone() })
                }
                None => return Err((mark, "alias refers to an unknown anchor".into())),
            },
            Event::SequenceStart(anchor, _) => {
                stack.push(Frame::Seq(mark, anchor, Vec::new()));
                None
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Frame::Map(mark, anchor, Vec::new(), None, Vec::new()));
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(m, anchor, items)) => {
                    let node = Node {
                        mark: m,
                        value: Yaml::Seq(items),
                    };
                    if anchor > 0 {
                        anchors.insert(anchor, (node.clone(), node.size()));
                    }
                    Some(node)
                }
                _ => return Err((mark, "unbalanced sequence".into())),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map(m, anchor, mut entries, _, merged)) => {
                    for (k, v) in merged {
                        if !entries.iter().any(|(e, _)| e.as_text() == k.as_text()) {
                            entries.push((k, v));
                        }
                    }
                    let node = Node {
                        mark: m,
                        value: Yaml::Map(entries),
                    };
                    if anchor > 0 {
                        anchors.insert(anchor, (node.clone(), node.size()));
                    }
                    Some(node)
                }
                _ => return Err((mark, "unbalanced mapping".into())),
            },
        };
        let Some(node) = done else { continue };
        match stack.last_mut() {
            None => {
                root = Some(node);
            }
            Some(Frame::Seq(_, _, items)) => items.push(node),
            Some(Frame::Map(_, _, entries, pending, merged)) => match pending.take() {
                None => {
                    if !matches!(node.value, Yaml::Scalar { .. }) {
                        return Err((node.mark, "mapping keys must be plain strings".into()));
                    }
                    if let Some((first, _)) =
                        entries.iter().find(|(k, _)| k.as_text() == node.as_text())
                    {
                        return Err((
                            node.mark,
                            format!(
                                "duplicate key '{}' (first defined at line {})",
                                node.as_text().unwrap_or_default(),
                                first.mark.line
                            ),
                        ));
                    }
                    *pending = Some(node);
                }
                Some(key) => {
                    if key.as_text() == Some("<<") {
                        merge_into(merged, node)?;
                    } else {
                        entries.push((key, node));
                    }
                }
            },
        }
    }
    Ok(root)
}

/// YAML merge keys (`<<: *defaults`): entries not already present are added.
fn merge_into(entries: &mut Vec<(Node, Node)>, src: Node) -> Result<(), (Mark, String)> {
    let maps: Vec<Node> = match src.value {
        Yaml::Map(_) => vec![src],
        Yaml::Seq(items) => items,
        _ => {
            return Err((
                src.mark,
                "`<<` needs a mapping or a list of mappings".into(),
            ));
        }
    };
    for m in maps {
        let Yaml::Map(src_entries) = m.value else {
            return Err((m.mark, "`<<` needs a mapping or a list of mappings".into()));
        };
        for (k, v) in src_entries {
            if !entries.iter().any(|(e, _)| e.as_text() == k.as_text()) {
                entries.push((k, v));
            }
        }
    }
    Ok(())
}

fn mark_of(m: &yaml_rust2::scanner::Marker) -> Mark {
    Mark {
        line: m.line(),
        col: m.col() + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_types() {
        let src = "a: 1\nb:\n  c: \"2\"\n  d: [1.0e-5, x, true, ~]\n";
        let root = parse(src).unwrap().unwrap();
        let map = root.as_map().unwrap();
        assert_eq!(map[0].0.mark, Mark { line: 1, col: 1 });
        assert_eq!(map[0].1.scalar(), Some(Scalar::Num(1.into())));
        let b = map[1].1.as_map().unwrap();
        assert_eq!(b[0].1.mark, Mark { line: 3, col: 6 });
        assert_eq!(b[0].1.scalar(), Some(Scalar::Str("2".into())));
        let Yaml::Seq(items) = &b[1].1.value else {
            panic!()
        };
        assert_eq!(
            items[0].scalar(),
            Some(Scalar::Num(serde_json::Number::from_f64(1e-5).unwrap()))
        );
        assert_eq!(items[1].scalar(), Some(Scalar::Str("x".into())));
        assert_eq!(items[2].scalar(), Some(Scalar::Bool(true)));
        assert_eq!(items[3].scalar(), Some(Scalar::Null));
    }

    #[test]
    fn duplicate_keys_and_syntax_errors() {
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.0.line, 2);
        assert!(e.1.contains("duplicate key 'a'"));
        assert!(parse("a: [1, 2\n").is_err());
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut src = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            src.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let (mark, msg) = parse(&src).unwrap_err();
        assert!(msg.contains("aliases expand to more than"), "{msg}");
        assert!(mark.line >= 6, "{mark:?}");
    }

    #[test]
    fn anchors_and_merge() {
        let src = "d: &d {x: 1, y: 2}\ne:\n  <<: *d\n  y: 3\n";
        let root = parse(src).unwrap().unwrap();
        let e = root.as_map().unwrap()[1].1.as_map().unwrap();
        let keys: Vec<_> = e.iter().map(|(k, _)| k.as_text().unwrap()).collect();
        assert_eq!(keys, ["y", "x"]);
    }

    #[test]
    fn references_in_flow_mappings() {
        let root = parse("deps: {data: ${stages.prep.outs.data}, b: x${y}z}\n")
            .unwrap()
            .unwrap();
        let deps = root.as_map().unwrap()[0].1.as_map().unwrap();
        assert_eq!(deps[0].1.as_text(), Some("${stages.prep.outs.data}"));
        assert_eq!(deps[1].1.as_text(), Some("x${y}z"));
        assert_eq!(deps[1].1.mark, Mark { line: 1, col: 43 });
    }

    #[test]
    fn floats() {
        for s in ["1.5", "1e-5", "1.0e-5", ".5", "5.", "-2.5E+3"] {
            assert!(matches!(type_plain(s), Scalar::Num(_)), "{s}");
        }
        for s in ["1.2.3", "e5", "1e", "abc", "1_000"] {
            assert!(matches!(type_plain(s), Scalar::Str(_)), "{s}");
        }
    }
}
