//! Float kernels of attention for AVX2 and AVX-512: the small GEMM with an f16 right-hand
//! side (register-blocked: up to 6 rows x 64 columns of accumulators on AVX-512, 4 x 24 on
//! AVX2; each f16 vector converted once per k and used by every row of the block) and a
//! fast `exp` (range reduction by ln 2, degree-6 polynomial, exponent scaling).
//! References: [`crate::attn::gemm_f16b`], [`crate::attn::exp_sum`].

use std::arch::x86_64::*;

use half::f16;

use crate::attn::{check_gemm, gemm_f16b_tail};

// e^r = sum r^i / i! on |r| <= ln2/2 (the degree-6 term bounds the error near 1.2e-7)
const C2: f32 = 1.0 / 2.0;
const C3: f32 = 1.0 / 6.0;
const C4: f32 = 1.0 / 24.0;
const C5: f32 = 1.0 / 120.0;
const C6: f32 = 1.0 / 720.0;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

// ---- AVX-512 -------------------------------------------------------------------------

/// One block of `MR` rows x `NV` 16-column vectors of `c += a · b`.
///
/// # Safety
/// The CPU has AVX-512F and F16C; `a` holds `MR` rows of `k` (stride `lda`), `b` `k` rows of
/// `16 * NV` f16 (stride `ldb`), `c` `MR` rows of `16 * NV` (stride `ldc`).
#[target_feature(enable = "avx512f,f16c")]
unsafe fn gemm512_block<const MR: usize, const NV: usize>(
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
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(c.add(r * ldc + v * 16));
            }
        }
        for kk in 0..k {
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_cvtph_ps(_mm256_loadu_si256(
                    b.add(kk * ldb + v * 16) as *const __m256i
                ));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * lda + kk));
                for (x, &bx) in row.iter_mut().zip(&bv) {
                    *x = _mm512_fmadd_ps(av, bx, *x);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc + v * 16), *x);
            }
        }
    }
}

/// Columns `j0..j0 + 16 * NV` for every row, in blocks of up to six rows.
///
/// # Safety
/// As [`gemm512_block`], for `m` rows, with `j0 + 16 * NV <= n`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn gemm512_cols<const NV: usize>(
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
        let mr = (m - i0).min(6);
        // SAFETY: rows i0..i0+mr < m and columns j0..j0+16*NV <= n lie inside the extents
        // `check_gemm` verified.
        unsafe {
            let (ap, bp, cp) = (
                a.as_ptr().add(i0 * lda),
                b.as_ptr().add(j0),
                c.as_mut_ptr().add(i0 * ldc + j0),
            );
            match mr {
                6 => gemm512_block::<6, NV>(k, ap, lda, bp, ldb, cp, ldc),
                5 => gemm512_block::<5, NV>(k, ap, lda, bp, ldb, cp, ldc),
                4 => gemm512_block::<4, NV>(k, ap, lda, bp, ldb, cp, ldc),
                3 => gemm512_block::<3, NV>(k, ap, lda, bp, ldb, cp, ldc),
                2 => gemm512_block::<2, NV>(k, ap, lda, bp, ldb, cp, ldc),
                _ => gemm512_block::<1, NV>(k, ap, lda, bp, ldb, cp, ldc),
            }
        }
        i0 += mr;
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,f16c")]
fn gemm_f16b_512(
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
    while j0 + 16 <= n {
        let nv = ((n - j0) / 16).min(4);
        // SAFETY: extents checked above; j0 + 16 * nv <= n.
        unsafe {
            match nv {
                4 => gemm512_cols::<4>(m, k, a, lda, b, ldb, c, ldc, j0),
                3 => gemm512_cols::<3>(m, k, a, lda, b, ldb, c, ldc, j0),
                2 => gemm512_cols::<2>(m, k, a, lda, b, ldb, c, ldc, j0),
                _ => gemm512_cols::<1>(m, k, a, lda, b, ldb, c, ldc, j0),
            }
        }
        j0 += 16 * nv;
    }
    gemm_f16b_tail(m, n, k, a, lda, b, ldb, c, ldc, j0);
}

/// The first `min(k, 16)` lanes.
#[inline]
fn lanes16(k: usize) -> __mmask16 {
    if k >= 16 {
        0xFFFF
    } else {
        ((1u32 << k) - 1) as __mmask16
    }
}

/// e^x for 16 lanes; 0 below -104 (and for -inf).
#[inline]
#[target_feature(enable = "avx512f")]
fn exp512(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let x = _mm512_min_ps(x, _mm512_set1_ps(88.7));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(C6);
    for c in [C5, C4, C3, C2, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

#[target_feature(enable = "avx512f")]
fn exp_sum_512(x: &mut [f32], sub: f32) -> f32 {
    let vs = _mm512_set1_ps(sub);
    let mut acc = _mm512_setzero_ps();
    let mut chunks = x.chunks_exact_mut(16);
    for ch in &mut chunks {
        // SAFETY: a chunk is 16 floats.
        unsafe {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(ch.as_ptr()), vs));
            _mm512_storeu_ps(ch.as_mut_ptr(), e);
            acc = _mm512_add_ps(acc, e);
        }
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mask = lanes16(tail.len());
        // SAFETY: masked lanes are neither read nor written; the rest lie in `tail`.
        unsafe {
            let e = exp512(_mm512_sub_ps(
                _mm512_maskz_loadu_ps(mask, tail.as_ptr()),
                vs,
            ));
            _mm512_mask_storeu_ps(tail.as_mut_ptr(), mask, e);
            acc = _mm512_mask_add_ps(acc, mask, acc, e);
        }
    }
    _mm512_reduce_add_ps(acc)
}

// ---- AVX2 ----------------------------------------------------------------------------

/// One block of `MR` rows x `NV` 8-column vectors of `c += a · b`.
///
/// # Safety
/// As [`gemm512_block`] with AVX2, FMA and F16C, and 8-column vectors.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm256_block<const MR: usize, const NV: usize>(
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
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(c.add(r * ldc + v * 8));
            }
        }
        for kk in 0..k {
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_cvtph_ps(_mm_loadu_si128(b.add(kk * ldb + v * 8) as *const __m128i));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*a.add(r * lda + kk));
                for (x, &bx) in row.iter_mut().zip(&bv) {
                    *x = _mm256_fmadd_ps(av, bx, *x);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm256_storeu_ps(c.add(r * ldc + v * 8), *x);
            }
        }
    }
}

/// # Safety
/// As [`gemm512_cols`], with `j0 + 8 * NV <= n`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm256_cols<const NV: usize>(
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
                4 => gemm256_block::<4, NV>(k, ap, lda, bp, ldb, cp, ldc),
                3 => gemm256_block::<3, NV>(k, ap, lda, bp, ldb, cp, ldc),
                2 => gemm256_block::<2, NV>(k, ap, lda, bp, ldb, cp, ldc),
                _ => gemm256_block::<1, NV>(k, ap, lda, bp, ldb, cp, ldc),
            }
        }
        i0 += mr;
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
fn gemm_f16b_256(
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
                3 => gemm256_cols::<3>(m, k, a, lda, b, ldb, c, ldc, j0),
                2 => gemm256_cols::<2>(m, k, a, lda, b, ldb, c, ldc, j0),
                _ => gemm256_cols::<1>(m, k, a, lda, b, ldb, c, ldc, j0),
            }
        }
        j0 += 8 * nv;
    }
    gemm_f16b_tail(m, n, k, a, lda, b, ldb, c, ldc, j0);
}

/// e^x for 8 lanes; 0 below -87.3 (and for -inf).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp256(x: __m256) -> __m256 {
    let lo = _mm256_set1_ps(-87.3);
    let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
    let x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(C6);
    for c in [C5, C4, C3, C2, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    // 2^n by the exponent field: n is in -126..=127 after the clamp
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_andnot_ps(under, _mm256_mul_ps(p, pow2))
}

#[target_feature(enable = "avx2,fma")]
fn exp_sum_256(x: &mut [f32], sub: f32) -> f32 {
    let vs = _mm256_set1_ps(sub);
    let mut acc = _mm256_setzero_ps();
    let mut chunks = x.chunks_exact_mut(8);
    for ch in &mut chunks {
        // SAFETY: a chunk is 8 floats.
        unsafe {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(ch.as_ptr()), vs));
            _mm256_storeu_ps(ch.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` is 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let mut sum: f32 = lanes.iter().sum();
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mut buf = [0.0f32; 8];
        buf[..tail.len()].copy_from_slice(tail);
        // SAFETY: `buf` is 8 floats.
        unsafe {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), vs));
            _mm256_storeu_ps(buf.as_mut_ptr(), e);
        }
        tail.copy_from_slice(&buf[..tail.len()]);
        sum += tail.iter().sum::<f32>();
    }
    sum
}

// ---- gated activations and RMSNorm ----------------------------------------------------

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF_A: f32 = 0.044_715;

/// `g * sigmoid(s * z(g)) * u` on 16 lanes, with `z(g) = g` (SiLU, `s = 1`) or the GELU tanh
/// argument (`s = 2`, as [`crate::ops::gelu`]).
#[inline]
#[target_feature(enable = "avx512f")]
fn gated512<const GELU: bool>(g: __m512, u: __m512) -> __m512 {
    let z = if GELU {
        let g2 = _mm512_mul_ps(g, g);
        let inner = _mm512_fmadd_ps(_mm512_set1_ps(GELU_COEF_A), g2, _mm512_set1_ps(1.0));
        _mm512_mul_ps(
            _mm512_mul_ps(_mm512_set1_ps(-2.0 * SQRT_2_OVER_PI), g),
            inner,
        )
    } else {
        _mm512_sub_ps(_mm512_setzero_ps(), g)
    };
    let den = _mm512_add_ps(_mm512_set1_ps(1.0), exp512(z));
    _mm512_mul_ps(_mm512_div_ps(g, den), u)
}

#[target_feature(enable = "avx512f")]
fn gated_mul_512<const GELU: bool>(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let mut i = 0;
    while i < n {
        let m = lanes16(n - i);
        // SAFETY: lanes outside `m` are neither read nor written; the rest are below n.
        unsafe {
            let g = _mm512_maskz_loadu_ps(m, gate.as_ptr().add(i));
            let u = _mm512_maskz_loadu_ps(m, up.as_ptr().add(i));
            _mm512_mask_storeu_ps(gate.as_mut_ptr().add(i), m, gated512::<GELU>(g, u));
        }
        i += 16;
    }
}

#[target_feature(enable = "avx512f")]
fn rms_norm_512(x: &mut [f32], w: &[f32], eps: f32) {
    let n = x.len();
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i < n {
        // SAFETY: masked lanes are not read; the rest are below n.
        let v = unsafe { _mm512_maskz_loadu_ps(lanes16(n - i), x.as_ptr().add(i)) };
        let a = &mut acc[(i / 16) % 2];
        *a = _mm512_fmadd_ps(v, v, *a);
        i += 16;
    }
    let sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    let scale = 1.0 / (sum / n as f32 + eps).sqrt();
    let vs = _mm512_set1_ps(scale);
    let ones = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let m = lanes16(n - i);
        // weight lanes past w's end read as 1.0
        let mw = m & lanes16(w.len().saturating_sub(i));
        // SAFETY: masked lanes are neither read nor written; the rest are in bounds.
        unsafe {
            let g = _mm512_mask_loadu_ps(ones, mw, w.as_ptr().add(i.min(w.len())));
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x.as_ptr().add(i)), vs);
            _mm512_mask_storeu_ps(x.as_mut_ptr().add(i), m, _mm512_mul_ps(v, g));
        }
        i += 16;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn gated256<const GELU: bool>(g: __m256, u: __m256) -> __m256 {
    let z = if GELU {
        let g2 = _mm256_mul_ps(g, g);
        let inner = _mm256_fmadd_ps(_mm256_set1_ps(GELU_COEF_A), g2, _mm256_set1_ps(1.0));
        _mm256_mul_ps(
            _mm256_mul_ps(_mm256_set1_ps(-2.0 * SQRT_2_OVER_PI), g),
            inner,
        )
    } else {
        _mm256_sub_ps(_mm256_setzero_ps(), g)
    };
    let den = _mm256_add_ps(_mm256_set1_ps(1.0), exp256_inf(z));
    _mm256_mul_ps(_mm256_div_ps(g, den), u)
}

/// [`exp256`], but +inf above the f32 range (so `x / (1 + e)` goes to 0 as it should).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp256_inf(x: __m256) -> __m256 {
    let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(88.3));
    _mm256_blendv_ps(exp256(x), _mm256_set1_ps(f32::INFINITY), over)
}

#[target_feature(enable = "avx2,fma")]
fn gated_mul_256<const GELU: bool>(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (gate, up) = (&mut gate[..n], &up[..n]);
    let mut gc = gate.chunks_exact_mut(8);
    let mut uc = up.chunks_exact(8);
    for (g, u) in (&mut gc).zip(&mut uc) {
        // SAFETY: chunks of eight floats.
        unsafe {
            let r = gated256::<GELU>(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr()));
            _mm256_storeu_ps(g.as_mut_ptr(), r);
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

#[target_feature(enable = "avx2,fma")]
fn rms_norm_256(x: &mut [f32], w: &[f32], eps: f32) {
    let n = x.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut chunks = x.chunks_exact(8);
    for (i, ch) in (&mut chunks).enumerate() {
        // SAFETY: a chunk is 8 floats.
        let v = unsafe { _mm256_loadu_ps(ch.as_ptr()) };
        acc[i % 4] = _mm256_fmadd_ps(v, v, acc[i % 4]);
    }
    let mut lanes = [0.0f32; 8];
    let a = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    // SAFETY: `lanes` is 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), a) };
    let sum = lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|v| v * v).sum::<f32>();
    let scale = 1.0 / (sum / n as f32 + eps).sqrt();
    let vs = _mm256_set1_ps(scale);
    // the weighted part: full chunks of both `x` and `w`
    let m = n.min(w.len()) / 8 * 8;
    for i in (0..m).step_by(8) {
        // SAFETY: i + 8 <= m <= both lengths.
        unsafe {
            let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), vs);
            let g = _mm256_loadu_ps(w.as_ptr().add(i));
            _mm256_storeu_ps(x.as_mut_ptr().add(i), _mm256_mul_ps(v, g));
        }
    }
    for (i, v) in x.iter_mut().enumerate().skip(m) {
        *v *= scale * w.get(i).copied().unwrap_or(1.0);
    }
}

/// `(x0 c - x1 s, x0 s + x1 c)` on 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn rotate256(x0: __m256, x1: __m256, c: __m256, s: __m256) -> (__m256, __m256) {
    (
        _mm256_fmsub_ps(x0, c, _mm256_mul_ps(x1, s)),
        _mm256_fmadd_ps(x0, s, _mm256_mul_ps(x1, c)),
    )
}

/// [`crate::ops::rope`]: NeoX pairs `(x[i], x[i + n_dims/2])` eight at a time; GPT-J pairs
/// `(x[2i], x[2i+1])` four at a time, each cos/sin duplicated to its pair's two lanes and the
/// partner taken by swapping neighbours (`x c +- swap(x) s`, one `vfmaddsub`).
#[target_feature(enable = "avx2,fma")]
fn rope_256(x: &mut [f32], cos: &[f32], sin: &[f32], n_dims: usize, neox: bool) {
    let half = n_dims / 2;
    assert!(
        n_dims <= x.len() && half <= cos.len() && half <= sin.len(),
        "rope: slices too short"
    );
    let mut i = 0;
    if neox {
        while i + 8 <= half {
            // SAFETY: i + 8 <= half: elements i..i+8 and half+i..half+i+8 are below n_dims
            // <= x.len(); cos/sin lanes below half (asserted above).
            unsafe {
                let c = _mm256_loadu_ps(cos.as_ptr().add(i));
                let s = _mm256_loadu_ps(sin.as_ptr().add(i));
                let (p0, p1) = (x.as_mut_ptr().add(i), x.as_mut_ptr().add(i + half));
                let (r0, r1) = rotate256(_mm256_loadu_ps(p0), _mm256_loadu_ps(p1), c, s);
                _mm256_storeu_ps(p0, r0);
                _mm256_storeu_ps(p1, r1);
            }
            i += 8;
        }
    } else {
        while i + 4 <= half {
            // SAFETY: i + 4 <= half: elements 2i..2i+8 are below n_dims <= x.len(); cos/sin
            // lanes below half (asserted above).
            unsafe {
                let dup = |p: *const f32| {
                    let v = _mm_loadu_ps(p);
                    _mm256_set_m128(_mm_unpackhi_ps(v, v), _mm_unpacklo_ps(v, v))
                };
                let (c, s) = (dup(cos.as_ptr().add(i)), dup(sin.as_ptr().add(i)));
                let p = x.as_mut_ptr().add(2 * i);
                let v = _mm256_loadu_ps(p);
                let swapped = _mm256_permute_ps::<0b10_11_00_01>(v);
                // even lanes x0 c - x1 s, odd lanes x1 c + x0 s
                let r = _mm256_fmaddsub_ps(v, c, _mm256_mul_ps(swapped, s));
                _mm256_storeu_ps(p, r);
            }
            i += 4;
        }
    }
    crate::ops::rope_pairs(x, cos, sin, n_dims, neox, i);
}

// ---- safe entry points for the kernel tables ------------------------------------------

/// A safe wrapper `$name` of the `#[target_feature]` function `$impl` for level `$isa`.
macro_rules! entry {
    ($isa:literal, $name:ident = $impl:path, ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        #[allow(clippy::too_many_arguments)]
        pub(super) fn $name($($arg: $ty),*) $(-> $ret)? {
            // SAFETY: only placed in a kernel table after `Isa::$isa.available()` (which
            // covers every feature `$impl` enables) returned true.
            unsafe { $impl($($arg),*) }
        }
    };
}

entry!("Avx512", gemm_f16b_avx512 = gemm_f16b_512, (m: usize, n: usize, k: usize, a: &[f32],
    lda: usize, b: &[f16], ldb: usize, c: &mut [f32], ldc: usize));
entry!("Avx2", gemm_f16b_avx2 = gemm_f16b_256, (m: usize, n: usize, k: usize, a: &[f32],
    lda: usize, b: &[f16], ldb: usize, c: &mut [f32], ldc: usize));
entry!("Avx512", exp_sum_avx512 = exp_sum_512, (x: &mut [f32], sub: f32) -> f32);
entry!("Avx2", exp_sum_avx2 = exp_sum_256, (x: &mut [f32], sub: f32) -> f32);
entry!("Avx512", silu_mul_avx512 = gated_mul_512::<false>, (gate: &mut [f32], up: &[f32]));
entry!("Avx512", gelu_mul_avx512 = gated_mul_512::<true>, (gate: &mut [f32], up: &[f32]));
entry!("Avx2", silu_mul_avx2 = gated_mul_256::<false>, (gate: &mut [f32], up: &[f32]));
entry!("Avx2", gelu_mul_avx2 = gated_mul_256::<true>, (gate: &mut [f32], up: &[f32]));
entry!("Avx512", rms_norm_avx512 = rms_norm_512, (x: &mut [f32], w: &[f32], eps: f32));
entry!("Avx2", rms_norm_avx2 = rms_norm_256, (x: &mut [f32], w: &[f32], eps: f32));
entry!("Avx2", rope_avx2 = rope_256, (x: &mut [f32], cos: &[f32], sin: &[f32], n_dims: usize,
    neox: bool));
