//! [`crate::lut`]'s lookup-table kernel with AVX2: per chunk of four weight pairs and sixteen
//! rows, two nibble extractions, four `vpshufb` (low and high bytes of two tables per
//! 128-bit lane), four byte interleaves into 16-bit sums and four adds.

use std::arch::x86_64::*;

use crate::lut::{LUT_HEADER, LUT_ROWS, LUT_TABLE_UNIT, LUT_UNIT};

#[target_feature(enable = "avx2,fma,f16c")]
fn gemv_lut_impl(group: &[u8], n_units: usize, tables: &[u8], da: &[f32]) -> [f32; LUT_ROWS] {
    let n_units = crate::lut::usable_units(group, n_units, tables, da);
    let mut out = [0.0f32; LUT_ROWS];
    // SAFETY: unit `u < n_units` lies inside `group` and its tables inside `tables` (checked
    // above); every load below is within them.
    unsafe {
        let low = _mm256_set1_epi8(0x0F);
        let (mut f0, mut f1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for u in 0..n_units {
            let unit = group.as_ptr().add(u * LUT_UNIT);
            let tab = tables.as_ptr().add(u * LUT_TABLE_UNIT);
            // 16-bit sums: rows 0..8 (`lo`) and 8..16 (`hi`), each lane its own pairs
            let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for c in 0..32 {
                let idx = _mm256_loadu_si256(unit.add(LUT_HEADER + 32 * c) as *const __m256i);
                let il = _mm256_and_si256(idx, low);
                let ih = _mm256_and_si256(_mm256_srli_epi16::<4>(idx), low);
                let t = tab.add(128 * c) as *const __m256i;
                let a_lo = _mm256_shuffle_epi8(_mm256_loadu_si256(t), il);
                let a_hi = _mm256_shuffle_epi8(_mm256_loadu_si256(t.add(1)), il);
                let b_lo = _mm256_shuffle_epi8(_mm256_loadu_si256(t.add(2)), ih);
                let b_hi = _mm256_shuffle_epi8(_mm256_loadu_si256(t.add(3)), ih);
                lo = _mm256_add_epi16(
                    lo,
                    _mm256_add_epi16(
                        _mm256_unpacklo_epi8(a_lo, a_hi),
                        _mm256_unpacklo_epi8(b_lo, b_hi),
                    ),
                );
                hi = _mm256_add_epi16(
                    hi,
                    _mm256_add_epi16(
                        _mm256_unpackhi_epi8(a_lo, a_hi),
                        _mm256_unpackhi_epi8(b_lo, b_hi),
                    ),
                );
            }
            // the two lanes' sums of each row, in 32 bits
            let lanes = |x: __m256i| {
                _mm256_add_epi32(
                    _mm256_cvtepi16_epi32(_mm256_castsi256_si128(x)),
                    _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(x)),
                )
            };
            let s = _mm256_set1_ps(*da.get_unchecked(u));
            let d0 = _mm256_cvtph_ps(_mm_loadu_si128(unit as *const __m128i));
            let d1 = _mm256_cvtph_ps(_mm_loadu_si128(unit.add(16) as *const __m128i));
            f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes(lo)), _mm256_mul_ps(d0, s), f0);
            f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes(hi)), _mm256_mul_ps(d1, s), f1);
        }
        _mm256_storeu_ps(out.as_mut_ptr(), f0);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), f1);
    }
    out
}

/// [`crate::dispatch::LutGemvFn`] with AVX2.
pub(super) fn gemv_lut_avx2(
    group: &[u8],
    n_units: usize,
    tables: &[u8],
    da: &[f32],
) -> [f32; LUT_ROWS] {
    // SAFETY: only placed in a kernel table after `Isa::Avx2.available()` confirmed AVX2, FMA
    // and F16C.
    unsafe { gemv_lut_impl(group, n_units, tables, da) }
}
