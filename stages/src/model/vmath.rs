//! `exp` for the Flex loops (softmax, cross-entropy, SwiGLU), written so the
//! compiler vectorises the loops around it, and [`vectorized`], which runs a
//! loop with the widest SIMD instructions the CPU has.
//!
//! libm's `expf` is a call per element, which keeps every loop calling it
//! scalar. [`exp`] is Cephes' `expf` (reduction by multiples of ln 2, a
//! degree-5 polynomial) in plain f32 arithmetic, without branches or fused
//! multiply-adds: its relative error is under f32's epsilon, and it is rounded the same on
//! every CPU and instruction set, so results do not depend on the machine.

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

/// Runs `f` compiled for the widest SIMD instructions this CPU has (AVX-512,
/// AVX2 + FMA, or the baseline), so that the loops inlined into it vectorise
/// with them. Results are the same whichever runs: the loops here use no
/// fused multiply-adds and keep their order of operations.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// The sum of `xs` in eight interleaved lanes (a fixed order, so the
/// compiler may vectorise it and the result does not depend on the CPU).
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
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
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += exp(x - shift);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| exp(x - shift)).sum();
    fold(lanes) + tail
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
        // The same whether or not the widest SIMD runs it.
        assert_eq!(
            vectorized(|| sum_exp(&xs, m)).to_bits(),
            sum_exp(&xs, m).to_bits()
        );
    }
}
