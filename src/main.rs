use clap::Parser;

use anneal::cli::{Cli, Command};
use anneal::commands::{self, EXIT_ERROR};

fn main() {
    tune_malloc();
    let cli = Cli::parse();
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ANNEAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();

    if !matches!(
        cli.command,
        Command::Run { dry_run: false, .. } | Command::ExecStage { .. }
    ) {
        // Printing commands end quietly when their reader goes away (`anneal status | head`).
        // Not `run`: it writes to its stage processes' pipes and must see those errors.
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match &cli.command {
        Command::Run {
            pipeline,
            select,
            jobs,
            cpus,
            gpus,
            keep_going,
            dry_run,
            wait,
            json,
        } => {
            if *dry_run {
                commands::plan(pipeline, select, *json, false)
            } else {
                commands::run(
                    pipeline,
                    select,
                    *jobs,
                    *cpus,
                    *gpus,
                    *keep_going,
                    *wait,
                    *json,
                    cli.quiet,
                )
            }
        }
        Command::Plan {
            pipeline,
            select,
            json,
            check,
        } => commands::plan(pipeline, select, *json, *check),
        Command::Dag {
            pipeline,
            dot,
            mermaid,
        } => commands::dag(pipeline, *dot, *mermaid),
        Command::Status { pipeline, json } => commands::status(pipeline, *json),
        Command::Metrics {
            pipeline,
            stages,
            baseline,
            output,
            json,
        } => anneal::metrics_cmd::metrics(pipeline, stages, baseline.as_deref(), output, *json),
        Command::Gc {
            pipeline,
            keep_last,
            dry_run,
            json,
        } => commands::gc(pipeline, *keep_last, *dry_run, *json, cli.quiet),
        Command::Model { command } => anneal::model_cmd::run(command),
        Command::ExecStage { job } => commands::exec_stage(job),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if let Some(d) = e.downcast_ref::<anneal::diag::Diags>() {
                anneal::ui::stderr_line(&format!("{} {d}", console::style("error:").red().bold()));
            } else {
                anneal::ui::stderr_line(&format!(
                    "{} {e:#}",
                    console::style("error:").red().bold()
                ));
            }
            std::process::exit(EXIT_ERROR);
        }
    }
}

/// Keeps freed memory in glibc's heap for reuse instead of handing it back to
/// the kernel. A training step frees and reallocates gigabytes of tensors, and
/// with glibc's defaults each one above its mapping threshold (32 MiB at most)
/// is a fresh mapping of zeroed pages: page faults were 2.1M in four SmolLM2
/// steps, 1.0M with this, and trained tokens/s rose 10-20%
/// (docs/BENCHMARKS.md). Peak RSS stayed within 1%. The heap is never trimmed:
/// at Qwen2.5-0.5B's vocabulary one chunk of logits is a gigabyte, and a
/// 1 GiB threshold gave it back and faulted it in again every step. Left
/// alone when the user tunes malloc through the environment.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = std::env::vars_os().any(|(k, _)| {
            let k = k.to_string_lossy();
            k.starts_with("MALLOC_") || k == "GLIBC_TUNABLES"
        });
        if !tuned {
            // SAFETY: mallopt only changes allocator parameters; called
            // before any other thread exists.
            unsafe {
                libc::mallopt(libc::M_MMAP_MAX, 0);
                // -1: never trim (mallopt(3)).
                libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
                libc::mallopt(libc::M_TOP_PAD, 256 << 20);
            }
        }
    }
}
