//! AVX2 attention products over an 8-bit KV cache: [`crate::kvquant::gemm_q8b`] with the
//! codes converted to f32 inside the loop (int8 by sign extension; FP8 E4M3 by moving its
//! bits into an f16's fields and F16C, which gives the value times 2^-8). The AVX-512 table
//! uses these too.

use std::arch::x86_64::*;

use crate::kvquant::{KvType, QK};

/// Eight codes of one format to f32 lanes (before the scale and [`Codes::MUL`]).
trait Codes {
    const TY: KvType;
    /// multiplies every value after [`Codes::load8`]
    const MUL: f32;
    /// # Safety
    /// `p..p + 8` readable; AVX2 and F16C available.
    unsafe fn load8(p: *const u8) -> __m256;
}

struct Q8;
struct Fp8;

impl Codes for Q8 {
    const TY: KvType = KvType::Q8_0;
    const MUL: f32 = 1.0;
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bytes.
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
    }
}

impl Codes for Fp8 {
    const TY: KvType = KvType::Fp8;
    const MUL: f32 = 256.0;
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bytes.
        unsafe {
            let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
            let sign = _mm_slli_epi16::<8>(_mm_and_si128(b, _mm_set1_epi16(0x80)));
            let mag = _mm_slli_epi16::<7>(_mm_and_si128(b, _mm_set1_epi16(0x7F)));
            _mm256_cvtph_ps(_mm_or_si128(sign, mag))
        }
    }
}

/// One block of `MR` rows x `NV` 8-column vectors of `c += a · B`, columns starting at a
/// multiple of 8 (so each vector lies in one group of a value row's scales).
///
/// # Safety
/// AVX2, FMA and F16C; `a` rows `0..MR` x `0..k`, `b` rows `0..k` x `0..8 * NV`, `c` rows
/// `0..MR` x `0..8 * NV` and the scales those columns need (`s` at column 0 of the block for
/// [`crate::kvquant::ScaleAxis::K`]; for [`crate::kvquant::ScaleAxis::N`] at the group of column 0, which is column `jg` of
/// that group) lie inside their slices.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block<C: Codes, const AXIS_K: bool, const MR: usize, const NV: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const u8,
    ldb: usize,
    s: *const f32,
    lds: usize,
    jg: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY: every access is inside the extents the caller guarantees.
    unsafe {
        let mul = _mm256_set1_ps(C::MUL);
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(c.add(r * ldc + v * 8));
            }
        }
        let mut kk = 0;
        while kk < k {
            let end = if AXIS_K { (kk + QK).min(k) } else { kk + 1 };
            // the scales of these rows: one vector per column vector along k, or one value
            // per row and vector along n
            let mut sv = [_mm256_setzero_ps(); NV];
            if AXIS_K {
                for (v, x) in sv.iter_mut().enumerate() {
                    *x = _mm256_mul_ps(_mm256_loadu_ps(s.add((kk / QK) * lds + v * 8)), mul);
                }
            }
            for kr in kk..end {
                let mut bv = [_mm256_setzero_ps(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    let scale = if AXIS_K {
                        sv[v]
                    } else {
                        _mm256_set1_ps(*s.add(kr * lds + (jg + v * 8) / QK) * C::MUL)
                    };
                    *x = _mm256_mul_ps(C::load8(b.add(kr * ldb + v * 8)), scale);
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_ps(*a.add(r * lda + kr));
                    for (x, &bx) in row.iter_mut().zip(&bv) {
                        *x = _mm256_fmadd_ps(av, bx, *x);
                    }
                }
            }
            kk = end;
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm256_storeu_ps(c.add(r * ldc + v * 8), *x);
            }
        }
    }
}

crate::kvquant::q8b_kernels!("avx2,fma,f16c", "only placed in a kernel table after `Isa::Avx2.available()` (which covers AVX2, FMA and F16C) returned true");
