//! AVX-512 (F, BW, VL) kernels. 32-element formats take two blocks per 512-bit register;
//! K-quants take 64 values per register.

use std::arch::x86_64::*;

use half::f16;

use super::avx2::{bits_to_bytes, load32, load32u, mins_dot, nibbles_32, ActSum, MinSum};
use super::fp16;
use crate::blocks::*;

#[inline]
#[target_feature(enable = "avx512f")]
fn join(a: __m256i, b: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
}

/// 16 f32 lanes: `a` in the low eight, `b` in the high eight.
#[inline]
#[target_feature(enable = "avx512f")]
fn join_scale(a: f32, b: f32) -> __m512 {
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(a))),
        _mm256_castps_pd(_mm256_set1_ps(b)),
    ))
}

/// i16 lanes in four groups of eight: `s[0]` x8, `s[1]` x8, `s[2]` x8, `s[3]` x8.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn scales4(s: [i16; 4]) -> __m512i {
    let mut lanes = [0i16; 32];
    for (i, l) in lanes.iter_mut().enumerate() {
        *l = s[i / 8];
    }
    // SAFETY: reading 64 bytes from a 64-byte array.
    unsafe { _mm512_loadu_si512(lanes.as_ptr() as *const _) }
}

/// Unsigned x signed bytes -> 16 x i32 (sums of four products).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn mul_sum_us8(ux: __m512i, sy: __m512i) -> __m512i {
    _mm512_madd_epi16(_mm512_maddubs_epi16(ux, sy), _mm512_set1_epi16(1))
}

/// Signed x signed bytes -> 16 x i32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn mul_sum_i8(x: __m512i, y: __m512i) -> __m512i {
    let ax = _mm512_abs_epi8(x);
    let neg = _mm512_movepi8_mask(x);
    let sy = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
    mul_sum_us8(ax, sy)
}

macro_rules! pairs {
    ($name:ident, $W:ty, $A:ty, $scalar:path, |$a:ident| $q:expr, signed: $signed:expr, mins: $mins:expr) => {
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        fn $name(x: &[$W], y: &[$A]) -> f32 {
            let n = x.len().min(y.len());
            let mut acc = _mm512_setzero_ps();
            let mut summs = 0.0f32;
            let mut i = 0;
            while i + 2 <= n {
                let q0 = {
                    let $a = &x[i];
                    $q
                };
                let q1 = {
                    let $a = &x[i + 1];
                    $q
                };
                let qx = join(q0, q1);
                let qy = join(load32(&y[i].qs), load32(&y[i + 1].qs));
                let p = if $signed {
                    mul_sum_i8(qx, qy)
                } else {
                    mul_sum_us8(qx, qy)
                };
                let d = join_scale(
                    fp16(x[i].d) * fp16(y[i].d),
                    fp16(x[i + 1].d) * fp16(y[i + 1].d),
                );
                acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc);
                if $mins {
                    for k in i..i + 2 {
                        summs += fp16(x[k].min_term()) * fp16(y[k].sum_term());
                    }
                }
                i += 2;
            }
            let mut sum = _mm512_reduce_add_ps(acc) + summs;
            if i < n {
                sum += $scalar(&x[i..n], &y[i..n]);
            }
            sum
        }
    };
}

pairs!(dot_q8_0_impl, BlockQ8_0, BlockQ8_0, crate::quant::dot::vec_dot_q8_0_q8_0,
    |a| load32(&a.qs), signed: true, mins: false);
pairs!(dot_q4_0_impl, BlockQ4_0, BlockQ8_0, crate::quant::dot::vec_dot_q4_0_q8_0,
    |a| _mm256_sub_epi8(nibbles_32(&a.qs), _mm256_set1_epi8(8)), signed: true, mins: false);
pairs!(dot_q4_1_impl, BlockQ4_1, BlockQ8_1, crate::quant::dot::vec_dot_q4_1_q8_1,
    |a| nibbles_32(&a.qs), signed: false, mins: true);
pairs!(dot_q5_0_impl, BlockQ5_0, BlockQ8_0, crate::quant::dot::vec_dot_q5_0_q8_0,
    |a| _mm256_or_si256(nibbles_32(&a.qs), _mm256_andnot_si256(bits_to_bytes(u32::from_le_bytes(a.qh)), _mm256_set1_epi8(0xF0u8 as i8))),
    signed: true, mins: false);
pairs!(dot_q5_1_impl, BlockQ5_1, BlockQ8_1, crate::quant::dot::vec_dot_q5_1_q8_1,
    |a| _mm256_or_si256(nibbles_32(&a.qs), _mm256_and_si256(bits_to_bytes(u32::from_le_bytes(a.qh)), _mm256_set1_epi8(0x10))),
    signed: false, mins: true);

/// Q4_K/Q5_K core: `lo`/`hi` hold the 4- or 5-bit values of 64-byte chunk c (two 32-byte
/// quarters each), paired with the matching activations.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
fn kquant_chunk(lo: __m512i, hi: __m512i, y: &[i8; QK_K], c: usize, sc: &[u8; 8]) -> __m512i {
    let b = 128 * c;
    let ylo = join(load32(&y[b..]), load32(&y[b + 64..]));
    let yhi = join(load32(&y[b + 32..]), load32(&y[b + 96..]));
    let s = 4 * c;
    let plo = _mm512_madd_epi16(
        _mm512_maddubs_epi16(lo, ylo),
        scales4([
            sc[s] as i16,
            sc[s] as i16,
            sc[s + 2] as i16,
            sc[s + 2] as i16,
        ]),
    );
    let phi = _mm512_madd_epi16(
        _mm512_maddubs_epi16(hi, yhi),
        scales4([
            sc[s + 1] as i16,
            sc[s + 1] as i16,
            sc[s + 3] as i16,
            sc[s + 3] as i16,
        ]),
    );
    _mm512_add_epi32(plo, phi)
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn dot_q4k_impl(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut acc_m = 0.0f32;
    let low4 = _mm512_set1_epi8(0x0F);
    for (a, b) in x.iter().zip(y) {
        let (sc, m) = crate::quant::dequant::unpack_scales_k4(&a.scales);
        acc_m += b.d * fp16(a.dmin) * mins_dot(&m, &b.bsums) as f32;
        let mut sumi = _mm512_setzero_si512();
        for c in 0..2 {
            let q = join(load32u(&a.qs[64 * c..]), load32u(&a.qs[64 * c + 32..]));
            let lo = _mm512_and_si512(q, low4);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), low4);
            sumi = _mm512_add_epi32(sumi, kquant_chunk(lo, hi, &b.qs, c, &sc));
        }
        acc = _mm512_fmadd_ps(
            _mm512_set1_ps(b.d * fp16(a.d)),
            _mm512_cvtepi32_ps(sumi),
            acc,
        );
    }
    _mm512_reduce_add_ps(acc) - acc_m
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn dot_q5k_impl(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut acc_m = 0.0f32;
    let low4 = _mm512_set1_epi8(0x0F);
    let one = _mm512_set1_epi8(1);
    for (a, b) in x.iter().zip(y) {
        let (sc, m) = crate::quant::dequant::unpack_scales_k4(&a.scales);
        acc_m += b.d * fp16(a.dmin) * mins_dot(&m, &b.bsums) as f32;
        let qh = load32u(&a.qh);
        let qh2 = join(qh, qh);
        let mut sumi = _mm512_setzero_si512();
        for c in 0..2 {
            let q = join(load32u(&a.qs[64 * c..]), load32u(&a.qs[64 * c + 32..]));
            // quarter j = 2c uses qh bits 4c (low nibbles) and 4c+1 (high); j = 2c+1 bits 4c+2, 4c+3
            let sh_lo = join(
                _mm256_set1_epi16(4 * c as i16),
                _mm256_set1_epi16(4 * c as i16 + 2),
            );
            let sh_hi = _mm512_add_epi16(sh_lo, _mm512_set1_epi16(1));
            let hbit_lo =
                _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(qh2, sh_lo), one));
            let hbit_hi =
                _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(qh2, sh_hi), one));
            let lo = _mm512_or_si512(_mm512_and_si512(q, low4), hbit_lo);
            let hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(q), low4), hbit_hi);
            sumi = _mm512_add_epi32(sumi, kquant_chunk(lo, hi, &b.qs, c, &sc));
        }
        acc = _mm512_fmadd_ps(
            _mm512_set1_ps(b.d * fp16(a.d)),
            _mm512_cvtepi32_ps(sumi),
            acc,
        );
    }
    _mm512_reduce_add_ps(acc) - acc_m
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn dot_q6k_impl(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let low4 = _mm512_set1_epi8(0x0F);
    let three = _mm512_set1_epi8(3);
    let off = _mm512_set1_epi8(32);
    let sh_a = join(_mm256_set1_epi16(0), _mm256_set1_epi16(2));
    let sh_b = join(_mm256_set1_epi16(4), _mm256_set1_epi16(6));
    for (a, b) in x.iter().zip(y) {
        let mut sumi = _mm512_setzero_si512();
        for h in 0..2 {
            let l = join(load32u(&a.ql[64 * h..]), load32u(&a.ql[64 * h + 32..]));
            let qh = load32u(&a.qh[32 * h..]);
            let hh = join(qh, qh);
            // values 128h+0..63 and 128h+64..127, each in order
            let va = _mm512_or_si512(
                _mm512_and_si512(l, low4),
                _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(hh, sh_a), three)),
            );
            let vb = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(l), low4),
                _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(hh, sh_b), three)),
            );
            for (k, v) in [va, vb].into_iter().enumerate() {
                let base = 128 * h + 64 * k;
                // SAFETY: base + 64 <= 256 = qs.len().
                let yv = unsafe { _mm512_loadu_si512(b.qs.as_ptr().add(base) as *const _) };
                let p =
                    _mm512_sub_epi16(_mm512_maddubs_epi16(v, yv), _mm512_maddubs_epi16(off, yv));
                let g = base / 16;
                let s = [
                    a.scales[g] as i16,
                    a.scales[g + 1] as i16,
                    a.scales[g + 2] as i16,
                    a.scales[g + 3] as i16,
                ];
                sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p, scales4(s)));
            }
        }
        acc = _mm512_fmadd_ps(
            _mm512_set1_ps(b.d * fp16(a.d)),
            _mm512_cvtepi32_ps(sumi),
            acc,
        );
    }
    _mm512_reduce_add_ps(acc)
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
    while i + 16 <= n {
        // SAFETY: i + 16 <= n.
        let (vx, vy) = unsafe {
            (
                _mm512_loadu_ps(x.as_ptr().add(i)),
                _mm512_loadu_ps(y.as_ptr().add(i)),
            )
        };
        acc[0] = _mm512_fmadd_ps(vx, vy, acc[0]);
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    for j in i..n {
        sum += x[j] * y[j];
    }
    sum
}

#[target_feature(enable = "avx512f,f16c")]
fn dot_f16_impl(x: &[f16], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n; 16 f16 values are 256 bits.
        let (vx, vy) = unsafe {
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(x.as_ptr().add(i) as *const __m256i)),
                _mm512_loadu_ps(y.as_ptr().add(i)),
            )
        };
        acc = _mm512_fmadd_ps(vx, vy, acc);
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(acc);
    for j in i..n {
        sum += x[j].to_f32() * y[j];
    }
    sum
}

macro_rules! safe_wrapper {
    ($name:ident, $impl:ident, $w:ty, $a:ty) => {
        pub(super) fn $name(x: &[$w], y: &[$a]) -> f32 {
            // SAFETY: only placed in a kernel table after `Isa::Avx512.available()` (which
            // includes the AVX2, FMA and F16C features) returned true.
            unsafe { $impl(x, y) }
        }
    };
}

safe_wrapper!(dot_q8_0, dot_q8_0_impl, BlockQ8_0, BlockQ8_0);
safe_wrapper!(dot_q4_0, dot_q4_0_impl, BlockQ4_0, BlockQ8_0);
safe_wrapper!(dot_q4_1, dot_q4_1_impl, BlockQ4_1, BlockQ8_1);
safe_wrapper!(dot_q5_0, dot_q5_0_impl, BlockQ5_0, BlockQ8_0);
safe_wrapper!(dot_q5_1, dot_q5_1_impl, BlockQ5_1, BlockQ8_1);
safe_wrapper!(dot_q4k, dot_q4k_impl, BlockQ4K, BlockQ8K);
safe_wrapper!(dot_q5k, dot_q5k_impl, BlockQ5K, BlockQ8K);
safe_wrapper!(dot_q6k, dot_q6k_impl, BlockQ6K, BlockQ8K);
safe_wrapper!(dot_f32, dot_f32_impl, f32, f32);
safe_wrapper!(dot_f16, dot_f16_impl, f16, f32);

// ---- four activation rows per weight row -------------------------------------------

macro_rules! pairs4 {
    ($name:ident, $W:ty, $A:ty, $scalar:path, |$a:ident| $q:expr, signed: $signed:expr, mins: $mins:expr) => {
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        fn $name(x: &[$W], ys: [&[$A]; 4]) -> [f32; 4] {
            let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut summs = [0.0f32; 4];
            let mut i = 0;
            while i + 2 <= n {
                let q0 = {
                    let $a = &x[i];
                    $q
                };
                let q1 = {
                    let $a = &x[i + 1];
                    $q
                };
                let qx = join(q0, q1);
                let (dx0, dx1) = (fp16(x[i].d), fp16(x[i + 1].d));
                let (mx0, mx1) = (fp16(x[i].min_term()), fp16(x[i + 1].min_term()));
                for (t, y) in ys.iter().enumerate() {
                    let qy = join(load32(&y[i].qs), load32(&y[i + 1].qs));
                    let p = if $signed {
                        mul_sum_i8(qx, qy)
                    } else {
                        mul_sum_us8(qx, qy)
                    };
                    let d = join_scale(dx0 * fp16(y[i].d), dx1 * fp16(y[i + 1].d));
                    acc[t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc[t]);
                    if $mins {
                        summs[t] += mx0 * fp16(y[i].sum_term()) + mx1 * fp16(y[i + 1].sum_term());
                    }
                }
                i += 2;
            }
            std::array::from_fn(|t| {
                let mut s = _mm512_reduce_add_ps(acc[t]) + summs[t];
                if i < n {
                    s += $scalar(&x[i..n], &ys[t][i..n]);
                }
                s
            })
        }
    };
}

pairs4!(dot4_q8_0_impl, BlockQ8_0, BlockQ8_0, crate::quant::dot::vec_dot_q8_0_q8_0,
    |a| load32(&a.qs), signed: true, mins: false);
pairs4!(dot4_q4_1_impl, BlockQ4_1, BlockQ8_1, crate::quant::dot::vec_dot_q4_1_q8_1,
    |a| nibbles_32(&a.qs), signed: false, mins: true);
pairs4!(dot4_q5_0_impl, BlockQ5_0, BlockQ8_0, crate::quant::dot::vec_dot_q5_0_q8_0,
    |a| _mm256_or_si256(nibbles_32(&a.qs), _mm256_andnot_si256(bits_to_bytes(u32::from_le_bytes(a.qh)), _mm256_set1_epi8(0xF0u8 as i8))),
    signed: true, mins: false);

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn dot4_q4k_impl(x: &[BlockQ4K], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
    let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut acc_m = [0.0f32; 4];
    let low4 = _mm512_set1_epi8(0x0F);
    for i in 0..n {
        let a = &x[i];
        let (sc, m) = crate::quant::dequant::unpack_scales_k4(&a.scales);
        let (da, dmin) = (fp16(a.d), fp16(a.dmin));
        let mut lo = [_mm512_setzero_si512(); 2];
        let mut hi = [_mm512_setzero_si512(); 2];
        let mut slo = [_mm512_setzero_si512(); 2];
        let mut shi = [_mm512_setzero_si512(); 2];
        for c in 0..2 {
            let q = join(load32u(&a.qs[64 * c..]), load32u(&a.qs[64 * c + 32..]));
            lo[c] = _mm512_and_si512(q, low4);
            hi[c] = _mm512_and_si512(_mm512_srli_epi16::<4>(q), low4);
            let s = 4 * c;
            slo[c] = scales4([
                sc[s] as i16,
                sc[s] as i16,
                sc[s + 2] as i16,
                sc[s + 2] as i16,
            ]);
            shi[c] = scales4([
                sc[s + 1] as i16,
                sc[s + 1] as i16,
                sc[s + 3] as i16,
                sc[s + 3] as i16,
            ]);
        }
        for (t, y) in ys.iter().enumerate() {
            let b = &y[i];
            acc_m[t] += b.d * dmin * mins_dot(&m, &b.bsums) as f32;
            let mut sumi = _mm512_setzero_si512();
            for c in 0..2 {
                let o = 128 * c;
                let ylo = join(load32(&b.qs[o..]), load32(&b.qs[o + 64..]));
                let yhi = join(load32(&b.qs[o + 32..]), load32(&b.qs[o + 96..]));
                let plo = _mm512_madd_epi16(_mm512_maddubs_epi16(lo[c], ylo), slo[c]);
                let phi = _mm512_madd_epi16(_mm512_maddubs_epi16(hi[c], yhi), shi[c]);
                sumi = _mm512_add_epi32(sumi, _mm512_add_epi32(plo, phi));
            }
            acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(b.d * da), _mm512_cvtepi32_ps(sumi), acc[t]);
        }
    }
    std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]) - acc_m[t])
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn dot4_q6k_impl(x: &[BlockQ6K], ys: [&[BlockQ8K]; 4]) -> [f32; 4] {
    let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
    let mut acc = [_mm512_setzero_ps(); 4];
    let low4 = _mm512_set1_epi8(0x0F);
    let three = _mm512_set1_epi8(3);
    let off = _mm512_set1_epi8(32);
    let sh_a = join(_mm256_set1_epi16(0), _mm256_set1_epi16(2));
    let sh_b = join(_mm256_set1_epi16(4), _mm256_set1_epi16(6));
    for i in 0..n {
        let a = &x[i];
        let da = fp16(a.d);
        // the four 64-value chunks of the block and their scale vectors
        let mut v = [_mm512_setzero_si512(); 4];
        let mut sv = [_mm512_setzero_si512(); 4];
        for h in 0..2 {
            let l = join(load32u(&a.ql[64 * h..]), load32u(&a.ql[64 * h + 32..]));
            let qh = load32u(&a.qh[32 * h..]);
            let hh = join(qh, qh);
            v[2 * h] = _mm512_or_si512(
                _mm512_and_si512(l, low4),
                _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(hh, sh_a), three)),
            );
            v[2 * h + 1] = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(l), low4),
                _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(hh, sh_b), three)),
            );
        }
        for (k, s) in sv.iter_mut().enumerate() {
            let g = 4 * k;
            *s = scales4([
                a.scales[g] as i16,
                a.scales[g + 1] as i16,
                a.scales[g + 2] as i16,
                a.scales[g + 3] as i16,
            ]);
        }
        for (t, y) in ys.iter().enumerate() {
            let b = &y[i];
            let mut sumi = _mm512_setzero_si512();
            for k in 0..4 {
                // SAFETY: 64k + 64 <= 256 = qs.len().
                let yv = unsafe { _mm512_loadu_si512(b.qs.as_ptr().add(64 * k) as *const _) };
                let p = _mm512_sub_epi16(
                    _mm512_maddubs_epi16(v[k], yv),
                    _mm512_maddubs_epi16(off, yv),
                );
                sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p, sv[k]));
            }
            acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(b.d * da), _mm512_cvtepi32_ps(sumi), acc[t]);
        }
    }
    std::array::from_fn(|t| _mm512_reduce_add_ps(acc[t]))
}

macro_rules! safe_wrapper4 {
    ($name:ident, $impl:ident, $w:ty, $a:ty) => {
        pub(super) fn $name(x: &[$w], ys: [&[$a]; 4]) -> [f32; 4] {
            // SAFETY: only placed in a kernel table after `Isa::Avx512.available()` (which
            // includes the AVX2, FMA and F16C features) returned true.
            unsafe { $impl(x, ys) }
        }
    };
}

safe_wrapper4!(dot4_q8_0, dot4_q8_0_impl, BlockQ8_0, BlockQ8_0);
safe_wrapper4!(dot4_q4_1, dot4_q4_1_impl, BlockQ4_1, BlockQ8_1);
safe_wrapper4!(dot4_q5_0, dot4_q5_0_impl, BlockQ5_0, BlockQ8_0);
safe_wrapper4!(dot4_q4k, dot4_q4k_impl, BlockQ4K, BlockQ8K);
safe_wrapper4!(dot4_q6k, dot4_q6k_impl, BlockQ6K, BlockQ8K);

// ---- repacked (row-interleaved) weights, AVX-512 VNNI ----------------------------------

use crate::repack::{
    kind_of, usable_blocks, BlockQ8x, R16Kind, KIND_Q4, KIND_Q4K, KIND_Q5, KIND_Q6K, KIND_Q8,
    R16_ROWS, R16_TOKENS,
};

/// The eight 64-byte value vectors (u8) of one repacked block (`body`: its packed values):
/// vector `k` holds values `4k..4k+4` of each of the sixteen rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn r16_values<const KIND: u8>(body: &[u8]) -> [__m512i; 8] {
    assert!(body.len() >= kind_of(KIND).body_bytes());
    // SAFETY: the body holds the kind's value bytes (asserted); every load stays inside.
    unsafe {
        let ld = |o: usize| _mm512_loadu_si512(body.as_ptr().add(o) as *const _);
        if KIND == KIND_Q8 {
            return std::array::from_fn(|k| ld(64 * k));
        }
        let low4 = _mm512_set1_epi8(0x0F);
        let p = [ld(0), ld(64), ld(128), ld(192)];
        let mut v: [__m512i; 8] = std::array::from_fn(|k| {
            if k < 4 {
                _mm512_and_si512(p[k], low4)
            } else {
                _mm512_and_si512(_mm512_srli_epi16::<4>(p[k - 4]), low4)
            }
        });
        if KIND == KIND_Q5 {
            let bit4 = _mm512_set1_epi8(0x10);
            for (k, vk) in v.iter_mut().enumerate() {
                let m = (body.as_ptr().add(256 + 8 * k) as *const u64).read_unaligned();
                *vk = _mm512_or_si512(*vk, _mm512_maskz_mov_epi8(m, bit4));
            }
        } else if KIND == KIND_Q6K {
            let three = _mm512_set1_epi8(3);
            let h = [ld(256), ld(320)];
            for (k, vk) in v.iter_mut().enumerate() {
                let hk = match k / 2 {
                    0 => h[k % 2],
                    1 => _mm512_srli_epi16::<2>(h[k % 2]),
                    2 => _mm512_srli_epi16::<4>(h[k % 2]),
                    _ => _mm512_srli_epi16::<6>(h[k % 2]),
                };
                let hk = _mm512_slli_epi16::<4>(_mm512_and_si512(hk, three));
                *vk = _mm512_or_si512(*vk, hk);
            }
        }
        v
    }
}

/// Sixteen f16 at `p` as f32.
///
/// # Safety
/// `p` points to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn f16x16(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 32 bytes.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
}

/// Sixteen bytes at `p` as f32, unsigned or signed.
///
/// # Safety
/// `p` points to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn bytes16<const SIGNED: bool>(p: *const u8) -> __m512 {
    // SAFETY: the caller guarantees 16 bytes.
    let b = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm512_cvtepi32_ps(if SIGNED {
        _mm512_cvtepi8_epi32(b)
    } else {
        _mm512_cvtepu8_epi32(b)
    })
}

/// `N` activation rows against one group of kind `KIND` (constants keep the accumulators
/// in registers and the per-kind branches out of the loops).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn gemm_r16_n<const N: usize, const KIND: u8>(
    group: &[u8],
    nb: usize,
    acts: &[&[BlockQ8x]; R16_TOKENS],
) -> [__m512; N] {
    let kind = kind_of(KIND);
    let (ub, hb, bb, bpu) = kind.layout();
    let mut facc = [_mm512_setzero_ps(); N];
    for u in 0..nb / bpu {
        let unit = &group[u * ub..(u + 1) * ub];
        let hp = unit.as_ptr();
        // SAFETY: every header read below is inside the kind's header (`hb` bytes; Q8's
        // offset is -128 d, not stored).
        let (d, d2) = unsafe {
            let d = f16x16(hp);
            let d2 = if KIND == KIND_Q8 {
                _mm512_mul_ps(d, _mm512_set1_ps(-128.0))
            } else {
                f16x16(hp.add(32))
            };
            (d, d2)
        };
        for j in 0..bpu {
            let b = u * bpu + j;
            let v = r16_values::<KIND>(&unit[hb + j * bb..hb + (j + 1) * bb]);
            if PF_DIST > 0 {
                let base = unit.as_ptr().wrapping_add(hb + j * bb + PF_DIST);
                for off in (0..bb).step_by(64) {
                    // a prefetch is a hint: it never faults, even past the end
                    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(off) as *const i8);
                }
            }
            // per-row scales of this block: (da, db) for the two 16-value halves, and the
            // offset c (times the activation sum); Q6_K's offset is taken off in integers
            // SAFETY: header reads inside `hb`.
            let (da, db, c) = unsafe {
                match KIND {
                    KIND_Q4K => {
                        let sc = _mm512_mul_ps(d, bytes16::<false>(hp.add(64 + 16 * j)));
                        let m = _mm512_mul_ps(d2, bytes16::<false>(hp.add(192 + 16 * j)));
                        (sc, sc, _mm512_sub_ps(_mm512_setzero_ps(), m))
                    }
                    KIND_Q6K => {
                        let sa = _mm512_mul_ps(d, bytes16::<true>(hp.add(32 + 32 * j)));
                        let sb = _mm512_mul_ps(d, bytes16::<true>(hp.add(48 + 32 * j)));
                        (sa, sb, _mm512_setzero_ps())
                    }
                    _ => (d, d, d2),
                }
            };
            for (t, acc) in facc.iter_mut().enumerate() {
                let a = &acts[t][b];
                let q = |k: usize| {
                    _mm512_set1_epi32(i32::from_le_bytes([
                        a.qs[4 * k] as u8,
                        a.qs[4 * k + 1] as u8,
                        a.qs[4 * k + 2] as u8,
                        a.qs[4 * k + 3] as u8,
                    ]))
                };
                // two chains of four (values 0..16 and 16..32), so consecutive instructions
                // do not wait on each other
                let mut i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[0], q(0));
                let mut i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v[4], q(4));
                for k in 1..4 {
                    i0 = _mm512_dpbusd_epi32(i0, v[k], q(k));
                    i1 = _mm512_dpbusd_epi32(i1, v[k + 4], q(k + 4));
                }
                let ad = _mm512_set1_ps(a.d);
                *acc = if KIND == KIND_Q6K {
                    // values are q + 32: take 32 * sum(a) off each half, exactly
                    let i0 = _mm512_sub_epi32(i0, _mm512_set1_epi32(32 * a.sums[0] as i32));
                    let i1 = _mm512_sub_epi32(i1, _mm512_set1_epi32(32 * a.sums[1] as i32));
                    let h = _mm512_mul_ps(_mm512_cvtepi32_ps(i1), db);
                    let both = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), da, h);
                    _mm512_fmadd_ps(both, ad, *acc)
                } else {
                    let f = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)),
                        _mm512_mul_ps(da, ad),
                        *acc,
                    );
                    _mm512_fmadd_ps(c, _mm512_set1_ps(a.s), f)
                };
            }
        }
    }
    facc
}

/// Bytes ahead of the block in use that the kernel asks the cache for.
const PF_DIST: usize = 2048;

/// All token counts of one kind.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn gemm_r16_kind<const KIND: u8>(
    group: &[u8],
    nb: usize,
    acts: &[&[BlockQ8x]; R16_TOKENS],
    n_act: usize,
    out: &mut [[f32; R16_ROWS]; R16_TOKENS],
) {
    let mut put = |accs: &[__m512]| {
        for (o, acc) in out.iter_mut().zip(accs) {
            // SAFETY: storing sixteen f32 into an array of sixteen.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *acc) };
        }
    };
    match n_act {
        8 => put(&gemm_r16_n::<8, KIND>(group, nb, acts)),
        7 => put(&gemm_r16_n::<7, KIND>(group, nb, acts)),
        6 => put(&gemm_r16_n::<6, KIND>(group, nb, acts)),
        5 => put(&gemm_r16_n::<5, KIND>(group, nb, acts)),
        4 => put(&gemm_r16_n::<4, KIND>(group, nb, acts)),
        3 => put(&gemm_r16_n::<3, KIND>(group, nb, acts)),
        2 => put(&gemm_r16_n::<2, KIND>(group, nb, acts)),
        1 => put(&gemm_r16_n::<1, KIND>(group, nb, acts)),
        _ => {}
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn gemm_r16_impl(
    kind: R16Kind,
    group: &[u8],
    nb: usize,
    acts: [&[BlockQ8x]; R16_TOKENS],
    n_act: usize,
) -> [[f32; R16_ROWS]; R16_TOKENS] {
    let n_act = n_act.min(R16_TOKENS);
    let nb = usable_blocks(kind, group, nb, &acts[..n_act]);
    let mut out = [[0.0f32; R16_ROWS]; R16_TOKENS];
    match kind {
        R16Kind::Q4 => gemm_r16_kind::<KIND_Q4>(group, nb, &acts, n_act, &mut out),
        R16Kind::Q5 => gemm_r16_kind::<KIND_Q5>(group, nb, &acts, n_act, &mut out),
        R16Kind::Q8 => gemm_r16_kind::<KIND_Q8>(group, nb, &acts, n_act, &mut out),
        R16Kind::Q4K => gemm_r16_kind::<KIND_Q4K>(group, nb, &acts, n_act, &mut out),
        R16Kind::Q6K => gemm_r16_kind::<KIND_Q6K>(group, nb, &acts, n_act, &mut out),
        // no 512-bit ternary kernel yet: the AVX2 one (this CPU has AVX2)
        R16Kind::T2 => return super::r16::gemm_r16_avx2(kind, group, nb, acts, n_act),
    }
    out
}

/// [`crate::repack::quantize_q8x`]: per block, the absolute maximum, the scale rounded to
/// f16, values rounded to nearest-even (the default MXCSR mode, as `nearest_int`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn quantize_q8x_impl(x: &[f32], y: &mut [BlockQ8x]) {
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    for (x, b) in x.chunks_exact(32).zip(y.iter_mut()) {
        // SAFETY: a chunk is 32 floats; the block's `qs` is 32 bytes.
        unsafe {
            let v0 = _mm512_loadu_ps(x.as_ptr());
            let v1 = _mm512_loadu_ps(x.as_ptr().add(16));
            let a = _mm512_max_ps(
                _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v0), abs_mask)),
                _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v1), abs_mask)),
            );
            let amax = _mm512_reduce_max_ps(a);
            let dh = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(amax / 127.0));
            let d = _mm_cvtss_f32(_mm_cvtph_ps(dh));
            let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            // within -127..=127, as the reference keeps them
            let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
            let clamp = |q: __m512i| _mm512_max_epi32(_mm512_min_epi32(q, hi), lo);
            let q0 = clamp(_mm512_cvtps_epi32(_mm512_mul_ps(v0, id)));
            let q1 = clamp(_mm512_cvtps_epi32(_mm512_mul_ps(v1, id)));
            _mm_storeu_si128(b.qs.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128(
                b.qs.as_mut_ptr().add(16) as *mut __m128i,
                _mm512_cvtepi32_epi8(q1),
            );
            let (lo, hi) = (_mm512_reduce_add_epi32(q0), _mm512_reduce_add_epi32(q1));
            b.d = d;
            b.s = d * (lo + hi) as f32;
            b.sums = [lo as i16, hi as i16];
        }
    }
}

pub(super) fn quantize_q8x(x: &[f32], y: &mut [BlockQ8x]) {
    // SAFETY: only placed in a kernel table after `Isa::Avx512.available()` returned true.
    unsafe { quantize_q8x_impl(x, y) }
}

pub(super) fn gemm_r16(
    kind: R16Kind,
    group: &[u8],
    nb: usize,
    acts: [&[BlockQ8x]; R16_TOKENS],
    n_act: usize,
) -> [[f32; R16_ROWS]; R16_TOKENS] {
    // SAFETY: only placed in a kernel table after AVX-512 (F, BW, VL) with the AVX2 features
    // and AVX512-VNNI were detected.
    unsafe { gemm_r16_impl(kind, group, nb, acts, n_act) }
}
