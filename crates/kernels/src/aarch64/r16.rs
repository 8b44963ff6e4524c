//! The repacked-weight GEMM ([`crate::repack`]'s R16 layout) for NEON, in two forms.
//!
//! The sixteen rows of a group are taken four at a time (a "quad": one 128-bit register
//! holds four bytes of each of four rows). Per quad, block and kind, [`quad_values`] gives
//! eight registers: register `k` holds values `4k..4k+4` of the quad's rows.
//!
//! * dotprod: `sdot` by element multiplies register `k` by activation bytes `4k..4k+4`
//!   (one lane of the activation register) and sums into each row's lane: eight `sdot` per
//!   quad, block and token. `sdot` is signed x signed: Q8's unsigned `q + 128` values are
//!   flipped back to the signed bytes and `128 * sum(a)` added, exactly.
//! * i8mm: `usmmla` (unsigned x signed, as the layout's values are) multiplies a 2x8 block of
//!   weights (two rows, eight values: registers `2c` and `2c+1` zipped by 32-bit lanes) by
//!   eight values of two tokens: four instructions per row pair, block and token pair, twice
//!   the products per instruction of `sdot`.
//!
//! Scales are applied per block in f32 exactly as [`crate::repack::gemm_r16_scalar`] does.

use std::arch::aarch64::*;

use super::{bits16, f16x4, sdot_lane, usmmla};
use crate::repack::{
    kind_of, usable_blocks, BlockQ8x, R16Kind, KIND_Q4, KIND_Q4K, KIND_Q5, KIND_Q6K, KIND_Q8,
    KIND_T2, R16_ROWS, R16_TOKENS,
};

/// The eight value registers of rows `4m..4m+4` of one block (`body`: its packed values).
///
/// # Safety
/// `body` points to the kind's `body_bytes()` readable bytes; `m < 4`.
#[inline(always)]
unsafe fn quad_values<const KIND: u8>(body: *const u8, m: usize) -> [uint8x16_t; 8] {
    // SAFETY: every offset below is inside the body (see `R16Kind`'s packing).
    unsafe {
        let ld = |o: usize| vld1q_u8(body.add(o));
        if KIND == KIND_Q8 {
            return std::array::from_fn(|k| ld(64 * k + 16 * m));
        }
        if KIND == KIND_T2 {
            // chunk k = p + 2l sits in run p at bits 2l
            let p = [ld(16 * m), ld(64 + 16 * m)];
            return std::array::from_fn(|k| {
                let sh = vdupq_n_s8(-2 * (k / 2) as i8);
                vandq_u8(vshlq_u8(p[k % 2], sh), vdupq_n_u8(3))
            });
        }
        let p = [
            ld(16 * m),
            ld(64 + 16 * m),
            ld(128 + 16 * m),
            ld(192 + 16 * m),
        ];
        let mut v: [uint8x16_t; 8] = std::array::from_fn(|k| {
            if k < 4 {
                vandq_u8(p[k], vdupq_n_u8(0xF))
            } else {
                vshrq_n_u8::<4>(p[k - 4])
            }
        });
        if KIND == KIND_Q5 {
            // the fifth bits of value bytes 64k + 16m .. +16: two bytes of the bit string
            for (k, x) in v.iter_mut().enumerate() {
                let b = body.add(256 + 8 * k + 2 * m);
                let bits = u16::from_le_bytes([*b, *b.add(1)]) as u32;
                *x = vorrq_u8(*x, bits16(bits, 0x10));
            }
        } else if KIND == KIND_Q6K {
            // the high bit pairs of value byte j sit in byte j % 128 at bit 2 (j / 128)
            let h = [ld(256 + 16 * m), ld(256 + 64 + 16 * m)];
            for (k, x) in v.iter_mut().enumerate() {
                let sh = vdupq_n_s8(-2 * (k / 2) as i8);
                let hb = vandq_u8(vshlq_u8(h[k % 2], sh), vdupq_n_u8(3));
                *x = vorrq_u8(*x, vshlq_n_u8::<4>(hb));
            }
        }
        v
    }
}

/// Four bytes at `p` as f32, unsigned or signed.
///
/// # Safety
/// `p` points to 4 readable bytes.
#[inline(always)]
unsafe fn bytes4<const SIGNED: bool>(p: *const u8) -> float32x4_t {
    // SAFETY: the caller guarantees 4 bytes.
    let w = unsafe { u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]) };
    let b = vcreate_u8(w as u64);
    if SIGNED {
        let s = vmovl_s8(vreinterpret_s8_u8(b));
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(s)))
    } else {
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(b))))
    }
}

/// Four f16 at `p` as f32.
///
/// # Safety
/// `p` points to 8 readable bytes.
#[inline(always)]
unsafe fn f16x4_at(p: *const u8) -> float32x4_t {
    // SAFETY: the caller guarantees 8 bytes.
    f16x4(unsafe { vld1_u16(p as *const u16) })
}

/// A unit's per-row scale `d` and second header value (`c` of the 32-value kinds, `dmin` of
/// Q4_K; `-128 d` for Q8) for rows `4m..4m+4`.
///
/// # Safety
/// `hp` points to the unit's header.
#[inline(always)]
unsafe fn unit_scales<const KIND: u8>(hp: *const u8, m: usize) -> (float32x4_t, float32x4_t) {
    // SAFETY: header reads inside the kind's header bytes.
    unsafe {
        let d = f16x4_at(hp.add(8 * m));
        let d2 = if KIND == KIND_Q8 {
            vmulq_n_f32(d, -128.0)
        } else if KIND == KIND_T2 {
            vnegq_f32(d)
        } else if KIND == KIND_Q6K {
            vdupq_n_f32(0.0)
        } else {
            f16x4_at(hp.add(32 + 8 * m))
        };
        (d, d2)
    }
}

/// Per-row scales of block `j` of a unit for rows `4m..4m+4`: those of the two sixteen-value
/// halves and the offset `c` (Q6_K's offset is taken off in integers).
///
/// # Safety
/// `hp` points to the unit's header.
#[inline(always)]
unsafe fn block_scales<const KIND: u8>(
    hp: *const u8,
    j: usize,
    m: usize,
    (d, d2): (float32x4_t, float32x4_t),
) -> (float32x4_t, float32x4_t, float32x4_t) {
    // SAFETY: header reads inside the kind's header bytes.
    unsafe {
        match KIND {
            KIND_Q4K => {
                let sc = vmulq_f32(d, bytes4::<false>(hp.add(64 + 16 * j + 4 * m)));
                let mn = vmulq_f32(d2, bytes4::<false>(hp.add(192 + 16 * j + 4 * m)));
                (sc, sc, vnegq_f32(mn))
            }
            KIND_Q6K => {
                let sa = vmulq_f32(d, bytes4::<true>(hp.add(32 + 32 * j + 4 * m)));
                let sb = vmulq_f32(d, bytes4::<true>(hp.add(48 + 32 * j + 4 * m)));
                (sa, sb, vdupq_n_f32(0.0))
            }
            _ => (d, d, d2),
        }
    }
}

/// Calls `f(b, values, (da, db, c))` for every block `b` of a quad's rows, with the
/// block's [`quad_values`] and [`block_scales`].
///
/// # Safety
/// `group` holds the `nb` blocks (whole units) of kind `KIND`; `m < 4`.
#[inline(always)]
unsafe fn for_blocks<const KIND: u8>(
    group: &[u8],
    nb: usize,
    m: usize,
    mut f: impl FnMut(usize, [uint8x16_t; 8], (float32x4_t, float32x4_t, float32x4_t)),
) {
    let kind = kind_of(KIND);
    let (ub, hb, bb, bpu) = kind.layout();
    for u in 0..nb / bpu {
        let unit = &group[u * ub..(u + 1) * ub];
        let hp = unit.as_ptr();
        // SAFETY: header and body reads inside the unit (its length is `ub`).
        unsafe {
            let us = unit_scales::<KIND>(hp, m);
            for j in 0..bpu {
                let v = quad_values::<KIND>(hp.add(hb + j * bb), m);
                f(u * bpu + j, v, block_scales::<KIND>(hp, j, m, us));
            }
        }
    }
}

// ---- dotprod: sdot by element -----------------------------------------------------------------

/// `N` activation rows against rows `4m..4m+4` of a group.
///
/// # Safety
/// The CPU has dotprod; as [`for_blocks`].
#[inline(always)]
unsafe fn gemm_dotprod_n<const N: usize, const KIND: u8>(
    group: &[u8],
    nb: usize,
    m: usize,
    acts: &[&[BlockQ8x]; R16_TOKENS],
) -> [float32x4_t; N] {
    let mut facc = [vdupq_n_f32(0.0); N];
    // SAFETY: as this function's; activation blocks below `nb` exist (`usable_blocks`).
    unsafe {
        for_blocks::<KIND>(group, nb, m, |b, v, (da, db, c)| {
            let w: [int8x16_t; 8] = std::array::from_fn(|k| {
                if KIND == KIND_Q8 {
                    vreinterpretq_s8_u8(veorq_u8(v[k], vdupq_n_u8(0x80)))
                } else {
                    vreinterpretq_s8_u8(v[k])
                }
            });
            for (t, acc) in facc.iter_mut().enumerate() {
                let a = &acts[t][b];
                let a0 = vld1q_s8(a.qs.as_ptr());
                let a1 = vld1q_s8(a.qs.as_ptr().add(16));
                let z = vdupq_n_s32(0);
                let i0 = sdot_lane::<0>(z, w[0], a0);
                let i1 = sdot_lane::<0>(z, w[4], a1);
                let i0 = sdot_lane::<1>(i0, w[1], a0);
                let i1 = sdot_lane::<1>(i1, w[5], a1);
                let i0 = sdot_lane::<2>(i0, w[2], a0);
                let i1 = sdot_lane::<2>(i1, w[6], a1);
                let i0 = sdot_lane::<3>(i0, w[3], a0);
                let i1 = sdot_lane::<3>(i1, w[7], a1);
                let (s0, s1) = (a.sums[0] as i32, a.sums[1] as i32);
                *acc = if KIND == KIND_Q6K {
                    // values are q + 32: take 32 * sum(a) off each half, exactly
                    let i0 = vsubq_s32(i0, vdupq_n_s32(32 * s0));
                    let i1 = vsubq_s32(i1, vdupq_n_s32(32 * s1));
                    let both = vfmaq_f32(vmulq_f32(vcvtq_f32_s32(i1), db), vcvtq_f32_s32(i0), da);
                    vfmaq_n_f32(*acc, both, a.d)
                } else {
                    let mut i = vaddq_s32(i0, i1);
                    if KIND == KIND_Q8 {
                        // back from the signed values to q = value + 128
                        i = vaddq_s32(i, vdupq_n_s32(128 * (s0 + s1)));
                    }
                    let f = vfmaq_f32(*acc, vcvtq_f32_s32(i), vmulq_n_f32(da, a.d));
                    vfmaq_n_f32(f, c, a.s)
                };
            }
        });
    }
    facc
}

#[target_feature(enable = "dotprod")]
unsafe fn gemm_dotprod_kind<const KIND: u8>(
    group: &[u8],
    nb: usize,
    acts: &[&[BlockQ8x]; R16_TOKENS],
    n_act: usize,
    out: &mut [[f32; R16_ROWS]; R16_TOKENS],
) {
    for m in 0..R16_ROWS / 4 {
        let mut put = |accs: &[float32x4_t]| {
            for (o, acc) in out.iter_mut().zip(accs) {
                // SAFETY: storing four f32 at 4m < 16 of an array of sixteen.
                unsafe { vst1q_f32(o.as_mut_ptr().add(4 * m), *acc) };
            }
        };
        // SAFETY: the caller's CPU has dotprod; `nb` from `usable_blocks`.
        unsafe {
            match n_act {
                8 => put(&gemm_dotprod_n::<8, KIND>(group, nb, m, acts)),
                7 => put(&gemm_dotprod_n::<7, KIND>(group, nb, m, acts)),
                6 => put(&gemm_dotprod_n::<6, KIND>(group, nb, m, acts)),
                5 => put(&gemm_dotprod_n::<5, KIND>(group, nb, m, acts)),
                4 => put(&gemm_dotprod_n::<4, KIND>(group, nb, m, acts)),
                3 => put(&gemm_dotprod_n::<3, KIND>(group, nb, m, acts)),
                2 => put(&gemm_dotprod_n::<2, KIND>(group, nb, m, acts)),
                1 => put(&gemm_dotprod_n::<1, KIND>(group, nb, m, acts)),
                _ => {}
            }
        }
    }
}

// ---- i8mm: usmmla -------------------------------------------------------------------------

/// `[x, y, x, y]`
#[inline]
#[target_feature(enable = "neon")]
fn pair(x: f32, y: f32) -> float32x4_t {
    let v = vset_lane_f32::<1>(y, vdup_n_f32(x));
    vcombine_f32(v, v)
}

/// `[x, y, x, y]`
#[inline]
#[target_feature(enable = "neon")]
fn pair_i(x: i32, y: i32) -> int32x4_t {
    let v = vset_lane_s32::<1>(y, vdup_n_s32(x));
    vcombine_s32(v, v)
}

/// `NP` token pairs against rows `4m..4m+4` of a group: accumulators `[rows 4m, 4m+1 |
/// rows 4m+2, 4m+3][pair]`, lanes `[r0 t0, r0 t1, r1 t0, r1 t1]`. Token `2p + 1` of the last
/// pair is token `last` when `2p + 1 > last`.
///
/// # Safety
/// The CPU has i8mm; as [`for_blocks`].
#[inline(always)]
unsafe fn gemm_i8mm_n<const NP: usize, const KIND: u8>(
    group: &[u8],
    nb: usize,
    m: usize,
    acts: &[&[BlockQ8x]; R16_TOKENS],
    last: usize,
) -> [[float32x4_t; NP]; 2] {
    let mut facc = [[vdupq_n_f32(0.0); NP]; 2];
    // SAFETY: as this function's; activation blocks below `nb` exist (`usable_blocks`).
    unsafe {
        for_blocks::<KIND>(group, nb, m, |b, v, (da, db, c)| {
            // 2x8 weight blocks: rows (4m, 4m+1) and (4m+2, 4m+3), values 8c..8c+8
            let u32s = |x: uint8x16_t| vreinterpretq_u32_u8(x);
            let w: [[uint8x16_t; 4]; 2] = [
                std::array::from_fn(|c| {
                    vreinterpretq_u8_u32(vzip1q_u32(u32s(v[2 * c]), u32s(v[2 * c + 1])))
                }),
                std::array::from_fn(|c| {
                    vreinterpretq_u8_u32(vzip2q_u32(u32s(v[2 * c]), u32s(v[2 * c + 1])))
                }),
            ];
            // the per-row scales, each row's lane doubled: [r0, r0, r1, r1]
            let rows = |x: float32x4_t| [vzip1q_f32(x, x), vzip2q_f32(x, x)];
            let (da, db, c) = (rows(da), rows(db), rows(c));
            for p in 0..NP {
                let (a, a1) = (&acts[2 * p][b], &acts[(2 * p + 1).min(last)][b]);
                let ld =
                    |x: &BlockQ8x, o: usize| vreinterpretq_s64_s8(vld1q_s8(x.qs.as_ptr().add(o)));
                let (x0, x1) = (ld(a, 0), ld(a1, 0));
                let (y0, y1) = (ld(a, 16), ld(a1, 16));
                // eight values of both tokens: 0..8, 8..16, 16..24, 24..32
                let t = [
                    vreinterpretq_s8_s64(vzip1q_s64(x0, x1)),
                    vreinterpretq_s8_s64(vzip2q_s64(x0, x1)),
                    vreinterpretq_s8_s64(vzip1q_s64(y0, y1)),
                    vreinterpretq_s8_s64(vzip2q_s64(y0, y1)),
                ];
                let ad = pair(a.d, a1.d);
                for (h, acc) in facc.iter_mut().enumerate() {
                    let z = vdupq_n_s32(0);
                    let lo = usmmla(usmmla(z, w[h][0], t[0]), w[h][1], t[1]);
                    let hi = usmmla(usmmla(z, w[h][2], t[2]), w[h][3], t[3]);
                    acc[p] = if KIND == KIND_Q6K {
                        // values are q + 32: take 32 * sum(a) off each half, exactly
                        let s0 = pair_i(32 * a.sums[0] as i32, 32 * a1.sums[0] as i32);
                        let s1 = pair_i(32 * a.sums[1] as i32, 32 * a1.sums[1] as i32);
                        let lo = vcvtq_f32_s32(vsubq_s32(lo, s0));
                        let hi = vcvtq_f32_s32(vsubq_s32(hi, s1));
                        let both = vfmaq_f32(vmulq_f32(hi, db[h]), lo, da[h]);
                        vfmaq_f32(acc[p], both, ad)
                    } else {
                        let i = vcvtq_f32_s32(vaddq_s32(lo, hi));
                        let f = vfmaq_f32(acc[p], i, vmulq_f32(da[h], ad));
                        vfmaq_f32(f, c[h], pair(a.s, a1.s))
                    };
                }
            }
        });
    }
    facc
}

#[target_feature(enable = "i8mm")]
unsafe fn gemm_i8mm_kind<const KIND: u8>(
    group: &[u8],
    nb: usize,
    acts: &[&[BlockQ8x]; R16_TOKENS],
    n_act: usize,
    out: &mut [[f32; R16_ROWS]; R16_TOKENS],
) {
    if n_act == 0 {
        return;
    }
    let last = n_act - 1;
    for m in 0..R16_ROWS / 4 {
        let mut put = |accs: [&[float32x4_t]; 2]| {
            for (h, row_pair) in accs.iter().enumerate() {
                let r = 4 * m + 2 * h;
                for (p, acc) in row_pair.iter().enumerate() {
                    let mut l = [0.0f32; 4];
                    // SAFETY: storing four f32 into an array of four.
                    unsafe { vst1q_f32(l.as_mut_ptr(), *acc) };
                    let (t0, t1) = (2 * p, (2 * p + 1).min(last));
                    (out[t0][r], out[t0][r + 1]) = (l[0], l[2]);
                    (out[t1][r], out[t1][r + 1]) = (l[1], l[3]);
                }
            }
        };
        // SAFETY: the caller's CPU has i8mm; `nb` from `usable_blocks`.
        unsafe {
            match n_act.div_ceil(2) {
                4 => {
                    let a = gemm_i8mm_n::<4, KIND>(group, nb, m, acts, last);
                    put([&a[0], &a[1]])
                }
                3 => {
                    let a = gemm_i8mm_n::<3, KIND>(group, nb, m, acts, last);
                    put([&a[0], &a[1]])
                }
                2 => {
                    let a = gemm_i8mm_n::<2, KIND>(group, nb, m, acts, last);
                    put([&a[0], &a[1]])
                }
                _ => {
                    let a = gemm_i8mm_n::<1, KIND>(group, nb, m, acts, last);
                    put([&a[0], &a[1]])
                }
            }
        }
    }
}

// ---- entry points for the tables --------------------------------------------------------------

macro_rules! r16_entry {
    ($name:ident = $kind_fn:ident) => {
        pub(super) fn $name(
            kind: R16Kind,
            group: &[u8],
            nb: usize,
            acts: [&[BlockQ8x]; R16_TOKENS],
            n_act: usize,
        ) -> [[f32; R16_ROWS]; R16_TOKENS] {
            let n_act = n_act.min(R16_TOKENS);
            let nb = usable_blocks(kind, group, nb, &acts[..n_act]);
            let mut out = [[0.0f32; R16_ROWS]; R16_TOKENS];
            // SAFETY: only placed in a table after the level that has this feature was
            // detected; `nb` covers whole units inside the group and every activation row.
            unsafe {
                match kind {
                    R16Kind::Q4 => $kind_fn::<KIND_Q4>(group, nb, &acts, n_act, &mut out),
                    R16Kind::Q5 => $kind_fn::<KIND_Q5>(group, nb, &acts, n_act, &mut out),
                    R16Kind::Q8 => $kind_fn::<KIND_Q8>(group, nb, &acts, n_act, &mut out),
                    R16Kind::Q4K => $kind_fn::<KIND_Q4K>(group, nb, &acts, n_act, &mut out),
                    R16Kind::Q6K => $kind_fn::<KIND_Q6K>(group, nb, &acts, n_act, &mut out),
                    R16Kind::T2 => $kind_fn::<KIND_T2>(group, nb, &acts, n_act, &mut out),
                }
            }
            out
        }
    };
}

r16_entry!(gemm_r16_dotprod = gemm_dotprod_kind);
r16_entry!(gemm_r16_i8mm = gemm_i8mm_kind);
