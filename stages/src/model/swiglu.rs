//! The MLP's gated activation `silu(gate) * up` as one op, and Gemma's
//! `gelu_tanh(gate) * up` likewise.
//!
//! Composed from tensor ops, autodiff keeps `gate`, `sigmoid(gate)`,
//! `silu(gate)` and `up` per layer, and its backward pass runs one pass per
//! op (two products, the sigmoid's and silu's gradients, their sum). This op
//! keeps only `gate` and `up` and computes both gradients in one pass:
//! `d up = dout * silu(g)`, `d gate = dout * up * s * (1 + g (1 - s))` with
//! `s = sigmoid(g)`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::backend::ModelBackend;
use super::binary_op::{self, BinaryGrad};
use super::vmath::{GELU_A, GELU_C};

/// `silu(gate) * up`, elementwise; `gate` and `up` of one shape.
pub fn swiglu<B: ModelBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::swiglu(
        gate.into_primitive().tensor(),
        up.into_primitive().tensor(),
    )))
}

fn float<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 1> {
    let n = burn::tensor::TensorMetadata::shape(&t).num_elements();
    Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t)).reshape([n])
}

fn shaped<B: Backend>(t: Tensor<B, 1>, like: &FloatTensor<B>) -> FloatTensor<B> {
    let shape = burn::tensor::TensorMetadata::shape(like);
    B::float_reshape(t.into_primitive().tensor(), shape)
}

/// `gelu_tanh(gate) * up`, elementwise, GeLU's tanh approximation as
/// torch's `gelu(approximate="tanh")`; under autodiff the backward pass
/// keeps only `gate` and `up`.
pub fn geglu<B: ModelBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::geglu(
        gate.into_primitive().tensor(),
        up.into_primitive().tensor(),
    )))
}

/// `tanh(sqrt(2 / pi) * (g + 0.044715 g^3))`.
fn gelu_tanh_t<B: Backend>(g: Tensor<B, 1>) -> Tensor<B, 1> {
    let cube = g.clone() * g.clone() * g.clone();
    (g + cube.mul_scalar(GELU_A)).mul_scalar(GELU_C).tanh()
}

/// [`ModelBackend::geglu`] as tensor ops.
pub(crate) fn geglu_of<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let g = float::<B>(gate.clone());
    let t = gelu_tanh_t(g.clone());
    let out = g.mul(t.add_scalar(1.0)).mul_scalar(0.5) * float::<B>(up);
    shaped(out, &gate)
}

/// [`ModelBackend::geglu_grad`] as tensor ops: `d up = dout * gelu(g)`,
/// `d gate = dout * up * (0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3a g^2))`.
pub(crate) fn geglu_grad_of<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    dout: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (g, u, d) = (float::<B>(gate.clone()), float::<B>(up), float::<B>(dout));
    let t = gelu_tanh_t(g.clone());
    let du = d.clone() * g.clone().mul(t.clone().add_scalar(1.0)).mul_scalar(0.5);
    let slope = (g.clone() * g.clone())
        .mul_scalar(3.0 * GELU_A)
        .add_scalar(1.0)
        .mul_scalar(GELU_C);
    let sech2 = (t.clone() * t.clone()).neg().add_scalar(1.0);
    let dgelu = t.add_scalar(1.0).mul_scalar(0.5) + g.mul(sech2).mul(slope).mul_scalar(0.5);
    (shaped(d * u * dgelu, &gate), shaped(du, &gate))
}

/// [`ModelBackend::geglu`] under autodiff: the forward pass on the inner
/// backend; the backward pass keeps `gate` and `up` only.
pub(crate) fn autodiff_geglu<B: ModelBackend, C: CheckpointStrategy>(
    gate: FloatTensor<Autodiff<B, C>>,
    up: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let out = B::geglu(gate.primitive.clone(), up.primitive.clone());
    binary_op::record::<B, C, _>(Gate::GeluTanh, &gate, &up, out)
}

/// [`ModelBackend::swiglu`] as tensor ops.
pub(crate) fn swiglu_of<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let out = silu(float::<B>(gate.clone())) * float::<B>(up);
    shaped(out, &gate)
}

/// [`ModelBackend::swiglu_grad`] as tensor ops.
pub(crate) fn swiglu_grad_of<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    dout: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (g, u, d) = (float::<B>(gate.clone()), float::<B>(up), float::<B>(dout));
    let s = sigmoid(g.clone());
    let du = d.clone() * g.clone() * s.clone();
    let dg = d * u * s.clone() * (g * (s.neg().add_scalar(1.0))).add_scalar(1.0);
    (shaped(dg, &gate), shaped(du, &gate))
}

/// [`ModelBackend::swiglu`] under autodiff: the forward pass on the inner
/// backend; the backward pass keeps `gate` and `up` only.
pub(crate) fn autodiff_swiglu<B: ModelBackend, C: CheckpointStrategy>(
    gate: FloatTensor<Autodiff<B, C>>,
    up: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let out = B::swiglu(gate.primitive.clone(), up.primitive.clone());
    binary_op::record::<B, C, _>(Gate::Silu, &gate, &up, out)
}

/// gpt-oss's clamped SwiGLU, `(clamp(up, ±limit) + 1) · g σ(alpha g)` with
/// `g = min(gate, limit)`, elementwise; under autodiff the backward pass
/// keeps only `gate` and `up`.
pub fn clamped_swiglu<B: ModelBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
    alpha: f32,
    limit: f32,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::clamped_swiglu(
        gate.into_primitive().tensor(),
        up.into_primitive().tensor(),
        alpha,
        limit,
    )))
}

/// [`ModelBackend::clamped_swiglu`] as tensor ops.
pub(crate) fn clamped_swiglu_of<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    alpha: f32,
    limit: f32,
) -> FloatTensor<B> {
    let g = float::<B>(gate.clone()).clamp_max(limit);
    let u = float::<B>(up).clamp(-limit, limit);
    let out = (u + 1.0) * g.clone() * sigmoid(g.mul_scalar(alpha));
    shaped(out, &gate)
}

/// [`ModelBackend::clamped_swiglu_grad`] as tensor ops (see
/// [`super::vmath::clamped_swiglu_grad`]).
pub(crate) fn clamped_swiglu_grad_of<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    dout: FloatTensor<B>,
    alpha: f32,
    limit: f32,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (g, u, d) = (float::<B>(gate.clone()), float::<B>(up), float::<B>(dout));
    let (g_in, u_in) = (
        g.clone().lower_equal_elem(limit),
        u.clone().abs().lower_equal_elem(limit),
    );
    let gc = g.clamp_max(limit);
    let s = sigmoid(gc.clone().mul_scalar(alpha));
    let du = (d.clone() * gc.clone() * s.clone()).mask_fill(u_in.bool_not(), 0.0);
    let slope = (gc * s.clone().neg().add_scalar(1.0))
        .mul_scalar(alpha)
        .add_scalar(1.0);
    let dg = d * (u.clamp(-limit, limit) + 1.0) * s * slope;
    (
        shaped(dg.mask_fill(g_in.bool_not(), 0.0), &gate),
        shaped(du, &gate),
    )
}

/// [`ModelBackend::clamped_swiglu`] under autodiff.
pub(crate) fn autodiff_clamped_swiglu<B: ModelBackend, C: CheckpointStrategy>(
    gate: FloatTensor<Autodiff<B, C>>,
    up: FloatTensor<Autodiff<B, C>>,
    alpha: f32,
    limit: f32,
) -> FloatTensor<Autodiff<B, C>> {
    let out = B::clamped_swiglu(gate.primitive.clone(), up.primitive.clone(), alpha, limit);
    binary_op::record::<B, C, _>(Gate::Clamped { alpha, limit }, &gate, &up, out)
}

/// The backward pass of a gated activation, by its gate function.
#[derive(Debug, Clone, Copy)]
enum Gate {
    Silu,
    GeluTanh,
    Clamped { alpha: f32, limit: f32 },
}

impl<B: ModelBackend> BinaryGrad<B> for Gate {
    fn grads(
        self,
        gate: FloatTensor<B>,
        up: FloatTensor<B>,
        dout: FloatTensor<B>,
        _want: [bool; 2],
    ) -> [Option<FloatTensor<B>>; 2] {
        let (dg, du) = match self {
            Gate::Silu => B::swiglu_grad(gate, up, dout),
            Gate::GeluTanh => B::geglu_grad(gate, up, dout),
            Gate::Clamped { alpha, limit } => B::clamped_swiglu_grad(gate, up, dout, alpha, limit),
        };
        [Some(dg), Some(du)]
    }
}

/// Flex, f32: one parallel pass over contiguous inputs of one shape.
pub(crate) mod flex {
    use crate::model::backend::flex_f32;
    use crate::model::vmath;
    use burn_flex::FlexTensor;
    use rayon::prelude::*;

    /// Elements per rayon task.
    const CHUNK: usize = 1 << 14;

    fn slices<'a>(ts: &[&'a FlexTensor]) -> Option<Vec<&'a [f32]>> {
        let shape = ts.first()?.layout().shape();
        ts.iter()
            .map(|t| {
                (t.layout().shape() == shape)
                    .then(|| t.as_slice::<f32>())
                    .flatten()
            })
            .collect()
    }

    /// `f(out, gate, up)` over chunks in parallel, or `None` where this path
    /// does not apply (not f32, not contiguous, shapes that differ).
    fn map2(
        gate: &FlexTensor,
        up: &FlexTensor,
        f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
    ) -> Option<FlexTensor> {
        let [g, u] = slices(&[gate, up])?[..] else {
            return None;
        };
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| f(o, g, u));
        Some(flex_f32(out, gate.layout().shape().clone()))
    }

    /// `f(d gate, d up, gate, up, dout)` over chunks in parallel, or `None`
    /// where this path does not apply.
    fn grad2(
        gate: &FlexTensor,
        up: &FlexTensor,
        dout: &FlexTensor,
        f: impl Fn(&mut [f32], &mut [f32], &[f32], &[f32], &[f32]) + Sync,
    ) -> Option<(FlexTensor, FlexTensor)> {
        let [g, u, d] = slices(&[gate, up, dout])?[..] else {
            return None;
        };
        let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .zip(d.par_chunks(CHUNK))
            .for_each(|(((dg, du), (g, u)), d)| f(dg, du, g, u, d));
        let shape = gate.layout().shape();
        Some((flex_f32(dg, shape.clone()), flex_f32(du, shape.clone())))
    }

    /// `silu(gate) * up` ([`map2`]).
    pub(crate) fn swiglu(gate: &FlexTensor, up: &FlexTensor) -> Option<FlexTensor> {
        map2(gate, up, vmath::swiglu)
    }

    /// SwiGLU's `(d gate, d up)` ([`grad2`]).
    pub(crate) fn swiglu_grad(
        gate: &FlexTensor,
        up: &FlexTensor,
        dout: &FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor)> {
        grad2(gate, up, dout, vmath::swiglu_grad)
    }

    /// gpt-oss's clamped SwiGLU ([`map2`]).
    pub(crate) fn clamped_swiglu(
        gate: &FlexTensor,
        up: &FlexTensor,
        alpha: f32,
        limit: f32,
    ) -> Option<FlexTensor> {
        map2(gate, up, |o, g, u| {
            vmath::clamped_swiglu(o, g, u, alpha, limit)
        })
    }

    /// The clamped SwiGLU's `(d gate, d up)` ([`grad2`]).
    pub(crate) fn clamped_swiglu_grad(
        gate: &FlexTensor,
        up: &FlexTensor,
        dout: &FlexTensor,
        alpha: f32,
        limit: f32,
    ) -> Option<(FlexTensor, FlexTensor)> {
        grad2(gate, up, dout, |dg, du, g, u, d| {
            vmath::clamped_swiglu_grad(dg, du, g, u, d, alpha, limit)
        })
    }

    /// `gelu_tanh(gate) * up` ([`map2`]).
    pub(crate) fn geglu(gate: &FlexTensor, up: &FlexTensor) -> Option<FlexTensor> {
        map2(gate, up, vmath::geglu)
    }

    /// GeGLU's `(d gate, d up)` ([`grad2`]).
    pub(crate) fn geglu_grad(
        gate: &FlexTensor,
        up: &FlexTensor,
        dout: &FlexTensor,
    ) -> Option<(FlexTensor, FlexTensor)> {
        grad2(gate, up, dout, vmath::geglu_grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type AD = Autodiff<Flex>;

    fn max_diff(a: Tensor<Flex, 3>, b: Tensor<Flex, 3>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    type Gated = fn(Tensor<AD, 3>, Tensor<AD, 3>) -> Tensor<AD, 3>;
    type Of = fn(FloatTensor<Flex>, FloatTensor<Flex>) -> FloatTensor<Flex>;
    type GradOf = fn(
        FloatTensor<Flex>,
        FloatTensor<Flex>,
        FloatTensor<Flex>,
    ) -> (FloatTensor<Flex>, FloatTensor<Flex>);

    /// Output and both gradients of `ours` (Flex's loops, under autodiff)
    /// and of the tensor-op versions `of` and `grad_of` (which a GPU runs)
    /// against autodiff of `reference`, with gates of standard deviation
    /// `gate_sd`; gate gradients to 1e-5 of their largest magnitude.
    fn check_gated(ours: Gated, reference: Gated, of: Of, grad_of: GradOf, gate_sd: f64) {
        let device = Default::default();
        let shape = [3, 7, 130];
        let rand =
            |sd: f64| Tensor::<Flex, 3>::random(shape, Distribution::Normal(0.0, sd), &device);
        let (g, u, dout) = (rand(gate_sd), rand(1.0), rand(1.0));
        let run = |f: Gated| {
            let ga = Tensor::<AD, 3>::from_inner(g.clone()).require_grad();
            let ua = Tensor::<AD, 3>::from_inner(u.clone()).require_grad();
            let y = f(ga.clone(), ua.clone());
            let grads = (y.clone() * Tensor::from_inner(dout.clone()))
                .sum()
                .backward();
            (
                y.inner(),
                ga.grad(&grads).unwrap(),
                ua.grad(&grads).unwrap(),
            )
        };
        let ((y, dg, du), (wy, wdg, wdu)) = (run(ours), run(reference));
        let scale = wdg.clone().abs().max().into_scalar().max(1.0);
        assert!(max_diff(y, wy.clone()) < 1e-5, "output");
        assert!(max_diff(dg, wdg.clone()) < 1e-5 * scale, "d gate");
        assert!(max_diff(du, wdu.clone()) < 1e-5, "d up");
        let p = |t: &Tensor<Flex, 3>| t.clone().into_primitive().tensor();
        let t = |x: FloatTensor<Flex>| Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(x));
        assert!(max_diff(t(of(p(&g), p(&u))), wy) < 1e-5, "tensor-op output");
        let (dg, du) = grad_of(p(&g), p(&u), p(&dout));
        assert!(max_diff(t(dg), wdg) < 1e-5 * scale, "tensor-op d gate");
        assert!(max_diff(t(du), wdu) < 1e-5, "tensor-op d up");
    }

    /// SwiGLU against autodiff of `silu(gate) * up`, with gates far into
    /// both tails of the sigmoid.
    #[test]
    fn matches_autodiff_of_silu_times_up() {
        check_gated(
            swiglu,
            |g, u| silu(g) * u,
            swiglu_of::<Flex>,
            swiglu_grad_of::<Flex>,
            6.0,
        );
    }

    /// The clamped SwiGLU (at limit 1.5, so that most gates and ups clamp)
    /// against autodiff of its composition from burn's ops.
    #[test]
    fn clamped_swiglu_matches_autodiff_of_its_composition() {
        check_gated(
            |g, u| clamped_swiglu(g, u, 1.702, 1.5),
            |g, u| {
                let g = g.clamp_max(1.5);
                (u.clamp(-1.5, 1.5) + 1.0) * g.clone() * sigmoid(g.mul_scalar(1.702))
            },
            |g, u| clamped_swiglu_of::<Flex>(g, u, 1.702, 1.5),
            |g, u, d| clamped_swiglu_grad_of::<Flex>(g, u, d, 1.702, 1.5),
            3.0,
        );
    }

    /// GeGLU against autodiff of burn's own `gelu_approximate(gate) * up`
    /// (torch's tanh GeLU).
    #[test]
    fn geglu_matches_autodiff_of_gelu_times_up() {
        check_gated(
            geglu,
            |g, u| burn::tensor::activation::gelu_approximate(g) * u,
            geglu_of::<Flex>,
            geglu_grad_of::<Flex>,
            3.0,
        );
    }
}
