//! The agent-SFT data stages on the real binary: the sample pipeline end to end,
//! Parquet read back by pyarrow and pandas, errors, and determinism.

mod common;
#[allow(dead_code)]
#[path = "support/mock_openai.rs"]
mod mock_openai;

use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn sample_pipeline_runs_end_to_end_and_parquet_reads_back_in_pyarrow() {
    let p = Project::new();
    copy_pipelines(&p);
    let file = "pipelines/agent_summary_sft.yaml";
    // summarize talks to an OpenAI-compatible server: the mock, here.
    let server = mock_openai::MockServer::start(mock_openai::Config {
        latency_ms: 2,
        ..Default::default()
    });
    let env = [
        ("ANNEAL_LLM_BASE_URL", server.url.as_str()),
        ("ANNEAL_LLM_MODEL", "mock"),
    ];
    // Three training phases, a few steps each on the tiny model.
    let yaml = p
        .read(file)
        .replace("  max_steps: null", "  max_steps: 2")
        .replace("  cutoff_len: 2048", "  cutoff_len: 384")
        .replace("  eval_limit: 100", "  eval_limit: 3")
        .replace("  eval_max_tokens: 512", "  eval_max_tokens: 8");
    p.write(file, &yaml);
    let out = p.run_ok_env(file, &[], &env);
    assert!(out.iter().all(|(_, o)| o == "done"), "{out:?}");
    for phase in ["phase1", "phase2", "phase3"] {
        let m = p.read(&format!("pipelines/work/agent/{phase}_metrics.jsonl"));
        assert_eq!(m.lines().count(), 2, "{phase}: {m}");
        assert!(p.exists(&format!("pipelines/work/agent/{phase}/model.safetensors")));
    }
    // Each phase evaluated; `anneal metrics` lines them up with deltas against phase 1.
    let m = p.anneal(&[
        "metrics",
        file,
        "-s",
        "tf_phase1",
        "-s",
        "tf_phase2",
        "-s",
        "tf_phase3",
        "--json",
    ]);
    assert_eq!(m.code, 0, "{m:?}");
    let m = m.json();
    for phase in ["tf_phase1", "tf_phase2", "tf_phase3"] {
        let loss = m["metrics"]["loss"][phase]["value"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{phase}: {m}");
    }
    let d = m["metrics"]["loss"]["tf_phase3"]["delta"].as_f64().unwrap();
    let (l1, l3) = (
        m["metrics"]["loss"]["tf_phase1"]["value"].as_f64().unwrap(),
        m["metrics"]["loss"]["tf_phase3"]["value"].as_f64().unwrap(),
    );
    assert!((d - (l3 - l1)).abs() < 1e-9);
    let gen3: serde_json::Value =
        serde_json::from_str(&p.read("pipelines/work/agent/eval/gen_phase3.json")).unwrap();
    assert_eq!(gen3["examples"], 3);
    assert!(gen3["metrics"]["format_valid"].is_number(), "{gen3}");

    let report = |stage: &str| p.report(file, stage);
    assert_eq!(report("per_step")["rows_in"], 200);
    let per_step = report("per_step")["rows_out"].as_u64().unwrap();
    assert_eq!(
        per_step,
        p.read("pipelines/work/agent/per_step.jsonl")
            .lines()
            .count() as u64
    );
    assert_eq!(report("summarize")["called"], per_step);
    assert_eq!(server.requests(), per_step as usize);
    assert_eq!(report("summary_datasets")["prefix_rows"], per_step);
    let split = report("split@prefix");
    assert_eq!(split["val_rows"], per_step / 10);
    assert_eq!(split["train_rows"], per_step - per_step / 10);
    let text = p.anneal(&["status", file]).stdout;
    assert!(text.contains("rows_in=200"), "{text}");

    let dir = p.path("pipelines/work/agent");
    require_python(&["pyarrow", "pandas"]);
    let got = python_json(
        &[
            "-c",
            &format!(
                r#"
import json, pyarrow.parquet as pq, pandas as pd
d = {dir:?}
t = pq.read_table(d + "/prefix/train.parquet")
v = pq.read_table(d + "/prefix/val.parquet")
s = t.schema
assert str(s.field("prompt").type) in ("list<item: struct<role: string, content: string>>", "list<element: struct<role: string, content: string>>"), s.field("prompt").type
ei = s.field("extra_info").type
assert [ei.field(i).name for i in range(ei.num_fields)] == ["question", "answer", "split_index", "total_splits", "has_summary_prefix"], ei
assert str(ei.field("split_index").type) == "int64" and str(ei.field("has_summary_prefix").type) == "bool"
assert t.schema == v.schema
rows = t.to_pylist() + v.to_pylist()
src = [json.loads(l) for l in open(d + "/prefix.jsonl", encoding="utf-8")]
key = lambda r: (r["prompt"][0]["content"], r["extra_info"]["split_index"])
assert sorted(rows, key=key) == sorted(src, key=key), "parquet rows differ from the JSONL rows"
assert all(r["extra_info"]["answer"].startswith(r["summary"] + "\n\n") for r in rows)
mt = pd.read_parquet(d + "/multiturn/train.parquet")
first = mt.iloc[0]
assert first["prompt"][0]["role"] == "user" and first["data_source"] == "search_r1"
so = pq.read_table(d + "/summary_only/val.parquet").to_pylist()[0]
assert so["prompt"] == [{{"role": "user", "content": so["summary"]}}] and so["extra_info"]["original_question_discarded"] is True
print(json.dumps([len(rows), len(mt)]))
"#
            ),
        ],
        "the pyarrow and pandas read-back",
    );
    let counts: Vec<u64> = serde_json::from_value(got).unwrap();
    assert_eq!(counts[0], per_step);
    assert_eq!(
        counts[1],
        report("split@multiturn")["train_rows"].as_u64().unwrap()
    );

    // An independent Python implementation of the spec writes the same bytes.
    require_python(&["blake3"]);
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/reference_agent_samples.py");
    for mode in ["per_step", "multiturn"] {
        let out = p.path(&format!("{mode}.reference.jsonl"));
        let status = Command::new("python3")
            .arg(&reference)
            .args([
                "--mode",
                mode,
                "--seed",
                "42",
                "--think-drop-prob",
                "0.3",
                "--in",
            ])
            .arg(p.path("pipelines/data/agent_traces.jsonl"))
            .arg("--out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        assert!(
            std::fs::read(&out).unwrap()
                == std::fs::read(p.path(&format!("pipelines/work/agent/{mode}.jsonl"))).unwrap(),
            "{mode}: anneal's samples differ from bench/reference_agent_samples.py's"
        );
    }

    // Same inputs, same bytes: a second project gets identical outputs.
    let q = Project::new();
    copy_pipelines(&q);
    q.write(file, &yaml);
    q.run_ok_env(file, &[], &env);
    let (a, b) = (
        snapshot(&p.path("pipelines/work")),
        snapshot(&q.path("pipelines/work")),
    );
    let names = |s: &[(String, Vec<u8>)]| s.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b));
    let differ: Vec<&String> = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.1 != y.1)
        .map(|(x, _)| &x.0)
        // Training metrics carry wall-clock throughput; the models themselves must match.
        .filter(|n| !n.ends_with("_metrics.jsonl"))
        .collect();
    assert!(
        differ.is_empty(),
        "outputs differ between identical projects: {differ:?}"
    );
}

const TRACE: &str = r#"{"question": "Q", "trace": [{"type": "search", "query": "q"}, {"type": "search_result", "documents": [{"title": "t", "content": "c"}]}, {"type": "CorrectAnswer", "content": "x"}]}"#;

#[test]
fn malformed_lines_fail_with_file_and_line_or_are_skipped_and_counted() {
    let p = Project::new();
    p.write("traces.jsonl", &format!("{TRACE}\n\n{TRACE}\n{{\"question\": \"Q\", \"trace\": [{{\"type\": \"search\"}}]}}\n{{oops\n{TRACE}\n"));
    let yaml = "stages:\n  s:\n    kind: agent_samples\n    deps: {traces: traces.jsonl}\n    params: {mode: per_step}\n    outs: {samples: out.jsonl}\n";
    p.write("p.yaml", yaml);
    let r = p.anneal(&["run", "p.yaml"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("traces.jsonl:4: step 0 (search) has no `query`"),
        "{r:?}"
    );
    assert!(r.stderr.contains("on_error: skip"), "{r:?}");
    assert!(!p.exists("out.jsonl"));

    p.write(
        "p.yaml",
        &yaml.replace("mode: per_step", "mode: per_step, on_error: skip"),
    );
    p.run_ok("p.yaml", &[]);
    let st = p.anneal(&["status", "p.yaml", "--json"]).json();
    let report = &st["stages"][0]["report"];
    assert_eq!(report["rows_in"], 5);
    assert_eq!(report["skipped"], 2);
    assert_eq!(report["rows_out"], 3);
    assert_eq!(p.read("out.jsonl").lines().count(), 3);
}

#[test]
fn data_stage_params_and_io_names_are_checked_before_running() {
    let p = Project::new();
    p.write("traces.jsonl", TRACE);
    p.write(
        "p.yaml",
        "stages:\n  s:\n    kind: agent_samples\n    deps: {trace: traces.jsonl}\n    params: {mod: per_step}\n    outs: {samples: out.jsonl}\n  split:\n    kind: train_val_split\n    deps: {data: out.jsonl}\n    params: {val_ratio: 1.5}\n    outs: {train: t.parquet}\n",
    );
    let r = p.anneal(&["plan", "p.yaml"]);
    assert_eq!(r.code, 2, "{r:?}");
    for part in [
        "p.yaml:4:19: kind 'agent_samples' has no input 'trace' (stage 's')",
        "did you mean 'traces'?",
        "p.yaml:5:19: stage 's': params.mod: unknown param 'mod'; did you mean 'mode'?",
        "p.yaml:10:25: stage 'split': params.val_ratio: val_ratio must be between 0 and 1 (exclusive), got 1.5",
        "stage 'split' of kind 'train_val_split' needs output 'val' under outs:",
    ] {
        assert!(
            r.stderr.contains(part),
            "missing {part:?} in:\n{}",
            r.stderr
        );
    }
}

#[test]
fn summary_datasets_leave_out_rows_without_summaries() {
    let p = Project::new();
    p.write(
        "in.jsonl",
        concat!(
            r#"{"prompt": [{"role": "user", "content": "Q1"}], "extra_info": {"question": "Q1", "answer": "A1"}, "summary": "S1"}"#, "\n",
            r#"{"prompt": [{"role": "user", "content": "Q2"}], "extra_info": {"question": "Q2", "answer": "A2"}, "summary": ""}"#, "\n",
            r#"{"prompt": [{"role": "user", "content": "Q3"}], "extra_info": {"question": "Q3", "answer": "A3"}}"#, "\n",
        ),
    );
    p.write("p.yaml", "stages:\n  d:\n    kind: summary_datasets\n    deps: {samples: in.jsonl}\n    outs: {prefix: prefix.jsonl, summary_only: only.parquet}\n");
    p.run_ok("p.yaml", &[]);
    let prefix: Vec<serde_json::Value> = p
        .read("prefix.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(prefix.len(), 1);
    assert_eq!(prefix[0]["extra_info"]["answer"], "S1\n\nA1");
    let st = p.anneal(&["status", "p.yaml", "--json"]).json();
    let report = &st["stages"][0]["report"];
    assert_eq!(
        (
            report["empty_summary"].as_u64(),
            report["missing_summary"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(report["summary_only_rows"], 1);
}
