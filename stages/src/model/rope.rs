//! Rotary position embedding (HF's rotate-half form) as one op.
//!
//! `out = x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2,
//! x1]` over the last axis. Composed from tensor ops that is a negation, a
//! concatenation and three products and sums, and autodiff of it keeps `x`,
//! the rotated copy and the tables, then splits and pads the gradient back
//! through the concatenation. As one op it is one pass each way and keeps
//! only the tables, which are constants: the gradient is `dx1 = dy1 * cos1 +
//! dy2 * sin2`, `dx2 = dy2 * cos2 - dy1 * sin1`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::attention::float;
use super::backend::ModelBackend;

/// `x * cos + rotate_half(x) * sin` on `[batch, seq, heads, head_dim]`; the
/// tables have `x`'s shape.
pub fn rope<B: ModelBackend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [cos, sin] = [cos, sin].map(|t| t.clone().into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(B::rope(
        x.into_primitive().tensor(),
        cos,
        sin,
    )))
}

/// The two halves of the last axis.
fn halves<B: Backend>(t: Tensor<B, 4>) -> [Tensor<B, 4>; 2] {
    let half = t.dims()[3] / 2;
    [t.clone().narrow(3, 0, half), t.narrow(3, half, half)]
}

/// [`ModelBackend::rope`] as tensor ops.
pub(crate) fn rope_of<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let x = float::<B>(x);
    let [x1, x2] = halves(x.clone());
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    (x * float::<B>(cos) + rotated * float::<B>(sin))
        .into_primitive()
        .tensor()
}

/// [`ModelBackend::rope_grad`] as tensor ops.
pub(crate) fn rope_grad_of<B: Backend>(
    dy: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let [dy1, dy2] = halves(float::<B>(dy));
    let [c1, c2] = halves(float::<B>(cos));
    let [s1, s2] = halves(float::<B>(sin));
    let dx1 = dy1.clone() * c1 + dy2.clone() * s2;
    let dx2 = dy2 * c2 - dy1 * s1;
    Tensor::cat(vec![dx1, dx2], 3).into_primitive().tensor()
}

/// [`ModelBackend::rope`] under autodiff: the forward pass on the inner
/// backend; the backward pass keeps the tables only (they get no gradient).
pub(crate) fn autodiff_rope<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    cos: FloatTensor<Autodiff<B, C>>,
    sin: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let out = B::rope(x.primitive, cos.primitive.clone(), sin.primitive.clone());
    match RopeBackward
        .prepare::<C>([x.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((cos.primitive, sin.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: ModelBackend> Backward<B, 1> for RopeBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let dy = grads.consume::<B>(&ops.node);
        if let [Some(parent)] = ops.parents {
            let (cos, sin) = ops.state;
            grads.register::<B>(parent.id, B::rope_grad(dy, cos, sin));
        }
    }
}

/// Flex, f32: one parallel pass over contiguous tensors of one shape.
pub(crate) mod flex {
    use crate::model::backend::flex_f32;
    use crate::model::vmath;
    use burn_flex::FlexTensor;
    use rayon::prelude::*;

    /// Rows (of `head_dim`) per rayon task.
    const ROWS: usize = 256;

    /// A per-row kernel: `(out, input, cos, sin)`.
    type RowFn = fn(&mut [f32], &[f32], &[f32], &[f32]);

    /// The three tensors as slices and the row length, where this path
    /// applies: f32, contiguous, one shape, an even last axis.
    fn inputs(ts: [&FlexTensor; 3]) -> Option<([&[f32]; 3], usize)> {
        let shape = ts[0].layout().shape();
        let d = *shape.as_slice().last()?;
        if d == 0 || d % 2 != 0 || ts.iter().any(|t| t.layout().shape() != shape) {
            return None;
        }
        let [a, b, c] = ts.map(|t| t.as_slice::<f32>());
        Some(([a?, b?, c?], d))
    }

    fn each_row([a, cos, sin]: [&[f32]; 3], d: usize, f: RowFn) -> Vec<f32> {
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(d * ROWS)
            .zip(a.par_chunks(d * ROWS))
            .zip(cos.par_chunks(d * ROWS).zip(sin.par_chunks(d * ROWS)))
            .for_each(|((o, a), (c, s))| {
                let rows = o.chunks_mut(d).zip(a.chunks(d));
                for ((o, a), (c, s)) in rows.zip(c.chunks(d).zip(s.chunks(d))) {
                    f(o, a, c, s);
                }
            });
        out
    }

    /// The rotated `x`, or `None` where this path does not apply.
    pub(crate) fn rope(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor) -> Option<FlexTensor> {
        let (slices, d) = inputs([x, cos, sin])?;
        let out = each_row(slices, d, vmath::rope);
        Some(flex_f32(out, x.layout().shape().clone()))
    }

    /// `dx` for the output's gradient `dy`, or `None` where this path does
    /// not apply.
    pub(crate) fn rope_grad(
        dy: &FlexTensor,
        cos: &FlexTensor,
        sin: &FlexTensor,
    ) -> Option<FlexTensor> {
        let (slices, d) = inputs([dy, cos, sin])?;
        let dx = each_row(slices, d, vmath::rope_grad);
        Some(flex_f32(dx, dy.layout().shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type AD = Autodiff<Flex>;

    fn max_diff(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Output and gradient against autodiff of the composition, on Flex's
    /// loops and on the tensor ops other backends run; a transposed (not
    /// contiguous) input takes the tensor ops on Flex too.
    #[test]
    fn matches_autodiff_of_the_composition() {
        let device = Default::default();
        let shape = [2, 37, 3, 10];
        let rand =
            |mean| Tensor::<Flex, 4>::random(shape, Distribution::Normal(mean, 1.0), &device);
        let (x, cos, sin, dy) = (rand(0.3), rand(0.5), rand(-0.2), rand(0.0));
        let run = |ours: bool, x: Tensor<Flex, 4>| {
            let xa = Tensor::<AD, 4>::from_inner(x).require_grad();
            let (c, s) = (
                Tensor::<AD, 4>::from_inner(cos.clone()),
                Tensor::<AD, 4>::from_inner(sin.clone()),
            );
            let y = if ours {
                rope(xa.clone(), &c, &s)
            } else {
                let x = xa.clone().into_primitive().tensor();
                let (c, s) = (c.into_primitive().tensor(), s.into_primitive().tensor());
                Tensor::from_primitive(TensorPrimitive::Float(rope_of::<AD>(x, c, s)))
            };
            let g = (y.clone() * Tensor::from_inner(dy.clone()))
                .sum()
                .backward();
            (y.inner(), xa.grad(&g).unwrap())
        };
        let (want_y, want_dx) = run(false, x.clone());
        let (y, dx) = run(true, x.clone());
        assert_eq!(max_diff(y, want_y.clone()), 0.0, "output");
        assert!(max_diff(dx, want_dx.clone()) < 1e-6, "dx");
        // A view that is not contiguous: Flex falls back to the tensor ops.
        let view = Tensor::<Flex, 4>::random([2, 3, 37, 10], Distribution::Default, &device)
            .swap_dims(1, 2);
        let ((y, dx), (wy, wdx)) = (run(true, view.clone()), run(false, view));
        assert_eq!(max_diff(y, wy), 0.0, "view output");
        assert!(max_diff(dx, wdx) < 1e-6, "view dx");
        let p = |t: &Tensor<Flex, 4>| t.clone().into_primitive().tensor();
        let y = float::<Flex>(rope_of::<Flex>(p(&x), p(&cos), p(&sin)));
        assert_eq!(max_diff(y, want_y), 0.0, "tensor-op output");
        let dx = float::<Flex>(rope_grad_of::<Flex>(p(&dy), p(&cos), p(&sin)));
        assert!(max_diff(dx, want_dx) < 1e-6, "tensor-op dx");
    }
}
