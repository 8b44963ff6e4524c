//! Model quantization (`capy quantize`): rewrites a GGUF with its weight matrices in another
//! type, choosing each tensor's type as `llama-quantize` does for the same file type.
//!
//! Which tensors are quantized, and the per-tensor rules of the mixes (`Q4_K_M` keeping
//! `attn_v` and `ffn_down` of some layers in Q6_K, the output matrix in Q6_K, fallbacks for
//! rows a 256-wide block does not divide), follow llama.cpp's `llama-quant.cpp`
//! (`llama_tensor_get_type`, build b11312), so a file made here matches one made by
//! `llama-quantize` tensor for tensor. Without an importance matrix, as llama-quantize
//! without `--imatrix`. Every tensor is read as f32 (dequantized when it is stored
//! quantized) and written in its new type; a tensor that keeps its type is copied as is.

use std::path::Path;

use capy_gguf::{GgmlType, Gguf, GgufWriter, TensorInfo, Value};
use capy_kernels::blocks::{as_bytes, zeroed, Pod};
use capy_kernels::quant::quantize as q;

use crate::{Error, Result};

/// File types `capy quantize` writes: llama.cpp's `llama_ftype` values and names.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
    TQ1_0,
    TQ2_0,
}

impl FileType {
    pub const ALL: [FileType; 19] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q8_0,
        FileType::Q2_K,
        FileType::Q3_K_S,
        FileType::Q3_K_M,
        FileType::Q3_K_L,
        FileType::Q4_K_S,
        FileType::Q4_K_M,
        FileType::Q5_K_S,
        FileType::Q5_K_M,
        FileType::Q6_K,
        FileType::TQ1_0,
        FileType::TQ2_0,
    ];

    /// llama-quantize's name (`Q4_K_M`).
    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "F32",
            FileType::F16 => "F16",
            FileType::BF16 => "BF16",
            FileType::Q4_0 => "Q4_0",
            FileType::Q4_1 => "Q4_1",
            FileType::Q5_0 => "Q5_0",
            FileType::Q5_1 => "Q5_1",
            FileType::Q8_0 => "Q8_0",
            FileType::Q2_K => "Q2_K",
            FileType::Q3_K_S => "Q3_K_S",
            FileType::Q3_K_M => "Q3_K_M",
            FileType::Q3_K_L => "Q3_K_L",
            FileType::Q4_K_S => "Q4_K_S",
            FileType::Q4_K_M => "Q4_K_M",
            FileType::Q5_K_S => "Q5_K_S",
            FileType::Q5_K_M => "Q5_K_M",
            FileType::Q6_K => "Q6_K",
            FileType::TQ1_0 => "TQ1_0",
            FileType::TQ2_0 => "TQ2_0",
        }
    }

    /// Parses a name, case-insensitively; `Q3_K`, `Q4_K` and `Q5_K` are the `_M` mixes, as
    /// in llama-quantize.
    pub fn parse(s: &str) -> Option<FileType> {
        let u = s.trim().to_ascii_uppercase();
        let u = match u.as_str() {
            "Q3_K" => "Q3_K_M",
            "Q4_K" => "Q4_K_M",
            "Q5_K" => "Q5_K_M",
            other => other,
        };
        FileType::ALL.into_iter().find(|t| t.name() == u)
    }

    /// `general.file_type`'s value (llama.cpp's `llama_ftype`).
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q2_K => 10,
            FileType::Q3_K_S => 11,
            FileType::Q3_K_M => 12,
            FileType::Q3_K_L => 13,
            FileType::Q4_K_S => 14,
            FileType::Q4_K_M => 15,
            FileType::Q5_K_S => 16,
            FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
            FileType::BF16 => 32,
            FileType::TQ1_0 => 36,
            FileType::TQ2_0 => 37,
        }
    }

    /// The type of most weight matrices.
    pub fn default_type(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q5_0 => GgmlType::Q5_0,
            FileType::Q5_1 => GgmlType::Q5_1,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q2_K => GgmlType::Q2_K,
            FileType::Q3_K_S | FileType::Q3_K_M | FileType::Q3_K_L => GgmlType::Q3_K,
            FileType::Q4_K_S | FileType::Q4_K_M => GgmlType::Q4_K,
            FileType::Q5_K_S | FileType::Q5_K_M => GgmlType::Q5_K,
            FileType::Q6_K => GgmlType::Q6_K,
            FileType::TQ1_0 => GgmlType::TQ1_0,
            FileType::TQ2_0 => GgmlType::TQ2_0,
        }
    }

    fn is_float(self) -> bool {
        matches!(self, FileType::F32 | FileType::F16 | FileType::BF16)
    }
}

/// What a tensor is, for the mixes' rules (llama.cpp's `tensor_category`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnKvB,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

impl Category {
    fn of(name: &str) -> Category {
        let has = |s: &str| name.contains(s);
        if name == "output.weight" {
            Category::Output
        } else if name == "token_embd.weight" {
            Category::TokenEmbd
        } else if has("attn_qkv.weight") {
            Category::AttnQkv
        } else if has("attn_kv_b.weight") {
            Category::AttnKvB
        } else if has("attn_v.weight") {
            Category::AttnV
        } else if has("attn_k.weight") {
            Category::AttnK
        } else if has("attn_q.weight") {
            Category::AttnQ
        } else if has("attn_output.weight") {
            Category::AttnOutput
        } else if has("ffn_up") {
            Category::FfnUp
        } else if has("ffn_gate") {
            Category::FfnGate
        } else if has("ffn_down") {
            Category::FfnDown
        } else {
            Category::Other
        }
    }

    fn is_attn_v(self) -> bool {
        matches!(
            self,
            Category::AttnV | Category::AttnQkv | Category::AttnKvB
        )
    }
}

/// Whether llama-quantize quantizes this tensor at all: 2-D (or more) tensors named
/// `*weight`, except norms, expert gates, position and token-type embeddings.
fn allows_quantization(t: &TensorInfo) -> bool {
    let n = &t.name;
    t.dims.iter().filter(|&&d| d > 1).count() >= 2
        && n.ends_with("weight")
        && !n.contains("_norm.weight")
        && !n.contains("ffn_gate_inp.weight")
        && n != "position_embd.weight"
        && n != "token_types.weight"
        && !n.contains("attn_rel_b.weight")
        && !n.contains("ssm_conv1d")
}

/// Counters the mixes' layer rules walk through, in file order.
struct Mix {
    ft: FileType,
    n_attention_wv: usize,
    i_attention_wv: usize,
    n_ffn_down: usize,
    i_ffn_down: usize,
    tied_embeddings: bool,
    n_gqa: usize,
    /// tensors whose row length a block did not divide, so they took a fallback type
    pub n_fallback: usize,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third in
/// between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

impl Mix {
    fn new(ft: FileType, g: &Gguf) -> Mix {
        let arch = g
            .get_str("general.architecture")
            .ok()
            .flatten()
            .unwrap_or("llama")
            .to_string();
        let key = |k: &str| g.get_usize(&format!("{arch}.{k}")).ok().flatten();
        let n_layer = key("block_count").unwrap_or(0);
        let n_head = key("attention.head_count").unwrap_or(1);
        let n_head_kv = key("attention.head_count_kv").unwrap_or(n_head).max(1);
        let cats: Vec<Category> = g.tensors().iter().map(|t| Category::of(&t.name)).collect();
        Mix {
            ft,
            n_attention_wv: cats.iter().filter(|c| c.is_attn_v()).count(),
            i_attention_wv: 0,
            n_ffn_down: n_layer,
            i_ffn_down: 0,
            tied_embeddings: !cats.contains(&Category::Output),
            n_gqa: n_head / n_head_kv,
            n_fallback: 0,
        }
    }

    /// The type tensor `t` gets (llama.cpp's `llama_tensor_get_type`).
    fn tensor_type(&mut self, t: &TensorInfo) -> GgmlType {
        if !allows_quantization(t) {
            return t.ty;
        }
        let default = self.ft.default_type();
        if self.ft.is_float() {
            return default;
        }
        let ty = self.mix_rule(t, default);
        let cols = t.dims[0] as usize;
        if cols.is_multiple_of(ty.block_size()) {
            return ty;
        }
        self.n_fallback += 1;
        let fallback = match ty {
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::TQ1_0 | GgmlType::TQ2_0 => GgmlType::Q4_0,
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            other => other,
        };
        if cols.is_multiple_of(fallback.block_size()) {
            fallback
        } else {
            GgmlType::F16
        }
    }

    /// The mixes' per-tensor rules (llama.cpp's `llama_tensor_get_type_impl`, for the file
    /// types capy writes and the dense architectures it runs).
    fn mix_rule(&mut self, t: &TensorInfo, mut ty: GgmlType) -> GgmlType {
        use FileType as F;
        use GgmlType as G;
        let ft = self.ft;
        let cat = Category::of(&t.name);
        if cat == Category::Output || (self.tied_embeddings && cat == Category::TokenEmbd) {
            if !(t.dims[0] as usize).is_multiple_of(ty.block_size()) {
                ty = G::Q8_0;
            } else if ty != G::Q8_0 {
                ty = G::Q6_K;
            }
        } else if cat == Category::TokenEmbd {
            // an untied embedding: the file type's default, Q4_K for the ternary types
            if matches!(ft, F::TQ1_0 | F::TQ2_0) {
                ty = G::Q4_K;
            }
        } else if cat.is_attn_v() {
            let i = self.i_attention_wv;
            match ft {
                F::Q2_K => ty = if self.n_gqa >= 4 { G::Q4_K } else { G::Q3_K },
                F::Q3_K_M => ty = if i < 2 { G::Q5_K } else { G::Q4_K },
                F::Q3_K_L => ty = G::Q5_K,
                F::Q4_K_M | F::Q5_K_M if use_more_bits(i, self.n_attention_wv) => ty = G::Q6_K,
                F::Q4_K_S if i < 4 => ty = G::Q5_K,
                _ => {}
            }
            self.i_attention_wv += 1;
        } else if cat == Category::FfnDown {
            let (i, n) = (self.i_ffn_down, self.n_ffn_down);
            match ft {
                F::Q2_K => ty = G::Q3_K,
                F::Q3_K_M => ty = if i < n / 16 { G::Q5_K } else { G::Q4_K },
                F::Q3_K_L => ty = G::Q5_K,
                F::Q4_K_M | F::Q5_K_M if use_more_bits(i, n) => ty = G::Q6_K,
                F::Q4_K_S if i < n / 8 => ty = G::Q5_K,
                _ => {}
            }
            self.i_ffn_down += 1;
        } else if cat == Category::AttnOutput {
            match ft {
                F::Q2_K => ty = G::Q3_K,
                F::Q3_K_M => ty = G::Q4_K,
                F::Q3_K_L => ty = G::Q5_K,
                _ => {}
            }
        } else if cat == Category::AttnQkv {
            match ft {
                F::Q3_K_M | F::Q3_K_L => ty = G::Q4_K,
                F::Q4_K_M => ty = G::Q5_K,
                F::Q5_K_M => ty = G::Q6_K,
                _ => {}
            }
        }
        ty
    }
}

/// One tensor's rows in f32: `[n_rows, n_cols]`.
///
/// # Errors
/// A value that is not finite (a corrupt input: its quantized blocks would carry it on, as
/// llama-quantize's validation of the data refuses).
fn to_f32(t: &TensorInfo, data: &[u8]) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; t.n_elements() as usize];
    capy_kernels::matmul::dequantize(t.ty, data, &mut out)?;
    if let Some(&value) = out.iter().find(|v| !v.is_finite()) {
        return Err(crate::Error::NonFinite {
            tensor: t.name.clone(),
            value,
        });
    }
    Ok(out)
}

fn blocks<B: Pod>(x: &[f32], bs: usize, f: fn(&[f32], &mut [B])) -> Vec<u8> {
    let mut b = vec![zeroed::<B>(); x.len() / bs];
    f(x, &mut b);
    as_bytes(&b).to_vec()
}

/// `x` (whole rows, a multiple of `ty`'s block) in type `ty`.
///
/// # Errors
/// A type capy cannot write.
pub fn quantize_to(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    use capy_kernels::blocks::*;
    use half::{bf16, f16};
    Ok(match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => x
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::Q4_0 => blocks::<BlockQ4_0>(x, 32, q::quantize_q4_0),
        GgmlType::Q4_1 => blocks::<BlockQ4_1>(x, 32, q::quantize_q4_1),
        GgmlType::Q5_0 => blocks::<BlockQ5_0>(x, 32, q::quantize_q5_0),
        GgmlType::Q5_1 => blocks::<BlockQ5_1>(x, 32, q::quantize_q5_1),
        GgmlType::Q8_0 => blocks::<BlockQ8_0>(x, 32, q::quantize_q8_0_ref),
        GgmlType::Q2_K => blocks::<BlockQ2K>(x, 256, q::quantize_q2k),
        GgmlType::Q3_K => blocks::<BlockQ3K>(x, 256, q::quantize_q3k),
        GgmlType::Q4_K => blocks::<BlockQ4K>(x, 256, q::quantize_q4k),
        GgmlType::Q5_K => blocks::<BlockQ5K>(x, 256, q::quantize_q5k),
        GgmlType::Q6_K => blocks::<BlockQ6K>(x, 256, q::quantize_q6k),
        GgmlType::TQ1_0 => blocks::<BlockTQ1_0>(x, 256, q::quantize_tq1_0),
        GgmlType::TQ2_0 => blocks::<BlockTQ2_0>(x, 256, q::quantize_tq2_0),
        other => {
            return Err(Error::Kernel(capy_kernels::Error::Unsupported {
                op: "quantize",
                ty: other,
            }))
        }
    })
}

/// One tensor of a quantization plan.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub from: GgmlType,
    pub to: GgmlType,
}

/// The tensors of `g` in llama.cpp's order: tensors outside the blocks first, then block by
/// block (`blk.N.`), by name within each (its loader's `weight_name_comparer`). The mixes'
/// layer counters walk this order, and the output file keeps it.
fn ordered(g: &Gguf) -> Vec<&TensorInfo> {
    let layer = |n: &str| -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|d| d.parse().ok())
            .unwrap_or(-1)
    };
    let mut v: Vec<&TensorInfo> = g.tensors().iter().collect();
    v.sort_by(|a, b| {
        layer(&a.name)
            .cmp(&layer(&b.name))
            .then_with(|| a.name.cmp(&b.name))
    });
    v
}

/// The types each tensor of `g` gets under `ft`, in the output's order ([`ordered`]), and
/// how many tensors took a fallback type.
pub fn plan(g: &Gguf, ft: FileType) -> (Vec<PlannedTensor>, usize) {
    let mut mix = Mix::new(ft, g);
    let v = ordered(g)
        .into_iter()
        .map(|t| PlannedTensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            from: t.ty,
            to: mix.tensor_type(t),
        })
        .collect();
    (v, mix.n_fallback)
}

/// What [`quantize_file`] did.
#[derive(Clone, Debug, Default)]
pub struct QuantizeReport {
    pub n_tensors: usize,
    /// Tensors whose rows a 256-wide block did not divide, written in a fallback type.
    pub n_fallback: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Writes `input` to `output` with its weights in `ft` (see the module docs), using
/// `n_threads` threads; `progress(done_bytes, total_bytes, tensor_name)` after each tensor.
/// Metadata is carried over with `general.file_type` and `general.quantization_version`
/// set.
///
/// # Errors
/// An unreadable or malformed input, a tensor type capy cannot read, or a failed write.
pub fn quantize_file(
    input: &Path,
    output: &Path,
    ft: FileType,
    n_threads: usize,
    progress: &mut dyn FnMut(u64, u64, &str),
) -> Result<QuantizeReport> {
    let g = Gguf::open(input)?;
    let (plan, n_fallback) = plan(&g, ft);
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata() {
        w.add_metadata(k, v.clone());
    }
    w.add_metadata("general.quantization_version", Value::U32(2));
    w.add_metadata("general.file_type", Value::U32(ft.id()));
    let total: u64 = g.tensors().iter().map(|t| t.n_bytes).sum();
    let mut done = 0u64;
    let mut bytes_out = 0u64;
    for (t, p) in ordered(&g).into_iter().zip(&plan) {
        let data = g.tensor_data(t);
        let out = if p.to == t.ty {
            data.to_vec()
        } else {
            let x = to_f32(t, data)?;
            quantize_rows(p.to, &x, t.dims[0] as usize, n_threads)?
        };
        bytes_out += out.len() as u64;
        w.add_tensor(&t.name, p.to, &t.dims, out)?;
        done += t.n_bytes;
        progress(done, total, &t.name);
    }
    w.write_file(output)?;
    Ok(QuantizeReport {
        n_tensors: plan.len(),
        n_fallback,
        bytes_in: total,
        bytes_out,
    })
}

/// Quantizes whole rows of `n_cols` on `n_threads` threads (rows split evenly).
fn quantize_rows(ty: GgmlType, x: &[f32], n_cols: usize, n_threads: usize) -> Result<Vec<u8>> {
    let n_rows = x.len() / n_cols.max(1);
    let n_threads = n_threads.clamp(1, n_rows.max(1));
    if n_threads == 1 || n_rows * n_cols < 1 << 16 {
        return quantize_to(ty, x);
    }
    let per = n_rows.div_ceil(n_threads);
    let parts: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = x
            .chunks(per * n_cols)
            .map(|c| s.spawn(move || quantize_to(ty, c)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::BadHparams("a quantize thread failed".into())))
            })
            .collect()
    });
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&p?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_as_llama_quantize_spells_them() {
        assert_eq!(FileType::parse("q4_k_m"), Some(FileType::Q4_K_M));
        assert_eq!(FileType::parse("Q4_K"), Some(FileType::Q4_K_M));
        assert_eq!(FileType::parse("f16"), Some(FileType::F16));
        assert_eq!(FileType::parse("Q7_K"), None);
        for t in FileType::ALL {
            assert_eq!(FileType::parse(t.name()), Some(t));
        }
    }

    #[test]
    fn more_bits_layers_match_llama_cpp() {
        // 30 layers (SmolLM2-135M): the first 3, the last 4, and every third between
        let picked: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(picked, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    }
}
