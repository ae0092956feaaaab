//! The Llama/Qwen2 decoder as a burn module, in Hugging Face layout.
//!
//! Projection weights are held as `[in, out]` (burn's convention for
//! `linear`) and transposed on load and save, so checkpoints keep HF's
//! `[out, in]` layout. RoPE is HF's rotate-half form, so q/k rows are never
//! permuted.

use std::collections::BTreeMap;

use anyhow::bail;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::module::embedding;
use burn::tensor::{
    Bool, DType, Distribution, FloatDType, IndexingUpdateOp, Int, Tensor, TensorData,
};

use super::attention::{Causal, masked_attention, sink_attention, swap_heads};
use super::backend::ModelBackend;
use super::config::{Activation, Arch, ModelConfig};
use super::loss::{cross_entropy, linear_cross_entropy, softcap, to_f32};
use super::matmul::matmul_2d;
use super::rms_norm::rms_norm;
use super::rope::rope;
use super::swiglu::{clamped_swiglu, geglu, swiglu};
use super::weights::HostTensor;
use crate::rng;

/// A dense projection `y = x W + b` with `W` stored `[in, out]`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[in, out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`, if the projection has a bias.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A LoRA adapter added to the output, if attached.
    pub lora: Option<LoraAdapter<B>>,
    /// Multiply in bf16 (inputs and weights rounded, f32 out), as under
    /// torch's bf16 autocast; the stored weights stay f32.
    pub bf16: bool,
}

/// LoRA: `y += scaling * (x A) B`, with `A` `[in, r]` and `B` `[r, out]`
/// (PEFT stores their transposes as `lora_A.weight` / `lora_B.weight`).
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `[in, r]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `[r, out]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scaling: f64,
    /// Dropout on the adapter's input while gradients are tracked (training).
    pub dropout: f64,
    /// DoRA: the length of each output column of the adapted weight, `[out]`
    /// (PEFT's `lora_magnitude_vector`); the direction is that of
    /// `W + scaling * A B`.
    pub magnitude: Option<Param<Tensor<B, 1>>>,
}

impl<B: ModelBackend> LoraAdapter<B> {
    /// `scaling * A B`, `[in, out]`: what the adapter adds to the weight.
    pub fn delta(&self) -> Tensor<B, 2> {
        matmul_2d(self.lora_a.val(), self.lora_b.val()).mul_scalar(self.scaling)
    }

    /// `weight + delta` as a constant (no gradient) in f32: the weight whose
    /// columns DoRA measures.
    pub fn adapted(&self, weight: Tensor<B, 2>) -> Tensor<B, 2> {
        to_f32(weight.detach()) + self.delta().detach()
    }
}

/// DoRA's `magnitude / |adapted|`, one factor per output column of the
/// adapted weight ([`LoraAdapter::adapted`], a constant, as in the paper and
/// PEFT).
pub fn dora_scale<B: Backend>(magnitude: Tensor<B, 1>, adapted: Tensor<B, 2>) -> Tensor<B, 1> {
    magnitude / column_norms(adapted)
}

/// The Euclidean length of each column of `w: [in, out]`, `[out]`.
pub fn column_norms<B: Backend>(w: Tensor<B, 2>) -> Tensor<B, 1> {
    let out = w.dims()[1];
    w.powi_scalar(2).sum_dim(0).sqrt().reshape([out])
}

impl<B: ModelBackend> Linear<B> {
    /// Applies the projection to the last dimension; an adapter's dropout
    /// is on while the backend tracks gradients.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let training = B::ad_enabled(&x.device());
        self.forward_with(x, training)
    }

    /// [`Self::forward`] with an adapter's dropout on or off whatever the
    /// backend: on in the untracked forward pass that gradient checkpointing
    /// recomputes.
    pub(crate) fn forward_with<const D: usize>(
        &self,
        x: Tensor<B, D>,
        dropout: bool,
    ) -> Tensor<B, D> {
        match &self.lora {
            None => to_f32(self.base(x)),
            Some(l) => {
                let device = x.device();
                let dropped = l.dropout > 0.0 && dropout;
                let xa = if dropped {
                    let keep = Tensor::<B, D>::random(
                        x.shape(),
                        Distribution::Bernoulli(1.0 - l.dropout),
                        &device,
                    );
                    x.clone() * keep.div_scalar(1.0 - l.dropout)
                } else {
                    x.clone()
                };
                let down = project(xa.clone(), l.lora_a.val(), None, self.bf16);
                let up = project(down, l.lora_b.val(), None, self.bf16).mul_scalar(l.scaling);
                let Some(m) = &l.magnitude else {
                    return to_f32(self.base(x)) + up;
                };
                // DoRA as PEFT computes it: the base output plus
                // `(scale - 1) x' W + scale * up`, where `x'` is the adapter's
                // (dropped-out) input; without dropout that is
                // `scale * (x W + up) + b`. The broadcast factor is the right
                // operand: Flex's fast broadcast paths expect it there.
                let scale: Tensor<B, D> =
                    dora_scale(m.val(), l.adapted(self.weight.val())).unsqueeze();
                if dropped {
                    let direction = project(xa, self.weight.val(), None, self.bf16);
                    to_f32(self.base(x)) + direction * (scale.clone() - 1.0) + up * scale
                } else {
                    let y = (project(x, self.weight.val(), None, self.bf16) + up) * scale;
                    match &self.bias {
                        Some(b) => y + b.val().unsqueeze(),
                        None => y,
                    }
                }
            }
        }
    }

    /// [`Self::forward`] in the dtype its matmul ran in (bf16 under mixed
    /// precision; with an adapter, f32), for consumers that upcast themselves.
    pub fn forward_native<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lora {
            None => self.base(x),
            Some(_) => self.forward(x),
        }
    }

    /// `x W + b` without an adapter, in the matmul's dtype.
    fn base<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        project_native(
            x,
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
            self.bf16,
        )
    }
}

/// `x W + b` over the last dimension as one 2-d matmul ([`matmul_2d`]; burn's
/// `linear` on a 3-d input runs one small matmul per batch row, re-reading
/// `W` each time). With `bf16`, `x`, `W` and `b` are rounded to bf16 for the
/// product and the result comes back as f32 (torch's autocast for `linear`).
pub fn project<B: ModelBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    bf16: bool,
) -> Tensor<B, D> {
    to_f32(project_native(x, weight, bias, bf16))
}

/// [`project`] without the cast back: bf16 under `bf16`.
fn project_native<B: ModelBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    bf16: bool,
) -> Tensor<B, D> {
    if bf16 {
        return project_native(
            x.cast(FloatDType::BF16),
            weight.cast(FloatDType::BF16),
            bias.map(|b| b.cast(FloatDType::BF16)),
            false,
        );
    }
    let mut dims = x.dims();
    let rows = dims[..D - 1].iter().product();
    dims[D - 1] = weight.dims()[1];
    let y = matmul_2d(x.reshape([rows, weight.dims()[0]]), weight);
    let y = match bias {
        Some(b) => y + b.unsqueeze(),
        None => y,
    };
    y.reshape(dims)
}

/// RMS normalisation as in HF: `(offset + w) * x / sqrt(mean(x^2) + eps)`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square.
    pub eps: f64,
    /// Added to the weight: 1 for Gemma, whose weights are stored as
    /// `scale - 1`; 0 otherwise.
    pub offset: f64,
}

impl<B: ModelBackend> RmsNorm<B> {
    /// Normalises the last dimension ([`rms_norm`]).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let w = match self.offset {
            0.0 => self.weight.val(),
            o => self.weight.val().add_scalar(o),
        };
        rms_norm(x, w, self.eps)
    }
}

/// Grouped-query self-attention with rotary embeddings.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection (none when fused into `qkv_proj`).
    pub q_proj: Option<Linear<B>>,
    /// Key projection (likewise).
    pub k_proj: Option<Linear<B>>,
    /// Value projection (likewise).
    pub v_proj: Option<Linear<B>>,
    /// Phi-3: the query, key and value projections as one, in that order
    /// along its outputs.
    pub qkv_proj: Option<Linear<B>>,
    /// Output projection.
    pub o_proj: Linear<B>,
    /// Qwen3: RMS norm over each query head before RoPE (`[head_dim]`);
    /// OLMo 2: over all query heads together (`[heads * head_dim]`).
    pub q_norm: Option<RmsNorm<B>>,
    /// The same for the keys.
    pub k_norm: Option<RmsNorm<B>>,
    /// `q_norm` and `k_norm` normalise the whole projection (OLMo 2), not
    /// each head.
    pub qk_norm_whole: bool,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Keys a token sees on a sliding-window layer, its own included (0:
    /// every earlier key).
    pub sliding_window: usize,
    /// Queries are multiplied by this before the scores' `head_dim^-1/2`
    /// (Gemma's `query_pre_attn_scalar`; 1 otherwise).
    pub q_scale: f64,
    /// Gemma 2: scores `s` become `cap · tanh(s / cap)` (0: not capped).
    pub softcap: f64,
    /// Queries and keys are rotated (false on SmolLM3's NoPE layers).
    pub rope: bool,
    /// Attention scores and weighted sum in bf16 (see [`Linear::bf16`]).
    pub bf16: bool,
    /// gpt-oss: a learned logit per query head (`[heads]`) that each row's
    /// softmax also counts, for a key whose value is zero (see
    /// [`super::attention::sink_attention`]).
    pub sinks: Option<Param<Tensor<B, 1>>>,
}

/// Gated feed-forward block: SwiGLU, or GeGLU for Gemma; or a sparse
/// mixture of such blocks, the experts, behind a router.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate projection (none when fused into `gate_up_proj`, and in a
    /// mixture of experts).
    pub gate_proj: Option<Linear<B>>,
    /// Up projection (likewise).
    pub up_proj: Option<Linear<B>>,
    /// Phi-3: the gate and up projections as one, gate first.
    pub gate_up_proj: Option<Linear<B>>,
    /// Down projection (none in a mixture of experts).
    pub down_proj: Option<Linear<B>>,
    /// The gate goes through GeLU's tanh approximation instead of SiLU.
    pub gelu: bool,
    /// Mixture of experts: the router, `[hidden, experts]` (HF's `mlp.gate`).
    pub gate: Option<Linear<B>>,
    /// Mixture of experts: the experts (empty otherwise).
    pub experts: Vec<Expert<B>>,
    /// Mixture of experts: how many experts each token runs through.
    pub top_k: usize,
    /// Mixture of experts: the `top_k` routing weights are rescaled to sum to 1.
    pub norm_topk_prob: bool,
    /// Qwen2-MoE: an expert every token runs through, beside the routed ones.
    pub shared_expert: Option<Expert<B>>,
    /// Qwen2-MoE: `[hidden, 1]`; the shared expert's output is scaled by
    /// the sigmoid of this projection.
    pub shared_expert_gate: Option<Linear<B>>,
}

/// One expert of a mixture: a SwiGLU block.
#[derive(Module, Debug)]
pub struct Expert<B: Backend> {
    /// Gate projection (Mixtral's `w1`).
    pub gate_proj: Linear<B>,
    /// Up projection (`w3`).
    pub up_proj: Linear<B>,
    /// Down projection (`w2`).
    pub down_proj: Linear<B>,
    /// A routed expert's LoRA adapter on its gate and up projections
    /// together, as PEFT adapts transformers 5's fused `gate_up_proj`
    /// parameter: one `A` `[hidden, r]` and one `B` `[r, 2 * width]`, gate
    /// columns first. (Its down projection's adapter is `down_proj.lora`.)
    pub gate_up_lora: Option<LoraAdapter<B>>,
    /// gpt-oss: the SwiGLU is clamped at this limit (0: plain SwiGLU): the
    /// gate to at most it, the up projection to ±it, and then `(up + 1) ·
    /// gate · σ(swiglu_alpha · gate)`.
    pub swiglu_limit: f64,
    /// gpt-oss: the sigmoid's gain in the clamped SwiGLU.
    pub swiglu_alpha: f64,
}

impl<B: Backend> Expert<B> {
    /// The projections: gate, up, down.
    pub fn projections_mut(&mut self) -> [&mut Linear<B>; 3] {
        [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj]
    }
}

impl<B: ModelBackend> Expert<B> {
    /// The block on rows `x` `[tokens, hidden]`.
    fn forward(&self, x: Tensor<B, 2>, dropout: bool) -> Tensor<B, 2> {
        let mut gate = self.gate_proj.forward_with(x.clone(), dropout);
        let mut up = self.up_proj.forward_with(x.clone(), dropout);
        if let Some(l) = &self.gate_up_lora {
            let bf16 = self.gate_proj.bf16;
            let down = project(x, l.lora_a.val(), None, bf16);
            let delta = project(down, l.lora_b.val(), None, bf16).mul_scalar(l.scaling);
            let width = gate.dims()[1];
            gate = gate + delta.clone().narrow(1, 0, width);
            up = up + delta.narrow(1, width, width);
        }
        let h = match self.swiglu_limit {
            0.0 => swiglu(gate, up),
            limit => clamped_swiglu(gate, up, self.swiglu_alpha as f32, limit as f32),
        };
        self.down_proj.forward_with(h, dropout)
    }
}

/// One decoder layer: pre-norm, Gemma's norms before and after each block,
/// or OLMo 2's after each block only.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Norm before attention (none for OLMo 2).
    pub input_layernorm: Option<RmsNorm<B>>,
    /// Self-attention.
    pub self_attn: Attention<B>,
    /// Norm before the MLP; Gemma and OLMo 2: norm of the attention's output.
    pub post_attention_layernorm: RmsNorm<B>,
    /// Gemma: norm before the MLP.
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    /// Gemma and OLMo 2: norm of the MLP's output.
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
    /// Feed-forward block.
    pub mlp: Mlp<B>,
}

/// A layer's projections as `(name under the layer, Option<&Linear>)`, in the
/// order of Hugging Face's modules; `$by` is `as_ref` or `as_mut` and `$r` the
/// matching borrow.
macro_rules! layer_projections {
    ($layer:expr, $by:ident, $($r:tt)+) => {{
        let (a, m) = ($($r)+ $layer.self_attn, $($r)+ $layer.mlp);
        let (sg, su, sd) = match m.shared_expert.$by() {
            Some(Expert { gate_proj, up_proj, down_proj, .. }) => {
                (Some(gate_proj), Some(up_proj), Some(down_proj))
            }
            None => (None, None, None),
        };
        [
            ("self_attn.q_proj", a.q_proj.$by()),
            ("self_attn.k_proj", a.k_proj.$by()),
            ("self_attn.v_proj", a.v_proj.$by()),
            ("self_attn.qkv_proj", a.qkv_proj.$by()),
            ("self_attn.o_proj", Some($($r)+ a.o_proj)),
            ("mlp.gate_proj", m.gate_proj.$by()),
            ("mlp.up_proj", m.up_proj.$by()),
            ("mlp.gate_up_proj", m.gate_up_proj.$by()),
            ("mlp.down_proj", m.down_proj.$by()),
            ("mlp.shared_expert.gate_proj", sg),
            ("mlp.shared_expert.up_proj", su),
            ("mlp.shared_expert.down_proj", sd),
            ("mlp.shared_expert_gate", m.shared_expert_gate.$by()),
        ]
        .into_iter()
        .filter_map(|(name, lin)| Some((name, lin?)))
    }};
}

impl<B: Backend> DecoderLayer<B> {
    /// The layer's linear projections that exist, in the order of Hugging
    /// Face's modules, with their names under the layer (`self_attn.q_proj`,
    /// `mlp.gate_up_proj`, ...). A mixture of experts' router and routed
    /// experts (see [`Mlp::gate`]) are not among them: transformers 5 holds
    /// them as plain parameters, not `nn.Linear` modules, so the router
    /// takes no LoRA adapter and the routed experts take theirs as PEFT's
    /// `target_parameters` (see [`Expert::gate_up_lora`]). Qwen2-MoE's
    /// shared expert and its gate are among them.
    pub fn projections(&self) -> impl Iterator<Item = (&'static str, &Linear<B>)> {
        layer_projections!(self, as_ref, &)
    }

    /// [`Self::projections`], mutably.
    pub fn projections_mut(&mut self) -> impl Iterator<Item = (&'static str, &mut Linear<B>)> {
        layer_projections!(self, as_mut, &mut)
    }
}

/// A causal language model: embedding, decoder layers, final norm, LM head.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// Separate LM head; `None` when tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    /// RoPE base.
    pub rope_theta: f64,
    /// Llama 3 scaling `factor` (0 when unscaled).
    pub rope_factor: f64,
    /// Llama 3 `low_freq_factor`.
    pub rope_low_freq_factor: f64,
    /// Llama 3 `high_freq_factor`.
    pub rope_high_freq_factor: f64,
    /// Llama 3 `original_max_position_embeddings`.
    pub rope_original_max: f64,
    /// Linear RoPE scaling: frequencies divided by this (1 when unscaled).
    pub rope_linear_factor: f64,
    /// YaRN `factor` (0 when YaRN is off).
    pub rope_yarn_factor: f64,
    /// YaRN `original_max_position_embeddings`.
    pub rope_yarn_original_max: f64,
    /// YaRN `beta_fast` and `beta_slow`.
    pub rope_yarn_betas: (f64, f64),
    /// YaRN `truncate`.
    pub rope_yarn_truncate: bool,
    /// YaRN: cos and sin of the scaled tables are multiplied by this (1
    /// otherwise).
    pub rope_attention_factor: f64,
    /// Gemma 3: the RoPE base of sliding-window layers (0: they use the
    /// global tables).
    pub rope_local_theta: f64,
    /// Phi-3's LongRoPE: frequencies' stretch factors within
    /// `rope_longrope_original_max` positions (empty when off).
    pub rope_short_factor: Vec<f64>,
    /// LongRoPE's stretch factors past it.
    pub rope_long_factor: Vec<f64>,
    /// LongRoPE's `original_max_position_embeddings` (0 when off): a forward
    /// pass whose positions reach past it takes the long factors.
    pub rope_longrope_original_max: usize,
    /// The first dimensions of each head that RoPE rotates (all but for
    /// Phi-3's `partial_rotary_factor`).
    pub rotary_dim: usize,
    /// Gemma: embeddings are multiplied by this (`sqrt(hidden_size)`; 1
    /// otherwise).
    pub embed_scale: f64,
    /// Tied LM head in bf16 (see [`Linear::bf16`]).
    pub bf16: bool,
    /// NEFTune: uniform noise of magnitude `alpha / sqrt(seq * hidden)` on
    /// the embeddings of training micro-batches (0: off).
    pub neftune_noise_alpha: f64,
    /// Gemma 2: logits `l` become `cap · tanh(l / cap)` (0: not capped).
    pub final_softcap: f64,
    /// Mixtures of experts: the routers' load-balancing loss is added to
    /// [`Self::loss`] and [`Self::train_loss`] times this (0: not at all), as
    /// transformers does with `output_router_logits` and
    /// `router_aux_loss_coef`.
    pub router_aux_loss_coef: f64,
    /// A mixture of experts' HF names: the block under a layer (`mlp`,
    /// Mixtral's `block_sparse_moe`) and an expert's gate, up and down
    /// projections.
    #[module(skip)]
    pub expert_names: (&'static str, [&'static str; 3]),
    /// gpt-oss: the checkpoint's fused gate/up expert parameter interleaves
    /// gate and up columns (even, odd), and so does a PEFT adapter's
    /// `lora_B` on it (see [`super::lora::interleave_gate_up`]).
    #[module(skip)]
    pub gate_up_interleaved: bool,
}

/// Keys and values of every layer for the positions seen so far; a
/// sliding-window layer keeps only its last `sliding_window` of them, which
/// hold every key its later tokens see as long as padding is only at the
/// start of a row (as [`generate`](fn@super::generate) pads).
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: (0..n_layers).map(|_| None).collect(),
        }
    }

    /// Keeps only the batch rows in `rows` (after some sequences finished).
    pub fn retain_rows(&mut self, rows: Tensor<B, 1, Int>) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.clone().select(0, rows.clone());
            *v = v.clone().select(0, rows.clone());
        }
    }
}

/// RoPE's cos and sin tables, `[batch, seq, heads, head_dim]` each.
type Rope<B> = (Tensor<B, 4>, Tensor<B, 4>);

/// Everything a forward pass needs besides the token ids: rotary tables and
/// the attention mask, built on the host from positions and key validity.
#[derive(Debug, Clone)]
pub struct Positions<B: Backend> {
    /// cos and sin `[batch, seq, heads, head_dim]` for the query heads, in
    /// the layout of the projection's output, so RoPE runs on contiguous
    /// tensors without broadcasting.
    q_rope: Rope<B>,
    /// The same for the kv heads.
    k_rope: Rope<B>,
    /// Gemma 3: the query and kv tables of sliding-window layers, with
    /// their own RoPE base.
    local_rope: Option<(Rope<B>, Rope<B>)>,
    /// `true` where attention is not allowed: `[batch, 1, queries, keys]`,
    /// or `[batch, kv_heads, queries * rep, keys]` in the grouped-query layout
    /// of [`Attention::forward`] (`rep` query heads per kv head, when > 1,
    /// row `i * rep + r` for head `r` of token `i`).
    /// Built once per forward pass, so the layers do not each copy it.
    mask: Tensor<B, 4, Bool>,
    /// The mask of sliding-window layers (window size, mask in `mask`'s
    /// layout), when the window hides a key that `mask` shows. It covers
    /// only the keys such a layer holds: the last `min(past, window)` cached
    /// ones (see [`KvCache`]) and the new tokens.
    window: Option<(usize, Tensor<B, 4, Bool>)>,
    /// Per new token, `b * t` order: whether it is one (not padding); the
    /// routers' load-balancing loss counts only those.
    tokens: Vec<bool>,
}

impl<B: Backend> Positions<B> {
    /// [`Routing`] for a forward pass over these tokens.
    pub fn routing(&self) -> Routing<B> {
        Routing {
            tokens: self.tokens.clone(),
            prob_sums: Vec::new(),
            picks: Vec::new(),
        }
    }
}

/// The routers' choices over one forward pass, for their load-balancing
/// loss (transformers' `load_balancing_loss_func`): per sparse layer, the
/// router's probabilities summed over the tokens that count, and how often
/// each expert was picked for those tokens, over all sparse layers.
pub struct Routing<B: Backend> {
    tokens: Vec<bool>,
    /// Per sparse layer, `[experts]`.
    prob_sums: Vec<Tensor<B, 1>>,
    /// Per expert.
    picks: Vec<f64>,
}

impl<B: Backend> Routing<B> {
    /// Records one layer: `probs` `[tokens, experts]`, and the `k` experts
    /// picked for each token, token by token.
    fn record(&mut self, probs: Tensor<B, 2>, picked: &[i64], k: usize) {
        let [n, e] = probs.dims();
        self.picks.resize(e, 0.0);
        for (j, &x) in picked.iter().enumerate() {
            if self.tokens[j / k] {
                self.picks[x as usize] += 1.0;
            }
        }
        let counts: Vec<f32> = self
            .tokens
            .iter()
            .map(|&c| f32::from(u8::from(c)))
            .collect();
        let counts = Tensor::<B, 2>::from_data(TensorData::new(counts, [n, 1]), &probs.device());
        self.prob_sums
            .push((probs * counts).sum_dim(0).reshape([e]));
    }

    /// Per expert `e`, `coef · E · f_e / (L · T)`, where `f_e` is its share
    /// of the picks, `picks_e / (L · T)`, over `L` sparse layers and `T`
    /// counted tokens: the loss, `coef · E · Σ_e f_e · P_e` with `P_e` the
    /// mean probability `Σ_l prob_sums_l,e / (L · T)`, is these weights
    /// times the probability sums, and its gradient flows through those
    /// only, as transformers' (the picks are counts). None when no sparse
    /// layer ran or no token counts.
    pub fn weights(&self, coef: f64) -> Option<Vec<f32>> {
        let (e, l) = (self.picks.len() as f64, self.prob_sums.len() as f64);
        let lt = l * self.tokens.iter().filter(|&&c| c).count() as f64;
        (lt > 0.0).then(|| {
            self.picks
                .iter()
                .map(|&p| (coef * e * p / (lt * lt)) as f32)
                .collect()
        })
    }

    /// The load-balancing loss times `coef`, or None (see [`Self::weights`]).
    pub fn loss(self, coef: f64) -> Option<Tensor<B, 1>> {
        let w = self.weights(coef)?;
        let sums = Tensor::stack::<2>(self.prob_sums, 0);
        let device = sums.device();
        let w = Tensor::<B, 1>::from_data(TensorData::new(w.clone(), [w.len()]), &device);
        Some((sums * w.unsqueeze_dim(0)).sum())
    }

    /// `Σ_e weights_e · prob_sums_e` of the one layer recorded: its part of
    /// the loss, given the whole pass's [`Self::weights`].
    pub fn layer_loss(mut self, weights: &[f32]) -> Option<Tensor<B, 1>> {
        let sums = self.prob_sums.pop()?;
        let w = TensorData::new(weights.to_vec(), [weights.len()]);
        let w = Tensor::from_data(w, &sums.device());
        Some((sums * w).sum())
    }
}

impl<B: AutodiffBackend> Positions<B> {
    /// The same tables and mask on the backend autodiff wraps.
    pub fn inner(&self) -> Positions<B::InnerBackend> {
        let rope = |(cos, sin): &Rope<B>| (cos.clone().inner(), sin.clone().inner());
        Positions {
            q_rope: rope(&self.q_rope),
            k_rope: rope(&self.k_rope),
            local_rope: self.local_rope.as_ref().map(|(q, k)| (rope(q), rope(k))),
            mask: self.mask.clone().inner(),
            window: self.window.as_ref().map(|(w, m)| (*w, m.clone().inner())),
            tokens: self.tokens.clone(),
        }
    }
}

impl<B: ModelBackend> Attention<B> {
    /// Queries, keys and values `[b, t, heads * head_dim]` of `x`, from the
    /// three projections or the fused one.
    fn project_qkv(&self, x: Tensor<B, 3>, dropout: bool) -> [Tensor<B, 3>; 3] {
        if let Some(qkv) = &self.qkv_proj {
            let (q, kv) = (
                self.n_heads * self.head_dim,
                self.n_kv_heads * self.head_dim,
            );
            let y = qkv.forward_with(x, dropout);
            return [
                y.clone().narrow(2, 0, q),
                y.clone().narrow(2, q, kv),
                y.narrow(2, q + kv, kv),
            ];
        }
        [&self.q_proj, &self.k_proj, &self.v_proj].map(|p| {
            p.as_ref()
                .expect("unfused attention has q, k and v projections")
                .forward_with(x.clone(), dropout)
        })
    }

    fn forward(
        &self,
        x: Tensor<B, 3>,
        pos: &Positions<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
        dropout: bool,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let rep = h / kvh;
        let [q, k, v] = self.project_qkv(x, dropout);
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) if self.qk_norm_whole => (qn.forward(q), kn.forward(k)),
            _ => (q, k),
        };
        let q = q.reshape([b, t, h, hd]);
        let k = k.reshape([b, t, kvh, hd]);
        let v = v.reshape([b, t, kvh, hd]);
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) if !self.qk_norm_whole => (qn.forward(q), kn.forward(k)),
            _ => (q, k),
        };
        let (q_rope, k_rope) = match &pos.local_rope {
            Some((q, k)) if self.sliding_window > 0 => (q, k),
            _ => (&pos.q_rope, &pos.k_rope),
        };
        let (q, k) = match self.rope {
            true => (rope_part(q, q_rope), rope_part(k, k_rope)),
            false => (q, k),
        };
        let q = match self.q_scale {
            1.0 => q,
            f => q.mul_scalar(f),
        };
        // Grouped-query attention without copying keys and values per query
        // head: the `rep` query heads sharing a kv head are stacked token by
        // token along the query axis (row `i * rep + r`), so the mask stays
        // causal along it and the attention can skip what it hides.
        let q = swap_heads(q.reshape([b, t, kvh, rep * hd])).reshape([b, kvh, t * rep, hd]);
        let (k, v) = (swap_heads(k), swap_heads(v));
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let kv = match slot.take() {
                    None => (k, v),
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                };
                // A sliding layer's later tokens see only its last `window`
                // keys (valid ones: padding is at the start of a row).
                let held = kv.0.dims()[2];
                *slot = Some(match self.sliding_window {
                    w if w > 0 && held > w => (
                        kv.0.clone().narrow(2, held - w, w),
                        kv.1.clone().narrow(2, held - w, w),
                    ),
                    _ => kv.clone(),
                });
                kv
            }
        };
        let s = k.dims()[2];
        let (mask, window) = match &pos.window {
            Some((w, m)) if self.sliding_window > 0 => {
                debug_assert_eq!(*w, self.sliding_window);
                (m, *w)
            }
            _ => (&pos.mask, 0),
        };
        debug_assert_eq!(mask.dims()[3], s, "the mask covers the keys held");
        let mask = mask.clone().expand([b, kvh, t * rep, s]);
        let causal = Some(Causal {
            rep,
            past: s - t,
            window,
        });
        let [q, k, v] = match self.bf16 {
            true => [q, k, v].map(|x| x.cast(FloatDType::BF16)),
            false => [q, k, v],
        };
        let out = match &self.sinks {
            Some(sinks) => sink_attention(q, k, v, mask, causal, sinks.val()),
            None => masked_attention(q, k, v, mask, causal, cap(self.softcap)),
        };
        let out = match self.bf16 {
            true => out.cast(FloatDType::F32),
            false => out,
        };
        // [b, kvh, t, rep * hd] -> [b, t, kvh, rep * hd]: heads in HF's order.
        let out = swap_heads(out.reshape([b, kvh, t, rep * hd]));
        self.o_proj
            .forward_with(out.reshape([b, t, h * hd]), dropout)
    }
}

impl<B: ModelBackend> Mlp<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        dropout: bool,
        routing: Option<&mut Routing<B>>,
    ) -> Tensor<B, 3> {
        if let Some(router) = &self.gate {
            return self.forward_experts(router, x, dropout, routing);
        }
        let (gate, up) = match (&self.gate_up_proj, &self.gate_proj, &self.up_proj) {
            (Some(fused), _, _) => {
                let y = fused.forward_with(x, dropout);
                let n = y.dims()[2] / 2;
                (y.clone().narrow(2, 0, n), y.narrow(2, n, n))
            }
            (None, Some(gate), Some(up)) => (
                gate.forward_with(x.clone(), dropout),
                up.forward_with(x, dropout),
            ),
            _ => unreachable!("an MLP has gate and up projections, fused or not"),
        };
        let h = match self.gelu {
            true => geglu(gate, up),
            false => swiglu(gate, up),
        };
        let down = self.down_proj.as_ref();
        down.expect("a dense MLP has a down projection")
            .forward_with(h, dropout)
    }

    /// The mixture: each token's `top_k` experts by the router's softmax
    /// (ties to the lower index), their outputs summed with those
    /// probabilities as weights (rescaled to sum to 1 if `norm_topk_prob`).
    /// The routing is read back to the host, as transformers' `nonzero`
    /// does, to gather each expert's tokens.
    fn forward_experts(
        &self,
        router: &Linear<B>,
        x: Tensor<B, 3>,
        dropout: bool,
        routing: Option<&mut Routing<B>>,
    ) -> Tensor<B, 3> {
        let [b, t, h] = x.dims();
        let (n, e, k) = (b * t, self.experts.len(), self.top_k);
        let device = x.device();
        let x = x.reshape([n, h]);
        let probs = softmax(router.forward(x.clone()), 1);
        let host = probs.clone().into_data().convert::<f32>();
        let host = host.as_slice::<f32>().expect("f32 router probabilities");
        let mut picked = Vec::with_capacity(n * k);
        let mut order: Vec<usize> = (0..e).collect();
        for row in host.chunks(e) {
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
            picked.extend(order[..k].iter().map(|&i| i as i64));
        }
        if let Some(routing) = routing {
            routing.record(probs.clone(), &picked, k);
        }
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(picked.clone(), [n, k]), &device);
        let mut weights = probs.gather(1, ids);
        if self.norm_topk_prob {
            weights = weights.clone() / weights.sum_dim(1);
        }
        // (token, slot) pairs grouped by expert, in token order within each.
        let mut by_expert = vec![Vec::new(); e];
        for (j, &x) in picked.iter().enumerate() {
            by_expert[x as usize].push(j as i64);
        }
        let (mut rows, mut slots) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
        let mut outs = Vec::new();
        for (expert, picks) in self.experts.iter().zip(by_expert) {
            let (start, m) = (rows.len(), picks.len());
            if m == 0 {
                continue;
            }
            rows.extend(picks.iter().map(|j| j / k as i64));
            slots.extend(picks);
            let at = TensorData::new(rows[start..].to_vec(), [m]);
            let xe = x.clone().select(0, Tensor::from_data(at, &device));
            outs.push(expert.forward(xe, dropout));
        }
        let total = rows.len();
        let slots = Tensor::from_data(TensorData::new(slots, [total]), &device);
        let weights = weights
            .reshape([n * k])
            .select(0, slots)
            .reshape([total, 1]);
        let rows = Tensor::from_data(TensorData::new(rows, [total]), &device);
        let y = Tensor::cat(outs, 0) * weights;
        let mut out =
            Tensor::<B, 2>::zeros([n, h], &device).select_assign(0, rows, y, IndexingUpdateOp::Add);
        if let (Some(shared), Some(gate)) = (&self.shared_expert, &self.shared_expert_gate) {
            let scale = sigmoid(gate.forward_with(x.clone(), dropout));
            out = out + shared.forward(x, dropout) * scale;
        }
        out.reshape([b, t, h])
    }
}

impl<B: ModelBackend> DecoderLayer<B> {
    /// The layer's output; `dropout` switches the adapters' dropout on; a
    /// mixture of experts records its routing in `routing`.
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        pos: &Positions<B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
        dropout: bool,
        routing: Option<&mut Routing<B>>,
    ) -> Tensor<B, 3> {
        let normed = match &self.input_layernorm {
            Some(n) => n.forward(x.clone()),
            None => x.clone(),
        };
        let attn = self.self_attn.forward(normed, pos, cache, dropout);
        match (
            &self.pre_feedforward_layernorm,
            &self.post_feedforward_layernorm,
        ) {
            (Some(pre), Some(post)) => {
                let h = x + self.post_attention_layernorm.forward(attn);
                let mlp = self.mlp.forward(pre.forward(h.clone()), dropout, routing);
                h + post.forward(mlp)
            }
            (None, Some(post)) => {
                let h = x + self.post_attention_layernorm.forward(attn);
                let mlp = self.mlp.forward(h.clone(), dropout, routing);
                h + post.forward(mlp)
            }
            _ => {
                let h = x + attn;
                let normed = self.post_attention_layernorm.forward(h.clone());
                let mlp = self.mlp.forward(normed, dropout, routing);
                h + mlp
            }
        }
    }
}

impl<B: ModelBackend> CausalLm<B> {
    /// Inverse RoPE frequencies (`head_dim / 2` of them), Llama 3, linear or
    /// YaRN scaling applied.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f64> {
        if self.rope_yarn_factor > 0.0 {
            return self.yarn_inv_freq(head_dim);
        }
        unscaled_inv_freq(self.rope_theta, head_dim)
            .map(|f| {
                if self.rope_factor == 0.0 {
                    return f / self.rope_linear_factor;
                }
                let (factor, lo, hi, orig) = (
                    self.rope_factor,
                    self.rope_low_freq_factor,
                    self.rope_high_freq_factor,
                    self.rope_original_max,
                );
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let (low_wavelen, high_wavelen) = (orig / lo, orig / hi);
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / factor
                } else {
                    let smooth = (orig / wavelen - lo) / (hi - lo);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
    }

    /// YaRN's frequencies: the fast ones kept, the slow ones divided by
    /// `factor`, a linear ramp between (transformers'
    /// `_compute_yarn_parameters`).
    fn yarn_inv_freq(&self, head_dim: usize) -> Vec<f64> {
        let (dim, base, orig) = (
            head_dim as f64,
            self.rope_theta,
            self.rope_yarn_original_max,
        );
        let (beta_fast, beta_slow) = self.rope_yarn_betas;
        let correction_dim = |rotations: f64| {
            dim * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
        };
        let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
        if self.rope_yarn_truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001;
        }
        unscaled_inv_freq(base, head_dim)
            .enumerate()
            .map(|(i, f)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                f / self.rope_yarn_factor * (1.0 - keep) + f * keep
            })
            .collect()
    }

    /// The inverse frequencies of a forward pass whose positions reach
    /// `seq_len - 1`, over the rotated dimensions: [`Self::inv_freq`], or
    /// LongRoPE's, whose factors depend on `seq_len` (as transformers'
    /// `longrope_frequency_update`).
    fn rope_inv_freq(&self, seq_len: usize) -> Vec<f64> {
        if self.rope_longrope_original_max == 0 {
            return self.inv_freq(self.rotary_dim);
        }
        let stretch = match seq_len > self.rope_longrope_original_max {
            true => &self.rope_long_factor,
            false => &self.rope_short_factor,
        };
        unscaled_inv_freq(self.rope_theta, self.rotary_dim)
            .zip(stretch)
            .map(|(f, s)| f / s)
            .collect()
    }

    /// Gemma 3, OLMo 3: the inverse frequencies of sliding-window layers
    /// (their own base, unscaled), when their tables differ from the global
    /// ones (`global`, [`Self::inv_freq`], with its attention factor).
    fn local_inv_freq(&self, head_dim: usize, global: &[f64]) -> Option<Vec<f64>> {
        let sliding = self.layers.iter().any(|l| l.self_attn.sliding_window > 0);
        if self.rope_local_theta <= 0.0 || !sliding {
            return None;
        }
        let local: Vec<f64> = unscaled_inv_freq(self.rope_local_theta, head_dim).collect();
        (local != global || self.rope_attention_factor != 1.0).then_some(local)
    }

    /// The sliding window of the model's sliding layers, if it has any.
    pub fn sliding_window(&self) -> Option<usize> {
        self.layers
            .iter()
            .map(|l| l.self_attn.sliding_window)
            .find(|&w| w > 0)
    }

    /// Builds rotary tables and the attention mask.
    ///
    /// `positions[b]` are the RoPE positions of the new tokens of row `b`;
    /// `key_valid[b]` says, for every key (cached ones first, then the new
    /// tokens), whether it may be attended to. New token `i` sits at key index
    /// `past + i` and sees keys up to it; it always sees itself, so padding
    /// rows never produce NaNs. On sliding-window layers it sees only the
    /// last `window` of those keys: for rows without padding, keys after
    /// `past + i - window`, as transformers' mask has it; padding does not
    /// use up the window, so a padded row attends as it would alone. The
    /// window's mask covers only the keys a sliding layer's cache holds, the
    /// last `min(past, window)` cached keys and the new tokens.
    pub fn positions(
        &self,
        positions: &[Vec<usize>],
        key_valid: &[Vec<bool>],
        device: &B::Device,
    ) -> Positions<B> {
        let b = positions.len();
        let t = positions.first().map_or(0, Vec::len);
        let s = key_valid.first().map_or(0, Vec::len);
        let past = s - t;
        let window = self.sliding_window().filter(|&w| w < s);
        // Row `i` masks the keys before its first visible one, the invalid
        // keys from there to the token, none at it and every key after it:
        // slice copies and fills, not a test per key. The mask starts at key
        // `from`.
        let build = |from: usize, first: &dyn Fn(&[usize], usize) -> usize| {
            let mut mask = Vec::with_capacity(b * t * (s - from));
            for valid in key_valid {
                let invalid: Vec<bool> = valid.iter().map(|v| !v).collect();
                // seen[j]: valid keys before key j.
                let seen: Vec<usize> = std::iter::once(0)
                    .chain(valid.iter().scan(0, |n, &v| {
                        *n += usize::from(v);
                        Some(*n)
                    }))
                    .collect();
                for q in past..s {
                    let lo = first(&seen, q).max(from);
                    mask.resize(mask.len() + lo - from, true);
                    mask.extend_from_slice(&invalid[lo..q]);
                    mask.push(false);
                    mask.resize(mask.len() + s - q - 1, true);
                }
            }
            Tensor::<B, 4, Bool>::from_data(TensorData::new(mask, [b, 1, t, s - from]), device)
        };
        let mask = build(0, &|_, _| 0);
        // The first key `j` with at most `w - 1` valid keys in `j..q`. The
        // mask covers only the keys a sliding layer holds: its last `w`
        // cached ones (see `KvCache`) and the new tokens.
        let window = window.map(|w| {
            let first = move |seen: &[usize], q: usize| {
                let need = seen[q].saturating_sub(w - 1);
                seen[..=q].partition_point(|&n| n < need)
            };
            (w, build(past - past.min(w), &first))
        });
        let tokens = key_valid.iter().flat_map(|v| v[past..].to_vec()).collect();
        self.finish_positions(positions, mask, window, tokens, device)
    }

    /// Rotary tables and mask for packed rows: `segments[b][t]` names the
    /// sample each token belongs to; tokens attend only within their sample,
    /// causally (on sliding-window layers, to the last `window` tokens of
    /// it), and positions restart at 0 for each sample. Padding gets a
    /// segment of its own, `u32::MAX`. The labels of such
    /// rows must be -100 at every sample's first token, so that no token
    /// predicts across a sample boundary.
    pub fn positions_packed(&self, segments: &[Vec<u32>], device: &B::Device) -> Positions<B> {
        let b = segments.len();
        let t = segments.first().map_or(0, Vec::len);
        let starts: Vec<Vec<usize>> = segments
            .iter()
            .map(|row| {
                let mut start = 0;
                (0..t)
                    .map(|i| {
                        if i > 0 && row[i] != row[i - 1] {
                            start = i;
                        }
                        start
                    })
                    .collect()
            })
            .collect();
        // Row `i` allows only the keys from `first(i)` to itself.
        let build = |first: &dyn Fn(usize, usize) -> usize| {
            let mut mask = Vec::with_capacity(b * t * t);
            for row in &starts {
                for (i, &start) in row.iter().enumerate() {
                    let lo = first(start, i);
                    mask.resize(mask.len() + lo, true);
                    mask.resize(mask.len() + i + 1 - lo, false);
                    mask.resize(mask.len() + t - i - 1, true);
                }
            }
            Tensor::<B, 4, Bool>::from_data(TensorData::new(mask, [b, 1, t, t]), device)
        };
        let mask = build(&|start, _| start);
        let window = self
            .sliding_window()
            .filter(|&w| w < t)
            .map(|w| (w, build(&|start, i| start.max((i + 1).saturating_sub(w)))));
        // Each token's position is its offset from its sample's first token.
        let positions: Vec<Vec<usize>> = starts
            .iter()
            .map(|row| row.iter().enumerate().map(|(i, s)| i - s).collect())
            .collect();
        let tokens = segments.iter().flatten().map(|&s| s != u32::MAX).collect();
        self.finish_positions(&positions, mask, window, tokens, device)
    }

    /// Rotary tables for `positions`, and the masks (`[batch, 1, queries,
    /// keys]`) in the layout [`Attention::forward`] takes.
    fn finish_positions(
        &self,
        positions: &[Vec<usize>],
        mask: Tensor<B, 4, Bool>,
        window: Option<(usize, Tensor<B, 4, Bool>)>,
        tokens: Vec<bool>,
        device: &B::Device,
    ) -> Positions<B> {
        let [b, _, t, _] = mask.dims();
        let (kvh, h) = self
            .layers
            .first()
            .map_or((1, 1), |l| (l.self_attn.n_kv_heads, l.self_attn.n_heads));
        let rep = h / kvh;
        let scale = self.rope_attention_factor as f32;
        let seq_len = positions.iter().flatten().max().map_or(0, |p| p + 1);
        let global = self.rope_inv_freq(seq_len);
        let (q_rope, k_rope) = self.rope_tables(&global, scale, positions, kvh, rep, device);
        let local_rope = self
            .local_inv_freq(self.rotary_dim, &global)
            .map(|inv| self.rope_tables(&inv, 1.0, positions, kvh, rep, device));
        let grouped = |mask: Tensor<B, 4, Bool>| {
            if rep == 1 {
                mask
            } else {
                // One copy here instead of one per layer (a reshape of the
                // broadcast mask copies it).
                let keys = mask.dims()[3];
                let grouped = mask.unsqueeze_dim::<5>(3).expand([b, kvh, t, rep, keys]);
                Tensor::<B, 5, Bool>::from_primitive(B::dense_mask(grouped.into_primitive()))
                    .reshape([b, kvh, t * rep, keys])
            }
        };
        Positions {
            q_rope,
            k_rope,
            local_rope,
            mask: grouped(mask),
            window: window.map(|(w, m)| (w, grouped(m))),
            tokens,
        }
    }

    /// cos and sin `[batch, seq, heads, 2 * inv.len()]` (the rotated part of
    /// a head) of `positions` (the same for every head) at inverse
    /// frequencies `inv`, for the `kv_heads * rep`
    /// query heads and for the `kv_heads` kv heads: computed on the host once
    /// per distinct position, then gathered on the device.
    fn rope_tables(
        &self,
        inv: &[f64],
        scale: f32,
        positions: &[Vec<usize>],
        kv_heads: usize,
        rep: usize,
        device: &B::Device,
    ) -> (Rope<B>, Rope<B>) {
        let b = positions.len();
        let t = positions.first().map_or(0, Vec::len);
        let hd = 2 * inv.len();
        if b * t == 0 {
            let empty = |heads| {
                let e = Tensor::zeros([b, t, heads, hd], device);
                (e.clone(), e)
            };
            return (empty(kv_heads * rep), empty(kv_heads));
        }
        let mut distinct: Vec<usize> = positions.iter().flatten().copied().collect();
        distinct.sort_unstable();
        distinct.dedup();
        let mut cos = Vec::with_capacity(distinct.len() * hd);
        let mut sin = Vec::with_capacity(distinct.len() * hd);
        for &p in &distinct {
            // HF computes the angles in f32.
            let angles: Vec<f32> = inv.iter().map(|f| (*f as f32) * p as f32).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos() * scale));
                sin.extend(angles.iter().map(|a| a.sin() * scale));
            }
        }
        let n = distinct.len();
        let [cos, sin] = [cos, sin]
            .map(|table| Tensor::<B, 2>::from_data(TensorData::new(table, [n, hd]), device));
        let of_token: Vec<i64> = positions
            .iter()
            .flatten()
            .map(|p| distinct.partition_point(|d| d < p) as i64)
            .collect();
        let gather = |heads: usize| {
            let rows: Vec<i64> = of_token
                .iter()
                .flat_map(|&row| std::iter::repeat_n(row, heads))
                .collect();
            let rows =
                Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [b * t * heads]), device);
            let [cos, sin] = [&cos, &sin].map(|table| {
                table
                    .clone()
                    .select(0, rows.clone())
                    .reshape([b, t, heads, hd])
            });
            (cos, sin)
        };
        let k_rope = gather(kv_heads);
        let q_rope = if rep == 1 {
            k_rope.clone()
        } else {
            gather(kv_heads * rep)
        };
        (q_rope, k_rope)
    }

    /// Switches bf16 mixed precision on or off: matmuls and attention compute
    /// in bf16 while weights, norms, softmax statistics and the loss stay f32,
    /// as under `torch.autocast(dtype=torch.bfloat16)` with f32 master weights.
    pub fn set_bf16(&mut self, on: bool) {
        self.bf16 = on;
        if let Some(head) = &mut self.lm_head {
            head.bf16 = on;
        }
        for layer in &mut self.layers {
            layer.self_attn.bf16 = on;
            for (_, lin) in layer.projections_mut() {
                lin.bf16 = on;
            }
            let moe = &mut layer.mlp;
            let experts = moe.experts.iter_mut().flat_map(Expert::projections_mut);
            for lin in moe.gate.iter_mut().chain(experts) {
                lin.bf16 = on;
            }
        }
    }

    /// Casts every weight that trains (one that requires a gradient) and is
    /// held in another dtype back to f32, losslessly: what
    /// [`Holding::Bf16WhereExact`] loaded in bf16 and then attaching
    /// adapters or freezing left trainable; the optimizer updates f32
    /// master weights. A weight that does not train stays as it is held.
    pub fn trainable_in_f32(self) -> Self {
        self.map(&mut TrainableInF32)
    }

    /// The weights held in bf16 (see [`Holding`]): how many, and their bytes.
    pub fn held_in_bf16(&self) -> (usize, u64) {
        let mut count = HeldInBf16::default();
        self.visit(&mut count);
        (count.tensors, count.bytes)
    }

    /// Final hidden states `[batch, seq, hidden]` (after the last norm).
    /// LoRA dropout is on while the backend tracks gradients, its masks drawn
    /// from the backend's generator in layer order.
    pub fn forward_hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        pos: &Positions<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.hidden(ids, pos, cache, None, None)
    }

    /// The mean loss of a training micro-batch (as [`Self::loss`], on the
    /// rows that `pos` describes) with LoRA dropout on, each layer's masks
    /// drawn from a seed of its own derived from `seed`, so that gradient
    /// checkpointing, which runs a layer twice, draws the same masks both
    /// times and as this does.
    pub fn train_loss(
        &self,
        ids: &[Vec<u32>],
        pos: &Positions<B>,
        labels: &[Vec<i64>],
        seed: u64,
    ) -> (Tensor<B, 1>, usize) {
        let ids = Self::ids_tensor(ids, &self.embed_tokens.device());
        let mut routing = (self.router_aux_loss_coef > 0.0).then(|| pos.routing());
        let hidden = self.hidden(ids, pos, None, Some(seed), routing.as_mut());
        self.with_aux_loss(self.loss_from_hidden(hidden, labels), routing)
    }

    /// `(loss, k)` with the routers' load-balancing loss times
    /// [`Self::router_aux_loss_coef`] added, when it is on: transformers'
    /// loss with `output_router_logits`.
    fn with_aux_loss(
        &self,
        (loss, k): (Tensor<B, 1>, usize),
        routing: Option<Routing<B>>,
    ) -> (Tensor<B, 1>, usize) {
        match routing.and_then(|r| r.loss(self.router_aux_loss_coef)) {
            Some(aux) if k > 0 => (loss + aux, k),
            _ => (loss, k),
        }
    }

    /// [`Self::forward_hidden`]; with a `seed`, dropout is on and each
    /// layer's masks come from [`Self::seed_layer`].
    fn hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        pos: &Positions<B>,
        mut cache: Option<&mut KvCache<B>>,
        seed: Option<u64>,
        mut routing: Option<&mut Routing<B>>,
    ) -> Tensor<B, 3> {
        let device = ids.device();
        let dropout = seed.is_some() || B::ad_enabled(&device);
        let mut x = self.embed(ids);
        if let Some(seed) = seed {
            x = self.neftune(x, seed);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            if let Some(seed) = seed {
                Self::seed_layer(&device, seed, l);
            }
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            x = layer.forward(x, pos, slot, dropout, routing.as_deref_mut());
        }
        self.norm.forward(x)
    }

    /// Training embeddings `x` `[batch, seq, hidden]` of a micro-batch seeded
    /// `seed` with NEFTune's noise added (as transformers' hook: uniform in
    /// `±alpha / sqrt(seq * hidden)`, `seq` the padded length), or `x` when
    /// `neftune_noise_alpha` is 0. The noise has a seed of its own, so a
    /// recomputation draws the same.
    pub fn neftune<B2: Backend>(&self, x: Tensor<B2, 3>, seed: u64) -> Tensor<B2, 3> {
        if self.neftune_noise_alpha <= 0.0 {
            return x;
        }
        let [_, t, h] = x.dims();
        let mag = self.neftune_noise_alpha / ((t * h) as f64).sqrt();
        let device = x.device();
        B2::seed(&device, layer_seed(seed, self.layers.len()));
        let noise = Tensor::random(
            x.shape(),
            burn::tensor::Distribution::Uniform(-mag, mag),
            &device,
        );
        x + noise
    }

    /// The input embeddings of `ids` (scaled for Gemma).
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = to_f32(embedding(self.embed_tokens.val(), ids));
        match self.embed_scale {
            1.0 => x,
            f => x.mul_scalar(f),
        }
    }

    /// Seeds the backend's generator for layer `l`'s dropout masks in a
    /// micro-batch seeded `seed`.
    pub(crate) fn seed_layer(device: &B::Device, seed: u64, l: usize) {
        B::seed(device, layer_seed(seed, l));
    }

    /// Projects hidden states to vocabulary logits.
    pub fn lm_head<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        to_f32(self.lm_head_native(hidden))
    }

    /// [`Self::lm_head`] in the dtype its matmul ran in (bf16 under mixed
    /// precision), for the loss, which reads it in f32 without a copy.
    fn lm_head_native<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        let logits = match &self.lm_head {
            Some(head) => head.forward_native(hidden),
            None => project_native(hidden, self.embed_tokens.val().transpose(), None, self.bf16),
        };
        self.cap_logits(logits)
    }

    /// Logits as the model gives them: soft-capped where it caps them
    /// (Gemma 2), unchanged otherwise.
    pub fn cap_logits<const D: usize>(&self, logits: Tensor<B, D>) -> Tensor<B, D> {
        match cap(self.final_softcap) {
            Some(c) => softcap(logits, c),
            None => logits,
        }
    }

    /// The LM head as a contiguous `[hidden, vocab]` matrix and its bias, for
    /// inference: with tied embeddings the transposed view would otherwise be
    /// copied by the backend at every decoding step.
    pub fn inference_head(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        match &self.lm_head {
            Some(head) => (head.weight.val(), head.bias.as_ref().map(|b| b.val())),
            None => {
                let w = self.embed_tokens.val().detach();
                let device = w.device();
                let [v, h] = w.dims();
                let t = host(w.into_data(), true);
                (
                    Tensor::from_data(TensorData::new(t.data, [h, v]), &device),
                    None,
                )
            }
        }
    }

    /// Token ids `[batch][seq]` (rows of equal length) as a tensor.
    pub fn ids_tensor(ids: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        let flat: Vec<i64> = ids.iter().flatten().map(|&x| x as i64).collect();
        Tensor::from_data(TensorData::new(flat, [b, t]), device)
    }

    /// Logits `[batch, seq, vocab]` of a right-padded batch (`mask[b][t]` is
    /// false on padding), positions counted from 0 as transformers does.
    pub fn logits(&self, ids: &[Vec<u32>], mask: &[Vec<bool>]) -> Tensor<B, 3> {
        let device = self.embed_tokens.device();
        let pos = self.positions(&arange_rows(ids), mask, &device);
        let hidden = self.forward_hidden(Self::ids_tensor(ids, &device), &pos, None);
        self.lm_head(hidden)
    }

    /// Mean cross-entropy over the tokens whose label is not -100, position `t`
    /// predicting `labels[t + 1]`. Logits are computed only at those positions,
    /// so the full `[batch, seq, vocab]` tensor is never materialised.
    /// Returns the loss and the number of counted tokens.
    pub fn loss(
        &self,
        ids: &[Vec<u32>],
        mask: &[Vec<bool>],
        labels: &[Vec<i64>],
    ) -> (Tensor<B, 1>, usize) {
        let device = self.embed_tokens.device();
        let pos = self.positions(&arange_rows(ids), mask, &device);
        let mut routing = (self.router_aux_loss_coef > 0.0).then(|| pos.routing());
        let ids = Self::ids_tensor(ids, &device);
        let hidden = self.hidden(ids, &pos, None, None, routing.as_mut());
        self.with_aux_loss(self.loss_from_hidden(hidden, labels), routing)
    }

    /// [`CausalLm::loss`] from hidden states already computed.
    pub fn loss_from_hidden(
        &self,
        hidden: Tensor<B, 3>,
        labels: &[Vec<i64>],
    ) -> (Tensor<B, 1>, usize) {
        let [b, t, d] = hidden.dims();
        let device = hidden.device();
        let (rows, targets) = shifted_targets(labels, t);
        let n = rows.len();
        if n == 0 {
            return (Tensor::zeros([1], &device), 0);
        }
        let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &device);
        let picked = hidden.reshape([b * t, d]).select(0, rows);
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
        (self.head_loss(picked, targets), n)
    }

    /// The mean loss of the LM head on `hidden: [n, d]` against `targets:
    /// [n, 1]`. A plain head matrix (tied or not, without bias or adapter)
    /// goes through the fused [`linear_cross_entropy`], which never holds
    /// all the logits; others compute the logits, then the loss.
    fn head_loss(&self, hidden: Tensor<B, 2>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let softcap = cap(self.final_softcap);
        let (w, bf16) = match &self.lm_head {
            None => (self.embed_tokens.val().transpose(), self.bf16),
            Some(head) if head.bias.is_none() && head.lora.is_none() => {
                (head.weight.val(), head.bf16)
            }
            Some(_) => return cross_entropy(self.lm_head_native(hidden), targets).mean(),
        };
        if bf16 {
            let bf = FloatDType::BF16;
            return linear_cross_entropy(hidden.cast(bf), w.cast(bf), targets, softcap);
        }
        linear_cross_entropy(hidden, w, targets, softcap)
    }

    /// Final hidden states `[n, hidden]` at the `n` positions whose next
    /// label counts, with those targets and their `(row, position)`
    /// (position `t` predicts `t + 1`). [`Self::lm_head`] gives their logits;
    /// over a large vocabulary, a chunk of rows at a time.
    pub fn counted_hidden(
        &self,
        ids: &[Vec<u32>],
        mask: &[Vec<bool>],
        labels: &[Vec<i64>],
    ) -> Option<Counted<B>> {
        let device = self.embed_tokens.device();
        let pos = self.positions(&arange_rows(ids), mask, &device);
        let hidden = self.forward_hidden(Self::ids_tensor(ids, &device), &pos, None);
        let [b, t, d] = hidden.dims();
        let (rows, targets) = shifted_targets(labels, t);
        let n = rows.len();
        if n == 0 {
            return None;
        }
        let at = rows
            .iter()
            .map(|&r| (r as usize / t, r as usize % t))
            .collect();
        let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &device);
        let picked = hidden.reshape([b * t, d]).select(0, rows);
        Some((picked, targets, at))
    }
}

impl<B: Backend> CausalLm<B> {
    /// Builds the module from HF-named tensors; every tensor must be used.
    /// Every weight is held in f32.
    pub fn from_tensors(
        config: &ModelConfig,
        tensors: BTreeMap<String, HostTensor>,
        device: &B::Device,
    ) -> anyhow::Result<Self> {
        Self::from_tensors_held(config, tensors, device, Holding::F32)
    }

    /// [`Self::from_tensors`], holding the projection weights and the
    /// embedding as `holding` says.
    pub fn from_tensors_held(
        config: &ModelConfig,
        mut tensors: BTreeMap<String, HostTensor>,
        device: &B::Device,
        holding: Holding,
    ) -> anyhow::Result<Self> {
        let c = config;
        let (hidden, inter, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let q_out = c.num_attention_heads * hd;
        let kv_out = c.num_key_value_heads * hd;
        let mut take = |name: &str, shape: &[usize]| -> anyhow::Result<HostTensor> {
            let t = tensors.remove(name).ok_or_else(|| {
                anyhow::anyhow!("checkpoint has no tensor '{name}' (expected shape {shape:?})")
            })?;
            if t.shape != shape {
                bail!(
                    "tensor '{name}' has shape {:?}, but config.json implies {shape:?}",
                    t.shape
                );
            }
            Ok(t)
        };
        let p1 = |t: HostTensor| Param::from_tensor(tensor1::<B>(t, device));
        let p2 = |t: HostTensor| Param::from_tensor(tensor2::<B>(t, device));
        let held = |t: HostTensor| match holding {
            Holding::Bf16WhereExact if exactly_bf16(&t.data) => {
                Param::from_tensor(tensor2_bf16::<B>(t, device))
            }
            _ => p2(t),
        };
        let lin = |take: &mut dyn FnMut(&str, &[usize]) -> anyhow::Result<HostTensor>,
                   prefix: &str,
                   inp: usize,
                   out: usize,
                   bias: bool|
         -> anyhow::Result<Linear<B>> {
            let w = take(&format!("{prefix}.weight"), &[out, inp])?.transposed();
            let b = if bias {
                Some(p1(take(&format!("{prefix}.bias"), &[out])?))
            } else {
                None
            };
            Ok(Linear {
                weight: held(w),
                bias: b,
                lora: None,
                bf16: false,
            })
        };
        let embed = take("model.embed_tokens.weight", &[c.vocab_size, hidden])?;
        let (gemma, fused) = (c.arch.gemma(), c.arch.fused());
        let (whole, post_only) = (c.arch.qk_norm_whole(), c.arch.post_norms_only());
        let norm = |t: HostTensor| RmsNorm {
            weight: p1(t),
            eps: c.rms_norm_eps,
            offset: if gemma { 1.0 } else { 0.0 },
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ab = c.attention_bias;
            let mb = c.mlp_bias;
            let mut unfused = |name: &str, out: usize| match fused {
                true => Ok(None),
                false => {
                    lin(&mut take, &format!("{p}.self_attn.{name}"), hidden, out, ab).map(Some)
                }
            };
            let (q_proj, k_proj, v_proj) = (
                unfused("q_proj", q_out)?,
                unfused("k_proj", kv_out)?,
                unfused("v_proj", kv_out)?,
            );
            let qkv_proj = match fused {
                true => Some(lin(
                    &mut take,
                    &format!("{p}.self_attn.qkv_proj"),
                    hidden,
                    q_out + 2 * kv_out,
                    false,
                )?),
                false => None,
            };
            let attn = Attention {
                q_proj,
                k_proj,
                v_proj,
                qkv_proj,
                o_proj: lin(
                    &mut take,
                    &format!("{p}.self_attn.o_proj"),
                    q_out,
                    hidden,
                    ab && matches!(
                        c.arch,
                        Arch::Llama
                            | Arch::Qwen3
                            | Arch::Gemma2
                            | Arch::Gemma3
                            | Arch::SmolLm3
                            | Arch::Olmo2
                            | Arch::Olmo3
                            | Arch::GptOss
                    ),
                )?,
                q_norm: match c.arch.qk_norm() {
                    true => Some(norm(take(
                        &format!("{p}.self_attn.q_norm.weight"),
                        &[if whole { q_out } else { hd }],
                    )?)),
                    false => None,
                },
                k_norm: match c.arch.qk_norm() {
                    true => Some(norm(take(
                        &format!("{p}.self_attn.k_norm.weight"),
                        &[if whole { kv_out } else { hd }],
                    )?)),
                    false => None,
                },
                qk_norm_whole: whole,
                n_heads: c.num_attention_heads,
                n_kv_heads: c.num_key_value_heads,
                head_dim: hd,
                sliding_window: match c.sliding_layers.get(i) {
                    Some(true) => c.sliding_window.unwrap_or(0),
                    _ => 0,
                },
                q_scale: c
                    .query_pre_attn_scalar
                    .map_or(1.0, |s| (hd as f64 / s).sqrt()),
                softcap: c.attn_logit_softcapping.unwrap_or(0.0),
                rope: c.rope_layers.get(i).copied().unwrap_or(true),
                bf16: false,
                sinks: match c.arch.attention_sinks() {
                    true => Some(p1(take(
                        &format!("{p}.self_attn.sinks"),
                        &[c.num_attention_heads],
                    )?)),
                    false => None,
                },
            };
            let gelu = c.activation == Activation::GeluTanh;
            let mlp = match c.moe.as_ref().filter(|m| m.sparse_layers[i]) {
                None => {
                    let mut unfused = |name: &str| match fused {
                        true => Ok(None),
                        false => {
                            lin(&mut take, &format!("{p}.mlp.{name}"), hidden, inter, mb).map(Some)
                        }
                    };
                    let (gate_proj, up_proj) = (unfused("gate_proj")?, unfused("up_proj")?);
                    let gate_up_proj = match fused {
                        true => Some(lin(
                            &mut take,
                            &format!("{p}.mlp.gate_up_proj"),
                            hidden,
                            2 * inter,
                            false,
                        )?),
                        false => None,
                    };
                    let down_proj =
                        lin(&mut take, &format!("{p}.mlp.down_proj"), inter, hidden, mb)?;
                    Mlp {
                        gate_proj,
                        up_proj,
                        gate_up_proj,
                        down_proj: Some(down_proj),
                        gelu,
                        gate: None,
                        experts: Vec::new(),
                        top_k: 0,
                        norm_topk_prob: false,
                        shared_expert: None,
                        shared_expert_gate: None,
                    }
                }
                Some(moe) => {
                    let (block, [gate, up, down]) = c.arch.expert_names();
                    let ei = moe.expert_intermediate_size;
                    let prefix = format!("{p}.{block}");
                    let eb = moe.expert_bias;
                    let router = lin(
                        &mut take,
                        &format!("{prefix}.gate"),
                        hidden,
                        moe.num_experts,
                        eb,
                    )?;
                    let (alpha, limit) = moe.swiglu_clamp.unwrap_or((0.0, 0.0));
                    let experts = (0..moe.num_experts)
                        .map(|x| {
                            let at = format!("{prefix}.experts.{x}");
                            Ok(Expert {
                                gate_proj: lin(&mut take, &format!("{at}.{gate}"), hidden, ei, eb)?,
                                up_proj: lin(&mut take, &format!("{at}.{up}"), hidden, ei, eb)?,
                                down_proj: lin(&mut take, &format!("{at}.{down}"), ei, hidden, eb)?,
                                gate_up_lora: None,
                                swiglu_limit: limit,
                                swiglu_alpha: alpha,
                            })
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let (shared_expert, shared_expert_gate) =
                        match moe.shared_expert_intermediate_size {
                            None => (None, None),
                            Some(si) => {
                                let at = format!("{prefix}.shared_expert");
                                let expert = Expert {
                                    gate_proj: lin(
                                        &mut take,
                                        &format!("{at}.gate_proj"),
                                        hidden,
                                        si,
                                        false,
                                    )?,
                                    up_proj: lin(
                                        &mut take,
                                        &format!("{at}.up_proj"),
                                        hidden,
                                        si,
                                        false,
                                    )?,
                                    down_proj: lin(
                                        &mut take,
                                        &format!("{at}.down_proj"),
                                        si,
                                        hidden,
                                        false,
                                    )?,
                                    gate_up_lora: None,
                                    swiglu_limit: 0.0,
                                    swiglu_alpha: 0.0,
                                };
                                let gate = lin(
                                    &mut take,
                                    &format!("{prefix}.shared_expert_gate"),
                                    hidden,
                                    1,
                                    false,
                                )?;
                                (Some(expert), Some(gate))
                            }
                        };
                    Mlp {
                        gate_proj: None,
                        up_proj: None,
                        gate_up_proj: None,
                        down_proj: None,
                        gelu,
                        gate: Some(router),
                        experts,
                        top_k: moe.top_k,
                        norm_topk_prob: moe.norm_topk_prob,
                        shared_expert,
                        shared_expert_gate,
                    }
                }
            };
            let mut norm_if = |name: &str, has: bool| -> anyhow::Result<Option<RmsNorm<B>>> {
                match has {
                    true => Ok(Some(norm(take(&format!("{p}.{name}.weight"), &[hidden])?))),
                    false => Ok(None),
                }
            };
            let input_layernorm = norm_if("input_layernorm", !post_only)?;
            let pre_feedforward_layernorm = norm_if("pre_feedforward_layernorm", gemma)?;
            let post_feedforward_layernorm =
                norm_if("post_feedforward_layernorm", gemma || post_only)?;
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn: attn,
                post_attention_layernorm: norm(take(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[hidden],
                )?),
                pre_feedforward_layernorm,
                post_feedforward_layernorm,
                mlp,
            });
        }
        let norm = norm(take("model.norm.weight", &[hidden])?);
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still carry a copy of the head; transformers ignores it.
            tensors.remove("lm_head.weight");
            None
        } else {
            Some(lin(&mut take, "lm_head", hidden, c.vocab_size, false)?)
        };
        tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
        if let Some(name) = tensors.keys().next() {
            bail!(
                "checkpoint has an unexpected tensor '{name}' ({} unexpected in all) for a {} model \
                 with the sizes in config.json",
                tensors.len(),
                c.arch.model_type()
            );
        }
        let scaling = c.rope_scaling;
        Ok(CausalLm {
            embed_tokens: held(embed),
            layers,
            norm,
            lm_head,
            rope_theta: c.rope_theta,
            rope_factor: scaling.map_or(0.0, |s| s.factor),
            rope_low_freq_factor: scaling.map_or(0.0, |s| s.low_freq_factor),
            rope_high_freq_factor: scaling.map_or(0.0, |s| s.high_freq_factor),
            rope_original_max: scaling.map_or(0.0, |s| s.original_max_position_embeddings),
            rope_linear_factor: c.rope_linear_factor.unwrap_or(1.0),
            rope_yarn_factor: c.rope_yarn.map_or(0.0, |y| y.factor),
            rope_yarn_original_max: c
                .rope_yarn
                .map_or(0.0, |y| y.original_max_position_embeddings),
            rope_yarn_betas: c
                .rope_yarn
                .map_or((0.0, 0.0), |y| (y.beta_fast, y.beta_slow)),
            rope_yarn_truncate: c.rope_yarn.is_none_or(|y| y.truncate),
            rope_attention_factor: match (&c.rope_yarn, &c.rope_longrope) {
                (Some(y), _) => y.attention_factor,
                (None, Some(l)) => l.attention_factor,
                (None, None) => 1.0,
            },
            rope_local_theta: c.rope_local_theta.unwrap_or(0.0),
            rope_short_factor: c
                .rope_longrope
                .as_ref()
                .map_or(Vec::new(), |l| l.short_factor.clone()),
            rope_long_factor: c
                .rope_longrope
                .as_ref()
                .map_or(Vec::new(), |l| l.long_factor.clone()),
            rope_longrope_original_max: c
                .rope_longrope
                .as_ref()
                .map_or(0, |l| l.original_max_position_embeddings),
            rotary_dim: c.rotary_dim,
            // transformers keeps the scale in the weights' dtype (f32 here).
            embed_scale: match gemma {
                true => (hidden as f32).sqrt() as f64,
                false => 1.0,
            },
            bf16: false,
            neftune_noise_alpha: 0.0,
            final_softcap: c.final_logit_softcapping.unwrap_or(0.0),
            expert_names: c.arch.expert_names(),
            gate_up_interleaved: c.arch == Arch::GptOss,
            router_aux_loss_coef: c.moe.as_ref().map_or(0.0, |m| m.router_aux_loss_coef),
        })
    }

    /// The distinct names of the layers' projections (`q_proj`, ...,
    /// `shared_expert_gate`), in the order of Hugging Face's modules: what
    /// LoRA can target.
    pub fn projection_names(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for layer in &self.layers {
            for (name, _) in layer.projections() {
                let short = name.rsplit_once('.').map_or(name, |(_, short)| short);
                if !out.contains(&short) {
                    out.push(short);
                }
            }
        }
        out
    }

    /// The weights under their HF names, in HF layout.
    pub fn to_tensors(&self) -> BTreeMap<String, HostTensor> {
        let mut out = BTreeMap::new();
        let put1 = |out: &mut BTreeMap<String, HostTensor>, name: String, t: Tensor<B, 1>| {
            out.insert(name, host(t.into_data(), false));
        };
        let put_lin = |out: &mut BTreeMap<String, HostTensor>, prefix: String, l: &Linear<B>| {
            out.insert(
                format!("{prefix}.weight"),
                host(l.weight.val().into_data(), true),
            );
            if let Some(b) = &l.bias {
                out.insert(format!("{prefix}.bias"), host(b.val().into_data(), false));
            }
        };
        out.insert(
            "model.embed_tokens.weight".into(),
            host(self.embed_tokens.val().into_data(), false),
        );
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            if let Some(n) = &l.input_layernorm {
                put1(
                    &mut out,
                    format!("{p}.input_layernorm.weight"),
                    n.weight.val(),
                );
            }
            put1(
                &mut out,
                format!("{p}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.weight.val(),
            );
            for (name, n) in [
                ("pre_feedforward_layernorm", &l.pre_feedforward_layernorm),
                ("post_feedforward_layernorm", &l.post_feedforward_layernorm),
            ] {
                if let Some(n) = n {
                    put1(&mut out, format!("{p}.{name}.weight"), n.weight.val());
                }
            }
            let a = &l.self_attn;
            if let Some(sinks) = &a.sinks {
                put1(&mut out, format!("{p}.self_attn.sinks"), sinks.val());
            }
            for (name, n) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
                if let Some(n) = n {
                    put1(
                        &mut out,
                        format!("{p}.self_attn.{name}.weight"),
                        n.weight.val(),
                    );
                }
            }
            for (name, lin) in l.projections() {
                put_lin(&mut out, format!("{p}.{name}"), lin);
            }
            if let Some(router) = &l.mlp.gate {
                let (block, [gate, up, down]) = self.expert_names;
                put_lin(&mut out, format!("{p}.{block}.gate"), router);
                for (x, expert) in l.mlp.experts.iter().enumerate() {
                    for (name, lin) in [
                        (gate, &expert.gate_proj),
                        (up, &expert.up_proj),
                        (down, &expert.down_proj),
                    ] {
                        put_lin(&mut out, format!("{p}.{block}.experts.{x}.{name}"), lin);
                    }
                }
            }
        }
        put1(&mut out, "model.norm.weight".into(), self.norm.weight.val());
        if let Some(head) = &self.lm_head {
            put_lin(&mut out, "lm_head".into(), head);
        }
        out
    }
}

/// Hidden states at counted positions, their targets, and `(row, position)`
/// of each.
pub type Counted<B> = (Tensor<B, 2>, Vec<i64>, Vec<(usize, usize)>);

/// RoPE's inverse frequencies `theta^(-2i / head_dim)`, `head_dim / 2` of
/// them, before any scaling.
fn unscaled_inv_freq(theta: f64, head_dim: usize) -> impl Iterator<Item = f64> {
    (0..head_dim / 2).map(move |i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
}

/// RoPE on the first dimensions of each head of `x` (`[b, t, heads,
/// head_dim]`), as many as the tables are wide; the rest pass through.
fn rope_part<B: ModelBackend>(x: Tensor<B, 4>, (cos, sin): &Rope<B>) -> Tensor<B, 4> {
    let (rotated, whole) = (cos.dims()[3], x.dims()[3]);
    if rotated == whole {
        return rope(x, cos, sin);
    }
    let turned = rope(x.clone().narrow(3, 0, rotated), cos, sin);
    Tensor::cat(vec![turned, x.narrow(3, rotated, whole - rotated)], 3)
}

/// A soft cap held as a module field (0: none).
fn cap(c: f64) -> Option<f32> {
    (c > 0.0).then_some(c as f32)
}

/// The seed of layer `l`'s dropout masks in a micro-batch seeded `seed`
/// (SplitMix64's finaliser, so neighbouring layers and seeds get unrelated
/// streams).
fn layer_seed(seed: u64, l: usize) -> u64 {
    rng::mix(seed ^ (l as u64 + 1).wrapping_mul(rng::GAMMA))
}

/// `(flat row index b * t + i, target)` for every position whose next label counts.
pub fn shifted_targets(labels: &[Vec<i64>], t: usize) -> (Vec<i64>, Vec<i64>) {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (b, row) in labels.iter().enumerate() {
        for i in 0..t.saturating_sub(1) {
            let next = row.get(i + 1).copied().unwrap_or(-100);
            if next != -100 {
                rows.push((b * t + i) as i64);
                targets.push(next);
            }
        }
    }
    (rows, targets)
}

/// Positions `0..len` for each row.
pub fn arange_rows(ids: &[Vec<u32>]) -> Vec<Vec<usize>> {
    ids.iter().map(|r| (0..r.len()).collect()).collect()
}

fn tensor1<B: Backend>(t: HostTensor, device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(t.data, [t.shape[0]]), device)
}

fn tensor2<B: Backend>(t: HostTensor, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(t.data, [t.shape[0], t.shape[1]]), device)
}

struct TrainableInF32;

impl<B: Backend> ModuleMapper<B> for TrainableInF32 {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let t = param.val();
        if !t.is_require_grad() || t.dtype() == DType::F32 {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let f32 = tensor.cast(FloatDType::F32).detach().require_grad();
        Param::from_mapped_value(id, f32, mapper)
    }
}

#[derive(Default)]
struct HeldInBf16 {
    tensors: usize,
    bytes: u64,
}

impl<B: Backend> ModuleVisitor<B> for HeldInBf16 {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        if t.dtype() == DType::BF16 {
            self.tensors += 1;
            self.bytes += 2 * t.shape().num_elements() as u64;
        }
    }
}

/// `t` as a bf16 tensor; its values must all be bf16 values ([`exactly_bf16`]).
fn tensor2_bf16<B: Backend>(t: HostTensor, device: &B::Device) -> Tensor<B, 2> {
    let data: Vec<half::bf16> = t.data.iter().map(|&x| half::bf16::from_f32(x)).collect();
    Tensor::from_data(
        TensorData::new(data, [t.shape[0], t.shape[1]]),
        (device, DType::BF16),
    )
}

/// Whether every value is a bf16 value (its low 16 bits are zero), so that
/// holding it in bf16 loses nothing.
fn exactly_bf16(values: &[f32]) -> bool {
    values.iter().all(|x| x.to_bits() & 0xffff == 0)
}

/// How [`CausalLm::from_tensors_held`] holds projection weights and the
/// embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Every weight in f32.
    F32,
    /// A projection weight (attention, MLP, experts, router, separate LM
    /// head) and the embedding in bf16 when all its values are bf16
    /// values, as a checkpoint stored in bf16 has them; norms, biases and
    /// the rest in f32. Under bf16 mixed precision a projection rounds its
    /// weight to bf16 for every product anyway, and an embedding of bf16
    /// values looks up the same values widened, so the results, and a
    /// frozen weight saved back, are the same as with f32; the weight takes
    /// half the memory and is not cast again at every step. For weights
    /// that do not train (LoRA's base, frozen layers): see
    /// [`CausalLm::trainable_in_f32`].
    Bf16WhereExact,
}

/// A tensor's values back on the host, transposed when `transpose` (2-d only).
pub fn host(data: TensorData, transpose: bool) -> HostTensor {
    let shape = data.shape.to_vec();
    let values: Vec<f32> = data
        .convert::<f32>()
        .into_vec()
        .expect("float tensor converts to f32");
    let t = HostTensor {
        shape,
        data: values,
    };
    if transpose { t.transposed() } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::random_tensors;
    use burn::backend::Flex;
    use serde_json::json;

    /// One layer of `heads` query heads over `kv_heads`, head dim 8.
    fn net(heads: usize, kv_heads: usize) -> CausalLm<Flex> {
        let cfg = json!({
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": 8 * heads, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": 16,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
        });
        let config = ModelConfig::from_json(&cfg, std::path::Path::new("config.json")).unwrap();
        let tensors = random_tensors(&config, 0.02, 0);
        CausalLm::from_tensors(&config, tensors, &Default::default()).unwrap()
    }

    /// The mask as `[b][kv head][i * rep + r][key]` flattened, from the rule
    /// (`[b][1][t][key]` without grouped-query heads).
    fn expected(
        (b, kvh, rep, t, keys): (usize, usize, usize, usize, usize),
        allowed: impl Fn(usize, usize, usize) -> bool,
    ) -> Vec<bool> {
        let mut out = Vec::new();
        let groups = if rep == 1 { 1 } else { kvh };
        for row in 0..b {
            for _ in 0..groups {
                for i in 0..t {
                    for _ in 0..rep {
                        out.extend((0..keys).map(|j| !allowed(row, i, j)));
                    }
                }
            }
        }
        out
    }

    fn mask_of(p: &Positions<Flex>) -> Vec<bool> {
        p.mask.clone().into_data().into_vec().unwrap()
    }

    #[test]
    fn the_mask_follows_causality_key_validity_and_segments() {
        for (heads, kvh) in [(4, 2), (2, 2)] {
            let rep = heads / kvh;
            let net = net(heads, kvh);
            // Two new tokens after three cached keys; row 1 has its first
            // key invalid (left padding) and so does its last new token.
            let valid = vec![vec![true; 5], vec![false, true, true, true, false]];
            let positions = vec![vec![3, 4], vec![2, 3]];
            let p = net.positions(&positions, &valid, &Default::default());
            let want = expected((2, kvh, rep, 2, 5), |b, i, j| {
                j == 3 + i || (j < 3 + i && valid[b][j])
            });
            assert_eq!(mask_of(&p), want, "{heads} heads over {kvh}");

            let segments = vec![vec![0, 0, 1, 1, 1, 7], vec![2, 2, 2, 2, 5, 5]];
            let p = net.positions_packed(&segments, &Default::default());
            let want = expected((2, kvh, rep, 6, 6), |b, i, j| {
                j <= i && segments[b][j] == segments[b][i]
            });
            assert_eq!(mask_of(&p), want, "packed, {heads} heads over {kvh}");
        }
    }

    /// Sliding-window layers see the last `w` valid keys (their own
    /// included); the full mask is unchanged, and no window mask is built
    /// when it would hide nothing.
    #[test]
    fn the_window_mask_keeps_the_last_valid_keys() {
        for (heads, kvh) in [(4, 2), (2, 2)] {
            let rep = heads / kvh;
            let mut net = net(heads, kvh);
            let w = 3;
            net.layers[0].self_attn.sliding_window = w;
            assert_eq!(net.sliding_window(), Some(w));
            // Three new tokens after four cached keys; row 1 is left-padded by
            // two and has a padded key in the middle.
            let valid = vec![
                vec![true; 7],
                vec![false, false, true, false, true, true, true],
            ];
            let positions = vec![vec![4, 5, 6], vec![2, 3, 4]];
            let p = net.positions(&positions, &valid, &Default::default());
            let sees = |b: usize, i: usize, j: usize| j == 4 + i || (j < 4 + i && valid[b][j]);
            let visible_after =
                |b: usize, i: usize, j: usize| (j..=4 + i).filter(|&k| sees(b, i, k)).count();
            let full = expected((2, kvh, rep, 3, 7), sees);
            assert_eq!(mask_of(&p), full, "{heads} heads over {kvh}");
            // Over the keys a sliding layer holds: the last `w` cached ones
            // and the three new ones, keys 1 to 6.
            let want = expected((2, kvh, rep, 3, 6), |b, i, j| {
                sees(b, i, j + 1) && visible_after(b, i, j + 1) <= w
            });
            let (ww, m) = p.window.clone().expect("a window mask");
            assert_eq!(ww, w);
            assert_eq!(m.dims()[3], 6, "{heads} heads over {kvh}");
            assert_eq!(m.into_data().into_vec::<bool>().unwrap(), want);
            // Row 0 has no padding: transformers' rule, keys after `q - w`.
            let row0 = expected((1, kvh, rep, 3, 6), |_, i, j| {
                j < 4 + i && j + 1 + w > 4 + i
            });
            assert_eq!(want[..row0.len()], row0[..]);

            let segments = vec![vec![0, 0, 0, 0, 0, 7], vec![2, 2, 5, 5, 5, 5]];
            let p = net.positions_packed(&segments, &Default::default());
            let want = expected((2, kvh, rep, 6, 6), |b, i, j| {
                j <= i && j + w > i && segments[b][j] == segments[b][i]
            });
            let (_, m) = p.window.clone().expect("a window mask");
            assert_eq!(m.into_data().into_vec::<bool>().unwrap(), want, "packed");

            net.layers[0].self_attn.sliding_window = 7;
            let p = net.positions(&positions, &valid, &Default::default());
            assert!(
                p.window.is_none(),
                "a window as long as the keys hides none"
            );
        }
    }

    /// A sliding layer's cache keeps its last `w` keys, and decoding with it
    /// gives what one pass over every token gives.
    #[test]
    fn a_sliding_layer_caches_only_its_window() {
        let mut net = net(4, 2);
        let w = 3;
        net.layers[0].self_attn.sliding_window = w;
        let dev = Default::default();
        let ids: Vec<u32> = vec![1, 5, 7, 2, 9, 4, 3, 8, 6];
        let n = ids.len();
        let hidden = |ids: &[u32], from: usize, cache: Option<&mut KvCache<Flex>>| {
            let pos = net.positions(
                &[(from..from + ids.len()).collect()],
                &[vec![true; from + ids.len()]],
                &dev,
            );
            net.forward_hidden(
                CausalLm::<Flex>::ids_tensor(&[ids.to_vec()], &dev),
                &pos,
                cache,
            )
        };
        let whole = hidden(&ids, 0, None);
        let mut cache = KvCache::new(1);
        let prompt = 6;
        let mut got = vec![hidden(&ids[..prompt], 0, Some(&mut cache))];
        for i in prompt..n {
            let held = cache.layers[0].as_ref().map(|(k, _)| k.dims()[2]);
            assert_eq!(held, Some(w), "before token {i}");
            got.push(hidden(&ids[i..=i], i, Some(&mut cache)));
        }
        let got = Tensor::cat(got, 1);
        let diff = (got - whole).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }

    /// Sliding layers get tables of their own only when they differ from the
    /// global ones: another base (Gemma 3), or a scaled global RoPE (OLMo 3
    /// with YaRN); OLMo 3 without scaling shares the global tables.
    #[test]
    fn sliding_layers_get_their_own_rope_only_when_it_differs() {
        let mut net = net(2, 1);
        net.layers[0].self_attn.sliding_window = 3;
        let hd = net.rotary_dim;
        let local = |net: &CausalLm<Flex>| net.local_inv_freq(hd, &net.inv_freq(hd));
        net.rope_local_theta = net.rope_theta;
        assert_eq!(local(&net), None, "same base, unscaled");
        net.rope_attention_factor = 1.2;
        assert!(
            local(&net).is_some(),
            "global tables scaled by YaRN's factor"
        );
        net.rope_attention_factor = 1.0;
        net.rope_linear_factor = 4.0;
        assert!(local(&net).is_some(), "global frequencies scaled");
        net.rope_linear_factor = 1.0;
        net.rope_local_theta = net.rope_theta / 100.0;
        assert!(local(&net).is_some(), "another base");
        net.layers[0].self_attn.sliding_window = 0;
        assert_eq!(local(&net), None, "no sliding layer");
    }

    #[test]
    fn rope_tables_hold_each_tokens_own_angles() {
        let net = net(2, 1);
        let positions = vec![vec![0, 5, 6], vec![9, 5, 0]];
        let inv = net.inv_freq(8);
        let (q_rope, k_rope) = net.rope_tables(&inv, 1.0, &positions, 3, 2, &Default::default());
        for (heads, (cos, sin)) in [(6, q_rope), (3, k_rope)] {
            assert_eq!(cos.dims(), [2, 3, heads, 8]);
            let (cos, sin): (Vec<f32>, Vec<f32>) = (
                cos.into_data().into_vec().unwrap(),
                sin.into_data().into_vec().unwrap(),
            );
            for (k, &p) in positions.iter().flatten().enumerate() {
                for (head, d) in (0..heads).flat_map(|h| (0..8).map(move |d| (h, d))) {
                    let angle = (inv[d % 4] as f32) * p as f32;
                    let at = (k * heads + head) * 8 + d;
                    assert_eq!(
                        cos[at],
                        angle.cos(),
                        "cos at token {k}, head {head} of {heads}, dim {d}"
                    );
                    assert_eq!(
                        sin[at],
                        angle.sin(),
                        "sin at token {k}, head {head} of {heads}, dim {d}"
                    );
                }
            }
        }
    }
}
