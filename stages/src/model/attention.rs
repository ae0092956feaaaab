//! Masked scaled-dot-product attention whose backward pass recomputes the
//! attention probabilities instead of keeping them.
//!
//! burn's autodiff derives attention's gradient from its fallback, which keeps
//! two `[batch, heads, queries, keys]` tensors per layer until the backward
//! pass. This op keeps only its inputs (and the mask, which all layers share),
//! as FlashAttention's backward does, and recomputes the probabilities chunk
//! by chunk of query rows, so a step holds one chunk's scores at a time. Told
//! that the mask is causal, forward and backward skip the keys after each
//! chunk's last token, and under a sliding window the keys before its
//! first token's window. Scores may be soft-capped (Gemma 2's
//! `attn_logit_softcapping`): `cap · tanh(s / cap)` before the mask. A
//! head may have a learned sink (gpt-oss): one more logit in each row's
//! softmax, for a key whose value is zero, so the row's weights sum to less
//! than 1.

use burn::backend::Autodiff;
use burn::backend::Flex;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{AttentionModuleOptions, BoolTensor, FloatTensor, ModuleOps};
use burn::tensor::{Bool, DType, FloatDType, Int, Tensor, TensorMetadata, TensorPrimitive};

use super::backend::ModelBackend;

/// Chunks of query rows keep one chunk's scores under this many elements
/// (128 MiB in f32).
const CHUNK_ELEMS: usize = 1 << 25;

/// Under a causal mask, the query rows are split into at most this many
/// chunks (of at least [`MIN_CAUSAL_TOKENS`] tokens), each computed against
/// the keys up to its last token only: about 56% of the full scores for 8.
/// Under a sliding window, into chunks of at most a window's tokens.
const CAUSAL_CHUNKS: usize = 8;

/// The fewest tokens per causal chunk, so the matmuls stay large.
const MIN_CAUSAL_TOKENS: usize = 64;

/// What the attention may assume about a mask that is causal: query row `r`
/// is token `past + r / rep` (the query heads sharing a kv head are stacked
/// token by token), and it sees no key after that token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Causal {
    /// Query heads per kv head, stacked along the query axis.
    pub rep: usize,
    /// Keys before the first query token (a KV cache).
    pub past: usize,
    /// A sliding window (0: none): token `p` sees no key before
    /// `p + 1 - window`. The decoder's window mask promises this for every
    /// token whose earlier keys are not padding; a padding token's output,
    /// which nothing reads, may lose keys further back.
    pub window: usize,
}

/// [`ModelBackend::masked_attention`] on tensors.
pub fn masked_attention<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    causal: Option<Causal>,
    softcap: Option<f32>,
) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(B::masked_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        mask.into_primitive(),
        causal,
        softcap,
    )))
}

/// [`ModelBackend::sink_attention`] on tensors.
pub fn sink_attention<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    causal: Option<Causal>,
    sinks: Tensor<B, 1>,
) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(B::sink_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        mask.into_primitive(),
        causal,
        sinks.into_primitive().tensor(),
    )))
}

/// [`ModelBackend::swap_heads`] on tensors.
pub fn swap_heads<B: ModelBackend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(B::swap_heads(
        x.into_primitive().tensor(),
    )))
}

/// A decoding step with scores up to this many elements goes through Flex's
/// fused attention.
const FLEX_FUSED_ELEMS: usize = 1 << 18;

/// [`ModelBackend::masked_attention`] on Flex. Decoding steps (fewer query
/// rows than keys, few scores) use Flex's fused op. Prompts and training are
/// batched matmuls chunk by chunk, as the backward pass recomputes them,
/// since the fused op runs each head on one thread.
pub(crate) fn flex(
    q: FloatTensor<Flex>,
    k: FloatTensor<Flex>,
    v: FloatTensor<Flex>,
    mask: BoolTensor<Flex>,
    causal: Option<Causal>,
    softcap: Option<f32>,
) -> FloatTensor<Flex> {
    let [b, h, tq, _] = q.shape().dims::<4>();
    let keys = k.shape().dims::<4>()[2];
    if tq < keys && b * h * tq * keys <= FLEX_FUSED_ELEMS {
        let options = AttentionModuleOptions {
            softcap: softcap.map(f64::from),
            ..Default::default()
        };
        return Flex::attention(q, k, v, Some(mask), None, options);
    }
    composed::<Flex>(q, k, v, mask, causal, softcap)
}

/// The forward pass as batched matmuls over the chunks of [`plan`]. On a GPU,
/// too: burn 0.21's fused (flash) attention reads a broadcast mask (stride 0
/// over heads, as the decoder passes for models without grouped-query heads)
/// as if it were contiguous, and its result differed from the exact one by
/// 1e-3 at 1,024 keys (both seen on its wgpu backend;
/// `attention_matches_burns_attention_on_cuda` in
/// `stages/tests/train_parity.rs` checks this op there).
pub(crate) fn composed<B: ModelBackend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: BoolTensor<B>,
    causal: Option<Causal>,
    softcap: Option<f32>,
) -> FloatTensor<B> {
    composed_chunks::<B>(q, k, v, mask, causal, softcap, None)
}

/// [`ModelBackend::sink_attention`] as [`composed`]'s batched matmuls.
pub(crate) fn composed_with_sinks<B: ModelBackend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: BoolTensor<B>,
    causal: Option<Causal>,
    sinks: FloatTensor<B>,
) -> FloatTensor<B> {
    composed_chunks::<B>(q, k, v, mask, causal, None, Some(sinks))
}

/// [`composed`] and [`composed_with_sinks`]: the chunks of [`plan`], each
/// row's softmax soft-capped or counting its head's sink.
fn composed_chunks<B: ModelBackend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    mask: BoolTensor<B>,
    causal: Option<Causal>,
    softcap: Option<f32>,
    sinks: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    let [q, k, v] = [q, k, v].map(float::<B>);
    let chunks = plan(&q, &k, causal);
    let sinks = sinks.map(|s| sink_rows(&q, Tensor::from_primitive(TensorPrimitive::Float(s))));
    let mask = Tensor::from_primitive(mask);
    chunked_forward(q, k, v, mask, &chunks, softcap, sinks.as_ref())
        .into_primitive()
        .tensor()
}

/// The sinks `[heads]` per query row of `q` (`[b, kv_heads, tokens · rep,
/// d]`, row `i · rep + r` for head `kv · rep + r`): `[b, kv_heads, rows, 1]`
/// in f32.
fn sink_rows<B: Backend>(q: &Tensor<B, 4>, sinks: Tensor<B, 1>) -> Tensor<B, 4> {
    let [b, kvh, rows, _] = q.dims();
    let rep = sinks.dims()[0] / kvh;
    let t = rows / rep;
    to(sinks, DType::F32)
        .reshape([1, kvh, 1, rep])
        .expand([b, kvh, t, rep])
        .reshape([b, kvh, rows, 1])
}

/// Row gradients of the sinks, `[b, kv_heads, rows, 1]` (see
/// [`sink_rows`]), summed per head: `[heads]`.
fn sink_grad<B: Backend>(rows: Tensor<B, 4>, heads: usize) -> Tensor<B, 1> {
    let [b, kvh, n, _] = rows.dims();
    let rep = heads / kvh;
    rows.reshape([b, kvh, n / rep, rep])
        .sum_dim(2)
        .sum_dim(0)
        .reshape([heads])
}

/// [`ModelBackend::masked_attention`] under autodiff: the forward pass on the
/// inner backend, the backward pass [`AttentionBackward`], which keeps only
/// the inputs (checkpointed) and the mask.
pub(crate) fn autodiff_masked_attention<B: ModelBackend, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    mask: BoolTensor<Autodiff<B, C>>,
    causal: Option<Causal>,
    softcap: Option<f32>,
) -> FloatTensor<Autodiff<B, C>> {
    let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
    let out = B::masked_attention(
        q.primitive.clone(),
        k.primitive.clone(),
        v.primitive.clone(),
        mask.clone(),
        causal,
        softcap,
    );
    match AttentionBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (
                prep.checkpoint(&q),
                prep.checkpoint(&k),
                prep.checkpoint(&v),
                mask,
                causal,
                softcap,
            );
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// [`ModelBackend::sink_attention`] under autodiff: as
/// [`autodiff_masked_attention`], the sinks a fourth input.
pub(crate) fn autodiff_sink_attention<B: ModelBackend, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    mask: BoolTensor<Autodiff<B, C>>,
    causal: Option<Causal>,
    sinks: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let nodes = [
        q.node.clone(),
        k.node.clone(),
        v.node.clone(),
        sinks.node.clone(),
    ];
    let out = B::sink_attention(
        q.primitive.clone(),
        k.primitive.clone(),
        v.primitive.clone(),
        mask.clone(),
        causal,
        sinks.primitive.clone(),
    );
    match SinkAttentionBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (
                prep.checkpoint(&q),
                prep.checkpoint(&k),
                prep.checkpoint(&v),
                prep.checkpoint(&sinks),
                mask,
                causal,
            );
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// [`ModelBackend::swap_heads`] under autodiff.
pub(crate) fn autodiff_swap_heads<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    SwapHeadsBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateless(B::swap_heads(x.primitive))
}

/// The gradient of [`ModelBackend::swap_heads`] is the same swap of the
/// output's gradient.
#[derive(Debug)]
struct SwapHeadsBackward;

impl<B: ModelBackend> Backward<B, 1> for SwapHeadsBackward {
    type State = ();

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, B::swap_heads(grad));
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: ModelBackend> Backward<B, 3> for AttentionBackward {
    type State = (
        NodeId,
        NodeId,
        NodeId,
        BoolTensor<B>,
        Option<Causal>,
        Option<f32>,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = float::<B>(grads.consume::<B>(&ops.node));
        let (q, k, v, mask, causal, softcap) = ops.state;
        let q = float::<B>(checkpointer.retrieve_node_output(q));
        let k = float::<B>(checkpointer.retrieve_node_output(k));
        let v = float::<B>(checkpointer.retrieve_node_output(v));
        let chunks = plan(&q, &k, causal);
        let mask = Tensor::from_primitive(mask);
        let (dq, dk, dv, _) = chunked_backward(q, k, v, mask, grad, &chunks, softcap, None);
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

#[derive(Debug)]
struct SinkAttentionBackward;

impl<B: ModelBackend> Backward<B, 4> for SinkAttentionBackward {
    type State = (
        NodeId,
        NodeId,
        NodeId,
        NodeId,
        BoolTensor<B>,
        Option<Causal>,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v, node_s] = ops.parents;
        let grad = float::<B>(grads.consume::<B>(&ops.node));
        let (q, k, v, sinks, mask, causal) = ops.state;
        let q = float::<B>(checkpointer.retrieve_node_output(q));
        let k = float::<B>(checkpointer.retrieve_node_output(k));
        let v = float::<B>(checkpointer.retrieve_node_output(v));
        let sinks: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(
            checkpointer.retrieve_node_output(sinks),
        ));
        let (heads, dtype) = (sinks.dims()[0], sinks.dtype());
        let chunks = plan(&q, &k, causal);
        let rows = sink_rows(&q, sinks);
        let mask = Tensor::from_primitive(mask);
        let (dq, dk, dv, ds) = chunked_backward(q, k, v, mask, grad, &chunks, None, Some(&rows));
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g.into_primitive().tensor());
            }
        }
        if let (Some(node), Some(ds)) = (node_s, ds) {
            let g = to(sink_grad(ds, heads), dtype);
            grads.register::<B>(node.id, g.into_primitive().tensor());
        }
    }
}

/// [`ModelBackend::batched_matmul`] on tensors.
fn bmm<B: ModelBackend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    float(B::batched_matmul(
        a.into_primitive().tensor(),
        b.into_primitive().tensor(),
    ))
}

/// A float primitive as a rank-4 tensor.
pub(crate) fn float<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `t` in `dtype`, without a copy when it already is.
pub(crate) fn to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        return t;
    }
    t.cast(FloatDType::from(dtype))
}

/// Query rows `start .. start + rows`, which see no key before `first` nor
/// at or after `keys`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    start: usize,
    rows: usize,
    first: usize,
    keys: usize,
}

impl Chunk {
    /// `t`'s keys (axis 2) that the chunk sees.
    fn seen<B: Backend>(&self, t: &Tensor<B, 4>) -> Tensor<B, 4> {
        t.clone().narrow(2, self.first, self.keys - self.first)
    }
}

/// Splits the query rows of `q` into chunks whose scores stay under
/// [`CHUNK_ELEMS`]. Under `causal`, at most [`CAUSAL_CHUNKS`] chunks of whole
/// tokens, each attending only to the keys up to its last token (and, under
/// a window, from its first token's window on), so the masked upper triangle
/// (and the band before the window) is mostly never computed.
fn plan<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, causal: Option<Causal>) -> Vec<Chunk> {
    let [b, h, queries, _] = q.dims();
    let keys = k.dims()[2];
    let mut rows = (CHUNK_ELEMS / (b * h * keys).max(1)).clamp(1, queries.max(1));
    if let Some(c) = causal {
        let tokens = queries.div_ceil(c.rep);
        let mut per_chunk = tokens.div_ceil(CAUSAL_CHUNKS).max(MIN_CAUSAL_TOKENS);
        if c.window > 0 {
            // Chunks of about a window's tokens each see about two windows.
            per_chunk = per_chunk.min(c.window.max(MIN_CAUSAL_TOKENS));
        }
        rows = rows.min(per_chunk * c.rep);
        if rows > c.rep {
            rows -= rows % c.rep;
        }
    }
    (0..queries)
        .step_by(rows)
        .map(|start| {
            let n = rows.min(queries - start);
            let (first, seen) = match causal {
                Some(c) => {
                    let first = match c.window {
                        0 => 0,
                        w => (c.past + start / c.rep + 1).saturating_sub(w),
                    };
                    (first, (c.past + (start + n - 1) / c.rep + 1).min(keys))
                }
                None => (0, keys),
            };
            Chunk {
                start,
                rows: n,
                first: first.min(seen),
                keys: seen,
            }
        })
        .collect()
}

/// The attention probabilities of a chunk's query rows in f32 (softmax as in
/// burn's fallback: a fully masked row would give zeros, not NaNs) and,
/// soft-capped with `keep_tanh` (the backward pass), `tanh(scale · s / cap)`.
/// With `sinks` (see [`sink_rows`]; never with `softcap`), each row's
/// softmax also counts its sink's logit, as one more key never masked,
/// whose probability is left out.
#[allow(clippy::too_many_arguments)]
fn probs<B: ModelBackend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    mask: &Tensor<B, 4, Bool>,
    c: Chunk,
    scale: f32,
    softcap: Option<f32>,
    keep_tanh: bool,
    sinks: Option<&Tensor<B, 4>>,
) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
    let qc = q.clone().narrow(2, c.start, c.rows);
    let kt = c.seen(k).swap_dims(2, 3);
    let mask = mask
        .clone()
        .narrow(2, c.start, c.rows)
        .narrow(3, c.first, c.keys - c.first);
    let s = to(bmm(qc, kt), DType::F32);
    if let Some(sinks) = sinks {
        debug_assert!(softcap.is_none(), "sinks are never soft-capped");
        let p = B::attention_probs_with_sinks(
            s.into_primitive().tensor(),
            mask.into_primitive(),
            scale,
            sinks
                .clone()
                .narrow(2, c.start, c.rows)
                .into_primitive()
                .tensor(),
        );
        return (float(p), None);
    }
    let (p, tanh) = B::attention_probs(
        s.into_primitive().tensor(),
        mask.into_primitive(),
        scale,
        softcap,
        keep_tanh,
    );
    (float(p), tanh.map(float))
}

/// [`ModelBackend::attention_probs`] as tensor ops.
pub(crate) fn probs_of<B: ModelBackend>(
    s: FloatTensor<B>,
    mask: BoolTensor<B>,
    scale: f32,
    softcap: Option<f32>,
    keep: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let mask = Tensor::<B, 4, Bool>::from_primitive(B::dense_mask(mask));
    let (s, tanh) = match softcap {
        None => (float::<B>(s).mul_scalar(scale), None),
        Some(cap) => {
            let t = float::<B>(s).mul_scalar(scale / cap).tanh();
            match keep {
                true => (t.clone().mul_scalar(cap), Some(t)),
                false => (t.mul_scalar(cap), None),
            }
        }
    };
    let s = s.mask_fill(mask, f32::NEG_INFINITY);
    let max = s.clone().max_dim(3).clamp_min(f32::MIN);
    let e = s.sub(max).exp();
    let sum = e.clone().sum_dim(3).clamp_min(f32::MIN_POSITIVE);
    let p = e.div(sum).into_primitive().tensor();
    (p, tanh.map(|t| t.into_primitive().tensor()))
}

/// [`ModelBackend::attention_probs_with_sinks`] as tensor ops: the sinks
/// as one more column of the scores (divided by the scale the softmax
/// multiplies by), never masked, dropped after the softmax.
pub(crate) fn sink_probs_of<B: ModelBackend>(
    s: FloatTensor<B>,
    mask: BoolTensor<B>,
    scale: f32,
    sinks: FloatTensor<B>,
) -> FloatTensor<B> {
    let s = float::<B>(s);
    let keys = s.dims()[3];
    let col = float::<B>(sinks).div_scalar(scale);
    let open = Tensor::<B, 4, Int>::zeros(col.shape(), &col.device()).bool();
    let s = Tensor::cat(vec![s, col], 3);
    let mask = Tensor::cat(vec![Tensor::from_primitive(mask), open], 3);
    let (p, _) = B::attention_probs(
        s.into_primitive().tensor(),
        mask.into_primitive(),
        scale,
        None,
        false,
    );
    float::<B>(p).narrow(3, 0, keys).into_primitive().tensor()
}

/// [`ModelBackend::attention_ds`] as tensor ops.
pub(crate) fn ds_of<B: ModelBackend>(
    p: FloatTensor<B>,
    dp: FloatTensor<B>,
    scale: f32,
    tanh: Option<FloatTensor<B>>,
) -> FloatTensor<B> {
    let (p, dp) = (float::<B>(p), float::<B>(dp));
    let row = p.clone().mul(dp.clone()).sum_dim(3);
    let ds = p.mul(dp.sub(row)).mul_scalar(scale);
    let ds = match tanh.map(float::<B>) {
        Some(t) => ds.mul(t.clone().mul(t).neg().add_scalar(1.0)),
        None => ds,
    };
    ds.into_primitive().tensor()
}

/// Flex, f32: the softmax and its gradient one row at a time, in parallel
/// over rows, in place where the scores' buffer is not shared, reading the
/// mask through its strides (no dense copy of it per chunk and layer).
pub(crate) mod flex {
    use crate::model::backend::{flex_f32, flex_unique_f32};
    use crate::model::vmath;
    use burn::tensor::DType;
    use burn_flex::FlexTensor;
    use rayon::prelude::*;

    /// Rows per rayon task.
    const ROWS_PER_TASK: usize = 8;

    fn dims(t: &FlexTensor) -> Option<[usize; 4]> {
        let shape = t.layout().shape();
        (shape.num_dims() == 4).then(|| shape.dims::<4>())
    }

    /// `f` over `t`'s elements as one contiguous f32 slice: in place when `t`
    /// is the only owner of its buffer, else on a copy.
    fn in_place(t: FlexTensor, f: impl FnOnce(&mut [f32])) -> FlexTensor {
        let mut t = flex_unique_f32(t);
        f(t.try_storage_mut::<f32>()
            .expect("flex_unique_f32 made it unique"));
        t
    }

    /// Row `row` (`b * h * r` order) of `mask` `[b, h, r, keys]`, its first
    /// `len` bytes, read through the mask's strides.
    fn mask_rows<'a>(
        mask: &'a FlexTensor,
        h: usize,
        r: usize,
    ) -> impl Fn(usize, usize) -> &'a [u8] + Sync + 'a {
        let (ml, m) = (mask.layout(), mask.storage::<u8>());
        let (st, start) = (ml.strides(), ml.start_offset() as isize);
        let (s0, s1, s2) = (st[0], st[1], st[2]);
        move |row: usize, len: usize| {
            let (bi, hi, ri) = (row / (h * r), row / r % h, row % r);
            let at = (start + bi as isize * s0 + hi as isize * s1 + ri as isize * s2) as usize;
            &m[at..at + len]
        }
    }

    /// Whether [`probs`] applies: f32 scores, a one-byte bool mask of the
    /// same shape, contiguous along keys.
    pub(crate) fn probs_applies(s: &FlexTensor, mask: &FlexTensor) -> bool {
        let ok = s.dtype() == DType::F32
            && matches!(mask.dtype(), DType::Bool(_))
            && mask.dtype().size() == 1;
        ok && dims(s).is_some_and(|d| {
            dims(mask) == Some(d) && (d[3] <= 1 || mask.layout().strides()[3] == 1)
        })
    }

    /// The softmax of the scores `scale · s`, or soft-capped `cap · tanh(scale
    /// · s / cap)`, over keys where `mask` is false; zeros for a row masked
    /// whole. Capped with `keep`, also `tanh(scale · s / cap)`. Only where
    /// [`probs_applies`].
    pub(crate) fn probs(
        s: FlexTensor,
        mask: &FlexTensor,
        scale: f32,
        softcap: Option<f32>,
        keep: bool,
    ) -> (FlexTensor, Option<FlexTensor>) {
        let [_, h, r, k] = dims(&s).expect("probs_applies");
        let hidden = mask_rows(mask, h, r);
        let k = k.max(1);
        let Some(cap) = softcap else {
            let p = in_place(s, |x| {
                x.par_chunks_mut(k)
                    .with_min_len(ROWS_PER_TASK)
                    .enumerate()
                    .for_each(|(row, xs)| vmath::softmax(xs, hidden(row, xs.len()), scale))
            });
            return (p, None);
        };
        let shape = s.layout().shape().clone();
        let mut tanh = keep.then(|| vec![0f32; shape.num_elements()]);
        let p = in_place(s, |x| {
            let rows = x.par_chunks_mut(k).with_min_len(ROWS_PER_TASK).enumerate();
            let softmax = |(row, xs): (usize, &mut [f32]), t: Option<&mut [f32]>| {
                vmath::scaled_softcap(xs, t, scale, cap);
                vmath::softmax(xs, hidden(row, xs.len()), 1.0)
            };
            match tanh.as_mut() {
                Some(t) => rows
                    .zip(t.par_chunks_mut(k))
                    .for_each(|(row, t)| softmax(row, Some(t))),
                None => rows.for_each(|row| softmax(row, None)),
            }
        });
        (p, tanh.map(|t| flex_f32(t, shape)))
    }

    /// [`probs`] without a cap, each row's softmax also counting its sink
    /// (`sinks`: `[b, h, rows, 1]`, f32, not scaled), whose probability is
    /// left out. Only where [`probs_applies`].
    pub(crate) fn sink_probs(
        s: FlexTensor,
        mask: &FlexTensor,
        scale: f32,
        sinks: &FlexTensor,
    ) -> FlexTensor {
        let [_, h, r, k] = dims(&s).expect("probs_applies");
        let hidden = mask_rows(mask, h, r);
        let sinks = sinks.to_contiguous();
        let sv = sinks.as_slice::<f32>().expect("f32 sinks");
        in_place(s, |x| {
            x.par_chunks_mut(k.max(1))
                .with_min_len(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(row, xs)| {
                    vmath::softmax_with_sink(xs, hidden(row, xs.len()), scale, sv[row])
                })
        })
    }

    /// Whether [`ds`] applies: f32 `p`, `dp` and `tanh` (if any) of the same
    /// 4-d shape.
    pub(crate) fn ds_applies(p: &FlexTensor, dp: &FlexTensor, tanh: Option<&FlexTensor>) -> bool {
        let same = |t: &FlexTensor| t.dtype() == DType::F32 && dims(t) == dims(p);
        p.dtype() == DType::F32 && dims(p).is_some() && same(dp) && tanh.is_none_or(same)
    }

    /// `scale · p ∘ (dp − rowsum(p ∘ dp))`, times `1 − tanh²` with `tanh`,
    /// written over `dp`'s buffer where it can be. Only where [`ds_applies`].
    pub(crate) fn ds(
        p: &FlexTensor,
        dp: FlexTensor,
        scale: f32,
        tanh: Option<&FlexTensor>,
    ) -> FlexTensor {
        let k = dims(p).expect("ds_applies")[3].max(1);
        let p = p.to_contiguous();
        let pv = p.as_slice::<f32>().expect("contiguous f32");
        let tanh = tanh.map(FlexTensor::to_contiguous);
        let tv = tanh.as_ref().map(|t| t.as_slice::<f32>().expect("f32"));
        in_place(dp, |d| {
            let rows = d
                .par_chunks_mut(k)
                .with_min_len(ROWS_PER_TASK)
                .zip(pv.par_chunks(k));
            match tv {
                // The cap's derivative: `softcap_grad` with cap 1 takes `tanh` itself.
                Some(tv) => rows.zip(tv.par_chunks(k)).for_each(|((ds, ps), ts)| {
                    vmath::softmax_grad(ps, ds, scale);
                    vmath::softcap_grad(ds, ts, 1.0)
                }),
                None => rows.for_each(|(ds, ps)| vmath::softmax_grad(ps, ds, scale)),
            }
        })
    }
}

fn scale_of<B: Backend>(q: &Tensor<B, 4>) -> f32 {
    1.0 / (q.dims()[3] as f32).sqrt()
}

fn chunked_forward<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    chunks: &[Chunk],
    softcap: Option<f32>,
    sinks: Option<&Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let (dtype, scale) = (q.dtype(), scale_of(&q));
    let outs: Vec<_> = chunks
        .iter()
        .map(|&c| {
            let (p, _) = probs(&q, &k, &mask, c, scale, softcap, false, sinks);
            bmm(to(p, dtype), c.seen(&v))
        })
        .collect();
    Tensor::cat(outs, 2)
}

/// `t` (`[b, h, n, d]`, the keys from `first` on) between zero rows, to
/// `keys` rows.
fn pad_keys<B: Backend>(t: Tensor<B, 4>, first: usize, keys: usize) -> Tensor<B, 4> {
    let [b, h, n, d] = t.dims();
    if n == keys {
        return t;
    }
    let (device, dtype) = (t.device(), t.dtype());
    let zeros = |rows| to(Tensor::<B, 4>::zeros([b, h, rows, d], &device), dtype);
    let mut parts = Vec::with_capacity(3);
    if first > 0 {
        parts.push(zeros(first));
    }
    let after = keys - first - n;
    parts.push(t);
    if after > 0 {
        parts.push(zeros(after));
    }
    Tensor::cat(parts, 2)
}

/// Gradients of `q`, `k` and `v` given the output's gradient `dout`:
/// `dV = Pᵀ dO`, `dS = P ∘ (dO Vᵀ − rowsum(P ∘ dO Vᵀ))`, `dQ = scale · dS K`,
/// `dK = scale · dSᵀ Q`; soft-capped, `dS` times `1 − tanh²` of the capped
/// scores. Softmax and `dS` are in f32; matmuls take the inputs' dtype
/// (bf16 under mixed precision), as FlashAttention's do. With `sinks`,
/// also their gradient per row (see [`sink_rows`]): `−p_sink · rowsum(P ∘
/// dO Vᵀ)`, `p_sink = 1 − rowsum(P)`, which is `−rowsum(dS) / scale`.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn chunked_backward<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    dout: Tensor<B, 4>,
    chunks: &[Chunk],
    softcap: Option<f32>,
    sinks: Option<&Tensor<B, 4>>,
) -> (
    Tensor<B, 4>,
    Tensor<B, 4>,
    Tensor<B, 4>,
    Option<Tensor<B, 4>>,
) {
    let keys = k.dims()[2];
    let (dtype, scale) = (q.dtype(), scale_of(&q));
    let dout = to(dout, dtype);
    let (mut dk, mut dv): (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>) = (None, None);
    let mut dqs = Vec::with_capacity(chunks.len());
    let mut dsinks = Vec::new();
    for &c in chunks {
        let (kc, vc) = (c.seen(&k), c.seen(&v));
        let qc = q.clone().narrow(2, c.start, c.rows);
        let doc = dout.clone().narrow(2, c.start, c.rows);
        let (p, tanh) = probs(&q, &k, &mask, c, scale, softcap, true, sinks);
        let dv_c = to(
            bmm(to(p.clone(), dtype).swap_dims(2, 3), doc.clone()),
            DType::F32,
        );
        let dp = to(bmm(doc, vc.swap_dims(2, 3)), DType::F32);
        let ds = float(B::attention_ds(
            p.into_primitive().tensor(),
            dp.into_primitive().tensor(),
            scale,
            tanh.map(|t| t.into_primitive().tensor()),
        ));
        if sinks.is_some() {
            // rowsum(dS) = scale · rowsum(P ∘ dP) · p_sink: the sinks' row
            // gradient without another pass over P and dP.
            dsinks.push(ds.clone().sum_dim(3).div_scalar(-scale));
        }
        let ds = to(ds, dtype);
        dqs.push(bmm(ds.clone(), kc));
        let dk_c = pad_keys(to(bmm(ds.swap_dims(2, 3), qc), DType::F32), c.first, keys);
        let dv_c = pad_keys(dv_c, c.first, keys);
        dk = Some(dk.map_or(dk_c.clone(), |a| a + dk_c));
        dv = Some(dv.map_or(dv_c.clone(), |a| a + dv_c));
    }
    let (dk, dv) = (
        dk.unwrap_or_else(|| k.zeros_like()),
        dv.unwrap_or_else(|| v.zeros_like()),
    );
    let dsinks = (!dsinks.is_empty()).then(|| Tensor::cat(dsinks, 2));
    (Tensor::cat(dqs, 2), to(dk, dtype), to(dv, dtype), dsinks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::backend::dense;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type AD = Autodiff<Flex>;

    struct Case {
        q: Tensor<AD, 4>,
        k: Tensor<AD, 4>,
        v: Tensor<AD, 4>,
        mask: Tensor<AD, 4, Bool>,
        dout: Tensor<AD, 4>,
        causal: Causal,
    }

    /// `tokens` new tokens after `past` keys, `rep` query heads per kv head
    /// stacked token by token: causal, and in odd batch rows every third key
    /// masked as padding is; every row keeps its own token's key.
    fn case(b: usize, h: usize, tokens: usize, rep: usize, past: usize, d: usize) -> Case {
        let device = Default::default();
        let rand = |t: usize| {
            Tensor::<AD, 4>::random([b, h, t, d], Distribution::Normal(0.0, 1.0), &device)
        };
        let (rows, keys) = (tokens * rep, past + tokens);
        let mask: Vec<bool> = (0..b * h * rows * keys)
            .map(|n| {
                let (j, i) = (n % keys, (n / keys) % rows / rep);
                let pad = (n / (keys * rows * h)) % 2 == 1 && j % 3 == 0;
                j > past + i || (pad && j != past + i)
            })
            .collect();
        Case {
            q: rand(rows).require_grad(),
            k: rand(keys).require_grad(),
            v: rand(keys).require_grad(),
            mask: Tensor::from_data(TensorData::new(mask, [b, h, rows, keys]), &device),
            dout: rand(rows),
            causal: Causal {
                rep,
                past,
                window: 0,
            },
        }
    }

    fn max_diff(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) -> f32 {
        a.sub(b).abs().max().into_scalar()
    }

    /// Output and gradients of burn's own attention (autodiff through its
    /// fallback, which keeps the probabilities and is told nothing of
    /// causality).
    fn reference(c: &Case) -> [Tensor<Flex, 4>; 4] {
        capped_reference(c, None)
    }

    /// [`reference`] with scores soft-capped at `softcap`.
    fn capped_reference(c: &Case, softcap: Option<f32>) -> [Tensor<Flex, 4>; 4] {
        let out = burn::tensor::module::attention(
            c.q.clone(),
            c.k.clone(),
            c.v.clone(),
            Some(c.mask.clone()),
            None,
            AttentionModuleOptions {
                softcap: softcap.map(f64::from),
                ..Default::default()
            },
        );
        let g = (out.clone() * c.dout.clone()).sum().backward();
        [
            out.inner(),
            c.q.grad(&g).unwrap(),
            c.k.grad(&g).unwrap(),
            c.v.grad(&g).unwrap(),
        ]
    }

    fn assert_close(what: &str, ours: [Tensor<Flex, 4>; 4], want: [Tensor<Flex, 4>; 4]) {
        for (name, (a, b)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(ours.into_iter().zip(want))
        {
            let diff = max_diff(a, b);
            assert!(diff < 1e-5, "{what}: {name} differs by {diff}");
        }
    }

    #[test]
    fn output_and_gradients_match_burns_attention() {
        for c in [
            case(2, 3, 7, 1, 0, 8),
            case(1, 2, 5, 1, 4, 4),
            case(2, 1, 1, 3, 5, 4),
            case(2, 2, 6, 3, 2, 4),
        ] {
            for (causal, softcap) in [(None, None), (Some(c.causal), None), (None, Some(1.5))] {
                let out = masked_attention(
                    c.q.clone(),
                    c.k.clone(),
                    c.v.clone(),
                    c.mask.clone(),
                    causal,
                    softcap,
                );
                let g = (out.clone() * c.dout.clone()).sum().backward();
                let ours = [
                    out.inner(),
                    c.q.grad(&g).unwrap(),
                    c.k.grad(&g).unwrap(),
                    c.v.grad(&g).unwrap(),
                ];
                assert_close(
                    &format!("{:?}, {causal:?}, softcap {softcap:?}", c.q.dims()),
                    ours,
                    capped_reference(&c, softcap),
                );
            }
        }
    }

    /// Output and gradients of sink attention from burn's tensor ops with
    /// autodiff, as transformers' eager gpt-oss attention computes it: the
    /// sink as one more logit per row, its probability dropped after the
    /// softmax. Also the sinks' gradient.
    fn sink_reference(c: &Case, sinks: &Tensor<AD, 1>) -> ([Tensor<Flex, 4>; 4], Tensor<Flex, 1>) {
        let [b, h, rows, d] = c.q.dims();
        let (keys, rep) = (c.k.dims()[2], sinks.dims()[0] / h);
        let s =
            c.q.clone()
                .matmul(c.k.clone().swap_dims(2, 3))
                .mul_scalar(1.0 / (d as f32).sqrt())
                .mask_fill(c.mask.clone(), f32::NEG_INFINITY);
        let col = sinks
            .clone()
            .reshape([1, h, 1, rep])
            .expand([b, h, rows / rep, rep])
            .reshape([b, h, rows, 1]);
        let p = burn::tensor::activation::softmax(Tensor::cat(vec![s, col], 3), 3);
        let out = p.narrow(3, 0, keys).matmul(c.v.clone());
        let g = (out.clone() * c.dout.clone()).sum().backward();
        let grads = [
            out.inner(),
            c.q.grad(&g).unwrap(),
            c.k.grad(&g).unwrap(),
            c.v.grad(&g).unwrap(),
        ];
        (grads, sinks.grad(&g).unwrap())
    }

    #[test]
    fn sink_attention_matches_the_sink_as_an_extra_logit() {
        for c in [
            case(2, 3, 7, 1, 0, 8),
            case(2, 1, 1, 3, 5, 4),
            case(2, 2, 6, 3, 2, 4),
            case(1, 2, 150, 2, 0, 4),
        ] {
            let heads = c.q.dims()[1] * c.causal.rep;
            let sinks: Tensor<AD, 1> = Tensor::<AD, 1>::random(
                [heads],
                Distribution::Normal(0.0, 2.0),
                &Default::default(),
            )
            .require_grad();
            for causal in [None, Some(c.causal)] {
                let out = sink_attention(
                    c.q.clone(),
                    c.k.clone(),
                    c.v.clone(),
                    c.mask.clone(),
                    causal,
                    sinks.clone(),
                );
                let g = (out.clone() * c.dout.clone()).sum().backward();
                let ours = [
                    out.inner(),
                    c.q.grad(&g).unwrap(),
                    c.k.grad(&g).unwrap(),
                    c.v.grad(&g).unwrap(),
                ];
                let dsinks = sinks.grad(&g).unwrap();
                let what = format!("{:?}, {causal:?}", c.q.dims());
                let (want, want_sinks) = sink_reference(&c, &sinks);
                assert_close(&what, ours, want);
                let diff: f32 = dsinks.sub(want_sinks).abs().max().into_scalar();
                assert!(diff < 1e-4, "{what}: dsinks differs by {diff}");
                // The sinks take weight from the keys: unlike plain attention.
                let plain = masked_attention(
                    c.q.clone().inner(),
                    c.k.clone().inner(),
                    c.v.clone().inner(),
                    c.mask.clone().inner(),
                    causal,
                    None,
                );
                let moved = max_diff(
                    plain,
                    sink_attention(
                        c.q.clone().inner(),
                        c.k.clone().inner(),
                        c.v.clone().inner(),
                        c.mask.clone().inner(),
                        causal,
                        sinks.clone().inner(),
                    ),
                );
                assert!(moved > 1e-3, "{what}: the sinks changed nothing ({moved})");
            }
        }
    }

    fn chunked(c: &Case, chunks: &[Chunk]) -> [Tensor<Flex, 4>; 4] {
        capped_chunks(c, chunks, None)
    }

    fn capped_chunks(c: &Case, chunks: &[Chunk], softcap: Option<f32>) -> [Tensor<Flex, 4>; 4] {
        let (q, k, v, mask) = (
            c.q.clone().inner(),
            c.k.clone().inner(),
            c.v.clone().inner(),
            c.mask.clone().inner(),
        );
        let out = chunked_forward(
            q.clone(),
            k.clone(),
            v.clone(),
            mask.clone(),
            chunks,
            softcap,
            None,
        );
        let dout = c.dout.clone().inner();
        let (dq, dk, dv, _) = chunked_backward(q, k, v, mask, dout, chunks, softcap, None);
        [out, dq, dk, dv]
    }

    #[test]
    fn chunks_of_query_rows_give_the_same_output_and_gradients() {
        let c = case(2, 2, 10, 1, 2, 4);
        for rows in [1, 3, 10] {
            let chunks: Vec<Chunk> = (0..10)
                .step_by(rows)
                .map(|start| Chunk {
                    start,
                    rows: rows.min(10 - start),
                    first: 0,
                    keys: 12,
                })
                .collect();
            assert_close(&format!("{rows} rows"), chunked(&c, &chunks), reference(&c));
        }
    }

    #[test]
    fn causal_chunks_skip_the_keys_after_their_last_token() {
        // 300 tokens of 2 stacked heads after 5 cached keys: 5 chunks of 64
        // tokens (the last 44), each seeing the keys up to its last token.
        let c = case(1, 1, 300, 2, 5, 4);
        let chunks = plan(&c.q.clone().inner(), &c.k.clone().inner(), Some(c.causal));
        let want: Vec<Chunk> = (0..5)
            .map(|n| Chunk {
                start: n * 128,
                rows: if n < 4 { 128 } else { 88 },
                first: 0,
                keys: 5 + (64 * (n + 1)).min(300),
            })
            .collect();
        assert_eq!(chunks, want);
        assert_close("causal chunks", chunked(&c, &chunks), reference(&c));
        assert_close(
            "soft-capped causal chunks",
            capped_chunks(&c, &chunks, Some(0.7)),
            capped_reference(&c, Some(0.7)),
        );
        // Without the promise, every chunk sees every key.
        let all = plan(&c.q.clone().inner(), &c.k.clone().inner(), None);
        assert_eq!(
            all,
            [Chunk {
                start: 0,
                rows: 600,
                first: 0,
                keys: 305
            }]
        );
    }

    /// Under a sliding window of 50 keys, chunks also skip the keys before
    /// their first token's window, and give the same output and gradients.
    #[test]
    fn windowed_chunks_skip_the_keys_before_the_window() {
        let window = 50;
        let mut c = case(2, 1, 300, 2, 5, 4);
        let [b, h, rows, keys] = c.mask.dims();
        let mask: Vec<bool> = c.mask.clone().into_data().into_vec().unwrap();
        let mask: Vec<bool> = mask
            .iter()
            .enumerate()
            .map(|(n, &m)| {
                let (j, i) = (n % keys, (n / keys) % rows / 2);
                m || j + window <= 5 + i
            })
            .collect();
        c.mask = Tensor::from_data(
            TensorData::new(mask, [b, h, rows, keys]),
            &Default::default(),
        );
        c.causal.window = window;
        let chunks = plan(&c.q.clone().inner(), &c.k.clone().inner(), Some(c.causal));
        let firsts: Vec<usize> = chunks.iter().map(|c| c.first).collect();
        // Chunk n starts at token 64 n, key 5 + 64 n: its window from 64 n - 44.
        assert_eq!(firsts, [0, 20, 84, 148, 212]);
        assert_close("windowed chunks", chunked(&c, &chunks), reference(&c));
        // A window of 100 keys over 1,000 tokens: chunks of 100 tokens.
        let mut long = case(1, 1, 1000, 1, 0, 4);
        long.causal.window = 100;
        let chunks = plan(
            &long.q.clone().inner(),
            &long.k.clone().inner(),
            Some(long.causal),
        );
        assert_eq!(chunks.len(), 10);
        assert_eq!(
            (chunks[3].start, chunks[3].first, chunks[3].keys),
            (300, 201, 400)
        );
    }

    #[test]
    fn bf16_inputs_give_bf16_gradients_close_to_f32() {
        let c = case(1, 2, 6, 1, 0, 8);
        let [_, dq, dk, dv] = reference(&c);
        let bf = |t: Tensor<Flex, 4>| t.cast(FloatDType::BF16);
        let (q, k, v, mask, dout) = (
            bf(c.q.clone().inner()),
            bf(c.k.clone().inner()),
            bf(c.v.clone().inner()),
            c.mask.clone().inner(),
            bf(c.dout.clone().inner()),
        );
        let chunks = plan(&q, &k, Some(c.causal));
        let (gq, gk, gv, _) = chunked_backward(q, k, v, mask, dout, &chunks, None, None);
        for (name, a, b) in [("dq", gq, dq), ("dk", gk, dk), ("dv", gv, dv)] {
            assert_eq!(a.dtype(), DType::BF16, "{name}");
            let diff = max_diff(to(a, DType::F32), b.clone());
            let size = b.abs().max().into_scalar();
            assert!(
                diff < 0.05 * size,
                "{name}: bf16 differs by {diff} (largest {size})"
            );
        }
    }

    /// The views the decoder hands to [`dense`]: heads swapped, narrowed
    /// along keys and along rows, broadcast over heads, and none.
    fn view<K: burn::tensor::BasicOps<Flex>>(
        t: Tensor<Flex, 4, K>,
        i: usize,
    ) -> Tensor<Flex, 4, K> {
        match i {
            0 => t.swap_dims(1, 2),
            1 => t.narrow(3, 1, 2),
            2 => t.narrow(2, 1, 3).narrow(3, 0, 3),
            3 => t.narrow(1, 1, 1).expand([2, 3, 5, 4]),
            4 => t
                .narrow(1, 1, 1)
                .expand([2, 3, 5, 4])
                .narrow(2, 2, 3)
                .narrow(3, 0, 2),
            _ => t,
        }
    }

    #[test]
    fn dense_copies_views_exactly() {
        let device = Default::default();
        let x = Tensor::<Flex, 4>::random([2, 3, 5, 4], Distribution::Normal(0.0, 1.0), &device);
        let mask = x.clone().greater_elem(0.0);
        for i in 0..6 {
            for t in [
                view(x.clone(), i),
                view(x.clone(), i).cast(FloatDType::BF16),
            ] {
                let got = dense(t.clone().into_primitive().tensor());
                assert!(got.is_contiguous(), "view {i}");
                let got = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(got));
                assert_eq!(got.to_data(), t.to_data(), "view {i}, {:?}", t.dtype());
            }
            let m = view(mask.clone(), i);
            let got = dense(m.clone().into_primitive());
            assert!(got.is_contiguous(), "view {i}, mask");
            let got = Tensor::<Flex, 4, Bool>::from_primitive(got);
            assert_eq!(got.to_data(), m.to_data(), "view {i}, mask");
        }
    }

    /// Flex's softmax and `dS` loops against the tensor-op versions, plain
    /// and soft-capped: a mask broadcast over heads and narrowed (an offset,
    /// rows not adjacent), one row masked whole, and a shared score tensor,
    /// which must be left as it was (the loops write in place only into a
    /// buffer they own alone).
    #[test]
    fn flex_softmax_loops_match_the_tensor_ops() {
        let device = Default::default();
        let (b, h, r, k) = (2, 3, 5, 37);
        let s = Tensor::<Flex, 4>::random([b, h, r, k], Distribution::Normal(0.0, 4.0), &device);
        let hide: Vec<bool> = (0..b * (r + 2) * (k + 3))
            .map(|n| (n * 7919) % 5 == 0)
            .collect();
        let full = Tensor::<Flex, 4, Bool>::from_data(
            TensorData::new(hide, [b, 1, r + 2, k + 3]),
            &device,
        );
        let mut mask = full.narrow(2, 1, r).narrow(3, 2, k).expand([b, h, r, k]);
        // Row (1, *, 3) masked whole: the loop gives zeros, as the ops do.
        let whole = Tensor::<Flex, 4, Bool>::from_data(
            TensorData::new(vec![true; k], [1, 1, 1, k]),
            &device,
        );
        mask = mask.slice_assign([1..2, 0..h, 3..4, 0..k], whole.expand([1, h, 1, k]));
        let m = mask.clone().into_primitive();
        assert!(flex::probs_applies(
            &s.clone().into_primitive().tensor(),
            &m
        ));
        let scale = 0.125;
        let pair =
            |(p, t): (FloatTensor<Flex>, Option<FloatTensor<Flex>>)| (float(p), t.map(float));
        for softcap in [None, Some(1.5)] {
            let at = format!("softcap {softcap:?}");
            let tensor_ops = |keep| {
                let s = s.clone().into_primitive().tensor();
                pair(probs_of::<Flex>(s, m.clone(), scale, softcap, keep))
            };
            let (want, want_t) = tensor_ops(true);
            assert_eq!(want_t.is_some(), softcap.is_some(), "{at}");
            let (unkept, none) = tensor_ops(false);
            assert!(none.is_none(), "{at}");
            assert_eq!(unkept.to_data(), want.to_data(), "{at}");
            let before = s.to_data();
            let shared = s.clone().into_primitive().tensor();
            let (got, _) = pair(flex::probs(shared, &m, scale, softcap, false));
            assert_eq!(s.to_data(), before, "{at}: the shared scores were written");
            assert!(max_diff(got.clone(), want.clone()) <= 1e-6, "{at}");
            let zeros: f32 = got
                .clone()
                .slice([1..2, 0..h, 3..4, 0..k])
                .abs()
                .sum()
                .into_scalar();
            assert_eq!(zeros, 0.0, "{at}");
            // Unshared, in place, and the kept tanh.
            let owned = (s.clone() * 1.0).into_primitive().tensor();
            let (got, got_t) = pair(flex::probs(owned, &m, scale, softcap, true));
            assert!(max_diff(got.clone(), want) <= 1e-6, "{at}");
            if let (Some(a), Some(b)) = (got_t.clone(), want_t.clone()) {
                assert!(max_diff(a, b) <= 1e-6, "{at}: tanh");
            }
            let dp =
                Tensor::<Flex, 4>::random([b, h, r, k], Distribution::Normal(0.0, 1.0), &device);
            let (p_p, dp_p) = (got.into_primitive().tensor(), dp.into_primitive().tensor());
            let t_p = got_t.map(|t| t.into_primitive().tensor());
            assert!(flex::ds_applies(&p_p, &dp_p, t_p.as_ref()), "{at}");
            let want = float::<Flex>(ds_of::<Flex>(p_p.clone(), dp_p.clone(), scale, t_p.clone()));
            let got = float::<Flex>(flex::ds(&p_p, dp_p, scale, t_p.as_ref()));
            assert!(max_diff(got, want) <= 1e-7, "{at}");
        }
        // With sinks: the loop against the sink as one more column; the row
        // masked whole still gives zeros (its sink takes it all).
        let sinks =
            Tensor::<Flex, 4>::random([b, h, r, 1], Distribution::Normal(0.0, 2.0), &device);
        let sinks = sinks.into_primitive().tensor();
        let want = float::<Flex>(sink_probs_of::<Flex>(
            s.clone().into_primitive().tensor(),
            m.clone(),
            scale,
            sinks.clone(),
        ));
        let got = float::<Flex>(flex::sink_probs(
            (s.clone() * 1.0).into_primitive().tensor(),
            &m,
            scale,
            &sinks,
        ));
        assert!(max_diff(got.clone(), want.clone()) <= 1e-6, "sinks");
        let rows: f32 = want.clone().sum_dim(3).max().into_scalar();
        assert!(rows < 1.0, "the sinks take a share of each row: {rows}");
        let zeros: f32 = got
            .slice([1..2, 0..h, 3..4, 0..k])
            .abs()
            .sum()
            .into_scalar();
        assert_eq!(zeros, 0.0, "sinks: the row masked whole");
    }

    #[test]
    fn swap_heads_is_swap_dims_forward_and_backward() {
        let device = Default::default();
        let x = Tensor::<AD, 4>::random([2, 3, 4, 5], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let w = Tensor::<AD, 4>::random([2, 4, 3, 5], Distribution::Normal(0.0, 1.0), &device);
        let ours = swap_heads(x.clone() * 2.0);
        let burns = (x.clone() * 2.0).swap_dims(1, 2);
        assert_eq!(ours.to_data(), burns.to_data());
        let grad = |y: Tensor<AD, 4>| {
            let g = (y * w.clone()).sum().backward();
            x.grad(&g).unwrap().to_data()
        };
        let want = (w.clone().inner() * 2.0).swap_dims(1, 2).to_data();
        assert_eq!(grad(ours), want);
        assert_eq!(grad(burns), want);
    }
}
