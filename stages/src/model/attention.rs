//! Masked scaled-dot-product attention whose backward pass recomputes the
//! attention probabilities instead of keeping them.
//!
//! burn's autodiff derives attention's gradient from its fallback, which keeps
//! two `[batch, heads, queries, keys]` tensors per layer until the backward
//! pass. This op keeps only its inputs (and the mask, which all layers share),
//! as FlashAttention's backward does, and recomputes the probabilities chunk
//! by chunk of query rows, so a step holds one chunk's scores at a time.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{AttentionModuleOptions, BoolTensor, FloatTensor, ModuleOps};
use burn::tensor::{Bool, DType, FloatDType, Tensor, TensorMetadata, TensorPrimitive};

/// Chunks of query rows keep one chunk's scores under this many elements
/// (128 MiB in f32).
const CHUNK_ELEMS: usize = 1 << 25;

/// A backend the decoder runs on: one with [`ModelBackend::masked_attention`].
pub trait ModelBackend: Backend {
    /// `softmax(q kᵀ / √head_dim, masked) v` on `q: [b, h, queries, d]`,
    /// `k, v: [b, h, keys, d]` and `mask: [b, h, queries, keys]` (`true` where
    /// attention is not allowed). Every query row must allow at least one key.
    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// A backend that trains the decoder: autodiff over a [`ModelBackend`].
pub trait TrainBackend: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {}

impl<T> TrainBackend for T where T: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {}

/// [`ModelBackend::masked_attention`] on tensors.
pub fn masked_attention<B: ModelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(B::masked_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        mask.into_primitive(),
    )))
}

/// A decoding step with scores up to this many elements goes through Flex's
/// fused attention.
const FLEX_FUSED_ELEMS: usize = 1 << 18;

/// On the CPU, decoding steps (fewer query rows than keys, few scores) use
/// Flex's fused op. Prompts and training are batched matmuls chunk by chunk,
/// as the backward pass recomputes them, since the fused op runs each head on
/// one thread.
impl ModelBackend for burn::backend::Flex {
    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
    ) -> FloatTensor<Self> {
        let [b, h, tq, _] = q.shape().dims::<4>();
        let keys = k.shape().dims::<4>()[2];
        if tq < keys && b * h * tq * keys <= FLEX_FUSED_ELEMS {
            return Self::attention(q, k, v, Some(mask), None, AttentionModuleOptions::default());
        }
        let [q, k, v] = [q, k, v].map(float::<Self>);
        let rows = chunk_rows(&q, &k);
        chunked_forward(q, k, v, Tensor::from_primitive(mask), rows)
            .into_primitive()
            .tensor()
    }
}

/// On a GPU, burn's fused (flash) attention, autotuned.
#[cfg(any(feature = "cuda", feature = "gpu-on-wgpu"))]
impl ModelBackend for super::device::Gpu {
    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::attention(q, k, v, Some(mask), None, AttentionModuleOptions::default())
    }
}

impl<B: ModelBackend, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
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
                    mask.clone(),
                );
                let out = B::masked_attention(q.primitive, k.primitive, v.primitive, mask);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::masked_attention(
                q.primitive,
                k.primitive,
                v.primitive,
                mask,
            )),
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: ModelBackend> Backward<B, 3> for AttentionBackward {
    type State = (NodeId, NodeId, NodeId, BoolTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = float::<B>(grads.consume::<B>(&ops.node));
        let (q, k, v, mask) = ops.state;
        let q = float::<B>(checkpointer.retrieve_node_output(q));
        let k = float::<B>(checkpointer.retrieve_node_output(k));
        let v = float::<B>(checkpointer.retrieve_node_output(v));
        let rows = chunk_rows(&q, &k);
        let (dq, dk, dv) = chunked_backward(q, k, v, Tensor::from_primitive(mask), grad, rows);
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

fn float<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `t` in `dtype`, without a copy when it already is.
fn to<B: Backend>(t: Tensor<B, 4>, dtype: DType) -> Tensor<B, 4> {
    if t.dtype() == dtype {
        return t;
    }
    match dtype {
        DType::BF16 => t.cast(FloatDType::BF16),
        DType::F16 => t.cast(FloatDType::F16),
        DType::F64 => t.cast(FloatDType::F64),
        _ => t.cast(FloatDType::F32),
    }
}

/// Query rows per chunk, so that a chunk's scores stay under [`CHUNK_ELEMS`].
fn chunk_rows<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>) -> usize {
    let [b, h, queries, _] = q.dims();
    let per_row = b * h * k.dims()[2];
    (CHUNK_ELEMS / per_row.max(1)).clamp(1, queries.max(1))
}

/// The attention probabilities of query rows `qc` in f32 (softmax as in
/// burn's fallback: a fully masked row would give zeros, not NaNs).
fn probs<B: Backend>(
    qc: Tensor<B, 4>,
    kt: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    scale: f32,
) -> Tensor<B, 4> {
    let s = to(qc.matmul(kt), DType::F32).mul_scalar(scale);
    let s = s.mask_fill(mask, f32::NEG_INFINITY);
    let max = s.clone().max_dim(3).clamp_min(f32::MIN);
    let e = s.sub(max).exp();
    let sum = e.clone().sum_dim(3).clamp_min(f32::MIN_POSITIVE);
    e.div(sum)
}

fn scale_of<B: Backend>(q: &Tensor<B, 4>) -> f32 {
    1.0 / (q.dims()[3] as f32).sqrt()
}

fn chunked_forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    rows: usize,
) -> Tensor<B, 4> {
    let tq = q.dims()[2];
    let (dtype, scale) = (q.dtype(), scale_of(&q));
    let kt = k.swap_dims(2, 3);
    let outs: Vec<_> = (0..tq)
        .step_by(rows)
        .map(|start| {
            let n = rows.min(tq - start);
            let p = probs(
                q.clone().narrow(2, start, n),
                kt.clone(),
                mask.clone().narrow(2, start, n),
                scale,
            );
            to(p, dtype).matmul(v.clone())
        })
        .collect();
    Tensor::cat(outs, 2)
}

/// Gradients of `q`, `k` and `v` given the output's gradient `dout`:
/// `dV = Pᵀ dO`, `dS = P ∘ (dO Vᵀ − rowsum(P ∘ dO Vᵀ))`, `dQ = scale · dS K`,
/// `dK = scale · dSᵀ Q`. Softmax and `dS` are in f32; matmuls take the
/// inputs' dtype (bf16 under mixed precision), as FlashAttention's do.
fn chunked_backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
    dout: Tensor<B, 4>,
    rows: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let tq = q.dims()[2];
    let (dtype, scale) = (q.dtype(), scale_of(&q));
    let dout = to(dout, dtype);
    let kt = k.clone().swap_dims(2, 3);
    let vt = v.swap_dims(2, 3);
    let (mut dk, mut dv): (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>) = (None, None);
    let mut dqs = Vec::with_capacity(tq.div_ceil(rows));
    for start in (0..tq).step_by(rows) {
        let n = rows.min(tq - start);
        let qc = q.clone().narrow(2, start, n);
        let doc = dout.clone().narrow(2, start, n);
        let p = probs(
            qc.clone(),
            kt.clone(),
            mask.clone().narrow(2, start, n),
            scale,
        );
        let dv_c = to(
            to(p.clone(), dtype).swap_dims(2, 3).matmul(doc.clone()),
            DType::F32,
        );
        let dp = to(doc.matmul(vt.clone()), DType::F32);
        let row = p.clone().mul(dp.clone()).sum_dim(3);
        let ds = to(p.mul(dp.sub(row)).mul_scalar(scale), dtype);
        dqs.push(ds.clone().matmul(k.clone()));
        let dk_c = to(ds.swap_dims(2, 3).matmul(qc), DType::F32);
        dk = Some(dk.map_or(dk_c.clone(), |a| a + dk_c));
        dv = Some(dv.map_or(dv_c.clone(), |a| a + dv_c));
    }
    let (dk, dv) = (
        dk.unwrap_or_else(|| k.zeros_like()),
        dv.unwrap_or_else(|| vt.swap_dims(2, 3).zeros_like()),
    );
    (Tensor::cat(dqs, 2), to(dk, dtype), to(dv, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type AD = Autodiff<Flex>;

    struct Case {
        q: Tensor<AD, 4>,
        k: Tensor<AD, 4>,
        v: Tensor<AD, 4>,
        mask: Tensor<AD, 4, Bool>,
        dout: Tensor<AD, 4>,
    }

    /// Causal over the last `tq` of `keys` keys, and in odd batch rows every
    /// third key masked as padding is; every row keeps its own key.
    fn case(b: usize, h: usize, tq: usize, keys: usize, d: usize) -> Case {
        let device = Default::default();
        let rand = |t: usize| {
            Tensor::<AD, 4>::random([b, h, t, d], Distribution::Normal(0.0, 1.0), &device)
        };
        let past = keys - tq;
        let mask: Vec<bool> = (0..b * h * tq * keys)
            .map(|i| {
                let (j, row) = (i % keys, (i / keys) % tq);
                let pad = (i / (keys * tq * h)) % 2 == 1 && j % 3 == 0;
                j > past + row || (pad && j != past + row)
            })
            .collect();
        Case {
            q: rand(tq).require_grad(),
            k: rand(keys).require_grad(),
            v: rand(keys).require_grad(),
            mask: Tensor::from_data(TensorData::new(mask, [b, h, tq, keys]), &device),
            dout: rand(tq),
        }
    }

    fn max_diff(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) -> f32 {
        a.sub(b).abs().max().into_scalar()
    }

    /// Output and gradients of burn's own attention (autodiff through its
    /// fallback, which keeps the probabilities).
    fn reference(c: &Case) -> [Tensor<Flex, 4>; 4] {
        let out = burn::tensor::module::attention(
            c.q.clone(),
            c.k.clone(),
            c.v.clone(),
            Some(c.mask.clone()),
            None,
            Default::default(),
        );
        let g = (out.clone() * c.dout.clone()).sum().backward();
        [
            out.inner(),
            c.q.grad(&g).unwrap(),
            c.k.grad(&g).unwrap(),
            c.v.grad(&g).unwrap(),
        ]
    }

    #[test]
    fn output_and_gradients_match_burns_attention() {
        for c in [
            case(2, 3, 7, 7, 8),
            case(1, 2, 5, 9, 4),
            case(2, 1, 1, 6, 4),
        ] {
            let out = masked_attention(c.q.clone(), c.k.clone(), c.v.clone(), c.mask.clone());
            let g = (out.clone() * c.dout.clone()).sum().backward();
            let ours = [
                out.inner(),
                c.q.grad(&g).unwrap(),
                c.k.grad(&g).unwrap(),
                c.v.grad(&g).unwrap(),
            ];
            for (name, (a, b)) in ["out", "dq", "dk", "dv"]
                .iter()
                .zip(ours.into_iter().zip(reference(&c)))
            {
                let diff = max_diff(a, b);
                assert!(diff < 1e-5, "{name} differs by {diff}");
            }
        }
    }

    #[test]
    fn chunks_of_query_rows_give_the_same_output_and_gradients() {
        let c = case(2, 2, 10, 12, 4);
        let [out, dq, dk, dv] = reference(&c);
        let (q, k, v, mask, dout) = (
            c.q.inner(),
            c.k.inner(),
            c.v.inner(),
            c.mask.inner(),
            c.dout.inner(),
        );
        for rows in [1, 3, 10] {
            let o = chunked_forward(q.clone(), k.clone(), v.clone(), mask.clone(), rows);
            let (gq, gk, gv) = chunked_backward(
                q.clone(),
                k.clone(),
                v.clone(),
                mask.clone(),
                dout.clone(),
                rows,
            );
            for (name, a, b) in [
                ("out", o, &out),
                ("dq", gq, &dq),
                ("dk", gk, &dk),
                ("dv", gv, &dv),
            ] {
                let diff = max_diff(a, b.clone());
                assert!(
                    diff < 1e-5,
                    "{name} with {rows} rows per chunk differs by {diff}"
                );
            }
        }
    }

    #[test]
    fn bf16_inputs_give_bf16_gradients_close_to_f32() {
        let c = case(1, 2, 6, 6, 8);
        let [_, dq, dk, dv] = reference(&c);
        let bf = |t: Tensor<Flex, 4>| t.cast(FloatDType::BF16);
        let (q, k, v, mask, dout) = (
            bf(c.q.inner()),
            bf(c.k.inner()),
            bf(c.v.inner()),
            c.mask.inner(),
            bf(c.dout.inner()),
        );
        let (gq, gk, gv) = chunked_backward(q, k, v, mask, dout, 6);
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
}
