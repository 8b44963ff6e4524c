//! x86-64 SIMD kernels: AVX2 (+FMA, F16C), AVX-VNNI and AVX-512 (F, BW, VL).

mod avx2;
mod avx512;
mod float;
mod kvq;
mod lut;
mod r16;

use std::arch::x86_64::{_mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32};

/// f16 -> f32 with the F16C instruction, inlined into the SIMD kernels (`half`'s
/// conversion checks CPU features on every call).
#[inline]
#[target_feature(enable = "f16c")]
pub(crate) fn fp16(x: half::f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(x.to_bits() as i32)))
}

use crate::dispatch::{Isa, Kernels};

/// The AVX2 table: the scalar table with every kernel that has an AVX2 version replaced.
pub(crate) fn avx2_kernels() -> Kernels {
    Kernels {
        isa: Isa::Avx2,
        name: "avx2",
        dot_q4_0: avx2::dot_q4_0,
        dot_q4_1: avx2::dot_q4_1,
        dot_q5_0: avx2::dot_q5_0,
        dot_q5_1: avx2::dot_q5_1,
        dot_q8_0: avx2::dot_q8_0,
        dot_q2k: avx2::dot_q2k,
        dot_q3k: avx2::dot_q3k,
        dot_q4k: avx2::dot_q4k,
        dot_q5k: avx2::dot_q5k,
        dot_q6k: avx2::dot_q6k,
        dot_f32: avx2::dot_f32,
        dot_f16: avx2::dot_f16,
        axpy_f16: avx2::axpy_f16,
        gemm_f16b: float::gemm_f16b_avx2,
        gemm_q8_0_k: kvq::gemm_q8_0_k,
        gemm_q8_0_n: kvq::gemm_q8_0_n,
        gemm_fp8_k: kvq::gemm_fp8_k,
        gemm_fp8_n: kvq::gemm_fp8_n,
        exp_sum: float::exp_sum_avx2,
        silu_mul: float::silu_mul_avx2,
        gelu_mul: float::gelu_mul_avx2,
        dot4_q4_1: Some(avx2::dot4_q4_1),
        dot4_q5_0: Some(avx2::dot4_q5_0),
        dot4_q8_0: Some(avx2::dot4_q8_0),
        dot4_q4k: Some(avx2::dot4_q4k),
        dot4_q6k: Some(avx2::dot4_q6k),
        dot4_f32: Some(avx2::dot4_f32),
        dot4_f16: Some(avx2::dot4_f16),
        r16_gemm: r16::gemm_r16_avx2,
        r16_gemv: Some(r16::gemv_r16_avx2),
        r16_unpacked: Some(r16::UNPACKED_AVX2),
        r16_t2_tiles: Some(r16::gemm_t2_tiles_avx2),
        r16_preferred: true,
        quantize_q8x: avx2::quantize_q8x,
        quantize_q8x_k: avx2::quantize_q8x_k,
        lut_gemv: lut::gemv_lut_avx2,
        rms_norm: float::rms_norm_avx2,
        rope: float::rope_avx2,
        ..Kernels::SCALAR
    }
}

/// The AVX-VNNI table: the AVX2 table with the repacked-weight kernel's multiply-adds done
/// by the VEX `vpdpbusd`.
pub(crate) fn avxvnni_kernels() -> Kernels {
    Kernels {
        isa: Isa::AvxVnni,
        name: "avx2+vnni",
        r16_gemm: r16::gemm_r16_avxvnni,
        r16_gemv: Some(r16::gemv_r16_avxvnni),
        r16_unpacked: Some(r16::UNPACKED_AVXVNNI),
        r16_t2_tiles: Some(r16::gemm_t2_tiles_avxvnni),
        ..avx2_kernels()
    }
}

/// The AVX-512 table: the AVX2 table with the AVX-512 kernels on top; the repacked-weight
/// kernel is AVX-512 VNNI's where the CPU has it, else the 256-bit one of the best lower
/// level (AVX-VNNI or AVX2).
pub(crate) fn avx512_kernels() -> Kernels {
    let vnni = is_x86_feature_detected!("avx512vnni");
    let below = if crate::Isa::AvxVnni.available() {
        avxvnni_kernels()
    } else {
        avx2_kernels()
    };
    Kernels {
        r16_gemm: if vnni {
            avx512::gemm_r16
        } else {
            below.r16_gemm
        },
        r16_gemv: if vnni { None } else { below.r16_gemv },
        r16_unpacked: if vnni { None } else { below.r16_unpacked },
        r16_t2_tiles: if vnni { None } else { below.r16_t2_tiles },
        r16_preferred: true,
        isa: Isa::Avx512,
        name: if vnni { "avx512+vnni" } else { "avx512" },
        dot_q4_0: avx512::dot_q4_0,
        dot_q4_1: avx512::dot_q4_1,
        dot_q5_0: avx512::dot_q5_0,
        dot_q5_1: avx512::dot_q5_1,
        dot_q8_0: avx512::dot_q8_0,
        dot_q4k: avx512::dot_q4k,
        dot_q5k: avx512::dot_q5k,
        dot_q6k: avx512::dot_q6k,
        dot_f32: avx512::dot_f32,
        dot_f16: avx512::dot_f16,
        gemm_f16b: float::gemm_f16b_avx512,
        exp_sum: float::exp_sum_avx512,
        silu_mul: float::silu_mul_avx512,
        gelu_mul: float::gelu_mul_avx512,
        rms_norm: float::rms_norm_avx512,
        quantize_q8x: avx512::quantize_q8x,
        dot4_q4_1: Some(avx512::dot4_q4_1),
        dot4_q5_0: Some(avx512::dot4_q5_0),
        dot4_q8_0: Some(avx512::dot4_q8_0),
        dot4_q4k: Some(avx512::dot4_q4k),
        dot4_q6k: Some(avx512::dot4_q6k),
        // its own one-token float dots sum in another order: none rather than a
        // four-token kernel whose results could differ from them in the last bits
        dot4_f32: None,
        dot4_f16: None,
        ..below
    }
}
