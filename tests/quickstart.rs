//! The README's quickstart pipeline runs, is cached on rerun, and reacts to a param change.

mod common;

use common::*;

#[test]
fn quickstart_runs_then_is_cached_then_reacts_to_a_param() {
    let p = Project::new();
    copy_pipelines(&p);
    let file = "pipelines/quickstart.yaml";
    let out = p.run_ok(file, &[]);
    assert_eq!(
        out,
        pairs(&[
            ("prepare", "done"),
            ("split", "done"),
            ("stats@train", "done"),
            ("stats@val", "done"),
            ("base_model", "done"),
            ("report", "done")
        ])
    );
    // The base model is a complete HF checkpoint that anneal itself can run.
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    ] {
        assert!(p.exists(&format!("pipelines/work/base_model/{f}")), "{f}");
    }
    let g = p.anneal(&[
        "model",
        "generate",
        "pipelines/work/base_model",
        "--chat",
        "-p",
        "2 + 3?",
        "--max-new-tokens",
        "4",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(g.code, 0, "{g:?}");
    assert_eq!(g.json()["new_tokens"], 4);
    // Every sample of the input lands in exactly one split.
    let input = p.read("pipelines/data/gsm8k_sample.jsonl").lines().count();
    let train = p.read("pipelines/work/train.jsonl").lines().count();
    let val = p.read("pipelines/work/val.jsonl").lines().count();
    assert_eq!(train + val, input);
    assert!(val > 0 && train > val, "train {train}, val {val}");
    let stats: serde_json::Value =
        serde_json::from_str(&p.read("pipelines/work/stats/val.json")).unwrap();
    assert_eq!(stats["samples"], val);
    assert!(
        p.read("pipelines/work/report.md")
            .contains(&format!("| samples | {train} | {val} |"))
    );

    assert!(p.run_ok(file, &[]).iter().all(|(_, o)| o == "cached"));

    let yaml = p
        .read(file)
        .replace("val_fraction: 0.2", "val_fraction: 0.3");
    p.write(file, &yaml);
    let plan = p.plan(file);
    assert_eq!(plan[0].1, "cached");
    assert_eq!(
        (plan[1].1.as_str(), plan[1].2.clone()),
        ("run", vec!["params.val_fraction 0.2 -> 0.3".to_owned()])
    );
    let out = p.run_ok(file, &[]);
    assert_eq!(out[0].1, "cached");
    assert_eq!(out[1].1, "done");
}
