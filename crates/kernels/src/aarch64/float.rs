//! Float kernels for NEON: f32/f16/bf16 dot products, the f16 axpy and small GEMM of
//! attention (register-blocked, up to 4 rows x 16 columns of accumulators, each f16 row of
//! `b` converted once per k), a fast `exp` (range reduction by ln 2, degree-6 polynomial,
//! exponent scaling) for softmax and the gated activations, RMSNorm and RoPE (pairs
//! de-interleaved with `ld2`). References: [`crate::quant::dot`], [`crate::attn`],
//! [`crate::ops`].

use std::arch::aarch64::*;

use half::{bf16, f16};

use super::load_f16x8;
use crate::attn::{check_gemm, gemm_f16b_tail};

// e^r = sum r^i / i! on |r| <= ln2/2 (the degree-6 term bounds the error near 1.2e-7)
const C2: f32 = 1.0 / 2.0;
const C3: f32 = 1.0 / 6.0;
const C4: f32 = 1.0 / 24.0;
const C5: f32 = 1.0 / 120.0;
const C6: f32 = 1.0 / 720.0;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF_A: f32 = 0.044_715;

// ---- dot products -----------------------------------------------------------------------

/// `sum(x[i] * y[i])` with `load(i)` giving lanes `4i..4i+4` of x for `i < n / 4` and the
/// scalar `xs(i)` for the tail.
#[inline]
#[target_feature(enable = "neon")]
fn dot_by(
    n: usize,
    load: impl Fn(usize) -> (float32x4_t, float32x4_t),
    y: &[f32],
    xs: impl Fn(usize) -> f32,
) -> f32 {
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for h in 0..2 {
            let (a, b) = load(i + 8 * h);
            // SAFETY: i + 16 <= n <= y.len().
            let (ya, yb) = unsafe {
                (
                    vld1q_f32(y.as_ptr().add(i + 8 * h)),
                    vld1q_f32(y.as_ptr().add(i + 8 * h + 4)),
                )
            };
            acc[2 * h] = vfmaq_f32(acc[2 * h], a, ya);
            acc[2 * h + 1] = vfmaq_f32(acc[2 * h + 1], b, yb);
        }
        i += 16;
    }
    let v = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
    let mut sum = vaddvq_f32(v);
    for j in i..n {
        sum += xs(j) * y[j];
    }
    sum
}

#[target_feature(enable = "neon")]
fn dot_f32_impl(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    dot_by(
        n,
        // SAFETY: `dot_by` asks for lanes below n.
        |i| unsafe {
            (
                vld1q_f32(x.as_ptr().add(i)),
                vld1q_f32(x.as_ptr().add(i + 4)),
            )
        },
        y,
        |j| x[j],
    )
}

#[target_feature(enable = "neon")]
fn dot_f16_impl(x: &[f16], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    // SAFETY: `dot_by` asks for lanes below n.
    dot_by(
        n,
        |i| unsafe { load_f16x8(x.as_ptr().add(i)) },
        y,
        |j| super::fp16(x[j]),
    )
}

#[target_feature(enable = "neon")]
fn dot_bf16_impl(x: &[bf16], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    dot_by(
        n,
        |i| {
            // SAFETY: `dot_by` asks for lanes below n.
            let h = unsafe { vld1q_u16(x.as_ptr().add(i) as *const u16) };
            (
                vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
            )
        },
        y,
        |j| x[j].to_f32(),
    )
}

#[target_feature(enable = "neon")]
fn axpy_f16_impl(y: &mut [f32], a: f32, x: &[f16]) {
    let n = y.len().min(x.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, inside both slices.
        unsafe {
            let (lo, hi) = load_f16x8(x.as_ptr().add(i));
            let p = y.as_mut_ptr().add(i);
            vst1q_f32(p, vfmaq_n_f32(vld1q_f32(p), lo, a));
            vst1q_f32(p.add(4), vfmaq_n_f32(vld1q_f32(p.add(4)), hi, a));
        }
        i += 8;
    }
    for j in i..n {
        y[j] += a * super::fp16(x[j]);
    }
}

// ---- attention GEMM -------------------------------------------------------------------------

/// One block of `MR` rows x `8 * NV` columns of `c += a · b`.
///
/// # Safety
/// `a` holds `MR` rows of `k` (stride `lda`), `b` `k` rows of `8 * NV` f16 (stride `ldb`),
/// `c` `MR` rows of `8 * NV` (stride `ldc`).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn gemm_block<const MR: usize, const NV: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f16,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: every access is inside the extents the caller guarantees.
    unsafe {
        let mut acc = [[vdupq_n_f32(0.0); 8]; MR];
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate().take(2 * NV) {
                *x = vld1q_f32(c.add(r * ldc + 4 * v));
            }
        }
        for kk in 0..k {
            let mut bv = [vdupq_n_f32(0.0); 8];
            for v in 0..NV {
                (bv[2 * v], bv[2 * v + 1]) = load_f16x8(b.add(kk * ldb + 8 * v));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = *a.add(r * lda + kk);
                for (x, &bx) in row.iter_mut().zip(&bv).take(2 * NV) {
                    *x = vfmaq_n_f32(*x, bx, av);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate().take(2 * NV) {
                vst1q_f32(c.add(r * ldc + 4 * v), *x);
            }
        }
    }
}

/// Columns `j0..j0 + 8 * NV` for every row, in blocks of up to four rows.
///
/// # Safety
/// As [`gemm_block`], for `m` rows, with `j0 + 8 * NV <= n` and extents `check_gemm` passed.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "neon")]
unsafe fn gemm_cols<const NV: usize>(
    m: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f16],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    j0: usize,
) {
    let mut i0 = 0;
    while i0 < m {
        let mr = (m - i0).min(4);
        // SAFETY: rows i0..i0+mr < m and columns j0..j0+8*NV <= n lie inside the extents
        // `check_gemm` verified.
        unsafe {
            let (ap, bp, cp) = (
                a.as_ptr().add(i0 * lda),
                b.as_ptr().add(j0),
                c.as_mut_ptr().add(i0 * ldc + j0),
            );
            match mr {
                4 => gemm_block::<4, NV>(k, ap, lda, bp, ldb, cp, ldc),
                3 => gemm_block::<3, NV>(k, ap, lda, bp, ldb, cp, ldc),
                2 => gemm_block::<2, NV>(k, ap, lda, bp, ldb, cp, ldc),
                _ => gemm_block::<1, NV>(k, ap, lda, bp, ldb, cp, ldc),
            }
        }
        i0 += mr;
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
fn gemm_f16b_impl(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f16],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    check_gemm(m, n, k, a.len(), lda, b.len(), ldb, c.len(), ldc);
    let mut j0 = 0;
    while j0 + 8 <= n {
        let nv = ((n - j0) / 8).min(3);
        // SAFETY: extents checked above; j0 + 8 * nv <= n.
        unsafe {
            match nv {
                3 => gemm_cols::<3>(m, k, a, lda, b, ldb, c, ldc, j0),
                2 => gemm_cols::<2>(m, k, a, lda, b, ldb, c, ldc, j0),
                _ => gemm_cols::<1>(m, k, a, lda, b, ldb, c, ldc, j0),
            }
        }
        j0 += 8 * nv;
    }
    gemm_f16b_tail(m, n, k, a, lda, b, ldb, c, ldc, j0);
}

// ---- exp, softmax and gated activations ---------------------------------------------------

/// e^x for 4 lanes; 0 below -87.3 (and for -inf), +inf above 88.7.
#[inline]
#[target_feature(enable = "neon")]
fn exp4(x: float32x4_t) -> float32x4_t {
    let lo = vdupq_n_f32(-87.3);
    let under = vcltq_f32(x, lo);
    let over = vcgtq_f32(x, vdupq_n_f32(88.3));
    let x = vminq_f32(vmaxq_f32(x, lo), vdupq_n_f32(88.3));
    let n = vrndnq_f32(vmulq_n_f32(x, std::f32::consts::LOG2_E));
    let r = vfmsq_n_f32(x, n, LN2_HI);
    let r = vfmsq_n_f32(r, n, LN2_LO);
    let mut p = vdupq_n_f32(C6);
    for c in [C5, C4, C3, C2, 1.0, 1.0] {
        p = vfmaq_f32(vdupq_n_f32(c), p, r);
    }
    // 2^n by the exponent field: n is in -126..=127 after the clamp
    let pow2 = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(
        vcvtnq_s32_f32(n),
        vdupq_n_s32(127),
    )));
    let e = vmulq_f32(p, pow2);
    let e = vbslq_f32(over, vdupq_n_f32(f32::INFINITY), e);
    vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(e), under))
}

#[target_feature(enable = "neon")]
fn exp_sum_impl(x: &mut [f32], sub: f32) -> f32 {
    let vs = vdupq_n_f32(sub);
    let mut acc = vdupq_n_f32(0.0);
    let mut chunks = x.chunks_exact_mut(4);
    for ch in &mut chunks {
        // SAFETY: a chunk is 4 floats.
        unsafe {
            let e = exp4(vsubq_f32(vld1q_f32(ch.as_ptr()), vs));
            vst1q_f32(ch.as_mut_ptr(), e);
            acc = vaddq_f32(acc, e);
        }
    }
    let mut sum = vaddvq_f32(acc);
    for v in chunks.into_remainder() {
        *v = (*v - sub).exp();
        sum += *v;
    }
    sum
}

/// `g * sigmoid(s * z(g)) * u`, with `z(g) = g` (SiLU, `s = 1`) or the GELU tanh argument
/// (`s = 2`, as [`crate::ops::gelu`]).
#[inline]
#[target_feature(enable = "neon")]
fn gated4<const GELU: bool>(g: float32x4_t, u: float32x4_t) -> float32x4_t {
    let z = if GELU {
        let inner = vfmaq_f32(vdupq_n_f32(1.0), vdupq_n_f32(GELU_COEF_A), vmulq_f32(g, g));
        vmulq_f32(vmulq_n_f32(g, -2.0 * SQRT_2_OVER_PI), inner)
    } else {
        vnegq_f32(g)
    };
    let den = vaddq_f32(vdupq_n_f32(1.0), exp4(z));
    vmulq_f32(vdivq_f32(g, den), u)
}

#[target_feature(enable = "neon")]
fn gated_mul<const GELU: bool>(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (gate, up) = (&mut gate[..n], &up[..n]);
    let mut gc = gate.chunks_exact_mut(4);
    let mut uc = up.chunks_exact(4);
    for (g, u) in (&mut gc).zip(&mut uc) {
        // SAFETY: chunks of four floats.
        unsafe {
            let r = gated4::<GELU>(vld1q_f32(g.as_ptr()), vld1q_f32(u.as_ptr()));
            vst1q_f32(g.as_mut_ptr(), r);
        }
    }
    for (g, &u) in gc.into_remainder().iter_mut().zip(uc.remainder()) {
        *g = if GELU {
            crate::ops::gelu(*g) * u
        } else {
            crate::ops::silu(*g) * u
        };
    }
}

// ---- RMSNorm and RoPE ------------------------------------------------------------------------

#[target_feature(enable = "neon")]
fn rms_norm_impl(x: &mut [f32], w: &[f32], eps: f32) {
    let n = x.len();
    let mut acc = [vdupq_n_f32(0.0); 2];
    let mut chunks = x.chunks_exact(4);
    for (i, ch) in (&mut chunks).enumerate() {
        // SAFETY: a chunk is 4 floats.
        let v = unsafe { vld1q_f32(ch.as_ptr()) };
        acc[i % 2] = vfmaq_f32(acc[i % 2], v, v);
    }
    let mut sum = vaddvq_f32(vaddq_f32(acc[0], acc[1]));
    for &v in chunks.remainder() {
        sum += v * v;
    }
    let scale = 1.0 / (sum / n as f32 + eps).sqrt();
    let nw = w.len().min(n);
    let mut i = 0;
    while i + 4 <= nw {
        // SAFETY: i + 4 <= nw <= both lengths.
        unsafe {
            let p = x.as_mut_ptr().add(i);
            let g = vld1q_f32(w.as_ptr().add(i));
            vst1q_f32(p, vmulq_f32(vmulq_n_f32(vld1q_f32(p), scale), g));
        }
        i += 4;
    }
    for (j, v) in x.iter_mut().enumerate().skip(i) {
        *v *= scale * w.get(j).copied().unwrap_or(1.0);
    }
}

/// `(x0 cos - x1 sin, x0 sin + x1 cos)` on four pairs.
#[inline]
#[target_feature(enable = "neon")]
fn rotate(x0: float32x4_t, x1: float32x4_t, c: float32x4_t, s: float32x4_t) -> float32x4x2_t {
    float32x4x2_t(
        vfmsq_f32(vmulq_f32(x0, c), x1, s),
        vfmaq_f32(vmulq_f32(x0, s), x1, c),
    )
}

/// [`crate::ops::rope`]: GPT-J pairs `(x[2i], x[2i+1])` de-interleaved by `ld2`/`st2`, NeoX
/// pairs `(x[i], x[i + n_dims/2])` loaded straight.
#[target_feature(enable = "neon")]
fn rope_impl(x: &mut [f32], cos: &[f32], sin: &[f32], n_dims: usize, neox: bool) {
    let half = n_dims / 2;
    assert!(
        n_dims <= x.len() && half <= cos.len() && half <= sin.len(),
        "rope: slices too short"
    );
    let mut i = 0;
    while i + 4 <= half {
        // SAFETY: i + 4 <= half: pairs i..i+4 (elements below n_dims <= x.len()) and
        // cos/sin lanes below half, all asserted above.
        unsafe {
            let c = vld1q_f32(cos.as_ptr().add(i));
            let s = vld1q_f32(sin.as_ptr().add(i));
            if neox {
                let (p0, p1) = (x.as_mut_ptr().add(i), x.as_mut_ptr().add(i + half));
                let r = rotate(vld1q_f32(p0), vld1q_f32(p1), c, s);
                vst1q_f32(p0, r.0);
                vst1q_f32(p1, r.1);
            } else {
                let p = x.as_mut_ptr().add(2 * i);
                let v = vld2q_f32(p);
                vst2q_f32(p, rotate(v.0, v.1, c, s));
            }
        }
        i += 4;
    }
    crate::ops::rope_pairs(x, cos, sin, n_dims, neox, i);
}

// ---- safe entry points for the kernel tables ------------------------------------------

/// A safe wrapper `$name` of the NEON function `$impl`.
macro_rules! entry {
    ($name:ident = $impl:path, ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        #[allow(clippy::too_many_arguments)]
        pub(super) fn $name($($arg: $ty),*) $(-> $ret)? {
            // SAFETY: only placed in a kernel table after NEON was detected.
            unsafe { $impl($($arg),*) }
        }
    };
}

entry!(dot_f32 = dot_f32_impl, (x: &[f32], y: &[f32]) -> f32);
entry!(dot_f16 = dot_f16_impl, (x: &[f16], y: &[f32]) -> f32);
entry!(dot_bf16 = dot_bf16_impl, (x: &[bf16], y: &[f32]) -> f32);
entry!(axpy_f16 = axpy_f16_impl, (y: &mut [f32], a: f32, x: &[f16]));
entry!(gemm_f16b = gemm_f16b_impl, (m: usize, n: usize, k: usize, a: &[f32], lda: usize,
    b: &[f16], ldb: usize, c: &mut [f32], ldc: usize));
entry!(exp_sum = exp_sum_impl, (x: &mut [f32], sub: f32) -> f32);
entry!(silu_mul = gated_mul::<false>, (gate: &mut [f32], up: &[f32]));
entry!(gelu_mul = gated_mul::<true>, (gate: &mut [f32], up: &[f32]));
entry!(rms_norm = rms_norm_impl, (x: &mut [f32], w: &[f32], eps: f32));
entry!(rope = rope_impl, (x: &mut [f32], cos: &[f32], sin: &[f32], n_dims: usize, neox: bool));
