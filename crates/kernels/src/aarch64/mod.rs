//! aarch64 kernels: NEON (every aarch64 CPU has it), `sdot` where the CPU has the dot-product
//! extension (FEAT_DotProd) and `usmmla` where it has the int8 matrix multiply (FEAT_I8MM).
//!
//! The three levels share one table layout ([`neon_kernels`]); the CPU's features pick the
//! level at run time (`is_aarch64_feature_detected!`), and the tests run every level the CPU
//! can (see [`levels`]). The dot-product and matrix instructions are written as inline
//! assembly in small `#[inline(always)]` helpers: the standard library's intrinsics for them
//! are not stable yet. Each helper is only inlined into functions compiled with the feature
//! it needs.

mod float;
mod kvq;
mod lut;
mod quant;
mod r16;

use std::arch::aarch64::*;
use std::arch::asm;

use crate::dispatch::{Isa, Kernels};

/// The levels of the NEON table, each adding to the one before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    /// Plain NEON: 8-bit products widened with `smull`/`sadalp`; multi-token kernels that
    /// unpack each weight block once for four activation rows.
    Neon,
    /// `sdot` (four 8-bit products summed into each 32-bit lane).
    DotProd,
    /// `sdot` plus `usmmla` (a 2x8 by 8x2 8-bit matrix product) for the repacked weights.
    I8mm,
}

impl Level {
    fn available(self) -> bool {
        match self {
            Level::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            Level::DotProd => {
                Level::Neon.available() && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            Level::I8mm => {
                Level::DotProd.available() && std::arch::is_aarch64_feature_detected!("i8mm")
            }
        }
    }
}

/// Every level this CPU can run, best last.
pub(crate) fn levels() -> Vec<Level> {
    [Level::Neon, Level::DotProd, Level::I8mm]
        .into_iter()
        .filter(|l| l.available())
        .collect()
}

/// Whether the CPU has NEON (and so at least the [`Level::Neon`] table).
pub(crate) fn neon_available() -> bool {
    Level::Neon.available()
}

/// The kernel table of one level. The caller has checked that the level is available.
pub(crate) fn neon_kernels(level: Level) -> Kernels {
    let base = Kernels {
        isa: Isa::Neon,
        name: "neon",
        dot_q4_0: quant::dot_q4_0_neon,
        dot_q4_1: quant::dot_q4_1_neon,
        dot_q5_0: quant::dot_q5_0_neon,
        dot_q5_1: quant::dot_q5_1_neon,
        dot_q8_0: quant::dot_q8_0_neon,
        dot_q2k: quant::dot_q2k_neon,
        dot_q3k: quant::dot_q3k_neon,
        dot_q4k: quant::dot_q4k_neon,
        dot_q5k: quant::dot_q5k_neon,
        dot_q6k: quant::dot_q6k_neon,
        dot4_q4_1: Some(quant::dot4_q4_1_neon),
        dot4_q5_0: Some(quant::dot4_q5_0_neon),
        dot4_q8_0: Some(quant::dot4_q8_0_neon),
        dot4_q4k: Some(quant::dot4_q4k_neon),
        dot4_q6k: Some(quant::dot4_q6k_neon),
        dot4_f32: None,
        dot4_f16: None,
        dot_f32: float::dot_f32,
        dot_f16: float::dot_f16,
        dot_bf16: float::dot_bf16,
        axpy_f16: float::axpy_f16,
        gemm_f16b: float::gemm_f16b,
        gemm_q8_0_k: kvq::gemm_q8_0_k,
        gemm_q8_0_n: kvq::gemm_q8_0_n,
        gemm_fp8_k: kvq::gemm_fp8_k,
        gemm_fp8_n: kvq::gemm_fp8_n,
        exp_sum: float::exp_sum,
        silu_mul: float::silu_mul,
        gelu_mul: float::gelu_mul,
        rms_norm: float::rms_norm,
        rope: float::rope,
        quantize_q8x: quant::quantize_q8x,
        quantize_q8_0: quant::quantize_q8_0,
        quantize_q8_1: quant::quantize_q8_1,
        quantize_q8k: quant::quantize_q8k,
        lut_gemv: lut::gemv_lut_neon,
        ..Kernels::SCALAR
    };
    match level {
        Level::Neon => base,
        Level::DotProd => Kernels {
            name: "neon+dotprod",
            dot_q4_0: quant::dot_q4_0_dotprod,
            dot_q4_1: quant::dot_q4_1_dotprod,
            dot_q5_0: quant::dot_q5_0_dotprod,
            dot_q5_1: quant::dot_q5_1_dotprod,
            dot_q8_0: quant::dot_q8_0_dotprod,
            dot_q2k: quant::dot_q2k_dotprod,
            dot_q3k: quant::dot_q3k_dotprod,
            dot_q4k: quant::dot_q4k_dotprod,
            dot_q5k: quant::dot_q5k_dotprod,
            dot_q6k: quant::dot_q6k_dotprod,
            dot4_q4_1: Some(quant::dot4_q4_1_dotprod),
            dot4_q5_0: Some(quant::dot4_q5_0_dotprod),
            dot4_q8_0: Some(quant::dot4_q8_0_dotprod),
            dot4_q4k: Some(quant::dot4_q4k_dotprod),
            dot4_q6k: Some(quant::dot4_q6k_dotprod),
            r16_gemm: r16::gemm_r16_dotprod,
            r16_preferred: true,
            ..base
        },
        Level::I8mm => Kernels {
            name: "neon+dotprod+i8mm",
            r16_gemm: r16::gemm_r16_i8mm,
            ..neon_kernels(Level::DotProd)
        },
    }
}

/// The best table this CPU can run.
pub(crate) fn best_neon_kernels() -> Kernels {
    neon_kernels(*levels().last().unwrap_or(&Level::Neon))
}

// ---- instructions without stable intrinsics ---------------------------------------------

/// `acc[i] += a[4i..4i+4] · b[4i..4i+4]` (signed bytes).
///
/// # Safety
/// The CPU has FEAT_DotProd; only inline into functions compiled with `dotprod`.
#[inline(always)]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: a register-only instruction the caller's CPU has.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// `acc[i] += a[4i..4i+4] · b[4L..4L+4]`: the four bytes of lane `L` of `b` against every
/// lane of `a` (signed bytes).
///
/// # Safety
/// As [`sdot`].
#[inline(always)]
unsafe fn sdot_lane<const L: i32>(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: a register-only instruction the caller's CPU has.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.4b[{l}]",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            l = const L,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// `acc += a · bᵀ` for a 2x8 unsigned `a` (rows: bytes 0..8, 8..16) and a 2x8 signed `b`:
/// lanes `[a0·b0, a0·b1, a1·b0, a1·b1]`.
///
/// # Safety
/// The CPU has FEAT_I8MM; only inline into functions compiled with `i8mm`.
#[inline(always)]
unsafe fn usmmla(mut acc: int32x4_t, a: uint8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: a register-only instruction the caller's CPU has.
    unsafe {
        asm!(
            "usmmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// Four f16 (as bits) to f32 with `fcvtl`, a base ARMv8 instruction (the intrinsic needs
/// the unstable `f16` type).
#[inline(always)]
fn f16x4(h: uint16x4_t) -> float32x4_t {
    let r: float32x4_t;
    // SAFETY: a register-only conversion every aarch64 CPU has.
    unsafe {
        asm!(
            "fcvtl {r:v}.4s, {h:v}.4h",
            r = lateout(vreg) r,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    r
}

/// Eight f16 at `p` as two f32 vectors.
///
/// # Safety
/// `p` points to 16 readable bytes.
#[inline(always)]
unsafe fn load_f16x8(p: *const half::f16) -> (float32x4_t, float32x4_t) {
    // SAFETY: the caller guarantees 16 bytes.
    let h = unsafe { vld1q_u16(p as *const u16) };
    (f16x4(vget_low_u16(h)), f16x4(vget_high_u16(h)))
}

/// Sixteen bits spread to sixteen bytes: byte i = `val` if bit i is set, else 0.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn bits16(bits: u32, val: u8) -> uint8x16_t {
    let v = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
    let sel = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
    vandq_u8(vtstq_u8(v, sel), vdupq_n_u8(val))
}

/// One f16 to f32 (`fcvt`), without `half`'s run-time feature check.
#[inline]
#[target_feature(enable = "neon")]
fn fp16(x: half::f16) -> f32 {
    vgetq_lane_f32::<0>(f16x4(vdup_n_u16(x.to_bits())))
}
