//! LoRA adapters on the decoder's projections, read and written in PEFT's
//! format (`adapter_config.json` + `adapter_model.safetensors`), and merged
//! into the base weights for a plain HF checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde_json::{Value, json};

use super::backend::ModelBackend;
use super::config::{Arch, peft_module};
use super::decoder::{CausalLm, Linear, LoraAdapter, column_norms, dora_scale, host};
use super::weights::{self, HostTensor, SaveDtype};
use crate::rng::SplitMix64;

/// The seven projections of a decoder layer, as PEFT and LLaMA-Factory name them.
pub const ALL_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The four projections of a layer with fused ones (Phi-3).
pub const FUSED_TARGETS: &[&str] = &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// Projections only some models have: Qwen2-MoE's shared expert gate.
pub const OTHER_TARGETS: &[&str] = &["shared_expert_gate"];

/// Which projections get adapters, and their size.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scale numerator: the update is `alpha / r * x A B`.
    pub alpha: f64,
    /// Dropout on the adapter input while training.
    pub dropout: f64,
    /// Module names (`q_proj`, ...); `all` is every name of [`ALL_TARGETS`]
    /// and [`FUSED_TARGETS`] until [`Self::fit_to`] keeps the model's.
    pub targets: Vec<String>,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// DoRA: each adapted weight is a trained magnitude per output column
    /// times the direction of `W + scaling * A B`.
    pub use_dora: bool,
    /// The base is a multimodal Gemma 3 checkpoint: the adapter's modules sit
    /// under `model.language_model.`, and `target_modules` is a regex that
    /// leaves the vision tower's projections of the same names alone.
    pub multimodal: bool,
}

/// The start of the `target_modules` regex of a multimodal base's adapter;
/// the names follow as `(q_proj|v_proj)`.
const LANGUAGE_MODEL_ONLY: &str = r"model\.language_model\..*\.";

impl LoraConfig {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Expands `all` and checks the names.
    pub fn resolve_targets(names: &[String]) -> anyhow::Result<Vec<String>> {
        let known = || ALL_TARGETS.iter().chain(FUSED_TARGETS).chain(OTHER_TARGETS);
        let mut out = Vec::new();
        for n in names {
            if n == "all" || n == "all-linear" {
                out.extend(known().map(|s| s.to_string()));
            } else if known().any(|k| k == n) {
                out.push(n.clone());
            } else {
                bail!(
                    "lora_target '{n}' is not a projection of the decoder; use 'all' or some of: \
                     {} (Phi-3: {}; Qwen2-MoE also: {})",
                    ALL_TARGETS.join(", "),
                    FUSED_TARGETS.join(", "),
                    OTHER_TARGETS.join(", ")
                );
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Keeps the targets among `have`, the projections of an `arch` model
    /// ([`CausalLm::projection_names`](super::decoder::CausalLm::projection_names)):
    /// all of them when every one is targeted (`all`); a name the model
    /// lacks (say `q_proj` on Phi-3, whose queries come from `qkv_proj`) is
    /// an error. A mixture of experts' routers and routed experts are not
    /// projections: like LLaMA-Factory's `all` under transformers 5 (whose
    /// experts and routers are not `nn.Linear` modules), a mixture whose
    /// every MLP is sparse has only the attention's, and Qwen2-MoE's shared
    /// expert and its gate.
    pub fn fit_to(mut self, arch: Arch, have: &[&str]) -> anyhow::Result<Self> {
        let targeted = |h: &&str| self.targets.iter().any(|t| t == h);
        if have.iter().all(targeted) {
            self.targets = have.iter().map(|s| s.to_string()).collect();
            self.targets.sort();
            return Ok(self);
        }
        if let Some(t) = self.targets.iter().find(|t| !have.contains(&t.as_str())) {
            let experts = match arch.moe() {
                false => "",
                true => {
                    "; its MLPs are mixtures of experts, whose routers and routed experts take no \
                     adapters"
                }
            };
            bail!(
                "lora_target '{t}' is not a projection of this {} model; its projections are \
                 {} (or use 'all'){experts}",
                arch.model_type(),
                have.join(", ")
            );
        }
        Ok(self)
    }

    /// The PEFT `adapter_config.json`.
    pub fn peft_json(&self, base_model: Option<&str>) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            // PEFT writes an integer alpha as an integer.
            "lora_alpha": if self.alpha.fract() == 0.0 { json!(self.alpha as i64) } else { json!(self.alpha) },
            "lora_dropout": self.dropout,
            "target_modules": match self.multimodal {
                true => json!(format!("{LANGUAGE_MODEL_ONLY}({})", self.targets.join("|"))),
                false => json!(self.targets),
            },
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }

    /// Reads `dir/adapter_config.json`.
    pub fn from_peft_dir(dir: &Path) -> anyhow::Result<LoraConfig> {
        let (file, v) = read_adapter_config(dir)?;
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        if let Some(t) = get("peft_type").and_then(Value::as_str)
            && t != "LORA"
        {
            bail!(
                "{}: peft_type '{t}' is not supported (only LORA)",
                file.display()
            );
        }
        if get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
            bail!(
                "{}: 'fan_in_fan_out: true' is not supported",
                file.display()
            );
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if get(k)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                bail!("{}: '{k}' is not supported", file.display());
            }
        }
        let r = get("r")
            .and_then(Value::as_u64)
            .with_context(|| format!("{}: missing integer 'r'", file.display()))?
            as usize;
        let alpha = get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        let targets: Vec<String> = match get("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(Value::String(s)) => match s
                .strip_prefix(LANGUAGE_MODEL_ONLY)
                .and_then(|r| r.strip_prefix('('))
                .and_then(|r| r.strip_suffix(')'))
            {
                Some(names) => names.split('|').map(str::to_owned).collect(),
                None => vec![s.clone()],
            },
            _ => bail!("{}: missing 'target_modules'", file.display()),
        };
        Ok(LoraConfig {
            r,
            alpha,
            dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            targets: Self::resolve_targets(&targets)
                .with_context(|| format!("{}: target_modules", file.display()))?,
            use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            use_dora: get("use_dora").and_then(Value::as_bool).unwrap_or(false),
            // Set by `load_adapter` from the tensors' names.
            multimodal: false,
        })
    }
}

/// The projections of `net` with their HF module names and short names
/// (`model.layers.0.self_attn.q_proj`, `q_proj`).
fn projections<B: Backend>(net: &mut CausalLm<B>) -> Vec<(String, &'static str, &mut Linear<B>)> {
    let mut out = Vec::new();
    for (i, layer) in net.layers.iter_mut().enumerate() {
        for (name, lin) in layer.projections_mut() {
            let short = name.rsplit_once('.').map_or(name, |(_, short)| short);
            out.push((format!("model.layers.{i}.{name}"), short, lin));
        }
    }
    out
}

/// Freezes every weight of `net` (no gradients), e.g. before attaching adapters.
pub fn freeze<B: Backend>(net: CausalLm<B>) -> CausalLm<B> {
    freeze_unless(net, &|_| false)
}

/// The Hugging Face name of the parameter at module path `path` (e.g.
/// `layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj.weight`).
pub fn hf_param_name(path: &str) -> String {
    match path {
        "embed_tokens" => "model.embed_tokens.weight".into(),
        p if p.starts_with("lm_head") => p.into(),
        p => format!("model.{p}"),
    }
}

struct FreezeUnless<'a> {
    trains: &'a dyn Fn(&str) -> bool,
    path: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for FreezeUnless<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let trains = (self.trains)(&hf_param_name(&self.path.join(".")));
        param.set_require_grad(trains)
    }
}

/// Freezes every weight of `net` whose Hugging Face name `trains` rejects
/// and lets the others train.
pub fn freeze_unless<B: Backend>(net: CausalLm<B>, trains: &dyn Fn(&str) -> bool) -> CausalLm<B> {
    net.map(&mut FreezeUnless {
        trains,
        path: Vec::new(),
    })
}

fn param1<B: Backend>(t: HostTensor, device: &B::Device) -> Param<Tensor<B, 1>> {
    let n = t.data.len();
    Param::from_tensor(Tensor::from_data(TensorData::new(t.data, [n]), device))
}

fn param2<B: Backend>(t: HostTensor, device: &B::Device) -> Param<Tensor<B, 2>> {
    Param::from_tensor(Tensor::from_data(
        TensorData::new(t.data, [t.shape[0], t.shape[1]]),
        device,
    ))
}

/// Freezes the base and attaches fresh adapters as PEFT initialises them:
/// `A` kaiming-uniform (bound `1/sqrt(in)`), `B` zero, so the model is
/// unchanged; with DoRA the magnitudes are the base weight's column norms.
pub fn attach<B: ModelBackend>(net: CausalLm<B>, cfg: &LoraConfig, seed: u64) -> CausalLm<B> {
    let mut net = freeze(net);
    let device = net.embed_tokens.device();
    let mut rng = SplitMix64(seed);
    for (_, kind, lin) in projections(&mut net) {
        if !cfg.targets.iter().any(|t| t == kind) {
            continue;
        }
        let [inp, out] = lin.weight.val().dims();
        let bound = 1.0 / (inp as f64).sqrt();
        let a = HostTensor {
            shape: vec![inp, cfg.r],
            data: (0..inp * cfg.r)
                .map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32)
                .collect(),
        };
        let b = HostTensor {
            shape: vec![cfg.r, out],
            data: vec![0.0; cfg.r * out],
        };
        let mut adapter = LoraAdapter {
            lora_a: param2(a, &device),
            lora_b: param2(b, &device),
            scaling: cfg.scaling(),
            dropout: cfg.dropout,
            magnitude: None,
        };
        if cfg.use_dora {
            let w = adapter.adapted(lin.weight.val());
            adapter.magnitude = Some(Param::from_tensor(column_norms(w)));
        }
        lin.lora = Some(adapter);
    }
    net
}

/// `dir/adapter_config.json`: its path and parsed contents.
fn read_adapter_config(dir: &Path) -> anyhow::Result<(std::path::PathBuf, Value)> {
    let file = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let v = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", file.display()))?;
    Ok((file, v))
}

/// The base model a PEFT adapter directory names (`base_model_name_or_path`
/// in its `adapter_config.json`), if it names one.
pub fn adapter_base(dir: &Path) -> anyhow::Result<Option<std::path::PathBuf>> {
    let (_, v) = read_adapter_config(dir)?;
    Ok(v["base_model_name_or_path"]
        .as_str()
        .map(std::path::PathBuf::from))
}

/// Freezes the base and attaches the PEFT adapter in `dir`; every adapter
/// tensor must be used.
pub fn load_adapter<B: Backend>(
    net: CausalLm<B>,
    dir: &Path,
) -> anyhow::Result<(CausalLm<B>, LoraConfig)> {
    let mut cfg = LoraConfig::from_peft_dir(dir)?;
    let file = dir.join("adapter_model.safetensors");
    let mut tensors = BTreeMap::new();
    weights::load_file_into(&file, &mut tensors)?;
    cfg.multimodal = tensors
        .keys()
        .any(|k| k.starts_with("base_model.model.model.language_model."));
    let mut net = freeze(net);
    let device = net.embed_tokens.device();
    for (name, kind, lin) in projections(&mut net) {
        if !cfg.targets.iter().any(|t| t == kind) {
            continue;
        }
        let [inp, out] = lin.weight.val().dims();
        let mut take = |suffix: &str, shape: &[usize]| -> anyhow::Result<HostTensor> {
            let key = format!(
                "base_model.model.{}.{suffix}",
                peft_module(&name, cfg.multimodal)
            );
            let t = tensors
                .remove(&key)
                .with_context(|| format!("{}: no tensor '{key}'", file.display()))?;
            if t.shape != shape {
                bail!(
                    "{}: tensor '{key}' has shape {:?}, expected {shape:?}",
                    file.display(),
                    t.shape
                );
            }
            // PEFT's factors are `[out, in]`-like (torch's linear layout).
            Ok(if shape.len() == 2 { t.transposed() } else { t })
        };
        let a = take("lora_A.weight", &[cfg.r, inp])?;
        let b = take("lora_B.weight", &[out, cfg.r])?;
        let magnitude = if cfg.use_dora {
            Some(param1(take("lora_magnitude_vector", &[out])?, &device))
        } else {
            None
        };
        lin.lora = Some(LoraAdapter {
            lora_a: param2(a, &device),
            lora_b: param2(b, &device),
            scaling: cfg.scaling(),
            dropout: cfg.dropout,
            magnitude,
        });
    }
    if let Some(k) = tensors.keys().next() {
        bail!(
            "{}: unexpected tensor '{k}' (not a LoRA factor of the targeted modules)",
            file.display()
        );
    }
    Ok((net, cfg))
}

/// The adapter tensors under PEFT's names (for a `multimodal` base, see
/// [`LoraConfig::multimodal`]), in PEFT's layout.
pub fn adapter_tensors<B: Backend>(
    net: &CausalLm<B>,
    multimodal: bool,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    let mut net = net.clone();
    for (name, _, lin) in projections(&mut net) {
        let name = peft_module(&name, multimodal);
        if let Some(l) = &lin.lora {
            out.insert(
                format!("base_model.model.{name}.lora_A.weight"),
                host(l.lora_a.val().into_data(), true),
            );
            out.insert(
                format!("base_model.model.{name}.lora_B.weight"),
                host(l.lora_b.val().into_data(), true),
            );
            if let Some(m) = &l.magnitude {
                out.insert(
                    format!("base_model.model.{name}.lora_magnitude_vector"),
                    host(m.val().into_data(), false),
                );
            }
        }
    }
    out
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` to `dir`.
pub fn save_adapter<B: Backend>(
    net: &CausalLm<B>,
    cfg: &LoraConfig,
    base_model: Option<&str>,
    dir: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors = adapter_tensors(net, cfg.multimodal);
    weights::save_dir(dir, &tensors, SaveDtype::F32, u64::MAX)?;
    std::fs::rename(
        dir.join("model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .with_context(|| format!("cannot write {}/adapter_model.safetensors", dir.display()))?;
    let cfg_file = dir.join("adapter_config.json");
    std::fs::write(
        &cfg_file,
        serde_json::to_string_pretty(&cfg.peft_json(base_model))? + "\n",
    )
    .with_context(|| format!("cannot write {}", cfg_file.display()))?;
    Ok(())
}

/// Folds every adapter into its base weight (`W += scaling * A B`; with
/// DoRA, each column of that sum scaled to its magnitude) and removes it.
pub fn merge<B: ModelBackend>(mut net: CausalLm<B>) -> CausalLm<B> {
    for (_, _, lin) in projections(&mut net) {
        if let Some(l) = lin.lora.take() {
            let mut w = l.adapted(lin.weight.val());
            if let Some(m) = &l.magnitude {
                let scale = dora_scale(m.val().detach(), w.clone());
                w = w * scale.unsqueeze();
            }
            lin.weight = Param::from_tensor(w);
        }
    }
    net
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(targets: &[&str]) -> LoraConfig {
        let names: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
        LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: LoraConfig::resolve_targets(&names).unwrap(),
            use_rslora: false,
            use_dora: false,
            multimodal: false,
        }
    }

    #[test]
    fn targets_fit_the_models_projections() {
        let (dense, attention) = (ALL_TARGETS, &ALL_TARGETS[..4]);
        let all = |arch, have| config(&["all"]).fit_to(arch, have).unwrap().targets;
        assert_eq!(
            all(Arch::Llama, dense),
            [
                "down_proj",
                "gate_proj",
                "k_proj",
                "o_proj",
                "q_proj",
                "up_proj",
                "v_proj"
            ]
        );
        assert_eq!(
            all(Arch::Phi3, FUSED_TARGETS),
            ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
        );
        let some = config(&["qkv_proj", "o_proj"])
            .fit_to(Arch::Phi3, FUSED_TARGETS)
            .unwrap();
        assert_eq!(some.targets, ["o_proj", "qkv_proj"]);
        let e = config(&["q_proj", "v_proj"])
            .fit_to(Arch::Phi3, FUSED_TARGETS)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "lora_target 'q_proj' is not a projection of this phi3 model; \
                        its projections are qkv_proj, o_proj, gate_up_proj, down_proj"
            ),
            "{e}"
        );
        let e = config(&["gate_up_proj"])
            .fit_to(Arch::Qwen2, dense)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'gate_up_proj' is not a projection of this qwen2"),
            "{e}"
        );
        assert_eq!(
            all(Arch::Mixtral, attention),
            ["k_proj", "o_proj", "q_proj", "v_proj"]
        );
        assert_eq!(all(Arch::Qwen3Moe, dense).len(), 7);
        let shared: Vec<&str> = dense.iter().chain(OTHER_TARGETS).copied().collect();
        assert_eq!(all(Arch::Qwen2Moe, &shared).len(), 8);
        let e = config(&["shared_expert_gate"])
            .fit_to(Arch::Llama, dense)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'shared_expert_gate' is not a projection of this llama"),
            "{e}"
        );
        let e = config(&["q_proj", "gate_proj"])
            .fit_to(Arch::Olmoe, attention)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "'gate_proj' is not a projection of this olmoe model; its projections are \
                 q_proj, k_proj, v_proj, o_proj (or use 'all'); its MLPs are mixtures of experts"
            ),
            "{e}"
        );
        let e = LoraConfig::resolve_targets(&["lm_head".into()]).unwrap_err();
        assert!(e.to_string().contains("(Phi-3: qkv_proj"), "{e}");
    }
}
