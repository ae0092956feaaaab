//! `status/<pipeline file>.json` in the store: the last run of every stage of one
//! pipeline. Several pipelines may share a store (and stage names).

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
    /// What the stage reported about its work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Value>,
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
            report: None,
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
    /// Reads the status of the pipeline file `pipeline` from the store at
    /// `store_root`; missing or unreadable means empty.
    pub fn load(store_root: &Path, pipeline: &Path) -> Status {
        Self::load_file(
            store_root
                .join("status")
                .join(Self::file_name(store_root, pipeline)),
        )
    }

    /// `<pipeline file name>.json` for a store inside the pipeline's directory
    /// (the project can move); in a store shared from elsewhere
    /// (`ANNEAL_STORE`), pipelines with the same file name in different
    /// directories are told apart by a hash of the pipeline's full path.
    fn file_name(store_root: &Path, pipeline: &Path) -> String {
        let name = pipeline
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let file = real(pipeline);
        let inside = file
            .parent()
            .is_some_and(|dir| real(store_root).starts_with(dir));
        if inside {
            format!("{name}.json")
        } else {
            let h = blake3::hash(file.as_os_str().as_encoded_bytes()).to_hex();
            format!("{name}-{}.json", &h[..12])
        }
    }

    /// The status of every pipeline that uses the store.
    pub fn load_all(store_root: &Path) -> Vec<Status> {
        let Ok(dir) = std::fs::read_dir(store_root.join("status")) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .map(|e| Self::load_file(e.path()))
            .collect()
    }

    fn load_file(path: PathBuf) -> Status {
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
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
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
