//! The projections' 2-d matmul as its own op.
//!
//! On Flex, burn's matmul allocates its output as bytes and then copies the
//! whole buffer once more to realign it (`FlexTensor::empty` in burn-flex
//! 0.21), so each projection's output, and each of its gradients, was
//! written twice and faulted in twice: for a 152k-vocabulary LM head over
//! 8k tokens that is 5 GB more traffic and a transient 5 GB copy. Here gemm
//! writes straight into the output's own `Vec<f32>`. The backward pass is
//! the usual two products, `dx = g wᵀ` and `dw = xᵀ g`, each only when its
//! input needs a gradient (LoRA's frozen base weights do not).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use super::attention::to;
use super::backend::ModelBackend;
use super::binary_op::{self, BinaryGrad};

/// `x · w` for `x: [m, k]` and `w: [k, n]`.
pub fn matmul_2d<B: ModelBackend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::matmul_2d(
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
    )))
}

/// [`ModelBackend::matmul_2d`] under autodiff.
pub(crate) fn autodiff_matmul_2d<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let out = B::matmul_2d(x.primitive.clone(), w.primitive.clone());
    binary_op::record::<B, C, _>(Matmul2dGrad, &x, &w, out)
}

/// `dx = g wᵀ`, `dw = xᵀ g`, each only where wanted.
#[derive(Debug)]
struct Matmul2dGrad;

impl<B: ModelBackend> BinaryGrad<B> for Matmul2dGrad {
    fn grads(
        self,
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        g: FloatTensor<B>,
        want: [bool; 2],
    ) -> [Option<FloatTensor<B>>; 2] {
        let dw = want[1].then(|| B::matmul_2d(B::float_transpose(x), g.clone()));
        let dx = want[0].then(|| B::matmul_2d(g, B::float_transpose(w)));
        [dx, dw]
    }
}

/// A contraction length that is a multiple of this (or odd) is safe from the
/// double-buffered GPU kernels' overread (see [`safe_contraction`]).
const SAFE_K: usize = 64;

/// The contraction length `k` padded (with zeros) so that burn 0.21's GPU
/// matmuls compute it right. Its double-buffered kernels (cubek-matmul 0.2:
/// double-buffered unit, plane and vector-matrix, ordered and specialized)
/// consume the contraction two stages at a time, round an odd stage count
/// up and keep the bounds check off whenever `k` is a multiple of one
/// stage's `k` extent: for `k` an odd multiple of it they add one stage of
/// whatever lies past the operands (the specialized kernels' case is
/// tracel-ai/cubek#434). With both other sides above 1, the extents of the
/// kernels burn tunes are 2 to 32 elements on 32-lane GPUs, so an odd `k`
/// (the check stays on) and a multiple of 64 (an even stage count) are safe;
/// the GPU matmul (`gpu`, built with a GPU feature) also keeps both other
/// sides above 1, since the vector kernels' extents reach 256. Seen on wgpu:
/// a `[2, 520] · [520, 16]` product 2.2 off, and a SmolLM3 greedy decode
/// that diverged at its 520th key.
pub fn safe_contraction(k: usize) -> usize {
    if k % 2 == 1 || k.is_multiple_of(SAFE_K) {
        k
    } else {
        k.next_multiple_of(SAFE_K)
    }
}

/// `a: [.., m, k]` and `b: [.., k, n]` with `k` zero-padded to
/// [`safe_contraction`]: the same product, computed right on the GPU.
pub fn pad_contraction<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> (Tensor<B, D>, Tensor<B, D>) {
    let k = a.dims()[D - 1];
    let padded = safe_contraction(k);
    if padded == k {
        return (a, b);
    }
    (
        append_zeros(a, D - 1, padded - k),
        append_zeros(b, D - 2, padded - k),
    )
}

/// `t` with `n` zeros appended along `axis`, in `t`'s dtype.
fn append_zeros<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    axis: usize,
    n: usize,
) -> Tensor<B, D> {
    let mut shape = t.dims();
    shape[axis] = n;
    let zeros = to(Tensor::<B, D>::zeros(shape, &t.device()), t.dtype());
    Tensor::cat(vec![t, zeros], axis)
}

/// [`ModelBackend::matmul_2d`] and [`ModelBackend::batched_matmul`] on a GPU:
/// burn's matmul with the contraction padded by [`pad_contraction`], and a
/// zero row (column) added to a one-row left (one-column right) operand, so
/// that burn never runs its vector kernels, whose stage `k` reaches 256
/// elements (`32 lanes * 8` bf16 values), and the padding to 64 suffices.
#[cfg(any(feature = "cuda", feature = "gpu-on-wgpu"))]
pub(crate) fn gpu<B: Backend, const D: usize>(
    a: FloatTensor<B>,
    b: FloatTensor<B>,
) -> FloatTensor<B> {
    let float = |t| Tensor::<B, D>::from_primitive(TensorPrimitive::Float(t));
    let (a, b) = pad_contraction(float(a), float(b));
    let (m, n) = (a.dims()[D - 2], b.dims()[D - 1]);
    let a = if m == 1 { append_zeros(a, D - 2, 1) } else { a };
    let b = if n == 1 { append_zeros(b, D - 1, 1) } else { b };
    let mut y = a.matmul(b);
    if m == 1 {
        y = y.narrow(D - 2, 0, 1);
    }
    if n == 1 {
        y = y.narrow(D - 1, 0, 1);
    }
    y.into_primitive().tensor()
}

/// Flex, f32: gemm into the output's own buffer.
pub(crate) mod flex {
    use crate::model::backend::flex_f32;
    use burn::tensor::DType;
    use burn_flex::FlexTensor;

    /// Products of at least this many multiply-adds use every core (as
    /// burn-flex's own matmul decides).
    pub(super) const PARALLEL_MACS: usize = 192 * 192 * 192;

    /// The shapes of `a` and `b`, where both are of `dtype` and `D`-d.
    fn dims_of<const D: usize>(
        a: &FlexTensor,
        b: &FlexTensor,
        dtype: DType,
    ) -> Option<([usize; D], [usize; D])> {
        let dims = |t: &FlexTensor| {
            let shape = t.layout().shape();
            (t.dtype() == dtype && shape.num_dims() == D).then(|| shape.dims::<D>())
        };
        Some((dims(a)?, dims(b)?))
    }

    /// The `[m, k] · [k, n]` product at `lhs` and `rhs` (each with its
    /// `[row, column]` strides) written row-major to `dst`.
    ///
    /// # Safety
    /// `lhs` and `rhs` with their strides must address elements of live
    /// storage, and `dst` must be valid for `m * n` writes; gemm writes every
    /// one of them without reading them (`read_dst` false).
    unsafe fn gemm_into(
        dst: *mut f32,
        [m, k, n]: [usize; 3],
        lhs: *const f32,
        lhs_strides: [isize; 2],
        rhs: *const f32,
        rhs_strides: [isize; 2],
        parallelism: gemm::Parallelism,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                n as isize,
                false,
                lhs,
                lhs_strides[1],
                lhs_strides[0],
                rhs,
                rhs_strides[1],
                rhs_strides[0],
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    }

    /// `x · w`, or `None` where this path does not apply (not f32 or bf16,
    /// not 2-d, an empty dimension, or shapes that do not chain).
    pub(crate) fn matmul_2d(x: &FlexTensor, w: &FlexTensor) -> Option<FlexTensor> {
        let dtype = x.dtype();
        let ([m, k], [k2, n]) = dims_of::<2>(x, w, dtype)?;
        if k != k2 || m == 0 || n == 0 || k == 0 {
            return None;
        }
        match dtype {
            DType::F32 => {}
            DType::BF16 => return matmul_2d_bf16(x, w, [m, k, n]),
            _ => return None,
        }
        let (lx, lw) = (x.layout(), w.layout());
        let (xs, ws) = (lx.strides(), lw.strides());
        // SAFETY: the layouts' offsets and strides address elements inside
        // their storage (burn-flex keeps them so).
        let out = unsafe {
            product(
                [m, k, n],
                x.storage::<f32>().as_ptr().add(lx.start_offset()),
                [xs[0], xs[1]],
                w.storage::<f32>().as_ptr().add(lw.start_offset()),
                [ws[0], ws[1]],
            )
        };
        Some(flex_f32(out, [m, n]))
    }

    /// The `[m, k] · [k, n]` product at `lhs` and `rhs` (each with its
    /// `[row, column]` strides) in a new row-major buffer, on every core
    /// when it is large.
    ///
    /// # Safety
    /// As [`gemm_into`] for `lhs` and `rhs`.
    unsafe fn product(
        [m, k, n]: [usize; 3],
        lhs: *const f32,
        lhs_strides: [isize; 2],
        rhs: *const f32,
        rhs_strides: [isize; 2],
    ) -> Vec<f32> {
        let parallelism = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MACS {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        // SAFETY: the caller's contract for the operands; gemm writes all
        // `m * n` outputs before `set_len` exposes them.
        unsafe {
            gemm_into(
                out.as_mut_ptr(),
                [m, k, n],
                lhs,
                lhs_strides,
                rhs,
                rhs_strides,
                parallelism,
            );
            out.set_len(m * n);
        }
        out
    }

    /// `x · w` for bf16 operands as burn-flex computes it (both widened to
    /// f32, an f32 gemm, the result rounded to bf16), but widening each
    /// operand where it lies, a transposed view included, where burn-flex
    /// first copies a view into a contiguous bf16 tensor and then widens it
    /// element by element; `None` for layouts that are not one block.
    fn matmul_2d_bf16(x: &FlexTensor, w: &FlexTensor, [m, k, n]: [usize; 3]) -> Option<FlexTensor> {
        let (xf, xs) = widen_block(x)?;
        let (wf, ws) = widen_block(w)?;
        // SAFETY: `widen_block` gives buffers of `rows * cols` values laid
        // out by the strides it returns.
        let out = unsafe { product([m, k, n], xf.as_ptr(), xs, wf.as_ptr(), ws) };
        let rounded: Vec<half::bf16> = out
            .iter()
            .map(|&v| half::bf16::from_bits(bf16_bits(v)))
            .collect();
        Some(FlexTensor::new(
            burn::tensor::Bytes::from_elems(rounded),
            burn_flex::Layout::contiguous([m, n].into()),
            DType::BF16,
        ))
    }

    /// A 2-d bf16 tensor's values widened to f32 in the order they lie in
    /// storage, with the `[row, column]` strides that address them there;
    /// `None` unless the layout covers one contiguous block, row- or
    /// column-major.
    fn widen_block(t: &FlexTensor) -> Option<(Vec<f32>, [isize; 2])> {
        let layout = t.layout();
        let [r, c] = layout.shape().dims::<2>();
        let s = layout.strides();
        let (ri, ci) = (r as isize, c as isize);
        let strides = if s[1] == 1 && (s[0] == ci || r == 1) {
            [ci, 1]
        } else if s[0] == 1 && (s[1] == ri || c == 1) {
            [1, ri]
        } else {
            return None;
        };
        let start = layout.start_offset();
        let block = t.storage::<half::bf16>().get(start..start + r * c)?;
        let wide = block
            .iter()
            .map(|b| f32::from_bits(u32::from(b.to_bits()) << 16))
            .collect();
        Some((wide, strides))
    }

    /// `v` rounded to the nearest bf16, ties to even, as `half::bf16::from_f32`
    /// rounds it (NaN stays a quiet NaN), without a branch on the common path
    /// so the loop around it vectorises.
    pub(super) fn bf16_bits(v: f32) -> u16 {
        let b = v.to_bits();
        let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
        if b & 0x7fff_ffff > 0x7f80_0000 {
            ((b >> 16) | 0x40) as u16
        } else {
            rounded
        }
    }

    /// `a · b` over the last two axes of `a: [p, q, m, k]` and
    /// `b: [p, q, k, n]` (the same leading axes, no broadcasting), one gemm
    /// per matrix straight into the output, or `None` where this path does
    /// not apply (not f32, not 4-d, an empty dimension, shapes that differ).
    /// burn-flex's own batched matmul zero-fills its output and then copies
    /// it once more to realign it.
    pub(crate) fn batched(a: &FlexTensor, b: &FlexTensor) -> Option<FlexTensor> {
        let ([p, q, m, k], [p2, q2, k2, n]) = dims_of::<4>(a, b, DType::F32)?;
        if (p, q, k) != (p2, q2, k2) || p * q == 0 || m == 0 || n == 0 || k == 0 {
            return None;
        }
        let (la, lb) = (a.layout(), b.layout());
        let (sa, sb) = (la.strides(), lb.strides());
        let (count, size) = (p * q, m * n);
        let macs = size.saturating_mul(k);
        let mut out: Vec<f32> = Vec::with_capacity(count * size);
        // Addresses, so the rayon closure is Send.
        let (a0, b0, o0) = (
            a.storage::<f32>().as_ptr().wrapping_add(la.start_offset()) as usize,
            b.storage::<f32>().as_ptr().wrapping_add(lb.start_offset()) as usize,
            out.as_mut_ptr() as usize,
        );
        // SAFETY: as in `matmul_2d`; matrix `i` starts at its leading axes'
        // offsets, and each gemm writes only its own `size` outputs.
        let one = |i: usize, parallelism: gemm::Parallelism| unsafe {
            let (pi, qi) = ((i / q) as isize, (i % q) as isize);
            gemm_into(
                (o0 as *mut f32).add(i * size),
                [m, k, n],
                (a0 as *const f32).offset(pi * sa[0] + qi * sa[1]),
                [sa[2], sa[3]],
                (b0 as *const f32).offset(pi * sb[0] + qi * sb[1]),
                [sb[2], sb[3]],
                parallelism,
            );
        };
        if count.saturating_mul(macs) < PARALLEL_MACS {
            (0..count).for_each(|i| one(i, gemm::Parallelism::None));
        } else if count >= rayon::current_num_threads() {
            // A matrix per task: every thread busy, no split inside a gemm.
            use rayon::prelude::*;
            (0..count)
                .into_par_iter()
                .for_each(|i| one(i, gemm::Parallelism::None));
        } else {
            (0..count).for_each(|i| one(i, gemm::Parallelism::Rayon(0)));
        }
        // SAFETY: every matrix was written whole above.
        unsafe { out.set_len(count * size) };
        Some(flex_f32(out, [p, q, m, n]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{DType, Distribution, ElementConversion, TensorData};

    type AD = Autodiff<Flex>;

    fn max_diff(a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// A product's output and gradients: `dx`, and `dw` unless frozen.
    type Pass = (Tensor<Flex, 2>, Tensor<Flex, 2>, Option<Tensor<Flex, 2>>);

    /// `x · w` and its gradients against the output gradient `dout`, by
    /// [`matmul_2d`] and by burn's matmul.
    fn ours_and_burns(
        x: &Tensor<Flex, 2>,
        w: &Tensor<Flex, 2>,
        dout: &Tensor<Flex, 2>,
        frozen: bool,
    ) -> [Pass; 2] {
        [true, false].map(|ours| {
            let xa = Tensor::<AD, 2>::from_inner(x.clone()).require_grad();
            let wa = Tensor::<AD, 2>::from_inner(w.clone());
            let wa = if frozen { wa } else { wa.require_grad() };
            let y = if ours {
                matmul_2d(xa.clone(), wa.clone())
            } else {
                xa.clone().matmul(wa.clone())
            };
            let g = (y.clone() * Tensor::from_inner(dout.clone()))
                .sum()
                .backward();
            (y.inner(), xa.grad(&g).unwrap(), wa.grad(&g))
        })
    }

    /// Output and both gradients against burn's matmul, with contiguous,
    /// transposed (the tied LM head) and narrowed inputs, and a frozen weight.
    #[test]
    fn matches_burns_matmul_forward_and_backward() {
        let device = Default::default();
        let rand =
            |s: [usize; 2]| Tensor::<Flex, 2>::random(s, Distribution::Normal(0.0, 1.0), &device);
        let (m, k, n) = (37, 70, 300);
        let cases: Vec<(&str, Tensor<Flex, 2>, Tensor<Flex, 2>)> = vec![
            ("contiguous", rand([m, k]), rand([k, n])),
            ("transposed weight", rand([m, k]), rand([n, k]).transpose()),
            ("transposed input", rand([k, m]).transpose(), rand([k, n])),
            (
                "narrowed",
                rand([m + 5, k + 3]).narrow(0, 2, m).narrow(1, 3, k),
                rand([k, n + 9]).narrow(1, 4, n),
            ),
        ];
        for (name, x, w) in cases {
            for frozen in [false, true] {
                let [(y, dx, dw), (wy, wdx, wdw)] = ours_and_burns(&x, &w, &rand([m, n]), frozen);
                assert!(max_diff(y, wy) < 1e-4, "{name}: output");
                assert!(max_diff(dx, wdx) < 1e-4, "{name}: dx");
                match (dw, wdw) {
                    (Some(a), Some(b)) => assert!(max_diff(a, b) < 1e-4, "{name}: dw"),
                    (None, None) => assert!(frozen),
                    _ => panic!("{name}: a gradient for the weight on one side only"),
                }
            }
        }
        let data = TensorData::new(vec![1f32, 2., 3., 4., 5., 6.], [2, 3]);
        let x = Tensor::<Flex, 2>::from_data(data, &device);
        let w = Tensor::<Flex, 2>::from_data(
            TensorData::new(vec![1f32, 0., 0., 1., 1., 1.], [3, 2]),
            &device,
        );
        let y: Vec<f32> = matmul_2d(x, w).into_data().to_vec().unwrap();
        assert_eq!(y, [4.0, 5.0, 10.0, 11.0]);
    }

    /// The bf16 product against burn-flex's own, bit for bit, forward and
    /// backward, on the layouts a projection sees (a transposed weight in
    /// the backward pass); a layout that is not one block falls back.
    #[test]
    fn bf16_products_match_burn_flex_bit_for_bit() {
        use burn::tensor::FloatDType;
        let device = Default::default();
        let rand = |s: [usize; 2]| {
            Tensor::<Flex, 2>::random(s, Distribution::Normal(0.0, 1.0), &device)
                .cast(FloatDType::BF16)
        };
        let (m, k, n) = (37, 70, 300);
        let bits = |t: Tensor<Flex, 2>| -> Vec<u16> {
            let v: Vec<half::bf16> = t.into_data().to_vec().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        let cases: Vec<(&str, Tensor<Flex, 2>, Tensor<Flex, 2>)> = vec![
            ("contiguous", rand([m, k]), rand([k, n])),
            ("transposed weight", rand([m, k]), rand([n, k]).transpose()),
            ("transposed input", rand([k, m]).transpose(), rand([k, n])),
            ("one row", rand([1, k]), rand([k, n])),
        ];
        for (name, x, w) in cases {
            let (xp, wp) = (
                x.clone().into_primitive().tensor(),
                w.clone().into_primitive().tensor(),
            );
            assert!(flex::matmul_2d(&xp, &wp).is_some(), "{name}: fell back");
            let dout = rand([x.dims()[0], n]);
            let [(y, dx, dw), (wy, wdx, wdw)] = ours_and_burns(&x, &w, &dout, false);
            assert_eq!(y.dtype(), DType::BF16, "{name}");
            assert!(bits(y) == bits(wy), "{name}: output");
            assert!(bits(dx) == bits(wdx), "{name}: dx");
            assert!(bits(dw.unwrap()) == bits(wdw.unwrap()), "{name}: dw");
        }
        let narrowed = rand([m + 5, k + 3]).narrow(0, 2, m).narrow(1, 3, k);
        let w = rand([k, n]);
        let (xp, wp) = (
            narrowed.into_primitive().tensor(),
            w.into_primitive().tensor(),
        );
        assert!(flex::matmul_2d(&xp, &wp).is_none(), "a strided block");
    }

    /// The rounding of the bf16 product's output is `half`'s, on ties,
    /// carries into the exponent, overflow, infinities and NaNs.
    #[test]
    fn bf16_rounding_is_halfs() {
        let mut values = vec![
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
        ];
        for base in [0x3f80_0000u32, 0x3f81_0000, 0x7f7f_0000, 0x0000_8000] {
            for low in [0u32, 0x7fff, 0x8000, 0x8001, 0xffff] {
                values.push(f32::from_bits(base | low));
                values.push(-f32::from_bits(base | low));
            }
        }
        values.push(f32::from_bits(0x7f80_0001));
        for v in values {
            assert_eq!(
                flex::bf16_bits(v),
                half::bf16::from_f32(v).to_bits(),
                "{v:e} ({:#010x})",
                v.to_bits()
            );
        }
    }

    /// Flex's batched matmul against burn's, on the views attention passes
    /// (rows narrowed out of the sequence, keys transposed), in sizes that
    /// take each of its three schedules (with 2 to 14 rayon threads); other
    /// shapes fall back.
    #[test]
    fn batched_matches_burns_matmul() {
        use burn::tensor::TensorPrimitive;
        let device = Default::default();
        let rand =
            |s: [usize; 4]| Tensor::<Flex, 4>::random(s, Distribution::Normal(0.0, 1.0), &device);
        let ours = |a: &Tensor<Flex, 4>, b: &Tensor<Flex, 4>| {
            flex::batched(
                &a.clone().into_primitive().tensor(),
                &b.clone().into_primitive().tensor(),
            )
            .map(|t| Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(t)))
        };
        // (batch, heads, rows, keys, head dim): serial, a matrix per task,
        // and gemm's own threads (fewer matrices than threads).
        for (p, q, m, n, d) in [(1, 2, 5, 7, 3), (2, 7, 100, 130, 64), (1, 1, 400, 300, 64)] {
            let macs = p * q * m * n * d;
            assert_eq!(macs >= flex::PARALLEL_MACS, d == 64, "schedule of {p}x{q}");
            let (qs, ks) = (rand([p, q, m + 9, d]), rand([p, q, n + 4, d]));
            let qc = qs.narrow(2, 6, m);
            let kt = ks.narrow(2, 0, n).swap_dims(2, 3);
            let got = ours(&qc, &kt).expect("f32 4-d views take the gemm path");
            let want = qc.clone().matmul(kt.clone());
            assert_eq!(got.dims(), [p, q, m, n]);
            let diff: f32 = (got.clone() - want).abs().max().into_scalar();
            assert!(diff < 1e-4, "scores {p}x{q}x{m}x{n}: {diff}");
            // The probabilities' product with the values, contiguous.
            let v = rand([p, q, n, d]);
            let diff: f32 = (ours(&got, &v).unwrap() - got.matmul(v))
                .abs()
                .max()
                .into_scalar();
            assert!(diff < 1e-3, "values {p}x{q}x{m}x{n}: {diff}");
        }
        assert!(ours(&rand([1, 2, 3, 4]), &rand([1, 1, 4, 5])).is_none());
        assert!(ours(&rand([1, 2, 3, 4]), &rand([1, 2, 5, 5])).is_none());
    }

    /// Only even contractions that are not a multiple of 64 are padded, to
    /// the next multiple of 64, and the product stays the same (bf16 too).
    #[test]
    fn padded_contractions_keep_the_product() {
        let device = Default::default();
        for (k, want) in [
            (1, 1),
            (513, 513),
            (2, 64),
            (16, 64),
            (520, 576),
            (576, 576),
            (1032, 1088),
        ] {
            assert_eq!(safe_contraction(k), want, "k = {k}");
        }
        let rand =
            |s: [usize; 4]| Tensor::<Flex, 4>::random(s, Distribution::Normal(0.0, 1.0), &device);
        for dtype in [DType::F32, DType::BF16] {
            for k in [7, 520, 64] {
                let (a, b) = (to(rand([2, 3, 5, k]), dtype), to(rand([2, 3, k, 9]), dtype));
                let (pa, pb) = pad_contraction(a.clone(), b.clone());
                let padded = safe_contraction(k);
                assert_eq!(
                    (pa.dims(), pb.dims()),
                    ([2, 3, 5, padded], [2, 3, padded, 9])
                );
                assert_eq!(pa.dtype(), dtype);
                if padded > k {
                    let tail = pa
                        .clone()
                        .narrow(3, k, padded - k)
                        .abs()
                        .max()
                        .into_scalar();
                    assert_eq!(tail.elem::<f32>(), 0.0, "k = {k}: the padding is zeros");
                }
                let (want, got) = (a.matmul(b), pa.matmul(pb));
                let diff = (to(want, DType::F32) - to(got, DType::F32)).abs().max();
                assert!(diff.into_scalar() <= 1e-2, "k = {k}, {dtype:?}");
            }
        }
    }
}
