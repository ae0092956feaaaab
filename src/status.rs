//! `status.json` in the store: the last run of every stage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a stage's last run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Ran and committed its outputs.
    Done,
    /// Was up to date.
    Cached,
    /// Failed.
    Failed,
    /// Started and never finished (the run is in progress, or was killed).
    Running,
    /// Stopped by Ctrl-C or a signal.
    Interrupted,
}

impl RunState {
    /// The word shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Done => "done",
            RunState::Cached => "cached",
            RunState::Failed => "failed",
            RunState::Running => "running",
            RunState::Interrupted => "interrupted",
        }
    }
}

/// The last run of one stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageStatus {
    /// How it ended.
    pub state: RunState,
    /// Its cache key.
    pub key: String,
    /// When it ended (or started, while running), Unix milliseconds.
    pub at_unix_ms: u64,
    /// How long it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// What the key was computed from (secrets redacted).
    pub inputs: Value,
    /// The error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StageStatus {
    /// A status stamped now.
    pub fn new(state: RunState, key: String, inputs: Value) -> Self {
        StageStatus {
            state,
            key,
            at_unix_ms: now_ms(),
            duration_ms: None,
            inputs,
            error: None,
        }
    }
}

/// Every stage's last run.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// By stage name.
    pub stages: BTreeMap<String, StageStatus>,
    #[serde(skip)]
    path: PathBuf,
}

impl Status {
    /// Reads `status.json` in `store_root`; missing or unreadable means empty.
    pub fn load(store_root: &Path) -> Status {
        let path = store_root.join("status.json");
        let mut s: Status = std::fs::read(&path)
            .ok()
            .and_then(|b| match serde_json::from_slice(&b) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("ignoring unreadable {}: {e}", path.display());
                    None
                }
            })
            .unwrap_or_default();
        s.path = path;
        s
    }

    /// Writes it back atomically.
    pub fn save(&self) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        anneal_cache::write_atomic(&self.path, &bytes)?;
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
