//! The backend the model runs on: burn's ops plus the few the decoder, the
//! loss and the optimizer take as whole ops of their own, where burn's
//! composition costs extra passes, copies or kept tensors. Each op has a
//! tensor-op default that any backend runs; Flex overrides some with loops
//! of its own, and autodiff gives each its own backward pass. The ops live
//! in their modules (`attention`, `matmul`, `loss`, `rms_norm`, `swiglu`,
//! `optim`); this module only says which backend runs which.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{BoolTensor, FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{DType, TensorMetadata};

use super::attention::{self, Causal};

/// A backend the decoder runs on: [`ModelBackend::masked_attention`] plus the
/// ops the decoder and the optimizer take from the backend where burn's own
/// composition costs extra passes, copies or kept tensors (layouts, the
/// attention softmax, SwiGLU, the RMS norm, the projections' matmul, the
/// loss, the AdamW update). Each has a tensor-op default; Flex and autodiff
/// override some.
pub trait ModelBackend: Backend {
    /// Logits are computed a chunk of rows at a time, each chunk under this
    /// many elements ([`Self::linear_cross_entropy`], `detailed_metrics`):
    /// 256 MiB in f32 by default.
    const LOGIT_CHUNK_ELEMS: usize = 1 << 26;

    /// `softmax(q kᵀ / √head_dim, masked) v` on `q: [b, h, queries, d]`,
    /// `k, v: [b, h, keys, d]` and `mask: [b, h, queries, keys]` (`true` where
    /// attention is not allowed). Every query row must allow at least one key.
    /// With `causal`, the mask must hide every key after each row's token;
    /// the op may then skip them. With `softcap`, the scaled scores `s`
    /// become `softcap · tanh(s / softcap)` before the mask (Gemma 2).
    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        causal: Option<Causal>,
        softcap: Option<f32>,
    ) -> FloatTensor<Self>;

    /// [`Self::masked_attention`] (without soft-capping) where each query
    /// head has a learned sink (gpt-oss): `sinks: [heads]`, heads in the
    /// order of `q`'s rows (`causal.rep` heads per kv head stacked token by
    /// token, as the decoder lays them out), and each row's softmax also
    /// counts `exp(sink)`, for a key whose value is zero.
    fn sink_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        causal: Option<Causal>,
        sinks: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        attention::composed_with_sinks::<Self>(q, k, v, mask, causal, sinks)
    }

    /// `x: [a, b, c, d]` as `[a, c, b, d]` (heads to or from the second axis),
    /// laid out contiguously where the backend's later ops need it.
    fn swap_heads(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_swap_dims(x, 1, 2)
    }

    /// Attention probabilities `softmax(x)` over the last axis of the scores
    /// `s: [b, h, rows, keys]` (f32), `x = scale · s`, or with `softcap`,
    /// `x = softcap · tanh(scale · s / softcap)`, where `mask` (same shape,
    /// `true` where attention is not allowed) hides keys; a row masked whole
    /// gives zeros. With `softcap` and `keep`, also `tanh(scale · s /
    /// softcap)` in f32, for [`Self::attention_ds`].
    fn attention_probs(
        s: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f32,
        softcap: Option<f32>,
        keep: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        attention::probs_of::<Self>(s, mask, scale, softcap, keep)
    }

    /// [`Self::attention_probs`] without a cap, where each row's softmax
    /// also counts a sink logit, `sinks: [b, h, rows, 1]` (f32, not scaled),
    /// whose probability is left out (gpt-oss).
    fn attention_probs_with_sinks(
        s: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f32,
        sinks: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        attention::sink_probs_of::<Self>(s, mask, scale, sinks)
    }

    /// The scores' gradient `scale · p ∘ (dp − rowsum(p ∘ dp))` from the
    /// probabilities `p` and their gradient `dp` (f32, `[b, h, rows, keys]`),
    /// times `1 − tanh²` where the scores were soft-capped (`tanh` as
    /// [`Self::attention_probs`] kept it).
    fn attention_ds(
        p: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        scale: f32,
        tanh: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        attention::ds_of::<Self>(p, dp, scale, tanh)
    }

    /// `silu(gate) * up`, elementwise (see [`super::swiglu`]).
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        super::swiglu::swiglu_of::<Self>(gate, up)
    }

    /// The gradients `(d gate, d up)` of [`Self::swiglu`] given the output's
    /// gradient `dout`.
    fn swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        super::swiglu::swiglu_grad_of::<Self>(gate, up, dout)
    }

    /// gpt-oss's clamped SwiGLU, elementwise (see
    /// [`super::swiglu::clamped_swiglu`]).
    fn clamped_swiglu(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        alpha: f32,
        limit: f32,
    ) -> FloatTensor<Self> {
        super::swiglu::clamped_swiglu_of::<Self>(gate, up, alpha, limit)
    }

    /// The gradients `(d gate, d up)` of [`Self::clamped_swiglu`] given the
    /// output's gradient `dout`.
    fn clamped_swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        alpha: f32,
        limit: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        super::swiglu::clamped_swiglu_grad_of::<Self>(gate, up, dout, alpha, limit)
    }

    /// `gelu_tanh(gate) * up`, elementwise (see [`super::swiglu::geglu`]).
    fn geglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        super::swiglu::geglu_of::<Self>(gate, up)
    }

    /// The gradients `(d gate, d up)` of [`Self::geglu`] given the output's
    /// gradient `dout`.
    fn geglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        super::swiglu::geglu_grad_of::<Self>(gate, up, dout)
    }

    /// `w * x / sqrt(mean(x²) + eps)` over the last axis (see
    /// [`super::rms_norm`]).
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        super::rms_norm::rms_norm_of::<Self>(x, w, eps)
    }

    /// The gradients `(dx, dw)` of [`Self::rms_norm`] given the output's
    /// gradient `dy`.
    fn rms_norm_grad(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        super::rms_norm::rms_norm_grad_of::<Self>(x, w, dy, eps)
    }

    /// RoPE, `x * cos + rotate_half(x) * sin` over the last axis of
    /// `[batch, seq, heads, head_dim]` tensors of one shape (see
    /// [`super::rope`]).
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        super::rope::rope_of::<Self>(x, cos, sin)
    }

    /// The gradient of [`Self::rope`]'s input given the output's gradient
    /// `dy`.
    fn rope_grad(
        dy: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        super::rope::rope_grad_of::<Self>(dy, cos, sin)
    }

    /// `mask` laid out contiguously where the backend's ops need it.
    fn dense_mask(mask: BoolTensor<Self>) -> BoolTensor<Self> {
        mask
    }

    /// One AdamW update of a flat parameter: `[p, g, m, v]` to the new
    /// `[p, m, v]` (see [`super::optim::AdamWStep`]).
    fn adamw(t: [FloatTensor<Self>; 4], s: super::optim::AdamWStep) -> [FloatTensor<Self>; 3] {
        super::optim::adamw_of::<Self>(t, s)
    }

    /// `x · w` for `x: [m, k]` and `w: [k, n]` (the projections).
    fn matmul_2d(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, w)
    }

    /// `a · b` over the last two axes for `a: [p, q, m, k]` and
    /// `b: [p, q, k, n]` (attention's batched products).
    fn batched_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(a, b)
    }

    /// Per-row cross-entropy of `logits: [n, vocab]` against `targets:
    /// [n, 1]`, `[n]` in f32 (see [`super::loss::cross_entropy`]).
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        Self::cross_entropy_lse(logits, targets).0
    }

    /// [`Self::cross_entropy`] and each row's log-sum-exp (`[n, 1]`, f32).
    fn cross_entropy_lse(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        super::loss::rows_of::<Self>(logits, targets)
    }

    /// The gradient of [`Self::cross_entropy`] with respect to the logits,
    /// in their dtype, given the rows' gradient `g: [n]`.
    fn cross_entropy_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        g: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        super::loss::grad_of::<Self>(logits, targets, lse, g)
    }

    /// Soft-capped logits `cap · tanh(l / cap)` in their dtype and, when
    /// `keep`, what [`Self::softcap_grad`] needs to take a gradient back
    /// through the cap (by default `tanh(l / cap)` in f32).
    fn softcap(
        logits: FloatTensor<Self>,
        cap: f32,
        keep: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        super::loss::softcap_of::<Self>(logits, cap, keep)
    }

    /// `d`, the gradient with respect to capped logits, times the cap's
    /// derivative `1 − tanh²`, in `d`'s dtype; `kept` is what
    /// [`Self::softcap`] kept for those logits.
    fn softcap_grad(d: FloatTensor<Self>, kept: FloatTensor<Self>, cap: f32) -> FloatTensor<Self> {
        super::loss::softcap_grad_of::<Self>(d, kept, cap)
    }

    /// The mean over rows of the cross-entropy of the logits `x · w` (`x:
    /// [n, d]`, `w: [d, vocab]`) against `targets: [n, 1]`, `[1]` in f32,
    /// and, where `want` asks, its gradients with respect to `x` and `w` (in
    /// their dtypes). With `softcap`, the logits `l` are first
    /// `softcap · tanh(l / softcap)`. The logits exist one chunk of rows at
    /// a time ([`Self::LOGIT_CHUNK_ELEMS`]). `x` must have a row.
    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        softcap: Option<f32>,
        want: [bool; 2],
    ) -> (
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    ) {
        let vocab = w.shape().dims::<2>()[1];
        let rows = Self::LOGIT_CHUNK_ELEMS / vocab.max(1);
        super::loss::linear_cross_entropy_of::<Self>(x, w, targets, softcap, want, rows)
    }
}

/// A backend that trains the decoder: autodiff over a [`ModelBackend`].
pub trait TrainBackend: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {}

impl<T> TrainBackend for T where T: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {}

/// Flex: its own gemm, loss loops and in-place AdamW where they apply.
impl ModelBackend for burn::backend::Flex {
    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        causal: Option<Causal>,
        softcap: Option<f32>,
    ) -> FloatTensor<Self> {
        attention::flex(q, k, v, mask, causal, softcap)
    }

    /// Flex copies views of more than two strided axes element by element;
    /// this copies the `d`-long rows instead.
    fn swap_heads(x: FloatTensor<Self>) -> FloatTensor<Self> {
        dense(x.transpose(1, 2))
    }

    fn dense_mask(mask: BoolTensor<Self>) -> BoolTensor<Self> {
        dense(mask)
    }

    fn attention_probs(
        s: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f32,
        softcap: Option<f32>,
        keep: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if attention::flex::probs_applies(&s, &mask) {
            return attention::flex::probs(s, &mask, scale, softcap, keep);
        }
        attention::probs_of::<Self>(s, mask, scale, softcap, keep)
    }

    fn attention_probs_with_sinks(
        s: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        scale: f32,
        sinks: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let rows = s.shape().num_elements() / s.shape().dims::<4>()[3].max(1);
        if attention::flex::probs_applies(&s, &mask)
            && sinks.dtype() == DType::F32
            && sinks.shape().num_elements() == rows
        {
            return attention::flex::sink_probs(s, &mask, scale, &sinks);
        }
        attention::sink_probs_of::<Self>(s, mask, scale, sinks)
    }

    fn attention_ds(
        p: FloatTensor<Self>,
        dp: FloatTensor<Self>,
        scale: f32,
        tanh: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        if attention::flex::ds_applies(&p, &dp, tanh.as_ref()) {
            return attention::flex::ds(&p, dp, scale, tanh.as_ref());
        }
        attention::ds_of::<Self>(p, dp, scale, tanh)
    }

    fn matmul_2d(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        super::matmul::flex::matmul_2d(&x, &w).unwrap_or_else(|| Self::float_matmul(x, w))
    }

    fn batched_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        super::matmul::flex::batched(&a, &b).unwrap_or_else(|| Self::float_matmul(a, b))
    }

    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        super::rms_norm::flex::rms_norm(&x, &w, eps)
            .unwrap_or_else(|| super::rms_norm::rms_norm_of::<Self>(x, w, eps))
    }

    fn rms_norm_grad(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        super::rms_norm::flex::rms_norm_grad(&x, &w, &dy, eps)
            .unwrap_or_else(|| super::rms_norm::rms_norm_grad_of::<Self>(x, w, dy, eps))
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        super::rope::flex::rope(&x, &cos, &sin)
            .unwrap_or_else(|| super::rope::rope_of::<Self>(x, cos, sin))
    }

    fn rope_grad(
        dy: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        super::rope::flex::rope_grad(&dy, &cos, &sin)
            .unwrap_or_else(|| super::rope::rope_grad_of::<Self>(dy, cos, sin))
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        super::swiglu::flex::swiglu(&gate, &up)
            .unwrap_or_else(|| super::swiglu::swiglu_of::<Self>(gate, up))
    }

    fn geglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        super::swiglu::flex::geglu(&gate, &up)
            .unwrap_or_else(|| super::swiglu::geglu_of::<Self>(gate, up))
    }

    fn clamped_swiglu(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        alpha: f32,
        limit: f32,
    ) -> FloatTensor<Self> {
        super::swiglu::flex::clamped_swiglu(&gate, &up, alpha, limit)
            .unwrap_or_else(|| super::swiglu::clamped_swiglu_of::<Self>(gate, up, alpha, limit))
    }

    fn clamped_swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        alpha: f32,
        limit: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        super::swiglu::flex::clamped_swiglu_grad(&gate, &up, &dout, alpha, limit).unwrap_or_else(
            || super::swiglu::clamped_swiglu_grad_of::<Self>(gate, up, dout, alpha, limit),
        )
    }

    fn geglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        super::swiglu::flex::geglu_grad(&gate, &up, &dout)
            .unwrap_or_else(|| super::swiglu::geglu_grad_of::<Self>(gate, up, dout))
    }

    fn swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        super::swiglu::flex::swiglu_grad(&gate, &up, &dout)
            .unwrap_or_else(|| super::swiglu::swiglu_grad_of::<Self>(gate, up, dout))
    }

    fn adamw(t: [FloatTensor<Self>; 4], s: super::optim::AdamWStep) -> [FloatTensor<Self>; 3] {
        if super::optim::flex::applies(&t) {
            super::optim::flex::adamw(t, s)
        } else {
            super::optim::adamw_of::<Self>(t, s)
        }
    }

    // f32 logits are capped in place and kept capped (`tanh = c / cap`);
    // others take the default, which keeps `tanh` in f32. `softcap_grad`
    // tells the two apart by the gradient's dtype, which is the logits'.
    fn softcap(
        logits: FloatTensor<Self>,
        cap: f32,
        keep: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if logits.dtype() != DType::F32 {
            return super::loss::softcap_of::<Self>(logits, cap, keep);
        }
        let capped = super::loss::flex::softcap(flex_unique_f32(logits), cap);
        let kept = keep.then(|| capped.clone());
        (capped, kept)
    }

    fn softcap_grad(d: FloatTensor<Self>, kept: FloatTensor<Self>, cap: f32) -> FloatTensor<Self> {
        if d.dtype() != DType::F32 {
            return super::loss::softcap_grad_of::<Self>(d, kept, cap);
        }
        super::loss::flex::softcap_grad(flex_unique_f32(d), &kept, cap)
    }

    fn cross_entropy_lse(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        super::loss::flex::lse(&logits, &targets)
            .unwrap_or_else(|| super::loss::rows_of::<Self>(logits, targets))
    }

    fn cross_entropy_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        g: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        super::loss::flex::grad(&logits, &targets, &lse, &g)
            .unwrap_or_else(|| super::loss::grad_of::<Self>(logits, targets, lse, g))
    }
}

/// A contiguous f32 Flex tensor of `shape` over `data` (the Flex loops'
/// outputs).
pub(crate) fn flex_f32(
    data: Vec<f32>,
    shape: impl Into<burn::tensor::Shape>,
) -> burn_flex::FlexTensor {
    burn_flex::FlexTensor::new(
        burn::tensor::Bytes::from_elems(data),
        burn_flex::Layout::contiguous(shape.into()),
        DType::F32,
    )
}

/// `t` as a contiguous f32 tensor that alone owns its whole buffer, so the
/// Flex loops may write into it: `t` itself when it already is, else a copy.
/// `t` must be f32.
pub(crate) fn flex_unique_f32(mut t: burn_flex::FlexTensor) -> burn_flex::FlexTensor {
    let n = t.layout().num_elements();
    if t.layout().contiguous_offsets() == Some((0, n))
        && t.try_storage_mut::<f32>().is_some_and(|d| d.len() == n)
    {
        return t;
    }
    let data = t
        .to_contiguous()
        .as_slice::<f32>()
        .expect("an f32 tensor")
        .to_vec();
    flex_f32(data, t.layout().shape().clone())
}

/// `t` laid out contiguously, copied one contiguous run at a time (Flex's own
/// copy walks layouts of more than two strided axes element by element).
pub(crate) fn dense(t: burn_flex::FlexTensor) -> burn_flex::FlexTensor {
    use burn_flex::{FlexTensor, Layout};
    fn copy<E: burn::tensor::Element + bytemuck::Pod>(t: &FlexTensor) -> FlexTensor {
        let layout = t.layout();
        let blocks = layout.strided_blocks();
        let (src, run) = (t.storage::<E>(), blocks.block_len());
        let mut out = Vec::with_capacity(layout.num_elements());
        for start in blocks.block_starts() {
            out.extend_from_slice(&src[start..start + run]);
        }
        FlexTensor::new(
            burn::tensor::Bytes::from_elems(out),
            Layout::contiguous(layout.shape().clone()),
            t.dtype(),
        )
    }
    // Flex's own copy is already right for these: none for a whole
    // contiguous tensor, one run for a contiguous view, and flips.
    if t.is_contiguous() || !t.layout().has_positive_strides() {
        return t.to_contiguous();
    }
    match t.dtype() {
        DType::F32 => copy::<f32>(&t),
        DType::BF16 => copy::<burn::tensor::bf16>(&t),
        DType::F16 => copy::<burn::tensor::f16>(&t),
        DType::Bool(_) if t.dtype().size() == 1 => copy::<u8>(&t),
        _ => t.to_contiguous(),
    }
}

/// A GPU: burn's ops, with attention as chunked batched matmuls (see
/// [`attention::composed`]) and matmuls whose contraction is padded where
/// burn's kernels would get it wrong ([`super::matmul::safe_contraction`]).
#[cfg(any(feature = "cuda", feature = "gpu-on-wgpu"))]
impl ModelBackend for super::device::Gpu {
    /// Fewer, larger chunks: the LM head's matmuls stay large, and the f32
    /// sum of the head's gradient over chunks (a full pass over it each)
    /// runs at most a few times a step. 512 MiB of bf16 logits.
    const LOGIT_CHUNK_ELEMS: usize = 1 << 28;

    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        causal: Option<Causal>,
        softcap: Option<f32>,
    ) -> FloatTensor<Self> {
        attention::composed::<Self>(q, k, v, mask, causal, softcap)
    }

    fn matmul_2d(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        super::matmul::gpu::<Self, 2>(x, w)
    }

    fn batched_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        super::matmul::gpu::<Self, 4>(a, b)
    }
}

/// Autodiff: each op's backward pass is its own (see the op's module).
impl<B: ModelBackend, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
    const LOGIT_CHUNK_ELEMS: usize = B::LOGIT_CHUNK_ELEMS;

    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        causal: Option<Causal>,
        softcap: Option<f32>,
    ) -> FloatTensor<Self> {
        attention::autodiff_masked_attention::<B, C>(q, k, v, mask, causal, softcap)
    }

    fn sink_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        causal: Option<Causal>,
        sinks: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        attention::autodiff_sink_attention::<B, C>(q, k, v, mask, causal, sinks)
    }

    fn swap_heads(x: FloatTensor<Self>) -> FloatTensor<Self> {
        attention::autodiff_swap_heads::<B, C>(x)
    }

    fn dense_mask(mask: BoolTensor<Self>) -> BoolTensor<Self> {
        B::dense_mask(mask)
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        super::loss::autodiff_cross_entropy::<B, C>(logits, targets)
    }

    fn matmul_2d(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        super::matmul::autodiff_matmul_2d::<B, C>(x, w)
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        super::swiglu::autodiff_swiglu::<B, C>(gate, up)
    }

    fn geglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        super::swiglu::autodiff_geglu::<B, C>(gate, up)
    }

    fn clamped_swiglu(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        alpha: f32,
        limit: f32,
    ) -> FloatTensor<Self> {
        super::swiglu::autodiff_clamped_swiglu::<B, C>(gate, up, alpha, limit)
    }

    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        super::rms_norm::autodiff_rms_norm::<B, C>(x, w, eps)
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        super::rope::autodiff_rope::<B, C>(x, cos, sin)
    }

    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        targets: IntTensor<Self>,
        softcap: Option<f32>,
        _want: [bool; 2],
    ) -> (
        FloatTensor<Self>,
        Option<FloatTensor<Self>>,
        Option<FloatTensor<Self>>,
    ) {
        let loss = super::loss::autodiff_linear_cross_entropy::<B, C>(x, w, targets, softcap);
        (loss, None, None)
    }
}
