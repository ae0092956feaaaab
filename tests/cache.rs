//! Caching behaviour of `anneal run` and `anneal plan` on a real pipeline.

mod common;

use common::*;

const PIPELINE: &str = r#"name: t
vars: {lr: 1.0e-5}
stages:
  prep:
    kind: command
    cmd: tr a-z A-Z < ${deps.raw} > ${outs.data}; echo prep >> calls.log
    deps: {raw: data/raw.txt}
    outs: {data: prep.txt}
  train:
    kind: command
    cmd: (cat ${deps.data}; echo "lr=${params.lr}") > ${outs.model}; echo train >> calls.log
    deps: {data: ${stages.prep.outs.data}}
    params: {lr: ${vars.lr}}
    outs: {model: model/weights.txt}
  eval:
    kind: command
    cmd: wc -l < ${deps.model} > ${outs.score}; echo eval >> calls.log
    deps: {model: ${stages.train.outs.model}}
    outs: {score: score.txt}
  other:
    kind: command
    cmd: echo independent > ${outs.o}; echo other >> calls.log
    outs: {o: other.txt}
"#;

fn project() -> Project {
    let p = Project::new();
    p.write("data/raw.txt", "hello\nworld\n");
    p.write("p.yaml", PIPELINE);
    p
}

fn calls(p: &Project) -> Vec<String> {
    if !p.exists("calls.log") {
        return Vec::new();
    }
    let v = p.read("calls.log").lines().map(str::to_owned).collect();
    std::fs::remove_file(p.path("calls.log")).unwrap();
    v
}

#[test]
fn first_run_runs_everything_and_second_run_is_all_cached() {
    let p = project();
    let plan = p.plan("p.yaml");
    let states: Vec<(&str, &str)> = plan
        .iter()
        .map(|(s, st, _)| (s.as_str(), st.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("prep", "run"),
            ("train", "may run"),
            ("eval", "may run"),
            ("other", "run")
        ]
    );
    assert_eq!(plan[0].2, ["new stage"]);

    let out = p.run_ok("p.yaml", &[]);
    assert!(out.iter().all(|(_, o)| o == "done"), "{out:?}");
    assert_eq!(p.read("prep.txt"), "HELLO\nWORLD\n");
    assert_eq!(p.read("model/weights.txt"), "HELLO\nWORLD\nlr=1e-5\n");
    assert_eq!(p.read("score.txt").trim(), "3");
    assert_eq!(calls(&p).len(), 4);

    let out = p.run_ok("p.yaml", &[]);
    assert!(out.iter().all(|(_, o)| o == "cached"), "{out:?}");
    assert!(calls(&p).is_empty());
    let check = p.anneal(&["plan", "p.yaml", "--check"]);
    assert_eq!(check.code, 0, "{check:?}");
}

#[test]
fn param_change_reruns_exactly_that_stage_and_its_dependents() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    calls(&p);
    p.write("p.yaml", &PIPELINE.replace("lr: 1.0e-5", "lr: 5e-6"));

    let plan = p.plan("p.yaml");
    assert_eq!(plan[0].1, "cached");
    assert_eq!(
        (plan[1].1.as_str(), plan[1].2.clone()),
        ("run", vec!["params.lr 1e-5 -> 5e-6".to_owned()])
    );
    assert_eq!(
        (plan[2].1.as_str(), plan[2].2.clone()),
        ("may run", vec!["after train".to_owned()])
    );
    assert_eq!(plan[3].1, "cached");
    assert_eq!(p.anneal(&["plan", "p.yaml", "--check"]).code, 1);
    let text = p.anneal(&["plan", "p.yaml"]);
    assert!(text.stdout.contains("params.lr 1e-5 -> 5e-6"), "{text:?}");

    let out = p.run_ok("p.yaml", &[]);
    assert_eq!(
        out,
        pairs(&[
            ("prep", "cached"),
            ("train", "done"),
            ("eval", "done"),
            ("other", "cached")
        ])
    );
    assert_eq!(calls(&p), ["train", "eval"]);
    assert_eq!(p.read("model/weights.txt"), "HELLO\nWORLD\nlr=5e-6\n");

    // Switching back restores the earlier outputs without recomputing anything.
    p.write("p.yaml", PIPELINE);
    let out = p.run_ok("p.yaml", &[]);
    assert!(out.iter().all(|(_, o)| o == "cached"), "{out:?}");
    assert!(calls(&p).is_empty());
    assert_eq!(p.read("model/weights.txt"), "HELLO\nWORLD\nlr=1e-5\n");
}

#[test]
fn input_byte_change_reruns_the_reader_and_its_dependents() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    calls(&p);
    p.write("data/raw.txt", "hello\nworle\n");
    let plan = p.plan("p.yaml");
    assert_eq!(
        (plan[0].1.as_str(), plan[0].2.clone()),
        ("run", vec!["input changed: data/raw.txt".to_owned()])
    );
    assert_eq!(plan[1].1, "may run");
    assert_eq!(plan[3].1, "cached");
    let out = p.run_ok("p.yaml", &[]);
    assert_eq!(
        out,
        pairs(&[
            ("prep", "done"),
            ("train", "done"),
            ("eval", "done"),
            ("other", "cached")
        ])
    );
    assert_eq!(calls(&p), ["prep", "train", "eval"]);
}

#[test]
fn early_cutoff_keeps_downstream_cached_when_outputs_are_identical() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    calls(&p);
    // Same output, different command: prep reruns, its output is byte-identical.
    p.write(
        "p.yaml",
        &PIPELINE.replace("tr a-z A-Z", "tr '[:lower:]' '[:upper:]'"),
    );
    let plan = p.plan("p.yaml");
    assert_eq!(
        (plan[0].1.as_str(), plan[0].2.clone()),
        ("run", vec!["cmd changed".to_owned()])
    );
    let out = p.run_ok("p.yaml", &[]);
    assert_eq!(
        out,
        pairs(&[
            ("prep", "done"),
            ("train", "cached"),
            ("eval", "cached"),
            ("other", "cached")
        ])
    );
    assert_eq!(calls(&p), ["prep"]);
}

#[test]
fn deleted_or_edited_outputs_are_restored_from_the_store() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    calls(&p);
    std::fs::remove_dir_all(p.path("model")).unwrap();
    p.write("score.txt", "tampered\n");
    let r = p.anneal(&["plan", "p.yaml", "--json"]);
    let restore: Vec<bool> = r.json()["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["restore"].as_bool().unwrap())
        .collect();
    assert_eq!(restore, [false, true, true, false]);
    let out = p.run_ok("p.yaml", &[]);
    assert!(out.iter().all(|(_, o)| o == "cached"), "{out:?}");
    assert!(calls(&p).is_empty());
    assert_eq!(p.read("model/weights.txt"), "HELLO\nWORLD\nlr=1e-5\n");
    assert_eq!(p.read("score.txt").trim(), "3");
}

#[test]
fn force_and_stage_selection() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    calls(&p);
    let out = p.run_ok("p.yaml", &["--force", "train"]);
    assert_eq!(
        out,
        pairs(&[
            ("prep", "cached"),
            ("train", "done"),
            ("eval", "cached"),
            ("other", "cached")
        ])
    );
    let plan = p
        .anneal(&["plan", "p.yaml", "--force", "prep", "--json"])
        .json();
    assert_eq!(plan["stages"][0]["reasons"][0], "forced");
    calls(&p);

    let fresh = project();
    let out = fresh.run_ok("p.yaml", &["--stage", "train"]);
    assert_eq!(out, pairs(&[("prep", "done"), ("train", "done")]));
    assert!(!fresh.exists("score.txt"));
    let bad = fresh.anneal(&["run", "p.yaml", "--stage", "trian"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("no stage 'trian'") && bad.stderr.contains("did you mean 'train'?"),
        "{bad:?}"
    );
}

#[test]
fn foreach_and_matrix_fan_out_with_readable_names() {
    let p = Project::new();
    p.write(
        "f.yaml",
        r#"vars:
  lrs: [1.0e-5, 5e-6]
stages:
  data:
    kind: command
    cmd: echo rows > ${outs.d}
    outs: {d: data.txt}
  train:
    foreach: ${vars.lrs}
    kind: command
    cmd: echo "lr=${item}" > ${outs.m}
    deps: {d: ${stages.data.outs.d}}
    outs: {m: "models/${item}.txt"}
  eval:
    foreach: ${vars.lrs}
    kind: command
    cmd: cat ${deps.m} > ${outs.r}
    deps: {m: ${stages.train.outs.m}}
    outs: {r: "evals/${item}.txt"}
  grid:
    matrix: {lr: [1e-5], seed: [1, 2]}
    kind: command
    cmd: echo ${matrix.lr} ${matrix.seed} > ${outs.o}
    outs: {o: "grid/${item.seed}.txt"}
"#,
    );
    let out = p.run_ok("f.yaml", &[]);
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "data",
            "train@1e-5",
            "train@5e-6",
            "eval@1e-5",
            "eval@5e-6",
            "grid@lr=1e-5,seed=1",
            "grid@lr=1e-5,seed=2"
        ]
    );
    assert_eq!(p.read("evals/5e-6.txt"), "lr=5e-6\n");
    assert_eq!(p.read("grid/2.txt"), "1e-5 2\n");
    let out = p.run_ok("f.yaml", &["--force", "train"]);
    let forced: Vec<&str> = out
        .iter()
        .filter(|(_, o)| o == "done")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(forced, ["train@1e-5", "train@5e-6"]);
    let dag = p.anneal(&["dag", "f.yaml"]);
    assert!(
        dag.stdout.contains("eval@5e-6") && dag.stdout.contains("<- train@5e-6"),
        "{dag:?}"
    );
}

#[test]
fn dag_draws_text_dot_and_mermaid() {
    let p = project();
    let text = p.anneal(&["dag", "p.yaml"]);
    assert_eq!(text.code, 0, "{text:?}");
    assert!(
        text.stdout.contains("train") && text.stdout.contains("<- prep"),
        "{text:?}"
    );
    let dot = p.anneal(&["dag", "p.yaml", "--dot"]).stdout;
    assert!(
        dot.starts_with("digraph")
            && dot.contains("\"prep\" -> \"train\";")
            && dot.contains("\"train\" -> \"eval\";"),
        "{dot}"
    );
    let mer = p.anneal(&["dag", "p.yaml", "--mermaid"]).stdout;
    assert!(
        mer.starts_with("flowchart LR") && mer.contains("s0 --> s1") && mer.contains("s1 --> s2"),
        "{mer}"
    );
}

#[test]
fn status_and_gc() {
    let p = project();
    let st = p.anneal(&["status", "p.yaml", "--json"]).json();
    assert_eq!(st["stages"][0]["state"], "never run");
    p.run_ok("p.yaml", &[]);
    p.write("p.yaml", &PIPELINE.replace("lr: 1.0e-5", "lr: 5e-6"));
    p.run_ok("p.yaml", &[]);
    let st = p.anneal(&["status", "p.yaml", "--json"]).json();
    let states: Vec<&str> = st["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["cached", "done", "done", "cached"]);
    let text = p.anneal(&["status", "p.yaml"]);
    assert!(
        text.stdout.contains("STAGE") && text.stdout.contains("train"),
        "{text:?}"
    );

    let records = || {
        std::fs::read_dir(p.path(".anneal/records"))
            .unwrap()
            .count()
    };
    assert_eq!(records(), 6);
    let dry = p
        .anneal(&["gc", "p.yaml", "--keep-last", "1", "--dry-run", "--json"])
        .json();
    assert_eq!(dry["records_removed"], 2);
    assert_eq!(records(), 6);
    let gc = p
        .anneal(&["gc", "p.yaml", "--keep-last", "1", "--json"])
        .json();
    assert_eq!(gc["records_removed"], 2);
    assert!(gc["objects_removed"].as_u64().unwrap() >= 1, "{gc}");
    assert_eq!(records(), 4);
    // The old lr is gone from the store: switching back recomputes it.
    p.write("p.yaml", PIPELINE);
    let plan = p.plan("p.yaml");
    assert_eq!(plan[1].1, "run");
    // The current outputs survive gc and can be restored.
    p.write("p.yaml", &PIPELINE.replace("lr: 1.0e-5", "lr: 5e-6"));
    std::fs::remove_dir_all(p.path("model")).unwrap();
    let out = p.run_ok("p.yaml", &[]);
    assert!(out.iter().all(|(_, o)| o == "cached"), "{out:?}");
    assert_eq!(p.read("model/weights.txt"), "HELLO\nWORLD\nlr=5e-6\n");
}

#[test]
fn secrets_never_reach_logs_records_or_keys() {
    let p = Project::new();
    p.write(
        "s.yaml",
        r#"stages:
  call:
    kind: command
    cmd: echo "token is ${env.MY_API_KEY}"; echo done > ${outs.o}
    params: {auth: "Bearer ${env.MY_API_KEY}"}
    outs: {o: o.txt}
"#,
    );
    let r = p.anneal_env(&["run", "s.yaml"], &[("MY_API_KEY", "sk-very-secret-123")]);
    assert_eq!(r.code, 0, "{r:?}");
    let log = p.read(".anneal/logs/call.log");
    assert!(log.contains("token is ***"), "{log}");
    let mut everything = String::new();
    for e in walk(&p.path(".anneal")) {
        everything.push_str(&String::from_utf8_lossy(&std::fs::read(e).unwrap()));
    }
    assert!(!everything.contains("sk-very-secret-123"));
    assert!(
        everything.contains("${env.MY_API_KEY}"),
        "the variable's name is recorded"
    );
    // A new secret value does not change the key.
    let plan = p
        .anneal_env(&["plan", "s.yaml", "--json"], &[("MY_API_KEY", "another")])
        .json();
    assert_eq!(plan["stages"][0]["state"], "cached");
    // Without it, the stage says what it needs.
    p.write("s.yaml", &p.read("s.yaml").replace("done", "done2"));
    let r = p.anneal_env(&["run", "s.yaml"], &[("MY_API_KEY_UNUSED", "x")]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains("needs the secret environment variable MY_API_KEY"),
        "{r:?}"
    );
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_cached_result_missing_from_the_store_is_recomputed() {
    let p = project();
    p.run_ok("p.yaml", &[]);
    calls(&p);
    // Lose the objects and the workspace copy of train's output.
    std::fs::remove_dir_all(p.path(".anneal/objects")).unwrap();
    std::fs::remove_dir_all(p.path("model")).unwrap();
    let r = p.anneal(&["plan", "p.yaml"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("cannot be restored") || r.stderr.contains("cannot be restored"),
        "{r:?}"
    );
    let plan = p.plan("p.yaml");
    assert_eq!(plan[1].1, "run", "{plan:?}");
    let out = p.run_ok("p.yaml", &[]);
    assert_eq!(out[1], ("train".to_owned(), "done".to_owned()), "{out:?}");
    assert!(calls(&p).contains(&"train".to_owned()));
    assert_eq!(p.read("model/weights.txt"), "HELLO\nWORLD\nlr=1e-5\n");
}

#[test]
fn pipelines_sharing_a_store_keep_their_own_status() {
    let p = Project::new();
    for d in ["a", "b"] {
        p.write(
            &format!("{d}/anneal.yaml"),
            &format!(
                "stages:\n  s:\n    kind: command\n    cmd: echo {d} > ${{outs.o}}\n    outs: {{o: o.txt}}\n"
            ),
        );
    }
    let shared = p.path("shared-store");
    let run = |d: &str, args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_anneal"));
        cmd.args(args)
            .arg(format!("{d}/anneal.yaml"))
            .env("ANNEAL_STORE", &shared)
            .current_dir(p.path(""));
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{d} {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run("a", &["run", "-q"]);
    run("b", &["run", "-q"]);
    let key = |d: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(&run(d, &["status", "--json"])).unwrap();
        v["stages"][0]["key"].as_str().unwrap().to_owned()
    };
    let (ka, kb) = (key("a"), key("b"));
    assert_ne!(ka, kb, "each pipeline shows its own last run");
    // gc for b keeps a's current result.
    run("b", &["gc", "--keep-last", "0"]);
    std::fs::remove_file(p.path("a/o.txt")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&run("a", &["run", "--json"])).unwrap();
    assert_eq!(
        v["stages"][0]["outcome"], "cached",
        "restored from the store: {v}"
    );
    assert_eq!(p.read("a/o.txt"), "a\n");
}

#[test]
fn an_object_edited_through_a_hard_link_is_caught_and_stored_again() {
    use std::os::unix::fs::PermissionsExt;
    let p = project();
    p.write(
        "p.yaml",
        &PIPELINE.replace("name: t\n", "name: t\nstore: {link: hardlink}\n"),
    );
    p.run_ok("p.yaml", &[]);
    calls(&p);
    // The output is the store's object (same inode): editing it edits the object.
    let out = p.path("prep.txt");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    p.write("prep.txt", "HELLO\nWORLD\nedited\n");
    let plan = p.plan("p.yaml");
    assert_eq!(plan[0].1, "run", "{plan:?}");
    assert!(plan[0].2[0].contains("was changed in place"), "{plan:?}");
    let ran = p.run_ok("p.yaml", &[]);
    assert_eq!(ran[0].1, "done", "{ran:?}");
    assert_eq!(p.read("prep.txt"), "HELLO\nWORLD\n");
    // The object holds the right bytes again: a copy restored from it is right.
    std::fs::remove_file(&out).unwrap();
    p.write("p.yaml", PIPELINE);
    let ran = p.run_ok("p.yaml", &[]);
    assert!(ran.iter().all(|(_, o)| o == "cached"), "{ran:?}");
    assert_eq!(p.read("prep.txt"), "HELLO\nWORLD\n");
    assert_eq!(calls(&p), ["prep"], "only the edited stage reran");
}
