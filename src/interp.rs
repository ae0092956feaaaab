//! `${...}` interpolation and the resolved values it produces.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::yaml::{Node, Scalar, Yaml};

/// A piece of a resolved string.
#[derive(Clone, Debug, PartialEq)]
pub enum Seg {
    /// Plain text.
    Lit(String),
    /// The value of a secret environment variable: never written anywhere.
    Secret(String),
    /// This stage's output `name`: its declared path in keys and logs, a staging path when running.
    Out(String),
    /// A spliced `${params.x}` or `${deps.x}`: the reference itself in keys (its value is
    /// already part of the key), the value elsewhere. Keeps plan reasons to the real change.
    Ref(String, Vec<Seg>),
}

/// Formats a number the way people write it: `1e-5`, `0.001`, `3`.
pub fn fmt_num(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f != 0.0 && (f.abs() < 1e-3 || f.abs() >= 1e15) => {
            format!("{f:e}")
        }
        Some(f) if n.is_f64() => format!("{f}"),
        _ => n.to_string(),
    }
}

/// A resolved value. Strings keep secrets and outputs symbolic until rendered.
#[derive(Clone, Debug, PartialEq)]
pub enum RVal {
    /// null
    Null,
    /// A boolean.
    Bool(bool),
    /// A number.
    Num(serde_json::Number),
    /// A string made of segments.
    Str(Vec<Seg>),
    /// A list.
    List(Vec<RVal>),
    /// A mapping (sorted by key).
    Map(BTreeMap<String, RVal>),
}

/// How symbolic segments are written out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// For the cache key and records: `${env.NAME}` for secrets, declared output paths.
    Key,
    /// For people: `***` for secrets, declared output paths.
    Display,
    /// For the stage process: secret placeholders it fills from its environment, staging paths.
    Exec,
}

impl RVal {
    /// A plain string.
    pub fn str(s: impl Into<String>) -> RVal {
        RVal::Str(vec![Seg::Lit(s.into())])
    }

    /// The text when the value is a string with no symbolic part.
    pub fn as_plain_str(&self) -> Option<String> {
        match self {
            RVal::Str(segs) => segs
                .iter()
                .map(|s| match s {
                    Seg::Lit(t) => Some(t.clone()),
                    Seg::Ref(_, inner) => RVal::Str(inner.clone()).as_plain_str(),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(|v| v.concat()),
            _ => None,
        }
    }

    /// Whether any string inside refers to a secret.
    pub fn secrets(&self, out: &mut Vec<String>) {
        match self {
            RVal::Str(segs) => {
                for s in segs {
                    match s {
                        Seg::Secret(n) if !out.contains(n) => out.push(n.clone()),
                        Seg::Ref(_, inner) => RVal::Str(inner.clone()).secrets(out),
                        _ => {}
                    }
                }
            }
            RVal::List(items) => items.iter().for_each(|v| v.secrets(out)),
            RVal::Map(m) => m.values().for_each(|v| v.secrets(out)),
            _ => {}
        }
    }

    /// "a string", "a list"... for errors.
    pub fn type_name(&self) -> &'static str {
        match self {
            RVal::Null => "null",
            RVal::Bool(_) => "a boolean",
            RVal::Num(_) => "a number",
            RVal::Str(_) => "a string",
            RVal::List(_) => "a list",
            RVal::Map(_) => "a mapping",
        }
    }

    /// Scalar text for splicing into a string; `None` for lists and mappings.
    pub fn splice(&self) -> Option<Vec<Seg>> {
        Some(match self {
            RVal::Null => vec![Seg::Lit("null".into())],
            RVal::Bool(b) => vec![Seg::Lit(b.to_string())],
            RVal::Num(n) => vec![Seg::Lit(fmt_num(n))],
            RVal::Str(segs) => segs.clone(),
            RVal::List(_) | RVal::Map(_) => return None,
        })
    }

    /// Follows a dotted path (`a.b.0`).
    pub fn get(&self, path: &[&str]) -> Result<&RVal, String> {
        let mut cur = self;
        for (i, p) in path.iter().enumerate() {
            cur = match cur {
                RVal::Map(m) => m.get(*p).ok_or_else(|| {
                    let keys: Vec<&str> = m.keys().map(String::as_str).collect();
                    format!(
                        "no key '{}' (has: {})",
                        path[..=i].join("."),
                        if keys.is_empty() {
                            "nothing".into()
                        } else {
                            keys.join(", ")
                        }
                    )
                })?,
                RVal::List(items) => p
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| items.get(i))
                    .ok_or_else(|| {
                        format!("'{}' is not an index of a list of {}", p, items.len())
                    })?,
                other => {
                    return Err(format!(
                        "'{}' is {}, which has no key '{p}'",
                        path[..i].join("."),
                        other.type_name()
                    ));
                }
            };
        }
        Ok(cur)
    }

    /// Renders to JSON. `out_path` gives the path of this stage's output `name` in `Exec` mode.
    pub fn render(&self, mode: Mode, out_path: &dyn Fn(&str) -> String) -> Value {
        match self {
            RVal::Null => Value::Null,
            RVal::Bool(b) => Value::Bool(*b),
            RVal::Num(n) => Value::Number(n.clone()),
            RVal::Str(segs) => Value::String(render_segs(segs, mode, out_path)),
            RVal::List(items) => {
                Value::Array(items.iter().map(|v| v.render(mode, out_path)).collect())
            }
            RVal::Map(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| (k.clone(), v.render(mode, out_path)))
                    .collect(),
            ),
        }
    }
}

/// Renders string segments.
pub fn render_segs(segs: &[Seg], mode: Mode, out_path: &dyn Fn(&str) -> String) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Lit(t) => s.push_str(t),
            Seg::Secret(name) => match mode {
                Mode::Key => {
                    s.push_str("${env.");
                    s.push_str(name);
                    s.push('}');
                }
                Mode::Display => s.push_str("***"),
                Mode::Exec => {
                    let m = anneal_stages::SECRET_SENTINEL;
                    s.push(m);
                    s.push_str("env:");
                    s.push_str(name);
                    s.push(m);
                }
            },
            Seg::Out(name) => s.push_str(&out_path(name)),
            Seg::Ref(expr, inner) => match mode {
                Mode::Key => {
                    s.push_str("${");
                    s.push_str(expr);
                    s.push('}');
                }
                _ => s.push_str(&render_segs(inner, mode, out_path)),
            },
        }
    }
    s
}

/// A piece of a string as written.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    /// Text.
    Lit(String),
    /// The inside of `${...}`.
    Ref(String),
}

/// Splits `s` into text and `${...}` references; `$${` is a literal `${`.
pub fn parse_template(s: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            lit.push_str(&rest[..i]);
            lit.push_str("${");
            rest = escaped;
        } else if let Some(body) = after.strip_prefix('{') {
            lit.push_str(&rest[..i]);
            let end = body.find('}').ok_or_else(|| {
                format!("unclosed '${{' in '{s}'; write '$${{' for a literal '${{'")
            })?;
            let inner = body[..end].trim();
            if inner.is_empty() {
                return Err("empty reference '${}'".into());
            }
            if !lit.is_empty() {
                pieces.push(Piece::Lit(std::mem::take(&mut lit)));
            }
            pieces.push(Piece::Ref(inner.to_owned()));
            rest = &body[end + 1..];
        } else {
            lit.push_str(&rest[..=i]);
            rest = after;
        }
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(pieces)
}

/// A reference that could not be resolved.
#[derive(Debug, Clone)]
pub struct RefError {
    /// What is wrong.
    pub msg: String,
    /// What to do.
    pub help: Option<String>,
    /// The reference (inside `${...}`) it is about, to point at it.
    pub expr: Option<String>,
}

impl From<(String, Option<String>)> for RefError {
    fn from((msg, help): (String, Option<String>)) -> Self {
        RefError {
            msg,
            help,
            expr: None,
        }
    }
}

/// Looks up references while resolving a node.
pub trait Lookup {
    /// The value of `${expr}`, or an error message and an optional hint.
    fn lookup(&mut self, expr: &str) -> Result<RVal, (String, Option<String>)>;
}

/// Resolves a node: scalars are typed, strings interpolated. A string that is
/// exactly one reference takes the referenced value's type.
pub fn resolve(node: &Node, lk: &mut dyn Lookup) -> Result<RVal, RefError> {
    match &node.value {
        Yaml::Seq(items) => Ok(RVal::List(
            items
                .iter()
                .map(|n| resolve(n, lk))
                .collect::<Result<_, _>>()?,
        )),
        Yaml::Map(entries) => {
            let mut m = BTreeMap::new();
            for (k, v) in entries {
                m.insert(k.as_text().unwrap_or_default().to_owned(), resolve(v, lk)?);
            }
            Ok(RVal::Map(m))
        }
        Yaml::Scalar { .. } => match node.scalar() {
            Some(Scalar::Str(s)) => resolve_str(&s, lk),
            Some(Scalar::Null) | None => Ok(RVal::Null),
            Some(Scalar::Bool(b)) => Ok(RVal::Bool(b)),
            Some(Scalar::Num(n)) => Ok(RVal::Num(n)),
        },
    }
}

/// Interpolates one string.
pub fn resolve_str(s: &str, lk: &mut dyn Lookup) -> Result<RVal, RefError> {
    let pieces = parse_template(s).map_err(|e| RefError::from((e, None)))?;
    fn at(expr: &str) -> impl FnOnce((String, Option<String>)) -> RefError + '_ {
        move |e| RefError {
            expr: Some(expr.to_owned()),
            ..e.into()
        }
    }
    let symbolic = |expr: &str| expr.starts_with("params.") || expr.starts_with("deps.");
    if let [Piece::Ref(expr)] = pieces.as_slice() {
        return match lk.lookup(expr).map_err(at(expr))? {
            RVal::Str(segs) if symbolic(expr) => Ok(RVal::Str(vec![Seg::Ref(expr.clone(), segs)])),
            other => Ok(other),
        };
    }
    let mut segs = Vec::new();
    for p in pieces {
        match p {
            Piece::Lit(t) => segs.push(Seg::Lit(t)),
            Piece::Ref(expr) => {
                let v = lk.lookup(&expr).map_err(at(&expr))?;
                let spliced = v.splice().ok_or_else(|| RefError {
                    expr: Some(expr.clone()),
                    ..RefError::from((
                        format!(
                            "'${{{expr}}}' is {} and cannot be spliced into a string",
                            v.type_name()
                        ),
                        Some(format!(
                            "use '${{{expr}}}' as the whole value, or refer to one of its items"
                        )),
                    ))
                })?;
                if symbolic(&expr) {
                    segs.push(Seg::Ref(expr, spliced));
                } else {
                    segs.extend(spliced);
                }
            }
        }
    }
    Ok(RVal::Str(merge_lits(segs)))
}

fn merge_lits(segs: Vec<Seg>) -> Vec<Seg> {
    let mut out: Vec<Seg> = Vec::with_capacity(segs.len());
    for s in segs {
        match (out.last_mut(), s) {
            (Some(Seg::Lit(a)), Seg::Lit(b)) => a.push_str(&b),
            (_, s) => out.push(s),
        }
    }
    if out.is_empty() {
        out.push(Seg::Lit(String::new()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        assert_eq!(
            parse_template("a ${x.y} b $${z} $5").unwrap(),
            vec![
                Piece::Lit("a ".into()),
                Piece::Ref("x.y".into()),
                Piece::Lit(" b ${z} $5".into())
            ]
        );
        assert!(parse_template("a ${x").is_err());
    }
}
