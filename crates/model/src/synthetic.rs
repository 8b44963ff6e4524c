//! Synthetic models: random weights with real shapes, for tests and benchmarks where no
//! checkpoint of the wanted architecture or size can be downloaded.
//!
//! The tokenizer (every `tokenizer.*` key) and the RoPE base and RMSNorm epsilon come from a
//! real GGUF, so any GGUF engine (capy, llama.cpp, ik_llama.cpp) loads and runs the file; the
//! text is gibberish but the logits are well defined, so engines can be compared on them.
//!
//! Weights are deterministic: each tensor has its own generator seeded from the seed and the
//! tensor's name, so a file's weights do not depend on the other tensors or the file type.
//! - Matrices are either Gaussian (`std`) or *ternary*: a per-tensor scale times values in
//!   {-1, 0, +1} (each with probability 1/3), the form of BitNet b1.58 and TriLM weights,
//!   which TQ1_0 and TQ2_0 hold exactly. The scale is `1 / sqrt(2/3 * n_in)`, so a product
//!   of unit-RMS inputs has unit RMS.
//! - With `scale_tensors` (BitNet only) the matrices hold the bare -1/0/+1 values and the
//!   scale goes to `blk.N.NAME.scale` (one F32 value), which llama.cpp's `bitnet` multiplies
//!   into the product's output.
//! - Norm weights are `1 + N(0, 0.02^2)`; the token embeddings (also the output matrix:
//!   tied) are N(0, (3 / sqrt(n_embd))^2), so logits spread over a few units.

use std::path::Path;

use capy_gguf::{GgmlType, Gguf, GgufWriter, Value};

use crate::{Arch, Error, Result};

/// Shapes and weight kinds of a synthetic model.
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    /// [`Arch::Llama`] or [`Arch::Bitnet`].
    pub arch: Arch,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_ctx: usize,
    pub seed: u64,
    /// Ternary matrices (see the module docs) instead of Gaussian ones.
    pub ternary: bool,
    /// BitNet's per-tensor `.scale` tensors (only with `ternary`).
    pub scale_tensors: bool,
    /// Standard deviation of Gaussian matrices.
    pub std: f32,
    /// Type of the matrices and the token embeddings: F32 or F16 (quantize afterwards).
    pub ty: GgmlType,
}

impl SyntheticSpec {
    /// A BitNet b1.58 2B-class shape (BitNet b1.58 2B4T's: hidden 2560, 30 layers, 20
    /// heads, 5 KV heads, FFN 6912), ternary with scale tensors, F16.
    pub fn bitnet_2b() -> SyntheticSpec {
        SyntheticSpec {
            arch: Arch::Bitnet,
            n_embd: 2560,
            n_layer: 30,
            n_head: 20,
            n_head_kv: 5,
            n_ff: 6912,
            n_ctx: 4096,
            seed: 1234,
            ternary: true,
            scale_tensors: true,
            std: 0.02,
            ty: GgmlType::F16,
        }
    }

    /// Parameters of the matrices and embeddings for a vocabulary of `n_vocab`.
    pub fn n_params(&self, n_vocab: usize) -> u64 {
        let hd = self.n_embd / self.n_head.max(1);
        let kv = self.n_head_kv * hd;
        let per_layer =
            2 * self.n_embd * self.n_embd + 2 * kv * self.n_embd + 3 * self.n_embd * self.n_ff;
        (self.n_layer * per_layer + n_vocab * self.n_embd) as u64
    }
}

/// splitmix64: a small deterministic generator (no dependency, same bits everywhere).
struct Rng(u64);

impl Rng {
    fn for_tensor(seed: u64, name: &str) -> Rng {
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ h)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    /// -1, 0 or +1, each with probability 1/3.
    fn trit(&mut self) -> f32 {
        (self.next_u64() % 3) as f32 - 1.0
    }
}

fn encode(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    crate::quantize::quantize_to(ty, x)
}

/// Writes a synthetic model to `path` with the tokenizer of `vocab_from`; returns the
/// number of parameters.
///
/// # Errors
/// Shapes that do not fit (heads not dividing `n_embd`, an architecture other than llama
/// and bitnet, a type other than F32/F16), a source without a tokenizer, a failed write.
pub fn write_synthetic(spec: &SyntheticSpec, vocab_from: &Gguf, path: &Path) -> Result<u64> {
    let s = spec;
    let bad = |m: String| Err(Error::BadHparams(m));
    if s.n_head == 0
        || s.n_head_kv == 0
        || !s.n_embd.is_multiple_of(s.n_head)
        || !s.n_head.is_multiple_of(s.n_head_kv)
    {
        return bad(format!(
            "n_embd {} / n_head {} / n_head_kv {}",
            s.n_embd, s.n_head, s.n_head_kv
        ));
    }
    if !matches!(s.arch, Arch::Llama | Arch::Bitnet)
        || !matches!(s.ty, GgmlType::F32 | GgmlType::F16)
    {
        return bad(format!("synthetic {} in {}", s.arch.name(), s.ty));
    }
    let n_vocab = match vocab_from.get_array("tokenizer.ggml.tokens")? {
        Some(a) => a.len(),
        None => return Err(Error::MissingKey("tokenizer.ggml.tokens".into())),
    };
    let arch = s.arch.name();
    let src_arch = vocab_from
        .get_str("general.architecture")?
        .unwrap_or("llama");
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String(arch.into()));
    w.add_metadata("general.type", Value::String("model".into()));
    w.add_metadata("general.name", Value::String(format!("synthetic-{arch}")));
    let kind = if s.ternary { "ternary" } else { "Gaussian" };
    w.add_metadata(
        "general.description",
        Value::String(format!(
            "Synthetic {arch} model, {kind} weights (seed {}), for tests and benchmarks; \
             the output is meaningless.",
            s.seed
        )),
    );
    let u32v = |v: usize| Value::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    w.add_metadata(&key("context_length"), u32v(s.n_ctx));
    w.add_metadata(&key("embedding_length"), u32v(s.n_embd));
    w.add_metadata(&key("block_count"), u32v(s.n_layer));
    w.add_metadata(&key("feed_forward_length"), u32v(s.n_ff));
    w.add_metadata(&key("attention.head_count"), u32v(s.n_head));
    w.add_metadata(&key("attention.head_count_kv"), u32v(s.n_head_kv));
    w.add_metadata(&key("rope.dimension_count"), u32v(s.n_embd / s.n_head));
    w.add_metadata(&key("vocab_size"), u32v(n_vocab));
    let f = |k: &str, d: f64| -> Result<f32> {
        Ok(vocab_from.get_f64(&format!("{src_arch}.{k}"))?.unwrap_or(d) as f32)
    };
    w.add_metadata(
        &key("rope.freq_base"),
        Value::F32(f("rope.freq_base", 10000.0)?),
    );
    w.add_metadata(
        &key("attention.layer_norm_rms_epsilon"),
        Value::F32(f("attention.layer_norm_rms_epsilon", 1e-5)?),
    );
    w.add_metadata(
        "general.file_type",
        Value::U32(if s.ty == GgmlType::F16 { 1 } else { 0 }),
    );
    for (k, v) in vocab_from.metadata() {
        if k.starts_with("tokenizer.") {
            w.add_metadata(k, v.clone());
        }
    }

    let hd = s.n_embd / s.n_head;
    let kv = s.n_head_kv * hd;
    let mut n_params = 0u64;
    let mut add =
        |w: &mut GgufWriter, name: &str, ty: GgmlType, rows: usize, x: Vec<f32>| -> Result<()> {
            let cols = x.len() / rows;
            let dims: Vec<u64> = if rows == 1 {
                vec![cols as u64]
            } else {
                vec![cols as u64, rows as u64]
            };
            n_params += x.len() as u64;
            w.add_tensor(name, ty, &dims, encode(ty, &x)?)?;
            Ok(())
        };
    let norm = |name: &str, n: usize| -> Vec<f32> {
        let mut r = Rng::for_tensor(s.seed, name);
        (0..n).map(|_| 1.0 + 0.02 * r.normal()).collect()
    };
    let embd_std = 3.0 / (s.n_embd as f32).sqrt();
    let mut r = Rng::for_tensor(s.seed, "token_embd.weight");
    let emb: Vec<f32> = (0..n_vocab * s.n_embd)
        .map(|_| embd_std * r.normal())
        .collect();
    add(&mut w, "token_embd.weight", s.ty, n_vocab, emb)?;
    add(
        &mut w,
        "output_norm.weight",
        GgmlType::F32,
        1,
        norm("output_norm.weight", s.n_embd),
    )?;
    for il in 0..s.n_layer {
        let p = |t: &str| format!("blk.{il}.{t}");
        add(
            &mut w,
            &p("attn_norm.weight"),
            GgmlType::F32,
            1,
            norm(&p("attn_norm.weight"), s.n_embd),
        )?;
        add(
            &mut w,
            &p("ffn_norm.weight"),
            GgmlType::F32,
            1,
            norm(&p("ffn_norm.weight"), s.n_embd),
        )?;
        if s.arch == Arch::Bitnet {
            add(
                &mut w,
                &p("attn_sub_norm.weight"),
                GgmlType::F32,
                1,
                norm(&p("attn_sub_norm.weight"), s.n_embd),
            )?;
            add(
                &mut w,
                &p("ffn_sub_norm.weight"),
                GgmlType::F32,
                1,
                norm(&p("ffn_sub_norm.weight"), s.n_ff),
            )?;
        }
        for (t, rows, cols) in [
            ("attn_q", s.n_embd, s.n_embd),
            ("attn_k", kv, s.n_embd),
            ("attn_v", kv, s.n_embd),
            ("attn_output", s.n_embd, s.n_embd),
            ("ffn_gate", s.n_ff, s.n_embd),
            ("ffn_up", s.n_ff, s.n_embd),
            ("ffn_down", s.n_embd, s.n_ff),
        ] {
            let name = p(&format!("{t}.weight"));
            let mut r = Rng::for_tensor(s.seed, &name);
            let n = rows * cols;
            let x: Vec<f32> = if s.ternary {
                let scale = 1.0 / (2.0 / 3.0 * cols as f32).sqrt();
                // the f16 of the scale, so weights and scale tensor agree exactly
                let scale = half::f16::from_f32(scale).to_f32();
                let sep = s.scale_tensors && s.arch == Arch::Bitnet;
                if sep {
                    add(
                        &mut w,
                        &p(&format!("{t}.scale")),
                        GgmlType::F32,
                        1,
                        vec![scale],
                    )?;
                }
                let m = if sep { 1.0 } else { scale };
                (0..n).map(|_| m * r.trit()).collect()
            } else {
                (0..n).map(|_| s.std * r.normal()).collect()
            };
            add(&mut w, &name, s.ty, rows, x)?;
        }
    }
    w.write_file(path)?;
    Ok(n_params)
}
