//! Kind `command`: runs a shell command.

use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{ConfigError, KeySpec, Stage, StageContext};

/// Runs `cmd` with `sh -c` (or `shell`) in the pipeline directory.
///
/// The command sees `ANNEAL_STAGE`, `ANNEAL_SCRATCH` (a directory that survives a
/// killed attempt), and `ANNEAL_DEP_<NAME>` / `ANNEAL_OUT_<NAME>` for each input
/// and output, besides the `${deps.x}`/`${outs.x}` interpolations.
pub struct Command;

const KEYS: &[KeySpec] = &[
    KeySpec {
        name: "cmd",
        required: true,
        doc: "the shell command (a string, or a list run in order)",
    },
    KeySpec {
        name: "shell",
        required: false,
        doc: "the shell that runs cmd (default: sh)",
    },
    KeySpec {
        name: "env",
        required: false,
        doc: "extra environment variables for the command",
    },
];

static CHILD_PGID: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    let pgid = CHILD_PGID.load(Ordering::SeqCst);
    // SAFETY: kill and _exit are async-signal-safe.
    unsafe {
        if pgid > 0 {
            libc::kill(-pgid, libc::SIGKILL);
        }
        libc::_exit(128 + sig);
    }
}

/// When this process is told to stop (or its engine dies, which the engine turns
/// into SIGTERM), take the whole command process group down with it so no
/// orphan keeps writing into the staging directory.
fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only calls async-signal-safe functions.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn env_suffix(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn commands(config: &BTreeMap<String, Value>) -> Option<Vec<&str>> {
    match config.get("cmd")? {
        Value::String(s) => Some(vec![s.as_str()]),
        Value::Array(items) => items.iter().map(Value::as_str).collect(),
        _ => None,
    }
}

impl Stage for Command {
    fn kind(&self) -> &'static str {
        "command"
    }

    fn version(&self) -> u32 {
        1
    }

    fn keys(&self) -> &'static [KeySpec] {
        KEYS
    }

    fn check(&self, config: &BTreeMap<String, Value>, _params: &Value) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        match commands(config) {
            Some(c) if !c.is_empty() && c.iter().all(|s| !s.trim().is_empty()) => {}
            Some(_) => errs.push(ConfigError {
                key: "cmd".into(),
                message: "cmd is empty; write the shell command to run".into(),
            }),
            None => errs.push(ConfigError {
                key: "cmd".into(),
                message: "cmd must be a string or a list of strings".into(),
            }),
        }
        if let Some(v) = config.get("shell")
            && !v.is_string()
        {
            errs.push(ConfigError {
                key: "shell".into(),
                message: "shell must be a string such as `bash`".into(),
            });
        }
        if let Some(v) = config.get("env") {
            let ok = v.as_object().is_some_and(|m| {
                m.values()
                    .all(|v| v.is_string() || v.is_number() || v.is_boolean())
            });
            if !ok {
                errs.push(ConfigError {
                    key: "env".into(),
                    message: "env must map names to strings or numbers".into(),
                });
            }
        }
        errs
    }

    fn run(&self, ctx: &StageContext) -> anyhow::Result<()> {
        let cmds = commands(&ctx.config).context("cmd must be a string or a list of strings")?;
        let shell = ctx
            .config
            .get("shell")
            .and_then(Value::as_str)
            .unwrap_or("sh");
        install_signal_handlers();
        for cmd in cmds {
            let mut c = std::process::Command::new(shell);
            c.arg("-c")
                .arg(cmd)
                .current_dir(&ctx.workdir)
                .env("ANNEAL_STAGE", &ctx.name)
                .env("ANNEAL_SCRATCH", &ctx.scratch)
                .process_group(0);
            for (name, path) in &ctx.deps {
                c.env(format!("ANNEAL_DEP_{}", env_suffix(name)), path);
            }
            for (name, path) in &ctx.outs {
                c.env(format!("ANNEAL_OUT_{}", env_suffix(name)), path);
            }
            if let Some(Value::Object(env)) = ctx.config.get("env") {
                for (k, v) in env {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    c.env(k, v);
                }
            }
            let mut child = c.spawn().with_context(|| {
                format!("could not start `{shell}`; is it installed and on PATH?")
            })?;
            CHILD_PGID.store(child.id() as i32, Ordering::SeqCst);
            let status = child.wait().context("waiting for the command")?;
            CHILD_PGID.store(0, Ordering::SeqCst);
            if let Some(code) = status.code() {
                if code != 0 {
                    bail!("command exited with status {code}");
                }
            } else if let Some(sig) = status.signal() {
                bail!("command was killed by signal {sig}");
            }
        }
        Ok(())
    }
}
