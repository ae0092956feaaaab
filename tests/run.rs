//! Concurrency, interruption and the store lock, on the real binary.

mod common;

use std::time::Duration;

use common::*;

/// Start and end times of stages a and b, as written by `TWO_SLEEPERS`.
fn spans(p: &Project) -> [f64; 4] {
    ["a.start", "a.end", "b.start", "b.end"].map(|f| p.read(f).trim().parse().unwrap())
}

const TWO_SLEEPERS: &str = r#"stages:
  a:
    kind: command
    cmd: date +%s.%N > ${outs.s}; sleep 1; date +%s.%N > ${outs.e}
    outs: {s: a.start, e: a.end}
  b:
    kind: command
    cmd: date +%s.%N > ${outs.s}; sleep 1; date +%s.%N > ${outs.e}
    outs: {s: b.start, e: b.end}
"#;

#[test]
fn independent_stages_run_concurrently_within_jobs() {
    let p = Project::new();
    p.write("p.yaml", TWO_SLEEPERS);
    let t0 = std::time::Instant::now();
    p.run_ok("p.yaml", &["--jobs", "2"]);
    eprintln!(
        "two 1 s stages with --jobs 2 took {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let [a0, a1, b0, b1] = spans(&p);
    assert!(
        a0 < b1 && b0 < a1,
        "the two stages did not overlap: a {a0}..{a1}, b {b0}..{b1}"
    );

    let q = Project::new();
    q.write("p.yaml", TWO_SLEEPERS);
    q.run_ok("p.yaml", &["--jobs", "1"]);
    let [a0, a1, b0, b1] = spans(&q);
    assert!(
        a1 <= b0 || b1 <= a0,
        "--jobs 1 ran them together: a {a0}..{a1}, b {b0}..{b1}"
    );
}

#[test]
fn resources_limit_concurrency() {
    let p = Project::new();
    p.write(
        "p.yaml",
        &TWO_SLEEPERS.replace(
            "    outs: {s: a.start",
            "    resources: {cpus: 2}\n    outs: {s: a.start",
        ),
    );
    p.run_ok("p.yaml", &["--jobs", "2", "--cpus", "2"]);
    let [a0, a1, b0, b1] = spans(&p);
    assert!(
        a1 <= b0 || b1 <= a0,
        "a takes both CPUs, yet b ran beside it: a {a0}..{a1}, b {b0}..{b1}"
    );
}

/// A stage that processes 10 items, keeping its progress in the scratch directory.
const RESUMABLE: &str = r#"stages:
  slow:
    kind: command
    cmd: |
      touch "$ANNEAL_SCRATCH/items"
      n=$(wc -l < "$ANNEAL_SCRATCH/items")
      while [ "$n" -lt 10 ]; do
        n=$((n+1))
        echo "item $n" >> "$ANNEAL_SCRATCH/items"
        echo "$n" >> processed.log
        sleep 0.1
      done
      cp "$ANNEAL_SCRATCH/items" ${outs.o}
    outs: {o: items.txt}
  after:
    kind: command
    cmd: wc -l < ${deps.i} > ${outs.o}
    deps: {i: ${stages.slow.outs.o}}
    outs: {o: count.txt}
"#;

fn lines(p: &Project, f: &str) -> usize {
    std::fs::read_to_string(p.path(f))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn sigkill_mid_stage_then_rerun_resumes_and_matches_an_uninterrupted_run() {
    let p = Project::new();
    p.write("p.yaml", RESUMABLE);
    let mut child = p.spawn(&["run", "p.yaml"]);
    wait_for("three items", || lines(&p, "processed.log") >= 3);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // The stage's processes die with the engine: progress stops.
    let mut last = lines(&p, "processed.log");
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = lines(&p, "processed.log");
        if now == last {
            break;
        }
        last = now;
    }
    assert!(
        last < 10,
        "the stage finished before it was killed; slow it down"
    );
    assert!(
        !p.exists("items.txt") && !p.exists("count.txt"),
        "no output may appear from a killed stage"
    );
    assert_eq!(
        std::fs::read_dir(p.path(".anneal/records"))
            .unwrap()
            .count(),
        0
    );
    let st = p.anneal(&["status", "p.yaml", "--json"]).json();
    assert_eq!(st["stages"][0]["state"], "interrupted");
    let plan = p.plan("p.yaml");
    assert_eq!(plan[0].2, ["resumes an interrupted run"]);

    std::fs::remove_file(p.path("processed.log")).unwrap();
    let out = p.run_ok("p.yaml", &[]);
    assert_eq!(out, pairs(&[("slow", "done"), ("after", "done")]));
    let second = lines(&p, "processed.log");
    assert!(
        second <= 10 - last + 1 && second < 10,
        "the rerun redid finished work: {second} items after {last}"
    );

    let fresh = Project::new();
    fresh.write("p.yaml", RESUMABLE);
    fresh.run_ok("p.yaml", &[]);
    std::fs::remove_file(fresh.path("processed.log")).unwrap();
    std::fs::remove_file(p.path("processed.log")).unwrap();
    assert_eq!(snapshot(p.dir.path()), snapshot(fresh.dir.path()));
    assert_eq!(p.read("count.txt").trim(), "10");
    // The scratch space is gone once the stage succeeded.
    assert_eq!(
        std::fs::read_dir(p.path(".anneal/scratch"))
            .unwrap()
            .count(),
        0
    );
}

const BLOCKING: &str = r#"stages:
  hold:
    kind: command
    cmd: touch started; while [ ! -f release ]; do sleep 0.02; done; echo ok > ${outs.o}
    outs: {o: held.txt}
"#;

#[test]
fn the_store_lock_stops_a_second_run() {
    let p = Project::new();
    p.write("p.yaml", BLOCKING);
    let mut first = p.spawn(&["run", "p.yaml"]);
    wait_for("the first run to start its stage", || p.exists("started"));

    let second = p.anneal(&["run", "p.yaml"]);
    assert_eq!(second.code, 2, "{second:?}");
    assert!(
        second
            .stderr
            .contains(&format!("locked by pid {}", first.id())),
        "{second:?}"
    );
    assert!(second.stderr.contains("--wait"), "{second:?}");
    // Reading is fine while a run holds the lock.
    let plan = p.plan("p.yaml");
    let why = &plan[0].2[0];
    assert!(
        why.starts_with(&format!("being run now by pid {} (`", first.id()))
            && why.ends_with(" run p.yaml`)"),
        "{plan:?}"
    );
    let st = p.anneal(&["status", "p.yaml", "--json"]).json();
    assert_eq!(st["stages"][0]["state"], "running");

    // The waiter's stderr goes to a file so the test can see it start waiting.
    let err_path = p.path("waiter.err");
    let waiter = p
        .cmd(&["run", "p.yaml", "--wait", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    wait_for("the second run to wait for the lock", || {
        std::fs::read_to_string(&err_path)
            .is_ok_and(|s| s.contains("waiting for another anneal run"))
    });
    p.write("release", "");
    assert!(first.wait().unwrap().success());
    let out = waiter.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        std::fs::read_to_string(&err_path).unwrap()
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcomes(&report), pairs(&[("hold", "cached")]));
}

#[test]
fn a_stale_lock_from_a_dead_process_is_taken_over() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "stages:\n  a: {kind: command, cmd: 'echo > ${outs.o}', outs: {o: a.txt}}\n",
    );
    // A process that held the lock and died: its record is left, its flock is gone.
    p.write(
        ".anneal/lock",
        r#"{"pid": 999999, "started_unix_ms": 0, "command": "anneal run old.yaml", "host": "h"}"#,
    );
    let r = p.anneal(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr
            .contains("took over a stale store lock left by pid 999999"),
        "{r:?}"
    );
}

#[test]
fn stage_logs_are_kept_and_progress_lines_stay_out_of_them() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "stages:\n  a:\n    kind: command\n    cmd: echo to-stdout; echo to-stderr >&2; echo '::anneal-progress::{\"done\":1,\"total\":2}' >&2; echo x > ${outs.o}\n    outs: {o: a.txt}\n",
    );
    p.run_ok("p.yaml", &[]);
    let log = p.read(".anneal/logs/a.log");
    assert!(
        log.contains("to-stdout") && log.contains("to-stderr"),
        "{log}"
    );
    assert!(!log.contains("anneal-progress"), "{log}");
}
