//! The `evaluate` stage on GSM8K (`../shared/data/gsm8k/test.jsonl`): with
//! SmolLM2-135M in-process on CPU, and through `backend: openai` against the
//! mock server with scripted replies whose scores are known in advance;
//! then `anneal metrics` side by side.

mod common;
#[allow(dead_code)]
#[path = "support/mock_openai.rs"]
mod mock_openai;

use std::path::{Path, PathBuf};

use common::*;
use mock_openai::{Config, Fault, FaultKind, MockServer};
use serde_json::Value;

fn smollm2_dir() -> PathBuf {
    let dir = std::env::var_os("ANNEAL_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/smollm2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "SmolLM2 checkpoint not found in {}; build it with `bash .ci/smollm2.sh`",
        dir.display()
    );
    dir
}

/// The first `n` GSM8K test rows, as JSON.
fn gsm8k(n: usize) -> Vec<Value> {
    std::fs::read_to_string(shared("data/gsm8k/test.jsonl"))
        .expect("../shared/data/gsm8k/test.jsonl")
        .lines()
        .take(n)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The number after `####` in a GSM8K answer, commas removed.
fn final_answer(row: &Value) -> String {
    let a = row["answer"].as_str().unwrap();
    a.rsplit("####").next().unwrap().trim().replace(',', "")
}

fn read_jsonl(p: &Project, rel: &str) -> Vec<Value> {
    p.read(rel)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn metrics(p: &Project, rel: &str) -> Value {
    serde_json::from_str(&p.read(rel)).unwrap()
}

fn project_with_data(n: usize) -> Project {
    let p = Project::new();
    let rows: String = gsm8k(n).iter().map(|r| format!("{r}\n")).collect();
    p.write("gsm8k.jsonl", &rows);
    p
}

#[test]
fn gsm8k_with_smollm2_on_cpu_writes_metrics_results_and_csv() {
    let p = project_with_data(20);
    let model = smollm2_dir();
    p.write(
        "p.yaml",
        &format!(
            "stages:\n  eval:\n    kind: evaluate\n    deps: {{data: gsm8k.jsonl, model: \"{}\"}}\n    \
             params: {{task: gsm8k, limit: 20, max_tokens: 48, batch_size: 20}}\n    \
             outs: {{metrics: out/metrics.json, results: out/results.jsonl, csv: out/results.csv}}\n",
            model.display()
        ),
    );
    assert_eq!(p.run_ok("p.yaml", &[]), pairs(&[("eval", "done")]));
    let m = metrics(&p, "out/metrics.json");
    assert_eq!(m["task"], "gsm8k");
    assert_eq!(m["examples"], 20);
    assert_eq!(p.report("p.yaml", "eval")["called"], 20);
    assert!(p.report("p.yaml", "eval")["tokens_per_s"].as_f64().unwrap() > 0.0);
    let results = read_jsonl(&p, "out/results.jsonl");
    assert_eq!(results.len(), 20);
    // The metrics are the means of the per-example results, which follow the data.
    let rows = gsm8k(20);
    let mean = |f: &dyn Fn(&Value) -> bool| {
        results.iter().filter(|r| f(r)).count() as f64 / results.len() as f64
    };
    for (r, row) in results.iter().zip(&rows) {
        assert_eq!(r["question"], row["question"]);
        assert_eq!(r["reference_answer"].as_str().unwrap(), final_answer(row));
        assert!(r["generated"].is_string());
    }
    let close = |a: &Value, b: f64| (a.as_f64().unwrap() - b).abs() < 1e-4;
    let mm = &m["metrics"];
    assert!(close(&mm["accuracy"], mean(&|r| r["correct"] == true)));
    assert!(close(
        &mm["thinking_proportion"],
        mean(&|r| !r["extracted_reasoning"].as_str().unwrap().trim().is_empty())
    ));
    assert!(close(
        &mm["answer_proportion"],
        mean(&|r| !r["extracted_answer"].as_str().unwrap().is_empty())
    ));
    // Greedy decoding: the reply to each question is fixed and generated for 48 tokens at most.
    let total: u64 = m["generation"]["completion_tokens"].as_u64().unwrap();
    assert!(total > 0 && total <= 20 * 48, "{total}");

    // The CSV, read by Python's csv module: a header and one row per question.
    let csv = python_json(
        &[
            "-c".as_ref(),
            "import csv,sys,json; r=list(csv.DictReader(open(sys.argv[1], newline=''))); print(json.dumps(r))"
                .as_ref(),
            p.path("out/results.csv").as_os_str(),
        ],
        "Python's csv reader",
    );
    let csv = csv.as_array().expect("a list of rows");
    assert_eq!(csv.len(), 20);
    for key in [
        "question",
        "reference_reasoning",
        "reference_answer",
        "generated",
        "extracted_reasoning",
        "extracted_answer",
        "correct",
    ] {
        assert!(csv[0].get(key).is_some(), "CSV column {key}");
    }
    assert_eq!(csv[3]["question"], rows[3]["question"]);
    assert_eq!(csv[3]["generated"], results[3]["generated"]);
    assert!(
        !csv[0]["reference_reasoning"]
            .as_str()
            .unwrap()
            .contains("<<")
    );

    // Fewer questions: a new stage key, but every reply comes from the journal.
    p.write(
        "p.yaml",
        &p.read("p.yaml").replace("limit: 20", "limit: 10"),
    );
    assert_eq!(p.run_ok("p.yaml", &[]), pairs(&[("eval", "done")]));
    let m10 = metrics(&p, "out/metrics.json");
    assert_eq!(m10["examples"], 10);
    assert_eq!(p.report("p.yaml", "eval")["cached"], 10);
    assert_eq!(p.report("p.yaml", "eval")["called"], 0);
    let r10 = read_jsonl(&p, "out/results.jsonl");
    assert_eq!(r10[..], results[..10], "same replies as the first run");
}

/// A reply in the default format: working out between the reasoning markers,
/// the answer between the solution markers.
fn tagged(reasoning: &str, answer: &str) -> String {
    format!("<start_working_out>{reasoning}<end_working_out><SOLUTION>{answer}</SOLUTION>")
}

#[test]
fn gsm8k_through_openai_against_the_mock_scores_known_replies() {
    let rows = gsm8k(20);
    // Question i: 0 mod 4 right, 1 wrong, 2 right written as "$N.0", 3 without
    // any markers (neither reasoning nor answer found).
    let mut replies = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let q: String = r["question"].as_str().unwrap().chars().take(60).collect();
        let a = final_answer(r);
        let n: f64 = a.parse().unwrap();
        let reply = match i % 4 {
            0 => tagged("Let me work it out.", &a),
            1 => tagged("A slip here.", &format!("{}", n + 1.0)),
            2 => tagged("Careful sums.", &format!("${n:.1}")),
            _ => format!("The answer is {a}."),
        };
        replies.push((q, reply));
    }
    let server = MockServer::start(Config {
        latency_ms: 1,
        replies,
        faults: vec![Fault::new(
            rows[5]["question"]
                .as_str()
                .unwrap()
                .chars()
                .take(40)
                .collect::<String>(),
            FaultKind::BadRequest,
            1,
        )],
        record_bodies: true,
        ..Config::default()
    });
    let p = project_with_data(20);
    p.write(
        "p.yaml",
        &format!(
            "stages:\n  eval:\n    kind: evaluate\n    deps: {{data: gsm8k.jsonl}}\n    \
             params: {{task: gsm8k, backend: openai, base_url: \"{}\", model: mock, max_concurrent: 4, retry_base_s: 0.01}}\n    \
             outs: {{metrics: metrics.json, csv: results.csv}}\n",
            server.url
        ),
    );
    // One request is refused: the stage fails, keeping the other replies.
    let r = p.anneal(&["run", "p.yaml"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("1 generation(s) failed (max_failures: 0)"),
        "{r:?}"
    );
    assert!(r.stderr.contains("gsm8k.jsonl:6: HTTP 400"), "{r:?}");
    assert!(!p.exists("metrics.json"));
    assert_eq!(server.requests(), 20);
    // The rerun asks only for the failed one.
    assert_eq!(p.run_ok("p.yaml", &[]), pairs(&[("eval", "done")]));
    assert_eq!(server.requests(), 21);
    let m = metrics(&p, "metrics.json");
    assert_eq!(m["examples"], 20);
    assert_eq!(p.report("p.yaml", "eval")["cached"], 19);
    assert_eq!(p.report("p.yaml", "eval")["called"], 1);
    let mm = &m["metrics"];
    assert_eq!(mm["accuracy"], 0.5, "{m}");
    assert_eq!(mm["thinking_proportion"], 0.75, "{m}");
    assert_eq!(mm["answer_proportion"], 0.75, "{m}");
    // Greedy by default, the format's system prompt first, the question as the user message.
    let body = &server.bodies()[0];
    assert_eq!(body["temperature"], 0.0);
    assert_eq!(body["messages"][0]["role"], "system");
    assert!(
        body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("<SOLUTION>")
    );
    assert_eq!(body["messages"][1]["role"], "user");
    assert!(body.get("chat_template_kwargs").is_none(), "{body}");

    // `anneal metrics`: two evaluations of the same data side by side.
    let yaml = p.read("p.yaml");
    p.write(
        "p.yaml",
        &format!(
            "{yaml}  eval_boxed:\n    kind: evaluate\n    deps: {{data: gsm8k.jsonl}}\n    \
             params: {{task: gsm8k, answer_format: boxed, backend: openai, base_url: \"{}\", model: mock}}\n    \
             outs: {{metrics: boxed.json}}\n  eval_n2:\n    kind: evaluate\n    deps: {{data: gsm8k.jsonl}}\n    \
             params: {{task: gsm8k, n: 2, temperature: 0.7, seed: 1, chat_template_kwargs: {{enable_thinking: false}}, backend: openai, base_url: \"{}\", model: mock}}\n    \
             outs: {{metrics: n2.json, results: n2.jsonl}}\n",
            server.url, server.url
        ),
    );
    p.run_ok("p.yaml", &[]);
    // Template variables reach a vLLM-style server with the request.
    let sampled: Vec<Value> = server
        .bodies()
        .into_iter()
        .filter(|b| b["temperature"] == 0.7)
        .collect();
    assert_eq!(sampled.len(), 40);
    assert!(
        sampled
            .iter()
            .all(|b| b["chat_template_kwargs"] == serde_json::json!({"enable_thinking": false})),
        "{:?}",
        sampled[0]
    );
    let boxed = metrics(&p, "boxed.json");
    assert_eq!(
        boxed["metrics"]["accuracy"], 0.0,
        "no \\boxed{{}} in the replies"
    );
    // Two samples per question, each its own request (seeds 1 and 2).
    let n2 = metrics(&p, "n2.json");
    assert_eq!(n2["examples"], 20);
    assert_eq!(n2["samples"], 40);
    assert_eq!(n2["metrics"]["pass@2"], 0.5, "{n2}");
    assert_eq!(n2["metrics"]["accuracy"], 0.5, "{n2}");
    assert_eq!(p.report("p.yaml", "eval_n2")["called"], 40);
    let seeds: Vec<Value> = server
        .bodies()
        .iter()
        .filter(|b| b["temperature"] == 0.7)
        .map(|b| b["seed"].clone())
        .collect();
    assert_eq!(seeds.len(), 40);
    assert_eq!(seeds.iter().filter(|s| **s == 1).count(), 20);
    assert_eq!(seeds.iter().filter(|s| **s == 2).count(), 20);
    let j = p.anneal(&["metrics", "p.yaml", "--json"]);
    assert_eq!(j.code, 0, "{j:?}");
    let j = j.json();
    assert_eq!(
        j["stages"],
        serde_json::json!(["eval", "eval_boxed", "eval_n2"])
    );
    assert_eq!(j["baseline"], "eval");
    assert_eq!(j["metrics"]["accuracy"]["eval"]["value"], 0.5);
    assert_eq!(j["metrics"]["accuracy"]["eval_boxed"]["delta"], -0.5);
    let t = p.anneal(&["metrics", "p.yaml", "--baseline", "eval_boxed"]);
    assert_eq!(t.code, 0, "{t:?}");
    let line = t
        .stdout
        .lines()
        .find(|l| l.starts_with("accuracy"))
        .unwrap_or_else(|| panic!("{t:?}"));
    assert!(line.contains("0.5 (+0.5)"), "{line}");
}

#[test]
fn a_killed_evaluation_resumes_without_asking_twice() {
    let rows = gsm8k(60);
    let server = MockServer::start(Config {
        latency_ms: 40,
        ..Config::default()
    });
    let p = Project::new();
    let data: String = rows.iter().map(|r| format!("{r}\n")).collect();
    p.write("gsm8k.jsonl", &data);
    p.write(
        "p.yaml",
        &format!(
            "stages:\n  eval:\n    kind: evaluate\n    deps: {{data: gsm8k.jsonl}}\n    \
             params: {{task: gsm8k, backend: openai, base_url: \"{}\", model: mock, max_concurrent: 4}}\n    \
             outs: {{metrics: metrics.json}}\n",
            server.url
        ),
    );
    let mut child = p.spawn(&["run", "p.yaml"]);
    wait_for("15 answered requests", || server.answered_total() >= 15);
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(server.requests() < 60, "finished before the kill");
    assert!(!p.exists("metrics.json"));
    p.run_ok("p.yaml", &[]);
    let answered = server.answered();
    assert_eq!(answered.len(), 60, "every question was answered");
    let twice = answered.values().filter(|&&n| n > 1).count();
    assert!(twice <= 4, "{twice} questions answered twice");
    // Answered by the server but still in flight to the client when killed: at
    // most max_concurrent (4) of the 15.
    assert!(p.report("p.yaml", "eval")["cached"].as_u64().unwrap() >= 11);
    assert_eq!(metrics(&p, "metrics.json")["examples"], 60);
}
