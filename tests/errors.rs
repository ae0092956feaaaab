//! Every pipeline error names the file, line and column, the key, and a fix where one exists.

mod common;

use common::*;

/// Runs `anneal plan` on `yaml` and returns stderr, asserting exit status 2.
fn plan_error(yaml: &str) -> String {
    let p = Project::new();
    p.write("pipe.yaml", yaml);
    let r = p.anneal(&["plan", "pipe.yaml"]);
    assert_eq!(r.code, 2, "{r:?}");
    r.stderr
}

fn assert_has(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "missing {part:?} in:\n{text}");
    }
}

#[test]
fn unknown_stage_key_suggests_the_right_one() {
    let e = plan_error("stages:\n  train:\n    kind: command\n    cmd: echo\n    param: {lr: 1}\n");
    assert_has(
        &e,
        &[
            "pipe.yaml:5:5: unknown key 'param' in stage 'train'",
            "help: did you mean 'params'?",
            "5 |     param: {lr: 1}",
        ],
    );
}

#[test]
fn unknown_top_level_key() {
    let e = plan_error("stage:\n  a: {kind: command, cmd: echo}\n");
    assert_has(
        &e,
        &[
            "pipe.yaml:1:1: unknown top-level key 'stage'",
            "did you mean 'stages'?",
        ],
    );
}

#[test]
fn wrong_types_name_what_was_found() {
    let e = plan_error(
        "stages:\n  a:\n    kind: command\n    cmd: echo\n    deps: [x, y]\n    resources: {gpus: many}\n",
    );
    assert_has(
        &e,
        &[
            "pipe.yaml:5:11: 'deps' of stage 'a' must map input names to paths, found a list",
            "pipe.yaml:6:23: resources.gpus of stage 'a' must be a whole number of 0 or more, found a string",
        ],
    );
    let e = plan_error("stages:\n  a:\n    kind: command\n    cmd: {x: 1}\n");
    assert_has(
        &e,
        &["pipe.yaml:4:10: stage 'a': cmd: cmd must be a string or a list of strings"],
    );
}

#[test]
fn unknown_kind_and_missing_required_key() {
    let e = plan_error("stages:\n  a:\n    kind: comand\n    cmd: echo\n");
    assert_has(
        &e,
        &[
            "pipe.yaml:3:11: unknown stage kind 'comand' in stage 'a'",
            "did you mean 'command'?",
        ],
    );
    let e = plan_error("stages:\n  a:\n    kind: command\n");
    assert_has(
        &e,
        &[
            "pipe.yaml:2:3: stage 'a' of kind 'command' needs 'cmd'",
            "add `cmd:`",
        ],
    );
}

#[test]
fn missing_references_point_at_the_reference() {
    let base = "vars: {lr: 1}\nstages:\n  prep:\n    kind: command\n    cmd: echo > ${outs.data}\n    outs: {data: d.txt}\n  train:\n    kind: command\n";
    let e = plan_error(&format!("{base}    cmd: echo ${{vars.lrr}}\n"));
    assert_has(
        &e,
        &[
            "pipe.yaml:9:15: unknown variable 'vars.lrr'",
            "did you mean 'lr'?",
        ],
    );
    let e = plan_error(&format!(
        "{base}    cmd: echo\n    deps: {{d: ${{stages.prep.outs.dta}}}}\n"
    ));
    assert_has(
        &e,
        &[
            "pipe.yaml:10:15: '${stages.prep.outs.dta}': stage 'prep' has no output 'dta'",
            "did you mean 'data'?",
        ],
    );
    let e = plan_error(&format!(
        "{base}    cmd: echo\n    deps: {{d: ${{stages.prpe.outs.data}}}}\n"
    ));
    assert_has(
        &e,
        &[
            "pipe.yaml:10:15: '${stages.prpe.outs.data}' refers to unknown stage 'prpe'",
            "did you mean 'prep'?",
        ],
    );
    let e = plan_error(&format!(
        "{base}    cmd: cat ${{deps.dat}}\n    deps: {{data: d.txt}}\n"
    ));
    assert_has(
        &e,
        &[
            "pipe.yaml:9:14: '${deps.dat}': stage 'train' has no input 'dat'",
            "did you mean 'data'?",
        ],
    );
    let e = plan_error(&format!("{base}    cmd: echo ${{prams.x}}\n"));
    assert_has(
        &e,
        &[
            "pipe.yaml:9:15: unknown reference '${prams.x}'",
            "did you mean 'params'?",
        ],
    );
    let e = plan_error(&format!("{base}    cmd: echo ${{item}}\n"));
    assert_has(
        &e,
        &["'${item}' is only defined in a stage with foreach or matrix"],
    );
}

#[test]
fn unset_environment_variable() {
    let e = plan_error(
        "stages:\n  a:\n    kind: command\n    cmd: echo ${env.ANNEAL_TEST_SURELY_UNSET}\n",
    );
    assert_has(
        &e,
        &[
            "pipe.yaml:4:15: environment variable 'ANNEAL_TEST_SURELY_UNSET' is not set",
            "${env.ANNEAL_TEST_SURELY_UNSET:-value}",
        ],
    );
}

#[test]
fn cycles_are_spelled_out() {
    let e = plan_error(
        "stages:\n  a:\n    kind: command\n    cmd: cp ${deps.x} ${outs.o}\n    deps: {x: ${stages.b.outs.o}}\n    outs: {o: a.txt}\n  b:\n    kind: command\n    cmd: cp ${deps.x} ${outs.o}\n    deps: {x: ${stages.a.outs.o}}\n    outs: {o: b.txt}\n",
    );
    assert_has(&e, &["cycle: a -> b -> a", "pipe.yaml:10:15"]);
    let e = plan_error(
        "vars:\n  a: ${vars.b}\n  b: x${vars.a}\nstages:\n  s: {kind: command, cmd: echo}\n",
    );
    assert_has(&e, &["cycle: vars.a -> vars.b -> vars.a"]);
}

#[test]
fn outputs_must_be_distinct_and_inside_the_project() {
    let e = plan_error(
        "stages:\n  a:\n    kind: command\n    cmd: echo\n    outs: {o: x.txt}\n  b:\n    kind: command\n    cmd: echo\n    outs: {o: ./x.txt}\n",
    );
    assert_has(
        &e,
        &["pipe.yaml:9:15: output path 'x.txt' is declared twice"],
    );
    let e =
        plan_error("stages:\n  a:\n    kind: command\n    cmd: echo\n    outs: {o: ../x.txt}\n");
    assert_has(
        &e,
        &["pipe.yaml:5:15: outs.o of stage 'a': '../x.txt' leaves the pipeline directory"],
    );
}

#[test]
fn outputs_never_replace_inputs_the_pipeline_or_what_symlinks_reach() {
    let p = Project::new();
    p.write("data/in.txt", "precious\n");
    p.write("data/keep.txt", "also precious\n");
    // An output directory holding the stage's own input.
    p.write(
        "own.yaml",
        "stages:\n  s:\n    kind: command\n    cmd: cp ${deps.x} ${outs.d}/c\n    deps: {x: data/in.txt}\n    outs: {d: data/}\n",
    );
    let r = p.anneal(&["run", "own.yaml"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_has(
        &r.stderr,
        &[
            "own.yaml:5:15: input deps.x (data/in.txt) of stage 's' overlaps output 'd' of stage 's' (data)",
            "would replace its own input",
        ],
    );
    // Another stage's input inside an output.
    p.write(
        "other.yaml",
        "stages:\n  a:\n    kind: command\n    cmd: echo\n    outs: {d: data}\n  b:\n    kind: command\n    cmd: echo\n    deps: {x: data/keep.txt}\n",
    );
    let r = p.anneal(&["plan", "other.yaml"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_has(
        &r.stderr,
        &[
            "other.yaml:9:15: input deps.x (data/keep.txt) of stage 'b' overlaps output 'd' of stage 'a'",
            "${stages.a.outs.d}",
        ],
    );
    // The pipeline file itself.
    p.write(
        "self.yaml",
        "stages:\n  a:\n    kind: command\n    cmd: echo\n    outs: {y: self.yaml}\n",
    );
    let r = p.anneal(&["run", "self.yaml"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_has(&r.stderr, &["would overwrite the pipeline file"]);
    // Through a symlink: into the store, and out of the project.
    std::os::unix::fs::symlink(".anneal", p.path("st")).unwrap();
    std::os::unix::fs::symlink("..", p.path("up")).unwrap();
    p.write(
        "link.yaml",
        "stages:\n  a:\n    kind: command\n    cmd: echo\n    outs: {y: st/records}\n",
    );
    let r = p.anneal(&["run", "link.yaml"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_has(&r.stderr, &["overlaps the store"]);
    p.write(
        "up.yaml",
        "stages:\n  a:\n    kind: command\n    cmd: echo\n    outs: {y: up/x.txt}\n",
    );
    let r = p.anneal(&["run", "up.yaml"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_has(
        &r.stderr,
        &[
            "resolves through a symlink to",
            "outside the pipeline directory",
        ],
    );
    assert_eq!(p.read("data/in.txt"), "precious\n");
    assert_eq!(p.read("data/keep.txt"), "also precious\n");
    assert_eq!(p.read("self.yaml").lines().count(), 5);
}

#[test]
fn a_closed_output_pipe_does_not_stop_a_run() {
    let p = Project::new();
    p.write(
        "pipe.yaml",
        "stages:\n  a:\n    kind: command\n    cmd: echo a > ${outs.o}\n    outs: {o: a.txt}\n  b:\n    kind: command\n    cmd: cat ${deps.i} > ${outs.o}\n    deps: {i: a.txt}\n    outs: {o: b.txt}\n",
    );
    // stdout and stderr into pipes whose readers are gone before anything is written.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_anneal"))
        .args(["run", "--json", "pipe.yaml"])
        .current_dir(p.path(""))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "a panic exits 101");
    assert_eq!(p.read("b.txt"), "a\n");
    let r = p.anneal(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_has(&r.stderr, &["0 ran, 2 cached"]);
}

#[test]
fn one_unreadable_metrics_file_does_not_hide_the_others() {
    let p = Project::new();
    p.write(
        "pipe.yaml",
        r#"stages:
  good:
    kind: command
    cmd: |
      echo '{"metrics": {"loss": 1.5}}' > ${outs.metrics}
    outs: {metrics: good.json}
  bad:
    kind: command
    cmd: |
      echo '{"loss": 1.' > ${outs.metrics}
    outs: {metrics: bad.json}
  later:
    kind: command
    cmd: |
      echo '{"loss": 1.25}' > ${outs.metrics}
    outs: {metrics: later.json}
"#,
    );
    let r = p.anneal(&["run", "pipe.yaml", "-s", "good", "-s", "bad"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = p.anneal(&["metrics", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_has(&r.stdout, &["loss", "1.5"]);
    assert_has(
        &r.stderr,
        &[
            "error: bad: ",
            "bad.json is not JSON",
            "note: later: later.json not written yet",
        ],
    );
    let r = p.anneal(&["metrics", "pipe.yaml", "--json"]);
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(j["metrics"]["loss"]["good"]["value"], 1.5);
    assert!(j["metrics"]["loss"]["bad"]["value"].is_null(), "{j}");
    assert_has(j["unreadable"]["bad"].as_str().unwrap(), &["not JSON"]);
    assert!(j["missing"]["later"].is_string(), "{j}");
}

#[test]
fn yaml_syntax_and_empty_and_missing_files() {
    let e = plan_error("stages:\n  a: {kind: command\n  b: 1\n");
    assert_has(&e, &["pipe.yaml:3:", "invalid YAML"]);
    let e = plan_error("stages:\n  a: 1\n  a: 2\n");
    assert_has(
        &e,
        &["pipe.yaml:3:3: invalid YAML: duplicate key 'a' (first defined at line 2)"],
    );
    let e = plan_error("");
    assert_has(&e, &["pipe.yaml: the pipeline file is empty"]);
    let p = Project::new();
    let r = p.anneal(&["plan", "nope.yaml"]);
    assert_eq!(r.code, 2);
    assert_has(&r.stderr, &["cannot read pipeline file nope.yaml"]);
}

#[test]
fn missing_input_file_is_located() {
    let e = plan_error(
        "stages:\n  prep:\n    kind: command\n    cmd: cat ${deps.raw}\n    deps: {raw: data/raw.jsonl}\n",
    );
    assert_has(
        &e,
        &["pipe.yaml:5:17: input 'raw' of stage 'prep' does not exist: data/raw.jsonl"],
    );
}

#[test]
fn a_stage_needing_gpus_on_a_machine_without() {
    let p = Project::new();
    p.write(
        "pipe.yaml",
        "stages:\n  t:\n    kind: command\n    cmd: echo\n    resources: {gpus: 1}\n",
    );
    let r = p.anneal_env(&["run", "pipe.yaml"], &[("CUDA_VISIBLE_DEVICES", "")]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_has(
        &r.stderr,
        &["stage 't' needs 1 GPU(s) but 0 are available", "--gpus N"],
    );
    let r = p.anneal_env(&["run", "pipe.yaml", "--gpus", "1"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn a_failing_stage_commits_nothing_and_shows_its_log() {
    let p = Project::new();
    p.write(
        "pipe.yaml",
        "stages:\n  bad:\n    kind: command\n    cmd: echo partial > ${outs.o}; echo 'something broke' >&2; exit 3\n    outs: {o: o.txt}\n  after:\n    kind: command\n    cmd: cat ${deps.i} > ${outs.o}\n    deps: {i: ${stages.bad.outs.o}}\n    outs: {o: after.txt}\n  lazy:\n    kind: command\n    cmd: 'true'\n    outs: {o: lazy.txt}\n",
    );
    let r = p.anneal(&["run", "pipe.yaml"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_has(
        &r.stderr,
        &[
            "failed bad: command exited with status 3",
            "something broke",
            ".anneal/logs/bad.log",
            "skipped after",
        ],
    );
    assert!(
        !p.exists("o.txt"),
        "a failed stage's output must not appear"
    );
    let r = p.anneal(&["run", "pipe.yaml", "--keep-going", "--json"]);
    assert_eq!(r.code, 1, "{r:?}");
    let out = outcomes(&r.json());
    assert_eq!(
        out,
        pairs(&[("bad", "failed"), ("after", "skipped"), ("lazy", "failed")])
    );
    assert_has(
        &r.json()["stages"][2]["error"].to_string(),
        &["did not write its declared output 'o' (lazy.txt)"],
    );
    let plan = p.plan("pipe.yaml");
    assert_eq!(plan[0].2, ["last run failed"]);
}
