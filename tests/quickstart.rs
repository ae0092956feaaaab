//! The README's quickstart pipeline: traces -> samples -> local summaries ->
//! datasets -> splits -> three phases -> evaluations -> `anneal metrics`,
//! offline with no API key; cached on rerun; a param change reruns only what
//! depends on it.

mod common;

use common::*;
use serde_json::Value;

fn read_json(p: &Project, rel: &str) -> Value {
    serde_json::from_str(&p.read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn quickstart_runs_offline_then_is_cached_then_reacts_to_a_param() {
    let p = Project::new();
    copy_pipelines(&p);
    let file = "pipelines/quickstart.yaml";
    // No key and an unroutable API address: nothing may reach out.
    let env = [
        ("OPENAI_API_KEY", ""),
        ("HTTPS_PROXY", "http://127.0.0.1:9"),
        ("HTTP_PROXY", "http://127.0.0.1:9"),
    ];
    let out = p.run_ok_env(file, &[], &env);
    let names: Vec<&str> = out.iter().map(|(s, _)| s.as_str()).collect();
    for stage in [
        "per_step",
        "multiturn",
        "base_model",
        "summarize",
        "summary_datasets",
        "split@multiturn",
        "split@summary_only",
        "split@prefix",
        "phase1",
        "phase2",
        "phase3",
        "eval_phase1",
        "eval_phase2",
        "eval_phase3",
        "generate_phase3",
    ] {
        assert!(names.contains(&stage), "{stage} missing from {names:?}");
    }
    assert!(out.iter().all(|(_, o)| o == "done"), "{out:?}");

    // Every per-step sample got a summary from the local model.
    let samples = p.read("pipelines/work/per_step.jsonl").lines().count();
    let summarized: Vec<Value> = p
        .read("pipelines/work/summarized.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(summarized.len(), samples);
    assert!(summarized.iter().all(|r| r["summary"].is_string()));
    let report = |stage: &str| p.report(file, stage);
    assert_eq!(report("summarize")["called"], samples);
    assert!(report("summarize")["completion_tokens"].as_u64().unwrap() > 0);

    // The three phases evaluated on the same held-out samples, then compared.
    let val_rows = report("split@prefix")["val_rows"].as_u64().unwrap();
    for phase in ["phase1", "phase2", "phase3"] {
        let m = read_json(&p, &format!("pipelines/work/eval/{phase}.json"));
        assert_eq!(m["task"], "teacher_forced");
        assert_eq!(m["examples"], val_rows, "{m}");
        let loss = m["metrics"]["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{m}");
        let ppl = m["metrics"]["perplexity"].as_f64().unwrap();
        assert!((ppl - loss.exp().min(1e6)).abs() / ppl < 1e-3, "{m}");
        let top1 = &m["metrics"]["detailed"]["all"];
        assert!(top1.is_object(), "{m}");
    }
    let g = read_json(&p, "pipelines/work/eval/phase3_generate.json");
    assert_eq!(g["task"], "summary_reasoning");
    assert_eq!(g["examples"], 4.min(val_rows));
    for k in ["format_valid", "next_step_exact_match", "next_step_f1"] {
        assert!(g["metrics"][k].is_number(), "{k}: {g}");
    }
    // Lengths are counted with the generating model's own tokenizer.
    assert_eq!(g["generation"]["length_unit"], "tokens", "{g}");
    let m = p.anneal(&[
        "metrics",
        file,
        "-s",
        "eval_phase1",
        "-s",
        "eval_phase2",
        "-s",
        "eval_phase3",
    ]);
    assert_eq!(m.code, 0, "{m:?}");
    let header = m.stdout.lines().next().unwrap();
    assert!(
        header.contains("eval_phase1 (baseline)") && header.contains("eval_phase3"),
        "{m:?}"
    );
    assert!(m.stdout.lines().any(|l| l.starts_with("loss ")), "{m:?}");

    // A second run does nothing.
    assert!(
        p.run_ok_env(file, &[], &env)
            .iter()
            .all(|(_, o)| o == "cached")
    );

    // A new split ratio reruns the splits and what follows them, not the summaries.
    let yaml = p.read(file).replace("val_ratio: 0.25", "val_ratio: 0.3");
    p.write(file, &yaml);
    let plan = p.plan(file);
    let state = |s: &str| {
        plan.iter()
            .find(|(n, _, _)| n == s)
            .unwrap_or_else(|| panic!("{s} not in plan"))
            .clone()
    };
    assert_eq!(state("summarize").1, "cached");
    assert_eq!(state("base_model").1, "cached");
    let split = state("split@prefix");
    assert_eq!(split.1, "run");
    assert_eq!(split.2, ["params.val_ratio 0.25 -> 0.3"]);
}
