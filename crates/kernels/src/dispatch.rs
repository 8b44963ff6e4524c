//! Run-time kernel selection.
//!
//! The CPU is probed once; the best instruction set's function pointers fill a [`Kernels`]
//! table kept in a `OnceLock`. `CAPY_ISA=scalar|avx2|avx2+vnni|avx512|neon` forces a choice
//! (for bug reports and tests; case does not matter, `avx512+vnni` is `avx512`, which uses
//! VNNI wherever the CPU has it, as `neon` uses the best NEON level); asking for one the CPU
//! lacks falls back to the best available, with a warning on stderr.

use std::sync::OnceLock;

use half::{bf16, f16};

use crate::blocks::*;
use crate::quant::{dot, quantize};

/// An instruction-set level with its own kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 with FMA and F16C: what every x86-64 CPU since Haswell and Zen 1 runs. No
    /// AVX-512 or VNNI instruction anywhere in its table.
    Avx2,
    /// [`Isa::Avx2`] plus AVX-VNNI (the VEX `vpdpbusd` of Intel's client cores since Alder
    /// Lake, and of Zen 5) for the repacked-weight kernel.
    AvxVnni,
    Avx512,
    Neon,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avx2+vnni",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    pub fn parse(s: &str) -> crate::Result<Isa> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Isa::Scalar,
            "avx2" => Isa::Avx2,
            "avx2+vnni" | "avxvnni" | "avx-vnni" => Isa::AvxVnni,
            // AVX-512 takes VNNI wherever the CPU has it; the name of the level it shows
            "avx512" | "avx512+vnni" => Isa::Avx512,
            "neon" => Isa::Neon,
            _ => return Err(crate::Error::BadIsa(s.to_string())),
        })
    }

    /// Whether this CPU can run the level's kernels.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => Isa::Avx2.available() && is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => crate::aarch64::neon_available(),
            _ => false,
        }
    }

    /// Every level this CPU can run, best last.
    pub fn all_available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512, Isa::Neon]
            .into_iter()
            .filter(|i| i.available())
            .collect()
    }

    /// The best level this CPU can run.
    pub fn best() -> Isa {
        *Isa::all_available().last().unwrap_or(&Isa::Scalar)
    }
}

pub type DotFn<W, A> = fn(&[W], &[A]) -> f32;
pub type QuantizeFn<B> = fn(&[f32], &mut [B]);
pub type AxpyF16Fn = fn(&mut [f32], f32, &[f16]);
/// `c[m, n] += a[m, k] · b[k, n]` with an f16 `b`: `(m, n, k, a, lda, b, ldb, c, ldc)`.
pub type GemmF16bFn = fn(usize, usize, usize, &[f32], usize, &[f16], usize, &mut [f32], usize);
/// `(m, n, k, a, lda, b, ldb, s, lds, c, ldc)`: [`crate::kvquant::gemm_q8b`] for one format
/// and scale axis.
pub type GemmQ8bFn =
    fn(usize, usize, usize, &[f32], usize, &[u8], usize, &[f32], usize, &mut [f32], usize);
pub type GatedFn = fn(&mut [f32], &[f32]);
/// `(x, cos, sin, n_dims, neox)`: one head rotated in place, as [`crate::ops::rope`].
pub type RopeFn = fn(&mut [f32], &[f32], &[f32], usize, bool);
pub type RmsNormFn = fn(&mut [f32], &[f32], f32);
/// `x = exp(x - sub)`, returning the sum.
pub type ExpSumFn = fn(&mut [f32], f32) -> f32;
/// One group of sixteen repacked rows (`nb` blocks) against up to `R16_TOKENS` activation rows
/// (`n_act` of `acts` are used): `out[t][r]` for token t and row r.
pub type R16GemmFn = fn(
    crate::repack::R16Kind,
    &[u8],
    usize,
    [&[crate::repack::BlockQ8x]; crate::repack::R16_TOKENS],
    usize,
) -> [[f32; crate::repack::R16_ROWS]; crate::repack::R16_TOKENS];
/// Consecutive groups of sixteen repacked rows (`nb` blocks each) against one activation row
/// (decoding): `out[16 g + r]` for group `g` of the groups' bytes and row `r`, for the
/// `out.len() / 16` groups (at most as many as the bytes hold). What [`R16GemmFn`] computes
/// for one token, without a call and a result array per group.
pub type R16GemvFn =
    fn(crate::repack::R16Kind, &[u8], usize, &[crate::repack::BlockQ8x], &mut [f32]);
/// The ternary kind's prompt kernel: one group of sixteen repacked rows (`nb` blocks)
/// against tiles of eight tokens' activations ([`crate::repack::t2_tile`], tile after tile
/// in the third argument): `out[8 i + t][r]` for tile `i`, its token `t` and row `r`, for
/// `out.len() / 8` tiles (rows past the tiles given, or past a multiple of eight, are left
/// as they are). What [`R16GemmFn`] computes for the tiles' tokens.
pub type R16T2TilesFn = fn(&[u8], usize, &[u8], &mut [[f32; crate::repack::R16_ROWS]]);
/// A level's prompt-processing form of the repacked-weight kernel: `unpack` expands one
/// group (`nb` blocks) into `dst` once (values one byte each, per-block scales as f32, in a
/// layout of the level's own) and returns the blocks unpacked; `gemm` then runs up to
/// `R16_TOKENS` activation rows at a time against it, computing what
/// [`R16GemmFn`] computes on the packed group (the same scalar reference defines both).
/// A prompt's tokens share one unpacking instead of unpacking every block per eight tokens.
#[derive(Clone, Copy)]
pub struct R16Unpacked {
    /// The kinds for which this form is the faster one (it trades unpacking work for loads;
    /// `r16_bench` measures both). Every kind is supported and tested.
    pub kinds: &'static [crate::repack::R16Kind],
    pub unpack: fn(crate::repack::R16Kind, &[u8], usize, &mut crate::blocks::AlignedBuf) -> usize,
    /// [`R16GemmFn`]'s arguments, with the unpacked group in place of the packed one.
    pub gemm: R16GemmFn,
}

/// [`crate::lut`]'s kernel: `(group, n_units, tables, da)`, the sixteen rows of a group
/// against one token's tables.
pub type LutGemvFn = fn(&[u8], usize, &[u8], &[f32]) -> [f32; crate::lut::LUT_ROWS];

/// One weight row against four activation rows at once (the weight is unpacked once).
/// Its definition is four calls of the matching [`DotFn`].
pub type Dot4Fn<W, A> = fn(&[W], [&[A]; 4]) -> [f32; 4];

/// The kernels of one instruction-set level.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub isa: Isa,
    /// The level with its optional features, e.g. `avx512+vnni`, `neon+dotprod+i8mm`.
    pub name: &'static str,
    pub dot_q4_0: DotFn<BlockQ4_0, BlockQ8_0>,
    pub dot_q4_1: DotFn<BlockQ4_1, BlockQ8_1>,
    pub dot_q5_0: DotFn<BlockQ5_0, BlockQ8_0>,
    pub dot_q5_1: DotFn<BlockQ5_1, BlockQ8_1>,
    pub dot_q8_0: DotFn<BlockQ8_0, BlockQ8_0>,
    pub dot_q2k: DotFn<BlockQ2K, BlockQ8K>,
    pub dot_q3k: DotFn<BlockQ3K, BlockQ8K>,
    pub dot_q4k: DotFn<BlockQ4K, BlockQ8K>,
    pub dot_q5k: DotFn<BlockQ5K, BlockQ8K>,
    pub dot_q6k: DotFn<BlockQ6K, BlockQ8K>,
    pub dot_tq1_0: DotFn<BlockTQ1_0, BlockQ8K>,
    pub dot_tq2_0: DotFn<BlockTQ2_0, BlockQ8K>,
    pub dot_f32: DotFn<f32, f32>,
    pub dot_f16: DotFn<f16, f32>,
    pub dot_bf16: DotFn<bf16, f32>,
    /// Multi-token kernels where an ISA has them; `None` means "loop over `dot_*`".
    pub dot4_q4_1: Option<Dot4Fn<BlockQ4_1, BlockQ8_1>>,
    pub dot4_q5_0: Option<Dot4Fn<BlockQ5_0, BlockQ8_0>>,
    pub dot4_q8_0: Option<Dot4Fn<BlockQ8_0, BlockQ8_0>>,
    pub dot4_q4k: Option<Dot4Fn<BlockQ4K, BlockQ8K>>,
    pub dot4_q6k: Option<Dot4Fn<BlockQ6K, BlockQ8K>>,
    /// Float weights, four tokens per pass over a row; each token's result is bit for bit
    /// the table's `dot_f32` / `dot_f16` (so batch size never changes a token's logits).
    pub dot4_f32: Option<Dot4Fn<f32, f32>>,
    pub dot4_f16: Option<Dot4Fn<f16, f32>>,
    pub axpy_f16: AxpyF16Fn,
    pub gemm_f16b: GemmF16bFn,
    /// The attention products over an 8-bit cache: keys (scales along `k`) and values
    /// (scales along `n`), for `q8_0` and `fp8`.
    pub gemm_q8_0_k: GemmQ8bFn,
    pub gemm_q8_0_n: GemmQ8bFn,
    pub gemm_fp8_k: GemmQ8bFn,
    pub gemm_fp8_n: GemmQ8bFn,
    pub exp_sum: ExpSumFn,
    /// `gate = act(gate) * up`
    pub silu_mul: GatedFn,
    pub gelu_mul: GatedFn,
    /// in place, `x = x / rms(x) * w` (`w` empty: no weight)
    pub rms_norm: RmsNormFn,
    pub rope: RopeFn,
    pub quantize_q8x: QuantizeFn<crate::repack::BlockQ8x>,
    /// [`crate::repack::quantize_q8x_k`]: activations for the ternary kind.
    pub quantize_q8x_k: QuantizeFn<crate::repack::BlockQ8x>,
    /// The ternary lookup-table kernel ([`crate::lut`]).
    pub lut_gemv: LutGemvFn,
    pub r16_gemm: R16GemmFn,
    /// The one-token form of `r16_gemm` over many groups, where a level has one (else
    /// `r16_gemm` is called per group).
    pub r16_gemv: Option<R16GemvFn>,
    /// The unpack-once form for many activation rows, where a level has one.
    pub r16_unpacked: Option<R16Unpacked>,
    /// The ternary kind's prompt kernel over eight-token tiles, where a level has one.
    pub r16_t2_tiles: Option<R16T2TilesFn>,
    /// Whether this level has a fast `r16_gemm` (models repack their weights only then).
    pub r16_preferred: bool,
    pub quantize_q8_0: QuantizeFn<BlockQ8_0>,
    pub quantize_q8_1: QuantizeFn<BlockQ8_1>,
    pub quantize_q8k: QuantizeFn<BlockQ8K>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernels({})", self.name)
    }
}

impl Kernels {
    /// The scalar reference kernels.
    pub const SCALAR: Kernels = Kernels {
        isa: Isa::Scalar,
        name: "scalar",
        dot_q4_0: dot::vec_dot_q4_0_q8_0,
        dot_q4_1: dot::vec_dot_q4_1_q8_1,
        dot_q5_0: dot::vec_dot_q5_0_q8_0,
        dot_q5_1: dot::vec_dot_q5_1_q8_1,
        dot_q8_0: dot::vec_dot_q8_0_q8_0,
        dot_q2k: dot::vec_dot_q2k_q8k,
        dot_q3k: dot::vec_dot_q3k_q8k,
        dot_q4k: dot::vec_dot_q4k_q8k,
        dot_q5k: dot::vec_dot_q5k_q8k,
        dot_q6k: dot::vec_dot_q6k_q8k,
        dot_tq1_0: dot::vec_dot_tq1_0_q8k,
        dot_tq2_0: dot::vec_dot_tq2_0_q8k,
        dot_f32: dot::vec_dot_f32,
        dot_f16: dot::vec_dot_f16_f32,
        dot_bf16: dot::vec_dot_bf16_f32,
        dot4_q4_1: None,
        dot4_q5_0: None,
        dot4_q8_0: None,
        dot4_q4k: None,
        dot4_q6k: None,
        dot4_f32: None,
        dot4_f16: None,
        axpy_f16: dot::axpy_f16,
        gemm_f16b: crate::attn::gemm_f16b,
        gemm_q8_0_k: crate::kvquant::scalar::gemm_q8_0_k,
        gemm_q8_0_n: crate::kvquant::scalar::gemm_q8_0_n,
        gemm_fp8_k: crate::kvquant::scalar::gemm_fp8_k,
        gemm_fp8_n: crate::kvquant::scalar::gemm_fp8_n,
        exp_sum: crate::attn::exp_sum,
        silu_mul: crate::ops::silu_mul,
        gelu_mul: crate::ops::gelu_mul,
        rms_norm: crate::ops::rms_norm_inplace,
        rope: crate::ops::rope,
        quantize_q8x: crate::repack::quantize_q8x,
        quantize_q8x_k: crate::repack::quantize_q8x_k,
        lut_gemv: crate::lut::gemv_lut_scalar,
        r16_gemm: crate::repack::gemm_r16_scalar,
        r16_gemv: None,
        r16_unpacked: None,
        r16_t2_tiles: None,
        r16_preferred: false,
        quantize_q8_0: quantize::quantize_q8_0,
        quantize_q8_1: quantize::quantize_q8_1,
        quantize_q8k: quantize::quantize_q8k,
    };

    /// The kernels of `isa`, or `None` if this CPU cannot run them.
    pub fn for_isa(isa: Isa) -> Option<Kernels> {
        if !isa.available() {
            return None;
        }
        match isa {
            Isa::Scalar => Some(Kernels::SCALAR),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(crate::x86::avx2_kernels()),
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => Some(crate::x86::avxvnni_kernels()),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Some(crate::x86::avx512_kernels()),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => Some(crate::aarch64::best_neon_kernels()),
            _ => None,
        }
    }

    /// Every table this CPU can run: each available level and, on aarch64, each NEON
    /// sub-level (plain, dotprod, i8mm), so tests exercise every dispatched path.
    pub fn all_variants() -> Vec<Kernels> {
        let mut out = Vec::new();
        for isa in Isa::all_available() {
            match isa {
                #[cfg(target_arch = "aarch64")]
                Isa::Neon => out.extend(
                    crate::aarch64::levels()
                        .into_iter()
                        .map(crate::aarch64::neon_kernels),
                ),
                _ => out.extend(Kernels::for_isa(isa)),
            }
        }
        out
    }
}

static KERNELS: OnceLock<Kernels> = OnceLock::new();

/// The process-wide kernel table: `CAPY_ISA` if set and available, else the best level.
pub fn kernels() -> &'static Kernels {
    KERNELS.get_or_init(|| {
        let best = Isa::best();
        let isa = match std::env::var("CAPY_ISA") {
            Ok(v) if !v.is_empty() => match Isa::parse(&v) {
                Ok(isa) if isa.available() => isa,
                Ok(isa) => {
                    eprintln!(
                        "capy: CAPY_ISA={} is not supported by this CPU; using {}",
                        isa.name(),
                        best.name()
                    );
                    best
                }
                Err(e) => {
                    eprintln!("capy: {e}; using {}", best.name());
                    best
                }
            },
            Err(std::env::VarError::NotUnicode(v)) => {
                eprintln!(
                    "capy: {}; using {}",
                    crate::Error::BadIsa(v.to_string_lossy().into_owned()),
                    best.name()
                );
                best
            }
            _ => best,
        };
        Kernels::for_isa(isa).unwrap_or(Kernels::SCALAR)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_the_cpu_has_is_a_variant() {
        let names: Vec<&str> = Kernels::all_variants().iter().map(|k| k.name).collect();
        assert_eq!(names.first(), Some(&"scalar"));
        assert_eq!(
            Kernels::for_isa(Isa::best()).unwrap().name,
            *names.last().unwrap()
        );
        #[cfg(target_arch = "aarch64")]
        {
            let dotprod = std::arch::is_aarch64_feature_detected!("dotprod");
            let i8mm = dotprod && std::arch::is_aarch64_feature_detected!("i8mm");
            assert!(names.contains(&"neon"), "{names:?}");
            assert_eq!(names.contains(&"neon+dotprod"), dotprod, "{names:?}");
            assert_eq!(names.contains(&"neon+dotprod+i8mm"), i8mm, "{names:?}");
            assert_eq!(Isa::best(), Isa::Neon);
            // the repacked layout only where the dot-product instructions make it pay
            assert_eq!(Kernels::for_isa(Isa::Neon).unwrap().r16_preferred, dotprod);
            println!("kernel variants on this CPU: {names:?}");
        }
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(names.contains(&"avx2"), Isa::Avx2.available(), "{names:?}");
            let vnni = Isa::Avx2.available() && is_x86_feature_detected!("avxvnni");
            assert_eq!(names.contains(&"avx2+vnni"), vnni, "{names:?}");
            // every x86 SIMD level repacks its weights
            for k in Kernels::all_variants() {
                assert_eq!(k.r16_preferred, k.isa != Isa::Scalar, "{}", k.name);
            }
            println!("kernel variants on this CPU: {names:?}");
        }
    }

    #[test]
    fn isa_names_parse_back() {
        for isa in [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512, Isa::Neon] {
            assert_eq!(Isa::parse(isa.name()).unwrap(), isa);
        }
        assert!(Isa::parse("sve").is_err());
        assert_eq!(Isa::parse(" AVX2+VNNI ").unwrap(), Isa::AvxVnni);
        // the name the AVX-512 level shows with VNNI parses back to it
        assert_eq!(Isa::parse("avx512+vnni").unwrap(), Isa::Avx512);
    }
}
