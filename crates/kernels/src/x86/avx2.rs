//! AVX2 + FMA + F16C kernels.
//!
//! Integer products use `maddubs` (unsigned x signed bytes -> i16 pairs) and `madd` (-> i32);
//! a signed x signed product moves the sign of x onto y first. Each block's i32 sum is
//! converted to f32 and scaled once, as in the scalar reference.

use std::arch::x86_64::*;

use half::f16;

use super::fp16;
use crate::blocks::*;

/// Horizontal sum of 8 f32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Unsigned bytes x signed bytes, summed in pairs then quads: 8 x i32.
#[inline]
#[target_feature(enable = "avx2")]
fn mul_sum_us8(ux: __m256i, sy: __m256i) -> __m256i {
    let dot = _mm256_maddubs_epi16(ux, sy);
    _mm256_madd_epi16(dot, _mm256_set1_epi16(1))
}

/// Signed bytes x signed bytes: 8 x i32.
#[inline]
#[target_feature(enable = "avx2")]
fn mul_sum_i8(x: __m256i, y: __m256i) -> __m256i {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    mul_sum_us8(ax, sy)
}

/// Loads 16 bytes of packed nibbles as 32 bytes: low nibbles then high nibbles.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn nibbles_32(qs: &[u8; 16]) -> __m256i {
    // SAFETY: reading exactly 16 bytes from a 16-byte array (unaligned load).
    let tmp = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(tmp), tmp);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Spreads 32 bits into 32 bytes: byte i = 0xFF if bit i is set, else 0.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn bits_to_bytes(bits: u32) -> __m256i {
    let shuf = _mm256_setr_epi64x(
        0x0000_0000_0000_0000,
        0x0101_0101_0101_0101,
        0x0202_0202_0202_0202,
        0x0303_0303_0303_0303,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
    let mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
    let bytes = _mm256_or_si256(bytes, mask);
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load32(p: &[i8]) -> __m256i {
    debug_assert!(p.len() >= 32);
    // SAFETY: callers pass slices of at least 32 bytes (fixed-size block arrays).
    unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) }
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load32u(p: &[u8]) -> __m256i {
    debug_assert!(p.len() >= 32);
    // SAFETY: callers pass slices of at least 32 bytes (fixed-size block arrays).
    unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q8_0_impl(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (a, b) in x.iter().zip(y) {
        let d = _mm256_set1_ps(fp16(a.d) * fp16(b.d));
        let p = _mm256_cvtepi32_ps(mul_sum_i8(load32(&a.qs), load32(&b.qs)));
        acc = _mm256_fmadd_ps(d, p, acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_0_impl(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let eight = _mm256_set1_epi8(8);
    for (a, b) in x.iter().zip(y) {
        let d = _mm256_set1_ps(fp16(a.d) * fp16(b.d));
        let qx = _mm256_sub_epi8(nibbles_32(&a.qs), eight);
        let p = _mm256_cvtepi32_ps(mul_sum_i8(qx, load32(&b.qs)));
        acc = _mm256_fmadd_ps(d, p, acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_1_impl(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let d = _mm256_set1_ps(fp16(a.d) * fp16(b.d));
        summs += fp16(a.m) * fp16(b.s);
        let p = _mm256_cvtepi32_ps(mul_sum_us8(nibbles_32(&a.qs), load32(&b.qs)));
        acc = _mm256_fmadd_ps(d, p, acc);
    }
    hsum_ps(acc) + summs
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q5_0_impl(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let hi_clear = _mm256_set1_epi8(0xF0u8 as i8);
    for (a, b) in x.iter().zip(y) {
        let d = _mm256_set1_ps(fp16(a.d) * fp16(b.d));
        let set = bits_to_bytes(u32::from_le_bytes(a.qh));
        // value - 16: a nibble without its fifth bit becomes nibble | 0xF0 (= nibble - 16)
        let qx = _mm256_or_si256(nibbles_32(&a.qs), _mm256_andnot_si256(set, hi_clear));
        let p = _mm256_cvtepi32_ps(mul_sum_i8(qx, load32(&b.qs)));
        acc = _mm256_fmadd_ps(d, p, acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q5_1_impl(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    let bit4 = _mm256_set1_epi8(0x10);
    for (a, b) in x.iter().zip(y) {
        let d = _mm256_set1_ps(fp16(a.d) * fp16(b.d));
        summs += fp16(a.m) * fp16(b.s);
        let set = bits_to_bytes(u32::from_le_bytes(a.qh));
        let qx = _mm256_or_si256(nibbles_32(&a.qs), _mm256_and_si256(set, bit4));
        let p = _mm256_cvtepi32_ps(mul_sum_us8(qx, load32(&b.qs)));
        acc = _mm256_fmadd_ps(d, p, acc);
    }
    hsum_ps(acc) + summs
}

/// Sum over sub-blocks of `m[s] * (bsums[2s] + bsums[2s+1])`.
#[inline]
pub(super) fn mins_dot(m: &[u8; 8], bsums: &[i16; 16]) -> i32 {
    (0..8)
        .map(|s| m[s] as i32 * (bsums[2 * s] as i32 + bsums[2 * s + 1] as i32))
        .sum()
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4k_impl(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0.0f32;
    let low4 = _mm256_set1_epi8(0x0F);
    for (a, b) in x.iter().zip(y) {
        let (sc, m) = crate::quant::dequant::unpack_scales_k4(&a.scales);
        acc_m += b.d * fp16(a.dmin) * mins_dot(&m, &b.bsums) as f32;
        let mut sumi = _mm256_setzero_si256();
        for j in 0..4 {
            let q4 = load32u(&a.qs[32 * j..]);
            let lo = _mm256_and_si256(q4, low4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), low4);
            let plo = _mm256_maddubs_epi16(lo, load32(&b.qs[64 * j..]));
            let phi = _mm256_maddubs_epi16(hi, load32(&b.qs[64 * j + 32..]));
            let plo = _mm256_madd_epi16(plo, _mm256_set1_epi16(sc[2 * j] as i16));
            let phi = _mm256_madd_epi16(phi, _mm256_set1_epi16(sc[2 * j + 1] as i16));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        let d = _mm256_set1_ps(b.d * fp16(a.d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - acc_m
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q5k_impl(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0.0f32;
    let low4 = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    for (a, b) in x.iter().zip(y) {
        let (sc, m) = crate::quant::dequant::unpack_scales_k4(&a.scales);
        acc_m += b.d * fp16(a.dmin) * mins_dot(&m, &b.bsums) as f32;
        let qh = load32u(&a.qh);
        let mut sumi = _mm256_setzero_si256();
        for j in 0..4 {
            let q4 = load32u(&a.qs[32 * j..]);
            // bit 2j of qh is the fifth bit of the low nibbles, bit 2j+1 of the high ones
            let h0 = _mm256_and_si256(
                _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32)),
                _mm256_set1_epi8(1),
            );
            let h1 = _mm256_and_si256(
                _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32 + 1)),
                _mm256_set1_epi8(1),
            );
            let lo = _mm256_or_si256(
                _mm256_and_si256(q4, low4),
                _mm256_and_si256(_mm256_slli_epi16::<4>(h0), bit4),
            );
            let hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(q4), low4),
                _mm256_and_si256(_mm256_slli_epi16::<4>(h1), bit4),
            );
            let plo = _mm256_maddubs_epi16(lo, load32(&b.qs[64 * j..]));
            let phi = _mm256_maddubs_epi16(hi, load32(&b.qs[64 * j + 32..]));
            let plo = _mm256_madd_epi16(plo, _mm256_set1_epi16(sc[2 * j] as i16));
            let phi = _mm256_madd_epi16(phi, _mm256_set1_epi16(sc[2 * j + 1] as i16));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        let d = _mm256_set1_ps(b.d * fp16(a.d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - acc_m
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q6k_impl(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let low4 = _mm256_set1_epi8(0x0F);
    let two = _mm256_set1_epi8(3);
    let off = _mm256_set1_epi8(32);
    for (a, b) in x.iter().zip(y) {
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            let ql0 = load32u(&a.ql[64 * h..]);
            let ql1 = load32u(&a.ql[64 * h + 32..]);
            let qh = load32u(&a.qh[32 * h..]);
            let hb = |s: i32| -> __m256i {
                let v = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(s));
                _mm256_slli_epi16::<4>(_mm256_and_si256(v, two))
            };
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, low4), hb(0)),
                _mm256_or_si256(_mm256_and_si256(ql1, low4), hb(2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4), hb(4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4), hb(6)),
            ];
            for (c, qc) in q.iter().enumerate() {
                let base = 128 * h + 32 * c;
                let y8 = load32(&b.qs[base..]);
                let p =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(*qc, y8), _mm256_maddubs_epi16(off, y8));
                let g = base / 16;
                let scales = _mm256_set_m128i(
                    _mm_set1_epi16(a.scales[g + 1] as i16),
                    _mm_set1_epi16(a.scales[g] as i16),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scales));
            }
        }
        let d = _mm256_set1_ps(b.d * fp16(a.d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q3k_impl(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let three = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    for (a, b) in x.iter().zip(y) {
        let sc = q3k_scales(&a.scales);
        let hm = load32u(&a.hmask);
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            let qs = load32u(&a.qs[32 * h..]);
            for j in 0..4 {
                let low =
                    _mm256_and_si256(_mm256_srl_epi16(qs, _mm_cvtsi32_si128(2 * j as i32)), three);
                let bit = _mm256_set1_epi8((1u8 << (4 * h + j)) as i8);
                let has = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit);
                // q = low - (bit set ? 0 : 4) = (low + 4*set?) - 4 ; use unsigned low' = low + (set?4:0)
                let up = _mm256_or_si256(low, _mm256_and_si256(has, four));
                let base = 128 * h + 32 * j;
                let y8 = load32(&b.qs[base..]);
                let p =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(up, y8), _mm256_maddubs_epi16(four, y8));
                let g = base / 16;
                let scales = _mm256_set_m128i(
                    _mm_set1_epi16(sc[g + 1] as i16),
                    _mm_set1_epi16(sc[g] as i16),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scales));
            }
        }
        let d = _mm256_set1_ps(b.d * fp16(a.d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q2k_impl(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0.0f32;
    let three = _mm256_set1_epi8(3);
    for (a, b) in x.iter().zip(y) {
        let summs: i32 = (0..16)
            .map(|g| (a.scales[g] >> 4) as i32 * b.bsums[g] as i32)
            .sum();
        acc_m += b.d * fp16(a.dmin) * summs as f32;
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            let qs = load32u(&a.qs[32 * h..]);
            for j in 0..4 {
                let q =
                    _mm256_and_si256(_mm256_srl_epi16(qs, _mm_cvtsi32_si128(2 * j as i32)), three);
                let base = 128 * h + 32 * j;
                let p = _mm256_maddubs_epi16(q, load32(&b.qs[base..]));
                let g = base / 16;
                let scales = _mm256_set_m128i(
                    _mm_set1_epi16((a.scales[g + 1] & 0xF) as i16),
                    _mm_set1_epi16((a.scales[g] & 0xF) as i16),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scales));
            }
        }
        let d = _mm256_set1_ps(b.d * fp16(a.d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) - acc_m
}

/// Float weights: one weight row with one or four activation rows. Each token's sum takes
/// the same path whichever entry computes it (two accumulators over 16-value steps, one
/// 8-value step, the sum of both, the scalar tail), so a token's result is bit for bit the
/// same alone or in a group of four: speculative decoding's greedy output then equals
/// plain decoding's on float models too.
macro_rules! float_dots {
    ($one:ident, $four:ident, $w:ty, $load_w:expr, $to_f32:expr, $feat:literal) => {
        #[target_feature(enable = $feat)]
        fn $one(x: &[$w], y: &[f32]) -> f32 {
            let n = x.len().min(y.len());
            let lw = $load_w;
            let mut a = [_mm256_setzero_ps(); 2];
            let mut i = 0;
            while i + 16 <= n {
                // SAFETY: i + 16 <= n, within x and y.
                unsafe {
                    a[0] = _mm256_fmadd_ps(
                        lw(x.as_ptr().add(i)),
                        _mm256_loadu_ps(y.as_ptr().add(i)),
                        a[0],
                    );
                    a[1] = _mm256_fmadd_ps(
                        lw(x.as_ptr().add(i + 8)),
                        _mm256_loadu_ps(y.as_ptr().add(i + 8)),
                        a[1],
                    );
                }
                i += 16;
            }
            if i + 8 <= n {
                // SAFETY: i + 8 <= n.
                unsafe {
                    a[0] = _mm256_fmadd_ps(
                        lw(x.as_ptr().add(i)),
                        _mm256_loadu_ps(y.as_ptr().add(i)),
                        a[0],
                    );
                }
                i += 8;
            }
            let mut sum = hsum_ps(_mm256_add_ps(a[0], a[1]));
            for j in i..n {
                sum += $to_f32(x[j]) * y[j];
            }
            sum
        }

        #[target_feature(enable = $feat)]
        fn $four(x: &[$w], ys: [&[f32]; 4]) -> [f32; 4] {
            let n = ys.iter().fold(x.len(), |m, y| m.min(y.len()));
            let lw = $load_w;
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut i = 0;
            while i + 16 <= n {
                // SAFETY: i + 16 <= n, within x and every y.
                let (w0, w1) = unsafe { (lw(x.as_ptr().add(i)), lw(x.as_ptr().add(i + 8))) };
                for (a, y) in acc.iter_mut().zip(&ys) {
                    // SAFETY: as above.
                    let (y0, y1) = unsafe {
                        (
                            _mm256_loadu_ps(y.as_ptr().add(i)),
                            _mm256_loadu_ps(y.as_ptr().add(i + 8)),
                        )
                    };
                    a[0] = _mm256_fmadd_ps(w0, y0, a[0]);
                    a[1] = _mm256_fmadd_ps(w1, y1, a[1]);
                }
                i += 16;
            }
            if i + 8 <= n {
                // SAFETY: i + 8 <= n.
                let w0 = unsafe { lw(x.as_ptr().add(i)) };
                for (a, y) in acc.iter_mut().zip(&ys) {
                    // SAFETY: as above.
                    let y0 = unsafe { _mm256_loadu_ps(y.as_ptr().add(i)) };
                    a[0] = _mm256_fmadd_ps(w0, y0, a[0]);
                }
                i += 8;
            }
            let mut out = [0.0f32; 4];
            for ((o, a), y) in out.iter_mut().zip(&acc).zip(&ys) {
                let mut sum = hsum_ps(_mm256_add_ps(a[0], a[1]));
                for j in i..n {
                    sum += $to_f32(x[j]) * y[j];
                }
                *o = sum;
            }
            out
        }
    };
}

float_dots!(
    dot_f32_impl,
    dot4_f32_impl,
    f32,
    // SAFETY (of the closure's callers): 8 values from p are in bounds.
    |p: *const f32| unsafe { _mm256_loadu_ps(p) },
    |v: f32| v,
    "avx2,fma"
);
float_dots!(
    dot_f16_impl,
    dot4_f16_impl,
    f16,
    // SAFETY (of the closure's callers): 8 f16 values (128 bits) from p are in bounds.
    |p: *const f16| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) },
    |v: f16| v.to_f32(),
    "avx2,fma,f16c"
);

#[target_feature(enable = "avx2,fma,f16c")]
fn axpy_f16_impl(y: &mut [f32], a: f32, x: &[f16]) {
    let n = x.len().min(y.len());
    let va = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n for both slices; 8 f16 values are 128 bits.
        unsafe {
            let vx = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i) as *const __m128i));
            let p = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, _mm256_fmadd_ps(va, vx, _mm256_loadu_ps(p)));
        }
        i += 8;
    }
    for j in i..n {
        y[j] += a * x[j].to_f32();
    }
}

pub(super) fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    // SAFETY: only placed in a kernel table after `Isa::Avx2.available()` confirmed
    // AVX2, FMA and F16C.
    unsafe { axpy_f16_impl(y, a, x) }
}

macro_rules! safe_wrapper {
    ($name:ident, $impl:ident, $w:ty, $a:ty) => {
        pub(super) fn $name(x: &[$w], y: &[$a]) -> f32 {
            // SAFETY: these wrappers are only put in a kernel table after
            // `Isa::Avx2.available()` confirmed AVX2, FMA and F16C.
            unsafe { $impl(x, y) }
        }
    };
}

safe_wrapper!(dot_q8_0, dot_q8_0_impl, BlockQ8_0, BlockQ8_0);
safe_wrapper!(dot_q4_0, dot_q4_0_impl, BlockQ4_0, BlockQ8_0);
safe_wrapper!(dot_q4_1, dot_q4_1_impl, BlockQ4_1, BlockQ8_1);
safe_wrapper!(dot_q5_0, dot_q5_0_impl, BlockQ5_0, BlockQ8_0);
safe_wrapper!(dot_q5_1, dot_q5_1_impl, BlockQ5_1, BlockQ8_1);
safe_wrapper!(dot_q2k, dot_q2k_impl, BlockQ2K, BlockQ8K);
safe_wrapper!(dot_q3k, dot_q3k_impl, BlockQ3K, BlockQ8K);
safe_wrapper!(dot_q4k, dot_q4k_impl, BlockQ4K, BlockQ8K);
safe_wrapper!(dot_q5k, dot_q5k_impl, BlockQ5K, BlockQ8K);
safe_wrapper!(dot_q6k, dot_q6k_impl, BlockQ6K, BlockQ8K);
safe_wrapper!(dot_f32, dot_f32_impl, f32, f32);
safe_wrapper!(dot_f16, dot_f16_impl, f16, f32);

// ---- four activation rows per weight row -------------------------------------------

/// The `m * s` term of blocks with a minimum (zero for the symmetric formats).
pub(super) trait MinSum {
    fn min_term(&self) -> half::f16;
}
pub(super) trait ActSum {
    fn sum_term(&self) -> half::f16;
}

macro_rules! terms {
    ($tr:ident, $f:ident: $($t:ty => |$b:ident| $e:expr),* $(,)?) => { $(
        impl $tr for $t {
            fn $f(&self) -> half::f16 {
                let $b = self;
                $e
            }
        }
    )* };
}

terms!(MinSum, min_term:
    BlockQ4_1 => |b| b.m,
    BlockQ5_1 => |b| b.m,
    BlockQ4_0 => |_b| half::f16::ZERO,
    BlockQ5_0 => |_b| half::f16::ZERO,
    BlockQ8_0 => |_b| half::f16::ZERO,
);
terms!(ActSum, sum_term:
    BlockQ8_1 => |b| b.s,
    BlockQ8_0 => |_b| half::f16::ZERO,
);

macro_rules! blocks4 {
    ($name:ident, $W:ty, $A:ty, |$a:ident| $q:expr, signed: $signed:expr, mins: $mins:expr) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $name(x: &[$W], ys: [&[$A]; 4]) -> [f32; 4] {
            let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut summs = [0.0f32; 4];
            for i in 0..n {
                let qx = {
                    let $a = &x[i];
                    $q
                };
                let dx = fp16(x[i].d);
                let mx = fp16(x[i].min_term());
                for (t, y) in ys.iter().enumerate() {
                    let qy = load32(&y[i].qs);
                    let p = if $signed {
                        mul_sum_i8(qx, qy)
                    } else {
                        mul_sum_us8(qx, qy)
                    };
                    let d = _mm256_set1_ps(dx * fp16(y[i].d));
                    acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[t]);
                    if $mins {
                        summs[t] += mx * fp16(y[i].sum_term());
                    }
                }
            }
            std::array::from_fn(|t| hsum_ps(acc[t]) + summs[t])
        }
    };
}

blocks4!(dot4_q8_0_impl, BlockQ8_0, BlockQ8_0, |a| load32(&a.qs), signed: true, mins: false);
blocks4!(dot4_q4_1_impl, BlockQ4_1, BlockQ8_1, |a| nibbles_32(&a.qs), signed: false, mins: true);
blocks4!(dot4_q5_0_impl, BlockQ5_0, BlockQ8_0,
    |a| _mm256_or_si256(nibbles_32(&a.qs), _mm256_andnot_si256(bits_to_bytes(u32::from_le_bytes(a.qh)), _mm256_set1_epi8(0xF0u8 as i8))),
    signed: true, mins: false);

#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_q4k_impl(x: &[BlockQ4K], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
    let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut acc_m = [0.0f32; 4];
    let low4 = _mm256_set1_epi8(0x0F);
    for i in 0..n {
        let a = &x[i];
        let (sc, m) = crate::quant::dequant::unpack_scales_k4(&a.scales);
        let (da, dmin) = (fp16(a.d), fp16(a.dmin));
        let mut sumi = [_mm256_setzero_si256(); 4];
        for j in 0..4 {
            let q4 = load32u(&a.qs[32 * j..]);
            let lo = _mm256_and_si256(q4, low4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), low4);
            let (slo, shi) = (
                _mm256_set1_epi16(sc[2 * j] as i16),
                _mm256_set1_epi16(sc[2 * j + 1] as i16),
            );
            for (t, y) in ys.iter().enumerate() {
                let b = &y[i];
                let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load32(&b.qs[64 * j..])), slo);
                let phi =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load32(&b.qs[64 * j + 32..])), shi);
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(plo, phi));
            }
        }
        for (t, y) in ys.iter().enumerate() {
            let b = &y[i];
            acc_m[t] += b.d * dmin * mins_dot(&m, &b.bsums) as f32;
            acc[t] = _mm256_fmadd_ps(
                _mm256_set1_ps(b.d * da),
                _mm256_cvtepi32_ps(sumi[t]),
                acc[t],
            );
        }
    }
    std::array::from_fn(|t| hsum_ps(acc[t]) - acc_m[t])
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_q6k_impl(x: &[BlockQ6K], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
    let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
    let mut acc = [_mm256_setzero_ps(); 4];
    let low4 = _mm256_set1_epi8(0x0F);
    let three = _mm256_set1_epi8(3);
    let off = _mm256_set1_epi8(32);
    for i in 0..n {
        let a = &x[i];
        let mut sumi = [_mm256_setzero_si256(); 4];
        for h in 0..2 {
            let ql0 = load32u(&a.ql[64 * h..]);
            let ql1 = load32u(&a.ql[64 * h + 32..]);
            let qh = load32u(&a.qh[32 * h..]);
            let hb = |s: i32| -> __m256i {
                _mm256_slli_epi16::<4>(_mm256_and_si256(
                    _mm256_srl_epi16(qh, _mm_cvtsi32_si128(s)),
                    three,
                ))
            };
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, low4), hb(0)),
                _mm256_or_si256(_mm256_and_si256(ql1, low4), hb(2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4), hb(4)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4), hb(6)),
            ];
            for (c, qc) in q.iter().enumerate() {
                let base = 128 * h + 32 * c;
                let g = base / 16;
                let scales = _mm256_set_m128i(
                    _mm_set1_epi16(a.scales[g + 1] as i16),
                    _mm_set1_epi16(a.scales[g] as i16),
                );
                for (t, y) in ys.iter().enumerate() {
                    let y8 = load32(&y[i].qs[base..]);
                    let p = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(*qc, y8),
                        _mm256_maddubs_epi16(off, y8),
                    );
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, scales));
                }
            }
        }
        let da = fp16(a.d);
        for (t, y) in ys.iter().enumerate() {
            acc[t] = _mm256_fmadd_ps(
                _mm256_set1_ps(y[i].d * da),
                _mm256_cvtepi32_ps(sumi[t]),
                acc[t],
            );
        }
    }
    std::array::from_fn(|t| hsum_ps(acc[t]))
}

macro_rules! safe_wrapper4 {
    ($name:ident, $impl:ident, $w:ty, $a:ty) => {
        pub(super) fn $name(x: &[$w], ys: [&[$a]; 4]) -> [f32; 4] {
            // SAFETY: only placed in a kernel table after `Isa::Avx2.available()` confirmed
            // AVX2, FMA and F16C.
            unsafe { $impl(x, ys) }
        }
    };
}

safe_wrapper4!(dot4_q8_0, dot4_q8_0_impl, BlockQ8_0, BlockQ8_0);
safe_wrapper4!(dot4_q4_1, dot4_q4_1_impl, BlockQ4_1, BlockQ8_1);
safe_wrapper4!(dot4_q5_0, dot4_q5_0_impl, BlockQ5_0, BlockQ8_0);
safe_wrapper4!(dot4_q4k, dot4_q4k_impl, BlockQ4K, BlockQ8K);
safe_wrapper4!(dot4_q6k, dot4_q6k_impl, BlockQ6K, BlockQ8K);
safe_wrapper4!(dot4_f32, dot4_f32_impl, f32, f32);
safe_wrapper4!(dot4_f16, dot4_f16_impl, f16, f32);

// ---- activations for repacked weights ----------------------------------------------------

/// Sum of the eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// One [`crate::repack::BlockQ8x`] from its 32 values (four registers of eight i32 within
/// -127..=127) and scale `d`: the bytes in order, `s = d * sum` and the halves' sums.
#[inline]
#[target_feature(enable = "avx2")]
fn store_q8x(q: &[__m256i; 4], d: f32, b: &mut crate::repack::BlockQ8x) {
    // i32 -> i16 -> i8 packs work per 128-bit lane: restore the order after
    let w0 = _mm256_packs_epi32(q[0], q[1]);
    let w1 = _mm256_packs_epi32(q[2], q[3]);
    let bytes = _mm256_packs_epi16(w0, w1);
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: the block's `qs` is 32 bytes.
    unsafe { _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, bytes) };
    let s0 = hsum_epi32(_mm256_add_epi32(q[0], q[1]));
    let s1 = hsum_epi32(_mm256_add_epi32(q[2], q[3]));
    b.d = d;
    b.s = d * (s0 + s1) as f32;
    b.sums = [s0 as i16, s1 as i16];
}

/// [`crate::repack::quantize_q8x`]: per block, the absolute maximum, the scale rounded to
/// f16, values rounded to nearest-even (the default MXCSR mode, as `nearest_int`) and kept
/// within -127..=127.
#[target_feature(enable = "avx2,f16c")]
fn quantize_q8x_impl(x: &[f32], y: &mut [crate::repack::BlockQ8x]) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
    for (x, b) in x.chunks_exact(32).zip(y.iter_mut()) {
        // SAFETY: a chunk is 32 floats; the block's `qs` is 32 bytes.
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
            );
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_movehdup_ps(m));
            let amax = _mm_cvtss_f32(m);
            let dh = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(amax / 127.0));
            let d = _mm_cvtss_f32(_mm_cvtph_ps(dh));
            let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let q: [__m256i; 4] = std::array::from_fn(|i| {
                let r = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
                _mm256_max_epi32(_mm256_min_epi32(r, hi), lo)
            });
            store_q8x(&q, d, b);
        }
    }
}

/// [`crate::repack::quantize_q8x_k`]: the same values, bit for bit.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_q8x_k_impl(x: &[f32], y: &mut [crate::repack::BlockQ8x]) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
    for (x, y) in x.chunks_exact(256).zip(y.chunks_exact_mut(8)) {
        // SAFETY: a chunk is 256 floats, read in 32 loads of eight; each block's `qs` is 32
        // bytes.
        unsafe {
            let ld = |i: usize| _mm256_loadu_ps(x.as_ptr().add(8 * i));
            let mut m = _mm256_setzero_ps();
            for i in 0..32 {
                m = _mm256_max_ps(m, _mm256_and_ps(ld(i), abs_mask));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
            // the first value of that magnitude sets the sign, as the reference's scan
            let am = _mm256_set1_ps(amax);
            let mut max = 0.0f32;
            for i in 0..32 {
                let eq = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(
                    _mm256_and_ps(ld(i), abs_mask),
                    am,
                ));
                if eq != 0 && amax > 0.0 {
                    max = x[8 * i + eq.trailing_zeros() as usize];
                    break;
                }
            }
            let iscale = if max == 0.0 { 0.0 } else { -127.0 / max };
            let d = if max == 0.0 { 0.0 } else { 1.0 / iscale };
            let is = _mm256_set1_ps(iscale);
            for (c, b) in y.iter_mut().enumerate() {
                let q: [__m256i; 4] = std::array::from_fn(|i| {
                    let r = _mm256_cvtps_epi32(_mm256_mul_ps(ld(4 * c + i), is));
                    _mm256_max_epi32(_mm256_min_epi32(r, hi), lo)
                });
                store_q8x(&q, d, b);
            }
        }
    }
}

pub(super) fn quantize_q8x_k(x: &[f32], y: &mut [crate::repack::BlockQ8x]) {
    // SAFETY: only placed in a kernel table after `Isa::Avx2.available()` confirmed AVX2, FMA
    // and F16C.
    unsafe { quantize_q8x_k_impl(x, y) }
}

pub(super) fn quantize_q8x(x: &[f32], y: &mut [crate::repack::BlockQ8x]) {
    // SAFETY: only placed in a kernel table after `Isa::Avx2.available()` confirmed AVX2, FMA
    // and F16C.
    unsafe { quantize_q8x_impl(x, y) }
}
