//! Helpers shared by the integration tests: a temporary project and the real binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Fails the test, naming the pip command, unless `python3` imports every
/// module in `modules` (e.g. `["pyarrow", "pandas"]`).
pub fn require_python(modules: &[&str]) {
    let out = Command::new("python3")
        .args(["-c", &format!("import {}", modules.join(", "))])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{} required for this test: python3 -m pip install {}\n{}",
        modules.join(", "),
        modules.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The JSON that `python3 args...` prints; the test fails naming `what` (a
/// script, or the packages it needs) with what Python printed.
pub fn python_json<S: AsRef<std::ffi::OsStr>>(args: &[S], what: &str) -> Value {
    let out = Command::new("python3")
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script's JSON")
}

/// `rel` in `../shared` beside the checkout, or in `$ANNEAL_SHARED`.
pub fn shared(rel: &str) -> PathBuf {
    let root = std::env::var_os("ANNEAL_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    root.join(rel)
}

/// A temporary pipeline directory.
pub struct Project {
    pub dir: tempfile::TempDir,
}

/// What a command printed.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_anneal")
}

impl Project {
    pub fn new() -> Self {
        Project {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.path(rel).exists()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(self.dir.path())
            .env_remove("ANNEAL_STORE")
            .env("NO_COLOR", "1");
        c
    }

    pub fn anneal(&self, args: &[&str]) -> Run {
        self.anneal_env(args, &[])
    }

    pub fn anneal_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = self.cmd(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out: Output = c.output().expect("running anneal");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning anneal")
    }

    /// `anneal run --json` that must succeed; returns stage -> outcome.
    pub fn run_ok(&self, file: &str, extra: &[&str]) -> Vec<(String, String)> {
        self.run_ok_env(file, extra, &[])
    }

    /// `run_ok` with extra environment variables.
    pub fn run_ok_env(
        &self,
        file: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let mut args = vec!["run", file, "--json"];
        args.extend_from_slice(extra);
        let r = self.anneal_env(&args, env);
        assert_eq!(r.code, 0, "{r:?}");
        outcomes(&r.json())
    }

    /// The report in the run record of `stage` (`anneal status FILE --json`).
    pub fn report(&self, file: &str, stage: &str) -> Value {
        let st = self.anneal(&["status", file, "--json"]).json();
        st["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .find(|s| s["stage"] == stage)
            .unwrap_or_else(|| panic!("no stage {stage} in `anneal status`"))["report"]
            .clone()
    }

    /// `anneal plan --json`: stage -> (state, reasons).
    pub fn plan(&self, file: &str) -> Vec<(String, String, Vec<String>)> {
        let r = self.anneal(&["plan", file, "--json"]);
        assert_eq!(r.code, 0, "{r:?}");
        r.json()["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["stage"].as_str().unwrap().to_owned(),
                    s["state"].as_str().unwrap().to_owned(),
                    s["reasons"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap().to_owned())
                        .collect(),
                )
            })
            .collect()
    }
}

pub fn outcomes(report: &Value) -> Vec<(String, String)> {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_owned(),
                s["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

pub fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Polls until `f` holds. The limit only keeps a broken build from hanging:
/// a busy 2-core machine took over 20 s to reach a training checkpoint.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file under `dir` (relative path -> bytes), skipping the store.
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, d: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        let mut entries: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel.starts_with(".anneal") {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// Copies the repository's `pipelines/` (without run state) into the project.
pub fn copy_pipelines(p: &Project) {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let name = e.file_name();
            if name == ".anneal" || name == "work" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(&name));
            } else {
                std::fs::copy(e.path(), to.join(&name)).unwrap();
            }
        }
    }
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines"),
        &p.path("pipelines"),
    );
}
