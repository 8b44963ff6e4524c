//! Quantized dot products and activation quantizers for NEON.
//!
//! Every dot product is written once, generic over how sixteen signed byte products are
//! summed into four 32-bit lanes ([`Dot`]): `smull` + `sadalp` on plain NEON, one `sdot` with
//! the dot-product extension. Weight values are brought to signed bytes first (every format's
//! values fit: nibbles, 5- and 6-bit values, Q8's bytes), each block's (sub-block's) integer
//! sum is scaled once, as in the scalar reference ([`crate::quant::dot`]).

use std::arch::aarch64::*;

use half::f16;

use super::{bits16, fp16, sdot};
use crate::blocks::*;
use crate::quant::dequant::unpack_scales_k4;
use crate::repack::BlockQ8x;

/// Sums of sixteen signed byte products into four i32 lanes (which lane gets which product
/// differs between implementations; callers only use whole-vector sums or lane-wise
/// scaling by one factor).
trait Dot {
    /// # Safety
    /// The CPU has what the implementation needs.
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
}

/// Plain NEON: widening multiplies, pairwise accumulate.
struct Widen;
/// FEAT_DotProd's `sdot`.
struct SDot;

impl Dot for Widen {
    #[inline(always)]
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }
}

impl Dot for SDot {
    #[inline(always)]
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: the caller's CPU has dotprod (this type is only used in such functions).
        unsafe { sdot(acc, a, b) }
    }
}

/// The integer dot of 32 signed values (`lo`: values 0..16, `hi`: 16..32) with `y[..32]`.
///
/// # Safety
/// As `D::dot`; `y` points to 32 readable bytes.
#[inline(always)]
unsafe fn dot32<D: Dot>(lo: int8x16_t, hi: int8x16_t, y: *const i8) -> int32x4_t {
    // SAFETY: the caller guarantees 32 bytes at `y`.
    unsafe {
        let i = D::dot(vdupq_n_s32(0), lo, vld1q_s8(y));
        D::dot(i, hi, vld1q_s8(y.add(16)))
    }
}

/// Low and high nibbles of 16 packed bytes: values 0..16 and 16..32.
///
/// # Safety
/// `p` points to 16 readable bytes.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: the caller guarantees 16 bytes.
    let q = unsafe { vld1q_u8(p) };
    (vandq_u8(q, vdupq_n_u8(0xF)), vshrq_n_u8::<4>(q))
}

#[inline]
#[target_feature(enable = "neon")]
fn s8(v: uint8x16_t) -> int8x16_t {
    vreinterpretq_s8_u8(v)
}

// ---- 32-value formats ---------------------------------------------------------------

/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn q4_0<D: Dot>(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let mut sum = vdupq_n_f32(0.0);
    for (a, b) in x.iter().zip(y) {
        // SAFETY: 16 packed bytes, 32 activation bytes.
        let i = unsafe {
            let (lo, hi) = nibbles(a.qs.as_ptr());
            let eight = vdupq_n_s8(8);
            dot32::<D>(
                vsubq_s8(s8(lo), eight),
                vsubq_s8(s8(hi), eight),
                b.qs.as_ptr(),
            )
        };
        sum = vfmaq_n_f32(sum, vcvtq_f32_s32(i), fp16(a.d) * fp16(b.d));
    }
    vaddvq_f32(sum)
}

/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn q4_1<D: Dot>(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    let mut sum = vdupq_n_f32(0.0);
    let mut mins = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        // SAFETY: 16 packed bytes, 32 activation bytes.
        let i = unsafe {
            let (lo, hi) = nibbles(a.qs.as_ptr());
            dot32::<D>(s8(lo), s8(hi), b.qs.as_ptr())
        };
        sum = vfmaq_n_f32(sum, vcvtq_f32_s32(i), fp16(a.d) * fp16(b.d));
        mins += fp16(a.m) * fp16(b.s);
    }
    vaddvq_f32(sum) + mins
}

/// The 5-bit values of a Q5 block: values 0..16 and 16..32.
///
/// # Safety
/// `qs` points to 16 readable bytes.
#[inline(always)]
unsafe fn q5_values(qh: &[u8; 4], qs: *const u8) -> (uint8x16_t, uint8x16_t) {
    let h = u32::from_le_bytes(*qh);
    // SAFETY: the caller guarantees 16 bytes.
    let (lo, hi) = unsafe { nibbles(qs) };
    (
        vorrq_u8(lo, bits16(h, 0x10)),
        vorrq_u8(hi, bits16(h >> 16, 0x10)),
    )
}

/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn q5_0<D: Dot>(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    let mut sum = vdupq_n_f32(0.0);
    for (a, b) in x.iter().zip(y) {
        // SAFETY: 16 packed bytes, 32 activation bytes.
        let i = unsafe {
            let (lo, hi) = q5_values(&a.qh, a.qs.as_ptr());
            let sixteen = vdupq_n_s8(16);
            dot32::<D>(
                vsubq_s8(s8(lo), sixteen),
                vsubq_s8(s8(hi), sixteen),
                b.qs.as_ptr(),
            )
        };
        sum = vfmaq_n_f32(sum, vcvtq_f32_s32(i), fp16(a.d) * fp16(b.d));
    }
    vaddvq_f32(sum)
}

/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn q5_1<D: Dot>(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
    let mut sum = vdupq_n_f32(0.0);
    let mut mins = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        // SAFETY: 16 packed bytes, 32 activation bytes.
        let i = unsafe {
            let (lo, hi) = q5_values(&a.qh, a.qs.as_ptr());
            dot32::<D>(s8(lo), s8(hi), b.qs.as_ptr())
        };
        sum = vfmaq_n_f32(sum, vcvtq_f32_s32(i), fp16(a.d) * fp16(b.d));
        mins += fp16(a.m) * fp16(b.s);
    }
    vaddvq_f32(sum) + mins
}

/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn q8_0<D: Dot>(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let mut sum = vdupq_n_f32(0.0);
    for (a, b) in x.iter().zip(y) {
        // SAFETY: 32 bytes in each block.
        let i = unsafe {
            let p = a.qs.as_ptr();
            dot32::<D>(vld1q_s8(p), vld1q_s8(p.add(16)), b.qs.as_ptr())
        };
        sum = vfmaq_n_f32(sum, vcvtq_f32_s32(i), fp16(a.d) * fp16(b.d));
    }
    vaddvq_f32(sum)
}

// ---- K-quants -------------------------------------------------------------------------

/// `sum(m[s] * (bsums[2s] + bsums[2s+1]))`: the activation sums under Q4_K/Q5_K's mins.
fn mins_dot(m: &[u8; 8], bsums: &[i16; 16]) -> i32 {
    (0..8)
        .map(|s| m[s] as i32 * (bsums[2 * s] as i32 + bsums[2 * s + 1] as i32))
        .sum()
}

/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn q2k<D: Dot>(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let mut isum = vdupq_n_s32(0);
        for h in 0..2 {
            // SAFETY: 32 packed bytes at 32h; 32 activation bytes at 128h + 32j.
            unsafe {
                let q0 = vld1q_u8(a.qs.as_ptr().add(32 * h));
                let q1 = vld1q_u8(a.qs.as_ptr().add(32 * h + 16));
                for j in 0..4 {
                    let sh = vdupq_n_s8(-2 * j as i8);
                    let v0 = vandq_u8(vshlq_u8(q0, sh), vdupq_n_u8(3));
                    let v1 = vandq_u8(vshlq_u8(q1, sh), vdupq_n_u8(3));
                    let yp = b.qs.as_ptr().add(128 * h + 32 * j);
                    let g = 8 * h + 2 * j;
                    let p0 = D::dot(vdupq_n_s32(0), s8(v0), vld1q_s8(yp));
                    let p1 = D::dot(vdupq_n_s32(0), s8(v1), vld1q_s8(yp.add(16)));
                    isum = vmlaq_n_s32(isum, p0, (a.scales[g] & 0xF) as i32);
                    isum = vmlaq_n_s32(isum, p1, (a.scales[g + 1] & 0xF) as i32);
                }
            }
        }
        let summs: i32 = (0..16)
            .map(|g| (a.scales[g] >> 4) as i32 * b.bsums[g] as i32)
            .sum();
        sum += b.d * fp16(a.d) * vaddvq_s32(isum) as f32 - b.d * fp16(a.dmin) * summs as f32;
    }
    sum
}

/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn q3k<D: Dot>(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let sc = q3k_scales(&a.scales);
        let mut isum = vdupq_n_s32(0);
        // SAFETY: the 32-byte hmask, 32 packed bytes at 32h, 32 activation bytes at
        // 128h + 32j.
        unsafe {
            let hm0 = vld1q_u8(a.hmask.as_ptr());
            let hm1 = vld1q_u8(a.hmask.as_ptr().add(16));
            for h in 0..2 {
                let q0 = vld1q_u8(a.qs.as_ptr().add(32 * h));
                let q1 = vld1q_u8(a.qs.as_ptr().add(32 * h + 16));
                for j in 0..4 {
                    let sh = vdupq_n_s8(-2 * j as i8);
                    let bit = vdupq_n_u8(1 << (4 * h + j));
                    let four = vdupq_n_u8(4);
                    // value = low two bits - (4 where the hmask bit is clear)
                    let v0 = vsubq_s8(
                        s8(vandq_u8(vshlq_u8(q0, sh), vdupq_n_u8(3))),
                        s8(vbicq_u8(four, vtstq_u8(hm0, bit))),
                    );
                    let v1 = vsubq_s8(
                        s8(vandq_u8(vshlq_u8(q1, sh), vdupq_n_u8(3))),
                        s8(vbicq_u8(four, vtstq_u8(hm1, bit))),
                    );
                    let yp = b.qs.as_ptr().add(128 * h + 32 * j);
                    let g = 8 * h + 2 * j;
                    let p0 = D::dot(vdupq_n_s32(0), v0, vld1q_s8(yp));
                    let p1 = D::dot(vdupq_n_s32(0), v1, vld1q_s8(yp.add(16)));
                    isum = vmlaq_n_s32(isum, p0, sc[g] as i32);
                    isum = vmlaq_n_s32(isum, p1, sc[g + 1] as i32);
                }
            }
        }
        sum += b.d * fp16(a.d) * vaddvq_s32(isum) as f32;
    }
    sum
}

/// Q4_K and Q5_K (with `qh`, the fifth bits): sub-blocks of 32 unsigned values, 6-bit
/// scales and mins.
///
/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn q45k<D: Dot>(
    d: f16,
    dmin: f16,
    scales: &[u8; K_SCALE_SIZE],
    qs: &[u8; QK_K / 2],
    qh: Option<&[u8; QK_K / 8]>,
    b: &BlockQ8K,
) -> f32 {
    let (sc, m) = unpack_scales_k4(scales);
    let mut isum = vdupq_n_s32(0);
    // SAFETY: 32 packed bytes at 32j, the 32-byte qh, 64 activation bytes at 64j.
    unsafe {
        let h = qh.map(|h| (vld1q_u8(h.as_ptr()), vld1q_u8(h.as_ptr().add(16))));
        for j in 0..4 {
            let (mut lo0, mut hi0) = nibbles(qs.as_ptr().add(32 * j));
            let (mut lo1, mut hi1) = nibbles(qs.as_ptr().add(32 * j + 16));
            if let Some((h0, h1)) = h {
                let (bl, bh) = (vdupq_n_u8(1 << (2 * j)), vdupq_n_u8(2 << (2 * j)));
                let ten = vdupq_n_u8(0x10);
                lo0 = vorrq_u8(lo0, vandq_u8(vtstq_u8(h0, bl), ten));
                lo1 = vorrq_u8(lo1, vandq_u8(vtstq_u8(h1, bl), ten));
                hi0 = vorrq_u8(hi0, vandq_u8(vtstq_u8(h0, bh), ten));
                hi1 = vorrq_u8(hi1, vandq_u8(vtstq_u8(h1, bh), ten));
            }
            let yp = b.qs.as_ptr().add(64 * j);
            let p_lo = dot32::<D>(s8(lo0), s8(lo1), yp);
            let p_hi = dot32::<D>(s8(hi0), s8(hi1), yp.add(32));
            isum = vmlaq_n_s32(isum, p_lo, sc[2 * j] as i32);
            isum = vmlaq_n_s32(isum, p_hi, sc[2 * j + 1] as i32);
        }
    }
    let summ = mins_dot(&m, &b.bsums);
    b.d * fp16(d) * vaddvq_s32(isum) as f32 - b.d * fp16(dmin) * summ as f32
}

/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn q4k<D: Dot>(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    x.iter()
        .zip(y)
        // SAFETY: as this function's.
        .map(|(a, b)| unsafe { q45k::<D>(a.d, a.dmin, &a.scales, &a.qs, None, b) })
        .sum()
}

/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn q5k<D: Dot>(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    x.iter()
        .zip(y)
        // SAFETY: as this function's.
        .map(|(a, b)| unsafe { q45k::<D>(a.d, a.dmin, &a.scales, &a.qs, Some(&a.qh), b) })
        .sum()
}

/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn q6k<D: Dot>(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let mut isum = vdupq_n_s32(0);
        // SAFETY: 64 bytes of ql at 64h, 32 of qh at 32h, 128 activation bytes at 128h.
        unsafe {
            for h in 0..2 {
                let ql = a.ql.as_ptr().add(64 * h);
                let qh = a.qh.as_ptr().add(32 * h);
                let l: [uint8x16_t; 4] = std::array::from_fn(|i| vld1q_u8(ql.add(16 * i)));
                let hb = [vld1q_u8(qh), vld1q_u8(qh.add(16))];
                let m4 = vdupq_n_u8(0xF);
                let m3 = vdupq_n_u8(3);
                // the eight groups of sixteen values of this half, in order
                let low = [
                    vandq_u8(l[0], m4),
                    vandq_u8(l[1], m4),
                    vandq_u8(l[2], m4),
                    vandq_u8(l[3], m4),
                    vshrq_n_u8::<4>(l[0]),
                    vshrq_n_u8::<4>(l[1]),
                    vshrq_n_u8::<4>(l[2]),
                    vshrq_n_u8::<4>(l[3]),
                ];
                for (i, &lv) in low.iter().enumerate() {
                    let sh = vdupq_n_s8(-2 * (i / 2) as i8);
                    let high = vandq_u8(vshlq_u8(hb[i % 2], sh), m3);
                    let v = vsubq_s8(s8(vorrq_u8(lv, vshlq_n_u8::<4>(high))), vdupq_n_s8(32));
                    let g = 8 * h + i;
                    let p = D::dot(vdupq_n_s32(0), v, vld1q_s8(b.qs.as_ptr().add(16 * g)));
                    isum = vmlaq_n_s32(isum, p, a.scales[g] as i32);
                }
            }
        }
        sum += b.d * fp16(a.d) * vaddvq_s32(isum) as f32;
    }
    sum
}

// ---- activation quantizers ------------------------------------------------------------

/// The absolute maximum of 32 floats.
///
/// # Safety
/// `x` points to 32 readable floats.
#[inline(always)]
unsafe fn amax32(x: *const f32) -> f32 {
    // SAFETY: the caller guarantees 32 floats.
    unsafe {
        let mut m = vabsq_f32(vld1q_f32(x));
        for i in 1..8 {
            m = vmaxq_f32(m, vabsq_f32(vld1q_f32(x.add(4 * i))));
        }
        vmaxvq_f32(m)
    }
}

/// `round(x[i] * id)` (to nearest, ties to even, as `nearest_int`) for 32 values into `q`;
/// returns the sums of the first and second sixteen.
///
/// # Safety
/// `x` points to 32 readable floats, `q` to 32 writable bytes.
#[inline(always)]
unsafe fn round32(x: *const f32, id: f32, q: *mut i8) -> [i32; 2] {
    let mut sums = [0i32; 2];
    // SAFETY: the caller guarantees 32 floats and 32 bytes.
    unsafe {
        for (half, s) in sums.iter_mut().enumerate() {
            let v: [int32x4_t; 4] = std::array::from_fn(|i| {
                vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x.add(16 * half + 4 * i)), id))
            });
            let w0 = vcombine_s16(vqmovn_s32(v[0]), vqmovn_s32(v[1]));
            let w1 = vcombine_s16(vqmovn_s32(v[2]), vqmovn_s32(v[3]));
            vst1q_s8(
                q.add(16 * half),
                vcombine_s8(vqmovn_s16(w0), vqmovn_s16(w1)),
            );
            *s = vaddvq_s32(vaddq_s32(vaddq_s32(v[0], v[1]), vaddq_s32(v[2], v[3])));
        }
    }
    sums
}

pub(super) fn quantize_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    for (x, b) in x.chunks_exact(QK8_0).zip(y.iter_mut()) {
        // SAFETY: a chunk is 32 floats; `qs` is 32 bytes.
        unsafe {
            let d = amax32(x.as_ptr()) / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b.d = f16::from_f32(d);
            round32(x.as_ptr(), id, b.qs.as_mut_ptr());
        }
    }
}

pub(super) fn quantize_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    for (x, b) in x.chunks_exact(QK8_0).zip(y.iter_mut()) {
        // SAFETY: a chunk is 32 floats; `qs` is 32 bytes.
        unsafe {
            let d = amax32(x.as_ptr()) / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let [s0, s1] = round32(x.as_ptr(), id, b.qs.as_mut_ptr());
            b.d = f16::from_f32(d);
            b.s = f16::from_f32((s0 + s1) as f32 * d);
        }
    }
}

pub(super) fn quantize_q8x(x: &[f32], y: &mut [BlockQ8x]) {
    for (x, b) in x.chunks_exact(32).zip(y.iter_mut()) {
        // SAFETY: a chunk is 32 floats; `qs` is 32 bytes.
        unsafe {
            let d = f16::from_f32(amax32(x.as_ptr()) / 127.0).to_f32();
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let [s0, s1] = round32(x.as_ptr(), id, b.qs.as_mut_ptr());
            b.d = d;
            b.s = d * (s0 + s1) as f32;
            b.sums = [s0 as i16, s1 as i16];
        }
    }
}

pub(super) fn quantize_q8k(x: &[f32], y: &mut [BlockQ8K]) {
    for (x, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        // SAFETY: a chunk is QK_K floats, `qs` QK_K bytes.
        let amax =
            unsafe { (0..QK_K / 32).fold(0.0f32, |m, i| m.max(amax32(x.as_ptr().add(32 * i)))) };
        // the first value of that magnitude, with its sign, as the reference picks it
        let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0);
        if max == 0.0 {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127.0 / max;
        // SAFETY: as above, in steps of 16 inside the chunk and `qs`.
        unsafe {
            for g in 0..QK_K / 16 {
                let v: [int32x4_t; 4] = std::array::from_fn(|i| {
                    let f = vmulq_n_f32(vld1q_f32(x.as_ptr().add(16 * g + 4 * i)), iscale);
                    vminq_s32(vcvtnq_s32_f32(f), vdupq_n_s32(127))
                });
                let w0 = vcombine_s16(vqmovn_s32(v[0]), vqmovn_s32(v[1]));
                let w1 = vcombine_s16(vqmovn_s32(v[2]), vqmovn_s32(v[3]));
                vst1q_s8(
                    b.qs.as_mut_ptr().add(16 * g),
                    vcombine_s8(vqmovn_s16(w0), vqmovn_s16(w1)),
                );
                b.bsums[g] = vaddvq_s16(vaddq_s16(w0, w1));
            }
        }
        b.d = 1.0 / iscale;
    }
}

// ---- entry points for the tables --------------------------------------------------------

/// `$neon` (plain NEON) and `$dp` (dotprod) entry points for kernel `$impl`.
macro_rules! dot_entries {
    ($neon:ident, $dp:ident, $dp_tf:ident = $impl:ident, $W:ty, $A:ty) => {
        pub(super) fn $neon(x: &[$W], y: &[$A]) -> f32 {
            // SAFETY: `Widen` needs only NEON, which every table's CPU has.
            unsafe { $impl::<Widen>(x, y) }
        }

        #[target_feature(enable = "dotprod")]
        unsafe fn $dp_tf(x: &[$W], y: &[$A]) -> f32 {
            // SAFETY: compiled with dotprod; the caller's CPU has it.
            unsafe { $impl::<SDot>(x, y) }
        }

        pub(super) fn $dp(x: &[$W], y: &[$A]) -> f32 {
            // SAFETY: only placed in a table after `Level::DotProd.available()` returned true.
            unsafe { $dp_tf(x, y) }
        }
    };
}

dot_entries!(
    dot_q4_0_neon,
    dot_q4_0_dotprod,
    q4_0_dp = q4_0,
    BlockQ4_0,
    BlockQ8_0
);
dot_entries!(
    dot_q4_1_neon,
    dot_q4_1_dotprod,
    q4_1_dp = q4_1,
    BlockQ4_1,
    BlockQ8_1
);
dot_entries!(
    dot_q5_0_neon,
    dot_q5_0_dotprod,
    q5_0_dp = q5_0,
    BlockQ5_0,
    BlockQ8_0
);
dot_entries!(
    dot_q5_1_neon,
    dot_q5_1_dotprod,
    q5_1_dp = q5_1,
    BlockQ5_1,
    BlockQ8_1
);
dot_entries!(
    dot_q8_0_neon,
    dot_q8_0_dotprod,
    q8_0_dp = q8_0,
    BlockQ8_0,
    BlockQ8_0
);
dot_entries!(
    dot_q2k_neon,
    dot_q2k_dotprod,
    q2k_dp = q2k,
    BlockQ2K,
    BlockQ8K
);
dot_entries!(
    dot_q3k_neon,
    dot_q3k_dotprod,
    q3k_dp = q3k,
    BlockQ3K,
    BlockQ8K
);
dot_entries!(
    dot_q4k_neon,
    dot_q4k_dotprod,
    q4k_dp = q4k,
    BlockQ4K,
    BlockQ8K
);
dot_entries!(
    dot_q5k_neon,
    dot_q5k_dotprod,
    q5k_dp = q5k,
    BlockQ5K,
    BlockQ8K
);
dot_entries!(
    dot_q6k_neon,
    dot_q6k_dotprod,
    q6k_dp = q6k,
    BlockQ6K,
    BlockQ8K
);
