//! Parquet files written by `anneal_stages::rows` must read back the same in
//! pyarrow and pandas, which is what training code downstream uses.
//!
//! Needs `python3` with pyarrow and pandas (`python3 -m pip install pyarrow pandas`).

use std::path::Path;
use std::process::Command;

use anneal_stages::rows::{RowReader, RowWriter, infer_schema, infer_schema_of};
use serde_json::{Value, json};

const PYARROW_MISSING: &str = "pyarrow is required for this test: python3 -m pip install pyarrow";

/// Runs `python3 -c script args...`, failing the test with its output if it fails.
fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{PYARROW_MISSING} (cannot run python3: {e})"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python3 failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

fn require_pyarrow() {
    let ok = Command::new("python3")
        .args(["-c", "import pyarrow, pyarrow.parquet"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "{PYARROW_MISSING}");
}

fn records() -> Vec<Value> {
    vec![
        json!({
            "data_source": "search_r1",
            "prompt": [{"role": "user", "content": "Question: x"}],
            "ability": "search_reasoning",
            "documents": [],
            "extra_info": {"question": "q", "answer": "a", "split_index": 0, "total_splits": 2}
        }),
        json!({
            "data_source": "search_r1",
            "prompt": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Question: is naïve 東京 🚀 unicode?"}
            ],
            "ability": "search_reasoning",
            "documents": [{"title": "Tokyo", "text": "東京 is the capital."}],
            "extra_info": {"question": "naïve 東京", "answer": "yes", "split_index": 1, "total_splits": 2}
        }),
        json!({
            "data_source": "nq",
            "prompt": [{"role": "user", "content": "Question: \"quoted\"\nsecond line"}],
            "ability": "search_reasoning",
            "documents": [],
            "extra_info": {"question": "q3", "answer": "a3", "split_index": 2, "total_splits": 2}
        }),
        json!({
            "data_source": "nq",
            "prompt": [],
            "ability": "fact",
            "extra_info": {"question": "q4", "answer": "a4", "split_index": 3, "total_splits": 2}
        }),
    ]
}

/// Writes the records as JSONL text in the key order above (which
/// `serde_json::Value` does not keep), so schema inference sees that order.
fn write_jsonl(path: &Path, rows: &[Value]) {
    let mut w = RowWriter::create(path, None).expect("create jsonl");
    for row in rows {
        let text = ordered_json(row);
        w.write_raw_json(text.as_bytes()).expect("write jsonl");
    }
    assert_eq!(w.finish().expect("finish jsonl"), rows.len() as u64);
}

/// The record as JSON text with keys in the order used in `records()`.
fn ordered_json(row: &Value) -> String {
    fn obj(v: &Value, order: &[&str]) -> String {
        let map = v.as_object().expect("object");
        let parts: Vec<String> = order
            .iter()
            .filter_map(|k| map.get(*k).map(|x| (k, x)))
            .map(|(k, x)| format!("{}:{}", json!(k), encode(k, x)))
            .collect();
        assert_eq!(parts.len(), map.len(), "unexpected keys in {v}");
        format!("{{{}}}", parts.join(","))
    }
    fn encode(key: &str, v: &Value) -> String {
        match (key, v) {
            ("prompt", Value::Array(items)) => format!(
                "[{}]",
                items
                    .iter()
                    .map(|m| obj(m, &["role", "content"]))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            ("documents", Value::Array(items)) => format!(
                "[{}]",
                items
                    .iter()
                    .map(|d| obj(d, &["title", "text"]))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            ("extra_info", v) => obj(v, &["question", "answer", "split_index", "total_splits"]),
            (_, v) => v.to_string(),
        }
    }
    obj(
        row,
        &[
            "data_source",
            "prompt",
            "ability",
            "documents",
            "extra_info",
        ],
    )
}

const CHECK: &str = r#"
import json, sys
import pyarrow as pa, pyarrow.parquet as pq, pandas as pd

path, expected = sys.argv[1], json.loads(sys.argv[2])
t = pq.read_table(path)
s = t.schema

def check(cond, msg):
    if not cond:
        sys.exit(f"{msg}\nschema:\n{s}")

names = [f.name for f in s]
check(names == ["data_source", "prompt", "ability", "documents", "extra_info"], f"columns {names}")
prompt = str(s.field("prompt").type)
check(prompt in ("list<element: struct<role: string, content: string>>",
                 "list<item: struct<role: string, content: string>>"), f"prompt type {prompt}")
docs = str(s.field("documents").type)
check(docs in ("list<element: struct<title: string, text: string>>",
               "list<item: struct<title: string, text: string>>"), f"documents type {docs}")
extra = s.field("extra_info").type
check(pa.types.is_struct(extra), f"extra_info type {extra}")
check([f.name for f in extra] == ["question", "answer", "split_index", "total_splits"], f"extra_info fields {extra}")
check(extra.field("split_index").type == pa.int64(), f"split_index type {extra.field('split_index').type}")
check(s.field("data_source").type == pa.string(), f"data_source type {s.field('data_source').type}")

def strip_none(v):
    if isinstance(v, dict):
        return {k: strip_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [strip_none(x) for x in v]
    return v

got = [strip_none(r) for r in t.to_pylist()]
check(len(got) == len(expected), f"{len(got)} rows, expected {len(expected)}")
for i, (g, e) in enumerate(zip(got, expected)):
    check(g == e, f"row {i + 1}:\n got      {g!r}\n expected {e!r}")
check(got[1]["extra_info"]["question"] == "naïve 東京", "unicode question")
check(got[0]["documents"] == [], "empty documents")

df = pd.read_parquet(path)
check(len(df) == len(expected), f"pandas read {len(df)} rows, expected {len(expected)}")
check(list(df.columns) == names, f"pandas columns {list(df.columns)}")
print("OK", len(got))
"#;

#[test]
fn pyarrow_reads_rows_written_by_row_writer() {
    require_pyarrow();
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = records();

    // Source JSONL -> schema -> Parquet, as a data stage does.
    let jsonl = dir.path().join("train.jsonl");
    write_jsonl(&jsonl, &rows);
    let schema = infer_schema(&jsonl).expect("infer_schema");

    // In-memory inference agrees on every column's type (field order aside).
    let in_memory = infer_schema_of(&rows).expect("infer_schema_of");
    for field in schema.fields() {
        let other = in_memory
            .field_with_name(field.name())
            .expect("same columns");
        assert_eq!(
            sorted(field.data_type()),
            sorted(other.data_type()),
            "column {}",
            field.name()
        );
    }
    assert_eq!(schema.fields().len(), in_memory.fields().len());

    let parquet = dir.path().join("train.parquet");
    let mut w = RowWriter::create(&parquet, Some(schema)).expect("create parquet");
    for row in RowReader::open(&jsonl).expect("open jsonl") {
        let (_, row) = row.expect("jsonl row");
        w.write(&row).expect("write parquet row");
    }
    assert_eq!(w.finish().expect("finish parquet"), rows.len() as u64);

    // Reading back through RowReader gives the same values.
    let back: Vec<Value> = RowReader::open(&parquet)
        .expect("open parquet")
        .map(|r| r.expect("parquet row").1)
        .collect();
    assert_eq!(back, rows);

    let expected = serde_json::to_string(&rows).expect("json");
    let out = python(CHECK, &[parquet.to_str().expect("utf-8 path"), &expected]);
    assert!(out.starts_with("OK 4"), "{out}");
}

/// The data type's debug text with struct fields sorted, to compare types
/// regardless of field order.
fn sorted(dt: &arrow::datatypes::DataType) -> String {
    use arrow::datatypes::DataType;
    match dt {
        DataType::List(item) => format!("List<{}>", sorted(item.data_type())),
        DataType::Struct(fields) => {
            let mut parts: Vec<String> = fields
                .iter()
                .map(|f| format!("{}: {}", f.name(), sorted(f.data_type())))
                .collect();
            parts.sort();
            format!("Struct<{}>", parts.join(", "))
        }
        other => format!("{other:?}"),
    }
}
