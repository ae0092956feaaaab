//! RMS normalisation `w * x / sqrt(mean(x²) + eps)` over the last axis as one
//! op.
//!
//! Composed from tensor ops, autodiff keeps `x²`, the root, its reciprocal,
//! the normalised `x` and the product per norm, two norms a layer, and its
//! backward pass runs one pass per op. This op keeps `x` and `w` only and
//! computes, with `n = x r`, `r = 1 / sqrt(mean(x²) + eps)` and `g = dy w`:
//! `dx = r (g - n mean(g n))` and `dw = Σ_rows dy n`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, Tensor, TensorMetadata, TensorPrimitive};

use super::backend::ModelBackend;
use super::binary_op::{self, BinaryGrad};

/// `w * x / sqrt(mean(x²) + eps)` over the last axis of `x`; `w: [hidden]`.
pub fn rms_norm<B: ModelBackend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::rms_norm(
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
        eps,
    )))
}

/// `x` as `[rows, hidden]`.
fn rows<B: Backend>(x: FloatTensor<B>) -> (Tensor<B, 2>, Shape) {
    let shape = x.shape();
    let hidden = shape.as_slice().last().copied().unwrap_or(1);
    let n = shape.num_elements() / hidden.max(1);
    let t = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::float_reshape(
        x,
        Shape::new([shape.num_elements()]),
    )));
    (t.reshape([n, hidden]), shape)
}

fn back<B: Backend, const D: usize>(t: Tensor<B, D>, shape: Shape) -> FloatTensor<B> {
    B::float_reshape(t.into_primitive().tensor(), shape)
}

fn vector<B: Backend>(w: FloatTensor<B>) -> Tensor<B, 1> {
    Tensor::from_primitive(TensorPrimitive::Float(w))
}

/// `(n, r)`: the normalised rows and each row's `1 / sqrt(mean(x²) + eps)`.
fn normed<B: Backend>(x: Tensor<B, 2>, eps: f64) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let r = x
        .clone()
        .square()
        .mean_dim(1)
        .add_scalar(eps)
        .sqrt()
        .recip();
    (x * r.clone(), r)
}

/// [`ModelBackend::rms_norm`] as tensor ops.
pub(crate) fn rms_norm_of<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    eps: f64,
) -> FloatTensor<B> {
    let (x, shape) = rows::<B>(x);
    let (n, _) = normed(x, eps);
    back(n * vector::<B>(w).unsqueeze::<2>(), shape)
}

/// [`ModelBackend::rms_norm_grad`] as tensor ops.
pub(crate) fn rms_norm_grad_of<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    dy: FloatTensor<B>,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (x, shape) = rows::<B>(x);
    let (dy, _) = rows::<B>(dy);
    let (n, r) = normed(x, eps);
    let g = dy.clone() * vector::<B>(w).unsqueeze::<2>();
    let mean = (g.clone() * n.clone()).mean_dim(1);
    let dx = (g - n.clone() * mean) * r;
    let hidden = n.dims()[1];
    let dw = (dy * n).sum_dim(0).reshape([hidden]);
    (back(dx, shape), dw.into_primitive().tensor())
}

/// [`ModelBackend::rms_norm`] under autodiff: the forward pass on the inner
/// backend; the backward pass keeps `x` and `w` only.
pub(crate) fn autodiff_rms_norm<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    eps: f64,
) -> FloatTensor<Autodiff<B, C>> {
    let out = B::rms_norm(x.primitive.clone(), w.primitive.clone(), eps);
    binary_op::record::<B, C, _>(RmsNormGrad { eps }, &x, &w, out)
}

#[derive(Debug)]
struct RmsNormGrad {
    eps: f64,
}

impl<B: ModelBackend> BinaryGrad<B> for RmsNormGrad {
    fn grads(
        self,
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        dy: FloatTensor<B>,
        _want: [bool; 2],
    ) -> [Option<FloatTensor<B>>; 2] {
        let (dx, dw) = B::rms_norm_grad(x, w, dy, self.eps);
        [Some(dx), Some(dw)]
    }
}

/// Flex, f32: rows in parallel; `dw`'s sum over rows in fixed blocks of
/// rows, added in order, so it is the same on any core count.
pub(crate) mod flex {
    use crate::model::backend::flex_f32;
    use crate::model::vmath;
    use burn_flex::FlexTensor;
    use rayon::prelude::*;

    /// Rows per block of the `dw` sum (and per rayon task).
    const ROWS: usize = 16;

    /// `(x, w, hidden)` as slices, where this path applies: f32, contiguous,
    /// `w` as long as `x`'s last axis.
    fn inputs<'a>(x: &'a FlexTensor, w: &'a FlexTensor) -> Option<(&'a [f32], &'a [f32], usize)> {
        let (xs, ws) = (x.as_slice::<f32>()?, w.as_slice::<f32>()?);
        let hidden = *x.layout().shape().as_slice().last()?;
        (hidden > 0 && ws.len() == hidden && w.layout().shape().num_dims() == 1)
            .then_some((xs, ws, hidden))
    }

    /// The normalised rows times `w`, or `None` where this path does not
    /// apply.
    pub(crate) fn rms_norm(x: &FlexTensor, w: &FlexTensor, eps: f64) -> Option<FlexTensor> {
        let (xs, ws, hidden) = inputs(x, w)?;
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(hidden)
            .with_min_len(ROWS)
            .zip(xs.par_chunks(hidden))
            .for_each(|(o, row)| vmath::rms_norm(o, row, ws, eps as f32));
        Some(flex_f32(out, x.layout().shape().clone()))
    }

    /// `(dx, dw)`, or `None` where this path does not apply.
    pub(crate) fn rms_norm_grad(
        x: &FlexTensor,
        w: &FlexTensor,
        dy: &FlexTensor,
        eps: f64,
    ) -> Option<(FlexTensor, FlexTensor)> {
        let (xs, ws, hidden) = inputs(x, w)?;
        let dys = dy.as_slice::<f32>()?;
        if dys.len() != xs.len() {
            return None;
        }
        let mut dx = vec![0f32; xs.len()];
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(hidden * ROWS)
            .zip(
                xs.par_chunks(hidden * ROWS)
                    .zip(dys.par_chunks(hidden * ROWS)),
            )
            .map(|(dx, (x, dy))| {
                let mut dw = vec![0f32; hidden];
                for ((dx, row), dy) in dx
                    .chunks_mut(hidden)
                    .zip(x.chunks(hidden))
                    .zip(dy.chunks(hidden))
                {
                    vmath::rms_norm_grad(dx, &mut dw, row, ws, dy, eps as f32);
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; hidden];
        for p in &partial {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        Some((
            flex_f32(dx, x.layout().shape().clone()),
            flex_f32(dw, [hidden]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type AD = Autodiff<Flex>;

    fn max_diff<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The composition the decoder used before, differentiated by autodiff.
    fn composed(x: Tensor<AD, 3>, w: Tensor<AD, 1>, eps: f64) -> Tensor<AD, 3> {
        let var = x.clone().square().mean_dim(2);
        x * var.add_scalar(eps).sqrt().recip() * w.unsqueeze::<3>()
    }

    /// Output and both gradients against autodiff of the composition, on
    /// Flex's loops (more rows than one block of the `dw` sum) and on the
    /// tensor ops other backends run.
    #[test]
    fn matches_autodiff_of_the_composition() {
        let device = Default::default();
        let (shape, eps) = ([3, 13, 43], 1e-6);
        let x = Tensor::<Flex, 3>::random(shape, Distribution::Normal(0.5, 2.0), &device);
        let w = Tensor::<Flex, 1>::random([43], Distribution::Normal(1.0, 0.3), &device);
        let dy = Tensor::<Flex, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| {
            let xa = Tensor::<AD, 3>::from_inner(x.clone()).require_grad();
            let wa = Tensor::<AD, 1>::from_inner(w.clone()).require_grad();
            let y = if ours {
                rms_norm(xa.clone(), wa.clone(), eps)
            } else {
                composed(xa.clone(), wa.clone(), eps)
            };
            let g = (y.clone() * Tensor::from_inner(dy.clone()))
                .sum()
                .backward();
            (y.inner(), xa.grad(&g).unwrap(), wa.grad(&g).unwrap())
        };
        let ((y, dx, dw), (wy, wdx, wdw)) = (run(true), run(false));
        assert!(max_diff(y, wy.clone()) < 1e-5, "output");
        assert!(max_diff(dx, wdx.clone()) < 1e-5, "dx");
        assert!(max_diff(dw, wdw.clone()) < 1e-4, "dw");
        let p = |t: Tensor<Flex, 3>| t.into_primitive().tensor();
        let y = Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(rms_norm_of::<Flex>(
            p(x.clone()),
            w.clone().into_primitive().tensor(),
            eps,
        )));
        assert!(max_diff(y, wy) < 1e-5, "tensor-op output");
        let (dx, dw) = rms_norm_grad_of::<Flex>(p(x), w.into_primitive().tensor(), p(dy), eps);
        let dx = Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(dx));
        let dw = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(dw));
        assert!(max_diff(dx, wdx) < 1e-5, "tensor-op dx");
        assert!(max_diff(dw, wdw) < 1e-4, "tensor-op dw");
    }
}
