//! 8-bit KV cache formats and the attention products that read them directly.
//!
//! Two formats besides f16, both in groups of [`QK`] values of one position sharing one f32
//! scale (the grouping of llama.cpp's `q8_0` cache, which quantizes each position's key and
//! value vectors in blocks of 32):
//!
//! * `q8_0`: int8 codes, scale `d = amax / 127` rounded through f16 as llama.cpp stores it
//!   (`ggml_quantize_row_q8_0`'s rounding, so the values equal llama.cpp's q8_0 cache);
//! * `fp8`: FP8 E4M3 codes (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; the OCP
//!   "E4M3FN" variant: no infinities, 448 the largest value), scale `amax / 448`.
//!
//! A cache block keeps codes in the same layouts as the f16 cache (keys transposed,
//! `[head_dim, KV_TILE]` per head; values row-major) and scales beside them: keys
//! `[head_dim / 32, KV_TILE]` (a scale per position and group of 32 dimensions), values
//! `[KV_TILE, head_dim_v / 32]`. Flash attention then multiplies by the codes, converting
//! them inside its tile loop: [`gemm_q8b`] with the scale along `k` in groups (the key
//! product) or along `n` in groups (the value product).

use half::f16;

/// Values per scale.
pub const QK: usize = 32;

/// The KV cache's element type (llama.cpp's `--cache-type-k/-v` names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvType {
    #[default]
    F16,
    Q8_0,
    Fp8,
}

impl KvType {
    pub const ALL: [KvType; 3] = [KvType::F16, KvType::Q8_0, KvType::Fp8];

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Fp8 => "fp8",
        }
    }

    /// Parses a name as llama.cpp's `-ctk` takes it (`f16`, `q8_0`; `fp8` is capy's).
    ///
    /// # Errors
    /// Any other name, with the list of known ones.
    pub fn parse(s: &str) -> Result<KvType, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f16" => Ok(KvType::F16),
            "q8_0" => Ok(KvType::Q8_0),
            "fp8" | "fp8_e4m3" => Ok(KvType::Fp8),
            _ => Err(format!(
                "unknown KV cache type {s:?} (known: f16, q8_0, fp8)"
            )),
        }
    }

    /// Bytes one position's `n` values take (codes and scales); `n` a multiple of [`QK`]
    /// for the 8-bit types.
    pub fn row_bytes(self, n: usize) -> usize {
        match self {
            KvType::F16 => 2 * n,
            KvType::Q8_0 | KvType::Fp8 => n + 4 * n.div_ceil(QK),
        }
    }

    pub fn is_quantized(self) -> bool {
        self != KvType::F16
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The E4M3 code nearest to `x` (ties to even; beyond ±448 saturated, NaN as 0).
pub fn fp8_from_f32(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a.is_nan() || a == 0.0 {
        return sign;
    }
    let a = a.min(448.0);
    // the binade of `a`, no lower than the smallest normal one (2^-6, where the subnormals'
    // step 2^-9 continues)
    let mut e = (((a.to_bits() >> 23) & 0xFF) as i32 - 127).max(-6);
    let mut q = (a / (2f32).powi(e - 3)).round_ties_even() as u32; // 0..=16
    if q >= 16 {
        e += 1;
        q = 8;
    }
    // binade -6: the code is q itself (q < 8 subnormal, 8.. the first normal binade)
    let code = if e == -6 {
        q
    } else {
        (((e + 7) as u32) << 3) | (q - 8)
    };
    sign | code.min(0x7E) as u8
}

/// The value of an E4M3 code (0x7F and 0xFF, NaN in E4M3FN, are never produced; they read
/// as 480).
pub fn fp8_to_f32(c: u8) -> f32 {
    // the code's bits in an f16's exponent and mantissa fields give its value times 2^-8
    let bits = (u16::from(c & 0x80) << 8) | (u16::from(c & 0x7F) << 7);
    f16::from_bits(bits).to_f32() * 256.0
}

/// Quantizes `x` (`QK` values) to codes written at `codes[i * stride]`; returns the scale.
pub fn quantize_group(ty: KvType, x: &[f32], codes: &mut [u8], stride: usize) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    match ty {
        KvType::Q8_0 => {
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (i, &v) in x.iter().enumerate() {
                codes[i * stride] = ((v * id).round() as i32).clamp(-127, 127) as i8 as u8;
            }
            f16::from_f32(d).to_f32()
        }
        KvType::Fp8 => {
            let d = amax / 448.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (i, &v) in x.iter().enumerate() {
                codes[i * stride] = fp8_from_f32(v * id);
            }
            d
        }
        KvType::F16 => 1.0,
    }
}

/// The value a code stands for before its scale.
#[inline]
pub fn decode(ty: KvType, c: u8) -> f32 {
    match ty {
        KvType::Fp8 => fp8_to_f32(c),
        _ => c as i8 as f32,
    }
}

/// Which dimension of `b` a scale covers [`QK`] of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleAxis {
    /// `s[(kk / QK) * lds + j]`: the key product (codes `[head_dim, KV_TILE]`, a scale per
    /// position and group of dimensions)
    K,
    /// `s[kk * lds + j / QK]`: the value product (codes `[KV_TILE, head_dim_v]`)
    N,
}

/// `c[m, n] += a[m, k] · B[k, n]`, `B[kk, j] = decode(b[kk * ldb + j]) * scale(kk, j)` with
/// the scale as `axis` says; `a`, `c` row-major with leading dimensions `lda`, `ldc`. The
/// reference definition of the four `gemm_*b_*` kernels (`q8_0`/`fp8` x key/value).
///
/// # Panics
/// Slices shorter than the shapes need, or `ty` f16.
#[allow(clippy::too_many_arguments)]
pub fn gemm_q8b(
    ty: KvType,
    axis: ScaleAxis,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[u8],
    ldb: usize,
    s: &[f32],
    lds: usize,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(ty.is_quantized(), "gemm_q8b reads 8-bit codes");
    check_q8b(
        axis,
        m,
        n,
        k,
        a.len(),
        lda,
        b.len(),
        ldb,
        s.len(),
        lds,
        c.len(),
        ldc,
    );
    gemm_q8b_tail(ty, axis, m, n, k, a, lda, b, ldb, s, lds, c, ldc, 0);
}

/// One register block of a SIMD [`gemm_q8b`]: `mr` rows (1..=4) x `nv` vectors of 8 columns
/// (1 or 2) starting at row `i0`, column `j0`; `a`, `b`, `s`, `c` point at that block's first
/// element of each operand (`s` at the scale of column `j0`'s group for [`ScaleAxis::N`],
/// at column `j0` for [`ScaleAxis::K`]); `jg` is `j0`'s place in its group of 32.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Q8bBlock {
    pub mr: usize,
    pub nv: usize,
    pub a: *const f32,
    pub b: *const u8,
    pub s: *const f32,
    pub jg: usize,
    pub c: *mut f32,
}

/// The outer loops of a SIMD [`gemm_q8b`], shared by the x86 and aarch64 kernels: checks
/// the extents, hands `block` every register block of up to 4 rows x 16 columns over the
/// columns in whole vectors of 8, then computes the last `n % 8` columns with the
/// reference. `block` may read and write exactly the elements its [`Q8bBlock`] covers
/// (rows `0..k` of `b` in those columns), all inside the slices.
///
/// # Panics
/// As [`gemm_q8b`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn drive_q8b(
    ty: KvType,
    axis: ScaleAxis,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[u8],
    ldb: usize,
    s: &[f32],
    lds: usize,
    c: &mut [f32],
    ldc: usize,
    mut block: impl FnMut(Q8bBlock),
) {
    check_q8b(
        axis,
        m,
        n,
        k,
        a.len(),
        lda,
        b.len(),
        ldb,
        s.len(),
        lds,
        c.len(),
        ldc,
    );
    if k == 0 {
        return;
    }
    let mut j0 = 0;
    while j0 + 8 <= n {
        let nv = ((n - j0) / 8).min(2);
        let s_col = match axis {
            ScaleAxis::K => j0,
            ScaleAxis::N => j0 / QK,
        };
        let mut i0 = 0;
        while i0 < m {
            let mr = (m - i0).min(4);
            // rows i0..i0+mr < m, columns j0..j0+8*nv <= n and the scales of those columns
            // lie inside the extents `check_q8b` verified (a vector of 8 columns starting at
            // a multiple of 8 stays in one group of 32): in-bounds offsets
            block(Q8bBlock {
                mr,
                nv,
                a: a[i0 * lda..].as_ptr(),
                b: b[j0..].as_ptr(),
                s: s[s_col..].as_ptr(),
                jg: j0 % QK,
                c: c[i0 * ldc + j0..].as_mut_ptr(),
            });
            i0 += mr;
        }
        j0 += 8 * nv;
    }
    gemm_q8b_tail(ty, axis, m, n, k, a, lda, b, ldb, s, lds, c, ldc, j0);
}

/// Defines a SIMD module's four [`crate::dispatch::GemmQ8bFn`] kernels (`gemm_q8_0_k`,
/// `gemm_q8_0_n`, `gemm_fp8_k`, `gemm_fp8_n`) from its register-block kernel
/// `block::<C, AXIS_K, MR, NV>(k, a, lda, b, ldb, s, lds, jg, c, ldc)` (`MR` 1..=4 rows, `NV`
/// 1..=2 vectors of 8 columns; see [`Q8bBlock`]) and its code types `Q8` and `Fp8` (each with
/// a `TY: KvType`), all compiled with `$features`, driven by [`drive_q8b`]. `$safety` says
/// why the features are there when a kernel table holds them.
macro_rules! q8b_kernels {
    ($features:literal, $safety:literal) => {
        /// [`crate::kvquant::gemm_q8b`] for format `C` and the axis `AXIS_K` names.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $features)]
        fn gemm<C: Codes, const AXIS_K: bool>(
            m: usize,
            n: usize,
            k: usize,
            a: &[f32],
            lda: usize,
            b: &[u8],
            ldb: usize,
            s: &[f32],
            lds: usize,
            c: &mut [f32],
            ldc: usize,
        ) {
            use $crate::kvquant::{drive_q8b, Q8bBlock, ScaleAxis};
            let axis = if AXIS_K { ScaleAxis::K } else { ScaleAxis::N };
            drive_q8b(C::TY, axis, m, n, k, a, lda, b, ldb, s, lds, c, ldc, |blk| {
                let Q8bBlock { a: ap, b: bp, s: sp, jg, c: cp, .. } = blk;
                macro_rules! go {
                    ($mr:literal, $nv:literal) => {
                        // SAFETY: `drive_q8b` hands out blocks inside the operands'
                        // extents, and this function's target features are enabled.
                        unsafe {
                            block::<C, AXIS_K, $mr, $nv>(k, ap, lda, bp, ldb, sp, lds, jg, cp, ldc)
                        }
                    };
                }
                match (blk.mr, blk.nv) {
                    (4, 2) => go!(4, 2),
                    (3, 2) => go!(3, 2),
                    (2, 2) => go!(2, 2),
                    (1, 2) => go!(1, 2),
                    (4, _) => go!(4, 1),
                    (3, _) => go!(3, 1),
                    (2, _) => go!(2, 1),
                    _ => go!(1, 1),
                }
            });
        }

        macro_rules! entry {
            ($name:ident = $codes:ty, $axis_k:literal) => {
                #[doc = concat!("[`crate::kvquant::gemm_q8b`] for one format and axis; ", $safety, ".")]
                #[allow(clippy::too_many_arguments)]
                pub(super) fn $name(
                    m: usize,
                    n: usize,
                    k: usize,
                    a: &[f32],
                    lda: usize,
                    b: &[u8],
                    ldb: usize,
                    s: &[f32],
                    lds: usize,
                    c: &mut [f32],
                    ldc: usize,
                ) {
                    // SAFETY: as this function's doc says, the table holding it checked
                    // the target features first.
                    unsafe { gemm::<$codes, $axis_k>(m, n, k, a, lda, b, ldb, s, lds, c, ldc) }
                }
            };
        }

        entry!(gemm_q8_0_k = Q8, true);
        entry!(gemm_q8_0_n = Q8, false);
        entry!(gemm_fp8_k = Fp8, true);
        entry!(gemm_fp8_n = Fp8, false);
    };
}
pub(crate) use q8b_kernels;

/// [`gemm_q8b`] on columns `j0..n` only.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_q8b_tail(
    ty: KvType,
    axis: ScaleAxis,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[u8],
    ldb: usize,
    s: &[f32],
    lds: usize,
    c: &mut [f32],
    ldc: usize,
    j0: usize,
) {
    for i in 0..m {
        for kk in 0..k {
            let av = a[i * lda + kk];
            for j in j0..n {
                let sc = match axis {
                    ScaleAxis::K => s[(kk / QK) * lds + j],
                    ScaleAxis::N => s[kk * lds + j / QK],
                };
                c[i * ldc + j] += av * (decode(ty, b[kk * ldb + j]) * sc);
            }
        }
    }
}

/// The bounds every `gemm_q8b` implementation checks before touching memory.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_q8b(
    axis: ScaleAxis,
    m: usize,
    n: usize,
    k: usize,
    a_len: usize,
    lda: usize,
    b_len: usize,
    ldb: usize,
    s_len: usize,
    lds: usize,
    c_len: usize,
    ldc: usize,
) {
    crate::attn::check_gemm(m, n, k, a_len, lda, b_len, ldb, c_len, ldc);
    let need = match axis {
        ScaleAxis::K if k > 0 && n > 0 => (k - 1) / QK * lds + n,
        ScaleAxis::N if k > 0 && n > 0 => (k - 1) * lds + (n - 1) / QK + 1,
        _ => 0,
    };
    assert!(s_len >= need, "gemm_q8b: scales too short");
    match axis {
        ScaleAxis::K => assert!(lds >= n, "gemm_q8b: scale stride too small"),
        ScaleAxis::N => assert!(lds >= n.div_ceil(QK), "gemm_q8b: scale stride too small"),
    }
}

/// The scalar kernels of the table.
#[allow(clippy::too_many_arguments)]
pub(crate) mod scalar {
    use super::{gemm_q8b, KvType, ScaleAxis};

    macro_rules! fixed {
        ($name:ident, $ty:expr, $axis:expr) => {
            pub fn $name(
                m: usize,
                n: usize,
                k: usize,
                a: &[f32],
                lda: usize,
                b: &[u8],
                ldb: usize,
                s: &[f32],
                lds: usize,
                c: &mut [f32],
                ldc: usize,
            ) {
                gemm_q8b($ty, $axis, m, n, k, a, lda, b, ldb, s, lds, c, ldc)
            }
        };
    }
    fixed!(gemm_q8_0_k, KvType::Q8_0, ScaleAxis::K);
    fixed!(gemm_q8_0_n, KvType::Q8_0, ScaleAxis::N);
    fixed!(gemm_fp8_k, KvType::Fp8, ScaleAxis::K);
    fixed!(gemm_fp8_n, KvType::Fp8, ScaleAxis::N);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Kernels;
    use crate::quant::tests::Rng;

    #[test]
    fn fp8_round_trips_every_code_and_rounds_to_nearest() {
        for c in 0..=255u8 {
            if c & 0x7F == 0x7F {
                continue;
            }
            let v = fp8_to_f32(c);
            let back = fp8_from_f32(v);
            // +0 and -0 both read as 0
            if v == 0.0 {
                assert_eq!(back & 0x7F, 0);
            } else {
                assert_eq!(back, c, "code {c:#04x} = {v}");
            }
        }
        assert_eq!(fp8_to_f32(0x7E), 448.0);
        assert_eq!(fp8_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(fp8_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(fp8_from_f32(1e9), 0x7E);
        assert_eq!(fp8_from_f32(-1e9), 0xFE);
        assert_eq!(fp8_from_f32(f32::NAN), 0);
        // nearest: every value decodes to a code within half a step
        let mut rng = Rng::new(5);
        for _ in 0..10_000 {
            let x = (rng.f32() - 0.5) * 900.0 * rng.f32().powi(6);
            let y = fp8_to_f32(fp8_from_f32(x));
            let step = if x.abs() < 2f32.powi(-6) {
                2f32.powi(-9)
            } else {
                2f32.powi(x.abs().log2().floor() as i32 - 3)
            };
            assert!(
                (x.clamp(-448.0, 448.0) - y).abs() <= step / 2.0 + 1e-12,
                "{x} -> {y}"
            );
        }
    }

    #[test]
    fn q8_0_groups_match_llama_cpp_rounding_and_fp8_keeps_relative_error_small() {
        let mut rng = Rng::new(6);
        let x: Vec<f32> = (0..QK).map(|_| (rng.f32() - 0.5) * 3.0).collect();
        let mut codes = vec![0u8; QK * 3];
        let d = quantize_group(KvType::Q8_0, &x, &mut codes, 3);
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(d, f16::from_f32(amax / 127.0).to_f32());
        for (i, &v) in x.iter().enumerate() {
            let q = codes[i * 3] as i8;
            assert_eq!(
                q as i32,
                ((v * (127.0 / amax)).round() as i32).clamp(-127, 127)
            );
            assert!((q as f32 * d - v).abs() <= d * 0.51 + amax * 1e-3);
        }
        let d = quantize_group(KvType::Fp8, &x, &mut codes, 1);
        for (i, &v) in x.iter().enumerate() {
            let y = fp8_to_f32(codes[i]) * d;
            assert!(
                (y - v).abs() <= v.abs() / 16.0 + d * 2f32.powi(-9),
                "{v} -> {y}"
            );
        }
        let zeros = [0.0f32; QK];
        assert_eq!(quantize_group(KvType::Fp8, &zeros, &mut codes, 1), 0.0);
    }

    #[test]
    fn gemm_q8b_kernels_match_the_reference_at_every_shape() {
        let mut rng = Rng::new(14);
        for kern in Kernels::all_variants() {
            for (ty, axis, f) in [
                (KvType::Q8_0, ScaleAxis::K, kern.gemm_q8_0_k),
                (KvType::Q8_0, ScaleAxis::N, kern.gemm_q8_0_n),
                (KvType::Fp8, ScaleAxis::K, kern.gemm_fp8_k),
                (KvType::Fp8, ScaleAxis::N, kern.gemm_fp8_n),
            ] {
                for &(m, n, k) in &[
                    (1usize, 64usize, 64usize),
                    (3, 64, 64),
                    (7, 64, 128),
                    (13, 64, 32),
                    (64, 64, 256),
                    (5, 96, 64),
                    (2, 256, 64),
                    (4, 37, 33),
                    (9, 8, 5),
                ] {
                    let (lda, ldb, ldc) = (k + 3, n + 5, n + 1);
                    let lds = match axis {
                        ScaleAxis::K => n + 2,
                        ScaleAxis::N => n.div_ceil(QK) + 1,
                    };
                    let s_rows = match axis {
                        ScaleAxis::K => k.div_ceil(QK),
                        ScaleAxis::N => k,
                    };
                    let a: Vec<f32> = (0..m * lda).map(|_| rng.f32() - 0.5).collect();
                    let b: Vec<u8> = (0..k * ldb)
                        .map(|_| {
                            let c = (rng.f32() * 256.0) as u8;
                            if ty == KvType::Fp8 && c & 0x7F == 0x7F {
                                0x7E
                            } else {
                                c
                            }
                        })
                        .collect();
                    let s: Vec<f32> = (0..s_rows * lds).map(|_| rng.f32() * 0.02).collect();
                    let c0: Vec<f32> = (0..m * ldc).map(|_| rng.f32()).collect();
                    let mut want = c0.clone();
                    gemm_q8b(ty, axis, m, n, k, &a, lda, &b, ldb, &s, lds, &mut want, ldc);
                    let mut got = c0.clone();
                    f(m, n, k, &a, lda, &b, ldb, &s, lds, &mut got, ldc);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        if i % ldc >= n {
                            assert_eq!(g, w, "{} wrote outside the matrix", kern.name);
                        }
                        assert!(
                            (g - w).abs() <= 2e-4 * (1.0 + w.abs()),
                            "{} {ty} {axis:?} m={m} n={n} k={k} at {i}: {g} vs {w}",
                            kern.name
                        );
                    }
                }
            }
        }
    }
}
