//! Running a pipeline: a tokio scheduler that runs each stage in its own child
//! process (`anneal exec-stage`) and commits outputs only on success.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anneal_cache::{OutputRef, Record, RecordOutput, Store};
use anneal_stages::{Job, PROGRESS_PREFIX, ProgressEvent, REPORT_PREFIX};
use anyhow::Context;
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::task::JoinSet;

use crate::interp::Mode;
use crate::pipeline::Pipeline;
use crate::plan::{Decision, Known, Planner};
use crate::status::{RunState, StageStatus, now_ms};
use crate::ui::Console;

/// How to run.
pub struct RunOptions {
    /// Most stages running at once.
    pub jobs: usize,
    /// CPUs to share among stages (`resources.cpus`).
    pub cpus: u32,
    /// GPU ids to hand out (`resources.gpus`); exported as `CUDA_VISIBLE_DEVICES`.
    pub gpus: Vec<String>,
    /// Keep running independent stages after a failure.
    pub keep_going: bool,
    /// Per stage: run even if cached.
    pub force: Vec<bool>,
    /// Per stage: part of this run.
    pub selected: Vec<bool>,
}

/// How one stage ended in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Reused a cached result.
    Cached,
    /// Ran and committed.
    Done,
    /// Failed.
    Failed,
    /// Not run because of a failure or an interruption.
    Skipped,
    /// Stopped by a signal.
    Interrupted,
}

/// One stage's line in the run summary.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Stage name.
    pub stage: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Its key, when computed.
    pub key: Option<String>,
    /// Seconds it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Why it ran (or was skipped), or the error.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// The error, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The result of a run.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// Per selected stage, in pipeline order.
    pub stages: Vec<StageReport>,
    /// Wall time.
    pub seconds: f64,
    /// Whether Ctrl-C or SIGTERM stopped the run.
    pub interrupted: bool,
}

impl RunReport {
    /// Stages with this outcome.
    pub fn count(&self, o: Outcome) -> usize {
        self.stages.iter().filter(|s| s.outcome == o).count()
    }
}

struct Shared {
    p: Arc<Pipeline>,
    store: Arc<Store>,
    ui: Arc<Console>,
    exe: PathBuf,
    pids: Mutex<HashMap<usize, u32>>,
}

struct Launch {
    key: String,
    inputs: Value,
    reasons: Vec<String>,
}

struct Finished {
    idx: usize,
    took: Duration,
    result: Result<Record, String>,
}

/// Runs the selected stages of `p`. The caller holds the workspace lock.
pub async fn run(
    p: Arc<Pipeline>,
    store: Arc<Store>,
    ui: Arc<Console>,
    opts: RunOptions,
) -> anyhow::Result<RunReport> {
    let started = Instant::now();
    let exe = std::env::current_exe().context("cannot find the anneal executable")?;
    let shared = Arc::new(Shared {
        p: p.clone(),
        store: store.clone(),
        ui: ui.clone(),
        exe,
        pids: Mutex::new(HashMap::new()),
    });
    let mut planner = Planner::new(&p, &store);
    let n = p.stages.len();
    let mut waiting_on: Vec<usize> = (0..n)
        .map(|i| {
            p.upstream(i)
                .into_iter()
                .filter(|&u| opts.selected[u])
                .count()
        })
        .collect();
    let mut ready: BTreeSet<usize> = (0..n)
        .filter(|&i| opts.selected[i] && waiting_on[i] == 0)
        .collect();
    let mut queued: BTreeMap<usize, Launch> = BTreeMap::new();
    let mut reports: HashMap<usize, StageReport> = HashMap::new();
    let mut known: Known = HashMap::new();
    let mut running: HashMap<usize, (u32, Vec<String>)> = HashMap::new();
    let mut free_gpus = opts.gpus.clone();
    let mut cpus_used = 0u32;
    let mut tasks: JoinSet<Finished> = JoinSet::new();
    let mut stop = false;
    let mut interrupted = false;
    let mut signals = Signals::new()?;

    loop {
        // Decide every ready stage: cached ones complete at once.
        while !stop && let Some(i) = ready.pop_first() {
            let name = p.stages[i].name.clone();
            let decision =
                tokio::task::block_in_place(|| planner.decide(i, &known, opts.force[i], &[]));
            match decision {
                Ok(Decision::Cached { record, restore }) => {
                    if restore
                        && let Err(e) =
                            tokio::task::block_in_place(|| restore_outputs(&p, &store, &record))
                    {
                        fail(
                            &ui,
                            &mut reports,
                            &mut planner,
                            i,
                            Some(record.key.clone()),
                            format!("{e:#}"),
                            None,
                        );
                        stop |= !opts.keep_going;
                        continue;
                    }
                    ui.cached(&name, restore);
                    planner.status.stages.insert(
                        name.clone(),
                        StageStatus {
                            report: record.report.clone(),
                            ..StageStatus::new(
                                RunState::Cached,
                                record.key.clone(),
                                record.inputs.clone(),
                            )
                        },
                    );
                    reports.insert(i, report(&name, Outcome::Cached, Some(record.key.clone())));
                    known.insert(i, record.outputs);
                    unblock(&p, i, &opts.selected, &mut waiting_on, &mut ready);
                }
                Ok(Decision::Run {
                    key,
                    inputs,
                    reasons,
                }) => {
                    queued.insert(
                        i,
                        Launch {
                            key,
                            inputs,
                            reasons,
                        },
                    );
                }
                Ok(Decision::MayRun { .. }) => {
                    fail(
                        &ui,
                        &mut reports,
                        &mut planner,
                        i,
                        None,
                        "internal error: upstream outputs are unknown".into(),
                        None,
                    );
                    stop |= !opts.keep_going;
                }
                Err(e) => {
                    fail(
                        &ui,
                        &mut reports,
                        &mut planner,
                        i,
                        None,
                        format!("{e:#}"),
                        None,
                    );
                    stop |= !opts.keep_going;
                }
            }
        }
        // Launch queued stages within --jobs and resources.
        if !stop {
            let total_cpus = opts.cpus.max(1);
            let startable: Vec<usize> = queued.keys().copied().collect();
            for i in startable {
                if running.len() >= opts.jobs.max(1) {
                    break;
                }
                let s = &p.stages[i];
                let need_cpus = s.cpus.min(total_cpus);
                if cpus_used + need_cpus > total_cpus || (s.gpus as usize) > free_gpus.len() {
                    continue;
                }
                let Some(launch) = queued.remove(&i) else {
                    continue;
                };
                let gpus: Vec<String> = free_gpus.drain(..s.gpus as usize).collect();
                match prepare(&shared, i, &launch) {
                    Ok((job, log)) => {
                        cpus_used += need_cpus;
                        running.insert(i, (need_cpus, gpus.clone()));
                        ui.started(&s.name, &launch.reasons);
                        planner.status.stages.insert(
                            s.name.clone(),
                            StageStatus::new(
                                RunState::Running,
                                launch.key.clone(),
                                launch.inputs.clone(),
                            ),
                        );
                        save_status(&planner);
                        let sh = shared.clone();
                        tasks.spawn(async move {
                            let t0 = Instant::now();
                            let result = run_one(&sh, i, launch, job, log, gpus).await;
                            Finished {
                                idx: i,
                                took: t0.elapsed(),
                                result,
                            }
                        });
                    }
                    Err(e) => {
                        free_gpus.extend(gpus);
                        fail(
                            &ui,
                            &mut reports,
                            &mut planner,
                            i,
                            Some(launch.key.clone()),
                            format!("{e:#}"),
                            None,
                        );
                        stop |= !opts.keep_going;
                    }
                }
            }
        }
        if tasks.is_empty() && (stop || (ready.is_empty() && queued.is_empty())) {
            break;
        }
        if tasks.is_empty() {
            // Nothing running yet something queued: a stage that can never fit.
            if let Some((&i, _)) = queued.iter().next() {
                let launch = queued.remove(&i).map(|l| l.key);
                fail(
                    &ui,
                    &mut reports,
                    &mut planner,
                    i,
                    launch,
                    "its resources can never be satisfied".into(),
                    None,
                );
                stop |= !opts.keep_going;
            }
            continue;
        }
        tokio::select! {
            Some(done) = tasks.join_next() => {
                let Ok(f) = done else { continue };
                let i = f.idx;
                if let Some((c, g)) = running.remove(&i) {
                    cpus_used -= c;
                    free_gpus.extend(g);
                }
                let name = p.stages[i].name.clone();
                match f.result {
                    Ok(record) => {
                        ui.finished(&name, f.took, record.report.as_ref());
                        let mut st = StageStatus::new(RunState::Done, record.key.clone(), record.inputs.clone());
                        st.duration_ms = Some(f.took.as_millis() as u64);
                        st.report = record.report.clone();
                        planner.status.stages.insert(name.clone(), st);
                        let mut r = report(&name, Outcome::Done, Some(record.key.clone()));
                        r.seconds = Some(f.took.as_secs_f64());
                        reports.insert(i, r);
                        known.insert(i, record.outputs);
                        unblock(&p, i, &opts.selected, &mut waiting_on, &mut ready);
                    }
                    Err(e) if interrupted => {
                        let key = planner.status.stages.get(&name).map(|s| s.key.clone());
                        if let Some(st) = planner.status.stages.get_mut(&name) {
                            st.state = RunState::Interrupted;
                            st.at_unix_ms = now_ms();
                        }
                        let mut r = report(&name, Outcome::Interrupted, key);
                        r.error = Some(e);
                        reports.insert(i, r);
                    }
                    Err(e) => {
                        let key = planner.status.stages.get(&name).map(|s| s.key.clone());
                        let log = log_path(&store, &name);
                        fail(&ui, &mut reports, &mut planner, i, key, e, Some(&log));
                        stop |= !opts.keep_going;
                    }
                }
                save_status(&planner);
            }
            sig = signals.next() => {
                if !interrupted {
                    interrupted = true;
                    stop = true;
                    ui.error(&format!("{sig}: stopping {} running stage(s); rerun to resume", running.len()));
                    let pids = shared.pids.lock().map(|p| p.values().copied().collect::<Vec<_>>()).unwrap_or_default();
                    for pid in pids {
                        // SAFETY: plain kill(2) on a child we started.
                        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                    }
                }
            }
        }
    }
    planner.save();
    save_status(&planner);
    let mut stages = Vec::new();
    for i in p.order.iter().copied().filter(|&i| opts.selected[i]) {
        let r = reports.remove(&i).unwrap_or_else(|| {
            let why = if interrupted {
                "interrupted"
            } else {
                "not run after a failure"
            };
            ui.skipped(&p.stages[i].name, why);
            let mut r = report(&p.stages[i].name, Outcome::Skipped, None);
            r.reasons.push(why.into());
            r
        });
        stages.push(r);
    }
    Ok(RunReport {
        stages,
        seconds: started.elapsed().as_secs_f64(),
        interrupted,
    })
}

/// Stage `i` is complete: its selected dependents with nothing else to wait for become ready.
fn unblock(
    p: &Pipeline,
    i: usize,
    selected: &[bool],
    waiting_on: &mut [usize],
    ready: &mut BTreeSet<usize>,
) {
    for d in p.downstream(i) {
        waiting_on[d] -= 1;
        if selected[d] && waiting_on[d] == 0 {
            ready.insert(d);
        }
    }
}

fn report(name: &str, outcome: Outcome, key: Option<String>) -> StageReport {
    StageReport {
        stage: name.to_owned(),
        outcome,
        key,
        seconds: None,
        reasons: Vec::new(),
        error: None,
    }
}

fn save_status(planner: &Planner) {
    if let Err(e) = planner.status.save() {
        tracing::warn!("could not save run status: {e:#}");
    }
}

#[allow(clippy::too_many_arguments)]
fn fail(
    ui: &Console,
    reports: &mut HashMap<usize, StageReport>,
    planner: &mut Planner,
    i: usize,
    key: Option<String>,
    error: String,
    log: Option<&Path>,
) {
    let name = planner.p.stages[i].name.clone();
    match log {
        Some(log) => ui.failed(&name, &error, log, &tail(log, 20)),
        None => ui.error(&format!(
            "{:>9} {name}: {error}",
            console::style("failed").red().bold()
        )),
    }
    if let Some(k) = &key {
        let inputs = planner
            .status
            .stages
            .get(&name)
            .map(|s| s.inputs.clone())
            .unwrap_or(Value::Null);
        planner.status.stages.insert(
            name.clone(),
            StageStatus {
                error: Some(error.clone()),
                ..StageStatus::new(RunState::Failed, k.clone(), inputs)
            },
        );
    }
    let mut r = report(&name, Outcome::Failed, key);
    r.error = Some(error);
    reports.insert(i, r);
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Where a stage's log goes.
pub fn log_path(store: &Store, stage: &str) -> PathBuf {
    let safe: String = stage
        .chars()
        .map(|c| if c == '/' || c.is_control() { '_' } else { c })
        .collect();
    store.logs_dir().join(format!("{safe}.log"))
}

/// Places a cached stage's outputs back in the workspace.
fn restore_outputs(p: &Pipeline, store: &Store, record: &Record) -> anyhow::Result<()> {
    for o in record.outputs.values() {
        store
            .materialize(&o.output, &p.dir.join(&o.path), p.link)
            .with_context(|| format!("restoring {}", o.path))?;
    }
    Ok(())
}

/// Makes the staging and scratch directories and the job for stage `i`.
fn prepare(sh: &Shared, i: usize, launch: &Launch) -> anyhow::Result<(Job, PathBuf)> {
    let s = &sh.p.stages[i];
    for name in &s.secrets {
        if std::env::var_os(name).is_none() {
            anyhow::bail!(
                "needs the secret environment variable {name}; set it (its value is never written to logs, records or keys)"
            );
        }
    }
    let staging = sh.store.fresh_staging_dir(&launch.key)?;
    let scratch = sh.store.scratch_dir(&launch.key)?;
    let cache = sh.store.root().join("cache").join(s.kind.kind());
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut outs = BTreeMap::new();
    for (name, o) in &s.outs {
        let path = staging.join(&o.path);
        let dir = if o.dir {
            path.as_path()
        } else {
            path.parent().unwrap_or(&staging)
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        outs.insert(name.clone(), path);
    }
    let out_path = |n: &str| {
        outs.get(n)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let job = Job {
        stage: s.name.clone(),
        kind: s.kind.kind().to_owned(),
        kind_version: s.kind.version(),
        config: s
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.render(Mode::Exec, &out_path)))
            .collect(),
        params: s.params.render(Mode::Exec, &out_path),
        deps: s
            .deps
            .iter()
            .map(|(k, d)| (k.clone(), PathBuf::from(&d.path)))
            .collect(),
        outs: outs.clone(),
        scratch,
        cache,
        workdir: sh.p.dir.clone(),
    };
    std::fs::create_dir_all(sh.store.logs_dir())?;
    Ok((job, log_path(&sh.store, &s.name)))
}

/// Runs one stage's process, then commits its outputs.
async fn run_one(
    sh: &Shared,
    i: usize,
    launch: Launch,
    job: Job,
    log: PathBuf,
    gpus: Vec<String>,
) -> Result<Record, String> {
    let started_ms = now_ms();
    let t0 = Instant::now();
    let outs = job.outs.clone();
    let scratch = job.scratch.clone();
    let report = spawn_stage(sh, i, &job, &log, &gpus).await?;
    let duration_ms = t0.elapsed().as_millis() as u64;
    let s = &sh.p.stages[i];
    let store = sh.store.clone();
    let p = sh.p.clone();
    let stage_name = s.name.clone();
    tokio::task::spawn_blocking(move || {
        let s = &p.stages[i];
        let mut outputs = BTreeMap::new();
        for (name, o) in &s.outs {
            let staged = &outs[name];
            let meta = std::fs::symlink_metadata(staged)
                .map_err(|_| format!("did not write its declared output '{name}' ({})", o.path))?;
            if o.dir && !meta.is_dir() {
                return Err(format!(
                    "output '{name}' is declared as a directory ({}/) but the stage wrote a file",
                    o.path
                ));
            }
            if !o.dir && meta.is_dir() {
                return Err(format!(
                    "output '{name}' ({}) is a directory; declare it with a trailing '/': {}/",
                    o.path, o.path
                ));
            }
            let r: OutputRef = store
                .commit(staged)
                .map_err(|e| format!("committing output '{name}': {e}"))?;
            outputs.insert(
                name.clone(),
                RecordOutput {
                    path: o.path.clone(),
                    output: r,
                },
            );
        }
        let record = Record {
            key: launch.key.clone(),
            stage: stage_name,
            kind: s.kind.kind().to_owned(),
            created_unix_ms: started_ms,
            duration_ms,
            outputs,
            inputs: launch.inputs,
            report,
        };
        tracing::debug!(stage = %record.stage, key = %record.key, outputs = record.outputs.len(), "committed outputs");
        store
            .write_record(&record)
            .map_err(|e| format!("writing the run record: {e}"))?;
        for o in record.outputs.values() {
            store
                .materialize(&o.output, &p.dir.join(&o.path), p.link)
                .map_err(|e| format!("placing {}: {e}", o.path))?;
        }
        let _ = store.remove_staging_dir(&launch.key);
        let _ = std::fs::remove_dir_all(&scratch);
        Ok(record)
    })
    .await
    .map_err(|e| format!("internal error: {e}"))?
}

/// Starts `anneal exec-stage -`, feeds it the job, streams its output to the log.
async fn spawn_stage(
    sh: &Shared,
    i: usize,
    job: &Job,
    log: &Path,
    gpus: &[String],
) -> Result<Option<Value>, String> {
    let s = &sh.p.stages[i];
    let mut cmd = tokio::process::Command::new(&sh.exe);
    cmd.arg("exec-stage")
        .arg("-")
        .current_dir(&sh.p.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if s.gpus > 0 {
        cmd.env("CUDA_VISIBLE_DEVICES", gpus.join(","));
    }
    let parent = std::process::id() as i32;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // If this engine dies (even by SIGKILL), the stage gets SIGTERM and takes its children down.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", sh.exe.display()))?;
    if let Some(pid) = child.id()
        && let Ok(mut pids) = sh.pids.lock()
    {
        pids.insert(i, pid);
    }
    let job_json = serde_json::to_vec(job).map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&job_json)
            .await
            .map_err(|e| format!("sending the job: {e}"))?;
    }
    let file = std::fs::File::create(log)
        .map_err(|e| format!("cannot write log {}: {e}", log.display()))?;
    let log_file = Arc::new(Mutex::new(std::io::BufWriter::new(file)));
    let secrets: Vec<String> = s
        .secrets
        .iter()
        .filter_map(|n| std::env::var(n).ok())
        .filter(|v| !v.is_empty())
        .collect();
    let secrets = Arc::new(secrets);
    let out = child
        .stdout
        .take()
        .map(|o| tokio::spawn(pump(o, log_file.clone(), secrets.clone(), None)));
    let err = child.stderr.take().map(|e| {
        tokio::spawn(pump(
            e,
            log_file.clone(),
            secrets.clone(),
            Some((sh.ui.clone(), s.name.clone())),
        ))
    });
    tracing::debug!(stage = %s.name, pid = ?child.id(), log = %log.display(), "stage process started");
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for the stage process: {e}"))?;
    if let Some(t) = out {
        let _ = t.await;
    }
    let mut report = None;
    if let Some(t) = err {
        report = t.await.ok().flatten();
    }
    if let Ok(mut f) = log_file.lock() {
        let _ = f.flush();
    }
    if let Ok(mut pids) = sh.pids.lock() {
        pids.remove(&i);
    }
    if status.success() {
        return Ok(report);
    }
    use std::os::unix::process::ExitStatusExt;
    let last_error = tail(log, 40)
        .into_iter()
        .rev()
        .find_map(|l| l.strip_prefix("error: ").map(str::to_owned));
    Err(match (last_error, status.code(), status.signal()) {
        (Some(e), _, _) => e,
        (None, Some(c), _) => format!("exited with status {c}"),
        (None, None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "failed".into(),
    })
}

/// Copies a stream to the log line by line, hiding secret values; progress lines
/// go to the console; returns the stage's report line, if it sent one.
async fn pump<R: AsyncRead + Unpin>(
    r: R,
    log: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
    secrets: Arc<Vec<String>>,
    progress: Option<(Arc<Console>, String)>,
) -> Option<Value> {
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    let mut report = None;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let mut line = String::from_utf8_lossy(&buf).into_owned();
        if let Some((ui, name)) = &progress
            && let Some(json) = line.trim_end().strip_prefix(PROGRESS_PREFIX)
        {
            if let Ok(ev) = serde_json::from_str::<ProgressEvent>(json) {
                ui.progress(name, &ev);
            }
            continue;
        }
        if progress.is_some()
            && let Some(json) = line.trim_end().strip_prefix(REPORT_PREFIX)
        {
            report = serde_json::from_str(json).ok();
            continue;
        }
        for s in secrets.iter() {
            if line.contains(s.as_str()) {
                line = line.replace(s.as_str(), "***");
            }
        }
        if let Ok(mut f) = log.lock() {
            let _ = f.write_all(line.as_bytes());
        }
    }
    report
}

/// Ctrl-C, SIGTERM and SIGHUP.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "interrupted",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}
