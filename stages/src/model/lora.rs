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
use super::decoder::{CausalLm, Expert, Linear, LoraAdapter, column_norms, dora_scale, host};
use super::loss::to_f32;
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

/// A mixture's routed experts, adapted as PEFT adapts transformers 5's
/// fused expert parameters (`target_parameters`): our target names, and
/// PEFT's. `lora_target: experts` names both; `all` names neither (as
/// LLaMA-Factory's `all`, the `nn.Linear` modules only).
pub const EXPERT_TARGETS: &[(&str, &str)] = &[
    ("experts.gate_up_proj", "mlp.experts.gate_up_proj"),
    ("experts.down_proj", "mlp.experts.down_proj"),
];

/// Whether `target` adapts the routed experts (see [`EXPERT_TARGETS`]).
pub fn is_expert_target(target: &str) -> bool {
    EXPERT_TARGETS.iter().any(|(t, _)| *t == target)
}

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
    /// and [`FUSED_TARGETS`] until [`Self::fit_to`] keeps the model's; and
    /// the routed experts' [`EXPERT_TARGETS`].
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

    /// Expands `all` and `experts` and checks the names.
    pub fn resolve_targets(names: &[String]) -> anyhow::Result<Vec<String>> {
        let known = || ALL_TARGETS.iter().chain(FUSED_TARGETS).chain(OTHER_TARGETS);
        let mut out = Vec::new();
        for n in names {
            // PEFT's parameter names, or a Mixtral checkpoint's block name.
            let expert = n
                .strip_prefix("mlp.")
                .or_else(|| n.strip_prefix("block_sparse_moe."))
                .unwrap_or(n);
            if n == "all" || n == "all-linear" {
                out.extend(known().map(|s| s.to_string()));
            } else if n == "experts" {
                out.extend(EXPERT_TARGETS.iter().map(|(t, _)| t.to_string()));
            } else if is_expert_target(expert) {
                out.push(expert.to_owned());
            } else if known().any(|k| k == n) {
                out.push(n.clone());
            } else {
                bail!(
                    "lora_target '{n}' is not a projection of the decoder; use 'all' or some of: \
                     {} (Phi-3: {}; Qwen2-MoE also: {}); and, on a mixture of experts, 'experts' \
                     (the routed experts: experts.gate_up_proj, experts.down_proj)",
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
    /// expert and its gate. The routed experts take adapters when named
    /// (`experts`, [`EXPERT_TARGETS`]), without dropout or DoRA, which
    /// PEFT's adapters on parameters lack.
    pub fn fit_to(mut self, arch: Arch, have: &[&str]) -> anyhow::Result<Self> {
        let (experts, modules): (Vec<String>, Vec<String>) = std::mem::take(&mut self.targets)
            .into_iter()
            .partition(|t| is_expert_target(t));
        if let Some(t) = experts.first() {
            if !arch.moe() {
                bail!(
                    "lora_target '{t}' adapts the routed experts of a mixture of experts; this {} \
                     model has none",
                    arch.model_type()
                );
            }
            if self.dropout > 0.0 {
                bail!(
                    "lora_dropout must be 0 with adapters on the routed experts (lora_target \
                     '{t}'): PEFT adapts them as parameters, which has no dropout"
                );
            }
            if self.use_dora {
                bail!(
                    "use_dora does not work with adapters on the routed experts (lora_target \
                     '{t}'): PEFT adapts them as parameters, without DoRA"
                );
            }
        }
        let targeted = |h: &&str| modules.iter().any(|t| t == h);
        self.targets = if have.iter().all(targeted) {
            have.iter().map(|s| s.to_string()).collect()
        } else if let Some(t) = modules.iter().find(|t| !have.contains(&t.as_str())) {
            let experts = match arch.moe() {
                false => "",
                true => {
                    "; its MLPs are mixtures of experts, whose routers take no adapters and whose \
                     routed experts take them as 'experts'"
                }
            };
            bail!(
                "lora_target '{t}' is not a projection of this {} model; its projections are \
                 {} (or use 'all'){experts}",
                arch.model_type(),
                have.join(", ")
            );
        } else {
            modules
        };
        self.targets.extend(experts);
        self.targets.sort();
        Ok(self)
    }

    /// What PEFT will misread in this adapter on an `arch` model, if anything:
    /// loading a Qwen3-MoE adapter for transformers 5, PEFT (0.21 seen)
    /// reads `gate_proj`, `up_proj` and `down_proj` in `target_modules` as
    /// the routed experts' fused parameters, so the MLP adapters of the dense
    /// layers (`mlp_only_layers`, `decoder_sparse_step`) are not loaded there.
    pub fn peft_caveat(&self, arch: Arch) -> Option<String> {
        let mlp = ["gate_proj", "up_proj", "down_proj"];
        let dense: Vec<&str> = self
            .module_targets()
            .into_iter()
            .filter(|t| mlp.contains(t))
            .collect();
        (arch == Arch::Qwen3Moe && !dense.is_empty()).then(|| {
            format!(
                "this qwen3_moe model has dense MLP layers whose {} take LoRA adapters; PEFT \
                 reads these names on a qwen3_moe model as its routed experts, so PEFT will not \
                 load those adapters (anneal does): leave them out of lora_target for an adapter \
                 PEFT should load, or merge it (merge_lora: true)",
                dense.join(", ")
            )
        })
    }

    /// The module targets (PEFT's `target_modules`), without the experts'.
    fn module_targets(&self) -> Vec<&str> {
        let names = self.targets.iter().map(String::as_str);
        names.filter(|t| !is_expert_target(t)).collect()
    }

    /// Whether the routed experts' `target` ([`EXPERT_TARGETS`]) is adapted.
    fn adapts(&self, target: &str) -> bool {
        self.targets.iter().any(|t| t == target)
    }

    /// The PEFT `adapter_config.json`.
    pub fn peft_json(&self, base_model: Option<&str>) -> Value {
        let params: Vec<&str> = EXPERT_TARGETS
            .iter()
            .filter(|(t, _)| self.adapts(t))
            .map(|(_, peft)| *peft)
            .collect();
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            // PEFT writes an integer alpha as an integer.
            "lora_alpha": if self.alpha.fract() == 0.0 { json!(self.alpha as i64) } else { json!(self.alpha) },
            "lora_dropout": self.dropout,
            "target_modules": match (self.multimodal, self.module_targets()) {
                (_, modules) if modules.is_empty() => Value::Null,
                (true, modules) => json!(format!("{LANGUAGE_MODEL_ONLY}({})", modules.join("|"))),
                (false, modules) => json!(modules),
            },
            "target_parameters": match params.is_empty() {
                true => Value::Null,
                false => json!(params),
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
        let mut targets: Vec<String> = match get("target_modules") {
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
            _ if get("target_parameters").is_some() => Vec::new(),
            _ => bail!("{}: missing 'target_modules'", file.display()),
        };
        // The routed experts' fused parameters, by PEFT's names (the full
        // path, or its end).
        for p in get("target_parameters")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = p.as_str().unwrap_or_default();
            let ours = EXPERT_TARGETS.iter().find(|(ours, _)| {
                let param = ours.rsplit('.').next().unwrap_or(ours);
                name == *ours || name == param || name.ends_with(&format!(".{ours}"))
            });
            match ours {
                Some((ours, _)) => targets.push(ours.to_string()),
                None => bail!(
                    "{}: target_parameters entry {p} is not supported (only a mixture's routed \
                     experts: {})",
                    file.display(),
                    EXPERT_TARGETS
                        .iter()
                        .map(|(_, peft)| *peft)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
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
    let mut fresh = |inp: usize, out: usize| {
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
        LoraAdapter {
            lora_a: param2(a, &device),
            lora_b: param2(b, &device),
            scaling: cfg.scaling(),
            dropout: cfg.dropout,
            magnitude: None,
        }
    };
    for (_, kind, lin) in projections(&mut net) {
        if !cfg.targets.iter().any(|t| t == kind) {
            continue;
        }
        let [inp, out] = lin.weight.val().dims();
        let mut adapter = fresh(inp, out);
        if cfg.use_dora {
            let w = adapter.adapted(lin.weight.val());
            adapter.magnitude = Some(Param::from_tensor(column_norms(w)));
        }
        lin.lora = Some(adapter);
    }
    let (gate_up, down) = (cfg.adapts(GATE_UP), cfg.adapts(DOWN));
    for (_, experts) in routed_experts(&mut net) {
        for x in experts {
            let [hidden, width] = x.gate_proj.weight.dims();
            if gate_up {
                x.gate_up_lora = Some(fresh(hidden, 2 * width));
            }
            if down {
                x.down_proj.lora = Some(fresh(width, hidden));
            }
        }
    }
    net
}

const GATE_UP: &str = EXPERT_TARGETS[0].0;
const DOWN: &str = EXPERT_TARGETS[1].0;

/// Each mixture-of-experts layer's index and routed experts.
fn routed_experts<B: Backend>(net: &mut CausalLm<B>) -> Vec<(usize, &mut Vec<Expert<B>>)> {
    let layers = net.layers.iter_mut().enumerate();
    layers
        .filter(|(_, l)| !l.mlp.experts.is_empty())
        .map(|(i, l)| (i, &mut l.mlp.experts))
        .collect()
}

/// The PEFT names of layer `i`'s expert adapters' factors, `lora_A` and
/// `lora_B`, for `target` ([`GATE_UP`] or [`DOWN`]): PEFT nests one
/// wrapper per parameter in the order of the module's parameters, so with
/// both adapted the gate/up one is inside (`experts.base_layer`).
fn expert_keys(i: usize, target: &str, both: bool) -> [String; 2] {
    let inner = target == GATE_UP && both;
    let at = format!(
        "base_model.model.model.layers.{i}.mlp.experts{}",
        if inner { ".base_layer" } else { "" }
    );
    [format!("{at}.lora_A.weight"), format!("{at}.lora_B.weight")]
}

/// PEFT's factors of all experts of one parameter from each expert's `A`
/// `[in, r]` and `B` `[r, out]`: `lora_A` `[experts * r, in]`, expert-major
/// rows, and `lora_B` `[out, r * experts]`, rank-major columns (column
/// `k * experts + e` is expert `e`'s `k`th).
pub fn stack_experts(factors: &[(HostTensor, HostTensor)]) -> (HostTensor, HostTensor) {
    let n = factors.len();
    let ([inp, r], out) = (
        [factors[0].0.shape[0], factors[0].0.shape[1]],
        factors[0].1.shape[1],
    );
    let mut a = vec![0.0; n * r * inp];
    let mut b = vec![0.0; out * r * n];
    for (e, (fa, fb)) in factors.iter().enumerate() {
        for i in 0..inp {
            for k in 0..r {
                a[(e * r + k) * inp + i] = fa.data[i * r + k];
            }
        }
        for k in 0..r {
            for o in 0..out {
                b[o * r * n + k * n + e] = fb.data[k * out + o];
            }
        }
    }
    (
        HostTensor {
            shape: vec![n * r, inp],
            data: a,
        },
        HostTensor {
            shape: vec![out, r * n],
            data: b,
        },
    )
}

/// The stacked `lora_B` `[2 · width, …]` of the fused gate/up parameter
/// with its rows reordered from gate then up (ours) to gate and up
/// interleaved (gpt-oss's `gate_up_proj`: gate rows even, up rows odd).
pub fn interleave_gate_up(b: &HostTensor) -> HostTensor {
    reorder_gate_up(b, true)
}

/// [`interleave_gate_up`] undone.
pub fn deinterleave_gate_up(b: &HostTensor) -> HostTensor {
    reorder_gate_up(b, false)
}

fn reorder_gate_up(b: &HostTensor, interleave: bool) -> HostTensor {
    let (rows, cols) = (b.shape[0], b.shape[1]);
    let width = rows / 2;
    let mut data = vec![0.0; rows * cols];
    for j in 0..width {
        for (half, ours) in [(0, j), (1, width + j)] {
            let (from, to) = match interleave {
                true => (ours, 2 * j + half),
                false => (2 * j + half, ours),
            };
            data[to * cols..(to + 1) * cols]
                .copy_from_slice(&b.data[from * cols..(from + 1) * cols]);
        }
    }
    HostTensor {
        shape: b.shape.clone(),
        data,
    }
}

/// [`stack_experts`] undone: expert `e`'s `A` `[in, r]` and `B` `[r, out]`.
fn unstack_expert(a: &HostTensor, b: &HostTensor, n: usize, e: usize) -> (HostTensor, HostTensor) {
    let (r, inp, out) = (a.shape[0] / n, a.shape[1], b.shape[0]);
    let fa = (0..inp * r)
        .map(|j| a.data[(e * r + j % r) * inp + j / r])
        .collect();
    let fb = (0..r * out)
        .map(|j| b.data[(j % out) * r * n + (j / out) * n + e])
        .collect();
    (
        HostTensor {
            shape: vec![inp, r],
            data: fa,
        },
        HostTensor {
            shape: vec![r, out],
            data: fb,
        },
    )
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
            let t = take_tensor(&mut tensors, &file, &key, shape)?;
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
    let both = cfg.adapts(GATE_UP) && cfg.adapts(DOWN);
    let interleaved = net.gate_up_interleaved;
    for (i, experts) in routed_experts(&mut net) {
        let n = experts.len();
        let [hidden, width] = experts[0].gate_proj.weight.dims();
        for (target, inp, out) in [(GATE_UP, hidden, 2 * width), (DOWN, width, hidden)] {
            if !cfg.adapts(target) {
                continue;
            }
            let [ka, kb] = expert_keys(i, target, both);
            let a = take_tensor(&mut tensors, &file, &ka, &[n * cfg.r, inp])?;
            let mut b = take_tensor(&mut tensors, &file, &kb, &[out, cfg.r * n])?;
            if interleaved && target == GATE_UP {
                b = deinterleave_gate_up(&b);
            }
            for (e, x) in experts.iter_mut().enumerate() {
                let (fa, fb) = unstack_expert(&a, &b, n, e);
                let adapter = Some(LoraAdapter {
                    lora_a: param2(fa, &device),
                    lora_b: param2(fb, &device),
                    scaling: cfg.scaling(),
                    dropout: cfg.dropout,
                    magnitude: None,
                });
                match target {
                    GATE_UP => x.gate_up_lora = adapter,
                    _ => x.down_proj.lora = adapter,
                }
            }
        }
    }
    if let Some(k) = tensors.keys().next() {
        bail!(
            "{}: unexpected tensor '{k}' (not a LoRA factor of the targeted modules)",
            file.display()
        );
    }
    Ok((net, cfg))
}

/// Removes the tensor `key` of `file` from `tensors`, which must have `shape`.
fn take_tensor(
    tensors: &mut BTreeMap<String, HostTensor>,
    file: &Path,
    key: &str,
    shape: &[usize],
) -> anyhow::Result<HostTensor> {
    let t = tensors
        .remove(key)
        .with_context(|| format!("{}: no tensor '{key}'", file.display()))?;
    if t.shape != shape {
        bail!(
            "{}: tensor '{key}' has shape {:?}, expected {shape:?}",
            file.display(),
            t.shape
        );
    }
    Ok(t)
}

/// The adapter tensors under PEFT's names (for a `multimodal` base, see
/// [`LoraConfig::multimodal`]), in PEFT's layout.
pub fn adapter_tensors<B: Backend>(
    net: &CausalLm<B>,
    multimodal: bool,
) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    let mut net = net.clone();
    let interleaved = net.gate_up_interleaved;
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
    for (i, experts) in routed_experts(&mut net) {
        let factors = |l: &LoraAdapter<B>| {
            let f = |p: &Param<Tensor<B, 2>>| host(p.val().into_data(), false);
            (f(&l.lora_a), f(&l.lora_b))
        };
        let gate_up: Vec<_> = experts
            .iter()
            .filter_map(|x| x.gate_up_lora.as_ref())
            .collect();
        let down: Vec<_> = experts
            .iter()
            .filter_map(|x| x.down_proj.lora.as_ref())
            .collect();
        let both = !gate_up.is_empty() && !down.is_empty();
        for (target, adapters) in [(GATE_UP, gate_up), (DOWN, down)] {
            if adapters.is_empty() {
                continue;
            }
            let factors: Vec<_> = adapters.into_iter().map(factors).collect();
            let (a, mut b) = stack_experts(&factors);
            if interleaved && target == GATE_UP {
                b = interleave_gate_up(&b);
            }
            let [ka, kb] = expert_keys(i, target, both);
            out.insert(ka, a);
            out.insert(kb, b);
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
    for (_, experts) in routed_experts(&mut net) {
        for x in experts {
            if let Some(l) = x.gate_up_lora.take() {
                let delta = l.delta().detach();
                let width = x.gate_proj.weight.dims()[1];
                for (lin, at) in [(&mut x.gate_proj, 0), (&mut x.up_proj, width)] {
                    let w = to_f32(lin.weight.val().detach()) + delta.clone().narrow(1, at, width);
                    lin.weight = Param::from_tensor(w);
                }
            }
            if let Some(l) = x.down_proj.lora.take() {
                x.down_proj.weight = Param::from_tensor(l.adapted(x.down_proj.weight.val()));
            }
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

    #[test]
    fn expert_targets_resolve_fit_and_round_trip_peft() {
        let both = ["experts.down_proj", "experts.gate_up_proj"];
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut got = LoraConfig::resolve_targets(&names(&["experts"])).unwrap();
        got.sort();
        assert_eq!(got, both);
        for (name, ours) in [
            ("mlp.experts.down_proj", both[0]),
            ("block_sparse_moe.experts.gate_up_proj", both[1]),
            ("experts.gate_up_proj", both[1]),
        ] {
            assert_eq!(
                LoraConfig::resolve_targets(&names(&[name])).unwrap(),
                [ours]
            );
        }
        // `all` keeps to the modules; the experts join when named.
        let attention = &ALL_TARGETS[..4];
        let fit = config(&["all", "experts"])
            .fit_to(Arch::Qwen3Moe, attention)
            .unwrap();
        assert_eq!(
            fit.targets,
            [both[0], both[1], "k_proj", "o_proj", "q_proj", "v_proj"]
        );
        let peft = fit.peft_json(None);
        assert_eq!(
            peft["target_modules"],
            json!(["k_proj", "o_proj", "q_proj", "v_proj"])
        );
        assert_eq!(
            peft["target_parameters"],
            json!(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        );
        let only = config(&["experts.down_proj"])
            .fit_to(Arch::Mixtral, attention)
            .unwrap();
        assert_eq!(only.targets, [both[0]]);
        let peft = only.peft_json(None);
        assert_eq!(
            (&peft["target_modules"], &peft["target_parameters"]),
            (&Value::Null, &json!(["mlp.experts.down_proj"]))
        );
        // PEFT's config read back, also with bare parameter names and no
        // target_modules.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("adapter_config.json");
        std::fs::write(&file, fit.peft_json(None).to_string()).unwrap();
        assert_eq!(LoraConfig::from_peft_dir(dir.path()).unwrap(), fit);
        let cfg = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_parameters": ["gate_up_proj", "down_proj"]});
        std::fs::write(&file, cfg.to_string()).unwrap();
        let mut read = LoraConfig::from_peft_dir(dir.path()).unwrap().targets;
        read.sort();
        assert_eq!(read, both);
        let cfg = json!({"peft_type": "LORA", "r": 4, "target_parameters": ["mlp.gate.weight"]});
        std::fs::write(&file, cfg.to_string()).unwrap();
        let e = LoraConfig::from_peft_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("target_parameters entry \"mlp.gate.weight\" is not supported"),
            "{e}"
        );
        // What the experts' adapters cannot be.
        let e = config(&["experts"])
            .fit_to(Arch::Llama, ALL_TARGETS)
            .unwrap_err();
        assert!(e.to_string().contains("this llama model has none"), "{e}");
        let dropout = LoraConfig {
            dropout: 0.1,
            ..config(&["experts"])
        };
        let e = dropout.fit_to(Arch::Olmoe, attention).unwrap_err();
        assert!(e.to_string().contains("lora_dropout must be 0"), "{e}");
        let dora = LoraConfig {
            use_dora: true,
            ..config(&["experts"])
        };
        let e = dora.fit_to(Arch::Olmoe, attention).unwrap_err();
        assert!(e.to_string().contains("use_dora"), "{e}");
    }

    #[test]
    fn dense_mlp_adapters_of_qwen3_moe_carry_a_peft_caveat() {
        let dense = config(&["all"])
            .fit_to(Arch::Qwen3Moe, ALL_TARGETS)
            .unwrap();
        let w = dense.peft_caveat(Arch::Qwen3Moe).unwrap();
        assert!(
            w.contains("down_proj, gate_proj, up_proj take LoRA adapters"),
            "{w}"
        );
        let sparse = config(&["all"])
            .fit_to(Arch::Qwen3Moe, &ALL_TARGETS[..4])
            .unwrap();
        assert_eq!(sparse.peft_caveat(Arch::Qwen3Moe), None);
        assert_eq!(dense.peft_caveat(Arch::Qwen2Moe), None);
    }

    /// PEFT's stacked layout: `lora_A` row `e * r + k` is expert `e`'s `k`th
    /// row of `A^T`; `lora_B` column `k * experts + e` is its `k`th column.
    #[test]
    fn expert_factors_stack_as_peft_and_back() {
        let (n, inp, r, out) = (3, 5, 2, 4);
        let factor = |e: usize, rows: usize, cols: usize, tag: f32| HostTensor {
            shape: vec![rows, cols],
            data: (0..rows * cols)
                .map(|j| tag + (e * 100 + j) as f32)
                .collect(),
        };
        let experts: Vec<_> = (0..n)
            .map(|e| (factor(e, inp, r, 0.0), factor(e, r, out, 0.5)))
            .collect();
        let (a, b) = stack_experts(&experts);
        assert_eq!(
            (a.shape.as_slice(), b.shape.as_slice()),
            ([n * r, inp].as_slice(), [out, r * n].as_slice())
        );
        // Expert 2, rank 1, input 3: A_2[3][1].
        assert_eq!(a.data[(2 * r + 1) * inp + 3], experts[2].0.data[3 * r + 1]);
        // Expert 1, rank 0, output 2: B_1[0][2].
        assert_eq!(b.data[2 * r * n + 1], experts[1].1.data[2]);
        for (e, want) in experts.iter().enumerate() {
            assert_eq!(&unstack_expert(&a, &b, n, e), want);
        }
    }
}
