//! Deciding, stage by stage, whether to reuse a cached result or run.

use std::collections::{BTreeMap, HashMap};

use anneal_cache::{Digest, LockInfo, Record, RecordOutput, StatCache, Store, WorkspaceLock};
use serde_json::{Map, Value, json};

use crate::interp::Mode;
use crate::pipeline::{Pipeline, StageSpec};
use crate::status::{RunState, Status};

/// Bumped when the way keys are computed changes.
const KEY_SCHEMA: &str = "anneal-key-1";

/// What will happen to a stage.
#[derive(Debug, Clone)]
pub enum Decision {
    /// A record for its key exists: reuse it (placing outputs back in the workspace if `restore`).
    Cached {
        /// The record.
        record: Record,
        /// Some output in the workspace is missing or differs from the record.
        restore: bool,
    },
    /// It must run.
    Run {
        /// Its key.
        key: String,
        /// What the key was computed from.
        inputs: Value,
        /// Why it runs.
        reasons: Vec<String>,
    },
    /// An upstream stage runs first; whether this one runs depends on what that produces.
    MayRun {
        /// Upstream stages that will run.
        after: Vec<usize>,
    },
}

/// Computes keys and decisions. Holds the stat cache, so reuse one per command.
pub struct Planner<'a> {
    /// The pipeline.
    pub p: &'a Pipeline,
    /// The store.
    pub store: &'a Store,
    /// File digests by stat.
    pub stat: StatCache,
    /// Last runs.
    pub status: Status,
    /// Another process running on this store now, if any.
    pub live_run: Option<LockInfo>,
}

/// Upstream outputs known so far: stage index -> output name -> record output.
pub type Known = HashMap<usize, BTreeMap<String, RecordOutput>>;

impl<'a> Planner<'a> {
    /// A planner over `p` and its store.
    pub fn new(p: &'a Pipeline, store: &'a Store) -> Self {
        Planner {
            p,
            store,
            stat: StatCache::load(&store.root().join("stat-cache.json")),
            status: Status::load(store.root(), &p.file),
            live_run: WorkspaceLock::live_holder(store.root()),
        }
    }

    /// The key and its inputs for stage `i`, or `None` while some upstream output is unknown.
    pub fn key(&mut self, i: usize, known: &Known) -> anyhow::Result<Option<(String, Value)>> {
        let s = &self.p.stages[i];
        let mut deps = Map::new();
        for (name, d) in &s.deps {
            let digest: Digest = match &d.from {
                Some((up, out)) => match known.get(up).and_then(|o| o.get(out)) {
                    Some(o) => o.output.digest,
                    None => return Ok(None),
                },
                None => {
                    let path = self.p.dir.join(&d.path);
                    if !path.exists() {
                        return Err(self.p.error_at(
                            d.mark,
                            format!("input '{name}' of stage '{}' does not exist: {}", s.name, d.path),
                            Some("create it, or produce it with a stage and refer to it as ${stages.STAGE.outs.OUTPUT}".into()),
                        ));
                    }
                    self.stat.digest(&path)?.digest
                }
            };
            deps.insert(
                name.clone(),
                json!({"path": d.path, "digest": digest.to_hex()}),
            );
        }
        let inputs = key_inputs(s, deps);
        let key = Digest::of_bytes(&canonical_json(
            &json!({"schema": KEY_SCHEMA, "inputs": inputs}),
        ))
        .to_hex();
        tracing::debug!(stage = %s.name, %key, "computed key");
        Ok(Some((key, inputs)))
    }

    /// Decides what happens to stage `i`. `will_run` lists the upstream stages that run first.
    pub fn decide(
        &mut self,
        i: usize,
        known: &Known,
        forced: bool,
        will_run: &[usize],
    ) -> anyhow::Result<Decision> {
        let after: Vec<usize> = self
            .p
            .upstream(i)
            .into_iter()
            .filter(|u| will_run.contains(u))
            .collect();
        if !after.is_empty() {
            return Ok(Decision::MayRun { after });
        }
        let Some((key, inputs)) = self.key(i, known)? else {
            let after = self
                .p
                .upstream(i)
                .into_iter()
                .filter(|u| !known.contains_key(u))
                .collect();
            return Ok(Decision::MayRun { after });
        };
        if !forced && let Some(record) = self.store.read_record(&key)? {
            let restore = !record.outputs.values().all(|o| {
                let path = self.p.dir.join(&o.path);
                self.store.is_materialized(&o.output, &path, &mut self.stat)
            });
            match restore.then(|| self.store.restorable(&record)) {
                Some(Err(why)) => {
                    return Ok(Decision::Run {
                        key,
                        inputs,
                        reasons: vec![format!(
                            "its cached result cannot be restored ({why} from the store)"
                        )],
                    });
                }
                _ => return Ok(Decision::Cached { record, restore }),
            }
        }
        let reasons = if forced {
            vec!["forced".to_owned()]
        } else {
            self.reasons(i, &key, &inputs)
        };
        Ok(Decision::Run {
            key,
            inputs,
            reasons,
        })
    }

    fn reasons(&self, i: usize, key: &str, inputs: &Value) -> Vec<String> {
        let s = &self.p.stages[i];
        let Some(prev) = self.status.stages.get(&s.name) else {
            return vec!["new stage".into()];
        };
        if prev.key == key {
            return vec![match prev.state {
                RunState::Failed => "last run failed".into(),
                RunState::Running => match &self.live_run {
                    Some(h) => format!("being run now by pid {} (`{}`)", h.pid, h.command),
                    None => "resumes an interrupted run".into(),
                },
                RunState::Interrupted => "resumes an interrupted run".into(),
                _ => "its cached result is gone from the store".into(),
            }];
        }
        let mut r = diff_inputs(&prev.inputs, inputs);
        if r.is_empty() {
            r.push("inputs changed".into());
        }
        r
    }

    /// Saves the stat cache.
    pub fn save(&self) {
        if let Err(e) = self.stat.save() {
            tracing::warn!("could not save the stat cache: {e}");
        }
    }
}

/// What a key is computed from: kind, kind version, config, params, input digests and output paths.
fn key_inputs(s: &StageSpec, deps: Map<String, Value>) -> Value {
    let declared = |n: &str| {
        s.outs
            .get(n)
            .map(|o| {
                if o.dir {
                    format!("{}/", o.path)
                } else {
                    o.path.clone()
                }
            })
            .unwrap_or_default()
    };
    let config: Map<String, Value> = s
        .config
        .iter()
        .map(|(k, v)| (k.clone(), v.render(Mode::Key, &declared)))
        .collect();
    let outs: Map<String, Value> = s
        .outs
        .keys()
        .map(|n| (n.clone(), Value::String(declared(n))))
        .collect();
    json!({
        "kind": s.kind.kind(),
        "kind_version": s.kind.version(),
        "config": config,
        "params": s.params.render(Mode::Key, &declared),
        "deps": deps,
        "outs": outs,
    })
}

/// JSON with object keys sorted at every level, without whitespace.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    fn write(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Object(m) => {
                out.push(b'{');
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                for (n, k) in keys.into_iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    out.extend(serde_json::to_vec(k).unwrap_or_default());
                    out.push(b':');
                    write(&m[k], out);
                }
                out.push(b'}');
            }
            Value::Array(a) => {
                out.push(b'[');
                for (n, x) in a.iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    write(x, out);
                }
                out.push(b']');
            }
            other => out.extend(serde_json::to_vec(other).unwrap_or_default()),
        }
    }
    let mut out = Vec::new();
    write(v, &mut out);
    out
}

fn short(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => crate::interp::fmt_num(n),
        other => other.to_string(),
    };
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(39).collect::<String>())
    } else {
        s
    }
}

/// Human reasons for the differences between two key inputs.
pub fn diff_inputs(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let field = |v: &Value, k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    if field(old, "kind") != field(new, "kind") {
        out.push(format!(
            "kind {} -> {}",
            short(&field(old, "kind")),
            short(&field(new, "kind"))
        ));
    } else if field(old, "kind_version") != field(new, "kind_version") {
        out.push(format!(
            "kind version {} -> {}",
            field(old, "kind_version"),
            field(new, "kind_version")
        ));
    }
    let (od, nd) = (field(old, "deps"), field(new, "deps"));
    let empty = Map::new();
    let (od, nd) = (
        od.as_object().unwrap_or(&empty),
        nd.as_object().unwrap_or(&empty),
    );
    for (name, n) in nd {
        let path = n.get("path").and_then(Value::as_str).unwrap_or(name);
        match od.get(name) {
            None => out.push(format!("input added: {path}")),
            Some(o) if o.get("path") != n.get("path") => out.push(format!(
                "input {name} moved: {} -> {path}",
                o.get("path").and_then(Value::as_str).unwrap_or("?")
            )),
            Some(o) if o.get("digest") != n.get("digest") => {
                out.push(format!("input changed: {path}"))
            }
            _ => {}
        }
    }
    for (name, o) in od {
        if !nd.contains_key(name) {
            out.push(format!(
                "input removed: {}",
                o.get("path").and_then(Value::as_str).unwrap_or(name)
            ));
        }
    }
    diff_values("", &field(old, "config"), &field(new, "config"), &mut out);
    diff_values(
        "params",
        &field(old, "params"),
        &field(new, "params"),
        &mut out,
    );
    diff_values("outs", &field(old, "outs"), &field(new, "outs"), &mut out);
    out
}

fn diff_values(prefix: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (k, nv) in n {
                match o.get(k) {
                    Some(ov) => diff_values(&join(k), ov, nv, out),
                    None => out.push(format!("{} added ({})", join(k), short(nv))),
                }
            }
            for k in o.keys() {
                if !n.contains_key(k) {
                    out.push(format!("{} removed", join(k)));
                }
            }
        }
        (o, n) if o != n => {
            let long = |v: &Value| v.as_str().is_some_and(|s| s.chars().count() > 40);
            if long(o) || long(n) {
                out.push(format!("{prefix} changed"));
            } else {
                out.push(format!("{prefix} {} -> {}", short(o), short(n)));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sorts_keys() {
        let a = json!({"b": 1, "a": {"d": [1, 2], "c": "x"}});
        assert_eq!(
            String::from_utf8(canonical_json(&a)).unwrap(),
            r#"{"a":{"c":"x","d":[1,2]},"b":1}"#
        );
    }

    #[test]
    fn diffs_read_well() {
        let old = json!({"kind": "command", "kind_version": 1, "config": {"cmd": "a"}, "params": {"lr": 1e-5},
            "deps": {"raw": {"path": "data/raw.jsonl", "digest": "aa"}}, "outs": {}});
        let new = json!({"kind": "command", "kind_version": 2, "config": {"cmd": "a"}, "params": {"lr": 5e-6},
            "deps": {"raw": {"path": "data/raw.jsonl", "digest": "bb"}}, "outs": {}});
        assert_eq!(
            diff_inputs(&old, &new),
            vec![
                "kind version 1 -> 2",
                "input changed: data/raw.jsonl",
                "params.lr 1e-5 -> 5e-6"
            ]
        );
    }
}
