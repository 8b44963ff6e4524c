//! NEON attention products over an 8-bit KV cache: [`crate::kvquant::gemm_q8b`] with the
//! codes converted to f32 inside the loop (int8 by widening; FP8 E4M3 by moving its bits into
//! an f16's fields and `fcvtl`, which gives the value times 2^-8, subnormals included). Baseline
//! NEON, so every level of the table uses these.

use std::arch::aarch64::*;

use super::f16x4;
use crate::kvquant::{KvType, QK};

/// Eight codes of one format to two f32 vectors (before the scale and [`Codes::MUL`]).
trait Codes {
    const TY: KvType;
    /// multiplies every value after [`Codes::load8`]
    const MUL: f32;
    /// Codes `p[0..4]` in the first vector, `p[4..8]` in the second.
    ///
    /// # Safety
    /// `p..p + 8` readable.
    unsafe fn load8(p: *const u8) -> (float32x4_t, float32x4_t);
}

struct Q8;
struct Fp8;

impl Codes for Q8 {
    const TY: KvType = KvType::Q8_0;
    const MUL: f32 = 1.0;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load8(p: *const u8) -> (float32x4_t, float32x4_t) {
        // SAFETY: the caller guarantees 8 readable bytes.
        let w = vmovl_s8(unsafe { vld1_s8(p as *const i8) });
        (
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))),
            vcvtq_f32_s32(vmovl_high_s16(w)),
        )
    }
}

impl Codes for Fp8 {
    const TY: KvType = KvType::Fp8;
    const MUL: f32 = 256.0;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load8(p: *const u8) -> (float32x4_t, float32x4_t) {
        // SAFETY: the caller guarantees 8 readable bytes.
        let b = unsafe { vld1_s8(p as *const i8) };
        // sign-extended and shifted by 7: exponent and mantissa land in an f16's bits 7..14
        // (its exponent field's low 4 bits and its mantissa's top 3), the sign in bits 14
        // and 15; clearing bit 14 leaves the f16 whose value is the code's times 2^-8 (a
        // code's exponent field 0 an f16 subnormal, 0x7F/0xFF ±480 as the scalar codec reads
        // them: bit 14 clear, so never an f16 infinity or NaN)
        let h = vbicq_u16(
            vreinterpretq_u16_s16(vshll_n_s8::<7>(b)),
            vdupq_n_u16(0x4000),
        );
        (f16x4(vget_low_u16(h)), f16x4(vget_high_u16(h)))
    }
}

/// One block of `MR` rows x `NV` 8-column vectors of `c += a · B`, columns starting at a
/// multiple of 8 (so each 8 columns lie in one group of a value row's scales).
///
/// # Safety
/// `a` rows `0..MR` x `0..k`, `b` rows `0..k` x `0..8 * NV`, `c` rows `0..MR` x `0..8 * NV`
/// and the scales those columns need (`s` at column 0 of the block for [`crate::kvquant::ScaleAxis::K`]; for
/// [`crate::kvquant::ScaleAxis::N`] at the group of column 0, which is column `jg` of that group) lie inside
/// their slices.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "neon")]
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
        // [MR, 8 * NV] of c as 4-lane vectors; the arrays are sized for NV <= 2
        let mut acc = [[vdupq_n_f32(0.0); 4]; MR];
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate().take(2 * NV) {
                *x = vld1q_f32(c.add(r * ldc + 4 * v));
            }
        }
        let mut kk = 0;
        while kk < k {
            let end = if AXIS_K { (kk + QK).min(k) } else { kk + 1 };
            // along k: the scales of these rows' group, one vector per 4 columns (times MUL)
            let mut sv = [vdupq_n_f32(0.0); 4];
            if AXIS_K {
                for (v, x) in sv.iter_mut().enumerate().take(2 * NV) {
                    *x = vmulq_n_f32(vld1q_f32(s.add((kk / QK) * lds + 4 * v)), C::MUL);
                }
            }
            for kr in kk..end {
                // row kr of B: codes times their scales, [8 * NV]
                let mut bv = [vdupq_n_f32(0.0); 4];
                for v in 0..NV {
                    let (lo, hi) = C::load8(b.add(kr * ldb + 8 * v));
                    (bv[2 * v], bv[2 * v + 1]) = if AXIS_K {
                        (vmulq_f32(lo, sv[2 * v]), vmulq_f32(hi, sv[2 * v + 1]))
                    } else {
                        // along n: one scale per row and 8 columns (one group of 32)
                        let sc = *s.add(kr * lds + (jg + 8 * v) / QK) * C::MUL;
                        (vmulq_n_f32(lo, sc), vmulq_n_f32(hi, sc))
                    };
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = *a.add(r * lda + kr);
                    for (x, &bx) in row.iter_mut().zip(&bv).take(2 * NV) {
                        *x = vfmaq_n_f32(*x, bx, av);
                    }
                }
            }
            kk = end;
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate().take(2 * NV) {
                vst1q_f32(c.add(r * ldc + 4 * v), *x);
            }
        }
    }
}

crate::kvquant::q8b_kernels!("neon", "only placed in a kernel table after `Level::Neon.available()` (every level needs it) returned true");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvquant::{decode, gemm_q8b, ScaleAxis};
    use crate::quant::tests::Rng;

    /// Every code in every lane through `C::load8`, times `C::MUL`, against the scalar
    /// [`decode`], bit for bit (signed zeros, subnormals and 0x7F/0xFF included).
    fn codes_match_decode<C: Codes>() {
        assert!(super::super::neon_available());
        for base in (0..256).step_by(8) {
            for rot in 0..8 {
                let codes: [u8; 8] = std::array::from_fn(|i| (base + (i + rot) % 8) as u8);
                let mut got = [0f32; 8];
                // SAFETY: NEON checked above; 8 codes read, 8 floats written.
                unsafe {
                    let (lo, hi) = C::load8(codes.as_ptr());
                    vst1q_f32(got.as_mut_ptr(), vmulq_n_f32(lo, C::MUL));
                    vst1q_f32(got.as_mut_ptr().add(4), vmulq_n_f32(hi, C::MUL));
                }
                for (&c, g) in codes.iter().zip(got) {
                    let want = decode(C::TY, c);
                    assert_eq!(g.to_bits(), want.to_bits(), "{} code {c:#04x}", C::TY);
                }
            }
        }
    }

    #[test]
    fn neon_q8_0_and_fp8_codes_convert_exactly_like_the_scalar_decode() {
        codes_match_decode::<Q8>();
        codes_match_decode::<Fp8>();
    }

    /// The NEON table's four products (at every level this CPU has) against the reference at
    /// every column tail (n mod 8 and mod 32), row-block tail (m mod 4) and k tail (mod 32),
    /// strides above the minimum, with every code (FP8 subnormals and 0x7F/0xFF included).
    #[test]
    fn neon_gemm_q8b_matches_the_reference_at_every_tail() {
        let mut rng = Rng::new(41);
        for level in super::super::levels() {
            let kern = super::super::neon_kernels(level);
            for (ty, axis, f) in [
                (KvType::Q8_0, ScaleAxis::K, kern.gemm_q8_0_k),
                (KvType::Q8_0, ScaleAxis::N, kern.gemm_q8_0_n),
                (KvType::Fp8, ScaleAxis::K, kern.gemm_fp8_k),
                (KvType::Fp8, ScaleAxis::N, kern.gemm_fp8_n),
            ] {
                for m in [1usize, 2, 3, 4, 5, 8, 11] {
                    for n in [1usize, 7, 8, 12, 15, 16, 24, 31, 33, 40, 56, 72, 100] {
                        for k in [1usize, 5, 31, 32, 33, 70] {
                            let (lda, ldb, ldc) = (k + 1 + m % 3, n + 3 + k % 5, n + 2);
                            let lds = match axis {
                                ScaleAxis::K => n + 1,
                                ScaleAxis::N => n.div_ceil(QK) + 2,
                            };
                            let s_rows = match axis {
                                ScaleAxis::K => k.div_ceil(QK),
                                ScaleAxis::N => k,
                            };
                            let a: Vec<f32> = (0..m * lda).map(|_| rng.f32()).collect();
                            let b = rng.bytes(k * ldb);
                            let s: Vec<f32> = (0..s_rows * lds).map(|_| rng.f32() * 0.02).collect();
                            let c0: Vec<f32> = (0..m * ldc).map(|_| rng.f32()).collect();
                            let mut want = c0.clone();
                            gemm_q8b(ty, axis, m, n, k, &a, lda, &b, ldb, &s, lds, &mut want, ldc);
                            let mut got = c0;
                            f(m, n, k, &a, lda, &b, ldb, &s, lds, &mut got, ldc);
                            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                                if i % ldc >= n {
                                    assert_eq!(g, w, "{} wrote outside the matrix", kern.name);
                                }
                                // fused multiply-adds against the reference's separate ones:
                                // a few roundings of the products' sizes (|a| < 1, |code| <=
                                // 480, scale < 0.02)
                                assert!(
                                    (g - w).abs() <= 1e-5 * (1.0 + k as f32) * (1.0 + w.abs()),
                                    "{} {ty} {axis:?} m={m} n={n} k={k} at {i}: {g} vs {w}",
                                    kern.name
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
