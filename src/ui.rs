//! What a run shows people: a live view on a terminal, plain lines otherwise.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anneal_stages::ProgressEvent;
use console::style;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Reports stage events during a run. Safe to call from any task.
pub struct Console {
    quiet: bool,
    live: Option<MultiProgress>,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

/// Formats a duration like `1.24s` or `3m05s`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.2}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// A stage report as `key=value` pairs.
pub fn report_line(r: &serde_json::Value) -> String {
    match r.as_object() {
        Some(m) => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => r.to_string(),
    }
}

impl Console {
    /// A console on stderr; live bars only when stderr is a terminal.
    pub fn new(quiet: bool) -> Self {
        let live = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)));
        Console {
            quiet,
            live,
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn line(&self, s: String) {
        if self.quiet {
            return;
        }
        match &self.live {
            Some(mp) => {
                let _ = mp.println(s);
            }
            None => stderr_line(&s),
        }
    }

    fn finish_bar(&self, name: &str) {
        if let Some(pb) = self.bars.lock().ok().and_then(|mut b| b.remove(name)) {
            pb.finish_and_clear();
            if let Some(mp) = &self.live {
                mp.remove(&pb);
            }
        }
    }

    /// A stage was up to date.
    pub fn cached(&self, name: &str, restored: bool) {
        let note = if restored { " (outputs restored)" } else { "" };
        self.line(format!("{:>9} {name}{note}", style("cached").dim()));
    }

    /// A stage started.
    pub fn started(&self, name: &str, reasons: &[String]) {
        let why = if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        };
        match &self.live {
            Some(mp) if !self.quiet => {
                let pb = mp.add(ProgressBar::new_spinner());
                pb.set_style(
                    ProgressStyle::with_template("{spinner:.cyan} {prefix:>7} {msg} {elapsed:>4}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                pb.set_prefix("running");
                pb.set_message(format!("{name}{}", style(why).dim()));
                pb.enable_steady_tick(Duration::from_millis(100));
                if let Ok(mut bars) = self.bars.lock() {
                    bars.insert(name.to_owned(), pb);
                }
            }
            _ => self.line(format!("{:>9} {name}{why}", style("running").cyan())),
        }
    }

    /// A running stage reported progress.
    pub fn progress(&self, name: &str, ev: &ProgressEvent) {
        let Ok(bars) = self.bars.lock() else { return };
        let Some(pb) = bars.get(name) else { return };
        if let Some(total) = ev.total
            && pb.length() != Some(total)
        {
            pb.set_length(total);
            pb.set_style(
                ProgressStyle::with_template(
                    "{spinner:.cyan} {prefix:>7} {msg} [{bar:30.cyan/blue}] {pos}/{len} {elapsed:>4} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
        }
        if let Some(done) = ev.done {
            pb.set_position(done);
        }
        if let Some(msg) = &ev.message {
            pb.set_message(format!("{name} {}", style(msg).dim()));
        }
    }

    /// A stage finished and its outputs were committed; `report` is what it said of its work.
    pub fn finished(&self, name: &str, took: Duration, report: Option<&serde_json::Value>) {
        self.finish_bar(name);
        let report = report
            .map(|r| format!("  {}", report_line(r)))
            .unwrap_or_default();
        self.line(format!(
            "{:>9} {name} {}{}",
            style("done").green(),
            style(fmt_duration(took)).dim(),
            style(report).dim()
        ));
    }

    /// A stage failed; shows the end of its log.
    pub fn failed(&self, name: &str, error: &str, log: &Path, tail: &[String]) {
        self.finish_bar(name);
        let mut s = format!("{:>9} {name}: {error}", style("failed").red().bold());
        if !tail.is_empty() {
            s.push_str(&format!("\n          last lines of {}:", log.display()));
            for l in tail {
                s.push_str("\n          | ");
                s.push_str(l);
            }
        } else {
            s.push_str(&format!("\n          log: {}", log.display()));
        }
        match &self.live {
            Some(mp) => {
                let _ = mp.println(s);
            }
            None => stderr_line(&s),
        }
    }

    /// A stage was not run.
    pub fn skipped(&self, name: &str, why: &str) {
        self.line(format!("{:>9} {name} ({why})", style("skipped").yellow()));
    }

    /// Any other message.
    pub fn note(&self, msg: &str) {
        self.line(msg.to_owned());
    }

    /// An error that always shows, even with `--quiet`.
    pub fn error(&self, msg: &str) {
        match &self.live {
            Some(mp) => {
                let _ = mp.println(msg);
            }
            None => stderr_line(msg),
        }
    }
}

/// Writes a line to stderr, ignoring a closed pipe: `anneal run` keeps going
/// (and keeps its records right) when whoever reads its output goes away.
pub fn stderr_line(s: &str) {
    let _ = writeln!(std::io::stderr(), "{s}");
}

/// Writes a line to stdout, ignoring a closed pipe (see [`stderr_line`]).
pub fn stdout_line(s: &str) {
    let _ = writeln!(std::io::stdout(), "{s}");
}
