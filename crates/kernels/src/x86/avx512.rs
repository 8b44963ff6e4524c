//! AVX-512 (F, BW, VL) kernels: two 32-element blocks per 512-bit register.

use std::arch::x86_64::*;

use crate::blocks::*;

/// Signed bytes x signed bytes: 16 x i32 (pairs of adjacent quads summed).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn mul_sum_i8(x: __m512i, y: __m512i) -> __m512i {
    let ax = _mm512_abs_epi8(x);
    // move x's sign onto y: negate y where x < 0
    let neg = _mm512_movepi8_mask(x);
    let sy = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
    let dot = _mm512_maddubs_epi16(ax, sy);
    _mm512_madd_epi16(dot, _mm512_set1_epi16(1))
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn dot_q8_0_impl(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    let n = x.len().min(y.len());
    while i + 2 <= n {
        let (a0, a1, b0, b1) = (&x[i], &x[i + 1], &y[i], &y[i + 1]);
        // SAFETY: each qs array is exactly 32 bytes.
        let (qx, qy) = unsafe {
            (
                _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(a0.qs.as_ptr() as *const __m256i)),
                    _mm256_loadu_si256(a1.qs.as_ptr() as *const __m256i),
                ),
                _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(b0.qs.as_ptr() as *const __m256i)),
                    _mm256_loadu_si256(b1.qs.as_ptr() as *const __m256i),
                ),
            )
        };
        let d0 = _mm256_set1_ps(a0.d.to_f32() * b0.d.to_f32());
        let d1 = _mm256_set1_ps(a1.d.to_f32() * b1.d.to_f32());
        let d = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castpd256_pd512(_mm256_castps_pd(d0)),
            _mm256_castps_pd(d1),
        ));
        acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(mul_sum_i8(qx, qy)), acc);
        i += 2;
    }
    let mut sum = _mm512_reduce_add_ps(acc);
    if i < n {
        sum += crate::quant::dot::vec_dot_q8_0_q8_0(&x[i..n], &y[i..n]);
    }
    sum
}

#[target_feature(enable = "avx512f")]
fn dot_f32_impl(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: i + 16k + 16 <= n for both slices.
            let (vx, vy) = unsafe {
                (
                    _mm512_loadu_ps(x.as_ptr().add(i + 16 * k)),
                    _mm512_loadu_ps(y.as_ptr().add(i + 16 * k)),
                )
            };
            *a = _mm512_fmadd_ps(vx, vy, *a);
        }
        i += 32;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    for j in i..n {
        sum += x[j] * y[j];
    }
    sum
}

pub(super) fn dot_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    // SAFETY: only placed in a kernel table after `Isa::Avx512.available()` (which
    // includes the AVX2 features) returned true.
    unsafe { dot_q8_0_impl(x, y) }
}

pub(super) fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    // SAFETY: as above.
    unsafe { dot_f32_impl(x, y) }
}
