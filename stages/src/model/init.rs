//! Small random-initialised Hugging Face checkpoints, so pipelines and tests
//! run offline with no downloaded model: an architecture and size preset, a
//! byte-level BPE tokenizer trained on a text corpus, and a ChatML template.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::config::{self, Arch, ModelConfig};
use super::tokenizer::{CHATML_TEMPLATE, chatml_tokenizer_config, train_bpe};
use super::weights::{self, HostTensor, SaveDtype};
use crate::rng::{Normal, SplitMix64};
use crate::sink::write_json;

/// Special tokens of initialised models, in id order.
pub const SPECIAL_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
];

/// Size presets: `(name, hidden, layers, heads, kv_heads, intermediate, vocab)`.
pub const PRESETS: &[(&str, usize, usize, usize, usize, usize, usize)] = &[
    ("tiny", 64, 2, 4, 2, 128, 1024),
    ("small", 256, 4, 4, 2, 768, 4096),
    ("base", 512, 8, 8, 4, 1536, 8192),
];

/// What to create.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    /// `llama` (default), `mistral`, `qwen2`, `qwen3`, `smollm3`, `gemma2`,
    /// `gemma3_text`, `olmo2`, `olmo3`, `phi3`, or a mixture of experts:
    /// `qwen2_moe`, `qwen3_moe`, `mixtral`, `olmoe`, `gpt_oss`.
    #[serde(default = "default_arch")]
    pub arch: String,
    /// A name from [`PRESETS`] (default `tiny`).
    #[serde(default = "default_size")]
    pub size: String,
    /// Overrides the preset's vocabulary size (the tokenizer may come out smaller
    /// on a small corpus; config.json gets the real size).
    pub vocab_size: Option<usize>,
    /// Overrides the preset's hidden size.
    pub hidden_size: Option<usize>,
    /// Overrides the preset's layer count.
    pub num_hidden_layers: Option<usize>,
    /// Overrides the preset's MLP width.
    pub intermediate_size: Option<usize>,
    /// Overrides the preset's query heads.
    pub num_attention_heads: Option<usize>,
    /// Overrides the preset's key/value heads.
    pub num_key_value_heads: Option<usize>,
    /// Mixtures of experts: experts per layer (default 4), each
    /// `intermediate_size` wide.
    pub num_experts: Option<usize>,
    /// Mixtures of experts: experts per token (default 2).
    pub num_experts_per_tok: Option<usize>,
    /// Longest sequence (default 2048).
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Sliding-window attention over this many keys (`mistral` and `phi3`
    /// on every layer, `qwen2`,
    /// `qwen3`, `smollm3` (on its NoPE layers), `gemma2` (every other layer
    /// global), `gemma3_text` (every sixth layer global), `olmo3` (every
    /// fourth); default none).
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: the first layer with the sliding window; earlier ones
    /// attend over everything (default 0: every layer slides).
    pub max_window_layers: Option<usize>,
    /// Standard deviation of the normal initialisation (default 0.02, as transformers).
    #[serde(default = "default_std")]
    pub initializer_range: f64,
    /// Tie the LM head to the embedding (default true).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Seed of the weights.
    #[serde(default)]
    pub seed: u64,
    /// Use at most this many bytes of corpus text for the tokenizer (default 16 MiB).
    #[serde(default = "default_corpus_bytes")]
    pub max_corpus_bytes: usize,
    /// How the weights are stored: `float32` (default) or `bfloat16`, as
    /// most released checkpoints are (each value rounded to nearest).
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

fn default_arch() -> String {
    "llama".into()
}
fn default_size() -> String {
    "tiny".into()
}
fn default_max_pos() -> usize {
    2048
}
fn default_std() -> f64 {
    0.02
}
fn default_true() -> bool {
    true
}
fn default_corpus_bytes() -> usize {
    16 << 20
}
fn default_dtype() -> String {
    "float32".into()
}

impl Default for InitSpec {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("defaults")
    }
}

impl InitSpec {
    /// The storage dtype `dtype` names, if it names one.
    pub fn save_dtype(&self) -> Option<SaveDtype> {
        match self.dtype.as_str() {
            "float32" => Some(SaveDtype::F32),
            "bfloat16" => Some(SaveDtype::Bf16),
            _ => None,
        }
    }

    /// The first invalid setting, as `(key, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if Arch::from_model_type(&self.arch).is_none() {
            return Err((
                "arch".into(),
                format!("arch '{}' is not one of: {}", self.arch, config::SUPPORTED),
            ));
        }
        if self.save_dtype().is_none() {
            return Err((
                "dtype".into(),
                format!("dtype '{}' is not one of: float32, bfloat16", self.dtype),
            ));
        }
        if !PRESETS.iter().any(|p| p.0 == self.size) {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
            return Err((
                "size".into(),
                format!("size '{}' is not one of: {}", self.size, names.join(", ")),
            ));
        }
        let c = self.dims();
        for (key, v) in [
            ("hidden_size", c.1),
            ("num_hidden_layers", c.2),
            ("intermediate_size", c.5),
        ] {
            if v == 0 {
                return Err((key.into(), format!("{key} must be at least 1")));
            }
        }
        if c.3 == 0 || c.4 == 0 || !c.3.is_multiple_of(c.4) {
            return Err((
                "num_key_value_heads".into(),
                format!(
                    "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                    c.3, c.4
                ),
            ));
        }
        if !c.1.is_multiple_of(c.3) || !(c.1 / c.3).is_multiple_of(2) {
            return Err((
                "hidden_size".into(),
                format!(
                    "hidden_size ({}) must split into num_attention_heads ({}) heads of even width",
                    c.1, c.3
                ),
            ));
        }
        if self.sliding_window == Some(0) {
            return Err((
                "sliding_window".into(),
                "sliding_window must be at least 1 (leave it out for full attention)".into(),
            ));
        }
        if self.sliding_window.is_some()
            && matches!(self.arch.as_str(), "llama" | "olmo2" | "olmoe")
        {
            return Err((
                "sliding_window".into(),
                format!(
                    "{} has no sliding-window attention; use arch mistral, qwen2, qwen3, \
                     smollm3, gemma2, gemma3_text, olmo3, phi3, qwen2_moe, qwen3_moe or mixtral",
                    self.arch
                ),
            ));
        }
        if self.max_window_layers.is_some()
            && !matches!(self.arch.as_str(), "qwen2" | "qwen3" | "qwen2_moe")
        {
            return Err((
                "max_window_layers".into(),
                "max_window_layers is a qwen2/qwen3/qwen2_moe key (mistral slides on every layer)"
                    .into(),
            ));
        }
        if self.max_window_layers.is_some() && self.sliding_window.is_none() {
            return Err((
                "max_window_layers".into(),
                "max_window_layers needs sliding_window".into(),
            ));
        }
        let moe = Arch::from_model_type(&self.arch).is_some_and(Arch::moe);
        for (key, v) in [
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
        ] {
            if v.is_some() && !moe {
                return Err((
                    key.into(),
                    format!(
                        "{key} is for a mixture of experts; {} has none (use arch qwen2_moe, \
                         qwen3_moe, mixtral, olmoe or gpt_oss)",
                        self.arch
                    ),
                ));
            }
        }
        let (experts, top_k) = self.experts();
        if moe && !(1..=experts).contains(&top_k) {
            return Err((
                "num_experts_per_tok".into(),
                format!(
                    "num_experts_per_tok ({top_k}) must be between 1 and num_experts ({experts})"
                ),
            ));
        }
        if self.vocab_size.is_some_and(|v| v < 300) {
            return Err((
                "vocab_size".into(),
                "vocab_size must be at least 300 (256 byte tokens, specials and merges)".into(),
            ));
        }
        Ok(())
    }

    /// `(experts, experts per token)` of a mixture of experts.
    fn experts(&self) -> (usize, usize) {
        (
            self.num_experts.unwrap_or(4),
            self.num_experts_per_tok.unwrap_or(2),
        )
    }

    /// `(vocab, hidden, layers, heads, kv_heads, intermediate)` after overrides.
    fn dims(&self) -> (usize, usize, usize, usize, usize, usize) {
        let p = PRESETS
            .iter()
            .find(|p| p.0 == self.size)
            .copied()
            .unwrap_or(PRESETS[0]);
        (
            self.vocab_size.unwrap_or(p.6),
            self.hidden_size.unwrap_or(p.1),
            self.num_hidden_layers.unwrap_or(p.2),
            self.num_attention_heads.unwrap_or(p.3),
            self.num_key_value_heads.unwrap_or(p.4),
            self.intermediate_size.unwrap_or(p.5),
        )
    }

    /// The `config.json` for a vocabulary of `vocab` tokens.
    pub fn config_json(&self, vocab: usize) -> Value {
        let (_, hidden, layers, heads, kv, inter) = self.dims();
        let arch = Arch::from_model_type(&self.arch).unwrap_or(Arch::Llama);
        let mut c = json!({
            "architectures": [arch.class_name()],
            "model_type": arch.model_type(),
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": hidden / heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "torch_dtype": self.dtype,
            "use_cache": true,
        });
        match arch {
            Arch::Llama => {
                c["attention_bias"] = json!(false);
                c["mlp_bias"] = json!(false);
            }
            Arch::Olmo2 => c["attention_bias"] = json!(false),
            Arch::Olmo3 => {
                c["attention_bias"] = json!(false);
                // OLMo 3's pattern with a window: every fourth layer global.
                self.layer_types(&mut c, 4, layers);
            }
            Arch::Mistral => c["sliding_window"] = json!(self.sliding_window),
            Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Mixtral | Arch::Olmoe => {
                let (experts, top_k) = self.experts();
                c["num_experts_per_tok"] = json!(top_k);
                c["output_router_logits"] = json!(false);
                match arch {
                    Arch::Mixtral => {
                        c["num_local_experts"] = json!(experts);
                        c["sliding_window"] = json!(self.sliding_window);
                    }
                    _ => {
                        c["num_experts"] = json!(experts);
                        c["attention_bias"] = json!(false);
                        c["norm_topk_prob"] = json!(arch == Arch::Qwen3Moe);
                    }
                }
                if matches!(arch, Arch::Qwen2Moe | Arch::Qwen3Moe) {
                    c["moe_intermediate_size"] = json!(inter);
                    c["decoder_sparse_step"] = json!(1);
                    c["mlp_only_layers"] = json!([]);
                    c["use_sliding_window"] = json!(self.sliding_window.is_some());
                    c["sliding_window"] = json!(self.sliding_window);
                }
                if arch == Arch::Qwen2Moe {
                    c.as_object_mut()
                        .expect("an object")
                        .remove("attention_bias");
                    c["qkv_bias"] = json!(true);
                    c["shared_expert_intermediate_size"] = json!(inter);
                    if self.sliding_window.is_some() {
                        c["max_window_layers"] = json!(self.max_window_layers.unwrap_or(0));
                    }
                }
            }
            Arch::GptOss => {
                let (experts, top_k) = self.experts();
                c["num_local_experts"] = json!(experts);
                c["num_experts_per_tok"] = json!(top_k);
                c["output_router_logits"] = json!(false);
                c["attention_bias"] = json!(true);
                c["rms_norm_eps"] = json!(1e-5);
                c["swiglu_alpha"] = json!(1.702);
                c["swiglu_limit"] = json!(7.0);
                c.as_object_mut().expect("an object").remove("rope_theta");
                c["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 10000.0});
                // gpt-oss's pattern: every other layer slides, from the first.
                self.sliding_types(&mut c, 2, layers);
            }
            Arch::Phi3 => {
                c["sliding_window"] = json!(self.sliding_window);
                c["original_max_position_embeddings"] = json!(self.max_position_embeddings);
                c["rms_norm_eps"] = json!(1e-5);
                for key in ["resid_pdrop", "embd_pdrop", "attention_dropout"] {
                    c[key] = json!(0.0);
                }
            }
            Arch::Qwen2 | Arch::Qwen3 => {
                if arch == Arch::Qwen3 {
                    c["attention_bias"] = json!(false);
                }
                c["use_sliding_window"] = json!(self.sliding_window.is_some());
                if let Some(w) = self.sliding_window {
                    c["sliding_window"] = json!(w);
                    c["max_window_layers"] = json!(self.max_window_layers.unwrap_or(0));
                }
            }
            Arch::SmolLm3 => {
                c["attention_bias"] = json!(false);
                c["mlp_bias"] = json!(false);
                // SmolLM3's NoPE layers: every fourth; a window slides on those.
                c["no_rope_layer_interval"] = json!(4);
                c["no_rope_layers"] = config::all_but_every(4, layers)
                    .into_iter()
                    .map(u8::from)
                    .collect();
                c["use_sliding_window"] = json!(self.sliding_window.is_some());
                c["sliding_window"] = json!(self.sliding_window);
            }
            Arch::Gemma2 | Arch::Gemma3 => {
                c.as_object_mut().expect("an object").remove("hidden_act");
                c["hidden_activation"] = json!("gelu_pytorch_tanh");
                c["attention_bias"] = json!(false);
                c["query_pre_attn_scalar"] = json!(hidden / heads);
                if arch == Arch::Gemma2 {
                    // Gemma 2's caps, and with a window every other layer global.
                    c["final_logit_softcapping"] = json!(30.0);
                    c["attn_logit_softcapping"] = json!(50.0);
                    self.sliding_types(&mut c, 2, layers);
                } else {
                    c["final_logit_softcapping"] = Value::Null;
                    c["attn_logit_softcapping"] = Value::Null;
                    // Gemma 3's pattern with a window: every sixth layer global.
                    self.layer_types(&mut c, 6, layers);
                }
            }
        }
        c
    }

    /// RoPE per layer type and [`Self::sliding_types`] (Gemma 3, OLMo 3).
    fn layer_types(&self, c: &mut Value, every: usize, layers: usize) {
        c.as_object_mut().expect("an object").remove("rope_theta");
        let default = json!({"rope_type": "default", "rope_theta": 10000.0});
        c["rope_parameters"] = json!({"full_attention": default, "sliding_attention": default});
        self.sliding_types(c, every, layers);
    }

    /// The window and, with one, all but every `every`-th of `layers`
    /// layers sliding.
    fn sliding_types(&self, c: &mut Value, every: usize, layers: usize) {
        c["sliding_window"] = json!(self.sliding_window);
        c["layer_types"] = config::all_but_every(every, layers)
            .into_iter()
            .map(|slides| match self.sliding_window.is_some() && slides {
                true => "sliding_attention",
                false => "full_attention",
            })
            .collect();
    }
}

/// Random weights as transformers initialises them: normal(0, std) for
/// projections and embeddings (and gpt-oss's sinks), zero biases, unit norm
/// weights; under the names [`super::CausalLm::from_tensors`] reads (see
/// [`ModelConfig::internal_tensors`]).
pub fn random_tensors(config: &ModelConfig, std: f64, seed: u64) -> BTreeMap<String, HostTensor> {
    let c = config;
    let mut rng = Normal(SplitMix64(seed));
    let mut out = BTreeMap::new();
    let normal = |shape: Vec<usize>, rng: &mut Normal| HostTensor {
        data: (0..shape.iter().product::<usize>())
            .map(|_| rng.sample(std))
            .collect(),
        shape,
    };
    let fill = |shape: Vec<usize>, v: f32| HostTensor {
        data: vec![v; shape.iter().product()],
        shape,
    };
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    // Gemma's norms scale by `1 + weight`.
    let one = if c.arch.gemma() { 0.0 } else { 1.0 };
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    out.insert(
        "model.embed_tokens.weight".into(),
        normal(vec![c.vocab_size, h], &mut rng),
    );
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let o_bias = c.attention_bias && !matches!(c.arch, Arch::Qwen2 | Arch::Qwen2Moe);
        let projections: Vec<(&str, usize, usize, bool)> = match c.arch.fused() {
            // Phi-3's have no biases.
            true => vec![
                ("self_attn.qkv_proj", q + 2 * kv, h, false),
                ("self_attn.o_proj", h, q, false),
                ("mlp.gate_up_proj", 2 * i, h, false),
                ("mlp.down_proj", h, i, false),
            ],
            false => vec![
                ("self_attn.q_proj", q, h, c.attention_bias),
                ("self_attn.k_proj", kv, h, c.attention_bias),
                ("self_attn.v_proj", kv, h, c.attention_bias),
                ("self_attn.o_proj", h, q, o_bias),
                ("mlp.gate_proj", i, h, c.mlp_bias),
                ("mlp.up_proj", i, h, c.mlp_bias),
                ("mlp.down_proj", h, i, c.mlp_bias),
            ],
        };
        let mut projections: Vec<(String, usize, usize, bool)> = projections
            .into_iter()
            .map(|(name, o, inp, bias)| (name.to_owned(), o, inp, bias))
            .collect();
        if let Some(moe) = c.moe.as_ref().filter(|m| m.sparse_layers[l]) {
            let (block, [gate, up, down]) = c.arch.expert_names();
            let ei = moe.expert_intermediate_size;
            projections.retain(|x| !x.0.starts_with("mlp."));
            let eb = moe.expert_bias;
            projections.push((format!("{block}.gate"), moe.num_experts, h, eb));
            for x in 0..moe.num_experts {
                let at = format!("{block}.experts.{x}");
                projections.push((format!("{at}.{gate}"), ei, h, eb));
                projections.push((format!("{at}.{up}"), ei, h, eb));
                projections.push((format!("{at}.{down}"), h, ei, eb));
            }
            if let Some(si) = moe.shared_expert_intermediate_size {
                let at = format!("{block}.shared_expert");
                projections.push((format!("{at}.gate_proj"), si, h, false));
                projections.push((format!("{at}.up_proj"), si, h, false));
                projections.push((format!("{at}.down_proj"), h, si, false));
                projections.push((format!("{block}.shared_expert_gate"), 1, h, false));
            }
        }
        for (name, o, inp, bias) in projections {
            out.insert(format!("{p}.{name}.weight"), normal(vec![o, inp], &mut rng));
            if bias {
                out.insert(format!("{p}.{name}.bias"), fill(vec![o], 0.0));
            }
        }
        if c.arch.attention_sinks() {
            let sinks = normal(vec![c.num_attention_heads], &mut rng);
            out.insert(format!("{p}.self_attn.sinks"), sinks);
        }
        if c.arch.qk_norm() {
            let (qn, kn) = match c.arch.qk_norm_whole() {
                true => (q, kv),
                false => (hd, hd),
            };
            for (n, width) in [("q_norm", qn), ("k_norm", kn)] {
                out.insert(format!("{p}.self_attn.{n}.weight"), fill(vec![width], one));
            }
        }
        let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
        if c.arch.gemma() {
            norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
        }
        if c.arch.post_norms_only() {
            norms = vec!["post_attention_layernorm", "post_feedforward_layernorm"];
        }
        for n in norms {
            out.insert(format!("{p}.{n}.weight"), fill(vec![h], one));
        }
    }
    out.insert("model.norm.weight".into(), fill(vec![h], one));
    if !c.tie_word_embeddings {
        out.insert(
            "lm_head.weight".into(),
            normal(vec![c.vocab_size, h], &mut rng),
        );
    }
    out
}

/// Every string in a JSON value (keys excluded), depth first.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// Text for tokenizer training: every string value of JSONL/Parquet rows, or
/// the lines of any other file, up to `max_bytes` in all.
pub fn corpus_texts(files: &[&Path], max_bytes: usize) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::new();
    let mut size = 0usize;
    for file in files {
        let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
        if matches!(ext, "jsonl" | "parquet" | "pq") {
            let mut rows = crate::rows::RowReader::open(file)?;
            while let Some(row) = rows.next_row() {
                let (_, row) = row?;
                let start = texts.len();
                strings(&row, &mut texts);
                size += texts[start..].iter().map(String::len).sum::<usize>();
                if size >= max_bytes {
                    return Ok(texts);
                }
            }
        } else {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {} as UTF-8 text", file.display()))?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                size += line.len();
                texts.push(line.to_owned());
                if size >= max_bytes {
                    return Ok(texts);
                }
            }
        }
    }
    if texts.is_empty() {
        bail!(
            "the tokenizer corpus has no text; give a JSONL/Parquet file with string fields or a text file"
        );
    }
    Ok(texts)
}

/// What [`init_checkpoint`] made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitSummary {
    /// `llama` or `qwen2`.
    pub arch: String,
    /// Tokens in the trained tokenizer.
    pub vocab_size: usize,
    /// Weights in the model.
    pub parameters: usize,
    /// Corpus strings the tokenizer was trained on.
    pub corpus_texts: usize,
}

/// Writes a complete HF checkpoint to `out`: config, random weights,
/// tokenizer trained on `corpus`, ChatML chat template, generation config.
pub fn init_checkpoint(
    out: &Path,
    spec: &InitSpec,
    corpus: &[String],
) -> anyhow::Result<InitSummary> {
    if let Err((key, msg)) = spec.validate() {
        bail!("{key}: {msg}");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (vocab, ..) = spec.dims();
    let tok = train_bpe(corpus, vocab, SPECIAL_TOKENS, spec.arch.starts_with("qwen"))?;
    let vocab = tok.get_vocab_size(true);
    let tok_file = out.join("tokenizer.json");
    tok.save(&tok_file, true)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tok_file.display()))?;
    let tc = chatml_tokenizer_config(&tok, spec.max_position_embeddings);
    write_json(&out.join("tokenizer_config.json"), &tc)?;
    std::fs::write(out.join("chat_template.jinja"), CHATML_TEMPLATE)
        .with_context(|| format!("cannot write {}", out.join("chat_template.jinja").display()))?;
    write_json(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
    )?;
    let config_json = spec.config_json(vocab);
    let config = ModelConfig::from_json(&config_json, &out.join("config.json"))?;
    write_json(&out.join("config.json"), &config_json)?;
    let tensors = random_tensors(&config, spec.initializer_range, spec.seed);
    let parameters = tensors.values().map(|t| t.data.len()).sum();
    let tensors = config.checkpoint_tensors(tensors);
    let dtype = spec.save_dtype().unwrap_or(SaveDtype::F32);
    weights::save_dir(out, &tensors, dtype, super::DEFAULT_MAX_SHARD_BYTES)?;
    Ok(InitSummary {
        arch: spec.arch.clone(),
        vocab_size: vocab,
        parameters,
        corpus_texts: corpus.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: Value) -> InitSpec {
        serde_json::from_value(v).unwrap()
    }

    /// The windows init_model writes read back as transformers reads them.
    #[test]
    fn sliding_windows_round_trip_through_config_json() {
        let read = |v: Value| {
            let s = spec(v);
            s.validate().unwrap();
            let c = ModelConfig::from_json(&s.config_json(512), Path::new("config.json")).unwrap();
            (c.sliding_window, c.sliding_layers)
        };
        assert_eq!(read(json!({"arch": "qwen3"})), (None, vec![false; 2]));
        assert_eq!(read(json!({"arch": "mistral"})), (None, vec![false; 2]));
        assert_eq!(
            read(json!({"arch": "mistral", "sliding_window": 8})),
            (Some(8), vec![true; 2])
        );
        assert_eq!(
            read(json!({"arch": "qwen2", "sliding_window": 8})),
            (Some(8), vec![true; 2])
        );
        assert_eq!(
            read(json!({"arch": "qwen3", "sliding_window": 8, "max_window_layers": 1})),
            (Some(8), vec![false, true])
        );
        // Gemma 3's pattern: every sixth layer global.
        assert_eq!(
            read(json!({"arch": "gemma3_text", "sliding_window": 8, "num_hidden_layers": 7})),
            (Some(8), vec![true, true, true, true, true, false, true])
        );
        assert_eq!(read(json!({"arch": "gemma3_text"})), (None, vec![false; 2]));
        assert_eq!(
            read(json!({"arch": "phi3", "sliding_window": 8})),
            (Some(8), vec![true; 2])
        );
        assert_eq!(read(json!({"arch": "phi3"})), (None, vec![false; 2]));
        // Gemma 2's: every other layer global.
        assert_eq!(
            read(json!({"arch": "gemma2", "sliding_window": 8, "num_hidden_layers": 3})),
            (Some(8), vec![true, false, true])
        );
        assert_eq!(read(json!({"arch": "gemma2"})), (None, vec![false; 2]));
        assert_eq!(
            read(json!({"arch": "smollm3", "sliding_window": 8, "num_hidden_layers": 4})),
            (Some(8), vec![false, false, false, true])
        );
        for (v, key) in [
            (
                json!({"arch": "llama", "sliding_window": 8}),
                "sliding_window",
            ),
            (
                json!({"arch": "qwen2", "sliding_window": 0}),
                "sliding_window",
            ),
            (
                json!({"arch": "qwen2", "max_window_layers": 1}),
                "max_window_layers",
            ),
            (
                json!({"arch": "mistral", "sliding_window": 8, "max_window_layers": 1}),
                "max_window_layers",
            ),
        ] {
            assert_eq!(spec(v.clone()).validate().unwrap_err().0, key, "{v}");
        }
    }
}
