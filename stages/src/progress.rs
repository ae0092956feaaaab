use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Lines on a stage process's stderr that start with this carry a JSON [`ProgressEvent`].
pub const PROGRESS_PREFIX: &str = "::anneal-progress::";

/// A line on a stage process's stderr that starts with this carries its JSON report.
pub const REPORT_PREFIX: &str = "::anneal-report::";

/// One progress update from a running stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressEvent {
    /// Units done so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<u64>,
    /// Units in all, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// A short message (current phase, last loss...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Reports progress from a stage to the engine, at most ten times a second.
#[derive(Debug)]
pub struct Progress {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    event: ProgressEvent,
    last_sent: Option<Instant>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// A reporter writing to this process's stderr.
    pub fn new() -> Self {
        Progress {
            state: Mutex::new(State {
                event: ProgressEvent::default(),
                last_sent: None,
            }),
        }
    }

    /// Sets the number of units in all.
    pub fn set_total(&self, total: u64) {
        self.update(|e| e.total = Some(total), true);
    }

    /// Sets the number of units done.
    pub fn set_done(&self, done: u64) {
        self.update(|e| e.done = Some(done), false);
    }

    /// Adds `n` units done.
    pub fn inc(&self, n: u64) {
        self.update(|e| e.done = Some(e.done.unwrap_or(0) + n), false);
    }

    /// Sets the message shown beside the stage.
    pub fn message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        self.update(|e| e.message = Some(msg), true);
    }

    /// Sends the stage's final report (see [`crate::StageContext::report`]).
    pub fn report(&self, report: &serde_json::Value) {
        if let Ok(json) = serde_json::to_string(report) {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{REPORT_PREFIX}{json}");
        }
    }

    fn update(&self, f: impl FnOnce(&mut ProgressEvent), force: bool) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        f(&mut st.event);
        let due = st
            .last_sent
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
        if force || due {
            st.last_sent = Some(Instant::now());
            if let Ok(json) = serde_json::to_string(&st.event) {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{PROGRESS_PREFIX}{json}");
            }
        }
    }
}
