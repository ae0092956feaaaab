//! What each subcommand does.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anneal_cache::{Acquired, LockError, Store, WorkspaceLock};
use anyhow::Context;
use serde_json::json;

use crate::cli::{PipelineArgs, Selection};
use crate::exec::{self, Outcome, RunOptions};
use crate::pipeline::Pipeline;
use crate::plan::{Decision, Known, Planner};
use crate::status::{RunState, Status, now_ms};
use crate::ui::{Console, fmt_duration, report_line};

/// Exit status: a stage failed, or `plan --check` found work.
pub const EXIT_FAILED: i32 = 1;
/// Exit status: bad pipeline, bad arguments, store locked.
pub const EXIT_ERROR: i32 = 2;
/// Exit status: interrupted.
pub const EXIT_INTERRUPTED: i32 = 130;

/// An error with the exit status it should produce.
#[derive(Debug)]
pub struct Exit(pub i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}
impl std::error::Error for Exit {}

fn load(args: &PipelineArgs) -> anyhow::Result<Pipeline> {
    Pipeline::load(&args.pipeline, args.store.as_deref())
}

/// Per stage: (selected, forced).
fn selection(p: &Pipeline, sel: &Selection) -> anyhow::Result<(Vec<bool>, Vec<bool>)> {
    let selected = if sel.stages.is_empty() {
        vec![true; p.stages.len()]
    } else {
        let mut targets = Vec::new();
        for s in &sel.stages {
            targets.extend(p.select(s)?);
        }
        p.with_ancestors(&targets)
    };
    let mut forced = vec![sel.force_all; p.stages.len()];
    for s in &sel.force {
        for i in p.select(s)? {
            forced[i] = true;
        }
    }
    Ok((selected, forced))
}

/// One row of a plan.
pub struct PlanRow {
    /// Stage index.
    pub idx: usize,
    /// What happens.
    pub decision: Decision,
}

/// Plans the selected stages in order.
pub fn make_plan(
    planner: &mut Planner,
    selected: &[bool],
    forced: &[bool],
) -> anyhow::Result<Vec<PlanRow>> {
    let p = planner.p;
    let mut known: Known = HashMap::new();
    let mut will_run = Vec::new();
    let mut rows = Vec::new();
    for &i in p.order.iter().filter(|&&i| selected[i]) {
        let decision = planner.decide(i, &known, forced[i], &will_run)?;
        match &decision {
            Decision::Cached { record, .. } => {
                known.insert(i, record.outputs.clone());
            }
            Decision::Run { .. } | Decision::MayRun { .. } => will_run.push(i),
        }
        rows.push(PlanRow { idx: i, decision });
    }
    Ok(rows)
}

fn print_plan(p: &Pipeline, rows: &[PlanRow], json_out: bool) {
    if json_out {
        let stages: Vec<_> = rows
            .iter()
            .map(|r| {
                let name = &p.stages[r.idx].name;
                match &r.decision {
                    Decision::Cached { record, restore } => json!({
                        "stage": name, "state": "cached", "key": record.key, "restore": restore, "reasons": [],
                    }),
                    Decision::Run { key, reasons, .. } => json!({
                        "stage": name, "state": "run", "key": key, "reasons": reasons,
                    }),
                    Decision::MayRun { after } => json!({
                        "stage": name, "state": "may run", "key": null,
                        "reasons": after.iter().map(|&u| format!("after {}", p.stages[u].name)).collect::<Vec<_>>(),
                        "after": after.iter().map(|&u| &p.stages[u].name).collect::<Vec<_>>(),
                    }),
                }
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"pipeline": p.name, "stages": stages}))
                .unwrap_or_default()
        );
        return;
    }
    let width = rows
        .iter()
        .map(|r| p.stages[r.idx].name.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!(
        "{:<width$}  {:<8} {:<12}  REASON\n",
        "STAGE", "STATE", "KEY"
    );
    let (mut run, mut may, mut cached) = (0, 0, 0);
    for r in rows {
        let name = &p.stages[r.idx].name;
        let (state, key, why) = match &r.decision {
            Decision::Cached { record, restore } => {
                cached += 1;
                let why = if *restore {
                    "outputs will be restored from the store".to_owned()
                } else {
                    String::new()
                };
                (
                    console::style("cached").dim().to_string(),
                    record.key[..12].to_owned(),
                    why,
                )
            }
            Decision::Run { key, reasons, .. } => {
                run += 1;
                (
                    console::style("run").cyan().to_string(),
                    key[..12].to_owned(),
                    reasons.join(", "),
                )
            }
            Decision::MayRun { after } => {
                may += 1;
                let names: Vec<&str> = after.iter().map(|&u| p.stages[u].name.as_str()).collect();
                (
                    console::style("may run").yellow().to_string(),
                    "-".to_owned(),
                    format!("after {}", names.join(", ")),
                )
            }
        };
        let pad = 8 + state.len() - console::measure_text_width(&state);
        let _ = writeln!(out, "{name:<width$}  {state:<pad$} {key:<12}  {why}");
    }
    let _ = write!(out, "{run} to run, {may} may run, {cached} cached");
    println!("{}", out.trim_end());
}

/// `anneal plan`.
pub fn plan(
    args: &PipelineArgs,
    sel: &Selection,
    json_out: bool,
    check: bool,
) -> anyhow::Result<i32> {
    let p = load(args)?;
    let store = Store::open(&p.store_dir)?;
    let (selected, forced) = selection(&p, sel)?;
    let mut planner = Planner::new(&p, &store);
    let rows = make_plan(&mut planner, &selected, &forced)?;
    planner.save();
    print_plan(&p, &rows, json_out);
    let work = rows
        .iter()
        .any(|r| !matches!(r.decision, Decision::Cached { restore: false, .. }));
    Ok(if check && work { EXIT_FAILED } else { 0 })
}

fn detect_gpus(want: Option<u32>) -> (Vec<String>, String) {
    if let Some(n) = want {
        return ((0..n).map(|i| i.to_string()).collect(), "--gpus".into());
    }
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        let ids: Vec<String> = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "-1")
            .map(str::to_owned)
            .collect();
        return (ids, "CUDA_VISIBLE_DEVICES".into());
    }
    let n = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("nvidia")
                        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0);
    (
        (0..n).map(|i| i.to_string()).collect(),
        "/dev/nvidia*".into(),
    )
}

/// `can_wait`: the command has `--wait` (`run`), so the busy message offers it.
fn lock_store(
    store_dir: &Path,
    wait: bool,
    can_wait: bool,
    ui: &Console,
) -> anyhow::Result<WorkspaceLock> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let res = if wait {
        WorkspaceLock::acquire_wait(store_dir, &command, |info| {
            let who = info
                .map(|i| format!(" (pid {}: `{}`)", i.pid, i.command))
                .unwrap_or_default();
            ui.note(&format!(
                "waiting for another anneal run to release the store lock{who}..."
            ));
        })
    } else {
        WorkspaceLock::try_acquire(store_dir, &command)
    };
    match res {
        Ok((lock, Acquired::TookOverStale(info))) => {
            ui.note(&format!(
                "took over a stale store lock left by pid {} (`{}`), which is no longer running",
                info.pid, info.command
            ));
            Ok(lock)
        }
        Ok((lock, Acquired::Fresh)) => Ok(lock),
        Err(e @ LockError::Busy(_)) if can_wait => Err(anyhow::anyhow!(
            "{e}\n  help: pass --wait to wait for it (store: {})",
            store_dir.display()
        )),
        Err(e @ LockError::Busy(_)) => Err(anyhow::anyhow!(
            "{e}\n  help: try again when it has finished (store: {})",
            store_dir.display()
        )),
        Err(e) => Err(e.into()),
    }
}

/// `anneal run`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    args: &PipelineArgs,
    sel: &Selection,
    jobs: Option<usize>,
    cpus: Option<u32>,
    gpus: Option<u32>,
    keep_going: bool,
    wait: bool,
    json_out: bool,
    quiet: bool,
) -> anyhow::Result<i32> {
    let p = Arc::new(load(args)?);
    let (selected, force) = selection(&p, sel)?;
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let need_gpus = p
        .stages
        .iter()
        .enumerate()
        .filter(|(i, _)| selected[*i])
        .map(|(_, s)| s.gpus)
        .max()
        .unwrap_or(0);
    let (gpu_ids, source) = if need_gpus > 0 {
        detect_gpus(gpus)
    } else {
        (Vec::new(), String::new())
    };
    if let Some((_, s)) = p
        .stages
        .iter()
        .enumerate()
        .find(|(i, s)| selected[*i] && s.gpus as usize > gpu_ids.len())
    {
        return Err(anyhow::anyhow!(
            "stage '{}' needs {} GPU(s) but {} are available (from {source})\n  help: run on a machine with GPUs, or pass --gpus N to say how many there are",
            s.name,
            s.gpus,
            gpu_ids.len()
        ));
    }
    let store = Arc::new(Store::open(&p.store_dir)?);
    let ui = Arc::new(Console::new(quiet));
    let _lock = lock_store(&p.store_dir, wait, true, &ui)?;
    let opts = RunOptions {
        jobs: jobs.unwrap_or(ncpu).max(1),
        cpus: cpus.unwrap_or(ncpu as u32).max(1),
        gpus: gpu_ids,
        keep_going,
        force,
        selected,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(exec::run(p.clone(), store, ui.clone(), opts))?;
    let done = report.count(Outcome::Done);
    let cached = report.count(Outcome::Cached);
    let failed = report.count(Outcome::Failed);
    let skipped = report.count(Outcome::Skipped) + report.count(Outcome::Interrupted);
    if json_out {
        crate::ui::stdout_line(&serde_json::to_string_pretty(&report)?);
    } else {
        let mut s = format!("{done} ran, {cached} cached");
        if failed > 0 {
            s.push_str(&format!(", {failed} failed"));
        }
        if skipped > 0 {
            s.push_str(&format!(", {skipped} not run"));
        }
        let took = fmt_duration(Duration::from_secs_f64(report.seconds));
        ui.note(&format!("{} {s} in {took}", console::style(&p.name).bold()));
    }
    Ok(if report.interrupted {
        EXIT_INTERRUPTED
    } else if failed > 0 {
        EXIT_FAILED
    } else {
        0
    })
}

fn ago(ms: u64) -> String {
    let s = now_ms().saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// `anneal status`.
pub fn status(args: &PipelineArgs, json_out: bool) -> anyhow::Result<i32> {
    let p = load(args)?;
    let st = Status::load(&p.store_dir, &p.file);
    // A stage still marked running while nobody holds the lock was interrupted.
    let live = anneal_cache::WorkspaceLock::live_holder(&p.store_dir).is_some();
    let state_of = |s: &crate::status::StageStatus| {
        if s.state == RunState::Running && !live {
            RunState::Interrupted
        } else {
            s.state
        }
    };
    if json_out {
        let stages: Vec<_> = p
            .stages
            .iter()
            .map(|s| match st.stages.get(&s.name) {
                Some(x) => json!({
                    "stage": s.name, "state": state_of(x).as_str(), "key": x.key, "at_unix_ms": x.at_unix_ms,
                    "duration_ms": x.duration_ms, "error": x.error, "report": x.report,
                }),
                None => json!({"stage": s.name, "state": "never run"}),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"pipeline": p.name, "stages": stages}))?
        );
        return Ok(0);
    }
    let width = p
        .stages
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<width$}  {:<11}  {:<9}  {:>8}  KEY",
        "STAGE", "STATE", "WHEN", "TOOK"
    );
    for s in &p.stages {
        match st.stages.get(&s.name) {
            Some(x) => {
                let took = x
                    .duration_ms
                    .map(|d| fmt_duration(Duration::from_millis(d)))
                    .unwrap_or_else(|| "-".into());
                let err = x
                    .error
                    .as_deref()
                    .map(|e| format!("  {e}"))
                    .or_else(|| x.report.as_ref().map(|r| format!("  {}", report_line(r))))
                    .unwrap_or_default();
                println!(
                    "{:<width$}  {:<11}  {:<9}  {:>8}  {}{err}",
                    s.name,
                    state_of(x).as_str(),
                    ago(x.at_unix_ms),
                    took,
                    &x.key[..x.key.len().min(12)]
                );
            }
            None => println!(
                "{:<width$}  {:<11}  {:<9}  {:>8}  -",
                s.name, "never run", "-", "-"
            ),
        }
    }
    Ok(0)
}

/// `anneal dag`.
pub fn dag(args: &PipelineArgs, dot: bool, mermaid: bool) -> anyhow::Result<i32> {
    let p = load(args)?;
    let mut out = String::new();
    if dot {
        let _ = writeln!(
            out,
            "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];",
            p.name.replace('"', "\\\"")
        );
        for s in &p.stages {
            let _ = writeln!(
                out,
                "  \"{}\" [label=\"{}\\n({})\"];",
                s.name,
                s.name,
                s.kind.kind()
            );
        }
        for &i in &p.order {
            for d in p.downstream(i) {
                let _ = writeln!(
                    out,
                    "  \"{}\" -> \"{}\";",
                    p.stages[i].name, p.stages[d].name
                );
            }
        }
        out.push('}');
    } else if mermaid {
        out.push_str("flowchart LR\n");
        let id = |i: usize| format!("s{i}");
        for (i, s) in p.stages.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {}[\"{}<br/>({})\"]",
                id(i),
                s.name.replace('"', "#quot;"),
                s.kind.kind()
            );
        }
        for &i in &p.order {
            for d in p.downstream(i) {
                let _ = writeln!(out, "  {} --> {}", id(i), id(d));
            }
        }
    } else {
        // Stages by depth: each line lists what the stage reads from.
        let mut depth = vec![0usize; p.stages.len()];
        for &i in &p.order {
            depth[i] = p
                .upstream(i)
                .iter()
                .map(|&u| depth[u] + 1)
                .max()
                .unwrap_or(0);
        }
        let width = p
            .stages
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(0);
        for &i in &p.order {
            let s = &p.stages[i];
            let ups: Vec<&str> = p
                .upstream(i)
                .iter()
                .map(|&u| p.stages[u].name.as_str())
                .collect();
            let indent = "  ".repeat(depth[i]);
            let arrow = if ups.is_empty() {
                String::new()
            } else {
                format!("  <- {}", ups.join(", "))
            };
            let pad = width + 2 * depth.iter().max().copied().unwrap_or(0)
                - 2 * depth[i]
                - s.name.chars().count();
            let _ = writeln!(
                out,
                "{indent}{}{}  [{}]{arrow}",
                s.name,
                " ".repeat(pad),
                s.kind.kind()
            );
        }
    }
    println!("{}", out.trim_end());
    Ok(0)
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// `anneal gc`.
pub fn gc(
    args: &PipelineArgs,
    keep_last: Option<usize>,
    dry_run: bool,
    json_out: bool,
    quiet: bool,
) -> anyhow::Result<i32> {
    let p = load(args)?;
    let store = Store::open(&p.store_dir)?;
    let ui = Console::new(quiet);
    let _lock = lock_store(&p.store_dir, false, false, &ui)?;
    // Every pipeline sharing the store keeps its current results.
    let statuses = Status::load_all(&p.store_dir);
    let all = || statuses.iter().flat_map(|st| st.stages.values());
    let current: HashSet<&str> = all().map(|s| s.key.as_str()).collect();
    // Per stage, the newest `keep_last` records.
    let mut keep_keys: Option<HashSet<String>> = None;
    if let Some(n) = keep_last {
        let mut by_stage: HashMap<String, Vec<(u64, String)>> = HashMap::new();
        for r in store.records()? {
            by_stage
                .entry(r.stage.clone())
                .or_default()
                .push((r.created_unix_ms, r.key.clone()));
        }
        let mut keys = HashSet::new();
        for (_, mut v) in by_stage {
            v.sort_by_key(|r| std::cmp::Reverse(r.0));
            keys.extend(v.into_iter().take(n).map(|(_, k)| k));
        }
        keep_keys = Some(keys);
    }
    let report = store.gc(
        |r| {
            current.contains(&r.key.as_str())
                || keep_keys.as_ref().is_none_or(|k| k.contains(&r.key))
        },
        dry_run,
    )?;
    // Scratch space of keys that are not the pending run of any stage is dead.
    let mut scratch_removed = 0;
    let pending: HashSet<&str> = all()
        .filter(|s| {
            matches!(
                s.state,
                RunState::Running | RunState::Interrupted | RunState::Failed
            )
        })
        .map(|s| s.key.as_str())
        .collect();
    if let Ok(entries) = std::fs::read_dir(p.store_dir.join("scratch")) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if !pending.contains(&name.as_str()) {
                scratch_removed += 1;
                if !dry_run {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    if json_out {
        let mut v = serde_json::to_value(&report)?;
        v["scratch_removed"] = json!(scratch_removed);
        v["dry_run"] = json!(dry_run);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let verb = if dry_run { "would remove" } else { "removed" };
        ui.note(&format!(
            "{verb} {} record(s), {} object(s) and {} scratch dir(s), {} freed; kept {} record(s), {} object(s)",
            report.records_removed,
            report.objects_removed,
            scratch_removed,
            human_bytes(report.bytes_freed),
            report.records_kept,
            report.objects_kept
        ));
    }
    Ok(0)
}

/// `anneal exec-stage`: run one job in this process.
pub fn exec_stage(job: &Path) -> anyhow::Result<i32> {
    let bytes = if job.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
            .context("reading the job from stdin")?;
        b
    } else {
        std::fs::read(job).with_context(|| format!("reading job file {}", job.display()))?
    };
    let job: anneal_stages::Job = serde_json::from_slice(&bytes)
        .context("the job is not valid JSON for this anneal version")?;
    anneal_stages::exec_job(job)?;
    Ok(0)
}
