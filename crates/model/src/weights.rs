//! Weights: tensors located in the GGUF mapping, checked for shape and type at load.

use std::path::Path;
use std::sync::Arc;

use capy_gguf::{GgmlType, Gguf};
use capy_kernels::matmul::{dequantize, ActType};
use capy_kernels::repack::{repack_releasing, Repacked};
use capy_kernels::{kernels, WeightRef};

use crate::hparams::Hparams;
use crate::{Error, Result};

/// A 1-D or 2-D tensor inside the model file: `n_rows` rows of `n_cols` elements.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub ty: GgmlType,
    pub n_rows: usize,
    pub n_cols: usize,
    start: usize,
    len: usize,
    /// The same matrix in row-interleaved blocks, when the CPU has kernels for them.
    pub repacked: Option<Arc<Repacked>>,
    /// A per-tensor factor on the product's output (BitNet's `blk.N.*.scale`), if any.
    pub scale: Option<f32>,
}

pub struct Layer {
    /// `[n_embd]` each
    pub attn_norm: Vec<f32>,
    /// `[n_head*head_dim, n_embd]`
    pub wq: Tensor,
    /// `[n_head_kv*head_dim, n_embd]`
    pub wk: Tensor,
    /// `[n_head_kv*head_dim_v, n_embd]`
    pub wv: Tensor,
    /// `[n_embd, n_head*head_dim_v]`
    pub wo: Tensor,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    /// `[head_dim]`
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    /// `[n_ff, n_embd]`
    pub ffn_gate: Tensor,
    pub ffn_up: Tensor,
    /// `[n_embd, n_ff]`
    pub ffn_down: Tensor,
    pub post_ffn_norm: Option<Vec<f32>>,
    /// `[n_head*head_dim_v]`: RMSNorm on the attention output projection's input (BitNet)
    pub attn_sub_norm: Option<Vec<f32>>,
    /// `[n_ff]`: RMSNorm on the FFN down projection's input (BitNet)
    pub ffn_sub_norm: Option<Vec<f32>>,
}

/// A loaded model: hyper-parameters plus weights borrowed from the mapped file.
pub struct Model {
    pub gguf: Arc<Gguf>,
    pub hp: Hparams,
    /// `[n_vocab, n_embd]`
    pub tok_embd: Tensor,
    pub output_norm: Vec<f32>,
    /// `[n_vocab, n_embd]`; the embedding matrix when tied.
    pub output: Tensor,
    pub layers: Vec<Layer>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("arch", &self.hp.arch)
            .field("n_layer", &self.hp.n_layer)
            .finish()
    }
}

impl Model {
    /// Maps a GGUF file and loads the model in it.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        Model::from_gguf(Arc::new(Gguf::open(path)?))
    }

    pub fn from_gguf(gguf: Arc<Gguf>) -> Result<Model> {
        let mut hp = Hparams::from_gguf(&gguf)?;
        let tok_embd = tensor(&gguf, "token_embd.weight", &[hp.n_embd as u64, 0])?;
        if hp.n_vocab == 0 {
            hp.n_vocab = tok_embd.n_rows;
        }
        if tok_embd.n_rows != hp.n_vocab {
            return Err(Error::BadShape {
                tensor: tok_embd.name.clone(),
                expected: vec![hp.n_embd as u64, hp.n_vocab as u64],
                got: vec![tok_embd.n_cols as u64, tok_embd.n_rows as u64],
            });
        }
        // llama.cpp's bitnet always multiplies by the token embeddings
        let tied = hp.arch == crate::Arch::Bitnet;
        let output = match gguf.tensor_info("output.weight") {
            Some(_) if !tied => tensor(
                &gguf,
                "output.weight",
                &[hp.n_embd as u64, hp.n_vocab as u64],
            )?,
            _ => tok_embd.clone(),
        };
        let output_norm = vector(&gguf, "output_norm.weight", hp.n_embd)?;
        let (e, q, k, v, ff) = (
            hp.n_embd as u64,
            hp.n_embd_q() as u64,
            hp.n_embd_k() as u64,
            hp.n_embd_v() as u64,
            hp.n_ff as u64,
        );
        let o_in = (hp.n_head * hp.head_dim_v) as u64;
        let mut layers = Vec::with_capacity(hp.n_layer);
        for il in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{il}.{s}.weight");
            let b = |s: &str| format!("blk.{il}.{s}.bias");
            let opt_vec = |name: String, len: usize, want: bool| -> Result<Option<Vec<f32>>> {
                if want {
                    vector(&gguf, &name, len).map(Some)
                } else {
                    Ok(None)
                }
            };
            // a matrix with its optional per-tensor scale (`blk.N.NAME.scale`, one value)
            let mat = |s: &str, dims: &[u64]| -> Result<Tensor> {
                let mut t = tensor(&gguf, &n(s), dims)?;
                let scale = format!("blk.{il}.{s}.scale");
                if gguf.tensor_info(&scale).is_some() {
                    let value = vector(&gguf, &scale, 1)?[0];
                    if !value.is_finite() {
                        return Err(Error::NonFinite {
                            tensor: scale,
                            value,
                        });
                    }
                    t.scale = Some(value);
                }
                Ok(t)
            };
            layers.push(Layer {
                attn_norm: vector(&gguf, &n("attn_norm"), hp.n_embd)?,
                wq: mat("attn_q", &[e, q])?,
                wk: mat("attn_k", &[e, k])?,
                wv: mat("attn_v", &[e, v])?,
                wo: mat("attn_output", &[o_in, e])?,
                bq: opt_vec(b("attn_q"), q as usize, hp.qkv_bias)?,
                bk: opt_vec(b("attn_k"), k as usize, hp.qkv_bias)?,
                bv: opt_vec(b("attn_v"), v as usize, hp.qkv_bias)?,
                q_norm: opt_vec(n("attn_q_norm"), hp.head_dim, hp.qk_norm)?,
                k_norm: opt_vec(n("attn_k_norm"), hp.head_dim, hp.qk_norm)?,
                post_attn_norm: opt_vec(n("post_attention_norm"), hp.n_embd, hp.post_norms)?,
                ffn_norm: vector(&gguf, &n("ffn_norm"), hp.n_embd)?,
                ffn_gate: mat("ffn_gate", &[e, ff])?,
                ffn_up: mat("ffn_up", &[e, ff])?,
                ffn_down: mat("ffn_down", &[ff, e])?,
                post_ffn_norm: opt_vec(n("post_ffw_norm"), hp.n_embd, hp.post_norms)?,
                attn_sub_norm: opt_vec(n("attn_sub_norm"), o_in as usize, hp.sub_norms)?,
                ffn_sub_norm: opt_vec(n("ffn_sub_norm"), hp.n_ff, hp.sub_norms)?,
            });
        }
        let mut model = Model {
            gguf,
            hp,
            tok_embd,
            output_norm,
            output,
            layers,
        };
        if kernels().r16_preferred {
            model.repack_weights()?;
        }
        Ok(model)
    }

    /// Repacks every matrix that has a row-interleaved form and lets the OS drop the
    /// original pages.
    fn repack_weights(&mut self) -> Result<()> {
        let gguf = Arc::clone(&self.gguf);
        let mut todo: Vec<&mut Tensor> = vec![&mut self.output];
        for l in &mut self.layers {
            todo.extend([
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.ffn_gate,
                &mut l.ffn_up,
                &mut l.ffn_down,
            ]);
        }
        for t in todo {
            let w = WeightRef {
                ty: t.ty,
                data: gguf.image().get(t.start..t.start + t.len).unwrap_or(&[]),
                n_rows: t.n_rows,
                n_cols: t.n_cols,
            };
            // released from the last page boundary on, so no page straddling two runs stays
            let (start, mut from) = (t.start, t.start);
            let mut release = |off: usize, len: usize| {
                let end = start + off + len;
                gguf.release_range(from, end - from);
                from = end / 4096 * 4096;
            };
            if let Some(rp) = repack_releasing(w, &mut release)? {
                t.repacked = Some(Arc::new(rp));
            }
        }
        // a tied embedding looks its rows up in the repacked output, so the released pages
        // do not fault back in token by token
        if self.output.start == self.tok_embd.start && self.output.ty == self.tok_embd.ty {
            self.tok_embd.repacked = self.output.repacked.clone();
        }
        Ok(())
    }

    /// A kernel view of a weight tensor.
    pub fn weight(&self, t: &Tensor) -> WeightRef<'_> {
        let bytes = self.gguf_bytes(t);
        WeightRef {
            ty: t.ty,
            data: bytes,
            n_rows: t.n_rows,
            n_cols: t.n_cols,
        }
    }

    fn gguf_bytes(&self, t: &Tensor) -> &[u8] {
        self.gguf
            .image()
            .get(t.start..t.start + t.len)
            .unwrap_or(&[])
    }

    /// Bytes of all weights.
    pub fn weight_bytes(&self) -> u64 {
        self.gguf.tensors().iter().map(|t| t.n_bytes).sum()
    }
}

/// Looks up a matrix and checks its shape; a `0` in `dims` accepts any size.
fn tensor(g: &Gguf, name: &str, dims: &[u64]) -> Result<Tensor> {
    let info = g
        .tensor_info(name)
        .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
    let mut got = info.dims.clone();
    while got.len() < dims.len() {
        got.push(1);
    }
    let ok = got.len() == dims.len() && dims.iter().zip(&got).all(|(&w, &g)| w == 0 || w == g);
    if !ok {
        return Err(Error::BadShape {
            tensor: name.to_string(),
            expected: dims.to_vec(),
            got: info.dims.clone(),
        });
    }
    if ActType::for_weight(info.ty).is_none() {
        return Err(capy_kernels::Error::Unsupported {
            op: "load",
            ty: info.ty,
        }
        .into());
    }
    let data = g.tensor_data(info);
    if !(data.as_ptr() as usize).is_multiple_of(4) {
        return Err(capy_kernels::Error::Misaligned {
            op: "load",
            ty: info.ty,
        }
        .into());
    }
    Ok(Tensor {
        name: name.to_string(),
        ty: info.ty,
        n_rows: info.n_rows(),
        n_cols: info.row_len(),
        start: (g.data_offset() + info.offset) as usize,
        len: data.len(),
        repacked: None,
        scale: None,
    })
}

/// Loads a 1-D tensor of `len` elements as f32.
fn vector(g: &Gguf, name: &str, len: usize) -> Result<Vec<f32>> {
    let (info, data) = g.tensor(name)?;
    if info.n_elements() != len as u64 {
        return Err(Error::BadShape {
            tensor: name.to_string(),
            expected: vec![len as u64],
            got: info.dims.clone(),
        });
    }
    let mut out = vec![0.0f32; len];
    if info.ty == GgmlType::F32 {
        // read through from_le_bytes: no alignment assumption on 1-D tensors
        for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    } else {
        dequantize(info.ty, data, &mut out)?;
    }
    Ok(out)
}
