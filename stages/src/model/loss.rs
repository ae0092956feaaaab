//! Token cross-entropy as one op with its own backward pass.
//!
//! Composed from tensor ops, `logsumexp(x) - x[target]` leaves autodiff a
//! chain of `[tokens, vocab]` tensors (the f32 copy of bf16 logits, the
//! shifted logits, their exponentials) and a backward pass of as many more
//! (the expanded sum's gradient, the exponentials' gradient, a scattered
//! one-hot, their sum). With a 152k vocabulary and 8k tokens each is 5 GB
//! in f32. This op keeps the logits in their own dtype and one f32 per row
//! (the log-sum-exp), and computes the gradient in one expression:
//! `(softmax(x) - onehot(target)) * g`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorPrimitive};

use super::attention::to;
use super::backend::ModelBackend;
use super::matmul::matmul_2d;

/// `x` in f32, without a copy when it already is.
pub(crate) fn to_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    to(x, DType::F32)
}

/// Per-row losses `[n]` and log-sum-exps `[n, 1]`, in f32, of `logits:
/// [n, vocab]` (any float dtype) against `targets: [n, 1]`.
pub(crate) fn rows<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let n = logits.dims()[0];
    let x = to_f32(logits);
    let max = x.clone().max_dim(1);
    let lse = (x.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let target = x.gather(1, targets);
    ((lse.clone() - target).reshape([n]), lse)
}

/// [`rows`] on primitives.
pub(crate) fn rows_of<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (loss, lse) = rows::<B>(
        Tensor::from_primitive(TensorPrimitive::Float(logits)),
        Tensor::from_primitive(targets),
    );
    (
        loss.into_primitive().tensor(),
        lse.into_primitive().tensor(),
    )
}

/// Per-row cross-entropy `logsumexp(logits[i]) - logits[i, targets[i]]`
/// (`[n]`, f32) of `logits: [n, vocab]` in any float dtype and `targets:
/// [n, 1]`. Under autodiff the logits' gradient comes back in their dtype.
pub fn cross_entropy<B: ModelBackend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 1> {
    Tensor::from_primitive(TensorPrimitive::Float(B::cross_entropy(
        logits.into_primitive().tensor(),
        targets.into_primitive(),
    )))
}

/// [`ModelBackend::cross_entropy`] under autodiff: the forward pass on the
/// inner backend, the backward pass [`CrossEntropyBackward`].
pub(crate) fn autodiff_cross_entropy<B: ModelBackend, C: CheckpointStrategy>(
    logits: FloatTensor<Autodiff<B, C>>,
    targets: IntTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let (loss, lse) = B::cross_entropy_lse(logits.primitive.clone(), targets.clone());
    match CrossEntropyBackward
        .prepare::<C>([logits.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((logits.primitive, targets, lse), loss),
        OpsKind::UnTracked(prep) => prep.finish(loss),
    }
}

/// `d logits = (softmax(logits) - onehot(targets)) * g`, `g` the rows'
/// gradient, in the logits' dtype.
#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: ModelBackend> Backward<B, 1> for CrossEntropyBackward {
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let g = grads.consume::<B>(&ops.node);
        let [Some(parent)] = ops.parents else { return };
        let (logits, targets, lse) = ops.state;
        grads.register::<B>(parent.id, B::cross_entropy_grad(logits, targets, lse, g));
    }
}

/// The logits' gradient `(exp(logits - lse) - onehot(targets)) * g` in the
/// logits' dtype, from tensor ops; `lse: [n, 1]` and `g: [n]` in f32.
pub(crate) fn grad<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
    lse: Tensor<B, 2>,
    g: Tensor<B, 1>,
) -> Tensor<B, 2> {
    let dtype = logits.dtype();
    let n = logits.dims()[0];
    let g = g.reshape([n, 1]);
    let d = (to_f32(logits) - lse).exp().mul(g.clone()).scatter(
        1,
        targets,
        g.neg(),
        IndexingUpdateOp::Add,
    );
    to(d, dtype)
}

/// [`grad`] on primitives.
pub(crate) fn grad_of<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    lse: FloatTensor<B>,
    g: FloatTensor<B>,
) -> FloatTensor<B> {
    grad::<B>(
        Tensor::from_primitive(TensorPrimitive::Float(logits)),
        Tensor::from_primitive(targets),
        Tensor::from_primitive(TensorPrimitive::Float(lse)),
        Tensor::from_primitive(TensorPrimitive::Float(g)),
    )
    .into_primitive()
    .tensor()
}

/// `cap · tanh(logits / cap)` (Gemma 2's `final_logit_softcapping`), in
/// the logits' dtype.
pub fn softcap<B: Backend, const D: usize>(logits: Tensor<B, D>, cap: f32) -> Tensor<B, D> {
    let dtype = logits.dtype();
    to(to_f32(logits).div_scalar(cap).tanh().mul_scalar(cap), dtype)
}

/// [`ModelBackend::softcap`] from tensor ops: the capped logits and, when
/// `keep`, `tanh(l / cap)` in f32.
pub(crate) fn softcap_of<B: Backend>(
    logits: FloatTensor<B>,
    cap: f32,
    keep: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let logits = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(logits));
    let dtype = logits.dtype();
    let t = to_f32(logits).div_scalar(cap).tanh();
    let kept = keep.then(|| t.clone().into_primitive().tensor());
    (to(t.mul_scalar(cap), dtype).into_primitive().tensor(), kept)
}

/// [`ModelBackend::softcap_grad`] from tensor ops, given the `tanh` that
/// [`softcap_of`] kept.
pub(crate) fn softcap_grad_of<B: Backend>(
    d: FloatTensor<B>,
    tanh: FloatTensor<B>,
    _cap: f32,
) -> FloatTensor<B> {
    let d = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(d));
    let t = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(tanh));
    let dtype = d.dtype();
    to(to_f32(d).mul(t.clone().mul(t).neg().add_scalar(1.0)), dtype)
        .into_primitive()
        .tensor()
}

/// The mean cross-entropy (`[1]`, f32) of the logits `x · w` (`x: [n, d]`,
/// `w: [d, vocab]`, the LM head), soft-capped at `softcap` where set,
/// against `targets: [n, 1]`, without the `[n, vocab]` logits ever existing
/// whole: see [`ModelBackend::linear_cross_entropy`]. `n` must be at least 1.
pub fn linear_cross_entropy<B: ModelBackend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
    softcap: Option<f32>,
) -> Tensor<B, 1> {
    let (loss, _, _) = B::linear_cross_entropy(
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
        targets.into_primitive(),
        softcap,
        [false; 2],
    );
    Tensor::from_primitive(TensorPrimitive::Float(loss))
}

/// [`ModelBackend::linear_cross_entropy`] from the backend's own matmul and
/// loss ops, `rows` rows of logits at a time. `x` must have a row.
pub(crate) fn linear_cross_entropy_of<B: ModelBackend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    targets: IntTensor<B>,
    softcap: Option<f32>,
    want: [bool; 2],
    rows: usize,
) -> (
    FloatTensor<B>,
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
) {
    let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
    let w = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(w));
    let targets = Tensor::<B, 2, Int>::from_primitive(targets);
    let (n, device) = (x.dims()[0], x.device());
    let (mut losses, mut dxs) = (Vec::new(), Vec::new());
    let mut dw: Option<Tensor<B, 2>> = None;
    let rows = rows.max(1);
    for start in (0..n).step_by(rows) {
        let c = rows.min(n - start);
        let xc = x.clone().narrow(0, start, c);
        let tc = targets.clone().narrow(0, start, c).into_primitive();
        let logits = matmul_2d(xc.clone(), w.clone());
        // Soft-capped: the capped logits' gradient times `1 − tanh²`.
        let logits = logits.into_primitive().tensor();
        let (logits, kept) = match softcap {
            None => (logits, None),
            Some(cap) => B::softcap(logits, cap, want != [false; 2]),
        };
        let (loss, lse) = B::cross_entropy_lse(logits.clone(), tc.clone());
        losses.push(Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(loss)));
        if want == [false; 2] {
            continue;
        }
        // The mean's gradient is 1/n on every row.
        let g = Tensor::<B, 1>::full([c], 1.0 / n as f64, &device);
        let dl = B::cross_entropy_grad(logits, tc, lse, g.into_primitive().tensor());
        let dl = match (kept, softcap) {
            (Some(kept), Some(cap)) => B::softcap_grad(dl, kept, cap),
            _ => dl,
        };
        let dl = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(dl));
        if want[0] {
            dxs.push(matmul_2d(dl.clone(), w.clone().transpose()));
        }
        if want[1] {
            // Summed over chunks in f32, rounded to the weight's dtype once.
            let part = to_f32(matmul_2d(xc.transpose(), dl));
            dw = Some(match dw {
                Some(sum) => sum + part,
                None => part,
            });
        }
    }
    let loss = Tensor::cat(losses, 0).mean();
    let dx = want[0].then(|| Tensor::cat(dxs, 0).into_primitive().tensor());
    let dw = dw.map(|d| to(d, w.dtype()).into_primitive().tensor());
    (loss.into_primitive().tensor(), dx, dw)
}

/// [`ModelBackend::linear_cross_entropy`] under autodiff. The gradients are
/// computed in the forward pass, chunk by chunk, while each chunk's logits
/// exist (as Liger's fused linear cross-entropy does); the backward pass
/// only scales them by the loss's gradient. So the logits are computed once,
/// as unfused, and never kept.
pub(crate) fn autodiff_linear_cross_entropy<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    targets: IntTensor<Autodiff<B, C>>,
    softcap: Option<f32>,
) -> FloatTensor<Autodiff<B, C>> {
    let want = [&x, &w].map(|t| !t.node.requirement.is_none());
    let (loss, dx, dw) = B::linear_cross_entropy(x.primitive, w.primitive, targets, softcap, want);
    match LinearCrossEntropyBackward
        .prepare::<C>([x.node, w.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((dx, dw), loss),
        OpsKind::UnTracked(prep) => prep.finish(loss),
    }
}

/// `dx` and `dw` of the mean loss, computed in the forward pass, times the
/// loss's gradient.
#[derive(Debug)]
struct LinearCrossEntropyBackward;

impl<B: ModelBackend> Backward<B, 2> for LinearCrossEntropyBackward {
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let g =
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let (dx, dw) = ops.state;
        for (parent, d) in ops.parents.into_iter().zip([dx, dw]) {
            if let (Some(parent), Some(d)) = (parent, d) {
                let d = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(d));
                let g = to(g.clone(), d.dtype()).reshape([1, 1]);
                grads.register::<B>(parent.id, d.mul(g).into_primitive().tensor());
            }
        }
    }
}

/// Flex, f32 logits: each row in one pass for its maximum and one for its
/// sum of exponentials, in parallel over rows, with no `[n, vocab]` temporary.
pub(crate) mod flex {
    use crate::model::backend::flex_f32;
    use crate::model::vmath;
    use burn::tensor::DType;
    use burn_flex::FlexTensor;
    use rayon::prelude::*;

    /// Rows per rayon task: enough work to outweigh scheduling.
    const ROWS_PER_TASK: usize = 4;
    /// Elements per rayon task of the elementwise loops.
    const CHUNK: usize = 1 << 16;

    /// The targets as indices, if their dtype is an integer Flex uses.
    fn indices(t: &FlexTensor) -> Option<Vec<usize>> {
        let t = t.to_contiguous();
        match t.dtype() {
            DType::I64 => t
                .as_slice::<i64>()
                .map(|s| s.iter().map(|&i| i as usize).collect()),
            DType::I32 => t
                .as_slice::<i32>()
                .map(|s| s.iter().map(|&i| i as usize).collect()),
            _ => None,
        }
    }

    /// `(loss [n], lse [n, 1])`, or `None` where this path does not apply
    /// (not f32, a target out of range).
    pub(crate) fn lse(
        logits: &FlexTensor,
        targets: &FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor)> {
        let logits = logits.to_contiguous();
        let x = logits.as_slice::<f32>()?;
        let [n, vocab] = logits.layout().shape().dims::<2>();
        let t = indices(targets)?;
        if t.len() != n || t.iter().any(|&i| i >= vocab) || vocab == 0 {
            return None;
        }
        let mut lse = vec![0f32; n];
        lse.par_iter_mut()
            .with_min_len(ROWS_PER_TASK)
            .zip(x.par_chunks(vocab))
            .for_each(|(out, row)| {
                *out = vmath::logsumexp(row);
            });
        let loss = lse
            .iter()
            .zip(&t)
            .enumerate()
            .map(|(i, (&l, &j))| l - x[i * vocab + j])
            .collect();
        Some((flex_f32(loss, [n]), flex_f32(lse, [n, 1])))
    }

    /// `cap · tanh(x / cap)` of `x` (f32, owning its buffer), in place.
    pub(crate) fn softcap(mut x: FlexTensor, cap: f32) -> FlexTensor {
        let xs = x
            .try_storage_mut::<f32>()
            .expect("an f32 tensor of its own");
        xs.par_chunks_mut(CHUNK)
            .for_each(|c| vmath::scaled_softcap(c, None, 1.0, cap));
        x
    }

    /// `d · (1 − (c / cap)²)` of `d` (f32, owning its buffer), in place,
    /// from the capped logits `c` of the same shape.
    pub(crate) fn softcap_grad(mut d: FlexTensor, c: &FlexTensor, cap: f32) -> FlexTensor {
        let c = c.to_contiguous();
        let cs = c.as_slice::<f32>().expect("f32 capped logits");
        let ds = d
            .try_storage_mut::<f32>()
            .expect("an f32 tensor of its own");
        assert_eq!(
            ds.len(),
            cs.len(),
            "the gradient and the logits differ in size"
        );
        ds.par_chunks_mut(CHUNK)
            .zip(cs.par_chunks(CHUNK))
            .for_each(|(d, c)| vmath::softcap_grad(d, c, cap));
        d
    }

    /// The logits' gradient, or `None` where this path does not apply.
    pub(crate) fn grad(
        logits: &FlexTensor,
        targets: &FlexTensor,
        lse: &FlexTensor,
        g: &FlexTensor,
    ) -> Option<FlexTensor> {
        let logits = logits.to_contiguous();
        let x = logits.as_slice::<f32>()?;
        let [n, vocab] = logits.layout().shape().dims::<2>();
        let t = indices(targets)?;
        let (lse, g) = (lse.to_contiguous(), g.to_contiguous());
        let (l, g) = (lse.as_slice::<f32>()?, g.as_slice::<f32>()?);
        if t.len() != n || l.len() != n || g.len() != n || vocab == 0 {
            return None;
        }
        let mut d = vec![0f32; n * vocab];
        d.par_chunks_mut(vocab)
            .with_min_len(ROWS_PER_TASK)
            .zip(x.par_chunks(vocab))
            .enumerate()
            .for_each(|(i, (out, row))| {
                let (li, gi) = (l[i], g[i]);
                vmath::exp_scaled(out, row, li, gi);
                out[t[i]] -= gi;
            });
        Some(flex_f32(d, [n, vocab]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, FloatDType, TensorData};

    type AD = Autodiff<Flex>;

    /// The composed expression the op replaces, differentiated by autodiff.
    fn composed(x: Tensor<AD, 2>, t: Tensor<AD, 2, Int>) -> Tensor<AD, 1> {
        let n = x.dims()[0];
        let x = to_f32(x);
        let max = x.clone().detach().max_dim(1);
        let lse = (x.clone() - max.clone()).exp().sum_dim(1).log() + max;
        (lse - x.gather(1, t)).reshape([n])
    }

    fn max_diff(a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) -> f32 {
        let a = a.cast(FloatDType::F32);
        let b = b.cast(FloatDType::F32);
        (a - b).abs().max().into_scalar()
    }

    /// Loss rows and the logits' gradient, with row weights as the decoder's
    /// mean gives them, against autodiff of the composed expression; logits
    /// far from 0 and one target at the row's largest logit.
    fn check(dtype: FloatDType, mean: bool, tol: f32) {
        let device = Default::default();
        let (n, vocab) = (7, 300);
        let x = Tensor::<Flex, 2>::random([n, vocab], Distribution::Normal(40.0, 8.0), &device)
            .cast(dtype);
        let mut targets: Vec<i64> = (0..n as i64).map(|i| (i * 37 + 5) % vocab as i64).collect();
        targets[3] = x
            .clone()
            .slice(3..4)
            .argmax(1)
            .into_data()
            .iter::<i64>()
            .next()
            .unwrap();
        let t = Tensor::<AD, 2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
        let w = Tensor::<AD, 1>::from_data(
            TensorData::new((1..=n).map(|i| i as f32 / 10.0).collect(), [n]),
            &device,
        );
        let run = |ours: bool| {
            let x = Tensor::<AD, 2>::from_inner(x.clone()).require_grad();
            let loss = if ours {
                cross_entropy(x.clone(), t.clone())
            } else {
                composed(x.clone(), t.clone())
            };
            // The mean's gradient reaches the op as a broadcast view.
            let total = if mean {
                loss.clone().mean()
            } else {
                (loss.clone() * w.clone()).sum()
            };
            let g = total.backward();
            let grad = x.grad(&g).unwrap();
            assert_eq!(grad.dtype(), DType::from(dtype), "gradient dtype");
            (loss.inner().reshape([1, n]), grad)
        };
        let ((loss, grad), (want_loss, want_grad)) = (run(true), run(false));
        assert_eq!(loss.dtype(), DType::F32);
        let (dl, dg) = (max_diff(loss, want_loss), max_diff(grad, want_grad));
        assert!(
            dl <= tol && dg <= tol,
            "{dtype:?}: loss off by {dl:e}, gradient by {dg:e}"
        );
    }

    #[test]
    fn matches_autodiff_of_the_composed_loss() {
        check(FloatDType::F32, false, 1e-5);
        check(FloatDType::F32, true, 1e-5);
    }

    #[test]
    fn bf16_logits_get_bf16_gradients() {
        // Both sides compute in f32 from the same bf16 values; the gradients
        // differ at most by one bf16 rounding of values below 0.7.
        check(FloatDType::BF16, false, 4e-3);
        check(FloatDType::BF16, true, 1e-3);
    }

    /// The fused LM head and loss against the head's matmul then the loss,
    /// under autodiff: the loss, and the gradients of `x` and of a plain,
    /// transposed (tied) or frozen head, scaled as gradient accumulation
    /// scales the loss; and the chunked forward pass with the chunk's
    /// gradients on the inner backend, three rows at a time.
    fn check_fused(dtype: FloatDType, tol: f32, cap: Option<f32>) {
        let device = Default::default();
        let (n, d, vocab) = (8, 24, 301);
        // Seeded here: the backend's generator is shared with other tests.
        let mut rng = crate::rng::Normal(crate::rng::SplitMix64(7));
        let mut rand = |s: [usize; 2], sd: f64| {
            let data: Vec<f32> = (0..s[0] * s[1]).map(|_| rng.sample(sd)).collect();
            Tensor::<Flex, 2>::from_data(TensorData::new(data, s), &device)
        };
        let x = rand([n, d], 1.0);
        let targets: Vec<i64> = (0..n as i64)
            .map(|i| (i * 53 + 11) % vocab as i64)
            .collect();
        let t = Tensor::<AD, 2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
        let heads = [
            ("plain", rand([d, vocab], 2.0), false),
            ("tied", rand([vocab, d], 2.0).transpose(), false),
            ("frozen", rand([d, vocab], 2.0), true),
        ];
        for (name, w, frozen) in heads {
            let run = |fused: bool| {
                let xa = Tensor::<AD, 2>::from_inner(x.clone()).require_grad();
                let wa = Tensor::<AD, 2>::from_inner(w.clone());
                let wa = if frozen { wa } else { wa.require_grad() };
                let (xc, wc) = (xa.clone().cast(dtype), wa.clone().cast(dtype));
                let loss = if fused {
                    linear_cross_entropy(xc, wc, t.clone(), cap)
                } else {
                    let logits = matmul_2d(xc, wc);
                    let logits = match cap {
                        Some(c) => softcap(logits, c),
                        None => logits,
                    };
                    cross_entropy(logits, t.clone()).mean()
                };
                let g = loss.clone().mul_scalar(0.3).backward();
                let value: f32 = loss.inner().into_scalar();
                (value, xa.grad(&g).unwrap(), wa.grad(&g))
            };
            let ((l, dx, dw), (wl, wdx, wdw)) = (run(true), run(false));
            assert!(
                (l - wl).abs() <= tol * wl.abs(),
                "{name} {dtype:?}: loss {l} vs {wl}"
            );
            let dxd = max_diff(dx, wdx);
            assert!(dxd <= tol, "{name} {dtype:?}: dx off by {dxd:e}");
            match (dw, wdw) {
                (Some(a), Some(b)) => {
                    let dwd = max_diff(a, b);
                    assert!(dwd <= tol, "{name} {dtype:?}: dw off by {dwd:e}");
                }
                (None, None) => assert!(frozen, "{name}: no weight gradient"),
                _ => panic!("{name}: a weight gradient on one side only"),
            }
        }
        // Three rows at a time on the inner backend, against one chunk.
        let w = rand([d, vocab], 2.0).cast(dtype);
        let x = x.cast(dtype);
        let t = t.inner();
        let go = |rows| {
            let (l, dx, dw) = linear_cross_entropy_of::<Flex>(
                x.clone().into_primitive().tensor(),
                w.clone().into_primitive().tensor(),
                t.clone().into_primitive(),
                cap,
                [true, true],
                rows,
            );
            let f = |p| Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(p));
            let l = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(l));
            (l.into_scalar(), f(dx.unwrap()), f(dw.unwrap()))
        };
        let ((l, dx, dw), (wl, wdx, wdw)) = (go(3), go(n));
        assert!(
            (l - wl).abs() <= 1e-6 * wl.abs(),
            "chunked loss {l} vs {wl}"
        );
        assert_eq!(dx.dtype(), DType::from(dtype));
        assert!(
            max_diff(dx, wdx) <= tol && max_diff(dw, wdw) <= tol,
            "chunked gradients"
        );
    }

    #[test]
    fn fused_head_and_loss_match_the_head_then_the_loss() {
        // f32: the gradients (up to ~0.5) to a few units in the last place,
        // the sums' order differing between the fused and plain passes.
        check_fused(FloatDType::F32, 1e-6, None);
        // In bf16 the gradients (below 1) are rounded at different points
        // (the loss's scale applied before or after the products).
        check_fused(FloatDType::BF16, 4e-3, None);
        // Soft-capped (the logits reach ±40 here, well into tanh's bend).
        check_fused(FloatDType::F32, 1e-6, Some(5.0));
        check_fused(FloatDType::BF16, 4e-3, Some(5.0));
    }

    /// Flex's own loop against the tensor-op version other backends run.
    #[test]
    fn flex_loop_matches_the_tensor_ops() {
        let device = Default::default();
        let (n, vocab) = (5, 1003);
        let x = Tensor::<Flex, 2>::random([n, vocab], Distribution::Normal(0.0, 30.0), &device);
        let t = Tensor::<Flex, 2, Int>::from_data(
            TensorData::new(vec![0i64, 1002, 7, 500, 7], [n, 1]),
            &device,
        );
        let g = Tensor::<Flex, 1>::from_data(
            TensorData::new(vec![0.5f32, -1.0, 2.0, 0.0, 1e-3], [n]),
            &device,
        );
        let (x_p, t_p, g_p) = (
            x.clone().into_primitive().tensor(),
            t.clone().into_primitive(),
            g.clone().into_primitive().tensor(),
        );
        let (loss, lse) = flex::lse(&x_p, &t_p).expect("f32 logits take the loop");
        let (want_loss, want_lse) = rows(x.clone(), t.clone());
        let float = |p| Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(p));
        let loss = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(loss));
        assert!(max_diff(loss.reshape([1, n]), want_loss.reshape([1, n])) <= 1e-4);
        assert!(max_diff(float(lse.clone()), want_lse.clone()) <= 1e-4);
        let d = flex::grad(&x_p, &t_p, &lse, &g_p).expect("f32 logits take the loop");
        assert!(max_diff(float(d), grad(x, t, float(lse), g)) <= 1e-6);
    }
}
