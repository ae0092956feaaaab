//! `anneal metrics`: the metrics that stages wrote (their `metrics` output),
//! side by side, with deltas against a baseline stage.
//!
//! A `.json` output is read whole (its `metrics` object when it has one); a
//! `.jsonl` output (the train stage's per-step log) by its last line. Numeric
//! leaves are flattened to dotted names (`detailed.all.entropy`).

use std::path::Path;

use anyhow::Context;
use serde_json::{Map, Value, json};

use crate::cli::PipelineArgs;
use crate::pipeline::Pipeline;

/// The metrics of one stage.
struct Column {
    stage: String,
    /// Name -> value; empty with `missing` or `unreadable` set when the file
    /// is not there or cannot be read.
    values: Vec<(String, f64)>,
    missing: Option<String>,
    unreadable: Option<String>,
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, f64)>) {
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.push((prefix.to_owned(), x));
            }
        }
        Value::Bool(b) => out.push((prefix.to_owned(), f64::from(u8::from(*b)))),
        Value::Object(m) => {
            for (k, v) in m {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&name, v, out);
            }
        }
        _ => {}
    }
}

/// The metrics in `path`, flattened.
fn read_metrics(path: &Path) -> anyhow::Result<Vec<(String, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = if path.extension().is_some_and(|e| e == "jsonl") {
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .with_context(|| format!("{} is empty", path.display()))?;
        serde_json::from_str(last)
            .with_context(|| format!("{}: the last line is not JSON", path.display()))?
    } else {
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?
    };
    let body = match v.get("metrics") {
        Some(m @ Value::Object(_)) => m,
        _ => &v,
    };
    let mut out = Vec::new();
    flatten("", body, &mut out);
    Ok(out)
}

/// Prints the table (or JSON); returns the exit status.
pub fn metrics(
    args: &PipelineArgs,
    stages: &[String],
    baseline: Option<&str>,
    output: &str,
    json_out: bool,
) -> anyhow::Result<i32> {
    let p = Pipeline::load(&args.pipeline, args.store.as_deref())?;
    let picked: Vec<usize> = if stages.is_empty() {
        (0..p.stages.len())
            .filter(|&i| {
                p.stages[i]
                    .outs
                    .get(output)
                    .is_some_and(|o| !o.dir && o.path.ends_with(".json"))
            })
            .collect()
    } else {
        let mut v = Vec::new();
        for s in stages {
            for i in p.select(s)? {
                if !v.contains(&i) {
                    v.push(i);
                }
            }
        }
        v
    };
    if picked.is_empty() {
        anyhow::bail!(
            "no stage in {} has a `{output}` output ending in .json; name stages with -s, or pick the output with --output",
            p.file.display()
        );
    }
    let mut cols = Vec::new();
    for &i in &picked {
        let s = &p.stages[i];
        let out = s.outs.get(output).with_context(|| {
            format!(
                "stage '{}' has no output '{output}' (it has: {})",
                s.name,
                s.outs.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        let path = p.dir.join(&out.path);
        let mut col = Column {
            stage: s.name.clone(),
            values: Vec::new(),
            missing: None,
            unreadable: None,
        };
        // One bad file must not hide the others: it is reported and the exit status says so.
        match read_metrics(&path) {
            Ok(values) => col.values = values,
            Err(_) if !path.exists() => {
                col.missing = Some(format!("{} not written yet: run the stage", out.path));
            }
            Err(e) => col.unreadable = Some(format!("{e:#}")),
        }
        cols.push(col);
    }
    let base = match baseline {
        Some(b) => {
            let idx = p.select(b)?;
            let name = &p.stages[idx[0]].name;
            cols.iter()
                .position(|c| &c.stage == name)
                .with_context(|| format!("the baseline '{b}' is not among the stages shown"))?
        }
        None => 0,
    };
    let status = i32::from(cols.iter().any(|c| c.unreadable.is_some()));
    let mut names: Vec<String> = Vec::new();
    for c in &cols {
        for (n, _) in &c.values {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let value = |c: &Column, n: &str| c.values.iter().find(|(k, _)| k == n).map(|(_, v)| *v);

    if json_out {
        let mut m = Map::new();
        for n in &names {
            let row: Map<String, Value> = cols
                .iter()
                .map(|c| {
                    let v = value(c, n);
                    let d = v.zip(value(&cols[base], n)).map(|(a, b)| a - b);
                    (c.stage.clone(), json!({"value": v, "delta": d}))
                })
                .collect();
            m.insert(n.clone(), Value::Object(row));
        }
        let by_stage = |f: fn(&Column) -> &Option<String>| -> Map<String, Value> {
            cols.iter()
                .filter_map(|c| f(c).as_ref().map(|w| (c.stage.clone(), json!(w))))
                .collect()
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "pipeline": p.name,
                "stages": cols.iter().map(|c| &c.stage).collect::<Vec<_>>(),
                "baseline": cols[base].stage,
                "metrics": m,
                "missing": by_stage(|c| &c.missing),
                "unreadable": by_stage(|c| &c.unreadable),
            }))?
        );
        return Ok(status);
    }

    let mut table: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["metric".to_owned()];
    header.extend(cols.iter().enumerate().map(|(j, c)| {
        if j == base && cols.len() > 1 {
            format!("{} (baseline)", c.stage)
        } else {
            c.stage.clone()
        }
    }));
    table.push(header);
    for n in &names {
        let mut row = vec![n.clone()];
        for (j, c) in cols.iter().enumerate() {
            let cell = match (value(c, n), value(&cols[base], n)) {
                (None, _) => "-".to_owned(),
                (Some(v), Some(b)) if j != base => format!("{} ({})", fmt(v), fmt_delta(v - b)),
                (Some(v), _) => fmt(v),
            };
            row.push(cell);
        }
        table.push(row);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|k| {
            table
                .iter()
                .map(|r| r[k].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, row) in table.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(k, cell)| {
                if k == 0 {
                    format!("{cell:<w$}", w = widths[k])
                } else {
                    format!("{cell:>w$}", w = widths[k])
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
        if i == 0 {
            println!(
                "{}",
                "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
            );
        }
    }
    for c in &cols {
        if let Some(w) = &c.missing {
            eprintln!("note: {}: {w}", c.stage);
        }
        if let Some(e) = &c.unreadable {
            eprintln!("error: {}: {e}", c.stage);
        }
    }
    Ok(status)
}

/// Up to 4 significant decimals, no trailing zeros; integers as integers.
fn fmt(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    let s = if v.abs() >= 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    };
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn fmt_delta(d: f64) -> String {
    if d >= 0.0 {
        format!("+{}", fmt(d))
    } else {
        fmt(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_short() {
        assert_eq!(fmt(0.25), "0.25");
        assert_eq!(fmt(3.0), "3");
        assert_eq!(fmt(1234.5678), "1234.6");
        assert_eq!(fmt_delta(-0.1), "-0.1");
        assert_eq!(fmt_delta(0.0), "+0");
    }

    #[test]
    fn nested_metrics_flatten_to_dotted_names() {
        let mut out = Vec::new();
        flatten(
            "",
            &json!({"loss": 1.5, "detailed": {"all": {"entropy": 0.5}}, "name": "x", "ok": true}),
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                ("loss".to_owned(), 1.5),
                ("detailed.all.entropy".to_owned(), 0.5),
                ("ok".to_owned(), 1.0)
            ]
        );
    }
}
