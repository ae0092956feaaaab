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
use burn::tensor::{DType, FloatDType, IndexingUpdateOp, Int, Tensor, TensorPrimitive};

use super::attention::ModelBackend;

/// `x` in f32, without a copy when it already is.
fn f32<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(FloatDType::F32)
    }
}

/// Per-row losses `[n]` and log-sum-exps `[n, 1]`, in f32, of `logits:
/// [n, vocab]` (any float dtype) against `targets: [n, 1]`.
pub(crate) fn rows<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let n = logits.dims()[0];
    let x = f32(logits);
    let max = x.clone().max_dim(1);
    let lse = (x.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let target = x.gather(1, targets);
    ((lse.clone() - target).reshape([n]), lse)
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
    let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(logits.primitive.clone()));
    let t = Tensor::<B, 2, Int>::from_primitive(targets.clone());
    let (loss, lse) = rows(x, t);
    let loss = loss.into_primitive().tensor();
    match CrossEntropyBackward
        .prepare::<C>([logits.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            (logits.primitive, targets, lse.into_primitive().tensor()),
            loss,
        ),
        OpsKind::UnTracked(prep) => prep.finish(loss),
    }
}

/// `d logits = (softmax(logits) - onehot(targets)) * g`, `g` the rows'
/// gradient, in the logits' dtype.
#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: Backend> Backward<B, 1> for CrossEntropyBackward {
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
        let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(logits));
        let dtype = x.dtype();
        let n = x.dims()[0];
        let g = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(g)).reshape([n, 1]);
        let lse = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(lse));
        let targets = Tensor::<B, 2, Int>::from_primitive(targets);
        let d =
            (f32(x) - lse)
                .exp()
                .mul(g.clone())
                .scatter(1, targets, g.neg(), IndexingUpdateOp::Add);
        let d = if dtype == DType::F32 {
            d
        } else {
            d.cast(FloatDType::from(dtype))
        };
        grads.register::<B>(parent.id, d.into_primitive().tensor());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type AD = Autodiff<Flex>;

    /// The composed expression the op replaces, differentiated by autodiff.
    fn composed(x: Tensor<AD, 2>, t: Tensor<AD, 2, Int>) -> Tensor<AD, 1> {
        let n = x.dims()[0];
        let x = f32(x);
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
    fn check(dtype: FloatDType, tol: f32) {
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
            let g = (loss.clone() * w.clone()).sum().backward();
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
        check(FloatDType::F32, 1e-5);
    }

    #[test]
    fn bf16_logits_get_bf16_gradients() {
        // Both sides compute in f32 from the same bf16 values; the gradients
        // differ at most by one bf16 rounding of values below 0.7.
        check(FloatDType::BF16, 4e-3);
    }
}
