//! Model architecture read from a Hugging Face `config.json` (`llama`,
//! `mistral`, `qwen2`, `qwen3`, `smollm3`, `gemma2`, `gemma3_text`, `gemma3`,
//! `olmo2`, `olmo3`, `phi3`, and the mixtures of experts `qwen2_moe`,
//! `qwen3_moe`, `mixtral`, `olmoe` and `gpt_oss`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use super::weights::HostTensor;

/// Decoder family; all share one implementation and differ only in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (Llama 2/3, SmolLM2, ...).
    Llama,
    /// `MistralForCausalLM`: Llama's layers, every one attending over a
    /// sliding window when `sliding_window` is set.
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5): q/k/v projections carry biases.
    Qwen2,
    /// `Qwen3ForCausalLM`: no biases; an RMS norm over each query and key
    /// head before RoPE (`q_norm`, `k_norm`).
    Qwen3,
    /// `Gemma2ForCausalLM` (Gemma 2): norms scale by `1 + weight`; the
    /// attention and the MLP each have a norm on their output too; GeLU
    /// (tanh) gating; embeddings scaled by `sqrt(hidden_size)`; every other
    /// layer sliding; attention scores and final logits soft-capped
    /// (`attn_logit_softcapping`, `final_logit_softcapping`).
    Gemma2,
    /// `Gemma3ForCausalLM` (Gemma 3 1B and 270M, `gemma3_text`): Qwen3's q/k
    /// norms; norms scale by `1 + weight`; the attention and the MLP each
    /// have a norm on their output too; GeLU (tanh) gating; embeddings
    /// scaled by `sqrt(hidden_size)`; sliding-window layers with their own
    /// RoPE base.
    Gemma3,
    /// `SmolLM3ForCausalLM`: Llama's layers, some without RoPE
    /// (`no_rope_layers`, by default every fourth).
    SmolLm3,
    /// `Olmo2ForCausalLM` (OLMo 2): no norms on the attention's and the
    /// MLP's inputs, one on each of their outputs instead
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`), and RMS
    /// norms over all query and all key heads together (`q_norm`, `k_norm`).
    Olmo2,
    /// `Olmo3ForCausalLM` (OLMo 3): OLMo 2's layers, three in four sliding
    /// (`layer_types`), the full ones with their own RoPE scaling (YaRN).
    Olmo3,
    /// `Phi3ForCausalLM` (Phi-3, Phi-4): Llama's layers with the q, k and v
    /// projections in one matrix (`qkv_proj`) and the MLP's gate and up
    /// projections in another (`gate_up_proj`, gate first); every layer
    /// sliding when `sliding_window` is set.
    Phi3,
    /// `Qwen2MoeForCausalLM` (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's
    /// attention (q/k/v biases under `qkv_bias`); mixtures of experts with
    /// a shared expert beside the routed ones, scaled by a sigmoid gate
    /// (`shared_expert`, `shared_expert_gate`).
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM` (Qwen3-30B-A3B, ...): Qwen3's attention; the
    /// MLPs are mixtures of experts (but those in `mlp_only_layers` or off
    /// `decoder_sparse_step`).
    Qwen3Moe,
    /// `MixtralForCausalLM`: Mistral's attention; every MLP a mixture of
    /// experts (`block_sparse_moe`, experts' `w1`/`w3`/`w2`), the top-k
    /// routing weights renormalised.
    Mixtral,
    /// `OlmoeForCausalLM` (OLMoE): Llama's layout with OLMo 2's q/k norms
    /// over all heads together; every MLP a mixture of experts.
    Olmoe,
    /// `GptOssForCausalLM` (gpt-oss): biased attention with a learned sink
    /// per head, every other layer sliding over 128 keys, YaRN; every MLP a
    /// mixture of experts with biases, a clamped SwiGLU on interleaved
    /// gate/up columns, held as stacked tensors in the checkpoint (see
    /// [`super::gpt_oss`]).
    GptOss,
}

/// The `model_type` values anneal reads, for error messages.
pub const SUPPORTED: &str = "llama, mistral, qwen2, qwen3, smollm3, gemma2, gemma3_text, olmo2, \
     olmo3, phi3, qwen2_moe, qwen3_moe, mixtral, olmoe, gpt_oss";

/// A sparse mixture of experts in place of the dense MLP: a linear router
/// scores the experts per token, the `top_k` best run, and their outputs are
/// summed weighted by the router's softmax probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Experts per sparse layer (`num_experts`; Mixtral's `num_local_experts`).
    pub num_experts: usize,
    /// Experts each token runs through (`num_experts_per_tok`).
    pub top_k: usize,
    /// Width of each expert's MLP (`moe_intermediate_size`; Mixtral's and
    /// OLMoE's `intermediate_size`).
    pub expert_intermediate_size: usize,
    /// The `top_k` probabilities are rescaled to sum to 1 (`norm_topk_prob`;
    /// always for Mixtral).
    pub norm_topk_prob: bool,
    /// Per layer, whether its MLP is the mixture (Qwen3-MoE keeps dense
    /// ones, `intermediate_size` wide, in `mlp_only_layers` and off
    /// `decoder_sparse_step`).
    pub sparse_layers: Vec<bool>,
    /// Qwen2-MoE: the width of the shared expert
    /// (`shared_expert_intermediate_size`).
    pub shared_expert_intermediate_size: Option<usize>,
    /// The routers' load-balancing loss is added to the loss times this:
    /// `router_aux_loss_coef` (0.001; OLMoE's 0.01) under
    /// `output_router_logits`, 0 without.
    pub router_aux_loss_coef: f64,
    /// gpt-oss: the experts' SwiGLU is clamped, `(swiglu_alpha,
    /// swiglu_limit)`; see [`super::decoder::Expert::swiglu_limit`].
    pub swiglu_clamp: Option<(f64, f64)>,
    /// gpt-oss: the router and the experts' projections have biases.
    pub expert_bias: bool,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU).
    Silu,
    /// `gelu_pytorch_tanh`: GeLU's tanh approximation (GeGLU).
    GeluTanh,
}

impl Arch {
    /// The `model_type` value in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3_text",
            Arch::SmolLm3 => "smollm3",
            Arch::Olmo2 => "olmo2",
            Arch::Olmo3 => "olmo3",
            Arch::Phi3 => "phi3",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Mixtral => "mixtral",
            Arch::Olmoe => "olmoe",
            Arch::GptOss => "gpt_oss",
        }
    }

    /// The `architectures[0]` value in `config.json`.
    pub fn class_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma2 => "Gemma2ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::SmolLm3 => "SmolLM3ForCausalLM",
            Arch::Olmo2 => "Olmo2ForCausalLM",
            Arch::Olmo3 => "Olmo3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::Qwen2Moe => "Qwen2MoeForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Olmoe => "OlmoeForCausalLM",
            Arch::GptOss => "GptOssForCausalLM",
        }
    }

    /// Phi-3's fused projections: `qkv_proj` for the attention's q, k and v,
    /// `gate_up_proj` for the MLP's gate and up.
    pub fn fused(self) -> bool {
        self == Arch::Phi3
    }

    /// Whether queries and keys are RMS-normalised before RoPE (per head,
    /// or all heads together when [`Self::qk_norm_whole`]).
    pub fn qk_norm(self) -> bool {
        matches!(
            self,
            Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3 | Arch::Olmo2 | Arch::Olmo3 | Arch::Olmoe
        )
    }

    /// OLMo 2's q/k norms: over the whole projection (`heads * head_dim`)
    /// rather than per head.
    pub fn qk_norm_whole(self) -> bool {
        matches!(self, Arch::Olmo2 | Arch::Olmo3 | Arch::Olmoe)
    }

    /// Whether the MLPs are mixtures of experts (see [`MoeConfig`]).
    pub fn moe(self) -> bool {
        matches!(
            self,
            Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Mixtral | Arch::Olmoe | Arch::GptOss
        )
    }

    /// gpt-oss: each attention head has a learned sink (`self_attn.sinks`).
    pub fn attention_sinks(self) -> bool {
        self == Arch::GptOss
    }

    /// A mixture of experts' HF names: the block under a layer, and an
    /// expert's gate, up and down projections.
    pub fn expert_names(self) -> (&'static str, [&'static str; 3]) {
        match self {
            Arch::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
            _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        }
    }

    /// OLMo 2's layout: the attention's and the MLP's outputs are normalised
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`) and their
    /// inputs are not.
    pub fn post_norms_only(self) -> bool {
        matches!(self, Arch::Olmo2 | Arch::Olmo3)
    }

    /// Gemma's layout: norms scale by `1 + weight`, each layer also
    /// normalises the attention's and the MLP's outputs
    /// (`post_attention_layernorm`, `pre_feedforward_layernorm` before the
    /// MLP, `post_feedforward_layernorm`), and embeddings are scaled by
    /// `sqrt(hidden_size)`.
    pub fn gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }

    /// The architecture of a `model_type` value.
    pub fn from_model_type(name: &str) -> Option<Arch> {
        [
            Arch::Llama,
            Arch::Mistral,
            Arch::Qwen2,
            Arch::Qwen3,
            Arch::Gemma2,
            Arch::Gemma3,
            Arch::SmolLm3,
            Arch::Olmo2,
            Arch::Olmo3,
            Arch::Phi3,
            Arch::Qwen2Moe,
            Arch::Qwen3Moe,
            Arch::Mixtral,
            Arch::Olmoe,
            Arch::GptOss,
        ]
        .into_iter()
        .find(|a| a.model_type() == name)
    }
}

/// Llama 3 frequency-dependent RoPE scaling (`rope_type: llama3`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// `factor`.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f64,
    /// `high_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: f64,
}

/// YaRN RoPE scaling (`rope_type: yarn`), as transformers'
/// `_compute_yarn_parameters` reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnScaling {
    /// `factor` (missing: `max_position_embeddings` over the original).
    pub factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: f64,
    /// `beta_fast` (default 32).
    pub beta_fast: f64,
    /// `beta_slow` (default 1).
    pub beta_slow: f64,
    /// cos and sin are multiplied by this: `attention_factor`, or
    /// `0.1 ln(factor) + 1` (with `mscale` and `mscale_all_dim`, their ratio).
    pub attention_factor: f64,
    /// `truncate` (default true): the ramp's ends rounded outwards.
    pub truncate: bool,
}

/// Phi-3's LongRoPE (`rope_type` `longrope`, or its older names `su` and
/// `yarn`), as transformers' `_compute_longrope_parameters` reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    /// Per frequency, what its wavelength is stretched by when a forward
    /// pass's positions stay within `original_max_position_embeddings`.
    pub short_factor: Vec<f64>,
    /// The same past it.
    pub long_factor: Vec<f64>,
    /// Phi3Config's top-level `original_max_position_embeddings` (4096).
    pub original_max_position_embeddings: usize,
    /// cos and sin are multiplied by this: `attention_factor`, or
    /// `sqrt(1 + ln(factor) / ln(original))` for a `factor` (default
    /// `max_position_embeddings / original`) above 1.
    pub attention_factor: f64,
}

/// Everything the decoder needs from `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Decoder family.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Llama 3 RoPE scaling, if any.
    pub rope_scaling: Option<Llama3Scaling>,
    /// Linear RoPE scaling (`rope_type: linear`): positions divided by this.
    pub rope_linear_factor: Option<f64>,
    /// YaRN RoPE scaling, if any.
    pub rope_yarn: Option<YarnScaling>,
    /// Gemma 3: the RoPE base of sliding-window layers (unscaled).
    pub rope_local_theta: Option<f64>,
    /// Phi-3: LongRoPE scaling, if any.
    pub rope_longrope: Option<LongRope>,
    /// Dimensions of each head that RoPE rotates, the first ones: `head_dim`
    /// but for Phi-3's `partial_rotary_factor`.
    pub rotary_dim: usize,
    /// The MLP's gate activation.
    pub activation: Activation,
    /// Attention scores scale by `query_pre_attn_scalar^-1/2` (Gemma)
    /// instead of `head_dim^-1/2`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: attention scores `s` become `cap · tanh(s / cap)` before
    /// the softmax (`attn_logit_softcapping`).
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: the LM head's logits are soft-capped the same way
    /// (`final_logit_softcapping`).
    pub final_logit_softcapping: Option<f64>,
    /// Biases on the q/k/v projections.
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// The LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest position the model was trained for.
    pub max_position_embeddings: usize,
    /// Token ids that end generation (`eos_token_id`, a number or a list).
    pub eos_token_ids: Vec<u32>,
    /// `bos_token_id`, if set.
    pub bos_token_id: Option<u32>,
    /// `pad_token_id`, if set.
    pub pad_token_id: Option<u32>,
    /// Sliding-window attention: a token on a sliding layer sees only the
    /// last `sliding_window` keys, its own included.
    pub sliding_window: Option<usize>,
    /// Per layer, whether it attends over the sliding window (all false
    /// without one).
    pub sliding_layers: Vec<bool>,
    /// Per layer, whether queries and keys are rotated (SmolLM3's NoPE
    /// layers are not; all true for the others).
    pub rope_layers: Vec<bool>,
    /// The mixture of experts, for `qwen3_moe`, `mixtral` and `olmoe`.
    pub moe: Option<MoeConfig>,
    /// A multimodal Gemma 3 checkpoint (`Gemma3ForConditionalGeneration`):
    /// this is its `text_config`, the language model's weights carry a
    /// `language_model.` prefix and the vision tower's pass through.
    pub multimodal: bool,
    /// The file as read, so saving keeps keys this struct does not model.
    pub raw: Map<String, Value>,
}

/// A `config.json` key lookup that names the file and key in its errors.
struct Keys<'a> {
    file: &'a Path,
    map: &'a Map<String, Value>,
}

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> anyhow::Result<usize> {
        match self.get(key) {
            None => bail!("{}: missing key '{key}'", self.file.display()),
            Some(v) => v.as_u64().map(|n| n as usize).with_context(|| {
                format!(
                    "{}: key '{key}' must be a non-negative integer, got {v}",
                    self.file.display()
                )
            }),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> anyhow::Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    fn f64_in(&self, map: &Map<String, Value>, key: &str, prefix: &str) -> anyhow::Result<f64> {
        match map.get(key) {
            None | Some(Value::Null) => {
                bail!("{}: missing key '{prefix}{key}'", self.file.display())
            }
            Some(v) => v.as_f64().with_context(|| {
                format!(
                    "{}: key '{prefix}{key}' must be a number, got {v}",
                    self.file.display()
                )
            }),
        }
    }

    /// The number `key` of `map` (`prefix` names the map in errors), or
    /// `None` when it is missing or null.
    fn f64_opt_in(
        &self,
        map: &Map<String, Value>,
        key: &str,
        prefix: &str,
    ) -> anyhow::Result<Option<f64>> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.f64_in(map, key, prefix).map(Some),
        }
    }

    /// The top-level number `key`, or `default` when it is missing or null.
    fn f64_or(&self, key: &str, default: f64) -> anyhow::Result<f64> {
        Ok(self.f64_opt_in(self.map, key, "")?.unwrap_or(default))
    }

    fn bool_or(&self, key: &str, default: bool) -> anyhow::Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => bail!(
                "{}: key '{key}' must be true or false, got {v}",
                self.file.display()
            ),
        }
    }

    fn token_ids(&self, key: &str) -> anyhow::Result<Vec<u32>> {
        let bad = |v: &Value| {
            anyhow::anyhow!(
                "{}: key '{key}' must be a token id or a list of them, got {v}",
                self.file.display()
            )
        };
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(|| bad(v)))
                .collect(),
            Some(v) => Ok(vec![v.as_u64().ok_or_else(|| bad(v))? as u32]),
        }
    }
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).with_context(|| {
            format!(
                "cannot read {}; a model directory needs the Hugging Face config.json",
                file.display()
            )
        })?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", file.display()))?;
        Self::from_json(&value, &file)
    }

    /// Parses a `config.json` value; `file` is only used in errors.
    pub fn from_json(value: &Value, file: &Path) -> anyhow::Result<Self> {
        let map = value
            .as_object()
            .with_context(|| format!("{}: expected a JSON object", file.display()))?;
        if map.get("model_type").and_then(Value::as_str) == Some("gemma3") {
            return Self::gemma3_multimodal(map, file);
        }
        let filled;
        let map = match map.get("model_type").and_then(Value::as_str) {
            Some("gemma3_text") => {
                filled = with_gemma3_defaults(map);
                &filled
            }
            Some("gpt_oss") => {
                filled = with_gpt_oss_defaults(map);
                &filled
            }
            _ => map,
        };
        let k = Keys { file, map };
        let model_type = k.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match Arch::from_model_type(model_type) {
            Some(a) => a,
            None if model_type.is_empty() => bail!(
                "{}: missing key 'model_type'; supported: {SUPPORTED}",
                file.display()
            ),
            None => bail!(
                "{}: key 'model_type' is '{model_type}', which anneal does not support; supported: {SUPPORTED}",
                file.display()
            ),
        };
        let activation = activation(&k, arch)?;
        if arch != Arch::Phi3 {
            partial_rotary(&k, map, "")?;
        }
        if arch.gemma() && k.bool_or("use_bidirectional_attention", false)? {
            bail!(
                "{}: key 'use_bidirectional_attention' is true; only causal models are supported",
                file.display()
            );
        }
        if arch == Arch::Phi3 {
            phi3_checks(&k)?;
        }
        if k.usize_or("pretraining_tp", 1)? != 1 {
            bail!(
                "{}: key 'pretraining_tp' must be 1 (tensor-parallel slicing is not supported)",
                file.display()
            );
        }
        let hidden_size = k.usize("hidden_size")?;
        let num_attention_heads = k.usize("num_attention_heads")?;
        let num_key_value_heads = k.usize_or("num_key_value_heads", num_attention_heads)?;
        if num_attention_heads == 0 || hidden_size == 0 {
            bail!(
                "{}: 'hidden_size' and 'num_attention_heads' must be positive",
                file.display()
            );
        }
        let head_dim = match arch {
            Arch::Gemma2 | Arch::Gemma3 => k.usize_or("head_dim", 256)?,
            Arch::GptOss => k.usize_or("head_dim", 64)?,
            _ => k.usize_or("head_dim", hidden_size / num_attention_heads)?,
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "{}: 'num_attention_heads' ({num_attention_heads}) must be a multiple of 'num_key_value_heads' ({num_key_value_heads})",
                file.display()
            );
        }
        if head_dim % 2 != 0 {
            bail!(
                "{}: 'head_dim' ({head_dim}) must be even for rotary embeddings",
                file.display()
            );
        }
        let max_position_embeddings = match arch {
            Arch::Gemma2 => k.usize_or("max_position_embeddings", 8192)?,
            Arch::Gemma3 => k.usize_or("max_position_embeddings", 131_072)?,
            Arch::SmolLm3 => k.usize_or("max_position_embeddings", 32_768)?,
            Arch::Phi3 | Arch::Olmoe => k.usize_or("max_position_embeddings", 4096)?,
            Arch::Qwen2Moe | Arch::Qwen3Moe => k.usize_or("max_position_embeddings", 32_768)?,
            Arch::Mixtral | Arch::GptOss => k.usize_or("max_position_embeddings", 131_072)?,
            _ => k.usize_or("max_position_embeddings", 2048)?,
        };
        let (mut rotary_dim, mut longrope) = (head_dim, None);
        let rope = match arch {
            Arch::Gemma3 => layer_type_rope(&k, 1e6, Some(1e4))?,
            Arch::Olmo3 => layer_type_rope(&k, 5e5, None)?,
            Arch::SmolLm3 => rope(&k, 2e6)?,
            Arch::Mixtral => rope(&k, 1e6)?,
            Arch::GptOss => rope(&k, 150_000.0)?,
            Arch::Phi3 => {
                let phi3 = phi3_rope(&k, head_dim, max_position_embeddings)?;
                (rotary_dim, longrope) = (phi3.rotary_dim, phi3.longrope);
                phi3.keys
            }
            _ => rope(&k, 10_000.0)?,
        };
        let num_hidden_layers = k.usize("num_hidden_layers")?;
        let rope_layers = rope_layers(&k, arch, num_hidden_layers)?;
        let (sliding_window, sliding_layers) = sliding(&k, arch, num_hidden_layers, &rope_layers)?;
        let attention_bias = match arch {
            Arch::Qwen2 => true,
            Arch::Qwen2Moe => k.bool_or("qkv_bias", true)?,
            Arch::Mixtral => false,
            Arch::Llama
            | Arch::Mistral
            | Arch::Qwen3
            | Arch::Gemma2
            | Arch::Gemma3
            | Arch::SmolLm3
            | Arch::Olmo2
            | Arch::Olmo3
            | Arch::Qwen3Moe
            | Arch::Olmoe => k.bool_or("attention_bias", false)?,
            // Phi3Attention's projections have no biases.
            Arch::Phi3 => false,
            Arch::GptOss => k.bool_or("attention_bias", true)?,
        };
        // OLMo's and Phi-3's configs default to 1e-5; the others to 1e-6.
        let rms_norm_eps = k.f64_or(
            "rms_norm_eps",
            match arch {
                Arch::Olmo2
                | Arch::Olmo3
                | Arch::Phi3
                | Arch::Mixtral
                | Arch::Olmoe
                | Arch::GptOss => 1e-5,
                _ => 1e-6,
            },
        )?;
        let intermediate_size = k.usize("intermediate_size")?;
        let moe = match arch.moe() {
            true => Some(moe(&k, arch, num_hidden_layers, intermediate_size)?),
            false => None,
        };
        Ok(ModelConfig {
            arch,
            vocab_size: k.usize("vocab_size")?,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta: rope.theta,
            rope_scaling: rope.scaling.llama3,
            rope_linear_factor: rope.scaling.linear,
            rope_yarn: rope.scaling.yarn,
            rope_local_theta: rope.local_theta,
            rope_longrope: longrope,
            rotary_dim,
            activation,
            query_pre_attn_scalar: match arch {
                Arch::Gemma2 | Arch::Gemma3 => Some(k.f64_or("query_pre_attn_scalar", 256.0)?),
                _ => None,
            },
            // Gemma2Config's defaults; Gemma 3's are none.
            attn_logit_softcapping: softcap(&k, "attn_logit_softcapping", arch, 50.0)?,
            final_logit_softcapping: softcap(&k, "final_logit_softcapping", arch, 30.0)?,
            attention_bias,
            mlp_bias: arch != Arch::Phi3 && k.bool_or("mlp_bias", false)?,
            // Gemma's and SmolLM3's configs tie by default; the others do not.
            tie_word_embeddings: k.bool_or(
                "tie_word_embeddings",
                matches!(arch, Arch::Gemma2 | Arch::Gemma3 | Arch::SmolLm3),
            )?,
            max_position_embeddings,
            eos_token_ids: k.token_ids("eos_token_id")?,
            bos_token_id: k.token_ids("bos_token_id")?.first().copied(),
            pad_token_id: k.token_ids("pad_token_id")?.first().copied(),
            sliding_window,
            sliding_layers,
            rope_layers,
            moe,
            multimodal: false,
            raw: value.as_object().cloned().unwrap_or_default(),
        })
    }

    /// A multimodal Gemma 3 config: its language model is `text_config` (a
    /// `gemma3_text` config, Gemma3TextConfig's defaults for missing keys;
    /// token ids from the top level when it lacks them).
    fn gemma3_multimodal(map: &Map<String, Value>, file: &Path) -> anyhow::Result<Self> {
        let mut text = map
            .get("text_config")
            .and_then(Value::as_object)
            .cloned()
            .with_context(|| {
                format!(
                    "{}: key 'text_config' (the language model's config of a multimodal \
                     Gemma 3 checkpoint) is missing",
                    file.display()
                )
            })?;
        match text.get("model_type").and_then(Value::as_str) {
            None | Some("gemma3_text") => {}
            Some(other) => bail!(
                "{}: key 'text_config.model_type' is '{other}'; a Gemma 3 checkpoint's \
                 language model is 'gemma3_text'",
                file.display()
            ),
        }
        text.insert("model_type".into(), json!("gemma3_text"));
        for key in ["eos_token_id", "bos_token_id", "pad_token_id"] {
            if text.get(key).is_none_or(Value::is_null)
                && let Some(v) = map.get(key)
            {
                text.insert(key.into(), v.clone());
            }
        }
        let mut c = Self::from_json(&Value::Object(text), file)
            .with_context(|| format!("{}: in key 'text_config'", file.display()))?;
        c.multimodal = true;
        c.raw = map.clone();
        Ok(c)
    }

    /// The checkpoint's name of a language-model tensor (`model.…`,
    /// `lm_head.…`): `language_model.`-prefixed in a multimodal Gemma 3
    /// checkpoint, as transformers writes it.
    pub fn hf_name(&self, name: &str) -> String {
        match self.multimodal {
            true => format!("language_model.{name}"),
            false => name.to_owned(),
        }
    }

    /// The language-model name of a checkpoint's tensor, or `None` for one
    /// outside the language model (a multimodal checkpoint's vision tower and
    /// projector). Reads transformers 4's names (`language_model.model.…`)
    /// and 5's (`model.language_model.…`).
    pub fn internal_name(&self, name: &str) -> Option<String> {
        if !self.multimodal {
            return Some(name.to_owned());
        }
        if let Some(rest) = name.strip_prefix("language_model.") {
            return Some(rest.to_owned());
        }
        if let Some(rest) = name.strip_prefix("model.language_model.") {
            return Some(format!("model.{rest}"));
        }
        name.starts_with("lm_head.").then(|| name.to_owned())
    }

    /// A checkpoint's language-model tensors under the names
    /// [`super::CausalLm::from_tensors`] reads: gpt-oss's stacked or MXFP4
    /// experts split per expert (see [`super::gpt_oss`]); the others as
    /// they are.
    pub fn internal_tensors(
        &self,
        tensors: BTreeMap<String, HostTensor>,
    ) -> anyhow::Result<BTreeMap<String, HostTensor>> {
        match self.arch {
            Arch::GptOss => super::gpt_oss::unstack(self, tensors),
            _ => Ok(tensors),
        }
    }

    /// The inverse of [`Self::internal_tensors`], for saving.
    pub fn checkpoint_tensors(
        &self,
        tensors: BTreeMap<String, HostTensor>,
    ) -> BTreeMap<String, HostTensor> {
        match self.arch {
            Arch::GptOss => super::gpt_oss::stack(self, tensors),
            _ => tensors,
        }
    }

    /// Query heads per key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The `config.json` to write beside saved weights: the file as read, with
    /// the dtype set to what the weights are stored in.
    pub fn to_json(&self, dtype: &str) -> Value {
        let mut map = self.raw.clone();
        if map.contains_key("dtype") || !map.contains_key("torch_dtype") {
            map.insert("dtype".into(), json!(dtype));
        }
        if map.contains_key("torch_dtype") {
            map.insert("torch_dtype".into(), json!(dtype));
        }
        // Saved weights are never quantised (gpt-oss's MXFP4 experts load
        // dequantised).
        map.remove("quantization_config");
        Value::Object(map)
    }

    /// Writes `dir/config.json`.
    pub fn save(&self, dir: &Path, dtype: &str) -> anyhow::Result<PathBuf> {
        let file = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.to_json(dtype))? + "\n";
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
        Ok(file)
    }
}

/// PEFT's module path of a language-model module (`model.layers.0.…`): in
/// a multimodal checkpoint, `model.language_model.layers.0.…`, as transformers
/// 5 nests `Gemma3ForConditionalGeneration`.
pub fn peft_module(name: &str, multimodal: bool) -> String {
    match (multimodal, name.strip_prefix("model.")) {
        (true, Some(rest)) => format!("model.language_model.{rest}"),
        _ => name.to_owned(),
    }
}

/// `map` with Gemma3TextConfig's defaults for the sizes it leaves out (the
/// Hub's multimodal Gemma 3 configs list only what differs from them).
fn with_gemma3_defaults(map: &Map<String, Value>) -> Map<String, Value> {
    let mut out = map.clone();
    for (key, v) in [
        ("vocab_size", 262_208),
        ("hidden_size", 2304),
        ("intermediate_size", 9216),
        ("num_hidden_layers", 26),
        ("num_attention_heads", 8),
        ("num_key_value_heads", 4),
    ] {
        if out.get(key).is_none_or(Value::is_null) {
            out.insert(key.into(), json!(v));
        }
    }
    out
}

/// `map` with GptOssConfig's YaRN RoPE where it sets none (factor 32 over
/// 4,096 positions, betas 32 and 1, not truncated).
fn with_gpt_oss_defaults(map: &Map<String, Value>) -> Map<String, Value> {
    let mut out = map.clone();
    let set = |key: &str| map.get(key).is_some_and(|v| !v.is_null());
    if !set("rope_scaling") && !set("rope_parameters") {
        out.insert(
            "rope_parameters".into(),
            json!({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                   "truncate": false, "original_max_position_embeddings": 4096}),
        );
    }
    out
}

/// Phi-3's RoPE: its base, the rotated part of each head and LongRoPE.
struct Phi3Rope {
    keys: RopeKeys,
    rotary_dim: usize,
    longrope: Option<LongRope>,
}

/// Phi-3's RoPE as Phi3Config reads it: `rope_scaling` (transformers 4) or
/// `rope_parameters` (5), of type `default` or LongRoPE (`longrope`, or
/// `su` and `yarn`, which Phi-3 renames so); `partial_rotary_factor` from
/// that dict or the top level (Phi-4-mini: 0.75).
fn phi3_rope(k: &Keys, head_dim: usize, max_positions: usize) -> anyhow::Result<Phi3Rope> {
    let (dict, prefix) = match (k.get("rope_scaling"), k.get("rope_parameters")) {
        (Some(s), _) => (s.as_object(), "rope_scaling."),
        (None, Some(p)) => (p.as_object(), "rope_parameters."),
        (None, None) => (None, ""),
    };
    let empty = Map::new();
    let d = dict.unwrap_or(&empty);
    let theta = match k.f64_opt_in(k.map, "rope_theta", "")? {
        Some(t) => t,
        None => k.f64_opt_in(d, "rope_theta", prefix)?.unwrap_or(10_000.0),
    };
    let factor = match k.f64_opt_in(d, "partial_rotary_factor", prefix)? {
        Some(f) => f,
        None => k.f64_or("partial_rotary_factor", 1.0)?,
    };
    let rotary_dim = (head_dim as f64 * factor) as usize;
    if !(factor > 0.0 && factor <= 1.0) || rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
        bail!(
            "{}: key 'partial_rotary_factor' is {factor}; it must be in (0, 1] and rotate an \
             even number of the head's {head_dim} dimensions",
            k.file.display()
        );
    }
    let kind = d
        .get("rope_type")
        .or_else(|| d.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let longrope = match kind {
        "default" => None,
        "longrope" | "su" | "yarn" => {
            let original = k.usize_or("original_max_position_embeddings", 4096)?;
            let list = |key: &str| -> anyhow::Result<Vec<f64>> {
                let v = d.get(key).and_then(Value::as_array).with_context(|| {
                    format!(
                        "{}: key '{prefix}{key}' must be a list of numbers (LongRoPE)",
                        k.file.display()
                    )
                })?;
                let nums: Option<Vec<f64>> = v.iter().map(Value::as_f64).collect();
                match nums {
                    Some(n) if n.len() == rotary_dim / 2 && n.iter().all(|&x| x > 0.0) => Ok(n),
                    _ => bail!(
                        "{}: key '{prefix}{key}' must list {} positive numbers, one per rotated \
                         frequency (head_dim {head_dim}, partial_rotary_factor {factor}), got {} \
                         entries",
                        k.file.display(),
                        rotary_dim / 2,
                        v.len()
                    ),
                }
            };
            let scale = match k.f64_opt_in(d, "factor", prefix)? {
                Some(f) => f,
                None => max_positions as f64 / original as f64,
            };
            let attention_factor = match k.f64_opt_in(d, "attention_factor", prefix)? {
                Some(a) => a,
                None if scale <= 1.0 => 1.0,
                None => (1.0 + scale.ln() / (original as f64).ln()).sqrt(),
            };
            Some(LongRope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            })
        }
        other => bail!(
            "{}: key '{prefix}rope_type' is '{other}'; Phi-3 takes 'default' or 'longrope'",
            k.file.display()
        ),
    };
    Ok(Phi3Rope {
        keys: RopeKeys {
            theta,
            scaling: Scaling::default(),
            local_theta: None,
        },
        rotary_dim,
        longrope,
    })
}

/// Phi3Config's residual and embedding dropouts, which transformers applies
/// while training and anneal does not model, must be 0.
/// The mixture of experts of a `qwen3_moe`, `mixtral` or `olmoe` config,
/// with each config class's defaults.
fn moe(k: &Keys, arch: Arch, layers: usize, intermediate: usize) -> anyhow::Result<MoeConfig> {
    let file = k.file.display();
    let (experts, top_k) = match arch {
        Arch::Mixtral => (8, 2),
        Arch::Olmoe => (64, 8),
        Arch::Qwen2Moe => (60, 4),
        Arch::GptOss => (128, 4),
        _ => (128, 8),
    };
    // transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts`.
    let experts_key = ["num_experts", "num_local_experts"]
        .into_iter()
        .find(|key| k.get(key).is_some())
        .unwrap_or("num_experts");
    let num_experts = k.usize_or(experts_key, experts)?;
    let top_k = k.usize_or("num_experts_per_tok", top_k)?;
    let sparse_layers = match arch {
        Arch::Qwen2Moe | Arch::Qwen3Moe => {
            let step = k.usize_or("decoder_sparse_step", 1)?;
            if step == 0 {
                bail!("{file}: key 'decoder_sparse_step' must be positive");
            }
            let dense = match k.get("mlp_only_layers") {
                None => Vec::new(),
                Some(Value::Array(v)) => v
                    .iter()
                    .map(|x| match x.as_u64() {
                        Some(i) => Ok(i as usize),
                        None => {
                            bail!("{file}: key 'mlp_only_layers' has {x}; it lists layer indices")
                        }
                    })
                    .collect::<anyhow::Result<Vec<usize>>>()?,
                Some(v) => bail!("{file}: key 'mlp_only_layers' must be a list, got {v}"),
            };
            (0..layers)
                .map(|i| !dense.contains(&i) && num_experts > 0 && (i + 1) % step == 0)
                .collect()
        }
        _ => vec![true; layers],
    };
    if sparse_layers.contains(&true) && !(1..=num_experts).contains(&top_k) {
        bail!(
            "{file}: key 'num_experts_per_tok' ({top_k}) must be between 1 and '{experts_key}' \
             ({num_experts})"
        );
    }
    if k.f64_or("router_jitter_noise", 0.0)? != 0.0 {
        bail!(
            "{file}: key 'router_jitter_noise' is not 0; the router's training noise is not \
             supported, set it to 0"
        );
    }
    if k.get("clip_qkv").is_some() {
        bail!(
            "{file}: key 'clip_qkv' is set; clamping q, k and v is not supported, set it to null"
        );
    }
    Ok(MoeConfig {
        num_experts,
        top_k,
        expert_intermediate_size: match arch {
            Arch::Qwen2Moe => k.usize_or("moe_intermediate_size", 1408)?,
            Arch::Qwen3Moe => k.usize_or("moe_intermediate_size", 768)?,
            _ => intermediate,
        },
        shared_expert_intermediate_size: match arch {
            Arch::Qwen2Moe => Some(k.usize_or("shared_expert_intermediate_size", 5632)?),
            _ => None,
        },
        // gpt-oss's router takes the softmax of the top-k logits: the top-k
        // probabilities renormalised.
        norm_topk_prob: matches!(arch, Arch::Mixtral | Arch::GptOss)
            || k.bool_or("norm_topk_prob", false)?,
        sparse_layers,
        router_aux_loss_coef: match k.bool_or("output_router_logits", false)? {
            true => k.f64_or(
                "router_aux_loss_coef",
                if arch == Arch::Olmoe { 0.01 } else { 0.001 },
            )?,
            false => 0.0,
        },
        swiglu_clamp: match arch {
            Arch::GptOss => {
                let (alpha, limit) = (
                    k.f64_or("swiglu_alpha", 1.702)?,
                    k.f64_or("swiglu_limit", 7.0)?,
                );
                if !(limit > 0.0 && limit.is_finite() && alpha.is_finite()) {
                    bail!(
                        "{file}: keys 'swiglu_alpha' ({alpha}) and 'swiglu_limit' ({limit}) must \
                         be finite, the limit positive"
                    );
                }
                Some((alpha, limit))
            }
            _ => None,
        },
        expert_bias: arch == Arch::GptOss,
    })
}

fn phi3_checks(k: &Keys) -> anyhow::Result<()> {
    for key in ["resid_pdrop", "embd_pdrop", "attention_dropout"] {
        if let Some(p) = k.f64_opt_in(k.map, key, "")?
            && p != 0.0
        {
            bail!(
                "{}: key '{key}' is {p}; anneal trains without dropout in the model \
                 (set it to 0.0, or use lora_dropout with LoRA)",
                k.file.display()
            );
        }
    }
    Ok(())
}

/// A soft-capping key of a Gemma config: `gemma2`'s default where missing
/// (none for Gemma 3), none where null; a cap must be a positive number.
/// Other architectures have none (transformers ignores the key there).
fn softcap(k: &Keys, key: &str, arch: Arch, gemma2: f64) -> anyhow::Result<Option<f64>> {
    if !arch.gemma() {
        return Ok(None);
    }
    let cap = match k.map.get(key) {
        None if arch == Arch::Gemma2 => return Ok(Some(gemma2)),
        _ => k.f64_opt_in(k.map, key, "")?,
    };
    match cap {
        Some(c) if !(c > 0.0 && c.is_finite()) => bail!(
            "{}: key '{key}' is {c}; a soft cap must be a positive number (or null for none)",
            k.file.display()
        ),
        cap => Ok(cap),
    }
}

/// The sliding window and the layers that use it, as transformers reads
/// them. Mistral: every layer when `sliding_window` is set (4096 when the key
/// is missing; `layer_types` is ignored). Phi-3: the same, none when missing. Qwen2 and Qwen3: only with
/// `use_sliding_window` (its `sliding_window` again 4096 when missing), on
/// the `sliding_attention` entries of `layer_types`, or without that key on
/// the layers from `max_window_layers` (default 28) on. Gemma 3: its
/// `sliding_window` (default 4096) on the `sliding_attention` entries of
/// `layer_types`, or without that key on all but every
/// `sliding_window_pattern`-th layer (default 6). Gemma 2: its
/// `sliding_window` (default 4096) on `layer_types`' sliding entries, or
/// without that key on every other layer from the first. SmolLM3: only with
/// `use_sliding_window` and a `sliding_window`, on `layer_types`' sliding
/// entries or else its NoPE layers. Llama has none.
fn sliding(
    k: &Keys,
    arch: Arch,
    layers: usize,
    rope_layers: &[bool],
) -> anyhow::Result<(Option<usize>, Vec<bool>)> {
    let file = k.file.display();
    // SmolLM3Config and Phi3Config have no default window; the others' is 4096.
    let missing = match arch {
        Arch::SmolLm3 | Arch::Phi3 | Arch::Mixtral => None,
        Arch::GptOss => Some(128),
        _ => Some(4096),
    };
    let window = || -> anyhow::Result<Option<usize>> {
        match k.map.get("sliding_window") {
            Some(Value::Null) => Ok(None),
            None => Ok(missing),
            Some(_) => match k.usize("sliding_window")? {
                0 => bail!("{file}: key 'sliding_window' must be positive (or null for none)"),
                w => Ok(Some(w)),
            },
        }
    };
    let (window, layer_sliding) = match arch {
        Arch::Llama | Arch::Olmo2 | Arch::Olmoe => (None, vec![false; layers]),
        Arch::Mistral | Arch::Phi3 | Arch::Mixtral => {
            let w = window()?;
            (w, vec![w.is_some(); layers])
        }
        // Qwen3MoeConfig drops the window without `use_sliding_window`; with
        // it, every layer slides.
        Arch::Qwen3Moe => {
            let w = match k.bool_or("use_sliding_window", false)? {
                true => window()?,
                false => None,
            };
            (w, vec![w.is_some(); layers])
        }
        Arch::Qwen2
        | Arch::Qwen2Moe
        | Arch::Qwen3
        | Arch::Gemma2
        | Arch::Gemma3
        | Arch::SmolLm3
        | Arch::Olmo3
        | Arch::GptOss => {
            let always = matches!(
                arch,
                Arch::Gemma2 | Arch::Gemma3 | Arch::Olmo3 | Arch::GptOss
            );
            let w = match always || k.bool_or("use_sliding_window", false)? {
                true => window()?,
                false => None,
            };
            let sliding = match k.get("layer_types") {
                None if arch == Arch::SmolLm3 => {
                    rope_layers.iter().map(|&r| w.is_some() && !r).collect()
                }
                None if arch == Arch::Gemma3 => {
                    all_but_every(k.usize_or("sliding_window_pattern", 6)?, layers)
                }
                None if arch == Arch::Olmo3 => all_but_every(4, layers),
                None if matches!(arch, Arch::Gemma2 | Arch::GptOss) => all_but_every(2, layers),
                None => {
                    let from = k.usize_or("max_window_layers", 28)?;
                    (0..layers).map(|i| w.is_some() && i >= from).collect()
                }
                Some(Value::Array(types)) if types.len() == layers => types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("full_attention") => Ok(false),
                        Some("sliding_attention") => Ok(true),
                        _ => bail!(
                            "{file}: key 'layer_types' has {t}; supported: \
                             \"full_attention\", \"sliding_attention\""
                        ),
                    })
                    .collect::<anyhow::Result<Vec<bool>>>()?,
                Some(v) => bail!(
                    "{file}: key 'layer_types' must list one type per layer \
                     ({layers} for 'num_hidden_layers'), got {v}"
                ),
            };
            if w.is_none() && sliding.contains(&true) {
                let which = match (k.get("layer_types"), arch) {
                    (Some(_), _) => "key 'layer_types' has \"sliding_attention\" layers",
                    (None, Arch::Olmo3) => "without 'layer_types', three layers in four slide",
                    (None, Arch::Gemma2 | Arch::GptOss) => {
                        "without 'layer_types', every other layer slides"
                    }
                    (None, _) => "key 'sliding_window_pattern' (default 6) makes layers slide",
                };
                let set = match arch {
                    Arch::Gemma2 | Arch::Gemma3 | Arch::Olmo3 | Arch::GptOss => {
                        "set 'sliding_window' to its size"
                    }
                    _ => "set 'use_sliding_window' to true and 'sliding_window' to its size",
                };
                bail!(
                    "{file}: {which}, but no window is set; {set}, \
                     or make every layer \"full_attention\" in 'layer_types'"
                );
            }
            (w, sliding)
        }
    };
    Ok(match layer_sliding.contains(&true) {
        true => (window, layer_sliding),
        false => (None, layer_sliding),
    })
}

/// For each of `layers` layers, true but on every `n`-th (layers `n - 1`,
/// `2n - 1`, ...), as Gemma 3 places its global layers and SmolLM3 its NoPE
/// layers (an `n` of 0 counts as 1: all false).
pub fn all_but_every(n: usize, layers: usize) -> Vec<bool> {
    let n = n.max(1);
    (0..layers).map(|i| (i + 1) % n != 0).collect()
}

/// Per layer, whether RoPE applies: SmolLM3's `no_rope_layers` (1 where it
/// does, 0 for a NoPE layer), or without that key every
/// `no_rope_layer_interval`-th layer (default 4) without; every layer for
/// the others.
fn rope_layers(k: &Keys, arch: Arch, layers: usize) -> anyhow::Result<Vec<bool>> {
    if arch != Arch::SmolLm3 {
        return Ok(vec![true; layers]);
    }
    match k.get("no_rope_layers") {
        None => Ok(all_but_every(
            k.usize_or("no_rope_layer_interval", 4)?,
            layers,
        )),
        Some(Value::Array(v)) if v.len() == layers => v
            .iter()
            .map(|x| match x.as_u64() {
                Some(0) => Ok(false),
                Some(1) => Ok(true),
                _ => bail!(
                    "{}: key 'no_rope_layers' has {x}; each entry must be 1 (RoPE) or 0 (none)",
                    k.file.display()
                ),
            })
            .collect(),
        Some(v) => bail!(
            "{}: key 'no_rope_layers' must list 1 or 0 per layer ({layers} for \
             'num_hidden_layers'), got {v}",
            k.file.display()
        ),
    }
}

/// RoPE as `config.json` sets it.
struct RopeKeys {
    theta: f64,
    scaling: Scaling,
    local_theta: Option<f64>,
}

/// The scaling of one RoPE dict (at most one of these is set).
#[derive(Default)]
struct Scaling {
    llama3: Option<Llama3Scaling>,
    linear: Option<f64>,
    yarn: Option<YarnScaling>,
}

impl Scaling {
    fn is_some(&self) -> bool {
        self.llama3.is_some() || self.linear.is_some() || self.yarn.is_some()
    }
}

/// `rope_theta` (`default_theta` when missing) and scaling, from
/// transformers 4's top-level keys or 5's `rope_parameters`.
fn rope(k: &Keys, default_theta: f64) -> anyhow::Result<RopeKeys> {
    let params = k.get("rope_parameters").and_then(Value::as_object);
    let theta = match (k.get("rope_theta"), params) {
        (Some(_), _) => k.f64_in(k.map, "rope_theta", "")?,
        (None, Some(p)) if p.contains_key("rope_theta") => {
            k.f64_in(p, "rope_theta", "rope_parameters.")?
        }
        _ => default_theta,
    };
    let scaling = match (k.get("rope_scaling").and_then(Value::as_object), params) {
        (Some(s), _) => scaling(k, s, "rope_scaling.")?,
        (None, Some(p)) => scaling(k, p, "rope_parameters.")?,
        (None, None) => Scaling::default(),
    };
    Ok(RopeKeys {
        theta,
        scaling,
        local_theta: None,
    })
}

/// RoPE per layer type (Gemma 3, OLMo 3): transformers 5's
/// `rope_parameters` with a dict for `full_attention` and one for
/// `sliding_attention` (default bases `full` and `local`), or transformers
/// 4's `rope_theta` (default `full`), `rope_scaling` (full attention layers
/// only) and, for the sliding layers' base, `rope_local_base_freq` (Gemma 3,
/// default `local`) or, with no `local`, `rope_theta` (OLMo 3).
fn layer_type_rope(k: &Keys, full: f64, local: Option<f64>) -> anyhow::Result<RopeKeys> {
    let of = |layer: &str, default: f64| -> anyhow::Result<(f64, Scaling)> {
        let prefix = format!("rope_parameters.{layer}.");
        match k
            .get("rope_parameters")
            .and_then(|p| p.get(layer))
            .and_then(Value::as_object)
        {
            Some(p) => {
                let theta = k.f64_opt_in(p, "rope_theta", &prefix)?.unwrap_or(default);
                Ok((theta, scaling(k, p, &prefix)?))
            }
            None => Ok((default, Scaling::default())),
        }
    };
    if k.get("rope_parameters").is_some() {
        let (theta, scaling) = of("full_attention", full)?;
        let (local, local_scaling) = of("sliding_attention", local.unwrap_or(full))?;
        if local_scaling.is_some() {
            bail!(
                "{}: key 'rope_parameters.sliding_attention.rope_type' must be 'default' \
                 (scaled RoPE on sliding-window layers is not supported)",
                k.file.display()
            );
        }
        return Ok(RopeKeys {
            theta,
            scaling,
            local_theta: Some(local),
        });
    }
    let scaling = match k.get("rope_scaling").and_then(Value::as_object) {
        Some(s) => scaling(k, s, "rope_scaling.")?,
        None => Scaling::default(),
    };
    let theta = k.f64_or("rope_theta", full)?;
    Ok(RopeKeys {
        theta,
        scaling,
        local_theta: Some(match local {
            Some(l) => k.f64_or("rope_local_base_freq", l)?,
            None => theta,
        }),
    })
}

/// The scaling a RoPE dict (`rope_type` and its keys) asks for: Llama 3's,
/// linear (`factor`) or YaRN.
fn scaling(k: &Keys, s: &Map<String, Value>, prefix: &str) -> anyhow::Result<Scaling> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let opt = |key: &str| k.f64_opt_in(s, key, prefix);
    partial_rotary(k, s, prefix)?;
    Ok(match kind {
        "default" => Scaling::default(),
        "linear" => Scaling {
            linear: Some(k.f64_in(s, "factor", prefix)?),
            ..Scaling::default()
        },
        "llama3" => Scaling {
            llama3: Some(Llama3Scaling {
                factor: k.f64_in(s, "factor", prefix)?,
                low_freq_factor: k.f64_in(s, "low_freq_factor", prefix)?,
                high_freq_factor: k.f64_in(s, "high_freq_factor", prefix)?,
                original_max_position_embeddings: k.f64_in(
                    s,
                    "original_max_position_embeddings",
                    prefix,
                )?,
            }),
            ..Scaling::default()
        },
        "yarn" => {
            let original = k.f64_in(s, "original_max_position_embeddings", prefix)?;
            let factor = match opt("factor")? {
                Some(f) => f,
                None => k.usize("max_position_embeddings")? as f64 / original,
            };
            if !(factor > 0.0 && original > 0.0) {
                bail!(
                    "{}: key '{prefix}factor' ({factor}) and \
                     '{prefix}original_max_position_embeddings' ({original}) must be positive",
                    k.file.display()
                );
            }
            let mscale = |scale: f64, m: f64| match scale <= 1.0 {
                true => 1.0,
                false => 0.1 * m * scale.ln() + 1.0,
            };
            let attention_factor = match (
                opt("attention_factor")?,
                opt("mscale")?.filter(|&m| m != 0.0),
                opt("mscale_all_dim")?.filter(|&m| m != 0.0),
            ) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
                _ => mscale(factor, 1.0),
            };
            // transformers treats a 0 or missing beta as its default.
            let beta = |key: &str, default: f64| -> anyhow::Result<f64> {
                Ok(opt(key)?.filter(|&b| b != 0.0).unwrap_or(default))
            };
            let truncate = match s.get("truncate") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(v) => bail!(
                    "{}: key '{prefix}truncate' must be true or false, got {v}",
                    k.file.display()
                ),
            };
            Scaling {
                yarn: Some(YarnScaling {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: beta("beta_fast", 32.0)?,
                    beta_slow: beta("beta_slow", 1.0)?,
                    attention_factor,
                    truncate,
                }),
                ..Scaling::default()
            }
        }
        other => bail!(
            "{}: key '{prefix}rope_type' is '{other}'; supported: default, linear, llama3, yarn",
            k.file.display()
        ),
    })
}

/// Rotary embeddings on part of each head (`partial_rotary_factor` below 1)
/// are an error naming the key; anneal rotates whole heads.
fn partial_rotary(k: &Keys, s: &Map<String, Value>, prefix: &str) -> anyhow::Result<()> {
    match k.f64_opt_in(s, "partial_rotary_factor", prefix)? {
        None | Some(1.0) => Ok(()),
        Some(f) => bail!(
            "{}: key '{prefix}partial_rotary_factor' is {f}; rotary embeddings over part \
             of a head are not supported (only 1.0)",
            k.file.display()
        ),
    }
}

/// The MLP activation: `hidden_act` (`hidden_activation` for Gemma, whose
/// default is `gelu_pytorch_tanh`); the others take `silu` only.
fn activation(k: &Keys, arch: Arch) -> anyhow::Result<Activation> {
    let key = if arch.gemma() {
        "hidden_activation"
    } else {
        "hidden_act"
    };
    let act = match k.get(key) {
        None => None,
        Some(v) => Some(v.as_str().with_context(|| {
            format!(
                "{}: key '{key}' must be a string, got {v}",
                k.file.display()
            )
        })?),
    };
    match (arch.gemma(), act) {
        (false, None | Some("silu")) => Ok(Activation::Silu),
        (true, None | Some("gelu_pytorch_tanh")) => Ok(Activation::GeluTanh),
        (gemma, Some(other)) => bail!(
            "{}: key '{key}' is '{other}'; only '{}' is supported",
            k.file.display(),
            if gemma { "gelu_pytorch_tanh" } else { "silu" }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    }

    fn parse(v: Value) -> anyhow::Result<ModelConfig> {
        ModelConfig::from_json(&v, Path::new("m/config.json"))
    }

    #[test]
    fn reads_both_rope_forms() {
        let mut v = base();
        v["rope_theta"] = json!(5e5);
        assert_eq!(parse(v).unwrap().rope_theta, 5e5);
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "default"});
        let c = parse(v).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling, c.head_dim), (1e6, None, 4));
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        assert_eq!(parse(v).unwrap().rope_scaling.unwrap().factor, 8.0);
    }

    #[test]
    fn errors_name_the_key() {
        let mut v = base();
        v["model_type"] = json!("gpt2");
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("m/config.json: key 'model_type' is 'gpt2'"),
            "{e}"
        );
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert_eq!(
            parse(v).unwrap_err().to_string(),
            "m/config.json: missing key 'hidden_size'"
        );
        let mut v = base();
        v["rope_scaling"] = json!({"type": "dynamic", "factor": 4.0});
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("'rope_scaling.rope_type' is 'dynamic'"), "{e}");
        let mut v = base();
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("missing key 'rope_scaling.original_max_position_embeddings'"),
            "{e}"
        );
        let mut v = base();
        v["partial_rotary_factor"] = json!(0.5);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("key 'partial_rotary_factor' is 0.5"), "{e}");
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "default", "partial_rotary_factor": 0.75});
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("key 'rope_parameters.partial_rotary_factor' is 0.75"),
            "{e}"
        );
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(parse(v).unwrap_err().to_string().contains("multiple"));
        let mut v = base();
        v["model_type"] = json!("qwen2");
        v["layer_types"] = json!(["sliding_attention"]);
        let e = parse(v.clone()).unwrap_err().to_string();
        assert!(
            e.contains("key 'layer_types' has \"sliding_attention\" layers, but no window"),
            "{e}"
        );
        v["layer_types"] = json!(["chunked_attention"]);
        let e = parse(v.clone()).unwrap_err().to_string();
        assert!(
            e.contains("key 'layer_types' has \"chunked_attention\"; supported"),
            "{e}"
        );
        v["layer_types"] = json!(["full_attention", "full_attention"]);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("one type per layer (1 for"), "{e}");
        let mut v = base();
        v["model_type"] = json!("mistral");
        v["sliding_window"] = json!(0);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("key 'sliding_window' must be positive"), "{e}");
    }

    /// OLMo 2: Olmo2Config's defaults (eps 1e-5, untied, no window even
    /// when `sliding_window` is set, as transformers ignores it there).
    #[test]
    fn reads_olmo2_with_its_defaults() {
        let mut v = base();
        v["model_type"] = json!("olmo2");
        v["sliding_window"] = json!(8);
        let c = parse(v).unwrap();
        assert_eq!(c.arch, Arch::Olmo2);
        assert!(c.arch.qk_norm() && c.arch.qk_norm_whole() && c.arch.post_norms_only());
        assert_eq!(
            (c.rms_norm_eps, c.tie_word_embeddings, c.sliding_window),
            (1e-5, false, None)
        );
        assert_eq!(c.sliding_layers, [false]);
    }

    /// YaRN's defaults as `_compute_yarn_parameters` fills them in, and OLMo
    /// 3's per-layer-type RoPE in transformers 4's form (YaRN on the full
    /// layers only, the sliding ones at the same base, unscaled).
    #[test]
    fn reads_yarn_and_olmo3() {
        let mut v = base();
        v["max_position_embeddings"] = json!(4096);
        v["rope_scaling"] = json!({"rope_type": "yarn", "original_max_position_embeddings": 1024});
        let y = parse(v.clone()).unwrap().rope_yarn.unwrap();
        assert_eq!(
            (y.factor, y.beta_fast, y.beta_slow, y.truncate),
            (4.0, 32.0, 1.0, true)
        );
        assert!((y.attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
        v["rope_scaling"]["mscale"] = json!(2.0);
        v["rope_scaling"]["mscale_all_dim"] = json!(1.0);
        let y = parse(v).unwrap().rope_yarn.unwrap();
        let m = |s: f64| 0.1 * s * 4f64.ln() + 1.0;
        assert!((y.attention_factor - m(2.0) / m(1.0)).abs() < 1e-15);

        let mut v = base();
        v["model_type"] = json!("olmo3");
        v["num_hidden_layers"] = json!(4);
        v["rope_theta"] = json!(5e5);
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 8.0,
            "original_max_position_embeddings": 8192, "attention_factor": 1.2});
        let c = parse(v).unwrap();
        assert_eq!(c.arch, Arch::Olmo3);
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.sliding_layers, [true, true, true, false]);
        assert_eq!((c.rope_theta, c.rope_local_theta), (5e5, Some(5e5)));
        assert_eq!(c.rope_yarn.unwrap().attention_factor, 1.2);
        assert_eq!(c.rms_norm_eps, 1e-5);
    }

    /// Which layers slide, and over how many keys, as transformers 5 decides.
    #[test]
    fn reads_sliding_windows_as_transformers_does() {
        let layers = |v: &mut Value, n: usize| v["num_hidden_layers"] = json!(n);
        let window = |v: Value| {
            let c = parse(v).unwrap();
            (c.sliding_window, c.sliding_layers)
        };
        // Mistral: every layer; a missing key is MistralConfig's 4096.
        let mut v = base();
        v["model_type"] = json!("mistral");
        layers(&mut v, 2);
        assert_eq!(window(v.clone()), (Some(4096), vec![true, true]));
        v["sliding_window"] = json!(8);
        v["layer_types"] = json!(["full_attention", "full_attention"]);
        assert_eq!(window(v.clone()), (Some(8), vec![true, true]));
        v["sliding_window"] = Value::Null;
        assert_eq!(window(v), (None, vec![false, false]));
        // Qwen2/Qwen3: only with use_sliding_window, from max_window_layers on
        // or where layer_types says so.
        for arch in ["qwen2", "qwen3"] {
            let mut v = base();
            v["model_type"] = json!(arch);
            layers(&mut v, 3);
            v["sliding_window"] = json!(16);
            v["max_window_layers"] = json!(1);
            assert_eq!(window(v.clone()), (None, vec![false; 3]));
            v["use_sliding_window"] = json!(true);
            assert_eq!(window(v.clone()), (Some(16), vec![false, true, true]));
            v["layer_types"] = json!(["sliding_attention", "full_attention", "sliding_attention"]);
            assert_eq!(window(v.clone()), (Some(16), vec![true, false, true]));
            v.as_object_mut().unwrap().remove("sliding_window");
            v.as_object_mut().unwrap().remove("layer_types");
            v["max_window_layers"] = json!(3);
            assert_eq!(window(v.clone()), (None, vec![false; 3]));
            v["max_window_layers"] = json!(2);
            assert_eq!(window(v), (Some(4096), vec![false, false, true]));
        }
        // Llama has no sliding window, whatever the keys say.
        let mut v = base();
        v["sliding_window"] = json!(8);
        v["use_sliding_window"] = json!(true);
        assert_eq!(window(v), (None, vec![false]));
    }

    /// Gemma 3 in transformers 4's keys (as on the Hub) and 5's.
    #[test]
    fn reads_phi3_with_longrope_and_partial_rotary() {
        let phi3 = || {
            let mut v = base();
            v["model_type"] = json!("phi3");
            v
        };
        let c = parse(phi3()).unwrap();
        assert_eq!(c.arch.class_name(), "Phi3ForCausalLM");
        assert!(c.arch.fused() && !c.tie_word_embeddings && !c.attention_bias);
        assert_eq!((c.rms_norm_eps, c.max_position_embeddings), (1e-5, 4096));
        assert_eq!((c.sliding_window, c.sliding_layers), (None, vec![false]));
        // Phi-3-mini-4k's window covers every layer, as Mistral's.
        let mut v = phi3();
        v["sliding_window"] = json!(2047);
        v["rope_scaling"] = Value::Null;
        v["resid_pdrop"] = json!(0.0);
        let c = parse(v).unwrap();
        assert_eq!(
            (c.sliding_window, c.sliding_layers),
            (Some(2047), vec![true])
        );
        // Phi-3.5 / Phi-4-mini: LongRoPE over the first 3/4 of each head.
        let mut v = phi3();
        v["head_dim"] = json!(16);
        v["partial_rotary_factor"] = json!(0.75);
        v["max_position_embeddings"] = json!(131_072);
        v["original_max_position_embeddings"] = json!(4096);
        v["rope_scaling"] = json!({"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.0, 3.0, 4.0],
                                   "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]});
        let c = parse(v.clone()).unwrap();
        let lr = c.rope_longrope.clone().unwrap();
        assert_eq!(c.rotary_dim, 12);
        assert_eq!(lr.original_max_position_embeddings, 4096);
        assert_eq!(lr.long_factor[5], 32.0);
        let want = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
        assert!((lr.attention_factor - want).abs() < 1e-12, "{lr:?}");
        for (edit, want) in [
            (
                json!({"rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [2.0]}}),
                "key 'rope_scaling.short_factor' must list 6 positive numbers",
            ),
            (
                json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
                "key 'rope_scaling.rope_type' is 'dynamic'; Phi-3 takes 'default' or 'longrope'",
            ),
            (
                json!({"partial_rotary_factor": 0.7}),
                "key 'partial_rotary_factor' is 0.7",
            ),
            (json!({"resid_pdrop": 0.1}), "key 'resid_pdrop' is 0.1"),
        ] {
            let mut v = v.clone();
            for (key, value) in edit.as_object().unwrap() {
                v[key] = value.clone();
            }
            let e = parse(v).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // Other architectures rotate whole heads.
        let mut v = base();
        v["partial_rotary_factor"] = json!(0.5);
        assert!(parse(v).is_err());
    }

    #[test]
    fn reads_gemma2_with_its_defaults() {
        let mut v = base();
        v["model_type"] = json!("gemma2");
        v["num_hidden_layers"] = json!(5);
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.arch.class_name(), "Gemma2ForCausalLM");
        assert!(c.arch.gemma() && !c.arch.qk_norm() && c.tie_word_embeddings);
        assert_eq!(
            (c.attn_logit_softcapping, c.final_logit_softcapping),
            (Some(50.0), Some(30.0))
        );
        assert_eq!(
            (c.head_dim, c.query_pre_attn_scalar, c.activation),
            (256, Some(256.0), Activation::GeluTanh)
        );
        assert_eq!((c.rope_theta, c.rope_local_theta), (10_000.0, None));
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.sliding_layers, [true, false, true, false, true]);
        assert_eq!(c.max_position_embeddings, 8192);
        // Null switches a cap off; layer_types overrides the alternation.
        v["attn_logit_softcapping"] = Value::Null;
        v["final_logit_softcapping"] = json!(15.5);
        v["sliding_window"] = json!(128);
        v["layer_types"] = json!([
            "full_attention",
            "sliding_attention",
            "full_attention",
            "full_attention",
            "sliding_attention"
        ]);
        let c = parse(v).unwrap();
        assert_eq!(
            (c.attn_logit_softcapping, c.final_logit_softcapping),
            (None, Some(15.5))
        );
        assert_eq!(c.sliding_window, Some(128));
        assert_eq!(c.sliding_layers, [false, true, false, false, true]);
        // Llama ignores the keys, as transformers does.
        let mut v = base();
        v["final_logit_softcapping"] = json!(30.0);
        assert_eq!(parse(v).unwrap().final_logit_softcapping, None);
    }

    #[test]
    fn reads_gemma3() {
        let gemma = || {
            let mut v = base();
            v["model_type"] = json!("gemma3_text");
            v["num_hidden_layers"] = json!(7);
            v
        };
        let mut v = gemma();
        v["rope_theta"] = json!(1e6);
        v["rope_local_base_freq"] = json!(1e4);
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
        v["sliding_window"] = json!(512);
        v["sliding_window_pattern"] = json!(6);
        let c = parse(v).unwrap();
        assert_eq!(c.arch.class_name(), "Gemma3ForCausalLM");
        assert_eq!(
            (c.rope_theta, c.rope_linear_factor, c.rope_local_theta),
            (1e6, Some(8.0), Some(1e4))
        );
        assert_eq!(c.sliding_window, Some(512));
        assert_eq!(
            c.sliding_layers,
            [true, true, true, true, true, false, true]
        );
        assert_eq!(
            (c.head_dim, c.query_pre_attn_scalar, c.activation),
            (256, Some(256.0), Activation::GeluTanh)
        );
        assert!(c.tie_word_embeddings && c.arch.qk_norm() && c.arch.gemma());
        // Defaults: bases 1e6 and 1e4, window 4096.
        let c = parse(gemma()).unwrap();
        assert_eq!((c.rope_theta, c.rope_local_theta), (1e6, Some(1e4)));
        assert_eq!(c.sliding_window, Some(4096));
        let mut v = gemma();
        v["rope_parameters"] = json!({
            "full_attention": {"rope_type": "default", "rope_theta": 5e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 2e4},
        });
        v["layer_types"] = json!(vec!["full_attention"; 7]);
        let c = parse(v).unwrap();
        assert_eq!(
            (c.rope_theta, c.rope_linear_factor, c.rope_local_theta),
            (5e5, None, Some(2e4))
        );
        assert_eq!((c.sliding_window, c.sliding_layers), (None, vec![false; 7]));
        let mut v = gemma();
        v["sliding_window"] = Value::Null;
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("'sliding_window_pattern' (default 6) makes layers slide, but no window"),
            "{e}"
        );
        assert_eq!(
            (c.attn_logit_softcapping, c.final_logit_softcapping),
            (None, None)
        );
        let mut v = gemma();
        v["final_logit_softcapping"] = json!(30.0);
        let c = parse(v).unwrap();
        assert_eq!(c.final_logit_softcapping, Some(30.0));
        for (key, value, want) in [
            (
                "attn_logit_softcapping",
                json!(0.0),
                "key 'attn_logit_softcapping' is 0; a soft cap must be a positive number",
            ),
            (
                "final_logit_softcapping",
                json!("30"),
                "key 'final_logit_softcapping' must be a number",
            ),
            (
                "use_bidirectional_attention",
                json!(true),
                "key 'use_bidirectional_attention'",
            ),
            (
                "hidden_activation",
                json!("gelu"),
                "key 'hidden_activation' is 'gelu'",
            ),
        ] {
            let mut v = gemma();
            v[key] = value;
            let e = parse(v).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // A multimodal checkpoint: the language model is `text_config`, its
        // missing sizes Gemma3TextConfig's defaults, its tensors prefixed.
        let mut text = gemma();
        text.as_object_mut().unwrap().remove("vocab_size");
        text.as_object_mut().unwrap().remove("model_type");
        let v = json!({"model_type": "gemma3", "text_config": text, "eos_token_id": [1, 106],
                       "architectures": ["Gemma3ForConditionalGeneration"]});
        let c = parse(v.clone()).unwrap();
        assert!(c.multimodal);
        assert_eq!((c.arch, c.vocab_size), (Arch::Gemma3, 262_208));
        assert_eq!(c.eos_token_ids, [1, 106]);
        assert_eq!(c.raw, *v.as_object().unwrap(), "saved back as read");
        assert_eq!(
            c.hf_name("model.norm.weight"),
            "language_model.model.norm.weight"
        );
        for (name, want) in [
            (
                "language_model.model.layers.0.mlp.up_proj.weight",
                Some("model.layers.0.mlp.up_proj.weight"),
            ),
            (
                "model.language_model.norm.weight",
                Some("model.norm.weight"),
            ),
            ("lm_head.weight", Some("lm_head.weight")),
            ("vision_tower.post_layernorm.bias", None),
            ("multi_modal_projector.mm_soft_emb_norm.weight", None),
        ] {
            assert_eq!(c.internal_name(name).as_deref(), want, "{name}");
        }
        assert_eq!(
            peft_module("model.layers.1.self_attn.q_proj", true),
            "model.language_model.layers.1.self_attn.q_proj"
        );
        let e = format!("{:#}", parse(json!({"model_type": "gemma3"})).unwrap_err());
        assert!(e.contains("key 'text_config'"), "{e}");
        let mut v = gemma();
        v["rope_parameters"] = json!({
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        });
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("rope_parameters.sliding_attention.rope_type"),
            "{e}"
        );
        // Llama's activation key, and linear scaling for other models.
        let mut v = base();
        v["hidden_act"] = json!("gelu_pytorch_tanh");
        let e = parse(v).unwrap_err().to_string();
        assert!(
            e.contains("key 'hidden_act' is 'gelu_pytorch_tanh'; only 'silu'"),
            "{e}"
        );
        let mut v = base();
        v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        assert_eq!(parse(v).unwrap().rope_linear_factor, Some(2.0));
    }

    /// SmolLM3's NoPE layers, and its window on them.
    #[test]
    fn reads_smollm3() {
        let smol = || {
            let mut v = base();
            v["model_type"] = json!("smollm3");
            v["num_hidden_layers"] = json!(8);
            v
        };
        let c = parse(smol()).unwrap();
        let every_fourth = [true, true, true, false, true, true, true, false];
        assert_eq!(c.rope_layers, every_fourth);
        assert_eq!((c.rope_theta, c.tie_word_embeddings), (2e6, true));
        assert_eq!(c.sliding_window, None);
        let mut v = smol();
        v["no_rope_layers"] = json!([1, 0, 1, 1, 1, 1, 1, 0]);
        v["use_sliding_window"] = json!(true);
        v["sliding_window"] = json!(64);
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.rope_layers[..3], [true, false, true]);
        assert_eq!(c.sliding_window, Some(64));
        let nope: Vec<bool> = c.rope_layers.iter().map(|r| !r).collect();
        assert_eq!(
            c.sliding_layers, nope,
            "the window slides on the NoPE layers"
        );
        v["no_rope_layers"] = json!([1, 2, 1, 1, 1, 1, 1, 0]);
        let e = parse(v.clone()).unwrap_err().to_string();
        assert!(e.contains("key 'no_rope_layers' has 2"), "{e}");
        v["no_rope_layers"] = json!([1, 0]);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("1 or 0 per layer (8 for"), "{e}");
    }

    #[test]
    fn reads_qwen3_and_mistral() {
        let mut v = base();
        v["model_type"] = json!("qwen3");
        v["head_dim"] = json!(16);
        let c = parse(v).unwrap();
        assert_eq!(
            (c.arch, c.head_dim, c.attention_bias),
            (Arch::Qwen3, 16, false)
        );
        assert!(c.arch.qk_norm());
        let mut v = base();
        v["model_type"] = json!("mistral");
        v["sliding_window"] = Value::Null;
        let c = parse(v).unwrap();
        assert_eq!(c.arch.class_name(), "MistralForCausalLM");
        assert!(!c.arch.qk_norm());
    }

    #[test]
    fn reads_mixtures_of_experts_with_each_class_defaults() {
        let moe = |model_type: &str, extra: Value| {
            let mut v = base();
            v["model_type"] = json!(model_type);
            v["num_hidden_layers"] = json!(4);
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            parse(v)
        };
        let c = moe("qwen3_moe", json!({})).unwrap();
        let m = c.moe.unwrap();
        // Qwen3MoeConfig: 128 experts, top 8, 768 wide, not renormalised.
        assert_eq!(
            (
                m.num_experts,
                m.top_k,
                m.expert_intermediate_size,
                m.norm_topk_prob
            ),
            (128, 8, 768, false)
        );
        assert_eq!(
            (c.max_position_embeddings, c.sliding_window),
            (32_768, None)
        );
        assert!(c.arch.qk_norm() && !c.arch.qk_norm_whole());
        let c = moe(
            "qwen3_moe",
            json!({"num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                   "decoder_sparse_step": 2, "mlp_only_layers": [3], "norm_topk_prob": true,
                   "use_sliding_window": true, "sliding_window": 16}),
        )
        .unwrap();
        let m = c.moe.unwrap();
        assert_eq!((m.num_experts, m.top_k, m.norm_topk_prob), (4, 2, true));
        assert_eq!(m.sparse_layers, [false, true, false, false]);
        assert_eq!(c.sliding_layers, [true; 4]);
        // Mixtral always renormalises; its names differ.
        let c = moe("mixtral", json!({"num_local_experts": 4})).unwrap();
        let m = c.moe.unwrap();
        assert_eq!((m.num_experts, m.top_k, m.norm_topk_prob), (4, 2, true));
        assert_eq!(m.expert_intermediate_size, c.intermediate_size);
        assert_eq!(
            (c.rope_theta, c.rms_norm_eps, c.sliding_window),
            (1e6, 1e-5, None)
        );
        assert_eq!(c.arch.expert_names().0, "block_sparse_moe");
        // Qwen2MoeConfig: 60 experts, top 4, 1408 wide, a shared expert 5632
        // wide; q/k/v biases unless `qkv_bias` is false.
        let c = moe("qwen2_moe", json!({})).unwrap();
        let m = c.moe.unwrap();
        assert_eq!(
            (m.num_experts, m.top_k, m.expert_intermediate_size),
            (60, 4, 1408)
        );
        assert_eq!(m.shared_expert_intermediate_size, Some(5632));
        assert!(c.attention_bias && !c.arch.qk_norm());
        let c = moe(
            "qwen2_moe",
            json!({"qkv_bias": false, "mlp_only_layers": [0]}),
        )
        .unwrap();
        assert!(!c.attention_bias);
        assert_eq!(c.moe.unwrap().sparse_layers, [false, true, true, true]);
        let c = moe("olmoe", json!({"num_experts": 4, "num_experts_per_tok": 2})).unwrap();
        assert!(c.arch.qk_norm_whole() && !c.arch.post_norms_only());
        assert_eq!(c.moe.unwrap().sparse_layers, [true; 4]);
        for (extra, want) in [
            (
                json!({"num_experts": 4, "num_experts_per_tok": 5}),
                "m/config.json: key 'num_experts_per_tok' (5) must be between 1 and 'num_experts' (4)",
            ),
            (json!({"clip_qkv": 8.0}), "key 'clip_qkv' is set"),
            (
                json!({"router_jitter_noise": 0.1}),
                "key 'router_jitter_noise' is not 0",
            ),
            (
                json!({"decoder_sparse_step": 0}),
                "'decoder_sparse_step' must be positive",
            ),
            (
                json!({"mlp_only_layers": "1"}),
                "'mlp_only_layers' must be a list",
            ),
        ] {
            let model_type = match extra.get("router_jitter_noise") {
                Some(_) => "mixtral",
                None if extra.get("clip_qkv").is_some() => "olmoe",
                None => "qwen3_moe",
            };
            let e = format!("{:#}", moe(model_type, extra).unwrap_err());
            assert!(e.contains(want), "{e}");
        }
    }
}
