use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Progress, StageContext, builtin};

/// Marks a secret environment variable inside a job's strings:
/// `SENTINEL + "env:" + NAME + SENTINEL`. The engine never writes secret values
/// into a job; the stage process fills them in from its own environment.
pub const SECRET_SENTINEL: char = '\u{1}';

/// Everything a stage process needs to run one stage: what the engine sends to
/// `anneal exec-stage` as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Stage name in the pipeline.
    pub stage: String,
    /// Stage kind.
    pub kind: String,
    /// The kind version the engine computed the cache key with.
    pub kind_version: u32,
    /// Kind-specific keys, interpolated.
    pub config: BTreeMap<String, Value>,
    /// Resolved params.
    pub params: Value,
    /// Declared inputs.
    pub deps: BTreeMap<String, PathBuf>,
    /// Where each declared output must be written.
    pub outs: BTreeMap<String, PathBuf>,
    /// Persistent scratch directory for resumable progress.
    pub scratch: PathBuf,
    /// Directory shared by every run of this kind in the store, for caches that
    /// outlive one stage key (e.g. per-item LLM replies).
    #[serde(default)]
    pub cache: PathBuf,
    /// Working directory.
    pub workdir: PathBuf,
}

/// Runs one job in this process: the entry point behind `anneal exec-stage`.
pub fn exec_job(job: Job) -> anyhow::Result<()> {
    let stage = builtin(&job.kind).with_context(|| format!("unknown stage kind '{}'", job.kind))?;
    if stage.version() != job.kind_version {
        bail!(
            "stage kind '{}' is version {} in this binary but the job was planned with version {}; rerun `anneal run`",
            job.kind,
            stage.version(),
            job.kind_version
        );
    }
    let mut config = BTreeMap::new();
    for (k, v) in job.config {
        config.insert(k, expand_secrets(v)?);
    }
    let ctx = StageContext {
        name: job.stage,
        config,
        params: expand_secrets(job.params)?,
        deps: job.deps,
        outs: job.outs,
        scratch: job.scratch,
        cache: job.cache,
        workdir: job.workdir,
        progress: Progress::new(),
    };
    stage.run(&ctx)
}

/// Replaces secret sentinels in every string of `v` with the values of the
/// named environment variables.
pub fn expand_secrets(v: Value) -> anyhow::Result<Value> {
    Ok(match v {
        Value::String(s) if s.contains(SECRET_SENTINEL) => Value::String(expand_str(&s)?),
        Value::Array(a) => Value::Array(
            a.into_iter()
                .map(expand_secrets)
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| Ok((k, expand_secrets(v)?)))
                .collect::<anyhow::Result<_>>()?,
        ),
        other => other,
    })
}

fn expand_str(s: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut parts = s.split(SECRET_SENTINEL);
    out.push_str(parts.next().unwrap_or_default());
    while let Some(marker) = parts.next() {
        let Some(name) = marker.strip_prefix("env:") else {
            bail!("malformed secret placeholder in job");
        };
        let value = std::env::var(name).with_context(|| {
            format!("secret environment variable '{name}' is not set in the stage process")
        })?;
        out.push_str(&value);
        out.push_str(parts.next().unwrap_or_default());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_expand_from_env() {
        // SAFETY: single-threaded test setting a variable no other test reads.
        unsafe { std::env::set_var("ANNEAL_TEST_SECRET_TOKEN", "s3cr3t") };
        let v = Value::String(format!(
            "key={SECRET_SENTINEL}env:ANNEAL_TEST_SECRET_TOKEN{SECRET_SENTINEL}!"
        ));
        assert_eq!(
            expand_secrets(v).unwrap(),
            Value::String("key=s3cr3t!".into())
        );
    }
}
