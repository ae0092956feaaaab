//! The Flex loops' elementwise math (softmax, cross-entropy, SwiGLU, GeGLU,
//! RMS norm, AdamW), one row or chunk at a time, compiled for the widest SIMD
//! instructions the CPU has (AVX-512, AVX2 + FMA, or the baseline), picked at
//! run time.
//!
//! libm's `expf` is a call per element, which keeps every loop calling it
//! scalar. [`exp`] is Cephes' `expf` (reduction by multiples of ln 2, a
//! degree-5 polynomial) in plain f32 arithmetic without branches, so the loops
//! vectorise; its relative error is under f32's epsilon. Sums run in eight
//! fixed lanes. No kernel uses fused multiply-adds (Rust does not contract
//! `a * b + c`), so every instruction set rounds alike and results do not
//! depend on the machine.

use multiversion::multiversion;

use super::optim::AdamWStep;

/// `ln(f32::MIN_POSITIVE)`: below it [`exp`] returns 0.
const LO: f32 = -87.336_54;

/// Above it `exp` returns infinity (the exact value is above 2^127).
const HI: f32 = 88.376_2;

/// 1.5 × 2^23: adding and subtracting it rounds to the nearest integer.
const ROUND: f32 = 12_582_912.0;

/// `e^x` for `x` in `[LO, HI]`, with a relative error under f32's epsilon
/// (0.68 of it at worst over 2M points); 0 below (where the exact value is
/// subnormal), infinity above, NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let c = x.clamp(LO, HI);
    // c = n ln 2 + r, |r| <= ln 2 / 2, with ln 2 in two parts so n ln 2 is exact.
    let t = c * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = c - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n sits in the low bits of t: 2^n built from its exponent field.
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let scaled = y * f32::from_bits(((n + 127) << 23) as u32);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        scaled
    }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `xs` scaled by `scale` and softmaxed over the entries where `hidden` is 0;
/// zeros for a row hidden whole.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn softmax(xs: &mut [f32], hidden: &[u8], scale: f32) {
    for (x, &hide) in xs.iter_mut().zip(hidden) {
        *x = if hide == 0 {
            *x * scale
        } else {
            f32::NEG_INFINITY
        };
    }
    let max = max(xs);
    if max == f32::NEG_INFINITY {
        xs.fill(0.0);
        return;
    }
    for x in xs.iter_mut() {
        *x = exp(*x - max);
    }
    let sum = sum(xs);
    for x in xs.iter_mut() {
        *x /= sum;
    }
}

/// [`softmax`] over the row and one more logit, `sink` (not scaled), whose
/// probability is left out: the row sums to `1 − p_sink`; a row hidden whole
/// gives zeros.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn softmax_with_sink(xs: &mut [f32], hidden: &[u8], scale: f32, sink: f32) {
    for (x, &hide) in xs.iter_mut().zip(hidden) {
        *x = if hide == 0 {
            *x * scale
        } else {
            f32::NEG_INFINITY
        };
    }
    let max = max(xs).max(sink);
    for x in xs.iter_mut() {
        *x = exp(*x - max);
    }
    let sum = sum(xs) + exp(sink - max);
    for x in xs.iter_mut() {
        *x /= sum;
    }
}

/// The softmax's input gradient from its output `p` and output gradient
/// `dp` (overwritten): `scale * p * (dp - Σ p dp)`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn softmax_grad(p: &[f32], dp: &mut [f32], scale: f32) {
    let row = dot(p, dp);
    for (d, &p) in dp.iter_mut().zip(p) {
        *d = p * (*d - row) * scale;
    }
}

/// `ln Σ e^x` over `xs`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn logsumexp(xs: &[f32]) -> f32 {
    let max = max(xs);
    sum_exp(xs, max).ln() + max
}

/// `out = e^(x - shift) * scale`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn exp_scaled(out: &mut [f32], xs: &[f32], shift: f32, scale: f32) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = exp(x - shift) * scale;
    }
}

/// `out = silu(gate) * up`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid(g) * u;
    }
}

/// gpt-oss's clamped SwiGLU: `(clamp(u, ±limit) + 1) · g' σ(alpha g')`,
/// `g' = min(g, limit)`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn clamped_swiglu(out: &mut [f32], gate: &[f32], up: &[f32], alpha: f32, limit: f32) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let g = g.min(limit);
        *o = (u.clamp(-limit, limit) + 1.0) * g * sigmoid(alpha * g);
    }
}

/// [`clamped_swiglu`]'s gradients: `d up = d · g' σ` where `|u| ≤ limit`,
/// `d gate = d · (u' + 1) · σ (1 + alpha g' (1 − σ))` where `g ≤ limit`
/// (zero beyond the clamps, as torch's `clamp`).
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
#[allow(clippy::too_many_arguments)]
pub fn clamped_swiglu_grad(
    dgate: &mut [f32],
    dup: &mut [f32],
    gate: &[f32],
    up: &[f32],
    d: &[f32],
    alpha: f32,
    limit: f32,
) {
    let inputs = gate.iter().zip(up).zip(d);
    for ((dg, du), ((&g, &u), &d)) in dgate.iter_mut().zip(dup).zip(inputs) {
        let gc = g.min(limit);
        let s = sigmoid(alpha * gc);
        let uc = u.clamp(-limit, limit);
        *du = if u.abs() <= limit { d * gc * s } else { 0.0 };
        *dg = if g <= limit {
            d * (uc + 1.0) * s * (1.0 + alpha * gc * (1.0 - s))
        } else {
            0.0
        };
    }
}

/// `sqrt(2 / pi)`, GeLU's tanh approximation's factor.
pub(crate) const GELU_C: f32 = 0.797_884_6;
/// Its cubic term's coefficient.
pub(crate) const GELU_A: f32 = 0.044_715;

/// `tanh(z)` as `1 - 2 / (e^2z + 1)`, through the vectorised [`exp`].
#[inline(always)]
fn tanh(z: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * z) + 1.0)
}

/// `tanh(sqrt(2 / pi) * (g + 0.044715 g^3))`.
#[inline(always)]
fn gelu_t(g: f32) -> f32 {
    tanh(GELU_C * (g + GELU_A * g * g * g))
}

/// Gemma 2's soft cap in place, `x ← cap · tanh(scale · x / cap)` (the
/// logits: `scale` 1), and where `tanh` is given, `tanh(scale · x / cap)`
/// written to it.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn scaled_softcap(xs: &mut [f32], tanh: Option<&mut [f32]>, scale: f32, cap: f32) {
    let k = scale / cap;
    match tanh {
        Some(ts) => {
            for (x, t) in xs.iter_mut().zip(ts) {
                *t = self::tanh(k * *x);
                *x = cap * *t;
            }
        }
        None => {
            for x in xs {
                *x = cap * self::tanh(k * *x);
            }
        }
    }
}

/// `d · (1 − (c / cap)²)` in place: a gradient taken back through
/// [`scaled_softcap`] from its outputs `c` (`tanh = c / cap`).
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn softcap_grad(d: &mut [f32], c: &[f32], cap: f32) {
    let k = 1.0 / cap;
    for (d, &c) in d.iter_mut().zip(c) {
        let t = c * k;
        *d *= 1.0 - t * t;
    }
}

/// `gelu_tanh(gate) * up`, elementwise (GeGLU).
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn geglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = 0.5 * g * (1.0 + gelu_t(g)) * u;
    }
}

/// The gradients of [`geglu`] for the output gradient `d`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn geglu_grad(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], d: &[f32]) {
    let inputs = gate.iter().zip(up).zip(d);
    for ((dg, du), ((&g, &u), &d)) in dgate.iter_mut().zip(dup).zip(inputs) {
        let t = gelu_t(g);
        *du = d * 0.5 * g * (1.0 + t);
        let slope = GELU_C * (1.0 + 3.0 * GELU_A * g * g);
        *dg = d * u * (0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * slope);
    }
}

/// The gradients of [`swiglu`] for the output gradient `d`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn swiglu_grad(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], d: &[f32]) {
    let inputs = gate.iter().zip(up).zip(d);
    for ((dg, du), ((&g, &u), &d)) in dgate.iter_mut().zip(dup).zip(inputs) {
        let s = sigmoid(g);
        *du = d * g * s;
        *dg = d * u * s * (1.0 + g * (1.0 - s));
    }
}

/// One AdamW update of the parameters `p` and moments `m`, `v` in place
/// for the gradient `g`, as torch's `AdamW` computes it.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamWStep) {
    // The scalars as burn's scalar ops round them (f64 to the f32 element).
    let decay = s.decay.map(|d| d as f32);
    let (b1, c1) = (s.beta1 as f32, (1.0 - s.beta1) as f32);
    let (b2, c2) = (s.beta2 as f32, (1.0 - s.beta2) as f32);
    let (bc2, eps, step) = (
        s.bias_correction2_sqrt as f32,
        s.eps as f32,
        s.step_size as f32,
    );
    for (((pj, mj), vj), &gj) in p.iter_mut().zip(m).zip(v).zip(g) {
        let p0 = match decay {
            Some(d) => *pj * d,
            None => *pj,
        };
        *mj = *mj * b1 + gj * c1;
        *vj = *vj * b2 + gj * gj * c2;
        let denom = vj.sqrt() / bc2 + eps;
        *pj = p0 - *mj / denom * step;
    }
}

/// One row of RoPE: `out = x * cos + [-x2, x1] * sin`, with `x1`, `x2` the
/// halves of `x` (see [`super::rope`]).
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn rope(out: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32]) {
    let h = x.len() / 2;
    let ((o1, o2), (x1, x2)) = (out.split_at_mut(h), x.split_at(h));
    let ((c1, c2), (s1, s2)) = (cos.split_at(h), sin.split_at(h));
    let lo = o1.iter_mut().zip(x1.iter().zip(x2)).zip(c1.iter().zip(s1));
    for ((o, (&a, &b)), (&c, &s)) in lo {
        *o = a * c + -b * s;
    }
    let hi = o2.iter_mut().zip(x2.iter().zip(x1)).zip(c2.iter().zip(s2));
    for ((o, (&b, &a)), (&c, &s)) in hi {
        *o = b * c + a * s;
    }
}

/// One row of [`rope`]'s gradient: `dx1 = dy1 * cos1 + dy2 * sin2`, `dx2 =
/// dy2 * cos2 - dy1 * sin1`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn rope_grad(dx: &mut [f32], dy: &[f32], cos: &[f32], sin: &[f32]) {
    let h = dy.len() / 2;
    let ((d1, d2), (g1, g2)) = (dx.split_at_mut(h), dy.split_at(h));
    let ((c1, c2), (s1, s2)) = (cos.split_at(h), sin.split_at(h));
    let lo = d1.iter_mut().zip(g1.iter().zip(g2)).zip(c1.iter().zip(s2));
    for ((d, (&a, &b)), (&c, &s)) in lo {
        *d = a * c + b * s;
    }
    let hi = d2.iter_mut().zip(g2.iter().zip(g1)).zip(c2.iter().zip(s1));
    for ((d, (&b, &a)), (&c, &s)) in hi {
        *d = b * c - a * s;
    }
}

/// One row of the RMS norm: `out = x * r * w` with `r = 1 / sqrt(mean(x²) +
/// eps)`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn rms_norm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let r = inv_rms(x, eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
        *o = v * r * w;
    }
}

/// One row of [`rms_norm`]'s gradient for the output gradient `dy`: writes
/// `dx` and adds the row's share of the weight's gradient to `dw`.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
pub fn rms_norm_grad(dx: &mut [f32], dw: &mut [f32], x: &[f32], w: &[f32], dy: &[f32], eps: f32) {
    let r = inv_rms(x, eps);
    // dx holds dy ∘ w until the last loop: the normalised row's gradient.
    for ((d, &g), &w) in dx.iter_mut().zip(dy).zip(w) {
        *d = g * w;
    }
    let mean = dot(dx, x) * r / x.len() as f32;
    for (((d, dw), &v), &g) in dx.iter_mut().zip(dw).zip(x).zip(dy) {
        let n = v * r;
        *d = (*d - n * mean) * r;
        *dw += g * n;
    }
}

/// `1 / sqrt(mean(x²) + eps)`. The squares are summed one after another, as
/// the norm always has: in lanes the sum is four times faster, but it moves
/// the outputs by an ulp, and through them the near-zero gradients that
/// decide a first Adam step's sign (`stages/tests/train_parity.rs`).
#[inline(always)]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

/// The sum of `xs` in eight interleaved lanes (a fixed order, so the
/// compiler may vectorise it and the result does not depend on the CPU).
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let tail = add_lanes(&mut lanes, xs);
    fold(lanes) + tail
}

/// `Σ a_i b_i` over the shorter of the two, in the order of [`sum`].
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f32; 8];
    let (mut ca, mut cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((l, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y;
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    fold(lanes) + tail
}

/// The sum of `e^(x - shift)` over `xs`, in the order of [`sum`].
#[inline(always)]
pub fn sum_exp(xs: &[f32], shift: f32) -> f32 {
    // The exponentials go through a buffer a block at a time: a plain map
    // loop vectorises, where `exp` inlined into the lanes' adds stays scalar.
    // Blocks are whole groups of eight, so only the last one leaves a tail.
    const BLOCK: usize = 64;
    let (mut lanes, mut buf, mut tail) = ([0f32; 8], [0f32; BLOCK], 0.0);
    for block in xs.chunks(BLOCK) {
        let es = &mut buf[..block.len()];
        for (e, &x) in es.iter_mut().zip(block) {
            *e = exp(x - shift);
        }
        tail = add_lanes(&mut lanes, es);
    }
    fold(lanes) + tail
}

/// Adds `xs` into the lanes a group of eight at a time, element `i` into
/// lane `i % 8`, and returns the sum of the last `len % 8` elements.
#[inline(always)]
fn add_lanes(lanes: &mut [f32; 8], xs: &[f32]) -> f32 {
    let mut groups = xs.chunks_exact(8);
    for c in &mut groups {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    groups.remainder().iter().sum()
}

/// The eight lanes' sum, pairwise.
#[inline(always)]
fn fold(lanes: [f32; 8]) -> f32 {
    let [a, b, c, d, e, f, g, h] = lanes;
    ((a + e) + (b + f)) + ((c + g) + (d + h))
}

/// The largest of `xs`, or -∞ for none (NaNs are skipped).
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error against f64's exp, in units of f32's epsilon.
    fn ulps(x: f32) -> f64 {
        let exact = (x as f64).exp();
        ((exp(x) as f64 - exact) / exact).abs() / f32::EPSILON as f64
    }

    #[test]
    fn exp_is_within_one_epsilon_over_its_range() {
        let (mut worst, mut at) = (0f64, 0f32);
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = LO + (HI - LO) * i as f32 / steps as f32;
            let e = ulps(x);
            if e > worst {
                (worst, at) = (e, x);
            }
        }
        // Near 0 too, where the polynomial alone answers.
        for i in -10_000..=10_000 {
            worst = worst.max(ulps(i as f32 * 1e-5));
        }
        assert!(worst <= 1.0, "exp is {worst} eps off at {at}");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(LO) > 0.0 && exp(LO).is_normal());
        assert!(exp(HI).is_finite() && exp(HI) > 1e38);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(sigmoid(0.0), 0.5);
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
    }

    #[test]
    fn reductions_match_their_definitions() {
        let xs: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 / 13.0 - 3.0)
            .collect();
        let exact: f64 = xs.iter().map(|&x| x as f64).sum();
        assert!((sum(&xs) as f64 - exact).abs() < 1e-4);
        let ys: Vec<f32> = xs.iter().rev().copied().collect();
        let exact: f64 = xs.iter().zip(&ys).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!((dot(&xs, &ys) as f64 - exact).abs() < 1e-3);
        assert_eq!(dot(&xs, &ys[..5]), dot(&xs[..5], &ys[..5]));
        let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&xs), m);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let exact: f64 = xs.iter().map(|&x| (x as f64 - m as f64).exp()).sum();
        assert!((sum_exp(&xs, m) as f64 / exact - 1.0).abs() < 1e-6);
        assert!((logsumexp(&xs) as f64 - (exact.ln() + m as f64)).abs() < 1e-6);
    }

    #[test]
    fn scaled_softcap_is_cap_tanh_of_the_scaled_scores() {
        let raw: Vec<f32> = (0..97).map(|i| (i as f32 - 48.0) * 7.3).collect();
        let (scale, cap) = (0.5, 5.0);
        let (mut kept, mut plain, mut t) = (raw.clone(), raw.clone(), vec![0f32; raw.len()]);
        scaled_softcap(&mut kept, Some(&mut t), scale, cap);
        scaled_softcap(&mut plain, None, scale, cap);
        assert_eq!(kept, plain);
        for (i, &x) in raw.iter().enumerate() {
            let exact = (scale as f64 * x as f64 / cap as f64).tanh();
            assert!(
                (t[i] as f64 - exact).abs() < 3e-7,
                "tanh at {x}: {} vs {exact}",
                t[i]
            );
            assert!(
                (kept[i] as f64 - cap as f64 * exact).abs() < 2e-6,
                "cap at {x}"
            );
        }
        assert!(t.contains(&1.0) && t.contains(&-1.0));
    }

    /// `sum` and `sum_exp` add in the documented order (element `i` into
    /// lane `i % 8`, the lanes folded, then the tail) at every length,
    /// across `sum_exp`'s blocks and their remainders.
    #[test]
    fn sums_keep_their_order_across_blocks() {
        let lanes_then_tail = |es: &[f32]| {
            let whole = es.len() / 8 * 8;
            let mut lanes = [0f32; 8];
            for (i, &e) in es[..whole].iter().enumerate() {
                lanes[i % 8] += e;
            }
            fold(lanes) + es[whole..].iter().sum::<f32>()
        };
        for n in [0, 5, 8, 63, 64, 65, 71, 128, 200, 1031] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 211) as f32 / 17.0 - 6.0)
                .collect();
            assert_eq!(sum(&xs).to_bits(), lanes_then_tail(&xs).to_bits(), "n={n}");
            let es: Vec<f32> = xs.iter().map(|&x| exp(x - 1.5)).collect();
            let want = lanes_then_tail(&es);
            assert_eq!(sum_exp(&xs, 1.5).to_bits(), want.to_bits(), "n={n}");
        }
    }

    #[test]
    fn kernels_match_their_definitions_and_round_as_the_baseline() {
        // The kernels run with this CPU's widest SIMD; this test's own loops
        // are compiled for the baseline, so the bitwise checks show that the
        // instruction set does not change the rounding.
        let xs: Vec<f32> = (0..301)
            .map(|i| ((i * 7919) % 1009) as f32 / 37.0 - 13.0)
            .collect();
        let ys: Vec<f32> = xs.iter().rev().map(|y| y * 0.5).collect();
        let mut out = vec![0f32; xs.len()];
        exp_scaled(&mut out, &xs, 1.5, 0.25);
        for (o, &x) in out.iter().zip(&xs) {
            assert_eq!(o.to_bits(), (exp(x - 1.5) * 0.25).to_bits());
        }
        swiglu(&mut out, &xs, &ys);
        for ((o, &g), &u) in out.iter().zip(&xs).zip(&ys) {
            assert_eq!(o.to_bits(), (g * sigmoid(g) * u).to_bits());
            let exact = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
            assert!((*o as f64 - exact).abs() <= 1e-6 * exact.abs().max(1.0));
        }
        let (mut dg, mut du) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        swiglu_grad(&mut dg, &mut du, &xs, &ys, &out);
        for i in 0..xs.len() {
            let (g, u, d) = (xs[i] as f64, ys[i] as f64, out[i] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            assert!((du[i] as f64 - d * g * s).abs() <= 1e-5 * (d * g * s).abs().max(1.0));
            let exact = d * u * s * (1.0 + g * (1.0 - s));
            assert!((dg[i] as f64 - exact).abs() <= 1e-5 * exact.abs().max(1.0));
        }
        let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = xs.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        assert!((logsumexp(&xs) as f64 - lse).abs() < 1e-5);

        // RoPE on one row of 300, ys as cos and xs / 13 as sin, and back.
        let (x, c) = (&xs[..300], &ys[..300]);
        let sn: Vec<f32> = xs[1..301].iter().map(|v| v / 13.0).collect();
        let mut r = vec![0f32; 300];
        rope(&mut r, x, c, &sn);
        let mut d = vec![0f32; 300];
        rope_grad(&mut d, x, c, &sn);
        for i in 0..150 {
            let j = i + 150;
            assert_eq!(r[i].to_bits(), (x[i] * c[i] + -x[j] * sn[i]).to_bits());
            assert_eq!(r[j].to_bits(), (x[j] * c[j] + x[i] * sn[j]).to_bits());
            assert_eq!(d[i].to_bits(), (x[i] * c[i] + x[j] * sn[j]).to_bits());
            assert_eq!(d[j].to_bits(), (x[j] * c[j] - x[i] * sn[i]).to_bits());
        }

        // The RMS norm of xs with ys as the weight, and its gradient for dy =
        // xs (301 long, so the lanes of the gradient's sum leave a tail).
        let n = xs.len() as f64;
        let inv = 1.0 / (xs.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n + 1e-6).sqrt();
        rms_norm(&mut out, &xs, &ys, 1e-6);
        let dy = &xs[..];
        let (mut dx, mut dw) = (vec![0f32; xs.len()], vec![1f32; xs.len()]);
        rms_norm_grad(&mut dx, &mut dw, &xs, &ys, dy, 1e-6);
        let mean = (0..xs.len())
            .map(|i| dy[i] as f64 * ys[i] as f64 * xs[i] as f64 * inv)
            .sum::<f64>()
            / n;
        for i in 0..xs.len() {
            let (x, w, g) = (xs[i] as f64, ys[i] as f64, dy[i] as f64);
            let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0);
            assert!(close(out[i], x * inv * w), "rms_norm[{i}]");
            assert!(close(dx[i], (g * w - x * inv * mean) * inv), "dx[{i}]");
            assert!(close(dw[i], 1.0 + g * x * inv), "dw[{i}]");
        }

        // Softmax of 0.5 x over every third entry hidden, then its gradient.
        let hidden: Vec<u8> = (0..xs.len()).map(|i| (i % 3 == 1) as u8).collect();
        let mut p = xs.clone();
        softmax(&mut p, &hidden, 0.5);
        let shown = |i: usize| hidden[i] == 0;
        let z: f64 = (0..xs.len())
            .filter(|&i| shown(i))
            .map(|i| (xs[i] as f64 * 0.5).exp())
            .sum();
        for (i, &pi) in p.iter().enumerate() {
            let exact = if shown(i) {
                (xs[i] as f64 * 0.5).exp() / z
            } else {
                0.0
            };
            assert!(
                (pi as f64 - exact).abs() <= 1e-6 * exact.max(1e-30),
                "p[{i}]"
            );
        }
        let mut ds = ys.clone();
        softmax_grad(&p, &mut ds, 0.5);
        let row: f64 = p.iter().zip(&ys).map(|(&p, &d)| p as f64 * d as f64).sum();
        for i in 0..xs.len() {
            let exact = 0.5 * p[i] as f64 * (ys[i] as f64 - row);
            assert!((ds[i] as f64 - exact).abs() <= 1e-6, "ds[{i}]");
        }
        let mut none = xs[..10].to_vec();
        softmax(&mut none, &[1; 10], 0.5);
        assert_eq!(none, [0.0; 10]);
    }
}
