//! `pipelines/tau2_sft.yaml`: ShareGPT tool-calling dialogues cleaned by
//! `conversation_transform`, exported for LLaMA-Factory (read back by a
//! Python check of its alternation rule), trained and evaluated per dataset
//! variant; editing one variant reruns only its branch.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

const VARIANTS: [&str; 4] = ["v0", "v5", "v10", "v20"];

fn check_llamafactory(dir: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/check_llamafactory.py");
    python_json(
        &[script.as_os_str(), dir.as_os_str()],
        &format!("{} on {}", script.display(), dir.display()),
    )
}

#[test]
fn tau2_matrix_cleans_exports_trains_evaluates_and_reruns_one_branch() {
    let p = Project::new();
    copy_pipelines(&p);
    let file = "pipelines/tau2_sft.yaml";
    let yaml = p
        .read(file)
        .replace("  steps: 4", "  steps: 2")
        .replace("  cutoff_len: 4096", "  cutoff_len: 2048");
    p.write(file, &yaml);
    let out = p.run_ok(file, &[]);
    assert_eq!(out.len(), 1 + 1 + 5 * VARIANTS.len(), "{out:?}");
    assert!(out.iter().all(|(_, o)| o == "done"), "{out:?}");

    // The base dialogues' seeded defects (bench/gen_tau2.py lists them by
    // index) are dropped or repaired, identically in every variant; the
    // variants differ only by their clean recovery dialogues.
    let extra = [0, 2, 4, 7];
    for (v, extra) in VARIANTS.iter().zip(extra) {
        let r = p.report(file, &format!("clean@{v}"));
        assert_eq!(r["conversations_in"], 36 + extra, "{v}: {r}");
        assert_eq!(r["conversations_out"], 22 + extra, "{v}: {r}");
        assert_eq!(r["fix_arguments_dropped_tool_markup_in_text"], 4, "{r}");
        assert_eq!(r["fix_arguments_turns_changed"], 6, "{r}");
        assert_eq!(r["validate_tool_calls_dropped_unknown_tool"], 2, "{r}");
        assert_eq!(
            r["validate_tool_calls_dropped_missing_required_argument"], 4,
            "two missing keys and two unparseable argument strings: {r}"
        );
        assert_eq!(r["validate_tool_calls_dropped_unknown_argument"], 2, "{r}");
        assert_eq!(
            r["validate_tool_calls_dropped_wrong_argument_type"], 2,
            "{r}"
        );
        assert_eq!(
            r["validate_tool_calls_turns_changed"], 2,
            "order_id repairs: {r}"
        );
        assert_eq!(r["trim_trailing_user_turns_changed"], 2, "{r}");
    }
    let full: Value =
        serde_json::from_str(&p.read("pipelines/work/tau2/v0/clean_report.json")).unwrap();
    let steps: Vec<&str> = full["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "fix_arguments",
            "to_hermes",
            "validate_tool_calls",
            "drop_think",
            "set_system_prompt",
            "merge_consecutive",
            "trim_trailing_user",
            "validate"
        ]
    );
    let stats = &full["stats"];
    assert_eq!(
        stats["domains"]["airline"].as_u64().unwrap()
            + stats["domains"]["retail"].as_u64().unwrap(),
        22
    );
    assert!(stats["tokens"]["max"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(stats["over_cutoff"].is_number(), "{stats}");

    // The cleaned rows: Hermes calls, the domain's full system prompt, alternating roles.
    let rows: Vec<Value> = p
        .read("pipelines/work/tau2/v0/clean.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let airline = p.read("pipelines/data/tau2/system_prompts/airline.txt");
    let retail = p.read("pipelines/data/tau2/system_prompts/retail.txt");
    for r in &rows {
        let s = r["system"].as_str().unwrap();
        assert!(s == airline.trim_end() || s == retail.trim_end(), "{s}");
        for (i, t) in r["conversations"].as_array().unwrap().iter().enumerate() {
            let from = t["from"].as_str().unwrap();
            assert_eq!(from, if i % 2 == 0 { "human" } else { "gpt" });
            let v = t["value"].as_str().unwrap();
            assert!(!v.contains("<think>"), "{v}");
            if v.contains("<tool_call>") {
                assert!(
                    v.starts_with("I will call the function ") || !v.starts_with("<tool_call>"),
                    "{v}"
                );
            }
        }
    }
    assert!(
        rows.iter()
            .any(|r| r.to_string().contains(r##"\"order_id\": \"#W"##)),
        "repaired ids"
    );

    // LLaMA-Factory's reading of the export (training and held-out
    // dialogues), by an independent Python check.
    let heldout = p.report(file, "clean_heldout")["conversations_out"]
        .as_u64()
        .unwrap();
    assert!(heldout > 0);
    for (v, extra) in VARIANTS.iter().zip(extra) {
        let dir = p.path(&format!("pipelines/work/tau2/{v}/llamafactory"));
        let got = check_llamafactory(&dir);
        assert_eq!(got["conversations"], 22 + extra + heldout);
        assert_eq!(got["invalid"], json!([]));
        let info: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("dataset_info.json")).unwrap())
                .unwrap();
        assert_eq!(
            info[format!("tau2_{v}_val")]["file_name"],
            format!("tau2_{v}_val.json")
        );
        let r = p.report(file, &format!("export@{v}"));
        assert_eq!(r["val_conversations"], heldout, "{r}");
    }
    let yaml = p.read("pipelines/work/tau2/v5/llamafactory_train.yaml");
    for line in [
        "stage: sft",
        "dataset: tau2_v5",
        "dataset_dir: llamafactory",
        "template: qwen",
        "max_steps: 2",
        "disable_gradient_checkpointing: true",
        "packing: false",
        "neat_packing: false",
        "enable_thinking: false",
        "eval_dataset: tau2_v5_val",
        "do_eval: true",
        "eval_strategy: 'no'",
    ] {
        assert!(yaml.lines().any(|l| l == line), "{line} in\n{yaml}");
    }
    // As LLaMA-Factory reads it: PyYAML, YAML 1.1 (an unquoted `no` would be False).
    let config = p.path("pipelines/work/tau2/v5/llamafactory_train.yaml");
    let lf = python_json(
        &[
            "-c".as_ref(),
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))".as_ref(),
            config.as_os_str(),
        ],
        "PyYAML (pip install pyyaml)",
    );
    assert_eq!(lf["eval_strategy"], "no", "{lf}");
    assert_eq!(lf["do_eval"], true, "{lf}");
    assert!(lf["learning_rate"].is_f64(), "{lf}");

    // The four evaluations on the same held-out dialogues, side by side.
    let m = p.anneal(&["metrics", file, "-s", "eval", "--json"]);
    assert_eq!(m.code, 0, "{m:?}");
    let m = m.json();
    assert_eq!(
        m["stages"],
        json!(["eval@v0", "eval@v5", "eval@v10", "eval@v20"])
    );
    let tokens = &m["metrics"]["tokens"];
    for v in VARIANTS {
        assert_eq!(
            tokens[format!("eval@{v}")]["value"],
            tokens["eval@v0"]["value"]
        );
        assert!(
            m["metrics"]["loss"][format!("eval@{v}")]["value"]
                .as_f64()
                .unwrap()
                > 0.0
        );
    }
    assert!(
        m["metrics"]["detailed.tool_call.tokens"]["eval@v0"]["value"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{m}"
    );

    // One variant edited: only its branch would run.
    let path = "pipelines/data/tau2/variant_5.json";
    let mut data: Vec<Value> = serde_json::from_str(&p.read(path)).unwrap();
    data.pop();
    p.write(path, &serde_json::to_string(&data).unwrap());
    for (stage, state, why) in p.plan(file) {
        match stage.as_str() {
            "clean@v5" => assert_eq!(
                (state.as_str(), why),
                (
                    "run",
                    vec!["input changed: data/tau2/variant_5.json".to_owned()]
                )
            ),
            s if s.ends_with("@v5") => assert_eq!(state, "may run", "{stage}"),
            _ => assert_eq!(state, "cached", "{stage}"),
        }
    }
}

#[test]
fn transform_errors_name_the_step_and_the_record() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "stages:\n  clean:\n    kind: conversation_transform\n    deps: {data: d.json}\n    \
         params: {steps: [fix_arguments, {drop_thinks: {}}]}\n    outs: {data: out.json}\n",
    );
    p.write("d.json", "[]");
    let r = p.anneal(&["plan", "p.yaml"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("params.steps[1]"), "{r:?}");
    assert!(r.stderr.contains("did you mean 'drop_think'"), "{r:?}");

    p.write(
        "p.yaml",
        &p.read("p.yaml").replace("{drop_thinks: {}}", "validate"),
    );
    p.write(
        "d.json",
        r#"[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"conversations": [{"from": "human"}]}]"#,
    );
    let r = p.anneal(&["run", "p.yaml"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("d.json[1]: conversations[0] needs string 'from' and 'value'"),
        "{r:?}"
    );
    assert!(!p.exists("out.json"));

    p.write(
        "p.yaml",
        &p.read("p.yaml").replace("steps:", "on_error: skip, steps:"),
    );
    p.run_ok("p.yaml", &[]);
    let out: Vec<Value> = serde_json::from_str(&p.read("out.json")).unwrap();
    assert_eq!(out.len(), 1);

    // validate_tool_calls without schemas says which input is missing.
    p.write(
        "p.yaml",
        &p.read("p.yaml")
            .replace("validate]", "validate_tool_calls]"),
    );
    let r = p.anneal(&["run", "p.yaml"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("declare the input `tool_schemas`"),
        "{r:?}"
    );
}
