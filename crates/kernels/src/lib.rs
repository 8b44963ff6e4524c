//! capy's compute kernels.
//!
//! * [`blocks`]: the ggml block formats with size asserts.
//! * [`quant`]: scalar reference kernels (dequantize, quantize, dot products). They are the
//!   definition of each format; SIMD paths are tested against them.
//! * `x86`: AVX2 and AVX-512 paths as `#[target_feature]` functions.
//! * `aarch64`: NEON paths, with `sdot` (dotprod) and `usmmla` (i8mm) where the CPU has them.
//! * [`dispatch`]: CPU detection, once, filling a table of function pointers; `CAPY_ISA`
//!   overrides the choice.
//! * [`matmul`]: quantized matrix x activations over the thread pool, activations quantized
//!   once per call and shared by all rows.
//! * [`repack`]: weights repacked at load into row-interleaved blocks (SIMD lanes = rows).
//! * [`attn`]: flash attention over f16 KV tiles (online softmax).
//! * [`ops`]: RMSNorm, softmax, RoPE, gated activations.
//! * [`pool`]: the fork-join thread pool.
//!
//! This is the only crate with SIMD and most of the project's `unsafe`; every `unsafe` block
//! carries a `SAFETY:` comment.

#[cfg(target_arch = "aarch64")]
mod aarch64;
pub mod attn;
pub mod blocks;
pub mod dispatch;
pub mod kvquant;
pub mod lut;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod quant;
pub mod repack;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use capy_gguf::GgmlType;
pub use dispatch::{kernels, Isa, Kernels};
pub use matmul::{dequantize_row, matmul, WeightRef};
pub use pool::ThreadPool;

/// Kernel-level errors (shape and type mismatches caught before any work is done).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: tensor type {ty} is not supported")]
    Unsupported { op: &'static str, ty: GgmlType },
    #[error("{op}: shape mismatch: expected {expected}, got {got}")]
    Shape {
        op: &'static str,
        expected: String,
        got: String,
    },
    #[error("{op}: tensor data is not aligned for {ty} blocks")]
    Misaligned { op: &'static str, ty: GgmlType },
    #[error("unknown CAPY_ISA value {0:?} (expected scalar, avx2, avx2+vnni, avx512 or neon)")]
    BadIsa(String),
    #[error("CAPY_ISA={0} is not supported by this CPU")]
    IsaUnavailable(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
