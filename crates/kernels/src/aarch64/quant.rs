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

/// A 32-value block unpacked: values 0..16 and 16..32 as signed bytes, the scale and (Q4_1,
/// Q5_1) the min, whose product with the activation block's `s` is added per block.
struct Unpacked(int8x16_t, int8x16_t, f16, Option<f16>);

/// A 32-value weight block.
trait Block32 {
    /// The activation block it pairs with.
    type Act: Act32;
    /// # Safety
    /// NEON (every aarch64 CPU).
    unsafe fn unpack(&self) -> Unpacked;
}

/// A Q8_0/Q8_1 activation block.
trait Act32 {
    fn d(&self) -> f16;
    /// `d * sum(qs)` (Q8_1; never asked of Q8_0, whose partners have no min).
    fn s(&self) -> f16;
    fn qs(&self) -> &[i8; 32];
}

impl Act32 for BlockQ8_0 {
    fn d(&self) -> f16 {
        self.d
    }
    fn s(&self) -> f16 {
        f16::ZERO
    }
    fn qs(&self) -> &[i8; 32] {
        &self.qs
    }
}

impl Act32 for BlockQ8_1 {
    fn d(&self) -> f16 {
        self.d
    }
    fn s(&self) -> f16 {
        self.s
    }
    fn qs(&self) -> &[i8; 32] {
        &self.qs
    }
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

/// `(lo - off, hi - off)` as signed bytes.
///
/// # Safety
/// NEON.
#[inline(always)]
unsafe fn minus((lo, hi): (uint8x16_t, uint8x16_t), off: i8) -> (int8x16_t, int8x16_t) {
    let o = vdupq_n_s8(off);
    (vsubq_s8(s8(lo), o), vsubq_s8(s8(hi), o))
}

impl Block32 for BlockQ4_0 {
    type Act = BlockQ8_0;
    #[inline(always)]
    unsafe fn unpack(&self) -> Unpacked {
        // SAFETY: 16 packed bytes.
        let (lo, hi) = unsafe { minus(nibbles(self.qs.as_ptr()), 8) };
        Unpacked(lo, hi, self.d, None)
    }
}

impl Block32 for BlockQ4_1 {
    type Act = BlockQ8_1;
    #[inline(always)]
    unsafe fn unpack(&self) -> Unpacked {
        // SAFETY: 16 packed bytes.
        let (lo, hi) = unsafe { minus(nibbles(self.qs.as_ptr()), 0) };
        Unpacked(lo, hi, self.d, Some(self.m))
    }
}

impl Block32 for BlockQ5_0 {
    type Act = BlockQ8_0;
    #[inline(always)]
    unsafe fn unpack(&self) -> Unpacked {
        // SAFETY: 16 packed bytes.
        let (lo, hi) = unsafe { minus(q5_values(&self.qh, self.qs.as_ptr()), 16) };
        Unpacked(lo, hi, self.d, None)
    }
}

impl Block32 for BlockQ5_1 {
    type Act = BlockQ8_1;
    #[inline(always)]
    unsafe fn unpack(&self) -> Unpacked {
        // SAFETY: 16 packed bytes.
        let (lo, hi) = unsafe { minus(q5_values(&self.qh, self.qs.as_ptr()), 0) };
        Unpacked(lo, hi, self.d, Some(self.m))
    }
}

impl Block32 for BlockQ8_0 {
    type Act = BlockQ8_0;
    #[inline(always)]
    unsafe fn unpack(&self) -> Unpacked {
        let p = self.qs.as_ptr();
        // SAFETY: 32 bytes.
        let (lo, hi) = unsafe { (vld1q_s8(p), vld1q_s8(p.add(16))) };
        Unpacked(lo, hi, self.d, None)
    }
}

/// One weight row against `N` activation rows, each weight block unpacked once.
///
/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn dot32_n<D: Dot, B: Block32, const N: usize>(x: &[B], ys: [&[B::Act]; N]) -> [f32; N] {
    let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
    let mut sum = [vdupq_n_f32(0.0); N];
    let mut mins = [0.0f32; N];
    for (i, a) in x[..n].iter().enumerate() {
        // SAFETY: as this function's; every activation row has block i.
        unsafe {
            let Unpacked(lo, hi, d, m) = a.unpack();
            let (d, m) = (fp16(d), m.map(|m| fp16(m)));
            for t in 0..N {
                let b = &ys[t][i];
                let v = dot32::<D>(lo, hi, b.qs().as_ptr());
                sum[t] = vfmaq_n_f32(sum[t], vcvtq_f32_s32(v), d * fp16(b.d()));
                if let Some(m) = m {
                    mins[t] += m * fp16(b.s());
                }
            }
        }
    }
    // SAFETY: NEON.
    std::array::from_fn(|t| unsafe { vaddvq_f32(sum[t]) } + mins[t])
}

// ---- K-quants -------------------------------------------------------------------------

/// A K-quant super-block as sixteen groups of sixteen signed values with integer scales
/// and, for the formats with mins, each group's min (applied to the activation's group sum).
struct Decoded {
    v: [int8x16_t; 16],
    sc: [i32; 16],
    mins: Option<[i32; 16]>,
    d: f16,
    /// The scale of the mins (zero for the formats without).
    dmin: f16,
}

/// A K-quant weight block.
trait SuperBlock {
    /// # Safety
    /// NEON (every aarch64 CPU).
    unsafe fn decode(&self) -> Decoded;
}

/// The four 2-bit fields of 32 bytes (`q0`: bytes 0..16, `q1`: 16..32) at shift `2j`.
///
/// # Safety
/// NEON.
#[inline(always)]
unsafe fn crumbs(q0: uint8x16_t, q1: uint8x16_t, j: usize) -> (uint8x16_t, uint8x16_t) {
    let sh = vdupq_n_s8(-2 * j as i8);
    let m3 = vdupq_n_u8(3);
    (
        vandq_u8(vshlq_u8(q0, sh), m3),
        vandq_u8(vshlq_u8(q1, sh), m3),
    )
}

impl SuperBlock for BlockQ2K {
    #[inline(always)]
    unsafe fn decode(&self) -> Decoded {
        let mut v = [vdupq_n_s8(0); 16];
        // SAFETY: 32 packed bytes at 32h.
        unsafe {
            for h in 0..2 {
                let q0 = vld1q_u8(self.qs.as_ptr().add(32 * h));
                let q1 = vld1q_u8(self.qs.as_ptr().add(32 * h + 16));
                for j in 0..4 {
                    let (v0, v1) = crumbs(q0, q1, j);
                    (v[8 * h + 2 * j], v[8 * h + 2 * j + 1]) = (s8(v0), s8(v1));
                }
            }
        }
        Decoded {
            v,
            sc: self.scales.map(|s| (s & 0xF) as i32),
            mins: Some(self.scales.map(|s| (s >> 4) as i32)),
            d: self.d,
            dmin: self.dmin,
        }
    }
}

impl SuperBlock for BlockQ3K {
    #[inline(always)]
    unsafe fn decode(&self) -> Decoded {
        let mut v = [vdupq_n_s8(0); 16];
        // SAFETY: the 32-byte hmask, 32 packed bytes at 32h.
        unsafe {
            let hm0 = vld1q_u8(self.hmask.as_ptr());
            let hm1 = vld1q_u8(self.hmask.as_ptr().add(16));
            let four = vdupq_n_u8(4);
            for h in 0..2 {
                let q0 = vld1q_u8(self.qs.as_ptr().add(32 * h));
                let q1 = vld1q_u8(self.qs.as_ptr().add(32 * h + 16));
                for j in 0..4 {
                    let (v0, v1) = crumbs(q0, q1, j);
                    // value = low two bits - (4 where the hmask bit is clear)
                    let bit = vdupq_n_u8(1 << (4 * h + j));
                    v[8 * h + 2 * j] = vsubq_s8(s8(v0), s8(vbicq_u8(four, vtstq_u8(hm0, bit))));
                    v[8 * h + 2 * j + 1] = vsubq_s8(s8(v1), s8(vbicq_u8(four, vtstq_u8(hm1, bit))));
                }
            }
        }
        Decoded {
            v,
            sc: q3k_scales(&self.scales).map(|s| s as i32),
            mins: None,
            d: self.d,
            dmin: f16::ZERO,
        }
    }
}

/// Q4_K and Q5_K (with `qh`, the fifth bits): sub-blocks of 32 unsigned values, 6-bit
/// scales and mins.
///
/// # Safety
/// NEON.
#[inline(always)]
unsafe fn decode_q45k(
    (d, dmin): (f16, f16),
    scales: &[u8; K_SCALE_SIZE],
    qs: &[u8; QK_K / 2],
    qh: Option<&[u8; QK_K / 8]>,
) -> Decoded {
    let (sc, m) = unpack_scales_k4(scales);
    let mut v = [vdupq_n_s8(0); 16];
    // SAFETY: 32 packed bytes at 32j, the 32-byte qh.
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
            // sub-block 2j is values 64j..64j+32 (low nibbles), 2j+1 the next 32 (high)
            v[4 * j] = s8(lo0);
            v[4 * j + 1] = s8(lo1);
            v[4 * j + 2] = s8(hi0);
            v[4 * j + 3] = s8(hi1);
        }
    }
    Decoded {
        v,
        sc: std::array::from_fn(|g| sc[g / 2] as i32),
        mins: Some(std::array::from_fn(|g| m[g / 2] as i32)),
        d,
        dmin,
    }
}

impl SuperBlock for BlockQ4K {
    #[inline(always)]
    unsafe fn decode(&self) -> Decoded {
        // SAFETY: NEON, as the caller guarantees.
        unsafe { decode_q45k((self.d, self.dmin), &self.scales, &self.qs, None) }
    }
}

impl SuperBlock for BlockQ5K {
    #[inline(always)]
    unsafe fn decode(&self) -> Decoded {
        // SAFETY: NEON, as the caller guarantees.
        unsafe { decode_q45k((self.d, self.dmin), &self.scales, &self.qs, Some(&self.qh)) }
    }
}

impl SuperBlock for BlockQ6K {
    #[inline(always)]
    unsafe fn decode(&self) -> Decoded {
        let mut v = [vdupq_n_s8(0); 16];
        // SAFETY: 64 bytes of ql at 64h, 32 of qh at 32h.
        unsafe {
            let (m4, m3) = (vdupq_n_u8(0xF), vdupq_n_u8(3));
            for h in 0..2 {
                let ql = self.ql.as_ptr().add(64 * h);
                let qh = self.qh.as_ptr().add(32 * h);
                let l: [uint8x16_t; 4] = std::array::from_fn(|i| vld1q_u8(ql.add(16 * i)));
                let hb = [vld1q_u8(qh), vld1q_u8(qh.add(16))];
                // group i of this half: low nibbles of l[i] (i < 4) or high of l[i - 4], and
                // the bit pair at 2 (i / 2) of hb[i % 2]
                for i in 0..8 {
                    let low = if i < 4 {
                        vandq_u8(l[i], m4)
                    } else {
                        vshrq_n_u8::<4>(l[i - 4])
                    };
                    let sh = vdupq_n_s8(-2 * (i / 2) as i8);
                    let high = vandq_u8(vshlq_u8(hb[i % 2], sh), m3);
                    v[8 * h + i] =
                        vsubq_s8(s8(vorrq_u8(low, vshlq_n_u8::<4>(high))), vdupq_n_s8(32));
                }
            }
        }
        Decoded {
            v,
            sc: self.scales.map(|s| s as i32),
            mins: None,
            d: self.d,
            dmin: f16::ZERO,
        }
    }
}

/// One K-quant weight row against `N` activation rows, each super-block decoded once.
///
/// # Safety
/// As `D::dot`.
#[inline(always)]
unsafe fn kquant_n<D: Dot, B: SuperBlock, const N: usize>(
    x: &[B],
    ys: [&[BlockQ8K]; N],
) -> [f32; N] {
    let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
    let mut sum = [0.0f32; N];
    for (i, a) in x[..n].iter().enumerate() {
        // SAFETY: as this function's; every activation row has block i (QK_K bytes).
        unsafe {
            let Decoded {
                v,
                sc,
                mins,
                d,
                dmin,
            } = a.decode();
            let (d, dmin) = (fp16(d), fp16(dmin));
            for (s, y) in sum.iter_mut().zip(&ys) {
                let b = &y[i];
                let mut isum = vdupq_n_s32(0);
                for g in 0..16 {
                    let p = D::dot(vdupq_n_s32(0), v[g], vld1q_s8(b.qs.as_ptr().add(16 * g)));
                    isum = vmlaq_n_s32(isum, p, sc[g]);
                }
                *s += b.d * d * vaddvq_s32(isum) as f32;
                if let Some(m) = mins {
                    let summ: i32 = (0..16).map(|g| m[g] * b.bsums[g] as i32).sum();
                    *s -= b.d * dmin * summ as f32;
                }
            }
        }
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
            // within -127..=127, as the reference keeps them
            let v: [int32x4_t; 4] = std::array::from_fn(|i| {
                let r = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x.add(16 * half + 4 * i)), id));
                vmaxq_s32(vminq_s32(r, vdupq_n_s32(127)), vdupq_n_s32(-127))
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

/// The plain NEON and dotprod entry points (one activation row, and four where `$dot4` names
/// them) of the generic kernel `$kern` for weight blocks `$W` and activation blocks `$A`.
macro_rules! dot_entries {
    ($kern:ident, $W:ty, $A:ty, $neon:ident, $dp:ident $(, $neon4:ident, $dp4:ident)?) => {
        pub(super) fn $neon(x: &[$W], y: &[$A]) -> f32 {
            // SAFETY: `Widen` needs only NEON, which every table's CPU has.
            unsafe { $kern::<Widen, $W, 1>(x, [y])[0] }
        }

        pub(super) fn $dp(x: &[$W], y: &[$A]) -> f32 {
            #[target_feature(enable = "dotprod")]
            unsafe fn dp(x: &[$W], y: &[$A]) -> f32 {
                // SAFETY: compiled with dotprod; the caller's CPU has it.
                unsafe { $kern::<SDot, $W, 1>(x, [y])[0] }
            }
            // SAFETY: only placed in a table after `Level::DotProd.available()` returned true.
            unsafe { dp(x, y) }
        }

        $(
        pub(super) fn $neon4(x: &[$W], ys: [&[$A]; 4]) -> [f32; 4] {
            // SAFETY: as the one-row entry.
            unsafe { $kern::<Widen, $W, 4>(x, ys) }
        }

        pub(super) fn $dp4(x: &[$W], ys: [&[$A]; 4]) -> [f32; 4] {
            #[target_feature(enable = "dotprod")]
            unsafe fn dp(x: &[$W], ys: [&[$A]; 4]) -> [f32; 4] {
                // SAFETY: compiled with dotprod; the caller's CPU has it.
                unsafe { $kern::<SDot, $W, 4>(x, ys) }
            }
            // SAFETY: only placed in a table after `Level::DotProd.available()` returned true.
            unsafe { dp(x, ys) }
        }
        )?
    };
}

dot_entries!(
    dot32_n,
    BlockQ4_0,
    BlockQ8_0,
    dot_q4_0_neon,
    dot_q4_0_dotprod
);
dot_entries!(
    dot32_n,
    BlockQ4_1,
    BlockQ8_1,
    dot_q4_1_neon,
    dot_q4_1_dotprod,
    dot4_q4_1_neon,
    dot4_q4_1_dotprod
);
dot_entries!(
    dot32_n,
    BlockQ5_0,
    BlockQ8_0,
    dot_q5_0_neon,
    dot_q5_0_dotprod,
    dot4_q5_0_neon,
    dot4_q5_0_dotprod
);
dot_entries!(
    dot32_n,
    BlockQ5_1,
    BlockQ8_1,
    dot_q5_1_neon,
    dot_q5_1_dotprod
);
dot_entries!(
    dot32_n,
    BlockQ8_0,
    BlockQ8_0,
    dot_q8_0_neon,
    dot_q8_0_dotprod,
    dot4_q8_0_neon,
    dot4_q8_0_dotprod
);
dot_entries!(kquant_n, BlockQ2K, BlockQ8K, dot_q2k_neon, dot_q2k_dotprod);
dot_entries!(kquant_n, BlockQ3K, BlockQ8K, dot_q3k_neon, dot_q3k_dotprod);
dot_entries!(
    kquant_n,
    BlockQ4K,
    BlockQ8K,
    dot_q4k_neon,
    dot_q4k_dotprod,
    dot4_q4k_neon,
    dot4_q4k_dotprod
);
dot_entries!(kquant_n, BlockQ5K, BlockQ8K, dot_q5k_neon, dot_q5k_dotprod);
dot_entries!(
    kquant_n,
    BlockQ6K,
    BlockQ8K,
    dot_q6k_neon,
    dot_q6k_dotprod,
    dot4_q6k_neon,
    dot4_q6k_dotprod
);
