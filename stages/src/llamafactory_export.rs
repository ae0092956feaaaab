//! Kind `llamafactory_export`: ShareGPT conversations -> a LLaMA-Factory
//! dataset directory (`<dataset_name>.json` + `dataset_info.json`, read by
//! LLaMA-Factory as is), and optionally a LLaMA-Factory training YAML with
//! the train stage's hyperparameters, for users who train there.
//!
//! Every conversation is checked against LLaMA-Factory's ShareGPT rule
//! (user or observation at even positions, assistant or function call at odd
//! ones, an even count, no empty value) so the export never fails there.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::conversation_transform::{conv_of, read_records, record_of, steps};
use crate::model::lora::{LoraConfig, is_expert_target};
use crate::params::{self, OnError};
use crate::{ConfigError, KeySpec, Stage, StageContext};

/// The `llamafactory_export` kind.
pub struct LlamaFactoryExport;

/// Params of `llamafactory_export`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The dataset's name in `dataset_info.json` (and its file name).
    #[serde(default = "default_name")]
    pub dataset_name: String,
    /// Train-stage params (LLaMA-Factory names) plus `model_name_or_path`
    /// and `template`: writes the output `train_yaml`.
    #[serde(default)]
    pub training: Option<Map<String, Value>>,
    /// `fail` (default) or `skip` on a record LLaMA-Factory would reject.
    #[serde(default)]
    pub on_error: OnError,
}

fn default_name() -> String {
    "anneal_sft".into()
}

impl params::Validate for Params {
    fn validate(&self) -> Result<(), ConfigError> {
        let ok = !self.dataset_name.is_empty()
            && self
                .dataset_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            return Err(ConfigError {
                key: "params.dataset_name".into(),
                message: format!(
                    "dataset_name '{}' must be letters, digits, '-', '_' or '.' (it names a file)",
                    self.dataset_name
                ),
            });
        }
        if let Some(t) = &self.training {
            for k in ["model_name_or_path", "template"] {
                if !t.get(k).is_some_and(Value::is_string) {
                    return Err(ConfigError {
                        key: format!("params.training.{k}"),
                        message: format!(
                            "LLaMA-Factory needs `{k}` (e.g. model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct, template: qwen)"
                        ),
                    });
                }
            }
            let targets = t.get("lora_target").map(params::name_list);
            let experts = targets.into_iter().flatten().flatten().find(|n| {
                LoraConfig::resolve_targets(std::slice::from_ref(n))
                    .is_ok_and(|t| t.iter().any(|t| is_expert_target(t)))
            });
            if let Some(n) = experts {
                return Err(ConfigError {
                    key: "params.training.lora_target".into(),
                    message: format!(
                        "LLaMA-Factory's lora_target takes module names only, so it cannot adapt \
                         the routed experts ('{n}'): drop it from the exported training"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Train-stage params that LLaMA-Factory takes under the same name.
const LF_KEYS: &[&str] = &[
    "model_name_or_path",
    "template",
    "finetuning_type",
    "freeze_trainable_layers",
    "freeze_trainable_modules",
    "freeze_extra_modules",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "use_rslora",
    "use_dora",
    "loraplus_lr_ratio",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "seed",
    "bf16",
    "cutoff_len",
    "save_steps",
    "save_strategy",
    "optim",
    "max_samples",
    "save_total_limit",
    "eval_steps",
    "train_on_prompt",
    "mask_history",
    "neftune_noise_alpha",
    "output_dir",
];

/// Keys that only mean something with an evaluation set: exported with a
/// `val` input (`eval_strategy` is set from anneal's rule then).
const EVAL_KEYS: &[&str] = &["load_best_model_at_end", "metric_for_best_model"];

const INPUTS: &[KeySpec] = &[
    KeySpec {
        name: "data",
        required: true,
        doc: "ShareGPT conversations (.json array, .jsonl or .parquet)",
    },
    KeySpec {
        name: "val",
        required: false,
        doc: "validation conversations, exported as `<dataset_name>_val` and named as the training config's `eval_dataset`",
    },
];
const OUTPUTS: &[KeySpec] = &[
    KeySpec {
        name: "dataset_dir",
        required: true,
        doc: "directory for LLaMA-Factory's `dataset_dir`: the data and dataset_info.json",
    },
    KeySpec {
        name: "train_yaml",
        required: false,
        doc: "a LLaMA-Factory training config (needs `training:`)",
    },
];

impl Stage for LlamaFactoryExport {
    fn kind(&self) -> &'static str {
        "llamafactory_export"
    }

    fn version(&self) -> u32 {
        1
    }

    fn inputs(&self) -> &'static [KeySpec] {
        INPUTS
    }

    fn outputs(&self) -> &'static [KeySpec] {
        OUTPUTS
    }

    fn check(&self, _config: &BTreeMap<String, Value>, params: &Value) -> Vec<ConfigError> {
        params::check::<Params>(params)
    }

    fn run(&self, ctx: &StageContext) -> anyhow::Result<()> {
        let p: Params = params::for_run(&ctx.params)?;
        let data = ctx.input("data")?;
        let dir = ctx
            .output("dataset_dir")
            .context("output 'dataset_dir' is not declared")?;
        let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
        let out = convert(&data, p.on_error, &mut skipped)?;
        if out.is_empty() {
            bail!("no conversation to export from {}", data.display());
        }
        let val = match ctx.deps.get("val") {
            Some(_) => {
                let path = ctx.input("val")?;
                let rows = convert(&path, p.on_error, &mut skipped)?;
                if rows.is_empty() {
                    bail!("no conversation to export from {}", path.display());
                }
                Some(rows)
            }
            None => None,
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = format!("{}.json", p.dataset_name);
        crate::conversation_transform::write_records(&dir.join(&file), &ctx.scratch, &out)?;
        let val_name = format!("{}_val", p.dataset_name);
        let mut info = Map::new();
        info.insert(p.dataset_name.clone(), dataset_entry(&file));
        if let Some(rows) = &val {
            let val_file = format!("{val_name}.json");
            crate::conversation_transform::write_records(&dir.join(&val_file), &ctx.scratch, rows)?;
            info.insert(val_name.clone(), dataset_entry(&val_file));
        }
        crate::sink::write_json(&dir.join("dataset_info.json"), &Value::Object(info))?;
        let mut not_exported = Vec::new();
        if let Some(yaml_path) = ctx.output("train_yaml") {
            let Some(t) = &p.training else {
                bail!(
                    "the output `train_yaml` needs `training:` params (model_name_or_path, template and the train stage's hyperparameters)"
                );
            };
            let mut y = serde_yaml::Mapping::new();
            let mut put = |k: &str, v: Value| {
                if let Ok(v) = serde_json::from_value::<serde_yaml::Value>(v) {
                    y.insert(serde_yaml::Value::String(k.to_owned()), v);
                }
            };
            put("stage", json!("sft"));
            put("do_train", json!(true));
            put("dataset", json!(p.dataset_name));
            let rel = relative(&dir, yaml_path.parent().unwrap_or(Path::new(".")));
            put("dataset_dir", json!(rel));
            if val.is_some() {
                // anneal evaluates at the end unless told `no`, and as
                // `eval_steps` or `eval_strategy` say: LLaMA-Factory's
                // `do_eval` and HF's `eval_strategy`.
                put("eval_dataset", json!(val_name));
                let strategy = t.get("eval_strategy").and_then(Value::as_str);
                put("do_eval", json!(strategy != Some("no")));
                let strategy = match strategy {
                    Some(s) => s,
                    None if t.get("eval_steps").is_some_and(|v| !v.is_null()) => "steps",
                    None => "no",
                };
                put("eval_strategy", json!(strategy));
            }
            for (k, v) in t.iter().filter(|(_, v)| !v.is_null()) {
                if LF_KEYS.contains(&k.as_str())
                    || (val.is_some() && EVAL_KEYS.contains(&k.as_str()))
                {
                    put(k, v.clone());
                } else if let ("gradient_checkpointing", Some(on)) = (k.as_str(), v.as_bool()) {
                    // LLaMA-Factory checkpoints unless told not to.
                    put("disable_gradient_checkpointing", json!(!on));
                } else if let ("chat_template_kwargs", Some(kw)) = (k.as_str(), v.as_object())
                    && kw.keys().all(|x| x == "enable_thinking")
                {
                    // LLaMA-Factory takes Qwen3's switch as a key of its own.
                    if let Some(on) = kw.get("enable_thinking") {
                        put("enable_thinking", on.clone());
                    }
                } else if let ("packing", Some(on)) = (k.as_str(), v.as_bool()) {
                    // anneal's packing keeps attention within each sample:
                    // LLaMA-Factory's `neat_packing` (its `packing` alone lets
                    // packed samples attend to each other).
                    put("packing", json!(on));
                    put("neat_packing", json!(on));
                } else {
                    not_exported.push(k.clone());
                }
            }
            if !t.contains_key("output_dir") {
                put("output_dir", json!(format!("saves/{}", p.dataset_name)));
            }
            let text = serde_yaml::to_string(&y).context("writing the training YAML")?;
            let text = quote_yaml11_booleans(&text);
            if let Some(d) = yaml_path.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(
                &yaml_path,
                format!(
                    "# LLaMA-Factory SFT config written by anneal; run from this file's directory:\n#   llamafactory-cli train {}\n{text}",
                    yaml_path.file_name().and_then(|f| f.to_str()).unwrap_or("train.yaml")
                ),
            )
            .with_context(|| format!("writing {}", yaml_path.display()))?;
        }
        let mut report = json!({
            "conversations": out.len(),
            "file": file,
        });
        if let Some(rows) = &val {
            report["val_conversations"] = json!(rows.len());
        }
        if !skipped.is_empty() {
            report["skipped"] = json!(skipped);
        }
        if !not_exported.is_empty() {
            report["training_keys_not_exported"] = json!(not_exported);
        }
        eprintln!("llamafactory_export: {report}");
        ctx.report(&report);
        Ok(())
    }
}

/// The conversations of `path` as LLaMA-Factory ShareGPT records; a record
/// LLaMA-Factory would reject fails the stage or, with `on_error: skip`, is
/// counted in `skipped` by reason.
fn convert(
    path: &Path,
    on_error: OnError,
    skipped: &mut BTreeMap<String, u64>,
) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (where_, rec) in read_records(path)? {
        let conv = rec
            .map_err(|e| format!("{e:#}"))
            .and_then(|v| conv_of(v).map_err(|e| format!("{where_}: {e}")))
            .and_then(|c| match steps::alternation_error(&c.turns) {
                Some(why) => Err(format!(
                    "{where_}: LLaMA-Factory would reject this conversation ({why})"
                )),
                None => Ok(c),
            });
        match conv {
            Ok(c) => {
                let mut r = record_of(&c);
                // LLaMA-Factory reads `tools` as a JSON string.
                if let Some(t) = r.get_mut("tools")
                    && !t.is_string()
                {
                    *t = if t.is_null() {
                        Value::String(String::new())
                    } else {
                        Value::String(t.to_string())
                    };
                }
                out.push(r);
            }
            Err(e) if on_error == OnError::Skip => {
                tracing::warn!("{e}");
                let reason = e
                    .rsplit('(')
                    .next()
                    .unwrap_or("invalid")
                    .trim_end_matches(')');
                *skipped.entry(reason.to_owned()).or_default() += 1;
            }
            Err(e) => bail!(
                "{e}\n  help: run conversation_transform with merge_consecutive, trim_trailing_user and validate first, or set `on_error: skip`"
            ),
        }
    }
    Ok(out)
}

/// The `dataset_info.json` entry of a ShareGPT file.
fn dataset_entry(file: &str) -> Value {
    json!({
        "file_name": file,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
        "tags": {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
            "observation_tag": "observation",
            "function_tag": "function_call",
            "system_tag": "system"
        }
    })
}

/// Quotes the plain scalars that YAML 1.1 reads as booleans (`no`, `on`,
/// ...): serde_yaml writes YAML 1.2, where they are strings, but
/// LLaMA-Factory reads its config with PyYAML (YAML 1.1), which would turn
/// `eval_strategy: no` into `False`. serde_yaml writes real booleans as
/// `true` / `false`, so every such scalar in its output is a string.
fn quote_yaml11_booleans(text: &str) -> String {
    const WORDS: &[&str] = &[
        "yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF",
    ];
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let split = line.rfind(": ").map(|i| i + 2).or_else(|| {
            line.trim_start()
                .starts_with("- ")
                .then(|| line.find("- ").unwrap() + 2)
        });
        match split {
            Some(i) if WORDS.contains(&&line[i..]) => {
                out.push_str(&line[..i]);
                out.push('\'');
                out.push_str(&line[i..]);
                out.push('\'');
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// `to` relative to the directory `from` (both as declared, or both absolute).
fn relative(to: &Path, from: &Path) -> String {
    let a: Vec<Component> = to.components().collect();
    let b: Vec<Component> = from.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec!["..".into(); b.len() - common];
    parts.extend(
        a[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml11_booleans_are_quoted() {
        let y = serde_yaml::to_string(&json!({"eval_strategy": "no", "save": "steps",
            "flag": false, "kw": {"mode": "off"}, "list": ["on", "x"], "lr": 1e-5}))
        .unwrap();
        let q = quote_yaml11_booleans(&y);
        for line in [
            "eval_strategy: 'no'",
            "save: steps",
            "flag: false",
            "  mode: 'off'",
            "- 'on'",
            "- x",
            "lr: 0.00001",
        ] {
            assert!(q.lines().any(|l| l == line), "{line} in\n{q}");
        }
        let back: Value = serde_yaml::from_str(&q).unwrap();
        assert_eq!(back["eval_strategy"], "no");
        assert_eq!(back["list"][0], "on");
    }

    #[test]
    fn relative_paths() {
        assert_eq!(relative(Path::new("/w/a/lf"), Path::new("/w/a")), "lf");
        assert_eq!(relative(Path::new("/w/a/lf"), Path::new("/w/b")), "../a/lf");
        assert_eq!(relative(Path::new("/w/a"), Path::new("/w/a")), ".");
    }

    #[test]
    fn training_needs_model_and_template() {
        let e = params::check::<Params>(&json!({"training": {"template": "qwen"}}));
        assert_eq!(e[0].key, "params.training.model_name_or_path");
        let e = params::check::<Params>(&json!({"dataset_name": "a b"}));
        assert_eq!(e[0].key, "params.dataset_name");
        assert!(params::check::<Params>(&json!({})).is_empty());
        let training = |target: &str| json!({"training": {"model_name_or_path": "m", "template": "qwen", "lora_target": target}});
        let e = params::check::<Params>(&training("q_proj, experts"));
        assert_eq!(e[0].key, "params.training.lora_target");
        assert!(e[0].message.contains("'experts'"), "{}", e[0].message);
        assert!(params::check::<Params>(&training("all")).is_empty());
    }
}
