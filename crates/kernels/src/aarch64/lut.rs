//! [`crate::lut`]'s lookup-table kernel with NEON: per chunk of four weight pairs and sixteen
//! rows, per half (pairs `4c, 4c + 1` or `4c + 2, 4c + 3`): two nibble extractions, four `tbl`
//! (low and high bytes of the two pairs' tables), four byte interleaves (`zip1`/`zip2`) into
//! 16-bit sums of rows 0..8 and 8..16, and four adds.

use std::arch::aarch64::*;

use half::f16;

use crate::lut::{LUT_HEADER, LUT_ROWS, LUT_TABLE_UNIT, LUT_UNIT};

#[target_feature(enable = "neon")]
fn gemv_lut_impl(group: &[u8], n_units: usize, tables: &[u8], da: &[f32]) -> [f32; LUT_ROWS] {
    let n_units = crate::lut::usable_units(group, n_units, tables, da);
    let mut out = [0.0f32; LUT_ROWS];
    // SAFETY: unit `u < n_units` lies inside `group` and its tables inside `tables` (checked
    // above); every load below is within them.
    unsafe {
        let low = vdupq_n_u8(0x0F);
        let mut f = [vdupq_n_f32(0.0); 4];
        for u in 0..n_units {
            let unit = group.as_ptr().add(u * LUT_UNIT);
            let tab = tables.as_ptr().add(u * LUT_TABLE_UNIT);
            // 16-bit sums of rows 0..8 (`lo`) and 8..16 (`hi`); at most 32 chunks x 4 pairs
            // x 254 = 32512 < 2^15
            let (mut lo, mut hi) = (vdupq_n_s16(0), vdupq_n_s16(0));
            for c in 0..32 {
                let t = tab.add(128 * c);
                for i in 0..2 {
                    // byte r: row r's index of pair 4c + 2i (low nibble) and 4c + 2i + 1
                    let idx = vld1q_u8(unit.add(LUT_HEADER + 32 * c + 16 * i));
                    let il = vandq_u8(idx, low);
                    let ih = vshrq_n_u8::<4>(idx);
                    // pair 4c + 2i's table: low bytes at 16i, high bytes 32 further; pair
                    // 4c + 2i + 1's 64 further
                    let a_lo = vqtbl1q_u8(vld1q_u8(t.add(16 * i)), il);
                    let a_hi = vqtbl1q_u8(vld1q_u8(t.add(32 + 16 * i)), il);
                    let b_lo = vqtbl1q_u8(vld1q_u8(t.add(64 + 16 * i)), ih);
                    let b_hi = vqtbl1q_u8(vld1q_u8(t.add(96 + 16 * i)), ih);
                    let s16 = |x: uint8x16_t| vreinterpretq_s16_u8(x);
                    lo = vaddq_s16(
                        lo,
                        vaddq_s16(s16(vzip1q_u8(a_lo, a_hi)), s16(vzip1q_u8(b_lo, b_hi))),
                    );
                    hi = vaddq_s16(
                        hi,
                        vaddq_s16(s16(vzip2q_u8(a_lo, a_hi)), s16(vzip2q_u8(b_lo, b_hi))),
                    );
                }
            }
            let sums = [
                vmovl_s16(vget_low_s16(lo)),
                vmovl_high_s16(lo),
                vmovl_s16(vget_low_s16(hi)),
                vmovl_high_s16(hi),
            ];
            let s = *da.get_unchecked(u);
            for (q, (acc, sum)) in f.iter_mut().zip(sums).enumerate() {
                let d: [f32; 4] = std::array::from_fn(|j| {
                    let r = 4 * q + j;
                    f16::from_le_bytes([*unit.add(2 * r), *unit.add(2 * r + 1)]).to_f32() * s
                });
                *acc = vfmaq_f32(*acc, vcvtq_f32_s32(sum), vld1q_f32(d.as_ptr()));
            }
        }
        for (q, acc) in f.iter().enumerate() {
            vst1q_f32(out.as_mut_ptr().add(4 * q), *acc);
        }
    }
    out
}

/// [`crate::dispatch::LutGemvFn`] with NEON.
pub(super) fn gemv_lut_neon(
    group: &[u8],
    n_units: usize,
    tables: &[u8],
    da: &[f32],
) -> [f32; LUT_ROWS] {
    // SAFETY: only placed in a kernel table after NEON was detected (`Level::Neon`).
    unsafe { gemv_lut_impl(group, n_units, tables, da) }
}
